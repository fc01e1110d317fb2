"""Unit tests of the model kernels: gradients against finite differences,
float32 against float64, partial sums, checks, and reference libraries."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import Lasso, Ridge
from sklearn.linear_model import LogisticRegression as SkLogisticRegression
from sklearn.metrics import log_loss, mean_squared_error, r2_score

from dasktrain.errors import DataValidationError
from dasktrain.models import (
    MLP,
    LinearRegression,
    LogisticRegression,
    Model,
    SoftmaxRegression,
    model_from_config,
)
from dasktrain.partial import Partial, combine
from dasktrain.schema import FieldInfo, Schema

N_FEATURES = 4
FD_STEP = 1e-6
FD_RTOL = 1e-6

MODELS = [
    pytest.param(LinearRegression(), id="linear"),
    pytest.param(LinearRegression(l2=0.3, l1=0.2), id="linear-l2-l1"),
    pytest.param(LogisticRegression(l2=0.1, l1=0.05), id="logistic-l2-l1"),
    pytest.param(SoftmaxRegression(3, l2=0.2, l1=0.1), id="softmax-l2-l1"),
    pytest.param(
        MLP((5, 3), 1, loss="squared", activation="relu", l2=0.1), id="mlp-sq-relu"
    ),
    pytest.param(
        MLP((5, 3), 2, loss="squared", activation="tanh", l2=0.1), id="mlp-sq2-tanh"
    ),
    pytest.param(
        MLP((5, 3), 1, loss="logistic", activation="relu", l2=0.01), id="mlp-log-relu"
    ),
    pytest.param(MLP((5, 3), 1, loss="logistic", activation="tanh"), id="mlp-log-tanh"),
    pytest.param(
        MLP((5, 3), 4, loss="softmax", activation="relu", l2=0.05), id="mlp-soft-relu"
    ),
    pytest.param(
        MLP((5, 3), 4, loss="softmax", activation="tanh", l2=0.05), id="mlp-soft-tanh"
    ),
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def n_classes_of(model: Model) -> int | None:
    if isinstance(model, LogisticRegression):
        return 2
    if isinstance(model, SoftmaxRegression):
        return model.n_classes
    if isinstance(model, MLP) and model.loss_name != "squared":
        return 2 if model.loss_name == "logistic" else model.n_outputs
    return None


def y_row_shape(model: Model) -> tuple[int, ...]:
    if isinstance(model, MLP) and model.loss_name == "squared" and model.n_outputs > 1:
        return (model.n_outputs,)
    return ()


def schema_for(
    model: Model, n_features: int = N_FEATURES, *, x_dtype: str = "float64"
) -> Schema:
    y_dtype = "int64" if n_classes_of(model) else "float64"
    return Schema(
        {
            "X": FieldInfo((n_features,), x_dtype),
            "y": FieldInfo(y_row_shape(model), y_dtype),
        }
    )


def random_batch(
    model: Model, rng: np.random.Generator, n_rows: int, n_features: int = N_FEATURES
) -> dict[str, np.ndarray]:
    X = rng.normal(size=(n_rows, n_features))
    k = n_classes_of(model)
    if k is None:
        y = rng.normal(size=(n_rows, *y_row_shape(model)))
    else:
        y = rng.integers(0, k, size=n_rows)
    return {"X": X, "y": y}


def random_params(
    model: Model, rng: np.random.Generator, n_features: int = N_FEATURES
) -> dict[str, np.ndarray]:
    """Non-zero values for every parameter (zeros would hide L1 and bias bugs)."""
    shapes = {
        k: v.shape for k, v in model.init(rng, schema_for(model, n_features)).items()
    }
    return {k: rng.normal(scale=0.7, size=shape) for k, shape in shapes.items()}


def objective(
    model: Model, params: dict[str, np.ndarray], batch: dict[str, np.ndarray]
) -> float:
    part = model.loss(params, batch)
    return part.loss_sum / part.n_rows + model.penalty(params)


def numerical_gradient(
    f: Callable[[dict[str, np.ndarray]], float], params: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    grads = {}
    for name, value in params.items():
        grad = np.zeros(value.shape)
        for index in np.ndindex(value.shape):
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name][index] += FD_STEP
            minus[name][index] -= FD_STEP
            grad[index] = (f(plus) - f(minus)) / (2 * FD_STEP)
        grads[name] = grad
    return grads


def full_gradient(
    model: Model, params: dict[str, np.ndarray], batch: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    part = model.loss_and_grad(params, batch)
    pen = model.penalty_grad(params)
    return {k: np.asarray(g) / part.n_rows + pen[k] for k, g in part.grads.items()}


def flat(grads: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.ravel(grads[k]) for k in names])


def first_bad_row(model: Model, y: np.ndarray) -> int | None:
    problem = model.check_labels(y)
    return None if problem is None else problem[0]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def mlp_output(model: MLP, params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Straightforward forward pass, independent of the model's kernel."""
    act = (lambda h: np.maximum(h, 0.0)) if model.activation == "relu" else np.tanh
    a = X
    n_layers = len(model.hidden) + 1
    for i in range(n_layers):
        a = a @ params[f"w{i}"] + params[f"b{i}"]
        if i < n_layers - 1:
            a = act(a)
    return a


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_gradient_matches_finite_differences(model: Model) -> None:
    rng = np.random.default_rng(0)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 40)

    analytic = full_gradient(model, params, batch)
    numeric = numerical_gradient(lambda p: objective(model, p, batch), params)

    names = sorted(params)
    assert sorted(analytic) == names
    a, b = flat(analytic, names), flat(numeric, names)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < FD_RTOL


