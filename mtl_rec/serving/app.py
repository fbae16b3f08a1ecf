"""The HTTP server: aiohttp routes over an ExportedModel, with dynamic batching, validation and metrics.

  POST /v1/score                    {"user": {"user_id": "196", ...}, "items": ["242", ...], "weights": {...},
                                     "context": {...}}
  POST /v1/recommend                {"user_id": "196", "k": 10, "exclude_seen": true, "weights": {...},
                                     "context": {...}}  (exclude_seen: the user's training items and the items of
                                     a history the request gives)
  GET  /v2, /v2/health/live, /v2/health/ready
  GET  /v2/models/{name}[/versions/{v}], .../ready, .../config
  POST /v2/models/{name}[/versions/{v}]/infer
  GET  /metrics                     Prometheus text format

Every error is a JSON {"error": "..."}: 4xx for the client's mistakes (the message names the problem), 503 when
overloaded, 500 (logged with its traceback, which never reaches the client) for a bug. No request can stop the
server: handlers never let an exception escape, and the batch collectors survive failed batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import orjson
from aiohttp import http_exceptions, web

import mtl_rec
from mtl_rec import errors
from mtl_rec.serving import protocol
from mtl_rec.serving.batching import Batcher, Overloaded
from mtl_rec.serving.loader import ExportedModel, resolve_version_dir
from mtl_rec.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mtl_rec.serving.metrics import ServingMetrics
from mtl_rec.serving.validation import (BadRequest, RecommendRequest, ScoreWork, parse_json, parse_recommend,
                                        parse_score)

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 1e-4


@dataclasses.dataclass
class ServerOptions:
  """Serving knobs (serve.py flags)."""

  host: str = '127.0.0.1'
  port: int = 8500  # 0 = any free port (printed on the ready line)
  max_batch_rows: int = 4096  # user x item rows merged into one call of `score` (rounded up to a power of 2)
  max_wait_ms: float = 1.0  # how long the oldest request waits for companions before its batch runs
  max_recommend_users: int = 32  # users merged into one call of `recommend` (rounded up to a power of 2)
  max_items: int = 1000  # items per /v1/score request, new items per recommend (<= 256); v2 rows: max_batch_rows
  max_body_bytes: int = 1 << 20  # larger bodies get a 413
  max_queued_rows: int = 65536  # rows waiting for the model beyond which requests get a 503
  warmup: bool = True  # compile every batch bucket before accepting requests


def _json(obj: Any, status: int = 200) -> web.Response:
  # numpy float32 scalars and arrays serialize natively, in their shortest round-tripping form.
  return web.Response(body=orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status=status,
                      content_type='application/json')


def _error(status: int, message: str) -> web.Response:
  return _json({'error': message}, status)


async def _route_template(request: web.Request) -> str:
  """The route template of the request's path whatever its method (a 405 is counted under the endpoint it
  missed, not with paths that match nothing), else 'unmatched'."""
  for resource in request.app.router.resources():
    _, allowed = await resource.resolve(request)
    if allowed:
      return resource.canonical
  return 'unmatched'


class Server:
  """The application state: the model, the two batchers and the metrics."""

  def __init__(self, model: ExportedModel, options: ServerOptions):
    self.model = model
    self.options = options
    self.metrics = ServingMetrics()
    self.metrics.info.set(model.name, str(model.version), value=1)
    self.ready = False
    max_rows = min(options.max_batch_rows, model.max_batch_rows)
    self.max_rows = max_rows
    self.max_items = min(options.max_items, max_rows)
    wait = options.max_wait_ms / 1000.0
    self.score_batcher = Batcher(self._run_score, 'score', max_rows, wait, options.max_queued_rows, self.metrics)
    self.recommend_batcher = Batcher(self._run_recommend, 'recommend', model.max_recommend_users, wait,
                                     max(options.max_queued_rows // 64, model.max_recommend_users), self.metrics)

  # -------------------------------------------------------------------------------------------------------------
  # Batched work (worker threads).

  def _run_score(self, works: Sequence[ScoreWork]) -> list[dict[str, np.ndarray]]:
    counts = [w.rows for w in works]
    user = {k: np.concatenate([w.user[k] for w in works]) for k in self.model.user_inputs}
    positions = np.concatenate([w.item_positions for w in works])
    weights = np.repeat(np.stack([w.weights for w in works]), counts, axis=0)
    context = {k: np.concatenate([w.context[k] for w in works]) for k in self.model.context_inputs}
    items = None
    if any(w.items is not None for w in works):  # some request described items: every row's features, explicitly
      table = self.model.item_table
      rows = lambda w: np.where(w.item_positions >= 0, w.item_positions, self.model.num_items)
      items = {k: np.concatenate([w.items[k] if w.items is not None else table[k][rows(w)] for w in works])
               for k in self.model.item_inputs}
    out = self.model.score_rows(user, positions, weights, context, items)
    results, start = [], 0
    for n in counts:
      results.append({k: v[start:start + n] for k, v in out.items()})
      start += n
    return results

  def _run_recommend(self, reqs: Sequence[RecommendRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
    m = self.model
    user = {k: np.stack([np.asarray(r.user.features[k], m.user_table[k].dtype) for r in reqs]) for k in m.user_inputs}
    exclude = np.zeros((len(reqs), m.num_items), bool)
    for j, r in enumerate(reqs):
      if r.exclude_seen:  # the user's training items, and the items of a history the request gave
        exclude[j, m.seen_items(r.user.position)] = True
        exclude[j, r.user.history] = True
    context = {k: np.stack([np.asarray(r.context[k], m.no_context[k].dtype) for r in reqs]) for k in m.context_inputs}
    items, scores = m.recommend(user, exclude, np.stack([r.weights for r in reqs]), context)
    return [(items[j, :r.k], scores[j, :r.k]) for j, r in enumerate(reqs)]

  # -------------------------------------------------------------------------------------------------------------
  # Handlers.

  async def _body(self, request: web.Request) -> bytes:
    try:
      return await request.read()  # aiohttp raises HTTPRequestEntityTooLarge past client_max_size
    except web.RequestPayloadError as e:  # e.g. 'Content-Encoding: gzip' on a body that is not gzip
      raise BadRequest(f'the request body could not be read ({_unreadable_reason(e)}); check that its '
                       'Content-Encoding header matches how the body is compressed, or send it uncompressed') from None
    except ConnectionError:  # the client hung up mid-body: its mistake (nobody reads this answer), not a server bug
      raise BadRequest('the client closed the connection before sending the whole body (Content-Length '
                       f'{request.content_length})') from None

  def _check_model(self, request: web.Request) -> None:
    name = request.match_info.get('name')
    if name != self.model.name:
      raise BadRequest(f'unknown model {name!r}; this server serves {self.model.name!r}', 404)
    version = request.match_info.get('version')
    if version is not None and version != str(self.model.version):
      raise BadRequest(f'model {name!r} has no version {version!r}; it serves version {self.model.version}', 404)

  def _cold_metrics(self, user_cold: int, item_cold: int) -> None:
    if user_cold:
      self.metrics.cold_starts.inc('user', amount=user_cold)
    if item_cold:
      self.metrics.cold_starts.inc('item', amount=item_cold)

  async def score(self, request: web.Request) -> web.Response:
    req = parse_score(parse_json(await self._body(request)), self.model, self.max_items)
    out = await self.score_batcher.submit(req.work, req.work.rows)
    self._cold_metrics(int(req.user.cold_start), int(req.item_cold.sum()))
    names = self.model.task_names
    cols = [list(out[t]) for t in names]  # numpy float32 scalars: orjson writes them shortest
    scores = list(out['score'])
    cold = req.item_cold.tolist()
    items = []
    for j, item_id in enumerate(req.items):
      entry = {'item_id': item_id, 'score': scores[j], 'cold_start': cold[j]}
      if req.from_request[j]:
        entry['features'] = 'request'  # scored from the content the request gave
      for t, col in zip(names, cols):
        entry[t] = col[j]
      items.append(entry)
    return _json({'model': self.model.name, 'version': self.model.version, 'user': req.user.describe(),
                  'weights': dict(zip(names, req.work.weights.tolist())), 'unknown_values': req.unknown,
                  'items': items})

  async def recommend(self, request: web.Request) -> web.Response:
    req = parse_recommend(parse_json(await self._body(request)), self.model, self.max_items)
    positions, scores = await self.recommend_batcher.submit(req, 1)
    self._cold_metrics(int(req.user.cold_start), 0)
    keep = np.isfinite(scores)  # -inf: excluded items filling k when too few remain
    positions, scores = positions[keep], scores[keep]
    ids = self.model.items.raw(positions)
    titles = self.model.titles[positions].tolist() if self.model.titles is not None else [None] * len(ids)
    items = [{'item_id': i, 'title': t, 'score': s} for i, t, s in zip(ids, titles, list(scores))]
    if req.extra is not None:  # described items compete with the catalog's top k
      out = await self.score_batcher.submit(req.extra, req.extra.rows)
      new = [{'item_id': i, 'title': None, 'score': s, 'cold_start': True, 'features': 'request'}
             for i, s in zip(req.extra_ids, list(out['score']))]
      items = sorted(items + new, key=lambda e: -float(e['score']))[:req.k]
    return _json({'model': self.model.name, 'version': self.model.version, 'user': req.user.describe(),
                  'k': req.k, 'exclude_seen': req.exclude_seen,
                  'weights': dict(zip(self.model.task_names, req.weights.tolist())), 'unknown_values': req.unknown,
                  'items': items})

  async def infer(self, request: web.Request) -> web.Response:
    self._check_model(request)
    body = await self._body(request)
    req = protocol.parse_infer(body, request.headers.get(protocol.HEADER_LENGTH), self.model, self.max_rows)
    m = self.model
    item_pos = m.items.lookup(req.item_ids)
    user_pos = m.users.lookup(req.user_ids)
    if user_pos.shape[0] == 1:
      user_pos = np.repeat(user_pos, item_pos.shape[0])
    rows = np.where(user_pos >= 0, user_pos, m.num_users)
    context, unknown = protocol.encode_context(req, m, item_pos.shape[0])
    user_ids = req.user_ids if len(req.user_ids) > 1 else req.user_ids * len(user_pos)  # one id, or one per row
    users = m.id_rows('user', user_pos, user_ids)  # unknown users of a hashed vocabulary: their ids' buckets
    work = ScoreWork(users, item_pos, req.weights, context, m.item_rows(item_pos, req.item_ids))
    out = await self.score_batcher.submit(work, work.rows)
    user_cold = (user_pos < 0) | ((m.user_id_rows[rows] == 0) if m.user_id_rows is not None else False)
    item_cold = m.items_cold(item_pos)
    self._cold_metrics(int(np.sum(user_cold)), int(item_cold.sum()))
    values = {**out, 'user_cold_start': np.asarray(user_cold, bool), 'item_cold_start': item_cold}
    body, headers = protocol.encode_response(m, req, values, unknown)
    return web.Response(body=body, headers=headers)

  async def server_metadata(self, request: web.Request) -> web.Response:
    del request
    return _json({'name': 'mtl_rec', 'version': mtl_rec.__version__, 'extensions': ['binary_tensor_data']})

  async def live(self, request: web.Request) -> web.Response:
    del request
    return _json({'live': True})

  async def server_ready(self, request: web.Request) -> web.Response:
    del request
    return _json({'ready': self.ready}, 200 if self.ready else 503)

  async def model_metadata(self, request: web.Request) -> web.Response:
    self._check_model(request)
    return _json(protocol.model_metadata(self.model))

  async def model_ready(self, request: web.Request) -> web.Response:
    self._check_model(request)
    return _json({'name': self.model.name, 'ready': self.ready}, 200 if self.ready else 503)

  async def model_config(self, request: web.Request) -> web.Response:
    self._check_model(request)
    return _json(protocol.model_config(self.model, self.max_rows))

  async def prometheus(self, request: web.Request) -> web.Response:
    del request
    for fn, n in self.model.compiled_shapes().items():
      self.metrics.compiled.set(fn, value=n)
    return web.Response(text=self.metrics.render(), headers={'Content-Type': METRICS_CONTENT_TYPE})

  # -------------------------------------------------------------------------------------------------------------

  @web.middleware
  async def middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
    """JSON errors for everything, and request metrics by route template."""
    t0 = time.perf_counter()
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else 'unmatched'
    try:
      response = await handler(request)
    except BadRequest as e:
      response = _error(e.status, e.message)
    except Overloaded as e:
      response = _error(503, str(e))
      response.headers['Retry-After'] = '1'  # seconds: the queue drains in milliseconds
    except web.HTTPRequestEntityTooLarge:
      response = _error(413, f'the body is larger than the limit of {self.options.max_body_bytes} bytes')
    except web.HTTPMethodNotAllowed as e:
      endpoint = await _route_template(request)
      allowed = ', '.join(sorted(e.allowed_methods))
      response = _error(405, f'{request.method} is not allowed on {request.path}; use {allowed}')
      response.headers['Allow'] = allowed  # RFC 9110: a 405 names the methods the resource takes
    except web.HTTPNotFound:
      response = _error(404, f'no endpoint {request.method} {request.path}; endpoints: POST /v1/score, POST '
                             f'/v1/recommend, /v2/..., GET /metrics')
    except web.HTTPException as e:
      response = _error(e.status, e.reason)
    except asyncio.CancelledError:
      raise
    except Exception:  # pylint: disable=broad-except
      log.exception('unexpected error answering %s %s', request.method, request.path)
      response = _error(500, 'internal server error (logged on the server)')
    self.metrics.requests.inc(endpoint, response.status)
    if response.status >= 400:
      self.metrics.errors.inc(endpoint, response.status)
    self.metrics.latency.observe(time.perf_counter() - t0, endpoint)
    return response

  def app(self) -> web.Application:
    """The aiohttp application (batchers start and stop with it)."""
    _quiet_unreadable_bodies()
    app = web.Application(middlewares=[self.middleware], client_max_size=self.options.max_body_bytes)
    r = app.router
    r.add_post('/v1/score', self.score)
    r.add_post('/v1/recommend', self.recommend)
    r.add_get('/v2', self.server_metadata)
    r.add_get('/v2/', self.server_metadata)  # the OpenAPI spec's path for server metadata
    r.add_get('/v2/health/live', self.live)
    r.add_get('/v2/health/ready', self.server_ready)
    for prefix in ('/v2/models/{name}', '/v2/models/{name}/versions/{version}'):
      r.add_get(prefix, self.model_metadata)
      r.add_get(prefix + '/ready', self.model_ready)
      r.add_get(prefix + '/config', self.model_config)
      r.add_post(prefix + '/infer', self.infer)
    r.add_get('/metrics', self.prometheus)

    async def start(_):
      self.score_batcher.start()
      self.recommend_batcher.start()
      self.ready = True

    async def stop(_):
      self.ready = False
      await self.score_batcher.stop()
      await self.recommend_batcher.stop()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def load(export_dir: str, options: ServerOptions) -> Server:
  """Loads the export (newest version under `export_dir`, or that version dir) and compiles its buckets."""
  version_dir = resolve_version_dir(export_dir)
  t0 = time.time()
  model = ExportedModel(version_dir, max_batch_rows=options.max_batch_rows,
                        max_recommend_users=options.max_recommend_users)
  if options.warmup:
    model.warmup()
  log.info('loaded %s version %d from %s in %.1fs (%d users, %d items; score buckets %s, recommend buckets %s)',
           model.name, model.version, version_dir, time.time() - t0, model.num_users, model.num_items,
           model.score_buckets, model.recommend_buckets)
  return Server(model, options)


def _unreadable_reason(exc: BaseException) -> str:
  """aiohttp's reason for an undecodable body ('Can not decode content-encoding: gzip'); its str() is prefixed
  with '400, message:'."""
  return str(exc).split('\n')[-1].strip()


class _UnreadableBodyFilter(logging.Filter):
  """aiohttp's server logger: a body that cannot be decoded (answered with a 400 by `_body`) is read once more when
  aiohttp drains the connection, a compressed body found truncated at its end is answered with a 400 by aiohttp
  itself, and so is a request its HTTP parser rejects (an invalid method, a bad Content-Length, a line over 8190
  bytes: a plain-text 400 naming the problem, before any handler runs); aiohttp logs each with a traceback at ERROR.
  Each is the client's mistake, already answered: log one INFO line instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, (web.RequestPayloadError, http_exceptions.ContentEncodingError)):
      msg, reason = 'closed a connection whose request body could not be read: %s', _unreadable_reason(exc)
    elif isinstance(exc, http_exceptions.BadHttpMessage):  # the parser's message marks the spot with '^'
      msg, reason = 'answered a malformed HTTP request with a 400: %s', ' '.join(
          str(exc.message).replace('^', ' ').split())[:300]
    else:
      return True
    record.msg, record.args = msg, (reason,)
    record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.INFO, 'INFO'
    return True


