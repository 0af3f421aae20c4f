"""ONNX export (parity, one file, dynamic batch), graph cost, INT8 quantization, latency benchmark."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ccpurify import models
from ccpurify.passes import Factorize, Prune
from exporters.graph_cost import onnx_cost
from exporters.latency import BenchConfig, benchmark
from exporters.onnx import ExportError, export, run_onnx
from exporters.quantize import quantize_int8

EXAMPLE = torch.zeros(1, 3, 32, 32)


def zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, width=0.125).eval()


@pytest.mark.parametrize("name", models.list_models())
def test_pruned_and_factorized_zoo_models_export_with_parity(name, tmp_path):
    model = zoo(name)
    for tag, p in (("pruned", Prune(macs=0.5)), ("factorized", Factorize(macs=0.5))):
        changed, _ = p(model)
        report = export(changed, tmp_path / f"{tag}.onnx", EXAMPLE)
        assert report.parity_max_abs_diff <= 1e-4 and report.parity_batch_sizes == [1, 4]
        assert not list(tmp_path.glob("*.data"))  # one self-contained file
        x = torch.randn(7, 3, 32, 32)  # any batch size runs: the batch axis is dynamic
        with torch.no_grad():
            assert np.abs(run_onnx(report.path, x.numpy()) - changed(x).numpy()).max() <= 1e-4


def test_graph_cost_counts_conv_and_gemm_macs(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)
    ).eval()
    export(model, tmp_path / "m.onnx", EXAMPLE)
    cost = onnx_cost(onnx.load(tmp_path / "m.onnx"))
    assert cost.macs == 8 * 16 * 16 * 27 + 10 * 8 * 16 * 16
    assert cost.params == 8 * 27 + 10 * 2048 + 10


def test_failed_export_leaves_no_file(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot run")

    class NotExportable(nn.Module):
        """Runs eagerly, but branches on a tensor's value: torch.export cannot trace it."""

        def forward(self, x):
            return x.mean((2, 3)) if x.sum() > 0 else x.amax((2, 3))

    with pytest.raises(ExportError, match=r"the model fails on an example input of shape \(1, 3, 32, 32\).*cannot run"):
        export(Broken(), tmp_path / "broken.onnx", EXAMPLE)

    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x.amax((2, 3))

    with pytest.raises(ExportError, match="ONNX export failed: TorchExportError: Failed to export") as failure:
        export(NotExportable(), tmp_path / "branch.onnx", EXAMPLE)
    assert "\x1b[" not in str(failure.value)  # no terminal colour codes in the one-line error
    with pytest.raises(ExportError, match="returns a tuple"):
        export(TwoOutputs(), tmp_path / "two.onnx", EXAMPLE)
    assert not list(tmp_path.iterdir())


def test_export_leaves_the_callers_model_in_its_mode_and_refuses_nan_outputs(tmp_path):
    model = models.create("preact_resnet18", width=0.125).train()
    export(model, tmp_path / "m.onnx", torch.zeros(1, 3, 32, 32))
    assert model.training  # the caller's model is not switched to eval mode
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).running_var.fill_(
            -1.0
        )  # finite weights, NaN outputs
    with pytest.raises(ExportError, match="NaN or Inf"):
        export(model.eval(), tmp_path / "nan.onnx", torch.zeros(1, 3, 32, 32))
    assert not (tmp_path / "nan.onnx").exists()


def test_a_corrupt_onnx_file_is_reported(tmp_path):
    from exporters.onnx import load_onnx

    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        load_onnx(tmp_path / "bad.onnx")


