"""shared.export: where int8 calibration images come from, and export's argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from shared.errors import ConfigError
from shared.export import calibration_images, export_bundle


def test_calibration_reads_every_image_of_a_directory_in_name_order(tmp_path: Path) -> None:
    for name, colour in (("b.png", (0, 255, 0)), ("a.jpg", (255, 0, 0))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    images = calibration_images(tmp_path)
    greens = [im.convert("RGB").getpixel((0, 0)) for im in images]
    assert [g[1] for g in greens if isinstance(g, tuple)] == [0, 255]  # a.jpg first


def test_calibration_defaults_to_the_shipped_photo() -> None:
    (photo,) = calibration_images(None)
    assert photo.size == (224, 224)


@pytest.mark.parametrize("make", ["missing", "empty", "broken"])
def test_bad_calibration_directories_are_config_errors(tmp_path: Path, make: str) -> None:
    target = tmp_path / "calib"
    if make != "missing":
        target.mkdir()
    if make == "broken":
        (target / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match="--calibration"):
        calibration_images(target)


def test_export_refuses_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a bundle"):
        export_bundle("efficientnet_lite0", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_calibration_needs_int8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--int8"):
        export_bundle("efficientnet_lite0", tmp_path / "b", calibration=tmp_path)
