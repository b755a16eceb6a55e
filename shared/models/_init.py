"""Random initialization shared by the architectures (``weights="random"``)."""

from __future__ import annotations

from typing import Literal

from torch import nn


def init_weights(model: nn.Module, *, conv_mode: Literal["fan_in", "fan_out"]) -> None:
    """He-initialize convs, reset BatchNorm affine params, and give Linear layers small weights.

    ``conv_mode="fan_in"`` for depthwise networks: torchvision's fan-out makes a depthwise conv's
    weights sqrt(channels) times too small, and with BatchNorm at its defaults (identity in eval
    mode) a random network's activations vanish block by block. Trained weights replace all of
    this anyway.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
