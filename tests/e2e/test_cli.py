"""The command line as a user runs it: real processes, real files, real service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from device_client.local_service import LocalService, free_port
from device_client.runtime import DeviceRuntime

#: The torch device: the reference, and where a test needs a device that no service feeds.
TORCH = ["--runtime", "torch"]


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
    # The torch device, unsplit: the reference the default ONNX Runtime device must agree with.
    local = cli("infer", *files, "--model", "efficientnet_lite0", "--split", "device", "--json",
                "--runtime", "torch")
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


@pytest.fixture(scope="module")
def torch_top1(photo_files: list[Path]) -> list[int]:
    files = [str(p) for p in photo_files]
    local = cli("infer", *files, "--split", "device", "--json", "--runtime", "torch")
    assert local.returncode == 0, local.stderr
    return [row["top5"][0]["index"] for row in _json_lines(local.stdout)]  # type: ignore[index]


@pytest.mark.parametrize("split", ["_blocks.9", "device", "auto"])
def test_onnx_device_agrees_with_the_torch_device(
    live_service: LocalService, photo_files: list[Path], torch_top1: list[int], split: str,
    tmp_path: Path,
) -> None:
    # The default runtime: the service's bundle, fetched once into the cache, on ONNX Runtime.
    env = {**os.environ, "SPLITSERVE_CACHE_DIR": str(tmp_path / "cache")}
    files = [str(p) for p in photo_files]
    result = subprocess.run(
        [sys.executable, "-m", "device_client", "infer", *files, "--server", live_service.url,
         "--split", split, "--json", "--no-fallback"],
        capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = _json_lines(result.stdout)
    assert [row["top5"][0]["index"] for row in rows] == torch_top1  # type: ignore[index]
    if split != "auto":
        assert {row["ran"] for row in rows} == {"split" if split != "device" else "device"}


def test_onnx_device_runs_a_local_bundle_without_a_service(
    live_service: LocalService, photo_files: list[Path], torch_top1: list[int], tmp_path: Path
) -> None:
    bundle = _served_bundle(live_service)
    port = free_port()  # nothing listens there: --split device with --bundle needs no service
    result = cli("infer", *[str(p) for p in photo_files], "--split", "device", "--bundle",
                 str(bundle), "--server", f"http://127.0.0.1:{port}", "--json")
    assert result.returncode == 0, result.stderr
    assert [r["top5"][0]["index"] for r in _json_lines(result.stdout)] == torch_top1  # type: ignore[index]
    int8 = cli("infer", str(photo_files[0]), "--split", "device", "--bundle", str(bundle),
               "--precision", "int8")
    assert int8.returncode == 1 and "export" in int8.stderr and len(int8.stderr.splitlines()) == 1


def _served_bundle(service: LocalService) -> Path:
    """The bundle the live service exported into its SPLITSERVE_BUNDLE_DIR."""
    root = Path(os.environ["SPLITSERVE_BUNDLE_DIR"])
    found = [p for p in root.glob("efficientnet_lite0-*") if (p / "manifest.json").is_file()]
    assert found, f"no bundle under {root}"
    return found[0]


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
        (["infer", "/nonexistent.jpg", "--split", "device", *TORCH], "nonexistent.jpg"),
        (["infer", "{photo}", "--split", "no_such_layer", *TORCH], "no split point"),
        (["infer", "{photo}", "--model", "alexnet", *TORCH], "no model named 'alexnet'"),
        (
            [
                "infer",
                "{photo}",
                "--split",
                "3",
                "--no-fallback",
                "--server",
                "http://127.0.0.1:{port}",
                "--runtime",
                "torch",
            ],
            "cannot reach",
        ),
        (
            ["infer", "{photo}", "--zstd-level", "99", "--split", "3", *TORCH],
            "--zstd-level: must be 1..22",
        ),
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
    result = cli("infer", str(broken), str(photo_files[1]), "--split", "device", "--json",
                 "--runtime", "torch")
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
