"""The config schema: defaults for every field, and `validate()` that names the problem and the fix.

Configs are `ml_collections.ConfigDict`s built by `configs/*.py:get_config()` on top of `base_config()`, so every
experiment has every field and command-line overrides (`--config.train.epochs=3`) are type-checked by ml_collections.
`validate()` checks values and cross-field rules and raises `ValueError` — never `assert`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

DATA_SOURCES = ('movielens_100k', 'movielens_1m', 'tfds', 'synthetic')
SPLITS = ('u1', 'random', 'leave_last_out')
BACKBONES = ('shared_bottom', 'mmoe', 'ple')
HEAD_KINDS = ('binary', 'multiclass', 'regression')
LABELS = ('click', 'like', 'rating', 'rating_class')
LOSS_WEIGHTINGS = ('static', 'uncertainty')
OPTIMIZERS = ('adam', 'adamw')
SCHEDULES = ('constant', 'cosine')
NEGATIVE_DISTRIBUTIONS = ('uniform', 'popularity')
USER_FEATURES = ('user_id', 'gender', 'age', 'occupation', 'zip')
ITEM_FEATURES = ('item_id', 'genres', 'year')
# Metrics a run can early-stop on, with the direction that is better.
METRIC_MODES = {
    'rating_rmse': 'min', 'rating_mae': 'min', 'like_auc': 'max', 'like_logloss': 'min', 'like_accuracy': 'max',
    'click_auc': 'max', 'click_logloss': 'min', 'recall@10': 'max', 'ndcg@10': 'max',
}


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default. Experiment configs start here and change what they need."""
  c = ml_collections.ConfigDict()
  c.name = 'mtl_rec'  # model name, used in exports and serving
  c.seed = 0  # the one seed: init, validation split, negatives, shuffling all derive from it

  c.data = ml_collections.ConfigDict()
  c.data.source = 'movielens_100k'  # one of DATA_SOURCES
  c.data.path = ''  # local dir or zip in the source's native format; '' = cache, then download/fallbacks
  c.data.cache_dir = ''  # '' = $MTL_REC_DATA, else ~/.cache/mtl_rec
  c.data.tfds_name = 'movielens/100k-ratings'  # for source='tfds'
  c.data.tfds_data_dir = ''  # for source='tfds'; '' = TFDS default
  c.data.split = 'u1'  # 'u1' (official ML-100K u1.base/u1.test), 'random' or 'leave_last_out' (per user, by time)
  c.data.test_fraction = 0.2  # for split='random'
  c.data.valid_fraction = 0.05  # seeded share of the non-test ratings held out for early stopping
  c.data.like_threshold = 4.0  # like = rating >= this
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_users = 2000  # synthetic source: number of users
  c.data.synthetic.num_items = 1000  # synthetic source: number of items
  c.data.synthetic.interactions_per_user = 20  # synthetic source: observed items per user
  c.data.synthetic.latent_dim = 8  # synthetic source: rank of the planted factors

  c.features = ml_collections.ConfigDict()
  c.features.user = USER_FEATURES  # user features fed to the model (subset of USER_FEATURES)
  c.features.item = ITEM_FEATURES  # item features fed to the model (subset of ITEM_FEATURES)
  c.features.embed_dim = 32  # width of every embedding table
  c.features.age_boundaries = (18, 25, 35, 45, 50, 56)  # age bucket edges (ML-1M's buckets)
  c.features.year_bucket_years = 5  # release years are bucketed in spans of this many years
  c.features.zip_prefix_len = 2  # zip codes are reduced to this many leading characters
  c.features.row_multiple = 8  # id tables get rows padded to a multiple of this (must be divisible by the model axis)

  c.sampling = ml_collections.ConfigDict()
  c.sampling.num_negatives = 4  # sampled unobserved items per observed pair, for the click task
  c.sampling.distribution = 'uniform'  # 'uniform' or 'popularity' (train count ** power)
  c.sampling.popularity_power = 0.75  # exponent for distribution='popularity'

  c.model = ml_collections.ConfigDict()
  c.model.backbone = 'shared_bottom'  # 'shared_bottom', 'mmoe' or 'ple' (single-level CGC)
  c.model.hidden_dims = (256, 128)  # shared-bottom MLP widths, or each expert's widths for MMoE/PLE
  c.model.num_experts = 4  # MMoE: experts shared by all tasks
  c.model.num_shared_experts = 2  # PLE: shared experts
  c.model.num_task_experts = 1  # PLE: experts owned by each task
  c.model.tower_dims = (32,)  # per-task tower MLP widths before the head
  c.model.interaction = True  # feed the element-wise product of user and item vectors to the backbone
  c.model.gmf = False  # NeuMF's GMF path: per-task linear read-out of the user x item product added to each head
  c.model.id_biases = False  # wide part: per-task scalar biases per user id and item id added to each head
  c.model.esmm = False  # P(click & like) = P(click) * P(like | click), trained on all rows (like must be binary)
  c.model.loss_weighting = 'static'  # 'static' (task weights) or 'uncertainty' (Kendall et al. 2018, learned)
  c.model.dropout = 0.0  # dropout rate on backbone and tower activations

  c.tasks = ml_collections.ConfigDict()
  for name, kind, label in (('click', 'binary', 'click'), ('like', 'binary', 'like'),
                            ('rating', 'regression', 'rating')):
    t = ml_collections.ConfigDict()
    t.kind = kind  # head kind: 'binary', 'multiclass' or 'regression'
    t.label = label  # 'click' (all rows), 'like', 'rating' or 'rating_class' (observed rows only)
    t.weight = 1.0  # static loss weight (the initial scale under uncertainty weighting)
    t.fusion_weight = {'click': 0.4, 'like': 0.3, 'rating': 0.3}[name]  # default weight in the fused ranking score
    c.tasks[name] = t

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'  # 'adam' or 'adamw'
  c.optimizer.learning_rate = 2e-3  # peak learning rate
  c.optimizer.weight_decay = 1e-4  # adamw decoupled weight decay
  c.optimizer.schedule = 'cosine'  # 'constant' or 'cosine' decay to 0 over the run
  c.optimizer.warmup_steps = 100  # linear warmup steps
  c.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  c.optimizer.embedding_l2 = 1e-5  # L2 penalty on the embedding rows used in a batch (per example)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 1024  # global batch size (rows: observed pairs and sampled negatives)
  c.train.epochs = 6  # epochs; the cosine schedule decays to 0 over them (early stopping may end sooner)
  c.train.log_every_steps = 50  # history.jsonl / TensorBoard / progress-bar interval
  c.train.checkpoint_every_steps = 500  # also saved at every epoch end
  c.train.keep_checkpoints = 3  # latest checkpoints kept (the best one is kept apart)
  c.train.early_stopping_metric = 'rating_rmse'  # validation metric for early stopping and model selection
  c.train.patience = 4  # epochs without improvement before stopping; 0 disables early stopping
  c.train.progress_bar = True  # tqdm progress bar with loss and examples/s
  # The batch's gradient is summed over this many fixed groups of rows, in one fixed order, so a run gives the same
  # numbers on any mesh whose data axis divides it (XLA's own sum orders the additions by the mesh, and a long run
  # amplifies that last-bit noise). Raised to a multiple of the data axis where needed; 0 = XLA's sum (faster: a
  # step took 1/1.6 of the time on ML-100K on 2 CPU cores; numbers then differ across meshes).
  c.train.grad_groups = 8

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8192  # rows per eval batch
  c.eval.k = 10  # cutoff for Recall/NDCG/HR
  c.eval.sampled_negatives = 99  # NCF protocol: unobserved items ranked against each held-out positive
  c.eval.click_negatives = 4  # sampled unobserved items per held-out positive for click AUC/LogLoss
  c.eval.ranking_task = 'click'  # task whose score ranks the catalog for Recall/NDCG
  c.eval.ranking_rows_per_batch = 262_144  # (user, item) pairs scored at once when ranking the whole catalog

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)  # device mesh shape; -1 = all remaining devices
  c.mesh.axis_names = ('data', 'model')  # batch is split over 'data', embedding rows over 'model'

  c.export = ml_collections.ConfigDict()
  c.export.enabled = True  # train_and_evaluate ends by writing W/export/<version>/ (see mtl_rec/export.py)
  c.export.max_k = 100  # largest k the exported `recommend` returns (capped at the catalog size)
  c.export.chunk_items = 4096  # `recommend` scores the catalog in blocks of this many items (memory: users x block)
  c.export.platforms = ('cpu',)  # jax.export lowering platforms, e.g. ('cpu', 'cuda') for one artifact on both
  return c


