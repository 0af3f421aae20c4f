"""Can a data-free *patch* trigger search find the backdoors the full-image one misses (BadNets)?

    python -m benchmarks.experiments.patch_trigger --entries cifar10-badnets cifar10-clean --penalties 0.5 2

``TriggerPrune``'s universal perturbation is bounded in L-infinity (0.05 of the pixel range over the
whole image): it lands on full-image triggers (Blended, LF) and its gate stops it on BadNets (lift
0.26), whose trigger is a small opaque patch. This asks whether the other trigger model of Neural
Cleanse (Wang et al., S&P 2019), a mask ``m`` in [0, 1] and a pattern ``p`` pasted as
``(1 - m) x + m p``, found on the same synthetic images with the class chosen as the universal
trigger chooses it (the one the batch leans to most) and an L1 penalty on the mask, separates
backdoored from clean models: for each penalty, the mask's area (fraction of the pixels), the share
of the synthetic images it sends to its class, and the share of real validation images (never
used for the search) it sends there, with the true target for comparison.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import RESULTS, datafree_experiment, read_json, store_result
from ccpurify.invariance import fit_patch_trigger
from ccpurify.synthesis import class_histogram, synthesize_bn_images


def main(argv: list[str] | None = None) -> int:
    def options(parser) -> None:
        parser.add_argument("--penalties", nargs="+", type=float, default=[0.5, 2.0, 8.0])
        parser.add_argument("--steps", type=int, default=200)

    args, entries = datafree_experiment(
        __doc__, ["cifar10-badnets", "cifar10-clean", "gtsrb-badnets", "gtsrb-clean"], argv, options
    )
    out = RESULTS / "experiments" / "patch_trigger.json"
    for entry, _ in entries:
        model = entry.model.eval()
        normalize = entry.val.normalize
        shape = tuple(entry.example_inputs.shape[1:])
        images = synthesize_bn_images(
            model,
            256,
            shape,
            init="dead_leaves",
            steps=30,
            normalize=normalize,
            generator=torch.Generator().manual_seed(0),
        )
        real = normalize(
            torch.from_numpy(np.ascontiguousarray(entry.val.images[:1000])).permute(0, 3, 1, 2).float() / 255
        )
        classes = int(model(images[:1]).shape[1])
        row = {**read_json(out, {}).get(entry.name, {}), "true_target": entry.val.target}  # earlier penalties kept
        for penalty in args.penalties:
            patch = fit_patch_trigger(
                model, images, normalize, penalty=penalty, steps=args.steps, generator=torch.Generator().manual_seed(1)
            )
            with torch.no_grad():
                real_after = class_histogram(model, patch.apply(real), classes)[patch.target].item()
                real_before = class_histogram(model, real, classes)[patch.target].item()
            row[f"penalty{penalty:g}"] = {
                **patch.summary(),
                "real_fooled": round(real_after / len(real), 4),
                "real_share_before": round(real_before / len(real), 4),
            }
            print(entry.name, penalty, row[f"penalty{penalty:g}"], flush=True)
        store_result(out, {}, None, entry.name, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
