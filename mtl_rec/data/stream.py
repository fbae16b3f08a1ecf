"""Streaming training input for logs larger than memory: Parquet row groups -> sharded, shuffled, resumable batches.

Reading is Grain's: per shard and epoch a `grain.MapDataset` over *reading groups* (`interleave` row groups at a
time), read, filtered and encoded in `threads` threads with `prefetch` groups buffered (`to_iter_dataset`), so memory
is bounded by the groups in flight, never by the size of the log. The unit is a row group, not a row: Grain's
`ParquetIterDataset` yields one Python dict per row, which on this 2-core machine is slower than the train step
(`mtl_rec.data_benchmark` measures both).

Order, a pure function of (seed, epoch):
- the log's row groups are dealt to `num_shards` logical shards: row group g belongs to shard g % num_shards;
- shard s's epoch e is its row groups in an order drawn from (seed, e, s), read `interleave` at a time; each reading
  group's training rows are permuted together (seed, e, s, group), which mixes rows of different files and times;
- batch b of shard s is rows [b n, (b+1) n) of that sequence (n = positives per shard batch), with `num_negatives`
  sampled items per positive drawn from (seed, e, s, b); the global batch is the shards' batches b in shard order.
So 1 process with S shards and P processes with S / P shards each build the same global batches, and together the
processes read every row group once per epoch. An epoch has min over shards of floor(training rows / n) steps (the
tail of the longer shards is dropped, like the last partial batch of the in-memory stream).

Resume: an iterator's position is (epoch, batch); it is a `grain.DatasetIterator`, saved with the model by Grain's
Orbax handler (`grain.checkpoint.CheckpointSave` in the checkpoint's Composite). Restoring seeks to the reading group
holding the next row from the per-row-group counts: nothing consumed before is read again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Any, Callable, Sequence

import grain
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtl_rec.data import readers
from mtl_rec.data.types import Origin, where
from mtl_rec import errors
from mtl_rec.errors import DataError
from mtl_rec.tasks import LabelColumn

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class RowGroups:
  """The log's Parquet row groups in file order, from the files' metadata (nothing else is read)."""

  paths: tuple[str, ...]
  file: np.ndarray  # [G] index into paths
  group: np.ndarray  # [G] row group within its file
  rows: np.ndarray  # [G] rows
  start: np.ndarray  # [G] global row id of its first row (rows are numbered in file order)
  # per file, what errors name: the user's CSV file a Parquet copy was converted from and the line of its first
  # row (2: after the header), or the Parquet file itself (no lines); () = the files themselves
  sources: tuple[tuple[str, int | None], ...] = ()
  schemas: tuple[pa.Schema, ...] = ()  # per file, its arrow schema (from the footer `of` reads)

  @classmethod
  def of(cls, paths: Sequence[str], sources: Sequence[str] = ()) -> 'RowGroups':
    """The row groups of Parquet files `paths`; `sources`: the file each one was converted from, if any (a CSV
    file, which errors then name with its lines), else the path itself."""
    shown = tuple((src, 2) if src != path else (path, None) for src, path in zip(sources, paths))
    file, group, rows, schemas = [], [], [], []
    for f, path in enumerate(paths):
      try:
        meta = pq.ParquetFile(path).metadata
        schemas.append(meta.schema.to_arrow_schema())
      except (pa.ArrowException, OSError) as e:
        raise DataError(f'interaction log: {path} is not a readable Parquet file ({e}); it may be truncated or '
                        'corrupt: write it again') from e
      for g in range(meta.num_row_groups):
        file.append(f)
        group.append(g)
        rows.append(meta.row_group(g).num_rows)
    rows = np.asarray(rows, np.int64)
    start = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if rows.size else rows
    return cls(tuple(paths), np.asarray(file, np.int64), np.asarray(group, np.int64), rows, start, shown,
               tuple(schemas))

  def check_types(self, columns: Sequence[str]) -> None:
    """A DataError naming the files if they hold values of different kinds in one of `columns`."""
    shown = [src for src, _ in self.sources] if self.sources else list(self.paths)
    readers.check_same_types(shown, self.schemas, columns, 'interaction log')

  def __len__(self) -> int:
    return int(self.rows.size)

  @property
  def num_rows(self) -> int:
    return int(self.rows.sum())

  def read(self, g: int, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Row group g's `columns` as numpy columns (readers.to_numpy), and '_row': the rows' global ids."""
    path = self.paths[int(self.file[g])]
    parquet = pq.ParquetFile(path)
    readers.require_columns(path, parquet.schema_arrow.names, columns, 'interaction log')
    table = parquet.read_row_group(int(self.group[g]), columns=list(columns))
    out = {name: readers.to_numpy(self._as_read(table.column(name), name), name, 'interaction log')
           for name in columns}
    out['_row'] = np.arange(self.start[g], self.start[g] + self.rows[g], dtype=np.int64)
    return out

  def _as_read(self, col: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """A column of one file as the in-memory reader reads it from all files concatenated: in their common type
    (readers.common_type; a file where it is empty throughout holds nulls of no type)."""
    want = _common_type(tuple(s.field(name).type for s in self.schemas if name in s.names))
    return col if col.type == want else col.cast(want)

  def origins(self, g: int) -> tuple[Origin, ...]:
    """Where the rows of row group g come from (its file, and its offset in it), for error messages."""
    offset = int(self.start[g] - self.start[self.file == self.file[g]].min())
    path, first_line = self.sources[int(self.file[g])] if self.sources else (self.paths[int(self.file[g])], None)
    return (Origin(path, -offset, offset + int(self.rows[g]), first_line),)

  def of_row(self, row: int) -> int:
    """The row group holding global row id `row`."""
    return int(np.searchsorted(self.start, row, side='right') - 1)

  def where(self, g: int, i: int) -> str:
    """'FILE, row R' of row i of row group g (what an error message names)."""
    return where(self.origins(g), i)

  def fingerprint(self) -> list[Any]:
    """What identifies the log's rows (files, row groups and their sizes): a cache made for another log is not
    reused."""
    return [list(self.paths), self.rows.tolist(), [os.path.getsize(p) for p in self.paths]]


@functools.lru_cache(maxsize=256)
def _common_type(types: tuple[pa.DataType, ...]) -> pa.DataType:
  return readers.common_type(types)


def parquet_log(paths: Sequence[str], fmt: str, delimiter: str, columns: dict[str, str], directory: str,
                row_group_size: int = 1 << 20) -> list[str]:
  """The log's files as Parquet: CSV files are converted once, block by block, into `directory` (reused while the
  CSV file keeps its size and modification time and the config reads the same columns; an earlier copy of the same
  file is removed when it is converted again). Multi-process jobs call it on the lead process first
  (distributed.lead_first): two processes must not write one copy."""
  out = []
  for k, path in enumerate(paths):
    if readers.file_format(path, fmt) == 'parquet':
      out.append(path)
      continue
    st = os.stat(path)
    # the columns are in the name too: a config that reads another column converts again
    wanted = hashlib.sha1(json.dumps(sorted(columns.items())).encode()).hexdigest()[:8]
    prefix = f'{k:04d}-{os.path.basename(path)}-'
    # size and modification time in ns: a same-size edit within the same second is a new file too
    target = os.path.join(directory, f'{prefix}{st.st_size}-{st.st_mtime_ns}-{wanted}.parquet')
    if not os.path.exists(target):
      log.info('interaction log: converting %s to Parquet, once: %s', path, target)
      readers.csv_to_parquet(path, target, delimiter, columns, 'interaction log', row_group_size)
      for old in os.listdir(directory):  # copies of an earlier version of the file, or of other columns
        if old.startswith(prefix) and old.endswith('.parquet') and old != os.path.basename(target):
          os.remove(os.path.join(directory, old))
    out.append(target)
  return out


class IdIndex:
  """Raw ids -> positions in a table of distinct ids (-1 where an id is not in it)."""

  def __init__(self, ids: np.ndarray):
    ids = np.asarray(ids)
    self.size = int(ids.size)
    self.dense = None
    if ids.dtype.kind in 'iu' and ids.size and ids.min() >= 0 and ids.max() < max(4 * ids.size, 1 << 20):
      self.dense = np.full(int(ids.max()) + 1, -1, np.int64)  # small non-negative integer ids: one gather
      self.dense[ids] = np.arange(ids.size)
    else:
      self.order = np.argsort(ids, kind='stable')
      self.sorted = ids[self.order]

  def __call__(self, raw: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw)
    if self.dense is not None:
      if raw.dtype.kind not in 'iu':
        return np.full(raw.shape, -1, np.int64) if raw.dtype.kind == 'U' else self(raw.astype(np.int64))
      ok = (raw >= 0) & (raw < self.dense.size)
      return np.where(ok, self.dense[np.where(ok, raw, 0)], -1)
    if self.sorted.dtype.kind == 'U' and raw.dtype.kind != 'U':
      raw = raw.astype(np.str_)
    elif self.sorted.dtype.kind != 'U' and raw.dtype.kind == 'U':
      return np.full(raw.shape, -1, np.int64)
    pos = np.minimum(np.searchsorted(self.sorted, raw), max(self.size - 1, 0))
    found = self.sorted[pos] == raw if self.size else np.zeros(raw.shape, bool)
    return np.where(found, self.order[pos] if self.size else -1, -1).astype(np.int64)


@dataclasses.dataclass
class Chunk:
  """Encoded training rows of a reading group: positions, global row ids, label columns and context features."""

  user: np.ndarray  # int64 positions in the users table
  item: np.ndarray  # int64 positions in the items table
  row: np.ndarray  # int64 global row ids
  columns: dict[str, Any]  # {task: LabelColumn} over these rows
  context: dict[str, np.ndarray]  # {feature: encoded values} over these rows

  def __len__(self) -> int:
    return int(self.user.shape[0])

  def take(self, idx: np.ndarray) -> 'Chunk':
    return Chunk(self.user[idx], self.item[idx], self.row[idx],
                 {k: LabelColumn(c.values[idx], c.present[idx]) for k, c in self.columns.items()},
                 {k: v[idx] for k, v in self.context.items()})

  @staticmethod
  def concat(parts: list['Chunk']) -> 'Chunk':
    first = parts[0]
    cat = lambda f: np.concatenate([f(p) for p in parts])
    return Chunk(cat(lambda p: p.user), cat(lambda p: p.item), cat(lambda p: p.row),
                 {k: LabelColumn(cat(lambda p: p.columns[k].values), cat(lambda p: p.columns[k].present))
                  for k in first.columns},
                 {k: cat(lambda p: p.context[k]) for k in first.context})


# (row group's columns) -> Chunk of its training rows; built by the caller, which knows the split and the features
Decode = Callable[[dict[str, np.ndarray]], Chunk]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which rows each shard reads, in which order, and how many steps an epoch has (see the module docstring)."""

  groups: RowGroups
  train_rows: np.ndarray  # [G] training rows of each row group (after the split's filter)
  num_shards: int
  interleave: int
  positives_per_shard: int  # n: positives in a shard's batch
  seed: int

  def __post_init__(self):
    if self.num_shards > len(self.groups):
      raise DataError(f'the log has {len(self.groups)} Parquet row groups, fewer than data.stream.num_shards='
                      f'{self.num_shards}: write the log with smaller row groups (pyarrow: row_group_size=) or '
                      'lower the shard count')

  def shard_groups(self, shard: int) -> np.ndarray:
    return np.arange(len(self.groups))[shard::self.num_shards]

  @property
  def steps_per_epoch(self) -> int:
    return int(min(self.train_rows[self.shard_groups(s)].sum() for s in range(self.num_shards))
               // self.positives_per_shard)

  def reading_groups(self, epoch: int, shard: int) -> list[np.ndarray]:
    """Shard `shard`'s row groups for `epoch`, in reading order, `interleave` at a time."""
    order = np.random.default_rng([self.seed, 21, epoch, shard]).permutation(self.shard_groups(shard))
    return [order[i:i + self.interleave] for i in range(0, order.size, self.interleave)]


class ShardIterator(grain.DatasetIterator):
  """Shard batches of positives (Chunks of n rows) from `start_batch` of an epoch; its state is (epoch, batch)."""

  def __init__(self, plan: Plan, decode: Decode, columns: Sequence[str], epoch: int, shard: int,
               read_options: grain.ReadOptions, start_batch: int = 0):
    super().__init__()
    self.plan, self.decode, self.columns = plan, decode, list(columns)
    self.epoch, self.shard, self.read_options = epoch, shard, read_options
    self.reading = plan.reading_groups(epoch, shard)
    sizes = np.asarray([plan.train_rows[g].sum() for g in self.reading], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # first row of each reading group
    self._seek(start_batch)

  def _read(self, k: int) -> Chunk:
    """Reading group k: its row groups read and decoded, training rows permuted together (seed, epoch, shard, k)."""
    chunk = Chunk.concat([self.decode(self.plan.groups.read(int(g), self.columns)) for g in self.reading[k]])
    expected = self.offsets[k + 1] - self.offsets[k]
    if len(chunk) != expected:
      raise DataError(f'row groups {list(self.reading[k])} of the log hold {len(chunk)} training rows, not the '
                      f'{expected} counted when the run started: the files changed under a running job; restart '
                      'it in a new workdir')
    perm = np.random.default_rng([self.plan.seed, 22, self.epoch, self.shard, k]).permutation(len(chunk))
    return chunk.take(perm)

  def _seek(self, batch: int) -> None:
    self.batch = batch
    row = batch * self.plan.positives_per_shard
    k = int(np.searchsorted(self.offsets, row, side='right') - 1)
    k = min(k, max(len(self.reading) - 1, 0))
    ds = grain.MapDataset.source(list(range(len(self.reading))))[k:].map(self._read)
    self._groups = iter(ds.to_iter_dataset(self.read_options))
    self._buffer: list[Chunk] = []
    self._buffer_start = int(self.offsets[k])  # row of the epoch sequence where the buffer starts

  def __next__(self) -> Chunk:
    n = self.plan.positives_per_shard
    if self.batch >= self.plan.steps_per_epoch:
      raise StopIteration
    lo, hi = self.batch * n, (self.batch + 1) * n
    while self._buffer_start + sum(len(c) for c in self._buffer) < hi:
      self._buffer.append(next(self._groups))
    parts, start = [], self._buffer_start  # the rows [lo, hi) of each buffered group (two at a group boundary)
    for chunk in self._buffer:
      a, b = max(lo - start, 0), min(hi - start, len(chunk))
      if a < b:
        parts.append(chunk.take(np.arange(a, b)))
      start += len(chunk)
    out = parts[0] if len(parts) == 1 else Chunk.concat(parts)
    # drop the reading groups wholly consumed
    while self._buffer and self._buffer_start + len(self._buffer[0]) <= hi:
      self._buffer_start += len(self._buffer.pop(0))
    self.batch += 1
    return out

  def get_state(self) -> dict[str, Any]:
    return {'epoch': int(self.epoch), 'shard': int(self.shard), 'batch': int(self.batch)}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state['shard']) != self.shard:
      raise ValueError(f'input state {state} is not of shard {self.shard}')
    if int(state['epoch']) != self.epoch:
      self.__init__(self.plan, self.decode, self.columns, int(state['epoch']), self.shard, self.read_options,
                    int(state['batch']))
    else:
      self._seek(int(state['batch']))


class LocalBatches(grain.DatasetIterator):
  """This process's rows of each global batch: its shards' batches b, concatenated in shard order, as model batches.

  Its state, saved with the model, is {'epoch', 'batch', 'num_shards', 'shards'}.
  """

  def __init__(self, shards: list[ShardIterator], to_batch: Callable[[Chunk, int, int, int], dict[str, Any]]):
    super().__init__()
    self.shards, self.to_batch = shards, to_batch

  def __next__(self) -> dict[str, Any]:
    parts = [self.to_batch(next(it), it.epoch, it.shard, it.batch - 1) for it in self.shards]
    return parts[0] if len(parts) == 1 else _concat_batches(parts)

  @property
  def epoch(self) -> int:
    return self.shards[0].epoch

  @property
  def batch(self) -> int:
    return self.shards[0].batch

  def get_state(self) -> dict[str, Any]:
    return position_state(self.shards[0].plan, [it.shard for it in self.shards], self.epoch, self.batch)

  def set_state(self, state: dict[str, Any]) -> None:
    if state['num_shards'] != self.shards[0].plan.num_shards or state['shards'] != [it.shard for it in self.shards]:
      raise errors.Error(f"the checkpoint's input state {state} was written with another shard layout than this run's "
                         f'(num_shards={self.shards[0].plan.num_shards}, shards {[it.shard for it in self.shards]}); '
                         'resume with the same data.stream.num_shards and process count')
    for it in self.shards:
      it.set_state({'epoch': state['epoch'], 'shard': it.shard, 'batch': state['batch']})


def position_state(plan: Plan, shards: list[int], epoch: int, batch: int) -> dict[str, Any]:
  """The state of the LocalBatches over `shards` that gives batch `batch` of `epoch` next (what the checkpoint
  saves)."""
  return {'epoch': int(epoch), 'batch': int(batch), 'num_shards': plan.num_shards, 'shards': list(shards)}


def _concat_batches(parts: list[Any]) -> Any:
  if isinstance(parts[0], dict):
    return {k: _concat_batches([p[k] for p in parts]) for k in parts[0]}
  return np.concatenate(parts)


def owned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
  """The logical shards a process reads: a contiguous block, so its batch rows are a contiguous block too."""
  if num_shards % process_count:
    raise DataError(f'data.stream.num_shards={num_shards} is not a multiple of the {process_count} processes; '
                    'set it to a multiple (0 = one shard per process)')
  per = num_shards // process_count
  return list(range(process_index * per, (process_index + 1) * per))


class Snapshot(grain.DatasetIterator):
  """A frozen iterator state, for saving: the checkpoint gets the position at the save, whenever it is written."""

  def __init__(self, state: dict[str, Any]):
    super().__init__()
    self.state = dict(state)

  def __next__(self):
    raise StopIteration

  def get_state(self) -> dict[str, Any]:
    return dict(self.state)

  def set_state(self, state: dict[str, Any]) -> None:
    self.state = dict(state)


def cached(path: str, key: str, compute: Callable[[], dict[str, np.ndarray]],
           what: str = '') -> dict[str, np.ndarray]:
  """compute(), saved to `path` (.npz) with `key`; read from there instead while the key matches. Arrays of Python
  objects (list columns) are not saved: npz holds them only pickled."""
  if os.path.exists(path):
    with np.load(path) as z:
      if 'key' in z.files and str(z['key']) == key:
        log.info('%s: reused %s', what or 'cache', path)
        return {k: z[k] for k in z.files if k != 'key'}
  out = compute()
  if all(v.dtype != object for v in out.values()):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}.npz'
    np.savez(tmp, key=np.asarray(key), **out)
    os.replace(tmp, path)
  return out


