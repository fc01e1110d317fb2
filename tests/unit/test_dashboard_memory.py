"""The per-worker memory table: worker reports -> rows -> dashboard columns
-> HTML, the hit-rate arithmetic, and the trainer's one-line summary (no
cluster needed)."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any

import pytest

import dasktrain as dt
from dasktrain.engine.budget import (
    GONE_STATUS,
    NO_ANSWER_STATUS,
    MemoryBudget,
    MemoryLimits,
    address_order,
    memory_rows,
    reads_since,
    worst_worker,
)
from dasktrain.engine.cache import ChunkCache
from dasktrain.engine.engine import Engine
from dasktrain.engine.shard_cache import ShardCache, _Shard
from dasktrain.monitor.dashboard import (
    MEMORY_COLUMNS,
    dashboard_data,
    memory_html,
    memory_table,
)

MiB = 2**20


def report(
    *,
    limit: int = 1000 * MiB,
    peak_rss: int = 500 * MiB,
    chunks: int = 200 * MiB,
    shards: int = 0,
    hits: int = 0,
    misses: int = 0,
    shard_reads: tuple[int, int] | None = None,
    status: str = "running",
) -> dict[str, Any]:
    """A worker_memory_report as a worker sends it (only the fields used);
    ``shard_reads``: the shard cache's (hits, misses), if it has any."""
    held_by = {"chunks": chunks} if not shards else {"chunks": chunks, "shards": shards}
    reads_by: dict[str, dict[str, int]] = {"chunks": {"hits": hits, "misses": misses}}
    if shard_reads is not None:
        reads_by["shards"] = {"hits": shard_reads[0], "misses": shard_reads[1]}
    return {
        "limit": limit,
        "ceiling": int(0.65 * limit),
        "capacity": 400 * MiB,
        "held": chunks + shards,
        "held_by": held_by,
        "baseline_rss": 80 * MiB,
        "rss": 450 * MiB,
        "peak_rss": peak_rss,
        "evictions": 3,
        "evicted_bytes": 30 * MiB,
        "pauses": 1,
        "status": status,
        "reads_by": reads_by,
    }


# -- hit rates -----------------------------------------------------------------
def test_reads_count_from_the_fit_start() -> None:
    assert reads_since(30, 10) == (30, 10)
    assert reads_since(30, 10, (20, 5)) == (10, 5)
    assert reads_since(20, 5, (20, 5)) == (0, 0)
    # A counter that went back is a new process at the same address.
    assert reads_since(3, 50, (20, 5)) == (3, 50)
    assert reads_since(30, 1, (20, 5)) == (30, 1)


def test_hit_rate_of_a_row() -> None:
    rows = memory_rows(
        {"tcp://a:1": report(hits=130, misses=20)}, start={"tcp://a:1": (100, 10)}
    )
    assert (rows[0]["cache_hits"], rows[0]["cache_misses"]) == (30, 10)
    assert rows[0]["cache_hit_rate"] == pytest.approx(0.75)
    # Without a start: the counters of the process; no lookup: NaN, not 0.
    assert memory_rows({"a": report(hits=1, misses=3)})[0]["cache_hit_rate"] == 0.25
    assert math.isnan(memory_rows({"a": report()})[0]["cache_hit_rate"])
    # A worker whose cache keeps no counters reports none.
    no_counts = report()
    del no_counts["reads_by"]
    assert memory_rows({"a": no_counts})[0]["cache_hits"] == 0


def test_shard_hit_rate_of_a_row() -> None:
    worker = report(hits=130, misses=20, shard_reads=(70, 30))
    rows = memory_rows(
        {"tcp://a:1": worker},
        start={"tcp://a:1": {"chunks": (100, 10), "shards": (40, 20)}},
    )
    row = rows[0]
    assert (row["shard_hits"], row["shard_misses"]) == (30, 10)
    assert row["shard_hit_rate"] == pytest.approx(0.75)
    assert (row["cache_hits"], row["cache_misses"]) == (30, 10)
    # A start without the shard cache's counters (made later in the fit):
    # the counters of the process.
    row = memory_rows({"a": worker}, start={"a": {"chunks": (100, 10)}})[0]
    assert (row["shard_hits"], row["shard_misses"]) == (70, 30)
    assert row["cache_hit_rate"] == pytest.approx(0.75)
    # The old start, the chunk cache's (hits, misses) alone.
    row = memory_rows({"a": worker}, start={"a": (100, 10)})[0]
    assert (row["cache_hits"], row["cache_misses"]) == (30, 10)
    assert row["shard_hit_rate"] == pytest.approx(0.7)
    # A restarted process counts from its own start.
    row = memory_rows(
        {"a": report(shard_reads=(3, 1))}, start={"a": {"shards": (40, 20)}}
    )[0]
    assert row["shard_hit_rate"] == pytest.approx(0.75)
    # No shard lookups (a fit without tables): NaN, not 0.
    assert math.isnan(memory_rows({"a": report(hits=1, misses=3)})[0]["shard_hit_rate"])
    since = memory_rows({"a": worker}, start={"a": {"shards": (70, 30)}})[0]
    assert (since["shard_hits"], since["shard_misses"]) == (0, 0)
    assert math.isnan(since["shard_hit_rate"])


