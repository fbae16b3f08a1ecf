"""Trains the synthetic config at scale for a bounded number of steps and reports memory and throughput, per table
optimizer, and the capacity plan past this machine.

  python -m mtl_rec.scale_benchmark --out=scale.json       # 2M users x 2M items x 64, mesh (2, 4), dense Adam
  python -m mtl_rec.scale_benchmark --out=s.json --optimizers=dense_adam,rowwise_adagrad,lazy_adam
  python -m mtl_rec.scale_benchmark --out=s.json --optimizers=rowwise_adagrad --num_users=10000000 \
      --num_items=10000000 --steps=100                         # 5 GB of tables on this 24 GB machine
  python -m mtl_rec.scale_benchmark --out=plan.json --plan --calibration=s.json   # 1B x 100M x 64 on 256 devices
  python -m mtl_rec.scale_benchmark --out=s.json --config=configs/synthetic.py:retrieval --optimizers=rowwise_adagrad \
      --num_items=1000000 --export_dir=/tmp/big/export   # and export the trained model (serving a 1M-item catalog)

With several optimizers each runs in its own process (its own peak RSS, its memory returned after), and the same
optimizers run again at --calibration_rows users and items: the capacity plan (capacity.py) takes its constants
from those and its predictions for the main size are compared with what was measured there (`plan_check`).
JSON: `runs[name]` per optimizer (step_seconds_median, examples_per_sec, table_bytes_per_device,
optimizer_state_bytes_per_device, step_temp_bytes, peak_rss_bytes, ...), `comparison` (against dense_adam),
`calibration`, `plan_check`, and with --plan `plan`.

On CPU it simulates `--devices` devices (8 by default). The embedding tables cover every user and item id (rows
padded to a multiple of the model axis) and are row-sharded over `model`, so `table_bytes_per_device` should be
about `table_bytes_total / model axis` (plus the small replicated tables).

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
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

from mtl_rec import capacity
from mtl_rec import config as config_lib
from mtl_rec import errors
from mtl_rec import export as export_lib
from mtl_rec import features as features_lib
from mtl_rec import files
from mtl_rec import input_pipeline
from mtl_rec import metrics as metrics_lib
from mtl_rec import scoring
from mtl_rec import sharding as sharding_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec import trainer as trainer_lib
from mtl_rec.data import loader

_CONFIG = errors.define_config_file('config', 'configs/synthetic.py', 'A synthetic-source config: its declared '
                                          'features, tasks and network, on tables of the sizes below.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON report.', required=True)
_NUM_USERS = flags.DEFINE_integer('num_users', 2_000_000, 'Users (rows of the user id table).', lower_bound=1)
_NUM_ITEMS = flags.DEFINE_integer('num_items', 2_000_000, 'Items (rows of the item id table).', lower_bound=1)
_EMBED_DIM = flags.DEFINE_integer('embed_dim', 64, 'Width of every embedding table.', lower_bound=1)
_INTERACTIONS = flags.DEFINE_integer('interactions_per_user', 2, 'Synthetic ratings per user (batches draw from '
                                     'them).', lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8192, 'Global batch size (rated pairs plus negatives).',
                                   lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps (after one untimed step).', lower_bound=1)
_MESH = flags.DEFINE_list('mesh', ['2', '4'], 'Mesh shape (data, model); -1 = the remaining devices.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Simulated CPU devices (ignored if XLA_FLAGS already sets a count '
                                'or the backend is not CPU).', lower_bound=1)
_OPTIMIZERS = flags.DEFINE_list('optimizers', ['dense_adam'], 'Optimizers of the id tables, each run in turn: '
                                'dense_adam, rowwise_adagrad, lazy_adam (rowwise.py).')
_CALIBRATION_ROWS = flags.DEFINE_integer('calibration_rows', 1_000_000, 'With several optimizers (rowwise_adagrad '
                                         'among them): users and items of the runs that calibrate '
                                         'the capacity plan, checked against the main size; 0 = none.', lower_bound=0)
_EXPORT_DIR = flags.DEFINE_string('export_dir', None, 'With one optimizer: export the trained model to this export '
                                  'root (mtl_rec.export; every synthetic user and item, seen = their ratings), e.g. '
                                  'for `python -m mtl_rec.serving.benchmark --recommend` on a large catalog.')
_PLAN_ONLY = flags.DEFINE_bool('plan', False, 'Also print and write the capacity plan for the --plan_* size.')
_CALIBRATION = flags.DEFINE_string('calibration', None, "With --plan: a previous run's JSON whose calibration "
                                   'to use (no runs then).')
_PLAN_USERS = flags.DEFINE_integer('plan_users', 1_000_000_000, 'Users of the planned configuration.', lower_bound=1)
_PLAN_ITEMS = flags.DEFINE_integer('plan_items', 100_000_000, 'Items of the planned configuration.', lower_bound=1)
_PLAN_MESH = flags.DEFINE_list('plan_mesh', ['8', '32'], 'Mesh (data, model) of the planned configuration.')
_PLAN_BATCH_SIZE = flags.DEFINE_integer('plan_batch_size', 262_144, 'Global batch of the planned configuration.',
                                        lower_bound=1)
_PLAN_DEVICE_GB = flags.DEFINE_float('plan_device_memory_gib', 95.0, 'Memory per device of the planned '
                                     'configuration, GiB (TPU v5p: 95, H100: 80, v5e: 16).')
_PLAN_BANDWIDTH = flags.DEFINE_float('plan_bandwidth_gbps', None, "Memory bandwidth per device of the planned "
                                     "devices, GB/s (H100: 3350, TPU v5p: 2765); default: this machine's, measured.")
_PLAN_SECONDS_PER_EXAMPLE = flags.DEFINE_float('plan_seconds_per_example', None, "The network's seconds per "
                                               "example per planned device; default: this machine's, measured.")

for _flag in ('mesh', 'plan_mesh'):
  flags.register_validator(_flag, lambda v: len(v) == 2 and all(re.fullmatch(r'-1|[1-9][0-9]*', s) for s in v),
                           message='give the mesh as two sizes (data, model), e.g. 2,4; -1 = the remaining devices')
for _flag in ('plan_device_memory_gib', 'plan_bandwidth_gbps', 'plan_seconds_per_example'):
  flags.register_validator(_flag, lambda v: v is None or v > 0, message='must be > 0')


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


def export_tables(ds: Any, encoder: Any, user_index: np.ndarray, item_index: np.ndarray) -> Any:
  """The export's tables: every user and item, each user's ratings as seen items, the encoder's rules."""
  indptr, indices = metrics_lib.csr_from_pairs(user_index, item_index, len(ds.users[ds.user_column]))[:2]
  return export_lib.Tables(
      user_ids=np.asarray(ds.users[ds.user_column]), user_features=dict(encoder.user_table),
      item_ids=np.asarray(ds.items[ds.item_column]), item_features=dict(encoder.item_table), item_titles=None,
      context_specs=tuple(s for s in encoder.specs if s.entity == 'context'),
      seen_indptr=np.asarray(indptr, np.int64), seen_indices=np.asarray(indices, np.int32), features=encoder.specs,
      vocabs=dict(encoder.vocabs), seen_history='every synthetic rating')


