"""Rank-to-rank messages through Dask's own comm layer.

The ranks of a segment (long-running tasks, one per worker thread; see
:mod:`dasktrain.engine.rank`) exchange nodes of the reduction tree directly,
worker to worker, the way distributed's P2P shuffle moves data: a worker
plugin installs handlers on every worker's server, and each worker keeps one
persistent comm per peer worker (opened with the worker's own connection
arguments, so TCP, TLS or UCX as the cluster is configured).  No scheduler
round trip is in a step.

Worker side, :class:`RankPlugin` installs these handlers:

``dasktrain_rank_msg``
    A message of a segment's step from one rank to another; kept in the
    segment's :class:`Mailbox` until the rank takes it.
``dasktrain_rank_abort``
    Abort a segment (sent by the client, or by a rank that failed).
``dasktrain_rank_stop``
    Ask a segment's leader (rank 0) to end it after the current step.
``dasktrain_rank_ping``
    Liveness: answered by the worker's event loop, so a worker whose rank is
    busy computing still answers, and a frozen (``SIGSTOP``) one does not.

Every message carries its segment's key (unique per attempt: see
``run_id`` in distributed's shuffle), so messages of an aborted or finished
segment are dropped, never delivered to a later one.

The rank side is :class:`RankChannel`: ``send(dst, step, payload)`` queues a
payload for another rank, ``gather(step, sources)`` waits for theirs. **No
wait is unbounded**: while waiting, the channel checks every
:data:`CHECK_SECONDS` whether the segment was aborted, whether a peer's
connection broke, whether the scheduler still lists the peer's worker, and
pings the peer; a peer that does not answer for ``peer_timeout`` seconds (a
frozen or hung process), or a step that takes longer than ``step_timeout``,
raises :class:`PeerLostError` and the segment is aborted and run again.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any

import dask.config
import numpy as np
from distributed import WorkerPlugin
from distributed.comm import connect

logger = logging.getLogger(__name__)

__all__ = [
    "CHECK_SECONDS",
    "PLUGIN_NAME",
    "ChannelTimeouts",
    "Mailbox",
    "PeerLostError",
    "RankChannel",
    "RankPlugin",
    "RankState",
    "SegmentAborted",
    "open_payload",
    "rank_state",
    "wire_payload",
]

PLUGIN_NAME = "dasktrain-ranks"
#: Handler names on every worker's server.
MSG_OP = "dasktrain_rank_msg"
ABORT_OP = "dasktrain_rank_abort"
STOP_OP = "dasktrain_rank_stop"
PING_OP = "dasktrain_rank_ping"

#: How often a waiting rank checks on its peers (seconds).
CHECK_SECONDS = 1.0
#: Time limit on one ping or one scheduler query (seconds).
PROBE_TIMEOUT_SECONDS = 2.0
#: Dask config keys of the channel's time limits, and their defaults.
PEER_TIMEOUT_KEY = "dasktrain.ranks.peer-timeout"
STEP_TIMEOUT_KEY = "dasktrain.ranks.step-timeout"
DEFAULT_PEER_TIMEOUT_SECONDS = 60.0
DEFAULT_STEP_TIMEOUT_SECONDS = 1800.0
#: Segments remembered as closed per worker (their late messages are dropped).
CLOSED_SEGMENTS_KEPT = 1024
#: Mailboxes of segments whose rank has not started yet, kept per worker.
PENDING_MAILBOXES_KEPT = 256
#: A payload for a remote rank with at most this many bytes of arrays is
#: pickled by the sending rank's thread into one bytes object (cheap for the
#: worker's event loop to write, unpickled by the receiving rank's thread);
#: a larger one goes as Dask-serialized frames (no copy into the message).
SMALL_PAYLOAD_BYTES = 256 << 10
#: The key of a pickled payload.
_PICKLED = "dasktrain-pickled"


def _array_bytes(obj: Any, limit: int) -> int:
    """Bytes of the arrays in ``obj`` (dicts, lists and tuples walked), or
    more than ``limit`` once it is passed."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        items: Iterable[Any] = obj.values()
    elif isinstance(obj, list | tuple):
        items = obj
    else:
        return 0
    total = 0
    for item in items:
        total += _array_bytes(item, limit - total)
        if total > limit:
            break
    return total


