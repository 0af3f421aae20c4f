"""Where does a backdoor live, and does any data-free channel score find it? (analysis only)

    python -m benchmarks.experiments.backdoor_channels --entries cifar10-input_aware

This uses the attacker's triggered validation images, which no defense has, so it is an oracle:
every conv output channel gets its *shift*, the mean over images of its spatially averaged output
on triggered minus clean images, in units of its standard deviation on the clean ones. Zeroing the
``k`` channels of largest shift (a forward hook, the model untouched) and scoring CA / ASR on
the same 500 clean and triggered images says whether the backdoor is held by a few channels. Then
the same for channel rankings a data-free defense could compute:

- ``patch`` / ``perturbation``: the shift under ``TriggerPrune``'s patch and perturbation searches,
  fitted and measured on 256 synthetic images refined 100 steps on the BatchNorm statistics;
- ``patch-minus-random``: the patch's shift minus the largest of four random patches of the same
  area (a shift any patch causes is not the backdoor's);
- ``clp``: each conv filter's spectral norm, standardised within its layer (CLP without the BN);
- ``random0``-``random2``: three seeded random orders, for chance.

For each ranking: how many of the oracle's top 32 channels its top 32 hold, and CA / ASR with its top
``k`` zeroed, over all layers and over the first ten convs only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from benchmarks.common import RESULTS, datafree_experiment, store_result
from ccpurify.invariance import PatchTrigger, fit_patch_trigger, fit_universal_trigger, perturbation_bound
from ccpurify.passes.clp import filter_spectral_norms
from ccpurify.synthesis import synthesize_bn_images

Ranking = list[tuple[float, str, int]]


def channel_means(model: nn.Module, convs: dict[str, nn.Conv2d], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per conv, its output averaged over space, per image (images x channels)."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in convs}
    handles = [
        conv.register_forward_hook(lambda m, i, o, name=name: out[name].append(o.detach().mean((2, 3))))
        for name, conv in convs.items()
    ]
    try:
        with torch.no_grad():
            for batch in x.split(128):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v) for name, v in out.items()}


def shifts(model: nn.Module, convs: dict[str, nn.Conv2d], clean: torch.Tensor, changed: torch.Tensor) -> dict:
    a, b = channel_means(model, convs, clean), channel_means(model, convs, changed)
    return {n: (b[n].mean(0) - a[n].mean(0)) / (a[n].std(0) + 1e-3) for n in convs}


def ranking(scores: dict[str, torch.Tensor], names: list[str]) -> Ranking:
    return sorted(((float(v), n, k) for n in names for k, v in enumerate(scores[n])), reverse=True)


def zeroed_score(model, convs, channels: Ranking, clean, labels, triggered, target) -> tuple[float, float]:
    """CA and ASR (%) with ``channels`` zeroed by forward hooks."""
    handles = []
    for name, conv in convs.items():
        picked = [k for _, n, k in channels if n == name]
        if picked:
            keep = torch.ones(conv.out_channels)
            keep[picked] = 0
            handles.append(conv.register_forward_hook(lambda m, i, o, keep=keep: o * keep.view(1, -1, 1, 1)))
    try:
        with torch.no_grad():
            ca = (model(clean).argmax(1) == labels).float().mean().item()
            asr = (model(triggered).argmax(1) == target).float().mean().item()
    finally:
        for h in handles:
            h.remove()
    return round(100 * ca, 1), round(100 * asr, 1)


def main(argv: list[str] | None = None) -> int:
    def options(parser) -> None:
        parser.add_argument("--k", nargs="+", type=int, default=[8, 16, 32, 64])

    args, entries = datafree_experiment(__doc__, ["cifar10-input_aware"], argv, options)
    out = RESULTS / "experiments" / "backdoor_channels.json"
    for entry, _ in entries:
        model = entry.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        normalize = entry.val.normalize
        draw = np.sort(np.random.default_rng(0).choice(len(entry.val.bd_images), size=500, replace=False))
        clean, triggered = (
            normalize(torch.from_numpy(a[draw]).permute(0, 3, 1, 2).float() / 255)
            for a in (entry.val.images, entry.val.bd_images)
        )
        labels = torch.from_numpy(entry.val.labels[draw])
        convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        names = list(convs)
        synthetic = synthesize_bn_images(
            model,
            256,
            tuple(entry.example_inputs.shape[1:]),
            init="dead_leaves",
            steps=100,
            normalize=normalize,
            generator=torch.Generator().manual_seed(29),
        )
        patch = fit_patch_trigger(model, synthetic, normalize, generator=torch.Generator().manual_seed(37))
        perturbation = fit_universal_trigger(
            model,
            synthetic,
            perturbation_bound(0.05, synthetic, normalize),
            generator=torch.Generator().manual_seed(31),
        )
        patch_shift = shifts(model, convs, synthetic, patch.apply(synthetic))
        random_shift = None
        for r in range(4):
            g = torch.Generator().manual_seed(100 + r)
            mask = patch.mask.flatten()[torch.randperm(patch.mask.numel(), generator=g)].view_as(patch.mask)
            other = PatchTrigger(mask, normalize(torch.rand(patch.pattern.shape, generator=g)), patch.area, 0, 0, 0)
            s = shifts(model, convs, synthetic, other.apply(synthetic))
            random_shift = s if random_shift is None else {n: torch.maximum(random_shift[n], s[n]) for n in s}
        norms = {n: filter_spectral_norms(m).float() for n, m in convs.items()}
        chance = torch.Generator().manual_seed(7)
        scores = {
            "oracle": shifts(model, convs, clean, triggered),
            "patch": patch_shift,
            "perturbation": shifts(model, convs, synthetic, perturbation.apply(synthetic)),
            "patch-minus-random": {n: patch_shift[n] - random_shift[n] for n in names},
            "clp": {n: (v - v.mean()) / (v.std() + 1e-9) for n, v in norms.items()},
            **{
                f"random{r}": {n: torch.rand(m.out_channels, generator=chance) for n, m in convs.items()}
                for r in range(3)
            },
        }
        oracle_top = {(n, k) for _, n, k in ranking(scores["oracle"], names)[:32]}
        row = {
            "channels": sum(m.out_channels for m in convs.values()),
            "undefended": zeroed_score(model, convs, [], clean, labels, triggered, entry.val.target),
            "patch": patch.summary(),
            "perturbation": perturbation.summary(),
        }
        for layers, scope in ((names, "all"), (names[:10], "first10")):
            for kind, score in scores.items():
                ranked = ranking(score, layers)
                row[f"{kind}/{scope}"] = {
                    "oracle_top32_held": len(oracle_top & {(n, k) for _, n, k in ranked[:32]}),
                    "zeroed": {
                        k: zeroed_score(model, convs, ranked[:k], clean, labels, triggered, entry.val.target)
                        for k in args.k
                    },
                }
                print(entry.name, f"{kind}/{scope}", row[f"{kind}/{scope}"], flush=True)
        row["oracle_top"] = [(round(v, 2), n, k) for v, n, k in ranking(scores["oracle"], names)[:16]]
        store_result(out, {}, None, entry.name, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
