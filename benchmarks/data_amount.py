"""Do the with-data defaults get worse with more data? (issue 14, item 5)

    python -m benchmarks.data_amount                                   # BadNets and WaNet, 250/500/2,500 images
    python -m benchmarks.data_amount --entries cifar10-badnets --counts 500 2500
    python -m benchmarks.data_amount --tables-only

For each zoo model, each number of labelled clean images and each labelled candidate of
``ccpurify.passes.defaults`` (at its default MACs target), the pipeline runs with exactly that many
images and is scored on the test split. Not on the validation images: those are part of the
run's 2,500-image clean subset, which the largest setting gives the defender. Nothing is chosen
from these numbers. The images: 500 are the run's RNP subset (what the grid uses), 250 its first half,
2,500 the run's larger clean subset (what the CLI's run-directory shorthand used to take). Results
accumulate in results/data_amount_cells.json (an interrupted run resumes); the report is
results/data_amount.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ZOO, context_for, load_entry, read_json, store_result, write_report
from ccpurify import defender
from ccpurify.passes import LabeledData
from ccpurify.passes.defaults import DEFAULTS, candidate

ENTRIES = ("cifar10-badnets", "cifar10-wanet")
COUNTS = (250, 500, 2500)
PIPELINES = ("rnp-ranked+prune+recover", "rnp-ranked+prune+recover-budget")
STORE = RESULTS / "data_amount_cells.json"  # resumable store; data_amount.json/.md are the report


def labelled(entry, count: int) -> LabeledData:
    """``count`` labelled clean images of the run's defender subsets (see the module docstring)."""
    rnp = defender.clean_data(entry.run.path, entry.dataset, rnp=True, data_dir=entry.data_dir)
    if count <= len(rnp):
        return LabeledData(rnp.x[:count], rnp.y[:count])
    larger = defender.clean_data(entry.run.path, entry.dataset, rnp=False, data_dir=entry.data_dir)
    if count > len(larger):
        raise SystemExit(f"{entry.name} holds {len(larger)} labelled defender images, fewer than {count}")
    return LabeledData(larger.x[:count], larger.y[:count])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=list(ENTRIES))
    parser.add_argument("--counts", nargs="+", type=int, default=list(COUNTS))
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    parser.add_argument("--zoo", default=str(ZOO))
    parser.add_argument("--data", default=None)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args(argv)
    macs = DEFAULTS["clean"].macs
    if not args.tables_only:
        for name in args.entries:
            entry = load_entry(name, Path(args.zoo), args.data)
            dense = entry.test.score(entry.model).metrics
            store_result(STORE, {"cells": {}}, "cells", f"{name}|dense", {"ca": dense.ca, "asr": dense.asr})
            for pipeline in args.pipelines:
                for count in args.counts:
                    key = f"{name}|{pipeline}@{macs:g}|{count}"
                    if key in read_json(STORE, {"cells": {}})["cells"]:
                        continue
                    context = context_for(entry, "none")
                    context.clean_data = labelled(entry, count)
                    started = time.perf_counter()
                    model, report = candidate(pipeline, macs)(entry.model, context)
                    seconds = time.perf_counter() - started
                    m = entry.test.score(model).metrics
                    used = {p.name: t.images for p in report.passes if (t := p.details.training()) is not None}
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
    write_tables(read_json(STORE, {"cells": {}})["cells"], args.entries, args.counts, args.pipelines, macs)
    return 0


def write_tables(cells: dict, entries: list[str], counts: list[int], pipelines: list[str], macs: float) -> None:
    lines = [
        "# Labelled defaults against the amount of clean data (test CA / ASR %)",
        "",
        f"Each candidate at {macs:g} of the MACs, given exactly N labelled clean images of the run's defender subsets.",
        "`-budget`: RNP on at most 500 of them and distillation for a fixed 10,000 sample-steps.",
        "",
        "| model | pipeline | dense | " + " | ".join(f"N = {c:,}" for c in counts) + " |",
        "|---|---|---|" + "---|" * len(counts),
    ]

    def fmt(c: dict | None) -> str:
        if c is None:
            return ""
        asr = "-" if c["asr"] is None else f"{100 * c['asr']:.1f}"
        return f"{100 * c['ca']:.1f} / {asr}"

    for name in entries:
        for pipeline in pipelines:
            row = [fmt(cells.get(f"{name}|{pipeline}@{macs:g}|{c}")) for c in counts]
            lines.append(f"| {name} | {pipeline} | {fmt(cells.get(f'{name}|dense'))} | " + " | ".join(row) + " |")
    rows = [{"cell": k, **v} for k, v in sorted(cells.items())]
    write_report("data_amount", rows, lines, entries=entries, counts=counts, pipelines=pipelines)


if __name__ == "__main__":
    sys.exit(main())
