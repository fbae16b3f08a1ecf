"""Gradients whose float32 sums are ordered by the batch alone, so that every mesh gives the same bits.

XLA sums a sharded axis as local partial sums then an all-reduce, it splits even replicated work over idle
devices, and how it vectorizes a reduction depends on what it fuses it with, so the order of a gradient's additions
(and its float32 rounding) depends on the mesh's program; a long run amplifies that last-bit noise until runs on
different meshes visibly disagree. Here partial results are gathered (exact) inside shard_map, where nothing is
split behind our back, and summed by explicit pairwise additions, which no compiler pass reorders.

`value_and_grad(loss_fn, groups=..., ...)` is a drop-in for `jax.value_and_grad(loss_fn, has_aux=True)` whose
sums are fixed that way; `trainer.train_step` takes one or the other (config.train.grad_groups).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtl_rec import sharding as sharding_lib
from mtl_rec import trees


def pairwise_sum(x: jax.Array, axis: int = 0) -> jax.Array:
  """x.sum(axis) as a fixed binary tree of elementwise additions (zero-padded to a power of two)."""
  axis = axis % x.ndim
  n = x.shape[axis]
  size = 1 << max(n - 1, 0).bit_length()
  if size != n:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - n)
    x = jnp.pad(x, pad)
  while x.shape[axis] > 1:
    half = x.shape[axis] // 2
    x = jax.lax.slice_in_dim(x, 0, half, axis=axis) + jax.lax.slice_in_dim(x, half, 2 * half, axis=axis)
  return jnp.squeeze(x, axis)


def fixed_order_sum(x: jax.Array, mesh: Mesh, axis: str | None) -> jax.Array:
  """x.sum(0), replicated, in an order that does not depend on the mesh; axis 0 of x is split over mesh `axis`."""
  def local(x):
    return pairwise_sum(x if axis is None else jax.lax.all_gather(x, axis, axis=0, tiled=True))
  return jax.shard_map(local, mesh=mesh, in_specs=P(axis), out_specs=P(), check_vma=False)(x)


def global_norm(tree: Any, shardings: Any) -> jax.Array:
  """optax.global_norm of a tree laid out as `shardings` (see global_sq_norm)."""
  return jnp.sqrt(global_sq_norm(tree, shardings))


def global_sq_norm(tree: Any, shardings: Any) -> jax.Array:
  """The sum of squares of a tree laid out as `shardings` (a matching tree of NamedShardings, at most the first axis
  split), in an order that does not depend on the mesh: each row's sum of squares (a row lives whole on one
  device), gathered, then summed; leaves in tree order. An empty tree sums to 0."""
  if not jax.tree.leaves(tree):
    return jnp.zeros((), jnp.float32)
  leaves, treedef = jax.tree.flatten(tree)
  specs = [s.spec for s in treedef.flatten_up_to(shardings)]
  if any(any(a is not None for a in spec[1:]) for spec in specs):
    raise ValueError('deterministic.global_norm supports parameters split on their first axis only')
  mesh = next(iter(jax.tree.leaves(shardings))).mesh

  def local(*leaves):
    total = jnp.zeros((), jnp.float32)
    for x, spec in zip(leaves, specs):
      sq = jnp.square(x.astype(jnp.float32)).reshape((x.shape[0], -1) if x.ndim else (1, 1))
      rows = pairwise_sum(sq, axis=1)
      if len(spec) and spec[0] is not None:
        rows = jax.lax.all_gather(rows, spec[0], axis=0, tiled=True)
      total = total + pairwise_sum(rows)
    return total
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(), check_vma=False)(*leaves)


def gradient_groups(grad_groups: int, num_devices: int) -> int:
  """The number of row groups a batch's gradient is summed over (config.train.grad_groups): the configured count,
  raised to a multiple of the mesh's device count where it is not one (every device takes whole groups); 0 (off)
  stays 0."""
  return math.lcm(grad_groups, num_devices) if grad_groups else 0


def _shard_take(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Inside shard_map: the rows of `ids` (global row numbers) that this device's shard of `table` holds, zeros for
  the others. Its transpose scatter-adds into the shard only, in the order of `ids`."""
  start = jax.lax.axis_index(sharding_lib.RULES['vocab']) * table.shape[0]
  local = ids - start
  local = jnp.where((local >= 0) & (local < table.shape[0]), local, table.shape[0])  # out of range: filled, dropped
  return jnp.take(table, local, axis=0, mode='fill', fill_value=0)


def components(table_inputs: Mapping[tuple[str, ...], tuple[tuple[str, ...], ...]]
                ) -> list[tuple[list[tuple[str, ...]], list[tuple[str, ...]]]]:
  """Tables grouped with every input that indexes any of them, transitively: [(tables, inputs)], in the order of
  `table_inputs`. All tables of a group are looked up with all of its inputs, so one row layout serves them."""
  groups: list[tuple[list, list]] = []
  for table, inputs in table_inputs.items():
    joined = [g for g in groups if set(g[1]) & set(inputs)]
    tables, ins = [table], list(inputs)
    for g in joined:
      groups.remove(g)
      tables = g[0] + tables
      ins = g[1] + [i for i in ins if i not in g[1]]
    groups.append((tables, ins))
  return groups


