"""Table shards held by the ranks that serve them, bounded by the worker's budget.

In a segment of a model with sharded tables (see
:mod:`dasktrain.engine.table_rank`), every shard of every table has one
owner rank.  The owner answers the other ranks' row requests from its
shards and applies the optimizer to the rows their gradients touch.  Its
shards live in the worker's :class:`ShardCache`, one per worker process,
which draws from the worker's
:class:`~dasktrain.engine.budget.MemoryBudget` (consumer ``"shards"``):

* a shard is loaded from the store when first used and there is room: from
  the segment's *stage* (see below) if the segment wrote it there, else from
  the version the segment started from;
* a shard of a local store that does not fit is not loaded: its rows are
  read, and updated in place, in its file (the stage's copy once the segment
  changes it), row by row or the whole file at once when a step touches many
  of its rows.  On an object store, whose files cannot be updated in place,
  the least recently used shards are evicted instead (a changed one written
  to the stage first).  Either way nothing is lost and memory never grows
  with the table size or the id order;
* at the segment's end every changed shard in memory is written to the
  stage, which the client turns into the next committed version (unchanged
  shards are shared with the previous one).

The *stage* is an uncommitted version directory unique to one attempt of a
segment (:func:`stage_step`): an aborted attempt's writes are never seen by
its rerun, nor by any reader.

Each cached shard carries a *label*: the fit that loaded it and the version
its values belong to.  At a segment's end every shard a rank holds is
labelled with the segment's stage; the next segment, whose start version is
the one that stage became, keeps shards labelled with that stage or with its
start version, and drops all others (those of an aborted attempt, of another
fit).  So a worker reads each shard from the store once per fit as long as
its budget holds the tables.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dasktrain.engine.budget import MemoryBudget, worker_budget
from dasktrain.errors import DivergenceError
from dasktrain.optim.base import Optimizer
from dasktrain.params.tables import (
    PARAM,
    ParamStoreRef,
    TableLayout,
    chunk_key,
    read_shard,
    write_shard,
)

__all__ = [
    "STAGE_BASE",
    "ShardCache",
    "ShardServer",
    "ShardTraffic",
    "is_stage",
    "stage_step",
    "update_rows",
    "worker_shard_cache",
]

#: Stage versions are numbered from here (no run has this many steps).
STAGE_BASE = 10**12
#: Attempts of one segment that get distinct stage numbers.
STAGE_ATTEMPTS = 1000


def stage_step(stop_step: int, attempt: int) -> int:
    """The stage version of attempt ``attempt`` of a segment planned to end
    at run step ``stop_step``."""
    return STAGE_BASE + int(stop_step) * STAGE_ATTEMPTS + int(attempt)


def is_stage(step: int) -> bool:
    return int(step) >= STAGE_BASE


def update_rows(
    layout: TableLayout,
    arrays: Mapping[str, np.ndarray],
    local: np.ndarray,
    grad: np.ndarray,
    optimizer: Optimizer,
    global_state: Mapping[str, np.ndarray],
    *,
    shard: int | np.ndarray,
) -> None:
    """Apply the optimizer to rows ``local`` (positions within the shard) of
    one shard's ``arrays`` (the parameters and the optimizer's state, in
    their stored dtypes), in place.  ``grad``: the rows' gradient (float64).
    ``shard``: the shard, or each row's (rows of several shards gathered).

    Rows a step does not touch keep their values and state (lazy updates);
    the update is elementwise, so gathering rows changes no bit.  Raises
    :class:`DivergenceError` if the update is not finite (nothing is changed
    then)."""
    name = layout.name
    params = {name: arrays[PARAM][local].astype(np.float64)}
    state = {key: arrays[key][local].astype(np.float64) for key in layout.state}
    state.update(global_state)
    with np.errstate(over="ignore", invalid="ignore"):
        updates, new_state = optimizer.update({name: grad}, state, params)
        new_rows = params[name] + updates[name]
    finite = np.isfinite(new_rows).all(axis=tuple(range(1, new_rows.ndim)))
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        where = int(shard[bad]) if isinstance(shard, np.ndarray) else int(shard)
        raise DivergenceError(
            f"table {name!r}, shard {where}: the update made parameters non-finite; "
            "lower the learning rate"
        )
    arrays[PARAM][local] = new_rows
    for key in layout.state:
        arrays[key][local] = new_state[key]


#: A cached shard's label: the fit's token and a version (see the module docs).
Label = tuple[str, int]


@dataclass
class _Shard:
    arrays: dict[str, np.ndarray]
    label: Label
    nbytes: int
    dirty: bool = False


@dataclass
class ShardTraffic:
    """What a rank's shard server did (bytes and counts)."""

    bytes_read: int = 0
    bytes_written: int = 0
    shards_read: int = 0
    shards_written: int = 0
    evictions: int = 0
    hits: int = 0
    misses: int = 0
    rows_served: int = 0
    rows_updated: int = 0

    def add(self, other: ShardTraffic) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def to_dict(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in self.__dataclass_fields__}


