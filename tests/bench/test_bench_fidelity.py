"""Tests for bench.fidelity on a tiny workload: 2 photos, 2 crops, 3 split points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.__main__ import main
from bench.fidelity import int8_rows, write_outputs
from bench.fidelity_measure import Fidelity, measure_fidelity
from bench.images import augmented_crops
from device_client.runtime import DeviceRuntime
from shared.partition import SplitPoint
from shared.preprocess import preprocess


@pytest.fixture(scope="module")
def images(photos: dict[str, Image.Image]) -> list[tuple[str, Image.Image]]:
    two = {name: photos[name] for name in ("chelsea", "rocket")}
    return [*two.items(), *augmented_crops(two, 2)]


@pytest.fixture(scope="module")
def fidelity(device_runtime: DeviceRuntime, images: list[tuple[str, Image.Image]]) -> Fidelity:
    points = device_runtime.points
    # An early wide map, a middle block and the pooled vector: three different codec regimes.
    chosen = [points[2], points[len(points) // 2], points[-1]]
    return measure_fidelity(device_runtime, images, points=chosen)


def test_measures_the_chosen_points_and_cloud(fidelity: Fidelity) -> None:
    assert fidelity.images == 4
    assert len(fidelity.points) == 3
    indices = [p.index for p in fidelity.points]
    assert indices == sorted(indices)
    for p in (*fidelity.points, fidelity.cloud):
        assert 0.0 <= p.top1_agreement <= 1.0
        assert 0.0 <= p.mean_abs_dlogit <= p.max_abs_dlogit
        assert 0.0 < p.ratio < 1.0
    for p in fidelity.points:
        assert 0 < p.bytes_per_image < p.float32_bytes


def test_json_structure(fidelity: Fidelity) -> None:
    doc = json.loads(json.dumps(fidelity.to_json("python -m bench fidelity --quick")))
    assert {"model", "images", "granularity", "zstd_level", "points", "cloud", "command"} <= set(
        doc
    )
    assert doc["model"] == "efficientnet_lite0" and doc["images"] == 4
    assert doc["granularity"] == "auto" and doc["zstd_level"] == 3
    point_keys = {
        "split",
        "index",
        "top1_agreement",
        "mean_abs_dlogit",
        "max_abs_dlogit",
        "bytes_per_image",
        "float32_bytes",
        "ratio",
        "per_channel",
    }
    for p in doc["points"]:
        assert point_keys <= set(p)
        assert isinstance(p["per_channel"], bool)
        assert p["ratio"] == pytest.approx(p["bytes_per_image"] / p["float32_bytes"])
    assert {"top1_agreement", "mean_abs_dlogit", "bytes_per_image"} <= set(doc["cloud"])


def test_bytes_are_those_of_a_one_image_frame(
    device_runtime: DeviceRuntime, images: list[tuple[str, Image.Image]]
) -> None:
    point = device_runtime.points[-1]
    fid = measure_fidelity(device_runtime, images[:1], points=[point])
    x = preprocess(images[0][1], device_runtime.spec.preprocessing)
    # The same request id length as the benchmark's, so the frames are the same size.
    frame = device_runtime.encode(point, device_runtime.run_head(point, x), "fidelity-0")
    assert fid.points[0].bytes_per_image == len(frame)


def test_write_outputs(fidelity: Fidelity, tmp_path: Path) -> None:
    paths = write_outputs(fidelity, tmp_path / "out", "python -m bench fidelity")
    assert [p.name for p in paths] == ["fidelity.json", "fidelity.md", "fidelity.png"]
    md = paths[1].read_text(encoding="utf-8")
    for p in fidelity.points:
        assert p.split in md
    assert "cloud (JPEG q90)" in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_crops_are_deterministic(photos: dict[str, Image.Image]) -> None:
    a = augmented_crops(photos, 6, seed=0)
    b = augmented_crops(photos, 6, seed=0)
    assert [n for n, _ in a] == [n for n, _ in b]
    assert [img.tobytes() for _, img in a] == [img.tobytes() for _, img in b]
    for name, img in a:
        w, h = photos[name.split("/")[0]].size
        assert img.mode == "RGB" and 0 < img.width <= w and 0 < img.height <= h


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fidelity", "--zstd-level", "99"], "--zstd-level: must be 1..22, got 99"),
        (["fidelity", "--granularity", "tensor", "--zstd-level", "0"], "must be 1..22, got 0"),
        (["fidelity", "--crops", "-1"], "--crops: must be >= 0, got -1"),
    ],
    ids=["level-too-high", "level-zero", "negative-crops"],
)
def test_cli_bad_setting_is_one_line_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bench: error:") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


class _FloatHeads:
    """Stands in for an int8 ``OnnxDeviceRuntime``: the float32 torch graphs, numpy in and out,
    so the int8 rows must match the float32 wire rows exactly."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        self.runtime = runtime

    def point(self, key: str | int) -> SplitPoint:
        return self.runtime.point(key)

    def run_head(self, point: SplitPoint, x: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            return tuple(t.numpy() for t in self.runtime.run_head(point, torch.from_numpy(x)))

    def run_full(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.runtime.run_full(torch.from_numpy(x)).numpy()


def test_int8_rows_follow_the_wire_path(
    device_runtime: DeviceRuntime, images: list[tuple[str, Image.Image]], tmp_path: Path
) -> None:
    point = device_runtime.points[-1]
    fid = measure_fidelity(device_runtime, images, points=[point],
                           int8=_FloatHeads(device_runtime))
    whole, head = fid.int8
    assert (whole.split, head.split, head.index) == (None, point.name, point.index)
    assert whole.top1_agreement == 1.0 and whole.max_abs_dlogit < 1e-3
    assert head.top1_agreement == fid.points[0].top1_agreement
    assert head.mean_abs_dlogit == pytest.approx(fid.points[0].mean_abs_dlogit, rel=1e-3)
    doc = fid.to_json("cmd")
    assert [r["split"] for r in doc["int8"]] == [None, point.name]
    assert int8_rows(fid)[0][:2] == ["whole model", "100.0% (4/4)"]
    write_outputs(fid, tmp_path, "cmd")
    assert "## int8 on the device" in (tmp_path / "fidelity.md").read_text()


def test_int8_rows_are_absent_without_an_int8_runtime(fidelity: Fidelity) -> None:
    assert fidelity.int8 == () and int8_rows(fidelity) == []
    assert fidelity.to_json("cmd")["int8"] == []
