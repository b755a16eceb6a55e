"""Tests for shared.planner: the latency terms, the choice, hysteresis, metadata parsing."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ServiceError, UnknownSplitPointError
from shared.planner import (
    CLOUD,
    DEVICE,
    HTTP_OVERHEAD_BYTES,
    RESPONSE_BYTES,
    DeviceCost,
    DeviceProfile,
    Estimate,
    LinkEstimate,
    Plan,
    ServerProfile,
    choose,
    estimate,
    switch_threshold_ms,
    transfer_ms,
)
from shared.schemas import ModelMetadata, SplitPointBody

MODEL, FP = "efficientnet_lite0", "0123abcd"

# Payload sizes shaped like efficientnet_lite0's (illustrative): a JPEG of the crop, a huge early
# activation, a small mid-network one and a smaller late one.
PAYLOADS = {CLOUD: 18_000, "_blocks.1": 150_000, "_blocks.5": 2_000, "_blocks.12": 1_500}
SLOW_DEVICE = {
    DEVICE: (400.0, 0.0),
    CLOUD: (0.0, 3.0),
    "_blocks.1": (40.0, 6.0),
    "_blocks.5": (100.0, 2.0),
    "_blocks.12": (300.0, 1.0),
}
FAST_DEVICE = {
    DEVICE: (15.0, 0.0),
    CLOUD: (0.0, 1.0),
    "_blocks.1": (2.0, 2.0),
    "_blocks.5": (5.0, 0.5),
    "_blocks.12": (12.0, 0.3),
}
SERVER = ServerProfile.of(
    {CLOUD: 8.0, "_blocks.1": 7.0, "_blocks.5": 5.0, "_blocks.12": 1.5}, queue_ms=0.5
)
FAST_LINK = LinkEstimate(uplink_bps=100e6, rtt_ms=10.0)
SLOW_LINK = LinkEstimate(uplink_bps=0.5e6, rtt_ms=60.0)


def profile(timings: dict[str, tuple[float, float]]) -> DeviceProfile:
    costs = tuple(
        DeviceCost(name, head, encode, PAYLOADS.get(name, 0))
        for name, (head, encode) in timings.items()
    )
    return DeviceProfile(MODEL, FP, costs)


def total(plan: Plan, split: str) -> float:
    return plan.estimate(split).total_ms


# --- the latency terms -------------------------------------------------------------------------


def test_estimate_by_hand() -> None:
    # 4_650 B body + 350 B of headers = 40 kbit: 40 ms at 1 Mbit/s up;
    # 700 B of answer = 5.6 kbit: 0.7 ms at 8 Mbit/s down.
    cost = DeviceCost("_blocks.5", head_ms=10.0, encode_ms=2.0, payload_bytes=4_650)
    server = ServerProfile.of({"_blocks.5": 5.0}, queue_ms=3.0)
    link = LinkEstimate(uplink_bps=1e6, rtt_ms=50.0, downlink_bps=8e6)
    row = estimate(cost, server, link)
    assert (HTTP_OVERHEAD_BYTES, RESPONSE_BYTES) == (350, 700)
    assert row.transfer_ms == pytest.approx(40.7)
    assert row.server_ms == pytest.approx(8.0)  # decode + tail, plus the queue
    assert row.rtt_ms == 50.0
    assert row.total_ms == pytest.approx(10 + 2 + 50 + 40.7 + 5 + 3)  # 110.7


def test_downlink_defaults_to_uplink() -> None:
    # 700 B at 1 Mbit/s = 5.6 ms instead of 0.7 ms.
    assert transfer_ms(4_650, LinkEstimate(uplink_bps=1e6, rtt_ms=50.0)) == pytest.approx(45.6)


def test_device_candidate_costs_only_its_compute() -> None:
    row = estimate(DeviceCost(DEVICE, 123.0, 0.0, 0), ServerProfile(()), SLOW_LINK)
    assert row == Estimate(DEVICE, 123.0, 0.0, 0, 0.0, 0.0, 0.0, 123.0)


def test_estimate_of_a_candidate_the_service_lacks() -> None:
    with pytest.raises(UnknownSplitPointError):
        estimate(DeviceCost("_blocks.9", 1.0, 1.0, 100), SERVER, FAST_LINK)


# --- the choice ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "link", "expected"),
    [
        pytest.param(SLOW_DEVICE, FAST_LINK, CLOUD, id="slow-device-fast-link-cloud"),
        pytest.param(FAST_DEVICE, SLOW_LINK, DEVICE, id="fast-device-slow-link-device"),
        pytest.param(SLOW_DEVICE, SLOW_LINK, "_blocks.5", id="slow-both-small-activation"),
        pytest.param(FAST_DEVICE, FAST_LINK, DEVICE, id="fast-both-device"),
    ],
)
def test_choose_synthetic_profiles(
    device: dict[str, tuple[float, float]], link: LinkEstimate, expected: str
) -> None:
    plan = choose(profile(device), SERVER, link)
    assert plan.chosen == expected
    assert total(plan, expected) == min(e.total_ms for e in plan.candidates)


def test_slow_device_slow_link_numbers() -> None:
    plan = choose(profile(SLOW_DEVICE), SERVER, SLOW_LINK)
    down_ms = 700 * 8 / 0.5e6 * 1e3  # 11.2
    assert total(plan, DEVICE) == 400.0
    assert total(plan, CLOUD) == pytest.approx(3 + 60 + 18_350 * 8 / 0.5e6 * 1e3 + down_ms + 8.5)
    assert total(plan, "_blocks.5") == pytest.approx(100 + 2 + 60 + 37.6 + down_ms + 5.5)
    assert total(plan, "_blocks.5") == pytest.approx(216.3)


def test_candidate_order_and_offer() -> None:
    costs = (
        DeviceCost("_blocks.5", 1.0, 1.0, 100),
        DeviceCost("_blocks.12", 1.0, 1.0, 100),
        DeviceCost(CLOUD, 0.0, 1.0, 100),
        DeviceCost(DEVICE, 50.0, 0.0, 0),
        DeviceCost("_blocks.14", 1.0, 1.0, 100),  # the service has no figure for this one
    )
    device = DeviceProfile(MODEL, FP, costs)
    assert [c.split for c in device.costs] == [
        DEVICE,
        CLOUD,
        "_blocks.5",
        "_blocks.12",
        "_blocks.14",
    ]
    plan = choose(device, SERVER, FAST_LINK)
    assert [e.split for e in plan.candidates] == [DEVICE, CLOUD, "_blocks.5", "_blocks.12"]
    with pytest.raises(UnknownSplitPointError):
        plan.estimate("_blocks.14")


def test_only_device_when_the_service_offers_nothing() -> None:
    plan = choose(profile(SLOW_DEVICE), ServerProfile(()), FAST_LINK)
    assert plan.chosen == DEVICE
    assert [e.split for e in plan.candidates] == [DEVICE]


@pytest.mark.parametrize(
    "costs",
    [
        pytest.param((DeviceCost("a", 1.0, 1.0, 10), DeviceCost("b", 1.0, 1.0, 10)), id="splits"),
        pytest.param((DeviceCost(CLOUD, 0.0, 1.0, 10), DeviceCost("a", 0.0, 1.0, 10)), id="cloud"),
    ],
)
def test_ties_go_to_the_earliest(costs: tuple[DeviceCost, ...]) -> None:
    server = ServerProfile.of({CLOUD: 2.0, "a": 2.0, "b": 2.0})
    device = DeviceProfile(MODEL, FP, (DeviceCost(DEVICE, 1e6, 0.0, 0), *costs))
    assert choose(device, server, FAST_LINK).chosen == costs[0].split


def test_tie_between_device_and_cloud_goes_to_device() -> None:
    cloud = DeviceCost(CLOUD, 0.0, 1.0, 10)
    tied_ms = estimate(cloud, SERVER, FAST_LINK).total_ms
    device = DeviceProfile(MODEL, FP, (cloud, DeviceCost(DEVICE, tied_ms, 0.0, 0)))
    assert choose(device, SERVER, FAST_LINK).chosen == DEVICE


# A link where cloud costs 1.05 ms of transfer (1_050 B at 8 Mbit/s) and no RTT, so the cloud
# total is server_ms + 1.05.
FLAT_LINK = LinkEstimate(uplink_bps=8e6, rtt_ms=0.0)


@pytest.mark.parametrize(
    ("device_ms", "cloud_total_ms", "expected"),
    [
        pytest.param(100.0, 95.0, DEVICE, id="5ms-gain-under-10pct-keeps"),
        pytest.param(100.0, 89.0, CLOUD, id="11ms-gain-over-10pct-switches"),
        pytest.param(5.0, 4.2, DEVICE, id="0.8ms-gain-under-min-gain-keeps"),
        pytest.param(5.0, 3.8, CLOUD, id="1.2ms-gain-over-min-gain-switches"),
    ],
)
def test_hysteresis(device_ms: float, cloud_total_ms: float, expected: str) -> None:
    device = DeviceProfile(
        MODEL, FP, (DeviceCost(DEVICE, device_ms, 0.0, 0), DeviceCost(CLOUD, 0.0, 0.0, 0))
    )
    server = ServerProfile.of({CLOUD: cloud_total_ms - 1.05})
    assert total(choose(device, server, FLAT_LINK), CLOUD) == pytest.approx(cloud_total_ms)
    assert choose(device, server, FLAT_LINK, current=DEVICE).chosen == expected
    assert choose(device, server, FLAT_LINK).chosen == CLOUD  # without a current: plain argmin


@pytest.mark.parametrize("current", [None, "_blocks.99", "_blocks.1"], ids=str)
def test_hysteresis_ignores_a_current_not_offered(current: str | None) -> None:
    server = ServerProfile.of({CLOUD: 8.0, "_blocks.5": 5.0})
    assert choose(profile(SLOW_DEVICE), server, SLOW_LINK, current=current).chosen == "_blocks.5"


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: DeviceCost("", 1.0, 1.0, 1), id="empty-name"),
        pytest.param(lambda: DeviceCost("a", -1.0, 1.0, 1), id="negative-ms"),
        pytest.param(lambda: DeviceCost("a", math.nan, 1.0, 1), id="nan-ms"),
        pytest.param(lambda: DeviceCost("a", 1.0, math.inf, 1), id="inf-ms"),
        pytest.param(lambda: DeviceCost("a", 1.0, 1.0, True), id="bool-bytes"),
        pytest.param(lambda: DeviceCost("a", 1.0, 1.0, 1.5), id="float-bytes"),
        pytest.param(lambda: DeviceCost(DEVICE, 1.0, 0.0, 10), id="device-sends"),
        pytest.param(lambda: DeviceProfile(MODEL, FP, ()), id="no-device"),
        pytest.param(
            lambda: DeviceProfile(MODEL, FP, (DeviceCost(DEVICE, 1.0, 0.0, 0),) * 2), id="dup"
        ),
        pytest.param(lambda: ServerProfile.of({DEVICE: 1.0}), id="server-offers-device"),
        pytest.param(lambda: ServerProfile.of({CLOUD: -1.0}), id="server-negative"),
        pytest.param(lambda: ServerProfile((("a", 1.0), ("a", 2.0))), id="server-dup"),
        pytest.param(lambda: ServerProfile((), queue_ms=math.nan), id="queue-nan"),
        pytest.param(lambda: LinkEstimate(uplink_bps=0.0, rtt_ms=1.0), id="zero-uplink"),
        pytest.param(lambda: LinkEstimate(uplink_bps=math.inf, rtt_ms=1.0), id="inf-uplink"),
        pytest.param(lambda: LinkEstimate(1e6, 1.0, downlink_bps=-1.0), id="neg-downlink"),
        pytest.param(lambda: LinkEstimate(uplink_bps=1e6, rtt_ms=-1.0), id="negative-rtt"),
        pytest.param(lambda: LinkEstimate(1e6, 1.0, source="guess"), id="bad-source"),
        pytest.param(lambda: Plan("x", (Estimate("a", 0, 0, 0, 0, 0, 0, 0),)), id="chosen"),
        pytest.param(
            lambda: choose(profile(FAST_DEVICE), SERVER, FAST_LINK, hysteresis=-0.1),
            id="negative-hysteresis",
        ),
    ],
)
def test_invalid_values_raise_value_error(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_lookups_raise_unknown_split_point() -> None:
    with pytest.raises(UnknownSplitPointError):
        profile(SLOW_DEVICE).cost("_blocks.99")
    with pytest.raises(LookupError):  # UnknownSplitPointError is a LookupError too
        choose(profile(SLOW_DEVICE), SERVER, FAST_LINK).estimate("_blocks.99")


def test_values_are_frozen_and_hashable() -> None:
    plan = choose(profile(SLOW_DEVICE), SERVER, SLOW_LINK)
    assert hash(plan) == hash(choose(profile(SLOW_DEVICE), SERVER, SLOW_LINK))
    assert hash(SERVER) == hash(ServerProfile(tuple(reversed(SERVER.server_ms)), 0.5))
    with pytest.raises(AttributeError):
        plan.chosen = DEVICE  # type: ignore[misc]


def test_to_json() -> None:
    plan = choose(profile(SLOW_DEVICE), SERVER, SLOW_LINK)
    doc = json.loads(json.dumps(plan.to_json()))
    assert doc["chosen"] == "_blocks.5"
    assert [row["split"] for row in doc["candidates"]] == [e.split for e in plan.candidates]
    assert list(doc["candidates"][3]) == [
        "split",
        "head_ms",
        "encode_ms",
        "payload_bytes",
        "transfer_ms",
        "rtt_ms",
        "server_ms",
        "total_ms",
    ]
    assert doc["candidates"][3]["split"] == "_blocks.5"
    assert doc["candidates"][3]["total_ms"] == pytest.approx(216.3)


# --- server metadata -----------------------------------------------------------------------------


def metadata(**overrides: Any) -> dict[str, Any]:
    """What the service's GET /v2/models/{model} answers, through its own response schema."""
    points = [
        SplitPointBody(name=name, index=i, tensors=[], float32_bytes=4, server_ms=ms)
        for i, (name, ms) in enumerate(
            [("_blocks.1", 7.0), ("_blocks.5", 5.0), ("_blocks.12", None)]
        )
    ]
    body = ModelMetadata(
        name=MODEL,
        versions=[FP],
        platform="pytorch_torchfx",
        inputs=[],
        outputs=[],
        fingerprint=FP,
        preprocessing={},
        server_ms=8.0,
        queue_ms=0.5,
        split_points=points,
    )
    return {**json.loads(body.model_dump_json()), **overrides}


