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
# The dense runs below keep a moving average of the parameters (train.ema_decay): state a resumed run restores too.
EMA = ('--config.train.ema_decay=0.9',)


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
  _finish(_start(workdir, env, EMA), workdir)
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
  proc = _start(workdir, env, EMA)
  _kill_at(proc, workdir, 10, signal.SIGTERM)
  out = _finish(proc, workdir)  # exit status 0: a clean exit
  assert 'SIGTERM: saved a checkpoint at step' in out
  saved = int(out.split('SIGTERM: saved a checkpoint at step ')[1].split(';')[0])
  assert 10 <= saved < total
  assert int(max(os.listdir(os.path.join(workdir, 'checkpoints', 'latest')), key=int)) == saved
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))

  out = _finish(_start(workdir, env, EMA), workdir)
  assert f'resumed from checkpoint at step {saved}' in out
  _assert_same_run(workdir, uninterrupted)


def test_sigkill_mid_epoch_resumes_from_the_last_complete_checkpoint(uninterrupted, tmp_path, env):
  total = _metrics(uninterrupted)['steps']
  workdir = str(tmp_path / 'killed')
  proc = _start(workdir, env, EMA)
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

  out = _finish(_start(workdir, env, EMA), workdir)
  assert f'resumed from checkpoint at step {max(complete)}' in out
  assert not os.path.exists(half)  # the leftover is cleaned up, never restored
  _assert_same_run(workdir, uninterrupted)


def test_sigkill_resume_with_the_streaming_reader_and_row_wise_optimizers(tmp_path, env):
  """data.reader='stream': the reader's position is saved in the checkpoint (Grain's handler) and restored from it;
  so is the row-wise optimizers' state (rowwise.py). Killed and re-run, the run reads the same batches and ends as
  the uninterrupted one does."""
  from mtl_rec.data import synthetic, write  # pylint: disable=g-import-not-at-top
  from mtl_rec.data.types import to_dataset  # pylint: disable=g-import-not-at-top
  data = tmp_path / 'data'
  write.write_dataset(to_dataset(synthetic.generate(num_users=150, num_items=100, interactions_per_user=10,
                                                    latent_dim=4, seed=0)), str(data), 'parquet', row_group_size=100)
  extra = ['--config.data.source=files', '--config.data.reader=stream', '--config.train.batch_size=160',
           '--config.optimizer.tables.by_feature=user_id=rowwise_adagrad,item_id=lazy_adam',
           '--config.optimizer.tables.learning_rate=0.05',
           f"--config.data.log.paths=('{data}/log.parquet',)", f"--config.data.user_table.paths=('{data}/users.parquet',)",
           f"--config.data.item_table.paths=('{data}/items.parquet',)"]
  reference = str(tmp_path / 'uninterrupted')
  _finish(_start(reference, env, extra), reference)
  steps = _metrics(reference)['steps']
  workdir = str(tmp_path / 'killed')
  proc = _start(workdir, env, extra)
  _kill_at(proc, workdir, 62, signal.SIGKILL)  # past the periodic checkpoint at step 45, mid-epoch 1
  proc.wait(timeout=TIMEOUT)
  complete = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) if d.isdigit()]
  assert complete and max(complete) < steps
  resumed = max(complete)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', 'latest', str(resumed), 'input'))
  out = _finish(_start(workdir, env, extra), workdir)
  assert f'resumed from checkpoint at step {resumed}' in out
  spe = steps // 3  # configs/synthetic.py trains 3 epochs; no early stopping
  assert f'reader resumed at epoch {resumed // spe}, batch {resumed % spe}' in out
  _assert_same_run(workdir, reference)


def test_a_checkpoint_that_does_not_fit_the_config_is_our_error(tmp_path):
  """Re-running a --workdir after changing the model (a feature, a task, embed_dim): one line naming the checkpoint
  and the fix (orbax's own ValueError would be a traceback now that only our errors print as one line)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mtl_rec import errors  # pylint: disable=g-import-not-at-top
  from mtl_rec.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(3, {'table': jnp.ones((4, 3))}, {'note': 'embed_dim 3'})
  ckpt.wait()
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path), keep=2)
  for changed in ({'table': jnp.ones((4, 5))}, {'other': jnp.ones((4, 3))}):  # another shape, another tree
    with pytest.raises(errors.Error, match=r'(?s)checkpoint at step 3 under .* does not fit .* new --workdir'):
      ckpt.restore_latest(changed)
  state, meta = ckpt.restore_latest({'table': jnp.zeros((4, 3))})
  assert float(state['table'].sum()) == 12.0 and meta == {'note': 'embed_dim 3'}
  ckpt.close()
