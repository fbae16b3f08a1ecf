"""Row-wise optimizers for the row-sharded id tables: a step reads and writes only the rows its batch touches.

Dense Adam reads and writes every row of every table and both of its moments at every step, although a batch touches
a few thousand of millions of rows; its two moments also triple the tables' memory. TorchRec (FBGEMM's fused
row-wise Adagrad), HugeCTR and TPU SparseCore update only the touched rows; so do these, for JAX on any mesh:

- `rowwise_adagrad`: one accumulator per row, += the mean of the row's squared gradient, and the row moves by
  -lr * g / (sqrt(accumulator) + eps). Exact under sparse gradients (an untouched row's gradient is 0, which leaves
  its accumulator and its values as they are), and its state is one float per row: 1/64 of a 64-wide table.
  The tables of one group (an id feature's embedding and its per-task id biases, indexed by the same ids) share
  the row's accumulator, as if the biases were columns of the embedding table.
- `lazy_adam`: Adam's moments, updated only on touched rows (TF Addons' LazyAdam); the same memory as Adam, a
  fraction of its time. Equal to Adam where every row is touched at every step.

Dense parameters (MLPs, small tables) keep optax (trainer.make_optimizer); config.optimizer.tables chooses per table
group. A step (trainer.train_step):
1. `deterministic.value_and_grad(..., row_tables=...)` gives one cotangent per looked-up row, never a table-sized
   gradient;
2. `dedup`: the batch's ids de-duplicated to a static size (`unique`: `jnp.unique(size=B*K, fill_value=FILL)`,
   a fill no shard holds), each unique row's cotangents summed in batch order (the dense gradient's order,
   so the same bits);
3. their squared norm joins the dense gradients' for global-norm clipping;
4. `apply`: inside shard_map each device gathers the unique rows its shard holds (shard-local indices; the others
   are dropped), updates them with their optimizer state and scatters them back into its shard of the donated
   tables. No table is gathered, copied or all-reduced; every op sees the same shapes on every mesh, so the numbers
   are the same bits on 1 device and on (4, 2), (2, 4) or 2 processes x 4 devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mtl_rec import config as config_lib
from mtl_rec import deterministic
from mtl_rec import errors
from mtl_rec import sharding as sharding_lib
from mtl_rec import trees

DENSE, ROWWISE_ADAGRAD, LAZY_ADAM = config_lib.TABLE_OPTIMIZERS
# Peak learning rate of each rule where config.optimizer.tables.learning_rate is 0: Adagrad's step shrinks as its
# accumulator grows and wants a larger one (0.05: ML-100K quality of dense Adam, README); lazy Adam takes the dense
# optimizer's (None).
DEFAULT_LEARNING_RATES = {ROWWISE_ADAGRAD: 0.05, LAZY_ADAM: None}
FILL = int(jnp.iinfo(jnp.int32).max)  # padding of the de-duplicated ids: beyond every shard, so never a real row


@dataclasses.dataclass(frozen=True)
class Group:
  """Row-sharded tables indexed by the same ids (deterministic.components), updated by one rule."""
  name: str  # its id feature(s), e.g. 'user_id': the key of its state
  rule: str  # one of TABLE_OPTIMIZERS
  tables: tuple[tuple[str, ...], ...]  # parameter paths
  inputs: tuple[tuple[str, ...], ...]  # batch paths of the ids


def table_groups(config: ml_collections.ConfigDict,
                 table_inputs: Mapping[tuple[str, ...], tuple[tuple[str, ...], ...]]) -> list[Group]:
  """Every group of row-sharded tables with its rule from config.optimizer.tables (name, by_feature)."""
  default, by_feature = config_lib.table_optimizers(config)
  out = []
  for tables, inputs in deterministic.components(table_inputs):
    features = list(dict.fromkeys(i[-1] for i in inputs))
    rules = {by_feature[f] for f in features if f in by_feature}
    if len(rules) > 1:
      raise errors.ConfigError(f'optimizer.tables.by_feature gives {", ".join(features)} different optimizers, but '
                               'they index the same tables; give them one')
    out.append(Group('+'.join(features), rules.pop() if rules else default, tuple(tables), tuple(inputs)))
  named = {i[-1] for g in out for i in g.inputs}
  stray = sorted(set(by_feature) - named)
  if stray:
    raise errors.ConfigError(f'optimizer.tables.by_feature names {stray[0]!r}, which has no row-sharded table (small '
                             'tables are replicated and use the dense optimizer); row-sharded: '
                             f'{", ".join(sorted(named))}')
  return out


def _key(path: tuple[str, ...]) -> str:
  return '.'.join(path)


@dataclasses.dataclass
class RowOptimizer:
  """The row-wise rules of a run's sparse table groups (those not 'dense'), on its mesh."""

  groups: list[Group]
  learning_rates: dict[str, optax.Schedule]  # {rule: schedule}
  eps: float
  initial_accumulator: float
  b1: float = 0.9
  b2: float = 0.999

  @property
  def tables(self) -> frozenset[tuple[str, ...]]:
    return frozenset(t for g in self.groups for t in g.tables)

  def init(self, params: Any, shardings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, its shardings): per group {'accumulator': [rows]} or {'m': {table: ...}, 'v': {table: ...}}, each
    sharded like its table's rows."""
    abstract, placement = {}, {}
    for g in self.groups:
      specs = {t: trees.get(shardings, t) for t in g.tables}
      if g.rule == ROWWISE_ADAGRAD:
        first = trees.get(params, g.tables[0])
        abstract[g.name] = {'accumulator': jax.ShapeDtypeStruct(first.shape[:1], jnp.float32)}
        rows = NamedSharding(specs[g.tables[0]].mesh, P(specs[g.tables[0]].spec[0]))
        placement[g.name] = {'accumulator': rows}
      else:
        moments = {_key(t): jax.ShapeDtypeStruct(trees.get(params, t).shape, jnp.float32) for t in g.tables}
        abstract[g.name] = {'m': moments, 'v': moments}
        placement[g.name] = {k: {_key(t): specs[t] for t in g.tables} for k in ('m', 'v')}
    fill = lambda: {name: {k: jax.tree.map(
        lambda s: jnp.full(s.shape, self.initial_accumulator if k == 'accumulator' else 0.0, s.dtype), v)
        for k, v in group.items()} for name, group in abstract.items()}
    return jax.jit(fill, out_shardings=placement)(), placement

  def dedup(self, batch: Any, rows: Mapping[tuple[str, ...], jax.Array], mesh: jax.sharding.Mesh
            ) -> dict[str, tuple[jax.Array, dict[tuple[str, ...], jax.Array]]]:
    """{group: (unique ids [n], {table: summed cotangents [n, ...]})}, replicated; n = the batch's looked-up rows
    (static), unique ids ascending then FILL, slots of FILL and of padding ids (< 0) zero."""
    out = {}
    for g in self.groups:
      ids = deterministic.component_ids(batch, g.inputs).reshape(-1)
      cots = [rows[t] for t in g.tables]

      def local(ids, cots):
        n = ids.shape[0]
        uniq, inverse = unique(ids)
        keep = (uniq >= 0) & (uniq != FILL)
        sums = []
        for c in cots:  # scatter-add in batch order: the order of the dense gradient's, so the same sums
          s = jnp.zeros((n,) + c.shape[1:], c.dtype).at[inverse].add(c)
          sums.append(jnp.where(keep.reshape((n,) + (1,) * (c.ndim - 1)), s, 0))
        return uniq, sums
      uniq, sums = jax.shard_map(local, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)(ids, cots)
      out[g.name] = (uniq, dict(zip(g.tables, sums)))
    return out

  def sq_norm(self, deduped: Mapping[str, Any], mesh: jax.sharding.Mesh) -> jax.Array:
    """The summed squares of the de-duplicated gradients (the tables' share of the global norm), in a fixed
    order on every mesh."""
    sums = [s for g in self.groups for s in deduped[g.name][1].values()]
    if not sums:
      return jnp.zeros((), jnp.float32)

    def local(sums):
      total = jnp.zeros((), jnp.float32)
      for s in sums:
        total = total + deterministic.pairwise_sum(_row_sq(s))
      return total
    return jax.shard_map(local, mesh=mesh, in_specs=(P(),), out_specs=P(), check_vma=False)(sums)

  def apply(self, params: Any, state: dict[str, Any], deduped: Mapping[str, Any], shardings: Any,
            step: jax.Array, scale: jax.Array) -> tuple[Any, dict[str, Any]]:
    """(params with every group's touched rows updated, new state); `step` counts the steps before this one (the
    learning-rate schedule's and Adam's bias-correction count), `scale` multiplies the gradients (clipping)."""
    for g in self.groups:
      lr = self.learning_rates[g.rule](step)
      uniq, sums = deduped[g.name]
      table_specs = [trees.get(shardings, t).spec for t in g.tables]
      mesh = trees.get(shardings, g.tables[0]).mesh
      state_specs = jax.tree.map(lambda s: s.spec, _group_shardings(g, table_specs, mesh))
      update = functools.partial(_local_update, g.rule, self, [_key(t) for t in g.tables],
                                 [sums[t] for t in g.tables])
      tables, state[g.name] = jax.shard_map(
          update, mesh=mesh, in_specs=(table_specs, state_specs, P(), P(), P(), P()),
          out_specs=(table_specs, state_specs), check_vma=False)(
              [trees.get(params, t) for t in g.tables], state[g.name], uniq, lr, step, scale)
      for t, x in zip(g.tables, tables):
        params = trees.replace(params, t, x)
    return params, state


