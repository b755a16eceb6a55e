"""Fleet inputs when there is no ``fleet.json`` yet, from the repository's own measurements.

``bench fleet``'s candidates and defaults. Device heads and payloads: the device profile the
latency benchmark measured under its board-class CPU limit (``bench/results/latency.json``);
links: ``bench.netem.PROFILES``; batching: the service's defaults; the per-request HTTP CPU:
``bench/results/service.json``'s single-client run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.netem import PROFILES
from shared.candidates import CLOUD, DEVICE
from shared.errors import ConfigError

__all__ = ["PERIOD_MS", "default_inputs_doc", "http_cpu_ms"]

RESULTS = Path(__file__).resolve().parent / "results"
PERIOD_MS = 1000.0  # bench fleet's default (--period-ms): one photo a second per device
DURATION_S = 10.0  # bench fleet's defaults: 4 s warm-up, 10 s measured, 10 s deadline
WARMUP_S = 4.0
TIMEOUT_S = 10.0
NAMED_SPLITS = {"early": "_blocks.3", "middle": "_blocks.9", "late": "_blocks.15"}
LINK_MIX = ("lan", "wifi", "lte", "3g")  # bench fleet's: device i on LINK_MIX[i % 4]
BATCH_MAX = 16  # SPLITSERVE_MAX_BATCH_SIZE's default
BATCH_WAIT_MS = 2.0  # SPLITSERVE_MAX_QUEUE_DELAY_MS's default
RESPONSE_BYTES = 700.0  # shared.planner.RESPONSE_BYTES


def default_inputs_doc(latency_json: Path = RESULTS / "latency.json") -> dict[str, Any]:
    """``fleet.json``-shaped ``inputs`` (without ``service_ms``) from the latency results."""
    try:
        costs = json.loads(latency_json.read_text())["device_profile"]["costs"]
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"no device profile in {latency_json}: {exc}") from exc
    head = {c["split"]: float(c["head_ms"]) + float(c["encode_ms"]) for c in costs}
    payload = {c["split"]: float(c["payload_bytes"]) for c in costs}
    named = dict(NAMED_SPLITS)
    keep = [DEVICE, CLOUD, *named.values()]
    if any(k not in head for k in keep):
        raise ConfigError(f"{latency_json} does not profile every one of {keep}")
    return {
        "model": "efficientnet_lite0",
        "period_ms": PERIOD_MS,
        "duration_s": DURATION_S,
        "warmup_s": WARMUP_S,
        "timeout_s": TIMEOUT_S,
        "link_mix": list(LINK_MIX),
        "links": {n: {"rtt_ms": s.rtt_ms, "up_bps": s.uplink_bps, "down_bps": s.downlink_bps}
                  for n, s in PROFILES.items()},
        "head_ms": {k: head[k] for k in keep},
        "tail_ms": {k: max(0.0, head[DEVICE] - (0.0 if k == CLOUD else head[k]))
                    for k in keep if k != DEVICE},
        "request_bytes": {k: payload[k] for k in keep},
        "response_bytes": RESPONSE_BYTES,
        "split_points": named,
        "service": {"batch_max": BATCH_MAX, "batch_wait_ms": BATCH_WAIT_MS, "threads": 1},
    }


def http_cpu_ms(service_json: Path = RESULTS / "service.json") -> float:
    """The service's CPU per request outside decode and compute (the HTTP exchange, the JSON
    answer), from ``bench service``'s one-client run: its CPU per answer less the compute per
    row and the decode the service reported (2.0 ms in the committed results)."""
    try:
        runs = json.loads(service_json.read_text())["runs"]
        one = min(runs, key=lambda r: r["concurrency"])
        parts = one["server_ms"]
        rows = float(one.get("mean_batch_size") or 1.0)
        return max(0.0, float(one["service_cpu_ms_per_answer"]) - float(parts["compute"]) / rows
                   - float(parts["decode"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"no single-client run in {service_json}: {exc}") from exc
