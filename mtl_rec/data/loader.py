"""config.data -> RatingsData: the one place that picks a source."""

from __future__ import annotations

from typing import Any

from mtl_rec.data.types import RatingsData


def load_data(data_config: Any, seed: int = 0) -> RatingsData:
  """Loads the dataset named by `data_config.source` (see mtl_rec/config.py for the fields)."""
  dc = data_config
  path = dc.path or None
  cache = dc.cache_dir or None
  if dc.source == 'movielens_100k':
    from mtl_rec.data import movielens  # pylint: disable=g-import-not-at-top
    return movielens.load_100k(path, cache_dir=cache)
  if dc.source == 'movielens_1m':
    from mtl_rec.data import movielens  # pylint: disable=g-import-not-at-top
    return movielens.load_1m(path, cache_dir=cache)
  if dc.source == 'tfds':
    from mtl_rec.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.load(dc.tfds_name, data_dir=dc.tfds_data_dir or None)
  if dc.source == 'synthetic':
    from mtl_rec.data import synthetic  # pylint: disable=g-import-not-at-top
    sc = dc.synthetic
    return synthetic.generate(num_users=sc.num_users, num_items=sc.num_items,
                              interactions_per_user=sc.interactions_per_user, latent_dim=sc.latent_dim, seed=seed)
  raise ValueError(f'config.data.source={dc.source!r} is invalid: use movielens_100k, movielens_1m, tfds or synthetic')
