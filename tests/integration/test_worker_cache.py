"""The worker chunk cache on a real cluster."""

from __future__ import annotations

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
