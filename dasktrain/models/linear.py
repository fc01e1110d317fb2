"""Linear models: least squares, logistic and softmax regression.

Every model here computes ``z = X @ w + b`` and feeds it to a *head*: a
per-row loss of ``z`` and the label.  The heads are shared with
:mod:`dasktrain.models.mlp`, whose output layer feeds the same losses.

Kernels compute in the dtype of ``X`` (float32 or float64) and accumulate the
returned sums in float64.  Pure NumPy: no dask, no zarr.
"""

from __future__ import annotations

import logging
import math
import numbers
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from dasktrain.errors import DataValidationError
from dasktrain.models.base import Batch, LabelProblem, Model, Params, register
from dasktrain.partial import Partial
from dasktrain.schema import Schema

__all__ = ["LinearRegression", "LogisticRegression", "SoftmaxRegression"]

logger = logging.getLogger(__name__)

#: dtypes the kernels compute in; other inputs are cast to the nearest one
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: dtype kinds accepted for labels: bool, signed and unsigned int, float
LABEL_KINDS = "biuf"
#: ``sum(y**2) - sum(y)**2 / n`` below this fraction of ``sum(y**2)`` is
#: rounding noise: the labels are constant and R^2 is undefined
R2_CANCELLATION = 1e-12
#: rows at most this wide are reduced column by column (faster than axis=1)
SMALL_ROW_WIDTH = 32


# ---------------------------------------------------------------------------
# Hyper-parameter validation
# ---------------------------------------------------------------------------


def nonnegative_float(name: str, value: object) -> float:
    """``value`` as a finite float >= 0, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return out


def integer_at_least(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    out = int(value)
    if out < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


# ---------------------------------------------------------------------------
# Schema and label checks
# ---------------------------------------------------------------------------


def _dtype_or_none(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:
        return None


def check_features(schema: Schema, owner: str) -> int:
    """Check that ``X`` has rows of shape ``(d,)`` and a float dtype; return d."""
    info = schema.fields.get("X")
    if info is None:
        raise DataValidationError(
            f"field 'X' is missing: {owner} needs 'X' with row shape (d,) and "
            f"dtype float32 or float64; found fields {sorted(schema.fields)}"
        )
    dtype = _dtype_or_none(info.dtype)
    if len(info.shape) != 1 or info.shape[0] < 1 or dtype not in KERNEL_DTYPES:
        raise DataValidationError(
            f"field 'X': {owner} expects row shape (d,) with d >= 1 and dtype "
            f"float32 or float64; found row shape {info.shape} and dtype {info.dtype}"
        )
    return int(info.shape[0])


def check_targets(schema: Schema, owner: str, row_shape: tuple[int, ...]) -> None:
    """Check that ``y`` has rows of shape ``row_shape`` and a numeric dtype."""
    info = schema.fields.get("y")
    if info is None:
        raise DataValidationError(
            f"field 'y' is missing: {owner} needs 'y' with row shape {row_shape} "
            f"and a numeric or bool dtype; found fields {sorted(schema.fields)}"
        )
    dtype = _dtype_or_none(info.dtype)
    if tuple(info.shape) != row_shape or dtype is None or dtype.kind not in LABEL_KINDS:
        raise DataValidationError(
            f"field 'y': {owner} expects row shape {row_shape} and a numeric or "
            f"bool dtype; found row shape {info.shape} and dtype {info.dtype}"
        )


def _format_label(value: Any) -> str:
    """``7`` for an integral float label, ``2.5`` or ``nan`` otherwise."""
    if isinstance(value, np.ndarray):
        return str(value)
    as_float = float(value)
    if math.isfinite(as_float) and as_float.is_integer():
        return str(int(as_float))
    return str(value)


def _first_true_row(bad: np.ndarray) -> int | None:
    """Index of the first row with a ``True`` entry, or ``None``."""
    if bad.shape[0] == 0:
        return None
    if bad.ndim > 1:
        bad = np.any(bad.reshape(bad.shape[0], -1), axis=1)
    row = int(np.argmax(bad))
    return row if bad[row] else None


def _unusable_dtype(y: np.ndarray, owner: str) -> LabelProblem | None:
    if y.shape[0] > 0 and y.dtype.kind not in LABEL_KINDS:
        return 0, f"labels of dtype {y.dtype} are not numeric ({owner})"
    return None


def check_finite_labels(y: np.ndarray, owner: str) -> LabelProblem | None:
    """First row of regression targets holding NaN or infinity."""
    y = np.atleast_1d(np.asarray(y))
    problem = _unusable_dtype(y, owner)
    if problem is not None or y.dtype.kind != "f":
        return problem
    row = _first_true_row(~np.isfinite(y))
    if row is None:
        return None
    return row, f"label {_format_label(y[row])} is not finite ({owner})"


def check_binary_labels(y: np.ndarray, owner: str) -> LabelProblem | None:
    """First row whose label is not 0 or 1."""
    y = np.atleast_1d(np.asarray(y))
    problem = _unusable_dtype(y, owner)
    if problem is not None or y.dtype.kind == "b":
        return problem
    row = _first_true_row((y != 0) & (y != 1))
    if row is None:
        return None
    return row, f"label {_format_label(y[row])} is not in {{0, 1}} ({owner})"


def check_class_labels(
    y: np.ndarray, n_classes: int, owner: str
) -> LabelProblem | None:
    """First row whose label is not an integer class id in ``[0, n_classes)``."""
    y = np.atleast_1d(np.asarray(y))
    problem = _unusable_dtype(y, owner)
    if problem is not None or y.dtype.kind == "b":
        return problem
    integral: np.ndarray | None = None
    if y.dtype.kind == "f":
        integral = np.asarray(y == np.floor(y))
        bad = ~(integral & (y >= 0) & (y < n_classes))
    else:
        bad = np.asarray((y < 0) | (y >= n_classes))
    row = _first_true_row(bad)
    if row is None:
        return None
    label = _format_label(y[row])
    if integral is not None and not integral[row]:
        return row, f"label {label} is not an integer class id ({owner})"
    return row, f"class id {label} is not in [0, {n_classes}) ({owner})"


# ---------------------------------------------------------------------------
# Kernels shared with the MLP
# ---------------------------------------------------------------------------


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a kernel computes in for inputs of ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype in KERNEL_DTYPES:
        return dtype
    if dtype.kind == "f" and dtype.itemsize < np.dtype(np.float32).itemsize:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def as_features(X: np.ndarray) -> np.ndarray:
    """``X`` as a float32 or float64 array (no copy when it already is one)."""
    X = np.asarray(X)
    return X.astype(compute_dtype(X.dtype), copy=False)


def sum_rows(a: np.ndarray) -> np.ndarray:
    """Column sums of ``a`` (or the sum of a vector) in float64, as an array."""
    return np.asarray(a.sum(axis=0, dtype=np.float64))


def to_float64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64, copy=False)


class Head(NamedTuple):
    """Result of a loss head: float64 loss sum, gradient of the per-row losses
    with respect to the head's input (or ``None``), and metric sums."""

    loss_sum: float
    dz: np.ndarray | None
    metrics: dict[str, float]


