"""Reliability: fuzz the live service, break it on purpose, soak it, and state the promise in
figures.

    python -m bench reliability                      # full: ~6,000 fuzz cases, faults, 10k soak
    python -m bench reliability --quick --out /tmp/rel
    python -m bench reliability --only soak --soak-requests 20000

The promise: the device always returns a result; the service never crashes, never leaks memory
under steady load, and never lets bad input harm other requests.

fuzz    schemathesis over every endpoint of /openapi.json (positive and negative data, path
        parameters free and pinned to the real model and split points), real frames mutated at
        the byte and msgpack level, broken and bomb images, broken OIP JSON, malformed HTTP;
        then hostile frames sharing forward passes with good ones. Every answer is checked: no
        5xx, JSON {"error": str} bodies, no traceback text; then the service must be ready and
        right.
faults  SIGKILL in the middle of 30 requests and a restart on the same port; a connection that
        never answers; a queue of 2 hammered by 24 clients; the infer CLI against ten broken
        services, with and without --no-fallback.
soak    >= 10,000 requests at concurrency 8, the service's RSS from /proc after a 500-request
        warm-up and at the end.

Writes ``reliability.json``, ``reliability.md`` and ``reliability.png`` (RSS over the soak, and
the fuzz answers by status) to ``--out`` (default ``bench/results``). The parts live in
``bench.reliability_fuzz``, ``bench.reliability_mutate``, ``bench.reliability_faults``,
``bench.reliability_fakes`` and ``bench.reliability_soak``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench import report
from bench.reliability_bodies import image_cases, oip_cases, raw_http_cases
from bench.reliability_faults import (
    FAST_START,
    cli_against_all,
    kill_and_restart,
    local_top1,
    overload,
    stalled_connection,
)
from bench.reliability_fuzz import (
    FuzzReport,
    bad_neighbours,
    fuzz_raw_http,
    fuzz_schema,
    send_all,
    still_serving,
)
from bench.reliability_mutate import extreme_frame, frame_cases
from bench.reliability_soak import soak_frames, soak_local_service
from device_client.local_service import LocalService
from device_client.runtime import DeviceRuntime
from device_client.samples import sample_photos
from shared import cliargs
from shared.errors import ConfigError
from shared.preprocess import center_crop, encode_jpeg, preprocess

__all__ = ["add_arguments", "run"]

MODEL = "efficientnet_lite0"
PARTS = ("fuzz", "faults", "soak")
SOAK_SPLIT = "_blocks.14"  # late and cheap: the soak measures the service, not the model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="CI-sized: ~800 fuzz cases, a 2,000-request soak"
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    p.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random mutation")
    p.add_argument(
        "--soak-requests",
        type=cliargs.integer(at_least=1),
        default=None,
        metavar="N",
        help="requests after the warm-up (default 10,000; 2,000 with --quick)",
    )
    p.add_argument(
        "--concurrency",
        type=cliargs.integer(at_least=1),
        default=8,
        help="soak connections (default 8)",
    )


def run(args: argparse.Namespace) -> int:
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        raise ConfigError(f"--only takes parts of {', '.join(PARTS)}, got {args.only!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    soak_requests = args.soak_requests or (2_000 if args.quick else 10_000)
    command = (
        f"python -m bench reliability{' --quick' if args.quick else ''} --seed "
        f"{args.seed} --soak-requests {soak_requests} --concurrency {args.concurrency}"
    )
    console = report.make_console()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    with console.status("loading the model and the photos"):
        runtime = DeviceRuntime(MODEL)
        photos = sample_photos()
        expected = local_top1(runtime, photos)
    doc: dict[str, Any] = {
        "model": MODEL,
        "quick": args.quick,
        "seed": args.seed,
        "command": command,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_1m_before": load_before,
    }
    if "fuzz" in parts:
        with console.status("fuzzing the live service"):
            doc["fuzz"] = _fuzz(runtime, photos, expected, quick=args.quick, seed=args.seed)
        console.print(f"fuzz: {doc['fuzz']['cases']:,} cases, {doc['fuzz']['problems']} problems")
    if "faults" in parts:
        with console.status("breaking things on purpose"):
            doc["faults"] = _faults(runtime, photos, expected)
        console.print("faults: done")
    soak = None
    if "soak" in parts:
        with console.status(f"soak: {soak_requests:,} requests"):
            soak = _soak(runtime, photos, soak_requests, args.concurrency)
        doc["soak"] = soak
        console.print(f"soak: RSS {soak['rss_growth']:+.2%}, {soak['errors']} errors")
    doc["seconds"] = round(time.perf_counter() - started, 1)
    doc["load_1m_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = table_rows(doc)
    report.print_table("splitserve reliability", HEADERS, rows, align=ALIGN, console=console)
    report.write_json(args.out / "reliability.json", doc)
    report.write_text(args.out / "reliability.md", markdown(doc, rows))
    plot(doc, args.out / "reliability.png")
    console.print(f"wrote {args.out}/reliability.{{json,md,png}} in {doc['seconds']:.0f} s")
    return 0 if all(row[1] == "pass" for row in rows) else 1


# --- the parts ----------------------------------------------------------------------------------


def _frames(
    runtime: DeviceRuntime, photos: dict[str, Image.Image], splits: list[str]
) -> dict[str, bytes]:
    """A real frame per split point: the device's own head on the coffee photo."""
    x = preprocess(photos["coffee"], runtime.spec.preprocessing)
    return {
        s: runtime.encode(runtime.point(s), runtime.run_head(runtime.point(s), x), "fuzz")
        for s in splits
    }


