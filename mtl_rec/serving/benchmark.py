"""Serving benchmark: the exported functions and the HTTP server, scoring and recommending.

  python -m mtl_rec.serving.benchmark --export_dir=W/export [--out=serving_benchmark.json] [--duration=10]

Scoring: the exported `score` at batch 1/100/1000, and POST /v1/score at concurrency 1/8/64 and an open-loop rate;
requests are one user x 100 candidates (a random known user and 100 random catalog items, from a pool of pre-built
bodies). Recommending: the exported `recommend` for 1 and 8 users at once (their seen items excluded), and POST
/v1/recommend (a random known user, k=10, exclude_seen) at concurrency 1 and 8, against a latency budget: p99 at
concurrency 1 within --recommend_budget_ms (100 ms: an interactive page's share for its recommendations); the
JSON's `recommend_budget` says whether it held. On a large catalog (`python -m mtl_rec.scale_benchmark
--config=configs/synthetic.py:retrieval --num_items=1000000 --export_dir=D`) that measures retrieve-then-rerank.
The server runs as a subprocess (`serve.py`); the load generator is an aiohttp client with keep-alive connections,
one coroutine per concurrent client, in this process. Every loop is bounded in time (--duration) and in count
(--max_requests). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _summary(latencies_s: Sequence[float], wall_s: float, rows_per_call: int) -> dict[str, float]:
  lat = np.asarray(latencies_s) * 1000.0
  return {'calls': int(lat.size), 'p50_ms': float(np.percentile(lat, 50)), 'p99_ms': float(np.percentile(lat, 99)),
          'mean_ms': float(lat.mean()), 'calls_per_s': lat.size / wall_s,
          'rows_per_s': lat.size * rows_per_call / wall_s}


def bench_function(version_dir: str, batch_sizes: Sequence[int], duration_s: float, max_calls: int,
                   seed: int = 0) -> list[dict[str, Any]]:
  """Latency of the exported `score` called directly (no HTTP, no batcher) at exact batch sizes.

  Each call: host feature arrays in, outputs back on the host (np.asarray), as the server does.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mtl_rec.serving.loader import ExportedModel  # pylint: disable=g-import-not-at-top
  model = ExportedModel(version_dir, max_batch_rows=max(batch_sizes))
  rng = np.random.default_rng(seed)
  out = []
  for b in batch_sizes:
    users = rng.integers(0, model.num_users, b)
    items = rng.integers(0, model.num_items, b)
    user = {k: model.user_table[k][users] for k in model.user_inputs}
    item = {k: v[items] for k, v in model.item_table.items()}
    weights = np.tile(model.default_weights.astype(np.float32), (b, 1))
    context = {k: np.repeat(v[None], b, axis=0) for k, v in model.no_context.items()}
    fn = model._score_fn  # pylint: disable=protected-access

    def call():
      res = fn(model.params, user, item, context, weights)
      return {k: np.asarray(v) for k, v in res.items()}
    call()  # compile this exact shape
    lat, t_start = [], time.perf_counter()
    while len(lat) < max_calls and time.perf_counter() - t_start < duration_s:
      t0 = time.perf_counter()
      call()
      lat.append(time.perf_counter() - t0)
    out.append({'batch': b, **_summary(lat, time.perf_counter() - t_start, b)})
  jax.clear_caches()
  return out


def bench_recommend_function(version_dir: str, user_counts: Sequence[int], duration_s: float, max_calls: int,
                             seed: int = 0) -> list[dict[str, Any]]:
  """Latency of the exported `recommend` called directly for `u` random known users at once (their seen items
  excluded, default fusion weights), as the server calls it; rows_per_s counts catalog items ranked."""
  import jax  # pylint: disable=g-import-not-at-top
  from mtl_rec.serving.loader import ExportedModel  # pylint: disable=g-import-not-at-top
  model = ExportedModel(version_dir, max_batch_rows=16, max_recommend_users=max(user_counts))
  rng = np.random.default_rng(seed)
  out = []
  for u in user_counts:
    users = rng.integers(0, model.num_users, u)
    feats = {k: model.user_table[k][users] for k in model.user_inputs}
    exclude = np.zeros((u, model.num_items), bool)
    for j, p in enumerate(users):
      exclude[j, model.seen_items(int(p))] = True
    weights = np.tile(model.default_weights.astype(np.float32), (u, 1))
    model.recommend(feats, exclude, weights)  # compile this bucket
    lat, t_start = [], time.perf_counter()
    while len(lat) < max_calls and time.perf_counter() - t_start < duration_s:
      t0 = time.perf_counter()
      model.recommend(feats, exclude, weights)
      lat.append(time.perf_counter() - t0)
    out.append({'users': u, **_summary(lat, time.perf_counter() - t_start, u * model.num_items)})
  jax.clear_caches()
  return out


