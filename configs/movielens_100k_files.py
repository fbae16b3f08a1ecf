"""MovieLens-100K as your own data: the default experiment, read from Parquet or CSV tables instead of GroupLens files.

  python -m mtl_rec.data.write --out=/tmp/ml100k --format=parquet      # writes log, users and items tables
  python train.py --config=configs/movielens_100k_files.py:/tmp/ml100k --workdir=W

Everything but the source is configs/movielens_100k.py, so this run's metrics equal the built-in preset's: the
generic reader, features, model, export and serving are the ones every dataset goes through.
"""

import glob
import os

from configs import movielens_100k

from mtl_rec import errors


def get_config(directory: str | None = None):
  if not directory:
    raise errors.ConfigError('name the directory of the tables: --config=configs/movielens_100k_files.py:DIR '
                             '(write it with python -m mtl_rec.data.write --out=DIR)')
  c = movielens_100k.get_config()
  c.data.source = 'files'  # Parquet or CSV tables, columns as configs/movielens_schema.py declares them
  c.data.name = 'movielens-100k'
  fmt = 'parquet' if glob.glob(os.path.join(directory, 'log.parquet')) else 'csv'
  c.data.log.paths = (os.path.join(directory, f'log.{fmt}'),)  # the interaction log (u.data's rows, in order)
  c.data.user_table.paths = (os.path.join(directory, f'users.{fmt}'),)  # u.user
  c.data.item_table.paths = (os.path.join(directory, f'items.{fmt}'),)  # u.item
  return c