def _for_wire(obj: Any) -> Any:
    """``obj`` with its arrays marked for Dask's array serialization (frames,
    no pickle, no copy into the message)."""
    from distributed.protocol import to_serialize

    if isinstance(obj, np.ndarray):
        # (np.ascontiguousarray would make a 0-d array 1-d)
        return to_serialize(obj if obj.flags.c_contiguous else obj.copy(order="C"))
    if isinstance(obj, dict):
        return {k: _for_wire(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_for_wire(v) for v in obj]
    return obj


def wire_payload(payload: Any) -> Any:
    """How ``payload`` travels to a rank on another worker: pickled here
    when its arrays are small (:data:`SMALL_PAYLOAD_BYTES`), else with its
    arrays as serialized frames.  :func:`open_payload` undoes it."""
    if _array_bytes(payload, SMALL_PAYLOAD_BYTES) <= SMALL_PAYLOAD_BYTES:
        return {_PICKLED: pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)}
    return _for_wire(payload)


def open_payload(payload: Any) -> Any:
    """The payload a rank sent (see :func:`wire_payload`)."""
    if isinstance(payload, dict) and _PICKLED in payload:
        return pickle.loads(payload[_PICKLED])
    return payload


class SegmentAborted(RuntimeError):
    """The segment was aborted (by the client or by a failing rank)."""


class PeerLostError(RuntimeError):
    """A peer rank left, broke its connection or stopped answering.

    Attributes
    ----------
    peer : int
        The lost rank.
    address : str
        Its worker's address.
    frozen : bool
        The worker is (as far as can be told) still in the cluster but did not
        answer: the client should not place ranks on it until it answers again.
    """

    def __init__(self, message: str, *, peer: int, address: str, frozen: bool):
        super().__init__(message)
        self.peer = peer
        self.address = address
        self.frozen = frozen

    def __reduce__(self) -> tuple[Any, ...]:
        return (_peer_lost, (str(self), self.peer, self.address, self.frozen))


def _peer_lost(message: str, peer: int, address: str, frozen: bool) -> PeerLostError:
    return PeerLostError(message, peer=peer, address=address, frozen=frozen)


@dataclass(frozen=True)
class ChannelTimeouts:
    """How long a rank waits for its peers (seconds).

    ``peer_timeout``: a peer that answers neither messages nor pings for this
    long is lost (a frozen or hung worker).  ``step_timeout``: the most one
    exchange may wait even for a peer that answers pings (a rank stuck in a
    read that never returns).
    """

    peer_timeout: float = DEFAULT_PEER_TIMEOUT_SECONDS
    step_timeout: float = DEFAULT_STEP_TIMEOUT_SECONDS

    @classmethod
    def from_config(cls) -> ChannelTimeouts:
        """The limits of the Dask config of the calling process (the client:
        they travel with the segment's spec), e.g.
        ``dask.config.set({"dasktrain.ranks.peer-timeout": 10})``."""
        from dask.utils import parse_timedelta

        def seconds(key: str, default: float) -> float:
            value = dask.config.get(key, default)
            parsed = parse_timedelta(value, default="seconds")
            if parsed is None or not parsed > 0:
                raise ValueError(
                    f"dask config {key!r} must be a positive duration "
                    f"(seconds or e.g. '30s'), got {value!r}"
                )
            return float(parsed)

        return cls(
            seconds(PEER_TIMEOUT_KEY, DEFAULT_PEER_TIMEOUT_SECONDS),
            seconds(STEP_TIMEOUT_KEY, DEFAULT_STEP_TIMEOUT_SECONDS),
        )


