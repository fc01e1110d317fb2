"""A bounded cache of decoded data chunks inside each worker process.

Decoding, not arithmetic, bounds training on compressed data, so each worker
keeps the chunks it owns decoded in memory, up to a budget that is a fraction
of the worker's memory limit.  Dask does not see this memory as managed (it
cannot spill it), so the budget is enforced here, and the cache never grows
the worker past it, so a fit never drives a worker into Dask's pause
threshold.

Admission and eviction: entries belong to a *group* (a dataset store).  A new
entry may evict least recently used entries of *other* groups, never of its
own: training scans a dataset cyclically, and with plain LRU a dataset larger
than the budget would evict every chunk just before it is needed again (a 0%
hit rate).  Instead the first chunks that fit stay cached and the rest stream,
so the hit rate is the fraction of the data that fits.  A chunk larger than
the whole budget is never cached.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import WorkerPlugin, get_worker
from distributed.system import MEMORY_LIMIT

from dasktrain.engine.budget import (
    CHUNK_CONSUMER,
    BudgetPlugin,
    MemoryBudget,
    budget_of,
    is_off_heap,
    off_heap_copy,
    worker_budget,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CACHE_FRACTION",
    "CachePlugin",
    "CacheStats",
    "ChunkCache",
    "worker_cache",
]

#: Cap on the decoded-chunk cache as a fraction of a worker's memory limit;
#: ``None``: the cache takes what the worker's memory budget has room for
#: (see :mod:`dasktrain.engine.budget`).
DEFAULT_CACHE_FRACTION: float | None = None
PLUGIN_NAME = "dasktrain-cache"


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    n_bytes: int
    budget_bytes: int
    n_entries: int

    def to_dict(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "n_bytes": self.n_bytes,
            "budget_bytes": self.budget_bytes,
            "n_entries": self.n_entries,
        }


class ChunkCache:
    """A thread-safe LRU of decoded chunks bounded by total bytes.

    Either a fixed ``budget_bytes``, or a share of a worker's
    :class:`~dasktrain.engine.budget.MemoryBudget` (``budget=``): then the
    cache may hold what the budget has room for besides its other consumers,
    it registers itself as the budget's ``"chunks"`` consumer (the budget
    evicts from it when the process nears its ceiling), and admitted chunks
    are copied into their own memory maps so that evicting one returns its
    memory to the system.

    ``hits`` and ``misses`` count the lookups (:meth:`get`) since the cache
    was made, that is for a worker's cache since its process started (the
    cache outlives new registrations of the plugin); the budget reports them
    (:attr:`~dasktrain.engine.budget.BudgetStats.reads_by`).
    """

    NAME = CHUNK_CONSUMER

    def __init__(
        self,
        budget_bytes: int | None = None,
        *,
        budget: MemoryBudget | None = None,
        cap_bytes: int | None = None,
    ) -> None:
        if (budget_bytes is None) == (budget is None):
            raise ValueError("give exactly one of budget_bytes and budget")
        self._fixed = None if budget_bytes is None else max(0, int(budget_bytes))
        self.budget = budget
        #: With a budget: at most this many bytes whatever the room.
        self.cap_bytes = cap_bytes
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._groups: dict[Hashable, Hashable] = {}
        self._n_bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        if budget is not None:
            budget.register(self.NAME, self)

    @property
    def budget_bytes(self) -> int:
        """Bytes the cache may hold now."""
        if self.budget is not None:
            room = self.budget.room_for(self.NAME)
            return room if self.cap_bytes is None else min(room, self.cap_bytes)
        assert self._fixed is not None
        return self._fixed

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        if self.budget is not None:
            raise AttributeError("a cache on a memory budget has no fixed size")
        self._fixed = max(0, int(value))

    @property
    def held_bytes(self) -> int:
        return self._n_bytes

    def __contains__(self, key: Hashable) -> bool:
        """Membership, without counting a hit or a miss or touching recency."""
        with self._lock:
            return key in self._data

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def would_admit(
        self, key: Hashable, n_bytes: int, *, group: Hashable = None
    ) -> bool:
        """Whether :meth:`put` of ``n_bytes`` under ``key`` would be admitted
        now (a value already held is replaced); what the reader asks before
        it decodes a chunk straight into memory the cache will keep.  Other
        threads may change the answer before the value is put."""
        budget_bytes = self.budget_bytes
        if n_bytes > budget_bytes:
            return False
        with self._lock:
            if key in self._data:
                return True
            return self._room(n_bytes, group, budget_bytes)

    def _room(self, n_bytes: int, group: Hashable, budget_bytes: int) -> bool:
        """Whether ``n_bytes`` fit once other groups' entries are evicted."""
        others = sum(s for k, s in self._sizes.items() if self._groups[k] != group)
        return self._n_bytes - others + n_bytes <= budget_bytes

    def put(
        self,
        key: Hashable,
        value: Any,
        n_bytes: int,
        *,
        group: Hashable = None,
        prepare: Callable[[Any], Any] | None = None,
    ) -> bool:
        """Insert; returns False if the value was not admitted (larger than the
        budget, or room would have to be taken from its own group).

        ``prepare(value)``, if given, makes the value that is stored (e.g. an
        off-heap copy); it is called only for a value that will be admitted.
        """
        budget_bytes = self.budget_bytes
        if n_bytes > budget_bytes:
            return False
        if prepare is not None:
            with self._lock:
                if key not in self._data and not self._room(
                    n_bytes, group, budget_bytes
                ):
                    return False
            value = prepare(value)  # outside the lock: a copy of a chunk
        with self._lock:
            if key in self._data:
                self._drop(key)
            if self._n_bytes + n_bytes > budget_bytes:
                # Free room from other groups, least recently used first.
                for old in [k for k in self._data if self._groups[k] != group]:
                    if self._n_bytes + n_bytes <= budget_bytes:
                        break
                    self._evict(old)
            if self._n_bytes + n_bytes > budget_bytes:
                return False
            self._data[key] = value
            self._sizes[key] = n_bytes
            self._groups[key] = group
            self._n_bytes += n_bytes
            return True

    def shrink_to(self, n_bytes: int) -> int:
        """Evict least recently used entries (any group) until at most
        ``n_bytes`` are held; returns the bytes freed."""
        freed = 0
        with self._lock:
            while self._data and self._n_bytes > n_bytes:
                key = next(iter(self._data))
                freed += self._sizes[key]
                self._evict(key)
        return freed

    def _evict(self, key: Hashable) -> None:
        size = self._sizes[key]
        self._drop(key)
        self.evictions += 1
        if self.budget is not None:
            self.budget.note_eviction(size)

    def _drop(self, key: Hashable) -> None:
        del self._data[key]
        self._n_bytes -= self._sizes.pop(key)
        del self._groups[key]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()
            self._groups.clear()
            self._n_bytes = 0

    def stats(self) -> CacheStats:
        budget_bytes = self.budget_bytes
        with self._lock:
            return CacheStats(
                self.hits,
                self.misses,
                self.evictions,
                self._n_bytes,
                budget_bytes,
                len(self._data),
            )


