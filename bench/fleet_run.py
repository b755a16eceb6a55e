"""One measured fleet run: N emulated devices on one policy against a running service, and
the figures of its measuring windows.

    spec = RunSpec(policy="auto", devices=32, link_mix=("lan", "wifi", "lte", "3g"),
                   period_s=1.2, warmup_s=4.0, duration_s=10.0, timeout_s=10.0, seed=0)
    run = asyncio.run(run_fleet("http://127.0.0.1:8000", inputs, spec))
    row = summarize(run.records, spec, mean_batch_size=run.mean_batch_size,
                    windows=run.windows)
    runs = asyncio.run(run_rounds(url, inputs, [spec_cloud, spec_auto, ...]))  # interleaved

A run of ``rounds`` rounds measures ``duration_s`` in ``rounds`` windows of
``duration_s / rounds``; ``run_rounds`` interleaves several policies' runs of one fleet size
(``bench.fleet_rounds.round_orders``), each policy's devices (``Fleet``: clients, breakers,
``auto`` state, photo count) kept from one of its windows to the next, and the warm-up only
before its first. Every photo taken in a window (or its warm-up) is answered before the window
ends; a window counts the photos *taken* in it (a photo stuck behind a busy device still
counts, late), and the service's throughput counts answers that *arrived* in it or after it,
to its photos' last answer (``answer_spans``). The records of
a policy's windows are pooled on one time line (each window after the previous one's last
answer), with the windows listed in ``FleetRun.windows``. The mean batch size is the service's
own (``splitserve_batch_size`` in ``/metrics``, scraped as each window opens and closes), else
the answers' ``batch_size`` averaged per request.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from bench.fleet_device import FleetDevice, FleetInputs, LinkTransport, Record
from bench.fleet_rounds import answer_spans, round_orders
from bench.netem import PROFILES
from bench.service_load import histogram_delta
from bench.stats import percentile
from device_client.auto import AutoSplit
from device_client.breaker import CircuitBreaker
from device_client.client import ServiceClient
from shared.candidates import AUTO, DEVICE

__all__ = ["Fleet", "FleetRun", "RunSpec", "by_round", "device_phase_s", "run_fleet",
           "run_rounds", "summarize"]

ROUND_GAP_S = 1.0  # between a window's last answer and the next window, on the pooled time line
Window = tuple[float, float]


@dataclass(frozen=True)
class RunSpec:
    """One run: a policy, a fleet size, and the fleet's common settings."""

    policy: str
    devices: int
    link_mix: tuple[str, ...]
    period_s: float
    warmup_s: float
    duration_s: float
    timeout_s: float
    seed: int = 0
    rounds: int = 1  # duration_s is measured in this many windows (see run_rounds)

    def __post_init__(self) -> None:
        if (self.devices < 1 or self.period_s <= 0 or self.duration_s <= 0 or self.warmup_s < 0
                or self.rounds < 1):
            raise ValueError(f"a run needs devices >= 1, period > 0, a window and rounds >= 1: "
                             f"{self}")
        unknown = [name for name in self.link_mix if name not in PROFILES]
        if not self.link_mix or unknown:
            raise ValueError(f"link_mix names links of bench.netem.PROFILES, got {unknown}")

    def link_of(self, index: int) -> str:
        """Device ``index``'s link: ``link_mix[index % len(link_mix)]``."""
        return self.link_mix[index % len(self.link_mix)]

    @property
    def window(self) -> Window:
        """The measured window of a run in one round."""
        return self.warmup_s, self.warmup_s + self.duration_s

    @property
    def round_s(self) -> float:
        """Seconds measured per round."""
        return self.duration_s / self.rounds


def device_phase_s(seed: int, index: int, period_s: float) -> float:
    """Device ``index``'s first photo, seeded: uniform in [0, period_s).

        >>> device_phase_s(0, 3, 1.0) == device_phase_s(0, 3, 1.0)
        True
    """
    return random.Random(seed * 1_000_003 + index).uniform(0.0, period_s) % period_s


@dataclass
class FleetRun:
    """What one run saw: every record (on the pooled time line), the service's mean batch in
    its windows (None: not scraped; see ``mean_batch_source``), and its measured windows."""

    records: list[Record]
    mean_batch_size: float | None
    mean_batch_source: str
    elapsed_s: float
    windows: tuple[Window, ...] = ()


