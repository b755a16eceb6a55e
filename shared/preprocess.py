"""Image decoding and the resize / crop / normalize steps a classifier expects.

Pure functions over Pillow images and numpy arrays; no torch at import (``to_tensor`` and
``preprocess`` import it when called, for the torch side). Pixel statistics are in 0..255 units,
as the pixels are, so ``(x - mean) / std`` needs no extra ``/ 255``.

    >>> pre = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    >>> x = to_array(center_crop(reference_photo(), pre), pre)
    >>> x.dtype, x.shape
    (dtype('float32'), (1, 3, 224, 224))
"""

from __future__ import annotations

import importlib.resources
import io
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from shared.errors import ConfigError, ImageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_PREPROCESSING",
    "IMAGENET_STD",
    "MAX_IMAGE_PIXELS",
    "UPLOAD_FORMATS",
    "ImageHeader",
    "Preprocessing",
    "center_crop",
    "encode_jpeg",
    "load_image",
    "preprocess",
    "read_header",
    "reference_photo",
    "to_array",
    "to_tensor",
]

# torchvision's ImageNet statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), times 255.
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

# 50 Mpx is a 8660 x 5773 photo: more than any phone camera gives, and as RGB it decodes to
# 150 MB. Pillow's own bomb check only warns at 89 Mpx, and warnings are easy to miss.
MAX_IMAGE_PIXELS = 50_000_000

# The formats /classify declares. Pillow can open ~40; each is attack surface, and EPS hands
# the file to Ghostscript.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP")

# What Pillow's decoders raise on bad data, besides OSError (which covers UnidentifiedImageError
# and "image file is truncated"). DecompressionBombWarning is here for runs with warnings as errors.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: resize the shorter side, centre-crop, normalize.

    ``mean`` and ``std`` are per RGB channel, in 0..255 pixel units.

        >>> pre = Preprocessing(resize_size=256, crop_size=224, mean=(127.0,) * 3, std=(128.0,) * 3)
        >>> pre.mean
        (127.0, 127.0, 127.0)
    """

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop_size <= 0 or self.resize_size <= 0:
            raise ConfigError(
                f"sizes must be positive, got resize {self.resize_size}, crop {self.crop_size}"
            )
        if self.crop_size > self.resize_size:
            raise ConfigError(f"crop {self.crop_size} is larger than resize {self.resize_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("mean and std need one value per RGB channel")
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")


IMAGENET_PREPROCESSING = Preprocessing()


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read before anything is decoded.

    ``decoded_bytes`` is what Pillow allocates to decode it: width x height x bands x bytes per
    band of the mode it decodes to (a 16-bit RGBA PNG decodes to 8-bit RGBA).
    """

    format: str
    width: int
    height: int
    mode: str
    frames: int

    @property
    def decoded_bytes(self) -> int:
        mode = ImageMode.getmode(self.mode)
        return self.width * self.height * len(mode.bands) * int(mode.typestr[-1])


def read_header(data: bytes, *, formats: Sequence[str] = UPLOAD_FORMATS,
                max_decoded_bytes: int | None = None, min_side: int | None = None
                ) -> ImageHeader:
    """The header of an image in one of ``formats`` (Pillow's names), without decoding it,
    sized as ``load_image`` with the same arguments decodes it (a JPEG over the budget at a
    reduced scale).

    >>> read_header(encode_jpeg(Image.new("RGB", (640, 480)))).decoded_bytes
    921600
    """
    img = _open(data, formats)
    with img:
        header = _header(img)
        if (max_decoded_bytes is not None and min_side is not None
                and header.decoded_bytes > max_decoded_bytes):
            _draft(img, min_side)
            header = _header(img)
        return header


def _header(img: Image.Image) -> ImageHeader:
    return ImageHeader(img.format or "?", img.width, img.height, img.mode,
                       getattr(img, "n_frames", 1))


def load_image(source: str | os.PathLike[str] | bytes, *,
               formats: Sequence[str] | None = None, max_decoded_bytes: int | None = None,
               min_side: int | None = None) -> Image.Image:
    """Decode an image file or its bytes into an upright RGB image.

    The pixel count is checked from the header, before anything is decoded. EXIF orientation is
    applied, so a phone photo taken sideways comes out the way it was shot.

        >>> load_image(encode_jpeg(reference_photo())).mode
        'RGB'

    For untrusted uploads, ``formats`` restricts the decoders Pillow may use (say
    ``UPLOAD_FORMATS``: never EPS, which runs Ghostscript), ``max_decoded_bytes`` bounds the
    memory the decode takes (from the header), and ``min_side`` lets a JPEG too large for that
    budget decode at a reduced scale (libjpeg's DCT scaling) with its shorter side still at least
    ``min_side``. Animations are refused: only their first frame would be used.

    Raises ``ImageError`` for a missing file, data that isn't an image (or not in ``formats``),
    a truncated image, one of more than ``MAX_IMAGE_PIXELS`` pixels or ``max_decoded_bytes``.
    """
    fp: str | os.PathLike[str] | io.BytesIO = (
        io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    )
    img = _open(fp, formats)
    try:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, "
                f"more than the limit of {MAX_IMAGE_PIXELS}"
            )
        if max_decoded_bytes is not None:
            if getattr(img, "n_frames", 1) > 1:
                raise ImageError(f"animated {img.format} images are not accepted")
            header = _header(img)
            if header.decoded_bytes > max_decoded_bytes and min_side is not None:
                _draft(img, min_side)
                header = _header(img)
            if header.decoded_bytes > max_decoded_bytes:
                raise ImageError(
                    f"image {width}x{height} {img.mode} decodes to {header.decoded_bytes} "
                    f"bytes, more than the limit of {max_decoded_bytes}")
        try:
            img.load()
            # In place: no copy of a large image when (as usual) there is nothing to rotate.
            ImageOps.exif_transpose(img, in_place=True)
            out = _to_rgb(img)
        except _DECODE_ERRORS as exc:
            raise ImageError(f"cannot decode {img.format or 'image'} data: {exc}") from exc
        if out is img and not isinstance(source, bytes | bytearray):
            out = img.copy()  # detached from the open file, which closes below
        if out is not img:
            img.close()
        return out
    except BaseException:
        img.close()
        raise


