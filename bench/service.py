"""Load on the real service: throughput, latency and batching at 1-64 concurrent clients.

    python -m bench service                     # 4 levels x (3 s warm-up + 12 s), ~2 min
    python -m bench service --quick --out /tmp/svc
    python -m bench service --concurrency 16 --max-queue-delay-ms 5
    python -m bench service --backend torch,onnxruntime --out /tmp/svc   # both, one run

Starts ``python -m cloud_server`` on loopback and loads it with N closed-loop clients (asyncio
tasks, one keep-alive connection each) posting pre-encoded frames of the five sample photos, cut
at the model's middle split point, for a fixed time per level. Counts ``ok`` (200 and the right
top-1 class), ``rejected_503`` (a fast 503 with Retry-After) and ``errors`` (anything else),
and records throughput, p50/p99 latency, the mean batch size and the service's CPU use.

``--backend`` picks the service's backend (``SPLITSERVE_BACKEND``); several, comma-separated,
are measured one after the other in one run, each into ``--out/<backend>/``, and compared in
``service_backends.json`` (throughput and efficiency at 16 clients, and the onnxruntime / torch
speedup).

The ceiling, ``raw_compute_rps``, is the service's own tail (``load_runtime(...).run``, on the
same backend) run alone on dequantized batches of the service's ``max_batch_size``, on the
service's cores with its thread count, while the service idles: before the load and after every
level (the median counts; each level also gets ``efficiency_nearby`` against the two
measurements around it, for a machine others share). Efficiency = throughput / that ceiling.

CPU (``--layout``): by default (``isolated``) the service is pinned (taskset) to every core but
the last and its torch threads follow that count; the load generator (this process: once the
frames are encoded it does no torch work, and its HTTP client costs about 0.2 ms of CPU per
request) is pinned to the last core. On a 2-core box that is one core each: the clients never
take CPU from the service, the ceiling runs on exactly the service's core with the same single
thread, and the service's own HTTP, decoding and JSON work competes with its forward passes, as
it does in production, so efficiency measures what serving costs on top of compute.
``shared`` runs the service as deployed (every core, torch threads = cores) with the client
anywhere; there torch's own multi-thread overhead hides part of the serving work, and both
numbers swing with anything else on the box. ``--service-cpus``, ``--client-cpus`` and
``--threads`` override the split.
Writes ``service.json``, ``service.md`` and ``service.png`` to ``--out`` (default
``bench/results``). Output is in ``bench.service_report``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bench import report
from bench.service_compute import (
    CpuLayout,
    cpu_layout,
    encode_frames,
    pinned,
    raw_compute_rps,
    server_inputs,
)
from bench.service_load import (
    LevelStats,
    LoadFrame,
    histogram_mean,
    process_cpu_s,
    run_level,
    summarize,
)
from bench.service_report import ALIGN, BAR, HEADERS, markdown, plot, table_rows, to_json
from device_client.local_service import LocalService
from device_client.runtime import DeviceRuntime
from device_client.samples import sample_photos
from shared import cliargs
from shared.errors import ConfigError
from shared.models import list_models

__all__ = ["add_arguments", "run"]

CONTAMINATED_LOAD = 0.5  # 1-minute load average above which the machine was not idle
SPEEDUP_BAR = 1.5  # issue 10: onnxruntime's throughput at 16 clients over torch's, same run
RAW_SPREAD = 0.1  # raw measurements further apart than this: something else used the CPU

Tail = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]

_INTS = cliargs.integers(at_least=0)  # core numbers, client levels


def _levels(text: str) -> list[int]:
    levels = _INTS(text)
    if min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be >= 1, got {text!r}")
    return levels


def _backends(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = ("onnxruntime", "torch")  # cloud_server.backend.BACKENDS, without importing it here
    bad = [n for n in names if n not in known]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"comma-separated, each once, from {', '.join(known)}; got {text!r}"
        )
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0", choices=list_models())
    p.add_argument("--split", default=None, help="split point name or index (default: middle)")
    p.add_argument(
        "--concurrency", type=_levels, default=[1, 4, 16, 64], help="levels (default 1,4,16,64)"
    )
    p.add_argument("--quick", action="store_true", help="1 s warm-up + 4 s per level, ~1 min")
    p.add_argument(
        "--duration", type=cliargs.real(above=0), help="seconds measured per level (default 12)"
    )
    p.add_argument(
        "--warmup", type=cliargs.real(above=0), help="seconds of load before each (default 3)"
    )
    p.add_argument(
        "--timeout", type=cliargs.real(above=0), default=30.0, help="client timeout (default 30)"
    )
    p.add_argument(
        "--raw-seconds",
        type=cliargs.real(above=0),
        help="seconds of each raw-compute measurement, before the load and after every level "
        "(default 3; 1 with --quick)",
    )
    p.add_argument(
        "--layout",
        choices=["isolated", "shared"],
        default="isolated",
        help="isolated (default): the service on every core but the last, the load generator on "
        "the last; shared: both anywhere",
    )
    p.add_argument("--service-cpus", type=_INTS, help="cores of the service (overrides --layout)")
    p.add_argument("--client-cpus", type=_INTS, help="cores of the load generator (overrides)")
    p.add_argument(
        "--threads",
        type=cliargs.integer(at_least=1),
        help="service torch threads (default: its core count)",
    )
    for flag, kind in (
        ("--max-batch-size", int),
        ("--max-queue-delay-ms", float),
        ("--max-queue", int),
    ):
        p.add_argument(flag, type=kind, help="service setting (default: the service's)")
    p.add_argument(
        "--backend",
        type=_backends,
        default=None,
        help="the service's backend, or several comma-separated to measure them one after the "
        "other in one run (e.g. torch,onnxruntime); default: the service's",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results"),
        help="output directory (default bench/results)",
    )


def _layout(args: argparse.Namespace) -> CpuLayout:
    default = cpu_layout(isolated=args.layout == "isolated")
    allowed = os.sched_getaffinity(0)
    service = set(args.service_cpus) if args.service_cpus else default.service
    client = set(args.client_cpus) if args.client_cpus else default.client
    if not (service | client) <= allowed:
        raise ConfigError(
            f"cores {sorted((service | client) - allowed)} are not available "
            f"(this process may use {sorted(allowed)})"
        )
    return CpuLayout(service, client)


def _service_settings(args: argparse.Namespace, layout: CpuLayout) -> dict[str, Any]:
    """The settings the service runs with: the environment's and the service's defaults, the
    flags over them, and torch threads following the service's cores."""
    try:
        from cloud_server.settings import Settings
    except ImportError as exc:
        raise ConfigError("the service benchmark needs pip install 'splitserve[cloud]'") from exc
    flags = {
        k: getattr(args, k)
        for k in ("max_batch_size", "max_queue_delay_ms", "max_queue")
        if getattr(args, k) is not None
    }
    try:
        settings = Settings(**flags, threads=args.threads or len(layout.service))
    except ValueError as exc:
        raise ConfigError(f"invalid service setting: {exc}") from exc
    return {
        "max_batch_size": settings.max_batch_size,
        "max_queue_delay_ms": settings.max_queue_delay_ms,
        "max_queue": settings.max_queue,
        "request_timeout_s": settings.request_timeout_s,
        "threads": settings.threads,
        "log_level": settings.log_level,
        "backend": settings.backend,
        "bundle_dir": str(settings.bundle_root()),
    }


