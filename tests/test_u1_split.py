"""The official u1 split on real MovieLens-100K: the ML-100K preset's 'head' split of 20,000 rows."""

import numpy as np
import pytest

from configs import movielens_100k
from mtl_rec import experiment
from mtl_rec import features as features_lib
from mtl_rec.data import loader, splits as splits_lib


@pytest.fixture(scope='module')
def ml100k():
  return loader.load_data(movielens_100k.get_config())


def test_u1_test_is_the_first_20000_ratings(ml100k):
  c = movielens_100k.get_config()
  s = splits_lib.make_split(ml100k, c.data, seed=0)
  np.testing.assert_array_equal(s.test, np.arange(20_000))
  assert s.train.size + s.valid.size == 80_000
  assert abs(s.valid.size - 4_000) < 250  # valid_fraction 0.05 of 80,000, row by row
  assert np.intersect1d(s.train, s.valid).size == 0 and s.train.min() >= 20_000 and s.valid.min() >= 20_000
  # u1.test starts with u.data's first line (file order is kept).
  log = ml100k.log
  assert (log['user_id'][0], log['item_id'][0], log['rating'][0]) == (196, 242, 3.0)
  other = splits_lib.make_split(ml100k, c.data, seed=1)
  np.testing.assert_array_equal(other.test, s.test)  # the seed moves validation only
  assert not np.array_equal(other.valid, s.valid)


def test_vocabularies_come_from_u1_base_only(ml100k):
  exp = experiment.build(movielens_100k.get_config(), ml100k)
  items = ml100k.log['item_id']
  train_items = np.unique(items[exp.split.train])
  assert exp.encoder.vocabs['item_id'].size == train_items.size + 1
  unseen = np.setdiff1d(items[exp.split.test], train_items)
  assert unseen.size > 0  # u1.test has items that u1.base never rated: they map to the OOV row
  assert (exp.encoder.vocabs['item_id'].lookup(unseen) == features_lib.OOV_ROW).all()
