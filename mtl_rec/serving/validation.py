"""Request validation: a JSON body -> typed work for the batcher, or `BadRequest` naming the problem (a 4xx).

Every check is explicit so that no client mistake reaches the model or becomes a 5xx: wrong JSON, wrong types,
empty or oversize lists, unknown fields (a typo must not be silently ignored), non-finite numbers, k out of range.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import numpy as np

from mtl_rec import encoding
from mtl_rec.serving.loader import MAX_ID_CHARS, ExportedModel

MAX_LIST_VALUES = 256  # values of one multi-valued request field
MAX_TEXT_CHARS = 4096  # characters of one text request field (a description)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model computes in float32: a larger number is infinite there


class BadRequest(Exception):
  """A client error: answered with `status` and {"error": message}."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.message = message
    self.status = status


def _reject_constant(name: str) -> Any:
  raise ValueError(f'{name} is not valid JSON (use a finite number)')


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  """A JSON object whose keys are distinct (the standard parser would keep the last of two silently)."""
  obj = dict(pairs)
  if len(obj) != len(pairs):
    seen = set()
    key = next(k for k, _ in pairs if k in seen or seen.add(k))
    raise ValueError(f'the key {key[:40]!r} appears twice in one object')
  return obj


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(f'the number {text[:30]} overflows to infinity')
  return value


# A JSON escape of a UTF-16 surrogate (\uD800-\uDFFF). A pair decodes to one character; a lone one decodes to a str
# that no UTF-8 encoder (the response writer, the vocabulary lookup) accepts.
_SURROGATE_ESCAPE = re.compile(rb'\\u[dD][89a-fA-F][0-9a-fA-F]{2}')


def parse_json(body: bytes) -> Any:
  """The body as JSON; NaN/Infinity literals, invalid UTF-8, lone surrogates and absurd nesting are rejected.

  The standard library's parser, not orjson's: it fails cleanly (RecursionError) on deeply nested input, where
  some orjson versions overflow the C stack and kill the process — a client must never be able to do that.
  """
  if not body:
    raise BadRequest('empty body: send a JSON object')
  try:  # strictly: json.loads of bytes decodes with 'surrogatepass' (and UTF-16/32), letting lone surrogates through
    text = body.decode('utf-8')
  except UnicodeDecodeError as e:
    raise BadRequest(f'the body is not valid UTF-8 ({e.reason} at byte {e.start}); JSON is sent as UTF-8 '
                     '(RFC 8259)') from None
  try:
    obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
  except RecursionError:
    raise BadRequest('invalid JSON: nested too deeply') from None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and the constants above are ValueErrors
    raise BadRequest(f'invalid JSON: {e}') from None
  if _SURROGATE_ESCAPE.search(body):  # rare: only then pay for a second pass over the parsed object
    try:
      json.dumps(obj, ensure_ascii=False).encode('utf-8')
    except UnicodeEncodeError:
      raise BadRequest('invalid JSON: a \\uD800-\\uDFFF escape that is not half of a surrogate pair; strings must '
                       'be valid Unicode') from None
  return obj


def check_float32(rule: dict[str, Any], values: Any, where: str) -> None:
  """A 400 where a number's encoding (standardized, log1p...) is not finite in the float32 the model computes in:
  scores would come back null, a recommendation list empty."""
  encoded = np.asarray(encoding.encode(rule, values, {}))
  finite = np.isfinite(encoded.astype(np.float32)).reshape(len(values), -1).all(-1)
  if encoded.dtype.kind == 'f' and not finite.all():
    bad = values[int(np.argmin(finite))]
    raise BadRequest(f'{where}={bad!r} is out of range for this model: its encoded value overflows float32 (the '
                     f'training data spans {_fitted_range(rule)})')


def _fitted_range(rule: dict[str, Any]) -> str:
  if 'mean' in rule and 'std' in rule:
    return f"mean {float(rule['mean']):.4g}, standard deviation {float(rule['std']):.4g}"
  return 'finite float32 values'


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_finite(x: Any) -> bool:
  """A JSON number that is finite as a float (a 400-digit integer is not: float() overflows)."""
  try:
    return _is_number(x) and math.isfinite(x)
  except OverflowError:
    return False


