"""Newton's first pass against the read+decode limit of the same store.

Run by hand from the repository root (it is not a test)::

    python3 benchmarks/first_pass.py                      # data/bench-2m.zarr
    python3 benchmarks/first_pass.py --store data/bench-scaled-1m.zarr
    python3 benchmarks/first_pass.py --repeats 5

The store must exist (``benchmarks/compare_peers.py`` writes both).  On its
training chunks (``Dataset.split(0.1, seed=0)``, as compare_peers), on a
2-worker process ``LocalCluster`` (one thread each, 127.0.0.1), it times in
turn, ``--repeats`` times, with the workers' chunk caches emptied before
every cold pass:

* ``read+decode, 2 processes`` and ``read+decode, 1 process, 2 threads``:
  ``read_chunk`` of every ``X`` and ``y`` chunk, over disjoint chunk sets, no
  compute (the processes are started and warmed up before timing).  The
  faster of the two is the limit of a first pass on 2 cores.
* ``read+decode kept in memory, 2 processes``: the same, holding every
  chunk until the end as the workers' caches do (fresh memory for every
  chunk: the first touch of its pages costs page faults).
* ``read+decode on the workers``: an engine pass that evaluates the loss
  only (the least compute a pass can do), cold.
* ``Newton first pass, cold``: the one-pass start (local Newton solves on
  every chunk), as ``Newton()``'s first pass, with the chunks read ahead in
  a background thread of each worker while the previous chunk is solved.
* ``Newton first pass, cached`` and ``gradient pass, cached``: the same with
  the chunks in the workers' caches (the compute alone, plus the pass's
  fixed cost).

It prints the medians and the ratio of the cold first pass to the decode
limit, and to the sum of the limit and the cached first pass (1.0: decode
and compute add up on the two cores with no idle time; less: they overlap).
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = REPO_ROOT / "data" / "bench-2m.zarr"
N_WORKERS = 2
VAL_FRACTION = 0.1
SPLIT_SEED = 0
L2 = 1e-4


def clear_worker_cache(dask_worker: Any) -> int:
    """``client.run`` target: empty the worker's decoded-chunk cache."""
    from dasktrain.engine.cache import PLUGIN_NAME, CachePlugin

    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CachePlugin) or plugin.cache is None:
        return 0
    plugin.cache.clear()
    gc.collect()
    return 1


def decode_chunks(url: str, chunk_ids: list[int], keep: bool = False) -> int:
    """Read and decode ``X`` and ``y`` of ``chunk_ids`` (a process pool's
    task); returns the rows.  With ``keep``, every decoded chunk is held
    until the end, as a worker's cache holds them (each needs fresh memory,
    whose first touch costs page faults); otherwise each is dropped at once
    and the next reuses its memory."""
    import dasktrain as dt
    from dasktrain.data.io import read_chunk

    ref = dt.Dataset.open(url).ref
    rows = 0
    held = []
    for c in chunk_ids:
        x = read_chunk(ref, "X", c)
        y = read_chunk(ref, "y", c)
        rows += x.shape[0]
        if keep:
            held.append((x, y))
    del held
    return rows


def decode_in_process(train: Any, threads: int) -> None:
    """Every training chunk of ``X`` and ``y`` read and decoded, by
    ``threads`` threads of this process over contiguous chunk ranges."""
    from dasktrain.data.io import read_chunk

    ids = list(train.chunk_ids)
    parts = [ids[i::threads] for i in range(threads)]

    def work(part: list[int]) -> None:
        for c in part:
            read_chunk(train.ref, "X", c)
            read_chunk(train.ref, "y", c)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    import dasktrain as dt
    from dasktrain.engine.engine import Engine
    from dasktrain.engine.plan import full_pass
    from dasktrain.engine.second_order import SecondOrderEngine

    warnings.simplefilter("ignore")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    ds = dt.Dataset.open(str(args.store))
    train, _ = ds.split(VAL_FRACTION, seed=SPLIT_SEED)
    model = dt.models.LogisticRegression(l2=L2)
    opt = dt.optim.Newton()
    params = {"w": np.zeros(ds.n_features), "b": np.zeros(())}
    x0 = np.zeros(ds.n_features + 1)
    pieces = full_pass(train.chunk_ids, train.chunk_n_rows)
    print(
        f"first pass: {args.store} ({train.n_rows:,} training rows, "
        f"{len(train.chunk_ids)} chunks), {N_WORKERS} workers x 1 thread"
    )
    ids = [int(c) for c in train.chunk_ids]
    parts = [ids[i::N_WORKERS] for i in range(N_WORKERS)]
    with (
        ProcessPoolExecutor(N_WORKERS) as pool,
        LocalCluster(
            n_workers=N_WORKERS,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        engine = Engine(client)
        second = SecondOrderEngine(engine)

        def loss_pass() -> None:
            engine.run_pass(
                train.ref,
                model,
                params,
                pieces,
                placement_chunks=train.chunk_ids,
                with_grads=False,
            )

        def newton_first() -> None:
            second.run_pass(
                train.ref,
                model,
                [x0],
                pieces,
                placement_chunks=train.chunk_ids,
                hessian_rows=opt.hessian_rows,
                local_iterations=opt.local_iterations,
                local_rows=opt.local_rows,
            )

        def gradient_pass() -> None:
            engine.run_pass(
                train.ref, model, params, pieces, placement_chunks=train.chunk_ids
            )

        loss_pass()  # workers import and warm up once, untimed
        # The pool's processes start and import once, untimed.
        list(pool.map(decode_chunks, [str(args.store)] * N_WORKERS, [[ids[0]]] * 2))

        def decode_in_processes(keep: bool = False) -> None:
            urls = [str(args.store)] * N_WORKERS
            list(pool.map(decode_chunks, urls, parts, [keep] * N_WORKERS))

        cases: dict[str, tuple[Callable[[], None], bool]] = {
            "read+decode, 2 processes": (decode_in_processes, False),
            "read+decode kept in memory, 2 processes": (
                lambda: decode_in_processes(keep=True),
                False,
            ),
            "read+decode, 1 process, 2 threads": (
                lambda: decode_in_process(train, N_WORKERS),
                False,
            ),
            "read+decode on the workers (loss pass)": (loss_pass, True),
            "Newton first pass, cold": (newton_first, True),
            "Newton first pass, cached": (newton_first, False),
            "gradient pass, cached": (gradient_pass, False),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (fn, cold) in cases.items():
                if cold:
                    client.run(clear_worker_cache)  # sync point
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, values in times.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {name:42s} {med[name]:7.3f} s   ({runs})")
    limit = min(
        med["read+decode, 1 process, 2 threads"], med["read+decode, 2 processes"]
    )
    cold = med["Newton first pass, cold"]
    cached = med["Newton first pass, cached"]
    kept = med["read+decode kept in memory, 2 processes"]
    print(f"  cold first pass / read+decode limit:            {cold / limit:5.2f}")
    print(f"  cold first pass / read+decode kept in memory:   {cold / kept:5.2f}")
    print(
        f"  cold first pass / (limit + cached first pass):  "
        f"{cold / (limit + cached):5.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