@pytest.mark.parametrize("model", MODELS)
def test_partial_shapes_dtypes_and_metric_names(model: Model) -> None:
    rng = np.random.default_rng(1)
    params = random_params(model, rng)
    part = model.loss_and_grad(params, random_batch(model, rng, 30))
    assert isinstance(part.loss_sum, float)
    assert part.n_rows == 30
    assert set(part.grads) == set(params)
    for name, grad in part.grads.items():
        assert isinstance(grad, np.ndarray)
        assert grad.dtype == np.float64
        assert grad.shape == params[name].shape
    assert tuple(part.metrics) == model.metric_names()
    pen = model.penalty_grad(params)
    assert set(pen) == set(params)
    assert all(pen[k].shape == params[k].shape for k in params)


@pytest.mark.parametrize("model", MODELS)
def test_loss_equals_loss_and_grad_without_grads(model: Model) -> None:
    rng = np.random.default_rng(2)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 25)
    full = model.loss_and_grad(params, batch)
    cheap = model.loss(params, batch)
    assert cheap.grads == {}
    assert cheap.loss_sum == pytest.approx(full.loss_sum, rel=1e-14)
    assert cheap.n_rows == full.n_rows
    assert dict(cheap.metrics) == pytest.approx(dict(full.metrics), rel=1e-14)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_loss_and_grad_many_equals_one_set_at_a_time(
    model: Model, dtype: type[np.floating]
) -> None:
    rng = np.random.default_rng(5)
    batch = random_batch(model, rng, 40)
    batch = {"X": batch["X"].astype(dtype), "y": batch["y"]}
    before = batch["X"].copy()
    sets = [random_params(model, rng) for _ in range(3)]
    many = model.loss_and_grad_many(sets, batch)
    np.testing.assert_array_equal(batch["X"], before)
    rel = 1e-12 if dtype is np.float64 else 1e-5
    assert len(many) == 3
    for params, got in zip(sets, many, strict=True):
        want = model.loss_and_grad(params, batch)
        assert got.loss_sum == pytest.approx(want.loss_sum, rel=rel)
        assert got.n_rows == want.n_rows
        assert tuple(got.metrics) == tuple(want.metrics)
        assert dict(got.metrics) == pytest.approx(dict(want.metrics), rel=rel)
        assert set(got.grads) == set(want.grads)
        for name, grad in got.grads.items():
            assert grad.dtype == np.float64
            assert grad.shape == params[name].shape
            np.testing.assert_allclose(grad, want.grads[name], rtol=rel, atol=rel)
    # One set: exactly the single evaluation.
    [one] = model.loss_and_grad_many(sets[:1], batch)
    assert one.loss_sum == model.loss_and_grad(sets[0], batch).loss_sum


@pytest.mark.parametrize("model", MODELS)
def test_batch_is_not_modified(model: Model) -> None:
    rng = np.random.default_rng(3)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 20)
    for dtype in (np.float64, np.float32):
        cast = {"X": batch["X"].astype(dtype), "y": batch["y"].copy()}
        before = {k: v.copy() for k, v in cast.items()}
        before_params = {k: v.copy() for k, v in params.items()}
        model.loss_and_grad(params, cast)
        model.loss(params, cast)
        model.predict(params, cast["X"])
        for k in cast:
            np.testing.assert_array_equal(cast[k], before[k])
        for k in params:
            np.testing.assert_array_equal(params[k], before_params[k])


