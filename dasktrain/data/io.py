"""Reading and writing dataset stores, one row chunk at a time.

This module is pure Zarr and NumPy (no Dask): the engine calls
:func:`read_chunk` and :func:`check_finite` inside tasks on workers, and the
writers (:meth:`Dataset.from_arrays`, :meth:`Dataset.from_dask`, the
generators in :mod:`dasktrain.datasets`) use :func:`create_store`,
:func:`write_chunk` and :func:`finalize_store`.

A dataset store is a Zarr v3 group.  Its arrays share axis 0 and the row
chunking ``(chunk_rows, *row_shape)``.  The group attribute ``"dasktrain"``
describes the store; :func:`create_store` writes it with ``"complete": false``
and :func:`finalize_store` rewrites it with ``"complete": true`` after every
chunk is on disk, so a store whose writing was interrupted is refused on open.

Worker-side reads keep a small per-process LRU of opened ``zarr.Array``
handles keyed by ``(url, uuid, field)``; see :func:`read_chunk`.

Stores are local paths, ``file://`` URLs (both read through zarr's
``LocalStore``) or any other fsspec URL (``s3://bucket/key.zarr``, ...), read
through fsspec with optional ``storage_options`` (a JSON-serializable dict
that travels with the :class:`DatasetRef` to the workers).  Errors of remote
stores (missing bucket, denied access, no credentials, unreachable endpoint)
become :class:`StoreError` or :class:`StoreNotFoundError` naming the URL; see
:func:`remote_store_error`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec
import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc, zstd
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from dasktrain.errors import (
    DataValidationError,
    NonFiniteDataError,
    StoreError,
    StoreNotFoundError,
)
from dasktrain.schema import FieldInfo

logger = logging.getLogger(__name__)

__all__ = [
    "ATTRS_KEY",
    "CODECS",
    "DEFAULT_CODEC",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Affine",
    "DatasetRef",
    "FieldSource",
    "StoreInfo",
    "check_chunk_rows",
    "check_codec",
    "check_finite",
    "check_storage_options",
    "clear_handle_cache",
    "create_store",
    "existing_store_message",
    "filesystem",
    "finalize_store",
    "is_remote",
    "missing_bucket",
    "normalize_url",
    "open_source_group",
    "read_attrs",
    "read_chunk",
    "read_peak_nbytes",
    "read_store_info",
    "remote_store_error",
    "remove_store",
    "source_signature",
    "store_exists",
    "validate_field_name",
    "write_array",
    "write_chunk",
]

#: Peak memory of reading one chunk with :func:`read_chunk`, as a multiple of
#: its decoded size.  Where dasktrain decodes a local chunk itself, only the
#: stored bytes and the output are alive together (measured with tracemalloc:
#: 50.0 MiB for a 25 MiB Blosc/lz4 float32 chunk); where zarr decodes (other
#: codecs, remote stores, source arrays) its decoded buffer is alive besides
#: (75 MiB for the same chunk).
LEAN_READ_PEAK_FACTOR = 2
ZARR_READ_PEAK_FACTOR = 3
#: Besides, per field read: headers, checksums and small temporaries.
READ_SLACK_BYTES = 64 << 10

#: Group attribute holding the dataset description.
ATTRS_KEY = "dasktrain"
#: Value of ``attrs["dasktrain"]["format"]`` for dataset stores.
FORMAT_NAME = "dasktrain.dataset"
#: Current format version; stores with a larger version are refused.
FORMAT_VERSION = 1
#: Codecs a dataset can be written with.
CODECS = ("none", "lz4", "zstd")
#: Codec used when none is given.  Blosc/lz4 without shuffle decodes several
#: times faster than zstd level 1 (see ``data/README.md`` for the measurement).
DEFAULT_CODEC = "lz4"
#: zstd compression level for ``codec="zstd"`` (decode speed barely depends on it).
ZSTD_LEVEL = 1
#: Blosc compression level for ``codec="lz4"``.
LZ4_CLEVEL = 5
#: Opened array handles kept per process by :func:`read_chunk`.
HANDLE_CACHE_SIZE = 64

_ROOT_METADATA = "zarr.json"
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_NUMERIC_KINDS = "biuf"
#: fsspec protocols whose first path component is a bucket (or container)
#: that dasktrain never creates.
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
#: Exception class names (anywhere in the MRO) meaning "no credentials".
_NO_CREDENTIALS_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
)
#: Exception class names (anywhere in the MRO) meaning "endpoint unreachable".
_CONNECTION_ERRORS = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
    }
)


# -- value types --------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """A per-column affine map applied to a 2-d field on read:
    ``(values - shift) / scale``, computed in the field's dtype.

    Examples
    --------
    >>> import numpy as np
    >>> Affine((1.0, 0.0), (2.0, 1.0)).apply(np.array([[3.0, 5.0]]))
    array([[1., 5.]])
    """

    shift: tuple[float, ...]
    scale: tuple[float, ...]
    #: Identity of the numbers, part of the worker cache key of a chunk.
    digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        numbers = np.asarray((*self.shift, *self.scale), dtype=np.float64)
        object.__setattr__(
            self, "digest", hashlib.sha256(numbers.tobytes()).hexdigest()[:16]
        )

    def apply(self, values: np.ndarray) -> np.ndarray:
        dtype = values.dtype
        shift = np.asarray(self.shift, dtype=dtype)
        scale = np.asarray(self.scale, dtype=dtype)
        # In place after the subtraction: one copy besides ``values`` is alive
        # (same values as ``(values - shift) / scale``).
        out = np.subtract(values, shift)
        np.divide(out, scale, out=out)
        return out.astype(dtype, copy=False)


@dataclass(frozen=True)
class FieldSource:
    """Where the values of one field of an in-place dataset live.

    An in-place dataset (:meth:`Dataset.from_zarr`) reads another Zarr
    group's arrays without copying them.  A field is one source array, or,
    for ``X``, several arrays whose non-sample axes are flattened (C order)
    into columns, concatenated in the order given.

    Parameters
    ----------
    arrays : tuple of str
        Array paths inside the source group.
    sample_axes : tuple of int
        For each array, the axis that indexes rows (samples).
    signatures : tuple of str
        For each array, its shape, chunking and dtype when the dataset was
        described; a read refuses an array whose signature has changed.

    Examples
    --------
    >>> src = FieldSource(("t2m",), (1,), ('{"shape": [3, 10]}',))
    >>> src.arrays, src.sample_axes
    (('t2m',), (1,))
    """

    arrays: tuple[str, ...]
    sample_axes: tuple[int, ...]
    signatures: tuple[str, ...]


@dataclass(frozen=True)
class DatasetRef:
    """Small, picklable description of a dataset store, sent to workers.

    Parameters
    ----------
    url : str
        Absolute local path or fsspec URL of the store.
    uuid : str
        Identity of the written store; a store rewritten at the same path has
        a new uuid, and a ref with the old one is refused by :func:`read_chunk`.
    n_rows : int
        Rows in the whole store (not in a view of it).
    chunk_rows : int
        Rows per chunk (the last chunk may be shorter).
    fields : tuple of (str, FieldInfo)
        Arrays of the store, sorted by name.
    storage_options : dict, optional
        fsspec options of a remote store (credentials, endpoint...), used by
        every process that reads or writes it; empty for local stores.  Left
        out of ``repr`` (it may hold secrets) and of the hash.
    sources : tuple of (str, FieldSource), optional
        Empty for a dataset store in dasktrain's layout.  Otherwise the
        store at ``url`` is a foreign Zarr group read in place, and each
        field names the arrays it is read from (see :meth:`Dataset.from_zarr`).
    transforms : tuple of (str, Affine), optional
        Maps applied to fields as they are read (a standardized view of the
        store, see :meth:`Dataset.with_transform`).

    Examples
    --------
    >>> from dasktrain.schema import FieldInfo
    >>> ref = DatasetRef("/tmp/d.zarr", "ab12", 10, 4, (("y", FieldInfo((), "int8")),))
    >>> ref.n_chunks, ref.chunk_bounds(2)
    (3, (8, 10))
    """

    url: str
    uuid: str
    n_rows: int
    chunk_rows: int
    fields: tuple[tuple[str, FieldInfo], ...]
    storage_options: dict[str, Any] = field(
        default_factory=dict, repr=False, hash=False
    )
    sources: tuple[tuple[str, FieldSource], ...] = field(default=(), repr=False)
    transforms: tuple[tuple[str, Affine], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        options = check_storage_options(self.storage_options)
        object.__setattr__(
            self, "storage_options", options if is_remote(self.url) else {}
        )

    @property
    def n_chunks(self) -> int:
        """Number of row chunks in the store."""
        return math.ceil(self.n_rows / self.chunk_rows)

    @property
    def cache_id(self) -> str:
        """Identity of the values read through this ref: the store's uuid,
        and the digests of its transforms (keys of the worker chunk cache)."""
        if not self.transforms:
            return self.uuid
        return self.uuid + "".join(f"~{n}:{a.digest}" for n, a in self.transforms)

    @property
    def in_place(self) -> bool:
        """Whether the store is a foreign Zarr group read in place."""
        return bool(self.sources)

    def source(self, name: str) -> FieldSource:
        """The arrays an in-place field is read from."""
        for field_name, src in self.sources:
            if field_name == name:
                return src
        raise DataValidationError(
            f"field {name!r} of in-place dataset {self.url!r} has no source arrays"
        )

    @property
    def field_names(self) -> tuple[str, ...]:
        """Names of the store's arrays."""
        return tuple(name for name, _ in self.fields)

    def field(self, name: str) -> FieldInfo:
        """Shape and dtype of one array; :class:`DataValidationError` if absent."""
        for field_name, info in self.fields:
            if field_name == name:
                return info
        raise DataValidationError(
            f"store {self.url!r} has no array {name!r} "
            f"(arrays: {', '.join(self.field_names)})"
        )

    def chunk_bounds(self, chunk_id: int) -> tuple[int, int]:
        """Global ``(start_row, stop_row)`` of a chunk of the store."""
        chunk_id = _check_chunk_id(chunk_id, self.n_chunks, self.url)
        start = chunk_id * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def chunk_n_rows(self, chunk_id: int) -> int:
        """Rows in one chunk of the store."""
        start, stop = self.chunk_bounds(chunk_id)
        return stop - start


