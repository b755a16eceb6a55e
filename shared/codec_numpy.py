"""``shared.codec``'s encoder for numpy arrays: what the ONNX Runtime device puts on the wire.

It quantizes exactly as ``codec.encode_tensor`` does (same float32 scale rounded up, same
zero point, round-half-to-even), so a frame from an ONNX device decodes on the service like one
from a torch device, byte for byte. The ``EncodedTensor`` it returns is ``shared.codec``'s, which
still imports torch to validate scales; moving that class to a torch-free module is what makes
this path torch-free end to end.

    >>> enc = encode_array(np.zeros((1, 1280), np.float32))
    >>> enc.quant, enc.codec, enc.shape
    ('affine_u8', 'zstd', (1, 1280))
"""

from __future__ import annotations

import math

import numpy as np
import zstandard

from shared.codec import MAX_CHANNELS, MAX_NUMEL, EncodedTensor
from shared.errors import CodecError

__all__ = ["encode_array", "prefers_per_channel_array"]

_MAX_NDIM = 8
_MIN_SCALE = 2.0**-126  # as shared.codec: the smallest normal float32
# As shared.codec's prefers_per_channel: see the reasons there.
_PER_CHANNEL_SPREAD = 1 / 8
_PER_CHANNEL_MIN_ELEMENTS = 64


def encode_array(a: np.ndarray, *, per_channel: bool = False, level: int = 3) -> EncodedTensor:
    """Quantize (uint8 affine) and zstd-compress a float32 array, as ``codec.encode_tensor``.

    ``per_channel`` gives every index of axis 1 its own scale. Bad arguments raise
    ``ValueError``; NaN or infinite values raise ``CodecError``.
    """
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise ValueError("expected a float32 numpy array")
    if not 1 <= a.ndim <= _MAX_NDIM or a.size == 0 or a.size > MAX_NUMEL:
        raise ValueError(f"cannot encode an array of shape {a.shape}")
    if per_channel and (a.ndim < 2 or a.shape[1] > MAX_CHANNELS):
        raise ValueError(f"per_channel needs 2+ dims with <= {MAX_CHANNELS} on axis 1")
    axis = 1 if per_channel else None
    q, scale, zp = _quantize(np.ascontiguousarray(a), axis)
    raw = q.tobytes()
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    data = cctx.compress(raw)
    codec = "zstd"
    if len(data) >= len(raw):
        codec, data = "none", raw
    return EncodedTensor(shape=tuple(int(d) for d in a.shape), dtype="float32",
                         quant="affine_u8", scale=scale, zero_point=zp, axis=axis, codec=codec,
                         data=data)


def prefers_per_channel_array(a: np.ndarray) -> bool:
    """``codec.prefers_per_channel`` for an ``(N, C, ...)`` array."""
    if a.ndim < 3 or a.shape[1] > MAX_CHANNELS or a.size < 1:
        return False
    if a.size // a.shape[1] < _PER_CHANNEL_MIN_ELEMENTS:
        return False
    dims = tuple(d for d in range(a.ndim) if d != 1)
    x = a.astype(np.float32, copy=False)
    spread = np.maximum(x.max(axis=dims), 0) - np.minimum(x.min(axis=dims), 0)
    widest = float(spread.max())
    if not math.isfinite(widest) or widest <= 0:
        return False
    # torch.median is the lower middle value for an even count, not numpy's mean of the two.
    median = float(np.sort(spread)[(spread.size - 1) // 2])
    return median < widest * _PER_CHANNEL_SPREAD


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
    s64 = np.maximum((hi64 - lo64) / 255.0, _MIN_SCALE)
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
