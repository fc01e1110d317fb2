"""The shard server of a rank: rows and updates from cached shards or, when
the budget has no room, in place in the stage's files; the same bits either
way.  Real parameter stores under ``tmp_path``, no cluster."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dasktrain as dt
from dasktrain.engine.shard_cache import (
    ShardCache,
    ShardServer,
    _read_rows,
    _write_rows,
    is_stage,
    stage_step,
)
from dasktrain.engine.sharded import table_layouts
from dasktrain.params import ParamStore
from dasktrain.params.tables import PARAM, ParamStoreRef, chunk_key, write_shard

N_ROWS, WIDTH, SHARD_ROWS = 1000, 3, 128  # 8 shards, the last one partial


@pytest.mark.parametrize("n", [1, 5, 40])  # runs of rows, then the whole file
def test_rows_read_and_written_in_a_shard_file(tmp_path: Path, n: int) -> None:
    rng = np.random.default_rng(n)
    whole = rng.normal(size=(SHARD_ROWS, WIDTH)).astype(np.float32)
    path = tmp_path / "shard"
    whole.tofile(path)
    local = np.sort(rng.choice(SHARD_ROWS, n, replace=False))
    local[: n // 2] = np.arange(n // 2) + 7  # a run of neighbours
    local = np.unique(local)
    fd = os.open(path, os.O_RDWR)
    try:
        got = _read_rows(fd, local, WIDTH, np.dtype(np.float32), SHARD_ROWS)
        np.testing.assert_array_equal(got, whole[local])
        new = rng.normal(size=(local.shape[0], WIDTH)).astype(np.float32)
        _write_rows(fd, local, new, SHARD_ROWS)
    finally:
        os.close(fd)
    whole[local] = new
    np.testing.assert_array_equal(
        np.fromfile(path, np.float32).reshape(-1, WIDTH), whole
    )


def _store(path: Path) -> tuple[ParamStore, list[dt.params.tables.TableLayout]]:
    model = dt.models.MatrixFactorization(N_ROWS, 10, WIDTH - 1, dtype="float32")
    opt = dt.optim.Adagrad(0.5, initial_accumulator=0.1)
    dense = model.init_dense(np.random.default_rng(0))
    layouts, global_keys = table_layouts(model, opt, dense, shard_rows=SHARD_ROWS)
    assert global_keys  # the step count, which the rows' update needs
    ps = ParamStore.create(path)
    ps.lock()
    ps.prepare_version(1, layouts)
    rng = np.random.default_rng(1)
    for layout in layouts:
        for shard in range(layout.n_shards - 1):  # the last shard never written
            a, b = layout.bounds(shard)
            values = rng.normal(size=(b - a, layout.width)).astype(np.float32)
            write_shard(ps.ref, 1, layout, PARAM, shard, values)
    return ps, layouts


def _server(
    ps: ParamStore, layouts: list, stage: int, cap: int
) -> tuple[ShardServer, Any, dict[str, np.ndarray]]:
    """A rank's server of ``stage`` with a ``cap``-byte cache, its Adagrad
    and the optimizer's global state."""
    ps.prepare_version(stage, layouts)
    server = ShardServer(
        ShardCache(cap_bytes=cap),
        ParamStoreRef.from_user(ps.path),
        {t.name: t for t in layouts},
        1,
        stage,
        "fit",
        frozenset({1}),
    )
    opt = dt.optim.Adagrad(0.5, initial_accumulator=0.1)
    dense = dt.models.MatrixFactorization(N_ROWS, 10, WIDTH - 1).init_dense(
        np.random.default_rng(0)
    )
    gstate = {
        k: v
        for k, v in opt.init(dense).items()
        if not any(k.endswith("." + name) for name in dense)
    }
    return server, opt, gstate


def _serve(
    ps: ParamStore, layouts: list, stage: int, cap: int, steps: int
) -> tuple[list[np.ndarray], dict[str, list[int]], ShardServer]:
    server, opt, gstate = _server(ps, layouts, stage, cap)
    rng = np.random.default_rng(2)
    served = []
    for _ in range(steps):
        ids = np.unique(rng.integers(0, N_ROWS, 300))  # every shard, the last too
        served.append(server.rows("user", ids))
        grad = rng.normal(size=(ids.shape[0], WIDTH))
        server.update("user", ids, grad, opt, gstate)
    return served, server.flush(), server


