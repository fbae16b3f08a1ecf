"""Synthetic data with planted latent factors: for tests, sharding checks and scale runs.

Scale it from the command line, e.g. --config.data.synthetic.num_users=2000000.
"""

from mtl_rec import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.name = 'mtl_rec_synthetic'  # model name in exports and serving
  c.data.source = 'synthetic'  # generated from config.seed, no files
  c.data.split = 'random'  # u1 exists only for ML-100K
  c.data.synthetic.num_users = 2000  # users
  c.data.synthetic.num_items = 1000  # items
  c.data.synthetic.interactions_per_user = 40  # observed items per user: enough to recover the planted factors
  c.data.synthetic.latent_dim = 4  # rank of the planted factors (at rank 8 and 20 items/user popularity dominates)
  c.features.embed_dim = 16  # the planted rank is 4: 16 is ample
  c.model.hidden_dims = (64, 32)  # small backbone: this config must train in well under 3 minutes
  c.model.tower_dims = (16,)  # small towers
  c.train.batch_size = 512  # rows per step
  c.train.epochs = 3  # enough to learn the planted signal
  c.train.patience = 0  # no early stopping: a fixed number of steps makes runs comparable across meshes
  c.train.checkpoint_every_steps = 200  # checkpoints inside an epoch, for resume tests
  return c
