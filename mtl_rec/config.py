"""The config schema: defaults for every field, the declared data schema, and `validate()` that names the fix.

Configs are `ml_collections.ConfigDict`s built by `configs/*.py:get_config()` on top of `base_config()`, so every
experiment has every field and command-line overrides (`--config.train.epochs=3`) are type-checked by ml_collections.
The data are declared, not coded: `config.data` says where the interaction log and the side tables are and which
columns play which role, `config.features` declares the model's inputs (`feature()`), `config.tasks` the heads
(`task()`). `validate()` checks values and cross-field rules and raises `errors.ConfigError` (a ValueError) — never
`assert`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from mtl_rec import errors

DATA_SOURCES = ('files', 'movielens_100k', 'movielens_1m', 'tfds', 'synthetic')
FILE_FORMATS = ('', 'parquet', 'csv')
SYNTHETIC_GENERATORS = ('movielens', 'shop')
SPLITS = ('random', 'leave_last_out', 'timestamp', 'column', 'head')
ROW_SPLITS = ('random', 'timestamp', 'column', 'head')  # decided row by row (splits.assign): data.reader='stream'
ENTITIES = ('user', 'item', 'context')
FEATURE_KINDS = ('categorical', 'multi_categorical', 'numeric', 'text', 'vector', 'history')
VOCABULARIES = ('fit', 'hash')
POOLINGS = ('mean', 'sum')
TRANSFORMS = ('standardize', 'bucketize')
COLUMN_TYPES = ('', 'str', 'int', 'float')
BACKBONES = ('shared_bottom', 'mmoe', 'ple')
HEAD_KINDS = ('binary', 'multiclass', 'regression', 'retrieval')
TASK_ROWS = ('all', 'observed')
OBSERVED = 'observed'  # the implicit label: 1 on every log row, 0 on sampled negatives
LOSS_WEIGHTINGS = ('static', 'uncertainty')
OPTIMIZERS = ('adam', 'adamw')
TABLE_OPTIMIZERS = ('dense', 'rowwise_adagrad', 'lazy_adam')  # for the row-sharded id tables (rowwise.py)
SCHEDULES = ('constant', 'cosine')
NEGATIVE_DISTRIBUTIONS = ('uniform', 'popularity')
# What each head kind reports on validation/test, as '<task>_<suffix>'; the ones that are better when lower.
METRIC_SUFFIXES = {'binary': ('auc', 'logloss', 'accuracy'), 'regression': ('rmse', 'mae'),
                   'multiclass': ('class_accuracy', 'class_logloss', 'auc', 'logloss', 'accuracy'),
                   'retrieval': ('auc',)}
LOWER_IS_BETTER = ('_rmse', '_mae', '_logloss')


_declared = itertools.count()  # feature() and task() number what they make, in the order a config declares it


def ordered(section: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  """config.features or config.tasks as (name, entry) in declaration order (`position`; ConfigDicts sort their keys,
  and copies forget any other order). The order of the model's inputs and heads."""
  return sorted(section.items(), key=lambda kv: (kv[1].position, kv[0]))


def feature(entity: str, column: str = '', kind: str = 'categorical', **overrides: Any) -> ml_collections.ConfigDict:
  """One declared model input (an entry of config.features), every field present so overrides type-check."""
  f = ml_collections.ConfigDict()
  f.position = next(_declared)  # the input's place among the features: declaration order
  f.entity = entity  # 'user' (side table or log column of the user), 'item', or 'context' (a log column per request)
  f.column = column  # source column; '' = the feature's name. Ids: the log's user_column / item_column
  # 'categorical', 'multi_categorical' (list column or delimited string), 'numeric', 'text' (a string: its tokens'
  # rows, from a vocabulary fitted like a categorical one or hashed, pooled) or 'vector' (a fixed-length list of
  # numbers, e.g. a pretrained encoder's embedding of the item's text or image) or 'history' (no column: the ids of
  # the other entity this one interacted with in the training split, most recent first, pooled through the table
  # of the id feature `of`, leaving out the example's own; SVD++'s implicit feedback, Koren 2008)
  f.kind = kind
  # read the CSV column as 'str', 'int' or 'float'; '' = inferred (e.g. 'str' keeps zip '01234'; on an id feature,
  # the log's and side table's id column: ids '007' and '7' stay two, ids beyond int64 stay exact)
  f.dtype = ''
  f.sharded = False  # categorical: rows split over the mesh's 'model' axis and L2-regularized per use (id tables)
  # Training only: the share of training examples (seeded) that see this feature as missing (the out-of-vocabulary
  # row, no tokens, zeros). On the item id it teaches the model to score an item from its content, as it must for
  # an item no one has interacted with yet (DropoutNet, Volkovs et al. 2017); 0 = never.
  f.dropout = 0.0
  # categorical and multi_categorical
  f.vocabulary = 'fit'  # 'fit' (values of the training split) or 'hash' (hash_buckets buckets, open vocabularies)
  f.categories = ()  # a fixed vocabulary in this order instead of a fitted one (row order = this order)
  f.min_count = 1  # fit: values seen fewer times in the training split go to the out-of-vocabulary row (text:
  # tokens held by the texts of fewer training rows (users, items, log rows) are dropped)
  f.max_size = 0  # fit: keep the most frequent values only (ties by value); 0 = no cap
  f.hash_buckets = 0  # hash: number of buckets
  f.prefix = 0  # string values are cut to their first `prefix` characters first (e.g. zip code areas); 0 = whole
  f.divide = 0  # integer values are floor-divided by this first (e.g. years into 5-year spans); 0 = not
  f.delimiter = '|'  # multi_categorical in a string column: the separator
  f.max_values = 16  # multi_categorical: values kept per row (the first ones); history: the most recent ones
  f.of = ''  # history: the other entity's categorical id feature whose table it pools (e.g. 'item_id' for a user)
  f.pooling = 'mean'  # multi_categorical, text and history: 'mean' or 'sum' of the values' (tokens', ids') rows
  # history: only the training interactions whose numeric log column meets this condition, '<column> <op> <number>'
  # with op one of >=, <=, >, <, ==, != (e.g. 'rating >= 4': the items a user liked, the explicit signal beside the
  # implicit one); rows where the column is missing do not count. '' = every training interaction
  f.where = ''
  # text (encoding.tokens: NFKC-normalized, case-folded words)
  f.bigrams = False  # text: also word bigrams
  f.char_ngrams = 0  # text: also character n-grams of each word (e.g. 3); 0 = off
  f.max_tokens = 32  # text: distinct tokens kept per row (the first ones)
  # vector
  f.dim = 0  # vector: its length; a row of another length (or with NaN/inf) is an error
  # numeric
  f.transform = 'standardize'  # 'standardize' ((x - mean) / std of the training split) or 'bucketize'
  f.log1p = False  # numeric: log(1 + x) first (counts, durations, prices)
  f.boundaries = ()  # bucketize at these edges; () = at quantiles fitted on the training split
  f.num_buckets = 10  # bucketize at quantiles: this many buckets
  f.update(overrides)
  return f


