"""Prometheus metrics in the text exposition format (0.0.4), without a client library.

All updates happen on the event-loop thread, so there are no locks. Label sets are bounded: endpoints are route
templates (never raw paths), codes are HTTP status codes.
"""

from __future__ import annotations

import bisect
from typing import Sequence

CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'


def _labels(names: Sequence[str], values: Sequence[str], extra: str = '') -> str:
  parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
  if extra:
    parts.append(extra)
  return '{' + ','.join(parts) + '}' if parts else ''


def _escape(v: str) -> str:
  return str(v).replace('\\', r'\\').replace('\n', r'\n').replace('"', r'\"')


def _num(x: float) -> str:
  return repr(float(x)) if isinstance(x, float) else str(x)


class Counter:
  def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
    self.name, self.help, self.labels = name, help_text, tuple(labels)
    self.values: dict[tuple[str, ...], float] = {}

  def inc(self, *label_values: str, amount: float = 1) -> None:
    key = tuple(str(v) for v in label_values)
    self.values[key] = self.values.get(key, 0) + amount

  def render(self, kind: str = 'counter') -> list[str]:
    out = [f'# HELP {self.name} {self.help}', f'# TYPE {self.name} {kind}']
    for key, v in sorted(self.values.items()):
      out.append(f'{self.name}{_labels(self.labels, key)} {_num(v)}')
    return out


class Gauge(Counter):
  def set(self, *label_values: str, value: float) -> None:
    self.values[tuple(str(v) for v in label_values)] = value

  def render(self, kind: str = 'gauge') -> list[str]:
    return super().render(kind)


class Histogram:
  def __init__(self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()):
    self.name, self.help, self.labels = name, help_text, tuple(labels)
    self.buckets = tuple(sorted(buckets))
    self.series: dict[tuple[str, ...], list] = {}  # key -> [bucket counts..., sum, count]

  def observe(self, value: float, *label_values: str) -> None:
    key = tuple(str(v) for v in label_values)
    s = self.series.get(key)
    if s is None:
      s = self.series[key] = [0] * len(self.buckets) + [0.0, 0]
    i = bisect.bisect_left(self.buckets, value)
    if i < len(self.buckets):
      s[i] += 1
    s[-2] += value
    s[-1] += 1

  def render(self) -> list[str]:
    out = [f'# HELP {self.name} {self.help}', f'# TYPE {self.name} histogram']
    for key, s in sorted(self.series.items()):
      cum = 0
      for b, c in zip(self.buckets, s):
        cum += c
        le = 'le="' + _num(b) + '"'
        out.append(f'{self.name}_bucket{_labels(self.labels, key, le)} {cum}')
      le = 'le="+Inf"'
      out.append(f'{self.name}_bucket{_labels(self.labels, key, le)} {s[-1]}')
      out.append(f'{self.name}_sum{_labels(self.labels, key)} {_num(float(s[-2]))}')
      out.append(f'{self.name}_count{_labels(self.labels, key)} {s[-1]}')
    return out


class ServingMetrics:
  """The server's metrics: requests, errors, latency, batch sizes, batch execution time, cold starts, compiles."""

  def __init__(self, prefix: str = 'mtl_rec'):
    p = prefix
    self.requests = Counter(f'{p}_requests_total', 'HTTP requests answered, by endpoint and status code.',
                            ('endpoint', 'code'))
    self.errors = Counter(f'{p}_request_errors_total', 'HTTP requests answered with a 4xx or 5xx status.',
                          ('endpoint', 'code'))
    self.latency = Histogram(f'{p}_request_latency_seconds', 'Time from request start to response, by endpoint.',
                             (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
                             ('endpoint',))
    self.batch_requests = Histogram(f'{p}_batch_requests', 'Requests merged into one call of a compiled function.',
                                    (1, 2, 4, 8, 16, 32, 64, 128, 256), ('function',))
    self.batch_rows = Histogram(f'{p}_batch_rows', 'Rows (user x item pairs, or users) in one call, before padding.',
                                (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), ('function',))
    self.batch_seconds = Histogram(f'{p}_batch_execution_seconds', 'Time of one batched call, assembly included.',
                                   (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), ('function',))
    self.queue_seconds = Histogram(f'{p}_batch_queue_seconds', 'Time a request waited for its batch to start.',
                                   (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), ('function',))
    self.cold_starts = Counter(f'{p}_cold_start_total', 'Ids answered with the out-of-vocabulary row.', ('entity',))
    self.compiled = Gauge(f'{p}_compiled_executables', 'Executables compiled per function (constant after warmup).',
                          ('function',))
    self.info = Gauge(f'{p}_model_info', 'The served model.', ('name', 'version'))

  def render(self) -> str:
    lines = []
    for m in (self.requests, self.errors, self.latency, self.batch_requests, self.batch_rows, self.batch_seconds,
              self.queue_seconds, self.cold_starts, self.compiled, self.info):
      lines.extend(m.render())
    return '\n'.join(lines) + '\n'
