"""A trained run rebuilt from its directory: the config saved beside the weights, the experiment re-derived from
it, and the network with the restored parameters. What export, the ensemble and the benchmark start from."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from mtl_rec import checkpoint as checkpoint_lib
from mtl_rec import config as config_lib
from mtl_rec import errors
from mtl_rec import experiment as experiment_lib
from mtl_rec import model as model_lib
from mtl_rec import sharding as sharding_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.experiment import Experiment
from mtl_rec.scoring import Network


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished (or checkpointed) run: its config, experiment, network (graphdef + params + tasks) and step."""

  config: ml_collections.ConfigDict
  exp: Experiment
  network: Network
  step: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise errors.Error(f'{workdir} is not a run directory (no config.json); pass the --workdir of a train.py run')
  with open(path) as f:
    text = f.read()
  try:
    return config_lib.from_json(text)
  except ValueError as e:  # JSONDecodeError
    raise errors.Error(f'{path} is not valid JSON ({e}): the run directory is damaged') from None


def same_data(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> bool:
  """Whether two configs give the same data, split, features and evaluation sets, so that one Experiment evaluates
  runs of both (e.g. an ensemble's members, whose tasks and sampling differ)."""
  return (a.seed == b.seed and a.data.to_dict() == b.data.to_dict() and a.features.to_dict() == b.features.to_dict()
          and a.eval.click_negatives == b.eval.click_negatives)


def load(workdir: str, step: int | None = None, devices: Any = None, exp: Experiment | None = None) -> Run:
  """Restores `workdir`'s best checkpoint (else its latest, or the one at `step`) onto `devices` (default: all).

  Only the parameters are restored, onto abstract targets (no parameter init, no optimizer state). `exp` is reused
  when it was built from the same data, split, features and seed. A run trained on another device count is
  restored data-parallel onto these devices.
  """
  config = load_config(workdir)
  if exp is None or not same_data(exp.config, config):
    exp = experiment_lib.build(config, workdir=workdir)
  devices = jax.devices() if devices is None else list(devices)
  try:
    sharding_lib.resolve_shape(config.mesh.shape, len(devices))
    shape = config.mesh.shape
  except errors.ConfigError:  # the run's mesh does not fit these devices: data-parallel
    shape = (-1, 1)
  mesh = sharding_lib.make_mesh(shape, config.mesh.axis_names, devices)
  specs = tasks_lib.task_specs(config, tasks_lib.label_columns(config, exp.data), exp.label_rows())  # this run's
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.build(config, exp.encoder.specs, specs)))
  shardings = sharding_lib.named(mesh, sharding_lib.param_specs(abstract))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), shardings)
  step_dir = checkpoint_lib.step_directory(workdir, step)
  params = checkpoint_lib.restore_params(step_dir, target)
  return Run(config, exp, Network(graphdef, params, specs), int(os.path.basename(step_dir)))