RETRIEVAL_NEGATIVES = ('in_batch', 'mixed')  # a retrieval task's softmax candidates (task(..., negatives=...))


def task(kind: str, label: str, rows: str = '', **overrides: Any) -> ml_collections.ConfigDict:
  """One declared head (an entry of config.tasks), every field present so overrides type-check."""
  t = ml_collections.ConfigDict()
  t.position = next(_declared)  # the head's place among the tasks: declaration order
  # head kind: 'binary', 'multiclass', 'regression' or 'retrieval' (label 'observed': a user tower and an item tower
  # on the shared embeddings, their cosine / temperature trained with an in-batch sampled softmax over the batch's
  # observed rows, log q(item) subtracted for the sampling bias and the same item's other rows masked; Yi et al. 2019)
  t.kind = kind
  t.label = label  # 'observed' (implicit: 1 on log rows, 0 on sampled negatives) or a column of the log
  t.rows = rows or ('all' if label == OBSERVED else 'observed')  # rows the task is defined on: 'all' or 'observed'
  t.threshold = config_dict.placeholder(float)  # binary from a numeric column: label = column >= threshold
  t.classes = ()  # multiclass: the column's values in class order (ordinal numbers give an expected value)
  t.range = ()  # regression: (lowest, highest) valid label; () = the data's range. Out-of-range rows are an error
  t.weight = 1.0  # static loss weight (the initial scale under uncertainty weighting)
  t.fusion_weight = 0.0  # default weight in the fused ranking score
  t.temperature = 0.05  # retrieval: the softmax temperature of the towers' cosine similarity
  t.dim = 0  # retrieval: the width of the towers' output (the query and item vectors); 0 = model.embed_dim
  # retrieval: the towers' hidden widths, e.g. (128,); () = a linear map of the embeddings; None = model.hidden_dims
  t.tower = config_dict.placeholder(tuple)
  t.logq = True  # retrieval: subtract log q(item), the item's share of the training rows (sampling-bias correction)
  # retrieval: the softmax's candidates. 'in_batch': the items of the gradient group's observed rows; 'mixed' (mixed
  # negative sampling, Yang et al. 2020): those and the items of its sampled-negative rows (sampling.num_negatives
  # per observed row, drawn by sampling.distribution), log q then the mixture's: log(q(item) + k q_neg(item))
  t.negatives = 'in_batch'
  t.update(overrides)
  return t


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default. Experiment configs start here, declare their data, features and tasks."""
  c = ml_collections.ConfigDict()
  c.name = 'mtl_rec'  # model name, used in exports and serving
  c.seed = 0  # the one seed: init, validation split, negatives, shuffling all derive from it

  c.data = ml_collections.ConfigDict()
  c.data.source = 'files'  # 'files' (the declared tables below) or a built-in source (one of DATA_SOURCES)
  c.data.name = ''  # the dataset's name in metrics.json and exports; '' = the source's (or 'files')
  c.data.path = ''  # built-in sources: a local dir or zip in the native format; '' = cache, then download
  c.data.cache_dir = ''  # built-in sources: '' = $MTL_REC_DATA, else ~/.cache/mtl_rec
  c.data.tfds_name = 'movielens/100k-ratings'  # for source='tfds'
  c.data.tfds_data_dir = ''  # for source='tfds'; '' = TFDS default
  c.data.format = ''  # source='files': 'parquet', 'csv', or '' = by each file's extension (.parquet, .csv)
  c.data.csv_delimiter = ','  # source='files': the CSV field separator
  c.data.log = ml_collections.ConfigDict()
  c.data.log.paths = ()  # source='files': the interaction log's files or globs (read in sorted order, concatenated)
  c.data.log.user_column = 'user_id'  # the user id column (null or empty ids are an error)
  c.data.log.item_column = 'item_id'  # the item id column
  c.data.log.timestamp_column = 'timestamp'  # time of the interaction ('' = none; splits by time need it)
  c.data.user_table = ml_collections.ConfigDict()
  c.data.user_table.paths = ()  # optional user side table(s), one row per user (duplicate ids are an error)
  c.data.user_table.id_column = 'user_id'  # its id column (matched against the log's user_column)
  c.data.item_table = ml_collections.ConfigDict()
  c.data.item_table.paths = ()  # optional item side table(s), one row per item
  c.data.item_table.id_column = 'item_id'  # its id column
  c.data.item_table.title_column = ''  # a column shown with recommendations ('' = none)
  c.data.split = 'random'  # 'random', 'leave_last_out' (per user, by time), 'timestamp', 'column' or 'head'
  c.data.test_fraction = 0.2  # split='random': the seeded share of log rows in the test set
  c.data.valid_fraction = 0.05  # seeded share of the non-test rows held out for early stopping (not 'column')
  c.data.split_cut = 0  # split='timestamp': rows at or after this time are the test set
  c.data.split_column = ''  # split='column': a column holding 'train', 'valid' or 'test' per row
  c.data.split_test_rows = 0  # split='head': the first N rows of the log (in file order) are the test set
  # Cold start: a seeded share of the log's items (users) held out entirely: their training rows move to validation,
  # so they appear only in validation and test; metrics.json then reports them apart ('cold_items', 'warm_items').
  c.data.cold_items = 0.0
  c.data.cold_users = 0.0
  # 'memory' (the log loaded whole: fastest for small data) or 'stream' (logs larger than memory: the log is never
  # loaded; training rows are read from its Parquet row groups as a stream, sharded over processes, resumable from the
  # checkpoint; statistics come from a streaming pass, evaluation from a sample; see mtl_rec.data.stream)
  c.data.reader = 'memory'
  c.data.stream = ml_collections.ConfigDict()
  c.data.stream.num_shards = 0  # logical shards (row group g -> shard g % num_shards); 0 = one per process
  c.data.stream.interleave = 4  # row groups read and shuffled together (more: better mixing, more memory)
  c.data.stream.threads = 2  # Grain reader threads
  c.data.stream.prefetch = 2  # reading groups buffered ahead of the train step, per shard
  # evaluation: every held-out row of a seeded sample of users, as many users as hold at most this many held-out rows
  # (all of them on a log that small), with all their other rows (what they have seen)
  c.data.stream.eval_rows = 200_000
  # context features' vocabularies, bucket edges and statistics, and the tasks' label statistics: fitted on a seeded
  # uniform sample of about this many training rows (all of them on a log that small); id counts are exact
  c.data.stream.fit_rows = 1_000_000
  c.data.stream.row_group_size = 1 << 20  # CSV logs are converted once to Parquet row groups of this many rows
  c.data.synthetic = ml_collections.ConfigDict()
  # 'movielens' (MovieLens' columns: ratings, gender/age/occupation/zip, genres/year) or 'shop' (the "Your own data"
  # example's columns: clicks, add_to_cart, watch_fraction, satisfaction, context; see data/synthetic.shop)
  c.data.synthetic.generator = 'movielens'
  c.data.synthetic.item_vector_dim = 0  # generator 'shop': > 0 adds the items' 'embedding' column of this length
  c.data.synthetic.num_users = 2000  # synthetic source: number of users
  c.data.synthetic.num_items = 1000  # synthetic source: number of items
  c.data.synthetic.interactions_per_user = 20  # synthetic source: observed items per user
  c.data.synthetic.latent_dim = 8  # synthetic source: rank of the planted factors

  c.features = ml_collections.ConfigDict()  # {name: feature(...)}: the model's inputs, in declaration order
  c.tasks = ml_collections.ConfigDict()  # {name: task(...)}: the heads, in declaration order

  c.sampling = ml_collections.ConfigDict()
  c.sampling.num_negatives = 4  # sampled unobserved items per log row, for tasks defined on all rows
  c.sampling.distribution = 'uniform'  # 'uniform' or 'popularity' (train count ** power)
  c.sampling.popularity_power = 0.75  # exponent for distribution='popularity'

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 32  # width of every embedding table
  c.model.row_multiple = 8  # sharded tables get rows padded to a multiple of this (divisible by the model axis)
  c.model.backbone = 'shared_bottom'  # 'shared_bottom', 'mmoe' or 'ple' (single-level CGC)
  c.model.hidden_dims = (256, 128)  # shared-bottom MLP widths, or each expert's widths for MMoE/PLE
  c.model.num_experts = 4  # MMoE: experts shared by all tasks
  c.model.num_shared_experts = 2  # PLE: shared experts
  c.model.num_task_experts = 1  # PLE: experts owned by each task
  c.model.tower_dims = (32,)  # per-task tower MLP widths before the head
  c.model.interaction = True  # feed the element-wise product of user (+ context) and item vectors to the backbone
  c.model.gmf = False  # NeuMF's GMF path: per-task linear read-out of the user x item product added to each head
  c.model.id_biases = False  # wide part: per-task scalar biases per sharded (id) feature row added to each head
  # ESMM: P(observed & y) = P(observed) * P(y | observed), trained on all rows, for the first binary task on observed
  # rows; needs a task with label 'observed'.
  c.model.esmm = False
  c.model.loss_weighting = 'static'  # 'static' (task weights) or 'uncertainty' (Kendall et al. 2018, learned)
  c.model.dropout = 0.0  # dropout rate on backbone and tower activations

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'  # 'adam' or 'adamw'
  c.optimizer.learning_rate = 2e-3  # peak learning rate
  c.optimizer.weight_decay = 1e-4  # adamw decoupled weight decay
  c.optimizer.schedule = 'cosine'  # 'constant' or 'cosine' decay to 0 over the run
  c.optimizer.warmup_steps = 100  # linear warmup steps
  c.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  c.optimizer.embedding_l2 = 1e-5  # L2 penalty on the sharded-table rows used in a batch (per example)
  # Decoupled weight decay on every embedding table (the Embeddings module's tables and projections), every row every
  # step, times the learning rate as AdamW's: a row shrinks toward 0 whether or not the batch used it, so the rows of
  # rare ids, which few updates pull back, stay small (the per-use embedding_l2 regularizes each row in proportion to
  # its uses, a frequent id's most). 0 = off; dense tables only (not beside the row-wise optimizers below).
  c.optimizer.embedding_weight_decay = 0.0
  # The row-sharded id tables (an id feature's embedding and its id biases form one group): 'dense' (the optimizer
  # above, every row every step), 'rowwise_adagrad' (one accumulator per row, only touched rows read and written:
  # for tables of millions of rows) or 'lazy_adam' (Adam's moments, updated on touched rows only). See rowwise.py.
  c.optimizer.tables = ml_collections.ConfigDict()
  c.optimizer.tables.name = 'dense'  # every group's optimizer
  c.optimizer.tables.by_feature = ''  # per group, overriding name: 'user_id=rowwise_adagrad,item_id=lazy_adam'
  # peak rate of the row-wise optimizers (the schedule above); 0 = rowwise_adagrad 0.05, lazy_adam the one above
  c.optimizer.tables.learning_rate = 0.0
  c.optimizer.tables.eps = 1e-8  # added to the root of the accumulator / second moment
  c.optimizer.tables.initial_accumulator = 0.0  # rowwise_adagrad's starting accumulator

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 1024  # global batch size (rows: log rows and sampled negatives)
  c.train.epochs = 6  # epochs trained; the cosine schedule decays to 0 over them (or over schedule_epochs, below)
  # Epochs the learning-rate schedule spans; 0 = train.epochs. More than train.epochs stops training partway down the
  # decay (MaxText's learning_rate_schedule_steps): the first train.epochs of a longer run, the same numbers, sooner.
  c.train.schedule_epochs = 0
  c.train.log_every_steps = 50  # history.jsonl / TensorBoard / progress-bar interval
  c.train.checkpoint_every_steps = 500  # also saved at every epoch end
  c.train.keep_checkpoints = 3  # latest checkpoints kept (the best one is kept apart)
  # Validation metric for early stopping and model selection: '<task>_<metric>' (auc, logloss, accuracy, rmse,
  # mae, class_accuracy) or 'recall@K' / 'ndcg@K' (K = eval.k); '' = the first task's auc or rmse; 'combined' = every
  # task's headline metric (auc, rmse, class_accuracy) and Recall@K weighed alike: the mean of their relative
  # improvements over the first epoch's values (loop.EarlyStopping), so no one task's best epoch cuts the others short.
  c.train.early_stopping_metric = ''
  c.train.patience = 4  # epochs without improvement before stopping; 0 disables early stopping
  c.train.progress_bar = True  # tqdm progress bar with loss and examples/s
  # The batch's gradient is summed over this many fixed groups of rows, in one fixed order, so a run gives the same
  # numbers on any mesh whose device count divides it (XLA's own sum orders the additions by the mesh, and a long run
  # amplifies that last-bit noise). Raised to a multiple of the device count where needed; 0 = XLA's sum (faster: a
  # step took 1/1.6 of the time on ML-100K on 2 CPU cores; numbers then differ across meshes).
  c.train.grad_groups = 8
  # > 0: the run evaluates, selects, checkpoints as its model and exports an exponential moving average of the
  # parameters (Polyak averaging): the mean of every step's parameters so far until 1 / (1 - ema_decay) steps, then
  # each step weighed ema_decay times the next. One more copy of the parameters, updated every step: not with
  # row-wise table optimizers, whose point is to leave untouched rows alone. 0 = the last step's parameters.
  c.train.ema_decay = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8192  # rows per eval batch
  c.eval.k = 10  # cutoff for Recall/NDCG/HR
  c.eval.sampled_negatives = 99  # NCF protocol: unobserved items ranked against each held-out positive
  c.eval.click_negatives = 4  # sampled unobserved items per held-out row for tasks on all rows (AUC/LogLoss)
  c.eval.ranking_task = ''  # task whose score ranks the catalog for Recall/NDCG; '' = the first task
  c.eval.gain_column = ''  # log column of graded-NDCG gains (e.g. the rating); '' = 1 per held-out item
  c.eval.ranking_rows_per_batch = 262_144  # (user, item) pairs scored at once when ranking the whole catalog

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)  # device mesh shape; -1 = all remaining devices
  c.mesh.axis_names = ('data', 'model')  # batch is split over 'data', sharded table rows over 'model'

  c.export = ml_collections.ConfigDict()
  c.export.enabled = True  # train.py ends by writing W/export/<version>/ (see mtl_rec/export.py)
  c.export.max_k = 100  # largest k the exported `recommend` returns (capped at the catalog size)
  c.export.chunk_items = 4096  # `recommend` scores the catalog in blocks of this many items (memory: users x block)
  c.export.platforms = ('cpu',)  # jax.export lowering platforms, e.g. ('cpu', 'cuda') for one artifact on both
  # Retrieve-then-rerank: with a retrieval task, `recommend` takes the top retrieve_n items of one matrix product of
  # the user's query vector with the precomputed item vectors (item_vectors.npz) and re-ranks only those with the
  # fused heads; 0 = the fused heads score the whole catalog. The retrieval task is eval.ranking_task when that is
  # one, else the first declared. At least export.max_k.
  c.export.retrieve_n = 1000
  # The served default fusion weights (what /v1/score and /v1/recommend fuse with when a request gives none):
  # 'validation' = the best on validation Recall@K of the config's, learned, stacking and each head alone
  # (mtl_rec.fusion_weights.select_default, recorded in metrics.json 'default_fusion'); 'config' = tasks' fusion_weight
  c.export.default_fusion = 'validation'
  return c


def _err(field: str, value: Any, fix: str) -> errors.ConfigError:
  return errors.ConfigError(f'config.{field}={value!r} is invalid: {fix}')


def ranking_task(c: ml_collections.ConfigDict) -> str:
  """The task whose score ranks the catalog: eval.ranking_task, or the first task."""
  return c.eval.ranking_task or ordered(c.tasks)[0][0]


def retrieval_stage(c: ml_collections.ConfigDict, answered: Any = None) -> tuple[str, int] | None:
  """(retrieval task, candidates N) of served retrieve-then-rerank (export.retrieve_n), or None: the fused heads
  score the whole catalog (retrieve_n = 0, no retrieval task, or one that the tasks `answered` by the scored
  networks do not include, e.g. an ensemble without a retrieval member)."""
  names = [n for n, t in ordered(c.tasks) if t.kind == 'retrieval']
  if not names or not c.export.retrieve_n:
    return None
  ranking = ranking_task(c)
  task = ranking if ranking in names else names[0]
  if answered is not None and task not in answered:
    return None
  return task, int(c.export.retrieve_n)


COMBINED = 'combined'  # train.early_stopping_metric: every task's headline metric and Recall@K together


def headline_metric(name: str, t: ml_collections.ConfigDict) -> str:
  """A task's one validation metric: rmse for regression, class_accuracy for multiclass, auc for binary."""
  return f'{name}_{"rmse" if t.kind == "regression" else "class_accuracy" if t.kind == "multiclass" else "auc"}'


