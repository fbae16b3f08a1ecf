"""The experiment: everything a run derives from config.data/features/tasks/sampling, built in one place, once.

`build(config)` loads the data (checking it: any bad row or file is a DataError before anything is trained or
written), splits it, builds the task labels, fits the features on the training split, and builds the negative
samplers, the training stream and the evaluation sets. Training, evaluation, export, the ensemble and the
benchmarks all take an `Experiment` instead of re-deriving any of it. With data.reader='stream' the log is never
loaded (`build_streamed`): `data.log` is then a sample of it, the training stream reads the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import TYPE_CHECKING, Any, Callable

import jax
import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import distributed
from mtl_rec import encoding
from mtl_rec import input_pipeline
from mtl_rec import features as features_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.data import readers
from mtl_rec.data import splits as splits_lib
from mtl_rec.data.loader import load_data
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.data.types import Dataset, where
from mtl_rec.errors import DataError
from mtl_rec.input_pipeline import EvalSet, Examples, Labels, StreamedTrain, TrainStream

if TYPE_CHECKING:  # imported when used: Grain is needed by data.reader='stream' only
  from mtl_rec.data import stream as stream_lib

# What the streamed survey pass checks in every row, versioned: a survey cached by a version that checked less (or
# other columns) is computed again. Raise it when the checks change.
SURVEY_CHECKS = 'labels,timestamps,numeric-context,categorical-context,label-ranges/3'


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
  # rows of the whole log in each set: the split's sizes in memory; with data.reader='stream', where `data.log` holds
  # only the evaluation sample and the fitting sample, the streaming pass's counts (and 'sampled': what it holds)
  counts: dict[str, Any] = dataclasses.field(default_factory=dict)
  # the log rows (of `data`) the tasks' label statistics and context features are fitted on: the training split,
  # or with data.reader='stream' the fitting sample; None = split.train
  fit_rows: np.ndarray | None = None

  def label_rows(self) -> np.ndarray:
    return self.split.train if self.fit_rows is None else self.fit_rows

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
    return _gains(self.config, self.data, rows)


def _gains(config: ml_collections.ConfigDict, data: Dataset, rows: np.ndarray,
           kind: str = 'a held-out row') -> np.ndarray:
  """eval.gain_column's values on `rows` (1 where none is declared); a DataError naming the first row whose gain
  is not a finite number >= 0 (`kind`: what the rows are, for the message)."""
  column = config.eval.gain_column
  if not column:
    return np.ones(rows.shape[0], np.float64)
  origins = data.origins.get('log', ())
  gains = readers.numeric(data.log[column], column, origins, 'interaction log', 'eval.gain_column')[rows]
  bad = np.flatnonzero(~(gains >= 0) | ~np.isfinite(gains))
  if bad.size:
    value = gains[bad[0]]
    raise DataError(f'interaction log: {where(origins, int(rows[bad[0]]))}: eval.gain_column {column!r} is '
                    f'{"missing" if np.isnan(value) else value} on {kind}; a graded-NDCG gain is a finite '
                    "number >= 0: fill or drop the row, or set eval.gain_column='' (gain 1 per held-out item)")
  return gains


def _check_gains(config: ml_collections.ConfigDict, data: Dataset, split: splits_lib.Split) -> None:
  """Every gain an evaluation reads, checked when the experiment is built, not found after training: the ranking
  evaluations read the held-out rows', the default fusion's fit (fusion_weights) the training rows' largest."""
  _gains(config, data, np.concatenate([split.valid, split.test]))
  _gains(config, data, split.train, 'a training row (the fused ranking\'s fit scales by their largest gain)')


def _positives(user_index: np.ndarray, item_index: np.ndarray, rows: np.ndarray) -> Examples:
  return Examples(user_index[rows], item_index[rows], np.asarray(rows, np.int64), np.ones(rows.shape[0], np.float32))


def _positions(ids: np.ndarray, table_ids: np.ndarray, what: str) -> np.ndarray:
  order = np.argsort(table_ids)
  pos = np.searchsorted(table_ids[order], ids)
  pos = np.minimum(pos, len(order) - 1)
  bad = table_ids[order][pos] != ids
  if bad.any():
    raise DataError(f'log rows reference {what} id {ids[bad][0]} missing from the {what} table; the data files '
                    'are inconsistent: re-fetch them')
  return order[pos].astype(np.int64)


