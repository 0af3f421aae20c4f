"""Wall time of the data-free passes on PreAct-ResNet18 at width 1 (the paper's size) and at the
cpu-preset width: CLP (compress and faithful), C&C without recovery, and OTBR with the time of its
20 noise-unlearning steps separated from everything around them.

    python -m benchmarks.datafree_timing [--widths 1 0.25] [--threads 2]

Timing does not depend on the weights' values, so the models are seeded random initialisations
(BatchNorm statistics perturbed so that CLP and C&C see non-trivial spectra). Writes
results/datafree_timing.json and .md. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import write_report
from ccpurify import models
from ccpurify.passes import CLP, OTBR, CleanCompact, Pass, PurifyContext
from ccpurify.provenance import versions


def make_model(width: float, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.create("preact_resnet18", num_classes=10, width=width)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def time_pass(p: Pass, width: float) -> dict:
    model = make_model(width)
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 32, 32), num_classes=10, seed=0)
    started = time.perf_counter()
    _, report = p(model, context)
    return {
        "wall_time_s": time.perf_counter() - started,
        "details": {k: v for k, v in report.details.to_dict().items() if k in ("unlearn_s", "fusion_s", "ranking_s")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.25])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    passes = {
        "CLP (compress)": CLP,
        "CLP (faithful)": lambda: CLP(mode="faithful"),
        "C&C (no recovery)": lambda: CleanCompact(recover=False),
        "OTBR": OTBR,
    }
    rows = []
    for width in args.widths:
        for name, build in passes.items():
            result = time_pass(build(), width)
            rows.append({"pass": name, "width": width, **result})
            print(f"width {width}: {name} {result['wall_time_s']:.2f} s {result['details']}", flush=True)
    lines = [
        "# Data-free pass wall time (PreAct-ResNet18, CIFAR-10 input)",
        "",
        f"torch threads: {args.threads}.",
        "",
        "| pass | width | wall time (s) | of which |",
        "|---|---|---|---|",
    ]
    for r in rows:
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in r["details"].items())
        lines.append(f"| {r['pass']} | {r['width']:g} | {r['wall_time_s']:.2f} | {parts} |")
    write_report("datafree_timing", rows, lines, threads=args.threads, versions=versions())
    return 0


if __name__ == "__main__":
    sys.exit(main())