def unique(ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`jnp.unique(ids, size=ids.size, fill_value=FILL, return_inverse=True)` for 1-d ids, 3.5x faster on CPU
  (0.6 ms instead of 2 ms for 8,192 ids, and every device runs it for every group at every step): one single-operand
  sort (jnp.unique sorts ids and positions together, which XLA's CPU sort does 6x slower), the first of each run
  written to its slot, and each id's slot by binary search in the sorted unique ids (FILL, after every id, pads)."""
  n = ids.shape[0]
  ordered = jax.lax.sort(ids)
  first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
  slot = jnp.cumsum(first.astype(jnp.int32)) - 1
  uniq = jnp.full((n,), FILL, ids.dtype).at[slot].set(ordered)  # a run's ids are equal: any writer gives the same
  return uniq, jnp.searchsorted(uniq, ids, method='scan_unrolled').astype(jnp.int32)


def _group_shardings(g: Group, table_specs: Sequence[P], mesh: jax.sharding.Mesh) -> dict[str, Any]:
  if g.rule == ROWWISE_ADAGRAD:
    return {'accumulator': NamedSharding(mesh, P(table_specs[0][0]))}
  return {k: {_key(t): NamedSharding(mesh, s) for t, s in zip(g.tables, table_specs)} for k in ('m', 'v')}


def _row_sq(x: jax.Array) -> jax.Array:
  """Each row's sum of squares, [n], as explicit pairwise additions (no reduction XLA may reorder)."""
  sq = jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1)
  return deterministic.pairwise_sum(sq, axis=1)


def _local_update(rule: str, opt: RowOptimizer, keys: list[str], sums: list[jax.Array], tables: list[jax.Array],
                  state: dict[str, Any], uniq: jax.Array, lr: jax.Array, step: jax.Array, scale: jax.Array
                  ) -> tuple[list[jax.Array], dict[str, Any]]:
  """Inside shard_map: one device's shard of a group's tables and state, updated on the unique rows it holds."""
  rows = tables[0].shape[0]
  start = jax.lax.axis_index(sharding_lib.RULES['vocab']) * rows
  local = uniq - start
  idx = jnp.where((local >= 0) & (local < rows), local, rows)  # not this shard's (or FILL): read as 0, dropped
  take = lambda x: jnp.take(x, idx, axis=0, mode='fill', fill_value=0)
  put = lambda x, new: x.at[idx].set(new, mode='drop')
  grads = [s * scale.astype(s.dtype) for s in sums]
  expand = lambda v, x: v.reshape(v.shape + (1,) * (x.ndim - 1))
  if rule == ROWWISE_ADAGRAD:
    width = sum(math.prod(t.shape[1:]) for t in tables)
    sq = sum(_row_sq(x) for x in grads)
    acc = take(state['accumulator']) + sq * (1.0 / width)
    denom = jnp.sqrt(acc) + opt.eps
    new_tables = [put(t, take(t) - lr * x / expand(denom, x)) for t, x in zip(tables, grads)]
    return new_tables, {'accumulator': put(state['accumulator'], acc)}
  # lazy Adam, as optax.adam on the touched rows: mu <- b1 mu + (1 - b1) g, nu <- b2 nu + (1 - b2) g^2, bias
  # corrected by the step count, update mu_hat / (sqrt(nu_hat) + eps)
  count = (step + 1).astype(jnp.float32)
  # times scalar reciprocals, not divided: XLA turns a division by a scalar into that in some programs and not in
  # others, which rounds differently from one mesh's program to another's
  c1, c2 = 1.0 / (1 - opt.b1 ** count), 1.0 / (1 - opt.b2 ** count)
  new_tables, m_out, v_out = [], {}, {}
  for t, x, key in zip(tables, grads, keys):
    m = (1 - opt.b1) * x + opt.b1 * take(state['m'][key])
    v = (1 - opt.b2) * jnp.square(x) + opt.b2 * take(state['v'][key])
    m_hat, v_hat = m * c1, v * c2
    new_tables.append(put(t, take(t) - lr * (m_hat / (jnp.sqrt(v_hat) + opt.eps))))
    m_out[key], v_out[key] = put(state['m'][key], m), put(state['v'][key], v)
  return new_tables, {'m': m_out, 'v': v_out}
