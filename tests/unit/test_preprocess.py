"""Image decoding, resize/crop, normalization and JPEG encoding."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from shared.errors import ConfigError, ImageError
from shared.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_PREPROCESSING,
    IMAGENET_STD,
    MAX_IMAGE_PIXELS,
    UPLOAD_FORMATS,
    Preprocessing,
    center_crop,
    encode_jpeg,
    load_image,
    preprocess,
    read_header,
    to_tensor,
)

LITE = Preprocessing(resize_size=256, crop_size=224, mean=(127.0,) * 3, std=(128.0,) * 3)


def _png(img: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **params)
    return buf.getvalue()


def _gradient(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height))
    img.putdata([(x % 256, y % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    return img


# --- Preprocessing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_size": 0},
        {"resize_size": -1},
        {"resize_size": 200, "crop_size": 224},
        {"std": (1.0, 0.0, 1.0)},
        {"mean": (1.0, 2.0)},
    ],
    ids=["zero-crop", "negative-resize", "crop-over-resize", "zero-std", "two-means"],
)
def test_preprocessing_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Preprocessing(**kwargs)  # type: ignore[arg-type]


def test_imagenet_preprocessing_defaults() -> None:
    assert IMAGENET_PREPROCESSING == Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)


# --- center_crop and to_tensor --------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (300, 300), (1000, 250), (100, 80)], ids=str
)
def test_preprocess_shape_and_dtype(size: tuple[int, int]) -> None:
    x = preprocess(_gradient(*size), IMAGENET_PREPROCESSING)
    assert x.shape == (1, 3, 224, 224)
    assert x.dtype == torch.float32
    assert x.is_contiguous()


def test_center_crop_resizes_the_shorter_side_then_takes_the_centre() -> None:
    # A 512x256 image: a left half of red and a right half of blue, with a green centre band.
    img = Image.new("RGB", (512, 256), (255, 0, 0))
    img.paste((0, 0, 255), (256, 0, 512, 256))
    img.paste((0, 255, 0), (200, 0, 312, 256))
    out = center_crop(img, IMAGENET_PREPROCESSING)  # no resize needed: shorter side is 256
    assert out.size == (224, 224)
    assert out.getpixel((112, 112)) == (0, 255, 0)
    assert out.getpixel((0, 0)) == (255, 0, 0)  # left edge at x = 144 of the original
    assert out.getpixel((223, 0)) == (0, 0, 255)


def test_already_cropped_image_is_not_resized() -> None:
    img = _gradient(224, 224)
    assert center_crop(img, IMAGENET_PREPROCESSING) is img
    torch.testing.assert_close(
        preprocess(img, IMAGENET_PREPROCESSING), to_tensor(img, IMAGENET_PREPROCESSING)
    )
    # Any other size is zoomed: a 256x256 image loses its border.
    assert center_crop(_gradient(256, 256), IMAGENET_PREPROCESSING).getpixel((0, 0)) == (
        16,
        16,
        32,
    )


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 700), height=st.integers(1, 700))
def test_center_crop_always_gives_the_crop_size(width: int, height: int) -> None:
    assert center_crop(Image.new("RGB", (width, height)), LITE).size == (224, 224)


@pytest.mark.parametrize(
    ("pre", "colour", "expected"),
    [
        (LITE, (127, 127, 127), (0.0, 0.0, 0.0)),
        (LITE, (255, 0, 255), (1.0, -127 / 128, 1.0)),
        (
            IMAGENET_PREPROCESSING,
            (200, 100, 50),
            ((200 - 123.675) / 58.395, (100 - 116.28) / 57.12, (50 - 103.53) / 57.375),
        ),
    ],
    ids=["lite-grey", "lite-magenta", "imagenet"],
)
def test_solid_colour_normalizes_per_channel(
    pre: Preprocessing, colour: tuple[int, int, int], expected: tuple[float, float, float]
) -> None:
    x = preprocess(Image.new("RGB", (300, 400), colour), pre)
    for channel, value in enumerate(expected):
        torch.testing.assert_close(x[0, channel], torch.full((224, 224), value))


def test_to_tensor_keeps_channel_row_column_order() -> None:
    img = Image.new("RGB", (5, 3), (0, 0, 0))
    img.putpixel((4, 1), (10, 20, 30))  # x=4, y=1
    plain = Preprocessing(resize_size=5, crop_size=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    x = to_tensor(img, plain)
    assert x.shape == (1, 3, 3, 5)
    assert x[0, :, 1, 4].tolist() == [10.0, 20.0, 30.0]
    assert x.sum().item() == 60.0


# --- load_image -----------------------------------------------------------------------------


def _palette_with_alpha_table() -> Image.Image:
    img = Image.new("P", (8, 8))
    img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    img.info["transparency"] = bytes(range(256))
    return img


@pytest.mark.parametrize(
    "img",
    [
        Image.new("L", (8, 8), 90),
        Image.new("1", (8, 8), 1),
        Image.new("RGBA", (8, 8), (1, 2, 3, 0)),
        Image.new("LA", (8, 8), (5, 128)),
        Image.new("P", (8, 8), 3),
        _palette_with_alpha_table(),
        Image.new("I;16", (8, 8), 300),
    ],
    ids=["L", "1", "RGBA", "LA", "P", "P-transparency-table", "I16"],
)
def test_load_image_converts_any_mode_to_rgb(img: Image.Image) -> None:
    out = load_image(_png(img))
    assert out.mode == "RGB" and out.size == (8, 8)


def test_load_image_from_path_and_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(path, format="JPEG")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert load_image(str(path)).size == (20, 10)


def test_load_image_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    _gradient(40, 20).save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


def _png_header(width: int, height: int) -> bytes:
    # A PNG that claims a size but holds no pixel data: Image.open reads only this header.
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


@pytest.mark.parametrize(
    ("width", "height"),
    [(10_000, 6_000), (10_000, 10_000), (30_000, 30_000)],
    ids=["over-our-limit", "over-pillow-warning", "over-pillow-error"],
)
def test_oversized_header_is_refused_before_decoding(width: int, height: int) -> None:
    assert width * height > MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="pixels|decompression bomb"):
        load_image(_png_header(width, height))


def test_small_header_without_data_is_an_error_too() -> None:
    with pytest.raises(ImageError):
        load_image(_png_header(64, 64))


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    _gradient(64, 64).save(buf, format="JPEG")
    return buf.getvalue()[:300]


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, _truncated_jpeg()],
    ids=["empty", "text", "broken-png", "truncated-jpeg"],
)
def test_undecodable_bytes_raise_image_error(data: bytes) -> None:
    with pytest.raises(ImageError):
        load_image(data)


def test_missing_file_raises_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        load_image(tmp_path / "nope.jpg")


# --- encode_jpeg ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_encode_jpeg_round_trips(mode: str) -> None:
    img = _gradient(224, 224).convert(mode)
    data = encode_jpeg(img, quality=90)
    assert data[:2] == b"\xff\xd8"
    back = load_image(data)
    assert back.size == (224, 224)
    # Lossy, but close: the mean absolute error of a smooth gradient at q90 is a few levels.
    diff = to_tensor(back, LITE) - to_tensor(img.convert("RGB"), LITE)
    assert diff.abs().mean().item() * 128 < 4


def test_lower_quality_gives_fewer_bytes() -> None:
    img = _gradient(224, 224)
    assert len(encode_jpeg(img, quality=30)) < len(encode_jpeg(img, quality=95))


@pytest.mark.parametrize("quality", [0, 101, -5])
def test_encode_jpeg_rejects_bad_quality(quality: int) -> None:
    with pytest.raises(ConfigError):
        encode_jpeg(_gradient(8, 8), quality=quality)


def _encoded(fmt: str, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "ICO", "TGA", "QOI", "JPEG2000", "EPS"])
def test_uploads_are_limited_to_the_declared_formats(fmt: str) -> None:
    data = _encoded(fmt)
    with pytest.raises(ImageError, match="not a JPEG, PNG or WEBP image") as info:
        load_image(data, formats=UPLOAD_FORMATS)
    assert "0x" not in str(info.value)


def test_the_decoded_size_is_checked_from_the_header() -> None:
    png = _encoded("PNG", (1000, 1000), "RGBA")
    assert read_header(png).decoded_bytes == 4_000_000
    with pytest.raises(ImageError, match="decodes to 4000000 bytes"):
        load_image(png, formats=UPLOAD_FORMATS, max_decoded_bytes=3_999_999)
    assert load_image(png, formats=UPLOAD_FORMATS, max_decoded_bytes=4_000_000).mode == "RGB"


def test_a_jpeg_over_the_budget_decodes_at_a_reduced_scale() -> None:
    jpeg = encode_jpeg(Image.new("RGB", (4000, 3000)))
    img = load_image(jpeg, formats=UPLOAD_FORMATS, max_decoded_bytes=2**20, min_side=256)
    assert img.size == (500, 375)  # 1/8: the smallest scale keeping the short side >= 256
    assert read_header(jpeg, max_decoded_bytes=2**20, min_side=256).width == 500
