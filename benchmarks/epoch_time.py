"""Seconds per CIFAR-10 training epoch for each zoo architecture at a given width, on this machine.

    python -m benchmarks.epoch_time --archs preact_resnet18 mobilenet_v2 --widths 0.25 --steps 30

Times ``--steps`` SGD steps (batch 128, 32x32 inputs, channels-last as the ``cpu`` preset trains)
after ``--warmup`` steps and extrapolates to one epoch of 50,000 images (391 steps). The zoo's
measured epoch times (``benchmarks/zoo/*/manifest.json``) are the ground truth for the preset; this
script answers "what would another architecture or width cost" in a minute. Writes
results/epoch_time.json and .md. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

from benchmarks.common import write_report
from ccpurify import models
from ccpurify.cost import model_cost

STEPS_PER_EPOCH = math.ceil(50_000 / 128)


def seconds_per_step(model: nn.Module, steps: int, warmup: int, batch: int = 128) -> float:
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g)
    for i in range(warmup + steps):
        if i == warmup:
            started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=models.list_models())
    parser.add_argument("--widths", nargs="+", type=float, default=[0.25])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for arch in args.archs:
        for width in args.widths:
            model = models.create(arch, num_classes=10, width=width)
            cost = model_cost(model, torch.zeros(1, 3, 32, 32))
            step = seconds_per_step(model, args.steps, args.warmup)
            rows.append(
                {
                    "arch": arch,
                    "width": width,
                    "params": cost.params,
                    "macs": cost.macs,
                    "s_per_step": step,
                    "s_per_epoch": step * STEPS_PER_EPOCH,
                }
            )
            print(f"{arch} x{width:g}: {step * 1000:.0f} ms/step, ~{step * STEPS_PER_EPOCH:.0f} s/epoch", flush=True)
    lines = [
        "# Training cost per CIFAR-10 epoch (batch 128, channels-last)",
        "",
        f"{args.threads} torch threads, {args.steps} timed steps extrapolated to {STEPS_PER_EPOCH} steps.",
        "",
        "| model (width) | params | MACs | ms / step | s / epoch |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['arch']} ({r['width']:g}) | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.1f} M | "
        f"{1000 * r['s_per_step']:.0f} | {r['s_per_epoch']:.0f} |"
        for r in rows
    ]
    write_report("epoch_time", rows, lines, threads=args.threads, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