# ---------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_float32_batch_close_to_float64(model: Model) -> None:
    rng = np.random.default_rng(4)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 500)
    batch32 = {"X": batch["X"].astype(np.float32), "y": batch["y"]}
    params32 = {k: v.astype(np.float32) for k, v in params.items()}

    p64 = model.loss_and_grad(params, batch)
    p32 = model.loss_and_grad(params32, batch32)

    assert isinstance(p32.loss_sum, float)
    assert p32.loss_sum == pytest.approx(p64.loss_sum, rel=1e-4)
    for name, g64 in p64.grads.items():
        g32 = p32.grads[name]
        assert isinstance(g32, np.ndarray)
        assert g32.dtype == np.float64
        scale = float(np.max(np.abs(g64)))
        np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-4 * scale)
    for key, value in p64.metrics.items():
        assert p32.metrics[key] == pytest.approx(value, rel=1e-4, abs=1.0)


def test_float32_sums_accumulate_in_float64() -> None:
    n_ones = 1_000_000
    # one large row then many small ones: a float32 running sum drops the small ones
    X = np.zeros((n_ones + 1, 1), dtype=np.float32)
    y = np.ones(n_ones + 1, dtype=np.float32)
    y[0] = 1e4
    params = {"w": np.zeros(1, dtype=np.float32), "b": np.zeros((), dtype=np.float32)}

    part = LinearRegression().loss(params, {"X": X, "y": y})
    assert part.loss_sum == 0.5 * (1e8 + n_ones)
    assert part.metrics["y_sum"] == 1e4 + n_ones
    assert part.metrics["y_sq_sum"] == 1e8 + n_ones

    X[0, 0] = -1e4  # row 0: loss log(1 + exp(1e4)) == 1e4; others: log(2)
    labels = np.zeros(n_ones + 1, dtype=np.int8)
    labels[0] = 1
    params["w"][0] = 1.0
    part = LogisticRegression().loss(params, {"X": X, "y": labels})
    expected = 1e4 + n_ones * float(np.float32(np.log(2.0)))
    assert part.loss_sum == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_predict_dtypes(model: Model) -> None:
    rng = np.random.default_rng(5)
    params = random_params(model, rng)
    X = rng.normal(size=(7, N_FEATURES))
    for dtype, expected in [
        (np.float64, np.float64),
        (np.float32, np.float32),
        (np.float16, np.float32),
    ]:
        out = model.predict(params, X.astype(dtype))
        assert out.shape[0] == 7
        if model.is_classifier:
            assert out.dtype == np.int64
        else:
            assert out.dtype == expected
    out64 = model.predict(params, X)
    out32 = model.predict(params, X.astype(np.float32))
    if model.is_classifier:
        assert out64.shape == (7,)
    else:
        np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# partial sums
# ---------------------------------------------------------------------------

N_SPLIT_ROWS = 40


def _assert_partials_equal(a: Partial, b: Partial, rtol: float) -> None:
    assert a.n_rows == b.n_rows
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=rtol)
    assert a.grads.keys() == b.grads.keys()
    for name, ga in a.grads.items():
        gb = np.asarray(b.grads[name])
        scale = float(np.max(np.abs(gb))) if gb.size else 0.0
        np.testing.assert_allclose(np.asarray(ga), gb, rtol=rtol, atol=rtol * scale)
    assert a.metrics.keys() == b.metrics.keys()
    for key, value in a.metrics.items():
        assert value == pytest.approx(b.metrics[key], rel=rtol)