def regression_metric_names(n_outputs: int) -> tuple[str, ...]:
    """Metric keys of :func:`squared_head` for ``n_outputs`` targets per row."""
    if n_outputs == 1:
        return ("sq_err", "y_sum", "y_sq_sum")
    return tuple(
        f"{key}_{j}"
        for key in ("sq_err", "y_sum", "y_sq_sum")
        for j in range(n_outputs)
    )


def squared_head(z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
    """Half squared error ``0.5 * sum((z - y)**2)``; overwrites ``z``.

    ``z`` is ``(n,)`` (one target; metrics ``sq_err``, ``y_sum``, ``y_sq_sum``)
    or ``(n, k)`` (metrics suffixed ``_0`` ... ``_{k-1}``, one per target).
    """
    resid = z
    resid -= y.astype(z.dtype, copy=False)
    resid64 = to_float64(resid)
    y64 = np.asarray(y, dtype=np.float64)
    if resid.ndim == 1:
        sq_err = float(np.dot(resid64, resid64))
        metrics = {
            "sq_err": sq_err,
            "y_sum": float(y64.sum()),
            "y_sq_sum": float(np.dot(y64, y64)),
        }
    else:
        sq_cols = np.einsum("ij,ij->j", resid64, resid64)
        y_sums = y64.sum(axis=0)
        y_sq_cols = np.einsum("ij,ij->j", y64, y64)
        sq_err = float(sq_cols.sum())
        metrics = {}
        for key, values in (
            ("sq_err", sq_cols),
            ("y_sum", y_sums),
            ("y_sq_sum", y_sq_cols),
        ):
            metrics.update({f"{key}_{j}": float(v) for j, v in enumerate(values)})
    return Head(0.5 * sq_err, resid if need_grad else None, metrics)


def logistic_head(z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
    """Logistic loss ``log(1 + exp(-s))``, ``s = (2y - 1) z``; overwrites ``z``.

    ``y`` holds 0/1 labels of any numeric or bool dtype.  The gradient with
    respect to ``z`` is ``sigmoid(z) - y = (1 - 2y) * sigmoid(-s)``, and
    ``sigmoid(-s) = exp(-s - loss)`` reuses the loss just computed.
    """
    correct = int(np.count_nonzero((z > 0) == (y != 0)))
    flip = y.astype(z.dtype)  # a fresh array: becomes 1 - 2y
    flip *= -2
    flip += 1
    neg_margin = z
    neg_margin *= flip  # -s
    row_loss = np.logaddexp(0, neg_margin)
    loss_sum = float(np.sum(row_loss, dtype=np.float64))
    dz = None
    if need_grad:
        neg_margin -= row_loss
        np.exp(neg_margin, out=neg_margin)  # sigmoid(-s)
        neg_margin *= flip
        dz = neg_margin
    return Head(loss_sum, dz, {"correct": float(correct)})


def _row_max(z: np.ndarray) -> np.ndarray:
    """Maximum of each row of ``z`` (``(n, k)``).  For few columns a loop of
    column-wise maxima is several times faster than ``z.max(axis=1)``."""
    if z.shape[1] > SMALL_ROW_WIDTH:
        return z.max(axis=1)
    out = z[:, 0].copy()
    for j in range(1, z.shape[1]):
        np.maximum(out, z[:, j], out=out)
    return out


def softmax_head(z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
    """Cross entropy of ``softmax(z)`` (``(n, k)``) against class ids ``y``;
    overwrites ``z``.  The gradient with respect to ``z`` is
    ``softmax(z) - onehot(y)``."""
    n_rows, n_classes = z.shape
    rows = np.arange(n_rows)
    ids = y.astype(np.intp, copy=False)
    correct = int(np.count_nonzero(z.argmax(axis=1) == ids))
    z -= _row_max(z)[:, None]
    true_logit = z[rows, ids]
    np.exp(z, out=z)
    denom = z @ np.ones(n_classes, dtype=z.dtype)
    row_loss = np.log(denom)
    row_loss -= true_logit
    loss_sum = float(np.sum(row_loss, dtype=np.float64))
    dz = None
    if need_grad:
        np.reciprocal(denom, out=denom)
        z *= denom[:, None]
        z[rows, ids] -= 1
        dz = z
    return Head(loss_sum, dz, {"correct": float(correct)})


def sigmoid_columns(z: np.ndarray) -> np.ndarray:
    """``[sigmoid(-z), sigmoid(z)]`` as an ``(n, 2)`` array, stable in both tails."""
    out = np.empty((z.shape[0], 2), dtype=z.dtype)
    np.logaddexp(0, z, out=out[:, 0])
    np.logaddexp(0, -z, out=out[:, 1])
    np.negative(out, out=out)
    np.exp(out, out=out)
    return out


def softmax_rows(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``z``; overwrites and returns it."""
    z -= _row_max(z)[:, None]
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def regression_summary(partial: Partial, n_outputs: int) -> dict[str, float]:
    """``loss``, ``mse`` (mean over rows and targets) and ``r2`` (mean over
    targets, as scikit-learn's ``r2_score``) from the sums of
    :func:`squared_head`; ``nan`` where undefined."""
    n = partial.n_rows
    m = partial.metrics
    suffixes = [""] if n_outputs == 1 else [f"_{j}" for j in range(n_outputs)]
    sq_errs = [m[f"sq_err{s}"] for s in suffixes]
    r2s = []
    for s, sq_err in zip(suffixes, sq_errs, strict=True):
        y_sq_sum = m[f"y_sq_sum{s}"]
        ss_tot = y_sq_sum - m[f"y_sum{s}"] ** 2 / n if n else float("nan")
        defined = n > 0 and ss_tot > R2_CANCELLATION * y_sq_sum
        r2s.append(1.0 - sq_err / ss_tot if defined else float("nan"))
    mse = sum(sq_errs) / (n * n_outputs) if n else float("nan")
    return {"loss": partial.mean_loss(), "mse": mse, "r2": sum(r2s) / n_outputs}


def classification_summary(partial: Partial) -> dict[str, float]:
    """``loss`` and ``accuracy`` (``nan`` for zero rows)."""
    n = partial.n_rows
    accuracy = partial.metrics["correct"] / n if n else float("nan")
    return {"loss": partial.mean_loss(), "accuracy": accuracy}


def weight_penalty(w: np.ndarray, *, l2: float, l1: float) -> float:
    """``(l2 / 2) * ||w||^2 + l1 * ||w||_1`` in float64."""
    w = np.asarray(w, dtype=np.float64)
    total = 0.0
    if l2:
        total += 0.5 * l2 * float(np.vdot(w, w))
    if l1:
        total += l1 * float(np.abs(w).sum())
    return total


def weight_penalty_grad(w: np.ndarray, *, l2: float, l1: float) -> np.ndarray:
    """``l2 * w + l1 * sign(w)`` in float64 (a subgradient at ``w == 0``)."""
    w = np.asarray(w, dtype=np.float64)
    grad = l2 * w
    if l1:
        grad += l1 * np.sign(w)
    return grad


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class _LinearModel(Model):
    """``z = X @ w + b`` followed by a loss head; L2/L1 penalty on ``w``."""

    def __init__(self, *, l2: float = 0.0, l1: float = 0.0) -> None:
        self._l2 = nonnegative_float("l2", l2)
        self._l1 = nonnegative_float("l1", l1)

    @property
    def l2(self) -> float:
        """L2 penalty strength: ``(l2 / 2) * ||w||^2`` is added to the mean loss."""
        return self._l2

    @property
    def l1(self) -> float:
        """L1 penalty strength: ``l1 * ||w||_1`` is added to the mean loss."""
        return self._l1

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, "l2": self._l2, "l1": self._l1}

    # -- subclass hooks ------------------------------------------------------
    @property
    def _owner(self) -> str:
        """How label messages name this model."""
        return type(self).__name__

    @property
    @abstractmethod
    def _n_outputs(self) -> int | None:
        """Columns of ``w`` (``None``: ``w`` is a vector)."""

    @abstractmethod
    def _head(self, z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head: ...

    # -- data checks ---------------------------------------------------------
    def check_schema(self, schema: Schema) -> None:
        check_features(schema, self._owner)
        check_targets(schema, self._owner, ())

    # -- maths ---------------------------------------------------------------
    def init(self, rng: np.random.Generator, schema: Schema) -> Params:
        """All-zero ``w`` and ``b`` (the objective is convex; ``rng`` is unused)."""
        self.check_schema(schema)
        n_features = schema.n_features
        k = self._n_outputs
        w_shape = (n_features,) if k is None else (n_features, k)
        b_shape = () if k is None else (k,)
        logger.debug("%s: zero init, w %s, b %s", self._owner, w_shape, b_shape)
        return {"w": np.zeros(w_shape), "b": np.zeros(b_shape)}

    def decision_function(self, params: Params, X: np.ndarray) -> np.ndarray:
        """``X @ w + b`` in float32 for float32 (or smaller) ``X``, else float64."""
        X = as_features(X)
        z = X @ np.asarray(params["w"], dtype=X.dtype)
        z += np.asarray(params["b"], dtype=X.dtype)
        return z

    def _evaluate(self, params: Params, batch: Batch, *, need_grad: bool) -> Partial:
        X = as_features(batch["X"])
        z = X @ np.asarray(params["w"], dtype=X.dtype)
        z += np.asarray(params["b"], dtype=X.dtype)
        head = self._head(z, np.asarray(batch["y"]), need_grad=need_grad)
        grads: Params = {}
        if head.dz is not None:
            grads = {"w": to_float64(X.T @ head.dz), "b": sum_rows(head.dz)}
        return Partial(head.loss_sum, grads, int(X.shape[0]), head.metrics)

    def loss_and_grad(self, params: Params, batch: Batch) -> Partial:
        return self._evaluate(params, batch, need_grad=True)

    def loss_and_grad_many(
        self, params_list: Sequence[Params], batch: Batch
    ) -> list[Partial]:
        """All parameter sets in two matrix products: ``X @ [w_1 .. w_k]``
        and ``X.T @ [dz_1 .. dz_k]``, so ``X`` is streamed through memory
        twice, not ``2 k`` times."""
        if len(params_list) < 2:
            return [self.loss_and_grad(p, batch) for p in params_list]
        X = as_features(batch["X"])
        y = np.asarray(batch["y"])
        d = X.shape[1]
        ws = [np.asarray(p["w"], dtype=X.dtype).reshape(d, -1) for p in params_list]
        width = ws[0].shape[1]
        Z = X @ np.concatenate(ws, axis=1)
        heads = []
        for i, p in enumerate(params_list):
            z = np.ascontiguousarray(Z[:, i * width : (i + 1) * width])
            if self._n_outputs is None:
                z = z.reshape(-1)
            z += np.asarray(p["b"], dtype=X.dtype)
            heads.append(self._head(z, y, need_grad=True))
        dzs = [h.dz for h in heads if h.dz is not None]
        dz = np.concatenate([a.reshape(X.shape[0], width) for a in dzs], axis=1)
        G = to_float64(X.T @ dz)
        out = []
        for i, (p, head, dz_i) in enumerate(zip(params_list, heads, dzs, strict=True)):
            gw = G[:, i * width : (i + 1) * width].reshape(np.shape(p["w"]))
            grads = {"w": np.ascontiguousarray(gw), "b": sum_rows(dz_i)}
            out.append(Partial(head.loss_sum, grads, int(X.shape[0]), head.metrics))
        return out

    def loss(self, params: Params, batch: Batch) -> Partial:
        return self._evaluate(params, batch, need_grad=False)

    def penalty(self, params: Params) -> float:
        return weight_penalty(params["w"], l2=self._l2, l1=self._l1)

    def l1_strengths(self) -> dict[str, float]:
        return {"w": self._l1} if self._l1 > 0.0 else {}

    def penalty_grad(self, params: Params) -> Params:
        return {
            "w": weight_penalty_grad(params["w"], l2=self._l2, l1=self._l1),
            "b": np.zeros(np.shape(params["b"])),
        }


@register
class LinearRegression(_LinearModel):
    """Least squares with optional L2 (ridge) and L1 (lasso) penalties.

    Minimizes, over ``w`` of shape ``(d,)`` and scalar ``b``::

        mean_i 0.5 * (y_i - (x_i @ w + b))**2 + (l2 / 2) * ||w||^2 + l1 * ||w||_1

    so ``l2 = alpha / n_rows`` gives scikit-learn's ``Ridge(alpha)`` and
    ``l1 = alpha`` gives ``Lasso(alpha)``.  The intercept is not penalized.

    Parameters
    ----------
    l2 : float, default 0.0
        L2 penalty strength (>= 0).
    l1 : float, default 0.0
        L1 penalty strength (>= 0).

    Notes
    -----
    Metrics: ``sq_err`` (sum of squared errors), ``y_sum`` and ``y_sq_sum``;
    :meth:`summarize` turns them into ``loss``, ``mse`` and ``r2``.

    Examples
    --------
    >>> import numpy as np
    >>> model = LinearRegression(l2=0.1)
    >>> params = {"w": np.array([1.0, 2.0]), "b": np.array(0.5)}
    >>> batch = {"X": np.array([[1.0, 0.0], [0.0, 1.0]]), "y": np.array([1.0, 3.0])}
    >>> part = model.loss_and_grad(params, batch)
    >>> part.loss_sum, part.grads["w"], part.n_rows
    (0.25, array([ 0.5, -0.5]), 2)
    >>> model.penalty(params)
    0.25
    >>> model.predict(params, batch["X"])
    array([1.5, 2.5])
    """

    kind: ClassVar[str] = "LinearRegression"
    is_classifier: ClassVar[bool] = False

    @property
    def _n_outputs(self) -> int | None:
        return None

    def _head(self, z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
        return squared_head(z, y, need_grad=need_grad)

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        return check_finite_labels(y, self._owner)

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Predicted values ``X @ w + b`` (float32 for float32 ``X``)."""
        return self.decision_function(params, X)

    def metric_names(self) -> tuple[str, ...]:
        return regression_metric_names(1)

    def summarize(self, partial: Partial) -> dict[str, float]:
        return regression_summary(partial, 1)


@register
class LogisticRegression(_LinearModel):
    """Binary logistic regression with optional L2 and L1 penalties.

    With labels ``y_i`` in ``{0, 1}`` and ``s_i = (2 y_i - 1) (x_i @ w + b)``,
    minimizes over ``w`` of shape ``(d,)`` and scalar ``b``::

        mean_i log(1 + exp(-s_i)) + (l2 / 2) * ||w||^2 + l1 * ||w||_1

    so ``l2 = 1 / (C * n_rows)`` gives scikit-learn's
    ``LogisticRegression(C=C)``.  The intercept is not penalized.

    Parameters
    ----------
    l2 : float, default 0.0
        L2 penalty strength (>= 0).
    l1 : float, default 0.0
        L1 penalty strength (>= 0).

    Notes
    -----
    Labels may have any numeric or bool dtype.  Metric: ``correct`` (rows with
    ``(x @ w + b > 0) == y``); :meth:`summarize` reports ``loss`` and
    ``accuracy``.

    Examples
    --------
    >>> import numpy as np
    >>> model = LogisticRegression(l2=1e-3)
    >>> params = {"w": np.array([1.0, -1.0]), "b": np.array(0.0)}
    >>> batch = {"X": np.array([[2.0, 0.0], [0.0, 2.0]]), "y": np.array([1, 0])}
    >>> part = model.loss_and_grad(params, batch)
    >>> round(part.loss_sum, 4), part.metrics["correct"]
    (0.2539, 2.0)
    >>> model.predict(params, batch["X"])
    array([1, 0])
    >>> model.predict_proba(params, batch["X"]).round(3)
    array([[0.119, 0.881],
           [0.881, 0.119]])
    """

    kind: ClassVar[str] = "LogisticRegression"
    is_classifier: ClassVar[bool] = True

    @property
    def _n_outputs(self) -> int | None:
        return None

    def _head(self, z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
        return logistic_head(z, y, need_grad=need_grad)

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        return check_binary_labels(y, self._owner)

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Labels (int64, 0 or 1): 1 where ``X @ w + b > 0``."""
        return (self.decision_function(params, X) > 0).astype(np.int64)

    def predict_proba(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``[P(y=0), P(y=1)]``, shape ``(n, 2)``."""
        return sigmoid_columns(self.decision_function(params, X))

    def metric_names(self) -> tuple[str, ...]:
        return ("correct",)

    def summarize(self, partial: Partial) -> dict[str, float]:
        return classification_summary(partial)


@register
class SoftmaxRegression(_LinearModel):
    """Multinomial logistic (softmax) regression with L2 and L1 penalties.

    With class ids ``y_i`` in ``[0, k)`` and logits ``z_i = x_i @ w + b``
    (``w`` of shape ``(d, k)``, ``b`` of shape ``(k,)``), minimizes::

        mean_i (logsumexp(z_i) - z_i[y_i]) + (l2 / 2) * ||w||^2 + l1 * ||w||_1

    The intercepts are not penalized.

    Parameters
    ----------
    n_classes : int
        Number of classes ``k`` (>= 2).
    l2 : float, default 0.0
        L2 penalty strength (>= 0).
    l1 : float, default 0.0
        L1 penalty strength (>= 0).

    Notes
    -----
    Metric: ``correct`` (rows whose arg-max logit is the label);
    :meth:`summarize` reports ``loss`` and ``accuracy``.

    Examples
    --------
    >>> import numpy as np
    >>> model = SoftmaxRegression(3)
    >>> params = {"w": np.eye(3), "b": np.zeros(3)}
    >>> batch = {"X": 2.0 * np.eye(3), "y": np.array([0, 1, 1])}
    >>> part = model.loss_and_grad(params, batch)
    >>> part.grads["w"].shape, part.metrics["correct"]
    ((3, 3), 2.0)
    >>> model.predict(params, batch["X"])
    array([0, 1, 2])
    """

    kind: ClassVar[str] = "SoftmaxRegression"
    is_classifier: ClassVar[bool] = True

    def __init__(self, n_classes: int, *, l2: float = 0.0, l1: float = 0.0) -> None:
        super().__init__(l2=l2, l1=l1)
        self._n_classes = integer_at_least("n_classes", n_classes, 2)

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return self._n_classes

    def config(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "n_classes": self._n_classes,
            "l2": self._l2,
            "l1": self._l1,
        }

    @property
    def _owner(self) -> str:
        return f"{self.kind}(n_classes={self._n_classes})"

    @property
    def _n_outputs(self) -> int | None:
        return self._n_classes

    def _head(self, z: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
        return softmax_head(z, y, need_grad=need_grad)

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        return check_class_labels(y, self._n_classes, self._owner)

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Class ids (int64) of the largest logit."""
        return self.decision_function(params, X).argmax(axis=1).astype(np.int64)

    def predict_proba(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape ``(n, n_classes)``."""
        return softmax_rows(self.decision_function(params, X))

    def metric_names(self) -> tuple[str, ...]:
        return ("correct",)

    def summarize(self, partial: Partial) -> dict[str, float]:
        return classification_summary(partial)
