"""Out-of-core training on real worker processes: the models learn, epochs and
history rows are counted as documented, and the worker cache, lost workers,
large parameters and embedded clusters change speed only, never results."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from distributed import Client
from trainer_support import (
    N_FEATURES,
    assert_same_params,
    classification_arrays,
    classification_store,
    losses,
    regression_arrays,
    store,
    stored_params,
)

import dasktrain as dt
from dasktrain.engine import engine
from dasktrain.history import COLUMNS

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[dt.Dataset, dt.Dataset]:
    """10 chunks of 1,000 rows (the last one short); 3 of them for validation."""
    ds = classification_store(tmp_path_factory.mktemp("data") / "d.zarr", 9_500)
    return ds.split(0.3, seed=0)


def _sklearn_objective(train: dt.Dataset, l2: float) -> float:
    """Optimal objective of l2-penalized logistic regression, from
    scikit-learn (C = 1 / (l2 * n_rows))."""
    from sklearn.linear_model import LogisticRegression

    X = np.concatenate([train.read("X", c) for c in train.chunk_ids]).astype(float)
    y = np.concatenate([train.read("y", c) for c in train.chunk_ids])
    ref = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=1_000)
    ref.fit(X, y)
    z = X @ ref.coef_[0] + ref.intercept_[0]
    loss = np.mean(np.logaddexp(0.0, -(2 * y - 1) * z))
    return float(loss + l2 / 2 * ref.coef_[0] @ ref.coef_[0])


def _steps_per_epoch(train: dt.Dataset, batch_rows: int | None) -> int:
    if batch_rows is None:
        return 1
    return math.ceil(train.n_rows / batch_rows)


@pytest.mark.parametrize(
    ("batch_rows", "epochs", "learning_rate"),
    [(None, 25, 0.2), (300, 2, 0.02), (2_000, 6, 0.1)],
    ids=["full-batch", "slices-of-chunks", "whole-chunks"],
)
def test_logistic_regression_with_adam(
    tmp_path: Path,
    client: Client,
    data: tuple[dt.Dataset, dt.Dataset],
    batch_rows: int | None,
    epochs: int,
    learning_rate: float,
) -> None:
    train, val = data
    path = tmp_path / "run.zarr"
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-4),
        dt.optim.Adam(learning_rate),
        store=path,
        client=client,
    )
    history = trainer.fit(
        train, epochs=epochs, batch_rows=batch_rows, validation=val, progress=False
    )
    per_epoch = _steps_per_epoch(train, batch_rows)
    assert len(history) == epochs * per_epoch
    assert trainer.step == epochs * per_epoch and trainer.epoch == epochs

    frame = history.to_pandas()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert frame["step"].tolist() == list(range(1, len(history) + 1))
    assert frame["epoch"].tolist() == [1 + i // per_epoch for i in range(len(frame))]
    # Every row of the training split is used exactly once per epoch.
    assert (frame.groupby("epoch")["rows"].sum() == train.n_rows).all()
    assert (frame["seconds"] > 0).all() and (frame["rows_per_s"] > 0).all()
    assert (frame["learning_rate"] == learning_rate).all()
    assert (frame["objective"] >= frame["loss"]).all()  # l2 > 0
    assert np.isfinite(frame[list(COLUMNS)].to_numpy(dtype=float)).all()
    # Validation metrics at epoch ends only.
    ends = frame["val_loss"].notna()
    assert ends.tolist() == [(i + 1) % per_epoch == 0 for i in range(len(frame))]
    assert frame.loc[ends, "val_accuracy"].notna().all()
    # Learning: the loss decreases and held-out accuracy is high.
    last_epoch = frame.groupby("epoch")["loss"].mean().iloc[-1]
    assert last_epoch < 0.6 * frame["loss"].iloc[0]
    assert frame["val_loss"].dropna().iloc[-1] < frame["val_loss"].dropna().iloc[0]
    result = trainer.evaluate(val)
    assert result["accuracy"] > 0.9
    assert result["loss"] == pytest.approx(frame["val_loss"].dropna().iloc[-1])

    # The store holds what the trainer holds.
    ps = dt.ParamStore.open(path)
    assert ps.committed == len(history)
    assert ps.meta["status"] == "finished"
    assert_same_params(stored_params(path), trainer.params, "store")
    assert losses(dt.History(ps.meta["history"])) == losses(history)


def test_logistic_regression_with_lbfgs(
    tmp_path: Path, client: Client, data: tuple[dt.Dataset, dt.Dataset]
) -> None:
    train, val = data
    l2 = 1e-3
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=l2),
        dt.optim.LBFGS(),
        store=tmp_path / "run.zarr",
        client=client,
    )
    history = trainer.fit(train, epochs=8, validation=val, progress=False)
    frame = history.to_pandas()
    # One L-BFGS iteration per epoch; each row is an accepted step.
    assert frame["epoch"].tolist() == frame["step"].tolist() == list(range(1, 9))
    assert frame["val_loss"].notna().all()
    assert (frame["passes"] >= 1).all()
    # One step size in a search's first pass, three in each later one; rows
    # count the rows read.
    assert (frame["evals"] == 1 + 3 * (frame["passes"] - 1)).all()
    assert (frame["rows"] == frame["passes"] * train.n_rows).all()
    objective = frame["objective"].to_numpy()
    assert (np.diff(objective) <= 0).all()
    # Close to the optimum scikit-learn finds on the same rows.
    best = _sklearn_objective(train, l2)
    assert objective[-1] - best < 1e-3 * best
    assert trainer.evaluate(val)["accuracy"] > 0.9


def test_softmax_linear_and_mlp_train(tmp_path: Path, client: Client) -> None:
    Xc, yc = classification_arrays(6_000, n_classes=4, seed=3)
    Xr, yr = regression_arrays(6_000, seed=4)
    classes = store(tmp_path / "classes.zarr", Xc, yc)
    targets = store(tmp_path / "targets.zarr", Xr, yr)
    binary = classification_store(tmp_path / "binary.zarr", 6_000, seed=5)
    cases: list[tuple[str, Any, Any, dt.Dataset, str, float]] = [
        (
            "softmax",
            dt.models.SoftmaxRegression(4, l2=1e-4),
            dt.optim.Adam(0.05),
            classes,
            "accuracy",
            0.8,
        ),
        (
            "linear",
            dt.models.LinearRegression(l2=1e-6),
            dt.optim.SGD(0.2, momentum=0.5),
            targets,
            "r2",
            0.98,
        ),
        (
            "mlp",
            dt.models.MLP((32,), 1, loss="logistic"),
            dt.optim.Adam(0.03),
            binary,
            "accuracy",
            0.9,
        ),
        (
            "mlp-softmax",
            dt.models.MLP((16,), 4, loss="softmax"),
            dt.optim.Adam(0.03),
            classes,
            "accuracy",
            0.8,
        ),
    ]
    for name, model, opt, ds, metric, at_least in cases:
        train, val = ds.split(0.3, seed=0)
        trainer = dt.Trainer(model, opt, store=tmp_path / f"{name}.zarr", client=client)
        history = trainer.fit(
            train, epochs=4, batch_rows=500, validation=val, progress=False
        )
        frame = history.to_pandas()
        assert train.n_chunks == 4
        assert len(frame) == 4 * 4 * 2, name  # 4 epochs of 4 chunks in 2 slices
        assert frame["loss"].iloc[-8:].mean() < 0.7 * frame["loss"].iloc[0], name
        result = trainer.evaluate(val)
        assert result[metric] > at_least, (name, result)
        assert frame[f"val_{metric}"].iloc[-1] == pytest.approx(result[metric])

        # predict: numpy in -> numpy out, dask in -> dask out, Dataset in.
        X_val = np.concatenate([val.read("X", c) for c in val.chunk_ids])
        y_val = np.concatenate([val.read("y", c) for c in val.chunk_ids])
        pred = trainer.predict(X_val)
        assert isinstance(pred, np.ndarray) and pred.shape == (val.n_rows,)
        lazy = trainer.predict(da.from_array(X_val, chunks=(500, N_FEATURES)))
        assert isinstance(lazy, da.Array)
        np.testing.assert_allclose(lazy.compute(), pred, rtol=1e-6)
        from_store = trainer.predict(val).compute()
        np.testing.assert_allclose(from_store, pred, rtol=1e-6)
        if metric == "accuracy":
            assert np.mean(pred == y_val) == pytest.approx(result["accuracy"])
            proba = trainer.predict_proba(X_val)
            assert np.all(proba >= 0) and np.all(proba <= 1)
        else:
            assert np.mean((pred - y_val) ** 2) == pytest.approx(
                result["mse"], rel=1e-4
            )


@pytest.mark.slow
def test_data_larger_than_the_cache(
    tmp_path: Path, client: Client, make_client: Callable[..., Client]
) -> None:
    """~100 MB of float32 features on workers of 384 MiB whose chunk caches
    hold less than a third of it: the fit streams, stays within memory, and
    gives the bits of the fully cached run."""
    small = make_client(2, memory_limit="384MiB")
    ds = dt.datasets.make_classification(
        tmp_path / "big.zarr",
        n_rows=1_250_000,
        n_features=20,
        chunk_rows=50_000,
        codec="lz4",
        client=small,
        progress=False,
    )
    assert ds.nbytes > 100e6

    def fit(c: Client, name: str, cache_fraction: float) -> tuple[Any, dt.History]:
        trainer = dt.Trainer(
            dt.models.LogisticRegression(l2=1e-4),
            dt.optim.Adam(0.1),
            store=tmp_path / name,
            client=c,
            cache_fraction=cache_fraction,
        )
        history = trainer.fit(ds, epochs=2, progress=False)
        return trainer.params, history

    streamed, streamed_history = fit(small, "streamed.zarr", 0.05)
    cached, cached_history = fit(client, "cached.zarr", 0.35)
    assert_same_params(streamed, cached, "streamed vs cached")
    assert losses(streamed_history) == losses(cached_history)
    # The small cache could not keep the data; the large one did.
    assert streamed_history[-1]["cache_hit_rate"] < 0.5
    assert cached_history[-1]["cache_hit_rate"] == 1.0
    stats = small.run(_cache_stats)
    for s in stats.values():
        # Within budget, holding a few of the store's 25 chunks.
        assert s["n_bytes"] <= s["budget_bytes"] < 20 * 2**20
        assert 0 < s["n_entries"] < ds.n_chunks // 4
        assert s["hits"] > 0
    # No worker was paused or lost on the way.
    assert len(small.nthreads()) == 2


def _cache_stats(dask_worker: Any) -> dict[str, int]:
    from dasktrain.engine.cache import PLUGIN_NAME

    return dict(dask_worker.plugins[PLUGIN_NAME].cache.stats().to_dict())


class KillWorker(dt.Callback):
    """SIGKILLs one worker process (or all of them) after step ``step``; the
    nannies restart them, and the next step is submitted while the scheduler
    is still noticing."""

    def __init__(self, client: Client, step: int, *, every: bool = False) -> None:
        self.client = client
        self.step = step
        self.every = every
        self.killed: list[int] = []

    def on_step_end(self, trainer: dt.Trainer, row: dict[str, Any]) -> None:
        if row["step"] == self.step:
            if self.every:
                self.client.wait_for_workers(len(self.client.cluster.worker_spec))
            pids = self.client.run(os.getpid)
            victims = [pids[a] for a in sorted(pids)]
            for victim in victims if self.every else victims[:1]:
                os.kill(victim, signal.SIGKILL)
                self.killed.append(victim)


def _mlp_big() -> dt.models.MLP:
    # 20 * 512 + 512 * 512 + 512 + 2 * 512 + 1: ~274k parameters, 2.2 MB as
    # float64, above the 1 MiB that travels inside tasks: they are scattered.
    return dt.models.MLP((512, 512), 1, loss="logistic", l2=1e-4)


@pytest.mark.slow
def test_a_worker_dies_during_the_fit(
    tmp_path: Path, client: Client, make_client: Callable[..., Client]
) -> None:
    """Workers SIGKILLed between two steps: their tasks run elsewhere (soft
    restrictions), a pass that lost the scattered parameters or whose tasks
    were stranded with no worker running is run again, and the fit ends with
    the bits of an undisturbed run.  One worker killed with small parameters
    (inside the tasks), one with ~274k (scattered), then every worker."""
    ds = classification_store(tmp_path / "d.zarr", 3_000, 20, chunk_rows=500)
    fragile = make_client(2)
    cases: list[tuple[str, Callable[[], Any], bool]] = [
        ("logistic", lambda: dt.models.LogisticRegression(l2=1e-4), False),
        ("mlp-300k", _mlp_big, False),
        ("logistic-all-workers", lambda: dt.models.LogisticRegression(), True),
    ]
    for name, make, every in cases:
        expected = dt.Trainer(
            make(),
            dt.optim.SGD(0.05, momentum=0.9),
            store=tmp_path / f"{name}-ref.zarr",
            client=client,
        )
        expected.fit(ds, epochs=2, batch_rows=1_000, progress=False)

        killer = KillWorker(fragile, step=2, every=every)
        trainer = dt.Trainer(
            make(),
            dt.optim.SGD(0.05, momentum=0.9),
            store=tmp_path / f"{name}.zarr",
            client=fragile,
        )
        history = trainer.fit(
            ds, epochs=2, batch_rows=1_000, callbacks=[killer], progress=False
        )
        assert len(killer.killed) == (2 if every else 1), (name, fragile.nthreads())
        assert len(history) == 6, name  # 2 epochs of 3 steps
        assert_same_params(trainer.params, expected.params, f"{name}: workers died")
        assert losses(history) == losses(expected.history), name
        # The nannies bring the workers back.
        fragile.wait_for_workers(2, timeout=60)
        alive = set(fragile.run(os.getpid).values())
        assert not alive & set(killer.killed), name


def test_large_parameters_are_scattered(
    tmp_path: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MLP with ~274k parameters (above the inline limit, so they are
    scattered once per pass) trains, with the bits of the same run whose
    parameters travel inside the tasks."""
    ds = classification_store(tmp_path / "d.zarr", 2_000, 20, chunk_rows=500)
    train, val = ds.split(0.25, seed=0)
    params = _mlp_big().init(np.random.default_rng(0), ds.schema)
    assert sum(v.size for v in params.values()) > 270_000
    assert sum(v.nbytes for v in params.values()) > engine.MAX_INLINE_PARAM_BYTES
    results = []
    for inline_limit in (engine.MAX_INLINE_PARAM_BYTES, 2**30):
        monkeypatch.setattr(engine, "MAX_INLINE_PARAM_BYTES", inline_limit)
        trainer = dt.Trainer(
            _mlp_big(),
            dt.optim.Adam(1e-3),
            store=tmp_path / f"{inline_limit}.zarr",
            client=client,
        )
        history = trainer.fit(
            train, epochs=3, batch_rows=500, validation=val, progress=False
        )
        results.append((trainer.params, history))
    (a, ha), (b, hb) = results
    assert_same_params(a, b, "MLP with scattered vs inlined parameters")
    assert losses(ha) == losses(hb)
    assert ha[-1]["val_accuracy"] > 0.85
    assert ha[-1]["loss"] < ha[0]["loss"]


