"""Small custom architectures the passes must handle without knowing them (docs/design.md rule 7).

Names deliberately share nothing with the zoo's ResNets (no 'layer', 'bn', 'shortcut')."""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int = 1) -> None:
        super().__init__()
        cout = 4 * mid
        self.reduce = nn.Conv2d(cin, mid, 1, bias=False)
        self.reduce_norm = nn.BatchNorm2d(mid)
        self.spatial = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.spatial_norm = nn.BatchNorm2d(mid)
        self.expand = nn.Conv2d(mid, cout, 1, bias=False)
        self.expand_norm = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.reduce_norm(self.reduce(x)))
        y = torch.relu(self.spatial_norm(self.spatial(y)))
        y = self.expand_norm(self.expand(y))
        return torch.relu(y + (self.proj(x) if self.proj is not None else x))


class BottleneckResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(Bottleneck(16, 8), Bottleneck(32, 8), Bottleneck(32, 16, 2))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


class PlainVGGWithMLP(nn.Module):
    """Conv-BN-ReLU stacks and a 3-layer MLP head on a flattened 2x2 map."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        chans = [3, 16, 24, 32, 32]
        feats = []
        for a, b in zip(chans, chans[1:]):
            feats += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*feats)
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, num_classes)
        )

    def forward(self, x):
        return self.mlp(self.features(x))


class ConcatDepthwiseNet(nn.Module):
    """Two branches concatenated: 1x1 -> depthwise 3x3, and a grouped 3x3; then a 1x1 fuse."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.point = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.depth = nn.Sequential(
            nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24), nn.ReLU()
        )
        self.grouped = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.side = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(24 + 16 + 12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.out = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.entry(x)
        y = torch.cat([self.depth(self.point(x)), self.grouped(x), self.side(x)], dim=1)
        return self.out(self.fuse(y).mean(dim=(2, 3)))


class Scale(nn.Module):
    """A layer torch-pruning does not know: a learned per-channel scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return x * self.gain


class NetWithUnknownLayer(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.scale = Scale(8)
        self.c = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.c(self.scale(self.b(self.a(x)))).mean(dim=(2, 3)))


CUSTOM = {"bottleneck_resnet": BottleneckResNet, "vgg_mlp": PlainVGGWithMLP, "concat_depthwise": ConcatDepthwiseNet}


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (as a trained net has)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()
