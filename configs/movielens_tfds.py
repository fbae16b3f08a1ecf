"""The unified model on MovieLens through TensorFlow Datasets (no TensorFlow needed): 100K by default, 1M with
--config.data.tfds_name=movielens/1m-ratings. TFDS shuffles the ratings, so the split is random, not u1."""

from configs import movielens_schema
from mtl_rec import config as config_lib


def get_config():
  c = movielens_schema.apply(config_lib.base_config())
  c.name = 'mtl_rec_ml_tfds'  # model name in exports and serving
  c.data.source = 'tfds'  # movielens/100k-ratings via tfds.data_source (prepared once, needs GroupLens then)
  c.data.split = 'random'  # a seeded 20% of the ratings is the test set
  c.tasks.click.weight = 5.0  # as for ML-100K (configs/movielens_100k.py)
  return c
