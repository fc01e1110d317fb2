"""Bringing your own data on real worker processes: Parquet tables, xarray
datasets and Zarr stores become datasets holding the same values, in the same
order, as pandas and xarray read from the same source; a Zarr store written by
xarray is trained on in place (no chunk written to it); bad inputs raise
errors naming the column or array."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from distributed import Client

import dasktrain as dt
from dasktrain.errors import DataValidationError, StoreError

pytestmark = [
    pytest.mark.cluster,
    # xarray consolidates the metadata of the stores it writes.
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
]

N_ROWS = 1_000


def _all(ds: dt.Dataset, field: str) -> np.ndarray:
    return np.concatenate([ds.read(field, c) for c in ds.chunk_ids])


def _files(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time (ns)."""
    return {
        os.path.relpath(os.path.join(d, f), root): os.stat(
            os.path.join(d, f)
        ).st_mtime_ns
        for d, _, names in os.walk(root)
        for f in names
    }


# -- Parquet ------------------------------------------------------------------


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Parquet directory of 3 files (3 partitions): two numeric features,
    an integer one, a string category and a 0/1 label."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "a": rng.normal(size=N_ROWS),
            "b": rng.normal(size=N_ROWS).astype("float32"),
            "n": rng.integers(0, 5, N_ROWS),
            "city": rng.choice(["paris", "oslo", "lima"], N_ROWS),
            "label": rng.integers(0, 2, N_ROWS).astype("int8"),
        }
    )
    root = tmp_path_factory.mktemp("parquet") / "t.parquet"
    root.mkdir()
    for i, part in enumerate(np.array_split(np.arange(N_ROWS), 3)):
        frame.iloc[part].to_parquet(root / f"part.{i}.parquet", index=False)
    return root


def test_parquet_one_hot_matches_pandas(
    client: Client, table: Path, tmp_path: Path
) -> None:
    ds = dt.Dataset.from_parquet(
        table,
        tmp_path / "d.zarr",
        features=["a", "b", "n"],
        categorical=["city"],
        label="label",
        chunk_rows=128,
    )
    frame = pd.read_parquet(table)
    assert ds.n_rows == N_ROWS and ds.chunk_rows == 128 and ds.n_chunks == 8
    assert ds.feature_names == ["a", "b", "n", "city=lima", "city=oslo", "city=paris"]
    expected = np.column_stack(
        [
            frame[["a", "b", "n"]].to_numpy("float32"),
            *[
                (frame["city"] == c).to_numpy("float32")
                for c in ("lima", "oslo", "paris")
            ],
        ]
    )
    np.testing.assert_array_equal(_all(ds, "X"), expected)
    np.testing.assert_array_equal(_all(ds, "y"), frame["label"].to_numpy())
    assert ds.fields["y"].dtype == "int8"
    # The stored encoding turns new rows into the same columns.
    np.testing.assert_array_equal(ds.encode(frame.iloc[:7])["X"], expected[:7])
    # And the dataset trains.
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.LBFGS(),
        store=tmp_path / "run.zarr",
        client=client,
    )
    trainer.fit(ds, epochs=3, progress=False)
    assert trainer.params["w"].shape == (6,)
    trainer.close()


def test_parquet_hashed_features_match_the_encoding(
    client: Client, table: Path, tmp_path: Path
) -> None:
    ds = dt.Dataset.from_parquet(
        table,
        tmp_path / "h.zarr",
        features=["a"],
        categorical=["city", "n"],
        encoding="hash",
        n_buckets=64,
        label="label",
        chunk_rows=300,
    )
    frame = pd.read_parquet(table)
    ids, values = _all(ds, "ids"), _all(ds, "values")
    assert ids.shape == (N_ROWS, 3) and ids.dtype == np.int64
    assert ((ids >= 0) & (ids < 64)).all()
    # One id per category: rows with the same city share it.
    for city in ("paris", "oslo", "lima"):
        assert len(np.unique(ids[frame["city"].to_numpy() == city, 1])) == 1
    assert len(np.unique(ids[:, 0])) == 1  # the numeric column's own id
    np.testing.assert_array_equal(values[:, 0], frame["a"].to_numpy("float32"))
    np.testing.assert_array_equal(values[:, 1:], 1.0)
    np.testing.assert_array_equal(ds.encode(frame)["ids"], ids)
    trainer = dt.Trainer(
        dt.models.SparseLogisticRegression(64, use_values=True),
        dt.optim.Adam(learning_rate=0.05),
        store=tmp_path / "run.zarr",
        client=client,
    )
    trainer.fit(ds, epochs=1, batch_rows=100, progress=False)
    assert trainer.predict(ds.encode(frame.iloc[:5])).shape == (5,)
    trainer.close()


