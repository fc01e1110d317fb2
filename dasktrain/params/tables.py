"""Sharded parameter tables inside a parameter store.

A table (an embedding table, the weights of a hashed wide model) is a 2-d
array too large to keep in one process.  In a store it lives next to the
dense parameters of a version::

    <store>/versions/<step>/tables/<name>/param       (n_rows, width) values
    <store>/versions/<step>/tables/<name>/<state key> optimizer state rows,
                                                       e.g. "0.sum_sq.user"

Each array is chunked by rows, ``shard_rows`` rows per chunk, and stored
uncompressed: a *shard* is one chunk, a single file (``c/<shard>/0``).

A step that touches a few shards writes only those shards into the new
version; every other shard is *shared* with the previous version by a hard
link (local filesystems) or a server-side copy (object stores), so no
unchanged byte passes through any process.  A shard that was never written
reads as the array's fill value: optimizer state starts as its fill value
(e.g. Adagrad's initial accumulator), and tables that start at zero are never
written until trained.

Workers read and write shards themselves (:func:`read_shard`,
:func:`write_shard`); the client only creates the arrays' metadata and links
untouched shards.  Every function that touches a store takes a
:class:`ParamStoreRef`: the store's URL and its fsspec ``storage_options``,
so that workers reach an object store with the same credentials and endpoint
as the client without any configuration of their own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from dasktrain.data.io import (
    check_storage_options,
    filesystem,
    is_remote,
    normalize_url,
    remote_store_error,
)
from dasktrain.errors import StoreError

__all__ = [
    "PARAM",
    "TABLES",
    "ParamStoreRef",
    "TableLayout",
    "array_key",
    "chunk_key",
    "create_table_arrays",
    "default_shard_rows",
    "link_shards",
    "open_table_array",
    "read_rows",
    "read_shard",
    "write_shard",
]

TABLES = "tables"
"""Name of the group of a version that holds its tables."""
PARAM = "param"
"""Name of a table's parameter array (its other arrays are optimizer state)."""

#: Target size of one shard (a chunk of a table's arrays).
TARGET_SHARD_BYTES = 4 << 20


