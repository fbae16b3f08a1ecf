"""The scale benchmark's measurements and the capacity plan's byte formulas (capacity.py) against real trainers.

Runs on the 8 simulated CPU devices that conftest.py asks XLA for.
"""

import jax
import numpy as np
import pytest

from configs import synthetic
from mtl_rec import capacity
from mtl_rec import experiment as experiment_lib
from mtl_rec import scale_benchmark
from mtl_rec import sharding as sharding_lib
from mtl_rec import trainer as trainer_lib


@pytest.mark.parametrize('optimizer', list(capacity.OPTIMIZERS))
def test_planned_bytes_are_the_trainers(tiny_config, optimizer):
  """The plan's bytes per device (tables, parameters, optimizer state) are what a trainer allocates."""
  c = tiny_config(train__batch_size=64, model__id_biases=True, mesh__shape=(2, 4))
  c.optimizer.tables.name = capacity.OPTIMIZERS[optimizer]
  exp = experiment_lib.build(c)
  trainer = trainer_lib.make_trainer(c, exp.encoder.specs, exp.specs, 10)
  state = trainer.init_state
  planned = capacity.memory(capacity.abstract_model(c, exp.encoder.specs, exp.specs), 4, optimizer)
  most = lambda tree: max(sharding_lib.bytes_per_device(tree).values())
  assert planned.tables == most(state['params']['embeddings']['tables'])
  assert planned.params == most(state['params'])
  opt = most([state['opt_state'], state.get('table_opt_state', {})])
  assert opt - 64 <= planned.optimizer_state <= opt  # optax's step counters (a few int32) are not planned
  rows = [x for x in jax.tree.leaves(state['params']) if sharding_lib.is_row_sharded(x.sharding.spec)]
  assert planned.id_tables == most(rows) > 0


@pytest.fixture(scope='module')
def small_runs():
  """dense Adam and row-wise Adagrad on 100k x 100k x 16 tables, mesh (2, 4), 3 steps each."""
  return {name: scale_benchmark.run(synthetic.get_config(), 100_000, 100_000, 16, 1024, 3, (2, 4), 1, name)
          for name in ('dense_adam', 'rowwise_adagrad')}


@pytest.mark.slow  # two scale runs
def test_row_wise_step_touches_no_table_sized_buffer(small_runs):
  dense, rw = small_runs['dense_adam'], small_runs['rowwise_adagrad']
  for r in (dense, rw):
    planned_state = r['planned_bytes_per_device']['optimizer_state']
    assert planned_state <= r['optimizer_state_bytes_per_device'] <= planned_state + 64  # + optax's counters
    assert r['table_bytes_per_device'] == r['planned_bytes_per_device']['tables']
    assert np.all(np.isfinite(r['losses'])) and r['steps'] == 3 and r['peak_rss_bytes'] > 0
  tables = rw['id_table_bytes_per_device']
  # Dense Adam's step holds at least a table-sized gradient; the row-wise step's temporaries are the batch's rows,
  # well under one table shard (so no copy of a table), and its state is one float per row, not two per value.
  assert dense['step_temp_bytes'] >= tables
  assert rw['step_temp_bytes'] < tables / 2
  assert rw['optimizer_state_bytes_per_device'] < 0.05 * dense['optimizer_state_bytes_per_device']
  comparison = scale_benchmark.comparison(small_runs)
  assert comparison['rowwise_adagrad']['optimizer_state_fraction_of_dense_adam'] < 0.05
  # The plan, calibrated on these runs, reproduces the row-wise step's temporaries.
  cal = capacity.calibrate(small_runs)
  b = capacity.Bytes(**rw['planned_bytes_per_device'])
  planned = capacity.plan(cal, b, 'rowwise_adagrad', rw['batch_size'], rw['devices'])
  assert planned['step_temp_bytes_per_device'] == pytest.approx(rw['step_temp_bytes'], rel=1e-6)
  assert cal.temp_bytes_per_table_byte['dense_adam'] >= 1.0  # dense Adam's step holds the tables' gradient


