"""Unit tests of the sparse models (matrix factorization, hashed logistic
regression): gradients against finite differences, row-sparse partial sums,
id checks, table initialization, schema checks and configuration."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping

import numpy as np
import pytest

from dasktrain.errors import DataValidationError
from dasktrain.models import (
    FactorizationMachine,
    MatrixFactorization,
    SparseLogisticRegression,
    SparseModel,
    model_from_config,
)
from dasktrain.models.sparse import INIT_BLOCK_ROWS, segment_sum
from dasktrain.partial import Partial, RowSparse, combine
from dasktrain.schema import FieldInfo, Schema

FD_STEP = 1e-6
FD_RTOL = 1e-7
N_USERS = 9
N_ITEMS = 7
RANK = 3
N_FIELDS = 4
N_BUCKETS = 11

Rows = dict[str, tuple[np.ndarray, np.ndarray]]

MODELS = [
    pytest.param(MatrixFactorization(N_USERS, N_ITEMS, RANK), id="mf"),
    pytest.param(
        MatrixFactorization(N_USERS, N_ITEMS, RANK, l2=0.3, dtype="float64"),
        id="mf-l2",
    ),
    pytest.param(
        MatrixFactorization(
            N_USERS, N_ITEMS, RANK, l2=0.3, regularization="occurrence", mu_init=3.5
        ),
        id="mf-l2-occurrence",
    ),
    pytest.param(SparseLogisticRegression(N_BUCKETS), id="slr"),
    pytest.param(SparseLogisticRegression(N_BUCKETS, l2=0.2), id="slr-l2"),
    pytest.param(
        SparseLogisticRegression(N_BUCKETS, l2=0.2, use_values=True), id="slr-values"
    ),
    pytest.param(FactorizationMachine(N_BUCKETS, RANK, init_scale=0.5), id="fm"),
    pytest.param(
        FactorizationMachine(
            N_BUCKETS, RANK, l2=0.3, l2_linear=0.2, n_numeric=2, dtype="float64"
        ),
        id="fm-l2-numeric",
    ),
    pytest.param(
        FactorizationMachine(
            N_BUCKETS, RANK, loss="logistic", l2=0.1, use_values=True, hashed=True
        ),
        id="fm-logistic-values-hashed",
    ),
    pytest.param(
        FactorizationMachine(
            N_BUCKETS, RANK, loss="logistic", field_sizes=(2, 3, 4, 2), n_numeric=3
        ),
        id="fm-logistic-fields",
    ),
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def random_batch(
    model: SparseModel, rng: np.random.Generator, n_rows: int
) -> dict[str, np.ndarray]:
    """A batch with repeated ids (so that gradients of a row add up) that
    leaves the last row of each table unused."""
    if isinstance(model, MatrixFactorization):
        return {
            "user": rng.integers(0, model.n_users - 1, n_rows),
            "item": rng.integers(0, model.n_items - 1, n_rows),
            "rating": rng.normal(3.0, 1.0, n_rows),
        }
    if isinstance(model, FactorizationMachine):
        return fm_batch(model, rng, n_rows)
    assert isinstance(model, SparseLogisticRegression)
    # Ids beyond n_buckets and negative ones: the model hashes them by mod.
    ids = rng.integers(-3 * N_BUCKETS, 3 * N_BUCKETS, (n_rows, N_FIELDS))
    ids[np.mod(ids, N_BUCKETS) == N_BUCKETS - 1] += 1
    batch = {"ids": ids, "y": rng.integers(0, 2, n_rows)}
    if model.use_values:
        batch["values"] = rng.uniform(0.0, 2.0, (n_rows, N_FIELDS))
    return batch


def fm_batch(
    model: FactorizationMachine, rng: np.random.Generator, n_rows: int
) -> dict[str, np.ndarray]:
    """Ids in the model's id space (repeated, also within a row), leaving
    the last table row unused."""
    if model.hashed:
        ids = rng.integers(-3 * model.n_ids, 3 * model.n_ids, (n_rows, N_FIELDS))
        ids[np.mod(ids, model.n_ids) == model.n_ids - 1] += 1
    elif model.field_sizes is not None:
        sizes = np.asarray(model.field_sizes)
        ids = rng.integers(0, sizes, (n_rows, sizes.shape[0]))
        ids[:, -1] = rng.integers(0, sizes[-1] - 1, n_rows)
    else:
        ids = rng.integers(0, model.n_ids - 1, (n_rows, N_FIELDS))
    y = (
        rng.integers(0, 2, n_rows)
        if model.loss_name == "logistic"
        else rng.normal(3.0, 1.0, n_rows)
    )
    batch = {"ids": ids, "y": y}
    if model.use_values:
        batch["values"] = rng.uniform(0.0, 2.0, ids.shape)
    if model.n_numeric:
        batch["X"] = rng.normal(size=(n_rows, model.n_numeric))
    return batch


def random_params(
    model: SparseModel, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Non-zero values everywhere (zero tables or biases would hide bugs)."""
    shapes = {k: np.shape(v) for k, v in model.init(rng, Schema({})).items()}
    return {k: rng.normal(scale=0.7, size=shape) for k, shape in shapes.items()}


