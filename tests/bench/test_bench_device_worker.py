"""The latency benchmark's device worker runs what the device CLI defaults to (ONNX Runtime fp32)
and keeps its JSON-lines protocol: ``loaded``, ``profile`` and ``quit`` as before, plus
``runtime``, ``precision`` and ``threads``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.export import export_bundle


@pytest.fixture(scope="module")
def lite0_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle("efficientnet_lite0", tmp_path_factory.mktemp("lite0"))


def _talk(args: list[str], commands: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPLITSERVE_CACHE_DIR": str(tmp_path)}
    stdin = "".join(json.dumps(c) + "\n" for c in commands)
    done = subprocess.run([sys.executable, "-m", "bench.device_worker", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=600, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_worker_profiles_on_onnx_fp32_by_default(lite0_bundle: Path, tmp_path: Path) -> None:
    # No service: a local bundle, and `profile` needs none (port 9 answers nothing).
    events = _talk(["--url", "http://127.0.0.1:9", "--bundle", str(lite0_bundle), "--crops", "0",
                    "--repeats", "2"], [{"cmd": "profile"}, {"cmd": "quit"}], tmp_path)
    loaded, profile, bye = events
    assert loaded["event"] == "loaded" and len(loaded["points"]) == 25
    for event in (loaded, profile):
        assert (event["runtime"], event["precision"], event["threads"]) == ("onnx", "fp32", 1)
        assert event["torch_threads"] == 1  # the key older readers (bench fleet) take
    assert profile["event"] == "profile" and bye == {"event": "bye"}
    costs = {c["split"]: c for c in profile["costs"]}
    assert set(costs) == {"device", "cloud", *loaded["points"]}
    heads = [costs[p]["head_ms"] for p in loaded["points"]]
    assert heads == sorted(heads) and heads[-1] <= costs["device"]["head_ms"]  # monotone


def test_a_bad_runtime_combination_is_one_error_line(lite0_bundle: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SPLITSERVE_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "bench.device_worker", "--url",
                           "http://127.0.0.1:9", "--bundle", str(lite0_bundle), "--precision",
                           "int8"], input="", capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode != 0 and "int8" in done.stderr
