"""Splits, features, negative sampling, batches and masked task losses on a small hand-built dataset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import movielens_schema
from mtl_rec import config as config_lib
from mtl_rec import encoding
from mtl_rec import experiment
from mtl_rec import features as features_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.data import splits as splits_lib
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.data.types import ItemTable, RatingsData, UserTable, to_dataset
from mtl_rec.input_pipeline import Examples, TrainStream, to_batch


def small_config(**data):
  """The MovieLens schema over small_data (genres 'a'..'d')."""
  c = movielens_schema.apply(config_lib.base_config())
  c.data.source = 'synthetic'  # given as a Dataset to experiment.build: the source is not read
  c.features.genres.categories = ('a', 'b', 'c', 'd')
  c.data.update(data)
  return c


def mean_losses(outputs, batch, specs, esmm=False):
  """{task: masked mean loss}: the train step's per-task sums over the batch's normalizers."""
  sums, norms = tasks_lib.masked_sums(outputs, batch, specs, esmm), tasks_lib.normalizers(batch, specs, esmm)
  return {k: v / norms['tasks'][k] for k, v in sums.items()}


def small_ratings(num_users=40, num_items=30, per_user=8, seed=0) -> RatingsData:
  rng = np.random.default_rng(seed)
  users = np.repeat(np.arange(1, num_users + 1), per_user)
  items = np.concatenate([rng.choice(np.arange(1, num_items + 1), per_user, replace=False)
                          for _ in range(num_users)])
  ut = UserTable(np.arange(1, num_users + 1), rng.choice(['M', 'F'], num_users).astype(object),
                 rng.integers(10, 70, num_users).astype(np.int32), rng.choice(['a', 'b', 'c'], num_users),
                 rng.choice(['12345', '54321', '99999'], num_users))
  it = ItemTable(np.arange(1, num_items + 1), np.array([f't{i}' for i in range(num_items)]),
                 rng.integers(1950, 2000, num_items).astype(np.int32), rng.random((num_items, 4)) < 0.4,
                 ('a', 'b', 'c', 'd'))
  return RatingsData('small', 'test', users.astype(np.int64), items.astype(np.int64),
                     rng.integers(1, 6, users.size).astype(np.float32), rng.permutation(users.size).astype(np.int64),
                     ut, it)


def small_data(**kw):
  return to_dataset(small_ratings(**kw))


@pytest.mark.parametrize('method', ['random', 'leave_last_out'])
def test_splits_are_disjoint_and_cover_every_row(method):
  data = small_data()
  dc = small_config(split=method, valid_fraction=0.1, test_fraction=0.2).data
  s = splits_lib.make_split(data, dc, seed=3)
  parts = [s.train, s.valid, s.test]
  assert sum(p.size for p in parts) == data.num_rows
  assert np.unique(np.concatenate(parts)).size == data.num_rows
  again = splits_lib.make_split(data, dc, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(parts, [again.train, again.valid, again.test]))


def test_leave_last_out_holds_out_each_users_latest_rating():
  data = small_data()
  s = splits_lib.make_split(data, small_config(split='leave_last_out').data, seed=0)
  assert s.test.size == 40
  users, times = data.log['user_id'], data.log['timestamp']
  for row in s.test:
    assert times[row] == times[users == users[row]].max()


def test_timestamp_head_and_column_splits():
  data = small_data()
  times = data.log['timestamp']
  cut = int(np.quantile(times, 0.8))
  s = splits_lib.make_split(data, small_config(split='timestamp', split_cut=cut).data, seed=0)
  assert (times[s.test] >= cut).all() and (times[np.concatenate([s.train, s.valid])] < cut).all()
  s = splits_lib.make_split(data, small_config(split='head', split_test_rows=50).data, seed=0)
  np.testing.assert_array_equal(s.test, np.arange(50))
  names = np.where(np.arange(data.num_rows) % 10 == 0, 'test', np.where(np.arange(data.num_rows) % 10 == 1, 'valid',
                                                                          'train'))
  with_column = to_dataset(small_ratings())
  with_column.log['set'] = names
  s = splits_lib.make_split(with_column, small_config(split='column', split_column='set').data, seed=0)
  assert (names[s.test] == 'test').all() and (names[s.valid] == 'valid').all() and (names[s.train] == 'train').all()
  with_column.log['set'] = np.where(names == 'valid', 'dev', names)
  with pytest.raises(ValueError, match="'dev'"):
    splits_lib.make_split(with_column, small_config(split='column', split_column='set').data, seed=0)
  with pytest.raises(ValueError, match='split_cut'):
    splits_lib.make_split(data, small_config(split='timestamp', split_cut=int(times.max()) + 1).data, seed=0)


def _fit(data, train, c=None):
  users, items = data.log['user_id'] - 1, data.log['item_id'] - 1  # ids are 1..N in table order
  return features_lib.fit(data, train, c or small_config(), users, items)


def test_vocabularies_are_fitted_on_train_only_with_oov_row():
  data = small_data()
  train = np.nonzero(data.log['user_id'] != 7)[0]  # user 7 appears only outside training
  enc = _fit(data, train)
  pos7 = int(np.nonzero(data.users['user_id'] == 7)[0][0])
  assert enc.user_table['user_id'][pos7] == features_lib.OOV_ROW
  known = enc.user_table['user_id'][data.users['user_id'] != 7]
  assert known.min() >= 1 and np.unique(known).size == known.size
  spec = next(s for s in enc.specs if s.name == 'user_id')
  assert spec.vocab_size % 8 == 0 and spec.vocab_size >= 40  # 39 known users + OOV, padded
  assert enc.vocabs['user_id'].lookup(np.array([123456]))[0] == features_lib.OOV_ROW


def test_age_buckets():
  rule = {'kind': 'bucket', 'raw': 'age', 'raw_type': 'float', 'boundaries': [18, 25, 35, 45, 50, 56]}
  b = encoding.encode(rule, np.array([np.nan, 5, 18, 24, 25, 56, 80]), {})
  assert b.tolist() == [0, 1, 2, 2, 3, 7, 7]  # missing: the OOV row
  assert encoding.rows(rule, {}) == 8  # OOV + 7 buckets


def test_min_count_max_size_and_fixed_vocabularies():
  data = small_data()
  rows = np.arange(data.num_rows)
  c = small_config()
  c.features.occupation.min_count = 10**6  # no value is that frequent: everything is out of vocabulary
  c.features.gender.categories = ('M', 'F')  # row order as declared
  c.features.zip.max_size = 1
  enc = _fit(data, rows, c)
  assert (enc.user_table['occupation'] == 0).all() and enc.spec('occupation').vocab_size == 1
  np.testing.assert_array_equal(enc.user_table['gender'], np.where(data.users['gender'] == 'M', 1, 2))
  counts = {z: int(np.sum(data.users['zip_code'][data.log['user_id'] - 1].astype('<U2') == z)) for z in ('12', '54', '99')}
  top = max(counts, key=counts.get)
  assert enc.vocabs['zip'].keys.tolist() == [top]  # the most frequent area among training interactions


def test_sampler_never_returns_a_training_positive():
  rng = np.random.default_rng(0)
  users = rng.integers(0, 50, 2000)
  items = rng.integers(0, 40, 2000)  # dense: about 2/3 of each user's items are positives
  for dist in ('uniform', 'popularity'):
    s = NegativeSampler(users, items, np.arange(40), 40, dist)
    q = rng.integers(0, 50, 500)
    neg = s.sample(q, 6, rng)
    pos = set(zip(users.tolist(), items.tolist()))
    assert neg.shape == (500, 6)
    assert not any((int(u), int(i)) in pos for u, row in zip(q, neg) for i in row)


def test_sampler_popularity_distribution_follows_counts():
  users = np.zeros(0, np.int64)
  counts = np.array([1, 10, 100, 1000])
  s = NegativeSampler(users, np.zeros(0, np.int64), np.arange(4), 4, 'popularity', 0.75, popularity_counts=counts)
  draws = s.sample(np.zeros(20000, np.int64), 1, np.random.default_rng(1)).ravel()
  freq = np.bincount(draws, minlength=4) / draws.size
  want = counts ** 0.75 / (counts ** 0.75).sum()
  np.testing.assert_allclose(freq, want, atol=0.01)


def test_sampler_rejects_users_that_saw_every_item():
  s = NegativeSampler(np.zeros(3, np.int64), np.arange(3), np.arange(3), 3)
  with pytest.raises(ValueError, match='every candidate'):
    s.sample(np.array([0]), 1, np.random.default_rng(0))


def _stream(num_negatives=3, batch_size=16, dropout=None):
  data = small_data()
  c = small_config(split='random')
  exp = experiment.build(c, data)
  rows = np.arange(data.num_rows)
  sampler = NegativeSampler(exp.user_index, exp.item_index, np.arange(30), 30)
  return TrainStream(exp.positives(rows), exp.encoder, sampler, num_negatives, batch_size, exp.labels, seed=0,
                     dropout=dropout), data


def test_feature_dropout_hides_a_seeded_share_of_training_rows():
  """features.<name>.dropout: that share of training rows sees the feature missing (OOV row, no values); the other
  features and rows are untouched, and regenerating an epoch drops the same rows."""
  plain = list(_stream(batch_size=64)[0].epoch(1))
  stream = _stream(batch_size=64, dropout={'item_id': 0.3, 'genres': 0.5, 'gender': 0.0})[0]
  dropped = list(stream.epoch(1))
  ids = np.concatenate([b['item']['item_id'] for b in dropped])
  base = np.concatenate([b['item']['item_id'] for b in plain])
  hidden = ids != base
  assert (ids[hidden] == encoding.OOV_ROW).all() and (base[hidden] != encoding.OOV_ROW).all()
  assert 0.25 < hidden.mean() < 0.35, hidden.mean()
  genres = np.concatenate([b['item']['genres'] for b in dropped])
  genres_hidden = (genres != np.concatenate([b['item']['genres'] for b in plain])).any(axis=1)
  assert (genres[genres_hidden] == -1).all() and 0.4 < genres_hidden.mean() < 0.6
  assert abs(np.corrcoef(hidden, genres_hidden)[0, 1]) < 0.15  # drawn independently per feature
  for a, b in zip(plain, dropped):  # everything else as without dropout
    for key in ('gender', 'age', 'occupation', 'zip'):
      np.testing.assert_array_equal(a['user'][key], b['user'][key])
    np.testing.assert_array_equal(a['labels']['rating'], b['labels']['rating'])
  for a, b in zip(dropped, stream.epoch(1)):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_train_stream_is_deterministic_and_resumable():
  stream, data = _stream()
  full = list(stream.epoch(2))
  resumed = list(stream.epoch(2, start_step=5))
  assert len(full) == stream.steps_per_epoch == data.num_rows * 4 // 16
  for a, b in zip(full[5:], resumed):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  other = next(stream.epoch(3))  # negatives are resampled and rows reshuffled every epoch
  assert not np.array_equal(full[0]['item']['item_id'], other['item']['item_id'])


def test_batches_mask_labels_of_unobserved_pairs():
  stream, _ = _stream()
  b = next(stream.epoch(0))
  neg = b['observed'] == 0
  assert neg.any() and (~neg).any()
  assert (b['labels']['click'] == b['observed']).all()
  assert (b['labels']['like'][neg] == 0).all() and (b['labels']['rating'][neg] == 0).all()
  assert (b['defined']['click'] == 1).all() and (b['defined']['rating'] == b['observed']).all()


def test_masked_losses_ignore_unobserved_pairs():
  stream, _ = _stream()
  specs = stream.labels.specs
  b = next(stream.epoch(0))
  batch = jax.tree.map(jnp.asarray, {k: b[k] for k in ('labels', 'defined', 'observed', 'valid')})
  rng = np.random.default_rng(0)
  outputs = {s.name: jnp.asarray(rng.normal(size=16), jnp.float32) for s in specs}
  base = mean_losses(outputs, batch, specs)
  neg = np.asarray(batch['observed']) == 0
  # Wild outputs on unobserved rows change the click loss but not the like/rating losses.
  wild = {k: jnp.where(neg, 1e3, v) for k, v in outputs.items()}
  changed = mean_losses(wild, batch, specs)
  assert float(changed['click']) != pytest.approx(float(base['click']))
  assert float(changed['like']) == pytest.approx(float(base['like']))
  assert float(changed['rating']) == pytest.approx(float(base['rating']))
  obs = ~neg
  want = np.mean((np.asarray(outputs['rating'])[obs] - np.asarray(batch['labels']['rating'])[obs]) ** 2)
  assert float(base['rating']) == pytest.approx(want, rel=1e-5)
  # Padding rows (valid = 0) count for no task.
  batch_pad = dict(batch, valid=jnp.where(neg, 0.0, 1.0))
  padded = mean_losses(wild, batch_pad, specs)
  clean = mean_losses(outputs, batch_pad, specs)
  assert float(padded['click']) == pytest.approx(float(clean['click']))
  # A part of the batch sums its rows over the whole batch's normalizers: the parts add up to the batch.
  norms = tasks_lib.normalizers(batch, specs)
  half = lambda x, s: jax.tree.map(lambda a: a[s], x)
  parts = [tasks_lib.masked_sums(half(outputs, s), half(batch, s), specs) for s in (slice(0, 7), slice(7, 16))]
  for k in base:
    assert float((parts[0][k] + parts[1][k]) / norms['tasks'][k]) == pytest.approx(float(base[k]), rel=1e-6)


def test_uncertainty_weighting_scales_task_losses():
  stream, _ = _stream()
  specs = stream.labels.specs
  b = next(stream.epoch(0))
  batch = jax.tree.map(jnp.asarray, {k: b[k] for k in ('labels', 'defined', 'observed', 'valid')})
  outputs = {s.name: jnp.zeros(16) for s in specs}
  per_task = mean_losses(outputs, batch, specs)
  static = tasks_lib.weighted_loss(per_task, specs)
  same = tasks_lib.weighted_loss(per_task, specs, log_vars=jnp.zeros(3))
  assert float(same) == pytest.approx(float(static))
  s = jnp.array([1.0, 0.0, -1.0])
  # The data part scales each task by exp(-s); the regularizer sum_t w_t s_t depends on the parameters alone.
  weighted = tasks_lib.weighted_loss(per_task, specs, log_vars=s) + jnp.sum(tasks_lib.uncertainty_weights(specs) * s)
  want = sum(float(jnp.exp(-s[i]) * per_task[t.name] + s[i]) for i, t in enumerate(specs))
  assert float(weighted) == pytest.approx(want, rel=1e-5)


def test_to_batch_gathers_side_features():
  data = small_data()
  exp = experiment.build(small_config(split='random'), data)
  ex = Examples(np.array([0, 1]), np.array([2, 3]), np.array([0, 1]), np.ones(2, np.float32))
  b = to_batch(ex, exp.encoder, exp.labels)
  assert b['item']['genres'].shape == (2, 8)  # value rows, padded with -1
  hot = np.zeros((2, 4))
  for r, ids in enumerate(b['item']['genres']):
    hot[r, ids[ids >= 0]] = 1
  np.testing.assert_array_equal(hot, data.items['genres'].matrix[[2, 3]])
  ratings = data.log['rating'][[0, 1]]
  assert b['labels']['like'].tolist() == (ratings >= 4).astype(float).tolist()
  assert b['labels']['rating'].tolist() == ratings.tolist()
