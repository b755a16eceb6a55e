"""The load generator of ``bench service``: closed-loop HTTP clients, and what their answers mean.

    frames = [LoadFrame("chelsea", body, expected=285)]
    level = asyncio.run(run_level(url, frames, concurrency=16, warmup_s=3, duration_s=12,
                                  timeout_s=30))
    stats = summarize(16, level.samples, window=(3.0, 15.0))

Each of ``concurrency`` clients is an asyncio task with its own keep-alive connection
(``bench.service_http``, a minimal HTTP/1.1 client far lighter than httpx); it posts
pre-encoded frames back to back, so at most ``concurrency`` requests are in flight. No torch
work happens here: a client only sends bytes and reads the top-1 class out of the JSON answer.

Every answer falls into one of three outcomes (``classify``):

- ``ok``: 200, and the top-1 class is the one the device computed locally for that frame;
- ``rejected``: a 503 that says ``Retry-After`` and came back within ``FAST_REJECT_S`` (the
  service's backpressure working as designed);
- ``error``: anything else: another status, a wrong or unreadable answer, a slow 503 or one
  without ``Retry-After``, a client timeout, a connection error.

A rejected or failed client backs off before its next request (``Retry-After``, at most a
second) as a well-behaved device would, rather than spinning on the error.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from bench.service_http import Connection, HttpError
from bench.stats import percentile
from shared import wire

__all__ = [
    "FAST_REJECT_S",
    "Classified",
    "LevelRun",
    "LevelStats",
    "LoadFrame",
    "Sample",
    "classify",
    "histogram_delta",
    "histogram_mean",
    "process_cpu_s",
    "run_level",
    "summarize",
]

Outcome = Literal["ok", "rejected", "error"]

FAST_REJECT_S = 1.0  # a 503 slower than this did not spare the client any waiting: an error
_ERROR_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 1.0


@dataclass(frozen=True)
class LoadFrame:
    """One request body and the top-1 class the service must answer for it."""

    name: str
    body: bytes
    expected: int


@dataclass(frozen=True)
class Classified:
    """What one answer meant. ``reason`` names the kind of error (empty unless ``error``)."""

    outcome: Outcome
    reason: str = ""
    batch_size: int | None = None
    server_ms: Mapping[str, float] | None = None  # the answer's timings_ms
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Sample:
    """One request: when it was sent and answered (seconds from the level's start), and what the
    answer meant."""

    sent_s: float
    done_s: float
    result: Classified

    @property
    def latency_ms(self) -> float:
        return (self.done_s - self.sent_s) * 1e3


def classify(
    status: int | None,
    *,
    headers: Mapping[str, str],
    body: bytes,
    expected: int,
    elapsed_s: float,
    error: str | None = None,
) -> Classified:
    """Sort one answer into ok / rejected / error (see the module docstring).

    ``status`` is None when no response came back; ``error`` then says why (``timeout``,
    ``ConnectError``...).

        classify(200, headers={}, body=b'{"top_k": [[{"index": 3}]], "batch_size": 2}',
                 expected=3, elapsed_s=0.01).outcome  # 'ok'
    """
    if status is None:
        return Classified("error", error or "no response")
    if status == 503:
        retry_after = _retry_after_s(headers)
        if retry_after is None:
            return Classified("error", "503 without Retry-After")
        if elapsed_s > FAST_REJECT_S:
            return Classified("error", "slow 503", retry_after_s=retry_after)
        return Classified("rejected", retry_after_s=retry_after)
    if status != 200:
        return Classified("error", f"status {status}")
    try:
        doc = json.loads(body)
        top1 = int(doc["top_k"][0][0]["index"])
        batch_size = int(doc["batch_size"])
        timings = {str(k): float(v) for k, v in doc.get("timings_ms", {}).items()}
    except (ValueError, TypeError, KeyError, IndexError):
        return Classified("error", "unreadable 200 body")
    if top1 != expected:
        return Classified("error", "wrong class", batch_size, timings)
    return Classified("ok", "", batch_size, timings)


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date is legal, but this service never sends one
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


@dataclass(frozen=True)
class LevelStats:
    """One concurrency level's results. ``ok``, ``rejected_503``, throughput and latency count the
    requests answered inside the measuring window; ``errors`` counts every error of the level,
    warm-up and drain included, so none can hide at the window's edges."""

    concurrency: int
    duration_s: float
    ok: int
    rejected_503: int
    errors: int
    error_kinds: dict[str, int]
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch_size: float | None  # samples per forward pass (from /metrics)
    mean_batch_size_per_request: float | None  # what the answers' batch_size says, on average
    server_ms: dict[str, float]  # mean timings_ms of the ok answers: decode, queue, compute
    # The service process's CPU time per answer (any outcome) and its share of the service's
    # cores: near 1 means CPU-bound, so lost efficiency is per-request overhead, not idling.
    service_cpu_ms_per_answer: float | None = None
    service_cpu_utilization: float | None = None
    client_cpu_ms_per_answer: float | None = None  # what the load generator itself cost

    def efficiency(self, raw_compute_rps: float) -> float:
        return self.throughput_rps / raw_compute_rps if raw_compute_rps > 0 else 0.0

    def to_json(self, raw_compute_rps: float) -> dict[str, Any]:
        def rounded(x: float | None, digits: int = 2) -> float | None:
            return None if x is None else round(x, digits)

        return {
            "concurrency": self.concurrency,
            "throughput_rps": round(self.throughput_rps, 2),
            "efficiency": round(self.efficiency(raw_compute_rps), 4),
            "p50_ms": rounded(self.p50_ms),
            "p99_ms": rounded(self.p99_ms),
            "mean_batch_size": rounded(self.mean_batch_size),
            "mean_batch_size_per_request": rounded(self.mean_batch_size_per_request),
            "ok": self.ok,
            "rejected_503": self.rejected_503,
            "errors": self.errors,
            "error_kinds": dict(sorted(self.error_kinds.items())),
            "duration_s": round(self.duration_s, 2),
            "server_ms": {k: round(v, 3) for k, v in sorted(self.server_ms.items())},
            "service_cpu_ms_per_answer": rounded(self.service_cpu_ms_per_answer, 3),
            "service_cpu_utilization": rounded(self.service_cpu_utilization, 3),
            "client_cpu_ms_per_answer": rounded(self.client_cpu_ms_per_answer, 3),
        }


def summarize(
    concurrency: int,
    samples: Sequence[Sample],
    *,
    window: tuple[float, float],
    mean_batch_size: float | None = None,
    service_cpu_s: float | None = None,
    service_cores: int = 1,
    client_cpu_s: float | None = None,
) -> LevelStats:
    """Aggregate one level's samples; ``window`` is (start, end) in the samples' clock.

    ``mean_batch_size`` comes from the service's /metrics; without it, the mean of the answers'
    ``batch_size`` stands in (it weighs a batch by its requests, so it reads higher).
    ``service_cpu_s`` is the CPU time the service used during the window, on ``service_cores``;
    ``client_cpu_s`` the load generator's.
    """
    start, end = window
    if end <= start:
        raise ValueError(f"empty measuring window {window}")
    inside = [s for s in samples if start <= s.done_s <= end]
    ok = [s for s in inside if s.result.outcome == "ok"]
    errors = [s for s in samples if s.result.outcome == "error"]
    kinds: dict[str, int] = {}
    for s in errors:
        kinds[s.result.reason] = kinds.get(s.result.reason, 0) + 1
    latencies = [s.latency_ms for s in ok]
    sizes = [s.result.batch_size for s in ok if s.result.batch_size is not None]
    per_request = sum(sizes) / len(sizes) if sizes else None
    server: dict[str, list[float]] = {}
    for s in ok:
        for key, ms in (s.result.server_ms or {}).items():
            server.setdefault(key, []).append(ms)
    return LevelStats(
        concurrency=concurrency,
        duration_s=end - start,
        ok=len(ok),
        rejected_503=sum(s.result.outcome == "rejected" for s in inside),
        errors=len(errors),
        error_kinds=kinds,
        throughput_rps=len(ok) / (end - start),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        mean_batch_size=mean_batch_size if mean_batch_size is not None else per_request,
        mean_batch_size_per_request=per_request,
        server_ms={k: sum(v) / len(v) for k, v in server.items()},
        service_cpu_ms_per_answer=(
            service_cpu_s * 1e3 / len(inside) if service_cpu_s is not None and inside else None
        ),
        service_cpu_utilization=(
            service_cpu_s / ((end - start) * service_cores) if service_cpu_s is not None else None
        ),
        client_cpu_ms_per_answer=(
            client_cpu_s * 1e3 / len(inside) if client_cpu_s is not None and inside else None
        ),
    )




def histogram_mean(before: str, after: str, name: str, labels: Mapping[str, str]) -> float | None:
    """Mean of the observations a Prometheus histogram got between two scrapes of /metrics
    (``_sum`` and ``_count`` deltas of the series matching ``labels``); None if it got none."""
    total, count = histogram_delta(before, after, name, labels)
    return total / count if count > 0 else None


def histogram_delta(before: str, after: str, name: str, labels: Mapping[str, str]
                    ) -> tuple[float, float]:
    """``(sum, count)`` a Prometheus histogram gained between two scrapes of /metrics, over the
    series matching ``labels``: deltas of several windows add up to their pooled mean."""

    def totals(text: str) -> tuple[float, float]:
        got = {f"{name}_sum": 0.0, f"{name}_count": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in got and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    got[sample.name] += sample.value
        return got[f"{name}_sum"], got[f"{name}_count"]

    sum_before, count_before = totals(before)
    sum_after, count_after = totals(after)
    return sum_after - sum_before, count_after - count_before


@dataclass
class LevelRun:
    """What ``run_level`` saw: every sample (clock: seconds since the level started), and
    snapshots taken as the measuring window opened and closed: /metrics text (None if it could
    not be scraped) and the service's CPU seconds (None without a probe)."""

    samples: list[Sample]
    metrics: tuple[str, str] | None = None
    cpu_s: tuple[float, float] | None = None
    client_cpu_s: float = 0.0  # this process's CPU time during the window: the generator's cost


async def run_level(
    url: str,
    frames: Sequence[LoadFrame],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    timeout_s: float,
    metrics_url: str | None = None,
    cpu_probe: Callable[[], float] | None = None,
) -> LevelRun:
    """Load ``url`` with ``concurrency`` closed-loop clients for ``warmup_s + duration_s``, then
    wait for the requests in flight. As the window opens and closes, scrape ``metrics_url`` and
    read ``cpu_probe()`` (the service's CPU seconds)."""
    if not frames or concurrency < 1:
        raise ValueError("need at least one frame and one client")
    host, port, path = _split_url(url)
    origin = time.perf_counter()
    window_end = warmup_s + duration_s
    samples: list[Sample] = []

    async def client(index: int) -> None:
        conn = Connection(host, port)
        i = index  # clients start on different frames, so batches mix them
        try:
            while time.perf_counter() - origin < window_end:
                frame = frames[i % len(frames)]
                i += 1
                sent = time.perf_counter() - origin
                status: int | None = None
                answer: Mapping[str, str] = {}
                body, error = b"", None
                try:
                    status, answer, body = await conn.post(
                        path, frame.body, content_type=wire.CONTENT_TYPE, timeout_s=timeout_s
                    )
                except TimeoutError:
                    error = "timeout"
                except HttpError as exc:
                    error = exc.kind
                done = time.perf_counter() - origin
                result = classify(
                    status,
                    headers=answer,
                    body=body,
                    expected=frame.expected,
                    elapsed_s=done - sent,
                    error=error,
                )
                samples.append(Sample(sent, done, result))
                if result.outcome != "ok":
                    await asyncio.sleep(
                        min(result.retry_after_s or _ERROR_BACKOFF_S, _MAX_BACKOFF_S)
                    )
        finally:
            await conn.close()

    async def snapshot(at_s: float, conn: Connection | None) -> tuple[str | None, float | None]:
        await asyncio.sleep(max(0.0, at_s - (time.perf_counter() - origin)))
        cpu = cpu_probe() if cpu_probe is not None else None
        text = None
        if conn is not None and metrics_url is not None:
            try:
                status, _, body = await conn.get(_split_url(metrics_url)[2], timeout_s=timeout_s)
                text = body.decode() if status == 200 else None
            except (TimeoutError, HttpError):
                text = None  # the batch size then comes from the answers
        return text, cpu

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    scraper = None
    if metrics_url is not None:
        scraper = Connection(*_split_url(metrics_url)[:2])
    try:
        text0, cpu0 = await snapshot(warmup_s, scraper)
        own0 = time.process_time()
        text1, cpu1 = await snapshot(window_end, scraper)
        own1 = time.process_time()
    finally:
        if scraper is not None:
            await scraper.close()
    await asyncio.gather(*tasks)
    return LevelRun(
        samples,
        (text0, text1) if text0 is not None and text1 is not None else None,
        (cpu0, cpu1) if cpu0 is not None and cpu1 is not None else None,
        own1 - own0,
    )


def _split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the load generator speaks plain http to a host, got {url!r}")
    path = parts.path or "/"
    return parts.hostname, parts.port or 80, path + (f"?{parts.query}" if parts.query else "")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
