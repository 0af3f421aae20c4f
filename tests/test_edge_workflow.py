"""A user's own model through the whole edge workflow: purified at its real input size, saved with
its import path, loaded back, exported to a clean, self-describing ONNX file."""

import json
import textwrap
import warnings

import onnx
import pytest
import torch
from torch import nn

import ccpurify
from ccpurify.errors import InvalidInputError, InvalidTypeError, ModelLoadError
from exporters.graph_cost import onnx_cost
from exporters.metadata import read_metadata
from exporters.onnx import export

USER_MODULE = '''
from torch import nn


class GrayNet(nn.Module):
    """A 64 x 64 single-channel CNN with a flatten head: its size is fixed by the input."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32 * 16 * 16, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class NeedsArgs(GrayNet):
    def __init__(self, depth):
        super().__init__()
'''
GRAY = torch.zeros(1, 1, 64, 64)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``usernet.py`` in a folder on sys.path, as a user's own package would be."""
    (tmp_path / "usernet.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import usernet

    return importlib.reload(usernet)


def conv_and_linear_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of every Conv2d and Linear at ``example``'s size, counted from the layers' shapes."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += (
                output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(example)
    for h in handles:
        h.remove()
    return total


def test_a_custom_64px_grayscale_model_is_purified_saved_loaded_and_exported(user_module, tmp_path):
    torch.manual_seed(0)
    model = user_module.GrayNet()
    result = ccpurify.purify(model, "prune", example_inputs=GRAY, macs=0.5, normalize=((0.5,), (0.25,)))
    assert result.input_shape == (1, 1, 64, 64)
    dense_macs = conv_and_linear_macs(model, GRAY)
    assert (
        dense_macs == 64 * 64 * 16 * 9 + 32 * 32 * 32 * 16 * 9 + 16 * 16 * 32 * 32 * 9 + 4 * 8192
    )  # 64 x 64, not 32 x 32
    assert result.report.macs_before >= dense_macs and result.report.macs_after < 0.6 * result.report.macs_before

    saved = result.save(tmp_path / "gray.safetensors")
    with pytest.raises(ModelLoadError, match="allow_import=True"):
        ccpurify.load_model(saved)  # the recorded import path runs code: an explicit opt-in
    loaded = ccpurify.load_model(saved, allow_import=True)
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), result.model(x), atol=1e-5)
    assert type(loaded).__name__ == "GrayNet"

    report = result.export(tmp_path / "gray.onnx", class_names=["a", "b", "c", "d"])
    assert report.macs == conv_and_linear_macs(result.model, GRAY)  # what is deployed, at 64 x 64
    meta = read_metadata(report.path)
    assert meta["input_shape"] == [1, 1, 64, 64] and meta["input_layout"] == "NCHW"
    assert meta["input_mean"] == [0.5] and meta["input_std"] == [0.25] and meta["class_names"] == ["a", "b", "c", "d"]
    assert meta["ccpurify.recipe"]["arch"] == {"import_path": "usernet:GrayNet", "kwargs": {}}
    assert meta["ccpurify.recipe"]["edits"][0]["op"] == "remove_channels"
    assert meta["ccpurify.report"]["pipeline"] == "prune" and meta["ccpurify.report"]["macs"] == [
        result.report.macs_before,
        result.report.macs_after,
    ]