def dense_names(model: SparseModel, params: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(set(params) - set(model.tables()))


def sparse_objective(
    model: SparseModel,
    dense: Mapping[str, np.ndarray],
    rows: Rows,
    batch: Mapping[str, np.ndarray],
) -> float:
    part = model.sparse_loss_and_grad(dense, rows, batch, with_grads=False)
    return part.loss_sum + part.metrics["penalty"]


def numerical_gradient(
    f: Callable[[dict[str, np.ndarray]], float], arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    grads = {}
    for name, value in arrays.items():
        grad = np.zeros(np.shape(value))
        for index in np.ndindex(np.shape(value)):
            plus = {k: np.array(v, dtype=np.float64) for k, v in arrays.items()}
            minus = {k: np.array(v, dtype=np.float64) for k, v in arrays.items()}
            plus[name][index] += FD_STEP
            minus[name][index] -= FD_STEP
            grad[index] = (f(plus) - f(minus)) / (2 * FD_STEP)
        grads[name] = grad
    return grads


def assert_close_relative(analytic: np.ndarray, numeric: np.ndarray) -> None:
    scale = np.linalg.norm(numeric)
    assert scale > 0
    assert np.linalg.norm(np.ravel(analytic) - np.ravel(numeric)) / scale < FD_RTOL


def as_dense(grad: object) -> np.ndarray:
    return grad.to_dense() if isinstance(grad, RowSparse) else np.asarray(grad)


def mf_schema(**overrides: FieldInfo | None) -> Schema:
    fields: dict[str, FieldInfo | None] = {
        "user": FieldInfo((), "int64"),
        "item": FieldInfo((), "int32"),
        "rating": FieldInfo((), "float32"),
    }
    fields.update(overrides)
    return Schema({k: v for k, v in fields.items() if v is not None})


def slr_schema(**overrides: FieldInfo | None) -> Schema:
    fields: dict[str, FieldInfo | None] = {
        "ids": FieldInfo((N_FIELDS,), "int64"),
        "values": FieldInfo((N_FIELDS,), "float32"),
        "y": FieldInfo((), "int8"),
    }
    fields.update(overrides)
    return Schema({k: v for k, v in fields.items() if v is not None})


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_gradient_wrt_gathered_rows_matches_finite_differences(
    model: SparseModel,
) -> None:
    rng = np.random.default_rng(0)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 25)
    rows = model.gather(params, batch)
    names = dense_names(model, params)
    dense = {k: params[k] for k in names}
    part = model.sparse_loss_and_grad(dense, rows, batch)
    assert sorted(part.grads) == sorted(params)

    # The gathered rows: one RowSparse per table, over exactly those ids.
    values = {name: vals for name, (_, vals) in rows.items()}

    def f_rows(perturbed: dict[str, np.ndarray]) -> float:
        moved = {name: (rows[name][0], perturbed[name]) for name in rows}
        return sparse_objective(model, dense, moved, batch)

    numeric = numerical_gradient(f_rows, values)
    for name, (ids, _) in rows.items():
        grad = part.grads[name]
        assert isinstance(grad, RowSparse)
        np.testing.assert_array_equal(grad.rows, ids)
        assert grad.shape == (model.tables()[name].n_rows, model.tables()[name].width)
        assert grad.values.dtype == np.float64
        assert_close_relative(grad.values, numeric[name])

    # The dense parameters.
    numeric_dense = numerical_gradient(
        lambda d: sparse_objective(model, d, rows, batch), dense
    )
    for name in names:
        grad = part.grads[name]
        assert not isinstance(grad, RowSparse)
        assert np.shape(grad) == np.shape(params[name])
        np.testing.assert_allclose(grad, numeric_dense[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", MODELS)
def test_gradient_of_whole_tables_matches_finite_differences(
    model: SparseModel,
) -> None:
    """``loss_and_grad`` on dense tables: ``RowSparse.to_dense()`` is the
    gradient of the whole objective, zero on the rows the batch does not use."""
    rng = np.random.default_rng(1)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 20)

    def f(p: dict[str, np.ndarray]) -> float:
        part = model.loss(p, batch)
        return part.loss_sum + part.metrics["penalty"]

    numeric = numerical_gradient(f, params)
    part = model.loss_and_grad(params, batch)
    analytic = {k: as_dense(g) for k, g in part.grads.items()}
    names = sorted(params)
    assert sorted(analytic) == names
    assert_close_relative(
        np.concatenate([analytic[k].ravel() for k in names]),
        np.concatenate([numeric[k].ravel() for k in names]),
    )
    for name in model.tables():
        unused = np.setdiff1d(
            np.arange(params[name].shape[0]), np.unique(model.row_ids(batch)[name])
        )
        assert unused.size > 0
        assert not analytic[name][unused].any()


def test_mf_loss_and_penalty_by_hand() -> None:
    model = MatrixFactorization(3, 2, 2, l2=0.5, regularization="occurrence")
    params = {
        "mu": np.array(1.0),
        "user": np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [-1.0, 1.0, 0.25]]),
        "item": np.array([[0.5, -0.5, 0.1], [2.0, 1.0, -0.2]]),
    }
    batch = {
        "user": np.array([0, 2, 0]),
        "item": np.array([1, 0, 1]),
        "rating": np.array([5.0, 0.0, 4.0]),
    }
    # predictions: 1 + 0.5 - 0.2 + (2 + 2) = 5.3; 1 + 0.25 + 0.1 + (-0.5 - 0.5) = 0.35
    pred = model.predict(params, batch)
    np.testing.assert_allclose(pred, [5.3, 0.35, 5.3])
    part = model.loss(params, batch)
    err = np.array([0.3, 0.35, 1.3])
    assert part.loss_sum == pytest.approx(0.5 * float(err @ err))
    assert part.metrics["sq_err"] == pytest.approx(float(err @ err))
    # per occurrence: ||p_0||^2 + ||q_1||^2 = 5 + 5 (twice),
    # ||p_2||^2 + ||q_0||^2 = 2 + 0.5
    assert part.metrics["penalty"] == pytest.approx(0.25 * (10 + 10 + 2.5))
    # per distinct row: ||p_0||^2 + ||p_2||^2 + ||q_0||^2 + ||q_1||^2
    per_row = MatrixFactorization(3, 2, 2, l2=0.5)
    assert per_row.regularization == "row"
    row_part = per_row.loss_and_grad(params, batch)
    assert row_part.metrics["penalty"] == pytest.approx(0.25 * (5 + 2 + 0.5 + 5))
    occ_grad = model.loss_and_grad(params, batch).grads["user"]
    row_grad = row_part.grads["user"]
    assert isinstance(occ_grad, RowSparse) and isinstance(row_grad, RowSparse)
    # user 0 is used twice: its penalty gradient counts twice, or once
    np.testing.assert_allclose(
        occ_grad.values[0, :2] - row_grad.values[0, :2], 0.5 * params["user"][0, :2]
    )
    np.testing.assert_allclose(occ_grad.values[1], row_grad.values[1])
    summary = model.summarize(part)
    assert summary["rmse"] == pytest.approx(np.sqrt(float(err @ err) / 3))
    assert model.objective(part) == pytest.approx(
        (part.loss_sum + part.metrics["penalty"]) / 3
    )


