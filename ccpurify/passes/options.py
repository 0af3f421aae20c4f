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
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

from ccpurify.errors import InvalidInputError, NonFiniteError

# The largest integer option (epochs, steps, images, sample-steps): larger ones are a typo or a hostile
# config, and would run for years or overflow a size computation.
MAX_COUNT = 10**9


@dataclass(frozen=True)
class Range:
    """The interval a numeric option must lie in (``Annotated[float, Range(...)]`` on a pass field)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# Option types with their ranges, checked by check_option_values when a pass is built.
PositiveFloat = Annotated[float, Range(0.0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0.0)]
Fraction = Annotated[float, Range(0.0, 1.0)]  # [0, 1]
FractionBelowOne = Annotated[float, Range(0.0, 1.0, high_open=True)]  # [0, 1)
Momentum = FractionBelowOne  # at 1 SGD never forgets a gradient
PositiveFraction = Annotated[float, Range(0.0, 1.0, low_open=True)]  # (0, 1]
OpenFraction = Annotated[float, Range(0.0, 1.0, low_open=True, high_open=True)]  # (0, 1)
# A distillation temperature: below 0.1 the T^2-scaled loss vanishes (or its logits / T overflow).
Temperature = Annotated[float, Range(0.1, 1000.0)]
Count = Annotated[int, Range(1)]  # and at most MAX_COUNT, as every integer option
NonNegativeCount = Annotated[int, Range(0)]


def check_option_names(cls: type, options: dict[str, Any], name: str) -> None:
    """Refuse options that ``cls`` (a dataclass pass) does not take, naming the ones it does (the
    constructor would raise a bare ``TypeError``)."""
    if not dataclasses.is_dataclass(cls):
        return
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(key) for key in set(options) - fields)
    if unknown:
        raise InvalidInputError(
            f"pass {name!r} has no option {', '.join(unknown)}; its options: {', '.join(sorted(fields))}"
        )


def check_option_values(cls: type, options: dict[str, Any], name: str) -> None:
    """Refuse option values of the wrong type, out of their field's ``Range`` or not finite (what
    ``Pass.__post_init__`` runs on every pass, however it was built)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for key, value in options.items():
        _check_value(name, key, value, hints.get(key, Any))


def _check_value(name: str, key: str, value: Any, hint: Any) -> None:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if number and not isinstance(value, numbers.Integral) and not _finite(value):
        raise NonFiniteError(f"option {key}={_shown(value)} of pass {name!r} is not a finite number")
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for t in allowed:
        base, ranges = _unwrap(t)
        if not _accepts(base, value):
            continue
        if number and base is float and not _finite(value):  # an integer too large for a float
            raise InvalidInputError(f"option {key} of pass {name!r} is too large, got {_shown(value)}")
        broken = [r.describe() for r in ranges if number and not r.holds(value)]
        if not broken and number and base is int and abs(value) > MAX_COUNT:
            broken = [f"at most {MAX_COUNT:.0e}"]
        if broken:
            raise InvalidInputError(f"option {key} of pass {name!r} must be {broken[0]}, got {_shown(value)}")
        _check_items(name, key, value, base)
        return
    raise InvalidInputError(f"option {key} of pass {name!r} takes {_describe(allowed)}, got {_shown(value)}")


def _check_items(name: str, key: str, value: Any, hint: Any) -> None:
    """Each number of a list option lies in the ``Range`` of its item type (``tuple[OpenFraction, ...]``)."""
    if not isinstance(value, (list, tuple)) or not _items(hint):
        return
    ranges = _unwrap(_items(hint)[0])[1]
    for item in value:
        if isinstance(item, numbers.Real) and not isinstance(item, bool):
            broken = [r.describe() for r in ranges if not r.holds(item)]
            if broken:
                raise InvalidInputError(
                    f"each entry of option {key} of pass {name!r} must be {broken[0]}, got {_shown(item)}"
                )


def _shown(value: Any) -> str:
    """``value`` for a one-line message: long numbers (a 400-digit ``--set``) by their length."""
    text = repr(value)
    if len(text) <= 40:
        return text
    if isinstance(value, numbers.Integral):
        return f"an integer of {len(str(abs(int(value))))} digits"
    return text[:37] + "..."


def plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (what JSON configs and ``save_model`` take);
    anything else unchanged."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _unwrap(t: Any) -> tuple[Any, list[Range]]:
    """``Annotated[X, Range(...)]`` -> (X, its ranges); any other type -> (it, [])."""
    if typing.get_origin(t) is Annotated:
        base, *extras = typing.get_args(t)
        return base, [e for e in extras if isinstance(e, Range)]
    return t, []


def _accepts(t: Any, value: Any) -> bool:
    t = _unwrap(t)[0]
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
        t, ranges = _unwrap(t)
        if ranges:
            return f"{one(t)} {' and '.join(r.describe() for r in ranges)}"
        if t is type(None):
            return "null"
        if isinstance(t, type) and issubclass(t, Enum):
            return "one of " + "/".join(str(m.value) for m in t)
        if _items(t):
            return f"a list of {one(_items(t)[0])}"
        return getattr(t, "__name__", str(t))

    return " or ".join(one(t) for t in allowed)
