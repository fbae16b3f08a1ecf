"""Data sources. Each returns a `RatingsData`; see `types.py` for the format."""

from mtl_rec.data import movielens, synthetic, tfds_source
from mtl_rec.data.types import DataError, ItemTable, RatingsData, UserTable

__all__ = ['DataError', 'ItemTable', 'RatingsData', 'UserTable', 'movielens', 'synthetic', 'tfds_source']
