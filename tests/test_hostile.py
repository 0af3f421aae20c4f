"""Hostile and faulty inputs: each ends in one clear line (or a correct result), never a traceback, a
silent wrong result, a half-written output, or a file that decides how much memory the tool spends.

The table below is the specification (README, "Security model"). Every case runs the real CLI
(``ccpurify.cli.main``) or the real API on small real models; nothing is mocked.
"""

from __future__ import annotations

import json
import pickle
import resource
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ccpurify
from ccpurify import cli, models, passes
from ccpurify.errors import CcpurifyError, InvalidInputError, LimitExceededError, NonFiniteError
from ccpurify.io import FORMAT, FORMAT_VERSION, ModelLoadError, UnsafeModelError, load_model, save_model
from ccpurify.limits import LoadLimits

ARCH = {"name": "preact_resnet18", "kwargs": {"num_classes": 10, "width": 0.125}}


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return models.create("preact_resnet18", num_classes=10, width=0.125).eval()


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, Path]:
    """A good model file and hostile variants of it, each differing in one declared thing."""
    root = tmp_path_factory.mktemp("hostile")
    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": json.dumps(ARCH),
        "edits": "[]",
        "input_shape": "[1, 3, 32, 32]",
        "extra": json.dumps({"dataset": "cifar10"}),
    }

    def write(name: str, tensors=None, **changes) -> Path:
        path = root / name
        save_file(tensors if tensors is not None else state, str(path), metadata={**meta, **changes})
        return path

    out = {"good": save_model(tiny, root / "good.safetensors", "preact_resnet18", arch_kwargs=ARCH["kwargs"])}
    out["classes_30M"] = write(
        "c.safetensors", arch=json.dumps({**ARCH, "kwargs": {"num_classes": 30_000_000, "width": 0.125}})
    )
    out["width_1000"] = write("w.safetensors", arch=json.dumps({**ARCH, "kwargs": {"width": 1000.0}}))
    out["input_40000"] = write("i.safetensors", input_shape="[1, 3, 40000, 40000]")
    out["input_text"] = write("it.safetensors", input_shape='"abc"')
    out["input_zero"] = write("iz.safetensors", input_shape="[0, 3, 32, 32]")
    out["edits_200k"] = write("e.safetensors", edits=json.dumps([{"op": "noop"}] * 200_000))
    out["edits_object"] = write("eo.safetensors", edits='{"op": "prune"}')
    out["edit_unknown"] = write("eu.safetensors", edits='[{"op": "explode"}]')
    out["edit_garbage"] = write("eg.safetensors", edits='[{"op": "remove_channels", "layer": 5, "idxs": "all"}]')
    out["arch_list"] = write("al.safetensors", arch="[1, 2]")
    out["arch_both"] = write("ab.safetensors", arch=json.dumps({"name": "preact_resnet18", "import_path": "os:system"}))
    out["arch_unknown"] = write("au.safetensors", arch=json.dumps({"name": "resnet9000"}))
    out["arch_bogus_kwarg"] = write("ak.safetensors", arch=json.dumps({**ARCH, "kwargs": {"bogus": 1}}))
    out["arch_dict_kwarg"] = write("ad.safetensors", arch=json.dumps({**ARCH, "kwargs": {"width": {"x": 1}}}))
    out["arch_import"] = write("ai.safetensors", arch=json.dumps({"import_path": "os:system"}))
    out["arch_not_json"] = write("aj.safetensors", arch="{not json")
    out["extra_list"] = write("x.safetensors", extra="[1]")
    out["nan_weight"] = write(
        "n.safetensors", {**state, "conv1.weight": torch.full_like(state["conv1.weight"], float("nan"))}
    )
    out["negative_var"] = write(
        "v.safetensors", {**state, "layer1.0.bn1.running_var": -torch.ones_like(state["layer1.0.bn1.running_var"])}
    )
    out["wrong_shapes"] = write(
        "s.safetensors", arch=json.dumps({**ARCH, "kwargs": {"num_classes": 43, "width": 0.125}})
    )
    raw = out["good"].read_bytes()
    (root / "header.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])
    (root / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (root / "empty.safetensors").write_bytes(b"")
    (root / "random.safetensors").write_bytes(bytes(range(256)) * 40)
    out.update({k: root / f"{k}.safetensors" for k in ("header", "truncated", "empty", "random")})
    with open(root / "code.pt", "wb") as fh:
        pickle.dump({"conv1.weight": _RunsCode()}, fh)
    torch.save([torch.zeros(2)], root / "list.pt")
    (root / "zip.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    out.update({"code_pickle": root / "code.pt", "list_pickle": root / "list.pt", "bad_zip": root / "zip.pt"})
    return out


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


# (case, file key, expected error class, message pattern): loading refuses before allocating.
LOAD_CASES = [
    (
        "num_classes=30M is refused before the 7.9 GB head is built",
        "classes_30M",
        LimitExceededError,
        "parameters, above the limit",
    ),
    ("a 1000x width is refused before it is built", "width_1000", LimitExceededError, "parameters, above the limit"),
    ("a 40000x40000 recorded input is refused", "input_40000", LimitExceededError, "elements, above the limit"),
    ("an input shape that is text is refused", "input_text", ModelLoadError, "not 2 to 5 positive integers"),
    ("an input shape with a zero is refused", "input_zero", ModelLoadError, "not 2 to 5 positive integers"),
    ("200,000 edits are refused before any is replayed", "edits_200k", LimitExceededError, "structural edits, above"),
    ("edits that are not a list are refused", "edits_object", ModelLoadError, "edits must be a list"),
    ("an unknown edit op is refused", "edit_unknown", ModelLoadError, "unknown structural edit 'explode'"),
    ("a damaged edit is refused", "edit_garbage", ModelLoadError, "do not apply|unknown structural edit"),
    ("an architecture that is a list is refused", "arch_list", ModelLoadError, "must be a JSON object"),
    ("an architecture with a name and an import path is refused", "arch_both", ModelLoadError, "exactly one of name"),
    ("an unknown architecture is refused", "arch_unknown", ModelLoadError, "cannot build resnet9000"),
    (
        "a keyword the architecture does not take is refused",
        "arch_bogus_kwarg",
        ModelLoadError,
        "cannot build preact_resnet18",
    ),
    (
        "a keyword that is an object is refused",
        "arch_dict_kwarg",
        ModelLoadError,
        "kwargs must be a JSON object of numbers",
    ),
    ("an import path is refused by default", "arch_import", ModelLoadError, "importing code named by a file is off"),
    ("architecture metadata that is not JSON is refused", "arch_not_json", ModelLoadError, "damaged ccpurify metadata"),
    ("extra metadata that is not an object is refused", "extra_list", ModelLoadError, "extra must be a JSON object"),
    ("NaN weights are refused", "nan_weight", ModelLoadError, "holds NaN or Inf"),
    (
        "a negative BatchNorm variance is refused",
        "negative_var",
        ModelLoadError,
        "variance 'layer1.0.bn1.running_var' is negative",
    ),
    ("weights of another shape are refused", "wrong_shapes", ModelLoadError, "shape mismatches"),
    ("a header declaring 1 TB is refused", "header", ModelLoadError, "header declares"),
    ("a truncated file is refused", "truncated", ModelLoadError, "not a readable safetensors file"),
    ("an empty file is refused", "empty", ModelLoadError, "not a safetensors file"),
    ("random bytes are refused", "random", ModelLoadError, "not a safetensors file|not a readable"),
    ("a pickle that would run code is refused", "code_pickle", UnsafeModelError, "could run code"),
    ("a pickle of a list is refused", "list_pickle", ModelLoadError, "expected a state_dict"),
    ("a damaged zip is refused", "bad_zip", ModelLoadError, "not a readable PyTorch weights file"),
]


@pytest.mark.parametrize("case,key,error,message", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_a_hostile_model_file_is_refused_within_bounded_memory(case, key, error, message, files):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arch = "preact_resnet18" if key.endswith("pickle") or key == "bad_zip" else None
    with pytest.raises(error, match=message):
        load_model(files[key], arch=arch)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < 2 << 30, f"{case}: the process grew by {grown / 2**30:.1f} GiB"


def test_a_limit_can_be_raised_for_a_trusted_file_and_a_good_file_loads(files, tiny):
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_model(files["good"])(x), tiny(x))
    with pytest.raises(LimitExceededError):
        load_model(files["good"], limits=LoadLimits(max_params=1000))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_line_error(code: int, err: str, message: str) -> None:
    """Exit code is not 0 and the error is one line that matches ``message``."""
    assert code != 0
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert __import__("re").search(message, lines[0]), lines[0]


# (case, argv builder, message): the CLI ends with one line and exit code != 0.
CLI_CASES: list[tuple[str, Callable[[dict, Path], list[str]], str]] = [
    (
        "export onto its own input",
        lambda f, t: ["export", str(f["good"]), "--out", str(f["good"])],
        "must name an .onnx file",
    ),
    (
        "export to a file that is not .onnx",
        lambda f, t: ["export", str(f["good"]), "--out", str(t / "m.bin")],
        "must name an .onnx file",
    ),
    (
        "export over an existing file",
        lambda f, t: ["export", str(f["good"]), "--out", str(_existing(t / "old.onnx"))],
        "exists; choose another path or pass --overwrite",
    ),
    (
        "export at opset 13",
        lambda f, t: ["export", str(f["good"]), "--out", str(t / "m.onnx"), "--opset", "13"],
        "opset 13 is not available",
    ),
    (
        "export a file declaring 30M classes",
        lambda f, t: ["export", str(f["classes_30M"]), "--out", str(t / "m.onnx")],
        "above the limit",
    ),
    (
        "export a negative-variance model",
        lambda f, t: ["export", str(f["negative_var"]), "--out", str(t / "m.onnx")],
        "is negative",
    ),
    (
        "purify into its input's folder",
        lambda f, t: ["purify", str(f["good"]), "--method", "clp", "--out", str(f["good"].parent)],
        "would replace the input",
    ),
    (
        "purify into an existing folder",
        lambda f, t: ["purify", str(f["good"]), "--method", "clp", "--out", str(_existing(t / "done" / "x").parent)],
        "exists; choose another path",
    ),
    (
        "purify with a text option",
        lambda f, t: ["purify", str(f["good"]), "--method", "clp", "--set", "u=abc", "--out", str(t / "o")],
        "option u of pass 'clp' takes float",
    ),
    (
        "purify with an unknown option",
        lambda f, t: ["purify", str(f["good"]), "--method", "clp", "--set", "bogus=1", "--out", str(t / "o")],
        "has no option bogus",
    ),
    (
        "purify with a NaN option",
        lambda f, t: ["purify", str(f["good"]), "--method", "clp", "--set", "u=NaN", "--out", str(t / "o")],
        "not a finite number",
    ),
    (
        "purify with an enum option out of range",
        lambda f, t: ["purify", str(f["good"]), "--method", "clp", "--set", "mode=xx", "--out", str(t / "o")],
        "one of faithful/compress",
    ),
    (
        "purify an import-path model without opting in",
        lambda f, t: ["purify", str(f["arch_import"]), "--out", str(t / "o")],
        "off by default",
    ),
    (
        "purify a missing file",
        lambda f, t: ["purify", str(t / "nope.safetensors"), "--out", str(t / "o")],
        "no such file",
    ),
    (
        "purify with an empty unlabelled folder",
        lambda f, t: [
            "purify",
            str(f["good"]),
            "--method",
            "bcu",
            "--unlabeled-data",
            str(_empty_zip(t)),
            "--out",
            str(t / "o"),
        ],
        "no images|empty|found no",
    ),
    (
        "evaluate with a target outside the classes",
        lambda f, t: ["evaluate", str(f["good"]), "--attack", "badnets", "--target", "99", "--out", str(t / "e.json")],
        "--target must be a class",
    ),
    (
        "evaluate over an existing report",
        lambda f, t: ["evaluate", str(f["good"]), "--out", str(_existing(t / "e.json"))],
        "exists; choose another path",
    ),
    (
        "train with a target outside the classes",
        lambda f, t: ["train", "--target", "99", "--out", str(t / "run")],
        "target must be a class of cifar10",
    ),
    (
        "train for zero epochs",
        lambda f, t: ["train", "--epochs", "0", "--out", str(t / "run")],
        "epochs must be a positive number",
    ),
    (
        "bench over an existing JSON report",
        lambda f, t: ["bench", str(f["good"]), "--out", str(_existing(t / "b.json"))],
        "exists; choose another path",
    ),
]


def _existing(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("keep me")
    return path


def _empty_zip(tmp: Path) -> Path:
    path = tmp / "empty.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "no images here")
    return path


@pytest.mark.parametrize("case,argv,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_a_hostile_command_line_ends_in_one_line_and_changes_nothing(case, argv, message, files, tmp_path, capsys):
    args = argv(files, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    inputs = {k: files[k].stat().st_mtime_ns for k in ("good",)}
    code, err = run_cli(args, capsys)
    one_line_error(code, err, message)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a refused command wrote or changed files"
    assert {k: files[k].stat().st_mtime_ns for k in inputs} == inputs
    assert not [p for p in tmp_path.parent.rglob(".*.tmp")], "a temporary file was left behind"


USAGE_CASES = [
    ["bench", "m.onnx", "--batch-sizes", "0"],
    ["bench", "m.onnx", "--runs", "10"],
    ["bench", "m.onnx", "--threads", "-1"],
    ["export", "m.safetensors", "--out", "m.onnx", "--tolerance", "nan"],
    ["purify", "m.safetensors", "--macs", "1.5"],
    ["purify", "m.safetensors", "--unlabeled-count", "0"],
    ["demo", "--runs", "1"],
]


@pytest.mark.parametrize("argv", USAGE_CASES, ids=[" ".join(a) for a in USAGE_CASES])
def test_an_out_of_range_number_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


class DataDependent(nn.Module):
    """A forward that takes another branch when the input's mean is negative."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.head = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if x.mean() > 0:
            h = h + self.conv2(h)
        return self.head(h.mean((2, 3)))


class ReturnsTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.head(h), h


def _negative_variance(tiny: nn.Module) -> nn.Module:
    model = __import__("copy").deepcopy(tiny)
    model.layer1[0].bn1.running_var.fill_(-1.0)
    return model


def _nan_weight(tiny: nn.Module) -> nn.Module:
    model = __import__("copy").deepcopy(tiny)
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] = float("nan")
    return model


# (case, call, error, message): the API refuses with a CcpurifyError subclass.
API_CASES = [
    (
        "pruning a data-dependent forward is refused",
        lambda m: ccpurify.purify(DataDependent().eval(), "prune"),
        InvalidInputError,
        "data-dependent control flow",
    ),
    (
        "a model returning a tuple is refused",
        lambda m: ccpurify.purify(ReturnsTuple().eval(), "clp"),
        InvalidInputError,
        "returns tuple, not one tensor",
    ),
    (
        "a model computing NaN is refused before any pass",
        lambda m: ccpurify.purify(_negative_variance(m), "clp"),
        NonFiniteError,
        "computes NaN or Inf",
    ),
    (
        "a model with a NaN weight is refused, naming the weight",
        lambda m: ccpurify.purify(_nan_weight(m), "clp"),
        NonFiniteError,
        "weights hold NaN or Inf \\(first in 'layer1.0.conv1.weight'\\)",
    ),
    (
        "a synthetic pool larger than the machine's memory is refused before it is made",
        lambda m: ccpurify.purify(m, "recover", synthetic_images=10**9),
        LimitExceededError,
        "synthetic_images=1,000,000,000 asks for .* GiB",
    ),
    (
        "a trigger search on more images than fit in memory is refused before it starts",
        lambda m: ccpurify.purify(m, "trigger_prune", images=10**9, normalize=((0.5,) * 3, (0.25,) * 3)),
        LimitExceededError,
        "TriggerPrune images=1,000,000,000",
    ),
    (
        "a guarded recovery with no defense before it says to put one first",
        lambda m: ccpurify.purify(m, "recover", guard=True, teacher_from="input", epochs=1, synthetic_images=8),
        InvalidInputError,
        "no defense ran before it: put one first",
    ),
    (
        "a zero std in the input normalisation is refused",
        lambda m: ccpurify.purify(m, "clp", normalize=((0.5,) * 3, (0.0, 0.25, 0.25))),
        InvalidInputError,
        "finite means and stds > 0",
    ),
    (
        "an input normalisation with the wrong number of channels is refused",
        lambda m: ccpurify.purify(m, "clp", normalize=((0.5,), (0.25,)), example_inputs=torch.zeros(1, 3, 32, 32)),
        InvalidInputError,
        "normalize has 1 channels and the model's input 3",
    ),
    (
        "a model computing NaN is not exported",
        lambda m: __import__("exporters.onnx").onnx.export(
            _negative_variance(m), "/tmp/never.onnx", torch.zeros(1, 3, 32, 32)
        ),
        CcpurifyError,
        "NaN or Inf",
    ),
    (
        "BCU with no images is refused",
        lambda m: ccpurify.purify(m, "bcu", unlabeled_data=torch.zeros(0, 3, 32, 32)),
        InvalidInputError,
        "no images",
    ),
    (
        "labels outside the classes are refused",
        lambda m: ccpurify.purify(m, "rnp", clean_data=(torch.zeros(4, 3, 32, 32), torch.tensor([99, 0, 1, -1]))),
        InvalidInputError,
        "labels range -1..99",
    ),
    (
        "float labels are refused",
        lambda m: ccpurify.purify(m, "rnp", clean_data=(torch.zeros(4, 3, 32, 32), torch.zeros(4))),
        InvalidInputError,
        "integer class indices",
    ),
    (
        "images with NaN are refused",
        lambda m: ccpurify.purify(m, "bcu", unlabeled_data=torch.full((2, 3, 32, 32), float("nan"))),
        InvalidInputError,
        "NaN or Inf",
    ),
    (
        "images of another size are refused",
        lambda m: ccpurify.purify(
            m, "bcu", unlabeled_data=torch.zeros(2, 3, 16, 16), example_inputs=torch.zeros(1, 3, 32, 32)
        ),
        InvalidInputError,
        "images are \\(3, 16, 16\\)",
    ),
    (
        "an example input the model cannot take is refused",
        lambda m: ccpurify.purify(m, "clp", example_inputs=torch.zeros(1, 1, 32, 32)),
        InvalidInputError,
        "fails on an example input",
    ),
    (
        "a NaN MACs target is refused",
        lambda m: ccpurify.purify(m, macs=float("nan")),
        InvalidInputError,
        "macs must be the fraction",
    ),
    ("an unknown pass is refused", lambda m: passes.create("unknown-pass"), CcpurifyError, "unknown-pass"),
    (
        "a text option is refused",
        lambda m: passes.create("prune", macs="half"),
        InvalidInputError,
        "takes float or null",
    ),
]


@pytest.mark.parametrize("case,call,error,message", API_CASES, ids=[c[0] for c in API_CASES])
def test_a_hostile_api_call_is_refused_with_a_clear_error(case, call, error, message, tiny):
    with pytest.raises(error, match=message):
        call(tiny)


def test_a_data_dependent_forward_still_gets_passes_that_need_no_channel_graph():
    model = DataDependent().eval()
    purified = ccpurify.purify(model, "clp", mode="faithful", reference_pairing=True).model
    for x in (torch.rand(2, 3, 32, 32), -torch.rand(2, 3, 32, 32)):
        assert purified(x).shape == (2, 10)


def test_purify_and_export_leave_the_callers_model_as_it_was(tiny, tmp_path):
    from exporters.onnx import export

    model = __import__("copy").deepcopy(tiny).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ccpurify.purify(model, "prune", macs=0.5)
    export(model, tmp_path / "m.onnx", torch.zeros(1, 3, 32, 32))
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _damaged_deflate_zip(tmp: Path) -> Path:
    """A zip whose one image's deflate stream is corrupted (its CRC no longer matches)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp / "damaged.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/airplane/0.png", buf.getvalue())
    raw = bytearray(path.read_bytes())
    start = raw.index(b"0.png") + len(b"0.png")
    raw[start + 10 : start + 40] = b"\xff" * 30
    path.write_bytes(bytes(raw))
    return path


def test_a_damaged_deflate_stream_in_an_image_zip_is_one_line(files, tmp_path, capsys):
    code, err = run_cli(
        [
            "purify",
            str(files["good"]),
            "--method",
            "bcu",
            "--unlabeled-data",
            str(_damaged_deflate_zip(tmp_path)),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    one_line_error(code, err, "damaged|cannot decode")
    assert not (tmp_path / "o").exists()


def test_a_10_class_model_is_not_scored_as_gtsrb(tiny):
    import numpy as np

    from ccpurify.data import get_spec
    from ccpurify.evaluation import TestBench

    images, labels = np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 2, 42])
    bench = TestBench(get_spec("gtsrb"), images, labels, None, None, None)
    with pytest.raises(InvalidInputError, match="the model has 10 outputs but gtsrb has 43 classes"):
        bench.score(tiny)


def _onnx_declaring(tmp: Path, shape: list[int]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [shape[0], shape[1], 1, 1])
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["input"], ["out"])], "g", [x], [y])
    path = tmp / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    return path


def test_bench_refuses_an_onnx_input_too_large_to_allocate(tmp_path, capsys):
    from exporters.latency import BenchConfig, benchmark

    path = _onnx_declaring(tmp_path, [1, 3, 40000, 40000])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with pytest.raises(LimitExceededError, match="elements, above the limit"):
        benchmark({"m": path}, BenchConfig(torch_eager=False))
    code, err = run_cli(["bench", str(path), "--no-torch"], capsys)
    one_line_error(code, err, "above the limit")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < 2 << 30


def test_debug_shows_the_traceback_and_a_bug_is_not_disguised_as_bad_input(files, tmp_path, capsys, monkeypatch):
    with pytest.raises(LimitExceededError):
        cli.main(["--debug", "export", str(files["classes_30M"]), "--out", str(tmp_path / "m.onnx")])

    def buggy(args):
        return {}["a key that a bug forgot"]

    monkeypatch.setattr(cli, "cmd_export", buggy)
    code = cli.main(["export", str(files["good"]), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" in err and "this is a bug in ccpurify" in err


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_an_output_folder_appears_complete_or_not_at_all(tmp_path, interrupt):
    from ccpurify.atomic import atomic_directory

    old = tmp_path / "out"
    old.mkdir()
    (old / "report.json").write_text("old")
    with pytest.raises(type(interrupt)):
        with atomic_directory(old, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_text("new, half")
            raise interrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in old.iterdir()] == ["report.json"] and (old / "report.json").read_text() == "old"
    with atomic_directory(old, overwrite=True) as tmp:
        (tmp / "report.json").write_text("new")
    assert (old / "report.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    import os

    from ccpurify.atomic import atomic_directory

    killed = tmp_path / ".out.999999999.abc.tmp"  # a pid that cannot be running
    alive = tmp_path / f".out.{os.getpid()}.def.tmp"  # another writer, still running
    for folder in (killed, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_text("half")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "report.json").write_text("{}")
    assert not killed.exists() and alive.exists() and (tmp_path / "out" / "report.json").exists()


# ----------------------------------------------------------- cases found by a hostile-input audit
def _meta_file(tmp: Path, tiny: nn.Module, **changes) -> Path:
    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": json.dumps(ARCH),
        "edits": "[]",
        "input_shape": "[1, 3, 32, 32]",
        "extra": "{}",
        **changes,
    }
    path = tmp / "m.safetensors"
    save_file(state, str(path), metadata=meta)
    return path


AUDIT_FILES = [
    (
        "a factorize edit with a rank of 12 million",
        dict(
            edits=json.dumps(
                [{"op": "factorize", "layers": [{"layer": "linear", "method": "svd", "ranks": [12_000_000]}]}]
            )
        ),
        "do not fit",
    ),
    ("metadata nested 100,000 levels deep", dict(extra="[" * 100_000 + "]" * 100_000), "damaged ccpurify metadata"),
    ("an unknown format version", dict(format_version="999"), "format version '999'"),
]


@pytest.mark.parametrize("case,changes,message", AUDIT_FILES, ids=[c[0] for c in AUDIT_FILES])
def test_audited_model_files_are_refused_before_allocating(case, changes, message, tiny, tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with pytest.raises(ModelLoadError, match=message):
        load_model(_meta_file(tmp_path, tiny, **changes))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < 2 << 30


@pytest.mark.parametrize(
    "content",
    [{1: torch.zeros(2)}, {"w": torch.zeros(3, 3).to_sparse()}, {"w": torch.zeros(2, dtype=torch.complex64)}],
    ids=["integer keys", "sparse tensor", "complex tensor"],
)
def test_odd_pytorch_files_are_refused(content, tmp_path):
    torch.save(content, tmp_path / "odd.pt")
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "odd.pt", arch="preact_resnet18")


def test_a_frozen_model_is_defended_like_a_trainable_one(tiny):
    frozen = __import__("copy").deepcopy(tiny).requires_grad_(False)
    scored = [
        ccpurify.purify(m, "otbr", steps=2, batch_size=8).report.passes[0].details.target_layers for m in (tiny, frozen)
    ]
    assert scored[0] and scored[0] == scored[1]
    assert not any(p.requires_grad for p in frozen.parameters())


def test_an_unreachable_pruning_target_prunes_as_far_as_it_can_and_says_so(tiny):
    report = ccpurify.purify(tiny, "prune", macs=0.01).report
    assert report.passes[0].details.reached is False and report.macs_after < 0.8 * report.macs_before


def test_a_damaged_run_directory_is_one_line(tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).resolve().parents[1] / "benchmarks" / "zoo" / "cifar10-badnets", run)
    (run / "manifest.json").write_text("{not json")
    code, err = run_cli(["evaluate", str(run), "--test-subset", "10", "--out", str(tmp_path / "e.json")], capsys)
    one_line_error(code, err, "damaged run directory")


AUDIT_CLI = [
    (
        "a 5000-digit --set value",
        lambda f, t: ["purify", str(f["good"]), "--method", "clp", "--set", "u=1" + "0" * 5000, "--out", str(t / "o")],
        "cannot read the value",
    ),
    (
        "a 400-digit --set value",
        lambda f, t: ["purify", str(f["good"]), "--method", "clp", "--set", "u=1" + "0" * 400, "--out", str(t / "o")],
        "option u of pass 'clp' is too large, got an integer of 401 digits",
    ),
    (
        "a number for a list option",
        lambda f, t: ["purify", str(f["good"]), "--method", "prune", "--set", "ignored=5", "--out", str(t / "o")],
        "option ignored of pass 'prune' takes",
    ),
    (
        "--macs and --set macs",
        lambda f, t: [
            "purify",
            str(f["good"]),
            "--method",
            "prune",
            "--macs",
            "0.5",
            "--set",
            "macs=0.9",
            "--out",
            str(t / "o"),
        ],
        "give the MACs target once",
    ),
    (
        "otbr with zero steps",
        lambda f, t: ["purify", str(f["good"]), "--method", "otbr", "--set", "steps=0", "--out", str(t / "o")],
        "option steps of pass 'otbr' must be >= 1, got 0",
    ),
    (
        "a missing --clean-data path",
        lambda f, t: [
            "purify",
            str(f["good"]),
            "--method",
            "rnp",
            "--clean-data",
            str(t / "nowhere"),
            "--out",
            str(t / "o"),
        ],
        "nowhere",
    ),
    (
        "export onto a folder named .onnx",
        lambda f, t: ["export", str(f["good"]), "--out", str(_folder(t / "d.onnx"))],
        "is a folder; name a file",
    ),
]


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case,argv,message", AUDIT_CLI, ids=[c[0] for c in AUDIT_CLI])
def test_audited_command_lines_end_in_one_line(case, argv, message, files, tmp_path, capsys):
    code, err = run_cli(argv(files, tmp_path), capsys)
    one_line_error(code, err, message)
    assert not (tmp_path / "o").exists()


def test_16_bit_images_are_refused_not_saturated(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from ccpurify.data.readers import DataFormatError, decode_image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(buf, "PNG")
    with pytest.raises(DataFormatError, match="16-bit or float"):
        decode_image(buf.getvalue(), 32)


def test_test_labels_outside_the_classes_are_not_scored(tiny):
    import numpy as np

    from ccpurify.data import get_spec
    from ccpurify.evaluation import TestBench

    bench = TestBench(get_spec("cifar10"), np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 99]), None, None, None)
    with pytest.raises(InvalidInputError, match="labels range 0..99"):
        bench.score(tiny)


def test_bench_refuses_an_integer_input_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from exporters.latency import BenchConfig, benchmark

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["out"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, [1, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), tmp_path / "int.onnx")
    with pytest.raises(InvalidInputError, match="float32"):
        benchmark({"m": tmp_path / "int.onnx"}, BenchConfig(torch_eager=False))


def test_a_run_whose_attack_recipe_declares_a_huge_generator_is_refused_before_building_it(tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).resolve().parents[1] / "benchmarks" / "zoo" / "cifar10-input_aware", run)
    recipe = json.loads((run / "attack.json").read_text())
    recipe["params"]["width"] = 1500
    (run / "attack.json").write_text(json.dumps(recipe))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    code, err = run_cli(["evaluate", str(run), "--test-subset", "10", "--out", str(tmp_path / "e.json")], capsys)
    one_line_error(code, err, "do not fit its stored generator tensors")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < 2 << 30


def test_a_recorded_input_with_a_large_batch_is_refused(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match="must have batch 1"):
        load_model(_meta_file(tmp_path, tiny, input_shape="[1048576, 3, 1, 1]"))
