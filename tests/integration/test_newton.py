"""Newton on a real cluster: convergence on badly scaled data, history rows,
the same bits on 1, 2 and 3 workers, resume after a SIGKILLed driver, and
clear errors for what it cannot do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client
from sklearn import linear_model
from trainer_support import assert_same_params, losses, store, stored_params

import dasktrain as dt
from dasktrain.errors import LabelError

pytestmark = pytest.mark.cluster

N_ROWS = 12_500
N_FEATURES = 8
CHUNK_ROWS = 1_500  # 9 chunks, the last one short
#: Feature scales spanning six orders of magnitude.
SCALES = np.logspace(-3, 3, N_FEATURES)
L2 = 1e-4
MAX_EPOCHS = 50
#: Objective gap to scikit-learn's newton-cholesky on the same float32 values.
OBJECTIVE_RTOL = 1e-6
DRIVER_TIMEOUT = 120.0


def badly_scaled(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated float32 features with scales 1e-3 .. 1e3; one feature
    nearly separates the classes."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(N_ROWS, N_FEATURES))
    latent[:, 1:] += 0.7 * latent[:, :-1]
    z = latent @ rng.normal(size=N_FEATURES) + 0.5
    y = (z + 0.5 * rng.logistic(size=N_ROWS) > 0).astype(np.int8)
    return (latent * SCALES).astype(np.float32), y


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dt.Dataset, Any, Any]:
    X, y = badly_scaled()
    data = store(
        tmp_path_factory.mktemp("newton") / "d.zarr", X, y, chunk_rows=CHUNK_ROWS
    )
    return data, X.astype(np.float64), y


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dt.Dataset, Any, Any]:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(N_ROWS, N_FEATURES)).astype(np.float32)
    mu = np.exp(2.0 + X.astype(np.float64) @ np.linspace(-0.3, 0.3, N_FEATURES))
    y = rng.poisson(mu).astype(np.float32)
    data = store(
        tmp_path_factory.mktemp("counts") / "d.zarr", X, y, chunk_rows=CHUNK_ROWS
    )
    return data, X.astype(np.float64), y.astype(np.float64)


def logistic_objective(X: np.ndarray, y: np.ndarray, w: Any, b: Any) -> float:
    z = X @ np.asarray(w, dtype=np.float64) + float(b)
    return float(np.mean(np.logaddexp(0, z) - y * z) + 0.5 * L2 * np.sum(w**2))


def test_newton_converges_on_badly_scaled_data(
    tmp_path: Path, client: Client, scaled: tuple[dt.Dataset, Any, Any]
) -> None:
    data, X, y = scaled
    est = linear_model.LogisticRegression(
        C=1.0 / (L2 * N_ROWS), solver="newton-cholesky", tol=1e-12, max_iter=1_000
    ).fit(X, y)
    oracle = logistic_objective(X, y, est.coef_[0], est.intercept_[0])
    path = tmp_path / "run.zarr"
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=L2),
        dt.optim.Newton(),
        store=path,
        client=client,
    )
    history = trainer.fit(data, epochs=MAX_EPOCHS, progress=True)
    ps = dt.ParamStore.open(path)
    assert ps.meta["status"] == "converged"
    assert len(history) <= 6  # L-BFGS needs well over 50 iterations here
    w, b = trainer.params["w"], trainer.params["b"]
    ours = logistic_objective(X, y, w, b)
    assert abs(ours - oracle) <= OBJECTIVE_RTOL * oracle
    # History rows say what each iteration cost, like L-BFGS rows.
    first, last = history.rows[0], history.rows[-1]
    assert first["passes"] == 2  # the one-pass start, then its trial
    assert all(r["passes"] >= 1 and r["evals"] >= r["passes"] for r in history)
    assert all(r["rows"] == N_ROWS * r["passes"] for r in history)
    assert last["objective"] == pytest.approx(ours, rel=1e-6)
    assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))
    assert "damping" in first and "train_accuracy" in first
    # The one-pass start already lands close to the optimum.
    assert (first["objective"] - oracle) / oracle < 1e-3
    # Every row reached the dashboard's event log.
    events = [e for _, e in client.get_events("dasktrain") if e["store"] == str(path)]
    assert [e["step"] for e in events] == [r["step"] for r in history]
    assert trainer.evaluate(data)["accuracy"] > 0.8
    trainer.close()


def test_poisson_newton_matches_sklearn(
    tmp_path: Path, client: Client, counts: tuple[dt.Dataset, Any, Any]
) -> None:
    data, X, y = counts
    alpha = 1e-3
    est = linear_model.PoissonRegressor(
        alpha=alpha, solver="newton-cholesky", tol=1e-12
    ).fit(X, y)
    model = dt.models.PoissonRegression(l2=alpha)

    def objective(w: Any, b: Any) -> float:
        p = {"w": np.asarray(w), "b": np.asarray(b)}
        return model.loss(p, {"X": X, "y": y}).mean_loss() + model.penalty(p)

    oracle = objective(est.coef_, est.intercept_)
    trainer = dt.Trainer(
        model, dt.optim.Newton(), store=tmp_path / "r.zarr", client=client
    )
    history = trainer.fit(data, epochs=MAX_EPOCHS, progress=False)
    ours = objective(trainer.params["w"], trainer.params["b"])
    assert abs(ours - oracle) <= OBJECTIVE_RTOL * oracle
    assert len(history) <= 8
    metrics = trainer.evaluate(data)
    assert set(metrics) == {"loss", "mse", "r2"} and metrics["r2"] > 0.5
    assert np.all(trainer.predict(X[:5].astype(np.float32)) > 0)
    trainer.close()


# -- the same bits anywhere ----------------------------------------------------------
CASES: dict[str, tuple[Callable[[], Any], Callable[[], Any], str]] = {
    "logistic-one-pass-start": (
        lambda: dt.models.LogisticRegression(l2=L2),
        dt.optim.Newton,
        "scaled",
    ),
    "logistic-elastic-net-plain-start": (
        lambda: dt.models.LogisticRegression(l2=L2, l1=1e-3),
        lambda: dt.optim.Newton(local_iterations=0, hessian_rows=500),
        "scaled",
    ),
    "softmax": (
        lambda: dt.models.SoftmaxRegression(3, l2=L2),
        dt.optim.Newton,
        "classes",
    ),
    "poisson": (lambda: dt.models.PoissonRegression(l2=L2), dt.optim.Newton, "counts"),
}


@pytest.mark.slow
def test_same_bits_on_one_two_and_three_workers(
    tmp_path: Path,
    client: Client,
    make_client: Callable[[int], Client],
    scaled: tuple[dt.Dataset, Any, Any],
    counts: tuple[dt.Dataset, Any, Any],
) -> None:
    rng = np.random.default_rng(2)
    Xc = rng.normal(size=(6_100, 6)).astype(np.float32)
    yc = np.argmax(Xc[:, :3] + rng.gumbel(size=(6_100, 3)), axis=1).astype(np.int8)
    datasets = {
        "scaled": scaled[0],
        "counts": counts[0],
        "classes": store(tmp_path / "classes.zarr", Xc, yc, chunk_rows=CHUNK_ROWS),
    }
    runs: dict[int, dict[str, tuple[dict[str, np.ndarray], dt.History]]] = {}
    for n_workers in (1, 3, 2):
        c = client if n_workers == 2 else make_client(n_workers)
        assert len(c.nthreads()) == n_workers
        runs[n_workers] = {}
        for name, (model, opt, data) in CASES.items():
            trainer = dt.Trainer(
                model(), opt(), store=tmp_path / f"w{n_workers}-{name}.zarr", client=c
            )
            history = trainer.fit(datasets[data], epochs=MAX_EPOCHS, progress=False)
            runs[n_workers][name] = (trainer.params, history)
    for name in CASES:
        params, history = runs[2][name]
        assert len(history) >= 2, name
        for n_workers in (1, 3):
            other_params, other_history = runs[n_workers][name]
            what = f"{name}: {n_workers} vs 2 workers"
            assert_same_params(other_params, params, what)
            assert [r["objective"] for r in other_history] == [
                r["objective"] for r in history
            ], what
    w = runs[2]["logistic-elastic-net-plain-start"][0]["w"]
    assert np.any(w == 0)  # the L1 part zeroes coefficients exactly


# -- resume --------------------------------------------------------------------------
#: Newton with only a gradient test and an exact Hessian on a near-separable
#: problem without penalty: many iterations, so a run can be cut short.
def resume_case() -> tuple[Any, Any]:
    return (
        dt.models.LogisticRegression(),
        dt.optim.Newton(local_iterations=0, hessian_rows=None, tol=1e-9),
    )


@pytest.fixture(scope="module")
def separable(tmp_path_factory: pytest.TempPathFactory) -> dt.Dataset:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(6_000, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int8)
    y[:4] = 1 - y[:4]
    return store(tmp_path_factory.mktemp("sep") / "d.zarr", X, y, chunk_rows=CHUNK_ROWS)


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, client: Client, separable: dt.Dataset
) -> tuple[dict[str, np.ndarray], dt.History]:
    path = tmp_path_factory.mktemp("reference") / "run.zarr"
    trainer = dt.Trainer(*resume_case(), store=path, client=client)
    history = trainer.fit(separable, epochs=MAX_EPOCHS, progress=False)
    assert len(history) >= 6
    return trainer.params, history


def test_resume_after_some_iterations(
    tmp_path: Path,
    client: Client,
    separable: dt.Dataset,
    uninterrupted: tuple[dict[str, np.ndarray], dt.History],
) -> None:
    path = tmp_path / "run.zarr"
    dt.Trainer(*resume_case(), store=path, client=client).fit(
        separable, epochs=3, progress=False
    )
    resumed = dt.Trainer.resume(path, client=client)
    assert isinstance(resumed.optimizer, dt.optim.Newton)
    history = resumed.fit(separable, epochs=MAX_EPOCHS, progress=False)
    params, expected = uninterrupted
    assert_same_params(resumed.params, params, "resumed")
    assert losses(history) == losses(expected)
    assert [r["passes"] for r in history] == [r["passes"] for r in expected]


DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import dasktrain as dt
    from test_newton import resume_case

    class Die(dt.Callback):
        def on_step_end(self, trainer, row):
            if row["step"] == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = dt.Trainer(*resume_case(), store={store!r}, client={address!r})
    trainer.fit(dt.Dataset.open({data!r}), epochs={epochs}, progress=False,
                checkpoint_steps=1, callbacks=[Die()])
    """
)


