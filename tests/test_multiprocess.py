"""Two processes x 4 simulated CPU devices on 127.0.0.1 train like one process on one device.

Each process runs train.py with --coordinator_address/--num_processes/--process_id; a one-process run of the same
config is the reference. Per-step losses come from history.jsonl (log_every_steps=1).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
TIMEOUT = 420
OVERRIDES = [
    '--config=configs/synthetic.py',
    '--config.data.synthetic.num_users=120',
    '--config.data.synthetic.num_items=80',
    '--config.data.synthetic.interactions_per_user=10',
    '--config.train.batch_size=128',
    '--config.train.epochs=1',
    '--config.train.log_every_steps=1',
    '--config.train.progress_bar=False',
    '--config.eval.batch_size=512',
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(args, log_path, devices):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, 'train.py', *OVERRIDES, *args], cwd=REPO, env=env,
                          stdout=open(log_path, 'w'), stderr=subprocess.STDOUT)


def _wait(procs, logs):
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT)
  finally:
    for p in procs:  # a process whose peer died waits on the coordinator forever
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, f'{log}:\n' + open(log).read()[-3000:]


def _history(workdir):
  with open(os.path.join(workdir, 'history.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_processes_match_one_device(tmp_path):
  """The item tables on the dense optimizer (the default), the user tables on row-wise Adagrad (rowwise.py), whose
  shard-local updates must not depend on the processes either (lazy Adam: the streaming test below)."""
  port = _free_port()
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  logs = [str(tmp_path / f'process_{i}.log') for i in range(2)] + [str(tmp_path / 'single.log')]
  extra = ['--config.optimizer.tables.by_feature=user_id=rowwise_adagrad']
  procs = [_start([f'--workdir={multi}', '--config.mesh.shape=(2,4)', f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}', *extra], logs[i], devices=4) for i in range(2)]
  procs.append(_start([f'--workdir={single}', '--config.mesh.shape=(1,1)', *extra], logs[2], devices=1))
  _wait(procs, logs)

  printed = [[line for line in open(log) if line.startswith(('mesh {', 'Test metrics'))] for log in logs]
  assert len(printed[0]) == 2 and printed[0][0].startswith("mesh {'data': 2, 'model': 4}")
  assert not printed[1]  # only process 0 prints, logs metrics and writes files other than checkpoint shards
  assert printed[2][0].startswith("mesh {'data': 1, 'model': 1}")

  h_multi, h_single = _history(multi), _history(single)
  assert [r['step'] for r in h_multi] == [r['step'] for r in h_single] and len(h_multi) >= 20
  losses = np.array([[r[k] for r in h] for h in (h_multi, h_single) for k in ('loss', 'loss_click', 'loss_rating')])
  np.testing.assert_allclose(losses[:3], losses[3:], rtol=1e-5)
  np.testing.assert_array_equal(losses[:3], losses[3:])  # the same bits, in fact: see train.grad_groups

  m_multi, m_single = (json.load(open(os.path.join(w, 'metrics.json'))) for w in (multi, single))
  assert m_multi['best_step'] == m_single['best_step']
  for k, v in m_single['test'].items():
    np.testing.assert_allclose(m_multi['test'][k], v, rtol=1e-4, atol=1e-6, err_msg=k)

  # Every process wrote its own shards of each checkpoint; the run directory is the one-process layout.
  step_dir = os.path.join(multi, 'checkpoints', 'latest', str(m_multi['steps']), 'state')
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(os.listdir(step_dir))
  assert sorted(os.listdir(multi)) == sorted(os.listdir(single))


def test_two_processes_stream_disjoint_shards_and_match_one_process(tmp_path):
  """data.reader='stream' with 2 logical shards, from a CSV log: each of 2 processes reads only its shard's row
  groups (of the Parquet copy process 0 writes, once) and builds its rows of the global batch; one process reading
  both shards logs the same losses, bit for bit (item tables on lazy Adam)."""
  from mtl_rec.data import synthetic, write  # pylint: disable=g-import-not-at-top
  from mtl_rec.data.types import to_dataset  # pylint: disable=g-import-not-at-top
  data = tmp_path / 'data'
  # CSV: the streamed reader converts the log to Parquet row groups of 60 rows, once, on process 0
  write.write_dataset(to_dataset(synthetic.generate(num_users=120, num_items=80, interactions_per_user=10,
                                                    latent_dim=4, seed=0)), str(data), 'csv')
  extra = ['--config.data.source=files', '--config.data.reader=stream', '--config.data.stream.num_shards=2',
           '--config.data.stream.row_group_size=60', '--config.optimizer.tables.by_feature=item_id=lazy_adam',
           '--config.train.batch_size=160', f"--config.data.log.paths=('{data}/log.csv',)",
           f"--config.data.user_table.paths=('{data}/users.csv',)",
           f"--config.data.item_table.paths=('{data}/items.csv',)"]
  port = _free_port()
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  logs = [str(tmp_path / f'process_{i}.log') for i in range(2)] + [str(tmp_path / 'single.log')]
  procs = [_start([f'--workdir={multi}', '--config.mesh.shape=(2,4)', f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}', *extra], logs[i], devices=4) for i in range(2)]
  procs.append(_start([f'--workdir={single}', '--config.mesh.shape=(1,1)', *extra], logs[2], devices=1))
  _wait(procs, logs)
  h_multi, h_single = _history(multi), _history(single)
  assert [r['step'] for r in h_multi] == [r['step'] for r in h_single] and len(h_multi) >= 5
  losses = np.array([[r[k] for r in h] for h in (h_multi, h_single) for k in ('loss', 'loss_click', 'loss_rating')])
  np.testing.assert_array_equal(losses[:3], losses[3:])
  # the survey and sample passes read the log once, on process 0; process 1 reads them from the run directory
  first, second = (open(p).read() for p in logs[:2])
  for name in ('survey', 'sample'):
    assert f'{name} pass: reading' in first and f'{name} pass: reused' in second, name
  assert 'converting' in first and 'converting' not in second  # the CSV's Parquet copy too
