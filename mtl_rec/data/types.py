"""The in-memory data formats.

`Dataset` is the one format everything downstream (splits, features, labels, sampling) consumes: the interaction
log and the user and item side tables as columns, whichever source made them — Parquet/CSV files declared in the
config (`readers`), or a built-in source. The built-in MovieLens-family sources (GroupLens files, TFDS, the planted
synthetic generator) parse into `RatingsData` first and `to_dataset` turns that into columns; from there on nothing
knows MovieLens.

Column conventions of a Dataset: strings are numpy str arrays ('' = missing), integers int64, floats float64 with
NaN for missing (an integer column with missing values reads as float64), multi-valued columns object arrays of
lists of strings (or a `MultiHot`), booleans bool.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class UserTable:
  """Side features of users, one row per user (arrays of equal length)."""

  user_id: np.ndarray  # int64 [U], raw ids, unique
  gender: np.ndarray  # str (object/unicode) [U], e.g. 'M'/'F'; '' when unknown
  age: np.ndarray  # int32 [U], years; -1 when unknown
  occupation: np.ndarray  # str [U]; '' when unknown
  zip_code: np.ndarray  # str [U]; '' when unknown


@dataclasses.dataclass(frozen=True)
class ItemTable:
  """Side features of items, one row per item."""

  item_id: np.ndarray  # int64 [I], raw ids, unique
  title: np.ndarray  # str [I]
  year: np.ndarray  # int32 [I], release year; -1 when unknown
  genres: np.ndarray  # bool [I, G] multi-hot
  genre_names: tuple[str, ...]  # length G, column names of `genres`


@dataclasses.dataclass(frozen=True)
class RatingsData:
  """Explicit ratings (each one is also an implicit 'click') plus side tables.

  Row order is the source's order (for ML-100K: u.data's line order, which the official u1 split relies on).
  """

  name: str  # e.g. 'movielens-100k'
  source: str  # human-readable: which source was used (path, 'grouplens download', 'recbole wheel', 'tfds', ...)
  user_id: np.ndarray  # int64 [N]
  item_id: np.ndarray  # int64 [N]
  rating: np.ndarray  # float32 [N], 1..5 for MovieLens
  timestamp: np.ndarray  # int64 [N], unix seconds
  users: UserTable
  items: ItemTable

  @property
  def num_ratings(self) -> int:
    return int(self.user_id.shape[0])

  def select(self, mask_or_index: np.ndarray) -> 'RatingsData':
    """The same data restricted to some rating rows (side tables kept whole)."""
    return dataclasses.replace(
        self,
        user_id=self.user_id[mask_or_index],
        item_id=self.item_id[mask_or_index],
        rating=self.rating[mask_or_index],
        timestamp=self.timestamp[mask_or_index],
    )


@dataclasses.dataclass(frozen=True)
class MultiHot:
  """A multi-valued column stored as a bool matrix [rows, len(names)]: row r holds names[j] where matrix[r, j]."""

  matrix: np.ndarray
  names: tuple[str, ...]

  def __len__(self) -> int:
    return int(self.matrix.shape[0])

  def __getitem__(self, index) -> 'MultiHot':
    return MultiHot(self.matrix[index], self.names)

  def lists(self) -> list[list[str]]:
    names = np.asarray(self.names, dtype=object)
    return [names[row].tolist() for row in self.matrix]


@dataclasses.dataclass(frozen=True)
class Origin:
  """Where rows of a table came from: `rows` rows of file `path` starting at table row `start`; file line numbers
  are row + `first_line` (1 + a header line for CSV, None for formats without lines)."""

  path: str
  start: int
  rows: int
  first_line: int | None


def shown(value: Any) -> str:
  """A data value as an error message quotes it: repr of the Python value (numpy 2 reprs np.str_('x'))."""
  return repr(value.item() if isinstance(value, np.generic) else value)


def where(origins: tuple[Origin, ...], row: int) -> str:
  """'FILE, row R (line L)' for table row `row` (0-based): what an error message names."""
  for o in origins:
    if o.start <= row < o.start + o.rows:
      local = row - o.start
      line = f', line {local + o.first_line}' if o.first_line is not None else ''
      return f'{o.path}, row {local + 1}{line}'
  return f'row {row + 1}'


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The interaction log and the side tables, as columns (see the module docstring for their types).

  `users[user_column]` / `items[item_column]` hold every user's / item's id once, and every log id is among them.
  """

  name: str
  source: str  # human-readable: which files or built-in source
  log: dict[str, np.ndarray]  # one row per interaction, in file order
  users: dict[str, np.ndarray]  # one row per user; its id column is named like the log's user column
  items: dict[str, np.ndarray]
  user_column: str
  item_column: str
  timestamp_column: str | None = None
  origins: dict[str, tuple[Origin, ...]] = dataclasses.field(default_factory=dict)  # 'log'/'users'/'items'

  @property
  def num_rows(self) -> int:
    return int(len(self.log[self.user_column]))

  def where(self, table: str, row: int) -> str:
    return where(self.origins.get(table, ()), row)


def to_dataset(data: RatingsData) -> Dataset:
  """A built-in source's ratings as a Dataset: log (user_id, item_id, rating, timestamp), users (user_id, gender,
  age, occupation, zip_code; unknown age as NaN) and items (item_id, title, year, genres as a MultiHot)."""
  u, i = data.users, data.items
  nan_if_negative = lambda x: np.where(np.asarray(x) < 0, np.nan, np.asarray(x, np.float64))
  age = np.asarray(u.age, np.int64) if (np.asarray(u.age) >= 0).all() else nan_if_negative(u.age)
  return Dataset(
      name=data.name, source=data.source,
      log={'user_id': np.asarray(data.user_id, np.int64), 'item_id': np.asarray(data.item_id, np.int64),
           'rating': np.asarray(data.rating, np.float32), 'timestamp': np.asarray(data.timestamp, np.int64)},
      users={'user_id': np.asarray(u.user_id, np.int64), 'gender': np.asarray(u.gender).astype(np.str_), 'age': age,
             'occupation': np.asarray(u.occupation).astype(np.str_), 'zip_code': np.asarray(u.zip_code).astype(np.str_)},
      items={'item_id': np.asarray(i.item_id, np.int64), 'title': np.asarray(i.title).astype(np.str_),
             'year': np.asarray(i.year, np.int64), 'genres': MultiHot(np.asarray(i.genres, bool), tuple(i.genre_names))},
      user_column='user_id', item_column='item_id', timestamp_column='timestamp')
