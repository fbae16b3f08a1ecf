"""Joining a multi-process (multi-host) JAX job: flags, environment, or jax's own cluster detection."""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import jax
from absl import app, flags

T = TypeVar('T')

_COORDINATOR = None
_NUM_PROCESSES = None
_PROCESS_ID = None


def define_flags() -> None:
  global _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID
  _COORDINATOR = flags.DEFINE_string(
      'coordinator_address', os.environ.get('MTL_REC_COORDINATOR', ''),
      'host:port of process 0 for a multi-process job (env MTL_REC_COORDINATOR). Empty: single process, or '
      "jax's cluster auto-detection when --num_processes=-1.")
  _NUM_PROCESSES = flags.DEFINE_integer('num_processes', int(os.environ.get('MTL_REC_NUM_PROCESSES', '1')),
                                        'Processes in the job (env MTL_REC_NUM_PROCESSES); -1 = auto-detect.')
  _PROCESS_ID = flags.DEFINE_integer('process_id', int(os.environ.get('MTL_REC_PROCESS_ID', '0')),
                                     'This process (env MTL_REC_PROCESS_ID), 0..num_processes-1.')


def initialize() -> None:
  """Calls jax.distributed.initialize when the flags ask for more than one process (never at import).

  Must run before anything touches a JAX backend. Raises app.UsageError (a clean exit naming the flag) for
  inconsistent flags.
  """
  n = _NUM_PROCESSES.value
  if n == -1:  # a cluster jax recognizes (SLURM, Open MPI, TPU pods, ...) supplies all three values
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      raise app.UsageError(f'--num_processes=-1 found no cluster to join ({e}); give --num_processes=N with '
                           '--coordinator_address=HOST:PORT and --process_id, or 1 for a single process') from None
  elif n > 1:
    if not _COORDINATOR.value:
      raise app.UsageError('--num_processes > 1 needs --coordinator_address=HOST:PORT of process 0')
    if not 0 <= _PROCESS_ID.value < n:
      raise app.UsageError(f'--process_id={_PROCESS_ID.value} must be in [0, {n}) for --num_processes={n}')
    jax.distributed.initialize(_COORDINATOR.value, num_processes=n, process_id=_PROCESS_ID.value)
  elif n != 1:
    raise app.UsageError(f'--num_processes={n}: use 1 (single process), N > 1 with --coordinator_address and '
                         '--process_id, or -1 to let jax detect the cluster')


def is_lead() -> bool:
  return jax.process_index() == 0


def lead_first(compute: Callable[[], T], name: str) -> T:
  """compute() on the lead process first, then on the others once it has finished (a barrier between): what the
  lead caches in a shared run directory, the others then read instead of computing it again (they compute it
  themselves when the directory is not shared)."""
  if jax.process_count() == 1:
    return compute()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  out = compute() if is_lead() else None
  multihost_utils.sync_global_devices(f'mtl_rec:{name}')
  return out if is_lead() else compute()
