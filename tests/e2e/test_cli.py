"""The command line as a user runs it: real processes, real files, real service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from device_client.local_service import LocalService, free_port
from device_client.runtime import DeviceRuntime


def cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_client", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture(scope="module")
def photo_files(
    photos: dict[str, Image.Image], tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, image in photos.items():
        path = folder / f"{name}.jpg"
        image.save(path, quality=95)
        paths.append(path)
    return paths


def _json_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_infer_json_split_matches_device(
    live_service: LocalService, photo_files: list[Path], device_runtime: DeviceRuntime
) -> None:
    split = device_runtime.middle_point().name
    files = [str(p) for p in photo_files]
    remote = cli(
        "infer",
        *files,
        "--server",
        live_service.url,
        "--model",
        "efficientnet_lite0",
        "--split",
        split,
        "--json",
    )
    assert remote.returncode == 0, remote.stderr
    local = cli("infer", *files, "--model", "efficientnet_lite0", "--split", "device", "--json")
    assert local.returncode == 0, local.stderr
    remote_rows, local_rows = _json_lines(remote.stdout), _json_lines(local.stdout)
    assert len(remote_rows) == len(local_rows) == len(files)
    for r, d, path in zip(remote_rows, local_rows, files, strict=True):
        assert {"image", "split", "ran", "top5", "bytes_sent", "timings_ms"} <= set(r)
        assert r["image"] == path and r["split"] == split and r["ran"] == "split"
        assert d["ran"] == "device" and d["bytes_sent"] == 0
        top5 = r["top5"]
        assert isinstance(top5, list) and len(top5) == 5
        assert set(top5[0]) == {"index", "label", "prob"}
        assert top5[0]["index"] == d["top5"][0]["index"]  # type: ignore[index]
        assert set(r["timings_ms"]) >= {"head", "encode", "network", "server", "total"}  # type: ignore[arg-type]
        assert 0 < r["bytes_sent"] < device_runtime.point(split).float32_bytes  # type: ignore[operator]


def test_infer_human_output(live_service: LocalService, photo_files: list[Path]) -> None:
    result = cli("infer", str(photo_files[0]), "--server", live_service.url, "--split", "cloud")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "split=cloud" in lines[0] and "ran=cloud" in lines[0]
    assert lines[1].lstrip().startswith("1. ") and "class" in lines[1]
    assert "sent" in lines[-1] and "total" in lines[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["infer", "/nonexistent.jpg", "--split", "device"], "nonexistent.jpg"),
        (["infer", "{photo}", "--split", "no_such_layer"], "no split point"),
        (["infer", "{photo}", "--model", "alexnet"], "no model named 'alexnet'"),
        (
            [
                "infer",
                "{photo}",
                "--split",
                "3",
                "--no-fallback",
                "--server",
                "http://127.0.0.1:{port}",
            ],
            "cannot reach",
        ),
        (["infer", "{photo}", "--zstd-level", "99", "--split", "3"], "--zstd-level: must be 1..22"),
        (["infer", "{photo}", "--jpeg-quality", "q"], "--jpeg-quality: expected an integer"),
        (["infer"], "required: IMAGE"),
        (["infer", "{photo}", "--split", "3", "--server", "not a url"], "error"),
    ],
    ids=[
        "missing-file",
        "unknown-split",
        "unknown-model",
        "no-service",
        "bad-level",
        "bad-flag-value",
        "missing-argument",
        "bad-url",
    ],
)
def test_errors_are_one_line_without_traceback(
    photo_files: list[Path], args: list[str], message: str
) -> None:
    args = [a.format(photo=photo_files[0], port=free_port()) for a in args]
    result = cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith("device_client: error:")
    assert message in error_lines[0]


def test_bad_image_among_good_ones_is_reported_and_the_rest_still_run(
    photo_files: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    result = cli("infer", str(broken), str(photo_files[1]), "--split", "device", "--json")
    assert result.returncode == 1
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr
    rows = _json_lines(result.stdout)
    assert len(rows) == 1 and rows[0]["image"] == str(photo_files[1])


def test_demo_runs_the_whole_system() -> None:
    result = cli("demo", timeout_s=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "5/5 photos" in result.stdout
    assert (
        "tabby" in result.stdout or "Egyptian cat" in result.stdout or "tiger cat" in result.stdout
    )
