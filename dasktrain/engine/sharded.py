"""Training steps of models with sharded tables (the parameter-server path).

A step of a :class:`~dasktrain.models.SparseModel` whose tables live in row
shards of the parameter store (see :mod:`dasktrain.params.tables`):

1. *Leaf tasks* (one per worker thread, placed like every pass) read their
   data chunks, pull the table rows those chunks use from the current
   version (grouped by shard: each needed shard is read once per task),
   compute the batch's sums, and pre-reduce them over the fixed tree.  They
   keep the row-sparse table gradients on the worker.
2. One *reduce task* combines the dense part (loss, metrics, gradients of the
   small parameters) by the fixed tree; only this reaches the client.
3. *Update tasks* (one per worker; each owns a fixed set of shards by
   rendezvous hashing) combine the row-sparse gradients of their shards by
   the same fixed tree, apply the optimizer to the touched rows (lazy
   updates: rows a step does not touch keep their values and state), and
   write the changed shards into the new version.
4. The client shares the unchanged shards with the new version (hard links
   or server-side copies), updates the dense parameters, and commits when a
   checkpoint is due.

Every addition happens in an order fixed by the chunk indices, so a step
gives the same bits on any number of workers, and the per-shard updates do
not depend on which worker ran them.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Future

from dasktrain.data.io import DatasetRef
from dasktrain.engine.cache import worker_cache
from dasktrain.engine.engine import (
    Engine,
    _raise_first_error,
)
from dasktrain.engine.plan import Piece, rendezvous_owners
from dasktrain.engine.shard_cache import update_rows
from dasktrain.engine.tasks import (
    LoadedChunk,
    TaskReport,
    _batch,
    _check_labels,
    leaf_partials,
    load_chunk,
)
from dasktrain.errors import DataValidationError
from dasktrain.models.sparse import SparseModel
from dasktrain.optim.base import Optimizer
from dasktrain.params.store import ParamStore
from dasktrain.params.tables import (
    PARAM,
    ParamStoreRef,
    TableLayout,
    default_shard_rows,
    link_shards,
    read_shard,
    write_shard,
)
from dasktrain.partial import (
    Node,
    Partial,
    RowSparse,
    tree_reduce,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ShardStats",
    "ShardedEngine",
    "StepHandle",
    "table_layouts",
]

#: A task's leaf results: dense nodes, row-sparse nodes, report, shard stats.
LeafResult = tuple[
    dict[Node, Partial], dict[Node, dict[str, RowSparse]], TaskReport, dict[str, int]
]


@dataclass
class ShardStats:
    """Shard traffic of a step (or pass)."""

    bytes_read: int = 0
    bytes_written: int = 0
    shards_read: int = 0
    shards_written: int = 0
    shards_shared: int = 0
    rows_updated: int = 0

    def to_row(self) -> dict[str, int]:
        return {
            "shard_bytes_read": self.bytes_read,
            "shard_bytes_written": self.bytes_written,
            "shards_written": self.shards_written,
            "shards_shared": self.shards_shared,
            "table_rows_updated": self.rows_updated,
        }


@dataclass
class ShardedPassResult:
    partial: Partial
    seconds: float
    reports: list[TaskReport] = field(default_factory=list)
    stats: ShardStats = field(default_factory=ShardStats)

    @property
    def cache_hits(self) -> int:
        return sum(r.cache_hits for r in self.reports)

    @property
    def cache_misses(self) -> int:
        return sum(r.cache_misses for r in self.reports)


@dataclass
class StepHandle:
    """A submitted step (see :meth:`ShardedEngine.submit_step`)."""

    write_step: int
    read_step: int
    leaves: list[Future]
    reduced: Future
    updates: list[Future]
    link: Future
    t0: float


# ---------------------------------------------------------------- layouts


def table_layouts(
    model: SparseModel,
    optimizer: Optimizer,
    dense_params: Mapping[str, np.ndarray],
    *,
    shard_rows: int | None = None,
) -> tuple[list[TableLayout], list[str]]:
    """The stored layout of each table of ``model`` with the optimizer's
    per-row state, and the optimizer's global state keys (e.g. step counts),
    which stay with the dense state on the client.

    Raises ``ValueError`` for optimizers that need all gradients at once
    (gradient clipping by global norm, L-BFGS) or whose per-row state does
    not start from a constant.
    """
    if getattr(optimizer, "full_batch_only", False):
        raise ValueError(
            f"{type(optimizer).__name__} cannot train sharded tables: it needs the "
            "whole gradient on the client; use SGD, Adagrad or Adam"
        )
    if getattr(optimizer, "clip_norm", None) is not None:
        raise ValueError(
            "clip_norm (clipping by the global gradient norm) is not available "
            "with sharded tables: the gradient is never assembled in one place"
        )
    dense_keys = set(optimizer.init(dict(dense_params)))
    layouts = []
    for name, spec in sorted(model.tables().items()):
        template = optimizer.init({name: np.zeros((1, spec.width))})
        state: dict[str, tuple[str, float]] = {}
        for key, value in template.items():
            if key in dense_keys:
                continue
            if not key.endswith("." + name) or np.shape(value) != (1, spec.width):
                raise ValueError(
                    f"optimizer state {key!r} of {type(optimizer).__name__} is not "
                    f"per row of table {name!r}: it cannot be sharded"
                )
            arr = np.asarray(value)
            if not np.all(arr == arr.flat[0]):
                raise ValueError(f"optimizer state {key!r} does not start constant")
            # Float state is stored like the table (float32 accumulators for
            # float32 tables: half the bytes of every step's writes).
            dtype = spec.dtype if arr.dtype.kind == "f" else str(arr.dtype)
            state[key] = (dtype, float(arr.flat[0]))
        rows = shard_rows or default_shard_rows(spec.width, spec.dtype)
        layouts.append(
            TableLayout(name, spec.n_rows, spec.width, spec.dtype, int(rows), state)
        )
    global_keys = sorted(
        dense_keys - {k for k in dense_keys if _param_of(k, dense_params)}
    )
    return layouts, global_keys


def _param_of(key: str, params: Mapping[str, Any]) -> bool:
    return any(key.endswith("." + name) for name in params)


# ---------------------------------------------------------------- worker side


class _ShardReader:
    """Reads table rows for one task, each shard at most once."""

    def __init__(
        self, store: ParamStoreRef, step: int, layouts: Mapping[str, TableLayout]
    ):
        self.store = store
        self.step = step
        self.layouts = layouts
        self.shards: dict[tuple[str, int], np.ndarray] = {}
        self.bytes_read = 0

    def rows(self, table: str, ids: np.ndarray) -> np.ndarray:
        layout = self.layouts[table]
        out = np.empty((ids.shape[0], layout.width), dtype=layout.dtype)
        if ids.shape[0] == 0:
            return out
        shards = layout.shard_of(ids)
        cuts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1], True])
        for a, b in itertools.pairwise(cuts):
            shard = int(shards[a])
            values = self.shards.get((table, shard))
            if values is None:
                values = read_shard(self.store, self.step, layout, PARAM, shard)
                self.shards[(table, shard)] = values
                self.bytes_read += int(values.nbytes)
            start, _ = layout.bounds(shard)
            out[a:b] = values[ids[a:b] - start]
        return out


def _check_chunk_ids(
    model: SparseModel, ref: DatasetRef, chunk_id: int, arrays: Mapping[str, np.ndarray]
) -> None:
    problem = model.check_ids(arrays)
    if problem is not None:
        field_name, row, message = problem
        start, _ = ref.chunk_bounds(chunk_id)
        raise DataValidationError(
            f"store {ref.url!r}, array {field_name!r}, chunk {chunk_id}: "
            f"row {start + row}: {message}"
        )


def sparse_leaves(
    ref: DatasetRef,
    model: SparseModel,
    dense: Mapping[str, np.ndarray],
    store: ParamStoreRef,
    read_step: int,
    layouts: Mapping[str, TableLayout],
    leaves: Sequence[tuple[int, Piece]],
    n_leaves: int,
    *,
    with_grads: bool = True,
    nonfinite: str = "raise",
) -> LeafResult:
    """Partials of the given leaves, pre-reduced into the largest subtrees
    this task holds; row-sparse table gradients are returned separately."""
    reader = _ShardReader(store, read_step, layouts)

    def compute(piece: Piece, loaded: LoadedChunk, was_hit: bool) -> Partial:
        if not was_hit:  # a cached chunk was checked when it was read
            _check_chunk_ids(model, ref, piece.chunk_id, loaded.arrays)
            _check_labels(model, ref, piece.chunk_id, loaded)
        batch = _batch(loaded, piece)
        rows = {}
        for table, ids in model.row_ids(batch).items():
            uniq = np.unique(ids)
            rows[table] = (uniq, reader.rows(table, uniq))
        return model.sparse_loss_and_grad(dense, rows, batch, with_grads=with_grads)

    nodes, report = leaf_partials(
        ref, model.fields, leaves, n_leaves, compute, nonfinite=nonfinite
    )
    # Only the dense part goes on to the client; table gradients stay here.
    dense_out = {
        node: Partial(
            p.loss_sum,
            {k: g for k, g in p.grads.items() if k not in layouts},
            p.n_rows,
            dict(p.metrics),
        )
        for node, p in nodes.items()
    }
    sparse_out = {
        node: {k: g for k, g in p.grads.items() if isinstance(g, RowSparse)}
        for node, p in nodes.items()
    }
    stats = {"bytes_read": reader.bytes_read, "shards_read": len(reader.shards)}
    return dense_out, sparse_out, report, stats


def reduce_dense(
    n_leaves: int, *results: LeafResult
) -> tuple[Partial, list[TaskReport], dict[str, int]]:
    """The dense part of a step, reduced by the fixed tree."""
    known: dict[Node, Partial] = {}
    reports = []
    stats = {"bytes_read": 0, "shards_read": 0}
    for dense, _, report, st in results:
        known.update(dense)
        reports.append(report)
        for k in stats:
            stats[k] += st[k]
    with np.errstate(over="ignore", invalid="ignore"):
        partial = tree_reduce(known, n_leaves)
    return partial, reports, stats


def update_shards(
    store: ParamStoreRef,
    read_step: int,
    write_step: int,
    layouts: Mapping[str, TableLayout],
    owned: Mapping[str, Sequence[int]],
    optimizer: Optimizer,
    global_state: Mapping[str, np.ndarray],
    n_leaves: int,
    *results: LeafResult,
    after: Any = None,
) -> dict[str, Any]:
    """Apply the step's row-sparse gradients to the shards in ``owned``
    (table -> shard ids) and write the changed shards of version
    ``write_step``.  Returns ``{"written": {table: [shard, ...]}, ...}``.

    ``after`` is only a dependency: the previous step's :func:`link_version`
    result, so that version ``read_step`` is complete before it is read."""
    n_rows = sum(p.n_rows for dense, *_ in results for p in dense.values())
    written: dict[str, list[int]] = {}
    bytes_written = rows_updated = 0
    for table, shards in owned.items():
        if not shards:
            continue
        layout = layouts[table]
        mine = np.asarray(sorted(shards), dtype=np.int64)
        known: dict[Node, Partial] = {}
        for _, sparse, _, _ in results:
            for node, grads in sparse.items():
                g = grads[table]
                keep = np.isin(layout.shard_of(g.rows), mine)
                known[node] = Partial(
                    0.0, {table: RowSparse(g.rows[keep], g.values[keep], g.shape)}, 0
                )
        with np.errstate(over="ignore", invalid="ignore"):
            total = tree_reduce(known, n_leaves).grads[table]
        assert isinstance(total, RowSparse)
        if total.rows.shape[0] == 0:
            continue
        row_shards = layout.shard_of(total.rows)
        cuts = np.flatnonzero(np.r_[True, row_shards[1:] != row_shards[:-1], True])
        for a, b in itertools.pairwise(cuts):
            shard = int(row_shards[a])
            start, _ = layout.bounds(shard)
            local = total.rows[a:b] - start
            grad = total.values[a:b] / n_rows
            bytes_written += _update_one_shard(
                store,
                read_step,
                write_step,
                layout,
                shard,
                local,
                grad,
                optimizer,
                global_state,
            )
            rows_updated += int(b - a)
            written.setdefault(table, []).append(shard)
    return {
        "written": written,
        "bytes_written": bytes_written,
        "rows_updated": rows_updated,
    }


def _update_one_shard(
    store: ParamStoreRef,
    read_step: int,
    write_step: int,
    layout: TableLayout,
    shard: int,
    local: np.ndarray,
    grad: np.ndarray,
    optimizer: Optimizer,
    global_state: Mapping[str, np.ndarray],
) -> int:
    values = read_shard(store, read_step, layout, PARAM, shard).copy()
    states = {
        key: read_shard(store, read_step, layout, key, shard).copy()
        for key in layout.state
    }
    update_rows(
        layout,
        {PARAM: values, **states},
        local,
        grad,
        optimizer,
        global_state,
        shard=shard,
    )
    nbytes = write_shard(store, write_step, layout, PARAM, shard, values)
    for key, s in states.items():
        nbytes += write_shard(store, write_step, layout, key, shard, s)
    return nbytes


def link_version(
    store: ParamStoreRef,
    src_step: int,
    dst_step: int,
    layouts: Sequence[TableLayout],
    *updates: dict[str, Any],
) -> dict[str, Any]:
    """Complete version ``dst_step``: share every shard the step's update
    tasks did not write with version ``src_step``.  Returns the step's shard
    statistics."""
    written: dict[str, set[int]] = {}
    out = {"bytes_written": 0, "rows_updated": 0, "shards_written": 0, "shared": 0}
    for res in updates:
        out["bytes_written"] += res["bytes_written"]
        out["rows_updated"] += res["rows_updated"]
        for table, shards in res["written"].items():
            written.setdefault(table, set()).update(shards)
    for layout in layouts:
        mine = written.get(layout.name, set())
        out["shards_written"] += len(mine)
        skip = dict.fromkeys(layout.arrays, mine)
        out["shared"] += link_shards(store, src_step, dst_step, layout, skip)
    return out


def init_shards(
    store: ParamStoreRef,
    step: int,
    model: SparseModel,
    seed: int,
    layouts: Mapping[str, TableLayout],
    owned: Mapping[str, Sequence[int]],
) -> int:
    """Write the initial values of the ``owned`` shards (tables that start
    at zero are not written: a missing shard reads as zeros)."""
    nbytes = 0
    for table, shards in owned.items():
        layout = layouts[table]
        spec = model.tables()[table]
        if spec.init_scale == 0 or spec.n_random == 0:
            continue
        for shard in shards:
            start, stop = layout.bounds(shard)
            values = model.table_rows(table, seed, start, stop)
            nbytes += write_shard(store, step, layout, PARAM, shard, values)
    return nbytes


def predict_sparse_chunk(
    ref: DatasetRef,
    model: SparseModel,
    dense: Mapping[str, np.ndarray],
    store: ParamStoreRef,
    step: int,
    layouts: Mapping[str, TableLayout],
    chunk_id: int,
    kind: str,
) -> np.ndarray:
    """Predictions for one chunk of a stored dataset, pulling table rows."""
    loaded, _ = load_chunk(ref, model.input_fields, chunk_id, cache=worker_cache())
    batch = dict(loaded.arrays)
    _check_chunk_ids(model, ref, chunk_id, batch)
    reader = _ShardReader(store, step, layouts)
    rows = {}
    for table, ids in model.row_ids(batch).items():
        uniq = np.unique(ids)
        rows[table] = (uniq, reader.rows(table, uniq))
    return np.asarray(model.predict_rows(dense, rows, batch, kind))


# ---------------------------------------------------------------- client side


class ShardedEngine:
    """Runs the steps and passes of a sharded model (see the module docs)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def client(self) -> Any:
        return self.engine.client

    def _shard_owners(
        self, layouts: Sequence[TableLayout]
    ) -> dict[str, dict[str, list[int]]]:
        """Worker address -> table -> shards it updates (stable: rendezvous
        hashing of shard names over worker names)."""
        workers = self.engine.workers()
        by_name = {w.name: w.address for w in workers}
        out: dict[str, dict[str, list[int]]] = {w.address: {} for w in workers}
        for layout in layouts:
            keys = [f"{layout.name}#{s}" for s in range(layout.n_shards)]
            owners = rendezvous_owners(keys, list(by_name))
            for s in range(layout.n_shards):
                addr = by_name[owners[f"{layout.name}#{s}"]]
                out[addr].setdefault(layout.name, []).append(s)
        return out

    def init_tables(
        self,
        ps: ParamStore,
        step: int,
        model: SparseModel,
        seed: int,
        layouts: Sequence[TableLayout],
    ) -> None:
        """Prepare version ``step`` and write the tables' initial values."""
        ps.prepare_version(step, layouts)
        by_name = {t.name: t for t in layouts}
        futures = [
            self.client.submit(
                init_shards,
                ps.ref,
                step,
                model,
                seed,
                by_name,
                owned,
                workers=[addr],
                allow_other_workers=True,
                pure=False,
                key=f"dasktrain-table-init-{uuid.uuid4().hex[:12]}",
            )
            for addr, owned in self._shard_owners(layouts).items()
            if owned
        ]
        self.client.gather(futures)

    def _submit_leaves(
        self,
        ref: DatasetRef,
        model: SparseModel,
        dense: Mapping[str, np.ndarray],
        store: ParamStoreRef,
        read_step: int,
        layouts: Mapping[str, TableLayout],
        pieces: Sequence[Piece],
        placement_chunks: Sequence[int] | None,
        with_grads: bool,
        nonfinite: str,
    ) -> list[Future]:
        """Leaf tasks placed like every pass (see
        :meth:`Engine.submit_leaf_tasks`)."""
        dense_arg = {k: np.asarray(v) for k, v in dense.items()}
        return self.engine.submit_leaf_tasks(
            ref,
            pieces,
            placement_chunks,
            "leaves",
            lambda part: (
                sparse_leaves,
                (
                    ref,
                    model,
                    dense_arg,
                    store,
                    read_step,
                    layouts,
                    [(i, pieces[i]) for i in part],
                    len(pieces),
                ),
                {"with_grads": with_grads, "nonfinite": nonfinite},
            ),
        )

    def submit_step(
        self,
        ps: ParamStore,
        ref: DatasetRef,
        model: SparseModel,
        optimizer: Optimizer,
        dense: Mapping[str, np.ndarray],
        global_state: Mapping[str, np.ndarray],
        layouts: Sequence[TableLayout],
        pieces: Sequence[Piece],
        *,
        read_step: int,
        write_step: int,
        after: StepHandle | None = None,
        placement_chunks: Sequence[int] | None = None,
        nonfinite: str = "raise",
    ) -> StepHandle:
        """Submit one training step without waiting for it.

        Gradients are computed with ``dense`` and the tables of version
        ``read_step``; the update tasks apply them to version
        ``write_step - 1`` (complete once ``after``, the previous step, is)
        and write version ``write_step`` (prepared here; a retried step never
        writes over a shared file).  ``global_state`` is the optimizer state
        not tied to a parameter (step counts) before this step.
        """
        t0 = time.perf_counter()
        ps.prepare_version(write_step, layouts)
        by_name = {t.name: t for t in layouts}
        token = uuid.uuid4().hex[:12]
        leaves = self._submit_leaves(
            ref,
            model,
            dense,
            ps.ref,
            read_step,
            by_name,
            pieces,
            placement_chunks,
            True,
            nonfinite,
        )
        n_leaves = len(pieces)
        reduced = self.client.submit(
            reduce_dense, n_leaves, *leaves, key=f"dasktrain-dense-{token}", pure=False
        )
        gstate = {k: np.asarray(v) for k, v in global_state.items()}
        base_step = write_step - 1
        updates = [
            self.client.submit(
                update_shards,
                ps.ref,
                base_step,
                write_step,
                by_name,
                owned,
                optimizer,
                gstate,
                n_leaves,
                *leaves,
                after=None if after is None else after.link,
                key=f"dasktrain-update-{token}-{i}",
                workers=[addr],
                allow_other_workers=True,
                pure=False,
            )
            for i, (addr, owned) in enumerate(
                sorted(self._shard_owners(layouts).items())
            )
            if owned
        ]
        link = self.client.submit(
            link_version,
            ps.ref,
            base_step,
            write_step,
            list(layouts),
            *updates,
            key=f"dasktrain-link-{token}",
            pure=False,
        )
        return StepHandle(write_step, read_step, leaves, reduced, updates, link, t0)

    def finish_step(self, handle: StepHandle) -> ShardedPassResult:
        """Wait for a submitted step; its version is then complete."""
        n_leaves = len(handle.leaves)
        everything = [*handle.leaves, handle.reduced, *handle.updates, handle.link]
        try:
            self.engine._wait_for(everything)
            (partial, reports, read_stats), linked = self.client.gather(
                [handle.reduced, handle.link]
            )
        except Exception:
            _raise_first_error(handle.leaves, n_leaves)
            _raise_first_error(everything, n_leaves)
            raise
        stats = ShardStats(
            bytes_read=read_stats["bytes_read"],
            shards_read=read_stats["shards_read"],
            bytes_written=linked["bytes_written"],
            rows_updated=linked["rows_updated"],
            shards_written=linked["shards_written"],
            shards_shared=linked["shared"],
        )
        seconds = time.perf_counter() - handle.t0
        return ShardedPassResult(partial, seconds, reports, stats)

    def cancel(self, handles: Sequence[StepHandle]) -> None:
        futures = [
            f for h in handles for f in [*h.leaves, h.reduced, *h.updates, h.link]
        ]
        if futures:
            self.client.cancel(futures)

    def step(
        self,
        ps: ParamStore,
        ref: DatasetRef,
        model: SparseModel,
        optimizer: Optimizer,
        dense: Mapping[str, np.ndarray],
        global_state: Mapping[str, np.ndarray],
        layouts: Sequence[TableLayout],
        pieces: Sequence[Piece],
        *,
        read_step: int,
        write_step: int,
        placement_chunks: Sequence[int] | None = None,
        nonfinite: str = "raise",
    ) -> ShardedPassResult:
        """One synchronous step (submit, then wait); run again if a worker
        loss lost its inputs (see :meth:`Engine.retrying`)."""

        def once() -> ShardedPassResult:
            handle = self.submit_step(
                ps,
                ref,
                model,
                optimizer,
                dense,
                global_state,
                layouts,
                pieces,
                read_step=read_step,
                write_step=write_step,
                placement_chunks=placement_chunks,
                nonfinite=nonfinite,
            )
            return self.finish_step(handle)

        return self.engine.retrying(f"step {write_step} over {ref.url}", once)

    def run_pass(
        self,
        store: ParamStoreRef,
        step: int,
        ref: DatasetRef,
        model: SparseModel,
        dense: Mapping[str, np.ndarray],
        layouts: Sequence[TableLayout],
        pieces: Sequence[Piece],
        *,
        placement_chunks: Sequence[int] | None = None,
        nonfinite: str = "raise",
    ) -> ShardedPassResult:
        """Loss and metrics of the parameters of version ``step`` (no
        gradients), e.g. for validation."""

        def once() -> ShardedPassResult:
            t0 = time.perf_counter()
            leaves = self._submit_leaves(
                ref,
                model,
                dense,
                store,
                step,
                {t.name: t for t in layouts},
                pieces,
                placement_chunks,
                False,
                nonfinite,
            )
            reduced = self.client.submit(
                reduce_dense,
                len(pieces),
                *leaves,
                key=f"dasktrain-dense-{uuid.uuid4().hex[:12]}",
                pure=False,
            )
            try:
                self.engine._wait_for([*leaves, reduced])
                partial, reports, read_stats = self.client.gather(reduced)
            except Exception:
                _raise_first_error(leaves, len(pieces))
                raise
            stats = ShardStats(
                bytes_read=read_stats["bytes_read"],
                shards_read=read_stats["shards_read"],
            )
            return ShardedPassResult(partial, time.perf_counter() - t0, reports, stats)

        return self.engine.retrying(f"a pass over {ref.url}", once)
