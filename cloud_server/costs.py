"""What a new request for each candidate would cost the service now: the metadata's ``server_ms``.

A figure is decode + compute of one lone request (batch 1), the cost the planner adds to a
candidate; a request that joins a batch also waits for its batch-mates' rows, which the answers'
``load`` counts (``batching.py``).

Two sources, and why neither alone will do:

- The start-up profile times every candidate in one sitting, so it ranks them right, but at one
  moment: the machine's speed moves 2-3x from one minute to the next (shared cores, the
  service's own decode threads), and a figure from a quiet start-up is a stale one later.
- Live answers say what a candidate costs now, but only for the candidates being sent. Published
  beside the start-up figures of the rest, they made a slow minute look like the sent candidates'
  fault: ``bench fleet`` had auto devices on a LAN leave ``cloud`` (live, slow) for ``_bn0`` and
  ``_relu0`` (profiled, fast), whose tails are nearly the whole model behind a 10-15x larger body.

So the service learns from every answer how far it is from its profile now, and publishes each
candidate's profile moved by that; a candidate answered lately publishes its own live figure
instead, fading back over ``KEY_HALF_LIFE_S`` once it stops being sent. The two halves of a
request move differently under load, so they are learnt apart:

- compute, a speed: live compute over profiled compute, shared by every tail (one compute thread
  runs them all). Only a lone request's (batch 1): a row of a batch of 16 costs a fraction of a
  lone request's compute with a multi-threaded backend, and a figure published at that fraction
  looks cheap to every device until a lone request corrects it.
- decode, an extra in ms: live decode over profiled decode, from every request (decode is per
  request, batched or not). Under load it is mostly the wait for a worker thread and a core,
  which a 300 KB ``_bn0`` frame and a 2 KB late frame pay alike; as a ratio it made the cheap
  candidates being sent (a 4 ms tail whose decode took 4 ms) scale every figure 2-3x, and the
  published figures 1.5x what lone requests then cost.

Both fade to the profile over ``SPEED_HALF_LIFE_S`` without answers (nothing says the service is
slow any more).

    >>> clock = [0.0]
    >>> costs = ServerCosts(clock=lambda: clock[0])
    >>> costs.set_profile(decode_ms={"cloud": 2.0, "early": 1.0, "late": 0.5},
    ...                   compute_ms={"cloud": 18.0, "early": 17.0, "late": 3.5})
    >>> for _ in range(40):  # compute 2x slower than at start-up, decode 3 ms more; `late` only
    ...     costs.observe("late", decode_ms=3.5, compute_ms=7.0, alone=True)
    >>> {k: round(v, 1) for k, v in costs.figures().items()}
    {'cloud': 41.0, 'early': 38.0, 'late': 10.5}
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["KEY_HALF_LIFE_S", "SPEED_HALF_LIFE_S", "ServerCosts"]

_ALPHA = 0.2  # EWMA weight of one answer: a key's live figure, the speed, the decode extra
KEY_HALF_LIFE_S = 5.0  # a key's live figure, once not sent, fades to the moved profile
SPEED_HALF_LIFE_S = 30.0  # the speed and the decode extra, without answers, fade to the profile
_SPEED_BOUNDS = (0.1, 20.0)  # one absurd answer (a stalled thread) must not rescale every key
_EXTRA_MAX_MS = 1000.0


class ServerCosts:
    """Per candidate, decode + compute of a lone request now (see the module docstring).
    Thread-safe: the loader thread profiles, the event loop observes and publishes."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._decode: dict[str, float] = {}  # profiled, per key
        self._compute: dict[str, float] = {}
        self._live: dict[str, tuple[float, float]] = {}  # key: (EWMA ms, when last observed)
        self._speed, self._speed_at = 1.0, -math.inf
        self._extra_ms, self._extra_at = 0.0, -math.inf

    def set_profile(self, *, decode_ms: Mapping[str, float],
                    compute_ms: Mapping[str, float]) -> None:
        """The start-up figures: decode and compute of one request at batch 1, per key."""
        with self._lock:
            self._decode.update(decode_ms)
            self._compute.update(compute_ms)

    def observe(self, key: str, *, decode_ms: float, compute_ms: float, alone: bool) -> None:
        """One answered request's decode and compute, per row; ``alone`` if its forward pass
        held no other request (see the module docstring)."""
        if not all(0 <= ms < math.inf for ms in (decode_ms, compute_ms)):
            return
        now = self._clock()
        with self._lock:
            profiled = key in self._decode and key in self._compute
            if profiled:
                extra = self._fade_to_zero(self._extra_ms, self._extra_at, now)
                sample = min(_EXTRA_MAX_MS, decode_ms - self._decode[key])
                self._extra_ms, self._extra_at = extra + _ALPHA * (sample - extra), now
            if profiled and alone and self._compute[key] > 0:
                low, high = _SPEED_BOUNDS
                ratio = min(high, max(low, compute_ms / self._compute[key]))
                speed = 1.0 + self._fade_to_zero(self._speed - 1.0, self._speed_at, now)
                self._speed, self._speed_at = speed + _ALPHA * (ratio - speed), now
            if profiled and not alone:
                return  # a batched row is no lone request's cost (module docstring)
            ms = decode_ms + compute_ms
            old = self._live.get(key)
            if old is None:
                self._live[key] = (ms, now)
            else:  # from what the old figure had faded to
                start = self._fade(key, old, now)
                self._live[key] = (start + _ALPHA * (ms - start), now)

    def speed(self) -> float:
        """Live compute over profiled compute now (1 at start-up)."""
        with self._lock:
            return 1.0 + self._fade_to_zero(self._speed - 1.0, self._speed_at, self._clock())

    def decode_extra_ms(self) -> float:
        """Live decode over profiled decode now, in ms (0 at start-up)."""
        with self._lock:
            return self._fade_to_zero(self._extra_ms, self._extra_at, self._clock())

    def figure(self, key: str) -> float | None:
        """``key``'s figure now, or None for a key neither profiled nor answered."""
        now = self._clock()
        with self._lock:
            known = key in self._compute or key in self._live
            return self._figure(key, now) if known else None

    def figures(self) -> dict[str, float]:
        """Every known candidate's figure now, in ms."""
        now = self._clock()
        with self._lock:
            keys = sorted({*self._compute, *self._live})
            return {key: self._figure(key, now) for key in keys}

    def _figure(self, key: str, now: float) -> float:
        live = self._live.get(key)
        if live is not None:
            return self._fade(key, live, now)
        base = self._base(key, now)
        assert base is not None  # a key without a live figure is a profiled one
        return base

    def _base(self, key: str, now: float) -> float | None:
        """The profile moved by the speed and the decode extra now."""
        if key not in self._compute or key not in self._decode:
            return None
        speed = 1.0 + self._fade_to_zero(self._speed - 1.0, self._speed_at, now)
        extra = self._fade_to_zero(self._extra_ms, self._extra_at, now)
        return max(0.0, self._decode[key] + extra) + self._compute[key] * speed

    def _fade(self, key: str, live: tuple[float, float], now: float) -> float:
        ms, at = live
        base = self._base(key, now)
        if base is None:  # never profiled (profiling off): the live figure is all there is
            return ms
        return base + self._fade_to_zero(ms - base, at, now, KEY_HALF_LIFE_S)

    @staticmethod
    def _fade_to_zero(value: float, at: float, now: float,
                      half_life_s: float = SPEED_HALF_LIFE_S) -> float:
        weight: float = 0.5 ** (max(0.0, now - at) / half_life_s)
        return value * weight
