"""Training and evaluation of the unified model: `train_and_evaluate(config, workdir)`.

One code path for 1 device, N devices and N hosts: the train state is a pytree of plain dicts (params, optimizer
state, step) placed on a Mesh('data', 'model') with explicit shardings; `train_step` and `eval_step` are pure
functions jitted with in/out shardings and a donated state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from mtl_rec import baselines as baselines_lib
from mtl_rec import config as config_lib
from mtl_rec import features as features_lib
from mtl_rec import metrics as metrics_lib
from mtl_rec import sharding as sharding_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.checkpoint import Checkpointer
from mtl_rec.data import splits as splits_lib
from mtl_rec.data.loader import load_data
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.data.types import RatingsData
from mtl_rec.input_pipeline import EvalSet, Examples, TrainStream
from mtl_rec.model import MultiTaskModel

log = logging.getLogger(__name__)

REQUIRED_METRICS = ('rating_rmse', 'rating_mae', 'like_auc', 'like_logloss', 'like_accuracy', 'click_auc',
                    'click_logloss', 'recall@10', 'ndcg@10', 'hr@10_sampled', 'ndcg@10_sampled')


# ---------------------------------------------------------------------------------------------------------------
# The experiment's data: everything derived from config.data/features/sampling, built once.


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  data: RatingsData
  split: splits_lib.Split
  encoder: features_lib.FeatureEncoder
  user_index: np.ndarray  # [N] position of each rating's user in data.users
  item_index: np.ndarray  # [N] position of each rating's item in data.items
  train_sampler: NegativeSampler  # excludes the user's training positives
  eval_sampler: NegativeSampler  # excludes everything the user ever rated
  stream: TrainStream
  valid: EvalSet
  test: EvalSet
  specs: tuple[tasks_lib.TaskSpec, ...]

  @property
  def num_users(self) -> int:
    return int(self.data.users.user_id.shape[0])

  @property
  def num_items(self) -> int:
    return int(self.data.items.item_id.shape[0])

  def positives(self, rows: np.ndarray) -> Examples:
    n = rows.shape[0]
    return Examples(self.user_index[rows], self.item_index[rows], self.data.rating[rows].astype(np.float32),
                    np.ones(n, np.float32))


def _positions(ids: np.ndarray, table_ids: np.ndarray, what: str) -> np.ndarray:
  order = np.argsort(table_ids)
  pos = np.searchsorted(table_ids[order], ids)
  pos = np.minimum(pos, len(order) - 1)
  bad = table_ids[order][pos] != ids
  if bad.any():
    raise ValueError(f'rating rows reference {what} id {ids[bad][0]} missing from the {what} table; the data files '
                     'are inconsistent: re-fetch them')
  return order[pos].astype(np.int64)


def prepare(config: ml_collections.ConfigDict) -> Experiment:
  """Loads data, splits it, fits features on the training split and builds samplers and example streams."""
  config_lib.validate(config)
  data = load_data(config.data, seed=config.seed)
  split = splits_lib.make_split(data, config.data.split, config.seed, config.data.valid_fraction,
                                config.data.test_fraction)
  encoder = features_lib.fit(data, split.train, config.features, row_multiple=config.features.row_multiple)
  uidx = _positions(data.user_id, data.users.user_id, 'user')
  iidx = _positions(data.item_id, data.items.item_id, 'item')
  num_items = int(data.items.item_id.shape[0])
  train_items = np.unique(iidx[split.train])
  train_sampler = NegativeSampler(uidx[split.train], iidx[split.train], train_items, num_items,
                                  config.sampling.distribution, config.sampling.popularity_power)
  eval_sampler = NegativeSampler(uidx, iidx, train_items, num_items, 'uniform')
  exp = Experiment(config=config, data=data, split=split, encoder=encoder, user_index=uidx, item_index=iidx,
                   train_sampler=train_sampler, eval_sampler=eval_sampler, stream=None, valid=None, test=None,
                   specs=tasks_lib.task_specs(config))
  exp.stream = TrainStream(exp.positives(split.train), encoder, train_sampler, config.sampling.num_negatives,
                           config.train.batch_size, config.data.like_threshold, config.seed)
  exp.valid = EvalSet.build(exp.positives(split.valid), eval_sampler, config.eval.click_negatives, config.seed, 1)
  exp.test = EvalSet.build(exp.positives(split.test), eval_sampler, config.eval.click_negatives, config.seed, 2)
  return exp


# ---------------------------------------------------------------------------------------------------------------
# Model, optimizer, state.


def build_model(config: ml_collections.ConfigDict, encoder: features_lib.FeatureEncoder,
                rating_mean: float = 3.5) -> MultiTaskModel:
  tasks = {name: dict(t) for name, t in config.tasks.items()}
  return MultiTaskModel(encoder.specs, tasks, config.model, config.features.embed_dim,
                        nnx.Rngs(params=config.seed), rating_mean=rating_mean)


def _decay_mask(params: Any) -> Any:
  """Decoupled weight decay on dense kernels only; embedding rows are regularized per use (embedding_l2)."""
  def mask(path, x):
    return x.ndim >= 2 and 'embeddings' not in jax.tree_util.keystr(path)
  return jax.tree_util.tree_map_with_path(mask, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm with the norm given as `update(..., grad_norm=...)` (train_step computes it once, with
  sharding.global_norm: the same bits on any mesh, and logs it); the same (empty) state, so checkpoints are
  interchangeable."""

  def update(updates, state, params=None, *, grad_norm, **_):
    del params
    # One scalar factor: XLA turns `g / norm` into `g * (1 / norm)` in some programs and not in others, which
    # would round differently from one mesh to another.
    scale = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def make_optimizer(oc: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of config.optimizer; its update takes `grad_norm=` (the gradient's global norm, for clipping)."""
  warmup = min(oc.warmup_steps, max(total_steps - 1, 0))
  if oc.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, oc.learning_rate, warmup, max(total_steps, warmup + 1))
  else:
    lr = optax.join_schedules([optax.linear_schedule(0.0, oc.learning_rate, max(warmup, 1)),
                               optax.constant_schedule(oc.learning_rate)], [warmup])
  if oc.name == 'adamw':
    opt = optax.adamw(lr, weight_decay=oc.weight_decay, mask=_decay_mask)
  else:
    opt = optax.adam(lr)
  return optax.chain(clip_by_global_norm(oc.grad_clip_norm), opt) if oc.grad_clip_norm > 0 else opt


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


def _forward(graphdef, params, batch, rng=None):
  model = nnx.merge(graphdef, params)
  outputs, aux = model(batch['user'], batch['item'], rng)
  log_vars = model.log_vars[...] if model.log_vars is not None else None
  return outputs, aux, log_vars


def train_step(state: dict[str, Any], batch: dict[str, Any], *, graphdef, tx, specs, esmm: bool,
               embedding_l2: float, seed: int, param_shardings: Any, by_group: Any,
               groups: int = 0) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One optimizer step. Pure: (state, batch) -> (new state, metrics).

  `param_shardings` and `by_group` (the batch sharding) describe the layout on the mesh. With `groups` > 0 the
  gradient is summed in an order that no mesh changes (`_grouped_grads`); with 0 as XLA partitions it.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state['step'])
  common = dict(graphdef=graphdef, specs=specs, esmm=esmm, embedding_l2=embedding_l2)
  if groups:
    (loss, per_task), grads = _grouped_grads(state['params'], batch, rng, groups=groups,
                                             param_shardings=param_shardings, by_group=by_group, **common)
  else:
    (loss, per_task), grads = _plain_grads(state['params'], batch, rng, **common)
  grad_norm = sharding_lib.global_norm(grads, param_shardings)  # before clipping
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'], grad_norm=grad_norm)
  params = optax.apply_updates(state['params'], updates)
  metrics = {'loss': loss, **{f'loss_{k}': v for k, v in per_task.items()}, 'grad_norm': grad_norm}
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, metrics


