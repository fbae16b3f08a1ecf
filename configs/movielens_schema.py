"""The MovieLens schema, declared: what every MovieLens-family preset (100K, 1M, TFDS, synthetic) reads and predicts.

Not a config by itself: `apply(c)` fills config.data's column roles, config.features and config.tasks of a config
whose source produces MovieLens columns — log: user_id, item_id, rating (1-5), timestamp; users: gender, age,
occupation, zip_code; items: title, year, genres. The same declarations work for MovieLens written out as
Parquet or CSV (configs/movielens_100k_files.py).
"""

import ml_collections

from mtl_rec import config as config_lib
from mtl_rec.config import feature, task
from mtl_rec.data.movielens import GENRES  # GroupLens' genres in u.item's column order


def apply(c):
  """Declares MovieLens' columns, features and tasks on config `c` (returned too)."""
  c.data.log.user_column = 'user_id'
  c.data.log.item_column = 'item_id'
  c.data.log.timestamp_column = 'timestamp'
  c.data.user_table.id_column = 'user_id'
  c.data.item_table.id_column = 'item_id'
  c.data.item_table.title_column = 'title'  # shown with recommendations
  with c.unlocked():
    c.features = ml_collections.ConfigDict({
        'user_id': feature('user', 'user_id', sharded=True),  # ids: row-sharded tables
        'gender': feature('user'),
        'age': feature('user', kind='numeric', transform='bucketize', boundaries=(18, 25, 35, 45, 50, 56)),
        'occupation': feature('user'),
        'zip': feature('user', 'zip_code', prefix=2, dtype='str'),  # the zip code's area: its first 2 characters
        'item_id': feature('item', 'item_id', sharded=True),
        # a fixed vocabulary in GroupLens' order; a movie has at most 6 genres
        'genres': feature('item', kind='multi_categorical', categories=GENRES, max_values=8),
        'year': feature('item', divide=5),  # release year in 5-year spans
        # the title's words ('Godfather: Part II, The' -> godfather, part, ii, the), averaged: what a movie no one
        # has rated yet is known by beside genres and year (series, sequels). Only words of at least 2 training
        # movies' titles: a word of one title only would be a second item id (see "Cold start" in README)
        'title': feature('item', kind='text', min_count=2, max_tokens=16),
    })
    c.tasks = ml_collections.ConfigDict({
        # implicit feedback: every rating is a click, sampled unrated items are not
        'click': task('binary', config_lib.OBSERVED, fusion_weight=0.4),
        'like': task('binary', 'rating', threshold=4.0, fusion_weight=0.3),  # like = rating >= 4, rated pairs only
        'rating': task('regression', 'rating', range=(1.0, 5.0), fusion_weight=0.3),
    })
  c.train.early_stopping_metric = 'rating_rmse'
  c.eval.ranking_task = 'click'  # the catalog is ranked by P(click)
  c.eval.gain_column = 'rating'  # graded NDCG: a held-out item's gain is its rating
  return c
