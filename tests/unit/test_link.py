"""Tests for device_client.link: the estimator on synthetic timings, and probe() on a fake."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_client.link import MAX_BPS, LinkEstimator, probe
from shared.errors import ServiceUnavailableError
from shared.planner import HTTP_OVERHEAD_BYTES, LinkEstimate

KIB = 1024
SERVER_MS = 5.0  # what the service reports; the estimator must subtract it


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def network_ms(payload_bytes: int, rtt_ms: float, bps: float) -> float:
    return rtt_ms + (payload_bytes + HTTP_OVERHEAD_BYTES) * 8 / bps * 1e3


class Link:
    """A synthetic link feeding an estimator: each request advances the clock by ``dt_s``."""

    def __init__(
        self, rtt_ms: float, bps: float, *, jitter: float = 0.0, seed: int = 0, window: int = 16
    ) -> None:
        self.rtt_ms, self.bps, self.jitter = rtt_ms, bps, jitter
        self.clock = Clock()
        self.estimator = LinkEstimator(window=window, clock=self.clock)
        self._rng = random.Random(seed)

    def send(
        self, payload_bytes: int, *, slowdown: float = 1.0, dt_s: float = 0.5, probe: bool = False
    ) -> None:
        self.clock.now += dt_s
        net_ms = network_ms(payload_bytes, self.rtt_ms, self.bps) * slowdown
        # Delay noise is one-sided: queueing only ever adds (mean: `jitter` of the RTT).
        if self.jitter:
            net_ms += self._rng.expovariate(1 / (self.jitter * self.rtt_ms))
        self.estimator.observe(payload_bytes, net_ms + SERVER_MS, SERVER_MS, probe=probe)

    def probe(self) -> None:
        for size in (64, 64 * KIB, 64, 64 * KIB):
            self.send(size, probe=True)

    def estimate(self) -> LinkEstimate:
        estimate = self.estimator.estimate()
        assert estimate is not None
        return estimate


def assert_close(estimate: LinkEstimate, rtt_ms: float, bps: float, rel: float) -> None:
    assert estimate.uplink_bps == pytest.approx(bps, rel=rel)
    assert estimate.rtt_ms == pytest.approx(rtt_ms, rel=rel)


LINKS = [
    pytest.param(2.0, 100e6, id="lan-2ms-100M"),
    pytest.param(20.0, 30e6, id="cable-20ms-30M"),
    pytest.param(40.0, 8e6, id="dsl-40ms-8M"),
    pytest.param(150.0, 1.6e6, id="3g-150ms-1.6M"),
    pytest.param(600.0, 0.25e6, id="sat-600ms-250k"),
]


# --- recovering a known link ---------------------------------------------------------------------


@pytest.mark.parametrize(("rtt_ms", "bps"), LINKS)
def test_recovers_rtt_and_bandwidth(rtt_ms: float, bps: float) -> None:
    # 1 % of the RTT of queueing jitter, on average. At 30 Mbit/s a 10 KB body takes 2.8 ms, so
    # 2 % jitter (0.4 ms) is already ~15 % of a sample's serialization delay: see the next test.
    link = Link(rtt_ms, bps, jitter=0.01)
    link.probe()
    assert_close(link.estimate(), rtt_ms, bps, rel=0.10)
    assert link.estimate().source == "probe"
    for i in range(20):  # then inference traffic: JPEGs and activations of 10-25 KB
        link.send(10_000 + 750 * i)
        assert_close(link.estimate(), rtt_ms, bps, rel=0.10)
    assert link.estimate().source == "measured"


@pytest.mark.parametrize("seed", range(5))
def test_jitter_biases_bandwidth_low_but_not_the_latency_it_predicts(seed: int) -> None:
    # Jitter adds delay to every large sample but hardly to the RTT (a lower median), so the
    # bandwidth reads low. The latency predicted for the sizes actually sent stays right.
    link = Link(20.0, 30e6, jitter=0.05, seed=seed)
    link.probe()
    for _ in range(10):
        link.send(20_000)
    estimate = link.estimate()
    assert 0.6 * 30e6 < estimate.uplink_bps <= 1.02 * 30e6
    predicted_ms = network_ms(20_000, estimate.rtt_ms, estimate.uplink_bps)
    assert predicted_ms == pytest.approx(network_ms(20_000, 20.0, 30e6) + 0.05 * 20, rel=0.05)


@pytest.mark.parametrize(("rtt_ms", "bps"), LINKS)
def test_theil_sen_without_small_samples(rtt_ms: float, bps: float) -> None:
    link = Link(rtt_ms, bps, jitter=0.02)
    for i in range(12):
        link.send((8 * KIB, 32 * KIB, 128 * KIB)[i % 3])
    assert_close(link.estimate(), rtt_ms, bps, rel=0.10)


@given(rtt_ms=st.floats(0.5, 1_000.0), bps=st.floats(1e5, 1e9))
def test_noise_free_probe_is_exact_or_too_fast_to_time(rtt_ms: float, bps: float) -> None:
    link = Link(rtt_ms, bps)
    link.probe()
    estimate = link.estimate()
    excess_ms = network_ms(64 * KIB, rtt_ms, bps) - network_ms(64, rtt_ms, bps)
    if excess_ms > 2 * max(0.2, 0.05 * rtt_ms):
        assert_close(estimate, rtt_ms, bps, rel=0.01)
    else:  # serialization hides in the RTT: a lower bound, off by at most the floor
        assert estimate.uplink_bps <= bps * 1.01
        floor_ms = max(0.2, 0.05 * estimate.rtt_ms)
        predicted_ms = network_ms(64 * KIB, estimate.rtt_ms, estimate.uplink_bps)
        assert predicted_ms <= network_ms(64 * KIB, rtt_ms, bps) + floor_ms * 1.01
        assert estimate.rtt_ms == pytest.approx(rtt_ms, rel=0.05)


# --- robustness ----------------------------------------------------------------------------------


def test_a_bandwidth_drop_asks_for_a_probe_within_two_samples() -> None:
    link = Link(40.0, 30e6)
    link.probe()
    for _ in range(20):
        link.send(20_000)
    assert link.estimate().uplink_bps == pytest.approx(30e6, rel=0.10)
    link.bps = 1.6e6
    link.send(20_000)
    assert not link.estimator.needs_probe()  # one surprise may be an outlier
    link.send(20_000)
    assert link.estimator.needs_probe() and link.estimator.changes == 1
    link.probe()
    assert_close(link.estimate(), 40.0, 1.6e6, rel=0.10)


def test_wifi_to_3g_forgets_the_old_rtt() -> None:
    # Only large traffic after the change: without forgetting, the Wi-Fi RTT (10 ms) would stay
    # and the 3G RTT would be read as a very slow uplink.
    link = Link(10.0, 30e6)
    link.probe()
    for _ in range(20):
        link.send(20_000, dt_s=0.05)
    link.rtt_ms, link.bps = 150.0, 1.6e6
    for _ in range(2):
        link.send(20_000, dt_s=0.05)
    assert link.estimator.needs_probe()
    link.probe()
    assert_close(link.estimate(), 150.0, 1.6e6, rel=0.10)


def test_a_faster_link_is_noticed_too() -> None:
    link = Link(150.0, 1.6e6)
    link.probe()
    for _ in range(5):
        link.send(20_000)
    link.rtt_ms, link.bps = 10.0, 30e6
    for _ in range(2):
        link.send(20_000)
    assert link.estimator.needs_probe()


@pytest.mark.parametrize("rtt_ms", [2.0, 40.0, 150.0], ids=lambda r: f"rtt-{r:g}")
def test_jitter_is_not_a_link_change(rtt_ms: float) -> None:
    link = Link(rtt_ms, 8e6, jitter=0.2, seed=3)
    link.probe()
    for _ in range(60):
        link.send(20_000, dt_s=0.2)
    assert link.estimator.changes == 0


def test_after_a_probe_timed_out_the_next_one_is_small() -> None:
    link = Link(2.0, 500e6)
    link.probe()
    assert link.estimator.probe_sizes()[1] == 1024 * KIB  # a 500 Mbit/s link: the cap
    link.estimator.probe_failed = True  # e.g. the device moved to 3G: 1 MiB takes 5 s there
    assert link.estimator.probe_sizes()[1] == 16 * KIB


@pytest.mark.parametrize("size", [20_000, 64], ids=["large-outlier", "small-outlier"])
@pytest.mark.parametrize("at", [0, 1, 2, 5], ids=lambda at: f"after-{at}")
def test_one_slow_outlier_is_ignored(size: int, at: int) -> None:
    link = Link(40.0, 8e6, jitter=0.02)
    link.probe()
    for i in range(12):
        link.send(size, slowdown=10.0) if i == at else link.send(20_000)
        if i >= at:
            assert_close(link.estimate(), 40.0, 8e6, rel=0.20)


@pytest.mark.parametrize(
    ("payload_bytes", "round_trip_ms", "server_ms"),
    [
        pytest.param(20_000, math.nan, 1.0, id="nan-round-trip"),
        pytest.param(20_000, math.inf, 1.0, id="inf-round-trip"),
        pytest.param(20_000, 90.0, math.nan, id="nan-server"),
        pytest.param(20_000, -5.0, 0.0, id="negative-round-trip"),
        pytest.param(20_000, 90.0, -1.0, id="negative-server"),
        pytest.param(20_000, 10.0, 50.0, id="server-longer-than-round-trip"),
        pytest.param(-1, 90.0, 1.0, id="negative-size"),
        pytest.param(True, 90.0, 1.0, id="bool-size"),
        pytest.param(20_000.5, 90.0, 1.0, id="float-size"),
        pytest.param(20_000, "90", 1.0, id="str-round-trip"),
        pytest.param(20_000, None, 1.0, id="none-round-trip"),
    ],
)
def test_garbage_is_ignored(payload_bytes: Any, round_trip_ms: Any, server_ms: Any) -> None:
    link = Link(40.0, 8e6)
    link.probe()
    before = link.estimate()
    for _ in range(5):
        link.estimator.observe(payload_bytes, round_trip_ms, server_ms)
    assert link.estimate() == before
    assert link.estimator.rejected == 5


# --- not enough data -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param((), id="nothing"),
        pytest.param((64, 64, 64), id="only-small"),
        pytest.param((20_000,) * 8, id="only-one-large-size"),
        pytest.param((12_000, 20_000, 30_000), id="sizes-too-close"),
    ],
)
def test_none_when_rtt_and_bandwidth_cannot_be_separated(sizes: tuple[int, ...]) -> None:
    link = Link(40.0, 8e6)
    for size in sizes:
        link.send(size)
    assert link.estimator.estimate() is None
    assert link.estimator.needs_probe()


def test_stale_samples_drop_out() -> None:
    link = Link(40.0, 8e6)
    link.probe()
    assert not link.estimator.needs_probe()
    link.clock.now += 29.0
    assert not link.estimator.needs_probe()
    link.clock.now += 2.0  # the newest sample is now 31 s old
    assert link.estimator.estimate() is None
    assert link.estimator.needs_probe()


def test_steady_traffic_keeps_the_probed_rtt_for_rtt_max_age_s() -> None:
    """Inference bodies are all large and alike, so they can't tell RTT from bandwidth: the
    probe's RTT carries them, without a probe on a request's path every 30 s, for 5 minutes."""
    link = Link(40.0, 8e6)
    link.probe()
    for _ in range(590):  # 295 s of inference traffic, all the same size
        link.send(20_000)
    assert_close(link.estimate(), 40.0, 8e6, rel=1e-3)
    for _ in range(12):
        link.send(20_000)
    assert link.estimator.needs_probe()  # the probe's small samples are 301 s old


def test_an_old_rtt_does_not_survive_a_link_change() -> None:
    link = Link(10.0, 30e6)
    link.probe()
    for _ in range(100):  # 50 s of steady traffic: the probe's RTT is still in use
        link.send(20_000)
    assert link.estimate().rtt_ms == pytest.approx(10.0, rel=1e-3)
    link.rtt_ms, link.bps = 150.0, 1.6e6
    link.send(20_000)
    link.send(20_000)
    assert link.estimator.needs_probe()  # the change detector dropped the old RTT with the rest


def test_window_must_hold_a_sample() -> None:
    with pytest.raises(ValueError):
        LinkEstimator(window=0)
    with pytest.raises(ValueError):
        LinkEstimator(max_age_s=0.0)
    with pytest.raises(ValueError):
        LinkEstimator(max_age_s=60.0, rtt_max_age_s=30.0)


# --- probe sizes and probe() ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bps", "large"),
    [
        pytest.param(None, 64 * KIB, id="no-estimate"),
        pytest.param(1.6e6, 40_000, id="200ms-at-1.6M"),
        pytest.param(0.2e6, 16 * KIB, id="floor"),
        pytest.param(100e6, 1024 * KIB, id="cap"),
    ],
)
def test_probe_sizes(bps: float | None, large: int) -> None:
    link = Link(40.0, bps or 1.0)
    if bps is not None:
        link.probe()
        link.clock.now += 60.0  # stale estimates still size the next probe
        assert link.estimator.estimate() is None
    small_bytes, large_bytes = link.estimator.probe_sizes()
    assert small_bytes <= 2 * KIB
    assert large_bytes == pytest.approx(large, rel=0.05)


class FakeClient:
    """Answers probe() like the service would over a 40 ms, 8 Mbit/s link."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    async def probe(self, model: str, payload: bytes) -> tuple[float, float]:
        self.calls.append((model, len(payload)))
        if self.fail:
            raise ServiceUnavailableError("cannot reach the service", reason="connection")
        return network_ms(len(payload), 40.0, 8e6) + 0.3, 0.3


