"""``dt.load_model(store)``: predictions in this process, no cluster, the
bits of ``Trainer.predict``.

Models are trained on the shared 2-worker cluster; predictions from the
store are compared with the trainer's with ``np.array_equal`` (and dtype),
once in this process and once in a fresh interpreter that never starts or
finds a Dask client.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client

import dasktrain as dt
from dasktrain.errors import StoreError, StoreNotFoundError
from dasktrain.models import MatrixFactorization, SparseLogisticRegression

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

N_ROWS = 2_000
N_FEATURES = 6
CHUNK_ROWS = 500


def _dense_data(tmp: Path, kind: str) -> tuple[dt.Dataset, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N_ROWS, N_FEATURES)).astype(np.float32)
    z = X @ np.linspace(-1.0, 1.0, N_FEATURES)
    if kind == "binary":
        y = (z + rng.logistic(size=N_ROWS) > 0).astype(np.int8)
    elif kind == "classes":
        y = np.digitize(z, [-0.5, 0.5]).astype(np.int64)
    elif kind == "counts":
        y = rng.poisson(np.exp(0.3 * z)).astype(np.float32)
    else:
        y = (z + 0.1 * rng.normal(size=N_ROWS)).astype(np.float32)
    ds = dt.Dataset.from_arrays(tmp / f"{kind}.zarr", X=X, y=y, chunk_rows=CHUNK_ROWS)
    return ds, X[:50]


DENSE_CASES: dict[str, tuple[Any, Any, str, int | None]] = {
    "logistic-lbfgs": (
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.LBFGS(),
        "binary",
        None,
    ),
    "linear-adam": (
        dt.models.LinearRegression(l2=1e-4),
        dt.optim.Adam(0.05),
        "real",
        500,
    ),
    "softmax-adam": (
        dt.models.SoftmaxRegression(n_classes=3, l2=1e-4),
        dt.optim.Adam(0.05),
        "classes",
        500,
    ),
    "poisson-newton": (
        dt.models.PoissonRegression(l2=1e-4),
        dt.optim.Newton(),
        "counts",
        None,
    ),
    "mlp-adam": (
        dt.models.MLP(hidden=(8,), n_outputs=1, loss="logistic"),
        dt.optim.Adam(0.01),
        "binary",
        250,
    ),
}

KINDS = ("predict", "predict_proba", "decision_function")


def _expected(trainer: dt.Trainer, X: Any) -> dict[str, np.ndarray]:
    out = {"predict": trainer.predict(X)}
    if trainer.model.is_classifier:
        out["predict_proba"] = trainer.predict_proba(X)
    return out


def _assert_same(ours: Any, theirs: np.ndarray, what: str) -> None:
    ours = np.asarray(ours)
    assert ours.dtype == theirs.dtype, what
    assert ours.shape == theirs.shape, what
    assert np.array_equal(ours, theirs), what


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_models_predict_like_the_trainer(
    case: str, client: Client, tmp_path: Path
) -> None:
    model, optimizer, kind, batch_rows = DENSE_CASES[case]
    data, X = _dense_data(tmp_path, kind)
    store = tmp_path / "run.zarr"
    trainer = dt.Trainer(model, optimizer, store=store, client=client)
    trainer.fit(data, epochs=3, batch_rows=batch_rows, progress=False)
    expected = _expected(trainer, X)

    served = dt.load_model(store)
    assert isinstance(served, dt.Predictor)
    assert served.step == trainer.step and served.n_features == N_FEATURES
    for name, values in expected.items():
        _assert_same(getattr(served, name)(X), values, f"{case} {name}")
    # Integer input is computed as float64, as by the trainer.
    _assert_same(
        served.predict(X.astype(np.int64)), trainer.predict(X.astype(np.int64)), case
    )
    assert hasattr(served, "predict_proba") is model.is_classifier
    if hasattr(model, "decision_function"):
        _assert_same(
            served.decision_function(X),
            np.asarray(model.decision_function(trainer.params, X)),
            f"{case} decision_function",
        )
    with pytest.raises(ValueError, match=f"trained on {N_FEATURES}"):
        served.predict(X[:, :-1])
    trainer.close()


SERVE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import dasktrain as dt
    from distributed import default_client

    store, inputs, outputs = sys.argv[1], sys.argv[2], sys.argv[3]
    served = dt.load_model(store)
    with np.load(inputs) as f:
        X = {k: f[k] for k in f.files} if "X" not in f.files else f["X"]
    out = {"predict": served.predict(X)}
    if hasattr(served, "predict_proba"):
        out["predict_proba"] = served.predict_proba(X)
    np.savez(outputs, **out)
    try:
        default_client()
        found = True
    except ValueError:
        found = False
    print(json.dumps({"client": found}))
    """
)


