"""The engine: turns "a pass over these pieces with these parameters" into
one task per worker thread and one reduced :class:`Partial` on the client.

Shape of a pass (see ARCHITECTURE.md, section 6):

1. Pieces are the leaves of a fixed reduction tree (their list order).
2. Each chunk has a stable owner (rendezvous hashing over worker names with
   bounded load), so its decoded copy stays in that worker's cache.
3. One task per worker thread computes its leaves and pre-reduces the largest
   subtrees it holds; tasks carry soft worker restrictions, so a lost
   worker's share simply runs elsewhere.  A pass that loses its scattered
   parameters, or whose tasks the scheduler strands (see
   :meth:`Engine._wait_for`), is run again.
4. The client completes the tree.  The same tree gives the same bits on any
   number of workers, in any arrival order, after any retry.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dask.config
import numpy as np
from dask.utils import parse_timedelta
from distributed import Client, Future
from distributed.client import FutureCancelledError, FuturesCancelledError
from distributed.comm.core import CommClosedError

from dasktrain.data.io import DatasetRef
from dasktrain.engine.budget import (
    GONE_STATUS,
    NO_ANSWER_STATUS,
    MemoryPlan,
    budget_of,
    memory_rows,
    refuse_unfit_plan,
    worker_memory_report,
)
from dasktrain.engine.cache import DEFAULT_CACHE_FRACTION, CachePlugin
from dasktrain.engine.comm import ChannelTimeouts
from dasktrain.engine.plan import Piece, assign_pieces, chunk_owners
from dasktrain.engine.tasks import (
    FAILED_LEAF_ATTRIBUTE,
    TaskReport,
    compute_leaves,
    compute_leaves_many,
    local_sgd_leaves,
    unpack_candidates,
)
from dasktrain.errors import MemoryBudgetError
from dasktrain.models.base import Model
from dasktrain.optim.base import Optimizer
from dasktrain.partial import Node, Partial, tree_reduce

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "Engine",
    "PassResult",
    "PassStalledError",
    "WorkerInfo",
]

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
#: How often a pass that is still running checks that its tasks can run.
STALL_CHECK_SECONDS = 2.0
#: First time limit on fetching a finished pass's results (doubled while the
#: tasks stay finished: then the fetch is slow, not lost).
GATHER_TIMEOUT_SECONDS = 10.0
#: Upper bound on how long a worker may take to answer a small query
#: (memory reports, budget declarations) before it is left out.
RUN_TIMEOUT_SECONDS = 10.0
#: Pause before running such a pass again (times the attempt number), so the
#: scheduler has noticed the death.
LOST_WORKER_PAUSE_SECONDS = 0.5
#: How long a fit waits for a worker to resume when every worker is paused
#: (Dask config ``dasktrain.memory.pause-timeout``), and how often it looks.
PAUSE_TIMEOUT_KEY = "dasktrain.memory.pause-timeout"
DEFAULT_PAUSE_TIMEOUT_SECONDS = 10.0
PAUSE_POLL_SECONDS = 0.25


class PassStalledError(RuntimeError):
    """Tasks of a pass wait in the scheduler's ``no-worker`` state while
    workers are running: they will never run (see :meth:`Engine._wait_for`)."""


#: What a dying worker makes a pass raise on the client: a connection closed
#: under a scatter or gather, futures cancelled because the only copy of
#: their scattered input was lost, or tasks stranded in ``no-worker``.
LOST_WORKER_ERRORS: tuple[type[BaseException], ...] = (
    CommClosedError,
    FutureCancelledError,
    FuturesCancelledError,
    PassStalledError,
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


def _declare_plan(plan: MemoryPlan, dask_worker: Any) -> None:
    """Size ``dask_worker``'s budget for a new fit's plan (``Client.run``)."""
    budget = budget_of(dask_worker)
    budget.reset_learned()
    budget.declare_working_set(int(dask_worker.state.nthreads) * plan.per_thread())


class Engine:
    """Runs passes over stored data on a Dask cluster.

    Parameters
    ----------
    client:
        A connected :class:`distributed.Client`.
    cache_fraction:
        Cap on each worker's decoded-chunk cache as a fraction of its memory
        limit (``None``: what the worker's memory budget has room for; 0
        disables the cache).
    """

    def __init__(
        self, client: Client, *, cache_fraction: float | None = DEFAULT_CACHE_FRACTION
    ) -> None:
        self.client = client
        self.cache_fraction = cache_fraction
        #: The workers' budgets as last asked (:meth:`memory_reports`).
        self.last_memory: dict[str, dict[str, Any]] = {}
        #: Workers left out of :attr:`last_memory`: address -> (status, why),
        #: for one asked that did not answer and one that answered the time
        #: before and has left since (:meth:`memory_summary`).
        self.last_memory_missing: dict[str, tuple[str, str]] = {}
        #: Each worker's cache counters when the fit started, ``(hits,
        #: misses)`` by consumer (chunk and shard caches; :meth:`mark_fit_start`).
        self._reads_at_start: dict[str, dict[str, tuple[int, int]]] = {}
        self._workers: list[WorkerInfo] = []
        self._workers_at = -np.inf
        self._owners: dict[
            tuple[str, tuple[int, ...], tuple[str, ...]], dict[int, str]
        ] = {}
        # Sync point: one round trip to install the cache on every worker
        # (and on workers that join later).
        client.register_plugin(CachePlugin(cache_fraction))

    # -- cluster view ----------------------------------------------------------
    def _scheduler(self) -> Any:
        """The client's connection to the scheduler (for calls that have no
        synchronous client method)."""
        rpc = self.client.scheduler
        if rpc is None:
            raise RuntimeError(f"{self.client} is not connected to a scheduler")
        return rpc

    def workers(self, *, refresh: bool = False) -> list[WorkerInfo]:
        now = time.monotonic()
        paused: list[str] = []
        if (
            refresh
            or not self._workers
            or now - self._workers_at > WORKER_REFRESH_SECONDS
        ):
            # Sync point: a scheduler round trip for the worker list.  Asked
            # directly: Client.scheduler_info() returns a cache that the
            # client's periodic refresh overwrites with a worker-less summary.
            identity = self.client.sync(self._scheduler().identity, n_workers=-1)
            info = {
                addr: w
                for addr, w in identity.get("workers", {}).items()
                if w.get("status", "running") == "running"
            }
            paused = [
                addr
                for addr, w in identity.get("workers", {}).items()
                if w.get("status") == "paused"
            ]
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
        if not self._workers and paused:
            self._wait_for_paused(paused)
            return self.workers(refresh=True)
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

    # -- memory ------------------------------------------------------------------
    def memory_reports(
        self,
        workers: Sequence[str] | None = None,
        *,
        left_out: dict[str, str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Each worker's memory budget (:func:`worker_memory_report`); paused
        workers answer too, frozen ones are left out (:meth:`run_bounded`;
        ``left_out`` gets why).  Sync point."""
        return self.run_bounded(
            worker_memory_report, workers=workers, left_out=left_out
        )

    def run_bounded(
        self,
        fn: Callable[..., Any],
        *args: Any,
        workers: Sequence[str] | None = None,
        timeout: float | None = None,
        left_out: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """``Client.run(fn, *args)`` on each of ``workers`` (default: the
        running workers), each bounded by ``timeout`` seconds (default: the
        peer timeout, at most :data:`RUN_TIMEOUT_SECONDS`): a worker that
        does not answer in time (frozen, or gone meanwhile) is left out of
        the result and logged, instead of holding the fit until it answers;
        ``left_out``, if given, gets each such worker's address and why.
        Sync point: the calls run concurrently."""
        client = self.client
        if timeout is None:
            timeout = min(
                ChannelTimeouts.from_config().peer_timeout, RUN_TIMEOUT_SECONDS
            )
        if workers is None:
            # Sync point: the worker list, asked directly (see workers()).
            identity = client.sync(self._scheduler().identity, n_workers=-1)
            addresses = list(identity.get("workers", {}))
        else:
            addresses = list(workers)

        async def one(address: str) -> tuple[str, Any, BaseException | None]:
            try:
                answer = await asyncio.wait_for(
                    client.run(fn, *args, workers=[address], asynchronous=True),
                    timeout,
                )
            except Exception as exc:
                # Frozen, gone or unreachable (or ``fn`` failed there): left
                # out, and logged below.
                return address, None, exc
            if address not in answer:
                return address, None, KeyError(address)
            return address, answer[address], None

        async def every() -> list[tuple[str, Any, BaseException | None]]:
            return list(await asyncio.gather(*(one(a) for a in addresses)))

        out: dict[str, Any] = {}
        for address, answer, exc in client.sync(every):
            if exc is None:
                out[address] = answer
            else:
                lost = isinstance(exc, TimeoutError | OSError | CommClosedError)
                if left_out is not None:
                    left_out[address] = (
                        f"no answer within {timeout:.3g} s ({type(exc).__name__})"
                        if lost
                        else f"{type(exc).__name__}: {exc}"
                    )
                logger.log(
                    logging.INFO if lost else logging.WARNING,
                    "worker %s did not answer %s within %.3g s (%s: %s); left out",
                    address,
                    getattr(fn, "__name__", fn),
                    timeout,
                    type(exc).__name__,
                    exc,
                )
        return out

    def memory_summary(self) -> dict[str, float]:
        """The workers' budgets summed up for a history row: bytes the caches
        hold and may hold, evictions and pauses so far, and the highest peak
        RSS as a fraction of its worker's limit.  The workers' own figures
        stay in :attr:`last_memory` (and those left out in
        :attr:`last_memory_missing`) for :meth:`memory_table`.  Sync point."""
        reports = self._ask_memory()
        if not reports:
            return {}
        return {
            "cache_bytes": float(sum(r["held"] for r in reports.values())),
            "cache_capacity_bytes": float(sum(r["capacity"] for r in reports.values())),
            "cache_evictions": float(sum(r["evictions"] for r in reports.values())),
            "worker_pauses": float(sum(r["pauses"] for r in reports.values())),
            "peak_rss_fraction": max(
                r["peak_rss"] / max(1, r["limit"]) for r in reports.values()
            ),
        }

    def _ask_memory(self) -> dict[str, dict[str, Any]]:
        """Every worker's budget into :attr:`last_memory`, and into
        :attr:`last_memory_missing` those asked that did not answer and those
        that answered last time and have left since.  Sync point."""
        left_out: dict[str, str] = {}
        reports = self.memory_reports(left_out=left_out)
        missing = {a: (NO_ANSWER_STATUS, why) for a, why in left_out.items()}
        seen = set(self.last_memory) | {
            a
            for a, (status, _) in self.last_memory_missing.items()
            if status != GONE_STATUS
        }
        for address in seen - set(reports) - set(missing):
            missing[address] = (GONE_STATUS, "left the cluster since the last report")
        self.last_memory = reports
        self.last_memory_missing = missing
        return reports

    def mark_fit_start(self) -> None:
        """Take the cache counters of :attr:`last_memory` (asked by
        :meth:`check_memory` when a fit starts), of the chunk cache and of the
        shard cache, as the start of the hit rates of :meth:`memory_table`."""
        self._reads_at_start = {}
        for address, report in self.last_memory.items():
            counters = {
                consumer: (int(reads["hits"]), int(reads["misses"]))
                for consumer, reads in report.get("reads_by", {}).items()
            }
            if counters:
                self._reads_at_start[address] = counters

    def memory_table(self) -> list[dict[str, Any]]:
        """The budgets as last asked (:meth:`memory_summary`,
        :meth:`check_memory`), one row per worker, workers that did not answer
        included (:func:`~dasktrain.engine.budget.memory_rows`); hit rates
        count from :meth:`mark_fit_start`."""
        return memory_rows(
            self.last_memory,
            missing=self.last_memory_missing,
            start=self._reads_at_start,
        )

    def check_memory(self, plan: MemoryPlan) -> None:
        """Refuse ``plan`` before any work if a worker cannot hold it
        (:func:`refuse_unfit_plan`), and size each worker's budget for it."""
        self.run_bounded(_declare_plan, plan)  # sync point
        refuse_unfit_plan(plan, self._ask_memory())  # sync point

    def _wait_for_paused(self, paused: Sequence[str]) -> None:
        """Every worker is paused: dasktrain's budgets drop what they keep at
        the pause, so a worker paused by dasktrain's memory resumes within a
        moment.  Wait up to ``dasktrain.memory.pause-timeout`` for one to
        resume; then say plainly what holds the memory."""
        timeout = parse_timedelta(
            dask.config.get(PAUSE_TIMEOUT_KEY, DEFAULT_PAUSE_TIMEOUT_SECONDS),
            default="s",
        )
        deadline = time.monotonic() + float(timeout or 0.0)
        while time.monotonic() < deadline:
            time.sleep(PAUSE_POLL_SECONDS)
            # Sync point: the scheduler's view of the workers' states.
            identity = self.client.sync(self._scheduler().identity, n_workers=-1)
            states = [w.get("status") for w in identity.get("workers", {}).values()]
            if "running" in states or not states:
                return
        try:
            reports = self.memory_reports(list(paused))
        except Exception:  # the workers left meanwhile: waited for as usual
            return
        lines = []
        for address, r in sorted(reports.items()):
            if r.get("status") != "paused":
                return  # resumed while being asked
            limit = int(r["limits"]["limit"])
            need = int(r["baseline_rss"]) + int(r["working_set"])
            fits = need / max(1e-9, int(r["limits"]["ceiling"]) / limit)
            lines.append(
                f"worker {address}: {r['rss'] / 2**20:.0f} MiB of its "
                f"{limit / 2**20:.0f} MiB limit, of which dasktrain keeps "
                f"{r['held'] / 2**20:.0f} MiB (it dropped its caches at the "
                f"pause); {(r['rss'] - r['held']) / 2**20:.0f} MiB are held by "
                f"the process outside dasktrain's budget (its own start-up "
                f"{r['baseline_rss'] / 2**20:.0f} MiB, task data, other "
                f"libraries); this fit needs about {need / 2**20:.0f} MiB, "
                f"which fits a limit of {fits / 2**20:.0f} MiB or more"
            )
        raise MemoryBudgetError(
            f"every worker of {self.client} has been paused by Dask for "
            f"{float(timeout or 0.0):.0f} s on memory that dasktrain cannot "
            f"release:\n  " + "\n  ".join(lines)
        )

    def _owners_for(self, ref: DatasetRef, chunk_ids: Sequence[int]) -> dict[int, str]:
        names = tuple(w.name for w in self.workers())
        key = (ref.url + "#" + ref.uuid, tuple(chunk_ids), names)
        owners = self._owners.get(key)
        if owners is None:
            owners = chunk_owners(ref.url, chunk_ids, names)
            self._owners = {key: owners}  # keep only the current view
        return owners

    def _wait_for(self, futures: Sequence[Future]) -> None:
        """Block until every task of a pass has finished or failed; re-raise
        the cancellation of a cancelled one (``FutureCancelledError``).

        While tasks are unfinished, the scheduler is asked every
        :data:`STALL_CHECK_SECONDS` for their states.  A task whose restricted
        worker left while no worker was running sits in ``no-worker``, and
        distributed does not hand it to workers that join later, loose
        restrictions or not: such a pass raises :class:`PassStalledError` (and
        is run again).
        """
        pending = list(futures)
        while pending:
            try:
                # Sync point: wait (bounded) for the first unfinished task.
                pending[0].exception(timeout=STALL_CHECK_SECONDS)
            except TimeoutError:
                self._check_stalled([f for f in pending if not f.done()])
            pending = [f for f in pending if not f.done()]
        for f in futures:
            if f.cancelled():
                f.result()  # raises the cancellation, with its reason

    def _gather(self, futures: Sequence[Future]) -> list[Any]:
        """Results of a pass's tasks (one or a few small partials each).

        A worker that dies after finishing a task but before its result is
        fetched makes the scheduler compute the task again, and that rerun
        can stall like any task (see :meth:`_wait_for`): so the fetch is
        bounded, and a fetch that times out goes back to waiting.
        """
        timeout = GATHER_TIMEOUT_SECONDS
        while True:
            self._wait_for(futures)

            async def fetch(timeout: float = timeout) -> list[Any]:
                return await asyncio.wait_for(
                    self.client.gather(futures, asynchronous=True), timeout
                )

            try:
                # Sync point: fetch the results.
                return list(self.client.sync(fetch))
            except TimeoutError:
                if all(f.done() for f in futures):
                    timeout *= 2  # slow, not lost: give it longer
                logger.info("fetching the results of a pass timed out; waiting again")

    def _check_stalled(self, pending: Sequence[Future]) -> None:
        if not pending:
            return
        # Sync point: one round trip for the states of unfinished tasks.
        states = self.client.sync(
            self._scheduler().get_task_status, keys=[f.key for f in pending]
        )
        stuck = [k for k, state in states.items() if state == "no-worker"]
        if stuck and self.workers(refresh=True):
            raise PassStalledError(
                f"{len(stuck)} task(s) of the pass wait for workers that left "
                f"(e.g. {stuck[0]!r}) while workers are running"
            )

    # -- shared machinery of passes and rounds -----------------------------------
    def retrying(self, what: str, attempt_once: Callable[[], T]) -> T:
        """Run ``attempt_once`` (a pass, round or step) until it does not lose
        a worker's data, up to :data:`PASS_ATTEMPTS` times.

        A worker that dies costs time, not results: the scheduler reruns its
        tasks elsewhere, and if it took the only copy of scattered inputs (or
        a connection) with it, the whole attempt is run again.  The tree,
        hence every bit of the result, stays the same.
        """
        for attempt in range(1, PASS_ATTEMPTS + 1):
            try:
                return attempt_once()
            except LOST_WORKER_ERRORS as exc:
                if attempt == PASS_ATTEMPTS or self.client.status != "running":
                    # Out of attempts, or the client itself gave up (a lost
                    # scheduler): report what happened.
                    raise
                logger.warning(
                    "%s lost a worker (%s: %s); running it again",
                    what,
                    type(exc).__name__,
                    exc,
                )
                time.sleep(LOST_WORKER_PAUSE_SECONDS * attempt)
                self.workers(refresh=True)
        raise AssertionError("unreachable")

    def scatter_if_large(self, value: Any, nbytes: int) -> Any:
        """``value`` itself if small (it travels inside the tasks), else a
        future of one upload (sync point).  The value goes as one piece under
        a fresh key: scattering a dict itself would use its keys as keys,
        shared by every pass, so a new pass could meet the previous pass's
        arrays (or see them released under it)."""
        if nbytes <= MAX_INLINE_PARAM_BYTES:
            return value
        [future] = self.client.scatter([value], hash=False)
        return future

    def submit_leaf_tasks(
        self,
        ref: DatasetRef,
        heads: Sequence[Piece],
        placement_chunks: Sequence[int] | None,
        kind: str,
        task: Callable[
            [list[int]], tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
        ],
    ) -> list[Future]:
        """Submit one task per worker thread over the tree's leaves.

        Leaf ``i`` (whose data is the chunk of ``heads[i]``) goes to the
        owner of that chunk, owners being balanced over ``placement_chunks``
        (the dataset view's chunks; default: the heads' chunks).  Each
        worker's leaves are split into contiguous parts, one per thread;
        ``task(part)`` gives the function and arguments of a part's task.
        Tasks carry soft restrictions, so a lost worker's part runs
        elsewhere.
        """
        workers = self.workers()
        by_name = {w.name: w for w in workers}
        chunks = (
            placement_chunks
            if placement_chunks is not None
            else [p.chunk_id for p in heads]
        )
        owners = self._owners_for(ref, chunks)
        assignment = assign_pieces(heads, owners, list(by_name))
        token = uuid.uuid4().hex[:12]
        futures = []
        for name, leaves in sorted(assignment.items()):
            w = by_name[name]
            for t, part in enumerate(_split(leaves, w.nthreads)):
                fn, args, kwargs = task(part)
                futures.append(
                    self.client.submit(
                        fn,
                        *args,
                        **kwargs,
                        key=f"dasktrain-{kind}-{token}-{name}-{t}",
                        workers=[w.address],
                        allow_other_workers=True,
                        retries=TASK_RETRIES,
                        pure=False,
                    )
                )
        return futures

    def _reduce(
        self, futures: Sequence[Future], n_leaves: int, t0: float
    ) -> PassResult:
        """Gather the tasks' tree nodes and reports; complete the tree."""
        try:
            results = self._gather(futures)
        except Exception:
            # The error reported does not depend on which task failed first.
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
        chunk owners are balanced (default: the pieces' chunks).  A lost
        worker costs time, not results (see :meth:`retrying`).
        """
        if not pieces:
            raise ValueError("a pass needs at least one piece")
        param_arg = {k: np.asarray(v) for k, v in params.items()}
        return self._leaf_pass(
            ref,
            model,
            pieces,
            placement_chunks,
            compute_leaves,
            param_arg,
            sum(v.nbytes for v in param_arg.values()),
            {"with_grads": with_grads, "nonfinite": nonfinite},
        )

    def _leaf_pass(
        self,
        ref: DatasetRef,
        model: Model,
        pieces: Sequence[Piece],
        placement_chunks: Sequence[int] | None,
        func: Callable[..., Any],
        payload: Any,
        nbytes: int,
        kwargs: dict[str, Any],
    ) -> PassResult:
        """``func(ref, model, payload, leaves, n_leaves, **kwargs)`` in one
        task per worker thread, reduced by the fixed tree, retried on lost
        workers."""

        def once() -> PassResult:
            t0 = time.perf_counter()
            # Sync point (large parameters): one upload per pass.
            shared = self.scatter_if_large(payload, nbytes)
            futures = self.submit_leaf_tasks(
                ref,
                pieces,
                placement_chunks,
                "pass",
                lambda part: (
                    func,
                    (ref, model, shared, [(i, pieces[i]) for i in part], len(pieces)),
                    kwargs,
                ),
            )
            return self._reduce(futures, len(pieces), t0)

        return self.retrying(f"a pass over {ref.url}", once)

    def run_pass_many(
        self,
        ref: DatasetRef,
        model: Model,
        params_list: Sequence[Mapping[str, np.ndarray]],
        pieces: Sequence[Piece],
        *,
        placement_chunks: Sequence[int] | None = None,
        nonfinite: str = "raise",
    ) -> list[PassResult]:
        """Like :meth:`run_pass` with gradients, at several parameter sets in
        one pass: every chunk is read once and evaluated at each set.

        Each set's partial is summed by the same tree as a pass of its own;
        the results share the pass's time and task reports.
        """
        if not params_list:
            raise ValueError("a pass needs at least one parameter set")
        if not pieces:
            raise ValueError("a pass needs at least one piece")
        param_arg = [
            {k: np.asarray(v) for k, v in params.items()} for params in params_list
        ]
        packed = self._leaf_pass(
            ref,
            model,
            pieces,
            placement_chunks,
            compute_leaves_many,
            param_arg,
            sum(v.nbytes for p in param_arg for v in p.values()),
            {"nonfinite": nonfinite},
        )
        return [
            PassResult(part, packed.seconds, packed.reports)
            for part in unpack_candidates(packed.partial, len(params_list))
        ]

    # -- local SGD rounds ------------------------------------------------------
    def run_local_round(
        self,
        ref: DatasetRef,
        model: Model,
        optimizer: Optimizer,
        params: Mapping[str, np.ndarray],
        opt_state: Mapping[str, np.ndarray],
        leaves: Sequence[Sequence[Piece]],
        *,
        placement_chunks: Sequence[int] | None = None,
        nonfinite: str = "raise",
    ) -> PassResult:
        """One round of local SGD: every leaf (the minibatches of one chunk, in
        order) runs ``optimizer`` steps from ``params`` and ``opt_state``, and
        the leaves' row-weighted parameters and float state are summed by the
        fixed tree (see :func:`dasktrain.engine.tasks.local_sgd_leaves`; the
        caller divides with :func:`dasktrain.engine.tasks.local_average`).

        Placement, retries and the tree are those of :meth:`run_pass`: one task
        per worker thread, each leaf on the owner of its chunk, parameters
        scattered when large, the same bits on any cluster.
        """
        if not leaves or any(not leaf for leaf in leaves):
            raise ValueError("a local SGD round needs leaves of at least one piece")

        def once() -> PassResult:
            t0 = time.perf_counter()
            start = {
                "params": {k: np.asarray(v) for k, v in params.items()},
                "opt_state": {k: np.asarray(v) for k, v in opt_state.items()},
            }
            nbytes = sum(v.nbytes for part in start.values() for v in part.values())
            # Sync point (large parameters): one upload per round.
            shared = self.scatter_if_large(start, nbytes)
            futures = self.submit_leaf_tasks(
                ref,
                [leaf[0] for leaf in leaves],
                placement_chunks,
                "local",
                lambda part: (
                    local_sgd_leaves,
                    (
                        ref,
                        model,
                        optimizer,
                        shared,
                        [(i, tuple(leaves[i])) for i in part],
                        len(leaves),
                    ),
                    {"nonfinite": nonfinite},
                ),
            )
            return self._reduce(futures, len(leaves), t0)

        return self.retrying(f"a local SGD round over {ref.url}", once)


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
