"""Versioned parameter stores: a Zarr v3 group with atomic commits.

Layout of a store (readable with plain zarr, no pickle anywhere)::

    <store>/zarr.json                     root group; attributes {"dasktrain": {...}}
    <store>/versions/<step>/params/<name> parameter arrays (float64, 0-d allowed)
    <store>/versions/<step>/opt/<key>     optimizer state arrays (dtype as given)
    <store>/.dasktrain-lock               write lock (see ``dasktrain.params.lock``)

The root group has a single attribute, ``"dasktrain"``::

    {"format": "dasktrain.params", "format_version": 1,
     "committed": 12,            # newest committed step, or null
     "versions": [10, 11, 12],   # kept committed steps, ascending
     "keep_versions": 3,
     "meta": {...}}              # the trainer's JSON (see encode_meta)

Only the versions listed there exist as far as readers are concerned: a
directory under ``versions/`` that is not listed is the leftover of a commit
that crashed, and is ignored (and removed by :meth:`ParamStore.cleanup`).

Creation
--------
A local store is written in a hidden sibling directory
(``.<name>.creating-<pid>-<random>-<host>``) and renamed into place, so it
appears complete, with the ``meta`` it was created with, or not at all; a
sibling left by a crashed creation is removed by the next creation of the
same store.  A remote store appears with its root ``zarr.json`` (one object).
A trainer records its run's configuration in that first ``meta``, so a store
whose first version was never committed still describes its run.

Commit protocol
---------------
1. The caller must hold the write lock; the step must exceed ``committed``.
2. A leftover ``versions/<step>`` is deleted.
3. Every array of the new version is written completely.
4. The root attributes are rewritten once, pointing at the new version.  This
   is a single write of the root ``zarr.json``, which zarr's ``LocalStore``
   performs atomically (temporary file, then rename).
5. Versions beyond the newest ``keep_versions`` are deleted.

A crash at any point leaves the previously committed version readable.
Metadata is never consolidated.

NaN and infinity in meta
------------------------
JSON has no NaN or infinity, so non-finite floats in ``meta`` are stored as
one-key objects: ``{"__float__": "NaN"}``, ``{"__float__": "Infinity"}`` and
``{"__float__": "-Infinity"}`` (see :func:`encode_meta`, :func:`decode_meta`).
The key ``"__float__"`` is therefore reserved in meta objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import math
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psutil
import zarr
import zarr.api.asynchronous
from zarr.errors import BaseZarrError, ContainsArrayError
from zarr.storage import FsspecStore, LocalStore

from dasktrain.data.io import (
    check_storage_options,
    filesystem,
    is_remote,
    missing_bucket,
    normalize_url,
    remote_store_error,
)
from dasktrain.errors import StoreError, StoreLockedError, StoreNotFoundError
from dasktrain.params.lock import (
    LOCK_FILENAME,
    LockInfo,
    ObjectLockFile,
    WriteLock,
    break_lock,
    is_lock_leftover,
    read_lock,
)
from dasktrain.params.tables import (
    TABLES,
    ParamStoreRef,
    TableLayout,
    create_table_arrays,
    forget_version,
    open_table_array,
)

__all__ = [
    "ATTRS_KEY",
    "FLOAT_TAG",
    "FORMAT",
    "FORMAT_VERSION",
    "ParamStore",
    "Version",
    "decode_meta",
    "encode_meta",
]

logger = logging.getLogger(__name__)

FORMAT = "dasktrain.params"
"""Value of ``format`` in the root attributes of a parameter store."""
FORMAT_VERSION = 1
"""Version of the store layout written (and the only one read) by this code."""
ATTRS_KEY = "dasktrain"
"""Name of the root group attribute holding the store's state."""
FLOAT_TAG = "__float__"
"""Reserved key of the JSON objects that encode non-finite floats in meta."""

_VERSIONS = "versions"
_PARAMS = "params"
_OPT = "opt"
_ZARR_JSON = "zarr.json"
_ZARR_TEMP_SUFFIX = ".partial"
_LINK_TEMP_SUFFIX = ".linking"
#: A local store is created in a hidden sibling directory
#: ``.<name>.creating-<pid>-<random>-<host>``, then renamed into place.
_CREATING_INFIX = ".creating-"
_TARGET_CHUNK_BYTES = 1 << 20
_DEFAULT_KEEP_VERSIONS = 3
_ALLOWED_OPT_KINDS = "biuf"

_NONFINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# ---------------------------------------------------------------- meta JSON


def _float_to_json(value: float) -> float | dict[str, str]:
    if math.isnan(value):
        return {FLOAT_TAG: "NaN"}
    if math.isinf(value):
        return {FLOAT_TAG: "Infinity" if value > 0 else "-Infinity"}
    return value


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _float_to_json(float(value))
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; "
                    "meta keys must be strings"
                )
            if key == FLOAT_TAG:
                raise ValueError(
                    f"{where} uses the reserved key {FLOAT_TAG!r} "
                    "(it encodes NaN and infinity)"
                )
            out[key] = _encode(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"{where} is not JSON-serializable: {type(value).__name__} {value!r:.80}"
    )


def encode_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Convert trainer metadata to strict JSON (no NaN, no infinity).

    Accepted values: ``None``, ``bool``, ``int``, ``float``, ``str``, NumPy
    scalars of those kinds, lists and tuples (stored as lists) and mappings
    with string keys.  Non-finite floats become ``{"__float__": "NaN"}``,
    ``{"__float__": "Infinity"}`` or ``{"__float__": "-Infinity"}``.

    Raises
    ------
    TypeError
        If a value is not JSON-serializable or a key is not a string; the
        message names the offending key (e.g. ``meta['history'][3]``).
    ValueError
        If a mapping uses the reserved key ``"__float__"``.

    Examples
    --------
    >>> encode_meta({"loss": [0.5, float("nan")], "best": float("inf")})
    {'loss': [0.5, {'__float__': 'NaN'}], 'best': {'__float__': 'Infinity'}}
    """
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
    encoded: dict[str, Any] = _encode(meta, "meta")
    return encoded


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and FLOAT_TAG in value:
            name = value[FLOAT_TAG]
            if isinstance(name, str) and name in _NONFINITE_NAMES:
                return _NONFINITE_NAMES[name]
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def decode_meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`encode_meta`: restore NaN and infinity.

    Examples
    --------
    >>> decode_meta({"loss": [0.5, {"__float__": "-Infinity"}]})
    {'loss': [0.5, -inf]}
    """
    decoded: dict[str, Any] = _decode(dict(obj))
    return decoded


