"""An export version directory loaded for serving: artifacts compiled per batch bucket, tables, feature encoding."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax import export as jax_export

from mtl_rec import encoding
from mtl_rec import errors

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ('mtl_rec.export/1', 'mtl_rec.export/2')
MAX_ID_CHARS = 256  # longer ids cannot be in any vocabulary we export; bounds the work a request can cause


def resolve_version_dir(export_dir: str) -> str:
  """`export_dir` itself if it holds a manifest, else its newest integer version subdirectory."""
  if os.path.exists(os.path.join(export_dir, 'manifest.json')):
    return export_dir
  if not os.path.isdir(export_dir):
    what = 'is a file, not a directory' if os.path.exists(export_dir) else 'does not exist'
    raise errors.Error(f'--export_dir={export_dir} {what}; pass W/export or W/export/<version> of a train.py '
                       'run (or run `python -m mtl_rec.export --workdir W` first)')
  versions = sorted((int(d) for d in os.listdir(export_dir)
                     if d.isdigit() and os.path.exists(os.path.join(export_dir, d, 'manifest.json'))), reverse=True)
  if not versions:
    raise errors.Error(f'--export_dir={export_dir} holds no manifest.json and no version directory with one; export '
                       'a run with `python -m mtl_rec.export --workdir W`')
  return os.path.join(export_dir, str(versions[0]))


def read_manifest(version_dir: str) -> dict[str, Any]:
  """The version's manifest.json; raises errors.Error naming a damaged one."""
  with open(os.path.join(version_dir, 'manifest.json')) as f:
    try:
      return json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise errors.Error(f'{version_dir}/manifest.json is not valid JSON ({e}): the export is damaged; re-export '
                         'the run with `python -m mtl_rec.export --workdir W`') from None


