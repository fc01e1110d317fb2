"""Ranks that serve sharded tables: the parameter server on segments.

A segment of a :class:`~dasktrain.models.SparseModel` whose tables are
sharded runs like a dense one (see :mod:`dasktrain.engine.rank`: one
long-running rank per worker thread, streams of minibatch rows, the fixed
tree), and the ranks are also the tables' servers: shard ``s`` of the
``t``-th table (in name order) is owned by rank ``(s + t) % n_ranks``, which
keeps it in its worker's :class:`~dasktrain.engine.shard_cache.ShardCache`.

Each step of rank ``r`` has two exchanges, both direct, worker to worker:

1. **rows**: every owner answers the row requests it received for this step
   (the rows the other ranks' minibatches use, sent with the previous
   step's gradients) from its shards, which hold the previous step's update;
2. **gradients**: rank ``r`` computes its streams' leaves with those rows,
   pre-reduces them over the fixed tree, and sends every other rank the
   dense part of its nodes, the row-sparse table gradients restricted to
   that rank's shards, and its requests for the next step's rows.  Every
   rank completes the dense tree and applies the same dense update; every
   owner completes the tree of its rows' gradients (the same additions in
   the same order on any cluster) and applies the optimizer to those rows.

No table bytes reach the client or the store in a step.  At the segment's
end every rank writes its changed shards into the attempt's stage version;
the client shares the unchanged ones with the previous version and commits.
So the bits depend on the plan only, never on the ranks, and a rerun of a
segment (a lost rank) starts from the last committed version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dasktrain._tree import global_norm
from dasktrain.data.io import DatasetRef, read_peak_nbytes
from dasktrain.engine.budget import (
    COMPUTE_CHUNK_FACTOR,
    worker_budget,
)
from dasktrain.engine.cache import worker_cache
from dasktrain.engine.comm import (
    PeerLostError,
    RankChannel,
    SegmentAborted,
    rank_state,
)
from dasktrain.engine.plan import StreamWalk, stream_spans
from dasktrain.engine.rank import (
    FAILED_STEP_ATTRIBUTE,
    RankResult,
    SegmentSpec,
    _decode,
    _encode,
    _row,
    _Rows,
    _SpanReader,
    _zero_partial,
    state_checksum,
)
from dasktrain.engine.shard_cache import ShardServer, ShardTraffic, worker_shard_cache
from dasktrain.engine.sharded import _check_chunk_ids
from dasktrain.engine.tasks import (
    FAILED_LEAF_ATTRIBUTE,
    chunk_nbytes,
    load_chunk,
    prefetch_enabled,
    worker_threads,
)
from dasktrain.errors import DataValidationError
from dasktrain.models.sparse import SparseModel
from dasktrain.objective import NonFiniteStep, all_finite, step_objective
from dasktrain.optim.base import apply_updates
from dasktrain.params.tables import ParamStoreRef, TableLayout
from dasktrain.partial import (
    Node,
    Partial,
    RowSparse,
    covering_nodes,
    id_positions,
    reduce_node,
    reduce_rows,
    tree_depth,
    unique_ids,
)

logger = logging.getLogger(__name__)

__all__ = ["TableRankResult", "TableSegmentSpec", "owner_of", "run_table_rank"]

#: Message kinds of a step (the mailbox key is ``step * _PHASES + kind``).
_REQUEST, _ROWS, _GRADS = 0, 1, 2
_PHASES = 3


#: Bytes a step keeps per float64 value of the table rows its streams use,
#: measured: 2 x 50,000-row steps of a rank-31 matrix factorization on two
#: 384 MiB workers peaked about 116 MiB above the workers' baseline and cached
#: shards, for ~30,000 rows x 32 values per rank (the rows pulled and served,
#: gradients per leaf and per tree node, their wire copies, the update).
STEP_BUFFER_COPIES = 16


def _tag(step: int, phase: int) -> int:
    return step * _PHASES + phase


@dataclass(frozen=True)
class TableSegmentSpec(SegmentSpec):
    """A segment of a model with sharded tables (see the module docs)."""

    table_store: ParamStoreRef | None = None
    tables: tuple[TableLayout, ...] = ()
    #: the version the segment's tables start from
    base_step: int = 0
    #: this attempt's stage version (filled in per attempt)
    stage: int = 0
    #: versions whose cached shard values equal ``base_step``'s
    labels: tuple[int, ...] = ()
    #: the fit's token (shards cached by another fit are not used)
    token: str = ""


@dataclass
class TableRankResult(RankResult):
    """A rank's result, with the shards it wrote into the stage and its
    shard traffic."""

    written: dict[str, list[int]] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)


def owner_of(table_index: int, shards: np.ndarray, n_ranks: int) -> np.ndarray:
    """The rank that serves each of ``shards`` of the ``table_index``-th table."""
    return (np.asarray(shards, dtype=np.int64) + table_index) % n_ranks


def run_table_rank(
    spec: TableSegmentSpec,
    rank: int,
    start: Mapping[str, Mapping[str, np.ndarray]],
) -> TableRankResult:
    """Run rank ``rank`` of a table segment (a task function; see
    :func:`dasktrain.engine.rank.run_rank` for the errors it raises)."""
    from distributed import get_worker

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
    reason = "finished"
    program: _TableProgram | None = None
    try:
        program = _TableProgram(spec, rank)
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
            if program is not None:
                program.server.discard()
        if program is not None:
            program.close()
        channel.close(reason)


class _Leaf:
    """One stream's rows of a step and the table rows they use."""

    def __init__(
        self,
        batch: dict[str, np.ndarray] | None,
        ids: dict[str, np.ndarray],
        error: BaseException | None = None,
    ):
        self.batch = batch
        self.ids = ids
        self.error = error


