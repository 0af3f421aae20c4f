"""Which OTBR ratio does each architecture need, and can it be told without data (OTBR's
``ratio_search``)?

    python -m benchmarks.experiments.otbr_ratio --entries cifar10-mobilenet_v2-badnets cifar10-badnets

For each zoo model and each ratio: ``OTBR(compact=True, ratio=r)`` scored on the validation split
(CA and ASR), the same with ``anchor_bn=True`` (its BatchNorm statistics re-estimated anchored to the
suspect's on synthetic images), and the agreement with the suspect that the ratio search measures on its synthetic
images (``OTBR(ratio_search=..., min_agreement=1.0)``, which tries every ratio and reports each
agreement). The random unlearning depends only on the model and the seed, so it runs once per entry
and every ratio reuses it.
"""

from __future__ import annotations

from unittest import mock

import torch

from benchmarks.common import RESULTS, datafree_experiment, model_fingerprint, read_json, store_result, val_scores
from ccpurify.passes import OTBR
from ccpurify.passes import otbr as otbr_module

RATIOS = (0.01, 0.02, 0.05, 0.1)


def unlearn_once():
    """``random_unlearning`` that runs once per model (by its weights: a pass gets a private copy)
    and then returns the same unlearned copy, which OTBR only reads."""
    done: dict[str, torch.nn.Module] = {}
    unlearn = otbr_module.random_unlearning

    def cached(model, *args, **kwargs):
        key = model_fingerprint(model)
        if key not in done:
            done[key] = unlearn(model, *args, **kwargs)
        return done[key]

    return cached


def main(argv: list[str] | None = None) -> int:
    args, entries = datafree_experiment(
        __doc__,
        ["cifar10-mobilenet_v2-badnets", "cifar10-badnets"],
        argv,
        lambda parser: parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS)),
    )
    out = RESULTS / "experiments" / "otbr_ratio.json"
    for entry, context in entries:
        name = entry.name
        model = entry.model.eval()
        with mock.patch.object(otbr_module, "random_unlearning", unlearn_once()):
            _, report = OTBR(compact=True, ratio_search=tuple(args.ratios), min_agreement=1.0)(model, context)
            agreement = report.details.ratio_search["agreement"]
            row = read_json(out, {}).get(name, {})  # ratios measured before are kept
            row["suspect"] = val_scores(entry, model)
            for ratio in args.ratios:
                purified, _ = OTBR(compact=True, ratio=ratio)(model, context)
                anchored, _ = OTBR(compact=True, ratio=ratio, anchor_bn=True)(model, context)
                row[f"{ratio:g}"] = {
                    **val_scores(entry, purified),
                    "agreement": agreement.get(f"{ratio:g}"),
                    "anchored": val_scores(entry, anchored),
                }
                print(name, ratio, row[f"{ratio:g}"], flush=True)
        store_result(out, {}, None, name, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
