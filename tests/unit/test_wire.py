"""Tests for shared.wire: the frame layout, sizes, strict decoding of garbage, check_shapes."""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any

import msgpack
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import EncodedTensor
from shared.codec_torch import decode_tensor, encode_tensor
from shared.errors import (
    PayloadError,
    PayloadTooLargeError,
    ShapeMismatchError,
    VersionError,
    WireError,
)
from shared.tensorspec import TensorSpec
from shared.wire import WIRE_VERSION, Frame, check_shapes, decode, encode

MODEL, FP, SPLIT, RID = "efficientnet_lite0", "0123abcd", "features.3", "req-1"


def make_frame(*tensors: torch.Tensor, **kwargs: Any) -> Frame:
    encoded = tuple(encode_tensor(t, **kwargs) for t in tensors)
    return Frame(MODEL, FP, SPLIT, RID, encoded)


def relu6_field(shape: tuple[int, ...], low: int = 7, seed: int = 0) -> torch.Tensor:
    """A smooth random field through ReLU6: about half zeros, like a real activation."""
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(shape[0], shape[1], low, low, generator=g)
    return F.relu6(3 * F.interpolate(field, size=shape[2:], mode="bilinear", align_corners=False))


def assert_payload_error_or_valid(data: bytes) -> None:
    """Garbage must raise a PayloadError, or else decode to tensors of the declared shapes."""
    try:
        frame = decode(data)
        for t in frame.tensors:
            assert decode_tensor(t).shape == t.shape
    except PayloadError:
        pass


# --- layout, round trips, sizes ---------------------------------------------------------------


def test_frame_layout() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    frame = make_frame(x, codec="none")
    doc = msgpack.unpackb(encode(frame))
    assert doc == {
        "v": 1,
        "model": MODEL,
        "fp": FP,
        "split": SPLIT,
        "id": RID,
        "t": [
            {
                "shape": [1, 4],
                "dtype": "float32",
                "q": "affine_u8",
                "scale": [pytest.approx(3 / 255)],
                "zp": [0],
                "axis": None,
                "codec": "none",
                "data": bytes([0, 85, 170, 255]),
            }
        ],
    }
    assert encode(frame)[:1] == b"\x86"  # a map of 6 entries; the scale is a float32 (0xca)
    assert b"\xca" in encode(frame) and b"\xcb" not in encode(frame)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"per_channel": True}, {"quant": "none"}, {"codec": "none"}, {"level": 19}],
    ids=["affine_u8", "per_channel", "quant_none", "codec_none", "level_19"],
)
def test_roundtrip(kwargs: dict[str, Any]) -> None:
    tensors = (relu6_field((1, 24, 14, 14)), torch.randn(1, 40, 7, 7), torch.rand(1, 1280))
    frame = make_frame(*tensors, **kwargs)
    assert decode(encode(frame)) == frame
    assert frame.payload_bytes == sum(len(t.data) for t in frame.tensors)


@settings(max_examples=50, deadline=None)
@given(
    model=st.from_regex(r"[A-Za-z0-9_.\-]{1,128}", fullmatch=True),
    fp=st.from_regex(r"[0-9a-f]{8,64}", fullmatch=True),
    split=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=200),
    rid=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=128),
    n=st.integers(1, 16),
    batch=st.integers(1, 4),
)
def test_roundtrip_property(model: str, fp: str, split: str, rid: str, n: int, batch: int) -> None:
    tensors = tuple(encode_tensor(torch.randn(batch, i + 1)) for i in range(n))
    frame = Frame(model, fp, split, rid, tensors)
    assert decode(encode(frame)) == frame


def test_overhead_of_a_one_tensor_frame() -> None:
    frame = make_frame(torch.rand(1, 1280) * 6)
    overhead = len(encode(frame)) - frame.payload_bytes
    assert overhead <= 150
    # Without the four identifying strings, the fixed cost of keys and headers.
    assert overhead - len(MODEL + FP + SPLIT + RID) <= 110


