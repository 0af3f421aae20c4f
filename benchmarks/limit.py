"""The limit row: what the same compression reaches with *all* the labelled data (issue 14, item 4).

    python -m benchmarks.limit                                       # selection models + clean, 0.75 and 0.5 MACs
    python -m benchmarks.limit --entries cifar10-clean --macs 0.75 --epochs 3
    python -m benchmarks.limit --tables-only

For each zoo model and MACs target, the suspect model is pruned as the data-free default prunes it
(``Prune(global_pruning=True, round_to=8, compensate=True)``), then fine-tuned with cross-entropy
on every clean training image with its true label (the training split minus the validation images,
which score the defaults), for ``--epochs`` epochs: SGD, momentum 0.9, weight decay 5e-4, cosine
schedule from lr 0.01, random crop and flip. No defense runs: fine-tuning on clean data is itself
a (weak) defense, so the ASR column says how much of the backdoor survives it. The row is a bound
on accuracy, not a defense to compare on ASR. Scored on the test split. Results accumulate in
results/limit_cells.json (resumable); the report is results/limit.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.common import RESULTS, ZOO, context_for, load_entry, read_json, store_result, write_report
from ccpurify.data import get_spec, load_dataset
from ccpurify.data.transforms import Augment, Normalize, to_float
from ccpurify.passes import Prune
from ccpurify.progress import TqdmProgress, report

ENTRIES = ("cifar10-badnets", "cifar10-blended", "cifar10-wanet", "cifar10-clean")
STORE = RESULTS / "limit_cells.json"


def clean_training_images(entry) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training image with its true label, except the validation images (model-ready floats)."""
    run = entry.run
    spec = get_spec(run.config.dataset)
    train = load_dataset(run.config.dataset, "train", entry.data_dir)
    validation = np.setdiff1d(np.asarray(run.defender.clean_subset), np.asarray(run.defender.rnp_subset))
    keep = np.setdiff1d(np.arange(len(train.labels)), validation)
    x = Normalize(spec.mean, spec.std)(to_float(torch.from_numpy(np.ascontiguousarray(train.images[keep]))))
    return x, torch.from_numpy(train.labels[keep]).long()


def fine_tune(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0, progress=None
) -> None:
    gen = torch.Generator().manual_seed(seed)
    augment = Augment(crop_padding=4, hflip=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batch, steps = 128, math.ceil(len(x) / 128)
    total = epochs * steps
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps):
            for g in opt.param_groups:
                g["lr"] = 0.01 * 0.5 * (1 + math.cos(math.pi * (epoch * steps + i) / total))
            idx = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report(progress, f"fine-tune epoch {epoch + 1}/{epochs}", i + 1, steps, loss=float(loss))
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=list(ENTRIES))
    parser.add_argument("--macs", nargs="+", type=float, default=[0.75, 0.5])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--zoo", default=str(ZOO))
    parser.add_argument("--data", default=None)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.tables_only:
        for name in args.entries:
            entry = load_entry(name, Path(args.zoo), args.data)
            x = y = None
            for target in args.macs:
                key = f"{name}|{target:g}|{args.epochs}"
                if key in read_json(STORE, {"cells": {}})["cells"]:
                    continue
                if x is None:
                    x, y = clean_training_images(entry)
                started = time.perf_counter()
                pruned, rep = Prune(macs=target, round_to=8, global_pruning=True, compensate=True)(
                    entry.model, context_for(entry, "none")
                )
                progress = TqdmProgress(leave=False)
                try:
                    fine_tune(pruned, x, y, args.epochs, progress=progress)
                finally:
                    progress.close()
                before, after = entry.test.score(entry.model).metrics, entry.test.score(pruned).metrics
                cell = {
                    "ca_before": before.ca,
                    "asr_before": before.asr,
                    "ca": after.ca,
                    "asr": after.asr,
                    "macs_ratio": rep.macs_after / rep.macs_before,
                    "images": len(x),
                    "epochs": args.epochs,
                    "seconds": time.perf_counter() - started,
                }
                store_result(STORE, {"cells": {}}, "cells", key, cell)
                print(
                    f"{key}: test CA {100 * before.ca:.1f} -> {100 * after.ca:.1f} (x{cell['macs_ratio']:.2f} MACs, "
                    f"{cell['seconds']:.0f} s)",
                    flush=True,
                )
    write_tables(read_json(STORE, {"cells": {}})["cells"])
    return 0


def write_tables(cells: dict) -> None:
    lines = [
        "# The limit: the default's compression fine-tuned on all the labelled clean data (test CA / ASR %)",
        "",
        "| model | MACs target | MACs | epochs | images | dense CA / ASR | fine-tuned CA / ASR | CA drop |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    for key, c in sorted(cells.items()):
        name, target, _ = key.split("|")
        lines.append(
            f"| {name} | {target} | {c['macs_ratio']:.2f} | {c['epochs']} | {c['images']:,} | {pct(c['ca_before'])} / "
            f"{pct(c['asr_before'])} | {pct(c['ca'])} / {pct(c['asr'])} | {pct(c['ca_before'] - c['ca'])} |"
        )
    write_report("limit", [{"cell": k, **v} for k, v in sorted(cells.items())], lines)


if __name__ == "__main__":
    sys.exit(main())
