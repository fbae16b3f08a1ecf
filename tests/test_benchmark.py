"""The unified-vs-fusion benchmark end to end on a tiny synthetic config: every section, key, system and plot."""

import json
import os

import numpy as np
import pytest

from mtl_rec import benchmark, benchmark_report, fusion, fusion_weights
from mtl_rec import config as config_lib

pytestmark = pytest.mark.slow

SECTIONS = ('## Per-task test metrics', '## Fused ranking quality', '## Cost', '## Baselines', '## Targets',
            '## Plots', '## Notes')


@pytest.fixture(scope='module')
def report(tmp_path_factory, tiny_config):
  out = str(tmp_path_factory.mktemp('bench'))
  c = tiny_config()
  with c.unlocked():  # a [users, L] user input, as the default's user history: every path must take one
    c.features.user_history = config_lib.feature('user', kind='history', of='item_id', max_values=8)
  # One backbone and one seed keep this under a minute; isolate=True exercises the subprocess + peak-RSS path.
  r = benchmark.run_benchmark(c, out, seeds=1, backbones=('shared_bottom',), isolate=True,
                              fusion_negatives=30, serving_requests=20)
  return out, r


def test_report_files_and_sections(report):
  out, r = report
  with open(os.path.join(out, 'report.md')) as f:
    md = f.read()
  for section in SECTIONS:
    assert section in md, section
  for name in ('unified_shared_bottom', 'ensemble', 'popularity', 'bias_only'):
    assert name in md
  for plot in ('quality.png', 'cost.png', 'curves.png'):
    assert os.path.getsize(os.path.join(out, plot)) > 1000
    assert f']({plot})' in md
  with open(os.path.join(out, 'report.json')) as f:
    saved = json.load(f)
  assert set(saved) >= {'meta', 'per_task', 'fused_ranking', 'cost', 'baselines', 'targets', 'notes', 'plots'}
  assert saved['meta']['systems'] == ['unified_shared_bottom', 'ensemble'] == r['meta']['systems']


def test_per_task_metrics_cover_metrics_json_for_both_systems(report):
  _, r = report
  assert {'rating_rmse', 'rating_mae', 'like_auc', 'like_logloss', 'like_accuracy', 'click_auc',
          'click_logloss', 'recall@10', 'ndcg@10', 'hr@10_sampled', 'ndcg@10_sampled'} <= set(r['per_task'])
  assert 'ndcg@10_graded' in r['per_task']
  for cells in r['per_task'].values():
    for name in ('unified_shared_bottom', 'ensemble'):
      assert cells[name]['n'] == 1 and np.isfinite(cells[name]['mean'])
  assert r['per_task']['click_auc']['ensemble']['mean'] > 0.6


def test_fused_ranking_for_every_method_and_system(report):
  _, r = report
  for name in ('unified_shared_bottom', 'ensemble'):
    for m in fusion_weights.FUSION_METHODS:
      cell = r['fused_ranking'][name][m]
      assert 0.0 < cell['test']['ndcg@10_graded']['mean'] <= 1.0
      assert set(cell['weights'][0]) == {'click', 'like', 'rating'}
  assert 'ndcg@10_graded' in r['baselines']['popularity']
  assert 'rating_rmse' in r['baselines']['bias_only']
  assert 0.0 < r['baselines']['ease']['recall@10']['mean'] <= 1.0  # the item-item floor in every report


def test_cost_is_measured_side_by_side(report):
  out, r = report
  for name in ('unified_shared_bottom', 'ensemble'):
    cost = {k: v['mean'] for k, v in r['cost'][name].items()}
    for key, _, _ in benchmark_report.COST_ROWS:
      assert cost.get(key) is not None and cost[key] > 0, (name, key)
  u, e = r['cost']['unified_shared_bottom'], r['cost']['ensemble']
  # The ensemble holds three networks, each with its own embeddings: more parameters than one shared network.
  assert e['params']['mean'] > 1.5 * u['params']['mean']
  assert r['meta']['serving_method'] == 'export'
  assert os.path.exists(os.path.join(out, 'exports', 'ensemble', '1', 'manifest.json'))
  with open(os.path.join(out, 'exports', 'ensemble', '1', 'manifest.json')) as f:
    manifest = json.load(f)
  assert [m['tasks'] for m in manifest['members']] == [['click'], ['like'], ['rating']]
  t = r['targets']['unified_shared_bottom']
  assert t['params_ratio'] == pytest.approx(u['params']['mean'] / e['params']['mean'])
  assert set(t) >= {'quality_within_error_bars', 'params_met', 'throughput_met', 'met'}


def test_ensemble_members_are_single_task_runs(report):
  out, _ = report
  wd = os.path.join(out, 'seed0', 'ensemble')
  with open(os.path.join(wd, 'ensemble.json')) as f:
    ens = json.load(f)
  assert ens['params'] == sum(m['params'] for m in ens['members'].values())
  for task in ('click', 'like', 'rating'):
    with open(os.path.join(fusion.member_workdir(wd, task), 'config.json')) as f:
      saved = json.load(f)
    assert list(saved['tasks']) == [task] and saved['seed'] == 0
    assert os.path.exists(os.path.join(fusion.member_workdir(wd, task), 'resources.json'))


def test_finished_runs_are_not_retrained(report, monkeypatch, tiny_config):
  out, _ = report
  wd = os.path.join(out, 'seed0', 'unified_shared_bottom')
  monkeypatch.setattr(benchmark, '_isolated_train', lambda *a: pytest.fail('a finished run was trained again'))
  with open(os.path.join(wd, 'metrics.json')) as f:
    assert benchmark.train_or_load(tiny_config(), wd, isolate=True) == json.load(f)


def test_summary_and_error_bar_rule():
  s = benchmark_report.summary([1.0, 2.0, 3.0])
  assert s['mean'] == 2.0 and s['std'] == pytest.approx(1.0) and s['n'] == 3
  assert benchmark_report.summary([0.5])['std'] == 0.0
  within = benchmark_report._within  # pylint: disable=protected-access
  assert within({'mean': 0.80, 'std': 0.01}, {'mean': 0.805, 'std': 0.0}, 'max')  # gap <= std_u + std_e
  assert not within({'mean': 0.78, 'std': 0.01}, {'mean': 0.81, 'std': 0.01}, 'max')
  assert within({'mean': 0.90, 'std': 0.0}, {'mean': 0.95, 'std': 0.0}, 'min')  # lower RMSE is better
  assert benchmark_report.metric_mode('rating_rmse') == 'min' and benchmark_report.metric_mode('ndcg@10_graded') == 'max'
  assert benchmark_report.metric_mode('click_logloss') == 'min'


def test_system_cost_sums_the_members_step_times():
  def cost(batch, eps):
    return benchmark.RunCost(wall_time_sec=10.0, batch_size=batch, examples_per_sec=eps, steps=100,
                             step_device_bytes=2**20, peak_rss_bytes=2**30, history=[])
  unified = benchmark.system_cost([cost(1000, 1e5)], 1000, params=10)
  ens = benchmark.system_cost([cost(1000, 1e5), cost(200, 1e5), cost(200, 1e5)], 1000, params=30)
  assert unified['train_examples_per_sec'] == pytest.approx(1e5)
  assert ens['train_examples_per_sec'] == pytest.approx(1000 / (0.01 + 0.002 + 0.002))
  assert ens['train_wall_time_sec'] == 30.0 and ens['peak_rss_mb'] == 1024.0
  assert ens['train_step_device_mb'] == 3.0
