"""Torch eager vs ONNX Runtime fp32 vs ONNX Runtime int8: every head, tail and the whole model.

    python -m bench runtime --out bench/results/runtime        # exports a bundle first (~2 min)
    python -m bench runtime --bundle bundles/lite0 --quick     # an existing bundle, 20 crops

One process, one thread per runtime, calls interleaved round by round; each figure is the 20th
percentile of its rounds (``bench.runtime_measure``). Also: int8 top-1 agreement with torch
float32 on the 5 photos and the augmented crops, bundle sizes, installed sizes, and the CPU's
VNNI flags. Writes ``runtime.json``, ``runtime.md`` and ``runtime.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import report
from bench.images import evaluation_images
from bench.runtime_measure import (
    Agreement,
    CaseTimes,
    bundle_sizes,
    cpu_info,
    install_sizes,
    measure_agreement,
    measure_times,
)
from device_client.onnx_runtime import OnnxDeviceRuntime
from device_client.runtime import DeviceRuntime
from shared import cliargs
from shared.bundle import load_bundle
from shared.errors import BundleError, ConfigError, ExportError
from shared.models import list_models

__all__ = ["HEADERS", "add_arguments", "open_bundle", "plot", "run", "table_rows",
           "write_outputs"]

HEADERS = ("case", "torch ms", "ORT fp32 ms", "ORT int8 ms", "fp32 speed-up", "int8 speed-up")
ALIGN = "lrrrrr"
NOISE_NOTE = ("Shared machine: other jobs use the same cores, so absolute times are noisy; the "
              "runtimes were interleaved call by call, so their ratios are the figure to read.")


def table_rows(cases: list[CaseTimes]) -> list[list[str]]:
    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    def x(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f}x"

    rows = []
    for c in cases:
        name = "whole model" if c.kind == "whole" else f"{c.kind} {c.index:>2} {c.split}"
        rows.append([name, ms(c.ms["torch"]), ms(c.ms["ort_fp32"]), ms(c.ms["ort_int8"]),
                     x(c.speedup("ort_fp32")), x(c.speedup("ort_int8"))])
    return rows


def agreement_rows(agreement: Agreement) -> list[list[str]]:
    return [[name, f"{agreement.rate(name):.1%} ({n}/{agreement.images})"]
            for name, n in agreement.agree.items()]


def plot(cases: list[CaseTimes], model: str, path: Path) -> Path:
    """Heads (top) and tails (bottom) over the split points, one line per runtime; the whole
    model as dashed lines."""
    fig, (top, bottom) = report.new_figure(2, sharex=True, size_in=(11.0, 7.5))
    heads = [c for c in cases if c.kind == "head"]
    tails = [c for c in cases if c.kind == "tail"]
    whole = next(c for c in cases if c.kind == "whole")
    x = list(range(len(heads)))
    labels = {"torch": "torch eager fp32", "ort_fp32": "ONNX Runtime fp32",
              "ort_int8": "ONNX Runtime int8"}
    for i, (rt, label) in enumerate(labels.items()):
        head_ms = [v for c in heads if (v := c.ms[rt]) is not None]
        if head_ms and len(head_ms) == len(heads):
            top.plot(x, head_ms, "o-", c=f"C{i}", label=f"{label} head")
        whole_ms = whole.ms[rt]
        if whole_ms is not None:
            top.axhline(whole_ms, ls="--", c=f"C{i}", alpha=0.6, label=f"{label} whole model")
        tail_ms = [v for c in tails if (v := c.ms[rt]) is not None]
        if tail_ms and len(tail_ms) == len(tails):
            bottom.plot(x, tail_ms, "o-", c=f"C{i}", label=f"{label} tail")
    top.set_ylabel("ms (1 thread)")
    top.set_title(f"{model}: head cost by split point, batch 1")
    top.legend(fontsize="small")
    bottom.set_ylabel("ms (1 thread)")
    bottom.set_title("tail cost by split point (float32)")
    bottom.legend(fontsize="small")
    bottom.set_xticks(x, [str(c.split) for c in heads], rotation=90, fontsize="small")
    return report.save_png(fig, path)


def write_outputs(result: dict[str, Any], cases: list[CaseTimes], agreement: Agreement,
                  out: Path) -> list[Path]:
    sizes = result["bundle_sizes"]
    cpu = result["cpu"]
    md = (
        f"# Runtimes: {result['model']}\n\n`{result['command']}`\n\n"
        f"CPU: {cpu['model']}; VNNI flags: {', '.join(cpu['vnni_flags']) or 'none'}. "
        f"1 thread each, batch 1, {result['rounds']} interleaved rounds, 20th percentile. "
        f"{NOISE_NOTE}\n\n"
        + report.markdown_table(HEADERS, table_rows(cases), align=ALIGN)
        + f"\n## Top-1 agreement with torch float32 ({agreement.images} images)\n\n"
        + report.markdown_table(["configuration", "agreement"], agreement_rows(agreement),
                                align="lr")
        + "\n## Sizes\n\n"
        + report.markdown_table(["what", "MB"], [[k, f"{v / 1e6:.1f}"] for k, v in
                                                 {**sizes, **{f"installed {k}": v for k, v in
                                                              result["installed_bytes"].items()
                                                              if v is not None}}.items()],
                                align="lr")
    )
    return [report.write_json(out / "runtime.json", result),
            report.write_text(out / "runtime.md", md),
            plot(cases, result["model"], out / "runtime.png")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0", choices=list_models())
    p.add_argument("--bundle", type=Path, default=None,
                   help="an exported bundle with int8 (default: export one to OUT/bundle, or "
                        "reuse the one there)")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="output directory (default bench/results)")
    p.add_argument("--rounds", type=cliargs.integer(at_least=1), default=None,
                   help="interleaved timing rounds (default 30; 5 with --quick)")
    p.add_argument("--crops", type=cliargs.integer(at_least=0), default=None,
                   help="augmented crops besides the 5 photos (default 200; 20 with --quick)")
    p.add_argument("--points", choices=["all", "middle"], default="all",
                   help="time every split point (default) or only the middle one")
    p.add_argument("--quick", action="store_true", help="5 rounds and 20 crops")


def run(args: argparse.Namespace) -> int:
    rounds = args.rounds or (5 if args.quick else 30)
    crops = args.crops if args.crops is not None else (20 if args.quick else 200)
    command = (f"python -m bench runtime --model {args.model} --rounds {rounds} --crops {crops} "
               f"--points {args.points} --out {args.out}"
               + (f" --bundle {args.bundle}" if args.bundle else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the comparison is at one thread, as the table is
    load_1m = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    console = report.make_console()
    started = time.perf_counter()
    torch_rt = DeviceRuntime(args.model)
    bundle_dir = args.bundle or args.out / "bundle"
    with console.status(f"bundle {bundle_dir}"):
        bundle = open_bundle(bundle_dir, args.model, torch_rt.fingerprint,
                             export=args.bundle is None)
    fp32 = OnnxDeviceRuntime(bundle, precision="fp32", threads=1)
    int8 = (OnnxDeviceRuntime(bundle, precision="int8", threads=1)
            if "int8" in bundle.manifest.precisions else None)
    middle = fp32.middle_point().index
    keys = [p.index for p in fp32.points] if args.points == "all" else [middle]
    with console.status(f"timing {len(keys)} split points, {rounds} rounds") as status:
        cases = measure_times(torch_rt, fp32, int8, keys, rounds=rounds,
                              on_round=lambda r: status.update(f"timing: round {r + 1}/{rounds}"))
    with console.status(f"top-1 agreement on 5 photos + {crops} crops"):
        agreement = measure_agreement(torch_rt, fp32, int8, evaluation_images(crops),
                                      point_key=middle)
    elapsed = time.perf_counter() - started
    result: dict[str, Any] = {
        "model": args.model, "command": command, "rounds": rounds, "quantile": 0.2,
        "threads": 1, "batch": 1, "fingerprint": torch_rt.fingerprint,
        "cpu": cpu_info(), "machine": platform.machine(), "noise": NOISE_NOTE,
        "load_average_1m_at_start": load_1m, "elapsed_s": round(elapsed, 1),
        "versions": {"torch": torch.__version__, **bundle.manifest.extra.get("exported_with", {})},
        "cases": [{"kind": c.kind, "split": c.split, "index": c.index, "ms": c.ms,
                   "speedup_fp32": c.speedup("ort_fp32"), "speedup_int8": c.speedup("ort_int8")}
                  for c in cases],
        "agreement": {"images": agreement.images, "agree": agreement.agree,
                      "rate": {k: agreement.rate(k) for k in agreement.agree},
                      "disagreeing": agreement.disagreeing},
        "bundle_sizes": bundle_sizes(bundle),
        "installed_bytes": install_sizes(("torch", "onnxruntime", "numpy", "onnx")),
    }
    report.print_table(f"{args.model}: ms at 1 thread, batch 1 (20th percentile of {rounds})",
                       HEADERS, table_rows(cases), align=ALIGN, console=console)
    report.print_table(f"top-1 agreement with torch float32, {agreement.images} images",
                       ["configuration", "agreement"], agreement_rows(agreement), align="lr",
                       console=console)
    cpu = result["cpu"]
    console.print(f"CPU {cpu['model']}, VNNI: {', '.join(cpu['vnni_flags']) or 'none'}. "
                  f"{NOISE_NOTE}")
    paths = write_outputs(result, cases, agreement, args.out)
    console.print(f"measured in {elapsed:.0f} s; wrote " + ", ".join(map(str, paths)))
    return 0


def open_bundle(path: Path, model: str, fingerprint: str, *, export: bool) -> Any:
    """The bundle at ``path``; with ``export``, one exported there (with int8) when it holds
    none of this model and fingerprint."""
    try:
        return load_bundle(path, model=model, fingerprint=fingerprint)
    except BundleError:
        if not export:
            raise
    if path.exists() and any(path.iterdir()) and not (path / "manifest.json").exists():
        raise ConfigError(f"{path} exists and is not a bundle")
    # In a child process, as a user would: an export in this process left torch eager ~20%
    # faster for the rest of the run (whole model 28-30 -> 22 ms at 1 thread, measured twice
    # in one process), so every speed-up against it read low.
    done = subprocess.run([sys.executable, "-m", "device_client", "export", "--model", model,
                           "--int8", "--out", str(path)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise ExportError(f"exporting {model} to {path} failed: "
                          f"{lines[-1] if lines else f'exit {done.returncode}'}")
    return load_bundle(path, model=model, fingerprint=fingerprint)