class ShardCache:
    """The shards the ranks of one worker process hold (thread-safe).

    Bounded by the worker's memory budget (or a fixed ``cap_bytes``).  The
    budget may take memory back at any time (:meth:`shrink_to`): unchanged
    shards are dropped at once; changed ones stay until their owner writes
    them out at its next step (:meth:`ShardServer.make_room`).

    ``hits`` and ``misses`` count the ranks' lookups of shards they need
    (:meth:`lookup`) since the cache was made, that is for a worker's cache
    since its process started: a hit finds a valid copy in memory, a miss
    does not (the shard is loaded from the store, or its rows are used in
    its file).  The budget reports them
    (:attr:`~dasktrain.engine.budget.BudgetStats.reads_by`).
    """

    NAME = "shards"

    def __init__(
        self, budget: MemoryBudget | None = None, *, cap_bytes: int | None = None
    ) -> None:
        self.budget = budget
        self.cap_bytes = cap_bytes
        self.lock = threading.RLock()
        self._data: OrderedDict[tuple[Any, ...], _Shard] = OrderedDict()
        self._n_bytes = 0
        self.evictions = 0
        self.hits = 0
        self.misses = 0
        if budget is not None:
            budget.register(self.NAME, self)

    # -- budget consumer ---------
    @property
    def held_bytes(self) -> int:
        return self._n_bytes

    def shrink_to(self, n_bytes: int) -> int:
        """Drop unchanged shards, least recently used first, until at most
        ``n_bytes`` are held (changed ones are left to their owners)."""
        freed = 0
        with self.lock:
            for key in [k for k, s in self._data.items() if not s.dirty]:
                if self._n_bytes <= n_bytes:
                    break
                freed += self._pop(key).nbytes
        return freed

    @property
    def limit_bytes(self) -> int:
        """Bytes the cache may hold now."""
        room = self.budget.room_for(self.NAME) if self.budget is not None else None
        if room is None:
            return self.cap_bytes if self.cap_bytes is not None else 1 << 62
        return room if self.cap_bytes is None else min(room, self.cap_bytes)

    # -- entries ---------
    def get(self, key: tuple[Any, ...], labels: Collection[Label]) -> _Shard | None:
        with self.lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry.label not in labels:
                self._pop(key)
                return None
            self._data.move_to_end(key)
            return entry

    def lookup(self, key: tuple[Any, ...], labels: Collection[Label]) -> _Shard | None:
        """:meth:`get` for a rank that needs shard ``key``, counted as a hit
        or a miss (:meth:`get` alone counts nothing: a rank going over the
        shards it holds is not looking any up)."""
        with self.lock:
            entry = self.get(key, labels)
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
            return entry

    def put(self, key: tuple[Any, ...], entry: _Shard) -> None:
        with self.lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._n_bytes -= old.nbytes
            self._data[key] = entry
            self._n_bytes += entry.nbytes

    def keep(self, key: tuple[Any, ...], entry: _Shard) -> None:
        """Make sure ``entry`` (just changed by its owner) is held: the budget
        may have dropped it while it was clean."""
        with self.lock:
            if self._data.get(key) is not entry:
                self.put(key, entry)

    def pop(self, key: tuple[Any, ...]) -> _Shard | None:
        with self.lock:
            return self._pop(key) if key in self._data else None

    def pop_clean(self, key: tuple[Any, ...]) -> bool:
        """Drop ``key`` if it is held and unchanged; whether it was."""
        with self.lock:
            entry = self._data.get(key)
            if entry is None or entry.dirty:
                return False
            self._pop(key)
            return True

    def _pop(self, key: tuple[Any, ...]) -> _Shard:
        entry = self._data.pop(key)
        self._n_bytes -= entry.nbytes
        self.evictions += 1
        if self.budget is not None:
            self.budget.note_eviction(entry.nbytes)
        return entry

    def keys_of(self, prefix: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Keys starting with ``prefix``, least recently used first."""
        n = len(prefix)
        with self.lock:
            return [k for k in self._data if k[:n] == prefix]

    def drop_stale(self, prefix: tuple[Any, ...], labels: Collection[Label]) -> None:
        """Drop the entries under ``prefix`` whose label is not in ``labels``."""
        with self.lock:
            for key in self.keys_of(prefix):
                if self._data[key].label not in labels:
                    self._pop(key)

    def relabel(
        self,
        prefix: tuple[Any, ...],
        labels: Collection[Label],
        label: Label,
        select: Callable[[tuple[Any, ...]], bool] | None = None,
    ) -> None:
        """Give the entries under ``prefix`` labelled in ``labels`` (and, if
        given, for whose key ``select`` is true) ``label``."""
        with self.lock:
            for key in self.keys_of(prefix):
                if self._data[key].label in labels and (select is None or select(key)):
                    self._data[key].label = label

    def clear(self) -> None:
        with self.lock:
            self._data.clear()
            self._n_bytes = 0


_CACHES: dict[int, ShardCache] = {}
_CACHES_LOCK = threading.Lock()


def worker_shard_cache() -> ShardCache:
    """The shard cache of the worker running the current task (one per
    process outside a worker), on that worker's memory budget."""
    budget = worker_budget()
    with _CACHES_LOCK:
        cache = _CACHES.get(id(budget))
        if cache is None or cache.budget is not budget:
            cache = _CACHES[id(budget)] = ShardCache(budget)
        return cache


@dataclass
class ShardServer:
    """One rank's view of the shards it owns during one segment attempt.

    Parameters
    ----------
    cache:
        The worker's :class:`ShardCache`.
    store:
        The parameter store.
    layouts:
        The tables, by name.
    base_step:
        The version the segment starts from.
    stage:
        This attempt's stage version (prepared by the client).
    token:
        The fit's token: shards cached by another fit are never used.
    labels:
        Versions whose cached values equal ``base_step``'s (see the module
        docs).
    """

    cache: ShardCache
    store: ParamStoreRef
    layouts: Mapping[str, TableLayout]
    base_step: int
    stage: int
    token: str
    labels: frozenset[int]
    #: shards this attempt wrote to the stage, by table
    written: dict[str, set[int]] = field(default_factory=dict)
    traffic: ShardTraffic = field(default_factory=ShardTraffic)
    #: this rank's shards in the cache, with the step (:attr:`tick`) that last used each
    _mine: dict[tuple[Any, ...], int] = field(default_factory=dict)
    #: the rank's step count in this attempt (:meth:`next_step`)
    tick: int = 0

    def __post_init__(self) -> None:
        self.prefix = (self.store.url, self.store.options_id)
        self.root = self.store.local_root
        self.valid = {(self.token, v) for v in {*self.labels, self.stage}}
        self.staged = (self.token, self.stage)
        self.cache.drop_stale(self.prefix, self.valid)

    def key(self, table: str, shard: int) -> tuple[Any, ...]:
        return (*self.prefix, table, int(shard))

    # -- rows ---------
    def rows(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Values of sorted unique rows ``ids`` of ``table`` (all owned)."""
        layout = self.layouts[table]
        out = np.empty((ids.shape[0], layout.width), dtype=layout.dtype)
        for shard, a, b in _by_shard(layout, ids):
            start, _ = layout.bounds(shard)
            local = ids[a:b] - start
            entry = self._entry(table, shard)
            if entry is not None:
                out[a:b] = entry.arrays[PARAM][local]
            else:
                out[a:b] = self._cold_read(table, shard, local, [PARAM])[PARAM]
        self.traffic.rows_served += int(ids.shape[0])
        return out

    def update(
        self,
        table: str,
        ids: np.ndarray,
        grad: np.ndarray,
        optimizer: Optimizer,
        global_state: Mapping[str, np.ndarray],
    ) -> None:
        """Apply the optimizer to sorted unique rows ``ids`` of ``table``
        (gradient ``grad``, float64)."""
        layout = self.layouts[table]
        # The rows of every shard, gathered: one update for all of them.
        pieces = []
        for shard, a, b in _by_shard(layout, ids):
            start, _ = layout.bounds(shard)
            local = ids[a:b] - start
            entry = self._entry(table, shard)
            if entry is None:
                # A shard the budget has no room for: its rows are read and
                # written in place in the stage's file.
                rows = self._cold_read(table, shard, local, layout.arrays)
            else:
                rows = {name: entry.arrays[name][local] for name in layout.arrays}
            pieces.append((shard, a, b, local, entry, rows))
        if not pieces:
            return
        gathered = {
            name: np.concatenate([p[5][name] for p in pieces]) for name in layout.arrays
        }
        update_rows(
            layout,
            gathered,
            np.arange(ids.shape[0]),
            grad,
            optimizer,
            global_state,
            shard=layout.shard_of(ids),
        )
        for shard, a, b, local, entry, _ in pieces:
            new = {name: gathered[name][a:b] for name in layout.arrays}
            if entry is None:
                self._cold_write(table, shard, local, new)
                continue
            for name, values in new.items():
                entry.arrays[name][local] = values
            entry.dirty = True
            entry.label = self.staged
            self.cache.keep(self.key(table, shard), entry)
        self.traffic.rows_updated += int(ids.shape[0])

    # -- memory ---------
    def make_room(self, n_bytes: int) -> None:
        """Evict this rank's least recently used shards (writing
        changed ones to the stage) until ``n_bytes`` more fit the budget."""
        cache = self.cache
        limit = cache.limit_bytes
        if cache.held_bytes + n_bytes <= limit:
            return
        # Others' unchanged shards go first (free), then this rank's own.
        cache.shrink_to(max(0, limit - n_bytes))
        for key in cache.keys_of(self.prefix):
            if cache.held_bytes + n_bytes <= limit:
                break
            if key not in self._mine:
                continue
            self._evict(key)

    def _evict(self, key: tuple[Any, ...]) -> None:
        """Drop this rank's shard ``key`` from the cache, written to the stage
        first if changed."""
        entry = self.cache.pop(key)
        self._mine.pop(key, None)
        if entry is not None and entry.dirty:
            self._write(key[-2], key[-1], entry)
        self.traffic.evictions += 1

    def next_step(self) -> None:
        """The rank's step is over: the shards it used may now make room
        for the next step's (see :meth:`_evict_idle`)."""
        self.tick += 1

    def _evict_idle(self, n_bytes: int) -> None:
        """Evict, least recently used first, unchanged shards this rank did
        not load and this rank's shards not used in the current step (the
        changed ones written to the stage), until ``n_bytes`` more fit.
        Shards of the current step stay: with ids spread over the whole
        table, the step's shards would evict each other, so the ones that
        do not fit are used in their files instead."""
        cache = self.cache
        for key in cache.keys_of(self.prefix):
            if cache.held_bytes + n_bytes <= cache.limit_bytes:
                return
            used = self._mine.get(key)
            if used is None:
                cache.pop_clean(key)  # another rank's changed shard stays
                continue
            if used >= self.tick:
                continue
            self._evict(key)

    def flush(
        self, owns: Callable[[str, int], bool] | None = None
    ) -> dict[str, list[int]]:
        """Write every changed shard of this rank to the stage; returns the
        shards written in this attempt, by table.

        ``owns(table, shard)``: the shards this rank alone may change in the
        segment.  The valid cached shards it owns take the stage's label:
        their values are the stage's.  A cached shard owned by another rank
        keeps its label (that rank may have changed it: the copy here is then
        stale, and it is dropped when the next segment starts from the
        stage).  ``None``: this rank owns every shard."""
        for key in list(self._mine):
            entry = self.cache.get(key, self.valid)
            if entry is None:
                continue
            if entry.dirty:
                self._write(key[-2], key[-1], entry)
                entry.dirty = False
        select = None if owns is None else (lambda key: owns(key[-2], int(key[-1])))
        self.cache.relabel(self.prefix, self.valid, self.staged, select)
        return {t: sorted(s) for t, s in self.written.items()}

    def discard(self) -> None:
        """Drop the shards this attempt changed (an aborted segment)."""
        for key in list(self._mine):
            entry = self.cache.get(key, self.valid)
            if entry is not None and entry.label == self.staged:
                self.cache.pop(key)
        self._mine.clear()

    # -- internals ---------
    def _entry(self, table: str, shard: int) -> _Shard | None:
        """The cached shard, loaded if there is room; ``None``: a shard of a
        local store that does not fit, whose rows are used in its file."""
        key = self.key(table, shard)
        entry = self.cache.lookup(key, self.valid)
        if entry is not None:
            self.traffic.hits += 1
            self._mine[key] = self.tick
            return entry
        self.traffic.misses += 1
        layout = self.layouts[table]
        nbytes = layout.shard_nbytes
        if self.root is not None:
            if self.cache.held_bytes + nbytes > self.cache.limit_bytes:
                # Shards no earlier than this step make room; if that is
                # not enough (a step touches more than the cache holds),
                # this shard's rows are used in its file.
                self._evict_idle(nbytes)
            if self.cache.held_bytes + nbytes > self.cache.limit_bytes:
                return None
        else:
            # An object store: whole shards only (least recently used out).
            self.make_room(nbytes)
        from_stage = shard in self.written.get(table, ())
        step = self.stage if from_stage else self.base_step
        arrays = {
            a: np.require(
                read_shard(self.store, step, layout, a, shard), requirements="W"
            )
            for a in layout.arrays
        }
        got = sum(int(v.nbytes) for v in arrays.values())
        self.traffic.bytes_read += got
        self.traffic.shards_read += 1
        entry = _Shard(arrays, (self.token, step), got)
        self.cache.put(key, entry)
        self._mine[key] = self.tick
        return entry

    # -- rows in files (local stores) ---------
    def _path(self, step: int, table: str, array: str, shard: int) -> str:
        assert self.root is not None
        return os.path.join(self.root, chunk_key(step, table, array, shard))

    def _cold_read(
        self, table: str, shard: int, local: np.ndarray, arrays: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Rows ``local`` of a shard's ``arrays``, read from its file (the
        stage's if this attempt wrote it, else the start version's; the fill
        value where there is none)."""
        layout = self.layouts[table]
        step = self.stage if shard in self.written.get(table, ()) else self.base_step
        out = {}
        for a in arrays:
            dtype = np.dtype(layout.array_dtype(a))
            try:
                fd = os.open(self._path(step, table, a, shard), os.O_RDONLY)
            except FileNotFoundError:
                out[a] = np.full(
                    (local.shape[0], layout.width), layout.fill_value(a), dtype
                )
                continue
            try:
                out[a] = _read_rows(fd, local, layout.width, dtype, layout.shard_rows)
            finally:
                os.close(fd)
            self.traffic.bytes_read += int(out[a].nbytes)
        return out

    def _cold_write(
        self,
        table: str,
        shard: int,
        local: np.ndarray,
        values: Mapping[str, np.ndarray],
    ) -> None:
        """Write rows ``local`` of a shard into the stage's files (made from
        the start version's first)."""
        layout = self.layouts[table]
        done = self.written.setdefault(table, set())
        if shard not in done:
            for a in layout.arrays:
                src = self._path(self.base_step, table, a, shard)
                dst = self._path(self.stage, table, a, shard)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    shutil.copyfile(src, dst)
                except FileNotFoundError:
                    dtype = layout.array_dtype(a)
                    fill = np.full(
                        (layout.shard_rows, layout.width), layout.fill_value(a), dtype
                    )
                    fill.tofile(dst)
                self.traffic.bytes_written += (
                    layout.shard_rows
                    * layout.width
                    * np.dtype(layout.array_dtype(a)).itemsize
                )
            done.add(int(shard))
            self.traffic.shards_written += 1
        for a, v in values.items():
            fd = os.open(self._path(self.stage, table, a, shard), os.O_RDWR)
            try:
                _write_rows(
                    fd,
                    local,
                    np.ascontiguousarray(v, dtype=layout.array_dtype(a)),
                    layout.shard_rows,
                )
            finally:
                os.close(fd)
            self.traffic.bytes_written += int(v.nbytes)

    def _write(self, table: str, shard: int, entry: _Shard) -> None:
        layout = self.layouts[table]
        for a in layout.arrays:
            self.traffic.bytes_written += write_shard(
                self.store, self.stage, layout, a, shard, entry.arrays[a]
            )
        self.traffic.shards_written += 1
        self.written.setdefault(table, set()).add(int(shard))


def _by_shard(layout: TableLayout, ids: np.ndarray) -> Iterable[tuple[int, int, int]]:
    """``(shard, a, b)``: sorted ``ids[a:b]`` lie in ``shard``."""
    if ids.shape[0] == 0:
        return []
    shards = layout.shard_of(ids)
    cuts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1], True])
    return [(int(shards[a]), int(a), int(b)) for a, b in itertools.pairwise(cuts)]


