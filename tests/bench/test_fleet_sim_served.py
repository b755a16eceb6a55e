"""The simulation fed with what the service answered in the measured runs
(``bench.fleet_sim_served``): per-run histograms, pooling, draws, the engine's use of them, and
``validate`` on a document that has them. No network, except the last test (the real service)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import fleet_sim_served as served
from bench.fleet_device import FleetInputs as DeviceInputs
from bench.fleet_device import Record
from bench.fleet_inputs import encode_payloads
from bench.fleet_rounds import answer_spans
from bench.fleet_run import RunSpec, run_fleet
from bench.fleet_sim import load_inputs, validate
from bench.fleet_sim_engine import simulate
from bench.netem import PROFILES
from device_client.local_service import LocalService
from shared.candidates import CLOUD, DEVICE
from shared.planner import DeviceCost, DeviceProfile

SPLIT = "_blocks.9"
HEAD_MS = {DEVICE: 100.0, CLOUD: 5.0, SPLIT: 40.0}
HEADS = SimpleNamespace(head_ms=HEAD_MS.__getitem__)
LAN = PROFILES["lan"]


def _spec(devices: int = 2, window: tuple[float, float] = (0.0, 100.0)) -> SimpleNamespace:
    return SimpleNamespace(devices=devices, window=window)


def _answer(device: int, photo_s: float, *, compute_ms: float = 10.0, batch: int = 1,
            decode_ms: float = 2.0, queue_ms: float = 1.0, overhead_ms: float = 4.0,
            start_late_ms: float = 0.0, candidate: str = SPLIT, body: int = 1000) -> Record:
    """A served photo on LAN whose round trip is the service's times + the link + overhead."""
    start_s = photo_s + start_late_ms / 1e3
    sent_s = start_s + HEAD_MS[candidate] / 1e3
    rtt_ms = (decode_ms + queue_ms + compute_ms + served.link_ms(LAN, body) + overhead_ms)
    return Record(device, "lan", photo_s, start_s, sent_s + rtt_ms / 1e3, candidate, "ok",
                  served=True, batch_size=batch, decode_ms=decode_ms, queue_ms=queue_ms,
                  compute_ms=compute_ms, round_trip_ms=rtt_ms, request_bytes=body,
                  sent_s=sent_s)


def _mean(hist: dict[str, Any]) -> float:
    return float(hist["sum_ms"]) / int(hist["count"])


def test_a_batch_counts_once_and_overhead_is_what_the_link_and_service_leave() -> None:
    # two devices in one batch of 2 (same compute), then each alone; busy enough to be warm
    records = [_answer(0, 0.0, compute_ms=30.0, batch=2), _answer(1, 0.0, compute_ms=30.0, batch=2),
               _answer(0, 0.2, compute_ms=12.0, overhead_ms=6.0),
               _answer(1, 0.25, compute_ms=11.0, overhead_ms=6.0)]
    summary = served.run_summary(records, _spec(), HEADS)
    compute = summary["compute_ms"][SPLIT]
    assert compute["0"]["count"] == 1  # the first request reached an idle service: cold
    assert compute["2"]["count"] == 1 and _mean(compute["2"]) == pytest.approx(30.0)
    assert "1" not in compute  # the two lone requests had the service to themselves
    lone = summary["compute_alone_ms"][SPLIT]
    assert lone["count"] == 2 and _mean(lone) == pytest.approx(11.5)
    assert _mean(summary["overhead_alone_ms"][SPLIT]) == pytest.approx(6.0, abs=1e-6)
    assert _mean(summary["overhead_ms"][SPLIT]["2"]) == pytest.approx(4.0, abs=1e-6)
    assert summary["device_lag_ms"]["2"]["count"] == 4


