"""Bringing your own data: Parquet tables, xarray datasets and Zarr stores.

Three ways in, exposed as :meth:`Dataset.from_parquet`,
:meth:`Dataset.from_xarray` and :meth:`Dataset.from_zarr`:

- **Parquet** (through ``dask.dataframe``): numeric columns become ``X``
  and the label ``y``; categorical columns are one-hot encoded into ``X``
  or hashed into ``ids``/``values`` for
  :class:`~dasktrain.models.SparseLogisticRegression` (see :class:`Encoding`).
- **xarray**: data variables become feature columns; one or several
  dimensions index the samples, in any position.
- **Zarr**: a store whose arrays share their chunk length along the sample
  axis (what xarray or dask write) is trained on *in place*: the dataset is
  a description of which arrays feed which field, and workers read the
  source chunks directly.  Other stores are rechunked on the workers into a
  new dataset store.

Copies run in two passes of tasks on the current Dask scheduler, one per
block of rows (a Parquet partition, a row block of the arrays); the client
only receives per-block row counts and the first bad value of each block:

1. *scan*: count rows, find non-finite values and missing categories
   (``nan="raise"`` stops here, naming the column and global row, before
   anything is written; ``nan="drop"`` counts the rows kept);
2. *write*: the kept rows are rechunked to ``chunk_rows`` and every chunk is
   written by one task (:func:`~dasktrain.data.io.write_chunk`).

Examples
--------
>>> import numpy as np, pandas as pd, tempfile, os, dask
>>> import dasktrain as dt
>>> root = tempfile.mkdtemp()
>>> frame = pd.DataFrame({"x": [0.5, 1.5, 2.5], "city": ["a", "b", "a"],
...                       "y": [0, 1, 0]})
>>> frame.to_parquet(os.path.join(root, "t.parquet"))
>>> with dask.config.set(scheduler="synchronous"):
...     ds = dt.Dataset.from_parquet(os.path.join(root, "t.parquet"),
...                                  os.path.join(root, "t.zarr"), features=["x"],
...                                  categorical=["city"], label="y", chunk_rows=2)
>>> ds.read("X", 0)
array([[0.5, 1. , 0. ],
       [1.5, 0. , 1. ]], dtype=float32)
>>> ds.feature_names
['x', 'city=a', 'city=b']
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from dasktrain.data.io import (
    DEFAULT_CODEC,
    DatasetRef,
    FieldSource,
    StoreInfo,
    check_chunk_rows,
    check_codec,
    check_storage_options,
    create_store,
    finalize_store,
    normalize_url,
    open_source_group,
    source_signature,
    store_exists,
    validate_field_name,
    write_chunk,
)
from dasktrain.errors import DataValidationError, StoreError, StoreNotFoundError
from dasktrain.schema import FieldInfo

if TYPE_CHECKING:
    import pandas as pd

    from dasktrain.data.dataset import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "ENCODINGS",
    "IN_PLACE_CODEC",
    "NAN_POLICIES",
    "Encoding",
    "from_parquet",
    "from_xarray",
    "from_zarr",
]

#: What ``nan=`` accepts: stop at the first non-finite or missing value, or
#: drop the rows that have one.
NAN_POLICIES = ("raise", "drop")
#: What ``encoding=`` accepts for categorical columns.
ENCODINGS = ("onehot", "hash")
#: Buckets of hashed features when ``n_buckets`` is not given (2**20).
DEFAULT_N_BUCKETS = 1 << 20
#: ``Dataset.codec`` of a dataset read in place (its chunks keep the
#: source's own codecs).
IN_PLACE_CODEC = "in-place"
#: Group attribute of xarray's Zarr v2 stores naming an array's dimensions.
_XARRAY_DIMS_ATTR = "_ARRAY_DIMENSIONS"
_X_DTYPES = ("float32", "float64")
_NUMERIC_KINDS = "biuf"
#: (local row, field, column index, what) of the first bad value of a block
_Bad = tuple[int, str, int, str]


# -- options ------------------------------------------------------------------


def _check_nan(nan: object) -> str:
    if nan not in NAN_POLICIES:
        raise ValueError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")
    return str(nan)


def _names(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be a name or a list of names, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{what} has duplicate names: {list(value)}")
    return tuple(value)


def _x_dtype(dtype: object) -> str:
    name = np.dtype(dtype).name  # type: ignore[call-overload]
    if name not in _X_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return str(name)


# -- categorical encodings ----------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """How a table's columns become dataset fields (and new rows, later).

    Stored in the dataset's provenance (``ds.provenance["encoding"]``), so the
    same encoding turns a new table into model inputs: :meth:`encode` (or
    :meth:`Dataset.encode`).

    - ``kind="onehot"``: ``X`` holds the numeric columns, then one column per
      category of each categorical column (``"city=paris"``), in the sorted
      order of the categories seen when the dataset was written.  A category
      seen later encodes as all zeros.
    - ``kind="hash"``: every column is a hashed feature: ``ids`` (int64, one
      per column) is a stable hash of ``"name=value"`` for categorical
      columns and of ``"name"`` for numeric ones, modulo ``n_buckets``;
      ``values`` is ``1`` for categorical columns and the number for numeric
      ones.  This feeds :class:`~dasktrain.models.SparseLogisticRegression`
      (``use_values=True``) with any number of categories.

    Parameters
    ----------
    numeric : tuple of str
        Numeric feature columns.
    categorical : tuple of (str, tuple of str)
        Categorical columns with their categories (empty for ``"hash"``).
    kind : {"onehot", "hash"}
    n_buckets : int or None
        Buckets of ``"hash"``.
    label : str or None
        The label column (``y``).
    dtype : {"float32", "float64"}
        Dtype of ``X`` (or ``values``).
    ids : tuple of (str, tuple of str)
        Categorical columns written as their own int64 fields, named after
        the column: the index of the value in the sorted categories (e.g.
        ``user`` and ``item`` ids for
        :class:`~dasktrain.models.MatrixFactorization`).  A value not seen
        when the dataset was written encodes as -1.
    label_field : str
        Name of the label's field (``"rating"`` for matrix factorization).

    Examples
    --------
    >>> import pandas as pd
    >>> enc = Encoding(("x",), (("c", ("a", "b")),), "onehot", None, None, "float32")
    >>> enc.encode(pd.DataFrame({"x": [1.0, 2.0], "c": ["b", "z"]}))["X"]
    array([[1., 0., 1.],
           [2., 0., 0.]], dtype=float32)
    """

    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...]
    kind: str
    n_buckets: int | None
    label: str | None
    dtype: str
    ids: tuple[tuple[str, tuple[str, ...]], ...] = ()
    label_field: str = "y"

    # -- description --------------------------------------------------------
    @property
    def categorical_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.categorical)

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Columns read from the table (features, then the label)."""
        label = (self.label,) if self.label is not None else ()
        id_names = tuple(name for name, _ in self.ids)
        return (*self.numeric, *self.categorical_names, *id_names, *label)

    def columns(self) -> dict[str, list[str]]:
        """For each field, the source column of each of its columns."""
        features = [*self.numeric, *self.categorical_names]
        if self.kind == "onehot":
            x = list(self.numeric) + [
                name for name, cats in self.categorical for _ in cats
            ]
            out = {"X": x}
        else:
            out = {"ids": features, "values": features}
        for name, _ in self.ids:
            out[name] = [name]
        if self.label is not None:
            out[self.label_field] = [self.label]
        return out

    def feature_names(self) -> list[str]:
        """Names of the columns of ``X`` (``"hash"``: of ``ids``)."""
        if self.kind == "onehot":
            return list(self.numeric) + [
                f"{name}={cat}" for name, cats in self.categorical for cat in cats
            ]
        return [*self.numeric, *self.categorical_names]

    def fields(self, label_dtype: str | None) -> dict[str, FieldInfo]:
        """The dataset fields this encoding writes."""
        width = len(self.numeric) + sum(len(c) for _, c in self.categorical)
        if self.kind == "onehot":
            out = {"X": FieldInfo((width,), self.dtype)} if width else {}
        elif not (self.numeric or self.categorical):
            out = {}
        else:
            n = len(self.numeric) + len(self.categorical)
            out = {
                "ids": FieldInfo((n,), "int64"),
                "values": FieldInfo((n,), self.dtype),
            }
        for name, _ in self.ids:
            out[name] = FieldInfo((), "int64")
        if label_dtype is not None:
            out[self.label_field] = FieldInfo((), label_dtype)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "numeric": list(self.numeric),
            "categorical": {name: list(cats) for name, cats in self.categorical},
            "kind": self.kind,
            "n_buckets": self.n_buckets,
            "label": self.label,
            "dtype": self.dtype,
            "ids": {name: list(cats) for name, cats in self.ids},
            "label_field": self.label_field,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Encoding:
        return cls(
            tuple(obj["numeric"]),
            tuple((str(k), tuple(v)) for k, v in dict(obj["categorical"]).items()),
            str(obj["kind"]),
            None if obj.get("n_buckets") is None else int(obj["n_buckets"]),
            obj.get("label"),
            str(obj["dtype"]),
            tuple((str(k), tuple(v)) for k, v in dict(obj.get("ids", {})).items()),
            str(obj.get("label_field", "y")),
        )

    # -- encoding ------------------------------------------------------------
    def encode(
        self, frame: pd.DataFrame, *, with_label: bool = False
    ) -> dict[str, np.ndarray]:
        """Model inputs of a pandas DataFrame (pure pandas and NumPy).

        Missing values become NaN (numeric columns, and the one-hot columns
        or the value of a missing category), so training data checks find
        them.  The label is included only with ``with_label``, and then id
        fields come as float64 codes with NaN for a missing value (the
        writer checks and casts them); else as int64, -1 for a value missing
        or not seen when the dataset was written.
        """
        missing = [c for c in self.input_columns if c not in frame.columns]
        if not with_label and self.label in missing:
            missing.remove(self.label)
        if missing:
            raise DataValidationError(
                f"the table lacks columns {missing} (it has: {list(frame.columns)})"
            )
        n = len(frame)
        dtype = np.dtype(self.dtype)
        numeric = [_numeric_column(frame, name, dtype) for name in self.numeric]
        out: dict[str, np.ndarray] = {}
        if self.kind == "onehot":
            blocks = [c.reshape(n, 1) for c in numeric]
            for name, cats in self.categorical:
                blocks.append(_one_hot(frame[name], cats, dtype))
            if blocks:
                out["X"] = np.concatenate(blocks, axis=1)
        elif self.numeric or self.categorical:
            assert self.n_buckets is not None
            ids, values = [], []
            for name, column in zip(self.numeric, numeric, strict=True):
                ids.append(np.full(n, _hash_names([name])[0] % self.n_buckets))
                values.append(column)
            for name in self.categorical_names:
                series = frame[name]
                isna = series.isna().to_numpy()
                text = np.asarray([f"{name}={v}" for v in series], dtype=object)
                hashed = _hash_names(text) % np.uint64(self.n_buckets)
                ids.append(np.where(isna, 0, hashed).astype(np.int64))
                values.append(np.where(isna, np.nan, 1.0).astype(dtype))
            out["ids"] = np.stack(ids, axis=1).astype(np.int64)
            out["values"] = np.stack(values, axis=1)
        for name, cats in self.ids:
            series = frame[name]
            index = np.asarray(_category_index(series, cats, include_nan=with_label))
            out[name] = index if with_label else index.astype(np.int64)
        if with_label and self.label is not None:
            out[self.label_field] = _label_column(frame, self.label)
        return out


