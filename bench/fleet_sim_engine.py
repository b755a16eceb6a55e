"""The discrete-event loop of the fleet simulation: devices, links, and R service replicas.

    result = simulate(inputs, "middle", devices=10_000, replicas=8, seed=0)

Devices: each takes a photo every ``period_ms`` from a seeded phase, keeps at most one request
in flight (a photo taken while busy waits its turn), waits its head time, then the link: RTT/2
plus request bytes (+ HTTP headers) over the uplink, and on the way back RTT/2 plus the answer
over the downlink. Latency counts from the photo to its answer (``bench fleet``'s measure: a
photo that waited for its busy device waited in its latency). A request not answered within
the device's deadline is finished on the device (a timeout), and the service drops it if it is
still queued then (``X-Request-Timeout-Ms``).

A replica is one service process on one core (``cloud_server``). Each request costs the core
its ``request_ms`` (HTTP + decode: the event loop and ``asyncio.to_thread``, one after another)
beside the compute thread; while both have work they share the core half and half (processor
sharing, as the kernel shares it between the threads). With the service times a measured run's
answers reported (``ServiceTimes.in_service``) the event loop is still a single FIFO server,
read and answer of every request (and ``auto``'s start-up metadata and probe uploads) queueing
for it, its CPU per request measured at low load (``LOOP_SHARE``), while decode, compute and
the rest of the overhead are the wall-clock times the runs saw, which hold the core's sharing
already (so the loop takes no share of the batch's core here). A fleet's rounds (``rounds``)
are simulated as measured: the window in parts, the devices' clocks paused between them until
every request is over. ``cloud_server.batching.Batcher``'s rule forms the batches: one
compute thread for every key; it takes the key whose oldest request waited longest, waits until
that request is ``batch_wait_ms`` old or ``batch_max`` rows are queued, or no request is on
its way (``Service.incoming()``: admitted, its body not yet read and decoded; a lone request
runs at once), runs one forward pass, then picks again. Batches never mix keys. Past
``max_queue`` queued requests a replica answers 503; the device then finishes locally (a
split's tail, or the whole model). Requests are spread over replicas by power of two choices
on requests in flight (Ray Serve's router).

The replica keeps the figures the real service publishes (``Batcher.wait_ms`` and
``Service.load``: EWMA compute ms per row and rows per batch per key, the batch in flight; the
metadata's ``server_ms`` from its own ``cloud_server.costs.ServerCosts``, profiled with the
service times' lone request and fed every answer as the service feeds it), so ``auto``
(``bench.fleet_sim_auto``) plans with what it would be told. A request that finds the whole
service (every replica) idle for ``bench.fleet_sim_served.IDLE_S`` runs cold: its decode,
compute and overhead are drawn from the requests that found the measured service so (batch
size 0); a warm one that finds it empty draws its decode and overhead from the measured lone
requests that had the service to themselves (``bench.fleet_sim_served``'s alone class), and its
forward pass too if it is still the service's only request when its batch starts (the
measured class asks for no overlap at all: a request that arrives during that pass is not
seen here). A batch
that starts after a window closed (its backlog draining, nothing new arriving) draws from the
measured drain's batches of its size.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from bench.fleet_sim_auto import PROBE_BYTES, AutoDevice
from bench.fleet_sim_inputs import STARTUP_KEYS, FleetInputs, candidate_of, seeded_phases
from bench.fleet_sim_served import IDLE_S, group_key
from cloud_server.costs import ServerCosts
from shared.candidates import CLOUD, DEVICE
from shared.planner import HTTP_OVERHEAD_BYTES

__all__ = ["SimResult", "simulate"]

_LOAD_ALPHA = 0.2  # cloud_server.batching
_QUEUE_MS_ALPHA = 0.1  # cloud_server.service (the metadata's queue_ms)

_START, _ARRIVE, _INGESTED, _FILL, _BATCH_END, _TIMEOUT, _DECODED, _PROBE_AT, _PROBED = range(9)
# what the event loop does with an item once its CPU is spent (``_Replica.ingest``)
_QUEUE, _DECODE, _ANSWER, _PROBE = range(4)
# in_service: the event loop's CPU per request (HTTP parsing, the body's read, the answer) is
# this share of the lower quartile of the overheads the runs saw at batch size 1 (a request's
# round trip less the service's times and the link's, which no queue is in); the rest of a
# drawn overhead (thread hand-offs, the emulated device's own loop) is a delay. Checked on six
# measured run sets (README): 0.5-1.0 validate alike.
LOOP_SHARE = 1.0
# without the deployment's measured start-up (inputs.startup_ms, bench.fleet_startup; an older
# fleet.json): a probe upload's loop CPU against a request's (read a body, answer a few bytes:
# no decode hand-off, no batch), and the metadata's (a JSON answer like an inference's). A
# guess, and a low one behind Ray Serve's proxy (bench.fleet_startup has the measured figures).
PROBE_SHARE = 0.5
META_SHARE = 1.0
# [device, candidate, start ms, photo ms, still awaited by the device, found the replica idle]
_Req = list[Any]
# between two rounds' windows, on the simulation's clock: every request answered or timed out
# (bench fleet waits for the last answer, then 1 s, and runs the other policies' windows)
ROUND_GAP_MS = 11_000.0
IDLE_MS = IDLE_S * 1e3  # a service idle this long runs the next request cold


@dataclass(frozen=True)
class SimResult:
    """One simulated run, in the fleet benchmark's terms."""

    policy: str
    devices: int
    replicas: int
    p50_ms: float
    p95_ms: float
    throughput_rps: float  # answers from the service per second
    mean_batch_size: float
    utilisation: float  # busy core time / (replicas x window)
    ok: int  # photos answered, by the service or by the device (fallbacks included)
    rejected_503: int
    fallbacks: int
    timeouts: int
    choices: dict[str, int]
    by_link: dict[str, dict[str, float]]  # link -> photos, p50_ms, p95_ms
    # per measured window (``rounds``): photos, p50_ms, p95_ms, mean_batch_size
    by_round: tuple[dict[str, float], ...] = ()

    def to_json(self) -> dict[str, object]:
        return {k: (round(v, 4) if isinstance(v, float) else list(v) if isinstance(v, tuple)
                    else v) for k, v in self.__dict__.items()}