def early_stopping_metric(c: ml_collections.ConfigDict) -> str:
  """train.early_stopping_metric, or the first task's headline metric."""
  if c.train.early_stopping_metric:
    return c.train.early_stopping_metric
  name, t = ordered(c.tasks)[0]
  return f'{name}_{"rmse" if t.kind == "regression" else "auc"}'


def combined_metrics(c: ml_collections.ConfigDict) -> list[str]:
  """What 'combined' model selection weighs equally: each task's headline metric, then Recall@K."""
  return [headline_metric(n, t) for n, t in ordered(c.tasks)] + [f'recall@{c.eval.k}']


def metric_mode(metric: str) -> str:
  """'min' or 'max': which direction of a metric is better."""
  return 'min' if metric.endswith(LOWER_IS_BETTER) else 'max'


def feature_column(name: str, f: ml_collections.ConfigDict) -> str:
  return f.column or name


def table_optimizers(c: ml_collections.ConfigDict) -> tuple[str, dict[str, str]]:
  """(config.optimizer.tables.name, {feature: optimizer} of its by_feature 'user_id=lazy_adam,...'); raises
  errors.ConfigError naming the fix."""
  name = c.optimizer.tables.name
  if name not in TABLE_OPTIMIZERS:
    raise _err('optimizer.tables.name', name, f'use one of {", ".join(TABLE_OPTIMIZERS)}')
  out = {}
  for part in filter(None, (p.strip() for p in str(c.optimizer.tables.by_feature).split(','))):
    feature, sep, value = (x.strip() for x in part.partition('='))
    if not sep or not feature or value not in TABLE_OPTIMIZERS:
      raise _err('optimizer.tables.by_feature', c.optimizer.tables.by_feature,
                 f"{part!r} is not 'feature=optimizer' with an optimizer among {', '.join(TABLE_OPTIMIZERS)}")
    out[feature] = value
  return name, out


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises errors.ConfigError naming the first bad field and how to fix it."""
  def one_of(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
      raise _err(field, value, f'use one of {", ".join(repr(a) for a in allowed)}')

  def positive(field: str, value: Any) -> None:
    if not value > 0:
      raise _err(field, value, 'must be > 0')

  d = c.data
  one_of('data.source', d.source, DATA_SOURCES)
  one_of('data.format', d.format, FILE_FORMATS)
  if d.source == 'files' and not d.log.paths:
    raise _err('data.log.paths', tuple(d.log.paths), "source='files' needs the interaction log: Parquet or CSV "
               'files or globs, e.g. --config.data.log.paths="(\'logs/*.parquet\',)"')
  for field in ('user_column', 'item_column'):
    if not d.log[field]:
      raise _err(f'data.log.{field}', d.log[field], 'name the id column of the log')
  if len(d.csv_delimiter) != 1:
    raise _err('data.csv_delimiter', d.csv_delimiter, 'must be one character')
  one_of('data.split', d.split, SPLITS)
  for field in ('test_fraction', 'valid_fraction'):
    if not 0 < d[field] < 1:
      raise _err(f'data.{field}', d[field], 'must be in (0, 1)')
  for field in ('cold_items', 'cold_users'):
    if not 0 <= d[field] < 1:
      raise _err(f'data.{field}', d[field], 'must be in [0, 1): the share held out entirely (0 = none)')
  if d.split in ('timestamp', 'leave_last_out') and not d.log.timestamp_column:
    raise _err('data.split', d.split, 'needs data.log.timestamp_column')
  if d.split == 'column' and not d.split_column:
    raise _err('data.split_column', d.split_column, "split='column' needs the column naming each row's split")
  if d.split == 'head' and d.split_test_rows <= 0:
    raise _err('data.split_test_rows', d.split_test_rows, "split='head' needs the number of test rows (> 0)")
  one_of('data.reader', d.reader, ('memory', 'stream'))
  if d.reader == 'stream':
    if d.source != 'files':
      raise _err('data.reader', d.reader, "streams logs of source='files' (Parquet or CSV); write built-in data as "
                 "files (python -m mtl_rec.data.write --format=parquet) or use data.reader='memory'")
    if d.split not in ROW_SPLITS:
      raise _err('data.split', d.split, f"is not decided row by row: data.reader='stream' takes "
                 f"{', '.join(map(repr, ROW_SPLITS))} (or use data.reader='memory')")
    if d.cold_items or d.cold_users:
      raise _err('data.cold_items' if d.cold_items else 'data.cold_users', d.cold_items or d.cold_users,
                 "cold-start splits need the whole log in memory: use data.reader='memory'")
    for name, f in c.features.items():
      side_table = d.user_table.paths if f.entity == 'user' else d.item_table.paths
      id_column = d.log.user_column if f.entity == 'user' else d.log.item_column
      # (histories come from the log's id columns, not from a side table)
      if f.kind != 'history' and f.entity in ('user', 'item') and not side_table and (f.column or name) != id_column:
        raise _err(f'features.{name}', f.entity, f"is a {f.entity} feature but no {f.entity}s table is declared: with "
                   f"data.reader='stream' {f.entity} features come from data.{f.entity}_table.paths (one row per "
                   f'{f.entity}), not from the log')
    if d.item_table.title_column and not d.item_table.paths:
      raise _err('data.item_table.title_column', d.item_table.title_column, "with data.reader='stream' titles come "
                 "from the items table (data.item_table.paths), not from the log: declare one or set it to ''")
    for field in ('eval_rows', 'fit_rows', 'row_group_size'):
      positive(f'data.stream.{field}', d.stream[field])
    if d.stream.num_shards < 0:
      raise _err('data.stream.num_shards', d.stream.num_shards, 'must be >= 0 (0 = one shard per process)')
    for field in ('interleave', 'threads', 'prefetch'):
      positive(f'data.stream.{field}', d.stream[field])
  for field in ('num_users', 'num_items', 'interactions_per_user', 'latent_dim'):
    positive(f'data.synthetic.{field}', d.synthetic[field])
  if d.synthetic.generator not in SYNTHETIC_GENERATORS:
    raise _err('data.synthetic.generator', d.synthetic.generator,
               f'use one of {", ".join(repr(g) for g in SYNTHETIC_GENERATORS)}')
  if d.synthetic.item_vector_dim < 0 or d.synthetic.item_vector_dim and d.synthetic.generator != 'shop':
    raise _err('data.synthetic.item_vector_dim', d.synthetic.item_vector_dim, "only generator='shop' writes vectors")

  _validate_features(c)
  _validate_tasks(c)
  labels = {t.label: name for name, t in ordered(c.tasks) if t.label != OBSERVED}
  for name, f in ordered(c.features):  # a row's own label among its inputs: the model reads the answer
    if f.entity == 'context' and f.kind != 'history' and feature_column(name, f) in labels:
      raise _err(f'features.{name}', feature_column(name, f),
                 f"is the label column of task '{labels[feature_column(name, f)]}': a context feature on it gives "
                 'each row its own label as an input; drop the feature (or label the task by another column)')

  if c.sampling.num_negatives < 0:
    raise _err('sampling.num_negatives', c.sampling.num_negatives, 'must be >= 0')
  one_of('sampling.distribution', c.sampling.distribution, NEGATIVE_DISTRIBUTIONS)

  one_of('model.backbone', c.model.backbone, BACKBONES)
  one_of('model.loss_weighting', c.model.loss_weighting, LOSS_WEIGHTINGS)
  for field in ('embed_dim', 'row_multiple'):
    positive(f'model.{field}', c.model[field])
  if not c.model.hidden_dims or min(c.model.hidden_dims) <= 0:
    raise _err('model.hidden_dims', c.model.hidden_dims, 'must be a non-empty tuple of positive widths')
  if any(dim <= 0 for dim in c.model.tower_dims):
    raise _err('model.tower_dims', c.model.tower_dims, 'widths must be positive')
  for field in ('num_experts', 'num_shared_experts', 'num_task_experts'):
    positive(f'model.{field}', c.model[field])
  if not 0 <= c.model.dropout < 1:
    raise _err('model.dropout', c.model.dropout, 'must be in [0, 1)')
  if c.model.esmm and esmm_pair(c) is None:
    raise _err('model.esmm', True, "ESMM needs a task with label 'observed' and a binary task on observed rows")

  one_of('optimizer.name', c.optimizer.name, OPTIMIZERS)
  one_of('optimizer.schedule', c.optimizer.schedule, SCHEDULES)
  positive('optimizer.learning_rate', c.optimizer.learning_rate)
  for field in ('weight_decay', 'warmup_steps', 'grad_clip_norm', 'embedding_l2', 'embedding_weight_decay'):
    if c.optimizer[field] < 0:
      raise _err(f'optimizer.{field}', c.optimizer[field], 'must be >= 0')

  tables_name, by_feature = table_optimizers(c)
  row_wise = tables_name != 'dense' or bool(set(by_feature.values()) - {'dense'})  # some table updated row-wise
  if row_wise:
    if c.optimizer.embedding_weight_decay:
      raise _err('optimizer.embedding_weight_decay', c.optimizer.embedding_weight_decay, 'decay updates every row of '
                 'every table each step, which the row-wise table optimizers exist to avoid: set '
                 'optimizer.embedding_weight_decay=0 or optimizer.tables.name=dense')
    if not c.train.grad_groups:
      raise _err('optimizer.tables.name', tables_name, 'the row-wise optimizers need train.grad_groups > 0 (the '
                 'fixed-order gradient gives them one gradient per looked-up row); set --config.train.grad_groups=8')
  declared = set(c.features)
  unknown = sorted(set(by_feature) - declared)
  if unknown:
    raise _err('optimizer.tables.by_feature', c.optimizer.tables.by_feature,
               f'{unknown[0]!r} is not a declared feature ({", ".join(sorted(declared))})')
  for field in ('learning_rate', 'eps', 'initial_accumulator'):
    if c.optimizer.tables[field] < 0:
      raise _err(f'optimizer.tables.{field}', c.optimizer.tables[field], 'must be >= 0')
  if c.optimizer.tables.eps == 0 and c.optimizer.tables.initial_accumulator == 0:
    raise _err('optimizer.tables.eps', 0, 'must be > 0 when optimizer.tables.initial_accumulator is 0 (a row '
               'whose accumulator is 0 would divide by 0)')

  for field in ('batch_size', 'epochs', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    positive(f'train.{field}', c.train[field])
  if not isinstance(c.train.grad_groups, int) or isinstance(c.train.grad_groups, bool) or c.train.grad_groups < 0:
    raise _err('train.grad_groups', c.train.grad_groups, 'must be an integer >= 0 (0 = let XLA sum the gradient)')
  if c.train.schedule_epochs and c.train.schedule_epochs < c.train.epochs:
    raise _err('train.schedule_epochs', c.train.schedule_epochs, f'use 0 (the {c.train.epochs} train.epochs) or at '
               f'least train.epochs: a schedule that ends before training would train at learning rate 0')
  if not 0 <= c.train.ema_decay < 1:
    raise _err('train.ema_decay', c.train.ema_decay, 'must be in [0, 1), e.g. 0.997 (0 = no averaging)')
  if c.train.ema_decay and row_wise:
    raise _err('train.ema_decay', c.train.ema_decay, 'averaging updates every row of every table each step, which '
               'the row-wise table optimizers exist to avoid: set train.ema_decay=0 or optimizer.tables.name=dense')
  if c.train.patience < 0:
    raise _err('train.patience', c.train.patience, 'must be >= 0 (0 disables early stopping)')
  known = known_metrics(c)
  if early_stopping_metric(c) not in known + [COMBINED]:
    raise _err('train.early_stopping_metric', c.train.early_stopping_metric, f'use one of {", ".join(known)}')

  for field in ('batch_size', 'k', 'sampled_negatives', 'click_negatives', 'ranking_rows_per_batch'):
    positive(f'eval.{field}', c.eval[field])
  if c.eval.ranking_task and c.eval.ranking_task not in c.tasks:
    raise _err('eval.ranking_task', c.eval.ranking_task, f'name one of the tasks: {", ".join(c.tasks)}')

  for field in ('max_k', 'chunk_items'):
    positive(f'export.{field}', c.export[field])
  if c.export.retrieve_n < 0 or 0 < c.export.retrieve_n < c.export.max_k:
    raise _err('export.retrieve_n', c.export.retrieve_n, f'use 0 (no retrieval stage) or at least export.max_k '
               f'({c.export.max_k}): the re-ranked candidates must hold the longest list `recommend` returns')
  if c.export.default_fusion not in ('validation', 'config'):
    raise _err('export.default_fusion', c.export.default_fusion, "use 'validation' or 'config'")
  if not c.export.platforms or any(p not in ('cpu', 'cuda', 'rocm', 'tpu') for p in c.export.platforms):
    raise _err('export.platforms', c.export.platforms, "name one or more of 'cpu', 'cuda', 'rocm', 'tpu'")

  shape, names = tuple(c.mesh.shape), tuple(c.mesh.axis_names)
  if len(shape) != len(names) or len(set(names)) != len(names):
    raise _err('mesh.shape', shape, f'needs one size per axis name {names}, names unique')
  if 'data' not in names or 'model' not in names:
    raise _err('mesh.axis_names', names, "must include 'data' and 'model'")
  if sum(1 for s in shape if s == -1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise _err('mesh.shape', shape, 'sizes are positive, with at most one -1 meaning "the rest"')


_NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')


def _validate_features(c: ml_collections.ConfigDict) -> None:
  if not c.features:
    raise _err('features', {}, "declare the model's inputs, e.g. config.features.user_id = "
               "config_lib.feature('user', 'user_id', sharded=True)")
  for name, f in c.features.items():
    if not isinstance(f, ml_collections.ConfigDict) or 'entity' not in f or 'position' not in f:
      raise _err(f'features.{name}', f, 'declare features with config.feature(...)')
  for name, t in c.tasks.items():
    if not isinstance(t, ml_collections.ConfigDict) or 'label' not in t or 'position' not in t:
      raise _err(f'tasks.{name}', t, 'declare tasks with config.task(...)')
  for name, f in ordered(c.features):
    where = f'features.{name}'
    if not _NAME.match(name):
      raise _err(where, name, 'feature names are identifiers (letters, digits, _)')
    for field in ('entity', 'kind', 'vocabulary', 'pooling', 'transform', 'dtype'):
      allowed = {'entity': ENTITIES, 'kind': FEATURE_KINDS, 'vocabulary': VOCABULARIES, 'pooling': POOLINGS,
                 'transform': TRANSFORMS, 'dtype': COLUMN_TYPES}[field]
      if f[field] not in allowed:
        raise _err(f'{where}.{field}', f[field], f'use one of {", ".join(repr(a) for a in allowed)}')
    if f.kind in ('categorical', 'multi_categorical', 'text') and f.vocabulary == 'hash' and f.hash_buckets <= 0:
      raise _err(f'{where}.hash_buckets', f.hash_buckets, "vocabulary='hash' needs hash_buckets > 0")
    if f.kind == 'text' and (f.max_tokens < 1 or f.char_ngrams < 0 or f.char_ngrams == 1):
      raise _err(f'{where}.max_tokens', f.max_tokens, 'text needs max_tokens >= 1 and char_ngrams 0 or >= 2')
    if f.kind == 'multi_categorical' and not f.delimiter:
      raise _err(f'{where}.delimiter', f.delimiter, "a string column's values are split at it: give one, e.g. '|'")
    if not 0 <= f.dropout < 1:
      raise _err(f'{where}.dropout', f.dropout, 'must be in [0, 1): the share of training examples without it')
    if f.kind == 'vector' and f.entity == 'context':
      raise _err(f'{where}.kind', f.kind, "vectors describe users or items; a request-time vector is not supported "
                 "yet: use entity 'user' or 'item'")
    if f.kind == 'vector' and f.dim <= 0:
      raise _err(f'{where}.dim', f.dim, "kind='vector' needs its length: dim > 0")
    if f.kind != 'numeric' and f.vocabulary == 'hash' and f.categories:
      raise _err(f'{where}.categories', tuple(f.categories), "a fixed vocabulary and vocabulary='hash' exclude each other")
    if len(set(f.categories)) != len(f.categories):
      raise _err(f'{where}.categories', tuple(f.categories), 'values must be distinct')
    for field in ('min_count', 'max_values'):
      if f[field] < 1:
        raise _err(f'{where}.{field}', f[field], 'must be >= 1')
    for field in ('max_size', 'prefix', 'divide'):
      if f[field] < 0:
        raise _err(f'{where}.{field}', f[field], 'must be >= 0 (0 = off)')
    if f.kind == 'history':
      _validate_history(c, name, f)
    elif f.of:
      raise _err(f'{where}.of', f.of, "only kind='history' pools another feature's table; remove it")
    elif f.where:
      raise _err(f'{where}.where', f.where, "only kind='history' keeps some interactions by a condition; remove it")
    if f.sharded and f.kind != 'categorical':
      raise _err(f'{where}.sharded', True, 'only categorical features have sharded tables')
    if f.kind == 'numeric':
      if list(f.boundaries) != sorted(set(f.boundaries)):
        raise _err(f'{where}.boundaries', tuple(f.boundaries), 'must be strictly increasing')
      if f.transform == 'bucketize' and not f.boundaries and f.num_buckets < 2:
        raise _err(f'{where}.num_buckets', f.num_buckets, 'quantile buckets need num_buckets >= 2')
  for entity in ('user', 'item'):
    if not any(f.entity == entity for f in c.features.values()):
      raise _err('features', tuple(c.features), f"declare at least one '{entity}' feature (e.g. its id)")


def _validate_history(c: ml_collections.ConfigDict, name: str, f: ml_collections.ConfigDict) -> None:
  where = f'features.{name}'
  other = {'user': 'item', 'item': 'user'}.get(f.entity)
  if other is None:
    raise _err(f'{where}.entity', f.entity, "a history belongs to a 'user' (the items they interacted with) or an "
               "'item' (its audience)")
  target = c.features.get(f.of) if f.of else None
  ids = {'user': c.data.log.user_column, 'item': c.data.log.item_column}[other]
  if (target is None or target.entity != other or target.kind != 'categorical' or target.vocabulary != 'fit'
      or target.categories or feature_column(f.of, target) != ids):
    fits = [n for n, g in ordered(c.features) if g.entity == other and g.kind == 'categorical'
            and g.vocabulary == 'fit' and not g.categories and feature_column(n, g) == ids]
    example = f'this config has one: of={fits[0]!r}' if fits else f"declare one, e.g. of='{other}_id'"
    raise _err(f'{where}.of', f.of, f"name the {other}s' id feature (kind 'categorical' on the log's {other} id "
               f"column {ids!r}, vocabulary 'fit'); {example}")
  if f.column:
    raise _err(f'{where}.column', f.column, 'a history is built from the training log, not read from a column; '
               "leave column ''")
  if f.where:
    history_condition(f.where, f'{where}.where')


def history_condition(text: str, field: str) -> tuple[str, str, float]:
  """A history's `where` condition '<column> <op> <number>' as (column, op, number); `field` names it in errors."""
  m = re.fullmatch(r'\s*([^\s<>=!]+)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*', text)
  if not m:
    raise _err(field, text, "write '<column> <op> <number>' with op one of >=, <=, >, <, ==, != (e.g. "
               "'rating >= 4'), or '' for every interaction")
  return m.group(1), m.group(2), float(m.group(3))


