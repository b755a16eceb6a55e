"""Turning logits into labelled top-k predictions, the same way on both sides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def top_k(logits: torch.Tensor, labels: Sequence[str], k: int = 5) -> list[tuple[Prediction, ...]]:
    """Softmax over the last dimension of ``(N, C)`` logits, then the ``k`` best per row.

        >>> top_k(torch.tensor([[0.0, 2.0]]), ["cat", "dog"], k=1)
        [(Prediction(index=1, label='dog', prob=0.88...),)]
    """
    if logits.dim() != 2:
        raise ValueError(f"expected (N, C) logits, got shape {tuple(logits.shape)}")
    k = max(1, min(k, logits.shape[1]))
    probs = torch.softmax(logits.detach().float(), dim=1)
    values, indices = probs.topk(k, dim=1)
    out = []
    for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True):
        out.append(tuple(
            Prediction(i, labels[i] if i < len(labels) else f"class {i}", min(max(p, 0.0), 1.0))
            for p, i in zip(row_p, row_i, strict=True)))
    return out
