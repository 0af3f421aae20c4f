"""CIFAR ResNet-18 with post-activation BasicBlocks (the CLP/RNP/BCU reference layout).

3x3 stride-1 stem conv + BN + ReLU, no max-pool; shortcut = 1x1 conv + BN when the shape changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ccpurify.models._common import make_stage, scaled
from ccpurify.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.layer1 = make_stage(BasicBlock, planes[0], planes[0], num_blocks[0], 1)
        self.layer2 = make_stage(BasicBlock, planes[0], planes[1], num_blocks[1], 2)
        self.layer3 = make_stage(BasicBlock, planes[1], planes[2], num_blocks[2], 2)
        self.layer4 = make_stage(BasicBlock, planes[2], planes[3], num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


@register_model
def resnet18(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-18 (post-activation, 3x3 stem)."""
    return ResNet([2, 2, 2, 2], num_classes=num_classes, width=width)
