"""CIFAR VGG-16 with BatchNorm: 13 Conv-BN-ReLU layers, five max-pools, a linear head."""

from __future__ import annotations

import torch
from torch import nn

from ccpurify.models._common import scaled
from ccpurify.models.registry import register_model

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, config: list, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out_ch = scaled(item, width)
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model
def vgg16_bn(num_classes: int = 10, width: float = 1.0) -> VGG:
    """CIFAR VGG-16-BN (3x3 convs with bias, BN, ReLU; linear classifier)."""
    return VGG(_VGG16, num_classes=num_classes, width=width)