@dataclass(frozen=True)
class StoreInfo:
    """Everything :func:`read_store_info` learns from a store's metadata."""

    ref: DatasetRef
    codec: str
    provenance: dict[str, Any]
    format_version: int


def _check_chunk_id(chunk_id: int, n_chunks: int, url: str) -> int:
    if isinstance(chunk_id, bool) or not isinstance(chunk_id, int | np.integer):
        raise TypeError(f"chunk_id must be an int, got {type(chunk_id).__name__}")
    chunk_id = int(chunk_id)
    if not 0 <= chunk_id < n_chunks:
        raise IndexError(
            f"chunk {chunk_id} out of range for store {url!r} ({n_chunks} chunks)"
        )
    return chunk_id


# -- paths and URLs -----------------------------------------------------------


def normalize_url(path: str | os.PathLike[str]) -> str:
    """Absolute local path, or the fsspec URL unchanged (without trailing ``/``).

    Examples
    --------
    >>> normalize_url("memory://bucket/d.zarr/")
    'memory://bucket/d.zarr'
    >>> normalize_url("/tmp/x/../d.zarr")
    '/tmp/d.zarr'
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"store path must be a str or os.PathLike, got {type(text)}")
    if text.startswith("file://"):
        text = text[len("file://") :]
    if _is_remote(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def is_remote(url: str) -> bool:
    """Whether ``url`` (already normalized) is read through fsspec.

    Examples
    --------
    >>> is_remote("s3://bucket/d.zarr"), is_remote("/tmp/d.zarr")
    (True, False)
    """
    return "://" in url or "::" in url


_is_remote = is_remote


def check_storage_options(options: object) -> dict[str, Any]:
    """Validate a ``storage_options`` argument: ``None`` or a JSON-serializable
    dict with string keys; returns a copy (``{}`` for ``None``).

    Examples
    --------
    >>> check_storage_options({"anon": True})
    {'anon': True}
    >>> check_storage_options(None)
    {}
    """
    if options is None:
        return {}
    return _json_dict(options, "storage_options")


def filesystem(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, str]:
    """The fsspec filesystem and in-filesystem path of a normalized URL.

    Examples
    --------
    >>> fs, path = filesystem("memory://bucket/d.zarr")
    >>> path
    '/bucket/d.zarr'
    """
    fs, fs_path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, fs_path


def _fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    return filesystem(url, storage_options)


def _error_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _protocol(url: str) -> str:
    return url.split("::")[-1].split("://", 1)[0] if "://" in url else ""


def _credentials_hint(url: str) -> str:
    if _protocol(url) in ("s3", "s3a"):
        return (
            "pass storage_options={'key': ..., 'secret': ...} or set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
            "environment of the client and of every worker"
        )
    return "pass them in storage_options, or configure them in the environment"


def _endpoint_hint(url: str) -> str:
    if _protocol(url) in ("s3", "s3a"):
        return (
            "check the endpoint (storage_options={'endpoint_url': ...} or "
            "AWS_ENDPOINT_URL) and that the service is up"
        )
    return "check the endpoint in storage_options and that the service is up"


def missing_bucket(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The bucket of an object-store URL if it does not exist, else ``""``."""
    protocol = _protocol(url)
    if protocol not in _BUCKET_PROTOCOLS:
        return ""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    try:
        fs, _ = _fs(url, storage_options)
        fs.invalidate_cache(bucket)
        return "" if fs.exists(bucket) else bucket
    except Exception:
        return ""


