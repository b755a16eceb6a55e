"""The output of ``bench service``: the table, the bar, ``service.json`` and the chart.

    doc = to_json(runs, raw_rps=180.0, command="python -m bench service", settings={...})
    plot(runs, 180.0, Path("bench/results/service.png"), title="...")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.service_load import LevelStats

__all__ = ["ALIGN", "BAR", "HEADERS", "check_bar", "markdown", "plot", "table_rows", "to_json"]

HEADERS = (
    "clients",
    "ok",
    "503",
    "errors",
    "throughput (req/s)",
    "efficiency",
    "mean batch",
    "p50 ms",
    "p99 ms",
    "service CPU",
)
ALIGN = "r" * len(HEADERS)
# At 16 clients the service delivers at least 80% of raw batched compute; at 64 it answers
# every request, correctly or with a fast 503.
BAR = {"efficiency_at": 16, "min_efficiency": 0.8, "no_errors_at": 64}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table_rows(runs: Sequence[LevelStats], raw_rps: float) -> list[list[str]]:
    """Rows of the results table (``HEADERS``), one per concurrency level. "service CPU" is the
    service's share of its cores during the window."""
    return [
        [
            str(r.concurrency),
            f"{r.ok:,}",
            f"{r.rejected_503:,}",
            f"{r.errors:,}",
            f"{r.throughput_rps:.1f}",
            f"{r.efficiency(raw_rps):.1%}",
            _fmt(r.mean_batch_size, ".2f"),
            _fmt(r.p50_ms, ".1f"),
            _fmt(r.p99_ms, ".1f"),
            _fmt(r.service_cpu_utilization, ".0%"),
        ]
        for r in runs
    ]


def check_bar(runs: Sequence[LevelStats], raw_rps: float) -> dict[str, Any]:
    """``BAR`` with what was measured against it; a level that was not run reads None."""
    by_level = {r.concurrency: r for r in runs}
    busy = by_level.get(BAR["efficiency_at"])
    crowded = by_level.get(BAR["no_errors_at"])
    efficiency = None if busy is None else busy.efficiency(raw_rps)
    return {
        **BAR,
        "efficiency": None if efficiency is None else round(efficiency, 4),
        "efficiency_met": None if efficiency is None else efficiency >= BAR["min_efficiency"],
        "errors": None if crowded is None else crowded.errors,
        "no_errors_met": None if crowded is None else crowded.errors == 0,
    }


def to_json(
    runs: Sequence[LevelStats],
    raw_rps: float,
    command: str,
    *,
    raw_nearby: Sequence[float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ``service.json`` document: the ceiling, one entry per level, the bar, then ``extra``
    (settings, machine, timings). ``raw_nearby[i]`` is raw compute measured next to level i
    (before and after it, averaged): on a machine others share, the fairer ceiling for it."""
    docs = [r.to_json(raw_rps) for r in runs]
    if raw_nearby is not None:
        if len(raw_nearby) != len(runs):
            raise ValueError(f"{len(raw_nearby)} nearby raw measurements for {len(runs)} runs")
        for doc, run, nearby in zip(docs, runs, raw_nearby, strict=True):
            doc["raw_compute_rps_nearby"] = round(nearby, 2)
            doc["efficiency_nearby"] = round(run.efficiency(nearby), 4)
    return {
        "raw_compute_rps": round(raw_rps, 2),
        "runs": docs,
        "bar": check_bar(runs, raw_rps),
        **extra,
        "command": command,
    }


def markdown(
    runs: Sequence[LevelStats], raw_rps: float, *, heading: str, intro: str, command: str
) -> str:
    """``service.md``: a heading, a paragraph, the command, the table."""
    table = report.markdown_table(HEADERS, table_rows(runs, raw_rps), align=ALIGN)
    return f"# {heading}\n\n{intro}\n\n`{command}`\n\n{table}"


def plot(runs: Sequence[LevelStats], raw_rps: float, path: Path, title: str) -> Path:
    """Top: throughput against the raw-compute ceiling; the right axis reads the same line as
    efficiency, and each point is labelled with it and the mean batch size. Bottom: p50 and p99
    latency (log). Both over the number of clients (log 2)."""
    fig, (top, bottom) = report.new_figure(2, sharex=True, size_in=(8.0, 7.0))
    x = [r.concurrency for r in runs]
    top.plot(x, [r.throughput_rps for r in runs], "o-", c="C0", label="service throughput")
    top.axhline(raw_rps, ls="--", c="gray", label=f"raw batched compute ({raw_rps:.0f}/s)")
    bar = BAR["min_efficiency"] * raw_rps
    top.axhline(bar, ls=":", c="C3", label=f"{BAR['min_efficiency']:.0%} of raw (the bar)")
    for r in runs:
        batch = "" if r.mean_batch_size is None else f"\nbatch {r.mean_batch_size:.1f}"
        top.annotate(
            f"{r.efficiency(raw_rps):.0%}{batch}",
            (r.concurrency, r.throughput_rps),
            textcoords="offset points",
            xytext=(0, -26),
            ha="center",
            fontsize="small",
        )
    top.set_ylabel("ok answers / s")
    top.set_ylim(0, max(raw_rps, *(r.throughput_rps for r in runs)) * 1.15)
    top.set_title(title, fontsize="medium")
    if raw_rps > 0:
        right = top.secondary_yaxis(
            "right", functions=(lambda y: y / raw_rps, lambda e: e * raw_rps)
        )
        right.set_ylabel("efficiency (throughput / raw)")
    top.legend(fontsize="small", loc="lower right")
    for name, attr, style in (("p50", "p50_ms", "o-"), ("p99", "p99_ms", "s--")):
        points = [(r.concurrency, getattr(r, attr)) for r in runs if getattr(r, attr) is not None]
        bottom.plot([p[0] for p in points], [p[1] for p in points], style, label=name)
    bottom.set_yscale("log")
    bottom.set_ylabel("latency of ok answers (ms)")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(x, [str(c) for c in x])
    bottom.set_xlabel("concurrent clients")
    bottom.legend(fontsize="small")
    return report.save_png(fig, path)
