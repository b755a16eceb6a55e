"""Tests for the fleet simulation (``bench.fleet_sim*``) on tiny, made-up inputs: no model, no
measurement, no service."""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.fleet_sim import relative_error, replicas_needed, run_cli, validate
from bench.fleet_sim_auto import AutoDevice
from bench.fleet_sim_engine import simulate
from bench.fleet_sim_inputs import FleetInputs, ServiceTimes
from shared.candidates import CLOUD, DEVICE
from shared.planner import DeviceCost, DeviceProfile, LinkEstimate, ServerProfile, choose


def _doc(*, batch_ms: dict[str, dict[str, list[float]]] | None = None, period_ms: float = 1000.0,
         batch_max: int = 16, batch_wait_ms: float = 2.0) -> dict[str, Any]:
    return {
        "model": "tiny", "period_ms": period_ms, "duration_s": 20.0, "warmup_s": 2.0,
        "timeout_s": 10.0, "link_mix": ["lan"],
        "links": {"lan": {"rtt_ms": 2.0, "up_bps": 8e6, "down_bps": 8e6}},
        "head_ms": {DEVICE: 100.0, CLOUD: 0.0, "mid": 40.0},
        "request_bytes": {DEVICE: 0.0, CLOUD: 1000.0, "mid": 650.0},
        "response_bytes": 1000.0, "split_points": {"middle": "mid"},
        "service": {"batch_max": batch_max, "batch_wait_ms": batch_wait_ms, "threads": 1,
                    "http_cpu_ms": 0.5,
                    "service_ms": batch_ms or {
                        CLOUD: {"1": [10.0], "4": [28.0], "16": [100.0]},
                        "mid": {"1": [5.0], "4": [14.0], "16": [50.0]}}},
    }


def _inputs(**kw: Any) -> FleetInputs:
    return FleetInputs.from_doc(_doc(**kw))


def test_one_device_never_queues() -> None:
    inputs = _inputs()
    res = simulate(inputs, "middle", devices=1)
    # head 40 + (1 ms RTT/2 + 1000 B up at 8 Mbit/s = 1 ms) + 0.5 ms HTTP + 5 ms compute +
    # (1 ms RTT/2 + 1000 B down = 1 ms): every photo alike, none waits, and a lone request
    # skips the 2 ms batch fill (nothing else is on its way: Batcher._fill)
    assert res.p50_ms == pytest.approx(40 + 1 + 1 + 0.5 + 5 + 1 + 1)
    assert res.p95_ms == pytest.approx(res.p50_ms)
    assert res.mean_batch_size == 1.0
    assert res.rejected_503 == res.fallbacks == res.timeouts == 0
    assert res.ok == 20  # one photo a second for the 20 s window


def test_device_policy_needs_no_service() -> None:
    res = simulate(_inputs(), DEVICE, devices=50)
    assert res.p95_ms == pytest.approx(100.0)
    assert res.throughput_rps == 0 and res.utilisation == 0


def test_utilisation_is_arrival_rate_times_service_time() -> None:
    # batch_max 1: every request is its own 5 ms forward pass + 0.5 ms HTTP; 20 devices at 1
    # photo/s offer 20 requests/s, so the core is busy 20 x 5.5 ms = 11 % of the time.
    inputs = _inputs(batch_max=1, batch_wait_ms=0.0)
    res = simulate(inputs, "middle", devices=20)
    assert res.utilisation == pytest.approx(0.11, rel=0.05)
    assert res.throughput_rps == pytest.approx(20, rel=0.1)


def test_batching_lowers_the_cost_per_sample() -> None:
    # 400 devices at 5 photos/s offer 2,000 rows/s of a 10 ms tail: alone that is 20 cores'
    # work; batched 16 at a time (50 ms for 16 rows) one core nearly keeps up.
    heavy = dict(period_ms=200.0, batch_ms={
        CLOUD: {"1": [10.0], "16": [50.0]}, "mid": {"1": [10.0], "16": [50.0]}})
    batched = simulate(_inputs(**heavy), "middle", devices=400)
    single = simulate(_inputs(batch_max=1, **heavy), "middle", devices=400)
    assert batched.mean_batch_size > 8
    per_sample_batched = batched.utilisation / batched.throughput_rps
    per_sample_single = single.utilisation / single.throughput_rps
    assert per_sample_batched < per_sample_single / 2
    assert batched.throughput_rps > 2 * single.throughput_rps


def test_overload_is_refused_with_503_and_answered_by_fallback() -> None:
    inputs = replace(_inputs(period_ms=100.0), max_queue=8)
    res = simulate(inputs, CLOUD, devices=300, duration_s=5.0)
    assert res.rejected_503 > 0
    assert res.fallbacks >= res.rejected_503
    assert res.ok + res.timeouts == sum(res.choices.values())


