"""``python -m device_client {infer,demo} ...``: the device's command line.

Every failure is one line on stderr and a non-zero exit, never a traceback (set
``SPLITSERVE_DEBUG=1`` to see one). Exit codes: 0 ok, 1 an error, 2 a usage error, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from device_client.auto import AutoSplit
from device_client.client import API_KEY_ENV, ServiceClient, tls_verify
from device_client.export_cmd import add_parser as add_export_parser
from device_client.export_cmd import run as run_export
from device_client.options import EncodeOptions
from device_client.pipeline import Device, Runtime
from device_client.plan_cmd import device_profile, run_plan, run_profile
from device_client.profile import REPEATS, measure_candidate
from device_client.results import InferenceResult
from device_client.runtimes import open_runtime
from shared import cliargs
from shared.candidates import AUTO, CLOUD, DEVICE
from shared.errors import SplitServeError
from shared.preprocess import load_image

__all__ = ["main"]

DEFAULT_SERVER = os.environ.get("SPLITSERVE_SERVER", "http://127.0.0.1:8000")
DEFAULT_MODEL = "efficientnet_lite0"


def _parser() -> argparse.ArgumentParser:
    p = cliargs.OneLineParser(prog="python -m device_client", tool="device_client",
                              description="splitserve device client: run the head, send the "
                                          "activation, get the answer.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    infer = sub.add_parser("infer", help="classify images, cutting the model at --split")
    infer.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG/PNG/WebP files")
    _common(infer)
    infer.add_argument("--split", default=AUTO,
                       help="device | cloud | a split point name or index | auto (default)")
    infer.add_argument("--json", action="store_true", help="one JSON object per image")
    infer.add_argument("--no-fallback", action="store_true",
                       help="fail instead of finishing locally when the service can't answer")

    profile = sub.add_parser("profile", help="measure what each candidate costs on this device "
                                             "(cached)")
    _common(profile)
    profile.add_argument("--repeats", type=cliargs.integer(at_least=1), default=REPEATS,
                         help=f"rounds of timed runs, one of each candidate per round "
                              f"(default {REPEATS})")
    profile.add_argument("--force", action="store_true", help="measure even if cached")
    profile.add_argument("--json", action="store_true")

    plan = sub.add_parser("plan", help="the planner's table: expected latency per candidate")
    _common(plan)
    plan.add_argument("--bandwidth-mbps", type=cliargs.real(above=0), default=None, metavar="B",
                      help="uplink bandwidth (default: measured against the service)")
    plan.add_argument("--rtt-ms", type=cliargs.real(at_least=0), default=None, metavar="R",
                      help="round-trip time (default: measured against the service)")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--chart", metavar="FILE.png", help="draw stacked bars per candidate")

    demo = sub.add_parser("demo", help="start the service on loopback and classify the "
                                       "sample photos, split and unsplit")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--split", default=None, help="split point (default: a middle one)")
    _runtime_args(demo)
    add_export_parser(sub, default_model=DEFAULT_MODEL)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", type=cliargs.service_url, default=DEFAULT_SERVER,
                   help=f"http(s)://host[:port], default {DEFAULT_SERVER}")
    p.add_argument("--api-key", default=None, help=f"default ${API_KEY_ENV}")
    p.add_argument("--timeout", type=cliargs.real(above=0), default=30.0, metavar="S",
                   help="per-request deadline in seconds")
    p.add_argument("--ca-cert", default=None, metavar="PEM",
                   help="trust this CA certificate for an https --server (e.g. a self-signed one)")
    _model_args(p)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["onnx", "torch"], default="onnx",
                   help="onnx (default): the model's ONNX bundle on ONNX Runtime, no torch; "
                        "torch: eager PyTorch (needs the [torch] extra)")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="the device's head and whole model (default fp32); int8 needs a "
                        "bundle with int8 graphs: --bundle exported with --int8, or a "
                        "service started with SPLITSERVE_BUNDLE_INT8=1")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    _runtime_args(p)
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="a local bundle (from `device_client export`) for --runtime onnx; "
                        "default: the service's, downloaded once and cached")
    p.add_argument("--weights", default=None,
                   help="checkpoint path (default: the model's own weights)")
    p.add_argument("--quantization", choices=["auto", "tensor", "channel"], default="auto",
                   help="scale per tensor, per channel, or auto (default): per channel only "
                        "where channel ranges differ widely")
    p.add_argument("--zstd-level", type=cliargs.integer(at_least=1, at_most=22), default=3,
                   help="1..22 (default 3)")
    p.add_argument("--jpeg-quality", type=cliargs.integer(at_least=1, at_most=100), default=90,
                   metavar="Q",
                   help="JPEG quality of the `cloud` candidate, 1..100 (default 90)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from device_client.demo import run_demo

            return run_demo(model=args.model, split=args.split, runtime=args.runtime,
                            precision=args.precision)
        if args.command == "export":
            return run_export(args)
        options = EncodeOptions(granularity=args.quantization, zstd_level=args.zstd_level)
        if args.command == "profile":
            return run_profile(args, asyncio.run(_open(args)), options)
        if args.command == "plan":
            return asyncio.run(_plan(args, options))
        return asyncio.run(_infer(args, options))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SplitServeError as exc:
        return _fail(exc)
    except Exception as exc:  # the promise: no tracebacks on the command line
        if os.environ.get("SPLITSERVE_DEBUG"):
            raise
        return _fail(exc, prefix="internal error: ")


def _fail(exc: BaseException, prefix: str = "") -> int:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"device_client: error: {prefix}{message}", file=sys.stderr)
    return 1


def _client(args: argparse.Namespace) -> ServiceClient:
    return ServiceClient(args.server, api_key=args.api_key, timeout_s=args.timeout,
                         verify=tls_verify(args.ca_cert))


async def _open(args: argparse.Namespace, client: ServiceClient | None = None) -> Runtime:
    if client is not None or args.runtime == "torch" or args.bundle is not None:
        return await open_runtime(args.runtime, args.model, precision=args.precision,
                                  weights=args.weights, bundle=args.bundle, client=client)
    async with _client(args) as own:
        return await open_runtime(args.runtime, args.model, precision=args.precision,
                                  weights=args.weights, bundle=args.bundle, client=own)


async def _plan(args: argparse.Namespace, options: EncodeOptions) -> int:
    return await run_plan(args, await _open(args), options)


async def _infer(args: argparse.Namespace, options: EncodeOptions) -> int:
    failures = 0
    needs_service = args.split != DEVICE
    async with _client(args) as client:
        runtime = await _open(args, client)
        auto = None
        if args.split == AUTO:
            auto = AutoSplit(client, device_profile(runtime, options,
                                                    jpeg_quality=args.jpeg_quality)[0],
                             remeasure=partial(measure_candidate, runtime, options=options,
                                               jpeg_quality=args.jpeg_quality))
        device = Device(runtime, client if needs_service else None, options=options,
                        jpeg_quality=args.jpeg_quality, timeout_s=args.timeout,
                        fallback=not args.no_fallback, auto=auto)
        device.resolve(args.split)  # an unknown split point fails before any image is read
        for path in args.images:
            try:
                image = load_image(path)
            except SplitServeError as exc:
                print(f"device_client: error: {path}: {exc}", file=sys.stderr)
                failures += 1
                continue
            result = await device.infer(image, split=args.split, name=str(path))
            _print(result, runtime, args.json)
    return 1 if failures else 0


def _print(result: InferenceResult, runtime: Runtime, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json()), flush=True)
        return
    where = f"ran={result.ran}" + (f" (fell back: {result.fallback})" if result.fallback else "")
    print(f"{Path(result.image).name}  split={result.split}  {where}")
    for rank, p in enumerate(result.top5, 1):
        print(f"  {rank}. {p.label:<28} {p.prob:7.2%}  (class {p.index})")
    t = result.timings
    baseline = ""
    if result.split not in (DEVICE, CLOUD):
        f32 = runtime.point(result.split).float32_bytes
        baseline = f" of {f32:,} float32 ({result.bytes_sent / f32:.1%})"
    print(f"  sent {result.bytes_sent:,} B{baseline} | head {t.head:.1f} ms, encode "
          f"{t.encode:.1f}, network {t.network:.1f}, server {t.server:.1f}, "
          f"{'tail ' + format(t.tail, '.1f') + ', ' if t.tail else ''}total {t.total:.1f} ms",
          flush=True)
