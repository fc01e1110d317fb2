"""Parameter server: matrix factorization with a user table larger than a
worker's memory.

Run by hand from the repository root (it is not a test)::

    python3 benchmarks/parameter_server.py                 # 10M users x 32, 20M ratings
    python3 benchmarks/parameter_server.py --users 2000000 --ratings 4000000

It generates (once) a ratings store under ``data/`` with
:func:`dasktrain.datasets.make_ratings` (rows grouped by user), then trains
``MatrixFactorization`` (sharded tables, Adagrad) on a process
``LocalCluster`` of ``--workers`` single-threaded workers limited to
``--memory-limit`` each, and prints per step: rows/s, bytes of table shards
read and written, the size of the shards the step touched, and at the end
peak worker RSS, worker restarts, and the validation RMSE against the
generator's noise floor.

Targets: bytes written per step within 2x of the touched shards' size, and
peak worker RSS under the memory limit.

Defaults (Adagrad with no initial accumulator, learning rate 1, l2 1, one
epoch) were picked on a 200,000-user copy of the problem (same 2 ratings per
user): the gradient of a user row is a mean over the whole batch (about
1e-5), and Adagrad's per-entry normalization makes the step independent of
that scale; later epochs overfit the users' two ratings.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from out_of_core import RssSampler, _parse_bytes, _spilled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--ratings", type=int, default=20_000_000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--chunk-rows", type=int, default=262_144)
    parser.add_argument("--batch-rows", type=int, default=262_144)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    parser.add_argument("--l2", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GiB")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    import dasktrain as dt

    limit = _parse_bytes(args.memory_limit)
    path = (
        f"data/bench-ratings-{args.users}u-{args.items}i-{args.ratings}r"
        f"-{args.chunk_rows}.zarr"
    )
    with tempfile.TemporaryDirectory(prefix="dasktrain-ps-", dir="data") as tmp:
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
            t0 = time.perf_counter()
            ds = dt.datasets.make_ratings(
                path,
                n_users=args.users,
                n_items=args.items,
                n_ratings=args.ratings,
                rank=8,
                noise=args.noise,
                chunk_rows=args.chunk_rows,
                seed=0,
                client=client,
            )
            print(
                f"store {path}: {ds.n_rows:,} ratings in {ds.n_chunks} chunks "
                f"({time.perf_counter() - t0:.0f} s to make or open)"
            )
            train, val = ds.split(val_fraction=0.05, seed=0)
            model = dt.models.MatrixFactorization(
                args.users,
                args.items,
                args.rank,
                l2=args.l2,
                init_scale=0.01,
                dtype="float32",
            )
            table_bytes = sum(t.nbytes for t in model.tables().values())
            print(
                f"tables: {table_bytes / 2**30:.2f} GiB in total "
                f"(user {args.users:,} x {args.rank + 1} float32); workers: "
                f"{args.workers} x {args.memory_limit}"
            )
            pids_before = client.run(os.getpid)
            sampler = RssSampler(list(pids_before.values()))
            sampler.start()
            trainer = dt.Trainer(
                model,
                dt.optim.Adagrad(args.learning_rate, initial_accumulator=0.0, eps=1e-8),
                store=os.path.abspath(os.path.join(tmp, "run.zarr")),
                client=client,
            )
            t0 = time.perf_counter()
            history = trainer.fit(
                train,
                epochs=args.epochs,
                batch_rows=args.batch_rows,
                validation=val,
                progress=True,
            )
            fit_seconds = time.perf_counter() - t0
            sampler.stop()
            pids_after = client.run(os.getpid)
            spilled = client.run(_spilled)
            ps = dt.ParamStore.open(trainer.store_path)
            layouts = ps.table_layouts()
            trainer.close()
        finally:
            client.close()
            cluster.close()

    rows = history.rows
    # Bytes of one shard of a table, all its arrays (parameters + state).
    shard_bytes = {name: layout.shard_nbytes for name, layout in layouts.items()}
    per_shard = statistics.mean(shard_bytes.values())
    print()
    print(
        f"{'step':>5} {'M rows/s':>8} {'read MB':>8} {'written MB':>10} "
        f"{'shards written':>14} {'written / touched':>17}"
    )
    ratios = []
    for r in rows:
        touched = r["shards_written"] * per_shard
        ratio = r["shard_bytes_written"] / touched if touched else float("nan")
        ratios.append(ratio)
        if r["step"] <= 3 or r["step"] % 20 == 0 or r is rows[-1]:
            print(
                f"{r['step']:>5} {r['rows_per_s'] / 1e6:>8.3f} "
                f"{r['shard_bytes_read'] / 1e6:>8.1f} "
                f"{r['shard_bytes_written'] / 1e6:>10.1f} "
                f"{r['shards_written']:>14} {ratio:>17.2f}"
            )
    steady = [r["rows_per_s"] for r in rows[1:]] or [rows[0]["rows_per_s"]]
    peak = max(sampler.peak.values())
    restarts = len(set(pids_before.values()) ^ set(pids_after.values())) // 2
    val_rmse = [r.get("val_rmse") for r in rows if r.get("val_rmse") is not None]
    print()
    print(f"fit: {fit_seconds:.0f} s for {len(rows)} steps")
    print(f"median throughput: {statistics.median(steady) / 1e6:.3f} M rows/s")
    print(
        f"bytes written per step / touched shards' size: median "
        f"{statistics.median(ratios):.2f}, max {max(ratios):.2f} (target <= 2)"
    )
    print(
        f"table size {table_bytes / 1e6:.0f} MB; median written per step "
        f"{statistics.median(r['shard_bytes_written'] for r in rows) / 1e6:.1f} MB"
    )
    print(
        f"peak worker RSS: {peak / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB "
        f"({peak / limit:.0%}); worker restarts: {restarts}; "
        f"spilled bytes: {sum(spilled.values())}"
    )
    if val_rmse:
        print(
            f"validation RMSE after each epoch: "
            f"{', '.join(f'{v:.4f}' for v in val_rmse)} "
            f"(noise floor {args.noise}; ratio {val_rmse[-1] / args.noise:.2f})"
        )
    ok = peak < limit and restarts == 0 and max(ratios) <= 2.0
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
