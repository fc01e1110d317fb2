"""Step-by-step optimizers: SGD, Adam, AdamW, Adagrad (pure NumPy).

Each optimizer is an immutable configuration that builds a :func:`chain` of
gradient transformations.  Its state is the chain's flat state: member ``i``
of the chain owns the keys starting with ``"i."``, for example
``Adam(...).init({"w": w})`` has ``"0.count"``, ``"0.mu.w"``, ``"0.nu.w"`` and
``"1.count"``; with ``clip_norm`` set, clipping is member 0 and the indices
of the others shift by one.

Gradients are clipped first (``clip_norm``), on the raw mean gradient.
``learning_rate`` is a float or a schedule from
:mod:`dasktrain.optim.schedules`; step ``t`` (0-based) uses
``learning_rate_at(t)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from dasktrain.optim.base import Optimizer, OptState, Params, register
from dasktrain.optim.schedules import (
    Schedule,
    _check_nonnegative,
    _check_positive,
    _check_unit_interval,
    as_schedule,
    schedule_from_config,
)
from dasktrain.optim.transforms import (
    GradientTransformation,
    add_decayed_weights,
    chain,
    clip_by_global_norm,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rss,
    trace,
)

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "LearningRate", "decays_weight"]

#: a constant learning rate or a schedule
LearningRate = float | Schedule


def _check_learning_rate(value: object) -> LearningRate:
    if isinstance(value, Schedule):
        return value
    return _check_nonnegative("learning_rate", value)


def _check_clip_norm(value: object) -> float | None:
    if value is None:
        return None
    return _check_positive("clip_norm", value)


def _learning_rate_config(value: LearningRate) -> float | dict[str, Any]:
    if isinstance(value, Schedule):
        return value.config()
    return float(value)


def decays_weight(name: str) -> bool:
    """AdamW's rule: a parameter decays unless its name starts with ``"b"``.

    Biases are named ``"b"``, ``"b1"``, ``"b_out"``... by the models of
    dasktrain, so they are not decayed; weights (``"w"``, ``"W1"``,
    ``"embedding"``) are.

    Examples
    --------
    >>> decays_weight("w"), decays_weight("b"), decays_weight("b2")
    (True, False, False)
    """
    return not name.startswith("b")


class _ChainOptimizer(Optimizer):
    """An optimizer defined by a chain of gradient transformations."""

    learning_rate: LearningRate
    clip_norm: float | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Optimizer:
        cfg = dict(config)
        rate = cfg.get("learning_rate")
        if isinstance(rate, Mapping):
            cfg["learning_rate"] = schedule_from_config(rate)
        return cls(**cfg)

    def _members(self) -> list[GradientTransformation]:
        """The transformations between clipping and the learning rate."""
        raise NotImplementedError

    @cached_property
    def _chain(self) -> GradientTransformation:
        """clip (optional) -> members -> scale by -learning_rate."""
        members = []
        if self.clip_norm is not None:
            members.append(clip_by_global_norm(self.clip_norm))
        members.extend(self._members())
        members.append(scale_by_learning_rate(as_schedule(self.learning_rate)))
        return chain(*members)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only; the chain is rebuilt on use."""
        return {k: v for k, v in self.__dict__.items() if k != "_chain"}

    def init(self, params: Mapping[str, np.ndarray]) -> OptState:
        """Zero state for ``params`` (flat dict of float64 arrays and int64 scalars)."""
        for name in params:
            if "/" in name:
                raise ValueError(f"parameter name {name!r} must not contain '/'")
        return self._chain.init(params)

    def update(
        self,
        grads: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        params: Mapping[str, np.ndarray],
    ) -> tuple[Params, OptState]:
        """``(updates, new_state)``; apply with :func:`~dasktrain.optim.apply_updates`.

        Inputs are not modified.  ``grads`` must have the names of ``params``.
        """
        if set(grads) != set(params):
            missing = sorted(set(params) - set(grads))
            extra = sorted(set(grads) - set(params))
            raise ValueError(
                f"grads do not match params: missing {missing}, unexpected {extra}"
            )
        for name in params:
            if np.shape(grads[name]) != np.shape(params[name]):
                raise ValueError(
                    f"grads[{name!r}] has shape {np.shape(grads[name])}, "
                    f"params[{name!r}] has shape {np.shape(params[name])}"
                )
        return self._chain.update(grads, state, params)

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based)."""
        return as_schedule(self.learning_rate)(step)


@register
class SGD(_ChainOptimizer):
    r"""Stochastic gradient descent, with optional (Nesterov) momentum.

    With gradient :math:`g_t`, learning rate :math:`\eta_t` and momentum
    :math:`\mu`:

    .. math::

        b_t = g_t + \mu\, b_{t-1}, \qquad
        \theta_{t+1} = \theta_t - \eta_t \begin{cases}
        g_t + \mu\, b_t & \text{nesterov} \\ b_t & \text{otherwise}\end{cases}

    (with :math:`\mu = 0`: :math:`\theta_{t+1} = \theta_t - \eta_t g_t`).

    Parameters
    ----------
    learning_rate : float or Schedule
        :math:`\eta`, ``>= 0``.
    momentum : float
        :math:`\mu \in [0, 1)`.
    nesterov : bool
        Nesterov momentum (needs ``momentum > 0``).
    clip_norm : float, optional
        Clip the global gradient norm to this value first.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.optim import SGD, apply_updates
    >>> opt = SGD(0.1, momentum=0.9)
    >>> params = {"w": np.array([1.0, -1.0])}
    >>> state = opt.init(params)
    >>> for _ in range(500):  # minimize ||w||^2 / 2, gradient w
    ...     updates, state = opt.update(params, state, params)
    ...     params = apply_updates(params, updates)
    >>> bool(np.abs(params["w"]).max() < 1e-6)
    True
    """

    kind: ClassVar[str] = "SGD"

    def __init__(
        self,
        learning_rate: LearningRate,
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        clip_norm: float | None = None,
    ) -> None:
        self.learning_rate = _check_learning_rate(learning_rate)
        self.momentum = _check_unit_interval("momentum", momentum)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = nesterov
        self.clip_norm = _check_clip_norm(clip_norm)

    def _members(self) -> list[GradientTransformation]:
        if self.momentum == 0.0:
            return []
        return [trace(self.momentum, nesterov=self.nesterov)]

    def config(self) -> dict[str, Any]:
        """JSON data; ``optimizer_from_config(opt.config()) == opt``."""
        return {
            "type": self.kind,
            "learning_rate": _learning_rate_config(self.learning_rate),
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "clip_norm": self.clip_norm,
        }


def _adam_config(b1: object, b2: object, eps: object) -> tuple[float, float, float]:
    return (
        _check_unit_interval("b1", b1),
        _check_unit_interval("b2", b2),
        _check_positive("eps", eps),
    )


@register
class Adam(_ChainOptimizer):
    r"""Adam (Kingma & Ba, 2015).

    With gradient :math:`g_t` at step :math:`t = 1, 2, \dots` and learning rate
    :math:`\eta_t`:

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
        \theta_{t+1} = \theta_t - \eta_t\,
        \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}.

    Parameters
    ----------
    learning_rate : float or Schedule
        :math:`\eta`, ``>= 0``.
    b1, b2 : float
        :math:`\beta_1, \beta_2 \in [0, 1)`.
    eps : float
        :math:`\epsilon > 0`.
    clip_norm : float, optional
        Clip the global gradient norm to this value first.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.optim import Adam, apply_updates
    >>> opt = Adam(0.1)
    >>> params = {"w": np.array([1.0, -1.0])}
    >>> updates, state = opt.update(params, opt.init(params), params)
    >>> np.round(updates["w"], 6)  # the first step has size learning_rate
    array([-0.1,  0.1])
    """

    kind: ClassVar[str] = "Adam"

    def __init__(
        self,
        learning_rate: LearningRate = 1e-3,
        *,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
        clip_norm: float | None = None,
    ) -> None:
        self.learning_rate = _check_learning_rate(learning_rate)
        self.b1, self.b2, self.eps = _adam_config(b1, b2, eps)
        self.clip_norm = _check_clip_norm(clip_norm)

    def _members(self) -> list[GradientTransformation]:
        return [scale_by_adam(self.b1, self.b2, self.eps)]

    def config(self) -> dict[str, Any]:
        """JSON data; ``optimizer_from_config(opt.config()) == opt``."""
        return {
            "type": self.kind,
            "learning_rate": _learning_rate_config(self.learning_rate),
            "b1": self.b1,
            "b2": self.b2,
            "eps": self.eps,
            "clip_norm": self.clip_norm,
        }


@register
class AdamW(_ChainOptimizer):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    As :class:`Adam`, plus a decay proportional to the parameter, added after
    Adam's rescaling and multiplied by the learning rate:

    .. math::

        \theta_{t+1} = \theta_t - \eta_t \left(
        \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda\, \theta_t \right)

    The decay :math:`\lambda` applies to every parameter whose name does
    **not** start with ``"b"`` (see :func:`decays_weight`): weights decay,
    biases do not.  Unlike an L2 penalty in the loss, the decay is not
    rescaled by :math:`\sqrt{\hat v_t}`.

    Parameters
    ----------
    learning_rate : float or Schedule
        :math:`\eta`, ``>= 0``.
    b1, b2 : float
        :math:`\beta_1, \beta_2 \in [0, 1)`.
    eps : float
        :math:`\epsilon > 0`.
    weight_decay : float
        :math:`\lambda \ge 0`.
    clip_norm : float, optional
        Clip the global gradient norm to this value first.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.optim import AdamW
    >>> opt = AdamW(0.1, weight_decay=0.5)
    >>> params = {"w": np.array([2.0]), "b": np.array([2.0])}
    >>> zero = {"w": np.zeros(1), "b": np.zeros(1)}
    >>> updates, _ = opt.update(zero, opt.init(params), params)
    >>> updates["w"]  # -0.1 * 0.5 * 2.0: the weight decays
    array([-0.1])
    >>> bool(np.all(updates["b"] == 0.0))  # the bias does not
    True
    """

    kind: ClassVar[str] = "AdamW"

    def __init__(
        self,
        learning_rate: LearningRate = 1e-3,
        *,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        clip_norm: float | None = None,
    ) -> None:
        self.learning_rate = _check_learning_rate(learning_rate)
        self.b1, self.b2, self.eps = _adam_config(b1, b2, eps)
        self.weight_decay = _check_nonnegative("weight_decay", weight_decay)
        self.clip_norm = _check_clip_norm(clip_norm)

    def _members(self) -> list[GradientTransformation]:
        return [
            scale_by_adam(self.b1, self.b2, self.eps),
            add_decayed_weights(self.weight_decay, mask=decays_weight),
        ]

    def config(self) -> dict[str, Any]:
        """JSON data; ``optimizer_from_config(opt.config()) == opt``."""
        return {
            "type": self.kind,
            "learning_rate": _learning_rate_config(self.learning_rate),
            "b1": self.b1,
            "b2": self.b2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "clip_norm": self.clip_norm,
        }


