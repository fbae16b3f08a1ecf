"""The experiment: everything a run derives from config.data/features/sampling/tasks, built in one place, once.

`build(config)` loads the data, splits it, fits the features on the training split, and builds the negative
samplers, the training stream, the evaluation sets and the task specs. Training, evaluation, export, the ensemble
and the benchmarks all take an `Experiment` instead of re-deriving any of it.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import features as features_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.data import splits as splits_lib
from mtl_rec.data.loader import load_data
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.data.types import RatingsData
from mtl_rec.input_pipeline import EvalSet, Examples, Labels, TrainStream


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: ml_collections.ConfigDict
  data: RatingsData
  split: splits_lib.Split
  encoder: features_lib.FeatureEncoder
  user_index: np.ndarray  # [N] position of each rating's user in data.users
  item_index: np.ndarray  # [N] position of each rating's item in data.items
  train_sampler: NegativeSampler  # excludes the user's training positives
  eval_sampler: NegativeSampler  # excludes everything the user ever rated
  labels: Labels
  rating_mean: float  # mean training rating: the regression head's initial bias
  specs: tuple[tasks_lib.TaskSpec, ...]
  stream: TrainStream
  valid: EvalSet
  test: EvalSet

  @property
  def num_users(self) -> int:
    return int(self.data.users.user_id.shape[0])

  @property
  def num_items(self) -> int:
    return int(self.data.items.item_id.shape[0])

  def positives(self, rows: np.ndarray) -> Examples:
    """The observed pairs of rating rows `rows`."""
    return _positives(self.user_index, self.item_index, self.data.rating, rows)

  def history_rows(self, which: str) -> np.ndarray:
    """The ratings a user is known for when `which` ('valid' or 'test') is evaluated: train (+ valid for test)."""
    s = self.split
    return s.train if which == 'valid' else np.concatenate([s.train, s.valid])

  def heldout_rows(self, which: str) -> np.ndarray:
    return self.split.valid if which == 'valid' else self.split.test


def _positives(user_index: np.ndarray, item_index: np.ndarray, rating: np.ndarray, rows: np.ndarray) -> Examples:
  return Examples(user_index[rows], item_index[rows], rating[rows].astype(np.float32),
                  np.ones(rows.shape[0], np.float32))


def _positions(ids: np.ndarray, table_ids: np.ndarray, what: str) -> np.ndarray:
  order = np.argsort(table_ids)
  pos = np.searchsorted(table_ids[order], ids)
  pos = np.minimum(pos, len(order) - 1)
  bad = table_ids[order][pos] != ids
  if bad.any():
    raise ValueError(f'rating rows reference {what} id {ids[bad][0]} missing from the {what} table; the data files '
                     'are inconsistent: re-fetch them')
  return order[pos].astype(np.int64)


def build(config: ml_collections.ConfigDict, data: RatingsData | None = None) -> Experiment:
  """Loads data (unless given), splits it, fits features on the training split, builds samplers and streams."""
  config_lib.validate(config)
  data = load_data(config.data, seed=config.seed) if data is None else data
  split = splits_lib.make_split(data, config.data.split, config.seed, config.data.valid_fraction,
                                config.data.test_fraction)
  encoder = features_lib.fit(data, split.train, config.features, row_multiple=config.features.row_multiple)
  uidx = _positions(data.user_id, data.users.user_id, 'user')
  iidx = _positions(data.item_id, data.items.item_id, 'item')
  num_items = int(data.items.item_id.shape[0])
  train_items = np.unique(iidx[split.train])
  train_sampler = NegativeSampler(uidx[split.train], iidx[split.train], train_items, num_items,
                                  config.sampling.distribution, config.sampling.popularity_power)
  eval_sampler = NegativeSampler(uidx, iidx, train_items, num_items, 'uniform')
  rating_range = (float(data.rating.min()), float(data.rating.max()))
  rating_mean = float(data.rating[split.train].mean())
  labels = Labels(float(config.data.like_threshold), rating_range)
  positives = lambda rows: _positives(uidx, iidx, data.rating, rows)
  return Experiment(
      config=config, data=data, split=split, encoder=encoder, user_index=uidx, item_index=iidx,
      train_sampler=train_sampler, eval_sampler=eval_sampler, labels=labels, rating_mean=rating_mean,
      specs=tasks_lib.task_specs(config, rating_range, rating_mean),
      stream=TrainStream(positives(split.train), encoder, train_sampler, config.sampling.num_negatives,
                         config.train.batch_size, labels, config.seed),
      valid=EvalSet.build(positives(split.valid), eval_sampler, config.eval.click_negatives, config.seed, 1),
      test=EvalSet.build(positives(split.test), eval_sampler, config.eval.click_negatives, config.seed, 2))