def test_from_metadata() -> None:
    server = ServerProfile.from_metadata(metadata())
    assert server == ServerProfile.of(
        {CLOUD: 8.0, "_blocks.1": 7.0, "_blocks.5": 5.0}, queue_ms=0.5
    )
    assert server.ms("_blocks.12") is None  # not profiled: not offered


def test_from_metadata_missing_figures() -> None:
    server = ServerProfile.from_metadata(metadata(server_ms=None), missing_ms=20.0)
    assert (server.ms(CLOUD), server.ms("_blocks.12"), server.ms("_blocks.5")) == (20, 20, 5)
    assert ServerProfile.from_metadata(metadata(server_ms=None)).ms(CLOUD) is None


@pytest.mark.parametrize(
    "meta",
    [
        pytest.param([], id="not-an-object"),
        pytest.param({"server_ms": 8.0}, id="no-split-points"),
        pytest.param(metadata(split_points={}), id="split-points-not-a-list"),
        pytest.param(metadata(split_points=[3]), id="point-not-an-object"),
        pytest.param(metadata(split_points=[{"server_ms": 1.0}]), id="point-no-name"),
        pytest.param(metadata(split_points=[{"name": DEVICE}]), id="point-named-device"),
        pytest.param(metadata(split_points=[{"name": "a"}, {"name": "a"}]), id="duplicate"),
        pytest.param(metadata(split_points=[{"name": "a", "server_ms": "1"}]), id="str-ms"),
        pytest.param(metadata(server_ms=-1.0), id="negative"),
        pytest.param(metadata(server_ms=math.nan), id="nan"),
        pytest.param(metadata(server_ms=True), id="bool"),
        pytest.param(metadata(queue_ms="0.5"), id="queue-str"),
    ],
)
def test_from_metadata_rejects_bad_metadata(meta: Any) -> None:
    with pytest.raises(ServiceError):
        ServerProfile.from_metadata(meta)


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(server_ms=JSON, queue_ms=JSON, points=st.lists(JSON, max_size=4))
def test_from_metadata_garbage_is_a_service_error(
    server_ms: Any, queue_ms: Any, points: list[Any]
) -> None:
    meta = metadata(server_ms=server_ms, queue_ms=queue_ms, split_points=points)
    try:
        ServerProfile.from_metadata(meta)
    except ServiceError:
        pass