def remote_store_error(
    url: str,
    exc: BaseException,
    *,
    action: str = "access",
    what: str = "dataset store",
    storage_options: Mapping[str, Any] | None = None,
) -> StoreError:
    """Turn an exception raised by fsspec (or zarr over fsspec) into a
    :class:`StoreError` naming the URL and saying what to check.

    A missing key or bucket gives :class:`StoreNotFoundError` (naming the
    bucket when it is the bucket that is missing; dasktrain never creates
    buckets); denied access, missing credentials and an unreachable endpoint
    give :class:`StoreError`.

    Examples
    --------
    >>> err = remote_store_error("s3://b/d.zarr", PermissionError("Forbidden"))
    >>> type(err).__name__
    'StoreError'
    >>> str(err).split(";")[0]
    "cannot access dataset store 's3://b/d.zarr': access denied (Forbidden)"
    """
    if isinstance(exc, StoreError):
        return exc
    names = _error_names(exc)
    where = f"cannot {action} {what} {url!r}"
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError):
        bucket = missing_bucket(url, storage_options)
        if bucket:
            return StoreNotFoundError(
                f"{where}: bucket {bucket!r} does not exist (dasktrain never creates "
                f"buckets; create it first)"
            )
        return StoreNotFoundError(f"{where}: not found ({detail})")
    if names & _NO_CREDENTIALS_ERRORS:
        return StoreError(
            f"{where}: no credentials found ({exc}); {_credentials_hint(url)}"
        )
    if isinstance(exc, PermissionError) or "AccessDenied" in names:
        return StoreError(
            f"{where}: access denied ({exc}); check the credentials: "
            f"{_credentials_hint(url)}"
        )
    if names & _CONNECTION_ERRORS or isinstance(exc, ConnectionError | TimeoutError):
        return StoreError(
            f"{where}: cannot reach the storage service ({exc}); {_endpoint_hint(url)}"
        )
    return StoreError(f"{where}: {detail}")


def _join(url: str, *parts: str) -> str:
    if _is_remote(url):
        return "/".join([url, *parts])
    return os.path.join(url, *parts)


