"""Models with embedding tables: matrix factorization and hashed wide linear
models.

Their large parameters are *tables*: 2-d arrays whose rows are looked up by
integer ids in the data (a user's embedding, a hashed feature's weight).  A
batch touches few rows, so gradients are row-sparse
(:class:`~dasktrain.partial.RowSparse`), and the trainer can keep tables in
row shards of the parameter store, updated on workers (see
``docs/parameter_server.md``), or, when they are small, as ordinary dense
parameters.  Both paths compute the same numbers.

What is summed and what is averaged.  The data loss is a mean over the
batch's rows (the engine divides every sum by the row count).  The L2 penalty
of a table row is added to the batch's sums (not to the reported data loss),
so its gradient only touches the rows of the batch, in one of two ways
(``regularization=``, see :data:`REGULARIZATIONS`):

- ``"occurrence"``: each data row adds ``(l2 / 2) * ||e||^2`` for each
  embedding ``e`` it uses.  A table row's penalty grows with its frequency,
  like its data loss: a user with 2 ratings is shrunk as hard, relative to its
  data, as one with 2,000.
- ``"row"``: each distinct table row a batch piece uses (a chunk, or a
  stream's share of one) adds ``(l2 / 2) * ||e||^2`` once.  The penalty of a
  row is then per step that touches it, not per occurrence, so rare rows are
  shrunk harder relative to their few ratings and frequent rows barely: the
  shape of a Gaussian prior on each embedding.

Pure NumPy: no dask, no zarr.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dasktrain.errors import DataValidationError
from dasktrain.models.base import Batch, LabelProblem, Model, Params, register
from dasktrain.models.linear import (
    check_binary_labels,
    integer_at_least,
    nonnegative_float,
    sigmoid_columns,
)
from dasktrain.partial import (
    Grad,
    Partial,
    RowSparse,
    id_positions,
    sum_by_index,
)
from dasktrain.schema import Schema

__all__ = [
    "INIT_BLOCK_ROWS",
    "REGULARIZATIONS",
    "MatrixFactorization",
    "SparseLogisticRegression",
    "SparseModel",
    "TableSpec",
    "segment_sum",
]

#: Table initialization draws its random numbers in blocks of this many rows,
#: each from its own seeded generator: the values of a row do not depend on
#: how the table is split into shards (or whether it is sharded at all).
INIT_BLOCK_ROWS = 4096

_TABLE_DTYPES = ("float32", "float64")

#: How table rows are penalized (see the module documentation).
REGULARIZATIONS = ("row", "occurrence")

#: ``(field, row, message)``: the first bad id of a batch (see
#: :meth:`SparseModel.check_ids`).
IdProblem = tuple[str, int, str]

#: How the messages of :func:`id_array_problem` name a layout of ids.
_ID_LAYOUTS = {1: "1-d", 2: "2-d (rows, f)"}


@dataclass(frozen=True)
class TableSpec:
    """A 2-d parameter table: ``n_rows`` rows of ``width`` values.

    ``init_scale``: initial values are normal with this standard deviation in
    the first ``n_random`` columns, zero in the others.
    """

    n_rows: int
    width: int
    dtype: str
    init_scale: float
    n_random: int

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.width * np.dtype(self.dtype).itemsize


def segment_sum(inverse: np.ndarray, values: np.ndarray, n_segments: int) -> np.ndarray:
    """``out[j] = sum of values[i] for inverse[i] == j`` (float64), adding in
    the order of ``i``: deterministic, the same bits as ``np.add.at``."""
    return sum_by_index(inverse, values, n_segments)


def _check_dtype(value: object) -> str:
    if value not in _TABLE_DTYPES:
        raise ValueError(f"dtype must be one of {_TABLE_DTYPES}, got {value!r}")
    return str(value)


def finite_float(name: str, value: object) -> float:
    """``value`` as a finite float, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    out = float(value)
    if not np.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out


def check_regularization(value: object) -> str:
    if value not in REGULARIZATIONS:
        raise ValueError(
            f"regularization must be one of {REGULARIZATIONS}, got {value!r}"
        )
    return str(value)