#: A shard's rows are read or written one run of neighbouring rows at a
#: time, unless more than ``1 / WHOLE_SHARD_SHARE`` of them are: then its
#: whole file at once.
WHOLE_SHARD_SHARE = 32


def _runs(local: np.ndarray) -> list[tuple[int, int]]:
    """``(i, j)``: ``local[i:j]`` are consecutive row numbers."""
    breaks = np.flatnonzero(np.diff(local) != 1) + 1
    bounds = [0, *breaks.tolist(), int(local.shape[0])]
    return list(itertools.pairwise(bounds))


def _read_rows(
    fd: int, local: np.ndarray, width: int, dtype: np.dtype[Any], shard_rows: int
) -> np.ndarray:
    """Rows ``local`` (sorted, unique) of a shard file of ``shard_rows`` rows."""
    n = int(local.shape[0])
    out = np.empty((n, width), dtype)
    row_bytes = width * dtype.itemsize
    if n * WHOLE_SHARD_SHARE > shard_rows:
        whole = np.empty((shard_rows, width), dtype)
        got = os.preadv(fd, [whole.data.cast("B")], 0)
        if got != whole.nbytes:
            raise OSError(f"shard file is {got} bytes, expected {whole.nbytes}")
        out[:] = whole[local]
        return out
    for i, j in _runs(local):
        view = out[i:j].data.cast("B")
        got = os.preadv(fd, [view], int(local[i]) * row_bytes)
        if got != (j - i) * row_bytes:
            raise OSError(f"shard file ends before row {int(local[j - 1])}")
    return out


def _write_rows(
    fd: int, local: np.ndarray, values: np.ndarray, shard_rows: int
) -> None:
    """Write ``values`` into rows ``local`` of a shard file."""
    n = int(local.shape[0])
    row_bytes = values.shape[1] * values.dtype.itemsize
    if n * WHOLE_SHARD_SHARE > shard_rows:
        whole = np.empty((shard_rows, values.shape[1]), values.dtype)
        os.preadv(fd, [whole.data.cast("B")], 0)
        whole[local] = values
        os.pwrite(fd, whole.data.cast("B"), 0)
        return
    for i, j in _runs(local):
        os.pwrite(fd, values[i:j].data.cast("B"), int(local[i]) * row_bytes)
