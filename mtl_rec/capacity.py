"""The capacity plan: bytes per device and step time of the sharded model at sizes and meshes no machine here holds.

Bytes come from the model itself: its parameter shapes at the planned table sizes (`nnx.eval_shape`: nothing is
allocated), the sharding rules (row-sharded tables split over 'model', the rest replicated) and what each table
optimizer keeps: Adam two moments per parameter, row-wise Adagrad one float per row of each table group, lazy Adam
Adam's moments. Step temporaries and step time are linear models whose constants a machine's measured runs give
(`calibrate`, from scale-benchmark runs at one size):

  temporaries = global batch x bytes per example  +  id-table bytes per device x temporaries per table byte
  step time   = examples per device x seconds per example  +  id-table bytes per device x seconds per table byte

Dense Adam reads and writes every row of every table, its gradient and both moments at every step: the second term,
whose constant is the passes it makes (TRAFFIC_PASSES) over the device's memory bandwidth; its temporaries hold
the tables' gradient. The row-wise optimizers touch only the batch's rows: their second terms are 0. The scale benchmark calibrates
at one size and checks the plan against runs at another (`plan_check` in its JSON).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import sys
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from mtl_rec import deterministic
from mtl_rec import errors
from mtl_rec import model as model_lib
from mtl_rec import sharding as sharding_lib
from mtl_rec import trees

OPTIMIZERS = {'dense_adam': 'dense', 'rowwise_adagrad': 'rowwise_adagrad', 'lazy_adam': 'lazy_adam'}
# Dense Adam's passes over the table bytes per step: read parameters, gradient, mu, nu; write parameters, mu, nu;
# the gradient is zeroed and scattered into: about 9. Used only to express a calibrated constant as a bandwidth.
TRAFFIC_PASSES = 9


@dataclasses.dataclass(frozen=True)
class Bytes:
  """Bytes per device of one configuration (the most loaded device)."""
  tables: int  # every embedding table (row-sharded id tables / model axis, small tables whole)
  id_tables: int  # the row-sharded parameters (id embeddings and id biases) / model axis
  params: int  # all parameters
  optimizer_state: int  # the dense optimizer's moments plus the row-wise state

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Model:
  """A model's parameters as shapes: ShapeDtypeStructs, PartitionSpecs and the id tables' groups."""
  params: Any
  specs: Any
  table_inputs: dict[tuple[str, ...], Any]


def abstract_model(config: Any, features: Sequence[Any], tasks: Sequence[Any]) -> Model:
  """The model of `config` with these feature specs (whose vocab_size may be any size: nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: model_lib.build(config, features, tasks))
  _, state = nnx.split(abstract)
  return Model(nnx.to_pure_dict(state), sharding_lib.param_specs(state), abstract.table_inputs())


