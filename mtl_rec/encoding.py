"""Feature encoding rules as data: how raw values become rows of an embedding table, or numbers.

A rule is a JSON-able dict. `features.fit` fits it on the training split and encodes every user, item and log row
with `encode`; the run directory and the export manifest store it as it is, and the server encodes request values
with the same `encode`, so training and serving cannot disagree. Every rule names its raw field (`raw`) and the
type of value it reads (`raw_type`: 'id', 'str', 'int', 'float' or 'list[str]'). Kinds:

  vocab      {'vocab': NAME, 'prefix': N, 'divide': N}: str values are cut to their first `prefix` characters, int
             values floor-divided by `divide` (negative ones are unknown then); row 1 + the value's place in the
             vocabulary NAME (sorted, or in a declared order), and row 0 (out-of-vocabulary) for anything else:
             unseen, missing ('' or NaN) or rare.
  hash       {'buckets': N, 'prefix', 'divide'}: row 1 + stable_hash(value) % N; missing values row 0.
  bucket     {'boundaries': [...], 'log1p': bool}: row 1 + the number of boundaries <= value; missing row 0.
  numeric    {'mean', 'std', 'log1p'}: float32 (value - mean) / std; missing values 0 (the mean).
  multi      {'vocab': NAME | 'buckets': N, 'delimiter', 'max_values': L}: a list (or a delimited string) of str
             values -> int32 [L] rows of the value table (vocabulary position or hash bucket; unknown values are
             dropped, no out-of-vocabulary row), padded with -1.
  text       {'vocab': NAME | 'buckets': N, 'bigrams': bool, 'char_ngrams': n, 'max_tokens': L}: a string ->
             `tokens` (NFKC-normalized, case-folded words; word bigrams; character n-grams of each word) -> int32
             [L] rows of its distinct tokens in order (vocabulary position, unknown tokens dropped; or
             stable_hash(token) % N), padded with -1 (pooled like multi).
  history    {'vocab': NAME, 'of': FEATURE, 'delimiter', 'max_values': L}: the ids a user (an item) interacted
             with, a list (or a delimited string) of raw ids of the other entity, most recent first -> int32 [L]
             rows of FEATURE's own table (1 + the id's place in its vocabulary NAME; unknown ids dropped), distinct,
             in order, padded with -1. It has no table of its own: the model pools FEATURE's rows (SVD++'s
             implicit feedback), leaving out the example's own FEATURE row. Training builds it from the training
             log (features.fit); a request may give it raw for a user the export does not know.
  vector     {'dim': D, 'delimiter'}: a list of D numbers (or a delimited string of them) -> float32 [D]; missing
             (null, empty) -> zeros; another length or a non-finite number is an errors.DataError.

Only numpy here: the serving binary imports this module and nothing of training or the model.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Any, Mapping, Sequence

import numpy as np

from mtl_rec import errors

OOV_ROW = 0
PAD = -1
KINDS = ('vocab', 'hash', 'bucket', 'numeric', 'multi', 'text', 'vector', 'history')
_WORD = re.compile(r'\w+')
_INT_TEXT = re.compile(r'-?[0-9]+')  # what text must be to match an integer ([0-9]: ASCII only)
MAX_TOKEN_CHARS = 64  # text: longer words are cut to this (bounds the work one string can cause, here and serving)


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Known values; `lookup` maps them to rows 1..n and anything else to OOV_ROW. Rows follow the sorted values, or
  a declared order (`order[j]` = the 0-based place of the j-th sorted key)."""

  keys: np.ndarray  # sorted unique values (int64 or str)
  order: np.ndarray | None = None

  @classmethod
  def fit(cls, values: np.ndarray) -> 'Vocab':
    return cls(np.unique(np.asarray(values)))

  @classmethod
  def declared(cls, values: Sequence[Any]) -> 'Vocab':
    """Rows in the given order (row 1 = values[0])."""
    values = np.asarray(values)
    order = np.argsort(values, kind='stable')
    return cls(values[order], order.astype(np.int64))

  @property
  def size(self) -> int:
    """Number of rows including the OOV row."""
    return int(self.keys.shape[0]) + 1

  def values(self) -> np.ndarray:
    """The known values in row order (row 1 first)."""
    if self.order is None:
      return self.keys
    out = np.empty_like(self.keys)
    out[self.order] = self.keys
    return out

  def lookup(self, values: Any) -> np.ndarray:
    values = np.asarray(values)
    if self.keys.size == 0 or values.size == 0:
      return np.zeros(values.shape, np.int32)
    known = True
    if self.keys.dtype.kind == 'U' and values.dtype.kind != 'U':  # numbers against text: as text, whole
      values = values.astype(np.str_)
    elif self.keys.dtype.kind != 'U' and values.dtype.kind != self.keys.dtype.kind:  # e.g. str ids, int vocabulary
      values, known = _as_int64(values)
    pos = np.searchsorted(self.keys, values)
    pos_c = np.minimum(pos, self.keys.shape[0] - 1)
    found = (self.keys[pos_c] == values) & known
    rows = pos_c if self.order is None else self.order[pos_c]
    return np.where(found, rows + 1, OOV_ROW).astype(np.int32)


