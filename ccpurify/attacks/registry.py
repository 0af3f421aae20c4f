"""The registry of attacks: every ``Attack`` subclass registers itself by ``name``."""

from __future__ import annotations

from ccpurify.registry import Registry

ATTACKS: Registry = Registry("attack")


def register_attack(cls):
    ATTACKS.register(cls, name=cls.name)
    return cls
