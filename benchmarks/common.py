"""Shared benchmark plumbing: zoo entries, validation sets from training data, scoring, latency.

Two kinds of numbers are kept apart everywhere:
- **test**: CA on the whole clean test split, ASR/RA on its triggered non-target images. Reported.
- **val**: the same metrics on *training-split* images the defenses never see: the run's clean
  defender subset minus RNP's part (CA), and those images' non-target members with the trigger
  (ASR). Used to choose defaults and ablation winners, so no choice ever looks at the test split.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ccpurify import defender
from ccpurify.atomic import write_json, write_text
from ccpurify.data import Normalize, get_spec, load_dataset, locate
from ccpurify.evaluation import TestBench
from ccpurify.metrics import der
from ccpurify.passes import PurifyContext
from ccpurify.provenance import git_commit, machine, now
from ccpurify.train import RunDir, open_run
from exporters.latency import BenchConfig, benchmark
from exporters.onnx import export
from exporters.quantize import quantize_int8

HERE = Path(__file__).resolve().parent
ZOO = HERE / "zoo"
RESULTS = HERE / "results"
CACHE = HERE / ".cache"


def zoo_entries(zoo: Path = ZOO) -> list[str]:
    return sorted(p.name for p in zoo.iterdir() if (p / "manifest.json").is_file()) if zoo.is_dir() else []


@dataclass
class Entry:
    """One zoo model with everything needed to defend and score it."""

    name: str
    run: RunDir
    model: nn.Module
    test: TestBench
    val: TestBench
    data_dir: str | None

    @property
    def dataset(self) -> str:
        return self.run.config.dataset

    @property
    def attack(self) -> str:
        return self.run.config.attack or "clean"

    @property
    def example_inputs(self) -> torch.Tensor:
        size = get_spec(self.dataset).image_size
        return torch.zeros(1, 3, size, size)

    def clean_data(self):
        """RNP's 1% labelled subset (500 CIFAR-10 images)."""
        return defender.clean_data(self.run.path, self.dataset, rnp=True, data_dir=self.data_dir)

    def unlabeled_data(self, count: int = 5000):
        return defender.unlabeled_data(self.run.path, self.dataset, count=count, data_dir=self.data_dir)

    def ood_unlabeled_data(self, count: int = 5000):
        """Unlabelled images of the *other* dataset (GTSRB for CIFAR-10 models and vice versa)."""
        other = "gtsrb" if self.dataset == "cifar10" else "cifar10"
        return defender.unlabeled_data(locate(other, self.data_dir), self.dataset, count=count)


def load_entry(name: str, zoo: Path = ZOO, data_dir: str | None = None) -> Entry:
    run = open_run(zoo / name)
    test = TestBench.build(run.config.dataset, run.attack, data_dir, run.config.test_subset, run.config.seed)
    return Entry(name, run, run.load_model(), test, validation_bench(run, data_dir), data_dir)


def validation_bench(run: RunDir, data_dir: str | None = None) -> TestBench:
    """CA and ASR on training images no defense uses: the clean subset minus RNP's share."""
    spec = get_spec(run.config.dataset)
    train = load_dataset(run.config.dataset, "train", data_dir)
    idx = np.setdiff1d(np.asarray(run.defender.clean_subset), np.asarray(run.defender.rnp_subset))
    images, labels = train.images[idx], train.labels[idx]
    bd_images = bd_labels = None
    if run.attack is not None:
        bd_images, bd_labels = run.attack.test_set(images, labels)
    return TestBench(spec, images, labels, bd_images, bd_labels, run.attack.target if run.attack else None)


_BASELINES: dict[tuple[str, str, str], object] = {}


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the weights and buffers: equal for copies, different once any value changes (unlike
    ``id()``, which Python reuses after an object is freed)."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(
            t.detach().cpu().contiguous().numpy().tobytes()
            if t.dtype != torch.bfloat16
            else t.float().numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def score_pair(entry: Entry, before: nn.Module, after: nn.Module) -> dict:
    """Test and validation metrics of a defended model against its undefended one (whose scores
    are computed once per entry and split)."""
    out = {}
    for split, bench in (("test", entry.test), ("val", entry.val)):
        key = (entry.name, model_fingerprint(before), split)
        if key not in _BASELINES:
            _BASELINES[key] = bench.score(before).metrics
        b = _BASELINES[key]
        a = bench.score(after).metrics
        out[split] = {
            "ca_before": b.ca,
            "asr_before": b.asr,
            "ra_before": b.ra,
            "ca": a.ca,
            "asr": a.asr,
            "ra": a.ra,
            "der": der(b.ca, b.asr, a.ca, a.asr) if b.asr is not None else None,
        }
    return out


