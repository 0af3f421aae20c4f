"""Model zoo: CIFAR-sized classifiers, created by name (timm style).

>>> from ccpurify import models
>>> net = models.create("preact_resnet18", num_classes=10, width=0.25)
>>> models.list_models("*resnet*")
['preact_resnet18', 'resnet18']

Every factory takes ``num_classes`` and ``width`` (a channel multiplier; 1.0 is the published width).
"""

from __future__ import annotations

from torch import nn

from ccpurify.models.registry import MODELS, register_model
from ccpurify.recipe import ARCH_ATTR
from ccpurify.registry import UnknownNameError


def create(name: str, **kwargs) -> nn.Module:
    """Build zoo model ``name``; keyword arguments go to its factory (``num_classes``, ``width``...).

    The model records how it was built (``ccpurify.io.arch_of``), so it can be saved by name.
    """
    model = MODELS.create(name, **kwargs)
    setattr(model, ARCH_ATTR, {"name": name, "kwargs": dict(kwargs)})
    return model


def list_models(pattern: str = "*") -> list[str]:
    """Zoo names matching a shell wildcard."""
    return MODELS.list(pattern)


# Importing the modules registers their factories.
from ccpurify.models import mobilenet_v2, preact_resnet, resnet, vgg  # noqa: E402,F401

__all__ = ["MODELS", "UnknownNameError", "create", "list_models", "register_model"]
