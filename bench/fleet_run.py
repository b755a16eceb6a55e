"""One measured fleet run: N emulated devices on one policy against a running service, and
the figures of its measuring window.

    spec = RunSpec(policy="auto", devices=32, link_mix=("lan", "wifi", "lte", "3g"),
                   period_s=1.2, warmup_s=4.0, duration_s=10.0, timeout_s=10.0, seed=0)
    run = asyncio.run(run_fleet("http://127.0.0.1:8000", inputs, spec))
    row = summarize(run.records, spec, mean_batch_size=run.mean_batch_size)

Every photo taken in ``[0, warmup_s + duration_s)`` is answered before ``run_fleet`` returns;
the window counts photos *taken* in ``[warmup_s, warmup_s + duration_s)`` (a photo stuck behind
a busy device still counts, late), and the service's throughput counts answers that *arrived*
in it. The mean batch size is the service's own (``splitserve_batch_size`` in ``/metrics``,
scraped as the window opens and closes), else the answers' ``batch_size`` averaged per request.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.fleet_device import FleetDevice, FleetInputs, LinkTransport, Record
from bench.netem import PROFILES
from bench.service_load import histogram_mean
from bench.stats import percentile
from device_client.auto import AutoSplit
from device_client.client import ServiceClient
from shared.candidates import AUTO, DEVICE

__all__ = ["FleetRun", "RunSpec", "device_phase_s", "run_fleet", "summarize"]


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

    def __post_init__(self) -> None:
        if self.devices < 1 or self.period_s <= 0 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError(f"a run needs devices >= 1, period > 0 and a window: {self}")
        unknown = [name for name in self.link_mix if name not in PROFILES]
        if not self.link_mix or unknown:
            raise ValueError(f"link_mix names links of bench.netem.PROFILES, got {unknown}")

    def link_of(self, index: int) -> str:
        """Device ``index``'s link: ``link_mix[index % len(link_mix)]``."""
        return self.link_mix[index % len(self.link_mix)]

    @property
    def window(self) -> tuple[float, float]:
        return self.warmup_s, self.warmup_s + self.duration_s


def device_phase_s(seed: int, index: int, period_s: float) -> float:
    """Device ``index``'s first photo, seeded: uniform in [0, period_s).

        >>> device_phase_s(0, 3, 1.0) == device_phase_s(0, 3, 1.0)
        True
    """
    return random.Random(seed * 1_000_003 + index).uniform(0.0, period_s) % period_s


@dataclass
class FleetRun:
    """What one run saw: every record, and the service's mean batch in the window (None: not
    scraped; see ``mean_batch_source``)."""

    records: list[Record]
    mean_batch_size: float | None
    mean_batch_source: str
    elapsed_s: float


async def run_fleet(url: str, inputs: FleetInputs, spec: RunSpec, *, scrape_metrics: bool = True
                    ) -> FleetRun:
    """Run ``spec`` against the service at ``url`` (each device its own ``ServiceClient`` over
    its own emulated link) and collect every photo's record."""
    started = time.perf_counter()
    devices, clients = [], []
    for i in range(spec.devices):
        client = None
        if spec.policy != DEVICE:
            client = ServiceClient(url, timeout_s=spec.timeout_s,
                                   transport=LinkTransport(PROFILES[spec.link_of(i)]))
            clients.append(client)
        auto = None
        if spec.policy == AUTO:
            assert client is not None
            auto = AutoSplit(client, inputs.profile, seed=spec.seed * 1_000_003 + i)
        devices.append(FleetDevice(
            index=i, link_name=spec.link_of(i), policy=spec.policy, client=client, inputs=inputs,
            period_s=spec.period_s, phase_s=device_phase_s(spec.seed, i, spec.period_s),
            timeout_s=spec.timeout_s, auto=auto))
    scraper = httpx.AsyncClient(base_url=url, timeout=10.0) if scrape_metrics else None
    origin = time.perf_counter() + 0.05
    end_s = spec.warmup_s + spec.duration_s
    try:
        tasks = [asyncio.create_task(d.run(origin, end_s)) for d in devices]
        before = await _scrape(scraper, origin + spec.warmup_s)
        after = await _scrape(scraper, origin + end_s)
        await asyncio.gather(*tasks)
    finally:
        for c in clients:
            await c.aclose()
        if scraper is not None:
            await scraper.aclose()
    records = [r for d in devices for r in d.records]
    batch, source = None, "none"
    if before is not None and after is not None:
        batch = histogram_mean(before, after, "splitserve_batch_size", {"model": inputs.model})
        source = "metrics" if batch is not None else "none"
    if batch is None:
        start, end = spec.window
        sizes = [r.batch_size for r in records
                 if r.batch_size is not None and start <= r.done_s < end]
        if sizes:
            batch, source = sum(sizes) / len(sizes), "answers"
    return FleetRun(records, batch, source, time.perf_counter() - started)


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
              mean_batch_source: str = "none") -> dict[str, Any]:
    """One ``fleet.json`` run row from a run's records (pure)."""
    start, end = spec.window
    inside = [r for r in records if start <= r.photo_s < end]
    answered = [r for r in inside if r.outcome != "error"]
    latencies = [r.latency_ms for r in answered]
    served = [r for r in records if r.served and start <= r.done_s < end]
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
        "throughput_rps": round(len(served) / spec.duration_s, 2),
        "mean_batch_size": _rounded(mean_batch_size),
        "ok": sum(r.outcome == "ok" for r in inside),
        "rejected_503": sum(r.rejected_503 for r in inside),
        "fallbacks": sum(r.fallback for r in inside),
        "errors": sum(r.outcome == "error" for r in inside),
        "timeouts": sum(r.outcome == "timeout" for r in inside),
        "photos": len(inside),
        "duration_s": spec.duration_s,
        "mean_batch_source": mean_batch_source,
        "by_link": by_link,
        "error_kinds": dict(Counter(r.error for r in inside if r.outcome == "error")),
    }
    if spec.policy == AUTO:
        row["choices"] = dict(Counter(r.candidate for r in inside).most_common())
        row["choices_by_link"] = {
            link: dict(Counter(r.candidate for r in inside if r.link == link).most_common())
            for link in dict.fromkeys(spec.link_mix)}
    return row


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