def test_int8_static_quantization_shrinks_the_file_and_reports_accuracy(tmp_path, cifar_test):
    from ccpurify.data import CIFAR10, Normalize
    from ccpurify.demo import ASSETS
    from ccpurify.io import load_model

    model = load_model(ASSETS / "model.safetensors")  # a trained CIFAR-10 model: INT8 must keep its predictions
    fp32 = export(model, tmp_path / "fp32.onnx", EXAMPLE)
    x = Normalize(CIFAR10.mean, CIFAR10.std)(
        torch.from_numpy(cifar_test.images[:288]).permute(0, 3, 1, 2).float() / 255
    ).numpy()
    report = quantize_int8(
        fp32.path, tmp_path / "int8.onnx", x[:32], eval_images=x[32:], eval_labels=cifar_test.labels[32:288]
    )
    assert report.file_bytes < 0.4 * report.fp32_file_bytes
    assert report.agreement >= 0.9 and abs(report.accuracy_change) <= 0.05 and report.fp32_accuracy > 0.6
    quantized = onnx.load(report.path)
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    # only the opset domains its nodes use; the fp32 file's metadata kept, the settings added
    assert {o.domain for o in quantized.opset_import} <= {n.domain for n in quantized.graph.node} | {""}
    meta = {p.key: p.value for p in quantized.metadata_props}
    assert meta["input_shape"] == "[1, 3, 32, 32]" and "preact_resnet18" in meta["ccpurify.recipe"]
    settings = json.loads(meta["ccpurify.quantization"])
    assert (
        settings["per_channel"] is True and settings["calibration"] == "minmax" and settings["calibration_images"] == 32
    )
    assert not any(n.metadata_props for n in quantized.graph.node)


