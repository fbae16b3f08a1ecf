"""History features (SVD++'s implicit feedback): built from the training log, pooled through the shared id table,
never holding the example's own target (no label leak), the same gradient under the fixed-order sum."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from mtl_rec import config as config_lib
from mtl_rec import deterministic
from mtl_rec import encoding
from mtl_rec import errors
from mtl_rec import experiment as experiment_lib
from mtl_rec import features as features_lib
from mtl_rec import scoring
from mtl_rec import sharding as sharding_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec import trainer as trainer_lib

LENGTH = 64  # longer than any tiny user's (15) or item's training history: every member is kept


def with_history(c, length=LENGTH):
  with c.unlocked():
    c.features.user_history = config_lib.feature('user', kind='history', of='item_id', max_values=length)
    c.features.item_audience = config_lib.feature('item', kind='history', of='user_id', max_values=length)
    # the items a user liked: a history of the training rows that meet a condition on a log column
    c.features.user_liked = config_lib.feature('user', kind='history', of='item_id', max_values=length,
                                               where='rating >= 4')
  return c


@pytest.fixture(scope='module')
def exp(tiny_config):
  c = with_history(tiny_config(train__batch_size=64, model__id_biases=True))
  return experiment_lib.build(c)


def test_histories_are_distinct_most_recent_first_and_capped():
  owner = np.array([0, 0, 0, 0, 1, 1, 2])
  member = np.array([5, 6, 5, 0, 7, 8, 9])  # 0 is the out-of-vocabulary row: left out
  recency = np.array([10, 20, 30, 40, 5, 5, 1])
  out = features_lib.histories(owner, member, recency, np.arange(7), num_owners=4, length=2)
  # owner 0: 5 (last at 30), 6 (20); owner 1: equal times, the later row first; owner 3: none
  np.testing.assert_array_equal(out, [[5, 6], [8, 7], [9, -1], [-1, -1]])
  assert out.dtype == np.int32


def test_histories_fed_in_chunks_equal_one_pass():
  """RecentMembers, fed chunk by chunk and compacted every few rows (how a streamed log is read), gives the table
  of one pass over all rows: repeated members, equal times and caps included."""
  rng = np.random.default_rng(0)
  n = 2_000
  owner, member = rng.integers(0, 30, n), rng.integers(0, 40, n)  # member 0: OOV, left out
  recency, rows = rng.integers(0, 50, n).astype(np.float64), rng.permutation(n)  # many equal times
  for length in (1, 5, 200):
    whole = features_lib.histories(owner, member, recency, rows, num_owners=32, length=length)
    recent = features_lib.RecentMembers(32, length, compact_every=37)
    cuts = np.sort(rng.choice(n, 25, replace=False))
    for part in np.split(np.arange(n), cuts):
      recent.add(owner[part], member[part], recency[part], rows[part])
    np.testing.assert_array_equal(recent.table(), whole, err_msg=str(length))
  assert (whole[:30] >= 0).sum(1).min() > 5 and not (whole == 0).any()  # some owners were capped at 5; no OOV


def test_a_condition_keeps_the_rows_that_meet_it_and_never_a_missing_value():
  user, item = np.array([0, 0, 0, 0, 1]), np.array([1, 2, 3, 4, 1])
  rating = np.array([5.0, np.nan, 2.0, 4.0, 3.0])
  requests = [features_lib.HistoryRequest(n, 'user', np.arange(6), num_owners=2, length=4, where=w)
              for n, w in [('all', None), ('liked', ('rating', '>=', 4.0)), ('not_two', ('rating', '!=', 2.0))]]
  chunk = (user, item, np.arange(5.0), np.arange(5), {'rating': rating})
  out = features_lib.build_histories(requests, [chunk])
  np.testing.assert_array_equal(out['all'], [[4, 3, 2, 1], [1, -1, -1, -1]])  # most recent first
  np.testing.assert_array_equal(out['liked'], [[4, 1, -1, -1], [-1, -1, -1, -1]])
  np.testing.assert_array_equal(out['not_two'], [[4, 1, -1, -1], [1, -1, -1, -1]])  # NaN != 2, yet missing: out


def test_a_history_rule_encodes_raw_ids_through_the_id_vocabulary():
  vocabs = {'item_id': encoding.Vocab(np.array([10, 20, 30]))}
  rule = {'kind': 'history', 'raw': 'h', 'raw_type': 'list[str]', 'of': 'item_id', 'vocab': 'item_id',
          'delimiter': '|', 'max_values': 3}
  got = encoding.encode(rule, [['20', '99', '10', '20'], '30|10', [30, 20, 10, 30], [], None], vocabs)
  # rows of item_id's table (1 + place; 0 is its OOV row): unknown 99 dropped, duplicates once, capped at 3
  np.testing.assert_array_equal(got, [[2, 1, -1], [3, 1, -1], [3, 2, 1], [-1, -1, -1], [-1, -1, -1]])
  np.testing.assert_array_equal(encoding.missing(rule), [-1, -1, -1])
  assert encoding.unknown(rule, ['20', '99'], vocabs) and not encoding.unknown(rule, ['20'], vocabs)
  assert encoding.rows(rule, vocabs) == 0  # no table of its own


def test_histories_hold_the_training_rows_and_no_batch_holds_its_target(exp):
  enc, split = exp.encoder, exp.split
  item_rows = enc.item_table['item_id'][exp.item_index]  # each log row's item_id row
  user_rows = enc.user_table['user_id'][exp.user_index]
  for table, owners, members in [(enc.user_table['user_history'], exp.user_index, item_rows),
                                 (enc.item_table['item_audience'], exp.item_index, user_rows)]:
    capped = 0
    for owner in np.unique(owners[split.train]):
      trained = set(members[split.train[owners[split.train] == owner]].tolist())
      got = table[owner][table[owner] >= 0].tolist()
      assert len(got) == len(set(got)) == min(len(trained), LENGTH) and set(got) <= trained, owner
      capped += len(trained) > LENGTH
    assert table is enc.user_table['user_history'] or capped  # popular items' audiences are cut to LENGTH
  held_out = np.concatenate([split.valid, split.test])
  train_pairs = set(zip(exp.user_index[split.train].tolist(), exp.item_index[split.train].tolist()))
  leak = [r for r in held_out if (exp.user_index[r], exp.item_index[r]) not in train_pairs
          and item_rows[r] in enc.user_table['user_history'][exp.user_index[r]]]
  assert not leak  # a held-out pair's item is not in its user's history unless the pair was trained on too
  # the batches a step and an evaluation see: the target left out of each history, the rest kept
  rows = split.train[:500]
  u, i = exp.user_index[rows], exp.item_index[rows]
  batch = enc.gather(u, i, rows)
  hist, aud = batch['user']['user_history'], batch['item']['item_audience']
  assert not (hist == batch['item']['item_id'][:, None]).any()
  assert not (aud == batch['user']['user_id'][:, None]).any()
  # a trained pair's item is in its user's history (not cut off: users have fewer than LENGTH): one entry fewer,
  # the others all there; an item's audience holds the user unless the audience was cut to its LENGTH latest
  np.testing.assert_array_equal((hist >= 0).sum(1), (enc.user_table['user_history'][u] >= 0).sum(1) - 1)
  stored = enc.item_table['item_audience'][i]
  held = (stored == batch['user']['user_id'][:, None]).any(1)
  assert held.mean() > 0.5
  np.testing.assert_array_equal((aud >= 0).sum(1), (stored >= 0).sum(1) - held)
  for name, b in [('train', next(exp.stream.epoch(0))),
                  ('valid', next(exp.valid.batches(enc, 10_000, exp.labels)))]:
    assert not (b['user']['user_history'] == b['item']['item_id'][:, None]).any(), name
    assert not (b['item']['item_audience'] == b['user']['user_id'][:, None]).any(), name


def test_a_history_with_a_condition_holds_the_training_rows_that_meet_it(exp):
  """`where='rating >= 4'`: each user's training items rated 4 or more, most recent first; the example's own item
  left out of a batch's (its rating is the label), the others all kept."""
  enc, split = exp.encoder, exp.split
  item_rows = enc.item_table['item_id'][exp.item_index]
  rating = np.asarray(exp.data.log['rating'], np.float64)
  liked, history = enc.user_table['user_liked'], enc.user_table['user_history']
  train_users = exp.user_index[split.train]
  assert 0 < (liked >= 0).sum() < (history >= 0).sum()
  for owner in np.unique(train_users):
    rows = split.train[train_users == owner]
    got = liked[owner][liked[owner] >= 0]
    assert set(got.tolist()) == set(item_rows[rows[rating[rows] >= 4]].tolist()), owner
    # in the order of the whole history (most recent first), which holds every training item uncut
    order = {x: k for k, x in enumerate(history[owner].tolist())}
    assert [order[x] for x in got] == sorted(order[x] for x in got), owner
  assert enc.spec('user_liked').encoding['where'] == 'rating >= 4'
  rows = split.train[:500]
  u, i = exp.user_index[rows], exp.item_index[rows]
  batch = enc.gather(u, i, rows)['user']['user_liked']
  target_liked = (liked[u] == enc.item_table['item_id'][i][:, None]).any(1)
  assert target_liked.any() and (rating[rows][target_liked] >= 4).all()
  assert not (batch == enc.item_table['item_id'][i][:, None]).any()
  np.testing.assert_array_equal((batch >= 0).sum(1), (liked[u] >= 0).sum(1) - target_liked)


