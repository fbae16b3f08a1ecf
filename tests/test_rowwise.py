"""Row-wise optimizers for the id tables (rowwise.py): the sparse update against dense references, on every mesh.

Runs on the 8 simulated CPU devices that conftest.py asks XLA for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mtl_rec import config as config_lib
from mtl_rec import experiment as experiment_lib
from mtl_rec import rowwise
from mtl_rec import sharding as sharding_lib
from mtl_rec import trainer as trainer_lib
from mtl_rec import warm_start
from mtl_rec.checkpoint import Checkpointer

ROWS, DIM = 64, 4
TABLE, BIAS = ('embeddings', 'tables', 'user_id'), ('id_biases', 'click', 'user_id')
# Both rules in one run: user tables row-wise Adagrad, item tables lazy Adam.
MIXED = 'user_id=rowwise_adagrad,item_id=lazy_adam'


def _problem(seed=0):
  """A table and its id bias, a batch of ids with duplicates and padding (-1), and one cotangent per id."""
  rng = np.random.default_rng(seed)
  params = {'embeddings': {'tables': {'user_id': rng.normal(size=(ROWS, DIM)).astype(np.float32)}},
            'id_biases': {'click': {'user_id': rng.normal(size=(ROWS,)).astype(np.float32)}}}
  ids = rng.choice([3, 7, 7, 7, 12, 40, 41, 63, -1], size=(24, 1)).astype(np.int32)  # duplicates, padding
  ids[0, 0], ids[1, 0] = 7, -1
  rows = {TABLE: rng.normal(size=(24, DIM)).astype(np.float32), BIAS: rng.normal(size=(24,)).astype(np.float32)}
  return params, ids, rows


def _optimizer(rule, lr=0.1, eps=1e-8, initial=0.0):
  group = rowwise.Group('user_id', rule, (TABLE, BIAS), (('user', 'user_id'),))
  return rowwise.RowOptimizer([group], {rule: optax.constant_schedule(lr)}, eps, initial)


def _step(rule, shape, params, ids, rows, state=None, step=0, scale=1.0, **kwargs):
  """One sparse update on a mesh of `shape`: (params, state, deduplicated) on the host."""
  opt = _optimizer(rule, **kwargs)
  mesh = sharding_lib.make_mesh(shape, ('data', 'model'))
  shardings = sharding_lib.named(mesh, {'embeddings': {'tables': {'user_id': P('model', None)}},
                                        'id_biases': {'click': {'user_id': P('model')}}})
  params = jax.device_put(params, shardings)
  if state is None:
    state, _ = opt.init(params, shardings)
  batch = {'valid': np.ones(ids.shape[0], np.float32), 'user': {'user_id': ids}}

  @jax.jit
  def run(params, state, batch, rows):
    deduped = opt.dedup(batch, rows, mesh)
    new_params, new_state = opt.apply(params, dict(state), deduped, shardings, jnp.int32(step), jnp.float32(scale))
    return new_params, new_state, deduped['user_id'], opt.sq_norm(deduped, mesh)
  out = run(params, state, batch, rows)
  for table in (TABLE, BIAS):  # updated shard by shard: still row-sharded over 'model'
    x = _get(out[0], table)
    assert x.sharding.is_equivalent_to(_get(shardings, table), x.ndim)
  return jax.device_get(out)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _dense_grads(ids, rows):
  """The dense gradients: scatter-adds in batch order (np.add.at is unbuffered and ordered), padding dropped."""
  out = {}
  flat = ids.reshape(-1)
  keep = flat >= 0
  for path, width in ((TABLE, (DIM,)), (BIAS, ())):
    g = np.zeros((ROWS,) + width, np.float32)
    np.add.at(g, flat[keep], rows[path][keep])
    out[path] = g
  return out


@pytest.mark.parametrize('shape', [(1, 1), (2, 4), (1, 8)])
def test_rowwise_adagrad_equals_the_dense_reference(shape):
  params, ids, rows = _problem()
  got, state, (uniq, sums), sq = _step('rowwise_adagrad', shape, params, ids, rows)
  dense = _dense_grads(ids, rows)
  touched = np.unique(ids[ids >= 0])
  untouched = np.setdiff1d(np.arange(ROWS), touched)

  # De-duplication: ascending unique ids, then the fill (no real row), each row's cotangents summed in batch order:
  # the dense gradient's rows, bit for bit.
  n = len(np.unique(ids))
  np.testing.assert_array_equal(uniq[:n], np.unique(ids))
  assert (uniq[n:] == rowwise.FILL).all() and rowwise.FILL >= ROWS
  real = (uniq >= 0) & (uniq != rowwise.FILL)
  np.testing.assert_array_equal(uniq[real], touched)
  for path in (TABLE, BIAS):
    np.testing.assert_array_equal(sums[path][real], dense[path][touched])
    assert not np.any(sums[path][~real])  # padding and fill carry nothing
  np.testing.assert_allclose(sq, sum(np.sum(np.float64(g) ** 2) for g in dense.values()), rtol=1e-6)

  # The Adagrad rule on the dense gradient, one accumulator per row shared by the table and its bias:
  # acc = mean over the row's DIM + 1 values of g^2, w -= lr g / (sqrt(acc) + eps). An untouched row's gradient is
  # 0: dense Adagrad leaves it as it is, and so does the sparse update (bit for bit).
  g_t, g_b = np.float64(dense[TABLE]), np.float64(dense[BIAS])
  acc = (np.sum(g_t ** 2, axis=1) + g_b ** 2) / (DIM + 1)
  np.testing.assert_allclose(state['user_id']['accumulator'], acc, rtol=1e-6)
  denom = np.sqrt(acc) + 1e-8
  want_t = params['embeddings']['tables']['user_id'] - 0.1 * g_t / denom[:, None]
  want_b = params['id_biases']['click']['user_id'] - 0.1 * g_b / denom
  np.testing.assert_allclose(_get(got, TABLE)[touched], want_t[touched], rtol=1e-6)
  np.testing.assert_allclose(_get(got, BIAS)[touched], want_b[touched], rtol=1e-6)
  np.testing.assert_array_equal(_get(got, TABLE)[untouched], params['embeddings']['tables']['user_id'][untouched])
  np.testing.assert_array_equal(_get(got, BIAS)[untouched], params['id_biases']['click']['user_id'][untouched])
  assert not np.any(state['user_id']['accumulator'][untouched])


def test_rowwise_adagrad_gives_the_same_bits_on_every_mesh():
  params, ids, rows = _problem(1)
  outs = [_step('rowwise_adagrad', shape, params, ids, rows, scale=0.5) for shape in [(1, 1), (2, 4), (4, 2), (1, 8)]]
  for out in outs[1:]:
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(out), strict=True):
      np.testing.assert_array_equal(a, b)


def test_lazy_adam_is_adam_on_the_touched_rows():
  params, ids, rows = _problem(2)
  dense = _dense_grads(ids, rows)
  touched = np.unique(ids[ids >= 0])
  untouched = np.setdiff1d(np.arange(ROWS), touched)
  # Two steps; the second at step count 1 (bias correction), gradients scaled as clipping would.
  got, state, _, _ = _step('lazy_adam', (2, 4), params, ids, rows, lr=0.01)
  got, state, _, _ = _step('lazy_adam', (2, 4), got, ids, rows, state=state, step=1, scale=0.5, lr=0.01)
  tx = optax.adam(0.01)
  ref = {'t': params['embeddings']['tables']['user_id'], 'b': params['id_biases']['click']['user_id']}
  opt_state = tx.init(ref)
  for scale in (1.0, 0.5):
    g = {'t': dense[TABLE] * scale, 'b': dense[BIAS] * scale}
    updates, opt_state = tx.update(g, opt_state, ref)
    ref = optax.apply_updates(ref, updates)
  # On rows every step touches, lazy Adam is Adam.
  np.testing.assert_allclose(_get(got, TABLE)[touched], np.asarray(ref['t'])[touched], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_get(got, BIAS)[touched], np.asarray(ref['b'])[touched], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state['user_id']['m']['.'.join(TABLE)][touched], opt_state[0].mu['t'][touched],
                             rtol=1e-6)
  # Untouched rows and their moments are never read or written (dense Adam would decay their moments).
  np.testing.assert_array_equal(_get(got, TABLE)[untouched], params['embeddings']['tables']['user_id'][untouched])
  assert not np.any(state['user_id']['m']['.'.join(TABLE)][untouched])
  assert not np.any(state['user_id']['v']['.'.join(BIAS)][untouched])


def test_table_optimizer_config_errors(tiny_config):
  for overrides, match in [({'name': 'adagrad'}, 'optimizer.tables.name'),
                           ({'by_feature': 'user_id:lazy_adam'}, "'feature=optimizer'"),
                           ({'by_feature': 'user_id=sgd'}, 'optimizer.tables.by_feature'),
                           ({'by_feature': 'nope=lazy_adam'}, "'nope' is not a declared feature"),
                           ({'learning_rate': -1.0}, 'optimizer.tables.learning_rate'),
                           ({'eps': 0.0}, 'optimizer.tables.eps')]:
    c = tiny_config()
    c.optimizer.tables.update(overrides)
    with pytest.raises(ValueError, match=match):
      config_lib.validate(c)
  c = tiny_config(train__grad_groups=0)
  c.optimizer.tables.name = 'rowwise_adagrad'
  with pytest.raises(ValueError, match='grad_groups'):
    config_lib.validate(c)
  # a declared feature whose table is small (replicated): named, not silently ignored
  c = tiny_config()
  c.optimizer.tables.by_feature = 'age=lazy_adam'
  with pytest.raises(ValueError, match="'age', which has no row-sharded table"):
    rowwise.table_groups(c, {TABLE: (('user', 'user_id'),)})


@pytest.fixture(scope='module')
def mixed_runs(tiny_config):
  """The tiny config with id biases, user tables on row-wise Adagrad and item tables on lazy Adam, 12 steps on each
  mesh: {shape: (trainer, state, losses, exp)}."""
  out = {}
  for shape in [(1, 1), (4, 2), (2, 4)]:
    c = tiny_config(train__batch_size=64, model__id_biases=True, mesh__shape=shape)
    c.optimizer.tables.by_feature = MIXED
    c.optimizer.tables.learning_rate = 0.05
    exp = experiment_lib.build(c)
    trainer = trainer_lib.make_trainer(c, exp.encoder.specs, exp.specs, 100)
    state, losses = trainer.init_state, []
    for _, batch in zip(range(12), exp.stream.epoch(0)):
      state, m = trainer.train_step(state, sharding_lib.global_batch(batch, trainer.batch_sharding))
      losses.append(float(m['loss']))
    out[shape] = (trainer, state, np.array(losses), exp)
  return out


@pytest.mark.slow  # compiles on several meshes
def test_mixed_row_optimizers_train_the_same_bits_on_every_mesh(mixed_runs):
  trainer, ref, losses, _ = mixed_runs[(1, 1)]
  assert {g.name: g.rule for g in trainer.row_optimizer.groups} == {'user_id': 'rowwise_adagrad',
                                                                    'item_id': 'lazy_adam'}
  assert losses[-1] < losses[0]
  # the dense optimizer's state has no table-sized moments for the row-wise tables
  opt_leaves = jax.tree.leaves(ref['opt_state'])
  assert not any(x.shape == ref['params']['embeddings']['tables']['user_id'].shape for x in opt_leaves)
  for shape in [(4, 2), (2, 4)]:
    _, state, got, _ = mixed_runs[shape]
    np.testing.assert_array_equal(got, losses, err_msg=str(shape))
    assert jax.tree.structure(state) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(jax.device_get(ref)), jax.tree.leaves(jax.device_get(state)), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=str(shape))
  acc = trainer_lib.sharding_lib.bytes_per_device(mixed_runs[(2, 4)][1]['table_opt_state']['user_id'])
  rows = mixed_runs[(2, 4)][1]['table_opt_state']['user_id']['accumulator']
  assert rows.sharding.spec == P('model') and set(acc.values()) == {rows.nbytes // 4}


@pytest.mark.slow  # compiles on several meshes
def test_row_optimizer_state_restores_onto_another_mesh_and_warm_starts(mixed_runs, tmp_path):
  source_trainer, source, _, exp = mixed_runs[(4, 2)]
  saved = jax.device_get(source)
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(12, source, {'note': 'mixed'})
  ckpt.wait()
  target_trainer, target, _, _ = mixed_runs[(2, 4)]
  state, _ = ckpt.restore_latest(target)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(state)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert all(x.sharding == y.sharding for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(target)))
  # both continue alike (the steps donate the states: this test goes last)
  batch = next(exp.stream.epoch(1))
  _, m1 = source_trainer.train_step(source, sharding_lib.global_batch(batch, source_trainer.batch_sharding))
  _, m2 = target_trainer.train_step(state, sharding_lib.global_batch(batch, target_trainer.batch_sharding))
  assert float(m1['loss']) == float(m2['loss'])
  # --init_from: the parameters (not the optimizer state) warm-start a fresh run with the dense optimizer
  warm_start.save_features(exp.encoder, str(tmp_path))
  c = target_trainer.config.copy_and_resolve_references()
  c.optimizer.tables.by_feature = ''
  dense = trainer_lib.make_trainer(c, exp.encoder.specs, exp.specs, 100)
  params = warm_start.init_from_checkpoint(str(tmp_path), dense.init_state['params'],
                                           dense.state_shardings['params'], exp.encoder)
  for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(saved['params']), strict=True):
    np.testing.assert_array_equal(a, b)


def test_large_tables_are_filled_in_place_the_same_on_every_mesh():
  """Tables too large to generate in one piece (model.LARGE_INIT_ROWS) are filled shard by shard, block by block:
  N(0, 0.05^2) rows that depend on the seed and the row alone, whatever the mesh and block size."""
  path = ('embeddings', 'tables', 'user_id')
  out = []
  for shape, block in [((1, 1), 1 << 16), ((2, 4), 100), ((1, 8), 7)]:
    mesh = sharding_lib.make_mesh(shape, ('data', 'model'))
    shardings = {'embeddings': {'tables': {'user_id': jax.sharding.NamedSharding(mesh, P('model', None))}}}
    params = jax.device_put({'embeddings': {'tables': {'user_id': np.zeros((4000, 8), np.float32)}}}, shardings)
    filled = trainer_lib.fill_large_tables(params, shardings, [path], seed=3, block_rows=block)
    assert _get(filled, path).sharding == _get(shardings, path)
    out.append(np.asarray(_get(filled, path)))
  for x in out[1:]:
    np.testing.assert_array_equal(x, out[0])
  assert abs(out[0].std() - 0.05) < 0.002 and abs(out[0].mean()) < 0.002
  assert len(np.unique(out[0], axis=0)) == 4000  # every row its own draw
  other = trainer_lib.fill_large_tables(jax.device_put({'embeddings': {'tables': {'user_id': np.zeros(
      (4000, 8), np.float32)}}}), {'embeddings': {'tables': {'user_id': jax.sharding.NamedSharding(
          sharding_lib.make_mesh((1, 1), ('data', 'model')), P('model', None))}}}, [path], seed=4)
  assert not np.array_equal(np.asarray(_get(other, path)), out[0])  # another seed, another table


def test_unique_is_jnp_unique():
  rng = np.random.default_rng(5)
  for ids in [rng.integers(-1, 50, 300), rng.integers(0, 10**7, 4096), np.full(17, 3), np.array([rowwise.FILL - 1, -1])]:
    ids = jnp.asarray(ids.astype(np.int32))
    want_u, want_i = jnp.unique(ids, size=ids.size, fill_value=rowwise.FILL, return_inverse=True)
    got_u, got_i = jax.jit(rowwise.unique)(ids)
    np.testing.assert_array_equal(got_u, want_u)
    np.testing.assert_array_equal(got_i, want_i.reshape(-1))
