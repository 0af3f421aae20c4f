"""The registry of passes: every ``Pass`` subclass registers itself by ``name`` (timm style)."""

from __future__ import annotations

from ccpurify.registry import Registry

PASSES: Registry = Registry("pass")


def register_pass(cls):
    """Class decorator: register a ``Pass`` subclass under its ``name``."""
    PASSES.register(cls, name=cls.name)
    return cls
