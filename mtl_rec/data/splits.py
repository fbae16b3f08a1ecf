"""Train / validation / test splits of the interaction log, as row index arrays."""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import ml_collections
import numpy as np

from mtl_rec import files
from mtl_rec.data.types import Dataset, DataError


@dataclasses.dataclass(frozen=True)
class Split:
  train: np.ndarray  # int64 row indices, sorted
  valid: np.ndarray
  test: np.ndarray
  cold: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # {'items' | 'users': held-out raw ids}


def _hold_out(rows: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Splits `rows` into (kept, held_out) with a seeded random `fraction` held out."""
  perm = rng.permutation(rows.shape[0])
  n_out = int(round(rows.shape[0] * fraction))
  return np.sort(rows[perm[n_out:]]), np.sort(rows[perm[:n_out]])


def make_split(ds: Dataset, data_config: ml_collections.ConfigDict, seed: int) -> Split:
  """The split config.data asks for (data.split):

    'random': a seeded `test_fraction` of the log rows is the test set.
    'leave_last_out': each user's latest row (by timestamp, then file order) is the test set (a user with a
      single row keeps it for training).
    'timestamp': rows at or after `split_cut` are the test set.
    'column': the column `split_column` names each row's set: 'train', 'valid' or 'test'.
    'head': the first `split_test_rows` rows in file order are the test set (MovieLens-100K's official u1 split is
      the first 20,000 rows of u.data).
  Validation is a seeded `valid_fraction` of the non-test rows (except for 'column' with 'valid' rows) — never the
  test set.
  """
  dc = data_config
  n = ds.num_rows
  rows = np.arange(n, dtype=np.int64)
  rng = np.random.default_rng([seed, 1])
  users = ds.log[ds.user_column]
  valid = None
  if dc.split == 'head':
    if dc.split_test_rows >= n:
      raise DataError(f'data.split_test_rows={dc.split_test_rows} leaves no training rows of the {n:,} in the log; '
                      'use fewer')
    test, base = rows[:dc.split_test_rows], rows[dc.split_test_rows:]
  elif dc.split == 'random':
    base, test = _hold_out(rows, dc.test_fraction, rng)
  elif dc.split == 'timestamp':
    is_test = ds.log[ds.timestamp_column] >= dc.split_cut
    test, base = rows[is_test], rows[~is_test]
    if not test.size or not base.size:
      raise DataError(f'data.split_cut={dc.split_cut} puts {"no" if not test.size else "every"} row in the test set '
                      f'(timestamps run from {ds.log[ds.timestamp_column].min():g} to '
                      f'{ds.log[ds.timestamp_column].max():g}); choose a time inside that range')
  elif dc.split == 'leave_last_out':
    order = np.lexsort((rows, ds.log[ds.timestamp_column], users))  # by user, then time, then file order
    last = np.ones(n, bool)
    last[:-1] = users[order[:-1]] != users[order[1:]]
    is_test = np.zeros(n, bool)
    is_test[order[last]] = True
    inverse = np.unique(users, return_inverse=True)[1]
    is_test &= np.bincount(inverse)[inverse] > 1  # a test row for a user seen nowhere else measures nothing
    test, base = rows[is_test], rows[~is_test]
  else:  # 'column'
    names = np.asarray(ds.log[dc.split_column]).astype(np.str_)
    bad = np.flatnonzero(~np.isin(names, ('train', 'valid', 'test')))
    if bad.size:
      raise DataError(f'interaction log: {ds.where("log", int(bad[0]))}: column {dc.split_column!r} holds '
                      f"{names[bad[0]]!r}; the split column names 'train', 'valid' or 'test'")
    test, base = rows[names == 'test'], rows[names != 'test']
    if (names == 'valid').any():
      valid, base = rows[names == 'valid'], rows[names == 'train']
  if valid is None:
    base, valid = _hold_out(base, dc.valid_fraction, rng)
  cold = {}
  for entity, share, column in (('items', dc.cold_items, ds.item_column), ('users', dc.cold_users, ds.user_column)):
    if share:  # these ids' training rows move to validation: they are seen only in validation and test
      ids = np.unique(ds.log[column])
      picked = np.random.default_rng([seed, 8, len(cold)]).permutation(ids.size)[:int(round(share * ids.size))]
      cold[entity] = np.sort(ids[picked])
      moved = np.isin(ds.log[column][base], cold[entity])
      base, valid = base[~moved], np.sort(np.concatenate([valid, base[moved]]))
  if not base.size or not test.size:
    raise DataError(f'the {dc.split!r} split of {n:,} log rows leaves {base.size} training and {test.size} test '
                    'rows; both must be non-empty')
  return Split(train=base, valid=valid, test=np.sort(test), cold=cold)


def write_csv(ds: Dataset, split: Split, columns: list[str], directory: str) -> None:
  """Writes {train,valid,test}.csv: the log's `columns` (ids as given) for each set."""
  os.makedirs(directory, exist_ok=True)
  for name in ('train', 'valid', 'test'):
    rows = getattr(split, name)
    cols = [np.asarray(ds.log[c])[rows] for c in columns]
    cols = [[('%g' % v) for v in c] if c.dtype.kind == 'f' else c.tolist() for c in cols]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(columns)
    writer.writerows(zip(*cols))
    files.write_text(os.path.join(directory, f'{name}.csv'), out.getvalue())


