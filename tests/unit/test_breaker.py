"""The circuit breaker on a fake clock."""

from __future__ import annotations

import pytest

from device_client.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_then_half_opens_after_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=5.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state == "closed"
    assert b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    assert b.seconds_until_retry() == pytest.approx(5.0)
    clock.now = 4.9
    assert not b.allow()
    clock.now = 5.0
    assert b.state == "half_open"
    assert b.allow()  # one trial...
    assert not b.allow()  # ...at a time
    b.record_success()
    assert b.state == "closed" and b.allow()


def test_failed_trial_reopens_for_longer() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=2.0, max_cooldown_s=5.0, clock=clock)
    b.record_failure()
    clock.now = 2.0
    assert b.allow()
    b.record_failure()
    assert b.state == "open" and b.cooldown_s == 4.0
    clock.now = 5.9
    assert not b.allow()
    clock.now = 6.0
    assert b.allow()
    b.record_failure()
    assert b.cooldown_s == 5.0  # capped
    clock.now = 11.0
    assert b.allow()
    b.record_success()
    assert b.cooldown_s == 2.0 and b.state == "closed"


def test_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(failure_threshold=2, clock=Clock())
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state == "closed"


def test_abandoned_trial_lets_the_next_request_try() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=clock)
    b.record_failure()
    clock.now = 1.0
    assert b.allow()
    b.abandon_trial()
    assert b.allow()


@pytest.mark.parametrize(
    "kwargs",
    [{"failure_threshold": 0}, {"cooldown_s": 0}, {"cooldown_s": 10, "max_cooldown_s": 5}],
    ids=["threshold", "cooldown", "max"],
)
def test_invalid_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
