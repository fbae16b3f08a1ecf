"""The streaming input pipeline at scale: a synthetic Parquet log of N interactions, trained on for an epoch through
the streaming reader, with the memory it takes and how fast the input runs against the train step.

  python -m mtl_rec.data_benchmark --rows=100000000 --out=data.json    # ~100M rows, several GB of Parquet
  python -m mtl_rec.data_benchmark --rows=2000000 --out=small.json     # a quick look

1. The log: `--rows` interactions of `--num_users` users and `--num_items` items with planted factors (ratings 1-5),
   written in row groups of `--row_group_size` rows, `--rows_per_file` rows a file, under --cache_dir (reused by the
   next run with the same sizes and seed; only the current row group is ever in memory).
2. The experiment, as train.py builds it with data.reader='stream' (experiment.build_streamed), never loading the
   log: a survey pass (the split row by row, --held_out test and as much validation; the user and item vocabularies
   from their training counts) and a sample pass (evaluation users' rows, a fitting sample of training rows); both
   written under --workdir and reused when it is run again.
3. Input alone: `--input_steps` batches from the streaming reader (data.reader='stream': Grain over row groups),
   nothing trained -> `input_examples_per_sec`. Beside it, Grain's row-at-a-time `ParquetIterDataset` for the same
   rows -> `grain_parquet_rows_per_sec` (why the reader works a row group at a time).
4. Training: the train step over the epoch (`--steps` > 0: that many) -> `train_examples_per_sec`, and
   `input_wait_fraction`: the share of the loop's time spent waiting for the next batch.
JSON: rows, peak_rss_bytes, input_examples_per_sec, train_examples_per_sec, input_wait_fraction, and the rest.

The network, tasks and optimizer are --config's (configs/synthetic.py) with the user and item ids as the only
features (the side features of the synthetic source are per user and item, not in the log), the id tables on
row-wise Adagrad (--table_optimizer: what README recommends for tables of millions of rows), one device.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

from mtl_rec import capacity
from mtl_rec import config as config_lib
from mtl_rec import errors
from mtl_rec import experiment as experiment_lib
from mtl_rec import files
from mtl_rec import sharding as sharding_lib
from mtl_rec import trainer as trainer_lib
from mtl_rec.data import fetch
from mtl_rec.data import stream as stream_lib
from mtl_rec.data import synthetic

_CONFIG = errors.define_config_file('config', 'configs/synthetic.py', 'Network, tasks and optimizer.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON report.', required=True)
_ROWS = flags.DEFINE_integer('rows', 100_000_000, 'Interactions in the synthetic log.')
_NUM_USERS = flags.DEFINE_integer('num_users', 1_000_000, 'Users.')
_NUM_ITEMS = flags.DEFINE_integer('num_items', 200_000, 'Items (popularity ~ Zipf).')
_ROW_GROUP = flags.DEFINE_integer('row_group_size', 1_000_000, 'Rows per Parquet row group.')
_ROWS_PER_FILE = flags.DEFINE_integer('rows_per_file', 10_000_000, 'Rows per Parquet file.')
_CACHE_DIR = flags.DEFINE_string('cache_dir', '', "Where the log is written and reused; '' = "
                                 '$MTL_REC_DATA or ~/.cache/mtl_rec, under data_benchmark/.')
_WORKDIR = flags.DEFINE_string('workdir', '', "Where the statistics are written and reused; '' = beside the log.")
_BATCH = flags.DEFINE_integer('batch_size', 16384, 'Global batch (rows: positives and sampled negatives).')
_NEGATIVES = flags.DEFINE_integer('num_negatives', 1, 'Sampled negatives per interaction (for the click task).')
_STEPS = flags.DEFINE_integer('steps', 0, 'Train steps; 0 = one epoch.')
_INPUT_STEPS = flags.DEFINE_integer('input_steps', 2000, 'Batches read for the input-alone measurement (several '
                                   'reading groups: it includes reading and decoding them).')
_THREADS = flags.DEFINE_integer('threads', 2, 'Grain reader threads (data.stream.threads).')
_INTERLEAVE = flags.DEFINE_integer('interleave', 2, 'Row groups read and shuffled together (data.stream.interleave).')
_PREFETCH = flags.DEFINE_integer('prefetch', 2, 'Reading groups buffered ahead (data.stream.prefetch).')
_TABLE_OPTIMIZER = flags.DEFINE_enum('table_optimizer', 'rowwise_adagrad', ['dense', 'rowwise_adagrad', 'lazy_adam'],
                                     "The id tables' optimizer (optimizer.tables.name): row-wise at this size.")
_HELD_OUT = flags.DEFINE_float('held_out', 0.01, 'Share of the rows in the test set, and again in validation.')
_TABLE_LR = flags.DEFINE_float('table_learning_rate', 0.05, "The id tables' learning rate (row-wise optimizers).")


def _cache_root() -> str:
  return _CACHE_DIR.value or str(fetch.default_cache_dir() / 'data_benchmark')


def benchmark_config(config: Any, paths: list[str]) -> Any:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for name in list(config.features):
      if name not in ('user_id', 'item_id'):
        del config.features[name]
  config.data.source = 'files'
  config.data.log.paths = tuple(paths)
  config.data.log.timestamp_column = ''
  config.data.user_table.paths = ()
  config.data.item_table.paths = ()
  config.data.item_table.title_column = ''
  config.data.reader = 'stream'
  # 1% test, 1% validation (row by row); evaluation users: those holding ~2,000 held-out rows (and all their rows)
  config.data.split = 'random'
  config.data.test_fraction = _HELD_OUT.value
  config.data.valid_fraction = _HELD_OUT.value
  config.data.stream.eval_rows = 2000
  config.data.stream.threads = _THREADS.value
  config.data.stream.interleave = _INTERLEAVE.value
  config.data.stream.prefetch = _PREFETCH.value
  config.data.stream.num_shards = 0
  config.sampling.num_negatives = _NEGATIVES.value
  config.train.batch_size = _BATCH.value
  config.mesh.shape = (1, 1)
  config.optimizer.tables.name = _TABLE_OPTIMIZER.value
  if _TABLE_OPTIMIZER.value != 'dense':
    config.optimizer.tables.learning_rate = _TABLE_LR.value
  config_lib.validate(config)
  return config


def grain_rowwise_rate(path: str, seconds: float = 5.0) -> float:
  """Rows per second of Grain's ParquetIterDataset (one dict per row) over one file, read for up to `seconds`."""
  import grain  # pylint: disable=g-import-not-at-top
  it = iter(grain.experimental.ParquetIterDataset(path))
  next(it)
  n, t = 0, time.time()
  for n, _ in enumerate(it, 1):
    if n % 1000 == 0 and time.time() - t > seconds:
      break
  return n / (time.time() - t)


