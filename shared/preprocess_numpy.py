"""``shared.preprocess.to_tensor`` for numpy: the ONNX Runtime device's input, without torch.

    x = to_array(center_crop(photo, pre), pre)      # float32, (1, 3, 224, 224)

``pre`` is anything with ``mean`` and ``std`` per RGB channel in 0..255 units: a
``Preprocessing`` or a bundle's ``BundlePreprocessing``. (``center_crop`` is pure Pillow, but its
module still imports torch for ``to_tensor``; splitting it is the torch-free device's work.)
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from PIL import Image

__all__ = ["to_array"]


class _Normalization(Protocol):
    @property
    def mean(self) -> tuple[float, float, float]: ...

    @property
    def std(self) -> tuple[float, float, float]: ...


def to_array(img: Image.Image, pre: _Normalization) -> np.ndarray:
    """A normalized float32 batch of one, ``(1, 3, height, width)``, equal to ``to_tensor``'s."""
    if img.mode != "RGB":
        # As shared.preprocess: palette transparency goes through RGBA, never guessed.
        if "transparency" in img.info or img.mode in ("PA", "LA", "La", "RGBa"):
            img = img.convert("RGBA")
        img = img.convert("RGB")
    width, height = img.size
    hwc = np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(height, width, 3)
    chw = hwc.transpose(2, 0, 1).astype(np.float32)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray(((chw - mean) / std)[None])
