"""The optimizer and the jitted train and eval steps of one run, on a mesh with explicit shardings.

One code path for 1 device, N devices and N hosts: the train state is a pytree of plain dicts (params, optimizer
state, step) placed on a Mesh('data', 'model'); `train_step` and `eval_step` are pure functions jitted with in/out
shardings and a donated state.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from mtl_rec import deterministic
from mtl_rec import rowwise
from mtl_rec import model as model_lib
from mtl_rec import sharding as sharding_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec import trees
from mtl_rec.features import FeatureSpec

log = logging.getLogger(__name__)


def decay_mask(params: Any) -> Any:
  """Decoupled weight decay (optimizer.weight_decay) on dense kernels only; embedding rows are regularized per use
  (embedding_l2) and by their own decay (embedding_weight_decay_mask)."""
  def mask(path, x):
    return x.ndim >= 2 and 'embeddings' not in jax.tree_util.keystr(path)
  return jax.tree_util.tree_map_with_path(mask, params)


def embedding_weight_decay_mask(params: Any) -> Any:
  """optimizer.embedding_weight_decay's parameters: the embedding tables and projections (Embeddings' matrices)."""
  def mask(path, x):
    return x.ndim >= 2 and 'embeddings' in jax.tree_util.keystr(path)
  return jax.tree_util.tree_map_with_path(mask, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm with the norm given as `update(..., grad_norm=...)` (train_step computes it once, with
  deterministic.global_norm: the same bits on any mesh, and logs it); the same (empty) state, so checkpoints are
  interchangeable."""

  def update(updates, state, params=None, *, grad_norm, **_):
    del params
    # One scalar factor: XLA turns `g / norm` into `g * (1 / norm)` in some programs and not in others, which
    # would round differently from one mesh to another.
    scale = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def learning_rate(oc: ml_collections.ConfigDict, total_steps: int, peak: float = 0.0) -> optax.Schedule:
  """config.optimizer's schedule: linear warmup to the peak (`peak`, else oc.learning_rate), then constant or cosine
  decay to 0 at `total_steps`."""
  peak = peak or oc.learning_rate
  warmup = min(oc.warmup_steps, max(total_steps - 1, 0))
  if oc.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))
  return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                               optax.constant_schedule(peak)], [warmup])


