"""Why does the labelled default collapse on cifar10-wanet with 2,500 clean images (issue 14, item 5)?

    python -m benchmarks.experiments.wanet_data_amount

``results/data_amount.md``: with the run's 500-image RNP subset the labelled default ends at 75.3 /
0.3 (CA / ASR %), with its 2,500-image clean subset at 16.5 / 91.0, and the budget variant (RNP on
at most 500 of them, distillation for 10,000 sample-steps) at 11.8 / 98.5. This runs the budget
variant stage by stage on both data sets and scores each stage on the test split (and the
distillation teacher on the defender's own images), to find the stage that breaks.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import RESULTS, context_for, load_entry
from ccpurify import defender
from ccpurify.passes import Recover
from ccpurify.passes.defaults import CLEAN_RECOVER_BUDGET, RNP_IMAGES, prune, ranked_rnp
from ccpurify.passes.rnp import accuracy


def score(entry, model, data) -> dict:
    m = entry.test.score(model).metrics
    return {"ca": m.ca, "asr": m.asr, "defender_images_acc": accuracy(model, data, "cpu")}


def stages(entry, data) -> dict:
    """The budget variant of the labelled default, stage by stage, each stage scored."""
    context = context_for(entry, "none")
    context.clean_data = data
    row = {"input": score(entry, entry.model, data)}
    defended, rnp_report = ranked_rnp(RNP_IMAGES)(entry.model, context)
    row["rnp_details"] = {
        k: v
        for k, v in rnp_report.details.to_dict().items()
        if isinstance(v, (int, float, str)) or k == "threshold_rule"
    }
    row["rnp"] = score(entry, defended, data)
    print(len(data), "rnp", row["rnp"], flush=True)
    pruned, _ = prune(0.5)(defended, context)
    row["prune"] = score(entry, pruned, data)
    print(len(data), "prune", row["prune"], flush=True)
    for name, temperature in (("recover", 4.0), ("recover_t1", 1.0)):
        recovered, _ = Recover(
            data="clean", hard_label_weight=1.0, budget=CLEAN_RECOVER_BUDGET, teacher=defended, temperature=temperature
        )(pruned, context)
        row[name] = score(entry, recovered, data)
        print(len(data), name, row[name], flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", nargs="+", type=int, choices=(500, 2500), default=[500, 2500])
    parser.add_argument("--tag", default="", help="a suffix for the stored rows (e.g. the option tried)")
    args = parser.parse_args(argv)
    entry = load_entry("cifar10-wanet")
    sets = {
        500: defender.clean_data(entry.run.path, entry.dataset, rnp=True, data_dir=entry.data_dir),
        2500: defender.clean_data(entry.run.path, entry.dataset, rnp=False, data_dir=entry.data_dir),
    }
    out = RESULTS / "experiments" / "wanet_data_amount.json"
    out.parent.mkdir(exist_ok=True)
    rows = json.loads(out.read_text()) if out.is_file() else {}
    for count in args.counts:
        rows[f"{count}{args.tag}"] = stages(entry, sets[count])
        out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
