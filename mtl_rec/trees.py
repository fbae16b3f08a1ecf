"""Pytree key paths as plain strings: how checkpoints, exports and warm starts name a parameter."""

from __future__ import annotations

from typing import Any

import jax


def path_parts(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A pytree key path as strings: dict keys, sequence indices and attribute names alike (checkpoint metadata spells
  list indices and int dict keys as strings, so paths compare as strings)."""
  return tuple(str(next((getattr(k, a) for a in ('key', 'idx', 'name') if hasattr(k, a)), k)) for k in path)


def path_name(path: tuple[Any, ...]) -> str:
  """'a/b/c' for a key path: the name of a parameter in exports, logs and errors."""
  return '/'.join(path_parts(path))


def leaves_by_path(tree: Any) -> dict[tuple[str, ...], Any]:
  """{path_parts(path): leaf} for every leaf of `tree`, in tree order."""
  return {path_parts(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def get(tree: Any, path: tuple[Any, ...]) -> Any:
  """The subtree of nested dicts at `path`."""
  for key in path:
    tree = tree[key]
  return tree


def replace(tree: dict[Any, Any], path: tuple[Any, ...], value: Any) -> dict[Any, Any]:
  """A copy of nested dicts `tree` with the entry at `path` set to `value` (the input is left as it is)."""
  if not path:
    return value
  head, *rest = path
  return {**tree, head: replace(tree[head], tuple(rest), value)}
