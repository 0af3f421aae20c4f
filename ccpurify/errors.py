"""The errors ccpurify raises on purpose: bad input, exceeded limits, missing data.

Every expected failure derives from ``CcpurifyError`` and carries a one-line message that says what
to do. The CLI prints these as one line (exit code 1); anything else is a bug in ccpurify and keeps
its traceback. Each class also derives from the built-in exception that fits, so API callers that
catch ``ValueError``/``TypeError``/``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class CcpurifyError(Exception):
    """An expected failure caused by the input, the options or the environment, not by a bug."""


class InvalidInputError(CcpurifyError, ValueError):
    """An argument, option, model or data set that ccpurify cannot use as given."""


class InvalidTypeError(CcpurifyError, TypeError):
    """An argument of the wrong type."""


class LimitExceededError(InvalidInputError):
    """A file declares sizes beyond a resource limit (``ccpurify.limits``); raise the limit if you trust it."""


class NonFiniteError(CcpurifyError, FloatingPointError):
    """A model computes NaN or Inf, or an option is not a finite number."""


class OutputExistsError(CcpurifyError, FileExistsError):
    """The output path exists; nothing is replaced unless the caller asks (``overwrite=True``, ``--overwrite``)."""


class ModelLoadError(InvalidInputError):
    """A model file cannot be loaded; the message says why and what to do."""


class UnsafeModelError(ModelLoadError):
    """The file would need unpickling arbitrary objects, which can run code."""


class ExportError(CcpurifyError, RuntimeError):
    """Export failed, or an ONNX file cannot be used: unreadable, too large, or it computes
    something other than the model."""
