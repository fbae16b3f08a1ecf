"""Mesh resolution, the rules table, row-sharded tables, equal losses on every mesh, and cross-mesh restore.

Runs on the 8 simulated CPU devices that conftest.py asks XLA for.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from mtl_rec import config as config_lib
from mtl_rec import deterministic
from mtl_rec import experiment as experiment_lib
from mtl_rec import sharding as sharding_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec import trainer as trainer_lib
from mtl_rec import warm_start
from mtl_rec.checkpoint import Checkpointer

STEPS = 20
MESHES = [(1, 1), (4, 2), (2, 4)]


class Run(NamedTuple):
  trainer: trainer_lib.Trainer
  state: dict  # after STEPS + 1 steps
  losses: np.ndarray  # [STEPS + 1]
  saved: dict | None  # host copy of the state checkpointed after STEPS steps
  ckpt_dir: str | None


@pytest.fixture(scope='session')
def config_on(tiny_config):
  """A factory: the tiny config on mesh `shape`, with id biases (row-sharded 1-d parameters), 64-row batches, a
  moving average of the parameters (train.ema_decay: state the checks below cover too) and the tables' weight decay
  (optimizer.embedding_weight_decay, as the ML-100K default: every row of the sharded tables updated each step)."""
  def make(shape=(1, 1)):
    c = tiny_config(train__batch_size=64, model__id_biases=True, mesh__shape=shape, train__ema_decay=0.9,
                    optimizer__embedding_weight_decay=0.5)
    c.data.synthetic.num_items = 200
    c.data.synthetic.interactions_per_user = 10
    return c
  return make


@pytest.fixture(scope='module')
def exp(config_on):
  return experiment_lib.build(config_on())


def _trainer(c, exp, total_steps=100):
  return trainer_lib.make_trainer(c, exp.encoder.specs, exp.specs, total_steps)


@pytest.fixture(scope='module')
def runs(exp, config_on, tmp_path_factory):
  """The same config and seed on each mesh: {mesh shape: Run}. The (4, 2) run also checkpoints after STEPS."""
  out = {}
  for shape in MESHES:
    trainer = _trainer(config_on(shape), exp, exp.stream.steps_per_epoch)
    state, losses, saved, ckpt_dir = trainer.init_state, [], None, None
    for i, batch in zip(range(STEPS + 1), exp.stream.epoch(0)):
      if i == STEPS and shape == (4, 2):
        ckpt_dir = str(tmp_path_factory.mktemp('ckpt'))
        ckpt = Checkpointer(ckpt_dir, keep=2)
        ckpt.save(STEPS, state, {'note': 'from (4, 2)'})
        ckpt.wait()
        ckpt.close()
        saved = jax.device_get(state)
      state, m = trainer.train_step(state, sharding_lib.global_batch(batch, trainer.batch_sharding))
      losses.append(m['loss'])
    out[shape] = Run(trainer, state, np.asarray(jax.device_get(losses), np.float64), saved, ckpt_dir)
  return out


@pytest.mark.parametrize('shape, devices, expected', [
    ((-1, 1), 8, (8, 1)),
    ((2, -1), 8, (2, 4)),
    ((-1, 4), 8, (2, 4)),
    ((4, 2), 8, (4, 2)),
    ((1, 1), 8, (1, 1)),  # fewer than all devices: the first ones
    ((-1, 1), 1, (1, 1)),
])
def test_resolve_shape(shape, devices, expected):
  assert sharding_lib.resolve_shape(shape, devices) == expected


@pytest.mark.parametrize('shape, devices, message', [
    ((3, -1), 8, 'not divisible'),
    ((4, 4), 8, 'needs 16 devices'),
    ((2, 2), 1, 'needs 4 devices'),
])
def test_resolve_shape_errors_name_the_fix(shape, devices, message):
  with pytest.raises(ValueError, match=message) as e:
    sharding_lib.resolve_shape(shape, devices)
  assert 'config.mesh.shape' in str(e.value)


def test_make_mesh_uses_auto_axes_and_config_names():
  mesh = sharding_lib.make_mesh((2, -1), ('data', 'model'))
  assert dict(mesh.shape) == {'data': 2, 'model': 4}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  one = sharding_lib.make_mesh((-1, 1), ('data', 'model'), jax.devices()[:1])
  assert dict(one.shape) == {'data': 1, 'model': 1}


def test_bad_mesh_configs_fail_validation(config_on):
  c = config_on((2, -1, 1))
  with pytest.raises(ValueError, match='mesh.shape'):
    config_lib.validate(c)
  c = config_on((-1, -1))
  with pytest.raises(ValueError, match='mesh.shape'):
    config_lib.validate(c)
  c = config_on()
  c.mesh.axis_names = ('batch', 'model')
  with pytest.raises(ValueError, match='data'):
    config_lib.validate(c)


def test_indivisible_batch_or_rows_are_errors(exp, config_on):
  c = config_on((4, 2))
  c.train.batch_size = 66
  with pytest.raises(ValueError, match='batch_size'):
    _trainer(c, exp)
  c = config_on((1, 8))
  c.model.row_multiple = 4
  with pytest.raises(ValueError, match='row_multiple'):
    _trainer(c, exp)


def test_unknown_logical_axis_is_an_error():
  with pytest.raises(ValueError, match='RULES'):
    sharding_lib.logical_to_spec(('vocab', 'embedding'), 2)


@pytest.mark.slow  # compiles on several meshes
def test_rules_map_parameters_and_batch(runs):
  trainer, state = runs[(4, 2)].trainer, runs[(4, 2)].state
  params = state['params']
  specs = jax.tree.map(lambda x: x.sharding.spec, params)
  tables = specs['embeddings']['tables']
  assert tables['user_id'] == P('model', None) and tables['item_id'] == P('model', None)
  for name in ('gender', 'age', 'occupation', 'zip', 'year', 'genres'):
    assert tables[name] == P(None, None), name
  for task_biases in specs['id_biases'].values():
    assert all(s == P('model') for s in task_biases.values())
  dense = [s for path, s in jax.tree_util.tree_leaves_with_path(specs)
           if 'embeddings' not in jax.tree_util.keystr(path) and 'id_biases' not in jax.tree_util.keystr(path)]
  assert dense and all(all(a is None for a in s) for s in dense)
  assert trainer.batch_sharding.spec == P('data')
  # Adam moments follow their parameter; counts are replicated.
  opt_specs = [x.sharding.spec for x in jax.tree.leaves(state['opt_state'])]
  assert opt_specs.count(P('model', None)) == 2 * 2  # mu and nu of the two id tables
  assert all(x.sharding.mesh.shape == trainer.mesh.shape for x in jax.tree.leaves(state))


@pytest.mark.slow  # compiles on several meshes
@pytest.mark.parametrize('shape', MESHES)
def test_each_table_shard_holds_rows_over_model_axis(runs, exp, shape):
  state = runs[shape].state
  model = shape[1]
  for name in ('user_id', 'item_id'):
    table = state['params']['embeddings']['tables'][name]
    spec = next(s for s in exp.encoder.specs if s.name == name)
    assert table.shape[0] == spec.vocab_size and spec.vocab_size % model == 0
    rows = {s.data.shape[0] for s in table.addressable_shards}
    assert rows == {spec.vocab_size // model}
    # Padding rows past the vocabulary are never looked up.
    ids = exp.encoder.user_table['user_id'] if name == 'user_id' else exp.encoder.item_table['item_id']
    assert ids.max() < exp.encoder.vocabs[name].size <= spec.vocab_size


@pytest.mark.slow  # compiles on several meshes
def test_same_losses_on_every_mesh(runs):
  ref = runs[(1, 1)].losses
  assert ref.shape == (STEPS + 1,) and np.all(np.isfinite(ref))
  for shape in MESHES[1:]:
    np.testing.assert_allclose(runs[shape].losses, ref, rtol=1e-5, err_msg=str(shape))


@pytest.mark.slow  # compiles on several meshes
def test_same_bits_on_every_mesh(runs):
  """Not only close: every sum of the gradient is ordered by the batch alone (train.grad_groups), so each mesh
  computes the same float32 values, step after step; a long run then cannot drift apart."""
  ref = jax.tree.leaves(jax.device_get(runs[(1, 1)].state))
  for shape in MESHES[1:]:
    np.testing.assert_array_equal(runs[shape].losses, runs[(1, 1)].losses, err_msg=str(shape))
    for a, b in zip(ref, jax.tree.leaves(jax.device_get(runs[shape].state)), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=str(shape))


def _grads(trainer, params, batch, groups, table_inputs=None, seed=0):
  """((loss, per-task sums), grads) of trainer.loss_fn: the fixed-order gradient for `groups` > 0, else jax's."""
  esmm = bool(trainer.config.model.esmm)
  loss = functools.partial(trainer_lib.loss_fn, graphdef=trainer.graphdef, specs=trainer.specs, esmm=esmm,
                           embedding_l2=float(trainer.config.optimizer.embedding_l2))
  if groups:
    value_and_grad = deterministic.value_and_grad(loss, groups=groups,
                                                  param_shardings=trainer.state_shardings['params'],
                                                  batch_sharding=trainer.batch_sharding, table_inputs=table_inputs)
  else:
    value_and_grad = jax.value_and_grad(loss, has_aux=True)
  norms = lambda b: tasks_lib.normalizers(b, trainer.specs, esmm)
  return jax.jit(lambda p, b: value_and_grad(p, b, jax.random.key(seed), norms(b))[:2])(params, batch)


