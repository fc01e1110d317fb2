"""The write lock of a parameter store: one writer at a time.

A lock is a small JSON file, ``<store>/.dasktrain-lock``, created atomically
with ``os.open(O_CREAT | O_EXCL)``.  It records who holds the lock::

    {"host": "node-3", "pid": 4242, "owner": "trainer",
     "token": "9f1c...", "created": "2026-01-31T12:00:00+00:00"}

Stale locks
-----------
A lock is **stale**, and is taken over by the next writer (with a logged
warning), only when all of the following hold:

* its ``host`` is this host (``socket.gethostname()``), and
* no live process has its ``pid``: the pid does not exist, is a zombie, or
  belongs to a process started after the lock was created (the pid was
  reused).

A lock taken on **another host** is never broken automatically, because this
host cannot know whether its holder is still alive.  If that holder is known to
be gone (its machine crashed, its job was cancelled), remove the lock with
:func:`break_lock` (or ``ParamStore.break_lock(path)``).

Releasing a lock removes the file only if it still carries the holder's
``token``, so a holder whose lock was broken never removes its successor's.

Object stores
-------------
A store given by an fsspec URL keeps its lock as the object
``<store>/.dasktrain-lock`` (see :class:`ObjectLockFile`), with the same
contents and the same stale-lock rule.  How it is created depends on the
filesystem:

* **S3** (``s3fs``): one ``PutObject`` with ``If-None-Match: *``, a
  create-only write that the service refuses (HTTP 412) when the object
  exists; exactly one of several concurrent writers gets the lock.  AWS S3
  supports it since August 2024; an S3-compatible server that ignores the
  header degrades to "last writer wins", which the read-back below detects
  only for takeovers.
* **Any other fsspec filesystem**: best effort.  The writer checks that no
  lock object exists, writes its own (with its unique token), waits
  :data:`OBJECT_LOCK_SETTLE_SECONDS`, reads the object back and holds the
  lock only if it still carries its token.  Two writers whose check and write
  are more than that delay apart can both believe they hold the lock.

Taking over a stale lock and releasing a lock read the object, compare the
token and then delete it: two separate requests, so a lock broken and retaken
by someone else in between could be deleted.  After a takeover the new holder
waits :data:`OBJECT_LOCK_SETTLE_SECONDS` and reads its lock back, so of two
processes taking over the same stale lock at once at most one keeps it.  A
holder checks its token before every commit (:meth:`WriteLock.check`), so a
writer that lost its lock stops instead of committing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from dasktrain.data.io import remote_store_error
from dasktrain.errors import StoreError, StoreLockedError

__all__ = [
    "LOCK_FILENAME",
    "OBJECT_LOCK_SETTLE_SECONDS",
    "LockInfo",
    "ObjectLockFile",
    "WriteLock",
    "break_lock",
    "is_lock_leftover",
    "is_stale",
    "read_lock",
]

logger = logging.getLogger(__name__)

LOCK_FILENAME = ".dasktrain-lock"
"""Name of the lock file inside the store directory."""

_REMOVING_SUFFIX = ".removing"
_ACQUIRE_ATTEMPTS = 5
_READ_ATTEMPTS = 5
_READ_RETRY_SECONDS = 0.02
_PID_REUSE_SLACK_SECONDS = 2.0
_LOCK_FILE_MODE = 0o644
#: Filesystem classes whose ``pipe_file(..., mode="create")`` is a create-only
#: conditional write on the server (atomic); others get the best-effort scheme.
_CONDITIONAL_CREATE_FILESYSTEMS = frozenset({"S3FileSystem"})

OBJECT_LOCK_SETTLE_SECONDS = 0.5
"""Wait between writing a lock object and reading it back (best-effort
creation on object stores without create-only writes, and takeovers)."""


@dataclass(frozen=True)
class LockInfo:
    """Contents of a lock file: who holds the lock, and since when.

    Parameters
    ----------
    host : str
        Host name of the holder (``socket.gethostname()``).
    pid : int
        Process id of the holder on ``host``.
    owner : str
        Free text given by the holder (e.g. ``"trainer"``); may be empty.
    token : str
        Random token identifying this acquisition.
    created : str
        ISO 8601 time (UTC) at which the lock was taken.

    Examples
    --------
    >>> info = LockInfo(host="node-3", pid=4242, owner="trainer", token="abc",
    ...                 created="2026-01-31T12:00:00+00:00")
    >>> info.describe()
    "pid 4242 on host 'node-3' (owner 'trainer'), since 2026-01-31T12:00:00+00:00"
    >>> LockInfo.from_json(info.to_json()) == info
    True
    """

    host: str
    pid: int
    owner: str
    token: str
    created: str

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object written to the lock file."""
        return {
            "host": self.host,
            "pid": self.pid,
            "owner": self.owner,
            "token": self.token,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, obj: Any) -> LockInfo:
        """Parse a lock file's JSON object; ``ValueError`` if malformed."""
        if not isinstance(obj, dict):
            raise ValueError("lock file does not hold a JSON object")
        try:
            host, pid, owner = obj["host"], obj["pid"], obj["owner"]
            token, created = obj["token"], obj["created"]
        except KeyError as exc:
            raise ValueError(f"lock file lacks the field {exc.args[0]!r}") from None
        if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0):
            raise ValueError(f"lock file has an invalid pid {pid!r}")
        for name, value in (
            ("host", host),
            ("owner", owner),
            ("token", token),
            ("created", created),
        ):
            if not isinstance(value, str):
                raise ValueError(f"lock file field {name!r} is not a string")
        return cls(host=host, pid=pid, owner=owner, token=token, created=created)

    def describe(self) -> str:
        """One-line description of the holder, for messages."""
        owner = f" (owner {self.owner!r})" if self.owner else ""
        return f"pid {self.pid} on host {self.host!r}{owner}, since {self.created}"


