"""The torch eager backend: the fx partition's tails and the model itself."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx, nn

from shared.candidates import WHOLE_MODEL

__all__ = ["TorchBackend"]


class TorchBackend:
    """``run(key, inputs)`` with ``model`` for WHOLE_MODEL and ``tails[key]`` otherwise.

        backend = TorchBackend(model, {p.name: part.split(p)[1] for p in part.points})
    """

    name = "torch"

    def __init__(self, model: nn.Module, tails: Mapping[str, fx.GraphModule]) -> None:
        self.model = model
        self.tails = dict(tails)

    def run(self, key: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        module = self.model if key == WHOLE_MODEL else self.tails[key]
        with torch.inference_mode():
            out = module(*inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__}, expected logits")
        return out
