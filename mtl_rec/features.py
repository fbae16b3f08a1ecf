"""Declared features -> fitted encoding rules -> encoded tables of every user, item and log row.

Each feature of config.features (see config.feature) becomes a `FeatureSpec` whose `encoding` rule (mtl_rec.encoding)
is fitted on the training split only: vocabularies from the values the training interactions carry (counted once
per training interaction, `min_count` / `max_size`), standardization statistics and quantile bucket edges likewise.
Row 0 of every categorical table is the out-of-vocabulary row, so ids and values never seen in training (cold start)
still get an embedding. Training encodes with `encoding.encode`, and so does the server, from the manifest.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import encoding
from mtl_rec.data import readers
from mtl_rec.data.types import Dataset, MultiHot
from mtl_rec.encoding import OOV_ROW, Vocab
from mtl_rec.errors import DataError

__all__ = ['OOV_ROW', 'Vocab', 'FeatureSpec', 'FeatureEncoder', 'fit']


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One model input: its entity, how it is embedded, its table's rows, and its encoding rule."""

  name: str
  entity: str  # 'user', 'item' or 'context'
  # 'categorical' (a row per example), 'multi' (rows pooled: multi-valued and text), 'numeric' (a standardized
  # number) or 'vector' (a fixed-length vector, projected)
  kind: str
  vocab_size: int  # table rows (the OOV row included for categorical; 0 for numeric)
  large: bool  # sharded: rows split over the 'model' mesh axis and L2-regularized per use (id tables)
  encoding: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the rule (mtl_rec.encoding), JSON-able
  pooling: str = 'mean'  # multi: 'mean' or 'sum'