Codes = Callable[[dict[str, np.ndarray], int], np.ndarray]  # (row group's columns, g) -> int8 split code per row


def survey(groups: RowGroups, columns: Sequence[str], codes: Codes, id_columns: Sequence[str], path: str,
           key: str, ranges: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """One streaming pass over the log in bounded memory (pyarrow value counts merged every 8 row groups):
  'group_counts' [G, 3]: each row group's rows per split code (0 train, 1 valid, 2 test), and for each id column c
  its distinct values, sorted ('<c>_values'), with their rows per split code ('<c>_counts' [n, 3]); for each
  number column c of `ranges`, '<c>_range': its smallest and largest value over every row (NaN, NaN if none).

  Written to `path` (.npz) with `key` (what it was computed from) and read from there when the key matches: a
  resumed or repeated run does not read the log again."""
  return cached(path, key, lambda: _survey(groups, columns, codes, id_columns, ranges), 'survey pass')


def _survey(groups: RowGroups, columns: Sequence[str], codes: Codes,
            id_columns: Sequence[str], ranges: Sequence[str] = ()) -> dict[str, np.ndarray]:
  log.info('survey pass: reading %d row groups', len(groups))
  group_counts = np.zeros((len(groups), 3), np.int64)
  counts: dict[str, list[pa.Table]] = {c: [] for c in id_columns}
  bounds = {c: [np.inf, -np.inf] for c in ranges}

  def merge(tables: list[pa.Table]) -> list[pa.Table]:
    return [pa.concat_tables(tables, promote_options='permissive').group_by(['values', 'code'])
            .aggregate([('counts', 'sum')]).rename_columns(['values', 'code', 'counts'])]

  for g in range(len(groups)):
    cols = groups.read(g, columns)
    code = codes(cols, g)
    group_counts[g] = np.bincount(code, minlength=3)
    for name, b in bounds.items():  # numbers (`codes` checked them), NaN where missing
      x = readers.numeric(cols[name], name, (), 'interaction log', 'a label')
      x = x[np.isfinite(x)]
      if x.size:
        b[0], b[1] = min(b[0], float(x.min())), max(b[1], float(x.max()))
    for name in counts:
      for k in range(3):
        vc = pc.value_counts(pa.array(cols[name][code == k]))
        counts[name].append(pa.table({'values': vc.field('values'), 'code': pa.array(np.full(len(vc), k, np.int8)),
                                      'counts': vc.field('counts')}))
      if len(counts[name]) >= 24:  # bounded memory: merge every few row groups
        counts[name] = merge(counts[name])
  out: dict[str, np.ndarray] = {'group_counts': group_counts}
  for name, (lo, hi) in bounds.items():
    out[f'{name}_range'] = np.asarray([lo, hi] if lo <= hi else [np.nan, np.nan], np.float64)
  for name, tables in counts.items():
    t = merge(tables)[0]
    values = t.column('values').to_numpy(zero_copy_only=False)
    values = values.astype(np.str_) if values.dtype == object else values
    distinct, inverse = np.unique(values, return_inverse=True)
    table = np.zeros((distinct.size, 3), np.int64)
    np.add.at(table, (inverse, t.column('code').to_numpy().astype(np.int64)), t.column('counts').to_numpy())
    out[f'{name}_values'], out[f'{name}_counts'] = distinct, table
  return out


def collect(groups: RowGroups, columns: Sequence[str], select: Callable[[dict[str, np.ndarray], int], np.ndarray],
            path: str, key: str) -> dict[str, np.ndarray]:
  """The rows where `select(columns, g)` holds, their `columns` and '_row' (global row ids, ascending): one pass,
  memory bounded by the rows selected. Cached in `path` with `key` like `survey` (unless a column holds lists)."""
  def compute() -> dict[str, np.ndarray]:
    log.info('sample pass: reading %d row groups', len(groups))
    parts = []
    for g in range(len(groups)):
      cols = groups.read(g, columns)
      mask = select(cols, g)
      parts.append({c: v[mask] for c, v in cols.items()})
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
  return cached(path, key, compute, 'sample pass')
