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
from distributed import Client, Future, wait
from distributed.client import FutureCancelledError, FuturesCancelledError
from distributed.comm.core import CommClosedError

from dasktrain.data.io import DatasetRef
from dasktrain.engine.cache import DEFAULT_CACHE_FRACTION, CachePlugin
from dasktrain.engine.plan import Piece, assign_pieces, chunk_owners
from dasktrain.engine.tasks import FAILED_LEAF_ATTRIBUTE, TaskReport, compute_leaves
from dasktrain.models.base import Model
from dasktrain.partial import Node, Partial, tree_reduce

logger = logging.getLogger(__name__)

__all__ = ["Engine", "PassResult", "WorkerInfo"]

#: Parameters up to this size travel inside the task; larger ones are
#: scattered once per pass (inlining big arrays into graphs is slow).
MAX_INLINE_PARAM_BYTES = 1 << 20
#: How long a pass waits for a worker when the cluster has none (seconds).
NO_WORKER_TIMEOUT_SECONDS = 60.0
#: How often the engine re-reads the worker list (seconds).
WORKER_REFRESH_SECONDS = 2.0
#: Task retries on exceptions raised by a task (a killed worker is handled by
#: the scheduler's own rescheduling, not by retries).
TASK_RETRIES = 0


#: Runs of a pass that lost data or a connection to a dying worker.
PASS_ATTEMPTS = 3
#: Pause before running such a pass again (times the attempt number), so the
#: scheduler has noticed the death.
LOST_WORKER_PAUSE_SECONDS = 0.5
#: What a dying worker makes a pass raise on the client: a connection closed
#: under a scatter or gather, or futures cancelled because the only copy of
#: their scattered input was lost.
LOST_WORKER_ERRORS: tuple[type[BaseException], ...] = (
    CommClosedError,
    FutureCancelledError,
    FuturesCancelledError,
)


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
            # Workers may be restarting (a killed worker, a cluster scaling):
            # wait for one rather than fail the fit.  Sync point.
            try:
                self.client.wait_for_workers(1, timeout=NO_WORKER_TIMEOUT_SECONDS)
            except TimeoutError as exc:
                raise RuntimeError(
                    f"the Dask cluster of {self.client} has had no workers for "
                    f"{NO_WORKER_TIMEOUT_SECONDS:.0f} s"
                ) from exc
            return self.workers(refresh=True)
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

        A worker that dies during the pass costs time, not results: the
        scheduler reruns its tasks elsewhere, and if it took the only copy of
        scattered parameters (or a connection) with it, the whole pass is run
        again, up to :data:`PASS_ATTEMPTS` times.  The tree, hence every bit
        of the result, stays the same.
        """
        if not pieces:
            raise ValueError("a pass needs at least one piece")
        for attempt in range(1, PASS_ATTEMPTS + 1):
            try:
                return self._run_pass_once(
                    ref,
                    model,
                    params,
                    pieces,
                    placement_chunks=placement_chunks,
                    with_grads=with_grads,
                    nonfinite=nonfinite,
                )
            except LOST_WORKER_ERRORS as exc:
                if attempt == PASS_ATTEMPTS:
                    raise
                logger.warning(
                    "a pass over %s lost a worker (%s: %s); running it again",
                    ref.url,
                    type(exc).__name__,
                    exc,
                )
                time.sleep(LOST_WORKER_PAUSE_SECONDS * attempt)
                self.workers(refresh=True)
        raise AssertionError("unreachable")

    def _run_pass_once(
        self,
        ref: DatasetRef,
        model: Model,
        params: Mapping[str, np.ndarray],
        pieces: Sequence[Piece],
        *,
        placement_chunks: Sequence[int] | None,
        with_grads: bool,
        nonfinite: str,
    ) -> PassResult:
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
            # The dict goes as one value under a fresh key: scattering the dict
            # itself would use the parameter names as keys, shared by every
            # pass, so a new pass could meet the previous pass's arrays (or
            # see them released under it).
            [param_arg] = self.client.scatter([param_arg], hash=False)

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
        try:
            results = self.client.gather(futures)
        except Exception:
            # Sync point (failures only): let the other tasks finish, so the
            # error reported does not depend on which task failed first.
            wait(futures)
            _raise_first_error(futures, n_leaves)
            raise
        known: dict[Node, Partial] = {}
        reports: list[TaskReport] = []
        for nodes, report in results:
            known.update(nodes)
            reports.append(report)
        # Partials of a diverging run may hold inf; the trainer checks the
        # reduced values and raises DivergenceError, so no warnings here.
        with np.errstate(over="ignore", invalid="ignore"):
            partial = tree_reduce(known, n_leaves)
        return PassResult(partial, time.perf_counter() - t0, reports)


def _raise_first_error(futures: Sequence[Future], n_leaves: int) -> None:
    """Re-raise the error of the failed task whose failing leaf comes first in
    tree order (a task stops at its first bad leaf), so a pass with several
    bad chunks reports the same one on any cluster.  Errors keep their type.
    """
    failed = [f for f in futures if f.status == "error"]
    if not failed:
        return
    # Sync point: fetch the exceptions of the failed tasks (small messages).
    first = min(
        failed,
        key=lambda f: getattr(f.exception(), FAILED_LEAF_ATTRIBUTE, n_leaves),
    )
    first.result()  # raises the task's exception with its remote traceback


def _split(leaves: list[int], n: int) -> list[list[int]]:
    """``leaves`` in ``n`` contiguous, nearly equal parts (no empty parts)."""
    n = max(1, min(n, len(leaves)))
    bounds = np.linspace(0, len(leaves), n + 1).round().astype(int)
    return [leaves[a:b] for a, b in itertools.pairwise(bounds) if b > a]
