"""Training and evaluation examples: log rows + sampled negatives -> feature batches.

A global batch is a nested dict of numpy arrays:
  {'user': {feature: [B] or [B, L]}, 'item': {...}, 'context': {...},
   'labels': {task: [B]}, 'defined': {task: [B]}, 'observed': [B], 'valid': [B]}
`observed` is 1 for log rows, 0 for sampled negatives; `defined` is 1 where a task's loss is defined (its rows, and
a label present). `valid` is 0 only for padding rows of the last eval batch. Batches are a pure function of (seed,
epoch, step), so a resumed run regenerates exactly the batches it would have seen, and every process of a
multi-host job builds the same global batch and keeps its own slice.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from mtl_rec import encoding
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec import errors
from mtl_rec.features import FeatureEncoder
from mtl_rec.tasks import LabelColumn, TaskSpec

if TYPE_CHECKING:  # imported when used: Grain is needed by data.reader='stream' only
  from mtl_rec.data import stream as stream_lib

Batch = dict


@dataclasses.dataclass(frozen=True)
class Labels:
  """Every task's label and whether it is defined, for examples: a log row's label where observed; on a sampled
  negative 0 (defined for tasks on all rows, which includes the implicit 'observed' label)."""

  specs: tuple[TaskSpec, ...]
  columns: dict[str, LabelColumn]
  # retrieval tasks: log q(item) of every item position (its share of the training rows); batches then carry each
  # row's 'item_key' (item position) and 'logq' for the in-batch softmax
  item_logq: np.ndarray | None = None

  def __call__(self, ex: 'Examples') -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    obs = ex.observed > 0
    labels, defined = {}, {}
    for s in self.specs:
      col = self.columns[s.name]
      if s.implicit:
        labels[s.name] = ex.observed.astype(np.float32)
      else:
        labels[s.name] = np.where(obs, col.values[ex.row], 0).astype(col.values.dtype)
      defined[s.name] = np.where(obs, col.present[ex.row], s.all_rows).astype(np.float32)
    return labels, defined


@dataclasses.dataclass
class Examples:
  """(user, item) positions and the log row each comes from; `observed` = 0 marks sampled negatives, whose row is
  that of the log row they were drawn for (its context)."""

  user: np.ndarray  # int64 positions in the users table
  item: np.ndarray  # int64 positions in the items table
  row: np.ndarray  # int64 log rows
  observed: np.ndarray  # float32

  def __len__(self) -> int:
    return int(self.user.shape[0])

  def take(self, idx: np.ndarray) -> 'Examples':
    return Examples(self.user[idx], self.item[idx], self.row[idx], self.observed[idx])

  @staticmethod
  def concat(parts: list['Examples']) -> 'Examples':
    return Examples(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Examples)))


def with_negatives(pos: Examples, sampler: NegativeSampler, k: int, rng: np.random.Generator) -> Examples:
  """The positives followed by k sampled negatives per positive."""
  if k == 0:
    return pos
  neg_items = sampler.sample(pos.user, k, rng).reshape(-1)
  neg_users = np.repeat(pos.user, k)
  n = neg_users.shape[0]
  return Examples.concat([pos, Examples(neg_users, neg_items, np.repeat(pos.row, k), np.zeros(n, np.float32))])


def to_batch(ex: Examples, encoder: FeatureEncoder, labels: Labels, valid: np.ndarray | None = None) -> Batch:
  batch = encoder.gather(ex.user, ex.item, ex.row)
  batch['labels'], batch['defined'] = labels(ex)
  batch['observed'] = ex.observed.astype(np.float32)
  batch['valid'] = np.ones(len(ex), np.float32) if valid is None else valid.astype(np.float32)
  if labels.item_logq is not None:
    batch['item_key'] = ex.item.astype(np.int32)
    batch['logq'] = labels.item_logq[ex.item].astype(np.float32)
  return batch


def item_logq(specs: tuple[TaskSpec, ...], train_counts: np.ndarray, negatives: np.ndarray | None = None,
              num_negatives: int = 0) -> np.ndarray | None:
  """log q(item) per item position, for retrieval tasks (None without one): q is the item's share of the training
  rows (at least 1 row), the in-batch candidates' distribution. With `negatives='mixed'` tasks the candidates are a
  mixture, one observed row to `num_negatives` sampled rows drawn from `negatives` (the sampler's item
  probabilities), and log q is the mixture's: log((q + num_negatives * q_neg) / (1 + num_negatives))."""
  retrieval = [s for s in specs if s.kind == 'retrieval']
  if not retrieval:
    return None
  counts = np.maximum(np.asarray(train_counts, np.float64), 1.0)
  q = counts / counts.sum()
  if any(s.negatives == 'mixed' for s in retrieval):
    if negatives is None:
      raise ValueError("a retrieval task with negatives='mixed' needs the negative sampler's item probabilities")
    q = (q + num_negatives * negatives) / (1 + num_negatives)
  return np.log(q).astype(np.float32)


