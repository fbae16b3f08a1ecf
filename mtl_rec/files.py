"""Files of the run directory and of exports: written whole or not at all, and JSON that any parser reads."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
  """`x` with numpy scalars and arrays as Python numbers and lists, tuples as lists, dict keys as strings and
  non-finite floats as None (JSON has no NaN or Infinity)."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_atomic(path: str, write: Any, suffix: str = '') -> None:
  """Runs `write(tmp_path)` then renames the temporary file onto `path`: readers see the old or the new file."""
  tmp = f'{path}.tmp-{os.getpid()}{suffix}'
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any, indent: int | None = 2, sort_keys: bool = True) -> None:
  """Writes `jsonable(obj)` atomically."""
  def write(tmp: str) -> None:
    with open(tmp, 'w') as f:
      json.dump(jsonable(obj), f, indent=indent, sort_keys=sort_keys)
  write_atomic(path, write)


def write_text(path: str, text: str) -> None:
  """Writes `text` atomically."""
  def write(tmp: str) -> None:
    with open(tmp, 'w') as f:
      f.write(text)
  write_atomic(path, write)


def savez(path: str, **arrays: np.ndarray) -> None:
  """np.savez atomically (numpy's own format: numpy alone reads it, no pickle)."""
  write_atomic(path, lambda tmp: np.savez(tmp, **arrays), suffix='.npz')


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def output_directory(path: str, flag: str, create: bool = True) -> str:
  """`path` as an output directory a command creates (or writes into); raises errors.ConfigError naming `flag` when
  it is an existing file or cannot be created. Called before any work, so a mistake costs nothing. `create=False`:
  only the first check, for a command that creates the directory later (train.py, after the data is checked)."""
  from mtl_rec import errors  # pylint: disable=g-import-not-at-top
  if not path:
    raise errors.ConfigError(f'{flag} is empty; pass a directory (created if missing)')
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.ConfigError(f'{flag}={path} is a file, not a directory; pass a directory (created if missing)')
  if not create:  # it must be creatable there later: its nearest existing ancestor a directory this process writes
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
      ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
      raise errors.ConfigError(f'{flag}={path} cannot be created: {ancestor} is '
                               f'{"not a directory" if not os.path.isdir(ancestor) else "not writable"}; pass a '
                               'directory you can write')
    return path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise errors.ConfigError(f'{flag}={path} cannot be created ({e}); pass a directory you can write') from None
  return path


def output_file(path: str, flag: str) -> str:
  """`path` as a file a command writes at its end, checked at its start (its directory created): raises
  errors.ConfigError naming `flag` when it is a directory or its directory cannot be created, so a long
  measurement is not lost to a bad path."""
  from mtl_rec import errors  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    raise errors.ConfigError(f'{flag}={path} is a directory; pass a file path, e.g. '
                             f'{os.path.join(path, "report.json")}')
  output_directory(os.path.dirname(os.path.abspath(path)), f'the directory of {flag}')
  return path