def _encoded_photos(runtime: DeviceRuntime, photos: dict[str, Image.Image]) -> dict[str, bytes]:
    out = {}
    for name, image in photos.items():
        crop = center_crop(image, runtime.spec.preprocessing)
        out[f"{name}.jpg"] = encode_jpeg(crop)
        png = io.BytesIO()
        crop.save(png, format="PNG")
        out[f"{name}.png"] = png.getvalue()
    return out


def _fuzz(
    runtime: DeviceRuntime,
    photos: dict[str, Image.Image],
    expected: dict[str, int],
    *,
    quick: bool,
    seed: int,
) -> dict[str, Any]:
    points = runtime.points
    splits = [points[0].name, runtime.middle_point().name, points[-2].name]
    frames = _frames(runtime, photos, splits)
    n_frames, n_images, n_oip, examples = (300, 60, 60, 8) if quick else (3000, 500, 500, 60)
    fuzz = FuzzReport()
    env = {**FAST_START, "SPLITSERVE_MAX_QUEUE_DELAY_MS": "20"}
    started = time.perf_counter()
    with LocalService(models=[MODEL], env=env) as service:
        with httpx.Client(base_url=service.url, timeout=120) as http:
            send_all(http, fuzz, "frames", frame_cases(frames, model=MODEL, n=n_frames, seed=seed))
            send_all(
                http,
                fuzz,
                "images",
                image_cases(_encoded_photos(runtime, photos), model=MODEL, n=n_images, seed=seed),
            )
            send_all(http, fuzz, "oip", oip_cases(model=MODEL, n=n_oip, seed=seed))
        fuzz_raw_http(service.url, fuzz, raw_http_cases(model=MODEL, split=splits[1]))
        fuzz_schema(
            service.url,
            fuzz,
            examples=examples,
            seed=seed,
            pinned={"model": [MODEL], "split": splits},
        )
        good_path = f"/v2/models/{MODEL}/splits/{splits[-1]}/infer"
        neighbours = bad_neighbours(
            service.url,
            good_path,
            frames[splits[-1]],
            expected["coffee"],
            [extreme_frame(frames[splits[-1]]), extreme_frame(frames[splits[-1]], negative=True)],
            rounds=10 if quick else 50,
        )
        with httpx.Client(base_url=service.url, timeout=60) as http:
            middle = f"/v2/models/{MODEL}/splits/{splits[1]}/infer"
            after = still_serving(http, middle, frames[splits[1]], expected["coffee"])
        alive = service.process is not None and service.process.poll() is None
        log = service.log_path.read_text(errors="replace")
    return {
        **fuzz.to_json(),
        "seconds": round(time.perf_counter() - started, 1),
        "alive_after": alive,
        "serving_after": after or "ready and right",
        "unexpected_errors_logged": log.count("failed unexpectedly"),
        "neighbours": neighbours.__dict__ | {"ok": neighbours.ok},
        "reproduce": "python -m pytest tests/reliability/test_fuzz.py (CI size), or "
        f"python -m bench reliability --only fuzz --seed {seed}"
        f"{' --quick' if quick else ''}",
    }