def make_optimizer(oc: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of config.optimizer; its update takes `grad_norm=` (the gradient's global norm, for clipping)."""
  lr = learning_rate(oc, total_steps)
  if oc.embedding_weight_decay:  # adamw's chain (or adam's) with the tables' decay beside the kernels'
    decays = [optax.add_decayed_weights(oc.weight_decay, mask=decay_mask)] if oc.name == 'adamw' else []
    opt = optax.chain(optax.scale_by_adam(), *decays,
                      optax.add_decayed_weights(oc.embedding_weight_decay, mask=embedding_weight_decay_mask),
                      optax.scale_by_learning_rate(lr))
  elif oc.name == 'adamw':
    opt = optax.adamw(lr, weight_decay=oc.weight_decay, mask=decay_mask)
  else:
    opt = optax.adam(lr)
  return optax.chain(clip_by_global_norm(oc.grad_clip_norm), opt) if oc.grad_clip_norm > 0 else opt


def fill_large_tables(params: Any, shardings: Any, paths: Sequence[tuple[str, ...]], seed: int,
                      block_rows: int = 1 << 16) -> Any:
  """`params` with the tables at `paths` (built as zeros) filled with N(0, EMBEDDING_STDDEV^2) rows in place: each
  device writes its shard block by block (shard_map + fori_loop + dynamic_update_slice into the donated zeros), so
  the only temporaries are one block's. Row r's values depend on (seed, table, r) alone: the same on every mesh."""
  for path in paths:
    table, sharding = trees.get(params, path), trees.get(shardings, path)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32('/'.join(path).encode()))

    def local(t, key=key):
      rows = t.shape[0]
      block = min(block_rows, rows)
      first = jax.lax.axis_index(sharding_lib.RULES['vocab']) * rows
      row = lambda r: jax.random.normal(jax.random.fold_in(key, r), t.shape[1:], t.dtype)

      def body(b, t):
        start = jnp.minimum(b * block, rows - block)  # the last block ends at the shard's end (rewriting a few rows)
        values = jax.vmap(row)(first + start + jnp.arange(block)) * model_lib.EMBEDDING_STDDEV
        return jax.lax.dynamic_update_slice_in_dim(t, values.astype(t.dtype), start, axis=0)
      return jax.lax.fori_loop(0, -(-rows // block), body, t)
    fill = jax.jit(jax.shard_map(local, mesh=sharding.mesh, in_specs=sharding.spec, out_specs=sharding.spec),
                   out_shardings=sharding, donate_argnums=0)
    params = trees.replace(params, path, fill(table))
  return params


def make_row_optimizer(config: ml_collections.ConfigDict, table_inputs: Any,
                       total_steps: int) -> rowwise.RowOptimizer | None:
  """The row-wise optimizer of the id-table groups config.optimizer.tables does not leave dense; None if none."""
  groups = [g for g in rowwise.table_groups(config, table_inputs) if g.rule != rowwise.DENSE]
  if not groups:
    return None
  tc = config.optimizer.tables
  peak = lambda rule: tc.learning_rate or rowwise.DEFAULT_LEARNING_RATES[rule] or config.optimizer.learning_rate
  schedules = {g.rule: learning_rate(config.optimizer, total_steps, peak(g.rule)) for g in groups}
  return rowwise.RowOptimizer(groups, schedules, float(tc.eps), float(tc.initial_accumulator))


@dataclasses.dataclass
class Trainer:
  """The model definition, optimizer, mesh, shardings and the jitted steps of one run."""

  config: ml_collections.ConfigDict
  graphdef: Any
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  specs: tuple[tasks_lib.TaskSpec, ...]
  train_step: Callable
  eval_step: Callable
  init_state: Any  # freshly initialized state on the mesh (a restore target)
  row_optimizer: rowwise.RowOptimizer | None = None  # the id-table groups updated row-wise (None: all dense)


def loss_fn(params: Any, batch: dict[str, Any], rng: jax.Array, norms: dict[str, Any], *, graphdef, specs,
            esmm: bool, embedding_l2: float, tower_share: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, {task: sum of its masked row losses}) of a batch, or of a part of one: a sum over rows, each mean
  taken over the whole batch's `norms` (tasks.normalizers), so the parts of a batch add up to it. A retrieval
  task's towers run on the rows its loss reads (tasks.tower_rows), at most `tower_share` of the rows at a time."""
  model = nnx.merge(graphdef, params)
  outputs, aux = model(batch, rng, tasks_lib.tower_rows(batch, specs, tower_share))
  sums = tasks_lib.masked_sums(outputs, batch, specs, esmm)
  log_vars = model.log_vars[...] if model.log_vars is not None else None
  total = tasks_lib.weighted_loss({k: v / norms['tasks'][k] for k, v in sums.items()}, specs, log_vars)
  total = total + embedding_l2 * jnp.sum(aux['embedding_sq_norm'] * batch['valid']) / norms['valid_rows']
  return total, sums


def without(tree: Any, paths: Any) -> Any:
  """`tree` with None at `paths` (the row-wise tables: optax and the dense norm skip them)."""
  for path in paths:
    tree = trees.replace(tree, path, None)
  return tree


def model_params(state: dict[str, Any]) -> Any:
  """The parameters a run evaluates, selects, checkpoints as its model and exports: the moving average
  (train.ema_decay) when the state keeps one, else the trained parameters."""
  return state.get('ema', state['params'])


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
  """The moving average after a step: weight min(decay, (t + 1) / (t + 2)) on the old average at step t (0-based),
  so until 1 / (1 - decay) steps it is the plain mean of the parameters of every step so far, the initial ones
  included, and a decay's long memory does not keep the random initialization in the model."""
  t = step.astype(jnp.float32)
  d = jnp.minimum(jnp.float32(decay), (t + 1.0) / (t + 2.0))
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


def train_step(state: dict[str, Any], batch: dict[str, Any], *, value_and_grad: Callable, tx, specs, esmm: bool,
               seed: int, param_shardings: Any, row_optimizer: rowwise.RowOptimizer | None = None,
               grad_clip_norm: float = 0.0, ema_decay: float = 0.0) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One optimizer step. Pure: (state, batch) -> (new state, metrics).

  `value_and_grad` is `jax.value_and_grad(loss_fn, has_aux=True)` or `deterministic.value_and_grad(loss_fn, ...)`
  (the same sums in an order no mesh changes; config.train.grad_groups), returning ((loss, aux), grads, rows).
  With a `row_optimizer`, its tables' gradients come as rows (None in grads) and it updates their touched rows;
  optax (`tx`) updates the rest; global-norm clipping (`grad_clip_norm`, also inside `tx`) sees both. With
  `ema_decay` the state's 'ema' follows the new parameters (`ema_update`).
  """
  rng = jax.random.fold_in(jax.random.key(seed), state['step'])
  params = state['params']
  norms = tasks_lib.normalizers(batch, specs, esmm)
  (loss, sums), grads, rows = value_and_grad(params, batch, rng, norms)
  if 'log_vars' in params:  # uncertainty weighting's regularizer sum_t w_t s_t: once per batch, params alone
    weights = tasks_lib.uncertainty_weights(specs)
    loss = loss + jnp.sum(weights * params['log_vars'])
    grads = {**grads, 'log_vars': grads['log_vars'] + weights}
  row_tables = row_optimizer.tables if row_optimizer is not None else ()
  sq_norm = deterministic.global_sq_norm(grads, without(param_shardings, row_tables))
  if row_optimizer is not None:
    mesh = next(iter(jax.tree.leaves(param_shardings))).mesh
    deduped = row_optimizer.dedup(batch, rows, mesh)
    sq_norm = sq_norm + row_optimizer.sq_norm(deduped, mesh)
  grad_norm = jnp.sqrt(sq_norm)  # before clipping
  dense_params = without(params, row_tables)
  updates, opt_state = tx.update(grads, state['opt_state'], dense_params, grad_norm=grad_norm)
  new_params = optax.apply_updates(dense_params, updates)
  new_state = {'step': state['step'] + 1, 'opt_state': opt_state}
  if row_optimizer is not None:
    scale = (jnp.where(grad_norm < grad_clip_norm, 1.0, grad_clip_norm / grad_norm) if grad_clip_norm > 0
             else jnp.ones((), jnp.float32))
    updated, new_state['table_opt_state'] = row_optimizer.apply(
        params, state['table_opt_state'], deduped, param_shardings, state['step'], scale)
    for t in row_tables:
      new_params = trees.replace(new_params, t, trees.get(updated, t))
  new_state['params'] = new_params
  if ema_decay:
    new_state['ema'] = ema_update(state['ema'], new_params, state['step'], ema_decay)
  metrics = {'loss': loss, **{f'loss_{k}': v / norms['tasks'][k] for k, v in sums.items()}, 'grad_norm': grad_norm}
  return new_state, metrics


def eval_step(params: Any, batch: dict[str, Any], *, graphdef, specs) -> dict[str, jax.Array]:
  """Task predictions (tasks.predictions) of a batch."""
  outputs, _ = nnx.merge(graphdef, params)(batch)
  return tasks_lib.predictions(outputs, specs)


def batch_multiple(config: ml_collections.ConfigDict, num_devices: int | None = None) -> int:
  """What config.train.batch_size must be a multiple of on this job's mesh: the data shards (times processes) and,
  with the fixed-order gradient, its groups."""
  shape = sharding_lib.resolve_shape(tuple(config.mesh.shape), num_devices or jax.device_count())
  shards = shape[tuple(config.mesh.axis_names).index('data')] * jax.process_count()
  groups = deterministic.gradient_groups(config.train.grad_groups, math.prod(shape))
  return math.lcm(groups, shards) if groups else shards


def make_trainer(config: ml_collections.ConfigDict, features: Sequence[FeatureSpec],
                 specs: tuple[tasks_lib.TaskSpec, ...], total_steps: int, devices: Any = None) -> Trainer:
  """Builds the model on the mesh from config.mesh and jits the steps with explicit shardings."""
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axis_names, devices)
  groups = deterministic.gradient_groups(config.train.grad_groups, mesh.size)
  if groups != config.train.grad_groups:
    log.info('train.grad_groups=%d raised to %d, a multiple of the device count: numbers match other meshes whose '
             'device count divides %d', config.train.grad_groups, groups, groups)
  sharding_lib.check_divisible(config.train.batch_size, mesh, config.model.row_multiple, groups)
  # Parameters are initialized by one jit straight into their shards: no full table ever sits on one device, and
  # one compile replaces the dozens an eager init costs.
  build = lambda: model_lib.build(config, features, specs)
  abstract_model = nnx.eval_shape(build)
  graphdef, abstract_params = nnx.split(abstract_model)
  param_shardings = sharding_lib.named(mesh, sharding_lib.param_specs(abstract_params))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build())), out_shardings=param_shardings)()
  params = fill_large_tables(params, param_shardings, model_lib.large_init_tables(features), int(config.seed))
  replicated = jax.sharding.NamedSharding(mesh, P())
  tx = make_optimizer(config.optimizer, total_steps)
  row_optimizer = make_row_optimizer(config, abstract_model.table_inputs(), total_steps)
  row_tables = row_optimizer.tables if row_optimizer is not None else ()
  dense_params, dense_shardings = without(params, row_tables), without(param_shardings, row_tables)
  # Optimizer moments take their parameter's sharding and scalars (counts) are replicated, stated explicitly:
  # left to jit, the counts land on one device and the step then rejects the mixed placement.
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, dense_params), dense_shardings,
                                        transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(dense_params)
  state = {'step': jax.device_put(jnp.zeros((), jnp.int32), replicated), 'params': params, 'opt_state': opt_state}
  state_shardings = {'step': replicated, 'params': param_shardings, 'opt_state': opt_shardings}
  ema_decay = float(config.train.ema_decay)
  if ema_decay:
    state['ema'], state_shardings['ema'] = copy_params(params, param_shardings), param_shardings
  if row_optimizer is not None:
    state['table_opt_state'], state_shardings['table_opt_state'] = row_optimizer.init(params, param_shardings)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  esmm = bool(config.model.esmm)
  loss = functools.partial(loss_fn, graphdef=graphdef, specs=specs, esmm=esmm,
                           embedding_l2=float(config.optimizer.embedding_l2),
                           tower_share=tasks_lib.tower_share(config.sampling.num_negatives))
  if groups:
    value_and_grad = deterministic.value_and_grad(loss, groups=groups, param_shardings=param_shardings,
                                                  batch_sharding=batch_sharding,
                                                  table_inputs=abstract_model.table_inputs(), row_tables=row_tables)
  else:
    plain = jax.value_and_grad(loss, has_aux=True)
    value_and_grad = lambda *args: (*plain(*args), {})
  step = jax.jit(
      functools.partial(train_step, value_and_grad=value_and_grad, tx=tx, specs=specs, esmm=esmm,
                        seed=int(config.seed), param_shardings=param_shardings, row_optimizer=row_optimizer,
                        grad_clip_norm=float(config.optimizer.grad_clip_norm), ema_decay=ema_decay),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, graphdef=graphdef, specs=specs),
                     in_shardings=(state_shardings['params'], batch_sharding), out_shardings=replicated)
  return Trainer(config, graphdef, tx, mesh, state_shardings, batch_sharding, specs, step, evaluate, state,
                 row_optimizer)


def copy_params(params: Any, shardings: Any) -> Any:
  """A copy of `params` in new buffers, placed like them (the moving average's start; the step donates the state,
  and one buffer cannot be donated twice)."""
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def memory_report(trainer: Trainer, state: Any, example_batch: Any) -> dict[str, Any]:
  """Parameter/optimizer bytes per device and the compiled train step's memory analysis."""
  report = {'params_bytes_per_device': sharding_lib.bytes_per_device(state['params']),
            # optax's state and the row-wise optimizers' (table_opt_state), together
            'opt_state_bytes_per_device': sharding_lib.bytes_per_device(
                [state['opt_state'], state.get('table_opt_state', {})])}
  if 'ema' in state:  # the moving average of the parameters (train.ema_decay)
    report['ema_bytes_per_device'] = sharding_lib.bytes_per_device(state['ema'])
  abstract_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.batch_sharding), example_batch)
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  compiled = trainer.train_step.lower(abstract_state, abstract_batch).compile()
  mem = compiled.memory_analysis()
  if mem is not None:
    for field in ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
                  'generated_code_size_in_bytes'):
      report[f'step_{field}'] = int(getattr(mem, field, 0) or 0)
  return report