def _table_inputs(trainer):
  return nnx.merge(trainer.graphdef, trainer.init_state['params']).table_inputs()


@pytest.mark.slow  # compiles on several meshes
@pytest.mark.parametrize('shape, overrides', [
    ((2, 4), {}),
    ((4, 2), {'loss_weighting': 'uncertainty', 'esmm': True, 'backbone': 'mmoe', 'gmf': True}),
])
def test_grouped_gradient_is_the_batch_gradient(exp, config_on, shape, overrides):
  """The fixed-order gradient is the plain batch-mean gradient (up to rounding), for every kind of parameter:
  row-sharded tables and id biases, small tables, multi-hot pooling, dense layers, learned loss weights."""
  c = config_on(shape)
  c.model.update(overrides)
  trainer = _trainer(c, exp)
  params = trainer.init_state['params']
  batch = sharding_lib.global_batch(next(exp.stream.epoch(0)), trainer.batch_sharding)
  (loss, per_task), grads = _grads(trainer, params, batch, 8, _table_inputs(trainer))
  (ref_loss, ref_per_task), ref_grads = _grads(trainer, params, batch, 0)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for k, v in ref_per_task.items():
    np.testing.assert_allclose(per_task[k], v, rtol=1e-6, err_msg=k)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(ref_grads))[0]
  assert len(flat) == len(jax.tree.leaves(grads))
  for (path, ref), got in zip(flat, jax.tree.leaves(jax.device_get(grads)), strict=True):
    scale = float(np.abs(ref).max())
    assert scale > 0, path  # every parameter gets a gradient from this batch
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))
  for (path, x), g in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(grads)):
    assert g.sharding.is_equivalent_to(x.sharding, x.ndim), jax.tree_util.keystr(path)  # tables stay row-sharded


