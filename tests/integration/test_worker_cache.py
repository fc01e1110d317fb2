"""The worker chunk cache on a real cluster."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client

import dasktrain as dt
from dasktrain.engine.cache import PLUGIN_NAME
from dasktrain.engine.engine import Engine
from dasktrain.engine.plan import full_pass

pytestmark = pytest.mark.cluster


def cache_entries(dask_worker: Any) -> int:
    plugin = dask_worker.plugins[PLUGIN_NAME]
    return int(plugin.cache.stats().n_entries)


def test_second_client_keeps_running_caches(tmp_path: Path, client: Client) -> None:
    X = np.random.default_rng(0).normal(size=(4000, 5)).astype("float32")
    ds = dt.Dataset.from_arrays(
        tmp_path / "d.zarr", X=X, y=(X[:, 0] > 0), chunk_rows=500
    )
    model = dt.models.LogisticRegression()
    params = {"w": np.zeros(5), "b": np.zeros(())}
    engine = Engine(client)
    pieces = full_pass(ds.chunk_ids, ds.chunk_n_rows)
    first = engine.run_pass(ds.ref, model, params, pieces)
    assert first.cache_misses == 8 and first.cache_hits == 0
    entries = client.run(cache_entries)
    assert sum(entries.values()) >= 8

    with Client(client.scheduler.address) as other:
        Engine(other, cache_fraction=0.2)  # registers the plugin again
        assert client.run(cache_entries) == entries

    second = engine.run_pass(ds.ref, model, params, pieces)
    assert second.cache_hits == 8
    assert second.partial.loss_sum == first.partial.loss_sum


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_workers_reuse_freed_decode_buffers(client: Client) -> None:
    """Dask starts workers with MALLOC_TRIM_THRESHOLD_ set, which leaves
    every large buffer to a fresh ``mmap``; the cache plugin makes glibc
    serve chunk-sized buffers from its heap, where freed ones are reused (see
    ``tune_malloc``)."""
    Engine(client)  # registers the cache plugin on every worker

    def mmapped_bytes_of_a_chunk_buffer() -> tuple[str | None, int]:
        import ctypes
        import os

        class MallInfo2(ctypes.Structure):
            _fields_ = [
                (name, ctypes.c_size_t)
                for name in [
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                ]
            ]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        before = libc.mallinfo2().hblkhd
        buffer = np.ones((32 << 20) // 8)  # a 32 MB decoded chunk
        during = libc.mallinfo2().hblkhd
        del buffer
        return os.environ.get("MALLOC_TRIM_THRESHOLD_"), during - before

    results = client.run(mmapped_bytes_of_a_chunk_buffer)
    for env, mmapped in results.values():
        assert env is not None  # the workers do run in Dask's environment
        assert mmapped < (1 << 20), f"{mmapped} bytes mmapped for the buffer"