class Mailbox:
    """The messages of one segment on one worker, by ``(step, source rank)``,
    and the segment's abort and stop flags.  Thread-safe: handlers put from
    the worker's event loop, the rank threads take."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: dict[tuple[int, int], Any] = {}
        self.aborted: str | None = None
        self.stop_requested = False

    def put(self, step: int, src: int, payload: Any) -> None:
        with self.cond:
            self.items[(step, src)] = payload
            self.cond.notify_all()

    def abort(self, reason: str) -> None:
        with self.cond:
            if self.aborted is None:
                self.aborted = reason
            self.cond.notify_all()

    def request_stop(self) -> None:
        with self.cond:
            self.stop_requested = True
            self.cond.notify_all()

    def take(
        self, keys: Sequence[tuple[int, int]], timeout: float
    ) -> dict[tuple[int, int], Any] | None:
        """The payloads of ``keys`` once all have arrived (removed from the
        box), or ``None`` after ``timeout`` seconds; raises
        :class:`SegmentAborted` if the segment is aborted."""
        with self.cond:
            self.cond.wait_for(
                lambda: self.aborted is not None or all(k in self.items for k in keys),
                timeout=timeout,
            )
            if self.aborted is not None:
                raise SegmentAborted(self.aborted)
            if not all(k in self.items for k in keys):
                return None
            return {k: self.items.pop(k) for k in keys}

    def missing(self, keys: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        with self.cond:
            return [k for k in keys if k not in self.items]


class _Outbox:
    """The persistent comm to one peer worker and a queue that keeps its
    messages in order (one writer per comm).  Lives on the worker's loop."""

    def __init__(self, state: RankState, address: str) -> None:
        self.state = state
        self.address = address
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.broken: BaseException | None = None
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        comm = None
        try:
            comm = await connect(self.address, **self.state.worker.connection_args)
            while True:
                msg = await self.queue.get()
                if msg is None:
                    break
                await comm.write(msg)
        except Exception as exc:  # the peer died or its comm broke
            self.broken = exc
            logger.info("dasktrain rank comm to %s broke: %r", self.address, exc)
        finally:
            if comm is not None:
                try:
                    await comm.close()
                except Exception:
                    comm.abort()