@pytest.mark.parametrize("model", MODELS)
@settings(max_examples=20, deadline=None, database=None)
@given(split=st.integers(0, N_SPLIT_ROWS))
def test_combined_halves_equal_whole(model: Model, split: int) -> None:
    rng = np.random.default_rng(6)
    params = random_params(model, rng)
    batch = random_batch(model, rng, N_SPLIT_ROWS)
    first = {k: v[:split] for k, v in batch.items()}
    second = {k: v[split:] for k, v in batch.items()}
    whole = model.loss_and_grad(params, batch)
    both = combine(
        model.loss_and_grad(params, first), model.loss_and_grad(params, second)
    )
    _assert_partials_equal(both, whole, rtol=1e-12)
    both_eval = combine(model.loss(params, first), model.loss(params, second))
    _assert_partials_equal(both_eval, model.loss(params, batch), rtol=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_empty_batch(model: Model) -> None:
    rng = np.random.default_rng(7)
    params = random_params(model, rng)
    for dtype in (np.float64, np.float32):
        batch = random_batch(model, rng, 0)
        batch["X"] = batch["X"].astype(dtype)
        part = model.loss_and_grad(params, batch)
        assert part.n_rows == 0
        assert part.loss_sum == 0.0
        for name, grad in part.grads.items():
            np.testing.assert_array_equal(grad, np.zeros(params[name].shape))
        assert all(v == 0.0 for v in part.metrics.values())
        assert model.loss(params, batch).n_rows == 0
        summary = model.summarize(part)
        assert all(np.isnan(v) for v in summary.values())


# ---------------------------------------------------------------------------
# penalties
# ---------------------------------------------------------------------------


def test_linear_penalty_values() -> None:
    model = LinearRegression(l2=0.5, l1=0.25)
    params = {"w": np.array([1.0, -2.0, 0.0]), "b": np.array(10.0)}
    assert model.penalty(params) == pytest.approx(0.25 * 5.0 + 0.25 * 3.0)
    grad = model.penalty_grad(params)
    np.testing.assert_allclose(grad["w"], [0.5 + 0.25, -1.0 - 0.25, 0.0])
    assert grad["b"].shape == ()
    assert grad["b"] == 0.0


def test_mlp_penalty_ignores_biases() -> None:
    model = MLP((2,), 1, l2=2.0)
    params = {
        "w0": np.ones((3, 2)),
        "b0": np.full(2, 5.0),
        "w1": np.full((2, 1), 2.0),
        "b1": np.full(1, 5.0),
    }
    assert model.penalty(params) == pytest.approx(1.0 * (6.0 + 8.0))
    grad = model.penalty_grad(params)
    np.testing.assert_allclose(grad["w1"], np.full((2, 1), 4.0))
    np.testing.assert_array_equal(grad["b0"], np.zeros(2))
    np.testing.assert_array_equal(grad["b1"], np.zeros(1))


# ---------------------------------------------------------------------------
# reference losses and metrics
# ---------------------------------------------------------------------------


def test_linear_loss_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(8)
    model = LinearRegression()
    params = random_params(model, rng)
    batch = random_batch(model, rng, 200)
    batch["y"] = batch["y"] + 3.0
    pred = batch["X"] @ params["w"] + params["b"]
    part = model.loss(params, batch)
    mse = mean_squared_error(batch["y"], pred)
    assert part.loss_sum / part.n_rows == pytest.approx(mse / 2, rel=1e-12)
    summary = model.summarize(part)
    assert summary["mse"] == pytest.approx(mse, rel=1e-12)
    assert summary["loss"] == pytest.approx(mse / 2, rel=1e-12)
    assert summary["r2"] == pytest.approx(r2_score(batch["y"], pred), rel=1e-10)
    np.testing.assert_allclose(model.predict(params, batch["X"]), pred, rtol=1e-12)


def test_r2_from_combined_halves_matches_sklearn() -> None:
    rng = np.random.default_rng(9)
    model = LinearRegression()
    params = random_params(model, rng)
    batch = random_batch(model, rng, 101)
    pred = batch["X"] @ params["w"] + params["b"]
    halves = [
        {k: v[s] for k, v in batch.items()} for s in (slice(0, 50), slice(50, None))
    ]
    part = combine(*(model.loss(params, h) for h in halves))
    assert model.summarize(part)["r2"] == pytest.approx(
        r2_score(batch["y"], pred), rel=1e-10
    )


def test_r2_undefined_for_constant_targets() -> None:
    model = LinearRegression()
    params = {"w": np.zeros(2), "b": np.array(0.0)}
    batch = {"X": np.ones((4, 2)), "y": np.full(4, 3.0)}
    assert np.isnan(model.summarize(model.loss(params, batch))["r2"])


def test_logistic_loss_matches_sklearn_log_loss() -> None:
    rng = np.random.default_rng(10)
    model = LogisticRegression()
    params = random_params(model, rng)
    batch = random_batch(model, rng, 300)
    z = batch["X"] @ params["w"] + params["b"]
    part = model.loss(params, batch)
    expected = log_loss(batch["y"], sigmoid(z), labels=[0, 1])
    assert part.loss_sum / part.n_rows == pytest.approx(expected, rel=1e-10)
    proba = model.predict_proba(params, batch["X"])
    np.testing.assert_allclose(proba[:, 1], sigmoid(z), rtol=1e-12)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(
        model.decision_function(params, batch["X"]), z, rtol=1e-12
    )
    np.testing.assert_array_equal(
        model.predict(params, batch["X"]), (z > 0).astype(np.int64)
    )


@pytest.mark.parametrize(
    "y",
    [
        np.array([1, 0, 0, 1, 0]),
        np.array([True, False, False, True, False]),
        np.array([1.0, 0.0, 0.0, 1.0, 0.0], dtype=np.float32),
        np.array([1, 0, 0, 1, 0], dtype=np.uint8),
    ],
    ids=["int", "bool", "float32", "uint8"],
)
def test_logistic_accuracy_on_hand_made_batch(y: np.ndarray) -> None:
    model = LogisticRegression()
    params = {"w": np.array([1.0, -1.0]), "b": np.array(0.0)}
    # z = [2, -2, 1, -1, 0]: rows 0, 1 and 4 are right (z == 0 predicts 0)
    X = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    part = model.loss_and_grad(params, {"X": X, "y": y})
    assert part.metrics["correct"] == 3.0
    assert model.summarize(part)["accuracy"] == pytest.approx(0.6)
    z = X @ params["w"]
    expected = log_loss(y.astype(int), sigmoid(z), labels=[0, 1], normalize=False)
    assert part.loss_sum == pytest.approx(expected, rel=1e-12)


def test_logistic_is_stable_for_huge_margins() -> None:
    model = LogisticRegression()
    params = {"w": np.array([1.0]), "b": np.array(0.0)}
    for dtype in (np.float64, np.float32):
        X = np.array([[1000.0], [-1000.0], [1000.0], [-1000.0]], dtype=dtype)
        y = np.array([0, 1, 1, 0])
        cast = {k: v.astype(dtype) for k, v in params.items()}
        part = model.loss_and_grad(cast, {"X": X, "y": y})
        assert part.loss_sum == pytest.approx(2000.0, rel=1e-6)
        np.testing.assert_allclose(part.grads["w"], [2000.0])
        assert float(part.grads["b"]) == pytest.approx(0.0)
        proba = model.predict_proba(cast, X)
        np.testing.assert_allclose(proba, [[0, 1], [1, 0], [0, 1], [1, 0]])


def test_softmax_loss_matches_sklearn_log_loss() -> None:
    rng = np.random.default_rng(11)
    model = SoftmaxRegression(5)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 300)
    z = batch["X"] @ params["w"] + params["b"]
    part = model.loss(params, batch)
    expected = log_loss(batch["y"], softmax(z), labels=list(range(5)))
    assert part.loss_sum / part.n_rows == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(
        model.predict_proba(params, batch["X"]), softmax(z), rtol=1e-10
    )
    np.testing.assert_array_equal(model.predict(params, batch["X"]), z.argmax(axis=1))
    expected_acc = np.mean(z.argmax(axis=1) == batch["y"])
    assert model.summarize(part)["accuracy"] == pytest.approx(expected_acc)


