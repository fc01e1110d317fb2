"""The ``dasktrain`` command, run as a subprocess against a real cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

import dasktrain as dt

pytestmark = pytest.mark.cluster

TIMEOUT = 180


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dasktrain", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def address(client: Client) -> str:
    return str(client.scheduler.address)


def test_help_everywhere() -> None:
    top = run("--help")
    assert top.returncode == 0
    for command in (
        "quickstart",
        "make-data",
        "inspect",
        "train",
        "evaluate",
        "predict",
    ):
        assert command in top.stdout
        sub = run(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "usage: dasktrain " + command in sub.stdout


def test_usage_error_exit_code() -> None:
    res = run("train")
    assert res.returncode == 2
    assert "required" in res.stderr


def test_make_data_inspect_train_evaluate_predict(
    tmp_path: Path, address: str, client: Client
) -> None:
    data = tmp_path / "cls.zarr"
    res = run(
        "make-data", str(data), "--rows", "12000", "--features", "8",
        "--chunk-rows", "1000", "--quiet", "--scheduler", address,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "12,000 rows x 8 features, 12 chunks" in res.stdout

    res = run("inspect", str(data), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["kind"] == "dataset"
    assert info["n_rows"] == 12000 and info["n_chunks"] == 12
    assert info["fields"]["X"] == {"shape": [8], "dtype": "float32"}

    store = tmp_path / "run.zarr"
    config = tmp_path / "run.toml"
    config.write_text(
        'model = "logistic"\nl2 = 1e-4\noptimizer = "lbfgs"\nepochs = 30\n'
    )
    res = run(
        "train", str(data), "--store", str(store), "--config", str(config),
        "--val-fraction", "0.2", "--quiet", "--scheduler", address,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["step"] >= 3
    assert summary["val_loss"] < 0.5

    res = run("inspect", str(store), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["kind"] == "parameter store"
    assert info["model"]["type"] == "LogisticRegression"
    assert info["params"]["w"] == {"shape": [8], "dtype": "float64"}
    assert info["history"]["steps"] == summary["step"]

    res = run("evaluate", str(store), str(data), "--scheduler", address)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["accuracy"] > 0.8

    out = tmp_path / "pred.npy"
    res = run(
        "predict", str(store), str(data), "--out", str(out), "--scheduler", address
    )
    assert res.returncode == 0, res.stderr
    pred = np.load(out)
    trainer = dt.Trainer.resume(store, client=client)
    X = np.concatenate([dt.Dataset.open(data).read("X", c) for c in range(12)])
    np.testing.assert_array_equal(pred, trainer.predict(X))
    # An existing output is not replaced without --overwrite.
    res = run(
        "predict", str(store), str(data), "--out", str(out), "--scheduler", address
    )
    assert res.returncode == 2
    assert "--overwrite" in res.stderr


def test_errors_have_exit_code_1_and_name_the_store(tmp_path: Path) -> None:
    missing = tmp_path / "missing.zarr"
    res = run("inspect", str(missing))
    assert res.returncode == 1
    assert str(missing) in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [\n")
    res = run(
        "train", str(missing), "--store", str(tmp_path / "r.zarr"), "--config", str(bad)
    )
    assert res.returncode in (1, 2)


def test_unknown_config_key_is_refused(tmp_path: Path, address: str) -> None:
    data = tmp_path / "d.zarr"
    X = np.random.default_rng(0).normal(size=(400, 3)).astype("float32")
    dt.Dataset.from_arrays(data, X=X, y=(X[:, 0] > 0).astype("int8"), chunk_rows=100)
    config = tmp_path / "c.toml"
    config.write_text("learning_rat = 0.1\n")
    res = run(
        "train", str(data), "--store", str(tmp_path / "r.zarr"), "--config", str(config)
    )
    assert res.returncode == 2
    assert "learning_rat" in res.stderr


@pytest.mark.slow
def test_quickstart_small(tmp_path: Path, address: str) -> None:
    args = (
        "quickstart", "--rows", "40000", "--features", "10", "--chunk-rows", "4000",
        "--data", str(tmp_path / "qs.zarr"), "--run", str(tmp_path / "qs-run.zarr"),
        "--scheduler", address,
    )  # fmt: skip
    res = run(*args)
    assert res.returncode == 0, res.stderr
    assert "Dask dashboard: http" in res.stdout
    assert "valid: loss" in res.stdout and "accuracy 0.8" in res.stdout
    assert str(tmp_path / "qs-run.zarr") in res.stdout
    # Running it again reuses the data and retrains the run.
    again = run(*args)
    assert again.returncode == 0, again.stderr
    assert "valid: loss" in again.stdout


def test_train_defaults_to_newton_for_glms(tmp_path: Path, address: str) -> None:
    """``--optimizer auto`` (the default): Newton for a Poisson GLM, L-BFGS
    for an MLP; Newton for an MLP is a usage error."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6_000, 4)).astype(np.float32)
    y = rng.poisson(np.exp(1.0 + X @ np.array([0.3, -0.2, 0.1, 0.0]))).astype("float32")
    data = tmp_path / "counts.zarr"
    dt.Dataset.from_arrays(data, X=X, y=y, chunk_rows=1_000)
    store = tmp_path / "poisson.zarr"
    res = run(
        "train", str(data), "--store", str(store), "--model", "poisson",
        "--l2", "1e-3", "--epochs", "20", "--quiet", "--scheduler", address,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    meta = dt.ParamStore.open(store).meta
    assert meta["optimizer"]["type"] == "Newton"
    assert meta["model"]["type"] == "PoissonRegression"
    assert meta["status"] == "converged" and len(meta["history"]) < 10
    mlp = run(
        "train", str(data), "--store", str(tmp_path / "mlp.zarr"), "--model", "mlp",
        "--loss", "squared", "--epochs", "1", "--quiet", "--scheduler", address,
    )  # fmt: skip
    assert mlp.returncode == 0, mlp.stderr
    assert (
        dt.ParamStore.open(tmp_path / "mlp.zarr").meta["optimizer"]["type"] == "LBFGS"
    )
    bad = run(
        "train", str(data), "--store", str(tmp_path / "bad.zarr"), "--model", "mlp",
        "--optimizer", "newton", "--quiet", "--scheduler", address,
    )  # fmt: skip
    assert bad.returncode == 2 and "newton needs a linear model" in bad.stderr
