"""The demo's and the tests' photos: scikit-image's bundled samples (no download)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from shared.errors import ConfigError

__all__ = ["SAMPLE_NAMES", "sample_photos"]

SAMPLE_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle")


def sample_photos() -> dict[str, Image.Image]:
    """``{name: RGB image}`` for the five skimage samples, in ``SAMPLE_NAMES`` order."""
    try:
        from skimage import data
    except ImportError as exc:
        raise ConfigError("the sample photos need scikit-image: "
                          "pip install 'splitserve[demo]'") from exc
    loaders: dict[str, Callable[[], Any]] = {
        "chelsea": data.chelsea, "coffee": data.coffee, "astronaut": data.astronaut,
        "rocket": data.rocket,
        "motorcycle": lambda: data.stereo_motorcycle()[0]}  # type: ignore[no-untyped-call]
    return {name: Image.fromarray(loaders[name]()).convert("RGB") for name in SAMPLE_NAMES}
