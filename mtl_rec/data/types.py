"""The one in-memory format every data source produces.

Raw ids are int64 (MovieLens ids, TFDS ids parsed from bytes, synthetic ids). Everything downstream (splits,
features, sampling) consumes a `RatingsData` and never knows which source made it.
"""

from __future__ import annotations

import dataclasses

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


class DataError(ValueError):
  """Raised for a corrupt, partial or malformed data file; the message names the file and the fix."""