def build(config: ml_collections.ConfigDict, data: Dataset | None = None, workdir: str | None = None) -> Experiment:
  """Loads (unless given) and checks the data, splits it, fits features on the training split, builds samplers.

  data.reader='stream': the log is never loaded (see build_streamed); its passes are cached under `workdir`."""
  config_lib.validate(config)
  if config.data.reader == 'stream':
    if workdir is None:
      raise ValueError("data.reader='stream' caches its passes over the log in the run directory: pass workdir")
    return build_streamed(config, workdir)
  ds = load_data(config) if data is None else data
  split = splits_lib.make_split(ds, config.data, config.seed)
  uidx = _positions(ds.log[ds.user_column], ds.users[ds.user_column], 'user')
  iidx = _positions(ds.log[ds.item_column], ds.items[ds.item_column], 'item')
  columns = tasks_lib.label_columns(config, ds)
  specs = tasks_lib.task_specs(config, columns, split.train)
  _check_gains(config, ds, split)
  encoder = features_lib.fit(ds, split.train, config, uidx, iidx)
  num_items = int(len(ds.items[ds.item_column]))
  train_items = np.unique(iidx[split.train])
  train_sampler = NegativeSampler(uidx[split.train], iidx[split.train], train_items, num_items,
                                  config.sampling.distribution, config.sampling.popularity_power)
  eval_sampler = NegativeSampler(uidx, iidx, train_items, num_items, 'uniform')
  sampled = any(s.all_rows for s in specs)  # sampled negatives count only for tasks defined on all rows
  positives = lambda rows: _positives(uidx, iidx, rows)
  num_negatives = config.sampling.num_negatives if sampled else 0
  labels = Labels(specs, columns, input_pipeline.item_logq(specs, np.bincount(iidx[split.train], minlength=num_items),
                                                           train_sampler.item_probabilities(), num_negatives))
  dropout = {n: f.dropout for n, f in config.features.items()}
  stream = TrainStream(positives(split.train), encoder, train_sampler, num_negatives, config.train.batch_size,
                       labels, config.seed, dropout)
  return Experiment(
      config=config, data=ds, split=split, encoder=encoder, user_index=uidx, item_index=iidx,
      train_sampler=train_sampler, eval_sampler=eval_sampler, labels=labels, specs=specs, stream=stream,
      valid=EvalSet.build(positives(split.valid), eval_sampler, config.eval.click_negatives if sampled else 0,
                          config.seed, 1),
      test=EvalSet.build(positives(split.test), eval_sampler, config.eval.click_negatives if sampled else 0,
                         config.seed, 2),
      counts={'train': int(split.train.size), 'valid': int(split.valid.size), 'test': int(split.test.size)})


