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
  AutoSplit's half-life and rounded by its ``coarse``;
* a 503 makes it plan ``device`` until ``Retry-After`` x (1 + 0.5 u) has passed.

* the uplink is ``device_client.link.LinkEstimator``'s: the upper median of the last 5 answers'
body bits over their network time (round trip less the service's own) less the RTT, so time
an answer spends outside the service's timings (HTTP, a busy event loop) reads as a slower
link, as it does for the product.

* the RTT is the start-up probe's (``device_client.link.probe``: 64 B, 64 KiB, 64 B, 64 KiB
  to the service's sink, one after another, before the first plan; the engine sends them
  through the replica's event loop, so a busy loop's queue reads as RTT), estimated by
  ``LinkEstimator`` itself from the four samples; answers then lower it to the fastest recent
  large sample's network time, as ``LinkEstimator.estimate`` caps it;
* the service speed is ``AutoSplit``'s: each lone answer's (batch size 1) decode + compute
  over the metadata's figure (``cloud_server.costs``: what a lone request costs now; each
  simulated replica keeps a ``ServerCosts`` fed as the service feeds it), clamped to
  ``SERVER_BOUNDS``, 1 within ``CONTRADICTION_BOUNDS``, folded in by ``SERVER_ALPHA``,
  decaying to 1 with AutoSplit's half-life, scaling every service figure.

What differs: device speed and re-measuring are off (emulated heads take exactly their profiled
time); the metadata fetch costs no time on the request's path; the link is probed once.
"""

from __future__ import annotations

import inspect
import math
import random
import statistics
from collections import deque
from collections.abc import Mapping, Sequence

from device_client.auto import SERVER_ALPHA, SERVER_BOUNDS, AutoSplit, coarse
from device_client.link import (
    _FLOOR_MS,
    _FLOOR_RTT_FRACTION,
    _RECENT_LARGE,
    MAX_BPS,
    PROBE_LARGE_BYTES,
    PROBE_SMALL_BYTES,
    SMALL_BYTES,
    LinkEstimator,
)
from device_client.profile_rules import CONTRADICTION_BOUNDS
from shared.candidates import DEVICE
from shared.planner import (
    HTTP_OVERHEAD_BYTES,
    RESPONSE_BYTES,
    draw_hysteresis,
    serialization_ms,
    switch_probability,
    switch_threshold_ms,
)

__all__ = ["LOAD_HALF_LIFE_MS", "METADATA_TTL_MS", "PROBE_BYTES", "AutoDevice"]

_DEFAULTS = inspect.signature(AutoSplit.__init__).parameters  # AutoSplit's own, not copies
METADATA_TTL_MS = float(_DEFAULTS["metadata_ttl_s"].default) * 1e3
LOAD_HALF_LIFE_MS = float(_DEFAULTS["load_half_life_s"].default) * 1e3
RETRY_JITTER = float(_DEFAULTS["retry_jitter"].default)
SERVER_HALF_LIFE_MS = float(_DEFAULTS["server_half_life_s"].default) * 1e3
MIN_GAIN_MS = 1.0  # shared.planner.choose's default, as AutoSplit calls it
# device_client.link.probe's uploads before any estimate, in order
PROBE_BYTES = (PROBE_SMALL_BYTES, PROBE_LARGE_BYTES, PROBE_SMALL_BYTES, PROBE_LARGE_BYTES)


class AutoDevice:
    """One simulated device's planner state. ``plan(now_ms)`` -> candidate."""

    __slots__ = ("bodies", "cands", "current", "down_ms", "fixed_ms", "head_ms", "hysteresis",
                 "load", "load_at", "nets", "probed", "rates", "rtt_ms", "probe_rtt_ms",
                 "meta_at", "meta_load", "meta_queue_ms", "meta_server_ms", "refused_until",
                 "rng", "speed", "speed_at", "up_bps")

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
        self.nets: deque[float] = deque(maxlen=_RECENT_LARGE)  # their network ms
        self.probed = False  # until then the RTT is the link's own (no probe modelled)
        self.probe_rtt_ms = rtt_ms
        self.up_bps = up_bps
        self.speed, self.speed_at = 1.0, -math.inf  # AutoSplit.server_speed
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

    def probe_done(self, samples: Sequence[tuple[int, float]]) -> None:
        """The start-up probe's (body bytes, network ms) samples, as ``LinkEstimator`` reads
        them: its RTT and uplink replace the link's own."""
        est = LinkEstimator(clock=lambda: 0.0)
        for body, network_ms in samples:
            est.observe(body, network_ms, 0.0, probe=True)
        link = est.estimate()
        self.probed = True
        if link is None:
            return
        self.rtt_ms = self.probe_rtt_ms = link.rtt_ms
        self.rates.clear()
        self.nets.clear()
        for body, network_ms in samples:
            if body > SMALL_BYTES:
                self.nets.append(network_ms)
                self._rate(body, network_ms)
        self._cost(statistics.median_high(self.rates) if self.rates else self.up_bps)

    def _rate(self, wire_bytes: float, network_ms: float) -> None:
        floor_ms = max(_FLOOR_MS, _FLOOR_RTT_FRACTION * self.rtt_ms)
        excess_ms = max(network_ms - self.rtt_ms, floor_ms)
        self.rates.append(min(MAX_BPS, wire_bytes * 8 / excess_ms * 1e3))

    def answered(self, now_ms: float, load: Mapping[str, float], body_bytes: float = 0.0,
                 network_ms: float | None = None, cand: str | None = None,
                 server_row_ms: float | None = None, batch_size: int = 1) -> None:
        """An answer: the service's load, (``network_ms``: round trip less the service's own
        time) a sample of the link as ``LinkEstimator`` takes it, and (``server_row_ms``:
        decode + compute per row for ``cand``) a sample of the service's speed if it ran alone
        (``batch_size`` 1: ``AutoSplit._observe_server`` skips batched answers, whose row is
        cheaper than the lone request the metadata's figure costs)."""
        self.load, self.load_at = dict(load), now_ms
        if network_ms is not None and body_bytes > SMALL_BYTES:
            if self.probed:  # LinkEstimator caps the RTT by the fastest recent large sample
                self.nets.append(network_ms)
                self.rtt_ms = min(self.probe_rtt_ms, min(self.nets))
            self._rate(body_bytes, network_ms)
            self._cost(statistics.median_high(self.rates))
        server = self.meta_server_ms
        if server_row_ms is not None and batch_size == 1 and server and server.get(cand or ""):
            low, high = SERVER_BOUNDS
            sample = min(max(server_row_ms / server[cand or ""], low), high)
            if CONTRADICTION_BOUNDS[0] <= sample <= CONTRADICTION_BOUNDS[1]:
                sample = 1.0
            speed = self.speed_now(now_ms)
            self.speed, self.speed_at = speed + SERVER_ALPHA * (sample - speed), now_ms

    def speed_now(self, now_ms: float) -> float:
        """``AutoSplit._server_speed_now``: the last service speed, decayed towards 1."""
        if self.speed == 1.0:
            return 1.0
        weight: float = 0.5 ** ((now_ms - self.speed_at) / SERVER_HALF_LIFE_MS)
        return 1.0 + (self.speed - 1.0) * weight

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
        speed = round(self.speed_now(now_ms), 2)
        out = {}
        for c in self.cands:
            if c == DEVICE:
                out[c] = self.fixed_ms[c]
            elif c in server:
                floor = self.meta_load.get(c, self.meta_queue_ms)
                latest = self.load.get(c, floor)
                out[c] = (self.fixed_ms[c] + server[c] * speed
                          + coarse(floor + (latest - floor) * weight))
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