def test_the_budget_reports_the_chunk_cache_lookups() -> None:
    budget = MemoryBudget(
        MemoryLimits(2**30, 0.6, 0.7, 0.8, 0.95), baseline_rss=100 * MiB
    )
    cache = ChunkCache(budget=budget)
    assert cache.put("a", 1, 10)
    cache.get("a")
    cache.get("a")
    cache.get("b")

    class Counterless:
        held_bytes = 7

        def shrink_to(self, n_bytes: int) -> int:
            return 0

    budget.register("shards", Counterless())
    stats = budget.stats().to_dict()
    assert stats["reads_by"] == {"chunks": {"hits": 2, "misses": 1}}
    assert stats["held_by"] == {"chunks": 10, "shards": 7}


def test_the_budget_reports_the_shard_cache_lookups() -> None:
    budget = MemoryBudget(
        MemoryLimits(2**30, 0.6, 0.7, 0.8, 0.95), baseline_rss=100 * MiB
    )
    cache = ShardCache(budget)
    valid, other = ("fit", 1), ("fit", 2)
    assert cache.lookup(("s", "user", 0), {valid}) is None  # not loaded yet
    cache.put(("s", "user", 0), _Shard({}, valid, 8))
    assert cache.lookup(("s", "user", 0), {valid}) is not None
    assert cache.lookup(("s", "user", 0), {valid}) is not None
    # A copy of another version is no hit (and is dropped).
    assert cache.lookup(("s", "user", 0), {other}) is None
    # Going over held shards (get) is no lookup.
    cache.get(("s", "user", 0), {valid})
    reads = budget.stats().to_dict()["reads_by"]
    assert reads == {"shards": {"hits": 2, "misses": 2}}
    rows = memory_rows({"w": {**report(), "reads_by": reads}})
    assert rows[0]["shard_hit_rate"] == pytest.approx(0.5)


# -- rows ------------------------------------------------------------------------
def test_rows_are_flat_sorted_by_address_and_keep_silent_workers() -> None:
    reports = {
        "tcp://10.0.0.10:8": report(peak_rss=900 * MiB, shards=50 * MiB),
        "tcp://10.0.0.2:9": report(limit=2000 * MiB, peak_rss=500 * MiB),
    }
    missing = {
        "tcp://10.0.0.3:7": (NO_ANSWER_STATUS, "no answer within 10 s"),
        # An address that answered after all is not listed twice.
        "tcp://10.0.0.2:9": (NO_ANSWER_STATUS, "stale"),
    }
    rows = memory_rows(reports, missing=missing)
    assert [r["worker"] for r in rows] == [
        "tcp://10.0.0.2:9",
        "tcp://10.0.0.3:7",
        "tcp://10.0.0.10:8",
    ]
    first, silent, last = rows
    assert first["status"] == "running" and first["note"] == ""
    assert first["peak_rss_fraction"] == pytest.approx(0.25)
    assert first["rss_fraction"] == pytest.approx(450 / 2000)
    assert first["ceiling_bytes"] == int(0.65 * 2000 * MiB)
    assert (first["chunks_bytes"], first["shards_bytes"]) == (200 * MiB, 0)
    assert (last["chunks_bytes"], last["shards_bytes"]) == (200 * MiB, 50 * MiB)
    assert last["held_bytes"] == 250 * MiB
    assert silent == {
        "worker": "tcp://10.0.0.3:7",
        "status": NO_ANSWER_STATUS,
        "note": "no answer within 10 s",
    }
    # Every value travels as plain data (the scheduler's event log).
    for row in rows:
        assert all(isinstance(v, int | float | str) for v in row.values())
        assert set(row) <= set(MEMORY_COLUMNS)


def test_address_order_compares_numbers_by_value() -> None:
    addresses = ["tcp://h:10001", "tcp://h:9999", "tcp://g:2", "inproc://x/1"]
    assert sorted(addresses, key=address_order) == [
        "inproc://x/1",
        "tcp://g:2",
        "tcp://h:9999",
        "tcp://h:10001",
    ]