def test_int8_options_that_matter_on_arm_are_applied(tmp_path):
    model = zoo("preact_resnet18")
    fp32 = export(model, tmp_path / "fp32.onnx", EXAMPLE)
    first_conv = next(n.name for n in onnx.load(fp32.path).graph.node if n.op_type == "Conv")
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    report = quantize_int8(
        fp32.path,
        tmp_path / "int8.onnx",
        x,
        reduce_range=False,
        per_channel=False,
        calibration="percentile",
        exclude_nodes=[first_conv],
    )
    assert (report.reduce_range, report.per_channel, report.calibration, report.excluded_nodes) == (
        False,
        False,
        "percentile",
        [first_conv],
    )
    graph = onnx.load(report.path).graph
    assert next(n for n in graph.node if n.name == first_conv).op_type == "Conv"
    weight = next(
        n.input[1] for n in graph.node if n.name == first_conv
    )  # the excluded conv reads float weights directly
    assert weight in {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    with pytest.raises(ValueError, match="not in"):
        quantize_int8(fp32.path, tmp_path / "bad.onnx", x, exclude_nodes=["no-such-node"])


def test_benchmark_interleaves_models_and_reports_ratios(tmp_path):
    dense = zoo("preact_resnet18")
    small, _ = Prune(macs=0.5)(dense)
    paths = {
        "dense": export(dense, tmp_path / "a.onnx", EXAMPLE).path,
        "pruned": export(small, tmp_path / "b.onnx", EXAMPLE).path,
    }
    config = BenchConfig(batch_sizes=(1, 2), threads=(1,), warmup=2, runs=50, rounds=2)
    report = benchmark(paths, config, torch_models={"dense": dense, "pruned": small})
    assert {(t.model, t.engine, t.batch) for t in report.timings} == {
        (m, e, b) for m in paths for e in ("onnxruntime", "torch") for b in (1, 2)
    }
    # every run of every model is kept, split over the interleaved rounds
    assert all(len(t.samples_ms) == t.runs == 50 and len(t.round_medians_ms) == 2 for t in report.timings)
    ratios = report.ratios()
    assert len(ratios) == 4 and all(r["macs_ratio"] < 0.55 for r in ratios)
    for r in ratios:  # the bootstrap interval brackets the measured ratio of medians
        low, high = r["latency_ratio_ci95"]
        assert low <= r["latency_ratio"] <= high and low < high
    # the cost of a call that only copies the input is measured per cell, below every model's time,
    # and taking it off both sides moves each onnxruntime ratio away from 1
    for batch in (1, 2):
        overhead = report.call_overhead_ms("onnxruntime", batch, 1)
        assert 0 < overhead < min(report.timing(m, "onnxruntime", batch, 1).median_ms for m in paths)
    for r in (r for r in ratios if r["engine"] == "onnxruntime"):
        assert abs(r["latency_ratio_net"] - 1) > abs(r["latency_ratio"] - 1)
    assert all(r["latency_ratio_net"] is None for r in ratios if r["engine"] == "torch")
    md = report.to_markdown()
    assert "latency ratio" in md and "spinning off" in md and "call overhead" in md
    assert report.to_dict()["config"]["runs"] == 50


def test_benchmark_refuses_too_few_runs():
    with pytest.raises(ValueError, match="runs must be >= 50"):
        BenchConfig(runs=10)


def _tiny_onnx(path: Path, height: str | int = "height") -> Path:
    """A two-node ONNX classifier built with the onnx helper alone (no torch); its height is symbolic
    unless given as a number."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [3, 4], np.random.default_rng(0).standard_normal(12).astype(np.float32).tolist()
    )
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, height, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    return path


def test_the_latency_benchmark_runs_where_torch_is_not_installed(tmp_path):
    import json
    import subprocess
    import sys

    model = _tiny_onnx(tmp_path / "tiny.onnx")
    script = (
        "import sys, json; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"  # any 'import torch' or 'import onnx' now fails
        "from exporters.latency import BenchConfig, benchmark\n"
        f"r = benchmark({{'a': {str(model)!r}, 'b': {str(model)!r}}}, BenchConfig(runs=50, warmup=1, torch_eager=False))\n"
        "print(json.dumps({'torch': 'torch' in sys.modules and sys.modules['torch'] is not None, 'n': len(r.timings), "
        "'ratio': r.ratio('b', 'a'), 'providers': r.config.providers, 'net': r.ratios()[0]['latency_ratio_net']}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (
        result["torch"] is False
        and result["n"] == 2
        and result["ratio"] > 0
        and result["providers"] == ["CPUExecutionProvider"]
        and result["net"] is None  # the call overhead needs onnx to build its graph
    )
    # the device's command line: python -m exporters.latency, torch still blocked; the JSON comes back
    cli = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\nfrom exporters.latency import main\n"
        f"raise SystemExit(main([{str(model)!r}, {str(model)!r}, '--runs', '50', '--warmup', '1', '--duration', '0.3', "
        f"'--free-dim', 'height=8', '--out', {str(tmp_path / 'r.json')!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", cli],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Ratios against `tiny`" in out.stdout
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [m["name"] for m in saved["models"]] == ["tiny", "tiny-1"] and saved["config"]["providers"] == [
        "CPUExecutionProvider"
    ]
    assert all(t["p99_ms"] >= t["median_ms"] and t["iqr_ms"] >= 0 for t in saved["timings"])
    assert saved["models"][0]["macs"] is None  # no onnx package on the device: not counted rather than guessed
    assert saved["config"]["duration_s"] == 0.3 and saved["config"]["free_dimensions"] == [["height", 8]]
    # back on the host: the CLI renders the device's report
    from ccpurify.cli import main

    render = subprocess.run(
        [sys.executable, "-m", "ccpurify.cli", "bench", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert render.returncode == 0, render.stderr
    assert (
        "measured on" in render.stdout
        and "| tiny-1 | onnxruntime | 1 | 1 |" in render.stdout
        and "Ratios against `tiny`" in render.stdout
    )
    for bad in (
        '{"config": {}}',
        '{"config": {}, "environment": {}, "models": [], "timings": [], "ratios": []}',
        "[1]",
        "{oops",
    ):
        (tmp_path / "bad.json").write_text(bad)
        assert main(["bench", str(tmp_path / "bad.json")]) == 1  # one line: not a benchmark report
    from exporters.latency import BenchConfig, benchmark

    with pytest.raises(ValueError, match="'batch' is the batch dimension; set it with batch_sizes"):
        benchmark({"a": model}, BenchConfig(torch_eager=False, free_dimensions=(("batch", 4),)))
    with pytest.raises(ValueError, match="no model has a symbolic input dimension named hieght; theirs: height"):
        benchmark({"a": model}, BenchConfig(torch_eager=False, free_dimensions=(("hieght", 8),)))  # a typo
    static = _tiny_onnx(tmp_path / "static.onnx", height=8)
    with pytest.raises(
        ValueError, match=r"b do\(es\) not declare the input dimension 'height'.*a: \[3, 16, 8\]; b: \[3, 8, 8\]"
    ):
        benchmark({"a": model, "b": static}, BenchConfig(torch_eager=False, free_dimensions=(("height", 16),)))


def test_a_provider_this_onnxruntime_lacks_is_refused_by_name(tmp_path):
    from ccpurify.errors import InvalidInputError
    from exporters.latency import BenchConfig, benchmark

    with pytest.raises(InvalidInputError, match="'NoSuchExecutionProvider'.*available"):
        benchmark(
            {"a": _tiny_onnx(tmp_path / "t.onnx")},
            BenchConfig(torch_eager=False, providers=("NoSuchExecutionProvider",)),
        )


def test_a_run_that_does_not_end_is_stopped(tmp_path):
    """A Loop whose trip count is huge: the first run is stopped by the watchdog, not waited for."""
    import onnx
    from onnx import TensorProto, helper

    from ccpurify.errors import LimitExceededError
    from exporters.latency import BenchConfig, benchmark

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["x_in", "one"], ["x_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["batch", 3, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", 3, 8, 8]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "input"], ["output"], body=body)],
        "loop",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [
            helper.make_tensor("trips", TensorProto.INT64, [], [2**62]),
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        ],
    )
    path = tmp_path / "loop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    with pytest.raises(LimitExceededError, match="took more than 0.5 s and was stopped"):
        benchmark({"loop": path}, BenchConfig(torch_eager=False, max_run_seconds=0.5))


def test_a_static_export_passes_the_mobile_check_and_converts_to_ort_format(tmp_path):
    from exporters.mobile import check_mobile, convert_to_ort

    model = zoo("vgg16_bn")
    dynamic = export(model, tmp_path / "dynamic.onnx", EXAMPLE)
    static = export(model, tmp_path / "static.onnx", EXAMPLE, dynamic_batch=False)
    assert check_mobile(dynamic.path).as_is["NNAPI"] == "NO"  # a dynamic batch is not for NNAPI
    verdict = check_mobile(static.path)
    assert verdict.as_is["NNAPI"] == "YES" and "partition" in verdict.log
    ort_file = convert_to_ort(static.path, tmp_path / "static.ort")
    assert (tmp_path / "static.required_operators.config").read_text().count("Conv") >= 1
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert (
        np.abs(run_onnx(ort_file, x) - run_onnx(static.path, x)).max() <= 1e-4
    )  # onnxruntime runs the .ort file alike


def test_a_report_with_a_malformed_call_overhead_is_refused_in_one_line():
    from exporters.latency import BenchReport

    timing = {
        "model": "a",
        "engine": "onnxruntime",
        "batch": 1,
        "threads": 1,
        "runs": 50,
        "median_ms": 1.0,
        "p90_ms": 1.0,
        "mean_ms": 1.0,
        "cv": 0.0,
        "min_ms": 1.0,
        "round_medians_ms": [1.0],
    }
    model = {"name": "a", "onnx_path": "a.onnx", "file_bytes": 1, "params": None, "macs": None}
    for overhead in ({"1x1": "0.1"}, [0.1]):
        data = {"config": {}, "environment": {"call_overhead_ms": overhead}, "models": [model], "timings": [timing]}
        with pytest.raises(ValueError, match="call_overhead_ms"):
            BenchReport.from_dict(data)
    good = {"config": {}, "environment": {"call_overhead_ms": {"1x1": 0.1}}, "models": [model], "timings": [timing]}
    assert BenchReport.from_dict(good).call_overhead_ms("onnxruntime", 1, 1) == 0.1
