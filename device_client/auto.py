"""``--split auto``: the planner fed with live figures from both sides and from the link.

Device costs come from the cached profile, scaled by how fast the device has actually been
lately: one factor, live device time over profiled device time, learnt from whatever candidate
ran. A board that throttles, or shares its CPU, makes every device-side cost dearer, not only
the candidate it happened to run; otherwise the planner would keep the profile's figures for
the candidates it is comparing against. Payload sizes are learnt per candidate.

The service's costs come from its metadata, refetched every ``metadata_ttl_s`` in the
background: an expired profile is used while the fresh one arrives, since a refetch costs an
RTT and a few KB (0.2 s on 3G) and must not sit on a request's path every half minute. The
refetch starts in ``observe``, once an inference is over, not in ``plan``: started there it ran
during the request it was planned for, and its JSON parsing (~2 ms of CPU, 10 ms at 20 % of a
core) landed in that request's latency. ``settle()`` waits for it, for callers that want the
device idle before the next photo. The link comes from the estimator, which learns from every
request and probes the service when it has nothing recent. While auto runs on the device it
sends nothing, so every ``reprobe_s`` it re-probes, also from ``observe``: a request that
arrives while that probe is out waits for it, since the head holds the event loop and a probe
running under it would time the head, not the link.
The planner's hysteresis keeps the choice from flapping between near-equal candidates.

The service's load (``shared.schemas.LoadBody``: the expected wait of a whole-model request and
of each tail) comes with every answer and with the metadata; the client keeps the latest
(``ServiceClient.last_load``), and the view planned with is that latest figure decaying towards
the metadata's as it ages (half-life ``load_half_life_s``): a device that stopped sending, having
fled a busy service, is not held off by its last busy answer forever, and the metadata refresh
tells it when the service is quiet again. The view is rounded (whole ms, two significant digits
past 10 ms) so that a plan is costed again only when it moved. Anti-stampede
(``shared.planner``): this device's hysteresis is drawn once from ``seed``, and a switch past it
happens with a probability that grows with the gain, drawn per plan. A 503 with
``Retry-After`` (``ServiceClient.last_refusal``) makes it plan ``device`` until that has passed,
stretched by a random fraction up to ``retry_jitter`` so that a fleet refused together does not
come back together.

The service's costs drift too: its core may be shared, and the metadata's figures (what a lone
request for each candidate costs, ``cloud_server.costs``) are refreshed only every
``metadata_ttl_s``. Every answer reports what the request cost the service (decode + compute),
so the device keeps a service speed: a lone answer's cost over the metadata's figure for the
candidate answered (batched answers are skipped: a row's share of a pass is cheaper than a lone
request), smoothed, within ``SERVER_BOUNDS``, and scales every figure of the service's by it,
decaying towards 1 as it ages (half-life ``server_half_life_s``), as the load does.
``bench fleet`` saw why: at N=1, on a minute when the service ran ~10x slower than its profile,
auto kept ``_blocks.0`` (~170 ms a photo) over ``device`` (130 ms) for all 16 photos of a run
shorter than the metadata's TTL, although every answer said what the service had spent on it.

A profile can be wrong about one candidate: measured while something else ran, its head may be
10x too dear or too cheap next to the others, and one speed factor cannot fix that. So each
candidate's live device time is compared with what the plan predicted for it (profile x speed);
when the last few runs are all beyond 2x or under 0.5x (``profile_rules.contradicted``), the
candidate is measured again by ``remeasure`` (``device_client.profile.measure_candidate``), off
the request's path like the planning ahead (after ``observe`` returns, or in ``settle()``), and
the fresh figure, divided by the current speed so that the planner's product gives it back,
replaces the profiled one.

Under a CPU quota (an emulated board, a container) the candidate is costed from its own live runs
instead (the median of the runs that contradicted it), and nothing is measured again. A quota
is a duty cycle: a short head that starts with budget left in the period runs at full speed, one
that starts after the photo's resize has spent it waits for the next period. A profile's rounds,
and a re-measure's, keep the first kind (a low quantile), a request runs the second: at 0.2 of a
core with 10 ms periods `_blocks.3` of EfficientNet-Lite0 profiled at 3.7 ms took 12-14 ms in
every request on a LAN, and a re-measure would say 3.7 ms again, spend ~0.25 s of the device's
budget, and flag the candidate again three requests later. What a head costs in a request is
what the requests show. Candidates too cheap to tell the device's speed are checked too, their
ratios taken on ms (``profile_rules.live_ratio``): that head's 3.7 ms was under the speed's 5 ms
floor, so no check ever saw it.

``plan()`` runs just before the chosen candidate, so on a CPU-limited device its own CPU comes
straight out of the head's budget: costing 27 candidates took 0.4 ms of CPU at 20 % of a core,
~2 ms of latency right before the request. So the costing is done ahead, once ``observe`` has
returned the result (on the loop's next turn, or in ``settle()``), and ``plan()`` reuses it
while the server profile, the link estimate and the current choice are the same.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

from device_client.client import ServiceClient
from device_client.link import LinkEstimator, probe
from device_client.profile_rules import (
    CONTRADICTION_BOUNDS,
    CONTRADICTION_RUNS,
    contradicted,
    live_ratio,
    pin_head,
)
from device_client.results import InferenceResult
from shared.cpu import cgroup_quota
from shared.errors import ServiceUnavailableError, SplitServeError
from shared.planner import (
    CLOUD,
    DEVICE,
    DeviceCost,
    DeviceProfile,
    LinkEstimate,
    Plan,
    ServerProfile,
    choose,
    draw_hysteresis,
    load_figures,
    switch_threshold_ms,
)

__all__ = ["SERVER_ALPHA", "SERVER_BOUNDS", "AutoSplit", "coarse"]

_EWMA_ALPHA = 0.2  # live figures replace the profile's within ~10 inferences
_SPEED_MIN_MS = 5.0  # a candidate this cheap on the device says little about its speed
_SPEED_BOUNDS = (0.2, 5.0)  # one inference (a GC pause, a page-in) moves the factor this far
# A service on a shared core ran 10x slower than its start-up profile (bench fleet, N=1); one
# answer moves the service speed halfway to what it saw. Within CONTRADICTION_BOUNDS (0.5-2x) of
# the metadata's figure an answer counts as agreeing: one answer scatters that much around a
# figure refreshed every 30 s, and scaling every candidate by such a ratio would only add noise
# (it moved near-tied LTE devices off `cloud` at N=32; tuned before cloud_server.costs).
SERVER_BOUNDS = (0.2, 20.0)
SERVER_ALPHA = 0.5
_REMEASURED_KEPT = 64  # ``remeasured`` keeps the latest: a device may live for months

Remeasure = Callable[[str], DeviceCost]  # a candidate -> its cost measured again, now


class AutoSplit:
    """Plans each inference. ``plan()`` before, ``observe(result)`` after.

        auto = AutoSplit(client, profile)
        plan = await auto.plan()        # plan.chosen: "device", "cloud" or a split point
        result = await run(plan.chosen)
        auto.observe(result)
    """

    def __init__(self, client: ServiceClient, profile: DeviceProfile, *,
                 estimator: LinkEstimator | None = None, hysteresis: float | None = None,
                 metadata_ttl_s: float = 30.0, timeout_s: float = 5.0, reprobe_s: float = 300.0,
                 remeasure: Remeasure | None = None, seed: int | None = None,
                 load_half_life_s: float = 2.0, retry_jitter: float = 0.5,
                 server_half_life_s: float = 10.0, live_costs: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.profile = profile
        self.estimator = estimator or LinkEstimator(clock=clock)
        # None: this device's own, drawn once (anti-stampede; see shared.planner).
        self.hysteresis = draw_hysteresis(seed) if hysteresis is None else hysteresis
        self._rng = random.Random(None if seed is None else seed + 1)
        self._pending = False  # the last plan kept `current` although a switch was due
        self._load_half_life_s = load_half_life_s
        self._retry_jitter = retry_jitter
        self._loads_seen = self._refusals_seen = self._replies_seen = 0
        self._load: dict[str, float] = {}  # the latest load figures seen ...
        self._load_at = -math.inf  # ... and when (this clock)
        self._server_half_life_s = server_half_life_s
        self.server_speed = 1.0  # the service's live time / its metadata's, as last seen ...
        self._server_speed_at = -math.inf  # ... and when (this clock)
        # (the metadata's profile, the decayed load and service speed, that profile with them)
        self._view: tuple[ServerProfile, tuple[object, ...], ServerProfile] | None = None
        self.refused_until = -math.inf  # a 503's Retry-After: plan `device` until then
        self.current: str | None = None
        self.last_plan: Plan | None = None
        # Why the last plan had to do without the service (it picked `device`), else None.
        self.unreachable: ServiceUnavailableError | None = None
        self._missed: ServiceUnavailableError | None = None
        self.speed = 1.0  # live device time / profiled device time
        self._payload_bytes = {c.split: float(c.payload_bytes) for c in profile.costs}
        self._server: ServerProfile | None = None
        self._server_at = -float("inf")
        self._refresh: asyncio.Task[ServerProfile | None] | None = None
        self._ttl_s = metadata_ttl_s
        self._timeout_s = timeout_s  # planning must not hang on a stalled service
        self._reprobe_s = reprobe_s
        self._probed_at = -float("inf")
        self._clock = clock
        self.last_link: LinkEstimate | None = None  # what the last plan() planned with
        self._device_view: DeviceProfile | None = None  # device_profile(), until observe()
        self._plan_key: tuple[object, ...] | None = None
        self._ahead: asyncio.Handle | None = None  # a _plan_ahead() waiting for an idle loop
        self._probing: asyncio.Task[LinkEstimate | None] | None = None  # a re-probe, idle time
        self._remeasure = remeasure
        self._ratios: dict[str, list[float]] = {}  # live / predicted device ms, last few runs
        self._live: dict[str, list[tuple[float, float]]] = {}  # (head, encode) ms, last few runs
        # A contradicted candidate costs its live runs instead of a re-measure: None, when this
        # process runs under a CPU quota (see the module's docstring).
        self._live_costs = cgroup_quota() is not None if live_costs is None else live_costs
        self._suspect: str | None = None  # a contradicted candidate waiting to be re-measured
        # Candidates measured again (or costed from their live runs), in order (callers, tests).
        self.remeasured: list[str] = []

    async def plan(self) -> Plan:
        """Choose a candidate now. Never raises for an unreachable service: it plans `device`,
        and ``unreachable`` says why."""
        self._missed = None
        self._catch_up()
        if self._clock() < self.refused_until:
            server, link = None, None
            self._missed = self.client.last_refusal
        else:
            server, link = await self._server_profile(), await self._link()
        self.unreachable = self._missed if server is None or link is None else None
        if server is None or link is None:
            server, link = ServerProfile.of({}), LinkEstimate(uplink_bps=1.0, rtt_ms=0.0)
        plan = self._costed(server, link)
        self.current, self.last_link = plan.chosen, link
        return plan

    def _costed(self, server: ServerProfile, link: LinkEstimate) -> Plan:
        """The plan for these inputs: the last one if nothing changed (and no switch is
        pending on a draw), else costed anew."""
        device = self.device_profile()
        server = self._with_load(server)
        key = (device, server, link, self.current)
        if (self.last_plan is None or self._pending
                or not _same_inputs(key, self._plan_key)):
            plan = choose(device, server, link, current=self.current,
                          hysteresis=self.hysteresis, draw=self._rng.random())
            self.last_plan, self._plan_key = plan, key
            self._pending = self._switch_due(plan)
        return self.last_plan

    def _switch_due(self, plan: Plan) -> bool:
        """The plan kept ``current`` although the best beat it past the threshold: the next
        plan draws again."""
        best = min(plan.candidates, key=lambda e: e.total_ms)
        if plan.chosen != self.current or best.split == plan.chosen:
            return False
        kept = plan.estimate(plan.chosen).total_ms
        return kept - best.total_ms > switch_threshold_ms(kept, self.hysteresis, 1.0)

    def _catch_up(self) -> None:
        """Take in what the client saw since: a new load figure, a new 503."""
        client = self.client
        if client.loads_seen != self._loads_seen and client.last_load is not None:
            self._loads_seen = client.loads_seen
            splits = [c.split for c in self.profile.costs if c.split not in (DEVICE, CLOUD)]
            self._load = load_figures(client.last_load, splits)
            self._load_at = self._clock()
        if client.refusals_seen != self._refusals_seen and client.last_refusal is not None:
            self._refusals_seen = client.refusals_seen
            self._refused(client.last_refusal)

    def _refused(self, error: ServiceUnavailableError) -> None:
        if error.retry_after_s is not None:
            stretch = 1.0 + self._retry_jitter * self._rng.random()
            self.refused_until = max(self.refused_until,
                                     self._clock() + error.retry_after_s * stretch)

    def _with_load(self, server: ServerProfile) -> ServerProfile:
        """``server`` with the load and the service's speed as this device sees them now: the
        latest figures decaying towards the metadata's, coarsely rounded; the same object while
        that is unchanged."""
        weight = 0.5 ** ((self._clock() - self._load_at) / self._load_half_life_s)
        base = dict(server.load_ms)
        view = {}
        for name, _ in server.server_ms:
            floor = base.get(name, server.queue_ms)
            latest = self._load.get(name, floor)
            view[name] = coarse(floor + (latest - floor) * weight)
        speed = round(self._server_speed_now(), 2)
        key = (view, speed)
        if self._view is not None and self._view[0] is server and self._view[1] == key:
            return self._view[2]
        scaled = server if speed == 1.0 else ServerProfile(
            tuple((name, ms * speed) for name, ms in server.server_ms), server.queue_ms)
        self._view = (server, key, scaled.with_load(view))
        return self._view[2]

    def _server_speed_now(self) -> float:
        """The service speed last seen, decayed towards 1 (the metadata's figures) as it ages:
        a device that fled a slow service tries it again."""
        age_s = self._clock() - self._server_speed_at
        weight: float = 0.5 ** (age_s / self._server_half_life_s)
        return 1.0 + (self.server_speed - 1.0) * weight

    def _observe_server(self, split: str) -> None:
        """Fold the latest answer's cost to the service into its speed: decode + compute of a
        lone request over the metadata's figure for ``split`` (which is a lone request's cost,
        ``cloud_server.costs``). A batched answer says nothing about that: its row's share of
        the pass is cheaper, and counting it would make a busy service look fast."""
        client = self.client
        if client.replies_seen == self._replies_seen or client.last_reply is None:
            return
        self._replies_seen = client.replies_seen
        reply = client.last_reply
        published_ms = None if self._server is None else self._server.ms(split)
        if not published_ms or reply.batch_size != 1:
            return
        live_ms = reply.decode_ms + reply.compute_ms
        low, high = SERVER_BOUNDS
        now = self._server_speed_now()
        sample = min(max(live_ms / published_ms, low), high)
        agree_low, agree_high = CONTRADICTION_BOUNDS
        if agree_low <= sample <= agree_high:
            sample = 1.0
        self.server_speed = now + SERVER_ALPHA * (sample - now)
        self._server_speed_at = self._clock()

    def _plan_ahead(self) -> None:
        """Cost the next request's candidates now, while the device is idle, so that plan()
        finds them ready unless something changes in between."""
        self._ahead = None
        link = self.estimator.estimate()
        if self._server is not None and link is not None:
            self._costed(self._server, link)

    async def settle(self) -> None:
        """Finish background work (planning ahead, a metadata refetch, a re-probe) now: for a
        caller about to go idle, so that it does not share the CPU with the next request."""
        if self._ahead is not None:
            self._ahead.cancel()
            self._plan_ahead()
        if self._suspect is not None:
            self._remeasure_suspect()
        for task in (self._refresh, self._probing):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)

    def device_profile(self) -> DeviceProfile:
        """The profile as the planner sees it now: device times scaled by ``speed``, payloads
        as learnt."""
        if self._device_view is not None:
            return self._device_view
        costs = tuple(
            DeviceCost(c.split, c.head_ms * self.speed, c.encode_ms * self.speed,
                       round(self._payload_bytes[c.split]))
            for c in self.profile.costs)
        self._device_view = replace(self.profile, costs=costs)
        return self._device_view

    def observe(self, result: InferenceResult) -> None:
        """Learn from one inference: the link from its round trip, the device's speed and the
        candidate's payload from its run, the service's load from its answer; then start a due
        metadata refetch, now that the request is over."""
        self._device_view = None
        self._catch_up()
        self._observe(result)
        if not _in_a_loop():
            return
        if self._suspect is not None:
            # Before planning ahead, so that the plan is costed with the fresh figure.
            asyncio.get_running_loop().call_soon(self._remeasure_suspect)
        if self._ahead is None:
            self._ahead = asyncio.get_running_loop().call_soon(self._plan_ahead)
        if (self._server is not None and self._refresh is None
                and self._clock() - self._server_at > self._ttl_s):
            self._refresh = asyncio.create_task(self._fetch_server())
            self._refresh.add_done_callback(self._refreshed)
        if (self.current == DEVICE and self._server is not None and self._probing is None
                and self.estimator.estimate() is None and self._reprobe_due()):
            self._probing = asyncio.create_task(self._probe())
            self._probing.add_done_callback(self._probed)

    def _observe(self, result: InferenceResult) -> None:
        if result.fallback is not None:
            self._server = None  # the service failed: refetch, and wait for it, before trusting it
            return
        t = result.timings
        if result.ran != DEVICE:
            self.estimator.observe(result.bytes_sent, t.network + t.server, t.server)
            self._observe_server(result.split)
        if result.split not in self._payload_bytes:
            return
        profiled = self.profile.cost(result.split)
        self._payload_bytes[result.split] = _ewma(
            self._payload_bytes[result.split], result.bytes_sent)
        profiled_ms = profiled.head_ms + profiled.encode_ms
        encode_ms = 0.0 if result.split == DEVICE else t.encode
        live_ms = t.head + encode_ms
        predicted_ms = profiled_ms * self.speed  # what the plan expected
        if profiled_ms >= _SPEED_MIN_MS:
            low, high = _SPEED_BOUNDS
            ratio = min(max(live_ms / profiled_ms, low), high)
            self.speed = _ewma(self.speed, ratio)
        self._check(result.split, live_ratio(live_ms, predicted_ms), (t.head, encode_ms))

    def _check(self, split: str, ratio: float, live: tuple[float, float]) -> None:
        """Record one live/predicted ratio and the run's (head, encode) ms; flag the candidate
        if its runs contradict it."""
        ratios = self._ratios.setdefault(split, [])
        ratios.append(ratio)
        del ratios[:-CONTRADICTION_RUNS]
        runs = self._live.setdefault(split, [])
        runs.append(live)
        del runs[:-CONTRADICTION_RUNS]
        if ((self._remeasure is not None or self._live_costs) and self._suspect is None
                and contradicted(ratios)):
            self._suspect = split

    def _remeasure_suspect(self) -> None:
        """Measure the contradicted candidate again (under a CPU quota: take its live runs) and
        put the figure in the profile, in the profile's units (the planner multiplies by
        ``speed``). Runs when the device is idle."""
        split, self._suspect = self._suspect, None
        if split is None:
            return
        if self._live_costs:
            fresh = _from_runs(split, self._live.get(split, []),
                               round(self._payload_bytes[split]))
        elif self._remeasure is None:
            return
        else:
            try:
                fresh = self._remeasure(split)
            except SplitServeError:
                return  # keep the profiled figure; its next contradicted runs will try again
        self.profile = _with_fresh(self.profile, fresh, self.speed)
        self._ratios.pop(split, None)
        self._live.pop(split, None)
        self._device_view = None
        self.remeasured.append(split)
        del self.remeasured[:-_REMEASURED_KEPT]

    async def _server_profile(self) -> ServerProfile | None:
        """The service's costs: fetched and waited for the first time and after a failure,
        else the last ones (``observe`` refreshes them in the background)."""
        if self._server is None:
            return await self._fetch_server()
        return self._server

    async def _fetch_server(self) -> ServerProfile | None:
        try:
            meta = await asyncio.wait_for(
                self.client.metadata(self.profile.model, timeout_s=self._timeout_s),
                self._timeout_s)
        except (ServiceUnavailableError, TimeoutError) as exc:
            self._server, self._missed = None, self._unavailable(exc)
            self._catch_up()  # a 503 with Retry-After
            return None
        self._server = ServerProfile.from_metadata(meta)
        self._server_at = self._clock()
        return self._server

    def _refreshed(self, task: asyncio.Task[ServerProfile | None]) -> None:
        self._refresh = None
        if not task.cancelled() and task.exception() is not None:
            self._server = None  # the next plan fetches in the open, and raises what is wrong

    async def _link(self) -> LinkEstimate | None:
        if self._probing is not None:
            # A re-probe started in the idle time is still out: wait for it rather than run a
            # head under it (the head holds the loop, and the probe would time the head).
            await asyncio.gather(self._probing, return_exceptions=True)
        link = self.estimator.estimate()
        if link is None:
            # Running on the device sends nothing, so the estimate ages out every max_age_s and
            # each expiry would cost a probe (~1 s on 3G) on the request's path. While on the
            # device, plan with the last estimate: observe() re-probes every reprobe_s, after
            # a request.
            stale = self.estimator.last_estimate()
            if stale is not None and self.current == DEVICE:
                return stale
            link = await self._probe()
        return link

    def _reprobe_due(self) -> bool:
        return self._clock() - self._probed_at >= self._reprobe_s

    async def _probe(self) -> LinkEstimate | None:
        self._probed_at = self._clock()
        try:
            link = await asyncio.wait_for(
                probe(self.client, self.profile.model, self.estimator), self._timeout_s)
        except (ServiceUnavailableError, TimeoutError) as exc:
            self.estimator.probe_failed = True  # next time, a probe that fits
            self._missed = self._unavailable(exc)
            return None
        self.estimator.probe_failed = link is None
        return link

    def _unavailable(self, exc: Exception) -> ServiceUnavailableError:
        if isinstance(exc, ServiceUnavailableError):
            return exc
        return ServiceUnavailableError(f"no answer within {self._timeout_s:g} s", reason="timeout")

    def _probed(self, task: asyncio.Task[LinkEstimate | None]) -> None:
        self._probing = None
        if not task.cancelled():
            task.exception()  # retrieved: _probe() already turned failures into None


def _from_runs(split: str, runs: list[tuple[float, float]], payload_bytes: int) -> DeviceCost:
    """A candidate's cost from its last live runs, (head, encode) ms each: the median of each."""
    return DeviceCost(split, statistics.median(h for h, _ in runs),
                      statistics.median(e for _, e in runs), payload_bytes)


