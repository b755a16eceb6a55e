"""``bench fleet --simulate``: the fleet as a discrete-event simulation, to 10,000 devices.

    python -m bench fleet --simulate --devices 10000 --replicas 1,8,32 --out DIR
    python -m bench.fleet_sim --devices 10000 --replicas 1,8,32 --out DIR   # the same, alone

Fed with ``fleet.json``'s ``inputs`` (``--from``, default ``DIR/fleet.json``; without one, the
same inputs built from ``bench/results``: ``bench.fleet_sim_defaults``) and with service times
per (candidate, batch size): what the service answered in the file's own runs, pooled per
engine and replica count (``runs[].served``, ``bench.fleet_sim_served``; ``validate`` gives each
run its own answers over its group's pool, ``fleet_sim_served.overlaid``: the shared machine's
speed moved 30-40% between runs, and a saturated run's p95, the wait for its backlog, moves
with it, 2,366 and 3,953 ms on two runs of the same settings; the projection takes
``uvicorn/1``'s pool; summarised again from the records saved
beside the file, ``bench.fleet_records``, when they are there, and written back to it when it
is ``DIR/fleet.json``), else the file's
``inputs.service.service_ms``, else measured here with the service's backend on one core and
one thread (``bench.fleet_sim_measure``, cached in DIR). The model is in
``bench.fleet_sim_engine``; ``auto`` is in ``bench.fleet_sim_auto``.

With the runs' answers nothing is calibrated per run; the event loop's model has a share
(``fleet_sim_engine.LOOP_SHARE``) chosen once on the measured run sets the README lists, and
a device's start-up costs each deployment's measured round trips (``inputs.startup_ms``,
``bench.fleet_startup``; ``PROBE_SHARE`` and ``META_SHARE`` guess them without). Each run is
simulated at its own photo period and in its own rounds.
Without them (in-process times), two per-request
costs that in-process timing cannot see are calibrated, from structure only:
the service's CPU for the HTTP exchange (``bench service``'s one-client run: CPU per answer less
compute and decode, ``fleet_sim_defaults.http_cpu_ms``), which loads the replica's core; and a
delay that costs the service no CPU (event-loop and thread hand-offs, the emulator's own
wake-ups, Ray Serve's proxy), fitted per engine on its single-device runs, where nothing
queues, as a constant plus an exponential (a shared machine's jitter): medians over the
policies that use the service of measured less simulated p50 and p95 give the two.

``validate(doc)`` simulates every measured run and reports the largest relative p95 difference;
``run_cli(args)`` simulates ``--devices`` devices for every policy and replica count, and per
policy the fewest replicas that keep p95 under ``--target-p95-ms`` (searching past the given
counts, doubling then bisecting, up to ``MAX_REPLICAS``; it stops early when doubling the
replicas no longer moves p95 by ``FLOOR_GAIN``: the target is below what links and heads allow).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import fleet_records
from bench.fleet_sim_defaults import default_inputs_doc, http_cpu_ms
from bench.fleet_sim_engine import SimResult, simulate
from bench.fleet_sim_inputs import FleetInputs
from bench.fleet_sim_served import (
    device_lag,
    group_key,
    overlaid,
    pooled,
    service_times,
    summary_json,
)
from bench.fleet_sim_served import run_summary as served
from shared.candidates import DEVICE
from shared.errors import ConfigError

__all__ = ["MAX_REPLICAS", "calibrate", "load_inputs", "main", "replicas_needed", "run_cli",
           "served", "validate"]

MAX_REPLICAS = 4096
FLOOR_GAIN = 0.02  # a doubling that improves p95 less than this: the service is not the limit
SEARCH_DURATION_S = 10.0  # measured window of each simulation of the projection
SIMULATION_FILE = "simulation.json"
LIKE_PHOTOS = 4500  # validate: seeds per run until their photos add up to this many
MIN_REPEATS, MAX_REPEATS = 3, 9  # a saturated run's p95 hangs on its few longest batches
MAX_REFUSED = 0.01  # the projection: a replica count that refuses more photos does not serve


PROJECTION_GROUP = "uvicorn/1"  # the single process: one replica is one core


def load_inputs(doc: Mapping[str, Any], cache_dir: Path | None = None, *,
                group: str | None = None) -> FleetInputs:
    """``doc["inputs"]`` as ``FleetInputs``. Service times: what the service answered in the
    doc's own runs, pooled per engine/replicas (``bench.fleet_sim_served``; ``group``, else
    ``PROJECTION_GROUP``, else the first group), else the doc's ``service_ms``, else measured
    in-process (cached in ``cache_dir``, default ``bench/results``)."""
    raw = doc["inputs"]
    groups = pooled(doc)
    if groups:
        key = group if group in groups else (
            PROJECTION_GROUP if PROJECTION_GROUP in groups else next(iter(groups)))
        return served_inputs(raw, groups[key])
    service = None
    if "service_ms" not in raw.get("service", {}):
        from bench.fleet_sim_measure import cached_service_times  # torch, onnxruntime

        cands = [c for c in raw["head_ms"] if c != DEVICE]
        svc = raw.get("service", {})
        service = cached_service_times(
            raw.get("model", "efficientnet_lite0"), cands,
            cache_dir or Path(__file__).resolve().parent / "results",
            backend=svc.get("backend", "onnxruntime"), threads=int(svc.get("threads", 1)))
    return FleetInputs.from_doc(raw, service=service)


def served_inputs(raw: Mapping[str, Any], group: Mapping[str, Any]) -> FleetInputs:
    """``raw`` (``fleet.json``'s ``inputs``) with one pooled group of the runs' answers
    (``bench.fleet_sim_served``) as its service times and device lag."""
    return replace(FleetInputs.from_doc(raw, service=service_times(group)),
                   device_lag_ms=device_lag(group))


def calibrate(inputs: FleetInputs, runs: Sequence[Mapping[str, Any]], *, seed: int = 0
              ) -> tuple[FleetInputs, dict[str, Any]]:
    """The two per-request costs the in-process measurement cannot see (module docstring):
    the service's HTTP CPU (``bench service``'s, ``fleet_sim_defaults.http_cpu_ms``) and, per
    engine, the delay outside any CPU the simulation counts, fitted on its single-device runs
    (0 without any)."""
    fitted: dict[str, Any] = {}
    if inputs.service.in_service:  # the run's own answers hold both: nothing to fit
        return inputs, fitted
    if inputs.service.overhead_ms == 0.0:
        cpu_ms = http_cpu_ms()
        inputs = replace(inputs, service=inputs.service.with_overhead(cpu_ms))
        fitted["http_cpu_ms"] = round(cpu_ms, 3)
    delays, jitters = dict(inputs.proxy_ms), dict(inputs.jitter_ms)
    for engine in sorted({str(r.get("engine", "uvicorn")) for r in runs}):
        alone = [r for r in runs if r.get("engine", "uvicorn") == engine
                 and r["policy"] != DEVICE and int(r["devices"]) == 1 and _usable(r)]
        if not alone or engine in inputs.proxy_ms:
            continue
        sims = [simulate(inputs, r["policy"], devices=1, replicas=int(r.get("replicas", 1)),
                         seed=seed, engine=engine, duration_s=_duration_s(r)) for r in alone]
        gap50 = statistics.median(float(r["p50_ms"]) - sim.p50_ms
                                  for r, sim in zip(alone, sims, strict=True))
        gap95 = statistics.median(float(r["p95_ms"]) - sim.p95_ms
                                  for r, sim in zip(alone, sims, strict=True))
        # delay = d + Exp(mean s): its median d + s ln 2, its p95 d + s ln 20
        spread = max(0.0, (gap95 - gap50) / math.log(10))
        delays[engine] = max(0.0, gap50 - spread * math.log(2))
        jitters[engine] = spread
        fitted[f"{engine}_delay_ms"] = round(delays[engine], 3)
        fitted[f"{engine}_jitter_mean_ms"] = round(spread, 3)
    if "uvicorn" in delays and "ray-serve" in delays:
        fitted["ray_proxy_overhead_ms"] = round(
            delays["ray-serve"] + jitters.get("ray-serve", 0.0) * math.log(2)
            - delays["uvicorn"] - jitters.get("uvicorn", 0.0) * math.log(2), 3)
    return replace(inputs, proxy_ms=delays, jitter_ms=jitters), fitted


def validate(doc: Mapping[str, Any], *, seed: int = 0, cache_dir: Path | None = None
             ) -> dict[str, Any]:
    """Simulate every measured run of ``doc`` (``fleet.json``) and compare p95s::

        {"validation_p95_error": max |sim - measured| / measured,
         "runs": [{"engine", "replicas", "policy", "devices", "measured_p95_ms",
                   "simulated_p95_ms", "error"}, ...], "calibration": {...}}
    """
    runs = [r for r in doc.get("runs", []) if _usable(r)]
    groups = pooled(doc)
    by_group = {key: served_inputs(doc["inputs"], group) for key, group in groups.items()}
    fallback: FleetInputs | None = None
    fitted: dict[str, Any] = {}
    if any(_group(r) not in by_group for r in runs):  # runs without answers' timings
        fallback, fitted = calibrate(load_inputs(
            {"inputs": {k: v for k, v in doc["inputs"].items() if k != "served"}}, cache_dir),
                                     [r for r in runs if _group(r) not in by_group], seed=seed)
    rows = []
    for r in runs:
        key = _group(r)
        # the run's own answers over its group's pool: this machine's speed moves between
        # minutes, and a saturated run's p95 moves with it (module docstring)
        inputs = (served_inputs(doc["inputs"], overlaid(r, groups[key])) if r.get("served")
                  else by_group[key]) if key in groups else fallback
        assert inputs is not None
        sim = _like(inputs, r, seed)
        row = {"engine": r.get("engine", "uvicorn"), "replicas": int(r.get("replicas", 1)),
               "policy": r["policy"], "devices": int(r["devices"]),
               "measured_p95_ms": float(r["p95_ms"]), "simulated_p95_ms": round(sim.p95_ms, 2),
               "error": round(relative_error(sim.p95_ms, float(r["p95_ms"])), 4),
               "measured_p50_ms": float(r["p50_ms"]), "simulated_p50_ms": round(sim.p50_ms, 2),
               "simulated_mean_batch_size": round(sim.mean_batch_size, 2),
               "simulated_throughput_rps": round(sim.throughput_rps, 2),
               "measured_throughput_rps": r.get("throughput_rps"),
               "simulated_utilisation": round(sim.utilisation, 3),
               "service_times": "served" if inputs.service.in_service else "in-process"}
        if "mean_batch_size" in r:
            row["measured_mean_batch_size"] = r["mean_batch_size"]
        if r.get("by_link"):
            row["p95_ms_by_link"] = {
                name: {"measured": v.get("p95_ms"),
                       "simulated": sim.by_link.get(name, {}).get("p95_ms")}
                for name, v in r["by_link"].items()}
        if len(sim.by_round) > 1:  # a saturated run's rounds differ: round 0 follows a warm-up
            row["by_round"] = {"measured": r.get("by_round"), "simulated": list(sim.by_round)}
        if r["policy"] == "auto":
            row["simulated_choices"] = sim.choices
            row["measured_choices"] = r.get("choices", {})
        rows.append(row)
    errors = [row["error"] for row in rows]
    worst = max(rows, key=lambda row: row["error"]) if rows else None
    return {"validation_p95_error": round(max(errors), 4) if errors else None,
            "worst_run": None if worst is None else {
                k: worst[k] for k in ("engine", "replicas", "policy", "devices")},
            "bar": 0.15, "met": bool(errors) and max(errors) <= 0.15,
            "runs": rows, "calibration": fitted,
            "served": summary_json(groups),
            **({"service_times": fallback.service.to_json()} if fallback is not None else {})}


def _p95_if_served(res: SimResult) -> float:
    """p95, or infinity when over ``MAX_REFUSED`` of the photos were refused (503) or timed
    out: a service that sends its devices home meets any target on their CPUs, which is not
    serving the policy."""
    refused = (res.rejected_503 + res.timeouts) / max(res.ok + res.timeouts, 1)
    return res.p95_ms if refused <= MAX_REFUSED else math.inf


def _like(inputs: FleetInputs, run: Mapping[str, Any], seed: int) -> SimResult:
    """``run`` simulated over its own window and phases: the median p95 of enough draws of the
    service times that their photos add up to ``LIKE_PHOTOS`` (a single device's p95 over its
    16 photos is one or two photos: one draw would compare one noisy sample with another)."""
    if run.get("period_ms"):  # bench fleet shortens a small fleet's photo period
        inputs = replace(inputs, period_ms=float(run["period_ms"]))
    photos = int(run.get("photos") or 0) or int(run["devices"]) * (
        (_duration_s(run) or inputs.duration_s) * 1e3 / inputs.period_ms)
    repeats = max(MIN_REPEATS, min(MAX_REPEATS, math.ceil(LIKE_PHOTOS / max(photos, 1))))
    repeats += 1 - repeats % 2  # odd: the median is one of them
    sims = sorted((simulate(inputs, run["policy"], devices=int(run["devices"]),
                            replicas=int(run.get("replicas", 1)), seed=seed, draw=k,
                            engine=run.get("engine", "uvicorn"), duration_s=_duration_s(run),
                            rounds=int(run.get("rounds") or 1))
                   for k in range(repeats)), key=lambda s: s.p95_ms)
    return sims[len(sims) // 2]


def relative_error(simulated: float, measured: float) -> float:
    """``|simulated - measured| / measured``: ``(115, 100) -> 0.15``."""
    if measured <= 0 or math.isnan(simulated):
        return math.inf
    return abs(simulated - measured) / measured


def replicas_needed(p95_at: Callable[[int], float], target_ms: float, known: Mapping[int, float],
                    *, cap: int = MAX_REPLICAS) -> dict[str, Any]:
    """The fewest replicas whose simulated p95 is under ``target_ms``, assuming p95 does not
    grow with replicas. ``known``: p95 already simulated per replica count; ``p95_at(r)``
    simulates more. Returns ``{"replicas": int | None, "p95_ms", "stop"}``."""
    seen = dict(known)

    def at(r: int) -> float:
        if r not in seen:
            seen[r] = p95_at(r)
        return seen[r]

    passing = sorted(r for r, p in seen.items() if p <= target_ms)
    failing = sorted(r for r, p in seen.items() if p > target_ms)
    if passing:
        hi = passing[0]
        lo = max((r for r in failing if r < hi), default=0)
    else:
        lo = max(failing, default=0)
        hi = 0
        r = max(lo, 1)
        while True:
            nxt = min(r * 2, cap)
            if at(nxt) <= target_ms:
                lo, hi = r, nxt
                break
            if nxt >= cap:
                return {"replicas": None, "p95_ms": round(at(nxt), 1),
                        "stop": f"p95 still over the target at the cap of {cap} replicas"}
            if at(r) - at(nxt) < FLOOR_GAIN * at(r):
                return {"replicas": None, "p95_ms": round(at(nxt), 1),
                        "stop": f"p95 moved under {FLOOR_GAIN:.0%} from {r} to {nxt} "
                                "replicas: the target is below what links and heads allow"}
            lo, r = nxt, nxt
    while hi - lo > 1:  # bisect: lo fails (or is 0), hi passes
        mid = (lo + hi) // 2
        if at(mid) <= target_ms:
            hi = mid
        else:
            lo = mid
    return {"replicas": hi, "p95_ms": round(at(hi), 1), "stop": "found"}


def run_cli(args: argparse.Namespace) -> int:
    """The ``--simulate`` path (module docstring). Reads ``args.devices`` (int or list),
    ``args.replicas`` (list, comma text or None), ``args.out``, ``args.from_``,
    ``args.target_p95_ms`` and ``args.seed``."""
    started = time.perf_counter()
    out = Path(args.out)
    source = getattr(args, "from_", None) or getattr(args, "from", None)
    path = Path(source) if source else out / "fleet.json"
    seed = int(getattr(args, "seed", 0) or 0)
    target_ms = float(getattr(args, "target_p95_ms", None) or 1000.0)
    devices_list = _int_list(getattr(args, "devices", None)) or [10_000]
    replica_list = sorted(set(_int_list(getattr(args, "replicas", None)) or [1, 8, 32]))
    measured: dict[str, Any] | None = None
    if path.exists():
        measured = json.loads(path.read_text())
        records = path.parent / fleet_records.RECORDS_NAME
        if records.exists():  # class the answers as the simulation now does
            measured = fleet_records.resummarized(measured, records)
        doc: Mapping[str, Any] = measured
        origin = str(path)
    elif source:
        raise ConfigError(f"--from {path}: no such file")
    else:
        doc = {"inputs": default_inputs_doc()}
        origin = "bench/results (latency.json device profile, service.json HTTP cost)"
    # real devices, each on its own CPU: none of the emulator's timer lateness; and a steady
    # state: none of a fresh deployment's first passes (the runs' warm-up class)
    inputs = load_inputs(doc, out)
    inputs = replace(inputs, device_lag_ms={},
                     service=replace(inputs.service, warmup_compute_draws={}))
    runs = [r for r in doc.get("runs", []) if _usable(r)]
    validation = None
    if runs:
        validation = validate(doc, seed=seed, cache_dir=out)
        inputs, _ = calibrate(inputs, runs, seed=seed)
    else:
        inputs, _ = calibrate(inputs, [], seed=seed)
    rows: list[dict[str, Any]] = []
    needed: dict[str, dict[str, Any]] = {}
    for devices in devices_list:
        for policy in inputs.policies():
            results: dict[int, SimResult] = {}
            if policy not in (DEVICE, "auto") and \
                    inputs.split_points.get(policy, policy) not in inputs.service.batch_ms:
                print(f"{policy}: no service times (the runs never sent it); skipped")
                continue

            def sim(r: int, policy: str = policy, devices: int = devices,
                    results: dict[int, SimResult] = results) -> float:
                # a steady state: no start-up storm of 10,000 devices probing at once
                results[r] = simulate(inputs, policy, devices=devices, replicas=r, seed=seed,
                                      duration_s=SEARCH_DURATION_S, startup=False)
                return _p95_if_served(results[r])

            counts = [1] if policy == DEVICE else replica_list
            for r in counts:
                sim(r)
                _print_row(results[r])
            if policy == DEVICE:
                need = {"replicas": 0, "p95_ms": round(results[1].p95_ms, 1),
                        "stop": "runs on the devices: no service"}
            else:
                need = replicas_needed(sim, target_ms,
                                       {r: _p95_if_served(results[r]) for r in counts})
                if math.isinf(need["p95_ms"]):
                    need["p95_ms"] = None
            rows += [{**results[r].to_json(), "searched": r not in counts}
                     for r in sorted(results)]
            needed[f"{policy}@{devices}" if len(devices_list) > 1 else policy] = need
    summary = {
        "devices": devices_list, "replicas": replica_list, "target_p95_ms": target_ms,
        "seed": seed, "inputs_from": origin, "period_ms": inputs.period_ms,
        "window_s": SEARCH_DURATION_S, "warmup_s": inputs.warmup_s,
        "service_times_from": "the runs' answers (bench.fleet_sim_served)"
        if inputs.service.in_service else "measured in-process (bench.fleet_sim_measure)",
        "http_cpu_ms": round(inputs.service.overhead_ms, 3),
        "delay_ms": {k: round(v, 3) for k, v in inputs.proxy_ms.items()},
        "jitter_mean_ms": {k: round(v, 3) for k, v in inputs.jitter_ms.items()},
        "rows": rows, "replicas_needed": needed,
        "validation_p95_error": None if validation is None else
        validation["validation_p95_error"],
        "validation": None if validation is None else {
            k: v for k, v in validation.items() if k != "service_times"},
        "service_times": inputs.service.to_json(),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "command": "python -m bench fleet --simulate --devices "
                   + ",".join(map(str, devices_list)) + " --replicas "
                   + ",".join(map(str, replica_list)) + f" --out {out}",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / SIMULATION_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nfewest replicas for p95 <= {target_ms:g} ms at "
          f"{', '.join(map(str, devices_list))} devices:")
    for name, need in needed.items():
        p95 = "-" if need["p95_ms"] is None else f"{need['p95_ms']:.0f}"
        print(f"  {name:<10} {need['replicas'] if need['replicas'] is not None else '-':>6}"
              f"  (p95 {p95} ms; {need['stop']})")
    if validation is not None:
        print(f"validation: largest p95 error {validation['validation_p95_error']:.1%} over "
              f"{len(validation['runs'])} measured runs")
    fleet_json = out / "fleet.json"
    if fleet_json.exists():
        merged = json.loads(fleet_json.read_text())
        if measured is not None and fleet_json.resolve() == path.resolve():
            merged["runs"] = measured["runs"]  # their served as summarised again (records)
        merged.setdefault("simulation", {}).update(
            {"projection": {k: summary[k] for k in ("devices", "replicas", "target_p95_ms",
                                                     "replicas_needed", "rows")}})
        if validation is not None:
            merged["simulation"].update(
                {k: v for k, v in validation.items() if k != "service_times"})
        fleet_json.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {out / SIMULATION_FILE} ({summary['elapsed_s']:.0f} s)")
    return 0


def _print_row(res: SimResult) -> None:
    print(f"{res.policy:<8} {res.devices:>6} dev {res.replicas:>5} rep  p50 {res.p50_ms:8.0f} ms"
          f"  p95 {res.p95_ms:8.0f} ms  {res.throughput_rps:8.0f} rps  util "
          f"{res.utilisation:5.0%}  503s {res.rejected_503}", flush=True)


def _duration_s(run: Mapping[str, Any]) -> float | None:
    """A run's own measured window (``bench fleet`` stretches small fleets' runs)."""
    value = run.get("duration_s")
    return None if value is None else float(value)


def _group(run: Mapping[str, Any]) -> str:
    return group_key(str(run.get("engine", "uvicorn")), int(run.get("replicas", 1)))


def _usable(run: Mapping[str, Any]) -> bool:
    return all(run.get(k) is not None for k in ("policy", "devices", "p50_ms", "p95_ms"))


def _int_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError as exc:
            raise ConfigError(f"expected comma-separated integers, got {value!r}") from exc
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    raise ConfigError(f"expected integers, got {value!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Until ``bench fleet`` dispatches here: the same flags as its ``--simulate`` path."""
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="10000")
    p.add_argument("--replicas", default="1,8,32")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--from", dest="from_", type=Path, default=None)
    p.add_argument("--target-p95-ms", type=float, default=1000.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        return run_cli(args)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
