"""MACs ratio against measured onnxruntime latency ratio for the compression core (issue: compression
core and deployment): PreAct-ResNet18 at the cpu-preset width, pruned to 50% MACs (free widths, and
widths rounded to multiples of 8) and factorized to 50% MACs (free and rounded ranks), fp32 and INT8, at batch 1 / 1 thread and batch 32 / 2 threads; and how long building the
channel graph takes.

    python -m benchmarks.compression_latency [--model benchmarks/zoo/cifar10-badnets] [--runs 200]

Writes results/compression_latency.json and .md. Run it on an otherwise idle machine: every model is
timed interleaved with the dense one in the same run, but absolute times still depend on load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, ZOO
from ccpurify import models
from ccpurify.atomic import write_json, write_text
from ccpurify.graph import ChannelGraph
from ccpurify.io import load_model
from ccpurify.passes import Factorize, Prune
from ccpurify.provenance import git_commit, machine, now, versions
from exporters.latency import BenchConfig, benchmark
from exporters.onnx import export
from exporters.quantize import quantize_int8


def graph_build_seconds(model: torch.nn.Module, example: torch.Tensor, repeats: int = 7) -> dict:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        ChannelGraph(model, example)
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=str(ZOO / "cifar10-badnets" / "model.safetensors"),
        help="a model file (default: the zoo's CIFAR-10 BadNets model; a fresh width-0.25 model if absent)",
    )
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    path = Path(args.model)
    model = load_model(path) if path.is_file() else models.create("preact_resnet18", width=0.25).eval()
    example = torch.zeros(1, 3, 32, 32)
    variants = {
        "dense": model,
        "pruned-50%": Prune(macs=0.5)(model)[0],
        "pruned-50% round_to=8": Prune(macs=0.5, round_to=8)(model)[0],
        "factorized-50%": Factorize(macs=0.5)(model)[0],
        "factorized-50% round_to=8": Factorize(macs=0.5, round_to=8)(model)[0],
    }
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = {}
        for name, m in variants.items():
            onnx[name] = export(m, Path(tmp) / f"{name}.onnx", example).path
            onnx[f"{name} int8"] = quantize_int8(onnx[name], Path(tmp) / f"{name}.int8.onnx", calibration).path
        small = benchmark(
            onnx, BenchConfig(batch_sizes=(1,), threads=(1,), runs=args.runs, rounds=4, torch_eager=False)
        )
        large = benchmark(
            onnx,
            BenchConfig(batch_sizes=(32,), threads=(2,), runs=max(50, args.runs // 4), rounds=2, torch_eager=False),
        )
    build = graph_build_seconds(model, example)
    rows = []
    for r_small in small.ratios():
        r_large = next(r for r in large.ratios() if r["model"] == r_small["model"])
        rows.append(
            {
                "model": r_small["model"],
                "macs_ratio": r_small["macs_ratio"],
                "params_ratio": r_small["params_ratio"],
                "latency_ratio_bs1_t1": r_small["latency_ratio"],
                "latency_ratio_bs32_t2": r_large["latency_ratio"],
                "size_ratio": r_small["size_ratio"],
            }
        )
    dense_ms = {
        "bs1_t1": small.timing("dense", "onnxruntime", 1, 1).median_ms,
        "bs32_t2": large.timing("dense", "onnxruntime", 32, 2).median_ms,
    }
    result = {
        "created": now(),
        "git_commit": git_commit(),
        "versions": versions(),
        "machine": machine(),
        "model": str(path),
        "dense_ms": dense_ms,
        "ratios": rows,
        "graph_build": build,
        "small": small.to_dict(),
        "large": large.to_dict(),
    }
    write_json(RESULTS / "compression_latency.json", result)
    lines = [
        "# Compression core: MACs ratio against onnxruntime latency ratio",
        "",
        f"PreAct-ResNet18 x0.25 (`{path.name}`), dense: {dense_ms['bs1_t1']:.3f} ms at batch 1 / 1 thread, "
        f"{dense_ms['bs32_t2']:.2f} ms at batch 32 / 2 threads. Ratios against the dense fp32 model, measured "
        "interleaved in one run (graph optimisation all, spinning off).",
        "",
        "| model | MACs ratio | params ratio | latency b1/t1 | latency b32/t2 | ONNX size ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['macs_ratio']:.3f} | {r['params_ratio']:.3f} | {r['latency_ratio_bs1_t1']:.3f} | "
            f"{r['latency_ratio_bs32_t2']:.3f} | {r['size_ratio']:.3f} |"
        )
    lines += [
        "",
        f"Channel graph build (torch-pruning DependencyGraph + coupling analysis) on this model: median "
        f"{1000 * build['median_s']:.0f} ms over {build['repeats']} builds (min {1000 * build['min_s']:.0f}, "
        f"max {1000 * build['max_s']:.0f} ms).",
        "",
        f"Machine: {machine()['cpu']}; `python -m benchmarks.compression_latency`, "
        f"commit `{(git_commit() or 'unknown')[:10]}`.",
    ]
    write_text(RESULTS / "compression_latency.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