def scale_config(config: Any, num_users: int, num_items: int, embed_dim: int, batch_size: int,
                 mesh_shape: tuple[int, ...], interactions_per_user: int) -> Any:
  """The benchmark's config: `config` (a synthetic-source config with its declared features and tasks, e.g.
  configs/synthetic.py) on tables of the given size."""
  config = config.copy_and_resolve_references()
  if config.data.source != 'synthetic':
    raise errors.ConfigError(f"--config's data.source is {config.data.source!r}: the scale benchmark generates its "
                             'data; pass a synthetic config such as configs/synthetic.py')
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
  labels = dataclasses.replace(labels, item_logq=input_pipeline.item_logq(  # a retrieval task's log q(item)
      labels.specs, np.bincount(item_index, minlength=num_items), np.full(num_items, 1.0 / num_items), k))
  for _ in range(count):
    rows = rng.integers(0, ds.num_rows, n_pos)
    pos = input_pipeline.Examples(user_index[rows], item_index[rows], rows, np.ones(n_pos, np.float32))
    n_neg = bs - n_pos
    neg = input_pipeline.Examples(np.resize(np.repeat(pos.user, k), n_neg), rng.integers(0, num_items, n_neg),
                                  np.resize(np.repeat(rows, k), n_neg), np.zeros(n_neg, np.float32))
    out.append(input_pipeline.to_batch(input_pipeline.Examples.concat([pos, neg]), encoder, labels))
  return out


