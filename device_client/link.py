"""The uplink and round trip time, estimated from the device's own requests to the service.

Every request answered by the service is a sample: ``network_ms = round_trip_ms - server_ms``
(the service reports its decode, queue and compute time, so only the network is left), and

    network_ms ~= rtt_ms + wire_bytes * 8 / uplink_bps * 1e3,  wire_bytes = body + HTTP headers

Algorithm (``LinkEstimator.estimate``):

1. Samples go into two windows of the last ``window`` each: *small* (body <= 2 KiB, where the
   RTT dominates) and *large*. Large samples older than ``max_age_s`` (30 s) are ignored, small
   ones older than ``rtt_max_age_s`` (5 min). Inference traffic is all large, so the RTT
   evidence comes from probes; the RTT of a path rarely moves, and when the link does change
   the change detection below drops every old sample whatever its age. Ageing small samples
   as fast as large ones cost a probe (four uploads, 0.6 s on 6 Mbit/s) on the critical path
   of a request every 30 s of steady traffic.
2. RTT: the lower median of the small samples' ``network_ms``, each minus its own serialization
   delay at the current bandwidth estimate (two fixed-point rounds; it's a small correction).
   Without small samples: the intercept of a Theil-Sen fit (median of pairwise slopes) over
   pairs whose sizes differ at least 2x, when the sizes span at least 4x. Otherwise: unknown.
   Either way the RTT is capped by the fastest recent large sample: a request's network time
   is its RTT plus its serialization, so no RTT is longer than that. A probe whose small
   uploads happened to be slow (a busy device) would otherwise inflate every prediction for
   the 5 minutes its RTT lives: on the LAN benchmark, 19.6 ms read against 5.7 ms measured.
3. Bandwidth: for each of the last 5 large samples, ``wire_bytes * 8 / (network_ms - rtt_ms)``;
   a sample whose excess over the RTT is under ``max(0.2 ms, 5 % of rtt)`` is too fast to time
   and says only that the link moves ``wire_bytes`` within that floor: it counts as
   ``wire_bytes * 8 / floor``, a lower bound. The estimate is the upper median of those 5.
   (Counting it as ``MAX_BPS`` read 10 Gbit/s off 20 KB JPEGs on a 500 Mbit/s LAN, and made a
   155 KB activation look free to send.)
4. Lower median for delays, upper median for rates: network noise (queueing, retransmits, a
   cold connection) only ever *adds* delay, so the middle value nearer the fast side is the
   typical one. A median of 5 ignores up to 2 outliers and follows a real change in 3 samples.
   The price: jitter delays large samples more than the RTT's lower median, so on a fast link
   with small bodies the bandwidth reads low (at 30 Mbit/s a 20 KB body takes 5 ms: 0.5 ms of
   jitter is 10 %). The latency it predicts for the sizes actually sent stays right.

No RTT evidence or no large sample means ``estimate()`` is None and ``needs_probe()`` is True;
``probe()`` then uploads a small and a large body, twice each, to the service's probe sink. The
estimator only ever sees the service's own answers: the client talks to its base URL, nowhere
else.

    link = LinkEstimator()
    await probe(client, "efficientnet_lite0", link)  # LinkEstimate(uplink_bps=1.6e6, ...)
    link.observe(reply.bytes_sent, reply.round_trip_ms, reply.server_ms)  # after every request
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import combinations
from typing import NamedTuple, Protocol

from shared.planner import HTTP_OVERHEAD_BYTES, LinkEstimate, serialization_ms

__all__ = ["MAX_BPS", "SMALL_BYTES", "LinkEstimator", "ProbeClient", "probe"]

SMALL_BYTES = 2 * 1024  # at or under this, a body's serialization is a small part of the RTT
MAX_BPS = 10e9  # "too fast to time": no device uplink is faster than 10 Gbit/s
PROBE_SMALL_BYTES = 64
PROBE_LARGE_BYTES = 64 * 1024  # before any estimate: 50 ms at 10 Mbit/s, 330 ms at 1.6 Mbit/s
PROBE_LARGE_RANGE = (16 * 1024, 1024 * 1024)
PROBE_TARGET_S = 0.2  # a large probe should take ~200 ms: long enough to time, short to wait
_RECENT_LARGE = 5  # bandwidth = median of this many latest large samples
_FLOOR_MS, _FLOOR_RTT_FRACTION = 0.2, 0.05
# A sample whose network time is off the estimate's prediction by this factor, and by this many
# ms, is a surprise; _CHANGE_RUN surprises in a row mean the link changed (Wi-Fi -> 3G): the old
# samples no longer describe it, so only the surprising ones are kept and the next plan probes.
_CHANGE_FACTOR, _CHANGE_FLOOR_MS, _CHANGE_RUN = 2.0, 20.0, 2


class _Sample(NamedTuple):
    wire_bytes: int
    network_ms: float
    t: float
    probe: bool


class LinkEstimator:
    """Robust running estimate of the uplink and RTT. Not thread-safe: one per device loop.

    ``clock`` is injectable so tests can feed synthetic timings and ages.

        >>> link = LinkEstimator(clock=lambda: 0.0)
        >>> link.observe(64, 40.3, 0.1); link.observe(65_536, 380.0, 0.2)
        >>> round(link.estimate().uplink_bps / 1e6, 2)  # Mbit/s
        1.54
    """

    def __init__(
        self,
        *,
        window: int = 16,
        max_age_s: float = 30.0,
        rtt_max_age_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0 < max_age_s <= rtt_max_age_s:
            raise ValueError(
                f"need 0 < max_age_s <= rtt_max_age_s, got {max_age_s} and {rtt_max_age_s}")
        self.max_age_s = max_age_s
        self.rtt_max_age_s = rtt_max_age_s
        self.rejected = 0  # samples ignored as garbage, for diagnostics
        self._clock = clock
        self._small: deque[_Sample] = deque(maxlen=window)
        self._large: deque[_Sample] = deque(maxlen=window)
        self._surprises: list[_Sample] = []
        self.changes = 0  # link changes detected, for diagnostics
        self.probe_failed = False  # set by the caller when a probe timed out
        # estimate() runs before every request: cached until a sample arrives or one ages out
        # (~40 us of medians, ~0.2 ms of latency at 20 % of a core).
        self._cached: tuple[float, LinkEstimate | None] | None = None  # (valid until, estimate)

    def observe(
        self, payload_bytes: int, round_trip_ms: float, server_ms: float, *, probe: bool = False
    ) -> None:
        """Record one request: body size, its round trip, and the time the service reported.

        Garbage (non-finite or negative times, a server time longer than the round trip, a
        negative size) is counted in ``rejected`` and otherwise ignored.
        """
        if not (
            _is_size(payload_bytes)
            and _is_ms(round_trip_ms)
            and _is_ms(server_ms)
            and server_ms <= round_trip_ms
        ):
            self.rejected += 1
            return
        sample = _Sample(
            payload_bytes + HTTP_OVERHEAD_BYTES, round_trip_ms - server_ms, self._clock(), probe
        )
        self._surprises = [*self._surprises, sample] if self._surprising(sample) else []
        self._cached = None  # after _surprising(), which asked for the estimate before it
        if len(self._surprises) >= _CHANGE_RUN:
            kept, self._surprises = self._surprises, []
            self._small.clear()
            self._large.clear()
            self.changes += 1
            for s in kept:
                (self._small if s.wire_bytes - HTTP_OVERHEAD_BYTES <= SMALL_BYTES
                 else self._large).append(s)
            return
        (self._small if payload_bytes <= SMALL_BYTES else self._large).append(sample)

    def _surprising(self, sample: _Sample) -> bool:
        est = self.estimate()
        if est is None:
            return False
        predicted_ms = est.rtt_ms + serialization_ms(sample.wire_bytes, est.uplink_bps)
        off_ms = abs(sample.network_ms - predicted_ms)
        ratio = (sample.network_ms + 1e-3) / (predicted_ms + 1e-3)
        return off_ms > _CHANGE_FLOOR_MS and not 1 / _CHANGE_FACTOR <= ratio <= _CHANGE_FACTOR

    def estimate(self) -> LinkEstimate | None:
        """The current estimate, or None without recent data to tell RTT from bandwidth."""
        now = self._clock()
        if self._cached is not None and now < self._cached[0]:
            return self._cached[1]
        estimate = self._estimate(self.max_age_s, self.rtt_max_age_s)
        # Valid until the first sample it could have used ages out (nothing else changes it
        # without a new sample, which clears the cache).
        expiries = [s.t + self.max_age_s for s in self._large if now - s.t <= self.max_age_s]
        expiries += [s.t + self.rtt_max_age_s for s in self._small
                     if now - s.t <= self.rtt_max_age_s]
        self._cached = (min(expiries, default=math.inf), estimate)
        return estimate

    def last_estimate(self) -> LinkEstimate | None:
        """The estimate from every sample kept, however old: for sizing probes, or for planning
        when nothing is sent (the device runs everything) and a probe would cost more."""
        return self._estimate(math.inf, math.inf)

    def needs_probe(self) -> bool:
        """True when there is no usable recent estimate: call ``probe()`` before planning."""
        return self.estimate() is None

    def probe_sizes(self) -> tuple[int, int]:
        """A small and a large upload in bytes. The large one takes ~200 ms at the last known
        bandwidth (stale is fine for sizing), 64 KiB before any, within [16 KiB, 1 MiB]."""
        low, high = PROBE_LARGE_RANGE
        if self.probe_failed:  # the last probe didn't finish in time: start from the floor
            return PROBE_SMALL_BYTES, low
        last = self._estimate(math.inf, math.inf)
        if last is None:
            return PROBE_SMALL_BYTES, PROBE_LARGE_BYTES
        return PROBE_SMALL_BYTES, int(min(max(last.uplink_bps * PROBE_TARGET_S / 8, low), high))

    def _estimate(self, max_age_s: float, rtt_max_age_s: float) -> LinkEstimate | None:
        now = self._clock()
        small = [s for s in self._small if now - s.t <= rtt_max_age_s]
        large = [s for s in self._large if now - s.t <= max_age_s]
        recent = large[-_RECENT_LARGE:]
        if not recent:
            return None
        if small:
            rtt_ms = _lower_median(s.network_ms for s in small)  # an upper bound, refined below
            for _ in range(2):
                bps = _bandwidth(recent, rtt_ms)
                rtt_ms = _lower_median(
                    max(0.0, s.network_ms - serialization_ms(s.wire_bytes, bps)) for s in small
                )
        else:
            fitted = _theil_sen_intercept(large)
            if fitted is None:
                return None
            rtt_ms = fitted
        rtt_ms = min(rtt_ms, min(s.network_ms for s in recent))
        bps = _bandwidth(recent, rtt_ms)
        source = "probe" if all(s.probe for s in (*small, *recent)) else "measured"
        return LinkEstimate(uplink_bps=bps, rtt_ms=rtt_ms, source=source)


class ProbeClient(Protocol):
    """What ``probe()`` needs of ``ServiceClient``."""

    async def probe(self, model: str, payload: bytes) -> tuple[float, float]: ...


async def probe(client: ProbeClient, model: str, estimator: LinkEstimator) -> LinkEstimate | None:
    """Upload a small and a large body, twice each and interleaved, to the service's probe sink
    and feed the timings to ``estimator``. Errors (``ServiceUnavailableError``...) propagate.

    Interleaved so that a cold connection (handshake, slow start after idle) slows the first
    small and first large upload only: the medians then skip them.

        estimate = await probe(client, "efficientnet_lite0", estimator)
    """
    small, large = estimator.probe_sizes()
    for size in (small, large, small, large):
        # Random bytes: a compressing proxy on the path must not make the link look faster.
        round_trip_ms, server_ms = await client.probe(model, os.urandom(size))
        estimator.observe(size, round_trip_ms, server_ms, probe=True)
    return estimator.estimate()


def _bandwidth(large: list[_Sample], rtt_ms: float) -> float:
    floor_ms = max(_FLOOR_MS, _FLOOR_RTT_FRACTION * rtt_ms)
    rates = []
    for s in large:
        excess_ms = max(s.network_ms - rtt_ms, floor_ms)  # under the floor: a lower bound
        rates.append(min(MAX_BPS, s.wire_bytes * 8 / excess_ms * 1e3))
    return float(statistics.median_high(rates))


def _theil_sen_intercept(samples: list[_Sample]) -> float | None:
    """RTT as the intercept of a robust line through (wire_bytes, network_ms), or None when
    the sizes don't spread enough to separate the intercept from the slope."""
    if not samples:
        return None
    sizes = [s.wire_bytes for s in samples]
    if max(sizes) < 4 * min(sizes):
        return None
    ordered = sorted(samples, key=lambda s: s.wire_bytes)
    slopes = [
        (b.network_ms - a.network_ms) / (b.wire_bytes - a.wire_bytes)
        for a, b in combinations(ordered, 2)
        if b.wire_bytes >= 2 * a.wire_bytes
    ]
    if not slopes:
        return None
    slope = max(0.0, statistics.median(slopes))  # ms per byte; below 0 is only noise
    return max(0.0, _lower_median(s.network_ms - slope * s.wire_bytes for s in samples))


def _lower_median(values: Iterable[float]) -> float:
    return float(statistics.median_low(list(values)))


def _is_size(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_ms(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