def test_a_lone_request_that_had_the_service_to_itself_is_counted_alone() -> None:
    # 0.10 s and 0.25 s: warm, nothing else in flight; 0.40 s and 0.40 s: two at once
    records = [_answer(0, 0.0), _answer(0, 0.10, overhead_ms=3.0, compute_ms=8.0),
               _answer(0, 0.25, overhead_ms=3.0, compute_ms=8.0, decode_ms=1.0),
               _answer(0, 0.40, overhead_ms=9.0), _answer(1, 0.40, overhead_ms=9.0)]
    summary = served.run_summary(records, _spec(), HEADS)
    alone = summary["overhead_alone_ms"][SPLIT]
    assert alone["count"] == 2 and _mean(alone) == pytest.approx(3.0, abs=1e-6)
    assert _mean(summary["compute_alone_ms"][SPLIT]) == pytest.approx(8.0)
    assert _mean(summary["decode_alone_ms"][SPLIT]) == pytest.approx(1.5)
    # batch size 1 keeps the two that overlapped, each its own batch
    assert summary["overhead_ms"][SPLIT]["1"]["count"] == 2
    assert summary["compute_ms"][SPLIT]["1"]["count"] == 1  # same compute: read as one batch
    group = served.pooled({"runs": [{"served": summary}, {"served": summary}]})["uvicorn/1"]
    times = served.service_times(group)
    assert times.alone_overhead_draws[SPLIT] == pytest.approx((3.0,) * 4, rel=0.04)
    assert times.alone_compute_draws[SPLIT] == pytest.approx((8.0,) * 4, rel=0.04)


def test_a_single_device_s_lone_requests_stand_for_batch_size_one() -> None:
    records = [_answer(0, 0.2 * k, compute_ms=8.0) for k in range(6)]  # one device, warm
    summary = served.run_summary(records, _spec(devices=1), HEADS)
    assert set(summary["compute_ms"][SPLIT]) == {"0"} and \
        summary["compute_alone_ms"][SPLIT]["count"] == 5
    times = served.service_times(served.pooled({"runs": [{"served": summary}]})["uvicorn/1"])
    assert times.batch_ms[SPLIT][1] == pytest.approx((8.0,) * 5, rel=0.04)


def test_a_request_at_an_empty_service_draws_a_lone_overhead() -> None:
    inputs = replace(load_inputs(_served_doc(70.0)), period_ms=150.0)  # warm, one at a time
    base = simulate(inputs, "middle", devices=1, seed=1)
    times = replace(inputs.service, alone_overhead_draws={SPLIT: (54.0,)})
    slow = simulate(replace(inputs, service=times), "middle", devices=1, seed=1)
    # one device: every request finds the service empty, so every one takes the alone class
    assert slow.p50_ms == pytest.approx(base.p50_ms + 50.0, abs=2.0)
    times = replace(inputs.service, alone_compute_draws={SPLIT: (40.0,)},
                    alone_decode_draws={SPLIT: (22.0,)})
    slower = simulate(replace(inputs, service=times), "middle", devices=1, seed=1)
    assert slower.p50_ms == pytest.approx(base.p50_ms + 30.0 + 20.0, abs=2.0)  # 10 -> 40, 2 -> 22


def test_answers_outside_the_window_are_left_out() -> None:
    records = [_answer(0, 0.0), _answer(0, 5.0)]
    summary = served.run_summary(records, _spec(window=(1.0, 10.0)), HEADS)
    assert sum(h["count"] for h in summary["decode_ms"][SPLIT].values()) == 1


def test_a_lone_request_after_an_idle_second_is_cold() -> None:
    records = [_answer(0, t, compute_ms=20.0) for t in (0.0, 1.5, 3.0)]
    summary = served.run_summary(records, _spec(devices=1), HEADS)
    assert set(summary["compute_ms"][SPLIT]) == {"0"}  # every one found the service idle
    times = served.service_times(served.pooled({"runs": [{"served": summary}]})["uvicorn/1"])
    assert times.cold_draws[SPLIT] == pytest.approx((20.0,), rel=0.04)
    # no warm batch seen: the cold ones stand for batch size 1
    assert times.batch_ms[SPLIT] == {1: times.cold_draws[SPLIT]}


def test_a_lone_request_after_a_short_idle_gap_is_cold_too() -> None:
    # one device a photo every 0.5 s: the service sleeps ~0.45 s before every request
    records = [_answer(0, 0.5 * k, compute_ms=20.0 + k) for k in range(6)]
    summary = served.run_summary(records, _spec(devices=1), HEADS)
    assert set(summary["decode_ms"][SPLIT]) == {"0"}
    assert summary["compute_ms"][SPLIT]["0"]["count"] == 6
    assert summary["idle_s"] == served.IDLE_S


