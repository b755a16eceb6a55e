"""Tests for shared.codec: round trips within the quantization bound, and hostile input."""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import time
import tracemalloc
from typing import Any

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import (
    CODECS,
    MAX_NUMEL,
    QUANTS,
    EncodedTensor,
)
from shared.codec_torch import decode_tensor, encode_tensor, prefers_per_channel, torch_dtype
from shared.errors import CodecError, PayloadError
from shared.tensorspec import ALLOWED_DTYPES, TensorSpec

GiB = 2**30


def assert_within_bound(x: torch.Tensor, enc: EncodedTensor, y: torch.Tensor) -> None:
    """|x - y| <= scale / 2 elementwise, plus float32 arithmetic and output-dtype rounding."""
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert bool(torch.isfinite(y).all())
    if enc.quant == "none":
        assert torch.equal(x, y)
        return
    x64, y64 = x.double(), y.double()
    scale = torch.tensor(enc.scale, dtype=torch.float64)
    if enc.axis is not None:
        shape = [1] * x.dim()
        shape[enc.axis] = -1
        scale = scale.view(shape)
    fi = torch.finfo(x.dtype)
    tol = scale * (0.5 + 1e-4) + (x64.abs() + scale) * fi.eps + fi.smallest_normal
    err = (x64 - y64).abs()
    assert bool((err <= tol).all()), f"max error {float((err - tol).max())} over the bound"


def roundtrip(x: torch.Tensor, **kwargs: Any) -> EncodedTensor:
    enc = encode_tensor(x, **kwargs)
    assert_within_bound(x, enc, decode_tensor(enc))
    return enc


# --- round trips ------------------------------------------------------------------------------

