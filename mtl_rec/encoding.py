"""Feature encoding rules as data: how a raw value becomes a row of an embedding table (or a multi-hot vector).

A rule is a JSON-able dict. `features.fit` fits it on the training split and encodes every user and item with
`encode`; the run directory and the export manifest store it as it is, and the server encodes request values with
the same `encode`, so training and serving cannot disagree. Kinds:

  {'kind': 'vocab', 'raw': FIELD, 'raw_type': 'id' | 'str' | 'int', 'vocab': NAME, 'prefix': N, 'divide': N}
      str values are cut to their first `prefix` characters (if given); int values below 0 are unknown, others
      are floor-divided by `divide` (if given); the result's row is 1 + its position in the sorted vocabulary NAME,
      and anything not in it (unknown or unseen in training) is row 0, the out-of-vocabulary row.
  {'kind': 'bucket', 'raw': FIELD, 'raw_type': 'int', 'boundaries': [b1, b2, ...]}
      values below 0 are unknown (row 0); others are row 1 + the number of boundaries <= value.
  {'kind': 'multi_hot', 'raw': FIELD, 'raw_type': 'list[str]', 'names': [...]}
      a float32 vector over `names`, 1 where the name is in the list (a bool matrix whose columns are `names`
      is taken as already encoded).

Only numpy here: the serving binary imports this module and nothing of training or the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

OOV_ROW = 0
KINDS = ('vocab', 'bucket', 'multi_hot')


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Sorted known values; `lookup` maps values to rows 1..n and anything else to OOV_ROW."""

  keys: np.ndarray  # sorted unique values (int64 or str)

  @classmethod
  def fit(cls, values: np.ndarray) -> 'Vocab':
    return cls(np.unique(np.asarray(values)))

  @property
  def size(self) -> int:
    """Number of rows including the OOV row."""
    return int(self.keys.shape[0]) + 1

  def lookup(self, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if self.keys.size == 0:
      return np.zeros(values.shape, np.int32)
    if values.dtype.kind != self.keys.dtype.kind:  # e.g. str ids against an int vocabulary
      try:
        values = values.astype(self.keys.dtype)
      except (ValueError, OverflowError):
        return np.zeros(values.shape, np.int32)
    pos = np.searchsorted(self.keys, values)
    pos_c = np.minimum(pos, self.keys.shape[0] - 1)
    found = self.keys[pos_c] == values
    return np.where(found, pos_c + 1, OOV_ROW).astype(np.int32)


def vocab_values(rule: Mapping[str, Any], values: Any) -> np.ndarray:
  """The values a 'vocab' rule looks up, before the lookup (what its vocabulary is fitted on); unknown int values
  come back as -1, which no fitted vocabulary holds."""
  if rule['raw_type'] == 'int':
    v = np.asarray(values, np.int64)
    return np.where(v < 0, -1, v // int(rule.get('divide', 1)))
  if rule['raw_type'] == 'str':
    v = np.asarray(values).astype(np.str_)
    prefix = rule.get('prefix')
    return v.astype(f'<U{int(prefix)}') if prefix is not None else v  # astype to a shorter width truncates
  return np.asarray(values)


def encode(rule: Mapping[str, Any], values: Any, vocabs: Mapping[str, Vocab]) -> np.ndarray:
  """Raw values (an array or list, one per row) -> int32 rows [N], or float32 [N, len(names)] for multi_hot."""
  kind = rule['kind']
  if kind == 'vocab':
    return vocabs[rule['vocab']].lookup(vocab_values(rule, values))
  if kind == 'bucket':
    v = np.asarray(values, np.int64)
    rows = np.searchsorted(np.asarray(rule['boundaries'], np.int64), v, side='right') + 1
    return np.where(v < 0, OOV_ROW, rows).astype(np.int32)
  if kind == 'multi_hot':
    names = list(rule['names'])
    if isinstance(values, np.ndarray) and values.ndim == 2:
      if values.shape[1] != len(names):
        raise ValueError(f"multi_hot '{rule['raw']}': {values.shape[1]} columns, the rule names {len(names)}")
      return values.astype(np.float32)
    column = {n: j for j, n in enumerate(names)}
    out = np.zeros((len(values), len(names)), np.float32)
    for i, row in enumerate(values):
      for name in row:
        j = column.get(name)
        if j is not None:
          out[i, j] = 1.0
    return out
  raise ValueError(f'unknown encoding kind {kind!r}; known: {", ".join(KINDS)}')


def rows(rule: Mapping[str, Any], vocabs: Mapping[str, Vocab]) -> int:
  """Rows of the table a rule indexes (columns of a multi_hot vector), the OOV row included."""
  kind = rule['kind']
  if kind == 'vocab':
    return vocabs[rule['vocab']].size
  if kind == 'bucket':
    return len(rule['boundaries']) + 2
  return len(rule['names'])


def manifest_vocab(vocab: Vocab) -> dict[str, Any]:
  """A vocabulary's manifest entry (values inline)."""
  keys = np.asarray(vocab.keys)
  return {'dtype': 'int' if keys.dtype.kind in 'iu' else 'str', 'size': int(keys.shape[0]) + 1,
          'values': keys.tolist()}


def vocab_from_values(dtype: str, values: Sequence[Any]) -> Vocab:
  """A Vocab from a manifest's sorted values."""
  return Vocab(np.asarray(values, dtype=np.int64 if dtype == 'int' else np.str_))
