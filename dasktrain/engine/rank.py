"""The ranks of a segment: long-running tasks that train without the scheduler.

A *segment* is the run of steps between two checkpoints.  The client plans
it (:class:`SegmentSpec`) and submits one task per worker thread, a *rank*;
then it stays out of the step loop.  Every step, each rank

1. computes the partials of the leaves of the reduction tree it holds (its
   streams' rows of the step, or its chunks' local-SGD rounds),
2. pre-reduces the largest subtrees it holds completely,
3. sends those nodes to every other rank and receives theirs, directly
   worker to worker (:mod:`dasktrain.engine.comm`),
4. completes the fixed tree (the same additions in the same order on every
   rank, whatever the number of ranks) and applies the optimizer update.

So every rank holds the same parameters after every step without any
broadcast, and the bits depend on the plan only: a rerun of a segment on
other workers, or on fewer, gives the same bits.

Rank 0 (the *leader*) reports the step rows to the client through the
scheduler's event log (batched), decides when the segment ends (its time
budget, a stop request from the client) and says so in its step message, so
every rank ends after the same step.  At the end the leader returns the
parameters and optimizer state, every rank a checksum of them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dasktrain._tree import global_norm
from dasktrain.data.io import DatasetRef, read_peak_nbytes
from dasktrain.engine.cache import ChunkCache, worker_cache
from dasktrain.engine.comm import (
    ChannelTimeouts,
    PeerLostError,
    RankChannel,
    SegmentAborted,
    rank_state,
)
from dasktrain.engine.plan import (
    Span,
    StreamWalk,
    Take,
    local_sgd_rounds,
    span_order,
    steps_per_epoch,
    stream_spans,
)
from dasktrain.engine.tasks import (
    _GAUGE,
    FAILED_LEAF_ATTRIBUTE,
    LOCAL_GRAD_NORM_SUM,
    LOCAL_OBJECTIVE_SUM,
    LoadedChunk,
    _admit,
    _check_labels,
    _ChunkStream,
    _local_leaf,
    _read_checked,
    _reader,
    _settle,
    chunk_nbytes,
    load_chunk,
    local_average,
    prefetch_enabled,
    worker_threads,
)
from dasktrain.models.base import Model
from dasktrain.monitor.topics import BATCH_KEY, EVENT_TOPIC, ROWS_TOPIC
from dasktrain.objective import NonFiniteStep, all_finite, step_objective
from dasktrain.optim.base import Optimizer, advance_counts, apply_updates, is_count
from dasktrain.partial import (
    Node,
    Partial,
    RowSparse,
    covering_nodes,
    reduce_node,
    tree_depth,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BATCH_KEY",
    "EVENT_TOPIC",
    "FAILED_STEP_ATTRIBUTE",
    "KINDS",
    "ROWS_TOPIC",
    "RankResult",
    "SegmentSpec",
    "run_rank",
    "state_checksum",
]

#: Segment kinds: synchronous minibatch steps over streams, local-SGD rounds.
KINDS = ("steps", "local")
#: Attribute set on an exception raised by a rank for a leaf: the step (in
#: the epoch) it failed in (with ``FAILED_LEAF_ATTRIBUTE``: the leaf).
FAILED_STEP_ATTRIBUTE = "dasktrain_step"
#: How often the leader sends the rows of finished steps to the client.
ROW_FLUSH_SECONDS = 0.25
# The topics of the scheduler's event log the rows go to (EVENT_TOPIC: the
# dashboard page's; ROWS_TOPIC: the client's) and BATCH_KEY come from
# dasktrain.monitor.topics.


@dataclass(frozen=True)
class SegmentSpec:
    """Everything a rank needs to run its part of a segment.

    ``leaves[r]`` is the range of leaves rank ``r`` holds: stream indices for
    ``kind="steps"``, positions in ``chunk_ids`` for ``kind="local"``.
    Steps ``first_step`` to ``stop_step - 1`` of epoch ``epoch`` (0-based) are
    run, unless the leader ends the segment earlier; ``run_step`` optimizer
    steps were done before the segment.
    """

    key: str
    store: str
    kind: str
    ref: DatasetRef
    model: Model
    optimizer: Optimizer
    chunk_ids: tuple[int, ...]
    chunk_rows: tuple[int, ...]
    addresses: tuple[str, ...]
    leaves: tuple[tuple[int, int], ...]
    seed: int
    epoch: int
    first_step: int
    stop_step: int
    run_step: int
    batch_rows: int
    n_streams: int = 1
    local_steps: int | None = None
    time_budget: float = math.inf
    nonfinite: str = "raise"
    timeouts: ChannelTimeouts = field(default_factory=ChannelTimeouts)
    #: the epoch's last step is not sent live (the client reports it after
    #: the epoch's validation and callbacks)
    hold_last: bool = True

    @property
    def n_ranks(self) -> int:
        return len(self.addresses)

    def rows_of(self) -> dict[int, int]:
        return dict(zip(self.chunk_ids, self.chunk_rows, strict=True))

    def epoch_steps(self) -> int:
        """Steps (or rounds) of the whole epoch."""
        if self.kind == "steps":
            return steps_per_epoch(sum(self.chunk_rows), self.batch_rows)
        return len(self.local_rounds())

    def local_rounds(self) -> list[list[tuple[Any, ...]]]:
        assert self.local_steps is not None
        rows = self.rows_of()
        return local_sgd_rounds(
            self.chunk_ids,
            rows.__getitem__,
            batch_rows=self.batch_rows,
            local_steps=self.local_steps,
            seed=self.seed,
            epoch=self.epoch,
        )


@dataclass
class RankResult:
    """What a rank returns.  Only the leader's has ``params``, ``opt_state``
    and ``rows``; every rank's has the checksum of its final state."""

    rank: int
    n_steps: int
    checksum: str
    params: dict[str, np.ndarray] | None = None
    opt_state: dict[str, np.ndarray] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: set if the segment ended because step ``n_steps + 1`` diverged
    diverged: str | None = None
    #: the exception of a leaf of this rank that failed in step
    #: ``n_steps + 1`` (the segment ended there on every rank)
    error: BaseException | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    prefetched: int = 0
    compute_seconds: float = 0.0
    wait_seconds: float = 0.0
    seconds: float = 0.0


