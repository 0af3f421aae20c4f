"""The zoo's registry: the core's ``ARCHITECTURES`` (``ccpurify.recipe``), filled by the model modules,
so a saved model can be rebuilt by name."""

from __future__ import annotations

from torch import nn

from ccpurify.recipe import ARCHITECTURES
from ccpurify.registry import Registry

MODELS: Registry[nn.Module] = ARCHITECTURES
register_model = MODELS.register
