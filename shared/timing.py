"""Measuring compute the same way on the device and in the service: timed runs, summarized."""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = ["interleaved_ms", "low_quantile", "median_ms", "no_waits", "runqueue_waits_ms"]

Waits = Callable[[], Mapping[int, float]]


def median_ms(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    The median, not the mean: one page fault or scheduler hiccup shouldn't move a profile.

        >>> ms = median_ms(lambda: sum(range(1000)), repeats=3)  # ~0.01 ms on this project's CPUs
        >>> 0.0 <= ms < 1e3  # a timing, not a figure to assert
        True
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def low_quantile(samples: Sequence[float], q: float = 0.2) -> float:
    """The ``q`` quantile of ``samples``, interpolated linearly between order statistics.

    A low quantile, not the median: on a shared CPU a run can only be slowed down, never sped
    up, so the fast runs are the ones that measured the work; the minimum alone is one lucky run.

        >>> low_quantile([10.0, 11.0, 12.0, 50.0, 90.0])
        10.8
    """
    if not samples:
        raise ValueError("no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def runqueue_waits_ms() -> dict[int, float]:
    """Per thread of this process, how long it has waited on a run queue, runnable while another
    thread (of any process) held the CPU (Linux ``/proc/self/task/*/schedstat``, second field),
    in ms. Empty where there is no such file."""
    waits: dict[int, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return waits
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                waits[int(tid)] = int(f.read().split()[1]) / 1e6
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended in between, or a kernel without schedstats
    return waits


def no_waits() -> dict[int, float]:
    """For ``interleaved_ms(waits=...)``: count every millisecond of wall time."""
    return {}


def interleaved_ms(fns: Mapping[str, Callable[[], object]], *, repeats: int,
                   clock: Callable[[], float] = time.perf_counter,
                   waits: Waits = runqueue_waits_ms) -> dict[str, list[float]]:
    """Times in ms of every ``fn``, ``repeats`` each, taken round-robin: one run of each per
    round. A burst of load then slows one run of every function, not every run of one, so the
    figures stay comparable with each other.

    Each run's wall time is less the time the calling thread sat on a run queue, runnable but
    not running, as ``waits()`` reports it: what the run costs this device, not what the
    neighbours took from it. Only the caller's own wait counts: it does the work (torch and ONNX
    Runtime both compute on the calling thread too), while the process's other threads (a
    progress bar's, an idle pool's) may wait on the caller itself, and subtracting their waits
    once took a whole run to 0 ms. ``waits=no_waits`` counts plain wall time.

        >>> times = interleaved_ms({"a": lambda: None, "b": lambda: None}, repeats=3)
        >>> sorted(times), [len(v) for v in times.values()]
        (['a', 'b'], [3, 3])
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    me = threading.get_native_id()
    for _ in range(repeats):
        for name, fn in fns.items():
            before = waits()
            start = clock()
            fn()
            wall_ms = (clock() - start) * 1e3
            after = waits()
            stolen_ms = after.get(me, 0.0) - before.get(me, 0.0) if me in before else 0.0
            samples[name].append(max(wall_ms - stolen_ms, 0.0))
    return samples
