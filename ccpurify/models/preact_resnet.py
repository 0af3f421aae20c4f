"""PreAct-ResNet18 exactly as BackdoorBench defines it (``models/preact_resnet.py``).

Layout (docs/reference/attacks_and_protocol.md §3): a bare 3x3 stem conv (no BN/ReLU), four stages
of two pre-activation blocks, global average pooling and a linear head, with no final BN+ReLU.
Registration order inside a block is ``bn1, conv1, bn2, conv2, shortcut``; CLP's reference pairing
depends on it, so it is kept. At ``width=1`` and 10 classes the model has 11,171,146 parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ccpurify.models._common import make_stage, scaled
from ccpurify.models.registry import register_model


class PreActBlock(nn.Module):
    """``y = conv2(relu(bn2(conv1(o)))) + shortcut(o or x)`` with ``o = relu(bn1(x))``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, planes[0], 3, 1, 1, bias=False)
        self.layer1 = make_stage(PreActBlock, planes[0], planes[0], num_blocks[0], 1)
        self.layer2 = make_stage(PreActBlock, planes[0], planes[1], num_blocks[1], 2)
        self.layer3 = make_stage(PreActBlock, planes[1], planes[2], num_blocks[2], 2)
        self.layer4 = make_stage(PreActBlock, planes[2], planes[3], num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(planes[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model
def preact_resnet18(num_classes: int = 10, width: float = 1.0) -> PreActResNet:
    """BackdoorBench's PreAct-ResNet18 (the benchmark model); ``width`` scales every stage."""
    return PreActResNet([2, 2, 2, 2], num_classes=num_classes, width=width)