def _streamed(config: ml_collections.ConfigDict, groups: stream_lib.RowGroups, train_rows: np.ndarray,
             keep: Callable[[dict[str, np.ndarray]], np.ndarray], users: stream_lib.IdIndex, items: stream_lib.IdIndex,
             encoder: features_lib.FeatureEncoder, specs: tuple[tasks_lib.TaskSpec, ...], sampler: NegativeSampler,
             num_negatives: int, dropout: dict[str, float] | None = None,
             extra_columns: tuple[str, ...] = (), logq: np.ndarray | None = None) -> StreamedTrain:
  """The training stream over the log's row groups `groups`: rows where `keep(columns)` holds (train_rows[g] of row
  group g), ids looked up in `users` / `items`, labels by the tasks' rules, context features by their fitted rules."""
  from mtl_rec.data import stream as stream_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  d, log_columns = config.data, config.data.log
  context = [(s, config_lib.feature_column(s.name, config.features[s.name])) for s in encoder.specs
             if s.entity == 'context']
  labels = [t.label for _, t in config_lib.ordered(config.tasks) if t.label != config_lib.OBSERVED]
  columns = list(dict.fromkeys([log_columns.user_column, log_columns.item_column, *labels, *(c for _, c in context),
                                *extra_columns]))

  def decode(cols: dict[str, np.ndarray]) -> stream_lib.Chunk:
    mask = keep(cols)
    # The labels, and the numbers of numeric context features, are checked on the whole row group, whose rows the
    # group's origins number as the file does: an error names the file, row (and a CSV's line).
    origins = groups.origins(groups.of_row(int(cols['_row'][0]))) if cols['_row'].size else ()
    group_log = Dataset(name='stream', source='stream', log=cols, users={}, items={},
                        user_column=log_columns.user_column, item_column=log_columns.item_column,
                        origins={'log': origins})
    labels = {k: tasks_lib.LabelColumn(v.values[mask], v.present[mask])
              for k, v in tasks_lib.label_columns(config, group_log).items()}
    for s, column in context:
      if s.encoding.get('raw_type') == 'float':
        readers.numeric(cols[column], column, origins, 'interaction log', f"feature '{s.name}'")
    sub = {c: v[mask] for c, v in cols.items()}
    u, i = users(sub[log_columns.user_column]), items(sub[log_columns.item_column])
    for what, pos, column in (('user', u, log_columns.user_column), ('item', i, log_columns.item_column)):
      if (pos < 0).any():
        raise DataError(f'interaction log: row {int(sub["_row"][np.argmax(pos < 0)])} has {what} id '
                        f'{sub[column][np.argmax(pos < 0)]!r}, which the run did not see when it started; the files '
                        'changed under a running job: restart it in a new workdir')
    ctx = {s.name: encoding.encode(s.encoding, sub[column], encoder.vocabs) for s, column in context}
    return stream_lib.Chunk(u, i, sub['_row'], labels, ctx)

  num_shards = d.stream.num_shards or jax.process_count()
  per_shard = config.train.batch_size // ((1 + num_negatives) * num_shards)
  if per_shard * (1 + num_negatives) * num_shards != config.train.batch_size:
    # a suggestion that the trainer's checks accept too: also a multiple of the gradient groups and the devices
    m = math.lcm((1 + num_negatives) * num_shards, config.train.grad_groups or 1, jax.device_count())
    near = sorted({max(config.train.batch_size // m, 1) * m, (config.train.batch_size // m + 1) * m})
    raise DataError(f'train.batch_size={config.train.batch_size} must be a multiple of (1 + num_negatives) x '
                    f'shards = {(1 + num_negatives) * num_shards} with data.reader=stream: e.g. '
                    f'{" or ".join(map(str, near))} (multiples of {m}, which the {config.train.grad_groups} gradient '
                    f'groups and {jax.device_count()} devices divide too)')
  plan = stream_lib.Plan(groups, train_rows, num_shards, d.stream.interleave, per_shard, config.seed)
  import grain  # pylint: disable=g-import-not-at-top
  return StreamedTrain(plan, decode, columns, encoder, specs, sampler, num_negatives, config.seed,
                       stream_lib.owned_shards(num_shards, jax.process_index(), jax.process_count()),
                       grain.ReadOptions(num_threads=d.stream.threads, prefetch_buffer_size=d.stream.prefetch),
                       dropout, logq)


def build_streamed(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """The experiment of a log read as a stream (data.reader='stream'), never loaded whole. Two passes, each cached
  under workdir/input/ and reused by a resumed run:

  1. `stream.survey`: every row's split (splits.assign, row by row: the same split as in memory), each row group's
     training rows, and each user's and item's rows per set: exact id counts for the vocabularies (min_count,
     max_size), the features' per-user / per-item weights and the negative sampler's item frequencies.
  2. `stream.collect`: the evaluation sample, every row of a seeded sample of the users with held-out rows (their
     training rows are what they have seen), as many users as hold at most data.stream.eval_rows held-out rows;
     and a seeded uniform sample of about data.stream.fit_rows training rows, on which context features and the
     tasks' label statistics are fitted. On a log smaller than both, that is the whole log.
  3. with history features, a pass over the id (and timestamp, and `where`) columns: each user's (item's) most recent
     training interactions (features.RecentMembers, memory bounded by users x max_values).
  Then `data.log` is that sample, `split` indexes it, and the training stream reads the training rows of the files.
  """
  from mtl_rec.data import loader  # pylint: disable=g-import-not-at-top
  from mtl_rec.data import stream as stream_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  d, lc, seed = config.data, config.data.log, config.seed
  need = loader.columns_needed(config)
  inputs = os.path.join(workdir, 'input')
  given = readers.expand(lc.paths, 'interaction log')
  paths = distributed.lead_first(lambda: stream_lib.parquet_log(
      given, d.format, d.csv_delimiter, need['log'], os.path.join(inputs, 'parquet'), d.stream.row_group_size),
                                 'parquet copy')
  groups = stream_lib.RowGroups.of(paths, given)  # errors name the user's files (a CSV's lines), not the copies
  groups.check_types(need['log'])
  split_columns = tuple(c for c in (lc.timestamp_column if d.split == 'timestamp' else '',
                                    d.split_column if d.split == 'column' else '') if c)
  key = json.dumps([groups.fingerprint(), seed, {k: d[k] for k in ('split', 'test_fraction', 'valid_fraction',
                                                                   'split_cut', 'split_column', 'split_test_rows')}])
  # validation by hash unless the split column names 'valid' rows (as splits.make_split); read once, then cached
  hash_valid = d.split != 'column' or not bool(distributed.lead_first(lambda: stream_lib.cached(
      os.path.join(inputs, 'split.npz'), key,
      lambda: {'names_valid': np.asarray(_any_equal(groups, d.split_column, 'valid'))}, 'split column'),
      'split')['names_valid'])

  def codes(cols: dict[str, np.ndarray], g: int) -> np.ndarray:
    return splits_lib.assign(cols['_row'], cols, d, seed, hash_valid, lambda i: groups.where(g, i))

  def checked(cols: dict[str, np.ndarray], g: int) -> dict[str, np.ndarray]:
    for c in (lc.user_column, lc.item_column):
      cols[c] = readers.check_ids(cols[c], c, groups.origins(g), 'interaction log')
    return cols

  # Every row's labels, timestamp and numeric context values, checked in the survey pass, before anything is
  # trained: a bad row is the same error as in memory (file, row, line), not a stop in the middle of an epoch.
  labels = list(dict.fromkeys(t.label for _, t in config_lib.ordered(config.tasks) if t.label != config_lib.OBSERVED))
  numbers = {config_lib.feature_column(n, f): n for n, f in config_lib.ordered(config.features)
             if f.entity == 'context' and f.kind == 'numeric'}
  categories = {config_lib.feature_column(n, f): n for n, f in config_lib.ordered(config.features)
                if f.entity == 'context' and f.kind == 'categorical'}
  ts_column = [lc.timestamp_column] if lc.timestamp_column else []

  def valid_rows(cols: dict[str, np.ndarray], g: int) -> dict[str, np.ndarray]:
    origins = groups.origins(g)
    tasks_lib.label_columns(config, Dataset(name='stream', source='stream', log=cols, users={}, items={},
                                            user_column=lc.user_column, item_column=lc.item_column,
                                            origins={'log': origins}))
    for column, name in numbers.items():
      readers.numeric(cols[column], column, origins, 'interaction log', f"feature '{name}'")
    for column in ts_column:
      readers.timestamps(cols[column], column, origins, 'interaction log')
    for column, name in categories.items():  # a float column's categories are whole numbers (features._rule)
      features_lib.check_whole_numbers(cols[column], column, name, 'the interaction log', origins)
    return cols

  # The survey's cache is keyed by the checks too: a rerun that labels or reads another column, or a cache from a
  # version that checked less, checks every row again.
  survey_key = json.dumps([key, SURVEY_CHECKS, labels, numbers, categories, ts_column,
                           {n: t.to_dict() for n, t in config_lib.ordered(config.tasks)}], default=str)
  # the lead process reads the log first; the others then find its passes in a shared run directory
  # regression labels without a declared range take it from every row, as in memory (not from the samples)
  scaled = {n: t.label for n, t in config_lib.ordered(config.tasks) if t.kind == 'regression' and not t.range}
  survey = distributed.lead_first(lambda: stream_lib.survey(
      groups, list(dict.fromkeys([lc.user_column, lc.item_column, *split_columns, *labels, *numbers, *categories,
                                  *ts_column])),
      lambda cols, g: codes(valid_rows(checked(cols, g), g), g), [lc.user_column, lc.item_column],
      os.path.join(inputs, 'survey.npz'), survey_key, sorted(set(scaled.values()))), 'survey')
  totals = survey['group_counts'].sum(0)
  if not totals[splits_lib.TRAIN] or not totals[splits_lib.TEST]:
    raise DataError(f'the {d.split!r} split of the {groups.num_rows:,} log rows leaves {totals[0]} training and '
                    f'{totals[2]} test rows; both must be non-empty')
  user_values, user_counts = survey[f'{lc.user_column}_values'], survey[f'{lc.user_column}_counts']
  item_values, item_counts = survey[f'{lc.item_column}_values'], survey[f'{lc.item_column}_counts']

  # the samples: evaluation users (seeded by their rank among the log's distinct ids) and training rows
  held = user_counts[:, splits_lib.VALID] + user_counts[:, splits_lib.TEST]
  candidates = np.flatnonzero(held > 0)
  candidates = candidates[np.argsort(splits_lib.row_uniform(candidates, seed, 4), kind='stable')]
  take = max(int(np.searchsorted(np.cumsum(held[candidates]), d.stream.eval_rows, side='right')), 1)
  eval_users = stream_lib.IdIndex(np.sort(user_values[candidates[:take]]))
  fit_rate = min(1.0, d.stream.fit_rows / totals[splits_lib.TRAIN])
  in_fit = lambda rows: splits_lib.row_uniform(rows, seed, 3) < fit_rate

  def select(cols: dict[str, np.ndarray], g: int) -> np.ndarray:
    return (eval_users(cols[lc.user_column]) >= 0) | ((codes(cols, g) == splits_lib.TRAIN) & in_fit(cols['_row']))

  log_columns = list(dict.fromkeys([*need['log'], *split_columns]))
  sample = distributed.lead_first(lambda: stream_lib.collect(
      groups, log_columns, lambda cols, g: select(checked(cols, g), g), os.path.join(inputs, 'sample.npz'),
      json.dumps([key, take, fit_rate, log_columns])), 'sample')
  code = codes(sample, 0)
  if lc.timestamp_column:
    sample[lc.timestamp_column] = readers.timestamps(sample[lc.timestamp_column], lc.timestamp_column, (),
                                                     'interaction log')
  users, items, origins = loader.entity_tables(config, user_values, item_values)
  for c, table in ((lc.user_column, users), (lc.item_column, items)):
    sample[c] = sample[c].astype(table[c].dtype) if sample[c].dtype.kind != table[c].dtype.kind else sample[c]
  ds = Dataset(name=d.name or 'files', source=', '.join(lc.paths), log=sample, users=users, items=items,
               user_column=lc.user_column, item_column=lc.item_column, timestamp_column=lc.timestamp_column or None,
               origins=origins)
  rows = np.arange(ds.num_rows, dtype=np.int64)
  split = splits_lib.Split(train=rows[code == splits_lib.TRAIN], valid=rows[code == splits_lib.VALID],
                           test=rows[code == splits_lib.TEST])
  fit_rows = split.train[in_fit(sample['_row'][split.train])]
  user_pos, item_pos = stream_lib.IdIndex(users[lc.user_column]), stream_lib.IdIndex(items[lc.item_column])
  uidx, iidx = user_pos(sample[lc.user_column]), item_pos(sample[lc.item_column])
  num_users, num_items = len(users[lc.user_column]), len(items[lc.item_column])
  item_train = np.zeros(num_items)
  item_train[item_pos(item_values)] = item_counts[:, splits_lib.TRAIN]
  weights = {'user': np.zeros(num_users), 'item': item_train,
             'context': np.bincount(fit_rows, minlength=ds.num_rows).astype(np.float64)}
  weights['user'][user_pos(user_values)] = user_counts[:, splits_lib.TRAIN]
  columns = tasks_lib.label_columns(config, ds)
  specs = tasks_lib.task_specs(config, columns, fit_rows,
                               {n: tuple(survey[f'{c}_range']) for n, c in scaled.items()})
  def history_tables(requests: list[features_lib.HistoryRequest]) -> dict[str, np.ndarray]:
    """The history features from every training row of the log: a pass over its id (and timestamp, and `where`)
    columns, row group by row group, cached like the others."""
    ts = lc.timestamp_column
    conditions = features_lib.where_columns(requests)
    def chunks():
      for g in range(len(groups)):
        cols = checked(groups.read(g, list(dict.fromkeys([lc.user_column, lc.item_column, *split_columns,
                                                          *([ts] if ts else []), *conditions]))), g)
        train = codes(cols, g) == splits_lib.TRAIN
        recency = (readers.timestamps(cols[ts][train], ts, groups.origins(g), 'interaction log')
                   if ts else np.zeros(int(train.sum())))
        yield (user_pos(cols[lc.user_column][train]), item_pos(cols[lc.item_column][train]), recency,
               cols['_row'][train],
               {c: features_lib.condition_column(cols, c, groups.origins(g))[train] for c in conditions})
    what = [[r.name, r.entity, r.length, hashlib.sha1(np.ascontiguousarray(r.member_rows)).hexdigest(),
             list(r.where or ())] for r in requests]
    return distributed.lead_first(lambda: stream_lib.cached(
        os.path.join(inputs, 'histories.npz'), json.dumps([key, what]),
        lambda: features_lib.build_histories(requests, chunks()), 'history pass'), 'histories')

  encoder = features_lib.fit(ds, split.train, config, uidx, iidx, weights, history_tables)
  train_items = np.flatnonzero(item_train > 0)
  # negatives from the streamed item frequencies; a user's training positives are excluded where the sample holds
  # them (all of them for the evaluation users, and on a log as small as the samples)
  train_sampler = NegativeSampler(uidx[split.train], iidx[split.train], train_items, num_items,
                                  config.sampling.distribution, config.sampling.popularity_power,
                                  popularity_counts=item_train)
  eval_sampler = NegativeSampler(uidx, iidx, train_items, num_items, 'uniform')
  sampled = any(s.all_rows for s in specs)
  num_negatives = config.sampling.num_negatives if sampled else 0
  logq = input_pipeline.item_logq(specs, item_train, train_sampler.item_probabilities(), num_negatives)
  stream = _streamed(config, groups, survey['group_counts'][:, splits_lib.TRAIN],
                    lambda cols: codes(cols, 0) == splits_lib.TRAIN, user_pos, item_pos, encoder, specs,
                    train_sampler, num_negatives, {n: f.dropout for n, f in config.features.items()}, split_columns,
                    logq)
  positives = lambda r: _positives(uidx, iidx, r)
  _check_gains(config, ds, split)  # the sample holds every held-out row and the training rows it keeps
  click_negatives = config.eval.click_negatives if sampled else 0
  return Experiment(
      config=config, data=ds, split=split, encoder=encoder, user_index=uidx, item_index=iidx,
      train_sampler=train_sampler, eval_sampler=eval_sampler,
      labels=Labels(specs, columns, logq), specs=specs,
      stream=stream, valid=EvalSet.build(positives(split.valid), eval_sampler, click_negatives, seed, 1),
      test=EvalSet.build(positives(split.test), eval_sampler, click_negatives, seed, 2),
      counts={'train': int(totals[0]), 'valid': int(totals[1]), 'test': int(totals[2]), 'log': groups.num_rows,
              'sampled': {'rows': int(ds.num_rows), 'evaluation_users': take, 'fit_rows': int(fit_rows.size),
                          'valid': int(split.valid.size), 'test': int(split.test.size)}},
      fit_rows=fit_rows)


def _any_equal(groups: stream_lib.RowGroups, column: str, value: str) -> bool:
  """Whether `column` of the log holds `value` in any row (one pass over that column)."""
  return any((groups.read(g, [column])[column].astype(np.str_) == value).any() for g in range(len(groups)))
