"""Quantization and entropy coding of activations: a tensor in, an ``EncodedTensor`` out, and back.

Pure: no I/O, no global state. ``shared.wire`` puts ``EncodedTensor`` fields into a frame as is.

=============  ==================================================================================
field          meaning
=============  ==================================================================================
``shape``      full shape, batch first: 1..8 dims, each >= 1, at most ``MAX_NUMEL`` elements
``dtype``      source dtype, one of ``ALLOWED_DTYPES``; ``decode_tensor`` returns this dtype
``quant``      ``"affine_u8"``: one byte per element, ``x ~= (q - zero_point) * scale``;
               ``"none"``: the source dtype's raw little-endian bytes (lossless)
``scale``      float32-representable floats, finite and > 0; one per tensor, or ``shape[axis]``
               of them per channel; ``()`` when ``quant == "none"``
``zero_point`` ints in [0, 255], one per scale
``axis``       ``None`` for per-tensor parameters, else the axis the scales run along
``codec``      ``"zstd"``: exactly one zstd frame that declares its content size; ``"none"``
``data``       the bytes; row-major (C order) element order
=============  ==================================================================================

Quantization is uint8 affine. The range always includes 0 so that zero (most of a post-ReLU
activation) is exact, and the error of every element is at most ``scale / 2`` plus float
rounding. Decoding is safe on hostile input: ``EncodedTensor`` validates itself on construction,
and the decompressed size is computed from the shape *before* zstd runs, must match the frame
header, and caps the output buffer. Any problem raises ``CodecError``.

The core is numpy: the device encodes arrays (``encode_array``) and imports no torch. The service
decodes into torch tensors with ``shared.codec_torch`` (torch side), which also encodes tensors
for the torch device; both encoders write the same bytes for the same float32 values.

    >>> enc = encode_array(np.zeros((1, 1280), np.float32))
    >>> enc.quant, enc.codec, enc.shape, len(decompress(enc))
    ('affine_u8', 'zstd', (1, 1280), 1280)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import zstandard

from shared.errors import CodecError
from shared.tensorspec import ALLOWED_DTYPES, DTYPE_ITEMSIZE, MAX_NDIM

__all__ = [
    "CODECS",
    "MAX_CHANNELS",
    "MAX_NUMEL",
    "QUANTS",
    "EncodedTensor",
    "decompress",
    "encode_array",
    "prefers_per_channel_array",
    "zstd_compress",
]

QUANTS: tuple[str, ...] = ("affine_u8", "none")
CODECS: tuple[str, ...] = ("zstd", "none")

#: Most elements one tensor may have (1 GiB as raw float32). Servers bound it far tighter by
#: checking shapes against the split point before decoding.
MAX_NUMEL = 2**28
#: Most per-channel scales one tensor may carry.
MAX_CHANNELS = 8192

# ZSTD_minCLevel() and ZSTD_maxCLevel() of libzstd; negative levels are its fast modes.
MIN_LEVEL = -(1 << 17)
MAX_LEVEL: int = zstandard.MAX_COMPRESSION_LEVEL
#: Smallest normal float32. Scales below it would be subnormal: slow on x86, and imprecise.
MIN_SCALE = 2.0**-126


def _zstd_bound(n: int) -> int:
    """Largest zstd frame that libzstd writes for ``n`` input bytes (ZSTD_COMPRESSBOUND, zstd.h)."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0)