def test_slr_loss_by_hand_and_bucket_mapping() -> None:
    model = SparseLogisticRegression(4, l2=1.0, use_values=True)
    params = {"w": np.array([[0.5], [-1.0], [2.0], [0.0]]), "b": np.array(0.25)}
    batch = {
        "ids": np.array([[1, 6], [-2, 9]]),  # buckets [1, 2] and [2, 1]
        "values": np.array([[2.0, 1.0], [0.5, 3.0]]),
        "y": np.array([1, 0]),
    }
    z = np.array([2 * -1.0 + 1 * 2.0 + 0.25, 0.5 * 2.0 + 3 * -1.0 + 0.25])
    np.testing.assert_allclose(model.decision_function(params, batch), z)
    part = model.loss_and_grad(params, batch)
    expected = np.log1p(np.exp(-z[0])) + np.log1p(np.exp(z[1]))
    assert part.loss_sum == pytest.approx(expected)
    assert part.metrics["penalty"] == pytest.approx(0.5 * 2 * (1.0 + 4.0))
    assert part.metrics["correct"] == 2.0  # z[0] > 0 (y=1), z[1] < 0 (y=0)
    grad = part.grads["w"]
    assert isinstance(grad, RowSparse)
    assert grad.rows.tolist() == [1, 2]


# ---------------------------------------------------------------------------
# partial sums
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_loss_equals_loss_and_grad_without_grads(model: SparseModel) -> None:
    rng = np.random.default_rng(2)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 30)
    full = model.loss_and_grad(params, batch)
    cheap = model.loss(params, batch)
    assert cheap.grads == {}
    assert cheap.loss_sum == full.loss_sum
    assert cheap.n_rows == full.n_rows == 30
    assert dict(cheap.metrics) == dict(full.metrics)
    assert set(full.metrics) == set(model.metric_names())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("split", [1, 13, 29])
def test_combined_halves_equal_whole(model: SparseModel, split: int) -> None:
    rng = np.random.default_rng(3)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 30)
    first = {k: v[:split] for k, v in batch.items()}
    second = {k: v[split:] for k, v in batch.items()}
    whole = model.loss_and_grad(params, batch)
    parts = combine(
        model.loss_and_grad(params, first), model.loss_and_grad(params, second)
    )
    assert parts.n_rows == whole.n_rows
    assert parts.loss_sum == pytest.approx(whole.loss_sum, rel=1e-12)
    assert set(parts.metrics) == set(whole.metrics)
    per_row = getattr(model, "regularization", None) == "row" and (
        getattr(model, "l2", 0.0) or getattr(model, "l2_linear", 0.0)
    )
    for key, value in whole.metrics.items():
        if per_row and key == "penalty":
            # A row used by both halves is penalized once in each.
            assert parts.metrics[key] > value
            continue
        assert parts.metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12)
    for name, grad in whole.grads.items():
        joined = parts.grads[name]
        if per_row and name in model.tables():
            continue  # see test_row_penalty_counts_each_piece_once
        if isinstance(grad, RowSparse):
            assert isinstance(joined, RowSparse)
            np.testing.assert_array_equal(joined.rows, grad.rows)
        np.testing.assert_allclose(
            as_dense(joined), as_dense(grad), rtol=1e-12, atol=1e-12
        )


ROW_PENALIZED = [
    m
    for m in MODELS
    if getattr(m.values[0], "regularization", "") == "row"
    and getattr(m.values[0], "l2", 0.0) > 0
]