SPECIAL_VALUES = {
    "zeros": lambda n: torch.zeros(n),
    "constant": lambda n: torch.full((n,), 3.25),
    "negative_constant": lambda n: torch.full((n,), -7.0),
    "negative_only": lambda n: -torch.rand(n) - 0.5,
    "relu6": lambda n: torch.rand(n) * 6,
    "mixed_sign": lambda n: torch.randn(n),
    "huge": lambda n: torch.randn(n) * 1e30,
    "tiny": lambda n: torch.randn(n) * 1e-30,
    "subnormal": lambda n: torch.randn(n) * 1e-40,
    "float32_extremes": lambda n: torch.tensor([3.4e38, -3.4e38]).repeat(n // 2),
    "one_outlier": lambda n: torch.cat([torch.rand(n - 1), torch.tensor([1e6])]),
}


@pytest.mark.parametrize("kind", SPECIAL_VALUES, ids=str)
@pytest.mark.parametrize("dtype", ALLOWED_DTYPES, ids=str)
@pytest.mark.parametrize("codec", CODECS, ids=str)
@pytest.mark.parametrize(
    ("quant", "per_channel"),
    [("affine_u8", False), ("affine_u8", True), ("none", False)],
    ids=["affine_u8-per_tensor", "affine_u8-per_channel", "none"],
)
def test_roundtrip_special_values(
    kind: str, dtype: str, quant: str, codec: str, per_channel: bool
) -> None:
    torch.manual_seed(0)
    x32 = SPECIAL_VALUES[kind](96).view(2, 3, 4, 4)
    fi = torch.finfo(torch_dtype(dtype))
    x = x32.clamp(fi.min, fi.max).to(torch_dtype(dtype))
    enc = roundtrip(x, quant=quant, codec=codec, per_channel=per_channel)
    assert enc.dtype == dtype and enc.quant == quant and enc.codec in (codec, "none")
    assert enc.axis == (1 if per_channel else None)
    assert all(0.0 < s < math.inf for s in enc.scale)


def test_zero_is_exact_and_all_zero_gets_unit_scale() -> None:
    x = torch.relu(torch.randn(1, 64, 8, 8)) - 0.5 * (torch.rand(1, 64, 8, 8) > 0.9)
    y = decode_tensor(encode_tensor(x))
    assert bool((y[x == 0] == 0).all())
    enc = encode_tensor(torch.zeros(1, 16))
    assert enc.scale == (1.0,) and enc.zero_point == (0,)


def test_codec_falls_back_to_none_when_zstd_does_not_help() -> None:
    noise = torch.rand(1, 4096) * 6  # uniform bytes: incompressible
    assert encode_tensor(noise).codec == "none"
    assert encode_tensor(torch.zeros(1, 4096)).codec == "zstd"


def test_encoding_a_view_copies_only_its_own_bytes() -> None:
    big = torch.randn(1, 24, 32, 32)
    view = big[:, 5:7]
    enc = encode_tensor(view, quant="none", codec="none")
    assert len(enc.data) == view.numel() * 4
    assert torch.equal(decode_tensor(enc), view)
    assert torch.equal(decode_tensor(encode_tensor(big.transpose(2, 3), quant="none")), big.mT)


def test_encoded_data_is_zstd_with_content_size_and_checksum() -> None:
    enc = encode_tensor(torch.zeros(1, 24, 56, 56))
    params = zstandard.get_frame_parameters(enc.data)
    assert params.content_size == enc.raw_nbytes == 24 * 56 * 56
    assert params.has_checksum


@st.composite
def float_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = torch_dtype(draw(st.sampled_from(ALLOWED_DTYPES)))
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    n = math.prod(shape)
    lim = float(torch.finfo(dtype).max)
    kind = draw(st.sampled_from(["any", "scaled", "nonnegative", "zeros", "constant"]))
    if kind == "zeros":
        values = [0.0] * n
    elif kind == "constant":
        values = [draw(st.floats(-lim, lim, width=32))] * n
    elif kind == "any":
        values = draw(st.lists(st.floats(-lim, lim, width=32), min_size=n, max_size=n))
    else:
        mag = draw(st.sampled_from([1e-30, 1e-6, 1.0, 6.0, 1e4, 1e30]))
        lo = 0.0 if kind == "nonnegative" else -1.0
        unit = draw(st.lists(st.floats(lo, 1.0, width=32), min_size=n, max_size=n))
        values = [max(-lim, min(lim, v * mag)) for v in unit]
    return torch.tensor(values, dtype=torch.float32).view(shape).to(dtype)


@settings(max_examples=150, deadline=None)
@given(
    x=float_tensors(),
    quant=st.sampled_from(QUANTS),
    codec=st.sampled_from(CODECS),
    per_channel=st.booleans(),
)
def test_roundtrip_property(x: torch.Tensor, quant: str, codec: str, per_channel: bool) -> None:
    per_channel = per_channel and quant == "affine_u8" and x.dim() >= 2
    roundtrip(x, quant=quant, codec=codec, per_channel=per_channel)


# --- encoding refuses -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("quant", QUANTS, ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_encode_refuses_non_finite(bad: float, quant: str, per_channel: bool) -> None:
    x = torch.rand(1, 4, 3)
    x[0, 2, 1] = bad
    with pytest.raises(CodecError, match="NaN or infinite"):
        encode_tensor(x, quant=quant, per_channel=per_channel and quant == "affine_u8")


@pytest.mark.parametrize(
    ("tensor", "kwargs"),
    [
        (torch.zeros(2, dtype=torch.int32), {}),
        (torch.zeros(2, dtype=torch.float64), {}),
        (torch.tensor(1.0), {}),
        (torch.zeros(0, 3), {}),
        (torch.zeros(2), {"quant": "int8"}),
        (torch.zeros(2), {"codec": "gzip"}),
        (torch.zeros(2), {"level": 23}),
        (torch.zeros(2), {"per_channel": True}),
        (torch.zeros(1, 2), {"per_channel": True, "quant": "none"}),
        (torch.zeros(1, 9000), {"per_channel": True}),
    ],
    ids=[
        "int",
        "float64",
        "0-d",
        "empty",
        "quant",
        "codec",
        "level",
        "per_channel_1d",
        "per_channel_none",
        "too_many_channels",
    ],
)
def test_encode_refuses_bad_arguments(tensor: torch.Tensor, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        encode_tensor(tensor, **kwargs)


# --- EncodedTensor validates untrusted fields -------------------------------------------------

VALID = EncodedTensor((1, 2, 2), "float32", "affine_u8", (0.5, 0.25), (0, 3), 1, "none", bytes(4))

INVALID_FIELDS: dict[str, dict[str, Any]] = {
    "shape_empty": {"shape": ()},
    "shape_zero": {"shape": (1, 0, 2)},
    "shape_negative": {"shape": (1, -2, 2)},
    "shape_bool": {"shape": (True, 2, 2)},
    "shape_float": {"shape": (1.0, 2, 2)},
    "shape_list": {"shape": [1, 2, 2]},
    "shape_9_dims": {"shape": (1, 2, 2, 1, 1, 1, 1, 1, 1)},
    "shape_too_many_elements": {"shape": (1, 2, MAX_NUMEL)},
    "dtype_float64": {"dtype": "float64"},
    "dtype_none": {"dtype": None},
    "quant_int8": {"quant": "int8"},
    "codec_gzip": {"codec": "gzip"},
    "scale_nan": {"scale": (math.nan, 0.25)},
    "scale_inf": {"scale": (math.inf, 0.25)},
    "scale_negative": {"scale": (-0.5, 0.25)},
    "scale_zero": {"scale": (0.0, 0.25)},
    "scale_negative_zero": {"scale": (-0.0, 0.25)},
    "scale_underflows_float32": {"scale": (1e-50, 0.25)},
    "scale_overflows_float32": {"scale": (1e39, 0.25)},
    "scale_not_float32": {"scale": (0.1, 0.25)},
    "scale_int": {"scale": (1, 0.25)},
    "scale_bool": {"scale": (True, 0.25)},
    "scale_list": {"scale": [0.5, 0.25]},
    "zp_256": {"zero_point": (0, 256)},
    "zp_negative": {"zero_point": (-1, 0)},
    "zp_float": {"zero_point": (0.0, 0)},
    "zp_bool": {"zero_point": (True, 0)},
    "scale_too_short": {"scale": (0.5,)},
    "zp_too_long": {"zero_point": (0, 0, 0)},
    "per_tensor_with_2_scales": {"axis": None},
    "axis_out_of_range": {"axis": 3},
    "axis_negative": {"axis": -2},
    "axis_bool": {"axis": True},
    "axis_str": {"axis": "1"},
    "quant_none_with_scale": {"quant": "none", "data": bytes(16)},
    "data_bytearray": {"data": bytearray(4)},
    "data_str": {"data": "abcd"},
    "data_too_long": {"data": bytes(5)},
    "data_too_short": {"data": bytes(3)},
    "zstd_empty": {"codec": "zstd", "data": b""},
    "zstd_longer_than_bound": {"codec": "zstd", "data": bytes(100)},
}


@pytest.mark.parametrize("changes", INVALID_FIELDS.values(), ids=INVALID_FIELDS.keys())
def test_encoded_tensor_refuses_invalid_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        dataclasses.replace(VALID, **changes)


ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
    st.binary(max_size=16), st.tuples(st.integers()), st.tuples(st.floats(), st.floats()),
    st.lists(st.integers(), max_size=3), st.tuples(st.integers(-2, 3), st.integers(-2, 3)),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from([f.name for f in dataclasses.fields(EncodedTensor)]), value=ANY_VALUE)
def test_any_field_value_raises_codec_error_or_decodes(field: str, value: Any) -> None:
    """Any value in any field: refused with CodecError on construction or decoding, or a tensor
    of the declared shape. Never another exception."""
    try:
        enc = dataclasses.replace(VALID, **{field: value})
        out = decode_tensor(enc)
    except CodecError:
        return
    assert out.shape == enc.shape and bool(torch.isfinite(out).all())


def test_encoded_tensor_raw_nbytes() -> None:
    assert VALID.raw_nbytes == 4
    none = EncodedTensor((1, 3), "bfloat16", "none", (), (), None, "none", bytes(6))
    assert none.raw_nbytes == 6


# --- decoding hostile data --------------------------------------------------------------------


def zstd_tensor(data: bytes, shape: tuple[int, ...] = (1, 1280)) -> EncodedTensor:
    return EncodedTensor(shape, "float32", "affine_u8", (1.0,), (0,), None, "zstd", data)


@functools.cache
def bomb(with_content_size: bool) -> bytes:
    """1 GiB of zeros as a ~32 KiB zstd frame, streamed so it is never in memory."""
    chunk = bytes(2**24)
    cctx = zstandard.ZstdCompressor(level=1)
    out = io.BytesIO()
    size = GiB if with_content_size else -1
    with cctx.stream_writer(out, size=size, closefd=False) as writer:
        for _ in range(GiB // len(chunk)):
            writer.write(chunk)
    return out.getvalue()


@pytest.mark.parametrize("with_content_size", [True, False], ids=["content_size", "no_size"])
@pytest.mark.parametrize(
    "shape", [(1, 1280), (1, 2**28), (2**30,)], ids=["small", "max_numel", "too_big"]
)
def test_zstd_bomb_fails_fast_without_allocating(
    with_content_size: bool, shape: tuple[int, ...]
) -> None:
    data = bomb(with_content_size)
    assert zstandard.frame_content_size(data) == (GiB if with_content_size else -1)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(PayloadError):
            decode_tensor(zstd_tensor(data, shape))
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 2**20


def test_zstd_bomb_declaring_a_large_shape_is_refused_by_content_size() -> None:
    # 256 MiB of u8 is a legal shape, but the frame declares 1 GiB: refused before decompressing.
    with pytest.raises(CodecError, match="content size"):
        decode_tensor(zstd_tensor(bomb(True)[:100], (1, 2**28)))


def zstd(data: bytes, **kwargs: Any) -> bytes:
    return zstandard.ZstdCompressor(**kwargs).compress(data)


CORRUPT_ZSTD = {
    "no_content_size": zstd(bytes(1280), write_content_size=False),
    "content_size_too_big": zstd(bytes(1281)),
    "content_size_too_small": zstd(bytes(1279)),
    "trailing_garbage": zstd(bytes(1280)) + b"\x00",
    "two_frames": zstd(bytes(640)) + zstd(bytes(640)),
    "same_frame_twice": zstd(bytes(1280)) + zstd(bytes(1280)),
    "skippable_frame": b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd" + zstd(bytes(1280)),
    "not_zstd": b"\x00" * 100,
    "truncated": zstd(bytes(range(256)) * 5, write_checksum=True)[:-5],
    "bad_checksum": zstd(bytes(1280), write_checksum=True)[:-1] + b"\x00",
}


@pytest.mark.parametrize("data", CORRUPT_ZSTD.values(), ids=CORRUPT_ZSTD.keys())
def test_corrupt_zstd_raises_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_tensor(zstd_tensor(data))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=1348))
def test_random_zstd_data_never_crashes(data: bytes) -> None:
    try:
        out = decode_tensor(zstd_tensor(data))
    except CodecError:
        return
    assert out.shape == (1, 1280)


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_bit_flipped_zstd_data_never_crashes(pos: int, bit: int) -> None:
    data = bytearray(encode_tensor(torch.relu(torch.linspace(-3, 6, 1280)).view(1, -1)).data)
    data[pos % len(data)] ^= 1 << bit
    try:
        out = decode_tensor(zstd_tensor(bytes(data)))
    except CodecError:
        return
    assert out.shape == (1, 1280)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", ALLOWED_DTYPES, ids=str)
