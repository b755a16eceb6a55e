"""``bench fleet``: the link wait, the photo schedule, aggregation and ``fleet.json``'s shape
without a network; then two emulated devices on two policies against the real service."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx
import pytest

from bench import fleet, fleet_report, report
from bench.fleet_device import (
    FleetInputs,
    LinkTransport,
    Payload,
    Record,
    photo_times,
    transmit,
)
from bench.fleet_inputs import encode_payloads
from bench.fleet_rounds import SPELL_S, round_orders, size_rounds, size_window
from bench.fleet_run import RunSpec, _Pool, bar, device_phase_s, run_fleet, run_rounds, summarize
from bench.fleet_startup import startup_ms
from bench.netem import LinkShape
from bench.service_compute import cpu_layout
from device_client.local_service import LocalService
from shared.candidates import AUTO, CLOUD, DEVICE
from shared.planner import DeviceCost, DeviceProfile

MODEL = "efficientnet_lite0"
SPLIT = "_blocks.9"
SPEC = RunSpec(policy=AUTO, devices=4, link_mix=("lan", "3g"), period_s=1.0, warmup_s=1.0,
               duration_s=2.0, timeout_s=5.0)
# A board-class profile (the shape the device worker measures), without measuring it.
PROFILE = DeviceProfile(MODEL, "", (
    DeviceCost(DEVICE, 140.0, 0.0, 0),
    DeviceCost(CLOUD, 0.0, 0.5, 19_000),
    DeviceCost(SPLIT, 82.0, 0.8, 19_000),
))


# --- the link, waited out in the device ------------------------------------------------------


def test_transmit_queues_messages_behind_each_other_on_one_direction() -> None:
    arrive, free = transmit(10.0, 0.0, 2_000, 16_000.0, 0.05)  # 1 s on the wire, then 50 ms
    assert (arrive, free) == (11.05, 11.0)
    arrive2, free2 = transmit(10.5, free, 2_000, 16_000.0, 0.05)  # the link is busy until 11
    assert (arrive2, free2) == (12.05, 12.0)
    assert transmit(20.0, free2, 0, 1.0, 0.0) == (20.0, 20.0)  # idle link, nothing to send


def test_the_transport_waits_at_least_the_link_s_rtt_and_transfer() -> None:
    seen: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(len(request.content))
        return httpx.Response(200, content=b"x" * 1_000)

    link = LinkShape("test", uplink_bps=80_000.0, downlink_bps=800_000.0, rtt_ms=100.0)

    async def post() -> tuple[float, httpx.Response]:
        transport = LinkTransport(link, inner=httpx.MockTransport(answer))
        async with httpx.AsyncClient(transport=transport, base_url="http://s.test") as client:
            started = time.perf_counter()
            response = await client.post("/p", content=b"y" * 1_000)
            return time.perf_counter() - started, response

    elapsed_s, response = asyncio.run(post())
    # 1,000 B + headers up at 80 kbit/s >= 100 ms, 100 ms of RTT, 1,000 B down >= 10 ms.
    assert elapsed_s >= 0.9 * (0.1 + 0.1 + 0.01)
    assert response.status_code == 200 and response.content == b"x" * 1_000
    assert seen == [1_000]


# --- the photo schedule ----------------------------------------------------------------------


def test_photos_come_every_period_from_a_seeded_phase() -> None:
    assert list(photo_times(1.2, 0.5, 0.0, 4.0)) == pytest.approx([0.5, 1.7, 2.9])
    assert list(photo_times(1.0, 0.5, 2.0, 4.0)) == [2.5, 3.5]
    phases = [device_phase_s(7, i, 1.2) for i in range(50)]
    assert phases == [device_phase_s(7, i, 1.2) for i in range(50)]  # seeded
    assert all(0 <= p < 1.2 for p in phases) and len(set(phases)) == 50
    with pytest.raises(ValueError):
        list(photo_times(1.0, 1.0, 0.0, 2.0))


def test_device_i_gets_link_mix_i_mod_len() -> None:
    assert [SPEC.link_of(i) for i in range(5)] == ["lan", "3g", "lan", "3g", "lan"]
    with pytest.raises(ValueError, match="link_mix"):
        RunSpec(policy=CLOUD, devices=1, link_mix=("5g",), period_s=1.0, warmup_s=0.0,
                duration_s=1.0, timeout_s=1.0)


# --- the rounds: policies side by side --------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 6, 7], ids=lambda n: f"{n}-policies")
def test_every_round_runs_every_policy_once_and_positions_rotate(count: int) -> None:
    full = 2 * count if count % 2 else count
    orders = round_orders(count, full)
    assert all(sorted(order) == list(range(count)) for order in orders)
    for position in range(count):  # each policy once in every position over a full cycle
        seen = [order[position] for order in orders]
        assert sorted(seen) == sorted(list(range(count)) * (full // count))
    follows = [(a, b) for order in orders for a, b in zip(order, order[1:], strict=False)]
    assert len(set(follows)) == count * (count - 1)  # every policy follows every other
    assert round_orders(count, full + 1)[-1] == orders[0]  # cycled past a full design


def test_a_small_fleet_stretches_its_window_then_shortens_its_period() -> None:
    assert size_window(128, period_s=1.5, duration_s=10.0, min_photos=40) == (1.5, 10.0)
    assert size_window(4, period_s=1.5, duration_s=10.0, min_photos=40) == (1.5, 15.0)
    period_s, duration_s = size_window(1, period_s=1.5, duration_s=10.0, min_photos=40)
    assert (period_s, duration_s) == (0.5, 20.0) and duration_s / period_s == 40
    with pytest.raises(ValueError):
        size_window(0, period_s=1.5, duration_s=10.0, min_photos=40)


def test_a_single_device_s_rounds_are_shorter_than_the_machine_s_slow_spells() -> None:
    period_s = fleet.PERIOD_MS / 1e3
    one_period_s, duration_s = size_window(1, period_s=period_s, duration_s=10.0,
                                           min_photos=fleet.MIN_PHOTOS)
    for policies in (6, 4):  # uvicorn's, Ray Serve's
        rounds = size_rounds(4, policies=policies, period_s=one_period_s,
                             duration_s=duration_s, shortened=True)
        window_s = duration_s / rounds
        assert window_s * policies <= SPELL_S  # one round of every policy
        photos = window_s / one_period_s  # a whole number of photos, a few
        assert photos >= 2 and photos == pytest.approx(round(photos))
    # a fleet that fills its window at the asked rate keeps the rounds asked for
    assert size_rounds(4, policies=6, period_s=1.0, duration_s=10.0, shortened=False) == 4
    assert size_rounds(50, policies=2, period_s=0.5, duration_s=4.0, shortened=True) == 50


def test_the_default_photos_keep_a_single_device_warm_and_the_run_short() -> None:
    from bench.fleet_sim_served import IDLE_S

    period_s = fleet.PERIOD_MS / 1e3
    # N=1: a photo well under IDLE_S apart (the service never sleeps into a cold request)
    one_period_s, duration_s = size_window(1, period_s=period_s, duration_s=10.0,
                                           min_photos=fleet.MIN_PHOTOS)
    assert duration_s == 20.0 and one_period_s < IDLE_S / 1.5
    # only N=1 and N=8 stretch: 32 and 128 devices keep 10 s at the default period
    windows = {n: size_window(n, period_s=period_s, duration_s=10.0,
                              min_photos=fleet.MIN_PHOTOS) for n in (1, 8, 32, 128)}
    assert windows[32] == windows[128] == (period_s, 10.0)
    assert sum(d for _, d in windows.values()) <= 60.0


def test_a_policy_s_windows_pool_on_one_time_line() -> None:
    spec = RunSpec(policy=CLOUD, devices=1, link_mix=("lan",), period_s=1.0, warmup_s=1.0,
                   duration_s=4.0, timeout_s=5.0, rounds=2)
    pool = _Pool(MODEL)
    # Round 1: warm-up [0, 1), window [1, 3); its last answer arrives at 3.5.
    pool.add([_record(0.5, 100.0, served=True, batch_size=1),
              _record(1.5, 100.0, served=True, batch_size=3),
              _record(2.9, 600.0, served=True, batch_size=3)], 1.0, spec.round_s, None, None, 4.0)
    # Round 2: no warm-up, window [0, 2) of its own.
    pool.add([_record(0.2, 300.0, served=True, batch_size=1),
              _record(2.5, 100.0, served=True)], 0.0, spec.round_s, None, None, 3.0)
    run = pool.run()
    assert run.windows == ((1.0, 3.0), (4.5, 6.5))  # after round 1's last answer and a gap
    assert [round(r.photo_s, 3) for r in run.records] == [0.5, 1.5, 2.9, 4.7, 7.0]
    assert (run.mean_batch_size, run.mean_batch_source) == (2.0, "answers")
    assert run.elapsed_s == 7.0
    row = summarize(run.records, spec, windows=run.windows)
    assert row["photos"] == 3 and row["p50_ms"] == 300.0  # the warm-up and round 2's late one
    # answers to a window's photos count to its last one: 1.6 and 3.5 in [1, 3.5], 5.0 in
    # [4.5, 6.5] (7.1 answers a photo taken after its window)
    assert row["throughput_rps"] == round(3 / 4.5, 2)
    assert (row["rounds"], row["period_ms"], row["duration_s"]) == (2, 1000.0, 4.0)
    first, second = row["by_round"]  # each window on its own
    assert (first["photos"], first["p50_ms"], second["photos"]) == (2, 350.0, 1)
    assert first["throughput_rps"] == 0.8 and second["throughput_rps"] == 0.5



def test_pooling_moves_every_time_of_a_record_sent_s_too() -> None:
    # sent_s stayed on the window's own clock once: round 2's requests then "left" before
    # round 1's answers, and every later request overlapped them (no cold or alone ones)
    spec = RunSpec(policy=CLOUD, devices=1, link_mix=("lan",), period_s=1.0, warmup_s=0.0,
                   duration_s=4.0, timeout_s=5.0, rounds=2)
    pool = _Pool(MODEL)
    pool.add([_record(0.5, 100.0, served=True, sent_s=0.52)], 0.0, spec.round_s, None, None, 2.0)
    pool.add([_record(0.5, 100.0, served=True, sent_s=0.52)], 0.0, spec.round_s, None, None, 2.0)
    first, second = pool.run().records
    shift_s = second.photo_s - first.photo_s
    assert shift_s > 2.0
    assert second.sent_s is not None and first.sent_s is not None
    assert second.sent_s - first.sent_s == pytest.approx(shift_s)

# --- aggregation -------------------------------------------------------------------------------


def _record(photo_s: float, latency_ms: float, *, link: str = "lan", candidate: str = CLOUD,
            outcome: str = "ok", **flags: object) -> Record:
    done_s = photo_s + latency_ms / 1e3
    return Record(0, link, photo_s, photo_s, done_s, candidate, outcome, **flags)  # type: ignore[arg-type]


def test_summarize_counts_photos_taken_in_the_window_and_answers_arriving_in_it() -> None:
    records = [
        _record(0.5, 100.0, served=True, batch_size=1),  # warm-up: not counted
        _record(1.2, 100.0, served=True, batch_size=2),
        _record(1.5, 200.0, link="3g", candidate=DEVICE),
        _record(2.0, 300.0, served=False, rejected_503=True, fallback=True),
        _record(2.2, 9_000.0, outcome="timeout", fallback=True),
        _record(2.5, 50.0, outcome="error", error="wrong_answer", served=True),
        _record(2.9, 400.0, served=True),  # taken in the window, answered after it
        _record(3.1, 10.0, served=True),  # after the window
    ]
    row = summarize(records, SPEC, mean_batch_size=3.5, mean_batch_source="metrics")
    assert (row["ok"], row["rejected_503"], row["fallbacks"], row["errors"], row["timeouts"]
            ) == (4, 1, 2, 1, 1)
    assert row["photos"] == 6
    # answers that arrived from the window's start to its photos' last answer, [1, 3.3]:
    # 1.3, 2.55, 3.11 and 3.3 (not the device's own finish of the timeout at 11.2)
    assert row["throughput_rps"] == round(4 / 2.3, 2)
    assert row["p50_ms"] == 300.0  # over the five answered photos, the timeout's included
    assert row["mean_batch_size"] == 3.5
    assert row["choices"] == {CLOUD: 5, DEVICE: 1}
    assert row["by_link"]["3g"] == {"photos": 1, "p50_ms": 200.0, "p95_ms": 200.0}
    assert row["error_kinds"] == {"wrong_answer": 1}


def test_bar_compares_auto_with_the_best_fixed_policy_per_size() -> None:
    def run(policy: str, n: int, p95: float, errors: int = 0) -> dict[str, object]:
        return {"engine": "uvicorn", "replicas": 1, "policy": policy, "devices": n,
                "p95_ms": p95, "errors": errors, "timeouts": 0}

    runs = [run(CLOUD, 1, 30.0), run(DEVICE, 1, 140.0), run(AUTO, 1, 32.0),
            run(CLOUD, 8, 280.0), run(DEVICE, 8, 141.0), run(AUTO, 8, 160.0, errors=1)]
    small, large = bar(runs)
    assert (small["best_fixed"], small["ratio"], small["ratio_met"]) == (CLOUD, 1.067, True)
    assert "largest" not in small
    assert (large["best_fixed"], large["ratio_met"], large["clean_met"]) == (DEVICE, False, False)


def test_fleet_json_has_the_contract_s_keys(tmp_path: Path) -> None:
    rows = [summarize([_record(1.5, 100.0, served=True)],
                      RunSpec(policy=p, devices=1, link_mix=("lan",), period_s=1.0,
                              warmup_s=1.0, duration_s=2.0, timeout_s=5.0))
            for p in (CLOUD, AUTO)]
    args = argparse.Namespace(quick=True, devices=[1], engines=None, out=tmp_path)
    common = {"link_mix": ("lan",), "period_s": 1.0, "warmup_s": 1.0, "duration_s": 2.0,
              "timeout_s": 5.0, "seed": 0, "rounds": 2, "min_photos": 4}
    settings = {"max_batch_size": 16, "max_queue_delay_ms": 2.0, "max_queue": 256,
                "threads": 1, "backend": "onnxruntime"}
    profile_doc = {"costs": [], "device_cpu": 0.2, "device_cpu_limited": True}
    inputs = FleetInputs(MODEL, PROFILE, {CLOUD: [_payload()], SPLIT: [_payload()]})
    startup = {"uvicorn/1": {"metadata_ms": 2.0, "probe_small_ms": 1.5, "probe_large_ms": 1.6,
                             "requests": 30}}
    doc = fleet._document(args, rows, inputs, profile_doc, settings, cpu_layout({0, 1}), common,
                          [1], ["uvicorn"], [], 1.0, startup)
    run_keys = {"engine", "replicas", "policy", "devices", "p50_ms", "p95_ms", "throughput_rps",
                "mean_batch_size", "ok", "rejected_503", "fallbacks", "errors", "timeouts"}
    assert all(run_keys <= set(r) for r in doc["runs"])
    assert "choices" in doc["runs"][1] and doc["runs"][1]["auto_vs_best_p95"] == 1.0
    assert {"model", "period_ms", "duration_s", "link_mix", "links", "head_ms",
            "request_bytes", "response_bytes", "split_points", "service",
            "startup_ms"} <= set(doc["inputs"])
    assert doc["inputs"]["head_ms"][SPLIT] == pytest.approx(82.8)
    assert doc["inputs"]["request_bytes"] == {CLOUD: 3.0, SPLIT: 3.0, DEVICE: 0.0}
    assert set(doc["inputs"]["links"]["lan"]) == {"rtt_ms", "up_bps", "down_bps"}
    assert doc["inputs"]["split_points"] == {"early": "_blocks.3", "middle": "_blocks.9",
                                             "late": "_blocks.15"}
    assert {"batch_max", "batch_wait_ms", "threads"} <= set(doc["inputs"]["service"])
    assert doc["setup"]["device_cpu_limit"] == 0.2 and "2 cores" in doc["setup"]["notes"]
    paths = fleet_report.write(doc, tmp_path, report.make_console())
    assert [p.name for p in paths] == ["fleet.json", "fleet.md", "fleet.png"]


def _payload() -> Payload:
    return Payload("p", b"abc", 1)


# --- two emulated devices, two policies, the real service ---------------------------------------


@pytest.mark.slow
def test_a_small_fleet_against_the_real_service(live_service: LocalService,
                                                tmp_path: Path) -> None:
    payloads = encode_payloads(tmp_path, MODEL, [CLOUD, SPLIT])
    inputs = FleetInputs(MODEL, PROFILE, payloads)
    rows = []
    for policy in (SPLIT, AUTO):
        spec = RunSpec(policy=policy, devices=2, link_mix=("lan", "wifi"), period_s=0.5,
                       warmup_s=1.0, duration_s=2.0, timeout_s=10.0)
        run = asyncio.run(run_fleet(live_service.url, inputs, spec))
        rows.append(summarize(run.records, spec, mean_batch_size=run.mean_batch_size,
                              mean_batch_source=run.mean_batch_source))
    split, auto = rows
    for row in rows:
        assert row["ok"] == row["photos"] > 0
        assert (row["errors"], row["timeouts"], row["rejected_503"]) == (0, 0, 0)
    assert split["throughput_rps"] > 0 and split["mean_batch_source"] == "metrics"
    assert sum(auto["choices"].values()) == auto["photos"]
    assert set(auto["choices"]) <= {CLOUD, SPLIT, DEVICE}


@pytest.mark.slow
def test_two_policies_take_turns_against_the_real_service(live_service: LocalService,
                                                          tmp_path: Path) -> None:
    payloads = encode_payloads(tmp_path, MODEL, [CLOUD, SPLIT])
    inputs = FleetInputs(MODEL, PROFILE, payloads)
    specs = [RunSpec(policy=policy, devices=2, link_mix=("lan", "wifi"), period_s=0.5,
                     warmup_s=0.5, duration_s=2.0, timeout_s=10.0, rounds=2)
             for policy in (SPLIT, AUTO)]
    seen: list[tuple[str, int]] = []
    runs = asyncio.run(run_rounds(live_service.url, inputs, specs, pause_s=0.1,
                                  on_window=lambda spec, r: seen.append((spec.policy, r))))
    assert seen == [(SPLIT, 0), (AUTO, 0), (AUTO, 1), (SPLIT, 1)]
    for spec, run in zip(specs, runs, strict=True):
        assert len(run.windows) == 2 and run.windows[0][1] < run.windows[1][0]
        row = summarize(run.records, spec, mean_batch_size=run.mean_batch_size,
                        mean_batch_source=run.mean_batch_source, windows=run.windows)
        assert row["ok"] == row["photos"] >= 8  # 2 devices, 2 s at a photo every 0.5 s
        assert (row["errors"], row["timeouts"], row["rejected_503"]) == (0, 0, 0)
        assert row["mean_batch_source"] == "metrics"
    auto_records = runs[1].records
    assert len({r.photo_s for r in auto_records}) == len(auto_records)  # one time line


def test_a_device_s_start_up_is_timed_against_the_real_service(live_service: LocalService
                                                                ) -> None:
    costs = asyncio.run(startup_ms(live_service.url, MODEL, requests=3))
    assert set(costs) == {"metadata_ms", "probe_small_ms", "probe_large_ms", "requests",
                          "server_ms"}
    assert costs["requests"] == 3
    # the idle service's start-up profile: the whole model dearer than its late tail
    assert costs["server_ms"][CLOUD] > costs["server_ms"]["_blocks.15"] > 0
    assert all(costs[k] > 0 for k in ("metadata_ms", "probe_small_ms", "probe_large_ms"))
    with pytest.raises(ValueError, match="requests must be >= 1"):
        asyncio.run(startup_ms(live_service.url, MODEL, requests=0))
