"""The unified model on MovieLens-1M with a per-user leave-last-out split (time-aware, the common 1M protocol)."""

from configs import movielens_schema
from mtl_rec import config as config_lib


def get_config():
  c = movielens_schema.apply(config_lib.base_config())
  c.name = 'mtl_rec_ml1m'  # model name in exports and serving
  c.data.source = 'movielens_1m'  # ratings.dat/users.dat/movies.dat from data.path, the cache or GroupLens
  c.data.split = 'leave_last_out'  # each user's latest rating is the test set
  c.train.batch_size = 4096  # 10x the data of 100K: bigger batches keep an epoch short
  c.train.epochs = 10  # maximum epochs; early stopping usually ends sooner
  c.train.checkpoint_every_steps = 1000  # fewer, larger steps than 100K
  return c