def _command(
    args: argparse.Namespace, warmup: float, duration: float, raw_s: float, backends: list[str]
) -> str:
    parts = [
        f"python -m bench service --model {args.model} --backend {','.join(backends)}",
        f"--concurrency {','.join(map(str, args.concurrency))}",
        f"--warmup {warmup:g} --duration {duration:g} --raw-seconds {raw_s:g}",
        f"--timeout {args.timeout:g} --layout {args.layout}",
    ]
    if args.split is not None:
        parts.append(f"--split {args.split}")
    for flag in ("service_cpus", "client_cpus"):
        if getattr(args, flag):
            parts.append(f"--{flag.replace('_', '-')} {','.join(map(str, getattr(args, flag)))}")
    for flag in ("threads", "max_batch_size", "max_queue_delay_ms", "max_queue"):
        if getattr(args, flag) is not None:
            parts.append(f"--{flag.replace('_', '-')} {getattr(args, flag):g}")
    parts.append(f"--out {args.out}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """One backend: ``service.json``, ``.md`` and ``.png`` in ``--out``. Several: each backend's
    in ``--out/<backend>/``, one after the other, and ``service_backends.json`` comparing them."""
    console = report.make_console()
    layout = _layout(args)
    settings = _service_settings(args, layout)
    backends = args.backend or [settings["backend"]]
    args.out.mkdir(parents=True, exist_ok=True)  # fail now, not after minutes of measuring
    if len(backends) == 1:
        _run_backend(
            args, console, layout, {**settings, "backend": backends[0]}, args.out, backends
        )
        return 0
    docs = {}
    for backend in backends:
        console.rule(f"backend {backend}")
        docs[backend] = _run_backend(
            args, console, layout, {**settings, "backend": backend}, args.out / backend, backends
        )
    comparison = _compare(docs)
    path = report.write_json(args.out / "service_backends.json", comparison)
    for backend, row in comparison["backends"].items():
        console.print(
            f"{backend}: raw {row['raw_compute_rps']:.1f}/s, {row['throughput_rps']}/s at "
            f"{BAR['efficiency_at']} clients, efficiency {row['efficiency']}"
        )
    if comparison["speedup"] is not None:
        console.print(
            f"onnxruntime / torch throughput at {BAR['efficiency_at']} clients: "
            f"{comparison['speedup']:.2f}x (bar >= {SPEEDUP_BAR}x)"
        )
    console.print(f"wrote {path}")
    return 0


def _compare(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Raw compute, throughput and efficiency at the bar's concurrency, per backend."""
    rows: dict[str, dict[str, Any]] = {}
    for backend, doc in docs.items():
        at = [r for r in doc["runs"] if r["concurrency"] == BAR["efficiency_at"]]
        rows[backend] = {
            "raw_compute_rps": doc["raw_compute_rps"],
            "throughput_rps": at[0]["throughput_rps"] if at else None,
            "efficiency": doc["bar"]["efficiency"],
            "load_average_1m_at_start": doc["load_average_1m_at_start"],
        }
    ort, tch = rows.get("onnxruntime"), rows.get("torch")
    speedup = None
    if ort and tch and ort["throughput_rps"] and tch["throughput_rps"]:
        speedup = round(ort["throughput_rps"] / tch["throughput_rps"], 3)
    return {
        "at_clients": BAR["efficiency_at"],
        "backends": rows,
        "speedup": speedup,
        "speedup_bar": SPEEDUP_BAR,
        "speedup_met": None if speedup is None else speedup >= SPEEDUP_BAR,
    }


def _run_backend(
    args: argparse.Namespace,
    console: Console,
    layout: CpuLayout,
    settings: dict[str, Any],
    out: Path,
    backends: list[str],
) -> dict[str, Any]:
    warmup = args.warmup or (1.0 if args.quick else 3.0)
    duration = args.duration or (4.0 if args.quick else 12.0)
    raw_s = args.raw_seconds or (1.0 if args.quick else 3.0)
    command = _command(args, warmup, duration, raw_s, backends)
    out.mkdir(parents=True, exist_ok=True)
    load_1m = os.getloadavg()[0]
    if load_1m > CONTAMINATED_LOAD:
        console.print(f"[yellow]load average {load_1m:.2f}: the machine is busy[/]")
    started = time.perf_counter()
    backend = settings["backend"]
    with console.status(f"loading {args.model} ({backend}) and encoding frames"):
        from cloud_server.runtime import load_runtime  # installed: _service_settings checked

        device = DeviceRuntime(args.model)
        point = device.point(args.split) if args.split is not None else device.middle_point()
        frames = encode_frames(device, point, sample_photos())
        decoded = server_inputs(device, point, frames)
        # The very tails the service runs, on the same backend and thread count (an onnxruntime
        # bundle is exported here once and the service then finds it in the cache).
        served = load_runtime(
            args.model,
            profile_repeats=0,
            backend=backend,
            threads=settings["threads"],
            bundle_root=Path(settings["bundle_dir"]),
        )

    def tail(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return served.run(point.name, inputs)

    def measure_raw(when: str) -> float:
        return _raw(console, tail, decoded, settings, layout, raw_s, when)

    raw = [measure_raw("before the load")]
    runs: list[LevelStats] = []
    with _service(console, args.model, settings, layout) as service:
        url = f"{service.url}/v2/models/{args.model}/splits/{point.name}/infer"
        for level in args.concurrency:
            with console.status(f"{level} clients: {warmup:g} s warm-up + {duration:g} s"):
                stats = _level(
                    service,
                    url,
                    args,
                    frames,
                    point.name,
                    level,
                    warmup,
                    duration,
                    len(layout.service),
                )
            console.print(_progress(stats))
            runs.append(stats)
            raw.append(measure_raw(f"after {level} clients"))
    raw_rps = statistics.median(raw)
    if max(raw) - min(raw) > RAW_SPREAD * raw_rps:
        console.print(
            f"[yellow]raw compute ranged {min(raw):.0f}-{max(raw):.0f}/s during the run: "
            "something else used the CPU; compare efficiency_nearby, or rerun[/]"
        )
    nearby = [(raw[i] + raw[i + 1]) / 2 for i in range(len(runs))]
    elapsed = time.perf_counter() - started
    title = (
        f"{args.model}, tail of {point.name}: service on cpu {sorted(layout.service)} "
        f"({backend}, {settings['threads']} thread(s)), raw {raw_rps:.0f}/s at batch "
        f"{settings['max_batch_size']}"
    )
    report.print_table(title, HEADERS, table_rows(runs, raw_rps), align=ALIGN, console=console)
    doc = to_json(
        runs,
        raw_rps,
        command,
        raw_nearby=nearby,
        raw_compute_rps_measured=[round(r, 2) for r in raw],
        model=args.model,
        split=point.name,
        frames=[f.name for f in frames],
        frame_bytes=[len(f.body) for f in frames],
        settings=settings,
        warmup_s=warmup,
        duration_s=duration,
        client_timeout_s=args.timeout,
        cpus=layout.describe(),
        load_average_1m_at_start=round(load_1m, 2),
        load_average_1m_at_end=round(os.getloadavg()[0], 2),
        elapsed_s=round(elapsed, 1),
        torch=torch.__version__,
        backend=backend,
    )
    intro = (
        f"Raw batched compute: the service's own tail, {backend} alone, batch "
        f"{settings['max_batch_size']}, {settings['threads']} thread(s) on cpu "
        f"{sorted(layout.service)}: **{raw_rps:.1f} samples/s** (median of "
        f"{len(raw)} measurements, {min(raw):.0f}-{max(raw):.0f}). Efficiency = throughput / "
        f"raw. The load generator ran on cpu {sorted(layout.client)}. Load average at start "
        f"{load_1m:.2f}."
    )
    paths = [
        report.write_json(out / "service.json", doc),
        report.write_text(
            out / "service.md",
            markdown(
                runs,
                raw_rps,
                heading=f"Service under load: {args.model}, split {point.name}, {backend}",
                intro=intro,
                command=command,
            ),
        ),
        plot(runs, raw_rps, out / "service.png", title),
    ]
    _print_bar(console, doc["bar"])
    console.print(f"measured in {elapsed:.0f} s; wrote " + ", ".join(map(str, paths)))
    return doc


def _print_bar(console: Console, bar: dict[str, Any]) -> None:
    if bar["efficiency"] is not None:
        verdict = "met" if bar["efficiency_met"] else "MISSED"
        console.print(
            f"bar: {bar['efficiency']:.1%} of raw compute at {BAR['efficiency_at']} clients "
            f"(>= {BAR['min_efficiency']:.0%}: {verdict})"
        )
    if bar["errors"] is not None:
        verdict = "met" if bar["no_errors_met"] else "MISSED"
        console.print(f"bar: {bar['errors']} errors at {BAR['no_errors_at']} clients ({verdict})")


def _progress(stats: LevelStats) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    return (
        f"{stats.concurrency:>3} clients: {stats.throughput_rps:6.1f} ok/s, p50 "
        f"{fmt(stats.p50_ms)} ms, p99 {fmt(stats.p99_ms)} ms, batch "
        f"{fmt(stats.mean_batch_size)}, 503 {stats.rejected_503}, errors {stats.errors}"
    )


def _raw(
    console: Console,
    tail: Tail,
    inputs: list[tuple[torch.Tensor, ...]],
    settings: dict[str, Any],
    layout: CpuLayout,
    seconds: float,
    when: str,
) -> float:
    """Raw compute on the service's cores with its thread count, while the service idles."""
    with (
        console.status(f"raw batched compute, {when}"),
        pinned(layout.service, threads=settings["threads"]),
    ):
        rps = raw_compute_rps(tail, inputs, batch_size=settings["max_batch_size"], seconds=seconds)
    console.print(f"raw batched compute, {when}: {rps:.1f} samples/s")
    return rps


@contextmanager
def _service(
    console: Console,
    model: str,
    settings: dict[str, Any],
    layout: CpuLayout,
    *,
    profile_repeats: int = 1,
) -> Iterator[LocalService]:
    """The real service on the service's cores, and this process (the load generator) on the
    client's, for the duration of the block. ``profile_repeats``: the service's start-up
    profile (1 here, where each level warms up under load anyway; ``bench fleet``'s auto
    devices plan with it, so it takes the service's default)."""
    env = {
        "SPLITSERVE_THREADS": str(settings["threads"]),
        "OMP_NUM_THREADS": str(settings["threads"]),
        "SPLITSERVE_MAX_BATCH_SIZE": str(settings["max_batch_size"]),
        "SPLITSERVE_MAX_QUEUE_DELAY_MS": str(settings["max_queue_delay_ms"]),
        "SPLITSERVE_MAX_QUEUE": str(settings["max_queue"]),
        "SPLITSERVE_PROFILE_REPEATS": str(profile_repeats),
        "SPLITSERVE_BACKEND": settings["backend"],
        "SPLITSERVE_BUNDLE_DIR": settings["bundle_dir"],
    }
    taskset = shutil.which("taskset")
    if taskset is None:
        raise ConfigError("pinning the service to its cores needs taskset (util-linux)")
    prefix = [taskset, "-c", ",".join(map(str, sorted(layout.service)))]
    old_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, layout.client)
    try:
        with console.status("starting the service"):
            service = LocalService(models=[model], env=env, command_prefix=prefix).start()
        try:
            yield service
        finally:
            service.stop()
            service.log_path.unlink(missing_ok=True)
    finally:
        os.sched_setaffinity(0, old_cpus)


def _level(
    service: LocalService,
    url: str,
    args: argparse.Namespace,
    frames: list[LoadFrame],
    split: str,
    level: int,
    warmup: float,
    duration: float,
    cores: int,
) -> LevelStats:
    assert service.process is not None
    pid = service.process.pid
    result = asyncio.run(
        run_level(
            url,
            frames,
            concurrency=level,
            warmup_s=warmup,
            duration_s=duration,
            timeout_s=args.timeout,
            metrics_url=f"{service.url}/metrics",
            cpu_probe=lambda: process_cpu_s(pid),
        )
    )
    batch = None
    if result.metrics is not None:
        labels = {"model": args.model, "split": split}
        batch = histogram_mean(*result.metrics, "splitserve_batch_size", labels)
    return summarize(
        level,
        result.samples,
        window=(warmup, warmup + duration),
        mean_batch_size=batch,
        service_cpu_s=None if result.cpu_s is None else result.cpu_s[1] - result.cpu_s[0],
        service_cores=cores,
        client_cpu_s=result.client_cpu_s,
    )