def main(argv):
  with errors.reported():  # a bad config value or data file: one line naming it and the fix
    _main(argv)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  for flag in (_ROWS, _NUM_USERS, _NUM_ITEMS, _ROW_GROUP, _ROWS_PER_FILE, _BATCH, _INPUT_STEPS, _THREADS,
               _INTERLEAVE, _PREFETCH):
    if flag.value <= 0:
      raise app.UsageError(f'--{flag.name}={flag.value}: must be > 0')
  if not 0 < _HELD_OUT.value < 0.5:
    raise app.UsageError(f'--held_out={_HELD_OUT.value}: must be in (0, 0.5): the share held out for test, and again '
                         'for validation')
  t_start = time.time()
  seed = _CONFIG.value.seed
  log_dir = os.path.join(_cache_root(), f'rows{_ROWS.value}_u{_NUM_USERS.value}_i{_NUM_ITEMS.value}_'
                         f'g{_ROW_GROUP.value}_s{seed}')
  t = time.time()
  paths = synthetic.write_log(log_dir, _ROWS.value, _NUM_USERS.value, _NUM_ITEMS.value, seed, _ROW_GROUP.value,
                              _ROWS_PER_FILE.value)
  log_sec = time.time() - t
  disk = sum(os.path.getsize(p) for p in paths)
  config = benchmark_config(_CONFIG.value, paths)
  groups = stream_lib.RowGroups.of(paths)
  print(f'log: {groups.num_rows:,} rows in {len(paths)} files, {len(groups)} row groups, {disk / 2**30:.2f} GiB '
        f'({log_sec:.0f}s)', flush=True)

  # the experiment, never loading the log: survey pass (split, id counts), sample pass (evaluation + fitting rows)
  t = time.time()
  exp = experiment_lib.build(config, workdir=_WORKDIR.value or os.path.join(log_dir, 'run'))
  stats_sec = time.time() - t
  encoder, stream = exp.encoder, exp.stream
  num_users, num_items = exp.num_users, exp.num_items
  print(f'statistics: {num_users:,} users, {num_items:,} items, {exp.counts["train"]:,} training rows; held in '
        f'memory: {exp.counts["sampled"]} ({stats_sec:.0f}s, two passes)', flush=True)
  spe = stream.steps_per_epoch
  steps = min(_STEPS.value or spe, spe)

  # Input alone
  input_steps = min(_INPUT_STEPS.value, spe)
  it = stream.epoch(0)
  next(it)  # the first reading group: pipeline start-up
  t = time.time()
  for _ in range(input_steps - 1):
    next(it)
  input_sec = time.time() - t
  input_rate = (input_steps - 1) * stream.batch_size / input_sec
  del it
  grain_rate = grain_rowwise_rate(paths[0])
  print(f'input alone: {input_rate:,.0f} examples/s ({input_steps - 1} batches of {stream.batch_size:,}); Grain '
        f'ParquetIterDataset row by row: {grain_rate:,.0f} rows/s', flush=True)

  # Training
  trainer = trainer_lib.make_trainer(config, encoder.specs, exp.specs, total_steps=steps)
  state = trainer.init_state
  it = stream.epoch(0)
  first = next(it)
  state, m = trainer.train_step(state, sharding_lib.local_batch(first, trainer.batch_sharding))  # compiles
  jax.block_until_ready(m)
  wait, losses, t0 = 0.0, [], time.time()
  last_print = t0
  for step in range(1, steps):
    t = time.time()
    batch = next(it)
    wait += time.time() - t
    state, m = trainer.train_step(state, sharding_lib.local_batch(batch, trainer.batch_sharding))
    if step % 100 == 0:
      losses.append(float(m['loss']))  # also bounds how far the host runs ahead of the device
      if time.time() - last_print > 30:
        last_print = time.time()
        rate = step * stream.batch_size / (last_print - t0)
        print(f'train: step {step:,} / {steps:,}  {rate:,.0f} examples/s  loss {losses[-1]:.4f}  input wait '
              f'{wait / (last_print - t0):.1%}  peak RSS {capacity.peak_rss_bytes() / 2**30:.2f} GiB', flush=True)
  jax.block_until_ready(state)
  train_sec = time.time() - t0
  train_rate = (steps - 1) * stream.batch_size / train_sec
  result = {
      'rows': groups.num_rows, 'train_rows': exp.counts['train'], 'held_in_memory': exp.counts['sampled'],
      'peak_rss_bytes': capacity.peak_rss_bytes(),
      'input_examples_per_sec': input_rate,
      'train_examples_per_sec': train_rate,
      'input_wait_fraction': wait / train_sec,
      'input_to_train_ratio': input_rate / train_rate,
      'grain_parquet_rows_per_sec': grain_rate,
      'files': len(paths), 'row_groups': len(groups), 'log_bytes_on_disk': disk,
      'num_users': num_users, 'num_items': num_items, 'batch_size': stream.batch_size,
      'vocab_sizes': {k: v.size for k, v in encoder.vocabs.items()},  # rows, the OOV row included
      'num_negatives': config.sampling.num_negatives, 'steps_per_epoch': spe, 'steps': steps,
      'table_optimizer': config.optimizer.tables.name,
      'examples_trained': steps * stream.batch_size, 'epoch_fraction': steps / spe,
      'losses_every_100_steps': losses,
      'stream': config.data.stream.to_dict(), 'devices': len(jax.devices()), 'platform': jax.devices()[0].platform,
      'log_sec': log_sec, 'statistics_sec': stats_sec, 'input_sec': input_sec, 'train_sec': train_sec,
      'wall_sec': time.time() - t_start,
  }
  if not np.all(np.isfinite(losses)):
    raise RuntimeError(f'non-finite losses: {losses}')
  files.write_json(_OUT.value, result)
  print(f'rows {result["rows"]:,}: input {input_rate:,.0f} ex/s, train {train_rate:,.0f} ex/s '
        f'({result["input_to_train_ratio"]:.1f}x), input wait {result["input_wait_fraction"]:.1%}, peak RSS '
        f'{result["peak_rss_bytes"] / 2**30:.2f} GiB; {steps:,} steps in {train_sec:.0f}s -> {_OUT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags)