def store_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether anything (file, directory, object prefix) exists at ``url``.

    For a remote URL, errors other than "not found" (denied access, no
    credentials, unreachable endpoint) raise :class:`StoreError`.
    """
    if not is_remote(url):
        return os.path.lexists(url)
    try:
        fs, fs_path = _fs(url, storage_options)
        # Listings may be cached by the filesystem; another process may have
        # written or deleted the store since.
        fs.invalidate_cache(fs_path)
        fs.info(fs_path)
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise remote_store_error(url, exc, storage_options=storage_options) from exc
    return True


def _read_root_json(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The parsed root ``zarr.json`` of ``url``, or ``None`` if unreadable
    (a remote store that cannot be reached raises :class:`StoreError`)."""
    try:
        if is_remote(url):
            try:
                fs, fs_path = _fs(url, storage_options)
                raw = fs.cat_file(fs_path + "/" + _ROOT_METADATA)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
            except Exception as exc:
                raise remote_store_error(
                    url, exc, action="read", storage_options=storage_options
                ) from exc
        else:
            with open(os.path.join(url, _ROOT_METADATA), "rb") as f:
                raw = f.read()
        obj = json.loads(raw)
    except StoreError:
        raise
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_empty_dir(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    if not is_remote(url):
        return os.path.isdir(url) and not os.path.islink(url) and not os.listdir(url)
    fs, fs_path = _fs(url, storage_options)
    try:
        fs.invalidate_cache(fs_path)
        return bool(fs.isdir(fs_path)) and not fs.ls(fs_path)
    except OSError:
        return False


def _is_dataset_store(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> bool:
    """A dasktrain dataset store (complete or not), judged from its metadata."""
    meta = read_attrs(url, storage_options=storage_options)
    return meta is not None and meta.get("format") == FORMAT_NAME


def read_attrs(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The raw ``"dasktrain"`` group attribute of a store, complete or not
    (``None`` if there is no readable one).  Reads one small file."""
    root = _read_root_json(normalize_url(path), storage_options)
    if root is None or root.get("node_type") != "group":
        return None
    meta = (root.get("attributes") or {}).get(ATTRS_KEY)
    return meta if isinstance(meta, dict) else None


def existing_store_message(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Why a new store cannot be written at ``url`` without ``overwrite``."""
    meta = read_attrs(url, storage_options=storage_options)
    if meta is not None and meta.get("format") == FORMAT_NAME:
        if meta.get("complete") is not True:
            return (
                f"an incomplete dataset store (its writing was interrupted) exists "
                f"at {url!r}; pass overwrite=True to replace it"
            )
        return (
            f"a dataset store already exists at {url!r}; pass overwrite=True to "
            f"replace it"
        )
    return (
        f"{url!r} already exists and is not a dasktrain dataset store; choose "
        f"another path (it is never deleted, even with overwrite=True)"
    )


def remove_store(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete the dataset store at ``url``.

    Refuses (:class:`StoreError`) anything that is not a dasktrain dataset
    store or an empty directory, so a wrong path never loses user data.
    """
    url = normalize_url(url)
    if not store_exists(url, storage_options):
        return
    if not (
        _is_dataset_store(url, storage_options) or _is_empty_dir(url, storage_options)
    ):
        raise StoreError(
            f"refusing to delete {url!r}: it is not a dasktrain dataset store "
            f"(no group attribute {ATTRS_KEY!r} with format {FORMAT_NAME!r})"
        )
    logger.info("deleting dataset store %s", url)
    fs, fs_path = _fs(url, storage_options)
    try:
        fs.rm(fs_path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as exc:
        if not is_remote(url):
            raise
        raise remote_store_error(
            url, exc, action="delete", storage_options=storage_options
        ) from exc


# -- validation helpers -------------------------------------------------------


def validate_field_name(name: object) -> str:
    """Check that ``name`` can name a dataset array (a portable Zarr node name).

    Letters, digits, ``_``, ``.`` and ``-``; not starting with ``.``, ``-`` or
    ``__`` (reserved by Zarr); not ``zarr.json``.

    Examples
    --------
    >>> validate_field_name("X")
    'X'
    """
    if (
        not isinstance(name, str)
        or not _FIELD_NAME.match(name)
        or name.startswith("__")
        or name == _ROOT_METADATA
    ):
        raise DataValidationError(
            f"invalid array name {name!r}: use letters, digits, '_', '.' and '-', "
            f"not starting with '.', '-' or '__'"
        )
    return name


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return int(value)


def check_chunk_rows(chunk_rows: object) -> int:
    """Validate a ``chunk_rows`` option (an int >= 1)."""
    return _check_positive_int(chunk_rows, "chunk_rows")


def check_codec(codec: object) -> str:
    """Validate a ``codec`` option (one of :data:`CODECS`)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return str(codec)


def _numeric_dtype(dtype: object, what: str) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise DataValidationError(f"{what}: invalid dtype {dtype!r}") from exc
    if dt.kind not in _NUMERIC_KINDS:
        raise DataValidationError(
            f"{what} has dtype {dt} ({dt.kind!r} kind); dataset arrays must be "
            f"bool, integer or float"
        )
    return dt.newbyteorder("=")


def _check_fields(fields: Mapping[str, FieldInfo]) -> tuple[tuple[str, FieldInfo], ...]:
    if not isinstance(fields, Mapping) or not fields:
        raise DataValidationError("a dataset needs at least one array")
    out = []
    for name, info in fields.items():
        validate_field_name(name)
        if not isinstance(info, FieldInfo):
            raise TypeError(f"fields[{name!r}] must be a FieldInfo, got {info!r}")
        dt = _numeric_dtype(info.dtype, f"array {name!r}")
        if any(isinstance(s, bool) or int(s) < 1 for s in info.shape):
            raise DataValidationError(
                f"array {name!r} has row shape {tuple(info.shape)}; every "
                f"dimension after the first must be >= 1"
            )
        out.append((name, FieldInfo(tuple(int(s) for s in info.shape), dt.name)))
    return tuple(sorted(out))


def _json_dict(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(obj).__name__}")
    try:
        text = json.dumps(dict(obj), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serializable: {exc}") from exc
    result: dict[str, Any] = json.loads(text)
    return result


def _compressors(codec: str, dtype: np.dtype[Any]) -> list[Any]:
    """Bytes-to-bytes codecs of a data array: the compressor (if any), then a
    CRC-32C checksum of the stored bytes, so a truncated or overwritten chunk
    fails to decode (an error naming the chunk) instead of decoding into
    wrong numbers.  The checksum costs about 4 ms per 26 MB of compressed
    chunk (hardware CRC), far below decode time."""
    checksum = Crc32cCodec()
    if codec == "none":
        return [checksum]
    if codec == "zstd":
        return [ZstdCodec(level=ZSTD_LEVEL), checksum]
    return [
        BloscCodec(
            cname="lz4", clevel=LZ4_CLEVEL, shuffle="noshuffle", typesize=dtype.itemsize
        ),
        checksum,
    ]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- writing ------------------------------------------------------------------


def _zarr_options(
    url: str, storage_options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Keyword arguments of zarr's open functions for a remote URL: its
    storage options (zarr refuses them for local paths, which need none), and
    the format, which spares a request per Zarr v2 metadata key zarr would
    otherwise probe (dataset stores are always Zarr v3)."""
    if not is_remote(url):
        return {}
    if storage_options:
        return {"zarr_format": 3, "storage_options": dict(storage_options)}
    return {"zarr_format": 3}


def _open_group(
    url: str, mode: str, storage_options: Mapping[str, Any] | None = None
) -> zarr.Group:
    return zarr.open_group(
        url,
        mode=mode,  # type: ignore[arg-type]
        use_consolidated=False,
        **_zarr_options(url, storage_options),
    )


def create_store(
    path: str | os.PathLike[str],
    *,
    fields: Mapping[str, FieldInfo],
    n_rows: int,
    chunk_rows: int,
    codec: str = DEFAULT_CODEC,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DatasetRef:
    """Create an empty dataset store (arrays, no data) and return its ref.

    Everything is validated before the filesystem is touched.  The group
    attribute is written with ``"complete": false``; fill the chunks with
    :func:`write_chunk`, then call :func:`finalize_store`.

    Parameters
    ----------
    path : str or os.PathLike
        Local path or fsspec URL of the new store.
    fields : dict of str to FieldInfo
        Arrays to create: per-row shape and dtype.
    n_rows, chunk_rows : int
        Rows in the store and per chunk.
    codec : {"none", "lz4", "zstd"}
        Compression of the chunks.
    overwrite : bool
        Replace an existing dasktrain dataset store at ``path`` (anything else
        is never deleted).
    provenance : dict, optional
        JSON-serializable record kept with the store from the start (merged
        into the final provenance by :func:`finalize_store`).
    storage_options : dict, optional
        fsspec options of a remote store; kept in the returned ref.

    Returns
    -------
    DatasetRef

    Raises
    ------
    StoreError
        ``path`` exists and ``overwrite`` is false, or it is not a dataset store.
    DataValidationError, ValueError
        Invalid fields, row counts or codec.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from dasktrain.schema import FieldInfo
    >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
    >>> ref = create_store(path, fields={"y": FieldInfo((), "float32")},
    ...                    n_rows=5, chunk_rows=4, codec="zstd")
    >>> write_chunk(ref, "y", 0, np.zeros(4, np.float32))
    >>> write_chunk(ref, "y", 1, np.ones(1, np.float32))
    >>> finalize_store(path, provenance={"source": "doctest"}).n_chunks
    2
    """
    url = normalize_url(path)
    checked = _check_fields(fields)
    n_rows = _check_positive_int(n_rows, "n_rows")
    chunk_rows = check_chunk_rows(chunk_rows)
    codec = check_codec(codec)
    pending = _json_dict(provenance or {}, "provenance")
    options = check_storage_options(storage_options)
    if store_exists(url, options):
        if not overwrite:
            raise StoreError(existing_store_message(url, options))
        remove_store(url, options)

    store_uuid = uuidlib.uuid4().hex
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "n_rows": n_rows,
        "chunk_rows": chunk_rows,
        "fields": {name: info.to_json() for name, info in checked},
        "uuid": store_uuid,
        "codec": codec,
        "complete": False,
        "provenance": pending,
    }
    try:
        group = zarr.open_group(
            url,
            mode="w-",
            attributes={ATTRS_KEY: meta},
            **{"zarr_format": 3, **_zarr_options(url, options)},
        )
        for name, info in checked:
            dtype = np.dtype(info.dtype)
            group.create_array(
                name,
                shape=(n_rows, *info.shape),
                chunks=(chunk_rows, *info.shape),
                dtype=dtype,
                compressors=_compressors(codec, dtype),
                filters=None,
                fill_value=np.zeros((), dtype=dtype).item(),
            )
    except Exception as exc:
        if not is_remote(url):
            raise
        raise remote_store_error(
            url, exc, action="create", storage_options=options
        ) from exc
    logger.info(
        "created dataset store %s: %d rows in chunks of %d, codec %s",
        url,
        n_rows,
        chunk_rows,
        codec,
    )
    return DatasetRef(url, store_uuid, n_rows, chunk_rows, checked, options)


def _not_found(
    url: str, storage_options: Mapping[str, Any] | None
) -> StoreNotFoundError:
    bucket = missing_bucket(url, storage_options)
    if bucket:
        return StoreNotFoundError(
            f"no dataset store at {url!r}: bucket {bucket!r} does not exist"
        )
    return StoreNotFoundError(f"no dataset store at {url!r}")


def _pending_ref(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[DatasetRef, dict[str, Any]]:
    """Ref and raw attributes of a store created by :func:`create_store`."""
    if not store_exists(url, storage_options):
        raise _not_found(url, storage_options)
    try:
        group = _open_group(url, "r", storage_options)
        meta = group.attrs.asdict().get(ATTRS_KEY)
        ref = _ref_from_meta(url, meta, storage_options)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot read dataset store {url!r}: {exc}") from exc
    assert isinstance(meta, dict)
    return ref, meta


def write_chunk(
    ref_or_path: DatasetRef | str | os.PathLike[str],
    field: str,
    chunk_id: int,
    array: np.ndarray,
) -> None:
    """Write one whole row chunk of one array (chunk-aligned, so concurrent
    writers of different chunks are safe).

    With a :class:`DatasetRef`, the store's uuid must still be the ref's.

    Examples
    --------
    See :func:`create_store`.
    """
    if isinstance(ref_or_path, DatasetRef):
        ref = ref_or_path
        # One read of the root metadata (not a full open: one request on an
        # object store) tells whether the store is still the ref's.
        meta = read_attrs(ref.url, storage_options=ref.storage_options)
        if meta is None:
            raise _not_found(ref.url, ref.storage_options)
        if meta.get("uuid") != ref.uuid:
            raise StoreError(
                f"store {ref.url!r} was rewritten (uuid {meta.get('uuid')}, "
                f"expected {ref.uuid}); refusing to write chunk {chunk_id} of "
                f"array {field!r}"
            )
    else:
        ref, _ = _pending_ref(normalize_url(ref_or_path))
    info = ref.field(field)
    start, stop = ref.chunk_bounds(chunk_id)
    data = np.asarray(array)
    expected_shape = (stop - start, *info.shape)
    if data.shape != expected_shape:
        raise DataValidationError(
            f"chunk {chunk_id} of array {field!r} in store {ref.url!r} must have "
            f"shape {expected_shape}, got {data.shape}"
        )
    dtype = np.dtype(info.dtype)
    if data.dtype != dtype:
        if not np.can_cast(data.dtype, dtype, casting="same_kind"):
            raise DataValidationError(
                f"cannot write {data.dtype} data to array {field!r} ({dtype}) of "
                f"store {ref.url!r}"
            )
        data = data.astype(dtype)
    try:
        _writable_array(ref, field)[start:stop] = data
    except Exception as exc:
        raise StoreError(
            f"cannot write chunk {chunk_id} of array {field!r} to store "
            f"{ref.url!r}: {exc}"
        ) from exc


def write_array(ref: DatasetRef, field: str, values: np.ndarray) -> None:
    """Write all rows of one array at once (Zarr encodes and writes the
    chunks concurrently).  ``values`` must have the array's shape and dtype.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from dasktrain.schema import FieldInfo
    >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
    >>> ref = create_store(path, fields={"y": FieldInfo((), "int8")}, n_rows=3,
    ...                    chunk_rows=2)
    >>> write_array(ref, "y", np.array([1, 0, 1], np.int8))
    >>> finalize_store(path, provenance={}).n_rows
    3
    """
    info = ref.field(field)
    data = np.asarray(values)
    expected_shape = (ref.n_rows, *info.shape)
    if data.shape != expected_shape or data.dtype != np.dtype(info.dtype):
        raise DataValidationError(
            f"array {field!r} of store {ref.url!r} needs shape {expected_shape} and "
            f"dtype {info.dtype}, got {data.shape} {data.dtype}"
        )
    try:
        _writable_array(ref, field)[:] = data
    except Exception as exc:
        raise StoreError(
            f"cannot write array {field!r} to store {ref.url!r}: {exc}"
        ) from exc


def _writable_array(ref: DatasetRef, field: str) -> zarr.Array:
    # Zarr skips chunks equal to the fill value unless told otherwise; every
    # chunk must exist on disk so that a missing one can be told from zeros.
    target = zarr.open_array(
        ref.url, path=field, mode="r+", **_zarr_options(ref.url, ref.storage_options)
    )
    return target.with_config({"write_empty_chunks": True})


def finalize_store(
    path: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> DatasetRef:
    """Mark a fully written store complete (the group attribute is written last).

    Every chunk of every array must be present.  ``provenance`` (JSON-able)
    is merged over the one given to :func:`create_store`; ``"source"`` and
    ``"created"`` (ISO 8601, UTC) are filled in when absent.

    Examples
    --------
    See :func:`create_store`.
    """
    url = normalize_url(path)
    extra = _json_dict(provenance, "provenance")
    options = check_storage_options(storage_options)
    ref, meta = _pending_ref(url, options)
    if meta.get("complete") is True:
        raise StoreError(f"dataset store {url!r} is already complete")
    group = _open_group(url, "r+", options)
    for name in ref.field_names:
        written = group[name].nchunks_initialized  # type: ignore[union-attr]
        if written != ref.n_chunks:
            raise StoreError(
                f"cannot finalize dataset store {url!r}: array {name!r} has "
                f"{written} of {ref.n_chunks} chunks written"
            )
    merged = {**meta.get("provenance", {}), **extra}
    merged.setdefault("source", "unknown")
    merged.setdefault("created", _now())
    final = {**meta, "complete": True, "provenance": merged}
    group.attrs[ATTRS_KEY] = final
    logger.info("finalized dataset store %s (uuid %s)", url, ref.uuid)
    return ref


# -- opening and validating ---------------------------------------------------


def _ref_from_meta(
    url: str, meta: object, storage_options: Mapping[str, Any] | None = None
) -> DatasetRef:
    if not isinstance(meta, dict):
        raise StoreError(
            f"{url!r} is a Zarr group but not a dasktrain dataset "
            f"(no group attribute {ATTRS_KEY!r})"
        )
    if meta.get("format") != FORMAT_NAME:
        raise StoreError(
            f"{url!r} is not a dasktrain dataset: attribute {ATTRS_KEY!r} has "
            f"format {meta.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"dataset store {url!r} has format_version {version!r}; this dasktrain "
            f"reads versions up to {FORMAT_VERSION}"
        )
    try:
        fields = {
            str(name): FieldInfo.from_json(value)
            for name, value in dict(meta["fields"]).items()
        }
        n_rows = int(meta["n_rows"])
        chunk_rows = int(meta["chunk_rows"])
        store_uuid = str(meta["uuid"])
        checked = _check_fields(fields)
        if n_rows < 1 or chunk_rows < 1:
            raise ValueError(f"n_rows={n_rows}, chunk_rows={chunk_rows}")
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(
            f"dataset store {url!r} has malformed {ATTRS_KEY!r} attributes: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return DatasetRef(
        url, store_uuid, n_rows, chunk_rows, checked, dict(storage_options or {})
    )


def read_store_info(
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> StoreInfo:
    """Open and validate a complete dataset store, reading only metadata.

    Checks that the store exists, is a Zarr group with a complete
    ``"dasktrain"`` attribute, and that each declared array exists with
    ``n_rows`` rows, the declared row shape and dtype, and chunks of
    ``(chunk_rows, *row_shape)``.  No chunk data is read.  ``storage_options``
    (fsspec options of a remote ``path``) are kept in the returned ref.

    Raises
    ------
    StoreNotFoundError
        Nothing at ``path`` (for an object store: also a missing bucket).
    StoreError
        Anything else wrong; the message names the store and array.
    """
    url = normalize_url(path)
    options = check_storage_options(storage_options)
    if not store_exists(url, options):
        raise _not_found(url, options)
    try:
        group = _open_group(url, "r", options)
        attrs = group.attrs.asdict()
    except Exception as exc:
        raise StoreError(
            f"cannot open {url!r} as a Zarr group: {type(exc).__name__}: {exc}"
        ) from exc
    meta = attrs.get(ATTRS_KEY)
    ref = _ref_from_meta(url, meta, options)
    assert isinstance(meta, dict)
    if meta.get("complete") is not True:
        raise StoreError(
            f"dataset store {url!r} is incomplete: its writing was interrupted or "
            f"is still in progress; write it again (overwrite=True)"
        )
    codec = meta.get("codec")
    if codec not in CODECS:
        raise StoreError(f"dataset store {url!r} has unknown codec {codec!r}")
    provenance = meta.get("provenance", {})
    if not isinstance(provenance, dict):
        raise StoreError(f"dataset store {url!r} has malformed provenance")
    for name, info in ref.fields:
        _check_array(url, group, name, info, ref)
    return StoreInfo(ref, str(codec), provenance, int(meta["format_version"]))


def _check_array(
    url: str, group: zarr.Group, name: str, info: FieldInfo, ref: DatasetRef
) -> None:
    where = f"array {name!r} of dataset store {url!r}"
    try:
        node = group.get(name)
    except Exception as exc:
        raise StoreError(f"cannot open {where}: {type(exc).__name__}: {exc}") from exc
    if node is None:
        raise StoreError(f"{where} is missing (declared in {ATTRS_KEY!r})")
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{where} is a group, not an array")
    expected_shape = (ref.n_rows, *info.shape)
    if node.shape[:1] != expected_shape[:1]:
        raise StoreError(
            f"{where} has {node.shape[0] if node.shape else 0} rows, but the store "
            f"declares n_rows={ref.n_rows}"
        )
    if tuple(node.shape) != expected_shape:
        raise StoreError(
            f"{where} has shape {tuple(node.shape)}, expected {expected_shape}"
        )
    expected_chunks = (ref.chunk_rows, *info.shape)
    if node.shards is not None or tuple(node.chunks) != expected_chunks:
        raise StoreError(
            f"{where} is chunked {tuple(node.chunks)}"
            f"{' in shards ' + str(node.shards) if node.shards else ''}, expected "
            f"unsharded whole-row chunks {expected_chunks} "
            f"(chunk_rows={ref.chunk_rows})"
        )
    if node.dtype.kind not in _NUMERIC_KINDS:
        raise StoreError(f"{where} has non-numeric dtype {node.dtype}")
    if node.dtype != np.dtype(info.dtype):
        raise StoreError(f"{where} has dtype {node.dtype}, declared {info.dtype}")


# -- worker-side reads --------------------------------------------------------


@dataclass
class _Handle:
    array: zarr.Array
    array_dir: str | None
    fs: Any
    marker: tuple[int, int, int] | None
    #: how a chunk of a local store is decoded without zarr (None: by zarr)
    lean: _LeanPlan | None = None


#: ``empty(shape, dtype)``: allocates a decoded chunk's output array
#: (:func:`read_chunk`).
EmptyArray = Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray]


@dataclass(frozen=True)
class _LeanPlan:
    """How to decode a stored chunk straight into its output: the layout
    dasktrain writes (row chunks, little-endian bytes, then Blosc/lz4, zstd
    or nothing, then a CRC-32C), read by hand."""

    compressor: str  # "none", "blosc" or "zstd"
    chunk_shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize


def _lean_plan(array: zarr.Array) -> _LeanPlan | None:
    """The lean decode of ``array``'s chunks, or ``None`` if its codecs are
    not the ones dasktrain writes (zarr then decodes)."""
    try:
        meta = array.metadata
        codecs = list(getattr(meta, "codecs", ()))
        dtype = np.dtype(array.dtype)
        chunk_shape = tuple(int(c) for c in array.chunks)
    except Exception:
        return None
    if len(codecs) not in (2, 3) or dtype.kind not in _NUMERIC_KINDS + "?":
        return None
    first, *middle, last = codecs
    if not isinstance(first, BytesCodec) or not isinstance(last, Crc32cCodec):
        return None
    endian = getattr(first.endian, "value", first.endian)
    if dtype.itemsize > 1 and endian != "little":
        return None
    if not dtype.isnative:
        return None
    compressor = "none"
    if middle:
        (codec,) = middle
        if isinstance(codec, BloscCodec):
            compressor = "blosc"
        elif isinstance(codec, ZstdCodec):
            compressor = "zstd"
        else:
            return None
    return _LeanPlan(compressor, chunk_shape, dtype)


def _lean_decode(
    path: str, plan: _LeanPlan, n_rows: int, empty: EmptyArray | None = None
) -> np.ndarray:
    """Decode the chunk file ``path`` straight into the output array: the
    stored bytes and the output are the only copies alive (zarr also keeps a
    decoded buffer that it copies into its output), and one copy less is
    made.  The output is an ordinary heap array, whose pages the allocator
    reuses from read to read (a fresh memory map would cost page faults on
    every read), unless ``empty`` is given: it then allocates the output of a
    full chunk (e.g. in the memory the cache will keep it in)."""
    with open(path, "rb", buffering=0) as f:
        stored = f.read()
    if len(stored) < 4:
        raise ValueError(f"the stored chunk has {len(stored)} bytes")
    body = np.frombuffer(stored, dtype=np.uint8)[:-4]
    computed = int(google_crc32c.value(body))
    expected = int.from_bytes(stored[-4:], "little")
    if computed != expected:
        raise ValueError(
            f"stored and computed checksum do not match (stored {expected:#010x}, "
            f"computed {computed:#010x})"
        )
    if empty is not None and n_rows == plan.chunk_shape[0]:
        out = empty(plan.chunk_shape, plan.dtype)
    else:
        out = np.empty(plan.chunk_shape, dtype=plan.dtype)
    if plan.compressor == "none":
        if body.nbytes != out.nbytes:
            raise ValueError(f"{body.nbytes} stored bytes, expected {out.nbytes}")
        out.reshape(-1).view(np.uint8)[:] = body
    elif plan.compressor == "blosc":
        blosc.decompress(body, out)
    else:
        zstd.decompress(body, out)
    # The last chunk of an array is stored padded to the chunk size.
    return out if n_rows == out.shape[0] else out[:n_rows].copy()


_HANDLES: OrderedDict[tuple[str, str, str], _Handle] = OrderedDict()
_HANDLES_LOCK = threading.Lock()


def clear_handle_cache() -> None:
    """Forget every array handle opened by :func:`read_chunk` in this process."""
    with _HANDLES_LOCK:
        _HANDLES.clear()
        _SOURCE_ARRAYS.clear()


def _root_marker(url: str) -> tuple[int, int, int]:
    """Identity of a local store's root ``zarr.json`` (it is replaced, never
    edited in place, whenever the attributes change)."""
    st = os.stat(os.path.join(url, _ROOT_METADATA))
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _check_uuid(ref: DatasetRef, group: zarr.Group) -> None:
    meta = group.attrs.asdict().get(ATTRS_KEY)
    found = meta.get("uuid") if isinstance(meta, dict) else None
    if found != ref.uuid:
        raise StoreError(
            f"dataset store {ref.url!r} has changed since it was opened (uuid "
            f"{found!r}, expected {ref.uuid!r}): it was rewritten at the same path; "
            f"open it again"
        )


def _open_handle(ref: DatasetRef, field: str) -> _Handle:
    if not store_exists(ref.url, ref.storage_options):
        raise StoreNotFoundError(f"dataset store {ref.url!r} no longer exists")
    try:
        marker = None if _is_remote(ref.url) else _root_marker(ref.url)
        group = _open_group(ref.url, "r", ref.storage_options)
    except Exception as exc:
        raise StoreError(
            f"cannot open dataset store {ref.url!r}: {type(exc).__name__}: {exc}"
        ) from exc
    _check_uuid(ref, group)
    node = group.get(field)
    if not isinstance(node, zarr.Array):
        raise StoreError(f"array {field!r} is missing from dataset store {ref.url!r}")
    if _is_remote(ref.url):
        fs, fs_path = _fs(_join(ref.url, field), ref.storage_options)
        return _Handle(node, fs_path, fs, marker)
    return _Handle(node, os.path.join(ref.url, field), None, marker, _lean_plan(node))


def _get_handle(ref: DatasetRef, field: str) -> _Handle:
    key = (ref.url, ref.uuid, field)
    with _HANDLES_LOCK:
        handle = _HANDLES.get(key)
        if handle is not None:
            _HANDLES.move_to_end(key)
    if handle is not None and handle.marker is not None:
        try:
            marker = _root_marker(ref.url)
        except OSError as exc:
            raise StoreNotFoundError(
                f"dataset store {ref.url!r} no longer exists"
            ) from exc
        if marker != handle.marker:
            handle = None
    if handle is None:
        handle = _open_handle(ref, field)
        with _HANDLES_LOCK:
            _HANDLES[key] = handle
            _HANDLES.move_to_end(key)
            while len(_HANDLES) > HANDLE_CACHE_SIZE:
                _HANDLES.popitem(last=False)
    return handle


def read_chunk(
    ref: DatasetRef, field: str, chunk_id: int, *, empty: EmptyArray | None = None
) -> np.ndarray:
    """Read and decode one row chunk of one array.

    Thread-safe.  Opened array handles are cached per process (LRU of
    :data:`HANDLE_CACHE_SIZE`) by ``(url, uuid, field)``; the store's uuid is
    checked when a handle is opened, and for local stores again whenever the
    root ``zarr.json`` changes (one ``stat`` per read), so a store rewritten
    at the same path is never read with a stale ref.  A missing chunk is an
    error (Zarr itself would return fill values).  An in-place ref reads the
    source arrays instead; the ref's transforms are applied last.

    Parameters
    ----------
    ref : DatasetRef
    field : str
        Array name, e.g. ``"X"``.
    chunk_id : int
        Store chunk index; rows ``ref.chunk_bounds(chunk_id)``.
    empty : callable, optional
        ``empty(shape, dtype)`` allocates the output where dasktrain decodes
        the chunk itself (a full chunk of a local store in its layout, with no
        transform); elsewhere the output is an ordinary array.

    Returns
    -------
    numpy.ndarray
        Shape ``(chunk rows, *row_shape)``.

    Raises
    ------
    StoreError
        Store rewritten (uuid changed), chunk missing, or chunk undecodable;
        the message names store, array and chunk.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from dasktrain.data import Dataset
    >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
    >>> ds = Dataset.from_arrays(path, y=np.arange(10.0), chunk_rows=4)
    >>> read_chunk(ds.ref, "y", 2)
    array([8., 9.])
    """
    if ref.sources:
        values = _read_source_chunk(ref, field, chunk_id)
    else:
        values = _read_stored_chunk(ref, field, chunk_id, empty=empty)
    for name, affine in ref.transforms:
        if name == field:
            values = affine.apply(values)
    return values


def read_peak_nbytes(ref: DatasetRef, fields: Sequence[str]) -> int:
    """Bytes alive at most while :func:`read_chunk` reads one full chunk of
    each of ``fields`` (an upper bound: each field's read peak, as if they
    overlapped, plus :data:`READ_SLACK_BYTES`).  A field decoded by dasktrain
    itself peaks at :data:`LEAN_READ_PEAK_FACTOR` times its decoded size, one
    decoded by zarr at :data:`ZARR_READ_PEAK_FACTOR` times; a transform
    (:class:`Affine`, one copy besides its input) stays within either.  Where
    the store cannot be opened here (e.g. on a client that does not see a
    worker-local path) the zarr factor is assumed.
    """
    total = 0
    for name in fields:
        info = ref.field(name)
        nbytes = (
            ref.chunk_rows
            * int(np.prod(info.shape, dtype=np.int64))
            * np.dtype(info.dtype).itemsize
        )
        factor = ZARR_READ_PEAK_FACTOR
        if not ref.sources:
            try:
                handle = _get_handle(ref, name)
            except Exception:
                handle = None
            lean = None if handle is None or handle.fs is not None else handle.lean
            if lean is not None and ref.chunk_rows <= lean.chunk_shape[0]:
                factor = LEAN_READ_PEAK_FACTOR
        total += factor * int(nbytes) + READ_SLACK_BYTES
    return int(total)


def _read_stored_chunk(
    ref: DatasetRef, field: str, chunk_id: int, *, empty: EmptyArray | None = None
) -> np.ndarray:
    """One chunk of a store in dasktrain's layout (see :func:`read_chunk`)."""
    info = ref.field(field)
    start, stop = ref.chunk_bounds(chunk_id)
    handle = _get_handle(ref, field)
    key = handle.array.metadata.encode_chunk_key(
        (int(chunk_id),) + (0,) * len(info.shape)
    )
    lean = None
    if handle.fs is None:
        assert handle.array_dir is not None
        chunk_path = os.path.join(handle.array_dir, *key.split("/"))
        present = os.path.isfile(chunk_path)
        lean = handle.lean
    else:
        present = _remote_chunk_present(ref, field, chunk_id, handle, key)
    if not present:
        raise StoreError(
            f"chunk {chunk_id} (rows {start}-{stop}) of array {field!r} is missing "
            f"from dataset store {ref.url!r} (key {field}/{key})"
        )
    try:
        data: Any
        if lean is not None and stop - start <= lean.chunk_shape[0]:
            transformed = any(name == field for name, _ in ref.transforms)
            data = _lean_decode(
                chunk_path, lean, stop - start, None if transformed else empty
            )
        else:
            data = handle.array[start:stop]
    except Exception as exc:
        raise StoreError(
            f"cannot decode chunk {chunk_id} (rows {start}-{stop}) of array "
            f"{field!r} in dataset store {ref.url!r}: {type(exc).__name__}: {exc}"
        ) from exc
    result = np.asarray(data)
    if result.shape != (stop - start, *info.shape):
        raise StoreError(
            f"chunk {chunk_id} of array {field!r} in dataset store {ref.url!r} "
            f"decoded to shape {result.shape}, expected {(stop - start, *info.shape)}"
        )
    return result


# -- in-place reads of foreign Zarr groups -------------------------------------

_SOURCE_ARRAYS: OrderedDict[tuple[str, str, str], zarr.Array] = OrderedDict()


def open_source_group(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> zarr.Group:
    """Open a foreign Zarr group (v2 or v3, consolidated or not) read-only."""
    kwargs: dict[str, Any] = {}
    if is_remote(url) and storage_options:
        kwargs["storage_options"] = dict(storage_options)
    return zarr.open_group(url, mode="r", **kwargs)


def source_signature(array: zarr.Array) -> str:
    """Shape, row chunking and dtype of a source array, as a JSON string.

    Examples
    --------
    >>> import zarr
    >>> a = zarr.create_array({}, shape=(4, 2), chunks=(2, 2), dtype="f4")
    >>> source_signature(a)
    '{"chunks": [2, 2], "dtype": "float32", "shape": [4, 2]}'
    """
    chunks = array.shards if array.shards is not None else array.chunks
    return json.dumps(
        {
            "chunks": [int(c) for c in chunks],
            "dtype": str(array.dtype),
            "shape": [int(s) for s in array.shape],
        },
        sort_keys=True,
    )


def _source_array(ref: DatasetRef, path: str, signature: str) -> zarr.Array:
    """The opened source array ``path`` of an in-place dataset (cached per
    process), checked against the signature it had when described."""
    key = (ref.url, ref.uuid, path)
    with _HANDLES_LOCK:
        cached = _SOURCE_ARRAYS.get(key)
        if cached is not None:
            _SOURCE_ARRAYS.move_to_end(key)
            return cached
    try:
        node = open_source_group(ref.url, ref.storage_options).get(path)
    except Exception as exc:
        raise StoreError(
            f"cannot open source store {ref.url!r} of an in-place dataset: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(node, zarr.Array):
        raise StoreError(
            f"array {path!r} is missing from source store {ref.url!r} of an "
            f"in-place dataset"
        )
    found = source_signature(node)
    if found != signature:
        raise StoreError(
            f"array {path!r} of source store {ref.url!r} has changed since the "
            f"in-place dataset was described (now {found}, was {signature}); "
            f"call Dataset.from_zarr again"
        )
    with _HANDLES_LOCK:
        _SOURCE_ARRAYS[key] = node
        while len(_SOURCE_ARRAYS) > HANDLE_CACHE_SIZE:
            _SOURCE_ARRAYS.popitem(last=False)
    return node


def _read_source_chunk(ref: DatasetRef, field: str, chunk_id: int) -> np.ndarray:
    """One row chunk of an in-place field: the rows of each source array
    along its sample axis, moved to the front, flattened into columns when
    the field has several arrays, and cast to the field's dtype.  Chunks a
    writer skipped read as the array's fill value (as in Zarr)."""
    info = ref.field(field)
    src = ref.source(field)
    start, stop = ref.chunk_bounds(chunk_id)
    n = stop - start
    parts = []
    for path, axis, signature in zip(
        src.arrays, src.sample_axes, src.signatures, strict=True
    ):
        array = _source_array(ref, path, signature)
        selection = [slice(None)] * array.ndim
        selection[axis] = slice(start, stop)
        try:
            block = np.asarray(array[tuple(selection)])
        except Exception as exc:
            raise StoreError(
                f"cannot decode rows {start}-{stop} (chunk {chunk_id}) of array "
                f"{path!r} in source store {ref.url!r}: {type(exc).__name__}: {exc}"
            ) from exc
        parts.append(np.moveaxis(block, axis, 0))
    if len(parts) == 1:
        values = parts[0].reshape(n, *info.shape)
    else:
        values = np.concatenate([p.reshape(n, -1) for p in parts], axis=1)
    return values.astype(info.dtype, copy=False)


def _remote_chunk_present(
    ref: DatasetRef, field: str, chunk_id: int, handle: _Handle, key: str
) -> bool:
    """One metadata request for a remote chunk: ``False`` if it is missing;
    denied access or an unreachable endpoint raise :class:`StoreError`."""
    try:
        handle.fs.info(f"{handle.array_dir}/{key}")
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise remote_store_error(
            ref.url,
            exc,
            action=f"read chunk {chunk_id} of array {field!r} of",
            storage_options=ref.storage_options,
        ) from exc
    return True


def check_finite(array: np.ndarray, ref: DatasetRef, field: str, chunk_id: int) -> None:
    """Raise :class:`NonFiniteDataError` if a chunk holds NaN or infinity.

    One reduction pass when the chunk is clean (NaN and inf propagate into a
    sum); only a failing chunk is searched for the first bad value, and the
    message names the store, array, chunk, global row and column.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.schema import FieldInfo
    >>> ref = DatasetRef("/tmp/d.zarr", "0", 8, 4, (("X", FieldInfo((2,), "float64")),))
    >>> bad = np.array([[0.0, 1.0], [np.nan, 2.0]])
    >>> check_finite(bad, ref, "X", 1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dasktrain.errors.NonFiniteDataError: NaN ... 'X', chunk 1: row 5, column 0 ...
    """
    values = np.asarray(array)
    if values.dtype.kind not in "fc" or values.size == 0:
        return
    with np.errstate(all="ignore"):
        total = np.sum(values)
    if np.isfinite(total):
        return
    bad = ~np.isfinite(values)
    if not bad.any():
        return  # the sum overflowed; every value is finite
    flat = int(np.argmax(bad.reshape(-1)))
    index = np.unravel_index(flat, values.shape)
    value = values[index]
    kind = "NaN" if np.isnan(value) else ("+inf" if value > 0 else "-inf")
    start = ref.chunk_bounds(chunk_id)[0]
    where = f"row {start + int(index[0])}"
    if values.ndim == 2:
        where += f", column {int(index[1])}"
    elif values.ndim > 2:
        where += f", position {tuple(int(i) for i in index[1:])}"
    count = int(bad.sum())
    raise NonFiniteDataError(
        f"{kind} in dataset store {ref.url!r}, array {field!r}, chunk {chunk_id}: "
        f"{where} ({count} non-finite value{'s' if count != 1 else ''} in this chunk)"
    )