def test_softmax_accuracy_on_hand_made_batch_and_huge_logits() -> None:
    model = SoftmaxRegression(3)
    params = {"w": 1000.0 * np.eye(3), "b": np.zeros(3)}
    X = np.eye(3)[[0, 1, 2, 2]]
    y = np.array([0, 1, 1, 2], dtype=np.float64)
    part = model.loss_and_grad(params, {"X": X, "y": y})
    assert part.metrics["correct"] == 3.0
    assert model.summarize(part)["accuracy"] == pytest.approx(0.75)
    assert part.loss_sum == pytest.approx(1000.0)
    assert np.all(np.isfinite(part.grads["w"]))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("loss", ["squared", "logistic", "softmax"])
def test_mlp_loss_matches_independent_forward(loss: str, activation: str) -> None:
    rng = np.random.default_rng(12)
    n_outputs = {"squared": 2, "logistic": 1, "softmax": 3}[loss]
    model = MLP((6, 4), n_outputs, loss=loss, activation=activation)
    params = random_params(model, rng)
    batch = random_batch(model, rng, 150)
    out = mlp_output(model, params, batch["X"])
    part = model.loss(params, batch)
    summary = model.summarize(part)
    if loss == "squared":
        expected = 0.5 * np.sum((out - batch["y"]) ** 2) / 150
        assert summary["mse"] == pytest.approx(
            mean_squared_error(batch["y"], out), rel=1e-10
        )
        assert summary["r2"] == pytest.approx(r2_score(batch["y"], out), rel=1e-10)
        np.testing.assert_allclose(model.predict(params, batch["X"]), out, rtol=1e-10)
    elif loss == "logistic":
        expected = log_loss(batch["y"], sigmoid(out[:, 0]), labels=[0, 1])
        assert summary["accuracy"] == pytest.approx(
            np.mean((out[:, 0] > 0) == batch["y"])
        )
        np.testing.assert_allclose(
            model.predict_proba(params, batch["X"])[:, 1],
            sigmoid(out[:, 0]),
            rtol=1e-10,
        )
    else:
        expected = log_loss(batch["y"], softmax(out), labels=[0, 1, 2])
        assert summary["accuracy"] == pytest.approx(
            np.mean(out.argmax(1) == batch["y"])
        )
        np.testing.assert_allclose(
            model.predict_proba(params, batch["X"]), softmax(out), rtol=1e-10
        )
    assert summary["loss"] == pytest.approx(expected, rel=1e-10)


