"""Do the with-data defaults get worse with more data? (issue 14, item 5)

    python -m benchmarks.data_amount                                   # labelled: BadNets and WaNet, 250/500/2,500
    python -m benchmarks.data_amount --kind unlabeled                  # unlabelled: 1,000/5,000/20,000
    python -m benchmarks.data_amount --entries cifar10-badnets --counts 500 2500
    python -m benchmarks.data_amount --tables-only

For each zoo model, each number of defender images and each candidate of
``ccpurify.passes.defaults`` for that kind of data (at the MACs target in its name), the pipeline runs
with exactly that many images and is scored on the test split. Not on the validation images: those
are part of the run's 2,500-image clean subset, which the largest labelled setting gives the
defender. Nothing is chosen from these numbers.

- Labelled: 500 images are the run's RNP subset (what the grid uses), 250 half of it drawn at random
  (``defender.draw``: the subsets are stored in class order, and their first half held five classes
  before session 12), 2,500 the run's larger clean subset (what the CLI's run-directory shorthand
  used to take).
- Unlabelled: up to 5,000 are drawn at random from the run's unlabelled pool (the grid uses all
  5,000; the first 1,000, used before session 12, held two classes); more continue the seeded draw
  the pool was made by (``ccpurify.train.defender_resources``: non-poisoned training images outside
  the clean subset), so every larger set holds the smaller ones and never a validation image.

Results accumulate in results/data_amount_cells.json (an interrupted run resumes); the report is
results/data_amount.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    RESULTS,
    ZOO,
    context_for,
    load_entry,
    read_json,
    store_result,
    write_report,
    zoo_entries,
)
from ccpurify import defender
from ccpurify.data import get_spec, load_dataset
from ccpurify.errors import InvalidInputError
from ccpurify.passes import LabeledData, PurifyContext, UnlabeledData
from ccpurify.passes.defaults import CANDIDATES, DEFAULTS, candidate
from ccpurify.passes.defaults import key as candidate_key
from ccpurify.train import defender_resources

ENTRIES = ("cifar10-badnets", "cifar10-wanet")


@dataclass(frozen=True)
class Kind:
    """A kind of defender data: the candidates measured, the image counts, how its tables name the
    images, and what ``-budget`` means."""

    pipelines: tuple[str, ...]  # candidates at their MACs targets, as the grid names them: "name@0.5"
    counts: tuple[int, ...]
    title: str
    images: str
    budget_note: str


KINDS = {
    "clean": Kind(
        (
            "rnp-ranked+prune+recover@0.5",
            "rnp-ranked+prune+recover-budget@0.5",
            "trigger-prune-both-or-otbr-search-max0.05+prune-dense-comp16+recover-guarded-invariant-guardhints30-"
            "shared-revived+finetune-clean@0.75",
            "trigger-prune-both-or-otbr-search-max0.05+prune-dense-comp16+recover-guarded-invariant-keptbn-guardhints30-"
            "shared-revived-clean@0.75",
            "trigger-prune-both-or-otbr-search-max0.05+prune-dense-comp16+recover-guarded-invariant-keptbn-nohints-"
            "shared-revived-clean@0.75",
            "trigger-prune-both-or-otbr-search-max0.05+prune-dense-comp16+recover-guarded-invariant-keptbn-nohints-"
            "shared-revived-clean-warp3-gated@0.75",
            candidate_key(DEFAULTS["clean"].name, DEFAULTS["clean"].macs),
        ),
        (250, 500, 2500),
        "Labelled defaults against the amount of clean data",
        "labelled clean",
        "`-budget`: RNP on at most 500 of them and distillation for a fixed 10,000 sample-steps; `+finetune-clean` "
        "(the default in session 17): the data-free default, then a fine-tune for a fixed 10,000 sample-steps; "
        "`-keptbn-...-clean`: the data-free default's recovery on the labelled images for a fixed 10,240 "
        "sample-steps; `-keptbn-nohints-...-clean` (the default in sessions 18-27): the same without feature hints; "
        "`-clean-warp3-gated` (session 23's candidate): the same, unlearning a smooth warp where one lifts a class "
        "by 0.3 or more; `-synth100-warmups-early-...-clean-foundpatch-warp3-gated-targetguard-if-early` (the default "
        "since session 28): the data-free default's trigger search (two patch searches, the per-image check) and guard, "
        "unlearning the found patch and a gated warp.",
    ),
    "unlabeled": Kind(
        (
            "bcu-compact@0.5",
            "bcu-compact-budget@0.5",
            "bcu-compact-capped@0.5",
            "trigger-prune-both-or-otbr-search-max0.05+prune-dense-comp16+recover-guarded-invariant-guardhints30-"
            "shared-revived+finetune-unlabeled@0.75",
            "trigger-prune-both-or-otbr-search-max0.05+prune-dense-comp16+recover-guarded-invariant-keptbn-nohints-"
            "shared-revived-unlabeled@0.75",
            "trigger-prune-both-synth100-or-otbr-search-max0.05+prune-dense-comp16+recover-guarded-invariant-keptbn-"
            "nohints-shared-revived-unlabeled@0.75",
            candidate_key(DEFAULTS["unlabeled"].name, DEFAULTS["unlabeled"].macs),
        ),
        (1000, 5000, 20000),
        "Unlabelled defaults against the amount of unlabelled data",
        "unlabelled",
        "`-budget`: BCU's distillation for a fixed 100,000 sample-steps (5,000 images x 20 epochs); `-capped`: "
        "BCU on at most 5,000 of the images (a seeded draw), 20 epochs; `+finetune-unlabeled` (the default in "
        "sessions 17-18): the data-free default, then a fine-tune for a fixed 10,000 sample-steps; "
        "`-keptbn-nohints-...-unlabeled` (the default in session 19): session 18's labelled default's recipe on the "
        "unlabelled images; `-synth100-...-unlabeled` (the default in sessions 20-22): the same with the trigger "
        "search on images refined for 100 steps; `-unlabeled-foundpatch-warp3-gated` (the default since session 23): "
        "the same, unlearning the found patch and, where a smooth warp lifts one class by 0.3 or more, the warp.",
    ),
}
STORE = RESULTS / "data_amount_cells.json"  # resumable store; data_amount.json/.md are the report


def images_used(report) -> dict[str, int]:
    """How many images each pass that trained used, by pass name (a repeated name, as the two
    recoveries of the fine-tuned defaults, numbered from its second pass: ``recover 2``)."""
    used: dict[str, int] = {}
    seen: Counter[str] = Counter()
    for p in report.passes:
        seen[p.name] += 1
        if (t := p.details.training()) is not None:
            used[p.name if seen[p.name] == 1 else f"{p.name} {seen[p.name]}"] = t.images
    return used


def split_key(pipeline: str) -> tuple[str, float]:
    """``"name@0.5"`` -> ``("name", 0.5)``; refused in one line when the MACs target is missing or no number."""
    name, at, macs = pipeline.rpartition("@")
    if not at:
        raise SystemExit(f"{pipeline!r}: name a candidate at its MACs target, e.g. {pipeline}@0.5")
    try:
        return name, float(macs)
    except ValueError:
        raise SystemExit(f"{pipeline!r}: the MACs target after '@' must be a number, e.g. {name}@0.5") from None


def check_arguments(args: argparse.Namespace, counts: list[int], pipelines: list[str]) -> None:
    """Refuse bad names and counts in one line before any model or data is loaded."""
    known = set(zoo_entries(Path(args.zoo)))
    if unknown := [e for e in args.entries if e not in known]:
        raise SystemExit(f"unknown zoo entries {unknown}; known: {', '.join(sorted(known))}")
    if bad := [c for c in counts if c < 1]:
        raise SystemExit(f"image counts must be >= 1, got {bad}")
    for pipeline in pipelines:
        name, macs = split_key(pipeline)
        if CANDIDATES.get(name, (None,))[0] != args.kind:
            raise SystemExit(
                f"{name!r} is not a candidate for {args.kind} data; see ccpurify.passes.defaults.CANDIDATES"
            )
        try:
            candidate(name, macs)  # the MACs target's range
        except InvalidInputError as exc:
            raise SystemExit(f"{pipeline!r}: {exc}") from None


def labelled(entry, count: int) -> LabeledData:
    """``count`` labelled clean images of the run's defender subsets (see the module docstring)."""
    data = defender.clean_data(entry.run.path, entry.dataset, rnp=True, data_dir=entry.data_dir)
    if count > len(data):
        data = defender.clean_data(entry.run.path, entry.dataset, rnp=False, data_dir=entry.data_dir)
        if count > len(data):
            raise SystemExit(f"{entry.name} holds {len(data)} labelled defender images, fewer than {count}")
    idx = torch.from_numpy(defender.draw(len(data), count))
    return LabeledData(data.x[idx], data.y[idx])


