"""The one error family of eexit.

Every error eexit raises on purpose is an :class:`EexitError`. Where Python has a matching built-in
(a wrong value, a wrong type), the error also subclasses it, so ``except ValueError`` keeps working in
user code that does not know about eexit. Messages say what was expected, what came, and the fix.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "BackboneError",
    "EexitError",
    "EexitTypeError",
    "EexitValueError",
    "TrainingError",
]


class EexitError(Exception):
    """Base class of every error raised by eexit."""


class EexitValueError(EexitError, ValueError):
    """An argument or an input has the right type but a value eexit cannot use."""


class EexitTypeError(EexitError, TypeError):
    """An argument or an input has a type eexit cannot use."""


class BackboneError(EexitValueError):
    """The model cannot be used as a backbone: no spec matches it, or its structure is not as expected."""


class TrainingError(EexitError, RuntimeError):
    """Training had to stop (for example a non-finite loss); the last good adapter state was kept."""


class AdapterError(EexitValueError):
    """An adapter (saved exits) cannot be loaded onto this model, or its files are unreadable."""


class SegmentsUnavailable(BackboneError):
    """The model cannot be run as segments, so neither compiled per segment nor exported; the message says why."""
