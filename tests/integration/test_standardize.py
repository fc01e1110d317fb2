"""Standardization inside the run, on real worker processes: statistics from
one pass of the fixed tree, stored in the parameter store, and applied by
fit, evaluate, predict (numpy, dask, Dataset), Trainer.resume and the
scikit-learn estimators; a run with standardize=True trains the same bits as
a run without it on data standardized beforehand with the same numbers."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from distributed import Client

import dasktrain as dt
from dasktrain.errors import ConfigMismatchError
from dasktrain.preprocessing import Standardize
from dasktrain.sklearn import LogisticRegression as SkLogisticRegression

pytestmark = pytest.mark.cluster

N_ROWS, N_FEATURES, CHUNK_ROWS = 3_000, 4, 500
#: Features far from standard: offsets and scales from 1e-2 to 1e3 (column 1
#: sits 5,000 stds from zero: its statistics take a second pass).
OFFSETS = np.array([1e3, -50.0, 0.0, 40.0])
SCALES = np.array([1e3, 1e-2, 1.0, 30.0])


def _arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(N_ROWS, N_FEATURES))
    y = Z @ [1.0, -2.0, 0.5, 1.0] + 0.5 * rng.logistic(size=N_ROWS) > 0
    X = (Z * SCALES + OFFSETS).astype(np.float32)
    return X, y.astype(np.int8)


def _trainer(store: Path, client: Client, **kwargs: object) -> dt.Trainer:
    return dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.Adam(learning_rate=0.05),
        store=store,
        client=client,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dt.Dataset:
    X, y = _arrays()
    path = tmp_path_factory.mktemp("std") / "raw.zarr"
    return dt.Dataset.from_arrays(path, X=X, y=y, chunk_rows=CHUNK_ROWS)


def test_statistics_stored_and_applied_everywhere(
    client: Client, raw: dt.Dataset, tmp_path: Path
) -> None:
    X, y = _arrays()
    train, val = raw.split(0.34, seed=0)
    trainer = _trainer(tmp_path / "std.zarr", client, standardize=True)
    trainer.fit(train, epochs=2, batch_rows=250, validation=val, progress=False)

    # One pass over the training chunks, in float64: numpy's mean and std.
    rows = np.concatenate([raw.read("X", c) for c in train.chunk_ids]).astype(float)
    meta = dt.ParamStore.open(tmp_path / "std.zarr").meta
    stats = meta["preprocessing"]["standardize"]
    np.testing.assert_allclose(stats["mean"], rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], rows.std(axis=0), rtol=1e-10)
    fitted = trainer.standardize
    assert fitted is not None and fitted.mean == tuple(stats["mean"])

    # The same run on data standardized beforehand with the same numbers.
    Xs = fitted.transform(X)
    manual_ds = dt.Dataset.from_arrays(
        tmp_path / "manual.zarr", X=Xs, y=y, chunk_rows=CHUNK_ROWS
    )
    manual_train = manual_ds.subset(train.chunk_ids)
    manual_val = manual_ds.subset(val.chunk_ids)
    manual = _trainer(tmp_path / "manual-run.zarr", client)
    manual.fit(
        manual_train, epochs=2, batch_rows=250, validation=manual_val, progress=False
    )
    for name in ("w", "b"):
        np.testing.assert_array_equal(trainer.params[name], manual.params[name])
    val_losses = trainer.history.to_pandas()["val_loss"].dropna()
    assert len(val_losses) == 2
    np.testing.assert_array_equal(
        val_losses, manual.history.to_pandas()["val_loss"].dropna()
    )

    # evaluate and predict take raw data.
    assert trainer.evaluate(val) == manual.evaluate(manual_val)
    np.testing.assert_array_equal(
        trainer.predict_proba(X[:50]), manual.predict_proba(Xs[:50])
    )
    np.testing.assert_array_equal(
        trainer.predict(da.from_array(X, chunks=700)).compute(), manual.predict(Xs)
    )
    np.testing.assert_array_equal(
        trainer.predict(val).compute(), manual.predict(manual_val).compute()
    )
    trainer.close()

    # Resumed: the statistics come from the store, and the run continues to
    # the same bits as the run on standardized data.
    resumed = dt.Trainer.resume(tmp_path / "std.zarr", client=client)
    assert resumed.standardize == fitted
    np.testing.assert_array_equal(resumed.predict(X[:50]), manual.predict(Xs[:50]))
    resumed.fit(train, epochs=3, batch_rows=250, validation=val, progress=False)
    manual.fit(
        manual_train, epochs=3, batch_rows=250, validation=manual_val, progress=False
    )
    np.testing.assert_array_equal(resumed.params["w"], manual.params["w"])
    # Served without a cluster: the same statistics, the same predictions.
    served = dt.load_model(tmp_path / "std.zarr")
    np.testing.assert_array_equal(served.predict(X[:50]), resumed.predict(X[:50]))
    np.testing.assert_array_equal(served.predict(X[:50]), manual.predict(Xs[:50]))
    resumed.close()
    manual.close()

    # A trainer without the option cannot continue a standardized run.
    with pytest.raises(ConfigMismatchError, match="standardize="):
        _trainer(tmp_path / "std.zarr", client)


def test_some_columns_and_newton(
    client: Client, raw: dt.Dataset, tmp_path: Path
) -> None:
    X, _ = _arrays()
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.Newton(),
        store=tmp_path / "cols.zarr",
        client=client,
        standardize=Standardize(columns=[0, 1]),
    )
    trainer.fit(raw, epochs=10, progress=False)
    fitted = trainer.standardize
    assert fitted is not None and fitted.mean is not None and fitted.std is not None
    np.testing.assert_allclose(fitted.mean[:2], X.astype(float).mean(axis=0)[:2])
    np.testing.assert_allclose(fitted.std[:2], X.astype(float).std(axis=0)[:2])
    assert fitted.mean[2:] == (0.0, 0.0) and fitted.std[2:] == (1.0, 1.0)
    # Column 1 (scale 1e-2) carries signal that l2 hides unless it is scaled.
    assert trainer.evaluate(raw)["accuracy"] > 0.85
    trainer.close()
    with pytest.raises(ValueError, match="standardize applies to models that read X"):
        dt.Trainer(
            dt.models.SparseLogisticRegression(16),
            dt.optim.Adam(0.1),
            store=tmp_path / "sparse.zarr",
            client=client,
            standardize=True,
        )


def test_sklearn_estimator_standardizes_and_takes_dataframes(
    client: Client, tmp_path: Path
) -> None:
    import dask.dataframe as dd

    X, y = _arrays()
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    clf = SkLogisticRegression(C=10.0, standardize=True).fit(frame, pd.Series(y))
    assert clf.score(frame, y) > 0.85
    assert list(clf.feature_names_in_) == ["a", "b", "c", "d"]
    # A Dask DataFrame trains the same run, never gathered on the client.
    lazy = dd.from_pandas(frame, npartitions=3)
    lazy_clf = SkLogisticRegression(C=10.0, standardize=True).fit(
        lazy, dd.from_pandas(pd.Series(y), npartitions=3)
    )
    assert list(lazy_clf.feature_names_in_) == ["a", "b", "c", "d"]
    np.testing.assert_allclose(lazy_clf.coef_, clf.coef_, rtol=1e-10)
    # (float32 products in blocks of other sizes: last-bit differences)
    np.testing.assert_allclose(
        lazy_clf.predict_proba(lazy).compute(), clf.predict_proba(frame), rtol=1e-5
    )
    with pytest.raises(ValueError, match="non-numeric columns"):
        SkLogisticRegression().fit(lazy.assign(w="x"), y)
    # The scaler inside the run equals a StandardScaler in front of it.
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    piped = make_pipeline(StandardScaler(), SkLogisticRegression(C=10.0)).fit(X, y)
    np.testing.assert_allclose(
        clf.predict_proba(frame), piped.predict_proba(X), rtol=1e-4, atol=1e-5
    )
