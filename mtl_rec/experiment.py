"""The experiment: everything a run derives from config.data/features/tasks/sampling, built in one place, once.

`build(config)` loads the data (checking it: any bad row or file is a DataError before anything is trained or
written), splits it, builds the task labels, fits the features on the training split, and builds the negative
samplers, the training stream and the evaluation sets. Training, evaluation, export, the ensemble and the
benchmarks all take an `Experiment` instead of re-deriving any of it.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import features as features_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.data import readers
from mtl_rec.data import splits as splits_lib
from mtl_rec.data.loader import load_data
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.data.types import Dataset
from mtl_rec.input_pipeline import EvalSet, Examples, Labels, TrainStream


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
  stream: TrainStream
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
  return Experiment(
      config=config, data=ds, split=split, encoder=encoder, user_index=uidx, item_index=iidx,
      train_sampler=train_sampler, eval_sampler=eval_sampler, labels=labels, specs=specs,
      stream=TrainStream(positives(split.train), encoder, train_sampler,
                         config.sampling.num_negatives if sampled else 0, config.train.batch_size, labels, config.seed,
                         {n: f.dropout for n, f in config.features.items()}),
      valid=EvalSet.build(positives(split.valid), eval_sampler, config.eval.click_negatives if sampled else 0,
                          config.seed, 1),
      test=EvalSet.build(positives(split.test), eval_sampler, config.eval.click_negatives if sampled else 0,
                         config.seed, 2))
