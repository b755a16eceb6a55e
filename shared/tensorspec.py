"""The shape and dtype of one activation tensor at a split point.

The partitioner records a ``TensorSpec`` for every tensor that crosses a cut (traced with batch
size 1); the server checks incoming frames against them with ``shared.wire.check_shapes``.

    >>> spec = TensorSpec((1, 24, 56, 56), "float32")
    >>> spec.numel_per_sample, spec.float32_bytes
    (75264, 301056)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ALLOWED_DTYPES", "DTYPE_ITEMSIZE", "MAX_NDIM", "TensorSpec"]

#: Source dtypes an activation may have. The wire format accepts these names and no others.
ALLOWED_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

#: Most dimensions a tensor may have, batch included.
MAX_NDIM = 8

#: Bytes per element of each allowed dtype.
DTYPE_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class TensorSpec:
    """Full shape (batch first, as traced with batch 1) and source dtype of a tensor."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        # Specs come from our own tracing code, so a bad one is a programmer error: ValueError.
        if not isinstance(self.shape, tuple) or not 1 <= len(self.shape) <= MAX_NDIM:
            raise ValueError(f"shape must be a tuple of 1..{MAX_NDIM} ints, got {self.shape!r}")
        for dim in self.shape:
            if type(dim) is not int or dim < 1:
                raise ValueError(f"shape dims must be ints >= 1, got {self.shape!r}")
        if self.dtype not in ALLOWED_DTYPES:
            raise ValueError(f"dtype must be one of {ALLOWED_DTYPES}, got {self.dtype!r}")

    @property
    def numel_per_sample(self) -> int:
        """Elements in one sample: the product of ``shape[1:]``."""
        return math.prod(self.shape[1:])

    @property
    def float32_bytes(self) -> int:
        """Bytes the whole tensor takes as float32; the baseline compression is measured against."""
        return 4 * math.prod(self.shape)