def unlabelled(entry, count: int) -> UnlabeledData:
    """``count`` unlabelled images: drawn from the run's pool, or that draw continued (module docstring)."""
    run = entry.run
    if count <= len(run.defender.unlabeled_pool):
        return entry.unlabeled_data(count)
    poisoned = np.asarray(json.loads((run.path / "poison_indices.json").read_text()), dtype=np.int64)
    train = load_dataset(entry.dataset, "train", entry.data_dir)
    config = run.config
    drawn = defender_resources(
        len(train.images), poisoned, config.seed, config.defender_clean_fraction, config.rnp_fraction, count
    )
    if drawn.clean_subset != run.defender.clean_subset or not set(run.defender.unlabeled_pool) <= set(
        drawn.unlabeled_pool
    ):
        raise SystemExit(f"{entry.name}: its defender subsets cannot be redrawn (trained on a subset?)")
    if len(drawn.unlabeled_pool) < count:
        raise SystemExit(f"{entry.name} has {len(drawn.unlabeled_pool)} unlabelled training images, fewer than {count}")
    return UnlabeledData(defender.model_ready(train.images[drawn.unlabeled_pool], get_spec(entry.dataset)))


def with_data(entry, kind: str, count: int) -> PurifyContext:
    context = context_for(entry, "none")
    if kind == "clean":
        context.clean_data = labelled(entry, count)
    else:
        context.unlabeled_data = unlabelled(entry, count)
    return context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=list(ENTRIES))
    parser.add_argument("--kind", choices=sorted(KINDS), default="clean", help="labelled or unlabelled defender data")
    parser.add_argument("--counts", nargs="+", type=int, help="image counts (default: the kind's)")
    parser.add_argument(
        "--pipelines", nargs="+", help="candidates of that kind at their MACs targets, NAME@MACS (default: the kind's)"
    )
    parser.add_argument("--zoo", default=str(ZOO))
    parser.add_argument("--data", default=None)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args(argv)
    kind = KINDS[args.kind]
    counts, pipelines = args.counts or list(kind.counts), args.pipelines or list(kind.pipelines)
    check_arguments(args, counts, pipelines)
    if not args.tables_only:
        for name in args.entries:
            entry = load_entry(name, Path(args.zoo), args.data)
            dense = entry.test.score(entry.model).metrics
            store_result(STORE, {"cells": {}}, "cells", f"{name}|dense", {"ca": dense.ca, "asr": dense.asr})
            for pipeline in pipelines:
                pipeline_name, macs = split_key(pipeline)
                for count in counts:
                    key = f"{name}|{pipeline}|{count}"
                    if key in read_json(STORE, {"cells": {}})["cells"]:
                        continue
                    context = with_data(entry, args.kind, count)
                    started = time.perf_counter()
                    model, report = candidate(pipeline_name, macs)(entry.model, context)
                    seconds = time.perf_counter() - started
                    m = entry.test.score(model).metrics
                    used = images_used(report)
                    store_result(
                        STORE,
                        {"cells": {}},
                        "cells",
                        key,
                        {
                            "ca": m.ca,
                            "asr": m.asr,
                            "macs_ratio": report.macs_after / report.macs_before,
                            "seconds": seconds,
                            "images_used": used,
                        },
                    )
                    print(
                        f"{key}: test CA {100 * m.ca:.1f} ASR {100 * (m.asr or 0):.1f} ({seconds:.0f} s, images {used})",
                        flush=True,
                    )
    write_tables(read_json(STORE, {"cells": {}})["cells"])
    return 0


