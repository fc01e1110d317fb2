"""Newton's pure parts: GLM Hessians against finite differences, the damped
and proximal steps, the local solve of the one-pass start, and the whole
iteration (:func:`minimize_newton`, the trainer's loop without a cluster)
against scikit-learn and glum on hard problems."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn import linear_model
from sklearn.metrics import mean_gamma_deviance, mean_poisson_deviance
from threadpoolctl import threadpool_limits

import dasktrain as dt
from dasktrain import models
from dasktrain._tree import flatten
from dasktrain.engine.second_order import local_partial
from dasktrain.models.glm import (
    penalty_vectors,
    second_order_terms,
    second_order_terms_many,
    supports_second_order,
    terms_to_params,
)
from dasktrain.optim.newton import (
    LOCAL_MIN_ROWS_PER_COEF,
    MAX_HESSIAN_PARAMS,
    LocalValue,
    Newton,
    NewtonRun,
    PointValue,
    damped_solve,
    local_newton_solve,
    minimize_l1_quadratic,
    minimize_newton,
    newton_step,
)

#: Finite-difference step and tolerance (central differences, float64).
FD_EPS = 1e-6
FD_ATOL = 1e-6
#: float32 Hessians (BLAS in float32, float64 result) against float64 ones.
FLOAT32_HESSIAN_RTOL = 1e-4
#: Objectives reached by minimize_newton against the oracles (relative).
OBJECTIVE_RTOL = 1e-7
SKLEARN_TOL = 1e-12

N_ROWS = 240
N_FEATURES = 5
N_CLASSES = 3


def _labels(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if name == "linear":
        return rng.normal(size=n)
    if name == "logistic":
        return rng.integers(0, 2, n)
    if name == "softmax":
        return rng.integers(0, N_CLASSES, n)
    if name == "poisson":
        return rng.poisson(2.0, n).astype(np.float64)
    return rng.gamma(2.0, 1.0, n) + 0.1


MODELS: dict[str, Callable[[], models.Model]] = {
    "linear": lambda: models.LinearRegression(l2=0.1),
    "logistic": lambda: models.LogisticRegression(l2=0.1),
    "softmax": lambda: models.SoftmaxRegression(N_CLASSES, l2=0.1),
    "poisson": lambda: models.PoissonRegression(l2=0.1),
    "gamma": lambda: models.GammaRegression(l2=0.1),
}


def _problem(
    name: str, seed: int = 0
) -> tuple[models.Model, dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    model = MODELS[name]()
    X = rng.normal(size=(N_ROWS, N_FEATURES))
    k = N_CLASSES if name == "softmax" else 1
    coef = 0.3 * rng.normal(size=(N_FEATURES + 1) * k)
    return model, {"X": X, "y": _labels(name, rng, N_ROWS)}, coef


def _like(model: models.Model) -> dict[str, np.ndarray]:
    k = model.n_classes if isinstance(model, models.SoftmaxRegression) else None
    if k is None:
        return {"b": np.zeros(()), "w": np.zeros(N_FEATURES)}
    return {"b": np.zeros(k), "w": np.zeros((N_FEATURES, k))}


# -- kernels -----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_and_hessian_match_finite_differences(name: str) -> None:
    model, batch, coef = _problem(name)
    terms = second_order_terms(model, coef, batch)
    assert terms.hessian is not None
    n = coef.size
    assert terms.grad.shape == (n,) and terms.hessian.shape == (n, n)
    basis = np.eye(n)

    def loss(c: np.ndarray) -> float:
        return second_order_terms(
            model, c, batch, with_grad=False, with_hessian=False
        ).loss_sum

    def grad(c: np.ndarray) -> np.ndarray:
        return second_order_terms(model, c, batch, with_hessian=False).grad

    fd_grad = np.array(
        [
            (loss(coef + FD_EPS * e) - loss(coef - FD_EPS * e)) / (2 * FD_EPS)
            for e in basis
        ]
    )
    fd_hess = np.array(
        [
            (grad(coef + FD_EPS * e) - grad(coef - FD_EPS * e)) / (2 * FD_EPS)
            for e in basis
        ]
    )
    scale = max(1.0, float(np.abs(terms.hessian).max()))
    np.testing.assert_allclose(terms.grad, fd_grad, atol=FD_ATOL * scale)
    np.testing.assert_allclose(terms.hessian, fd_hess, atol=FD_ATOL * scale)
    np.testing.assert_allclose(terms.hessian, terms.hessian.T, atol=1e-12 * scale)
    assert np.linalg.eigvalsh(terms.hessian).min() >= -1e-9 * scale  # convex


@pytest.mark.parametrize("name", list(MODELS))
def test_terms_agree_with_the_first_order_kernels(name: str) -> None:
    """Loss and gradient are those of ``Model.loss_and_grad`` in the
    flattening order of the trainer (``b`` first, then ``w`` by rows)."""
    model, batch, coef = _problem(name, seed=1)
    terms = second_order_terms(model, coef, batch, with_hessian=False)
    params = terms_to_params(coef, _like(model))
    np.testing.assert_array_equal(flatten(params), coef)
    part = model.loss_and_grad(params, batch)
    assert terms.loss_sum == part.loss_sum
    np.testing.assert_array_equal(terms.grad, flatten(dict(part.grads)))
    assert terms.metrics == dict(part.metrics)


@pytest.mark.parametrize("name", ["logistic", "softmax", "poisson"])
def test_float32_hessian_is_close_to_float64(name: str) -> None:
    model, batch, coef = _problem(name, seed=2)
    h64 = second_order_terms(model, coef, batch).hessian
    h32 = second_order_terms(
        model, coef, {"X": batch["X"].astype(np.float32), "y": batch["y"]}
    ).hessian
    assert h32 is not None and h64 is not None and h32.dtype == np.float64
    np.testing.assert_allclose(
        h32, h64, rtol=0, atol=FLOAT32_HESSIAN_RTOL * np.abs(h64).max()
    )


def test_hessian_on_a_row_subset_is_scaled_to_all_rows() -> None:
    model, batch, coef = _problem("logistic", seed=3)
    full = second_order_terms(model, coef, batch).hessian
    assert full is not None
    same = second_order_terms(model, coef, batch, hessian_rows=N_ROWS).hessian
    np.testing.assert_array_equal(same, full)
    sub = second_order_terms(model, coef, batch, hessian_rows=N_ROWS // 4).hessian
    every_fourth = {"X": batch["X"][::4], "y": batch["y"][::4]}
    expected = second_order_terms(model, coef, every_fourth).hessian
    assert sub is not None and expected is not None
    np.testing.assert_allclose(sub, 4 * expected, rtol=1e-12)
    # gradient and loss stay exact
    assert (
        second_order_terms(model, coef, batch, hessian_rows=10).loss_sum
        == second_order_terms(model, coef, batch).loss_sum
    )


def test_several_points_in_one_product_match_single_points() -> None:
    model, batch, coef = _problem("softmax", seed=4)
    points = [coef, 0.5 * coef, -coef]
    many = second_order_terms_many(model, points, batch, hessian_index=1)
    for i, (point, terms) in enumerate(zip(points, many, strict=True)):
        single = second_order_terms(model, point, batch, with_hessian=i == 1)
        assert terms.loss_sum == pytest.approx(single.loss_sum, rel=1e-12)
        np.testing.assert_allclose(terms.grad, single.grad, rtol=1e-10, atol=1e-12)
        assert (terms.hessian is None) == (i != 1)
    assert many[1].hessian is not None
    np.testing.assert_allclose(
        many[1].hessian, second_order_terms(model, points[1], batch).hessian
    )


def test_poisson_and_gamma_losses_are_half_sklearn_deviances() -> None:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(100, 3))
    params = {"w": np.array([0.2, -0.1, 0.3]), "b": np.array(0.4)}
    mu = np.exp(X @ params["w"] + params["b"])
    y_counts = rng.poisson(mu).astype(np.float64)
    y_positive = rng.gamma(2.0, mu / 2.0)
    poisson = models.PoissonRegression().loss(params, {"X": X, "y": y_counts})
    gamma = models.GammaRegression().loss(params, {"X": X, "y": y_positive})
    assert poisson.mean_loss() == pytest.approx(
        0.5 * mean_poisson_deviance(y_counts, mu), rel=1e-12
    )
    assert gamma.mean_loss() == pytest.approx(
        0.5 * mean_gamma_deviance(y_positive, mu), rel=1e-12
    )
    np.testing.assert_allclose(models.PoissonRegression().predict(params, X), mu)


def test_log_link_label_checks_name_the_row() -> None:
    assert models.PoissonRegression().check_labels(np.array([0.0, 3.0, 1.0])) is None
    row, message = models.PoissonRegression().check_labels(np.array([0.0, 2.0, -1.0]))
    assert row == 2 and "negative" in message and "PoissonRegression" in message
    row, message = models.PoissonRegression().check_labels(np.array([1, -4]))
    assert row == 1 and "-4" in message
    row, message = models.GammaRegression().check_labels(np.array([2.0, 0.0]))
    assert row == 1 and "not positive" in message
    row, message = models.GammaRegression().check_labels(np.array([2.0, np.inf]))
    assert row == 1 and "not finite" in message


def test_which_models_have_second_order_kernels() -> None:
    for make in MODELS.values():
        assert supports_second_order(make())
    assert not supports_second_order(models.MLP((4,), 1))
    with pytest.raises(TypeError, match="Newton supports"):
        second_order_terms(models.MLP((4,), 1), np.zeros(3), {"X": np.zeros((1, 2))})
    l2, l1 = penalty_vectors(models.SoftmaxRegression(2, l2=0.5, l1=0.25), 2)
    np.testing.assert_array_equal(l2, [0, 0, 0.5, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(l1, [0, 0, 0.25, 0.25, 0.25, 0.25])


# -- steps ---------------------------------------------------------------------------
def test_damped_solve_is_scale_free_and_never_divides_by_zero() -> None:
    rng = np.random.default_rng(6)
    scales = np.logspace(-6, 6, 8)
    B = rng.normal(size=(8, 8))
    base = B @ B.T + 8 * np.eye(8)
    Q = base * scales[:, None] * scales[None, :]
    x = rng.normal(size=8) / scales
    np.testing.assert_allclose(damped_solve(Q, Q @ x), x, rtol=1e-9)
    # Singular (a dead coordinate, a rank-one block): finite, and nothing
    # moves where there is no gradient.
    singular = np.zeros((3, 3))
    singular[:2, :2] = 1.0
    p = damped_solve(singular, np.array([1.0, 1.0, 0.0]))
    assert np.all(np.isfinite(p)) and p[2] == 0.0
    assert np.all(np.isfinite(damped_solve(np.zeros((2, 2)), np.ones(2))))
    # Slightly indefinite by rounding: still a descent direction.
    indefinite = np.diag([1.0, -1e-14])
    assert float(np.array([1.0, 1.0]) @ damped_solve(indefinite, np.ones(2))) > 0


def test_coordinate_descent_solves_the_l1_quadratic_exactly() -> None:
    rng = np.random.default_rng(7)
    B = rng.normal(size=(30, 6))
    Q = B.T @ B / 30
    c = rng.normal(size=6)
    l1 = np.full(6, 0.3)
    l1[0] = 0.0  # an unpenalized coordinate
    w = minimize_l1_quadratic(Q, c, l1, np.zeros(6))
    grad = Q @ w + c
    zero = w == 0
    assert 0 < zero.sum() < 5
    # KKT conditions: |grad| <= l1 at zeros, grad = -l1 sign(w) elsewhere.
    assert np.all(np.abs(grad[zero]) <= l1[zero] + 1e-12)
    np.testing.assert_allclose(grad[~zero], -l1[~zero] * np.sign(w[~zero]), atol=1e-10)


def test_newton_step_solves_the_model_and_predicts_its_decrease() -> None:
    rng = np.random.default_rng(8)
    B = rng.normal(size=(20, 4))
    H = B.T @ B / 20
    g, x = rng.normal(size=4), rng.normal(size=4)
    l2 = np.array([0.0, 0.5, 0.5, 0.5])
    p, decrease = newton_step(x, g, H, l2, np.zeros(4))
    Q = H + np.diag(l2)
    np.testing.assert_allclose(Q @ p, -g, atol=1e-12)
    assert decrease == pytest.approx(-(g @ p + 0.5 * p @ Q @ p))
    damped, damped_decrease = newton_step(x, g, H, l2, np.zeros(4), damping=10.0)
    assert np.linalg.norm(damped) < np.linalg.norm(p) and damped_decrease > 0


# -- the local solve of the one-pass start ------------------------------------------
def test_local_solve_reaches_the_piece_optimum_and_models_it() -> None:
    model, batch, _ = _problem("logistic", seed=9)
    big = {k: np.concatenate([v] * 8) for k, v in batch.items()}  # 1,920 rows
    n = big["y"].shape[0]
    l2, l1 = penalty_vectors(model, N_FEATURES)
    x0 = np.zeros(N_FEATURES + 1)
    used: list[int] = []

    def evaluate(x: np.ndarray, rows: int | None, g: bool) -> tuple[Any, ...]:
        part = (
            big if rows is None or rows >= n else {k: v[:rows] for k, v in big.items()}
        )
        t = second_order_terms(model, x, part, with_grad=g, with_hessian=g)
        used.append(t.n_rows)
        return t.loss_sum, t.grad if g else None, t.hessian, t.n_rows

    solve = local_newton_solve(evaluate, x0, l2, l1, iterations=6, first_rows=240)
    assert solve.iterations >= 3
    # Growing subsets (240, 480, 960 rows, then all), and the end on every row.
    assert used[1:4] == [240, 240, 480] and used[-1] == n
    # The last steps used every row: the piece's own objective is stationary.
    np.testing.assert_allclose(solve.grad / n + l2 * solve.point, 0, atol=1e-8)
    # Subsets never have fewer than 4 rows per coefficient.
    used.clear()
    local_newton_solve(evaluate, x0, l2, l1, iterations=1, first_rows=1)
    assert used[1] == LOCAL_MIN_ROWS_PER_COEF * x0.size
    assert solve.start_loss == second_order_terms(model, x0, big).loss_sum
    # The model reproduces value and gradient at the point it was taken.
    A, r, c0 = solve.model()
    w = solve.point
    assert 0.5 * w @ A @ w - r @ w + c0 == pytest.approx(solve.loss, rel=1e-12)
    np.testing.assert_allclose(A @ w - r, solve.grad, atol=1e-9)
    # With no iterations the model is the Newton model at the start.
    none = local_newton_solve(evaluate, x0, l2, l1, iterations=0, first_rows=30)
    np.testing.assert_array_equal(none.point, x0)
    np.testing.assert_array_equal(
        none.model()[0], second_order_terms(model, x0, big).hessian
    )


def test_small_pieces_skip_their_local_solve() -> None:
    model, batch, _ = _problem("logistic", seed=10)
    x0 = np.zeros(N_FEATURES + 1)
    start = second_order_terms(model, x0, batch).hessian
    few = {k: v[: LOCAL_MIN_ROWS_PER_COEF * x0.size - 1] for k, v in batch.items()}
    part = local_partial(model, x0, few, iterations=3, first_rows=64, hessian_rows=None)
    np.testing.assert_array_equal(
        part.grads["model_hessian"], second_order_terms(model, x0, few).hessian
    )
    enough = local_partial(
        model, x0, batch, iterations=3, first_rows=64, hessian_rows=None
    )
    assert not np.array_equal(enough.grads["model_hessian"], start)


# -- whole runs in RAM ----------------------------------------------------------------
def _chunked(
    model: models.Model, X: np.ndarray, y: np.ndarray, n_chunks: int
) -> tuple[Any, Any]:
    """``fun`` and ``local`` of minimize_newton over ``n_chunks`` pieces:
    what the trainer's passes compute, without a cluster."""
    bounds = np.linspace(0, len(y), n_chunks + 1).astype(int)
    pieces = [{"X": X[a:b], "y": y[a:b]} for a, b in itertools.pairwise(bounds)]
    n = len(y)

    def fun(x: np.ndarray, with_hessian: bool) -> tuple[float, np.ndarray, Any]:
        terms = [
            second_order_terms(model, x, p, with_hessian=with_hessian) for p in pieces
        ]
        H = sum(t.hessian for t in terms) / n if with_hessian else None  # type: ignore[misc]
        return sum(t.loss_sum for t in terms) / n, sum(t.grad for t in terms) / n, H

    def local(x: np.ndarray) -> LocalValue:
        parts = [
            local_partial(model, x, p, iterations=5, first_rows=64, hessian_rows=None)
            for p in pieces
        ]
        g = {k: sum(p.grads[k] for p in parts) / n for k in parts[0].grads}
        return LocalValue(
            sum(p.loss_sum for p in parts) / n,
            g["model_hessian"],
            g["model_linear"],
            sum(p.metrics["model_constant"] for p in parts) / n,
        )

    return fun, local


