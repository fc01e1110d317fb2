"""Functions that run inside worker processes.

They live in the installed package so that any worker, including ones
started by ``dask worker`` on other machines, can import them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import dask.config
import numpy as np
from distributed import get_worker

from dasktrain._tree import global_norm
from dasktrain.data.io import (
    DatasetRef,
    EmptyArray,
    check_finite,
    read_chunk,
    read_peak_nbytes,
)
from dasktrain.engine.budget import off_heap_empty
from dasktrain.engine.cache import ChunkCache, off_heap_chunk, worker_cache
from dasktrain.engine.plan import Piece, row_permutation
from dasktrain.errors import LabelError
from dasktrain.models.base import Model
from dasktrain.optim.base import Optimizer, apply_updates, is_count
from dasktrain.partial import (
    Node,
    Partial,
    RowSparse,
    covering_nodes,
    reduce_node,
    weighted_mean,
    weighted_sum,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FAILED_LEAF_ATTRIBUTE",
    "LOCAL_GRAD_NORM_SUM",
    "LOCAL_OBJECTIVE_SUM",
    "LOCAL_STATE_PREFIX",
    "NONFINITE_POLICIES",
    "PREFETCH_CONFIG_KEY",
    "LoadedChunk",
    "PrefetchGauge",
    "TaskReport",
    "compute_leaves",
    "compute_leaves_many",
    "load_chunk",
    "local_average",
    "local_sgd_leaves",
    "local_sums",
    "predict_chunk",
    "prefetch_enabled",
    "prefetch_gauge",
]

NONFINITE_POLICIES = ("raise", "skip")
#: Attribute set on an exception raised for a leaf: the leaf's position.
FAILED_LEAF_ATTRIBUTE = "dasktrain_leaf"


@dataclass(frozen=True)
class LoadedChunk:
    """A decoded, validated chunk: arrays by field and, if rows with NaN/inf
    were dropped, the mask of rows kept."""

    arrays: Mapping[str, np.ndarray]
    valid: np.ndarray | None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.valid is None else int(self.valid.nbytes)
        return sum(int(a.nbytes) for a in self.arrays.values()) + extra


@dataclass(frozen=True)
class TaskReport:
    """What one task did, for throughput and cache metrics.

    ``cache_hits`` counts leaves whose chunk was already decoded in memory
    (the worker cache, or the previous leaf's chunk), ``cache_misses`` the
    chunks read from the store, and ``prefetched`` those of the misses that
    were read in the background while an earlier leaf was computed.
    """

    worker: str
    seconds: float
    n_rows: int
    cache_hits: int
    cache_misses: int
    prefetched: int = 0


def _finite_rows(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "fc":
        return np.ones(arr.shape[0], dtype=bool)
    ok = np.isfinite(arr)
    return ok.reshape(ok.shape[0], -1).all(axis=1) if ok.ndim > 1 else ok


def chunk_nbytes(ref: DatasetRef, fields: Sequence[str]) -> int:
    """Decoded bytes of one full chunk of ``fields``."""
    total = 0
    for name in fields:
        info = ref.field(name)
        total += (
            ref.chunk_rows
            * int(np.prod(info.shape, dtype=np.int64))
            * (np.dtype(info.dtype).itemsize)
        )
    return int(total)


def worker_threads() -> int:
    """Threads of the worker running this task (1 outside a worker)."""
    try:
        return int(get_worker().state.nthreads)
    except (ValueError, AttributeError):
        return 1


def _chunk_key(
    ref: DatasetRef, fields: Sequence[str], chunk_id: int, nonfinite: str
) -> tuple[Any, ...]:
    """Key of a decoded chunk in the worker cache."""
    return (ref.url, ref.cache_id, int(chunk_id), tuple(fields), nonfinite)


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}"
        )


def _read_checked(
    ref: DatasetRef,
    fields: Sequence[str],
    chunk_id: int,
    nonfinite: str,
    empty: EmptyArray | None = None,
) -> LoadedChunk:
    """Read, decode and check one chunk (no cache, no logging): safe to run
    in a background thread.  ``empty`` allocates the decoded arrays where
    dasktrain decodes them itself (:func:`~dasktrain.data.io.read_chunk`)."""
    arrays = {f: read_chunk(ref, f, chunk_id, empty=empty) for f in fields}
    valid: np.ndarray | None = None
    if nonfinite == "raise":
        for f, a in arrays.items():
            check_finite(a, ref, f, chunk_id)
    else:
        mask = np.ones(next(iter(arrays.values())).shape[0], dtype=bool)
        for a in arrays.values():
            mask &= _finite_rows(a)
        if not mask.all():
            valid = mask
    return LoadedChunk(arrays, valid)


def _kept_empty(
    ref: DatasetRef,
    fields: Sequence[str],
    chunk_id: int,
    nonfinite: str,
    cache: ChunkCache | None,
) -> EmptyArray | None:
    """Where to decode a chunk: straight into an anonymous map of its own
    when the cache (with a memory budget, which keeps chunks off the heap)
    has room for it now, so that keeping it costs no copy; else ``None``
    (the reused heap buffers)."""
    if cache is None or cache.budget is None:
        return None
    if not cache.would_admit(
        _chunk_key(ref, fields, chunk_id, nonfinite),
        chunk_nbytes(ref, fields),
        group=(ref.url, ref.uuid),
    ):
        return None
    return off_heap_empty


def _admit(
    ref: DatasetRef,
    fields: Sequence[str],
    chunk_id: int,
    nonfinite: str,
    loaded: LoadedChunk,
    cache: ChunkCache | None,
) -> None:
    """What follows a read on the task's own thread: report skipped rows and
    offer the chunk to the cache."""
    if loaded.valid is not None:
        start, _ = ref.chunk_bounds(chunk_id)
        logger.warning(
            "store %s chunk %d: skipping %d rows with NaN/inf (first: row %d)",
            ref.url,
            chunk_id,
            int((~loaded.valid).sum()),
            start + int(np.argmin(loaded.valid)),
        )
    if cache is not None:
        cache.put(
            _chunk_key(ref, fields, chunk_id, nonfinite),
            loaded,
            loaded.nbytes,
            group=(ref.url, ref.uuid),
            prepare=off_heap_chunk if cache.budget is not None else None,
        )


def load_chunk(
    ref: DatasetRef,
    fields: Sequence[str],
    chunk_id: int,
    *,
    nonfinite: str = "raise",
    cache: ChunkCache | None = None,
) -> tuple[LoadedChunk, bool]:
    """Decoded chunk from the worker cache, or read, checked and cached.

    Returns the chunk and whether it came from the cache.  NaN/inf raise
    :class:`~dasktrain.errors.NonFiniteDataError` naming store, array, chunk
    and row, unless ``nonfinite="skip"``, which drops those rows.
    """
    _check_policy(nonfinite)
    if cache is not None:
        hit = cache.get(_chunk_key(ref, fields, chunk_id, nonfinite))
        if hit is not None:
            return hit, True
    empty = _kept_empty(ref, fields, chunk_id, nonfinite, cache)
    loaded = _read_checked(ref, fields, chunk_id, nonfinite, empty)
    _admit(ref, fields, chunk_id, nonfinite, loaded, cache)
    return loaded, False


# -- reading the next chunk ahead -------------------------------------------------
#: Dask config key, read on the worker, that turns reading ahead on (default)
#: or off; see :func:`prefetch_enabled`.
PREFETCH_CONFIG_KEY = "dasktrain.prefetch"
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def prefetch_enabled() -> bool:
    """Whether leaf tasks read the next chunk while computing the current one.

    Read from the Dask config of the process running the task (the worker):
    ``dask.config.set({"dasktrain.prefetch": False})`` before the cluster
    starts (a ``LocalCluster`` passes its config to its workers), the
    environment variable ``DASK_DASKTRAIN__PREFETCH=False`` of the worker
    processes, or a Dask YAML file.  Unset means on.

    Examples
    --------
    >>> import dask
    >>> with dask.config.set({"dasktrain.prefetch": False}):
    ...     prefetch_enabled()
    False
    >>> prefetch_enabled()
    True
    """
    value = dask.config.get(PREFETCH_CONFIG_KEY, None)
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_WORDS
    return bool(value)


@dataclass(frozen=True)
class PrefetchGauge:
    """Chunks read ahead in this process and not yet handed to their leaf
    (``ahead``), and the most there ever were at once (``peak``)."""

    ahead: int
    peak: int


class _Gauge:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ahead = 0
        self.peak = 0

    def up(self) -> None:
        with self._lock:
            self.ahead += 1
            self.peak = max(self.peak, self.ahead)

    def down(self) -> None:
        with self._lock:
            self.ahead -= 1

    def read(self, reset: bool) -> PrefetchGauge:
        with self._lock:
            out = PrefetchGauge(self.ahead, self.peak)
            if reset:
                self.peak = self.ahead
            return out


_GAUGE = _Gauge()


def prefetch_gauge(*, reset: bool = False) -> PrefetchGauge:
    """The read-ahead gauge of this process (a worker: ``client.run``).

    With ``reset=True`` the peak restarts from the current count.  Each
    thread that runs tasks reads at most one chunk ahead, so the peak never
    exceeds the worker's thread count.

    Examples
    --------
    >>> prefetch_gauge().ahead
    0
    """
    return _GAUGE.read(reset)


_READERS = threading.local()


def _reader() -> ThreadPoolExecutor:
    """The background reader of the calling thread: one thread, started on
    first use and reused by every later task that thread runs.  It goes away
    with the calling thread (the executor is then garbage; its thread exits).
    """
    executor: ThreadPoolExecutor | None = getattr(_READERS, "executor", None)
    if executor is None:
        executor = ThreadPoolExecutor(1, thread_name_prefix="dasktrain-prefetch")
        _READERS.executor = executor
    return executor


def _settle(future: Future[LoadedChunk]) -> None:
    """Drop a read ahead: cancel it if it has not started, else wait for it
    to finish (bounded: one chunk), so no read outlives its task; its result
    or error is discarded."""
    if not future.cancel():
        wait([future])
    _GAUGE.down()


class _ChunkStream:
    """The chunks of one task's leaves, loaded in leaf order, with the next
    chunk that is not in the worker cache read in a background thread while
    the current one is computed.

    Memory: one chunk is read ahead at most, and only after the previous one
    was handed to its leaf, so a task holds at most one decoded chunk more
    than without reading ahead (one per worker thread).  Consecutive leaves
    of one chunk share it (read once).

    A chunk read ahead takes exactly the steps of :func:`load_chunk`, in the
    same order on the task's thread: the cache lookup (a miss) when its leaf
    is reached, then the read's result (or error, raised there, for that
    leaf), then logging and admission to the cache.  Only when the read
    happened changes, so results are the same bits.
    """

    def __init__(
        self,
        ref: DatasetRef,
        fields: Sequence[str],
        chunk_ids: Sequence[int],
        *,
        nonfinite: str,
        cache: ChunkCache | None,
        prefetch: bool,
    ) -> None:
        self._ref = ref
        self._fields = tuple(fields)
        self._chunk_ids = [int(c) for c in chunk_ids]
        self._nonfinite = nonfinite
        self._cache = cache
        if prefetch and cache is not None and cache.budget is not None:
            # Read ahead only where the budget has room for a second read.
            prefetch = cache.budget.fits_read_ahead(
                chunk_nbytes(ref, fields),
                worker_threads(),
                read_bytes=read_peak_nbytes(ref, fields),
            )
        self._prefetch = prefetch
        # _following[i]: the first chunk after position i that differs from
        # chunk_ids[i] (None at the end).
        self._following: list[int | None] = [None] * len(self._chunk_ids)
        following: int | None = None
        for i in range(len(self._chunk_ids) - 1, -1, -1):
            self._following[i] = following
            if i and self._chunk_ids[i - 1] != self._chunk_ids[i]:
                following = self._chunk_ids[i]
        self._position = 0
        self._held: tuple[int, LoadedChunk] | None = None
        self._ahead: tuple[int, Future[LoadedChunk]] | None = None
        self.hits = self.misses = self.prefetched = 0

    def load(self) -> tuple[LoadedChunk, bool]:
        """The next leaf's chunk, and whether it was already decoded (cache
        hit, or the previous leaf's chunk)."""
        _check_policy(self._nonfinite)
        position = self._position
        chunk_id = self._chunk_ids[position]
        self._position += 1
        if self._held is not None and self._held[0] == chunk_id:
            loaded, was_hit = self._held[1], True
        else:
            self._held = None  # let the previous chunk go before the next read
            loaded, was_hit = self._fetch(chunk_id)
            self._held = (chunk_id, loaded)
        self.hits += was_hit
        self.misses += not was_hit
        if self._prefetch:
            self._read_ahead(self._following[position])
        return loaded, was_hit

    def _fetch(self, chunk_id: int) -> tuple[LoadedChunk, bool]:
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != chunk_id:
            if ahead is not None:
                _settle(ahead[1])
            return load_chunk(
                self._ref,
                self._fields,
                chunk_id,
                nonfinite=self._nonfinite,
                cache=self._cache,
            )
        future = ahead[1]
        try:
            if self._cache is not None:
                hit = self._cache.get(
                    _chunk_key(self._ref, self._fields, chunk_id, self._nonfinite)
                )
                if hit is not None:  # another task of this worker cached it
                    return hit, True
            # Wait for the background read; its error is raised here.
            loaded = future.result()
            self.prefetched += 1
        finally:
            _settle(future)
        _admit(self._ref, self._fields, chunk_id, self._nonfinite, loaded, self._cache)
        return loaded, False

    def _read_ahead(self, chunk_id: int | None) -> None:
        if chunk_id is None or self._ahead is not None:
            return  # nothing follows, or it is being read already
        key = _chunk_key(self._ref, self._fields, chunk_id, self._nonfinite)
        if self._cache is not None and key in self._cache:
            return
        empty = _kept_empty(
            self._ref, self._fields, chunk_id, self._nonfinite, self._cache
        )
        _GAUGE.up()
        try:
            future = _reader().submit(
                _read_checked, self._ref, self._fields, chunk_id, self._nonfinite, empty
            )
        except BaseException:
            _GAUGE.down()
            raise
        self._ahead = (chunk_id, future)

    def close(self) -> None:
        """Drop a read ahead that no leaf will take (the task failed)."""
        ahead, self._ahead = self._ahead, None
        self._held = None
        if ahead is not None:
            _settle(ahead[1])


