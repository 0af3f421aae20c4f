"""Safe model files: exact round trips, and hostile or broken files refused with clear messages."""

import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from ccpurify import models
from ccpurify.errors import InvalidInputError, NonFiniteError
from ccpurify.io import ArchRef, ModelLoadError, UnsafeModelError, load_model, load_weights, read_metadata, save_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return models.create("preact_resnet18", num_classes=10, width=0.25).eval()


def test_save_load_round_trip_gives_identical_logits(model, tmp_path):
    path = save_model(
        model,
        tmp_path / "m.safetensors",
        "preact_resnet18",
        arch_kwargs={"num_classes": 10, "width": 0.25},
        extra={"dataset": "cifar10"},
    )
    loaded = load_model(path)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert read_metadata(path).extra == {"dataset": "cifar10"}


def test_plain_state_dict_loads_with_an_arch(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    loaded = load_model(tmp_path / "weights.pth", arch="preact_resnet18", arch_kwargs={"width": 0.25})
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_plain_weights_without_an_arch_ask_for_one(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelLoadError, match="pass arch="):
        load_model(tmp_path / "weights.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ccpurify-pwned-by-model",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = Path("/tmp/ccpurify-pwned-by-model")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": _Payload()}, fh)
    with pytest.raises(UnsafeModelError, match="could run code"):
        load_weights(path)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Payload()}, tmp_path / "evil2.pt")
    with pytest.raises(UnsafeModelError):
        load_model(tmp_path / "evil2.pt", arch="preact_resnet18")
    assert not marker.exists()


def test_a_refused_pickle_names_the_global_it_would_call_at_every_protocol(tmp_path):
    """Torch's weights-only reader stops at protocol 4 and 5's framing before the global; the refusal
    still names it, read from the opcodes without running anything."""
    marker = Path("/tmp/ccpurify-pwned-by-model")
    marker.unlink(missing_ok=True)
    payload = {"conv1.weight": _Payload()}
    for protocol in (2, 4, 5):
        plain, zipped, legacy = (tmp_path / f"{kind}{protocol}.pth" for kind in ("plain", "zip", "legacy"))
        with open(plain, "wb") as fh:
            pickle.dump(payload, fh, protocol=protocol)
        torch.save(payload, zipped, pickle_protocol=protocol)
        torch.save(payload, legacy, pickle_protocol=protocol, _use_new_zipfile_serialization=False)
        for path in (plain, zipped, legacy):
            with pytest.raises(UnsafeModelError, match=r"it calls (posix|os)\.system"):
                load_weights(path)
    assert not marker.exists()


def test_a_crafted_stack_global_is_named_by_what_is_on_the_stack_not_the_last_strings_pushed(tmp_path):
    """STACK_GLOBAL takes its names from the stack: here from the memo, after two decoy strings were
    pushed and popped. The refusal names what the loader would call."""

    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    crafted = b"".join(
        [
            b"\x80\x04",  # PROTO 4
            text("builtins") + b"\x94" + text("eval") + b"\x94" + b"00",  # memo 0 and 1, then POP POP
            text("collections") + text("OrderedDict") + b"00",  # decoys, popped
            b"h\x00h\x01\x93",  # BINGET 0, BINGET 1, STACK_GLOBAL
            b")R.",  # EMPTY_TUPLE REDUCE STOP
        ]
    )
    (tmp_path / "crafted.pt").write_bytes(crafted)
    with pytest.raises(UnsafeModelError, match=r"it calls builtins\.eval"):
        load_weights(tmp_path / "crafted.pt")


def test_a_harmless_state_dict_at_pickle_protocol_4_is_told_to_be_resaved_not_called_unsafe(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "p4.pt", pickle_protocol=4)
    with pytest.raises(ModelLoadError, match="pickle protocol 4.*re-save it with torch.save's default") as caught:
        load_weights(tmp_path / "p4.pt")
    assert not isinstance(caught.value, UnsafeModelError)


def test_a_pickle_declaring_a_huge_frame_or_an_empty_file_gets_a_one_line_error(tmp_path):
    """The opcode scan reads a bounded head: a declared length never decides what is allocated."""
    (tmp_path / "frame.pt").write_bytes(b"\x80\x05\x95" + struct.pack("<Q", 2**62) + b"abc")
    (tmp_path / "bytes8.pt").write_bytes(b"\x80\x05\x8e" + struct.pack("<Q", 2**62) + b"abc")
    for name in ("frame.pt", "bytes8.pt"):
        with pytest.raises(ModelLoadError):
            load_weights(tmp_path / name)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="the file is empty"):
        load_weights(tmp_path / "empty.pt")


