"""Train / validation / test splits of the interaction log, as row index arrays."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Callable

import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import files
from mtl_rec.data import readers
from mtl_rec.data.types import Dataset
from mtl_rec.errors import DataError


@dataclasses.dataclass(frozen=True)
class Split:
  train: np.ndarray  # int64 row indices, sorted
  valid: np.ndarray
  test: np.ndarray
  cold: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # {'items' | 'users': held-out raw ids}


TRAIN, VALID, TEST = 0, 1, 2  # split codes of `assign`

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), 0x9E3779B97F4A7C15


def row_uniform(rows: np.ndarray, seed: int, salt: int) -> np.ndarray:
  """A uniform number in [0, 1) per global row id, a pure function of (row, seed, salt): splitmix64's finalizer.

  Holding out rows by it needs no permutation of the whole log, so a streamed log splits row group by row group
  exactly as the same log loaded in memory."""
  key = np.uint64((seed * _GOLDEN + (salt + 1) * 0xD1B54A32D192ED03) % (1 << 64))
  x = np.asarray(rows, np.int64).astype(np.uint64) ^ key
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def assign(rows: np.ndarray, log: dict[str, np.ndarray], data_config: ml_collections.ConfigDict, seed: int,
           hash_valid: bool = True, where: Callable[[int], str] = lambda i: f'row {i}') -> np.ndarray:
  """int8 split codes (TRAIN, VALID, TEST) of log rows with global ids `rows` and columns `log`, row by row, for
  the splits in config.ROW_SPLITS (see make_split). `hash_valid`: validation is the seeded valid_fraction of the other
  rows (for 'column': only when the column names no 'valid' row anywhere). `where(i)` names row i in an error."""
  dc = data_config
  rows = np.asarray(rows, np.int64)
  code = np.full(rows.shape, TRAIN, np.int8)
  if dc.split == 'head':
    test = rows < dc.split_test_rows
  elif dc.split == 'random':
    test = row_uniform(rows, seed, 0) < dc.test_fraction
  elif dc.split == 'timestamp':
    # numbers stored as text (checked as timestamps by the loader, or the streaming survey) compare as numbers
    column = dc.log.timestamp_column
    times = readers.numeric(np.asarray(log[column]), column, (), 'interaction log', 'the timestamp column')
    test = times >= dc.split_cut
  elif dc.split == 'column':
    names = np.asarray(log[dc.split_column]).astype(np.str_)
    bad = np.flatnonzero(~np.isin(names, ('train', 'valid', 'test')))
    if bad.size:
      raise DataError(f'interaction log: {where(int(bad[0]))}: column {dc.split_column!r} holds '
                      f"{names[bad[0]]!r}; the split column names 'train', 'valid' or 'test'")
    code[names == 'valid'] = VALID
    test = names == 'test'
  else:
    raise DataError(f"data.split={dc.split!r} is not decided row by row; data.reader='stream' takes one of "
                    f"{', '.join(config_lib.ROW_SPLITS)}")
  if hash_valid:
    code[row_uniform(rows, seed, 1) < dc.valid_fraction] = VALID
  code[test] = TEST
  return code


def _hold_out(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits `rows` (global row ids) into (kept, held_out): a row is held out when its seeded uniform is below
  `fraction` (row_uniform), so about that share of them."""
  out = row_uniform(rows, seed, 1) < fraction
  return np.sort(rows[~out]), np.sort(rows[out])


def make_split(ds: Dataset, data_config: ml_collections.ConfigDict, seed: int) -> Split:
  """The split config.data asks for (data.split):

    'random': the rows whose seeded uniform (row_uniform of the global row id) is below `test_fraction`.
    'leave_last_out': each user's latest row (by timestamp, then file order) is the test set (a user with a
      single row keeps it for training).
    'timestamp': rows at or after `split_cut` are the test set.
    'column': the column `split_column` names each row's set: 'train', 'valid' or 'test'.
    'head': the first `split_test_rows` rows in file order are the test set (MovieLens-100K's official u1 split is
      the first 20,000 rows of u.data).
  Validation: the non-test rows whose seeded uniform is below `valid_fraction` (for 'column': the 'valid' rows if
  there are any) — never the test set. Every split but 'leave_last_out' is decided row by row (`assign`), so a
  streamed log (data.reader='stream') gets the same split as the same log loaded in memory.
  """
  dc = data_config
  n = ds.num_rows
  rows = np.arange(n, dtype=np.int64)
  users = ds.log[ds.user_column]
  if dc.split == 'leave_last_out':
    order = np.lexsort((rows, ds.log[ds.timestamp_column], users))  # by user, then time, then file order
    last = np.ones(n, bool)
    last[:-1] = users[order[:-1]] != users[order[1:]]
    is_test = np.zeros(n, bool)
    is_test[order[last]] = True
    inverse = np.unique(users, return_inverse=True)[1]
    is_test &= np.bincount(inverse)[inverse] > 1  # a test row for a user seen nowhere else measures nothing
    test, (base, valid) = rows[is_test], _hold_out(rows[~is_test], dc.valid_fraction, seed)
  else:
    if dc.split == 'head' and dc.split_test_rows >= n:
      raise DataError(f'data.split_test_rows={dc.split_test_rows} leaves no training rows of the {n:,} in the log; '
                      'use fewer')
    if dc.split == 'timestamp':
      times = ds.log[ds.timestamp_column]
      if not (times >= dc.split_cut).any() or (times >= dc.split_cut).all():
        raise DataError(f'data.split_cut={dc.split_cut} puts {"no" if (times < dc.split_cut).all() else "every"} '
                        f'row in the test set (timestamps run from {number(times.min())} to {number(times.max())}); choose a '
                        'time inside that range')
    hash_valid = dc.split != 'column' or not (np.asarray(ds.log[dc.split_column]).astype(np.str_) == 'valid').any()
    code = assign(rows, ds.log, dc, seed, hash_valid, lambda i: ds.where('log', i))
    base, valid, test = rows[code == TRAIN], rows[code == VALID], rows[code == TEST]
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


def number(v: float) -> str:
  """A float as the log gave it: whole numbers without a decimal point (a timestamp keeps every digit, which '%g'
  rounded to six), others in their shortest round-tripping form, missing ones as an empty cell."""
  v = float(v)
  if not math.isfinite(v):
    return ''
  return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def write_csv(ds: Dataset, split: Split, columns: list[str], directory: str) -> None:
  """Writes {train,valid,test}.csv: the log's `columns` (ids as given) for each set."""
  os.makedirs(directory, exist_ok=True)
  for name in ('train', 'valid', 'test'):
    rows = getattr(split, name)
    cols = [np.asarray(ds.log[c])[rows] for c in columns]
    cols = [[number(v) for v in c] if c.dtype.kind == 'f' else c.tolist() for c in cols]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(columns)
    writer.writerows(zip(*cols))
    files.write_text(os.path.join(directory, f'{name}.csv'), out.getvalue())