class _Replica:
    __slots__ = ("batch_at", "batch_left", "batch_rows", "batch_start", "batched", "batches",
                 "busy_ms", "half_life_ms", "idle_at", "incoming", "last_batch",
                 "busy_until", "depth", "fill_version", "filling", "head_left", "inflight",
                 "shares_batch",
                 "ingest", "key", "last_t", "queue_ms", "queues", "row_ms", "running",
                 "costs", "version")

    def __init__(self, costs: ServerCosts, half_life_ms: float | None) -> None:
        self.half_life_ms = half_life_ms  # the mean batch size's decay once a key stops running
        self.batch_at: dict[str, float] = {}
        self.last_batch: dict[str, int] = {}
        self.idle_at = -math.inf  # when the last request in flight was answered
        self.queues: dict[str, deque[tuple[float, _Req]]] = {}
        self.depth = 0  # queued, not yet in a forward pass (Batcher.depth)
        self.inflight = 0  # admitted and not answered (the router's figure)
        self.incoming = 0  # admitted, body not yet read and decoded (Service.incoming())
        # One core, shared by two streams: requests' own work (HTTP + decode, FIFO) and the
        # compute thread's batch. Both busy: each runs at half speed (processor sharing).
        self.ingest: deque[tuple[float, int, Any]] = deque()  # (CPU ms, what next, payload)
        # False when batch times are wall-clock times measured under the same sharing
        self.shares_batch = True
        self.head_left = 0.0  # CPU ms left of the request at the head of ``ingest``
        self.batch_left = 0.0  # CPU ms left of the batch in flight
        self.last_t = 0.0
        self.fill_version = 0
        self.running: list[tuple[float, _Req]] | None = None
        self.key = ""
        self.batch_start = 0.0
        self.busy_until = 0.0
        self.filling: str | None = None
        self.version = 0
        self.row_ms: dict[str, float] = {}
        self.batch_rows: dict[str, float] = {}
        self.costs = costs  # the metadata's server_ms, learnt as the service learns it
        self.queue_ms = 0.0
        self.busy_ms = 0.0
        self.batches = self.batched = 0

    def published(self, profiled: dict[str, float]) -> dict[str, float]:
        """The metadata's ``server_ms`` per candidate now (``ServerCosts.figures``)."""
        figures = self.costs.figures()
        return {c: figures.get(c, ms) for c, ms in profiled.items()}

    def rate(self) -> float:
        if not self.shares_batch:  # the measured times hold the sharing already
            return 1.0
        return 0.5 if self.ingest and self.running is not None else 1.0

    def advance(self, now: float) -> None:
        """Progress both streams to ``now`` (no completion falls inside: events mark them)."""
        elapsed = now - self.last_t
        done = elapsed * self.rate()
        self.last_t = now
        if self.ingest:
            self.head_left -= done
        if self.running is not None:
            self.batch_left -= done if self.shares_batch else elapsed

    def rows_now(self, key: str, rows: float, now: float) -> float:
        """``Batcher._rows_now``, where the service has it: decayed towards 1 since the key's
        last batch."""
        if self.half_life_ms is None:
            return rows
        idle_ms = max(0.0, now - self.batch_at.get(key, now))
        decay: float = 0.5 ** (idle_ms / self.half_life_ms)
        return 1.0 + (rows - 1.0) * decay

    def load(self, now: float, wait_ms: float, profiled: dict[str, float]) -> dict[str, float]:
        """``Service.load`` through ``shared.planner.load_figures``: candidate -> wait ms."""
        shared = max(0.0, self.busy_until - now)
        if self.depth and not self.busy_until > now and self.incoming > 0:
            shared += wait_ms  # the batch waits to fill only while a request is on its way
        queued = {}
        for key, q in self.queues.items():
            queued[key] = len(q)
            shared += len(q) * (self.row_ms.get(key) or profiled.get(key) or 0.0)
        out = {}
        for key in profiled:
            rows = self.batch_rows.get(key)
            extra = 0.0 if rows is None else max(
                0.0, self.rows_now(key, rows, now) - 1 - queued.get(key, 0)) * self.row_ms[key]
            if key != CLOUD and extra < 0.05:
                extra = 0.0
            out[key] = round(shared + extra, 1)
        return out