def buckets(max_size: int, smallest: int = 1) -> tuple[int, ...]:
  """The only batch sizes ever compiled: powers of two from `smallest`, with 1.5x steps between them from 128 on
  (padding wastes at most a third of a call, ~15% on average), up to the first size >= max_size."""
  out, b = [], max(1, smallest)
  while True:
    out.append(b)
    if b >= max_size:
      return tuple(out)
    if b >= 128 and b & (b - 1) == 0:
      out.append(b * 3 // 2)
      if out[-1] >= max_size:
        return tuple(out)
    b *= 2


_DECIMALS = re.compile(r'-?[0-9]+(?:\n-?[0-9]+)*')  # newline-joined decimal strings


class IdIndex:
  """Raw ids -> table positions with a sorted array (compact for millions of ids, vectorized lookups)."""

  def __init__(self, ids: np.ndarray):
    ids = np.asarray(ids)
    self.is_int = ids.dtype.kind in 'iu'
    self.ids = ids.astype(np.int64) if self.is_int else ids.astype(np.str_)
    self.order = np.argsort(self.ids, kind='stable')
    self.sorted = self.ids[self.order]
    self.size = int(ids.shape[0])

  def canonical(self, raw: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(values, parseable): request ids (str or int) in the index's dtype. In an integer index a string matches
    only as plain ASCII decimal digits (`encoding.as_int`): '1_0', ' 10', '+10' or '１０' are other ids, not 10."""
    n = len(raw)
    if not self.is_int:  # numpy strings drop trailing NULs: 'a\0' would match 'a'
      strs = [str(x) for x in raw]
      return np.asarray(strs, dtype=np.str_), np.fromiter((not x.endswith('\0') for x in strs), bool, n)
    if isinstance(raw, np.ndarray) and raw.dtype.kind == 'i':
      return raw.astype(np.int64), np.ones(n, bool)
    if all(type(x) is int for x in raw) or (all(type(x) is str for x in raw) and
                                            _DECIMALS.fullmatch('\n'.join(raw))):
      try:  # the common case, every id an integer or a decimal string: one C-level pass
        return np.fromiter(map(int, raw), np.int64, n), np.ones(n, bool)
      except (ValueError, OverflowError):  # beyond int64, or a newline inside an id: one at a time below
        pass
    vals, ok = np.zeros(n, np.int64), np.ones(n, bool)
    for j, x in enumerate(raw):
      v = encoding.as_int(x)
      if v is None:
        ok[j] = False  # not an integer (or beyond int64): cannot be in an integer id table
      else:
        vals[j] = v
    return vals, ok

  def lookup(self, raw: Sequence[Any]) -> np.ndarray:
    """Positions of `raw` ids (str or int; decimal strings match integer ids); -1 where unknown."""
    if not len(raw) or not self.size:
      return np.full(len(raw), -1, np.int64)
    vals, ok = self.canonical(raw)
    pos = np.minimum(np.searchsorted(self.sorted, vals), self.size - 1)
    found = ok & (self.sorted[pos] == vals)
    return np.where(found, self.order[pos], -1)

  def position(self, raw: Any) -> int:
    """Position of one id (str or int); -1 if unknown. The scalar path: a tenth of `lookup`'s cost."""
    if not self.size:
      return -1
    if self.is_int:
      value = encoding.as_int(raw)
      if value is None:
        return -1
    else:
      value = str(raw)
    p = int(np.searchsorted(self.sorted, value))
    return int(self.order[p]) if p < self.size and self.sorted[p] == value else -1

  def raw(self, positions: np.ndarray) -> list[Any]:
    return self.ids[positions].tolist()


class ExportedModel:
  """One export version, ready to answer: parameters on the device, one compiled executable per batch bucket.

  Thread-safety: `score_rows` and `recommend` may be called from worker threads (jax releases the GIL while the
  executable runs); the tables are read-only after construction.
  """

  def __init__(self, version_dir: str, max_batch_rows: int = 4096, max_recommend_users: int = 32,
               min_bucket_rows: int = 16):
    self.dir = version_dir
    self.manifest = m = read_manifest(version_dir)
    if m.get('format') not in SUPPORTED_FORMATS:
      raise errors.Error(f'{version_dir}: export format {m.get("format")!r} is not one of {SUPPORTED_FORMATS}; '
                         're-export the run with this version of mtl_rec')
    self.name: str = m['name']
    self.version: int = int(m['version'])
    self.task_names: tuple[str, ...] = tuple(m['fusion']['order'])
    self.tasks = {t['name']: t for t in m['tasks']}
    # float64 on the host so that echoed weights read as given (0.4, not 0.4000000059604645); cast per batch.
    self.default_weights = np.asarray([m['fusion']['default_weights'][t] for t in self.task_names], np.float64)
    self.max_k: int = int(m['functions']['recommend']['max_k'])

    def artifact(name: str) -> jax_export.Exported:
      with open(os.path.join(version_dir, m['functions'][name]['file']), 'rb') as f:
        return jax_export.deserialize(bytearray(f.read()))
    self._score_exported = artifact('score')
    self._recommend_exported = artifact('recommend')
    platform = jax.devices()[0].platform
    if platform not in self._score_exported.platforms:
      raise errors.Error(f'{version_dir} was exported for {self._score_exported.platforms}, this machine runs '
                         f'{platform}: re-export with --config.export.platforms including {platform!r}')
    self._score_fn = jax.jit(self._score_exported.call)
    self._recommend_fn = jax.jit(self._recommend_exported.call)

    with np.load(os.path.join(version_dir, m['weights']['file']), allow_pickle=False) as w:
      self.params = tuple(jax.device_put(w[e['key']]) for e in m['weights']['order'])

    inputs = {e['name']: e for entity in ('user', 'item', 'context') for e in m['inputs'].get(entity, [])}
    # Each input's rule, exactly as training applied it (mtl_rec.encoding), and the vocabularies its rules name;
    # id vocabularies can be large and are only needed through the users/catalog tables, so they stay on disk.
    self.rules = {n: e['encoding'] for n, e in inputs.items()}
    self.vocabs = {r['vocab']: self._vocab(r['vocab']) for r in self.rules.values()
                   if 'vocab' in r and r['raw_type'] != 'id'}
    self.user_inputs = [e['name'] for e in m['inputs']['user']]
    self.item_inputs = [e['name'] for e in m['inputs']['item']]
    self.context_inputs = [e['name'] for e in m['inputs'].get('context', [])]
    unknown_row = lambda name: encoding.missing(self.rules[name])[None]
    with np.load(os.path.join(version_dir, m['users']['file']), allow_pickle=False) as u:
      self.users = IdIndex(u[m['users']['ids']])
      # Row `num_users` is the row of an unknown user: every feature unknown.
      self.user_table = {n: np.concatenate([u[n], unknown_row(n).astype(u[n].dtype)]) for n in self.user_inputs}
    with np.load(os.path.join(version_dir, m['catalog']['file']), allow_pickle=False) as c:
      self.items = IdIndex(c[m['catalog']['ids']])
      self.titles = c[m['catalog']['titles']] if m['catalog'].get('titles') in c.files else None
      catalog = {n: c[n] for n in self.item_inputs}
    self.num_users, self.num_items = self.users.size, self.items.size
    self.catalog = {n: jax.device_put(v) for n, v in catalog.items()}
    # Retrieve-then-rerank: `recommend` takes the item vectors after the catalog (manifest says which file)
    self.retrieval = m['functions']['recommend'].get('retrieval')
    self.item_vectors = None
    if self.retrieval:
      ref = self.retrieval['item_vectors']
      with np.load(os.path.join(version_dir, ref['file']), allow_pickle=False) as v:
        self.item_vectors = jax.device_put(v[ref['key']])
    # Row `num_items` is the row of an item missing from the catalog.
    self.item_table = {n: np.concatenate([v, unknown_row(n).astype(v.dtype)]) for n, v in catalog.items()}
    # The context of a request that gives none: every context input unknown.
    self.no_context = {n: unknown_row(n)[0] for n in self.context_inputs}
    id_input = lambda names: next((n for n in names if self.rules[n]['raw_type'] == 'id' and
                                   self.rules[n]['kind'] == 'vocab'), None)
    # Id inputs with a hashed vocabulary (an open one): an id the export does not know still has its bucket, as in
    # training, where every id is hashed; only the other features of an unknown user or item are unknown.
    hashed = lambda names: [n for n in names if self.rules[n]['raw_type'] == 'id' and self.rules[n]['kind'] == 'hash']
    self.hashed_ids = {'user': hashed(self.user_inputs), 'item': hashed(self.item_inputs)}
    self.item_id_rows = self.item_table[id_input(self.item_inputs)] if id_input(self.item_inputs) else None
    self.user_id_rows = self.user_table[id_input(self.user_inputs)] if id_input(self.user_inputs) else None
    with np.load(os.path.join(version_dir, m['seen']['file']), allow_pickle=False) as s:
      self.seen_indptr, self.seen_indices = s['indptr'], s['indices']
    # Fields a request may give: {raw field: (input name, rule)}; a user's side features (not its id), the context.
    self.user_fields = {self.rules[n]['raw']: (n, self.rules[n]) for n in self.user_inputs
                        if self.rules[n]['raw_type'] != 'id'}
    self.context_fields = {self.rules[n]['raw']: (n, self.rules[n]) for n in self.context_inputs}
    # History fields whose ids are the catalog's items (kind 'history' of the item id input): see history_items.
    item_id = next((n for n in self.item_inputs if self.rules[n]['raw_type'] == 'id'), None)
    self.history_fields = [raw for raw, (_, rule) in self.user_fields.items()
                           if rule['kind'] == 'history' and item_id is not None and rule['of'] == item_id]
    # An item's content features a request may give (an item the export does not know, scored from them).
    self.item_fields = {self.rules[n]['raw']: (n, self.rules[n]) for n in self.item_inputs
                        if self.rules[n]['raw_type'] != 'id'}

    self.score_buckets = buckets(max_batch_rows, min(min_bucket_rows, max_batch_rows))
    self.recommend_buckets = buckets(max_recommend_users)
    self.max_batch_rows = self.score_buckets[-1]
    self.max_recommend_users = self.recommend_buckets[-1]

  def _vocab(self, name: str) -> encoding.Vocab:
    entry = self.manifest['vocabularies']['entries'][name]
    if 'values' in entry:
      return encoding.vocab_from_values(entry['dtype'], entry['values'], entry.get('declared_order', False))
    with np.load(os.path.join(self.dir, entry['file']), allow_pickle=False) as v:
      return encoding.Vocab(v[entry['key']])

  # -------------------------------------------------------------------------------------------------------------
  # Raw request values -> feature rows.

  def _encode(self, fields: dict[str, tuple[str, Any]], values: dict[str, Any],
              base: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`base` with the given raw fields (validated; None = unknown) encoded by their rules, and the fields whose value
    is unknown to the vocabulary (it went to the out-of-vocabulary row or was dropped)."""
    feats, unknown = dict(base), []
    for raw_name, value in values.items():
      name, rule = fields[raw_name]
      if value is None:
        feats[name] = encoding.missing(rule)
        continue
      feats[name] = encoding.encode(rule, [value], self.vocabs)[0]
      if encoding.unknown(rule, value, self.vocabs):
        unknown.append(raw_name)
    return feats, unknown

  def user_features(self, position: int, overrides: dict[str, Any] | None = None,
                    raw_id: Any = None) -> dict[str, Any]:
    """Encoded features of the user at table `position` (-1: unknown, all OOV but a hashed id's bucket: `raw_id`),
    with request-given side features (raw values, already validated) replacing the table's."""
    row = position if position >= 0 else self.num_users
    base = {n: self.user_table[n][row] for n in self.user_inputs}
    if position < 0 and raw_id is not None:
      base.update({n: rows[0] for n, rows in self.hashed_id_rows('user', [raw_id]).items()})
    return self._encode(self.user_fields, overrides or {}, base)[0]

  def hashed_id_rows(self, entity: str, raw_ids: Any) -> dict[str, np.ndarray]:
    """{id input: rows [n]} of raw ids through the entity's hashed id inputs (none where its ids are fitted)."""
    table, index = (self.user_table, self.users) if entity == 'user' else (self.item_table, self.items)
    # hashed as training hashed them: in the id column's type (an integer id's hash is not its decimal text's)
    values, ok = index.canonical(list(raw_ids))
    return {n: np.where(ok, encoding.encode(self.rules[n], values, self.vocabs),
                        encoding.missing(self.rules[n])).astype(table[n].dtype)
            for n in self.hashed_ids[entity]}

  def user_unknown_fields(self, overrides: dict[str, Any]) -> list[str]:
    return self._encode(self.user_fields, overrides, {})[1]

  def item_features(self, position: int, fields: dict[str, Any],
                    raw_id: Any = None) -> tuple[dict[str, Any], list[str]]:
    """(encoded item inputs, fields whose value is unknown) of an item given by the request: the catalog's features
    where it knows the item (-1: it does not, and every feature not given is unknown, as for an unknown user, its id
    too but a hashed id's bucket: `raw_id`), replaced by the given content fields."""
    row = position if position >= 0 else self.num_items
    base = {n: self.item_table[n][row] for n in self.item_inputs}
    if position < 0 and raw_id is not None:
      base.update({n: rows[0] for n, rows in self.hashed_id_rows('item', [raw_id]).items()})
    return self._encode(self.item_fields, fields, base)

  def id_rows(self, entity: str, positions: np.ndarray, raw_ids: Sequence[Any]) -> dict[str, np.ndarray]:
    """The inputs [n] of a request's users or items (`entity`): their table rows at `positions` (-1: unknown, the
    out-of-vocabulary row), an unknown one of a hashed id vocabulary with its id's bucket, as in training
    (`raw_ids`: the request's id at each position)."""
    table, oov = (self.user_table, self.num_users) if entity == 'user' else (self.item_table, self.num_items)
    out = {k: v[np.where(positions >= 0, positions, oov)] for k, v in table.items()}
    new = np.flatnonzero(positions < 0)
    if new.size and self.hashed_ids[entity]:
      for k, v in self.hashed_id_rows(entity, [raw_ids[j] for j in new]).items():
        out[k][new] = v
    return out

  def item_rows(self, positions: np.ndarray, raw_ids: Sequence[Any]) -> dict[str, np.ndarray] | None:
    """`id_rows` of a request's items where an unknown one is not simply the out-of-vocabulary row (a hashed item
    id's bucket); None where the catalog's rows serve as they are (score_rows' default)."""
    return self.id_rows('item', positions, raw_ids) if self.hashed_ids['item'] and (positions < 0).any() else None

  def context_features(self, values: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """(encoded context inputs, fields whose value was unknown) of a request's raw context (missing fields and a
    missing context: unknown)."""
    return self._encode(self.context_fields, values or {}, self.no_context)

  def user_is_cold(self, position: int) -> bool:
    """True when the user's id row is the OOV row (unknown, or not seen in training)."""
    return position < 0 or (self.user_id_rows is not None and int(self.user_id_rows[position]) == 0)

  def items_cold(self, positions: np.ndarray) -> np.ndarray:
    """Per item: True when its id row is the OOV row (missing from the catalog, or not seen in training)."""
    rows = np.where(positions >= 0, positions, self.num_items)
    if self.item_id_rows is None:
      return positions < 0
    return self.item_id_rows[rows] == 0

  def history_items(self, fields: dict[str, Any]) -> np.ndarray:
    """Catalog positions of the items in the user history fields a request gave (raw, validated ids), e.g.
    {"user_history": ["50", "172"]}: what exclude_seen leaves out besides `seen_items`. Every given id counts, also
    one the model's input leaves out (no row of its own, beyond max_values)."""
    ids = [x for name in self.history_fields if fields.get(name) for x in fields[name]]
    pos = self.items.lookup(ids) if ids else np.zeros(0, np.int64)
    return pos[pos >= 0]

  def seen_items(self, user_position: int) -> np.ndarray:
    if user_position < 0:
      return np.zeros(0, np.int64)
    return self.seen_indices[self.seen_indptr[user_position]:self.seen_indptr[user_position + 1]]

  # -------------------------------------------------------------------------------------------------------------
  # Calls of the compiled functions.

  def _bucket(self, n: int, sizes: tuple[int, ...]) -> int:
    for b in sizes:
      if b >= n:
        return b
    raise ValueError(f'{n} rows exceed the largest batch bucket {sizes[-1]}')

  @staticmethod
  def _padded(columns: dict[str, np.ndarray], names: list[str], n: int, b: int,
              fill: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each named column's n rows followed by b - n rows of its fill value."""
    out = {}
    for k in names:
      col = np.empty((b,) + np.shape(fill[k]), np.asarray(fill[k]).dtype)
      col[:n] = columns[k]
      col[n:] = fill[k]
      out[k] = col
    return out

  def score_rows(self, user: dict[str, np.ndarray], item_positions: np.ndarray, weights: np.ndarray,
                 context: dict[str, np.ndarray] | None = None,
                 items: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """{task: [n], 'score': [n]} for paired rows: user features [n] each, catalog positions [n] (-1: unknown item),
    fusion weights [n, T], context features [n] each (default: unknown), and item features [n] each where the
    request gave them (default: the catalog's). Larger inputs are split into calls of the largest bucket."""
    n = int(item_positions.shape[0])
    if items is None:
      items = {k: v[np.where(item_positions >= 0, item_positions, self.num_items)] for k, v in self.item_table.items()}
    context = context if context is not None else {k: np.broadcast_to(v, (n,) + np.shape(v))
                                                   for k, v in self.no_context.items()}
    if n > self.max_batch_rows:
      step = self.max_batch_rows
      cut = lambda d, s: {k: v[s:s + step] for k, v in d.items()}
      parts = [self.score_rows(cut(user, s), item_positions[s:s + step], weights[s:s + step], cut(context, s),
                               cut(items, s)) for s in range(0, n, step)]
      return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    b = self._bucket(n, self.score_buckets)
    items = self._padded(items, self.item_inputs, n, b, {k: v[-1] for k, v in self.item_table.items()})
    users = self._padded(user, self.user_inputs, n, b, {k: v[-1] for k, v in self.user_table.items()})
    contexts = self._padded(context, self.context_inputs, n, b, self.no_context)
    w = np.zeros((b, len(self.task_names)), np.float32)
    w[:n] = weights
    out = self._score_fn(self.params, users, items, contexts, w)
    return {k: np.asarray(v)[:n] for k, v in out.items()}

  def recommend(self, user: dict[str, np.ndarray], exclude: np.ndarray, weights: np.ndarray,
                context: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(catalog positions [u, max_k], fused scores [u, max_k], -inf where excluded) for users' features [u],
    exclude masks bool [u, num_items], fusion weights [u, T] and context features [u] (default: unknown)."""
    u = int(exclude.shape[0])
    b = self._bucket(u, self.recommend_buckets)
    users = self._padded(user, self.user_inputs, u, b, {k: v[-1] for k, v in self.user_table.items()})
    context = context if context is not None else {k: np.broadcast_to(v, (u,) + np.shape(v))
                                                   for k, v in self.no_context.items()}
    contexts = self._padded(context, self.context_inputs, u, b, self.no_context)
    excl = np.ones((b, self.num_items), bool)
    excl[:u] = exclude
    w = np.zeros((b, len(self.task_names)), np.float32)
    w[:u] = weights
    catalog = (self.catalog,) if self.item_vectors is None else (self.catalog, self.item_vectors)
    out = self._recommend_fn(self.params, *catalog, users, contexts, excl, w)
    return np.asarray(out['items'])[:u], np.asarray(out['scores'])[:u]

  def warmup(self) -> None:
    """Compiles every bucket once, so no request ever waits for a compilation."""
    unknown_users = lambda b: {k: np.repeat(v[-1:], b, axis=0) for k, v in self.user_table.items()}
    for b in self.score_buckets:
      self.score_rows(unknown_users(b), np.full(b, -1, np.int64), np.tile(self.default_weights, (b, 1)))
    for b in self.recommend_buckets:
      self.recommend(unknown_users(b), np.zeros((b, self.num_items), bool), np.tile(self.default_weights, (b, 1)))

  def compiled_shapes(self) -> dict[str, int]:
    """Executables in each function's jit cache (constant after warmup when bucketing works)."""
    return {'score': int(self._score_fn._cache_size()),  # pylint: disable=protected-access
            'recommend': int(self._recommend_fn._cache_size())}  # pylint: disable=protected-access

  def metadata(self) -> dict[str, Any]:
    """A summary for logs and the metadata endpoints."""
    m = self.manifest
    return {'name': self.name, 'version': self.version, 'tasks': list(self.task_names),
            'default_weights': dict(zip(self.task_names, self.default_weights.tolist())),
            'users': self.num_users, 'items': self.num_items, 'max_k': self.max_k,
            'retrieval': self.retrieval and {k: v for k, v in self.retrieval.items() if k != 'item_vectors'},
            'platforms': m['platforms'], 'jax_version': m['jax_version'], 'metrics': m.get('metrics', {})}
