"""Safe saving and loading of (possibly structurally changed) models. No pickle anywhere.

A saved model is one safetensors file whose metadata holds
- ``arch``: how to build the base network (a zoo name + kwargs, or an import path + kwargs);
- ``edits``: a replayable recipe of structural edits (channels removed, layers factorized), each
  ``{"op": name, ...}`` and replayed by the function registered for ``op`` (``ccpurify.graph``,
  ``ccpurify.lowrank``);
- ``extra``: free JSON (dataset, normalisation, provenance).

Loading rebuilds the base model, replays the edits on its empty weights, then loads the tensors with
``strict=True`` (specs/design.md, "Saving structurally changed models").

Suspect models are hostile input: ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``
only, so a pickle that would run code is refused; non-finite weights are refused too.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ccpurify import models
from ccpurify.atomic import atomic_path

FORMAT = "ccpurify-model"
FORMAT_VERSION = "1"


class ModelLoadError(ValueError):
    """A model file cannot be loaded; the message says why and what to do."""


class UnsafeModelError(ModelLoadError):
    """The file would need unpickling arbitrary objects, which can run code."""


@dataclass(frozen=True)
class ArchRef:
    """How to build the base network: a zoo ``name`` or an ``import_path`` ("pkg.mod:Factory")."""

    name: str | None = None
    kwargs: dict = field(default_factory=dict)
    import_path: str | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.import_path is None):
            raise ValueError("ArchRef needs exactly one of name (a zoo model) or import_path")

    def build(self, allow_import: bool = False) -> nn.Module:
        """Instantiate the base network.

        Import paths come from a file that may be hostile, so they are refused unless the caller
        opts in with ``allow_import=True``; even then the target must be an ``nn.Module`` class.
        """
        if self.name is not None:
            return models.create(self.name, **self.kwargs)
        if not allow_import:
            raise ModelLoadError(
                f"the model names an import path ({self.import_path}); importing code named by a file is off by "
                "default: pass allow_import=True (--allow-import) if you trust it"
            )
        module_name, _, attr = self.import_path.partition(":")
        target = getattr(importlib.import_module(module_name), attr or "")
        if not (isinstance(target, type) and issubclass(target, nn.Module)):
            raise ModelLoadError(f"{self.import_path} is not an nn.Module class")
        return target(**self.kwargs)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> ArchRef:
        return cls(name=data.get("name"), kwargs=dict(data.get("kwargs", {})), import_path=data.get("import_path"))


# A model remembers how it was built and edited, so a pipeline's output can be saved without
# threading the recipe through by hand (attributes survive deepcopy; they are not in state_dict).
ARCH_ATTR = "_ccpurify_arch"
EDITS_ATTR = "_ccpurify_edits"


def arch_of(model: nn.Module) -> ArchRef | None:
    """The base architecture recorded on ``model`` (by ``models.create`` or ``load_model``)."""
    data = getattr(model, ARCH_ATTR, None)
    return ArchRef.from_dict(data) if isinstance(data, dict) else data


def edits_of(model: nn.Module) -> list[dict]:
    """The structural edits applied to ``model`` since it was built from its base architecture."""
    return list(getattr(model, EDITS_ATTR, []))


def set_edits(model: nn.Module, edits: list[dict]) -> None:
    setattr(model, EDITS_ATTR, list(edits))


# Edit replayers: op name -> fn(model, edit, example_inputs) -> model. Registered by graph/lowrank.
EDIT_REPLAYERS: dict[str, Callable[[nn.Module, dict, torch.Tensor], nn.Module]] = {}


def register_edit(op: str):
    def decorate(fn):
        EDIT_REPLAYERS[op] = fn
        return fn

    return decorate


def replay_edits(model: nn.Module, edits: list[dict], example_inputs: torch.Tensor) -> nn.Module:
    """Apply a recipe of structural edits to a freshly built base model."""
    import ccpurify.graph  # noqa: F401  (registers its replayers)
    import ccpurify.lowrank  # noqa: F401

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
    input_shape: tuple[int, ...] = (1, 3, 32, 32)
    extra: dict = field(default_factory=dict)


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    arch: ArchRef | str | None = None,
    edits: list[dict] | None = None,
    input_shape: tuple[int, ...] = (1, 3, 32, 32),
    extra: dict | None = None,
    arch_kwargs: dict | None = None,
) -> Path:
    """Write ``model`` as one safetensors file (atomically) with its architecture and edit recipe.

    ``arch`` and ``edits`` default to what the model records (``arch_of``, ``edits_of``).
    """
    if isinstance(arch, str):
        arch = ArchRef(name=arch, kwargs=dict(arch_kwargs or {}))
    arch = arch or arch_of(model)
    if arch is None:
        raise ValueError("the model records no base architecture: pass arch= (a zoo name or ArchRef)")
    edits = edits_of(model) if edits is None else edits
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": json.dumps(arch.to_dict()),
        "edits": json.dumps(edits or []),
        "input_shape": json.dumps(list(input_shape)),
        "extra": json.dumps(extra or {}, default=str),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(_state_for_saving(model), os.fspath(tmp), metadata=metadata)
    return path


def read_metadata(path: str | os.PathLike) -> SavedModel | None:
    """The ccpurify description stored in a safetensors file, or None for a plain weights file."""
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc}); the file may be corrupt") from exc
    if meta.get("format") != FORMAT:
        return None
    try:
        return SavedModel(
            arch=ArchRef.from_dict(json.loads(meta["arch"])),
            edits=json.loads(meta.get("edits", "[]")),
            input_shape=tuple(json.loads(meta.get("input_shape", "[1, 3, 32, 32]"))),
            extra=json.loads(meta.get("extra", "{}")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: damaged ccpurify metadata ({exc})") from exc


_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a ``.pt``/``.pth``/``.bin`` file read with
    ``torch.load(weights_only=True)``; anything that would need unpickling code is refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(os.fspath(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc}); the file may be corrupt") from exc
    else:
        state = _torch_load_weights_only(path)
    _check_finite(state, path)
    return state


def _torch_load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeModelError(
            f"{path}: refused: the pickle holds objects other than tensors ({str(exc).splitlines()[0][:160]}). "
            "Loading it could run code. Re-save a plain state_dict or safetensors on a machine you trust"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable PyTorch weights file ({str(exc)[:160]}); the file may be corrupt") from exc
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path}: expected a state_dict (names -> tensors), found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def non_finite_tensor(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor that holds NaN or Inf, or None."""
    return next((name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    if (name := non_finite_tensor(state)) is not None:
        raise ModelLoadError(f"{path}: tensor {name!r} holds NaN or Inf; the weights are corrupt")


def load_model(
    path: str | os.PathLike,
    arch: ArchRef | str | None = None,
    arch_kwargs: dict | None = None,
    allow_import: bool = False,
) -> nn.Module:
    """Rebuild and load a model: from a ccpurify safetensors file alone, or from any weights file
    plus ``arch`` (a zoo name or ``ArchRef``). Returns the model in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (a model file, or a run directory where a command accepts one)")
    saved = read_metadata(path) if path.suffix == ".safetensors" else None
    if arch is not None:
        arch_ref = ArchRef(name=arch, kwargs=dict(arch_kwargs or {})) if isinstance(arch, str) else arch
    elif saved is not None:
        arch_ref = saved.arch
    else:
        raise ModelLoadError(f"{path}: plain weights carry no architecture; pass arch= (--arch NAME) to load them")
    state = load_weights(path)
    model = arch_ref.build(allow_import=allow_import)
    if saved is not None and saved.edits:
        model = replay_edits(model, saved.edits, torch.zeros(saved.input_shape))
    missing, unexpected = _diff_keys(model.state_dict(), state)
    if missing or unexpected or _shape_mismatches(model.state_dict(), state):
        bad = _shape_mismatches(model.state_dict(), state)
        raise ModelLoadError(
            f"{path}: weights do not fit {arch_ref.name or arch_ref.import_path}{arch_ref.kwargs or ''}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatches {bad[:3]}; "
            "check --arch, --num-classes and --width"
        )
    model.load_state_dict(state, strict=True)
    setattr(model, ARCH_ATTR, arch_ref.to_dict())
    setattr(model, EDITS_ATTR, list(saved.edits) if saved is not None else [])
    return model.eval()


def _diff_keys(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def _shape_mismatches(expected: dict, got: dict) -> list[str]:
    return [
        f"{k}: {tuple(got[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
