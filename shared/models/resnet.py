"""ResNet-18 (He et al. 2016), module for module and key for key torchvision's.

A torchvision ``resnet18`` checkpoint loads with ``strict=True``: ``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``, ..., ``fc.weight``, ``fc.bias``.

    >>> model = resnet18()
    >>> model.eval()(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import torch
from torch import nn

from shared.models._init import init_weights

__all__ = ["BasicBlock", "ResNet", "resnet18"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and a skip; ``downsample`` (1x1 conv + BN) when the shape changes.

    ReLU is not in-place and the skip is ``out + identity``, not ``+=``: an fx interpreter that
    keeps every intermediate value (to measure or send a split tensor) would otherwise see it
    overwritten. The shared ``relu`` module is used twice, as in torchvision.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Fixed at construction, so fx traces it as structure.
        if self.downsample is not None:
            identity = self.downsample(x)
        result: torch.Tensor = self.relu(out + identity)
        return result


class ResNet(nn.Module):
    """Stem (7x7 conv, max pool), four stages of blocks, global average pool, ``fc``."""

    def __init__(self, layers: tuple[int, int, int, int], *, num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        init_weights(self, conv_mode="fan_out")  # torchvision's choice for ResNets

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers: list[nn.Module] = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        logits: torch.Tensor = self.fc(x)
        return logits


def resnet18(*, num_classes: int = 1000) -> ResNet:
    """ResNet-18 with random weights; load a torchvision checkpoint through ``get_model``.

    >>> resnet18().state_dict()["layer3.0.downsample.0.weight"].shape
    torch.Size([256, 128, 1, 1])
    """
    return ResNet((2, 2, 2, 2), num_classes=num_classes)