def test_a_model_that_cannot_be_rebuilt_is_not_saved(user_module, tmp_path):
    with pytest.raises(
        InvalidInputError, match=r"NeedsArgs\(\) needs arguments \(depth\).*import_path='usernet:NeedsArgs'"
    ):
        ccpurify.save_model(user_module.NeedsArgs(2), tmp_path / "a.safetensors")

    class Local(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(InvalidInputError, match="where a loader cannot import it"):
        ccpurify.save_model(Local(), tmp_path / "b.safetensors")
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*tmp*"))


def test_a_model_edited_outside_ccpurify_is_refused_when_saved(user_module, tmp_path):
    """Its recipe no longer describes it: the file would load as another network."""
    result = ccpurify.purify(user_module.GrayNet(), "prune", example_inputs=GRAY, macs=0.6)
    edited = result.model
    edited.head = nn.Linear(edited.head.in_features, 7)  # a change ccpurify did not record
    with pytest.raises(InvalidInputError, match="would not rebuild this model"):
        ccpurify.save_model(edited, tmp_path / "m.safetensors", input_shape=(1, 1, 64, 64))
    assert not (tmp_path / "m.safetensors").exists()


def test_the_example_input_is_the_users_or_a_loaded_files_and_an_assumed_one_is_announced(user_module, tmp_path):
    model = user_module.GrayNet()
    with pytest.warns(UserWarning, match="assuming 1 x 1 x 32 x 32"):
        with pytest.raises(InvalidInputError, match="fails on an example input"):  # the flatten head needs 64 x 64
            ccpurify.purify(model, "clp")
    ccpurify.purify(model, "clp", example_inputs=GRAY).save(tmp_path / "m.safetensors")
    loaded = ccpurify.load_model(tmp_path / "m.safetensors", allow_import=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loaded file's input size is used, nothing assumed
        assert ccpurify.purify(loaded, "clp").input_shape == (1, 1, 64, 64)


def test_models_the_passes_cannot_trace_are_refused_before_any_work():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, image, mask):
            return self.conv(image * mask).mean((2, 3))

    with pytest.raises(InvalidInputError, match=r"forward takes 2 inputs \(image, mask\)"):
        ccpurify.purify(TwoInputs(), "clp")
    with pytest.raises(InvalidInputError, match="float64.*model.float\\(\\)"):
        ccpurify.purify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).double(), "clp")
    with pytest.raises(InvalidTypeError, match="one tensor.*several inputs"):
        ccpurify.purify(nn.Conv2d(3, 4, 3), "clp", example_inputs=(torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)))


def test_a_pass_that_cannot_apply_is_refused_before_the_pipeline_starts():
    """A model without BatchNorm: the data-free default's OTBR ratio search and its Recover make their
    images from BN statistics; it is refused before any pass spends its time."""
    ran = []
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    with pytest.raises(InvalidInputError, match="no BatchNorm2d layer: choose .*'clp'.*--unlabeled-data"):
        ccpurify.purify(model, example_inputs=torch.zeros(1, 3, 32, 32), progress=lambda event: ran.append(event.task))
    assert ran == []
    with pytest.raises(InvalidInputError, match="RNP masks BatchNorm channels"):
        ccpurify.purify(model, "rnp", clean_data=(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)))


def test_exported_files_carry_no_debug_annotations_and_are_smaller(tmp_path):
    model = ccpurify.models.create("preact_resnet18", width=0.125).eval()
    example = torch.zeros(1, 3, 32, 32)
    clean = export(model, tmp_path / "clean.onnx", example)
    debug = export(model, tmp_path / "debug.onnx", example, strip_debug=False)
    proto = onnx.load(clean.path)
    assert not any(n.metadata_props or n.doc_string for n in proto.graph.node)
    assert not proto.graph.metadata_props and not any(v.metadata_props for v in proto.graph.value_info)
    assert "stack_trace" not in open(clean.path, "rb").read().decode("latin-1")
    assert "pkg.torch.onnx.stack_trace" in {p.key for n in onnx.load(debug.path).graph.node for p in n.metadata_props}
    assert clean.file_bytes < debug.file_bytes
    assert onnx_cost(proto) == onnx_cost(onnx.load(debug.path))  # the same network
    meta = {p.key: p.value for p in proto.metadata_props}
    assert (
        json.loads(meta["ccpurify.recipe"])["arch"]["name"] == "preact_resnet18"
        and meta["input_shape"] == "[1, 3, 32, 32]"
    )