class RankState:
    """Per-worker state shared by every registration of :class:`RankPlugin`:
    the segments' mailboxes and the comms to peer workers."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._lock = threading.Lock()
        self._mailboxes: dict[str, Mailbox] = {}
        self._active: set[str] = set()
        self._closed: OrderedDict[str, str] = OrderedDict()
        self._outboxes: dict[str, _Outbox] = {}

    # -- on the event loop (handlers) ------------------------------------------
    def on_msg(self, seg: str, step: int, src: int, payload: Any) -> None:
        box = self._box(seg, create=True)
        if box is not None:
            box.put(int(step), int(src), payload)

    def on_abort(self, seg: str, reason: str = "aborted") -> None:
        box = self._box(seg, create=True)
        if box is not None:
            box.abort(reason)
        with self._lock:
            self._closed[seg] = reason
            self._trim_closed()

    def on_stop(self, seg: str) -> None:
        box = self._box(seg, create=True)
        if box is not None:
            box.request_stop()

    def on_ping(self, seg: str | None = None) -> dict[str, Any]:
        with self._lock:
            return {
                "active": seg in self._active,
                "closed": self._closed.get(seg) if seg is not None else None,
            }

    # -- from rank threads -----------------------------------------------------
    def open(self, seg: str) -> Mailbox:
        """The mailbox of a segment whose rank starts on this worker (messages
        that came before it are in it)."""
        with self._lock:
            if seg in self._closed:
                raise SegmentAborted(f"segment {seg} was closed: {self._closed[seg]}")
            box = self._mailboxes.get(seg)
            if box is None:
                box = self._mailboxes[seg] = Mailbox()
            self._active.add(seg)
            return box

    def close(self, seg: str, reason: str = "finished") -> None:
        """A rank of the segment ended on this worker: later messages for it
        are dropped."""
        with self._lock:
            self._mailboxes.pop(seg, None)
            self._active.discard(seg)
            self._closed.setdefault(seg, reason)
            self._trim_closed()

    def send(self, address: str, msg: dict[str, Any]) -> None:
        """Queue ``msg`` for the worker at ``address`` (in order per peer;
        returns at once).  A message to this worker is delivered directly."""
        if address == self.worker.address:
            self.on_msg(msg["seg"], msg["step"], msg["src"], msg["payload"])
            return
        self.worker.loop.add_callback(self._enqueue, address, msg)

    def send_abort(self, address: str, seg: str, reason: str) -> None:
        if address == self.worker.address:
            self.on_abort(seg, reason)
            return
        self.worker.loop.add_callback(
            self._enqueue,
            address,
            {"op": ABORT_OP, "reply": False, "seg": seg, "reason": reason},
        )

    def is_broken(self, address: str) -> bool:
        with self._lock:
            ob = self._outboxes.get(address)
            return ob is not None and ob.broken is not None

    def run_on_loop(self, coro_fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``coro_fn()`` on the worker's event loop and wait for it (at most
        ``timeout`` seconds; raises ``TimeoutError``)."""

        async def run() -> Any:
            return await asyncio.wait_for(coro_fn(), timeout)

        future = asyncio.run_coroutine_threadsafe(run(), self.worker.loop.asyncio_loop)
        try:
            return future.result(timeout + 1.0)
        except FutureTimeoutError as exc:
            future.cancel()
            raise TimeoutError(f"no answer in {timeout} s") from exc

    # -- internals -------------------------------------------------------------
    def _box(self, seg: str, *, create: bool) -> Mailbox | None:
        with self._lock:
            if seg in self._closed and seg not in self._mailboxes:
                return None  # a late message of a closed segment: dropped
            box = self._mailboxes.get(seg)
            if box is None and create:
                box = self._mailboxes[seg] = Mailbox()
                pending = [s for s in self._mailboxes if s not in self._active]
                for old in pending[:-PENDING_MAILBOXES_KEPT]:
                    del self._mailboxes[old]
            return box

    def _trim_closed(self) -> None:
        while len(self._closed) > CLOSED_SEGMENTS_KEPT:
            self._closed.popitem(last=False)

    def _enqueue(self, address: str, msg: dict[str, Any]) -> None:
        with self._lock:
            ob = self._outboxes.get(address)
            if ob is None or ob.broken is not None or ob.task.done():
                ob = self._outboxes[address] = _Outbox(self, address)
        ob.queue.put_nowait(msg)

    async def teardown(self) -> None:
        with self._lock:
            outboxes = list(self._outboxes.values())
            self._outboxes.clear()
            for box in self._mailboxes.values():
                box.abort("the worker is closing")
        for ob in outboxes:
            ob.queue.put_nowait(None)
        for ob in outboxes:
            try:
                await asyncio.wait_for(ob.task, PROBE_TIMEOUT_SECONDS)
            except Exception:
                ob.task.cancel()


#: One state per worker (by the worker object's id), kept across
#: registrations of the plugin by several clients.
_STATES: dict[int, RankState] = {}
_STATES_LOCK = threading.Lock()


def rank_state(worker: Any) -> RankState:
    """The :class:`RankState` of ``worker`` (created on first use)."""
    with _STATES_LOCK:
        state = _STATES.get(id(worker))
        if state is None or state.worker is not worker:
            state = _STATES[id(worker)] = RankState(worker)
        return state


class RankPlugin(WorkerPlugin):
    """Installs the rank handlers on every worker (and on workers that join).

    Registering it again (another client, another trainer) keeps the worker's
    mailboxes and comms.
    """

    name = PLUGIN_NAME

    def setup(self, worker: Any) -> None:
        state = rank_state(worker)
        worker.handlers[MSG_OP] = state.on_msg
        worker.handlers[ABORT_OP] = state.on_abort
        worker.handlers[STOP_OP] = state.on_stop
        worker.handlers[PING_OP] = state.on_ping

    async def teardown(self, worker: Any) -> None:
        if worker.status.name in ("closing", "closed", "closing_gracefully"):
            await rank_state(worker).teardown()


