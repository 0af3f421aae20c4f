"""Resource limits for files that may be hostile: what a model file may make ccpurify allocate or do.

A suspect model is untrusted input (docs/design.md, "Hostile inputs"), so nothing it declares
(architecture kwargs, recorded input shape, edit recipe, header size) may decide how much memory or
time the tool spends before it is checked against these bounds. The defaults admit every zoo and
torchvision-scale CNN (ResNet-152 has 60 M parameters) with room to spare and keep a refused file
within about 2 GB and a few seconds; raise them for a file you trust:

>>> load_model(path, limits=LoadLimits(max_params=1_000_000_000))       # API
$ ccpurify purify big.safetensors --max-params 1000000000               # CLI
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ccpurify.errors import InvalidInputError, LimitExceededError


@dataclass(frozen=True)
class LoadLimits:
    """Upper bounds checked before anything a model file declares is allocated or run."""

    max_params: int = 200_000_000  # parameters of the (base) architecture: 800 MB in float32
    max_input_elements: int = 3 * 1024 * 1024  # elements of the recorded example input (3x1024x1024)
    max_edits: int = 1_000  # structural edits replayed on load (a default pipeline records < 100)
    max_header_bytes: int = 16 << 20  # safetensors JSON header, metadata included

    def check_params(self, count: int, what: str) -> None:
        if count > self.max_params:
            raise LimitExceededError(
                f"{what} declares {count:,} parameters, above the limit of {self.max_params:,}; if you trust the file, "
                "raise it (LoadLimits(max_params=...), CLI --max-params)"
            )

    def check_input_shape(self, shape: Sequence[int], what: str) -> tuple[int, ...]:
        """``shape`` as a tuple once it is a plausible single example input (N, C, ...)."""
        if not (
            isinstance(shape, (list, tuple))
            and 2 <= len(shape) <= 5
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        ):
            raise InvalidInputError(
                f"{what}: input shape {shape!r} is not 2 to 5 positive integers (batch, channels, ...)"
            )
        if shape[0] != 1:
            raise InvalidInputError(f"{what}: the recorded example input {list(shape)} must have batch 1")
        if math.prod(shape) > self.max_input_elements:
            raise LimitExceededError(
                f"{what}: input shape {list(shape)} has {math.prod(shape):,} elements, above the limit of "
                f"{self.max_input_elements:,}; if you trust the file, raise LoadLimits(max_input_elements=...)"
            )
        return tuple(shape)

    def check_edits(self, count: int, what: str) -> None:
        if count > self.max_edits:
            raise LimitExceededError(
                f"{what} records {count:,} structural edits, above the limit of {self.max_edits:,}; if you trust the "
                "file, raise LoadLimits(max_edits=...)"
            )


DEFAULT_LIMITS = LoadLimits()
