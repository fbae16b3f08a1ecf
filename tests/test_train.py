"""End-to-end training on small synthetic data: learning, every backbone, the run directory, early stopping and
model selection, resume, determinism, train.py."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from conftest import REPO
from mtl_rec import evaluation, export, files, loop, runs, trees
from mtl_rec.scoring import NetworkScorer

pytestmark = pytest.mark.slow
# metrics.json's keys for the MovieLens schema's tasks (configs/movielens_schema.py)
REQUIRED_KEYS = {'rating_rmse', 'rating_mae', 'like_auc', 'like_logloss', 'like_accuracy', 'click_auc',
                 'click_logloss', 'recall@10', 'ndcg@10', 'hr@10_sampled', 'ndcg@10_sampled'}


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_config):
  workdir = str(tmp_path_factory.mktemp('run'))
  c = tiny_config(train__epochs=4, train__checkpoint_every_steps=50)
  c.data.synthetic.interactions_per_user = 40
  c.data.synthetic.num_users = 600
  c.data.synthetic.num_items = 300
  return workdir, loop.train_and_evaluate(c, workdir).metrics


def test_learns_the_planted_signal(trained):
  _, m = trained
  assert m['test']['click_auc'] > 0.75, m['test']
  assert m['test']['rating_rmse'] < m['baselines']['bias_only']['rating_rmse'] + 0.05, m
  # Items have a strong planted popularity; the model must learn the personal part on top of it.
  assert m['test']['click_auc'] > m['baselines']['popularity']['click_auc'] + 0.01, m
  assert m['test']['recall@10'] > m['baselines']['popularity']['recall@10'], m


def test_run_directory_contract(trained):
  workdir, m = trained
  saved = files.read_json(os.path.join(workdir, 'metrics.json'))
  assert set(saved) >= {'best_step', 'valid', 'test', 'baselines'}
  assert isinstance(saved['best_step'], int)
  assert REQUIRED_KEYS <= set(saved['test']) and REQUIRED_KEYS <= set(saved['valid'])
  assert all(np.isfinite(v) for v in saved['test'].values())
  with open(os.path.join(workdir, 'history.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert rows and all({'step', 'loss', 'loss_click', 'loss_like', 'loss_rating', 'examples_per_sec', 'grad_norm'}
                      <= set(r) for r in rows)
  assert [r['step'] for r in rows] == sorted(r['step'] for r in rows)
  for name in ('train', 'valid', 'test'):
    with open(os.path.join(workdir, 'splits', f'{name}.csv')) as f:
      assert f.readline().strip() == 'user_id,item_id,rating,timestamp'
  n = {name: sum(1 for _ in open(os.path.join(workdir, 'splits', f'{name}.csv'))) - 1
       for name in ('train', 'valid', 'test')}
  assert n['train'] == m['data']['train'] and n['test'] == m['data']['test']
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  rules = files.read_json(os.path.join(workdir, 'features.json'))
  assert rules['age']['kind'] == 'bucket' and rules['user_id'] == {'kind': 'vocab', 'raw': 'user_id',
                                                                   'raw_type': 'id', 'vocab': 'user_id'}
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'best'))
  assert any(f.startswith('events') for f in os.listdir(os.path.join(workdir, 'tensorboard')))


def test_early_stopping_selects_and_exports_the_best_checkpoint(tmp_path, tiny_config):
  """Validation RMSE gets worse after a few epochs on this small log (a high constant learning rate overfits it):
  training stops `patience` epochs after the best one, and that best checkpoint, not the last, is evaluated,
  written to metrics.json and exported."""
  c = tiny_config(train__epochs=12, train__patience=2, optimizer__learning_rate=0.02, optimizer__schedule='constant',
                  optimizer__weight_decay=0.0, optimizer__embedding_l2=0.0, train__early_stopping_metric='rating_rmse')
  result = loop.train_and_evaluate(c, str(tmp_path))
  m = result.metrics
  spe = result.run.exp.stream.steps_per_epoch
  epochs_run = m['steps'] // spe
  best_epoch = m['best_step'] // spe
  assert m['best_step'] < m['steps'], 'the last epoch was the best: the case this test is about did not happen'
  assert epochs_run == best_epoch + 2 < c.train.epochs  # stopped `patience` epochs after the best
  assert sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints' / 'best')) == [m['best_step']]
  # The saved metrics are the best checkpoint's: re-evaluating it gives them again, the last one does not.
  best = runs.load(str(tmp_path))
  assert best.step == m['best_step'] == result.run.step
  scorer = lambda run: NetworkScorer([run.network], run.exp.encoder, c.eval.batch_size)
  again = evaluation.full_metrics(scorer(best), best.exp, 'valid')
  assert again['rating_rmse'] == pytest.approx(m['valid']['rating_rmse'], rel=1e-6)
  last = runs.load(str(tmp_path), step=m['steps'], exp=best.exp)
  assert evaluation.full_metrics(scorer(last), last.exp, 'valid')['rating_rmse'] > m['valid']['rating_rmse']
  path = export.export_trained(result.run, str(tmp_path), m)
  manifest = files.read_json(os.path.join(path, 'manifest.json'))
  assert manifest['source']['step'] == m['best_step'] and manifest['metrics'] == pytest.approx(m['test'])


@pytest.mark.parametrize('backbone', ['mmoe', 'ple'])
def test_each_backbone_trains(tmp_path, tiny_config, backbone):
  m = loop.train_and_evaluate(tiny_config(model__backbone=backbone), str(tmp_path)).metrics
  with open(tmp_path / 'history.jsonl') as f:
    losses = [json.loads(line)['loss'] for line in f]
  assert losses[-1] < losses[0]
  assert m['test']['click_auc'] > 0.6


def test_esmm_and_uncertainty_weighting_train(tmp_path, tiny_config):
  c = tiny_config(model__esmm=True, model__loss_weighting='uncertainty')
  m = loop.train_and_evaluate(c, str(tmp_path)).metrics
  assert np.isfinite(m['test']['like_auc']) and m['test']['click_auc'] > 0.6


def test_multiclass_like_head(tmp_path, tiny_config):
  c = tiny_config()
  c.tasks.like.kind = 'multiclass'
  c.tasks.like.classes = (1.0, 2.0, 3.0, 4.0, 5.0)  # the ratings in class order; like = class value >= 4
  m = loop.train_and_evaluate(c, str(tmp_path)).metrics
  assert {'like_auc', 'like_accuracy', 'like_class_accuracy'} <= set(m['test'])


def test_same_seed_same_metrics(tmp_path, tiny_config):
  a = loop.train_and_evaluate(tiny_config(), str(tmp_path / 'a')).metrics
  b = loop.train_and_evaluate(tiny_config(), str(tmp_path / 'b')).metrics
  assert a['test'] == b['test']


def test_rerun_resumes_instead_of_starting_over(tmp_path, tiny_config):
  c = tiny_config()
  first = loop.train_and_evaluate(c, str(tmp_path)).metrics
  c.train.epochs = 2  # same workdir, longer schedule: continues from the saved step
  second = loop.train_and_evaluate(c, str(tmp_path)).metrics
  with open(tmp_path / 'history.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f]
  assert second['steps'] == 2 * first['steps']
  assert steps == sorted(set(steps))  # no step logged twice


def test_a_rerun_that_does_not_fit_the_checkpoint_leaves_the_finished_run_as_it_was(tmp_path, tiny_config):
  """A rerun in a finished run's workdir whose model does not fit its checkpoint is an error, and it is found
  before the run's description (config.json, the feature rules and vocabularies, the splits) is rewritten: the
  finished run, its export included, still matches its checkpoints."""
  c = tiny_config()
  loop.train_and_evaluate(c, str(tmp_path))
  described = ['config.json', 'features.json', 'vocab.npz', 'splits/train.csv', 'splits/test.csv']
  before = {name: (tmp_path / name).read_bytes() for name in described}
  wider = tiny_config(model__embed_dim=2 * c.model.embed_dim)
  with pytest.raises(ValueError, match='does not fit this config') as e:
    loop.train_and_evaluate(wider, str(tmp_path))
  # the message names a table whose shape changed, both shapes, found before any array is read
  assert f", {c.model.embed_dim}) in the checkpoint, " in str(e.value)
  assert f", {2 * c.model.embed_dim}) in this model" in str(e.value)
  with pytest.raises(ValueError, match='moving average.*set train.ema_decay as that run did'):
    loop.train_and_evaluate(tiny_config(train__ema_decay=0.9), str(tmp_path))  # trained without one
  # Same shapes, another run: another seed, split or data would continue (and re-export) the checkpoint's weights
  # with other vocabularies and splits; it was resumed silently, rewriting the run's description.
  with pytest.raises(ValueError, match=rf'another config .*config.seed is {c.seed + 1} here, {c.seed} there.*new '
                                       r'--workdir'):
    other = tiny_config()
    other.seed = c.seed + 1
    loop.train_and_evaluate(other, str(tmp_path))
  with pytest.raises(ValueError, match=r'config.data.valid_fraction is 0.5 here'):
    loop.train_and_evaluate(tiny_config(data__valid_fraction=0.5), str(tmp_path))
  assert {name: (tmp_path / name).read_bytes() for name in described} == before
  assert runs.load(str(tmp_path)).config.model.embed_dim == c.model.embed_dim  # loads with its own config


def test_a_checkpoint_from_before_a_config_field_existed_resumes_with_the_field_at_its_default(tiny_config):
  """A field added to the config schema after a run was checkpointed (its saved config lacks it) is taken at its
  base_config default, what that run trained with: the run resumes when the field is at the default and is refused,
  naming the field, when it is not (the missing key read as None refused every such run, even at the default)."""
  import types  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  saved = c.to_dict()
  del saved['optimizer']['embedding_weight_decay']  # a run of a version that did not have it
  ckpt = types.SimpleNamespace(latest=types.SimpleNamespace(directory='/w/checkpoints/latest/10'))
  loop._check_resumable(c, saved, 10, ckpt)  # pylint: disable=protected-access
  c.optimizer.embedding_weight_decay = 0.1
  with pytest.raises(ValueError, match=r'config.optimizer.embedding_weight_decay is 0.1 here, 0.0 there'):
    loop._check_resumable(c, saved, 10, ckpt)  # pylint: disable=protected-access
  c.optimizer.embedding_weight_decay = 0.0
  c.seed += 1  # a field the checkpoint's config has still compares with its saved value
  with pytest.raises(ValueError, match=rf'config.seed is {c.seed} here, {c.seed - 1} there'):
    loop._check_resumable(c, saved, 10, ckpt)  # pylint: disable=protected-access


class _Crash(Exception):
  pass


def test_crashes_between_checkpoint_saves_resume_into_the_same_run(tmp_path, tiny_config, monkeypatch):
  """Two crashes a kill can cause, each rerun against the uninterrupted run:
  1. at an epoch end that improves validation, between the best and the latest save: the latest used to be saved
     first, so a rerun resumed from it with its best lost and selected the last step instead;
  2. right after a mid-epoch checkpoint that is not a log step: the steps summed since the last history line were
     lost, so the next line averaged fewer steps than the uninterrupted run's (history.jsonl differed)."""
  from mtl_rec import checkpoint  # pylint: disable=g-import-not-at-top
  c = tiny_config(train__epochs=2, train__log_every_steps=7, train__checkpoint_every_steps=10)
  want = loop.train_and_evaluate(c, str(tmp_path / 'whole')).metrics
  spe = want['steps'] // 2
  assert want['best_step'] == spe  # epoch 1 is the best: its end saves both checkpoints
  history = lambda d: [json.loads(line) for line in (d / 'history.jsonl').read_text().splitlines()]
  real = checkpoint.Checkpointer._save

  def crash_at(step, nth, after=False):
    """Crash at the `nth` save of `step`: before it, or `after` it is on disk."""
    calls = []

    def save(mngr, at, *args):
      calls.extend([mngr] if at == step else [])
      if at == step and len(calls) == nth and not after:
        raise _Crash
      real(mngr, at, *args)
      mngr.wait_until_finished()  # on disk before anything that follows
      if at == step and len(calls) == nth:
        raise _Crash
    monkeypatch.setattr(checkpoint.Checkpointer, '_save', staticmethod(save))
    with pytest.raises(_Crash):
      loop.train_and_evaluate(c, str(tmp_path / f'crashed{step}'))
    monkeypatch.setattr(checkpoint.Checkpointer, '_save', staticmethod(real))
    got = loop.train_and_evaluate(c, str(tmp_path / f'crashed{step}')).metrics
    assert got['best_step'] == want['best_step'] and got['test'] == want['test'], step
    got_history, want_history = history(tmp_path / f'crashed{step}'), history(tmp_path / 'whole')
    assert [h['step'] for h in got_history] == [h['step'] for h in want_history]
    np.testing.assert_allclose([h['loss'] for h in got_history], [h['loss'] for h in want_history], rtol=1e-6)

  crash_at(spe, nth=2)  # the second of the epoch end's two saves
  crash_at(10, nth=1, after=True)  # right after the save at step 10, between the history lines of steps 7 and 14


