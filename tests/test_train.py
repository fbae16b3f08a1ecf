"""End-to-end training on small synthetic data: learning, every backbone, the run directory, resume."""

import json
import os

import numpy as np
import pytest

from configs import synthetic
from mtl_rec import train_lib

REQUIRED_KEYS = set(train_lib.REQUIRED_METRICS)


def tiny_config(**overrides):
  c = synthetic.get_config('tiny')
  c.train.epochs = 2
  c.train.checkpoint_every_steps = 50
  for key, value in overrides.items():
    section, field = key.split('__')
    c[section][field] = value
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  c = tiny_config(train__epochs=4)
  c.data.synthetic.interactions_per_user = 40
  c.data.synthetic.num_users = 600
  c.data.synthetic.num_items = 300
  return workdir, train_lib.train_and_evaluate(c, workdir)


def test_learns_the_planted_signal(trained):
  _, m = trained
  assert m['test']['click_auc'] > 0.75, m['test']
  assert m['test']['rating_rmse'] < m['baselines']['bias_only']['rating_rmse'] + 0.05, m
  # Items have a strong planted popularity; the model must learn the personal part on top of it.
  assert m['test']['click_auc'] > m['baselines']['popularity']['click_auc'] + 0.01, m
  assert m['test']['recall@10'] > m['baselines']['popularity']['recall@10'], m


def test_run_directory_contract(trained):
  workdir, m = trained
  with open(os.path.join(workdir, 'metrics.json')) as f:
    saved = json.load(f)
  assert set(saved) >= {'best_step', 'valid', 'test', 'baselines'}
  assert isinstance(saved['best_step'], int)
  assert REQUIRED_KEYS <= set(saved['test']) and REQUIRED_KEYS <= set(saved['valid'])
  assert all(np.isfinite(v) for v in saved['test'].values())
  with open(os.path.join(workdir, 'history.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert rows and all({'step', 'loss', 'loss_click', 'loss_like', 'loss_rating', 'examples_per_sec'} <= set(r)
                      for r in rows)
  assert [r['step'] for r in rows] == sorted(r['step'] for r in rows)
  for name in ('train', 'valid', 'test'):
    with open(os.path.join(workdir, 'splits', f'{name}.csv')) as f:
      assert f.readline().strip() == 'user_id,item_id,rating,timestamp'
  n = {name: sum(1 for _ in open(os.path.join(workdir, 'splits', f'{name}.csv'))) - 1
       for name in ('train', 'valid', 'test')}
  assert n['train'] == m['data']['train'] and n['test'] == m['data']['test']
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'best'))
  assert any(f.startswith('events') for f in os.listdir(os.path.join(workdir, 'tensorboard')))


@pytest.mark.parametrize('backbone', ['mmoe', 'ple'])
def test_each_backbone_trains(tmp_path, backbone):
  c = tiny_config(model__backbone=backbone, train__epochs=1)
  m = train_lib.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / 'history.jsonl') as f:
    losses = [json.loads(line)['loss'] for line in f]
  assert losses[-1] < losses[0]
  assert m['test']['click_auc'] > 0.6


def test_esmm_and_uncertainty_weighting_train(tmp_path):
  c = tiny_config(model__esmm=True, model__loss_weighting='uncertainty', train__epochs=1)
  m = train_lib.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(m['test']['like_auc']) and m['test']['click_auc'] > 0.6


def test_multiclass_like_head(tmp_path):
  c = tiny_config(train__epochs=1)
  c.tasks.like.kind = 'multiclass'
  c.tasks.like.label = 'rating_class'
  m = train_lib.train_and_evaluate(c, str(tmp_path))
  assert {'like_auc', 'like_accuracy', 'like_class_accuracy'} <= set(m['test'])


def test_same_seed_same_metrics(tmp_path):
  c = tiny_config(train__epochs=1)
  a = train_lib.train_and_evaluate(c, str(tmp_path / 'a'))
  b = train_lib.train_and_evaluate(c, str(tmp_path / 'b'))
  assert a['test'] == b['test']


def test_rerun_resumes_instead_of_starting_over(tmp_path):
  c = tiny_config(train__epochs=1)
  first = train_lib.train_and_evaluate(c, str(tmp_path))
  c.train.epochs = 2  # same workdir, longer schedule: continues from the saved step
  second = train_lib.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / 'history.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f]
  assert second['steps'] == 2 * first['steps']
  assert steps == sorted(set(steps))  # no step logged twice


def test_train_py_prints_the_test_table(tmp_path):
  import subprocess
  import sys
  r = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/synthetic.py', f'--workdir={tmp_path}',
       '--config.data.synthetic.num_users=200', '--config.data.synthetic.num_items=100',
       '--config.train.epochs=1', '--config.train.batch_size=128', '--config.train.progress_bar=False',
       '--config.mesh.shape=(1,1)'],
      capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Test metrics' in r.stdout
  for key in ('rating_rmse', 'like_auc', 'recall@10', 'popularity', 'bias-only'):
    assert key in r.stdout
  assert (tmp_path / 'metrics.json').exists()
