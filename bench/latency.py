"""End-to-end latency of every candidate and of `auto`, through emulated links, on a slow device.

    python -m bench latency                        # 4 links x 20 images x every candidate + drop
    python -m bench latency --quick --out /tmp/lat # 3g and wifi, 5 images: under 3 minutes
    python -m bench latency --links 3g,lte --images 10 --device-cpu 0.5
    python -m bench latency --runtime torch        # the eager PyTorch device, as before
    python -m bench latency --precision int8 --bundle DIR   # a bundle exported with --int8

The real service (``python -m cloud_server``, one compute thread, its own core) sits behind a
userspace proxy that emulates each link: ``3g`` 1.6/1.6 Mbit/s and 150 ms RTT, ``lte`` 6 up /
20 down and 50 ms, ``wifi`` 30 Mbit/s and 10 ms, ``lan`` 500 Mbit/s and 1 ms (``bench.netem``).
The device is a separate process on the other core, limited by a cgroup to ``--device-cpu`` of
it (0.2: about a Raspberry Pi 4 core; ``bench.cpulimit``), where it measures its own profile and
runs the real device client (``bench.device_worker``) on the runtime the device CLI defaults to,
ONNX Runtime fp32 on the service's bundle (``--runtime``, ``--precision``, ``--bundle``).

For each link: ``device``, ``cloud``, every split point and ``auto`` on the same images, in a
random order per image (``--seed``); p50 and p95 of the device-measured total latency. The
oracle is the fixed candidate with the lowest p50. ``auto`` is compared with the oracle and with
the fixed run of the candidate it chose (``auto/chosen``: what auto itself adds), and its own
prediction for its choice is set against what it measured (``predicted (err)``).
Then the drop: ``auto`` runs on ``wifi``, the link turns into ``3g`` mid-run, and the trace shows
how many requests ``auto`` needs to move. Writes ``latency.json``, ``latency.md``,
``latency.png`` and ``latency_raw.json`` (every inference) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import torch

from bench import latency_report, report
from bench.cpulimit import PERIOD_US
from bench.latency_run import RunConfig, measure
from bench.netem import PROFILES
from bench.runtime_measure import cpu_info
from shared import cliargs
from shared.errors import ConfigError
from shared.models import list_models

__all__ = ["add_arguments", "run"]

QUICK_LINKS = ("3g", "wifi")


def _links(text: str) -> tuple[str, ...]:
    if text == "none":
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown link {unknown[0]!r}; known: {list(PROFILES)}")
    return names


def _drop(text: str) -> tuple[str, str] | None:
    if text == "none":
        return None
    before, sep, after = text.partition(":")
    if not sep or before not in PROFILES or after not in PROFILES or before == after:
        raise argparse.ArgumentTypeError(f"expected FROM:TO with two known links, got {text!r}")
    return before, after


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0", choices=list_models())
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"links {','.join(QUICK_LINKS)}, 5 images, a shorter drop: < 3 minutes",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results"),
        help="output directory (default bench/results)",
    )
    p.add_argument(
        "--links",
        type=_links,
        default=None,
        help=f"comma-separated, from {','.join(PROFILES)} (default: all; "
        f"{','.join(QUICK_LINKS)} with --quick; none: only the drop)",
    )
    p.add_argument(
        "--images",
        type=cliargs.integer(at_least=1),
        default=None,
        help="the 5 photos + augmented crops, per candidate (default 20; 5 --quick)",
    )
    p.add_argument(
        "--splits",
        default="all",
        help="comma-separated split points to run as fixed candidates (default: all, or every "
        "--split-stride-th)",
    )
    p.add_argument(
        "--split-stride",
        type=cliargs.integer(at_least=1),
        default=None,
        help="without --splits, run every Nth split point and the last (default 1; 2 with "
        "--quick, where the early wide cuts take 1-2 s each on 3g)",
    )
    p.add_argument(
        "--device-cpu",
        type=cliargs.real(at_least=0, at_most=64),
        default=0.2,
        help="the device's share of one core (default 0.2, ~a Raspberry Pi 4 core; 0: no limit)",
    )
    p.add_argument(
        "--cpu-period-us",
        type=cliargs.integer(at_least=1000, at_most=1_000_000),
        default=PERIOD_US,
        help=f"cgroup CPU period (default {PERIOD_US}: see bench/cpulimit.py)",
    )
    p.add_argument(
        "--cpu-shares",
        type=cliargs.integer(at_least=0),
        default=8192,
        help="cpu.shares of the device's group and of the service's (default 8192, 8x an "
        "ordinary process: jobs sharing the machine don't eat into the device's quota or the "
        "service's core; 0: leave the weights alone)",
    )
    p.add_argument(
        "--warmup",
        type=cliargs.integer(at_least=0),
        default=1,
        help="untimed inferences before each fixed candidate (default 1)",
    )
    p.add_argument(
        "--auto-warmup",
        type=cliargs.integer(at_least=0),
        default=2,
        help="untimed inferences by auto on each link before timing it (default 2)",
    )
    p.add_argument(
        "--drop",
        type=_drop,
        default=("wifi", "3g"),
        metavar="FROM:TO",
        help="the link change auto must follow (default wifi:3g; none: skip)",
    )
    p.add_argument(
        "--drop-before",
        type=cliargs.integer(at_least=1),
        default=None,
        help="auto requests before the change (default 20; 10 with --quick)",
    )
    p.add_argument(
        "--drop-after",
        type=cliargs.integer(at_least=1),
        default=None,
        help="auto requests after the change (default 15; 10 with --quick)",
    )
    p.add_argument(
        "--profile-repeats",
        type=cliargs.integer(at_least=1),
        default=5,
        help="timed runs per candidate when the device profiles itself (default 5)",
    )
    p.add_argument(
        "--server-profile-repeats",
        type=cliargs.integer(at_least=1),
        default=5,
        help="the service's own start-up timing runs per split point (default 5)",
    )
    p.add_argument(
        "--runtime",
        choices=["onnx", "torch"],
        default="onnx",
        help="the device's runtime, as `device_client --runtime` (default onnx: the service's "
        "bundle on ONNX Runtime)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        default="fp32",
        help="the device heads' precision (default fp32; int8 needs --bundle DIR exported with "
        "--int8)",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        metavar="DIR",
        help="a local bundle for --runtime onnx (default: the service's, fetched once)",
    )
    p.add_argument(
        "--seed",
        type=cliargs.integer(at_least=0),
        default=0,
        help="seeds the order the candidates run in for each photo (default 0)",
    )


def _config(args: argparse.Namespace) -> RunConfig:
    links = args.links if args.links is not None else QUICK_LINKS if args.quick else tuple(PROFILES)
    splits = (
        None
        if args.splits == "all"
        else tuple(s.strip() for s in args.splits.split(",") if s.strip())
    )
    drop = args.drop
    return RunConfig(
        model=args.model,
        links=links,
        images=args.images or (5 if args.quick else 20),
        splits=splits,
        split_stride=args.split_stride or (2 if args.quick else 1),
        device_cpu=args.device_cpu,
        period_us=args.cpu_period_us,
        shares=args.cpu_shares,
        warmup=args.warmup,
        auto_warmup=args.auto_warmup,
        drop_from=drop[0] if drop else None,
        drop_to=drop[1] if drop else "3g",
        drop_before=args.drop_before or (10 if args.quick else 20),
        drop_after=args.drop_after or (10 if args.quick else 15),
        profile_repeats=args.profile_repeats,
        server_profile_repeats=args.server_profile_repeats,
        out=args.out,
        seed=args.seed,
        runtime=args.runtime,
        precision=args.precision,
        bundle=args.bundle,
    )


def _command(c: RunConfig) -> str:
    """Every option spelled out, so the command reproduces the run even if defaults change."""
    drop = f"{c.drop_from}:{c.drop_to}" if c.drop_from else "none"
    return (
        f"python -m bench latency --model {c.model} --links {','.join(c.links) or 'none'} "
        f"--images {c.images} --splits {','.join(c.splits) if c.splits else 'all'} "
        f"--split-stride {c.split_stride} "
        f"--device-cpu {c.device_cpu:g} --cpu-period-us {c.period_us} --cpu-shares {c.shares} "
        f"--warmup {c.warmup} "
        f"--auto-warmup {c.auto_warmup} --drop {drop} --drop-before {c.drop_before} "
        f"--drop-after {c.drop_after} --profile-repeats {c.profile_repeats} "
        f"--server-profile-repeats {c.server_profile_repeats} --seed {c.seed} "
        f"--runtime {c.runtime} --precision {c.precision} "
        + (f"--bundle {c.bundle} " if c.bundle is not None else "")
        + f"--out {c.out}"
    )


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    if config.precision == "int8" and (config.runtime != "onnx" or config.bundle is None):
        # The service this starts hands out a float32 bundle: say so now, not after it started.
        raise ConfigError("--precision int8 needs --runtime onnx and --bundle DIR "
                          "(python -m device_client export --model M --int8 --out DIR)")
    command = _command(config)
    args.out.mkdir(parents=True, exist_ok=True)  # fail now, not after minutes of measuring
    console = report.make_console()
    load = os.getloadavg()
    if load[0] > 0.5:
        console.print(
            f"[yellow]note:[/] load average {load[0]:.2f} at start: other jobs share "
            "the cores, and timings will show it"
        )
    started = time.perf_counter()
    raw = asyncio.run(measure(config, console))
    elapsed = time.perf_counter() - started
    summary = latency_report.summarize(
        raw,
        command=command,
        elapsed_s=round(elapsed, 1),
        load_average_at_start=[round(x, 2) for x in load],
        load_average_at_end=[round(x, 2) for x in os.getloadavg()],
        torch=torch.__version__,
        cpu=cpu_info(),
        shaper="userspace proxy (bench.netem)",
    )
    paths = latency_report.write_outputs(summary, raw, args.out)
    report.print_table(
        f"{config.model} on {config.runtime} {config.precision}: end-to-end ms on a device with "
        + (
            f"{config.device_cpu:g} of a core, {summary.get('cpu_limit_interface')}"
            if summary["device_cpu_limited"]
            else "FULL CPU"
        ),
        latency_report.HEADERS,
        latency_report.table_rows(summary),
        align=latency_report.ALIGN,
        console=console,
    )
    drop = summary.get("drop")
    if drop is not None:
        console.print(
            f"drop {drop['from']} -> {drop['to']}: auto used {drop['before']}, first moved at "
            f"request {drop['requests_to_move']} after the change (to {drop['moved_to']}), "
            f"settled on {drop['after']} from request {drop['requests_to_settle']}"
        )
    for warning in summary.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {warning}")
    console.print(f"measured in {elapsed:.0f} s; wrote " + ", ".join(map(str, paths)))
    return 0
