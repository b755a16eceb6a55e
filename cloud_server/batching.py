"""Dynamic batching: requests for the same tail are stacked into one forward pass.

One scheduler task and one compute thread serve every (model, split) key. The scheduler takes the
key whose oldest request has waited longest, waits up to ``max_queue_delay_ms`` for the batch to
fill (Triton's ``max_queue_delay``, Ray Serve's ``batch_wait_timeout_s``), then runs it off the
event loop. One compute thread, not a pool: torch already spreads one forward pass over every
core, and two passes at once would only fight for them.

The fill wait ends early when ``incoming()`` (requests whose bodies are still being read and
decoded) is zero: only those can join the batch before the delay is over, since a request that
arrives later still has its body and decode ahead of it. So a lone request on an idle service
runs at once instead of waiting ``max_queue_delay_ms`` for company that cannot come; under load,
batches form as before, from what queues while the compute thread is busy and from requests
caught mid-decode.

The queue is bounded: past ``max_queue`` waiting requests, ``submit`` raises ``OverloadedError``
at once (the service answers 503 with ``Retry-After``) instead of letting requests time out.
Requests whose deadline passes while queued are dropped before compute.

``wait_ms()`` is what a request sent now would wait, for the answers' ``load``: the compute
thread's remaining time on the batch in flight, plus the work queued ahead of it (queued rows x
each key's recent compute ms per row: one thread drains every key's queue), plus the rows its own
forward pass will carry after it (the key's recent mean batch size, less the rows already queued
for it): a request in a batch of 16 waits for all 16 rows, while the planner's ``server_ms``
counts one. That mean decays towards 1 once the key stops running (half-life
``ROWS_HALF_LIFE_S``): a key nobody sends to any more runs its next request alone, and a
batch size of 16 kept from a burst would tell every device to stay away from the key for good,
so that nothing ever ran to correct it (``bench fleet`` saw it: after 128 devices on ``cloud``,
no auto device came back to ``cloud``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from shared.errors import DeadlineExceededError, OverloadedError

__all__ = ["BatchResult", "Batcher", "Wait"]

_LOAD_ALPHA = 0.2  # EWMA of compute ms per row and of batch size, per key
ROWS_HALF_LIFE_S = 1.0  # a key's mean batch size, past its last batch, decays towards 1

RunFn = Callable[[Hashable, tuple[torch.Tensor, ...]], torch.Tensor]
BatchHook = Callable[[Hashable, int, float], None]  # key, batch size, compute seconds


@dataclass(frozen=True)
class BatchResult:
    """One request's rows of a batch output, with what it cost."""

    output: torch.Tensor
    queue_ms: float
    compute_ms: float
    batch_size: int  # requests in the forward pass that answered this one
    batch_rows: int = 1  # rows in that forward pass (a request may carry several)


@dataclass(frozen=True)
class Wait:
    """``wait_ms()``: the wait shared by every key, and each key's own extra on top of it."""

    shared_ms: float
    extra_ms: dict[Hashable, float]
    queued: int


@dataclass
class _Pending:
    inputs: tuple[torch.Tensor, ...]
    rows: int
    future: asyncio.Future[BatchResult]
    enqueued: float
    deadline: float