def table_penalty(
    l2: float, regularization: str, used: np.ndarray, unique: np.ndarray
) -> tuple[float, np.ndarray | None]:
    """``(penalty, gradient)`` of ``(l2 / 2) ||e||^2`` per ``"row"`` over the
    distinct gathered rows ``unique`` (the gradient is per distinct row), or
    per ``"occurrence"`` over the rows as used by the batch, ``used`` (the
    gradient is per use, to be summed by row).  Columns are those penalized."""
    if regularization == "row":
        return 0.5 * l2 * float(np.sum(unique * unique)), l2 * unique
    return 0.5 * l2 * float(np.sum(used * used)), None


def _check_field(
    schema: Schema, name: str, owner: str, shape: tuple[int, ...], kinds: str
) -> None:
    """``name`` exists with rows of ``shape`` and a dtype of ``kinds``
    ("iu": integer ids, "f": floats)."""
    what = "integer ids" if kinds == "iu" else "floats"
    info = schema.fields.get(name)
    if info is None:
        raise DataValidationError(
            f"field {name!r} is missing: {owner} needs {name!r} ({what}, row "
            f"shape {shape}); found fields {sorted(schema.fields)}"
        )
    if np.dtype(info.dtype).kind not in kinds or tuple(info.shape) != shape:
        raise DataValidationError(
            f"field {name!r}: {owner} expects {what} with row shape {shape}; "
            f"found row shape {info.shape} and dtype {info.dtype}"
        )


