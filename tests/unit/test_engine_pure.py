"""The engine's pure parts: the reduction tree, batch plans, placement, and the
worker chunk cache (no cluster needed)."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dasktrain.engine.cache import ChunkCache
from dasktrain.engine.plan import (
    Piece,
    assign_pieces,
    chunk_owners,
    epoch_steps,
    full_pass,
    row_permutation,
)
from dasktrain.partial import (
    Partial,
    RowSparse,
    combine,
    covering_nodes,
    id_positions,
    node_span,
    reduce_node,
    reduce_rows,
    tree_depth,
    tree_reduce,
    unique_ids,
)


def leaves(n: int, seed: int = 0) -> list[Partial]:
    rng = np.random.default_rng(seed)
    return [
        Partial(
            float(rng.normal() * 1e6),
            {"w": rng.normal(size=3) * 10.0 ** rng.integers(-8, 8)},
            int(rng.integers(1, 100)),
            {"correct": float(rng.integers(0, 50))},
        )
        for _ in range(n)
    ]


def same(a: Partial, b: Partial) -> bool:
    return (
        a.loss_sum == b.loss_sum
        and a.n_rows == b.n_rows
        and dict(a.metrics) == dict(b.metrics)
        and all(np.array_equal(a.grads[k], b.grads[k]) for k in a.grads)
    )


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 70), data=st.data())
def test_any_partition_into_held_subtrees_gives_the_same_bits(
    n: int, data: st.DataObject
) -> None:
    """Whatever leaves each worker holds, pre-reducing its covering nodes and
    completing the tree on the client gives exactly the full tree's result."""
    parts = leaves(n)
    reference = tree_reduce(parts)
    n_workers = data.draw(st.integers(1, 5))
    owner = data.draw(st.lists(st.integers(0, n_workers - 1), min_size=n, max_size=n))
    known = {(0, j): p for j, p in enumerate(parts)}
    nodes: dict[tuple[int, int], Partial] = {}
    covered: list[int] = []
    for w in range(n_workers):
        held = [j for j in range(n) if owner[j] == w]
        for node in covering_nodes(held, n):
            nodes[node] = reduce_node(node, n, known)
            covered.extend(node_span(node, n))
    assert sorted(covered) == list(range(n)), "covering nodes must partition the leaves"
    assert same(tree_reduce(nodes, n), reference)


def test_tree_order_is_fixed_not_arrival_order() -> None:
    parts = leaves(9, seed=3)
    reference = tree_reduce(parts)
    # A left fold in another order generally differs in the last bits; the tree
    # is what makes results independent of arrival order.
    folded = parts[0]
    for p in parts[1:]:
        folded = combine(folded, p)
    assert folded.n_rows == reference.n_rows
    assert np.allclose(folded.grads["w"], reference.grads["w"], rtol=1e-12, atol=0)
    shuffled = {(0, j): parts[j] for j in np.random.default_rng(0).permutation(9)}
    assert same(tree_reduce(shuffled, 9), reference)


def test_missing_leaf_is_an_error() -> None:
    parts = leaves(4)
    with pytest.raises(KeyError, match="leaf 3"):
        tree_reduce({(0, 0): parts[0], (0, 1): parts[1], (0, 2): parts[2]}, 4)


def test_combine_refuses_mismatched_gradients() -> None:
    a = Partial(1.0, {"w": np.zeros(2)}, 1)
    b = Partial(1.0, {"v": np.zeros(2)}, 1)
    with pytest.raises(ValueError, match="different gradients"):
        combine(a, b)


def test_row_sparse_combine_sums_duplicates() -> None:
    a = RowSparse.from_unsorted(np.array([3, 1, 3]), np.ones((3, 2)), (5, 2))
    b = RowSparse.from_unsorted(np.array([1, 4]), np.full((2, 2), 2.0), (5, 2))
    total = (a + b).to_dense()
    expected = np.zeros((5, 2))
    expected[3] = 2
    expected[1] = 3
    expected[4] = 2
    np.testing.assert_array_equal(total, expected)