def simulate(inputs: FleetInputs, policy: str, *, devices: int, replicas: int = 1,
             seed: int = 0, duration_s: float | None = None, warmup_s: float | None = None,
             engine: str = "uvicorn", draw: int = 0, rounds: int = 1,
             startup: bool = True) -> SimResult:
    """Simulate ``devices`` devices running ``policy`` against ``replicas`` replicas. Photos
    are taken for ``warmup_s`` + ``duration_s`` (defaults: the inputs'), and every one is
    answered; statistics are over the photos taken after the warm-up, latency from the photo to
    its answer (as ``bench fleet`` counts it). ``seed`` sets the devices' phases and auto's
    draws as ``bench fleet``'s seed does; ``draw`` > 0 draws other service times for them.
    ``rounds`` > 1 measures as ``bench fleet``'s rounds do: the window in that many parts,
    the devices' clocks paused between them until the service has answered everything
    (``ROUND_GAP_MS``). ``startup=False`` leaves out ``auto``'s start-up (metadata and probe):
    its devices plan with their link's own RTT from the first photo."""
    if devices < 1 or replicas < 1:
        raise ValueError("devices and replicas must be >= 1")
    t0 = (inputs.warmup_s if warmup_s is None else warmup_s) * 1e3
    t1 = t0 + (inputs.duration_s if duration_s is None else duration_s) * 1e3
    sim = _Sim(inputs, policy, devices, replicas, seed, engine, t0, t1)
    if not startup:
        for auto in sim.autos:
            auto.probed = True
    if rounds > 1:
        sim.round_ms, sim.rounds = (t1 - t0) / rounds, rounds
        sim.lat_by_round = [[] for _ in range(rounds)]
        sim.batches_by_round = [[0, 0] for _ in range(rounds)]
    if draw:
        sim.rng = random.Random(f"{seed}/{draw}")
    sim.run()
    return sim.result()


