"""Trains the synthetic config at scale for a bounded number of steps and reports memory and throughput.

  python -m mtl_rec.scale_benchmark --out=scale.json                    # 2M users x 2M items, 64-dim, mesh (2, 4)
  python -m mtl_rec.scale_benchmark --out=s.json --num_users=200000 --num_items=200000 --steps=5

On CPU it simulates `--devices` devices (8 by default). The embedding tables cover every user and item id (rows
padded to a multiple of the model axis) and are row-sharded over `model`, so the JSON's `table_bytes_per_device`
should be about `table_bytes_total / model axis` (plus the small replicated tables).

The network, features and tasks are --config's (default configs/synthetic.py). The batches are built directly, not by
`experiment.build`: generating the synthetic ratings is quick at this size,
but the full pipeline (splits, vocabularies fitted on the training split, negative-sampling tables, eval sets) takes
minutes and its vocabularies would only cover the ids that happen to be rated. Here the side features come from
`mtl_rec.data.synthetic`, the id vocabularies are all users and items, and each batch is rated pairs drawn from the
synthetic ratings plus `sampling.num_negatives` uniform negatives per pair — the same rows the pipeline would feed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mtl_rec import config as config_lib
from mtl_rec import features as features_lib
from mtl_rec import input_pipeline
from mtl_rec import sharding as sharding_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec import trainer as trainer_lib
from mtl_rec.data import loader

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'A synthetic-source config: its declared '
                                          'features, tasks and network, on tables of the sizes below.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON report.', required=True)
_NUM_USERS = flags.DEFINE_integer('num_users', 2_000_000, 'Users (rows of the user id table).')
_NUM_ITEMS = flags.DEFINE_integer('num_items', 2_000_000, 'Items (rows of the item id table).')
_EMBED_DIM = flags.DEFINE_integer('embed_dim', 64, 'Width of every embedding table.')
_INTERACTIONS = flags.DEFINE_integer('interactions_per_user', 2, 'Synthetic ratings per user (batches draw from them).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8192, 'Global batch size (rated pairs plus negatives).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps (after one untimed step).')
_MESH = flags.DEFINE_list('mesh', ['2', '4'], 'Mesh shape (data, model); -1 = the remaining devices.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Simulated CPU devices (ignored if XLA_FLAGS already sets a count '
                                'or the backend is not CPU).')


def build_encoder(ds: Any, config: Any, user_index: np.ndarray, item_index: np.ndarray) -> Any:
  """Features of every user and item; the sharded id vocabularies are all ids, not only the rated ones."""
  enc = features_lib.fit(ds, np.arange(ds.num_rows), config, user_index, item_index)
  ids = {'user': ds.users[ds.user_column], 'item': ds.items[ds.item_column]}
  multiple = config.model.row_multiple
  specs, vocabs, tables = [], dict(enc.vocabs), {'user': dict(enc.user_table), 'item': dict(enc.item_table)}
  for s in enc.specs:
    if s.large and s.encoding['kind'] == 'vocab' and s.encoding['raw_type'] == 'id':
      vocabs[s.name] = features_lib.Vocab(np.sort(ids[s.entity]))
      tables[s.entity][s.name] = vocabs[s.name].lookup(ids[s.entity])
      s = dataclasses.replace(s, vocab_size=-(-vocabs[s.name].size // multiple) * multiple)
    specs.append(s)
  return dataclasses.replace(enc, specs=tuple(specs), vocabs=vocabs, user_table=tables['user'],
                             item_table=tables['item'])


def scale_config(config: Any, num_users: int, num_items: int, embed_dim: int, batch_size: int,
                 mesh_shape: tuple[int, ...], interactions_per_user: int) -> Any:
  """The benchmark's config: `config` (a synthetic-source config with its declared features and tasks, e.g.
  configs/synthetic.py) on tables of the given size."""
  config = config.copy_and_resolve_references()
  if config.data.source != 'synthetic':
    raise ValueError(f"--config's data.source is {config.data.source!r}: the scale benchmark generates its data; "
                     'pass a synthetic config such as configs/synthetic.py')
  config.data.synthetic.num_users = num_users
  config.data.synthetic.num_items = num_items
  config.data.synthetic.interactions_per_user = interactions_per_user
  config.model.embed_dim = embed_dim
  config.train.batch_size = batch_size
  config.mesh.shape = tuple(mesh_shape)
  config_lib.validate(config)
  return config


def make_batches(ds: Any, encoder: Any, labels: Any, user_index: np.ndarray, item_index: np.ndarray, config: Any,
                 count: int) -> list[dict[str, Any]]:
  """`count` global batches: log rows (positions in the side tables) plus uniform negatives."""
  rng = np.random.default_rng(config.seed)
  k = config.sampling.num_negatives
  bs = config.train.batch_size
  n_pos = bs // (1 + k)
  num_items = len(ds.items[ds.item_column])
  out = []
  for _ in range(count):
    rows = rng.integers(0, ds.num_rows, n_pos)
    pos = input_pipeline.Examples(user_index[rows], item_index[rows], rows, np.ones(n_pos, np.float32))
    n_neg = bs - n_pos
    neg = input_pipeline.Examples(np.resize(np.repeat(pos.user, k), n_neg), rng.integers(0, num_items, n_neg),
                                  np.resize(np.repeat(rows, k), n_neg), np.zeros(n_neg, np.float32))
    out.append(input_pipeline.to_batch(input_pipeline.Examples.concat([pos, neg]), encoder, labels))
  return out


def run(config: Any, num_users: int, num_items: int, embed_dim: int, batch_size: int, steps: int,
        mesh_shape: tuple[int, ...], interactions_per_user: int = 2) -> dict[str, Any]:
  """Builds the data, the sharded model and optimizer, runs `steps` timed steps; returns the report."""

  t_start = time.time()
  config = scale_config(config, num_users, num_items, embed_dim, batch_size, mesh_shape, interactions_per_user)

  t = time.time()
  ds = loader.load_data(config)
  # Raw synthetic ids are 1..N in table order, so positions are id - 1.
  user_index, item_index = ds.log[ds.user_column] - 1, ds.log[ds.item_column] - 1
  columns = tasks_lib.label_columns(config, ds)
  specs = tasks_lib.task_specs(config, columns, np.arange(ds.num_rows))
  encoder = build_encoder(ds, config, user_index, item_index)
  batches = make_batches(ds, encoder, input_pipeline.Labels(specs, columns), user_index, item_index, config,
                         min(steps + 1, 4))
  data_sec = time.time() - t
  print(f'data: {ds.num_rows:,} synthetic log rows, {num_users:,} users, {num_items:,} items '
        f'({data_sec:.1f}s)', flush=True)

  t = time.time()
  trainer = trainer_lib.make_trainer(config, encoder.specs, specs, total_steps=steps + 1)
  state = trainer.init_state
  jax.block_until_ready(state)
  init_sec = time.time() - t

  t = time.time()
  report = trainer_lib.memory_report(trainer, state, batches[0])
  compile_sec = time.time() - t
  model = trainer.mesh.shape['model']
  tables = state['params']['embeddings']['tables']
  table_per_device = sharding_lib.bytes_per_device(tables)
  large = [s.name for s in encoder.specs if s.large]
  large_total = sum(int(tables[n].nbytes) for n in large)
  small_total = sum(int(x.nbytes) for n, x in tables.items() if n not in large)
  opt_per_device = report['opt_state_bytes_per_device']
  params_per_device = report['params_bytes_per_device']
  print(f'mesh {dict(trainer.mesh.shape)}: tables {large_total + small_total:,} B in all, '
        f'{max(table_per_device.values()):,} B per device (id tables / {model} + small tables = '
        f'{large_total // model + small_total:,} B); params {max(params_per_device.values()):,} B, '
        f'optimizer state {max(opt_per_device.values()):,} B per device', flush=True)

  # One untimed step (placement of the first batch), then `steps` timed ones; each waits for its result so the
  # times are per step.
  state, m = trainer.train_step(state, sharding_lib.global_batch(batches[0], trainer.batch_sharding))
  jax.block_until_ready(m)
  times, losses = [], []
  for i in range(steps):
    batch = sharding_lib.global_batch(batches[(i + 1) % len(batches)], trainer.batch_sharding)
    t = time.time()
    state, m = trainer.train_step(state, batch)
    losses.append(float(m['loss']))
    times.append(time.time() - t)
  total_time = sum(times)
  result = {
      'num_users': num_users, 'num_items': num_items, 'embed_dim': embed_dim, 'batch_size': batch_size,
      'steps': steps, 'devices': len(jax.devices()), 'platform': jax.devices()[0].platform,
      'mesh': dict(trainer.mesh.shape),
      'table_rows': {n: int(tables[n].shape[0]) for n in large},
      'table_bytes_total': large_total + small_total,
      'id_table_bytes_total': large_total,
      'table_bytes_per_device': table_per_device,
      'table_bytes_per_device_max': max(table_per_device.values()),
      'table_bytes_per_device_expected': large_total // model + small_total,
      'params_bytes_total': int(sum(x.nbytes for x in jax.tree.leaves(state['params']))),
      'params_bytes_per_device_max': max(params_per_device.values()),
      'opt_state_bytes_total': int(sum(x.nbytes for x in jax.tree.leaves(state['opt_state']))),
      'opt_state_bytes_per_device': opt_per_device,
      'opt_state_bytes_per_device_max': max(opt_per_device.values()),
      'step_memory_analysis': {k[len('step_'):]: v for k, v in report.items() if k.startswith('step_')},
      'examples_per_sec': steps * batch_size / total_time,
      'step_time_sec': {'mean': total_time / steps, 'median': statistics.median(times), 'min': min(times),
                        'max': max(times)},
      'losses': losses,
      'data_sec': data_sec, 'init_sec': init_sec, 'compile_sec': compile_sec, 'wall_sec': time.time() - t_start,
      'data_note': 'batches built directly from synthetic ratings + uniform negatives (not experiment.build)',
  }
  if not np.all(np.isfinite(losses)):
    raise RuntimeError(f'non-finite losses at scale: {losses}')
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    jax.config.update('jax_num_cpu_devices', _DEVICES.value)  # before any backend exists; only CPU honours it
  result = run(_CONFIG.value, _NUM_USERS.value, _NUM_ITEMS.value, _EMBED_DIM.value, _BATCH_SIZE.value, _STEPS.value,
               tuple(int(s) for s in _MESH.value), _INTERACTIONS.value)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  print(f'{result["examples_per_sec"]:,.0f} examples/s, step {result["step_time_sec"]["median"]:.3f}s (median of '
        f'{result["steps"]}); table bytes per device {result["table_bytes_per_device_max"]:,} of '
        f'{result["table_bytes_total"]:,} in all; optimizer state per device '
        f'{result["opt_state_bytes_per_device_max"]:,}; written to {_OUT.value}', flush=True)


if __name__ == '__main__':
  app.run(main)