def test_an_older_single_device_run_counts_its_lone_requests_cold() -> None:
    # summarised while the cold class needed 1 s idle (no "idle_s"): its batch size 1 was cold
    old = served.run_summary([_answer(0, 0.0), _answer(0, 0.2)], _spec(1), HEADS)
    del old["idle_s"]
    for part in ("compute", "decode", "overhead"):  # no alone class then: batch size 1
        old[f"{part}_ms"][SPLIT]["1"] = old.pop(f"{part}_alone_ms")[SPLIT]
    single = {"engine": "uvicorn", "replicas": 1, "devices": 1, "period_ms": 500.0,
              "p95_ms": 80.0, "served": old}
    fleet = {**single, "devices": 8, "period_ms": 1500.0}
    group = served.pooled({"runs": [single, fleet]})["uvicorn/1"]["compute_ms"][SPLIT]
    assert group["0"]["count"] == 1 + 2 and group["1"]["count"] == 1  # 8 devices: unchanged
    assert old["compute_ms"][SPLIT]["1"]["count"] == 1  # the run's own summary is untouched
    # a single device whose photos left the service less than IDLE_S idle stays as it is
    busy = {**single, "period_ms": 200.0}
    assert served.pooled({"runs": [busy]})["uvicorn/1"]["compute_ms"][SPLIT]["1"]["count"] == 1


def test_device_lag_is_the_late_start_plus_the_head_overrun() -> None:
    late = _answer(0, 0.0, start_late_ms=3.0)
    overrun = Record(1, "lan", 0.0, 0.0, 0.105, DEVICE, "ok")  # ran on the device, 5 ms over
    summary = served.run_summary([late, overrun], _spec(), HEADS)
    lag = summary["device_lag_ms"]["2"]
    assert lag["count"] == 2 and _mean(lag) == pytest.approx(4.0)


def test_draws_keep_the_mean_and_the_spread() -> None:
    hist = served._new()
    for ms in [10.0] * 90 + [100.0] * 10:
        served._add(hist, ms)
    xs = served.draws(hist)
    assert len(xs) == served.DRAWS
    assert sum(xs) / len(xs) == pytest.approx(19.0, abs=0.01)  # rounded to the us
    assert min(xs) == pytest.approx(10.0, rel=0.04) and max(xs) == pytest.approx(100.0, rel=0.04)


def test_runs_pool_per_engine_and_replicas() -> None:
    one = served.run_summary([_answer(0, 0.0), _answer(0, 0.2)], _spec(1), HEADS)
    runs = [{"engine": "uvicorn", "replicas": 1, "served": one},
            {"engine": "uvicorn", "replicas": 1, "served": one},
            {"engine": "ray-serve", "replicas": 2, "served": one}]
    groups = served.pooled({"runs": runs})
    assert set(groups) == {"uvicorn/1", "ray-serve/2"}
    assert groups["uvicorn/1"]["compute_alone_ms"][SPLIT]["count"] == 2
    assert groups["ray-serve/2"]["compute_alone_ms"][SPLIT]["count"] == 1
    # a document that carries them pooled already is taken as it is
    assert served.pooled({"inputs": {"served": {"x/1": one}}, "runs": runs}) == {"x/1": one}


def _inputs_doc() -> dict[str, Any]:
    return {
        "model": "tiny", "period_ms": 1500.0, "duration_s": 10.0, "warmup_s": 1.0,
        "timeout_s": 10.0, "link_mix": ["lan"],
        "links": {"lan": {"rtt_ms": LAN.rtt_ms, "up_bps": LAN.uplink_bps,
                          "down_bps": LAN.downlink_bps}},
        "head_ms": HEAD_MS, "request_bytes": {DEVICE: 0.0, CLOUD: 1000.0, SPLIT: 1000.0},
        "response_bytes": 700.0, "split_points": {"middle": SPLIT},
        "service": {"batch_max": 16, "batch_wait_ms": 2.0, "threads": 1},  # no service_ms
    }


def _served_doc(p95_ms: float) -> dict[str, Any]:
    """One device on ``middle``: cold requests (1.5 s apart) of decode 2 + compute 20 +
    overhead 4 ms, and 8 devices, warm, at batch 1."""
    cold = served.run_summary([_answer(0, t * 1.5, compute_ms=20.0) for t in range(8)],
                              _spec(1, (1.0, 11.0)), HEADS)
    warm = served.run_summary([_answer(i % 8, t / 8, compute_ms=10.0) for i, t in
                               enumerate(range(88))], _spec(8, (1.0, 11.0)), HEADS)
    runs = [{"engine": "uvicorn", "replicas": 1, "policy": SPLIT, "devices": 1,
             "p50_ms": p95_ms, "p95_ms": p95_ms, "duration_s": 10.0, "served": cold},
            {"engine": "uvicorn", "replicas": 1, "policy": SPLIT, "devices": 8,
             "p50_ms": 60.0, "p95_ms": 60.0, "duration_s": 10.0, "served": warm}]
    return {"inputs": _inputs_doc(), "runs": runs}


