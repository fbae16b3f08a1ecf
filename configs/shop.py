"""Your own data, worked example: a shop's click log with its own tasks and features (see README "Your own data").

  python examples/make_shop_data.py                       # writes examples/shop/{log,users,items}.csv
  python train.py --config=configs/shop.py --workdir=runs/shop
  python train.py --config=configs/shop.py:DIR --workdir=W   # the same schema over tables in DIR

The log holds the items users clicked (positives only: the click task samples negatives), with request-time context
(device, hour) and three more labels; the users and items tables hold side features. Every declaration below is
documented field by field in mtl_rec/config.py (feature(), task()).
"""

import os

import ml_collections

from mtl_rec import config as config_lib
from mtl_rec.config import feature, task


def get_config(directory: str | None = None):
  directory = directory or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'examples',
                                        'shop')
  c = config_lib.base_config()
  c.name = 'shop'  # model name in exports and serving
  c.data.name = 'shop'  # the dataset's name in metrics.json
  c.data.source = 'files'
  c.data.log.paths = (os.path.join(directory, 'log*.csv'),)  # one or more files; globs are fine
  c.data.log.user_column = 'user'
  c.data.log.item_column = 'item'
  c.data.log.timestamp_column = 'ts'
  c.data.user_table.paths = (os.path.join(directory, 'users.csv'),)
  c.data.user_table.id_column = 'user'
  c.data.item_table.paths = (os.path.join(directory, 'items.csv'),)
  c.data.item_table.id_column = 'item'
  c.data.item_table.title_column = 'title'  # shown with recommendations
  c.data.split = 'leave_last_out'  # each user's latest click is the test set
  c.features = ml_collections.ConfigDict({
      # ids: hashed users (an open vocabulary: new users get a bucket, not the OOV row), fitted items
      'user': feature('user', 'user', vocabulary='hash', hash_buckets=4096, sharded=True),
      'country': feature('user'),
      'age': feature('user', kind='numeric'),  # standardized; missing ages are the mean
      'item': feature('item', 'item', sharded=True),
      'category': feature('item'),
      'tags': feature('item', kind='multi_categorical', delimiter='|', max_values=8),
      'price': feature('item', kind='numeric', transform='bucketize', log1p=True, num_buckets=8),
      'device': feature('context'),  # request-time: the server takes it per request
      'hour': feature('context', kind='numeric', transform='bucketize', boundaries=(6, 12, 18)),
  })
  c.tasks = ml_collections.ConfigDict({
      'click': task('binary', config_lib.OBSERVED, fusion_weight=0.5),  # implicit: log rows vs sampled items
      'add_to_cart': task('binary', 'add_to_cart', fusion_weight=0.3),  # 0/1, on clicked rows only
      'watch_fraction': task('regression', 'watch_fraction', range=(0.0, 1.0), fusion_weight=0.2),
      'satisfaction': task('multiclass', 'satisfaction', classes=('bad', 'ok', 'great')),  # a survey, often empty
  })
  c.train.early_stopping_metric = 'click_auc'
  c.eval.ranking_task = 'click'
  c.model.embed_dim = 16
  c.model.hidden_dims = (64, 32)
  c.model.tower_dims = (16,)
  c.train.batch_size = 256
  c.train.epochs = 8
  c.train.patience = 2
  c.train.log_every_steps = 25
  return c
