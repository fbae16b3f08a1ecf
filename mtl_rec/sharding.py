"""The device mesh, the one logical-axis rules table, and placement of parameters and batches.

Parameters carry logical axis names (`axes` metadata, see model.py); RULES maps each name to a mesh axis (None =
replicated). Changing how the model is sharded is changing RULES.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

RULES: dict[str, str | None] = {
    'batch': 'data',  # examples are split over the data axis
    'vocab': 'model',  # rows of large id tables are split over the model axis
    'small_vocab': None,  # small categorical tables are replicated
    'embed': None,
    'task': None,
}


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a -1 by the remaining devices; raises ValueError naming the fix if the shape does not fit."""
  shape = tuple(int(s) for s in shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'config.mesh.shape={shape}: {num_devices} devices are not divisible by {known}; '
                       f'choose sizes that divide {num_devices}')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if -1 not in shape and math.prod(shape) < num_devices:
    return shape  # a mesh smaller than the machine uses its first devices (make_mesh slices them)
  if math.prod(shape) != num_devices:
    raise ValueError(f'config.mesh.shape={shape} needs {math.prod(shape)} devices but {num_devices} are available; '
                     'set --config.mesh.shape to sizes whose product is the device count (or use -1)')
  return shape


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with Auto axes (explicit-mode axes reject gathers from row-sharded tables)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_shape(shape, len(devices))
  devices = devices[:math.prod(shape)]
  return jax.make_mesh(shape, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def logical_to_spec(axes: Sequence[str | None] | None, ndim: int) -> P:
  """The PartitionSpec of an array with logical `axes` (None: replicated); a name missing from RULES is an error."""
  if axes is None:
    return P(*([None] * ndim))
  unknown = [a for a in axes if a is not None and a not in RULES]
  if unknown:
    # A typo here would silently replicate a table that is meant to be sharded.
    raise ValueError(f'logical axis {unknown[0]!r} has no entry in sharding.RULES ({", ".join(RULES)}); add it there')
  if len(axes) != ndim:
    raise ValueError(f'logical axes {tuple(axes)} name {len(axes)} dimensions of a {ndim}-d parameter')
  return P(*(RULES[a] if a is not None else None for a in axes))


def param_specs(params_state: nnx.State) -> Any:
  """PartitionSpecs for every parameter, as a pure dict shaped like `nnx.to_pure_dict(params_state)`."""
  def spec(v: nnx.Variable) -> P:
    return logical_to_spec(v.get_metadata().get('axes'), len(v.get_value().shape))  # arrays or abstract shapes
  specs = jax.tree.map(spec, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def named(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(RULES['batch']))


def is_row_sharded(spec: P) -> bool:
  """Whether a parameter's rows are split over the mesh (the large id tables), whatever the axis's size."""
  return len(spec) > 0 and spec[0] is not None and spec[0] == RULES['vocab']


# Sums that give the same bits on every mesh. XLA sums a sharded axis as local partial sums then an all-reduce, it
# splits even replicated work over idle devices, and how it vectorizes a reduction depends on what it fuses it
# with, so the order of the additions (and the float32 rounding) depends on the mesh's program; a long run
# amplifies that last-bit noise. Here partial results are gathered (exact) inside shard_map, where nothing is split
# behind our back, and summed by explicit pairwise additions, which no compiler pass reorders.


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
  """optax.global_norm of a tree laid out as `shardings` (a matching tree of NamedShardings, at most the first axis
  split), in an order that does not depend on the mesh: each row's sum of squares (a row lives whole on one
  device), gathered, then summed; leaves in tree order."""
  leaves, treedef = jax.tree.flatten(tree)
  specs = [s.spec for s in treedef.flatten_up_to(shardings)]
  if any(any(a is not None for a in spec[1:]) for spec in specs):
    raise ValueError('sharding.global_norm supports parameters split on their first axis only')
  mesh = next(iter(jax.tree.leaves(shardings))).mesh

  def local(*leaves):
    total = jnp.zeros((), jnp.float32)
    for x, spec in zip(leaves, specs):
      sq = jnp.square(x.astype(jnp.float32)).reshape((x.shape[0], -1) if x.ndim else (1, 1))
      rows = pairwise_sum(sq, axis=1)
      if len(spec) and spec[0] is not None:
        rows = jax.lax.all_gather(rows, spec[0], axis=0, tiled=True)
      total = total + pairwise_sum(rows)
    return jnp.sqrt(total)
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(), check_vma=False)(*leaves)


def gradient_groups(grad_groups: int, data_size: int) -> int:
  """The number of row groups a batch's gradient is summed over (train.grad_groups, see train_lib.train_step): the
  configured count, raised to a multiple of the data axis size where it is not one; 0 (off) stays 0."""
  return math.lcm(grad_groups, data_size) if grad_groups else 0


def check_divisible(batch_size: int, mesh: Mesh, row_multiple: int, groups: int = 0) -> None:
  """Raises ValueError if the batch or id-table rows cannot be split evenly over the mesh (and the batch into
  `groups` gradient groups)."""
  data, model = mesh.shape['data'], mesh.shape['model']
  if batch_size % data:
    raise ValueError(f'config.train.batch_size={batch_size} is not divisible by the data axis ({data}); '
                     f'use a multiple of {data}')
  if groups and batch_size % groups:
    raise ValueError(f'config.train.batch_size={batch_size} is not divisible by the {groups} gradient groups '
                     f'(train.grad_groups on a data axis of {data}); use a multiple of {groups}, or set '
                     '--config.train.grad_groups=0 to let XLA sum the gradient (numbers then depend on the mesh)')
  if batch_size % jax.process_count():
    raise ValueError(f'config.train.batch_size={batch_size} must divide evenly over {jax.process_count()} processes')
  if row_multiple % model:
    raise ValueError(f'config.features.row_multiple={row_multiple} is not divisible by the model axis ({model}); '
                     f'set it to a multiple of {model}')


def process_rows(sharding: NamedSharding, num_rows: int) -> slice:
  """The rows of a global batch that this process's devices hold: a contiguous range, or all rows where the batch is
  replicated over processes (e.g. a data axis of size 1)."""
  ranges = {idx[0].indices(num_rows)[:2] for idx in sharding.addressable_devices_indices_map((num_rows,)).values()}
  lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
  if sum(b - a for a, b in ranges) < hi - lo:
    raise ValueError(f'process {jax.process_index()} holds non-contiguous batch rows {sorted(ranges)}; build the '
                     'mesh with sharding.make_mesh so that each process owns a contiguous block of the data axis')
  return slice(lo, hi)


def global_batch(batch: Any, sharding: NamedSharding) -> Any:
  """Places a global numpy batch on the mesh; each process contributes only the rows its devices hold."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def put(x: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, x[process_rows(sharding, x.shape[0])], x.shape)
  return jax.tree.map(put, batch)


def bytes_per_device(tree: Any) -> dict[str, int]:
  """Bytes of `tree`'s arrays held by each addressable device."""
  out: dict[str, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      key = str(shard.device)
      out[key] = out.get(key, 0) + shard.data.nbytes
  return out