def _hash_names(names: Any) -> np.ndarray:
    """Stable 64-bit hashes of strings (the same in every process)."""
    import pandas as pd

    return np.asarray(
        pd.util.hash_array(np.asarray(names, dtype=object)), dtype=np.uint64
    )


def _numeric_column(frame: pd.DataFrame, name: str, dtype: np.dtype[Any]) -> np.ndarray:
    series = frame[name]
    try:
        return series.to_numpy(dtype=dtype, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise DataValidationError(
            f"column {name!r} (dtype {series.dtype}) is not numeric: {exc}; list it "
            f"in categorical= to encode it"
        ) from exc


def _label_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    series = frame[name]
    if series.hasnans:
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    values = series.to_numpy()
    if values.dtype.kind not in _NUMERIC_KINDS:
        values = series.to_numpy(dtype=np.float64)
    return values


def _category_codes(
    series: pd.Series, cats: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """``(isna, codes)``: which values are missing, and the index of each
    value in ``cats`` (-1 if absent)."""
    import pandas as pd

    isna = series.isna().to_numpy()
    codes = pd.Index(list(cats)).get_indexer(series.astype(str).to_numpy(dtype=object))
    return isna, codes


def _category_index(
    series: pd.Series, cats: tuple[str, ...], *, include_nan: bool
) -> np.ndarray:
    """Index of each value in ``cats`` (-1 if absent); with ``include_nan``,
    float64 with NaN for missing values."""
    isna, codes = _category_codes(series, cats)
    if not include_nan:
        return np.where(isna, -1, codes).astype(np.int64)
    return np.where(isna, np.nan, codes.astype(np.float64))


def _one_hot(
    series: pd.Series, cats: tuple[str, ...], dtype: np.dtype[Any]
) -> np.ndarray:
    isna, codes = _category_codes(series, cats)
    out = np.zeros((len(series), len(cats)), dtype=dtype)
    rows = np.flatnonzero(codes >= 0)
    out[rows, codes[rows]] = 1
    out[isna] = np.nan
    return out


# -- blocks of rows: scan and write -------------------------------------------


def _finite_rows(block: Mapping[str, np.ndarray]) -> np.ndarray:
    """Which rows of a block hold only finite values (in its float fields)."""
    n = len(next(iter(block.values())))
    ok = np.ones(n, dtype=bool)
    for values in block.values():
        if values.dtype.kind in "fc":
            ok &= np.isfinite(values).reshape(n, -1).all(axis=1)
    return ok


def _scan_block(block: Mapping[str, np.ndarray]) -> tuple[int, int, _Bad | None]:
    """Rows of a block, rows without a non-finite value, and the first bad
    value (local row, field, column, kind): the first field, in block order,
    with a bad value in the first row that has one, and its first column."""
    ok = _finite_rows(block)
    n, n_kept = len(ok), int(ok.sum())
    if n_kept == n:
        return n, n_kept, None
    row = int(np.argmin(ok))
    for name, values in block.items():
        if values.dtype.kind not in "fc":
            continue
        cells = values.reshape(n, -1)[row]
        finite = np.isfinite(cells)
        if not finite.all():
            col = int(np.argmin(finite))
            kind = (
                "NaN (a missing value)" if np.isnan(cells[col]) else "an infinite value"
            )
            return n, n_kept, (row, name, col, kind)
    raise AssertionError(f"row {row} is not finite, yet no field has a bad value")


def _select_rows(
    block: Mapping[str, np.ndarray], field: str, dtype: str, drop: bool
) -> np.ndarray:
    """Task: ``block[field]`` as ``dtype``; with ``drop``, only the rows whose
    values are finite in every field of the block."""
    values = np.asarray(block[field])
    if drop:
        ok = _finite_rows(block)
        if not ok.all():
            values = values[ok]
    return values.astype(dtype, copy=False)


@dataclass(frozen=True)
class _Destination:
    """Where and how a copy is written: checked before any task runs."""

    url: str
    chunk_rows: int
    codec: str
    overwrite: bool
    storage_options: dict[str, Any]


def _prepare_destination(
    store: str | os.PathLike[str],
    chunk_rows: int,
    codec: str,
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
) -> _Destination:
    url = normalize_url(store)
    check_chunk_rows(chunk_rows)
    check_codec(codec)
    options = check_storage_options(storage_options)
    if store_exists(url, options) and not overwrite:
        from dasktrain.data.io import existing_store_message

        raise StoreError(existing_store_message(url, options))
    return _Destination(url, chunk_rows, codec, overwrite, options)


def _scan_blocks(
    blocks: Sequence[Any], columns: Mapping[str, Sequence[str]], nan: str
) -> tuple[int, list[int]]:
    """The scan pass: the rows of the source, and the rows each block keeps
    (all of them with ``nan="raise"``, which stops at the first bad value,
    naming its column and global row)."""
    import dask

    if not blocks:
        raise DataValidationError("the source has no rows")
    scan = dask.delayed(_scan_block, pure=True)
    # Sync point: one small tuple per block (rows, kept rows, first bad value).
    scanned = dask.compute(*[scan(b) for b in blocks])
    start = 0
    for n, _, bad in scanned:
        if bad is not None and nan == "raise":
            row, field, col, kind = bad
            names = columns.get(field, [field])
            column = names[col] if col < len(names) else f"{field}[{col}]"
            raise DataValidationError(
                f"column {column!r} has {kind} at row {start + row}; clean the "
                f"data or pass nan='drop' to drop such rows"
            )
        start += n
    kept = [k if nan == "drop" else n for n, k, _ in scanned]
    if sum(kept) < 1:
        raise DataValidationError(
            f"no rows left: every one of the {start} rows has a missing or "
            f"non-finite value"
        )
    return start, kept


def _write_blocks(
    dest: _Destination,
    blocks: Sequence[Any],
    *,
    fields: Mapping[str, FieldInfo],
    columns: Mapping[str, Sequence[str]],
    nan: str,
    provenance: dict[str, Any],
) -> Dataset:
    """Scan then write delayed blocks of rows (dicts of field -> array) as a
    dataset store, in tasks on the current Dask scheduler."""
    import dask
    import dask.array as da

    from dasktrain.data.dataset import Dataset

    n_source_rows, kept = _scan_blocks(blocks, columns, nan)
    n_rows = sum(kept)
    ref = create_store(
        dest.url,
        fields=fields,
        n_rows=n_rows,
        chunk_rows=dest.chunk_rows,
        codec=dest.codec,
        overwrite=dest.overwrite,
        provenance=provenance,
        storage_options=dest.storage_options,
    )
    writes: list[Any] = []
    for name, info in fields.items():
        select = dask.delayed(_select_rows, pure=True)
        parts = [
            da.from_delayed(
                select(b, name, info.dtype, nan == "drop"),
                shape=(k, *info.shape),
                dtype=np.dtype(info.dtype),
            )
            for b, k in zip(blocks, kept, strict=True)
            if k
        ]
        column = da.concatenate(parts).astype(info.dtype)
        aligned = column.rechunk(
            {0: dest.chunk_rows, **{a: -1 for a in range(1, column.ndim)}}
        )
        writes.extend(
            dask.delayed(write_chunk, pure=False)(ref, name, chunk_id, chunk)
            for chunk_id, chunk in enumerate(aligned.to_delayed().reshape(-1))
        )
    # Sync point: every chunk is computed and written by the scheduler.
    dask.compute(*writes)
    options = dest.storage_options
    finalize_store(dest.url, provenance=provenance, storage_options=options)
    n_dropped = n_source_rows - n_rows
    logger.info("wrote %d rows (%d dropped) to %s", n_rows, n_dropped, dest.url)
    return Dataset.open(dest.url, storage_options=options)


# -- Parquet ------------------------------------------------------------------


def from_parquet(
    url: str | os.PathLike[str],
    store: str | os.PathLike[str],
    *,
    features: Sequence[str] = (),
    label: str | None = None,
    categorical: Sequence[str] = (),
    encoding: str = "onehot",
    n_buckets: int | None = None,
    ids: Sequence[str] = (),
    label_field: str = "y",
    chunk_rows: int,
    dtype: str = "float32",
    nan: str = "raise",
    codec: str = DEFAULT_CODEC,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Dataset:
    """See :meth:`Dataset.from_parquet`."""
    import dask
    import dask.dataframe as dd
    import pandas as pd

    numeric = _names(features, "features")
    cats = _names(categorical, "categorical")
    id_cols = _names(ids, "ids")
    labels = _names(label, "label")
    if len(labels) > 1:
        raise TypeError(f"label must be one column name, got {label!r}")
    if not numeric and not cats and not id_cols:
        raise ValueError(
            "give at least one feature column (features=, categorical= or ids=)"
        )
    listed = [*numeric, *cats, *id_cols, *labels]
    both = sorted({c for c in listed if listed.count(c) > 1})
    if both:
        raise ValueError(
            f"columns {both} are listed twice (features, categorical, ids, label)"
        )
    for name in (*id_cols, label_field):
        validate_field_name(name)
    taken = {"X", "ids", "values"} if (numeric or cats) else set()
    clash = sorted(taken & {*id_cols, label_field} | set(id_cols) & {label_field})
    if clash:
        raise ValueError(f"field names {clash} are used twice")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    nan = _check_nan(nan)
    x_dtype = _x_dtype(dtype)
    source = os.fspath(url)
    dest = _prepare_destination(store, chunk_rows, codec, overwrite, storage_options)
    try:
        # Reads the schema and footers only, on the client.
        table = dd.read_parquet(source, storage_options=dest.storage_options or None)
    except FileNotFoundError as exc:
        raise StoreNotFoundError(f"no Parquet data at {source!r}: {exc}") from exc
    except Exception as exc:
        raise StoreError(
            f"cannot read Parquet data {source!r}: {type(exc).__name__}: {exc}"
        ) from exc
    wanted = [*numeric, *cats, *id_cols, *labels]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise DataValidationError(
            f"Parquet data {source!r} has no column(s) {missing} "
            f"(columns: {list(table.columns)})"
        )
    for name in (*numeric, *labels):
        column_dtype = table.dtypes[name]
        if not (
            pd.api.types.is_numeric_dtype(column_dtype)
            or pd.api.types.is_bool_dtype(column_dtype)
        ):
            raise DataValidationError(
                f"column {name!r} of {source!r} has non-numeric dtype {column_dtype}; "
                f"list it in categorical= to encode it"
            )
    table = table[wanted]
    listed_cats = (*cats, *id_cols) if encoding == "onehot" else id_cols
    # Sync point: the distinct values of the categorical columns.
    uniques = dask.compute(
        *[table[c].dropna().astype(str).unique() for c in listed_cats]
    )
    found = {
        c: tuple(sorted(str(v) for v in u))
        for c, u in zip(listed_cats, uniques, strict=True)
    }
    categories = tuple((c, found.get(c, ())) for c in cats)
    id_categories = tuple((c, found[c]) for c in id_cols)
    if encoding == "hash":
        n_buckets = DEFAULT_N_BUCKETS if n_buckets is None else int(n_buckets)
        if n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    spec = Encoding(
        numeric,
        categories,
        encoding,
        n_buckets if encoding == "hash" else None,
        labels[0] if labels else None,
        x_dtype,
        id_categories,
        label_field,
    )
    label_dtype = None
    if labels:
        ldt = (
            np.dtype(table.dtypes[labels[0]].numpy_dtype)
            if hasattr(table.dtypes[labels[0]], "numpy_dtype")
            else np.dtype(table.dtypes[labels[0]])
        )
        label_dtype = ldt.name
    fields = spec.fields(label_dtype)
    encode = dask.delayed(_encode_partition, pure=True)
    blocks = [encode(part, spec) for part in table.to_delayed()]
    provenance = {
        "source": "from_parquet",
        "parquet": source,
        "encoding": spec.to_json(),
        "feature_names": spec.feature_names(),
        "nan": nan,
    }
    return _write_blocks(
        dest,
        blocks,
        fields=fields,
        columns=spec.columns(),
        nan=nan,
        provenance=provenance,
    )


def _encode_partition(frame: pd.DataFrame, spec: Encoding) -> dict[str, np.ndarray]:
    """Task: one Parquet partition as dataset fields (a label with missing
    values comes as floats with NaN)."""
    return spec.encode(frame, with_label=True)


# -- xarray -------------------------------------------------------------------


def from_xarray(
    data: Any,
    store: str | os.PathLike[str],
    *,
    features: str | Sequence[str],
    label: str | None = None,
    sample_dims: str | Sequence[str],
    chunk_rows: int,
    dtype: str = "float32",
    nan: str = "raise",
    codec: str = DEFAULT_CODEC,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Dataset:
    """See :meth:`Dataset.from_xarray`."""
    import dask.array as da

    variables = _names(features, "features")
    labels = _names(label, "label")
    dims = _names(sample_dims, "sample_dims")
    if not variables:
        raise ValueError("features needs at least one variable")
    if not dims:
        raise ValueError("sample_dims needs at least one dimension")
    if len(labels) > 1:
        raise TypeError(f"label must be one variable name, got {label!r}")
    nan = _check_nan(nan)
    x_dtype = _x_dtype(dtype)
    if not hasattr(data, "data_vars") or not hasattr(data, "dims"):
        raise TypeError(f"data must be an xarray.Dataset, got {type(data).__name__}")
    dest = _prepare_destination(store, chunk_rows, codec, overwrite, storage_options)
    names = [*variables, *labels]
    missing = [v for v in names if v not in data.variables]
    if missing:
        raise DataValidationError(
            f"the xarray dataset has no variable(s) {missing} "
            f"(data variables: {list(data.data_vars)})"
        )
    for v in names:
        lacking = [d for d in dims if d not in data[v].dims]
        if lacking:
            raise DataValidationError(
                f"variable {v!r} (dims {tuple(data[v].dims)}) lacks the sample "
                f"dimension(s) {lacking}"
            )
        kind = np.dtype(data[v].dtype).kind
        if kind not in _NUMERIC_KINDS:
            raise DataValidationError(
                f"variable {v!r} has non-numeric dtype {data[v].dtype}; dataset "
                f"fields must be bool, integer or float"
            )
    n_rows = math.prod(int(data.sizes[d]) for d in dims)

    def rows_of(v: str) -> da.Array:
        var = data[v]
        rest = [d for d in var.dims if d not in dims]
        values = var.transpose(*dims, *rest).data
        arr = values if isinstance(values, da.Array) else da.from_array(values)
        width = math.prod(int(var.sizes[d]) for d in rest)
        return arr.reshape((n_rows, width) if rest else (n_rows,))

    parts = [rows_of(v) for v in variables]
    parts = [p if p.ndim == 2 else p[:, None] for p in parts]
    columns_x = [
        v for v, p in zip(variables, parts, strict=True) for _ in range(int(p.shape[1]))
    ]
    X = da.concatenate([p.astype(x_dtype) for p in parts], axis=1)
    arrays: dict[str, da.Array] = {"X": X}
    fields = {"X": FieldInfo((int(X.shape[1]),), x_dtype)}
    columns: dict[str, list[str]] = {"X": columns_x}
    if labels:
        y = rows_of(labels[0])
        if y.ndim != 1:
            raise DataValidationError(
                f"label variable {labels[0]!r} has dims {tuple(data[labels[0]].dims)}; "
                f"beyond the sample dimensions {dims} it must have none"
            )
        arrays["y"] = y
        fields["y"] = FieldInfo((), np.dtype(y.dtype).name)
        columns["y"] = [labels[0]]
    blocks = _row_blocks(arrays)
    provenance = {
        "source": "from_xarray",
        "features": list(variables),
        "label": labels[0] if labels else None,
        "sample_dims": list(dims),
        "feature_names": columns_x,
        "nan": nan,
    }
    return _write_blocks(
        dest, blocks, fields=fields, columns=columns, nan=nan, provenance=provenance
    )


def _row_blocks(arrays: Mapping[str, Any]) -> list[Any]:
    """Delayed dicts of field -> rows, one per row block of the first array."""
    import dask

    first = next(iter(arrays.values()))
    row_chunks = first.chunks[0]
    per_field = {}
    for name, a in arrays.items():
        aligned = a.rechunk({0: row_chunks, **{i: -1 for i in range(1, a.ndim)}})
        per_field[name] = aligned.to_delayed().reshape(-1)
    make = dask.delayed(dict, pure=True)
    return [
        make(**{name: blocks[i] for name, blocks in per_field.items()})
        for i in range(len(row_chunks))
    ]


# -- Zarr: in place, or rechunked ---------------------------------------------


@dataclass(frozen=True)
class _SourceArray:
    path: str
    array: zarr.Array
    axis: int

    @property
    def n_rows(self) -> int:
        return int(self.array.shape[self.axis])

    @property
    def row_chunk(self) -> int:
        chunks = (
            self.array.shards if self.array.shards is not None else self.array.chunks
        )
        return int(chunks[self.axis])

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for i, s in enumerate(self.array.shape) if i != self.axis)


def _dimension_names(array: zarr.Array) -> tuple[str, ...] | None:
    names = getattr(array.metadata, "dimension_names", None)
    if names:
        return tuple(str(n) for n in names)
    attr = array.attrs.get(_XARRAY_DIMS_ATTR)
    if isinstance(attr, list):
        return tuple(str(n) for n in attr)
    return None


def _resolve_source(
    group: zarr.Group, url: str, path: str, sample_dim: str | None
) -> _SourceArray:
    try:
        node = group.get(path)
    except Exception as exc:
        raise StoreError(f"cannot open array {path!r} of {url!r}: {exc}") from exc
    if not isinstance(node, zarr.Array):
        arrays = sorted(name for name, _ in group.arrays())
        raise DataValidationError(
            f"Zarr store {url!r} has no array {path!r} (arrays: {', '.join(arrays)})"
        )
    if node.dtype.kind not in _NUMERIC_KINDS:
        raise DataValidationError(
            f"array {path!r} of {url!r} has non-numeric dtype {node.dtype}; dataset "
            f"fields must be bool, integer or float"
        )
    if node.ndim < 1:
        raise DataValidationError(f"array {path!r} of {url!r} is a scalar")
    axis = 0
    if sample_dim is not None:
        dims = _dimension_names(node)
        if dims is None or sample_dim not in dims:
            raise DataValidationError(
                f"array {path!r} of {url!r} has no dimension {sample_dim!r} "
                f"(dimensions: {dims})"
            )
        axis = dims.index(sample_dim)
    return _SourceArray(path, node, axis)


def from_zarr(
    group: str | os.PathLike[str],
    *,
    fields: Mapping[str, str | Sequence[str]],
    sample_dim: str | None = None,
    store: str | os.PathLike[str] | None = None,
    chunk_rows: int | None = None,
    nan: str = "raise",
    codec: str = DEFAULT_CODEC,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Dataset:
    """See :meth:`Dataset.from_zarr`."""
    from dasktrain.data.dataset import Dataset

    url = normalize_url(group)
    options = check_storage_options(storage_options)
    nan = _check_nan(nan)
    if not isinstance(fields, Mapping) or not fields:
        raise TypeError("fields must be a non-empty dict: field name -> array name(s)")
    if not store_exists(url, options):
        raise StoreNotFoundError(f"no Zarr store at {url!r}")
    try:
        root = open_source_group(url, options)
    except Exception as exc:
        raise StoreError(
            f"cannot open {url!r} as a Zarr group: {type(exc).__name__}: {exc}"
        ) from exc
    sources: dict[str, list[_SourceArray]] = {}
    for name, paths in fields.items():
        validate_field_name(name)
        names = _names(paths, f"fields[{name!r}]")
        if not names:
            raise ValueError(f"fields[{name!r}] names no array")
        if len(names) > 1 and name != "X":
            raise DataValidationError(
                f"field {name!r} names {len(names)} arrays {list(names)}; only 'X' "
                f"may combine several arrays (as feature columns)"
            )
        sources[name] = [_resolve_source(root, url, p, sample_dim) for p in names]
    every = [s for group_ in sources.values() for s in group_]
    n_rows = every[0].n_rows
    for s in every:
        if s.n_rows != n_rows:
            raise DataValidationError(
                f"arrays {every[0].path!r} ({n_rows} rows) and {s.path!r} "
                f"({s.n_rows} rows) of {url!r} differ in length along the sample axis"
            )
    if n_rows < 1:
        raise DataValidationError(f"the arrays of {url!r} have no rows")
    described: dict[str, FieldInfo] = {}
    for name, group_ in sources.items():
        if name == "X":
            width = sum(math.prod(s.row_shape) for s in group_)
            kinds = {s.array.dtype.name for s in group_}
            dtype = "float32" if kinds == {"float32"} else "float64"
            described[name] = FieldInfo((width,), dtype)
        else:
            s = group_[0]
            described[name] = FieldInfo(s.row_shape, s.array.dtype.name)
    row_chunks = {s.row_chunk for s in every}
    compatible = len(row_chunks) == 1 and (
        chunk_rows is None or chunk_rows == next(iter(row_chunks))
    )
    if compatible and nan == "raise":
        return Dataset(_in_place_info(url, sources, described, n_rows, options))
    if store is None:
        chunking = ", ".join(f"{s.path!r}: {s.row_chunk}" for s in every)
        why = (
            "nan='drop' removes rows"
            if compatible
            else f"its arrays are not chunked alike along the sample axis ({chunking})"
            if len(row_chunks) > 1
            else f"chunk_rows={chunk_rows} differs from its row chunks ({chunking})"
        )
        raise DataValidationError(
            f"Zarr store {url!r} cannot be read in place: {why}; pass store= to "
            f"rechunk it into a new dataset store on the workers"
        )
    return _rechunk_copy(
        url,
        sources,
        described,
        store=store,
        chunk_rows=chunk_rows or max(row_chunks),
        nan=nan,
        codec=codec,
        overwrite=overwrite,
        storage_options=options,
        sample_dim=sample_dim,
    )


def _in_place_info(
    url: str,
    sources: Mapping[str, Sequence[_SourceArray]],
    described: Mapping[str, FieldInfo],
    n_rows: int,
    options: dict[str, Any],
) -> StoreInfo:
    chunk_rows = sources[next(iter(sources))][0].row_chunk
    refs = tuple(
        sorted(
            (
                name,
                FieldSource(
                    tuple(s.path for s in group_),
                    tuple(s.axis for s in group_),
                    tuple(source_signature(s.array) for s in group_),
                ),
            )
            for name, group_ in sources.items()
        )
    )
    identity = json.dumps(
        {
            "url": url,
            "n_rows": n_rows,
            "chunk_rows": chunk_rows,
            "fields": {
                name: [list(src.arrays), list(src.sample_axes), list(src.signatures)]
                for name, src in refs
            },
        },
        sort_keys=True,
    )
    view_uuid = hashlib.sha256(identity.encode()).hexdigest()[:32]
    ref = DatasetRef(
        url,
        view_uuid,
        n_rows,
        chunk_rows,
        tuple(sorted(described.items())),
        options,
        refs,
    )
    provenance = {
        "source": "from_zarr",
        "in_place": True,
        "zarr": url,
        "fields": {name: list(src.arrays) for name, src in refs},
        "sample_axes": {name: list(src.sample_axes) for name, src in refs},
    }
    logger.info(
        "dataset %s read in place: %d rows in chunks of %d", url, n_rows, chunk_rows
    )
    return StoreInfo(ref, IN_PLACE_CODEC, provenance, 1)


def _rechunk_copy(
    url: str,
    sources: Mapping[str, Sequence[_SourceArray]],
    described: Mapping[str, FieldInfo],
    *,
    store: str | os.PathLike[str],
    chunk_rows: int,
    nan: str,
    codec: str,
    overwrite: bool,
    storage_options: dict[str, Any],
    sample_dim: str | None,
) -> Dataset:
    import dask.array as da

    dest = _prepare_destination(store, chunk_rows, codec, overwrite, storage_options)
    if dest.url == url:
        raise StoreError(f"store= must differ from the source store {url!r}")
    arrays: dict[str, da.Array] = {}
    columns: dict[str, list[str]] = {}
    for name, group_ in sources.items():
        info = described[name]
        parts = []
        for s in group_:
            # Workers read the source's own chunks (the zarr array pickles as
            # its store path and metadata).
            a = da.from_array(s.array, chunks=s.array.chunks, asarray=True)
            a = da.moveaxis(a, s.axis, 0)
            parts.append(a)
        if len(parts) == 1:
            arrays[name] = parts[0].reshape((parts[0].shape[0], *info.shape))
        else:
            arrays[name] = da.concatenate(
                [p.reshape((p.shape[0], -1)) for p in parts], axis=1
            )
        columns[name] = (
            [s.path for s in group_ for _ in range(math.prod(s.row_shape))]
            if name == "X"
            else [group_[0].path]
        )
    provenance = {
        "source": "from_zarr",
        "in_place": False,
        "zarr": url,
        "fields": {name: [s.path for s in g] for name, g in sources.items()},
        "sample_dim": sample_dim,
        "nan": nan,
    }
    return _write_blocks(
        dest,
        _row_blocks(arrays),
        fields=described,
        columns=columns,
        nan=nan,
        provenance=provenance,
    )
