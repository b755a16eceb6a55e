"""Faults over real sockets, each with its figure: the service killed in the middle of a run and
restarted on the same port, a connection that never answers, overload, and the infer CLI
against services that fail in every way."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from device_client.runtime import DeviceRuntime
from tests.support import figures, sizes
from tests.support.faults import (
    cli_against_all,
    kill_and_restart,
    overload,
    stalled_connection,
)

pytestmark = pytest.mark.slow


def test_killed_mid_run_then_restarted(
    device_runtime: DeviceRuntime, photos: dict[str, Image.Image], local_top1: dict[str, int]
) -> None:
    report = kill_and_restart(device_runtime, photos, local_top1, requests=30, kill_at=10)
    figures.record("faults", "killed", ok=report.ok, **sizes.flat(asdict(report)))
    # All 30 came back, each with the top-1 of unsplit local inference.
    assert report.results == report.requests == 30
    assert report.top1_matches == 30, report
    # Before the kill the service answered; from the request in flight on, the device did.
    assert report.split_before == 10, report
    assert report.fell_back == 20, report
    assert set(report.reasons) <= {"connection", "circuit_open", "timeout"}, report
    assert report.reasons.get("circuit_open", 0) >= 10, report  # the breaker stopped the waiting
    # Then back to split inference, within the breaker's longest cool-down (4 s) plus slack.
    assert report.back_after_requests >= 1
    assert report.back_after_s <= 8.0, report


def test_stalled_connection_is_bounded_by_the_deadline(
    device_runtime: DeviceRuntime, photos: dict[str, Image.Image], local_top1: dict[str, int]
) -> None:
    report = stalled_connection(
        device_runtime, photos["coffee"], local_top1["coffee"], deadline_s=1.0
    )
    figures.record("faults", "stall", ok=report.ok, **sizes.flat(asdict(report)))
    assert report.ran == "device" and report.reason == "deadline", report
    assert report.top1_ok
    assert 1000 <= report.wall_ms <= report.bound_ms, report  # deadline + local compute + 0.5 s


def test_overload_gives_200_or_fast_503_and_devices_fall_back(
    device_runtime: DeviceRuntime, photos: dict[str, Image.Image], local_top1: dict[str, int]
) -> None:
    report = overload(device_runtime, photos, local_top1, clients=24, rounds=3)
    figures.record("faults", "overload", ok=report.ok, **sizes.flat(asdict(report)))
    assert report.timeouts == 0 and not report.other, report
    assert report.ok_200 > 0 and report.fast_503 > 0, report
    assert report.ok_200 + report.fast_503 == report.requests
    assert report.max_503_ms < 2000, report  # a fast no, not a wait
    assert report.ready_after
    # Devices under the same overload: every image answered, right, most of them locally.
    assert report.device_results == report.device_requests == report.device_top1_ok, report
    assert report.device_fell_back >= 1, report
    assert set(report.device_reasons) <= {"overloaded", "circuit_open"}, report


def test_cli_never_shows_a_traceback(
    tmp_path: Path, photos: dict[str, Image.Image], local_top1: dict[str, int]
) -> None:
    """Every broken service, with and without --no-fallback: a JSON result that ran on the
    device, or exactly one error line and exit 1; never a traceback."""
    image = tmp_path / "coffee.jpg"
    photos["coffee"].save(image, quality=95)
    outcomes = cli_against_all(image, local_top1["coffee"], workers=3)
    for o in outcomes:
        doc = sizes.flat(o.to_json())
        del doc["stdout"], doc["stderr"]
        figures.record("faults_cli", o.behaviour, **doc)
    broken = {(o.behaviour, o.fallback): (o.problems, o.stderr[-300:]) for o in outcomes
              if o.problems}  # fmt: skip
    assert not broken, broken
    fell_back = {o.behaviour: o.reason for o in outcomes if o.fallback and o.ran}
    assert fell_back["stall"] == "deadline" and fell_back["503"] == "overloaded"
    assert fell_back["garbage 200"] == "bad_response" and fell_back["dead"] == "connection"