def test_the_cli_takes_a_custom_models_recorded_input_size(user_module, tmp_path, capsys):
    from ccpurify.cli import main

    ccpurify.purify(user_module.GrayNet(), "clp", example_inputs=GRAY).save(tmp_path / "m.safetensors")
    assert (
        main(
            [
                "purify",
                str(tmp_path / "m.safetensors"),
                "--method",
                "cc",
                "--allow-import",
                "--out",
                str(tmp_path / "run"),
                "--plot",
            ]
        )
        == 0
    )
    assert "latency (onnxruntime, batch 1, 1 thread, interleaved)" in capsys.readouterr().out
    assert (tmp_path / "run" / "report.png").read_bytes()[:4] == b"\x89PNG"
    meta = read_metadata(tmp_path / "run" / "model.onnx")
    assert meta["input_shape"] == [1, 1, 64, 64] and meta["ccpurify.report"]["pipeline"] == "cc"
    assert "class_names" not in meta and "input_mean" not in meta  # no dataset named: nothing guessed
    assert meta["ccpurify.report"]["macs"][1] < meta["ccpurify.report"]["macs"][0]  # the API's summary format
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["ran"] == "cc" and report["latency"]["ratio"] > 0 and report["latency"]["runs"] >= 150
    assert (
        main(
            [
                "export",
                str(tmp_path / "run" / "model.safetensors"),
                "--allow-import",
                "--out",
                str(tmp_path / "m.onnx"),
                "--input-shape",
                "1,64,64",
            ]
        )
        == 0
    )
    assert read_metadata(tmp_path / "m.onnx")["ccpurify.report"]["pipeline"] == "cc"  # the saved report's summary
    assert (
        main(
            [
                "export",
                str(tmp_path / "run" / "model.safetensors"),
                "--allow-import",
                "--out",
                str(tmp_path / "x.onnx"),
                "--input-shape",
                "3,x",
            ]
        )
        == 2
    )
    assert "--input-shape takes" in capsys.readouterr().err
    saved = str(tmp_path / "run" / "model.safetensors")
    assert main(["export", saved, "--allow-import", "--out", str(tmp_path / "y.onnx"), "--input-shape", "1,32,32"]) == 1
    assert "fails on an example input of shape (1, 1, 32, 32)" in capsys.readouterr().err
    assert main(["export", saved, "--allow-import", "--out", str(tmp_path / "q.onnx"), "--int8"]) == 1
    assert (
        "--int8 calibrates on cifar10 training images (3x32x32) but the model takes 1x64x64" in capsys.readouterr().err
    )
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_layer_weights_kept_sees_pruned_channels_and_factorized_layers(user_module):
    from ccpurify.plots import layer_weights_kept

    model = user_module.GrayNet()
    pruned = ccpurify.purify(model, "prune", example_inputs=GRAY, macs=0.5).model
    factorized = ccpurify.purify(model, "factorize", example_inputs=GRAY, macs=0.5).model
    for purified in (pruned, factorized):
        kept = dict(layer_weights_kept(model, purified))
        assert set(kept) == {"features.0", "features.3", "features.6", "head"}
        assert min(kept.values()) < 0.9 and all(0 < v <= 1.0 for v in kept.values())
    assert dict(layer_weights_kept(model, model)) == dict.fromkeys(kept, 1.0)


def test_a_plan_estimates_the_time_of_the_training_passes_before_anything_runs():
    from ccpurify.passes import CLP, OTBR, Pipeline, Recover

    model = ccpurify.models.create("preact_resnet18", width=0.125).eval()
    example = torch.zeros(1, 3, 32, 32)
    planned = ccpurify.plan(
        model,
        Pipeline([OTBR(steps=3, batch_size=8), Recover(synthetic_images=16, synthetic_steps=2, epochs=2)]),
        example_inputs=example,
    )
    seconds, steps = planned.estimate_seconds(model)
    assert steps == 3 * 8 + 16 * 2 + int(1.5 * 2 * 16) and seconds > 0
    labelled = ccpurify.plan(
        model,
        Recover(epochs=3),
        example_inputs=example,
        clean_data=(torch.zeros(10, 3, 32, 32), torch.zeros(10, dtype=torch.long)),
    )
    assert labelled.estimate_seconds(model)[1] == int(1.5 * 3 * 10)  # no synthesis when images are given
    assert ccpurify.plan(model, CLP(), example_inputs=example).estimate_seconds(model) == (
        0.0,
        0,
    )  # weights only: nothing to time