def _faults(
    runtime: DeviceRuntime, photos: dict[str, Image.Image], expected: dict[str, int]
) -> dict[str, Any]:
    kill = kill_and_restart(runtime, photos, expected)
    stall = stalled_connection(runtime, photos["coffee"], expected["coffee"], deadline_s=1.0)
    load = overload(runtime, photos, expected)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "coffee.jpg"
        photos["coffee"].save(image, quality=95)
        cli = cli_against_all(image, expected["coffee"], workers=2)
    return {
        "killed": kill.__dict__ | {"ok": kill.ok},
        "stall": stall.__dict__ | {"ok": stall.ok},
        "overload": load.__dict__ | {"ok": load.ok},
        "cli": [c.to_json() for c in cli],
        "reproduce": "python -m pytest tests/reliability/test_faults.py",
    }


def _soak(
    runtime: DeviceRuntime, photos: dict[str, Image.Image], requests: int, concurrency: int
) -> dict[str, Any]:
    frames = soak_frames(runtime, photos, SOAK_SPLIT)
    soak, alive = soak_local_service(
        MODEL, SOAK_SPLIT, frames, requests=requests, concurrency=concurrency
    )
    return {**soak.to_json(), "split": SOAK_SPLIT, "alive_after": alive}


# --- output -------------------------------------------------------------------------------------