def _type_name(x: Any) -> str:
  return {dict: 'object', list: 'array', str: 'string', bool: 'boolean', int: 'integer', float: 'number',
          type(None): 'null'}.get(type(x), type(x).__name__)


def _describe(x: Any) -> str:
  """What a request gave, for an error message: its JSON type, and its size where a limit is on the size."""
  if isinstance(x, str):
    return f'a string of {len(x)} characters'
  if isinstance(x, list):
    longest = max((len(v) for v in x if isinstance(v, str)), default=0)
    kinds = sorted({_type_name(v) for v in x})
    return (f'an array of {len(x)} values ({", ".join(kinds) or "empty"}'
            + (f', the longest string {longest} characters' if longest else '') + ')')
  return _type_name(x)


def check_id(x: Any, where: str) -> Any:
  """A raw id: a string or an integer (ids are looked up as given; unknown ones are cold starts)."""
  if isinstance(x, str):
    if not x:
      raise BadRequest(f'{where} is an empty string')
    if len(x) > MAX_ID_CHARS:
      raise BadRequest(f'{where} is {len(x)} characters long; ids have at most {MAX_ID_CHARS}')
    return x
  if _is_int(x):
    if not -(2**63) <= x < 2**63:  # no id table holds it, and the response could not echo it as a JSON integer
      raise BadRequest(f'{where} is an integer beyond 64 bits; send an id that large as a string')
    return x
  raise BadRequest(f'{where} must be a string or an integer, got {_type_name(x)}')


def _check_fields(obj: dict[str, Any], allowed: set[str], where: str) -> None:
  unknown = sorted(set(obj) - allowed)
  if unknown:
    raise BadRequest(f'unknown field {unknown[0]!r} in {where}; allowed: {", ".join(sorted(allowed))}')


def parse_weights(value: Any, model: ExportedModel, where: str = 'weights') -> np.ndarray:
  """Request fusion weights (a partial {task: number} override of the defaults) -> float32 [T]."""
  w = model.default_weights.copy()
  if value is None:
    return w
  if not isinstance(value, dict):
    raise BadRequest(f'{where} must be an object {{task: number}}, got {_type_name(value)}')
  for task, x in value.items():
    if task not in model.task_names:
      raise BadRequest(f'{where} names unknown task {task!r}; tasks: {", ".join(model.task_names)}')
    if not is_finite(x):
      raise BadRequest(f'{where}.{task} must be a finite number, got {x!r}')
    if abs(x) > 1e6:
      raise BadRequest(f'{where}.{task}={x!r} is out of range; use |weight| <= 1e6')
    w[model.task_names.index(task)] = x
  return w


