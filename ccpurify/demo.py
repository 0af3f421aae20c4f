"""The demo: a backdoored CIFAR-10 model from the benchmark zoo, shipped inside the package with
1,000 CIFAR-10 test images and its trigger, purified by the default data-free pipeline, exported to
ONNX and benchmarked with onnxruntime; one before/after table.

The assets are verified against their manifest's sha256 sums before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ccpurify import attacks
from ccpurify.api import plan
from ccpurify.atomic import atomic_directory, refuse_existing, write_json
from ccpurify.data import CIFAR10
from ccpurify.data.readers import read_image_folder_zip
from ccpurify.errors import CcpurifyError
from ccpurify.evaluation import Score, TestBench
from ccpurify.io import load_model
from ccpurify.passes import Pipeline
from ccpurify.progress import ProgressCallback, report
from ccpurify.provenance import git_commit, machine, now, versions

ASSETS = Path(__file__).resolve().parent / "assets" / "demo"


class DemoAssetError(CcpurifyError, RuntimeError):
    pass


@dataclass
class DemoResult:
    rows: list[dict]
    out_dir: Path
    method: str
    purify_seconds: float
    details: dict = field(default_factory=dict)
    budget: str = ""  # what purification spent, pass by pass (PipelineReport.budget)


def verify_assets(folder: Path = ASSETS) -> dict:
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise DemoAssetError(
            f"{folder}: the demo assets are missing; reinstall ccpurify or run benchmarks/make_demo_assets.py"
        )
    manifest = json.loads(manifest_file.read_text())
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise DemoAssetError(
                f"{path}: missing or altered (sha256 differs from the demo manifest); reinstall ccpurify"
            )
    return manifest


DEMO_KIND = "ccpurify.demo"


def _is_demo_output(folder: Path) -> bool:
    """Whether ``folder`` holds a previous demo's output (which a new demo may replace)."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("kind") == DEMO_KIND
    except (OSError, ValueError, AttributeError):
        return False


def _row(label: str, score: Score, latency_ms: float, onnx_bytes: int) -> dict:
    m = score.metrics
    return {
        "model": label,
        "ca": m.ca,
        "asr": m.asr,
        "ra": m.ra,
        "params": score.cost.params,
        "macs": score.cost.macs,
        "latency_ms_bs1_t1": latency_ms,
        "onnx_bytes": onnx_bytes,
    }


def run_demo(
    out_dir: str | os.PathLike,
    method: str | None = None,
    options: dict | None = None,
    progress: ProgressCallback | None = None,
    runs: int = 100,
    macs: float | None = None,
    overwrite: bool = False,
    on_estimate: Callable[[Pipeline, float, int], None] | None = None,
) -> DemoResult:
    """Score, purify, export and benchmark the embedded model; write everything to ``out_dir``.

    ``out_dir`` is written as one folder, atomically. A previous demo's folder there is replaced;
    any other existing path is refused unless ``overwrite``. ``on_estimate`` hears the pipeline and
    its time estimate (``Plan.estimate_seconds``) before it runs."""
    from ccpurify.plots import layer_weights_kept, purification_figure
    from exporters.latency import BenchConfig, benchmark
    from exporters.metadata import deployment_metadata
    from exporters.onnx import export

    out = Path(out_dir)
    overwrite = overwrite or _is_demo_output(out)
    refuse_existing(out, overwrite, "the output folder", folder=True)
    manifest = verify_assets()
    model = load_model(ASSETS / "model.safetensors")
    attack = attacks.from_recipe(
        json.loads((ASSETS / "attack.json").read_text()), load_file(os.fspath(ASSETS / "attack.safetensors"))
    )
    images, labels, _ = read_image_folder_zip(ASSETS / "test-sample.zip", "test", 32, CIFAR10.class_names, workers=1)
    bd_images, bd_labels = attack.test_set(images, labels)
    bench = TestBench(CIFAR10, images, labels, bd_images, bd_labels, attack.target)
    report(progress, "demo: score the suspect model", 0, 1)
    before = bench.score(model)
    report(progress, "demo: score the suspect model", 1, 1)

    started = time.perf_counter()
    planned = plan(
        model,
        method,
        example_inputs=torch.zeros(1, 3, 32, 32),
        progress=progress,
        normalize=(CIFAR10.mean, CIFAR10.std),
        macs=macs,
        **(options or {}),
    )
    if on_estimate is not None:
        on_estimate(planned.pipeline, *planned.estimate_seconds(model))
    result = planned.run(model)
    purify_seconds = time.perf_counter() - started
    after = bench.score(result.model)

    example_inputs = torch.zeros(1, 3, *bench.images.shape[1:3])
    with atomic_directory(out, overwrite=overwrite) as tmp:
        report(progress, "demo: export ONNX", 0, 2)
        meta = dict(
            input_shape=tuple(example_inputs.shape), mean=CIFAR10.mean, std=CIFAR10.std, class_names=CIFAR10.class_names
        )
        dense = export(model, tmp / "suspect.onnx", example_inputs, metadata=deployment_metadata(**meta))
        report(progress, "demo: export ONNX", 1, 2)
        purified = export(
            result.model,
            tmp / "purified.onnx",
            example_inputs,
            metadata=deployment_metadata(**meta, report=result.report.summary()),
        )
        report(progress, "demo: export ONNX", 2, 2)
        timing = benchmark(
            {"suspect": dense.path, "purified": purified.path},
            BenchConfig(batch_sizes=(1,), threads=(1,), runs=runs, torch_eager=False),
            progress=progress,
        )
        rows = [
            _row(
                "suspect (backdoored)",
                before,
                timing.timing("suspect", "onnxruntime", 1, 1).median_ms,
                dense.file_bytes,
            ),
            _row(
                f"purified ({result.report.passes[0].name if method else 'default pipeline'})",
                after,
                timing.timing("purified", "onnxruntime", 1, 1).median_ms,
                purified.file_bytes,
            ),
        ]
        purification_figure(
            tmp / "report.png",
            f"demo: cifar10-badnets purified by {result.report.pipeline} (no data)",
            scores={
                "suspect": (before.metrics.ca, before.metrics.asr),
                "purified": (after.metrics.ca, after.metrics.asr),
            },
            kept=layer_weights_kept(model, result.model),
            latency_ms={k: timing.timing(k, "onnxruntime", 1, 1).samples_ms for k in ("suspect", "purified")},
        )
        dense.path, purified.path = str(out / "suspect.onnx"), str(out / "purified.onnx")
        result.save(tmp / "purified.safetensors", extra={"dataset": "cifar10"})
        details = {
            "pipeline": result.report.to_dict(),
            "benchmark": timing.to_dict(),
            "export": [dense.to_dict(), purified.to_dict()],
        }
        write_json(tmp / "report.json", {"rows": rows, **details})
        write_json(
            tmp / "manifest.json",
            {
                "kind": DEMO_KIND,
                "created": now(),
                "method": method or "default",
                "options": options or {},
                "assets": manifest,
                "versions": versions(),
                "git_commit": git_commit(),
                "machine": machine(),
                "purify_seconds": purify_seconds,
                "test_images": len(labels),
                "triggered_images": len(bd_labels),
            },
        )
    return DemoResult(rows, out, method or "default", purify_seconds, details, result.report.budget())
