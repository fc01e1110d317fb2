"""The optimizer interface (pure NumPy, optax-like).

An optimizer is an immutable configuration with two pure functions:

* ``init(params) -> state``: a flat ``dict[str, np.ndarray]`` (keys like
  ``"mu.w"`` or ``"count"``; never ``/``), so that state maps one-to-one onto
  arrays of a parameter store;
* ``update(grads, state, params) -> (updates, state)``: ``updates`` is added
  to ``params`` by :func:`apply_updates`.

``grads`` are *mean* gradients including the regularization term.
Step-by-step optimizers (SGD, Adam, ...) have ``full_batch_only = False``;
:class:`~dasktrain.optim.LBFGS` drives its own line search over full passes.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "OptState",
    "Optimizer",
    "Params",
    "advance_counts",
    "apply_updates",
    "is_count",
    "optimizer_from_config",
    "register",
]

Params = dict[str, np.ndarray]
OptState = dict[str, np.ndarray]

_REGISTRY: dict[str, type[Optimizer]] = {}


def register(cls: type[Optimizer]) -> type[Optimizer]:
    _REGISTRY[cls.kind] = cls
    return cls


def optimizer_from_config(config: Mapping[str, Any]) -> Optimizer:
    """Rebuild an optimizer from :meth:`Optimizer.config` (JSON data, no code)."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in _REGISTRY:
        # Registered when their modules are imported: all of them are by the
        # package (``import dasktrain`` does not import it by itself).
        importlib.import_module("dasktrain.optim")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown optimizer type {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind].from_config(cfg)


def apply_updates(
    params: Mapping[str, np.ndarray], updates: Mapping[str, np.ndarray]
) -> Params:
    """``params + updates``, name by name."""
    return {k: np.asarray(params[k] + updates[k], dtype=np.float64) for k in params}


def is_count(value: np.ndarray) -> bool:
    """Whether a state entry is a step counter (the chain members' 0-d int64
    ``"count"`` entries); every other entry is a float array."""
    return np.asarray(value).dtype.kind in "iu"


def advance_counts(state: Mapping[str, np.ndarray], n_steps: int) -> OptState:
    """``state`` with every step counter (see :func:`is_count`) advanced by
    ``n_steps``; other entries are returned unchanged.

    Local SGD averages the float state of its workers' optimizers and moves
    the counters on by the round's local steps, so learning-rate schedules
    count local steps.

    Examples
    --------
    >>> state = {"0.count": np.zeros((), dtype=np.int64), "0.mu.w": np.ones(2)}
    >>> new = advance_counts(state, 5)
    >>> int(new["0.count"]), new["0.mu.w"]
    (5, array([1., 1.]))
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    return {
        k: np.asarray(v + n_steps, dtype=np.asarray(v).dtype) if is_count(v) else v
        for k, v in state.items()
    }


class Optimizer(ABC):
    kind: ClassVar[str]
    full_batch_only: ClassVar[bool] = False

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serializable configuration with ``"type": self.kind``."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Optimizer:
        return cls(**config)

    @abstractmethod
    def init(self, params: Mapping[str, np.ndarray]) -> OptState: ...

    @abstractmethod
    def update(
        self,
        grads: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        params: Mapping[str, np.ndarray],
    ) -> tuple[Params, OptState]: ...

    def learning_rate_at(self, step: int) -> float:
        """The learning rate used at optimizer step ``step`` (0-based)."""
        return float("nan")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Optimizer)
            and type(other) is type(self)
            and (other.config() == self.config())
        )

    def __hash__(self) -> int:
        return hash(repr(self.config()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"