def test_raw_tensor_with_non_finite_values_is_refused(bad: float, dtype: str) -> None:
    x = torch.tensor([1.0, bad]).to(torch_dtype(dtype))
    data = bytes(x.view(torch.uint8).tolist())
    with pytest.raises(CodecError, match="NaN or infinite"):
        decode_tensor(EncodedTensor((2,), dtype, "none", (), (), None, "none", data))


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES, ids=str)
def test_hostile_large_scale_still_decodes_to_finite_values(dtype: str) -> None:
    scale = float(torch.tensor(3.0e38, dtype=torch.float32))
    enc = EncodedTensor((1, 2), dtype, "affine_u8", (scale,), (0,), None, "none", b"\x00\xff")
    out = decode_tensor(enc)
    assert out.dtype == torch_dtype(dtype) and bool(torch.isfinite(out).all())


# --- tensorspec -------------------------------------------------------------------------------


def test_tensorspec_properties() -> None:
    spec = TensorSpec((1, 24, 56, 56), "float32")
    assert spec.numel_per_sample == 24 * 56 * 56
    assert spec.float32_bytes == 4 * 24 * 56 * 56
    assert TensorSpec((3,), "float16").numel_per_sample == 1


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((), "float32"), ((1, 0), "float32"), ((1, True), "float32"), ([1, 2], "float32"),
     ((1,) * 9, "float32"), ((1, 2), "float64")],
    ids=["empty", "zero_dim", "bool_dim", "list", "9_dims", "float64"],
)  # fmt: skip
def test_tensorspec_refuses_bad_specs(shape: Any, dtype: str) -> None:
    with pytest.raises(ValueError):
        TensorSpec(shape, dtype)