@pytest.mark.parametrize("model", ROW_PENALIZED)
def test_row_penalty_counts_each_piece_once(model: SparseModel) -> None:
    """With ``regularization="row"`` the table gradients of two halves add up
    to the whole batch's, plus the penalty gradient of the rows both use,
    once more."""
    rng = np.random.default_rng(3)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 30)
    first = {k: v[:13] for k, v in batch.items()}
    second = {k: v[13:] for k, v in batch.items()}
    whole = model.loss_and_grad(params, batch)
    parts = combine(
        model.loss_and_grad(params, first), model.loss_and_grad(params, second)
    )
    for name, spec in model.tables().items():
        l2 = np.full(spec.width, float(getattr(model, "l2", 0.0)))
        if isinstance(model, FactorizationMachine):
            l2[-1] = model.l2_linear
        elif isinstance(model, MatrixFactorization):
            l2[-1] = 0.0  # biases are not penalized
        both = np.intersect1d(model.row_ids(first)[name], model.row_ids(second)[name])
        assert both.size > 0
        extra = np.zeros((spec.n_rows, spec.width))
        extra[both] = l2 * params[name][both]
        np.testing.assert_allclose(
            as_dense(parts.grads[name]),
            as_dense(whole.grads[name]) + extra,
            rtol=1e-10,
            atol=1e-10,
        )


@pytest.mark.parametrize("model", MODELS)
def test_empty_batch(model: SparseModel) -> None:
    rng = np.random.default_rng(4)
    params = random_params(model, rng)
    batch = {k: v[:0] for k, v in random_batch(model, rng, 5).items()}
    part = model.loss_and_grad(params, batch)
    assert part.n_rows == 0 and part.loss_sum == 0.0
    for grad in part.grads.values():
        assert not as_dense(grad).any()
    assert np.isnan(model.summarize(part)["loss"])


# ---------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------


def test_mf_predict_shape_and_dtype() -> None:
    model = MatrixFactorization(N_USERS, N_ITEMS, RANK)
    rng = np.random.default_rng(5)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 12)
    pred = model.predict(params, {"user": batch["user"], "item": batch["item"]})
    assert pred.shape == (12,) and pred.dtype == np.float64
    part = model.loss(params, batch)
    np.testing.assert_allclose(
        0.5 * np.sum((pred - batch["rating"]) ** 2), part.loss_sum, rtol=1e-12
    )
    with pytest.raises(ValueError, match="missing fields"):
        model.predict(params, {"user": batch["user"]})
    with pytest.raises(TypeError, match="mapping of fields"):
        model.predict(params, np.zeros((3, 2)))


@pytest.mark.parametrize("use_values", [False, True])
def test_slr_predict_and_predict_proba(use_values: bool) -> None:
    model = SparseLogisticRegression(N_BUCKETS, use_values=use_values)
    rng = np.random.default_rng(6)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 15)
    X = {k: v for k, v in batch.items() if k != "y"}
    labels = model.predict(params, X)
    proba = model.predict_proba(params, X)
    z = model.decision_function(params, X)
    assert labels.shape == (15,) and labels.dtype == np.int64
    assert set(np.unique(labels)) <= {0, 1}
    assert proba.shape == (15, 2) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(labels, (proba[:, 1] > 0.5).astype(np.int64))
    np.testing.assert_allclose(proba[:, 1], 1.0 / (1.0 + np.exp(-z)))
    part = model.loss(params, batch)
    assert part.metrics["correct"] == float(np.sum(labels == batch["y"]))


# ---------------------------------------------------------------------------
# id and label checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "row", "bad"),
    [("user", 3, N_USERS), ("user", 0, -1), ("item", 5, N_ITEMS), ("item", 2, -7)],
)
def test_mf_out_of_range_ids_name_field_and_row(field: str, row: int, bad: int) -> None:
    model = MatrixFactorization(N_USERS, N_ITEMS, RANK)
    rng = np.random.default_rng(7)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 8)
    assert model.check_ids(batch) is None
    batch[field][row] = bad
    batch[field][row + 1 :] = bad  # only the first bad row is named
    problem = model.check_ids(batch)
    assert problem is not None
    assert problem[:2] == (field, row)
    assert str(bad) in problem[2]
    pattern = rf"field '{field}', row {row}: .*{bad}"
    for call in (model.loss_and_grad, model.loss):
        with pytest.raises(DataValidationError, match=pattern):
            call(params, batch)
    with pytest.raises(DataValidationError, match=pattern):
        model.predict(params, batch)


def test_slr_accepts_any_int64_id_and_checks_labels() -> None:
    model = SparseLogisticRegression(N_BUCKETS)
    ids = np.array([[np.iinfo(np.int64).min, np.iinfo(np.int64).max, -1, 0]])
    assert model.check_ids({"ids": ids, "y": np.array([1])}) is None
    buckets = model.row_ids({"ids": ids})["w"]
    assert buckets.min() >= 0 and buckets.max() < N_BUCKETS
    assert model.check_labels(np.array([0, 1, 1])) is None
    problem = model.check_labels(np.array([0, 1, 2, 1]))
    assert problem is not None and problem[0] == 2


MF = MatrixFactorization(N_USERS, N_ITEMS, RANK)
SLR_VALUES = SparseLogisticRegression(N_BUCKETS, use_values=True)
FM_VALUES = FactorizationMachine(5, RANK, use_values=True)
FM_FIELDS = FactorizationMachine(5, RANK, field_sizes=(2, 3))


