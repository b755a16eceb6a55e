"""Quantization fidelity of the real wire path at every split point, vs unsplit float32.

    python -m bench fidelity                        # 5 photos + 200 crops, ~2 min on 2 idle cores
    python -m bench fidelity --quick --out /tmp/fid # 5 photos + 20 crops
    python -m bench fidelity --granularity tensor --zstd-level 9

For every split point and image: head -> the exact frame the device sends (uint8 + zstd +
msgpack) -> decoded as the server decodes it -> tail. Logits are compared with the unsplit
float32 model's: top-1 agreement and |delta logit|. The ``cloud`` candidate (a JPEG of the centre
crop, full model in the cloud) is measured the same way. Writes ``fidelity.json``,
``fidelity.md`` and ``fidelity.png`` to ``--out`` (default ``bench/results``). The measuring is
in ``bench.fidelity_measure``; this module is the command line and the output.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import report
from bench.fidelity_measure import (
    CloudFidelity,
    Fidelity,
    Int8Fidelity,
    PointFidelity,
    measure_fidelity,
)
from bench.images import evaluation_images
from bench.runtime import open_bundle
from device_client.onnx_runtime import OnnxDeviceRuntime
from device_client.runtime import DeviceRuntime, EncodeOptions
from shared import cliargs
from shared.errors import ConfigError
from shared.models import list_models

__all__ = ["HEADERS", "INT8_HEADERS", "add_arguments", "int8_rows", "plot", "run", "table_rows",
           "write_outputs"]

HEADERS = ("split", "float32 bytes", "wire bytes", "ratio", "top-1 agreement", "mean |Δlogit|")
ALIGN = "lrrrrr"
INT8_HEADERS = ("int8 on the device (ONNX Runtime)", "top-1 agreement", "mean |Δlogit|",
                "max |Δlogit|")


def int8_rows(fid: Fidelity) -> list[list[str]]:
    """Rows of the int8 table: the whole model in int8, then each int8 head through the wire
    to its float32 tail; empty when int8 was not measured."""

    def row(r: Int8Fidelity) -> list[str]:
        name = "whole model" if r.split is None else f"head {r.index:>2} {r.split} + wire + tail"
        agreed = fid.images - len(r.disagreeing)
        return [name, f"{r.top1_agreement:.1%} ({agreed}/{fid.images})",
                f"{r.mean_abs_dlogit:.4f}", f"{r.max_abs_dlogit:.3f}"]

    return [row(r) for r in fid.int8]


def table_rows(fid: Fidelity) -> list[list[str]]:
    """Rows of the fidelity table (``HEADERS``): every split point in order, then ``cloud``.

    For ``cloud``, "float32 bytes" is the model's float32 input, which the JPEG stands in for.
    """

    def row(name: str, r: PointFidelity | CloudFidelity, float32_bytes: int) -> list[str]:
        agreed = fid.images - len(r.disagreeing)
        return [
            name,
            f"{float32_bytes:,}",
            f"{r.bytes_per_image:,.0f}",
            f"{r.ratio:.2%}",
            f"{r.top1_agreement:.1%} ({agreed}/{fid.images})",
            f"{r.mean_abs_dlogit:.4f}",
        ]

    c = fid.cloud
    return [
        *(row(f"{p.index:>2} {p.split}", p, p.float32_bytes) for p in fid.points),
        row(f"cloud (JPEG q{c.jpeg_quality})", c, c.input_float32_bytes),
    ]


def plot(fid: Fidelity, path: Path) -> Path:
    """Two panels over the split points in order: bytes (log), then agreement and |Δlogit|."""
    fig, (top, bottom) = report.new_figure(2, sharex=True, size_in=(11.0, 7.5))
    x = list(range(len(fid.points)))
    c = fid.cloud
    top.plot(x, [p.float32_bytes for p in fid.points], "o-", label="float32 activation")
    top.plot(x, [p.bytes_per_image for p in fid.points], "o-", label="wire frame (uint8 + zstd)")
    top.axhline(c.bytes_per_image, ls="--", c="gray", label=f"cloud: JPEG q{c.jpeg_quality}")
    top.set_yscale("log")
    top.set_ylabel("bytes per image")
    top.set_title(
        f"{fid.model}: {fid.images} images, granularity {fid.granularity}, zstd {fid.zstd_level}"
    )
    top.legend(fontsize="small")
    bottom.plot(x, [p.top1_agreement for p in fid.points], "o-", c="C2", label="top-1 agreement")
    bottom.axhline(c.top1_agreement, ls="--", c="C2", alpha=0.5, label="cloud top-1 agreement")
    bottom.set_ylabel("top-1 agreement", color="C2")
    lowest = min(0.9, c.top1_agreement, *(p.top1_agreement for p in fid.points))
    bottom.set_ylim(lowest - 0.02, 1.005)  # margin: the cloud line often sits at the minimum
    twin = bottom.twinx()
    twin.plot(x, [p.mean_abs_dlogit for p in fid.points], "s-", c="C3", label="mean |Δlogit|")
    twin.axhline(c.mean_abs_dlogit, ls=":", c="C3", alpha=0.5, label="cloud mean |Δlogit|")
    twin.set_ylabel("mean |Δlogit|", color="C3")
    twin.set_ylim(bottom=0)
    handles = bottom.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    bottom.legend(handles=handles, fontsize="small", loc="center right")
    bottom.set_xticks(x, [p.split for p in fid.points], rotation=90, fontsize="small")
    bottom.set_xlabel("split point (device runs everything up to and including it)")
    return report.save_png(fig, path)


INT8_NOTE = (
    "The bundle's int8 graphs (`device_client export --int8`, `--precision int8`) run by ONNX "
    "Runtime: the whole model, and each int8 head whose output crosses the wire as above to "
    "the float32 tail. Same images and reference as the table above."
)


def write_outputs(fid: Fidelity, out: Path, command: str, **extra: Any) -> list[Path]:
    """Write ``fidelity.json``, ``fidelity.md`` and ``fidelity.png`` to ``out``."""
    md = (
        f"# Fidelity: {fid.model}\n\n{fid.images} images, granularity {fid.granularity}, "
        f"zstd level {fid.zstd_level}. Wire bytes: mean size of a one-image frame. "
        f"Reference: unsplit float32.\n\n`{command}`\n\n"
        + report.markdown_table(HEADERS, table_rows(fid), align=ALIGN)
    )
    if fid.int8:
        md += (
            f"\n## int8 on the device, against unsplit float32\n\n{INT8_NOTE}\n\n"
            + report.markdown_table(INT8_HEADERS, int8_rows(fid), align="lrrr")
        )
    return [
        report.write_json(out / "fidelity.json", fid.to_json(command, **extra)),
        report.write_text(out / "fidelity.md", md),
        plot(fid, out / "fidelity.png"),
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0", choices=list_models())
    p.add_argument(
        "--crops",
        type=cliargs.integer(at_least=0),
        default=None,
        help="augmented crops besides the 5 photos (default 200; 20 with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="20 crops: a run of well under a minute")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results"),
        help="output directory (default bench/results)",
    )
    p.add_argument(
        "--granularity",
        choices=["auto", "tensor", "channel"],
        default="auto",
        help="quantization scales per tensor, per channel, or auto (default)",
    )
    p.add_argument(
        "--zstd-level",
        type=cliargs.integer(at_least=1, at_most=22),
        default=3,
        help="1..22 (default 3)",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="an exported bundle with int8, for the int8 rows (default: OUT/bundle, exported "
        "there if it holds none, as bench runtime does)",
    )
    p.add_argument("--no-int8", action="store_true", help="skip the int8 rows")
    p.add_argument(
        "--threads",
        type=cliargs.integer(at_least=0),
        default=0,
        help="torch CPU threads (default 0: torch's default, one per core); 1 is steadier on a "
        "machine other jobs share, where spinning OpenMP threads made a run 6x slower",
    )


def run(args: argparse.Namespace) -> int:
    crops = args.crops if args.crops is not None else (20 if args.quick else 200)
    options = EncodeOptions(granularity=args.granularity, zstd_level=args.zstd_level)
    # Every option spelled out, so the command reproduces the run even if defaults change.
    command = (
        f"python -m bench fidelity --model {args.model} --crops {crops} "
        f"--granularity {args.granularity} --zstd-level {args.zstd_level} --out {args.out}"
        + (f" --threads {args.threads}" if args.threads else "")
        + (" --no-int8" if args.no_int8 else f" --bundle {args.bundle}" if args.bundle else "")
    )
    args.out.mkdir(parents=True, exist_ok=True)  # fail now, not after minutes of measuring
    if args.threads:
        torch.set_num_threads(args.threads)
    # Timings depend on what else runs on the machine; record it next to the results.
    load_1m = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    console = report.make_console()
    started = time.perf_counter()
    with console.status(f"loading {args.model} and {crops} crops"):
        runtime = DeviceRuntime(args.model)
        images = evaluation_images(crops)
    int8 = None
    if not args.no_int8:
        with console.status(f"int8 bundle {args.bundle or args.out / 'bundle'}"):
            bundle = open_bundle(args.bundle or args.out / "bundle", args.model,
                                 runtime.fingerprint, export=args.bundle is None)
        if "int8" not in bundle.manifest.precisions:
            raise ConfigError(f"{bundle.root} has no int8 graphs: export it with --int8")
        int8 = OnnxDeviceRuntime(bundle, precision="int8", threads=1)
    columns = (
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        steps = len(runtime.points) * (2 if int8 else 1) + 1
        task = progress.add_task("reference + cloud", total=steps)
        fid = measure_fidelity(
            runtime,
            images,
            options=options,
            on_step=lambda label: progress.update(task, advance=1, description=label),
            int8=int8,
        )
    elapsed = time.perf_counter() - started
    report.print_table(
        f"{fid.model}: split inference through the wire vs unsplit float32, {fid.images} images",
        HEADERS,
        table_rows(fid),
        align=ALIGN,
        console=console,
    )
    if fid.int8:
        report.print_table("int8 on the device vs unsplit float32", INT8_HEADERS, int8_rows(fid),
                           align="lrrr", console=console)
    paths = write_outputs(
        fid,
        args.out,
        command,
        crops=crops,
        seed=0,
        elapsed_s=round(elapsed, 1),
        torch_threads=torch.get_num_threads(),
        load_average_1m_at_start=load_1m,
        torch=torch.__version__,
    )
    console.print(f"measured in {elapsed:.0f} s; wrote " + ", ".join(map(str, paths)))
    return 0