def test_pooled_features_frame_under_30_percent_of_float32() -> None:
    x = torch.rand(1, 1280, generator=torch.Generator().manual_seed(0)) * 6
    assert len(encode(make_frame(x))) <= 1536  # 30% of 1280 * 4 bytes


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_activation_frame_well_under_30_percent_of_float32(per_channel: bool) -> None:
    x = relu6_field((1, 24, 56, 56))
    spec = TensorSpec((1, 24, 56, 56), "float32")
    assert len(encode(make_frame(x, per_channel=per_channel))) <= 0.2 * spec.float32_bytes


# --- garbage ----------------------------------------------------------------------------------

SMALL = make_frame(relu6_field((1, 4, 8, 8)), torch.rand(1, 16), per_channel=True)
SMALL_BYTES = encode(SMALL)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode(data)


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(max_size=64))
def test_msgpack_map_prefix_plus_random_bytes(tail: bytes) -> None:
    assert_payload_error_or_valid(b"\x86\xa1v\x01" + tail)


def test_every_prefix_of_a_frame_raises_wire_error() -> None:
    for end in range(len(SMALL_BYTES)):
        with pytest.raises(WireError):
            decode(SMALL_BYTES[:end])


def test_every_bit_flip_raises_payload_error_or_decodes() -> None:
    for pos in range(len(SMALL_BYTES)):
        for bit in range(8):
            data = bytearray(SMALL_BYTES)
            data[pos] ^= 1 << bit
            assert_payload_error_or_valid(bytes(data))


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 10**6), value=st.integers(0, 255), cut=st.integers(0, 8))
def test_byte_overwrites_and_trailing_bytes(pos: int, value: int, cut: int) -> None:
    data = bytearray(SMALL_BYTES)
    data[pos % len(data)] = value
    assert_payload_error_or_valid(bytes(data) + bytes(cut))