def _plain_grads(params: Any, batch: dict[str, Any], rng: jax.Array, *, graphdef, specs, esmm: bool,
                 embedding_l2: float):
  """((loss, per-task losses), gradient) of one batch, summed the way XLA partitions it (train.grad_groups=0)."""
  def loss_fn(params):
    outputs, aux, log_vars = _forward(graphdef, params, batch, rng)
    total, per_task = tasks_lib.losses(outputs, batch, specs, esmm, log_vars)
    reg = embedding_l2 * jnp.sum(aux['embedding_sq_norm'] * batch['valid']) / jnp.maximum(batch['valid'].sum(), 1)
    return total + reg, per_task
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _shard_take(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Inside shard_map: the rows of `ids` (global row numbers) that this device's shard of `table` holds, zeros for
  the others. Its transpose scatter-adds into the shard only, in the order of `ids`."""
  start = jax.lax.axis_index(sharding_lib.RULES['vocab']) * table.shape[0]
  local = ids - start
  local = jnp.where((local >= 0) & (local < table.shape[0]), local, table.shape[0])  # out of range: filled, dropped
  return jnp.take(table, local, axis=0, mode='fill', fill_value=0)


def _grouped_grads(params: Any, batch: dict[str, Any], rng: jax.Array, *, graphdef, specs, esmm: bool,
                   embedding_l2: float, groups: int, param_shardings: Any, by_group: Any):
  """((loss, per-task losses), gradient) of one batch, summed in an order that no mesh changes.

  XLA sums a sharded axis as local partial sums then an all-reduce, and it splits even replicated work over idle
  devices, so the order of a gradient's additions (and its float32 rounding) depends on the mesh; a long run
  amplifies that last-bit noise until runs on different meshes visibly disagree. Here every addition's order is
  fixed by the batch alone:
  - the row-sharded tables are looked up for the whole batch on every device (shard_map: each device reads its
    rows, a psum over 'model' of one non-zero value per row is exact) and their gradient is each device's
    scatter-add of all rows' cotangents into its own shard, in batch order;
  - the dense network runs on `groups` fixed groups of rows (whole groups per device), one group at a time: the
    same program on the same rows on every mesh (a batched program is not: XLA's CPU kernels round differently for
    different batch counts); the per-group gradients are gathered and summed on every device
    (`sharding.fixed_order_sum`);
  - losses are sums of per-group sums over global denominators, so this is the batch-mean gradient up to rounding.
  """
  leaves, treedef = jax.tree.flatten(params)
  shardings = treedef.flatten_up_to(param_shardings)
  rows_at = [sharding_lib.is_row_sharded(s.spec) for s in shardings]
  dense = [x for x, r in zip(leaves, rows_at) if not r]
  tables = [x for x, r in zip(leaves, rows_at) if r]
  table_specs = [s.spec for s, r in zip(shardings, rows_at) if r]
  stand_in = lambda xs: [jnp.zeros((), x.dtype) for x in xs]  # for parameters a computation does not read

  def join(dense, tables):  # the parameter tree from its two parts
    it_d, it_t = iter(dense), iter(tables)
    return treedef.unflatten([next(it_t) if r else next(it_d) for r in rows_at])
  merge = lambda dense, tables: nnx.merge(graphdef, join(dense, tables))

  mesh, whole = by_group.mesh, P()
  large = {s.name for s in merge(stand_in(dense), stand_in(tables)).embeddings.specs if s.large}
  ids = tuple({k: v for k, v in batch[e].items() if k in large} for e in ('user', 'item'))  # all lookup reads
  lookup = lambda tables, ids: merge(stand_in(dense), tables).lookup(*ids, take=_shard_take)
  rows = jax.shard_map(lambda t, i: jax.lax.psum(lookup(t, i), sharding_lib.RULES['vocab']), mesh=mesh,
                       in_specs=(table_specs, whole), out_specs=whole, check_vma=False)(tables, ids)

  masks = tasks_lib.loss_masks(batch, specs, esmm)
  denominators = {k: jnp.maximum(jnp.sum(m), 1.0) for k, m in masks.items()}  # sums of 0/1: exact in any order
  valid_rows = jnp.maximum(jnp.sum(batch['valid']), 1.0)

  def group_loss(dense, rows_g, batch_g, masks_g, g, rng, denominators, valid_rows):
    model = merge(dense, stand_in(tables))  # given `rows`, the network reads no row-sharded table
    outputs, aux = model(batch_g['user'], batch_g['item'], jax.random.fold_in(rng, g), rows=rows_g)
    terms = tasks_lib.loss_terms(outputs, batch_g, specs, esmm)
    sums = {k: jnp.sum(terms[k] * masks_g[k]) for k in terms}
    log_vars = model.log_vars[...] if model.log_vars is not None else None
    total = tasks_lib.total_loss({k: v / denominators[k] for k, v in sums.items()}, specs, log_vars,
                                 regularizer=(g == 0).astype(jnp.float32))  # once per batch: in group 0
    total = total + embedding_l2 * jnp.sum(aux['embedding_sq_norm'] * batch_g['valid']) / valid_rows
    return total, (total, sums)

  def local_groups(dense, rows, batch, masks, group_ids, *scalars):  # one device's whole groups, one at a time
    per_group = lambda x: x.reshape((group_ids.shape[0], -1) + x.shape[1:])
    grad_fn = jax.grad(group_loss, argnums=(0, 1), has_aux=True)
    return jax.lax.map(lambda a: grad_fn(dense, *a, *scalars),
                       (*jax.tree.map(per_group, (rows, batch, masks)), group_ids))

  # check_vma=False: a gradient taken inside shard_map is then this device's own (no implicit psum).
  by_rows = P(by_group.spec[0])
  (dense_grads, rows_grads), (group_totals, group_sums) = jax.shard_map(
      local_groups, mesh=mesh, in_specs=(whole, by_rows, by_rows, by_rows, by_rows, whole, whole, whole),
      out_specs=by_rows, check_vma=False)(dense, rows, batch, masks, jnp.arange(groups), rng, denominators,
                                          valid_rows)
  fixed_sum = lambda x: sharding_lib.fixed_order_sum(x, mesh, by_rows[0])
  dense_grads = [fixed_sum(g) for g in dense_grads]
  n = batch['valid'].shape[0]
  rows_grads = jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), rows_grads)

  def table_vjp(tables, ids, cotangents):
    return jax.vjp(lambda t: lookup(t, ids), tables)[1](cotangents)[0]
  table_grads = jax.shard_map(table_vjp, mesh=mesh, in_specs=(table_specs, whole, whole), out_specs=table_specs,
                              check_vma=False)(tables, ids, rows_grads)
  loss = fixed_sum(group_totals)
  per_task = {k: fixed_sum(v) / denominators[k] for k, v in group_sums.items()}
  return (loss, per_task), join(dense_grads, table_grads)


def eval_step(params: Any, batch: dict[str, Any], *, graphdef, specs) -> dict[str, jax.Array]:
  outputs, _, _ = _forward(graphdef, params, batch)
  return tasks_lib.predictions(outputs, specs)


def make_trainer(config: ml_collections.ConfigDict, encoder: features_lib.FeatureEncoder, total_steps: int,
                 rating_mean: float = 3.5, devices: Any = None) -> Trainer:
  """Builds the model on the mesh from config.mesh and jits the steps with explicit shardings."""
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axis_names, devices)
  groups = sharding_lib.gradient_groups(config.train.grad_groups, mesh.shape['data'])
  if groups != config.train.grad_groups:
    log.info('train.grad_groups=%d raised to %d, a multiple of the data axis: numbers match other meshes whose '
             'data axis divides %d', config.train.grad_groups, groups, groups)
  sharding_lib.check_divisible(config.train.batch_size, mesh, config.features.row_multiple, groups)
  # Parameters are initialized by one jit straight into their shards: no full table ever sits on one device, and
  # one compile replaces the dozens an eager init costs.
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(config, encoder, rating_mean)))
  param_shardings = sharding_lib.named(mesh, sharding_lib.param_specs(abstract_params))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(config, encoder, rating_mean))),
                   out_shardings=param_shardings)()
  replicated = jax.sharding.NamedSharding(mesh, P())
  tx = make_optimizer(config.optimizer, total_steps)
  # Optimizer moments take their parameter's sharding and scalars (counts) are replicated, stated explicitly:
  # left to jit, the counts land on one device and the step then rejects the mixed placement.
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
                                        transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = {'step': jax.device_put(jnp.zeros((), jnp.int32), replicated), 'params': params, 'opt_state': opt_state}
  state_shardings = {'step': replicated, 'params': param_shardings, 'opt_state': opt_shardings}
  batch_sharding = sharding_lib.batch_sharding(mesh)
  specs = tasks_lib.task_specs(config)
  step = jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, specs=specs, esmm=bool(config.model.esmm),
                        embedding_l2=float(config.optimizer.embedding_l2), seed=int(config.seed), groups=groups,
                        param_shardings=param_shardings, by_group=batch_sharding),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, graphdef=graphdef, specs=specs),
                     in_shardings=(state_shardings['params'], batch_sharding), out_shardings=replicated)
  return Trainer(config, graphdef, tx, mesh, state_shardings, batch_sharding, specs, step, evaluate, state)


def memory_report(trainer: Trainer, state: Any, example_batch: Any) -> dict[str, Any]:
  """Parameter/optimizer bytes per device and the compiled train step's memory analysis."""
  report = {'params_bytes_per_device': sharding_lib.bytes_per_device(state['params']),
            'opt_state_bytes_per_device': sharding_lib.bytes_per_device(state['opt_state'])}
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


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.


def predict(trainer: Trainer, params: Any, exp: Experiment, eval_set: EvalSet) -> tuple[dict, dict, np.ndarray]:
  """(predictions, labels, observed) over an eval set's real rows, on the host."""
  preds, labels, observed = [], [], []
  bs = trainer.config.eval.batch_size
  bs -= bs % trainer.mesh.shape['data']
  for batch in eval_set.batches(exp.encoder, bs, exp.config.data.like_threshold):
    keep = batch['valid'] > 0
    out = trainer.eval_step(params, sharding_lib.global_batch(batch, trainer.batch_sharding))
    preds.append({k: np.asarray(v)[keep] for k, v in out.items()})
    labels.append({k: v[keep] for k, v in batch['labels'].items()})
    observed.append(batch['observed'][keep])
  cat = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return cat(preds), cat(labels), np.concatenate(observed)


def pointwise_metrics(trainer: Trainer, params: Any, exp: Experiment, eval_set: EvalSet) -> dict[str, float]:
  preds, labels, observed = predict(trainer, params, exp, eval_set)
  out = {}
  for s in exp.specs:
    out.update(tasks_lib.task_metrics(s, preds[s.name], labels, observed, exp.config.data.like_threshold))
  return out


def catalog_predictions(graphdef: Any, specs: tuple[tasks_lib.TaskSpec, ...]) -> Callable:
  """jit: (params, user feature batch [U], item features [I]) -> {task: predictions [U, I] (or [U, I, C])}.

  Every (user, item) pair of the cross product, for the tasks of `specs`, of the network `graphdef` (a trainer's,
  or any model's with the same call signature); the fused scorers of mtl_rec.fusion and the ranking metrics below
  build on it.
  """

  def predict_all(params, users, items):
    nu = jax.tree.leaves(users)[0].shape[0]
    ni = jax.tree.leaves(items)[0].shape[0]
    u = jax.tree.map(lambda x: jnp.repeat(x, ni, axis=0), users)
    i = jax.tree.map(lambda x: jnp.tile(x, (nu,) + (1,) * (x.ndim - 1)), items)
    outputs, _, _ = _forward(graphdef, params, {'user': u, 'item': i})
    return {k: v.reshape((nu, ni) + v.shape[1:]) for k, v in tasks_lib.predictions(outputs, specs).items()}
  return jax.jit(predict_all)


def catalog_features(exp: Experiment) -> dict[str, np.ndarray]:
  """The item features of the whole catalog, in item-position order."""
  return exp.encoder.gather(np.zeros(exp.num_items, np.int64), np.arange(exp.num_items))['item']


def _catalog_scorer(trainer: Trainer, exp: Experiment) -> Callable:
  """jit: (params, user feature batch [U], item catalog features [I]) -> ranking scores [U, I]."""
  spec = next(s for s in exp.specs if s.name == exp.config.eval.ranking_task)
  predict_all = catalog_predictions(trainer.graphdef, exp.specs)

  def score(params, users, items):
    return tasks_lib.ranking_score(predict_all(params, users, items), spec, exp.config.data.like_threshold)
  return jax.jit(score)


def catalog_ranking_metrics(exp: Experiment, heldout_rows: np.ndarray, history_rows: np.ndarray,
                            score_users: Callable[[np.ndarray], Any]) -> dict[str, float]:
  """Full-catalog Recall/NDCG@K (RecBole protocol, graded NDCG too) of any scorer.

  `score_users(user positions [U]) -> scores [U, num_items]` (numpy or device array). For each user with a
  held-out rating every catalog item the user has not rated in `history_rows` is ranked; the held-out items are
  the relevant ones, with the held-out rating as gain for `ndcg@K_graded`.
  """
  ec, k = exp.config.eval, exp.config.eval.k
  num_items = exp.num_items
  h_users, h_items = exp.user_index[heldout_rows], exp.item_index[heldout_rows]
  eval_users = np.unique(h_users)
  row_of = np.full(exp.num_users, -1, np.int64)
  row_of[eval_users] = np.arange(eval_users.size)
  relevant = metrics_lib.csr_from_pairs(row_of[h_users], h_items, eval_users.size,
                                        gains=exp.data.rating[heldout_rows])
  seen = metrics_lib.csr_from_pairs(exp.user_index[history_rows], exp.item_index[history_rows], exp.num_users)
  users_per_batch = max(1, min(eval_users.size, ec.ranking_rows_per_batch // num_items))
  topk = np.zeros((eval_users.size, k), np.int64)
  for start in range(0, eval_users.size, users_per_batch):
    users = eval_users[start:start + users_per_batch]
    pad = users_per_batch - users.size
    users_p = np.concatenate([users, np.repeat(users[-1:], pad)])
    scores = score_users(users_p)
    exclude = np.zeros((users_p.size, num_items), bool)
    for r, u in enumerate(users_p):
      exclude[r, seen[1][seen[0][u]:seen[0][u + 1]]] = True
    _, idx = metrics_lib.masked_topk(scores, exclude, k)
    topk[start:start + users.size] = np.asarray(idx)[:users.size]
  return metrics_lib.topk_ranking_metrics(topk, relevant, k)


def ranking_metrics(trainer: Trainer, params: Any, exp: Experiment, heldout_rows: np.ndarray,
                    history_rows: np.ndarray, item_scores: np.ndarray | None = None) -> dict[str, float]:
  """Full-catalog Recall/NDCG@K (RecBole protocol) and sampled HR/NDCG@K (NCF protocol).

  For each user with a held-out rating: rank every catalog item the user has not rated in `history_rows`; the
  user's held-out items are the relevant ones (graded NDCG uses the held-out rating as gain). With `item_scores`
  (one score per item, e.g. popularity) the same protocol evaluates a non-personalized ranking instead.
  """
  ec, k = exp.config.eval, exp.config.eval.k
  h_users, h_items = exp.user_index[heldout_rows], exp.item_index[heldout_rows]
  if item_scores is not None:
    score_users = lambda users: np.broadcast_to(item_scores, (users.size, exp.num_items))
  else:
    scorer, catalog = _catalog_scorer(trainer, exp), catalog_features(exp)
    score_users = lambda users: scorer(params, {n: v[users] for n, v in exp.encoder.user_table.items()}, catalog)
  out = catalog_ranking_metrics(exp, heldout_rows, history_rows, score_users)

  # NCF protocol: each held-out positive against `sampled_negatives` items the user never rated (fixed seed).
  rng = np.random.default_rng([exp.config.seed, 4])
  negs = exp.eval_sampler.sample(h_users, ec.sampled_negatives, rng)
  cand_users = np.repeat(h_users, 1 + ec.sampled_negatives)
  cand_items = np.concatenate([h_items[:, None], negs], axis=1).reshape(-1)
  if item_scores is not None:
    s = item_scores[cand_items]
  else:
    s = _score_pairs(trainer, params, exp, cand_users, cand_items)
  s = s.reshape(h_users.size, 1 + ec.sampled_negatives)
  out.update(metrics_lib.sampled_hr_ndcg(s[:, 0], s[:, 1:], k))
  return out


def _score_pairs(trainer: Trainer, params: Any, exp: Experiment, users: np.ndarray,
                 items: np.ndarray) -> np.ndarray:
  """The ranking task's score for arbitrary (user, item) position pairs."""
  spec = next(s for s in exp.specs if s.name == exp.config.eval.ranking_task)
  bs = exp.config.eval.batch_size
  bs -= bs % trainer.mesh.shape['data']
  n, out = users.shape[0], []
  for start in range(0, n, bs):
    idx = np.minimum(np.arange(start, start + bs), n - 1)
    batch = exp.encoder.gather(users[idx], items[idx])
    preds = trainer.eval_step(params, sharding_lib.global_batch(batch, trainer.batch_sharding))
    out.append(np.asarray(tasks_lib.ranking_score(preds, spec, exp.config.data.like_threshold))[:min(bs, n - start)])
  return np.concatenate(out)


def full_metrics(trainer: Trainer, params: Any, exp: Experiment, which: str) -> dict[str, float]:
  """Every metric of metrics.json for 'valid' or 'test'."""
  s = exp.split
  eval_set, heldout, history = ((exp.valid, s.valid, s.train) if which == 'valid' else
                                (exp.test, s.test, np.concatenate([s.train, s.valid])))
  out = pointwise_metrics(trainer, params, exp, eval_set)
  out.update(ranking_metrics(trainer, params, exp, heldout, history))
  return out


def baseline_metrics(exp: Experiment) -> dict[str, dict[str, float]]:
  """Floors on the test split: popularity ranking and the bias-only rating model (mu + b_u + b_i)."""
  s = exp.split
  train_u, train_i = exp.user_index[s.train], exp.item_index[s.train]
  pop = baselines_lib.popularity_scores(train_i, exp.num_items).astype(np.float32)
  pop_metrics = ranking_metrics(None, None, exp, s.test, np.concatenate([s.train, s.valid]), item_scores=pop)
  ex = exp.test.examples
  click_rows = ex.observed >= 0
  pop_metrics['click_auc'] = metrics_lib.auc(ex.observed[click_rows], pop[ex.item[click_rows]])
  bias = baselines_lib.fit_bias_model(train_u, train_i, exp.data.rating[s.train], exp.num_users, exp.num_items)
  obs = s.test
  pred = bias.predict(exp.user_index[obs], exp.item_index[obs])
  y = exp.data.rating[obs]
  like = (y >= exp.config.data.like_threshold).astype(np.float32)
  bias_metrics = {'rating_rmse': metrics_lib.rmse(y, pred), 'rating_mae': metrics_lib.mae(y, pred),
                  'like_auc': metrics_lib.auc(like, pred)}
  return {'popularity': pop_metrics, 'bias_only': bias_metrics}


# ---------------------------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
  """SIGTERM (how preemption arrives) sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False  # this process got SIGTERM
    self.stop = False  # every process agreed to stop after the current step
    self._previous = None

  def check(self, sync_point: bool) -> bool:
    """Whether to stop now. With several processes the flags are combined only at sync points (which every process
    reaches at the same step): a process that stopped alone would leave the others hanging in a collective."""
    if jax.process_count() == 1:
      self.stop = self.requested
    elif sync_point and not self.stop:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.stop = bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))
    return self.stop

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Writer:
  """history.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.history_path = os.path.join(workdir, 'history.jsonl')
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.history_path):  # drop entries past the checkpoint we resume from
      with open(self.history_path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
      with open(self.history_path, 'w') as f:
        f.writelines(kept)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: dict[str, float], prefix: str = '', history: bool = False) -> None:
    if not self.enabled:
      return
    for k, v in values.items():
      self.tb.add_scalar(f'{prefix}{k}', v, step)
    if history:
      with open(self.history_path, 'a') as f:
        f.write(json.dumps({'step': step, **values}) + '\n')

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _better(a: float, b: float | None, mode: str) -> bool:
  return b is None or (a < b if mode == 'min' else a > b)


def format_table(metrics: dict[str, Any]) -> str:
  """A plain-text table of the test metrics beside the baselines."""
  test, base = metrics['test'], metrics.get('baselines', {})
  keys = list(REQUIRED_METRICS) + sorted(k for k in test if k not in REQUIRED_METRICS)
  lines = [f'{"metric":<22}{"model":>10}{"popularity":>12}{"bias-only":>11}']
  for k in keys:
    if k not in test:
      continue
    cells = [f'{test[k]:>10.4f}']
    for b in ('popularity', 'bias_only'):
      v = base.get(b, {}).get(k)
      cells.append(f'{v:>{12 if b == "popularity" else 11}.4f}' if v is not None else
                   ' ' * (12 if b == 'popularity' else 11))
    lines.append(f'{k:<22}' + ''.join(cells))
  return '\n'.join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       init_from: str | None = None) -> dict[str, Any]:
  """Trains with early stopping on validation, evaluates the best checkpoint on test, writes the run directory.

  Re-running with the same workdir resumes from the latest checkpoint. `init_from` (a run's workdir or one of its
  checkpoint step directories) warm-starts a fresh run from trained weights; see `init_from_checkpoint`. Returns the
  metrics.json content.
  """
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  _write_json(os.path.join(workdir, 'config.json'), config.to_dict())

  t0 = time.time()
  exp = prepare(config)
  log.info('data: %s (%s): %d ratings, %d users, %d items; split %s: train %d / valid %d / test %d (%.1fs)',
           exp.data.name, exp.data.source, exp.data.num_ratings, exp.num_users, exp.num_items, config.data.split,
           exp.split.train.size, exp.split.valid.size, exp.split.test.size, time.time() - t0)
  if lead:
    splits_lib.write_csv(exp.data, exp.split, os.path.join(workdir, 'splits'))
  save_vocabularies(exp.encoder, os.path.join(workdir, VOCAB_FILE))

  spe = exp.stream.steps_per_epoch
  total_steps = spe * config.train.epochs
  rating_mean = float(exp.data.rating[exp.split.train].mean())
  trainer = make_trainer(config, exp.encoder, total_steps, rating_mean)
  state = trainer.init_state
  ckpt = Checkpointer(workdir, config.train.keep_checkpoints)
  meta = {'best_value': None, 'best_step': None, 'bad_epochs': 0, 'evaluated_epochs': 0, 'stopped': False}
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, saved_meta = restored
    meta.update({k: saved_meta[k] for k in meta if k in saved_meta})
    log.info('resumed from checkpoint at step %d', int(state['step']))
  elif init_from:  # only a fresh run warm-starts: a resumed one continues from its own checkpoint
    state = {**state, 'params': init_from_checkpoint(init_from, trainer, state['params'], exp.encoder)}
  start_step = int(state['step'])

  first_batch = next(exp.stream.epoch(0))
  report = memory_report(trainer, state, first_batch)
  log.info('mesh %s; memory: %s', dict(trainer.mesh.shape), json.dumps(report))
  if lead:
    print(f'mesh {dict(trainer.mesh.shape)}  params/device {max(report["params_bytes_per_device"].values()):,} B  '
          f'opt state/device {max(report["opt_state_bytes_per_device"].values()):,} B  '
          f'step temp {report.get("step_temp_size_in_bytes", 0):,} B', flush=True)

  writer = _Writer(workdir, start_step)
  metric, mode = config.train.early_stopping_metric, config_lib.metric_mode(config.train.early_stopping_metric)
  pbar = None
  if lead and config.train.progress_bar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    pbar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)

  def meta_to_save() -> dict[str, Any]:
    return {**meta, 'config': config.to_dict()}

  step = start_step
  preempted = False
  with _Preemption() as preemption:
    sums, n_sum, t_log = None, 0, time.time()
    for epoch in range(step // spe, config.train.epochs):
      if meta['stopped']:
        break
      for batch in exp.stream.epoch(epoch, start_step=step - epoch * spe):
        state, m = trainer.train_step(state, sharding_lib.global_batch(batch, trainer.batch_sharding))
        step += 1
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        n_sum += 1
        if step % config.train.log_every_steps == 0 or step % spe == 0:
          values = {k: float(v) / n_sum for k, v in jax.device_get(sums).items()}
          dt = time.time() - t_log
          values['examples_per_sec'] = n_sum * config.train.batch_size / max(dt, 1e-9)
          values['epoch'] = epoch
          writer.scalars(step, values, 'train/', history=True)
          if pbar is not None:
            pbar.set_postfix(loss=f'{values["loss"]:.4f}', ex_s=f'{values["examples_per_sec"]:,.0f}')
          sums, n_sum, t_log = None, 0, time.time()
        if pbar is not None:
          pbar.update(1)
        if step % config.train.checkpoint_every_steps == 0 and step % spe:
          ckpt.save(step, state, meta_to_save())
        if preemption.check(sync_point=step % config.train.log_every_steps == 0):
          break
      if preemption.stop and step % spe:
        preempted = True
        break
      # End of epoch: validate, early-stopping bookkeeping, checkpoint (latest, and best if improved).
      valid = pointwise_metrics(trainer, state['params'], exp, exp.valid)
      if metric not in valid:
        valid.update(ranking_metrics(trainer, state['params'], exp, exp.split.valid, exp.split.train))
      writer.scalars(step, valid, 'valid/')
      improved = _better(valid[metric], meta['best_value'], mode)
      if improved:
        meta.update(best_value=float(valid[metric]), best_step=step, bad_epochs=0)
      else:
        meta['bad_epochs'] += 1
      meta['evaluated_epochs'] = epoch + 1
      if config.train.patience and meta['bad_epochs'] >= config.train.patience:
        meta['stopped'] = True
      log.info('epoch %d step %d: valid %s=%.4f (best %.4f at step %s)', epoch + 1, step, metric, valid[metric],
               meta['best_value'], meta['best_step'])
      if pbar is not None:
        pbar.write(f'epoch {epoch + 1}: valid ' + ' '.join(f'{k}={v:.4f}' for k, v in sorted(valid.items())))
      ckpt.save(step, state, meta_to_save(), best=improved)
      t_log = time.time()  # examples/s measures training, not evaluation
      if preemption.check(sync_point=True):
        preempted = True
        break
    if preempted:
      ckpt.save(step, state, meta_to_save())
  if pbar is not None:
    pbar.close()
  ckpt.wait()
  if preempted:
    writer.close()
    ckpt.close()
    msg = f'SIGTERM: saved a checkpoint at step {step}; re-run the same command to resume.'
    log.warning(msg)
    if lead:
      print(msg, flush=True)
    return {'preempted': True, 'step': step}

  best = ckpt.restore_best(state)
  params = best[0]['params'] if best is not None else state['params']
  best_step = meta['best_step'] if best is not None else step
  result = {
      'best_step': int(best_step),
      'valid': full_metrics(trainer, params, exp, 'valid'),
      'test': full_metrics(trainer, params, exp, 'test'),
      'baselines': baseline_metrics(exp),
      'steps': step,
      'data': {'name': exp.data.name, 'source': exp.data.source, 'split': config.data.split,
               'train': int(exp.split.train.size), 'valid': int(exp.split.valid.size),
               'test': int(exp.split.test.size)},
      'memory': report,
      'wall_time_sec': time.time() - t0,
  }
  _write_json(os.path.join(workdir, 'metrics.json'), result)
  writer.scalars(best_step, result['test'], 'test/')
  writer.close()
  ckpt.close()
  if config.export.enabled:
    from mtl_rec import export as export_lib  # pylint: disable=g-import-not-at-top  (export imports train_lib)
    # Every process calls it (gathering sharded params is collective); process 0 writes W/export/<version>/.
    path = export_lib.export_after_training(workdir, trainer, params, exp, result)
    if path is not None:
      log.info('exported the best checkpoint to %s', path)
  return result


@dataclasses.dataclass
class TrainedRun:
  """A finished (or checkpointed) run rebuilt from its workdir: the config saved beside the weights, the data
  pipeline re-derived from it, the trainer on the current devices, and the restored parameters."""

  config: ml_collections.ConfigDict
  exp: Experiment
  trainer: Trainer
  params: Any
  step: int


def load_run(workdir: str, step: int | None = None, devices: Any = None) -> TrainedRun:
  """Restores `workdir`'s best checkpoint (or the checkpoint at `step`) onto `devices` (default: all)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ValueError(f'{workdir} is not a run directory (no config.json); pass the --workdir of a train.py run')
  with open(path) as f:
    config = config_lib.from_json(f.read())
  num_devices = len(jax.devices() if devices is None else devices)
  try:
    sharding_lib.resolve_shape(config.mesh.shape, num_devices)
  except ValueError:  # trained on another device count: restore onto these devices, data-parallel
    config.mesh.shape = (-1, 1)
  exp = prepare(config)
  rating_mean = float(exp.data.rating[exp.split.train].mean())
  total_steps = exp.stream.steps_per_epoch * config.train.epochs
  trainer = make_trainer(config, exp.encoder, total_steps, rating_mean, devices)
  ckpt = Checkpointer(workdir, config.train.keep_checkpoints, read_only=True)
  try:
    if step is None:
      restored = ckpt.restore_best(trainer.init_state) or ckpt.restore_latest(trainer.init_state)
      if restored is None:
        raise ValueError(f'no checkpoint under {workdir}/checkpoints; train first')
    else:
      restored = ckpt.restore_step(trainer.init_state, step)
  finally:
    ckpt.close()
  state, _ = restored
  return TrainedRun(config, exp, trainer, state['params'], int(state['step']))


# ---------------------------------------------------------------------------------------------------------------
# Warm start (the feedback loop): a new run on new interactions starts from an earlier run's weights.

VOCAB_FILE = 'vocab.npz'


def save_vocabularies(encoder: features_lib.FeatureEncoder, path: str) -> None:
  """Writes what maps raw values to table rows (vocabularies, genre columns, age buckets): a later run warm-started
  from this one finds the old row of every id it shares with it."""
  if jax.process_index() != 0:
    return
  arrays = {f'vocab_{name}': v.keys for name, v in encoder.vocabs.items()}
  arrays['genre_names'] = np.asarray(encoder.genre_names, np.str_)
  arrays['age_boundaries'] = np.asarray(encoder.age_boundaries, np.int64)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def row_sources(old_run_dir: str, encoder: features_lib.FeatureEncoder) -> dict[str, np.ndarray]:
  """For every feature table of `encoder`: the old run's row for each new row, or -1 (no old row: keep the fresh
  init). Known raw ids and values keep their trained rows wherever vocabularies moved them; the OOV row keeps its
  meaning; padding rows and values the old run never saw are -1."""
  path = os.path.join(old_run_dir, VOCAB_FILE)
  if not os.path.exists(path):
    raise ValueError(f'{path} is missing: --init_from needs a run trained by this version of train.py')
  with np.load(path) as f:
    old = {k: f[k] for k in f.files}
  out = {}
  for spec in encoder.specs:
    src = np.full(spec.vocab_size, -1, np.int64)
    if spec.name in encoder.vocabs:
      keys = encoder.vocabs[spec.name].keys
      old_rows = features_lib.Vocab(old[f'vocab_{spec.name}']).lookup(keys) if keys.size else keys
      src[features_lib.OOV_ROW] = features_lib.OOV_ROW
      src[1:1 + keys.size] = np.where(old_rows != features_lib.OOV_ROW, old_rows, -1)
    elif spec.name == 'age':  # buckets: rows mean the same only under the same boundaries
      if tuple(old['age_boundaries']) == encoder.age_boundaries:
        src[:] = np.arange(spec.vocab_size)
    elif spec.name == 'genres':  # multi-hot columns, matched by genre name
      old_cols = {g: i for i, g in enumerate(old['genre_names'].tolist())}
      src[:] = [old_cols.get(g, -1) for g in encoder.genre_names]
    out[spec.name] = src
  return out


def path_parts(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A pytree key path as strings: dict keys, sequence indices and attribute names alike (checkpoint metadata spells
  list indices and int dict keys as strings, so paths compare as strings)."""
  return tuple(str(next((getattr(k, a) for a in ('key', 'idx', 'name') if hasattr(k, a)), k)) for k in path)