@pytest.mark.parametrize(
    ("n", "m", "width"),
    [(50, 40, 3), (10_000, 6_000, 9), (10_000, 30, 1), (7, 0, 2), (2_000, 9_000, 4)],
)
def test_row_sparse_add_has_the_bits_of_summing_the_concatenation(
    n: int, m: int, width: int
) -> None:
    # The merge must give exactly what summing both row lists from 0.0 in
    # input order gives (np.bincount), signed zeros and float32 included.
    rng = np.random.default_rng(n + m)

    def draw(dtype: type) -> RowSparse:
        rows = np.unique(rng.integers(0, n, m))
        values = rng.standard_normal((rows.size, width)).astype(dtype)
        values[rng.random(values.shape) < 0.1] = -0.0
        return RowSparse(rows, values, (n, width))

    for dtype_a, dtype_b in [(np.float64, np.float64), (np.float32, np.float64)]:
        a, b = draw(dtype_a), draw(dtype_b)
        for x, y in [(a, b), (b, a), (a, a)]:
            got = x + y
            want = RowSparse.from_unsorted(
                np.concatenate([x.rows, y.rows]),
                np.concatenate([x.values, y.values]),
                x.shape,
            )
            np.testing.assert_array_equal(got.rows, want.rows)
            assert got.values.dtype == want.values.dtype
            assert got.values.tobytes() == want.values.tobytes()


def rows_of(chunk: int) -> int:
    return 100 if chunk != 9 else 37


def test_full_batch_plan_is_one_step_of_whole_chunks() -> None:
    steps = epoch_steps(range(10), rows_of, batch_rows=None, seed=0, epoch=0)
    assert steps == [full_pass(range(10), rows_of)]


@pytest.mark.parametrize("batch_rows", [1, 7, 30, 99, 100, 150, 250, 10_000])
def test_minibatch_plan_covers_every_row_once(batch_rows: int) -> None:
    chunks = [0, 2, 3, 5, 9]
    steps = epoch_steps(chunks, rows_of, batch_rows=batch_rows, seed=4, epoch=2)
    seen: Counter[tuple[int, int]] = Counter()
    for step in steps:
        assert step, "empty step"
        for p in step:
            n = rows_of(p.chunk_id)
            order = (
                row_permutation(*p.shuffle, p.chunk_id, n)
                if p.shuffle is not None
                else np.arange(n)
            )
            seen.update((p.chunk_id, int(r)) for r in order[p.start : p.stop])
    assert set(seen.values()) == {1}
    assert sum(rows_of(c) for c in chunks) == len(seen)
    if batch_rows < 100:
        assert max(sum(p.n_rows for p in s) for s in steps) <= batch_rows


def test_minibatch_plan_is_seeded_per_epoch() -> None:
    a = epoch_steps(range(8), rows_of, batch_rows=50, seed=1, epoch=0)
    b = epoch_steps(range(8), rows_of, batch_rows=50, seed=1, epoch=0)
    c = epoch_steps(range(8), rows_of, batch_rows=50, seed=1, epoch=1)
    assert a == b
    assert a != c


def test_bad_batch_rows() -> None:
    with pytest.raises(ValueError, match="batch_rows"):
        epoch_steps(range(3), rows_of, batch_rows=0, seed=0, epoch=0)