def _validate_tasks(c: ml_collections.ConfigDict) -> None:
  if not c.tasks:
    raise _err('tasks', {}, "declare at least one task, e.g. config.tasks.click = config_lib.task('binary', "
               "'observed')")
  for name, t in ordered(c.tasks):
    where = f'tasks.{name}'
    if not _NAME.match(name) or name == 'score':
      raise _err(where, name, "task names are identifiers (letters, digits, _), not 'score'")
    if t.kind not in HEAD_KINDS:
      raise _err(f'{where}.kind', t.kind, f'use one of {", ".join(HEAD_KINDS)}')
    if t.rows not in TASK_ROWS:
      raise _err(f'{where}.rows', t.rows, "use 'all' (log rows and sampled negatives) or 'observed' (log rows)")
    if not t.label:
      raise _err(f'{where}.label', t.label, "name a column of the log, or 'observed' for implicit feedback")
    if t.label == OBSERVED and (t.kind not in ('binary', 'retrieval') or t.rows != 'all'):
      raise _err(f'{where}.label', t.label, "the implicit label 'observed' needs kind='binary' (or 'retrieval') "
                 "and rows='all'")
    if t.kind == 'retrieval':
      if t.label != OBSERVED:
        raise _err(f'{where}.label', t.label, "a retrieval task learns from observed pairs: label='observed'")
      if not t.temperature > 0:
        raise _err(f'{where}.temperature', t.temperature, 'must be > 0')
      if t.negatives not in RETRIEVAL_NEGATIVES:
        raise _err(f'{where}.negatives', t.negatives, f'use one of {", ".join(RETRIEVAL_NEGATIVES)}')
      if t.dim < 0:
        raise _err(f'{where}.dim', t.dim, 'must be >= 0 (0: the embedding width, model.embed_dim)')
      if t.tower is not None and not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in t.tower):
        raise _err(f'{where}.tower', t.tower, 'give positive integer widths, e.g. (128,); () for a linear map, '
                   'None for model.hidden_dims')
      first = next(u for _, u in ordered(c.tasks) if u.kind == 'retrieval')
      if t.negatives != first.negatives:
        raise _err(f'{where}.negatives', t.negatives, f"every retrieval task takes the same candidates (batches "
                   f"carry one log q per row): use {first.negatives!r} like the first one")
    if t.rows == 'all' and t.kind not in ('binary', 'retrieval'):
      raise _err(f'{where}.rows', t.rows, "only binary tasks are defined on sampled negatives (label 0); use "
                 "rows='observed'")
    if t.threshold is not None and (t.kind != 'binary' and not (t.kind == 'multiclass' and t.classes)):
      raise _err(f'{where}.threshold', t.threshold, 'a threshold defines binary labels (or, for a multiclass task '
                 'with numeric values, which classes count as positive)')
    if t.kind == 'multiclass' and (len(t.classes) < 2 or len(set(t.classes)) != len(t.classes)):
      raise _err(f'{where}.classes', tuple(t.classes), "multiclass needs the label column's distinct values in class "
                 'order, at least two')
    if t.range and (len(t.range) != 2 or not t.range[0] < t.range[1]):
      raise _err(f'{where}.range', tuple(t.range), 'give (lowest, highest) with lowest < highest, or ()')
    if not t.weight >= 0 or not math.isfinite(t.weight):
      raise _err(f'{where}.weight', t.weight, 'must be a finite number >= 0')
    if not math.isfinite(t.fusion_weight):
      raise _err(f'{where}.fusion_weight', t.fusion_weight, 'must be finite')
    if t.label == OBSERVED and c.sampling.num_negatives == 0:
      raise _err('sampling.num_negatives', 0, f"task '{name}' (label 'observed') needs sampled negatives; set it >= 1")


