"""Wall time of the passes that use defender data, on a cpu-preset zoo model: RNP (500 labelled
images; reference threshold and the ranked variant) and BCU (5,000 unlabelled images, 20 epochs;
plain and with a 50%-MACs pruned student).

    python -m benchmarks.data_timing [--entry cifar10-badnets] [--threads 2] [--passes rnp bcu]

Each timed pass is a cell of the benchmark grid (``benchmarks/grid.py``), run with the same
defender data; the compact BCU is ``pipeline:bcu-compact`` (its student pruned to 50% MACs with
channel counts rounded to 8).

Unlike the data-free passes, RNP's unlearning stops on the data's accuracy, so a real backdoored
model and its defender data are used. Epoch scaling: RNP runs the reference schedule (at most 20
unlearning and 20 recovery epochs on 500 images: seconds); BCU runs 20 epochs at batch 128 instead
of the reference's 100 at batch 256 (``BCU.reference()`` restores them), which keeps one pass under
10 minutes on 2 cores. Writes results/data_timing.json and .md. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import ZOO, context_for, load_entry, write_report
from benchmarks.grid import CELLS, as_pipeline
from ccpurify.provenance import versions

DATA_CELLS = [name for name, cell in CELLS.items() if cell.data != "none"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", default="cifar10-badnets")
    parser.add_argument(
        "--passes",
        nargs="+",
        default=["rnp", "rnp-ranked", "bcu", "pipeline:bcu-compact"],
        choices=DATA_CELLS,
        help="grid cells (benchmarks/grid.py) to time",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--zoo", default=str(ZOO))
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    entry = load_entry(args.entry, Path(args.zoo), args.data)
    rows = []
    for name in args.passes:
        kind = CELLS[name].data
        context = context_for(entry, kind)
        images = len(context.clean_data if kind == "clean" else context.unlabeled_data)
        pipeline = as_pipeline(CELLS[name].build())
        started = time.perf_counter()
        pipeline(entry.model, context)
        wall = time.perf_counter() - started
        rows.append({"pass": name, "data": kind, "images": images, "wall_time_s": wall})
        print(f"{name}: {wall:.1f} s on {images} {kind} images", flush=True)
    lines = [
        f"# Wall time of the data-using passes ({args.entry}, PreAct-ResNet18 x0.25)",
        "",
        f"torch threads: {args.threads}.",
        "",
        "| pass | data | images | wall time (s) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['pass']} | {r['data']} | {r['images']:,} | {r['wall_time_s']:.1f} |" for r in rows]
    write_report("data_timing", rows, lines, entry=args.entry, threads=args.threads, versions=versions())
    return 0


if __name__ == "__main__":
    sys.exit(main())
