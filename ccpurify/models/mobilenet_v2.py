"""MobileNetV2, CIFAR variant: stride-1 stem and the first two stride-2 stages at stride 1.

Inverted residual blocks: 1x1 expansion, 3x3 depthwise conv, 1x1 linear projection; identity
residual when stride is 1 and the channel count is unchanged (Sandler et al., 2018).
"""

from __future__ import annotations

import torch
from torch import nn

from ccpurify.models._common import scaled
from ccpurify.models.registry import register_model

# (expansion, out_channels, repeats, stride); strides adapted to 32x32 inputs.
_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_bn_relu(cin, hidden, 1)
        layers += _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        cin = scaled(32, width)
        layers: list[nn.Module] = [*_conv_bn_relu(3, cin, 3, 1)]
        for expansion, channels, repeats, stride in _CONFIG:
            cout = scaled(channels, width)
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        last = scaled(1280, width)
        layers += _conv_bn_relu(cin, last, 1)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model
def mobilenet_v2(num_classes: int = 10, width: float = 1.0) -> MobileNetV2:
    """CIFAR MobileNetV2 with depthwise convs; ``width`` scales every layer, the 1280-wide head too."""
    return MobileNetV2(num_classes=num_classes, width=width)
