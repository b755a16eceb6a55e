"""A circuit breaker: after repeated failures, stop asking the service for a while.

    closed ──(failure_threshold failures in a row)──> open ──(cooldown_s)──> half-open
      ^                                                 ^                      │
      └────────────── success ──────────────────────────┴──── failure ─────────┘

While open, the device doesn't wait on a dead service at every image: it runs locally at once.
After the cool-down one request is let through (half-open); its outcome closes or re-opens the
circuit, and each re-opening doubles the cool-down up to ``max_cooldown_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

__all__ = ["CircuitBreaker", "State"]

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """``allow()`` before a request; ``record_success()`` or ``record_failure()`` after it.

        >>> breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5.0)
        >>> breaker.allow()
        True
        >>> for _ in range(3):
        ...     breaker.record_failure()
        >>> breaker.allow()  # open: requests fail fast until the cool-down ends
        False
    """

    def __init__(self, *, failure_threshold: int = 3, cooldown_s: float = 5.0,
                 max_cooldown_s: float = 60.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        if failure_threshold < 1 or cooldown_s <= 0 or max_cooldown_s < cooldown_s:
            raise ValueError("need failure_threshold >= 1 and 0 < cooldown_s <= max_cooldown_s")
        self.failure_threshold = failure_threshold
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._trial_in_flight or self._clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """Whether to try the service now. In half-open state, only one trial at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_in_flight = False
        self.cooldown_s = self.base_cooldown_s

    def record_failure(self) -> None:
        if self._trial_in_flight:  # the trial failed: open again, for longer
            self._trial_in_flight = False
            self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
            self._opened_at = self._clock()
            return
        self._failures += 1
        if self._failures >= self.failure_threshold and self._opened_at is None:
            self._opened_at = self._clock()

    def abandon_trial(self) -> None:
        """Give the half-open trial back when the request never reached the service."""
        self._trial_in_flight = False

    def seconds_until_retry(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))