def state_checksum(
    params: Mapping[str, np.ndarray], opt_state: Mapping[str, np.ndarray]
) -> str:
    """A digest of every byte of a training state (name order), to check that
    all ranks hold the same one."""
    h = hashlib.blake2b(digest_size=16)
    for prefix, tree in (("p/", params), ("o/", opt_state)):
        for k in sorted(tree):
            a = np.ascontiguousarray(tree[k])
            h.update(f"{prefix}{k}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


# -- tree nodes on the wire ---------------------------------------------------------
def _lossless32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 if that loses nothing (a leaf computed from float32
    data), else ``a``: half the bytes on the wire, the same bits."""
    if a.dtype == np.float64 and a.size:
        b = a.astype(np.float32)
        if np.array_equal(b, a):
            return b
    return a


def _encode(nodes: Mapping[Node, Partial]) -> list[list[Any]]:
    out = []
    for (level, index), p in nodes.items():
        grads: dict[str, Any] = {}
        for k, g in p.grads.items():
            if isinstance(g, RowSparse):
                # rows, values, shape: a table's gradient stays row-sparse
                grads[k] = [
                    np.asarray(g.rows, dtype=np.int64),
                    _lossless32(np.asarray(g.values)),
                    [int(n) for n in g.shape],
                ]
                continue
            grads[k] = _lossless32(np.asarray(g))
        out.append(
            [
                int(level),
                int(index),
                float(p.loss_sum),
                int(p.n_rows),
                {k: float(v) for k, v in p.metrics.items()},
                grads,
            ]
        )
    return out


def _decoded(grad: Any) -> np.ndarray | RowSparse:
    if isinstance(grad, (list, tuple)):
        rows, values, shape = grad
        return RowSparse(
            np.asarray(rows, dtype=np.int64),
            np.asarray(values, dtype=np.float64),
            tuple(int(n) for n in shape),
        )
    return np.asarray(grad, dtype=np.float64)


def _decode(nodes: Sequence[Sequence[Any]]) -> dict[Node, Partial]:
    out: dict[Node, Partial] = {}
    for level, index, loss_sum, n_rows, metrics, grads in nodes:
        out[(int(level), int(index))] = Partial(
            float(loss_sum),
            {k: _decoded(g) for k, g in grads.items()},
            int(n_rows),
            dict(metrics),
        )
    return out


# -- reading a stream's rows ----------------------------------------------------------
class _SpanReader:
    """The decoded chunks of one stream's spans, loaded in the order its walk
    visits them, with the next span's chunk read in the background (the
    rank's reader thread) while the current one is used.  Holds the spans a
    step takes (one, two when a step crosses into the next span) and one
    read ahead."""

    def __init__(
        self,
        walk: StreamWalk,
        spec: SegmentSpec,
        cache: ChunkCache | None,
        prefetch: bool,
    ) -> None:
        self.walk = walk
        self.spec = spec
        self.cache = cache
        self.prefetch = prefetch
        self.rows = spec.rows_of()
        self.fields = spec.model.fields
        self._index = {s: i for i, s in enumerate(walk.spans)}
        self._held: dict[Span, tuple[LoadedChunk, np.ndarray]] = {}
        self._ahead: tuple[int, Future[LoadedChunk]] | None = None
        self.hits = self.misses = self.prefetched = 0

    def batch(self, takes: Sequence[Take]) -> dict[str, np.ndarray]:
        """The rows of a step's takes, in order, as one batch."""
        parts: list[dict[str, np.ndarray]] = []
        keep = {t.span for t in takes}
        for span in [s for s in self._held if s not in keep]:
            del self._held[span]  # spans behind the walk
        for take in takes:
            loaded, order = self._span(take.span)
            idx = order[take.lo : take.hi]
            if loaded.valid is not None:
                idx = idx[loaded.valid[idx]]
            parts.append({f: loaded.arrays[f][idx] for f in self.fields})
        if len(parts) == 1:
            return parts[0]
        return {f: np.concatenate([p[f] for p in parts]) for f in self.fields}

    def _span(self, span: Span) -> tuple[LoadedChunk, np.ndarray]:
        held = self._held.get(span)
        if held is not None:
            return held
        same = next(
            (v for s, v in self._held.items() if s.chunk_id == span.chunk_id), None
        )
        if same is not None:
            loaded = same[0]
        else:
            loaded = self._fetch(span.chunk_id)
            _check_labels(self.spec.model, self.spec.ref, span.chunk_id, loaded)
        n_chunk = self.rows[span.chunk_id]
        order = span_order(span, n_chunk, self.spec.seed, self.spec.epoch)
        self._held[span] = (loaded, order)
        if self.prefetch:
            i = self._index[span] + 1
            if i < len(self.walk.spans):
                self._read_ahead(self.walk.spans[i].chunk_id)
        return loaded, order

    def _key(self, chunk_id: int) -> tuple[Any, ...]:
        ref = self.spec.ref
        return (
            ref.url,
            ref.cache_id,
            int(chunk_id),
            tuple(self.fields),
            self.spec.nonfinite,
        )

    def _fetch(self, chunk_id: int) -> LoadedChunk:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == chunk_id:
            future = ahead[1]
            try:
                if self.cache is not None:
                    hit = self.cache.get(self._key(chunk_id))
                    if hit is not None:
                        self.hits += 1
                        return hit
                loaded = future.result()  # the background read's error is raised here
                self.prefetched += 1
            finally:
                _settle(future)
            self.misses += 1
            _admit(
                self.spec.ref,
                self.fields,
                chunk_id,
                self.spec.nonfinite,
                loaded,
                self.cache,
            )
            return loaded
        if ahead is not None:
            _settle(ahead[1])
        loaded, was_hit = load_chunk(
            self.spec.ref,
            self.fields,
            chunk_id,
            nonfinite=self.spec.nonfinite,
            cache=self.cache,
        )
        self.hits += was_hit
        self.misses += not was_hit
        return loaded

    def _read_ahead(self, chunk_id: int) -> None:
        if self._ahead is not None:
            return
        if any(s.chunk_id == chunk_id for s in self._held):
            return
        if self.cache is not None and self._key(chunk_id) in self.cache:
            return
        _GAUGE.up()
        try:
            future = _reader().submit(
                _read_checked, self.spec.ref, self.fields, chunk_id, self.spec.nonfinite
            )
        except BaseException:
            _GAUGE.down()
            raise
        self._ahead = (chunk_id, future)

    def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        self._held.clear()
        if ahead is not None:
            _settle(ahead[1])


def _zero_partial(model: Model, params: Mapping[str, np.ndarray]) -> Partial:
    """The partial of a leaf with no rows (a stream's share of a step, all of
    whose rows were skipped)."""
    return Partial(
        0.0,
        {k: np.zeros(np.shape(v)) for k, v in params.items()},
        0,
        dict.fromkeys(model.metric_names(), 0.0),
    )


# -- the leader's reports ------------------------------------------------------------
class _Rows:
    """The leader's step rows: all are returned at the end; rows are also
    logged to the scheduler's event log every :data:`ROW_FLUSH_SECONDS` for
    the client's progress bar and callbacks and the dashboard page."""

    def __init__(self, spec: SegmentSpec) -> None:
        self.spec = spec
        self.rows: list[dict[str, Any]] = []
        self._sent = 0
        self._flushed_at = time.monotonic()
        try:
            from distributed import get_worker

            self._worker: Any = get_worker()
        except ValueError:
            self._worker = None

    def add(self, row: dict[str, Any], *, last_of_epoch: bool) -> None:
        self.rows.append(row)
        if last_of_epoch and self.spec.hold_last:
            return
        if time.monotonic() - self._flushed_at >= ROW_FLUSH_SECONDS:
            self.flush(len(self.rows))

    def flush(self, upto: int) -> None:
        self._flushed_at = time.monotonic()
        if upto <= self._sent or self._worker is None:
            return
        batch = self.rows[self._sent : upto]
        self._sent = upto
        try:
            self._worker.log_event(
                [EVENT_TOPIC, ROWS_TOPIC],
                {"store": self.spec.store, "segment": self.spec.key, BATCH_KEY: batch},
            )
        except Exception:
            logger.debug("could not log step rows", exc_info=True)


def _row(
    spec: SegmentSpec,
    model: Model,
    root: Partial,
    *,
    i: int,
    loss: float,
    objective: float,
    grad_norm: float,
    learning_rate: float,
    seconds: float,
    hits: int,
    misses: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    n = root.n_rows
    row: dict[str, Any] = {
        "step": spec.run_step + i + 1,
        "epoch": spec.epoch + 1,
        "loss": float(loss),
        "objective": float(objective),
        "grad_norm": float(grad_norm),
        "learning_rate": float(learning_rate),
        "rows": int(n),
        "rows_per_s": n / seconds if seconds > 0 else math.nan,
        "seconds": float(seconds),
    }
    if extra:
        row.update(extra)
    for k, v in model.summarize(root).items():
        if k != "loss":
            row[f"train_{k}"] = float(v)
    total = hits + misses
    row["cache_hit_rate"] = hits / total if total else math.nan
    return row


# -- the rank task ---------------------------------------------------------------------
def run_rank(
    spec: SegmentSpec,
    rank: int,
    start: Mapping[str, Mapping[str, np.ndarray]],
) -> RankResult:
    """Run rank ``rank`` of segment ``spec`` from ``start`` (``{"params":
    ..., "opt_state": ...}``).  A task function (runs on a worker).

    Raises the original exception of a leaf that failed (tagged with
    :data:`FAILED_STEP_ATTRIBUTE` and ``FAILED_LEAF_ATTRIBUTE``),
    :class:`SegmentAborted` if another rank failed or the client aborted,
    :class:`PeerLostError` if a peer was lost.
    """
    from distributed import get_worker

    if spec.kind not in KINDS:
        raise ValueError(f"segment kind must be one of {KINDS}, got {spec.kind!r}")
    worker = get_worker()
    if worker.address != spec.addresses[rank]:
        raise SegmentAborted(
            f"rank {rank} of segment {spec.key} was planned on "
            f"{spec.addresses[rank]}, not on {worker.address}"
        )
    task_key = None
    try:
        from distributed.worker import thread_state

        task_key = str(thread_state.key)
    except AttributeError:
        pass
    channel = RankChannel(
        rank_state(worker),
        spec.key,
        rank,
        spec.addresses,
        spec.timeouts,
        task_key=task_key,
    )
    program = (
        _StepProgram(spec, rank) if spec.kind == "steps" else _LocalProgram(spec, rank)
    )
    reason = "finished"
    try:
        return program.run(channel, start)
    except (SegmentAborted, PeerLostError) as exc:
        reason = f"rank {rank}: {exc}"
        raise
    except BaseException as exc:
        reason = f"rank {rank} failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        if reason != "finished":
            channel.abort_all(reason)
        program.close()
        channel.close(reason)


class _Program:
    """The step loop shared by both kinds: compute own leaves, exchange nodes,
    complete the tree, update.  Subclasses say what a leaf is and how the
    root becomes the next state."""

    def __init__(self, spec: SegmentSpec, rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.model = spec.model
        self.optimizer = spec.optimizer
        a, b = spec.leaves[rank]
        self.own = range(a, b)
        self.cache = worker_cache()
        self.prefetch = prefetch_enabled()
        self.hits = self.misses = self.prefetched = 0

    # subclass hooks --------------------------------------------------------------
    def n_leaves(self, step: int) -> int:
        raise NotImplementedError

    def own_leaves(self, step: int) -> list[int]:
        raise NotImplementedError

    def leaf(
        self,
        step: int,
        leaf: int,
        params: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> Partial:
        raise NotImplementedError

    def advance(
        self,
        step: int,
        root: Partial,
        params: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        """The next state from the root; returns ``(params, state, row
        fields)``; raises :class:`NonFiniteStep`."""
        raise NotImplementedError

    def close(self) -> None: ...

    # the loop --------------------------------------------------------------------
    def run(
        self, channel: RankChannel, start: Mapping[str, Mapping[str, np.ndarray]]
    ) -> RankResult:
        spec = self.spec
        t_start = time.monotonic()
        params = {k: np.asarray(v) for k, v in start["params"].items()}
        state = {k: np.asarray(v) for k, v in start["opt_state"].items()}
        epoch_len = spec.epoch_steps()
        stop = min(spec.stop_step, epoch_len)
        leader = self.rank == 0
        rows = _Rows(spec) if leader else None
        compute_seconds = 0.0
        n_done = 0
        diverged: str | None = None
        error_seen: BaseException | None = None
        step_started = time.monotonic()
        for step in range(spec.first_step, stop):
            # Leaves: this rank's share of the step, pre-reduced into the
            # largest subtrees it holds.
            t0 = time.perf_counter()
            n_leaves = self.n_leaves(step)
            mine = self.own_leaves(step)
            error: list[Any] | None = None
            nodes: dict[Node, Partial] = {}
            hits0, misses0 = self.hits, self.misses
            try:
                known: dict[Node, Partial] = {}
                for leaf in mine:
                    try:
                        known[(0, leaf)] = self.leaf(step, leaf, params, state)
                    except Exception as exc:
                        setattr(exc, FAILED_LEAF_ATTRIBUTE, leaf)
                        setattr(exc, FAILED_STEP_ATTRIBUTE, step)
                        raise
                with np.errstate(over="ignore", invalid="ignore"):
                    for node in covering_nodes(mine, n_leaves):
                        nodes[node] = reduce_node(node, n_leaves, known)
            except Exception as exc:
                error = [int(getattr(exc, FAILED_LEAF_ATTRIBUTE, -1)), repr(exc)]
                failure: Exception | None = exc
            else:
                failure = None
            compute_seconds += time.perf_counter() - t0
            # The leader decides whether this is the segment's last step.
            end = step == stop - 1
            if leader and not end:
                end = (
                    channel.stop_requested
                    or time.monotonic() - t_start >= spec.time_budget
                )
            payload = {
                "nodes": [] if error else _encode(nodes),
                "end": bool(end),
                "error": error,
                "stats": [self.hits - hits0, self.misses - misses0],
            }
            # Exchange (the step's only communication): bounded waits.
            got = self._exchange(channel, step, payload)
            if failure is not None or any(p["error"] for p in got.values()):
                # A leaf failed (bad data): every rank ends here, after the
                # same step; the state after the last good step is returned,
                # with the error, by the ranks that met it.
                error_seen = failure
                break
            if not leader:
                end = bool(got[0]["end"])
            known_all = dict(nodes)
            hits, misses = self.hits - hits0, self.misses - misses0
            for p in got.values():
                known_all.update(_decode(p["nodes"]))
                hits += int(p["stats"][0])
                misses += int(p["stats"][1])
            with np.errstate(over="ignore", invalid="ignore"):
                root = reduce_node((tree_depth(n_leaves), 0), n_leaves, known_all)
            # Update: the same numbers on every rank.
            try:
                new_params, new_state, fields = self.advance(step, root, params, state)
            except NonFiniteStep as exc:
                diverged = f"step {spec.run_step + n_done + 1}: {exc}"
                break
            params, state = new_params, new_state
            n_done += 1
            if rows is not None:
                now = time.monotonic()
                rows.add(
                    _row(
                        spec,
                        self.model,
                        root,
                        i=step - spec.first_step,
                        seconds=now - step_started,
                        hits=hits,
                        misses=misses,
                        **fields,
                    ),
                    last_of_epoch=step == epoch_len - 1,
                )
                step_started = now
            if end:
                break
        if rows is not None:
            # The rest of the rows (but the epoch's last, which the client
            # reports after validating) for the dashboard page.
            held = n_done and spec.first_step + n_done == epoch_len and spec.hold_last
            rows.flush(len(rows.rows) - 1 if held else len(rows.rows))
        result = RankResult(
            rank=self.rank,
            n_steps=n_done,
            checksum=state_checksum(params, state),
            diverged=diverged,
            error=error_seen,
            cache_hits=self.hits,
            cache_misses=self.misses,
            prefetched=self.prefetched,
            compute_seconds=compute_seconds,
            wait_seconds=channel.wait_seconds,
            seconds=time.monotonic() - t_start,
        )
        if leader:
            assert rows is not None
            result.params, result.opt_state, result.rows = params, state, rows.rows
        return result

    def _exchange(
        self, channel: RankChannel, step: int, payload: dict[str, Any]
    ) -> dict[int, Any]:
        for dst in channel.peers:
            channel.send(dst, step, payload)
        return channel.gather(step, channel.peers)


class _StepProgram(_Program):
    """Synchronous minibatch steps: leaf ``k`` of a step is stream ``k``'s
    slice of it (see :class:`~dasktrain.engine.plan.StreamWalk`)."""

    def __init__(self, spec: SegmentSpec, rank: int) -> None:
        super().__init__(spec, rank)
        rows = spec.rows_of()
        spans = stream_spans(spec.chunk_ids, rows.__getitem__, spec.n_streams)
        epoch_len = spec.epoch_steps()
        if self.prefetch and self.cache is not None and self.cache.budget is not None:
            # Each stream holds its span's chunk; read ahead only where the
            # worker's budget has room for that and a second read.
            self.prefetch = self.cache.budget.fits_read_ahead(
                chunk_nbytes(spec.ref, spec.model.fields),
                worker_threads(),
                held_per_thread=len(self.own),
                read_bytes=read_peak_nbytes(spec.ref, spec.model.fields),
            )
        self.readers = {
            k: _SpanReader(
                StreamWalk(
                    spans[k],
                    n_steps=epoch_len,
                    seed=spec.seed,
                    epoch=spec.epoch,
                    stream=k,
                ),
                spec,
                self.cache,
                self.prefetch,
            )
            for k in self.own
        }
        self._cast: dict[str, np.ndarray] | None = None
        self._cast_of: int | None = None

    def n_leaves(self, step: int) -> int:
        return self.spec.n_streams

    def own_leaves(self, step: int) -> list[int]:
        return list(self.own)

    def leaf(
        self,
        step: int,
        leaf: int,
        params: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> Partial:
        reader = self.readers[leaf]
        hits0, misses0, pre0 = reader.hits, reader.misses, reader.prefetched
        batch = reader.batch(reader.walk.take(step))
        self.hits += reader.hits - hits0
        self.misses += reader.misses - misses0
        self.prefetched += reader.prefetched - pre0
        n = next(iter(batch.values())).shape[0]
        if n == 0:
            return _zero_partial(self.model, params)
        return self.model.loss_and_grad(self._params_for(params, batch), batch)

    def _params_for(
        self, params: dict[str, np.ndarray], batch: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The parameters in the dtype of the batch's ``X`` (float32 data is
        computed in float32), cast once per step."""
        if self._cast_of != id(params) or self._cast is None:
            dtype = batch["X"].dtype if "X" in batch else np.dtype(np.float64)
            self._cast = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
            self._cast_of = id(params)
        return self._cast

    def advance(
        self,
        step: int,
        root: Partial,
        params: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        loss, objective, grads = step_objective(self.model, root, params)
        i = self.spec.run_step + step - self.spec.first_step
        with np.errstate(over="ignore", invalid="ignore"):
            updates, new_state = self.optimizer.update(grads, state, params)
            new_params = apply_updates(params, updates)
        if not all_finite(new_params):
            raise NonFiniteStep("the update made parameters non-finite")
        return (
            new_params,
            new_state,
            {
                "loss": loss,
                "objective": objective,
                "grad_norm": global_norm(grads),
                "learning_rate": self.optimizer.learning_rate_at(i),
            },
        )

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


class _LocalProgram(_Program):
    """Local SGD: a step is a round; leaf ``i`` is the ``i``-th chunk still
    active in the round, which runs its local steps from the current state
    (see :func:`dasktrain.engine.plan.local_sgd_rounds`).  Rank ``r`` holds
    the chunks at positions ``leaves[r]`` of ``chunk_ids``."""

    def __init__(self, spec: SegmentSpec, rank: int) -> None:
        super().__init__(spec, rank)
        self.rounds = spec.local_rounds()
        self.position = {c: i for i, c in enumerate(spec.chunk_ids)}

    def n_leaves(self, step: int) -> int:
        return len(self.rounds[step])

    def own_leaves(self, step: int) -> list[int]:
        return [
            i
            for i, leaf in enumerate(self.rounds[step])
            if self.position[leaf[0].chunk_id] in self.own
        ]

    def leaf(
        self,
        step: int,
        leaf: int,
        params: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> Partial:
        pieces = self.rounds[step][leaf]
        chunks = _ChunkStream(
            self.spec.ref,
            self.model.fields,
            list(dict.fromkeys(p.chunk_id for p in pieces)),
            nonfinite=self.spec.nonfinite,
            cache=self.cache,
            prefetch=False,
        )
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                part, hits, misses = _local_leaf(
                    self.spec.ref,
                    self.model,
                    self.optimizer,
                    params,
                    state,
                    pieces,
                    chunks,
                )
        finally:
            chunks.close()
        self.hits += hits
        self.misses += misses
        return part

    def advance(
        self,
        step: int,
        root: Partial,
        params: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        n = root.n_rows
        if n == 0:
            raise NonFiniteStep("the round has no rows (all skipped?)")
        round_steps = max(len(leaf) for leaf in self.rounds[step])
        new_params, float_state = local_average(root)
        new_state = {**advance_counts(state, round_steps), **float_state}
        objective = root.metrics[LOCAL_OBJECTIVE_SUM] / n
        bad = [
            k
            for k, v in {**new_params, **float_state}.items()
            if not np.all(np.isfinite(v))
        ]
        if bad or not math.isfinite(objective):
            raise NonFiniteStep(f"local SGD made {bad or 'the loss'} non-finite")
        counts = [int(v) for v in state.values() if is_count(v)]
        return (
            new_params,
            new_state,
            {
                "loss": root.mean_loss(),
                "objective": objective,
                "grad_norm": root.metrics[LOCAL_GRAD_NORM_SUM] / n,
                "learning_rate": self.optimizer.learning_rate_at(
                    max(counts, default=0)
                ),
                "extra": {"local_steps": round_steps},
            },
        )
