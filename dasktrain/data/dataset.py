"""The :class:`Dataset`: a Zarr dataset store, or a view of some of its chunks."""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dasktrain.data.io import (
    DEFAULT_CODEC,
    DatasetRef,
    StoreInfo,
    check_chunk_rows,
    check_codec,
    check_storage_options,
    create_store,
    existing_store_message,
    finalize_store,
    normalize_url,
    read_chunk,
    read_store_info,
    store_exists,
    validate_field_name,
    write_array,
    write_chunk,
)
from dasktrain.errors import DataValidationError, StoreError
from dasktrain.schema import FieldInfo, Schema

if TYPE_CHECKING:
    import dask.array

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHUNK_ROWS", "Dataset"]

#: Rows per chunk when none is given: 65,536 rows of 100 float32 features are
#: 26 MB decoded, large enough to amortize per-task overhead.
DEFAULT_CHUNK_ROWS = 65_536
#: Accepted dtypes for the feature matrix ``X``.
X_DTYPES = ("float32", "float64")
_NUMERIC_KINDS = "biuf"
_FRACTION_DIGITS = 9


class Dataset:
    """A dataset store on disk (or a view of some of its chunks).

    Create one with :meth:`from_arrays`, :meth:`from_dask`,
    :meth:`from_parquet`, :meth:`from_xarray`, :meth:`from_zarr` (in place,
    without a copy, when the store's row chunks allow it), :meth:`open` or a
    generator in :mod:`dasktrain.datasets`.  A ``Dataset`` holds metadata
    only; workers read the chunks.  Views (from :meth:`split` and
    :meth:`subset`) share the store and differ only in :attr:`chunk_ids`.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> import dasktrain as dt
    >>> X = np.random.default_rng(0).standard_normal((1000, 3)).astype(np.float32)
    >>> path = os.path.join(tempfile.mkdtemp(), "train.zarr")
    >>> ds = dt.Dataset.from_arrays(path, X=X, y=(X[:, 0] > 0), chunk_rows=256)
    >>> ds.n_rows, ds.n_features, ds.n_chunks, ds.chunk_rows
    (1000, 3, 4, 256)
    >>> train, val = ds.split(val_fraction=0.25, seed=0)
    >>> train.n_chunks, val.n_chunks
    (3, 1)
    """

    __slots__ = ("_chunk_ids", "_info")

    def __init__(self, info: StoreInfo, chunk_ids: Iterable[int] | None = None) -> None:
        self._info = info
        if chunk_ids is None:
            self._chunk_ids: tuple[int, ...] = tuple(range(info.ref.n_chunks))
        else:
            self._chunk_ids = tuple(int(c) for c in chunk_ids)

    # -- creating and opening -------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Dataset:
        """Open and validate a complete dataset store, reading only metadata.

        Parameters
        ----------
        path : str or os.PathLike
            Local path, ``file://`` URL or fsspec URL (``s3://bucket/d.zarr``).
        storage_options : dict, optional
            fsspec options of a remote store (credentials, endpoint...):
            JSON-serializable, sent with the dataset to the workers.  Without
            them, fsspec and the storage library configure themselves from the
            environment (e.g. ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``).
            Ignored for local paths.

        Raises
        ------
        StoreNotFoundError
            Nothing exists at ``path`` (or its bucket does not exist).
        StoreError
            Not a Zarr group, not a dasktrain dataset, incomplete (its writing
            was interrupted), or an array is missing or has the wrong length,
            chunking or dtype; the message names the store and array.  For
            a remote store also denied access, missing credentials or an
            unreachable endpoint (the message names the URL).

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> _ = Dataset.from_arrays(path, y=np.zeros(10, np.float32), chunk_rows=4)
        >>> Dataset.open(path).n_chunks
        3
        """
        return cls(read_store_info(path, storage_options=storage_options))

    @classmethod
    def from_arrays(
        cls,
        path: str | os.PathLike[str],
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        codec: str = DEFAULT_CODEC,
        overwrite: bool = False,
        source: str = "from_arrays",
        storage_options: Mapping[str, Any] | None = None,
        **arrays: Any,
    ) -> Dataset:
        """Write in-memory arrays as a new dataset store.

        Parameters
        ----------
        path : str or os.PathLike
            Local path or fsspec URL of the store to create.
        chunk_rows : int
            Rows per chunk; chunk ``i`` holds rows
            ``[i * chunk_rows, (i + 1) * chunk_rows)``.
        codec : {"lz4", "zstd", "none"}
            Chunk compression (default :data:`~dasktrain.data.io.DEFAULT_CODEC`).
        overwrite : bool
            Replace an existing dataset store at ``path``.  Without it an
            existing path is an error; with it, anything that is not a
            dasktrain dataset store is still refused.
        source : str
            Recorded in the store's provenance.
        storage_options : dict, optional
            fsspec options of a remote store (see :meth:`open`).
        **arrays : array-like
            The fields, by name (``X=..., y=...``): equal lengths, bool,
            integer or float dtypes.  ``X``, if given, must be 2-d float32 or
            float64.

        Returns
        -------
        Dataset

        Raises
        ------
        DataValidationError
            Bad arrays (the message names the array); nothing is written.
        StoreError
            ``path`` exists (and ``overwrite`` is false, or it is not a
            dataset store).
        ValueError
            Bad ``chunk_rows`` or ``codec``.

        Notes
        -----
        The store is marked complete only after every chunk is written.  If
        writing fails, the incomplete store is left in place: :meth:`open`
        refuses it and ``overwrite=True`` replaces it.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> X = np.ones((10, 2), np.float32)
        >>> ds = Dataset.from_arrays(path, X=X, y=np.arange(10), chunk_rows=4)
        >>> ds.fields["y"]
        FieldInfo(shape=(), dtype='int64')
        """
        url = normalize_url(path)
        check_chunk_rows(chunk_rows)
        check_codec(codec)
        options = check_storage_options(storage_options)
        values = {name: _as_numpy(name, a) for name, a in arrays.items()}
        fields, n_rows = _describe_arrays(
            {name: (a.shape, a.dtype) for name, a in values.items()}
        )
        _check_destination(url, overwrite, options)
        ref = create_store(
            url,
            fields=fields,
            n_rows=n_rows,
            chunk_rows=chunk_rows,
            codec=codec,
            overwrite=overwrite,
            provenance={"source": source},
            storage_options=options,
        )
        for name, a in values.items():
            write_array(ref, name, _native(a))
        finalize_store(url, provenance={"source": source}, storage_options=options)
        return cls.open(url, storage_options=options)

    @classmethod
    def from_dask(
        cls,
        path: str | os.PathLike[str],
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        codec: str = DEFAULT_CODEC,
        overwrite: bool = False,
        source: str = "from_dask",
        storage_options: Mapping[str, Any] | None = None,
        **arrays: Any,
    ) -> Dataset:
        """Write Dask arrays as a new dataset store, in parallel, chunk by chunk.

        Each array is rechunked to ``chunk_rows`` rows (whole rows per chunk)
        and every chunk is computed and written by one task on the current
        Dask scheduler; the arrays are never loaded as a whole.  Options and
        errors are those of :meth:`from_arrays`.

        Examples
        --------
        >>> import dask, dask.array as da, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> X = da.ones((10, 2), chunks=(3, 2), dtype="float32")
        >>> with dask.config.set(scheduler="synchronous"):
        ...     ds = Dataset.from_dask(path, X=X, chunk_rows=4)
        >>> ds.n_chunks, float(ds.read("X", 2).sum())
        (3, 4.0)
        """
        import dask
        import dask.array as da

        url = normalize_url(path)
        check_chunk_rows(chunk_rows)
        check_codec(codec)
        options = check_storage_options(storage_options)
        values: dict[str, da.Array] = {}
        for name, a in arrays.items():
            try:
                values[name] = a if isinstance(a, da.Array) else da.asarray(a)
            except Exception as exc:
                raise DataValidationError(
                    f"array {name!r} cannot be converted to a dask array: {exc}"
                ) from exc
        for name, a in values.items():
            if any(math.isnan(s) for s in a.shape):
                raise DataValidationError(
                    f"array {name!r} has unknown chunk sizes {a.shape}; call "
                    f"{name}.compute_chunk_sizes() first"
                )
        fields, n_rows = _describe_arrays(
            {name: (a.shape, a.dtype) for name, a in values.items()}
        )
        _check_destination(url, overwrite, options)
        ref = create_store(
            url,
            fields=fields,
            n_rows=n_rows,
            chunk_rows=chunk_rows,
            codec=codec,
            overwrite=overwrite,
            provenance={"source": source},
            storage_options=options,
        )
        writes: list[Any] = []
        for name, a in values.items():
            dtype = np.dtype(fields[name].dtype)
            aligned = a.astype(dtype).rechunk(
                {0: ref.chunk_rows, **{axis: -1 for axis in range(1, a.ndim)}}
            )
            blocks = aligned.to_delayed().reshape(-1)
            writes.extend(
                dask.delayed(write_chunk, pure=False)(ref, name, chunk_id, block)
                for chunk_id, block in enumerate(blocks)
            )
        # Sync point: every chunk is computed and written by the scheduler.
        dask.compute(*writes)
        finalize_store(url, provenance={"source": source}, storage_options=options)
        return cls.open(url, storage_options=options)

    @classmethod
    def from_parquet(
        cls,
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
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        dtype: str = "float32",
        nan: str = "raise",
        codec: str = DEFAULT_CODEC,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Dataset:
        """Write a Parquet table (file, directory or fsspec URL) as a dataset
        store, out of core, in tasks on the current Dask scheduler.

        The table is read through ``dask.dataframe``, one partition per task;
        the client reads the schema and receives row counts only.

        Parameters
        ----------
        url : str or os.PathLike
            Parquet data (anything ``dask.dataframe.read_parquet`` reads).
        store : str or os.PathLike
            The dataset store to write.
        features : list of str
            Numeric (or bool) columns, in order, the first columns of ``X``.
        label : str, optional
            The label column, written as ``y`` with its own dtype.
        categorical : list of str
            Columns of categories (strings, integers...).
            ``encoding="onehot"`` appends one ``X`` column per category seen
            (sorted); ``encoding="hash"`` writes every feature column as a
            hashed id in ``ids`` with its value in ``values`` (1 for a
            category), for :class:`~dasktrain.models.SparseLogisticRegression`
            ``(n_buckets, use_values=True)``.  The encoding is kept in
            ``provenance["encoding"]``; :meth:`encode` applies it to new rows.
        n_buckets : int, optional
            Hash buckets of ``encoding="hash"`` (default ``2**20``).
        ids : list of str
            Categorical columns written as int64 fields of their own name:
            the index of each value among the column's sorted categories
            (``provenance["encoding"]["ids"]`` lists them), e.g. ``user`` and
            ``item`` for :class:`~dasktrain.models.MatrixFactorization`
            ``(n_users=len(categories of user), ...)``.
        label_field : str
            Field name of the label (``"rating"`` for matrix factorization).
        chunk_rows : int
            Rows per chunk of the new store.
        dtype : {"float32", "float64"}
            Dtype of ``X`` (or ``values``).
        nan : {"raise", "drop"}
            A missing or non-finite value (numeric NaN/inf, a null category
            or label): raise :class:`DataValidationError` naming the column
            and row before anything is written, or drop the row.
        codec, overwrite, storage_options
            As for :meth:`from_arrays`; ``storage_options`` is used to read
            ``url`` and to write ``store``.

        Raises
        ------
        DataValidationError
            A missing column, a non-numeric feature or label (the message
            names it and suggests ``categorical=``), or (``nan="raise"``) a
            missing value (naming column and row).
        StoreNotFoundError
            Nothing at ``url``.

        Examples
        --------
        See :mod:`dasktrain.data.ingest`.
        """
        from dasktrain.data.ingest import from_parquet

        return from_parquet(
            url,
            store,
            features=features,
            label=label,
            categorical=categorical,
            encoding=encoding,
            n_buckets=n_buckets,
            ids=ids,
            label_field=label_field,
            chunk_rows=chunk_rows,
            dtype=dtype,
            nan=nan,
            codec=codec,
            overwrite=overwrite,
            storage_options=storage_options,
        )

    @classmethod
    def from_xarray(
        cls,
        data: Any,
        store: str | os.PathLike[str],
        *,
        features: str | Sequence[str],
        label: str | None = None,
        sample_dims: str | Sequence[str],
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        dtype: str = "float32",
        nan: str = "raise",
        codec: str = DEFAULT_CODEC,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Dataset:
        """Write variables of an ``xarray.Dataset`` as a dataset store, in
        tasks on the current Dask scheduler (dask-backed variables are never
        loaded whole).

        Rows are the points of ``sample_dims`` (one dimension, or several
        stacked in C order: ``("time", "lat", "lon")`` makes a row per grid
        point and time), wherever they sit among a variable's dimensions.
        Each feature variable contributes its remaining dimensions, flattened
        in C order, as columns of ``X`` (``provenance["feature_names"]`` names
        the variable of each column); ``label`` must have no other dimension.

        ``dtype``, ``nan``, ``chunk_rows``, ``codec``, ``overwrite`` and
        ``storage_options`` are those of :meth:`from_parquet`.

        Raises
        ------
        DataValidationError
            A missing variable, one lacking a sample dimension, a non-numeric
            one, or (``nan="raise"``) a missing value (naming variable and row).

        Examples
        --------
        >>> import numpy as np, xarray as xr, tempfile, os, dask
        >>> grid = xr.Dataset({"t": (("lat", "time"), np.arange(6.0).reshape(2, 3))})
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> with dask.config.set(scheduler="synchronous"):
        ...     ds = Dataset.from_xarray(grid, path, features=["t"], sample_dims="time",
        ...                              chunk_rows=2)
        >>> ds.read("X", 0)
        array([[0., 3.],
               [1., 4.]], dtype=float32)
        """
        from dasktrain.data.ingest import from_xarray

        return from_xarray(
            data,
            store,
            features=features,
            label=label,
            sample_dims=sample_dims,
            chunk_rows=chunk_rows,
            dtype=dtype,
            nan=nan,
            codec=codec,
            overwrite=overwrite,
            storage_options=storage_options,
        )

    @classmethod
    def from_zarr(
        cls,
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
        """Train on an existing Zarr group (v2 or v3): in place when its
        chunks allow it, else through a rechunked copy.

        ``fields`` maps dataset fields to the group's arrays: ``{"X": ["t2m",
        "u10"], "y": "rain"}``.  ``X`` may combine several arrays: each
        one's non-sample axes are flattened (C order) into columns.  Rows are
        indexed by axis 0, or by the dimension ``sample_dim`` (found in Zarr
        v3 ``dimension_names`` or xarray's ``_ARRAY_DIMENSIONS``), in any
        position.

        **In place** (no copy, nothing written): when every array has the
        same chunk length along its sample axis (its shard length, if it is
        sharded), as stores written by xarray or dask with row chunks have.
        The returned dataset describes which arrays feed which field; workers
        read the source chunks directly, each dataset chunk being one chunk
        length of rows (other axes may be chunked in any way).  Values are
        cast to the field dtype on read (``X``: float32 if every source is
        float32, else float64).  Chunks the writer skipped read as the fill
        value (as in Zarr); non-finite values are found during training
        (``fit(on_nonfinite=...)``).  Its :attr:`uuid` is derived from the
        arrays' names, shapes, chunks and dtypes, so the same call describes
        the same dataset (a resumed run accepts it); a read refuses an array
        whose shape, chunks or dtype have changed since.

        **Rechunked copy**: when the chunk lengths differ, ``chunk_rows``
        asks for other chunks, or ``nan="drop"``, the data is rechunked on
        the workers into the new dataset store ``store`` (required then),
        with the options and checks of :meth:`from_parquet`.

        Raises
        ------
        DataValidationError
            A missing array (the message lists the group's arrays), a
            non-numeric one, a missing sample dimension, lengths that differ
            along the sample axis, or a copy needed without ``store``.
        StoreNotFoundError
            Nothing at ``group``.

        Examples
        --------
        >>> import numpy as np, zarr, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "src.zarr")
        >>> root = zarr.open_group(path, mode="w")
        >>> a = root.create_array("a", shape=(10, 2), chunks=(4, 2), dtype="f4")
        >>> a[:] = np.arange(20).reshape(10, 2)
        >>> ds = Dataset.from_zarr(path, fields={"X": "a"})
        >>> ds.n_chunks, ds.codec, ds.read("X", 2)
        (3, 'in-place', array([[16., 17.],
               [18., 19.]], dtype=float32))
        """
        from dasktrain.data.ingest import from_zarr

        return from_zarr(
            group,
            fields=fields,
            sample_dim=sample_dim,
            store=store,
            chunk_rows=chunk_rows,
            nan=nan,
            codec=codec,
            overwrite=overwrite,
            storage_options=storage_options,
        )

    def encode(self, frame: Any) -> dict[str, np.ndarray]:
        """Model inputs of new rows (a pandas DataFrame), encoded as this
        dataset's table was (:meth:`from_parquet`): ``{"X": ...}`` or
        ``{"ids": ..., "values": ...}``, ready for ``Trainer.predict``.

        Raises
        ------
        ValueError
            The dataset was not written from a table.
        """
        from dasktrain.data.ingest import Encoding

        spec = self._info.provenance.get("encoding")
        if not isinstance(spec, dict):
            raise ValueError(
                f"dataset {self.path!r} was not written from a table "
                f"(Dataset.from_parquet); it has no encoding"
            )
        return Encoding.from_json(spec).encode(frame)

    # -- description ----------------------------------------------------------

    @property
    def path(self) -> str:
        """Absolute path (or fsspec URL) of the store."""
        return self._info.ref.url

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options of a remote store (``{}`` for a local one); a copy."""
        return dict(self._info.ref.storage_options)

    @property
    def ref(self) -> DatasetRef:
        """Small picklable description of the store, for worker tasks."""
        return self._info.ref

    @property
    def uuid(self) -> str:
        """Identity of the store; new for every written store."""
        return self._info.ref.uuid

    @property
    def codec(self) -> str:
        """Compression of the chunks: ``"none"``, ``"lz4"`` or ``"zstd"``
        (``"in-place"`` for a foreign store read by :meth:`from_zarr`)."""
        return self._info.codec

    @property
    def in_place(self) -> bool:
        """Whether this dataset reads a foreign Zarr group in place."""
        return self._info.ref.in_place

    @property
    def feature_names(self) -> list[str] | None:
        """Names of the columns of ``X`` (of ``ids`` for hashed features),
        when the dataset was written from a table or an xarray dataset."""
        names = self._info.provenance.get("feature_names")
        return [str(n) for n in names] if isinstance(names, list) else None

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the data came from (``source``, ``created``, generator
        parameters, ...); a copy."""
        return dict(self._info.provenance)

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk (the store's last chunk may be shorter)."""
        return self._info.ref.chunk_rows

    @property
    def chunk_ids(self) -> tuple[int, ...]:
        """Store chunk indices in this view, ascending."""
        return self._chunk_ids

    @property
    def n_chunks(self) -> int:
        """Number of chunks in this view."""
        return len(self._chunk_ids)

    @property
    def n_rows(self) -> int:
        """Number of rows in this view."""
        ref = self._info.ref
        return sum(ref.chunk_n_rows(c) for c in self._chunk_ids)

    @property
    def fields(self) -> dict[str, FieldInfo]:
        """Arrays of the store by name: row shape and dtype."""
        return dict(self._info.ref.fields)

    @property
    def schema(self) -> Schema:
        """The fields as a :class:`~dasktrain.schema.Schema`, for models."""
        return Schema(self.fields)

    @property
    def n_features(self) -> int:
        """Width of ``X`` (0 if the dataset has no ``X``)."""
        return self.schema.n_features

    @property
    def nbytes(self) -> int:
        """Uncompressed size of this view, in bytes."""
        row_bytes = sum(
            math.prod(info.shape) * np.dtype(info.dtype).itemsize
            for _, info in self._info.ref.fields
        )
        return self.n_rows * row_bytes

    def chunk_bounds(self, chunk_id: int) -> tuple[int, int]:
        """Global ``(start_row, stop_row)`` of a store chunk."""
        return self._info.ref.chunk_bounds(chunk_id)

    def chunk_n_rows(self, chunk_id: int) -> int:
        """Rows in a store chunk."""
        return self._info.ref.chunk_n_rows(chunk_id)

    # -- views ----------------------------------------------------------------

    def split(
        self, val_fraction: float = 0.1, *, seed: int = 0
    ) -> tuple[Dataset, Dataset]:
        """Split into training and validation views by whole chunks (no copy).

        ``ceil(val_fraction * n_chunks)`` chunks, chosen at random with
        ``seed``, go to validation; each side keeps at least one chunk.

        Raises
        ------
        ValueError
            ``val_fraction`` outside ``(0, 1)``, or fewer than 2 chunks.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> ds = Dataset.from_arrays(path, y=np.zeros(100, np.float32), chunk_rows=10)
        >>> train, val = ds.split(0.2, seed=1)
        >>> len(train.chunk_ids), len(val.chunk_ids)
        (8, 2)
        >>> sorted(train.chunk_ids + val.chunk_ids) == list(ds.chunk_ids)
        True
        """
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, int | float)
            or not 0 < val_fraction < 1
        ):
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        n = self.n_chunks
        if n < 2:
            raise ValueError(
                f"cannot split dataset {self.path!r}: it has {n} chunk(s) and a "
                f"split needs at least 2 (write it with a smaller chunk_rows)"
            )
        n_val = math.ceil(round(val_fraction * n, _FRACTION_DIGITS))
        n_val = min(max(n_val, 1), n - 1)
        rng = np.random.default_rng(seed)
        picked = rng.choice(n, size=n_val, replace=False)
        val_ids = sorted(self._chunk_ids[int(i)] for i in picked)
        taken = set(val_ids)
        train_ids = [c for c in self._chunk_ids if c not in taken]
        return Dataset(self._info, train_ids), Dataset(self._info, val_ids)

    def subset(self, chunk_ids: Iterable[int]) -> Dataset:
        """A view of some of this view's chunks (sorted ascending).

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> ds = Dataset.from_arrays(path, y=np.zeros(10, np.float32), chunk_rows=4)
        >>> ds.subset([2, 0]).chunk_ids, ds.subset([2]).n_rows
        ((0, 2), 2)
        """
        ids = [int(c) for c in chunk_ids]
        if not ids:
            raise ValueError("subset() needs at least one chunk id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate chunk ids in {ids}")
        available = set(self._chunk_ids)
        outside = sorted(set(ids) - available)
        if outside:
            raise ValueError(
                f"chunks {outside} are not in this view of {self.path!r} "
                f"({self.n_chunks} chunks: {_short_ids(self._chunk_ids)})"
            )
        return Dataset(self._info, sorted(ids))

    def with_transform(
        self,
        field: str,
        *,
        shift: Sequence[float],
        scale: Sequence[float],
    ) -> Dataset:
        """A view whose reads of ``field`` (a 2-d float field) give
        ``(values - shift) / scale`` per column, computed on the workers as
        chunks are read (no copy).  The trainer reads standardized data this
        way (``Trainer(..., standardize=True)``).

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> ds = Dataset.from_arrays(path, X=np.ones((4, 2)), chunk_rows=2)
        >>> ds.with_transform("X", shift=[1.0, 0.0], scale=[1.0, 4.0]).read("X", 1)
        array([[0.  , 0.25],
               [0.  , 0.25]])
        """
        from dataclasses import replace

        from dasktrain.data.io import Affine

        info = self._info.ref.field(field)
        if len(info.shape) != 1 or np.dtype(info.dtype).kind != "f":
            raise DataValidationError(
                f"field {field!r} of {self.path!r} ({info.dtype}, row shape "
                f"{info.shape}) cannot be transformed: it must be a 2-d float array"
            )
        shift_t = tuple(float(v) for v in shift)
        scale_t = tuple(float(v) for v in scale)
        width = info.shape[0]
        if len(shift_t) != width or len(scale_t) != width:
            raise ValueError(
                f"shift and scale need {width} values (the columns of {field!r}), "
                f"got {len(shift_t)} and {len(scale_t)}"
            )
        if not all(math.isfinite(v) for v in shift_t) or not all(
            math.isfinite(v) and v > 0 for v in scale_t
        ):
            raise ValueError("shift must be finite and scale finite and > 0")
        ref = self._info.ref
        kept = tuple((n, a) for n, a in ref.transforms if n != field)
        new_ref = replace(ref, transforms=(*kept, (field, Affine(shift_t, scale_t))))
        return Dataset(replace(self._info, ref=new_ref), self._chunk_ids)

    # -- reading (client side, for tests and inspection) ----------------------

    def read(self, field: str, chunk_id: int) -> np.ndarray:
        """Read one chunk of one array of this view.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> ds = Dataset.from_arrays(path, y=np.arange(10.0), chunk_rows=4)
        >>> ds.read("y", 1)
        array([4., 5., 6., 7.])
        """
        if int(chunk_id) not in self._chunk_ids:
            raise IndexError(
                f"chunk {chunk_id} is not in this view of {self.path!r} "
                f"(chunks: {_short_ids(self._chunk_ids)})"
            )
        return read_chunk(self._info.ref, field, chunk_id)

    def to_dask(self, field: str) -> dask.array.Array:
        """A lazy Dask array of one field over this view's chunks, in order.

        Each Dask chunk is one store chunk, read by
        :func:`~dasktrain.data.io.read_chunk` (missing chunks are errors).

        Examples
        --------
        >>> import numpy as np, tempfile, os, dask
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> ds = Dataset.from_arrays(path, y=np.arange(10.0), chunk_rows=4)
        >>> view = ds.subset([0, 2])
        >>> view.to_dask("y").compute(scheduler="synchronous")
        array([0., 1., 2., 3., 8., 9.])
        """
        import dask.array as da

        info = self._info.ref.field(field)
        dtype = np.dtype(info.dtype)
        ids = da.from_array(np.asarray(self._chunk_ids, dtype=np.int64), chunks=1)
        row_chunks = tuple(self.chunk_n_rows(c) for c in self._chunk_ids)
        new_axis = list(range(1, 1 + len(info.shape)))
        return da.map_blocks(
            read_dask_block,
            ids,
            ref=self._info.ref,
            field=field,
            chunks=(row_chunks, *((s,) for s in info.shape)),
            new_axis=new_axis or None,
            dtype=dtype,
            meta=np.empty((0, *info.shape), dtype=dtype),
            token=f"dasktrain-read-{field}",
        )

    def head(self, n: int = 5) -> dict[str, np.ndarray]:
        """The first ``n`` rows of the view, for each field.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> ds = Dataset.from_arrays(path, y=np.arange(10.0), chunk_rows=4)
        >>> ds.head(6)["y"]
        array([0., 1., 2., 3., 4., 5.])
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.fields}
        remaining = n
        for chunk_id in self._chunk_ids:
            if remaining <= 0:
                break
            take = min(remaining, self.chunk_n_rows(chunk_id))
            for name in parts:
                parts[name].append(read_chunk(self._info.ref, name, chunk_id)[:take])
            remaining -= take
        out = {}
        for name, info in self.fields.items():
            if parts[name]:
                out[name] = np.concatenate(parts[name])
            else:
                out[name] = np.empty((0, *info.shape), dtype=info.dtype)
        return out

    # -- comparison and display -----------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Dataset):
            return NotImplemented
        return self.ref == other.ref and self._chunk_ids == other._chunk_ids

    def __hash__(self) -> int:
        return hash((self.ref, self._chunk_ids))

    def __getstate__(self) -> tuple[StoreInfo, tuple[int, ...]]:
        return self._info, self._chunk_ids

    def __setstate__(self, state: tuple[StoreInfo, tuple[int, ...]]) -> None:
        self._info, self._chunk_ids = state

    def _is_view(self) -> bool:
        return self.n_chunks != self._info.ref.n_chunks

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}: {info.dtype}{_shape_text(info)}"
            for name, info in self.fields.items()
        )
        view = (
            f" (view of {self.n_chunks} of {self._info.ref.n_chunks} chunks)"
            if self._is_view()
            else ""
        )
        return (
            f"<dasktrain.Dataset {self.path!r}: {self.n_rows:,} rows in "
            f"{self.n_chunks} chunks of {self.chunk_rows:,}{view}; {fields}; "
            f"codec {self.codec}; {_format_bytes(self.nbytes)}>"
        )

    def _repr_html_(self) -> str:
        esc = html.escape
        field_rows = "".join(
            f"<tr><td style='text-align:left'><code>{esc(name)}</code></td>"
            f"<td style='text-align:left'>{esc(str((self.n_rows, *info.shape)))}</td>"
            f"<td style='text-align:left'>{esc(info.dtype)}</td></tr>"
            for name, info in self.fields.items()
        )
        chunks = f"{self.n_chunks} &times; {self.chunk_rows:,} rows"
        if self._is_view():
            chunks += f" (view of {self._info.ref.n_chunks})"
        summary = [
            ("path", f"<code>{esc(self.path)}</code>"),
            ("rows", f"{self.n_rows:,}"),
            ("chunks", chunks),
            ("codec", esc(self.codec)),
            ("size", _format_bytes(self.nbytes) + " uncompressed"),
        ]
        head = "".join(
            f"<tr><th style='text-align:left'>{k}</th>"
            f"<td style='text-align:left' colspan='2'>{v}</td></tr>"
            for k, v in summary
        )
        return (
            "<div><strong>dasktrain.Dataset</strong>"
            f"<table>{head}"
            "<tr><th style='text-align:left'>field</th>"
            "<th style='text-align:left'>shape</th>"
            f"<th style='text-align:left'>dtype</th></tr>{field_rows}</table></div>"
        )


def read_dask_block(ids: np.ndarray, *, ref: DatasetRef, field: str) -> np.ndarray:
    """Task of :meth:`Dataset.to_dask`: the store chunk named by a 1-element block."""
    return read_chunk(ref, field, int(ids[0]))


# -- helpers ------------------------------------------------------------------


def _as_numpy(name: str, value: Any) -> np.ndarray:
    validate_field_name(name)
    try:
        return np.asarray(value)
    except Exception as exc:
        raise DataValidationError(
            f"array {name!r} cannot be converted to a NumPy array: {exc}"
        ) from exc


def _native(a: np.ndarray) -> np.ndarray:
    native = a.dtype.newbyteorder("=")
    return a if a.dtype == native else a.astype(native)


def _describe_arrays(
    arrays: Mapping[str, tuple[tuple[Any, ...], np.dtype[Any]]],
) -> tuple[dict[str, FieldInfo], int]:
    """Validate shapes and dtypes; return the fields and the row count."""
    if not arrays:
        raise DataValidationError(
            "no arrays given; pass them as keywords, e.g. X=X, y=y"
        )
    fields: dict[str, FieldInfo] = {}
    for name, (shape, dtype) in arrays.items():
        validate_field_name(name)
        dt = np.dtype(dtype)
        if dt.kind not in _NUMERIC_KINDS:
            raise DataValidationError(
                f"array {name!r} has dtype {dt}; dataset arrays must be bool, "
                f"integer or float (not object, string, complex or datetime)"
            )
        if len(shape) < 1:
            raise DataValidationError(
                f"array {name!r} is a scalar; arrays need at least one axis (rows)"
            )
        row_shape = tuple(int(s) for s in shape[1:])
        if any(s < 1 for s in row_shape):
            raise DataValidationError(
                f"array {name!r} has shape {tuple(shape)}; every dimension after "
                f"the first must be >= 1"
            )
        fields[name] = FieldInfo(row_shape, dt.newbyteorder("=").name)
    x = fields.get("X")
    if x is not None:
        x_shape = arrays["X"][0]
        if len(x_shape) != 2:
            hint = (
                " (reshape a single feature with X.reshape(-1, 1))"
                if len(x_shape) == 1
                else ""
            )
            raise DataValidationError(
                f"array 'X' must be 2-d (rows, features), got shape "
                f"{tuple(x_shape)}{hint}"
            )
        if x.dtype not in X_DTYPES:
            raise DataValidationError(
                f"array 'X' has dtype {x.dtype}; it must be float32 or float64 "
                f"(convert it with X.astype(np.float32))"
            )
    lengths = {name: int(shape[0]) for name, (shape, _) in arrays.items()}
    first, n_rows = next(iter(lengths.items()))
    for name, length in lengths.items():
        if length != n_rows:
            raise DataValidationError(
                f"arrays {first!r} ({n_rows} rows) and {name!r} ({length} rows) "
                f"differ in length"
            )
    if n_rows < 1:
        raise DataValidationError("the arrays have no rows")
    return fields, n_rows


def _check_destination(
    url: str, overwrite: bool, storage_options: Mapping[str, Any]
) -> None:
    """Refuse an existing path early, before any data is prepared."""
    if store_exists(url, storage_options) and not overwrite:
        raise StoreError(existing_store_message(url, storage_options))


def _shape_text(info: FieldInfo) -> str:
    return str((None, *info.shape)).replace("None", "n")


def _short_ids(ids: tuple[int, ...], limit: int = 8) -> str:
    if len(ids) <= limit:
        return ", ".join(map(str, ids))
    return ", ".join(map(str, ids[:limit])) + ", ..."


def _format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