def test_cold_rows_give_the_bits_of_cached_shards(tmp_path: Path) -> None:
    ps, layouts = _store(tmp_path / "run.zarr")
    user = next(t for t in layouts if t.name == "user")
    warm, warm_written, warm_server = _serve(ps, layouts, stage_step(5, 1), 1 << 30, 4)
    cold, cold_written, cold_server = _serve(ps, layouts, stage_step(5, 2), 0, 4)
    assert warm_server.traffic.hits > 0 and warm_server.cache.held_bytes > 0
    assert cold_server.cache.held_bytes == 0  # nothing fit: all in the files
    for a, b in zip(warm, cold, strict=True):
        np.testing.assert_array_equal(a, b)
    assert warm_written == cold_written == {"user": list(range(user.n_shards))}
    # The stages hold the same bytes, the unwritten last shard included.
    root = Path(ps.path)
    for array in user.arrays:
        for shard in range(user.n_shards):
            key = chunk_key(stage_step(5, 1), "user", array, shard)
            other = chunk_key(stage_step(5, 2), "user", array, shard)
            assert (root / key).read_bytes() == (root / other).read_bytes(), key
    assert is_stage(stage_step(5, 1)) and not is_stage(10**9)


def test_a_tight_cache_evicts_and_rereads_from_the_stage(tmp_path: Path) -> None:
    """Room for two shards: shards come and go (changed ones through the
    stage's files) with the bits of an unbounded cache."""
    ps, layouts = _store(tmp_path / "run.zarr")
    user = next(t for t in layouts if t.name == "user")
    warm, _, _ = _serve(ps, layouts, stage_step(6, 1), 1 << 30, 3)
    tight, _, server = _serve(ps, layouts, stage_step(6, 2), 2 * user.shard_nbytes, 3)
    assert server.cache.held_bytes <= 2 * user.shard_nbytes
    for a, b in zip(warm, tight, strict=True):
        np.testing.assert_array_equal(a, b)


def test_only_owned_shards_take_the_stage_label(tmp_path: Path) -> None:
    """A worker keeps shards from a segment in which its rank owned them; in
    the next segment another rank owns (and changes) some of them.  At that
    segment's end the worker's copies of the shards it does not own keep
    their old label, so the segment after it rereads them instead of serving
    stale rows; the shards it owns take the stage's label."""
    ps, layouts = _store(tmp_path / "run.zarr")
    by_name = {t.name: t for t in layouts}
    ref = ParamStoreRef.from_user(ps.path)
    user = by_name["user"]
    cache = ShardCache(cap_bytes=1 << 30)
    ids = np.arange(N_ROWS)
    # Segment 1: this worker's rank serves every shard.
    s1 = stage_step(4, 1)
    ps.prepare_version(s1, layouts)
    one = ShardServer(cache, ref, by_name, 1, s1, "fit", frozenset({1}))
    one.rows("user", ids)
    one.flush()
    # Segment 2: two ranks; this worker's rank serves the even shards.
    s2 = stage_step(8, 1)
    ps.prepare_version(s2, layouts)
    two = ShardServer(cache, ref, by_name, 1, s2, "fit", frozenset({s1}))
    two.rows("user", ids[: user.shard_rows])  # shard 0
    two.flush(lambda table, shard: shard % 2 == 0)
    labels = {
        shard: cache.get(two.key("user", shard), {("fit", s1), ("fit", s2)})
        for shard in range(user.n_shards)
    }
    assert all(entry is not None for entry in labels.values())
    for shard, entry in labels.items():
        assert entry is not None
        assert entry.label == ("fit", s2 if shard % 2 == 0 else s1), shard
    # Segment 3 starts from segment 2's stage: the odd shards are reread.
    three = ShardServer(
        cache, ref, by_name, 1, stage_step(12, 1), "fit", frozenset({s2})
    )
    kept = {k[-1] for k in cache.keys_of(three.prefix) if k[-2] == "user"}
    assert kept == set(range(0, user.n_shards, 2))


