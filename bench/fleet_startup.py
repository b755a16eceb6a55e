"""What a device's start-up costs a deployment: ``AutoSplit``'s metadata fetch and its link
probe's uploads, timed one at a time with the product's client on the idle service, before the
fleet's runs against it.

    costs = asyncio.run(startup_ms(url, "efficientnet_lite0"))
    # {"metadata_ms": 2.4, "probe_small_ms": 1.5, "probe_large_ms": 1.6, "requests": 30,
    #  "server_ms": {"cloud": 14.2, "_blocks.9": 6.1, ...}}

The fleet simulation charges them to a replica's event loop for each simulated device's
start-up (``bench.fleet_sim_engine``), where they queue like requests: 32 devices starting
within a second put 160 such requests on the service. Behind Ray Serve's proxy a probe upload
took 13.5-18 ms on its own against uvicorn's 1.6-3.2 ms (this machine, ``bench fleet``'s runs),
and 32 devices' start-ups read their links as hundreds of ms slow there (the first photo of a
LAN device 0.3-0.8 s late against uvicorn's 0.06), so every device planned ``device``; a
probe costed as half an inference request's overhead (the older ``PROBE_SHARE`` guess, still
used for a ``fleet.json`` without these figures) read them as fast and sent a third of the
photos to ``cloud``. The whole serial round trip is charged: on an idle deployment all of it
is some process's work on the path (client, proxy, replica), an upper bound on the replica's
own share.

It also keeps what the idle service publishes (the metadata's ``server_ms`` per candidate: its
start-up profile, before any answer moved it), which the simulated replicas publish until
their own answers move it: a profile built from the runs' answers instead, where one
replica's batch-1 passes at 32 devices took 2-3x an idle one's, kept a single simulated device
on ``device`` while the measured one sent every photo to ``cloud``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from bench.fleet_sim_inputs import STARTUP_KEYS
from device_client.client import ServiceClient
from device_client.link import PROBE_LARGE_BYTES, PROBE_SMALL_BYTES
from shared.candidates import CLOUD

__all__ = ["WARMUP", "startup_ms"]

WARMUP = 5  # untimed rounds first: connections, the proxy's routes, the replicas' first calls


async def startup_ms(url: str, model: str, *, requests: int = 30) -> dict[str, Any]:
    """Median round trip of the metadata fetch and of each probe upload size, ``requests``
    timed rounds (after ``WARMUP``), one request at a time."""
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    times: dict[str, list[float]] = {k: [] for k in STARTUP_KEYS}
    async with ServiceClient(url) as client:
        for i in range(WARMUP + requests):
            started = time.perf_counter()
            meta = await client.metadata(model)
            metadata_ms = (time.perf_counter() - started) * 1e3
            # random bytes, as device_client.link.probe sends
            small_ms, _ = await client.probe(model, os.urandom(PROBE_SMALL_BYTES))
            large_ms, _ = await client.probe(model, os.urandom(PROBE_LARGE_BYTES))
            if i >= WARMUP:
                times["metadata_ms"].append(metadata_ms)
                times["probe_small_ms"].append(small_ms)
                times["probe_large_ms"].append(large_ms)
    # what the idle service publishes before any answer moved it: its start-up profile
    server_ms = {p.name: p.server_ms for p in meta.split_points if p.server_ms is not None}
    if meta.server_ms is not None:
        server_ms[CLOUD] = meta.server_ms
    return {**{k: round(statistics.median(v), 3) for k, v in times.items()},
            "requests": requests, "server_ms": server_ms}