def parse_fields(values: dict[str, Any], fields: dict[str, tuple[str, Any]], where: str,
                 also: tuple[str, ...] = ()) -> dict[str, Any]:
  """Raw feature values a request gives (validated by the type their encoding rule reads; null = unknown)."""
  out = {}
  for name, value in values.items():
    if name in also:
      continue
    if name not in fields:
      allowed = ', '.join([*also, *sorted(fields)]) or 'none'
      raise BadRequest(f'unknown field {name!r} in {where}; allowed: {allowed}')
    raw_type = fields[name][1]['raw_type']  # what the feature's encoding rule reads
    if value is None:
      out[name] = None
    elif raw_type == 'int':
      if not _is_int(value) or not -(2**63) <= value < 2**63:
        raise BadRequest(f'{where}.{name} must be an integer, got {value!r}')
      out[name] = value
    elif raw_type == 'float':
      if not is_finite(value):
        raise BadRequest(f'{where}.{name} must be a finite number, got {value!r}')
      check_float32(fields[name][1], [value], f'{where}.{name}')
      out[name] = value
    elif raw_type == 'id':
      out[name] = check_id(value, f'{where}.{name}')
    elif raw_type == 'list[float]':  # a vector feature: exactly its declared length
      dim = fields[name][1]['dim']
      if not isinstance(value, list) or not all(is_finite(v) and abs(v) <= FLOAT32_MAX for v in value):
        raise BadRequest(f'{where}.{name} must be an array of {dim} finite float32 numbers (at most '
                         f'{FLOAT32_MAX:.4g} in size), got {_describe(value)}')
      if len(value) != dim:
        raise BadRequest(f"{where}.{name} has {len(value)} numbers; this model's {name} vectors have {dim}")
      out[name] = value
    elif raw_type == 'list[str]':
      if (not isinstance(value, list) or len(value) > MAX_LIST_VALUES or
          not all(isinstance(v, str) and len(v) <= MAX_ID_CHARS for v in value)):
        raise BadRequest(f'{where}.{name} must be an array of at most {MAX_LIST_VALUES} strings of at most '
                         f'{MAX_ID_CHARS} characters, got {_describe(value)}')
      out[name] = value
    else:
      limit = MAX_TEXT_CHARS if fields[name][1]['kind'] == 'text' else MAX_ID_CHARS
      if not isinstance(value, str) or len(value) > limit:
        raise BadRequest(f'{where}.{name} must be a string of at most {limit} characters, got {_describe(value)}')
      out[name] = value
  return out


@dataclasses.dataclass
class UserRef:
  raw_id: Any
  position: int  # in the users table; -1 unknown
  features: dict[str, Any]  # encoded model inputs (table rows, or vectors for multi-valued inputs)
  cold_start: bool
  # 'table' | 'request' | 'table+request' | 'oov' (an unknown user: every feature unknown) | 'hashed id' (an unknown
  # user of a hashed id vocabulary: its id's bucket, the other features unknown)
  source: str
  unknown: list[str] = dataclasses.field(default_factory=list)  # given fields whose value the model does not know
  # catalog positions of the items of a history the request gave (all of them: also those the model's input drops,
  # such as ids without a row or beyond max_values): exclude_seen leaves them out with the training items
  history: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

  def describe(self) -> dict[str, Any]:
    return {'user_id': self.raw_id, 'known': self.position >= 0, 'cold_start': self.cold_start,
            'features': self.source}


def resolve_user(user: Any, model: ExportedModel, where: str = 'user') -> UserRef:
  """{"user_id": ..., optional side features} -> the user's encoded features and cold-start status."""
  if not isinstance(user, dict):
    raise BadRequest(f'{where} must be an object like {{"user_id": "196"}}, got {_type_name(user)}')
  if 'user_id' not in user:
    raise BadRequest(f'{where}.user_id is missing')
  raw = check_id(user['user_id'], f'{where}.user_id')
  fields = parse_fields(user, model.user_fields, where, also=('user_id',))
  pos = model.users.position(raw)
  unknown_source = 'hashed id' if model.hashed_ids['user'] else 'oov'
  source = ('table' if pos >= 0 else unknown_source) if not fields else ('table+request' if pos >= 0 else 'request')
  unknown = [f'user.{f}' for f in model.user_unknown_fields(fields)]
  return UserRef(raw, pos, model.user_features(pos, fields, raw), model.user_is_cold(pos), source, unknown,
                 model.history_items(fields))


def parse_context(value: Any, model: ExportedModel) -> tuple[dict[str, Any], list[str]]:
  """The request's context object -> (encoded context inputs, 'context.<field>' of values unknown to the model)."""
  if value is not None and not isinstance(value, dict):
    raise BadRequest(f'context must be an object of request-time features, got {_type_name(value)}')
  feats, unknown = model.context_features(parse_fields(value or {}, model.context_fields, 'context'))
  return feats, [f'context.{f}' for f in unknown]


@dataclasses.dataclass
class ScoreWork:
  """Rows for the score batcher: user features [n], catalog positions [n] (-1 unknown), weights [T], context
  features [n], and item features [n] where the request gave an item's content (None: the catalog's)."""

  user: dict[str, np.ndarray]
  item_positions: np.ndarray
  weights: np.ndarray
  context: dict[str, np.ndarray]
  items: dict[str, np.ndarray] | None = None

  @property
  def rows(self) -> int:
    return int(self.item_positions.shape[0])