@dataclasses.dataclass(frozen=True)
class FeatureEncoder:
  """Fitted rules and vocabularies, and the encoded features of every user, item and log row.

  `user_table[name]` / `item_table[name]` are indexed by position in the dataset's users / items tables and
  `context_table[name]` by log row, its last row being the unknown context; a batch gathers them with fancy indexing.
  """

  specs: tuple[FeatureSpec, ...]
  vocabs: dict[str, Vocab]
  user_table: dict[str, np.ndarray]
  item_table: dict[str, np.ndarray]
  context_table: dict[str, np.ndarray]

  def gather(self, user_index: np.ndarray, item_index: np.ndarray,
             rows: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Model inputs for pairs given as positions in the side tables, with the context of log rows `rows` (-1 or
    None: unknown context)."""
    out = {**self.query(user_index, rows), 'item': {k: v[item_index] for k, v in self.item_table.items()}}
    return self.exclude_targets(out)

  def query(self, user_index: np.ndarray, rows: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The user and context inputs alone ({'user', 'context'}) of users in the context of log rows `rows`: a query
    against many items, so no history leaves anything out here (the model leaves out each pair's target)."""
    out = {'user': {k: v[user_index] for k, v in self.user_table.items()}, 'context': {}}
    if self.context_table:
      unknown = next(iter(self.context_table.values())).shape[0] - 1
      r = np.full(np.shape(user_index), unknown) if rows is None else np.where(rows >= 0, rows, unknown)
      out['context'] = {k: v[r] for k, v in self.context_table.items()}
    return out

  def exclude_targets(self, features: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Each history without the example's own id (a training example's item is in its user's history): the
    label must not leak into the input. The model leaves it out too, by comparing ids; this does it here, before
    the fixed-order gradient replaces ids with lookup positions, which the model cannot compare."""
    for s in self.specs:
      if s.kind == 'history':
        other = 'item' if s.entity == 'user' else 'user'
        h = features[s.entity][s.name]
        features[s.entity][s.name] = np.where(h == features[other][s.encoding['of']][..., None], encoding.PAD, h)
    return features

  def spec(self, name: str) -> FeatureSpec:
    return next(s for s in self.specs if s.name == name)


def _fit_vocab(values: np.ndarray, known: np.ndarray, weights: np.ndarray, f: ml_collections.ConfigDict) -> Vocab:
  """The values of training interactions seen at least min_count times (the max_size most frequent), sorted."""
  keep = known & (weights > 0)
  if not keep.any():
    return Vocab(np.zeros(0, values.dtype))
  keys, inverse = np.unique(values[keep], return_inverse=True)
  counts = np.bincount(inverse, weights=weights[keep])
  return Vocab(keys[frequent(counts, f.min_count, f.max_size)])


def frequent(counts: np.ndarray, min_count: int, max_size: int) -> np.ndarray:
  """Indices (ascending) of the values seen at least `min_count` times, the `max_size` most frequent (0 = all)."""
  chosen = np.flatnonzero(counts >= min_count)
  if max_size and chosen.size > max_size:
    chosen = np.sort(chosen[np.argsort(-counts[chosen], kind='stable')[:max_size]])
  return chosen


def _fit_lists_vocab(per_row: list[Any], row_weights: np.ndarray, f: ml_collections.ConfigDict) -> Vocab:
  """_fit_vocab over multi-valued rows: each row's distinct values count its row's weight once."""
  flat = np.asarray([v for row in per_row for v in row], dtype=np.str_)
  return _fit_vocab(flat, np.ones(flat.shape, bool), np.repeat(row_weights, [len(row) for row in per_row]), f)


def _weighted_quantiles(x: np.ndarray, weights: np.ndarray, num_buckets: int) -> list[float]:
  keep = np.isfinite(x) & (weights > 0)
  if not keep.any():
    return []
  order = np.argsort(x[keep], kind='stable')
  xs, cum = x[keep][order], np.cumsum(weights[keep][order])
  targets = cum[-1] * np.arange(1, num_buckets) / num_buckets
  edges = xs[np.minimum(np.searchsorted(cum, targets, side='left'), xs.size - 1)]
  return sorted(set(float(e) for e in edges))


def _raw_type(values: Any, is_id: bool) -> str:
  if is_id:
    return 'id'
  return 'str' if values.dtype.kind == 'U' else 'int'


def check_whole_numbers(raw: np.ndarray, column: str, name: str, where: str, origins: tuple[Any, ...]) -> None:
  """A DataError at the first fractional value of a categorical feature's float column (one with empty cells, or
  of floats): its categories are whole numbers, and encoding would merge 1.1 and 1.9 with 1."""
  if raw.dtype.kind != 'f':
    return
  bad = np.flatnonzero(np.isfinite(raw) & (raw != np.round(raw)))
  if bad.size:
    raise DataError(f"{where}: {readers.where(origins, int(bad[0]))}: column {column!r} of feature '{name}' holds "
                    f'{raw[bad[0]]}, not a whole number, and a categorical feature would merge it with its integer '
                    "part; declare kind='numeric' for quantities, or dtype='str' to make each distinct value a "
                    'category')


def _declared_categories(name: str, f: ml_collections.ConfigDict, raw_type: str, where: str) -> np.ndarray:
  """A feature's declared `categories` as values of its column's type (ints for a number column, which '7' and 7
  both name); a DataError for a category that cannot be one."""
  if raw_type == 'str':
    return np.asarray([str(v) for v in f.categories]).astype(np.str_)
  out = []
  for v in f.categories:
    try:
      number = float(v)
      if number != round(number) or isinstance(v, bool):
        raise ValueError
      out.append(int(number))
    except (TypeError, ValueError, OverflowError):
      raise DataError(f"{where}: feature '{name}' declares the category {v!r} but column {f.column or name!r} holds "
                      "numbers; declare whole numbers, or dtype='str' to read the column as text") from None
  return np.asarray(out, np.int64)


def _rule(name: str, f: ml_collections.ConfigDict, raw: Any, weights: np.ndarray, is_id: bool,
          vocabs: dict[str, Vocab], where: str, origins: Any = ()) -> dict[str, Any]:
  """The fitted rule of feature `name` (adds its vocabulary to `vocabs`); `origins`: its table's files, which an
  error names with the row and line."""
  if f.kind == 'numeric':
    x = encoding.numbers({'log1p': f.log1p}, readers.numeric(raw, f.column or name, origins, where,
                                                             f"feature '{name}'"))
    if f.transform == 'bucketize':
      edges = [float(b) for b in f.boundaries] or _weighted_quantiles(x, weights, f.num_buckets)
      return {'kind': 'bucket', 'raw': name, 'raw_type': 'float', 'boundaries': edges, 'log1p': bool(f.log1p)}
    keep = np.isfinite(x) & (weights > 0)
    mean = float(np.average(x[keep], weights=weights[keep])) if keep.any() else 0.0
    std = float(np.sqrt(np.average((x[keep] - mean) ** 2, weights=weights[keep]))) if keep.any() else 1.0
    return {'kind': 'numeric', 'raw': name, 'raw_type': 'float', 'mean': mean, 'std': std if std > 0 else 1.0,
            'log1p': bool(f.log1p)}
  if f.kind == 'text':
    rule = {'kind': 'text', 'raw': name, 'raw_type': 'str', 'bigrams': bool(f.bigrams),
            'char_ngrams': int(f.char_ngrams), 'max_tokens': int(f.max_tokens)}
    if f.vocabulary == 'hash':
      return {**rule, 'buckets': int(f.hash_buckets)}
    # A token's count is the number of training rows (users, items) whose text holds it: min_count=2 keeps the
    # words that several items share and drops those of one title only, which would be a second id.
    vocabs[name] = _fit_lists_vocab(encoding.text_tokens(rule, raw), (weights > 0).astype(np.float64), f)
    return {**rule, 'vocab': name}
  if f.kind == 'vector':
    return {'kind': 'vector', 'raw': name, 'raw_type': 'list[float]', 'dim': int(f.dim), 'delimiter': f.delimiter}
  if f.kind == 'multi_categorical':
    if not (isinstance(raw, MultiHot) or raw.dtype == object or raw.dtype.kind == 'U'):
      raise DataError(f"{where}: column {f.column or name!r} of feature '{name}' holds {raw.dtype} values; a "
                      'multi_categorical feature needs lists of strings or delimited strings')
    rule = {'kind': 'multi', 'raw': name, 'raw_type': 'list[str]', 'delimiter': f.delimiter,
            'max_values': int(f.max_values)}
    if f.vocabulary == 'hash':
      return {**rule, 'buckets': int(f.hash_buckets)}
    if f.categories:
      vocabs[name] = Vocab.declared(np.asarray([str(v) for v in f.categories]))
    else:
      vocabs[name] = _fit_lists_vocab([set(row) for row in encoding.value_lists(rule, raw)], weights, f)
    return {**rule, 'vocab': name}
  if isinstance(raw, MultiHot) or raw.dtype == object:
    raise DataError(f"{where}: column {f.column or name!r} of feature '{name}' holds lists; declare it "
                    "kind='multi_categorical'")
  raw_type = _raw_type(raw, is_id)
  if f.prefix and raw_type != 'str':
    raise DataError(f"{where}: feature '{name}' has prefix={f.prefix} but column {f.column or name!r} holds numbers; "
                    "prefixes cut strings: set dtype='str' or drop the prefix")
  if f.divide and raw_type != 'int':
    raise DataError(f"{where}: feature '{name}' has divide={f.divide} but column {f.column or name!r} holds "
                    'strings; divide needs integers')
  rule = {'raw': name, 'raw_type': raw_type, **({'prefix': int(f.prefix)} if f.prefix else {}),
          **({'divide': int(f.divide)} if f.divide else {})}
  if raw_type == 'int':
    check_whole_numbers(raw, f.column or name, name, where, origins)
  if f.vocabulary == 'hash':
    return {'kind': 'hash', **rule, 'buckets': int(f.hash_buckets)}
  rule = {'kind': 'vocab', **rule, 'vocab': name}
  if f.categories:
    vocabs[name] = Vocab.declared(_declared_categories(name, f, raw_type, where))
  else:
    values, known = encoding.vocab_values(rule, raw)
    vocabs[name] = _fit_vocab(values, known, weights, f)
  return rule


def fit(ds: Dataset, train_rows: np.ndarray, config: ml_collections.ConfigDict, user_index: np.ndarray,
        item_index: np.ndarray, weights: dict[str, np.ndarray] | None = None,
        history_tables: Callable[[list[HistoryRequest]], dict[str, np.ndarray]] | None = None) -> FeatureEncoder:
  """Fits every declared feature's rule on the training rows and encodes every user, item and log row.

  `user_index` / `item_index`: each log row's position in ds.users / ds.items. Sharded tables get their rows padded
  to a multiple of config.model.row_multiple (padding rows are never looked up). `weights`: what each user, item and
  log row counts for ({'user' | 'item' | 'context': [rows]}); by default its training interactions (a log held
  only in part, data.reader='stream', passes the counts of the whole log's training rows). `history_tables`: builds
  the history features' tables (build_histories over every training interaction); by default from `train_rows` of
  ds.log (data.reader='stream' reads the whole log's training rows row group by row group).
  """
  num_users, num_items = len(ds.users[ds.user_column]), len(ds.items[ds.item_column])
  weights = weights or {'user': np.bincount(user_index[train_rows], minlength=num_users).astype(np.float64),
                        'item': np.bincount(item_index[train_rows], minlength=num_items).astype(np.float64),
                        'context': np.bincount(train_rows, minlength=ds.num_rows).astype(np.float64)}
  tables = {'user': ds.users, 'item': ds.items, 'context': ds.log}
  ids = {'user': ds.user_column, 'item': ds.item_column}
  vocabs: dict[str, Vocab] = {}
  specs, encoded = {}, {'user': {}, 'item': {}, 'context': {}}
  declared = config_lib.ordered(config.features)
  for name, f in [(n, f) for n, f in declared if f.kind != 'history']:
    column = config_lib.feature_column(name, f)
    where = {'user': 'the users table', 'item': 'the items table', 'context': 'the interaction log'}[f.entity]
    raw = tables[f.entity][column]
    rule = _rule(name, f, raw, weights[f.entity], column == ids.get(f.entity), vocabs, where,
                 (ds.origins or {}).get({'user': 'users', 'item': 'items', 'context': 'log'}[f.entity], ()))
    try:
      values = encoding.encode(rule, raw, vocabs)
    except DataError as e:  # a vector of the wrong length or with a non-finite number
      raise DataError(f"{where}: column {column!r} of feature '{name}': {e}; fix the row or the declaration "
                      f'(features.{name}.dim)') from None
    if f.entity == 'context':  # the last row: an unknown context (a request that gives none)
      values = np.concatenate([values, encoding.missing(rule)[None]])
    encoded[f.entity][name] = values
    rows = encoding.rows(rule, vocabs)
    if f.sharded:
      rows = -(-rows // config.model.row_multiple) * config.model.row_multiple
    kind = {'multi_categorical': 'multi', 'text': 'multi', 'numeric': 'numeric', 'vector': 'vector'}.get(
        f.kind, 'categorical')
    if f.kind == 'numeric' and rule['kind'] == 'bucket':
      kind = 'categorical'
    specs[name] = FeatureSpec(name, f.entity, kind, rows, bool(f.sharded), rule, f.pooling)
  # Histories, from the training rows and the encoded ids of the feature each pools
  requests = []
  for name, f in [(n, f) for n, f in declared if f.kind == 'history']:
    other = 'item' if f.entity == 'user' else 'user'
    rule = {'kind': 'history', 'raw': name, 'raw_type': 'list[str]', 'of': f.of, 'vocab': specs[f.of].encoding['vocab'],
            'delimiter': f.delimiter, 'max_values': int(f.max_values)}
    where = config_lib.history_condition(f.where, f'features.{name}.where') if f.where else None
    if where:
      rule['where'] = f.where  # what the table holds (a request gives the list as is)
    requests.append(HistoryRequest(name, f.entity, encoded[other][f.of], len(tables[f.entity][ids[f.entity]]),
                                   int(f.max_values), where))
    specs[name] = FeatureSpec(name, f.entity, 'history', 0, False, rule, f.pooling)
  if requests:
    if history_tables is None:
      rows = np.asarray(train_rows, np.int64)
      recency = (np.asarray(ds.log[ds.timestamp_column], np.float64)[rows] if ds.timestamp_column in ds.log
                 else np.zeros(rows.size))
      columns = {c: condition_column(ds.log, c, ds.origins.get('log', ()))[rows] for c in where_columns(requests)}
      history_tables = lambda requests: build_histories(
          requests, [(user_index[rows], item_index[rows], recency, rows, columns)])
    tables = history_tables(requests)
    for r in requests:
      encoded[r.entity][r.name] = tables[r.name]
  return FeatureEncoder(specs=tuple(specs[n] for n, _ in declared), vocabs=vocabs, user_table=encoded['user'],
                        item_table=encoded['item'], context_table=encoded['context'])


@dataclasses.dataclass(frozen=True)
class HistoryRequest:
  """A history feature to build: `entity`'s (an owner's) members, as rows of the pooled feature's table."""

  name: str
  entity: str  # the owner: 'user' (its items) or 'item' (its users)
  member_rows: np.ndarray  # [members] the pooled feature's table row of each member position (0: OOV, left out)
  num_owners: int
  length: int
  where: tuple[str, str, float] | None = None  # config_lib.history_condition: only the rows that meet it count


CONDITIONS = {'>=': np.greater_equal, '<=': np.less_equal, '>': np.greater, '<': np.less, '==': np.equal,
              '!=': np.not_equal}


def where_columns(requests: Iterable[HistoryRequest]) -> list[str]:
  """The log columns the requests' conditions read (each once, in order)."""
  return list(dict.fromkeys(r.where[0] for r in requests if r.where))


def condition_column(log: Mapping[str, Any], column: str, origins: Any) -> np.ndarray:
  """float64 [N]: a history condition's log column (NaN where missing); a DataError names a non-numeric value. The
  loader has checked that the column is there (data.loader.columns_needed lists it)."""
  return readers.numeric(log[column], column, origins, 'interaction log', "a history feature's `where`")


def build_histories(requests: list[HistoryRequest],
                    training_rows: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                  Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
  """Every requested history table from one pass over the training interactions, given in chunks of (user
  positions, item positions, recency, global row ids, {column: float values} of the `where_columns`): one chunk in
  memory, a row group at a time when streamed."""
  recent = {r.name: RecentMembers(r.num_owners, r.length) for r in requests}
  for user, item, recency, rows, columns in training_rows:
    for r in requests:
      owner, member = (user, item) if r.entity == 'user' else (item, user)
      if r.where:
        column, op, number = r.where
        with np.errstate(invalid='ignore'):  # NaN (missing) meets no condition
          keep = CONDITIONS[op](columns[column], number) & ~np.isnan(columns[column])
        owner, member, rec, rws = owner[keep], member[keep], recency[keep], rows[keep]
      else:
        rec, rws = recency, rows
      recent[r.name].add(owner, r.member_rows[member], rec, rws)
  return {name: acc.table() for name, acc in recent.items()}


class RecentMembers:
  """Each owner's distinct members, most recent first, the first `length`: fed interactions chunk by chunk in bounded
  memory (about num_owners x length kept entries plus `compact_every` pending rows), the same table as one chunk.

  Merging is exact: a member among an owner's `length` most recent distinct members of all rows is among them in
  the part of the rows that holds its most recent interaction, so keeping each part's first `length` loses none."""

  def __init__(self, num_owners: int, length: int, compact_every: int = 1 << 22):
    self.num_owners, self.length, self.compact_every = num_owners, length, compact_every
    self.parts: list[tuple[np.ndarray, ...]] = []
    self.pending = 0

  def add(self, owner: np.ndarray, member: np.ndarray, recency: np.ndarray, rows: np.ndarray) -> None:
    """Interactions (owner positions, member table rows, recency, global row ids); OOV members (row 0) are left
    out."""
    keep = member > OOV_ROW
    self.parts.append((np.asarray(owner, np.int64)[keep], np.asarray(member, np.int64)[keep],
                       np.asarray(recency, np.float64)[keep], np.asarray(rows, np.int64)[keep]))
    self.pending += int(keep.sum())
    if self.pending >= self.compact_every:
      self._compact()

  def _compact(self) -> None:
    owner, member, recency, rows = (np.concatenate(c) for c in zip(*self.parts)) if self.parts else (
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
    order = np.lexsort((-rows, -recency, owner))  # by owner, most recent first (then the later row)
    owner, member, recency, rows = owner[order], member[order], recency[order], rows[order]
    _, first = np.unique(owner * (int(member.max(initial=0)) + 1) + member, return_index=True)
    first = np.sort(first)  # each (owner, member) once, at its most recent row
    owner, member, recency, rows = owner[first], member[first], recency[first], rows[first]
    rank = np.arange(owner.shape[0]) - np.searchsorted(owner, owner, side='left')
    keep = rank < self.length
    self.parts = [(owner[keep], member[keep], recency[keep], rows[keep])]
    self.pending = 0

  def table(self) -> np.ndarray:
    """int32 [num_owners, length]: each owner's members most recent first, padded with -1."""
    self._compact()
    owner, member = self.parts[0][:2]
    rank = np.arange(owner.shape[0]) - np.searchsorted(owner, owner, side='left')
    out = np.full((self.num_owners, self.length), encoding.PAD, np.int32)
    out[owner, rank] = member
    return out


def histories(owner: np.ndarray, member: np.ndarray, recency: np.ndarray, rows: np.ndarray, num_owners: int,
              length: int) -> np.ndarray:
  """int32 [num_owners, length]: each owner's distinct members (table rows > 0; the OOV row 0 is left out), most
  recent first (by `recency`, then by log row), the first `length`, padded with -1."""
  recent = RecentMembers(num_owners, length)
  recent.add(owner, member, recency, rows)
  return recent.table()
