"""Generalized linear models and their second-order kernels.

Two more GLMs with a log link, :class:`PoissonRegression` and
:class:`GammaRegression`, and what :class:`~dasktrain.optim.Newton` needs
from every linear model (least squares, logistic, softmax, Poisson, Gamma):
sums over a batch of the data loss, its gradient and its Hessian, as flat
float64 arrays.

Flat coefficients.  A linear model's parameters ``b`` (``()`` or ``(k,)``)
and ``w`` (``(d,)`` or ``(d, k)``) flattened as by
:func:`dasktrain._tree.flatten` (sorted names: ``b`` first, then ``w`` row by
row) are exactly the rows of the *augmented* coefficient matrix
``C = [b; w]`` of shape ``(d + 1, k)`` read row by row, where column ``0`` of
the augmented design ``[1 | X]`` is the intercept.  So flat index
``a * k + c`` is augmented column ``a`` (0: intercept, ``j + 1``: feature
``j``) and output ``c``, and the Hessian of the data loss sum is::

    H[a k + c, a' k + c'] = sum_i Xa[i, a] Xa[i, a'] S_i[c, c']

with ``S_i`` the second derivative of the row's loss in its linear predictor:
a scalar for one output (1 for least squares, ``p (1 - p)`` for logistic,
``mu`` for Poisson, ``y / mu`` for Gamma) and ``diag(p) - p p^T`` for
softmax.

Numerics: float32 data are computed in float32 (``X @ C`` and the Hessian's
``A^T A`` by BLAS), every returned sum is float64.  The Hessian may be
computed on an evenly strided subset of the rows (``hessian_rows``) and
scaled to the full row count: Newton steps only need an approximate Hessian
when the gradient is exact.

Pure NumPy: no dask, no zarr.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from dasktrain.models.base import Batch, LabelProblem, Model, Params, register
from dasktrain.models.linear import (
    Head,
    LinearRegression,
    LogisticRegression,
    SoftmaxRegression,
    _first_true_row,
    _format_label,
    _LinearModel,
    _unusable_dtype,
    as_features,
    regression_metric_names,
    regression_summary,
)
from dasktrain.partial import Partial

__all__ = [
    "GammaRegression",
    "PoissonRegression",
    "SecondOrderTerms",
    "check_gamma_labels",
    "check_poisson_labels",
    "coef_shape",
    "gamma_head",
    "penalty_vectors",
    "poisson_head",
    "second_order_terms",
    "second_order_terms_many",
    "supports_second_order",
    "terms_to_params",
]

#: Hessians of softmax models are built from row blocks of at most this many
#: rows (bounds the temporaries of the per-class-pair products).
SOFTMAX_HESSIAN_BLOCK_ROWS = 16_384


# ---------------------------------------------------------------------------
# Heads of the log-link GLMs
# ---------------------------------------------------------------------------


def _xlogx(y: np.ndarray) -> np.ndarray:
    """``y * log(y)`` in float64, 0 where ``y == 0``."""
    y64 = np.asarray(y, dtype=np.float64)
    return y64 * np.log(np.where(y64 > 0.0, y64, 1.0))


def _regression_metrics(mu: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The sums of :func:`~dasktrain.models.linear.squared_head` for the
    prediction ``mu`` (so :func:`regression_summary` gives mse and r2)."""
    resid = np.asarray(mu, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    y64 = np.asarray(y, dtype=np.float64)
    return {
        "sq_err": float(np.dot(resid, resid)),
        "y_sum": float(y64.sum()),
        "y_sq_sum": float(np.dot(y64, y64)),
    }


def poisson_head(z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
    """Half Poisson deviance with a log link; overwrites ``z``.

    Per row, with ``mu = exp(z)``: ``y log(y / mu) - y + mu`` (0 at a perfect
    fit; scikit-learn's ``PoissonRegressor`` minimizes its mean).  The
    gradient with respect to ``z`` is ``mu - y`` and the second derivative
    ``mu``.  Metrics: those of the squared head for the prediction ``mu``.

    Examples
    --------
    >>> import numpy as np
    >>> head = poisson_head(np.log([2.0, 3.0]), np.array([2.0, 1.0]), need_grad=True)
    >>> round(head.loss_sum, 6), head.dz
    (0.901388, array([0., 2.]))
    """
    y_z = y.astype(z.dtype, copy=False)
    y_times_z = np.asarray(y_z * z, dtype=np.float64)
    mu = np.exp(z, out=z)
    loss_sum = float(
        np.sum(mu, dtype=np.float64)
        - y_times_z.sum()
        + np.sum(_xlogx(y) - np.asarray(y, dtype=np.float64))
    )
    metrics = _regression_metrics(mu, y)
    dz = None
    if need_grad:
        mu -= y_z
        dz = mu
    return Head(loss_sum, dz, metrics)


def gamma_head(z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
    """Half Gamma deviance with a log link; overwrites ``z``.

    Per row, with ``mu = exp(z)``: ``y / mu - log(y / mu) - 1`` (0 at a
    perfect fit; scikit-learn's ``GammaRegressor`` minimizes its mean).  The
    gradient with respect to ``z`` is ``1 - y / mu`` and the second
    derivative ``y / mu``.  Metrics: those of the squared head for ``mu``.

    Examples
    --------
    >>> import numpy as np
    >>> head = gamma_head(np.log([2.0, 4.0]), np.array([2.0, 2.0]), need_grad=True)
    >>> round(head.loss_sum, 6), head.dz
    (0.193147, array([0. , 0.5]))
    """
    y64 = np.asarray(y, dtype=np.float64)
    z_sum = float(np.sum(z, dtype=np.float64))
    mu = np.exp(z)
    ratio = z
    np.negative(ratio, out=ratio)
    np.exp(ratio, out=ratio)
    ratio *= y.astype(z.dtype, copy=False)  # y / mu
    loss_sum = float(
        np.sum(ratio, dtype=np.float64)
        + z_sum
        - np.sum(np.log(np.where(y64 > 0.0, y64, 1.0)))
        - y64.shape[0]
    )
    metrics = _regression_metrics(mu, y)
    dz = None
    if need_grad:
        np.subtract(1, ratio, out=ratio)
        dz = ratio
    return Head(loss_sum, dz, metrics)


def check_poisson_labels(y: np.ndarray, owner: str) -> LabelProblem | None:
    """First row whose target is negative or not finite (Poisson counts or
    rates must be ``>= 0``)."""
    y = np.atleast_1d(np.asarray(y))
    problem = _unusable_dtype(y, owner)
    if problem is not None or y.dtype.kind == "b":
        return problem
    bad = ~np.isfinite(y) | (y < 0) if y.dtype.kind == "f" else y < 0
    row = _first_true_row(np.asarray(bad))
    if row is None:
        return None
    label = _format_label(y[row])
    if y.dtype.kind == "f" and not math.isfinite(float(y[row])):
        return row, f"target {label} is not finite ({owner})"
    return row, f"target {label} is negative; {owner} needs targets >= 0"


def check_gamma_labels(y: np.ndarray, owner: str) -> LabelProblem | None:
    """First row whose target is not a finite number ``> 0``."""
    y = np.atleast_1d(np.asarray(y))
    problem = _unusable_dtype(y, owner)
    if problem is not None:
        return problem
    if y.dtype.kind == "b":
        bad = ~y
    elif y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y <= 0)
    else:
        bad = y <= 0
    row = _first_true_row(np.asarray(bad))
    if row is None:
        return None
    label = _format_label(y[row])
    if y.dtype.kind == "f" and not math.isfinite(float(y[row])):
        return row, f"target {label} is not finite ({owner})"
    return row, f"target {label} is not positive; {owner} needs targets > 0"


class _LogLinkModel(_LinearModel):
    """``mu = exp(X @ w + b)``: a GLM with a log link."""

    @property
    def _n_outputs(self) -> int | None:
        return None

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """The predicted mean ``exp(X @ w + b)`` (float32 for float32 ``X``)."""
        z = self.decision_function(params, X)
        with np.errstate(over="ignore"):
            return np.exp(z, out=z)

    def metric_names(self) -> tuple[str, ...]:
        return regression_metric_names(1)

    def summarize(self, partial: Partial) -> dict[str, float]:
        """``loss`` (mean half deviance), ``mse`` and ``r2`` of ``mu``."""
        return regression_summary(partial, 1)


@register
class PoissonRegression(_LogLinkModel):
    """Poisson regression (log link) with optional L2 and L1 penalties.

    With targets ``y_i >= 0`` (counts or rates) and ``mu_i = exp(x_i @ w +
    b)``, minimizes over ``w`` of shape ``(d,)`` and scalar ``b``::

        mean_i (y_i log(y_i / mu_i) - y_i + mu_i) + (l2 / 2) ||w||^2 + l1 ||w||_1

    the mean half Poisson deviance, so ``l2 = alpha`` gives scikit-learn's
    ``PoissonRegressor(alpha=alpha)``.  The intercept is not penalized.

    Parameters
    ----------
    l2 : float, default 0.0
        L2 penalty strength (>= 0).
    l1 : float, default 0.0
        L1 penalty strength (>= 0).

    Notes
    -----
    A negative or non-finite target raises
    :class:`~dasktrain.errors.LabelError` naming the chunk and row.  Metrics
    are those of :class:`~dasktrain.models.LinearRegression` for the predicted
    mean; :meth:`summarize` reports ``loss``, ``mse`` and ``r2``.

    Examples
    --------
    >>> import numpy as np
    >>> model = PoissonRegression(l2=0.1)
    >>> params = {"w": np.array([0.5, 0.0]), "b": np.array(0.0)}
    >>> batch = {"X": np.array([[0.0, 1.0], [2.0, 0.0]]), "y": np.array([1.0, 3.0])}
    >>> part = model.loss_and_grad(params, batch)
    >>> round(part.loss_sum, 4), part.grads["w"].round(4)
    (0.0141, array([-0.5634,  0.    ]))
    >>> model.predict(params, batch["X"]).round(4)
    array([1.    , 2.7183])
    """

    kind: ClassVar[str] = "PoissonRegression"
    is_classifier: ClassVar[bool] = False

    def _head(self, z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
        return poisson_head(z, y, need_grad=need_grad)

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        return check_poisson_labels(y, self._owner)


@register
class GammaRegression(_LogLinkModel):
    """Gamma regression (log link) with optional L2 and L1 penalties.

    With targets ``y_i > 0`` and ``mu_i = exp(x_i @ w + b)``, minimizes::

        mean_i (y_i / mu_i - log(y_i / mu_i) - 1) + (l2 / 2) ||w||^2 + l1 ||w||_1

    the mean half Gamma deviance, so ``l2 = alpha`` gives scikit-learn's
    ``GammaRegressor(alpha=alpha)``.  The intercept is not penalized.

    Parameters
    ----------
    l2 : float, default 0.0
        L2 penalty strength (>= 0).
    l1 : float, default 0.0
        L1 penalty strength (>= 0).

    Notes
    -----
    A target that is not a finite positive number raises
    :class:`~dasktrain.errors.LabelError` naming the chunk and row.

    Examples
    --------
    >>> import numpy as np
    >>> model = GammaRegression()
    >>> params = {"w": np.array([1.0]), "b": np.array(0.0)}
    >>> batch = {"X": np.array([[0.0], [1.0]]), "y": np.array([1.0, 1.0])}
    >>> round(model.loss_and_grad(params, batch).loss_sum, 4)
    0.3679
    """

    kind: ClassVar[str] = "GammaRegression"
    is_classifier: ClassVar[bool] = False

    def _head(self, z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
        return gamma_head(z, y, need_grad=need_grad)

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        return check_gamma_labels(y, self._owner)


# ---------------------------------------------------------------------------
# Second-order kernels
# ---------------------------------------------------------------------------

#: Second derivative of a row's loss in its (scalar) linear predictor, from
#: the head's gradient ``dz`` and the label ``y``, in the dtype of ``dz``.
_Curvature = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _squared_curvature(dz: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.ones_like(dz)


def _logistic_curvature(dz: np.ndarray, y: np.ndarray) -> np.ndarray:
    # dz = sigmoid(z) - y, so |dz| = sigmoid(-margin) is accurate in both
    # tails and p (1 - p) = |dz| (1 - |dz|).
    a = np.abs(dz)
    return a * (1 - a)


def _poisson_curvature(dz: np.ndarray, y: np.ndarray) -> np.ndarray:
    return dz + y.astype(dz.dtype, copy=False)  # mu


def _gamma_curvature(dz: np.ndarray, y: np.ndarray) -> np.ndarray:
    return 1 - dz  # y / mu


_SCALAR_CURVATURES: dict[type[Model], _Curvature] = {
    LinearRegression: _squared_curvature,
    LogisticRegression: _logistic_curvature,
    PoissonRegression: _poisson_curvature,
    GammaRegression: _gamma_curvature,
}


def supports_second_order(model: Model) -> bool:
    """Whether :func:`second_order_terms` knows ``model``'s Hessian: the
    linear models and GLMs (least squares, logistic, softmax, Poisson,
    Gamma), not the MLP or the sparse models.

    Examples
    --------
    >>> from dasktrain import models
    >>> supports_second_order(models.LogisticRegression())
    True
    >>> supports_second_order(models.MLP((4,), 1))
    False
    """
    return type(model) in _SCALAR_CURVATURES or type(model) is SoftmaxRegression


def coef_shape(model: Model, n_features: int) -> tuple[int, int]:
    """Shape ``(d + 1, k)`` of the augmented coefficients ``[b; w]``."""
    k = model.n_classes if isinstance(model, SoftmaxRegression) else 1
    return n_features + 1, k


def penalty_vectors(model: Model, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Per flat coefficient, the L2 and L1 strengths (0 for intercepts).

    Examples
    --------
    >>> from dasktrain import models
    >>> l2, l1 = penalty_vectors(models.LogisticRegression(l2=0.5, l1=0.1), 2)
    >>> l2, l1
    (array([0. , 0.5, 0.5]), array([0. , 0.1, 0.1]))
    """
    if not isinstance(model, _LinearModel):
        raise TypeError(f"{type(model).__name__} is not a linear model")
    rows, k = coef_shape(model, n_features)
    penalized = np.ones((rows, k))
    penalized[0] = 0.0
    return model.l2 * penalized.ravel(), model.l1 * penalized.ravel()


class SecondOrderTerms(NamedTuple):
    """Sums over a batch: data loss, its gradient and (optionally) its
    Hessian in flat coefficients (float64), row count and metric sums."""

    loss_sum: float
    grad: np.ndarray
    hessian: np.ndarray | None
    n_rows: int
    metrics: dict[str, float]


def _hessian_subset(n_rows: int, hessian_rows: int | None) -> tuple[slice, float]:
    """Rows used for the Hessian (every ``stride``-th) and the factor that
    scales their sum to ``n_rows`` rows."""
    if hessian_rows is None or hessian_rows >= n_rows or n_rows == 0:
        return slice(None), 1.0
    stride = -(-n_rows // max(1, int(hessian_rows)))
    used = -(-n_rows // stride)
    return slice(0, n_rows, stride), n_rows / used


def _augmented_gram(X: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[1 | X]^T diag(weights) [1 | X]`` for ``weights >= 0``, as
    ``A^T A`` with ``A = sqrt(weights) [1 | X]`` (one symmetric BLAS
    product, in the dtype of ``X``), returned in float64."""
    root = np.sqrt(np.maximum(weights, 0, dtype=X.dtype))
    A = np.empty((X.shape[0], X.shape[1] + 1), dtype=X.dtype)
    A[:, 0] = root
    np.multiply(X, root[:, None], out=A[:, 1:])
    return np.asarray(A.T @ A, dtype=np.float64)


def _softmax_hessian(X: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The flat Hessian of the softmax loss sum (see the module docs): for
    each pair of classes ``(c, c')``, ``Xa^T diag(p_c (delta - p_c')) Xa``."""
    n_rows, k = probs.shape
    rows = X.shape[1] + 1
    out = np.zeros((rows, k, rows, k))
    for start in range(0, n_rows, SOFTMAX_HESSIAN_BLOCK_ROWS):
        stop = min(n_rows, start + SOFTMAX_HESSIAN_BLOCK_ROWS)
        Xa = np.empty((stop - start, rows), dtype=X.dtype)
        Xa[:, 0] = 1
        Xa[:, 1:] = X[start:stop]
        p = probs[start:stop]
        for c in range(k):
            # p_c (1 - p_c) with 1 - p_c as the sum of the other classes
            # (no cancellation when p_c is close to 1).
            others = p.sum(axis=1) - p[:, c]
            for c2 in range(c, k):
                weight = p[:, c] * others if c2 == c else -(p[:, c] * p[:, c2])
                block = np.asarray((Xa * weight[:, None]).T @ Xa, dtype=np.float64)
                out[:, c, :, c2] += block
                if c2 != c:
                    out[:, c2, :, c] += block.T
    return out.reshape(rows * k, rows * k)


def _design(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    return as_features(batch["X"]), np.asarray(batch["y"])


def _linear_predictor(X: np.ndarray, coef: np.ndarray, k: int) -> np.ndarray:
    C = np.asarray(coef, dtype=X.dtype).reshape(X.shape[1] + 1, k)
    z = X @ C[1:]
    z += C[0]
    return z.reshape(-1) if k == 1 else z


def _terms_from_head(
    model: _LinearModel,
    X: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    *,
    with_grad: bool,
    with_hessian: bool,
    hessian_rows: int | None,
) -> SecondOrderTerms:
    # A trial point may overflow exp(): the sums are then inf or nan, and the
    # optimizer rejects the point (no floating-point warnings).
    with np.errstate(over="ignore", invalid="ignore"):
        return _terms(model, X, y, z, with_grad, with_hessian, hessian_rows)


def _terms(
    model: _LinearModel,
    X: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    with_grad: bool,
    with_hessian: bool,
    hessian_rows: int | None,
) -> SecondOrderTerms:
    head = model._head(z, y, need_grad=with_grad or with_hessian)
    n = int(X.shape[0])
    if head.dz is None:
        return SecondOrderTerms(head.loss_sum, np.zeros(0), None, n, head.metrics)
    dz = head.dz.reshape(n, -1)
    grad = np.empty((X.shape[1] + 1, dz.shape[1]))
    grad[0] = dz.sum(axis=0, dtype=np.float64)
    grad[1:] = np.asarray(X.T @ dz, dtype=np.float64)
    hessian = None
    if with_hessian:
        rows, scale = _hessian_subset(n, hessian_rows)
        if isinstance(model, SoftmaxRegression):
            probs = dz[rows].copy()
            probs[np.arange(probs.shape[0]), y[rows].astype(np.intp)] += 1
            hessian = _softmax_hessian(X[rows], probs)
        else:
            weights = _SCALAR_CURVATURES[type(model)](dz[rows, 0], y[rows])
            hessian = _augmented_gram(X[rows], weights)
        if scale != 1.0:
            hessian *= scale
    return SecondOrderTerms(head.loss_sum, grad.ravel(), hessian, n, head.metrics)


def _check_model(model: Model) -> _LinearModel:
    if not supports_second_order(model) or not isinstance(model, _LinearModel):
        raise TypeError(
            f"{type(model).__name__} has no second-order kernel; Newton supports "
            f"LinearRegression, LogisticRegression, SoftmaxRegression, "
            f"PoissonRegression and GammaRegression"
        )
    return model


def second_order_terms(
    model: Model,
    coef: np.ndarray,
    batch: Batch,
    *,
    with_grad: bool = True,
    with_hessian: bool = True,
    hessian_rows: int | None = None,
) -> SecondOrderTerms:
    """Sums over ``batch`` of the data loss, its gradient and its Hessian in
    the flat coefficients ``coef`` (see the module docs).

    Parameters
    ----------
    model
        A model for which :func:`supports_second_order` holds.
    coef
        Flat coefficients, ``flatten({"b": b, "w": w})``.
    batch
        ``{"X": (n, d), "y": ...}``.
    with_grad, with_hessian
        What to compute besides the loss (a Hessian implies the gradient).
    hessian_rows
        Compute the Hessian on every ``ceil(n / hessian_rows)``-th row and
        scale it to ``n`` rows; ``None``: all rows.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain import models
    >>> batch = {"X": np.array([[1.0], [2.0]]), "y": np.array([1.0, 3.0])}
    >>> t = second_order_terms(models.LinearRegression(), np.zeros(2), batch)
    >>> t.loss_sum, t.grad, t.hessian
    (5.0, array([-4., -7.]), array([[2., 3.],
           [3., 5.]]))
    """
    m = _check_model(model)
    X, y = _design(batch)
    rows, k = coef_shape(m, X.shape[1])
    if np.shape(coef) != (rows * k,):
        raise ValueError(f"coef has shape {np.shape(coef)}, expected ({rows * k},)")
    z = _linear_predictor(X, coef, k)
    return _terms_from_head(
        m,
        X,
        y,
        z,
        with_grad=with_grad,
        with_hessian=with_hessian,
        hessian_rows=hessian_rows,
    )


def second_order_terms_many(
    model: Model,
    coefs: Sequence[np.ndarray],
    batch: Batch,
    *,
    hessian_index: int | None = 0,
    hessian_rows: int | None = None,
) -> list[SecondOrderTerms]:
    """:func:`second_order_terms` with gradients at several coefficient
    vectors, with one matrix product ``X @ [C_1 .. C_m]`` for all of them; the
    Hessian only at ``coefs[hessian_index]`` (``None``: nowhere)."""
    m = _check_model(model)
    X, y = _design(batch)
    rows, k = coef_shape(m, X.shape[1])
    if len(coefs) == 1:
        return [
            second_order_terms(
                m,
                coefs[0],
                batch,
                with_hessian=hessian_index == 0,
                hessian_rows=hessian_rows,
            )
        ]
    stacked = np.concatenate(
        [np.asarray(c, dtype=X.dtype).reshape(rows, k) for c in coefs], axis=1
    )
    Z = X @ stacked[1:]
    Z += stacked[0]
    out = []
    for i in range(len(coefs)):
        z = np.ascontiguousarray(Z[:, i * k : (i + 1) * k])
        out.append(
            _terms_from_head(
                m,
                X,
                y,
                z.reshape(-1) if k == 1 else z,
                with_grad=True,
                with_hessian=hessian_index == i,
                hessian_rows=hessian_rows,
            )
        )
    return out


def terms_to_params(coef: np.ndarray, like: Mapping[str, Any]) -> Params:
    """``{"b": ..., "w": ...}`` of flat coefficients, shaped like ``like``."""
    b_size = int(np.size(like["b"]))
    return {
        "b": np.asarray(coef[:b_size], dtype=np.float64).reshape(np.shape(like["b"])),
        "w": np.asarray(coef[b_size:], dtype=np.float64).reshape(np.shape(like["w"])),
    }