@pytest.mark.parametrize(
    "obj",
    [{"v": 1}, [1, 2, 3], "frame", b"\x00" * 8, SMALL, torch.zeros(2)],
    ids=["dict", "list", "str", "bytes", "frame_object", "tensor"],
)
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL], ids=str)
def test_pickle_payload_raises_wire_error(obj: object, protocol: int) -> None:
    with pytest.raises(WireError):
        decode(pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("version", [0, 2, -1, 2**40], ids=str)
def test_other_wire_version_raises_version_error(version: int) -> None:
    doc = msgpack.unpackb(SMALL_BYTES)
    doc["v"] = version
    with pytest.raises(VersionError, match=f"{version}.*{WIRE_VERSION}"):
        decode(msgpack.packb(doc))


@pytest.mark.parametrize("version", ["1", None, True, 1.0, [1]], ids=repr)
def test_non_int_version_raises_wire_error(version: object) -> None:
    doc = msgpack.unpackb(SMALL_BYTES)
    doc["v"] = version
    with pytest.raises(WireError) as info:
        decode(msgpack.packb(doc))
    assert not isinstance(info.value, VersionError)


def test_version_is_checked_before_anything_else() -> None:
    # A future version may change every other key; the error must still say "version".
    with pytest.raises(VersionError):
        decode(msgpack.packb({"v": 2, "something": "new"}))
    with pytest.raises(WireError, match="version"):
        decode(msgpack.packb({"model": MODEL}))


def frame_doc() -> dict[str, Any]:
    doc: dict[str, Any] = msgpack.unpackb(SMALL_BYTES)
    return copy.deepcopy(doc)


def tensor_field(key: str, value: Any) -> dict[str, Any]:
    doc = frame_doc()
    doc["t"][0][key] = value
    return doc


def top_field(key: str, value: Any) -> dict[str, Any]:
    doc = frame_doc()
    doc[key] = value
    return doc


def without(key: str, tensor: bool = False) -> dict[str, Any]:
    doc = frame_doc()
    del (doc["t"][0] if tensor else doc)[key]
    return doc


T0 = frame_doc()["t"][0]
MALFORMED: dict[str, Any] = {
    "not_a_map": [1, "model"],
    "int": 1,
    "nil": None,
    "missing_model": without("model"),
    "missing_tensors": without("t"),
    "missing_data": without("data", tensor=True),
    "missing_axis": without("axis", tensor=True),
    "extra_top_key": top_field("extra", 1),
    "extra_tensor_key": tensor_field("pickle", b"x"),
    "bytes_key": {**frame_doc(), b"v2": 1},
    "model_empty": top_field("model", ""),
    "model_space": top_field("model", "resnet 18"),
    "model_bytes": top_field("model", b"resnet18"),
    "model_too_long": top_field("model", "m" * 129),
    "fp_upper": top_field("fp", "0123ABCD"),
    "fp_short": top_field("fp", "0123abc"),
    "fp_long": top_field("fp", "a" * 65),
    "fp_int": top_field("fp", 0x0123ABCD),
    "split_empty": top_field("split", ""),
    "split_too_long": top_field("split", "s" * 201),
    "split_newline": top_field("split", "layer1\nlayer2"),
    "id_too_long": top_field("id", "r" * 129),
    "id_empty": top_field("id", ""),
    "id_non_ascii": top_field("id", "réq"),
    "id_none": top_field("id", None),
    "no_tensors": top_field("t", []),
    "17_tensors": top_field("t", [T0] * 17),
    "tensors_map": top_field("t", T0),
    "tensor_not_map": top_field("t", [[1, 2]]),
    "shape_huge": tensor_field("shape", [1, 2**40]),
    "shape_u64_max": tensor_field("shape", [1, 2**64 - 1]),
    "shape_negative": tensor_field("shape", [1, -4, 8, 8]),
    "shape_zero": tensor_field("shape", [1, 0, 8, 8]),
    "shape_float": tensor_field("shape", [1, 4.0, 8, 8]),
    "shape_bool": tensor_field("shape", [True, 4, 8, 8]),
    "shape_str": tensor_field("shape", "1,4,8,8"),
    "shape_nested": tensor_field("shape", [[1, 4], 8, 8]),
    "shape_empty": tensor_field("shape", []),
    "shape_9_dims": tensor_field("shape", [1] * 9),
    "shape_wrong_numel": tensor_field("shape", [1, 4, 8, 9]),
    "dtype_float64": tensor_field("dtype", "float64"),
    "dtype_int": tensor_field("dtype", 4),
    "quant_int8": tensor_field("q", "int8"),
    "codec_lz4": tensor_field("codec", "lz4"),
    "codec_pickle": tensor_field("codec", "pickle"),
    "scale_nan": tensor_field("scale", [math.nan] * 4),
    "scale_inf": tensor_field("scale", [math.inf] * 4),
    "scale_negative": tensor_field("scale", [-0.5] * 4),
    "scale_zero": tensor_field("scale", [0.0] * 4),
    "scale_ints": tensor_field("scale", [1] * 4),
    "scale_too_short": tensor_field("scale", [0.5] * 3),
    "scale_too_long": tensor_field("scale", [0.5] * 5),
    "scale_not_list": tensor_field("scale", 0.5),
    "zp_256": tensor_field("zp", [256] * 4),
    "zp_negative": tensor_field("zp", [-1] * 4),
    "zp_float": tensor_field("zp", [0.0] * 4),
    "zp_bool": tensor_field("zp", [False] * 4),
    "zp_too_short": tensor_field("zp", [0]),
    "axis_out_of_range": tensor_field("axis", 4),
    "axis_negative": tensor_field("axis", -1),
    "axis_str": tensor_field("axis", "1"),
    "axis_nil_with_4_scales": tensor_field("axis", None),
    "data_str": tensor_field("data", "\x00" * 16),
    "data_list": tensor_field("data", [0] * 16),
    "data_longer_than_zstd_bound": tensor_field("data", bytes(400)),
    "data_other_zstd_frame": tensor_field("data", encode_tensor(torch.zeros(1, 300)).data),
    "data_empty": tensor_field("data", b""),
    "data_ext": tensor_field("data", msgpack.ExtType(1, b"\x00" * 16)),
    "ext_top_level": msgpack.ExtType(42, b"x"),
    "ext_value": top_field("model", msgpack.ExtType(0, b"resnet18")),
    "timestamp": top_field("id", msgpack.Timestamp(0)),
}


@pytest.mark.parametrize("doc", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_raise_payload_error(doc: Any) -> None:
    # Most are refused by decode; a wrong shape over zstd data only when the header is read.
    with pytest.raises(PayloadError):
        for t in decode(msgpack.packb(doc, use_bin_type=True)).tensors:
            decode_tensor(t)


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=16) | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(sorted({*frame_doc(), *(f"t.{k}" for k in frame_doc()["t"][0])})),
    value=MSGPACK_VALUES,
)
def test_any_value_in_any_field_raises_payload_error_or_decodes(key: str, value: Any) -> None:
    """Every field of a real frame replaced by any msgpack value: a PayloadError, or a frame
    whose tensors decode to their declared shapes. Never another exception."""
    doc = frame_doc()
    target, name = (doc["t"][0], key[2:]) if key.startswith("t.") else (doc, key)
    target[name] = value
    assert_payload_error_or_valid(msgpack.packb(doc, use_bin_type=True))


