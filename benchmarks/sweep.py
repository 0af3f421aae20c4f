"""Sweep one parameter of one pass over zoo models, to choose a default without the test split.

    python -m benchmarks.sweep --pass otbr --param ratio --values 0.01 0.05 0.1 0.15 0.2
    python -m benchmarks.sweep --pass clp --param u --values 2 2.5 3 --entries cifar10-badnets

For every value: validation metrics (training-split images; the basis of any choice), test metrics
(reported only), MACs, wall time, and a data-free statistic: the mean prediction entropy of the
defended model on uniform-noise images (a backdoored model tends to send noise to its target class).
Writes results/sweep-<pass>-<param>.json and .md; the suggested default is the value with the best
mean validation DER.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, ZOO, context_for, load_entry, read_json, score_pair, store_result
from benchmarks.grid import CELLS
from ccpurify import passes
from ccpurify.atomic import write_text
from ccpurify.data import get_spec
from ccpurify.provenance import git_commit, now
from ccpurify.train import open_run


@torch.no_grad()
def noise_entropy(model: torch.nn.Module, shape: tuple[int, ...], count: int = 512, seed: int = 0) -> float:
    """Mean prediction entropy (nats) on uniform noise in [0, 1), the input OTBR unlearns on."""
    x = torch.rand(count, *shape, generator=torch.Generator().manual_seed(seed))
    p = model.eval()(x).softmax(1)
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pass", dest="pass_name", required=True)
    parser.add_argument("--param", required=True)
    parser.add_argument("--values", nargs="+", required=True, help="values (parsed as JSON when possible)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed options of the pass")
    parser.add_argument("--entries", nargs="*", default=["cifar10-badnets", "cifar10-blended", "cifar10-wanet"])
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the Markdown from the stored results, run nothing"
    )
    parser.add_argument(
        "--defender-data",
        choices=["none", "clean", "unlabeled", "unlabeled_ood"],
        default=None,
        help="what the defender holds (default: the data of the grid cell named after the pass: clean for rnp, unlabeled for bcu)",
    )
    parser.add_argument("--zoo", default=str(ZOO))
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)

    def parse(v: str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    fixed = {k: parse(v) for k, _, v in (s.partition("=") for s in args.set)}
    values = [parse(v) for v in args.values]
    out_file = RESULTS / f"sweep-{args.pass_name}-{args.param}.json"
    results = read_json(out_file, {})
    for name in [] if args.report_only else args.entries:
        entry = load_entry(name, Path(args.zoo), args.data)
        context = context_for(
            entry, args.defender_data or (CELLS[args.pass_name].data if args.pass_name in CELLS else "none")
        )
        for value in values:
            key = f"{name}|{json.dumps(fixed, sort_keys=True)}|{value}"
            if key in results:
                continue
            started = time.perf_counter()
            out, report = passes.create(args.pass_name, **fixed, **{args.param: value})(entry.model, context)
            wall = time.perf_counter() - started
            results[key] = {
                "entry": name,
                "value": value,
                "fixed": fixed,
                "wall_time_s": wall,
                "macs_ratio": report.macs_ratio,
                "noise_entropy": noise_entropy(out, tuple(entry.example_inputs.shape[1:])),
                "noise_entropy_before": noise_entropy(entry.model, tuple(entry.example_inputs.shape[1:])),
                **score_pair(entry, entry.model, out),
            }
            results = store_result(out_file, {}, None, key, results[key])  # locked: sweeps may run side by side
            r = results[key]
            print(
                f"{name} {args.param}={value}: val DER {r['val']['der']:.3f} (CA {r['val']['ca']:.3f} ASR {r['val']['asr']:.3f}) "
                f"test CA {r['test']['ca']:.3f} ASR {r['test']['asr']:.3f} entropy {r['noise_entropy']:.2f} ({wall:.0f} s)",
                flush=True,
            )
    rows = [r for r in results.values() if r["fixed"] == fixed]
    entries = sorted({r["entry"] for r in rows})
    lines = [
        f"# Sweep: `{args.pass_name}` {args.param} (fixed: {fixed or 'defaults'})",
        "",
        "Cells: validation DER / test CA / test ASR (%); H = mean prediction entropy on uniform noise "
        f"(nats, max {math.log(get_spec(open_run(Path(args.zoo) / entries[0]).config.dataset).num_classes):.2f}).",
        "",
        f"| {args.param} | " + " | ".join(entries) + " | mean val DER | mean test DER | mean H | MACs |",
        "|---|" + "---|" * (len(entries) + 4),
    ]
    best, best_val = None, -1.0
    for value in values:
        cells = [next((r for r in rows if r["entry"] == e and r["value"] == value), None) for e in entries]
        done = [c for c in cells if c is not None]
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
                for c in cells
            )
            + f" | {100 * val:.1f} | {100 * np.mean([c['test']['der'] for c in done]):.1f} | "
            f"{np.mean([c['noise_entropy'] for c in done]):.2f} | {np.mean([c['macs_ratio'] for c in done]):.2f} |"
        )
    lines += [
        "",
        f"Best mean validation DER: {args.param} = **{best}**. Generated {now()} at commit "
        f"`{(git_commit() or 'unknown')[:10]}` by `python -m benchmarks.sweep --pass {args.pass_name} --param {args.param} ...`.",
    ]
    suffix = "" if not fixed else "-" + "-".join(f"{k}{v}" for k, v in sorted(fixed.items()))
    write_text(RESULTS / f"sweep-{args.pass_name}-{args.param}{suffix}.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
