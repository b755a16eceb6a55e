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

    >>> enc = encode_tensor(torch.zeros(1, 1280))
    >>> enc.quant, enc.codec, decode_tensor(enc).shape
    ('affine_u8', 'zstd', torch.Size([1, 1280]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import zstandard

from shared.errors import CodecError
from shared.tensorspec import ALLOWED_DTYPES, MAX_NDIM, torch_dtype

__all__ = [
    "CODECS",
    "MAX_CHANNELS",
    "MAX_NUMEL",
    "QUANTS",
    "EncodedTensor",
    "decode_tensor",
    "encode_tensor",
    "prefers_per_channel",
]

QUANTS: tuple[str, ...] = ("affine_u8", "none")
CODECS: tuple[str, ...] = ("zstd", "none")

#: Most elements one tensor may have (1 GiB as raw float32). Servers bound it far tighter by
#: checking shapes against the split point before decoding.
MAX_NUMEL = 2**28
#: Most per-channel scales one tensor may carry.
MAX_CHANNELS = 8192

# ZSTD_minCLevel() and ZSTD_maxCLevel() of libzstd; negative levels are its fast modes.
_MIN_LEVEL = -(1 << 17)
_MAX_LEVEL: int = zstandard.MAX_COMPRESSION_LEVEL
# Smallest normal float32. Scales below it would be subnormal: slow on x86, and imprecise.
_MIN_SCALE = 2.0**-126
_DTYPE_NAMES = {torch_dtype(name): name for name in ALLOWED_DTYPES}


def _zstd_bound(n: int) -> int:
    """Largest zstd frame that libzstd writes for ``n`` input bytes (ZSTD_COMPRESSBOUND, zstd.h)."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0)


def _valid_scales(scale: tuple[float, ...]) -> bool:
    """True if every scale is a float, finite, > 0 and exactly representable as float32."""
    if any(type(s) is not float for s in scale):
        return False
    s64 = torch.tensor(scale, dtype=torch.float64)
    # Casting to float32 turns too-large values into inf and too-small ones into 0.
    s32 = s64.float()
    return bool((torch.isfinite(s32) & (s32 > 0) & (s32.double() == s64)).all())


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
        itemsize = 1 if self.quant == "affine_u8" else torch_dtype(self.dtype).itemsize
        return math.prod(self.shape) * itemsize


def encode_tensor(
    t: torch.Tensor,
    *,
    per_channel: bool = False,
    quant: str = "affine_u8",
    codec: str = "zstd",
    level: int = 3,
) -> EncodedTensor:
    """Quantize and compress a float tensor.

    ``per_channel`` gives every index of axis 1 (C of NCHW, the features of NC) its own scale,
    at about 6 bytes of frame per channel: worth it for NCHW maps whose channels differ in range,
    not for NC vectors with one element per channel.
    ``codec="zstd"`` falls back to ``"none"`` when zstd would not make the data smaller.
    Bad arguments raise ``ValueError``; non-finite values raise ``CodecError``.

        >>> enc = encode_tensor(torch.rand(1, 24, 56, 56) * 6, per_channel=True)
        >>> len(enc.scale), enc.axis
        (24, 1)
    """
    if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_NAMES:
        raise ValueError(f"expected a tensor of dtype {ALLOWED_DTYPES}")
    if not 1 <= t.dim() <= MAX_NDIM or t.numel() == 0 or t.numel() > MAX_NUMEL:
        raise ValueError(f"cannot encode a tensor of shape {tuple(t.shape)}")
    if quant not in QUANTS or codec not in CODECS:
        raise ValueError(f"quant must be in {QUANTS} and codec in {CODECS}")
    if type(level) is not int or not _MIN_LEVEL <= level <= _MAX_LEVEL:
        raise ValueError(f"zstd level must be an int in [{_MIN_LEVEL}, {_MAX_LEVEL}]")
    if per_channel and (quant != "affine_u8" or t.dim() < 2 or t.shape[1] > MAX_CHANNELS):
        raise ValueError(
            f"per_channel needs affine_u8 and 2+ dims with <= {MAX_CHANNELS} on axis 1"
        )
    t = t.detach().cpu()
    scale: tuple[float, ...] = ()
    zp: tuple[int, ...] = ()
    axis = 1 if per_channel else None
    if quant == "none":
        if not bool(torch.isfinite(t).all()):
            raise CodecError("tensor has NaN or infinite values")
        raw = _tensor_bytes(t)
    else:
        q, scale, zp = _quantize(t.float(), axis)
        raw = _tensor_bytes(q)
    data = b""
    if codec == "zstd":
        # Content size in the header lets the decoder check the size before it allocates; the
        # checksum turns a corrupted payload into an error instead of a silently wrong answer.
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
        data = cctx.compress(raw)
        if len(data) >= len(raw):
            codec = "none"
    if codec == "none":
        data = bytes(raw)
    return EncodedTensor(
        shape=tuple(t.shape),
        dtype=_DTYPE_NAMES[t.dtype],
        quant=quant,
        scale=scale,
        zero_point=zp,
        axis=axis,
        codec=codec,
        data=data,
    )


def decode_tensor(enc: EncodedTensor) -> torch.Tensor:
    """Decompress and dequantize; returns a contiguous tensor of ``enc.shape`` and ``enc.dtype``.

    Every value is finite. Raises ``CodecError`` on corrupt data.

        >>> x = torch.tensor([[0.0, 1.5, 3.0]])
        >>> decode_tensor(encode_tensor(x, quant="none")).equal(x)
        True
    """
    raw = _decompress(enc)
    # frombuffer warns on read-only bytes; a private bytearray also keeps the output from
    # aliasing enc.data.
    q = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    dtype = torch_dtype(enc.dtype)
    if enc.quant == "none":
        out = q.view(dtype).view(enc.shape)
        if not bool(torch.isfinite(out).all()):
            raise CodecError("tensor has NaN or infinite values")
        return out
    x = q.view(enc.shape).to(torch.float32)
    if enc.axis is None:
        x.sub_(enc.zero_point[0]).mul_(enc.scale[0])
    else:
        bshape = [1] * len(enc.shape)
        bshape[enc.axis] = -1
        x.sub_(torch.tensor(enc.zero_point, dtype=torch.float32).view(bshape))
        x.mul_(torch.tensor(enc.scale, dtype=torch.float32).view(bshape))
    finfo = torch.finfo(dtype)
    if 255.0 * max(enc.scale) > finfo.max:
        # Only hostile or extreme scales reach here; clamping keeps the output finite.
        x.clamp_(finfo.min, finfo.max)
    return x.to(dtype)


#: Per channel pays when one scale for the whole tensor would leave the median channel fewer
#: than 5 of its 8 bits (its range under 1/8 of the tensor's): a BatchNorm output before its
#: activation, typically. Post-ReLU maps share one range and stay per tensor.
_PER_CHANNEL_SPREAD = 1 / 8
#: ... and when every channel has enough elements to pay for its ~6 bytes of scale and zero point.
_PER_CHANNEL_MIN_ELEMENTS = 64


def prefers_per_channel(t: torch.Tensor) -> bool:
    """Whether per-channel scales are worth their bytes for ``t`` (``N, C, ...``).

        >>> x = torch.rand(1, 8, 16, 16); x[:, 0] *= 100      # one channel dwarfs the rest
        >>> prefers_per_channel(x), prefers_per_channel(torch.rand(1, 8, 16, 16))
        (True, False)
    """
    if t.dim() < 3 or t.shape[1] > MAX_CHANNELS or t.numel() < 1:
        return False
    if t.numel() // t.shape[1] < _PER_CHANNEL_MIN_ELEMENTS:
        return False
    dims = tuple(d for d in range(t.dim()) if d != 1)
    x = t.detach().float()
    spread = x.amax(dim=dims).clamp(min=0) - x.amin(dim=dims).clamp(max=0)
    widest = spread.max()
    if not bool(torch.isfinite(widest)) or float(widest) <= 0:
        return False
    return bool(spread.median() < widest * _PER_CHANNEL_SPREAD)


def _quantize(
    x: torch.Tensor, axis: int | None
) -> tuple[torch.Tensor, tuple[float, ...], tuple[int, ...]]:
    """Return uint8 ``q``, scales and zero points of float32 ``x``, per tensor or along axis."""
    if axis is None:
        lo, hi = (v.reshape(1) for v in torch.aminmax(x))
    else:
        dims = tuple(d for d in range(x.dim()) if d != axis)
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        # min/max propagate NaN, so checking them covers every element without another pass.
        raise CodecError("tensor has NaN or infinite values")
    # Float64 so that hi - lo can't overflow; the scale is then rounded *up* to float32 so that
    # [lo, hi] still fits in 255 steps. A zero range (all-zero tensor) gets scale 1.
    lo64, hi64 = lo.double().clamp(max=0.0), hi.double().clamp(min=0.0)
    s64 = ((hi64 - lo64) / 255.0).clamp(min=_MIN_SCALE)
    s64 = torch.where(hi64 > lo64, s64, torch.ones_like(s64))
    s32 = s64.float()
    s32 = torch.where(s32.double() < s64, torch.nextafter(s32, torch.full_like(s32, math.inf)), s32)
    zp = torch.round(-lo64 / s32.double()).clamp(0, 255).to(torch.int64)
    if axis is None:
        scale_b: torch.Tensor | float = s32.item()
        zp_b: torch.Tensor | int = int(zp.item())
    else:
        bshape = [1] * x.dim()
        bshape[axis] = -1
        scale_b, zp_b = s32.view(bshape), zp.float().view(bshape)
    q = torch.div(x, scale_b).round_().add_(zp_b).clamp_(0, 255).to(torch.uint8)
    return q, tuple(s32.tolist()), tuple(zp.tolist())


def _tensor_bytes(t: torch.Tensor) -> bytearray:
    """Copy exactly the tensor's own bytes, in row-major order.

    ``bytes(t.untyped_storage())`` would copy the whole storage a view points into, and runs at
    about 1 MB/s; this is a single memcpy.
    """
    buf = bytearray(t.numel() * t.element_size())
    torch.frombuffer(buf, dtype=torch.uint8).copy_(t.contiguous().reshape(-1).view(torch.uint8))
    return buf


def _decompress(enc: EncodedTensor) -> bytes:
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
