"""Shared fixtures: real process-based Dask clusters on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import pytest
from distributed import Client, LocalCluster


@contextlib.contextmanager
def local_cluster(
    n_workers: int = 2, *, memory_limit: str | int = "4GiB"
) -> Iterator[Client]:
    """A LocalCluster of worker *processes* (real serialization, real
    scheduling) and a client connected to it."""
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
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
        cluster.close()


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
