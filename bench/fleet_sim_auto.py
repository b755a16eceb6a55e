"""``auto`` in the fleet simulation: ``device_client.auto.AutoSplit``'s decision, without I/O.

AutoSplit is async and talks to a ``ServiceClient``; ten thousand of them cannot run in a
discrete-event loop. This keeps its state per simulated device and makes the same choice:

* the device's hysteresis is ``shared.planner.draw_hysteresis(seed)`` and each plan draws a
  uniform number for ``shared.planner.switch_probability`` (the product's anti-stampede rule);
* a candidate's total is ``shared.planner.estimate``'s sum (head + encode + RTT +
  ``transfer_ms`` + server ms + queue), computed inline from the same terms because costing
  dataclasses per request would dominate the run; ``tests/bench/test_fleet_sim.py`` checks the
  choice against ``shared.planner.choose`` on random inputs;
* the service's figures come from simulated metadata (refetched every ``METADATA_TTL_S``, and
  after a fallback) and from each answer's load, decaying towards the metadata's with
  AutoSplit's half-life and rounded by its ``_coarse``;
* a 503 makes it plan ``device`` until ``Retry-After`` x (1 + 0.5 u) has passed.

* the uplink is ``device_client.link.LinkEstimator``'s: the upper median of the last 5 answers'
body bits over their network time (round trip less the service's own) less the RTT, so time
an answer spends outside the service's timings (HTTP, a busy event loop) reads as a slower
link, as it does for the product.

What differs: the RTT is known exactly (AutoSplit probes it, which on an emulated link
converges to the same figure); device speed and re-measuring are off (emulated heads take
exactly their profiled time); the metadata fetch costs no time on the request's path.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from collections.abc import Mapping, Sequence

from device_client.auto import _coarse  # the product's rounding of the load view
from device_client.link import _FLOOR_MS, _FLOOR_RTT_FRACTION, _RECENT_LARGE, MAX_BPS, SMALL_BYTES
from shared.candidates import DEVICE
from shared.planner import (
    HTTP_OVERHEAD_BYTES,
    RESPONSE_BYTES,
    draw_hysteresis,
    serialization_ms,
    switch_probability,
    switch_threshold_ms,
)

__all__ = ["LOAD_HALF_LIFE_MS", "METADATA_TTL_MS", "AutoDevice"]

METADATA_TTL_MS = 30_000.0  # AutoSplit's metadata_ttl_s
LOAD_HALF_LIFE_MS = 2_000.0  # AutoSplit's load_half_life_s
RETRY_JITTER = 0.5  # AutoSplit's retry_jitter
MIN_GAIN_MS = 1.0  # shared.planner.choose's default, as AutoSplit calls it


class AutoDevice:
    """One simulated device's planner state. ``plan(now_ms)`` -> candidate."""

    __slots__ = ("bodies", "cands", "current", "down_ms", "fixed_ms", "head_ms", "hysteresis",
                 "load", "load_at", "rates", "rtt_ms",
                 "meta_at", "meta_load", "meta_queue_ms", "meta_server_ms", "refused_until",
                 "rng")

    def __init__(self, seed: int, cands: Sequence[str], head_ms: Mapping[str, float],
                 request_bytes: Mapping[str, float], rtt_ms: float, up_bps: float,
                 down_bps: float) -> None:
        self.hysteresis = draw_hysteresis(seed)
        self.rng = random.Random(seed + 1)
        self.cands = tuple(cands)  # candidate order: device, cloud, split points
        # head + encode + rtt + transfer (shared.planner.estimate/transfer_ms): fixed per link.
        self.down_ms = serialization_ms(RESPONSE_BYTES, down_bps)
        self.head_ms, self.rtt_ms = dict(head_ms), rtt_ms
        self.bodies = {c: round(request_bytes.get(c, 0.0)) for c in self.cands}
        self.rates: deque[float] = deque(maxlen=_RECENT_LARGE)  # LinkEstimator's large samples
        self.fixed_ms: dict[str, float] = {}
        self._cost(up_bps)
        self.current: str | None = None
        self.load: dict[str, float] = {}
        self.load_at = -math.inf
        self.meta_server_ms: dict[str, float] | None = None
        self.meta_load: dict[str, float] = {}
        self.meta_queue_ms = 0.0
        self.meta_at = -math.inf
        self.refused_until = -math.inf

    def needs_metadata(self, now_ms: float) -> bool:
        return self.meta_server_ms is None or now_ms - self.meta_at > METADATA_TTL_MS

    def metadata(self, now_ms: float, server_ms: Mapping[str, float], queue_ms: float,
                 load: Mapping[str, float]) -> None:
        self.meta_server_ms = dict(server_ms)
        self.meta_queue_ms, self.meta_load, self.meta_at = queue_ms, dict(load), now_ms

    def _cost(self, up_bps: float) -> None:
        self.fixed_ms = {c: self.head_ms[c] if c == DEVICE else (
            self.head_ms[c] + self.rtt_ms + serialization_ms(
                self.bodies[c] + HTTP_OVERHEAD_BYTES, up_bps) + self.down_ms)
            for c in self.cands}

    def answered(self, now_ms: float, load: Mapping[str, float], body_bytes: float = 0.0,
                 network_ms: float | None = None) -> None:
        """An answer: the service's load, and (``network_ms``: round trip less the service's
        own time) a sample of the link as ``LinkEstimator`` takes it."""
        self.load, self.load_at = dict(load), now_ms
        if network_ms is not None and body_bytes > SMALL_BYTES:
            floor_ms = max(_FLOOR_MS, _FLOOR_RTT_FRACTION * self.rtt_ms)
            excess_ms = max(network_ms - self.rtt_ms, floor_ms)
            self.rates.append(min(MAX_BPS, body_bytes * 8 / excess_ms * 1e3))
            self._cost(statistics.median_high(self.rates))

    def refused(self, now_ms: float, retry_after_ms: float) -> None:
        stretch = 1.0 + RETRY_JITTER * self.rng.random()
        self.refused_until = max(self.refused_until, now_ms + retry_after_ms * stretch)

    def fell_back(self) -> None:
        self.meta_server_ms = None  # AutoSplit drops the server profile and refetches it

    def totals(self, now_ms: float) -> dict[str, float]:
        """Each offered candidate's expected total (``shared.planner.estimate``'s sum)."""
        server = self.meta_server_ms
        if now_ms < self.refused_until or server is None:
            return {DEVICE: self.fixed_ms[DEVICE]}
        weight = 0.5 ** ((now_ms - self.load_at) / LOAD_HALF_LIFE_MS)
        out = {}
        for c in self.cands:
            if c == DEVICE:
                out[c] = self.fixed_ms[c]
            elif c in server:
                floor = self.meta_load.get(c, self.meta_queue_ms)
                latest = self.load.get(c, floor)
                out[c] = self.fixed_ms[c] + server[c] + _coarse(floor + (latest - floor) * weight)
        return out

    def plan(self, now_ms: float, draw: float | None = None) -> str:
        """``shared.planner.choose`` with this device's hysteresis and a fresh draw (or
        ``draw``)."""
        totals = self.totals(now_ms)
        best = min(totals, key=totals.__getitem__)  # the first of equal totals, as choose()
        current = self.current
        if current is not None and current in totals and current != best:
            kept = totals[current]
            gain = kept - totals[best]
            threshold = switch_threshold_ms(kept, self.hysteresis, MIN_GAIN_MS)
            if draw is None:
                draw = self.rng.random()
            if gain <= threshold or draw >= switch_probability(gain, threshold):
                best = current
        self.current = best
        return best