def _as_int64(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(values as int64, which of them are whole numbers): what an integer vocabulary can look up; 1.5, 'x', ' 7'
  and NaN are not (they look up nothing rather than the integer they would be truncated or parsed to)."""
  if values.dtype.kind in 'iub':
    return values.astype(np.int64), np.ones(values.shape, bool)
  if values.dtype.kind == 'f':
    ok = np.isfinite(values) & (values == np.round(values)) & (np.abs(values) < 2.0**63)
    return np.where(ok, values, 0).astype(np.int64), ok
  out, ok = np.zeros(values.shape, np.int64), np.zeros(values.shape, bool)
  for j, v in np.ndenumerate(values):
    number = as_int(v)
    if number is not None:
      out[j], ok[j] = number, True
  return out, ok


def as_int(x: Any) -> int | None:
  """A raw value as an integer id or category: an integer (not a bool), or a string of ASCII decimal digits (an
  optional '-'), within 64 bits; None otherwise (no integer matches it). Python's int() and numpy would also read
  ' 10', '+10', '1_0' and non-ASCII digits as 10: values a client did not mean."""
  if type(x) is int or isinstance(x, np.integer):
    v = int(x)
  elif isinstance(x, str) and _INT_TEXT.fullmatch(x):
    v = int(x)
  else:
    return None
  return v if -(2**63) <= v < 2**63 else None


def stable_hash(values: Any) -> np.ndarray:
  """uint64 hashes that are the same in every process and on every machine (Python's hash() is salted): splitmix64
  of integers, FNV-1a of the UTF-8 bytes of strings."""
  values = np.asarray(values)
  with np.errstate(over='ignore'):
    if values.dtype.kind in 'iu':
      z = values.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
      z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
      z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
      return z ^ (z >> np.uint64(31))
    raw = np.char.encode(values.astype(np.str_), 'utf-8') if values.size else np.zeros(0, 'S1')
    width = max(raw.dtype.itemsize, 1)
    data = np.frombuffer(raw.tobytes(), np.uint8).reshape(-1, width) if raw.size else np.zeros((0, 1), np.uint8)
    lengths = np.char.str_len(raw) if raw.size else np.zeros(0, int)
    h = np.full(data.shape[0], 0xCBF29CE484222325, np.uint64)
    for j in range(width):
      h = np.where(j < lengths, (h ^ data[:, j].astype(np.uint64)) * np.uint64(0x100000001B3), h)
    return h


def vocab_values(rule: Mapping[str, Any], values: Any) -> tuple[np.ndarray, np.ndarray]:
  """(values as the rule looks them up or hashes them, known mask): str values cut to `prefix`, '' unknown; int
  values floor-divided by `divide` (negative ones unknown then), NaN unknown; ids as they are."""
  raw_type = rule['raw_type']
  if raw_type == 'int':
    v = np.asarray(values)
    if v.dtype.kind in 'iu':  # integers stay integers: through float64, neighbours beyond 2**53 would merge
      v, known = v.astype(np.int64), np.ones(v.shape, bool)
    else:  # floats (a column with empty cells) or None: whole numbers, NaN unknown
      x = np.asarray(v, np.float64)
      known = np.isfinite(x)
      v = np.where(known, x, 0).astype(np.int64)
    if rule.get('divide'):
      known &= v >= 0
      v = np.where(known, v, 0)
    return (v // int(rule['divide']) if rule.get('divide') else v), known
  if raw_type == 'str':
    # numpy strings drop trailing NULs: a request's 'M\0' would be 'M'; it is unknown instead (as ids are)
    cut = int(rule.get('prefix') or 0) or None
    nul = None if isinstance(values, np.ndarray) else np.asarray(
        [isinstance(x, str) and x[:cut].endswith('\0') for x in values], bool)
    v = np.asarray(values).astype(np.str_)
    if rule.get('prefix'):
      v = v.astype(f'<U{int(rule["prefix"])}')  # astype to a shorter width truncates
    known = (v != '') if v.size else np.zeros(0, bool)
    return v, known if nul is None or not nul.any() else known & ~nul.reshape(known.shape)
  v = np.asarray(values)
  return v, np.ones(v.shape, bool)


def _hash_rows(rule: Mapping[str, Any], values: np.ndarray) -> np.ndarray:
  return (stable_hash(values) % np.uint64(int(rule['buckets']))).astype(np.int64)


def numbers(rule: Mapping[str, Any], values: Any) -> np.ndarray:
  """float64 values of a numeric rule (after log1p, negative values counting as 0); NaN where missing."""
  x = np.asarray(values)
  if x.dtype.kind == 'U':  # a text column of numbers (readers.numeric checked it when the rule was fitted): '' is
    x = np.where(x == '', 'nan', x)  # missing, as there
  x = x.astype(np.float64)
  return np.log1p(np.maximum(x, 0.0)) if rule.get('log1p') else x


def value_lists(rule: Mapping[str, Any], values: Any) -> list[list[str]]:
  """A multi-valued column as lists of str: lists as they are, strings split at the rule's delimiter."""
  if hasattr(values, 'lists'):  # data.types.MultiHot
    return values.lists()
  out = []
  for v in values:
    if isinstance(v, str):
      out.append([s for s in v.split(rule['delimiter']) if s] if v else [])
    elif v is None or (isinstance(v, float) and v != v):
      out.append([])
    else:
      out.append([str(s) for s in v])
  return out


def _multi_rows(rule: Mapping[str, Any], values: Any, vocabs: Mapping[str, Vocab]) -> np.ndarray:
  length = int(rule['max_values'])
  if hasattr(values, 'matrix') and 'vocab' in rule:  # a MultiHot: its columns' rows once, then per row
    cols = vocabs[rule['vocab']].lookup(np.asarray(values.names).astype(np.str_)).astype(np.int64) - 1
    m = np.asarray(values.matrix, bool) & (cols >= 0)[None, :]
    key = np.where(m, np.arange(m.shape[1])[None, :], m.shape[1])
    picked = np.sort(key, axis=1)[:, :length]
    out = np.where(picked < m.shape[1], cols[np.minimum(picked, m.shape[1] - 1)], PAD)
    if out.shape[1] < length:
      out = np.pad(out, [(0, 0), (0, length - out.shape[1])], constant_values=PAD)
    return out.astype(np.int32)
  return _value_rows(rule, value_lists(rule, values), length, vocabs)


def _value_rows(rule: Mapping[str, Any], per_row: list[list[str]], length: int,
                vocabs: Mapping[str, Vocab]) -> np.ndarray:
  """int32 [N, length]: each row's values as rows of the value table (vocabulary position, unknown values dropped;
  or hash bucket), distinct, in order of appearance, the first `length`, padded with PAD (multi and text rules)."""
  flat = np.asarray([s for row in per_row for s in row], dtype=np.str_)
  if not flat.size:
    ids = np.zeros(0, np.int64)
  elif 'vocab' in rule:
    ids = vocabs[rule['vocab']].lookup(flat).astype(np.int64) - 1
  else:
    ids = _hash_rows(rule, flat)
  out = np.full((len(per_row), length), PAD, np.int32)
  start = 0
  for r, row in enumerate(per_row):
    kept = [i for i in dict.fromkeys(ids[start:start + len(row)].tolist()) if i >= 0][:length]
    out[r, :len(kept)] = kept
    start += len(row)
  return out


def tokens(text: str, bigrams: bool = False, char_ngrams: int = 0) -> list[str]:
  """The tokens of a text rule: words (Unicode word characters, after NFKC normalization and case folding; cut to
  MAX_TOKEN_CHARS), then 'w1 w2' bigrams, then '#'-prefixed character n-grams of each '<word>'."""
  words = [w[:MAX_TOKEN_CHARS] for w in _WORD.findall(unicodedata.normalize('NFKC', text).casefold())]
  out = list(words)
  if bigrams:
    out += [f'{a} {b}' for a, b in zip(words, words[1:])]
  if char_ngrams:
    for w in words:
      padded = f'<{w}>'
      out += ['#' + padded[i:i + char_ngrams] for i in range(max(len(padded) - char_ngrams + 1, 1))]
  return out


def text_tokens(rule: Mapping[str, Any], values: Any) -> list[list[str]]:
  """Each row's distinct tokens in order of appearance (missing text: none)."""
  out = []
  for v in values:
    text = v if isinstance(v, str) else '' if v is None or (isinstance(v, float) and v != v) else str(v)
    out.append(list(dict.fromkeys(tokens(text, rule.get('bigrams', False), rule.get('char_ngrams', 0)))))
  return out


def _text_rows(rule: Mapping[str, Any], values: Any, vocabs: Mapping[str, Vocab]) -> np.ndarray:
  return _value_rows(rule, text_tokens(rule, values), int(rule['max_tokens']), vocabs)


def vectors(rule: Mapping[str, Any], values: Any) -> np.ndarray:
  """float32 [N, dim] of a vector rule; raises errors.DataError naming the first row of another length or with a
  non-finite number."""
  dim = int(rule['dim'])
  if isinstance(values, np.ndarray) and values.ndim == 2 and values.dtype.kind in 'fiu':
    rows = values
  else:
    rows = []
    for v in values:
      if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
        v = []
      elif isinstance(v, str):
        v = v.split(rule.get('delimiter', '|'))
      rows.append(v)
  out = np.zeros((len(rows), dim), np.float32)
  for r, v in enumerate(rows):
    if len(v) == 0:
      continue
    if len(v) != dim:
      raise errors.DataError(f'row {r + 1} has {len(v)} numbers, the feature declares dim={dim}')
    try:
      x = np.asarray(v, np.float64)
    except (TypeError, ValueError):
      raise errors.DataError(f'row {r + 1} holds a value that is not a number') from None
    if not np.all(np.isfinite(x)):
      raise errors.DataError(f'row {r + 1} holds a non-finite number (NaN or infinity)')
    out[r] = x
  return out


def encode(rule: Mapping[str, Any], values: Any, vocabs: Mapping[str, Vocab]) -> np.ndarray:
  """Raw values (an array or list, one per row) -> int32 rows [N], float32 [N] (numeric) or int32 [N, L] (multi)."""
  kind = rule['kind']
  if kind == 'vocab':
    v, known = vocab_values(rule, values)
    return np.where(known, vocabs[rule['vocab']].lookup(v), OOV_ROW).astype(np.int32)
  if kind == 'hash':
    v, known = vocab_values(rule, values)
    return np.where(known, _hash_rows(rule, v) + 1, OOV_ROW).astype(np.int32)
  if kind == 'bucket':
    x = numbers(rule, values)
    rows = np.searchsorted(np.asarray(rule['boundaries'], np.float64), x, side='right') + 1
    return np.where(np.isfinite(x), rows, OOV_ROW).astype(np.int32)
  if kind == 'numeric':
    x = (numbers(rule, values) - rule['mean']) / rule['std']
    return np.where(np.isfinite(x), x, 0.0).astype(np.float32)
  if kind == 'multi':
    return _multi_rows(rule, values, vocabs)
  if kind == 'text':
    return _text_rows(rule, values, vocabs)
  if kind == 'vector':
    return vectors(rule, values)
  if kind == 'history':  # rows of the id table (1-based: _value_rows gives 0-based value places)
    places = _value_rows(rule, value_lists(rule, values), int(rule['max_values']), vocabs)
    return np.where(places >= 0, places + 1, PAD).astype(np.int32)
  raise ValueError(f'unknown encoding kind {kind!r}; known: {", ".join(KINDS)}')


def missing(rule: Mapping[str, Any]) -> np.ndarray:
  """The encoding of an unknown value (one row): what a request that does not give the field gets."""
  if rule['kind'] == 'numeric':
    return np.zeros((), np.float32)
  if rule['kind'] in ('multi', 'history'):
    return np.full((int(rule['max_values']),), PAD, np.int32)
  if rule['kind'] == 'text':
    return np.full((int(rule['max_tokens']),), PAD, np.int32)
  if rule['kind'] == 'vector':
    return np.zeros((int(rule['dim']),), np.float32)
  return np.zeros((), np.int32)


def rows(rule: Mapping[str, Any], vocabs: Mapping[str, Vocab]) -> int:
  """Rows of the table a rule indexes (OOV row included; a multi rule's value table has none); 0 for numeric and
  history (which indexes another feature's table)."""
  kind = rule['kind']
  if kind == 'vocab':
    return vocabs[rule['vocab']].size
  if kind == 'hash':
    return int(rule['buckets']) + 1
  if kind == 'bucket':
    return len(rule['boundaries']) + 2
  if kind == 'multi':
    return vocabs[rule['vocab']].size - 1 if 'vocab' in rule else int(rule['buckets'])
  if kind == 'text':
    return vocabs[rule['vocab']].size - 1 if 'vocab' in rule else int(rule['buckets'])
  return 0


def unknown(rule: Mapping[str, Any], value: Any, vocabs: Mapping[str, Vocab]) -> bool:
  """Whether a request value falls on the out-of-vocabulary row (or, multi-valued, holds a value that is dropped)."""
  if value is None or rule['kind'] in ('numeric', 'bucket', 'hash', 'text', 'vector'):
    return False
  if rule['kind'] in ('multi', 'history'):
    given = len(set(value_lists(rule, [value])[0]))
    return given > 0 and int((encode(rule, [value], vocabs) >= 0).sum()) < min(given, int(rule['max_values']))
  return int(encode(rule, [value], vocabs)[0]) == OOV_ROW


def manifest_vocab(vocab: Vocab) -> dict[str, Any]:
  """A vocabulary's manifest entry (values inline, in row order)."""
  keys = np.asarray(vocab.keys)
  return {'dtype': 'int' if keys.dtype.kind in 'iu' else 'str', 'size': int(keys.shape[0]) + 1,
          'values': vocab.values().tolist(), 'declared_order': vocab.order is not None}


def vocab_from_values(dtype: str, values: Sequence[Any], declared_order: bool = False) -> Vocab:
  """A Vocab from a manifest entry's values (in row order)."""
  arr = np.asarray(values, dtype=np.int64 if dtype == 'int' else np.str_)
  return Vocab.declared(arr) if declared_order else Vocab(arr)
