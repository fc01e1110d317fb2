"""The engine: turns "a pass over these pieces with these parameters" into
one task per worker thread and one reduced :class:`Partial` on the client.

Shape of a pass (see ARCHITECTURE.md, section 6):

1. Pieces are the leaves of a fixed reduction tree (their list order).
2. Each chunk has a stable owner (rendezvous hashing over worker names with
   bounded load), so its decoded copy stays in that worker's cache.
3. One task per worker thread computes its leaves and pre-reduces the largest
   subtrees it holds; tasks carry soft worker restrictions, so a lost
   worker's share simply runs elsewhere.
4. The client completes the tree.  The same tree gives the same bits on any
   number of workers, in any arrival order, after any retry.
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
from distributed import Client

from dasktrain.data.io import DatasetRef
from dasktrain.engine.cache import DEFAULT_CACHE_FRACTION, CachePlugin
from dasktrain.engine.plan import Piece, assign_pieces, chunk_owners
from dasktrain.engine.tasks import TaskReport, compute_leaves
from dasktrain.models.base import Model
from dasktrain.partial import Node, Partial, tree_reduce

logger = logging.getLogger(__name__)

__all__ = ["Engine", "PassResult", "WorkerInfo"]

#: Parameters up to this size travel inside the task; larger ones are
#: scattered once per pass (inlining big arrays into graphs is slow).
MAX_INLINE_PARAM_BYTES = 1 << 20
#: How often the engine re-reads the worker list (seconds).
WORKER_REFRESH_SECONDS = 2.0
#: Task retries on exceptions raised by a task (a killed worker is handled by
#: the scheduler's own rescheduling, not by retries).
TASK_RETRIES = 0


@dataclass(frozen=True)
class WorkerInfo:
    address: str
    name: str
    nthreads: int
    memory_limit: int


@dataclass
class PassResult:
    """A reduced partial and what it cost."""

    partial: Partial
    seconds: float
    reports: list[TaskReport] = field(default_factory=list)

    @property
    def cache_hits(self) -> int:
        return sum(r.cache_hits for r in self.reports)

    @property
    def cache_misses(self) -> int:
        return sum(r.cache_misses for r in self.reports)


class Engine:
    """Runs passes over stored data on a Dask cluster.

    Parameters
    ----------
    client:
        A connected :class:`distributed.Client`.
    cache_fraction:
        Fraction of each worker's memory limit used to keep decoded chunks
        (0 disables the cache).
    """

    def __init__(
        self, client: Client, *, cache_fraction: float = DEFAULT_CACHE_FRACTION
    ) -> None:
        self.client = client
        self.cache_fraction = cache_fraction
        self._workers: list[WorkerInfo] = []
        self._workers_at = -np.inf
        self._owners: dict[
            tuple[str, tuple[int, ...], tuple[str, ...]], dict[int, str]
        ] = {}
        # Sync point: one round trip to install the cache on every worker
        # (and on workers that join later).
        client.register_plugin(CachePlugin(cache_fraction))

    # -- cluster view ----------------------------------------------------------
    def workers(self, *, refresh: bool = False) -> list[WorkerInfo]:
        now = time.monotonic()
        if (
            refresh
            or not self._workers
            or now - self._workers_at > WORKER_REFRESH_SECONDS
        ):
            # Sync point: a scheduler round trip for the worker list.
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            self._workers = sorted(
                (
                    WorkerInfo(
                        addr,
                        str(w.get("name", addr)),
                        int(w.get("nthreads", 1)),
                        int(w.get("memory_limit") or 0),
                    )
                    for addr, w in info.items()
                ),
                key=lambda w: w.name,
            )
            self._workers_at = now
        if not self._workers:
            raise RuntimeError(f"the Dask cluster of {self.client} has no workers")
        return self._workers

    def _owners_for(self, ref: DatasetRef, chunk_ids: Sequence[int]) -> dict[int, str]:
        names = tuple(w.name for w in self.workers())
        key = (ref.url + "#" + ref.uuid, tuple(chunk_ids), names)
        owners = self._owners.get(key)
        if owners is None:
            owners = chunk_owners(ref.url, chunk_ids, names)
            self._owners = {key: owners}  # keep only the current view
        return owners

    # -- passes --------------------------------------------------------------
    def run_pass(
        self,
        ref: DatasetRef,
        model: Model,
        params: Mapping[str, np.ndarray],
        pieces: Sequence[Piece],
        *,
        placement_chunks: Sequence[int] | None = None,
        with_grads: bool = True,
        nonfinite: str = "raise",
    ) -> PassResult:
        """Sum of ``model`` partials over ``pieces`` (the tree's leaves, in order).

        ``placement_chunks`` is the dataset view's full chunk list, over which
        chunk owners are balanced (default: the pieces' chunks).
        """
        if not pieces:
            raise ValueError("a pass needs at least one piece")
        t0 = time.perf_counter()
        workers = self.workers()
        by_name = {w.name: w for w in workers}
        chunks = (
            placement_chunks
            if placement_chunks is not None
            else [p.chunk_id for p in pieces]
        )
        owners = self._owners_for(ref, chunks)
        assignment = assign_pieces(pieces, owners, list(by_name))
        n_leaves = len(pieces)

        param_arg: Any = {k: np.asarray(v) for k, v in params.items()}
        if sum(v.nbytes for v in param_arg.values()) > MAX_INLINE_PARAM_BYTES:
            # Sync point: one upload of the parameters per pass.
            param_arg = self.client.scatter(param_arg, hash=False)

        token = uuid.uuid4().hex[:12]
        futures = []
        for name, leaves in sorted(assignment.items()):
            w = by_name[name]
            for t, part in enumerate(_split(leaves, w.nthreads)):
                futures.append(
                    self.client.submit(
                        compute_leaves,
                        ref,
                        model,
                        param_arg,
                        [(leaf, pieces[leaf]) for leaf in part],
                        n_leaves,
                        with_grads=with_grads,
                        nonfinite=nonfinite,
                        key=f"dasktrain-pass-{token}-{name}-{t}",
                        workers=[w.address],
                        allow_other_workers=True,
                        retries=TASK_RETRIES,
                        pure=False,
                    )
                )
        # Sync point: wait for every task of the pass, then gather its small
        # results (one or a few partials per task).
        results = self.client.gather(futures)
        known: dict[Node, Partial] = {}
        reports: list[TaskReport] = []
        for nodes, report in results:
            known.update(nodes)
            reports.append(report)
        partial = tree_reduce(known, n_leaves)
        return PassResult(partial, time.perf_counter() - t0, reports)


def _split(leaves: list[int], n: int) -> list[list[int]]:
    """``leaves`` in ``n`` contiguous, nearly equal parts (no empty parts)."""
    n = max(1, min(n, len(leaves)))
    bounds = np.linspace(0, len(leaves), n + 1).round().astype(int)
    return [leaves[a:b] for a, b in itertools.pairwise(bounds) if b > a]
