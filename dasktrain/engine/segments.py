"""The client side of segments: place the ranks, watch them, run a segment
again when a rank is lost.

:meth:`SegmentRunner.run` submits one rank task (see
:mod:`dasktrain.engine.rank`) per worker thread it uses, then only watches:

* step rows arrive batched through the scheduler's event log and are handed
  to ``on_rows`` (progress bar, callbacks) while the ranks train;
* a stop request (a callback set ``trainer.stop_training``, or Ctrl-C) is sent
  to the leader, which ends the segment after its current step;
* the ranks' workers are checked with the scheduler every
  :data:`WORKER_CHECK_SECONDS`; a rank whose worker left aborts the segment.

A rank that is lost (its worker killed, frozen, or gone: see
:class:`~dasktrain.engine.comm.PeerLostError`) makes the segment run again
from its start state on the workers that remain, up to
:data:`SEGMENT_ATTEMPTS` times.  The plan does not depend on the ranks, so
the rerun gives the same bits.  A rank that fails on the data (a NaN, a bad
label) fails the segment: the error of the first failing step and leaf (the
same on any cluster) is raised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client, Future, wait
from distributed.client import FutureCancelledError

from dasktrain.engine.comm import (
    ABORT_OP,
    PING_OP,
    STOP_OP,
    PeerLostError,
    RankPlugin,
    SegmentAborted,
)
from dasktrain.engine.engine import Engine, WorkerInfo
from dasktrain.engine.plan import split_contiguous
from dasktrain.engine.rank import (
    BATCH_KEY,
    FAILED_STEP_ATTRIBUTE,
    ROWS_TOPIC,
    RankResult,
    SegmentSpec,
    run_rank,
)
from dasktrain.engine.tasks import FAILED_LEAF_ATTRIBUTE

logger = logging.getLogger(__name__)

__all__ = [
    "SEGMENT_ATTEMPTS",
    "RankDivergenceError",
    "SegmentFailedError",
    "SegmentResult",
    "SegmentRunner",
    "rank_addresses",
]

#: Runs of a segment that lost a rank before the fit gives up.
SEGMENT_ATTEMPTS = 6
#: How often the client checks the ranks' workers with the scheduler.
WORKER_CHECK_SECONDS = 2.0
#: How long the client waits each time for a rank to finish (seconds).
POLL_SECONDS = 0.1
#: How long aborted ranks may take to end before the client gives up on them.
ABORT_GRACE_SECONDS = 10.0
#: Limit on fetching the ranks' results once they finished (seconds).
GATHER_TIMEOUT_SECONDS = 30.0
#: How long an interrupted segment (a callback raised, Ctrl-C) may take to
#: end after its current step before it is aborted (seconds).
INTERRUPT_GRACE_SECONDS = 30.0
#: Limit on one message from the client to a worker (abort, stop, ping).
CONTROL_TIMEOUT_SECONDS = 2.0
#: Pause before running a segment again (times the attempt number).
RERUN_PAUSE_SECONDS = 0.5
#: A worker found frozen is pinged again (to rejoin) at most this often.
SUSPECT_RECHECK_SECONDS = 5.0
#: Exceptions that mean "a rank was lost": the segment is run again.
LOST_RANK_ERRORS: tuple[type[BaseException], ...] = (
    SegmentAborted,
    PeerLostError,
    FutureCancelledError,
)


class SegmentFailedError(RuntimeError):
    """A segment lost ranks in every one of its :data:`SEGMENT_ATTEMPTS` runs."""


class RankDivergenceError(RuntimeError):
    """The ranks of a segment ended with different states (a non-deterministic
    kernel, or machines that round differently)."""


@dataclass
class SegmentResult:
    """The outcome of a segment: the leader's final state and rows, and what
    each rank did."""

    n_steps: int
    params: dict[str, np.ndarray]
    opt_state: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    diverged: str | None
    #: the error of the first leaf (in step, then leaf order) that failed:
    #: the segment ended before that step
    error: BaseException | None = None
    #: a callback's error (or Ctrl-C) met while the ranks trained: the
    #: segment ended early, to be raised once its steps are kept
    interrupted: BaseException | None = None
    ranks: list[RankResult] = field(default_factory=list)
    seconds: float = 0.0
    attempts: int = 1

    @property
    def cache_hits(self) -> int:
        return sum(r.cache_hits for r in self.ranks)

    @property
    def cache_misses(self) -> int:
        return sum(r.cache_misses for r in self.ranks)


def rank_addresses(
    workers: Sequence[WorkerInfo], n_leaves: int, max_ranks: int | None = None
) -> list[str]:
    """The worker of each rank: one rank per worker thread, at most one per
    leaf (and at most ``max_ranks``), spread over the workers first (thread
    0 of every worker, then thread 1, ...), ordered by worker name so that
    the ranks of one worker hold neighbouring leaves."""
    slots: list[WorkerInfo] = []
    for t in range(max((w.nthreads for w in workers), default=0)):
        slots.extend(w for w in workers if t < w.nthreads)
    limit = min(len(slots), n_leaves)
    if max_ranks is not None:
        limit = min(limit, max_ranks)
    chosen = slots[: max(1, limit)]
    order = {w.address: i for i, w in enumerate(workers)}
    return sorted((w.address for w in chosen), key=order.__getitem__)


class _Rows:
    """Rows that the leaders of this client's segments log, by segment key
    (one subscription per client; see :func:`_router`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: dict[str, collections.deque[dict[str, Any]]] = {}

    def handle(self, event: Any) -> None:
        _, msg = event
        if not isinstance(msg, dict):
            return
        with self.lock:
            q = self.queues.get(str(msg.get("segment")))
            if q is not None:
                q.extend(msg.get(BATCH_KEY, ()))

    def open(self, key: str) -> None:
        with self.lock:
            self.queues[key] = collections.deque()

    def drain(self, key: str) -> list[dict[str, Any]]:
        with self.lock:
            q = self.queues.get(key)
            if not q:
                return []
            out = list(q)
            q.clear()
            return out

    def close(self, key: str) -> None:
        with self.lock:
            self.queues.pop(key, None)


_ROUTERS: weakref.WeakKeyDictionary[Client, _Rows] = weakref.WeakKeyDictionary()
_ROUTERS_LOCK = threading.Lock()


def _router(client: Client) -> _Rows:
    with _ROUTERS_LOCK:
        rows = _ROUTERS.get(client)
        if rows is None:
            rows = _ROUTERS[client] = _Rows()
            # Sync point: one subscription per client.
            client.subscribe_topic(ROWS_TOPIC, rows.handle)
        return rows


class SegmentRunner:
    """Runs segments on the engine's cluster (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.client = engine.client
        # Sync point: install the rank handlers on every worker (and on
        # workers that join later).
        self.client.register_plugin(RankPlugin())
        self._rows = _router(self.client)
        #: workers that froze in a segment: not used until they answer again
        #: why segments were run again (one entry per rerun), oldest first
        self.reruns: list[str] = []
        #: the ranks of each segment that finished, oldest first
        self.rank_counts: list[int] = []
        #: workers found frozen -> when they were last asked
        self._suspects: dict[str, float] = {}

    # -- public --------------------------------------------------------------------
    def run(
        self,
        template: SegmentSpec,
        start: dict[str, dict[str, np.ndarray]],
        *,
        n_leaves: int,
        on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        rank_fn: Callable[..., RankResult] = run_rank,
        prepare: Callable[[SegmentSpec, int], SegmentSpec] | None = None,
        discard: Callable[[SegmentSpec], None] | None = None,
        max_ranks: int | None = None,
    ) -> SegmentResult:
        """Run the segment ``template`` (its ``key``, ``addresses`` and
        ``leaves`` are filled in here) from ``start``.  ``n_leaves``: leaves
        of the reduction tree the ranks share (streams, or chunks).

        ``rank_fn(spec, rank, start)`` is the rank task (default
        :func:`~dasktrain.engine.rank.run_rank`); ``prepare(spec, attempt)``,
        if given, completes each attempt's spec (e.g. a stage version for
        its writes) and ``discard(spec)`` undoes that for an attempt that
        lost a rank or failed.  ``max_ranks``: use at most that many ranks
        (the bits do not depend on it)."""
        t0 = time.perf_counter()
        token = uuid.uuid4().hex[:10]
        last_error: BaseException | None = None
        for attempt in range(1, SEGMENT_ATTEMPTS + 1):
            workers = self._usable_workers()
            addresses = rank_addresses(workers, n_leaves, max_ranks)
            leaves = tuple(
                (r.start, r.stop) for r in split_contiguous(n_leaves, len(addresses))
            )
            spec = dataclasses.replace(
                template,
                key=f"{token}-{attempt}",
                addresses=tuple(addresses),
                leaves=leaves,
            )
            if prepare is not None:
                spec = prepare(spec, attempt)
            try:
                result = self._attempt(spec, start, on_rows, stop_requested, rank_fn)
            except BaseException as exc:
                if discard is not None:
                    try:
                        discard(spec)
                    except Exception:
                        logger.warning(
                            "could not discard segment %s", spec.key, exc_info=True
                        )
                if not isinstance(exc, LOST_RANK_ERRORS):
                    raise
                last_error = exc
                self.reruns.append(f"{type(exc).__name__}: {exc}")
                if self.client.status != "running" or attempt == SEGMENT_ATTEMPTS:
                    break
                logger.warning(
                    "segment %s lost a rank (%s: %s); running it again",
                    spec.key,
                    type(exc).__name__,
                    exc,
                )
                time.sleep(RERUN_PAUSE_SECONDS * attempt)
                continue
            result.seconds = time.perf_counter() - t0
            result.attempts = attempt
            self.rank_counts.append(len(spec.addresses))
            return result
        raise SegmentFailedError(
            f"a segment of {template.store} lost ranks in {SEGMENT_ATTEMPTS} runs; "
            f"last: {type(last_error).__name__}: {last_error}"
        ) from last_error

    # -- one attempt -----------------------------------------------------------------
    def _attempt(
        self,
        spec: SegmentSpec,
        start: dict[str, dict[str, np.ndarray]],
        on_rows: Callable[[list[dict[str, Any]]], None] | None,
        stop_requested: Callable[[], bool] | None,
        rank_fn: Callable[..., RankResult] = run_rank,
    ) -> SegmentResult:
        client = self.client
        nbytes = sum(v.nbytes for part in start.values() for v in part.values())
        # Sync point (large states): one upload per attempt.
        shared = self.engine.scatter_if_large(start, nbytes)
        self._rows.open(spec.key)
        futures = [
            client.submit(
                rank_fn,
                spec,
                r,
                shared,
                key=f"dasktrain-rank-{spec.key}-{r}",
                workers=[address],
                allow_other_workers=False,
                retries=0,
                pure=False,
            )
            for r, address in enumerate(spec.addresses)
        ]
        stop_sent = False
        checked_at = time.monotonic()
        #: when each rank's worker last answered the client
        answered = dict.fromkeys(spec.addresses, checked_at)
        #: a callback's error or Ctrl-C: the leader is asked to end the
        #: segment, whose steps are kept, then it is raised
        interrupted: BaseException | None = None
        interrupted_at = math.inf
        try:
            while True:
                try:
                    pending = [f for f in futures if not f.done()]
                    if pending:
                        # Sync point: wait (bounded) for the ranks.
                        with contextlib.suppress(TimeoutError):
                            wait(
                                pending,
                                timeout=POLL_SECONDS,
                                return_when="FIRST_COMPLETED",
                            )
                    if on_rows is not None and interrupted is None:
                        rows = self._rows.drain(spec.key)
                        if rows:
                            on_rows(rows)
                except BaseException as exc:
                    if interrupted is not None:  # a second Ctrl-C: give up
                        self._abort(spec, "interrupted", futures)
                        raise
                    interrupted, interrupted_at = exc, time.monotonic()
                wants_stop = interrupted is not None or (
                    stop_requested is not None and stop_requested()
                )
                if wants_stop and not stop_sent:
                    self._control(spec.addresses[0], STOP_OP, seg=spec.key)
                    stop_sent = True
                if time.monotonic() - interrupted_at > INTERRUPT_GRACE_SECONDS:
                    assert interrupted is not None
                    self._abort(spec, "interrupted", futures)
                    raise interrupted
                if any(f.status == "error" for f in futures) or any(
                    f.cancelled() for f in futures
                ):
                    if interrupted is not None:
                        self._abort(spec, "interrupted", futures)
                        raise interrupted
                    self._fail(spec, futures)
                if all(f.status == "finished" for f in futures):
                    break
                now = time.monotonic()
                if now - checked_at >= WORKER_CHECK_SECONDS:
                    checked_at = now
                    self._check_workers(spec, futures, answered)
            results = self._gather(spec, futures, answered)
        except LOST_RANK_ERRORS:
            if interrupted is not None:
                raise interrupted from None
            raise
        finally:
            self._rows.close(spec.key)
        result = self._collect(spec, results)
        result.interrupted = interrupted
        return result

    def _gather(
        self, spec: SegmentSpec, futures: list[Future], answered: dict[str, float]
    ) -> list[RankResult]:
        """The ranks' results (the leader's holds the state), bounded: a
        worker that dies (or freezes) after its rank finished takes the
        result with it (the task would wait for that worker forever: strict
        placement), and the segment is run again."""
        client = self.client

        async def fetch() -> list[RankResult]:
            return list(
                await asyncio.wait_for(
                    client.gather(futures, asynchronous=True), POLL_SECONDS * 5
                )
            )

        deadline = time.monotonic() + GATHER_TIMEOUT_SECONDS
        while True:
            lost = [f for f in futures if f.status != "finished"]
            try:
                if lost:
                    raise CancelledError(f"{len(lost)} result(s) lost with a worker")
                # Sync point: fetch the results (bounded; the loop re-checks
                # that no result was lost meanwhile).
                return list(client.sync(fetch))
            except TimeoutError:
                self._check_answers(spec, futures, answered, done_too=True)
                if time.monotonic() < deadline:
                    continue
                exc: BaseException = TimeoutError(
                    f"no results in {GATHER_TIMEOUT_SECONDS:.0f} s"
                )
            except (OSError, CancelledError, FutureCancelledError) as error:
                exc = error
            client.cancel([f for f in futures if not f.done()])
            raise SegmentAborted(
                f"the results of segment {spec.key} were lost "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    def _collect(self, spec: SegmentSpec, results: list[RankResult]) -> SegmentResult:
        leader = results[0]
        assert leader.params is not None and leader.opt_state is not None
        sums = {r.checksum for r in results}
        if len(sums) != 1 or any(r.n_steps != leader.n_steps for r in results):
            raise RankDivergenceError(
                f"the ranks of segment {spec.key} ended with different states "
                f"({[(r.rank, r.n_steps, r.checksum[:8]) for r in results]})"
            )
        reports = [
            dataclasses.replace(r, params=None, opt_state=None, rows=[], error=None)
            for r in results
        ]
        errors = [r.error for r in results if r.error is not None]
        error = (
            min(
                errors,
                key=lambda e: (
                    getattr(e, FAILED_STEP_ATTRIBUTE, math.inf),
                    getattr(e, FAILED_LEAF_ATTRIBUTE, math.inf),
                ),
            )
            if errors
            else None
        )
        return SegmentResult(
            n_steps=leader.n_steps,
            params=leader.params,
            opt_state=leader.opt_state,
            rows=leader.rows,
            diverged=leader.diverged,
            error=error,
            ranks=reports,
        )

    # -- failures ---------------------------------------------------------------------
    def _fail(self, spec: SegmentSpec, futures: list[Future]) -> None:
        """A rank failed: abort the others; raise the data error of the first
        failing step and leaf if there is one (not run again), else a lost-rank
        error (run again)."""
        errors: list[BaseException] = []
        for f in futures:
            if f.status == "error":
                try:
                    # Sync point: the exception of a failed rank (small).
                    exc = f.exception(timeout=CONTROL_TIMEOUT_SECONDS)
                except Exception:
                    continue
                if exc is not None:
                    errors.append(exc)
        # Workers that a rank found frozen: not waited for (see _abort).
        frozen = {
            e.address for e in errors if isinstance(e, PeerLostError) and e.frozen
        }
        self._abort(spec, "a rank failed", futures, frozen=frozen)
        fatal = [e for e in errors if not isinstance(e, LOST_RANK_ERRORS)]
        if fatal:
            first = min(
                fatal,
                key=lambda e: (
                    getattr(e, FAILED_STEP_ATTRIBUTE, math.inf),
                    getattr(e, FAILED_LEAF_ATTRIBUTE, math.inf),
                ),
            )
            raise first
        lost = next((e for e in errors if isinstance(e, PeerLostError)), None)
        if lost is not None:
            raise lost
        if errors:
            raise errors[0]
        raise SegmentAborted(f"ranks of segment {spec.key} were cancelled")

    def _abort(
        self,
        spec: SegmentSpec,
        reason: str,
        futures: list[Future],
        *,
        frozen: Collection[str] = (),
    ) -> None:
        """Tell every rank's worker to abort the segment; wait (bounded) for
        the ranks to end; cancel those that do not (a frozen worker).  The
        ranks on ``frozen`` workers (found frozen by their peers) are
        cancelled at once and their workers left out until they answer."""
        for address in frozen:
            self._suspect(address)
        for address in set(spec.addresses) - set(frozen):
            self._control(address, ABORT_OP, seg=spec.key, reason=reason)
        on_frozen = [
            f
            for f, address in zip(futures, spec.addresses, strict=True)
            if address in frozen and not f.done()
        ]
        if on_frozen:
            self.client.cancel(on_frozen)
        deadline = time.monotonic() + ABORT_GRACE_SECONDS
        pending = [f for f in futures if not f.done() and f not in on_frozen]
        while pending and time.monotonic() < deadline:
            # Sync point: wait (bounded) for aborted ranks.
            with contextlib.suppress(TimeoutError):
                wait(pending, timeout=POLL_SECONDS)
            pending = [f for f in pending if not f.done()]
        if pending:
            for f, address in zip(futures, spec.addresses, strict=True):
                if not f.done():
                    self._suspect(address)
            self.client.cancel(pending)

    def _suspect(self, address: str) -> None:
        """Leave ``address`` out of segments until it answers a ping (asked
        at most every :data:`SUSPECT_RECHECK_SECONDS`)."""
        self._suspects[address] = time.monotonic()

    def _check_workers(
        self, spec: SegmentSpec, futures: list[Future], answered: dict[str, float]
    ) -> None:
        """Abort the segment if a rank's worker left the cluster (its task
        would never finish: strict placement) or has not answered the client
        for ``dasktrain.ranks.peer-timeout`` (frozen: a lone rank has no
        peer to notice)."""
        running = {w.address for w in self.engine.workers(refresh=True)}
        gone = [a for a in spec.addresses if a not in running]
        if gone:
            self._abort(spec, f"worker {gone[0]} left the cluster", futures)
            raise SegmentAborted(f"worker {gone[0]} of a rank left the cluster")
        self._check_answers(spec, futures, answered)

    def _check_answers(
        self,
        spec: SegmentSpec,
        futures: list[Future],
        answered: dict[str, float],
        *,
        done_too: bool = False,
    ) -> None:
        """Ping the workers of running ranks (``done_too``: of all ranks, whose
        results are still to be fetched); a worker silent for the peer timeout
        is frozen: abort the segment."""
        for r, (f, address) in enumerate(zip(futures, spec.addresses, strict=True)):
            if f.done() and not done_too:
                continue
            if self._control(address, PING_OP) is not None:
                answered[address] = time.monotonic()
            elif (silent := time.monotonic() - answered[address]) >= (
                spec.timeouts.peer_timeout
            ):
                # Measured after the unanswered ping (see comm._check_peers).
                self._abort(spec, f"worker {address} froze", futures, frozen={address})
                raise PeerLostError(
                    f"rank {r} at {address}: its worker did not answer the "
                    f"client for {silent:.0f} s "
                    f"(frozen or hung; dasktrain.ranks.peer-timeout is "
                    f"{spec.timeouts.peer_timeout:g} s)",
                    peer=r,
                    address=address,
                    frozen=True,
                )

    def _usable_workers(self) -> list[WorkerInfo]:
        """Running workers, less those that froze in a segment and have not
        answered since (a frozen worker answers again once it is resumed).
        If every worker is such a suspect, those that answer now; if none
        does, all of them (the segment's own checks then tell)."""
        workers = self.engine.workers(refresh=True)
        if not self._suspects:
            return workers
        running = {w.address for w in workers}
        now = time.monotonic()
        for address, since in list(self._suspects.items()):
            if address not in running:
                del self._suspects[address]
            elif now - since >= SUSPECT_RECHECK_SECONDS:
                self._recheck(address)
        usable = [w for w in workers if w.address not in self._suspects]
        if usable:
            return usable
        for address in list(self._suspects):
            self._recheck(address)
        return [w for w in workers if w.address not in self._suspects] or workers

    def _recheck(self, address: str) -> None:
        if self._control(address, PING_OP) is not None:
            del self._suspects[address]
        else:
            self._suspects[address] = time.monotonic()

    def _control(self, address: str, op: str, **msg: Any) -> Any:
        """One message from the client to a worker, bounded by
        :data:`CONTROL_TIMEOUT_SECONDS`; ``None`` if it got no answer."""
        client = self.client

        async def send() -> Any:
            return await asyncio.wait_for(
                getattr(client.rpc(address), op)(**msg), CONTROL_TIMEOUT_SECONDS
            )

        try:
            # Sync point: one small message.
            return client.sync(send)
        except Exception:
            logger.debug("no answer from %s to %s", address, op, exc_info=True)
            return None
