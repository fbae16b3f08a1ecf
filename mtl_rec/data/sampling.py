"""Negative sampling for the implicit-feedback (click) task."""

from __future__ import annotations

import numpy as np

from mtl_rec import errors


class NegativeSampler:
  """Draws unobserved items for users: uniform or popularity**power over the training items.

  Users and items are positions in the side tables. A sampled item is never one of that user's training positives
  (`exclude` pairs); rejected draws are redrawn.
  """

  def __init__(self, exclude_users: np.ndarray, exclude_items: np.ndarray, candidate_items: np.ndarray,
               num_items: int, distribution: str = 'uniform', popularity_power: float = 0.75,
               popularity_counts: np.ndarray | None = None):
    self.num_items = int(num_items)
    self.candidates = np.asarray(candidate_items, np.int64)
    if self.candidates.size == 0:
      raise errors.DataError('no candidate items to sample negatives from: the training split is empty')
    self._keys = np.unique(np.asarray(exclude_users, np.int64) * self.num_items + np.asarray(exclude_items, np.int64))
    if distribution == 'uniform':
      self._p = None
    elif distribution == 'popularity':
      if popularity_counts is None:
        popularity_counts = np.bincount(exclude_items, minlength=num_items)
      w = np.asarray(popularity_counts, np.float64)[self.candidates] ** popularity_power
      self._p = w / w.sum()
    else:
      raise errors.ConfigError(f"unknown negative distribution {distribution!r}: use 'uniform' or 'popularity'")
    # Users that saw every candidate would loop forever; find them up front.
    key_items = self._keys % self.num_items
    per_user = np.bincount(self._keys // self.num_items,
                           weights=np.isin(key_items, self.candidates).astype(np.float64))
    self._full_users = np.nonzero(per_user >= self.candidates.size)[0]

  def item_probabilities(self) -> np.ndarray:
    """float64 [num_items]: the probability that a draw is each item (before a user's positives are rejected)."""
    p = np.zeros(self.num_items)
    p[self.candidates] = 1.0 / self.candidates.size if self._p is None else self._p
    return p

  def is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    keys = np.asarray(users, np.int64) * self.num_items + np.asarray(items, np.int64)
    if self._keys.size == 0:
      return np.zeros(keys.shape, bool)
    pos = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
    return self._keys[pos] == keys

  def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.choice(self.candidates.size, size=n, p=self._p) if self._p is not None else rng.integers(
        0, self.candidates.size, size=n)
    return self.candidates[idx]

  def sample(self, users: np.ndarray, k: int, rng: np.random.Generator, max_rounds: int = 100) -> np.ndarray:
    """[len(users), k] items, none a training positive of its row's user."""
    users = np.asarray(users, np.int64)
    if self._full_users.size and np.isin(users, self._full_users).any():
      bad = users[np.isin(users, self._full_users)][0]
      raise errors.DataError(f'user index {bad} interacted with every candidate item: no negatives can be sampled')
    out = self._draw(users.size * k, rng).reshape(users.size, k)
    flat_users = np.repeat(users, k).reshape(users.size, k)
    bad = self.is_positive(flat_users, out)
    for _ in range(max_rounds):
      if not bad.any():
        return out
      out[bad] = self._draw(int(bad.sum()), rng)
      bad[bad] = self.is_positive(flat_users[bad], out[bad])
    raise RuntimeError(f'negative sampling did not converge in {max_rounds} rounds; users are too dense')