def test_the_estimate_charges_the_passes_after_pruning_for_the_smaller_model(monkeypatch):
    """A recovery after ``Prune(macs=0.5)`` trains a model of half the MACs: its sample-steps count
    half (the steps themselves are reported unscaled). One timed sample-step is set to 1 s here, the
    only thing not computed from the passes."""
    from ccpurify.passes import BCU, CleanCompact, Factorize, Fallback, Pipeline, Prune, Recover, TriggerPrune, base
    from ccpurify.passes.data import UnlabeledData

    monkeypatch.setattr(base, "seconds_per_sample_step", lambda model, context: 1.0)
    model = ccpurify.models.create("preact_resnet18", width=0.125).eval()
    recover = Recover(synthetic_images=16, synthetic_steps=2, epochs=2)
    work = recover.sample_steps(base.PurifyContext())

    def estimate(*passes):
        return Pipeline(list(passes)).estimate_seconds(model, base.PurifyContext())

    assert estimate(recover) == (work, work)
    assert estimate(Prune(macs=0.5), recover) == (0.5 * work, work)
    assert estimate(Prune(macs=0.8), Prune(macs=0.5), recover) == (0.4 * work, work)
    assert estimate(Prune(macs=0.8), Prune(macs=0.5, of_pipeline_input=True), recover) == (0.5 * work, work)
    # a target of the pipeline's input above what the model already keeps removes nothing
    assert estimate(Prune(macs=0.5), Prune(macs=0.75, of_pipeline_input=True), recover) == (0.5 * work, work)
    assert estimate(CleanCompact(macs=0.5), recover) == (0.5 * work, work)
    unlabeled = base.PurifyContext(unlabeled_data=UnlabeledData(torch.zeros(8, 3, 32, 32)))
    bcu = BCU(compact=Prune(macs=0.5), epochs=1)
    bcu_work = bcu.sample_steps(unlabeled)
    on_pool = recover.sample_steps(unlabeled)  # the recovery distils on the pool when there is one
    assert Pipeline([bcu, recover]).estimate_seconds(model, unlabeled)[0] == bcu_work + 0.5 * on_pool
    fallback = Fallback(TriggerPrune(images=8, synthesis_steps=2), Prune(macs=0.5))
    fallback_work = fallback.sample_steps(base.PurifyContext())
    assert estimate(fallback, recover) == (fallback_work + work, fallback_work + work)  # errs long
    assert estimate(Prune(params=0.5), recover) == (work, work)  # a params target says nothing about MACs
    assert estimate(Factorize(macs=0.25), recover) == (0.25 * work, work)
    assert estimate(recover, Prune(macs=0.5)) == (work, work)  # only the passes after it


def test_scoring_reports_its_progress_batch_by_batch():
    import numpy as np

    from ccpurify.data import CIFAR10
    from ccpurify.evaluation import TestBench

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1200, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(1, 10, 1200)
    bench = TestBench(CIFAR10, images, labels, images[:600], labels[:600], 0)
    events = []
    bench.score(ccpurify.models.create("preact_resnet18", width=0.125), progress=events.append)
    assert [(e.task, e.step, e.total) for e in events] == [
        ("score: clean images", 500, 1200),
        ("score: clean images", 1000, 1200),
        ("score: clean images", 1200, 1200),
        ("score: triggered images", 500, 600),
        ("score: triggered images", 600, 600),
    ]
