"""``bench fleet``'s output: the table, ``fleet.json``, ``fleet.md`` and ``fleet.png``.

    paths = write(doc, Path("bench/results"), console)   # prints the table too
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import report
from shared.candidates import AUTO

__all__ = ["HEADERS", "markdown", "plot", "progress", "proxy_overhead", "table_rows", "write"]

HEADERS = ["engine", "replicas", "policy", "devices", "p50 ms", "p95 ms", "answers/s",
           "mean batch", "ok", "503", "fallbacks", "errors", "timeouts", "auto/best p95",
           "auto's choices"]
ALIGN = "lrlrrrrrrrrrrrl"


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _choices(row: Mapping[str, Any], top: int = 3) -> str:
    choices = row.get("choices")
    if not choices:
        return ""
    total = sum(choices.values())
    items = sorted(choices.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{name} {n / total:.0%}" for name, n in items[:top])
    return text + (", ..." if len(items) > top else "")


def table_rows(runs: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[r["engine"], str(r["replicas"]), r["policy"], str(r["devices"]), _f(r["p50_ms"]),
             _f(r["p95_ms"]), _f(r["throughput_rps"]), _f(r["mean_batch_size"], 2), str(r["ok"]),
             str(r["rejected_503"]), str(r["fallbacks"]), str(r["errors"]), str(r["timeouts"]),
             _f(r.get("auto_vs_best_p95"), 2) if r["policy"] == AUTO else "", _choices(r)]
            for r in runs]


def progress(row: Mapping[str, Any]) -> str:
    """One line per finished run, while the benchmark goes on."""
    extra = f" [{_choices(row)}]" if row.get("choices") else ""
    return (f"{row['engine']}x{row['replicas']} {row['policy']:>10} N={row['devices']:<4} "
            f"p50 {_f(row['p50_ms'])} p95 {_f(row['p95_ms'])} ms, {_f(row['throughput_rps'])}/s, "
            f"batch {_f(row['mean_batch_size'], 2)}, ok {row['ok']}, 503 {row['rejected_503']}, "
            f"fallbacks {row['fallbacks']}, errors {row['errors']}, timeouts {row['timeouts']}"
            + extra)


def proxy_overhead(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (replicas, policy) measured on both engines at the smallest fleet: Ray Serve's p50
    minus uvicorn's (at N=1, one device on the first link of the mix)."""
    by = {(r["engine"], r["replicas"], r["policy"], r["devices"]): r for r in runs}
    out = []
    for (engine, replicas, policy, n), ray in sorted(by.items()):
        plain = by.get(("uvicorn", 1, policy, n))
        if engine != "ray-serve" or plain is None or n != min(
                r["devices"] for r in runs if r["engine"] == "ray-serve"):
            continue
        if ray["p50_ms"] is None or plain["p50_ms"] is None:
            continue
        out.append({"replicas": replicas, "policy": policy, "devices": n,
                    "uvicorn_p50_ms": plain["p50_ms"], "ray_serve_p50_ms": ray["p50_ms"],
                    "overhead_ms": round(ray["p50_ms"] - plain["p50_ms"], 2)})
    return out


def _bar_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = []
    for b in doc["bar"]["per_size"]:
        verdict = "met" if b["ratio_met"] else "MISSED"
        line = (f"{b['engine']}x{b['replicas']} N={b['devices']}: auto p95 {b['auto_p95_ms']:.1f} "
                f"ms / best fixed ({b['best_fixed']}) {b['best_fixed_p95_ms']:.1f} ms = "
                f"{b['ratio']:.2f} (<= 1.10: {verdict})")
        if b.get("largest"):
            line += "; no errors or timeouts at the largest N: " + (
                "met" if b["clean_met"] else "MISSED")
        lines.append(line)
    return lines


def _schedule(inputs: Mapping[str, Any]) -> str:
    rounds = inputs.get("rounds", 1)
    text = (f"{inputs['warmup_s']:g} s warm-up, then {inputs['duration_s']:g} s measured per "
            "policy and fleet size")
    if rounds > 1:
        text += (f", in {rounds} rounds: the policies of one fleet size take turns, one window "
                 "each per round in a rotating order, so that the shared machine's slow minutes "
                 "fall on all of them; a policy's devices and auto's state carry over between "
                 "its windows, and its warm-up comes before its first only")
    if "min_photos" in inputs:
        text += (f"; a small fleet's window stretches for {inputs['min_photos']} photos (at most "
                 "2x), then its photo period shrinks (the rows' period_ms)")
    return text + ". "


