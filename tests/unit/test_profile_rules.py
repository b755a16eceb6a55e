"""The pure rules behind a trustworthy profile: quantiles, interleaving, monotone heads, and when
live runs contradict a profiled figure."""

from __future__ import annotations

import threading

import pytest

from device_client.profile_rules import (
    candidate_ms,
    contradicted,
    live_ratio,
    monotone_heads,
    pin_head,
)
from shared.timing import interleaved_ms, low_quantile, no_waits


@pytest.mark.parametrize(("samples", "q", "expected"), [
    ([5.0], 0.2, 5.0),
    ([10.0, 11.0, 12.0, 50.0, 90.0], 0.0, 10.0),
    ([10.0, 11.0, 12.0, 50.0, 90.0], 0.2, 10.8),
    ([90.0, 50.0, 12.0, 11.0, 10.0], 0.5, 12.0),  # order of the runs does not matter
    ([1.0, 2.0], 1.0, 2.0),
], ids=["one", "min", "p20", "unsorted-median", "max"])
def test_low_quantile(samples: list[float], q: float, expected: float) -> None:
    assert low_quantile(samples, q) == pytest.approx(expected)


def test_low_quantile_ignores_a_few_slow_runs_the_median_would_not() -> None:
    busy = [10.0, 10.5, 30.0, 40.0, 60.0]  # three runs of five slowed by another process
    assert low_quantile(busy) < 11.0


@pytest.mark.parametrize(("samples", "q"), [([], 0.2), ([1.0], -0.1), ([1.0], 1.5)],
                         ids=["empty", "negative", "above-one"])
