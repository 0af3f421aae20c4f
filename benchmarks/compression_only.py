"""Validation accuracy right after compression, before any recovery (issue 14, item 1).

    python -m benchmarks.compression_only                      # every zoo model, 0.75 and 0.5 MACs
    python -m benchmarks.compression_only --entries cifar10-clean --macs 0.75

For each zoo model and MACs target: ``Prune`` with uniform or global magnitude ranking (widths
rounded to multiples of 8), each without and with ``compensate=True`` (the BatchNorm-statistics
compensation of ``ccpurify.compensate``, no data), and, as a reference that *uses* data, the global
pruning with its BatchNorm statistics re-estimated on RNP's 500 clean images. Validation CA/ASR are
measured on training-split images no pass sees. Writes results/compression_only.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ZOO, context_for, load_entry, read_json, write_report, zoo_entries
from ccpurify.cost import model_cost
from ccpurify.distill import recalibrate_bn
from ccpurify.passes import Prune

CONFIGS = {
    "uniform": dict(global_pruning=False, compensate=False),
    "uniform + compensate": dict(global_pruning=False, compensate=True),
    "global": dict(global_pruning=True, compensate=False),
    "global + compensate": dict(global_pruning=True, compensate=True),
}
REFERENCE = "global, BN re-estimated on 500 clean images (uses data)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=None, help="zoo entries (default: all)")
    parser.add_argument("--macs", nargs="+", type=float, default=[0.75, 0.5])
    parser.add_argument("--zoo", default=str(ZOO))
    parser.add_argument("--data", default=None)
    parser.add_argument(
        "--tables-only", action="store_true", help="rebuild the tables from results/compression_only.json"
    )
    args = parser.parse_args(argv)
    if args.tables_only:
        stored = read_json(RESULTS / "compression_only.json", None)
        if stored is None:
            parser.error("no results/compression_only.json yet: run without --tables-only first")
        write_tables(stored["rows"], stored["meta"]["entries"], stored["meta"]["macs"])
        return 0
    entries = args.entries or zoo_entries(Path(args.zoo))
    rows = []
    for name in entries:
        entry = load_entry(name, Path(args.zoo), args.data)
        context = context_for(entry, "none")
        dense = entry.val.score(entry.model).metrics
        rows.append(
            {
                "entry": name,
                "macs_target": 1.0,
                "config": "dense",
                "val_ca": dense.ca,
                "val_asr": dense.asr,
                "macs_ratio": 1.0,
                "seconds": 0.0,
            }
        )
        dense_macs = model_cost(entry.model, entry.example_inputs).macs
        for target in args.macs:
            pruned = {}
            for label, options in CONFIGS.items():
                started = time.perf_counter()
                model, _ = Prune(macs=target, round_to=8, **options)(entry.model, context)
                seconds = time.perf_counter() - started
                pruned[label] = model
                m = entry.val.score(model).metrics
                ratio = model_cost(model, entry.example_inputs).macs / dense_macs
                rows.append(
                    {
                        "entry": name,
                        "macs_target": target,
                        "config": label,
                        "val_ca": m.ca,
                        "val_asr": m.asr,
                        "macs_ratio": ratio,
                        "seconds": seconds,
                    }
                )
                print(
                    f"{name} macs {target} {label}: val CA {100 * m.ca:.1f} ASR {100 * (m.asr or 0):.1f} "
                    f"(x{ratio:.2f} MACs, {seconds:.1f} s)",
                    flush=True,
                )
            reference = copy.deepcopy(pruned["global"])
            recalibrate_bn(reference, entry.clean_data().x)
            m = entry.val.score(reference).metrics
            rows.append(
                {
                    "entry": name,
                    "macs_target": target,
                    "config": REFERENCE,
                    "val_ca": m.ca,
                    "val_asr": m.asr,
                    "macs_ratio": rows[-2]["macs_ratio"],
                    "seconds": None,
                }
            )
            print(f"{name} macs {target} reference: val CA {100 * m.ca:.1f}", flush=True)
    write_tables(rows, entries, args.macs)
    return 0


def write_tables(rows: list[dict], entries: list[str], targets: list[float]) -> None:
    lines = [
        "# Accuracy right after compression, before any recovery (validation CA / ASR %)",
        "",
        "`Prune(macs=target, round_to=8)`; *compensate* is `compensate=True` (BatchNorm-statistics compensation, no data).",
        "The last column re-estimates the global model's BatchNorm statistics on 500 clean images: a with-data reference.",
        "",
    ]
    configs = [*CONFIGS, REFERENCE]

    def cell(r: dict) -> str:
        asr = "-" if r["val_asr"] is None else f"{100 * r['val_asr']:.1f}"
        return f"{100 * r['val_ca']:.1f} / {asr}"

    for target in targets:
        lines += [
            f"## {target:g} of the MACs",
            "",
            "| model | dense | " + " | ".join(configs) + " |",
            "|---|---|" + "---|" * len(configs),
        ]
        for name in entries:
            cells = {r["config"]: r for r in rows if r["entry"] == name and r["macs_target"] in (target, 1.0)}
            lines.append(f"| {name} | {cell(cells['dense'])} | " + " | ".join(cell(cells[c]) for c in configs) + " |")
        means = [
            100 * float(np.mean([r["val_ca"] for r in rows if r["macs_target"] == target and r["config"] == c]))
            for c in configs
        ]
        dense = 100 * float(np.mean([r["val_ca"] for r in rows if r["config"] == "dense"]))
        lines.append(f"| **mean CA** | {dense:.1f} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
        achieved = [r["macs_ratio"] for r in rows if r["macs_target"] == target and r["config"] in CONFIGS]
        lines += [
            "",
            f"Achieved MACs ratios: {min(achieved):.2f}-{max(achieved):.2f} (uniform pruning undershoots the "
            "target most: rounding to 8 channels leaves narrow layers few choices).",
            "",
        ]
    write_report("compression_only", rows, lines, entries=entries, macs=targets)


if __name__ == "__main__":
    sys.exit(main())
