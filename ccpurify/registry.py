"""A small timm-style registry: register factories by name, create by name, list by wildcard.

The same class serves the model zoo (``ccpurify.models``), the attacks (``ccpurify.attacks``) and the
passes (``ccpurify.passes``), so every pluggable thing in the toolkit is found the same way.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from ccpurify.errors import CcpurifyError, InvalidInputError

T = TypeVar("T")


class UnknownNameError(CcpurifyError, KeyError):
    """Raised when a name is not registered; the message lists what is."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a plain sentence.
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factory callables.

    >>> zoo = Registry[object]("model")
    >>> @zoo.register
    ... def tiny(**kwargs): return dict(kwargs)
    >>> zoo.create("tiny", width=2)
    {'width': 2}
    """

    def __init__(self, kind: str, providers: tuple[str, ...] = ()) -> None:
        """``providers``: modules that register the built-in entries, imported on the first lookup,
        so a registry defined in the core is filled by the package that owns the entries."""
        self.kind = kind
        self.providers = providers
        self._factories: dict[str, Callable[..., T]] = {}

    def _load_providers(self) -> None:
        for module in self.providers:
            importlib.import_module(module)

    def register(self, factory: Callable[..., T] | None = None, *, name: str | None = None):
        """Register ``factory`` under ``name`` (default: the function's ``__name__``)."""

        def decorate(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._factories and self._factories[key] is not fn:
                raise InvalidInputError(f"{self.kind} {key!r} is already registered")
            self._factories[key] = fn
            return fn

        return decorate(factory) if factory is not None else decorate

    def get(self, name: str) -> Callable[..., T]:
        self._load_providers()
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def create(self, name: str, **kwargs) -> T:
        """Build the object registered as ``name`` with keyword arguments ``kwargs``."""
        return self.get(name)(**kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell wildcard, sorted."""
        self._load_providers()
        return sorted(n for n in self._factories if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._load_providers()
        return name in self._factories