class _Sim:
    """The state of one run and its event handlers; ``run()`` drains the event heap."""

    def __init__(self, inputs: FleetInputs, policy: str, devices: int, replicas: int,
                 seed: int, engine: str, t0: float, t1: float) -> None:
        self.inputs, self.policy, self.devices, self.replicas = inputs, policy, devices, replicas
        self.t0, self.t1 = t0, t1
        self.round_ms = math.inf  # the devices' clock runs ROUND_GAP_MS behind after each
        self.rounds = 1
        self.rng = random.Random(seed)
        svc = inputs.service
        cands = inputs.candidates()
        # the start-up profile the replicas publish: the deployment's own if it was recorded
        published = inputs.published_ms.get(group_key(engine, replicas), {})
        self.profiled = {c: published.get(c, svc.server_ms(c)) for c in cands if c != DEVICE}
        self.samplers = {c: svc.sampler(c, inputs.batch_max) for c in self.profiled}
        self.request_ms = {c: svc.request_ms(c) for c in self.profiled}
        self.decode_ms = {c: svc.decode_ms.get(c, 0.0) for c in self.profiled}
        # times the service reported in a measured run: delays, the core's sharing in them
        self.in_service = svc.in_service
        self.cold = svc.cold_draws
        bmax = inputs.batch_max
        self.decode_draws = {c: svc.by_size(svc.decode_draws.get(c), bmax, self.decode_ms[c])
                             for c in self.profiled}
        self.overhead_draws = {c: svc.by_size(svc.overhead_draws.get(c), bmax, 0.0)
                               for c in self.profiled}
        self.finish_ms = {c: inputs.finish_ms(c) for c in cands}
        links = [inputs.links[inputs.link_mix[i % len(inputs.link_mix)]] for i in range(devices)]
        by_link = {lk.name: {c: lk.rtt_ms / 2 + lk.up_ms(
            inputs.request_bytes.get(c, 0.0) + HTTP_OVERHEAD_BYTES) for c in self.profiled}
            for lk in inputs.links.values()}
        self.up_ms = [by_link[lk.name] for lk in links]
        self.link_of = [lk.name for lk in links]
        self.lat_by_link: dict[str, list[float]] = {name: [] for name in inputs.link_mix}
        self.down_ms = [lk.rtt_ms / 2 + lk.down_ms(inputs.response_bytes) for lk in links]
        lags = inputs.device_lag_ms
        self.lag_ms = lags[min(lags, key=lambda n: (abs(n - devices), n))] if lags else ()
        # a device's start-up on this deployment, as measured (bench.fleet_startup), if it was
        startup = inputs.startup_ms.get(group_key(engine, replicas), {})
        self.startup = dict(startup) if all(k in startup for k in STARTUP_KEYS) else {}
        self.proxy_ms = inputs.proxy_ms.get(engine, 0.0)
        self.jitter_ms = inputs.jitter_ms.get(engine, 0.0)
        self.fixed = None if policy == "auto" else candidate_of(inputs, policy)
        self.autos = [AutoDevice(seed * 1_000_003 + i, cands, inputs.head_ms,
                                 inputs.request_bytes, lk.rtt_ms, lk.up_bps, lk.down_bps)
                      for i, lk in enumerate(links)] if self.fixed is None else []
        half_life_ms = _rows_half_life_ms() if self.fixed is None else None
        self.reps = [_Replica(self.server_costs(), half_life_ms) for _ in range(replicas)]
        for r in self.reps:
            r.shares_batch = not self.in_service
        # in_service: the event loop's CPU per request (split between reading it and answering
        # it) and the delay besides, from the overhead the runs saw at low load (batch size 1;
        # cold: the idle replica's); later sizes' overheads hold the loop's queue, simulated here
        self.loop_draws = {c: (d[1], d[0]) for c, d in self.overhead_draws.items()}  # sorted
        self.alone_draws = svc.alone_overhead_draws
        self.alone_compute = svc.alone_compute_draws
        self.alone_decode = svc.alone_decode_draws
        self.drain = svc.drain_compute_draws
        self.warmup = svc.warmup_compute_draws
        # AutoSplit's start-up: the metadata (a GET), then the probe's four uploads
        self.probe_up_ms = [[lk.rtt_ms / 2 + lk.up_ms(b + HTTP_OVERHEAD_BYTES)
                             for b in (0, *PROBE_BYTES)] for lk in links]
        self.probe_down_ms = [lk.rtt_ms / 2 for lk in links]
        self.photo = seeded_phases(devices, inputs.period_ms, seed)
        self.heap: list[tuple[float, int, int, object]] = [
            (p, i, _START, i) for i, p in enumerate(self.photo)]
        heapq.heapify(self.heap)
        self.seq = devices
        self.now = 0.0
        self.lat: list[float] = []
        self.lat_by_round: list[list[float]] = [[]]
        self.batches_by_round: list[list[int]] = [[0, 0]]  # [batches, rows]
        self.choices: dict[str, int] = {}
        self.ok = self.rejected = self.fallbacks = self.timeouts = self.answered = 0

    def server_costs(self) -> ServerCosts:
        """A replica's ``cloud_server.costs.ServerCosts`` on the simulation's clock, profiled
        with what the deployment published at start-up (``inputs.published_ms``), else with the
        service times' lone request (decode, batch-1 compute)."""
        costs = ServerCosts(clock=lambda: self.now / 1e3)
        costs.set_profile(decode_ms=self.decode_ms, compute_ms={
            c: max(0.0, ms - self.decode_ms[c]) for c, ms in self.profiled.items()})
        return costs

    def push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (max(t, self.now), self.seq, kind, payload))

    def in_window(self, photo: float) -> bool:
        return self.t0 <= photo < self.t1

    def round_of(self, photo: float) -> int:
        """The measured window (round) a photo taken in the window belongs to."""
        if self.round_ms == math.inf:
            return 0
        return int(min((photo - self.t0) // self.round_ms, self.rounds - 1))

    def at(self, photo: float) -> float:
        """A device's clock (photo times) on the simulation's, past the rounds' gaps."""
        if photo < self.t0 or self.round_ms == math.inf:
            return photo
        return photo + ROUND_GAP_MS * min((photo - self.t0) // self.round_ms, self.rounds - 1)

    def live(self, t: float) -> bool:
        """Whether simulation time ``t`` falls in a measured window."""
        if self.round_ms == math.inf:
            return self.t0 <= t < self.t1
        if t < self.t0:
            return False
        k, into = divmod(t - self.t0, self.round_ms + ROUND_GAP_MS)
        return into < self.round_ms and k < self.rounds

    def finish(self, dev: int, photo: float, done: float, *, timeout: bool = False) -> None:
        """Photo ``photo`` of ``dev`` answered at ``done``; start its next photo."""
        if self.in_window(photo):
            self.lat.append(done - self.at(photo))
            self.lat_by_round[self.round_of(photo)].append(done - self.at(photo))
            self.lat_by_link[self.link_of[dev]].append(done - self.at(photo))
            if timeout:
                self.timeouts += 1
            else:
                self.ok += 1
        self.photo[dev] += self.inputs.period_ms  # photos queue while busy; none is dropped
        if self.photo[dev] < self.t1:
            self.push(max(self.at(self.photo[dev]), done), _START, dev)

    def fail(self, dev: int, req: _Req, at: float, *,
             timeout: bool) -> None:
        """The service could not answer ``req``: the device finishes it locally."""
        cand, photo = req[1], req[3]
        req[4] = False
        if self.in_window(photo):
            self.fallbacks += 1
        if self.autos:
            self.autos[dev].fell_back()
        self.finish(dev, photo, at + self.finish_ms[cand], timeout=timeout)

    def pick_replica(self) -> _Replica:
        if self.replicas == 1:
            return self.reps[0]
        a = self.reps[self.rng.randrange(self.replicas)]
        b = self.reps[self.rng.randrange(self.replicas)]
        return a if a.inflight <= b.inflight else b

    def kick(self, r: _Replica) -> None:
        """``Batcher._schedule``: pick the key whose oldest request waited longest, fill."""
        if r.running is not None or r.filling is not None:
            return
        best, best_t = None, math.inf
        for key, q in r.queues.items():
            if q[0][0] < best_t:
                best, best_t = key, q[0][0]
        if best is None:
            return
        deadline = best_t + self.inputs.batch_wait_ms
        # Batcher._fill: a full batch, its oldest waited the delay, or nothing incoming
        if (len(r.queues[best]) >= self.inputs.batch_max or deadline <= self.now
                or r.incoming <= 0):
            self.start_batch(r, best)
        else:
            r.filling = best
            r.fill_version += 1
            self.push(deadline, _FILL, (r, r.fill_version))

    def start_batch(self, r: _Replica, key: str) -> None:
        """``Batcher._take`` + ``_execute``: requests past their deadline are dropped."""
        q = r.queues[key]
        batch: list[tuple[float, _Req]] = []
        while q and len(batch) < self.inputs.batch_max:
            item = q.popleft()
            r.depth -= 1
            if item[1][4]:
                batch.append(item)
            else:  # the device gave up on it: past X-Request-Timeout-Ms, dropped unrun
                r.inflight -= 1
                if not r.inflight:
                    r.idle_at = self.now
        if not q:
            del r.queues[key]
        r.filling = None
        if not batch:
            self.kick(r)
            return
        n = len(batch)
        samples, scale = self.samplers[key][n]
        if n == 1 and batch[0][1][5] and key in self.cold:  # a lone request on an idle replica
            samples, scale = self.cold[key], 1.0
        elif self.now < self.t0 and n in self.warmup.get(key, {}):  # the warm-up's passes
            samples, scale = self.warmup[key][n], 1.0
        elif n == 1 and self.in_service and batch[0][1][11] and key in self.alone_compute \
                and sum(rep.inflight for rep in self.reps) == 1:  # still the service's only one
            samples, scale = self.alone_compute[key], 1.0
        elif n in self.drain.get(key, {}) and self.now >= self.t0 and not self.live(self.now):
            samples, scale = self.drain[key][n], 1.0  # a window closed: its backlog drains
        compute = self.rng.choice(samples) * scale
        r.running, r.key, r.batch_start = batch, key, self.now
        r.batch_left = compute
        if self.live(self.now):
            r.busy_ms += compute
        r.busy_until = self.now + r.row_ms[key] * n if key in r.row_ms else 0.0

    def reschedule(self, r: _Replica) -> None:
        """Push the next completion of each busy stream; earlier pushes go stale."""
        r.version += 1
        rate = r.rate()
        if r.ingest:
            self.push(self.now + max(r.head_left, 0.0) / rate, _INGESTED, (r, r.version))
        if r.running is not None:
            batch_rate = rate if r.shares_batch else 1.0
            self.push(self.now + max(r.batch_left, 0.0) / batch_rate, _BATCH_END,
                      (r, r.version))

    def run(self) -> None:
        handlers = (self.on_start, self.on_arrive, self.on_ingested, self.on_fill,
                    self.on_batch_end, self.on_timeout, self.on_decoded, self.on_probe_at,
                    self.on_probed)
        heap = self.heap
        while heap:
            self.now, _, kind, payload = heapq.heappop(heap)
            handlers[kind](payload)

    def on_start(self, dev: Any) -> None:
        now = self.now
        if self.fixed is None:
            auto = self.autos[dev]
            if not auto.probed:  # AutoSplit probes the link before its first plan
                auto.probed = True
                self.push(now + self.probe_up_ms[dev][0], _PROBE_AT, [dev, 0, now, []])
                return
            if auto.needs_metadata(now):
                r = self.pick_replica()
                auto.metadata(now, r.published(self.profiled), r.queue_ms,
                              r.load(now, self.inputs.batch_wait_ms, self.profiled))
            cand = auto.plan(now)
            if cand == DEVICE and now < auto.refused_until and self.in_window(self.photo[dev]):
                self.fallbacks += 1  # planned around a 503: the fleet counts it a fallback
        else:
            cand = self.fixed
        if self.in_window(self.photo[dev]):
            self.choices[cand] = self.choices.get(cand, 0) + 1
        if self.lag_ms:  # the emulated device's timers run late
            now += self.rng.choice(self.lag_ms)
        if cand == DEVICE:
            self.finish(dev, self.photo[dev], now + self.inputs.head_ms[DEVICE])
        else:
            req = [dev, cand, now, self.photo[dev], True, False]
            self.push(now + self.inputs.head_ms[cand] + self.up_ms[dev][cand], _ARRIVE, req)
            self.push(now + self.inputs.timeout_ms, _TIMEOUT, req)

    def on_timeout(self, req: Any) -> None:
        """The device's deadline: if still unanswered, it finishes the photo itself."""
        if req[4]:
            self.fail(req[0], req, self.now, timeout=True)

    def on_arrive(self, req: Any) -> None:
        dev, cand, _, photo, awaited, _ = req
        if not awaited:  # the device gave up before it arrived
            return
        r = self.pick_replica()
        now = self.now
        if r.depth >= self.inputs.max_queue:  # Service.admit: 503 + Retry-After
            if self.in_window(photo):
                self.rejected += 1
            if self.autos:
                wait = self.inputs.batch_wait_ms
                retry_ms = max(1000.0, wait * 10, r.load(now, wait, self.profiled)[cand])
                self.autos[dev].refused(now + self.down_ms[dev], retry_ms)
            self.fail(dev, req, now + self.down_ms[dev], timeout=False)
            return
        if self.in_service:  # decoded in its own thread, as long as the run's decodes took
            # how busy the key is: its latest batch's size, or 0 for an idle service (cold).
            # Idle as the measured runs were classed (fleet_sim_served._cold): no request in
            # flight on any replica, as a device sees the service, not on this replica alone
            req[5] = self.service_idle(now)
            alone = all(rep.inflight == 0 for rep in self.reps)
            last = 0 if req[5] else r.last_batch.get(cand, 1)
            r.inflight += 1
            r.incoming += 1
            alone = alone and not req[5]
            loop_ms, delay_ms = self.loop_cost(cand, req[5], alone=alone)
            decode_ms = self.rng.choice(self.alone_decode[cand] if alone and cand in
                                        self.alone_decode else self.decode_draws[cand][last])
            # req[6:12]: the delay besides the loop, the answer's loop CPU, arrival, read,
            # decode, found the service empty (warm)
            req.extend((delay_ms, loop_ms / 2, now, now, decode_ms, alone))
            self.to_loop(r, loop_ms / 2, _DECODE, req)
            return
        r.inflight += 1
        r.incoming += 1
        self.to_loop(r, self.request_ms[cand], _QUEUE, req)

    def service_idle(self, now: float) -> bool:
        """No request in flight on any replica for ``IDLE_MS``: the next one runs cold."""
        return all(r.inflight == 0 for r in self.reps) and \
            now - max(r.idle_at for r in self.reps) >= IDLE_MS

    def loop_cost(self, cand: str, cold: bool, *, alone: bool = False) -> tuple[float, float]:
        """A request's event-loop CPU (``LOOP_SHARE`` of the lower quartile of the least
        loaded overheads measured, the lone ones when there are: no queue is in them) and its
        delay besides (the rest of a drawn overhead: for a warm request that finds the service
        empty, one of the lone overheads that had it to themselves)."""
        warm, idle = self.loop_draws.get(cand, ((0.0,), (0.0,)))
        lone = self.alone_draws.get(cand)
        base = idle if cold else lone or warm  # the least loaded class the runs saw
        loop_ms = base[len(base) // 4] * LOOP_SHARE
        draws = idle if cold else lone if alone and lone else warm
        return loop_ms, max(0.0, self.rng.choice(draws) - loop_ms)

    def to_loop(self, r: _Replica, cost_ms: float, then: int, payload: Any) -> None:
        """Queue ``cost_ms`` of work for the replica's event loop (FIFO, sharing the core with
        the compute thread); ``then`` says what happens once it is done."""
        r.advance(self.now)
        if not r.ingest:
            r.head_left = cost_ms
        r.ingest.append((cost_ms, then, payload))
        if self.live(self.now):
            r.busy_ms += cost_ms
        self.reschedule(r)

    def on_probe_at(self, payload: Any) -> None:
        """One of the start-up's requests (step 0 the metadata, then the probe's uploads)
        reaches a replica: its loop spends the deployment's measured round trip on it
        (``startup_ms``), else a share of a request's loop CPU."""
        r = self.pick_replica()
        step = payload[1]
        if self.startup:
            key = "metadata_ms" if step == 0 else (
                "probe_small_ms" if PROBE_BYTES[step - 1] == min(PROBE_BYTES)
                else "probe_large_ms")
            self.to_loop(r, self.startup[key], _PROBE, payload)
        elif self.in_service:
            loop_ms, _ = self.loop_cost(CLOUD if CLOUD in self.loop_draws else next(
                iter(self.loop_draws), CLOUD), False)
            self.to_loop(r, loop_ms * (META_SHARE if step == 0 else PROBE_SHARE),
                         _PROBE, payload)
        else:
            self.push(self.now + self.probe_down_ms[payload[0]], _PROBED, payload)

    def on_probed(self, payload: Any) -> None:
        """A probe upload's answer: the next upload, or the estimate and the first plan."""
        dev, step, sent, samples = payload
        if step:  # step 0 is the metadata
            samples.append((PROBE_BYTES[step - 1], self.now - sent))
        if step < len(PROBE_BYTES):
            self.push(self.now + self.probe_up_ms[dev][step + 1], _PROBE_AT,
                      [dev, step + 1, self.now, samples])
            return
        self.autos[dev].probe_done(samples)
        self.on_start(dev)

    def on_ingested(self, payload: Any) -> None:
        """The request at the head of the stream is read and decoded: queue it for a batch."""
        r, version = payload
        if version != r.version:
            return
        r.advance(self.now)
        _, then, payload = r.ingest.popleft()
        if r.ingest:
            r.head_left = r.ingest[0][0]
        if then == _QUEUE:
            self.enqueue(r, payload)
        elif then == _DECODE:  # read: decoded in its own thread, as long as the run's took
            payload[9] = self.now
            self.push(self.now + payload[10], _DECODED, (r, payload))
        elif then == _ANSWER:
            self.answer(*payload)
        else:
            self.push(self.now + self.probe_down_ms[payload[0]], _PROBED, payload)
        self.reschedule(r)

    def on_decoded(self, payload: Any) -> None:
        """``in_service``: the request's decode is over; queue it for a batch."""
        r, req = payload
        r.advance(self.now)
        self.enqueue(r, req)
        self.reschedule(r)

    def enqueue(self, r: _Replica, req: _Req) -> None:
        cand = req[1]
        q = r.queues.get(cand)
        if q is None:
            q = r.queues[cand] = deque()
        q.append((self.now, req))
        r.depth += 1
        r.incoming -= 1
        if r.filling is not None and (r.incoming <= 0 or (
                r.filling == cand and len(q) >= self.inputs.batch_max)):
            self.start_batch(r, r.filling)  # full, or nothing on its way could join it
        else:
            self.kick(r)

    def on_fill(self, payload: Any) -> None:
        r, version = payload
        if version == r.fill_version and r.filling is not None and r.running is None:
            r.advance(self.now)
            self.start_batch(r, r.filling)
            self.reschedule(r)

    def on_batch_end(self, payload: Any) -> None:
        r, version = payload
        if version != r.version or r.running is None:
            return
        now = self.now
        r.advance(now)
        batch, key, n = r.running, r.key, len(r.running)
        r.running, r.busy_until = None, 0.0
        per_row = (now - r.batch_start) / n
        old = r.row_ms.get(key)
        r.row_ms[key] = per_row if old is None else old + _LOAD_ALPHA * (per_row - old)
        rows = r.batch_rows.get(key)
        if rows is not None:
            rows = r.rows_now(key, rows, now)
        r.batch_rows[key] = n if rows is None else rows + _LOAD_ALPHA * (n - rows)
        r.batch_at[key] = now
        r.last_batch[key] = n
        if self.live(now):  # the batches the window saw, as /metrics would
            r.batches += 1
            r.batched += n
            seen = self.batches_by_round[0 if self.round_ms == math.inf else int(
                (now - self.t0) // (self.round_ms + ROUND_GAP_MS))]
            seen[0] += 1
            seen[1] += n
        r.inflight -= n
        if not r.inflight:
            r.idle_at = now
        self.kick(r)
        self.reschedule(r)
        load = r.load(now, self.inputs.batch_wait_ms, self.profiled) if self.autos else None
        for enq, req in batch:
            r.queue_ms += _QUEUE_MS_ALPHA * (r.batch_start - enq - r.queue_ms)
            # what the service learns from the answer (cloud_server.routers.infer._observe)
            r.costs.observe(key, decode_ms=req[10] if self.in_service else self.decode_ms[key],
                            compute_ms=per_row, alone=n == 1)
            if self.in_service:  # the loop writes the answer, then the delay besides
                if req[4]:
                    self.to_loop(r, req[7], _ANSWER, (r, req, key, per_row, req[6], now, None, n))
                continue
            extra = self.proxy_ms
            if self.jitter_ms > 0:
                extra += self.rng.expovariate(1.0 / self.jitter_ms)
            self.answer(r, req, key, per_row, extra, None, load, n)

    def answer(self, r: _Replica, req: _Req, key: str, per_row_ms: float, extra_ms: float,
               ended: float | None = None, load: dict[str, float] | None = None,
               batch_size: int = 1) -> None:
        """The service answers ``req``; it reaches the device ``extra_ms`` + the link later
        (``ended``: when its batch ended, in_service)."""
        dev, _, start, photo, awaited = req[:5]
        now = self.now
        done = now + extra_ms + self.down_ms[dev]
        if not awaited or done - start > self.inputs.timeout_ms:
            return  # on_timeout finishes it on the device
        req[4] = False
        if self.live(done):
            self.answered += 1
        if self.autos:  # what the device's link estimator sees: all but the server
            if load is None:
                load = r.load(now, self.inputs.batch_wait_ms, self.profiled)
            up_ms = self.up_ms[dev][key]
            if ended is None:
                network_ms, decode_ms = up_ms + extra_ms + self.down_ms[dev], self.decode_ms[key]
            else:  # the round trip less the service's timings: the link, the loop's queue
                network_ms = up_ms + req[9] - req[8] + done - ended
                decode_ms = req[10]
            self.autos[dev].answered(done, load, self.inputs.request_bytes.get(key, 0.0),
                                     network_ms, key, decode_ms + per_row_ms, batch_size)
        self.finish(dev, photo, done)

    def result(self) -> SimResult:
        window_ms = self.t1 - self.t0
        lat = sorted(self.lat)
        reps = self.reps
        batches = sum(r.batches for r in reps)
        return SimResult(
            policy=self.policy, devices=self.devices, replicas=self.replicas,
            p50_ms=_quantile(lat, 0.50), p95_ms=_quantile(lat, 0.95),
            throughput_rps=self.answered / (window_ms / 1e3),
            mean_batch_size=sum(r.batched for r in reps) / batches if batches else 0.0,
            utilisation=min(1.0, sum(r.busy_ms for r in reps) / (self.replicas * window_ms)),
            ok=self.ok, rejected_503=self.rejected, fallbacks=self.fallbacks,
            timeouts=self.timeouts, choices=dict(sorted(self.choices.items())),
            by_link={name: {"photos": len(xs), "p50_ms": round(_quantile(sorted(xs), 0.5), 2),
                            "p95_ms": round(_quantile(sorted(xs), 0.95), 2)}
                     for name, xs in self.lat_by_link.items() if xs},
            by_round=tuple(
                {"photos": len(xs), "p50_ms": round(_quantile(sorted(xs), 0.5), 2),
                 "p95_ms": round(_quantile(sorted(xs), 0.95), 2),
                 "mean_batch_size": round(rows / batches, 2) if batches else 0.0}
                for xs, (batches, rows) in zip(self.lat_by_round, self.batches_by_round,
                                               strict=True)))


def _rows_half_life_ms() -> float | None:
    """``cloud_server.batching.ROWS_HALF_LIFE_S`` in ms, if this service decays its mean batch
    size (the load figures only matter to ``auto``, so only it pays for importing torch)."""
    from cloud_server import batching

    half_life_s = getattr(batching, "ROWS_HALF_LIFE_S", None)
    return None if half_life_s is None else float(half_life_s) * 1e3


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a sorted list; NaN if empty."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)