def markdown(doc: Mapping[str, Any]) -> str:
    inputs, setup = doc["inputs"], doc["setup"]
    links = ", ".join(
        f"{name} ({inputs['links'][name]['rtt_ms']:g} ms RTT, "
        f"{inputs['links'][name]['up_bps'] / 1e6:g}/{inputs['links'][name]['down_bps'] / 1e6:g}"
        " Mbit/s)" for name in dict.fromkeys(inputs["link_mix"]))
    lines = [
        f"# Fleet: {inputs['model']} against one service", "",
        f"Device i is on link `link_mix[i % {len(inputs['link_mix'])}]`, link mix "
        f"{', '.join(inputs['link_mix'])}: {links}. Each device takes a photo every "
        f"{inputs['period_ms']:g} ms (seeded phase), at most one request in flight; latency is "
        "photo taken -> answer, the wait for a busy device included. "
        + _schedule(inputs) +
        "Split points: " + ", ".join(f"{k} `{v}`" for k, v in inputs["split_points"].items())
        + f". Service: onnxruntime, {inputs['service']['threads']} thread, batch up to "
        f"{inputs['service']['batch_max']}, on cpu {setup['cpus']['service_cpus']}; devices on "
        f"cpu {setup['cpus']['client_cpus']}.", "",
        setup["notes"], "",
        report.markdown_table(HEADERS, table_rows(doc["runs"]), align=ALIGN),
        "**Bar** (issue 11): " + "; ".join(_bar_lines(doc)) + ".", "",
    ]
    if doc["proxy_overhead"]:
        lines += ["**Ray Serve proxy overhead** (p50, ray-serve minus uvicorn, smallest fleet): "
                  + "; ".join(f"{o['policy']} x{o['replicas']} replica(s): "
                              f"{o['ray_serve_p50_ms']:.1f} vs {o['uvicorn_p50_ms']:.1f} ms "
                              f"= {o['overhead_ms']:+.1f} ms" for o in doc["proxy_overhead"])
                  + ".", ""]
    if setup.get("ray_runs"):
        lines += [f"Ray Serve ran fewer runs on 2 cores: (replicas, policy, devices) "
                  f"{', '.join(map(str, setup['ray_runs']))}.", ""]
    lines += [f"Command: `{setup['command']}` ({setup['elapsed_s']:.0f} s).", ""]
    return "\n".join(lines)


def plot(doc: Mapping[str, Any], path: Path) -> Path:
    """p95 and throughput against fleet size, one line per (engine, replicas, policy)."""
    fig, (top, bottom) = report.new_figure(2, sharex=True, size_in=(10.0, 7.5))
    series: dict[tuple[str, int, str], list[Mapping[str, Any]]] = {}
    for r in doc["runs"]:
        series.setdefault((r["engine"], r["replicas"], r["policy"]), []).append(r)
    policies = list(dict.fromkeys(r["policy"] for r in doc["runs"]))
    styles = {("uvicorn", 1): "-", ("ray-serve", 1): "--", ("ray-serve", 2): ":"}
    for (engine, replicas, policy), rows in series.items():
        rows = sorted(rows, key=lambda r: r["devices"])
        xs = [r["devices"] for r in rows]
        style = styles.get((engine, replicas), "-.")
        # matplotlib hides labels that start with "_" (every split point's name here).
        name = policy if policy in (AUTO, "cloud", "device") else f"split {policy}"
        label = name if engine == "uvicorn" else f"{name} (ray x{replicas})"
        width = 2.5 if policy == AUTO else 1.2
        color = f"C{policies.index(policy) % 10}"
        top.plot(xs, [r["p95_ms"] for r in rows], style, color=color, marker="o", lw=width,
                 label=label)
        bottom.plot(xs, [r["throughput_rps"] for r in rows], style, color=color, marker="o",
                    lw=width)
    top.set_ylabel("device p95, ms (log)")
    top.set_yscale("log")
    top.set_xscale("log", base=2)
    top.legend(fontsize=7, ncol=3)
    top.set_title(f"{doc['inputs']['model']}: emulated devices against one service core")
    bottom.set_ylabel("service answers/s")
    bottom.set_xlabel("devices")
    return report.save_png(fig, path)


def write(doc: dict[str, Any], out: Path, console: Console) -> list[Path]:
    """Print the table and the bar; write fleet.json, fleet.md and fleet.png."""
    report.print_table("fleet", HEADERS, table_rows(doc["runs"]), align=ALIGN, console=console)
    for line in _bar_lines(doc):
        console.print("bar: " + line)
    for o in doc["proxy_overhead"]:
        console.print(f"Ray Serve proxy ({o['replicas']} replica(s), {o['policy']}, "
                      f"N={o['devices']}): {o['overhead_ms']:+.1f} ms at p50")
    console.print(doc["setup"]["notes"], markup=False)
    return [report.write_json(out / "fleet.json", doc),
            report.write_text(out / "fleet.md", markdown(doc)),
            plot(doc, out / "fleet.png")]