def _with_fresh(profile: DeviceProfile, fresh: DeviceCost, speed: float) -> DeviceProfile:
    """``profile`` with one candidate's figures measured again (now, so at ``speed``), its heads
    kept monotone around the new figure and within the whole model."""
    costs = {c.split: c for c in profile.costs}
    costs[fresh.split] = replace(fresh, head_ms=fresh.head_ms / speed,
                                 encode_ms=fresh.encode_ms / speed)
    whole_ms = costs[DEVICE].head_ms
    splits = [c for c in costs.values() if c.split not in (DEVICE, CLOUD)]  # execution order
    heads = [c.head_ms for c in splits]
    if fresh.split in (DEVICE, CLOUD):
        heads = [min(ms, whole_ms) for ms in heads]
    else:
        index = [c.split for c in splits].index(fresh.split)
        heads = pin_head(heads, index, costs[fresh.split].head_ms, whole_ms)
    for c, ms in zip(splits, heads, strict=True):
        costs[c.split] = replace(c, head_ms=ms)
    return replace(profile, costs=tuple(costs.values()))


def _same_inputs(key: tuple[object, ...], old: tuple[object, ...] | None) -> bool:
    """The profiles by identity (a new one is a new object), the link and choice by value."""
    return (old is not None and key[0] is old[0] and key[1] is old[1]
            and key[2] == old[2] and key[3] == old[3])


def _in_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def coarse(ms: float) -> float:
    """Whole ms under 10 ms, else two significant digits: a decaying figure then changes the
    plan's inputs every few percent, not at every request (each change costs a costing)."""
    if ms < 10:
        return float(round(ms))
    return float(round(ms, 1 - math.floor(math.log10(ms))))


def _ewma(old: float, new: float) -> float:
    return old + _EWMA_ALPHA * (new - old)
