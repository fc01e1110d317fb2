"""Finding or starting the Dask client that runs the work."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
from distributed import Client, LocalCluster, as_completed

logger = logging.getLogger(__name__)

__all__ = ["CLIENT_HOOKS", "ClientHandle", "get_client", "prepare_client", "run_tasks"]

#: Embedded clusters: one single-threaded worker process per core, so that a
#: NumPy kernel holds one core and decoding runs in parallel across workers.
DEFAULT_THREADS_PER_WORKER = 1
MALLOC_TRIM_VARIABLE = "MALLOC_TRIM_THRESHOLD_"
#: Called by :func:`prepare_client` with each client a trainer runs on.  The
#: package face adds the dashboard page's installer here, so that the engine
#: never imports the monitor.
CLIENT_HOOKS: list[Callable[[Client], None]] = []


@dataclass
class ClientHandle:
    """A client, and the cluster we started for it (``None`` if the user's)."""

    client: Client
    cluster: LocalCluster | None
    owns_client: bool = False

    @property
    def owned(self) -> bool:
        return self.cluster is not None

    def close(self) -> None:
        """Close what this handle started: the embedded cluster and its client,
        or the client it opened to a scheduler address."""
        if self.cluster is not None:
            self.client.close()
            self.cluster.close()
            self.cluster = None
        elif self.owns_client:
            self.client.close()
            self.owns_client = False


def _start_local_cluster(n_workers: int | None = None) -> ClientHandle:
    n = n_workers or max(1, os.cpu_count() or 1)
    # Dask starts workers with MALLOC_TRIM_THRESHOLD_ set, which also fixes
    # glibc's mmap threshold: every decoded chunk then lands in freshly mapped,
    # page-faulted memory.  Measured with benchmarks/epoch_throughput.py
    # (--malloc-trim unset): cold passes 2-3x faster without it.  Our workers'
    # big allocations are the bounded chunk cache, so we leave glibc's
    # defaults in place for the clusters we start.
    environ = {
        k: v
        for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
        if k != MALLOC_TRIM_VARIABLE
    }
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=DEFAULT_THREADS_PER_WORKER,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )
    client = Client(cluster)
    logger.info("started an embedded LocalCluster: %s", client.dashboard_link)
    handle = ClientHandle(client, cluster)
    weakref.finalize(handle, _close_quietly, client, cluster)
    return handle


def _close_quietly(client: Client, cluster: LocalCluster) -> None:
    try:
        client.close()
        cluster.close()
    except Exception:
        pass


def get_client(client: Client | str | None = None) -> ClientHandle:
    """The client to use.

    ``client`` may be a :class:`distributed.Client`, a scheduler address
    (``"tcp://host:8786"``), or ``None``: then the current default client if
    there is one, else a new embedded ``LocalCluster`` that the handle owns.
    """
    if isinstance(client, Client):
        return ClientHandle(client, None)
    if isinstance(client, str):
        return ClientHandle(Client(client), None, owns_client=True)
    try:
        from distributed import default_client

        return ClientHandle(default_client(), None)
    except ValueError:
        return _start_local_cluster()


def prepare_client(client: Client) -> None:
    """Run the :data:`CLIENT_HOOKS` on ``client`` (the dashboard page)."""
    for hook in CLIENT_HOOKS:
        hook(client)


def run_tasks(
    client: Client,
    fn: Callable[..., Any],
    args: Sequence[tuple[Any, ...]],
    *,
    progress: Callable[[int], None] | None = None,
    key_prefix: str = "dasktrain-task",
) -> list[Any]:
    """Run ``fn(*a)`` for each ``a`` on the cluster; results in input order.

    Sync point: waits for all tasks.  ``progress(k)`` is called as each task
    finishes.  The first task error is raised after the others are cancelled.
    """
    futures = [
        client.submit(fn, *a, key=f"{key_prefix}-{i}-{os.urandom(4).hex()}", pure=False)
        for i, a in enumerate(args)
    ]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    try:
        for fut in as_completed(futures):  # sync point: one task at a time
            results[index[fut.key]] = fut.result()
            if progress is not None:
                progress(1)
    except BaseException:
        client.cancel(futures)
        raise
    return results
