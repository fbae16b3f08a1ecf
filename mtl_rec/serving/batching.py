"""Dynamic batching: concurrent requests merged into one call of a compiled function.

Requests queue on the event loop; one collector task takes the oldest request, waits at most `max_wait_s` from
its arrival for companions (or until `max_rows` are queued), and runs the merged batch in a worker thread: jax
releases the GIL while the executable runs, so the event loop parses and answers other requests meanwhile, and
while a batch runs the next one forms. The busier the server, the larger the batches.

The loop thread and the worker hand the GIL back and forth a few times per batch. Python makes a thread that
wants the GIL wait up to its switch interval (5 ms by default) while the other runs bytecode, which under load
turned each hand-off into milliseconds; the server lowers it (`serve()` sets `sys.setswitchinterval`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

from mtl_rec.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


class Overloaded(Exception):
  """More rows are queued than the server accepts: the client should retry later (503)."""


@dataclasses.dataclass
class _Pending:
  payload: Any
  rows: int
  future: asyncio.Future
  arrived: float


class Batcher:
  """Merges payloads submitted concurrently into calls of `run(payloads) -> results` (one result per payload).

  Args:
    run: called in the worker thread with the payloads of one batch; returns their results in order.
    name: the function's name in metrics.
    max_rows: a batch never holds more rows than this (a single larger payload is refused by `submit`).
    max_wait_s: how long the oldest queued request may wait for companions before its batch starts.
    max_queued_rows: rows allowed to wait; beyond it `submit` raises Overloaded instead of queueing forever.
    metrics: batch sizes, queue and execution times are recorded here.
  """

  def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], name: str, max_rows: int, max_wait_s: float,
               max_queued_rows: int, metrics: ServingMetrics):
    self._run = run
    self.name = name
    self.max_rows = max_rows
    self.max_wait_s = max_wait_s
    self.max_queued_rows = max(max_queued_rows, max_rows)
    self.metrics = metrics
    self._queue: collections.deque[_Pending] = collections.deque()
    self._queued_rows = 0
    self._wakeup: asyncio.Event | None = None
    self._task: asyncio.Task | None = None
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f'batch-{name}')

  def start(self) -> None:
    """Starts the collector on the running event loop."""
    self._wakeup = asyncio.Event()
    self._task = asyncio.get_running_loop().create_task(self._collect_forever(), name=f'batcher-{self.name}')

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    self._executor.shutdown(wait=True)

  async def submit(self, payload: Any, rows: int) -> Any:
    """Queues `payload` (`rows` rows) and returns its result once its batch has run."""
    if rows > self.max_rows:
      raise ValueError(f'{rows} rows exceed the batch limit {self.max_rows}')
    if self._queued_rows + rows > self.max_queued_rows:
      raise Overloaded(f'{self._queued_rows} rows are already queued for {self.name}; retry later')
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    self._queue.append(_Pending(payload, rows, fut, loop.time()))
    self._queued_rows += rows
    self._wakeup.set()
    return await fut

  def _take_batch(self) -> list[_Pending]:
    batch, rows = [], 0
    while self._queue and (not batch or rows + self._queue[0].rows <= self.max_rows):
      p = self._queue.popleft()
      self._queued_rows -= p.rows
      if p.future.done():  # the client went away (cancelled): skip its work
        continue
      batch.append(p)
      rows += p.rows
    return batch

  async def _collect_forever(self) -> None:
    while True:
      try:
        await self._collect_once()
      except asyncio.CancelledError:
        raise
      except Exception:  # pylint: disable=broad-except
        # Never let the collector die: every later request would wait forever.
        log.exception('%s batcher: unexpected error; continuing', self.name)

  async def _collect_once(self) -> None:
    """Waits for requests, forms one batch and runs it."""
    loop = asyncio.get_running_loop()
    if not self._queue:
      self._wakeup.clear()
      await self._wakeup.wait()
      return
    deadline = self._queue[0].arrived + self.max_wait_s
    while self._queued_rows < self.max_rows:
      remaining = deadline - loop.time()
      if remaining <= 0:
        break
      self._wakeup.clear()
      try:
        await asyncio.wait_for(self._wakeup.wait(), remaining)
      except asyncio.TimeoutError:
        break
    batch = self._take_batch()
    if not batch:
      return
    start = loop.time()
    for p in batch:
      self.metrics.queue_seconds.observe(start - p.arrived, self.name)
    t0 = time.perf_counter()
    try:
      results = await loop.run_in_executor(self._executor, self._run, [p.payload for p in batch])
    except Exception as e:  # pylint: disable=broad-except
      log.exception('batch of %d %s requests failed', len(batch), self.name)
      for p in batch:
        if not p.future.done():
          p.future.set_exception(e)
      return
    self.metrics.batch_seconds.observe(time.perf_counter() - t0, self.name)
    self.metrics.batch_requests.observe(len(batch), self.name)
    self.metrics.batch_rows.observe(sum(p.rows for p in batch), self.name)
    for p, r in zip(batch, results):
      if not p.future.done():
        p.future.set_result(r)
