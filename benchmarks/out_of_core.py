"""Out-of-core training: a store several times larger than the workers' memory.

Run by hand from the repository root (it is not a test)::

    python3 benchmarks/out_of_core.py          # 15M x 100 (6 GB), 2 workers x 1 GiB
    python3 benchmarks/out_of_core.py --rows 4000000 --memory-limit 512MiB
    python3 benchmarks/out_of_core.py --rows 6000000 --sweep   # 384 MiB ... 2 GiB

It generates (once) a float32 classification store under ``data/`` whose size
is at least ``--ratio`` times the total worker memory limit, then in one run:

1. The decode limit: every chunk of ``X`` and ``y`` read and decoded by
   ``--workers`` processes over disjoint chunks (no training), rows/s.
2. dasktrain: full-batch logistic-regression epochs (Adam) on a process
   ``LocalCluster`` with ``--workers`` single-threaded workers limited to
   ``--memory-limit`` each; rows/s per epoch from the history.

While training it samples every worker's RSS and records worker restarts
(worker process ids before/after) and spilled bytes.  It prints the table
and the ratio epoch rows/s / decode-limit rows/s (target >= 0.8), and checks
that peak worker RSS stayed under the limit with no restarts and no spilling.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psutil

TARGET_RATIO = 0.8


def _parse_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(text))


def _decode_chunks(url: str, chunk_ids: list[int]) -> int:
    from dasktrain.data import Dataset

    ds = Dataset.open(url)
    n = 0
    for c in chunk_ids:
        from dasktrain.data.io import read_chunk

        x = read_chunk(ds.ref, "X", c)
        read_chunk(ds.ref, "y", c)
        n += x.shape[0]
    return n


def decode_limit(url: str, chunk_ids: list[int], workers: int) -> float:
    """Rows/s of reading+decoding every chunk with ``workers`` processes."""
    parts = [chunk_ids[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(
            pool.map(_decode_chunks, [url] * workers, [p[:1] for p in parts])
        )  # warm up
        t0 = time.perf_counter()
        rows = sum(pool.map(_decode_chunks, [url] * workers, parts))
        return rows / (time.perf_counter() - t0)


def _decode_in_threads(url: str, parts: list[list[int]]) -> float:
    """In one process: rows/s of reading+decoding ``parts`` in one thread
    each (after a warm-up read of one chunk per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(_decode_chunks, [url] * len(parts), [p[:1] for p in parts]))
        t0 = time.perf_counter()
        rows = sum(pool.map(_decode_chunks, [url] * len(parts), parts))
        return rows / (time.perf_counter() - t0)


def decode_limit_one_process(url: str, chunk_ids: list[int], threads: int) -> float:
    """Rows/s of reading+decoding every chunk in a single fresh process with
    ``threads`` threads (the issue's definition of the limit)."""
    parts = [chunk_ids[i::threads] for i in range(threads)]
    with ProcessPoolExecutor(1) as pool:
        return float(pool.submit(_decode_in_threads, url, parts).result())