def _this_host() -> str:
    return socket.gethostname()


def _created_timestamp(info: LockInfo) -> float | None:
    try:
        created = datetime.fromisoformat(info.created)
    except ValueError:
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return created.timestamp()


def _holder_alive(info: LockInfo) -> bool:
    """Whether the process ``info.pid`` on this host may still hold the lock."""
    if not psutil.pid_exists(info.pid):
        return False
    try:
        process = psutil.Process(info.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        started = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    created = _created_timestamp(info)
    if created is None:
        return True
    # A process started after the lock was taken cannot be its holder.
    return started <= created + _PID_REUSE_SLACK_SECONDS


def is_stale(info: LockInfo) -> bool:
    """Whether a lock may be taken over automatically.

    True only for a lock taken on this host by a process that no longer runs
    (see the module documentation).  A lock from another host is never stale.

    Examples
    --------
    >>> info = LockInfo(host="elsewhere.invalid", pid=1, owner="", token="t",
    ...                 created="2026-01-31T12:00:00+00:00")
    >>> is_stale(info)
    False
    """
    if info.host != _this_host():
        return False
    return not _holder_alive(info)


def is_lock_leftover(name: str) -> bool:
    """Whether a file name is a lock file being removed (left by a crash).

    Examples
    --------
    >>> is_lock_leftover(".dasktrain-lock.0123abcd.removing")
    True
    >>> is_lock_leftover(LOCK_FILENAME)
    False
    """
    return name.startswith(f"{LOCK_FILENAME}.") and name.endswith(_REMOVING_SUFFIX)


def _lock_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / LOCK_FILENAME


def _parse_lock_bytes(raw: bytes) -> LockInfo:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"lock file is not valid JSON ({exc})") from None
    return LockInfo.from_json(obj)