def test_served_inputs_drive_validate_without_measuring_anything(tmp_path: Path) -> None:
    # head 40 + link (1 ms RTT + 1350 B up + 700 B down on LAN) + decode 2 + batch wait 2 +
    # compute 20 (cold) + overhead 4: what one device on an idle service waits
    one_ms = 40 + served.link_ms(LAN, 1000) + 2 + 2 + 20 + 4
    result = validate(_served_doc(one_ms), cache_dir=tmp_path)
    alone = result["runs"][0]
    assert alone["service_times"] == "served"
    assert alone["simulated_p95_ms"] == pytest.approx(one_ms, rel=0.04)
    assert result["calibration"] == {}  # nothing fitted
    digest = result["served"]["uvicorn/1"][SPLIT]
    assert digest["compute_ms_alone"][0] == pytest.approx(10.0, rel=0.04)  # the 8 devices'
    assert digest["compute_ms_by_batch"]["0"][0] == pytest.approx(20.0, rel=0.04)
    assert not list(tmp_path.iterdir())  # no in-process measurement, no cache written
    assert "by_round" not in alone  # one window: nothing to compare round by round


def test_validate_simulates_each_run_with_its_own_answers(tmp_path: Path) -> None:
    # two runs of one deployment, the second in a minute when the machine ran 3x slower: each
    # is checked with its own forward passes, not with their average
    def run(devices: int, compute_ms: float) -> dict[str, Any]:
        answers = [_answer(i % 8, t / 8, compute_ms=compute_ms) for i, t in enumerate(range(88))]
        return {"engine": "uvicorn", "replicas": 1, "policy": SPLIT, "devices": devices,
                "p50_ms": 60.0, "p95_ms": 60.0, "duration_s": 10.0,
                "served": served.run_summary(answers, _spec(devices, (1.0, 11.0)), HEADS)}

    doc = {"inputs": _inputs_doc(), "runs": [run(8, 10.0), run(9, 30.0)]}
    fast, slow = validate(doc, cache_dir=tmp_path)["runs"]
    assert slow["simulated_p50_ms"] - fast["simulated_p50_ms"] == pytest.approx(20.0, rel=0.15)
    # what a run never saw comes from its group's pool: both runs' passes, 10 and 30 ms
    unseen = {**run(10, 10.0), "served": {"idle_s": served.IDLE_S}}
    pooled = validate({**doc, "runs": [*doc["runs"], unseen]}, cache_dir=tmp_path)["runs"][2]
    assert fast["simulated_p50_ms"] < pooled["simulated_p50_ms"] < slow["simulated_p50_ms"]


def test_validate_compares_a_run_s_rounds_one_by_one(tmp_path: Path) -> None:
    doc = _served_doc(70.0)
    rounds = [{"photos": 27, "p50_ms": 60.0, "p95_ms": 60.0}] * 2
    doc["runs"][1].update(rounds=2, by_round=rounds)
    row = validate(doc, cache_dir=tmp_path)["runs"][1]
    assert row["by_round"]["measured"] == rounds
    assert [len(w) for w in row["by_round"]["simulated"]] == [4, 4]  # photos, p50, p95, batch


def test_the_projection_takes_the_single_process_group() -> None:
    doc = _served_doc(70.0)
    for run in doc["runs"]:
        run["engine"] = "ray-serve"
    doc["runs"].append({**doc["runs"][1], "engine": "uvicorn"})
    inputs = load_inputs(doc)
    assert inputs.service.in_service
    # only the uvicorn run's warm answers: no cold draws
    assert not inputs.service.cold_draws and inputs.service.batch_ms[SPLIT]


