"""One memory budget per worker: out-of-core fits under tight real memory
limits, plans refused before they start, workers paused by others' memory.

The store is generated once for the module: 8,100,000 x 100 float32 (3.3 GB
decoded, 13 MB chunks), more than 3x the memory of two 512 MiB workers and 4x
that of two 384 MiB workers.  Each limit gets its own process cluster; the
reference runs on 4 GiB workers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from distributed import Client

import dasktrain as dt
from dasktrain.engine.budget import (
    MemoryBudget,
    MemoryLimits,
    MemoryPlan,
    budget_of,
    off_heap_copy,
    refuse_unfit_plan,
)
from dasktrain.engine.cache import ChunkCache
from dasktrain.errors import MemoryBudgetError
from dasktrain.params import ParamStore
from tests.conftest import local_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MiB = 2**20
N_ROWS = 8_100_000
N_FEATURES = 100
MINIBATCH_ROWS = 1024
#: 13 MB chunks: a 384 MiB worker reads (3x at peak) and holds its streams'
#: chunks well under its spill threshold (26 MB chunks come within a few MiB
#: of it; see benchmarks/out_of_core.py --sweep).
CHUNK_ROWS = 32_768


# -- pure parts ------------------------------------------------------------------
def test_ceiling_and_capacity_follow_the_limit_and_thresholds() -> None:
    limits = MemoryLimits(1024 * MiB, 0.6, 0.7, 0.8, 0.95)
    budget = MemoryBudget(limits, baseline_rss=100 * MiB)
    assert budget.ceiling == int(1024 * MiB * 0.65)
    assert budget.capacity == budget.ceiling - 100 * MiB
    budget.declare_working_set(50 * MiB)
    assert budget.capacity == budget.ceiling - 150 * MiB
    # Measured memory above the estimate shrinks the room...
    budget.observe(rss=400 * MiB)
    assert budget.capacity == budget.ceiling - 400 * MiB
    # ...and thresholds switched off fall back to a fixed ceiling.
    off = MemoryLimits(1024 * MiB, None, False or None, None, None)
    assert 0 < off.ceiling < 1024 * MiB


def test_cache_on_a_budget_is_evicted_when_the_process_nears_its_ceiling() -> None:
    limits = MemoryLimits(1000 * MiB, 0.6, 0.7, 0.8, 0.95)
    budget = MemoryBudget(limits, baseline_rss=100 * MiB)
    cache = ChunkCache(budget=budget)
    chunk = np.ones(10 * MiB // 8)
    for key in range(20):
        assert cache.put(key, off_heap_copy(chunk), chunk.nbytes, group=key)
    assert cache.held_bytes == 20 * chunk.nbytes
    # The process grew by 400 MiB outside the cache: the cache must give
    # room back at once.
    budget.observe(rss=100 * MiB + cache.held_bytes + 400 * MiB)
    assert cache.held_bytes <= budget.capacity
    assert budget.stats().evictions > 0
    # A paused worker drops everything.
    budget.observe(rss=900 * MiB, paused=True)
    assert cache.held_bytes == 0 and budget.stats().pauses == 1


def test_off_heap_copy_is_equal_and_independent() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = off_heap_copy(a)
    assert b.dtype == a.dtype and np.array_equal(a, b)
    a[0, 0] = 99
    assert b[0, 0] == 0


def test_a_plan_too_large_for_a_worker_is_refused_with_the_numbers() -> None:
    report = {
        "limits": MemoryLimits(256 * MiB, 0.6, 0.7, 0.8, 0.95).to_dict(),
        "baseline_rss": 75 * MiB,
        "nthreads": 2,
    }
    plan = MemoryPlan(chunk_bytes=40 * MiB, what="training LogisticRegression")
    with pytest.raises(MemoryBudgetError) as info:
        refuse_unfit_plan(plan, {"tcp://w1": report})
    message = str(info.value)
    assert "tcp://w1" in message and "256 MiB" in message
    assert "Give workers at least" in message
    # 75 + 2 x (3 + 1) x 40 = 395 MiB, kept under 65%: at least 608 MiB.
    assert "608 MiB" in message
    refuse_unfit_plan(MemoryPlan(chunk_bytes=4 * MiB), {"tcp://w1": report})


# -- real clusters -----------------------------------------------------------------
@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory, client: Client) -> dt.Dataset:
    path = tmp_path_factory.mktemp("budget") / "big.zarr"
    return dt.datasets.make_classification(
        path,
        n_rows=N_ROWS,
        n_features=N_FEATURES,
        chunk_rows=CHUNK_ROWS,
        seed=3,
        client=client,
        progress=False,
    )


def _fit(
    client: Client, data: dt.Dataset, store: Path, *, batch_rows: int | None
) -> dict[str, np.ndarray]:
    with dt.Trainer(
        dt.models.LogisticRegression(l2=1e-4),
        dt.optim.Adam(learning_rate=0.05),
        store=store,
        client=client,
    ) as trainer:
        history = trainer.fit(
            data,
            epochs=2 if batch_rows is None else 1,
            batch_rows=batch_rows,
            progress=False,
        )
        # Epoch-end rows and the trainer's repr report the workers' budgets.
        last = history.to_pandas().iloc[-1]
        assert last["cache_capacity_bytes"] >= last["cache_bytes"] >= 0
        assert 0 < last["peak_rss_fraction"] < 1
        assert "worker caches" in repr(trainer)
        report = trainer.memory_report()
        assert set(report) == set(client.scheduler_info()["workers"])
        return {k: np.asarray(v) for k, v in trainer.params.items()}


def _memory(dask_worker: Any) -> dict[str, Any]:
    stats = budget_of(dask_worker).stats().to_dict()
    stats["pid"] = os.getpid()
    total = getattr(dask_worker.data, "spilled_total", None)
    stats["spilled"] = int(getattr(total, "disk", 0) or 0)
    stats["spill_fraction"] = dask.config.get("distributed.worker.memory.spill")
    return stats


@pytest.fixture(scope="module")
def reference(
    big_store: dt.Dataset, client: Client, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("reference")
    return {
        kind: _fit(client, big_store, out / f"{kind}.zarr", batch_rows=rows)
        for kind, rows in (("full", None), ("minibatch", MINIBATCH_ROWS))
    }


@pytest.mark.parametrize("limit", ["384MiB", "512MiB"])
def test_out_of_core_fits_never_pause_spill_or_restart(
    limit: str,
    big_store: dt.Dataset,
    reference: dict[str, dict[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    with local_cluster(2, memory_limit=limit) as small:
        total = sum(
            w["memory_limit"] for w in small.scheduler_info()["workers"].values()
        )
        assert big_store.nbytes > 3 * total
        pids = small.run(os.getpid)
        for kind, rows in (("full", None), ("minibatch", MINIBATCH_ROWS)):
            params = _fit(small, big_store, tmp_path / f"{kind}.zarr", batch_rows=rows)
            for name, value in reference[kind].items():
                assert np.array_equal(params[name], value), (kind, name)
        stats = small.run(_memory)
    assert {a: s["pid"] for a, s in stats.items()} == pids  # no restarts
    for address, s in stats.items():
        spill = s["spill_fraction"] * s["limit"]
        assert s["pauses"] == 0, address
        assert s["spilled"] == 0, address
        assert s["peak_rss"] < spill, (address, s["peak_rss"] / MiB, spill / MiB)


def test_a_chunk_too_large_for_the_workers_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    X = np.random.default_rng(0).normal(size=(200_000, 100)).astype("float32")
    data = dt.Dataset.from_arrays(
        tmp_path / "wide.zarr",
        X=X,
        y=(X[:, 0] > 0).astype("int8"),
        chunk_rows=200_000,
    )  # one 80 MB chunk: reading it needs about 240 MB
    with local_cluster(1, memory_limit="256MiB") as small:
        trainer = dt.Trainer(
            dt.models.LogisticRegression(),
            dt.optim.LBFGS(),
            store=tmp_path / "r.zarr",
            client=small,
        )
        t0 = time.monotonic()
        with pytest.raises(
            MemoryBudgetError, match="cannot fit in the memory of worker"
        ):
            trainer.fit(data, epochs=1, progress=False)
        assert time.monotonic() - t0 < 30
        trainer.close()
    # Refused before any work: no version was committed.
    if (tmp_path / "r.zarr").exists():
        assert ParamStore.open(tmp_path / "r.zarr").committed is None


def _hold(n_bytes: int, seconds: float) -> int:
    """A task that holds memory outside dasktrain (and touches it)."""
    block = np.ones(n_bytes // 8)
    time.sleep(seconds)
    return int(block[-1])


def test_workers_paused_by_memory_outside_dasktrain_give_a_plain_error(
    tmp_path: Path,
) -> None:
    X = np.random.default_rng(0).normal(size=(40_000, 10)).astype("float32")
    data = dt.Dataset.from_arrays(
        tmp_path / "d.zarr", X=X, y=(X[:, 0] > 0).astype("int8"), chunk_rows=4_000
    )
    with (
        dask.config.set({"dasktrain.memory.pause-timeout": "3s"}),
        local_cluster(1, memory_limit="384MiB") as small,
    ):
        trainer = dt.Trainer(
            dt.models.LogisticRegression(),
            dt.optim.Adam(0.1),
            store=tmp_path / "r.zarr",
            client=small,
        )
        # 75 MiB of process + 260 MiB: past the pause threshold (307 MiB),
        # short of the nanny's 95% (365 MiB).
        holder = small.submit(_hold, 260 * MiB, 60, pure=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = {w["status"] for w in small.scheduler_info()["workers"].values()}
            if status == {"paused"}:
                break
            time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(MemoryBudgetError, match="paused") as info:
            trainer.fit(data, epochs=2, batch_rows=4_000, progress=False)
        assert time.monotonic() - t0 < 30
        assert "outside dasktrain" in str(info.value)
        holder.cancel()
        trainer.close()


@pytest.mark.parametrize("order", ["shuffled", "zipf"])
def test_tables_twice_the_cluster_memory_under_a_tight_limit(
    order: str, tmp_path: Path, client: Client
) -> None:
    """Matrix factorization whose user table plus Adagrad state (1.66 GB) is
    2.2x the memory of two 384 MiB workers, with user ids in shuffled order
    (every step touches every shard) or Zipf-skewed (a hot set and a long
    tail): no pause, restart or spill, peak RSS under the spill threshold,
    and the bits of a run on 4 GiB workers (which hold the tables in
    memory)."""
    n_users, n_items, rank = 6_500_000, 5_000, 31  # rows of 32 float32
    rng = np.random.default_rng(11)
    n = 100_000
    if order == "zipf":
        user = (rng.zipf(1.3, n) - 1) % n_users
    else:
        user = rng.integers(0, n_users, n)
    item = rng.integers(0, n_items, n)
    rating = (3 + rng.normal(size=n)).astype(np.float32)
    data = dt.Dataset.from_arrays(
        tmp_path / "ratings.zarr",
        user=user,
        item=item,
        rating=rating,
        chunk_rows=25_000,
    )
    model = dt.models.MatrixFactorization(n_users, n_items, rank, dtype="float32")
    table_bytes = 2 * n_users * (rank + 1) * 4
    assert table_bytes > 2 * 2 * 384 * MiB

    def fit(c: Client, name: str) -> tuple[dt.Trainer, list[dict[str, Any]]]:
        trainer = dt.Trainer(
            model, dt.optim.Adagrad(0.1), store=tmp_path / name, client=c, sharded=True
        )
        trainer.fit(data, epochs=1, batch_rows=50_000, progress=False)
        return trainer, trainer.history.rows

    def same(a: dt.Trainer, b: dt.Trainer) -> None:
        for name, value in a.params.items():
            other = b.params[name]
            if np.ndim(value) == 0:
                assert np.array_equal(value, other), name
                continue
            step = 1_000_000
            for start in range(0, value.shape[0], step):
                assert np.array_equal(
                    value[start : start + step], other[start : start + step]
                ), (name, start)

    expected, rows = fit(client, "reference.zarr")
    assert len(rows) == 2
    with local_cluster(2, memory_limit="384MiB") as small:
        pids = small.run(os.getpid)
        got, tight_rows = fit(small, "tight.zarr")
        stats = small.run(_memory)
    assert [r["loss"] for r in tight_rows] == [r["loss"] for r in rows]
    same(got, expected)
    assert {a: s["pid"] for a, s in stats.items()} == pids  # no restarts
    for address, s in stats.items():
        assert s["pauses"] == 0 and s["spilled"] == 0, address
        spill = s["spill_fraction"] * s["limit"]
        assert s["peak_rss"] < spill, (address, s["peak_rss"] / MiB, spill / MiB)
        # The workers held a small part of the tables; the rest was used
        # in the stage's files.
        assert s["held_by"].get("shards", 0) < table_bytes / 8