class TrainStream:
  """Epochs of shuffled global batches; negatives are resampled every epoch; the last partial batch is dropped."""

  def __init__(self, positives: Examples, encoder: FeatureEncoder, sampler: NegativeSampler, num_negatives: int,
               batch_size: int, labels: Labels, seed: int, dropout: dict[str, float] | None = None):
    self.positives = positives
    # {feature: share of rows that see it missing} (config.features.<name>.dropout), fixed per (seed, epoch, step)
    self.dropout = {n: p for n, p in (dropout or {}).items() if p > 0}
    self.encoder = encoder
    self.sampler = sampler
    self.num_negatives = num_negatives
    self.batch_size = batch_size
    self.labels = labels
    self.seed = seed
    self.rows_per_epoch = len(positives) * (1 + num_negatives)
    self.steps_per_epoch = self.rows_per_epoch // batch_size
    if self.steps_per_epoch == 0:
      raise errors.ConfigError(f'train.batch_size={batch_size} is larger than an epoch ({self.rows_per_epoch} rows); '
                               'lower --config.train.batch_size')

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """Batches `start_step`.. of `epoch` (0-based), identical whenever they are regenerated."""
    rng = np.random.default_rng([self.seed, 2, epoch])
    ex = with_negatives(self.positives, self.sampler, self.num_negatives, rng)
    order = rng.permutation(len(ex))
    for step in range(start_step, self.steps_per_epoch):
      idx = order[step * self.batch_size:(step + 1) * self.batch_size]
      batch = to_batch(ex.take(idx), self.encoder, self.labels)
      if self.dropout:
        drop_features(batch, self.encoder, self.dropout, np.random.default_rng([self.seed, 13, epoch, step]))
      yield batch


def drop_features(batch: Batch, encoder: FeatureEncoder, dropout: dict[str, float], rng: np.random.Generator) -> None:
  """Feature dropout: each feature of `dropout` ({name: share}) is set missing on that share of the batch's rows."""
  for name, p in dropout.items():
    spec = encoder.spec(name)
    values = batch[spec.entity][name]  # a copy: gathered by fancy indexing
    values[rng.random(values.shape[0]) < p] = encoding.missing(spec.encoding)


class StreamedTrain:
  """Epochs of training batches read from the log's Parquet files as a stream (data.reader='stream'; see
  mtl_rec.data.stream for the order). Unlike TrainStream, each process builds only its own rows of the global batch
  (`local`), and `epoch()` returns a resumable `grain.DatasetIterator` whose state the checkpoint carries."""

  local = True

  def __init__(self, plan: stream_lib.Plan, decode: stream_lib.Decode, columns: list[str], encoder: FeatureEncoder,
               specs: tuple[TaskSpec, ...], sampler: NegativeSampler, num_negatives: int, seed: int,
               shards: list[int], read_options: Any, dropout: dict[str, float] | None = None,
               logq: np.ndarray | None = None):
    self.plan, self.decode, self.columns, self.encoder = plan, decode, columns, encoder
    self.specs, self.sampler, self.num_negatives, self.seed = specs, sampler, num_negatives, seed
    self.shards, self.read_options = shards, read_options
    self.dropout = {n: p for n, p in (dropout or {}).items() if p > 0}
    self.logq = logq
    self.batch_size = plan.positives_per_shard * plan.num_shards * (1 + num_negatives)  # global rows
    self.steps_per_epoch = plan.steps_per_epoch
    if self.steps_per_epoch == 0:
      raise errors.ConfigError(f'train.batch_size={self.batch_size} is larger than a shard\'s epoch; lower '
                               '--config.train.batch_size or data.stream.num_shards')

  def epoch(self, epoch: int, start_step: int = 0) -> stream_lib.LocalBatches:
    """This process's rows of the global batches `start_step`.. of `epoch` (0-based)."""
    from mtl_rec.data import stream as stream_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
    return stream_lib.LocalBatches(
        [stream_lib.ShardIterator(self.plan, self.decode, self.columns, epoch, s, self.read_options, start_step)
         for s in self.shards], self.to_batch)

  def state_at(self, step: int) -> dict[str, Any]:
    """The reader's state (its epoch() iterator's get_state()) when `step` steps have been trained."""
    from mtl_rec.data import stream as stream_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
    spe = self.steps_per_epoch
    return stream_lib.position_state(self.plan, self.shards, step // spe, step % spe)

  def to_batch(self, chunk: stream_lib.Chunk, epoch: int, shard: int, step: int) -> Batch:
    """A shard's positives, then `num_negatives` sampled items for each (drawn from (seed, epoch, shard, step))."""
    n, k = len(chunk), self.num_negatives
    local_rows = np.arange(n)
    pos = Examples(chunk.user, chunk.item, local_rows, np.ones(n, np.float32))
    ex = with_negatives(pos, self.sampler, k, np.random.default_rng([self.seed, 23, epoch, shard, step]))
    batch = to_batch(ex, self.encoder, Labels(self.specs, chunk.columns, self.logq))
    for name, values in chunk.context.items():  # a negative carries its positive's context
      batch['context'][name] = values[ex.row]
    if self.dropout:
      drop_features(batch, self.encoder, self.dropout, np.random.default_rng([self.seed, 13, epoch, shard, step]))
    return batch


@dataclasses.dataclass
class EvalSet:
  """Held-out observed pairs plus fixed sampled negatives (for click AUC/LogLoss)."""

  examples: Examples

  @classmethod
  def build(cls, positives: Examples, sampler: NegativeSampler, click_negatives: int, seed: int,
            salt: int) -> 'EvalSet':
    rng = np.random.default_rng([seed, 3, salt])
    return cls(with_negatives(positives, sampler, click_negatives, rng))

  def batches(self, encoder: FeatureEncoder, batch_size: int, labels: Labels) -> Iterator[Batch]:
    """Fixed-size batches; the last is padded (valid = 0) so one compiled eval step serves all."""
    n = len(self.examples)
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size)
      valid = idx < n
      yield to_batch(self.examples.take(np.minimum(idx, n - 1)), encoder, labels, valid)