def test_mlp_regressor_has_no_predict_proba() -> None:
    model = MLP((3,), 1)
    params = random_params(model, np.random.default_rng(13))
    with pytest.raises(ValueError, match="predict_proba"):
        model.predict_proba(params, np.zeros((2, N_FEATURES)))


# ---------------------------------------------------------------------------
# agreement with scikit-learn's solutions (the documented l1/l2 mappings)
# ---------------------------------------------------------------------------


def _regression_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    X = rng.normal(size=(n, 6))
    coef = np.array([2.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    return X, X @ coef + 1.5 + 0.3 * rng.normal(size=n)


def test_ridge_solution_is_stationary_with_l2_alpha_over_n() -> None:
    rng = np.random.default_rng(14)
    X, y = _regression_data(rng, 200)
    alpha = 5.0
    ridge = Ridge(alpha=alpha).fit(X, y)
    model = LinearRegression(l2=alpha / len(y))
    params = {"w": ridge.coef_, "b": np.asarray(ridge.intercept_)}
    grad = full_gradient(model, params, {"X": X, "y": y})
    assert np.linalg.norm(flat(grad, ["w", "b"])) < 1e-9


def test_lasso_solution_satisfies_subgradient_conditions_with_l1_alpha() -> None:
    rng = np.random.default_rng(15)
    X, y = _regression_data(rng, 200)
    alpha = 0.1
    lasso = Lasso(alpha=alpha, tol=1e-14, max_iter=100_000).fit(X, y)
    assert np.any(lasso.coef_ == 0.0) and np.any(lasso.coef_ != 0.0)
    model = LinearRegression(l1=alpha)
    params = {"w": lasso.coef_, "b": np.asarray(lasso.intercept_)}
    part = model.loss_and_grad(params, {"X": X, "y": y})
    data_grad = part.grads["w"] / part.n_rows
    active = lasso.coef_ != 0.0
    full = data_grad + model.penalty_grad(params)["w"]
    np.testing.assert_allclose(full[active], 0.0, atol=1e-7)
    assert np.all(np.abs(data_grad[~active]) <= alpha + 1e-7)
    assert abs(float(part.grads["b"]) / part.n_rows) < 1e-7


def test_sklearn_logistic_solution_is_stationary_with_l2_one_over_cn() -> None:
    rng = np.random.default_rng(16)
    X = rng.normal(size=(300, 5))
    y = (
        X @ np.array([1.0, -2.0, 0.5, 0.0, 1.0]) + 0.5 * rng.normal(size=300) > 0
    ).astype(int)
    C = 0.5
    sk = SkLogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(X, y)
    model = LogisticRegression(l2=1.0 / (C * len(y)))
    params = {"w": sk.coef_[0], "b": np.asarray(sk.intercept_[0])}
    grad = full_gradient(model, params, {"X": X, "y": y})
    assert np.linalg.norm(flat(grad, ["w", "b"])) < 1e-6


# ---------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------


def test_logistic_check_labels() -> None:
    model = LogisticRegression()
    assert model.check_labels(np.array([0, 1, 1, 0])) is None
    assert model.check_labels(np.array([True, False])) is None
    assert model.check_labels(np.array([], dtype=np.int64)) is None
    problem = model.check_labels(np.array([0, 1, 1, 2, 0, 3]))
    assert problem is not None
    assert problem[0] == 3
    assert "2" in problem[1] and "{0, 1}" in problem[1]
    assert first_bad_row(model, np.array([0.0, 1.0, 0.5])) == 2
    assert first_bad_row(model, np.array([0.0, np.nan])) == 1
    assert first_bad_row(model, np.array([-1, 0])) == 0


def test_softmax_check_labels() -> None:
    model = SoftmaxRegression(5)
    assert model.check_labels(np.array([0, 4, 2, 1])) is None
    assert model.check_labels(np.array([0.0, 4.0])) is None
    assert model.check_labels(np.array([0, 4], dtype=np.uint8)) is None
    assert model.check_labels(np.array([0, 4, 7, 1, 9])) == (
        2,
        "class id 7 is not in [0, 5) (SoftmaxRegression(n_classes=5))",
    )
    assert model.check_labels(np.array([3.0, 7.0])) == (
        1,
        "class id 7 is not in [0, 5) (SoftmaxRegression(n_classes=5))",
    )
    problem = model.check_labels(np.array([1, -1]))
    assert problem is not None and problem[0] == 1 and "-1" in problem[1]
    problem = model.check_labels(np.array([1.0, 2.5, 9.0]))
    assert problem is not None and problem[0] == 1 and "not an integer" in problem[1]
    assert first_bad_row(model, np.array([1.0, np.nan])) == 1


def test_regression_check_labels() -> None:
    model = LinearRegression()
    assert model.check_labels(np.array([1.0, -2.0, 1e300])) is None
    assert model.check_labels(np.array([1, 2, 3])) is None
    problem = model.check_labels(np.array([1.0, np.nan, np.inf]))
    assert problem is not None and problem[0] == 1 and "nan" in problem[1]
    assert first_bad_row(model, np.array([1.0, 2.0, -np.inf])) == 2


def test_mlp_check_labels_follow_the_loss() -> None:
    y2 = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, np.nan]])
    assert first_bad_row(MLP((3,), 2), y2) == 2
    assert first_bad_row(MLP((3,), 1, loss="logistic"), np.array([0, 1, 5])) == 2
    problem = MLP((3,), 3, loss="softmax").check_labels(np.array([0, 3]))
    assert problem is not None and problem[0] == 1 and "[0, 3)" in problem[1]