@register
class Adagrad(_ChainOptimizer):
    r"""Adagrad (Duchi, Hazan & Singer, 2011).

    .. math::

        a_t = a_{t-1} + g_t^2, \qquad
        \theta_{t+1} = \theta_t - \eta_t \frac{g_t}{\sqrt{a_t} + \epsilon}

    with :math:`a_0` = ``initial_accumulator`` for every entry.

    Parameters
    ----------
    learning_rate : float or Schedule
        :math:`\eta`, ``>= 0``.
    initial_accumulator : float
        :math:`a_0 \ge 0`.
    eps : float
        :math:`\epsilon \ge 0` (keep it ``> 0`` if ``initial_accumulator`` is 0).
    clip_norm : float, optional
        Clip the global gradient norm to this value first.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.optim import Adagrad
    >>> opt = Adagrad(0.5, initial_accumulator=0.0)
    >>> params = {"w": np.array([3.0])}
    >>> updates, state = opt.update(params, opt.init(params), params)
    >>> np.round(updates["w"], 6), state["0.sum_sq.w"]
    (array([-0.5]), array([9.]))
    """

    kind: ClassVar[str] = "Adagrad"

    def __init__(
        self,
        learning_rate: LearningRate,
        *,
        initial_accumulator: float = 0.1,
        eps: float = 1e-10,
        clip_norm: float | None = None,
    ) -> None:
        self.learning_rate = _check_learning_rate(learning_rate)
        self.initial_accumulator = _check_nonnegative(
            "initial_accumulator", initial_accumulator
        )
        self.eps = _check_nonnegative("eps", eps)
        if self.initial_accumulator == 0.0 and self.eps == 0.0:
            raise ValueError("initial_accumulator and eps cannot both be 0")
        self.clip_norm = _check_clip_norm(clip_norm)

    def _members(self) -> list[GradientTransformation]:
        return [scale_by_rss(self.initial_accumulator, self.eps)]

    def config(self) -> dict[str, Any]:
        """JSON data; ``optimizer_from_config(opt.config()) == opt``."""
        return {
            "type": self.kind,
            "learning_rate": _learning_rate_config(self.learning_rate),
            "initial_accumulator": self.initial_accumulator,
            "eps": self.eps,
            "clip_norm": self.clip_norm,
        }
