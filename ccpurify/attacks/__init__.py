"""Backdoor attacks for the evaluation harness (docs/protocol.md, "Attacks").

>>> from ccpurify import attacks
>>> attack = attacks.create("badnets", target=0, poison_ratio=0.1, seed=0)
>>> poisoned = attack.poison(train_images, train_labels)      # PoisonedSet(images, labels, indices)
>>> asr_images, true_labels = attack.test_set(test_images, test_labels)
>>> attacks.list_attacks()
['badnets', 'blended', 'input_aware', 'lf', 'sig', 'wanet']
"""

from __future__ import annotations

import torch

from ccpurify.attacks.registry import ATTACKS, register_attack
from ccpurify.registry import UnknownNameError


def create(name: str, **kwargs):
    """Build attack ``name`` (target=, poison_ratio=, seed= and trigger options)."""
    return ATTACKS.create(name, **kwargs)


def list_attacks(pattern: str = "*") -> list[str]:
    return ATTACKS.list(pattern)


def from_recipe(recipe: dict, tensors: dict[str, torch.Tensor]):
    """Rebuild an attack from ``attack.recipe()`` and ``attack.tensors()``."""
    cls = ATTACKS.get(recipe["name"])
    kwargs = dict(
        target=recipe["target"], poison_ratio=recipe["poison_ratio"], seed=recipe["seed"], **recipe.get("params", {})
    )
    return cls.from_tensors(tensors, **kwargs)


from ccpurify.attacks import additive, badnets, blended, input_aware, wanet  # noqa: E402,F401
from ccpurify.attacks.additive import LF, SIG  # noqa: E402
from ccpurify.attacks.badnets import BadNets  # noqa: E402
from ccpurify.attacks.base import Attack, BatchPoisoner, PoisonedSet  # noqa: E402
from ccpurify.attacks.blended import Blended  # noqa: E402
from ccpurify.attacks.input_aware import InputAware  # noqa: E402
from ccpurify.attacks.wanet import WaNet  # noqa: E402

__all__ = [
    "ATTACKS",
    "LF",
    "SIG",
    "Attack",
    "BadNets",
    "BatchPoisoner",
    "Blended",
    "InputAware",
    "PoisonedSet",
    "UnknownNameError",
    "WaNet",
    "create",
    "from_recipe",
    "list_attacks",
    "register_attack",
]
