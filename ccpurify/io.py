"""Safe saving and loading of (possibly structurally changed) models. No pickle anywhere.

A saved model is one safetensors file whose metadata holds
- ``arch``: how to build the base network (a zoo name + kwargs, or an import path + kwargs);
- ``edits``: a replayable recipe of structural edits (channels removed, layers factorized), each
  ``{"op": name, ...}`` and replayed by the function registered for ``op`` (``ccpurify.graph``,
  ``ccpurify.lowrank``);
- ``extra``: free JSON (dataset, normalisation, provenance).

Loading rebuilds the base model, replays the edits on its empty weights, then loads the tensors with
``strict=True`` (docs/design.md, "Saving structurally changed models").

Suspect models are hostile input: ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``
only, so a pickle that would run code is refused; non-finite weights and negative BatchNorm variances
are refused too. Nothing a file declares is allocated before it is checked against ``LoadLimits``: the
base architecture is first built on the meta device (no memory) and its size and tensor shapes are
compared with the file's header.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ccpurify import graph, lowrank  # noqa: F401  (register the edit replayers)
from ccpurify.atomic import atomic_path, refuse_existing
from ccpurify.errors import InvalidInputError, LimitExceededError, ModelLoadError, NonFiniteError, UnsafeModelError
from ccpurify.limits import DEFAULT_LIMITS, LoadLimits
from ccpurify.probes import non_finite_tensor
from ccpurify.recipe import (  # noqa: F401  (re-exported: the saving API)
    ARCH_ATTR,
    EDIT_REPLAYERS,
    EDITS_ATTR,
    ArchRef,
    arch_of,
    edits_of,
    import_path_arch,
    input_shape_of,
    register_edit,
    set_edits,
    set_input_shape,
)

FORMAT = "ccpurify-model"
FORMAT_VERSION = "1"


def replay_edits(model: nn.Module, edits: list[dict], example_inputs: torch.Tensor) -> nn.Module:
    """Apply a recipe of structural edits to a freshly built base model."""
    for edit in edits:
        op = edit.get("op")
        if op not in EDIT_REPLAYERS:
            raise ModelLoadError(f"unknown structural edit {op!r} in the recipe; known: {sorted(EDIT_REPLAYERS)}")
        model = EDIT_REPLAYERS[op](model, edit, example_inputs)
    return model


@dataclass
class SavedModel:
    """What a ccpurify model file describes, besides the weights."""

    arch: ArchRef
    edits: list[dict] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None  # None: not recorded (an unedited model saved without it)
    extra: dict = field(default_factory=dict)


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    arch: ArchRef | str | None = None,
    edits: list[dict] | None = None,
    input_shape: tuple[int, ...] | None = None,
    extra: dict | None = None,
    arch_kwargs: dict | None = None,
    overwrite: bool = True,
    verify: bool = True,
) -> Path:
    """Write ``model`` as one safetensors file (atomically) with its architecture and edit recipe.

    ``arch`` and ``edits`` default to what the model records (``arch_of``, ``edits_of``); a model of
    a user's own class records nothing, so its import path (``module:Class``) is recorded instead
    when the class can be built without arguments (else pass ``arch=ArchRef(import_path=...,
    kwargs=...)``). ``input_shape`` (batch first) defaults to the one the model records; the edits
    are replayed on it when loading. With ``verify``, the written file is loaded back (importing a
    recorded import path, which is this process's own class) and compared with ``model``: same
    tensors and, where the input shape is known, the same outputs, before the file appears at
    ``path``; a model changed outside ccpurify (edits its recipe does not describe) is refused.
    """
    if isinstance(arch, str):
        arch = ArchRef(name=arch, kwargs=dict(arch_kwargs or {}))
    arch = arch or arch_of(model) or import_path_arch(model)
    edits = edits_of(model) if edits is None else edits
    input_shape = tuple(input_shape) if input_shape is not None else input_shape_of(model)
    if edits and input_shape is None:
        raise InvalidInputError(
            "the model carries structural edits: pass input_shape= (the example input they were traced on)"
        )
    if verify and (name := non_finite_tensor(model.state_dict())) is not None:
        raise NonFiniteError(f"the model's {name!r} holds NaN or Inf; nothing was saved (a file of it would not load)")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": json.dumps(arch.to_dict()),
        "edits": json.dumps(edits or []),
        "extra": json.dumps(extra or {}, default=str),
    }
    if input_shape is not None:
        metadata["input_shape"] = json.dumps([int(d) for d in input_shape])
    path = Path(path)
    if not overwrite:
        refuse_existing(path, overwrite=False)
    with atomic_path(path) as tmp:
        save_file(_state_for_saving(model), os.fspath(tmp), metadata=metadata)
        if verify:
            _verify_saved(model, tmp, arch, input_shape)
    return path


def _verify_saved(model: nn.Module, path: Path, arch: ArchRef, input_shape: tuple[int, ...] | None) -> None:
    """Load the file just written and compare it with ``model``; a difference is an ``InvalidInputError``."""
    fix = (
        "the saved file would not rebuild this model: {why}. If you changed the model's structure yourself "
        "(outside ccpurify's passes), its recipe does not describe it; save the base model's architecture with "
        "arch=..., or run the edits as ccpurify passes"
    )
    try:
        loaded = load_model(path, allow_import=arch.import_path is not None)
    except ModelLoadError as exc:
        raise InvalidInputError(fix.format(why=str(exc).split(": ", 1)[-1][:240])) from exc
    mine = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    theirs = loaded.state_dict()
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        raise InvalidInputError(fix.format(why="its tensors differ in names or shapes"))
    if input_shape is not None:
        original = copy.deepcopy(model).cpu().eval()
        x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected, got = original(x), loaded(x)
        if not (
            isinstance(expected, torch.Tensor)
            and isinstance(got, torch.Tensor)
            and expected.shape == got.shape
            and torch.allclose(expected, got, rtol=1e-4, atol=1e-4 * (1 + float(expected.abs().max())))
        ):
            raise InvalidInputError(fix.format(why="the rebuilt model computes different outputs"))


def read_metadata(path: str | os.PathLike, limits: LoadLimits = DEFAULT_LIMITS) -> SavedModel | None:
    """The ccpurify description stored in a safetensors file, or None for a plain weights file.
    Every field is checked (types, input shape, edit count) before anything uses it."""
    _check_header_size(Path(path), limits)
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc}); the file may be corrupt") from exc
    if meta.get("format") != FORMAT:
        return None
    try:
        arch = ArchRef.from_dict(json.loads(meta["arch"]))
        edits = json.loads(meta.get("edits", "[]"))
        shape = json.loads(meta["input_shape"]) if "input_shape" in meta else None
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError, TypeError, RecursionError, ModelLoadError) as exc:
        raise ModelLoadError(f"{path}: damaged ccpurify metadata ({type(exc).__name__}: {str(exc)[:160]})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: ccpurify model format version {meta.get('format_version')!r}; this ccpurify reads {FORMAT_VERSION!r}"
        )
    if not isinstance(edits, list) or not all(isinstance(e, dict) and isinstance(e.get("op"), str) for e in edits):
        raise ModelLoadError(f"{path}: damaged ccpurify metadata (edits must be a list of {{'op': ...}} objects)")
    if not isinstance(extra, dict):
        raise ModelLoadError(f"{path}: damaged ccpurify metadata (extra must be a JSON object)")
    limits.check_edits(len(edits), str(path))
    try:
        input_shape = limits.check_input_shape(shape, str(path)) if shape is not None else None
    except LimitExceededError:
        raise
    except InvalidInputError as exc:
        raise ModelLoadError(str(exc)) from exc
    return SavedModel(arch=arch, edits=edits, input_shape=input_shape, extra=extra)


def _check_header_size(path: Path, limits: LoadLimits) -> None:
    """safetensors files start with the header's length (8 bytes, little-endian): bound it first."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    declared = int.from_bytes(head, "little") if len(head) == 8 else -1
    if declared < 0 or declared > limits.max_header_bytes:
        raise ModelLoadError(
            f"{path}: not a safetensors file, or its header declares {declared:,} bytes (limit "
            f"{limits.max_header_bytes:,}); the file may be corrupt"
        )


def declared_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc}); the file may be corrupt") from exc


