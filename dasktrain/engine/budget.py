"""One memory budget per worker process, shared by everything dasktrain keeps there.

A worker's memory limit is shared by the Python process itself (about 75 MiB
with dasktrain imported), the working set of the task that runs (decoded
chunks, reads ahead, step buffers), and what dasktrain *keeps* between tasks:
the decoded-chunk cache today, parameter-server shard caches and sharded dense
parameters as they are added.  Dask sees none of the kept memory as managed
(it cannot spill it), and it pauses a worker whose process memory passes
``distributed.worker.memory.pause`` of the limit.  So the budget is enforced
here, from the worker's side:

* :class:`MemoryLimits` reads the limit and Dask's thresholds (``target``,
  ``spill``, ``pause``, ``terminate``) and sets the **ceiling**: the process
  memory dasktrain keeps the worker under, a margin below the lowest of the
  spill and pause thresholds.
* :class:`MemoryBudget` gives consumers (:class:`BudgetConsumer`) room under
  the ceiling: ``capacity = ceiling - other``, where *other* is everything the
  process holds besides the kept bytes.  *other* starts as the RSS measured
  when the worker joined plus the plan's working set (:meth:`declare_working_set`)
  and is then learned from the process's measured RSS at run time (its peak
  minus the kept bytes at that moment), so unmanaged memory that the estimate
  missed (allocator slack, library buffers) shrinks the caches instead of
  pausing the worker.
* A watcher on the worker's event loop (:class:`BudgetPlugin`) samples RSS
  every ``dasktrain.memory.watch-interval``: when it passes the ceiling the
  consumers evict down to capacity and the allocator returns free pages; when
  the worker is paused anyway (memory outside dasktrain) the consumers drop
  everything at once, so the worker resumes as soon as its own memory allows.

Kept arrays are copied into their own anonymous memory maps
(:func:`off_heap_copy`): they never fragment the allocator's heap between
transient decode buffers, evicting one returns its pages to the system at
once, and the bytes the budget counts are the bytes the process holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import mmap
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import dask.config
import numpy as np
import psutil
from distributed import WorkerPlugin, get_worker
from distributed.system import MEMORY_LIMIT

from dasktrain.data.io import ZARR_READ_PEAK_FACTOR
from dasktrain.monitor.topics import MEMORY_TOPIC, address_order

logger = logging.getLogger(__name__)

__all__ = [
    "BUDGET_PLUGIN_NAME",
    "CHUNK_CONSUMER",
    "GONE_STATUS",
    "MEMORY_TOPIC",
    "NO_ANSWER_STATUS",
    "READ_PEAK_FACTOR",
    "SHARD_CONSUMER",
    "BudgetConsumer",
    "BudgetPlugin",
    "BudgetStats",
    "MemoryBudget",
    "MemoryLimits",
    "MemoryPlan",
    "address_order",
    "is_off_heap",
    "memory_rows",
    "off_heap_copy",
    "off_heap_empty",
    "process_rss",
    "reads_since",
    "refuse_unfit_plan",
    "release_free_memory",
    "worker_budget",
    "worker_memory_report",
    "worst_worker",
]

BUDGET_PLUGIN_NAME = "dasktrain-memory"
# MEMORY_TOPIC (the scheduler's event log topic that gets one per-worker
# memory table per epoch end, see memory_rows) and address_order come from
# dasktrain.monitor.topics.
#: Names the consumers register under: the decoded-chunk cache
#: (:class:`~dasktrain.engine.cache.ChunkCache`) and the table shard cache.
CHUNK_CONSUMER = "chunks"
SHARD_CONSUMER = "shards"
#: Status, in a memory table, of a worker that was asked and did not answer
#: in time, and of one that answered last time and has left the cluster since.
NO_ANSWER_STATUS = "no answer"
GONE_STATUS = "gone"

#: Dask config keys (under ``dasktrain.memory``) and their defaults.
WATCH_INTERVAL_KEY = "dasktrain.memory.watch-interval"
DEFAULT_WATCH_INTERVAL_SECONDS = 0.1
MARGIN_KEY = "dasktrain.memory.margin"
#: Fraction of the limit kept free below the lowest spill/pause threshold.
DEFAULT_MARGIN = 0.05
#: Thresholds assumed when Dask's are disabled (``False``): keep the process
#: under this fraction of the limit anyway (the nanny restarts at 95%).
FALLBACK_CEILING_FRACTION = 0.75
#: Peak memory of reading one chunk, as a multiple of its decoded size, where
#: nothing better is known: zarr's decode, with the stored bytes, the decoded
#: buffer and the output alive together (see
#: :func:`dasktrain.data.io.read_peak_nbytes` for the lean local reads).
READ_PEAK_FACTOR = ZARR_READ_PEAK_FACTOR
#: Chunk-sized temporaries of a thread's compute (a batch gathered from its
#: chunk, products over it), counted in the working-set estimate.
COMPUTE_CHUNK_FACTOR = 1
#: Pages returned to the system at most this often while over the ceiling.
TRIM_MIN_INTERVAL_SECONDS = 0.5


def process_rss() -> int:
    """Resident set size of this process, in bytes."""
    return int(psutil.Process().memory_info().rss)


def release_free_memory() -> bool:
    """Ask glibc to return free heap pages to the system (``malloc_trim``).

    Returns whether it could be asked (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(ctypes.c_size_t(0))
        return True
    except (OSError, AttributeError):
        return False


#: Memory maps at least this large ask the kernel for transparent huge pages.
HUGE_PAGE_MIN_BYTES = 4 << 20


#: The maps :func:`anonymous_map` made and that are still alive: a file
#: mapping (``numpy.memmap`` of a user's file) is not one of them.
_ANONYMOUS_MAPS: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()


def anonymous_map(n_bytes: int) -> mmap.mmap:
    """A private anonymous memory map of ``n_bytes``.

    Large maps ask for transparent huge pages (``MADV_HUGEPAGE``, honoured
    where ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or
    ``madvise``): filling 25 MiB then takes about 13 page faults instead of
    6,400, and a chunk's copy into its map goes from 22 ms to 5.4 ms
    (measured on a 65,536 x 100 float32 chunk)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    buffer = mmap.mmap(-1, n_bytes, flags=flags) if flags else mmap.mmap(-1, n_bytes)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and n_bytes >= HUGE_PAGE_MIN_BYTES:
        # Without transparent huge pages here: ordinary pages.
        with contextlib.suppress(OSError):
            buffer.madvise(advice)
    _ANONYMOUS_MAPS.add(buffer)
    return buffer


def off_heap_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialized array in its own anonymous memory map
    (:func:`anonymous_map`): where a chunk that the cache will keep is
    decoded, so that it needs no copy into the cache afterwards."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    n_bytes = count * dtype.itemsize
    if n_bytes == 0:
        return np.empty(shape, dtype=dtype)
    buffer = anonymous_map(n_bytes)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


def is_off_heap(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is an anonymous map of its own
    (:func:`off_heap_empty`, :func:`off_heap_copy`) rather than the heap (or
    a mapped file, which the cache must copy).

    Examples
    --------
    >>> import numpy as np
    >>> is_off_heap(np.zeros(4)), is_off_heap(off_heap_copy(np.zeros(4)))
    (False, True)
    """
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap) and base in _ANONYMOUS_MAPS