@pytest.mark.parametrize(
    ("model", "batch", "problem"),
    [
        (
            MF,
            {"user": np.array([0.0, 1.0]), "item": np.array([0, 1])},
            ("user", 0, "user ids must be integers, got dtype float64"),
        ),
        (
            MF,
            {"user": np.array([0, 1]), "item": np.array([[0, 1]])},
            ("item", 0, "item ids must be 1-d, got shape (1, 2)"),
        ),
        (
            MF,
            {"user": np.array([0, 1], dtype=np.uint64), "item": np.array([0, 9])},
            ("item", 1, f"item id 9 is not in [0, {N_ITEMS})"),
        ),
        (
            SLR_VALUES,
            {"ids": np.array([1.0, 2.0])},
            ("ids", 0, "feature ids must be integers, got dtype float64"),
        ),
        (
            SLR_VALUES,
            {"ids": np.array([1, 2])},
            ("ids", 0, "feature ids must be 2-d (rows, f), got shape (2,)"),
        ),
        (
            SLR_VALUES,
            {"ids": np.array([[1, 2]]), "values": np.array([[1.0]])},
            ("values", 0, "values must have the shape (1, 2) of ids, got (1, 1)"),
        ),
        (
            FM_VALUES,
            {"ids": np.array([[0.0, 1.0]])},
            ("ids", 0, "ids must be integers, got dtype float64"),
        ),
        (
            FM_VALUES,
            {"ids": np.array([0, 1])},
            ("ids", 0, "ids must be 2-d (rows, f), got shape (2,)"),
        ),
        (
            FM_VALUES,
            {"ids": np.array([[0, 9]]), "values": np.ones((1, 3))},
            ("values", 0, "values must have the shape (1, 2) of ids, got (1, 3)"),
        ),
        (
            FM_VALUES,
            {"ids": np.array([[0, 1], [4, 5]]), "values": np.ones((2, 2))},
            ("ids", 1, "id 5 is not in [0, 5)"),
        ),
        (
            FM_FIELDS,
            {"ids": np.array([[2**63 + 1, 0]], dtype=np.uint64)},
            ("ids", 0, f"id {2**63 + 1} of field 0 is not in [0, 2)"),
        ),
        (
            FM_FIELDS,
            {"ids": np.array([[0, 1], [-1, 3]])},
            ("ids", 1, "id -1 of field 0 is not in [0, 2)"),
        ),
    ],
)
def test_id_checks_name_field_row_and_problem(
    model: SparseModel, batch: dict[str, np.ndarray], problem: tuple[str, int, str]
) -> None:
    """The id checks the three models share: dtype, layout, the shape of
    ``values``, then the range (per field with ``field_sizes``), the first bad
    row and in it the first bad column."""
    assert model.check_ids(batch) == problem


# ---------------------------------------------------------------------------
# table initialization
# ---------------------------------------------------------------------------


def test_table_rows_do_not_depend_on_the_split() -> None:
    n_users = 2 * INIT_BLOCK_ROWS + 517
    model = MatrixFactorization(n_users, 50, 4, init_scale=0.3)
    seed = 12345
    whole = model.table_rows("user", seed, 0, n_users)
    assert whole.shape == (n_users, 5) and whole.dtype == np.float64
    for bounds in (
        [0, 1, INIT_BLOCK_ROWS - 1, INIT_BLOCK_ROWS + 1, n_users],
        [0, 3000, 6000, n_users],
        [0, n_users - 1, n_users],
    ):
        pieces = [
            model.table_rows("user", seed, lo, hi)
            for lo, hi in itertools.pairwise(bounds)
        ]
        np.testing.assert_array_equal(np.concatenate(pieces), whole)
    for shard_rows in (1024, 3000, INIT_BLOCK_ROWS):
        shards = [
            model.table_rows("user", seed, lo, min(lo + shard_rows, n_users))
            for lo in range(0, n_users, shard_rows)
        ]
        np.testing.assert_array_equal(np.concatenate(shards), whole)
    assert model.table_rows("user", seed, 10, 10).shape == (0, 5)
    # embeddings ~ N(0, init_scale^2), biases start at zero
    assert not whole[:, 4].any()
    assert whole[:, :4].std() == pytest.approx(0.3, rel=0.02)
    # another table, another seed: other values
    assert not np.array_equal(model.table_rows("item", seed, 0, 50), whole[:50])
    assert not np.array_equal(model.table_rows("user", seed + 1, 0, n_users), whole)


def test_init_uses_table_rows_with_the_drawn_seed() -> None:
    model = MatrixFactorization(N_USERS, N_ITEMS, RANK, init_scale=0.2)
    params = model.init(np.random.default_rng(8), Schema({}))
    replay = np.random.default_rng(8)
    dense = model.init_dense(replay)
    seed = model.table_seed(replay)
    assert sorted(params) == ["item", "mu", "user"]
    np.testing.assert_array_equal(params["mu"], dense["mu"])
    for name, spec in model.tables().items():
        assert params[name].shape == (spec.n_rows, spec.width)
        np.testing.assert_array_equal(
            params[name], model.table_rows(name, seed, 0, spec.n_rows)
        )
    slr = SparseLogisticRegression(N_BUCKETS)
    slr_params = slr.init(np.random.default_rng(8), Schema({}))
    assert slr_params["w"].shape == (N_BUCKETS, 1) and not slr_params["w"].any()
    assert slr_params["b"].shape == ()