class SparseModel(Model):
    """A model with embedding tables (see the module documentation).

    Subclasses define the tables, the dense parameters, which table rows a
    batch uses, and the kernel over the gathered rows.
    """

    #: the dataset field holding the target (checked by :meth:`check_labels`)
    target: ClassVar[str] = "y"
    batch_penalty: ClassVar[bool] = True
    #: reported metric -> (the ``Partial.metrics`` sum it is the mean of,
    #: whether the square root of that mean is reported)
    summary_metrics: ClassVar[dict[str, tuple[str, bool]]] = {}

    # -- parameters ----------------------------------------------------------
    @abstractmethod
    def tables(self) -> dict[str, TableSpec]:
        """The tables, by parameter name."""

    @abstractmethod
    def init_dense(self, rng: np.random.Generator) -> Params:
        """Initial dense (small) parameters, float64."""

    def table_rows(self, name: str, seed: int, start: int, stop: int) -> np.ndarray:
        """Initial values of rows ``[start, stop)`` of table ``name`` (float64).

        Drawn per block of :data:`INIT_BLOCK_ROWS` rows from a generator
        seeded by ``(seed, table, block)``: any split gives the same values.
        """
        spec = self.tables()[name]
        if not 0 <= start <= stop <= spec.n_rows:
            raise ValueError(
                f"rows [{start}, {stop}) are not within table {name!r} of "
                f"{spec.n_rows} rows"
            )
        out = np.zeros((stop - start, spec.width), dtype=np.float64)
        if spec.init_scale == 0 or stop <= start or spec.n_random == 0:
            return out
        table_index = sorted(self.tables()).index(name)
        first = start // INIT_BLOCK_ROWS
        last = (stop - 1) // INIT_BLOCK_ROWS
        for block in range(first, last + 1):
            b0 = block * INIT_BLOCK_ROWS
            b1 = min(b0 + INIT_BLOCK_ROWS, spec.n_rows)
            rng = np.random.default_rng([seed, table_index, block])
            values = rng.normal(0.0, spec.init_scale, size=(b1 - b0, spec.n_random))
            lo, hi = max(start, b0), min(stop, b1)
            out[lo - start : hi - start, : spec.n_random] = values[lo - b0 : hi - b0]
        return out

    def table_seed(self, rng: np.random.Generator) -> int:
        """The seed of table initialization, drawn from the trainer's
        initialization generator (after :meth:`init_dense`)."""
        return int(rng.integers(0, 2**62))

    def init(self, rng: np.random.Generator, schema: Schema) -> Params:
        """All parameters as dense arrays (the unsharded path)."""
        params = self.init_dense(rng)
        seed = self.table_seed(rng)
        for name, spec in self.tables().items():
            params[name] = self.table_rows(name, seed, 0, spec.n_rows)
        return params

    # -- data ----------------------------------------------------------------
    @abstractmethod
    def row_ids(self, batch: Batch) -> dict[str, np.ndarray]:
        """For each table, the table row used by each batch entry (int64,
        shape ``(n,)`` or ``(n, f)``), all within ``[0, n_rows)``."""

    def check_ids(self, batch: Batch) -> IdProblem | None:
        """First id of ``batch`` outside its table: ``(field, row, message)``."""
        return None

    # -- maths ---------------------------------------------------------------
    @abstractmethod
    def sparse_loss_and_grad(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
        *,
        with_grads: bool = True,
    ) -> Partial:
        """Sums over ``batch``.  ``rows[name] = (ids, values)``: the unique
        sorted table rows the batch uses (see :meth:`row_ids`) and their
        values.  Table gradients are :class:`RowSparse` over those ``ids``;
        ``metrics["penalty"]`` holds the batch's regularization sum."""

    def gather(
        self, params: Mapping[str, np.ndarray], batch: Batch
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``rows`` for :meth:`sparse_loss_and_grad` from dense tables."""
        out = {}
        for name, ids in self.row_ids(batch).items():
            uniq = np.unique(ids)
            out[name] = (uniq, np.asarray(params[name])[uniq])
        return out

    def loss_and_grad(self, params: Params, batch: Batch) -> Partial:
        self._raise_bad_ids(batch)
        return self.sparse_loss_and_grad(params, self.gather(params, batch), batch)

    def loss(self, params: Params, batch: Batch) -> Partial:
        self._raise_bad_ids(batch)
        return self.sparse_loss_and_grad(
            params, self.gather(params, batch), batch, with_grads=False
        )

    def _raise_bad_ids(self, batch: Batch) -> None:
        problem = self.check_ids(batch)
        if problem is not None:
            field, row, message = problem
            raise DataValidationError(f"field {field!r}, row {row}: {message}")

    def penalty(self, params: Params) -> float:
        """0: the per-occurrence penalty is part of each batch's sums."""
        return 0.0

    def penalty_grad(self, params: Params) -> Params:
        return {
            k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in params.items()
        }

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        return None

    # -- prediction ----------------------------------------------------------
    @property
    def input_fields(self) -> tuple[str, ...]:
        """The fields :meth:`predict` needs (all fields but the target)."""
        return tuple(f for f in self.fields if f != self.target)

    @abstractmethod
    def predict_rows(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
        kind: str = "predict",
    ) -> np.ndarray:
        """Predictions (``kind``: "predict", "predict_proba" or
        "decision_function") from gathered rows, as in
        :meth:`sparse_loss_and_grad`."""

    def _predict(self, params: Params, X: Any, kind: str) -> np.ndarray:
        batch = _as_batch(X, self.input_fields)
        self._raise_bad_ids(batch)
        return self.predict_rows(params, self.gather(params, batch), batch, kind)

    def predict(self, params: Params, X: Any) -> np.ndarray:
        """Predictions for a batch: a mapping of :attr:`input_fields` to arrays."""
        return self._predict(params, X, "predict")

    def metric_names(self) -> tuple[str, ...]:
        return (*(key for key, _ in self.summary_metrics.values()), "penalty")

    def summarize(self, partial: Partial) -> dict[str, float]:
        """Mean loss, and the means (or root means) of :attr:`summary_metrics`."""
        n = partial.n_rows
        out = {"loss": partial.loss_sum / n if n else float("nan")}
        for name, (key, root) in self.summary_metrics.items():
            mean = partial.metrics.get(key, float("nan")) / n if n else float("nan")
            out[name] = float(np.sqrt(mean)) if root else mean
        return out

    def objective(self, partial: Partial) -> float:
        """Mean data loss plus mean penalty of a pass."""
        n = partial.n_rows
        return (partial.loss_sum + partial.metrics.get("penalty", 0.0)) / n


def _ids_noun(what: str, noun: str) -> str:
    return f"{what} {noun}" if what else noun


def id_array_problem(
    ids: np.ndarray, field: str, what: str, ndim: int
) -> IdProblem | None:
    """``ids`` are integers with ``ndim`` dimensions (1: one id per row, 2:
    ``(rows, f)``), else the problem, reported at row 0.  ``what`` qualifies
    the ids in the message (``"user"``: "user ids must be ...")."""
    noun = _ids_noun(what, "ids")
    if ids.dtype.kind not in "iu":
        return field, 0, f"{noun} must be integers, got dtype {ids.dtype}"
    if ids.ndim != ndim:
        return field, 0, f"{noun} must be {_ID_LAYOUTS[ndim]}, got shape {ids.shape}"
    return None


def id_rows_problem(batch: Batch, what: str, use_values: bool) -> IdProblem | None:
    """``batch["ids"]`` is a 2-d integer array ``(rows, f)`` and, with
    ``use_values``, ``batch["values"]`` (when present) has its shape."""
    ids = np.asarray(batch["ids"])
    problem = id_array_problem(ids, "ids", what, 2)
    if problem is not None or not use_values or "values" not in batch:
        return problem
    values = np.asarray(batch["values"])
    if values.shape != ids.shape:
        expected = f"values must have the shape {ids.shape} of ids"
        return "values", 0, f"{expected}, got {values.shape}"
    return None


def id_out_of_range(
    ids: np.ndarray, limits: int | Sequence[int], field: str, what: str
) -> IdProblem | None:
    """The first id of integer ``ids`` (``(rows,)`` or ``(rows, f)``) outside
    ``[0, limit)``: the first row holding one, and in it the first column.
    ``limits`` is one bound for all ids, or one per column, and then the
    message names the column ("id 3 of field 1 is not in [0, 3)")."""
    upper = np.asarray(limits, dtype=np.int64)
    bad = (ids < 0) | (ids >= upper)
    if not bad.any():
        return None
    row = int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])
    col = int(np.flatnonzero(bad[row].reshape(-1))[0])
    value = int(ids[row].reshape(-1)[col])
    if upper.ndim:
        limit, where = int(upper[col]), f" of field {col}"
    else:
        limit, where = int(upper), ""
    noun = _ids_noun(what, "id")
    return field, row, f"{noun} {value}{where} is not in [0, {limit})"


