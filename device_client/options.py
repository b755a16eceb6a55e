"""How the device puts activations on the wire: the options both runtimes share (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from shared import codec
from shared.errors import ConfigError

__all__ = ["EncodeOptions", "Granularity"]

Granularity = Literal["auto", "tensor", "channel"]


@dataclass(frozen=True)
class EncodeOptions:
    """How activations are put on the wire.

    ``granularity``: ``tensor`` (one scale), ``channel`` (one per channel), or ``auto``: per
    tensor unless the channels' ranges differ so much that one scale would starve most of them
    (``codec.prefers_per_channel_array``).

        >>> EncodeOptions(granularity="channel").per_channel(np.zeros((1, 8, 4, 4), np.float32))
        True
    """

    granularity: Granularity = "auto"
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.granularity not in ("auto", "tensor", "channel"):
            raise ConfigError(f"granularity must be auto, tensor or channel, "
                              f"got {self.granularity!r}")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"zstd level must be 1..22, got {self.zstd_level}")

    def per_channel(self, t: Any) -> bool:
        """For a numpy array, or a CPU torch tensor (the torch runtime's)."""
        if self.granularity == "auto":
            if hasattr(t, "detach"):  # torch: the same decision, made on the same values
                t = t.detach().float().numpy()
            return codec.prefers_per_channel_array(np.asarray(t, dtype=np.float32))
        return self.granularity == "channel" and t.ndim >= 2
