"""Training and evaluation examples: observed pairs + sampled negatives -> feature batches.

A global batch is a nested dict of numpy arrays:
  {'user': {feature: [B]}, 'item': {feature: [B] or [B, G]},
   'labels': {'click', 'like', 'rating', 'rating_class'}, 'observed': [B], 'valid': [B]}
`observed` is 1 for observed (rated) pairs, 0 for sampled negatives: like/rating losses are masked by it. `valid` is
0 only for padding rows of the last eval batch. Batches are a pure function of (seed, epoch, step), so a resumed run
regenerates exactly the batches it would have seen, and every process of a multi-host job builds the same global
batch and keeps its own slice.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.features import FeatureEncoder

Batch = dict


@dataclasses.dataclass(frozen=True)
class Labels:
  """Every label of a row from its rating and whether it was observed: click (observed), like (rating >= the
  threshold), rating, and rating_class (the rating's class: 0 for the lowest rating of the data's scale)."""

  like_threshold: float
  rating_range: tuple[float, float]  # the data's lowest and highest rating

  def __call__(self, rating: np.ndarray, observed: np.ndarray) -> dict[str, np.ndarray]:
    lo, hi = self.rating_range
    return {
        'click': observed.astype(np.float32),
        'like': ((rating >= self.like_threshold) & (observed > 0)).astype(np.float32),
        'rating': np.where(observed > 0, rating, 0).astype(np.float32),
        'rating_class': np.where(observed > 0, np.clip(np.round(rating) - lo, 0, hi - lo), 0).astype(np.int32),
    }


@dataclasses.dataclass
class Examples:
  """Rows of (user, item) positions with ratings; `observed` = 0 marks sampled negatives."""

  user: np.ndarray  # int64 positions in data.users
  item: np.ndarray  # int64 positions in data.items
  rating: np.ndarray  # float32, 0 for negatives
  observed: np.ndarray  # float32

  def __len__(self) -> int:
    return int(self.user.shape[0])

  def take(self, idx: np.ndarray) -> 'Examples':
    return Examples(self.user[idx], self.item[idx], self.rating[idx], self.observed[idx])

  @staticmethod
  def concat(parts: list['Examples']) -> 'Examples':
    return Examples(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Examples)))


def with_negatives(pos: Examples, sampler: NegativeSampler, k: int, rng: np.random.Generator) -> Examples:
  """The positives followed by k sampled negatives per positive."""
  if k == 0:
    return pos
  neg_items = sampler.sample(pos.user, k, rng).reshape(-1)
  neg_users = np.repeat(pos.user, k)
  n = neg_users.shape[0]
  return Examples.concat([pos, Examples(neg_users, neg_items, np.zeros(n, np.float32), np.zeros(n, np.float32))])


def to_batch(ex: Examples, encoder: FeatureEncoder, labels: Labels, valid: np.ndarray | None = None) -> Batch:
  batch = encoder.gather(ex.user, ex.item)
  batch['labels'] = labels(ex.rating, ex.observed)
  batch['observed'] = ex.observed.astype(np.float32)
  batch['valid'] = np.ones(len(ex), np.float32) if valid is None else valid.astype(np.float32)
  return batch


class TrainStream:
  """Epochs of shuffled global batches; negatives are resampled every epoch; the last partial batch is dropped."""

  def __init__(self, positives: Examples, encoder: FeatureEncoder, sampler: NegativeSampler, num_negatives: int,
               batch_size: int, labels: Labels, seed: int):
    self.positives = positives
    self.encoder = encoder
    self.sampler = sampler
    self.num_negatives = num_negatives
    self.batch_size = batch_size
    self.labels = labels
    self.seed = seed
    self.rows_per_epoch = len(positives) * (1 + num_negatives)
    self.steps_per_epoch = self.rows_per_epoch // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f'train.batch_size={batch_size} is larger than an epoch ({self.rows_per_epoch} rows); '
                       'lower --config.train.batch_size')

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """Batches `start_step`.. of `epoch` (0-based), identical whenever they are regenerated."""
    rng = np.random.default_rng([self.seed, 2, epoch])
    ex = with_negatives(self.positives, self.sampler, self.num_negatives, rng)
    order = rng.permutation(len(ex))
    for step in range(start_step, self.steps_per_epoch):
      idx = order[step * self.batch_size:(step + 1) * self.batch_size]
      yield to_batch(ex.take(idx), self.encoder, self.labels)


@dataclasses.dataclass
class EvalSet:
  """Held-out observed pairs plus fixed sampled negatives (for click AUC/LogLoss)."""

  examples: Examples

  @classmethod
  def build(cls, positives: Examples, sampler: NegativeSampler, click_negatives: int, seed: int,
            salt: int) -> 'EvalSet':
    rng = np.random.default_rng([seed, 3, salt])
    return cls(with_negatives(positives, sampler, click_negatives, rng))

  def batches(self, encoder: FeatureEncoder, batch_size: int, labels: Labels) -> Iterator[Batch]:
    """Fixed-size batches; the last is padded (valid = 0) so one compiled eval step serves all."""
    n = len(self.examples)
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size)
      valid = idx < n
      yield to_batch(self.examples.take(np.minimum(idx, n - 1)), encoder, labels, valid)