def default_shard_rows(width: int, dtype: str) -> int:
    """Rows per shard for a table of rows ``width`` wide: about
    :data:`TARGET_SHARD_BYTES` per shard, a multiple of 1024 rows."""
    row_bytes = max(1, width) * np.dtype(dtype).itemsize
    rows = max(1024, (TARGET_SHARD_BYTES // row_bytes) // 1024 * 1024)
    return int(rows)


@dataclass(frozen=True)
class TableLayout:
    """How a table is stored: its shape, dtype, shards, and state arrays.

    ``state`` maps each optimizer state key of the table (e.g.
    ``"0.sum_sq.user"``) to ``(dtype, fill value)``: the value every entry of
    that state starts with.
    """

    name: str
    n_rows: int
    width: int
    dtype: str
    shard_rows: int
    state: Mapping[str, tuple[str, float]] = field(default_factory=dict)

    @property
    def n_shards(self) -> int:
        return max(1, math.ceil(self.n_rows / self.shard_rows))

    def bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) // self.shard_rows

    @property
    def arrays(self) -> list[str]:
        """The table's arrays: the parameters, then the state keys (sorted)."""
        return [PARAM, *sorted(self.state)]

    def array_dtype(self, array: str) -> str:
        return self.dtype if array == PARAM else self.state[array][0]

    def fill_value(self, array: str) -> float:
        return 0.0 if array == PARAM else float(self.state[array][1])

    @property
    def shard_nbytes(self) -> int:
        return sum(
            self.shard_rows * self.width * np.dtype(self.array_dtype(a)).itemsize
            for a in self.arrays
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_rows": self.n_rows,
            "width": self.width,
            "dtype": self.dtype,
            "shard_rows": self.shard_rows,
            "state": {k: [d, v] for k, (d, v) in sorted(self.state.items())},
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TableLayout:
        return cls(
            name=str(obj["name"]),
            n_rows=int(obj["n_rows"]),
            width=int(obj["width"]),
            dtype=str(obj["dtype"]),
            shard_rows=int(obj["shard_rows"]),
            state={k: (str(d), float(v)) for k, (d, v) in obj["state"].items()},
        )


@dataclass(frozen=True)
class ParamStoreRef:
    """Small, picklable description of a parameter store, sent to workers.

    Parameters
    ----------
    url : str
        Absolute local path or fsspec URL of the store (normalized: see
        :meth:`from_user`).
    storage_options : dict, optional
        fsspec options of a remote store (credentials, endpoint...), used by
        every process that reads or writes its tables; empty for local
        stores.  Left out of ``repr`` (it may hold secrets) and of the hash.

    Examples
    --------
    >>> ref = ParamStoreRef.from_user("s3://bucket/run.zarr/", {"key": "k"})
    >>> ref
    ParamStoreRef(url='s3://bucket/run.zarr')
    >>> ParamStoreRef.from_user("/tmp/run.zarr", {"key": "k"}).storage_options
    {}
    """

    url: str
    storage_options: dict[str, Any] = field(
        default_factory=dict, repr=False, hash=False
    )

    def __post_init__(self) -> None:
        options = check_storage_options(self.storage_options)
        object.__setattr__(
            self, "storage_options", options if is_remote(self.url) else {}
        )

    @classmethod
    def from_user(
        cls,
        path: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
    ) -> ParamStoreRef:
        """A reference from a user's path or URL (normalized like every
        store path: absolute local paths, ``file://`` stripped)."""
        return cls(normalize_url(path), dict(storage_options or {}))

    @property
    def options_id(self) -> str:
        """A short digest of the storage options: tells apart handles opened
        with different options without showing them."""
        if not self.storage_options:
            return ""
        text = json.dumps(self.storage_options, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def local_root(self) -> str | None:
        """The store directory of a local store, ``None`` for a remote one."""
        return None if is_remote(self.url) else self.url

    def zarr_options(self) -> dict[str, Any] | None:
        """``storage_options`` as zarr's functions take them with a URL."""
        return dict(self.storage_options) or None

    def filesystem(self) -> tuple[Any, str]:
        """The fsspec filesystem and in-filesystem path of the store root."""
        return filesystem(self.url, self.storage_options)


def as_store_ref(store: ParamStoreRef | str | os.PathLike[str]) -> ParamStoreRef:
    """``store`` itself, or a reference without options for a path or URL."""
    if isinstance(store, ParamStoreRef):
        return store
    return ParamStoreRef.from_user(store)


def _remote_error(
    store: ParamStoreRef | str, exc: Exception, action: str
) -> StoreError | None:
    """A :class:`StoreError` naming the store and what to check (missing
    credentials, denied access, an unreachable endpoint) for a failure on a
    remote store; ``None`` for a local store (its error is clear as it is)."""
    ref = as_store_ref(store)
    if ref.local_root is not None:
        return None
    return remote_store_error(
        ref.url,
        exc,
        action=action,
        what="parameter store",
        storage_options=ref.storage_options,
    )


def array_key(step: int, table: str, array: str) -> str:
    """Key of a table array within the store, e.g.
    ``"versions/12/tables/user/param"``."""
    return f"versions/{step}/{TABLES}/{table}/{array}"


def chunk_key(step: int, table: str, array: str, shard: int) -> str:
    """Key of one shard's file (zarr v3's default chunk key encoding)."""
    return f"{array_key(step, table, array)}/c/{shard}/0"


def create_table_arrays(
    store: ParamStoreRef | str, step: int, layouts: Iterable[TableLayout]
) -> None:
    """Create the (empty) arrays of ``layouts`` in ``versions/<step>``, whose
    group must exist.  Writes metadata only."""
    ref = as_store_ref(store)
    for layout in layouts:
        for array in layout.arrays:
            zarr.create_array(
                store=ref.url,
                storage_options=ref.zarr_options(),
                name=array_key(step, layout.name, array),
                shape=(layout.n_rows, layout.width),
                chunks=(layout.shard_rows, layout.width),
                dtype=layout.array_dtype(array),
                fill_value=layout.fill_value(array),
                compressors=None,
                filters=None,
                overwrite=False,
            )
        zarr.open_group(
            store=ref.url,
            path=f"versions/{step}/{TABLES}/{layout.name}",
            mode="r+",
            storage_options=ref.zarr_options(),
        ).update_attributes({"dasktrain_table": layout.to_json()})


# Opened arrays, per process (metadata of a version's arrays never changes),
# keyed by (url, options_id, array key, mode): a handle opened with some
# credentials is never used for a reference with other ones.
_OPEN: OrderedDict[tuple[str, str, str, str], zarr.Array] = OrderedDict()
_OPEN_LOCK = threading.Lock()
_OPEN_MAX = 256


def open_table_array(
    store: ParamStoreRef | str,
    step: int,
    table: str,
    array: str,
    mode: str = "r",
) -> zarr.Array:
    """A table array of a version (cached per process)."""
    ref = as_store_ref(store)
    key = array_key(step, table, array)
    cache_key = (ref.url, ref.options_id, key, mode)
    with _OPEN_LOCK:
        found = _OPEN.get(cache_key)
        if found is not None:
            _OPEN.move_to_end(cache_key)
            return found
    arr = zarr.open_array(
        store=ref.url,
        path=key,
        mode=mode,
        storage_options=ref.zarr_options(),
    )
    with _OPEN_LOCK:
        _OPEN[cache_key] = arr
        while len(_OPEN) > _OPEN_MAX:
            _OPEN.popitem(last=False)
    return arr


def forget_version(store: ParamStoreRef | str, step: int) -> None:
    """Drop cached array handles of a deleted version (whatever options they
    were opened with)."""
    url = as_store_ref(store).url
    prefix = f"versions/{step}/"
    with _OPEN_LOCK:
        for k in [k for k in _OPEN if k[0] == url and k[2].startswith(prefix)]:
            del _OPEN[k]


def read_shard(
    store: ParamStoreRef | str, step: int, layout: TableLayout, array: str, shard: int
) -> np.ndarray:
    """All rows of one shard (the array's fill value where never written)."""
    start, stop = layout.bounds(shard)
    try:
        arr = open_table_array(store, step, layout.name, array)
        return np.asarray(arr[start:stop])
    except Exception as exc:
        action = f"read shard {shard} of {array_key(step, layout.name, array)} of"
        error = _remote_error(store, exc, action)
        if error is None:
            raise
        raise error from exc


def read_rows(
    store: ParamStoreRef | str,
    step: int,
    layout: TableLayout,
    rows: np.ndarray,
    array: str = PARAM,
) -> np.ndarray:
    """Values of sorted, unique ``rows`` of a table array, reading each shard
    that holds any of them once."""
    out = np.empty((rows.shape[0], layout.width), dtype=layout.array_dtype(array))
    if rows.shape[0] == 0:
        return out
    shards = layout.shard_of(rows)
    cuts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1], True])
    for a, b in itertools.pairwise(cuts):
        shard = int(shards[a])
        start, _ = layout.bounds(shard)
        values = read_shard(store, step, layout, array, shard)
        out[a:b] = values[rows[a:b] - start]
    return out