_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def load_weights(path: str | os.PathLike, limits: LoadLimits = DEFAULT_LIMITS) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a ``.pt``/``.pth``/``.bin`` file read with
    ``torch.load(weights_only=True)``; anything that would need unpickling code is refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        _check_header_size(path, limits)
        limits.check_params(sum(math.prod(s) for s in declared_shapes(path).values()), str(path))
        try:
            state = load_file(os.fspath(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc}); the file may be corrupt") from exc
    else:
        state = _torch_load_weights_only(path)
        limits.check_params(sum(t.numel() for t in state.values()), str(path))
    _check_finite(state, path)
    _check_batchnorm_variances(state, path)
    return state


def _torch_load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    if path.is_file() and path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty; give the weights file itself (.pt, .pth or .safetensors)")
    try:
        # mmap: a zip-format file's tensors are mapped, not read, until their sizes have been checked
        mmap = zipfile.is_zipfile(path)
        with warnings.catch_warnings():  # torch's advice on pickle protocols; the refusal below says what matters
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        head = _pickle_head(path)
        refused = _foreign_global(str(exc)) or (_pickled_global(head) if head else None)
        if refused is not None:
            refused = f"objects other than tensors ({refused})"
        elif head and head[1] > 2:
            raise ModelLoadError(
                f"{path}: pickle protocol {head[1]}, which PyTorch's weights-only reader cannot read "
                f"({_last_line(str(exc))}); re-save it with torch.save's default protocol (2) or as safetensors on a "
                "machine you trust, or the file is corrupt"
            ) from exc
        elif head:
            refused = f"instructions the weights-only reader refuses ({_last_line(str(exc))}): the file may be corrupt"
        else:  # bytes that are no pickle at all
            raise ModelLoadError(
                f"{path}: not a readable PyTorch weights file ({_last_line(str(exc))}); the file may be corrupt"
            ) from exc
        raise UnsafeModelError(
            f"{path}: refused: the pickle holds {refused}. "
            "Loading it could run code. Re-save a plain state_dict or safetensors on a machine you trust"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails inside torch.load in many ways (KeyError, ...)
        raise ModelLoadError(
            f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {str(exc)[:160]}); "
            "the file may be corrupt"
        ) from exc
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: expected a state_dict (names -> tensors), found {type(obj).__name__}")
    if (key := next((k for k in obj if not isinstance(k, str)), None)) is not None:
        raise ModelLoadError(
            f"{path}: expected a state_dict (names -> tensors), but key {str(key)[:80]!r} has type {type(key).__name__}, "
            "not a name; save the model's state_dict() alone"
        )
    if (key := next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)) is not None:
        raise ModelLoadError(
            f"{path}: expected a state_dict (names -> tensors), but {key[:80]!r} holds a value of type "
            f"{type(obj[key]).__name__}; save the model's state_dict() alone"
        )
    odd = next((k for k, v in obj.items() if v.layout != torch.strided or v.is_complex()), None)
    if odd is not None:
        raise ModelLoadError(f"{path}: tensor {odd!r} is sparse or complex; a model's weights are dense real tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _foreign_global(message: str) -> str | None:
    """The line of a weights-only unpickling error that names a global it refused (a class or function
    the file would make the loader call), or None when the error is about malformed bytes."""
    if (named := re.search(r"GLOBAL\s+(\S+)", message)) is not None:
        return f"it calls {named.group(1)[:120]}"
    return next((line.strip()[:160] for line in message.splitlines() if "global" in line.lower()), None)


# How much of a pickle _pickle_head reads: a file names its globals near its start, and a declared
# length in the file must not decide how much is read.
_PICKLE_HEAD_BYTES = 1 << 20


def _pickle_head(path: Path) -> bytes:
    """The first ``_PICKLE_HEAD_BYTES`` of the pickle in ``path`` (the file itself, or a zip-format
    ``torch.save`` file's ``data.pkl``) when it opens with a PROTO instruction (protocol 2 to 5),
    else ``b""``."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return b""
                with archive.open(member) as fh:
                    head = fh.read(_PICKLE_HEAD_BYTES)
        else:
            with open(path, "rb") as fh:
                head = fh.read(_PICKLE_HEAD_BYTES)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return b""
    return head if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 else b""


def _pickled_global(head: bytes) -> str | None:
    """The first global (``module.name``) the pickles in ``head`` would make the loader call, read
    from their opcodes with ``pickletools`` (nothing is executed), or None. A legacy ``torch.save``
    file is several pickles in a row (magic number, protocol, system information, then the data);
    torch's weights-only reader stops at protocol 4 and 5's framing before it reaches the global, so
    its own error cannot name it. ``STACK_GLOBAL`` takes its two names from the stack, which
    ``_PickleStack`` follows (memo included) from each opcode's declared stack effect."""
    stream, allowed = io.BytesIO(head), _weights_only_globals()
    try:
        while stream.tell() < len(head):
            stack = _PickleStack()
            for op, arg, _ in pickletools.genops(stream):
                called = None
                if op.name in ("GLOBAL", "INST"):
                    called = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL":
                    module, name = stack.top(2)
                    both = isinstance(module, str) and isinstance(name, str)
                    called = f"{module}.{name}" if both else "a global whose name it builds at run time"
                if called is not None and called not in allowed:
                    return f"it calls {called[:120]}"
                stack.apply(op, arg)
    except Exception:  # noqa: BLE001 - malformed or cut-off opcodes: the caller says what it can
        pass
    return None


class _PickleStack:
    """The pickle machine's stack as far as names go: each string a pickle pushes (directly or
    from its memo) is kept, every other value is None. Each opcode pops and pushes what
    ``pickletools`` declares for it, so a crafted file cannot make a stale string look like the
    operand of ``STACK_GLOBAL``."""

    def __init__(self) -> None:
        self.items: list[str | None] = []
        self.marks: list[int] = []
        self.memo: dict[int, str | None] = {}

    def top(self, n: int) -> list[str | None]:
        if len(self.items) < n:
            raise ValueError("stack underflow")
        return self.items[-n:]

    def apply(self, op: pickletools.OpcodeInfo, arg: object) -> None:
        before, after = op.stack_before, op.stack_after
        if pickletools.markobject in before:  # [..., mark, stackslice]: down to the last mark, then those below it
            del self.items[self.marks.pop() :]
            below = before.index(pickletools.markobject)
        else:
            below = len(before)
        popped = self.top(below) if below else []
        del self.items[len(self.items) - below :]
        if op.name == "MARK":
            self.marks.append(len(self.items))
            return
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[int(arg)] = self.items[-1] if self.items else None
        elif op.name == "MEMOIZE":
            self.memo[len(self.memo)] = popped[0]
        pushed: list[str | None] = [None] * len(after)
        if op.name in ("MEMOIZE", "DUP"):
            pushed = popped * len(after)
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = [self.memo.get(int(arg))]
        elif isinstance(arg, str) and after in ([pickletools.pyunicode], [pickletools.pystring]):
            pushed = [arg]
        self.items.extend(pushed)


def _weights_only_globals() -> set[str]:
    """The globals PyTorch's weights-only reader allows (tensor rebuilders, dtypes, OrderedDict):
    a tensor's pickle calls them too. Read from torch's private table when it is there."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):
        return {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"}


def _last_line(message: str) -> str:
    """The error's own words, without torch's advice around them."""
    lines = [line.strip() for line in message.splitlines() if line.strip() and "documentation" not in line]
    return lines[-1][:160] if lines else "unreadable"


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    if (name := non_finite_tensor(state)) is not None:
        raise ModelLoadError(f"{path}: tensor {name!r} holds NaN or Inf; the weights are corrupt")


def _check_batchnorm_variances(state: dict[str, torch.Tensor], path: Path) -> None:
    """A negative running variance makes BatchNorm output NaN from finite weights."""
    for name, t in state.items():
        if name.endswith("running_var") and t.is_floating_point() and bool((t < 0).any()):
            raise ModelLoadError(f"{path}: BatchNorm variance {name!r} is negative; the weights are corrupt")


def load_model(
    path: str | os.PathLike,
    arch: ArchRef | str | None = None,
    arch_kwargs: dict | None = None,
    allow_import: bool = False,
    limits: LoadLimits = DEFAULT_LIMITS,
) -> nn.Module:
    """Rebuild and load a model: from a ccpurify safetensors file alone, or from any weights file
    plus ``arch`` (a zoo name or ``ArchRef``). Returns the model in eval mode.

    Bounded (``limits``): the metadata is checked, the base architecture is built on the meta device
    and its size compared with ``limits.max_params``, and for an unedited model its tensor shapes
    are compared with the file's header, all before any weight is allocated or read."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (a model file, or a run directory where a command accepts one)")
    saved = read_metadata(path, limits) if path.suffix == ".safetensors" else None
    if arch is not None:
        arch_ref = ArchRef(name=arch, kwargs=dict(arch_kwargs or {})) if isinstance(arch, str) else arch
    elif saved is not None:
        arch_ref = saved.arch
    else:
        raise ModelLoadError(f"{path}: plain weights carry no architecture; pass arch= (--arch NAME) to load them")
    with torch.device("meta"):
        skeleton = arch_ref.build(allow_import=allow_import)
    limits.check_params(
        sum(t.numel() for t in skeleton.state_dict().values()),
        f"{path}: architecture {arch_ref.name or arch_ref.import_path}{arch_ref.kwargs or ''}",
    )
    if path.suffix == ".safetensors" and not (saved and saved.edits):
        _check_fits(
            path, arch_ref, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, declared_shapes(path)
        )
    del skeleton
    state = load_weights(path, limits)
    model = arch_ref.build(allow_import=allow_import)
    if saved is not None and saved.edits:
        try:
            model = replay_edits(model, saved.edits, torch.zeros(saved.input_shape or (1, 3, 32, 32)))
        except ModelLoadError:
            raise
        except Exception as exc:  # a damaged recipe fails inside the replayers in many ways
            raise ModelLoadError(
                f"{path}: the recorded edits do not apply to {arch_ref.name or arch_ref.import_path} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); the file is damaged"
            ) from exc
    _check_fits(
        path,
        arch_ref,
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in state.items()},
    )
    model.load_state_dict(state, strict=True)
    setattr(model, ARCH_ATTR, arch_ref.to_dict())
    setattr(model, EDITS_ATTR, list(saved.edits) if saved is not None else [])
    if saved is not None and saved.input_shape is not None:
        set_input_shape(model, saved.input_shape)
    return model.eval()


def _check_fits(path: Path, arch_ref: ArchRef, expected: dict[str, tuple], got: dict[str, tuple]) -> None:
    missing, unexpected = _diff_keys(expected, got)
    bad = _shape_mismatches(expected, got)
    if missing or unexpected or bad:
        raise ModelLoadError(
            f"{path}: weights do not fit {arch_ref.name or arch_ref.import_path}{arch_ref.kwargs or ''}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatches {bad[:3]}; "
            "check the architecture and its arguments (CLI: --arch, --num-classes, --width)"
        )


def _diff_keys(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def _shape_mismatches(expected: dict[str, tuple], got: dict[str, tuple]) -> list[str]:
    return [f"{k}: file {got[k]} vs architecture {v}" for k, v in expected.items() if k in got and got[k] != v]