@pytest.mark.parametrize("n_chunks", [1, 5, 31, 300, 2000])
@pytest.mark.parametrize("n_workers", [1, 2, 3, 7])
def test_placement_is_balanced_and_stable(n_chunks: int, n_workers: int) -> None:
    workers = [f"w{i}" for i in range(n_workers)]
    owners = chunk_owners("store", list(range(n_chunks)), workers)
    load = Counter(owners.values())
    assert set(load) <= set(workers)
    # Balanced to within one placement group.
    group = max(1, n_chunks // 128)
    assert max(load.values()) - min(load.get(w, 0) for w in workers) <= 2 * group
    assert owners == chunk_owners(
        "store", list(range(n_chunks)), list(reversed(workers))
    )


def test_losing_a_worker_moves_little() -> None:
    chunks = list(range(64))
    before = chunk_owners("s", chunks, ["a", "b", "c", "d"])
    after = chunk_owners("s", chunks, ["a", "b", "c"])
    moved = sum(before[c] != after[c] for c in chunks)
    assert moved <= 16 + 8, f"{moved} of 64 chunks moved when 1 of 4 workers left"


def test_assign_pieces_follows_owners() -> None:
    pieces = [Piece(c, 0, 10) for c in (4, 1, 7)]
    out = assign_pieces(pieces, {4: "x", 1: "y", 7: "x"}, ["x", "y"])
    assert out == {"x": [0, 2], "y": [1]}
    # Unknown owners still get a live worker.
    out = assign_pieces(pieces, {4: "gone"}, ["x", "y"])
    assert sorted(itertools.chain.from_iterable(out.values())) == [0, 1, 2]
    assert set(out) <= {"x", "y"}


def test_cache_is_bounded_and_counts() -> None:
    cache = ChunkCache(budget_bytes=100)
    assert cache.put("a", 1, 40, group="s")
    assert cache.put("b", 2, 40, group="s")
    assert cache.get("a") == 1
    assert cache.get("zz") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.n_bytes, stats.n_entries) == (1, 1, 80, 2)
    assert not cache.put("huge", 3, 101, group="s")


def test_cache_does_not_thrash_on_cyclic_scans() -> None:
    """A dataset larger than the budget keeps its first chunks cached instead
    of evicting every chunk just before its next use."""
    cache = ChunkCache(budget_bytes=100)
    for _ in range(3):
        for c in range(5):
            if cache.get(("s", c)) is None:
                cache.put(("s", c), c, 30, group="s")
    assert cache.stats().hits == 2 * 3  # chunks 0-2 hit in epochs 2 and 3
    assert cache.stats().n_bytes <= 100


