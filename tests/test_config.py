"""Config schema, validation errors and command-line overrides."""

import subprocess
import sys

import pytest

from mtl_rec import config as config_lib
from configs import movielens_100k, movielens_1m, synthetic


@pytest.mark.parametrize('module', [movielens_100k, movielens_1m, synthetic])
def test_shipped_configs_validate(module):
  config_lib.validate(module.get_config())


def test_tiny_variant_validates_and_unknown_variants_are_named():
  tiny = synthetic.get_config('tiny')
  config_lib.validate(tiny)
  assert tiny.data.synthetic.num_users < synthetic.get_config().data.synthetic.num_users
  with pytest.raises(ValueError, match='tiny'):
    synthetic.get_config('huge')


@pytest.mark.parametrize('field, value, message', [
    ('data.source', 'netflix', 'data.source'),
    ('model.backbone', 'transformer', 'shared_bottom'),
    ('train.batch_size', 0, 'train.batch_size'),
    ('data.valid_fraction', 1.5, 'valid_fraction'),
    ('sampling.distribution', 'zipf', 'popularity'),
    ('train.early_stopping_metric', 'auc', 'early_stopping_metric'),
    ('optimizer.learning_rate', -1.0, 'learning_rate'),
    ('mesh.shape', (2, 2, 2), 'mesh.shape'),
    ('features.user', ('user_id', 'height'), 'features.user'),
])
def test_bad_values_name_the_field(field, value, message):
  c = config_lib.base_config()
  section, key = field.split('.')
  c[section][key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_cross_field_rules():
  c = config_lib.base_config()
  c.data.source = 'synthetic'  # u1 is ML-100K's split only
  with pytest.raises(ValueError, match="u1"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.tasks.rating.kind = 'binary'  # a rating label needs a regression head
  with pytest.raises(ValueError, match='regression'):
    config_lib.validate(c)
  c = config_lib.base_config()
  del c.tasks['like']
  c.model.esmm = True
  with pytest.raises(ValueError, match='ESMM'):
    config_lib.validate(c)


def test_json_round_trip_keeps_every_field():
  c = synthetic.get_config()
  c.model.backbone = 'ple'
  back = config_lib.from_json(config_lib.to_json(c))
  assert back.to_dict() == c.to_dict()


def _run_train(*flags):
  return subprocess.run([sys.executable, 'train.py', '--workdir=/nonexistent/never-written', *flags],
                        capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_key_and_bad_type():
  r = _run_train('--config=configs/synthetic.py', '--config.train.epoch=3')
  assert r.returncode != 0 and 'epoch' in r.stderr
  r = _run_train('--config=configs/synthetic.py', '--config.train.epochs=three')
  assert r.returncode != 0 and 'epochs' in r.stderr


def test_cli_bad_value_is_a_clear_error_not_a_traceback():
  r = _run_train('--config=configs/synthetic.py', '--config.model.backbone=transformer')
  assert r.returncode != 0
  assert 'config.model.backbone' in r.stderr and 'Traceback' not in r.stderr