@register
class MatrixFactorization(SparseModel):
    r"""Biased matrix factorization for explicit ratings (squared loss).

    Predicts ``r(u, i) = mu + b_u + b_i + p_u . q_i`` and minimizes::

        mean over ratings of 0.5 * (r - r(u, i))**2  +  penalty / n

    where the penalty is ``(l2 / 2) * (||p_u||^2 + ||q_i||^2)`` per rating
    (``regularization="occurrence"``), or ``(l2 / 2) ||e||^2`` once per
    distinct user or item row of each batch piece (``"row"``, the default;
    see the module documentation).

    Data fields: ``user`` and ``item`` (integer ids, one per row) and
    ``rating`` (float).

    Parameters
    ----------
    n_users, n_items : int
        Table sizes; ids must lie in ``[0, n_users)`` and ``[0, n_items)``.
    rank : int
        Embedding width.
    l2 : float
        L2 penalty of the embeddings (biases are not penalized).
    regularization : {"row", "occurrence"}
        Penalize each embedding once per distinct row of a batch piece, or
        once per rating that uses it.
    init_scale : float
        Standard deviation of the initial embeddings (biases start at 0).
    mu_init : float
        Initial global offset ``mu``, e.g. the mean rating.  Starting at 0
        when ratings average 3.5 makes the first steps' errors large for
        every row; Adagrad keeps them in its accumulators and takes small
        steps ever after.
    dtype : {"float32", "float64"}
        Storage dtype of the tables (computations run in float64).

    Parameters are ``"user"`` (``(n_users, rank + 1)``: embedding, then the
    user bias in the last column), ``"item"`` (``(n_items, rank + 1)``,
    likewise) and ``"mu"`` (the global offset, a scalar).

    Examples
    --------
    >>> import numpy as np
    >>> m = MatrixFactorization(n_users=3, n_items=2, rank=2)
    >>> params = m.init(np.random.default_rng(0), None)
    >>> batch = {"user": np.array([0, 2]), "item": np.array([1, 1]),
    ...          "rating": np.array([4.0, 3.0])}
    >>> part = m.loss_and_grad(params, batch)
    >>> part.n_rows, sorted(part.grads), part.grads["user"].rows.tolist()
    (2, ['item', 'mu', 'user'], [0, 2])
    """

    kind: ClassVar[str] = "MatrixFactorization"
    fields: ClassVar[tuple[str, ...]] = ("user", "item", "rating")
    target: ClassVar[str] = "rating"
    summary_metrics: ClassVar[dict[str, tuple[str, bool]]] = {"rmse": ("sq_err", True)}

    def __init__(
        self,
        n_users: int,
        n_items: int,
        rank: int,
        *,
        l2: float = 0.0,
        regularization: str = "row",
        init_scale: float = 0.1,
        mu_init: float = 0.0,
        dtype: str = "float32",
    ) -> None:
        self.n_users = integer_at_least("n_users", n_users, 1)
        self.n_items = integer_at_least("n_items", n_items, 1)
        self.rank = integer_at_least("rank", rank, 1)
        self.l2 = nonnegative_float("l2", l2)
        self.regularization = check_regularization(regularization)
        self.init_scale = nonnegative_float("init_scale", init_scale)
        self.mu_init = finite_float("mu_init", mu_init)
        self.dtype = _check_dtype(dtype)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Model:
        """Stores written before ``regularization`` existed penalized per
        occurrence: they keep doing so when resumed."""
        return cls(**{"regularization": "occurrence", **config})

    def config(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "rank": self.rank,
            "l2": self.l2,
            "regularization": self.regularization,
            "init_scale": self.init_scale,
            "mu_init": self.mu_init,
            "dtype": self.dtype,
        }

    def tables(self) -> dict[str, TableSpec]:
        return {
            "item": TableSpec(
                self.n_items, self.rank + 1, self.dtype, self.init_scale, self.rank
            ),
            "user": TableSpec(
                self.n_users, self.rank + 1, self.dtype, self.init_scale, self.rank
            ),
        }

    def init_dense(self, rng: np.random.Generator) -> Params:
        return {"mu": np.asarray(self.mu_init, dtype=np.float64)}

    def check_schema(self, schema: Schema) -> None:
        owner = "MatrixFactorization"
        _check_field(schema, "user", owner, (), "iu")
        _check_field(schema, "item", owner, (), "iu")
        _check_field(schema, "rating", owner, (), "f")

    def row_ids(self, batch: Batch) -> dict[str, np.ndarray]:
        return {
            "user": np.asarray(batch["user"], dtype=np.int64),
            "item": np.asarray(batch["item"], dtype=np.int64),
        }

    def check_ids(self, batch: Batch) -> IdProblem | None:
        for field, n_rows in (("user", self.n_users), ("item", self.n_items)):
            ids = np.asarray(batch[field])
            problem = id_array_problem(ids, field, field, 1) or id_out_of_range(
                ids, n_rows, field, field
            )
            if problem is not None:
                return problem
        return None

    def _scores(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        u_ids, u_vals = rows["user"]
        i_ids, i_vals = rows["item"]
        u_inv = id_positions(u_ids, np.asarray(batch["user"]), self.n_users)
        i_inv = id_positions(i_ids, np.asarray(batch["item"]), self.n_items)
        U = np.asarray(u_vals, dtype=np.float64)[u_inv]
        V = np.asarray(i_vals, dtype=np.float64)[i_inv]
        k = self.rank
        pred = (
            float(np.asarray(dense["mu"]))
            + U[:, k]
            + V[:, k]
            + np.einsum("ij,ij->i", U[:, :k], V[:, :k])
        )
        return pred, U, V, u_inv, i_inv

    def sparse_loss_and_grad(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
        *,
        with_grads: bool = True,
    ) -> Partial:
        n = int(np.asarray(batch["rating"]).shape[0])
        pred, U, V, u_inv, i_inv = self._scores(dense, rows, batch)
        err = pred - np.asarray(batch["rating"], dtype=np.float64)
        k = self.rank
        sq = float(err @ err)
        u_ids, u_vals = rows["user"]
        i_ids, i_vals = rows["item"]
        penalty = 0.0
        row_grads: dict[str, np.ndarray | None] = {"user": None, "item": None}
        if self.l2:
            for name, used, vals in (("user", U, u_vals), ("item", V, i_vals)):
                unique = np.asarray(vals, dtype=np.float64)[:, :k]
                p, row_grads[name] = table_penalty(
                    self.l2, self.regularization, used[:, :k], unique
                )
                penalty += p
        metrics = {"sq_err": sq, "penalty": penalty}
        if not with_grads:
            return Partial(0.5 * sq, {}, n, metrics)
        per_use = self.l2 if self.regularization == "occurrence" else 0.0
        gU = np.empty_like(U)
        gV = np.empty_like(V)
        gU[:, :k] = err[:, None] * V[:, :k] + per_use * U[:, :k]
        gV[:, :k] = err[:, None] * U[:, :k] + per_use * V[:, :k]
        gU[:, k] = err
        gV[:, k] = err
        sums = {
            "user": segment_sum(u_inv, gU, u_ids.shape[0]),
            "item": segment_sum(i_inv, gV, i_ids.shape[0]),
        }
        for name, extra in row_grads.items():
            if extra is not None:
                sums[name][:, :k] += extra
        grads: dict[str, Grad] = {
            "item": RowSparse(i_ids, sums["item"], (self.n_items, k + 1)),
            "mu": np.asarray(err.sum(), dtype=np.float64),
            "user": RowSparse(u_ids, sums["user"], (self.n_users, k + 1)),
        }
        return Partial(0.5 * sq, grads, n, metrics)

    def predict_rows(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
        kind: str = "predict",
    ) -> np.ndarray:
        """Predicted ratings (float64)."""
        if kind != "predict":
            raise ValueError(f"MatrixFactorization has no {kind}")
        pred, *_ = self._scores(dense, rows, batch)
        return pred


@register
class SparseLogisticRegression(SparseModel):
    r"""Logistic regression on hashed sparse features (a wide linear model).

    Each row has ``f`` feature ids (``ids``, any int64 values, e.g. hashes)
    and optional ``values`` (default 1).  Ids map to ``n_buckets`` weights by
    ``id mod n_buckets``; with ``z = sum_j values[j] * w[bucket(ids[j])] + b``
    the model minimizes::

        mean over rows of log(1 + exp(-(2 y - 1) z))
                        + (l2 / 2) * sum_j w[bucket(ids[j])]**2

    Data fields: ``ids`` (integers, row shape ``(f,)``), optionally
    ``values`` (floats, row shape ``(f,)``), and ``y`` in ``{0, 1}``.

    Parameters are ``"w"`` (a table of shape ``(n_buckets, 1)``) and ``"b"``
    (a scalar).

    Examples
    --------
    >>> import numpy as np
    >>> m = SparseLogisticRegression(n_buckets=8)
    >>> params = m.init(np.random.default_rng(0), None)
    >>> batch = {"ids": np.array([[3, 11], [4, 5]]), "y": np.array([1, 0])}
    >>> m.loss_and_grad(params, batch).grads["w"].rows.tolist()  # 11 mod 8 = 3
    [3, 4, 5]
    """

    kind: ClassVar[str] = "SparseLogisticRegression"
    fields: ClassVar[tuple[str, ...]] = ("ids", "y")
    is_classifier: ClassVar[bool] = True
    summary_metrics: ClassVar[dict[str, tuple[str, bool]]] = {
        "accuracy": ("correct", False)
    }

    def __init__(
        self,
        n_buckets: int,
        *,
        l2: float = 0.0,
        use_values: bool = False,
        dtype: str = "float32",
    ) -> None:
        self.n_buckets = integer_at_least("n_buckets", n_buckets, 1)
        self.l2 = nonnegative_float("l2", l2)
        if not isinstance(use_values, bool):
            raise ValueError(f"use_values must be True or False, got {use_values!r}")
        self.use_values = use_values
        self.dtype = _check_dtype(dtype)
        if use_values:
            self.fields = ("ids", "values", "y")  # type: ignore[misc]

    def config(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "n_buckets": self.n_buckets,
            "l2": self.l2,
            "use_values": self.use_values,
            "dtype": self.dtype,
        }

    def tables(self) -> dict[str, TableSpec]:
        return {"w": TableSpec(self.n_buckets, 1, self.dtype, 0.0, 0)}

    def init_dense(self, rng: np.random.Generator) -> Params:
        return {"b": np.zeros((), dtype=np.float64)}

    def check_schema(self, schema: Schema) -> None:
        owner = "SparseLogisticRegression"
        info = schema.fields.get("ids")
        if info is None or len(info.shape) != 1:
            raise DataValidationError(
                f"field 'ids': {owner} needs integer feature ids with row shape "
                f"(f,); found {'no such field' if info is None else info.shape}"
            )
        _check_field(schema, "ids", owner, tuple(info.shape), "iu")
        if self.use_values:
            _check_field(schema, "values", owner, tuple(info.shape), "f")
        y = schema.fields.get("y")
        if y is None or tuple(y.shape) != ():
            raise DataValidationError(
                f"field 'y': {owner} needs labels in {{0, 1}} with row shape (); "
                f"found {'no such field' if y is None else y.shape}"
            )

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        return check_binary_labels(y, "SparseLogisticRegression")

    def row_ids(self, batch: Batch) -> dict[str, np.ndarray]:
        return {"w": np.mod(np.asarray(batch["ids"], dtype=np.int64), self.n_buckets)}

    def check_ids(self, batch: Batch) -> IdProblem | None:
        """Ids are hashed (any integer is valid), but must be integers with
        one row of ``f`` ids per batch entry (and ``values`` alike)."""
        return id_rows_problem(batch, "feature", self.use_values)

    def _decision(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ids, vals = rows["w"]
        buckets = self.row_ids(batch)["w"]
        inv = id_positions(ids, buckets, self.n_buckets)
        W = np.asarray(vals, dtype=np.float64)[:, 0][inv]  # (n, f)
        x = (
            np.asarray(batch["values"], dtype=np.float64)
            if self.use_values
            else np.ones(W.shape, dtype=np.float64)
        )
        z = np.einsum("ij,ij->i", x, W) + float(np.asarray(dense["b"]))
        return z, W, x, inv

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
        z, W, x, inv = self._decision(dense, rows, batch)
        s = (2.0 * y - 1.0) * z
        loss = float(np.logaddexp(0.0, -s).sum())
        correct = float(((z > 0) == (y > 0.5)).sum())
        penalty = 0.5 * self.l2 * float(np.einsum("ij,ij->", W, W)) if self.l2 else 0.0
        metrics = {"correct": correct, "penalty": penalty}
        if not with_grads:
            return Partial(loss, {}, n, metrics)
        # d loss / d z = sigmoid(z) - y
        dz = 0.5 * (1.0 + np.tanh(0.5 * z)) - y
        gW = dz[:, None] * x + self.l2 * W  # (n, f)
        ids, _ = rows["w"]
        g = segment_sum(inv.ravel(), gW.ravel(), ids.shape[0])[:, None]
        grads: dict[str, Grad] = {
            "b": np.asarray(dz.sum(), dtype=np.float64),
            "w": RowSparse(ids, g, (self.n_buckets, 1)),
        }
        return Partial(loss, grads, n, metrics)

    def predict_rows(
        self,
        dense: Mapping[str, np.ndarray],
        rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
        batch: Batch,
        kind: str = "predict",
    ) -> np.ndarray:
        """Labels (int64, 0 or 1), probabilities ``[P(y=0), P(y=1)]`` or the
        decision values ``z``."""
        z, *_ = self._decision(dense, rows, batch)
        return binary_outputs(z, kind, type(self).__name__)

    def decision_function(self, params: Params, X: Any) -> np.ndarray:
        return self._predict(params, X, "decision_function")

    def predict_proba(self, params: Params, X: Any) -> np.ndarray:
        return self._predict(params, X, "predict_proba")


def binary_outputs(z: np.ndarray, kind: str, model_name: str) -> np.ndarray:
    """What a binary classifier with decision values ``z`` returns for
    ``kind``: ``"predict"`` labels (int64, 0 or 1), ``"predict_proba"``
    ``[P(y=0), P(y=1)]`` or ``"decision_function"`` ``z`` itself."""
    if kind == "decision_function":
        return z
    if kind == "predict_proba":
        return sigmoid_columns(z)
    if kind == "predict":
        return (z > 0).astype(np.int64)
    raise ValueError(f"{model_name} has no {kind}")


def _as_batch(X: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not isinstance(X, Mapping):
        raise TypeError(
            f"this model predicts from a mapping of fields {list(names)} to arrays, "
            f"got {type(X).__name__}"
        )
    missing = [n for n in names if n not in X]
    if missing:
        raise ValueError(f"missing fields {missing}; this model needs {list(names)}")
    return {n: np.asarray(X[n]) for n in names}