def test_probe_feeds_the_estimator() -> None:
    client, estimator = FakeClient(), LinkEstimator()
    estimate = asyncio.run(probe(client, "efficientnet_lite0", estimator))
    assert client.calls == [("efficientnet_lite0", n) for n in (64, 64 * KIB, 64, 64 * KIB)]
    assert estimate is not None and estimate.source == "probe"
    assert_close(estimate, 40.0, 8e6, rel=0.01)
    assert estimator.estimate() == estimate


def test_probe_errors_propagate() -> None:
    estimator = LinkEstimator()
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(probe(FakeClient(fail=True), "efficientnet_lite0", estimator))
    assert estimator.needs_probe()


def test_estimates_never_exceed_max_bps() -> None:
    link = Link(40.0, 1e12)  # faster than anything a device has
    link.probe()
    assert link.estimate().uplink_bps <= MAX_BPS


def test_a_link_too_fast_to_time_reads_as_a_lower_bound_not_max_bps() -> None:
    # The LAN benchmark: 500 Mbit/s, ~5 ms of RTT as the device sees it, 20 KB JPEGs whose
    # 0.3 ms of serialization hides in 1 ms of jitter.
    link = Link(5.0, 500e6, jitter=0.2, seed=1)
    link.probe()
    for _ in range(10):
        link.send(20_000)
    estimate = link.estimate()
    assert estimate.uplink_bps < 2e9  # never the 10 Gbit/s cap
    # A 155 KB activation is not predicted as free to send: at least its time at 500 Mbit/s
    # within a factor of 2 either way.
    sent_ms = network_ms(155_000, 0.0, estimate.uplink_bps)
    assert network_ms(155_000, 0.0, 500e6) / 2 <= sent_ms <= network_ms(155_000, 0.0, 500e6) * 8


def test_a_slow_probe_rtt_is_capped_by_faster_requests() -> None:
    link = Link(5.0, 500e6)
    link.rtt_ms = 20.0  # the probe's small uploads were slow (a busy device)
    link.probe()
    link.rtt_ms = 5.0
    for _ in range(5):
        link.send(20_000)
    assert link.estimate().rtt_ms <= network_ms(20_000, 5.0, 500e6) + 1e-6
