"""Preprocessing that travels with a run: feature standardization.

``Trainer(model, opt, store=..., standardize=True)`` (or a
:class:`Standardize` naming some columns) trains the model on standardized
features ``(X - mean) / std``.  The statistics are computed in one pass over
the training data on the cluster (the per-chunk sums of :class:`Moments` are
combined by the fixed reduction tree, so they are the same bits on any
number of workers) and stored in the parameter store's metadata
(``meta["preprocessing"]``) with the first version.  Every later use of the
run reads them from there: ``fit`` and ``evaluate`` read datasets through a
standardized view (applied on the workers as chunks are read),
``predict`` standardizes numpy and dask inputs, ``Trainer.resume`` and the
scikit-learn estimators (``standardize=True``) get them from the store.
The model's parameters are those of the standardized problem (so penalties
apply to standardized coefficients, as with scikit-learn's ``StandardScaler``
in a pipeline).

Pure NumPy: no dask, no zarr.

Examples
--------
>>> import numpy as np
>>> X = np.array([[1.0, 10.0], [3.0, 10.0]])
>>> moments = Moments()
>>> fitted = Standardize().fitted_from(moments.loss_and_grad({}, {"X": X}))
>>> fitted.mean, fitted.std
((2.0, 10.0), (1.0, 1.0))
>>> fitted.transform(X)
array([[-1.,  0.],
       [ 1.,  0.]])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dasktrain.errors import DataValidationError
from dasktrain.models.base import Batch, LabelProblem, Model, Params
from dasktrain.partial import Partial
from dasktrain.schema import Schema

__all__ = ["Moments", "Standardize", "moment_statistics"]

#: Field standardized.
FIELD = "X"
#: A statistics pass whose cancellation ratio exceeds this (6 of float64's
#: ~16 digits lost) is repeated about its mean.
MAX_CANCELLATION = 1e6
#: Gradient keys of a :class:`Moments` partial.
SUM, M2, SQUARED_MEANS = "sum", "m2", "squared_means"


@dataclass(frozen=True)
class Standardize:
    """Standardize feature columns: ``(X - mean) / std``.

    Parameters
    ----------
    columns : sequence of int, optional
        Columns of ``X`` to standardize (e.g. the numeric ones, not one-hot
        columns); ``None``: every column.  Others keep mean 0 and std 1.
    mean, std : tuple of float, optional
        The statistics, for every column; set by the trainer's statistics
        pass (leave them out).  A column with zero variance gets std 1.

    Examples
    --------
    >>> Standardize(columns=[0, 2]).config()
    {'columns': [0, 2], 'mean': None, 'std': None}
    """

    columns: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.columns is not None:
            cols = tuple(int(c) for c in self.columns)
            if any(c < 0 for c in cols) or len(set(cols)) != len(cols):
                raise ValueError(
                    f"columns must be distinct non-negative indices, got {cols}"
                )
            object.__setattr__(self, "columns", cols)
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None and self.std is not None:
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std)
            if len(mean) != len(std):
                raise ValueError("mean and std differ in length")
            if not all(math.isfinite(v) for v in mean) or not all(
                math.isfinite(v) and v > 0 for v in std
            ):
                raise ValueError("mean must be finite, std finite and > 0")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)

    @property
    def fitted(self) -> bool:
        """Whether the statistics are known."""
        return self.mean is not None

    def check_width(self, n_features: int) -> None:
        """Raise :class:`DataValidationError` if the columns or statistics do
        not fit ``n_features`` columns."""
        if self.columns is not None and any(c >= n_features for c in self.columns):
            raise DataValidationError(
                f"standardize columns {list(self.columns)} are outside the "
                f"{n_features} columns of X"
            )
        if self.mean is not None and len(self.mean) != n_features:
            raise DataValidationError(
                f"the standardization statistics have {len(self.mean)} columns, "
                f"X has {n_features}"
            )

    def fitted_from(
        self, moments: Partial, shift: np.ndarray | None = None
    ) -> Standardize:
        """The statistics from the summed :class:`Moments` partial of the
        training data, taken about ``shift`` (population std; 1 where it is 0).
        """
        mean, std, _ = moment_statistics(moments, shift)
        return self.with_statistics(mean, std)

    def with_statistics(self, mean: np.ndarray, std: np.ndarray) -> Standardize:
        """This standardization with the given per-column statistics (columns
        not standardized get mean 0 and std 1; zero stds become 1)."""
        mean = np.asarray(mean, dtype=np.float64)
        std = np.asarray(std, dtype=np.float64)
        std = np.where(std > 0, std, 1.0)
        if self.columns is not None:
            keep = np.zeros(mean.shape[0], dtype=bool)
            keep[list(self.columns)] = True
            mean = np.where(keep, mean, 0.0)
            std = np.where(keep, std, 1.0)
        return Standardize(
            self.columns,
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
        )

    def transform(self, X: np.ndarray) -> np.ndarray:
        """``(X - mean) / std`` in ``X``'s float dtype (float64 for others)."""
        if self.mean is None or self.std is None:
            raise RuntimeError("Standardize has no statistics yet (fit first)")
        values = np.asarray(X)
        if values.dtype.kind != "f":
            values = values.astype(np.float64)
        dtype = values.dtype
        mean = np.asarray(self.mean, dtype=dtype)
        std = np.asarray(self.std, dtype=dtype)
        return ((values - mean) / std).astype(dtype, copy=False)

    def config(self) -> dict[str, Any]:
        """JSON form, stored in the parameter store's metadata."""
        return {
            "columns": None if self.columns is None else list(self.columns),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Standardize:
        cols = config.get("columns")
        mean = config.get("mean")
        std = config.get("std")
        return cls(
            None if cols is None else tuple(int(c) for c in cols),
            None if mean is None else tuple(float(v) for v in mean),
            None if std is None else tuple(float(v) for v in std),
        )

    def same_spec(self, other: Standardize) -> bool:
        """Same columns (statistics aside)."""
        return self.columns == other.columns


def moment_statistics(
    moments: Partial, shift: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, population std and cancellation of summed :class:`Moments`
    partials taken about ``shift`` (the ``"shift"`` parameter of the pass).

    The squared deviations are the chunks' own (``m2``) plus those of the
    chunk means about the global mean, ``squared_means - n * (mean -
    shift)**2``, a difference of two large numbers when the data sit far
    from ``shift`` compared to their spread: ``cancellation`` is the largest
    ratio of ``n * (mean - shift)**2`` to the total (about ``1 / eps`` loses
    every digit).  A second pass about the first pass's mean makes it ~1.
    """
    n = int(moments.n_rows)
    if n < 1:
        raise DataValidationError("no rows to compute standardization statistics")
    total = np.asarray(moments.grads[SUM], dtype=np.float64)
    origin = np.zeros_like(total) if shift is None else np.asarray(shift, np.float64)
    centre = total / n  # mean - shift
    between = n * centre * centre
    m2 = np.asarray(moments.grads[M2], dtype=np.float64) + (
        np.asarray(moments.grads[SQUARED_MEANS], dtype=np.float64) - between
    )
    m2 = np.maximum(m2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(m2 > 0, between / m2, np.where(between > 0, np.inf, 0.0))
    std = np.sqrt(m2 / n)
    return origin + centre, std, float(ratio.max(initial=0.0))


class Moments(Model):
    """Not a model to train: the per-chunk sums a standardization needs, as a
    :class:`~dasktrain.partial.Partial` the engine's fixed tree sums.

    With ``x`` the rows minus the parameter ``"shift"`` (zeros if absent),
    for a chunk of ``n_i`` rows with mean ``m_i``: ``sum = sum(x)``, ``m2 =
    sum((x - m_i)**2)`` and ``squared_means = n_i * m_i**2`` (float64); see
    :func:`moment_statistics`.
    """

    kind = "moments"
    fields = (FIELD,)

    def config(self) -> dict[str, Any]:
        return {"type": self.kind}

    def check_schema(self, schema: Schema) -> None:
        info = schema.fields.get(FIELD)
        if info is None or len(info.shape) != 1:
            raise DataValidationError("standardization needs a 2-d field 'X'")

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        return None

    def init(self, rng: np.random.Generator, schema: Schema) -> Params:
        return {}

    def loss_and_grad(self, params: Params, batch: Batch) -> Partial:
        X = np.asarray(batch[FIELD], dtype=np.float64)
        if "shift" in params:
            X = X - np.asarray(params["shift"], dtype=np.float64)
        n = int(X.shape[0])
        if n == 0:
            zeros = np.zeros(X.shape[1])
            grads = {SUM: zeros, M2: zeros.copy(), SQUARED_MEANS: zeros.copy()}
            return Partial(0.0, grads, 0)
        total = X.sum(axis=0)
        mean = total / n
        centered = X - mean
        grads = {
            SUM: total,
            M2: np.einsum("ij,ij->j", centered, centered),
            SQUARED_MEANS: n * mean * mean,
        }
        return Partial(0.0, grads, n)

    def loss(self, params: Params, batch: Batch) -> Partial:
        return self.loss_and_grad(params, batch)

    def penalty(self, params: Params) -> float:
        return 0.0

    def penalty_grad(self, params: Params) -> Params:
        return {}

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        raise TypeError("Moments computes statistics; it does not predict")


def standardize_option(value: bool | Standardize | None) -> Standardize | None:
    """The ``standardize=`` option of the trainer as a :class:`Standardize`
    (``True``: every column; ``False``/``None``: none)."""
    if value is None or value is False:
        return None
    if value is True:
        return Standardize()
    if isinstance(value, Standardize):
        return value
    raise TypeError(
        f"standardize must be True, False or a dasktrain.preprocessing.Standardize, "
        f"got {value!r}"
    )
