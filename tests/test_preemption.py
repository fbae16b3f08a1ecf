"""Preemption and crashes: train.py killed mid-training and re-run ends exactly like an uninterrupted run.

SIGTERM (how preemption arrives) must save a checkpoint and exit cleanly; SIGKILL gives no warning, so the re-run
goes back to the last periodic checkpoint. A half-written checkpoint (a save cut short) is never restored.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
TIMEOUT = 300
OVERRIDES = [
    '--config=configs/synthetic.py',
    '--config.data.synthetic.num_users=150',
    '--config.data.synthetic.num_items=100',
    '--config.data.synthetic.interactions_per_user=10',
    '--config.train.batch_size=128',
    '--config.train.epochs=3',
    '--config.train.log_every_steps=1',
    '--config.train.checkpoint_every_steps=15',
    '--config.train.progress_bar=False',
    '--config.eval.batch_size=512',
    '--config.mesh.shape=(2,2)',
    '--config.export.enabled=False',
]


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  # The runs compile the same programs: a shared persistent cache makes every run after the first start fast.
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
              JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def _start(workdir, env, extra=()):
  log = open(f'{workdir}.log', 'a')
  return subprocess.Popen([sys.executable, 'train.py', *OVERRIDES, *extra, f'--workdir={workdir}'], cwd=REPO,
                          env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, workdir):
  try:
    proc.wait(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, open(f'{workdir}.log').read()[-3000:]
  return open(f'{workdir}.log').read()


def _history(workdir):
  path = os.path.join(workdir, 'history.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def _kill_at(proc, workdir, step, sig):
  """Sends `sig` once history.jsonl shows `step` (training is under way); returns the last step seen."""
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and proc.poll() is None:
    rows = _history(workdir)
    if rows and rows[-1]['step'] >= step:
      proc.send_signal(sig)
      return rows[-1]['step']
    time.sleep(0.01)
  raise AssertionError(f'the run ended or stalled before step {step}:\n' + open(f'{workdir}.log').read()[-3000:])


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, env):
  workdir = str(tmp_path_factory.mktemp('runs') / 'uninterrupted')
  _finish(_start(workdir, env), workdir)
  return workdir


def _assert_same_run(workdir, reference):
  got, want = _metrics(workdir), _metrics(reference)
  assert got['steps'] == want['steps'] and got['best_step'] == want['best_step']
  for split in ('valid', 'test'):
    for k, v in want[split].items():
      np.testing.assert_allclose(got[split][k], v, rtol=1e-6, atol=1e-9, err_msg=f'{split}/{k}')
  # Every step is logged once, in order, with the losses of the uninterrupted run.
  h, ref = _history(workdir), _history(reference)
  assert [r['step'] for r in h] == [r['step'] for r in ref] == list(range(1, want['steps'] + 1))
  np.testing.assert_allclose([r['loss'] for r in h], [r['loss'] for r in ref], rtol=1e-6)


def test_sigterm_saves_and_the_rerun_continues(uninterrupted, tmp_path, env):
  total = _metrics(uninterrupted)['steps']
  workdir = str(tmp_path / 'preempted')
  proc = _start(workdir, env)
  _kill_at(proc, workdir, 10, signal.SIGTERM)
  out = _finish(proc, workdir)  # exit status 0: a clean exit
  assert 'SIGTERM: saved a checkpoint at step' in out
  saved = int(out.split('SIGTERM: saved a checkpoint at step ')[1].split(';')[0])
  assert 10 <= saved < total
  assert int(max(os.listdir(os.path.join(workdir, 'checkpoints', 'latest')), key=int)) == saved
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))

  out = _finish(_start(workdir, env), workdir)
  assert f'resumed from checkpoint at step {saved}' in out
  _assert_same_run(workdir, uninterrupted)


def test_sigkill_mid_epoch_resumes_from_the_last_complete_checkpoint(uninterrupted, tmp_path, env):
  total = _metrics(uninterrupted)['steps']
  workdir = str(tmp_path / 'killed')
  proc = _start(workdir, env)
  _kill_at(proc, workdir, 38, signal.SIGKILL)
  proc.wait(timeout=TIMEOUT)
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  complete = [int(d) for d in os.listdir(latest) if d.isdigit()]
  assert complete and max(complete) < total

  # A save cut short by the kill: orbax writes into a temporary directory renamed only when complete.
  step_dir = os.path.join(latest, str(max(complete)))
  half = os.path.join(latest, f'{total - 1}.orbax-checkpoint-tmp')
  shutil.copytree(step_dir, half)
  for f in glob.glob(os.path.join(half, '**', 'manifest.ocdbt'), recursive=True)[:1]:
    open(f, 'wb').close()

  out = _finish(_start(workdir, env), workdir)
  assert f'resumed from checkpoint at step {max(complete)}' in out
  assert not os.path.exists(half)  # the leftover is cleaned up, never restored
  _assert_same_run(workdir, uninterrupted)


def test_sigkill_resume_with_row_wise_table_optimizers(tmp_path, env):
  """The row-wise optimizers' state (rowwise.py) is checkpointed with the model: killed and re-run, the run ends
  as the uninterrupted one does."""
  extra = ['--config.optimizer.tables.by_feature=user_id=rowwise_adagrad,item_id=lazy_adam',
           '--config.optimizer.tables.learning_rate=0.05']
  reference = str(tmp_path / 'uninterrupted')
  _finish(_start(reference, env, extra), reference)
  workdir = str(tmp_path / 'killed')
  proc = _start(workdir, env, extra)
  _kill_at(proc, workdir, 38, signal.SIGKILL)
  proc.wait(timeout=TIMEOUT)
  complete = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) if d.isdigit()]
  assert complete and max(complete) < _metrics(reference)['steps']
  out = _finish(_start(workdir, env, extra), workdir)
  assert f'resumed from checkpoint at step {max(complete)}' in out
  _assert_same_run(workdir, reference)