def stored_entries(cells: dict) -> list[str]:
    """The zoo entries with a stored cell, ``ENTRIES`` first: a run on some of them rewrites the
    report without dropping the others' rows."""
    stored = {key.split("|")[0] for key in cells}
    return [e for e in ENTRIES if e in stored] + sorted(stored - set(ENTRIES))


def write_tables(cells: dict) -> None:
    """One table per kind of data, from every stored cell."""
    entries = stored_entries(cells)

    def fmt(c: dict | None) -> str:
        if c is None:
            return ""
        asr = "-" if c["asr"] is None else f"{100 * c['asr']:.1f}"
        return f"{100 * c['ca']:.1f} / {asr}"

    lines = []
    for kind in KINDS.values():
        lines += [""] if lines else []
        lines += [
            f"# {kind.title} (test CA / ASR %)",
            "",
            f"Each candidate at its MACs target (`@`), given exactly N {kind.images} images of the run's defender data.",
            kind.budget_note,
            "",
            "| model | pipeline | dense | " + " | ".join(f"N = {c:,}" for c in kind.counts) + " |",
            "|---|---|---|" + "---|" * len(kind.counts),
        ]
        for entry in entries:
            for pipeline in kind.pipelines:
                row = [fmt(cells.get(f"{entry}|{pipeline}|{c}")) for c in kind.counts]
                lines.append(f"| {entry} | {pipeline} | {fmt(cells.get(f'{entry}|dense'))} | " + " | ".join(row) + " |")
    rows = [{"cell": k, **v} for k, v in sorted(cells.items())]
    write_report("data_amount", rows, lines, entries=entries, kinds={k: v.counts for k, v in KINDS.items()})


if __name__ == "__main__":
    sys.exit(main())