def _raw_ids(version_dir: str, table: str) -> np.ndarray:
  """The raw ids of an export's 'users' or 'catalog' table, as the manifest names them."""
  from mtl_rec.serving.loader import read_manifest  # pylint: disable=g-import-not-at-top
  m = read_manifest(version_dir)
  with np.load(os.path.join(version_dir, m[table]['file']), allow_pickle=False) as t:
    return t[m[table]['ids']]


def _recommend_bodies(version_dir: str, n: int, k: int, seed: int = 0) -> list[bytes]:
  user_ids = _raw_ids(version_dir, 'users')
  rng = np.random.default_rng(seed)
  return [json.dumps({'user_id': str(user_ids[rng.integers(len(user_ids))]), 'k': k, 'exclude_seen': True}).encode()
          for _ in range(n)]


def _request_bodies(version_dir: str, n: int, items_per_request: int, seed: int = 0) -> list[bytes]:
  user_ids, item_ids = _raw_ids(version_dir, 'users'), _raw_ids(version_dir, 'catalog')
  rng = np.random.default_rng(seed)
  bodies = []
  for _ in range(n):
    user = str(user_ids[rng.integers(len(user_ids))])
    items = [str(x) for x in item_ids[rng.integers(0, len(item_ids), items_per_request)]]
    bodies.append(json.dumps({'user': {'user_id': user}, 'items': items}).encode())
  return bodies


async def _load(url: str, bodies: list[bytes], concurrency: int, duration_s: float, max_requests: int,
                warmup_s: float, rows_per_request: int = 100) -> dict[str, Any]:
  import aiohttp  # pylint: disable=g-import-not-at-top
  latencies: list[float] = []
  errors: dict[str, int] = {}
  sent = 0
  connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
  timeout = aiohttp.ClientTimeout(total=30)
  async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
    headers = {'Content-Type': 'application/json'}
    t_begin = time.perf_counter()
    t_measure = t_begin + warmup_s
    t_end = t_measure + duration_s

    async def worker(w: int) -> None:
      nonlocal sent
      j = w
      while sent < max_requests:
        t0 = time.perf_counter()
        if t0 >= t_end:
          return
        body = bodies[j % len(bodies)]
        j += concurrency
        try:
          async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            status = resp.status
        except Exception as e:  # pylint: disable=broad-except
          status = type(e).__name__
        t1 = time.perf_counter()
        if t0 >= t_measure:
          sent += 1
          if status == 200:
            latencies.append(t1 - t0)
          else:
            errors[str(status)] = errors.get(str(status), 0) + 1
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = min(time.perf_counter(), t_end) - t_measure
  if not latencies:
    return {'concurrency': concurrency, 'calls': 0, 'errors': errors}
  return {'concurrency': concurrency, **_summary(latencies, max(wall, 1e-9), rows_per_request), 'errors': errors}