def write_shard(
    store: ParamStoreRef | str,
    step: int,
    layout: TableLayout,
    array: str,
    shard: int,
    values: np.ndarray,
) -> int:
    """Write one shard of a table array of version ``step``; returns bytes."""
    start, stop = layout.bounds(shard)
    if values.shape != (stop - start, layout.width):
        raise ValueError(
            f"table {layout.name!r} shard {shard}: expected shape "
            f"{(stop - start, layout.width)}, got {values.shape}"
        )
    data = np.ascontiguousarray(values, dtype=layout.array_dtype(array))
    try:
        arr = open_table_array(store, step, layout.name, array, mode="r+")
        arr[start:stop] = data
    except Exception as exc:
        action = f"write shard {shard} of {array_key(step, layout.name, array)} of"
        error = _remote_error(store, exc, action)
        if error is None:
            raise
        raise error from exc
    return int(data.nbytes)


def link_shards(
    store: ParamStoreRef | str,
    src_step: int,
    dst_step: int,
    layout: TableLayout,
    skip: Mapping[str, set[int]] | None = None,
) -> int:
    """Share every shard file of ``versions/<src_step>`` with
    ``versions/<dst_step>``, except the shards in ``skip[array]`` (written
    by the step).  Returns the number of files shared.

    Local stores use hard links (no data is copied); other fsspec stores a
    server-side copy, through a filesystem made with the store's
    ``storage_options``.  Shards never written in the source stay unwritten.
    """
    ref = as_store_ref(store)
    skip = skip or {}
    root = ref.local_root
    shared = 0
    for array in layout.arrays:
        src_dir = array_key(src_step, layout.name, array) + "/c"
        skipped = skip.get(array, set())
        if root is not None:
            base = os.path.join(root, src_dir)
            try:
                names = os.listdir(base)
            except FileNotFoundError:
                continue
            for name in names:
                if not name.isdigit() or int(name) in skipped:
                    continue
                src = os.path.join(base, name, "0")
                if not os.path.exists(src):
                    continue
                dst = os.path.join(
                    root, chunk_key(dst_step, layout.name, array, int(name))
                )
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    os.link(src, dst)
                except FileExistsError:
                    continue
                except OSError:
                    shutil.copyfile(src, dst)
                shared += 1
        else:
            try:
                shared += _copy_shards(ref, src_dir, dst_step, layout, array, skipped)
            except Exception as exc:
                error = _remote_error(ref, exc, f"share the shards of {src_dir} in")
                if error is None:
                    raise
                raise error from exc
    return shared


def _copy_shards(
    ref: ParamStoreRef,
    src_dir: str,
    dst_step: int,
    layout: TableLayout,
    array: str,
    skipped: set[int],
) -> int:
    """Server-side copies of the shard objects under ``src_dir`` (the chunk
    directory of a remote table array) into version ``dst_step``."""
    fs, path = ref.filesystem()
    base = f"{path.rstrip('/')}/{src_dir}"
    try:
        # Shards were written by other processes: list afresh.
        fs.invalidate_cache(base)
        entries = fs.find(base)
    except FileNotFoundError:
        return 0
    copied = 0
    for entry in entries:
        parts = entry[len(base) :].strip("/").split("/")
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        shard = int(parts[0])
        if shard in skipped:
            continue
        key = chunk_key(dst_step, layout.name, array, shard)
        fs.copy(entry, f"{path.rstrip('/')}/{key}")
        copied += 1
    return copied


def layouts_to_json(layouts: Iterable[TableLayout]) -> str:
    return json.dumps([layout.to_json() for layout in layouts], sort_keys=True)
