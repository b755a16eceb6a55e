"""The benchmarks' evaluation images: the five sample photos plus deterministic augmented crops.

    images = evaluation_images(n_crops=200)      # [(name, RGB image)], 205 of them
    images[5][0]                                 # 'chelsea/crop000'

Five photos are too few to see a 1% drop in top-1 agreement, so each photo also yields crops the
way ImageNet training augments: a random resized crop (torchvision's ``RandomResizedCrop``
sampling), a horizontal flip, and a little brightness/contrast jitter. Pillow only, seeded, so
every run and every machine sees the same pixels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

from PIL import Image, ImageEnhance, ImageOps

from device_client.samples import sample_photos

__all__ = ["augmented_crops", "evaluation_images"]

CROP_AREA = (0.3, 1.0)  # fraction of the photo's area a crop keeps
CROP_ASPECT = (3 / 4, 4 / 3)  # width / height, sampled log-uniformly as torchvision does
JITTER = (0.8, 1.2)  # brightness and contrast factors: "small", a photo a phone might take


def augmented_crops(
    photos: Mapping[str, Image.Image], n: int, *, seed: int = 0
) -> list[tuple[str, Image.Image]]:
    """``n`` augmented crops, cycling through ``photos`` in order; named ``photo/cropNNN``.

    Crops keep their own resolution, so the model's preprocessing (resize, centre crop) sees
    them as it would any photo.
    """
    rng = random.Random(seed)
    names = list(photos)
    out: list[tuple[str, Image.Image]] = []
    for i in range(n):
        name = names[i % len(names)]
        img = _random_resized_crop(photos[name], rng)
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(*JITTER))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(*JITTER))
        out.append((f"{name}/crop{i:03d}", img))
    return out


def _random_resized_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    # torchvision.transforms.RandomResizedCrop.get_params: ten tries at a box that fits, then
    # the centre crop clamped to the aspect range.
    width, height = img.size
    area = width * height
    log_lo, log_hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_AREA)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return img.crop((left, top, left + w, top + h))
    ratio = width / height
    if ratio < CROP_ASPECT[0]:
        w, h = width, round(width / CROP_ASPECT[0])
    elif ratio > CROP_ASPECT[1]:
        w, h = round(height * CROP_ASPECT[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return img.crop((left, top, left + w, top + h))


def evaluation_images(n_crops: int, *, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """The five sample photos, then ``n_crops`` augmented crops of them."""
    photos = sample_photos()
    return [*photos.items(), *augmented_crops(photos, n_crops, seed=seed)]