class RankChannel:
    """What a rank uses to talk to the other ranks of its segment.

    Parameters
    ----------
    state:
        The worker's :class:`RankState`.
    seg:
        The segment's key.
    rank:
        This rank's index.
    addresses:
        The worker address of every rank, by rank.
    timeouts:
        See :class:`ChannelTimeouts`.
    task_key:
        This rank's task key: if the scheduler stops wanting it (the client
        went away), the segment is abandoned.
    """

    def __init__(
        self,
        state: RankState,
        seg: str,
        rank: int,
        addresses: Sequence[str],
        timeouts: ChannelTimeouts,
        *,
        task_key: str | None = None,
    ) -> None:
        self.state = state
        self.seg = seg
        self.rank = rank
        self.addresses = list(addresses)
        self.peers = [r for r in range(len(addresses)) if r != rank]
        self.timeouts = timeouts
        self.task_key = task_key
        self.box = state.open(seg)
        self.wait_seconds = 0.0
        self._last_alive = {r: time.monotonic() for r in self.peers}
        self._last_active = dict(self._last_alive)
        self._liveness: Any = None
        self._liveness_at = time.monotonic()

    @property
    def stop_requested(self) -> bool:
        return self.box.stop_requested

    def send(self, dst: int, step: int, payload: Any) -> None:
        """Queue ``payload`` for rank ``dst`` (returns at once).  To another
        worker it travels as :func:`wire_payload` makes it; a rank on this
        worker gets the objects themselves."""
        address = self.addresses[dst]
        if address != self.state.worker.address:
            payload = wire_payload(payload)
        self.state.send(
            address,
            {
                "op": MSG_OP,
                "reply": False,
                "seg": self.seg,
                "step": step,
                "src": self.rank,
                "payload": payload,
            },
        )

    def gather(self, step: int, sources: Sequence[int]) -> dict[int, Any]:
        keys = [(step, src) for src in sources]
        if not keys:
            self._check_liveness()
            return {}
        t0 = time.monotonic()
        got = self.box.take(keys, 0.0)  # the common case: already here
        while got is None:
            got = self.box.take(keys, CHECK_SECONDS)
            if got is None:
                # A rank whose client died waits for nobody.
                self._check_liveness()
                self._check_peers(
                    step, [src for (_, src) in self.box.missing(keys)], t0
                )
        self.wait_seconds += time.monotonic() - t0
        self._check_liveness()
        return {src: open_payload(got[(step, src)]) for (_, src) in keys}

    def abort_all(self, reason: str) -> None:
        """Tell every other rank that this segment is over (best effort)."""
        for dst in self.peers:
            try:
                self.state.send_abort(self.addresses[dst], self.seg, reason)
            except Exception:  # the worker is closing
                logger.debug("could not send abort to rank %d", dst, exc_info=True)

    def close(self, reason: str = "finished") -> None:
        self.state.close(self.seg, reason)

    # -- checks while waiting ------------------------------------------------------
    def _check_peers(self, step: int, missing: Sequence[int], t0: float) -> None:
        now = time.monotonic()
        for src in missing:
            address = self.addresses[src]
            if self.state.is_broken(address):
                raise PeerLostError(
                    f"rank {src} at {address}: connection lost in step {step}",
                    peer=src,
                    address=address,
                    frozen=False,
                )
        running = self._scheduler_running([self.addresses[s] for s in missing])
        for src in missing:
            address = self.addresses[src]
            if running is not None and address not in running:
                raise PeerLostError(
                    f"rank {src} at {address}: its worker left the cluster "
                    f"(step {step})",
                    peer=src,
                    address=address,
                    frozen=False,
                )
            answer = self._ping(address)
            if answer is not None:
                if answer.get("closed") and not answer.get("active"):
                    raise PeerLostError(
                        f"rank {src} at {address} ended its part of the segment "
                        f"({answer['closed']}) before step {step}",
                        peer=src,
                        address=address,
                        frozen=False,
                    )
                if answer.get("active"):
                    self._last_alive[src] = now
                    self._last_active[src] = now
                elif now - self._last_active[src] > self.timeouts.peer_timeout:
                    # Its worker answers, but its rank never started (its
                    # task queued behind other work) or is gone.
                    raise PeerLostError(
                        f"rank {src} at {address} has not started its part of "
                        f"the segment {now - self._last_active[src]:.0f} s into "
                        f"step {step} (dasktrain.ranks.peer-timeout is "
                        f"{self.timeouts.peer_timeout:g} s)",
                        peer=src,
                        address=address,
                        frozen=False,
                    )
                else:
                    self._last_alive[src] = now
            elif (silent := time.monotonic() - self._last_alive[src]) >= (
                self.timeouts.peer_timeout
            ):
                # Measured after the unanswered ping, which took its own
                # time limit: a frozen peer is given up one ping sooner.
                raise PeerLostError(
                    f"rank {src} at {address} did not answer for "
                    f"{silent:.0f} s in step {step} "
                    f"(frozen or hung; dasktrain.ranks.peer-timeout is "
                    f"{self.timeouts.peer_timeout:g} s)",
                    peer=src,
                    address=address,
                    frozen=True,
                )
        if now - t0 > self.timeouts.step_timeout:
            src = missing[0]
            raise PeerLostError(
                f"step {step} waited {now - t0:.0f} s for rank {src} "
                f"(dasktrain.ranks.step-timeout is {self.timeouts.step_timeout:g} s)",
                peer=src,
                address=self.addresses[src],
                frozen=True,
            )

    def _ping(self, address: str) -> dict[str, Any] | None:
        worker = self.state.worker

        async def ping() -> Any:
            return await worker.rpc(address).dasktrain_rank_ping(seg=self.seg)

        try:
            return dict(self.state.run_on_loop(ping, PROBE_TIMEOUT_SECONDS))
        except Exception:
            return None

    def _scheduler_running(self, addresses: Sequence[str]) -> set[str] | None:
        """Which of ``addresses`` the scheduler lists as running workers
        (``None`` if it cannot be asked now)."""
        worker = self.state.worker

        async def ask() -> Any:
            return await worker.scheduler.ncores_running(workers=list(addresses))

        try:
            return set(self.state.run_on_loop(ask, PROBE_TIMEOUT_SECONDS))
        except Exception:
            return None

    def _check_liveness(self) -> None:
        """Every :data:`CHECK_SECONDS`, without blocking the step: is this
        rank's task still wanted by the scheduler (its client alive)?"""
        if self.task_key is None:
            return
        if self.box.aborted is not None:
            raise SegmentAborted(self.box.aborted)
        now = time.monotonic()
        if now - self._liveness_at < CHECK_SECONDS * 2:
            return
        self._liveness_at = now
        pending, self._liveness = self._liveness, None
        if pending is not None and pending.done():
            try:
                status: Mapping[str, Any] | None = pending.result()
            except Exception:  # the scheduler did not answer in time: ask again
                status = None
            state = None if status is None else status.get(self.task_key)
            if status is not None and state != "processing":
                raise SegmentAborted(
                    f"the scheduler no longer wants task {self.task_key!r} "
                    f"(state {state!r}): its client is gone"
                )
        elif pending is not None:
            self._liveness = pending
            return
        worker = self.state.worker
        key = self.task_key

        async def ask() -> Any:
            return await asyncio.wait_for(
                worker.scheduler.get_task_status(keys=[key]), PROBE_TIMEOUT_SECONDS
            )

        self._liveness = asyncio.run_coroutine_threadsafe(
            ask(), worker.loop.asyncio_loop
        )