def _serve_in_order(
    ps: ParamStore, layouts: list, stage: int, cap: int, *, advance: bool
) -> tuple[list[np.ndarray], ShardServer]:
    """Steps that each touch one shard, shard after shard (ids grouped as
    in a store sorted by user), twice over."""
    server, opt, gstate = _server(ps, layouts, stage, cap)
    user = server.layouts["user"]
    rng = np.random.default_rng(3)
    served = []
    for shard in [*range(user.n_shards), *range(user.n_shards)]:
        a, b = user.bounds(shard)
        ids = np.unique(rng.integers(a, b, 40))
        served.append(server.rows("user", ids))
        server.update("user", ids, rng.normal(size=(ids.shape[0], WIDTH)), opt, gstate)
        if advance:
            server.next_step()
        server.make_room(0)
    served.append(server.rows("user", np.arange(N_ROWS)))
    server.flush()
    return served, server


def test_a_full_cache_makes_room_with_shards_of_earlier_steps(tmp_path: Path) -> None:
    """Room for two shards, one shard per step: each step's shard is loaded
    into the cache, the least recently used shard of an earlier step leaving
    it (written to the stage when changed), instead of the new shard's rows
    being used in its file; shards of the current step never make room.
    The bits are those of an unbounded cache either way."""
    ps, layouts = _store(tmp_path / "run.zarr")
    user = next(t for t in layouts if t.name == "user")
    warm, _ = _serve_in_order(ps, layouts, stage_step(7, 1), 1 << 30, advance=True)
    cap = 2 * user.shard_nbytes
    moving, server = _serve_in_order(ps, layouts, stage_step(7, 2), cap, advance=True)
    for a, b in zip(warm, moving, strict=True):
        np.testing.assert_array_equal(a, b)
    assert server.cache.held_bytes <= cap
    # Every step's shard went through the cache: loaded each time it came.
    assert server.traffic.shards_read >= 2 * user.n_shards
    assert server.traffic.evictions >= 2 * user.n_shards - 2
    # Without steps ending, the first two shards stay and the rest are
    # used in their files.
    stuck, same = _serve_in_order(ps, layouts, stage_step(7, 3), cap, advance=False)
    for a, b in zip(warm, stuck, strict=True):
        np.testing.assert_array_equal(a, b)
    assert same.traffic.shards_read == 2


def test_the_cache_counts_a_ranks_lookups_of_shards(tmp_path: Path) -> None:
    """A shard a rank needs is a miss the first time (loaded from the store),
    a hit while it stays in memory, a miss again once the budget has taken
    it back; each shard of a request counts once, and going over the
    shards it holds (the segment's end) counts nothing."""
    ps, layouts = _store(tmp_path / "run.zarr")
    user = next(t for t in layouts if t.name == "user")
    server, opt, gstate = _server(ps, layouts, stage_step(9, 1), 1 << 30)
    cache = server.cache
    in_0 = np.arange(5)
    assert (cache.hits, cache.misses) == (0, 0)
    server.rows("user", in_0)
    assert (cache.hits, cache.misses) == (0, 1)
    server.rows("user", in_0)
    assert (cache.hits, cache.misses) == (1, 1)
    cache.shrink_to(0)  # the budget takes the (unchanged) shard back
    server.rows("user", in_0)
    assert (cache.hits, cache.misses) == (1, 2)
    # Rows of shards 0, 1 and 2: one lookup each (shard 0 held, 1, 2 loaded).
    ids = np.array([1, user.shard_rows, 2 * user.shard_rows + 3])
    server.rows("user", ids)
    assert (cache.hits, cache.misses) == (2, 4)
    server.update("user", ids, np.ones((3, WIDTH)), opt, gstate)
    assert (cache.hits, cache.misses) == (5, 4)
    server.flush()
    server.discard()
    assert (cache.hits, cache.misses) == (5, 4)
    assert (server.traffic.hits, server.traffic.misses) == (5, 4)


def test_a_shard_used_in_its_file_is_a_miss_every_time(tmp_path: Path) -> None:
    """No room: the shard's rows are read and written in its file, never
    found in memory."""
    ps, layouts = _store(tmp_path / "run.zarr")
    server, opt, gstate = _server(ps, layouts, stage_step(9, 2), 0)
    ids = np.arange(3)
    server.rows("user", ids)
    server.update("user", ids, np.ones((3, WIDTH)), opt, gstate)
    server.rows("user", ids)
    assert (server.cache.hits, server.cache.misses) == (0, 3)
    assert server.cache.held_bytes == 0
