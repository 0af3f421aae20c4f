"""ccpurify: backdoor defenses as model-compression passes.

A suspect model goes in; a purified network that is physically smaller comes out, ready for ONNX
export and measurement. The public API:

- ``purify(model, method=..., **options)`` and ``PurifyResult``; ``plan`` (the same checks, a time estimate, no run);
- ``passes``: ``Pass``, ``Pipeline``, ``PurifyContext``, ``create``/``list_passes``;
- ``ChannelGraph`` (conv/BN pairing, coupling, physical channel removal) and ``lowrank``;
- ``save_model`` / ``load_model`` (safetensors + replayable edit recipe, never pickle), ``ArchRef``;
- the evaluation harness: ``models``, ``data``, ``attacks``, ``train``, ``metrics``.

Names load on first use (PEP 562), so ``import ccpurify.errors`` or ``exporters.latency`` on a
device with only onnxruntime and numpy does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (a module path alone: the name is that module)
_EXPORTS = {
    "ArchRef": "ccpurify.recipe",
    "ChannelGraph": "ccpurify.graph",
    "Coupling": "ccpurify.graph",
    "Pass": "ccpurify.passes",
    "Pipeline": "ccpurify.passes",
    "PurifyContext": "ccpurify.passes",
    "PurifyResult": "ccpurify.api",
    "RemovalPolicy": "ccpurify.graph",
    "load_model": "ccpurify.io",
    "plan": "ccpurify.api",
    "purify": "ccpurify.api",
    "save_model": "ccpurify.io",
}
_MODULES = {"lowrank", "models", "passes"}

__all__ = [
    "ArchRef",
    "ChannelGraph",
    "Coupling",
    "Pass",
    "Pipeline",
    "PurifyContext",
    "PurifyResult",
    "RemovalPolicy",
    "__version__",
    "load_model",
    "lowrank",
    "models",
    "passes",
    "plan",
    "purify",
    "save_model",
]
assert set(__all__) == {*_EXPORTS, *_MODULES, "__version__"}

if TYPE_CHECKING:
    from ccpurify import lowrank, models, passes
    from ccpurify.api import PurifyResult, plan, purify
    from ccpurify.graph import ChannelGraph, Coupling, RemovalPolicy
    from ccpurify.io import load_model, save_model
    from ccpurify.passes import Pass, Pipeline, PurifyContext
    from ccpurify.recipe import ArchRef


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"ccpurify.{name}")
    if name in _EXPORTS:
        importlib.import_module("ccpurify.models")  # the zoo fills the architecture registry
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ccpurify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
