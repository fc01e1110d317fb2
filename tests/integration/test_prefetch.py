"""Leaf tasks read the next chunk in a background thread while the current one
is computed (``dasktrain.prefetch``): same bits, same errors for the same
leaf, one chunk ahead at most, and no read ahead of a cached chunk."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pytest
from distributed import Client
from trainer_support import (
    CHUNK_ROWS,
    assert_same_params,
    classification_arrays,
    classification_store,
    losses,
    store,
)

import dasktrain as dt
from dasktrain.engine.engine import Engine
from dasktrain.engine.plan import Piece, full_pass
from dasktrain.engine.tasks import (
    FAILED_LEAF_ATTRIBUTE,
    PREFETCH_CONFIG_KEY,
    TaskReport,
    compute_leaves,
    leaf_partials,
    prefetch_gauge,
)
from dasktrain.errors import LabelError, NonFiniteDataError
from dasktrain.partial import weighted_sum

pytestmark = pytest.mark.cluster

#: How long the test's leaves compute: long enough for a background read of a
#: small chunk to finish.
COMPUTE_SECONDS = 0.2


def _set_prefetch(value: bool | None) -> None:
    dask.config.set({PREFETCH_CONFIG_KEY: value})


@contextlib.contextmanager
def prefetch_on_workers(client: Client, value: bool) -> Iterator[None]:
    """Turn reading ahead on or off in every worker's config."""
    client.run(_set_prefetch, value)
    try:
        yield
    finally:
        client.run(_set_prefetch, None)


def _fit(
    client: Client, data: dt.Dataset, run: Path, prefetch: bool, **fit: Any
) -> tuple[dict[str, np.ndarray], list[float]]:
    # cache_fraction=0: every pass streams from the store, so every pass of a
    # task with several chunks reads ahead.
    with prefetch_on_workers(client, prefetch):
        trainer = dt.Trainer(
            dt.models.LogisticRegression(l2=1e-3),
            dt.optim.SGD(0.2, momentum=0.9),
            store=run,
            client=client,
            cache_fraction=0.0,
        )
        history = trainer.fit(data, progress=False, **fit)
    return trainer.params, losses(history)


@pytest.fixture
def default_cache(client: Client) -> Iterator[None]:
    """Give the session's workers their default cache budget back."""
    yield
    Engine(client)


@pytest.mark.parametrize(
    "fit",
    [
        {"epochs": 2},
        {"epochs": 1, "batch_rows": 2 * CHUNK_ROWS},
        {"epochs": 1, "batch_rows": 250, "local_steps": 2},
    ],
    ids=["full-batch", "minibatch", "local-sgd"],
)
def test_same_bits_with_and_without_prefetch(
    tmp_path: Path, client: Client, default_cache: None, fit: dict[str, Any]
) -> None:
    data = classification_store(tmp_path / "d.zarr", 7_500)
    on = _fit(client, data, tmp_path / "on.zarr", True, **fit)
    off = _fit(client, data, tmp_path / "off.zarr", False, **fit)
    assert_same_params(on[0], off[0], "prefetch on/off")
    assert on[1] == off[1]


def test_pass_reports_prefetched_chunks(
    tmp_path: Path, client: Client, default_cache: None
) -> None:
    """With nothing cached, every task reads its chunks after the first one
    ahead; turned off, none; once the chunks are cached, none either."""
    data = classification_store(tmp_path / "d.zarr", 8_000)
    model = dt.models.LogisticRegression()
    params = {"w": np.zeros(data.n_features), "b": np.zeros(())}
    pieces = full_pass(data.chunk_ids, data.chunk_n_rows)
    engine = Engine(client, cache_fraction=0.0)

    def run(value: bool) -> tuple[Any, list[TaskReport]]:
        with prefetch_on_workers(client, value):
            result = engine.run_pass(data.ref, model, params, pieces)
        return result.partial, result.reports

    on, on_reports = run(True)
    off, off_reports = run(False)
    assert on.loss_sum == off.loss_sum
    for k in on.grads:
        assert np.array_equal(on.grads[k], off.grads[k])
    tasks_with_chunks = [r for r in on_reports if r.cache_misses]
    assert sum(r.prefetched for r in on_reports) == sum(
        r.cache_misses - 1 for r in tasks_with_chunks
    )
    assert sum(r.prefetched for r in on_reports) > 0
    assert [r.prefetched for r in off_reports] == [0] * len(off_reports)
    assert sum(r.cache_misses for r in on_reports) == data.n_chunks

    cached = Engine(client)
    cached.run_pass(data.ref, model, params, pieces)  # fills the caches
    with prefetch_on_workers(client, True):
        warm = cached.run_pass(data.ref, model, params, pieces)
    assert warm.cache_hits == data.n_chunks
    assert [r.prefetched for r in warm.reports] == [0] * len(warm.reports)
    assert warm.partial.loss_sum == on.loss_sum