def test_cache_evicts_other_stores_least_recent_first() -> None:
    cache = ChunkCache(budget_bytes=100)
    cache.put("old1", 1, 40, group="train")
    cache.put("old2", 2, 40, group="train")
    cache.get("old1")  # old2 is now the least recently used
    assert cache.put("val", 3, 40, group="val")
    assert cache.get("old2") is None and cache.get("old1") == 1
    assert cache.stats().evictions == 1


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=8),
    batch_rows=st.integers(1, 60),
    local_steps=st.integers(1, 6),
)
def test_local_sgd_rounds_visit_every_row_once_per_epoch(
    sizes: list[int], batch_rows: int, local_steps: int
) -> None:
    from dasktrain.engine.plan import local_sgd_rounds

    chunk_ids = [3 * i + 1 for i in range(len(sizes))]
    n_rows = dict(zip(chunk_ids, sizes, strict=True))
    rounds = local_sgd_rounds(
        chunk_ids,
        n_rows.__getitem__,
        batch_rows=batch_rows,
        local_steps=local_steps,
        seed=5,
        epoch=2,
    )
    covered: dict[int, list[int]] = {c: [] for c in chunk_ids}
    for leaves in rounds:
        assert leaves, "no empty rounds"
        heads = [leaf[0].chunk_id for leaf in leaves]
        # One leaf per chunk, in the dataset's chunk order.
        assert heads == sorted(heads, key=chunk_ids.index)
        assert len(set(heads)) == len(heads)
        for leaf in leaves:
            assert 1 <= len(leaf) <= local_steps
            assert {p.chunk_id for p in leaf} == {leaf[0].chunk_id}
            for p in leaf:
                assert 1 <= p.n_rows <= batch_rows
                covered[p.chunk_id].extend(range(p.start, p.stop))
    for c, rows in covered.items():
        assert rows == list(range(n_rows[c])), c
    n_batches = max(-(-n // batch_rows) for n in sizes)
    assert len(rounds) == -(-n_batches // local_steps)
    again = local_sgd_rounds(
        chunk_ids,
        n_rows.__getitem__,
        batch_rows=batch_rows,
        local_steps=local_steps,
        seed=5,
        epoch=2,
    )
    assert again == rounds


def test_local_sgd_rounds_reject_bad_sizes() -> None:
    from dasktrain.engine.plan import local_sgd_rounds

    for batch_rows, local_steps in ((0, 1), (10, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            local_sgd_rounds(
                [0],
                lambda c: 10,
                batch_rows=batch_rows,
                local_steps=local_steps,
                seed=0,
                epoch=0,
            )


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_weighted_mean_is_the_row_weighted_average_on_any_split(
    n: int, data: st.DataObject
) -> None:
    from dasktrain.partial import weighted_mean, weighted_sum

    rng = np.random.default_rng(n)
    values = [rng.normal(size=(3, 2)) * 10.0 ** rng.integers(-3, 3) for _ in range(n)]
    weights = [int(w) for w in rng.integers(0, 70_000, size=n)]
    weights[0] += 1  # at least one row
    parts = [
        weighted_sum({"w": v, "s": v[0, 0]}, w, loss_sum=float(w) * 0.5)
        for v, w in zip(values, weights, strict=True)
    ]
    whole = tree_reduce(parts)
    mean = weighted_mean(whole)
    np.testing.assert_allclose(
        mean["w"], np.average(values, axis=0, weights=weights), rtol=1e-12
    )
    assert mean["s"].shape == () and mean["w"].dtype == np.float64
    assert whole.n_rows == sum(weights) and whole.mean_loss() == 0.5
    # Held subtrees, as a task would pre-reduce them: the same bits.
    cut = sorted(data.draw(st.sets(st.integers(1, n - 1))) if n > 1 else set())
    known = {}
    for a, b in itertools.pairwise([0, *cut, n]):
        for node in covering_nodes(range(a, b), n):
            known[node] = reduce_node(node, n, {(0, j): parts[j] for j in range(a, b)})
    for k, v in weighted_mean(tree_reduce(known, n)).items():
        assert np.array_equal(v, mean[k])


def test_weighted_mean_edge_cases() -> None:
    from dasktrain.partial import weighted_mean, weighted_sum

    empty = weighted_mean(weighted_sum({"w": np.ones(2)}, 0))
    assert np.isnan(empty["w"]).all()
    with pytest.raises(ValueError, match="n_rows must be >= 0"):
        weighted_sum({"w": np.ones(2)}, -1)
    sparse = Partial(0.0, {"e": RowSparse(np.array([0]), np.ones((1, 2)), (3, 2))}, 1)
    with pytest.raises(TypeError, match="row-sparse"):
        weighted_mean(sparse)


@pytest.mark.parametrize(
    ("n_rows", "per_leaf", "n_leaves", "own"),
    [
        (300, 200, 7, range(7)),  # dense additions: leaves cover the table
        (300, 200, 8, range(2, 8)),  # a part of the tree, as one rank holds
        (100_000, 20, 5, range(5)),  # sparse merges: a large table
        (40, 0, 3, range(3)),  # empty leaves
    ],
)
def test_reduce_rows_has_the_bits_of_reduce_node(
    n_rows: int, per_leaf: int, n_leaves: int, own: range
) -> None:
    rng = np.random.default_rng(n_rows + n_leaves)
    leaves = {}
    for k in range(n_leaves):
        rows = np.unique(rng.integers(0, n_rows, per_leaf))
        values = rng.standard_normal((rows.size, 3)) * 10.0 ** rng.integers(-8, 8)
        values[rng.random(values.shape) < 0.2] = -0.0
        leaves[(0, k)] = RowSparse(rows, values, (n_rows, 3))
    known = {node: g for node, g in leaves.items() if node[1] in own}
    for node in covering_nodes(own, n_leaves):
        got = reduce_rows(node, n_leaves, known)
        want = reduce_node(
            node, n_leaves, {n: Partial(0.0, {"t": g}, 0) for n, g in known.items()}
        ).grads["t"]
        np.testing.assert_array_equal(got.rows, want.rows)
        assert got.values.tobytes() == want.values.tobytes()
    with pytest.raises(KeyError, match="missing"):
        reduce_rows((tree_depth(n_leaves), 0), n_leaves, dict(list(leaves.items())[1:]))


@pytest.mark.parametrize(
    ("n_rows", "m", "dtype"),
    [(1_000, 5_000, np.int64), (1_000, 5_000, np.int32), (50_000_000, 300, np.int64)],
)
def test_bounded_ids_match_unique_and_searchsorted(
    n_rows: int, m: int, dtype: type
) -> None:
    # Both the mask / lookup-table path and the sort path give numpy's answer.
    rng = np.random.default_rng(m)
    ids = rng.integers(0, n_rows, m).astype(dtype)
    ids[:3] = [0, n_rows - 1, 0]
    uniq = unique_ids(ids, n_rows)
    np.testing.assert_array_equal(uniq, np.unique(ids))
    assert uniq.dtype == np.unique(ids).dtype
    np.testing.assert_array_equal(
        id_positions(uniq, ids, n_rows), np.searchsorted(uniq, ids)
    )


@pytest.mark.parametrize("n", [10, 200_000])
def test_rank_payloads_cross_the_wire_unchanged(n: int) -> None:
    # A small payload is pickled by the sending rank, a large one goes as
    # array frames; both arrive through Dask's message protocol unchanged.
    from distributed.protocol import dumps, loads

    from dasktrain.engine.comm import SMALL_PAYLOAD_BYTES, open_payload, wire_payload

    rng = np.random.default_rng(n)
    payload = {
        "nodes": [
            [
                0,
                3,
                1.5,
                7,
                {"correct": 2.0},
                {"w": rng.standard_normal(n), "mu": np.asarray(0.25)},
            ]
        ],
        "sparse": [
            [1, 0, 0.0, 0, {}, {"t": [np.arange(5), rng.random((5, 2)), [9, 2]]}]
        ],
        "req": {"user": np.arange(n, dtype=np.int64)[::3]},
        "end": False,
        "error": None,
        "stats": [1, 2],
    }
    wire = wire_payload(payload)
    small = n * 8 * 2 <= SMALL_PAYLOAD_BYTES
    assert (set(wire) == {"dasktrain-pickled"}) == small
    got = open_payload(loads(dumps({"op": "x", "payload": wire}))["payload"])
    np.testing.assert_array_equal(got["nodes"][0][5]["w"], payload["nodes"][0][5]["w"])
    assert np.shape(got["nodes"][0][5]["mu"]) == () and got["nodes"][0][5]["mu"] == 0.25
    strided = wire_payload({"a": np.arange(2 * n)[::2]})
    assert np.array_equal(
        open_payload(loads(dumps({"p": strided}))["p"])["a"], np.arange(2 * n)[::2]
    )
    rows, values, shape = got["sparse"][0][5]["t"]
    np.testing.assert_array_equal(rows, np.arange(5))
    np.testing.assert_array_equal(values, payload["sparse"][0][5]["t"][1])
    assert list(shape) == [9, 2] and list(got["nodes"][0][:4]) == [0, 3, 1.5, 7]
    np.testing.assert_array_equal(got["req"]["user"], payload["req"]["user"])
    assert got["end"] is False and got["error"] is None and list(got["stats"]) == [1, 2]