def test_table_specs() -> None:
    mf = MatrixFactorization(10, 20, 4, init_scale=0.1, dtype="float64")
    user = mf.tables()["user"]
    assert (user.n_rows, user.width, user.dtype, user.n_random) == (10, 5, "float64", 4)
    assert user.nbytes == 10 * 5 * 8
    w = SparseLogisticRegression(100, dtype="float32").tables()["w"]
    assert (w.n_rows, w.width, w.nbytes) == (100, 1, 400)


# ---------------------------------------------------------------------------
# segment_sum
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("width", [None, 1, 3])
def test_segment_sum_matches_add_at(width: int | None) -> None:
    rng = np.random.default_rng(9)
    n_segments = 40
    inverse = rng.integers(0, n_segments, 500)
    inverse[inverse == 7] = 8  # an empty segment in the middle
    shape = (500,) if width is None else (500, width)
    values = rng.normal(size=shape).astype(np.float32)
    expected = np.zeros((n_segments, *shape[1:]), dtype=np.float64)
    np.add.at(expected, inverse, values.astype(np.float64))
    got = segment_sum(inverse, values, n_segments)
    assert got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert not got[7].any()
    # adds in input order within a segment: the same bits as np.add.at
    np.testing.assert_array_equal(got, expected)


def test_segment_sum_edge_cases() -> None:
    assert (
        segment_sum(np.zeros(0, np.int64), np.zeros((0, 2)), 3).tolist()
        == [[0.0, 0.0]] * 3
    )
    got = segment_sum(np.array([2, 2, 2]), np.array([1.0, 2.0, 3.0]), 4)
    assert got.tolist() == [0.0, 0.0, 6.0, 0.0]


# ---------------------------------------------------------------------------
# configuration and schema
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_config_round_trip(model: SparseModel) -> None:
    config = json.loads(json.dumps(model.config()))
    rebuilt = model_from_config(config)
    assert rebuilt == model and type(rebuilt) is type(model)
    assert rebuilt.config() == model.config()
    assert rebuilt.fields == model.fields
    assert rebuilt.tables() == model.tables()


def test_config_contents() -> None:
    config = MatrixFactorization(5, 6, 2, l2=0.1, init_scale=0.05).config()
    assert config == {
        "type": "MatrixFactorization",
        "n_users": 5,
        "n_items": 6,
        "rank": 2,
        "l2": 0.1,
        "regularization": "row",
        "init_scale": 0.05,
        "mu_init": 0.0,
        "dtype": "float32",
    }
    # A store written before `regularization` existed penalized per occurrence.
    del config["regularization"], config["mu_init"]
    old = model_from_config(config)
    assert isinstance(old, MatrixFactorization)
    assert old.regularization == "occurrence" and old.mu_init == 0.0
    mf = MatrixFactorization(5, 6, 2, mu_init=3.5)
    assert float(mf.init(np.random.default_rng(0), Schema({}))["mu"]) == 3.5
    slr = SparseLogisticRegression(8, use_values=True)
    assert slr.fields == ("ids", "values", "y")
    assert SparseLogisticRegression(8).fields == ("ids", "y")


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: MatrixFactorization(0, 5, 2), "n_users"),
        (lambda: MatrixFactorization(5, 0, 2), "n_items"),
        (lambda: MatrixFactorization(5, 5, 0), "rank"),
        (lambda: MatrixFactorization(5, 5, 2, l2=-1.0), "l2"),
        (lambda: MatrixFactorization(5, 5, 2, dtype="float16"), "dtype"),
        (lambda: MatrixFactorization(5, 5, 2, regularization="x"), "regularization"),
        (lambda: MatrixFactorization(5, 5, 2, mu_init=float("nan")), "mu_init"),
        (lambda: SparseLogisticRegression(0), "n_buckets"),
        (lambda: SparseLogisticRegression(4, use_values=1), "use_values"),  # type: ignore[arg-type]
    ],
)
def test_invalid_hyper_parameters(make: Callable[[], object], argument: str) -> None:
    with pytest.raises((ValueError, TypeError), match=argument):
        make()


def test_mf_check_schema() -> None:
    model = MatrixFactorization(N_USERS, N_ITEMS, RANK)
    model.check_schema(mf_schema())
    model.check_schema(mf_schema(rating=FieldInfo((), "float64")))
    cases = {
        "user": mf_schema(user=None),
        "item": mf_schema(item=FieldInfo((), "float32")),
        "rating": mf_schema(rating=None),
    }
    for field, schema in cases.items():
        with pytest.raises(DataValidationError, match=rf"field '{field}'"):
            model.check_schema(schema)
    with pytest.raises(DataValidationError, match=r"field 'user'.*row shape \(2,\)"):
        model.check_schema(mf_schema(user=FieldInfo((2,), "int64")))
    with pytest.raises(DataValidationError, match=r"field 'rating'.*int64"):
        model.check_schema(mf_schema(rating=FieldInfo((), "int64")))


