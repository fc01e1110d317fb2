"""The read peak the memory budget plans with, against the peak measured
while chunks are read, and the anonymous maps that kept chunks live in."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr

import dasktrain as dt
from dasktrain.data.io import (
    LEAN_READ_PEAK_FACTOR,
    READ_SLACK_BYTES,
    ZARR_READ_PEAK_FACTOR,
    clear_handle_cache,
    read_chunk,
    read_peak_nbytes,
)
from dasktrain.engine.budget import (
    HUGE_PAGE_MIN_BYTES,
    READ_PEAK_FACTOR,
    MemoryBudget,
    MemoryLimits,
    MemoryPlan,
    anonymous_map,
    is_off_heap,
    off_heap_copy,
    off_heap_empty,
)
from dasktrain.engine.cache import ChunkCache
from dasktrain.engine.tasks import _ChunkStream, load_chunk

MiB = 2**20
ROWS, COLS, CHUNK = 8192, 64, 4096


def _store(path: Path, codec: str = "lz4") -> dt.Dataset:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(ROWS, COLS)).astype(np.float32)
    return dt.Dataset.from_arrays(
        path, X=X, y=(X[:, 0] > 0).astype(np.int8), chunk_rows=CHUNK, codec=codec
    )


def _measured_peak(ds: dt.Dataset, fields: tuple[str, ...], chunk_id: int) -> int:
    for name in fields:  # open the handles outside the measurement
        read_chunk(ds.ref, name, chunk_id)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        held = [read_chunk(ds.ref, name, chunk_id) for name in fields]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held
    return int(peak)


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_a_local_store_is_planned_at_the_lean_factor_and_stays_under_it(
    tmp_path: Path, codec: str
) -> None:
    ds = _store(tmp_path / "d.zarr", codec)
    decoded = CHUNK * COLS * 4 + CHUNK
    planned = LEAN_READ_PEAK_FACTOR * decoded + 2 * READ_SLACK_BYTES
    assert read_peak_nbytes(ds.ref, ("X", "y")) == planned
    peak = _measured_peak(ds, ("X", "y"), 0)
    assert peak <= read_peak_nbytes(ds.ref, ("X", "y"))
    # ... and the plan is not loose: the stored bytes and the output are
    # alive together.
    assert peak > 1.5 * CHUNK * COLS * 4 if codec == "none" else peak > CHUNK * COLS * 4


def test_a_transform_stays_within_the_read_peak(tmp_path: Path) -> None:
    ds = _store(tmp_path / "d.zarr")
    view = ds.with_transform("X", shift=[0.5] * COLS, scale=[2.0] * COLS)
    assert read_peak_nbytes(view.ref, ("X",)) == read_peak_nbytes(ds.ref, ("X",))
    assert _measured_peak(view, ("X",), 1) <= read_peak_nbytes(view.ref, ("X",))
    raw = ds.read("X", 1)
    expected = ((raw - np.float32(0.5)) / np.float32(2.0)).astype(np.float32)
    assert view.read("X", 1).tobytes() == expected.tobytes()


def test_chunks_zarr_decodes_are_planned_at_the_zarr_factor(tmp_path: Path) -> None:
    # A group written by zarr itself, read in place: zarr decodes its chunks.
    group = zarr.open_group(str(tmp_path / "src.zarr"), mode="w")
    rng = np.random.default_rng(1)
    x = group.create_array("x", shape=(ROWS, COLS), chunks=(CHUNK, COLS), dtype="f4")
    x[:] = rng.normal(size=(ROWS, COLS)).astype(np.float32)
    t = group.create_array("t", shape=(ROWS,), chunks=(CHUNK,), dtype="f4")
    t[:] = rng.normal(size=ROWS).astype(np.float32)
    ds = dt.Dataset.from_zarr(tmp_path / "src.zarr", fields={"X": "x", "y": "t"})
    assert ds.ref.sources
    decoded = CHUNK * COLS * 4 + CHUNK * 4
    planned = ZARR_READ_PEAK_FACTOR * decoded + 2 * READ_SLACK_BYTES
    assert read_peak_nbytes(ds.ref, ("X", "y")) == planned
    assert _measured_peak(ds, ("X", "y"), 0) <= read_peak_nbytes(ds.ref, ("X", "y"))


def test_a_store_that_cannot_be_opened_is_planned_at_the_zarr_factor(
    tmp_path: Path,
) -> None:
    ds = _store(tmp_path / "d.zarr")
    ref = ds.ref
    clear_handle_cache()
    (tmp_path / "d.zarr").rename(tmp_path / "moved.zarr")
    planned = ZARR_READ_PEAK_FACTOR * CHUNK * COLS * 4 + READ_SLACK_BYTES
    assert read_peak_nbytes(ref, ("X",)) == planned


def test_read_ahead_and_plans_use_the_read_peak_they_are_given() -> None:
    limits = MemoryLimits(384 * MiB, 0.6, 0.7, 0.8, 0.95)
    chunk = 25 * MiB
    # At 384 MiB, 83 MiB of baseline and a 25 MiB chunk: reading ahead fits
    # when a read peaks at twice the chunk, not at three times.
    lean = MemoryBudget(limits, baseline_rss=83 * MiB)
    assert lean.fits_read_ahead(chunk, 1, read_bytes=2 * chunk)
    assert lean.working_set == (1 + 2 + 2) * chunk
    zarr_read = MemoryBudget(limits, baseline_rss=83 * MiB)
    assert not zarr_read.fits_read_ahead(chunk, 1)
    assert zarr_read.working_set == (1 + READ_PEAK_FACTOR) * chunk
    assert MemoryPlan(chunk_bytes=chunk).per_thread() == (READ_PEAK_FACTOR + 1) * chunk
    plan = MemoryPlan(chunk_bytes=chunk, read_bytes=2 * chunk, held_chunks=2)
    assert plan.per_thread() == (2 + 1 + 2) * chunk
    assert "3x with its compute" in plan.describe()


def test_large_off_heap_copies_are_equal_and_independent() -> None:
    a = np.random.default_rng(2).normal(size=(HUGE_PAGE_MIN_BYTES // 8 + 3, 2))
    b = off_heap_copy(a)
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    a[-1, -1] = 7.0
    assert b[-1, -1] != 7.0
    buffer = anonymous_map(HUGE_PAGE_MIN_BYTES)
    assert len(buffer) == HUGE_PAGE_MIN_BYTES and buffer[:8] == bytes(8)
    buffer.close()


def _budgeted_cache(cap_bytes: int | None = None) -> ChunkCache:
    budget = MemoryBudget(
        MemoryLimits(2**30, 0.6, 0.7, 0.8, 0.95), baseline_rss=100 * MiB
    )
    return ChunkCache(budget=budget, cap_bytes=cap_bytes)


def test_a_chunk_the_cache_keeps_is_decoded_into_its_map_not_copied(
    tmp_path: Path,
) -> None:
    ds = _store(tmp_path / "d.zarr")
    cache = _budgeted_cache()
    x_bytes = CHUNK * COLS * 4
    load_chunk(ds.ref, ("X", "y"), 0, cache=cache)  # open the handles
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        loaded, was_hit = load_chunk(ds.ref, ("X", "y"), 1, cache=cache)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not was_hit
    # Decoded straight into anonymous maps: no chunk-sized heap buffer was
    # ever alive (the stored bytes are lz4-compressed random floats, a bit
    # under the decoded size), and the cache holds those very maps.
    assert peak < 1.2 * x_bytes
    assert all(is_off_heap(a) for a in loaded.arrays.values())
    held, hit = load_chunk(ds.ref, ("X", "y"), 1, cache=cache)
    assert hit and held.arrays["X"] is loaded.arrays["X"]
    assert held.arrays["X"].tobytes() == read_chunk(ds.ref, "X", 1).tobytes()
    assert held.arrays["y"].tobytes() == read_chunk(ds.ref, "y", 1).tobytes()


def test_a_chunk_the_cache_has_no_room_for_is_decoded_on_the_heap(
    tmp_path: Path,
) -> None:
    ds = _store(tmp_path / "d.zarr")
    cache = _budgeted_cache(cap_bytes=CHUNK * COLS * 4 // 2)
    loaded, was_hit = load_chunk(ds.ref, ("X", "y"), 0, cache=cache)
    assert not was_hit and cache.held_bytes == 0
    assert not any(is_off_heap(a) for a in loaded.arrays.values())
    # Without a budget (a fixed-size cache) chunks stay on the heap as well.
    fixed = ChunkCache(64 * MiB)
    kept, _ = load_chunk(ds.ref, ("X", "y"), 0, cache=fixed)
    assert fixed.held_bytes > 0 and not is_off_heap(kept.arrays["X"])


def test_chunks_read_ahead_for_the_cache_are_decoded_into_maps_too(
    tmp_path: Path,
) -> None:
    ds = _store(tmp_path / "d.zarr")
    view = ds.with_transform("X", shift=[0.5] * COLS, scale=[2.0] * COLS)
    for source, transformed in ((ds, False), (view, True)):
        cache = _budgeted_cache()
        stream = _ChunkStream(
            source.ref,
            ("X", "y"),
            [0, 1],
            nonfinite="raise",
            cache=cache,
            prefetch=True,
        )
        try:
            first, _ = stream.load()
            second, _ = stream.load()
        finally:
            stream.close()
        assert stream.prefetched == 1
        for loaded, chunk_id in ((first, 0), (second, 1)):
            kept, hit = load_chunk(source.ref, ("X", "y"), chunk_id, cache=cache)
            assert hit
            # Kept chunks are off the heap either way: decoded there, or (a
            # transformed field, computed on the heap) copied there.
            assert all(is_off_heap(a) for a in kept.arrays.values())
            assert (kept.arrays["X"] is loaded.arrays["X"]) is not transformed
            assert (
                kept.arrays["X"].tobytes()
                == read_chunk(source.ref, "X", chunk_id).tobytes()
            )
        assert cache.held_bytes == 2 * (CHUNK * COLS * 4 + CHUNK), transformed


def test_off_heap_empty_and_is_off_heap() -> None:
    a = off_heap_empty((HUGE_PAGE_MIN_BYTES // 4, 3), np.float32)
    assert a.shape == (HUGE_PAGE_MIN_BYTES // 4, 3) and a.dtype == np.float32
    assert is_off_heap(a) and is_off_heap(a[10:20]) and is_off_heap(a.T)
    assert not is_off_heap(a[:5].copy())
    assert not is_off_heap(off_heap_empty((0, 3), np.float64))


def test_a_mapped_file_is_not_taken_for_a_kept_map(tmp_path: Path) -> None:
    # A numpy.memmap of a user's file is memory-mapped too, but the cache
    # must copy it (the file may change; its pages are not the cache's).
    mapped = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=(64, 4))
    assert not is_off_heap(mapped) and not is_off_heap(np.asarray(mapped)[2:5])
