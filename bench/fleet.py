"""A fleet of emulated devices against the real service: p50/p95, throughput, batching, 503s.

    python -m bench fleet --devices 1,8,32,128 --out DIR          # ~15 min, both engines
    python -m bench fleet --quick --out /tmp/fleet                # ~3 min, uvicorn only
    python -m bench fleet --simulate --devices 10000 --replicas 1,2,4 --out DIR

N emulated devices (one asyncio process, on its own core) against the real service
(``python -m cloud_server``, the onnxruntime backend, pinned to the other core with one thread,
as ``bench service`` runs it) over loopback. Device ``i`` is on link ``link_mix[i % 4]``
(``bench.netem.PROFILES``: lan, wifi, lte, 3g by default). An emulated device does not compute:
it waits its head time, from a device profile measured under the latency benchmark's
board-class CPU limit (0.2 of a core; cached in ``DIR/fleet-cache``), then sends frames or JPEGs
encoded beforehand with the product's codec; its link's RTT and transfer time are waited out
in the device (an httpx transport around the real loopback one), not in a proxy. That is what
fits 128 devices beside the service on 2 cores: what is measured is the service, which is real.
Each device takes a photo every ``--period-ms`` (seeded phase), one request in flight at most.

The machine is shared and its speed moves 2-3x from one minute to the next, so the policies of
one fleet size are measured side by side (``bench.fleet_rounds``): ``--rounds`` rounds, each
policy one window of ``--duration / --rounds`` seconds per round in a rotating order, its
devices (clients, ``auto``'s state) kept across its windows, its warm-up before its first
window only, and its windows pooled into one row. A small fleet's window stretches until it
holds ``--min-photos`` photos (at most 2x ``--duration``), then its photo period shrinks
(N=1: 120 photos in 20 s, one every 0.17 s; N=8: 15 s; the row's
``period_ms`` says). 120, not 40: a single device's p95 over 40 photos is its 2nd slowest
(two runs of the same choice differed 20%), and at one every 0.5 s the service sleeps 0.4 s
before each request and runs it cold (``bench.fleet_sim_served.IDLE_S``), unlike any larger
fleet's; at 0.17 s it stays as warm as at N=8-32. Such a fleet (its period shortened) also
runs more and shorter rounds, unless ``--rounds`` is given: one round of every policy's window
within 3 s (``bench.fleet_rounds.size_rounds``; N=1: 40 rounds of 0.5 s windows, 3 photos
each, 0.1 s apart, no ``/metrics`` scrapes), so that a slow spell of the machine lands on every
policy alike instead of deciding one policy's p95.

Policies: ``cloud``, ``device``, three fixed split points (early, middle, late) and ``auto``,
the product's planner with its live estimation (``device_client.auto.AutoSplit``) fed the
emulated device's profile and link. The same runs against Ray Serve (``cloud_server.serve``
on a local Ray, 1 and 2 replicas; fewer policies and sizes by default, see ``--ray-policies``
and ``--ray-devices``) give the Serve proxy's overhead per request.

Writes ``fleet.json`` (``runs``, ``bar``, ``proxy_overhead``, ``inputs``, ``setup``,
``simulation``), ``fleet.md`` and ``fleet.png`` to ``--out``. ``--simulate`` hands over to
``bench.fleet_sim``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import fleet_records, fleet_report, fleet_sim, report, service
from bench.fleet_device import FleetInputs
from bench.fleet_inputs import device_profile, encode_payloads
from bench.fleet_rounds import FINE_PAUSE_S, size_rounds, size_window
from bench.fleet_run import FleetRun, RunSpec, bar, run_rounds, summarize
from bench.fleet_sim_defaults import PERIOD_MS
from bench.fleet_sim_served import group_key
from bench.fleet_startup import startup_ms
from bench.netem import PROFILES
from bench.serve_overhead import RAY_ENV
from bench.service_compute import CpuLayout, cpu_layout
from shared import cliargs
from shared.candidates import AUTO, CLOUD, DEVICE
from shared.errors import ConfigError

__all__ = ["add_arguments", "run", "simulation"]

MODEL = "efficientnet_lite0"
NAMED_SPLITS = {"early": "_blocks.3", "middle": "_blocks.9", "late": "_blocks.15"}
DEFAULT_POLICIES = (CLOUD, DEVICE, "early", "middle", "late", AUTO)
MIN_PHOTOS = 120  # per policy and fleet size (module docstring)
LINK_MIX = ("lan", "wifi", "lte", "3g")  # device 0 is on lan: N=1 gives the proxy's overhead
# 128 devices at one photo a second offer ~128 requests/s: 1.6-2x what the one-core service
# serves of whole models from JPEGs (~63/s at small batches, ~80/s in batches of 16), under what
# it serves of middle tails (125/s at a mean batch of 1.3, measured at 1 s). Not 1.5 s (85/s):
# there `cloud` sat at its knife edge, where 5-10% on the speed of a 16-row pass moved its p95
# between 1.1 and 2 s. Past capacity every device falls behind by (1 - capacity / offered) of
# the time, so a p95's error is a throughput error times capacity / (offered - capacity): ~3x
# at 1.2 s (107/s), ~1.7x at 1 s. (An older, slower service saturated the middle tail at 1.2 s
# on a busy hour.)
# The service's default start-up profile (median of 5 per split point): auto plans with it, and
# one run per split point (bench service's setting) made near-ties between cheap-head splits and
# cloud on a LAN go either way from one start to the next.
PROFILE_REPEATS = 5

_INTS = cliargs.integers(at_least=1)  # --devices, --replicas


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"comma-separated names, each once, got {text!r}")
    return names


def _links(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in PROFILES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"links from {', '.join(PROFILES)}, got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench.__main__ import DEFAULT_OUT

    p.add_argument("--devices", type=_INTS, default=None,
                   help="fleet sizes (default 1,8,32,128; --quick 1,8; --simulate: its own)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument("--quick", action="store_true",
                   help="2 s warm-up + 4 s per policy in 2 rounds, sizes 1,8, uvicorn only "
                        "(~3 min)")
    p.add_argument("--policies", type=_names, default=list(DEFAULT_POLICIES),
                   help="cloud, device, early, middle, late, auto or split point names "
                        "(default: all six; early/middle/late = "
                        + ", ".join(NAMED_SPLITS.values()) + ")")
    p.add_argument("--engines", type=_names, default=None,
                   help="uvicorn and/or ray-serve (default both; --quick: uvicorn)")
    p.add_argument("--replicas", type=_INTS, default=None,
                   help="Ray Serve replica counts measured (default 1,2); with --simulate, the "
                        "simulation's replica counts")
    p.add_argument("--ray-policies", type=_names, default=["cloud", DEVICE, "middle", AUTO],
                   help="policies run on Ray Serve (default cloud,device,middle,auto: 2 cores)")
    p.add_argument("--ray-devices", type=_INTS, default=None,
                   help="fleet sizes run on Ray Serve (default: the smallest and the second "
                        "largest: one replica with Ray's own processes on one core falls far "
                        "behind 128 devices, and each photo taken must be answered)")
    p.add_argument("--period-ms", type=cliargs.real(above=0), default=PERIOD_MS,
                   help=f"each device takes a photo every this many ms (default {PERIOD_MS:g})")
    p.add_argument("--warmup", type=cliargs.real(above=0), default=None,
                   help="seconds of each policy not measured, before its first window "
                        "(default 4; --quick 2)")
    p.add_argument("--duration", type=cliargs.real(above=0), default=None,
                   help="seconds measured per policy and fleet size, over its rounds "
                        "(default 10; --quick 4)")
    p.add_argument("--rounds", type=cliargs.integer(at_least=1), default=None,
                   help="the policies of one fleet size take turns in this many rounds, one "
                        "window each per round (default 4, more for a fleet whose photo period "
                        "is shortened; --quick 2)")
    p.add_argument("--min-photos", type=cliargs.integer(at_least=1), default=None,
                   help="photos per policy and fleet size at least: a small fleet's window "
                        "stretches (up to 2x --duration), then its photo period shrinks "
                        f"(default {MIN_PHOTOS}: at N=1, 20 s at one photo every 0.17 s; "
                        "--quick 10)")
    p.add_argument("--timeout", type=cliargs.real(above=0), default=10.0,
                   help="a device's deadline per request, seconds (default 10)")
    p.add_argument("--link-mix", type=_links, default=list(LINK_MIX),
                   help="device i is on link_mix[i %% len] (default lan,wifi,lte,3g)")
    p.add_argument("--device-cpu", type=cliargs.real(above=0), default=0.2,
                   help="the device's share of a core when profiling (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="phases, hysteresis draws (default 0)")
    p.add_argument("--simulate", action="store_true",
                   help="run the discrete-event simulation (bench.fleet_sim) instead")
    p.add_argument("--from", dest="from_", type=Path, default=None,
                   help="the measured fleet.json the simulation starts from "
                        "(default DIR/fleet.json)")
    p.add_argument("--target-p95-ms", type=cliargs.real(above=0), default=1000.0,
                   help="the simulation's p95 target (default 1000)")


def simulation(doc: dict[str, Any], cache: Path) -> dict[str, Any]:
    """``doc["simulation"]``: every measured run simulated beside it (``bench.fleet_sim``)."""
    return fleet_sim.validate(doc, cache_dir=cache)


def run(args: argparse.Namespace) -> int:
    if args.simulate:
        return fleet_sim.run_cli(args)
    console = report.make_console()
    sizes = args.devices or ([1, 8] if args.quick else [1, 8, 32, 128])
    engines = args.engines or (["uvicorn"] if args.quick else ["uvicorn", "ray-serve"])
    bad = [e for e in engines if e not in ("uvicorn", "ray-serve")]
    if bad:
        raise ConfigError(f"--engines takes uvicorn and ray-serve, got {', '.join(bad)}")
    warmup = args.warmup or (2.0 if args.quick else 4.0)
    duration = args.duration or (4.0 if args.quick else 10.0)
    rounds = args.rounds or (2 if args.quick else 4)
    min_photos = args.min_photos or (10 if args.quick else MIN_PHOTOS)
    policies = [NAMED_SPLITS.get(p, p) for p in args.policies]
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "fleet-cache"
    started = time.perf_counter()
    profile, profile_doc = device_profile(cache, MODEL, device_cpu=args.device_cpu,
                                          console=console)
    candidates = [c.split for c in profile.costs]
    unknown = [p for p in policies if p not in (*candidates, AUTO)]
    if unknown:
        raise ConfigError(f"unknown policy {unknown[0]!r}: cloud, device, auto, early, middle, "
                          f"late or a split point of {MODEL}")
    with console.status("encoding every candidate's frames (cached)"):
        payloads = encode_payloads(cache, MODEL, candidates)
    inputs = FleetInputs(MODEL, profile, payloads)
    layout = cpu_layout()
    settings = _settings(layout)
    common = {"link_mix": tuple(args.link_mix), "period_s": args.period_ms / 1e3,
              "warmup_s": warmup, "duration_s": duration, "timeout_s": args.timeout,
              "seed": args.seed, "rounds": rounds, "min_photos": min_photos,
              "fine_rounds": args.rounds is None}
    runs: list[dict[str, Any]] = []
    measured: list[tuple[dict[str, Any], RunSpec, FleetRun]] = []  # for fleet_records
    notes = []
    startup: dict[str, dict[str, Any]] = {}  # per deployment: what a device's start-up costs it
    if "uvicorn" in engines:
        with service._service(console, MODEL, settings, layout,
                              profile_repeats=PROFILE_REPEATS) as svc:
            startup[group_key("uvicorn", 1)] = asyncio.run(startup_ms(svc.url, MODEL))
            measured += _runs(console, svc.url, inputs, "uvicorn", 1, policies, sizes, common)
    if "ray-serve" in engines:
        ordered = sorted(sizes)
        ray_sizes = args.ray_devices or sorted({ordered[0], ordered[max(0, len(ordered) - 2)]})
        ray_policies = [NAMED_SPLITS.get(p, p) for p in args.ray_policies]
        for replicas in args.replicas or [1, 2]:
            try:
                with _ray(settings, layout, replicas) as url:
                    startup[group_key("ray-serve", replicas)] = asyncio.run(
                        startup_ms(url, MODEL))
                    measured += _runs(console, url, inputs, "ray-serve", replicas,
                                      ray_policies, ray_sizes, common)
            except ConfigError as exc:
                notes.append(f"ray-serve skipped: {exc}")
                console.print(f"[yellow]{notes[-1]}[/]")
                break
    runs = [row for row, _, _ in measured]
    doc = _document(args, runs, inputs, profile_doc, settings, layout, common, sizes, engines,
                    notes, time.perf_counter() - started, startup)
    doc["simulation"] = simulation(doc, cache)
    paths = fleet_report.write(doc, args.out, console)
    # after fleet.json: records never sit beside an older fleet.json whose rows they would join
    paths.append(fleet_records.save(args.out / fleet_records.RECORDS_NAME, measured))
    console.print(f"measured in {time.perf_counter() - started:.0f} s; wrote "
                  + ", ".join(map(str, paths)))
    return 0


def _settings(layout: CpuLayout) -> dict[str, Any]:
    ns = argparse.Namespace(max_batch_size=None, max_queue_delay_ms=None, max_queue=None,
                            threads=1)
    return service._service_settings(ns, layout)


def _runs(console: Any, url: str, inputs: FleetInputs, engine: str, replicas: int,
          policies: list[str], sizes: list[int], common: dict[str, Any],
          ) -> list[tuple[dict[str, Any], RunSpec, FleetRun]]:
    """Every policy at every size: one size at a time, its policies side by side in rounds.
    Each run's fleet.json row, with its spec and records (``bench.fleet_records``)."""
    rows: list[tuple[dict[str, Any], RunSpec, FleetRun]] = []
    common = dict(common)
    min_photos = common.pop("min_photos")
    fine = common.pop("fine_rounds")
    for n in sizes:
        period_s, duration_s = size_window(n, period_s=common["period_s"],
                                           duration_s=common["duration_s"],
                                           min_photos=min_photos)
        shortened = fine and period_s < common["period_s"]
        rounds = size_rounds(common["rounds"], policies=len(policies), period_s=period_s,
                             duration_s=duration_s, shortened=shortened)
        specs = [RunSpec(policy=policy, devices=n, **{**common, "period_s": period_s,
                                                      "duration_s": duration_s,
                                                      "rounds": rounds})
                 for policy in policies]
        with console.status(f"{engine}x{replicas} N={n}") as status:
            def shown(spec: RunSpec, r: int, n: int = n) -> None:
                status.update(f"{engine}x{replicas} N={n}: round {r + 1} of {spec.rounds}, "
                              f"{spec.policy}")

            # With two replicas each scrape of /metrics answers from either one, and a window's
            # two scrapes make no delta (mean batches under 1 came out): the answers' then.
            # Nor between a shortened fleet's short windows (a single device's at the
            # defaults): two scrapes per 3 photos would load the service beside them.
            results = asyncio.run(run_rounds(
                url, inputs, specs, on_window=shown,
                scrape_metrics=replicas == 1 and not shortened,
                **({"pause_s": FINE_PAUSE_S} if shortened else {})))
        for spec, result in zip(specs, results, strict=True):
            row = summarize(result.records, spec, engine=engine, replicas=replicas,
                            mean_batch_size=result.mean_batch_size,
                            mean_batch_source=result.mean_batch_source,
                            windows=result.windows)
            row["served"] = fleet_sim.served(result.records, spec, inputs,  # the sim's inputs
                                              windows=result.windows)
            console.print(fleet_report.progress(row))
            rows.append((row, spec, result))
    return rows


