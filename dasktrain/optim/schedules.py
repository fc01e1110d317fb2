"""Learning-rate schedules (pure Python, JSON-configurable).

A schedule is a frozen dataclass mapping a 0-based optimizer step to a float:
``schedule(step) -> float``.  ``schedule.config()`` returns JSON data with a
``"type"`` key, and :func:`schedule_from_config` rebuilds an equal schedule,
so schedules can be written to a parameter store and read back.

Examples
--------
>>> from dasktrain.optim.schedules import ExponentialDecay, schedule_from_config
>>> sched = ExponentialDecay(init_value=0.1, decay_rate=0.5, decay_steps=10)
>>> round(sched(10), 6)
0.05
>>> schedule_from_config(sched.config()) == sched
True
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import pairwise
from typing import Any, ClassVar

__all__ = [
    "Constant",
    "CosineDecay",
    "ExponentialDecay",
    "Schedule",
    "StepDecay",
    "WarmupCosine",
    "as_schedule",
    "schedule_from_config",
]

_SCHEDULES: dict[str, type[Schedule]] = {}


# -- argument checks shared by the optim package -----------------------------
def _check_real(name: str, value: object) -> float:
    """``value`` as a finite float, or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _check_nonnegative(name: str, value: object) -> float:
    out = _check_real(name, value)
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