class _PausableClock:
    """``time.monotonic`` that stands still while the fleet waits for the other policies'
    windows: its devices' timers (the age of link samples and of the service's load, the
    metadata's TTL, the breaker's cool-down) see one continuous run, as at this photo rate."""

    def __init__(self) -> None:
        self._paused_at: float | None = time.monotonic()
        self._paused_s = 0.0

    def __call__(self) -> float:
        now = self._paused_at if self._paused_at is not None else time.monotonic()
        return now - self._paused_s

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_s += time.monotonic() - self._paused_at
            self._paused_at = None


class Fleet:
    """One policy's ``spec.devices`` emulated devices against the service at ``url`` (each its
    own ``ServiceClient`` over its own emulated link), run one window at a time: clients
    (bound to the running event loop), breakers, ``auto`` state and photo counts carry over.

        fleet = Fleet(url, inputs, spec)
        records, before, after = await fleet.window(spec.warmup_s, spec.round_s, scraper)
        await fleet.aclose()
    """

    def __init__(self, url: str, inputs: FleetInputs, spec: RunSpec) -> None:
        self.spec = spec
        self.clock = _PausableClock()
        self.devices: list[FleetDevice] = []
        self._clients: list[ServiceClient] = []
        for i in range(spec.devices):
            client = None
            if spec.policy != DEVICE:
                client = ServiceClient(url, timeout_s=spec.timeout_s,
                                       transport=LinkTransport(PROFILES[spec.link_of(i)]))
                self._clients.append(client)
            auto = None
            if spec.policy == AUTO:
                assert client is not None
                auto = AutoSplit(client, inputs.profile, seed=spec.seed * 1_000_003 + i,
                                 clock=self.clock)
            self.devices.append(FleetDevice(
                index=i, link_name=spec.link_of(i), policy=spec.policy, client=client,
                inputs=inputs, period_s=spec.period_s,
                phase_s=device_phase_s(spec.seed, i, spec.period_s), timeout_s=spec.timeout_s,
                auto=auto, breaker=CircuitBreaker(clock=self.clock)))

    async def window(self, lead_s: float, window_s: float,
                     scraper: httpx.AsyncClient | None) -> tuple[list[Record], str | None,
                                                                 str | None]:
        """Photos for ``lead_s + window_s`` seconds from now, every one answered: the records
        (seconds since this window began) and /metrics as the measured part opened and closed
        (None: not scraped)."""
        marks = [len(d.records) for d in self.devices]
        origin = time.perf_counter() + 0.05
        end_s = lead_s + window_s
        self.clock.resume()
        try:
            tasks = [asyncio.create_task(d.run(origin, end_s)) for d in self.devices]
            before = await _scrape(scraper, origin + lead_s)
            after = await _scrape(scraper, origin + end_s)
            await asyncio.gather(*tasks)
        finally:
            self.clock.pause()
        records = [r for d, mark in zip(self.devices, marks, strict=True)
                   for r in d.records[mark:]]
        return records, before, after

    async def aclose(self) -> None:
        for c in self._clients:
            await c.aclose()


@dataclass
class _Pool:
    """One policy's windows, pooled: records shifted onto one time line, the windows on it,
    the batch-size histogram's sum and count over the windows."""

    model: str
    records: list[Record] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    offset_s: float = 0.0
    batch_sum: float = 0.0
    batch_count: float = 0.0
    scraped: bool = True
    elapsed_s: float = 0.0

    def add(self, records: list[Record], lead_s: float, window_s: float, before: str | None,
            after: str | None, elapsed_s: float) -> None:
        start = self.offset_s + lead_s
        self.windows.append((start, start + window_s))
        self.records += [_shifted(r, self.offset_s) for r in records]
        self.offset_s += max([lead_s + window_s, *(r.done_s for r in records)]) + ROUND_GAP_S
        self.elapsed_s += elapsed_s
        if before is None or after is None:
            self.scraped = False
        else:
            total, count = histogram_delta(before, after, "splitserve_batch_size",
                                           {"model": self.model})
            self.batch_sum, self.batch_count = self.batch_sum + total, self.batch_count + count

    def run(self) -> FleetRun:
        batch, source = None, "none"
        if self.scraped and self.batch_count > 0:
            batch, source = self.batch_sum / self.batch_count, "metrics"
        else:
            sizes = [r.batch_size for r in self.records
                     if r.batch_size is not None and _within(r.done_s, self.windows)]
            if sizes:
                batch, source = sum(sizes) / len(sizes), "answers"
        return FleetRun(self.records, batch, source, self.elapsed_s, tuple(self.windows))