@pytest.mark.slow
def test_embedded_cluster_without_a_client(tmp_path: Path) -> None:
    """With no client anywhere, the trainer starts a LocalCluster of its own and
    close() shuts it down (run in a fresh interpreter: this one has clients)."""
    script = textwrap.dedent(
        f"""
        import json
        import numpy as np
        import dasktrain as dt
        from distributed import default_client

        rng = np.random.default_rng(0)
        X = rng.normal(size=(3_000, 5)).astype("float32")
        ds = dt.Dataset.from_arrays({str(tmp_path / "d.zarr")!r}, X=X,
                                    y=(X[:, 0] > 0).astype("int8"), chunk_rows=500)
        trainer = dt.Trainer(dt.models.LogisticRegression(), dt.optim.Adam(0.1),
                             store={str(tmp_path / "run.zarr")!r}, client=None)
        client = trainer.client
        cluster = client.cluster
        n_workers = len(client.nthreads())
        history = trainer.fit(ds, epochs=5, progress=False)
        accuracy = trainer.evaluate(ds)["accuracy"]
        trainer.close()
        try:
            default_client()
            leftover = True
        except ValueError:
            leftover = False
        print(json.dumps({{
            "n_workers": n_workers,
            "steps": len(history),
            "accuracy": accuracy,
            "client": client.status,
            "cluster": cluster.status.name,
            "leftover_default_client": leftover,
        }}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["n_workers"] >= 1
    assert report["steps"] == 5
    assert report["accuracy"] > 0.95
    assert report["client"] == "closed"
    assert report["cluster"] == "closed"
    assert report["leftover_default_client"] is False
