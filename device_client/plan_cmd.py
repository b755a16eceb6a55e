"""``profile`` and ``plan``: what each candidate costs here, and which one the planner picks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from device_client.client import ServiceClient, tls_verify
from device_client.link import LinkEstimator, probe
from device_client.options import EncodeOptions
from device_client.profile import REPEATS, ProfiledRuntime, load_or_measure
from shared.errors import ConfigError
from shared.planner import DeviceProfile, LinkEstimate, Plan, ServerProfile, choose

__all__ = ["device_profile", "run_plan", "run_profile"]

_TERMS = ("head_ms", "encode_ms", "rtt_ms", "transfer_ms", "server_ms")
_UNBOUNDED_COLUMNS = 10_000  # wider than any table: rich then sizes it to its content


def device_profile(runtime: ProfiledRuntime, options: EncodeOptions, *, jpeg_quality: int = 90,
                   repeats: int = REPEATS, force: bool = False
                   ) -> tuple[DeviceProfile, Path, bool]:
    """The cached profile, or a measurement with a progress bar on stderr."""
    console = Console(stderr=True)
    total = len(runtime.points) + 2
    with Progress(TextColumn("profiling {task.fields[what]:<14}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("profile", total=total, what="")
        steps = 0

        def step(name: str) -> None:
            nonlocal steps
            bar.update(task, completed=steps, what=name)
            steps += 1

        result = load_or_measure(runtime, options=options, jpeg_quality=jpeg_quality,
                                 repeats=repeats, force=force, progress=step)
        bar.update(task, completed=total)
    return result


def run_profile(args: argparse.Namespace, runtime: ProfiledRuntime, options: EncodeOptions) -> int:
    profile, path, measured = device_profile(runtime, options, jpeg_quality=args.jpeg_quality,
                                             repeats=args.repeats, force=args.force)
    if args.json:
        print(json.dumps({"model": profile.model, "fingerprint": profile.fingerprint,
                          "cache": str(path), "measured_now": measured,
                          "runtime": runtime.kind, "precision": runtime.precision,
                          "threads": runtime.threads,
                          "costs": [c.__dict__ for c in profile.costs]}))
        return 0
    table = Table(title=f"{profile.model} on this device, {runtime.kind} {runtime.precision} "
                        f"{runtime.threads} thread(s) "
                        f"({'measured now' if measured else 'cached'}: {path})")
    for column in ("candidate", "head ms", "encode ms", "payload bytes"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for c in profile.costs:
        table.add_row(c.split, f"{c.head_ms:.2f}", f"{c.encode_ms:.2f}", f"{c.payload_bytes:,}")
    _print_table(table)
    return 0


async def run_plan(args: argparse.Namespace, runtime: ProfiledRuntime, options: EncodeOptions
                   ) -> int:
    profile, _, _ = device_profile(runtime, options, jpeg_quality=args.jpeg_quality)
    async with ServiceClient(args.server, api_key=args.api_key, timeout_s=args.timeout,
                             verify=tls_verify(args.ca_cert)) as client:
        server = ServerProfile.from_metadata(await client.metadata(runtime.name))
        link = await _link(client, runtime.name, args.bandwidth_mbps, args.rtt_ms)
    plan = choose(profile, server, link, hysteresis=0.0)
    if args.chart:
        _chart(plan, Path(args.chart), link)
    if args.json:
        print(json.dumps({**plan.to_json(), "link": {
            "uplink_mbps": link.uplink_bps / 1e6, "rtt_ms": link.rtt_ms, "source": link.source}}))
        return 0
    _print_plan(plan, link)
    return 0


async def _link(client: ServiceClient, model: str, bandwidth_mbps: float | None,
                rtt_ms: float | None) -> LinkEstimate:
    """Given figures win; whatever is not given is measured against the service."""
    if bandwidth_mbps is not None and rtt_ms is not None:
        return LinkEstimate(uplink_bps=bandwidth_mbps * 1e6, rtt_ms=rtt_ms, source="given")
    measured = await probe(client, model, LinkEstimator())
    if measured is None:
        raise ConfigError("could not measure the link to the service; pass --bandwidth-mbps "
                          "and --rtt-ms")
    return LinkEstimate(
        uplink_bps=bandwidth_mbps * 1e6 if bandwidth_mbps is not None else measured.uplink_bps,
        rtt_ms=rtt_ms if rtt_ms is not None else measured.rtt_ms,
        source="given" if bandwidth_mbps is not None or rtt_ms is not None else "measured")


def _print_plan(plan: Plan, link: LinkEstimate) -> None:
    table = Table(title=f"uplink {link.uplink_bps / 1e6:.2f} Mbit/s, RTT {link.rtt_ms:.1f} ms "
                        f"({link.source}); chosen: {plan.chosen}")
    for column in ("", "split", *_TERMS[:2], "payload_bytes", *_TERMS[2:], "total_ms"):
        table.add_column(column, justify="left" if column in ("", "split") else "right")
    for e in plan.candidates:
        table.add_row("*" if e.split == plan.chosen else "", e.split, f"{e.head_ms:.1f}",
                      f"{e.encode_ms:.1f}", f"{e.payload_bytes:,}", f"{e.rtt_ms:.1f}",
                      f"{e.transfer_ms:.1f}", f"{e.server_ms:.1f}", f"{e.total_ms:.1f}",
                      style="bold" if e.split == plan.chosen else None)
    _print_table(table)


def _print_table(table: Table) -> None:
    """On a terminal, rich fits the table to its width. Piped or logged there is no width to
    fit, and rich's default of 80 columns would cut names to `encod…`: print whole values, and
    the title (a cache path) on one line."""
    if sys.stdout.isatty():
        Console().print(table)
        return
    table.title = Text(str(table.title), no_wrap=True, overflow="ignore")
    Console(width=_UNBOUNDED_COLUMNS).print(table)


def _chart(plan: Plan, path: Path, link: LinkEstimate) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--chart needs matplotlib: pip install 'splitserve[bench]'") from exc
    names = [e.split for e in plan.candidates]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.35 * len(names)), 4.5))
    bottom = [0.0] * len(names)
    for term in _TERMS:
        values = [getattr(e, term) for e in plan.candidates]
        ax.bar(names, values, bottom=bottom, label=term.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    chosen = names.index(plan.chosen)
    ax.annotate("chosen", (chosen, bottom[chosen]), ha="center", va="bottom")
    ax.set_ylabel("expected latency (ms)")
    ax.set_title(f"{link.uplink_bps / 1e6:.2f} Mbit/s up, RTT {link.rtt_ms:.0f} ms")
    ax.tick_params(axis="x", rotation=90)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    finally:
        plt.close(fig)
    print(f"chart written to {path}", file=sys.stderr)