def test_low_quantile_rejects_nonsense(samples: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        low_quantile(samples, q)


def test_time_the_caller_waited_for_the_cpu_is_left_out() -> None:
    me, other = threading.get_native_id(), -1
    ticks = iter(range(0, 1000, 10))  # every run takes 10 ms of wall time
    waited = iter([{me: 0.0, other: 0.0}, {me: 6.0, other: 9.0},  # we waited 6 ms: the run cost 4
                   {other: 0.0}, {me: 50.0, other: 9.0}])  # our thread unseen before: no figure
    samples = interleaved_ms({"a": lambda: None}, repeats=2,
                             clock=lambda: float(next(ticks)) / 1e3, waits=lambda: next(waited))
    assert samples["a"] == pytest.approx([4.0, 10.0])


def test_other_threads_waiting_on_the_caller_are_not_subtracted() -> None:
    """A progress bar's thread waits while the caller computes; that is not time stolen."""
    me, bar = threading.get_native_id(), -1
    ticks = iter(range(0, 1000, 10))
    waited = iter([{me: 0.0, bar: 0.0}, {me: 0.0, bar: 10.0}])
    samples = interleaved_ms({"a": lambda: None}, repeats=1,
                             clock=lambda: float(next(ticks)) / 1e3, waits=lambda: next(waited))
    assert samples["a"] == pytest.approx([10.0])


def test_interleaved_runs_round_robin_and_times_each_call() -> None:
    calls: list[str] = []
    ticks = iter(range(1000))
    fns = {name: (lambda name=name: calls.append(name)) for name in ("device", "a", "b")}
    samples = interleaved_ms(fns, repeats=3, clock=lambda: float(next(ticks)) / 1e3,
                             waits=no_waits)
    assert calls == ["device", "a", "b"] * 3  # one of each per round, not all of one first
    assert sorted(samples) == ["a", "b", "device"]
    assert all(ms == pytest.approx([1.0] * 3) for ms in samples.values())
    with pytest.raises(ValueError):
        interleaved_ms(fns, repeats=0)


@pytest.mark.parametrize(("heads", "whole", "expected"), [
    ([1.0, 2.0, 3.0], 10.0, [1.0, 2.0, 3.0]),
    # the profile: _blocks.13 at 75 ms, _blocks.14 at 7
    ([5.0, 75.0, 7.0, 9.0], 100.0, [5.0, 75.0, 75.0, 75.0]),
    # _conv_head at 304 ms while the whole model took 213
    ([5.0, 304.0, 11.0], 213.0, [5.0, 213.0, 213.0]),
    ([], 3.0, []),
], ids=["already", "dip", "above-whole", "no-points"])
def test_monotone_heads(heads: list[float], whole: float, expected: list[float]) -> None:
    out = monotone_heads(heads, whole)
    assert out == expected
    assert all(a <= b for a, b in zip(out, out[1:], strict=False))
    assert all(ms <= whole for ms in out)


def test_monotone_heads_rejects_negative_times() -> None:
    with pytest.raises(ValueError):
        monotone_heads([1.0, -2.0], 5.0)
    with pytest.raises(ValueError):
        monotone_heads([1.0], -5.0)


def test_a_pinned_head_is_trusted_and_its_neighbours_follow() -> None:
    assert pin_head([2.0, 300.0, 11.0, 12.0], 1, 8.0, 14.0) == [2.0, 8.0, 11.0, 12.0]
    assert pin_head([2.0, 5.0, 6.0, 7.0], 1, 9.0, 14.0) == [2.0, 9.0, 9.0, 9.0]
    assert pin_head([4.0, 5.0, 6.0], 0, 1.0, 14.0) == [1.0, 5.0, 6.0]
    assert pin_head([4.0, 5.0, 6.0], 2, 3.0, 14.0) == [3.0, 3.0, 3.0]
    assert pin_head([4.0, 5.0], 1, 99.0, 14.0) == [4.0, 14.0]  # never above the whole model
    with pytest.raises(ValueError):
        pin_head([1.0], 1, 1.0, 2.0)


@pytest.mark.parametrize(("ratios", "expected"), [
    ([], False),
    ([3.0, 3.0], False),  # too few runs to say
    ([3.0, 3.0, 3.0], True),
    ([0.1, 0.3, 0.45], True),
    ([3.0, 0.3, 3.0], False),  # scattered both ways: noise, not a wrong figure
    ([3.0, 1.0, 3.0], False),
    ([1.0, 1.5, 1.9, 0.6], False),  # within bounds
    ([1.0, 1.0, 2.1, 2.5, 4.0], True),  # only the last runs count
    ([2.0, 2.0, 2.0], False),  # on the bound is not beyond it
], ids=["none", "two", "three-high", "three-low", "mixed", "one-ok", "within", "recent",
        "on-bound"])
def test_contradicted(ratios: list[float], expected: bool) -> None:
    assert contradicted(ratios) is expected


def test_contradicted_takes_its_own_bounds() -> None:
    assert contradicted([1.3, 1.4], runs=2, bounds=(0.8, 1.25))
    with pytest.raises(ValueError):
        contradicted([1.0], runs=0)


def test_under_a_quota_a_candidate_costs_its_median_run_not_its_lucky_ones() -> None:
    # bench latency at 0.2 of a core: `_blocks.1` ran in 2 ms (budget left) or 10-20 ms.
    runs = [2.0, 12.0, 15.0, 2.0, 17.0, 11.0, 19.0, 2.0, 14.0, 12.0]
    assert candidate_ms(runs, quota=None, quantile=0.2) == pytest.approx(2.0)
    assert candidate_ms(runs, quota=0.2, quantile=0.2) == pytest.approx(12.0)
    with pytest.raises(ValueError):
        candidate_ms([], quota=0.2, quantile=0.2)


@pytest.mark.parametrize(("live", "predicted", "expected"), [
    (13.0, 3.7, 14.0 / 4.7),  # a short head profiled with budget left
    (1.2, 0.5, 2.2 / 1.5),  # a sub-ms encode: noise, under 2x
    (300.0, 52.0, 301.0 / 53.0),  # a long head: the floor hardly matters
], ids=["cheap-head", "sub-ms", "long-head"])
def test_live_ratio_is_taken_on_ms(live: float, predicted: float, expected: float) -> None:
    assert live_ratio(live, predicted) == pytest.approx(expected)


def test_live_ratio_refuses_negative_times() -> None:
    with pytest.raises(ValueError):
        live_ratio(-1.0, 2.0)