class _LocalLockFile:
    """The lock file of a store in a local directory (``O_EXCL`` creation)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def create(self, payload: bytes, *, label: str) -> bool:
        return WriteLock._try_create(self.path, payload, label=label)

    def read_bytes(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def remove_if_token(self, token: str | None) -> bool:
        return _remove_if_token(self.path, token)

    def settle(self) -> None:
        """Nothing to wait for: creation with ``O_EXCL`` is atomic."""


class ObjectLockFile:
    """The lock object of a store on an fsspec filesystem (an object store).

    See the module documentation for how it is created on S3 (a create-only
    conditional ``PutObject``) and elsewhere (best effort).

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
        Filesystem of the store.
    fs_path : str
        Path of the lock object within ``fs``.
    url : str
        URL of the lock object, for messages.

    Examples
    --------
    >>> import fsspec
    >>> fs = fsspec.filesystem("memory")
    >>> lock_file = ObjectLockFile(fs, "/doc/run.zarr/.dasktrain-lock",
    ...                            "memory://doc/run.zarr/.dasktrain-lock")
    >>> with WriteLock.acquire(lock_file, owner="example") as lock:
    ...     read_lock(lock_file).owner
    'example'
    >>> read_lock(lock_file) is None
    True
    """

    def __init__(self, fs: Any, fs_path: str, url: str) -> None:
        self.fs = fs
        self.fs_path = fs_path
        self.url = url

    @property
    def path(self) -> str:
        """URL of the lock object."""
        return self.url

    def __str__(self) -> str:
        return self.url

    @property
    def atomic(self) -> bool:
        """Whether creation is a create-only conditional write on the server."""
        return type(self.fs).__name__ in _CONDITIONAL_CREATE_FILESYSTEMS

    def _error(self, exc: Exception, action: str) -> StoreError:
        return remote_store_error(self.url, exc, action=action, what="lock object")

    def create(self, payload: bytes, *, label: str) -> bool:
        """Create the lock object with ``payload``; ``False`` if it exists."""
        try:
            if self.atomic:
                self.fs.pipe_file(self.fs_path, payload, mode="create")
                return True
            if self.read_bytes() is not None:
                return False
            self.fs.pipe_file(self.fs_path, payload)
        except FileExistsError:
            return False
        except StoreError:
            raise
        except Exception as exc:
            raise self._error(exc, "create") from exc
        self.settle()
        return self.read_bytes() == payload

    def read_bytes(self) -> bytes | None:
        """The lock object's bytes, or ``None`` if there is none."""
        try:
            self.fs.invalidate_cache(self.fs_path)
            raw: bytes = self.fs.cat_file(self.fs_path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error(exc, "read") from exc
        return raw

    def remove_if_token(self, token: str | None) -> bool:
        """Delete the lock object if it carries ``token`` (any if ``None``)."""
        raw = self.read_bytes()
        if raw is None:
            return False
        if token is not None:
            try:
                if _parse_lock_bytes(raw).token != token:
                    return False
            except ValueError:
                return False
        try:
            self.fs.rm_file(self.fs_path)
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._error(exc, "delete") from exc
        return True

    def settle(self) -> None:
        """Give concurrent writes of the lock object time to land."""
        time.sleep(OBJECT_LOCK_SETTLE_SECONDS)


_LockTarget = str | os.PathLike[str] | ObjectLockFile
_LockFile = _LocalLockFile | ObjectLockFile


def _lock_file(target: _LockTarget) -> _LockFile:
    if isinstance(target, ObjectLockFile):
        return target
    return _LocalLockFile(_lock_path(target))


def _read_lock_file(lock_file: Path | _LockFile) -> LockInfo | None:
    """Read a lock file; ``None`` if absent, ``ValueError`` if unreadable.

    A lock file is created empty and then written, so a reader may briefly see
    it empty or incomplete: such reads are retried a few times.
    """
    if isinstance(lock_file, Path):
        lock_file = _LocalLockFile(lock_file)
    problem = ""
    for attempt in range(_READ_ATTEMPTS):
        raw = lock_file.read_bytes()
        if raw is None:
            return None
        try:
            return _parse_lock_bytes(raw)
        except ValueError as exc:
            problem = str(exc)
        if attempt + 1 < _READ_ATTEMPTS:
            time.sleep(_READ_RETRY_SECONDS)
    raise ValueError(problem)


def read_lock(directory: _LockTarget) -> LockInfo | None:
    """Return the lock held on a store directory (or an :class:`ObjectLockFile`),
    or ``None`` if unlocked.

    Raises
    ------
    StoreError
        If the lock file exists but cannot be parsed.

    Examples
    --------
    >>> import tempfile
    >>> read_lock(tempfile.mkdtemp()) is None
    True
    """
    lock_file = _lock_file(directory)
    try:
        return _read_lock_file(lock_file)
    except ValueError as exc:
        raise StoreError(f"lock file {lock_file} is unreadable: {exc}") from None


def _remove_if_token(path: Path, token: str | None) -> bool:
    """Remove the lock file if it carries ``token`` (any token if ``None``).

    The file is first renamed to a unique name, so that it disappears from
    ``path`` atomically; if it turns out to be another holder's lock (it was
    replaced between our read and the rename), it is put back.
    """
    removing = path.with_name(f"{path.name}.{uuid.uuid4().hex}{_REMOVING_SUFFIX}")
    try:
        os.rename(path, removing)
    except FileNotFoundError:
        return False
    try:
        moved: LockInfo | None = _parse_lock_bytes(removing.read_bytes())
    except (OSError, ValueError):
        moved = None
    if token is not None and (moved is None or moved.token != token):
        try:
            os.link(removing, path)
        except FileExistsError:
            logger.warning(
                "lock file %s was replaced while it was being removed; "
                "the holder it belonged to will find its lock lost",
                path,
            )
        except OSError as exc:
            logger.warning("could not restore lock file %s: %s", path, exc)
        with contextlib.suppress(FileNotFoundError):
            removing.unlink()
        return False
    with contextlib.suppress(FileNotFoundError):
        removing.unlink()
    return True


def break_lock(directory: _LockTarget) -> LockInfo | None:
    """Remove a store's lock whoever holds it; return what it held.

    Use this only when the holder is known to be gone, typically a trainer that
    ran on another host which crashed: a live holder whose lock is broken will
    refuse to commit any further version (it checks its lock before each
    commit), so no data is corrupted, but its run stops.

    Returns
    -------
    LockInfo or None
        The lock that was removed (``None`` if there was none, or if its file
        was unreadable).

    Examples
    --------
    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> lock = WriteLock.acquire(directory, owner="crashed job")
    >>> break_lock(directory).owner
    'crashed job'
    >>> lock.held
    False
    """
    lock_file = _lock_file(directory)
    try:
        info = _read_lock_file(lock_file)
    except ValueError:
        info = None
    if lock_file.remove_if_token(None):
        logger.warning(
            "broke the write lock of %s held by %s",
            directory,
            info.describe() if info else "an unreadable lock file",
        )
        return info
    return None


def _locked_message(label: str, holder: LockInfo) -> str:
    if holder.host == _this_host():
        advice = (
            "That process is still running: wait for it to finish or stop it. "
            "The lock is taken over automatically once it has exited."
        )
    else:
        advice = (
            "The lock was taken on another host, so it is never broken "
            "automatically. If that process is gone, remove the lock with "
            f"dasktrain.params.ParamStore.break_lock({label!r})."
        )
    return (
        f"parameter store {label} is locked for writing by {holder.describe()}. "
        f"{advice}"
    )


class WriteLock:
    """An acquired write lock on a store directory.

    Obtain one with :meth:`acquire` (or ``ParamStore.lock()``).  It is a
    context manager that releases the lock on exit, and can also be released
    explicitly; releasing twice is harmless.  See the module documentation for
    the stale-lock rule.

    Examples
    --------
    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> with WriteLock.acquire(directory, owner="example") as lock:
    ...     lock.held
    True
    >>> lock.held
    False
    >>> lock.release()  # already released: nothing happens
    """

    def __init__(self, path: Path | _LockFile, info: LockInfo, *, label: str) -> None:
        self._file: _LockFile = _LocalLockFile(path) if isinstance(path, Path) else path
        self._path = self._file.path
        self._info = info
        self._label = label
        self._released = False

    @classmethod
    def acquire(
        cls,
        directory: _LockTarget,
        *,
        owner: str = "",
        label: str | None = None,
    ) -> WriteLock:
        """Take the write lock of ``directory``, or fail at once.

        Parameters
        ----------
        directory : str, path-like or ObjectLockFile
            Existing directory that holds the lock file (the store's root),
            or the lock object of a store on an object store.
        owner : str, default ""
            Free text recorded in the lock (shown to refused writers).
        label : str, optional
            How to name the store in messages (default: ``directory``).

        Raises
        ------
        StoreLockedError
            If a live writer (or one on another host) holds the lock, or the
            lock file is unreadable.
        StoreError
            If the lock file cannot be created (e.g. the directory is missing).
        """
        if not isinstance(owner, str):
            raise TypeError(f"owner must be a string, got {type(owner).__name__}")
        lock_file = _lock_file(directory)
        path = lock_file.path
        name = label if label is not None else str(directory)
        took_over = False
        for _ in range(_ACQUIRE_ATTEMPTS):
            info = LockInfo(
                host=_this_host(),
                pid=os.getpid(),
                owner=owner,
                token=uuid.uuid4().hex,
                created=datetime.now(UTC).isoformat(),
            )
            payload = json.dumps(info.to_json()).encode("utf-8")
            if lock_file.create(payload, label=name):
                if took_over:
                    # Another process may have taken over the same stale lock
                    # at the same moment: keep the lock only if it is ours.
                    lock_file.settle()
                    if lock_file.read_bytes() != payload:
                        continue
                logger.debug("took the write lock of %s", name)
                return cls(lock_file, info, label=name)
            try:
                holder = _read_lock_file(lock_file)
            except ValueError as exc:
                raise StoreLockedError(
                    f"parameter store {name} is locked for writing, but its lock "
                    f"file {path} is unreadable ({exc}). If no writer is running, "
                    "remove it with "
                    f"dasktrain.params.ParamStore.break_lock({name!r})."
                ) from None
            if holder is None:
                continue  # released meanwhile: try again
            if not is_stale(holder):
                raise StoreLockedError(_locked_message(name, holder))
            if lock_file.remove_if_token(holder.token):
                took_over = True
                logger.warning(
                    "took over the stale write lock of %s held by %s "
                    "(that process no longer runs)",
                    name,
                    holder.describe(),
                )
        raise StoreLockedError(
            f"parameter store {name}: could not take the write lock after "
            f"{_ACQUIRE_ATTEMPTS} attempts, other processes keep taking it"
        )

    @staticmethod
    def _try_create(path: Path, payload: bytes, *, label: str) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _LOCK_FILE_MODE)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StoreError(
                f"cannot create the lock file of parameter store {label}: {exc}"
            ) from exc
        try:
            written = os.write(fd, payload)
            if written != len(payload):
                raise OSError(f"short write to {path}")
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise StoreError(
                f"cannot write the lock file of parameter store {label}: {exc}"
            ) from exc
        os.close(fd)
        return True

    @property
    def info(self) -> LockInfo:
        """What this lock wrote to the lock file."""
        return self._info

    @property
    def path(self) -> Path | str:
        """Path of the lock file (URL of the lock object on an object store)."""
        return self._path

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    @property
    def held(self) -> bool:
        """Whether the lock file still carries this lock's token.

        Reads the lock file: ``False`` after :meth:`release`, or if the lock
        was broken by someone else.
        """
        if self._released:
            return False
        try:
            current = _read_lock_file(self._file)
        except ValueError:
            return False
        return current is not None and current.token == self._info.token

    def check(self) -> None:
        """Raise ``StoreLockedError`` unless this lock is still held."""
        if self._released:
            raise StoreLockedError(
                f"the write lock of parameter store {self._label} was released"
            )
        if not self.held:
            raise StoreLockedError(
                f"the write lock of parameter store {self._label} taken by "
                f"{self._info.describe()} was broken or taken over by another "
                "writer; this writer must stop"
            )

    def release(self) -> None:
        """Release the lock; harmless if already released.

        The lock file is removed only if it still carries this lock's token.
        """
        if self._released:
            return
        self._released = True
        if self._file.remove_if_token(self._info.token):
            logger.debug("released the write lock of %s", self._label)
        else:
            logger.warning(
                "the write lock of %s was no longer held by %s when released",
                self._label,
                self._info.describe(),
            )

    def __enter__(self) -> WriteLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "acquired"
        return f"WriteLock({self._label!r}, {state}, {self._info.describe()})"