class Batcher:
    """Queue, batch and run requests; see the module docstring.

    In a coroutine, with ``run(key, inputs)`` the batched forward pass and ``incoming()`` the
    number of requests still being decoded (see the module docstring)::

        batcher = Batcher(run, max_batch_size=16, max_queue_delay_ms=2, max_queue=256,
                          incoming=lambda: decoding)
        await batcher.start()
        result = await batcher.submit(("resnet18", "layer3.0"), (activation,), timeout_s=5)
    """

    def __init__(self, run: RunFn, *, max_batch_size: int, max_queue_delay_ms: float,
                 max_queue: int, on_batch: BatchHook | None = None,
                 incoming: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_ms < 0:
            raise ValueError("batch size and queue bound must be >= 1, delay >= 0")
        self._run = run
        self._max_rows = max_batch_size
        self._delay_s = max_queue_delay_ms / 1e3
        self._max_queue = max_queue
        self._on_batch = on_batch
        self._incoming = incoming  # None: always wait the full delay for a batch to fill
        self._queues: dict[Hashable, deque[_Pending]] = {}
        self._depth = 0
        self._changed = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._task: asyncio.Task[None] | None = None
        self._row_ms: dict[Hashable, float] = {}  # EWMA compute ms per row, per key
        self._batch_rows: dict[Hashable, float] = {}  # EWMA rows per forward pass, per key
        self._batch_at: dict[Hashable, float] = {}  # when each key's last batch ended (clock)
        self._clock = clock  # for the batch size's decay only
        self._busy_until = 0.0  # perf_counter when the batch in flight should end

    @property
    def depth(self) -> int:
        """Requests waiting, not yet in a forward pass."""
        return self._depth

    def wait_ms(self, row_ms: Callable[[Hashable], float | None] = lambda key: None) -> Wait:
        """What a request queued now would wait (see the module docstring). ``row_ms(key)``
        is the fallback cost of a row of a key that has not run yet (its profiled figure)."""
        now = time.perf_counter()
        shared_ms = max(0.0, self._busy_until - now) * 1e3
        if self._task is not None and self._depth and not self._busy_until > now and (
                self._incoming is None or self._incoming() > 0):
            shared_ms += self._delay_s * 1e3  # idle: the batch waits to fill
        queued: dict[Hashable, int] = {}
        for key, queue in self._queues.items():
            queued[key] = sum(p.rows for p in queue)
            shared_ms += queued[key] * (self._row_ms.get(key) or row_ms(key) or 0.0)
        at = self._clock()
        extra = {key: max(0.0, self._rows_now(key, rows, at) - 1 - queued.get(key, 0))
                 * self._row_ms[key] for key, rows in self._batch_rows.items()}
        return Wait(shared_ms, extra, self._depth)

    def _rows_now(self, key: Hashable, rows: float, at: float) -> float:
        """The key's mean batch size as of ``at``: decayed towards 1 since its last batch."""
        idle_s = max(0.0, at - self._batch_at.get(key, at))
        decay: float = 0.5 ** (idle_s / ROWS_HALF_LIFE_S)
        return 1.0 + (rows - 1.0) * decay

    def retry_after_s(self) -> float:
        """A refused request's ``Retry-After``: the time to drain what is queued now (at least
        1 s, and at least ten fill delays, as before)."""
        return max(1.0, self._delay_s * 10, self.wait_ms().shared_ms / 1e3)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._schedule(), name="batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop. Called after the server stopped taking requests."""
        while self._depth and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, key: Hashable, inputs: tuple[torch.Tensor, ...], *,
                     timeout_s: float) -> BatchResult:
        """Queue ``inputs`` (batch dimension first) for ``key`` and wait for its rows."""
        if self._depth >= self._max_queue:
            raise OverloadedError(f"queue full ({self._max_queue} requests waiting)",
                                  retry_after_s=self.retry_after_s())
        now = time.perf_counter()
        item = _Pending(inputs, int(inputs[0].shape[0]), asyncio.get_running_loop().create_future(),
                        now, now + timeout_s)
        self._queues.setdefault(key, deque()).append(item)
        self._depth += 1
        self._changed.set()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout_s)
        except TimeoutError as exc:
            raise DeadlineExceededError(f"no answer within {timeout_s:.3g} s") from exc
        finally:
            if not item.future.done():
                item.future.cancel()  # the scheduler skips it; its queue slot frees on dequeue

    async def _schedule(self) -> None:
        while True:
            key = self._oldest_key()
            if key is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            await self._fill(key)
            batch = self._take(key)
            if batch:
                await self._execute(key, batch)

    def _oldest_key(self) -> Hashable | None:
        best, best_t = None, float("inf")
        for key, queue in self._queues.items():
            if queue and queue[0].enqueued < best_t:
                best, best_t = key, queue[0].enqueued
        return best

    async def _fill(self, key: Hashable) -> None:
        """Wait until the batch for ``key`` is full or its oldest request waited long enough."""
        queue = self._queues[key]
        until = queue[0].enqueued + self._delay_s
        while sum(p.rows for p in queue) < self._max_rows:
            if self._incoming is not None and self._incoming() <= 0:
                return  # nothing on its way could join in time
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return

    def _take(self, key: Hashable) -> list[_Pending]:
        queue = self._queues[key]
        batch: list[_Pending] = []
        rows = 0
        now = time.perf_counter()
        while queue and (not batch or rows + queue[0].rows <= self._max_rows):
            item = queue.popleft()
            self._depth -= 1
            if item.future.done():  # the caller gave up (deadline, disconnect)
                continue
            if now > item.deadline:
                item.future.set_exception(DeadlineExceededError("deadline passed in the queue"))
                continue
            batch.append(item)
            rows += item.rows
        if not queue:
            del self._queues[key]
        return batch

    async def _execute(self, key: Hashable, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        rows = sum(p.rows for p in batch)
        if key in self._row_ms:
            self._busy_until = start + self._row_ms[key] * rows / 1e3
        inputs = tuple(torch.cat(parts) if len(parts) > 1 else parts[0]
                       for parts in zip(*(p.inputs for p in batch), strict=True))
        loop = asyncio.get_running_loop()
        try:
            output = await loop.run_in_executor(self._executor, self._run, key, inputs)
        except Exception as exc:  # a failing model must fail its requests, not the scheduler
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        compute_s = time.perf_counter() - start
        self._busy_until = 0.0
        self._learn(key, rows, compute_s * 1e3)
        if self._on_batch is not None:
            self._on_batch(key, len(batch), compute_s)
        offset = 0
        for item in batch:
            part = output[offset:offset + item.rows]
            offset += item.rows
            if not item.future.done():
                item.future.set_result(BatchResult(
                    part, (start - item.enqueued) * 1e3, compute_s * 1e3, len(batch), rows))

    def _learn(self, key: Hashable, rows: int, compute_ms: float) -> None:
        per_row_ms = compute_ms / max(rows, 1)
        old_ms, old_rows = self._row_ms.get(key), self._batch_rows.get(key)
        if old_rows is not None:  # what it had decayed to: the batches of a past burst are over
            old_rows = self._rows_now(key, old_rows, self._clock())
        self._row_ms[key] = per_row_ms if old_ms is None else old_ms + _LOAD_ALPHA * (
            per_row_ms - old_ms)
        self._batch_rows[key] = rows if old_rows is None else old_rows + _LOAD_ALPHA * (
            rows - old_rows)
        self._batch_at[key] = self._clock()
