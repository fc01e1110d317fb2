"""Fault injection on real processes: lost workers, drivers and schedulers,
and broken storage.

Every fault is real.  Worker, driver and scheduler processes are SIGKILLed;
chunk files are truncated, overwritten or deleted; the parameter store's
destination is made read-only or full with real mounts (as root).  Every
random choice (after which step, after how long, which worker) comes from a
seeded generator, so a schedule can be replayed; when exactly a fault lands
still varies from run to run, which is the point: wherever it lands, a fit
must end with the bits of an undisturbed one.

What is guaranteed, and checked here (see ``docs/reliability.md``):

* a lost worker costs recomputation only: same parameters, same losses;
* a lost driver costs at most the steps since its last commit; the store
  always holds a complete committed version, and the next run takes over the
  dead driver's lock and finishes with the bits of an uninterrupted run;
* a lost scheduler stops the fit with an error in bounded time, and the run
  resumes on a new cluster with the same bits;
* bad data and a bad destination are reported precisely, leave the committed
  version as it was, and a retry after the repair works.

The faults injected are counted by kind and printed at the end of the module
(``faults injected: ...``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from distributed import Client
from trainer_support import assert_same_params, classification_arrays, store_files

import dasktrain as dt
from dasktrain.engine.cache import PLUGIN_NAME
from dasktrain.errors import DasktrainError, StoreError, StoreLockedError
from dasktrain.params.lock import LOCK_FILENAME, LockInfo, is_stale

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# -- the runs ------------------------------------------------------------------
#: 4,000 rows in 16 chunks; whole-chunk minibatches of 4 chunks (two leaves of
#: the reduction tree per worker), so 4 steps per epoch.
N_ROWS = 4_000
CHUNK_ROWS = 250
BATCH_ROWS = 1_000
STEPS_PER_EPOCH = N_ROWS // BATCH_ROWS
L2 = 1e-3
#: Minibatch SGD with momentum (worker and scheduler loss).
SGD_LEARNING_RATE = 0.1
SGD_MOMENTUM = 0.9
SGD_EPOCHS = 40
SGD_STEPS = SGD_EPOCHS * STEPS_PER_EPOCH
#: The reference run commits every this many steps and keeps every version,
#: so shorter runs (which are prefixes of it) compare against it too.
REFERENCE_EVERY = 20
SHORT_EPOCHS = 25  # worker loss for good / worker joins: 100 steps
SCHEDULER_EPOCHS = 15  # 60 steps
#: Driver loss: minibatch Adam, and L-BFGS on badly scaled features (so that
#: it is still iterating, not converged, when the drivers are killed).
ADAM_LEARNING_RATE = 0.05
ADAM_EPOCHS = 20
LBFGS_EPOCHS = 45
LBFGS_FEATURE_SCALES = np.logspace(-1.5, 1.5, 12, dtype=np.float32)

# -- the faults ----------------------------------------------------------------
#: Worker kills per fit, and how the fit is held back when the fault thread
#: is late (a planned fault must land during the fit, however slow the
#: machine): at ``GATE_LAG`` steps after its planned step, the fit waits for it.
KILLS_PER_FIT = 8
GATE_LAG = 12
GATE_TIMEOUT = 120.0
#: A killed worker is left alone for this many steps before the next fault.
MIN_FAULT_GAP = 8
#: Driver kills per chain (Adam, L-BFGS): the first ``len(CRASH_POINTS)``
#: after the first are at fixed points of a commit, the others at random
#: moments.  A random kill waits for 1-``MAX_STEPS_BEFORE_KILL`` commits of
#: the new driver, then a random fraction of a step.
DRIVER_KILLS = 10
CRASH_POINTS = ("mid_version", "before_root", "after_root")
MAX_STEPS_BEFORE_KILL = 3
#: Seconds a driver subprocess may take to make progress or to finish.
DRIVER_TIMEOUT = 120.0
#: Seconds the client waits for a lost scheduler to come back (the default,
#: ``distributed.comm.timeouts.connect``, is 30 s) and the bound on how long
#: a fit may run on after its scheduler was killed.
RECONNECT_SECONDS = 5
SCHEDULER_LOSS_BOUND = 60.0
CLUSTER_START_TIMEOUT = 90.0
#: Seconds a fit under worker faults may take before it counts as hung.
FIT_BOUND = 200.0
#: ... and the same for a short fit whose only worker is killed (its restart
#: takes seconds, more on a loaded machine; a fit running this long is hung).
ALL_LOST_BOUND = 60.0
STOP_TIMEOUT = 15.0
#: A SIGSTOPped worker: the peers of its rank give up on it after
#: ``FREEZE_PEER_TIMEOUT`` s (``dasktrain.ranks.peer-timeout``); it is
#: SIGCONTed ``THAW_SECONDS`` after it was stopped.
FREEZE_PEER_TIMEOUT = 3.0
THAW_SECONDS = 12.0
LOG_TAIL_CHARS = 3_000

#: Faults injected in this module, by kind (printed at the end).
FAULTS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def fault_report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Print (and save as JSON beside the tests' temporary files) how many
    faults of each kind were injected."""
    yield
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(FAULTS.items())) or "none"
    line = f"faults injected: {summary}"
    (tmp_path_factory.getbasetemp() / "faults.json").write_text(
        json.dumps(dict(FAULTS), indent=1, sort_keys=True)
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


# -- data and reference runs ---------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dt.Dataset:
    X, y = classification_arrays(N_ROWS, seed=7)
    return dt.Dataset.from_arrays(
        tmp_path_factory.mktemp("data") / "train.zarr",
        X=X,
        y=y,
        chunk_rows=CHUNK_ROWS,
    )


@pytest.fixture(scope="module")
def scaled_data(tmp_path_factory: pytest.TempPathFactory) -> dt.Dataset:
    X, y = classification_arrays(N_ROWS, seed=5)
    return dt.Dataset.from_arrays(
        tmp_path_factory.mktemp("data") / "scaled.zarr",
        X=X * LBFGS_FEATURE_SCALES,
        y=y,
        chunk_rows=CHUNK_ROWS,
    )


def sgd_trainer(path: Path, client: Any, **kwargs: Any) -> dt.Trainer:
    return dt.Trainer(
        dt.models.LogisticRegression(l2=L2),
        dt.optim.SGD(SGD_LEARNING_RATE, momentum=SGD_MOMENTUM),
        store=path,
        client=client,
        **kwargs,
    )


@dataclass(frozen=True)
class Reference:
    """An undisturbed run, with every ``REFERENCE_EVERY``-th version kept."""

    store: Path
    history: dt.History

    def params_at(self, step: int) -> dict[str, np.ndarray]:
        return dict(dt.ParamStore.open(self.store).read(step).params)

    def losses_to(self, step: int) -> list[float]:
        return losses(self.history)[:step]


def losses(history: Any) -> list[float]:
    rows = history.rows if isinstance(history, dt.History) else history
    return [float(r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def sgd_reference(
    tmp_path_factory: pytest.TempPathFactory, client: Client, data: dt.Dataset
) -> Reference:
    path = tmp_path_factory.mktemp("reference") / "sgd.zarr"
    trainer = sgd_trainer(path, client, keep_versions=SGD_STEPS // REFERENCE_EVERY)
    history = trainer.fit(
        data,
        epochs=SGD_EPOCHS,
        batch_rows=BATCH_ROWS,
        checkpoint_steps=REFERENCE_EVERY,
        progress=False,
    )
    assert len(history) == SGD_STEPS
    return Reference(path, history)


def assert_same_run(
    params: dict[str, np.ndarray],
    history: Any,
    reference: Reference,
    step: int,
    what: str,
) -> None:
    """Parameters and every loss of the run are the reference's bits."""
    assert len(history) == step, what
    assert_same_params(params, reference.params_at(step), what)
    assert losses(history) == reference.losses_to(step), f"{what}: losses differ"


# -- faults during a fit, from a background thread -----------------------------


class StepClock(dt.Callback):
    """Publishes a fit's progress to a fault thread, and holds the fit back
    at a gate until the fault planned before it has happened."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.step = 0
        self.finished = False
        self._gates: dict[int, threading.Event] = {}

    def gate(self, step: int, event: threading.Event) -> None:
        self._gates[step] = event

    def on_step_end(self, trainer: dt.Trainer, row: dict[str, Any]) -> None:
        with self._cond:
            self.step = int(row["step"])
            self._cond.notify_all()
        event = self._gates.get(self.step)
        if event is not None and not event.wait(GATE_TIMEOUT):
            raise AssertionError(
                f"the fault planned before step {self.step} did not happen in "
                f"{GATE_TIMEOUT} s"
            )

    def finish(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    def wait_for(self, step: int, timeout: float = GATE_TIMEOUT) -> bool:
        """Wait until the fit has done ``step`` steps; False if it ended
        first (or the timeout passed)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.step >= step or self.finished, timeout=timeout
            )
            return self.step >= step


@dataclass(frozen=True)
class Fault:
    """A fault planned after ``step`` steps plus ``delay`` seconds.

    ``kind``: ``"kill"`` (SIGKILL a worker; its nanny starts a new one),
    ``"lose"`` (SIGKILL a worker and remove it from the cluster for good) or
    ``"join"`` (add a worker).  ``pick`` in [0, 1) chooses the victim among
    the live workers sorted by name.
    """

    kind: str
    step: int
    delay: float
    pick: float
    among: tuple[str, ...] | None = None  # victims: these worker names only


def plan_faults(seed: int, kinds: list[str], first: int, last: int) -> list[Fault]:
    """One fault of each kind, in order, at seeded steps spread over
    ``[first, last)`` (at least ``MIN_FAULT_GAP`` steps apart), each with a
    seeded delay of up to 50 ms so that it lands inside a step."""
    rng = np.random.default_rng(seed)
    bounds = np.linspace(first, last, len(kinds) + 1).round().astype(int)
    faults = []
    for kind, (a, b) in zip(kinds, itertools.pairwise(bounds), strict=True):
        assert b - a >= MIN_FAULT_GAP, "too many faults for the run"
        step = int(rng.integers(a, b - MIN_FAULT_GAP // 2))
        faults.append(Fault(kind, step, float(rng.uniform(0, 0.05)), rng.random()))
    return faults


def running_workers(client: Client) -> dict[str, str]:
    """Name -> address of the scheduler's running workers, asked of the
    scheduler itself (``Client.scheduler_info()`` may answer from a cache)."""

    def running(dask_scheduler: Any) -> dict[str, str]:
        return {
            str(ws.name): addr
            for addr, ws in list(dask_scheduler.workers.items())
            if ws in dask_scheduler.running
        }

    result: dict[str, str] = client.run_on_scheduler(running)
    return result


class WorkerFaults:
    """Injects planned faults into a LocalCluster's workers from a background
    thread while a fit runs.  Use as a context manager; pass :attr:`clock` to
    the fit's callbacks."""

    def __init__(self, client: Client, faults: list[Fault]) -> None:
        self.cluster = client.cluster
        assert self.cluster is not None, "needs a client of a LocalCluster"
        self.watch = Client(client.scheduler.address, set_as_default=False)
        self.faults = faults
        self.clock = StepClock()
        self.done = [threading.Event() for _ in faults]
        for fault, event in zip(faults, self.done, strict=True):
            self.clock.gate(fault.step + GATE_LAG, event)
        self.killed: list[tuple[str, int]] = []
        self.frozen: list[tuple[str, int]] = []
        self._timers: list[threading.Timer] = []
        self.injected: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def __enter__(self) -> WorkerFaults:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.clock.finish()
        self._thread.join(GATE_TIMEOUT)
        for _, pid in self.frozen:
            self._thaw(pid)
        self.watch.close()

    def _run(self) -> None:
        try:
            for fault, event in zip(self.faults, self.done, strict=True):
                if not self.clock.wait_for(fault.step):
                    return
                time.sleep(fault.delay)
                getattr(self, f"_{fault.kind}")(fault)
                self.injected.append(fault.kind)
                event.set()
        except BaseException as exc:
            self.error = exc
            for event in self.done:
                event.set()  # open the gates: the test reports the error

    def live_workers(self) -> dict[str, str]:
        """Name -> address of the workers running now, waiting (bounded) for
        at least one."""
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT
        while True:
            live = running_workers(self.watch)
            if live or time.monotonic() > deadline:
                return live
            time.sleep(0.05)

    def _sigkill(self, name: str, address: str) -> None:
        pid = self.watch.run(os.getpid, workers=[address])[address]
        os.kill(pid, signal.SIGKILL)
        self.killed.append((name, pid))
        # Wait until the scheduler has noticed, so that the next fault sees
        # the cluster as it now is.
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT
        while address in self.live_workers().values():
            assert time.monotonic() < deadline, f"{address} still listed"
            time.sleep(0.02)

    def _kill(self, fault: Fault) -> None:
        # Wait for the cluster to be whole (the last victim replaced): a kill
        # then never leaves the cluster without a running worker (for that
        # case, see test_all_workers_lost_at_once).
        live = self.whole_cluster()
        names = sorted(n for n in live if fault.among is None or n in fault.among)
        name = names[int(fault.pick * len(names))]
        self._sigkill(name, live[name])

    def whole_cluster(self) -> dict[str, str]:
        """Worker name -> address, once every worker of the cluster's spec has
        registered (bounded wait)."""
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT
        while len(live := self.live_workers()) < len(self.cluster.worker_spec):
            assert time.monotonic() < deadline, "a killed worker was not replaced"
            time.sleep(0.05)
        return live

    def _freeze(self, fault: Fault) -> None:
        """SIGSTOP a worker (it stays listed by the scheduler, its sockets
        open), and SIGCONT it ``THAW_SECONDS`` later.  The workers frozen
        before are thawed first, and a worker not frozen yet is chosen."""
        for timer in self._timers:
            timer.join(THAW_SECONDS * 2)
        live = self.whole_cluster()
        before = {n for n, _ in self.frozen}
        names = sorted(n for n in live if n not in before) or sorted(live)
        name = names[int(fault.pick * len(names))]
        pid = self.watch.run(os.getpid, workers=[live[name]])[live[name]]
        os.kill(pid, signal.SIGSTOP)
        self.frozen.append((name, pid))
        timer = threading.Timer(THAW_SECONDS, self._thaw, args=(pid,))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _thaw(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def _lose(self, fault: Fault) -> None:
        # The worker started last is the one scale() removes: kill it, then
        # scale down, so that its nanny is closed instead of restarting it.
        name = str(list(self.cluster.worker_spec)[-1])
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT
        while (address := self.live_workers().get(name)) is None:
            assert time.monotonic() < deadline, f"worker {name} never came back"
            time.sleep(0.05)
        self._sigkill(name, address)
        self.cluster.scale(len(self.cluster.worker_spec) - 1)

    def _join(self, fault: Fault) -> None:
        self.cluster.scale(len(self.cluster.worker_spec) + 1)
        self.whole_cluster()


def settle(client: Client, n: int) -> dict[str, str]:
    """Wait until exactly ``n`` workers run; return their names and
    addresses."""
    deadline = time.monotonic() + CLUSTER_START_TIMEOUT
    while True:
        live = running_workers(client)
        if len(live) == n:
            return live
        assert time.monotonic() < deadline, f"{len(live)} workers run, not {n}"
        time.sleep(0.1)


class FitDidNotSurvive(AssertionError):
    """A fit under faults raised or hung instead of finishing."""


@dataclass
class Outcome:
    """How a function run in a thread ended."""

    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    hung: bool = False


def run_bounded(
    fn: Callable[[], Any], seconds: float, on_hang: Callable[[], None]
) -> Outcome:
    """Run ``fn`` in a thread for at most ``seconds``; if it is still running
    then, call ``on_hang`` (which must unblock it, e.g. by closing its
    cluster) and report it as hung."""
    outcome = Outcome()

    def target() -> None:
        try:
            outcome.value = fn()
        except BaseException as exc:
            outcome.error = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=target, name="bounded", daemon=True)
    thread.start()
    thread.join(seconds)
    outcome.seconds = time.monotonic() - t0
    if thread.is_alive():
        outcome.hung = True
        on_hang()
        thread.join(STOP_TIMEOUT)
    return outcome


def scheduler_state(client: Client) -> str:
    """The tasks and workers of a LocalCluster's scheduler (in this process),
    for the message of a hung fit."""
    scheduler = getattr(client.cluster, "scheduler", None)
    if scheduler is None:
        return "no scheduler state"
    tasks = {
        key: (ts.state, sorted(ts.worker_restrictions or ()), ts.loose_restrictions)
        for key, ts in list(scheduler.tasks.items())
    }
    workers = {a: (str(ws.status), ws.name) for a, ws in scheduler.workers.items()}
    return f"scheduler tasks {tasks}, workers {workers}"


def close_cluster(client: Client) -> Callable[[], None]:
    def close() -> None:
        with contextlib.suppress(Exception):
            client.close()
        if client.cluster is not None:
            with contextlib.suppress(Exception):
                client.cluster.close()

    return close


def fit_under_faults(
    client: Client,
    faults: list[Fault],
    path: Path,
    data: dt.Dataset,
    epochs: int,
    *,
    bound: float = FIT_BOUND,
    make_trainer: Callable[..., dt.Trainer] | None = None,
    batch_rows: int = BATCH_ROWS,
    n_streams: int | None = None,
) -> tuple[dt.Trainer, dt.History, WorkerFaults]:
    """Fit with SGD while ``faults`` are injected; raise
    :class:`FitDidNotSurvive` if the fit raises or runs longer than
    ``bound`` seconds."""
    with (
        # LocalCluster gives up on a worker that has not come back after
        # this long (15 s by default), which a slow restart can exceed.
        dask.config.set({"distributed.deploy.lost-worker-timeout": "300s"}),
        WorkerFaults(client, faults) as injector,
    ):
        trainer = (make_trainer or sgd_trainer)(path, client)

        def fit() -> dt.History:
            try:
                return trainer.fit(
                    data,
                    epochs=epochs,
                    batch_rows=batch_rows,
                    n_streams=n_streams,
                    callbacks=[injector.clock],
                    progress=False,
                )
            finally:
                injector.clock.finish()

        state: list[str] = []

        def on_hang() -> None:
            state.append(scheduler_state(client))
            close_cluster(client)()

        outcome = run_bounded(fit, bound, on_hang)
    FAULTS["worker SIGKILL"] += len(injector.killed)
    FAULTS["worker SIGSTOP"] += len(injector.frozen)
    if outcome.hung:
        raise FitDidNotSurvive(
            f"the fit hung: still running {bound:.0f} s after it started, at step "
            f"{injector.clock.step}, after {injector.injected}; {state[0]}"
        )
    if outcome.error is not None:
        raise FitDidNotSurvive(
            f"the fit raised after {injector.injected}: {outcome.error!r}"
        ) from outcome.error
    history = outcome.value
    if injector.error is not None:
        raise AssertionError("the fault thread failed") from injector.error
    if joins := injector.injected.count("join"):
        FAULTS["worker join"] += joins
    assert injector.injected == [f.kind for f in faults], (
        f"planned {[f.kind for f in faults]}, injected {injector.injected}"
    )
    return trainer, history, injector


# -- 1. worker loss ------------------------------------------------------------


@pytest.mark.parametrize("seed", [101, 102])
def test_killed_workers_cost_only_recomputation(
    tmp_path: Path,
    make_client: Callable[..., Client],
    data: dt.Dataset,
    sgd_reference: Reference,
    seed: int,
) -> None:
    """Workers SIGKILLed at random moments of a fit (their nannies start new
    ones): the fit ends with the parameters and every loss of the reference."""
    client = make_client(2)
    faults = plan_faults(
        seed, ["kill"] * KILLS_PER_FIT, 4, SGD_STEPS - GATE_LAG - MIN_FAULT_GAP
    )
    trainer, history, injector = fit_under_faults(
        client, faults, tmp_path / "run.zarr", data, SGD_EPOCHS
    )
    assert len(injector.killed) == KILLS_PER_FIT
    assert len({pid for _, pid in injector.killed}) == KILLS_PER_FIT
    assert_same_run(trainer.params, history, sgd_reference, SGD_STEPS, "killed")
    # The nannies replaced every worker killed.
    settle(client, 2)


def test_worker_lost_for_good(
    tmp_path: Path,
    make_client: Callable[..., Client],
    data: dt.Dataset,
    sgd_reference: Reference,
) -> None:
    """Two workers killed and replaced, then one killed and never replaced:
    the cluster shrinks from 2 workers to 1 and the run keeps its bits."""
    client = make_client(2)
    steps = SHORT_EPOCHS * STEPS_PER_EPOCH
    faults = plan_faults(103, ["kill", "kill", "lose"], 4, steps - GATE_LAG - 10)
    trainer, history, injector = fit_under_faults(
        client, faults, tmp_path / "run.zarr", data, SHORT_EPOCHS
    )
    assert_same_run(trainer.params, history, sgd_reference, steps, "shrunk")
    # The lost worker never came back (give its nanny the time to try).
    time.sleep(1.0)
    assert injector.killed[-1][0] not in settle(client, 1)


def test_frozen_workers_are_given_up_and_their_segments_rerun(
    tmp_path: Path,
    make_client: Callable[..., Client],
    data: dt.Dataset,
    sgd_reference: Reference,
) -> None:
    """Workers SIGSTOPped mid-segment (alive to the scheduler and the OS, but
    answering nothing): the other ranks give up on them after the peer
    timeout, the segment runs again on the workers that answer, the frozen
    ones rejoin once SIGCONTed, and the run keeps the reference's bits."""
    client = make_client(2)
    steps = SHORT_EPOCHS * STEPS_PER_EPOCH
    faults = plan_faults(105, ["freeze", "freeze"], 4, steps - GATE_LAG - 10)
    with dask.config.set({"dasktrain.ranks.peer-timeout": FREEZE_PEER_TIMEOUT}):
        trainer, history, injector = fit_under_faults(
            client, faults, tmp_path / "run.zarr", data, SHORT_EPOCHS
        )
    assert len(injector.frozen) == 2
    assert_same_run(trainer.params, history, sgd_reference, steps, "frozen")
    assert trainer._segments is not None
    reruns = trainer._segments.reruns
    # At least the first freeze costs a rerun; the second may hit a worker
    # that the segment running then does not use (the first one still frozen
    # and left out), which costs nothing.
    assert len(reruns) >= 1, reruns
    assert all("did not answer" in m for m in reruns), reruns
    # Both workers are back (none was restarted: the same processes).
    time.sleep(THAW_SECONDS)
    pids = set(client.run(os.getpid).values())
    assert {pid for _, pid in injector.frozen} <= pids


# The parameter-server path: a matrix factorization with sharded tables.
MF_USERS, MF_ITEMS, MF_RANK, MF_SHARD_ROWS = 400, 60, 3, 64
MF_EPOCHS = 12  # 48 steps


@pytest.fixture(scope="module")
def ratings(tmp_path_factory: pytest.TempPathFactory) -> dt.Dataset:
    rng = np.random.default_rng(11)
    user = np.sort(rng.integers(0, MF_USERS, N_ROWS))
    item = rng.integers(0, MF_ITEMS, N_ROWS)
    rating = (3.0 + rng.normal(size=N_ROWS)).astype(np.float32)
    return dt.Dataset.from_arrays(
        tmp_path_factory.mktemp("data") / "ratings.zarr",
        user=user,
        item=item,
        rating=rating,
        chunk_rows=CHUNK_ROWS,
    )


def mf_trainer(path: Path, client: Any, **kwargs: Any) -> dt.Trainer:
    model = dt.models.MatrixFactorization(
        MF_USERS, MF_ITEMS, MF_RANK, l2=1e-3, dtype="float64"
    )
    return dt.Trainer(
        model,
        dt.optim.Adagrad(ADAM_LEARNING_RATE * 4),
        store=path,
        client=client,
        sharded=True,
        shard_rows=MF_SHARD_ROWS,
        **kwargs,
    )


def table_values(store: Path) -> dict[str, np.ndarray]:
    """Dense parameters and sharded tables of a store's committed version."""
    ps = dt.ParamStore.open(store)
    out = dict(ps.read().params)
    for name in ps.table_layouts():
        out[name] = np.asarray(ps.table(name)[...])
    return out


@pytest.fixture(scope="module")
def mf_reference(
    tmp_path_factory: pytest.TempPathFactory, client: Client, ratings: dt.Dataset
) -> tuple[Path, dt.History]:
    path = tmp_path_factory.mktemp("reference") / "mf.zarr"
    history = mf_trainer(path, client).fit(
        ratings, epochs=MF_EPOCHS, batch_rows=BATCH_ROWS, progress=False
    )
    return path, history


def test_killed_workers_during_sharded_training(
    tmp_path: Path,
    make_client: Callable[..., Client],
    ratings: dt.Dataset,
    mf_reference: tuple[Path, dt.History],
) -> None:
    """Workers SIGKILLed while they pull rows, update shards and link
    versions: the tables end with the reference's bits."""
    reference, expected = mf_reference
    client = make_client(2)
    steps = MF_EPOCHS * (N_ROWS // BATCH_ROWS)
    faults = plan_faults(104, ["kill"] * 3, 3, steps - GATE_LAG)
    _, history, injector = fit_under_faults(
        client,
        faults,
        tmp_path / "run.zarr",
        ratings,
        MF_EPOCHS,
        make_trainer=mf_trainer,
    )
    assert len(injector.killed) == 3
    assert losses(history) == losses(expected)
    assert_same_params(
        table_values(tmp_path / "run.zarr"), table_values(reference), "sharded"
    )
    settle(client, 2)


def test_memory_reports_leave_a_frozen_worker_out(
    make_client: Callable[..., Client],
) -> None:
    """The memory reports of epoch ends and fit starts: a SIGSTOPped worker
    is left out after the peer timeout instead of holding the fit until it
    is resumed."""
    from dasktrain.engine.engine import Engine

    client = make_client(2)
    engine = Engine(client)
    addresses = sorted(settle(client, 2).values())
    pid = client.run(os.getpid, workers=[addresses[0]])[addresses[0]]
    os.kill(pid, signal.SIGSTOP)
    try:
        with dask.config.set({"dasktrain.ranks.peer-timeout": FREEZE_PEER_TIMEOUT}):
            t0 = time.monotonic()
            reports = engine.memory_reports()
            waited = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert set(reports) == {addresses[1]}
    assert reports[addresses[1]]["limit"] > 0
    assert waited < FREEZE_PEER_TIMEOUT + THAW_SECONDS, waited  # not until resumed
    assert set(engine.memory_reports()) == set(addresses)  # back once resumed


#: The frozen-worker case of the parameter server: small minibatches, so that
#: an epoch (a segment) lasts long enough for the freeze to land inside it,
#: from two streams, so that each worker runs a rank that serves shards.
FROZEN_MF_BATCH_ROWS, FROZEN_MF_EPOCHS, FROZEN_MF_STREAMS = 100, 2, 2


@pytest.fixture(scope="module")
def frozen_mf_reference(
    tmp_path_factory: pytest.TempPathFactory, client: Client, ratings: dt.Dataset
) -> tuple[Path, dt.History]:
    path = tmp_path_factory.mktemp("reference") / "mf-small-batches.zarr"
    history = mf_trainer(path, client).fit(
        ratings,
        epochs=FROZEN_MF_EPOCHS,
        batch_rows=FROZEN_MF_BATCH_ROWS,
        n_streams=FROZEN_MF_STREAMS,
        progress=False,
    )
    return path, history


def test_frozen_worker_during_sharded_training(
    tmp_path: Path,
    make_client: Callable[..., Client],
    ratings: dt.Dataset,
    frozen_mf_reference: tuple[Path, dt.History],
) -> None:
    """A worker SIGSTOPped while its rank serves table shards, in the middle
    of a segment: its peer gives up on it after the peer timeout (or the
    client does, whichever asks first), the segment's stage is discarded and
    the segment runs again from the committed version; the tables end with
    the reference's bits."""
    reference, expected = frozen_mf_reference
    client = make_client(2)
    steps_per_epoch = N_ROWS // FROZEN_MF_BATCH_ROWS
    # Early in the second epoch's segment: that segment has most of its
    # steps still to run when the worker stops.
    faults = [Fault("freeze", steps_per_epoch + 3, 0.0, 0.3)]
    with dask.config.set({"dasktrain.ranks.peer-timeout": FREEZE_PEER_TIMEOUT}):
        trainer, history, injector = fit_under_faults(
            client,
            faults,
            tmp_path / "run.zarr",
            ratings,
            FROZEN_MF_EPOCHS,
            make_trainer=mf_trainer,
            batch_rows=FROZEN_MF_BATCH_ROWS,
            n_streams=FROZEN_MF_STREAMS,
        )
    assert len(injector.frozen) == 1
    assert losses(history) == losses(expected)
    assert_same_params(
        table_values(tmp_path / "run.zarr"), table_values(reference), "frozen"
    )
    assert trainer._segments is not None
    reruns = trainer._segments.reruns
    assert reruns and all("did not answer" in m for m in reruns), reruns
    time.sleep(THAW_SECONDS)
    settle(client, 2)


def test_worker_joins_mid_fit(
    tmp_path: Path,
    make_client: Callable[..., Client],
    data: dt.Dataset,
    sgd_reference: Reference,
) -> None:
    """A third worker joins during the fit (and workers are killed before and
    after): the new worker takes chunks, and the run keeps its bits."""
    client = make_client(2)
    steps = SHORT_EPOCHS * STEPS_PER_EPOCH
    # The newcomer joins early (so the engine sees it and gives it chunks)
    # and is never killed (so that its cache tells whether it did work).
    faults = [
        dataclasses.replace(f, among=("0", "1"))
        for f in plan_faults(104, ["join", "kill", "kill"], 4, steps - GATE_LAG - 10)
    ]
    trainer, history, _ = fit_under_faults(
        client, faults, tmp_path / "run.zarr", data, SHORT_EPOCHS
    )
    assert_same_run(trainer.params, history, sgd_reference, steps, "grown")
    newcomer = settle(client, 3)["2"]
    # The newcomer read chunks (its cache saw misses): it did take work.
    misses = client.run(
        lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].cache.stats().misses,
        workers=[newcomer],
    )
    assert misses[newcomer] > 0


def test_all_workers_lost_at_once(
    tmp_path: Path,
    make_client: Callable[..., Client],
    data: dt.Dataset,
    sgd_reference: Reference,
) -> None:
    """The only worker of a cluster is killed, so that for a while no worker
    runs (its nanny starts a new one, at a new address): a lost worker still
    costs only recomputation."""
    client = make_client(1)
    steps = SCHEDULER_EPOCHS * STEPS_PER_EPOCH
    faults = plan_faults(105, ["kill"], 4, 20)
    trainer, history, _ = fit_under_faults(
        client,
        faults,
        tmp_path / "run.zarr",
        data,
        SCHEDULER_EPOCHS,
        bound=ALL_LOST_BOUND,
    )
    assert_same_run(trainer.params, history, sgd_reference, steps, "all lost")


# -- 2. driver loss ------------------------------------------------------------

#: The driver: a fork server that imports dasktrain once, then runs each job
#: (one line of JSON on stdin) in a forked child process, which connects to
#: the cluster, opens the dataset and calls ``Trainer(...).fit(...)`` with
#: ``checkpoint_steps=1``: every driver runs the same script on the same
#: store.  The server reports ``{"started": pid}`` and ``{"exited": pid,
#: "code": ...}`` on stdout; a child logs to its job's log file.  A job may
#: ask its child to SIGKILL itself at a point of its second commit, in the
#: lowest-level file write of zarr's LocalStore: ``"mid_version"`` (the
#: version half written), ``"before_root"`` (the version written, the root
#: metadata not yet replaced) or ``"after_root"`` (the root replaced, the
#: oldest version not yet deleted).
DRIVER_SCRIPT = """
import json, logging, os, signal, sys, traceback

import dasktrain as dt

CRASH_COMMIT = 2


def arm_crash(point, store):
    import zarr.storage._local as local

    root_json = os.path.join(os.path.abspath(store), "zarr.json")
    original = local._put
    commits = [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def put(path, value, exclusive=False):
        path_text = str(path)
        if path_text == root_json and not exclusive:
            # A commit's one replacement of the root metadata (zarr also
            # writes it with exclusive=True, a no-op, for implicit parents).
            commits[0] += 1
            if point == "before_root" and commits[0] == CRASH_COMMIT:
                die()
            written = original(path, value, exclusive=exclusive)
            if point == "after_root" and commits[0] == CRASH_COMMIT:
                die()
            return written
        if (
            point == "mid_version"
            and commits[0] == CRASH_COMMIT - 1
            and "/opt/" in path_text
        ):
            die()
        return original(path, value, exclusive=exclusive)

    local._put = put


def run(job):
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if job.get("crash"):
        arm_crash(job["crash"], job["store"])
    data = dt.Dataset.open(job["data"])
    extra = {}
    if job["optimizer"] == "sharded":
        model = dt.models.MatrixFactorization(*job["mf"], l2=1e-3, dtype="float64")
        optimizer = dt.optim.Adagrad(job["learning_rate"] * 4)
        extra = {"sharded": True, "shard_rows": job["shard_rows"]}
    elif job["optimizer"] == "adam":
        model = dt.models.LogisticRegression(l2=job["l2"])
        optimizer = dt.optim.Adam(job["learning_rate"])
    else:
        model = dt.models.LogisticRegression(l2=job["l2"])
        optimizer = dt.optim.LBFGS()
    with dt.Trainer(
        model,
        optimizer,
        store=job["store"],
        client=job["address"],
        seed=job["seed"],
        **extra,
    ) as trainer:
        trainer.fit(
            data,
            epochs=job["epochs"],
            batch_rows=job["batch_rows"],
            checkpoint_steps=1,
            progress=False,
        )


for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 0
        try:
            run(job)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"started": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    print(json.dumps({"exited": pid, "code": code}), flush=True)
"""


class DriverServer:
    """The fork server of driver processes (see ``DRIVER_SCRIPT``)."""

    def __init__(self, directory: Path) -> None:
        script = directory / "driver.py"
        script.write_text(DRIVER_SCRIPT)
        self.directory = directory
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(directory / "server.log", "wb"),  # noqa: SIM115
            text=True,
            cwd=directory,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.n_jobs = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def _message(self, key: str, timeout: float) -> dict[str, Any]:
        try:
            msg: dict[str, Any] = json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(
                f"the driver server said nothing for {timeout} s:\n"
                f"{log_tail(self.directory / 'server.log')}"
            ) from None
        assert key in msg, msg
        return msg

    def start(self, **job: Any) -> tuple[int, Path]:
        """Start a driver; return its pid and its log file."""
        self.n_jobs += 1
        log = self.directory / f"driver-{self.n_jobs}.log"
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({**job, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return int(self._message("started", DRIVER_TIMEOUT)["started"]), log

    def wait(self, pid: int, timeout: float = DRIVER_TIMEOUT) -> int:
        """Wait for the driver to exit; its exit code (-9: SIGKILL)."""
        msg = self._message("exited", timeout)
        assert msg["exited"] == pid, msg
        return int(msg["code"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def drivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriverServer]:
    server = DriverServer(tmp_path_factory.mktemp("drivers"))
    yield server
    server.close()


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except FileNotFoundError:
        return "(no log)"


def root_marker(store: Path) -> tuple[int, int] | None:
    """Identity of the store's root metadata file, replaced by every commit."""
    try:
        st = os.stat(store / "zarr.json")
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def commit_debris(store: Path) -> list[str]:
    """What an interrupted commit left: version directories not listed as
    committed, and zarr's temporary files."""
    listed = {str(v) for v in dt.ParamStore.open(store).versions}
    debris = [
        f"versions/{name}"
        for name in os.listdir(store / "versions")
        if name != "zarr.json" and name not in listed
    ]
    for directory, _, files in os.walk(store):
        debris += [
            os.path.relpath(os.path.join(directory, f), store)
            for f in files
            if f.endswith(".partial")
        ]
    return sorted(debris)


def check_consistent(store: Path) -> dt.ParamStore:
    """The store holds a complete, finite committed version (and every kept
    version is readable); its meta describes that version."""
    ps = dt.ParamStore.open(store)
    assert ps.committed is not None
    for step in ps.versions:
        version = ps.read(step)
        for name, value in {**version.params, **version.opt_state}.items():
            assert np.all(np.isfinite(value)), f"version {step}: {name} not finite"
    meta = ps.meta
    assert meta["progress"]["step"] == ps.committed
    assert len(meta["history"]) == ps.committed
    assert [r["step"] for r in meta["history"]] == list(range(1, ps.committed + 1))
    return ps


@dataclass(frozen=True)
class DriverRun:
    """One kind of run driven by the driver subprocesses."""

    name: str
    optimizer: str
    epochs: int
    batch_rows: int | None

    def job(self, store: Path, data: dt.Dataset, address: str) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "learning_rate": ADAM_LEARNING_RATE,
            "l2": L2,
            "seed": 0,
            "epochs": self.epochs,
            "batch_rows": self.batch_rows,
            "store": str(store),
            "data": str(data.path),
            "address": address,
            "mf": [MF_USERS, MF_ITEMS, MF_RANK],
            "shard_rows": MF_SHARD_ROWS,
        }

    def trainer(self, store: Path, client: Client) -> dt.Trainer:
        if self.optimizer == "sharded":
            return mf_trainer(store, client)
        optimizer = (
            dt.optim.Adam(ADAM_LEARNING_RATE)
            if self.optimizer == "adam"
            else dt.optim.LBFGS()
        )
        return dt.Trainer(
            dt.models.LogisticRegression(l2=L2), optimizer, store=store, client=client
        )


DRIVER_RUNS = [
    DriverRun("adam", "adam", ADAM_EPOCHS, BATCH_ROWS),
    DriverRun("lbfgs", "lbfgs", LBFGS_EPOCHS, None),
    DriverRun("sharded", "sharded", MF_EPOCHS, BATCH_ROWS),
]


def wait_for_commits(store: Path, n: int, pid: int, log: Path) -> list[float]:
    """Wait until the driver ``pid`` has made ``n`` more commits; return the
    times (monotonic) at which they were seen."""
    seen: list[float] = []
    marker = root_marker(store)
    deadline = time.monotonic() + DRIVER_TIMEOUT
    while len(seen) < n:
        assert time.monotonic() < deadline, (
            f"driver {pid} made no progress:\n{log_tail(log)}"
        )
        assert is_running(pid), f"driver {pid} exited early:\n{log_tail(log)}"
        now = root_marker(store)
        if now != marker:
            seen.append(time.monotonic())
            marker = now
        time.sleep(0.002)
    return seen


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("run", DRIVER_RUNS, ids=lambda r: r.name)
def test_killed_drivers_lose_at_most_the_uncommitted_step(
    tmp_path: Path,
    client: Client,
    drivers: DriverServer,
    data: dt.Dataset,
    scaled_data: dt.Dataset,
    ratings: dt.Dataset,
    run: DriverRun,
) -> None:
    """A chain of driver processes, each SIGKILLed (at a random moment, or at
    a fixed point of a commit) and the next one running the same script on
    the same store; a last, uninterrupted driver finishes the run with the
    bits of an uninterrupted reference run."""
    dataset = {"adam": data, "lbfgs": scaled_data, "sharded": ratings}[run.optimizer]
    reference = run.trainer(tmp_path / "reference.zarr", client)
    expected = reference.fit(
        dataset, epochs=run.epochs, batch_rows=run.batch_rows, progress=False
    )
    store = tmp_path / "run.zarr"
    job = run.job(store, dataset, client.scheduler.address)
    rng = np.random.default_rng(
        {"adam": 202, "lbfgs": 203, "sharded": 204}[run.optimizer]
    )
    with contextlib.ExitStack() as cleanup:
        # A driver still running when a check fails is killed (its pid is
        # not reused meanwhile: the server has not reaped it yet).
        unreaped: set[int] = set()
        cleanup.callback(lambda: [kill_if_running(pid) for pid in unreaped])
        mid_commit = kill_chain(drivers, job, store, rng, unreaped)
        FAULTS["driver SIGKILL inside a commit"] += mid_commit
        pid, log = drivers.start(**job, crash=None)
        unreaped.add(pid)
        assert drivers.wait(pid) == 0, log_tail(log)
        unreaped.discard(pid)
    ps = check_consistent(store)
    assert ps.meta["status"] == "finished"
    assert ps.lock_holder() is None
    assert commit_debris(store) == []
    if run.optimizer == "sharded":
        assert_same_params(
            table_values(store), table_values(tmp_path / "reference.zarr"), run.name
        )
    else:
        assert_same_params(dict(ps.read().params), reference.params, run.name)
    assert losses(ps.meta["history"]) == losses(expected)


def kill_if_running(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kill_chain(
    drivers: DriverServer,
    job: dict[str, Any],
    store: Path,
    rng: np.random.Generator,
    unreaped: set[int],
) -> int:
    """Start ``DRIVER_KILLS`` drivers one after the other, each killed, and
    check the store after each; return how many kills left commit debris."""
    committed = 0
    mid_commit = 0
    previous_pid = None
    for i in range(DRIVER_KILLS):
        crash = CRASH_POINTS[i - 1] if 1 <= i <= len(CRASH_POINTS) else None
        pid, log = drivers.start(**job, crash=crash)
        unreaped.add(pid)
        if crash is None:
            # Random moment: after 1-3 commits of this driver (2 more for the
            # first, which also creates the store and commits step 0), a
            # random fraction of a step later.
            n = int(rng.integers(1, MAX_STEPS_BEFORE_KILL + 1)) + (2 if i == 0 else 0)
            seen = wait_for_commits(store, n, pid, log)
            step_seconds = seen[-1] - seen[-2] if len(seen) > 1 else 0.05
            time.sleep(float(rng.uniform(0, 1)) * step_seconds)
            os.kill(pid, signal.SIGKILL)
        code = drivers.wait(pid)
        unreaped.discard(pid)
        assert code == -signal.SIGKILL, (
            f"driver {i} exited with {code}:\n{log_tail(log)}"
        )
        FAULTS["driver SIGKILL"] += 1

        ps = check_consistent(store)
        assert ps.committed is not None and ps.committed >= committed
        assert ps.meta["status"] == "running"
        debris = commit_debris(store)
        if crash is not None:
            # The crash point was reached: the commit left its traces.
            assert debris, f"no trace of a commit killed at {crash}"
            if crash == "after_root":
                assert ps.committed == committed + 2
            else:
                assert ps.committed == committed + 1
        mid_commit += bool(debris)
        # The dead driver's lock is still there, and is stale.
        holder = ps.lock_holder()
        assert holder is not None and holder.pid == pid
        assert holder.host == socket.gethostname() and is_stale(holder)
        if previous_pid is not None:
            # This driver took over the lock its killed predecessor left.
            assert f"pid {previous_pid} on host" in log.read_text(), log_tail(log)
        previous_pid = pid
        committed = ps.committed
    return mid_commit


# -- 3. scheduler loss -----------------------------------------------------------


def dask_command(command: str) -> list[str]:
    """``dask scheduler`` / ``dask worker`` of this interpreter's environment."""
    script = Path(sys.executable).with_name("dask")
    if script.exists():
        return [str(script), command]
    return [sys.executable, "-m", f"distributed.cli.dask_{command}"]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process group we started, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)


@dataclass
class CliCluster:
    """A ``dask scheduler`` and ``dask worker`` processes."""

    directory: Path
    scheduler: subprocess.Popen[bytes]
    address: str


@contextlib.contextmanager
def cli_cluster(directory: Path, n_workers: int = 2) -> Iterator[CliCluster]:
    """Start a scheduler and ``n_workers`` workers on 127.0.0.1 (each its own
    process group); stop them all on exit."""
    directory.mkdir()
    scheduler_file = directory / "scheduler.json"
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(directory / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=directory,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    try:
        scheduler = start(
            "scheduler",
            [
                *dask_command("scheduler"), "--host", "127.0.0.1", "--port", "0",
                "--no-dashboard", "--scheduler-file", str(scheduler_file),
            ],
        )  # fmt: skip
        for i in range(n_workers):
            start(
                f"worker-{i}",
                [
                    *dask_command("worker"), "--scheduler-file", str(scheduler_file),
                    "--host", "127.0.0.1", "--name", f"cli-worker-{i}",
                    "--nthreads", "1", "--memory-limit", "1GiB", "--no-dashboard",
                    "--local-directory", str(directory / f"worker-{i}"),
                ],
            )  # fmt: skip
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, log_tail(directory / "scheduler.log")
            time.sleep(0.1)
        address = ""
        while not address:
            with contextlib.suppress(json.JSONDecodeError, KeyError):
                address = str(json.loads(scheduler_file.read_text())["address"])
            time.sleep(0.05)
        with Client(
            address, set_as_default=False, timeout=CLUSTER_START_TIMEOUT
        ) as watch:
            watch.wait_for_workers(n_workers, timeout=CLUSTER_START_TIMEOUT)
        yield CliCluster(directory, scheduler, address)
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_lost_scheduler(
    tmp_path: Path, data: dt.Dataset, sgd_reference: Reference
) -> None:
    """The scheduler is SIGKILLed mid-fit: the fit raises in bounded time,
    the store holds the steps done, and the run resumes on a new cluster with
    the bits of an undisturbed one."""
    steps = SCHEDULER_EPOCHS * STEPS_PER_EPOCH
    rng = np.random.default_rng(301)
    kill_after = int(rng.integers(steps // 4, steps // 2))
    delay = float(rng.uniform(0, 0.05))
    store = tmp_path / "run.zarr"
    clock = StepClock()
    killed_at: list[float] = []

    with cli_cluster(tmp_path / "first") as first:
        # How long the client waits for a lost scheduler to come back.
        with dask.config.set(
            {"distributed.comm.timeouts.connect": f"{RECONNECT_SECONDS}s"}
        ):
            trainer = sgd_trainer(store, first.address)

        def kill_scheduler() -> None:
            if clock.wait_for(kill_after):
                time.sleep(delay)
                first.scheduler.send_signal(signal.SIGKILL)
                killed_at.append(time.monotonic())

        def fit() -> dt.History:
            try:
                return trainer.fit(
                    data,
                    epochs=SCHEDULER_EPOCHS,
                    batch_rows=BATCH_ROWS,
                    checkpoint_steps=1,
                    callbacks=[clock],
                    progress=False,
                )
            finally:
                clock.finish()

        killer = threading.Thread(target=kill_scheduler, daemon=True)
        killer.start()
        started = time.monotonic()
        outcome = run_bounded(fit, FIT_BOUND, trainer.close)
        killer.join(STOP_TIMEOUT)
        trainer.close()
    assert killed_at, f"the fit ended before step {kill_after}: {outcome}"
    FAULTS["scheduler SIGKILL"] += 1
    after_kill = started + outcome.seconds - killed_at[0]
    assert not outcome.hung, f"the fit still ran {after_kill:.0f} s after the kill"
    assert outcome.error is not None, "the fit finished without its scheduler"
    assert after_kill < SCHEDULER_LOSS_BOUND

    # Every step done is committed (the row of a segment's last step reaches
    # the callbacks while its checkpoint is being written); the lock was
    # released.
    ps = check_consistent(store)
    assert kill_after - 1 <= ps.committed < steps
    assert ps.meta["status"] == "running"
    assert ps.lock_holder() is None

    with cli_cluster(tmp_path / "second") as second:
        resumed = dt.Trainer.resume(store, client=second.address)
        history = resumed.fit(
            data,
            epochs=SCHEDULER_EPOCHS,
            batch_rows=BATCH_ROWS,
            checkpoint_steps=1,
            progress=False,
        )
        assert_same_run(resumed.params, history, sgd_reference, steps, "resumed")
        resumed.close()

    # What the user was told: a scheduler or connection error, or ours (not,
    # say, a ValueError from a code path that assumed a live client).
    error = outcome.error
    assert isinstance(
        error, DasktrainError | OSError | CancelledError | TimeoutError
    ), f"losing the scheduler raised {type(error).__name__}: {error}"


# -- 4. storage faults -----------------------------------------------------------

STORAGE_ROWS = 2_000
STORAGE_EPOCHS = 3
BAD_CHUNK = 3
#: Free bytes left on the full destination: the lock file and a few files of
#: the next version fit, the whole version does not.
FULL_HEADROOM = 24 * 1024
TMPFS_SIZE = "2M"


def storage_dataset(path: Path) -> dt.Dataset:
    X, y = classification_arrays(STORAGE_ROWS, seed=11)
    return dt.Dataset.from_arrays(path, X=X, y=y, chunk_rows=CHUNK_ROWS)


def storage_trainer(path: Path, client: Client) -> dt.Trainer:
    """Full-batch Adam without the worker chunk cache, so that every pass
    reads the chunk files."""
    return dt.Trainer(
        dt.models.LogisticRegression(l2=L2),
        dt.optim.Adam(0.1),
        store=path,
        client=client,
        cache_fraction=0.0,
    )


@pytest.fixture(scope="module")
def storage_reference(
    tmp_path_factory: pytest.TempPathFactory, client: Client
) -> dict[str, np.ndarray]:
    root = tmp_path_factory.mktemp("storage")
    trainer = storage_trainer(root / "run.zarr", client)
    trainer.fit(
        storage_dataset(root / "clean.zarr"), epochs=STORAGE_EPOCHS, progress=False
    )
    return trainer.params


def assert_fault_reported(
    tmp_path: Path,
    client: Client,
    reference: dict[str, np.ndarray],
    *,
    inject: Callable[[dt.Dataset, Path], None],
    repair: Callable[[dt.Dataset, Path], None],
    error: type[BaseException],
    patterns: Callable[[dt.Dataset, Path], list[str]],
    destination: Path | None = None,
) -> None:
    """Commit one epoch, inject a fault, check that the next fit fails with
    ``error`` naming what ``patterns`` lists and leaves the store as it was,
    repair, and check that the retry finishes the reference run."""
    data = storage_dataset(tmp_path / "data.zarr")
    path = (destination or tmp_path) / "run.zarr"
    storage_trainer(path, client).fit(data, epochs=1, progress=False)
    before = store_files(path)
    inject(data, path)
    with pytest.raises(error) as info:
        storage_trainer(path, client).fit(data, epochs=STORAGE_EPOCHS, progress=False)
    message = str(info.value)
    for pattern in patterns(data, path):
        assert pattern in message, f"{pattern!r} not in: {message}"
    # The committed version is untouched, and nobody holds the lock.
    assert store_files(path) == before
    ps = dt.ParamStore.open(path)
    assert ps.committed == 1 and ps.lock_holder() is None
    repair(data, path)
    trainer = storage_trainer(path, client)
    trainer.fit(data, epochs=STORAGE_EPOCHS, progress=False)
    assert_same_params(trainer.params, reference, "after the repair")


def chunk_file(data: dt.Dataset) -> Path:
    return Path(data.path) / "X" / "c" / str(BAD_CHUNK) / "0"


@dataclass(frozen=True)
class ChunkFault:
    name: str
    mutate: Callable[[bytes], bytes | None]  # None: delete the file


CHUNK_FAULTS = [
    pytest.param(ChunkFault("truncated", lambda b: b[: len(b) // 2])),
    pytest.param(
        ChunkFault(
            "overwritten",
            lambda b: (
                b[: len(b) // 2]
                + bytes(x ^ 0x5A for x in b[len(b) // 2 :][:64])
                + b[len(b) // 2 + 64 :]
            ),
        )
    ),
    pytest.param(ChunkFault("header overwritten", lambda b: bytes(16) + b[16:])),
    pytest.param(ChunkFault("deleted", lambda b: None)),
]


@pytest.mark.parametrize("fault", CHUNK_FAULTS, ids=lambda f: f.name)
def test_bad_chunk_is_named(
    tmp_path: Path,
    client: Client,
    storage_reference: dict[str, np.ndarray],
    fault: ChunkFault,
) -> None:
    """A truncated, overwritten or deleted chunk file of the training data."""
    saved: dict[str, bytes] = {}

    def inject(data: dt.Dataset, _: Path) -> None:
        path = chunk_file(data)
        saved["bytes"] = path.read_bytes()
        FAULTS[f"chunk {fault.name}"] += 1
        new = fault.mutate(saved["bytes"])
        if new is None:
            path.unlink()
        else:
            path.write_bytes(new)

    def repair(data: dt.Dataset, _: Path) -> None:
        chunk_file(data).write_bytes(saved["bytes"])

    assert_fault_reported(
        tmp_path,
        client,
        storage_reference,
        inject=inject,
        repair=repair,
        error=StoreError,
        patterns=lambda data, _: [f"chunk {BAD_CHUNK}", "'X'", str(data.path)],
    )


def garble(path: Path) -> bytes:
    """Overwrite the middle of a JSON file with non-JSON; return the original."""
    original = path.read_bytes()
    middle = len(original) // 2
    path.write_bytes(original[:middle] + b"{{{ not json" + original[middle + 12 :])
    return original


def test_garbled_dataset_metadata(
    tmp_path: Path, client: Client, storage_reference: dict[str, np.ndarray]
) -> None:
    """Unreadable ``zarr.json`` files of a dataset: at open (the group's and
    an array's), and the group's during a fit."""
    data = storage_dataset(tmp_path / "opened.zarr")
    for target, named in (("zarr.json", None), ("X/zarr.json", "'X'")):
        original = garble(Path(data.path) / target)
        FAULTS["dataset zarr.json garbled"] += 1
        with pytest.raises(StoreError) as info:
            dt.Dataset.open(data.path)
        message = str(info.value)
        assert str(data.path) in message and "JSONDecodeError" in message, message
        assert named is None or named in message, message
        (Path(data.path) / target).write_bytes(original)
        assert dt.Dataset.open(data.path).n_rows == STORAGE_ROWS

    saved: dict[str, bytes] = {}

    def inject(data: dt.Dataset, _: Path) -> None:
        saved["bytes"] = garble(Path(data.path) / "zarr.json")
        FAULTS["dataset zarr.json garbled"] += 1

    def repair(data: dt.Dataset, _: Path) -> None:
        (Path(data.path) / "zarr.json").write_bytes(saved["bytes"])

    assert_fault_reported(
        tmp_path / "mid-fit",
        client,
        storage_reference,
        inject=inject,
        repair=repair,
        error=StoreError,
        patterns=lambda data, _: [str(data.path), "JSONDecodeError"],
    )


def run_quiet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )


def unmount(directory: Path) -> None:
    if run_quiet("umount", str(directory)).returncode != 0:
        run_quiet("umount", "-l", str(directory))


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[str]:
    """Make ``directory`` read-only, even for root: a read-only bind mount of
    it on itself, else ``chattr +i`` on everything in it, else ``chmod`` (not
    root), else skip.  Yields the ``strerror`` writes will fail with."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [directory, *directory.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield os.strerror(errno.EACCES)
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if run_quiet("mount", "--bind", str(directory), str(directory)).returncode == 0:
        if run_quiet("mount", "-o", "remount,bind,ro", str(directory)).returncode == 0:
            try:
                yield os.strerror(errno.EROFS)
            finally:
                unmount(directory)
            return
        unmount(directory)
    if run_quiet("chattr", "-R", "+i", str(directory)).returncode == 0:
        try:
            yield os.strerror(errno.EPERM)
        finally:
            run_quiet("chattr", "-R", "-i", str(directory))
        return
    pytest.skip("cannot make a directory read-only here (no mount, no chattr)")


def test_read_only_destination(
    tmp_path: Path, client: Client, storage_reference: dict[str, np.ndarray]
) -> None:
    """The parameter store's directory becomes read-only: the fit is refused
    with an error naming the store and the cause; a new store cannot be
    created there either."""
    destination = tmp_path / "destination"
    destination.mkdir()
    guard = contextlib.ExitStack()
    failure: list[str] = []

    def inject(data: dt.Dataset, path: Path) -> None:
        failure.append(guard.enter_context(read_only(destination)))
        FAULTS["read-only destination"] += 1
        # A new store in a read-only place is refused too.
        with pytest.raises(StoreError, match=r"new\.zarr"):
            storage_trainer(destination / "new.zarr", client).fit(
                data, epochs=1, progress=False
            )
        assert not (destination / "new.zarr").exists()

    def repair(data: dt.Dataset, path: Path) -> None:
        guard.close()

    with guard:
        assert_fault_reported(
            tmp_path,
            client,
            storage_reference,
            inject=inject,
            repair=repair,
            error=StoreError,
            patterns=lambda data, path: [str(path), failure[0]],
            destination=destination,
        )


@contextlib.contextmanager
def small_filesystem(directory: Path) -> Iterator[bool]:
    """Mount a small tmpfs on ``directory``; yields False (and mounts
    nothing) where mounting is not permitted."""
    directory.mkdir()
    mounted = (
        os.geteuid() == 0
        and run_quiet(
            "mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(directory)
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            unmount(directory)


def test_full_destination(
    tmp_path: Path,
    client: Client,
    storage_reference: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parameter store's filesystem fills up (a 2 MB tmpfs, filled but
    for a few pages): the commit fails with an error naming the store and
    ENOSPC, the half-written version is removed, and after space is freed the
    retry finishes the run.  Where mounting is not permitted, ENOSPC is
    simulated instead, by the lowest-level file write of zarr's LocalStore
    in this process (the trainer commits from this process)."""
    destination = tmp_path / "destination"
    with small_filesystem(destination) as mounted:
        filler = destination / "filler"

        def inject(data: dt.Dataset, path: Path) -> None:
            if mounted:
                st = os.statvfs(destination)
                free = st.f_bavail * st.f_frsize
                filler.write_bytes(bytes(max(0, free - FULL_HEADROOM)))
                FAULTS["full destination (tmpfs)"] += 1
                return
            import zarr.storage._local as local

            original = local._put

            def no_space(target: Path, value: Any, exclusive: bool = False) -> int:
                if str(target).startswith(str(path)) and "versions" in str(target):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
                return original(target, value, exclusive=exclusive)

            monkeypatch.setattr(local, "_put", no_space)
            FAULTS["full destination (simulated ENOSPC)"] += 1

        def repair(data: dt.Dataset, path: Path) -> None:
            if mounted:
                filler.unlink()
            else:
                monkeypatch.undo()

        assert_fault_reported(
            tmp_path,
            client,
            storage_reference,
            inject=inject,
            repair=repair,
            error=StoreError,
            patterns=lambda data, path: [str(path), os.strerror(errno.ENOSPC)],
            destination=destination,
        )


# -- 5. concurrency ----------------------------------------------------------------


class Hold(dt.Callback):
    """Holds a fit after its first step until released."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()

    def on_step_end(self, trainer: dt.Trainer, row: dict[str, Any]) -> None:
        if row["step"] == 1:
            self.holding.set()
            assert self.release.wait(GATE_TIMEOUT)


def test_second_trainer_on_a_store_is_refused(
    tmp_path: Path, client: Client, data: dt.Dataset
) -> None:
    """Two trainers on one store: while the first fits, the second is refused
    with an error naming the holder; afterwards it continues the run."""
    path = tmp_path / "run.zarr"
    first = sgd_trainer(path, client)
    hold = Hold()
    thread = threading.Thread(
        target=lambda: first.fit(
            data, epochs=2, batch_rows=BATCH_ROWS, callbacks=[hold], progress=False
        ),
        daemon=True,
    )
    thread.start()
    try:
        assert hold.holding.wait(GATE_TIMEOUT)
        second = sgd_trainer(path, client)
        with pytest.raises(StoreLockedError) as info:
            second.fit(data, epochs=3, batch_rows=BATCH_ROWS, progress=False)
        message = str(info.value)
        assert str(path) in message
        assert f"pid {os.getpid()} on host {socket.gethostname()!r}" in message
        assert "Trainer.fit" in message
    finally:
        hold.release.set()
        thread.join(GATE_TIMEOUT)
    assert first.epoch == 2
    history = second.fit(data, epochs=3, batch_rows=BATCH_ROWS, progress=False)
    assert len(history) == 3 * STEPS_PER_EPOCH


def write_lock(path: Path, *, host: str, pid: int, created: datetime) -> None:
    """A lock file as a writer that is gone would have left it."""
    info = LockInfo(
        host=host, pid=pid, owner="gone", token="0" * 32, created=created.isoformat()
    )
    (path / LOCK_FILENAME).write_text(json.dumps(info.to_json()))


def test_stale_lock_rule(
    tmp_path: Path,
    client: Client,
    data: dt.Dataset,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Locks left behind: a dead process's on this host is taken over (also
    when its pid now belongs to a younger process); a live process's is
    refused; another host's is refused until ``ParamStore.break_lock``."""
    path = tmp_path / "run.zarr"
    sgd_trainer(path, client).fit(data, epochs=1, batch_rows=BATCH_ROWS, progress=False)
    host = socket.gethostname()
    now = datetime.now(UTC)
    epochs = 1

    def fit() -> None:
        nonlocal epochs
        epochs += 1
        sgd_trainer(path, client).fit(
            data, epochs=epochs, batch_rows=BATCH_ROWS, progress=False
        )

    # A dead process on this host: taken over, with a warning.
    with subprocess.Popen(["true"]) as dead:
        dead.wait()
    write_lock(path, host=host, pid=dead.pid, created=now)
    FAULTS["stale lock (dead pid)"] += 1
    with caplog.at_level(logging.WARNING, logger="dasktrain.params.lock"):
        fit()
    assert f"pid {dead.pid} on host" in caplog.text
    assert "took over the stale write lock" in caplog.text
    assert dt.ParamStore.open(path).lock_holder() is None

    with subprocess.Popen(["sleep", "60"]) as live:
        try:
            # A live process that took the lock: refused.
            write_lock(
                path, host=host, pid=live.pid, created=now + timedelta(seconds=5)
            )
            with pytest.raises(StoreLockedError, match=rf"pid {live.pid} on host"):
                fit()
            epochs -= 1
            # The same pid, but the process started after the lock was taken:
            # the pid was reused, the lock's holder is gone.
            write_lock(path, host=host, pid=live.pid, created=now - timedelta(hours=1))
            FAULTS["stale lock (reused pid)"] += 1
            fit()
        finally:
            live.kill()

    # Another host: never taken over automatically.
    write_lock(path, host="elsewhere.invalid", pid=1, created=now)
    FAULTS["lock of another host"] += 1
    with pytest.raises(StoreLockedError) as info:
        fit()
    epochs -= 1
    assert "elsewhere.invalid" in str(info.value)
    assert "break_lock" in str(info.value)
    broken = dt.ParamStore.break_lock(path)
    assert broken is not None and broken.host == "elsewhere.invalid"
    fit()
    ps = check_consistent(path)
    assert ps.committed == epochs * STEPS_PER_EPOCH and ps.lock_holder() is None
