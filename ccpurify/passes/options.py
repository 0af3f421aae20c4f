"""Checking a pass's options against its dataclass fields before the pass is built.

Options often arrive as text (``--set u=abc``, a JSON config), so an unknown name, a value of the
wrong type or a NaN would otherwise surface as a traceback deep inside the pass, or worse, as a run
that ends with exit code 0 and a meaningless model. Every check here names the option and what it takes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from enum import Enum
from typing import Any

from ccpurify.errors import InvalidInputError, NonFiniteError


def check_options(cls: type, options: dict[str, Any], name: str) -> None:
    """Refuse options that ``cls`` (a dataclass pass) does not take, of the wrong type, or not finite."""
    if not dataclasses.is_dataclass(cls):
        return
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(key) for key in set(options) - fields)
    if unknown:
        raise InvalidInputError(
            f"pass {name!r} has no option {', '.join(unknown)}; its options: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        _check_value(name, key, value, hints.get(key, Any))


def _check_value(name: str, key: str, value: Any, hint: Any) -> None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            finite = math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise NonFiniteError(f"option {key}={str(value)[:40]} of pass {name!r} is not a finite number")
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if any(_accepts(t, value) for t in allowed):
        return
    raise InvalidInputError(f"option {key} of pass {name!r} takes {_describe(allowed)}, got {value!r}")


def _accepts(t: Any, value: Any) -> bool:
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:  # numpy integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if t is str:
        return isinstance(value, str)
    if isinstance(t, type) and issubclass(t, Enum):
        return isinstance(value, t) or (isinstance(value, (str, int, float)) and value in {m.value for m in t})
    if typing.get_origin(t) is typing.Literal:
        return value in typing.get_args(t)
    if t in (tuple, list) or typing.get_origin(t) in (tuple, list):
        return isinstance(value, (tuple, list)) and all(_accepts(item, v) for v in value for item in _items(t))
    if t is dict or typing.get_origin(t) is dict:
        return isinstance(value, dict)
    if isinstance(t, type) and not isinstance(value, (int, float, str, bool, type(None))):
        return isinstance(value, t)  # a pass, a module: the class it must be
    if isinstance(t, type) and t.__module__.startswith(("ccpurify", "torch")):
        return False  # text or a number where a pass or a module is needed
    return True  # other containers and callables: the pass checks these itself


def _items(t: Any) -> tuple:
    """The type every item of a ``list[X]`` or ``tuple[X, ...]`` must have (nothing for other sequences)."""
    args = typing.get_args(t)
    if typing.get_origin(t) is list and len(args) == 1:
        return args
    if typing.get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[:1]
    return ()


def _describe(allowed: tuple) -> str:
    def one(t: Any) -> str:
        if t is type(None):
            return "null"
        if isinstance(t, type) and issubclass(t, Enum):
            return "one of " + "/".join(str(m.value) for m in t)
        if _items(t):
            return f"a list of {one(_items(t)[0])}"
        return getattr(t, "__name__", str(t))

    return " or ".join(one(t) for t in allowed)