def test_a_condition_on_a_column_the_log_lacks_is_a_data_error(tiny_config):
  c = with_history(tiny_config())
  c.features.user_liked.where = 'stars >= 4'
  with pytest.raises(errors.DataError, match="no column 'stars'.*rating"):
    experiment_lib.build(c)


def test_the_model_leaves_the_target_out_of_the_pool(exp):
  """Served, the model gets whole histories (a user's history can hold the item asked about): it leaves the
  example's own id out itself, so the score is the one training saw; other entries do count."""
  trainer = trainer_lib.make_trainer(exp.config, exp.encoder.specs, exp.specs, 10)
  model = nnx.merge(trainer.graphdef, trainer.init_state['params'])
  rows = exp.split.train[:64]
  u, i = exp.user_index[rows], exp.item_index[rows]
  enc = exp.encoder
  whole = {'user': {k: v[u] for k, v in enc.user_table.items()}, 'item': {k: v[i] for k, v in enc.item_table.items()},
           'context': {}}
  assert (whole['user']['user_history'] == whole['item']['item_id'][:, None]).any(1).all()  # the target is there
  excluded = enc.gather(u, i, rows)
  out_whole, _ = model(whole)
  out_excluded, _ = model(excluded)
  for task, y in out_whole.items():
    np.testing.assert_allclose(y, out_excluded[task], rtol=1e-6, err_msg=task)
  shorter = jax.tree.map(np.copy, excluded)
  h = shorter['user']['user_history']
  first = np.argmax(h >= 0, axis=1)
  h[np.arange(h.shape[0]), first] = -1  # drop another item
  out_shorter, _ = model(shorter)
  assert not np.allclose(out_shorter['rating'], out_excluded['rating'])


