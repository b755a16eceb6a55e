"""The metadata's per-candidate ``server_ms`` over a real socket: what the candidates being sent
cost now moves the figures of the candidates nobody sends (cloud_server/costs.py).
``bench fleet`` saw the opposite: the sent candidates' figures live and slow, the rest frozen at
a quiet start-up, and auto devices on a LAN pulled onto ``_bn0`` and ``_relu0``."""

from __future__ import annotations

import httpx

from device_client.local_service import LocalService
from device_client.runtime import DeviceRuntime
from shared import wire
from shared.planner import CLOUD
from tests.helpers import make_frame

MODEL = "efficientnet_lite0"
SENT = "_blocks.9"


def _figures(http: httpx.Client, url: str) -> dict[str, float]:
    meta = http.get(f"{url}/v2/models/{MODEL}").json()
    return {CLOUD: meta["server_ms"], **{p["name"]: p["server_ms"] for p in meta["split_points"]}}


def test_unsent_candidates_follow_what_the_sent_one_costs_now(
        device_runtime: DeviceRuntime) -> None:
    frame = make_frame(device_runtime, SENT)
    env = {"SPLITSERVE_PROFILE_REPEATS": "1"}
    with LocalService(models=[MODEL], env=env) as service, httpx.Client(timeout=60) as http:
        profiled = _figures(http, service.url)
        assert _figures(http, service.url) == profiled  # no answers yet: the start-up profile
        costs = []
        for _ in range(12):  # one at a time: every answer is a lone request's cost
            answer = http.post(f"{service.url}/v2/models/{MODEL}/splits/{SENT}/infer",
                               content=frame, headers={"Content-Type": wire.CONTENT_TYPE}).json()
            assert answer["batch_size"] == 1
            costs.append(answer["timings_ms"]["decode"] + answer["timings_ms"]["compute"])
        now = _figures(http, service.url)
    assert set(now) == set(profiled) and all(0 < ms < 1e5 for ms in now.values())
    # The sent candidate publishes what its answers cost (their running mean) ...
    assert min(costs) * 0.99 <= now[SENT] <= max(costs) * 1.01, (now[SENT], costs)
    # ... and none of the others stays at a start-up figure the answers say nothing about any
    # more: they move with the service's live speed and decode wait (before, they stayed put).
    moved = [name for name in now if name != SENT and now[name] != profiled[name]]
    assert len(moved) == len(now) - 1, sorted(set(now) - set(moved))