@dataclasses.dataclass
class ScoreRequest:
  user: UserRef
  items: list[Any]  # raw item ids
  item_cold: np.ndarray
  work: ScoreWork
  unknown: list[str]  # fields of the user, the context and given items whose values the model does not know
  from_request: list[bool]  # per item: scored from content features the request gave (an object with fields)


def parse_score(body: Any, model: ExportedModel, max_items: int) -> ScoreRequest:
  """POST /v1/score {"user": {...}, "items": [...], "weights": {...}}."""
  if not isinstance(body, dict):
    raise BadRequest(f'the body must be a JSON object, got {_type_name(body)}')
  _check_fields(body, {'user', 'items', 'weights', 'context'}, 'the request')
  if 'user' not in body:
    raise BadRequest('user is missing: send {"user": {"user_id": "196"}, "items": ["242", ...]}')
  user = resolve_user(body['user'], model)
  items = body.get('items')
  if items is None:
    raise BadRequest('items is missing: send a non-empty array of item ids')
  if not isinstance(items, list):
    raise BadRequest(f'items must be an array of item ids, got {_type_name(items)}')
  if not items:
    raise BadRequest('items is empty: send at least one item id')
  if len(items) > max_items:
    raise BadRequest(f'items has {len(items)} entries; at most {max_items} per request')
  # Items given as objects with their content: {j: (raw id, validated fields)}.
  objects = {j: parse_item(x, model, f'items[{j}]') for j, x in enumerate(items) if isinstance(x, dict)}
  # Fast path for well-formed lists; the per-item check finds and names the first bad entry otherwise.
  if objects or not (all(type(x) is str for x in items) and 0 < min(map(len, items)) and
                     max(map(len, items)) <= MAX_ID_CHARS or
                     all(type(x) is int for x in items) and -(2**63) <= min(items) and max(items) < 2**63):
    items = [objects[j][0] if j in objects else check_id(x, f'items[{j}]') for j, x in enumerate(items)]
  weights = parse_weights(body.get('weights'), model)
  context, context_unknown = parse_context(body.get('context'), model)
  pos = model.items.lookup(items)
  n = len(items)
  broadcast = lambda v, dtype: np.broadcast_to(np.asarray(v, dtype), (n,) + np.shape(v))
  feats = {k: broadcast(v, model.user_table[k].dtype) for k, v in user.features.items()}
  ctx = {k: broadcast(v, model.no_context[k].dtype) for k, v in context.items()}
  unknown = user.unknown + context_unknown
  # unknown items of a hashed id vocabulary: their ids' buckets (None: the catalog's rows, the OOV row if unknown)
  item_feats = model.item_rows(pos, items)
  if objects:  # items given with their content: their features from the request, the others' from the catalog
    if item_feats is None:
      item_feats = {k: v[np.where(pos >= 0, pos, model.num_items)].copy() for k, v in model.item_table.items()}
    for j, (_, fields) in objects.items():
      given, fields_unknown = model.item_features(int(pos[j]), fields, items[j])
      for k, v in given.items():
        item_feats[k][j] = v
      unknown += [f'items[{j}].{f}' for f in fields_unknown]
  return ScoreRequest(user, items, model.items_cold(pos), ScoreWork(feats, pos, weights, ctx, item_feats), unknown,
                      [j in objects and bool(objects[j][1]) for j in range(n)])


def parse_item(value: dict[str, Any], model: ExportedModel, where: str) -> tuple[Any, dict[str, Any]]:
  """{"item_id": ..., content fields} -> (raw id, validated fields): an item the request describes."""
  if 'item_id' not in value:
    raise BadRequest(f'{where}.item_id is missing: an item object is {{"item_id": "new-1", <content fields>}}')
  fields = parse_fields(value, model.item_fields, where, also=('item_id',))
  return check_id(value['item_id'], f'{where}.item_id'), fields


