"""Config schema, validation errors and command-line overrides."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mtl_rec import config as config_lib
from mtl_rec import errors
from configs import movielens_100k, movielens_100k_history, movielens_1m, movielens_tfds, synthetic


@pytest.mark.parametrize('module', [movielens_100k, movielens_1m, movielens_tfds, synthetic])
def test_shipped_configs_validate(module):
  config_lib.validate(module.get_config())


def test_tiny_variant_validates_and_unknown_variants_are_named():
  tiny = synthetic.get_config('tiny')
  config_lib.validate(tiny)
  assert tiny.data.synthetic.num_users < synthetic.get_config().data.synthetic.num_users
  with pytest.raises(ValueError, match='tiny'):
    synthetic.get_config('huge')
  both = synthetic.get_config('tiny,retrieval')
  config_lib.validate(both)
  assert both.data.synthetic.num_users == tiny.data.synthetic.num_users
  assert config_lib.retrieval_stage(both) == ('retrieval', 1000) and config_lib.retrieval_stage(tiny) is None
  assert config_lib.retrieval_stage(both, ('click', 'like', 'rating')) is None  # no network answers it
  both.export.retrieve_n = 0  # the fused heads rank the whole catalog
  assert config_lib.retrieval_stage(both) is None


def test_history_variants_add_and_drop_histories_of_the_default():
  histories = lambda c: sorted(n for n, f in c.features.items() if f.kind == 'history')
  assert histories(movielens_100k.get_config()) == ['user_history', 'user_liked']
  for variant, want in (('both', ['item_audience', 'user_history', 'user_liked']),
                        ('user', ['user_history', 'user_liked']), ('implicit', ['user_history']),
                        ('item', ['item_audience']), ('none', [])):
    c = movielens_100k_history.get_config(variant)
    config_lib.validate(c)
    assert histories(c) == want, variant
  assert movielens_100k_history.get_config('implicit').features.user_history.max_values == 32  # the earlier default
  with pytest.raises(ValueError, match=':both'):
    movielens_100k_history.get_config('users')


@pytest.mark.parametrize('field, value, message', [
    ('data.source', 'netflix', 'data.source'),
    ('model.backbone', 'transformer', 'shared_bottom'),
    ('train.batch_size', 0, 'train.batch_size'),
    ('data.valid_fraction', 1.5, 'valid_fraction'),
    ('sampling.distribution', 'zipf', 'popularity'),
    ('train.early_stopping_metric', 'auc', 'early_stopping_metric'),
    ('optimizer.learning_rate', -1.0, 'learning_rate'),
    ('mesh.shape', (2, 2, 2), 'mesh.shape'),
    ('data.split', 'u2', 'data.split'),
    ('model.embed_dim', 0, 'model.embed_dim'),
    ('export.retrieve_n', 50, r'at least export.max_k \(100\)'),
    ('export.retrieve_n', -1, 'export.retrieve_n'),
    ('train.ema_decay', 1.0, r'train.ema_decay=1.0 is invalid: must be in \[0, 1\)'),
    ('train.ema_decay', -0.1, 'train.ema_decay'),
    ('optimizer.embedding_weight_decay', -0.3, r'optimizer.embedding_weight_decay=-0.3 is invalid: must be >= 0'),
])
def test_bad_values_name_the_field(field, value, message):
  c = movielens_100k.get_config()
  section, key = field.split('.')
  c[section][key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


@pytest.mark.parametrize('change, message', [
    (lambda c: setattr(c.features.gender, 'kind', 'image'), 'features.gender.kind'),
    (lambda c: c.features.gender.update(kind='text', vocabulary='hash'), 'features.gender.hash_buckets'),
    (lambda c: setattr(c.features.gender, 'dropout', 1.0), 'features.gender.dropout'),
    (lambda c: c.features.gender.update(kind='text', char_ngrams=1), 'features.gender.max_tokens'),
    (lambda c: setattr(c.features.gender, 'kind', 'vector'), 'features.gender.dim'),
    (lambda c: c.features.gender.update(kind='vector', dim=4, entity='context'), 'request-time vector'),
    (lambda c: setattr(c.data, 'cold_items', 1.0), 'data.cold_items'),
    (lambda c: setattr(c.data, 'cold_users', -0.1), 'data.cold_users'),
    (lambda c: setattr(c.features.gender, 'entity', 'session'), 'features.gender.entity'),
    (lambda c: c.features.gender.update(vocabulary='hash'), 'hash_buckets'),
    (lambda c: setattr(c.features.genres, 'sharded', True), 'features.genres.sharded'),
    (lambda c: setattr(c.features.genres, 'delimiter', ''), 'features.genres.delimiter'),
    (lambda c: setattr(c.features.age, 'boundaries', (30, 20)), 'strictly increasing'),
    (lambda c: setattr(c.tasks.rating, 'kind', 'multiclass'), 'tasks.rating.classes'),
    (lambda c: setattr(c.tasks.click, 'rows', 'observed'), "label 'observed'"),
    (lambda c: setattr(c.tasks.rating, 'rows', 'all'), 'tasks.rating.rows'),
    (lambda c: setattr(c.tasks.rating, 'range', (5.0, 1.0)), 'tasks.rating.range'),
    (lambda c: setattr(c.tasks.rating, 'threshold', 3.0), 'tasks.rating.threshold'),
    (lambda c: setattr(c.sampling, 'num_negatives', 0), 'sampled negatives'),
    (lambda c: setattr(c.eval, 'ranking_task', 'watch'), 'eval.ranking_task'),
    (lambda c: setattr(c.data, 'split', 'column'), 'split_column'),
    (lambda c: c.update({'data': {'source': 'files'}}), 'data.log.paths'),
    (lambda c: setattr(c.features.user_history, 'where', 'rating => 4'), r"features.user_history.where.*'rating >= 4'"),
    (lambda c: setattr(c.features.user_history, 'where', 'rating >= four'), 'features.user_history.where'),
    (lambda c: setattr(c.features.gender, 'where', 'rating >= 4'), "only kind='history'"),
    (lambda c: setattr(c.features.user_history, 'of', 'itm'),
     r"features.user_history.of='itm' is invalid: .*; this config has one: of='item_id'"),
    (lambda c: c.features.update({'stars': config_lib.feature('context', 'rating', kind='numeric')}),
     r"features.stars='rating' is invalid: is the label column of task '(like|rating)'"),  # the answer as an input
])
def test_bad_schema_declarations_name_the_field(change, message):
  c = movielens_100k.get_config()
  change(c)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


@pytest.mark.parametrize('text, want', [('rating >= 4', ('rating', '>=', 4.0)), ('rating<=2.5', ('rating', '<=', 2.5)),
                                        (' watch_fraction > .5 ', ('watch_fraction', '>', 0.5)),
                                        ('x != -1e3', ('x', '!=', -1000.0)), ('x==0', ('x', '==', 0.0))])
def test_history_conditions_parse(text, want):
  assert config_lib.history_condition(text, 'f') == want


def test_cross_field_rules():
  c = movielens_100k.get_config()
  with c.unlocked():
    del c.tasks['like']
  c.model.esmm = True
  with pytest.raises(ValueError, match='ESMM'):
    config_lib.validate(c)
  c = movielens_100k.get_config()
  with c.unlocked():
    c.features = config_lib.ml_collections.ConfigDict({'user_id': config_lib.feature('user', 'user_id')})
  with pytest.raises(ValueError, match="'item' feature"):
    config_lib.validate(c)
  # what updates every row each step is refused beside the row-wise table optimizers, for all or some tables
  for ema, decay, tables, named in [(0.99, 0.0, {'name': 'rowwise_adagrad'}, 'train.ema_decay=0.99'),
                                    (0.0, 0.3, {'by_feature': 'user_id=lazy_adam'},
                                     'optimizer.embedding_weight_decay=0.3')]:
    c = movielens_100k.get_config()
    c.train.ema_decay, c.optimizer.embedding_weight_decay = ema, decay
    c.optimizer.tables.update(tables)
    with pytest.raises(ValueError, match=f'{named} .*row-wise table optimizers'):
      config_lib.validate(c)


def test_declaration_order_survives_copies_and_json():
  """The model's inputs and heads follow the order a config declares them in, whatever ConfigDict does to keys."""
  import copy  # pylint: disable=g-import-not-at-top
  c = movielens_100k.get_config()
  want = ['user_id', 'gender', 'age', 'occupation', 'zip', 'item_id', 'genres', 'year', 'title', 'user_history',
          'user_liked']
  for copy_of in (c, copy.deepcopy(c), config_lib.from_json(config_lib.to_json(c))):
    assert [n for n, _ in config_lib.ordered(copy_of.features)] == want
    assert [n for n, _ in config_lib.ordered(copy_of.tasks)] == ['click', 'like', 'rating', 'retrieval']
  assert config_lib.ranking_task(c) == 'retrieval' and config_lib.early_stopping_metric(c) == 'rating_rmse'