def test_torch_dtype() -> None:
    assert [torch_dtype(d) for d in ALLOWED_DTYPES] == [
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ]
    with pytest.raises(ValueError):
        torch_dtype("float64")


def test_prefers_per_channel_only_where_channel_ranges_differ_widely() -> None:
    g = torch.Generator().manual_seed(0)
    even = torch.rand(1, 16, 8, 8, generator=g) * 6  # post-ReLU6: every channel spans ~[0, 6]
    skewed = even.clone()
    skewed[:, :2] *= 50  # two channels dwarf the rest, as after a BatchNorm
    assert not prefers_per_channel(even)
    assert prefers_per_channel(skewed)
    # Vectors and tiny maps never: the scales would outweigh the data.
    assert not prefers_per_channel(torch.rand(1, 1280) * torch.arange(1280))
    assert not prefers_per_channel(skewed[:, :, :2, :2])
    assert not prefers_per_channel(torch.zeros(1, 16, 8, 8))
    # And it pays off: per channel cuts the error of the small channels.
    err_t = (decode_tensor(encode_tensor(skewed)) - skewed)[:, 2:].abs().max()
    err_c = (decode_tensor(encode_tensor(skewed, per_channel=True)) - skewed)[:, 2:].abs().max()
    assert err_c < err_t / 10