def _batch(
    loaded: LoadedChunk, piece: Piece, order: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The rows of ``piece``; ``order``, if given, is the chunk's
    :func:`row_permutation` for ``piece.shuffle`` (computed once by callers
    that take many pieces of one chunk)."""
    n = next(iter(loaded.arrays.values())).shape[0]
    if (
        piece.shuffle is None
        and piece.start == 0
        and piece.stop == n
        and loaded.valid is None
    ):
        return dict(loaded.arrays)
    if piece.shuffle is not None:
        if order is None:
            order = row_permutation(*piece.shuffle, piece.chunk_id, n)
        idx = order[piece.start : piece.stop]
    else:
        idx = np.arange(piece.start, piece.stop)
    if loaded.valid is not None:
        idx = idx[loaded.valid[idx]]
    if piece.shuffle is None and loaded.valid is None:
        return {f: a[piece.start : piece.stop] for f, a in loaded.arrays.items()}
    return {f: a[idx] for f, a in loaded.arrays.items()}


def _check_labels(
    model: Model, ref: DatasetRef, chunk_id: int, loaded: LoadedChunk
) -> None:
    """Raise :class:`LabelError` naming the first row of the chunk whose label
    does not fit ``model``.

    The whole chunk (less skipped rows) is checked, not the step's rows: a
    minibatch is a shuffled slice, whose positions are not chunk rows.
    """
    y = loaded.arrays.get("y")
    if y is None:
        return
    kept: np.ndarray | None = None
    if loaded.valid is not None:
        kept = np.flatnonzero(loaded.valid)
        y = y[kept]
    problem = model.check_labels(y)
    if problem is not None:
        row, message = problem
        if kept is not None:
            row = int(kept[row])
        start, _ = ref.chunk_bounds(chunk_id)
        raise LabelError(
            f"store {ref.url!r}, array 'y', chunk {chunk_id}: "
            f"row {start + row}: {message}"
        )


def worker_address() -> str:
    """Address of the worker running this task ("local" outside a worker)."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except ValueError:
        return "local"


def leaf_partials(
    ref: DatasetRef,
    fields: Sequence[str],
    leaves: Sequence[tuple[int, Piece]],
    n_leaves: int,
    compute: Callable[[Piece, LoadedChunk, bool], Partial],
    *,
    nonfinite: str = "raise",
    prefetch: bool | None = None,
) -> tuple[dict[Node, Partial], TaskReport]:
    """The skeleton of a leaf task: for each leaf, its chunk (from the worker
    cache, or read and checked) and ``compute(piece, chunk, was_cached)``;
    then the largest subtrees of the reduction tree this task holds
    completely, pre-reduced.  An error is tagged with its leaf: the engine
    reports the failure of the first leaf in tree order, whichever task
    failed first.

    While a leaf is computed, the next leaf's chunk, if it is another chunk
    and not in the worker cache, is read in a background thread (one chunk
    ahead at most; see :class:`_ChunkStream`).  ``prefetch=None`` follows
    :func:`prefetch_enabled`.  Results, errors and the leaf they are
    reported for are the same either way.
    """
    t0 = time.perf_counter()
    stream = _ChunkStream(
        ref,
        fields,
        [piece.chunk_id for _, piece in leaves],
        nonfinite=nonfinite,
        cache=worker_cache(),
        prefetch=prefetch_enabled() if prefetch is None else prefetch,
    )
    n_rows = 0
    known: dict[Node, Partial] = {}
    try:
        for leaf, piece in leaves:
            try:
                loaded, was_hit = stream.load()
                part = compute(piece, loaded, was_hit)
            except Exception as exc:
                setattr(exc, FAILED_LEAF_ATTRIBUTE, leaf)
                raise
            # Only the stream keeps the chunk (for a next leaf on it), so the
            # next read ahead does not add a third chunk in memory.
            del loaded
            known[(0, leaf)] = part
            n_rows += part.n_rows
    finally:
        stream.close()
    nodes = covering_nodes([leaf for leaf, _ in leaves], n_leaves)
    # Partials of a diverging run may hold inf: checked by the trainer.
    with np.errstate(over="ignore", invalid="ignore"):
        out = {node: reduce_node(node, n_leaves, known) for node in nodes}
    report = TaskReport(
        worker_address(),
        time.perf_counter() - t0,
        n_rows,
        stream.hits,
        stream.misses,
        stream.prefetched,
    )
    return out, report


def compute_leaves(
    ref: DatasetRef,
    model: Model,
    params: Mapping[str, np.ndarray],
    leaves: Sequence[tuple[int, Piece]],
    n_leaves: int,
    *,
    with_grads: bool = True,
    nonfinite: str = "raise",
) -> tuple[dict[Node, Partial], TaskReport]:
    """Partials of the given leaves of the reduction tree, pre-reduced into the
    largest subtrees this task holds completely."""
    cast: dict[str, np.ndarray] = {}

    def compute(piece: Piece, loaded: LoadedChunk, was_hit: bool) -> Partial:
        _check_labels(model, ref, piece.chunk_id, loaded)
        batch = _batch(loaded, piece)
        if not cast:
            dtype = batch["X"].dtype if "X" in batch else np.dtype(np.float64)
            cast.update({k: np.asarray(v, dtype=dtype) for k, v in params.items()})
        if with_grads:
            return model.loss_and_grad(cast, batch)
        return model.loss(cast, batch)

    return leaf_partials(
        ref, model.fields, leaves, n_leaves, compute, nonfinite=nonfinite
    )


#: Separator of the candidate index in a packed multi-candidate partial:
#: ``"<i>|<name>"`` (parameter names never contain ``|``).
CANDIDATE_SEP = "|"
#: Metric key of a candidate's loss sum in a packed partial.
CANDIDATE_LOSS = "loss_sum"


def pack_candidates(parts: Sequence[Partial]) -> Partial:
    """Several candidates' partials of one leaf as one :class:`Partial`, whose
    gradients and metrics are keyed ``"<i>|<name>"``: the fixed tree sums
    each entry exactly as it would sum that candidate alone."""
    grads: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for i, part in enumerate(parts):
        grads.update({f"{i}{CANDIDATE_SEP}{k}": g for k, g in part.grads.items()})
        metrics.update({f"{i}{CANDIDATE_SEP}{k}": v for k, v in part.metrics.items()})
        metrics[f"{i}{CANDIDATE_SEP}{CANDIDATE_LOSS}"] = part.loss_sum
    return Partial(0.0, grads, parts[0].n_rows, metrics)


def unpack_candidates(packed: Partial, n_candidates: int) -> list[Partial]:
    """Inverse of :func:`pack_candidates` (on a reduced partial)."""
    grads: list[dict[str, Any]] = [{} for _ in range(n_candidates)]
    metrics: list[dict[str, float]] = [{} for _ in range(n_candidates)]
    for key, g in packed.grads.items():
        i, name = key.split(CANDIDATE_SEP, 1)
        grads[int(i)][name] = g
    for key, v in packed.metrics.items():
        i, name = key.split(CANDIDATE_SEP, 1)
        metrics[int(i)][name] = v
    return [
        Partial(m.pop(CANDIDATE_LOSS), g, packed.n_rows, m)
        for g, m in zip(grads, metrics, strict=True)
    ]


def compute_leaves_many(
    ref: DatasetRef,
    model: Model,
    params_list: Sequence[Mapping[str, np.ndarray]],
    leaves: Sequence[tuple[int, Piece]],
    n_leaves: int,
    *,
    nonfinite: str = "raise",
) -> tuple[dict[Node, Partial], TaskReport]:
    """:func:`compute_leaves` (with gradients) at several parameter sets: each
    chunk is read once and :meth:`Model.loss_and_grad_many` evaluates every
    set on it; the partials are packed (:func:`pack_candidates`)."""
    cast: list[dict[str, np.ndarray]] = []

    def compute(piece: Piece, loaded: LoadedChunk, was_hit: bool) -> Partial:
        _check_labels(model, ref, piece.chunk_id, loaded)
        batch = _batch(loaded, piece)
        if not cast:
            dtype = batch["X"].dtype if "X" in batch else np.dtype(np.float64)
            cast.extend(
                {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
                for params in params_list
            )
        return pack_candidates(model.loss_and_grad_many(cast, batch))

    return leaf_partials(
        ref, model.fields, leaves, n_leaves, compute, nonfinite=nonfinite
    )


def predict_chunk(
    ref: DatasetRef,
    model: Model,
    params: Mapping[str, np.ndarray],
    chunk_id: int,
    kind: str,
) -> np.ndarray:
    """Predictions for one chunk of a stored dataset (``kind``: "predict",
    "predict_proba" or "decision_function")."""
    loaded, _ = load_chunk(ref, ("X",), chunk_id, cache=worker_cache())
    X = loaded.arrays["X"]
    fn: Any = getattr(model, kind)
    return np.asarray(fn({k: np.asarray(v) for k, v in params.items()}, X))


# -- local SGD ------------------------------------------------------------------
#: Prefix of the optimizer state entries in a local-SGD leaf's sums (state
#: keys and parameter names never contain ``/``, so the two cannot collide).
LOCAL_STATE_PREFIX = "opt_state/"
#: Metrics of a local-SGD leaf: sums over its local steps of ``rows * value``
#: of the objective (data loss plus penalty) and of its gradient's norm, both
#: at the parameters before each step.
LOCAL_OBJECTIVE_SUM = "local_objective_sum"
LOCAL_GRAD_NORM_SUM = "local_grad_norm_sum"


def local_sums(
    params: Mapping[str, np.ndarray],
    opt_state: Mapping[str, np.ndarray],
    n_rows: int,
    *,
    loss_sum: float = 0.0,
    metrics: Mapping[str, float] | None = None,
) -> Partial:
    """A local-SGD leaf: its parameters and float optimizer state, weighted by
    the rows it trained on (step counters are left out: see
    :func:`dasktrain.optim.advance_counts`)."""
    values = dict(params)
    for k, v in opt_state.items():
        if not is_count(v):
            values[LOCAL_STATE_PREFIX + k] = v
    return weighted_sum(values, n_rows, loss_sum=loss_sum, metrics=metrics)


def local_average(
    partial: Partial,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(params, float optimizer state)``: the row-weighted means of the
    leaves summed by the tree (inverse of :func:`local_sums`)."""
    mean = weighted_mean(partial)
    params = {k: v for k, v in mean.items() if not k.startswith(LOCAL_STATE_PREFIX)}
    state = {
        k.removeprefix(LOCAL_STATE_PREFIX): v
        for k, v in mean.items()
        if k.startswith(LOCAL_STATE_PREFIX)
    }
    return params, state


def _dense(grad: np.ndarray | RowSparse) -> np.ndarray:
    if isinstance(grad, RowSparse):
        return grad.to_dense().astype(np.float64)
    return np.asarray(grad, dtype=np.float64)


def _local_leaf(
    ref: DatasetRef,
    model: Model,
    optimizer: Optimizer,
    params: Mapping[str, np.ndarray],
    opt_state: Mapping[str, np.ndarray],
    pieces: Sequence[Piece],
    chunks: _ChunkStream,
) -> tuple[Partial, int, int]:
    """Run one local minibatch step per piece, in order, from ``params``;
    returns the leaf's weighted sums, cache hits and misses.  ``chunks``
    yields the leaf's chunks in the order of their first piece."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    state = dict(opt_state)
    hits = misses = n_rows = 0
    loss_sum = objective_sum = grad_norm_sum = 0.0
    metrics: dict[str, float] = {}
    loaded_chunks: dict[int, LoadedChunk] = {}
    orders: dict[tuple[int, tuple[int, int]], np.ndarray] = {}
    for piece in pieces:
        loaded = loaded_chunks.get(piece.chunk_id)
        if loaded is None:
            loaded, was_hit = chunks.load()
            hits += was_hit
            misses += not was_hit
            _check_labels(model, ref, piece.chunk_id, loaded)
            loaded_chunks[piece.chunk_id] = loaded
        order = None
        if piece.shuffle is not None:
            # One permutation per chunk, not per minibatch (it costs as much
            # as a step).
            key = (piece.chunk_id, piece.shuffle)
            order = orders.get(key)
            if order is None:
                n_chunk = next(iter(loaded.arrays.values())).shape[0]
                order = row_permutation(*piece.shuffle, piece.chunk_id, n_chunk)
                orders[key] = order
        batch = _batch(loaded, piece, order)
        dtype = batch["X"].dtype if "X" in batch else np.dtype(np.float64)
        cast = {k: v.astype(dtype) for k, v in p.items()}
        part = model.loss_and_grad(cast, batch)
        n = part.n_rows
        if n == 0:
            continue  # every row of the minibatch was skipped (NaN/inf)
        penalty_grad = model.penalty_grad(p)
        grads = {k: _dense(g) / n + penalty_grad[k] for k, g in part.grads.items()}
        loss_sum += part.loss_sum
        objective_sum += part.loss_sum + n * model.penalty(p)
        grad_norm_sum += n * global_norm(grads)
        for k, v in part.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
        updates, state = optimizer.update(grads, state, p)
        p = apply_updates(p, updates)
        n_rows += n
    metrics[LOCAL_OBJECTIVE_SUM] = objective_sum
    metrics[LOCAL_GRAD_NORM_SUM] = grad_norm_sum
    return (
        local_sums(p, state, n_rows, loss_sum=loss_sum, metrics=metrics),
        hits,
        misses,
    )


def local_sgd_leaves(
    ref: DatasetRef,
    model: Model,
    optimizer: Optimizer,
    start: Mapping[str, Mapping[str, np.ndarray]],
    leaves: Sequence[tuple[int, Sequence[Piece]]],
    n_leaves: int,
    *,
    nonfinite: str = "raise",
    prefetch: bool | None = None,
) -> tuple[dict[Node, Partial], TaskReport]:
    """One round of local SGD for the given leaves of the reduction tree.

    Each leaf starts from ``start["params"]`` and ``start["opt_state"]``, runs
    one ``optimizer`` step per piece (a minibatch, in order) and yields
    :func:`local_sums` of its final parameters and state, with the data loss,
    objective and gradient norm seen during its steps.  Leaves are
    pre-reduced into the largest subtrees this task holds completely.  The
    next leaf's chunk is read ahead as in :func:`leaf_partials`.
    """
    t0 = time.perf_counter()
    # The chunks in the order _local_leaf loads them: each leaf's, by first
    # piece; the next one is read while a leaf trains (see leaf_partials).
    chunks = _ChunkStream(
        ref,
        model.fields,
        [c for _, pieces in leaves for c in dict.fromkeys(p.chunk_id for p in pieces)],
        nonfinite=nonfinite,
        cache=worker_cache(),
        prefetch=prefetch_enabled() if prefetch is None else prefetch,
    )
    hits = misses = n_rows = 0
    known: dict[Node, Partial] = {}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # A diverging run makes parameters non-finite: the client checks the
        # averaged values and raises DivergenceError.
        try:
            for leaf, pieces in leaves:
                try:
                    part, leaf_hits, leaf_misses = _local_leaf(
                        ref,
                        model,
                        optimizer,
                        start["params"],
                        start["opt_state"],
                        pieces,
                        chunks,
                    )
                except Exception as exc:
                    setattr(exc, FAILED_LEAF_ATTRIBUTE, leaf)
                    raise
                known[(0, leaf)] = part
                hits += leaf_hits
                misses += leaf_misses
                n_rows += part.n_rows
        finally:
            chunks.close()
        nodes = covering_nodes([leaf for leaf, _ in leaves], n_leaves)
        out = {node: reduce_node(node, n_leaves, known) for node in nodes}
    report = TaskReport(
        worker_address(),
        time.perf_counter() - t0,
        n_rows,
        hits,
        misses,
        chunks.prefetched,
    )
    return out, report
