"""Steady load on the live service, watching its resident memory.

    soak = run_soak(service, path, frame, requests=10_000, concurrency=8, warmup=500)
    soak.rss_growth, soak.errors                  # fraction of the post-warm-up RSS; count

Pre-encoded frames go to one split point over ``concurrency`` keep-alive connections. The
service's RSS comes from ``/proc/<pid>/status`` (``VmRSS``), sampled as requests complete;
the baseline is taken after ``warmup`` requests, when allocator pools and lazy torch state have
settled, so growth past it is what a leak would look like.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from device_client.local_service import LocalService
from shared import wire
from shared.preprocess import preprocess

if TYPE_CHECKING:
    from PIL import Image

    from device_client.runtime import DeviceRuntime

__all__ = ["SoakReport", "rss_bytes", "run_soak", "soak_frames", "soak_local_service"]


def soak_frames(runtime: DeviceRuntime, photos: dict[str, Image.Image], split: str) -> list[bytes]:
    """One real frame per photo at ``split``, encoded once: the soak measures the service."""
    point = runtime.point(split)
    return [
        runtime.encode(
            point,
            runtime.run_head(point, preprocess(image, runtime.spec.preprocessing)),
            f"soak-{name}",
        )
        for name, image in photos.items()
    ]


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``, from ``/proc/<pid>/status`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"no VmRSS for process {pid}")


@dataclass
class SoakReport:
    requests: int
    warmup: int
    concurrency: int
    errors: int
    error_examples: list[str]
    seconds: float
    rss_start: int  # after the warm-up
    rss_end: int
    rss_peak: int
    samples: list[tuple[int, float, int]] = field(repr=False)  # (requests done, seconds, RSS)

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_start) / self.rss_start

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "warmup": self.warmup,
            "concurrency": self.concurrency,
            "errors": self.errors,
            "error_examples": self.error_examples,
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(self.requests_per_s, 1),
            "rss_start_bytes": self.rss_start,
            "rss_end_bytes": self.rss_end,
            "rss_peak_bytes": self.rss_peak,
            "rss_growth": round(self.rss_growth, 4),
            "samples": [[n, round(t, 2), rss] for n, t, rss in self.samples],
        }


def run_soak(
    base_url: str,
    pid: int,
    path: str,
    frames: list[bytes],
    *,
    requests: int,
    concurrency: int = 8,
    warmup: int = 500,
    samples: int = 200,
) -> SoakReport:
    """``warmup`` requests, then ``requests`` more, cycling through ``frames``; every non-200
    answer or transport error counts as an error."""
    return asyncio.run(_soak(base_url, pid, path, frames, requests, concurrency, warmup, samples))


async def _soak(
    base_url: str,
    pid: int,
    path: str,
    frames: list[bytes],
    requests: int,
    concurrency: int,
    warmup: int,
    n_samples: int,
) -> SoakReport:
    headers = {"Content-Type": wire.CONTENT_TYPE}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    errors: list[str] = []
    error_count = 0

    async def drive(http: httpx.AsyncClient, total: int, on_done: Any) -> None:
        issued = 0

        async def worker() -> None:
            nonlocal issued, error_count
            while issued < total:
                i = issued
                issued += 1
                try:
                    r = await http.post(path, content=frames[i % len(frames)], headers=headers)
                    if r.status_code != 200:
                        raise RuntimeError(f"{r.status_code}: {r.text[:100]}")
                except (httpx.HTTPError, RuntimeError) as exc:
                    error_count += 1
                    if len(errors) < 10:
                        errors.append(f"{type(exc).__name__}: {exc}")
                on_done()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        await drive(http, warmup, lambda: None)
        rss_start = rss_bytes(pid)
        every = max(1, requests // n_samples)
        done = 0
        started = time.perf_counter()
        series: list[tuple[int, float, int]] = [(0, 0.0, rss_start)]

        def on_done() -> None:
            nonlocal done
            done += 1
            if done % every == 0 or done == requests:
                series.append((done, time.perf_counter() - started, rss_bytes(pid)))

        await drive(http, requests, on_done)
        seconds = time.perf_counter() - started
    rss_end = rss_bytes(pid)
    return SoakReport(
        requests,
        warmup,
        concurrency,
        error_count,
        errors,
        seconds,
        rss_start,
        rss_end,
        max(rss for _, _, rss in series),
        series,
    )


def soak_local_service(
    model: str,
    split: str,
    frames: list[bytes],
    *,
    requests: int,
    concurrency: int,
    warmup: int = 500,
) -> tuple[SoakReport, bool]:
    """``run_soak`` against a fresh service on loopback (start-up profiling off: the soak
    measures serving, not start-up), and whether the service was still alive at the end."""
    with LocalService(models=[model], env={"SPLITSERVE_PROFILE_REPEATS": "0"}) as service:
        assert service.process is not None
        report = run_soak(
            service.url,
            service.process.pid,
            f"/v2/models/{model}/splits/{split}/infer",
            frames,
            requests=requests,
            concurrency=concurrency,
            warmup=warmup,
        )
        return report, service.process.poll() is None
