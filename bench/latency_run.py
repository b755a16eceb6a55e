"""The measuring half of ``python -m bench latency``: service, link, limited device, every run.

    raw = asyncio.run(measure(config, console))   # a JSON-able dict; bench.latency_report sums up

Processes and cores:

    core A  device worker (python -m bench.device_worker), in a cgroup with 20 % of one core
    core B  the service (taskset -c B python -m cloud_server) and this process (the proxy)

The worker loads at full speed, then joins the cgroup before it measures its profile and before
any timed inference. On each link every candidate first runs ``warmup`` untimed inferences
(``auto``: a fresh ``AutoSplit``, then ``auto_warmup`` of them: it learns the link from its own
traffic), then the candidates take turns image by image, so that load from other jobs on the
machine, which drifts over minutes, falls on all of them alike. Within an image they run in a
random order, seeded by ``seed`` and the link: a fixed order would put every candidate after
the same predecessor every time (``auto`` after ``_dropout``), and whatever a predecessor
leaves behind on a CPU-limited device (a spent quota period, cold caches) would land on one
candidate only. ``auto`` keeps its state across
its turns, like a device classifying a photo every few seconds. The drop scenario is ``auto``
alone, back to back.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.cpulimit import CpuLimit, CpuLimitUnavailable, cgroup_of, pick_cores
from bench.device_worker import WorkerHandle
from bench.netem import PROFILES, LinkShape, ShapedProxy
from device_client.local_service import LocalService
from shared.candidates import AUTO
from shared.errors import ConfigError

__all__ = ["RunConfig", "candidate_orders", "check_link", "measure"]



@dataclass(frozen=True)
class RunConfig:
    model: str
    links: tuple[str, ...]
    images: int  # photos + crops per candidate and link
    splits: tuple[str, ...] | None  # None: every split_stride-th split point
    split_stride: int
    device_cpu: float  # 0: no limit
    period_us: int
    shares: int  # cpu.shares of the device's and of the service's groups; 0: leave alone
    warmup: int
    auto_warmup: int
    drop_from: str | None  # None: no drop scenario
    drop_to: str
    drop_before: int
    drop_after: int
    profile_repeats: int
    server_profile_repeats: int
    out: Path
    seed: int = 0
    runtime: str = "onnx"  # the device's, as `device_client --runtime`
    precision: str = "fp32"
    bundle: Path | None = None  # None with onnx: the service's bundle, fetched by the worker


async def check_link(url: str, model: str, shape: LinkShape) -> dict[str, float]:
    """Time the emulated link from this (unthrottled) process: a small and a large upload to
    the service's probe sink, twice each; the slope gives the uplink, the small one the RTT.

    Sanity only: it checks the proxy, not the device, whose CPU also shows in its timings."""
    large = int(min(max(shape.uplink_bps * 0.25 / 8, 16 * 1024), 1024 * 1024))
    times: dict[int, list[float]] = {64: [], large: []}
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as http:
        for size in (64, large, 64, large):
            body = os.urandom(size)
            started = time.perf_counter()
            response = await http.post(
                f"/v2/models/{model}/probe",
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )
            response.raise_for_status()
            times[size].append((time.perf_counter() - started) * 1e3)
    small_ms, large_ms = min(times[64]), min(times[large])
    return {
        "probe_bytes": large,
        "uplink_mbps": round((large - 64) * 8 / max(large_ms - small_ms, 1e-3) / 1e3, 3),
        "rtt_ms": round(small_ms, 2),  # + a little server and HTTP time
    }


def candidate_orders(candidates: list[str], images: int, *, seed: str) -> list[list[str]]:
    """One shuffled copy of ``candidates`` per image, the same for the same ``seed``."""
    rng = random.Random(seed)
    return [rng.sample(candidates, len(candidates)) for _ in range(images)]


def _pin(core: int | None) -> list[str]:
    """``taskset -c CORE``, to start a process on its core (empty when we can't)."""
    return ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []


class _Bench:
    def __init__(self, config: RunConfig, console: Console) -> None:
        self.config = config
        self.console = console
        self.raw: dict[str, Any] = {"warnings": []}
        self.limit: CpuLimit | None = None  # the device's quota
        self.weight: CpuLimit | None = None  # the service's and the proxy's weight
        self.service: LocalService | None = None
        self.proxy: ShapedProxy | None = None
        self.worker: WorkerHandle | None = None
        self._starting: asyncio.Task[object] | None = None

    def log(self, text: str) -> None:
        """A progress line where no live progress bar shows (output to a file or a pipe)."""
        if not self.console.is_terminal:
            self.console.print(f"{time.strftime('%H:%M:%S')} {text}")

    def warn(self, text: str) -> None:
        self.raw["warnings"].append(text)
        self.console.print(f"[bold yellow]warning:[/] {text}")

    async def setup(self) -> None:
        c = self.config
        cores = pick_cores()
        if cores is None:
            self.warn("only one core is usable: device and service share it")
        device_core, service_core = cores or (None, None)
        if service_core is not None:
            os.sched_setaffinity(0, {service_core})  # the proxy lives here, with the service
        self.raw["cores"] = {"device": device_core, "service_and_proxy": service_core}
        shares = c.shares or None
        if c.device_cpu > 0:
            try:
                self.limit = CpuLimit.create(c.device_cpu, period_us=c.period_us, shares=shares)
            except CpuLimitUnavailable as exc:
                self.warn(f"the device runs at FULL speed, not {c.device_cpu:g} of a core: {exc}")
        if shares is not None:
            try:  # this process (the proxy) and the service, which inherits the group
                self.weight = CpuLimit.create(None, shares=shares, suffix="-service")
                self.weight.add(os.getpid())
            except CpuLimitUnavailable as exc:
                self.warn(f"the service and the proxy run at an ordinary CPU weight: {exc}")
                self.weight = None
        self.raw["cpu_shares"] = {
            "device": shares if self.limit is not None else None,
            "service_and_proxy": shares if self.weight is not None else None,
        }
        env = {
            "SPLITSERVE_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "SPLITSERVE_LOG_LEVEL": "warning",
            "SPLITSERVE_PROFILE_REPEATS": str(c.server_profile_repeats),
        }
        self.service = LocalService(models=[c.model], env=env, command_prefix=_pin(service_core))
        self._starting = asyncio.create_task(asyncio.to_thread(self.service.start))
        # The proxy needs the service's port only when a connection arrives: start it now.
        first = PROFILES[c.links[0] if c.links else c.drop_from or "lan"]
        self.proxy = await ShapedProxy(("127.0.0.1", self.service.port), first).start()
        worker_env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "SPLITSERVE_CACHE_DIR": str(c.out / "profile-cache"),
        }
        crops = max(0, c.images - 5)
        runtime_args = ["--runtime", c.runtime, "--precision", c.precision]
        if c.bundle is not None:
            runtime_args += ["--bundle", str(c.bundle)]
        elif c.runtime == "onnx":
            # The worker fetches the service's bundle before it says `loaded`: straight from
            # the service, not through the emulated link (a one-off download, not a request).
            assert self._starting is not None
            await self._starting
            runtime_args += ["--bundle-url", self.service.url]
        self.worker = await WorkerHandle.spawn(
            [
                *_pin(device_core),
                sys.executable,
                "-m",
                "bench.device_worker",
                "--url",
                self.proxy.url,
                "--model",
                c.model,
                "--crops",
                str(crops),
                "--threads",
                "1",
                "--repeats",
                str(c.profile_repeats),
                *runtime_args,
            ],
            env=worker_env,
        )
        loaded = await self.worker.event()
        await self._starting
        if device_core is not None and not _pin(device_core):
            os.sched_setaffinity(self.worker.pid, {device_core})
        limited = False
        if self.limit is not None:
            try:
                self.limit.add(self.worker.pid)
                limited = True
            except CpuLimitUnavailable as exc:
                self.warn(f"the device runs at FULL speed: {exc}")
        self.raw.update(
            device_cpu_limited=limited,
            cpu_limit_interface=self.limit.interface if limited and self.limit else None,
            seed=c.seed,
            device_cpu=c.device_cpu,  # asked for; device_cpu_limited says if it was applied
            cpu_period_us=c.period_us if limited else None,
            device_cgroup=cgroup_of(self.worker.pid),
            device_runtime=loaded.get("runtime", "torch"),
            device_precision=loaded.get("precision", "fp32"),
            device_threads=loaded.get("threads", loaded["torch_threads"]),
            service_torch_threads=1,
            points=loaded["points"],
            images=loaded["images"][: c.images],
            service_url=self.service.url,
        )

    async def profile(self) -> None:
        assert self.worker is not None
        with self.console.status("measuring the device profile inside the CPU limit"):
            prof = await self.worker.call({"cmd": "profile"})
        self.raw["device_profile"] = prof
        self.console.print(
            f"device profile ({prof.get('runtime')} {prof.get('precision')}): "
            f"{prof['elapsed_s']:.0f} s, CPU share {prof['cpu_share']:.2f} "
            f"(cgroup {prof['cgroup']}, cores {prof['affinity']}); device candidate "
            f"{prof['costs'][0]['head_ms']:.0f} ms"
        )
        if self.raw["device_cpu_limited"] and prof["cpu_share"] > self.config.device_cpu * 1.5:
            self.warn(
                f"the device used {prof['cpu_share']:.0%} of a core while profiling: "
                "the limit does not hold"
            )

    def candidates(self) -> list[str]:
        """``device``, ``cloud`` and the split points asked for, in execution order."""
        points: list[str] = self.raw["points"]
        wanted = self.config.splits
        if wanted is None:
            stride = self.config.split_stride
            chosen = [p for i, p in enumerate(points) if i % stride == 0 or i == len(points) - 1]
        else:
            unknown = sorted(set(wanted) - set(points))
            if unknown:
                raise ConfigError(f"{self.config.model} has no split point {unknown[0]!r}")
            chosen = [p for p in points if p in wanted]
        return ["device", "cloud", *chosen]

    async def links(self, progress: Progress) -> None:
        c = self.config
        assert self.worker is not None and self.proxy is not None
        images = list(range(c.images))
        out: dict[str, Any] = {}
        for name in c.links:
            shape = PROFILES[name]
            self.proxy.set_shape(shape)
            check = await check_link(self.proxy.url, c.model, shape)
            entry: dict[str, Any] = {
                "link": {**shape.to_json(), "check": check},
                "load_average_1m": os.getloadavg()[0],
                "runs": {},
            }
            entry["started_at"] = time.time()
            candidates = [*self.candidates(), AUTO]
            task = progress.add_task(name, total=len(images) * len(candidates))
            progress.update(task, description=f"{name}: warm-up")
            for split in candidates:
                count = c.auto_warmup if split == AUTO else c.warmup
                await self.worker.run(
                    split, [], warmup=[k % len(images) for k in range(count)], fresh=True
                )
            runs: dict[str, list[dict[str, Any]]] = {split: [] for split in candidates}
            # Every candidate on image i, then on image i + 1, each time in a fresh random
            # order. Load from other jobs drifts; this way it lands on every candidate alike,
            # oracle and auto are compared on the same minutes, and no candidate always
            # follows the same one.
            orders = candidate_orders(candidates, len(images), seed=f"{c.seed}:{name}")
            entry["orders"] = orders
            for i, order in zip(images, orders, strict=True):
                progress.update(task, description=f"{name}: image {i + 1}/{len(images)}")
                for split in order:
                    results, plan = await self.worker.run(split, [i])
                    runs[split].extend(results)
                    if plan is not None:
                        entry["auto_plan"] = plan
                    progress.advance(task)
                self.log(f"{name}: image {i + 1}/{len(images)} done")
            entry["runs"] = runs
            entry["elapsed_s"] = round(time.time() - entry["started_at"], 1)
            out[name] = entry
        self.raw["links"] = out

    async def drop(self, progress: Progress) -> None:
        c = self.config
        assert self.worker is not None and self.proxy is not None and c.drop_from is not None
        n_images = c.images
        before, after = PROFILES[c.drop_from], PROFILES[c.drop_to]
        self.proxy.set_shape(before)
        total = c.drop_before + c.drop_after
        task = progress.add_task(f"drop {before.name} -> {after.name}", total=total)
        trace: list[dict[str, Any]] = []
        started = time.time()
        for i in range(total):
            if i == c.drop_before:
                self.proxy.set_shape(after)
                switched_at = time.time()
            warm = [k % n_images for k in range(c.auto_warmup)] if i == 0 else []
            results, _ = await self.worker.run(AUTO, [i % n_images], warmup=warm, fresh=i == 0)
            r = results[0]
            trace.append(
                {**r, "request": i + 1, "phase": before.name if i < c.drop_before else after.name}
            )
            progress.advance(task)
            self.log(f"drop: request {i + 1}/{total} chose {r['split']}")
        self.raw["drop"] = {
            "from": before.name,
            "to": after.name,
            "before_requests": c.drop_before,
            "after_requests": c.drop_after,
            "switch_s": round(switched_at - started, 3),
            "trace": trace,
        }

    async def teardown(self) -> None:
        if self.worker is not None:
            await self.worker.close()
        if self.proxy is not None:
            await self.proxy.aclose()
        if self._starting is not None:  # stop only a service that is no longer starting
            await asyncio.gather(self._starting, return_exceptions=True)
        if self.service is not None:
            await asyncio.to_thread(self.service.stop)
            self.service.log_path.unlink(missing_ok=True)
        if self.limit is not None:
            self.raw["device_cgroup_stats"] = self.limit.stats()
            if not self.limit.remove():
                self.warn(f"could not remove {self.limit.path}")
        if self.weight is not None:
            self.weight.release(os.getpid())
            if not self.weight.remove():
                self.warn(f"could not remove {self.weight.path}")


async def measure(config: RunConfig, console: Console) -> dict[str, Any]:
    """Run everything ``config`` asks for; always stops the service and removes the cgroup."""
    bench = _Bench(config, console)
    try:
        with console.status(
            "starting the service (loads and profiles every split point) and the device worker"
        ):
            await bench.setup()
        await bench.profile()
        columns = (
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            if config.links:
                await bench.links(progress)
            if config.drop_from is not None:
                await bench.drop(progress)
    except BaseException:
        if bench.service is not None and bench.service.process is not None:
            console.print(f"service log: {bench.service.log_tail(10)}")
        raise
    finally:
        await bench.teardown()
    return bench.raw