def budget_for(memory_limit: int | None, fraction: float) -> int:
    """``fraction`` of a worker's memory limit (``None``/0 = unlimited: then
    the machine's memory shared by its cores)."""
    if not memory_limit:
        import os

        memory_limit = MEMORY_LIMIT // max(1, os.cpu_count() or 1)
    return int(memory_limit * fraction)


#: One cache per worker (keyed by the worker object's id), shared by every
#: registration of the plugin: a second client registering it (another trainer,
#: a CLI run) must not empty the cache of a fit already running.
_WORKER_CACHES: dict[int, ChunkCache] = {}
_WORKER_CACHES_LOCK = threading.Lock()


class CachePlugin(WorkerPlugin):
    """Gives each worker its :class:`~dasktrain.engine.budget.MemoryBudget`
    (with the memory watcher) and a :class:`ChunkCache` drawing from it.

    ``fraction`` caps the cache at that fraction of the worker's memory limit
    (``None``: whatever the budget has room for).  Registering the plugin
    again (from any client) keeps the worker's cached chunks; only the cap
    follows the newest registration (shrinking it evicts on the next insert).
    """

    name = PLUGIN_NAME

    def __init__(self, fraction: float | None = DEFAULT_CACHE_FRACTION) -> None:
        if fraction is not None and not 0.0 <= fraction < 1.0:
            raise ValueError(f"cache fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction
        self.cache: ChunkCache | None = None
        self._watcher = BudgetPlugin()

    def setup(self, worker: Any) -> None:
        budget = budget_of(worker)
        if tune_malloc(budget.limits.limit):
            budget.heap_slack = malloc_keep_bytes(budget.limits.limit)
        self._watcher.setup(worker)
        cap = (
            None
            if self.fraction is None
            else budget_for(budget.limits.limit, self.fraction)
        )
        with _WORKER_CACHES_LOCK:
            cache = _WORKER_CACHES.get(id(worker))
            if cache is None:
                cache = _WORKER_CACHES[id(worker)] = ChunkCache(
                    budget=budget, cap_bytes=cap
                )
            else:
                cache.cap_bytes = cap
        self.cache = cache
        logger.debug(
            "worker %s: chunk cache of up to %s bytes under a ceiling of %d",
            worker.address,
            "the budget's" if cap is None else cap,
            budget.ceiling,
        )

    def teardown(self, worker: Any) -> None:
        # Replaced by a new registration: the cache stays with the worker.
        self._watcher.teardown(worker)
        self.cache = None


#: glibc ``mallopt`` parameters (malloc.h) and the values set on workers.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_REUSE_BYTES = 64 << 20
#: Free heap kept for reuse is at most the memory limit over this, and at
#: least :data:`MALLOC_KEEP_MIN_BYTES`.
MALLOC_KEEP_LIMIT_DIVISOR = 16
MALLOC_KEEP_MIN_BYTES = 8 << 20


def malloc_keep_bytes(memory_limit: int | None) -> int:
    """Free heap glibc keeps for reuse on a worker with this limit."""
    if not memory_limit:
        return MALLOC_REUSE_BYTES
    return max(
        MALLOC_KEEP_MIN_BYTES,
        min(MALLOC_REUSE_BYTES, memory_limit // MALLOC_KEEP_LIMIT_DIVISOR),
    )


def tune_malloc(memory_limit: int | None = None) -> bool:
    """Let this process reuse freed decode buffers (glibc only).

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also
    freezes glibc's mmap threshold at its 128 KiB default: every decoded
    chunk (tens of MB) is then a fresh ``mmap``, page-faulted in on first
    touch and unmapped on free (``benchmarks/epoch_throughput.py``: decoding
    is 2.8x slower in such a process).  Buffers below
    :data:`MALLOC_REUSE_BYTES` come from the heap instead, and up to that much
    free memory at its top is kept for reuse -- less on a worker whose
    ``memory_limit`` is small (``1/``:data:`MALLOC_KEEP_LIMIT_DIVISOR` of it),
    where retained free memory would eat the budget.  Returns whether the
    settings were applied.
    """
    keep = malloc_keep_bytes(memory_limit)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, MALLOC_REUSE_BYTES)
            and libc.mallopt(M_TRIM_THRESHOLD, keep)
        )
    except (OSError, AttributeError):
        return False