def test_json_round_trip_keeps_every_field():
  c = synthetic.get_config()
  c.model.backbone = 'ple'
  c.tasks.like.threshold = 3.5
  back = config_lib.from_json(config_lib.to_json(c))
  assert back.to_dict() == c.to_dict()


def _run_train(*flags):
  return subprocess.run([sys.executable, 'train.py', '--workdir=/nonexistent/never-written', *flags],
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('flags, phrase', [
    (['--config=configs/synthetic.py', '--config.train.epoch=3'],  # ml_collections raises at flag definition
     'names no field of the config: \'epoch\'\nDid you mean "epochs"'),
    (['--config=configs/synthetic.py', '--config.tasks.purchase.label=bought'],
     "names no field of the config: 'purchase'"),
    (['--config=configs/synthetic.py', '--config.train.epochs=three'], "--config.train.epochs=three: invalid literal"),
    (['--config=configs/no_such_config.py'], 'Pass --config=<an existing config file>'),
    (['--config=configs/synthetic.py:bogus'], "error: configs/synthetic.py:bogus: 'bogus' is not a variant"),  # its own
    (['--config=configs/movielens_100k_files.py'], 'error: name the directory of the tables'),  # ConfigError
])
def test_cli_flag_and_config_file_mistakes_are_one_error_line_not_a_traceback(flags, phrase):
  """Mistakes ml_collections finds while flags are parsed (before main runs) get train.py's `error:` line too."""
  r = _run_train(*flags)
  assert r.returncode == 1 and 'error: ' in r.stderr and phrase in r.stderr, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr and not os.path.exists('/nonexistent/never-written')


@pytest.mark.parametrize('args, phrase', [
    (['train.py', '--workdir={tmp}/run', '--init_from={tmp}/no_such_run'], 'no_such_run holds no checkpoint'),
    (['train.py', '--workdir={tmp}/run', '--init_from={tmp}/run/checkpoints/latest/7'], 'holds no checkpoint'),
    (['train.py', '--workdir='], '--workdir is empty'),  # created ./checkpoints, then a FileNotFoundError
    (['train.py', '--workdir={tmp}/a_file/run'], 'a_file is not a directory'),  # NotADirectoryError after loading
    (['-m', 'mtl_rec.benchmark', '--out={tmp}/a_file'], '--out={tmp}/a_file is a file, not a directory'),
    (['-m', 'mtl_rec.export', '--workdir={tmp}/run', '--export_dir={tmp}/a_file'], 'is a file, not a directory'),
    (['-m', 'mtl_rec.export', '--workdir={tmp}/run', '--version=-3'], 'versions are non-negative'),
    (['-m', 'mtl_rec.benchmark', '--out={tmp}/b', '--fusion_negatives=-5'], '--fusion_negatives=-5: the fusion fits'),
    (['-m', 'mtl_rec.benchmark', '--out={tmp}/b', '--serving_requests=0'], '--serving_requests=0: the serving cost'),
    (['-m', 'mtl_rec.scale_benchmark', '--out={tmp}', '--steps=2'], '--out={tmp} is a directory'),
    (['-m', 'mtl_rec.scale_benchmark', '--out={tmp}/r.json', '--num_users=0'], '--num_users=0: 0 is not a positive'),
    (['-m', 'mtl_rec.scale_benchmark', '--out={tmp}/r.json', '--mesh=2,x'], 'give the mesh as two sizes'),
])
def test_cli_paths_are_checked_before_any_work(tmp_path, args, phrase):
  """A bad --init_from (ignored by a resumed run, so a typo went unnoticed; a missing one ended in an Orbax thread's
  traceback at exit), a --out or --export_dir that is a file: one `error:` line, before anything is trained,
  loaded or created."""
  (tmp_path / 'a_file').write_text('keep')
  args = [a.replace('{tmp}', str(tmp_path)) for a in args]
  r = subprocess.run([sys.executable, *args, '--config=configs/synthetic.py:tiny'] if 'mtl_rec.export' not in args
                     else [sys.executable, *args], capture_output=True, text=True, timeout=120)
  assert r.returncode in (1, 2) and 'error: ' in r.stderr and phrase.replace('{tmp}', str(tmp_path)) in r.stderr, (
      r.stderr[-2000:])
  assert 'Traceback' not in r.stderr and (tmp_path / 'a_file').read_text() == 'keep'
  assert not (tmp_path / 'run').exists()


def test_cli_auto_detected_cluster_that_is_not_there_is_a_usage_error(tmp_path):
  """--num_processes=-1 outside a cluster jax recognizes was jax's 'coordinator_address should be defined' traceback."""
  r = _run_train('--config=configs/synthetic.py:tiny', f'--workdir={tmp_path}/run', '--num_processes=-1')
  assert r.returncode == 1 and '--num_processes=-1 found no cluster to join' in r.stderr, r.stderr[-2000:]
  assert '--coordinator_address=HOST:PORT' in r.stderr and 'Traceback' not in r.stderr


def test_cli_workdir_that_is_a_file_is_an_error_and_the_file_is_kept(tmp_path):
  path = tmp_path / 'log.csv'
  path.write_text('user,item\n1,2\n')
  r = subprocess.run([sys.executable, 'train.py', f'--workdir={path}', '--config=configs/synthetic.py'],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and f'error: --workdir={path} is a file, not a directory' in r.stderr, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr and path.read_text() == 'user,item\n1,2\n'


def test_cli_bad_value_is_a_clear_error_not_a_traceback():
  r = _run_train('--config=configs/synthetic.py', '--config.model.backbone=transformer')
  assert r.returncode != 0
  assert 'config.model.backbone' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.slow  # a train.py subprocess
def test_cli_reports_our_errors_in_one_line_and_keeps_a_bugs_traceback():
  """Only our own errors (errors.Error: config, flags, data files, run directories) become a one-line `error:`;
  any other exception escaping train.py, a numpy ValueError included, is a bug and keeps its traceback."""
  with pytest.raises(SystemExit, match=r'^error: config.x=1 is invalid'):
    with errors.reported():
      raise config_lib._err('x', 1, 'use 2')  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='could not be broadcast'):  # not a SystemExit: it propagates
    with errors.reported():
      _ = np.zeros(3) + np.zeros(2)
  assert issubclass(errors.DataError, ValueError) and issubclass(errors.ConfigError, ValueError)  # old callers
  bug = ('import sys, numpy as np, train; from absl import app; from mtl_rec import loop; '
         'loop.train_and_evaluate = lambda *a: np.zeros(3) + np.zeros(2); app.run(train.main, argv=sys.argv)')
  r = subprocess.run([sys.executable, '-c', bug, '--workdir=/nonexistent/never-written'], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode != 0
  assert 'Traceback' in r.stderr and 'could not be broadcast' in r.stderr and 'error: operands' not in r.stderr