def _shifted(record: Record, offset_s: float) -> Record:
    """``record`` moved ``offset_s`` later, every time in it (``sent_s`` too: the served
    times' cold and alone classes and the device lag read it beside the others)."""
    if not offset_s:
        return record
    sent_s = None if record.sent_s is None else record.sent_s + offset_s
    return replace(record, photo_s=record.photo_s + offset_s, start_s=record.start_s + offset_s,
                   done_s=record.done_s + offset_s, sent_s=sent_s)


def _within(t: float, windows: Sequence[Window]) -> bool:
    return any(start <= t < end for start, end in windows)


async def run_fleet(url: str, inputs: FleetInputs, spec: RunSpec, *, scrape_metrics: bool = True
                    ) -> FleetRun:
    """Run ``spec`` against the service at ``url`` (its rounds one after another) and collect
    every photo's record."""
    return (await run_rounds(url, inputs, [spec], scrape_metrics=scrape_metrics,
                             pause_s=0.0))[0]


async def run_rounds(url: str, inputs: FleetInputs, specs: Sequence[RunSpec], *,
                     scrape_metrics: bool = True, pause_s: float = 0.5,
                     on_window: Callable[[RunSpec, int], None] | None = None
                     ) -> list[FleetRun]:
    """Run several policies' ``specs`` (one fleet size, the same ``rounds``) interleaved: in
    each round every spec gets one window of ``round_s``, in ``round_orders``'s order, with its
    warm-up before its first window only; ``pause_s`` after each window lets the service's queue
    and load figures settle. One ``FleetRun`` per spec, in the order given. Call it in one
    event loop (one ``asyncio.run``) per fleet size: the clients are bound to it."""
    rounds = {s.rounds for s in specs}
    if len(rounds) > 1:
        raise ValueError(f"interleaved runs need the same number of rounds, got {rounds}")
    fleets = [Fleet(url, inputs, s) for s in specs]
    pools = [_Pool(inputs.model) for _ in specs]
    scraper = httpx.AsyncClient(base_url=url, timeout=10.0) if scrape_metrics else None
    try:
        for r, order in enumerate(round_orders(len(specs), rounds.pop()) if specs else []):
            for i in order:
                spec = specs[i]
                if on_window is not None:
                    on_window(spec, r)
                lead_s = spec.warmup_s if r == 0 else 0.0
                _freeze_heap()
                started = time.perf_counter()
                records, before, after = await fleets[i].window(lead_s, spec.round_s, scraper)
                pools[i].add(records, lead_s, spec.round_s, before, after,
                             time.perf_counter() - started)
                if pause_s > 0:
                    await asyncio.sleep(pause_s)
    finally:
        gc.unfreeze()  # what is frozen is collected as usual again once the rounds are over
        for fleet in fleets:
            await fleet.aclose()
        if scraper is not None:
            await scraper.aclose()
    return [p.run() for p in pools]


def _freeze_heap() -> None:
    """Before a window: collect, then keep what is alive out of later collections
    (``gc.freeze``, as ``cloud_server.memory.freeze_heap`` does for the service). This process
    holds torch, the clients and every record so far; a full collection walked them in ~120 ms
    on the devices' one core, stalling every emulated device at once and then releasing their
    requests together, which no fleet of real devices does. In a window collections walk only
    that window's allocations."""
    gc.collect()
    gc.freeze()


