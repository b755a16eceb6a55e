"""The versioned msgpack frame that carries activations from the device to the cloud.

Pure: bytes in, bytes out. A frame is one msgpack map; every key is required and no other key is
accepted. Floats are packed as float32 and tensor data as msgpack ``bin``.

============  =========================  =======================================================
key           msgpack type               meaning
============  =========================  =======================================================
``v``         int                        wire version, ``WIRE_VERSION``; checked first
``model``     str                        model name, ``[A-Za-z0-9_.-]``, 1..128 chars
``fp``        str                        weights fingerprint, 8..64 lowercase hex digits
``split``     str                        split point name, printable ASCII, 1..200 chars
``id``        str                        client-chosen request id, printable ASCII, 1..128 chars
``t``         array of 1..16 maps        the tensors, each with exactly the keys below
============  =========================  =======================================================

============  =========================  =======================================================
tensor key    msgpack type               meaning
============  =========================  =======================================================
``shape``     array of int               full shape, batch first
``dtype``     str                        ``float32`` | ``float16`` | ``bfloat16``
``q``         str                        ``affine_u8`` | ``none``
``scale``     array of float32           ``[]`` when ``q`` is ``none``
``zp``        array of int               zero points in [0, 255]
``axis``      int or nil                 nil = per-tensor quantization
``codec``     str                        ``zstd`` | ``none``
``data``      bin                        see ``shared.codec`` for what these fields mean
============  =========================  =======================================================

``decode`` checks the size before parsing, parses with tight msgpack limits and a budget of
``MAX_CONTAINERS`` arrays and maps in all (a frame has at most 66: counted while unpacking, so a
body of millions of tiny containers stops after the first few hundred), refuses ext types and
duplicate keys, and builds validated ``Frame`` and ``EncodedTensor`` objects; it never
decompresses. A server calls ``decode``, then ``check_shapes`` against the split point, and only
then ``shared.codec.decode_tensor``. Malformed input raises a ``PayloadError`` and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from shared.codec import MAX_CHANNELS, EncodedTensor
from shared.errors import PayloadTooLargeError, ShapeMismatchError, VersionError, WireError
from shared.tensorspec import TensorSpec

__all__ = ["CONTENT_TYPE", "WIRE_VERSION", "Frame", "check_shapes", "decode", "encode"]

WIRE_VERSION = 1
CONTENT_TYPE = "application/msgpack"
MAX_TENSORS = 16
DEFAULT_MAX_FRAME_BYTES = 64 * 2**20

# Arrays and maps in the largest valid frame: the root map, 't', and per tensor its map and the
# 'shape', 'scale' and 'zp' arrays: 2 + 4 * MAX_TENSORS = 66. Every other object sits in one of
# them, at most max_array_len each, so this also bounds the scalars and the nesting depth.
MAX_CONTAINERS = 2 + 4 * MAX_TENSORS

_FRAME_KEYS = frozenset({"v", "model", "fp", "split", "id", "t"})
_TENSOR_KEYS = frozenset({"shape", "dtype", "q", "scale", "zp", "axis", "codec", "data"})
_MODEL_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{8,64}")
_SPLIT_RE = re.compile(r"[\x20-\x7e]{1,200}")
_REQUEST_ID_RE = re.compile(r"[\x20-\x7e]{1,128}")


@dataclass(frozen=True)
class Frame:
    """One request's activations plus what the server needs to pick the tail that eats them.

    >>> import numpy as np
    >>> from shared.codec import encode_array
    >>> t = encode_array(np.zeros((1, 8), np.float32))
    >>> frame = Frame("efficientnet_lite0", "0123abcd", "features.3", "req-1", (t,))
    >>> decode(encode(frame)) == frame
    True
    """

    model: str
    fingerprint: str
    split: str
    request_id: str
    tensors: tuple[EncodedTensor, ...]
    version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version != WIRE_VERSION:
            version = _preview(self.version)
            raise VersionError(f"frame version {version}; this side speaks {WIRE_VERSION}")
        for name, value, pattern in (
            ("model", self.model, _MODEL_RE),
            ("fingerprint", self.fingerprint, _FINGERPRINT_RE),
            ("split", self.split, _SPLIT_RE),
            ("request_id", self.request_id, _REQUEST_ID_RE),
        ):
            if type(value) is not str or pattern.fullmatch(value) is None:
                raise WireError(f"{name} {_preview(value)} does not match {pattern.pattern}")
        tensors = self.tensors
        if not isinstance(tensors, tuple) or not 1 <= len(tensors) <= MAX_TENSORS:
            raise WireError(f"a frame carries a tuple of 1..{MAX_TENSORS} tensors")
        if not all(isinstance(t, EncodedTensor) for t in tensors):
            raise WireError("tensors must be EncodedTensor objects")

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data in the frame, compressed as sent."""
        return sum(len(t.data) for t in self.tensors)


