"""Dataset stores: format round trips, validation, views and worker-side I/O.

Every test writes real Zarr stores under ``tmp_path``; no cluster.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

from dasktrain.data import CODECS, DEFAULT_CODEC, Dataset, DatasetRef
from dasktrain.data.io import (
    ATTRS_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    check_finite,
    clear_handle_cache,
    create_store,
    finalize_store,
    read_chunk,
    write_chunk,
)
from dasktrain.errors import (
    DataValidationError,
    NonFiniteDataError,
    StoreError,
    StoreNotFoundError,
)
from dasktrain.schema import FieldInfo, Schema

N_ROWS = 1_000
CHUNK_ROWS = 128  # 8 chunks, the last one 104 rows
N_FEATURES = 5


@pytest.fixture(autouse=True)
def _fresh_handles() -> None:
    clear_handle_cache()


def _arrays(
    x_dtype: str = "float32", y_width: int | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N_ROWS, N_FEATURES)).astype(x_dtype)
    if y_width is None:
        y = (X[:, 0] > 0).astype(np.int8)
    else:
        y = rng.standard_normal((N_ROWS, y_width)).astype(np.float32)
    return {"X": X, "y": y}


def _write(path: Path, **options: Any) -> Dataset:
    arrays = options.pop("arrays", None) or _arrays()
    options.setdefault("chunk_rows", CHUNK_ROWS)
    return Dataset.from_arrays(path, **options, **arrays)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with contents) and directory under ``root``."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root)] = fh.read()
    return out


def _root_attrs(path: Path) -> dict[str, Any]:
    with open(path / "zarr.json") as f:
        meta: dict[str, Any] = json.load(f)["attributes"][ATTRS_KEY]
    return meta


def _set_root_attrs(path: Path, meta: dict[str, Any]) -> None:
    group = zarr.open_group(str(path), mode="r+")
    group.attrs[ATTRS_KEY] = meta


# -- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("x_dtype", ["float32", "float64"])
@pytest.mark.parametrize("y_width", [None, 3])
def test_round_trip(
    tmp_path: Path, codec: str, x_dtype: str, y_width: int | None
) -> None:
    arrays = _arrays(x_dtype, y_width)
    ds = _write(tmp_path / "d.zarr", arrays=arrays, codec=codec)

    assert ds.codec == codec
    assert ds.n_rows == N_ROWS
    assert ds.n_chunks == math.ceil(N_ROWS / CHUNK_ROWS) == 8
    assert ds.chunk_rows == CHUNK_ROWS
    assert ds.n_features == N_FEATURES
    assert ds.chunk_ids == tuple(range(8))
    assert ds.chunk_bounds(7) == (896, N_ROWS)
    assert ds.chunk_n_rows(7) == 104
    assert ds.fields["X"] == FieldInfo((N_FEATURES,), x_dtype)
    y_shape = () if y_width is None else (y_width,)
    assert ds.fields["y"] == FieldInfo(y_shape, arrays["y"].dtype.name)
    assert ds.schema == Schema(ds.fields)
    assert ds.nbytes == arrays["X"].nbytes + arrays["y"].nbytes

    reopened = Dataset.open(tmp_path / "d.zarr")
    assert reopened == ds
    for name, expected in arrays.items():
        parts = [reopened.read(name, c) for c in reopened.chunk_ids]
        assert [p.shape[0] for p in parts] == [128] * 7 + [104]
        got = np.concatenate(parts)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        dask_got = reopened.to_dask(name).compute(scheduler="synchronous")
        np.testing.assert_array_equal(dask_got, expected)


def test_codecs_on_disk(tmp_path: Path) -> None:
    expected = {
        "none": [{"name": "crc32c"}],
        "zstd": [{"name": "zstd", "level": 1}, {"name": "crc32c"}],
        "lz4": [
            {"name": "blosc", "cname": "lz4", "shuffle": "noshuffle"},
            {"name": "crc32c"},
        ],
    }
    assert DEFAULT_CODEC in CODECS
    for codec, wanted in expected.items():
        path = tmp_path / f"{codec}.zarr"
        _write(path, codec=codec)
        with open(path / "X" / "zarr.json") as f:
            codecs = json.load(f)["codecs"]
        assert codecs[0]["name"] == "bytes"
        compressors = codecs[1:]
        assert len(compressors) == len(wanted)
        for found, want in zip(compressors, wanted, strict=True):
            assert found["name"] == want.pop("name")
            for key, value in want.items():
                assert found["configuration"][key] == value


def test_chunking_and_attrs_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    ds = _write(path, arrays=_arrays(y_width=2), source="unit-test")
    X = zarr.open_array(str(path), path="X", mode="r")
    y = zarr.open_array(str(path), path="y", mode="r")
    assert X.chunks == (CHUNK_ROWS, N_FEATURES)
    assert y.chunks == (CHUNK_ROWS, 2)
    assert X.shards is None
    assert sorted(os.listdir(path / "X" / "c"), key=int) == [str(i) for i in range(8)]
    assert os.listdir(path / "X" / "c" / "0") == ["0"]

    meta = _root_attrs(path)
    assert meta["format"] == FORMAT_NAME
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["n_rows"] == N_ROWS
    assert meta["chunk_rows"] == CHUNK_ROWS
    assert meta["fields"] == {
        "X": {"shape": [N_FEATURES], "dtype": "float32"},
        "y": {"shape": [2], "dtype": "float32"},
    }
    assert meta["complete"] is True
    assert meta["codec"] == DEFAULT_CODEC
    assert meta["uuid"] == ds.uuid
    int(meta["uuid"], 16)
    assert meta["provenance"]["source"] == "unit-test"
    datetime.fromisoformat(meta["provenance"]["created"])


def test_every_store_gets_a_new_uuid(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.zarr")
    b = _write(tmp_path / "b.zarr")
    c = _write(tmp_path / "a.zarr", overwrite=True)
    assert len({a.uuid, b.uuid, c.uuid}) == 3


def test_all_zero_chunks_are_written(tmp_path: Path) -> None:
    """Zarr skips chunks equal to the fill value by default; a dataset store
    must hold every chunk so that a missing one is an error, not zeros."""
    ds = Dataset.from_arrays(
        tmp_path / "z.zarr", y=np.zeros(10, np.float32), chunk_rows=4
    )
    assert sorted(os.listdir(tmp_path / "z.zarr" / "y" / "c")) == ["0", "1", "2"]
    np.testing.assert_array_equal(ds.read("y", 1), np.zeros(4, np.float32))


def test_other_dtypes_round_trip(tmp_path: Path) -> None:
    arrays = {
        "flag": np.array([True, False, True, True, False]),
        "user": np.arange(5, dtype=np.int64),
        "item": np.arange(5, dtype=np.uint16),
        "rating": np.arange(5, dtype=">f4"),  # big-endian input is stored natively
        "image": np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3),
    }
    ds = Dataset.from_arrays(tmp_path / "d.zarr", chunk_rows=2, codec="zstd", **arrays)
    assert ds.n_features == 0
    assert ds.fields["rating"] == FieldInfo((), "float32")
    assert ds.fields["image"] == FieldInfo((2, 3), "uint8")
    for name, expected in arrays.items():
        got = ds.to_dask(name).compute(scheduler="synchronous")
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == np.dtype(expected.dtype).newbyteorder("=")


def test_from_arrays_accepts_array_likes(tmp_path: Path) -> None:
    ds = Dataset.from_arrays(tmp_path / "d.zarr", y=[1.0, 2.0, 3.0], chunk_rows=2)
    np.testing.assert_array_equal(ds.read("y", 1), [3.0])


def test_from_dask_equals_from_arrays(tmp_path: Path) -> None:
    arrays = _arrays(y_width=2)
    expected = Dataset.from_arrays(
        tmp_path / "np.zarr", chunk_rows=CHUNK_ROWS, **arrays
    )
    lazy = {
        "X": da.from_array(arrays["X"], chunks=(37, 2)),  # unaligned with chunk_rows
        "y": da.from_array(arrays["y"], chunks=(300, 2)),
    }
    with dask.config.set(scheduler="synchronous"):
        ds = Dataset.from_dask(tmp_path / "dask.zarr", chunk_rows=CHUNK_ROWS, **lazy)
    assert ds.provenance["source"] == "from_dask"
    assert ds.fields == expected.fields
    assert (ds.n_rows, ds.n_chunks, ds.codec) == (N_ROWS, 8, DEFAULT_CODEC)
    assert ds.uuid != expected.uuid
    for name in arrays:
        for c in ds.chunk_ids:
            np.testing.assert_array_equal(ds.read(name, c), expected.read(name, c))
    X = zarr.open_array(str(tmp_path / "dask.zarr"), path="X", mode="r")
    assert X.chunks == (CHUNK_ROWS, N_FEATURES)


def test_from_dask_validates_before_writing(tmp_path: Path) -> None:
    X = da.ones((10, 2), chunks=5, dtype=np.int32)
    before = _snapshot(tmp_path)
    with pytest.raises(DataValidationError, match=r"'X'.*int32.*astype"):
        Dataset.from_dask(tmp_path / "d.zarr", X=X, chunk_rows=4)
    unknown = da.ones(10, chunks=5)
    unknown = unknown[unknown > 0]
    with pytest.raises(DataValidationError, match=r"'y'.*compute_chunk_sizes"):
        Dataset.from_dask(tmp_path / "d.zarr", y=unknown, chunk_rows=4)
    with pytest.raises(DataValidationError, match=r"'a' \(10 rows\).*'b' \(9 rows\)"):
        Dataset.from_dask(
            tmp_path / "d.zarr", a=da.ones(10), b=da.ones(9), chunk_rows=4
        )
    assert _snapshot(tmp_path) == before


# -- open ------------------------------------------------------------------------


def test_open_reads_no_chunk_data(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    written = _write(path)
    shutil.rmtree(path / "X" / "c")
    shutil.rmtree(path / "y" / "c")
    ds = Dataset.open(path)
    assert (ds.n_rows, ds.n_chunks, ds.uuid) == (N_ROWS, 8, written.uuid)
    with pytest.raises(StoreError, match=r"chunk 0 .*'X'.*missing"):
        ds.read("X", 0)


def test_open_missing_path(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match=r"nope\.zarr"):
        Dataset.open(tmp_path / "nope.zarr")


def _garble(path: Path) -> None:
    (path / "zarr.json").write_text("{not json")


def _plain_group(path: Path) -> None:
    shutil.rmtree(path)
    zarr.open_group(str(path), mode="w-")


def _plain_array(path: Path) -> None:
    shutil.rmtree(path)
    zarr.create_array(str(path), shape=(3,), dtype="int32")


def _wrong_format(path: Path) -> None:
    _set_root_attrs(path, {**_root_attrs(path), "format": "something.else"})


def _newer_version(path: Path) -> None:
    _set_root_attrs(path, {**_root_attrs(path), "format_version": FORMAT_VERSION + 1})


def _incomplete(path: Path) -> None:
    meta = _root_attrs(path)
    del meta["complete"]
    _set_root_attrs(path, meta)


def _malformed(path: Path) -> None:
    meta = _root_attrs(path)
    del meta["n_rows"]
    _set_root_attrs(path, meta)


def _drop_array(path: Path) -> None:
    shutil.rmtree(path / "y")


def _longer_array(path: Path) -> None:
    group = zarr.open_group(str(path), mode="r+")
    group.create_array(
        "y", shape=(N_ROWS + 1,), chunks=(CHUNK_ROWS,), dtype="int8", overwrite=True
    )


def _other_chunking(path: Path) -> None:
    group = zarr.open_group(str(path), mode="r+")
    group.create_array(
        "y", shape=(N_ROWS,), chunks=(100,), dtype="int8", overwrite=True
    )


def _split_columns(path: Path) -> None:
    group = zarr.open_group(str(path), mode="r+")
    group.create_array(
        "X",
        shape=(N_ROWS, N_FEATURES),
        chunks=(CHUNK_ROWS, 2),
        dtype="float32",
        overwrite=True,
    )


def _other_dtype(path: Path) -> None:
    group = zarr.open_group(str(path), mode="r+")
    group.create_array(
        "y", shape=(N_ROWS,), chunks=(CHUNK_ROWS,), dtype="int16", overwrite=True
    )


def _string_field(path: Path) -> None:
    meta = _root_attrs(path)
    meta["fields"]["y"]["dtype"] = "str"
    _set_root_attrs(path, meta)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (_garble, r"cannot open .*d\.zarr.* as a Zarr group"),
        (_plain_group, r"d\.zarr.*not a dasktrain dataset"),
        (_plain_array, r"cannot open .*d\.zarr.* as a Zarr group"),
        (_wrong_format, r"d\.zarr.*format 'something.else'"),
        (_newer_version, r"d\.zarr.*format_version 2"),
        (_incomplete, r"d\.zarr.*incomplete"),
        (_malformed, r"d\.zarr.*malformed.*n_rows"),
        (_drop_array, r"array 'y' of dataset store .*d\.zarr.* is missing"),
        (_longer_array, r"array 'y' .*1001 rows.*n_rows=1000"),
        (_other_chunking, r"array 'y' .*chunked \(100,\).*expected .*\(128,\)"),
        (_split_columns, r"array 'X' .*chunked \(128, 2\).*\(128, 5\)"),
        (_other_dtype, r"array 'y' .*dtype int16, declared int8"),
        (_string_field, r"d\.zarr.*malformed"),
    ],
)
def test_open_refuses_bad_stores(
    tmp_path: Path, damage: Callable[[Path], None], pattern: str
) -> None:
    path = tmp_path / "d.zarr"
    _write(path)
    damage(path)
    with pytest.raises(StoreError, match=pattern):
        Dataset.open(path)


def test_open_refuses_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(StoreError, match=r"empty\.zarr"):
        Dataset.open(tmp_path / "empty.zarr")


# -- validation of inputs --------------------------------------------------------


BAD_INPUTS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("no arrays", {}, DataValidationError, r"no arrays"),
    (
        "lengths",
        {"X": np.zeros((10, 2), np.float32), "y": np.zeros(9)},
        DataValidationError,
        r"'X' \(10 rows\) and 'y' \(9 rows\)",
    ),
    (
        "object",
        {"y": np.array([1, "a"], dtype=object)},
        DataValidationError,
        r"'y'.*object",
    ),
    ("string", {"label": np.array(["a", "b"])}, DataValidationError, r"'label'.*<U1"),
    (
        "complex",
        {"z": np.ones(3, np.complex64)},
        DataValidationError,
        r"'z'.*complex64",
    ),
    (
        "datetime",
        {"t": np.zeros(3, "datetime64[s]")},
        DataValidationError,
        r"'t'.*datetime",
    ),
    ("scalar", {"y": np.float32(1.0)}, DataValidationError, r"'y' is a scalar"),
    ("no rows", {"y": np.zeros(0, np.float32)}, DataValidationError, r"no rows"),
    ("zero width", {"w": np.zeros((3, 0))}, DataValidationError, r"'w'.*\(3, 0\)"),
    (
        "integer X",
        {"X": np.zeros((4, 2), np.int64)},
        DataValidationError,
        r"'X'.*int64.*astype",
    ),
    (
        "1-d X",
        {"X": np.zeros(4, np.float32)},
        DataValidationError,
        r"'X' must be 2-d.*reshape",
    ),
    (
        "slash name",
        {"a/b": np.zeros(3)},
        DataValidationError,
        r"invalid array name 'a/b'",
    ),
    (
        "reserved name",
        {"__x": np.zeros(3)},
        DataValidationError,
        r"invalid array name '__x'",
    ),
    ("dot name", {".hidden": np.zeros(3)}, DataValidationError, r"invalid array name"),
    ("metadata name", {"zarr.json": np.zeros(3)}, DataValidationError, r"'zarr.json'"),
]


@pytest.mark.parametrize(
    ("arrays", "error", "pattern"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_arrays_create_nothing(
    tmp_path: Path, arrays: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    before = _snapshot(tmp_path)
    with pytest.raises(error, match=pattern):
        Dataset.from_arrays(tmp_path / "new.zarr", chunk_rows=2, **arrays)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"chunk_rows": 0}, ValueError, r"chunk_rows must be >= 1"),
        ({"chunk_rows": -5}, ValueError, r"chunk_rows must be >= 1"),
        ({"chunk_rows": 2.5}, TypeError, r"chunk_rows must be an int"),
        ({"codec": "gzip"}, ValueError, r"unknown codec 'gzip'.*none, lz4, zstd"),
    ],
)
def test_bad_options_create_nothing(
    tmp_path: Path, options: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    before = _snapshot(tmp_path)
    with pytest.raises(error, match=pattern):
        Dataset.from_arrays(tmp_path / "new.zarr", y=np.zeros(4), **options)
    assert _snapshot(tmp_path) == before


def test_existing_store_is_never_touched_without_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    _write(path)
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match=r"d\.zarr.*overwrite=True"):
        _write(path)
    with (
        pytest.raises(StoreError, match=r"d\.zarr.*overwrite=True"),
        dask.config.set(scheduler="synchronous"),
    ):
        Dataset.from_dask(path, y=da.zeros(4), chunk_rows=2)
    with pytest.raises(StoreError, match=r"d\.zarr.*overwrite=True"):
        create_store(
            path,
            fields={"y": FieldInfo((), "int8")},
            n_rows=4,
            chunk_rows=2,
            codec="none",
        )
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "directory", "plain zarr group"])
def test_overwrite_refuses_what_is_not_a_dataset(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "precious"
    if kind == "file":
        path.write_bytes(b"my thesis")
    elif kind == "directory":
        path.mkdir()
        (path / "notes.txt").write_text("keep me")
    else:
        group = zarr.open_group(str(path), mode="w-")
        group.create_array("X", shape=(3, 2), dtype="float32")[:] = 1.0
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match=r"precious.*not a dasktrain dataset"):
        _write(path, overwrite=True)
    with pytest.raises(StoreError, match=r"precious.*not a dasktrain dataset"):
        _write(path)
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_a_dataset(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    old = _write(path)
    new = _write(path, arrays=_arrays(seed=1, y_width=2), overwrite=True, codec="zstd")
    assert new.uuid != old.uuid
    assert new.fields["y"] == FieldInfo((2,), "float32")
    np.testing.assert_array_equal(new.read("X", 0), _arrays(seed=1)["X"][:CHUNK_ROWS])


def test_overwrite_of_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "d.zarr").mkdir()
    with pytest.raises(StoreError, match="overwrite=True"):
        _write(tmp_path / "d.zarr")
    assert _write(tmp_path / "d.zarr", overwrite=True).n_rows == N_ROWS


# -- incomplete stores -------------------------------------------------------------


def test_incomplete_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    ref = create_store(
        path,
        fields={"X": FieldInfo((2,), "float32"), "y": FieldInfo((), "int8")},
        n_rows=10,
        chunk_rows=4,
        codec="lz4",
        provenance={"source": "test"},
    )
    assert _root_attrs(path)["complete"] is False
    for c in range(3):
        write_chunk(ref, "X", c, np.ones((ref.chunk_n_rows(c), 2), np.float32))
    write_chunk(ref, "y", 0, np.zeros(4, np.int8))
    with pytest.raises(StoreError, match=r"d\.zarr.*incomplete"):
        Dataset.open(path)
    with pytest.raises(StoreError, match=r"array 'y' has 1 of 3 chunks"):
        finalize_store(path, provenance={})
    with pytest.raises(StoreError, match=r"incomplete dataset store.*overwrite=True"):
        _write(path)

    write_chunk(path, "y", 1, np.zeros(4, np.int8))
    write_chunk(ref, "y", 2, np.ones(2, np.int64))  # safe cast
    finalize_store(path, provenance={"note": "done"})
    ds = Dataset.open(path)
    assert ds.uuid == ref.uuid
    assert ds.provenance["source"] == "test"
    assert ds.provenance["note"] == "done"
    np.testing.assert_array_equal(ds.read("y", 2), [1, 1])
    with pytest.raises(StoreError, match="already complete"):
        finalize_store(path, provenance={})


def test_incomplete_store_can_be_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    create_store(path, fields={"y": FieldInfo((), "int8")}, n_rows=10, chunk_rows=4)
    assert _write(path, overwrite=True).n_rows == N_ROWS


def test_write_chunk_checks_shape_dtype_and_uuid(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    ref = create_store(
        path, fields={"X": FieldInfo((2,), "float32")}, n_rows=10, chunk_rows=4
    )
    with pytest.raises(DataValidationError, match=r"chunk 2 of array 'X'.*\(2, 2\)"):
        write_chunk(ref, "X", 2, np.zeros((4, 2), np.float32))
    with pytest.raises(DataValidationError, match=r"complex128.*'X'"):
        write_chunk(ref, "X", 0, np.zeros((4, 2), np.complex128))
    with pytest.raises(IndexError, match=r"chunk 3 out of range"):
        write_chunk(ref, "X", 3, np.zeros((4, 2), np.float32))
    with pytest.raises(DataValidationError, match=r"no array 'y'"):
        write_chunk(ref, "y", 0, np.zeros(4, np.float32))
    create_store(
        path,
        fields={"X": FieldInfo((2,), "float32")},
        n_rows=10,
        chunk_rows=4,
        overwrite=True,
    )
    with pytest.raises(StoreError, match=r"d\.zarr.*rewritten"):
        write_chunk(ref, "X", 0, np.zeros((4, 2), np.float32))


# -- views ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "n_val"),
    [(0.1, 2), (0.25, 5), (0.5, 10), (0.3, 6), (1e-6, 1), (0.999, 19)],
)
def test_split(tmp_path: Path, fraction: float, n_val: int) -> None:
    ds = Dataset.from_arrays(tmp_path / "d.zarr", y=np.arange(195.0), chunk_rows=10)
    assert ds.n_chunks == 20
    train, val = ds.split(fraction, seed=3)
    assert len(val.chunk_ids) == n_val
    assert len(train.chunk_ids) == 20 - n_val
    assert not set(train.chunk_ids) & set(val.chunk_ids)
    assert sorted(train.chunk_ids + val.chunk_ids) == list(range(20))
    assert list(train.chunk_ids) == sorted(train.chunk_ids)
    assert list(val.chunk_ids) == sorted(val.chunk_ids)
    assert train.n_rows + val.n_rows == 195
    assert train.uuid == val.uuid == ds.uuid
    assert train.path == val.path == ds.path
    again = ds.split(fraction, seed=3)
    assert (again[0].chunk_ids, again[1].chunk_ids) == (train.chunk_ids, val.chunk_ids)


def test_split_depends_on_the_seed(tmp_path: Path) -> None:
    ds = Dataset.from_arrays(tmp_path / "d.zarr", y=np.arange(200.0), chunk_rows=10)
    picks = {ds.split(0.25, seed=s)[1].chunk_ids for s in range(10)}
    assert len(picks) > 5


def test_split_of_a_view_stays_in_the_view(tmp_path: Path) -> None:
    ds = Dataset.from_arrays(tmp_path / "d.zarr", y=np.arange(100.0), chunk_rows=10)
    train, _ = ds.split(0.3, seed=0)
    fit, early_stop = train.split(0.5, seed=1)
    assert set(fit.chunk_ids) | set(early_stop.chunk_ids) == set(train.chunk_ids)
    assert not set(fit.chunk_ids) & set(early_stop.chunk_ids)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True])
def test_split_rejects_bad_fractions(tmp_path: Path, fraction: float) -> None:
    ds = Dataset.from_arrays(tmp_path / "d.zarr", y=np.arange(100.0), chunk_rows=10)
    with pytest.raises(ValueError, match="val_fraction"):
        ds.split(fraction)


def test_split_needs_two_chunks(tmp_path: Path) -> None:
    ds = Dataset.from_arrays(tmp_path / "d.zarr", y=np.arange(10.0), chunk_rows=10)
    with pytest.raises(ValueError, match=r"d\.zarr.*1 chunk"):
        ds.split(0.5)
    ds2 = Dataset.from_arrays(tmp_path / "e.zarr", y=np.arange(20.0), chunk_rows=10)
    with pytest.raises(ValueError, match="1 chunk"):
        ds2.subset([1]).split(0.5)


def test_subset(tmp_path: Path) -> None:
    ds = Dataset.from_arrays(tmp_path / "d.zarr", y=np.arange(25.0), chunk_rows=10)
    view = ds.subset([2, 0])
    assert view.chunk_ids == (0, 2)
    assert view.n_rows == 15
    assert view.nbytes == 15 * 8
    np.testing.assert_array_equal(
        view.to_dask("y").compute(scheduler="synchronous"),
        np.r_[np.arange(10.0), np.arange(20.0, 25.0)],
    )
    np.testing.assert_array_equal(
        view.head(12)["y"], np.r_[np.arange(10.0), 20.0, 21.0]
    )
    with pytest.raises(IndexError, match=r"chunk 1 is not in this view"):
        view.read("y", 1)
    with pytest.raises(ValueError, match=r"chunks \[1\] are not in this view"):
        view.subset([1])
    with pytest.raises(ValueError, match="duplicate"):
        ds.subset([1, 1])
    with pytest.raises(ValueError, match="at least one"):
        ds.subset([])
    assert view != ds
    assert view == ds.subset([0, 2])
    assert "view of 2 of 3 chunks" in repr(view)


def test_head_repr_html_and_pickle(tmp_path: Path) -> None:
    arrays = _arrays(y_width=2)
    ds = _write(tmp_path / "d.zarr", arrays=arrays)
    head = ds.head()
    assert set(head) == {"X", "y"}
    np.testing.assert_array_equal(head["X"], arrays["X"][:5])
    assert ds.head(0)["y"].shape == (0, 2)
    assert ds.head(10_000)["X"].shape == (N_ROWS, N_FEATURES)

    text = repr(ds)
    assert str(tmp_path / "d.zarr") in text
    assert "1,000 rows" in text and "8 chunks" in text
    assert "X: float32(n, 5)" in text and "y: float32(n, 2)" in text
    page = ds._repr_html_()
    assert "<table>" in page and str(tmp_path / "d.zarr") in page
    assert "(1000, 5)" in page and "float32" in page and DEFAULT_CODEC in page

    clone = pickle.loads(pickle.dumps(ds))
    assert clone == ds and clone.codec == ds.codec
    ref = pickle.loads(pickle.dumps(ds.ref))
    assert ref == ds.ref and isinstance(ref, DatasetRef)
    assert len(pickle.dumps(ds.ref)) < 1_000


def test_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ds = Dataset.from_arrays("rel.zarr", y=np.zeros(3), chunk_rows=2)
    assert ds.path == str(tmp_path / "rel.zarr")
    assert Dataset.open("rel.zarr") == ds


def test_fsspec_url_store() -> None:
    url = f"memory://dasktrain-test-{uuid.uuid4().hex}/d.zarr"
    try:
        ds = Dataset.from_arrays(url, X=np.ones((5, 2), np.float32), chunk_rows=2)
        assert ds.path == url
        np.testing.assert_array_equal(Dataset.open(url).read("X", 2), np.ones((1, 2)))
        import fsspec

        fs = fsspec.filesystem("memory")
        fs.rm(url + "/X/c/1/0")
        with pytest.raises(StoreError, match=r"chunk 1 .*'X'.*missing"):
            read_chunk(ds.ref, "X", 1)
    finally:
        import fsspec

        fsspec.filesystem("memory").rm(url.rsplit("/", 1)[0], recursive=True)


# -- worker-side reads -----------------------------------------------------------------


def test_read_chunk_missing_chunk(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    ds = _write(path)
    np.testing.assert_array_equal(read_chunk(ds.ref, "X", 3), _arrays()["X"][384:512])
    os.remove(path / "X" / "c" / "3" / "0")
    with pytest.raises(StoreError) as info:
        read_chunk(ds.ref, "X", 3)
    message = str(info.value)
    assert "chunk 3" in message and "'X'" in message and str(path) in message
    assert "missing" in message


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_read_chunk_corrupted_chunk(tmp_path: Path, codec: str, damage: str) -> None:
    path = tmp_path / "d.zarr"
    ds = _write(path, codec=codec)
    chunk_file = path / "y" / "c" / "5"
    if damage == "garbage":
        chunk_file.write_bytes(b"\x00not a chunk at all\xff" * 3)
    else:
        chunk_file.write_bytes(chunk_file.read_bytes()[:7])
    with pytest.raises(StoreError) as info:
        read_chunk(ds.ref, "y", 5)
    message = str(info.value)
    assert "chunk 5" in message and "'y'" in message and str(path) in message
    assert info.value.__cause__ is not None
    assert type(info.value.__cause__).__name__ in message


def test_read_chunk_refuses_a_stale_ref(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    old = _write(path)
    read_chunk(old.ref, "X", 0)  # the handle is now cached
    new = _write(path, arrays=_arrays(seed=7), overwrite=True)
    with pytest.raises(StoreError, match=r"d\.zarr.*changed since it was opened"):
        read_chunk(old.ref, "X", 0)
    np.testing.assert_array_equal(
        read_chunk(new.ref, "X", 0), _arrays(seed=7)["X"][:128]
    )
    clear_handle_cache()
    with pytest.raises(StoreError, match=r"d\.zarr.*changed since it was opened"):
        read_chunk(old.ref, "y", 1)


def test_read_chunk_of_a_deleted_store(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    ds = _write(path)
    read_chunk(ds.ref, "X", 0)
    shutil.rmtree(path)
    with pytest.raises(StoreNotFoundError, match=r"d\.zarr"):
        read_chunk(ds.ref, "X", 0)


def test_read_chunk_argument_errors(tmp_path: Path) -> None:
    ds = _write(tmp_path / "d.zarr")
    with pytest.raises(IndexError, match="chunk 8 out of range"):
        read_chunk(ds.ref, "X", 8)
    with pytest.raises(DataValidationError, match=r"no array 'w'.*X, y"):
        read_chunk(ds.ref, "w", 0)


# -- check_finite ----------------------------------------------------------------------


def _ref(n_rows: int = 1_000, chunk_rows: int = 100) -> DatasetRef:
    return DatasetRef(
        "/data/s.zarr", "u", n_rows, chunk_rows, (("X", FieldInfo((4,), "float32")),)
    )


@pytest.mark.parametrize(
    ("value", "kind"), [(np.nan, "NaN"), (np.inf, r"\+inf"), (-np.inf, "-inf")]
)
def test_check_finite_names_chunk_row_and_column(value: float, kind: str) -> None:
    chunk = np.zeros((100, 4), np.float32)
    chunk[37, 2] = value
    chunk[60, 0] = np.nan
    with pytest.raises(NonFiniteDataError) as info:
        check_finite(chunk, _ref(), "X", 3)
    message = str(info.value)
    assert message.startswith(kind.replace("\\", ""))
    assert "'/data/s.zarr'" in message and "'X'" in message and "chunk 3" in message
    assert "row 337, column 2" in message  # global row 3 * 100 + 37
    assert "2 non-finite values" in message


def test_check_finite_vector_and_tensor() -> None:
    y = np.ones(100)
    y[99] = np.nan
    with pytest.raises(NonFiniteDataError, match=r"chunk 9: row 999 \(1 non-finite"):
        check_finite(y, _ref(), "y", 9)
    image = np.zeros((100, 2, 3), np.float32)
    image[5, 1, 2] = np.inf
    with pytest.raises(NonFiniteDataError, match=r"row 5, position \(1, 2\)"):
        check_finite(image, _ref(), "image", 0)


def test_check_finite_accepts_clean_data() -> None:
    check_finite(np.zeros((100, 4), np.float32), _ref(), "X", 0)
    check_finite(np.arange(100), _ref(), "y", 0)
    check_finite(np.ones(100, bool), _ref(), "y", 0)
    huge = np.full((100, 4), 3e38, np.float32)  # the sum overflows, values are finite
    check_finite(huge, _ref(), "X", 0)
