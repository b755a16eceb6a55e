"""Load-aware planning, pure: the service's wait per candidate in the plan, the anti-stampede
rule over a simulated fleet, and planning around a 503's Retry-After on an injected clock."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
import pytest

from device_client.auto import AutoSplit
from device_client.client import ServiceClient
from device_client.results import InferenceResult, Timings
from shared.planner import (
    CLOUD,
    DEVICE,
    HYSTERESIS_RANGE,
    MAX_SWITCH_PROBABILITY,
    DeviceCost,
    DeviceProfile,
    LinkEstimate,
    ServerProfile,
    choose,
    draw_hysteresis,
    load_figures,
    switch_probability,
)
from shared.schemas import LoadBody, ModelMetadata, parse
from tests.support.contract import infer_body, metadata_body

DEVICE_PROFILE = DeviceProfile("m", "f" * 16, (
    DeviceCost(DEVICE, 400.0, 0.0, 0),
    DeviceCost(CLOUD, 0.0, 3.0, 18_000),
    DeviceCost("early", 40.0, 6.0, 150_000),
    DeviceCost("late", 80.0, 1.0, 1_500),
))
COSTS = {CLOUD: 10.0, "early": 8.0, "late": 2.0}
LINK = LinkEstimate(uplink_bps=20e6, rtt_ms=10.0)


def test_with_no_load_the_plan_is_the_same_as_without_load_figures() -> None:
    plain = choose(DEVICE_PROFILE, ServerProfile.of(COSTS), LINK)
    zero = choose(DEVICE_PROFILE, ServerProfile.of(COSTS, load_ms=dict.fromkeys(COSTS, 0.0)),
                  LINK)
    assert plain == zero
    assert plain.chosen == CLOUD


def test_a_busy_service_makes_cloud_dearer_than_a_late_split() -> None:
    # The whole model's forward pass carries 15 other JPEGs; a late tail's costs 1/5 of it.
    busy = ServerProfile.of(COSTS, load_ms={CLOUD: 300.0, "early": 60.0, "late": 60.0})
    plan = choose(DEVICE_PROFILE, busy, LINK)
    assert plan.chosen == "late"
    assert plan.estimate(CLOUD).server_ms == 310.0
    assert plan.estimate("late").server_ms == 62.0
    assert plan.estimate(DEVICE).server_ms == 0.0  # the device waits for no service
    # Busier still: the device wins.
    swamped = ServerProfile.of(COSTS, load_ms=dict.fromkeys(COSTS, 1_000.0))
    assert choose(DEVICE_PROFILE, swamped, LINK).chosen == DEVICE


def test_a_candidate_without_a_load_figure_waits_the_mean_queue() -> None:
    server = ServerProfile.of(COSTS, queue_ms=7.0, load_ms={CLOUD: 50.0})
    assert (server.wait_ms(CLOUD), server.wait_ms("late"), server.wait_ms(DEVICE)) == (
        50.0, 7.0, 0.0)


def test_metadata_load_is_parsed_per_candidate() -> None:
    body = metadata_body(split_ms={"early": 8.0, "late": 2.0})
    body["load"] = {"queue_ms_whole": 90.0, "queue_ms_tail": 20.0,
                    "queue_ms_splits": {"late": 25.0}, "queued": 12}
    server = ServerProfile.from_metadata(body)
    assert dict(server.load_ms) == {CLOUD: 90.0, "early": 20.0, "late": 25.0}
    assert load_figures(None, ["early"]) == {}
    with pytest.raises(ValueError, match="load_ms"):
        ServerProfile.of(COSTS, load_ms={CLOUD: -1.0})
    broken = {**body, "load": {**body["load"], "queue_ms_whole": "slow"}}
    with pytest.raises(Exception, match="load.queue_ms_whole"):
        parse(ModelMetadata, broken)


# --- anti-stampede -------------------------------------------------------------------------------


def test_switch_probability_grows_with_the_gain_and_is_capped() -> None:
    assert switch_probability(10.0, 10.0) == 0.0
    ps = [switch_probability(gain, 10.0) for gain in (11.0, 15.0, 20.0, 100.0)]
    assert ps == sorted(ps) and 0 < ps[0] < ps[-1] == MAX_SWITCH_PROBABILITY
    draws = {draw_hysteresis(seed) for seed in range(100)}
    assert len(draws) == 100 and all(HYSTERESIS_RANGE[0] <= h <= HYSTERESIS_RANGE[1]
                                     for h in draws)


def test_a_fleet_seeing_the_same_load_step_does_not_flip_at_the_same_request() -> None:
    """1,000 devices on `cloud`; the service gets busy at once (the whole-model wait jumps).
    Each device plans once per request with its own hysteresis and its own draws."""
    devices = 1_000
    idle = ServerProfile.of(COSTS)
    busy = ServerProfile.of(COSTS, load_ms={CLOUD: 200.0, "early": 20.0, "late": 20.0})
    assert choose(DEVICE_PROFILE, idle, LINK).chosen == CLOUD
    flipped_at: dict[int, int] = {}
    for device in range(devices):
        hysteresis, rng = draw_hysteresis(device), random.Random(10_000 + device)
        current = CLOUD
        assert choose(DEVICE_PROFILE, idle, LINK, current=current, hysteresis=hysteresis,
                      draw=rng.random()).chosen == CLOUD  # before the step: nobody moves
        for request in range(100):
            current = choose(DEVICE_PROFILE, busy, LINK, current=current,
                             hysteresis=hysteresis, draw=rng.random()).chosen
            if current != CLOUD:
                flipped_at[device] = request
                break
    per_request = Counter(flipped_at.values())
    assert len(flipped_at) == devices  # a real, lasting gain: every device moves eventually
    assert max(per_request.values()) <= 0.6 * devices  # never the whole fleet at one request
    assert len([r for r, n in per_request.items() if n >= 10]) >= 4  # spread over requests
    # Without the rule (no draw), the same step flips every device at the first request.
    assert all(choose(DEVICE_PROFILE, busy, LINK, current=CLOUD,
                      hysteresis=draw_hysteresis(d)).chosen != CLOUD for d in range(100))


# --- the device: load from every answer, Retry-After ----------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _service(state: dict[str, object]) -> httpx.MockTransport:
    """Metadata with a quiet load; inference answers with ``state["load"]`` or 503s with
    ``Retry-After`` while ``state["refuse"]`` is set; probes answer at once."""

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/probe"):
            return httpx.Response(200, json={"received_bytes": len(request.content),
                                             "server_ms": 0.0})
        if request.method == "GET":
            state["gets"] = int(state.get("gets", 0)) + 1  # type: ignore[call-overload]
            body = metadata_body(server_ms=COSTS[CLOUD], split_ms={"early": 8.0, "late": 2.0})
            body["load"] = LoadBody(queue_ms_whole=0.0, queue_ms_tail=0.0).model_dump()
            return httpx.Response(200, json=body)
        if state.get("refuse"):
            return httpx.Response(503, json={"error": "queue full"},
                                  headers={"Retry-After": "2"})
        body = infer_body(split=CLOUD)
        body["load"] = state["load"]
        # As fast as the metadata says: the service's speed stays 1, the load alone moves plans.
        body["timings_ms"] = {"decode": 1.0, "queue": 0.0, "compute": COSTS[CLOUD] - 1.0}
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handler)


def _ran(split: str, fallback: str | None = None) -> InferenceResult:
    ran = DEVICE if fallback or split == DEVICE else ("cloud" if split == CLOUD else "split")
    return InferenceResult("x.jpg", split, ran, (), 18_000,  # type: ignore[arg-type]
                           Timings(head=0.0, encode=3.0, network=11.0, server=3.0),
                           requested="auto", fallback=fallback)


def test_the_device_plans_with_the_load_of_every_answer_decaying_to_the_metadata() -> None:
    clock = _Clock()
    busy = LoadBody(queue_ms_whole=300.0, queue_ms_tail=40.0).model_dump()
    state: dict[str, object] = {"load": busy}

    async def run() -> None:
        async with ServiceClient("http://s.test", transport=_service(state)) as client:
            auto = AutoSplit(client, DEVICE_PROFILE, clock=clock, seed=1, hysteresis=0.0,
                             load_half_life_s=2.0)
            assert (await auto.plan()).chosen == CLOUD
            reply = await client.classify("m", b"jpeg")
            assert reply.load is not None and reply.load.queue_ms_whole == 300.0
            auto.observe(_ran(CLOUD))
            plan = await auto.plan()
            assert plan.estimate(CLOUD).server_ms == COSTS[CLOUD] + 300.0
            # The switch is a draw at every plan (anti-stampede), never more than 1 in 2.
            chosen = [plan.chosen] + [(await auto.plan()).chosen for _ in range(20)]
            moved = [i for i, c in enumerate(chosen) if c != CLOUD]
            assert moved and chosen[-1] in ("early", "late")  # a split: the tail waits less
            assert CLOUD not in chosen[moved[0]:]
            clock.now = 2.0  # one half-life: halfway back to the metadata's quiet figures
            assert (await auto.plan()).estimate(CLOUD).server_ms == COSTS[CLOUD] + 150.0
            clock.now = 40.0  # long gone: the metadata's figures
            assert (await auto.plan()).estimate(CLOUD).server_ms == COSTS[CLOUD]

    asyncio.run(run())


def test_a_503_with_retry_after_plans_device_until_it_has_passed() -> None:
    clock = _Clock()
    state: dict[str, object] = {"refuse": True, "load": None}

    async def run() -> None:
        async with ServiceClient("http://s.test", transport=_service(state)) as client:
            auto = AutoSplit(client, DEVICE_PROFILE, clock=clock, seed=3, retry_jitter=0.5)
            assert (await auto.plan()).chosen == CLOUD
            with pytest.raises(Exception, match="503"):
                await client.classify("m", b"jpeg")
            auto.observe(_ran(CLOUD, fallback="overloaded: queue full"))
            assert 2.0 <= auto.refused_until <= 3.0  # Retry-After, stretched by this device
            gets = state["gets"]
            for clock.now in (0.5, 1.0, 1.99):
                plan = await auto.plan()
                assert plan.chosen == DEVICE
                assert auto.unreachable is not None and auto.unreachable.status == 503
            assert state["gets"] == gets  # nothing asked of the service meanwhile
            state["refuse"] = False
            clock.now = 3.01
            assert (await auto.plan()).chosen == CLOUD  # tries the service again
            assert auto.unreachable is None

    asyncio.run(run())
