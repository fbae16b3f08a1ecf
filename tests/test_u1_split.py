"""The official u1 split on real MovieLens-100K."""

import numpy as np
import pytest

from configs import movielens_100k
from mtl_rec import features as features_lib
from mtl_rec.data import movielens, splits as splits_lib


@pytest.fixture(scope='module')
def ml100k():
  return movielens.load_100k()


def test_u1_test_is_the_first_20000_ratings(ml100k):
  s = splits_lib.make_split(ml100k, 'u1', seed=0, valid_fraction=0.05)
  np.testing.assert_array_equal(s.test, np.arange(20_000))
  assert s.train.size + s.valid.size == 80_000
  assert s.valid.size == 4_000
  assert np.intersect1d(s.train, s.valid).size == 0 and s.train.min() >= 20_000 and s.valid.min() >= 20_000
  # u1.test starts with u.data's first line (file order is kept).
  assert (ml100k.user_id[0], ml100k.item_id[0], ml100k.rating[0]) == (196, 242, 3.0)
  other = splits_lib.make_split(ml100k, 'u1', seed=1, valid_fraction=0.05)
  np.testing.assert_array_equal(other.test, s.test)  # the seed moves validation only
  assert not np.array_equal(other.valid, s.valid)


def test_vocabularies_come_from_u1_base_only(ml100k):
  s = splits_lib.make_split(ml100k, 'u1', seed=0)
  c = movielens_100k.get_config()
  enc = features_lib.fit(ml100k, s.train, c.features, row_multiple=c.features.row_multiple)
  train_items = np.unique(ml100k.item_id[s.train])
  assert enc.vocabs['item_id'].size == train_items.size + 1
  unseen = np.setdiff1d(ml100k.item_id[s.test], train_items)
  assert unseen.size > 0  # u1.test has items that u1.base never rated: they map to the OOV row
  assert (enc.vocabs['item_id'].lookup(unseen) == features_lib.OOV_ROW).all()