def test_catalog_scores_pool_each_side_once_and_equal_the_pairs_a_ranking_keeps(exp):
  """Ranking the catalog, the model pools each user's and item's history once (model.cross), whole: every pair
  scores as pair by pair except those a history holds (a user's training items), which rankings exclude. Id biases
  included (the fixture's model has them)."""
  trainer = trainer_lib.make_trainer(exp.config, exp.encoder.specs, exp.specs, 10)
  scorer = scoring.NetworkScorer([scoring.Network(trainer.graphdef, trainer.init_state['params'], exp.specs)],
                                 exp.encoder, 256)
  users, num_items, enc = np.arange(6), exp.num_items, exp.encoder
  catalog = np.asarray(scorer.terms_catalog(users))
  pairs = scorer.terms_pairs(np.repeat(users, num_items), np.tile(np.arange(num_items), users.size))
  pairs = pairs.reshape(catalog.shape)
  held = (enc.item_table['item_id'][None, :, None] == enc.user_table['user_history'][users][:, None, :]).any(-1)
  held |= (enc.item_table['item_audience'][None] == enc.user_table['user_id'][users][:, None, None]).any(-1)
  assert held.any() and not held.all()
  np.testing.assert_allclose(catalog[~held], pairs[~held], rtol=1e-5, atol=1e-6)
  assert not np.allclose(catalog[held], pairs[held])  # the whole histories: the only difference


