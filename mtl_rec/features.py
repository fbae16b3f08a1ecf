"""Feature specs and encoders: raw side features -> integer rows of embedding tables.

Vocabularies are fitted on the training split only; row 0 of every categorical table is the reserved
out-of-vocabulary (OOV) row, so ids and values never seen in training (cold start) still get an embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from mtl_rec.data.types import RatingsData

OOV_ROW = 0


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Sorted known values; `lookup` maps values to rows 1..n and anything else to OOV_ROW."""

  keys: np.ndarray  # sorted unique values (int64 or str)

  @classmethod
  def fit(cls, values: np.ndarray) -> 'Vocab':
    return cls(np.unique(np.asarray(values)))

  @property
  def size(self) -> int:
    """Number of rows including the OOV row."""
    return int(self.keys.shape[0]) + 1

  def lookup(self, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if self.keys.size == 0:
      return np.zeros(values.shape, np.int32)
    if values.dtype.kind != self.keys.dtype.kind:  # e.g. str ids against an int vocabulary
      try:
        values = values.astype(self.keys.dtype)
      except ValueError:
        return np.zeros(values.shape, np.int32)
    pos = np.searchsorted(self.keys, values)
    pos_c = np.minimum(pos, self.keys.shape[0] - 1)
    found = self.keys[pos_c] == values
    return np.where(found, pos_c + 1, OOV_ROW).astype(np.int32)

  def to_json(self) -> dict[str, Any]:
    return {'dtype': 'int' if self.keys.dtype.kind in 'iu' else 'str', 'values': self.keys.tolist()}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'Vocab':
    dtype = np.int64 if d['dtype'] == 'int' else np.str_
    return cls(np.asarray(d['values'], dtype=dtype))


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One model input: which entity it describes, how it is embedded, and how many rows its table has."""

  name: str
  entity: str  # 'user' or 'item'
  kind: str  # 'categorical' (one row per example) or 'multi_hot' (mean-pooled rows)
  vocab_size: int  # rows, the OOV row included (for multi_hot: number of columns)
  large: bool  # id tables: row-sharded over the 'model' mesh axis and L2-regularized per use


def age_bucket(age: np.ndarray, boundaries: Sequence[int]) -> np.ndarray:
  """Bucket index 1..len(boundaries)+1; unknown ages (< 0) -> OOV_ROW."""
  age = np.asarray(age)
  return np.where(age < 0, OOV_ROW, np.searchsorted(np.asarray(boundaries), age, side='right') + 1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class FeatureEncoder:
  """Fitted vocabularies and the encoded side tables of every user and item of the dataset.

  `user_table[name]` / `item_table[name]` are indexed by position in `data.users` / `data.items`, so a batch of
  (user index, item index) pairs gets its features with one fancy-indexing gather on the host.
  """

  specs: tuple[FeatureSpec, ...]
  vocabs: dict[str, Vocab]
  user_table: dict[str, np.ndarray]
  item_table: dict[str, np.ndarray]
  genre_names: tuple[str, ...]
  age_boundaries: tuple[int, ...]
  year_bucket_years: int
  zip_prefix_len: int

  def user_specs(self) -> list[FeatureSpec]:
    return [s for s in self.specs if s.entity == 'user']

  def item_specs(self) -> list[FeatureSpec]:
    return [s for s in self.specs if s.entity == 'item']

  def gather(self, user_index: np.ndarray, item_index: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Model inputs for pairs given as positions in the side tables."""
    return {'user': {k: v[user_index] for k, v in self.user_table.items()},
            'item': {k: v[item_index] for k, v in self.item_table.items()}}

  def vocab_json(self) -> dict[str, Any]:
    return {name: v.to_json() for name, v in self.vocabs.items()}


def fit(data: RatingsData, train_rows: np.ndarray, features_config: Any,
        row_multiple: int = 1) -> FeatureEncoder:
  """Fits vocabularies on the training ratings `train_rows` and encodes every user and item of `data`.

  Args:
    data: the whole dataset (side tables of all users and items).
    train_rows: indices of the training ratings; only their users/items (and those users' and items' side values)
      enter the vocabularies.
    features_config: `config.features`.
    row_multiple: large tables get their row count padded to a multiple of this (for row sharding); padding rows
      are never looked up.
  """
  fc = features_config
  users, items = data.users, data.items
  train_users = np.unique(data.user_id[train_rows])
  train_items = np.unique(data.item_id[train_rows])
  u_known = np.isin(users.user_id, train_users)
  i_known = np.isin(items.item_id, train_items)
  zips = np.asarray([z[:fc.zip_prefix_len] for z in users.zip_code.astype(str)], dtype=np.str_)
  year_bucket = np.where(items.year < 0, -1, items.year // fc.year_bucket_years).astype(np.int64)

  vocabs = {
      'user_id': Vocab.fit(train_users),
      'item_id': Vocab.fit(train_items),
      'gender': Vocab.fit(users.gender[u_known & (users.gender != '')].astype(np.str_)),
      'occupation': Vocab.fit(users.occupation[u_known & (users.occupation != '')].astype(np.str_)),
      'zip': Vocab.fit(zips[u_known & (zips != '')]),
      'year': Vocab.fit(year_bucket[i_known & (year_bucket >= 0)]),
  }
  user_cols = {
      'user_id': vocabs['user_id'].lookup(users.user_id),
      'gender': vocabs['gender'].lookup(users.gender.astype(np.str_)),
      'age': age_bucket(users.age, fc.age_boundaries),
      'occupation': vocabs['occupation'].lookup(users.occupation.astype(np.str_)),
      'zip': vocabs['zip'].lookup(zips),
  }
  item_cols = {
      'item_id': vocabs['item_id'].lookup(items.item_id),
      'year': vocabs['year'].lookup(year_bucket),
      'genres': items.genres.astype(np.float32),
  }

  def padded(n: int) -> int:
    return -(-n // row_multiple) * row_multiple

  sizes = {
      'user_id': padded(vocabs['user_id'].size), 'item_id': padded(vocabs['item_id'].size),
      'gender': vocabs['gender'].size, 'age': len(fc.age_boundaries) + 2, 'occupation': vocabs['occupation'].size,
      'zip': vocabs['zip'].size, 'year': vocabs['year'].size, 'genres': len(items.genre_names),
  }
  specs = tuple(
      [FeatureSpec(n, 'user', 'categorical', sizes[n], n == 'user_id') for n in fc.user] +
      [FeatureSpec(n, 'item', 'multi_hot' if n == 'genres' else 'categorical', sizes[n], n == 'item_id')
       for n in fc.item])
  return FeatureEncoder(
      specs=specs, vocabs=vocabs,
      user_table={n: user_cols[n] for n in fc.user},
      item_table={n: item_cols[n] for n in fc.item},
      genre_names=tuple(items.genre_names), age_boundaries=tuple(fc.age_boundaries),
      year_bucket_years=int(fc.year_bucket_years), zip_prefix_len=int(fc.zip_prefix_len))