def test_in_service_times_are_delays_that_share_no_core() -> None:
    from bench.fleet_sim_engine import LOOP_SHARE

    doc = _served_doc(70.0)
    inputs = load_inputs(doc)
    # 40 devices, a photo per 1.5 s each, at batch 1 keep a 10 ms compute thread 27% busy, and
    # the event loop LOOP_SHARE of each 4 ms overhead; decode and the rest of the overhead are
    # wall-clock times already, so they slow nothing else down
    res = simulate(inputs, "middle", devices=40, seed=1)
    assert res.utilisation == pytest.approx(40 / 1.5 * (10 + 4 * LOOP_SHARE) / 1e3, abs=0.03)
    assert res.p50_ms < 40 + 2 + 2 + 20 + 4 + 10


@pytest.mark.slow
def test_the_real_service_s_answers_fill_the_records(live_service: LocalService,
                                                      tmp_path: Path) -> None:
    profile = DeviceProfile("efficientnet_lite0", "", (
        DeviceCost(DEVICE, 140.0, 0.0, 0), DeviceCost(SPLIT, 82.0, 0.8, 19_000)))
    payloads = encode_payloads(tmp_path, "efficientnet_lite0", [SPLIT])
    inputs = DeviceInputs("efficientnet_lite0", profile, payloads)
    spec = RunSpec(policy=SPLIT, devices=2, link_mix=("lan", "wifi"), period_s=0.5,
                   warmup_s=0.5, duration_s=2.0, timeout_s=10.0)
    run = asyncio.run(run_fleet(live_service.url, inputs, spec))
    answered = [r for r in run.records if r.served]
    assert answered
    for r in answered:
        assert r.compute_ms is not None and r.compute_ms > 0
        assert r.round_trip_ms is not None and r.request_bytes and r.sent_s is not None
        assert r.round_trip_ms >= r.decode_ms + r.queue_ms + r.compute_ms  # type: ignore[operator]
    summary = served.run_summary(run.records, spec, inputs)
    counted = sum(h["count"] for h in summary["decode_ms"][SPLIT].values()) + \
        summary["decode_alone_ms"].get(SPLIT, {"count": 0})["count"]
    # every answer to the window's photos, to the last (its drain), and the warm-up's that
    # arrived in the window
    ((start, last),) = answer_spans(run.records, [spec.window])
    assert counted == sum(start <= r.done_s <= last for r in answered)


def test_auto_reads_time_outside_the_service_as_a_slower_uplink() -> None:
    from bench.fleet_sim_auto import AutoDevice

    auto = AutoDevice(0, [DEVICE, CLOUD], HEAD_MS, {CLOUD: 20_000.0}, LAN.rtt_ms,
                      LAN.uplink_bps, LAN.downlink_bps)
    before = auto.fixed_ms[CLOUD]
    for _ in range(3):  # 20 kB whose network time is 1 ms RTT + 80 ms: 2 Mbit/s, not 500
        auto.answered(0.0, {}, 20_000.0, LAN.rtt_ms + 80.0)
    assert auto.fixed_ms[CLOUD] - before == pytest.approx(
        (20_000 + 350) * 8 / 2e6 * 1e3 - (20_000 + 350) * 8 / LAN.uplink_bps * 1e3, rel=1e-6)
    assert auto.fixed_ms[DEVICE] == HEAD_MS[DEVICE]


def test_the_projection_does_not_count_a_service_that_sends_its_devices_home() -> None:
    from bench.fleet_sim import _p95_if_served

    inputs = load_inputs(_served_doc(70.0))
    flooded = replace(inputs, max_queue=1)
    res = simulate(flooded, "middle", devices=400, seed=0, duration_s=3.0)
    assert res.rejected_503 > 0.01 * res.ok
    assert _p95_if_served(res) == float("inf")
    calm = simulate(inputs, "middle", devices=8, seed=0, duration_s=3.0)
    assert _p95_if_served(calm) == calm.p95_ms


def test_the_projection_runs_on_served_inputs(tmp_path: Path) -> None:
    import argparse
    import json

    from bench.fleet_sim import run_cli

    (tmp_path / "fleet.json").write_text(json.dumps(_served_doc(70.0)))
    args = argparse.Namespace(devices=[200], replicas=[1, 2], out=tmp_path, from_=None,
                              target_p95_ms=500.0, seed=0, simulate=True)
    assert run_cli(args) == 0
    sim = json.loads((tmp_path / "simulation.json").read_text())
    assert sim["service_times_from"].startswith("the runs' answers")
    assert set(sim["replicas_needed"]) == {DEVICE, "middle", "auto"}  # no times for cloud
    assert sim["replicas_needed"]["middle"]["replicas"] >= 1
    assert not (tmp_path / "fleet_sim_service_times.json").exists()  # nothing measured