_FALLBACK: ChunkCache | None = None
_FALLBACK_LOCK = threading.Lock()


def worker_cache() -> ChunkCache:
    """The cache of the worker running the current task.

    Falls back to a per-process cache when no plugin is registered (e.g. a
    task run outside a worker in tests).
    """
    global _FALLBACK
    try:
        worker = get_worker()
    except ValueError:
        worker = None
    if worker is not None:
        plugin = worker.plugins.get(PLUGIN_NAME)
        if isinstance(plugin, CachePlugin) and plugin.cache is not None:
            return plugin.cache
    with _FALLBACK_LOCK:
        if _FALLBACK is None:
            budget = budget_of(worker) if worker is not None else worker_budget()
            _FALLBACK = ChunkCache(budget=budget)
        return _FALLBACK


def off_heap_chunk(value: Any) -> Any:
    """An off-heap copy of a decoded chunk (anything with ``arrays`` and
    ``valid``, as :class:`~dasktrain.engine.tasks.LoadedChunk`) for the cache;
    arrays already decoded into maps of their own are kept as they are."""
    import dataclasses

    arrays = {
        name: a if is_off_heap(a) else off_heap_copy(a)
        for name, a in value.arrays.items()
    }
    valid = value.valid
    if valid is not None and not is_off_heap(valid):
        valid = off_heap_copy(valid)
    return dataclasses.replace(value, arrays=arrays, valid=valid)


def array_nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in arrays.values())