def off_heap_copy(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` in its own anonymous memory map
    (:func:`anonymous_map`).

    The pages are returned to the system as soon as the copy is no longer
    referenced, whatever the heap around it looks like."""
    n_bytes = int(array.nbytes)
    if n_bytes == 0:
        return np.array(array, copy=True)
    buffer = anonymous_map(n_bytes)
    out = np.frombuffer(buffer, dtype=array.dtype, count=array.size)
    out = out.reshape(array.shape)
    np.copyto(out, array, casting="no")
    return out


def _fraction(key: str) -> float | None:
    value = dask.config.get(key, None)
    if value is None or value is False:
        return None
    return float(value)


@dataclass(frozen=True)
class MemoryLimits:
    """A worker's memory limit and Dask's thresholds on it (fractions)."""

    limit: int
    target: float | None
    spill: float | None
    pause: float | None
    terminate: float | None
    margin: float = DEFAULT_MARGIN
    #: True when the worker has no limit and a share of the machine is used.
    assumed: bool = False

    @classmethod
    def from_config(
        cls, limit: int | None, *, n_workers_on_host: int = 1
    ) -> MemoryLimits:
        """Thresholds from this process's Dask config.  A worker without a
        limit is given the machine's memory divided by ``n_workers_on_host``
        (its cores by default)."""
        assumed = not limit
        if not limit:
            limit = MEMORY_LIMIT // max(1, n_workers_on_host)
        margin = float(dask.config.get(MARGIN_KEY, DEFAULT_MARGIN))
        if not 0.0 <= margin < 0.5:
            raise ValueError(f"{MARGIN_KEY} must be in [0, 0.5), got {margin}")
        return cls(
            limit=int(limit),
            target=_fraction("distributed.worker.memory.target"),
            spill=_fraction("distributed.worker.memory.spill"),
            pause=_fraction("distributed.worker.memory.pause"),
            terminate=_fraction("distributed.worker.memory.terminate"),
            margin=margin,
            assumed=assumed,
        )

    @property
    def ceiling_fraction(self) -> float:
        """The fraction of the limit the process is kept under."""
        marks = [f for f in (self.spill, self.pause) if f]
        if not marks and self.terminate:
            marks = [min(self.terminate, FALLBACK_CEILING_FRACTION + self.margin)]
        lowest = min(marks) if marks else FALLBACK_CEILING_FRACTION + self.margin
        return max(0.0, lowest - self.margin)

    @property
    def ceiling(self) -> int:
        return int(self.limit * self.ceiling_fraction)

    @property
    def pause_bytes(self) -> int | None:
        return None if not self.pause else int(self.limit * self.pause)

    def smallest_limit_for(self, needed: int) -> int:
        """The smallest memory limit whose ceiling holds ``needed`` bytes."""
        fraction = self.ceiling_fraction
        return int(np.ceil(needed / fraction)) if fraction > 0 else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "target": self.target,
            "spill": self.spill,
            "pause": self.pause,
            "terminate": self.terminate,
            "ceiling": self.ceiling,
            "assumed": self.assumed,
        }


class BudgetConsumer(Protocol):
    """Something that keeps memory on a worker and can give it back."""

    @property
    def held_bytes(self) -> int:
        """Bytes it holds now."""
        ...

    def shrink_to(self, n_bytes: int) -> int:
        """Release held memory down to ``n_bytes``; returns the bytes freed."""
        ...


@dataclass(frozen=True)
class BudgetStats:
    """A snapshot of one worker's budget (all sizes in bytes)."""

    limit: int
    ceiling: int
    capacity: int
    held: int
    held_by: Mapping[str, int]
    rss: int
    peak_rss: int
    baseline_rss: int
    other: int
    working_set: int
    evictions: int
    evicted_bytes: int
    pauses: int
    trims: int
    #: Lookups of the consumers that count them (the chunk and shard
    #: caches), by consumer: ``{"hits": ..., "misses": ...}`` since the
    #: process started.
    reads_by: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "ceiling": self.ceiling,
            "capacity": self.capacity,
            "held": self.held,
            "held_by": dict(self.held_by),
            "rss": self.rss,
            "peak_rss": self.peak_rss,
            "baseline_rss": self.baseline_rss,
            "other": self.other,
            "working_set": self.working_set,
            "evictions": self.evictions,
            "evicted_bytes": self.evicted_bytes,
            "pauses": self.pauses,
            "trims": self.trims,
            "reads_by": {n: dict(r) for n, r in self.reads_by.items()},
        }


class MemoryBudget:
    """The memory dasktrain may keep in one worker process.

    Parameters
    ----------
    limits:
        The worker's limit and thresholds.
    baseline_rss:
        The process's RSS before dasktrain kept anything (measured when the
        budget is created if not given).

    Examples
    --------
    >>> budget = MemoryBudget(MemoryLimits(2**30, 0.6, 0.7, 0.8, 0.95),
    ...                       baseline_rss=100 * 2**20)
    >>> budget.ceiling // 2**20          # 5% below the spill threshold
    665
    >>> budget.declare_working_set(64 * 2**20)
    >>> budget.capacity // 2**20
    501
    """

    def __init__(
        self,
        limits: MemoryLimits,
        *,
        baseline_rss: int | None = None,
    ) -> None:
        self.limits = limits
        self.baseline_rss = process_rss() if baseline_rss is None else int(baseline_rss)
        self._working_set = 0
        self._other = self.baseline_rss
        self._consumers: dict[str, BudgetConsumer] = {}
        self._lock = threading.RLock()
        self._counter_lock = threading.Lock()
        self.evictions = 0
        self.evicted_bytes = 0
        self.pauses = 0
        self.trims = 0
        self.rss = self.baseline_rss
        self.peak_rss = self.baseline_rss
        self._last_trim = -np.inf
        self._paused = False
        self._read_ahead_off = False
        #: Free heap the allocator keeps for reuse (see ``tune_malloc``).
        self.heap_slack = 0

    # -- sizes -----------------------------------------------------------------
    @property
    def ceiling(self) -> int:
        return self.limits.ceiling

    @property
    def working_set(self) -> int:
        return self._working_set

    @property
    def other(self) -> int:
        """What the process holds besides the kept bytes (estimate or peak
        measured, whichever is larger)."""
        return max(self._other, self.baseline_rss + self.heap_slack + self._working_set)

    @property
    def capacity(self) -> int:
        """Bytes all consumers together may keep now."""
        return max(0, self.ceiling - self.other)

    @property
    def held(self) -> int:
        with self._lock:
            return sum(c.held_bytes for c in self._consumers.values())

    def room_for(self, name: str) -> int:
        """Bytes consumer ``name`` may hold in total, given the others."""
        with self._lock:
            others = sum(c.held_bytes for n, c in self._consumers.items() if n != name)
            return max(0, self.capacity - others)

    def declare_working_set(self, n_bytes: int) -> None:
        """The plan's per-process working set (chunks being decoded, reads
        ahead, step buffers): room kept free besides the baseline.  The
        largest declared since :meth:`reset_learned` counts."""
        with self._lock:
            grew = int(n_bytes) > self._working_set
            self._working_set = max(self._working_set, int(n_bytes))
        if grew:
            self.enforce()

    def fits_read_ahead(
        self,
        chunk_bytes: int,
        n_threads: int,
        *,
        held_per_thread: int = 0,
        read_bytes: int | None = None,
    ) -> bool:
        """Declare the working set of ``n_threads`` task threads that each
        hold ``held_per_thread`` decoded chunks (e.g. a rank's streams) and
        read one more, and say whether reading one chunk ahead per thread
        still leaves the process under its ceiling; if not, chunks are read
        one at a time.  ``read_bytes`` is the peak of one chunk's read
        (default :data:`READ_PEAK_FACTOR` times ``chunk_bytes``)."""
        threads = max(1, int(n_threads))
        if read_bytes is None:
            read_bytes = READ_PEAK_FACTOR * int(chunk_bytes)
        read = int(read_bytes)
        held = (int(held_per_thread) + COMPUTE_CHUNK_FACTOR) * int(chunk_bytes)
        one = threads * (held + read)
        ahead = self.baseline_rss + one + threads * read <= self.ceiling
        with self._lock:
            if ahead and self._other > self.ceiling:
                # Measured: reading ahead took the process over its ceiling.
                # Read one chunk at a time from now on, and learn again what
                # that costs.
                self._read_ahead_off = True
                self._other = self.baseline_rss
            ahead = ahead and not self._read_ahead_off
        self.declare_working_set(one + threads * read if ahead else one)
        return ahead

    def reset_learned(self) -> None:
        """Forget the measured peak of *other* memory and the declared working
        set (a new fit, another plan)."""
        with self._lock:
            self._other = self.baseline_rss
            self._working_set = 0
            self._read_ahead_off = False

    # -- consumers -------------------------------------------------------------
    def register(self, name: str, consumer: BudgetConsumer) -> None:
        with self._lock:
            self._consumers[name] = consumer

    def consumer(self, name: str) -> BudgetConsumer | None:
        with self._lock:
            return self._consumers.get(name)

    def note_eviction(self, n_bytes: int) -> None:
        # Its own lock: consumers call this while holding theirs, and
        # enforce() calls consumers while holding the budget's.
        with self._counter_lock:
            self.evictions += 1
            self.evicted_bytes += int(n_bytes)

    def enforce(self, capacity: int | None = None) -> int:
        """Shrink the consumers (largest first) until they fit ``capacity``
        (default: the current capacity).  Returns the bytes freed."""
        with self._lock:
            limit = self.capacity if capacity is None else max(0, capacity)
            held = {n: c.held_bytes for n, c in self._consumers.items()}
            excess = sum(held.values()) - limit
            freed = 0
            for name in sorted(held, key=lambda n: -held[n]):
                if excess <= 0:
                    break
                keep = max(0, held[name] - excess)
                got = self._consumers[name].shrink_to(keep)
                freed += got
                excess -= got
            return freed

    def drop_all(self) -> int:
        """Release everything the consumers keep (a paused worker)."""
        return self.enforce(0)

    # -- run time ----------------------------------------------------------------
    def observe(self, rss: int | None = None, *, paused: bool = False) -> None:
        """One sample of the process's memory: learn *other*, evict when over
        the ceiling, drop everything when the worker is paused."""
        rss = process_rss() if rss is None else int(rss)
        with self._lock:
            self.rss = rss
            self.peak_rss = max(self.peak_rss, rss)
            held = sum(c.held_bytes for c in self._consumers.values())
            self._other = max(self._other, rss - held)
        if paused:
            with self._lock:
                newly, self._paused = not self._paused, True
                if newly:
                    self.pauses += 1
            freed = self.drop_all()
            if newly or freed:
                self._trim(force=True)
                logger.warning(
                    "worker paused at %d MiB of %d MiB: dropped %d MiB kept by "
                    "dasktrain",
                    rss >> 20,
                    self.limits.limit >> 20,
                    freed >> 20,
                )
            return
        self._paused = False
        if rss > self.ceiling:
            self.enforce()
            self._trim()

    def _trim(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_trim >= TRIM_MIN_INTERVAL_SECONDS:
            self._last_trim = now
            if release_free_memory():
                with self._lock:
                    self.trims += 1

    def stats(self) -> BudgetStats:
        with self._lock:
            held_by = {n: c.held_bytes for n, c in self._consumers.items()}
            reads_by = {
                n: reads
                for n, c in self._consumers.items()
                if (reads := _reads_of(c)) is not None
            }
            return BudgetStats(
                limit=self.limits.limit,
                ceiling=self.ceiling,
                capacity=self.capacity,
                held=sum(held_by.values()),
                held_by=held_by,
                rss=self.rss,
                peak_rss=self.peak_rss,
                baseline_rss=self.baseline_rss,
                other=self.other,
                working_set=self._working_set,
                evictions=self.evictions,
                evicted_bytes=self.evicted_bytes,
                pauses=self.pauses,
                trims=self.trims,
                reads_by=reads_by,
            )


def _reads_of(consumer: BudgetConsumer) -> dict[str, int] | None:
    """The hit and miss counters of a consumer that keeps them (integer
    ``hits`` and ``misses`` attributes, as the chunk and shard caches);
    ``None`` for one that does not."""
    hits = getattr(consumer, "hits", None)
    misses = getattr(consumer, "misses", None)
    if isinstance(hits, int) and isinstance(misses, int):
        return {"hits": hits, "misses": misses}
    return None


#: One budget per worker (by the worker object's id), kept across plugin
#: registrations from several clients.
_BUDGETS: dict[int, MemoryBudget] = {}
_BUDGETS_LOCK = threading.Lock()
_FALLBACK: MemoryBudget | None = None


def _worker_limit(worker: Any) -> int | None:
    return getattr(getattr(worker, "memory_manager", None), "memory_limit", None)


def budget_of(worker: Any) -> MemoryBudget:
    """The budget of ``worker`` (created on first use)."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(id(worker))
        if budget is None:
            limits = MemoryLimits.from_config(_worker_limit(worker))
            budget = _BUDGETS[id(worker)] = MemoryBudget(limits)
        return budget


def worker_budget() -> MemoryBudget:
    """The budget of the worker running the current task (a per-process one
    outside a worker)."""
    global _FALLBACK
    try:
        worker = get_worker()
    except ValueError:
        worker = None
    if worker is not None:
        return budget_of(worker)
    with _BUDGETS_LOCK:
        if _FALLBACK is None:
            import os

            _FALLBACK = MemoryBudget(
                MemoryLimits.from_config(None, n_workers_on_host=os.cpu_count() or 1)
            )
        return _FALLBACK


class BudgetPlugin(WorkerPlugin):
    """Creates the worker's budget and watches its memory.

    Every ``dasktrain.memory.watch-interval`` seconds (on the worker's event
    loop) the process RSS is sampled: over the ceiling the consumers evict and
    free pages go back to the system; a paused worker has everything dasktrain
    keeps dropped at once.
    """

    name = BUDGET_PLUGIN_NAME

    def __init__(self) -> None:
        self._callback: Any = None

    def setup(self, worker: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        budget = budget_of(worker)
        interval = dask.config.get(WATCH_INTERVAL_KEY, DEFAULT_WATCH_INTERVAL_SECONDS)
        seconds = float(dask.utils.parse_timedelta(interval, default="s") or 0.0)
        if seconds <= 0:
            raise ValueError(f"{WATCH_INTERVAL_KEY} must be positive, got {interval!r}")
        old = worker.periodic_callbacks.pop(BUDGET_PLUGIN_NAME, None)
        if old is not None:
            old.stop()

        def watch() -> None:
            status = getattr(getattr(worker, "status", None), "name", "")
            try:
                budget.observe(paused=status == "paused")
            except Exception:  # a watcher must never take the worker down
                logger.exception("memory budget watcher failed")

        self._callback = PeriodicCallback(watch, seconds * 1000)
        worker.periodic_callbacks[BUDGET_PLUGIN_NAME] = self._callback
        self._callback.start()
        logger.debug(
            "worker %s: memory ceiling %d MiB of %d MiB",
            worker.address,
            budget.ceiling >> 20,
            budget.limits.limit >> 20,
        )

    def teardown(self, worker: Any) -> None:
        if self._callback is not None:
            self._callback.stop()
            if worker.periodic_callbacks.get(BUDGET_PLUGIN_NAME) is self._callback:
                del worker.periodic_callbacks[BUDGET_PLUGIN_NAME]
            self._callback = None


@dataclass(frozen=True)
class MemoryPlan:
    """What one task thread of a fit needs in memory at least, besides what
    the cache keeps (all sizes in bytes).

    ``chunk_bytes`` is one decoded chunk of the fields read; each thread reads
    one at a time (peak ``read_bytes``, by default :data:`READ_PEAK_FACTOR`
    times its size) and holds ``held_chunks`` more (a rank's streams);
    ``state_bytes`` are the dense parameters, gradients and optimizer state
    every rank holds.
    """

    chunk_bytes: int
    held_chunks: int = 0
    state_bytes: int = 0
    what: str = "this fit"
    read_bytes: int = 0

    @property
    def read_peak(self) -> int:
        return self.read_bytes or READ_PEAK_FACTOR * self.chunk_bytes

    def per_thread(self) -> int:
        return (
            self.read_peak
            + COMPUTE_CHUNK_FACTOR * self.chunk_bytes
            + self.held_chunks * self.chunk_bytes
            + self.state_bytes
        )

    def describe(self) -> str:
        factor = (self.read_peak + COMPUTE_CHUNK_FACTOR * self.chunk_bytes) / max(
            1, self.chunk_bytes
        )
        parts = [
            f"reading a chunk of {_mib(self.chunk_bytes)} decoded "
            f"({factor:.3g}x with its compute)"
        ]
        if self.held_chunks:
            parts.append(f"{self.held_chunks} chunk(s) held by streams")
        if self.state_bytes:
            parts.append(f"{_mib(self.state_bytes)} of parameters and state")
        return ", ".join(parts)


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def worker_memory_report(dask_worker: Any) -> dict[str, Any]:
    """The budget of ``dask_worker`` as plain data (run by ``Client.run``,
    which also reaches paused workers)."""
    budget = budget_of(dask_worker)
    budget.observe(paused=getattr(dask_worker.status, "name", "") == "paused")
    report = budget.stats().to_dict()
    report["limits"] = budget.limits.to_dict()
    report["nthreads"] = int(dask_worker.state.nthreads)
    report["status"] = getattr(dask_worker.status, "name", str(dask_worker.status))
    return report


def reads_since(
    hits: int, misses: int, start: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Hits and misses counted since ``start`` (the counters then).

    Without a start, or when a counter went back (a new process at the same
    address), the counters as they are.

    Examples
    --------
    >>> reads_since(30, 10, (20, 5))
    (10, 5)
    >>> reads_since(3, 1, (20, 5))      # restarted since: its own counts
    (3, 1)
    """
    if start is None:
        return int(hits), int(misses)
    hits0, misses0 = start
    if hits < hits0 or misses < misses0:
        return int(hits), int(misses)
    return int(hits - hits0), int(misses - misses0)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


#: A worker's counters when the fit started: ``(hits, misses)`` by consumer,
#: or, as before there were several, the chunk cache's ``(hits, misses)``.
ReadsStart = Mapping[str, tuple[int, int]] | tuple[int, int]


def _consumer_start(start: ReadsStart | None, consumer: str) -> tuple[int, int] | None:
    """``consumer``'s counters in a worker's ``start`` (``None``: none)."""
    if start is None:
        return None
    if isinstance(start, Mapping):
        got = start.get(consumer)
        return None if got is None else (int(got[0]), int(got[1]))
    return (int(start[0]), int(start[1])) if consumer == CHUNK_CONSUMER else None


def _reads_in_row(
    report: Mapping[str, Any], start: ReadsStart | None, consumer: str
) -> tuple[int, int]:
    """``consumer``'s hits and misses in ``report`` since ``start``
    (:func:`reads_since`); ``(0, 0)`` for a consumer that reports none."""
    reads = report.get("reads_by", {}).get(consumer)
    if reads is None:
        return 0, 0
    return reads_since(
        int(reads["hits"]), int(reads["misses"]), _consumer_start(start, consumer)
    )


def _worker_row(
    address: str, report: Mapping[str, Any], start: ReadsStart | None
) -> dict[str, Any]:
    """One worker's line of a memory table (flat, plain numbers)."""
    limit = int(report["limit"])
    held_by = report.get("held_by", {})
    hits, misses = _reads_in_row(report, start, CHUNK_CONSUMER)
    shard_hits, shard_misses = _reads_in_row(report, start, SHARD_CONSUMER)
    return {
        "worker": address,
        "status": str(report.get("status", "")),
        "limit_bytes": limit,
        "ceiling_bytes": int(report["ceiling"]),
        "capacity_bytes": int(report["capacity"]),
        "held_bytes": int(report["held"]),
        "chunks_bytes": int(held_by.get(CHUNK_CONSUMER, 0)),
        "shards_bytes": int(held_by.get(SHARD_CONSUMER, 0)),
        "baseline_rss_bytes": int(report["baseline_rss"]),
        "rss_bytes": int(report["rss"]),
        "rss_fraction": _ratio(int(report["rss"]), limit),
        "peak_rss_bytes": int(report["peak_rss"]),
        "peak_rss_fraction": _ratio(int(report["peak_rss"]), limit),
        "evictions": int(report["evictions"]),
        "evicted_bytes": int(report["evicted_bytes"]),
        "pauses": int(report["pauses"]),
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_rate": _ratio(hits, hits + misses),
        "shard_hits": shard_hits,
        "shard_misses": shard_misses,
        "shard_hit_rate": _ratio(shard_hits, shard_hits + shard_misses),
        "note": "",
    }


def memory_rows(
    reports: Mapping[str, Mapping[str, Any]],
    *,
    missing: Mapping[str, tuple[str, str]] | None = None,
    start: Mapping[str, ReadsStart] | None = None,
) -> list[dict[str, Any]]:
    """A table of the workers' budgets: one flat row per worker, sorted by
    address (:func:`address_order`).

    Parameters
    ----------
    reports:
        :func:`worker_memory_report` of each worker that answered.
    missing:
        Workers that did not answer: address -> (status, why), the status
        :data:`NO_ANSWER_STATUS` or :data:`GONE_STATUS`.  Their rows have
        ``worker``, ``status`` and ``note`` only.
    start:
        Each worker's counters when the fit started, ``(hits, misses)`` by
        consumer (``{"chunks": ..., "shards": ...}``; a bare ``(hits,
        misses)`` is the chunk cache's): ``cache_hits``, ``cache_misses`` and
        ``cache_hit_rate`` (chunk cache), ``shard_hits``, ``shard_misses``
        and ``shard_hit_rate`` (shard cache) count from there
        (:func:`reads_since`); a worker or consumer without a start counts
        from its process's start.

    Returns
    -------
    list of dict
        Sizes in bytes (``limit_bytes``, ``ceiling_bytes``,
        ``capacity_bytes``, ``held_bytes`` and by consumer ``chunks_bytes``
        and ``shards_bytes``, ``baseline_rss_bytes``, ``rss_bytes``,
        ``peak_rss_bytes``), ``rss_fraction`` and ``peak_rss_fraction`` of the
        limit, counters (``evictions``, ``evicted_bytes``, ``pauses``,
        ``cache_hits``, ``cache_misses``, ``shard_hits``, ``shard_misses``),
        ``cache_hit_rate`` and ``shard_hit_rate`` (NaN before any lookup, as
        in a fit without tables), ``status`` and ``note``.

    Examples
    --------
    >>> report = {"limit": 1000, "ceiling": 650, "capacity": 400, "held": 300,
    ...           "held_by": {"chunks": 300}, "baseline_rss": 100, "rss": 500,
    ...           "peak_rss": 600, "evictions": 2, "evicted_bytes": 90,
    ...           "pauses": 0, "status": "running",
    ...           "reads_by": {"chunks": {"hits": 9, "misses": 3}}}
    >>> rows = memory_rows({"tcp://w:2": report},
    ...                    missing={"tcp://w:1": ("no answer", "TimeoutError")})
    >>> [(r["worker"], r["status"]) for r in rows]
    [('tcp://w:1', 'no answer'), ('tcp://w:2', 'running')]
    >>> rows[1]["cache_hit_rate"], rows[1]["peak_rss_fraction"]
    (0.75, 0.6)
    >>> rows[1]["shard_hit_rate"]   # no shard lookups: a fit without tables
    nan
    """
    start = start or {}
    rows = [_worker_row(a, r, start.get(a)) for a, r in reports.items()]
    for address, (status, note) in (missing or {}).items():
        if address not in reports:
            rows.append({"worker": address, "status": status, "note": note})
    return sorted(rows, key=lambda r: address_order(str(r["worker"])))


def worst_worker(
    reports: Mapping[str, Mapping[str, Any]],
) -> tuple[str, float] | None:
    """The worker whose peak RSS is the largest fraction of its limit, and
    that fraction (``None`` without reports).

    Examples
    --------
    >>> worst_worker({"a": {"peak_rss": 5, "limit": 10},
    ...               "b": {"peak_rss": 7, "limit": 10}})
    ('b', 0.7)
    """
    fractions: Iterable[tuple[float, str]] = (
        (int(r["peak_rss"]) / max(1, int(r["limit"])), a) for a, r in reports.items()
    )
    best = max(fractions, default=None)
    return None if best is None else (best[1], best[0])


def refuse_unfit_plan(
    plan: MemoryPlan, reports: Mapping[str, Mapping[str, Any]]
) -> None:
    """Raise :class:`~dasktrain.errors.MemoryBudgetError` if ``plan`` cannot
    run on some worker without passing its pause threshold; log a warning if
    it leaves no room for the cache under the ceiling."""
    from dasktrain.errors import MemoryBudgetError

    for address, report in sorted(reports.items()):
        limits = report["limits"]
        limit = int(limits["limit"])
        need = int(report["baseline_rss"]) + int(report["nthreads"]) * plan.per_thread()
        pause = limits["pause"]
        hard = int(limit * pause) if pause else int(limit * (limits["terminate"] or 1))
        fraction = int(limits["ceiling"]) / limit if limit else 1.0
        smallest = int(np.ceil(need / fraction)) if fraction > 0 else need
        if need > hard:
            raise MemoryBudgetError(
                f"{plan.what} cannot fit in the memory of worker {address}: its "
                f"limit is {_mib(limit)} (Dask pauses it at {_mib(hard)}), the "
                f"process holds {_mib(report['baseline_rss'])} before training, "
                f"and each of its {report['nthreads']} thread(s) needs "
                f"{_mib(plan.per_thread())} ({plan.describe()}): "
                f"{_mib(need)} in all. Give workers at least {_mib(smallest)} "
                f"(--memory-limit), fewer threads per worker, or smaller chunks "
                f"(chunk_rows)"
            )
        if need > int(limits["ceiling"]):
            logger.warning(
                "%s leaves no room for a chunk cache on worker %s: it needs about "
                "%s of its %s limit (kept under %s); chunks stream from the store "
                "every pass. A limit of %s or more would let it cache.",
                plan.what,
                address,
                _mib(need),
                _mib(limit),
                _mib(int(limits["ceiling"])),
                _mib(smallest),
            )