def warm_start_params(params: Any, old_params: Any, sources: dict[str, np.ndarray], shardings: Any) -> Any:
  """New parameters from old ones (a tree shaped like `params`): rows of feature tables (embeddings and id biases)
  gathered through `sources` (-1: the row of `params`, the fresh init), every other parameter copied. `params` is
  donated."""
  def table_of(path) -> str | None:
    keys = path_parts(path)
    return keys[-1] if ('embeddings' in keys or 'id_biases' in keys) and keys[-1] in sources else None

  flat_new, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [table_of(path) for path, _ in flat_new]
  srcs = [None if name is None else sources[name].astype(np.int32) for name in names]

  def merge(news, olds, srcs):
    out = []
    for name, new, old, src in zip(names, news, olds, srcs):
      if name is None:
        out.append(old)
      else:
        keep = (src >= 0).reshape((-1,) + (1,) * (new.ndim - 1))
        out.append(jnp.where(keep, jnp.take(old, jnp.clip(src, 0, old.shape[0] - 1), axis=0), new))
    return out

  merged = jax.jit(merge, out_shardings=jax.tree.leaves(shardings), donate_argnums=0)(
      [x for _, x in flat_new], jax.tree.leaves(old_params), srcs)
  return jax.tree_util.tree_unflatten(treedef, merged)