def encode(frame: Frame) -> bytes:
    """Serialize a frame to msgpack bytes.

    >>> t = EncodedTensor((1, 2), "float32", "affine_u8", (1.0,), (0,), None, "none", b"\\0\\0")
    >>> encode(Frame("resnet18", "0123abcd", "layer2", "req-1", (t,)))[:1]  # a map of 6 keys
    b'\\x86'
    """
    doc = {
        "v": frame.version,
        "model": frame.model,
        "fp": frame.fingerprint,
        "split": frame.split,
        "id": frame.request_id,
        "t": [
            {
                "shape": list(t.shape),
                "dtype": t.dtype,
                "q": t.quant,
                "scale": list(t.scale),
                "zp": list(t.zero_point),
                "axis": t.axis,
                "codec": t.codec,
                "data": t.data,
            }
            for t in frame.tensors
        ],
    }
    # Scales are float32-representable by construction, so single floats lose nothing.
    out: bytes = msgpack.packb(doc, use_bin_type=True, use_single_float=True)
    return out


def decode(data: bytes, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Parse and validate a frame; never decompresses.

    Raises ``PayloadTooLargeError`` over ``max_frame_bytes``, ``VersionError`` for another wire
    version, ``WireError`` for anything malformed and ``CodecError`` for invalid tensor fields.

    >>> t = EncodedTensor((1, 2), "float32", "affine_u8", (1.0,), (0,), None, "none", b"\\0\\0")
    >>> decode(encode(Frame("resnet18", "0123abcd", "layer2", "req-1", (t,)))).tensors[0].shape
    (1, 2)
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"a frame is bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_frame_bytes:
        raise PayloadTooLargeError(f"frame is {size} bytes, limit is {max_frame_bytes}")
    budget = _ContainerBudget()
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=budget.map,
            list_hook=budget.array,
            ext_hook=_refuse_ext,
            max_bin_len=max_frame_bytes,
            max_str_len=4096,
            max_array_len=MAX_CHANNELS,
            max_map_len=32,
            max_ext_len=0,
        )
    except WireError:
        raise
    except Exception as exc:
        # msgpack's docs: unpackb may raise more than UnpackException, so "catch Exception".
        raise WireError(f"not a msgpack frame: {type(exc).__name__}: {exc}") from exc
    if not isinstance(doc, dict):
        raise WireError(f"a frame is a msgpack map, got {type(doc).__name__}")
    if "v" not in doc:
        raise WireError("frame has no version key 'v'")
    version = doc["v"]
    if type(version) is not int:
        raise WireError(f"frame version must be an int, got {_preview(version)}")
    if version != WIRE_VERSION:
        raise VersionError(f"frame has wire version {version}; this side speaks {WIRE_VERSION}")
    _check_keys(doc, _FRAME_KEYS, "frame")
    tensors = doc["t"]
    if type(tensors) is not list or not 1 <= len(tensors) <= MAX_TENSORS:
        raise WireError(f"'t' must be an array of 1..{MAX_TENSORS} tensors")
    return Frame(
        model=doc["model"],
        fingerprint=doc["fp"],
        split=doc["split"],
        request_id=doc["id"],
        tensors=tuple(_tensor(t, i) for i, t in enumerate(tensors)),
        version=version,
    )


