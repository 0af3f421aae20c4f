"""How much accuracy does data-free distillation win back for its CPU time (issue 14, item 2)?

    python -m benchmarks.experiments.datafree_recover --entry cifar10-clean

Compression alone (``compensated_prune`` to 0.75 MACs) is run once; then each Recover variant
distills the pruned model from the *uncompressed* model on synthetic images, and is scored on the
validation split (training images no pass sees). The variants change the transfer set (how many
dead-leaves images, how many BN-statistics refinement steps) and the budget (sample-steps), so the
table shows where the accuracy comes from: more images, better images, or more steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from benchmarks.common import RESULTS, context_for, load_entry
from ccpurify.passes import Recover
from ccpurify.passes.defaults import HINT_WEIGHT, compensated_prune

# name: (synthetic images, refinement steps, budget in sample-steps)
VARIANTS: dict[str, tuple[int, int, int]] = {
    "256x30-b10k": (256, 30, 10240),
    "256x30-b40k": (256, 30, 40960),
    "1024x10-b10k": (1024, 10, 10240),
    "1024x10-b40k": (1024, 10, 40960),
    "2048x0-b40k": (2048, 0, 40960),
    "2048x5-b40k": (2048, 5, 40960),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", default="cifar10-clean")
    parser.add_argument("--macs", type=float, default=0.75)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    entry = load_entry(args.entry)
    context = context_for(entry, "none")
    pruned, report = compensated_prune(args.macs)(entry.model, context)
    out = RESULTS / "experiments" / "datafree_recover.json"
    rows = json.loads(out.read_text()) if out.is_file() else {}
    key = f"{args.entry}@{args.macs}"
    rows.setdefault(key, {})
    rows[key]["dense"] = entry.val.score(entry.model).metrics.ca
    rows[key]["pruned"] = {"val_ca": entry.val.score(pruned).metrics.ca, "macs": report.details.achieved}
    print(key, rows[key], flush=True)
    for name in args.variants:
        images, steps, budget = VARIANTS[name]
        recover = Recover(
            teacher=entry.model,
            data="synthetic",
            synthetic_init="dead_leaves",
            synthetic_images=images,
            synthetic_steps=steps,
            synthetic_class_weight=1.0,
            feature_weight=HINT_WEIGHT,
            budget=budget,
            anchor_bn=True,
        )
        start = time.perf_counter()
        recovered, _ = recover(copy.deepcopy(pruned), context)
        seconds = time.perf_counter() - start
        rows[key][name] = {"val_ca": entry.val.score(recovered).metrics.ca, "seconds": round(seconds, 1)}
        print(name, rows[key][name], flush=True)
        out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
