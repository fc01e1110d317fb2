"""Shared fixtures: real process-based Dask clusters on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

# Small steps would run on one rank (dasktrain.ranks.one-rank-work): the
# tests' small models keep one rank per worker thread, so that they exercise
# the exchange between ranks (driver processes started by tests inherit it).
# Tests of the one-rank plan set the key back.
os.environ["DASK_DASKTRAIN__RANKS__ONE_RANK_WORK"] = "0"

import dask
import psutil
import pytest
from distributed import Client, LocalCluster

dask.config.refresh()

#: Seconds a test cluster may take to close before its workers are killed.
CLOSE_TIMEOUT = 60


@contextlib.contextmanager
def local_cluster(
    n_workers: int = 2,
    *,
    memory_limit: str | int = "4GiB",
    threads_per_worker: int = 1,
) -> Iterator[Client]:
    """A LocalCluster of worker *processes* (real serialization, real
    scheduling) and a client connected to it."""
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        memory_limit=memory_limit,
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        _close(cluster)


def _close(cluster: LocalCluster) -> None:
    """Close a cluster; if that hangs (seen once in CI: a nanny restarting a
    worker that a fault test killed), kill its worker processes instead of
    hanging the test session."""
    pids = []
    for nanny in list(cluster.workers.values()):
        process = getattr(getattr(nanny, "process", None), "process", None)
        if process is not None and process.pid is not None:
            pids.append(process.pid)
    try:
        cluster.close(timeout=CLOSE_TIMEOUT)
    except Exception as exc:  # TimeoutError, or a nanny's error while closing
        logging.getLogger(__name__).warning(
            "closing %s failed (%r); killing worker processes %s", cluster, exc, pids
        )
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                for proc in [*psutil.Process(pid).children(recursive=True)]:
                    proc.kill()
                psutil.Process(pid).kill()


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    """A 2-worker process cluster shared by the session's tests."""
    with local_cluster(2) as c:
        yield c


@pytest.fixture
def make_client() -> Iterator[Callable[[int], Client]]:
    """Factory of fresh clusters with a given number of workers, closed after
    the test."""
    stack = contextlib.ExitStack()

    def make(n_workers: int, **kwargs: object) -> Client:
        return stack.enter_context(local_cluster(n_workers, **kwargs))  # type: ignore[arg-type]

    with stack:
        yield make