def test_raw_none_data_longer_than_declared() -> None:
    doc = msgpack.unpackb(encode(make_frame(torch.zeros(1, 4), codec="none")))
    doc["t"][0]["data"] += b"\x00"
    with pytest.raises(PayloadError, match="shape implies"):
        decode(msgpack.packb(doc))


def packed_map(pairs: list[tuple[Any, Any]]) -> bytes:
    packer = msgpack.Packer()
    return packer.pack_map_header(len(pairs)) + b"".join(
        packer.pack(k) + packer.pack(v) for k, v in pairs
    )


RAW_GARBAGE = {
    "empty": b"",
    "duplicate_version": packed_map([("v", 1), *frame_doc().items(), ("v", 2)]),
    "duplicate_model": packed_map([("model", "resnet18"), *frame_doc().items()]),
    "int_key": packed_map([(1, 1), *frame_doc().items()]),
    "nested_arrays": b"\x91" * 100_000 + b"\xc0",
    "nested_maps": b"\x81\xa1a" * 100_000 + b"\xc0",
    "array32_claims_4g_items": b"\xdd\xff\xff\xff\xff",
    "map32_claims_4g_items": b"\xdf\xff\xff\xff\xff",
    "bin32_claims_4gib": b"\xc6\xff\xff\xff\xff" + b"\x00" * 16,
    "str32_claims_4gib": b"\xdb\xff\xff\xff\xff" + b"a" * 16,
    "invalid_utf8": msgpack.packb({"v": 1, "model": b"\xff\xfe"}, use_bin_type=False),
    "reserved_byte_c1": b"\xc1",
    "trailing_bytes": SMALL_BYTES + b"\x00",
    "two_frames": SMALL_BYTES + SMALL_BYTES,
    "json": b'{"v": 1, "model": "resnet18"}',
}


@pytest.mark.parametrize("data", RAW_GARBAGE.values(), ids=RAW_GARBAGE.keys())
def test_raw_garbage_raises_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        decode(data)


@pytest.mark.parametrize(
    "doc",
    [
        {**frame_doc(), "t": [0] * 10_000},
        {"v": 1, "id": "r" * 5000},
        dict.fromkeys(map(str, range(40))),
    ],
    ids=["array_10k", "str_5000", "map_40"],
)
def test_msgpack_length_limits_apply_while_parsing(doc: dict[str, Any]) -> None:
    with pytest.raises(WireError, match="not a msgpack frame"):
        decode(msgpack.packb(doc))


def test_frame_over_size_limit_raises_payload_too_large() -> None:
    with pytest.raises(PayloadTooLargeError):
        decode(SMALL_BYTES, max_frame_bytes=len(SMALL_BYTES) - 1)
    assert decode(SMALL_BYTES, max_frame_bytes=len(SMALL_BYTES)) == SMALL
    with pytest.raises(PayloadTooLargeError):
        decode(bytes(64 * 2**20 + 1))


@pytest.mark.parametrize("data", ["text", None, 42], ids=repr)
def test_non_bytes_input_raises_wire_error(data: Any) -> None:
    with pytest.raises(WireError):
        decode(data)


def test_bytearray_and_memoryview_input() -> None:
    assert decode(bytearray(SMALL_BYTES)) == SMALL == decode(memoryview(SMALL_BYTES))