def test_slr_check_schema() -> None:
    plain = SparseLogisticRegression(N_BUCKETS)
    with_values = SparseLogisticRegression(N_BUCKETS, use_values=True)
    plain.check_schema(slr_schema(values=None))
    with_values.check_schema(slr_schema())
    plain_cases = {
        "ids": [
            slr_schema(ids=None),
            slr_schema(ids=FieldInfo((), "int64")),
            slr_schema(ids=FieldInfo((N_FIELDS,), "float64")),
        ],
        "y": [slr_schema(y=None), slr_schema(y=FieldInfo((2,), "int8"))],
    }
    for field, schemas in plain_cases.items():
        for schema in schemas:
            with pytest.raises(DataValidationError, match=rf"field '{field}'"):
                plain.check_schema(schema)
    for schema in (
        slr_schema(values=None),
        slr_schema(values=FieldInfo((N_FIELDS + 1,), "float32")),
        slr_schema(values=FieldInfo((N_FIELDS,), "int64")),
    ):
        with pytest.raises(DataValidationError, match=r"field 'values'"):
            with_values.check_schema(schema)


def test_partial_of_sparse_model_is_summarized() -> None:
    model = SparseLogisticRegression(N_BUCKETS, l2=0.1)
    part = Partial(6.0, {}, 4, {"correct": 3.0, "penalty": 2.0})
    assert model.summarize(part) == {"loss": 1.5, "accuracy": 0.75}
    assert model.objective(part) == 2.0
    assert model.penalty({"w": np.ones((N_BUCKETS, 1))}) == 0.0


# ---------------------------------------------------------------------------
# factorization machine
# ---------------------------------------------------------------------------


def fm_score_by_loops(
    model: FactorizationMachine,
    params: Mapping[str, np.ndarray],
    batch: Mapping[str, np.ndarray],
) -> np.ndarray:
    """The FM score from its definition: a double loop over the pairs."""
    rows = model.row_ids(batch)["v"]
    n, f = rows.shape
    x = batch["values"] if model.use_values else np.ones((n, f))
    V = params["v"]
    k = model.rank
    out = np.full(n, float(params["b"]))
    for r in range(n):
        for j in range(f):
            out[r] += x[r, j] * V[rows[r, j], k]
            for m in range(j + 1, f):
                out[r] += x[r, j] * x[r, m] * (V[rows[r, j], :k] @ V[rows[r, m], :k])
        if model.n_numeric:
            out[r] += batch["X"][r] @ params["w"]
    return out


FM_MODELS = [m for m in MODELS if str(m.id).startswith("fm")]


@pytest.mark.parametrize("fm", FM_MODELS)
def test_fm_score_equals_the_pairwise_sum(fm: FactorizationMachine) -> None:
    rng = np.random.default_rng(10)
    params = random_params(fm, rng)
    batch = random_batch(fm, rng, 9)
    X = {k: v for k, v in batch.items() if k != "y"}
    expected = fm_score_by_loops(fm, params, batch)
    if fm.loss_name == "squared":
        np.testing.assert_allclose(fm.predict(params, X), expected, rtol=1e-12)
        part = fm.loss(params, batch)
        err = expected - batch["y"]
        assert part.loss_sum == pytest.approx(0.5 * float(err @ err), rel=1e-12)
        assert fm.summarize(part)["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)))
        with pytest.raises(ValueError, match="predict_proba"):
            fm.predict_proba(params, X)
    else:
        np.testing.assert_allclose(
            fm.decision_function(params, X), expected, rtol=1e-12
        )
        proba = fm.predict_proba(params, X)
        np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-expected)))
        np.testing.assert_array_equal(fm.predict(params, X), expected > 0)
        part = fm.loss(params, batch)
        s = 2.0 * batch["y"] - 1.0
        assert part.loss_sum == pytest.approx(np.log1p(np.exp(-s * expected)).sum())
        assert part.metrics["correct"] == float(np.sum((expected > 0) == batch["y"]))


def test_fm_penalties_by_hand() -> None:
    fm = FactorizationMachine(
        4, 2, l2=0.5, l2_linear=2.0, n_numeric=2, regularization="occurrence"
    )
    params = {
        "v": np.array([[1.0, 2.0, 0.5], [0.0, 1.0, -1.0], [3.0, 0.0, 2.0], [0, 0, 0]]),
        "b": np.array(0.25),
        "w": np.array([1.0, -2.0]),
    }
    batch = {
        "ids": np.array([[0, 1], [2, 0]]),
        "X": np.zeros((2, 2)),
        "y": np.zeros(2),
    }
    part = fm.loss_and_grad(params, batch)
    # embeddings per occurrence: (5 + 1) + (9 + 5); linear: (0.25 + 1) + (4 + 0.25)
    assert part.metrics["penalty"] == pytest.approx(0.25 * 20 + 1.0 * 5.5)
    assert fm.penalty(params) == pytest.approx(1.0 * 5.0)
    np.testing.assert_allclose(fm.penalty_grad(params)["w"], [2.0, -4.0])
    assert not fm.penalty_grad(params)["v"].any()
    grad = part.grads["v"]
    assert isinstance(grad, RowSparse) and grad.rows.tolist() == [0, 1, 2]
    # per distinct row (rows 0, 1, 2): embeddings 5 + 1 + 9, linear 0.25 + 1 + 4
    per_row = FactorizationMachine(4, 2, l2=0.5, l2_linear=2.0, n_numeric=2)
    row_part = per_row.loss_and_grad(params, batch)
    assert row_part.metrics["penalty"] == pytest.approx(0.25 * 15 + 1.0 * 5.25)
    row_grad = row_part.grads["v"]
    assert isinstance(row_grad, RowSparse)
    # row 0 is used twice: one penalty gradient less
    np.testing.assert_allclose(
        grad.values[0] - row_grad.values[0], [0.5, 1.0, 2.0 * 0.5]
    )
    np.testing.assert_allclose(grad.values[1:], row_grad.values[1:])


