"""Data sources. Each returns a `RatingsData`; see `types.py` for the format."""

from mtl_rec.data import movielens, synthetic, tfds_source
from mtl_rec.data.types import ItemTable, RatingsData, UserTable
from mtl_rec.errors import DataError

__all__ = ['DataError', 'ItemTable', 'RatingsData', 'UserTable', 'movielens', 'synthetic', 'tfds_source']
