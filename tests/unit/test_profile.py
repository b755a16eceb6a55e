"""The device profile: every candidate measured once, cached by what it depends on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_client.profile import ProfileKey, load_or_measure
from device_client.runtime import DeviceRuntime, EncodeOptions
from shared.planner import CLOUD, DEVICE


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
    assert base.torch_version and base.threads >= 1 and base.cpu
    other = ProfileKey.current(device_runtime, EncodeOptions(granularity="channel"), 90)
    assert other.filename() != base.filename()
    assert ProfileKey.current(device_runtime, EncodeOptions(), 80).filename() != base.filename()
