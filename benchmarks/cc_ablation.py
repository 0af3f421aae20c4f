"""The C&C (reconstructed) ablation asked for by docs/defenses.md: which normalisation (sigma/sigma_1
or z-score), clip or remove, purification alone (H-A), truncation alone (H-B), both, and with the
optional data-free recovery.

    python -m benchmarks.cc_ablation                     # CIFAR-10 BadNets, Blended, WaNet zoo models
    python -m benchmarks.cc_ablation --entries cifar10-badnets

Writes results/cc_ablation.json and results/cc_ablation.md. The winner (frozen as CleanCompact's
default) is the variant with the best mean *validation* DER (training-split images; see common.py)
among those that at least halve the MACs; test numbers are reported next to it, never used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ZOO, load_entry, read_json, score_pair, store_result
from ccpurify.atomic import write_text
from ccpurify.passes import CleanCompact, PurifyContext
from ccpurify.provenance import git_commit, now

VARIANTS: dict[str, dict] = {
    # H-A: purification only (no truncation)
    "A max clip 0.9": dict(normalization="max", purify="clip", tau=0.9, macs=None),
    "A max clip 0.7": dict(normalization="max", purify="clip", tau=0.7, macs=None),
    "A max remove 0.9": dict(normalization="max", purify="remove", tau=0.9, macs=None),
    "A z clip 2": dict(normalization="zscore", purify="clip", tau=2.0, macs=None),
    "A z clip 2.5": dict(normalization="zscore", purify="clip", tau=2.5, macs=None),
    "A z clip 3": dict(normalization="zscore", purify="clip", tau=3.0, macs=None),
    "A z remove 2.5": dict(normalization="zscore", purify="remove", tau=2.5, macs=None),
    "A z clip 2.5 no-fold": dict(normalization="zscore", purify="clip", tau=2.5, macs=None, fold_bn=False),
    # H-B: truncation only
    "B trunc 0.5 uniform": dict(purify="none", macs=0.5, allocation="uniform"),
    "B trunc 0.5 energy": dict(purify="none", macs=0.5, allocation="energy"),
    # both
    "AB z clip 2.5 + 0.5 uniform": dict(normalization="zscore", purify="clip", tau=2.5, macs=0.5, allocation="uniform"),
    "AB z clip 2 + 0.5 uniform": dict(normalization="zscore", purify="clip", tau=2.0, macs=0.5, allocation="uniform"),
    "AB z clip 2.5 + 0.5 energy": dict(normalization="zscore", purify="clip", tau=2.5, macs=0.5, allocation="energy"),
    "AB z clip 2 + 0.5 energy": dict(normalization="zscore", purify="clip", tau=2.0, macs=0.5, allocation="energy"),
    "AB z clip 1.75 + 0.5 energy": dict(normalization="zscore", purify="clip", tau=1.75, macs=0.5, allocation="energy"),
    # ... + data-free recovery (synthetic BN-statistics images, teacher = purified full rank)
    "AB z clip 1.75 + 0.5 energy + recover": dict(
        normalization="zscore", purify="clip", tau=1.75, macs=0.5, allocation="energy", recover=True
    ),
    "B trunc 0.5 energy + recover": dict(purify="none", macs=0.5, allocation="energy", recover=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=str(ZOO))
    parser.add_argument("--entries", nargs="*", default=["cifar10-badnets", "cifar10-blended", "cifar10-wanet"])
    parser.add_argument("--variants", nargs="*", default=None, help="variant names (default: all)")
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    out_file = RESULTS / "cc_ablation.json"
    results = read_json(out_file, {})
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or k in args.variants}
    for name in args.entries:
        entry = load_entry(name, Path(args.zoo), args.data)
        context = PurifyContext(example_inputs=entry.example_inputs, num_classes=entry.test.spec.num_classes)
        for variant, options in variants.items():
            key = f"{name}|{variant}"
            if key in results and results[key]["options"] == options:
                continue
            started = time.perf_counter()
            out, report = CleanCompact(**options)(entry.model, context)
            wall = time.perf_counter() - started
            row = {
                "entry": name,
                "variant": variant,
                "options": options,
                "wall_time_s": wall,
                "macs_ratio": report.macs_ratio,
                "params_ratio": report.params_ratio,
                **score_pair(entry, entry.model, out),
            }
            results = store_result(out_file, {}, None, key, row)
            t, v = row["test"], row["val"]
            print(
                f"{name} | {variant}: val CA {v['ca']:.3f} ASR {v['asr']:.3f} DER {v['der']:.3f} | "
                f"test CA {t['ca']:.3f} ASR {t['asr']:.3f} | MACs x{report.macs_ratio:.2f} ({wall:.1f} s)",
                flush=True,
            )
    write_table(results)
    return 0


def write_table(results: dict) -> None:
    entries = sorted({r["entry"] for r in results.values()})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results.values())]
    lines = [
        "# C&C (reconstructed) ablation",
        "",
        "Cells: validation DER / test CA / test ASR (%). Validation = training-split images no pass sees; the "
        "winner is chosen on it alone.",
        "",
        "| variant | MACs | " + " | ".join(entries) + " | mean val DER | mean test DER |",
        "|---|---|" + "---|" * (len(entries) + 2),
    ]
    scored = {}
    for v in variants:
        rows = [results.get(f"{e}|{v}") for e in entries]
        cells = [
            ""
            if r is None
            else f"{100 * r['val']['der']:.1f} / {100 * r['test']['ca']:.1f} / {100 * r['test']['asr']:.1f}"
            for r in rows
        ]
        done = [r for r in rows if r is not None]
        val = float(np.mean([r["val"]["der"] for r in done]))
        test = float(np.mean([r["test"]["der"] for r in done]))
        macs = float(np.mean([r["macs_ratio"] for r in done]))
        scored[v] = (val, macs)
        lines.append(f"| {v} | {macs:.2f} | " + " | ".join(cells) + f" | {100 * val:.1f} | {100 * test:.1f} |")
    compact = {v: s for v, s in scored.items() if s[1] <= 0.51}
    winner = max(compact, key=lambda v: compact[v][0]) if compact else None
    lines += [
        "",
        f"Winner among variants with MACs <= 0.5 (by mean validation DER): **{winner}** ({VARIANTS.get(winner)}).",
        "",
        f"Generated {now()} at commit `{(git_commit() or 'unknown')[:10]}` by `python -m benchmarks.cc_ablation`.",
    ]
    write_text(RESULTS / "cc_ablation.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
