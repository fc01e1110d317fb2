"""Exception types raised by dasktrain.

Every error a user can provoke is one of these, and its message names the
object at fault (store path, array, chunk, row, parameter).  They derive from
the closest built-in type so that ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "ConfigMismatchError",
    "DasktrainError",
    "DataValidationError",
    "DivergenceError",
    "LabelError",
    "MemoryBudgetError",
    "NonFiniteDataError",
    "StoreError",
    "StoreLockedError",
    "StoreNotFoundError",
]


class DasktrainError(Exception):
    """Base class of every error raised by dasktrain."""


class StoreError(DasktrainError, OSError):
    """A dataset or parameter store is missing, unreadable or malformed."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store exists at the given path."""


class StoreLockedError(StoreError):
    """Another trainer holds the write lock of a parameter store."""


class DataValidationError(DasktrainError, ValueError):
    """Arrays given to or found in a dataset do not fit together or the model."""


class LabelError(DataValidationError):
    """Labels do not fit the model (e.g. ``y`` outside ``{0, 1}`` for logistic)."""


class NonFiniteDataError(DataValidationError):
    """A data chunk contains NaN or infinity."""


class ConfigMismatchError(DasktrainError, ValueError):
    """A store was written for a different model, optimizer or feature count."""


class DivergenceError(DasktrainError, FloatingPointError):
    """Training produced a non-finite loss or gradient; the store keeps the last
    good version."""


class MemoryBudgetError(DasktrainError, MemoryError):
    """A fit cannot run within the workers' memory: a plan refused before it
    starts, or workers that stay paused on memory dasktrain cannot release."""