# --- properties ----------------------------------------------------------------------------------

MS = st.floats(0.0, 1_000.0)
NAMES = ("_blocks.1", "_blocks.5", "_blocks.9", "_blocks.12")


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[DeviceProfile, ServerProfile, LinkEstimate]:
    costs = [DeviceCost(DEVICE, draw(MS), 0.0, 0)]
    offered = {}
    for name in (CLOUD, *NAMES):
        if draw(st.booleans()):
            costs.append(DeviceCost(name, draw(MS), draw(MS), draw(st.integers(0, 10**6))))
        if draw(st.booleans()):
            offered[name] = draw(MS)
    link = LinkEstimate(
        uplink_bps=draw(st.floats(1e4, 1e10)),
        rtt_ms=draw(MS),
        downlink_bps=draw(st.none() | st.floats(1e4, 1e10)),
    )
    server = ServerProfile.of(offered, queue_ms=draw(st.floats(0.0, 100.0)))
    return DeviceProfile(MODEL, FP, tuple(costs)), server, link


@given(scenarios())
def test_totals_are_sums_of_their_terms(scenario: Any) -> None:
    device, server, link = scenario
    for row in choose(device, server, link).candidates:
        terms = row.head_ms + row.encode_ms + row.rtt_ms + row.transfer_ms + row.server_ms
        assert row.total_ms == pytest.approx(terms, rel=1e-12)
        assert row.transfer_ms == (
            transfer_ms(row.payload_bytes, link) if row.split != DEVICE else 0.0
        )