def _newton(
    model: models.Model,
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_chunks: int = 4,
    one_pass_start: bool = True,
    max_iter: int = 100,
) -> Any:
    fun, local = _chunked(model, X, y, n_chunks)
    l2, l1 = penalty_vectors(model, X.shape[1])
    k = model.n_classes if isinstance(model, models.SoftmaxRegression) else 1
    with threadpool_limits(limits=1):
        return minimize_newton(
            fun,
            np.zeros((X.shape[1] + 1) * k),
            optimizer=Newton(),
            max_iter=max_iter,
            l2=l2,
            l1=l1,
            local=local if one_pass_start else None,
        )


def _logistic_objective(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, l2: float, l1: float = 0.0
) -> float:
    z = X @ w + b
    return float(
        np.mean(np.logaddexp(0, z) - y * z) + 0.5 * l2 * w @ w + l1 * np.abs(w).sum()
    )


def _badly_scaled(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated features with scales spanning 1e-3 .. 1e3, logistic labels."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, d))
    latent[:, 1:] += 0.8 * latent[:, :-1]  # neighbours correlate
    w_true = rng.normal(size=d)
    y = (latent @ w_true + rng.logistic(size=n) > 0).astype(np.float64)
    return latent * np.logspace(-3, 3, d), y


@pytest.mark.parametrize("one_pass_start", [True, False], ids=["local", "plain"])
def test_badly_scaled_logistic_matches_sklearn_newton_cholesky(
    one_pass_start: bool,
) -> None:
    X, y = _badly_scaled(4_000, 8, seed=11)
    n = len(y)
    C = 10.0
    l2 = 1.0 / (C * n)
    est = linear_model.LogisticRegression(
        C=C, solver="newton-cholesky", tol=SKLEARN_TOL, max_iter=1000
    ).fit(X, y)
    oracle = _logistic_objective(X, y, est.coef_[0], est.intercept_[0], l2)
    res = _newton(models.LogisticRegression(l2=l2), X, y, one_pass_start=one_pass_start)
    ours = _logistic_objective(X, y, res.x[1:], res.x[0], l2)
    assert abs(ours - oracle) <= OBJECTIVE_RTOL * oracle
    assert res.status in (
        "gradient tolerance",
        "stalled",
        "predicted decrease below ftol",
    )
    assert res.n_passes <= 12


def test_one_pass_start_takes_two_passes_to_its_first_step() -> None:
    """The local pass, then one pass at the combined models' minimizer
    (without a Hessian: the models' own is used), which is accepted."""
    X, y = _badly_scaled(8_000, 6, seed=18)
    model = models.LogisticRegression(l2=1e-4)
    fun, local = _chunked(model, X, y, 4)
    l2, l1 = penalty_vectors(model, 6)
    opt = Newton()
    run = NewtonRun(opt, opt.init_state(7), np.zeros(7), l2, l1)
    first = run.request()
    assert first is not None and first.local
    assert run.observe(local(first.points[0])) is None
    trial = run.request()
    assert trial is not None and not trial.local and trial.hessian_index is None
    step = run.observe([PointValue(*fun(trial.points[0], False))])
    assert step is not None and step.passes == 2 and step.alpha == 1.0
    plain = minimize_newton(fun, np.zeros(7), optimizer=opt, max_iter=1, l2=l2, l1=l1)
    assert step.objective < plain.f  # better than one plain Newton step


def test_near_separable_data_without_penalty_stays_finite_and_decreases() -> None:
    """l2 = 0 on data that one feature almost separates: the optimum is far
    out and the Hessian nearly singular; every step must still decrease the
    objective and no floating-point warning may escape."""
    rng = np.random.default_rng(12)
    X = rng.normal(size=(2_000, 3))
    y = (X[:, 0] > 0).astype(np.float64)
    y[:3] = 1 - y[:3]  # three flipped labels: not quite separable
    model = models.LogisticRegression()
    fun, _ = _chunked(model, X, y, 4)
    opt = Newton(local_iterations=0)
    run = NewtonRun(opt, opt.init_state(4), np.zeros(4), 0.0, 0.0)
    objectives = []
    with np.errstate(all="raise"):
        for _ in range(60):
            request = run.request()
            if request is None:
                break
            values = [
                PointValue(*fun(p, request.hessian_index == i))
                for i, p in enumerate(request.points)
            ]
            if run.observe(values) is not None:
                objectives.append(run.f)
    assert run.done and len(objectives) >= 5
    assert all(b < a for a, b in itertools.pairwise(objectives))
    est = linear_model.LogisticRegression(
        C=np.inf, tol=SKLEARN_TOL, max_iter=100_000
    ).fit(X, y)
    oracle = _logistic_objective(X, y, est.coef_[0], est.intercept_[0], 0.0)
    assert np.all(np.isfinite(run.x)) and abs(run.x[1]) > 10  # far out
    assert objectives[-1] == pytest.approx(oracle, rel=1e-6)


def test_l1_logistic_zero_pattern_matches_sklearn() -> None:
    X, y = _badly_scaled(3_000, 10, seed=13)
    X = (X - X.mean(0)) / X.std(0)
    l1 = 0.02
    est = linear_model.LogisticRegression(
        l1_ratio=1.0,
        C=1.0 / (l1 * len(y)),
        solver="saga",
        tol=SKLEARN_TOL,
        max_iter=100_000,
    ).fit(X, y)
    coef = est.coef_.ravel()
    oracle = _logistic_objective(X, y, coef, est.intercept_[0], 0.0, l1)
    res = _newton(models.LogisticRegression(l1=l1), X, y)
    ours = _logistic_objective(X, y, res.x[1:], res.x[0], 0.0, l1)
    assert abs(ours - oracle) <= 1e-7 * oracle
    assert 0 < int((coef == 0).sum()) < coef.size
    np.testing.assert_array_equal(res.x[1:] == 0, coef == 0)


def test_elastic_net_poisson_matches_glum() -> None:
    glum = pytest.importorskip("glum")
    rng = np.random.default_rng(14)
    X = rng.normal(size=(3_000, 6)) * np.logspace(-1, 1, 6)
    y = rng.poisson(
        np.exp(0.5 + X @ (np.array([0.3, 0, -0.2, 0, 0.05, 0]) / np.logspace(-1, 1, 6)))
    )
    alpha, l1_ratio = 0.05, 0.5
    est = glum.GeneralizedLinearRegressor(
        family="poisson", alpha=alpha, l1_ratio=l1_ratio, gradient_tol=1e-12
    ).fit(X, y)
    model = models.PoissonRegression(l2=alpha * (1 - l1_ratio), l1=alpha * l1_ratio)

    def objective(w: np.ndarray, b: float) -> float:
        loss = model.loss({"w": w, "b": np.asarray(b)}, {"X": X, "y": y}).mean_loss()
        return loss + model.penalty({"w": w, "b": np.asarray(b)})

    oracle = objective(est.coef_, float(est.intercept_))
    res = _newton(model, X, y.astype(np.float64))
    assert objective(res.x[1:], res.x[0]) <= oracle * (1 + 1e-8)
    np.testing.assert_array_equal(res.x[1:] == 0, est.coef_ == 0)


@pytest.mark.parametrize(
    ("cls", "oracle_cls"),
    [
        (models.PoissonRegression, linear_model.PoissonRegressor),
        (models.GammaRegression, linear_model.GammaRegressor),
    ],
)
def test_log_link_glms_match_sklearn(cls: Any, oracle_cls: Any) -> None:
    rng = np.random.default_rng(15)
    X = rng.normal(size=(2_000, 4))
    mu = np.exp(3.0 + X @ np.array([0.4, -0.3, 0.2, 0.0]))  # far from exp(0)
    y = rng.poisson(mu).astype(np.float64) + (
        0.5 if cls is models.GammaRegression else 0
    )
    alpha = 0.01
    est = oracle_cls(alpha=alpha, solver="newton-cholesky", tol=SKLEARN_TOL).fit(X, y)
    model = cls(l2=alpha)

    def objective(w: np.ndarray, b: float) -> float:
        p = {"w": w, "b": np.asarray(b)}
        return model.loss(p, {"X": X, "y": y}).mean_loss() + model.penalty(p)

    oracle = objective(est.coef_, float(est.intercept_))
    for one_pass_start in (True, False):
        res = _newton(model, X, y, one_pass_start=one_pass_start)
        assert abs(objective(res.x[1:], res.x[0]) - oracle) <= OBJECTIVE_RTOL * oracle


def test_softmax_with_a_singular_intercept_block_converges() -> None:
    """Softmax intercepts are defined up to a constant (a null direction of
    the Hessian): the damped solve must still converge to the optimum."""
    rng = np.random.default_rng(16)
    X = rng.normal(size=(1_500, 4))
    y = np.argmax(X[:, :3] + rng.gumbel(size=(1_500, 3)), axis=1)
    C = 1.0
    est = linear_model.LogisticRegression(C=C, tol=SKLEARN_TOL, max_iter=10_000).fit(
        X, y
    )
    l2 = 1.0 / (C * len(y))
    model = models.SoftmaxRegression(3, l2=l2)

    def objective(x: np.ndarray) -> float:
        p = terms_to_params(x, {"b": np.zeros(3), "w": np.zeros((4, 3))})
        return model.loss(p, {"X": X, "y": y}).mean_loss() + model.penalty(p)

    oracle = objective(np.concatenate([est.intercept_, est.coef_.T.ravel()]))
    res = _newton(model, X, y)
    assert abs(objective(res.x) - oracle) <= OBJECTIVE_RTOL * oracle


def test_a_resumed_run_continues_with_the_same_bits() -> None:
    """NewtonRun rebuilt from a committed state (as after a resume) takes the
    same steps as the run that was not interrupted."""
    X, y = _badly_scaled(2_000, 6, seed=17)
    X[:, 0] = np.where(y > 0, 1.0, -1.0) + 0.3 * X[:, 0]  # nearly separating
    model = models.LogisticRegression(l2=1e-7)  # many iterations
    fun, local = _chunked(model, X, y, 3)
    l2, l1 = penalty_vectors(model, 6)
    opt = Newton()

    def drive(run: NewtonRun, n_steps: int) -> list[np.ndarray]:
        points = []
        while len(points) < n_steps:
            request = run.request()
            assert request is not None
            if request.local:
                run.observe(local(request.points[0]))
                continue
            values = [
                PointValue(*fun(p, request.hessian_index == i))
                for i, p in enumerate(request.points)
            ]
            if run.observe(values) is not None:
                points.append(run.x.copy())
        return points

    straight = drive(NewtonRun(opt, opt.init_state(7), np.zeros(7), l2, l1), 5)
    first = NewtonRun(opt, opt.init_state(7), np.zeros(7), l2, l1)
    drive(first, 2)
    state = {k: np.array(v) for k, v in first.state().items()}
    resumed = drive(NewtonRun(opt, state, first.x.copy(), l2, l1), 3)
    for a, b in zip(straight[2:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_newton_configuration() -> None:
    opt = Newton(local_iterations=0, hessian_rows=None)
    assert dt.optim.optimizer_from_config(opt.config()) == opt
    assert Newton.full_batch_only
    with pytest.raises(ValueError, match="local_iterations"):
        Newton(local_iterations=-1)
    with pytest.raises(ValueError, match="keep_hessian_below"):
        Newton(keep_hessian_below=1.0)
    with pytest.raises(ValueError, match="use LBFGS"):
        Newton().init_state(MAX_HESSIAN_PARAMS + 1)
    with pytest.raises(TypeError, match="full-batch"):
        Newton().update({}, {}, {})
