"""The experiment: everything a run derives from config.data/features/tasks/sampling, built in one place, once.

`build(config)` loads the data (checking it: any bad row or file is a DataError before anything is trained or
written), splits it, builds the task labels, fits the features on the training split, and builds the negative
samplers, the training stream and the evaluation sets. Training, evaluation, export, the ensemble and the
benchmarks all take an `Experiment` instead of re-deriving any of it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import jax
import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import encoding
from mtl_rec import features as features_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.data import readers
from mtl_rec.data import splits as splits_lib
from mtl_rec.data.loader import load_data
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.data.types import Dataset, DataError
from mtl_rec.input_pipeline import EvalSet, Examples, Labels, StreamedTrain, TrainStream

if TYPE_CHECKING:  # imported when used: Grain is needed by data.reader='stream' only
  from mtl_rec.data import stream as stream_lib


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: ml_collections.ConfigDict
  data: Dataset
  split: splits_lib.Split
  encoder: features_lib.FeatureEncoder
  user_index: np.ndarray  # [N] position of each log row's user in data.users
  item_index: np.ndarray  # [N] position of each log row's item in data.items
  train_sampler: NegativeSampler  # excludes the user's training positives
  eval_sampler: NegativeSampler  # excludes everything the user ever interacted with
  labels: Labels  # every task's label column and the rule for sampled negatives
  specs: tuple[tasks_lib.TaskSpec, ...]
  stream: TrainStream | StreamedTrain  # StreamedTrain: data.reader='stream'
  valid: EvalSet
  test: EvalSet

  @property
  def num_users(self) -> int:
    return int(len(self.data.users[self.data.user_column]))

  @property
  def num_items(self) -> int:
    return int(len(self.data.items[self.data.item_column]))

  def positives(self, rows: np.ndarray) -> Examples:
    """The log rows `rows` as examples."""
    return _positives(self.user_index, self.item_index, rows)

  def history_rows(self, which: str) -> np.ndarray:
    """The rows a user is known for when `which` ('valid' or 'test') is evaluated: train (+ valid for test)."""
    s = self.split
    return s.train if which == 'valid' else np.concatenate([s.train, s.valid])

  def heldout_rows(self, which: str) -> np.ndarray:
    return self.split.valid if which == 'valid' else self.split.test

  def gains(self, rows: np.ndarray) -> np.ndarray:
    """Graded-relevance gains of log rows (eval.gain_column; 1 where none is declared)."""
    column = self.config.eval.gain_column
    if not column:
      return np.ones(rows.shape[0], np.float64)
    return readers.numeric(self.data.log[column], column, (), 'interaction log', 'eval.gain_column')[rows]


def _positives(user_index: np.ndarray, item_index: np.ndarray, rows: np.ndarray) -> Examples:
  return Examples(user_index[rows], item_index[rows], np.asarray(rows, np.int64), np.ones(rows.shape[0], np.float32))


def _positions(ids: np.ndarray, table_ids: np.ndarray, what: str) -> np.ndarray:
  order = np.argsort(table_ids)
  pos = np.searchsorted(table_ids[order], ids)
  pos = np.minimum(pos, len(order) - 1)
  bad = table_ids[order][pos] != ids
  if bad.any():
    raise ValueError(f'log rows reference {what} id {ids[bad][0]} missing from the {what} table; the data files '
                     'are inconsistent: re-fetch them')
  return order[pos].astype(np.int64)


def build(config: ml_collections.ConfigDict, data: Dataset | None = None) -> Experiment:
  """Loads (unless given) and checks the data, splits it, fits features on the training split, builds samplers."""
  config_lib.validate(config)
  ds = load_data(config) if data is None else data
  split = splits_lib.make_split(ds, config.data, config.seed)
  uidx = _positions(ds.log[ds.user_column], ds.users[ds.user_column], 'user')
  iidx = _positions(ds.log[ds.item_column], ds.items[ds.item_column], 'item')
  columns = tasks_lib.label_columns(config, ds)
  specs = tasks_lib.task_specs(config, columns, split.train)
  encoder = features_lib.fit(ds, split.train, config, uidx, iidx)
  num_items = int(len(ds.items[ds.item_column]))
  train_items = np.unique(iidx[split.train])
  train_sampler = NegativeSampler(uidx[split.train], iidx[split.train], train_items, num_items,
                                  config.sampling.distribution, config.sampling.popularity_power)
  eval_sampler = NegativeSampler(uidx, iidx, train_items, num_items, 'uniform')
  labels = Labels(specs, columns)
  sampled = any(s.all_rows for s in specs)  # sampled negatives count only for tasks defined on all rows
  positives = lambda rows: _positives(uidx, iidx, rows)
  num_negatives = config.sampling.num_negatives if sampled else 0
  dropout = {n: f.dropout for n, f in config.features.items()}
  if config.data.reader == 'stream':
    stream = _streamed(config, ds, split, encoder, specs, train_sampler, num_negatives, dropout)
  else:
    stream = TrainStream(positives(split.train), encoder, train_sampler, num_negatives, config.train.batch_size,
                         labels, config.seed, dropout)
  return Experiment(
      config=config, data=ds, split=split, encoder=encoder, user_index=uidx, item_index=iidx,
      train_sampler=train_sampler, eval_sampler=eval_sampler, labels=labels, specs=specs, stream=stream,
      valid=EvalSet.build(positives(split.valid), eval_sampler, config.eval.click_negatives if sampled else 0,
                          config.seed, 1),
      test=EvalSet.build(positives(split.test), eval_sampler, config.eval.click_negatives if sampled else 0,
                         config.seed, 2))


def streamed(config: ml_collections.ConfigDict, groups: stream_lib.RowGroups, train_rows: np.ndarray,
             keep: Callable[[dict[str, np.ndarray]], np.ndarray], users: stream_lib.IdIndex, items: stream_lib.IdIndex,
             encoder: features_lib.FeatureEncoder, specs: tuple[tasks_lib.TaskSpec, ...], sampler: NegativeSampler,
             num_negatives: int, dropout: dict[str, float] | None = None) -> StreamedTrain:
  """The training stream over the log's row groups `groups`: rows where `keep(columns)` holds (train_rows[g] of row
  group g), ids looked up in `users` / `items`, labels by the tasks' rules, context features by their fitted rules."""
  from mtl_rec.data import stream as stream_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  d, log_columns = config.data, config.data.log
  context = [(s, config_lib.feature_column(s.name, config.features[s.name])) for s in encoder.specs
             if s.entity == 'context']
  labels = [t.label for _, t in config_lib.ordered(config.tasks) if t.label != config_lib.OBSERVED]
  columns = list(dict.fromkeys([log_columns.user_column, log_columns.item_column, *labels, *(c for _, c in context)]))

  def decode(cols: dict[str, np.ndarray]) -> stream_lib.Chunk:
    mask = keep(cols)
    sub = {c: v[mask] for c, v in cols.items()}
    u, i = users(sub[log_columns.user_column]), items(sub[log_columns.item_column])
    for what, pos, column in (('user', u, log_columns.user_column), ('item', i, log_columns.item_column)):
      if (pos < 0).any():
        raise DataError(f'interaction log: row {int(sub["_row"][np.argmax(pos < 0)])} has {what} id '
                        f'{sub[column][np.argmax(pos < 0)]!r}, which the run did not see when it started; the files '
                        'changed under a running job: restart it in a new workdir')
    chunk_log = Dataset(name='stream', source='stream', log=sub, users={}, items={},
                        user_column=log_columns.user_column, item_column=log_columns.item_column)
    ctx = {s.name: encoding.encode(s.encoding, sub[column], encoder.vocabs) for s, column in context}
    return stream_lib.Chunk(u, i, sub['_row'], tasks_lib.label_columns(config, chunk_log), ctx)

  num_shards = d.stream.num_shards or jax.process_count()
  per_shard = config.train.batch_size // ((1 + num_negatives) * num_shards)
  if per_shard * (1 + num_negatives) * num_shards != config.train.batch_size:
    raise DataError(f'train.batch_size={config.train.batch_size} must be a multiple of (1 + num_negatives) x '
                    f'shards = {(1 + num_negatives) * num_shards} with data.reader=stream: e.g. '
                    f'{max(per_shard, 1) * (1 + num_negatives) * num_shards}')
  plan = stream_lib.Plan(groups, train_rows, num_shards, d.stream.interleave, per_shard, config.seed)
  import grain  # pylint: disable=g-import-not-at-top
  return StreamedTrain(plan, decode, columns, encoder, specs, sampler, num_negatives, config.seed,
                       stream_lib.owned_shards(num_shards, jax.process_index(), jax.process_count()),
                       grain.ReadOptions(num_threads=d.stream.threads, prefetch_buffer_size=d.stream.prefetch),
                       dropout)