def esmm_pair(c: ml_collections.ConfigDict) -> tuple[str, str] | None:
  """ESMM's (implicit task, conditional task): the task with label 'observed' and the first binary task on
  observed rows; None where there is no such pair."""
  implicit = next((n for n, t in ordered(c.tasks) if t.label == OBSERVED and t.kind == 'binary'), None)
  conditional = next((n for n, t in ordered(c.tasks) if t.kind == 'binary' and t.rows == 'observed'), None)
  return (implicit, conditional) if implicit and conditional else None


def known_metrics(c: ml_collections.ConfigDict) -> list[str]:
  """Every validation metric the declared tasks report (what early stopping may select on)."""
  out = []
  for name, t in ordered(c.tasks):
    suffixes = METRIC_SUFFIXES[t.kind]
    if t.kind == 'binary' and t.label == OBSERVED:
      suffixes = ('auc', 'logloss')
    if t.kind == 'multiclass' and t.threshold is None:
      suffixes = ('class_accuracy', 'class_logloss')
    out += [f'{name}_{s}' for s in suffixes]
  return out + [f'recall@{c.eval.k}', f'ndcg@{c.eval.k}']


def to_json(c: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (tuples become lists)."""
  return json.dumps(c.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a config saved by `to_json` on top of today's defaults (fields added since then keep their default;
  declared features and tasks are taken as saved, on top of feature()/task() defaults)."""
  saved = json.loads(text)
  c = base_config()

  def merge(dst: ml_collections.ConfigDict, src: dict[str, Any]) -> None:
    for key, value in src.items():
      if isinstance(value, dict) and key in dst and isinstance(dst[key], ml_collections.ConfigDict):
        merge(dst[key], value)
      elif key in dst and isinstance(dst[key], tuple) and isinstance(value, list):
        dst[key] = tuple(value)
      else:
        dst[key] = tuple(value) if isinstance(value, list) else value
  with c.unlocked():
    merge(c, {k: v for k, v in saved.items() if k not in ('features', 'tasks')})
    for name, f in saved.get('features', {}).items():
      c.features[name] = feature(f['entity'])
      merge(c.features[name], f)
    for name, t in saved.get('tasks', {}).items():
      c.tasks[name] = task(t['kind'], t['label'], t.get('rows', ''))
      merge(c.tasks[name], t)
  return c