def test_the_projection_classes_saved_records_again_and_writes_them_back(tmp_path: Path
                                                                          ) -> None:
    import argparse
    import json

    from bench import fleet_records
    from bench.fleet_run import FleetRun
    from bench.fleet_sim import run_cli

    doc = _served_doc(70.0)
    spec = RunSpec(policy=SPLIT, devices=8, link_mix=("lan",), period_s=1.0, warmup_s=1.0,
                   duration_s=10.0, timeout_s=10.0)
    records = [_answer(i % 8, t / 8, compute_ms=10.0) for i, t in enumerate(range(88))]
    fleet_records.save(tmp_path / fleet_records.RECORDS_NAME,
                       [(doc["runs"][1], spec, FleetRun(records, 1.0, "answers", 11.0,
                                                         windows=(spec.window,)))])
    doc["runs"][1]["served"] = {"compute_ms": {}}  # summarised by some older classing
    (tmp_path / "fleet.json").write_text(json.dumps(doc))
    args = argparse.Namespace(devices=[50], replicas=[1], out=tmp_path, from_=None,
                              target_p95_ms=500.0, seed=0, simulate=True)
    assert run_cli(args) == 0
    written = json.loads((tmp_path / "fleet.json").read_text())
    assert written["runs"][1]["served"]["compute_alone_ms"][SPLIT]["count"] > 0
    assert written["simulation"]["runs"][1]["simulated_p95_ms"] > 0


def _loop_bound_doc() -> dict[str, Any]:
    """8 devices, warm, at batch 1 and 16: a 1 ms forward pass per row, 20 ms of overhead."""
    records = [_answer(t % 8, t / 8, compute_ms=1.0, overhead_ms=20.0) for t in range(88)]
    records += [_answer(i, 20.0 + t, compute_ms=16.0, batch=16, overhead_ms=20.0)
                for t in range(4) for i in range(16)]
    warm = served.run_summary(records, _spec(16, (0.0, 30.0)), HEADS)
    runs = [{"engine": "uvicorn", "replicas": 1, "policy": SPLIT, "devices": 8,
             "p50_ms": 80.0, "p95_ms": 80.0, "duration_s": 10.0, "served": warm}]
    return {"inputs": _inputs_doc(), "runs": runs}


def test_the_event_loop_is_a_queue_the_requests_wait_for() -> None:
    from bench import fleet_sim_engine as engine

    inputs = load_inputs(_loop_bound_doc())
    # 20 ms of loop CPU per request: 50 answers/s, however fast the 1 ms/row batches are
    loaded = simulate(inputs, "middle", devices=150, seed=0, duration_s=4.0)  # 100 photos/s
    assert loaded.throughput_rps < 50 * 1.1
    assert loaded.p95_ms > 1000
    calm = simulate(inputs, "middle", devices=30, seed=0, duration_s=4.0)  # 20 photos/s
    assert calm.p95_ms < 200
    engine_share = engine.LOOP_SHARE
    try:  # the same overhead as a pure delay: no queue
        engine.LOOP_SHARE = 0.0
        delay = simulate(inputs, "middle", devices=150, seed=0, duration_s=4.0)
    finally:
        engine.LOOP_SHARE = engine_share
    assert delay.throughput_rps > 90 and delay.p95_ms < 200


def test_a_batch_that_started_after_its_window_closed_is_the_drain_s() -> None:
    # window [0, 1): photos at 0.97 s reach the service 40 ms of head and the link later, after
    # it closed; photos at 0.93 s start their batch inside it, though answered after it
    records = [_answer(0, 0.5, compute_ms=12.0, batch=2), _answer(1, 0.5, compute_ms=12.0, batch=2),
               _answer(0, 0.93, compute_ms=12.0, batch=2, overhead_ms=90.0),
               _answer(1, 0.93, compute_ms=12.0, batch=2, overhead_ms=90.0),
               _answer(0, 0.97, compute_ms=30.0, batch=2),
               _answer(1, 0.97, compute_ms=30.0, batch=2)]
    summary = served.run_summary(records, _spec(window=(0.0, 1.0)), HEADS)
    assert summary["compute_ms"][SPLIT]["2"]["count"] == 1  # 12 ms, in the window
    drained = summary["compute_drain_ms"][SPLIT]["2"]
    assert drained["count"] == 1 and _mean(drained) == pytest.approx(30.0)
    # every answer of the span counts (each pair's first found the service idle: cold)
    assert sum(h["count"] for h in summary["decode_ms"][SPLIT].values()) == 6