class _TableProgram:
    def __init__(self, spec: TableSegmentSpec, rank: int) -> None:
        assert spec.table_store is not None
        model = spec.model
        assert isinstance(model, SparseModel)
        self.spec = spec
        self.rank = rank
        self.model: SparseModel = model
        self.optimizer = spec.optimizer
        self.n_ranks = spec.n_ranks
        a, b = spec.leaves[rank]
        self.own = range(a, b)
        self.layouts = {t.name: t for t in spec.tables}
        self.table_index = {name: i for i, name in enumerate(sorted(self.layouts))}
        cache = worker_cache()
        prefetch = prefetch_enabled()
        budget = worker_budget()
        read = read_peak_nbytes(spec.ref, model.fields)
        if prefetch and cache is not None and cache.budget is not None:
            prefetch = cache.budget.fits_read_ahead(
                chunk_nbytes(spec.ref, model.fields),
                worker_threads(),
                held_per_thread=len(self.own),
                read_bytes=read,
            )
        # Per thread: its streams' chunks and one being read (as a dense
        # rank), and one shard being loaded while another is written out.
        threads = worker_threads()
        chunk = chunk_nbytes(spec.ref, model.fields)
        largest = max((t.shard_nbytes for t in spec.tables), default=0)
        held = (len(self.own) + COMPUTE_CHUNK_FACTOR) * chunk + read
        self.budget = budget
        self.threads = threads
        self.fixed_set = threads * (held + 2 * largest)
        budget.declare_working_set(self.fixed_set)
        rows = spec.rows_of()
        spans = stream_spans(spec.chunk_ids, rows.__getitem__, spec.n_streams)
        epoch_len = spec.epoch_steps()
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
                cache,
                prefetch,
            )
            for k in self.own
        }
        self.server = ShardServer(
            worker_shard_cache(),
            spec.table_store,
            self.layouts,
            spec.base_step,
            spec.stage,
            spec.token,
            frozenset(spec.labels),
        )
        self.hits = self.misses = 0

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()

    def owns(self, table: str, shard: int) -> bool:
        """Whether this rank serves (and alone updates) ``shard`` of ``table``
        in this segment."""
        index = self.table_index.get(table)
        if index is None:
            return False
        return int(owner_of(index, np.array([shard]), self.n_ranks)[0]) == self.rank

    # -- reading a step's rows ---------
    def read(self, step: int) -> dict[int, _Leaf]:
        """This rank's leaves of ``step``: their rows and the table rows they
        use (an error is kept for the step it belongs to)."""
        out = {}
        for k in self.own:
            reader = self.readers[k]
            h0, m0 = reader.hits, reader.misses
            try:
                takes = reader.walk.take(step)
                batch = reader.batch(takes)
                problem = self.model.check_ids(batch)
                if problem is not None:
                    raise self._bad_ids(takes, problem)
                ids = {
                    t: unique_ids(v, self.layouts[t].n_rows)
                    for t, v in self.model.row_ids(batch).items()
                }
                out[k] = _Leaf(batch, ids)
            except Exception as exc:
                setattr(exc, FAILED_LEAF_ATTRIBUTE, k)
                setattr(exc, FAILED_STEP_ATTRIBUTE, step)
                out[k] = _Leaf(None, {t: _NO_IDS for t in self.layouts}, exc)
            self.hits += reader.hits - h0
            self.misses += reader.misses - m0
        return out

    def _bad_ids(
        self, takes: Sequence[Any], problem: tuple[str, int, str]
    ) -> Exception:
        """The error for a batch with an id out of range, naming the store,
        chunk and row (the batch's rows are shuffled: find the chunk row)."""
        field_name, row, message = problem
        ref: DatasetRef = self.spec.ref
        offset = 0
        for take in takes:
            n = take.hi - take.lo
            if row < offset + n:
                # The chunk's first bad row, with its row in the store.
                chunk_id = take.span.chunk_id
                loaded, _ = load_chunk(
                    ref, self.model.fields, chunk_id, nonfinite=self.spec.nonfinite
                )
                try:
                    _check_chunk_ids(self.model, ref, chunk_id, loaded.arrays)
                except DataValidationError as exc:
                    return exc
                break
            offset += n
        return DataValidationError(
            f"store {ref.url!r}, array {field_name!r}: {message}"
        )

    def requests(self, leaves: Mapping[int, _Leaf]) -> dict[int, dict[str, np.ndarray]]:
        """The rows this rank needs from each owner (sorted, unique)."""
        out: dict[int, dict[str, np.ndarray]] = {r: {} for r in range(self.n_ranks)}
        for table, layout in self.layouts.items():
            ids = [leaf.ids[table] for leaf in leaves.values()]
            union = unique_ids(np.concatenate(ids), layout.n_rows) if ids else _NO_IDS
            owners = owner_of(
                self.table_index[table], layout.shard_of(union), self.n_ranks
            )
            for r in range(self.n_ranks):
                out[r][table] = union[owners == r]
        return out

    # -- the loop ---------
    def run(
        self, channel: RankChannel, start: Mapping[str, Mapping[str, np.ndarray]]
    ) -> TableRankResult:
        spec = self.spec
        t_start = time.monotonic()
        params = {k: np.asarray(v) for k, v in start["params"].items()}
        state = {k: np.asarray(v) for k, v in start["opt_state"].items()}
        epoch_len = spec.epoch_steps()
        stop = min(spec.stop_step, epoch_len)
        leader = self.rank == 0
        rows_out = _Rows(spec) if leader else None
        n_leaves = spec.n_streams
        compute_seconds = 0.0
        n_done = 0
        diverged: str | None = None
        error_seen: BaseException | None = None
        step_started = time.monotonic()

        # The first step's requests.
        leaves = self.read(spec.first_step) if spec.first_step < stop else {}
        self._declare_step_buffers(leaves)
        mine = self.requests(leaves)
        for dst in channel.peers:
            channel.send(
                dst,
                _tag(spec.first_step, _REQUEST),
                mine[dst],
            )
        asked = {
            src: p
            for src, p in channel.gather(
                _tag(spec.first_step, _REQUEST), channel.peers
            ).items()
        }
        asked[self.rank] = mine[self.rank]
        for step in range(spec.first_step, stop):
            t0 = time.perf_counter()
            traffic0 = self.server.traffic.to_dict()
            hits0, misses0 = self.hits, self.misses
            # 1. Rows: answer every rank's requests for this step.
            served = {
                src: {t: self.server.rows(t, ids) for t, ids in req.items()}
                for src, req in asked.items()
            }
            for dst in channel.peers:
                channel.send(dst, _tag(step, _ROWS), served[dst])
            got_rows = channel.gather(_tag(step, _ROWS), channel.peers)
            got_rows[self.rank] = served[self.rank]
            # 2. Leaves with those rows, pre-reduced.
            failure: BaseException | None = None
            error: list[Any] | None = None
            dense_nodes: dict[Node, Partial] = {}
            sparse_nodes: dict[Node, dict[str, RowSparse]] = {}
            try:
                values = self._assemble(mine, got_rows)
                known: dict[Node, Partial] = {}
                for k in self.own:
                    known[(0, k)] = self._leaf(leaves[k], values, params)
                # The dense part and each table's rows are reduced apart
                # (tables by dense row arrays when that is faster).
                known_rest = {
                    node: Partial(
                        p.loss_sum,
                        {k: g for k, g in p.grads.items() if k not in self.layouts},
                        p.n_rows,
                        dict(p.metrics),
                    )
                    for node, p in known.items()
                }
                with np.errstate(over="ignore", invalid="ignore"):
                    for node in covering_nodes(self.own, n_leaves):
                        dense_nodes[node] = reduce_node(node, n_leaves, known_rest)
                        sparse_nodes[node] = {
                            t: reduce_rows(
                                node,
                                n_leaves,
                                {n: p.grads[t] for n, p in known.items()},  # type: ignore[misc]
                            )
                            for t in sorted(self.layouts)
                        }
            except Exception as exc:
                failure = exc
                error = [int(getattr(exc, FAILED_LEAF_ATTRIBUTE, -1)), repr(exc)]
            compute_seconds += time.perf_counter() - t0
            end = step == stop - 1
            if leader and not end:
                end = (
                    channel.stop_requested
                    or time.monotonic() - t_start >= spec.time_budget
                )
            # The next step's rows are read now (bad data raises in its step).
            next_leaves = {} if end or error else self.read(step + 1)
            next_mine = self.requests(next_leaves) if next_leaves else None
            stats = [
                self.hits - hits0,
                self.misses - misses0,
                *_traffic_delta(traffic0, self.server.traffic),
            ]
            dense_wire = [] if error else _encode(dense_nodes)
            for dst in channel.peers:
                payload = {
                    "dense": dense_wire,
                    "sparse": [] if error else self._sparse_for(dst, sparse_nodes),
                    "req": None if next_mine is None else next_mine[dst],
                    "end": bool(end),
                    "error": error,
                    "stats": stats,
                }
                channel.send(dst, _tag(step, _GRADS), payload)
            got = channel.gather(_tag(step, _GRADS), channel.peers)
            if failure is not None or any(p["error"] for p in got.values()):
                error_seen = failure
                break
            if not leader:
                end = bool(got[0]["end"])
            known_dense = dict(dense_nodes)
            known_sparse: dict[Node, Partial] = {
                node: Partial(0.0, dict(g), 0)
                for node, g in self._sparse_for(self.rank, sparse_nodes, encode=False)
            }
            totals = list(stats)
            for p in got.values():
                known_dense.update(_decode(p["dense"]))
                known_sparse.update(_decode(p["sparse"]))
                totals = [a + int(b) for a, b in zip(totals, p["stats"], strict=True)]
            depth = tree_depth(n_leaves)
            with np.errstate(over="ignore", invalid="ignore"):
                root = reduce_node((depth, 0), n_leaves, known_dense)
            gstate = _global_state(state, params)
            try:
                new_params, new_state, fields = self._advance(step, root, params, state)
            except NonFiniteStep as exc:
                diverged = f"step {spec.run_step + n_done + 1}: {exc}"
                break
            # The rows this rank serves: the same update on any cluster.
            if root.n_rows:
                for table in sorted(self.layouts):
                    with np.errstate(over="ignore", invalid="ignore"):
                        g = reduce_rows(
                            (depth, 0),
                            n_leaves,
                            {n: p.grads[table] for n, p in known_sparse.items()},  # type: ignore[misc]
                        )
                    if g.rows.shape[0]:
                        self.server.update(
                            table,
                            g.rows,
                            g.values / root.n_rows,
                            self.optimizer,
                            gstate,
                        )
            params, state = new_params, new_state
            n_done += 1
            self.server.next_step()
            self.server.make_room(0)
            if rows_out is not None:
                now = time.monotonic()
                hits, misses, served_rows, s_read, s_written, evictions = totals
                rows_out.add(
                    _row(
                        spec,
                        self.model,
                        root,
                        i=step - spec.first_step,
                        seconds=now - step_started,
                        hits=hits,
                        misses=misses,
                        extra={
                            "shard_bytes_read": s_read,
                            "shard_bytes_written": s_written,
                            "table_rows_served": served_rows,
                            "shard_evictions": evictions,
                        },
                        **fields,
                    ),
                    last_of_epoch=step == epoch_len - 1,
                )
                step_started = now
            if end:
                break
            leaves, mine = next_leaves, next_mine or {}
            asked = {src: p["req"] for src, p in got.items()}
            asked[self.rank] = mine[self.rank]
        written = self.server.flush(self.owns)
        if rows_out is not None:
            held = n_done and spec.first_step + n_done == epoch_len and spec.hold_last
            rows_out.flush(len(rows_out.rows) - 1 if held else len(rows_out.rows))
        result = TableRankResult(
            rank=self.rank,
            n_steps=n_done,
            checksum=state_checksum(params, state),
            diverged=diverged,
            error=error_seen,
            cache_hits=self.hits,
            cache_misses=self.misses,
            compute_seconds=compute_seconds,
            wait_seconds=channel.wait_seconds,
            seconds=time.monotonic() - t_start,
            written=written,
            traffic=self.server.traffic.to_dict(),
        )
        if leader:
            assert rows_out is not None
            result.params, result.opt_state, result.rows = params, state, rows_out.rows
        return result

    def _declare_step_buffers(self, leaves: Mapping[int, _Leaf]) -> None:
        """Room for a step's buffers besides the cached shards: the rows this
        rank pulls, serves and updates (about as many as its streams use),
        their gradients, and their copies on the wire."""
        touched = sum(
            ids.shape[0] * self.layouts[t].width
            for leaf in leaves.values()
            for t, ids in leaf.ids.items()
        )
        step_bytes = STEP_BUFFER_COPIES * touched * 8
        self.budget.declare_working_set(self.fixed_set + self.threads * step_bytes)

    # -- pieces of a step ---------
    def _assemble(
        self,
        mine: Mapping[int, Mapping[str, np.ndarray]],
        got: Mapping[int, Mapping[str, Any]],
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per table: the sorted rows this rank asked for and their values."""
        out = {}
        for table, layout in self.layouts.items():
            parts = [
                (mine[r][table], np.asarray(got[r][table])) for r in range(self.n_ranks)
            ]
            ids = np.concatenate([p[0] for p in parts])
            vals = np.concatenate([p[1].reshape(-1, layout.width) for p in parts])
            order = np.argsort(ids, kind="stable")
            out[table] = (ids[order], vals[order])
        return out

    def _leaf(
        self,
        leaf: _Leaf,
        values: Mapping[str, tuple[np.ndarray, np.ndarray]],
        params: Mapping[str, np.ndarray],
    ) -> Partial:
        if leaf.error is not None:
            raise leaf.error
        assert leaf.batch is not None
        n = next(iter(leaf.batch.values())).shape[0]
        if n == 0:
            zero = _zero_partial(self.model, params)
            grads: dict[str, Any] = dict(zero.grads)
            for t, layout in self.layouts.items():
                grads[t] = RowSparse(
                    _NO_IDS, np.zeros((0, layout.width)), (layout.n_rows, layout.width)
                )
            return Partial(0.0, grads, 0, dict(zero.metrics))
        rows = {}
        for table, ids in leaf.ids.items():
            all_ids, all_vals = values[table]
            where = id_positions(all_ids, ids, self.layouts[table].n_rows)
            rows[table] = (ids, all_vals[where])
        return self.model.sparse_loss_and_grad(params, rows, leaf.batch)

    def _sparse_for(
        self,
        dst: int,
        nodes: Mapping[Node, Mapping[str, RowSparse]],
        *,
        encode: bool = True,
    ) -> Any:
        """The table gradients of ``nodes`` on the rows ``dst`` serves."""
        picked: dict[Node, Partial] = {}
        for node, grads in nodes.items():
            part = {}
            for table, g in grads.items():
                layout = self.layouts[table]
                keep = (
                    owner_of(
                        self.table_index[table], layout.shard_of(g.rows), self.n_ranks
                    )
                    == dst
                )
                part[table] = RowSparse(g.rows[keep], g.values[keep], g.shape)
            picked[node] = Partial(0.0, part, 0)
        if not encode:
            return [(node, p.grads) for node, p in picked.items()]
        return _encode(picked)

    def _advance(
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


_NO_IDS = np.zeros(0, dtype=np.int64)


def _global_state(
    state: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Optimizer state not tied to a dense parameter (e.g. step counts)."""
    return {
        k: v
        for k, v in state.items()
        if not any(k.endswith("." + name) for name in params)
    }


def _traffic_delta(before: Mapping[str, int], traffic: ShardTraffic) -> list[int]:
    now = traffic.to_dict()
    return [
        now[k] - before[k]
        for k in ("rows_served", "bytes_read", "bytes_written", "evictions")
    ]