@given(scenarios())
def test_choose_is_the_first_argmin_over_offered(scenario: Any) -> None:
    device, server, link = scenario
    plan = choose(device, server, link)
    offered = [c.split for c in device.costs if c.split == DEVICE or server.ms(c.split) is not None]
    assert [e.split for e in plan.candidates] == offered
    totals = [e.total_ms for e in plan.candidates]
    assert plan.chosen == plan.candidates[totals.index(min(totals))].split


@given(scenarios(), st.sampled_from((None, DEVICE, CLOUD, *NAMES)), st.floats(0.0, 1.0), MS)
def test_hysteresis_never_keeps_a_candidate_worse_than_the_threshold(
    scenario: Any, current: str | None, hysteresis: float, min_gain_ms: float
) -> None:
    device, server, link = scenario
    plan = choose(
        device, server, link, current=current, hysteresis=hysteresis, min_gain_ms=min_gain_ms
    )
    best_ms = min(e.total_ms for e in plan.candidates)
    chosen_ms = total(plan, plan.chosen)
    if plan.chosen == current:
        assert chosen_ms - best_ms <= switch_threshold_ms(chosen_ms, hysteresis, min_gain_ms)
    else:
        assert chosen_ms == best_ms
        if current in {e.split for e in plan.candidates}:
            current_ms = total(plan, current)
            assert current_ms - best_ms > switch_threshold_ms(current_ms, hysteresis, min_gain_ms)
