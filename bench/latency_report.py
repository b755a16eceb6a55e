"""The summing-up half of ``python -m bench latency``: percentiles, the oracle, ratios, outputs.

    summary = summarize(raw, command="python -m bench latency ...")
    write_outputs(summary, raw, Path("bench/results"))  # latency.json, .md, .png, _raw.json

Pure functions of what ``bench.latency_run.measure`` returned, so the numbers can be recomputed
from ``latency_raw.json`` without measuring again.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report, stats
from shared.candidates import AUTO, CLOUD, DEVICE

__all__ = [
    "BAR",
    "BAR_CHOSEN",
    "HEADERS",
    "bootstrap_ratios",
    "candidate_stats",
    "drop_summary",
    "markdown",
    "percentile",
    "plot",
    "summarize",
    "table_rows",
    "write_outputs",
]

BAR = 1.10  # auto's p50 within 10 % of the oracle's and of the better of device and cloud
# ... and within 5 % of the fixed run of the candidate it chose: what auto adds to a candidate
# (planning, background work, its place in the order) must not cost more than that.
BAR_CHOSEN = 1.05
HEADERS = (
    "link",
    "auto split",
    "auto p50",
    "auto p95",
    "oracle",
    "oracle p50",
    "device p50",
    "cloud p50",
    "auto/oracle",
    "auto/min(dev,cloud)",
    "auto/chosen",
    "predicted (err)",
    "bar",
    "auto wall",
    "wall/oracle",
)
ALIGN = "llrrlrrrrrrrlrr"
_PARTS = ("head", "encode", "network", "server")


def percentile(values: Sequence[float], q: float) -> float:
    """``bench.stats.percentile`` for a run that must have samples: every candidate ran."""
    value = stats.percentile(values, q)
    if value is None:
        raise ValueError("no values")
    return value


def candidate_stats(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """p50/p95 of the device-measured total, medians of its parts, of the bytes and of the wall
    time around ``Device.infer`` (which for ``auto`` also holds planning and probing)."""
    totals = [r["timings_ms"]["total"] for r in results]
    out: dict[str, Any] = {
        "n": len(results),
        "p50_ms": round(percentile(totals, 50), 2),
        "p95_ms": round(percentile(totals, 95), 2),
        "mean_ms": round(statistics.fmean(totals), 2),
    }
    for part in _PARTS:
        out[f"{part}_p50_ms"] = round(statistics.median(r["timings_ms"][part] for r in results), 2)
    out["bytes_sent_p50"] = round(statistics.median(r["bytes_sent"] for r in results))
    out["wall_p50_ms"] = round(statistics.median(r["wall_ms"] for r in results), 2)
    out["fallbacks"] = sum(r["fallback"] is not None for r in results)
    return out


def _auto_stats(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    chosen = Counter(r["split"] for r in results)
    predicted = [r["predicted_ms"] for r in results if r["predicted_ms"] is not None]
    links = [r["link"] for r in results if r.get("link")]
    # The planner's error on its own choice, run by run: measured over predicted, minus 1.
    errors = [
        r["timings_ms"]["total"] / r["predicted_ms"] - 1
        for r in results
        if r["predicted_ms"] and r["fallback"] is None
    ]
    return {
        "split": chosen.most_common(1)[0][0],
        "splits_chosen": dict(chosen.most_common()),
        **candidate_stats(results),
        "predicted_p50_ms": round(statistics.median(predicted), 2) if predicted else None,
        "prediction_error_p50": round(statistics.median(errors), 3) if errors else None,
        "prediction_abs_error_p50": round(statistics.median(abs(e) for e in errors), 3)
        if errors
        else None,
        "link_estimate_p50": {
            "uplink_mbps": round(statistics.median(x["uplink_bps"] for x in links) / 1e6, 3),
            "rtt_ms": round(statistics.median(x["rtt_ms"] for x in links), 2),
        }
        if links
        else None,
    }


def bootstrap_ratios(
    runs: dict[str, list[dict[str, Any]]], *, resamples: int = 2000, seed: int = 0
) -> dict[str, list[float]]:
    """90 % intervals of auto's p50 over the oracle's and over min(device, cloud)'s.

    Resamples images (paired: every candidate ran the same images in the same rounds) and picks
    the oracle again in each resample, so the interval also holds the oracle's luck: with many
    near-equal candidates the lowest p50 is biased low.
    """
    totals = {
        name: {r["image"]: r["timings_ms"]["total"] for r in results}
        for name, results in runs.items()
    }
    images = sorted(set.intersection(*(set(t) for t in totals.values())))
    if not images or AUTO not in totals:
        return {}
    chosen = Counter(r["split"] for r in runs[AUTO]).most_common(1)[0][0]
    rng = random.Random(seed)
    vs_oracle, vs_ends, vs_chosen = [], [], []
    for _ in range(resamples):
        pick = rng.choices(images, k=len(images))
        p50 = {n: statistics.median(t[i] for i in pick) for n, t in totals.items()}
        auto = p50.pop(AUTO)
        vs_oracle.append(auto / min(p50.values()))
        vs_ends.append(auto / min(p50[DEVICE], p50[CLOUD]))
        if chosen in p50:
            vs_chosen.append(auto / p50[chosen])
    out = {
        "auto_vs_oracle": [round(percentile(vs_oracle, q), 3) for q in (5, 95)],
        "auto_vs_best_of_device_cloud": [round(percentile(vs_ends, q), 3) for q in (5, 95)],
    }
    if vs_chosen:
        out["auto_vs_chosen"] = [round(percentile(vs_chosen, q), 3) for q in (5, 95)]
    return out


def _link_summary(entry: dict[str, Any]) -> dict[str, Any]:
    runs = entry["runs"]
    fixed = {name: candidate_stats(results) for name, results in runs.items() if name != AUTO}
    oracle_name = min(fixed, key=lambda name: fixed[name]["p50_ms"])
    oracle = {
        "split": oracle_name,
        **{k: fixed[oracle_name][k] for k in ("p50_ms", "p95_ms", "wall_p50_ms")},
    }
    out: dict[str, Any] = {"link": entry["link"], "oracle": oracle}
    if AUTO in runs:
        auto = _auto_stats(runs[AUTO])
        out["auto"] = auto
        best_end = min(fixed[DEVICE]["p50_ms"], fixed[CLOUD]["p50_ms"])
        ratios = {
            "auto_vs_oracle": round(auto["p50_ms"] / oracle["p50_ms"], 3),
            "auto_vs_best_of_device_cloud": round(auto["p50_ms"] / best_end, 3),
        }
        out["meets_bar"] = all(v <= BAR for v in ratios.values())
        # auto against the fixed run of what it chose (its most chosen candidate), on auto's
        # runs of that candidate: what auto itself adds, whether or not the choice was right.
        top = auto["split"]
        if top in fixed:
            own = [r for r in runs[AUTO] if r["split"] == top]
            own_p50 = percentile([r["timings_ms"]["total"] for r in own], 50)
            auto["chosen_fixed_p50_ms"] = fixed[top]["p50_ms"]
            ratios["auto_vs_chosen"] = round(own_p50 / fixed[top]["p50_ms"], 3)
            out["meets_bar"] = out["meets_bar"] and ratios["auto_vs_chosen"] <= BAR_CHOSEN
        out["ratios"] = ratios
        out["ratios_ci90"] = bootstrap_ratios(runs)
        # The bar is on `timings.total`, which starts after planning. What a user waits for
        # also holds plan(): metadata refetches and link probes. Wall against wall: both also
        # hold the photo's resize, which `total` leaves out.
        ratios["auto_wall_vs_oracle"] = round(auto["wall_p50_ms"] / oracle["wall_p50_ms"], 3)
        out["meets_bar_with_planning"] = ratios["auto_wall_vs_oracle"] <= BAR
    out["device"], out["cloud"] = fixed[DEVICE], fixed[CLOUD]
    out["splits"] = {k: v for k, v in fixed.items() if k not in (DEVICE, CLOUD)}
    plan = entry.get("auto_plan")
    if plan is not None:  # the planner's last table next to what each candidate measured
        out["planner"] = [
            {
                "split": row["split"],
                "predicted_ms": round(row["total_ms"], 2),
                "measured_p50_ms": fixed[row["split"]]["p50_ms"] if row["split"] in fixed else None,
            }
            for row in plan["candidates"]
        ]
        out["planner_chose"] = plan["chosen"]
    out["load_average_1m"] = entry.get("load_average_1m")
    out["elapsed_s"] = entry.get("elapsed_s")
    return out


def drop_summary(drop: dict[str, Any], links: dict[str, Any]) -> dict[str, Any]:
    """How ``auto`` followed a mid-run change of link: its choice before (the most chosen of the
    last 10 requests before the change), the first request after it that chose otherwise, and
    where it settled (the most chosen of the last 5)."""
    trace = drop["trace"]
    pre = [r for r in trace if r["phase"] == drop["from"]]
    post = [r for r in trace if r["phase"] == drop["to"]]
    before = Counter(r["split"] for r in pre[-10:]).most_common(1)[0][0]
    after = Counter(r["split"] for r in post[-5:]).most_common(1)[0][0] if post else None
    moved = next((i for i, r in enumerate(post, 1) if r["split"] != before), None)
    settled = None
    for i in range(len(post), 0, -1):  # the first request from which every choice is `after`
        if post[i - 1]["split"] != after:
            break
        settled = i
    out: dict[str, Any] = {
        "from": drop["from"],
        "to": drop["to"],
        "before": before,
        "after": after,
        "requests_to_move": moved,
        "moved_to": post[moved - 1]["split"] if moved else None,
        "requests_to_settle": settled,
    }
    target = links.get(drop["to"])
    if target is not None and after is not None:
        oracle = target["oracle"]
        fixed = {DEVICE: target["device"], CLOUD: target["cloud"], **target["splits"]}
        out["to_oracle"] = oracle["split"]
        out["after_is_oracle"] = after == oracle["split"]
        if after in fixed:
            out["after_vs_oracle"] = round(fixed[after]["p50_ms"] / oracle["p50_ms"], 3)
    for phase, rows in (("before", pre[-10:]), ("after", post[-5:])):
        if rows:
            out[f"{phase}_p50_ms"] = round(
                statistics.median(r["timings_ms"]["total"] for r in rows), 2
            )
    out["trace"] = [
        {
            "request": r["request"],
            "phase": r["phase"],
            "split": r["split"],
            "total_ms": round(r["timings_ms"]["total"], 2),
            "wall_ms": r["wall_ms"],
            "predicted_ms": r["predicted_ms"],
            "bytes_sent": r["bytes_sent"],
            "link_estimate": None
            if r.get("link") is None
            else {
                "uplink_mbps": round(r["link"]["uplink_bps"] / 1e6, 3),
                "rtt_ms": round(r["link"]["rtt_ms"], 2),
                "source": r["link"]["source"],
            },
        }
        for r in trace
    ]
    return out


def summarize(raw: dict[str, Any], *, command: str, **extra: Any) -> dict[str, Any]:
    """``latency.json``: per link every candidate's p50/p95, the oracle, ``auto`` and the ratios;
    the drop; and how the run was set up."""
    links = {name: _link_summary(entry) for name, entry in raw.get("links", {}).items()}
    out: dict[str, Any] = {"profiles": links}
    if "drop" in raw:
        out["drop"] = drop_summary(raw["drop"], links)
    keep = (
        "device_cpu_limited",
        "cpu_limit_interface",
        "seed",
        "device_cpu",
        "cpu_period_us",
        "cpu_shares",
        "device_cgroup",
        "device_runtime",
        "device_precision",
        "device_threads",
        "device_torch_threads",
        "service_torch_threads",
        "cores",
        "warnings",
    )
    out.update({k: raw[k] for k in keep if k in raw})
    out["meets_bar_everywhere"] = (
        all(p.get("meets_bar", False) for p in links.values()) if links else None
    )
    out["device_profile"] = {
        k: raw["device_profile"][k] for k in ("elapsed_s", "cpu_share", "cgroup", "costs")
    }
    out["command"] = command
    out.update(extra)
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _predicted(auto: dict[str, Any]) -> str:
    """The planner's p50 prediction for its own choice, and its median error on each run."""
    predicted, error = auto.get("predicted_p50_ms"), auto.get("prediction_error_p50")
    if predicted is None or error is None:
        return "-"
    return f"{predicted:,.0f} ({error:+.0%})"


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per link (``HEADERS``)."""
    rows = []
    for name, p in summary["profiles"].items():
        auto = p.get("auto")
        if auto is None:
            continue
        n, top = auto["n"], auto["splits_chosen"][auto["split"]]
        ratios = p["ratios"]
        rows.append(
            [
                name,
                f"{auto['split']} ({top}/{n})",
                _ms(auto["p50_ms"]),
                _ms(auto["p95_ms"]),
                p["oracle"]["split"],
                _ms(p["oracle"]["p50_ms"]),
                _ms(p["device"]["p50_ms"]),
                _ms(p["cloud"]["p50_ms"]),
                f"{ratios['auto_vs_oracle']:.2f}",
                f"{ratios['auto_vs_best_of_device_cloud']:.2f}",
                _ratio(ratios.get("auto_vs_chosen")),
                _predicted(auto),
                "ok" if p["meets_bar"] else "MISS",
                _ms(auto["wall_p50_ms"]),
                f"{ratios['auto_wall_vs_oracle']:.2f}",
            ]
        )
    return rows


def _candidate_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    names = list(summary["profiles"])
    headers = ["candidate", *(f"{n} p50 / p95 (planner)" for n in names)]
    first = next(iter(summary["profiles"].values()))
    candidates = [DEVICE, CLOUD, *first["splits"]]
    rows = []
    for c in candidates:
        row = [c]
        for p in summary["profiles"].values():
            s = {DEVICE: p["device"], CLOUD: p["cloud"], **p["splits"]}.get(c)
            predicted = {r["split"]: r["predicted_ms"] for r in p.get("planner", [])}.get(c)
            mark = "**" if c == p["oracle"]["split"] else ""
            cell = "-" if s is None else f"{mark}{_ms(s['p50_ms'])}{mark} / {_ms(s['p95_ms'])}"
            row.append(cell + (f" ({_ms(predicted)})" if predicted is not None else ""))
        rows.append(row)
    return headers, rows


def markdown(summary: dict[str, Any]) -> str:
    limited = summary.get("device_cpu_limited")
    cpu = (
        f"{summary['device_cpu']:g} of one core ({summary.get('cpu_limit_interface') or 'cgroup'}"
        " quota)"
        if limited
        else f"NOT CPU-limited (asked for {summary.get('device_cpu')})"
    )
    threads = summary.get("device_threads", summary.get("device_torch_threads"))
    host = summary.get("cpu") or {}
    setup = (
        f"Device: {summary.get('device_runtime', 'torch')} "
        f"{summary.get('device_precision', 'fp32')}, {cpu}, {threads} thread; service: "
        f"{summary.get('service_torch_threads')} thread on its own core. CPU: "
        f"{host.get('model', 'unknown')}, VNNI flags: "
        f"{', '.join(host.get('vnni_flags', [])) or 'none'}. Latency: the device's "
        "end-to-end `timings.total` in ms. Oracle: the fixed candidate with the lowest p50 in "
        f"this run. Bar: auto p50 <= {BAR:.2f} x oracle and x min(device, cloud), and auto's "
        f"runs of its most chosen candidate <= {BAR_CHOSEN:.2f} x the fixed run of that "
        "candidate (auto/chosen). Predicted (err): the planner's p50 prediction for its own "
        "choice, and the median of measured/predicted - 1 over auto's runs. Candidates run in a "
        f"random order per photo (seed {summary.get('seed')}). Auto wall: "
        "p50 of the time around `Device.infer`, which also holds the photo's resize and auto's "
        "planning (metadata refetches, link probes); wall/oracle divides it by the oracle's "
        "wall p50."
    )
    parts = [
        "# End-to-end latency through emulated links\n",
        setup + "\n",
        f"`{summary['command']}`\n",
        report.markdown_table(HEADERS, table_rows(summary), align=ALIGN),
    ]
    for name, p in summary["profiles"].items():
        link = p["link"]
        check = link.get("check", {})
        auto = p.get("auto") or {}
        est = auto.get("link_estimate_p50") or {}
        ci = p.get("ratios_ci90") or {}
        parts.append(
            f"- **{name}**: {link['uplink_mbps']:g} Mbit/s up, {link['downlink_mbps']:g} down, "
            f"RTT {link['rtt_ms']:g} ms (checked: {check.get('uplink_mbps', float('nan')):.2f} "
            f"Mbit/s, {check.get('rtt_ms', float('nan')):.1f} ms); auto's estimate "
            f"{est.get('uplink_mbps', float('nan')):.2f} Mbit/s, "
            f"{est.get('rtt_ms', float('nan')):.1f} ms; auto predicted "
            f"{_ms(auto.get('predicted_p50_ms'))} ms, measured {_ms(auto.get('p50_ms'))} ms "
            f"({_ms(auto.get('wall_p50_ms'))} ms around `Device.infer`, with planning and "
            f"probes); chose {auto.get('splits_chosen')}; 90 % bootstrap interval of "
            f"auto/oracle {ci.get('auto_vs_oracle')}, of auto/min(dev,cloud) "
            f"{ci.get('auto_vs_best_of_device_cloud')}, of auto/chosen "
            f"{ci.get('auto_vs_chosen')}"
        )
    drop = summary.get("drop")
    if drop is not None:
        parts.append(
            f"\n**Drop** {drop['from']} -> {drop['to']}: auto used `{drop['before']}` before; "
            "the first request after the switch to choose otherwise was "
            f"#{drop['requests_to_move']}"
            f" (`{drop['moved_to']}`); it settled on `{drop['after']}` from request "
            f"#{drop['requests_to_settle']} (the {drop['to']} oracle: `{drop.get('to_oracle')}`)."
        )
    if not summary["profiles"]:
        return "\n".join(parts)
    headers, rows = _candidate_rows(summary)
    parts.append(
        "\n## Every candidate\n\nMeasured p50 / p95 ms, **oracle** in bold; in brackets the "
        "planner's prediction from auto's last plan on that link.\n"
    )
    parts.append(report.markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1)))
    return "\n".join(parts)


def plot(summary: dict[str, Any], path: Path) -> Path:
    """auto against the oracle first: per link, grouped bars (oracle, the fixed run of auto's
    choice, auto) labelled with their ms and the ratio. Then a panel per link with every
    candidate's p50 (p95 whiskers) and the planner's predictions as dots; then the drop trace.
    Colours are said in titles and the legend sits outside the axes: nothing covers data."""
    links = summary["profiles"]
    drop = summary.get("drop")
    with_auto = {name: p for name, p in links.items() if "auto" in p}
    panels = (1 if with_auto else 0) + len(links) + (drop is not None)
    fig, axes = report.new_figure(panels, size_in=(13.0, 3.4 * panels + 0.8))
    rest = iter(axes)
    if with_auto:
        _plot_auto_vs_oracle(fig, next(rest), with_auto)
    for ax, (name, p) in zip(rest, links.items(), strict=False):
        _plot_link(ax, name, p)
    if drop is not None:
        _plot_drop(axes[-1], drop)
    return report.save_png(fig, path)


def _plot_auto_vs_oracle(fig: Any, ax: Any, links: dict[str, Any]) -> None:
    bars = (("oracle", "C2"), ("fixed run of auto's choice", "C0"), ("auto", "C1"))
    width = 0.27
    for k, (label, color) in enumerate(bars):
        xs, heights, names = [], [], []
        for i, p in enumerate(links.values()):
            auto = p["auto"]
            value, split = {
                0: (p["oracle"]["p50_ms"], p["oracle"]["split"]),
                1: (auto.get("chosen_fixed_p50_ms"), auto["split"]),
                2: (auto["p50_ms"], auto["split"]),
            }[k]
            if value is None:
                continue
            xs.append(i + (k - 1) * width)
            heights.append(value)
            names.append(f"{value:,.0f} ms\n{split}")
        drawn = ax.bar(xs, heights, width, color=color, label=label)
        ax.bar_label(drawn, names, fontsize="x-small", padding=2)
    ax.set_xticks(
        range(len(links)),
        [
            f"{name}\nauto/oracle {p['ratios']['auto_vs_oracle']:.2f}, auto/chosen "
            f"{_ratio(p['ratios'].get('auto_vs_chosen'))}"
            + ("" if p["meets_bar"] else " (MISS)")
            for name, p in links.items()
        ],
        fontsize="small",
    )
    ax.set_yscale("log")
    ax.margins(y=0.35)  # room for the labels above the bars
    ax.set_ylabel("p50 ms (log)")
    ax.set_title("auto against the oracle, per link (p50 of the device-measured total)",
                 fontsize="medium")
    fig.legend(loc="outside upper center", ncols=3, fontsize="small")


def _plot_link(ax: Any, name: str, p: dict[str, Any]) -> None:
    fixed = {DEVICE: p["device"], CLOUD: p["cloud"], **p["splits"]}
    names = [*fixed, AUTO] if "auto" in p else list(fixed)
    stats = [*fixed.values(), p["auto"]] if "auto" in p else list(fixed.values())
    colors = ["C2" if n == p["oracle"]["split"] else "C1" if n == AUTO else "C0" for n in names]
    x = list(range(len(names)))
    p50 = [s["p50_ms"] for s in stats]
    err = [[0.0] * len(stats), [s["p95_ms"] - s["p50_ms"] for s in stats]]
    ax.bar(x, p50, color=colors, yerr=err, capsize=2, ecolor="gray")
    predicted = {r["split"]: r["predicted_ms"] for r in p.get("planner", [])}
    px = [i for i, n in enumerate(names) if n in predicted]
    ax.plot(px, [predicted[names[i]] for i in px], "k.", ls="none")
    link = p["link"]
    versus = ""
    if "auto" in p:
        versus = (
            f"; auto {p['auto']['p50_ms']:,.0f} ms ({p['auto']['split']}) = "
            f"{p['ratios']['auto_vs_oracle']:.2f} x oracle {p['oracle']['p50_ms']:,.0f} ms "
            f"({p['oracle']['split']})"
        )
    ax.set_title(
        f"{name}: {link['uplink_mbps']:g}/{link['downlink_mbps']:g} Mbit/s, "
        f"RTT {link['rtt_ms']:g} ms{versus}. Green: oracle, orange: auto, "
        "dots: the planner's prediction",
        fontsize="small",
    )
    ax.set_ylabel("ms (p50, whisker p95)")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=90, fontsize="x-small")


def _plot_drop(ax: Any, drop: dict[str, Any]) -> None:
    trace = drop["trace"]
    splits = list(dict.fromkeys(r["split"] for r in trace))
    handles = []
    for k, s in enumerate(splits):
        pts = [r for r in trace if r["split"] == s]
        handles += ax.plot(
            [r["request"] for r in pts], [r["total_ms"] for r in pts], "o", c=f"C{k % 10}"
        )
    switch = next(r["request"] for r in trace if r["phase"] == drop["to"])
    ax.axvline(switch - 0.5, c="k", ls="--", lw=1)
    ax.set_title(
        f"auto through a drop: {drop['from']} -> {drop['to']} before request {switch}",
        fontsize="medium",
    )
    ax.set_xlabel("request")
    ax.set_ylabel("total ms")
    ax.set_yscale("log")
    # Outside the axes, so it covers no point. Labels given explicitly: matplotlib drops
    # labels that start with "_" (_blocks.5...).
    ax.legend(handles, splits, fontsize="x-small", title="split", title_fontsize="x-small",
              loc="upper left", bbox_to_anchor=(1.01, 1.0))


def write_outputs(summary: dict[str, Any], raw: dict[str, Any], out: Path) -> list[Path]:
    return [
        report.write_json(out / "latency.json", summary),
        report.write_text(out / "latency.md", markdown(summary)),
        plot(summary, out / "latency.png"),
        report.write_json(out / "latency_raw.json", raw),
    ]
