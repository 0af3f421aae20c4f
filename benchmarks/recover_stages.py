"""Where the data-free default pipeline (OTBR -> Prune -> Recover) gains or loses accuracy, stage by stage.

    python -m benchmarks.recover_stages --entries cifar10-wanet cifar10-badnets

For each zoo model, validation CA and ASR (training-split images no pass sees) after: the suspect
model; OTBR; OTBR + Prune(50% MACs, round_to=8); Prune alone; the pruned model with its BatchNorm
statistics re-estimated on the synthetic images Recover would use, or on RNP's 500 clean images;
the *unpruned* OTBR output re-estimated on the synthetic images; and the full Recover (with and
without the BN re-estimation, and with feature hints at weights 1 and 10). A model whose own
BN-statistics images do not resemble its training data loses its accuracy as soon as its BatchNorm
layers adopt their statistics, and distillation in train mode adopts them whatever ``recalibrate``
says; matching the teacher's BN inputs (feature hints) makes the copied statistics right again.
Writes results/recover_stages.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from benchmarks.common import ZOO, load_entry, write_report
from ccpurify.distill import recalibrate_bn
from ccpurify.passes import OTBR, PurifyContext, Recover
from ccpurify.passes.defaults import prune
from ccpurify.synthesis import synthesize_bn_images


def recalibrated(model, images):
    out = copy.deepcopy(model)
    recalibrate_bn(out, images)
    return out


def stages(entry) -> list[tuple[str, object]]:
    context = PurifyContext(example_inputs=entry.example_inputs, num_classes=entry.test.spec.num_classes, seed=0)
    defended = OTBR().run(copy.deepcopy(entry.model), context).model
    pruned = prune(0.5).run(copy.deepcopy(defended), context).model
    recover = Recover(data="synthetic", teacher=defended)
    synthetic = synthesize_bn_images(
        defended,
        recover.synthetic_images,
        tuple(entry.example_inputs.shape[1:]),
        steps=recover.synthetic_steps,
        generator=context.generator(11),
    )
    return [
        ("suspect", entry.model),
        ("OTBR", defended),
        ("OTBR + prune", pruned),
        ("prune alone", prune(0.5).run(copy.deepcopy(entry.model), context).model),
        ("OTBR + prune, BN re-estimated on synthetic images", recalibrated(pruned, synthetic)),
        ("OTBR + prune, BN re-estimated on 500 clean images", recalibrated(pruned, entry.clean_data().x)),
        ("OTBR (unpruned), BN re-estimated on synthetic images", recalibrated(defended, synthetic)),
        ("OTBR + prune + Recover (pass defaults, no hints)", recover.run(copy.deepcopy(pruned), context).model),
        (
            "OTBR + prune + Recover(recalibrate=False)",
            Recover(data="synthetic", teacher=defended, recalibrate=False).run(copy.deepcopy(pruned), context).model,
        ),
        *[
            (
                f"OTBR + prune + Recover(feature_weight={w:g})",
                Recover(data="synthetic", teacher=defended, feature_weight=w).run(copy.deepcopy(pruned), context).model,
            )
            for w in (1.0, 10.0)
        ],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=["cifar10-wanet", "cifar10-badnets"])
    parser.add_argument("--zoo", default=str(ZOO))
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name in args.entries:
        entry = load_entry(name, Path(args.zoo), args.data)
        for stage, model in stages(entry):
            m = entry.val.score(model).metrics
            rows.append({"entry": name, "stage": stage, "val_ca": m.ca, "val_asr": m.asr})
            print(f"{name} | {stage}: val CA {100 * m.ca:.1f} ASR {100 * m.asr:.1f}", flush=True)
    lines = [
        "# The data-free default, stage by stage (validation CA / ASR %)",
        "",
        "| stage | " + " | ".join(args.entries) + " |",
        "|---|" + "---|" * len(args.entries),
    ]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        cells = [next(r for r in rows if r["entry"] == e and r["stage"] == stage) for e in args.entries]
        lines.append(
            f"| {stage} | " + " | ".join(f"{100 * c['val_ca']:.1f} / {100 * c['val_asr']:.1f}" for c in cells) + " |"
        )
    write_report("recover_stages", rows, lines, entries=args.entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
