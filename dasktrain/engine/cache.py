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
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import WorkerPlugin, get_worker
from distributed.system import MEMORY_LIMIT

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CACHE_FRACTION",
    "CachePlugin",
    "CacheStats",
    "ChunkCache",
    "worker_cache",
]

#: Fraction of a worker's memory limit used for decoded chunks.  Dask pauses a
#: worker at 80% of its limit and counts the cache as unmanaged memory; 35%
#: leaves room for the task's temporaries and Dask's own memory.
DEFAULT_CACHE_FRACTION = 0.35
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
    """A thread-safe LRU of numpy arrays bounded by total bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._groups: dict[Hashable, Hashable] = {}
        self._n_bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

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

    def put(
        self, key: Hashable, value: Any, n_bytes: int, *, group: Hashable = None
    ) -> bool:
        """Insert; returns False if the value was not admitted (larger than the
        budget, or room would have to be taken from its own group)."""
        if n_bytes > self.budget_bytes:
            return False
        with self._lock:
            if key in self._data:
                self._drop(key)
            if self._n_bytes + n_bytes > self.budget_bytes:
                # Free room from other groups, least recently used first.
                for old in [k for k in self._data if self._groups[k] != group]:
                    if self._n_bytes + n_bytes <= self.budget_bytes:
                        break
                    self._drop(old)
                    self.evictions += 1
            if self._n_bytes + n_bytes > self.budget_bytes:
                return False
            self._data[key] = value
            self._sizes[key] = n_bytes
            self._groups[key] = group
            self._n_bytes += n_bytes
            return True

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
        with self._lock:
            return CacheStats(
                self.hits,
                self.misses,
                self.evictions,
                self._n_bytes,
                self.budget_bytes,
                len(self._data),
            )


def budget_for(memory_limit: int | None, fraction: float) -> int:
    """Cache budget for a worker with this memory limit (``None``/0 = unlimited:
    then a fraction of the machine's memory shared by its cores)."""
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
    """Gives each worker a :class:`ChunkCache` sized from its memory limit.

    Registering the plugin again (from any client) keeps the worker's cached
    chunks; only the budget follows the newest registration (shrinking it
    evicts on the next insert).
    """

    name = PLUGIN_NAME

    def __init__(self, fraction: float = DEFAULT_CACHE_FRACTION) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"cache fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction
        self.cache: ChunkCache | None = None

    def setup(self, worker: Any) -> None:
        tune_malloc()
        limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
        budget = budget_for(limit, self.fraction)
        with _WORKER_CACHES_LOCK:
            cache = _WORKER_CACHES.get(id(worker))
            if cache is None:
                cache = _WORKER_CACHES[id(worker)] = ChunkCache(budget)
            else:
                cache.budget_bytes = budget
        self.cache = cache
        logger.debug("worker %s: chunk cache of %d bytes", worker.address, budget)

    def teardown(self, worker: Any) -> None:
        # Replaced by a new registration: the cache stays with the worker.
        self.cache = None


#: glibc ``mallopt`` parameters (malloc.h) and the values set on workers.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_REUSE_BYTES = 64 << 20


def tune_malloc() -> bool:
    """Let this process reuse freed decode buffers (glibc only).

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also
    freezes glibc's mmap threshold at its 128 KiB default: every decoded
    chunk (tens of MB) is then a fresh ``mmap``, page-faulted in on first
    touch and unmapped on free (``benchmarks/epoch_throughput.py``: decoding
    is 2.8x slower in such a process).  Buffers below
    :data:`MALLOC_REUSE_BYTES` come from the heap instead, and up to that much
    free memory at its top is kept for reuse.  Returns whether the settings
    were applied.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, MALLOC_REUSE_BYTES)
            and libc.mallopt(M_TRIM_THRESHOLD, MALLOC_REUSE_BYTES)
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
            limit = None
            if worker is not None:
                limit = getattr(worker.memory_manager, "memory_limit", None)
            _FALLBACK = ChunkCache(budget_for(limit, DEFAULT_CACHE_FRACTION))
        return _FALLBACK


def array_nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in arrays.values())