def _err(field: str, value: Any, fix: str) -> ValueError:
  return ValueError(f'config.{field}={value!r} is invalid: {fix}')


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field and how to fix it."""
  def one_of(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
      raise _err(field, value, f'use one of {", ".join(allowed)}')

  def positive(field: str, value: Any) -> None:
    if not value > 0:
      raise _err(field, value, 'must be > 0')

  one_of('data.source', c.data.source, DATA_SOURCES)
  one_of('data.split', c.data.split, SPLITS)
  if c.data.split == 'u1' and c.data.source != 'movielens_100k':
    # TFDS shuffles u.data's line order, which u1 is defined by.
    raise _err('data.split', c.data.split, "the official u1 split needs MovieLens-100K in u.data order "
               "(data.source='movielens_100k'); use 'random' or 'leave_last_out'")
  for field in ('test_fraction', 'valid_fraction'):
    v = c.data[field]
    if not 0 < v < 1:
      raise _err(f'data.{field}', v, 'must be in (0, 1)')
  if not 1 <= c.data.like_threshold <= 5:
    raise _err('data.like_threshold', c.data.like_threshold, 'must be a rating between 1 and 5')
  for field in ('num_users', 'num_items', 'interactions_per_user', 'latent_dim'):
    positive(f'data.synthetic.{field}', c.data.synthetic[field])

  for field, allowed in (('user', USER_FEATURES), ('item', ITEM_FEATURES)):
    feats = tuple(c.features[field])
    unknown = [f for f in feats if f not in allowed]
    if unknown or not feats:
      raise _err(f'features.{field}', feats, f'choose a non-empty subset of {", ".join(allowed)}')
  for field in ('embed_dim', 'year_bucket_years', 'zip_prefix_len', 'row_multiple'):
    positive(f'features.{field}', c.features[field])
  if list(c.features.age_boundaries) != sorted(set(c.features.age_boundaries)):
    raise _err('features.age_boundaries', c.features.age_boundaries, 'must be strictly increasing')

  if c.sampling.num_negatives < 0:
    raise _err('sampling.num_negatives', c.sampling.num_negatives, 'must be >= 0')
  one_of('sampling.distribution', c.sampling.distribution, NEGATIVE_DISTRIBUTIONS)

  one_of('model.backbone', c.model.backbone, BACKBONES)
  one_of('model.loss_weighting', c.model.loss_weighting, LOSS_WEIGHTINGS)
  if not c.model.hidden_dims or min(c.model.hidden_dims) <= 0:
    raise _err('model.hidden_dims', c.model.hidden_dims, 'must be a non-empty tuple of positive widths')
  if any(d <= 0 for d in c.model.tower_dims):
    raise _err('model.tower_dims', c.model.tower_dims, 'widths must be positive')
  for field in ('num_experts', 'num_shared_experts', 'num_task_experts'):
    positive(f'model.{field}', c.model[field])
  if not 0 <= c.model.dropout < 1:
    raise _err('model.dropout', c.model.dropout, 'must be in [0, 1)')

  if not c.tasks:
    raise _err('tasks', dict(c.tasks), 'define at least one task')
  for name, t in c.tasks.items():
    one_of(f'tasks.{name}.kind', t.kind, HEAD_KINDS)
    one_of(f'tasks.{name}.label', t.label, LABELS)
    wanted = {'click': 'binary', 'like': 'binary', 'rating': 'regression', 'rating_class': 'multiclass'}[t.label]
    if t.kind != wanted:
      raise _err(f'tasks.{name}.kind', t.kind, f"label '{t.label}' needs a '{wanted}' head")
    if not t.weight >= 0 or not math.isfinite(t.weight):
      raise _err(f'tasks.{name}.weight', t.weight, 'must be a finite number >= 0')
    if not math.isfinite(t.fusion_weight):
      raise _err(f'tasks.{name}.fusion_weight', t.fusion_weight, 'must be finite')
  labels = [t.label for t in c.tasks.values()]
  if c.model.esmm and not ('click' in labels and 'like' in labels):
    raise _err('model.esmm', True, "ESMM needs a 'click' task and a binary 'like' task")
  if c.sampling.num_negatives == 0 and 'click' in labels:
    raise _err('sampling.num_negatives', 0, 'the click task needs sampled negatives; set it >= 1 or drop the task')

  one_of('optimizer.name', c.optimizer.name, OPTIMIZERS)
  one_of('optimizer.schedule', c.optimizer.schedule, SCHEDULES)
  positive('optimizer.learning_rate', c.optimizer.learning_rate)
  for field in ('weight_decay', 'warmup_steps', 'grad_clip_norm', 'embedding_l2'):
    if c.optimizer[field] < 0:
      raise _err(f'optimizer.{field}', c.optimizer[field], 'must be >= 0')

  for field in ('batch_size', 'epochs', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    positive(f'train.{field}', c.train[field])
  if not isinstance(c.train.grad_groups, int) or isinstance(c.train.grad_groups, bool) or c.train.grad_groups < 0:
    raise _err('train.grad_groups', c.train.grad_groups, 'must be an integer >= 0 (0 = let XLA sum the gradient)')
  if c.train.patience < 0:
    raise _err('train.patience', c.train.patience, 'must be >= 0 (0 disables early stopping)')
  if c.train.early_stopping_metric not in METRIC_MODES:
    raise _err('train.early_stopping_metric', c.train.early_stopping_metric,
               f'use one of {", ".join(METRIC_MODES)}')
  task_of_metric = c.train.early_stopping_metric.split('_')[0]
  if task_of_metric in ('rating', 'like', 'click') and task_of_metric not in c.tasks:
    raise _err('train.early_stopping_metric', c.train.early_stopping_metric, f"there is no '{task_of_metric}' task")

  for field in ('batch_size', 'k', 'sampled_negatives', 'click_negatives', 'ranking_rows_per_batch'):
    positive(f'eval.{field}', c.eval[field])
  if c.eval.ranking_task not in c.tasks:
    raise _err('eval.ranking_task', c.eval.ranking_task, f'name one of the tasks: {", ".join(c.tasks)}')

  for field in ('max_k', 'chunk_items'):
    positive(f'export.{field}', c.export[field])
  if not c.export.platforms or any(p not in ('cpu', 'cuda', 'rocm', 'tpu') for p in c.export.platforms):
    raise _err('export.platforms', c.export.platforms, "name one or more of 'cpu', 'cuda', 'rocm', 'tpu'")

  shape, names = tuple(c.mesh.shape), tuple(c.mesh.axis_names)
  if len(shape) != len(names) or len(set(names)) != len(names):
    raise _err('mesh.shape', shape, f'needs one size per axis name {names}, names unique')
  if 'data' not in names or 'model' not in names:
    raise _err('mesh.axis_names', names, "must include 'data' and 'model'")
  if sum(1 for s in shape if s == -1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise _err('mesh.shape', shape, 'sizes are positive, with at most one -1 meaning "the rest"')


def metric_mode(metric: str) -> str:
  """'min' or 'max': which direction of `metric` is better."""
  return METRIC_MODES[metric]


def to_json(c: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (tuples become lists)."""
  return json.dumps(c.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a config saved by `to_json` on top of today's defaults (fields added since then keep their default)."""
  saved = json.loads(text)
  c = base_config()

  def merge(dst: ml_collections.ConfigDict, src: dict[str, Any]) -> None:
    for key, value in src.items():
      if isinstance(value, dict) and key in dst and isinstance(dst[key], ml_collections.ConfigDict):
        if key == 'tasks':  # task sets differ between configs: take the saved set as it is
          dst[key] = ml_collections.ConfigDict(value)
        else:
          merge(dst[key], value)
      else:
        dst[key] = tuple(value) if isinstance(value, list) else value
  with c.unlocked():
    merge(c, saved)
  return c