def check_shapes(frame: Frame, expected: Sequence[TensorSpec], *, max_batch: int = 64) -> int:
    """Check a frame's tensors against the split point's specs; return the batch size.

    Raises ``ShapeMismatchError`` naming the tensor index and both shapes.

    >>> t = EncodedTensor((4, 2), "float32", "affine_u8", (1.0,), (0,), None, "none", bytes(8))
    >>> frame = Frame("resnet18", "0123abcd", "layer2", "req-1", (t,))
    >>> check_shapes(frame, [TensorSpec((1, 2), "float32")])
    4
    """
    if len(frame.tensors) != len(expected):
        raise ShapeMismatchError(
            f"frame has {len(frame.tensors)} tensors, split point takes {len(expected)}"
        )
    batch = frame.tensors[0].shape[0]
    for i, (t, spec) in enumerate(zip(frame.tensors, expected, strict=True)):
        if t.shape[1:] != spec.shape[1:] or t.dtype != spec.dtype or t.shape[0] != batch:
            raise ShapeMismatchError(
                f"tensor {i}: got {t.shape} {t.dtype}, expected "
                f"{('N', *spec.shape[1:])} {spec.dtype} with N={batch} for every tensor"
            )
    if not 1 <= batch <= max_batch:
        raise ShapeMismatchError(f"tensor 0: batch size {batch} is over the limit {max_batch}")
    return batch


def _tensor(obj: object, i: int) -> EncodedTensor:
    if type(obj) is not dict:
        raise WireError(f"tensor {i} must be a map")
    _check_keys(obj, _TENSOR_KEYS, f"tensor {i}")
    for key, typ in (("shape", list), ("scale", list), ("zp", list), ("data", bytes)):
        if type(obj[key]) is not typ:
            raise WireError(f"tensor {i}: {key!r} must be {typ.__name__}")
    # EncodedTensor checks element types and values, raising CodecError.
    return EncodedTensor(
        shape=tuple(obj["shape"]),
        dtype=obj["dtype"],
        quant=obj["q"],
        scale=tuple(obj["scale"]),
        zero_point=tuple(obj["zp"]),
        axis=obj["axis"],
        codec=obj["codec"],
        data=obj["data"],
    )


def _check_keys(doc: dict[Any, Any], allowed: frozenset[str], what: str) -> None:
    if doc.keys() != allowed:
        unknown = sorted(map(repr, doc.keys() - allowed))
        missing = sorted(allowed - doc.keys())
        raise WireError(f"{what}: unknown keys {unknown}, missing keys {missing}")


class _ContainerBudget:
    """msgpack hooks, called as each array or map is completed, that stop unpacking at the
    ``MAX_CONTAINERS + 1``-th one: the cost of a hostile body is bounded by the budget, not by
    the millions of objects it describes."""

    def __init__(self) -> None:
        self.left = MAX_CONTAINERS

    def _spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise WireError(f"frame has more than {MAX_CONTAINERS} arrays and maps; "
                            "a frame needs at most that many")

    def array(self, items: list[Any]) -> list[Any]:
        self._spend()
        return items

    def map(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        self._spend()
        # msgpack keeps the last of duplicate keys; two different values for "v" must not pass.
        doc = dict(pairs)
        if len(doc) != len(pairs):
            raise WireError("map has duplicate keys")
        return doc


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise WireError(f"msgpack ext type {code} is not allowed")


def _preview(value: object) -> str:
    # Untrusted values go into error messages and logs: bounded in length, escaped by repr.
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