def test_worst_worker_is_the_highest_peak_fraction() -> None:
    reports = {
        "big": report(limit=4000 * MiB, peak_rss=1000 * MiB),  # 25%
        "small": report(limit=1000 * MiB, peak_rss=700 * MiB),  # 70%
    }
    assert worst_worker(reports) == ("small", pytest.approx(0.7))
    assert worst_worker({}) is None


class _FakeClient:
    def register_plugin(self, plugin: object) -> None:
        pass


def test_engine_marks_silent_and_departed_workers() -> None:
    engine = Engine(_FakeClient())  # type: ignore[arg-type]
    answers: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"a": report(hits=10, misses=10), "b": report()}, {}),
        ({"a": report(hits=40, misses=20)}, {"c": "no answer within 10 s"}),
        ({"a": report(hits=40, misses=20)}, {}),
    ]

    def reports(
        workers: object = None, *, left_out: dict[str, str] | None = None
    ) -> dict[str, Any]:
        got, silent = answers.pop(0)
        assert left_out is not None
        left_out.update(silent)
        return got

    engine.memory_reports = reports  # type: ignore[method-assign]
    engine.memory_summary()
    engine.mark_fit_start()
    summary = engine.memory_summary()
    # The sums of the history rows are unchanged.
    assert summary["cache_bytes"] == 200 * MiB
    assert summary["worker_pauses"] == 1
    rows = {r["worker"]: r for r in engine.memory_table()}
    assert rows["a"]["cache_hit_rate"] == pytest.approx(30 / 40)
    assert rows["b"]["status"] == GONE_STATUS
    assert rows["c"]["status"] == NO_ANSWER_STATUS
    # A departed worker is reported once; a silent one that leaves, once.
    engine.memory_summary()
    rows = {r["worker"]: r for r in engine.memory_table()}
    assert set(rows) == {"a", "c"} and rows["c"]["status"] == GONE_STATUS