def test_a_drain_draws_its_own_forward_passes() -> None:
    # 16-row passes of 400 ms while 150 devices send: 40 rows/s against 100 offered
    records = [_answer(i, 20.0 + t, compute_ms=400.0, batch=16) for t in range(4)
               for i in range(16)]
    records += [_answer(t % 8, t / 8, compute_ms=25.0) for t in range(88)]
    warm = served.run_summary(records, _spec(16, (0.0, 30.0)), HEADS)
    doc = {"inputs": _inputs_doc(), "runs": [
        {"engine": "uvicorn", "replicas": 1, "policy": SPLIT, "devices": 8, "p50_ms": 80.0,
         "p95_ms": 80.0, "duration_s": 10.0, "served": warm}]}
    inputs = load_inputs(doc)
    slow = simulate(inputs, "middle", devices=150, seed=0, duration_s=3.0)
    fast = replace(inputs.service, drain_compute_draws={SPLIT: {16: (40.0,)}})
    drained = simulate(replace(inputs, service=fast), "middle", devices=150, seed=0,
                       duration_s=3.0)
    # the window's photos still queued when it closes are answered 10x as fast
    assert drained.ok == slow.ok and drained.p95_ms < slow.p95_ms * 0.8


def test_the_warm_up_draws_the_warm_up_s_own_forward_passes() -> None:
    # before the window (1 s on): a fresh deployment's first passes, 10x a warm one's
    records = [_answer(t % 8, t / 40, compute_ms=50.0 * b, batch=b) for t in range(12)
               for b in (1, 2, 4)]
    records += [_answer(t % 8, 1.0 + t / 8, compute_ms=5.0 * b, batch=b) for t in range(80)
                for b in (1, 2, 4)]
    summary = served.run_summary(records, _spec(8, (1.0, 11.0)), HEADS)
    assert _mean(summary["compute_warmup_ms"][SPLIT]["4"]) == pytest.approx(200.0, rel=0.04)
    assert _mean(summary["compute_ms"][SPLIT]["4"]) == pytest.approx(20.0, rel=0.04)
    doc = {"inputs": _inputs_doc(), "runs": [
        {"engine": "uvicorn", "replicas": 1, "policy": SPLIT, "devices": 8, "p50_ms": 80.0,
         "p95_ms": 80.0, "duration_s": 10.0, "served": summary}]}
    inputs = load_inputs(doc)
    assert set(inputs.service.warmup_compute_draws[SPLIT]) == {1, 2, 4}
    # 150 devices: the warm-up's slow passes leave a backlog the window starts with
    slow = simulate(inputs, "middle", devices=150, seed=0, duration_s=2.0)
    warm = simulate(replace(inputs, service=replace(inputs.service, warmup_compute_draws={})),
                    "middle", devices=150, seed=0, duration_s=2.0)
    assert slow.p50_ms > warm.p50_ms


def test_rounds_let_the_queue_drain_between_windows() -> None:
    inputs = load_inputs(_loop_bound_doc())
    one = simulate(inputs, "middle", devices=150, seed=0, duration_s=4.0)
    four = simulate(inputs, "middle", devices=150, seed=0, duration_s=4.0, rounds=4)
    assert one.ok == pytest.approx(four.ok, abs=150)  # the same photos, ...
    assert four.p95_ms < one.p95_ms / 2  # ... each window starting on an idle service
    # each window reported on its own: its photos, and the batches that ended in it
    assert len(four.by_round) == 4 and len(one.by_round) == 1
    assert sum(w["photos"] for w in four.by_round) == four.ok + four.timeouts
    assert all(w["p50_ms"] <= w["p95_ms"] for w in four.by_round)
    assert all(w["mean_batch_size"] >= 1 for w in four.by_round)