def _quiet_unreadable_bodies() -> None:
  logger = logging.getLogger('aiohttp.server')
  if not any(isinstance(f, _UnreadableBodyFilter) for f in logger.filters):
    logger.addFilter(_UnreadableBodyFilter())


def serve(export_dir: str, options: ServerOptions) -> None:
  """Loads the export and serves it until SIGINT/SIGTERM. Prints one line once accepting connections."""
  # Bound before loading, so a busy port fails at once rather than after the compilations.
  sock = socket.socket(socket.AF_INET6 if ':' in options.host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((options.host, options.port))
  except OSError as e:
    sock.close()
    raise errors.Error(listen_error(e, options.host, options.port)) from None
  port = sock.getsockname()[1]
  try:
    server = load(export_dir, options)
  except BaseException:
    sock.close()
    raise
  # The batch worker thread needs the GIL for a moment before and after each call; with Python's default 5 ms
  # switch interval it can wait that long behind the event loop's request parsing (see batching.py).
  sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
  m = server.model

  def ready_line(_: str) -> None:
    host = f'[{options.host}]' if ':' in options.host else options.host  # an IPv6 address in a URL (RFC 3986)
    print(f'serving {m.name} version {m.version} on http://{host}:{port}', flush=True)
  web.run_app(server.app(), sock=sock, print=ready_line, access_log=None, handle_signals=True, loop=_new_loop())


def listen_error(e: OSError, host: str, port: int) -> str:
  """Why the server cannot listen on (host, port), naming the flag to change."""
  if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
    return (f'cannot listen on --host={host}: {e}; pass an address of this machine (127.0.0.1: local clients only, '
            '0.0.0.0: every interface)')
  if e.errno == errno.EADDRINUSE:
    return f'cannot listen on --port={port}: it is in use ({e}); pick another, or --port=0 for any free one'
  if e.errno == errno.EACCES:
    return f'cannot listen on --port={port}: {e}; ports below 1024 need privileges: pick a higher one'
  return f'cannot listen on --host={host} --port={port}: {e}'


def _new_loop() -> asyncio.AbstractEventLoop:
  """uvloop where installed (Linux, macOS): less event-loop overhead per request than asyncio's own loop."""
  try:
    import uvloop  # pylint: disable=g-import-not-at-top
  except ImportError:
    return asyncio.new_event_loop()
  return uvloop.new_event_loop()