def test_plan_arithmetic():
  cal = capacity.Calibration(seconds_per_example={'dense_adam': 2e-6, 'rowwise_adagrad': 2e-6},
                             seconds_per_table_byte={'dense_adam': 1e-9, 'rowwise_adagrad': 0.0},
                             temp_bytes_per_example={'dense_adam': 100.0, 'rowwise_adagrad': 100.0},
                             temp_bytes_per_table_byte={'dense_adam': 1.5, 'rowwise_adagrad': 0.0})
  b = capacity.Bytes(tables=10**9, id_tables=10**9, params=10**9 + 10**6, optimizer_state=10**7)
  dense = capacity.plan(cal, b, 'dense_adam', 8192, 8)
  assert dense['step_seconds'] == pytest.approx(2e-6 * 1024 + 1.0)
  assert dense['step_temp_bytes_per_device'] == int(100 * 8192 + 1.5e9)
  assert dense['total_bytes_per_device'] == 10**9 + 10**6 + 10**7 + int(100 * 8192 + 1.5e9)
  rw = capacity.plan(cal, b, 'rowwise_adagrad', 8192, 8)
  assert rw['step_seconds'] == pytest.approx(2e-6 * 1024) and rw['step_temp_bytes_per_device'] == 819200
  # other hardware: 3 TB/s makes dense Adam's table passes TRAFFIC_PASSES * bytes / 3e12
  fast = capacity.for_hardware(cal, 1e-7, 3e12)
  assert capacity.plan(fast, b, 'dense_adam', 8192, 8)['step_seconds'] == pytest.approx(
      1e-7 * 1024 + capacity.TRAFFIC_PASSES * 1e9 / 3e12)
  assert fast.bandwidth('dense_adam') == pytest.approx(3e12) and fast.bandwidth('rowwise_adagrad') == float('inf')
  with pytest.raises(ValueError, match='lazy_adam'):
    capacity.plan(cal, b, 'lazy_adam', 8192, 8)


@pytest.mark.slow  # a scale run, an export, and serve.py under load
def test_a_scale_run_exports_and_the_serving_benchmark_measures_recommend(tmp_path):
  """`scale_benchmark --export_dir` exports the trained sharded model (retrieve-then-rerank with the retrieval
  variant), and the serving benchmark measures `recommend` on it, directly and over HTTP, against its budget."""
  import json  # pylint: disable=g-import-not-at-top
  from mtl_rec.serving import benchmark  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'export')
  r = scale_benchmark.run(synthetic.get_config('retrieval'), 4000, 3000, 16, 512, 2, (2, 4), 2, 'rowwise_adagrad',
                          export_root=root)
  manifest = json.load(open(f'{r["export"]["version_dir"]}/manifest.json'))
  stage = manifest['functions']['recommend']['retrieval']
  assert manifest['catalog']['count'] == 3000 and manifest['users']['count'] == 4000
  assert stage['task'] == 'retrieval' and stage['candidates'] == 1000 and stage['item_vectors']['shape'] == [3000, 16]
  report = benchmark.main([f'--export_dir={root}', f'--out={tmp_path / "serving.json"}', '--duration=0.5',
                           '--batch_sizes=1', '--concurrency=1', '--rate=', '--recommend_users=1,2',
                           '--recommend_concurrency=1', '--recommend_budget_ms=1000'])
  assert [x['users'] for x in report['recommend_function']] == [1, 2]
  assert all(x['calls'] > 0 and x['rows_per_s'] > 0 for x in report['recommend_function'])
  (served,) = report['http']['recommend']
  assert served['calls'] > 0 and not served['errors']
  budget = report['recommend_budget']
  assert budget['p99_ms'] == served['p99_ms'] and budget['budget_ms'] == 1000 and 'retrieve 1000' in budget['ranking']
  assert json.load(open(tmp_path / 'serving.json'))['catalog_items'] == 3000
