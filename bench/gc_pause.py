"""The service's full garbage collections, before and after it freezes its start-up heap.

    python -m bench gc-pause --out /tmp/gc
    python -m bench gc-pause --repeats 20

Builds the service's app in a Python process of its own, importing what ``python -m
cloud_server`` imports and no more (its SPLITSERVE_* settings, the onnxruntime backend,
``--models``), runs its lifespan until the models have loaded, and times ``--repeats`` full
collections (``gc.collect()``: generation 2, what Python runs now and then as objects survive)
with the heap as loading left it; then freezes it as the service does once loaded
(``cloud_server.memory.freeze_heap``) and times as many again. A collection holds the GIL: the
event loop, decodes and the batcher wait for it, and so does every request in flight. Writes
``gc_pause.json``, ``gc_pause.md`` and ``gc_pause.png`` to ``--out`` (default
``bench/results``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cloud_server.app import create_app
from cloud_server.memory import freeze_heap
from cloud_server.settings import Settings
from shared.errors import SplitServeError

__all__ = ["add_arguments", "run"]

MODEL = "efficientnet_lite0"
LOAD_TIMEOUT_S = 600.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from shared import cliargs

    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    p.add_argument("--models", default=MODEL, help=f"models the service loads (default {MODEL})")
    p.add_argument("--repeats", type=cliargs.integer(at_least=1), default=10,
                   help="full collections timed in each state (default 10)")


def run(args: argparse.Namespace) -> int:
    child = subprocess.run([sys.executable, "-m", "bench.gc_pause", args.models,
                            str(args.repeats)], capture_output=True, text=True, check=False)
    if child.returncode != 0:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise SplitServeError(f"the service's process failed: {tail}")
    rows = json.loads(child.stdout.strip().splitlines()[-1])
    doc = {"models": args.models, "repeats": args.repeats, "python": platform.python_version(),
           "host": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
           "results": rows}
    from bench import report  # here, not in the service's process: rich and matplotlib

    headers = ["heap", "objects walked", "full collection p50 ms", "max ms"]
    table = [[r["heap"], f"{r['objects']:,}", f"{r['p50_ms']:.1f}", f"{r['max_ms']:.1f}"]
             for r in rows]
    report.write_json(args.out / "gc_pause.json", doc)
    report.write_text(args.out / "gc_pause.md", "# Full garbage collections in the service\n\n"
                      + report.markdown_table(headers, table, align="lrrr") + "\n")
    report.save_png(_chart(rows), args.out / "gc_pause.png")
    report.print_table("Full garbage collections in the service's process", headers, table,
                       align="lrrr")
    print(f"wrote {args.out / 'gc_pause.json'}, gc_pause.md and gc_pause.png")
    return 0


async def _measure(models: str, repeats: int) -> list[dict[str, Any]]:
    # freeze_heap=False: the app loads as the service's does, and this bench freezes it itself
    app = create_app(Settings(models=tuple(models.split(","))))
    service = app.state.service
    rows = []
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(service.wait_ready, LOAD_TIMEOUT_S)
        try:
            rows.append(_collections("as loaded", repeats))
            freeze_heap()
            rows.append(_collections("frozen once loaded", repeats))
        finally:
            gc.unfreeze()  # this process is not the service: leave its collector as it was
    return rows


def _collections(heap: str, repeats: int) -> dict[str, Any]:
    walked = len(gc.get_objects())  # what a full collection walks: the frozen are not listed
    times_ms = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        times_ms.append((time.perf_counter() - started) * 1e3)
    return {"heap": heap, "objects": walked, "frozen": gc.get_freeze_count(),
            "p50_ms": round(statistics.median(times_ms), 3), "max_ms": round(max(times_ms), 3)}


def _chart(rows: list[dict[str, Any]]) -> Any:
    from bench import report

    fig, (ax,) = report.new_figure(size_in=(7.0, 4.0))
    ax.bar([r["heap"] for r in rows], [r["p50_ms"] for r in rows], color=["#c44e52", "#4c72b0"])
    ax.set_ylabel("full collection, p50 ms (GIL held)")
    ax.set_title("gc.collect() in the service's process")
    return fig


if __name__ == "__main__":  # the service's process (run): MODELS REPEATS -> one JSON line
    print(json.dumps(asyncio.run(_measure(sys.argv[1], int(sys.argv[2])))))
