"""Does a universal perturbation found without data land on the backdoor (ccpurify.invariance)?

    python -m benchmarks.experiments.universal_trigger --entries gtsrb-blended gtsrb-clean

For each zoo model: 256 dead-leaves images refined on the model's own BatchNorm statistics (no
data), then ``fit_universal_trigger`` within ``--eps`` of the pixel range. Reported: the class it
found and the true target, the share of the synthetic images it sends there (and without it), and
the share of real validation images it sends there: near 100% where it found the trigger, near the
class's natural share on a clean model.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import RESULTS, context_for, load_entry, normalize_images, store_result
from ccpurify.invariance import fit_universal_trigger, perturbation_bound
from ccpurify.synthesis import synthesize_bn_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=["gtsrb-blended", "gtsrb-lf", "cifar10-lf", "gtsrb-clean"])
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = RESULTS / "experiments" / "universal_trigger.json"
    for name in args.entries:
        started = time.perf_counter()
        entry = load_entry(name)
        context = context_for(entry, "none")
        model = entry.model.eval()
        shape = tuple(context.example_inputs.shape[1:])
        images = synthesize_bn_images(model, 256, shape, init="dead_leaves", steps=30, normalize=context.normalize)
        bound = perturbation_bound(args.eps, images, context.normalize)
        trigger = fit_universal_trigger(model, images, bound, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            real = model(normalize_images(entry, entry.val.images[:500]) + trigger.delta).argmax(1)
        row = {
            **trigger.summary(),
            "true_target": entry.test.target,
            "real_fooled": round(float((real == trigger.target).float().mean()), 4),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(name, row, flush=True)
        store_result(out, {}, None, f"{name}@eps{args.eps:g}", row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
