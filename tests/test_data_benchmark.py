"""`python -m mtl_rec.data_benchmark` end to end at a small size: the log written in chunks and reused, the
statistics pass, the input-alone and training measurements, and the JSON keys the streaming issue names."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from mtl_rec.data import splits
from mtl_rec.data import synthetic

pytestmark = pytest.mark.slow


def _run(tmp_path, *extra):
  out = tmp_path / 'data.json'
  args = [sys.executable, '-m', 'mtl_rec.data_benchmark', '--rows=20000', '--row_group_size=2000',
          '--rows_per_file=10000', '--num_users=500', '--num_items=200', '--batch_size=1024', '--input_steps=5',
          f'--cache_dir={tmp_path / "cache"}', f'--out={out}', *extra]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_data_benchmark_reports_and_reuses_its_log(tmp_path):
  result, _ = _run(tmp_path, '--config.features.user_id.min_count=45')
  for key in ('rows', 'peak_rss_bytes', 'input_examples_per_sec', 'train_examples_per_sec', 'input_wait_fraction'):
    assert key in result, key
  assert result['rows'] == 20000 and result['files'] == 2 and result['row_groups'] == 10
  # the split, row by row: 1% test, 1% validation; the rest trains
  log_dir = next((tmp_path / 'cache').iterdir())
  users = np.concatenate([pq.read_table(p, columns=['user_id']).column(0).to_numpy()
                          for p in sorted(log_dir.glob('log-*.parquet'))])
  rows = np.arange(users.size)
  train = (splits.row_uniform(rows, 0, 0) >= 0.01) & (splits.row_uniform(rows, 0, 1) >= 0.01)
  assert result['train_rows'] == train.sum() and 19_400 < train.sum() < 19_800
  assert result['steps_per_epoch'] == result['steps'] == train.sum() // 512  # 512 positives + 512 negatives a batch
  assert result['examples_trained'] == result['steps'] * 1024
  assert 0 <= result['input_wait_fraction'] < 1
  assert result['input_examples_per_sec'] > 0 and result['train_examples_per_sec'] > 0
  assert result['grain_parquet_rows_per_sec'] > 0
  assert np.all(np.isfinite(result['losses_every_100_steps']))
  # min_count=45 of 40 interactions a user on average: the vocabulary keeps the users frequent in training only
  assert result['num_users'] == np.unique(users).size
  _, counts = np.unique(users[train], return_counts=True)
  assert result['vocab_sizes']['user_id'] == int((counts >= 45).sum()) + 1
  held = result['held_in_memory']  # ~400 held-out rows, under the benchmark's 2,000: every user evaluated
  assert held['test'] == (splits.row_uniform(rows, 0, 0) < 0.01).sum()
  assert held['evaluation_users'] == np.unique(users[~train]).size
  assert (log_dir / 'run' / 'input' / 'survey.npz').exists()  # reused by the next run (tests/test_stream.py)

  # the next run with the same sizes reuses the log; other sizes write their own
  mtimes = {p: p.stat().st_mtime for p in log_dir.glob('log-*.parquet')}
  paths = synthetic.write_log(str(log_dir), 20000, 500, 200, 0, 2000, 10000)
  assert sorted(paths) == sorted(str(p) for p in mtimes)
  assert {p: p.stat().st_mtime for p in log_dir.glob('log-*.parquet')} == mtimes
  other = synthetic.write_log(str(tmp_path / 'other'), 3000, 50, 20, 0, 1000, 2000)
  assert len(other) == 2 and sum(pq.ParquetFile(p).metadata.num_rows for p in other) == 3000