@pytest.mark.slow  # compiles on several meshes
def test_dropout_under_the_grouped_gradient(exp, config_on):
  """Dropout masks come from the step's rng folded with the group's index: dropout is applied (the gradient
  differs from the one without it), gives the same bits on every mesh, and follows the rng."""
  out = {}
  for shape, rate, seed in [((1, 1), 0.3, 0), ((2, 4), 0.3, 0), ((1, 1), 0.0, 0), ((1, 1), 0.3, 1)]:
    c = config_on(shape)
    c.model.dropout = rate
    trainer = _trainer(c, exp)
    batch = sharding_lib.global_batch(next(exp.stream.epoch(0)), trainer.batch_sharding)
    (loss, _), grads = _grads(trainer, trainer.init_state['params'], batch, 8, _table_inputs(trainer), seed)
    out[shape, rate, seed] = jax.device_get((loss, grads))
  ref = jax.tree.leaves(out[(1, 1), 0.3, 0])
  for a, b in zip(ref, jax.tree.leaves(out[(2, 4), 0.3, 0]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert ref[0] != out[(1, 1), 0.0, 0][0]  # the loss with dropout is not the loss without
  assert ref[0] != out[(1, 1), 0.3, 1][0]  # another rng, other masks
  kernel = lambda g: g['backbone']['mlp']['layers'][0]['kernel']
  assert not np.array_equal(kernel(out[(1, 1), 0.3, 0][1]), kernel(out[(1, 1), 0.0, 0][1]))


def test_pairwise_sum_is_a_sum():
  x = np.random.default_rng(0).normal(size=(13, 6, 1)).astype(np.float32)
  for axis in (0, 1, 2, -1):
    np.testing.assert_allclose(deterministic.pairwise_sum(jnp.asarray(x), axis), x.astype(np.float64).sum(axis),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compiles on several meshes
def test_norm_and_sums_give_the_same_bits_on_every_mesh():
  rng = np.random.default_rng(1)
  tree = {'table': rng.normal(size=(304, 16)).astype(np.float32), 'bias': rng.normal(size=(304,)).astype(np.float32),
          'dense': rng.normal(size=(144, 64)).astype(np.float32), 'scalar': np.float32(3.0)}
  specs = {'table': P('model', None), 'bias': P('model'), 'dense': P(None, None), 'scalar': P()}
  groups = rng.normal(size=(8, 33)).astype(np.float32)
  norms, sums = [], []
  for shape in [(1, 1), (8, 1), (2, 4)]:  # data only, and tables split over 'model'
    mesh = sharding_lib.make_mesh(shape, ('data', 'model'))
    shardings = sharding_lib.named(mesh, specs)
    norms.append(np.asarray(deterministic.global_norm(jax.device_put(tree, shardings), shardings)))
    on_data = jax.device_put(groups, sharding_lib.batch_sharding(mesh))
    sums.append(np.asarray(jax.jit(lambda x: deterministic.fixed_order_sum(x, mesh, 'data'))(on_data)))
  ref = np.sqrt(sum(np.sum(np.square(np.float64(x))) for x in tree.values()))
  np.testing.assert_allclose(norms[0], ref, rtol=1e-6)
  np.testing.assert_allclose(sums[0], groups.astype(np.float64).sum(0), rtol=1e-5, atol=1e-6)
  for n, s in zip(norms[1:], sums[1:]):
    np.testing.assert_array_equal(n, norms[0])
    np.testing.assert_array_equal(s, sums[0])


@pytest.mark.slow  # compiles on several meshes
def test_gradient_groups_follow_the_device_count(exp, config_on):
  assert [deterministic.gradient_groups(8, d) for d in (1, 2, 8, 16, 3)] == [8, 8, 8, 16, 24]
  assert deterministic.gradient_groups(0, 4) == 0
  c = config_on((4, 2))
  assert trainer_lib.batch_multiple(c) == 8
  c.train.batch_size = 36  # divisible by the data axis (4), not by the 8 gradient groups (one per device)
  with pytest.raises(ValueError, match='grad_groups'):
    _trainer(c, exp)
  c.train.grad_groups = 0  # XLA's own sum: any batch the data axis divides
  assert trainer_lib.batch_multiple(c) == 4
  state, m = _step(_trainer(c, exp), exp)
  assert np.isfinite(float(m['loss'])) and int(state['step']) == 1
  c.train.grad_groups = -1
  with pytest.raises(ValueError, match='train.grad_groups'):
    config_lib.validate(c)


def _step(trainer, exp):
  batch = next(exp.stream.epoch(0))
  return trainer.train_step(trainer.init_state, sharding_lib.global_batch(batch, trainer.batch_sharding))


@pytest.mark.slow  # compiles on several meshes
def test_memory_report(runs, exp):
  trainer, state = runs[(2, 4)].trainer, runs[(2, 4)].state
  report = trainer_lib.memory_report(trainer, state, next(exp.stream.epoch(0)))
  params = report['params_bytes_per_device']
  assert len(params) == 8 and len(set(params.values())) == 1
  leaves = jax.tree.leaves(state['params'])
  total = sum(x.nbytes for x in leaves)
  rows = sum(x.nbytes for x in leaves if x.sharding.spec and x.sharding.spec[0] == 'model')
  # Row-sharded tables (and id biases) count a quarter per device on a model axis of 4; the rest is replicated.
  assert params['cpu:0'] == total - rows + rows // 4
  assert report['opt_state_bytes_per_device']['cpu:0'] >= 2 * params['cpu:0']  # Adam: two moments per parameter
  assert report['step_argument_size_in_bytes'] > 0


@pytest.mark.slow  # compiles on several meshes
@pytest.mark.parametrize('target_shape', [(2, 4), (1, 1)])
def test_checkpoint_restores_onto_another_mesh(runs, exp, target_shape):
  """Saved on (4, 2), restored on (2, 4) and on a single device: identical values, the new mesh's shardings."""
  source, target = runs[(4, 2)], runs[target_shape]
  ckpt = Checkpointer(source.ckpt_dir, keep=2)
  state, meta = ckpt.restore_latest(target.state)  # the target mesh's live state is the restore template
  ckpt.close()
  assert meta['note'] == 'from (4, 2)' and int(state['step']) == STEPS
  assert all(x.sharding == y.sharding for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(target.state)))
  table = state['params']['embeddings']['tables']['user_id']
  assert len(table.sharding.device_set) == np.prod(target_shape)
  assert {s.data.shape[0] for s in table.addressable_shards} == {table.shape[0] // target_shape[1]}
  for a, b in zip(jax.tree.leaves(source.saved), jax.tree.leaves(jax.device_get(state)), strict=True):
    np.testing.assert_array_equal(a, b)
  # Training goes on from the restored state as it did on the original mesh.
  batch = list(zip(range(STEPS + 1), exp.stream.epoch(0)))[-1][1]
  _, m = target.trainer.train_step(state, sharding_lib.global_batch(batch, target.trainer.batch_sharding))
  np.testing.assert_allclose(float(m['loss']), source.losses[STEPS], rtol=1e-5)


@pytest.mark.slow  # compiles on several meshes
def test_warm_start_keeps_rows_of_known_ids(runs, exp, config_on):
  """--init_from: a run on more users (new interactions) starts from the (4, 2) checkpoint on a (2, 4) mesh, from
  its model: the moving average the source run evaluated (train.ema_decay), not the trained parameters beside it."""
  source = runs[(4, 2)]
  warm_start.save_features(exp.encoder, source.ckpt_dir)
  c = config_on((2, 4))
  c.data.synthetic.num_users = 400
  new_exp = experiment_lib.build(c)
  trainer = _trainer(c, new_exp)
  fresh = jax.device_get(trainer.init_state['params'])
  init = lambda t: warm_start.init_from_checkpoint(source.ckpt_dir, t.init_state['params'],
                                                   t.state_shardings['params'], new_exp.encoder)
  params = init(trainer)
  assert jax.tree.structure(params) == jax.tree.structure(fresh)
  want = jax.tree.leaves(trainer.state_shardings['params'])
  assert all(x.sharding == s for x, s in zip(jax.tree.leaves(params), want))
  got, old = jax.device_get(params), trainer_lib.model_params(source.saved)
  assert 'ema' in source.saved and old is source.saved['ema']
  old_vocab, new_vocab = exp.encoder.vocabs['user_id'], new_exp.encoder.vocabs['user_id']
  new_rows = np.arange(1, new_vocab.size)
  old_rows = old_vocab.lookup(new_vocab.keys)
  known, unknown = new_rows[old_rows > 0], new_rows[old_rows == 0]
  assert known.size > 100 and unknown.size > 50  # users 301..400 are new
  for table, old_table, fresh_table in [
      (got['embeddings']['tables']['user_id'], old['embeddings']['tables']['user_id'],
       fresh['embeddings']['tables']['user_id']),
      (got['id_biases']['rating']['user_id'], old['id_biases']['rating']['user_id'],
       fresh['id_biases']['rating']['user_id'])]:
    np.testing.assert_array_equal(table[known], old_table[old_rows[old_rows > 0]])
    np.testing.assert_array_equal(table[unknown], fresh_table[unknown])
    np.testing.assert_array_equal(table[0], old_table[0])  # the OOV row
    np.testing.assert_array_equal(table[new_vocab.size:], fresh_table[new_vocab.size:])  # padding
  np.testing.assert_array_equal(got['heads']['rating']['out']['kernel'], old['heads']['rating']['out']['kernel'])
  np.testing.assert_array_equal(got['embeddings']['tables']['age'], old['embeddings']['tables']['age'])

  c.model.embed_dim = 8  # another architecture: an error that names the parameter
  with pytest.raises(ValueError, match='embed_dim'):
    init(_trainer(c, new_exp))