class RssSampler(threading.Thread):
    """Samples the RSS of a set of processes every ``interval`` seconds."""

    def __init__(self, pids: list[int], interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.procs = [psutil.Process(p) for p in pids]
        self.interval = interval
        self.peak = dict.fromkeys(pids, 0)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for p in self.procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _spilled(dask_worker: Any) -> int:
    """Bytes this worker has spilled to disk so far."""
    total = getattr(dask_worker.data, "spilled_total", None)
    return int(getattr(total, "disk", 0) or 0)


def _budget(dask_worker: Any) -> dict[str, Any]:
    from dasktrain.engine.budget import budget_of

    return budget_of(dask_worker).stats().to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=15_000_000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GiB")
    parser.add_argument(
        "--ratio", type=float, default=3.0, help="store size / total memory"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--codec", default="lz4", choices=("lz4", "zstd", "none"))
    parser.add_argument(
        "--decode-repeats",
        type=int,
        default=0,
        help="measurements of the limit (at least one before and one after each epoch)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="run at 384MiB, 512MiB, 1GiB and 2GiB worker limits (same store, "
        "sized for the largest --ratio allows) and print one row per limit",
    )
    args = parser.parse_args(argv)
    if not args.sweep:
        return 0 if run_limit(args, args.memory_limit)["ok"] else 1
    rows = [run_limit(args, limit) for limit in SWEEP_LIMITS]
    print()
    print(
        f"{'limit':>7} {'M rows/s':>9} {'limit M rows/s':>14} {'ratio':>6} "
        f"{'peak RSS':>9} {'pauses':>6} {'restarts':>8} {'spilled':>8} {'hit rate':>8}"
    )
    for r in rows:
        print(
            f"{r['limit']:>7} {r['rows_s'] / 1e6:>9.2f} "
            f"{r['limit_rows_s'] / 1e6:>14.2f} "
            f"{r['ratio']:>6.2f} {r['peak_fraction']:>9.0%} {r['pauses']:>6} "
            f"{r['restarts']:>8} {r['spilled']:>8} {r['hit_rate']:>8.2f}"
        )
    return 0 if all(r["ok"] for r in rows) else 1


SWEEP_LIMITS = ("384MiB", "512MiB", "1GiB", "2GiB")


def run_limit(args: argparse.Namespace, memory_limit: str) -> dict[str, Any]:
    """One benchmark run with workers limited to ``memory_limit``."""
    from distributed import Client, LocalCluster

    import dasktrain as dt

    limit = _parse_bytes(memory_limit)
    path = f"data/bench-ooc-{args.rows}x{args.features}-{args.codec}.zarr"
    with tempfile.TemporaryDirectory(prefix="dasktrain-ooc-") as tmp:
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            memory_limit=limit,
            local_directory=tmp,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
        try:
            ds = dt.datasets.make_classification(
                path,
                n_rows=args.rows,
                n_features=args.features,
                codec=args.codec,
                seed=0,
                client=client,
            )
            total_memory = limit * args.workers
            ratio = ds.nbytes / total_memory
            print(
                f"store {path}: {ds.n_rows:,} x {ds.n_features}, "
                f"{ds.nbytes / 2**30:.2f} GiB "
                f"= {ratio:.1f}x the workers' total memory limit "
                f"({args.workers} x {memory_limit})"
            )
            if ratio < args.ratio:
                print(
                    f"warning: the store is smaller than {args.ratio}x the memory limit"
                )

            # The limit varies a lot from one measurement to the next (3x
            # between two runs on a quiet machine), mostly with the machine's
            # load: measure it before and after every epoch, and compare each
            # epoch with the mean of the two measurements around it.
            chunk_ids = list(ds.chunk_ids)

            def measure() -> None:
                limits.append(decode_limit(ds.path, chunk_ids, args.workers))
                limits_1p.append(
                    decode_limit_one_process(ds.path, chunk_ids, args.workers)
                )

            limits: list[float] = []
            limits_1p: list[float] = []
            measure()
            print(
                f"decode limit before training: {args.workers} processes "
                f"{limits[0] / 1e6:.2f} M rows/s, 1 process x {args.workers} "
                f"threads {limits_1p[0] / 1e6:.2f} M rows/s"
            )

            pids_before = client.run(os.getpid)
            sampler = RssSampler(list(pids_before.values()))
            sampler.start()
            trainer = dt.Trainer(
                dt.models.LogisticRegression(l2=1e-4),
                dt.optim.Adam(0.05),
                store=os.path.join(tmp, "run.zarr"),
                client=client,
            )
            for epoch in range(1, args.epochs + 1):
                # fit(epochs=e) continues the same run to e epochs in total.
                history = trainer.fit(ds, epochs=epoch, progress=True)
                measure()
            sampler.stop()
            for _ in range(args.decode_repeats - 1 - args.epochs):  # extra ones
                measure()
            limit_rows_s = statistics.median(limits)
            for name, values in (
                (f"{args.workers} processes", limits),
                (f"1 process x {args.workers} threads", limits_1p),
            ):
                print(
                    f"decode limit, {name}, every measurement: "
                    + ", ".join(f"{x / 1e6:.2f}" for x in values)
                    + f" M rows/s; median {statistics.median(values) / 1e6:.2f}"
                )
            pids_after = client.run(os.getpid)
            spilled = client.run(_spilled)
            budgets = client.run(_budget)
            trainer.close()
        finally:
            client.close()
            cluster.close()

    rows_s = [r["rows_per_s"] for r in history]
    hit = [r.get("cache_hit_rate", float("nan")) for r in history]
    # Each epoch against the limit measured just before and just after it.
    around = [(limits[i] + limits[i + 1]) / 2 for i in range(len(history))]
    paired = [r / lim for r, lim in zip(rows_s, around, strict=True)]
    around_1p = [(limits_1p[i] + limits_1p[i + 1]) / 2 for i in range(len(history))]
    paired_1p = [r / lim for r, lim in zip(rows_s, around_1p, strict=True)]
    print()
    print(
        f"{'epoch':>5} {'seconds':>8} {'M rows/s':>9} {'cache hits':>10} "
        f"{'limit around':>12} {'ratio':>6} {'1-process limit':>15} {'ratio':>6}"
    )
    for r, h, lim, q, lim1, q1 in zip(
        history, hit, around, paired, around_1p, paired_1p, strict=True
    ):
        print(
            f"{r['epoch']:>5} {r['seconds']:>8.2f} "
            f"{r['rows_per_s'] / 1e6:>9.2f} {h:>10.2f} {lim / 1e6:>12.2f} {q:>6.2f}"
            f" {lim1 / 1e6:>15.2f} {q1:>6.2f}"
        )
    median = statistics.median(rows_s)
    peak = max(sampler.peak.values())
    restarts = sorted(set(pids_before.values()) ^ set(pids_after.values()))
    print()
    print(f"median epoch throughput: {median / 1e6:.2f} M rows/s")
    print(
        f"ratio to the single-process read+decode limit (1 process x "
        f"{args.workers} threads): {statistics.median(paired_1p):.2f}x "
        f"(target >= {TARGET_RATIO}); the median of each epoch against the "
        f"limit measured around it"
    )
    print(
        f"ratio to the {args.workers}-process limit (stricter): "
        f"{statistics.median(paired):.2f}x; median epoch / median limit: "
        f"{median / limit_rows_s:.2f}x"
    )
    print(
        f"peak worker RSS: {peak / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB "
        f"({peak / limit:.0%}); worker restarts: {len(restarts) // 2}; "
        f"spilled bytes: {sum(spilled.values())}"
    )
    pauses = sum(int(b["pauses"]) for b in budgets.values())
    print(f"pauses seen by the memory budget: {pauses}")
    for address, b in sorted(budgets.items()):
        print(
            f"budget of {address}: ceiling {b['ceiling'] / 2**20:.0f} MiB, "
            f"baseline {b['baseline_rss'] / 2**20:.0f}, working set "
            f"{b['working_set'] / 2**20:.0f}, other {b['other'] / 2**20:.0f}, "
            f"held {b['held'] / 2**20:.0f}; evictions {b['evictions']}, "
            f"trims {b['trims']}"
        )
    ok = peak < limit and not restarts and not any(spilled.values()) and not pauses
    print("bounded memory: " + ("yes" if ok else "NO"))
    finite_hits = [h for h in hit if h == h]
    return {
        "limit": memory_limit,
        "rows_s": median,
        "limit_rows_s": statistics.median(limits_1p),
        "ratio": statistics.median(paired_1p),
        "peak_fraction": peak / limit,
        "pauses": pauses,
        "restarts": len(restarts) // 2,
        "spilled": sum(spilled.values()),
        "hit_rate": statistics.median(finite_hits) if finite_hits else float("nan"),
        "ok": ok,
    }


if __name__ == "__main__":
    sys.exit(main())