def test_a_longer_schedule_stops_partway_down_it_and_extends_to_the_whole_run(tmp_path, tiny_config):
  """train.schedule_epochs=3 with train.epochs=2 trains the first two epochs of the 3-epoch run, the same bits;
  rerun with train.epochs=3 it resumes into exactly that run."""
  read = lambda d: {h['step']: h['loss'] for h in map(json.loads, (d / 'history.jsonl').read_text().splitlines())}
  full = loop.train_and_evaluate(tiny_config(train__epochs=3), str(tmp_path / 'full')).metrics
  part = loop.train_and_evaluate(tiny_config(train__epochs=2, train__schedule_epochs=3), str(tmp_path / 'part')).metrics
  assert part['steps'] * 3 == full['steps'] * 2
  full_losses, part_losses = read(tmp_path / 'full'), read(tmp_path / 'part')
  assert len(part_losses) > 2 and part_losses == {s: v for s, v in full_losses.items() if s <= part['steps']}
  rest = loop.train_and_evaluate(tiny_config(train__epochs=3, train__schedule_epochs=3), str(tmp_path / 'part'))
  assert rest.metrics['steps'] == full['steps'] and rest.metrics['test'] == full['test']
  assert read(tmp_path / 'part') == full_losses
  with pytest.raises(ValueError, match='train.schedule_epochs=2 is invalid: use 0 .* or at least train.epochs'):
    loop.train_and_evaluate(tiny_config(train__epochs=3, train__schedule_epochs=2), str(tmp_path / 'bad'))


