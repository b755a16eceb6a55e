"""A frame as the service reads it: parse, check it against the split point, dequantize.

One sequence for everyone who must see what the service sees: the service itself, and the
benchmarks that measure fidelity and compute on exactly the tensors the service would run.

    decoded = decode_frame(body, model="efficientnet_lite0", fingerprint=fp,
                           split="_blocks.9", expected=point.tensors, max_batch=1)
    logits = tail(*decoded.tensors)

The order is the point: the frame's size is checked before anything is parsed (``wire.decode``),
its names and weights before its shapes, and its shapes before a byte is decompressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared import codec_torch, wire
from shared.errors import FingerprintMismatchError, ShapeMismatchError
from shared.tensorspec import TensorSpec

__all__ = ["DecodedFrame", "decode_frame"]


@dataclass(frozen=True)
class DecodedFrame:
    """A checked frame, its dequantized tensors and its batch size (rows)."""

    frame: wire.Frame
    tensors: tuple[torch.Tensor, ...]
    rows: int


def decode_frame(
    body: bytes,
    *,
    model: str,
    fingerprint: str,
    split: str,
    expected: Sequence[TensorSpec],
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
    max_batch: int = 64,
) -> DecodedFrame:
    """Parse ``body`` and check it is a frame of ``model`` with weights ``fingerprint`` for
    split point ``split``, whose tensors match ``expected``; then dequantize them.

    Raises ``WireError``/``PayloadTooLargeError`` on a malformed or oversized frame,
    ``ShapeMismatchError`` on the wrong model, split point or shapes,
    ``FingerprintMismatchError`` on other weights, and ``CodecError`` on corrupt data.
    """
    frame = wire.decode(body, max_frame_bytes=max_frame_bytes)
    if frame.model != model:
        raise ShapeMismatchError(f"frame is for model {frame.model!r}, sent to {model!r}")
    if frame.split != split:
        raise ShapeMismatchError(f"frame is for split point {frame.split!r}, sent to {split!r}")
    if frame.fingerprint != fingerprint:
        raise FingerprintMismatchError(
            f"frame was made with weights {frame.fingerprint}, this service serves "
            f"{model} with weights {fingerprint}"
        )
    rows = wire.check_shapes(frame, expected, max_batch=max_batch)
    return DecodedFrame(frame, tuple(codec_torch.decode_tensor(t) for t in frame.tensors), rows)
