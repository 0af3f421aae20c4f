"""ccpurify: backdoor defenses as model-compression passes.

A suspect model goes in; a purified network that is physically smaller comes out, ready for ONNX
export and measurement. The public API:

- ``purify(model, method=..., **options)`` and ``PurifyResult``;
- ``passes``: ``Pass``, ``Pipeline``, ``PurifyContext``, ``create``/``list_passes``;
- ``ChannelGraph`` (conv/BN pairing, coupling, physical channel removal) and ``lowrank``;
- ``save_model`` / ``load_model`` (safetensors + replayable edit recipe, never pickle);
- the evaluation harness: ``models``, ``data``, ``attacks``, ``train``, ``metrics``.
"""

from ccpurify import lowrank, models, passes
from ccpurify.graph import ChannelGraph, Coupling, RemovalPolicy
from ccpurify.io import load_model, save_model
from ccpurify.passes import Pass, Pipeline, PurifyContext
from ccpurify.purify import PurifyResult, purify

__version__ = "0.1.0"

__all__ = [
    "ChannelGraph", "Coupling", "Pass", "Pipeline", "PurifyContext", "PurifyResult", "RemovalPolicy", "load_model",
    "lowrank", "models", "passes", "purify", "save_model", "__version__",
]
