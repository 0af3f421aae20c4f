"""Input-aware dynamic backdoor (Nguyen & Tran, 2020): a per-image trigger from trained generators.

Two encoder-decoders (reference §6.4): a pattern generator G (3 channels) and a mask generator M
(1 channel), each ``tanh(z) / (2 + 1e-7) + 0.5``. The binarised mask is
``m = tanh(20 * M(x) - 10) / (2 + 1e-7) + 0.5`` and the poisoned image ``x + (G(x) - x) * m``.

- Stage 1 (``prepare``): train M alone with Adam(0.01, betas (0.5, 0.9)) on
  ``100 * mean(relu(M(x) - 0.032)) + diversity``, where diversity is the mean of
  ``rms(x1 - x2) / (rms(M(x1) - M(x2)) + 1e-7)`` over two shuffled batches.
- Stage 2 (the batch poisoner): per batch, ``int(ratio * B)`` samples carry their own trigger and
  the target label, the next as many are "cross" samples (a trigger generated from another image,
  true label), and G trains jointly with the classifier (Adam 0.01) on CE + diversity.

Images here are in [0, 1] before normalisation, which is equivalent to the reference's normalised
space because normalisation is affine per channel. ``width`` (32 in the reference) scales the
generators so CPU presets can afford them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ccpurify.attacks.base import Attack, BatchPoisoner
from ccpurify.attacks.registry import register_attack
from ccpurify.errors import InvalidInputError

EPS = 1e-7


def _block(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class TriggerGenerator(nn.Module):
    """Encoder-decoder: 3 max-pool downsamplings, a middle block, 3 bilinear upsamplings."""

    def __init__(self, out_channels: int, width: int = 32) -> None:
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.net = nn.Sequential(
            *_block(3, c1),
            *_block(c1, c1),
            nn.MaxPool2d(2),
            *_block(c1, c2),
            *_block(c2, c2),
            nn.MaxPool2d(2),
            *_block(c2, c3),
            *_block(c3, c3),
            nn.MaxPool2d(2),
            *_block(c3, c3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *_block(c3, c3),
            *_block(c3, c2),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *_block(c2, c2),
            *_block(c2, c1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *_block(c1, c1),
            *_block(c1, out_channels, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x)) / (2 + EPS) + 0.5


def binarize_mask(m: torch.Tensor) -> torch.Tensor:
    return torch.tanh(20 * m - 10) / (2 + EPS) + 0.5


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS difference. ``EPS**2`` under the root keeps the gradient finite where the two
    are identical (saturated generator outputs): a plain ``sqrt`` there gives ``0 * inf = nan``, which
    silently turned a whole CIFAR-10 training run into NaN weights."""
    return torch.sqrt(torch.mean((a - b) ** 2, dim=(1, 2, 3)) + EPS**2)


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """Mean of ``rms(x1 - x2) / (rms(out1 - out2) + eps)``: different inputs, different triggers."""
    return torch.mean(_rms(x1, x2) / (_rms(out1, out2) + EPS))


