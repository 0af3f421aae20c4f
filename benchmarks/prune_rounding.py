"""What channel rounding buys at the same MACs: ``Prune(round_to=...)`` inside the data-free pipeline.

    python -m benchmarks.prune_rounding --entries cifar10-badnets --round-to none 8 16

For each setting, CLP(u=2.25) -> OTBR -> Prune(50% MACs, round_to) -> Recover runs on the zoo model;
validation DER decides (test CA/ASR reported), and the pruned models are timed in onnxruntime
interleaved with the dense one (batch 1 and 32, 1 and 2 threads). Odd channel counts leave
onnxruntime's CPU kernels under-used, so an unrounded 50%-MACs model can be barely faster (or, at
batch 32, slower) than the dense one. Writes results/prune_rounding.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.common import CACHE, ZOO, load_entry, score_pair, write_report
from ccpurify.passes import CLP, OTBR, Pipeline, Prune, PurifyContext, Recover
from ccpurify.passes.defaults import CLP_U
from exporters.latency import BenchConfig, benchmark
from exporters.onnx import export

SHAPES = [(1, 1), (1, 2), (32, 1), (32, 2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=["cifar10-badnets"])
    parser.add_argument("--round-to", nargs="+", default=["none", "8", "16"])
    parser.add_argument("--zoo", default=str(ZOO))
    parser.add_argument("--data", default=None)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args(argv)
    settings = [None if r == "none" else int(r) for r in args.round_to]
    rows = []
    for name in args.entries:
        entry = load_entry(name, Path(args.zoo), args.data)
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            paths = {"dense": export(entry.model, Path(tmp) / "dense.onnx", entry.example_inputs).path}
            found = {}
            for r in settings:
                context = PurifyContext(
                    example_inputs=entry.example_inputs, num_classes=entry.test.spec.num_classes, seed=0
                )
                pipeline = Pipeline([CLP(u=CLP_U), OTBR(), Prune(macs=0.5, round_to=r), Recover(data="synthetic")])
                out, report = pipeline(entry.model, context)
                s = score_pair(entry, entry.model, out)
                key = f"round_to={r}"
                paths[key] = export(out, Path(tmp) / f"r{r}.onnx", entry.example_inputs).path
                found[key] = {
                    "entry": name,
                    "round_to": r,
                    "macs_ratio": report.macs_after / report.macs_before,
                    "test": s["test"],
                    "val": s["val"],
                }
                print(
                    f"{name} {key}: val DER {s['val']['der']:.3f} test CA {s['test']['ca']:.3f} ASR {s['test']['asr']:.3f}",
                    flush=True,
                )
            timing = benchmark(
                paths, BenchConfig(batch_sizes=(1, 32), threads=(1, 2), runs=args.runs, rounds=3, torch_eager=False)
            )
            for key, row in found.items():
                row["latency_ratio"] = {f"b{b}_t{t}": timing.ratio(key, "dense", batch=b, threads=t) for b, t in SHAPES}
                rows.append(row)
    lines = [
        "# Channel rounding in the data-free pipeline (same 50% MACs target)",
        "",
        "CLP(u=2.25) -> OTBR -> Prune(macs=0.5, round_to) -> Recover(synthetic). Latency: onnxruntime, ratio to the "
        "dense model, measured interleaved in one run.",
        "",
        "| entry | round_to | MACs | val DER | test CA | test ASR | "
        + " | ".join(f"latency b{b}/t{t}" for b, t in SHAPES)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(SHAPES),
    ]
    for r in rows:
        lat = " | ".join(f"{r['latency_ratio'][f'b{b}_t{t}']:.2f}" for b, t in SHAPES)
        lines.append(
            f"| {r['entry']} | {r['round_to'] or '-'} | {r['macs_ratio']:.2f} | {100 * r['val']['der']:.1f} | "
            f"{100 * r['test']['ca']:.1f} | {100 * r['test']['asr']:.1f} | {lat} |"
        )
    write_report("prune_rounding", rows, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
