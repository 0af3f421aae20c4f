"""Would the student's BatchNorm statistics, re-estimated after the data-free default's recovery,
give back accuracy without giving back the backdoor (issue 14)?

    python -m benchmarks.experiments.student_statistics --entries cifar10-badnets cifar10-clean

The guarded recovery trains the student's BatchNorm layers in train mode, so its final running
statistics are running averages over augmented synthetic batches, whatever it started with
(``Recover(anchor_bn=...)`` only sets the start). The default's three stages run once per entry; then,
on copies of the student, its statistics are re-estimated on the recovery's own synthetic images:
anchored to the suspect's statistics, anchored to the guard's (OTBR's output), or plainly. Scored on
the validation split (CA and ASR).
"""

from __future__ import annotations

import copy

from benchmarks.common import RESULTS, datafree_experiment, store_result, val_scores
from ccpurify.distill import anchored_bn_update, channel_correspondence, recalibrate_bn
from ccpurify.passes.defaults import DEFAULTS, compensated_prune, searched_otbr, shared_recover


def main(argv: list[str] | None = None) -> int:
    args, entries = datafree_experiment(__doc__, ["cifar10-badnets", "cifar10-clean"], argv)
    out = RESULTS / "experiments" / "student_statistics.json"
    for entry, context in entries:
        suspect, example = entry.model.eval(), context.example_inputs
        guard, _ = searched_otbr()(suspect, context)
        pruned, _ = compensated_prune(DEFAULTS["none"].macs)(guard, context)
        context.pipeline_input, context.teacher = suspect, guard  # what Pipeline sets for Recover
        recover = shared_recover()
        student, _ = recover(pruned, context)
        images = recover.synthesize(guard, context)  # the recovery's own images (made from the guard)
        row = {
            "suspect": val_scores(entry, suspect),
            "guard": val_scores(entry, guard),
            "default": val_scores(entry, student),
        }
        for name, anchor in (("anchored to the suspect", suspect), ("anchored to the guard", guard)):
            copied = copy.deepcopy(student)
            anchored_bn_update(copied, anchor, images, channel_correspondence(anchor, copied, example))
            row[name] = val_scores(entry, copied)
        copied = copy.deepcopy(student)
        recalibrate_bn(copied, images)
        row["re-estimated on the images"] = val_scores(entry, copied)
        print(entry.name, row, flush=True)
        store_result(out, {}, None, entry.name, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
