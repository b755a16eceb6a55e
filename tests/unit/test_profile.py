"""The device profile: every candidate measured once, cached by what it depends on."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from device_client.plan_cmd import run_profile
from device_client.profile import FORMAT, ProfileKey, load_or_measure, measure, measure_candidate
from device_client.runtime import DeviceRuntime, EncodeOptions
from shared.planner import CLOUD, DEVICE, DeviceProfile


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_profile_covers_every_candidate_and_is_cached(
    cache: Path, device_runtime: DeviceRuntime
) -> None:
    options = EncodeOptions()
    seen: list[str] = []
    profile, path, measured = load_or_measure(
        device_runtime, options=options, repeats=1, progress=seen.append
    )
    assert measured and path.parent == cache and path.exists()
    names = [c.split for c in profile.costs]
    assert names == [DEVICE, CLOUD, *(p.name for p in device_runtime.points)]
    assert seen == names
    assert profile.cost(DEVICE).payload_bytes == 0 and profile.cost(DEVICE).head_ms > 0
    assert profile.cost(CLOUD).head_ms == 0 and profile.cost(CLOUD).payload_bytes > 1000
    for point in device_runtime.points:
        cost = profile.cost(point.name)
        assert cost.head_ms > 0 and cost.encode_ms > 0
        assert 0 < cost.payload_bytes < point.float32_bytes

    again, path2, measured2 = load_or_measure(device_runtime, options=options, progress=seen.append)
    assert not measured2 and path2 == path and again == profile
    # Another key (zstd level) is another file, measured afresh.
    _, path3, measured3 = load_or_measure(
        device_runtime, options=EncodeOptions(zstd_level=1), repeats=1
    )
    assert measured3 and path3 != path


def test_corrupt_or_foreign_cache_is_measured_again(
    cache: Path, device_runtime: DeviceRuntime
) -> None:
    options = EncodeOptions()
    key = ProfileKey.current(device_runtime, options, 90)
    path = cache / key.filename()
    path.write_text("{not json")
    _, _, measured = load_or_measure(device_runtime, options=options, repeats=1)
    assert measured
    doc = json.loads(path.read_text())
    doc["key"]["cpu"] = "some other CPU"
    path.write_text(json.dumps(doc))
    _, _, measured = load_or_measure(device_runtime, options=options, repeats=1)
    assert measured


def test_profile_key_changes_with_what_it_depends_on(device_runtime: DeviceRuntime) -> None:
    base = ProfileKey.current(device_runtime, EncodeOptions(), 90)
    assert base.model == "efficientnet_lite0" and base.fingerprint == device_runtime.fingerprint
    assert base.runtime == "torch" and base.precision == "fp32" and base.runtime_version
    assert base.threads >= 1 and base.cpu
    other = ProfileKey.current(device_runtime, EncodeOptions(granularity="channel"), 90)
    assert other.filename() != base.filename()
    assert ProfileKey.current(device_runtime, EncodeOptions(), 80).filename() != base.filename()


def _heads(profile: DeviceProfile) -> list[float]:
    return [c.head_ms for c in profile.costs if c.split not in (DEVICE, CLOUD)]


def test_two_real_profiles_are_each_monotone_and_within_the_whole_model(
    device_runtime: DeviceRuntime,
) -> None:
    # Timing agreement is the benchmark's to show; what must hold on any machine is the shape.
    for _ in range(2):
        profile = measure(device_runtime, options=EncodeOptions(), repeats=2)
        heads, whole_ms = _heads(profile), profile.cost(DEVICE).head_ms
        assert len(heads) == len(device_runtime.points) and whole_ms > 0
        assert all(a <= b for a, b in zip(heads, heads[1:], strict=False))
        assert all(0 < ms <= whole_ms for ms in heads)


def test_one_candidate_is_measured_again_with_the_whole_model_as_its_cap(
    device_runtime: DeviceRuntime,
) -> None:
    point = device_runtime.middle_point()
    cost = measure_candidate(device_runtime, point.name, options=EncodeOptions(), repeats=1)
    assert cost.split == point.name and cost.head_ms > 0 and cost.encode_ms > 0
    assert cost.payload_bytes > 0
    assert measure_candidate(device_runtime, DEVICE, options=EncodeOptions(),
                             repeats=1).head_ms > 0


def test_a_profile_of_an_older_format_is_ignored_and_measured_again(
    cache: Path, device_runtime: DeviceRuntime
) -> None:
    options = EncodeOptions()
    key = ProfileKey.current(device_runtime, options, 90)
    path = cache / key.filename()
    costs = [{"split": DEVICE, "head_ms": 213.0, "encode_ms": 0.0, "payload_bytes": 0}]
    path.write_text(json.dumps({"format": FORMAT - 1, "key": asdict(key), "costs": costs}))
    profile, _, measured = load_or_measure(device_runtime, options=options, repeats=1)
    assert measured and len(profile.costs) == len(device_runtime.points) + 2
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["key"]["runtime"] == "torch"
    assert doc["key"]["precision"] == "fp32" and doc["key"]["threads"] >= 1
    _, _, measured = load_or_measure(device_runtime, options=options)
    assert not measured  # the fresh one is trusted


def test_profile_json_keeps_its_keys_and_names_the_runtime(
    cache: Path, device_runtime: DeviceRuntime, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(jpeg_quality=90, repeats=1, force=False, json=True)
    assert run_profile(args, device_runtime, EncodeOptions()) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"model", "fingerprint", "cache", "measured_now", "costs"} <= set(doc)
    assert doc["runtime"] == "torch" and doc["precision"] == "fp32" and doc["threads"] >= 1