def test_check_labels_first_bad_row_in_a_large_array() -> None:
    y = np.zeros(1_000_000, dtype=np.int64)
    y[[654_321, 900_000]] = 2
    assert first_bad_row(LogisticRegression(), y) == 654_321
    assert first_bad_row(SoftmaxRegression(2), y) == 654_321


# ---------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_check_schema_accepts_float32_and_float64(model: Model) -> None:
    for x_dtype in ("float32", "float64"):
        model.check_schema(schema_for(model, x_dtype=x_dtype))
    model.check_schema(
        Schema(
            {
                "X": FieldInfo((3,), "float32"),
                "y": FieldInfo(
                    y_row_shape(model), "bool" if n_classes_of(model) == 2 else "int32"
                ),
            }
        )
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"y": FieldInfo((), "int64")}, ["'X'", "missing"]),
        ({"X": FieldInfo((3,), "float32")}, ["'y'", "missing"]),
        (
            {"X": FieldInfo((3,), "int64"), "y": FieldInfo((), "int64")},
            ["'X'", "int64", "float32"],
        ),
        (
            {"X": FieldInfo((3, 2), "float32"), "y": FieldInfo((), "int64")},
            ["'X'", "(3, 2)"],
        ),
        (
            {"X": FieldInfo((3,), "float32"), "y": FieldInfo((2,), "int64")},
            ["'y'", "()", "(2,)"],
        ),
        (
            {"X": FieldInfo((3,), "float32"), "y": FieldInfo((), "<U3")},
            ["'y'", "<U3", "numeric"],
        ),
    ],
)
def test_check_schema_errors_name_the_field(
    fields: dict[str, FieldInfo], words: list[str]
) -> None:
    for model in (
        LogisticRegression(),
        SoftmaxRegression(3),
        LinearRegression(),
        MLP((2,)),
    ):
        with pytest.raises(DataValidationError) as info:
            model.check_schema(Schema(fields))
        for word in words:
            assert word in str(info.value)
        with pytest.raises(DataValidationError):
            model.init(np.random.default_rng(0), Schema(fields))