def _check_positive(name: str, value: object) -> float:
    out = _check_real(name, value)
    if out <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def _check_unit_interval(name: str, value: object) -> float:
    """A float in ``[0, 1)``."""
    out = _check_real(name, value)
    if not 0.0 <= out < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return out


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    out = int(value)
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer, got {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    return int(step)


# -- the interface -----------------------------------------------------------
def _register(cls: type[Schedule]) -> type[Schedule]:
    _SCHEDULES[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class Schedule(ABC):
    """Base class: a function of the 0-based step, with a JSON configuration."""

    kind: ClassVar[str]

    def __call__(self, step: int) -> float:
        """The value at optimizer step ``step`` (0-based, ``step >= 0``)."""
        return self._value(_check_step(step))

    @abstractmethod
    def _value(self, step: int) -> float: ...

    def config(self) -> dict[str, Any]:
        """JSON-serializable configuration with ``"type": self.kind``."""
        out: dict[str, Any] = {"type": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.config` output.

    Examples
    --------
    >>> schedule_from_config({"type": "Constant", "value": 0.1})
    Constant(value=0.1)
    """
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in _SCHEDULES:
        raise ValueError(f"unknown schedule type {kind!r}; known: {sorted(_SCHEDULES)}")
    return _SCHEDULES[kind](**cfg)


def as_schedule(value: float | Schedule) -> Schedule:
    """A schedule as is; a number as :class:`Constant`.

    Examples
    --------
    >>> as_schedule(0.5)(100)
    0.5
    """
    if isinstance(value, Schedule):
        return value
    return Constant(_check_nonnegative("learning_rate", value))


# -- schedules ---------------------------------------------------------------
@_register
@dataclass(frozen=True)
class Constant(Schedule):
    """``value`` at every step.

    Examples
    --------
    >>> Constant(0.1)(7)
    0.1
    """

    kind: ClassVar[str] = "Constant"
    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _check_nonnegative("value", self.value))

    def _value(self, step: int) -> float:
        return self.value


@_register
@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    r"""Exponential decay.

    .. math::

        \eta_t = \eta_0 \, r^{t / T}
        \quad (\text{or } r^{\lfloor t / T \rfloor} \text{ if staircase})

    with ``init_value`` :math:`\eta_0`, ``decay_rate`` :math:`r` and
    ``decay_steps`` :math:`T`.

    Examples
    --------
    >>> sched = ExponentialDecay(1.0, 0.1, 10, staircase=True)
    >>> [round(sched(t), 6) for t in (0, 9, 10, 25)]
    [1.0, 1.0, 0.1, 0.01]
    """

    kind: ClassVar[str] = "ExponentialDecay"
    init_value: float
    decay_rate: float
    decay_steps: int
    staircase: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "init_value", _check_nonnegative("init_value", self.init_value)
        )
        object.__setattr__(
            self, "decay_rate", _check_positive("decay_rate", self.decay_rate)
        )
        object.__setattr__(
            self, "decay_steps", _check_int("decay_steps", self.decay_steps, minimum=1)
        )
        if not isinstance(self.staircase, bool):
            raise ValueError(f"staircase must be a bool, got {self.staircase!r}")

    def _value(self, step: int) -> float:
        exponent = step / self.decay_steps
        if self.staircase:
            exponent = float(step // self.decay_steps)
        return self.init_value * self.decay_rate**exponent


@_register
@dataclass(frozen=True)
class CosineDecay(Schedule):
    r"""Cosine decay from ``init_value`` to ``alpha * init_value``.

    .. math::

        \eta_t = \eta_0 \left((1 - \alpha)\,
        \tfrac{1}{2}\bigl(1 + \cos(\pi \min(t, T) / T)\bigr) + \alpha\right)

    with ``decay_steps`` :math:`T`; constant at :math:`\alpha \eta_0` after
    step :math:`T`.

    Examples
    --------
    >>> sched = CosineDecay(1.0, decay_steps=100, alpha=0.1)
    >>> [round(sched(t), 6) for t in (0, 50, 100, 200)]
    [1.0, 0.55, 0.1, 0.1]
    """

    kind: ClassVar[str] = "CosineDecay"
    init_value: float
    decay_steps: int
    alpha: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "init_value", _check_nonnegative("init_value", self.init_value)
        )
        object.__setattr__(
            self, "decay_steps", _check_int("decay_steps", self.decay_steps, minimum=1)
        )
        alpha = _check_real("alpha", self.alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)

    def _value(self, step: int) -> float:
        fraction = min(step, self.decay_steps) / self.decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * fraction))
        return self.init_value * ((1.0 - self.alpha) * cosine + self.alpha)


@_register
@dataclass(frozen=True)
class WarmupCosine(Schedule):
    r"""Linear warm-up from 0 to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` is the total length of the schedule, warm-up included
    (``decay_steps >= warmup_steps``):

    .. math::

        \eta_t =
        \begin{cases}
        \eta_{peak}\, t / W & t < W \\
        \eta_{end} + (\eta_{peak} - \eta_{end})\,
        \tfrac{1}{2}\bigl(1 + \cos(\pi \min(t - W, T - W) / (T - W))\bigr)
        & t \ge W
        \end{cases}

    with ``warmup_steps`` :math:`W` and ``decay_steps`` :math:`T`.  The value
    is 0 at step 0, ``peak_value`` at step :math:`W` and ``end_value`` from
    step :math:`T` on.

    Examples
    --------
    >>> sched = WarmupCosine(1.0, warmup_steps=10, decay_steps=110)
    >>> [round(sched(t), 6) for t in (0, 5, 10, 60, 110, 500)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """

    kind: ClassVar[str] = "WarmupCosine"
    peak_value: float
    warmup_steps: int
    decay_steps: int
    end_value: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "peak_value", _check_nonnegative("peak_value", self.peak_value)
        )
        warmup = _check_int("warmup_steps", self.warmup_steps, minimum=0)
        decay = _check_int("decay_steps", self.decay_steps, minimum=0)
        if decay < warmup:
            raise ValueError(
                f"decay_steps (the total length, {decay}) must be >= "
                f"warmup_steps ({warmup})"
            )
        object.__setattr__(self, "warmup_steps", warmup)
        object.__setattr__(self, "decay_steps", decay)
        object.__setattr__(
            self, "end_value", _check_nonnegative("end_value", self.end_value)
        )

    def _value(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_value * step / self.warmup_steps
        cosine_steps = self.decay_steps - self.warmup_steps
        if cosine_steps == 0:
            return self.end_value
        fraction = min(step - self.warmup_steps, cosine_steps) / cosine_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * fraction))
        return self.end_value + (self.peak_value - self.end_value) * cosine


@_register
@dataclass(frozen=True)
class StepDecay(Schedule):
    r"""Piecewise constant: multiply by ``factor`` at each boundary.

    .. math::

        \eta_t = \eta_0 \, f^{\,|\{b \in B : b \le t\}|}

    with ``init_value`` :math:`\eta_0`, ``factor`` :math:`f` and strictly
    increasing ``boundaries`` :math:`B`.

    Examples
    --------
    >>> sched = StepDecay(1.0, boundaries=(10, 20), factor=0.5)
    >>> [sched(t) for t in (0, 9, 10, 19, 20, 1000)]
    [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """

    kind: ClassVar[str] = "StepDecay"
    init_value: float
    boundaries: tuple[int, ...]
    factor: float

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "init_value", _check_nonnegative("init_value", self.init_value)
        )
        if isinstance(self.boundaries, str | bytes) or not isinstance(
            self.boundaries, Sequence
        ):
            raise ValueError(
                f"boundaries must be a sequence of integers, got {self.boundaries!r}"
            )
        bounds = tuple(_check_int("boundaries", b, minimum=0) for b in self.boundaries)
        if any(b1 >= b2 for b1, b2 in pairwise(bounds)):
            raise ValueError(
                f"boundaries must be strictly increasing, got {self.boundaries!r}"
            )
        object.__setattr__(self, "boundaries", bounds)
        object.__setattr__(self, "factor", _check_positive("factor", self.factor))

    def _value(self, step: int) -> float:
        n_passed = sum(1 for b in self.boundaries if b <= step)
        return self.init_value * self.factor**n_passed