def test_resume_after_the_driver_is_killed(
    tmp_path: Path,
    client: Client,
    separable: dt.Dataset,
    uninterrupted: tuple[dict[str, np.ndarray], dt.History],
) -> None:
    """The driver process is SIGKILLed in the middle of iteration 4 (after
    its row, before its commit): the store keeps 3 iterations, and resuming
    finishes the run with the bits of the uninterrupted one."""
    path = tmp_path / "run.zarr"
    script = DRIVER.format(
        tests=str(Path(__file__).parent),
        kill_at=4,
        store=str(path),
        address=client.scheduler.address,
        data=separable.path,
        epochs=MAX_EPOCHS,
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        timeout=DRIVER_TIMEOUT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    ps = dt.ParamStore.open(path)
    assert ps.committed == 3 and ps.meta["status"] == "running"
    resumed = dt.Trainer.resume(path, client=client)
    history = resumed.fit(separable, epochs=MAX_EPOCHS, progress=False)
    params, expected = uninterrupted
    assert_same_params(stored_params(path), params, "store after resume")
    assert losses(history) == losses(expected)


# -- errors ---------------------------------------------------------------------
def test_newton_refuses_what_it_cannot_do(
    tmp_path: Path, client: Client, scaled: tuple[dt.Dataset, Any, Any]
) -> None:
    data = scaled[0]
    with pytest.raises(ValueError, match=r"Newton needs a linear model or GLM.*MLP"):
        dt.Trainer(dt.models.MLP((4,), 1), dt.optim.Newton(), store=tmp_path / "a.zarr")
    trainer = dt.Trainer(
        dt.models.LogisticRegression(),
        dt.optim.Newton(),
        store=tmp_path / "b.zarr",
        client=client,
    )
    with pytest.raises(ValueError, match="Newton needs full-batch training"):
        trainer.fit(data, epochs=1, batch_rows=100, progress=False)
    with pytest.raises(ValueError, match="Newton needs full-batch training"):
        trainer.fit(data, epochs=1, batch_rows=100, local_steps=2, progress=False)
    assert not (tmp_path / "b.zarr").exists()


@pytest.mark.parametrize(
    ("model", "bad", "message"),
    [
        (dt.models.PoissonRegression(), -2.0, "target -2 is negative"),
        (dt.models.GammaRegression(), 0.0, "target 0 is not positive"),
    ],
    ids=["poisson-negative", "gamma-zero"],
)
@pytest.mark.parametrize("optimizer", [dt.optim.Newton, dt.optim.LBFGS])
def test_bad_targets_name_chunk_and_row(
    tmp_path: Path,
    client: Client,
    model: Any,
    bad: float,
    message: str,
    optimizer: Callable[[], Any],
) -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(4_000, 3)).astype(np.float32)
    y = rng.poisson(3.0, 4_000).astype(np.float32) + 1
    row = 2 * CHUNK_ROWS + 7
    y[row] = bad
    data = store(tmp_path / "d.zarr", X, y, chunk_rows=CHUNK_ROWS)
    trainer = dt.Trainer(model, optimizer(), store=tmp_path / "r.zarr", client=client)
    with pytest.raises(LabelError) as info:
        trainer.fit(data, epochs=3, progress=False)
    text = str(info.value)
    assert "d.zarr" in text and "chunk 2" in text and f"row {row}" in text
    assert message in text