def measure_latency(entry: Entry, before: nn.Module, after: nn.Module, cache: Path = CACHE) -> dict:
    """ONNX latency ratios after/before at batch 1 / 1 thread and batch 32 / 2 threads, measured
    interleaved in one run, plus the INT8 (static QDQ) model of ``after`` at batch 1 / 1 thread."""
    cache.mkdir(parents=True, exist_ok=True)
    dense = cache / f"{entry.name}-{model_fingerprint(before)}-dense.onnx"  # a retrained entry gets a new file
    if not dense.is_file():
        export(before, dense, entry.example_inputs)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        fp32 = export(after, Path(tmp) / "after.onnx", entry.example_inputs)
        images = entry.val.normalize(torch.from_numpy(entry.val.images[:640]).permute(0, 3, 1, 2).float() / 255).numpy()
        calib, held_out = images[:128], images[128:]  # agreement is measured on images the calibration did not see
        int8 = quantize_int8(fp32.path, Path(tmp) / "after.int8.onnx", calib, eval_images=held_out)
        models = {"before": os.fspath(dense), "after": fp32.path, "after_int8": int8.path}
        small = benchmark(models, BenchConfig(batch_sizes=(1,), threads=(1,), runs=100, rounds=4, torch_eager=False))
        large = benchmark(
            {k: models[k] for k in ("before", "after")},
            BenchConfig(batch_sizes=(32,), threads=(2,), runs=50, rounds=2, warmup=3, torch_eager=False),
        )
        return {
            "onnx_bytes": fp32.file_bytes,
            "onnx_bytes_before": os.path.getsize(dense),
            "int8_bytes": int8.file_bytes,
            "int8_agreement_val": int8.agreement,
            "parity_max_abs_diff": fp32.parity_max_abs_diff,
            "latency_ratio_bs1_t1": small.ratio("after", "before", batch=1, threads=1),
            "latency_ratio_bs32_t2": large.ratio("after", "before", batch=32, threads=2),
            "int8_latency_ratio_bs1_t1": small.ratio("after_int8", "before", batch=1, threads=1),
            "latency_ms_before_bs1_t1": small.timing("before", "onnxruntime", 1, 1).median_ms,
            "latency_ms_after_bs1_t1": small.timing("after", "onnxruntime", 1, 1).median_ms,
            "machine": small.environment["cpu"],
            "simd": small.environment.get("simd"),
        }


def val_scores(entry: Entry, model: nn.Module) -> dict:
    """``model``'s CA and ASR on ``entry``'s validation images (training images no pass sees)."""
    m = entry.val.score(model).metrics
    return {"val_ca": m.ca, "val_asr": m.asr}


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def write_report(name: str, rows: list[dict], lines: list[str], module: str | None = None, **meta: Any) -> None:
    """results/<name>.json (rows + provenance) and results/<name>.md (``lines`` + a provenance footer)
    for a measurement script ``benchmarks/<name>.py`` (run as ``python -m benchmarks.<name>``, or as
    ``python -m <module>``)."""
    meta = {"generated": now(), "git_commit": git_commit(), "machine": machine(), **meta}
    write_json(RESULTS / f"{name}.json", {"rows": rows, "meta": meta})
    footer = (
        f"Generated {meta['generated']} at commit `{(meta['git_commit'] or 'unknown')[:10]}` on "
        f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores, by `python -m {module or 'benchmarks.' + name}`."
    )
    write_text(RESULTS / f"{name}.md", "\n".join([*lines, "", footer]) + "\n")


def store_result(path: Path, default: dict, section: str | None, key: str, value: Any, **top_level: Any) -> dict:
    """Set ``data[section][key] = value`` (or ``data[key]`` without a section) and any top-level
    items in the JSON file at ``path``, re-reading it under an exclusive lock and writing it back
    atomically, so several benchmark processes can add results to one file without losing any."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_json(path, default)
        (data[section] if section else data)[key] = value
        data.update(top_level)
        write_json(path, data)
    return data


def normalize_images(entry: Entry, images: np.ndarray) -> torch.Tensor:
    spec = get_spec(entry.dataset)
    return Normalize(spec.mean, spec.std)(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


def context_for(entry: Entry, data: str) -> PurifyContext:
    """The defender's context for ``entry`` with the data kind a cell or sweep names (none, clean, unlabeled, unlabeled_ood)."""
    spec = entry.test.spec
    context = PurifyContext(
        example_inputs=entry.example_inputs,
        num_classes=spec.num_classes,
        seed=0,
        normalize=Normalize(spec.mean, spec.std),
    )
    if data == "clean":
        context.clean_data = entry.clean_data()
    elif data == "unlabeled":
        context.unlabeled_data = entry.unlabeled_data()
    elif data == "unlabeled_ood":
        context.unlabeled_data = entry.ood_unlabeled_data()
    return context


def datafree_experiment(
    doc: str, default_entries: list[str], argv: list[str] | None, add_options=None
) -> tuple[argparse.Namespace, Iterator[tuple[Entry, PurifyContext]]]:
    """The command line of a data-free experiment script (``--entries``, ``--threads`` and what
    ``add_options(parser)`` adds), with the thread count set, and its zoo entries, each loaded with
    a data-free defender's context, one at a time."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=default_entries)
    parser.add_argument("--threads", type=int, default=1)
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def entries() -> Iterator[tuple[Entry, PurifyContext]]:
        for name in args.entries:
            entry = load_entry(name)
            yield entry, context_for(entry, "none")

    return args, entries()
