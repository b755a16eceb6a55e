"""What one inference on the device produced: predictions, where it ran, bytes and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from shared.predictions import Prediction

__all__ = ["InferenceResult", "Ran", "Timings"]

Ran = Literal["device", "split", "cloud"]


@dataclass(frozen=True)
class Timings:
    """Milliseconds. ``total`` is head + encode + the round trip (+ a local tail on fallback);
    reading and resizing the photo is excluded, since every candidate pays it alike."""

    head: float = 0.0     # device compute before the cut (the whole model for `device`)
    encode: float = 0.0   # quantize + compress + frame, or JPEG encode for `cloud`
    network: float = 0.0  # round trip minus the server's reported time
    server: float = 0.0   # decode + queue + compute, as the server reported it
    tail: float = 0.0     # device compute after the cut, when it had to finish locally
    total: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"timing {name} must be >= 0, got {value}")


@dataclass(frozen=True)
class InferenceResult:
    """One image's answer. ``split`` is the candidate used (the planner's choice for `auto`);
    ``ran`` says where the last layer ran; ``fallback`` says why it finished on the device."""

    image: str
    split: str
    ran: Ran
    top5: tuple[Prediction, ...]
    bytes_sent: int
    timings: Timings
    requested: str = ""
    fallback: str | None = None
    predicted_ms: float | None = None  # the planner's expected total, for `auto`

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object: image, split, ran, top5, bytes_sent, timings_ms (+ extras)."""
        return {
            "image": self.image,
            "split": self.split,
            "ran": self.ran,
            "top5": [asdict(p) for p in self.top5],
            "bytes_sent": self.bytes_sent,
            "timings_ms": {k: round(v, 3) for k, v in asdict(self.timings).items()},
            "requested": self.requested or self.split,
            "fallback": self.fallback,
            "predicted_ms": None if self.predicted_ms is None else round(self.predicted_ms, 3),
        }
