"""Turning logits into labelled top-k predictions, the same way on both sides (numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Prediction", "top_k"]


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k answer: its index, its label and its softmax probability."""

    index: int
    label: str
    prob: float

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"class index must be >= 0, got {self.index}")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.prob}")


def top_k(logits: Any, labels: Sequence[str], k: int = 5) -> list[tuple[Prediction, ...]]:
    """Softmax over the last dimension of ``(N, C)`` logits, then the ``k`` best per row.

    ``logits`` is a numpy array or anything ``numpy.asarray`` takes (a CPU torch tensor too).

        >>> top_k(np.array([[0.0, 2.0]], np.float32), ["cat", "dog"], k=1)
        [(Prediction(index=1, label='dog', prob=0.88...),)]
    """
    if hasattr(logits, "detach"):  # a torch tensor: no grad, on the CPU, as numpy
        logits = logits.detach().float().cpu().numpy()
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (N, C) logits, got shape {tuple(x.shape)}")
    k = max(1, min(k, x.shape[1]))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    # Stable sort of the negated probabilities: ties keep the lower class index first.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for row_p, row_i in zip(np.take_along_axis(probs, order, axis=1).tolist(), order.tolist(),
                            strict=True):
        out.append(tuple(
            Prediction(i, labels[i] if i < len(labels) else f"class {i}", min(max(p, 0.0), 1.0))
            for p, i in zip(row_p, row_i, strict=True)))
    return out
