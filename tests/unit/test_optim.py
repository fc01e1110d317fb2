"""Optimizers, schedules and L-BFGS (pure NumPy, no cluster).

One table of step-by-step optimizers runs through the same tests; L-BFGS is
checked against scipy's L-BFGS-B.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pytest

from dasktrain._tree import flatten, global_norm
from dasktrain.optim import (
    LBFGS,
    SGD,
    Adagrad,
    Adam,
    AdamW,
    Constant,
    CosineDecay,
    ExponentialDecay,
    IterationInfo,
    Optimizer,
    StepDecay,
    WarmupCosine,
    WolfeLineSearch,
    apply_updates,
    chain,
    minimize_lbfgs,
    optimizer_from_config,
    scale_by_learning_rate,
    schedule_from_config,
    trace,
    two_loop_direction,
)

Params = dict[str, np.ndarray]
Objective = Callable[[Mapping[str, np.ndarray]], tuple[float, Params]]


# -- problems ----------------------------------------------------------------
def _least_squares_problem() -> tuple[Objective, float]:
    """Mean squared error of a linear map: params ``w`` (3, 2) and ``b`` (2,)."""
    rng = np.random.default_rng(0)
    n_rows = 40
    x = rng.standard_normal((n_rows, 3))
    y = x @ rng.standard_normal((3, 2)) + rng.standard_normal(2)
    y += 0.1 * rng.standard_normal(y.shape)

    def objective(params: Mapping[str, np.ndarray]) -> tuple[float, Params]:
        residual = x @ params["w"] + params["b"] - y
        loss = 0.5 * float(np.mean(np.sum(residual**2, axis=1)))
        return loss, {"w": x.T @ residual / n_rows, "b": residual.mean(axis=0)}

    design = np.hstack([x, np.ones((n_rows, 1))])
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    f_star, _ = objective({"w": solution[:3], "b": solution[3]})
    return objective, f_star


def _rosenbrock_value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
    f = (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2
    grad = np.array(
        [
            -2.0 * (1.0 - x[0]) - 400.0 * x[0] * (x[1] - x[0] ** 2),
            200.0 * (x[1] - x[0] ** 2),
        ]
    )
    return float(f), grad


def _rosenbrock(params: Mapping[str, np.ndarray]) -> tuple[float, Params]:
    f, grad = _rosenbrock_value_and_grad(params["x"])
    return f, {"x": grad}


def _run(opt: Optimizer, objective: Objective, params: Params, n_steps: int) -> Params:
    state = opt.init(params)
    for _ in range(n_steps):
        _, grads = objective(params)
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)
    return params


# -- the table ---------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """An optimizer family, with learning rates tuned per problem."""

    name: str
    make: Callable[..., Optimizer]  # make(learning_rate, **options)
    quadratic_lr: float
    rosenbrock_lr: float
    rosenbrock_steps: int


CASES = [
    Case("sgd", SGD, 0.5, 1.2e-3, 20_000),
    Case("sgd-momentum", partial(SGD, momentum=0.9), 0.1, 1e-3, 10_000),
    Case("sgd-nesterov", partial(SGD, momentum=0.9, nesterov=True), 0.1, 1e-3, 10_000),
    Case("adam", Adam, 0.05, 3e-3, 10_000),
    # weight decay moves the fixed point; a small one keeps it within tolerance
    Case("adamw", partial(AdamW, weight_decay=1e-4), 0.05, 3e-3, 10_000),
    Case("adagrad", Adagrad, 0.5, 0.5, 15_000),
]
table = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])

QUADRATIC_STEPS = 1_000


def _matrix_and_vector(dtype: type = np.float64) -> Params:
    rng = np.random.default_rng(1)
    return {
        "w": rng.standard_normal((3, 2)).astype(dtype),
        "b": rng.standard_normal(2).astype(dtype),
    }


@table
def test_converges_on_quadratic(case: Case) -> None:
    objective, f_star = _least_squares_problem()
    opt = case.make(case.quadratic_lr)
    params = _run(
        opt, objective, {"w": np.zeros((3, 2)), "b": np.zeros(2)}, QUADRATIC_STEPS
    )
    gap = objective(params)[0] - f_star
    assert gap < 1e-6, f"{opt}: objective gap {gap:.3g} after {QUADRATIC_STEPS} steps"


@table
def test_converges_on_rosenbrock(case: Case) -> None:
    opt = case.make(case.rosenbrock_lr)
    params = _run(opt, _rosenbrock, {"x": np.array([-1.2, 1.0])}, case.rosenbrock_steps)
    error = float(np.max(np.abs(params["x"] - 1.0)))
    assert error < 1e-3, f"{opt}: |x - (1, 1)| = {error:.3g}"


@table
def test_state_keys_and_shapes_follow_params(case: Case) -> None:
    opt = case.make(0.1)
    params = _matrix_and_vector()
    state = opt.init(params)
    assert state, "every optimizer keeps at least a step count"
    for key, value in state.items():
        assert "/" not in key
        assert isinstance(value, np.ndarray)
        name = next((n for n in params if key.endswith("." + n)), None)
        if name is None:
            assert key.endswith("count"), key
            assert value.shape == ()
            assert value.dtype == np.int64
        else:
            assert value.shape == params[name].shape, key
            assert value.dtype == np.float64, key
    grads = {k: np.ones_like(v) for k, v in params.items()}
    updates, new_state = opt.update(grads, state, params)
    assert set(updates) == set(params)
    assert set(new_state) == set(state)
    for key, value in new_state.items():
        assert value.shape == state[key].shape, key
        assert value.dtype == state[key].dtype, key


@table
def test_config_round_trip(case: Case) -> None:
    for rate in (0.1, WarmupCosine(0.1, warmup_steps=5, decay_steps=50)):
        opt = case.make(rate, clip_norm=2.0)
        config = json.loads(json.dumps(opt.config()))
        rebuilt = optimizer_from_config(config)
        assert rebuilt == opt
        assert type(rebuilt) is type(opt)
        assert hash(rebuilt) == hash(opt)
        assert rebuilt.learning_rate_at(3) == opt.learning_rate_at(3)
    assert case.make(0.1) != case.make(0.2)


@table
def test_pickle_round_trip_after_use(case: Case) -> None:
    opt = case.make(0.1)
    params = _matrix_and_vector()
    grads = {k: np.ones_like(v) for k, v in params.items()}
    expected, _ = opt.update(grads, opt.init(params), params)
    rebuilt = pickle.loads(pickle.dumps(opt))
    assert rebuilt == opt
    updates, _ = rebuilt.update(grads, rebuilt.init(params), params)
    for key in params:
        np.testing.assert_array_equal(updates[key], expected[key])


@table
def test_update_does_not_mutate_inputs(case: Case) -> None:
    opt = case.make(0.1, clip_norm=1.0)
    params = _matrix_and_vector()
    state = opt.init(params)
    grads = {k: 10.0 * np.ones_like(v) for k, v in params.items()}
    _, state = opt.update(grads, state, params)  # non-zero state
    before = [{k: v.copy() for k, v in tree.items()} for tree in (grads, state, params)]
    updates, new_state = opt.update(grads, state, params)
    for tree, copy in zip((grads, state, params), before, strict=True):
        assert set(tree) == set(copy)
        for key in tree:
            np.testing.assert_array_equal(tree[key], copy[key])
    inputs = [*grads.values(), *state.values(), *params.values()]
    for out in [*updates.values(), *new_state.values()]:
        assert not any(np.shares_memory(out, x) for x in inputs)


@table
def test_outputs_are_float64(case: Case) -> None:
    opt = case.make(0.1)
    params = _matrix_and_vector(np.float32)
    grads = {k: np.ones_like(v) for k, v in params.items()}
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    for value in updates.values():
        assert value.dtype == np.float64
    for key, value in state.items():
        assert value.dtype == (np.int64 if key.endswith("count") else np.float64)
    for value in apply_updates(params, updates).values():
        assert value.dtype == np.float64


@table
def test_clipping_bounds_the_gradient(case: Case) -> None:
    clip_norm = 0.5
    params = _matrix_and_vector()
    big = {k: 100.0 * np.ones_like(v) for k, v in params.items()}
    small = {k: 1e-3 * np.ones_like(v) for k, v in params.items()}
    clipped = case.make(0.1, clip_norm=clip_norm)
    plain = case.make(0.1)
    scale = clip_norm / global_norm(big)
    rescaled = {k: v * scale for k, v in big.items()}
    u_clipped, _ = clipped.update(big, clipped.init(params), params)
    u_plain, _ = plain.update(rescaled, plain.init(params), params)
    for key in params:
        np.testing.assert_allclose(u_clipped[key], u_plain[key], rtol=1e-12)
    u_clipped, _ = clipped.update(small, clipped.init(params), params)
    u_plain, _ = plain.update(small, plain.init(params), params)
    for key in params:
        np.testing.assert_allclose(u_clipped[key], u_plain[key], rtol=1e-12)


def test_clipping_bounds_the_sgd_update_norm() -> None:
    rate, clip_norm = 0.1, 0.5
    params = _matrix_and_vector()
    for opt in (SGD(rate, clip_norm=clip_norm), SGD(rate, momentum=0.9, clip_norm=1)):
        state = opt.init(params)
        for factor in (1e-3, 1.0, 1e6):
            grads = {k: factor * np.ones_like(v) for k, v in params.items()}
            updates, _ = opt.update(grads, state, params)
            bound = rate * opt.clip_norm  # type: ignore[attr-defined]
            assert global_norm(updates) <= bound * (1 + 1e-12)


def test_adam_first_steps_match_hand_computation() -> None:
    opt = Adam(0.1, b1=0.9, b2=0.999, eps=1e-8)
    params = {"w": np.array([0.0])}
    state = opt.init(params)
    updates, state = opt.update({"w": np.array([0.5])}, state, params)
    # m1 = 0.1 * 0.5, v1 = 0.001 * 0.25; bias-corrected 0.5 and 0.25
    np.testing.assert_allclose(updates["w"], [-0.1 * 0.5 / (0.5 + 1e-8)], rtol=1e-15)
    np.testing.assert_allclose(updates["w"], [-0.099999998], rtol=1e-12)
    params = apply_updates(params, updates)
    updates, state = opt.update({"w": np.array([-1.0])}, state, params)
    m2 = 0.9 * 0.05 + 0.1 * -1.0  # -0.055
    v2 = 0.999 * 0.00025 + 0.001 * 1.0  # 0.00124975
    m2_hat = m2 / (1 - 0.9**2)
    v2_hat = v2 / (1 - 0.999**2)
    np.testing.assert_allclose(
        updates["w"], [-0.1 * m2_hat / (math.sqrt(v2_hat) + 1e-8)], rtol=1e-14
    )
    np.testing.assert_allclose(updates["w"], [0.0366103522405654], rtol=1e-12)
    assert int(state["0.count"]) == 2
    np.testing.assert_allclose(state["0.mu.w"], [m2], rtol=1e-15)
    np.testing.assert_allclose(state["0.nu.w"], [v2], rtol=1e-15)


def test_adamw_does_not_decay_names_starting_with_b() -> None:
    rate, weight_decay = 0.1, 0.5
    opt = AdamW(rate, weight_decay=weight_decay)
    params = {
        "w": np.full((2, 2), 2.0),
        "embedding": np.full(3, -1.0),
        "b": np.full(2, 3.0),
        "b_out": np.full(1, 3.0),
        "bias": np.full(1, 3.0),
    }
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    updates, _ = opt.update(zero, opt.init(params), params)
    for name in ("w", "embedding"):
        np.testing.assert_allclose(updates[name], -rate * weight_decay * params[name])
    for name in ("b", "b_out", "bias"):
        np.testing.assert_array_equal(updates[name], 0.0)


def test_momentum_and_nesterov_hand_computation() -> None:
    params = {"w": np.zeros(1)}
    grads = {"w": np.ones(1)}
    for nesterov, expected in ((False, [-0.1, -0.19]), (True, [-0.19, -0.271])):
        opt = SGD(0.1, momentum=0.9, nesterov=nesterov)
        state = opt.init(params)
        for value in expected:
            updates, state = opt.update(grads, state, params)
            np.testing.assert_allclose(updates["w"], [value], rtol=1e-14)


def test_chain_prefixes_state_keys() -> None:
    transform = chain(trace(0.5), scale_by_learning_rate(0.1))
    state = transform.init({"w": np.zeros(2)})
    assert sorted(state) == ["0.trace.w", "1.count"]


def test_learning_rate_schedule_drives_updates() -> None:
    opt = SGD(StepDecay(1.0, boundaries=(1, 2), factor=0.1))
    params = {"w": np.zeros(1)}
    state = opt.init(params)
    for step, expected in enumerate((-1.0, -0.1, -0.01)):
        assert opt.learning_rate_at(step) == pytest.approx(-expected)
        updates, state = opt.update({"w": np.ones(1)}, state, params)
        np.testing.assert_allclose(updates["w"], [expected], rtol=1e-14)


def test_update_rejects_mismatched_grads() -> None:
    opt = Adam(0.1)
    params = _matrix_and_vector()
    state = opt.init(params)
    with pytest.raises(ValueError, match="missing"):
        opt.update({"w": params["w"]}, state, params)
    with pytest.raises(ValueError, match="shape"):
        opt.update({"w": params["w"], "b": np.zeros(3)}, state, params)
    with pytest.raises(ValueError, match="'/'"):
        opt.init({"layer/w": np.zeros(1)})


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: SGD(-0.1), "learning_rate"),
        (lambda: SGD(float("nan")), "learning_rate"),
        (lambda: SGD(float("inf")), "learning_rate"),
        (lambda: SGD(0.1, momentum=1.0), "momentum"),
        (lambda: SGD(0.1, momentum=-0.1), "momentum"),
        (lambda: SGD(0.1, nesterov=True), "nesterov"),
        (lambda: SGD(0.1, clip_norm=0.0), "clip_norm"),
        (lambda: SGD(0.1, clip_norm=-1.0), "clip_norm"),
        (lambda: Adam(0.1, b1=1.0), "b1"),
        (lambda: Adam(0.1, b2=-0.5), "b2"),
        (lambda: Adam(0.1, eps=0.0), "eps"),
        (lambda: AdamW(0.1, weight_decay=-1.0), "weight_decay"),
        (lambda: Adagrad(0.1, initial_accumulator=-1.0), "initial_accumulator"),
        (lambda: Adagrad(0.1, eps=float("nan")), "eps"),
        (lambda: LBFGS(history=0), "history"),
        (lambda: LBFGS(tol=-1.0), "tol"),
        (lambda: LBFGS(max_line_search=0), "max_line_search"),
        (lambda: LBFGS(c1=0.0), "c1"),
        (lambda: LBFGS(c1=0.5, c2=0.4), "c2"),
        (lambda: ExponentialDecay(0.1, decay_rate=0.0, decay_steps=1), "decay_rate"),
        (lambda: CosineDecay(0.1, decay_steps=0), "decay_steps"),
        (lambda: CosineDecay(0.1, decay_steps=10, alpha=2.0), "alpha"),
        (lambda: WarmupCosine(0.1, warmup_steps=10, decay_steps=5), "decay_steps"),
        (lambda: StepDecay(0.1, boundaries=(5, 5), factor=0.5), "boundaries"),
        (lambda: StepDecay(0.1, boundaries=(5,), factor=0.0), "factor"),
    ],
)
def test_invalid_arguments_name_the_argument(
    make: Callable[[], Any], argument: str
) -> None:
    with pytest.raises(ValueError, match=argument):
        make()


# -- schedules ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (Constant(0.3), {0: 0.3, 10: 0.3, 10**6: 0.3}),
        (
            ExponentialDecay(1.0, decay_rate=0.5, decay_steps=10),
            {0: 1.0, 5: 0.5**0.5, 10: 0.5, 30: 0.125},
        ),
        (
            ExponentialDecay(2.0, decay_rate=0.5, decay_steps=10, staircase=True),
            {0: 2.0, 9: 2.0, 10: 1.0, 29: 0.5, 30: 0.25},
        ),
        (
            CosineDecay(1.0, decay_steps=100, alpha=0.1),
            {0: 1.0, 50: 0.55, 100: 0.1, 1000: 0.1},
        ),
        (
            CosineDecay(2.0, decay_steps=4),
            {1: 2.0 * 0.5 * (1 + math.cos(math.pi / 4)), 4: 0.0},
        ),
        (
            WarmupCosine(1.0, warmup_steps=10, decay_steps=110, end_value=0.2),
            {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.6, 110: 0.2, 500: 0.2},
        ),
        (
            WarmupCosine(1.0, warmup_steps=0, decay_steps=10),
            {0: 1.0, 5: 0.5, 10: 0.0},
        ),
        (
            StepDecay(1.0, boundaries=(10, 20), factor=0.5),
            {0: 1.0, 9: 1.0, 10: 0.5, 19: 0.5, 20: 0.25, 1000: 0.25},
        ),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, dict) else "",
)
def test_schedule_values(schedule: Any, expected: dict[int, float]) -> None:
    for step, value in expected.items():
        assert schedule(step) == pytest.approx(value, rel=1e-12, abs=1e-15), step
    rebuilt = schedule_from_config(json.loads(json.dumps(schedule.config())))
    assert rebuilt == schedule
    assert [rebuilt(s) for s in expected] == [schedule(s) for s in expected]


def test_schedule_rejects_bad_steps_and_types() -> None:
    with pytest.raises(ValueError, match="step"):
        Constant(0.1)(-1)
    with pytest.raises(TypeError, match="step"):
        Constant(0.1)(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_from_config({"type": "Nope"})


# -- L-BFGS ------------------------------------------------------------------
def _lbfgs_direction_by_matrix(
    grad: np.ndarray, s_hist: np.ndarray, y_hist: np.ndarray
) -> np.ndarray:
    """Oracle: form the L-BFGS inverse Hessian explicitly, then ``-H g``."""
    n = grad.size
    s_new, y_new = s_hist[-1], y_hist[-1]
    h = (s_new @ y_new) / (y_new @ y_new) * np.eye(n)
    for s, y in zip(s_hist, y_hist, strict=True):
        rho = 1.0 / (y @ s)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return -h @ grad


def test_two_loop_matches_explicit_inverse_hessian() -> None:
    rng = np.random.default_rng(3)
    n = 6
    a = rng.standard_normal((n, n))
    hessian = a @ a.T + n * np.eye(n)
    s_hist = rng.standard_normal((4, n))
    y_hist = s_hist @ hessian
    grad = rng.standard_normal(n)
    np.testing.assert_allclose(
        two_loop_direction(grad, s_hist, y_hist),
        _lbfgs_direction_by_matrix(grad, s_hist, y_hist),
        rtol=1e-10,
    )


def test_two_loop_without_history_is_scaled_steepest_descent() -> None:
    empty = np.zeros((0, 2))
    np.testing.assert_allclose(
        two_loop_direction(np.array([3.0, 4.0]), empty, empty), [-0.6, -0.8]
    )
    np.testing.assert_allclose(
        two_loop_direction(np.array([0.3, 0.4]), empty, empty), [-0.3, -0.4]
    )


def test_lbfgs_state_and_push() -> None:
    opt = LBFGS(history=2)
    state = opt.init(_matrix_and_vector())
    assert state["s"].shape == state["y"].shape == (2, 8)
    assert state["n_hist"].shape == () and state["n_hist"].dtype == np.int64
    assert state["count"].shape == () and state["count"].dtype == np.int64
    pairs = [(np.full(8, float(i)), np.full(8, 2.0 * i)) for i in (1, 2, 3)]
    for s, y in pairs:
        before = {k: v.copy() for k, v in state.items()}
        new_state = opt.push(state, s, y)
        for key in state:
            np.testing.assert_array_equal(state[key], before[key])
        state = new_state
    assert int(state["n_hist"]) == 2 and int(state["count"]) == 3
    np.testing.assert_array_equal(state["s"][:, 0], [2.0, 3.0])  # oldest first
    skipped = opt.push(state, np.ones(8), -np.ones(8))  # s.y < 0: not stored
    assert int(skipped["n_hist"]) == 2 and int(skipped["count"]) == 4
    np.testing.assert_array_equal(skipped["s"], state["s"])
    assert int(opt.reset(state)["n_hist"]) == 0


def test_lbfgs_is_full_batch_only() -> None:
    opt = LBFGS(history=5, tol=1e-8)
    assert opt.full_batch_only
    assert optimizer_from_config(json.loads(json.dumps(opt.config()))) == opt
    params = _matrix_and_vector()
    with pytest.raises(TypeError, match="full-batch"):
        opt.update(params, opt.init(params), params)


def _logistic_objective() -> tuple[
    Callable[[np.ndarray], tuple[float, np.ndarray]], int
]:
    """L2-regularized logistic regression on standardized breast_cancer data.

    ``l2 = 1 / n_rows`` (scikit-learn's ``C = 1``); the bias is not penalized.
    """
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    n_rows, n_features = x.shape
    l2 = 1.0 / n_rows

    def fun_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:n_features], theta[n_features]
        z = x @ w + b
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * (w @ w))
        prob = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid, without overflow
        residual = (prob - y) / n_rows
        grad = np.concatenate([x.T @ residual + l2 * w, [residual.sum()]])
        return loss, grad

    return fun_and_grad, n_features + 1


@pytest.mark.parametrize("problem", ["rosenbrock", "logistic"])
def test_minimize_lbfgs_matches_scipy(problem: str) -> None:
    from scipy.optimize import minimize

    if problem == "rosenbrock":
        fun_and_grad = _rosenbrock_value_and_grad
        x0 = np.array([-1.2, 1.0])
    else:
        fun_and_grad, n_params = _logistic_objective()
        x0 = np.zeros(n_params)
    reference = minimize(fun_and_grad, x0, jac=True, method="L-BFGS-B")
    assert reference.success
    result = minimize_lbfgs(fun_and_grad, x0, optimizer=LBFGS(), max_iter=500)
    x, f, n_evals, n_iter = result
    report = (
        f"{problem}: dasktrain f={f!r} in {n_evals} evaluations / {n_iter} "
        f"iterations; scipy L-BFGS-B f={reference.fun!r} in {reference.nfev} "
        f"evaluations / {reference.nit} iterations"
    )
    assert f - reference.fun <= 1e-8 * max(1.0, abs(reference.fun)), report
    assert n_evals <= 1.5 * reference.nfev + 5, report
    assert np.allclose(fun_and_grad(x)[0], f), report
    if problem == "rosenbrock":
        np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-5)


def test_minimize_lbfgs_callback_and_resume() -> None:
    opt = LBFGS()
    x0 = np.array([-1.2, 1.0])
    seen: list[IterationInfo] = []

    def stop_after_five(info: IterationInfo) -> bool:
        seen.append(info)
        return info.n_iter >= 5

    first = minimize_lbfgs(
        _rosenbrock_value_and_grad,
        x0,
        optimizer=opt,
        max_iter=100,
        callback=stop_after_five,
    )
    assert first.n_iter == 5 and len(seen) == 5
    assert seen[-1].f == first.f
    assert int(seen[-1].state["count"]) == 5
    resumed = minimize_lbfgs(
        _rosenbrock_value_and_grad,
        first.x,
        optimizer=opt,
        max_iter=100,
        state=seen[-1].state,
    )
    np.testing.assert_allclose(resumed.x, [1.0, 1.0], atol=1e-5)


def test_minimize_lbfgs_starting_at_the_optimum() -> None:
    result = minimize_lbfgs(
        _rosenbrock_value_and_grad, np.ones(2), optimizer=LBFGS(), max_iter=10
    )
    assert (result.n_evals, result.n_iter) == (1, 0)


def test_lbfgs_works_on_flattened_params() -> None:
    objective, f_star = _least_squares_problem()
    like = {"w": np.zeros((3, 2)), "b": np.zeros(2)}
    from dasktrain._tree import unflatten

    def fun_and_grad(vector: np.ndarray) -> tuple[float, np.ndarray]:
        f, grads = objective(unflatten(vector, like))
        return f, flatten(grads)

    opt = LBFGS(tol=1e-10)
    assert opt.init(like)["s"].shape == (opt.history, 8)
    result = minimize_lbfgs(fun_and_grad, flatten(like), optimizer=opt, max_iter=100)
    assert result.f - f_star < 1e-12


# -- the line search ---------------------------------------------------------
def _mt1(alpha: float) -> tuple[float, float]:
    """Moré-Thuente test function 1: -a / (a^2 + 2)."""
    return -alpha / (alpha**2 + 2.0), (alpha**2 - 2.0) / (alpha**2 + 2.0) ** 2


def _mt2(alpha: float) -> tuple[float, float]:
    """Moré-Thuente test function 2: (a + 0.004)^5 - 2 (a + 0.004)^4."""
    t = alpha + 0.004
    return t**5 - 2.0 * t**4, 5.0 * t**4 - 8.0 * t**3


def _quadratic(alpha: float) -> tuple[float, float]:
    return (alpha - 3.0) ** 2, 2.0 * (alpha - 3.0)


def _undefined_beyond_one(alpha: float) -> tuple[float, float]:
    """A function that is NaN for steps >= 1 (for example a log of a negative)."""
    if alpha >= 1.0:
        return math.nan, math.nan
    return (alpha - 0.3) ** 2, 2.0 * (alpha - 0.3)


def _run_line_search(
    phi: Callable[[float], tuple[float, float]], alpha0: float, c1: float, c2: float
) -> WolfeLineSearch:
    f0, d0 = phi(0.0)
    ls = WolfeLineSearch(f0, d0, alpha0, c1=c1, c2=c2, max_steps=30)
    while not ls.done:
        alpha = ls.next_alpha()
        ls.observe(alpha, *phi(alpha))
    return ls


@pytest.mark.parametrize("phi", [_mt1, _mt2, _quadratic, _undefined_beyond_one])
@pytest.mark.parametrize("alpha0", [1e-3, 0.1, 1.0, 10.0, 1e3])
@pytest.mark.parametrize(("c1", "c2"), [(1e-4, 0.9), (1e-3, 0.1)])
def test_line_search_satisfies_strong_wolfe(
    phi: Callable[[float], tuple[float, float]], alpha0: float, c1: float, c2: float
) -> None:
    ls = _run_line_search(phi, alpha0, c1, c2)
    result = ls.result
    f0, d0 = phi(0.0)
    assert result.status == "wolfe", result
    assert result.accepted
    f, d = phi(result.alpha)
    assert (f, d) == (result.f, result.gdotp)
    assert result.alpha > 0
    assert f <= f0 + c1 * result.alpha * d0, result
    assert abs(d) <= c2 * abs(d0), result
    assert result.trial_index == result.n_evals - 1
    assert result.n_evals <= 15, result


def test_line_search_reports_failure_without_decrease() -> None:
    ls = WolfeLineSearch(0.0, -1.0, 1.0, c1=1e-4, c2=0.9, max_steps=5)
    while not ls.done:
        alpha = ls.next_alpha()
        ls.observe(alpha, 1.0, 1.0)  # the slope lied: every trial is worse
    assert ls.result.status == "failed" and not ls.result.accepted
    assert ls.result.n_evals == 5 and ls.result.trial_index == -1


def test_line_search_protocol_errors() -> None:
    with pytest.raises(ValueError, match="descent"):
        WolfeLineSearch(0.0, 1.0)
    ls = WolfeLineSearch(0.0, -1.0, 1.0)
    with pytest.raises(RuntimeError, match="not done"):
        _ = ls.result
    with pytest.raises(ValueError, match="pending"):
        ls.observe(2.0, 0.0, 0.0)
    ls.observe(ls.next_alpha(), -0.5, 0.0)
    assert ls.done
    with pytest.raises(RuntimeError, match="done"):
        ls.next_alpha()


def test_lbfgs_stops_at_the_float32_precision_limit() -> None:
    """On float32 arithmetic the objective stops changing long before the
    gradient test passes; the driver must stop instead of spending its budget
    on steps that change nothing."""
    from dasktrain.optim import LBFGS, minimize_lbfgs

    A = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        r = A @ x.astype(np.float32) - np.float32(1)
        return float(0.5 * np.mean(r * r)), (A.T @ r / np.float32(200)).astype(
            np.float64
        )

    res = minimize_lbfgs(fun, np.zeros(5), optimizer=LBFGS(tol=1e-12), max_iter=40)
    assert res.n_iter < 10, res
    assert res.n_evals < 60, res


def test_line_search_never_accepts_a_step_without_decrease() -> None:
    from dasktrain.optim.lbfgs import WolfeLineSearch

    ls = WolfeLineSearch(1.0, -1e-20, 1.0, c1=1e-4, c2=0.9, max_steps=3)
    while not ls.done:
        alpha = ls.next_alpha()
        ls.observe(alpha, 1.0, -1e-20)  # flat: f == f0 at every step
    assert not ls.result.accepted


@table
def test_advance_counts_moves_only_the_step_counters(case: Case) -> None:
    from dasktrain.optim import advance_counts, is_count

    opt = case.make(case.quadratic_lr)
    params = {"w": np.array([1.0, -2.0]), "b": np.array(0.5)}
    state = opt.init(params)
    for _ in range(3):
        _, state = opt.update(params, state, params)
    moved = advance_counts(state, 4)
    assert moved.keys() == state.keys()
    for k, v in state.items():
        if is_count(v):
            assert moved[k].dtype == np.int64 and int(moved[k]) == int(v) + 4, k
        else:
            assert moved[k] is v, k
    assert any(is_count(v) for v in state.values())
    # The learning rate the next update uses follows the advanced counter.
    updates, _ = opt.update(params, moved, params)
    assert all(np.all(np.isfinite(u)) for u in updates.values())
    with pytest.raises(ValueError, match="n_steps must be >= 0"):
        advance_counts(state, -1)


# -- several step sizes per pass -----------------------------------------------
def _run_batched(
    phi: Callable[[float], tuple[float, float]],
    alpha0: float,
    c1: float,
    c2: float,
    k: int,
) -> WolfeLineSearch:
    f0, d0 = phi(0.0)
    ls = WolfeLineSearch(f0, d0, alpha0, c1=c1, c2=c2, max_steps=30)
    while not ls.done:
        alphas = ls.next_alphas(k)
        assert alphas[0] == ls.next_alpha()
        assert len(alphas) == len(set(alphas)) <= k
        assert all(a > 0 and math.isfinite(a) for a in alphas)
        ls.observe_many([(a, *phi(a)) for a in alphas])
    return ls


@pytest.mark.parametrize("phi", [_mt1, _mt2, _quadratic, _undefined_beyond_one])
@pytest.mark.parametrize("alpha0", [1e-3, 0.1, 1.0, 10.0, 1e3])
@pytest.mark.parametrize(("c1", "c2"), [(1e-4, 0.9), (1e-3, 0.1)])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_batched_line_search_satisfies_strong_wolfe_in_fewer_rounds(
    phi: Callable[[float], tuple[float, float]],
    alpha0: float,
    c1: float,
    c2: float,
    k: int,
) -> None:
    single = _run_line_search(phi, alpha0, c1, c2)
    ls = _run_batched(phi, alpha0, c1, c2, k)
    result = ls.result
    f0, d0 = phi(0.0)
    assert result.status == "wolfe", result
    f, d = phi(result.alpha)
    assert (f, d) == (result.f, result.gdotp)
    assert f <= f0 + c1 * result.alpha * d0, result
    assert abs(d) <= c2 * abs(d0), result
    # Never more passes than one step at a time, and the step is at least as
    # good as the one a single-step search may settle for.
    assert ls.n_rounds <= single.n_rounds, (ls.n_rounds, single.n_rounds)
    assert result.n_evals <= k * ls.n_rounds
    assert 0 <= result.trial_index < result.n_evals


def test_batched_line_search_saves_passes() -> None:
    # Moré-Thuente's function 2 needs 7 single trials from alpha 1, and a
    # function undefined beyond 1 needs 7 from alpha 1000.
    for phi, alpha0, most in ((_mt2, 1.0, 4), (_undefined_beyond_one, 1e3, 5)):
        single = _run_line_search(phi, alpha0, 1e-4, 0.9)
        batched = _run_batched(phi, alpha0, 1e-4, 0.9, 3)
        assert single.n_rounds == 7
        assert batched.n_rounds <= most, (phi, batched.n_rounds)


def test_one_candidate_per_round_is_the_step_at_a_time_search() -> None:
    for phi in (_mt1, _mt2, _quadratic, _undefined_beyond_one):
        single = _run_line_search(phi, 10.0, 1e-4, 0.9)
        batched = _run_batched(phi, 10.0, 1e-4, 0.9, 1)
        assert batched.result == single.result
        assert batched.n_rounds == single.n_rounds == single.result.n_evals


def test_a_speculative_wolfe_step_with_a_lower_objective_wins() -> None:
    # Along p, the minimum is at 3.5; the unit step already meets the (loose)
    # strong-Wolfe conditions, a guessed step 4.0 meets them with a lower f.
    ls = WolfeLineSearch(*_quadratic_at(0.0), 1.0, c1=1e-4, c2=0.9)
    alphas = ls.next_alphas(3)
    assert alphas == [1.0, 0.5, 4.0]
    ls.observe_many([(a, *_quadratic_at(a)) for a in alphas])
    assert ls.done and ls.n_rounds == 1
    assert ls.result.alpha == 4.0 and ls.result.trial_index == 2
    assert ls.result.f == _quadratic_at(4.0)[0]


def _quadratic_at(alpha: float) -> tuple[float, float]:
    return (alpha - 3.5) ** 2 / 10.0, (alpha - 3.5) / 5.0


def test_zoom_guesses_bracket_the_pending_step() -> None:
    ls = WolfeLineSearch(0.0, -1.0, 1.0, c1=1e-4, c2=0.1)
    ls.observe(1.0, 5.0, 10.0)  # far too long: zoom into (0, 1)
    pending = ls.next_alpha()
    assert 0.0 < pending < 1.0
    alphas = ls.next_alphas(3)
    assert alphas[0] == pending
    assert min(alphas[1:]) < pending < max(alphas[1:])
    assert all(ls.usable(a) for a in alphas)
    assert not ls.usable(1.0) and not ls.usable(0.0) and not ls.usable(math.nan)


def test_observe_many_protocol() -> None:
    ls = WolfeLineSearch(0.0, -1.0, 1.0, max_steps=2)
    with pytest.raises(ValueError, match="pending"):
        ls.observe_many([(0.5, 0.0, 0.0), (1.0, 0.0, 0.0)])
    with pytest.raises(ValueError, match="pending"):
        ls.observe_many([])
    with pytest.raises(ValueError, match="k must be"):
        ls.next_alphas(0)
    # max_steps counts rounds, not trials: two rounds of three worse trials.
    for _ in range(2):
        ls.observe_many([(a, 1.0, 1.0) for a in ls.next_alphas(3)])
    assert ls.done and ls.n_rounds == 2
    assert ls.result.status == "failed" and ls.result.n_evals == 6


def test_lbfgs_candidates_setting() -> None:
    from dasktrain.optim import LBFGS, optimizer_from_config

    opt = LBFGS(line_search_candidates=4)
    assert optimizer_from_config(opt.config()) == opt
    assert optimizer_from_config(LBFGS().config()) == LBFGS()
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises((TypeError, ValueError), match="line_search_candidates"):
            LBFGS(line_search_candidates=bad)  # type: ignore[arg-type]
    state = LBFGS().init_state(3)
    ls = WolfeLineSearch(0.0, -1.0)
    assert opt.n_candidates(state, ls) == 4
    # Automatic: one on the first pass of a search, several on later passes.
    auto = LBFGS()
    assert auto.n_candidates(state, ls) == 1
    state = auto.push(state, np.ones(3), np.ones(3))
    assert auto.n_candidates(state, ls) == 1
    ls.observe(1.0, 5.0, 10.0)
    assert auto.n_candidates(state, ls) == 3


@pytest.mark.parametrize("k", [None, 1, 3])
def test_minimize_lbfgs_with_batched_evaluations(k: int | None) -> None:
    from dasktrain.optim import LBFGS, minimize_lbfgs

    rng = np.random.default_rng(0)
    A = rng.normal(size=(300, 6))
    y = (A @ rng.normal(size=6) + rng.normal(size=300) > 0).astype(float)
    calls: list[int] = []

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = A @ w
        s = 2 * y - 1
        f = float(np.mean(np.logaddexp(0, -s * z)) + 5e-3 * w @ w)
        g = A.T @ (-s / (1 + np.exp(s * z))) / len(z) + 1e-2 * w
        return f, g

    def many(ws: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        calls.append(len(ws))
        return [fun(w) for w in ws]

    opt = LBFGS(tol=1e-9, line_search_candidates=k)
    plain = minimize_lbfgs(fun, np.zeros(6), optimizer=opt, max_iter=100)
    res = minimize_lbfgs(
        fun, np.zeros(6), optimizer=opt, max_iter=100, fun_and_grad_many=many
    )
    assert res.n_evals == 1 + len(calls)  # x0, then the rounds
    # Both stop where an iteration no longer decreases f (ftol).
    assert abs(res.f - plain.f) <= 1e-9 * abs(plain.f)
    assert res.n_evals <= plain.n_evals
    if k == 1:
        np.testing.assert_array_equal(res.x, plain.x)
        assert set(calls) == {1}
    else:
        assert max(calls) == 3


# -- L1 with L-BFGS: OWL-QN ------------------------------------------------------
def test_pseudo_gradient_cases() -> None:
    from dasktrain.optim.lbfgs import pseudo_gradient

    x = np.array([2.0, -1.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    g = np.array([0.5, 0.5, 0.5, 3.0, -3.0, 1.0, 1.0])
    l1 = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # the last: no L1
    pg = pseudo_gradient(x, g, l1)
    # away from zero: g + l1 sign(x); at zero: the descending side or 0.
    np.testing.assert_array_equal(pg, [1.5, -0.5, 0.0, 2.0, -2.0, 0.0, 1.0])


@pytest.mark.parametrize("k", [None, 1, 3])
def test_owlqn_matches_coordinate_descent_lasso(k: int | None) -> None:
    from sklearn.linear_model import Lasso

    from dasktrain.optim import LBFGS, minimize_lbfgs

    rng = np.random.default_rng(0)
    n, d = 400, 25
    A = rng.normal(size=(n, d))
    truth = np.zeros(d)
    truth[:4] = [3.0, -2.0, 1.5, 0.8]
    b = A @ truth + 0.5 * rng.normal(size=n)
    alpha = 0.1

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        r = A @ x - b
        return float(0.5 * np.mean(r * r)), A.T @ r / n

    lasso = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
    coef = lasso.fit(A, b).coef_
    res = minimize_lbfgs(
        fun,
        np.zeros(d),
        optimizer=LBFGS(line_search_candidates=k),
        max_iter=200,
        l1=alpha,
        fun_and_grad_many=lambda xs: [fun(x) for x in xs],
    )
    oracle = fun(coef)[0] + alpha * float(np.abs(coef).sum())
    assert res.f == pytest.approx(oracle, rel=1e-9)
    np.testing.assert_array_equal(res.x == 0, coef == 0)  # exact zeros
    assert 0 < int((coef == 0).sum()) < d
    np.testing.assert_allclose(res.x, coef, atol=1e-5)  # default tolerances
    assert res.n_iter < 30


def test_owlqn_leaves_unpenalized_coordinates_free() -> None:
    from dasktrain.optim import LBFGS, minimize_lbfgs

    # f = 0.5 ||x - c||^2 with L1 on the first two coordinates only: the
    # solution soft-thresholds those and leaves the third at c.
    c = np.array([0.3, -2.0, -0.1])
    l1 = np.array([0.5, 0.5, 0.0])
    res = minimize_lbfgs(
        lambda x: (float(0.5 * (x - c) @ (x - c)), x - c),
        np.zeros(3),
        optimizer=LBFGS(tol=1e-12),
        max_iter=50,
        l1=l1,
    )
    np.testing.assert_allclose(res.x, [0.0, -1.5, -0.1], atol=1e-9)
    assert res.x[0] == 0.0


def test_orthant_search_protocol() -> None:
    from dasktrain.optim.lbfgs import OrthantSearch, check_l1

    x = np.array([1.0, -1.0])
    pg = np.array([1.0, -1.0])
    ls = OrthantSearch(2.0, x, -pg, pg, np.ones(2), max_rounds=2)
    assert ls.next_alphas(3) == [1.0, 0.5, 0.25]
    np.testing.assert_array_equal(ls.point(2.0), [0.0, 0.0])  # stays in orthant
    with pytest.raises(ValueError, match="expected"):
        ls.observe_many([(0.5, 1.0)])
    ls.observe_many([(1.0, 3.0), (0.5, math.nan)])  # no decrease
    assert not ls.done and ls.next_alphas(1) == [0.25]
    ls.observe_many([(0.25, 5.0)])
    assert ls.done and not ls.result.accepted and ls.result.n_evals == 3
    with pytest.raises(ValueError, match="l1"):
        check_l1(-1.0, 3)
    with pytest.raises(ValueError, match="l1"):
        check_l1(np.array([0.0, np.inf, 0.0]), 3)
