"""Fuzzing the dataset entry points with hypothesis.

Every failure must be one of the documented exception types, with a message
that names the problem, and a failed call must leave the filesystem as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dasktrain as dt
from dasktrain.errors import DasktrainError

#: What ``Dataset.from_arrays`` may raise on bad input (documented in its docstring).
DOCUMENTED = (DasktrainError, ValueError, TypeError)

DTYPES = st.sampled_from(
    [
        "float32",
        "float64",
        "int8",
        "int64",
        "bool",
        "complex64",
        "object",
        "U3",
        "float16",
    ]
)


def tree_digest(root: Path) -> str:
    """Hash of every path and file content under ``root``."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        h.update(dirpath.encode())
    return h.hexdigest()


@st.composite
def array_sets(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(0, 40))
    n_fields = draw(st.integers(0, 3))
    names = draw(
        st.lists(
            st.sampled_from(
                ["X", "y", "w", "bad/name", ".hidden", "", "zarr.json", "a b"]
            ),
            min_size=n_fields,
            max_size=n_fields,
            unique=True,
        )
    )
    arrays: dict[str, Any] = {}
    for name in names:
        rows = n if draw(st.booleans()) else draw(st.integers(0, 40))
        ndim = draw(st.integers(0, 3))
        shape = (
            (
                rows,
                *draw(
                    st.lists(
                        st.integers(0, 4),
                        min_size=max(0, ndim - 1),
                        max_size=max(0, ndim - 1),
                    )
                ),
            )[:ndim]
            if ndim
            else ()
        )
        dtype = draw(DTYPES)
        try:
            arr = np.zeros(shape, dtype=dtype)
        except (TypeError, ValueError):
            arr = np.zeros(shape)
        if arr.dtype.kind == "f" and arr.size and draw(st.booleans()):
            arr.flat[0] = np.nan
        arrays[name] = arr if draw(st.booleans()) else arr.tolist()
    return arrays


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays=array_sets(),
    chunk_rows=st.one_of(st.integers(-2, 50), st.sampled_from([None, 2.5, "10", True])),
    codec=st.sampled_from(["lz4", "zstd", "none", "gzip", None, 3]),
)
def test_from_arrays_fails_cleanly(
    arrays: dict[str, Any], chunk_rows: Any, codec: Any
) -> None:
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        existing = root / "existing.zarr"
        x = np.arange(12, dtype="float32").reshape(6, 2)
        dt.Dataset.from_arrays(existing, X=x, y=np.zeros(6, "int8"), chunk_rows=3)
        before = tree_digest(root)
        target = root / "new.zarr"
        for path in (target, existing):
            try:
                ds = dt.Dataset.from_arrays(
                    path, chunk_rows=chunk_rows, codec=codec, **arrays
                )
            except DOCUMENTED as exc:
                assert str(exc), "an error without a message"
                # A failed call changes nothing on disk.
                if path == existing or not target.exists():
                    assert tree_digest(root) == before
                else:
                    pytest.fail(f"a failed call left {target} behind: {exc!r}")
            else:
                assert path == target, (
                    "an existing store was overwritten without overwrite=True"
                )
                reopened = dt.Dataset.open(path)
                assert reopened.n_rows == ds.n_rows
                for name, value in arrays.items():
                    got = (
                        np.concatenate(
                            [reopened.read(name, c) for c in reopened.chunk_ids]
                        )
                        if reopened.n_chunks
                        else np.zeros((0,))
                    )
                    np.testing.assert_array_equal(
                        got, np.asarray(value).astype(got.dtype)
                    )
                shutil.rmtree(path)
                assert tree_digest(root) == before
    finally:
        shutil.rmtree(root, ignore_errors=True)


GARBAGE = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"{}",
            b'{"zarr_format": 3, "node_type": "group"}',
            b'{"zarr_format": 3, "node_type": "group", "attributes": {"dasktrain": 1}}',
            b'{"zarr_format": 3, "node_type": "group", "attributes": {"dasktrain": '
            b'{"format": "dasktrain.dataset", "format_version": 1}}}',
            b'{"zarr_format": 3, "node_type": "array"}',
            b"\x80\x04\x95pickle",
        ]
    ),
)


@settings(max_examples=60, deadline=None)
@given(content=GARBAGE, mutate=st.sampled_from(["root", "X", "y", "delete-X", "none"]))
def test_open_garbage_is_a_store_error(content: bytes, mutate: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="fuzz-open-"))
    try:
        path = root / "ds.zarr"
        x = np.arange(20, dtype="float32").reshape(10, 2)
        dt.Dataset.from_arrays(path, X=x, y=np.zeros(10, "int8"), chunk_rows=5)
        if mutate == "root":
            (path / "zarr.json").write_bytes(content)
        elif mutate in ("X", "y"):
            (path / mutate / "zarr.json").write_bytes(content)
        elif mutate == "delete-X":
            shutil.rmtree(path / "X")
        before = tree_digest(root)
        try:
            ds = dt.Dataset.open(path)
        except DOCUMENTED as exc:
            assert "ds.zarr" in str(exc), f"the error does not name the store: {exc}"
        else:
            assert mutate == "none", f"a damaged store ({mutate}) opened: {ds!r}"
            assert ds.n_rows == 10
        assert tree_digest(root) == before, "open() modified the store"
    finally:
        shutil.rmtree(root, ignore_errors=True)
