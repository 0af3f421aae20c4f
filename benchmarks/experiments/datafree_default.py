"""Which distillation settings move the data-free default's CA without letting the backdoor back
(issue 14, items 1-2)?

    python -m benchmarks.experiments.datafree_default --entries cifar10-badnets cifar10-wanet

The default's first two stages (``OTBR(compact=True)`` and ``compensated_prune``) run once per
entry; each variant of its ``Recover`` stage (``guarded_recover`` with some options changed) then
distills from the suspect, guarded by OTBR's output, as inside the pipeline. Scored on the
validation split (training images no pass sees): CA and ASR, and the wall time of the stage.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

from benchmarks.common import RESULTS, context_for, load_entry, read_json, store_result, val_scores
from ccpurify.passes import OTBR, Fallback, Prune, TriggerPrune
from ccpurify.passes.defaults import DEFAULTS, compensated_prune, guarded_recover, searched_otbr

# name: options changed from guarded_recover()
VARIANTS: dict[str, dict] = {
    "default": {},
    "skip-vetoed": {"guard_vetoed": "skip"},
    "b40k": {"budget": 40960},
    "skip-vetoed-b40k": {"guard_vetoed": "skip", "budget": 40960},
    "pool1024x10-b40k": {"synthetic_images": 1024, "synthetic_steps": 10, "budget": 40960},
    "skip-pool1024x10-b40k": {"guard_vetoed": "skip", "synthetic_images": 1024, "synthetic_steps": 10, "budget": 40960},
    "target-scope": {"guard_scope": "target"},
    "target-scope-skip": {"guard_scope": "target", "guard_vetoed": "skip"},
    "target-scope-b40k": {"guard_scope": "target", "budget": 40960},
    "lr0.05": {"lr": 0.05},
    "lr0.002": {"lr": 0.002},
    "t1": {"temperature": 1.0},
    "hints0": {"feature_weight": 0.0},
    "hints30": {"feature_weight": 30.0},
    "no-anchor": {"anchor_bn": False},
    "noise-init": {"synthetic_init": "noise"},
    "hints100": {"feature_weight": 100.0},
    "hints30-lr0.05": {"feature_weight": 30.0, "lr": 0.05},
    "hints100-lr0.05": {"feature_weight": 100.0, "lr": 0.05},
    "hints100-clip10": {"feature_weight": 100.0, "max_grad_norm": 10.0},
    "hints300-clip10": {"feature_weight": 300.0, "max_grad_norm": 10.0},
    "invariance1": {"invariance_weight": 1.0},
    "invariance3": {"invariance_weight": 3.0},
    "invariance1-eps0.1": {"invariance_weight": 1.0, "invariance_eps": 0.1},
    "invariance3-eps0.1": {"invariance_weight": 3.0, "invariance_eps": 0.1},
    "invariance3-eps0.2": {"invariance_weight": 3.0, "invariance_eps": 0.2},
    "suppress": {"suppress_target": True},
    "suppress-invariance1": {"suppress_target": True, "invariance_weight": 1.0},
    "invariance1-scale4": {"invariance_weight": 1.0, "invariance_scale": 4.0},
    "invariance3-scale4": {"invariance_weight": 3.0, "invariance_scale": 4.0},
    "suppress-invariance1-scale4": {"suppress_target": True, "invariance_weight": 1.0, "invariance_scale": 4.0},
    "invariance1-hints100-clip10": {"invariance_weight": 1.0, "feature_weight": 100.0, "max_grad_norm": 10.0},
    # the default's recovery (hints 100, clip 10, invariance 1) with its hints matched to OTBR's output
    "A-hints-guard": {
        "invariance_weight": 1.0,
        "feature_weight": 100.0,
        "max_grad_norm": 10.0,
        "hints_from": "guard",
    },
    # ... and only the dark knowledge OTBR's output shares with the suspect (Recover.guard_targets)
    "A-hints-guard-shared": {
        "invariance_weight": 1.0,
        "feature_weight": 100.0,
        "max_grad_norm": 10.0,
        "hints_from": "guard",
        "guard_targets": "shared",
    },
    # ... with the hints at 30: at 100 the hints hold the student to OTBR's output, which keeps GTSRB
    # WaNet's backdoor (validation ASR 62%); at the default's 10 the recovery removed it
    "A-hints30-guard-shared": {
        "invariance_weight": 1.0,
        "feature_weight": 30.0,
        "max_grad_norm": 10.0,
        "hints_from": "guard",
        "guard_targets": "shared",
    },
    "A-hints30-guard-suppress": {
        "invariance_weight": 1.0,
        "feature_weight": 30.0,
        "max_grad_norm": 10.0,
        "hints_from": "guard",
        "suppress_target": True,
    },
    # ... with trigger invariance at 10: at weight 1 it removed GTSRB WaNet's backdoor under hints at 10
    # (validation ASR 49 -> 0.9%), but hints at 100 outweigh it
    "A-hints-guard-shared-inv10": {
        "invariance_weight": 10.0,
        "feature_weight": 100.0,
        "max_grad_norm": 10.0,
        "hints_from": "guard",
        "guard_targets": "shared",
    },
    "A-hints-guard-suppress-inv10": {
        "invariance_weight": 10.0,
        "feature_weight": 100.0,
        "max_grad_norm": 10.0,
        "hints_from": "guard",
        "suppress_target": True,
    },
    # ... or the suspected target's dark knowledge removed (Recover.suppress_target)
    "A-hints-guard-suppress": {
        "invariance_weight": 1.0,
        "feature_weight": 100.0,
        "max_grad_norm": 10.0,
        "hints_from": "guard",
        "suppress_target": True,
    },
    # ... and the suspect's soft targets at temperature 1 (less of its dark knowledge)
    "A-hints-guard-t1": {
        "invariance_weight": 1.0,
        "feature_weight": 100.0,
        "max_grad_norm": 10.0,
        "hints_from": "guard",
        "temperature": 1.0,
    },
    # the default's recovery (hints 10, invariance 1) with its hints matched to OTBR's output
    "invariance1-hints-guard": {"invariance_weight": 1.0, "hints_from": "guard"},
    # ... with everything distilled from OTBR's output: no suspect teacher, no guard
    "A-teacher-defense": {
        "invariance_weight": 1.0,
        "feature_weight": 100.0,
        "max_grad_norm": 10.0,
        "teacher_from": "defense",
        "guard": False,
    },
}


# The data-free default's recovery (``defaults.shared_recover``, "J") at other budgets and with fewer
# synthetic images or synthesis steps: the validation CA a user buys with time (issue 14, item 2).
J_RECOVERY = VARIANTS["A-hints30-guard-shared"]
VARIANTS.update(
    {
        **{f"J-b{budget}": {**J_RECOVERY, "budget": budget} for budget in (2560, 5120, 20480, 40960)},
        "J-steps10": {**J_RECOVERY, "synthetic_steps": 10},
        "J-images128": {**J_RECOVERY, "synthetic_images": 128},
        # The student's BN statistics re-estimated on the synthetic images without the anchor to the
        # suspect's (anchoring OTBR's own output to the suspect brought its backdoors back). The same to
        # the last digit on MobileNetV2 WaNet (75.8 / 31.3): the distillation trains BN in train mode, and
        # its running averages replace whatever statistics the student started with.
        "J-no-anchor": {**J_RECOVERY, "anchor_bn": False},
        # Without OTBR's output as guard (no veto, no shared targets, hints from the suspect): what the
        # guard costs the student's accuracy; its ASR is not a defence's (session 13)
        "J-no-guard": {"invariance_weight": 1.0, "feature_weight": 30.0, "max_grad_norm": 10.0, "guard": False},
        # ... and one part of the guard at a time: hints from the suspect (veto and shared targets kept),
        # the suspect's whole soft targets where both agree (veto and the guard's hints kept), the veto alone
        "J-hints-teacher": {**J_RECOVERY, "hints_from": "teacher"},
        "J-targets-teacher": {**J_RECOVERY, "guard_targets": "teacher"},
        "J-veto-only": {**J_RECOVERY, "hints_from": "teacher", "guard_targets": "teacher"},
        "J-veto-only-target": {
            **J_RECOVERY,
            "hints_from": "teacher",
            "guard_targets": "teacher",
            "guard_scope": "target",
        },
        # Where the guard overrules the suspect, the suspect's output without its predicted class
        "J-masked": {**J_RECOVERY, "guard_vetoed": "masked"},
        "J-masked-target": {**J_RECOVERY, "guard_vetoed": "masked", "guard_scope": "target"},
        # The guard's hints count on the images it vetoes too (they come from the guard, not the suspect)
        "J-hints-all": {**J_RECOVERY, "guard_vetoes_hints": False},
        "J-hints-all-masked": {**J_RECOVERY, "guard_vetoes_hints": False, "guard_vetoed": "masked"},
        # Classes OTBR's output no longer predicts get a logit bias back in the guard (Recover.guard_revive_classes)
        "J-revive": {**J_RECOVERY, "guard_revive_classes": "guard"},
        # ... only where the suspect predicts the revived class (the guard's own logits elsewhere)
        "J-revive-agreed": {**J_RECOVERY, "guard_revive_classes": "agreed"},
        "J-revive-agreed-half": {**J_RECOVERY, "guard_revive_classes": "agreed", "guard_revive_share": 0.5},
        # The guard lets the suspect's class stand where it is among the guard's 2 / 3 most likely
        "J-top2": {**J_RECOVERY, "guard_topk": 2},
        "J-top3": {**J_RECOVERY, "guard_topk": 3},
        # The default's recovery with Neural Cleanse's unlearning on a patch fitted to the suspect
        # (Recover.invariance_patch_weight): for backdoors no defense pass found (Input-aware)
        **{
            f"J-revive-agreed-patch{w}": {
                **J_RECOVERY,
                "guard_revive_classes": "agreed",
                "invariance_patch_weight": float(w),
            }
            for w in (1, 3)
        },
        # With --trigger-prune the defense is TriggerPrune (patch and perturbation), OTBR only where it
        # finds nothing; where it found the trigger its output keeps the suspect's accuracy (CIFAR-10
        # BadNets 89.5%, OTBR 74.2%), so the guard's caution may cost more than it saves (session 15):
        # everything distilled from the defense's output (no suspect teacher, no guard), hints at 30 / 100
        **{
            f"T-teacher-defense-hints{w}": {
                **J_RECOVERY,
                "feature_weight": float(w),
                "teacher_from": "defense",
                "guard": False,
                "hints_from": "teacher",
                "guard_targets": "teacher",
            }
            for w in (30, 100)
        },
    }
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=["cifar10-badnets", "cifar10-wanet", "cifar10-blended"])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--macs", type=float, default=DEFAULTS["none"].macs)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--prune-first",
        action="store_true",
        help="prune (compensated) the suspect first, then OTBR on the pruned model",
    )
    parser.add_argument(
        "--otbr-search",
        action="store_true",
        help="OTBR with the ratio search (defaults.searched_otbr) instead of the fixed ratio 0.1",
    )
    parser.add_argument(
        "--reotbr",
        action="store_true",
        help="OTBR again on the pruned model (pruning OTBR's output revived GTSRB BadNets' backdoor: ASR 0.6 -> 88%%)",
    )
    parser.add_argument(
        "--uncompensated",
        action="store_true",
        help="prune without the BN-statistics compensation (it revived GTSRB BadNets' backdoor after OTBR)",
    )
    parser.add_argument(
        "--trigger-prune",
        action="store_true",
        help="the defense is Fallback(TriggerPrune(trigger_model='both'), searched OTBR) and the pruning target a "
        "fraction of the suspect's MACs (the candidate trigger-prune-both-or-otbr-search+prune-dense-comp...)",
    )
    parser.add_argument("--round-to", type=int, default=8, help="the compensated pruning's width multiple")
    parser.add_argument(
        "--real-images",
        type=int,
        default=None,
        help="distil on this many of the defender's unlabelled training images instead of synthetic ones, "
        "all else equal: what the synthetic images cost",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = RESULTS / "experiments" / "datafree_default.json"
    otbr = searched_otbr if args.otbr_search else lambda: OTBR(compact=True)
    if args.trigger_prune:
        otbr = lambda: Fallback(TriggerPrune(trigger_model="both"), searched_otbr())  # noqa: E731
    prune = (
        (lambda m: Prune(macs=m, round_to=args.round_to, global_pruning=True))
        if args.uncompensated
        else (lambda m: compensated_prune(m, of_pipeline_input=args.trigger_prune, round_to=args.round_to))
    )
    for name in args.entries:
        entry = load_entry(name)
        context = context_for(entry, "none")
        context.pipeline_input = entry.model  # what Pipeline sets (Prune(of_pipeline_input=True) reads it)
        if args.prune_first:  # the student is OTBR's output on the pruned suspect, which also guards
            pruned, _ = prune(args.macs)(entry.model, context)
            defended, _ = otbr()(pruned, context)
            stages = {"pruned": pruned, "otbr": defended}
            student = defended
        else:
            defended, _ = otbr()(entry.model, context)
            pruned, _ = prune(args.macs)(defended, context)
            stages = {"trigger-prune-or-otbr" if args.trigger_prune else "otbr": defended, "pruned": pruned}
            student = pruned
            if args.reotbr:
                student, _ = otbr()(pruned, context)
                stages["reotbr"] = student
        context.pipeline_input, context.teacher = entry.model, defended  # what Pipeline sets for Recover
        if args.real_images:
            context.unlabeled_data = entry.unlabeled_data(count=args.real_images)
        key = (
            f"{name}@{args.macs:g}"
            + ("-prune-first" if args.prune_first else "")
            + ("-otbr-search" if args.otbr_search else "")
            + ("-trigger-prune" if args.trigger_prune else "")
            + (f"-round{args.round_to}" if args.round_to != 8 else "")
            + ("-reotbr" if args.reotbr else "")
            + ("-uncompensated" if args.uncompensated else "")
            + (f"-real{args.real_images}" if args.real_images else "")
        )
        row = read_json(out, {}).get(key, {})
        row.update(suspect=val_scores(entry, entry.model), **{k: val_scores(entry, m) for k, m in stages.items()})
        print(key, {k: row[k] for k in ("suspect", *stages)}, flush=True)
        for variant in args.variants:
            recover = dataclasses.replace(
                guarded_recover(), **VARIANTS[variant], **({"data": "unlabeled"} if args.real_images else {})
            )
            started = time.perf_counter()
            recovered, report = recover(copy.deepcopy(student), context)
            row[variant] = {
                **val_scores(entry, recovered),
                "seconds": round(time.perf_counter() - started, 1),
                "vetoed": report.details.distill.guard_vetoed_fraction,
                "suspected_target": report.details.suspected_target,
                "universal_trigger": report.details.universal_trigger,
                "patch_trigger": report.details.patch_trigger,
                "revived": report.details.guard_revived_classes,
            }
            print(key, variant, row[variant], flush=True)
            store_result(out, {}, None, key, row)  # other runs may be adding other entries
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