def test_a_state_dict_holding_something_other_than_a_tensor_names_the_entry(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "epoch": [3]}, tmp_path / "odd.pt")
    with pytest.raises(ModelLoadError, match="'epoch' holds a value of type list; save the model's state_dict"):
        load_weights(tmp_path / "odd.pt")
    torch.save({"conv1.weight": torch.zeros(1), 3: torch.zeros(1)}, tmp_path / "int_key.pt")
    with pytest.raises(ModelLoadError, match="key '3' has type int, not a name"):
        load_weights(tmp_path / "int_key.pt")


def test_whole_pickled_module_is_refused(model, tmp_path):
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UnsafeModelError, match="plain state_dict or safetensors"):
        load_weights(tmp_path / "whole.pt")


def test_corrupt_files_are_reported(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(tmp_path / "bad.safetensors", arch="preact_resnet18")
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_weights(tmp_path / "bad.pt")
    # Bytes that are no pickle at all are corrupt, not unsafe, whatever the unpickler trips on.
    for name, content in (("noise.pt", bytes(range(256)) * 8), ("text.pt", b"hello world, not weights")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelLoadError, match="corrupt") as caught:
            load_weights(tmp_path / name)
        assert not isinstance(caught.value, UnsafeModelError)


def test_nan_weights_are_refused(model, tmp_path):
    with torch.no_grad():
        model.linear.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="linear.weight.*NaN.*nothing was saved"):
        save_model(model, tmp_path / "nan.safetensors", "preact_resnet18", arch_kwargs={"width": 0.25})
    assert not list(tmp_path.iterdir())
    path = save_model(
        model, tmp_path / "nan.safetensors", "preact_resnet18", arch_kwargs={"width": 0.25}, verify=False
    )  # a hostile file
    with pytest.raises(ModelLoadError, match="linear.weight.*NaN"):
        load_model(path)


def test_weights_of_another_architecture_are_reported(model, tmp_path):
    path = save_model(model, tmp_path / "m.safetensors", "preact_resnet18", arch_kwargs={"width": 0.25})
    with pytest.raises(ModelLoadError, match="do not fit resnet18.*--arch"):
        load_model(path, arch="resnet18", arch_kwargs={"width": 0.25})
    with pytest.raises(ModelLoadError, match="shape mismatches"):
        load_model(path, arch="preact_resnet18", arch_kwargs={"width": 0.5})


def test_import_path_architectures_need_an_explicit_opt_in(model, tmp_path):
    arch = ArchRef(
        import_path="ccpurify.models.preact_resnet:PreActResNet", kwargs={"num_blocks": [2, 2, 2, 2], "width": 0.25}
    )
    path = save_model(model, tmp_path / "m.safetensors", arch)
    with pytest.raises(ModelLoadError, match="allow_import=True"):
        load_model(path)
    assert isinstance(load_model(path, allow_import=True), torch.nn.Module)
    with pytest.raises(InvalidInputError, match="would not rebuild this model: os:system is not an nn.Module class"):
        save_model(model, tmp_path / "os.safetensors", ArchRef(import_path="os:system", kwargs={"command": "true"}))
    bad = save_model(
        model, tmp_path / "os.safetensors", ArchRef(import_path="os:system", kwargs={"command": "true"}), verify=False
    )
    with pytest.raises(ModelLoadError, match="not an nn.Module class"):
        load_model(bad, allow_import=True)


def test_a_save_that_fails_midway_leaves_no_file(model, tmp_path, monkeypatch):
    import ccpurify.io

    def write_half_then_fail(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ccpurify.io, "save_file", write_half_then_fail)
    target = tmp_path / "m.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_model(model, target, "preact_resnet18", arch_kwargs={"width": 0.25})
    assert not list(tmp_path.iterdir())


def test_a_purified_64px_model_with_a_flatten_head_saves_and_loads(tmp_path):
    import ccpurify

    torch.manual_seed(0)
    net = Flat64().eval()
    net._ccpurify_arch = ArchRef(import_path="tests.test_io:Flat64").to_dict()
    result = ccpurify.purify(net, "prune", macs=0.6, example_inputs=torch.zeros(1, 3, 64, 64))
    path = result.save(tmp_path / "m.safetensors")
    assert read_metadata(path).input_shape == (1, 3, 64, 64)
    loaded = load_model(path, allow_import=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(loaded(x), result.model(x), atol=1e-5)


class Flat64(torch.nn.Sequential):
    """A 64-px network whose head flattens the feature map, so its edits replay only at 64x64."""

    def __init__(self) -> None:
        super().__init__(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(16 * 32 * 32, 10),
        )