def init_from_checkpoint(init_from: str, trainer: Trainer, params: Any,
                         encoder: features_lib.FeatureEncoder) -> Any:
  """Parameters for a new run from `init_from` (a run's workdir or one of its step directories): ids and feature
  values the old run knew keep their trained rows, new ones their fresh init in `params`; dense weights are copied.
  The optimizer state is not taken over. Raises ValueError if the model configs differ beyond table sizes."""
  from mtl_rec import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  run_dir, step_dir = checkpoint_lib.find_checkpoint(init_from)
  sources = row_sources(run_dir, encoder)
  saved = jax.tree_util.tree_flatten_with_path(checkpoint_lib.params_metadata(step_dir))[0]
  saved = {path_parts(p): x for p, x in saved}
  replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())

  def target(path, new, sharding):
    old = saved.get(path_parts(path))
    name = jax.tree_util.keystr(path)
    if old is None:
      raise ValueError(f'parameter {name} is not in the --init_from checkpoint {step_dir}: warm start needs the same '
                       'model config (backbone, tasks, features); only the data may change')
    is_table = path_parts(path)[-1] in sources and old.ndim == new.ndim
    if (old.shape[1:] != new.shape[1:]) if is_table else (old.shape != new.shape):
      raise ValueError(f'parameter {name} has shape {old.shape} in the --init_from checkpoint and {new.shape} here: '
                       'warm start needs the same model config (embed_dim, layer widths)')
    # Old tables are read row-sharded like the new ones where their row count allows, else replicated.
    ok = all(d is None or old.shape[i] % trainer.mesh.shape[d] == 0 for i, d in enumerate(sharding.spec))
    return jax.ShapeDtypeStruct(old.shape, old.dtype, sharding=sharding if ok else replicated)
  old_params = checkpoint_lib.restore_params(
      step_dir, jax.tree_util.tree_map_with_path(target, params, trainer.state_shardings['params']))
  kept = {name: int((sources[name] >= 0).sum()) for name in ('user_id', 'item_id') if name in sources}
  log.info('warm start from %s: rows kept from it %s', step_dir, kept)
  return warm_start_params(params, old_params, sources, trainer.state_shardings['params'])
