"""Synthetic data with planted latent factors: for tests, sharding checks and scale runs.

Scale it from the command line, e.g. --config.data.synthetic.num_users=2000000. `--config=configs/synthetic.py:tiny`
is a variant that trains, evaluates and exports in seconds (big_vision's `runlocal`): for smoke tests and tests.
`:retrieval` adds the default MovieLens config's retrieval task (two towers, in-batch softmax) and ranks the catalog
with it, so exports retrieve then re-rank (e.g. the scale benchmark's 1M-item export); variants combine with commas,
`:tiny,retrieval`.
"""

from configs import movielens_schema
from mtl_rec import config as config_lib
from mtl_rec import errors

VARIANTS = ('tiny', 'retrieval')


def get_config(variant: str | None = None):
  c = movielens_schema.apply(config_lib.base_config())  # the generator writes MovieLens' columns
  with c.unlocked():
    del c.features['title']  # generated titles ('Item 0042') carry no content, only the id again
  c.name = 'mtl_rec_synthetic'  # model name in exports and serving
  c.data.source = 'synthetic'  # generated from config.seed, no files
  c.data.split = 'random'  # a seeded 20% of the ratings is the test set
  c.data.synthetic.num_users = 2000  # users
  c.data.synthetic.num_items = 1000  # items
  c.data.synthetic.interactions_per_user = 40  # observed items per user: enough to recover the planted factors
  c.data.synthetic.latent_dim = 4  # rank of the planted factors (at rank 8 and 20 items/user popularity dominates)
  c.model.embed_dim = 16  # the planted rank is 4: 16 is ample
  c.model.hidden_dims = (64, 32)  # small backbone: this config must train in well under 3 minutes
  c.model.tower_dims = (16,)  # small towers
  c.train.batch_size = 512  # rows per step
  c.train.epochs = 3  # enough to learn the planted signal
  c.train.patience = 0  # no early stopping: a fixed number of steps makes runs comparable across meshes
  c.train.checkpoint_every_steps = 200  # checkpoints inside an epoch, for resume tests
  variants = [v for v in (variant or '').split(',') if v]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise errors.ConfigError(f'configs/synthetic.py:{variant}: {unknown[0]!r} is not a variant; use some of '
                             f'{", ".join(VARIANTS)} (comma-separated) or none')
  if 'retrieval' in variants:
    with c.unlocked():
      c.tasks.retrieval = config_lib.task('retrieval', config_lib.OBSERVED, temperature=0.1)
    c.eval.ranking_task = 'retrieval'
  if 'tiny' in variants:
    c.data.synthetic.num_users = 300  # a few hundred users and items: seconds per epoch on one CPU core
    c.data.synthetic.num_items = 150  # small catalog: full-catalog ranking metrics are cheap
    c.data.synthetic.interactions_per_user = 15  # ~4.5k ratings
    c.train.batch_size = 128  # a few dozen steps per epoch
    c.train.epochs = 1  # one pass: enough to exercise train, eval, checkpoint and export
    c.train.progress_bar = False  # quiet logs in tests
    c.train.log_every_steps = 10  # several history.jsonl rows per epoch
    c.eval.batch_size = 1024  # the whole eval set in a few batches
    c.mesh.shape = (1, 1)  # one device, whatever the simulated device count
  return c