def test_check_schema_multi_output_mlp() -> None:
    model = MLP((4,), 3)
    model.check_schema(
        Schema({"X": FieldInfo((5,), "float32"), "y": FieldInfo((3,), "float32")})
    )
    with pytest.raises(DataValidationError, match=r"'y'.*\(3,\).*found row shape \(\)"):
        model.check_schema(
            Schema({"X": FieldInfo((5,), "float32"), "y": FieldInfo((), "float32")})
        )


# ---------------------------------------------------------------------------
# configuration and initialization
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_config_round_trip(model: Model) -> None:
    config = json.loads(json.dumps(model.config()))
    assert config["type"] == model.kind == type(model).__name__
    rebuilt = model_from_config(config)
    assert rebuilt == model
    assert hash(rebuilt) == hash(model)
    assert rebuilt.config() == model.config()
    assert repr(rebuilt) == repr(model)


def test_config_contents() -> None:
    assert LogisticRegression(l2=1e-4).config() == {
        "type": "LogisticRegression",
        "l2": 1e-4,
        "l1": 0.0,
    }
    assert SoftmaxRegression(4, l1=0.5).config()["n_classes"] == 4
    assert MLP((8, 4), 3, loss="softmax", activation="tanh", l2=0.1).config() == {
        "type": "MLP",
        "hidden": [8, 4],
        "n_outputs": 3,
        "loss": "softmax",
        "activation": "tanh",
        "l2": 0.1,
    }
    assert LogisticRegression(l2=1.0) != LogisticRegression(l2=2.0)
    assert LinearRegression() != LogisticRegression()
    assert MLP(hidden=[8]) == MLP(hidden=(8,))


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: LinearRegression(l2=-1.0), "l2"),
        (lambda: LinearRegression(l1=float("nan")), "l1"),
        (lambda: LogisticRegression(l2=-1e-9), "l2"),
        (lambda: LogisticRegression(l1="0.1"), "l1"),
        (lambda: SoftmaxRegression(1), "n_classes"),
        (lambda: SoftmaxRegression(2.5), "n_classes"),
        (lambda: SoftmaxRegression(3, l2=-1.0), "l2"),
        (lambda: MLP(hidden=()), "hidden"),
        (lambda: MLP(hidden=(4, 0)), "hidden"),
        (lambda: MLP(hidden=(4, -2)), "hidden"),
        (lambda: MLP(hidden="64"), "hidden"),
        (lambda: MLP(n_outputs=0), "n_outputs"),
        (lambda: MLP(loss="hinge"), "loss"),
        (lambda: MLP(activation="sigmoid"), "activation"),
        (lambda: MLP(n_outputs=2, loss="logistic"), "n_outputs"),
        (lambda: MLP(loss="softmax"), "n_outputs"),
        (lambda: MLP(l2=-0.1), "l2"),
    ],
)
def test_invalid_hyper_parameters(make: Callable[[], Model], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        make()


def test_linear_init_is_zero() -> None:
    schema = Schema({"X": FieldInfo((7,), "float32"), "y": FieldInfo((), "int64")})
    rng = np.random.default_rng(0)
    for model, w_shape, b_shape in [
        (LinearRegression(), (7,), ()),
        (LogisticRegression(), (7,), ()),
        (SoftmaxRegression(3), (7, 3), (3,)),
    ]:
        params = model.init(rng, schema)
        assert sorted(params) == ["b", "w"]
        assert params["w"].shape == w_shape and params["b"].shape == b_shape
        assert params["w"].dtype == np.float64
        assert not params["w"].any() and not params["b"].any()


@pytest.mark.parametrize(
    ("activation", "hidden_std"),
    [("relu", np.sqrt(2 / 400)), ("tanh", np.sqrt(2 / 700))],
)
def test_mlp_init_scales(activation: str, hidden_std: float) -> None:
    model = MLP((300, 200), 2, activation=activation)
    schema = Schema(
        {"X": FieldInfo((400,), "float32"), "y": FieldInfo((2,), "float32")}
    )
    params = model.init(np.random.default_rng(0), schema)
    assert list(params) == ["w0", "b0", "w1", "b1", "w2", "b2"]
    assert params["w0"].shape == (400, 300)
    assert params["w1"].shape == (300, 200)
    assert params["w2"].shape == (200, 2)
    assert params["w0"].std() == pytest.approx(hidden_std, rel=0.02)
    assert params["w2"].std() == pytest.approx(np.sqrt(2 / 202), rel=0.1)
    assert all(not params[f"b{i}"].any() for i in range(3))
    again = model.init(np.random.default_rng(0), schema)
    np.testing.assert_array_equal(again["w1"], params["w1"])
