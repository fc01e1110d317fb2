"""Synthetic generators on a real process cluster (fixtures in tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import Client

from dasktrain.data import Dataset
from dasktrain.data.io import ATTRS_KEY
from dasktrain.datasets import (
    ClassificationSpec,
    classification_chunk,
    classification_coefficients,
    make_classification,
    make_regression,
    regression_coefficients,
)
from dasktrain.errors import StoreError

pytestmark = pytest.mark.cluster


def _all(ds: Dataset, field: str) -> np.ndarray:
    return np.concatenate([ds.read(field, c) for c in ds.chunk_ids])


def _mtimes(path: Path) -> dict[str, int]:
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(path)
        for f in files
    }


def test_same_data_with_one_and_two_workers(
    tmp_path: Path, client: Client, make_client: Callable[[int], Client]
) -> None:
    options = {"n_rows": 5_000, "n_features": 6, "chunk_rows": 700, "progress": False}
    single = make_client(1)
    two = make_classification(tmp_path / "two.zarr", client=client, **options)
    one = make_classification(tmp_path / "one.zarr", client=single, **options)
    assert two.n_chunks == one.n_chunks == 8
    assert two.uuid != one.uuid
    for field in ("X", "y"):
        np.testing.assert_array_equal(_all(one, field), _all(two, field))
    assert one.fields["X"].dtype == "float32" and one.fields["y"].dtype == "int8"

    reg_two = make_regression(tmp_path / "r2.zarr", client=client, **options)
    reg_one = make_regression(tmp_path / "r1.zarr", client=single, **options)
    for field in ("X", "y"):
        np.testing.assert_array_equal(_all(reg_one, field), _all(reg_two, field))


def test_chunks_depend_on_seed_and_chunk_id_only(
    tmp_path: Path, client: Client
) -> None:
    ds = make_classification(
        tmp_path / "d.zarr",
        n_rows=1_000,
        n_features=3,
        chunk_rows=300,
        seed=5,
        client=client,
        progress=False,
    )
    spec = ClassificationSpec(seed=5, n_features=3, n_classes=2, noise=1.0)
    X, y = classification_chunk(spec, 3, 100)
    np.testing.assert_array_equal(ds.read("X", 3), X)
    np.testing.assert_array_equal(ds.read("y", 3), y)
    other = make_classification(
        tmp_path / "e.zarr",
        n_rows=1_000,
        n_features=3,
        chunk_rows=300,
        seed=6,
        client=client,
        progress=False,
    )
    assert not np.array_equal(other.read("X", 0), ds.read("X", 0))


def test_existing_store_is_reused(tmp_path: Path, client: Client) -> None:
    path = tmp_path / "d.zarr"
    options = {"n_rows": 2_000, "n_features": 4, "chunk_rows": 500, "progress": False}
    first = make_classification(path, client=client, **options)
    X_first = _all(first, "X")
    before = _mtimes(path)
    again = make_classification(str(path), client=client, **options)
    assert again.uuid == first.uuid
    assert _mtimes(path) == before

    fresh = make_classification(path, client=client, overwrite=True, **options)
    assert fresh.uuid != first.uuid
    np.testing.assert_array_equal(_all(fresh, "X"), X_first)
    with pytest.raises(StoreError, match="changed since it was opened"):
        first.read("X", 0)


def test_different_parameters_are_refused(tmp_path: Path, client: Client) -> None:
    path = tmp_path / "d.zarr"
    options = {"n_rows": 2_000, "chunk_rows": 500, "progress": False, "client": client}
    first = make_classification(path, n_features=4, **options)
    before = _mtimes(path)
    with pytest.raises(StoreError, match=r"d\.zarr.*n_features: stored 4, requested 5"):
        make_classification(path, n_features=5, **options)
    with pytest.raises(StoreError, match=r"d\.zarr.*seed: stored 0, requested 1"):
        make_classification(path, n_features=4, seed=1, **options)
    with pytest.raises(
        StoreError, match=r"d\.zarr.*name: stored 'make_classification'"
    ):
        make_regression(path, n_features=4, **options)
    assert _mtimes(path) == before

    replaced = make_classification(path, n_features=5, overwrite=True, **options)
    assert replaced.uuid != first.uuid and replaced.n_features == 5


def test_store_from_elsewhere_is_refused(tmp_path: Path, client: Client) -> None:
    path = tmp_path / "d.zarr"
    Dataset.from_arrays(path, X=np.zeros((10, 4), np.float32), chunk_rows=5)
    with pytest.raises(
        StoreError, match=r"d\.zarr.*not written by make_classification"
    ):
        make_classification(
            path, n_rows=10, n_features=4, client=client, progress=False
        )
    (tmp_path / "notes").mkdir()
    with pytest.raises(StoreError, match=r"notes.*not a dasktrain dataset store"):
        make_classification(
            tmp_path / "notes", n_rows=10, overwrite=True, client=client, progress=False
        )


def test_interrupted_generation_is_redone(tmp_path: Path, client: Client) -> None:
    path = tmp_path / "d.zarr"
    options = {"n_rows": 1_000, "n_features": 3, "chunk_rows": 300, "progress": False}
    first = make_classification(path, client=client, **options)
    X_first = _all(first, "X")
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs[ATTRS_KEY])  # type: ignore[arg-type]
    meta["complete"] = False
    group.attrs[ATTRS_KEY] = meta
    os.remove(path / "X" / "c" / "2" / "0")
    with pytest.raises(StoreError, match="incomplete"):
        Dataset.open(path)

    redone = make_classification(path, client=client, **options)
    assert redone.uuid != first.uuid
    np.testing.assert_array_equal(_all(redone, "X"), X_first)


def test_invalid_parameters_create_nothing(tmp_path: Path, client: Client) -> None:
    for bad, error in [
        ({"n_rows": 0}, ValueError),
        ({"n_rows": 10, "n_classes": 1}, ValueError),
        ({"n_rows": 10, "noise": -1.0}, ValueError),
        ({"n_rows": 10, "codec": "gzip"}, ValueError),
        ({"n_rows": 10, "seed": -1}, ValueError),
        ({"n_rows": 10.0}, TypeError),
    ]:
        with pytest.raises(error):
            make_classification(
                tmp_path / "d.zarr", client=client, progress=False, **bad
            )
    assert not os.listdir(tmp_path)


def test_binary_labels_and_provenance(tmp_path: Path, client: Client) -> None:
    ds = make_classification(
        tmp_path / "d.zarr",
        n_rows=40_000,
        n_features=8,
        chunk_rows=8_192,
        seed=2,
        client=client,
        progress=False,
    )
    y = _all(ds, "y")
    assert set(np.unique(y)) == {0, 1}
    assert 0.3 < y.mean() < 0.7
    prov = ds.provenance
    assert prov["source"] == "dasktrain.datasets.make_classification"
    assert prov["generator"]["n_rows"] == 40_000 and prov["generator"]["seed"] == 2
    assert prov["class_counts"] == [int((y == 0).sum()), int((y == 1).sum())]
    w, b = classification_coefficients(2, 8, 2)
    np.testing.assert_array_equal(prov["coefficients"]["w"], w)
    assert prov["coefficients"]["b"] == float(b)

    # The labels follow sigmoid(X w + b): the Bayes classifier is ~0.9 accurate.
    X = _all(ds, "X")
    bayes = np.mean(((X @ w + b) > 0) == y)
    assert 0.87 < bayes < 0.93


def test_multiclass_labels(tmp_path: Path, client: Client) -> None:
    ds = make_classification(
        tmp_path / "d.zarr",
        n_rows=30_000,
        n_features=10,
        n_classes=4,
        chunk_rows=10_000,
        client=client,
        progress=False,
    )
    y = _all(ds, "y")
    counts = np.bincount(y, minlength=4)
    assert counts.size == 4
    assert (counts > 0.5 * 30_000 / 4).all()
    W, b = classification_coefficients(0, 10, 4)
    bayes = np.mean(np.argmax(_all(ds, "X") @ W + b, axis=1) == y)
    assert 0.87 < bayes < 0.93
    assert ds.provenance["class_counts"] == counts.tolist()


def test_noise_zero_gives_clean_labels(tmp_path: Path, client: Client) -> None:
    ds = make_classification(
        tmp_path / "d.zarr",
        n_rows=5_000,
        n_features=5,
        noise=0.0,
        chunk_rows=2_500,
        client=client,
        progress=False,
    )
    w, b = classification_coefficients(0, 5, 2)
    np.testing.assert_array_equal(_all(ds, "y"), (_all(ds, "X") @ w + b > 0))


def test_logistic_regression_learns_the_generated_data(
    tmp_path: Path, client: Client
) -> None:
    from sklearn.linear_model import LogisticRegression

    ds = make_classification(
        tmp_path / "d.zarr",
        n_rows=30_000,
        n_features=20,
        chunk_rows=3_000,
        client=client,
        progress=False,
    )
    train, test = ds.split(0.3, seed=0)
    # Sync point: the workers read the chunks through Dataset.to_dask.
    X_train, y_train, X_test, y_test = client.gather(
        client.compute(
            [
                train.to_dask("X"),
                train.to_dask("y"),
                test.to_dask("X"),
                test.to_dask("y"),
            ]
        )
    )
    assert X_train.shape == (train.n_rows, 20) and y_test.shape == (test.n_rows,)
    model = LogisticRegression(max_iter=1_000).fit(X_train, y_train)
    accuracy = model.score(X_test, y_test)
    assert 0.8 < accuracy < 0.95


def test_regression_coefficients_are_recovered(tmp_path: Path, client: Client) -> None:
    from sklearn.linear_model import LinearRegression

    ds = make_regression(
        tmp_path / "d.zarr",
        n_rows=20_000,
        n_features=5,
        noise=0.5,
        chunk_rows=4_096,
        client=client,
        progress=False,
    )
    assert ds.fields["y"].dtype == "float32"
    model = LinearRegression().fit(_all(ds, "X"), _all(ds, "y"))
    w, b = regression_coefficients(0, 5)
    np.testing.assert_allclose(model.coef_, w, atol=0.02)
    assert abs(model.intercept_ - b) < 0.02
    np.testing.assert_allclose(ds.provenance["coefficients"]["w"], w)


def test_large_coefficients_are_not_stored(tmp_path: Path, client: Client) -> None:
    ds = make_classification(
        tmp_path / "d.zarr",
        n_rows=100,
        n_features=600,
        n_classes=3,
        chunk_rows=50,
        client=client,
        progress=False,
    )
    assert "coefficients" not in ds.provenance
    assert sum(ds.provenance["class_counts"]) == 100


def test_from_dask_on_the_cluster(tmp_path: Path, client: Client) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3_000, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=3_000)
    # dask.compute uses the fixture's client, the default one, for the writes.
    ds = Dataset.from_dask(
        tmp_path / "d.zarr",
        X=da.from_array(X, chunks=(1_000, 4)),
        y=da.from_array(y, chunks=700),
        chunk_rows=512,
        codec="zstd",
    )
    assert ds.n_chunks == 6
    np.testing.assert_array_equal(_all(ds, "X"), X)
    np.testing.assert_array_equal(_all(ds, "y"), y)
