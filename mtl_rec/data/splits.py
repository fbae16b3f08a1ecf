"""Train / validation / test splits as index arrays into a RatingsData's rows."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mtl_rec import files
from mtl_rec.data.types import RatingsData

U1_TEST_SIZE = 20_000  # u1.test is the first 20,000 lines of u.data


@dataclasses.dataclass(frozen=True)
class Split:
  train: np.ndarray  # int64 row indices, sorted
  valid: np.ndarray
  test: np.ndarray


def _hold_out(rows: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Splits `rows` into (kept, held_out) with a seeded random `fraction` held out."""
  perm = rng.permutation(rows.shape[0])
  n_out = int(round(rows.shape[0] * fraction))
  return np.sort(rows[perm[n_out:]]), np.sort(rows[perm[:n_out]])


def make_split(data: RatingsData, method: str, seed: int, valid_fraction: float = 0.05,
               test_fraction: float = 0.2) -> Split:
  """Builds a split.

  Methods:
    'u1': the official MovieLens-100K u1 split: test = the first 20,000 ratings in u.data order, base = the rest.
    'random': a seeded `test_fraction` of all ratings is the test set.
    'leave_last_out': each user's latest rating (by timestamp, then file order) is the test set.
  In every case validation is a seeded `valid_fraction` of the non-test ratings — never the test split.
  """
  n = data.num_ratings
  rows = np.arange(n, dtype=np.int64)
  rng = np.random.default_rng([seed, 1])
  if method == 'u1':
    if n != 100_000:
      raise ValueError(f"data.split='u1' needs MovieLens-100K's 100,000 ratings in u.data order, got {n:,}; "
                       "use --config.data.split=random or leave_last_out")
    test, base = rows[:U1_TEST_SIZE], rows[U1_TEST_SIZE:]
  elif method == 'random':
    base, test = _hold_out(rows, test_fraction, rng)
  elif method == 'leave_last_out':
    order = np.lexsort((rows, data.timestamp, data.user_id))  # by user, then time, then file order
    last = np.ones(n, bool)
    last[:-1] = data.user_id[order[:-1]] != data.user_id[order[1:]]
    is_test = np.zeros(n, bool)
    is_test[order[last]] = True
    # A user with a single rating keeps it for training: a test row for an unseen user measures nothing.
    counts = np.bincount(np.unique(data.user_id, return_inverse=True)[1])
    single = counts[np.unique(data.user_id, return_inverse=True)[1]] == 1
    is_test &= ~single
    test, base = rows[is_test], rows[~is_test]
  else:
    raise ValueError(f"unknown split method {method!r}: use 'u1', 'random' or 'leave_last_out'")
  train, valid = _hold_out(base, valid_fraction, rng)
  return Split(train=train, valid=valid, test=np.sort(test))


def write_csv(data: RatingsData, split: Split, directory: str) -> None:
  """Writes {train,valid,test}.csv with columns user_id,item_id,rating,timestamp in raw ids."""
  os.makedirs(directory, exist_ok=True)
  for name in ('train', 'valid', 'test'):
    rows = getattr(split, name)
    table = np.stack([data.user_id[rows], data.item_id[rows], data.rating[rows], data.timestamp[rows]], axis=1)
    files.write_atomic(os.path.join(directory, f'{name}.csv'), lambda tmp, table=table: np.savetxt(
        tmp, table, fmt=['%d', '%d', '%g', '%d'], delimiter=',', header='user_id,item_id,rating,timestamp',
        comments=''))
