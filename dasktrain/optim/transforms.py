"""Gradient transformations: composable ``(init, update)`` pairs (pure NumPy).

A :class:`GradientTransformation` turns a gradient into an update::

    state = transform.init(params)
    updates, state = transform.update(grads, state, params)

Trees are flat ``dict[str, np.ndarray]`` keyed by parameter name.  State is
flat too: each transformation stores ``"<slot>.<parameter name>"`` arrays
(``"mu.w"``) and 0-d scalars (``"count"``, int64); :func:`chain` prefixes each
member's keys with its position (``"1.mu.w"``).  Keys never contain ``/``, so
state maps one-to-one onto arrays of a parameter store.  Functions are pure:
they return new arrays and never modify their inputs.  Updates are float64.

Examples
--------
>>> import numpy as np
>>> from dasktrain.optim.transforms import chain, scale_by_adam, scale_by_learning_rate
>>> adam = chain(scale_by_adam(), scale_by_learning_rate(0.1))
>>> params = {"w": np.array([1.0, -2.0])}
>>> state = adam.init(params)
>>> sorted(state)
['0.count', '0.mu.w', '0.nu.w', '1.count']
>>> updates, state = adam.update({"w": np.array([0.5, -3.0])}, state, params)
>>> np.round(updates["w"], 6)
array([-0.1,  0.1])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from dasktrain._tree import global_norm
from dasktrain.optim.base import OptState, Params
from dasktrain.optim.schedules import (
    _check_nonnegative,
    _check_positive,
    _check_unit_interval,
)

__all__ = [
    "GradientTransformation",
    "add_decayed_weights",
    "chain",
    "clip_by_global_norm",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rss",
    "trace",
]

Tree = Mapping[str, np.ndarray]
InitFn = Callable[[Tree], OptState]
UpdateFn = Callable[[Tree, Tree, Tree], tuple[Params, OptState]]
#: ``learning_rate`` of :func:`scale_by_learning_rate`: a number or step -> value
LearningRate = float | Callable[[int], float]

_SEP = "."


class GradientTransformation(NamedTuple):
    """A pair of pure functions.

    Attributes
    ----------
    init : callable
        ``init(params) -> state``.
    update : callable
        ``update(updates, state, params) -> (new_updates, new_state)``.
    """

    init: InitFn
    update: UpdateFn


# -- helpers -----------------------------------------------------------------
def _as_float64(tree: Tree) -> Params:
    return {k: np.asarray(v, dtype=np.float64) for k, v in tree.items()}


def _pack(slot: str, tree: Tree) -> OptState:
    """``{"<slot>.<name>": array}``."""
    return {f"{slot}{_SEP}{k}": v for k, v in tree.items()}


def _unpack(slot: str, state: Tree, names: Tree) -> Params:
    """The ``slot`` arrays of ``state`` for every name of ``names``."""
    out: Params = {}
    for name in names:
        key = f"{slot}{_SEP}{name}"
        if key not in state:
            raise ValueError(
                f"optimizer state has no {key!r}: it was not created by init() "
                "for these parameters"
            )
        out[name] = state[key]
    return out


def _get_count(state: Tree) -> np.ndarray:
    if "count" not in state:
        raise ValueError("optimizer state has no 'count'")
    return np.asarray(state["count"], dtype=np.int64)


def _next_count(state: Tree) -> np.ndarray:
    return np.asarray(_get_count(state) + 1, dtype=np.int64)


def _zero_count() -> np.ndarray:
    return np.zeros((), dtype=np.int64)


def _zeros_like(params: Tree) -> Params:
    return {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in params.items()}


# -- transformations ---------------------------------------------------------
def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    r"""Adam's rescaling of gradients (without the learning rate).

    With gradient :math:`g_t` and step :math:`t = 1, 2, \dots`:

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
        u_t = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}.

    State: ``"mu.<name>"`` (:math:`m`), ``"nu.<name>"`` (:math:`v`) and
    ``"count"`` (:math:`t - 1`).

    Parameters
    ----------
    b1, b2 : float
        Decay rates of the first and second moment estimates, in ``[0, 1)``.
    eps : float
        Added to the denominator, ``> 0``.

    Examples
    --------
    >>> import numpy as np
    >>> adam = scale_by_adam()
    >>> params = {"w": np.zeros(2)}
    >>> u, _ = adam.update({"w": np.array([2.0, -1e-3])}, adam.init(params), params)
    >>> np.round(u["w"], 4)
    array([ 1., -1.])
    """
    b1 = _check_unit_interval("b1", b1)
    b2 = _check_unit_interval("b2", b2)
    eps = _check_positive("eps", eps)

    def init(params: Tree) -> OptState:
        zeros = _zeros_like(params)
        return {"count": _zero_count(), **_pack("mu", zeros), **_pack("nu", zeros)}

    def update(updates: Tree, state: Tree, params: Tree) -> tuple[Params, OptState]:
        grads = _as_float64(updates)
        mu = _unpack("mu", state, grads)
        nu = _unpack("nu", state, grads)
        count = _next_count(state)
        t = int(count)
        correction1 = 1.0 - b1**t
        correction2 = 1.0 - b2**t
        new_mu = {k: b1 * mu[k] + (1.0 - b1) * g for k, g in grads.items()}
        new_nu = {k: b2 * nu[k] + (1.0 - b2) * np.square(g) for k, g in grads.items()}
        out = {
            k: (new_mu[k] / correction1) / (np.sqrt(new_nu[k] / correction2) + eps)
            for k in grads
        }
        new_state = {"count": count, **_pack("mu", new_mu), **_pack("nu", new_nu)}
        return out, new_state

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    r"""Momentum: an exponentially weighted sum of past gradients.

    .. math::

        b_t = g_t + \mu\, b_{t-1}, \qquad
        u_t = \begin{cases} g_t + \mu\, b_t & \text{nesterov} \\
        b_t & \text{otherwise} \end{cases}

    with ``decay`` :math:`\mu` and :math:`b_0 = 0`.  State: ``"trace.<name>"``.

    Examples
    --------
    >>> import numpy as np
    >>> momentum = trace(0.5)
    >>> params = {"w": np.zeros(1)}
    >>> state = momentum.init(params)
    >>> for _ in range(2):
    ...     u, state = momentum.update({"w": np.ones(1)}, state, params)
    >>> u["w"]
    array([1.5])
    """
    decay = _check_unit_interval("decay", decay)
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be a bool, got {nesterov!r}")

    def init(params: Tree) -> OptState:
        return _pack("trace", _zeros_like(params))

    def update(updates: Tree, state: Tree, params: Tree) -> tuple[Params, OptState]:
        grads = _as_float64(updates)
        previous = _unpack("trace", state, grads)
        new_trace = {k: g + decay * previous[k] for k, g in grads.items()}
        if nesterov:
            out = {k: g + decay * new_trace[k] for k, g in grads.items()}
        else:
            out = {k: v.copy() for k, v in new_trace.items()}
        return out, _pack("trace", new_trace)

    return GradientTransformation(init, update)


def scale_by_rss(
    initial_accumulator: float = 0.1, eps: float = 1e-10
) -> GradientTransformation:
    r"""Adagrad's rescaling by the root of the summed squared gradients.

    .. math::

        a_t = a_{t-1} + g_t^2, \qquad u_t = \frac{g_t}{\sqrt{a_t} + \epsilon}

    with :math:`a_0` = ``initial_accumulator``.  State: ``"sum_sq.<name>"``.

    Examples
    --------
    >>> import numpy as np
    >>> rss = scale_by_rss(initial_accumulator=0.0, eps=0.0)
    >>> params = {"w": np.zeros(1)}
    >>> u, _ = rss.update({"w": np.array([-3.0])}, rss.init(params), params)
    >>> u["w"]
    array([-1.])
    """
    initial_accumulator = _check_nonnegative("initial_accumulator", initial_accumulator)
    eps = _check_nonnegative("eps", eps)

    def init(params: Tree) -> OptState:
        return _pack(
            "sum_sq",
            {
                k: np.full(np.shape(v), initial_accumulator, dtype=np.float64)
                for k, v in params.items()
            },
        )

    def update(updates: Tree, state: Tree, params: Tree) -> tuple[Params, OptState]:
        grads = _as_float64(updates)
        previous = _unpack("sum_sq", state, grads)
        new_sum = {k: previous[k] + np.square(g) for k, g in grads.items()}
        out = {}
        for k, g in grads.items():
            denominator = np.sqrt(new_sum[k]) + eps
            out[k] = np.divide(
                g, denominator, out=np.zeros_like(g), where=denominator > 0
            )
        return out, _pack("sum_sq", new_sum)

    return GradientTransformation(init, update)


def add_decayed_weights(
    weight_decay: float, *, mask: Callable[[str], bool] | None = None
) -> GradientTransformation:
    r"""Add ``weight_decay * param`` to the update (decoupled weight decay).

    .. math::

        u_t = g_t + \lambda\, \theta_{t-1}
        \quad \text{for parameters selected by } \mathrm{mask}

    Parameters
    ----------
    weight_decay : float
        :math:`\lambda \ge 0`.
    mask : callable, optional
        ``mask(name) -> bool``: which parameters decay.  Default: all.

    Examples
    --------
    >>> import numpy as np
    >>> decay = add_decayed_weights(0.1, mask=lambda name: name != "b")
    >>> params = {"w": np.array([2.0]), "b": np.array([2.0])}
    >>> zero = {"w": np.zeros(1), "b": np.zeros(1)}
    >>> u, _ = decay.update(zero, decay.init(params), params)
    >>> u["w"], u["b"]
    (array([0.2]), array([0.]))
    """
    weight_decay = _check_nonnegative("weight_decay", weight_decay)

    def init(params: Tree) -> OptState:
        return {}

    def update(updates: Tree, state: Tree, params: Tree) -> tuple[Params, OptState]:
        out = _as_float64(updates)
        for k, u in out.items():
            if mask is None or mask(k):
                out[k] = u + weight_decay * np.asarray(params[k], dtype=np.float64)
            else:
                out[k] = u.copy()
        return out, {}

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    r"""Rescale all updates together so that their joint norm is at most ``max_norm``.

    .. math::

        u_t = g_t \cdot \min\left(1, \frac{c}{\lVert g_t \rVert_2}\right)

    where :math:`\lVert g_t \rVert_2` is the norm of all entries of all
    parameters together and :math:`c` = ``max_norm``.

    Examples
    --------
    >>> import numpy as np
    >>> clip = clip_by_global_norm(1.0)
    >>> params = {"a": np.zeros(1), "b": np.zeros(1)}
    >>> u, _ = clip.update({"a": np.array([3.0]), "b": np.array([4.0])}, {}, params)
    >>> u["a"], u["b"]
    (array([0.6]), array([0.8]))
    """
    max_norm = _check_positive("max_norm", max_norm)

    def init(params: Tree) -> OptState:
        return {}

    def update(updates: Tree, state: Tree, params: Tree) -> tuple[Params, OptState]:
        grads = _as_float64(updates)
        norm = global_norm(grads)
        if norm <= max_norm:
            return {k: g.copy() for k, g in grads.items()}, {}
        factor = max_norm / norm
        return {k: g * factor for k, g in grads.items()}, {}

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: LearningRate) -> GradientTransformation:
    r"""Multiply by minus the learning rate of the current step.

    .. math::

        u_t = -\eta(t)\, g_t, \qquad t = 0, 1, \dots

    ``learning_rate`` is a number or a schedule (any ``step -> float``
    callable, such as those of :mod:`dasktrain.optim.schedules`).  State:
    ``"count"``, the number of updates done so far.

    Examples
    --------
    >>> import numpy as np
    >>> sgd = scale_by_learning_rate(lambda step: 0.1 / (step + 1))
    >>> params = {"w": np.zeros(1)}
    >>> state = sgd.init(params)
    >>> u0, state = sgd.update({"w": np.ones(1)}, state, params)
    >>> u1, state = sgd.update({"w": np.ones(1)}, state, params)
    >>> u0["w"], u1["w"]
    (array([-0.1]), array([-0.05]))
    """
    schedule: Callable[[int], float]
    if callable(learning_rate):
        schedule = learning_rate
    else:
        constant = _check_nonnegative("learning_rate", learning_rate)

        def schedule(step: int) -> float:
            return constant

    def init(params: Tree) -> OptState:
        return {"count": _zero_count()}

    def update(updates: Tree, state: Tree, params: Tree) -> tuple[Params, OptState]:
        count = _get_count(state)
        rate = float(schedule(int(count)))
        if not math.isfinite(rate):
            raise ValueError(f"learning rate at step {int(count)} is {rate}")
        out = {k: -rate * g for k, g in _as_float64(updates).items()}
        return out, {"count": _next_count(state)}

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; member ``i`` keeps its state under ``"i."``.

    Examples
    --------
    >>> import numpy as np
    >>> sgd_momentum = chain(clip_by_global_norm(1.0), trace(0.9),
    ...                      scale_by_learning_rate(0.1))
    >>> sorted(sgd_momentum.init({"w": np.zeros(3)}))
    ['1.trace.w', '2.count']
    """
    members = tuple(transforms)
    prefixes = tuple(f"{i}{_SEP}" for i in range(len(members)))

    def init(params: Tree) -> OptState:
        state: OptState = {}
        for prefix, member in zip(prefixes, members, strict=True):
            state.update({prefix + k: v for k, v in member.init(params).items()})
        return state

    def update(updates: Tree, state: Tree, params: Tree) -> tuple[Params, OptState]:
        new_state: OptState = {}
        out: Tree = updates
        for prefix, member in zip(prefixes, members, strict=True):
            own = {
                k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)
            }
            out, member_state = member.update(out, own, params)
            new_state.update({prefix + k: v for k, v in member_state.items()})
        if not members:
            return {k: np.array(v, dtype=np.float64) for k, v in out.items()}, {}
        return _as_float64(out), new_state

    return GradientTransformation(init, update)