def with_table_rows(features: Sequence[Any], rows: dict[str, int], multiple: int) -> tuple[Any, ...]:
  """The feature specs with the id tables of `rows` ({feature: rows}) resized, padded to `multiple`."""
  return tuple(dataclasses.replace(s, vocab_size=-(-rows[s.name] // multiple) * multiple) if s.name in rows else s
               for s in features)


def memory(m: Model, model_axis: int, optimizer: str) -> Bytes:
  """Bytes per device of the model's parameters on a model axis of `model_axis`, with the id tables on
  `optimizer` (a key of OPTIMIZERS)."""
  flat_specs = jax.tree.leaves(m.specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  total = tables = id_tables = 0
  for (path, x), spec in zip(trees.leaves_by_path(m.params).items(), flat_specs, strict=True):
    size = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    if sharding_lib.is_row_sharded(spec):
      size = -(-x.shape[0] // model_axis) * (size // x.shape[0])
      id_tables += size
    if path[:2] == ('embeddings', 'tables'):
      tables += size
    total += size
  dense = total - id_tables
  if optimizer == 'rowwise_adagrad':  # dense Adam on the rest, one float32 per row of each group of id tables
    rows = [trees.get(m.params, tables_[0]).shape[0] for tables_, _ in deterministic.components(m.table_inputs)]
    state = 2 * dense + 4 * sum(-(-r // model_axis) for r in rows)
  else:  # dense Adam, and lazy Adam's moments of every row
    state = 2 * total
  return Bytes(tables, id_tables, total, state)


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A machine's measured constants, per optimizer (see the module docstring)."""
  seconds_per_example: dict[str, float]  # per device: the network, the lookups and the row updates
  seconds_per_table_byte: dict[str, float]  # dense Adam's extra time per id-table byte per device (0 for the others)
  temp_bytes_per_example: dict[str, float]  # step temporaries per example of the global batch
  temp_bytes_per_table_byte: dict[str, float]  # step temporaries per id-table byte per device (dense: the gradient)

  def bandwidth(self, optimizer: str) -> float:
    """The memory bandwidth per device, bytes/s, that dense Adam's step time implies (TRAFFIC_PASSES passes)."""
    s = self.seconds_per_table_byte.get(optimizer, 0.0)
    return TRAFFIC_PASSES / s if s > 0 else math.inf

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def calibrate(runs: dict[str, dict[str, Any]]) -> Calibration:
  """Constants from scale-benchmark runs of one size ({optimizer: its JSON}; rowwise_adagrad needed, and
  dense_adam to plan it). The row-wise optimizers never hold or sweep a table-sized buffer, so their step time and
  temporaries are the batch's alone; dense Adam's are the row-wise step's plus a term in the id-table bytes. Step
  times are each run's fastest step, what the machine does undisturbed: this shared machine's step times scatter by
  10-25% from run to run, and the median with them."""
  if 'rowwise_adagrad' not in runs:
    raise errors.ConfigError('calibration needs a rowwise_adagrad run (and dense_adam to plan dense Adam)')
  rw = runs['rowwise_adagrad']
  per_example = lambda r: r['step_seconds_min'] * r['devices'] / r['batch_size']
  s_ex, s_byte, t_ex, t_byte = {}, {}, {}, {}
  for name, r in runs.items():
    if name == 'dense_adam':
      s_ex[name], t_ex[name] = per_example(rw), rw['step_temp_bytes'] / rw['batch_size']
      s_byte[name] = max(r['step_seconds_min'] - per_example(rw) * r['batch_size'] / r['devices'], 0.0) / (
          r['id_table_bytes_per_device'])
      t_byte[name] = max(r['step_temp_bytes'] - t_ex[name] * r['batch_size'], 0.0) / r['id_table_bytes_per_device']
    else:
      s_ex[name], t_ex[name] = per_example(r), r['step_temp_bytes'] / r['batch_size']
      s_byte[name] = t_byte[name] = 0.0
  return Calibration(s_ex, s_byte, t_ex, t_byte)


def plan(cal: Calibration, b: Bytes, optimizer: str, batch_size: int, devices: int) -> dict[str, Any]:
  """The plan of one configuration: bytes per device (tables, optimizer state, step temporaries, total) and the
  expected step time and examples/s."""
  if optimizer not in cal.seconds_per_example:
    raise errors.ConfigError(f'the calibration has no {optimizer} run; calibrate with it among the optimizers')
  temp = cal.temp_bytes_per_example[optimizer] * batch_size + cal.temp_bytes_per_table_byte[optimizer] * b.id_tables
  t = (cal.seconds_per_example[optimizer] * batch_size / devices
       + cal.seconds_per_table_byte[optimizer] * b.id_tables)
  return {'table_bytes_per_device': b.tables, 'params_bytes_per_device': b.params,
          'optimizer_state_bytes_per_device': b.optimizer_state, 'step_temp_bytes_per_device': int(temp),
          'total_bytes_per_device': int(b.params + b.optimizer_state + temp),
          'step_seconds': t, 'examples_per_sec': batch_size / t}


def for_hardware(cal: Calibration, seconds_per_example: float | None, bandwidth: float | None) -> Calibration:
  """`cal` with other devices' constants: the network's seconds per example per device and the memory bandwidth
  (bytes/s) per device, which sets dense Adam's seconds per table byte (TRAFFIC_PASSES passes); None keeps cal's."""
  s_ex = dict(cal.seconds_per_example)
  if seconds_per_example is not None:
    base = s_ex.get('rowwise_adagrad', seconds_per_example)
    s_ex = {k: seconds_per_example * v / base for k, v in s_ex.items()}  # keep the optimizers' measured ratios
  s_byte = dict(cal.seconds_per_table_byte)
  if bandwidth is not None:
    s_byte = {k: (TRAFFIC_PASSES / bandwidth if v > 0 else 0.0) for k, v in s_byte.items()}
  return dataclasses.replace(cal, seconds_per_example=s_ex, seconds_per_table_byte=s_byte)


def relative_errors(planned: dict[str, Any], measured: dict[str, Any]) -> dict[str, float]:
  """(plan - measured) / measured for the figures a run measures."""
  pairs = {'table_bytes_per_device': 'table_bytes_per_device',
           'optimizer_state_bytes_per_device': 'optimizer_state_bytes_per_device',
           'step_temp_bytes_per_device': 'step_temp_bytes', 'step_seconds': 'step_seconds_min'}
  return {k: (planned[k] - measured[m]) / measured[m] for k, m in pairs.items() if measured.get(m)}


def peak_rss_bytes() -> int:
  """This process's own peak resident memory (what the benchmarks report beside the planned bytes).

  Linux: VmHWM of /proc/self/status, the high-water mark of this program's memory. Not getrusage's ru_maxrss, which
  Linux keeps across exec: a benchmark's child process reported its parent's peak (every run of the 3-seed
  benchmark's seed 1 "used" the 6.3 GB the parent had reached, its own runs ~1-3 GB). Elsewhere ru_maxrss (bytes on
  macOS)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)