def _valid_scales(scale: tuple[float, ...]) -> bool:
    """True if every scale is a float, finite, > 0 and exactly representable as float32."""
    if any(type(s) is not float for s in scale):
        return False
    s64 = np.asarray(scale, dtype=np.float64)
    # Casting to float32 turns too-large values into inf and too-small ones into 0.
    with np.errstate(over="ignore", under="ignore"):
        s32 = s64.astype(np.float32)
    return bool((np.isfinite(s32) & (s32 > 0) & (s32.astype(np.float64) == s64)).all())


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor as it travels: everything needed to decode it, nothing that names code.

    Validates itself (raising ``CodecError``) because it is also built from untrusted frames.
    """

    shape: tuple[int, ...]
    dtype: str
    quant: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None
    codec: str
    data: bytes

    def __post_init__(self) -> None:
        shape = self.shape
        if not isinstance(shape, tuple) or not 1 <= len(shape) <= MAX_NDIM:
            raise CodecError(f"shape must have 1..{MAX_NDIM} dims, got {shape!r:.60}")
        if any(type(d) is not int or d < 1 for d in shape):
            raise CodecError(f"shape dims must be ints >= 1, got {shape!r:.60}")
        if math.prod(shape) > MAX_NUMEL:
            raise CodecError(f"shape {shape!r:.60} has more than {MAX_NUMEL} elements")
        for name, value, allowed in (
            ("dtype", self.dtype, ALLOWED_DTYPES),
            ("quant", self.quant, QUANTS),
            ("codec", self.codec, CODECS),
        ):
            if type(value) is not str or value not in allowed:
                raise CodecError(f"{name} must be one of {allowed}, got {value!r:.60}")
        self._check_quant_params()
        if type(self.data) is not bytes:
            raise CodecError(f"data must be bytes, got {type(self.data).__name__}")
        raw, got = self.raw_nbytes, len(self.data)
        if self.codec == "none" and got != raw:
            raise CodecError(f"uncompressed data is {got} bytes, shape implies {raw}")
        if self.codec == "zstd" and not 0 < got <= _zstd_bound(raw):
            raise CodecError(f"zstd data is {got} bytes, too long for {raw} bytes decompressed")

    def _check_quant_params(self) -> None:
        scale, zp, axis = self.scale, self.zero_point, self.axis
        if not isinstance(scale, tuple) or not isinstance(zp, tuple):
            raise CodecError("scale and zero_point must be tuples")
        if axis is not None and type(axis) is not int:
            raise CodecError(f"axis must be None or an int, got {axis!r:.60}")
        if self.quant == "none":
            if scale or zp or axis is not None:
                raise CodecError('quant "none" takes no scale, zero_point or axis')
            return
        if axis is None:
            want = 1
        elif 0 <= axis < len(self.shape):
            want = self.shape[axis]
        else:
            raise CodecError(f"axis {axis} out of range for {len(self.shape)} dims")
        if len(scale) != want or len(zp) != want or want > MAX_CHANNELS:
            raise CodecError(
                f"need {want} scales and zero points (at most {MAX_CHANNELS}), "
                f"got {len(scale)} and {len(zp)}"
            )
        if not _valid_scales(scale):
            bad = [s for s in scale if not _valid_scales((s,))][:3]
            raise CodecError(f"scales must be finite float32 values > 0, got {bad!r:.60}")
        for i, z in enumerate(zp):
            if type(z) is not int or not 0 <= z <= 255:
                raise CodecError(f"zero_point[{i}] must be an int in [0, 255], got {z!r:.60}")

    @property
    def raw_nbytes(self) -> int:
        """Byte length of ``data`` once decompressed, implied by shape, quant and dtype."""
        itemsize = 1 if self.quant == "affine_u8" else DTYPE_ITEMSIZE[self.dtype]
        return math.prod(self.shape) * itemsize


#: Per channel pays when one scale for the whole tensor would leave the median channel fewer
#: than 5 of its 8 bits (its range under 1/8 of the tensor's): a BatchNorm output before its
#: activation, typically. Post-ReLU maps share one range and stay per tensor.
PER_CHANNEL_SPREAD = 1 / 8
#: ... and when every channel has enough elements to pay for its ~6 bytes of scale and zero point.
PER_CHANNEL_MIN_ELEMENTS = 64


def encode_array(a: np.ndarray, *, per_channel: bool = False, level: int = 3) -> EncodedTensor:
    """Quantize (uint8 affine) and zstd-compress a float32 array.

    ``per_channel`` gives every index of axis 1 (C of NCHW, the features of NC) its own scale,
    at about 6 bytes of frame per channel: worth it for NCHW maps whose channels differ in range,
    not for NC vectors with one element per channel. Falls back to codec ``"none"`` when zstd
    would not make the data smaller. Bad arguments raise ``ValueError``; NaN or infinite values
    raise ``CodecError``.

        >>> enc = encode_array(np.random.rand(1, 24, 56, 56).astype(np.float32), per_channel=True)
        >>> len(enc.scale), enc.axis
        (24, 1)
    """
    if type(level) is not int or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level must be an int in [{MIN_LEVEL}, {MAX_LEVEL}]")
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise ValueError("expected a float32 numpy array")
    if not 1 <= a.ndim <= MAX_NDIM or a.size == 0 or a.size > MAX_NUMEL:
        raise ValueError(f"cannot encode an array of shape {a.shape}")
    if per_channel and (a.ndim < 2 or a.shape[1] > MAX_CHANNELS):
        raise ValueError(f"per_channel needs 2+ dims with <= {MAX_CHANNELS} on axis 1")
    axis = 1 if per_channel else None
    q, scale, zp = _quantize(np.ascontiguousarray(a), axis)
    raw = q.tobytes()
    codec, data = zstd_compress(raw, level)
    return EncodedTensor(shape=tuple(int(d) for d in a.shape), dtype="float32",
                         quant="affine_u8", scale=scale, zero_point=zp, axis=axis, codec=codec,
                         data=data)


def prefers_per_channel_array(a: np.ndarray) -> bool:
    """Whether per-channel scales are worth their bytes for an ``(N, C, ...)`` array.

        >>> x = np.random.rand(1, 8, 16, 16).astype(np.float32); x[:, 0] *= 100
        >>> prefers_per_channel_array(x)
        True
    """
    if a.ndim < 3 or a.shape[1] > MAX_CHANNELS or a.size < 1:
        return False
    if a.size // a.shape[1] < PER_CHANNEL_MIN_ELEMENTS:
        return False
    dims = tuple(d for d in range(a.ndim) if d != 1)
    x = a.astype(np.float32, copy=False)
    spread = np.maximum(x.max(axis=dims), 0) - np.minimum(x.min(axis=dims), 0)
    widest = float(spread.max())
    if not math.isfinite(widest) or widest <= 0:
        return False
    # torch.median is the lower middle value for an even count, not numpy's mean of the two.
    median = float(np.sort(spread)[(spread.size - 1) // 2])
    return median < widest * PER_CHANNEL_SPREAD


def _quantize(x: np.ndarray, axis: int | None
              ) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    if axis is None:
        lo, hi = x.min(keepdims=False).reshape(1), x.max(keepdims=False).reshape(1)
    else:
        dims = tuple(d for d in range(x.ndim) if d != axis)
        lo, hi = x.min(axis=dims), x.max(axis=dims)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise CodecError("tensor has NaN or infinite values")
    lo64 = np.minimum(lo.astype(np.float64), 0.0)
    hi64 = np.maximum(hi.astype(np.float64), 0.0)
    s64 = np.maximum((hi64 - lo64) / 255.0, MIN_SCALE)
    s64 = np.where(hi64 > lo64, s64, 1.0)
    s32 = s64.astype(np.float32)
    # Rounded up, as the torch codec does, so that [lo, hi] still fits in 255 steps.
    s32 = np.where(s32.astype(np.float64) < s64, np.nextafter(s32, np.float32(np.inf)), s32)
    zp = np.clip(np.round(-lo64 / s32.astype(np.float64)), 0, 255).astype(np.int64)
    if axis is None:
        scale_b: np.ndarray | np.float32 = np.float32(s32[0])
        zp_b: np.ndarray | np.float32 = np.float32(zp[0])
    else:
        bshape = [1] * x.ndim
        bshape[axis] = -1
        scale_b = s32.reshape(bshape)
        zp_b = zp.astype(np.float32).reshape(bshape)
    q = np.clip(np.round(x / scale_b) + zp_b, 0, 255).astype(np.uint8)
    return q, tuple(float(s) for s in s32), tuple(int(z) for z in zp)


def zstd_compress(raw: bytes | bytearray, level: int) -> tuple[str, bytes]:
    """``("zstd", frame)``, or ``("none", raw)`` when zstd would not make ``raw`` smaller."""
    # Content size in the header lets the decoder check the size before it allocates; the
    # checksum turns a corrupted payload into an error instead of a silently wrong answer.
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    data = cctx.compress(raw)
    if len(data) >= len(raw):
        return "none", bytes(raw)
    return "zstd", data


def decompress(enc: EncodedTensor) -> bytes:
    """The raw bytes of ``enc.data``, size-checked before zstd runs; ``CodecError`` if corrupt."""
    expected = enc.raw_nbytes
    if enc.codec == "none":
        return enc.data
    try:
        declared = zstandard.frame_content_size(enc.data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"bad zstd frame header: {exc}") from exc
    if declared != expected:
        what = "no content size" if declared < 0 else f"content size {declared}"
        raise CodecError(f"zstd frame declares {what}; shape implies {expected} bytes")
    try:
        raw = zstandard.ZstdDecompressor().decompress(
            enc.data, max_output_size=expected, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd data: {exc}") from exc
    if len(raw) != expected:
        raise CodecError(f"zstd data decompressed to {len(raw)} bytes, expected {expected}")
    return raw