def test_parquet_id_columns_feed_matrix_factorization(
    client: Client, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    n = 600
    frame = pd.DataFrame(
        {
            "user": rng.choice([f"u{i}" for i in range(30)], n),
            "item": rng.choice(["apple", "pear", "fig", "kiwi", "plum"], n),
            "stars": rng.integers(1, 6, n).astype("float32"),
        }
    )
    frame.loc[7, "item"] = None
    frame.to_parquet(tmp_path / "r.parquet", index=False)
    with pytest.raises(DataValidationError, match=r"column 'item' has NaN .* row 7\b"):
        dt.Dataset.from_parquet(
            tmp_path / "r.parquet",
            tmp_path / "bad.zarr",
            ids=["user", "item"],
            label="stars",
            label_field="rating",
        )
    ds = dt.Dataset.from_parquet(
        tmp_path / "r.parquet",
        tmp_path / "r.zarr",
        ids=["user", "item"],
        label="stars",
        label_field="rating",
        chunk_rows=128,
        nan="drop",
    )
    assert sorted(ds.fields) == ["item", "rating", "user"]
    assert ds.fields["user"].dtype == "int64" and ds.n_rows == n - 1
    cats = ds.provenance["encoding"]["ids"]
    assert cats["item"] == ["apple", "fig", "kiwi", "pear", "plum"]
    clean = frame.drop(index=7)
    np.testing.assert_array_equal(
        np.asarray(cats["user"])[_all(ds, "user")], clean["user"].to_numpy()
    )
    np.testing.assert_array_equal(
        np.asarray(cats["item"])[_all(ds, "item")], clean["item"].to_numpy()
    )
    np.testing.assert_array_equal(_all(ds, "rating"), clean["stars"].to_numpy())
    model = dt.models.MatrixFactorization(len(cats["user"]), len(cats["item"]), rank=2)
    trainer = dt.Trainer(
        model, dt.optim.Adagrad(0.1), store=tmp_path / "mf.zarr", client=client
    )
    trainer.fit(ds, epochs=1, batch_rows=128, progress=False)
    new = pd.DataFrame({"user": ["u3", "u9"], "item": ["fig", "plum"]})
    encoded = ds.encode(new)
    assert encoded["item"].tolist() == [1, 4]
    assert trainer.predict(encoded).shape == (2,)
    trainer.close()


def test_parquet_nan_raise_names_column_and_row_drop_matches_pandas(
    client: Client, tmp_path: Path
) -> None:
    frame = pd.DataFrame(
        {
            "a": np.arange(20.0),
            "c": ["u", "v"] * 10,
            "y": np.arange(20) % 2,
        }
    )
    frame.loc[13, "a"] = np.nan
    frame.loc[4, "c"] = None
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    with pytest.raises(DataValidationError, match=r"column 'c' has NaN .* row 4\b"):
        dt.Dataset.from_parquet(
            tmp_path / "t.parquet",
            tmp_path / "bad.zarr",
            features=["a"],
            categorical=["c"],
            label="y",
            chunk_rows=8,
        )
    assert not (tmp_path / "bad.zarr").exists()  # nothing written
    ds = dt.Dataset.from_parquet(
        tmp_path / "t.parquet",
        tmp_path / "ok.zarr",
        features=["a"],
        categorical=["c"],
        label="y",
        chunk_rows=8,
        nan="drop",
    )
    clean = frame.dropna()
    assert ds.n_rows == 18
    np.testing.assert_array_equal(_all(ds, "X")[:, 0], clean["a"].to_numpy("float32"))
    np.testing.assert_array_equal(_all(ds, "y"), clean["y"].to_numpy())


def test_parquet_bad_columns(client: Client, table: Path, tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"no column\(s\) \['nope'\]"):
        dt.Dataset.from_parquet(
            table, tmp_path / "x.zarr", features=["a", "nope"], chunk_rows=10
        )
    with pytest.raises(DataValidationError, match=r"column 'city' .*non-numeric"):
        dt.Dataset.from_parquet(
            table, tmp_path / "x.zarr", features=["a", "city"], chunk_rows=10
        )
    with pytest.raises(ValueError, match="nan must be one of"):
        dt.Dataset.from_parquet(
            table, tmp_path / "x.zarr", features=["a"], chunk_rows=10, nan="skip"
        )
    assert not (tmp_path / "x.zarr").exists()


# -- xarray -------------------------------------------------------------------


def _grid(n_time: int = 60) -> xr.Dataset:
    """Two feature variables with the sample dimension ``time`` last (one of
    them also has a ``level`` dimension) and a label over time."""
    rng = np.random.default_rng(1)
    return xr.Dataset(
        {
            "t2m": (("level", "time"), rng.normal(size=(3, n_time))),
            "u10": (("time",), rng.normal(size=n_time).astype("float32")),
            "rain": (("time",), rng.integers(0, 2, n_time).astype("int8")),
        },
        coords={"time": np.arange(n_time), "level": [1000, 850, 500]},
    )


def test_xarray_sample_dim_not_first(client: Client, tmp_path: Path) -> None:
    grid = _grid().chunk({"time": 16})
    ds = dt.Dataset.from_xarray(
        grid,
        tmp_path / "d.zarr",
        features=["t2m", "u10"],
        label="rain",
        sample_dims="time",
        chunk_rows=25,
    )
    expected = np.column_stack(
        [grid["t2m"].transpose("time", "level").values, grid["u10"].values]
    ).astype("float32")
    assert ds.n_rows == 60 and ds.n_chunks == 3
    np.testing.assert_array_equal(_all(ds, "X"), expected)
    np.testing.assert_array_equal(_all(ds, "y"), grid["rain"].values)
    assert ds.feature_names == ["t2m", "t2m", "t2m", "u10"]


def test_xarray_several_sample_dims(client: Client, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    field = xr.Dataset(
        {
            "a": (("lat", "time", "lon"), rng.normal(size=(4, 5, 6))),
            "b": (("time", "lat", "lon"), rng.normal(size=(5, 4, 6))),
        }
    )
    ds = dt.Dataset.from_xarray(
        field,
        tmp_path / "d.zarr",
        features=["a", "b"],
        sample_dims=("time", "lat", "lon"),
        chunk_rows=32,
        dtype="float64",
    )
    stacked = field.stack(row=("time", "lat", "lon"))
    expected = np.column_stack([stacked["a"].values, stacked["b"].values])
    np.testing.assert_array_equal(_all(ds, "X"), expected)


def test_xarray_errors(client: Client, tmp_path: Path) -> None:
    grid = _grid()
    with pytest.raises(DataValidationError, match=r"no variable\(s\) \['v10'\]"):
        dt.Dataset.from_xarray(
            grid, tmp_path / "x.zarr", features=["v10"], sample_dims="time"
        )
    with pytest.raises(DataValidationError, match=r"'u10' .* lacks .*\['level'\]"):
        dt.Dataset.from_xarray(
            grid, tmp_path / "x.zarr", features=["u10"], sample_dims="level"
        )
    words = grid.assign(word=("time", np.array(["x"] * 60)))
    with pytest.raises(DataValidationError, match=r"variable 'word' .*non-numeric"):
        dt.Dataset.from_xarray(
            words, tmp_path / "x.zarr", features=["word"], sample_dims="time"
        )
    holes = grid.copy(deep=True)
    holes["u10"][17] = np.nan
    with pytest.raises(DataValidationError, match=r"column 'u10' has NaN .* row 17\b"):
        dt.Dataset.from_xarray(
            holes, tmp_path / "x.zarr", features=["t2m", "u10"], sample_dims="time"
        )
    dropped = dt.Dataset.from_xarray(
        holes,
        tmp_path / "x.zarr",
        features=["t2m", "u10"],
        sample_dims="time",
        nan="drop",
        chunk_rows=7,
    )
    assert dropped.n_rows == 59


# -- Zarr: in place and rechunked ---------------------------------------------


@pytest.fixture
def xr_store(tmp_path: Path) -> tuple[Path, xr.Dataset]:
    """A Zarr store written by xarray: the ``time`` axis chunked by 16, last
    in ``t2m``."""
    rng = np.random.default_rng(3)
    n = 200
    t = rng.normal(size=(2, n)).astype("float32")
    u = rng.normal(size=n).astype("float32")
    y = ((t[0] - u + 0.3 * rng.normal(size=n)) > 0).astype("int8")
    grid = xr.Dataset(
        {
            "t2m": (("level", "time"), t),
            "u10": (("time",), u),
            "rain": (("time",), y),
        },
        coords={"time": np.arange(n), "level": [850, 500]},
    )
    path = tmp_path / "era.zarr"
    grid.chunk({"time": 16}).to_zarr(path, mode="w")
    return path, grid


def test_zarr_written_by_xarray_trains_in_place(
    client: Client, xr_store: tuple[Path, xr.Dataset], tmp_path: Path
) -> None:
    path, grid = xr_store
    before = _files(path)
    fields = {"X": ["t2m", "u10"], "y": "rain"}
    ds = dt.Dataset.from_zarr(path, fields=fields, sample_dim="time")
    assert ds.in_place and ds.codec == "in-place"
    assert ds.n_rows == 200 and ds.chunk_rows == 16 and ds.n_chunks == 13
    assert ds.fields["X"] == dt.data.FieldInfo((3,), "float32")
    reread = xr.open_zarr(path)
    expected = np.column_stack(
        [reread["t2m"].transpose("time", "level").values, reread["u10"].values]
    )
    np.testing.assert_array_equal(_all(ds, "X"), expected)
    np.testing.assert_array_equal(_all(ds, "y"), grid["rain"].values)
    # The same call describes the same dataset (a resumed run accepts it).
    assert dt.Dataset.from_zarr(path, fields=fields, sample_dim="time") == ds

    train, val = ds.split(0.25, seed=0)
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.Newton(),
        store=tmp_path / "run.zarr",
        client=client,
    )
    trainer.fit(train, epochs=5, progress=False)
    assert trainer.evaluate(val)["accuracy"] > 0.7
    trainer.close()
    assert _files(path) == before  # nothing written to the source store


def test_zarr_v2_store_written_by_xarray_is_read_in_place(
    client: Client, xr_store: tuple[Path, xr.Dataset], tmp_path: Path
) -> None:
    _, grid = xr_store
    path = tmp_path / "v2.zarr"
    grid.chunk({"time": 40}).to_zarr(path, mode="w", zarr_format=2)
    before = _files(path)
    ds = dt.Dataset.from_zarr(
        path, fields={"X": ["u10", "t2m"], "y": "rain"}, sample_dim="time"
    )
    assert ds.in_place and ds.chunk_rows == 40 and ds.n_chunks == 5
    expected = np.column_stack(
        [grid["u10"].values, grid["t2m"].transpose("time", "level").values]
    )
    np.testing.assert_array_equal(ds.to_dask("X").compute(), expected)
    np.testing.assert_array_equal(ds.to_dask("y").compute(), grid["rain"].values)
    assert _files(path) == before


def test_zarr_in_place_matches_the_copy_and_rechunks_when_needed(
    client: Client, tmp_path: Path
) -> None:
    rng = np.random.default_rng(4)
    root = zarr.open_group(tmp_path / "src.zarr", mode="w")
    a = root.create_array("a", shape=(100, 4), chunks=(10, 2), dtype="float64")
    a[:] = rng.normal(size=(100, 4))
    b = root.create_array("b", shape=(100,), chunks=(30,), dtype="int32")
    b[:] = rng.integers(0, 9, 100)
    before = _files(tmp_path / "src.zarr")
    with pytest.raises(
        DataValidationError, match=r"not chunked alike .*'a': 10, 'b': 30.*store="
    ):
        dt.Dataset.from_zarr(tmp_path / "src.zarr", fields={"X": "a", "y": "b"})
    copy = dt.Dataset.from_zarr(
        tmp_path / "src.zarr",
        fields={"X": ["a", "b"], "y": "b"},
        store=tmp_path / "copy.zarr",
        chunk_rows=25,
    )
    assert not copy.in_place and copy.chunk_rows == 25 and copy.codec == "lz4"
    np.testing.assert_array_equal(
        _all(copy, "X"), np.column_stack([a[:], b[:].astype("float64")])
    )
    np.testing.assert_array_equal(_all(copy, "y"), b[:])
    assert _files(tmp_path / "src.zarr") == before
    in_place = dt.Dataset.from_zarr(tmp_path / "src.zarr", fields={"X": "a"})
    np.testing.assert_array_equal(_all(in_place, "X"), a[:])


def test_zarr_errors(client: Client, tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "src.zarr", mode="w")
    root.create_array("a", shape=(10, 2), chunks=(5, 2), dtype="float32")[:] = 1.0
    root.create_array("short", shape=(9,), chunks=(5,), dtype="float32")[:] = 0.0
    root.create_array("when", shape=(10,), chunks=(5,), dtype="datetime64[s]")
    src = tmp_path / "src.zarr"
    with pytest.raises(DataValidationError, match=r"no array 'nope' .*arrays: a, "):
        dt.Dataset.from_zarr(src, fields={"X": "a", "y": "nope"})
    with pytest.raises(DataValidationError, match=r"'when' .*non-numeric"):
        dt.Dataset.from_zarr(src, fields={"X": "a", "y": "when"})
    with pytest.raises(DataValidationError, match=r"'a' \(10 rows\) and 'short' \(9"):
        dt.Dataset.from_zarr(src, fields={"X": "a", "y": "short"})
    with pytest.raises(DataValidationError, match=r"'a' .*no dimension 'time'"):
        dt.Dataset.from_zarr(src, fields={"X": "a"}, sample_dim="time")
    with pytest.raises(DataValidationError, match="nan='drop' removes rows"):
        dt.Dataset.from_zarr(src, fields={"X": "a"}, nan="drop")
    # A source array replaced after the dataset was described is refused.
    ds = dt.Dataset.from_zarr(src, fields={"X": "a"})
    root.create_array(
        "a", shape=(10, 3), chunks=(5, 3), dtype="float32", overwrite=True
    )
    dt.data.io.clear_handle_cache()
    with pytest.raises(StoreError, match=r"array 'a' .*has changed"):
        ds.read("X", 0)
