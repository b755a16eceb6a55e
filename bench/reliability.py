"""Reliability: fuzz the live service, break it on purpose, soak it, and state the promise in
figures.

    python -m bench reliability                      # full: ~6,000 fuzz cases, faults, 10k soak
    python -m bench reliability --quick --out /tmp/rel
    python -m bench reliability --only soak --soak-requests 20000

The promise: the device always returns a result; the service never crashes, never leaks memory
under steady load, and never lets bad input harm other requests.

The checks are the reliability tests (``tests/reliability``); this command runs them in a
subprocess, ``python -m pytest tests/reliability`` from the repository, at full size
(``SPLITSERVE_RELIABILITY_FULL=1``; CI size with ``--quick``) and with
``SPLITSERVE_FIGURES_OUT`` naming a file where each test records its figures as JSON lines.
The table is built from those lines, known sections first, then any other section as it came.
The benchmark imports nothing from the tests: they share a file format, not code.

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
hostile hostile clients (tests/reliability/test_hostile.py): 1,100 idle and trickling
        connections under a 1,024 open-file limit, msgpack and JSON amplification bodies, six
        maximal images in parallel, 10,000 normal /classify calls; readiness latency and RSS.

Writes ``reliability.json``, ``reliability.md`` and ``reliability.png`` (RSS over the soak, and
the fuzz answers by status) to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from bench import report
from shared import cliargs
from shared.errors import ConfigError

__all__ = ["add_arguments", "run"]

MODEL = "efficientnet_lite0"
PARTS = ("fuzz", "faults", "soak", "hostile")
REPO = Path(__file__).resolve().parents[1]
SUITE = "tests/reliability"
#: The test file of each part; with every part selected the whole suite runs.
PART_FILES = {"fuzz": "test_fuzz.py", "faults": "test_faults.py", "soak": "test_soak.py",
              "hostile": "test_hostile.py"}
#: Sections the table knows how to summarise; any other section is listed row by row after them.
KNOWN = ("fuzz", "fuzz_neighbours", "fuzz_problems", "faults", "faults_cli", "soak", "soak_rss")
# The environment the tests read (tests/support/figures.py and sizes.py): a file format and a few
# variables are the whole interface between this command and the suite.
FIGURES_VAR = "SPLITSERVE_FIGURES_OUT"
FULL_VAR = "SPLITSERVE_RELIABILITY_FULL"
SEED_VAR = "SPLITSERVE_RELIABILITY_SEED"
SOAK_REQUESTS_VAR = "SPLITSERVE_SOAK_REQUESTS"
SOAK_CONCURRENCY_VAR = "SPLITSERVE_SOAK_CONCURRENCY"
TEST_TIMEOUT_S = 3600  # per test: a full fuzz run is thousands of cases


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="CI-sized: ~800 fuzz cases, a 2,000-request soak"
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    p.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all, and the "
        "rest of the reliability suite)",
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
    if not (REPO / SUITE).is_dir():
        raise ConfigError(f"the reliability suite is not at {REPO / SUITE}: run from a checkout")
    args.out.mkdir(parents=True, exist_ok=True)
    soak_requests = args.soak_requests or (2_000 if args.quick else 10_000)
    command = (
        f"python -m bench reliability{' --quick' if args.quick else ''} --seed "
        f"{args.seed} --soak-requests {soak_requests} --concurrency {args.concurrency}"
    )
    targets = (
        [SUITE] if set(parts) == set(PARTS) else [f"{SUITE}/{PART_FILES[p]}" for p in parts]
    )
    console = report.make_console()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        figures_path, junit_path = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        env = {
            **os.environ,
            FIGURES_VAR: str(figures_path),
            FULL_VAR: "0" if args.quick else "1",
            SEED_VAR: str(args.seed),
            SOAK_REQUESTS_VAR: str(soak_requests),
            SOAK_CONCURRENCY_VAR: str(args.concurrency),
        }
        pytest_args = [
            sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider",
            f"--junitxml={junit_path}", f"--timeout={TEST_TIMEOUT_S}",
        ]  # fmt: skip
        console.print(f"running python -m pytest {' '.join(targets)} in {REPO}")
        subprocess.run(pytest_args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, check=False)
        lines = figures_path.read_text().splitlines() if figures_path.exists() else []
        tests = _junit_counts(junit_path)
    doc: dict[str, Any] = {
        "model": MODEL,
        "quick": args.quick,
        "seed": args.seed,
        "command": command,
        "suite": " ".join(["python -m pytest", *targets]),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_1m_before": load_before,
        "tests": tests,
        **summarise([json.loads(line) for line in lines]),
    }
    doc["seconds"] = round(time.perf_counter() - started, 1)
    doc["load_1m_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = table_rows(doc)
    report.print_table("splitserve reliability", HEADERS, rows, align=ALIGN, console=console)
    report.write_json(args.out / "reliability.json", doc)
    report.write_text(args.out / "reliability.md", markdown(doc, rows))
    plot(doc, args.out / "reliability.png")
    console.print(f"wrote {args.out}/reliability.{{json,md,png}} in {doc['seconds']:.0f} s")
    return 0 if rows and all(row[1] != "FAIL" for row in rows) else 1


def _junit_counts(path: Path) -> dict[str, int]:
    """Tests passed, failed (failures and errors) and skipped, from pytest's JUnit XML."""
    if not path.exists():
        return {"passed": 0, "failed": 0, "skipped": 0}
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites[0]
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


# --- from recorded figures to the summary -------------------------------------------------------