def test_train_py_prints_the_test_table_and_exports(tmp_path):
  r = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/synthetic.py', f'--workdir={tmp_path}',
       '--config.data.synthetic.num_users=200', '--config.data.synthetic.num_items=100',
       '--config.train.epochs=1', '--config.train.batch_size=128', '--config.train.progress_bar=False',
       '--config.mesh.shape=(1,1)'],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Test metrics' in r.stdout
  for key in ('rating_rmse', 'like_auc', 'recall@10', 'popularity', 'bias-only'):
    assert key in r.stdout
  assert (tmp_path / 'metrics.json').exists()
  assert (tmp_path / 'export' / '1' / 'manifest.json').exists()


def test_a_moving_average_leaves_training_alone_and_is_the_model_a_run_evaluates_and_exports(tmp_path, tiny_config):
  """train.ema_decay: the trained parameters are bit for bit those of a run without it, step by step, beside their
  moving average; and the average is the run's model: its metrics, its best checkpoint as runs.load (mtl_rec.export,
  warm starts) reads it, not the trained parameters saved beside it."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mtl_rec import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from mtl_rec import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from mtl_rec import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  c, ce = tiny_config(train__epochs=2), tiny_config(train__epochs=2, train__ema_decay=0.8)
  exp = experiment_lib.build(c)
  plain = trainer_lib.make_trainer(c, exp.encoder.specs, exp.specs, 20)
  avg = trainer_lib.make_trainer(ce, exp.encoder.specs, exp.specs, 20)
  s0, s1 = plain.init_state, avg.init_state
  expected = jax.tree.map(np.array, s0['params'])
  for t, batch in zip(range(6), exp.stream.epoch(0)):
    b = sharding_lib.global_batch(batch, plain.batch_sharding)
    s0, _ = plain.train_step(s0, b)
    s1, _ = avg.train_step(s1, b)
    d = min(0.8, (t + 1) / (t + 2))
    expected = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), expected, s0['params'])
    jax.tree.map(np.testing.assert_array_equal, s1['params'], s0['params'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1['ema'], expected)

  result = loop.train_and_evaluate(ce, str(tmp_path))
  m = result.metrics
  assert m['memory']['ema_bytes_per_device'] == m['memory']['params_bytes_per_device']
  best = runs.load(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, best.network.params, result.run.network.params)
  step_dir = tmp_path / 'checkpoints' / 'best' / str(m['best_step']) / 'state'
  with warnings.catch_warnings():  # orbax: no target shardings given, it reads them from the files (as we want)
    warnings.simplefilter('ignore', UserWarning)
    saved = ocp.PyTreeCheckpointer().restore(str(step_dir))  # integer keys come back as strings: compare by path
  by_path = lambda tree: {path: np.asarray(x) for path, x in trees.leaves_by_path(tree).items()}
  loaded, ema, trained = by_path(best.network.params), by_path(saved['ema']), by_path(saved['params'])
  assert loaded.keys() == ema.keys() == trained.keys()
  assert all(np.array_equal(loaded[k], ema[k]) for k in loaded)
  assert not all(np.array_equal(loaded[k], trained[k]) for k in loaded)
  scorer = NetworkScorer([best.network], best.exp.encoder, ce.eval.batch_size)
  again = evaluation.full_metrics(scorer, best.exp, 'valid')
  assert again['rating_rmse'] == pytest.approx(m['valid']['rating_rmse'], rel=1e-6)