@contextmanager
def _ray(settings: dict[str, Any], layout: CpuLayout, replicas: int) -> Iterator[str]:
    """Ray Serve with ``replicas`` replicas of the same settings on a local Ray. One replica
    gets the service's core (Ray's own processes with it) and this process keeps the other;
    two replicas need both cores, shared with this process."""
    from bench.serve_overhead import _ray_serve

    env = {
        "SPLITSERVE_MODELS": MODEL,
        "SPLITSERVE_PROFILE_REPEATS": str(PROFILE_REPEATS),
        "SPLITSERVE_THREADS": str(settings["threads"]),
        "OMP_NUM_THREADS": str(settings["threads"]),
        "SPLITSERVE_MAX_BATCH_SIZE": str(settings["max_batch_size"]),
        "SPLITSERVE_MAX_QUEUE_DELAY_MS": str(settings["max_queue_delay_ms"]),
        "SPLITSERVE_MAX_QUEUE": str(settings["max_queue"]),
        "SPLITSERVE_BACKEND": settings["backend"],
        "SPLITSERVE_BUNDLE_DIR": settings["bundle_dir"],
        "SPLITSERVE_LOG_LEVEL": "warning",
    }
    cores = layout.service if replicas == 1 else layout.service | layout.client
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)  # Ray's processes inherit it as they start
    try:
        with _ray_serve(env, replicas=replicas, after_start=lambda: os.sched_setaffinity(
                0, layout.client)) as url:
            yield url
    finally:
        os.sched_setaffinity(0, old)