@register_attack
class InputAware(Attack):
    name = "input_aware"
    batch_level = True

    def __init__(
        self,
        target: int = 0,
        poison_ratio: float = 0.1,
        seed: int = 0,
        width: int = 32,
        cross_ratio: float = 1.0,
        mask_density: float = 0.032,
        lambda_norm: float = 100.0,
        lambda_div: float = 1.0,
        lr: float = 0.01,
        mask_epochs: int = 25,
    ) -> None:
        super().__init__(target, poison_ratio, seed)
        self.width, self.cross_ratio = int(width), float(cross_ratio)
        self.mask_density, self.lambda_norm, self.lambda_div = (
            float(mask_density),
            float(lambda_norm),
            float(lambda_div),
        )
        self.lr, self.mask_epochs = float(lr), int(mask_epochs)
        with torch.random.fork_rng():  # generator initialisation is part of the seeded recipe
            torch.manual_seed(seed)
            self.pattern_net = TriggerGenerator(3, self.width)
            self.mask_net = TriggerGenerator(1, self.width)

    # -- stage 1 ---------------------------------------------------------------------------------
    def prepare(
        self, images: np.ndarray, batch_size: int = 128, device: str | torch.device = "cpu", progress=None
    ) -> None:
        """Train the mask generator alone for ``mask_epochs`` epochs on the training images."""
        from ccpurify.progress import report  # local: keeps attacks importable without progress users

        device = torch.device(device)
        net = self.mask_net.to(device).train()
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, betas=(0.5, 0.9))
        g = torch.Generator().manual_seed(self.seed + 1)
        data = torch.from_numpy(images)
        steps = len(data) // batch_size
        for epoch in range(self.mask_epochs):
            perm1, perm2 = torch.randperm(len(data), generator=g), torch.randperm(len(data), generator=g)
            total = 0.0
            for i in range(steps):
                sl = slice(i * batch_size, (i + 1) * batch_size)
                x1 = data[perm1[sl]].to(device).permute(0, 3, 1, 2).float() / 255
                x2 = data[perm2[sl]].to(device).permute(0, 3, 1, 2).float() / 255
                m1, m2 = net(x1), net(x2)
                loss = self.lambda_norm * F.relu(m1 - self.mask_density).mean() + self.lambda_div * diversity_loss(
                    x1, x2, m1, m2
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            report(progress, "input-aware mask", epoch + 1, self.mask_epochs, loss=total / max(steps, 1))
        net.eval().requires_grad_(False)

    # -- trigger ---------------------------------------------------------------------------------
    def poison_float(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Trigger generated from ``source`` (default ``x``) put on ``x`` (float NCHW in [0, 1])."""
        source = x if source is None else source
        mask = binarize_mask(self.mask_net(source))
        return x + (self.pattern_net(source) - x) * mask

    @torch.no_grad()
    def _apply(self, images: np.ndarray) -> np.ndarray:
        self.pattern_net.eval()
        self.mask_net.eval()
        device = next(self.pattern_net.parameters()).device
        out = np.empty_like(images)
        for start in range(0, len(images), 512):
            x = torch.from_numpy(images[start : start + 512]).to(device).permute(0, 3, 1, 2).float() / 255
            y = (self.poison_float(x) * 255).round().clamp(0, 255).to(torch.uint8)
            out[start : start + 512] = y.permute(0, 2, 3, 1).cpu().numpy()
        return out

    def batch_poisoner(self, device: torch.device | str = "cpu") -> BatchPoisoner:
        return _InputAwarePoisoner(self, torch.device(device))

    # -- serialisation ---------------------------------------------------------------------------
    def params(self) -> dict:
        return {
            "width": self.width,
            "cross_ratio": self.cross_ratio,
            "mask_density": self.mask_density,
            "lambda_norm": self.lambda_norm,
            "lambda_div": self.lambda_div,
            "lr": self.lr,
            "mask_epochs": self.mask_epochs,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"pattern.{k}": v.detach().cpu().contiguous() for k, v in self.pattern_net.state_dict().items()}
        out.update({f"mask.{k}": v.detach().cpu().contiguous() for k, v in self.mask_net.state_dict().items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], **kwargs) -> InputAware:
        # The recipe may come from a hostile run folder: build the generators on the meta device and
        # compare their shapes with the stored tensors before allocating anything (width=1500...).
        with torch.device("meta"):
            skeleton = cls(**kwargs)
        expected = {
            f"{prefix}{k}": tuple(v.shape)
            for prefix, net in (("pattern.", skeleton.pattern_net), ("mask.", skeleton.mask_net))
            for k, v in net.state_dict().items()
        }
        got = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(("pattern.", "mask."))}
        if expected != got:
            raise InvalidInputError(
                f"the input-aware attack's parameters {kwargs} do not fit its stored generator tensors; "
                "the run directory is damaged"
            )
        attack = cls(**kwargs)
        for prefix, net in (("pattern.", attack.pattern_net), ("mask.", attack.mask_net)):
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            net.load_state_dict(state, strict=True)
            net.eval().requires_grad_(False)
        return attack


class _InputAwarePoisoner(BatchPoisoner):
    def __init__(self, attack: InputAware, device: torch.device) -> None:
        self.attack = attack
        attack.pattern_net.to(device).train().requires_grad_(True)
        attack.mask_net.to(device).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(attack.pattern_net.parameters(), lr=attack.lr, betas=(0.5, 0.9))

    def __call__(self, x, y, generator):
        n = x.shape[0]
        n_bd = int(self.attack.poison_ratio * n)
        n_cross = min(int(n_bd * self.attack.cross_ratio), n - n_bd)
        if n_bd == 0:
            return x, y, None
        pattern_net, mask_net = self.attack.pattern_net, self.attack.mask_net
        others = x[torch.randperm(n, generator=generator, device=x.device)[: max(n_bd, n_cross)]]
        own_pattern, other_pattern = pattern_net(x[:n_bd]), pattern_net(others)
        bd = x[:n_bd] + (own_pattern - x[:n_bd]) * binarize_mask(mask_net(x[:n_bd]))
        cross_x = x[n_bd : n_bd + n_cross]
        cross = cross_x + (other_pattern[:n_cross] - cross_x) * binarize_mask(mask_net(others[:n_cross]))
        div = self.attack.lambda_div * diversity_loss(x[:n_bd], others[:n_bd], own_pattern, other_pattern[:n_bd])
        target = torch.full_like(y[:n_bd], self.attack.target)
        return torch.cat([bd, cross, x[n_bd + n_cross :]]), torch.cat([target, y[n_bd:]]), div

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def finish(self) -> None:
        self.attack.pattern_net.eval().requires_grad_(False)