async def _scrape(client: httpx.AsyncClient | None, at: float) -> str | None:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    if client is None:
        return None
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def _rounded(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def summarize(records: Sequence[Record], spec: RunSpec, *, engine: str = "uvicorn",
              replicas: int = 1, mean_batch_size: float | None = None,
              mean_batch_source: str = "none",
              windows: Sequence[Window] | None = None) -> dict[str, Any]:
    """One ``fleet.json`` run row from a run's records (pure), over its measured ``windows``
    (``FleetRun.windows``; default ``spec.window``)."""
    windows = windows or [spec.window]
    spans = answer_spans(records, windows)
    measured_s = sum(end - start for start, end in spans)
    inside = [r for r in records if _within(r.photo_s, windows)]
    answered = [r for r in inside if r.outcome != "error"]
    latencies = [r.latency_ms for r in answered]
    served = [r for r in records if r.served and any(a <= r.done_s <= b for a, b in spans)]
    by_link: dict[str, Any] = {}
    for link in dict.fromkeys(spec.link_mix):
        mine = [r.latency_ms for r in answered if r.link == link]
        if mine:
            by_link[link] = {"photos": len(mine), "p50_ms": _rounded(percentile(mine, 50)),
                             "p95_ms": _rounded(percentile(mine, 95))}
    row: dict[str, Any] = {
        "engine": engine,
        "replicas": replicas,
        "policy": spec.policy,
        "devices": spec.devices,
        "p50_ms": _rounded(percentile(latencies, 50)),
        "p95_ms": _rounded(percentile(latencies, 95)),
        "throughput_rps": round(len(served) / measured_s, 2),
        "mean_batch_size": _rounded(mean_batch_size),
        "ok": sum(r.outcome == "ok" for r in inside),
        "rejected_503": sum(r.rejected_503 for r in inside),
        "fallbacks": sum(r.fallback for r in inside),
        "errors": sum(r.outcome == "error" for r in inside),
        "timeouts": sum(r.outcome == "timeout" for r in inside),
        "photos": len(inside),
        "duration_s": spec.duration_s,
        "rounds": spec.rounds,
        "period_ms": round(spec.period_s * 1e3, 3),
        "mean_batch_source": mean_batch_source,
        "by_link": by_link,
        "by_round": by_round(records, windows),
        "error_kinds": dict(Counter(r.error for r in inside if r.outcome == "error")),
    }
    if spec.policy == AUTO:
        row["choices"] = dict(Counter(r.candidate for r in inside).most_common())
        row["choices_by_link"] = {
            link: dict(Counter(r.candidate for r in inside if r.link == link).most_common())
            for link in dict.fromkeys(spec.link_mix)}
    return row


def by_round(records: Sequence[Record], windows: Sequence[Window]) -> list[dict[str, Any]]:
    """Per measured window (a round's): its photos' p50 and p95, the answers that arrived in it
    per second, and the batches they rode in (mean rows and mean forward pass, from the answers'
    own batch size and compute time). A saturated run's rounds differ (only round 0 follows a
    warm-up; the others start empty), and the simulation is checked against them round by round
    (``bench.fleet_sim.validate``)."""
    out = []
    for (start, end), (_, last) in zip(windows, answer_spans(records, windows), strict=True):
        mine = [r.latency_ms for r in records if start <= r.photo_s < end and r.outcome != "error"]
        served = [r for r in records if r.served and start <= r.done_s <= last]
        # every request of a batch reports the batch's compute: one batch per distinct pair
        batches = {(r.candidate, r.batch_size, r.compute_ms) for r in served
                   if r.batch_size and r.compute_ms is not None}
        out.append({
            "photos": len(mine),
            "p50_ms": _rounded(percentile(mine, 50)),
            "p95_ms": _rounded(percentile(mine, 95)),
            "throughput_rps": round(len(served) / (last - start), 2) if last > start else None,
            "mean_batch_size": _rounded(sum(b[1] for b in batches) / len(batches))
            if batches else None,
            "mean_compute_ms": _rounded(sum(b[2] for b in batches) / len(batches))
            if batches else None,
        })
    return out


def bar(runs: Sequence[Mapping[str, Any]], *, max_ratio: float = 1.10) -> list[dict[str, Any]]:
    """Issue 11's bar per (engine, replicas, devices) that has an ``auto`` run: auto's p95 over
    the best fixed policy's p95 in the same run set, and, for the largest fleet of each engine,
    whether auto had no errors and no timeouts."""
    groups: dict[tuple[str, int, int], list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["engine"], r["replicas"], r["devices"]), []).append(r)
    largest: dict[tuple[str, int], int] = {}
    for engine, replicas, n in groups:
        largest[engine, replicas] = max(n, largest.get((engine, replicas), 0))
    out = []
    for (engine, replicas, n), rows in sorted(groups.items()):
        auto = next((r for r in rows if r["policy"] == AUTO), None)
        fixed = [r for r in rows if r["policy"] != AUTO and r["p95_ms"] is not None]
        if auto is None or auto["p95_ms"] is None or not fixed:
            continue
        best = min(fixed, key=lambda r: r["p95_ms"])
        ratio = auto["p95_ms"] / best["p95_ms"] if best["p95_ms"] > 0 else None
        entry: dict[str, Any] = {
            "engine": engine, "replicas": replicas, "devices": n,
            "auto_p95_ms": auto["p95_ms"], "best_fixed": best["policy"],
            "best_fixed_p95_ms": best["p95_ms"], "ratio": _rounded(ratio, 3),
            "ratio_met": ratio is not None and ratio <= max_ratio,
            "fixed_policies": [r["policy"] for r in fixed],
        }
        if n == largest[engine, replicas]:
            entry["largest"] = True
            entry["clean_met"] = auto["errors"] == 0 and auto["timeouts"] == 0
        out.append(entry)
    return out