def _serve_in_fresh_interpreter(
    store: Path, X: Any, tmp: Path
) -> dict[str, np.ndarray]:
    inputs, outputs = tmp / "inputs.npz", tmp / "outputs.npz"
    np.savez(inputs, **(X if isinstance(X, dict) else {"X": X}))
    out = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, str(store), str(inputs), str(outputs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["client"] is False
    with np.load(outputs) as f:
        return {k: f[k] for k in f.files}


def test_served_in_a_process_without_a_cluster(client: Client, tmp_path: Path) -> None:
    data, X = _dense_data(tmp_path, "binary")
    store = tmp_path / "run.zarr"
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.LBFGS(),
        store=store,
        client=client,
    )
    trainer.fit(data, epochs=4, progress=False)
    served = _serve_in_fresh_interpreter(store, X, tmp_path)
    for name, values in _expected(trainer, X).items():
        _assert_same(served[name], values, name)
    trainer.close()


def _ratings(path: Path) -> dt.Dataset:
    rng = np.random.default_rng(0)
    n = 4_000
    user = np.sort(rng.integers(0, 300, size=n))
    item = rng.integers(0, 80, size=n)
    rating = rng.normal(size=n).astype(np.float32)
    return dt.Dataset.from_arrays(
        path, user=user, item=item, rating=rating, chunk_rows=1_000
    )


def _clicks(path: Path) -> dt.Dataset:
    rng = np.random.default_rng(1)
    n = 4_000
    vocab = rng.integers(0, 200, size=(n, 4)) + np.arange(4) * 200
    ids = (vocab.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(1)
    w = np.random.default_rng(7).normal(size=800)
    y = (w[vocab].sum(axis=1) + rng.logistic(size=n) > 0).astype(np.int8)
    return dt.Dataset.from_arrays(path, ids=ids.astype(np.int64), y=y, chunk_rows=1_000)


@pytest.mark.parametrize("sharded", [False, True], ids=["dense-tables", "sharded"])
@pytest.mark.parametrize("which", ["matrix-factorization", "sparse-logistic"])
def test_table_models_predict_like_the_trainer(
    which: str, sharded: bool, client: Client, tmp_path: Path
) -> None:
    model: Any
    if which == "matrix-factorization":
        data = _ratings(tmp_path / "ratings.zarr")
        model = MatrixFactorization(300, 80, 4, l2=1e-3, dtype="float64")
        batch = {"user": np.array([0, 5, 299, 5]), "item": np.array([3, 1, 79, 0])}
    else:
        data = _clicks(tmp_path / "clicks.zarr")
        model = SparseLogisticRegression(n_buckets=5_000, l2=1e-4, dtype="float64")
        batch = {"ids": np.asarray(data.read("ids", 0))[:20]}
    store = tmp_path / "run.zarr"
    trainer = dt.Trainer(
        model,
        dt.optim.Adagrad(0.2),
        store=store,
        client=client,
        sharded=sharded,
        shard_rows=64 if sharded else None,
    )
    trainer.fit(data, epochs=2, batch_rows=1_000, progress=False)
    expected = _expected(trainer, batch)
    served = dt.load_model(store)
    assert served.n_features is None
    for name, values in expected.items():
        _assert_same(getattr(served, name)(batch), values, f"{which} {name}")
    if hasattr(model, "decision_function"):
        assert hasattr(served, "decision_function")
    # In a fresh interpreter, without any cluster: the same bits.
    fresh = _serve_in_fresh_interpreter(store, batch, tmp_path)
    for name, values in expected.items():
        _assert_same(fresh[name], values, f"{which} {name} (fresh)")
    with pytest.raises(TypeError, match="mapping of fields"):
        served.predict(np.zeros((2, 3)))
    trainer.close()


def test_load_model_errors_name_the_store(client: Client, tmp_path: Path) -> None:
    missing = tmp_path / "missing.zarr"
    with pytest.raises(StoreNotFoundError, match=str(missing)):
        dt.load_model(missing)
    empty = dt.ParamStore.create(tmp_path / "empty.zarr", meta={"model": {}})
    with pytest.raises(StoreError, match=r"empty\.zarr has no committed version"):
        dt.load_model(empty.path)