def test_deterministic_under_a_seed() -> None:
    noisy = {CLOUD: {"1": [8.0, 10.0, 14.0], "16": [90.0, 100.0, 130.0]},
             "mid": {"1": [4.0, 5.0, 9.0], "16": [45.0, 50.0, 70.0]}}
    base = _inputs(batch_ms=noisy, period_ms=300.0)
    inputs = replace(base, service=replace(base.service, spread=True))
    a = simulate(inputs, "auto", devices=200, replicas=2, seed=3)
    b = simulate(inputs, "auto", devices=200, replicas=2, seed=3)
    c = simulate(inputs, "auto", devices=200, replicas=2, seed=4)
    assert a == b
    assert a != c


def test_unmeasured_batch_sizes_are_interpolated() -> None:
    times = ServiceTimes.from_json({"x": {"1": [10.0], "4": [16.0], "16": [40.0]}})
    assert times.mean_ms("x", 2) == pytest.approx(12.0)
    assert times.mean_ms("x", 10) == pytest.approx(28.0)
    samples, scale = times.sampler("x", 16)[2]
    assert samples[0] * scale == pytest.approx(12.0)


@pytest.mark.parametrize("seed", range(20))
def test_auto_chooses_as_the_product_planner(seed: int) -> None:
    rng = random.Random(seed)
    head = {DEVICE: rng.uniform(50, 300), CLOUD: rng.uniform(0, 2), "a": rng.uniform(10, 100),
            "b": rng.uniform(50, 200)}
    payload = {DEVICE: 0, CLOUD: rng.randrange(5_000, 30_000), "a": rng.randrange(5_000, 50_000),
               "b": rng.randrange(500, 5_000)}
    server = {CLOUD: rng.uniform(5, 30), "a": rng.uniform(3, 20), "b": rng.uniform(1, 10)}
    load = {c: float(rng.randrange(0, 300)) for c in server}
    rtt, up, down = rng.uniform(1, 150), rng.uniform(1e6, 50e6), rng.uniform(1e6, 50e6)
    auto = AutoDevice(seed, [DEVICE, CLOUD, "a", "b"], head,
                      {k: float(v) for k, v in payload.items()}, rtt, up, down)
    auto.metadata(0.0, server, 0.0, load)  # loads already whole numbers: coarse keeps them
    profile = DeviceProfile("m", "f", tuple(
        DeviceCost(c, head[c], 0.0, payload[c]) for c in head))
    link = LinkEstimate(uplink_bps=up, rtt_ms=rtt, downlink_bps=down)
    plan = choose(profile, ServerProfile.of(server, load_ms=load), link)
    assert auto.plan(0.0) == plan.chosen
    for c in head:  # with a current choice and a draw: hysteresis and switch probability
        draw = rng.random()
        auto.current = c
        kept = choose(profile, ServerProfile.of(server, load_ms=load), link, current=c,
                      hysteresis=auto.hysteresis, draw=draw)
        assert auto.plan(0.0, draw=draw) == kept.chosen


def test_relative_error() -> None:
    assert relative_error(115.0, 100.0) == pytest.approx(0.15)
    assert relative_error(85.0, 100.0) == pytest.approx(0.15)
    assert relative_error(1.0, 0.0) == float("inf")


def _measured_doc(scale_p95: float) -> dict[str, Any]:
    """A fleet.json whose runs are the simulation's own results, p95 scaled past one device
    (single-device runs calibrate the delay, so they stay exact)."""
    runs: list[dict[str, Any]] = []
    doc = {"inputs": _doc(), "runs": runs}
    inputs = FleetInputs.from_doc(_doc())
    for policy, devices in ((CLOUD, 1), ("middle", 1), (CLOUD, 40), ("middle", 40)):
        res = simulate(inputs, policy, devices=devices)
        runs.append({"engine": "uvicorn", "replicas": 1, "policy": policy,
                            "devices": devices, "p50_ms": res.p50_ms,
                            "p95_ms": res.p95_ms * (scale_p95 if devices > 1 else 1.0)})
    return doc


def test_validate_reports_the_largest_relative_p95_error() -> None:
    exact = validate(_measured_doc(1.0))
    assert exact["validation_p95_error"] == pytest.approx(0.0, abs=1e-3)
    assert exact["calibration"]["uvicorn_delay_ms"] == pytest.approx(0.0, abs=1e-6)
    assert len(exact["runs"]) == 4 and exact["met"]
    off = validate(_measured_doc(1.25))
    # measured = 1.25 x simulated: |sim - measured| / measured = 0.25 / 1.25
    assert off["validation_p95_error"] == pytest.approx(0.2, abs=1e-3)
    assert not off["met"]


def test_validate_fits_the_delay_from_single_device_runs() -> None:
    doc = _measured_doc(1.0)
    for run in doc["runs"]:
        if run["devices"] == 1:
            run["p50_ms"] += 3.0
            run["p95_ms"] += 3.0
    result = validate(doc)
    assert result["calibration"]["uvicorn_delay_ms"] == pytest.approx(3.0, abs=0.01)
    assert result["calibration"]["uvicorn_jitter_mean_ms"] == 0.0  # p95 moved as much as p50