def run(config: Any, num_users: int, num_items: int, embed_dim: int, batch_size: int, steps: int,
        mesh_shape: tuple[int, ...], interactions_per_user: int = 2, optimizer: str = 'dense_adam',
        export_root: str | None = None) -> dict[str, Any]:
  """Builds the data, the sharded model and optimizer (`optimizer`: a key of capacity.OPTIMIZERS, for the id
  tables; the rest is on config.optimizer), runs `steps` timed steps; returns the report. With `export_root`, the
  trained model is exported there too."""

  t_start = time.time()
  config = scale_config(config, num_users, num_items, embed_dim, batch_size, mesh_shape, interactions_per_user)
  if optimizer not in capacity.OPTIMIZERS:
    raise errors.ConfigError(f'--optimizers: {optimizer!r} is not one of {", ".join(capacity.OPTIMIZERS)}')
  with config.unlocked():
    config.optimizer.tables.name = capacity.OPTIMIZERS[optimizer]
    config.optimizer.tables.by_feature = ''

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
  print(f'{optimizer}: data: {ds.num_rows:,} synthetic log rows, {num_users:,} users, {num_items:,} items '
        f'({data_sec:.1f}s)', flush=True)
  served = export_tables(ds, encoder, user_index, item_index) if export_root else None
  del ds, user_index, item_index

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
  row_sharded = [x for x in jax.tree.leaves(state['params']) if sharding_lib.is_row_sharded(x.sharding.spec)]
  id_table_per_device = sharding_lib.bytes_per_device(row_sharded)
  opt_per_device = report['opt_state_bytes_per_device']
  params_per_device = report['params_bytes_per_device']
  print(f'{optimizer}: mesh {dict(trainer.mesh.shape)}: tables {large_total + small_total:,} B in all, '
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
  exported = None
  if export_root:
    t = time.time()
    network = scoring.Network(trainer.graphdef, trainer_lib.model_params(state), tuple(specs))
    exported = {'version_dir': export_lib.write_export(export_root, [network], served, config,
                                                       source={'system': 'scale_benchmark', 'steps': steps + 1}),
                'export_sec': time.time() - t}
    print(f'{optimizer}: exported to {exported["version_dir"]} ({exported["export_sec"]:.1f}s)', flush=True)
  memory = {k[len('step_'):]: v for k, v in report.items() if k.startswith('step_')}
  plan_model = capacity.abstract_model(config, encoder.specs, specs)
  planned = capacity.memory(plan_model, model, optimizer)
  result = {
      'optimizer': optimizer, 'table_optimizer': config.optimizer.tables.name,
      'num_users': num_users, 'num_items': num_items, 'embed_dim': embed_dim, 'batch_size': batch_size,
      'steps': steps, 'devices': len(jax.devices()), 'platform': jax.devices()[0].platform,
      'mesh': dict(trainer.mesh.shape),
      'table_rows': {n: int(tables[n].shape[0]) for n in large},
      'table_bytes_total': large_total + small_total,
      'id_table_bytes_total': large_total,
      'table_bytes_per_device': max(table_per_device.values()),
      'table_bytes_by_device': table_per_device,
      'table_bytes_per_device_expected': large_total // model + small_total,
      # every row-sharded parameter (id embeddings and id biases), per device: what dense Adam sweeps every step
      'id_table_bytes_per_device': max(id_table_per_device.values()),
      'params_bytes_total': int(sum(x.nbytes for x in jax.tree.leaves(state['params']))),
      'params_bytes_per_device': max(params_per_device.values()),
      'optimizer_state_bytes_total': int(sum(x.nbytes for x in jax.tree.leaves(
          [state['opt_state'], state.get('table_opt_state', {})]))),
      'optimizer_state_bytes_per_device': max(opt_per_device.values()),
      'optimizer_state_bytes_by_device': opt_per_device,
      'step_memory_analysis': memory,
      'step_temp_bytes': memory.get('temp_size_in_bytes', 0),
      'planned_bytes_per_device': planned.to_dict(),  # capacity.memory's formulas for this configuration
      'examples_per_sec': steps * batch_size / total_time,
      'step_seconds_median': statistics.median(times),
      'step_seconds_min': min(times),  # the undisturbed step: what the capacity plan calibrates and predicts
      'step_time_sec': {'mean': total_time / steps, 'median': statistics.median(times), 'min': min(times),
                        'max': max(times), 'p25': float(np.percentile(times, 25)),
                        'p75': float(np.percentile(times, 75))},
      'losses': losses,
      'peak_rss_bytes': capacity.peak_rss_bytes(),
      'data_sec': data_sec, 'init_sec': init_sec, 'compile_sec': compile_sec, 'wall_sec': time.time() - t_start,
      'data_note': 'batches built directly from synthetic ratings + uniform negatives (not experiment.build)',
  }
  if exported:
    result['export'] = exported
  if not np.all(np.isfinite(losses)):
    raise RuntimeError(f'non-finite losses at scale: {losses}')
  return result


def _in_subprocess(optimizer: str, num_users: int, num_items: int, out_dir: str) -> dict[str, Any]:
  """One run in a fresh process (its own peak RSS; its memory returned when it ends), with this command's flags."""
  out = os.path.join(out_dir, f'{optimizer}_{num_users}x{num_items}.json')
  forwarded = [a for a in sys.argv[1:] if a.startswith('--config')] + [
      f'--embed_dim={_EMBED_DIM.value}', f'--interactions_per_user={_INTERACTIONS.value}',
      f'--batch_size={_BATCH_SIZE.value}', f'--steps={_STEPS.value}', f'--mesh={",".join(_MESH.value)}',
      f'--devices={_DEVICES.value}']
  cmd = [sys.executable, '-m', 'mtl_rec.scale_benchmark', *forwarded, f'--optimizers={optimizer}',
         f'--num_users={num_users}', f'--num_items={num_items}', '--calibration_rows=0', f'--out={out}']
  done = subprocess.run(cmd, check=False)
  if done.returncode:
    raise RuntimeError(f'{optimizer} at {num_users:,} x {num_items:,} failed (exit {done.returncode}): '
                       f'{" ".join(cmd)}')
  with open(out) as f:
    return json.load(f)['runs'][optimizer]


def comparison(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Each optimizer against dense Adam: examples/s ratio and optimizer state as a fraction of Adam's."""
  if 'dense_adam' not in runs:
    return {}
  ref = runs['dense_adam']
  return {name: {'examples_per_sec_vs_dense_adam': r['examples_per_sec'] / ref['examples_per_sec'],
                 'optimizer_state_fraction_of_dense_adam': (r['optimizer_state_bytes_per_device']
                                                            / ref['optimizer_state_bytes_per_device'])}
          for name, r in runs.items()}


def plan_report(cal: capacity.Calibration, config: Any, optimizers: list[str], num_users: int, num_items: int,
                embed_dim: int, mesh_shape: tuple[int, int], batch_size: int, device_memory: float
                ) -> dict[str, Any]:
  """The capacity plan of `num_users` x `num_items` on `mesh_shape`: per optimizer, bytes per device and expected
  step time; and the largest square tables that fit `device_memory` bytes per device (the planned mesh)."""
  small = scale_config(config, 1000, 1000, embed_dim, batch_size, (1, 1), 1)
  ds = loader.load_data(small)
  columns = tasks_lib.label_columns(small, ds)
  specs = tasks_lib.task_specs(small, columns, np.arange(ds.num_rows))
  features = build_encoder(ds, small, ds.log[ds.user_column] - 1, ds.log[ds.item_column] - 1).specs
  at = lambda users, items: capacity.abstract_model(small, capacity.with_table_rows(
      features, {'user_id': users, 'item_id': items}, math.prod(mesh_shape)), specs)
  model = at(num_users, num_items)
  devices = math.prod(mesh_shape)
  out = {'num_users': num_users, 'num_items': num_items, 'embed_dim': embed_dim, 'mesh': list(mesh_shape),
         'devices': devices, 'batch_size': batch_size, 'device_memory_bytes': device_memory,
         'calibration': cal.to_dict(), 'dense_adam_bandwidth_bytes_per_sec': cal.bandwidth('dense_adam'),
         'optimizers': {}}
  for name in optimizers:
    p = capacity.plan(cal, capacity.memory(model, mesh_shape[1], name), name, batch_size, devices)
    # bytes are linear in the rows: the largest N x N tables within device_memory, from two sizes
    b1 = capacity.plan(cal, capacity.memory(at(10**6, 10**6), mesh_shape[1], name), name, batch_size, devices)
    b2 = capacity.plan(cal, capacity.memory(at(2 * 10**6, 2 * 10**6), mesh_shape[1], name), name, batch_size,
                       devices)
    per_row = (b2['total_bytes_per_device'] - b1['total_bytes_per_device']) / 10**6
    fixed = b1['total_bytes_per_device'] - per_row * 10**6
    p['fits_device_memory'] = p['total_bytes_per_device'] <= device_memory
    p['largest_square_tables'] = int(max(device_memory - fixed, 0) / per_row)
    out['optimizers'][name] = p
  return out


def _print_plan(p: dict[str, Any]) -> None:
  gib = lambda b: f'{b / 2**30:,.2f} GiB'
  print(f'capacity plan: {p["num_users"]:,} users x {p["num_items"]:,} items x {p["embed_dim"]} on mesh '
        f'{tuple(p["mesh"])} ({p["devices"]} devices), batch {p["batch_size"]:,}, {gib(p["device_memory_bytes"])} '
        'per device', flush=True)
  for name, r in p['optimizers'].items():
    print(f'  {name:16s} tables {gib(r["table_bytes_per_device"])}  optimizer state '
          f'{gib(r["optimizer_state_bytes_per_device"])}  step temporaries {gib(r["step_temp_bytes_per_device"])}  '
          f'total {gib(r["total_bytes_per_device"])} ({"fits" if r["fits_device_memory"] else "does not fit"})  '
          f'step {r["step_seconds"]:.3f}s ({r["examples_per_sec"]:,.0f} examples/s); largest N x N tables that fit: '
          f'{r["largest_square_tables"]:,}', flush=True)


def main(argv):
  with errors.reported():  # a bad config value or data file: one line naming it and the fix
    _main(argv)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  optimizers = list(dict.fromkeys(_OPTIMIZERS.value))
  unknown = [o for o in optimizers if o not in capacity.OPTIMIZERS]
  if unknown or not optimizers:
    raise app.UsageError(f'--optimizers={",".join(_OPTIMIZERS.value)}: use names among '
                         f'{", ".join(capacity.OPTIMIZERS)}')
  if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    jax.config.update('jax_num_cpu_devices', _DEVICES.value)  # before any backend exists; only CPU honours it
  files.output_file(_OUT.value, '--out')  # before any run: a bad path does not lose the measurements
  mesh = tuple(int(s) for s in _MESH.value)
  if _EXPORT_DIR.value and (len(optimizers) > 1 or _PLAN_ONLY.value):
    raise app.UsageError('--export_dir exports the one run of a single --optimizers entry, without --plan')
  result: dict[str, Any] = {'runs': {}}
  if _PLAN_ONLY.value and _CALIBRATION.value:
    with open(_CALIBRATION.value) as f:
      cal = capacity.Calibration(**json.load(f)['calibration'])
  else:
    if len(optimizers) == 1 and (not _CALIBRATION_ROWS.value or _EXPORT_DIR.value):
      result['runs'][optimizers[0]] = run(_CONFIG.value, _NUM_USERS.value, _NUM_ITEMS.value, _EMBED_DIM.value,
                                          _BATCH_SIZE.value, _STEPS.value, mesh, _INTERACTIONS.value, optimizers[0],
                                          _EXPORT_DIR.value)
    else:
      with tempfile.TemporaryDirectory() as tmp:
        for name in optimizers:
          result['runs'][name] = _in_subprocess(name, _NUM_USERS.value, _NUM_ITEMS.value, tmp)
        if _CALIBRATION_ROWS.value and 'rowwise_adagrad' in optimizers:
          rows = _CALIBRATION_ROWS.value
          result['calibration_runs'] = {name: _in_subprocess(name, rows, rows, tmp) for name in optimizers}
    result['comparison'] = comparison(result['runs'])
    cal = None
    if 'calibration_runs' in result:
      cal = capacity.calibrate(result['calibration_runs'])
      result['calibration'] = cal.to_dict()
      result['plan_check'] = {}
      for name, r in result['runs'].items():  # the plan for the measured size, from the other size's constants
        b = capacity.Bytes(**r['planned_bytes_per_device'])
        planned = capacity.plan(cal, b, name, r['batch_size'], r['devices'])
        spread = (r['step_time_sec']['p75'] - r['step_time_sec']['p25']) / r['step_seconds_median']
        result['plan_check'][name] = {'planned': planned, 'relative_error': capacity.relative_errors(planned, r),
                                      # this machine's step-to-step noise: the measured steps' interquartile range
                                      'measured_step_seconds_iqr_relative': spread}
  if _PLAN_ONLY.value:
    if cal is None:
      raise app.UsageError('--plan needs constants: run with dense_adam and rowwise_adagrad in --optimizers and '
                           '--calibration_rows > 0, or pass --calibration=<a previous run\'s JSON>')
    planned_optimizers = [o for o in capacity.OPTIMIZERS if o in cal.seconds_per_example]
    # This machine: its devices share its memory; the largest tables each optimizer's device bytes allow (the data,
    # Python and XLA's own memory come on top: compare peak_rss_bytes of a run)
    host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    result['plan_this_host'] = plan_report(cal, _CONFIG.value, planned_optimizers, _NUM_USERS.value,
                                           _NUM_ITEMS.value, _EMBED_DIM.value, mesh, _BATCH_SIZE.value,
                                           host / jax.device_count())
    plan_mesh = tuple(int(s) for s in _PLAN_MESH.value)
    bandwidth = _PLAN_BANDWIDTH.value * 1e9 if _PLAN_BANDWIDTH.value else None
    cal = capacity.for_hardware(cal, _PLAN_SECONDS_PER_EXAMPLE.value, bandwidth)
    result['plan'] = plan_report(cal, _CONFIG.value, planned_optimizers, _PLAN_USERS.value, _PLAN_ITEMS.value,
                                 _EMBED_DIM.value, plan_mesh,
                                 _PLAN_BATCH_SIZE.value, _PLAN_DEVICE_GB.value * 2**30)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  for name, r in result['runs'].items():
    vs = result['comparison'].get(name, {})
    print(f'{name:16s} {r["examples_per_sec"]:>10,.0f} examples/s, step {r["step_seconds_median"]:.3f}s (median of '
          f'{r["steps"]}); tables {r["table_bytes_per_device"]:,} B/device; optimizer state '
          f'{r["optimizer_state_bytes_per_device"]:,} B/device; step temporaries {r["step_temp_bytes"]:,} B; peak RSS '
          f'{r["peak_rss_bytes"] / 2**30:.2f} GiB' + (
              f'; {vs["examples_per_sec_vs_dense_adam"]:.1f}x the examples/s of dense Adam, state '
              f'{100 * vs["optimizer_state_fraction_of_dense_adam"]:.2f}% of its' if vs and name != 'dense_adam'
              else ''), flush=True)
  for name, check in result.get('plan_check', {}).items():
    print(f'plan vs measured, {name}: ' + ', '.join(f'{k} {100 * v:+.1f}%' for k, v in
                                                   check['relative_error'].items())
          + f' (measured steps\' interquartile range: {100 * check["measured_step_seconds_iqr_relative"]:.0f}% of '
          'the median)', flush=True)
  if 'plan' in result:
    _print_plan(result['plan_this_host'])
    _print_plan(result['plan'])
  print(f'written to {_OUT.value}', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags)
