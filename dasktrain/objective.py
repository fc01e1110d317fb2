"""From a reduced :class:`~dasktrain.partial.Partial` to the step's objective
and its gradient.  Pure NumPy: used by the client and, identically, by every
rank of a segment (so all ranks apply the same update to the same numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from dasktrain.models.base import Model
from dasktrain.partial import Partial, RowSparse

__all__ = ["NonFiniteStep", "StepObjective", "all_finite", "step_objective"]


class NonFiniteStep(ArithmeticError):
    """The step's loss or gradient is not finite, or its batch has no rows."""


#: (mean data loss, objective = loss + penalty, gradient of the objective)
StepObjective = tuple[float, float, dict[str, np.ndarray]]


def step_objective(
    model: Model, partial: Partial, params: Mapping[str, np.ndarray]
) -> StepObjective:
    """Mean data loss, objective and the objective's gradient (float64) of a
    reduced partial at ``params``; raises :class:`NonFiniteStep`.

    Examples
    --------
    >>> from dasktrain.models import LinearRegression
    >>> part = Partial(4.0, {"w": np.array([2.0]), "b": np.array(2.0)}, 2)
    >>> loss, objective, grads = step_objective(
    ...     LinearRegression(), part, {"w": np.zeros(1), "b": np.zeros(())})
    >>> loss, objective, grads["w"]
    (2.0, 2.0, array([1.]))
    """
    n = partial.n_rows
    if n == 0:
        raise NonFiniteStep("the batch has no rows (all skipped?)")
    # Non-finite values are checked below (no floating-point warnings).
    with np.errstate(over="ignore", invalid="ignore"):
        loss = partial.loss_sum / n
        objective = loss + model.penalty(dict(params))
        if model.batch_penalty:
            # The per-occurrence penalty of table rows is a sum over the batch.
            objective += partial.metrics.get("penalty", 0.0) / n
        pgrad = model.penalty_grad(dict(params))
        grads = {
            k: (g.to_dense() if isinstance(g, RowSparse) else np.asarray(g, np.float64))
            / n
            + pgrad[k]
            for k, g in partial.grads.items()
        }
    bad = [k for k, g in grads.items() if not np.all(np.isfinite(g))]
    if not math.isfinite(objective):
        raise NonFiniteStep(f"loss is {objective}")
    if bad:
        raise NonFiniteStep(f"gradient of {bad} is not finite")
    return loss, objective, grads


def all_finite(tree: Mapping[str, np.ndarray]) -> bool:
    """Whether every entry of every array is finite."""
    return all(bool(np.all(np.isfinite(v))) for v in tree.values())
