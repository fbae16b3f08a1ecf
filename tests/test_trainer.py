"""The optimizer pieces and the loop's bookkeeping, alone: schedule, weight-decay mask, clipping, early stopping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mtl_rec import config as config_lib
from mtl_rec import trainer as trainer_lib
from mtl_rec.loop import EarlyStopping


def _optimizer_config(**overrides):
  oc = config_lib.base_config().optimizer
  oc.update(overrides)
  return oc


def test_cosine_schedule_warms_up_then_decays_to_zero():
  lr = trainer_lib.learning_rate(_optimizer_config(learning_rate=1e-2, warmup_steps=10, schedule='cosine'), 110)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(5e-3)
  assert float(lr(10)) == pytest.approx(1e-2)
  assert float(lr(60)) == pytest.approx(5e-3, rel=1e-5)  # half way through the cosine
  assert float(lr(110)) == pytest.approx(0.0, abs=1e-9)
  values = [float(lr(s)) for s in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_schedule_and_warmup_longer_than_the_run():
  lr = trainer_lib.learning_rate(_optimizer_config(learning_rate=1e-3, warmup_steps=4, schedule='constant'), 100)
  assert [float(lr(s)) for s in (0, 2, 4, 50, 99)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3])
  short = trainer_lib.learning_rate(_optimizer_config(learning_rate=1e-3, warmup_steps=100, schedule='cosine'), 5)
  assert float(short(4)) == pytest.approx(1e-3)  # warmup is cut to the run's length: the peak is reached


def test_adamw_decays_dense_kernels_only():
  params = {'embeddings': {'tables': {'user_id': jnp.ones((4, 2))}},
            'backbone': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}}
  mask = trainer_lib.decay_mask(params)
  assert mask == {'embeddings': {'tables': {'user_id': False}}, 'backbone': {'kernel': True, 'bias': False}}
  tx = trainer_lib.make_optimizer(_optimizer_config(name='adamw', learning_rate=0.1, weight_decay=0.5,
                                                    warmup_steps=0, schedule='constant', grad_clip_norm=0.0), 10)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # With a zero gradient Adam's step is 0: what is left is the decoupled decay, on the kernel alone.
  np.testing.assert_allclose(updates['backbone']['kernel'], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  assert not np.any(updates['backbone']['bias']) and not np.any(updates['embeddings']['tables']['user_id'])


@pytest.mark.parametrize('name', ['adamw', 'adam'])
def test_embedding_weight_decay_shrinks_every_table_row_each_step_used_or_not(name):
  """optimizer.embedding_weight_decay: every row of the embedding tables (and their projections' kernels) decays by
  lr * decay each step, a row the gradient does not touch too; the dense kernels keep their own decay (adamw's) and
  biases none. Off (0) it is adamw / adam exactly."""
  params = {'embeddings': {'tables': {'user_id': jnp.full((4, 2), 2.0)}, 'numeric': {'age': {'kernel': jnp.ones((1, 2)),
                                                                                          'bias': jnp.ones((2,))}}},
            'backbone': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}}
  assert trainer_lib.embedding_weight_decay_mask(params) == {
      'embeddings': {'tables': {'user_id': True}, 'numeric': {'age': {'kernel': True, 'bias': False}}},
      'backbone': {'kernel': False, 'bias': False}}
  settings = dict(name=name, learning_rate=0.1, weight_decay=0.5, warmup_steps=0, schedule='constant',
                  grad_clip_norm=0.0)
  tx = trainer_lib.make_optimizer(_optimizer_config(embedding_weight_decay=0.3, **settings), 10)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads['embeddings']['tables']['user_id'] = grads['embeddings']['tables']['user_id'].at[0].set(1.0)  # row 0 used
  updates, _ = tx.update(grads, tx.init(params), params)
  table = np.asarray(updates['embeddings']['tables']['user_id'])
  # rows 1-3: no gradient, the decay alone (-lr * 0.3 * 2.0); row 0: Adam's first step (-lr * sign) plus the decay
  np.testing.assert_allclose(table[1:], -0.1 * 0.3 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(table[0], -0.1 * (1.0 + 0.3 * 2.0), rtol=1e-5)
  np.testing.assert_allclose(updates['embeddings']['numeric']['age']['kernel'], -0.1 * 0.3, rtol=1e-6)
  kernel = -0.1 * 0.5 if name == 'adamw' else 0.0  # adam has no decoupled decay of its own
  np.testing.assert_allclose(updates['backbone']['kernel'], kernel, rtol=1e-6)
  assert not np.any(updates['backbone']['bias']) and not np.any(updates['embeddings']['numeric']['age']['bias'])
  # off: the optimizer of old, bit for bit
  off = trainer_lib.make_optimizer(_optimizer_config(embedding_weight_decay=0.0, **settings), 10)
  ref = (optax.adamw(0.1, weight_decay=0.5, mask=trainer_lib.decay_mask) if name == 'adamw' else optax.adam(0.1))
  for a, b in zip(jax.tree.leaves(off.update(grads, off.init(params), params)[0]),
                  jax.tree.leaves(ref.update(grads, ref.init(params), params)[0])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('scale', [0.1, 10.0])
def test_clip_matches_optax_clip_by_global_norm(scale):
  rng = np.random.default_rng(0)
  grads = {'a': jnp.asarray(rng.normal(size=(5, 3)) * scale, jnp.float32),
           'b': jnp.asarray(rng.normal(size=(7,)) * scale, jnp.float32)}
  ours = trainer_lib.clip_by_global_norm(1.0)
  theirs = optax.clip_by_global_norm(1.0)
  got, state = ours.update(grads, ours.init(grads), grad_norm=optax.tree.norm(grads))
  want, _ = theirs.update(grads, theirs.init(grads))
  for k in grads:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
  assert state == theirs.init(grads)  # the same state: checkpoints are interchangeable
  assert (float(optax.tree.norm(got)) <= 1.0 + 1e-6) and (scale < 1) == bool(np.allclose(got['a'], grads['a']))


def test_early_stopping_counts_bad_epochs_and_keeps_the_best():
  s = EarlyStopping('rating_rmse', 'min', patience=2)
  assert s.update(1.0, step=10, epoch=0)
  assert not s.update(1.1, step=20, epoch=1) and not s.stopped
  assert s.update(0.9, step=30, epoch=2) and s.bad_epochs == 0  # an improvement resets the count
  assert not s.update(0.95, step=40, epoch=3)
  assert not s.update(0.9, step=50, epoch=4)  # equal is not better
  assert s.stopped and (s.best_value, s.best_step, s.evaluated_epochs) == (0.9, 30, 5)
  again = EarlyStopping('rating_rmse', 'min', patience=2)
  again.restore(s.state())
  assert again == s
  up = EarlyStopping('click_auc', 'max', patience=0)
  for epoch, v in enumerate([0.5, 0.4, 0.3, 0.2]):
    up.update(v, step=epoch, epoch=epoch)
  assert up.best_value == 0.5 and not up.stopped  # patience 0: never stops early


def test_early_stopping_from_config_knows_the_direction():
  c = ml_collections.ConfigDict({'train': {'early_stopping_metric': 'click_auc', 'patience': 3}})
  s = EarlyStopping.from_config(c)
  assert (s.metric, s.mode, s.patience) == ('click_auc', 'max', 3)


def test_combined_model_selection_weighs_every_task_and_the_ranking_alike():
  """train.early_stopping_metric='combined': each task's headline metric and Recall@K, as relative improvements over
  the first validation (rmse counted down), averaged; the reference survives a resume."""
  from configs import movielens_100k  # pylint: disable=g-import-not-at-top
  from mtl_rec import config as config_lib  # pylint: disable=g-import-not-at-top
  c = movielens_100k.get_config()
  c.train.early_stopping_metric = 'combined'
  config_lib.validate(c)
  s = EarlyStopping.from_config(c)
  assert s.components == ('click_auc', 'like_auc', 'rating_rmse', 'retrieval_auc', 'recall@10') and s.mode == 'max'
  first = {'click_auc': 0.8, 'like_auc': 0.5, 'rating_rmse': 1.0, 'retrieval_auc': 0.7, 'recall@10': 0.1,
           'ndcg@10': 0.3}
  assert s.value(first) == 0.0 and s.reference == {k: v for k, v in first.items() if k != 'ndcg@10'}
  s.update(0.0, step=1, epoch=0)
  # rating gets 10% worse, recall 20% better, the AUCs stay: (0 + 0 - 0.1 + 0 + 0.2) / 5
  later = dict(first, rating_rmse=1.1, **{'recall@10': 0.12})
  assert s.value(later) == pytest.approx(0.02)
  assert s.update(s.value(later), step=2, epoch=1)
  resumed = EarlyStopping.from_config(c)
  resumed.restore(s.state())
  assert resumed == s and resumed.value(later) == pytest.approx(0.02)
  # one task's best epoch alone no longer decides: rating recovers a little, ranking falls back further
  assert not s.update(s.value(dict(first, rating_rmse=1.05, **{'recall@10': 0.1})), step=3, epoch=2)
  assert s.best_step == 2


def test_ema_update_is_the_running_mean_then_an_exponential_average():
  """train.ema_decay's average: the plain mean of every step's parameters (the initial ones included) while
  (t + 1) / (t + 2) < decay, then each step weighed `decay` times the next; dtypes kept."""
  rng = np.random.default_rng(0)
  ps = [{'w': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)} for _ in range(7)]
  ema = ps[0]
  for t in range(6):
    ema = trainer_lib.ema_update(ema, ps[t + 1], jnp.asarray(t, jnp.int32), 0.75)
    if t < 3:  # weights 1/2, 2/3, 3/4 on the old average: the mean of ps[0..t+1]
      np.testing.assert_allclose(ema['w'], np.mean([p['w'] for p in ps[:t + 2]], axis=0), rtol=1e-5)
  expected = np.mean([p['w'] for p in ps[:4]], axis=0)
  for p in ps[4:]:  # from step 3 on, 0.75 (4/5 > 0.75)
    expected = 0.75 * expected + 0.25 * np.asarray(p['w'])
  np.testing.assert_allclose(ema['w'], expected, rtol=1e-5)
  assert ema['w'].dtype == jnp.float32