@pytest.mark.slow  # compiles on two meshes
def test_grouped_gradient_with_histories_is_the_batch_gradient(exp, tiny_config):
  """With histories (padded ids, the pooled shared table), the fixed-order gradient on (2, 4) is the plain batch
  gradient up to rounding, and its loss the same bits as on one device."""
  results = {}
  for shape in [(1, 1), (2, 4)]:
    c = with_history(tiny_config(train__batch_size=64, model__id_biases=True, mesh__shape=shape))
    trainer = trainer_lib.make_trainer(c, exp.encoder.specs, exp.specs, 10)
    model = nnx.merge(trainer.graphdef, trainer.init_state['params'])
    table_inputs = model.table_inputs()
    assert ('user', 'user_history') in table_inputs['embeddings', 'tables', 'item_id']
    assert ('item', 'item_audience') in table_inputs['embeddings', 'tables', 'user_id']
    batch = sharding_lib.global_batch(next(exp.stream.epoch(0)), trainer.batch_sharding)
    esmm = bool(c.model.esmm)
    norms = tasks_lib.normalizers(batch, trainer.specs, esmm)
    loss = functools.partial(trainer_lib.loss_fn, graphdef=trainer.graphdef, specs=trainer.specs, esmm=esmm,
                             embedding_l2=float(c.optimizer.embedding_l2))
    grouped = deterministic.value_and_grad(loss, groups=8, param_shardings=trainer.state_shardings['params'],
                                           batch_sharding=trainer.batch_sharding, table_inputs=table_inputs)
    plain = jax.value_and_grad(loss, has_aux=True)
    params = trainer.init_state['params']
    results[shape] = jax.device_get(jax.jit(lambda p, b: grouped(p, b, jax.random.key(0), norms)[:2])(params, batch))
    if shape == (2, 4):
      ref = jax.device_get(jax.jit(lambda p, b: plain(p, b, jax.random.key(0), norms))(params, batch))
  (loss_1, _), _ = results[1, 1]
  (loss_8, _), grads = results[2, 4]
  assert loss_1 == loss_8
  (ref_loss, _), ref_grads = ref
  np.testing.assert_allclose(loss_8, ref_loss, rtol=1e-6)
  item_table = ref_grads['embeddings']['tables']['item_id']
  np.testing.assert_allclose(grads['embeddings']['tables']['item_id'], item_table, rtol=1e-4,
                             atol=1e-6 * float(np.abs(item_table).max()))
  for (path, r), g in zip(jax.tree_util.tree_flatten_with_path(ref_grads)[0], jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * float(np.abs(r).max()) + 1e-12,
                               err_msg=jax.tree_util.keystr(path))


def test_warm_start_maps_rows_of_a_run_with_histories(exp, tmp_path):
  """--init_from between two runs that declare histories: a history has no table of its own (nothing to map), the id
  tables it pools keep their rows. It raised a broadcast ValueError before."""
  from mtl_rec import warm_start  # pylint: disable=g-import-not-at-top
  warm_start.save_features(exp.encoder, str(tmp_path))
  sources = warm_start.row_sources(str(tmp_path), exp.encoder)
  for name in ('user_history', 'item_audience', 'user_liked'):
    assert sources[name].size == 0, name
  np.testing.assert_array_equal(sources['item_id'][:exp.num_items + 1], np.arange(exp.num_items + 1))