def _open(fp: str | os.PathLike[str] | io.BytesIO | bytes,
          formats: Sequence[str] | None) -> Image.Image:
    if isinstance(fp, bytes | bytearray):
        fp = io.BytesIO(fp)
    try:
        return Image.open(fp, formats=None if formats is None else tuple(formats))  # header only
    except _DECODE_ERRORS as exc:
        # Not the exception's text: Pillow's names the file object, with its heap address.
        what = f"a {', '.join(formats[:-1])} or {formats[-1]} image" if formats else "an image"
        detail = "" if isinstance(exc, UnidentifiedImageError) else f" ({exc})"
        if "object at 0x" in detail:
            detail = ""
        raise ImageError(f"cannot open image: not {what}{detail}") from None


def _draft(img: Image.Image, min_side: int) -> None:
    # JPEG only (draft is a no-op elsewhere): pick the smallest DCT scale that keeps the
    # shorter side at least min_side, as the resize that follows needs.
    width, height = img.size
    short = max(1, min(width, height))
    img.draft("RGB", (max(1, width * min_side // short), max(1, height * min_side // short)))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    # Anything with transparency goes through RGBA: converting a palette image whose
    # transparency is a byte table straight to RGB makes Pillow warn and guess.
    if "transparency" in img.info or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def center_crop(img: Image.Image, pre: Preprocessing) -> Image.Image:
    """Resize the shorter side to ``pre.resize_size`` (bilinear), then cut the centre square of
    ``pre.crop_size`` pixels, as torchvision's ``Resize`` + ``CenterCrop`` do.

    An image that is already exactly ``crop_size x crop_size`` is returned unchanged: it is taken
    to be a crop made earlier. The device sends such crops to the cloud as JPEG, and zooming them
    again on the server would make the two sides see different pictures.

        >>> center_crop(Image.new("RGB", (640, 480)), Preprocessing()).size
        (224, 224)
    """
    crop = pre.crop_size
    if img.size == (crop, crop):
        return img
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels: {width}x{height}")
    # torchvision's rule: the shorter side becomes resize_size, the longer one keeps the ratio.
    if width <= height:
        new_w, new_h = pre.resize_size, int(pre.resize_size * height / width)
    else:
        new_w, new_h = int(pre.resize_size * width / height), pre.resize_size
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


class _Normalization(Protocol):
    @property
    def mean(self) -> tuple[float, float, float]: ...

    @property
    def std(self) -> tuple[float, float, float]: ...


def to_array(img: Image.Image, pre: _Normalization) -> np.ndarray:
    """Turn an image into a normalized float32 batch of one, ``(1, 3, height, width)``.

    ``pre`` is anything with ``mean`` and ``std`` per RGB channel in 0..255 units (a
    ``Preprocessing`` or a bundle's ``BundlePreprocessing``).

    >>> to_array(Image.new("RGB", (224, 224), (127, 127, 127)), Preprocessing()).shape
    (1, 3, 224, 224)
    """
    if img.mode != "RGB":
        img = _to_rgb(img)
    width, height = img.size
    hwc = np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(height, width, 3)
    chw = hwc.transpose(2, 0, 1).astype(np.float32)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray(((chw - mean) / std)[None])


def to_tensor(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """``to_array`` as a torch tensor (the torch side's input; imports torch).

    >>> to_tensor(Image.new("RGB", (224, 224), (127, 127, 127)), Preprocessing()).shape
    torch.Size([1, 3, 224, 224])
    """
    import torch  # the torch side only: the device path calls to_array

    return torch.from_numpy(to_array(img, pre))


def preprocess(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """``to_tensor(center_crop(img, pre), pre)``: the model's input for one image.

    >>> preprocess(reference_photo(), Preprocessing()).shape
    torch.Size([1, 3, 224, 224])
    """
    return to_tensor(center_crop(img, pre), pre)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """Encode an image as baseline JPEG bytes, without chroma subsampling (4:4:4).

    4:2:0 subsampling saves ~20% of the bytes but flipped the top-1 class of an ambiguous
    sample photo (skimage's astronaut) even at quality 95; 4:4:4 at quality 90 kept all five.

    >>> encode_jpeg(center_crop(reference_photo(), Preprocessing()), quality=90)[:2]
    b'\\xff\\xd8'
    """
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100, got {quality}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    buf = io.BytesIO()
    try:
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot encode JPEG: {exc}") from exc
    return buf.getvalue()


def reference_photo() -> Image.Image:
    """A real 224x224 photo shipped with the package (skimage's Chelsea the cat, CC0).

    Profiles are timed and sized on it: compressed activations and JPEGs of a synthetic image
    would be far smaller than a photo's, and the planner would trust the wrong payload sizes.
    """
    # From "shared", not "shared.models": importing that package imports torch.
    data = importlib.resources.files("shared").joinpath("models", "data", "chelsea_224.jpg")
    return load_image(data.read_bytes())
