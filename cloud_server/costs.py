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
  ``_relu0`` (profiled, fast), whose tails are nearly the whole model behind a 15x larger body.

So the service keeps one speed, live over profiled cost across every candidate answered, and
publishes each candidate's profile times that speed; a candidate answered lately publishes its
own live figure instead, fading back to profile x speed over ``KEY_HALF_LIFE_S`` once it stops
being sent. The speed fades to 1 over ``SPEED_HALF_LIFE_S`` without answers (nothing says the
service is slow any more).

Only a lone request (batch size 1) is a batch-1 figure: a row of a batch of 16 costs a fraction
of a lone request's compute with a multi-threaded backend, and a candidate published at that
fraction looks cheap to every device until a lone request corrects it. A batched row is a lower
bound, though (a lone row costs at least as much), so it may raise a figure and the speed, never
lower them: under a load that batches everything, the figures still follow a slower machine.

    >>> clock = [0.0]
    >>> costs = ServerCosts(clock=lambda: clock[0])
    >>> costs.set_profile({"cloud": 20.0, "early": 18.0, "late": 4.0})
    >>> for _ in range(40):  # the service runs 2x slower than at start-up, on `late` only
    ...     costs.observe("late", 8.0, alone=True)
    >>> {k: round(v, 1) for k, v in costs.figures().items()}
    {'cloud': 40.0, 'early': 36.0, 'late': 8.0}
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["KEY_HALF_LIFE_S", "SPEED_HALF_LIFE_S", "ServerCosts"]

_ALPHA = 0.2  # EWMA weight of one answer, for a key's live figure and for the speed
KEY_HALF_LIFE_S = 5.0  # a key's live figure, once not sent, fades to profile x speed
SPEED_HALF_LIFE_S = 30.0  # the speed, without answers, fades to 1 (the profile)
_SPEED_BOUNDS = (0.1, 20.0)  # one absurd answer (a stalled thread) must not rescale every key


class ServerCosts:
    """Per candidate, decode + compute of a lone request now (see the module docstring).
    Thread-safe: the loader thread profiles, the event loop observes and publishes."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._profile: dict[str, float] = {}
        self._live: dict[str, tuple[float, float]] = {}  # key: (EWMA ms, when last observed)
        self._speed, self._speed_at = 1.0, -float("inf")

    def set_profile(self, profile: Mapping[str, float]) -> None:
        """The start-up figures (decode + compute at batch 1 on a reference input)."""
        with self._lock:
            self._profile.update(profile)

    def observe(self, key: str, ms: float, *, alone: bool) -> None:
        """One answered request's decode + compute per row, ``alone`` if its forward pass held
        no other request (see the module docstring)."""
        if not ms >= 0 or ms == float("inf"):
            return
        now = self._clock()
        with self._lock:
            profiled = self._profile.get(key)
            if profiled:
                low, high = _SPEED_BOUNDS
                speed = self._speed_now(now)
                sample = min(high, max(low, ms / profiled))
                if alone or sample > speed:  # a batched row: a lower bound (module docstring)
                    self._speed, self._speed_at = speed + _ALPHA * (sample - speed), now
            old = self._live.get(key)
            if old is None:
                if alone or profiled is None:  # unprofiled: the batched row is all there is
                    self._live[key] = (ms, now)
                return
            start = self._fade(key, old, now)  # what the old figure had faded to
            if alone or ms > start:
                self._live[key] = (start + _ALPHA * (ms - start), now)

    def speed(self) -> float:
        """Live over profiled cost now, across candidates (1 at start-up)."""
        with self._lock:
            return self._speed_now(self._clock())

    def figure(self, key: str) -> float | None:
        """``key``'s figure now, or None for a key neither profiled nor answered."""
        now = self._clock()
        with self._lock:
            known = key in self._profile or key in self._live
            return self._figure(key, now) if known else None

    def figures(self) -> dict[str, float]:
        """Every known candidate's figure now, in ms."""
        now = self._clock()
        with self._lock:
            keys = sorted({*self._profile, *self._live})
            return {key: self._figure(key, now) for key in keys}

    def _figure(self, key: str, now: float) -> float:
        live = self._live.get(key)
        if live is not None:
            return self._fade(key, live, now)
        return self._profile[key] * self._speed_now(now)

    def _fade(self, key: str, live: tuple[float, float], now: float) -> float:
        ms, at = live
        profiled = self._profile.get(key)
        if profiled is None:  # never profiled (profiling off): the live figure is all there is
            return ms
        base = profiled * self._speed_now(now)
        weight: float = 0.5 ** (max(0.0, now - at) / KEY_HALF_LIFE_S)
        return base + (ms - base) * weight

    def _speed_now(self, now: float) -> float:
        weight: float = 0.5 ** (max(0.0, now - self._speed_at) / SPEED_HALF_LIFE_S)
        return 1.0 + (self._speed - 1.0) * weight