def test_auto_probes_the_link_at_start_up_through_the_service_s_loop() -> None:
    from bench.fleet_sim_auto import AutoDevice

    auto = AutoDevice(0, [DEVICE, CLOUD], HEAD_MS, {CLOUD: 20_000.0}, LAN.rtt_ms,
                      LAN.uplink_bps, LAN.downlink_bps)
    # each upload waited 300 ms in a busy loop: LinkEstimator reads that as the RTT
    up_ms = {64: 0.0, 65_536: (65_536 + 350) * 8 / LAN.uplink_bps * 1e3}
    auto.probe_done([(b, LAN.rtt_ms + 300.0 + up_ms[b]) for b in (64, 65_536, 64, 65_536)])
    assert auto.probed and auto.rtt_ms == pytest.approx(LAN.rtt_ms + 300.0, rel=0.02)
    auto.metadata(0.0, {CLOUD: 10.0}, 0.0, {CLOUD: 0.0})
    assert auto.plan(0.0) == DEVICE  # 5 + 301 ms + 10 ms over the device's 100 ms
    # a fast answer lowers it, as LinkEstimator caps the RTT by the recent large samples
    auto.answered(0.0, {}, 20_000.0, LAN.rtt_ms + 2.0)
    assert auto.rtt_ms == pytest.approx(LAN.rtt_ms + 2.0)


def test_auto_s_start_up_costs_the_loop_what_the_deployment_measured() -> None:
    doc = _served_doc(70.0)
    quick = simulate(load_inputs(doc), "auto", devices=8, seed=0, duration_s=5.0)
    # a probe upload that takes the loop 300 ms (bench.fleet_startup timed it so) reads as a
    # slow link: every device plans around the service, and never learns otherwise
    doc["inputs"]["startup_ms"] = {"uvicorn/1": {"metadata_ms": 5.0, "probe_small_ms": 300.0,
                                                 "probe_large_ms": 300.0, "requests": 30}}
    inputs = load_inputs(doc)
    assert inputs.startup_ms == {"uvicorn/1": {"metadata_ms": 5.0, "probe_small_ms": 300.0,
                                               "probe_large_ms": 300.0}}
    slow = simulate(inputs, "auto", devices=8, seed=0, duration_s=5.0)
    assert quick.choices.get(SPLIT, 0) > 0 and set(slow.choices) == {DEVICE}
    # another deployment's figures are not this one's
    other = simulate(inputs, "auto", devices=8, seed=0, duration_s=5.0, replicas=2)
    assert other.choices.get(SPLIT, 0) > 0
    # what the idle deployment published is what its replicas publish until answers move it
    doc["inputs"]["startup_ms"] = {"uvicorn/1": {"server_ms": {SPLIT: 500.0}}}
    shunned = simulate(load_inputs(doc), "auto", devices=8, seed=0, duration_s=5.0)
    assert set(shunned.choices) == {DEVICE}


def test_auto_learns_the_service_speed_from_answers() -> None:
    from bench.fleet_sim_auto import SERVER_HALF_LIFE_MS, AutoDevice

    auto = AutoDevice(0, [DEVICE, CLOUD], HEAD_MS, {CLOUD: 20_000.0}, LAN.rtt_ms,
                      LAN.uplink_bps, LAN.downlink_bps)
    auto.metadata(0.0, {CLOUD: 10.0}, 0.0, {CLOUD: 0.0})
    before = auto.totals(0.0)[CLOUD]
    auto.answered(0.0, {}, server_row_ms=15.0, cand=CLOUD)  # within 2x: agrees, speed 1
    assert auto.totals(0.0)[CLOUD] == before
    auto.answered(0.0, {}, server_row_ms=100.0, cand=CLOUD)  # 10x: halfway there, 5.5x
    assert auto.totals(0.0)[CLOUD] - before == pytest.approx(45.0, abs=0.1)
    later = auto.totals(SERVER_HALF_LIFE_MS)[CLOUD]  # decays towards 1
    assert later - before == pytest.approx(22.5, abs=0.1)


def test_a_row_s_served_times_come_from_all_of_its_windows() -> None:
    # a policy's rounds pooled on one time line: answers in either window count, none between
    records = [_answer(0, t, compute_ms=10.0) for t in (1.0, 2.0, 5.0, 8.0, 9.0)]
    summary = served.run_summary(records, _spec(1), HEADS, windows=[(0.5, 3.0), (7.5, 10.0)])
    assert sum(h["count"] for h in summary["decode_ms"][SPLIT].values()) == 4
    assert summary["device_lag_ms"]["1"]["count"] == 4