@pytest.mark.parametrize(
    "changes",
    [{"version": 2}, {"version": True}, {"tensors": list(SMALL.tensors)}, {"tensors": ()},
     {"tensors": ("tensor",)}, {"model": ""}, {"fingerprint": "XYZ"}, {"request_id": "\x00"}],
    ids=["version_2", "version_bool", "list", "empty", "not_encoded", "model", "fp", "id"],
)  # fmt: skip
def test_frame_validates_on_construction(changes: dict[str, Any]) -> None:
    fields = {
        "model": MODEL,
        "fingerprint": FP,
        "split": SPLIT,
        "request_id": RID,
        "tensors": SMALL.tensors,
    }
    with pytest.raises(WireError):
        Frame(**{**fields, **changes})


# --- check_shapes -----------------------------------------------------------------------------

SPECS = [TensorSpec((1, 4, 8, 8), "float32"), TensorSpec((1, 16), "float32")]


@pytest.mark.parametrize("batch", [1, 4, 64], ids=str)
def test_check_shapes_returns_batch(batch: int) -> None:
    frame = make_frame(torch.rand(batch, 4, 8, 8), torch.rand(batch, 16))
    assert check_shapes(frame, SPECS) == batch


def et(shape: tuple[int, ...], dtype: str = "float32") -> EncodedTensor:
    return EncodedTensor(
        shape, dtype, "affine_u8", (1.0,), (0,), None, "none", bytes(math.prod(shape))
    )


SHAPE_MISMATCHES = {
    "too_few_tensors": ((et((1, 4, 8, 8)),), "1 tensors"),
    "too_many_tensors": ((et((1, 4, 8, 8)), et((1, 16)), et((1, 16))), "3 tensors"),
    "channels": ((et((1, 5, 8, 8)), et((1, 16))), r"tensor 0: got \(1, 5, 8, 8\)"),
    "ndim": ((et((1, 4, 64)), et((1, 16))), r"tensor 0: got \(1, 4, 64\)"),
    "dtype": ((et((1, 4, 8, 8)), et((1, 16), "float16")), "tensor 1: .*float16"),
    "batch_differs": ((et((2, 4, 8, 8)), et((1, 16))), r"tensor 1: got \(1, 16\)"),
    "batch_over_limit": ((et((65, 4, 8, 8)), et((65, 16))), "batch size 65"),
}


@pytest.mark.parametrize(
    ("tensors", "message"), SHAPE_MISMATCHES.values(), ids=SHAPE_MISMATCHES.keys()
)
def test_check_shapes_mismatch(tensors: tuple[EncodedTensor, ...], message: str) -> None:
    frame = Frame(MODEL, FP, SPLIT, RID, tensors)
    with pytest.raises(ShapeMismatchError, match=message):
        check_shapes(frame, SPECS)


def test_check_shapes_max_batch() -> None:
    frame = Frame(MODEL, FP, SPLIT, RID, (et((8, 16)),))
    assert check_shapes(frame, [TensorSpec((1, 16), "float32")], max_batch=8) == 8
    with pytest.raises(ShapeMismatchError, match="expected"):
        check_shapes(frame, [TensorSpec((1, 17), "float32")])
    with pytest.raises(ShapeMismatchError):
        check_shapes(frame, [TensorSpec((1, 16), "float32")], max_batch=7)


def _many_containers(item: bytes, rows: int = 512, inner: int = 2044) -> bytes:
    row = b"\xdd" + inner.to_bytes(4, "big") + item * inner
    return b"\xdd" + rows.to_bytes(4, "big") + row * rows


@pytest.mark.parametrize("item", [b"\x80", b"\x90"], ids=["empty_maps", "empty_arrays"])
def test_decode_stops_at_the_container_budget(item: bytes) -> None:
    """A million tiny containers (issue 12): refused after the first few dozen, not unpacked."""
    with pytest.raises(WireError, match="arrays and maps"):
        decode(_many_containers(item))


def test_the_largest_valid_frame_fits_the_container_budget() -> None:
    tensors = tuple(et((1, 4, 8, 8)) for _ in range(16))
    assert len(decode(encode(Frame(MODEL, FP, SPLIT, RID, tensors))).tensors) == 16
