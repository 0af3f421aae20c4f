"""Sweep one parameter of one pass over zoo models, to choose a default without the test split.

    python -m benchmarks.sweep --pass otbr --param ratio --values 0.01 0.05 0.1 0.15 0.2
    python -m benchmarks.sweep --pass clp --param u --values 2 2.5 3 --entries cifar10-badnets

Each value is a grid cell (``benchmarks.grid.sweep_cell``: ``sweep:otbr:ratio=0.05``), run and
stored in ``results/grid.json`` by the grid's own harness, without latency. For every value:
validation metrics (training-split images; the basis of any choice), test metrics (reported only),
MACs, wall time, and a data-free statistic, the mean prediction entropy of the defended model on
uniform-noise images. Writes results/sweep-<pass>-<param>.md; the suggested value is the one with
the best mean validation DER. (Sweeps run before the grid held them are in results/sweep-*.json.)
"""

from __future__ import annotations

import argparse
import math
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ZOO, read_json
from benchmarks.grid import EMPTY_GRID, json_or_text, run, sweep_cell
from ccpurify.atomic import write_text
from ccpurify.data import get_spec
from ccpurify.provenance import git_commit, now
from ccpurify.train import open_run


def table(pass_name: str, param: str, values: list, fixed: dict, entries: list[str], cells: dict, zoo: Path) -> str:
    """The sweep's Markdown: one row per value, one column per entry (validation DER / test CA / test ASR)."""
    classes = get_spec(open_run(zoo / entries[0]).config.dataset).num_classes
    lines = [
        f"# Sweep: `{pass_name}` {param} (fixed: {fixed or 'defaults'})",
        "",
        "Cells: validation DER / test CA / test ASR (%); H = mean prediction entropy on uniform noise "
        f"(nats, max {math.log(classes):.2f}).",
        "",
        f"| {param} | " + " | ".join(entries) + " | mean val DER | mean test DER | mean H | MACs |",
        "|---|" + "---|" * (len(entries) + 4),
    ]
    best, best_val = None, -1.0
    for value in values:
        name = sweep_cell(pass_name, {**fixed, param: value})
        row = [cells.get(f"{e}|{name}") for e in entries]
        done = [c for c in row if c is not None]
        if not done:
            continue
        val = float(np.mean([c["val"]["der"] for c in done]))
        if val > best_val:
            best, best_val = value, val
        lines.append(
            f"| {value} | "
            + " | ".join(
                ""
                if c is None
                else f"{100 * c['val']['der']:.1f} / {100 * c['test']['ca']:.1f} / {100 * c['test']['asr']:.1f}"
                for c in row
            )
            + f" | {100 * val:.1f} | {100 * np.mean([c['test']['der'] for c in done]):.1f} | "
            f"{np.mean([c['noise_entropy'] for c in done]):.2f} | {np.mean([c['macs_ratio'] for c in done]):.2f} |"
        )
    lines += [
        "",
        f"Best mean validation DER: {param} = **{best}**. Generated {now()} at commit "
        f"`{(git_commit() or 'unknown')[:10]}` by `python -m benchmarks.sweep --pass {pass_name} --param {param} ...`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pass", dest="pass_name", required=True, help="the pass to sweep, by name (e.g. otbr)")
    parser.add_argument("--param", required=True, help="the option of the pass that varies (e.g. ratio)")
    parser.add_argument("--values", nargs="+", required=True, help="values (parsed as JSON when possible)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed options of the pass")
    parser.add_argument(
        "--entries",
        nargs="+",
        default=["cifar10-badnets", "cifar10-blended", "cifar10-wanet"],
        help="zoo entries to sweep on (default: the three the defaults are chosen on)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the Markdown from the stored results, run nothing"
    )
    parser.add_argument("--zoo", default=str(ZOO), help="zoo folder (default: benchmarks/zoo)")
    parser.add_argument("--data", default=None, help="dataset location (default: $CCPURIFY_DATA, then ../shared/data)")
    args = parser.parse_args(argv)
    if bad := [s for s in args.set if "=" not in s]:
        parser.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
    fixed = {k: json_or_text(v) for k, _, v in (s.partition("=") for s in args.set)}
    values = [json_or_text(v) for v in args.values]
    names = [sweep_cell(args.pass_name, {**fixed, args.param: v}) for v in values]
    grid = read_json(RESULTS / "grid.json", EMPTY_GRID)
    if not args.report_only:
        cells = [f"{e}:{n}" for e in args.entries for n in names]
        grid = run(
            Namespace(
                zoo=args.zoo, entries=None, defenses=None, cell=cells, redo=False, no_latency=True, data=args.data
            ),
            tables=False,
        )
    suffix = "" if not fixed else "-" + "-".join(f"{k}{v}" for k, v in sorted(fixed.items()))
    text = table(args.pass_name, args.param, values, fixed, args.entries, grid["cells"], Path(args.zoo))
    write_text(RESULTS / f"sweep-{args.pass_name}-{args.param}{suffix}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