def summarise(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """The suite's figure lines as ``fuzz``, ``faults`` and ``soak`` summaries, plus ``other``:
    the rows of every section this command has no summary for, by section."""
    by_section: dict[str, list[dict[str, Any]]] = {}
    for line in figures:
        by_section.setdefault(str(line.get("section")), []).append(line)
    out: dict[str, Any] = {}
    if "fuzz" in by_section:
        out["fuzz"] = _fuzz_summary(
            by_section["fuzz"],
            by_section.get("fuzz_neighbours", []),
            by_section.get("fuzz_problems", []),
        )
    faults = {r["row"]: r for r in by_section.get("faults", [])}
    if faults or "faults_cli" in by_section:
        out["faults"] = {**faults, "cli": by_section.get("faults_cli", [])}
    if "soak" in by_section:
        samples = by_section.get("soak_rss", [])
        out["soak"] = {
            **by_section["soak"][-1],
            "samples": [[int(r["row"]), r["seconds"], r["rss_bytes"]] for r in samples],
        }
    out["other"] = {k: v for k, v in by_section.items() if k not in KNOWN}
    return out


def _fuzz_summary(
    runs: list[dict[str, Any]], neighbours: list[dict[str, Any]], problems: list[dict[str, Any]]
) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    for r in runs:
        statuses.update({k.removeprefix("status_"): v for k, v in r.items() if k[:7] == "status_"})
    serving = [r["serving_after"] for r in runs if r["serving_after"] != "ready and right"]
    return {
        "cases": sum(r["cases"] for r in runs),
        "by_source": {r["row"]: r["cases"] for r in runs if r["cases"]},
        "statuses": dict(sorted(statuses.items(), key=lambda kv: int(kv[0]))),
        "server_errors": sum(r["server_errors"] for r in runs),
        "client_deadline_504": sum(r["client_deadline_504"] for r in runs),
        "unsendable": sum(r["unsendable"] for r in runs),
        "problems": sum(r["problems"] for r in runs),
        "alive_after": all(r["alive_after"] for r in runs),
        "serving_after": serving[0] if serving else "ready and right",
        "unexpected_errors_logged": max(r["unexpected_errors_logged"] for r in runs),
        "neighbours": neighbours[-1] if neighbours else None,
        "problem_examples": [{**p, "source": p["row"]} for p in problems[:20]],
    }


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
            f"{base} fuzz --seed {doc['seed']}{' --quick' if doc.get('quick') else ''}",
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
        n = f["neighbours"] or {"ok": False, "good": 0, "good_right": 0, "shared": 0, "bad": 0,
                                 "bad_400": 0}  # fmt: skip
        row(
            "bad input harming others",
            n["ok"],
            f"{n['good_right']}/{n['good']} good frames right while sharing batches with hostile "
            f"ones ({n['shared']} in a shared forward pass); {n['bad_400']}/{n['bad']} hostile "
            "got 400",
            "pytest tests/reliability/test_fuzz.py -k neighbours",
        )
    faults = doc.get("faults", {})
    if "killed" in faults and "overload" in faults:
        k, o = faults["killed"], faults["overload"]
        lost = (k["requests"] - k["results"]) + (o["device_requests"] - o["device_results"])
        row(
            "results lost by the device",
            lost == 0,
            f"{lost} of {k['requests'] + o['device_requests']} (killed service, overload)",
            "pytest tests/reliability/test_faults.py",
        )
    if "killed" in faults:
        k = faults["killed"]
        row(
            "killed mid-run (SIGKILL)",
            k["ok"],
            f"{k['results']}/{k['requests']} results, {k['fell_back']} fell back ({k['reasons']}); "
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
    if "stall" in faults:
        s = faults["stall"]
        row(
            "stalled connection",
            s["ok"],
            f"bounded at {s['wall_ms']:,.0f} ms with deadline {s['deadline_s'] * 1e3:,.0f} ms "
            f"(+ {s['local_ms']:,.0f} ms local compute); ran {s['ran']} ({s['reason']})",
            "pytest tests/reliability/test_faults.py -k stall",
        )
    if "overload" in faults:
        o = faults["overload"]
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
    if faults.get("cli"):
        cli = faults["cli"]
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
    for section, lines in doc.get("other", {}).items():
        for line in lines:
            rows.append(_generic_row(section, line))
    t = doc["tests"]
    row(
        "reliability tests",
        t["failed"] == 0 and t["passed"] > 0,
        f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped",
        doc["suite"],
    )
    return rows


def _generic_row(section: str, line: dict[str, Any]) -> list[str]:
    """A row of a section this command has no summary for: its own ``passed`` (or ``ok``) flag,
    and its figures as ``name value`` pairs."""
    verdict = line.get("passed", line.get("ok"))
    result = "-" if verdict is None else ("pass" if verdict else "FAIL")
    values = {k: v for k, v in line.items() if k not in ("section", "row", "passed", "ok")}
    figure = ", ".join(f"{k.replace('_', ' ')} {_cell(v)}" for k, v in values.items())
    part = section if section in PART_FILES else None
    reproduce = f"python -m bench reliability --only {part}" if part else f"pytest {SUITE}"
    return [f"{section}: {line.get('row', '')}", result, figure or "-", reproduce]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


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
    if doc.get("faults", {}).get("cli"):
        cli_rows = [
            [
                c["behaviour"],
                "on" if c["fallback"] else "off",
                c["returncode"],
                c["ran"] or "-",
                c["reason"] or "-",
                f"{c['seconds']:.1f}",
                c["problems"] or "ok",
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