def test_replicas_search_finds_the_fewest_and_stops_at_a_floor() -> None:
    calls: list[int] = []

    def p95(r: int) -> float:
        calls.append(r)
        return 100 + 5000 / r

    found = replicas_needed(p95, 600.0, {1: p95(1), 2: p95(2)})
    assert found["replicas"] == 10 and found["stop"] == "found"
    assert p95(9) > 600 >= p95(10)
    floor = replicas_needed(lambda r: max(800.0, 5000 / r), 500.0, {1: 5000.0})
    assert floor["replicas"] is None and "below what links and heads allow" in floor["stop"]
    capped = replicas_needed(lambda r: 1e6 / r, 1.0, {}, cap=64)
    assert capped["replicas"] is None and "cap" in capped["stop"]


def test_more_replicas_never_raise_p95() -> None:
    inputs = _inputs(period_ms=100.0)
    p95 = [simulate(inputs, CLOUD, devices=300, replicas=r, duration_s=5.0).p95_ms
           for r in (1, 2, 4, 8)]
    assert p95 == sorted(p95, reverse=True)


def test_run_cli_writes_the_projection(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    (tmp_path / "fleet.json").write_text(json.dumps(_measured_doc(1.0)))
    args = argparse.Namespace(devices=[300], replicas=[1, 2], out=tmp_path, from_=None,
                              target_p95_ms=200.0, seed=0, simulate=True)
    assert run_cli(args) == 0
    sim = json.loads((tmp_path / "simulation.json").read_text())
    assert set(sim["replicas_needed"]) == {CLOUD, DEVICE, "middle", "auto"}
    assert sim["replicas_needed"][DEVICE]["replicas"] == 0
    assert sim["validation_p95_error"] == pytest.approx(0.0, abs=1e-3)
    merged = json.loads((tmp_path / "fleet.json").read_text())
    assert "projection" in merged["simulation"]
    assert "fewest replicas" in capsys.readouterr().out


def test_a_device_gives_up_at_its_deadline_and_finishes_locally() -> None:
    # 500 devices on one replica want ~3x what it serves; with a 300 ms deadline every photo is
    # answered within the deadline + the local finish (100 ms for cloud), backlog or not: the
    # device moves on at its deadline, whatever the service still holds.
    inputs = replace(_inputs(), timeout_ms=300.0)
    res = simulate(inputs, CLOUD, devices=500, duration_s=5.0)
    assert res.timeouts > 0
    assert res.ok + res.timeouts == sum(res.choices.values())
    assert res.p95_ms <= 300.0 + 100.0 + 1e-6


def test_auto_learns_the_service_speed_from_lone_answers_only() -> None:
    auto = AutoDevice(0, [DEVICE, CLOUD], {DEVICE: 100.0, CLOUD: 0.0}, {CLOUD: 1000.0},
                      2.0, 8e6, 8e6)
    auto.metadata(0.0, {CLOUD: 10.0}, 0.0, {CLOUD: 0.0})
    # a row of a batch of 4 costs 50 ms: no lone request's cost, nothing learnt
    auto.answered(0.0, {CLOUD: 0.0}, server_row_ms=50.0, cand=CLOUD, batch_size=4)
    assert auto.speed_now(0.0) == 1.0
    # alone at 5x the metadata's figure: halfway there (AutoSplit's SERVER_ALPHA)
    auto.answered(0.0, {CLOUD: 0.0}, server_row_ms=50.0, cand=CLOUD, batch_size=1)
    assert auto.speed_now(0.0) == pytest.approx(3.0)


def _measured(period_ms: float) -> FleetInputs:
    """A service whose measured times say a request after an idle gap (batch size 0) costs
    decode 4 + compute 20 + overhead 10 ms, a warm lone one 2 + 10 + 5."""
    times = ServiceTimes({"mid": {1: (10.0,)}}, {"mid": 2.0}, spread=True, in_service=True,
                         decode_draws={"mid": {0: (4.0,), 1: (2.0,)}},
                         cold_draws={"mid": (20.0,)},
                         overhead_draws={"mid": {0: (10.0,), 1: (5.0,)}})
    return replace(_inputs(period_ms=period_ms), service=times)


def test_a_lone_request_after_an_idle_gap_runs_cold() -> None:
    slow = simulate(_measured(500.0), "middle", devices=1)  # idle ~0.45 s before each
    fast = simulate(_measured(100.0), "middle", devices=1)  # idle ~0.05 s: warm
    assert slow.p50_ms - fast.p50_ms == pytest.approx((4 + 20 + 10) - (2 + 10 + 5), abs=0.5)


def test_idle_is_the_whole_service_s_as_the_measured_runs_class_it() -> None:
    # one device, a photo every 0.2 s, two replicas: each replica alone sits idle ~0.4 s
    # between its requests, but the service (what the device sees, and what
    # fleet_sim_served._cold classes by) never idles 0.3 s, so nothing runs cold
    two = simulate(_measured(200.0), "middle", devices=1, replicas=2)
    one = simulate(_measured(200.0), "middle", devices=1, replicas=1)
    assert two.p95_ms == pytest.approx(one.p95_ms, abs=0.5)