def test_engine_counts_shard_lookups_from_the_fit_start() -> None:
    engine = Engine(_FakeClient())  # type: ignore[arg-type]
    answers = [
        {"a": report(hits=10, misses=10, shard_reads=(5, 5)), "b": report()},
        {
            "a": report(hits=40, misses=20, shard_reads=(35, 15)),
            "b": report(shard_reads=(1, 3)),  # its shard cache made in the fit
        },
    ]

    def reports(
        workers: object = None, *, left_out: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return answers.pop(0)

    engine.memory_reports = reports  # type: ignore[method-assign]
    engine.memory_summary()
    engine.mark_fit_start()
    engine.memory_summary()
    rows = {r["worker"]: r for r in engine.memory_table()}
    assert (rows["a"]["shard_hits"], rows["a"]["shard_misses"]) == (30, 10)
    assert rows["a"]["shard_hit_rate"] == pytest.approx(0.75)
    assert rows["a"]["cache_hit_rate"] == pytest.approx(30 / 40)
    assert rows["b"]["shard_hit_rate"] == pytest.approx(0.25)
    assert math.isnan(rows["b"]["cache_hit_rate"])


# -- events -> dashboard columns -----------------------------------------------
def _event(store: str, step: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"store": store, "step": step, "epoch": step // 3, "workers": rows}


def test_memory_table_takes_the_latest_table_of_the_store() -> None:
    rows = memory_rows(
        {"tcp://w:2": report(), "tcp://w:1": report(peak_rss=800 * MiB)},
        missing={"tcp://w:3": (GONE_STATUS, "left")},
    )
    events = [
        (1.0, _event("a.zarr", 3, rows[:1])),
        (2.0, "not a table"),
        (3.0, {"store": "a.zarr", "step": 4}),  # no workers: ignored
        (4.0, _event("b.zarr", 3, rows[:1])),
        (5.0, _event("a.zarr", 6, list(reversed(rows)))),
    ]
    table = memory_table(events, store="a.zarr")
    assert table is not None
    assert (table.store, table.step, table.epoch, table.n_workers) == (
        "a.zarr",
        6,
        2,
        3,
    )
    assert set(table.columns) == set(MEMORY_COLUMNS)
    assert table.columns["worker"] == ["tcp://w:1", "tcp://w:2", "tcp://w:3"]
    assert table.columns["peak_rss_fraction"][:2] == [0.8, 0.5]
    assert table.columns["status"] == ["running", "running", GONE_STATUS]
    # The departed worker's numbers are NaN, its note kept.
    assert math.isnan(table.columns["held_bytes"][2])
    assert table.columns["note"] == ["", "", "left"]
    # Other stores, too-early tables, no tables.
    b = memory_table(events, store="b.zarr")
    assert b is not None and b.n_workers == 1
    assert memory_table(events, store="a.zarr", since=6.0) is None
    assert memory_table([], store="a.zarr") is None


def test_dashboard_data_shows_the_current_runs_table_only() -> None:
    table = _event("a.zarr", 3, memory_rows({"tcp://w:1": report()}))
    rows = [(float(t), {"store": "a.zarr", "step": t, "loss": 1.0}) for t in (1, 2)]
    data = dashboard_data(rows, [(2.5, table)])
    assert data.memory is not None and data.memory.columns["worker"] == ["tcp://w:1"]
    # The store is run again from scratch: the old run's table is not its.
    rerun = [*rows, (3.0, {"store": "a.zarr", "step": 1, "loss": 1.0})]
    assert dashboard_data(rerun, [(2.5, table)]).memory is None
    # No tables: none shown; no runs: none either.
    assert dashboard_data(rows).memory is None
    assert dashboard_data([], [(2.5, table)]).memory is None


# -- HTML ------------------------------------------------------------------------
def test_memory_html_has_one_row_per_worker_and_escapes_everything() -> None:
    hostile = "<script>alert(1)</script>"
    rows = memory_rows(
        {
            "tcp://w:1": report(hits=3, misses=1, shards=10 * MiB, shard_reads=(9, 1)),
            f"tcp://{hostile}:2": report(status=f"paused{hostile}"),
        },
        missing={"tcp://w:3": (NO_ANSWER_STATUS, f"no answer {hostile} & <b>")},
    )
    table = memory_table([(1.0, _event(f"{hostile}.zarr", 3, rows))])
    text = memory_html(table)
    assert "<script" not in text and "<b>&lt;" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "no answer &lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in text
    body = text.split("<tbody>")[1]
    assert body.count("<tr>") == 3
    # Sorted by address ("<" before "w"): the hostile one first.
    by_row = body.split("<tr>")[1:]
    assert "alert" in by_row[0]
    # The answering worker's cells: MiB, fractions of the limit, hit rate.
    cells = re.findall(r"<td[^>]*>(.*?)</td>", by_row[1])
    assert cells[0] == "<code>tcp://w:1</code>" and cells[1] == "running"
    assert cells[2:8] == [
        "1000 MiB",
        "650 MiB",
        "400 MiB",
        "210 MiB",
        "200 MiB",
        "10.0 MiB",
    ]
    assert cells[8:10] == ["450 MiB (45%)", "500 MiB (50%)"]
    assert cells[10:] == ["3", "1", "75.0%", "90.0%"]
    # No shard lookups (no tables): n/a, as the chunk column before any.
    other = re.findall(r"<td[^>]*>(.*?)</td>", by_row[0])
    assert other[-2:] == ["n/a", "n/a"]
    heads = re.findall(r"<th[^>]*>(.*?)</th>", text)
    assert heads[-2:] == ["chunk-cache hit rate", "shard-cache hit rate"]
    # The silent worker: why, across the numbers' columns.
    silent = by_row[2]
    assert 'colspan="12"' in silent and NO_ANSWER_STATUS in silent
    assert memory_html(None) == ""


def test_sizes_get_a_binary_unit() -> None:
    table = memory_table(
        [
            (
                1.0,
                _event(
                    "a",
                    3,
                    [
                        {"worker": "w", "status": "running", "limit_bytes": b}
                        for b in (0, 1023, 20_000, 1331 * MiB, 2 * 2**40, 5000 * 2**40)
                    ],
                ),
            )
        ]
    )
    cells = re.findall(
        r"<tr><td[^>]*><code>w</code></td><td[^>]*>running</td>"
        r"<td[^>]*>(.*?)</td>",
        memory_html(table),
    )
    assert cells == ["0 B", "1023 B", "19.5 KiB", "1.30 GiB", "2.00 TiB", "5000 TiB"]


def test_trainer_repr_names_the_worst_worker() -> None:
    engine = SimpleNamespace(
        last_memory={
            "tcp://w:1": report(peak_rss=300 * MiB),
            "tcp://w:2": report(peak_rss=640 * MiB),
        },
        last_memory_missing={"tcp://w:3": (NO_ANSWER_STATUS, "no answer")},
    )
    text = dt.Trainer._memory_repr(SimpleNamespace(_engine=engine))  # type: ignore[arg-type]
    assert text == (
        "; worker caches 400 of 800 MiB, peak RSS 64% of the limit on tcp://w:2, "
        "1 worker(s) not answering"
    )
    assert "\n" not in text
    no_reports = SimpleNamespace(_engine=SimpleNamespace(last_memory={}))
    assert dt.Trainer._memory_repr(no_reports) == ""  # type: ignore[arg-type]
