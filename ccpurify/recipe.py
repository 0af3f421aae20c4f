"""How a model is made: its base architecture (``ArchRef``) and the structural edits applied since.

A leaf of the core. A model carries both on itself (attributes that survive ``deepcopy``), so a
pipeline's output can be saved (``ccpurify.io``) and rebuilt without pickle: the base network is
built by name from ``ARCHITECTURES`` (which the model zoo, ``ccpurify.models``, fills) or from an
import path, then each edit is replayed by the function registered for its ``op`` (``graph`` and
``lowrank`` register theirs with ``register_edit``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ccpurify.errors import InvalidInputError, ModelLoadError
from ccpurify.registry import Registry

# Built-in names are the model zoo's (the harness registers them when first asked for a name).
ARCHITECTURES: Registry[nn.Module] = Registry("model", providers=("ccpurify.models",))

# A model remembers how it was built and edited (attributes survive deepcopy; not in state_dict).
ARCH_ATTR = "_ccpurify_arch"
EDITS_ATTR = "_ccpurify_edits"
INPUT_SHAPE_ATTR = "_ccpurify_input_shape"  # the example input its edits were traced on (set when loaded)


@dataclass(frozen=True)
class ArchRef:
    """How to build the base network: a zoo ``name`` or an ``import_path`` ("pkg.mod:Factory")."""

    name: str | None = None
    kwargs: dict = field(default_factory=dict)
    import_path: str | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.import_path is None):
            raise InvalidInputError("ArchRef needs exactly one of name (a zoo model) or import_path")

    def build(self, allow_import: bool = False) -> nn.Module:
        """Instantiate the base network.

        Import paths come from a file that may be hostile, so they are refused unless the caller
        opts in with ``allow_import=True``; even then the target must be an ``nn.Module`` class.
        Kwargs the architecture does not take are a ``ModelLoadError``.
        """
        try:
            return self._build(allow_import)
        except (TypeError, ValueError, KeyError, AttributeError, ImportError) as exc:
            if isinstance(exc, ModelLoadError):
                raise
            what = self.name or self.import_path
            raise ModelLoadError(f"cannot build {what} with {self.kwargs}: {str(exc).splitlines()[0][:200]}") from exc

    def _build(self, allow_import: bool) -> nn.Module:
        if self.name is not None:
            model = ARCHITECTURES.create(self.name, **self.kwargs)
            setattr(model, ARCH_ATTR, self.to_dict())
            return model
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
        """From JSON that may be hostile: every field is type-checked (``ModelLoadError`` otherwise)."""
        if not isinstance(data, dict):
            raise ModelLoadError(f"the architecture must be a JSON object, got {type(data).__name__}")
        name, import_path, kwargs = data.get("name"), data.get("import_path"), data.get("kwargs", {})
        if not all(v is None or isinstance(v, str) for v in (name, import_path)) or (name is None) == (
            import_path is None
        ):
            raise ModelLoadError("the architecture needs exactly one of name or import_path, as a string")
        if not isinstance(kwargs, dict) or not all(_plain_json(v) for v in kwargs.values()):
            raise ModelLoadError(
                f"the architecture's kwargs must be a JSON object of numbers, strings and lists, got {kwargs!r:.120}"
            )
        return cls(name=name, kwargs=dict(kwargs), import_path=import_path)


def _plain_json(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain_json(v) for v in value)
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    return value is None or isinstance(value, (bool, int, str))


def import_path_arch(model: nn.Module) -> ArchRef:
    """``module:Class`` of a user's model, when a loader can import the class and build it without
    arguments; otherwise an ``InvalidInputError`` that says what to pass."""
    cls = type(model)
    path = f"{cls.__module__}:{cls.__qualname__}"
    how = "pass arch=ccpurify.ArchRef(import_path='package.module:Class', kwargs={...}) (or a zoo name)"
    if cls.__module__ == "__main__" or "." in cls.__qualname__:
        raise InvalidInputError(
            f"the model records no base architecture and {cls.__qualname__} is defined in a script or inside "
            f"another object, where a loader cannot import it: move it into a module and {how}"
        )
    try:
        required = [
            p.name
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    except (TypeError, ValueError):
        required = []
    if required:
        raise InvalidInputError(
            f"the model records no base architecture and {cls.__name__}() needs arguments ({', '.join(required)}): "
            f"pass arch=ccpurify.ArchRef(import_path={path!r}, kwargs={{...}}) with them"
        )
    return ArchRef(import_path=path)


def arch_of(model: nn.Module) -> ArchRef | None:
    """The base architecture recorded on ``model`` (by ``models.create`` or ``load_model``)."""
    data = getattr(model, ARCH_ATTR, None)
    return ArchRef.from_dict(data) if isinstance(data, dict) else data


def edits_of(model: nn.Module) -> list[dict]:
    """The structural edits applied to ``model`` since it was built from its base architecture."""
    return list(getattr(model, EDITS_ATTR, []))


def set_edits(model: nn.Module, edits: list[dict]) -> None:
    setattr(model, EDITS_ATTR, list(edits))


def input_shape_of(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape ``model`` records (a loaded model file's), batch first, or None."""
    shape = getattr(model, INPUT_SHAPE_ATTR, None)
    return tuple(shape) if shape is not None else None


def set_input_shape(model: nn.Module, shape: tuple[int, ...]) -> None:
    setattr(model, INPUT_SHAPE_ATTR, tuple(int(d) for d in shape))


# Edit replayers: op name -> fn(model, edit, example_inputs) -> model. Registered by graph/lowrank.
EDIT_REPLAYERS: dict[str, Callable[[nn.Module, dict, torch.Tensor], nn.Module]] = {}


def register_edit(op: str):
    def decorate(fn):
        EDIT_REPLAYERS[op] = fn
        return fn

    return decorate