HEADERS = ("check", "result", "figure", "reproduce")
ALIGN = "llll"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per claim: what was checked, pass/FAIL, the figure, and how to reproduce it."""
    rows: list[list[str]] = []

    def row(check: str, ok: bool, figure: str, reproduce: str) -> None:
        rows.append([check, "pass" if ok else "FAIL", figure, reproduce])

    base = "python -m bench reliability --only"
    if "fuzz" in doc:
        f = doc["fuzz"]
        parts = ", ".join(f"{k} {v:,}" for k, v in f["by_source"].items())
        row(
            "bad inputs tried",
            f["problems"] == 0,
            f"{f['cases']:,} ({parts}); {f['problems']} broke the promise",
            f"{base} fuzz --seed {doc['seed']}",
        )
        row(
            "5xx seen",
            f["server_errors"] == 0,
            f"{f['server_errors']} (plus {f['client_deadline_504']} × 504 answering the "
            "request's own X-Request-Timeout-Ms, as documented)",
            "pytest tests/reliability/test_fuzz.py",
        )
        row(
            "crashes",
            f["alive_after"]
            and f["serving_after"] == "ready and right"
            and f["unexpected_errors_logged"] == 0,
            f"0 dropped connections; service alive, {f['serving_after']}; "
            f"{f['unexpected_errors_logged']} unexpected errors in its log",
            "pytest tests/reliability/test_fuzz.py",
        )
        n = f["neighbours"]
        row(
            "bad input harming others",
            n["ok"],
            f"{n['good_right']}/{n['good']} good frames right while sharing batches with hostile "
            f"ones ({n['shared']} in a shared forward pass); {n['bad_400']}/{n['bad']} hostile "
            "got 400",
            "pytest tests/reliability/test_fuzz.py -k neighbours",
        )
    if "faults" in doc:
        k, s, o = doc["faults"]["killed"], doc["faults"]["stall"], doc["faults"]["overload"]
        cli = doc["faults"]["cli"]
        lost = (k["requests"] - k["results"]) + (o["device_requests"] - o["device_results"])
        row(
            "results lost by the device",
            lost == 0,
            f"{lost} of {k['requests'] + o['device_requests']} (killed service, overload)",
            "pytest tests/reliability/test_faults.py",
        )
        reasons = ", ".join(f"{r} {c}" for r, c in k["reasons"].items())
        row(
            "killed mid-run (SIGKILL)",
            k["ok"],
            f"{k['results']}/{k['requests']} results, {k['fell_back']} fell back ({reasons}); "
            f"top-1 = local on {k['top1_matches']}/{k['requests']}",
            "pytest tests/reliability/test_faults.py -k killed",
        )
        row(
            "restart on the same port",
            k["ok"],
            f"back to split after {k['back_after_requests']} requests / {k['back_after_s']} s "
            f"once ready (the new service took {k['restart_s']} s to start; {k['breaker']})",
            "pytest tests/reliability/test_faults.py -k killed",
        )
        row(
            "stalled connection",
            s["ok"],
            f"bounded at {s['wall_ms']:,.0f} ms with deadline {s['deadline_s'] * 1e3:,.0f} ms "
            f"(+ {s['local_ms']:,.0f} ms local compute); ran {s['ran']} ({s['reason']})",
            "pytest tests/reliability/test_faults.py -k stall",
        )
        row(
            "overload (queue 2, batch 1)",
            o["ok"],
            f"{o['ok_200']} × 200, {o['fast_503']} × 503 + Retry-After (in bursts: p50 "
            f"{o['p50_503_ms']} ms, max {o['max_503_ms']} ms), {o['timeouts']} timeouts, "
            f"other {o['other'] or 0}; "
            f"devices {o['device_results']}/{o['device_requests']} results, "
            f"{o['device_fell_back']} fell back",
            "pytest tests/reliability/test_faults.py -k overload",
        )
        bad = [c for c in cli if c["problems"]]
        row(
            "infer CLI vs broken services",
            not bad,
            f"{len(cli) - len(bad)}/{len(cli)} runs kept the promise ({len(cli) // 2} "
            "behaviours × fallback on/off): no traceback; a result, or one error line",
            "pytest tests/reliability/test_faults.py -k cli",
        )
    if "soak" in doc:
        s = doc["soak"]
        row(
            "RSS growth over the soak",
            s["rss_growth"] < 0.10 and s["errors"] == 0 and s["alive_after"],
            f"{s['rss_growth']:+.2%} ({_mib(s['rss_start_bytes'])} → {_mib(s['rss_end_bytes'])}"
            f", peak {_mib(s['rss_peak_bytes'])}) over {s['requests']:,} requests after "
            f"{s['warmup']} warm-up, {s['errors']} errors, {s['seconds']:.0f} s "
            f"({s['requests_per_s']:.0f}/s, concurrency {s['concurrency']})",
            f"{base} soak --soak-requests {s['requests']}",
        )
    return rows


def markdown(doc: dict[str, Any], rows: list[list[str]]) -> str:
    load = (
        f"{doc['load_1m_before']:.2f} before, {doc['load_1m_after']:.2f} after"
        if doc.get("load_1m_before") is not None
        else "unknown"
    )
    out = [
        "# splitserve reliability\n\n",
        f"`{doc['command']}`: {doc['seconds']:.0f} s on {doc['cpus']} CPUs "
        f"({doc['machine']}), 1-minute load average {load}.\n\n",
        report.markdown_table(HEADERS, rows, align=ALIGN),
    ]
    if "faults" in doc:
        cli_rows = [
            [
                c["behaviour"],
                "on" if c["fallback"] else "off",
                c["returncode"],
                c["ran"] or "-",
                c["reason"] or "-",
                f"{c['seconds']:.1f}",
                "; ".join(c["problems"]) or "ok",
            ]
            for c in doc["faults"]["cli"]
        ]
        out += [
            "\n## The infer CLI against broken services\n\n",
            report.markdown_table(
                ["service", "fallback", "exit", "ran", "reason", "s", "verdict"],
                cli_rows,
                align="llrlllr",
            ),
        ]
    if doc.get("fuzz", {}).get("problem_examples"):
        out.append("\n## Broken promises (first 20)\n\n")
        out += [
            f"- [{p['source']}] {p['status']} {p['case']}: {p['detail']}\n"
            for p in doc["fuzz"]["problem_examples"]
        ]
    return "".join(out)


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    """RSS over the soak, and the fuzz answers by status."""
    panels = [k for k in ("soak", "fuzz") if k in doc]
    if not panels:
        return None
    fig, axes = report.new_figure(len(panels), size_in=(10.0, 3.6 * len(panels)))
    for ax, part in zip(axes, panels, strict=True):
        if part == "soak":
            s = doc["soak"]
            done = [n for n, _, _ in s["samples"]]
            ax.plot(done, [rss / 2**20 for _, _, rss in s["samples"]], c="C0")
            ax.axhline(s["rss_start_bytes"] * 1.1 / 2**20, ls="--", c="C3", label="+10% limit")
            ax.set_xlabel("requests after the warm-up")
            ax.set_ylabel("service RSS (MiB)")
            ax.set_ylim(bottom=0)
            ax.set_title(
                f"soak: {s['requests']:,} requests at concurrency {s['concurrency']}, "
                f"{s['errors']} errors, RSS {s['rss_growth']:+.2%}"
            )
            ax.legend(fontsize="small")
        else:
            f = doc["fuzz"]
            labels = list(f["statuses"])
            ax.bar(labels, [f["statuses"][k] for k in labels], color="C1")
            ax.set_yscale("log")
            ax.set_xlabel("HTTP status (0: connection closed by uvicorn's parser)")
            ax.set_ylabel("answers")
            ax.set_title(f"fuzz: {f['cases']:,} hostile requests, {f['problems']} problems")
    return report.save_png(fig, path)