# ---------------------------------------------------------------- locations


@dataclass(frozen=True)
class _Location:
    """Where a store lives.  All path handling goes through this class.

    A store is a local directory (a path or a ``file://`` URL, used through
    zarr's ``LocalStore``) or a prefix on any fsspec filesystem
    (``s3://bucket/runs/exp1.zarr``, used through zarr's ``FsspecStore``).
    Keys are relative to the store root, with ``/`` separators (e.g.
    ``"versions/12/params/w"``).

    Parameters
    ----------
    url : str
        Absolute local path, or the fsspec URL without a trailing ``/``.
    storage_options : dict
        fsspec options of a remote store (``{}`` otherwise).
    """

    url: str
    storage_options: dict[str, Any] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def from_user(
        cls,
        path: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
    ) -> _Location:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(
                f"store path must be a str or path-like, got {type(path).__name__}"
            )
        text = os.fspath(path)
        if not text or text == "file://":
            raise ValueError("store path must not be empty")
        url = normalize_url(text)
        options = check_storage_options(storage_options)
        return cls(url, options if is_remote(url) else {})

    def __str__(self) -> str:
        return self.url

    @property
    def remote(self) -> bool:
        """Whether the store is reached through fsspec."""
        return is_remote(self.url)

    @property
    def root(self) -> Path:
        """The store directory (local stores only)."""
        if self.remote:
            raise TypeError(f"parameter store {self.url} is not a local directory")
        return Path(self.url)

    @functools.cached_property
    def _filesystem(self) -> tuple[Any, str]:
        return filesystem(self.url, self.storage_options)

    def _fs_path(self, key: str = "") -> str:
        base = self._filesystem[1].rstrip("/")
        return f"{base}/{key}" if key else base

    def _remote_error(self, exc: BaseException, action: str) -> StoreError:
        return remote_store_error(
            self.url,
            exc,
            action=action,
            what="parameter store",
            storage_options=self.storage_options,
        )

    def _info(self, key: str) -> dict[str, Any] | None:
        """fsspec ``info`` of a key, ``None`` if missing (remote stores only);
        other failures raise :class:`StoreError`."""
        fs, _ = self._filesystem
        path = self._fs_path(key)
        try:
            fs.invalidate_cache(path)
            info: dict[str, Any] = fs.info(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._remote_error(exc, "access") from exc
        return info

    def kind(self) -> Literal["missing", "dir", "other"]:
        if self.remote:
            info = self._info("")
            if info is None:
                return "missing"
            return "dir" if info.get("type") == "directory" else "other"
        if self.root.is_dir():
            return "dir"
        if self.root.exists():
            return "other"
        return "missing"

    def missing_reason(self) -> str:
        """Why nothing is found at the store's path, for messages."""
        if self.remote:
            bucket = missing_bucket(self.url, self.storage_options)
            if bucket:
                return f"bucket {bucket!r} does not exist"
            return "no object under this prefix"
        return "path not found"

    def is_empty(self) -> bool:
        if self.remote:
            return not self.children("")
        return not any(self.root.iterdir())

    def make_root(self) -> None:
        if not self.remote:
            self.root.mkdir(parents=True, exist_ok=True)
            return
        # Object stores have no directories; a missing bucket is an error
        # (buckets are never created here).
        bucket = missing_bucket(self.url, self.storage_options)
        if bucket:
            raise StoreNotFoundError(
                f"cannot create a parameter store at {self.url}: bucket "
                f"{bucket!r} does not exist (dasktrain never creates buckets; "
                "create it first)"
            )

    def zarr_store(self, *, read_only: bool) -> LocalStore | FsspecStore:
        if self.remote:
            return FsspecStore.from_url(
                self.url,
                storage_options=dict(self.storage_options) or None,
                read_only=read_only,
            )
        return LocalStore(self.root, read_only=read_only)

    def has(self, key: str) -> bool:
        if self.remote:
            return self._info(key) is not None
        return (self.root / key).exists()

    def children(self, key: str) -> list[str]:
        if self.remote:
            fs, _ = self._filesystem
            path = self._fs_path(key)
            try:
                fs.invalidate_cache(path)
                entries = fs.ls(path, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                return []
            except Exception as exc:
                raise self._remote_error(exc, "list") from exc
            paths = [str(entry).rstrip("/") for entry in entries]
            if paths == [path.rstrip("/")]:
                return []  # ``ls`` of an object lists the object itself
            return sorted({entry.rsplit("/", 1)[-1] for entry in paths})
        try:
            return sorted(entry.name for entry in (self.root / key).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        if self.remote:
            fs, _ = self._filesystem
            path = self._fs_path(key)
            try:
                fs.invalidate_cache(path)
                fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise self._remote_error(exc, f"delete {key} of") from exc
            return
        target = self.root / key
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def link(self, src_key: str, dst_key: str) -> None:
        """Make ``dst_key`` share the content of ``src_key`` without sending
        the bytes through this process.

        Local stores hard-link the file (copying it where linking fails, e.g.
        across devices or on filesystems without hard links); fsspec stores
        copy the object on the server (``fs.copy``: a server-side
        ``CopyObject`` on S3).  An existing ``dst_key`` is replaced (locally,
        atomically).

        Parameters
        ----------
        src_key, dst_key : str
            Keys of files (not directories) relative to the store root, with
            ``/`` separators, e.g. ``"versions/12/user/c/3/0"``.

        Raises
        ------
        StoreNotFoundError
            ``src_key`` does not exist.
        StoreError
            The link or copy failed (e.g. access denied); the message names
            both keys and the store.
        """
        for key in (src_key, dst_key):
            if not key or key.startswith("/") or ".." in key.split("/"):
                raise ValueError(f"invalid key {key!r}: keys are relative to the store")
        what = f"link {dst_key} to {src_key} in parameter store {self.url}"
        if self.remote:
            self._link_remote(src_key, dst_key, what)
            return
        src = self.root.joinpath(*src_key.split("/"))
        dst = self.root.joinpath(*dst_key.split("/"))
        if not src.is_file():
            raise StoreNotFoundError(f"cannot {what}: {src_key} does not exist")
        dst.parent.mkdir(parents=True, exist_ok=True)
        staged = dst.with_name(f"{dst.name}.{uuid.uuid4().hex}{_LINK_TEMP_SUFFIX}")
        try:
            try:
                os.link(src, staged)
            except OSError:
                shutil.copyfile(src, staged)
            os.replace(staged, dst)
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise StoreError(f"cannot {what}: {exc}") from exc

    def _link_remote(self, src_key: str, dst_key: str, what: str) -> None:
        fs, _ = self._filesystem
        try:
            fs.copy(self._fs_path(src_key), self._fs_path(dst_key))
        except FileNotFoundError as exc:
            if self._info(src_key) is None:
                raise StoreNotFoundError(
                    f"cannot {what}: {src_key} does not exist"
                ) from exc
            raise self._remote_error(exc, f"copy {src_key} to {dst_key} in") from exc
        except Exception as exc:
            raise self._remote_error(exc, f"copy {src_key} to {dst_key} in") from exc

    @property
    def lock_target(self) -> Path | ObjectLockFile:
        """What :class:`~dasktrain.params.lock.WriteLock` locks: the store
        directory, or the lock object of a remote store."""
        if self.remote:
            fs, _ = self._filesystem
            return ObjectLockFile(
                fs, self._fs_path(LOCK_FILENAME), f"{self.url}/{LOCK_FILENAME}"
            )
        return self.root


# ---------------------------------------------------------------- value types


@dataclass(frozen=True)
class Version:
    """One committed version of a store's arrays.

    Parameters
    ----------
    step : int
        The step that committed this version.
    params : dict of str to numpy.ndarray
        Parameters by name (float64).
    opt_state : dict of str to numpy.ndarray
        Optimizer state by key, with the dtypes they were committed with.

    Examples
    --------
    >>> import numpy as np
    >>> version = Version(step=1, params={"b": np.zeros(())}, opt_state={})
    >>> version.params["b"].shape
    ()
    """

    step: int
    params: dict[str, np.ndarray]
    opt_state: dict[str, np.ndarray]


@dataclass(frozen=True)
class _RootState:
    committed: int | None
    versions: tuple[int, ...]
    keep_versions: int
    meta: dict[str, Any]

    def to_attrs(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "committed": self.committed,
            "versions": list(self.versions),
            "keep_versions": self.keep_versions,
            "meta": encode_meta(self.meta),
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _parse_attrs(attrs: Mapping[str, Any], label: str) -> _RootState:
    """Validate the root attributes of a store; ``StoreError`` if wrong."""
    state = attrs.get(ATTRS_KEY)
    if not isinstance(state, dict):
        raise StoreError(
            f"{label} is a zarr group but not a dasktrain parameter store "
            f"(its root attributes have no {ATTRS_KEY!r} object)"
        )
    fmt = state.get("format")
    if fmt != FORMAT:
        raise StoreError(
            f"{label} is not a dasktrain parameter store: its format is {fmt!r}, "
            f"expected {FORMAT!r}"
        )
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"parameter store {label} has format_version {version!r}; this "
            f"version of dasktrain reads format_version {FORMAT_VERSION} only"
        )

    def bad(field: str, problem: str) -> StoreError:
        return StoreError(
            f"parameter store {label} has corrupt root attributes: {field!r} {problem}"
        )

    committed: Any = state.get("committed")
    if committed is not None and not (_is_int(committed) and committed >= 0):
        raise bad("committed", f"is {committed!r}, expected a step or null")
    versions: Any = state.get("versions")
    if not isinstance(versions, list) or not all(
        _is_int(v) and v >= 0 for v in versions
    ):
        raise bad("versions", f"is {versions!r}, expected a list of steps")
    if versions != sorted(set(versions)):
        raise bad("versions", f"is {versions!r}, expected unique ascending steps")
    if committed is None and versions:
        raise bad("versions", "is not empty although nothing is committed")
    if committed is not None and (not versions or versions[-1] != committed):
        raise bad("versions", f"is {versions!r} but does not end at {committed}")
    keep: Any = state.get("keep_versions")
    if not (_is_int(keep) and keep >= 1):
        raise bad("keep_versions", f"is {keep!r}, expected an integer >= 1")
    meta = state.get("meta")
    if not isinstance(meta, dict):
        raise bad("meta", f"is {type(meta).__name__}, expected an object")
    return _RootState(
        committed=None if committed is None else int(committed),
        versions=tuple(int(v) for v in versions),
        keep_versions=int(keep),
        meta=decode_meta(meta),
    )


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} names must be strings, got {name!r}")
    if not name:
        raise ValueError(f"{what} name must not be empty")
    if "/" in name:
        raise ValueError(f"{what} name {name!r} must not contain '/'")
    if name.startswith((".", "__")):
        raise ValueError(f"{what} name {name!r} must not start with '.' or '__'")
    return name


def _check_arrays(arrays: Any, *, what: str, as_float64: bool) -> dict[str, np.ndarray]:
    """Validate arrays to commit and return them in the dtype to store."""
    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"{what} must be a mapping of name to numpy array, "
            f"got {type(arrays).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        _check_name(name, what)
        if not isinstance(value, np.ndarray | np.generic):
            raise TypeError(
                f"{what} {name!r} must be a numpy array, got {type(value).__name__}"
            )
        array = np.asarray(value)
        if as_float64:
            if array.dtype.kind != "f":
                raise TypeError(
                    f"{what} {name!r} has dtype {array.dtype}; parameters must be "
                    "floating point (they are stored as float64)"
                )
            array = array.astype(np.float64, copy=False)
        elif array.dtype.kind not in _ALLOWED_OPT_KINDS:
            raise TypeError(
                f"{what} {name!r} has dtype {array.dtype}; only bool, integer "
                "and floating point arrays can be stored"
            )
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        out[name] = array
    return out


def _check_step(step: Any) -> int:
    if not _is_int(step):
        raise TypeError(f"step must be an integer, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def _chunks_for(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Row chunks of about ``_TARGET_CHUNK_BYTES``; whole trailing dimensions."""
    if not shape:
        return ()
    row_bytes = itemsize * math.prod(max(1, s) for s in shape[1:])
    rows = max(1, min(shape[0], _TARGET_CHUNK_BYTES // max(1, row_bytes)))
    return (rows, *(max(1, s) for s in shape[1:]))


# ---------------------------------------------------------------- the store


def _write_empty_store(store: LocalStore | FsspecStore, attrs: dict[str, Any]) -> None:
    root = zarr.create_group(
        store=store, attributes={ATTRS_KEY: attrs}, overwrite=False
    )
    root.create_group(_VERSIONS)


def _creation_is_dead(name: str) -> bool:
    """Whether ``name`` (a creation directory, see :data:`_CREATING_INFIX`)
    was left by a process of this host that no longer runs."""
    try:
        pid_text, _, host = name.split(_CREATING_INFIX, 1)[1].split("-", 2)
        pid = int(pid_text)
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _create_local(root: Path, attrs: dict[str, Any]) -> None:
    """Create a local store all at once: written in a hidden sibling
    directory, then renamed into place.  A crash at any moment leaves either
    no store or a complete one (with the run's configuration in ``attrs``);
    the sibling a crash leaves is removed by the next creation."""
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{root.name}{_CREATING_INFIX}"
    for leftover in parent.glob(f"{prefix}*"):
        if _creation_is_dead(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)
    staged = parent / (
        f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"
    )
    try:
        _write_empty_store(LocalStore(staged), attrs)
        # Atomic; also replaces an empty directory, and fails on anything
        # else (another store created meanwhile).
        os.rename(staged, root)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


class ParamStore:
    """A versioned parameter store on disk (a Zarr v3 group).

    Create one with :meth:`create` or open one with :meth:`open`.  Readers see
    the state of the root attributes as of opening (or the last
    :meth:`refresh`); a writer takes the write lock with :meth:`lock` and adds
    versions with :meth:`commit`.  See the module documentation for the
    layout, the commit protocol and how NaN is stored in ``meta``.

    An instance is not meant to be shared between threads.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> store = ParamStore.create(path, keep_versions=2, meta={"model": "linear"})
    >>> with store.lock(owner="example"):
    ...     for step in (1, 2, 3):
    ...         store.commit(step, {"w": np.full(3, float(step)), "b": np.zeros(())},
    ...                      {"sgd.count": np.array(step)}, {"loss": float("nan")})
    >>> store.committed, store.versions
    (3, [2, 3])
    >>> version = ParamStore.open(path).read()
    >>> version.step, version.params["w"], version.opt_state["sgd.count"]
    (3, array([3., 3., 3.]), array(3))
    >>> store.meta
    {'loss': nan}
    """

    def __init__(self, location: _Location, state: _RootState) -> None:
        self._location = location
        self._state = state
        self._lock: WriteLock | None = None

    # -------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        keep_versions: int = _DEFAULT_KEEP_VERSIONS,
        meta: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> ParamStore:
        """Create an empty store (nothing committed) at ``path``.

        Parameters
        ----------
        path : str or path-like
            A directory that does not exist yet (or is empty), a ``file://``
            URL, or an fsspec URL (``s3://bucket/runs/exp1.zarr``) under which
            nothing exists yet.
        keep_versions : int, default 3
            How many committed versions to keep; older ones are deleted after
            each commit.
        meta : mapping, optional
            Initial JSON metadata (see :func:`encode_meta`).
        storage_options : dict, optional
            fsspec options of a remote store (credentials, endpoint...).
            Without them, the filesystem configures itself from the
            environment (e.g. ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``).

        Raises
        ------
        StoreError
            If something (a store or anything else) already exists at ``path``,
            or a remote store cannot be reached (the message says why).
        StoreNotFoundError
            If the bucket of a remote ``path`` does not exist.
        TypeError, ValueError
            If ``meta`` is not JSON-serializable or ``keep_versions`` < 1.

        Examples
        --------
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "new.zarr")
        >>> ParamStore.create(path).committed is None
        True
        """
        location = _Location.from_user(path, storage_options)
        if not _is_int(keep_versions):
            raise TypeError(
                f"keep_versions must be an integer, got {type(keep_versions).__name__}"
            )
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        state = _RootState(
            committed=None,
            versions=(),
            keep_versions=int(keep_versions),
            meta=decode_meta(encode_meta(meta if meta is not None else {})),
        )
        attrs = state.to_attrs()
        kind = location.kind()
        if kind == "other" or (kind == "dir" and not location.is_empty()):
            try:
                _load_state(location)
            except StoreError as exc:
                raise StoreError(
                    f"cannot create a parameter store at {location}: something "
                    f"else already exists there ({exc}); choose another path"
                ) from None
            raise StoreError(
                f"cannot create a parameter store at {location}: a parameter store "
                "already exists there (open it with ParamStore.open, or choose "
                "another path)"
            )
        try:
            if location.remote:
                # One object (the root zarr.json, with the attributes) makes
                # the store; the versions group is only a placeholder.
                location.make_root()
                _write_empty_store(location.zarr_store(read_only=False), attrs)
            else:
                _create_local(location.root, attrs)
        except StoreError:
            raise
        except (OSError, BaseZarrError) as exc:
            if location.remote:
                raise location._remote_error(exc, "create") from exc
            raise StoreError(
                f"cannot create a parameter store at {location}: {exc}"
            ) from exc
        except Exception as exc:
            if not location.remote:
                raise
            raise location._remote_error(exc, "create") from exc
        logger.info("created parameter store %s", location)
        return cls(location, state)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> ParamStore:
        """Open an existing store (a local path, ``file://`` or fsspec URL;
        ``storage_options`` as in :meth:`create`).

        Raises
        ------
        StoreNotFoundError
            If nothing exists at ``path`` (or its bucket does not exist).
        StoreError
            If ``path`` is not a dasktrain parameter store (a plain directory,
            a dataset or other zarr group, unreadable metadata, or an
            unsupported ``format_version``); the message says which.

        Examples
        --------
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "missing.zarr")
        >>> ParamStore.open(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dasktrain.errors.StoreNotFoundError: no parameter store at ...
        """
        location = _Location.from_user(path, storage_options)
        return cls(location, _load_state(location))

    @staticmethod
    def exists(
        path: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> bool:
        """Whether a valid parameter store exists at ``path`` (``False`` also
        when a remote store cannot be reached).

        Examples
        --------
        >>> import tempfile
        >>> ParamStore.exists(tempfile.mkdtemp())
        False
        """
        try:
            _load_state(_Location.from_user(path, storage_options))
        except StoreError:
            return False
        return True

    @staticmethod
    def break_lock(
        path: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> LockInfo | None:
        """Remove the write lock of the store at ``path``, whoever holds it.

        Locks of dead processes on the same host are taken over automatically
        by :meth:`lock`; a lock taken on another host never is, because its
        holder may still be running.  Call this when you know that holder is
        gone.  A live holder whose lock was broken refuses to commit further.

        Returns
        -------
        LockInfo or None
            The removed lock, or ``None`` if the store was not locked.

        Examples
        --------
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "locked.zarr")
        >>> store = ParamStore.create(path)
        >>> _ = store.lock(owner="job on a dead host")
        >>> ParamStore.break_lock(path).owner
        'job on a dead host'
        """
        location = _Location.from_user(path, storage_options)
        return break_lock(location.lock_target)

    # -------------------------------------------------------- properties

    @property
    def path(self) -> str:
        """Absolute path of the store, or its fsspec URL."""
        return str(self._location)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options of a remote store (``{}`` for a local one); a copy."""
        return dict(self._location.storage_options)

    @property
    def ref(self) -> ParamStoreRef:
        """Small, picklable reference to this store (URL and storage options)
        for the workers that read and write its tables."""
        return ParamStoreRef(self.path, self.storage_options)

    @property
    def committed(self) -> int | None:
        """Newest committed step (``None`` before the first commit)."""
        return self._state.committed

    @property
    def versions(self) -> list[int]:
        """Committed steps still kept, ascending."""
        return list(self._state.versions)

    @property
    def keep_versions(self) -> int:
        """How many committed versions are kept."""
        return self._state.keep_versions

    @property
    def meta(self) -> dict[str, Any]:
        """Metadata of the committed version (a deep copy)."""
        return copy.deepcopy(self._state.meta)

    @property
    def holds_lock(self) -> bool:
        """Whether this instance holds the store's write lock."""
        return self._lock is not None and self._lock.held

    def lock_holder(self) -> LockInfo | None:
        """Who holds the write lock now (``None`` if nobody)."""
        return read_lock(self._location.lock_target)

    def __repr__(self) -> str:
        return (
            f"ParamStore({self.path!r}, committed={self.committed}, "
            f"versions={self.versions})"
        )

    # -------------------------------------------------------- reading

    def refresh(self) -> None:
        """Re-read the root attributes (another process may have committed)."""
        self._state = _load_state(self._location)

    def read(self, step: int | None = None) -> Version:
        """Read all arrays of a committed version.

        Parameters
        ----------
        step : int, optional
            A step in :attr:`versions`; default: :attr:`committed`.

        Raises
        ------
        StoreError
            If nothing is committed, ``step`` is not a kept committed version,
            or the version was deleted by a writer while it was being read
            (call :meth:`refresh` and read the newer version).

        Examples
        --------
        >>> import os, tempfile
        >>> import numpy as np
        >>> store = ParamStore.create(os.path.join(tempfile.mkdtemp(), "r.zarr"))
        >>> with store.lock():
        ...     store.commit(0, {"w": np.ones(2)}, {}, {})
        >>> store.read().params["w"]
        array([1., 1.])
        """
        if step is None:
            if self._state.committed is None:
                raise StoreError(
                    f"parameter store {self.path} has no committed version"
                )
            step = self._state.committed
        step = _check_step(step)
        if step not in self._state.versions:
            raise StoreError(
                f"parameter store {self.path} has no committed version {step} "
                f"(kept versions: {list(self._state.versions)})"
            )
        key = f"{_VERSIONS}/{step}"
        try:
            group = zarr.open_group(
                store=self._location.zarr_store(read_only=True),
                path=key,
                mode="r",
                zarr_format=3,
                use_consolidated=False,
            )
            params = _read_arrays(group, _PARAMS)
            opt_state = _read_arrays(group, _OPT)
        except (OSError, ValueError, KeyError, BaseZarrError) as exc:
            raise self._vanished_or(step, f"cannot read version {key}: {exc}") from exc
        # Versions listed in the root attributes are never modified, and are
        # deleted only after being unlisted: if ``step`` is still listed now,
        # everything read above was intact.
        if step not in _load_state(self._location).versions:
            raise self._vanished_or(step, "")
        return Version(step=step, params=params, opt_state=opt_state)

    def _vanished_or(self, step: int, problem: str) -> StoreError:
        try:
            still_listed = step in _load_state(self._location).versions
        except StoreError:
            still_listed = True
        if not still_listed:
            return StoreError(
                f"version {step} of parameter store {self.path} was deleted by a "
                "writer (only the newest versions are kept); call refresh() and "
                "read a newer version"
            )
        return StoreError(f"parameter store {self.path}: {problem}")

    # -------------------------------------------------------- writing

    def lock(self, *, owner: str = "") -> WriteLock:
        """Take the write lock of this store (one writer at a time).

        Returns the lock, which is also a context manager; the root attributes
        are re-read once the lock is held.  A lock held by a dead process on
        this host is taken over; see ``dasktrain.params.lock`` for the rule.

        Raises
        ------
        StoreLockedError
            If another writer holds the lock (the message names it), including
            this very instance.

        Examples
        --------
        >>> import os, tempfile
        >>> store = ParamStore.create(os.path.join(tempfile.mkdtemp(), "l.zarr"))
        >>> with store.lock(owner="me"):
        ...     ParamStore.open(store.path).lock()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dasktrain.errors.StoreLockedError: parameter store ... is locked ...
        """
        lock = WriteLock.acquire(
            self._location.lock_target, owner=owner, label=self.path
        )
        try:
            self.refresh()
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return lock

    def release(self) -> None:
        """Release the write lock taken by :meth:`lock`; harmless if not held."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _require_lock(self, action: str) -> WriteLock:
        if self._lock is None or self._lock.released:
            raise StoreError(
                f"cannot {action} parameter store {self.path} without its write "
                "lock; take it with store.lock() first"
            )
        try:
            self._lock.check()
        except StoreLockedError as exc:
            raise StoreLockedError(f"cannot {action}: {exc}") from None
        return self._lock

    def commit(
        self,
        step: int,
        params: Mapping[str, np.ndarray],
        opt_state: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
        *,
        prepared: bool = False,
        protect: Collection[int] = (),
    ) -> None:
        """Write a new version and make it the committed one, atomically.

        Parameters
        ----------
        step : int
            Step of the new version; must exceed :attr:`committed`.
        params : mapping of str to numpy.ndarray
            Floating point parameter arrays (stored as float64; 0-d allowed).
        opt_state : mapping of str to numpy.ndarray
            Optimizer state arrays (bool, integer or float; dtype kept).
        meta : mapping
            JSON metadata that replaces the store's meta (see
            :func:`encode_meta`; NaN and infinity are allowed).
        prepared : bool, default False
            The version was started with :meth:`prepare_version` and its
            tables are written: keep them and add the dense arrays.
        protect : collection of int, default ()
            Versions that are still being read: if they fall out of the kept
            versions, they are unlisted but not deleted (the caller deletes
            them later with :meth:`discard_version`).

        Raises
        ------
        StoreError
            Without the write lock, for ``step <= committed``, or when writing
            fails (the message names the array); the committed version is
            left intact in every case.
        StoreLockedError
            If the lock was broken by someone else.
        TypeError, ValueError
            For invalid names, arrays or meta (nothing is written).
        """
        step = _check_step(step)
        params_out = _check_arrays(params, what="parameter", as_float64=True)
        opt_out = _check_arrays(opt_state, what="optimizer state", as_float64=False)
        new_meta = decode_meta(encode_meta(meta))

        self._require_lock("commit to")
        current = _load_state(self._location)
        self._state = current
        if current.committed is not None and step <= current.committed:
            raise StoreError(
                f"cannot commit step {step} to parameter store {self.path}: "
                f"step {current.committed} is already committed (steps must increase)"
            )

        key = f"{_VERSIONS}/{step}"
        if prepared:
            if not self._location.has(f"{key}/{TABLES}"):
                raise StoreError(
                    f"cannot commit step {step} to parameter store {self.path}: "
                    f"{key} was not prepared with prepare_version()"
                )
            for sub in (_PARAMS, _OPT):
                if self._location.has(f"{key}/{sub}"):
                    self._delete(f"{key}/{sub}")
        elif self._location.has(key):
            logger.warning(
                "removing %s/%s, left over by a commit that did not finish",
                self.path,
                key,
            )
            self._delete(key)
        self._write_version(key, params_out, opt_out, prepared=prepared)

        versions = sorted({*current.versions, step})
        kept = tuple(versions[-current.keep_versions :])
        dropped = versions[: -current.keep_versions]
        new_state = _RootState(
            committed=step,
            versions=kept,
            keep_versions=current.keep_versions,
            meta=new_meta,
        )
        self._write_root(new_state, key)
        self._state = new_state
        logger.debug("committed step %d to %s", step, self.path)

        for old in dropped:
            if old in protect:
                continue
            old_key = f"{_VERSIONS}/{old}"
            try:
                self._delete(old_key)
            except OSError as exc:
                logger.warning(
                    "could not delete old version %s/%s (cleanup() retries): %s",
                    self.path,
                    old_key,
                    exc,
                )

    def _write_version(
        self,
        key: str,
        params: dict[str, np.ndarray],
        opt_state: dict[str, np.ndarray],
        *,
        prepared: bool = False,
    ) -> None:
        progress = _Progress(f"group {key}")
        try:
            _run_io(
                lambda: self._write_version_async(
                    key, params, opt_state, progress, prepared=prepared
                ),
                shared_loop=self._location.remote,
            )
        except Exception as exc:
            if not prepared:
                self._discard(key)
            raise StoreError(
                f"cannot write {progress.target} of parameter store {self.path}: "
                f"{exc}; the committed version is intact"
            ) from exc

    async def _write_version_async(
        self,
        key: str,
        params: dict[str, np.ndarray],
        opt_state: dict[str, np.ndarray],
        progress: _Progress,
        *,
        prepared: bool = False,
    ) -> None:
        root = await zarr.api.asynchronous.open_group(
            store=self._location.zarr_store(read_only=False),
            mode="r+",
            zarr_format=3,
            use_consolidated=False,
        )
        versions = await root.require_group(_VERSIONS)
        if prepared:
            version = await versions.require_group(key.split("/")[-1])
        else:
            version = await versions.create_group(key.split("/")[-1])
        for group_name, arrays in ((_PARAMS, params), (_OPT, opt_state)):
            progress.target = f"group {key}/{group_name}"
            group = await version.create_group(group_name)
            for name, data in sorted(arrays.items()):
                progress.target = f"array {key}/{group_name}/{name}"
                array = await group.create_array(
                    name,
                    shape=data.shape,
                    dtype=data.dtype,
                    chunks=_chunks_for(data.shape, data.dtype.itemsize),
                    fill_value=0,
                )
                await array.setitem(Ellipsis, data)

    def update_meta(self, meta: Mapping[str, Any]) -> None:
        """Replace the meta of the committed version (its arrays stay): for a
        run whose state changed without a new step, e.g. an epoch closed by a
        resumed fit.  Atomic like :meth:`commit` (one write of the root
        attributes); needs the write lock.

        Raises
        ------
        StoreError
            Without the write lock, with nothing committed, or when writing
            fails (the previous meta is then kept).
        """
        new_meta = decode_meta(encode_meta(meta))
        self._require_lock("update the meta of")
        current = _load_state(self._location)
        if current.committed is None:
            raise StoreError(
                f"cannot update the meta of parameter store {self.path}: "
                "nothing is committed"
            )
        new_state = _RootState(
            committed=current.committed,
            versions=current.versions,
            keep_versions=current.keep_versions,
            meta=new_meta,
        )
        self._write_root(new_state, None)
        self._state = new_state

    def _write_root(self, state: _RootState, key: str | None) -> None:
        try:
            root = zarr.open_group(
                store=self._location.zarr_store(read_only=False),
                mode="r+",
                zarr_format=3,
                use_consolidated=False,
            )
            root.update_attributes({ATTRS_KEY: state.to_attrs()})
        except Exception as exc:
            try:
                landed = _load_state(self._location).to_attrs() == state.to_attrs()
            except StoreError:
                landed = False
            if landed:
                logger.warning(
                    "writing the root attributes of %s reported an error, but they "
                    "were written: %s",
                    self.path,
                    exc,
                )
                return
            if key is not None:
                self._discard(key)
            raise StoreError(
                f"cannot write the root attributes ({_ZARR_JSON}) of parameter "
                f"store {self.path}: {exc}"
            ) from exc

    def _delete(self, key: str) -> None:
        try:
            self._location.delete(key)
        except OSError as exc:
            raise StoreError(
                f"cannot delete {key} of parameter store {self.path}: {exc}"
            ) from exc

    def _discard(self, key: str) -> None:
        try:
            self._delete(key)
        except OSError as exc:
            logger.warning(
                "could not remove the unfinished version %s/%s (cleanup() retries): %s",
                self.path,
                key,
                exc,
            )

    def cleanup(self) -> list[str]:
        """Delete what crashed writers left behind; requires the write lock.

        Removes version directories not listed as committed (unfinished
        commits, old versions whose deletion was interrupted) and zarr's
        temporary files.

        Returns
        -------
        list of str
            The removed entries, relative to the store (e.g. ``"versions/7"``).

        Examples
        --------
        >>> import os, tempfile
        >>> store = ParamStore.create(os.path.join(tempfile.mkdtemp(), "c.zarr"))
        >>> os.makedirs(os.path.join(store.path, "versions", "5", "params"))
        >>> with store.lock():
        ...     store.cleanup()
        ['versions/5']
        """
        self._require_lock("clean up")
        self.refresh()
        keep = {str(step) for step in self._state.versions}
        removed: list[str] = []
        for name in self._location.children(_VERSIONS):
            if name == _ZARR_JSON or name in keep:
                continue
            key = f"{_VERSIONS}/{name}"
            self._delete(key)
            removed.append(key)
        for name in self._location.children(""):
            zarr_temp = name.startswith("zarr.") and name.endswith(_ZARR_TEMP_SUFFIX)
            if zarr_temp or is_lock_leftover(name):
                self._delete(name)
                removed.append(name)
        if removed:
            logger.info("cleaned up %s: removed %s", self.path, ", ".join(removed))
        return removed

    def remove(self) -> None:
        """Delete the whole store; requires the write lock, which goes last.

        Everything but the lock is deleted first, then the lock is released,
        so no other writer starts on a half-deleted store.  The emptied
        directory of a local store is removed too (an object store has no
        directories).

        Examples
        --------
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "gone.zarr")
        >>> store = ParamStore.create(path)
        >>> _ = store.lock()
        >>> store.remove()
        >>> os.path.exists(path), store.holds_lock
        (False, False)
        """
        self._require_lock("remove")
        for name in self._location.children(""):
            if name == LOCK_FILENAME or is_lock_leftover(name):
                continue
            self._delete(name)
        self.release()
        if not self._location.remote:
            with contextlib.suppress(OSError):
                self._location.root.rmdir()
        logger.info("removed parameter store %s", self.path)

    # -------------------------------------------------------- sharded tables

    def prepare_version(self, step: int, layouts: Sequence[TableLayout]) -> None:
        """Start version ``step`` with empty sharded tables (requires the lock).

        Workers then write the shards a step changed, :func:`link_shards`
        shares the others with the previous version, and :meth:`commit` with
        ``prepared=True`` adds the dense arrays and makes it the committed
        version.  Until then the version is invisible to readers, and
        :meth:`discard_version` (or :meth:`cleanup`) removes it.
        """
        step = _check_step(step)
        self._require_lock("prepare a version of")
        if step in self._state.versions:
            raise StoreError(
                f"cannot prepare version {step} of parameter store {self.path}: "
                "it is already committed"
            )
        key = f"{_VERSIONS}/{step}"
        if self._location.has(key):
            self._delete(key)
        forget_version(self.ref, step)
        try:
            root = zarr.open_group(
                store=self._location.zarr_store(read_only=False),
                mode="r+",
                use_consolidated=False,
            )
            version = root.require_group(_VERSIONS).create_group(str(step))
            version.create_group(TABLES)
            create_table_arrays(self.ref, step, layouts)
        except Exception as exc:
            self._discard(key)
            raise StoreError(
                f"cannot prepare {key} of parameter store {self.path}: {exc}"
            ) from exc

    def version_dirs(self) -> list[int]:
        """Steps of every version directory present, committed or not."""
        return sorted(
            int(name) for name in self._location.children(_VERSIONS) if name.isdigit()
        )

    def discard_version(self, step: int) -> None:
        """Delete an uncommitted version (requires the lock); committed
        versions are refused."""
        step = _check_step(step)
        self._require_lock("discard a version of")
        if step in self._state.versions:
            raise StoreError(
                f"version {step} of parameter store {self.path} is committed; "
                "it is deleted only when newer versions replace it"
            )
        forget_version(self.ref, step)
        self._delete(f"{_VERSIONS}/{step}")

    def table_layouts(self, step: int | None = None) -> dict[str, TableLayout]:
        """The sharded tables of a version (default: the committed one), by
        name; empty for a store without tables."""
        if step is None:
            step = self._state.committed
            if step is None:
                return {}
        key = f"{_VERSIONS}/{step}/{TABLES}"
        if not self._location.has(key):
            return {}
        out: dict[str, TableLayout] = {}
        try:
            group = zarr.open_group(
                store=self._location.zarr_store(read_only=True),
                path=key,
                mode="r",
                use_consolidated=False,
            )
            for name, sub in group.groups():
                layout = TableLayout.from_json(
                    dict(sub.attrs["dasktrain_table"])  # type: ignore[arg-type]
                )
                out[name] = layout
        except (OSError, KeyError, TypeError, ValueError, BaseZarrError) as exc:
            raise StoreError(
                f"parameter store {self.path}: cannot read the tables of "
                f"{_VERSIONS}/{step}: {exc}"
            ) from exc
        return dict(sorted(out.items()))

    def table(
        self, name: str, array: str = "param", *, step: int | None = None
    ) -> zarr.Array:
        """A sharded table (or one of its optimizer state arrays) of a version
        as a read-only zarr array (default: the committed version)."""
        if step is None:
            if self._state.committed is None:
                raise StoreError(
                    f"parameter store {self.path} has no committed version"
                )
            step = self._state.committed
        layouts = self.table_layouts(step)
        if name not in layouts:
            raise KeyError(
                f"parameter store {self.path}, version {step}, has no table "
                f"{name!r} (tables: {sorted(layouts)})"
            )
        if array not in layouts[name].arrays:
            raise KeyError(
                f"table {name!r} has no array {array!r} "
                f"(arrays: {layouts[name].arrays})"
            )
        return open_table_array(self.ref, step, name, array)


@dataclass
class _Progress:
    """What a write was doing, for error messages."""

    target: str


def _run_io(
    make_coroutine: Callable[[], Coroutine[Any, Any, None]],
    *,
    shared_loop: bool = False,
) -> None:
    """Run zarr I/O on a private event loop in a private thread, to completion.

    When one write fails, zarr may still have sibling writes in flight (it
    gathers them).  ``asyncio.run`` cancels leftover tasks and waits for its
    executor's threads, so when this returns or raises no write of ours is
    still running: a failed version can then be removed for good.  The private
    thread also keeps this usable under a running event loop (Jupyter).

    With ``shared_loop`` (remote stores) the coroutine runs on zarr's own I/O
    loop instead, like zarr's synchronous API: fsspec caches asynchronous
    filesystems (and their HTTP sessions, bound to one event loop) per thread,
    so a fresh loop per call could meet a session of a closed loop.  There a
    failed version may receive a late write after it was removed; it is
    unlisted, ignored by readers and removed by :meth:`ParamStore.cleanup`.
    """
    if shared_loop:
        from zarr.core.sync import sync

        sync(make_coroutine())
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dasktrain-io") as pool:
        pool.submit(lambda: asyncio.run(make_coroutine())).result()


def _read_arrays(version: zarr.Group, name: str) -> dict[str, np.ndarray]:
    group = version[name]
    if not isinstance(group, zarr.Group):
        raise ValueError(f"{name!r} is not a group")
    return {key: np.asarray(array[...]) for key, array in sorted(group.arrays())}


def _load_state(location: _Location) -> _RootState:
    """Read and validate the root attributes of the store at ``location``."""
    # A remote store is judged by its root zarr.json first (one request);
    # the rest only explains why a store is not there.
    if not (location.remote and location.has(_ZARR_JSON)):
        kind = location.kind()
        if kind == "missing":
            raise StoreNotFoundError(
                f"no parameter store at {location} ({location.missing_reason()})"
            )
        if kind == "other":
            raise StoreError(
                f"{location} is not a parameter store: it is not a directory"
            )
        if not location.has(_ZARR_JSON):
            raise StoreError(
                f"{location} is not a parameter store: it is a directory without "
                f"{_ZARR_JSON} (not a zarr v3 group)"
            )
    try:
        root = zarr.open_group(
            store=location.zarr_store(read_only=True),
            mode="r",
            zarr_format=3,
            use_consolidated=False,
        )
    except ContainsArrayError:
        raise StoreError(
            f"{location} is not a parameter store: it is a zarr array, not a group"
        ) from None
    except (OSError, ValueError, TypeError, KeyError, BaseZarrError) as exc:
        raise StoreError(
            f"{location} is not a readable parameter store: its {_ZARR_JSON} "
            f"cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    return _parse_attrs(root.attrs.asdict(), str(location))