def test_fm_field_offsets_and_hashing() -> None:
    fields = FactorizationMachine(9, 2, field_sizes=(2, 3, 4))
    ids = np.array([[1, 0, 3], [0, 2, 0]])
    assert fields.row_ids({"ids": ids})["v"].tolist() == [[1, 2, 8], [0, 4, 5]]
    assert fields.check_ids({"ids": ids}) is None
    problem = fields.check_ids({"ids": np.array([[0, 0, 0], [1, 3, 0]])})
    assert problem is not None and problem[:2] == ("ids", 1)
    assert "id 3 of field 1 is not in [0, 3)" in problem[2]
    problem = fields.check_ids({"ids": np.array([[0, 0]])})
    assert problem is not None and "3 fields" in problem[2]
    hashed = FactorizationMachine(7, 2, hashed=True)
    big = np.array([[np.iinfo(np.int64).min, np.iinfo(np.int64).max, -1]])
    assert hashed.check_ids({"ids": big}) is None
    rows = hashed.row_ids({"ids": big})["v"]
    assert rows.min() >= 0 and rows.max() < 7
    plain = FactorizationMachine(5, 2)
    problem = plain.check_ids({"ids": np.array([[0, 4], [5, 0]])})
    assert problem is not None and problem[:2] == ("ids", 1)
    assert "id 5 is not in [0, 5)" in problem[2]
    with pytest.raises(DataValidationError, match=r"field 'ids', row 1: id -1"):
        plain.loss(
            {"v": np.zeros((5, 3)), "b": np.array(0.0)},
            {"ids": np.array([[0, 1], [-1, 0]]), "y": np.zeros(2)},
        )


def test_fm_labels_schema_and_config() -> None:
    clicks = FactorizationMachine(10, 2, loss="logistic", use_values=True, n_numeric=3)
    assert clicks.fields == ("ids", "values", "X", "y")
    assert clicks.is_classifier
    assert clicks.input_fields == ("ids", "values", "X")
    assert clicks.check_labels(np.array([0, 1, 1])) is None
    problem = clicks.check_labels(np.array([0, 1, 3]))
    assert problem is not None and problem[0] == 2
    ratings = FactorizationMachine(10, 2)
    assert ratings.fields == ("ids", "y") and not ratings.is_classifier
    assert ratings.check_labels(np.array([4.5, -1.0])) is None
    schema = Schema(
        {
            "ids": FieldInfo((3,), "int32"),
            "values": FieldInfo((3,), "float32"),
            "X": FieldInfo((3,), "float32"),
            "y": FieldInfo((), "int8"),
        }
    )
    clicks.check_schema(schema)
    ratings.check_schema(schema)
    bad = {
        "values": {**schema.fields, "values": FieldInfo((2,), "float32")},
        "X": {**schema.fields, "X": FieldInfo((4,), "float32")},
        "ids": {**schema.fields, "ids": FieldInfo((3,), "float32")},
        "y": {k: v for k, v in schema.fields.items() if k != "y"},
    }
    for field, fields in bad.items():
        with pytest.raises(DataValidationError, match=rf"field '{field}'"):
            clicks.check_schema(Schema(fields))
    with pytest.raises(DataValidationError, match="field_sizes"):
        FactorizationMachine(5, 2, field_sizes=(2, 3)).check_schema(schema)
    assert FactorizationMachine(5, 2, field_sizes=[2, 3]).config() == {
        "type": "FactorizationMachine",
        "n_ids": 5,
        "rank": 2,
        "loss": "squared",
        "l2": 0.0,
        "l2_linear": 0.0,
        "use_values": False,
        "n_numeric": 0,
        "field_sizes": [2, 3],
        "hashed": False,
        "regularization": "row",
        "b_init": 0.0,
        "init_scale": 0.01,
        "dtype": "float32",
    }
    spec = clicks.tables()["v"]
    assert (spec.n_rows, spec.width, spec.n_random) == (10, 3, 2)


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: FactorizationMachine(0, 2), "n_ids"),
        (lambda: FactorizationMachine(5, 0), "rank"),
        (lambda: FactorizationMachine(5, 2, loss="hinge"), "loss"),
        (lambda: FactorizationMachine(5, 2, l2=-1.0), "l2"),
        (lambda: FactorizationMachine(5, 2, n_numeric=-1), "n_numeric"),
        (lambda: FactorizationMachine(5, 2, field_sizes=(2, 2)), "sum"),
        (lambda: FactorizationMachine(5, 2, field_sizes=(5,), hashed=True), "hashed"),
        (lambda: FactorizationMachine(5, 2, field_sizes=()), "field_sizes"),
        (lambda: FactorizationMachine(5, 2, init_scale=0.0), "init_scale"),
        (lambda: FactorizationMachine(5, 2, use_values=1), "use_values"),  # type: ignore[arg-type]
    ],
)
def test_fm_invalid_hyper_parameters(make: Callable[[], object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        make()