def _streamed(config: ml_collections.ConfigDict, ds: Dataset, split: splits_lib.Split,
              encoder: features_lib.FeatureEncoder, specs: tuple[tasks_lib.TaskSpec, ...], sampler: NegativeSampler,
              num_negatives: int, dropout: dict[str, float]) -> StreamedTrain:
  """data.reader='stream' over a log also loaded here (splits, vocabularies and evaluation from memory): the
  training rows are read again from the Parquet files, row group by row group."""
  from mtl_rec.data import stream as stream_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  groups = stream_lib.RowGroups.of(readers.expand(config.data.log.paths, 'interaction log'))
  if groups.num_rows != ds.num_rows:
    raise DataError(f'the log files hold {groups.num_rows} rows but {ds.num_rows} were loaded; the files changed '
                    'while the run started: run it again')
  is_train = np.zeros(ds.num_rows, bool)
  is_train[split.train] = True
  cum = np.concatenate([[0], np.cumsum(is_train)])
  train_rows = cum[groups.start + groups.rows] - cum[groups.start]
  return streamed(config, groups, train_rows, lambda cols: is_train[cols['_row']],
                  stream_lib.IdIndex(ds.users[ds.user_column]), stream_lib.IdIndex(ds.items[ds.item_column]),
                  encoder, specs, sampler, num_negatives, dropout)