def _leaves_on_a_worker(ref: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """Runs on a worker: one task's leaves over chunks 0, 0, 1, 2, 3 (the
    first chunk in two minibatch pieces), recording during each leaf's
    compute how many chunks are read ahead."""
    from dasktrain.engine.cache import worker_cache

    pieces = [
        Piece(0, 0, 400),
        Piece(0, 400, CHUNK_ROWS),
        *(Piece(c, 0, CHUNK_ROWS) for c in (1, 2, 3)),
    ]
    leaves = list(enumerate(pieces))

    def run(prefetch: bool) -> tuple[list[int], TaskReport, float]:
        ahead: list[int] = []

        def compute(piece: Piece, loaded: Any, was_hit: bool) -> Any:
            ahead.append(prefetch_gauge().ahead)
            time.sleep(COMPUTE_SECONDS)
            x = loaded.arrays["X"][piece.start : piece.stop]
            return weighted_sum({"sum": x.sum(axis=0)}, x.shape[0])

        prefetch_gauge(reset=True)
        nodes, report = leaf_partials(
            ref, fields, leaves, len(leaves), compute, prefetch=prefetch
        )
        [root] = nodes.values()
        return ahead, report, float(root.grads["sum"].sum())

    cache = worker_cache()
    cap = cache.cap_bytes
    out: dict[str, Any] = {}
    try:
        cache.cap_bytes = 0  # nothing is cached: every run reads
        out["streaming-on"] = run(True)
        out["peak"] = prefetch_gauge().peak
        out["streaming-off"] = run(False)
    finally:
        cache.cap_bytes = cap
    out["cold"] = run(True)
    out["warm"] = run(True)
    out["after"] = prefetch_gauge()
    return out


def test_one_chunk_ahead_and_none_when_cached(tmp_path: Path, client: Client) -> None:
    data = classification_store(tmp_path / "d.zarr", 4_000)
    worker = sorted(client.nthreads())[0]
    # Sync point: one task on one worker.
    out = client.submit(
        _leaves_on_a_worker, data.ref, ("X", "y"), workers=[worker], pure=False
    ).result()

    ahead, report, total = out["streaming-on"]
    # During both pieces of chunk 0, chunk 1 is being read; during chunk 1,
    # chunk 2; ...; nothing after the last chunk.
    assert ahead == [1, 1, 1, 1, 0]
    assert out["peak"] == 1
    # Chunk 0 read once for its two pieces; chunks 1-3 read ahead.
    assert (report.cache_misses, report.cache_hits, report.prefetched) == (4, 1, 3)

    ahead_off, report_off, total_off = out["streaming-off"]
    assert ahead_off == [0] * 5
    assert (report_off.cache_misses, report_off.prefetched) == (4, 0)
    assert total_off == total

    # Cold cache: chunks are read ahead; warm: all cached, nothing read ahead.
    assert out["cold"][1].prefetched == 3 and out["cold"][2] == total
    ahead_warm, report_warm, total_warm = out["warm"]
    assert ahead_warm == [0] * 5
    assert (report_warm.cache_hits, report_warm.prefetched) == (5, 0)
    assert total_warm == total
    assert out["after"].ahead == 0


def _failing_leaves(ref: Any, n_leaves: int) -> list[tuple[str, str, int, int]]:
    """Runs on a worker: one task over every chunk, with reading ahead on and
    off; the error of each (type, message, failing leaf) and the reads left
    ahead afterwards."""
    model = dt.models.LogisticRegression()
    params = {"w": np.zeros(ref.field("X").shape[0]), "b": np.zeros(())}
    leaves = [(i, Piece(i, 0, CHUNK_ROWS)) for i in range(n_leaves)]
    out = []
    for value in (True, False):
        with dask.config.set({PREFETCH_CONFIG_KEY: value}):
            try:
                compute_leaves(ref, model, params, leaves, n_leaves)
            except Exception as exc:
                out.append(
                    (
                        type(exc).__name__,
                        str(exc),
                        getattr(exc, FAILED_LEAF_ATTRIBUTE),
                        prefetch_gauge().ahead,
                    )
                )
    return out


@pytest.mark.parametrize("label_error_first", [False, True])
def test_errors_name_the_same_chunk_and_leaf(
    tmp_path: Path, client: Client, label_error_first: bool
) -> None:
    """A NaN in chunk 3, read ahead while leaf 2 computes, is raised for leaf
    3; a bad label in chunk 2 (found while computing leaf 2, after chunk 3's
    read ahead failed) is the error reported."""
    X, y = classification_arrays(5_000)
    X[3 * CHUNK_ROWS + 7, 4] = np.nan
    if label_error_first:
        y[2 * CHUNK_ROWS + 11] = 2
    data = store(tmp_path / "d.zarr", X, y)
    worker = sorted(client.nthreads())[0]
    # Sync point: one task on one worker.
    on, off = client.submit(
        _failing_leaves, data.ref, data.n_chunks, workers=[worker], pure=False
    ).result()
    assert on == off
    name, message, leaf, ahead = on
    assert ahead == 0  # nothing left reading ahead after the failure
    if label_error_first:
        assert (name, leaf) == (LabelError.__name__, 2)
        assert f"chunk 2: row {2 * CHUNK_ROWS + 11}" in message
    else:
        assert (name, leaf) == (NonFiniteDataError.__name__, 3)
        assert f"'X', chunk 3: row {3 * CHUNK_ROWS + 7}, column 4" in message


def test_fit_error_is_the_same_with_prefetch(tmp_path: Path, client: Client) -> None:
    """Through the engine and the trainer: the same error, naming the same
    chunk and row."""
    X, y = classification_arrays(6_000)
    X[4 * CHUNK_ROWS + 9, 1] = np.inf
    data = store(tmp_path / "d.zarr", X, y)
    errors = []
    for value in (True, False):
        with (
            prefetch_on_workers(client, value),
            pytest.raises(NonFiniteDataError) as info,
        ):
            dt.Trainer(
                dt.models.LogisticRegression(),
                dt.optim.SGD(0.1),
                store=tmp_path / f"run-{value}.zarr",
                client=client,
            ).fit(data, epochs=1, progress=False)
        errors.append(
            (str(info.value), getattr(info.value, FAILED_LEAF_ATTRIBUTE, None))
        )
    assert errors[0] == errors[1]
    assert f"chunk 4: row {4 * CHUNK_ROWS + 9}, column 1" in errors[0][0]