def component_ids(batch: Any, inputs: Sequence[tuple[str, ...]]) -> jax.Array:
  """The ids a component's tables are looked up with, [B, K]: its inputs' ids side by side (row r's k-th looked-up
  row is r * K + k in the row cotangents `value_and_grad` returns)."""
  n = batch['valid'].shape[0]
  return jnp.concatenate([trees.get(batch, i).reshape(n, -1) for i in inputs], axis=1).astype(jnp.int32)


def value_and_grad(loss_fn: Callable[..., tuple[jax.Array, Any]], *, groups: int, param_shardings: Any,
                   batch_sharding: NamedSharding,
                   table_inputs: Mapping[tuple[str, ...], tuple[tuple[str, ...], ...]],
                   row_tables: Collection[tuple[str, ...]] = ()) -> Callable:
  """`jax.value_and_grad(loss_fn, has_aux=True)`, with every sum of the gradient in an order no mesh changes.

  Args:
    loss_fn: `(params, batch, rng, *args) -> (loss, aux)`, additive over the batch's rows: for any split of the rows
      into parts, the parts' losses and auxes (a pytree of sums) add up to the whole batch's; `args` (e.g. the
      whole batch's normalizers) are the same for every part. It reads each row-sharded table only as
      `jnp.take(table, ids, axis=0)` of the inputs that `table_inputs` lists for it.
    groups: the fixed number of row groups (a multiple of the mesh's device count; see `gradient_groups`).
    param_shardings: a tree like params of NamedShardings; leaves whose rows are split over 'model' are the tables.
    batch_sharding: the batch's sharding (rows over 'data').
    table_inputs: {table's parameter path (trees.path_parts): (batch path of an integer input that indexes it, ...)}.

    row_tables: tables (paths of table_inputs) whose gradient is returned as one cotangent per looked-up row, not as
      a dense table: for the row-wise optimizers (rowwise.py), which never materialize a table-sized gradient.

  Returns:
    `fn(params, batch, rng, *args) -> ((loss, aux), grads, rows)`, the batch's loss, aux and gradient up to
    rounding, the same bits on every mesh whose device count divides `groups`; `grads` has None for each of
    `row_tables`, whose gradient is in `rows`: {path: [B * K, *row shape] cotangents} (rows laid out like the
    batch's), row r * K + k for the k-th id of row r of `component_ids(batch, inputs)`. How:
    - every table is looked up for the whole batch on every device (shard_map: each device reads its rows; a psum
      over 'model' of one non-zero value per row is exact);
    - the loss runs on `groups` fixed groups of rows (whole groups per device), one group at a time: the same
      program on the same rows on every mesh (a batched program is not: XLA's CPU kernels round differently for
      different batch counts); it reads the looked-up rows through positions that replace the id inputs, so its
      gradient holds one cotangent per looked-up row; dense gradients and auxes are gathered and summed pairwise;
    - each table's gradient is each device's scatter-add of all rows' cotangents into its own shard, in batch order;
    - rng is folded with the group's index.
  """
  mesh = batch_sharding.mesh
  # Groups are spread over every device, the model axis's too (the batch is split over 'data' only: each model
  # device takes its part of its data shard's rows), so no device repeats another's dense work.
  by_rows = P((batch_sharding.spec[0], sharding_lib.RULES['vocab']))
  whole = P()
  vocab_axis = sharding_lib.RULES['vocab']
  comps = components(table_inputs)

  def fn(params: Any, batch: Any, rng: jax.Array, *args: Any):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [trees.path_parts(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    specs = [s.spec for s in treedef.flatten_up_to(param_shardings)]
    rows_at = [sharding_lib.is_row_sharded(s) for s in specs]
    missing = [p for p, r in zip(paths, rows_at) if r and p not in table_inputs]
    if missing:
      raise ValueError(f'row-sharded parameter {"/".join(missing[0])} has no entry in table_inputs: say which batch '
                       'inputs index it (the model\'s table_inputs())')
    index = {p: i for i, p in enumerate(paths)}
    n = batch['valid'].shape[0]

    # Each component's id inputs as [B, K] (K: the inputs' widths side by side), and the positions that replace
    # them inside a group of g rows: row r's k-th looked-up row is r * K + k.
    ids = [component_ids(batch, inputs) for _, inputs in comps]
    widths = [[trees.get(batch, i).reshape(n, -1).shape[1] for i in inputs] for _, inputs in comps]

    def positions(g: int) -> list[list[jax.Array]]:
      out = []
      for (_, inputs), w, c_ids in zip(comps, widths, ids):
        k = c_ids.shape[1]
        base = jnp.arange(g, dtype=jnp.int32)[:, None] * k
        start, parts = 0, []
        for i, wi in zip(inputs, w):
          shape = trees.get(batch, i).shape[1:]
          parts.append((base + start + jnp.arange(wi, dtype=jnp.int32)[None]).reshape((g,) + shape))
          start += wi
        out.append(parts)
      return out

    table_ids = [index[t] for tables, _ in comps for t in tables]
    table_specs = [specs[i] for i in table_ids]
    ids_of = [c_ids for (tables, _), c_ids in zip(comps, ids) for _ in tables]

    # 1. Every table's rows for the whole batch, on every device: [B, K] + the table's row shape.
    def lookup(tables, ids):
      rows = [_shard_take(t, i) for t, i in zip(tables, ids)]
      # one shard holds every row: no sum (XLA copies a psum over one device: [B, K, dim] per table, every step)
      return rows if mesh.shape[vocab_axis] == 1 else jax.lax.psum(rows, vocab_axis)
    rows = jax.shard_map(lookup, mesh=mesh, in_specs=(table_specs, whole), out_specs=whole, check_vma=False)(
        [leaves[i] for i in table_ids], ids_of)

    # 2. The loss per group, one group at a time on the device holding it.
    dense_ids = [i for i, r in enumerate(rows_at) if not r]

    def group_value_and_grad(dense, rows_g, batch_g, g, rng, args):
      size = batch_g['valid'].shape[0]
      new = list(leaves)
      for i, x in zip(dense_ids, dense):
        new[i] = x
      for i, r in zip(table_ids, rows_g):
        new[i] = r.reshape((-1,) + r.shape[2:])
      for (_, inputs), pos in zip(comps, positions(size)):
        for i, p in zip(inputs, pos):  # padding ids (< 0) stay -1: the model masks them (multi-valued inputs)
          batch_g = trees.replace(batch_g, i, jnp.where(trees.get(batch_g, i) < 0, -1, p))
      grouped = jax.value_and_grad(
          lambda d, t: loss_fn(_unflatten(treedef, d, t, dense_ids, table_ids), batch_g, rng, *args), argnums=(0, 1),
          has_aux=True)
      (loss, aux), (d_dense, d_rows) = grouped([new[i] for i in dense_ids], [new[i] for i in table_ids])
      del g
      return (d_dense, d_rows), (loss, aux)

    def local_groups(dense, rows, batch, group_ids, rng, args):  # one device's whole groups, one at a time
      per_group = lambda x: x.reshape((group_ids.shape[0], -1) + x.shape[1:])

      def one(xs):
        rows_g, batch_g, g = xs
        return group_value_and_grad(dense, rows_g, batch_g, g, jax.random.fold_in(rng, g), args)
      return jax.lax.map(one, (jax.tree.map(per_group, (rows, batch)) + (group_ids,)))

    # check_vma=False: a gradient taken inside shard_map is then this device's own (no implicit psum).
    (d_dense, d_rows), (group_losses, group_aux) = jax.shard_map(
        local_groups, mesh=mesh, in_specs=(whole, by_rows, by_rows, by_rows, whole, whole), out_specs=by_rows,
        check_vma=False)([leaves[i] for i in dense_ids], rows, batch, jnp.arange(groups), rng, args)
    fixed_sum = lambda x: fixed_order_sum(x, mesh, by_rows[0])
    d_dense = [fixed_sum(g) for g in d_dense]
    d_rows = [r.reshape((-1,) + leaves[i].shape[1:]) for r, i in zip(d_rows, table_ids)]  # [B * K] in batch order

    # 3. Each (dense) table's gradient: its shard's scatter-add of every looked-up row's cotangent, in batch order.
    dense_tables = [j for j, i in enumerate(table_ids) if paths[i] not in row_tables]

    def table_vjp(tables, ids, cotangents):
      return jax.vjp(lambda ts: [_shard_take(t, i.reshape(-1)) for t, i in zip(ts, ids)], tables)[1](cotangents)[0]
    d_tables = [None] * len(table_ids)
    if dense_tables:
      pick = lambda xs: [xs[j] for j in dense_tables]
      done = jax.shard_map(table_vjp, mesh=mesh, in_specs=(pick(table_specs), whole, whole),
                           out_specs=pick(table_specs), check_vma=False)(
                               [leaves[table_ids[j]] for j in dense_tables], pick(ids_of), pick(d_rows))
      for j, g in zip(dense_tables, done):
        d_tables[j] = g
    rows_out = {paths[i]: r for i, r in zip(table_ids, d_rows) if paths[i] in row_tables}
    grads = _unflatten(treedef, d_dense, d_tables, dense_ids, table_ids)
    return (fixed_sum(group_losses), jax.tree.map(fixed_sum, group_aux)), grads, rows_out

  return fn


def _unflatten(treedef: Any, dense: list[Any], tables: list[Any], dense_ids: list[int], table_ids: list[int]) -> Any:
  leaves = [None] * (len(dense) + len(tables))
  for i, x in zip(dense_ids, dense):
    leaves[i] = x
  for i, x in zip(table_ids, tables):
    leaves[i] = x
  return jax.tree_util.tree_unflatten(treedef, leaves)
