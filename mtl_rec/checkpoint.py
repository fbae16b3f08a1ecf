"""Orbax checkpoints: the latest N plus the best, each carrying the config and loop bookkeeping.

Layout under `W/checkpoints/`: `latest/<step>/` (rolling, keep N) and `best/<step>/` (keep 1), each step holding
`state` (the train-state pytree) and `meta` (JSON: config, early-stopping state). Orbax writes a step into a
temporary directory and renames it when complete, so a save interrupted by a kill is never picked up by restore.
Restoring onto another mesh or device count works because the target is a tree of ShapeDtypeStructs carrying the
*current* mesh's shardings.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mtl_rec import errors, trees


def _manager(directory: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  if read_only:  # another run's checkpoints: list and read, never create, clean up or delete anything there
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  else:
    # cleanup_tmp_directories: a save killed mid-write leaves a `<step>.orbax-checkpoint-tmp-*` directory that
    # restore never reads; it is removed when the run restarts.
    # The barrier prefix: `latest` and `best` save the same step at an epoch end, and in a multi-process job two
    # managers with the same barrier names collide ("barrier ... is already ongoing").
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=os.path.basename(os.path.normpath(directory))))
  try:
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=('state', 'meta', 'input'))
  except OSError as e:  # a workdir that cannot hold directories (/proc/..., a read-only mount): no traceback
    raise errors.ConfigError(f'the checkpoint directory {directory} cannot be created ({e.strerror or e}); pass a '
                             '--workdir you can write') from None


def abstract_like(state: Any) -> Any:
  """Restore target: shapes, dtypes and shardings of `state` (which lives on the mesh to restore onto)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Checkpointer:
  """Saves and restores train states under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int, read_only: bool = False):
    """`read_only`: only restore (e.g. from a run that may still be training: its unfinished saves are left be)."""
    root = os.path.join(workdir, 'checkpoints')
    self.latest = _manager(os.path.join(root, 'latest'), keep, read_only)
    self.best = _manager(os.path.join(root, 'best'), 1, read_only)

  @staticmethod
  def _save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any],
            input_state: dict[str, Any] | None) -> None:
    if step in mngr.all_steps() or step == mngr.latest_step():
      return
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if input_state is not None:
      import grain  # pylint: disable=g-import-not-at-top
      from mtl_rec.data import stream  # pylint: disable=g-import-not-at-top
      items['input'] = grain.checkpoint.CheckpointSave(stream.Snapshot(input_state))
    mngr.save(step, args=ocp.args.Composite(**items))

  def save(self, step: int, state: Any, meta: dict[str, Any], best: bool = False,
           input_state: dict[str, Any] | None = None) -> None:
    """Asynchronous save of `state` at `step` (and as the best state when `best`); `input_state`: the streaming
    reader's position (a grain iterator's state), saved by Grain's handler in the same checkpoint.

    The best state is written first, and finished, before the latest: a kill between the two then resumes from the
    previous latest and reaches this step again, where the other order resumed from a latest whose best was lost
    (model selection fell back to the last step)."""
    if best:
      self._save(self.best, step, state, meta, input_state)
      self.best.wait_until_finished()
    self._save(self.latest, step, state, meta, input_state)

  def restore_input(self, step: int, iterator: Any) -> Any:
    """`iterator` (a grain.DatasetIterator) set to the reader position saved at `step`; None if none was saved."""
    if not os.path.isdir(os.path.join(str(self.latest.directory), str(step), 'input')):
      return None
    import grain  # pylint: disable=g-import-not-at-top
    return self.latest.restore(step, args=ocp.args.Composite(input=grain.checkpoint.CheckpointRestore(iterator))).input

  @staticmethod
  def _restore(mngr: ocp.CheckpointManager, target: Any, step: int | None) -> tuple[Any, dict[str, Any]] | None:
    step = mngr.latest_step() if step is None else step
    if step is None:
      return None
    misfits = _misfits(_saved_tree(os.path.join(str(mngr.directory), str(step))), target)
    if misfits:  # found from the metadata, before orbax reads (and fails on) any array
      raise errors.Error(f'the checkpoint at step {step} under {mngr.directory} does not fit this config\'s model '
                         f'({"; ".join(misfits)}): the features, tasks or model changed since it was written: train '
                         'in a new --workdir, or with the config that run was trained with')
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target)),
                                                     meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of the newest complete checkpoint, placed like `target`; None if there is none."""
    return self._restore(self.latest, target, None)

  def restore_best(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
    return self._restore(self.best, target, None)

  def restore_step(self, target: Any, step: int) -> tuple[Any, dict[str, Any]]:
    mngr = self.latest if step in self.latest.all_steps() else self.best
    out = self._restore(mngr, target, step)
    if out is None:
      raise errors.Error(f'no checkpoint at step {step}; available: {sorted(set(self.all_steps()))}')
    return out

  def all_steps(self) -> list[int]:
    return sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def find_checkpoint(path: str) -> tuple[str, str]:
  """(run directory, step directory) for `path`: a run's workdir (its best checkpoint, else its latest) or one step
  directory `W/checkpoints/{latest,best}/<step>`. Raises ValueError naming what to pass instead."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  if (os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(parent)) == 'checkpoints'
      and os.path.isdir(path)):
    return os.path.dirname(os.path.dirname(parent)), path
  for kind in ('best', 'latest'):
    directory = os.path.join(path, 'checkpoints', kind)
    steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []  # finished saves only
    if steps:
      return path, os.path.join(directory, str(max(steps)))
  raise errors.Error(f'{path} holds no checkpoint: pass the --workdir of a train.py run, or one of its '
                     'checkpoints/latest/<step> directories')


def step_directory(workdir: str, step: int | None = None) -> str:
  """The step directory of `workdir`'s checkpoint at `step` (latest or best), or of its best (else latest) one when
  `step` is None. Raises ValueError naming what exists instead."""
  if step is None:
    return find_checkpoint(workdir)[1]
  steps = {}
  for kind in ('best', 'latest'):
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints', kind)
    for s in (ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []):
      steps.setdefault(int(s), os.path.join(directory, str(s)))
  if step not in steps:
    raise errors.Error(f'no checkpoint at step {step} under {workdir}; available: {sorted(steps)}')
  return steps[step]


def _saved_tree(step_dir: str) -> Any:
  # the handler's metadata: the checkpointer's also looks for a step-level metadata file inside the item directory
  # and logs a warning that it is not there
  return ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / 'state').tree


def _misfits(saved: Any, target: Any, limit: int = 3) -> list[str]:
  """Up to `limit` sentences on how the saved tree (metadata) and `target` differ in structure or shapes; [] if they
  fit. A moving average saved or expected alone is named by its config field."""
  # orbax's metadata spells a named tuple's field and a list's index as dict keys: paths compare as strings
  flat = lambda tree: {'/'.join(path): tuple(leaf.shape) for path, leaf in trees.leaves_by_path(tree).items()}
  have, want = flat(saved), flat(target)
  if ('ema' in saved) != ('ema' in target):
    return [f'the checkpoint {"holds" if "ema" in saved else "lacks"} the moving average of the parameters ("ema") '
            f'that this config {"does not keep" if "ema" in saved else "keeps"}: set train.ema_decay as that run did']
  order = lambda keys: sorted(keys, key=lambda k: not k.startswith('params/'))  # the parameters before their moments
  misfits = [f'{k} is {have[k]} in the checkpoint, {want[k]} in this model'
             for k in order(want) if k in have and have[k] != want[k]]
  misfits += [f'{k} is not in the checkpoint' for k in order(want) if k not in have]
  misfits += [f'{k} is in the checkpoint, not in this model' for k in order(have) if k not in want]
  return misfits[:limit] + ([f'{len(misfits) - limit} more'] if len(misfits) > limit else [])


def _model_key(tree: Any) -> str:
  """Where a saved state keeps the run's model (trainer.model_params): 'ema' with train.ema_decay, else 'params'."""
  return 'ema' if 'ema' in tree else 'params'


def params_metadata(step_dir: str) -> Any:
  """The tree of the model's parameters saved in a step directory (the moving average when the run kept one), as
  ShapeDtypeStructs (no data is read)."""
  tree = _saved_tree(step_dir)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree[_model_key(tree)])


def restore_params(step_dir: str, target: Any) -> Any:
  """Only the model's parameters of a step directory (the moving average when the run kept one; the optimizer state
  is not read), placed like `target`, a tree of ShapeDtypeStructs with shardings."""
  key = _model_key(_saved_tree(step_dir))
  out = ocp.PyTreeCheckpointer().restore(
      os.path.join(step_dir, 'state'),
      args=ocp.args.PyTreeRestore(item={key: target}, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args({key: target})))
  return out[key]