@dataclasses.dataclass
class RecommendRequest:
  user: UserRef
  k: int
  exclude_seen: bool
  weights: np.ndarray
  context: dict[str, Any]  # encoded context inputs
  unknown: list[str]
  extra: ScoreWork | None = None  # items the request describes, ranked with the catalog
  extra_ids: list[Any] = dataclasses.field(default_factory=list)


MAX_NEW_ITEMS = 256  # items a recommend request may describe (also bounded by the server's --max_items)


def parse_recommend(body: Any, model: ExportedModel, max_items: int = MAX_NEW_ITEMS) -> RecommendRequest:
  """POST /v1/recommend {"user_id": "196", "k": 10, "exclude_seen": true, "weights": {...}} (or "user": {...}
  with side features instead of "user_id"); `max_items`: the server's limit on the new items it describes."""
  if not isinstance(body, dict):
    raise BadRequest(f'the body must be a JSON object, got {_type_name(body)}')
  _check_fields(body, {'user_id', 'user', 'k', 'exclude_seen', 'weights', 'context', 'items'}, 'the request')
  if ('user_id' in body) == ('user' in body):
    raise BadRequest('give exactly one of user_id or user: {"user_id": "196", "k": 10}')
  user = resolve_user(body['user'] if 'user' in body else {'user_id': body['user_id']}, model,
                      'user' if 'user' in body else 'the request')
  k = body.get('k', 10)
  limit = min(model.max_k, model.num_items)
  if not _is_int(k):
    raise BadRequest(f'k must be an integer in [1, {limit}], got {k!r}')
  if not 1 <= k <= limit:
    why = (f'the catalog has {model.num_items} items' if k > model.num_items else
           f'this export returns at most {model.max_k} (config.export.max_k)' if k > limit else 'k must be >= 1')
    raise BadRequest(f'k={k} is out of range [1, {limit}]: {why}')
  exclude_seen = body.get('exclude_seen', True)
  if not isinstance(exclude_seen, bool):
    raise BadRequest(f'exclude_seen must be true or false, got {_type_name(exclude_seen)}')
  context, context_unknown = parse_context(body.get('context'), model)
  weights = parse_weights(body.get('weights'), model)
  req = RecommendRequest(user, k, exclude_seen, weights, context, user.unknown + context_unknown)
  extra = body.get('items')
  if extra is not None:  # new items, described by their content: ranked beside the catalog
    if not isinstance(extra, list) or not extra or not all(isinstance(x, dict) for x in extra):
      raise BadRequest('items must be a non-empty array of item objects {"item_id": "new-1", <content fields>}')
    limit = min(MAX_NEW_ITEMS, max_items)
    if len(extra) > limit:
      raise BadRequest(f'items has {len(extra)} entries; at most {limit} new items per recommend request')
    scored = parse_score({'user': {'user_id': user.raw_id}, 'items': extra, 'weights': body.get('weights'),
                          'context': body.get('context')}, model, len(extra))
    first: dict[str, int] = {}
    for j, item_id in enumerate(scored.items):  # one entry each: a list holds an item once
      i = first.setdefault(str(item_id), j)
      if i != j:
        raise BadRequest(f'items[{j}].item_id {item_id!r} is given twice (items[{i}] too); describe each new item '
                         'once')
    known = np.flatnonzero(scored.work.item_positions >= 0)
    if known.size:  # the catalog's top k already ranks it: it would appear twice
      j = int(known[0])
      raise BadRequest(f'items[{j}].item_id {scored.items[j]!r} is in the catalog, which recommend ranks already; '
                       'give new items only (/v1/score scores a catalog item with other features)')
    scored.work.user = {key: np.broadcast_to(np.asarray(v, model.user_table[key].dtype), (len(extra),) + np.shape(v))
                        for key, v in user.features.items()}
    req.extra, req.extra_ids = scored.work, scored.items
    req.unknown += [u for u in scored.unknown if u.startswith('items[')]
  return req
