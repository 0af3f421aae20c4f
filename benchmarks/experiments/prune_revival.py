"""Does pruning OTBR's output bring the backdoor back, and which part of the pruning does it?

    python -m benchmarks.experiments.prune_revival --entries gtsrb-badnets gtsrb-wanet cifar10-badnets

On GTSRB BadNets, validation ASR was 0.6% after the searched OTBR and 87.9% after the data-free
default's compensated pruning to 0.75 MACs (``benchmarks/experiments/datafree_default.py``). For each
zoo model: the searched OTBR (``defaults.searched_otbr``), then each way of pruning its output to the
same MACs target, scored on the validation split (CA and ASR) before any recovery.
"""

from __future__ import annotations

from benchmarks.common import RESULTS, datafree_experiment, store_result, val_scores
from ccpurify.passes import Prune
from ccpurify.passes.defaults import DEFAULTS, searched_otbr

# name: Prune options (all to the same MACs target, widths rounded to 8)
PRUNINGS: dict[str, dict] = {
    "global-compensated": {"global_pruning": True, "compensate": True},  # the default's
    "global": {"global_pruning": True},
    "uniform-compensated": {"compensate": True},
    "uniform": {},
}


def main(argv: list[str] | None = None) -> int:
    args, entries = datafree_experiment(
        __doc__,
        ["gtsrb-badnets", "gtsrb-wanet", "cifar10-badnets"],
        argv,
        lambda parser: parser.add_argument("--macs", type=float, default=DEFAULTS["none"].macs),
    )
    out = RESULTS / "experiments" / "prune_revival.json"
    for entry, context in entries:
        defended, report = searched_otbr()(entry.model, context)
        row = {
            "suspect": val_scores(entry, entry.model),
            "otbr": {**val_scores(entry, defended), "ratio": report.details.ratio},
        }
        for prune_name, options in PRUNINGS.items():
            pruned, pruning = Prune(macs=args.macs, round_to=8, **options)(defended, context)
            row[prune_name] = {**val_scores(entry, pruned), "macs_ratio": pruning.macs_ratio}
            print(entry.name, prune_name, row[prune_name], flush=True)
        store_result(out, {}, None, f"{entry.name}@{args.macs:g}", row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
