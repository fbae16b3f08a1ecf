"""The device mesh, the one logical-axis rules table, and placement of parameters and batches.

Parameters carry logical axis names (`axes` metadata, see model.py); RULES maps each name to a mesh axis (None =
replicated). Changing how the model is sharded is changing RULES.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mtl_rec import errors

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
      raise errors.ConfigError(f'config.mesh.shape={shape}: {num_devices} devices are not divisible by {known}; '
                               f'choose sizes that divide {num_devices}')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if -1 not in shape and math.prod(shape) < num_devices:
    return shape  # a mesh smaller than the machine uses its first devices (make_mesh slices them)
  if math.prod(shape) != num_devices:
    raise errors.ConfigError(f'config.mesh.shape={shape} needs {math.prod(shape)} devices but {num_devices} are '
                             'available; set --config.mesh.shape to sizes whose product is the device count '
                             '(or use -1)')
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


def check_divisible(batch_size: int, mesh: Mesh, row_multiple: int, groups: int = 0) -> None:
  """Raises ValueError if the batch or id-table rows cannot be split evenly over the mesh (and the batch into
  `groups` gradient groups)."""
  data, model = mesh.shape['data'], mesh.shape['model']
  if batch_size % data:
    raise errors.ConfigError(f'config.train.batch_size={batch_size} is not divisible by the data axis ({data}); '
                             f'use a multiple of {data}')
  if groups and batch_size % groups:
    raise errors.ConfigError(f'config.train.batch_size={batch_size} is not divisible by the {groups} gradient groups '
                             f'(train.grad_groups on {mesh.size} devices); use a multiple of {groups}, or set '
                             '--config.train.grad_groups=0 to let XLA sum the gradient (numbers then depend on the '
                             'mesh)')
  if batch_size % jax.process_count():
    raise errors.ConfigError(f'config.train.batch_size={batch_size} must divide evenly over {jax.process_count()} '
                             'processes')
  if row_multiple % model:
    raise errors.ConfigError(f'config.model.row_multiple={row_multiple} is not divisible by the model axis ({model}); '
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


def local_batch(batch: Any, sharding: NamedSharding) -> Any:
  """Places this process's rows of a global batch (its contiguous block, see process_rows) on the mesh."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def put(x: np.ndarray) -> jax.Array:
    global_rows = x.shape[0] * jax.process_count()
    rows = process_rows(sharding, global_rows)
    if (rows.start, rows.stop) != (jax.process_index() * x.shape[0], (jax.process_index() + 1) * x.shape[0]):
      raise errors.ConfigError(f'process {jax.process_index()} holds rows {rows.start}..{rows.stop} of the global '
                               f'batch, not block {jax.process_index()} of {x.shape[0]}: data.reader=stream needs '
                               "the batch split over processes (a 'data' mesh axis that is a multiple of the process "
                               'count)')
    return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))
  return jax.tree.map(put, batch)


def bytes_per_device(tree: Any) -> dict[str, int]:
  """Bytes of `tree`'s arrays held by each addressable device."""
  out: dict[str, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      key = str(shard.device)
      out[key] = out.get(key, 0) + shard.data.nbytes
  return out
