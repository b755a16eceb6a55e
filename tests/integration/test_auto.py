"""``--split auto`` end to end over loopback: the planner picks, the device follows, and the
link estimator learns from the traffic."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from device_client.auto import AutoSplit
from device_client.client import ServiceClient
from device_client.local_service import LocalService
from device_client.pipeline import Device
from device_client.profile import load_or_measure
from device_client.runtime import DeviceRuntime, EncodeOptions


def test_auto_plans_runs_and_learns(
    live_service: LocalService,
    device_runtime: DeviceRuntime,
    photos: dict[str, Image.Image],
    local_top1: dict[str, int],
    tmp_path: Path,
    monkeypatch: object,
) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path))  # type: ignore[attr-defined]
    profile, _, _ = load_or_measure(device_runtime, options=EncodeOptions(), repeats=1)

    async def run() -> tuple[list[object], AutoSplit]:
        async with ServiceClient(live_service.url) as client:
            auto = AutoSplit(client, profile)
            device = Device(device_runtime, client, auto=auto, fallback=False)
            results = [
                await device.infer(image, split="auto", name=name) for name, image in photos.items()
            ]
            return results, auto

    results, auto = asyncio.run(run())
    plan = auto.last_plan
    assert plan is not None
    offered = {e.split for e in plan.candidates}
    assert {"device", "cloud"} <= offered and len(offered) == len(device_runtime.points) + 2
    assert (
        plan.estimate(plan.chosen).total_ms == min(e.total_ms for e in plan.candidates)
        or auto.current == plan.chosen
    )  # the argmin, or kept by hysteresis
    link = auto.estimator.estimate()
    assert link is not None and link.uplink_bps > 1e6 and link.rtt_ms < 50  # loopback
    for result, name in zip(results, photos, strict=True):
        assert result.requested == "auto"  # type: ignore[attr-defined]
        assert result.split in offered and result.predicted_ms is not None  # type: ignore[attr-defined]
        assert result.top5[0].index == local_top1[name]  # type: ignore[attr-defined]


def test_plan_cli_json_and_chart(
    live_service: LocalService, tmp_path: Path, device_runtime: DeviceRuntime
) -> None:
    env_cache = {"SPLITSERVE_CACHE_DIR": str(tmp_path / "cache")}
    chart = tmp_path / "plan.png"
    import os

    slow = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_client",
            "plan",
            "--runtime",
            "torch",
            "--server",
            live_service.url,
            "--bandwidth-mbps",
            "0.01",
            "--rtt-ms",
            "2000",
            "--json",
            "--chart",
            str(chart),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env_cache},
        timeout=600,
    )
    assert slow.returncode == 0, slow.stderr
    doc = json.loads(slow.stdout)
    names = [c["split"] for c in doc["candidates"]]
    assert names[:2] == ["device", "cloud"] and len(names) == len(device_runtime.points) + 2
    for c in doc["candidates"]:
        assert set(c) >= {
            "split",
            "head_ms",
            "encode_ms",
            "payload_bytes",
            "transfer_ms",
            "rtt_ms",
            "server_ms",
            "total_ms",
        }
    # 10 kbit/s and 2 s: every remote candidate costs seconds; running locally wins.
    assert doc["chosen"] == "device"
    assert chart.stat().st_size > 10_000 and chart.read_bytes()[:4] == b"\x89PNG"

    measured = subprocess.run(
        [sys.executable, "-m", "device_client", "plan", "--runtime", "torch", "--server",
         live_service.url],
        capture_output=True,
        text=True,
        env={**os.environ, **env_cache},
        timeout=600,
    )
    assert measured.returncode == 0, measured.stderr
    assert "measured" in measured.stdout and "*" in measured.stdout