async def _open_loop(url: str, bodies: list[bytes], rate: float, duration_s: float, max_requests: int,
                     warmup_s: float, connections: int = 64) -> dict[str, Any]:
  """Requests sent on a fixed schedule (`rate` per second) whatever the responses do; latency counts from the
  scheduled send time, so a server that falls behind shows it (no coordinated omission)."""
  import aiohttp  # pylint: disable=g-import-not-at-top
  latencies: list[float] = []
  errors: dict[str, int] = {}
  connector = aiohttp.TCPConnector(limit=connections)
  timeout = aiohttp.ClientTimeout(total=30)
  total = min(int(rate * (warmup_s + duration_s)), max_requests)
  async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
    headers = {'Content-Type': 'application/json'}
    t_begin = time.perf_counter()
    t_measure = t_begin + warmup_s

    async def one(i: int, t_sched: float) -> None:
      try:
        async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
          await resp.read()
          status = resp.status
      except Exception as e:  # pylint: disable=broad-except
        status = type(e).__name__
      if t_sched >= t_measure:
        if status == 200:
          latencies.append(time.perf_counter() - t_sched)
        else:
          errors[str(status)] = errors.get(str(status), 0) + 1

    tasks = []
    for i in range(total):
      t_sched = t_begin + i / rate
      delay = t_sched - time.perf_counter()
      if delay > 0:
        await asyncio.sleep(delay)
      tasks.append(asyncio.create_task(one(i, t_sched)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t_measure
  if not latencies:
    return {'rate': rate, 'calls': 0, 'errors': errors}
  return {'rate': rate, **_summary(latencies, max(wall, 1e-9), 100), 'errors': errors}


def _cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of a process (Linux /proc), or nan elsewhere."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  except (OSError, IndexError, ValueError):
    return float('nan')


def bench_http(export_dir: str, version_dir: str, concurrencies: Sequence[int], duration_s: float,
               max_requests: int, items_per_request: int, server_flags: Sequence[str] = (),
               rates: Sequence[float] = (), recommend_concurrencies: Sequence[int] = (),
               recommend_k: int = 10) -> dict[str, Any]:
  """Starts serve.py on a free port, loads /v1/score at each concurrency (closed loop) and each rate (open loop),
  then /v1/recommend at each of `recommend_concurrencies`; returns the results with the CPU time server and load
  generator spent per request, and /metrics batch stats."""
  cmd = [sys.executable, os.path.join(REPO_ROOT, 'serve.py'), f'--export_dir={export_dir}', '--port=0',
         *server_flags]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    url = None
    t0 = time.time()
    while time.time() - t0 < 300:
      line = proc.stdout.readline()
      if not line:
        raise RuntimeError(f'serve.py exited with {proc.wait()} before it was ready: {" ".join(cmd)}')
      m = re.search(r'on (http://\S+)', line)
      if m:
        url = m.group(1)
        break
    if url is None:
      raise RuntimeError('serve.py was not ready after 300 s')
    bodies = _request_bodies(version_dir, 512, items_per_request)
    recommend_bodies = _recommend_bodies(version_dir, 512, recommend_k)
    results, recommend = [], []
    runs = ([('concurrency', c) for c in concurrencies] + [('rate', r) for r in rates] +
            [('recommend', c) for c in recommend_concurrencies])
    for kind, value in runs:
      server_cpu, client_cpu = _cpu_seconds(proc.pid), time.process_time()
      if kind == 'concurrency':
        r = asyncio.run(_load(url + '/v1/score', bodies, int(value), duration_s, max_requests, warmup_s=1.0))
      elif kind == 'recommend':
        r = asyncio.run(_load(url + '/v1/recommend', recommend_bodies, int(value), duration_s, max_requests,
                              warmup_s=1.0, rows_per_request=recommend_k))
      else:
        r = asyncio.run(_open_loop(url + '/v1/score', bodies, value, duration_s, max_requests, warmup_s=1.0))
      # Per request over warmup + measurement (both send requests at the measured pace).
      n = max(r['calls'] + sum(r['errors'].values()), 1) * (duration_s + 1.0) / duration_s
      r['server_cpu_ms_per_request'] = 1000 * (_cpu_seconds(proc.pid) - server_cpu) / n
      r['client_cpu_ms_per_request'] = 1000 * (time.process_time() - client_cpu) / n
      (recommend if kind == 'recommend' else results).append(r)
    import urllib.request  # pylint: disable=g-import-not-at-top
    with urllib.request.urlopen(url + '/metrics', timeout=10) as r:
      metrics_text = r.read().decode()
    return {'url': url, 'results': results, 'recommend': recommend, 'batching': _batch_stats(metrics_text)}
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()


def _batch_stats(metrics_text: str) -> dict[str, float]:
  def value(name: str) -> float:
    m = re.search(rf'^{re.escape(name)} (\S+)$', metrics_text, re.M)
    return float(m.group(1)) if m else float('nan')
  p = 'mtl_rec_batch'
  calls = value(f'{p}_requests_count{{function="score"}}')
  return {'score_calls': calls,
          'mean_requests_per_call': value(f'{p}_requests_sum{{function="score"}}') / max(calls, 1),
          'mean_rows_per_call': value(f'{p}_rows_sum{{function="score"}}') / max(calls, 1),
          'mean_execution_ms': 1000 * value(f'{p}_execution_seconds_sum{{function="score"}}') / max(calls, 1),
          'mean_queue_ms': 1000 * value(f'{p}_queue_seconds_sum{{function="score"}}') /
                           max(value(f'{p}_queue_seconds_count{{function="score"}}'), 1)}


def format_table(report: dict[str, Any]) -> str:
  lines = [f'{"":<30}{"p50 ms":>9}{"p99 ms":>9}{"calls/s":>10}{"rows/s":>12}{"server CPU ms/req":>19}']
  for r in report['function']:
    lines.append(f'{"function, batch " + str(r["batch"]):<30}{r["p50_ms"]:>9.3f}{r["p99_ms"]:>9.3f}'
                 f'{r["calls_per_s"]:>10,.0f}{r["rows_per_s"]:>12,.0f}')
  def http_row(label: str, r: dict[str, Any]) -> str:
    if not r.get('calls'):
      return f'{label:<30} no successful requests: {r.get("errors")}'
    err = f'  errors {r["errors"]}' if r['errors'] else ''
    return (f'{label:<30}{r["p50_ms"]:>9.3f}{r["p99_ms"]:>9.3f}{r["calls_per_s"]:>10,.0f}'
            f'{r["rows_per_s"]:>12,.0f}{r["server_cpu_ms_per_request"]:>19.3f}{err}')

  for r in report.get('http', {}).get('results', []):
    lines.append(http_row(f'http, concurrency {r["concurrency"]}' if 'concurrency' in r else
                          f'http, open loop {r["rate"]:,.0f}/s', r))
  for r in report.get('recommend_function', []):
    lines.append(f'{"recommend function, " + str(r["users"]) + " user(s)":<30}{r["p50_ms"]:>9.3f}{r["p99_ms"]:>9.3f}'
                 f'{r["calls_per_s"]:>10,.0f}{r["rows_per_s"]:>12,.0f}')
  for r in report.get('http', {}).get('recommend', []):
    lines.append(http_row(f'http recommend, concurrency {r["concurrency"]}', r))
  budget = report.get('recommend_budget')
  if budget:
    lines.append(f'recommend over {report["catalog_items"]:,} items ({budget["ranking"]}): '
                 f'p99 {budget["p99_ms"]:.1f} ms at concurrency 1, budget {budget["budget_ms"]:g} ms: '
                 f'{"within" if budget["within"] else "OVER"} budget')
  fn = {r['batch']: r for r in report['function']}
  http_rows = [r for r in report.get('http', {}).get('results', []) if r.get('calls')]
  if 1000 in fn and http_rows:
    busiest = max(http_rows, key=lambda r: r['calls_per_s'])
    compute = fn[1000]['mean_ms'] / 10
    lines.append(f'where the time goes (per request of 100 rows, at {busiest["calls_per_s"]:,.0f} requests/s): '
                 f'model {compute:.3f} ms (batch-1000 call / 10), server total '
                 f'{busiest["server_cpu_ms_per_request"]:.3f} CPU ms (so ~'
                 f'{max(busiest["server_cpu_ms_per_request"] - compute, 0):.3f} ms HTTP, JSON, validation, batching), '
                 f'load generator {busiest["client_cpu_ms_per_request"]:.3f} CPU ms')
  la = report['machine']
  lines.append(f'{la["cpus"]} CPUs; load average {la["load_average_at_start"][0]:.1f} at start, '
               f'{la.get("load_average_at_end", [float("nan")])[0]:.1f} at end (other processes share the machine)')
  b = report.get('http', {}).get('batching')
  if b:
    lines.append(f'server batching: {b["mean_requests_per_call"]:.1f} requests ({b["mean_rows_per_call"]:.0f} rows) '
                 f'per model call, {b["mean_execution_ms"]:.2f} ms per call, {b["mean_queue_ms"]:.2f} ms queued')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog='python -m mtl_rec.serving.benchmark', description=__doc__.split('\n')[0])
  parser.add_argument('--export_dir', required=True, help='W/export (newest version) or W/export/<version>')
  parser.add_argument('--out', default='serving_benchmark.json', help='JSON report path')
  parser.add_argument('--duration', type=float, default=10.0, help='seconds per measurement')
  parser.add_argument('--max_requests', type=int, default=200_000, help='cap on calls per measurement')
  parser.add_argument('--batch_sizes', default='1,100,1000')
  parser.add_argument('--concurrency', default='1,8,64', help='closed loop: clients each sending back to back')
  parser.add_argument('--rate', default='1000', help='open loop: requests per second on a fixed schedule ("" none)')
  parser.add_argument('--items_per_request', type=int, default=100)
  parser.add_argument('--recommend_users', default='1,8', help='users per direct `recommend` call ("" none)')
  parser.add_argument('--recommend_concurrency', default='1,8', help='closed loop on /v1/recommend ("" none)')
  parser.add_argument('--recommend_k', type=int, default=10, help='k of each /v1/recommend request')
  parser.add_argument('--recommend_budget_ms', type=float, default=100.0,
                      help='p99 latency budget of /v1/recommend at concurrency 1')
  parser.add_argument('--skip_http', action='store_true')
  parser.add_argument('--server_flag', action='append', default=[], help='extra serve.py flag, repeatable')
  args = parser.parse_args(argv)
  # every flag checked before anything is loaded: a bad value is a usage error naming it, not a traceback
  def positives(flag: str, cast: type, what: str, example: str) -> list[Any]:  # '1,8' -> [1, 8]; '' -> none
    text = getattr(args, flag)
    try:
      values = [cast(x) for x in text.split(',') if x]
    except ValueError:
      values = [0]
    if any(not v > 0 for v in values):
      parser.error(f'--{flag}={text!r} is not a comma-separated list of positive {what} (e.g. {example}, '
                   'or "" for none)')
    return values
  lists = {flag: positives(flag, int, 'integers', '1,8')
           for flag in ('batch_sizes', 'concurrency', 'recommend_users', 'recommend_concurrency')}
  rates = positives('rate', float, 'request rates', '1000')
  for flag in ('duration', 'max_requests', 'items_per_request', 'recommend_k', 'recommend_budget_ms'):
    if not getattr(args, flag) > 0:
      parser.error(f'--{flag}={getattr(args, flag)} must be positive')

  from mtl_rec import errors  # pylint: disable=g-import-not-at-top
  from mtl_rec.serving.loader import read_manifest, resolve_version_dir  # pylint: disable=g-import-not-at-top
  from mtl_rec import files  # pylint: disable=g-import-not-at-top
  try:
    version_dir = resolve_version_dir(args.export_dir)
    manifest = read_manifest(version_dir)
    files.output_file(args.out, '--out')  # checked now: the report is written after minutes of measuring
  except errors.Error as e:  # a bad --export_dir or --out: a usage error naming it
    parser.error(str(e))
  report: dict[str, Any] = {
      'model': manifest['name'], 'version': manifest['version'], 'export_dir': version_dir,
      'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version(),
                  'load_average_at_start': list(os.getloadavg())},
      'request': f'one user x {args.items_per_request} candidates, POST /v1/score',
      'load_generator': 'aiohttp client, keep-alive, one coroutine per concurrent client, same machine',
  }
  retrieval = manifest['functions']['recommend'].get('retrieval')
  report['catalog_items'] = manifest['catalog']['count']
  report['recommend_ranking'] = (f"retrieve {retrieval['candidates']} by the {retrieval['task']} task's vectors, "
                                 're-rank them with the fused heads') if retrieval else \
      'the fused heads score the whole catalog'
  try:  # the first load of the export: one built for another platform is an errors.Error naming the fix
    report['function'] = bench_function(version_dir, lists['batch_sizes'], args.duration, args.max_requests)
  except errors.Error as e:
    parser.error(str(e))
  if lists['recommend_users']:
    report['recommend_function'] = bench_recommend_function(version_dir, lists['recommend_users'], args.duration,
                                                            args.max_requests)
  if not args.skip_http:
    report['http'] = bench_http(args.export_dir, version_dir, lists['concurrency'], args.duration,
                                args.max_requests, args.items_per_request, args.server_flag, rates,
                                lists['recommend_concurrency'], args.recommend_k)
    one = next((r for r in report['http']['recommend'] if r['concurrency'] == 1 and r.get('calls')), None)
    if one is not None:
      report['recommend_budget'] = {'budget_ms': args.recommend_budget_ms, 'p99_ms': one['p99_ms'],
                                    'within': one['p99_ms'] <= args.recommend_budget_ms,
                                    'ranking': report['recommend_ranking'], 'k': args.recommend_k}
  report['machine']['load_average_at_end'] = list(os.getloadavg())
  print(format_table(report))
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
