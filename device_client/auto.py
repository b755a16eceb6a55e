"""``--split auto``: the planner fed with live figures from both sides and from the link.

Device costs come from the cached profile, refreshed by what each inference actually cost; the
service's costs from its metadata (refetched every ``metadata_ttl_s``); the link from the
estimator, which learns from every request and probes the service when it has nothing recent.
The planner's hysteresis keeps the choice from flapping between near-equal candidates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

from device_client.client import ServiceClient
from device_client.link import LinkEstimator, probe
from device_client.results import InferenceResult
from shared.errors import ServiceUnavailableError
from shared.planner import (
    DEVICE,
    DeviceCost,
    DeviceProfile,
    LinkEstimate,
    Plan,
    ServerProfile,
    choose,
)

__all__ = ["AutoSplit"]

_EWMA_ALPHA = 0.2  # live costs replace the profile's within ~10 inferences


class AutoSplit:
    """Plans each inference. ``plan()`` before, ``observe(result)`` after.

        >>> auto = AutoSplit(client, profile)
        >>> plan = await auto.plan()        # plan.chosen: "device", "cloud" or a split point
    """

    def __init__(self, client: ServiceClient, profile: DeviceProfile, *,
                 estimator: LinkEstimator | None = None, hysteresis: float = 0.1,
                 metadata_ttl_s: float = 30.0, timeout_s: float = 5.0, reprobe_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.profile = profile
        self.estimator = estimator or LinkEstimator(clock=clock)
        self.hysteresis = hysteresis
        self.current: str | None = None
        self.last_plan: Plan | None = None
        self._costs = {c.split: c for c in profile.costs}
        self._server: ServerProfile | None = None
        self._server_at = -float("inf")
        self._ttl_s = metadata_ttl_s
        self._timeout_s = timeout_s  # planning must not hang on a stalled service
        self._reprobe_s = reprobe_s
        self._probed_at = -float("inf")
        self._clock = clock

    async def plan(self) -> Plan:
        """Choose a candidate now. Never raises for an unreachable service: it plans `device`."""
        server, link = await self._server_profile(), await self._link()
        if server is None or link is None:
            server, link = ServerProfile.of({}), LinkEstimate(uplink_bps=1.0, rtt_ms=0.0)
        device = replace(self.profile, costs=tuple(self._costs.values()))
        plan = choose(device, server, link, current=self.current, hysteresis=self.hysteresis)
        self.current, self.last_plan = plan.chosen, plan
        return plan

    def observe(self, result: InferenceResult) -> None:
        """Learn from one inference: the link from its round trip, device costs from its run."""
        if result.fallback is not None:
            self._server_at = -float("inf")  # the service failed: refetch before trusting it
            return
        t = result.timings
        if result.ran != DEVICE:
            self.estimator.observe(result.bytes_sent, t.network + t.server, t.server)
        old = self._costs.get(result.split)
        if old is None:
            return
        head, encode = (t.head, 0.0) if result.split == DEVICE else (t.head, t.encode)
        self._costs[result.split] = DeviceCost(
            old.split, _ewma(old.head_ms, head), _ewma(old.encode_ms, encode),
            round(_ewma(old.payload_bytes, result.bytes_sent)))

    async def _server_profile(self) -> ServerProfile | None:
        if self._server is None or self._clock() - self._server_at > self._ttl_s:
            try:
                meta = await asyncio.wait_for(
                    self.client.metadata(self.profile.model, timeout_s=self._timeout_s),
                    self._timeout_s)
            except (ServiceUnavailableError, TimeoutError):
                self._server = None
                return None
            self._server = ServerProfile.from_metadata(meta)
            self._server_at = self._clock()
        return self._server

    async def _link(self) -> LinkEstimate | None:
        link = self.estimator.estimate()
        if link is None:
            # Running on the device sends nothing, so the estimate ages out every max_age_s and
            # each expiry would cost a probe (~1 s on 3G). While on the device, plan with the
            # last estimate and re-probe only every reprobe_s.
            stale = self.estimator.last_estimate()
            if (stale is not None and self.current == DEVICE
                    and self._clock() - self._probed_at < self._reprobe_s):
                return stale
            self._probed_at = self._clock()
            try:
                link = await asyncio.wait_for(
                    probe(self.client, self.profile.model, self.estimator), self._timeout_s)
            except (ServiceUnavailableError, TimeoutError):
                self.estimator.probe_failed = True  # next time, a probe that fits
                return None
            self.estimator.probe_failed = link is None
        return link


def _ewma(old: float, new: float) -> float:
    return old + _EWMA_ALPHA * (new - old)