def _document(args: argparse.Namespace, runs: list[dict[str, Any]], inputs: FleetInputs,
              profile_doc: dict[str, Any], settings: dict[str, Any], layout: CpuLayout,
              common: dict[str, Any], sizes: list[int], engines: list[str], notes: list[str],
              elapsed_s: float, startup: dict[str, dict[str, Any]]) -> dict[str, Any]:
    head_ms = {c.split: round(inputs.head_ms(c.split), 3) for c in inputs.profile.costs}
    request_bytes = {c: round(statistics.fmean(len(p.body) for p in bodies), 1)
                     for c, bodies in inputs.payloads.items()}
    request_bytes[DEVICE] = 0.0
    bars = bar(runs)
    for row in runs:
        match = next((b for b in bars if row["policy"] == AUTO and
                      (b["engine"], b["replicas"], b["devices"])
                      == (row["engine"], row["replicas"], row["devices"])), None)
        if match is not None:
            row["auto_vs_best_p95"] = match["ratio"]
    ray_runs = [r for r in runs if r["engine"] == "ray-serve"]
    return {
        "runs": runs,
        "bar": {"max_ratio": 1.10, "per_size": bars,
                "met": bool(bars) and all(b["ratio_met"] and b.get("clean_met", True)
                                          for b in bars)},
        "proxy_overhead": fleet_report.proxy_overhead(runs),
        "simulation": {},
        "inputs": {
            "model": MODEL,
            "period_ms": common["period_s"] * 1e3,
            "duration_s": common["duration_s"],  # each run's own is its row's duration_s
            "rounds": common["rounds"],
            "min_photos": common["min_photos"],
            "warmup_s": common["warmup_s"],
            "timeout_s": common["timeout_s"],
            "link_mix": list(common["link_mix"]),
            "links": {name: {"rtt_ms": s.rtt_ms, "up_bps": s.uplink_bps,
                             "down_bps": s.downlink_bps} for name, s in PROFILES.items()},
            "head_ms": head_ms,
            "tail_ms": {c.split: round(inputs.tail_ms(c.split), 3)
                        for c in inputs.profile.costs if c.split != DEVICE},
            "request_bytes": request_bytes,
            "response_bytes": 700.0,  # shared.planner.RESPONSE_BYTES: top-5 JSON + headers
            "split_points": dict(NAMED_SPLITS),
            "profile": profile_doc["costs"],
            "service": {"batch_max": settings["max_batch_size"],
                        "batch_wait_ms": settings["max_queue_delay_ms"],
                        "max_queue": settings["max_queue"],
                        "threads": settings["threads"], "backend": settings["backend"]},
            # per deployment (engine/replicas): a device's start-up, serial (fleet_startup)
            "startup_ms": startup,
        },
        "setup": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "device_cpu_limit": profile_doc["device_cpu"],
            "device_cpu_limited": profile_doc["device_cpu_limited"],
            "cpus": layout.describe(),
            "engines": engines,
            "sizes": sizes,
            "ray_runs": sorted({(r["replicas"], r["policy"], r["devices"]) for r in ray_runs}),
            # what Ray's own processes ran with (bench.serve_overhead.RAY_ENV says why)
            "ray_env": dict(RAY_ENV) if ray_runs else {},
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "elapsed_s": round(elapsed_s, 1),
            "command": _command(args),
            "notes": " ".join([
                "Emulated devices do not compute: each waits its head time (the device "
                "profile, measured under a cgroup limit of "
                f"{profile_doc['device_cpu']:g} of a core) and its link's RTT and transfer "
                "time (asyncio sleeps in an httpx transport, not a proxy): that is what fits 128 "
                "devices beside the service on 2 cores (the devices in one process on one core, "
                "the service on the other). What is measured is the service, which is real. "
                f"Link mix {', '.join(common['link_mix'])} (device i on link_mix[i % "
                f"{len(common['link_mix'])}]). A photo every {common['period_s'] * 1e3:g} ms "
                "per device (less in a fleet too small for the photos a p95 needs: see the "
                f"rows' period_ms): 128 devices offer ~{128 / common['period_s']:.0f} requests/s, "
                "over what the one-core service serves of whole models (~63-80/s) and under "
                "what it serves of middle tails (see the middle split's batch size at 128 for "
                "what this run's machine allowed).", *notes]),
        },
    }


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m bench fleet"]
    if args.quick:
        parts.append("--quick")
    if args.devices:
        parts.append("--devices " + ",".join(map(str, args.devices)))
    if args.engines:
        parts.append("--engines " + ",".join(args.engines))
    if getattr(args, "rounds", None):
        parts.append(f"--rounds {args.rounds}")
    parts.append(f"--out {args.out}")
    return " ".join(parts)
