"""What does ``TriggerPrune`` remove from each suspect, and at what cost, before anything else runs?

    python -m benchmarks.experiments.trigger_prune --entries gtsrb-blended cifar10-lf --gains 1.5 2

For each zoo model and each gain bar (``min_gain``) and cap (``max_fraction``): the suspect and its
``TriggerPrune`` output scored on the validation split (CA and ASR), with what the pass found (the
universal trigger, whether the gate stopped it, the channels flagged, removed and only zeroed).
"""

from __future__ import annotations

from benchmarks.common import RESULTS, datafree_experiment, read_json, store_result, val_scores
from ccpurify.passes import TriggerModel, TriggerPrune


def main(argv: list[str] | None = None) -> int:
    def options(parser) -> None:
        parser.add_argument("--gains", nargs="+", type=float, default=[TriggerPrune.min_gain])
        parser.add_argument("--fractions", nargs="+", type=float, default=[TriggerPrune.max_fraction])
        parser.add_argument("--depth", type=float, default=TriggerPrune.depth)
        parser.add_argument(
            "--trigger-model", default=TriggerPrune.trigger_model.value, choices=[m.value for m in TriggerModel]
        )
        parser.add_argument(
            "--synthesis-steps",
            type=int,
            default=TriggerPrune.synthesis_steps,
            help="refinement steps of the synthetic images",
        )
        parser.add_argument("--lift", type=float, default=TriggerPrune.min_lift, help="the gate's min_lift")
        parser.add_argument("--max-area", type=float, default=TriggerPrune.max_area, help="patch searches only")
        parser.add_argument(
            "--patch-penalty", type=float, default=TriggerPrune.patch_penalty, help="patch searches only"
        )
        parser.add_argument("--early-fraction", type=float, default=TriggerPrune.early_fraction)
        parser.add_argument(
            "--early-depth",
            type=float,
            default=TriggerPrune.early_depth,
            help="the per-image patch check (patch searches)",
        )

    args, entries = datafree_experiment(__doc__, ["gtsrb-blended", "cifar10-lf", "cifar10-clean"], argv, options)
    patch = args.trigger_model != "perturbation"
    patch_options = dict(max_area=args.max_area, patch_penalty=args.patch_penalty, early_depth=args.early_depth)
    if not patch and patch_options != dict(
        max_area=TriggerPrune.max_area, patch_penalty=TriggerPrune.patch_penalty, early_depth=TriggerPrune.early_depth
    ):
        raise SystemExit(
            "--max-area, --patch-penalty and --early-depth shape the patch search: give --trigger-model patch or both"
        )
    out = RESULTS / "experiments" / "trigger_prune.json"
    for entry, context in entries:
        row = read_json(out, {}).get(entry.name, {})  # settings measured before are kept
        row["suspect"] = val_scores(entry, entry.model)
        for gain in args.gains:
            for fraction in args.fractions:
                purified, report = TriggerPrune(
                    min_gain=gain,
                    max_fraction=fraction,
                    depth=args.depth,
                    min_lift=args.lift,
                    synthesis_steps=args.synthesis_steps,
                    trigger_model=args.trigger_model,
                    **(patch_options if patch else {}),
                    **({"early_fraction": args.early_fraction} if args.early_depth > 0 else {}),
                )(entry.model, context)
                d = report.details
                key = f"gain{gain:g}-cap{fraction:g}-depth{args.depth:g}" + (f"-{args.trigger_model}" if patch else "")
                if args.synthesis_steps != TriggerPrune.synthesis_steps:
                    key += f"-synth{args.synthesis_steps}"
                if args.lift != TriggerPrune.min_lift:
                    key += f"-lift{args.lift:g}"
                if patch and args.max_area != TriggerPrune.max_area:
                    key += f"-area{args.max_area:g}"
                if patch and args.patch_penalty != TriggerPrune.patch_penalty:
                    key += f"-penalty{args.patch_penalty:g}"
                if patch and args.early_depth != TriggerPrune.early_depth:
                    key += f"-early{args.early_depth:g}"
                    if args.early_fraction != TriggerPrune.early_fraction:
                        key += f"-frac{args.early_fraction:g}"
                row[key] = {
                    **val_scores(entry, purified),
                    "triggers": d.triggers,
                    "gated": d.gated,
                    "flagged": d.flagged,
                    "removed": d.removed,
                    "zeroed": d.zeroed,
                    "scored_channels": d.scored_channels,
                    "early": d.early,
                    "seconds": round(report.wall_time_s, 1),
                }
                print(entry.name, gain, fraction, row[key], flush=True)
        store_result(out, {}, None, entry.name, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
