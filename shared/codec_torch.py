"""``shared.codec`` for torch tensors: the torch device's encoder and the service's decoder.

Torch side (imported by the service, the torch ``DeviceRuntime`` and export, never by the
torch-free device). Frames are ``shared.codec.EncodedTensor``; ``encode_tensor`` of a float32
tensor writes the same bytes as ``codec.encode_array`` of the same values.

    >>> enc = encode_tensor(torch.zeros(1, 1280))
    >>> enc.quant, enc.codec, decode_tensor(enc).shape
    ('affine_u8', 'zstd', torch.Size([1, 1280]))
"""

from __future__ import annotations

import math

import torch

from shared.codec import (
    CODECS,
    MAX_CHANNELS,
    MAX_LEVEL,
    MAX_NUMEL,
    MIN_LEVEL,
    MIN_SCALE,
    PER_CHANNEL_MIN_ELEMENTS,
    PER_CHANNEL_SPREAD,
    QUANTS,
    EncodedTensor,
    decompress,
    zstd_compress,
)
from shared.errors import CodecError
from shared.tensorspec import ALLOWED_DTYPES, MAX_NDIM

__all__ = ["decode_tensor", "encode_tensor", "prefers_per_channel", "torch_dtype"]

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for an allowed dtype name.

    >>> torch_dtype("float16")
    torch.float16
    """
    try:
        return _TORCH_DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be one of {ALLOWED_DTYPES}, got {name!r}") from None


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
    if not isinstance(t, torch.Tensor) or t.dtype not in DTYPE_NAMES:
        raise ValueError(f"expected a tensor of dtype {ALLOWED_DTYPES}")
    if not 1 <= t.dim() <= MAX_NDIM or t.numel() == 0 or t.numel() > MAX_NUMEL:
        raise ValueError(f"cannot encode a tensor of shape {tuple(t.shape)}")
    if quant not in QUANTS or codec not in CODECS:
        raise ValueError(f"quant must be in {QUANTS} and codec in {CODECS}")
    if type(level) is not int or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level must be an int in [{MIN_LEVEL}, {MAX_LEVEL}]")
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
    codec, data = zstd_compress(raw, level) if codec == "zstd" else ("none", bytes(raw))
    return EncodedTensor(
        shape=tuple(t.shape),
        dtype=DTYPE_NAMES[t.dtype],
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
    raw = decompress(enc)
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


def prefers_per_channel(t: torch.Tensor) -> bool:
    """Whether per-channel scales are worth their bytes for ``t`` (``N, C, ...``).

        >>> x = torch.rand(1, 8, 16, 16); x[:, 0] *= 100      # one channel dwarfs the rest
        >>> prefers_per_channel(x), prefers_per_channel(torch.rand(1, 8, 16, 16))
        (True, False)
    """
    if t.dim() < 3 or t.shape[1] > MAX_CHANNELS or t.numel() < 1:
        return False
    if t.numel() // t.shape[1] < PER_CHANNEL_MIN_ELEMENTS:
        return False
    dims = tuple(d for d in range(t.dim()) if d != 1)
    x = t.detach().float()
    spread = x.amax(dim=dims).clamp(min=0) - x.amin(dim=dims).clamp(max=0)
    widest = spread.max()
    if not bool(torch.isfinite(widest)) or float(widest) <= 0:
        return False
    return bool(spread.median() < widest * PER_CHANNEL_SPREAD)


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
    s64 = ((hi64 - lo64) / 255.0).clamp(min=MIN_SCALE)
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
