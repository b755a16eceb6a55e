"""Memory the service holds for requests: a budget for images being decoded at once, and handing
free heap back to the operating system once a burst is over.

The runtime tunes glibc to keep freed memory between forward passes (``keep_freed_memory``);
that is what makes a burst fast, and also what kept 3.5 GB after one. ``IdleTrimmer`` gives the
memory back with ``malloc_trim(0)`` once no request has been in flight for ``idle_s``: during a
burst nothing changes, after it RSS falls back.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

__all__ = ["IdleTrimmer", "ImageBudget", "freeze_heap", "trim"]

log = logging.getLogger("cloud_server")


# Less free heap than this is not worth handing back: taking it back costs the next request
# page faults (measured: ~570 minor faults, +0.6 ms, on a lone /classify after a trim), and a
# device sending every 1.5 s would pay them on every request when the service trims after 1 s.
# After a burst, free heap is hundreds of MB.
TRIM_MIN_FREE_BYTES = 32 * 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def free_heap_bytes() -> int | None:
    """Free bytes in glibc's heaps, every arena (``mallinfo2().fordblks``): the most
    ``malloc_trim`` could hand back. None off glibc or before 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    mallinfo2.argtypes, mallinfo2.restype = [], _MallInfo2
    return int(mallinfo2().fordblks)


def freeze_heap() -> int:
    """After a full collection, move every object alive now out of the cyclic garbage
    collector's reach (``gc.freeze``) and return how many that is. Called once the models have
    loaded: torch, onnxruntime and the models' graphs live as long as the process, ~340k
    objects that every full (generation 2) collection otherwise walked, holding the GIL for
    ~220 ms (``python -m bench gc-pause``), so the event loop, every decode and the batcher
    stalled that long whenever one ran. Collections then walk only what requests allocate."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def trim() -> bool:
    """``malloc_trim(0)``: return free pages of every glibc arena to the OS (not just the top of
    the main heap, since glibc 2.8). False off glibc."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True


class ImageBudget:
    """Decoded bytes of the images being decoded at once, at most ``total_bytes``: a burst of
    large images waits its turn instead of every one of them allocating at the same time.

    >>> async def decode_one(budget: ImageBudget) -> int:
    ...     async with budget.reserve(3 * 2**20):  # waits while others hold too much
    ...         return budget.in_use_bytes
    >>> asyncio.run(decode_one(ImageBudget(total_bytes=2**28)))
    3145728
    """

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.in_use_bytes = 0
        self._freed = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, n_bytes: int) -> AsyncIterator[None]:
        n_bytes = min(n_bytes, self.total_bytes)  # one image over the budget is refused earlier
        async with self._freed:
            await self._freed.wait_for(lambda: self.in_use_bytes + n_bytes <= self.total_bytes)
            self.in_use_bytes += n_bytes
        try:
            yield
        finally:
            async with self._freed:
                self.in_use_bytes -= n_bytes
                self._freed.notify_all()


class IdleTrimmer:
    """Counts requests in flight (``enter``/``exit``, from the middleware) and trims the heap
    once, in a worker thread, after ``idle_s`` with none; ``idle_s <= 0`` turns it off. A quiet
    spell with less than ``min_free_bytes`` of free heap (``free_bytes()``; None: unknown,
    trim) is left alone: see ``TRIM_MIN_FREE_BYTES``."""

    def __init__(self, idle_s: float, *, min_free_bytes: int = TRIM_MIN_FREE_BYTES,
                 free_bytes: Callable[[], int | None] = free_heap_bytes) -> None:
        self.idle_s = idle_s
        self.in_flight = 0
        self.started = 0
        self.trims = 0
        self.skipped = 0  # quiet spells with too little free heap to be worth a trim
        self._min_free_bytes = min_free_bytes
        self._free_bytes = free_bytes
        self._task: asyncio.Task[None] | None = None

    def enter(self) -> None:
        self.in_flight += 1
        self.started += 1

    def exit(self) -> None:
        self.in_flight -= 1

    def start(self) -> None:
        if self.idle_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="trimmer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        quiet_s, seen, trimmed = 0.0, self.started, self.started
        step_s = min(self.idle_s, 0.25)
        while True:
            await asyncio.sleep(step_s)
            if self.in_flight or self.started != seen:
                quiet_s, seen = 0.0, self.started
                continue
            quiet_s += step_s
            if quiet_s >= self.idle_s and trimmed != seen:  # once per quiet spell
                trimmed = seen
                free = self._free_bytes()
                if free is not None and free < self._min_free_bytes:
                    self.skipped += 1
                    continue
                await asyncio.to_thread(trim)
                self.trims += 1
