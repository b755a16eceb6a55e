"""Fault scenarios over real sockets, each measured: the service killed in the middle of a run
and restarted on the same port, a stalled connection, overload, and the device CLI against
services that fail in every way.

    kill = kill_and_restart(runtime, photos, expected)   # KillReport: results, fallbacks, ...
    stall = stalled_connection(runtime, photos["coffee"], expected["coffee"], deadline_s=1.0)
    load = overload(runtime, photos, expected)
    cli = [cli_against(b, image_path, fallback=f) for b in BEHAVIOURS for f in (True, False)]

Each returns plain figures; the tests assert on them and record them (``tests.support.figures``) for
``python -m bench reliability``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from device_client.breaker import CircuitBreaker
from device_client.client import ServiceClient
from device_client.local_service import LocalService
from device_client.pipeline import Device
from device_client.results import InferenceResult
from device_client.runtime import DeviceRuntime
from shared import wire
from shared.predictions import top_k
from shared.preprocess import preprocess
from tests.support.fakes import BEHAVIOURS, FakeService

__all__ = [
    "CliOutcome",
    "KillReport",
    "OverloadReport",
    "StallReport",
    "cli_against",
    "cli_against_all",
    "kill_and_restart",
    "local_top1",
    "overload",
    "stalled_connection",
]

FAST_START = {"SPLITSERVE_PROFILE_REPEATS": "0"}


def local_top1(runtime: DeviceRuntime, photos: Mapping[str, Image.Image]) -> dict[str, int]:
    """Top-1 class of unsplit float32 inference on the device, per photo: the reference."""
    out = {}
    for name, image in photos.items():
        logits = runtime.run_full(preprocess(image, runtime.spec.preprocessing))
        out[name] = top_k(logits, runtime.labels, 1)[0][0].index
    return out


def _reason(result: InferenceResult) -> str:
    return (result.fallback or "none").split(":")[0]


# --- killed mid-run, then restarted -------------------------------------------------------------


@dataclass
class KillReport:
    requests: int
    results: int
    killed_at: int  # index of the request in flight when SIGKILL landed
    split_before: int  # answered by the service before the kill
    fell_back: int  # finished on the device after the kill
    reasons: dict[str, int]
    top1_matches: int  # results whose top-1 equals unsplit local inference
    restart_s: float  # the new service's start, to it answering ready
    back_after_requests: int  # requests from "new service ready" to the first split answer
    back_after_s: float  # seconds from "new service ready" to the first split answer
    breaker: str

    @property
    def ok(self) -> bool:
        return (
            self.results == self.requests == self.top1_matches
            and self.split_before == self.killed_at
            and self.fell_back == self.requests - self.killed_at
            and self.back_after_requests >= 1
        )


async def _never_finishes(url: str, model: str, split: str) -> None:
    """A split request whose body trickles and never ends: until the service dies, it counts
    as on its way to the batcher, which therefore waits its queue delay for it."""
    async def body() -> AsyncIterator[bytes]:
        yield b"\x00"
        await asyncio.sleep(30)

    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await client.post(f"{url}/v2/models/{model}/splits/{split}/infer", content=body(),
                              headers={"Content-Type": wire.CONTENT_TYPE})
    except httpx.HTTPError:
        pass  # the service was killed under it, as intended


def kill_and_restart(
    runtime: DeviceRuntime,
    photos: Mapping[str, Image.Image],
    expected: Mapping[str, int],
    *,
    requests: int = 30,
    kill_at: int = 10,
    split: str = "_blocks.9",
    restart_timeout_s: float = 120.0,
) -> KillReport:
    """``requests`` images in sequence through the real ``Device``; SIGKILL lands while request
    ``kill_at`` is in the service's batcher (a 300 ms queue delay holds it there, since another
    request, whose body never finishes, is on its way to join its batch). Then a new service
    starts on the same port, and the device keeps classifying until it is split again.
    """
    env = {**FAST_START, "SPLITSERVE_MAX_QUEUE_DELAY_MS": "300"}
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=1.0, max_cooldown_s=4.0)
    items = list(photos.items())
    service = LocalService(models=[runtime.name], env=env).start()
    replacement: LocalService | None = None

    async def scenario() -> tuple[list[InferenceResult], float, int, float]:
        nonlocal replacement
        results: list[InferenceResult] = []
        async with ServiceClient(service.url, timeout_s=10) as client:
            device = Device(runtime, client, breaker=breaker, timeout_s=10)
            for i in range(requests):
                name, image = items[i % len(items)]
                timer = threading.Timer(0.15, service.kill) if i == kill_at else None
                straggler = None
                if timer is not None:
                    straggler = asyncio.create_task(_never_finishes(service.url, runtime.name,
                                                                    split))
                    await asyncio.sleep(0.05)  # its handler is reading its body now
                    timer.start()
                results.append(await device.infer(image, split=split, name=name))
                if timer is not None and straggler is not None:
                    timer.join()
                    await straggler
            restarting = time.monotonic()
            replacement = LocalService(models=[runtime.name], env=env, port=service.port)
            starting = asyncio.get_running_loop().run_in_executor(None, replacement.start)
            ready_at: float | None = None
            after_ready = 0
            while True:
                if starting.done() and ready_at is None:
                    starting.result()  # re-raises a failed start
                    ready_at = time.monotonic()
                name, image = items[len(results) % len(items)]
                result = await device.infer(image, split=split, name=name)
                results.append(result)
                if result.ran == "split" and ready_at is None:  # ready between the two checks
                    ready_at = time.monotonic()
                after_ready += ready_at is not None
                if result.ran == "split":
                    assert ready_at is not None
                    now = time.monotonic()
                    return results, ready_at - restarting, after_ready, now - ready_at
                if time.monotonic() - restarting > restart_timeout_s:
                    raise TimeoutError("the device did not go back to split inference")
                await asyncio.sleep(0.1)  # a device classifying ~7 images a second

    try:
        results, restart_s, back_requests, back_s = asyncio.run(scenario())
    finally:
        service.kill()
        service.log_path.unlink(missing_ok=True)
        if replacement is not None:
            replacement.stop()
            replacement.log_path.unlink(missing_ok=True)
    run = results[:requests]
    return KillReport(
        requests=requests,
        results=len(run),
        killed_at=kill_at,
        split_before=sum(r.ran == "split" for r in run[:kill_at]),
        fell_back=sum(r.ran == "device" and r.fallback is not None for r in run[kill_at:]),
        reasons=dict(Counter(_reason(r) for r in run[kill_at:])),
        top1_matches=sum(r.top5[0].index == expected[r.image] for r in run),
        restart_s=round(restart_s, 2),
        back_after_requests=back_requests,
        back_after_s=round(back_s, 2),
        breaker="CircuitBreaker(failure_threshold=2, cooldown_s=1.0, max_cooldown_s=4.0)",
    )


# --- a connection that never answers ------------------------------------------------------------


@dataclass
class StallReport:
    deadline_s: float
    wall_ms: float  # the whole device.infer call
    local_ms: float  # head + encode + local tail: the device's own compute
    bound_ms: float  # deadline + local compute + slack
    ran: str
    reason: str
    top1_ok: bool

    @property
    def ok(self) -> bool:
        return (
            self.wall_ms <= self.bound_ms
            and self.ran == "device"
            and self.reason == "deadline"
            and self.top1_ok
        )


def stalled_connection(
    runtime: DeviceRuntime,
    image: Image.Image,
    expected: int,
    *,
    deadline_s: float = 1.0,
    split: str = "_blocks.9",
    slack_ms: float = 500.0,
) -> StallReport:
    """The device against a server that accepts and never answers: bounded by its deadline."""

    async def scenario() -> tuple[InferenceResult, float]:
        with FakeService("stall") as fake:
            async with ServiceClient(fake.url, timeout_s=60) as client:
                device = Device(runtime, client, timeout_s=deadline_s)
                started = time.perf_counter()
                result = await device.infer(image, split=split, name="stall")
                return result, (time.perf_counter() - started) * 1e3

    result, wall_ms = asyncio.run(scenario())
    t = result.timings
    local_ms = t.head + t.encode + t.tail
    return StallReport(
        deadline_s,
        round(wall_ms, 1),
        round(local_ms, 1),
        round(deadline_s * 1e3 + local_ms + slack_ms, 1),
        result.ran,
        _reason(result),
        result.top5[0].index == expected,
    )


# --- overload -----------------------------------------------------------------------------------


@dataclass
class OverloadReport:
    requests: int
    ok_200: int
    fast_503: int  # 503 with a valid Retry-After
    other: dict[str, int]  # any other status, or the exception's name
    timeouts: int
    max_503_ms: float
    p50_503_ms: float
    ready_after: bool
    device_results: int
    device_requests: int
    device_fell_back: int
    device_reasons: dict[str, int]
    device_top1_ok: int

    @property
    def ok(self) -> bool:
        return (
            self.ok_200 + self.fast_503 == self.requests
            and not self.other
            and self.timeouts == 0
            and self.ready_after
            and self.device_results == self.device_requests == self.device_top1_ok
        )


def overload(
    runtime: DeviceRuntime,
    photos: Mapping[str, Image.Image],
    expected: Mapping[str, int],
    *,
    clients: int = 24,
    rounds: int = 3,
    devices: int = 3,
    images_per_device: int = 5,
    split: str = "_conv_stem",
) -> OverloadReport:
    """A service with a queue of 2 and batches of 1, hammered by ``clients`` concurrent clients
    for ``rounds`` bursts on the costliest tail; then ``devices`` real devices classify while
    the hammering goes on."""
    env = {**FAST_START, "SPLITSERVE_MAX_QUEUE": "2", "SPLITSERVE_MAX_BATCH_SIZE": "1"}
    point = runtime.point(split)
    frame = runtime.encode(
        point,
        runtime.run_head(
            point, preprocess(next(iter(photos.values())), runtime.spec.preprocessing)
        ),
        "load",
    )
    items = list(photos.items())
    statuses: Counter[str] = Counter()
    latencies_503: list[float] = []
    timeouts = 0
    with LocalService(models=[runtime.name], env=env) as service:
        url = f"{service.url}/v2/models/{runtime.name}/splits/{point.name}/infer"
        headers = {"Content-Type": wire.CONTENT_TYPE}

        async def post(http: httpx.AsyncClient, timed: bool = True) -> None:
            nonlocal timeouts
            started = time.perf_counter()
            try:
                r = await http.post(url, content=frame, headers=headers)
            except httpx.TimeoutException:
                timeouts += 1
                return
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                return
            if r.status_code == 503 and r.headers.get("retry-after", "").isdigit():
                statuses["503"] += 1
                if timed:
                    latencies_503.append((time.perf_counter() - started) * 1e3)
            else:
                statuses[str(r.status_code)] += 1

        async def hammer(http: httpx.AsyncClient, stop: asyncio.Event) -> None:
            while not stop.is_set():
                # Untimed: the devices' local fallbacks share this event loop and would stretch
                # the clock. The bursts before them time the 503s.
                await post(http, timed=False)

        async def device_run(i: int) -> list[InferenceResult]:
            async with ServiceClient(service.url, timeout_s=30) as client:
                device = Device(runtime, client, timeout_s=30)
                out = []
                for j in range(images_per_device):
                    name, image = items[(i + j) % len(items)]
                    out.append(await device.infer(image, split=point.name, name=name))
                return out

        async def scenario() -> list[InferenceResult]:
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            async with httpx.AsyncClient(timeout=30, limits=limits) as http:
                for _ in range(rounds):
                    await asyncio.gather(*(post(http) for _ in range(clients)))
                stop = asyncio.Event()
                background = [asyncio.create_task(hammer(http, stop)) for _ in range(clients)]
                try:
                    runs = await asyncio.gather(*(device_run(i) for i in range(devices)))
                finally:
                    stop.set()
                    await asyncio.gather(*background)
            return [r for run in runs for r in run]

        device_results = asyncio.run(scenario())
        ready = httpx.get(f"{service.url}/v2/health/ready").status_code == 200
    ok_200, fast_503 = statuses.pop("200", 0), statuses.pop("503", 0)
    latencies_503.sort()
    fell_back = [r for r in device_results if r.fallback is not None]
    return OverloadReport(
        requests=ok_200 + fast_503 + sum(statuses.values()) + timeouts,
        ok_200=ok_200,
        fast_503=fast_503,
        other=dict(statuses),
        timeouts=timeouts,
        max_503_ms=round(latencies_503[-1], 1) if latencies_503 else 0.0,
        p50_503_ms=round(latencies_503[len(latencies_503) // 2], 1) if latencies_503 else 0.0,
        ready_after=ready,
        device_results=len(device_results),
        device_requests=devices * images_per_device,
        device_fell_back=len(fell_back),
        device_reasons=dict(Counter(_reason(r) for r in fell_back)),
        device_top1_ok=sum(r.top5[0].index == expected[r.image] for r in device_results),
    )


# --- the CLI against broken services ------------------------------------------------------------


@dataclass
class CliOutcome:
    behaviour: str
    fallback: bool
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    ran: str | None = None
    reason: str | None = None
    top1: int | None = None
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["stdout"], out["stderr"] = self.stdout[-300:], self.stderr[-300:]
        return out


#: Behaviours where the service answered, but is not a splitserve service at all: the CLI must
#: say so in one line (exit 1) whether or not fallback is on.
MISCONFIGURED = ("wrong json",)


def cli_against(
    behaviour: str,
    image: Path,
    expected_top1: int,
    *,
    fallback: bool,
    split: str = "_blocks.9",
    timeout_s: float | None = None,
) -> CliOutcome:
    """``python -m device_client infer IMAGE --json`` against a ``FakeService(behaviour)``, and
    what was wrong with how it ended (``problems``: empty when it kept the promise).

    The deadline is short only where it is what ends the call (a stall). Elsewhere it is long,
    so that a cold head on a busy machine cannot spend it before the request that shows the
    behaviour is sent (that hid the "wrong json" answer once, behind a deadline fallback)."""
    if timeout_s is None:
        timeout_s = 2.0 if behaviour == "stall" else 30.0
    with FakeService(behaviour) as fake:
        args = [
            sys.executable,
            "-m",
            "device_client",
            "infer",
            "--runtime",
            "torch",
            str(image),
            "--server",
            fake.url,
            "--split",
            split,
            "--timeout",
            str(timeout_s),
            "--json",
        ]
        if not fallback:
            args.append("--no-fallback")
        env = {k: v for k, v in os.environ.items() if k != "SPLITSERVE_DEBUG"}
        # These run side by side: one thread each, or torch oversubscribes the cores.
        env["OMP_NUM_THREADS"] = "1"
        started = time.perf_counter()
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL
        )
        seconds = time.perf_counter() - started
    out = CliOutcome(
        behaviour, fallback, proc.returncode, round(seconds, 2), proc.stdout, proc.stderr
    )
    for stream in (proc.stdout, proc.stderr):
        if "Traceback" in stream or 'File "' in stream:
            out.problems.append("traceback on the terminal")
    if fallback and behaviour not in MISCONFIGURED:
        try:
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
            out.ran, out.reason = doc["ran"], (doc["fallback"] or "none").split(":")[0]
            out.top1 = doc["top5"][0]["index"]
        except (ValueError, IndexError, KeyError, TypeError):
            out.problems.append(f"no JSON result on stdout (exit {proc.returncode})")
        if proc.returncode != 0:
            out.problems.append(f"exit {proc.returncode}")
        if out.ran is not None and (out.ran != "device" or out.top1 != expected_top1):
            out.problems.append(f"ran {out.ran}, top-1 {out.top1} (expected {expected_top1})")
    else:
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 1:
            out.problems.append(f"exit {proc.returncode}, expected 1")
        if len(lines) != 1 or not lines[0].startswith("device_client: error: "):
            out.problems.append(f"stderr is not one error line: {proc.stderr[-200:]!r}")
        if proc.stdout.strip():
            out.problems.append("printed a result although it failed")
    return out


def cli_against_all(image: Path, expected_top1: int, *, workers: int) -> list[CliOutcome]:
    """``cli_against`` for every behaviour, with fallback on and off, ``workers`` at a time."""
    jobs = list(product(BEHAVIOURS, (True, False)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            pool.map(lambda job: cli_against(job[0], image, expected_top1, fallback=job[1]), jobs)
        )
