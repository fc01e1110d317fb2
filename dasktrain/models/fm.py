"""Factorization machines: a sparse model with pairwise interactions of
categorical features, for ratings (squared loss) and clicks (logistic loss).

Pure NumPy: no dask, no zarr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from dasktrain.errors import DataValidationError
from dasktrain.models.base import Batch, LabelProblem, Params, register
from dasktrain.models.linear import (
    check_binary_labels,
    integer_at_least,
    nonnegative_float,
)
from dasktrain.models.sparse import (
    IdProblem,
    SparseModel,
    TableSpec,
    _check_dtype,
    _check_field,
    binary_outputs,
    check_regularization,
    finite_float,
    id_out_of_range,
    id_rows_problem,
    segment_sum,
    table_penalty,
)
from dasktrain.partial import Grad, Partial, RowSparse, id_positions
from dasktrain.schema import Schema

__all__ = ["FM_LOSSES", "FactorizationMachine"]

#: The losses of :class:`FactorizationMachine`.
FM_LOSSES = ("squared", "logistic")


def _check_field_sizes(value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(
            f"field_sizes must be a sequence of integers >= 1, got {value!r}"
        )
    sizes = tuple(integer_at_least("field_sizes", v, 1) for v in value)
    if not sizes:
        raise ValueError("field_sizes must name at least one field")
    return sizes


@register
class FactorizationMachine(SparseModel):
    r"""A second-order factorization machine (Rendle, 2010) on categorical
    ids, with optional per-id values and an optional dense linear part.

    Each row has ``f`` ids (one per categorical field), each with a value
    ``x_j`` (1 without ``values``).  Id ``j`` of the row uses row ``r_j`` of
    one shared table ``v``, whose rows hold an embedding ``e`` (``rank``
    wide) and a linear weight ``c`` (last column).  The score is::

        z = b + X . w + sum_j x_j c[r_j]
              + sum_{j < k} x_j x_k (e[r_j] . e[r_k])

    computed as ``0.5 * (||s||^2 - sum_j x_j^2 ||e[r_j]||^2)`` with ``s =
    sum_j x_j e[r_j]`` (linear in ``f``).  The model minimizes::

        mean over rows of loss(y, z)  +  penalty / n  +  (l2_linear / 2) ||w||^2

    with ``loss = 0.5 (y - z)^2`` (``"squared"``: ratings, regression) or
    ``log(1 + exp(-(2 y - 1) z))`` (``"logistic"``: clicks, ``y`` in
    ``{0, 1}``).  The penalty of table rows is ``(l2 / 2) ||e||^2 +
    (l2_linear / 2) c^2`` once per distinct row of each batch piece
    (``regularization="row"``, the default) or once per id of each data row
    (``"occurrence"``); see :mod:`dasktrain.models.sparse`.  The global bias
    ``b`` is not penalized.

    **One shared table.**  All fields index one table, so that a step
    pulls, updates and shares one set of shards however many fields the data
    has, and the layout matches ids that already live in one space (hashed
    features, or :func:`~dasktrain.datasets.make_sparse_classification`'s
    disjoint field ranges).  Three ways to map ids to rows:

    - default: ids are rows, in ``[0, n_ids)``;
    - ``field_sizes=(n_0, n_1, ...)``: id ``j`` of a row is local to field
      ``j`` (in ``[0, n_j)``) and uses row ``offset_j + id`` with ``offset_j
      = n_0 + ... + n_{j-1}``; ``n_ids`` must be ``sum(field_sizes)``;
    - ``hashed=True``: any int64 id, row ``id mod n_ids`` (collisions share a
      row, as in :class:`SparseLogisticRegression`).

    Data fields: ``ids`` (integers, row shape ``(f,)``), ``values`` (floats,
    ``(f,)``) with ``use_values=True``, ``X`` (floats, ``(n_numeric,)``) with
    ``n_numeric > 0``, and the target ``y``.

    Parameters
    ----------
    n_ids : int
        Rows of the table.
    rank : int
        Embedding width (``rank >= 1``).
    loss : {"squared", "logistic"}
        Data loss.
    l2, l2_linear : float
        L2 strengths of the embeddings and of the linear weights (table
        column ``c`` per occurrence, and the numeric weights ``w``).
    use_values : bool
        Read per-id values ``x_j`` from the ``values`` field.
    n_numeric : int
        Width of the numeric features ``X`` (0: no dense linear part).
    field_sizes : sequence of int, optional
        Per-field id ranges (see above).
    hashed : bool
        Map ids to rows by ``id mod n_ids``.
    regularization : {"row", "occurrence"}
        How table rows are penalized (see above).
    b_init : float
        Initial global bias, e.g. the mean rating (see
        :class:`MatrixFactorization`'s ``mu_init``).
    init_scale : float
        Standard deviation of the initial embeddings (linear weights start
        at 0).  Must be ``> 0``: with zero embeddings the interaction
        gradient is zero and the embeddings never move.
    dtype : {"float32", "float64"}
        Storage dtype of the table (computations run in float64).

    Parameters are ``"v"`` (the table, ``(n_ids, rank + 1)``), ``"b"`` (a
    scalar) and, with ``n_numeric > 0``, ``"w"`` (``(n_numeric,)``).

    Examples
    --------
    >>> import numpy as np
    >>> fm = FactorizationMachine(n_ids=10, rank=2, field_sizes=(4, 6))
    >>> params = fm.init(np.random.default_rng(0), None)
    >>> batch = {"ids": np.array([[0, 5], [3, 0]]), "y": np.array([4.0, 3.0])}
    >>> fm.loss_and_grad(params, batch).grads["v"].rows.tolist()  # offset 4
    [0, 3, 4, 9]
    """

    kind: ClassVar[str] = "FactorizationMachine"
    fields: ClassVar[tuple[str, ...]] = ("ids", "y")

    def __init__(
        self,
        n_ids: int,
        rank: int,
        *,
        loss: str = "squared",
        l2: float = 0.0,
        l2_linear: float = 0.0,
        use_values: bool = False,
        n_numeric: int = 0,
        field_sizes: Sequence[int] | None = None,
        hashed: bool = False,
        regularization: str = "row",
        b_init: float = 0.0,
        init_scale: float = 0.01,
        dtype: str = "float32",
    ) -> None:
        self.n_ids = integer_at_least("n_ids", n_ids, 1)
        self.rank = integer_at_least("rank", rank, 1)
        if loss not in FM_LOSSES:
            raise ValueError(f"loss must be one of {FM_LOSSES}, got {loss!r}")
        self.loss_name = loss
        self.l2 = nonnegative_float("l2", l2)
        self.l2_linear = nonnegative_float("l2_linear", l2_linear)
        for name, flag in (("use_values", use_values), ("hashed", hashed)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.use_values = use_values
        self.hashed = hashed
        self.n_numeric = integer_at_least("n_numeric", n_numeric, 0)
        self.field_sizes = _check_field_sizes(field_sizes)
        if self.field_sizes is not None:
            if hashed:
                raise ValueError("field_sizes and hashed=True exclude each other")
            if sum(self.field_sizes) != self.n_ids:
                raise ValueError(
                    f"n_ids must be sum(field_sizes) = {sum(self.field_sizes)}, "
                    f"got {self.n_ids}"
                )
        self.regularization = check_regularization(regularization)
        self.b_init = finite_float("b_init", b_init)
        self.init_scale = nonnegative_float("init_scale", init_scale)
        if self.init_scale == 0:
            raise ValueError(
                "init_scale must be > 0: zero embeddings have a zero gradient"
            )
        self.dtype = _check_dtype(dtype)
        fields = ["ids"]
        if use_values:
            fields.append("values")
        if self.n_numeric:
            fields.append("X")
        self.fields = (*fields, "y")  # type: ignore[misc]
        if loss == "logistic":
            self.is_classifier = True  # type: ignore[misc]
            self.summary_metrics = {"accuracy": ("correct", False)}  # type: ignore[misc]
        else:
            self.summary_metrics = {"rmse": ("sq_err", True)}  # type: ignore[misc]

    def config(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "n_ids": self.n_ids,
            "rank": self.rank,
            "loss": self.loss_name,
            "l2": self.l2,
            "l2_linear": self.l2_linear,
            "use_values": self.use_values,
            "n_numeric": self.n_numeric,
            "field_sizes": None if self.field_sizes is None else list(self.field_sizes),
            "hashed": self.hashed,
            "regularization": self.regularization,
            "b_init": self.b_init,
            "init_scale": self.init_scale,
            "dtype": self.dtype,
        }

    # -- parameters ----------------------------------------------------------
    def tables(self) -> dict[str, TableSpec]:
        return {
            "v": TableSpec(
                self.n_ids, self.rank + 1, self.dtype, self.init_scale, self.rank
            )
        }

    def init_dense(self, rng: np.random.Generator) -> Params:
        params: Params = {"b": np.asarray(self.b_init, dtype=np.float64)}
        if self.n_numeric:
            params["w"] = np.zeros(self.n_numeric, dtype=np.float64)
        return params

    def penalty(self, params: Params) -> float:
        """``(l2_linear / 2) ||w||^2`` of the numeric weights (table rows are
        penalized per occurrence, in each batch's sums)."""
        if not self.n_numeric or not self.l2_linear:
            return 0.0
        w = np.asarray(params["w"], dtype=np.float64)
        return 0.5 * self.l2_linear * float(w @ w)

    def penalty_grad(self, params: Params) -> Params:
        out = super().penalty_grad(params)
        if self.n_numeric and self.l2_linear:
            out["w"] = self.l2_linear * np.asarray(params["w"], dtype=np.float64)
        return out

    # -- data ----------------------------------------------------------------
    def check_schema(self, schema: Schema) -> None:
        owner = "FactorizationMachine"
        info = schema.fields.get("ids")
        if info is None or len(info.shape) != 1:
            raise DataValidationError(
                f"field 'ids': {owner} needs integer ids with row shape (f,); "
                f"found {'no such field' if info is None else info.shape}"
            )
        n_fields = int(info.shape[0])
        _check_field(schema, "ids", owner, (n_fields,), "iu")
        if self.field_sizes is not None and n_fields != len(self.field_sizes):
            raise DataValidationError(
                f"field 'ids': {owner} has {len(self.field_sizes)} field_sizes "
                f"but the rows have {n_fields} ids"
            )
        if self.use_values:
            _check_field(schema, "values", owner, (n_fields,), "f")
        if self.n_numeric:
            _check_field(schema, "X", owner, (self.n_numeric,), "f")
        y = schema.fields.get("y")
        if y is None or tuple(y.shape) != ():
            raise DataValidationError(
                f"field 'y': {owner} needs targets with row shape (); "
                f"found {'no such field' if y is None else y.shape}"
            )

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        if self.loss_name == "logistic":
            return check_binary_labels(y, "FactorizationMachine(loss='logistic')")
        return None

    def row_ids(self, batch: Batch) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["ids"], dtype=np.int64)
        if self.hashed:
            return {"v": np.mod(ids, self.n_ids)}
        if self.field_sizes is not None:
            offsets = np.cumsum((0, *self.field_sizes[:-1]), dtype=np.int64)
            return {"v": ids + offsets}
        return {"v": ids}

    def check_ids(self, batch: Batch) -> IdProblem | None:
        problem = id_rows_problem(batch, "", self.use_values)
        if problem is not None or self.hashed:
            return problem
        ids = np.asarray(batch["ids"])
        if self.field_sizes is None:
            return id_out_of_range(ids, self.n_ids, "ids", "")
        if ids.shape[1] != len(self.field_sizes):
            return (
                "ids",
                0,
                f"rows have {ids.shape[1]} ids, field_sizes names "
                f"{len(self.field_sizes)} fields",
            )
        return id_out_of_range(ids, self.field_sizes, "ids", "")

    # -- maths ---------------------------------------------------------------
    def _forward(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(z, E, x, s, inv)``: scores, gathered rows ``(n, f, rank + 1)``,
        values ``(n, f)``, ``s = sum_j x_j e_j`` and the row index of each id
        within ``rows["v"]``."""
        ids, vals = rows["v"]
        inv = id_positions(ids, self.row_ids(batch)["v"], self.n_ids)
        E = np.asarray(vals, dtype=np.float64)[inv]  # (n, f, rank + 1)
        k = self.rank
        if self.use_values:
            x = np.asarray(batch["values"], dtype=np.float64)
        else:
            x = np.ones(inv.shape, dtype=np.float64)
        emb = E[:, :, :k]
        s = np.einsum("nf,nfk->nk", x, emb)
        sq_norms = np.einsum("nfk,nfk->nf", emb, emb)
        z = (
            float(np.asarray(dense["b"]))
            + np.einsum("nf,nf->n", x, E[:, :, k])
            + 0.5 * np.einsum("nk,nk->n", s, s)
            - 0.5 * np.einsum("nf,nf->n", x * x, sq_norms)
        )
        if self.n_numeric:
            X = np.asarray(batch["X"], dtype=np.float64)
            z = z + X @ np.asarray(dense["w"], dtype=np.float64)
        return z, E, x, s, inv

    def sparse_loss_and_grad(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
        *,
        with_grads: bool = True,
    ) -> Partial:
        y = np.asarray(batch["y"]).astype(np.float64)
        n = int(y.shape[0])
        z, E, x, s, inv = self._forward(dense, rows, batch)
        k = self.rank
        if self.loss_name == "squared":
            err = z - y
            sq = float(err @ err)
            loss = 0.5 * sq
            metrics = {"sq_err": sq}
            dz = err
        else:
            loss = float(np.logaddexp(0.0, -(2.0 * y - 1.0) * z).sum())
            metrics = {"correct": float(((z > 0) == (y > 0.5)).sum())}
            # d loss / d z = sigmoid(z) - y
            dz = 0.5 * (1.0 + np.tanh(0.5 * z)) - y
        ids, vals = rows["v"]
        unique = np.asarray(vals, dtype=np.float64)
        penalty = 0.0
        row_grad = np.zeros(unique.shape, dtype=np.float64)
        for strength, cols in (
            (self.l2, slice(0, k)),
            (self.l2_linear, slice(k, k + 1)),
        ):
            if strength:
                p, g_row = table_penalty(
                    strength, self.regularization, E[:, :, cols], unique[:, cols]
                )
                penalty += p
                if g_row is not None:
                    row_grad[:, cols] = g_row
        metrics["penalty"] = penalty
        if not with_grads:
            return Partial(loss, {}, n, metrics)
        # d z / d e_j = x_j (s - x_j e_j);  d z / d c_j = x_j
        g = np.empty_like(E)
        g[:, :, :k] = (dz[:, None] * x)[:, :, None] * (
            s[:, None, :] - x[:, :, None] * E[:, :, :k]
        )
        g[:, :, k] = dz[:, None] * x
        if self.regularization == "occurrence":
            g[:, :, :k] += self.l2 * E[:, :, :k]
            g[:, :, k] += self.l2_linear * E[:, :, k]
        table = segment_sum(inv.ravel(), g.reshape(-1, k + 1), ids.shape[0])
        table += row_grad
        grads: dict[str, Grad] = {
            "b": np.asarray(dz.sum(), dtype=np.float64),
            "v": RowSparse(ids, table, (self.n_ids, k + 1)),
        }
        if self.n_numeric:
            X = np.asarray(batch["X"], dtype=np.float64)
            grads["w"] = X.T @ dz
        return Partial(loss, grads, n, metrics)

    # -- prediction ----------------------------------------------------------
    def predict_rows(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
        kind: str = "predict",
    ) -> np.ndarray:
        """Scores ``z`` (squared loss), or for the logistic loss labels
        (int64), probabilities ``[P(y=0), P(y=1)]`` or ``z``."""
        z, *_ = self._forward(dense, rows, batch)
        if self.loss_name == "squared":
            if kind != "predict":
                raise ValueError(f"FactorizationMachine(loss='squared') has no {kind}")
            return z
        return binary_outputs(z, kind, type(self).__name__)

    def decision_function(self, params: Params, X: Any) -> np.ndarray:
        return self._predict(params, X, "decision_function")

    def predict_proba(self, params: Params, X: Any) -> np.ndarray:
        return self._predict(params, X, "predict_proba")
