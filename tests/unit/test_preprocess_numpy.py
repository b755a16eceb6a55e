"""shared.preprocess.to_array: the numpy input is the torch input, exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shared.models import get_spec
from shared.preprocess import center_crop, to_array, to_tensor


@pytest.mark.parametrize("model", ["efficientnet_lite0", "resnet18"])
def test_to_array_equals_to_tensor(photos: dict[str, Image.Image], model: str) -> None:
    pre = get_spec(model).preprocessing
    for image in photos.values():
        crop = center_crop(image, pre)
        assert np.array_equal(to_array(crop, pre), to_tensor(crop, pre).numpy())


def test_non_rgb_images_convert_as_the_torch_path_does() -> None:
    pre = get_spec("resnet18").preprocessing
    for mode in ("L", "RGBA", "P"):
        img = Image.new(mode, (8, 6))
        assert np.array_equal(to_array(img, pre), to_tensor(img, pre).numpy())
