"""Parameter server benchmarks: a ratings problem where embeddings matter,
and matrix factorization with a user table larger than a worker's memory.

Run by hand from the repository root (it is not a test)::

    python3 benchmarks/parameter_server.py             # movielens, reduced size
    python3 benchmarks/parameter_server.py --users 100000 --items 20000 \\
        --ratings 20000000                             # movielens, full size
    python3 benchmarks/parameter_server.py --problem large-table  # 10M users x 32

``--problem movielens`` (the default) generates with
:func:`dasktrain.datasets.make_ratings` a MovieLens-like store (about 200
ratings per user, Zipf item popularity, rank-8 true factors plus user and item
biases plus noise of known standard deviation: the noise floor) in each row
order of ``--orders`` (grouped by user, shuffled, hot users), and a held-out
store from the same true factors (``draw=1``; a split by chunks of
user-grouped rows would hold out whole users).  It trains
``MatrixFactorization`` on sharded tables with Adagrad, and, in the same run,
a single-process in-RAM NumPy implementation of the same sparse Adagrad update
(same steps, same chunks in the same order; touched rows found by argsort and
their gradients summed by ``np.add.reduceat``), plus the same update with
rank 0 (the bias-only model).  It prints validation RMSE against the noise
floor and against bias-only, and dasktrain's throughput as a ratio of the
NumPy loop's.  Targets: RMSE within 10% of the noise floor, far below
bias-only.

``--problem large-table`` trains ``MatrixFactorization`` with a 1.3 GB user
table on a process ``LocalCluster`` of ``--workers`` single-threaded workers
limited to ``--memory-limit`` each, and prints per step: rows/s, bytes of
table shards read and written, the size of the shards the step touched, and
at the end peak worker RSS, worker restarts, and the validation RMSE against
the generator's noise floor.  Targets: bytes written per step within 2x of the
touched shards' size, and peak worker RSS under the memory limit.  With 2
ratings per user, embeddings cannot be identified there (see
``benchmarks/README.md``).
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
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from out_of_core import RssSampler, _parse_bytes, _spilled

#: Per-problem defaults of the options that differ between the two problems.
DEFAULTS: dict[str, dict[str, Any]] = {
    "movielens": {
        "users": 10_000,
        "items": 2_000,
        "ratings": 2_000_000,
        "rank": 8,
        "chunk_rows": 65_536,
        "batch_rows": 131_072,
        "epochs": 8,
        "learning_rate": 0.3,
        "l2": 0.05,
        "memory_limit": "2GiB",
    },
    "large-table": {
        "users": 10_000_000,
        "items": 100_000,
        "ratings": 20_000_000,
        "rank": 32,
        "chunk_rows": 262_144,
        "batch_rows": 262_144,
        "epochs": 1,
        "learning_rate": 1.0,
        "l2": 1.0,
        "memory_limit": "1GiB",
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=sorted(DEFAULTS), default="movielens")
    parser.add_argument("--users", type=int)
    parser.add_argument("--items", type=int)
    parser.add_argument("--ratings", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--chunk-rows", type=int)
    parser.add_argument("--batch-rows", type=int)
    parser.add_argument(
        "--n-streams",
        type=int,
        help="streams of a step (default: the library's default for the batch)",
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--l2", type=float)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit")
    parser.add_argument(
        "--orders",
        default="user,shuffled",
        help="movielens: comma-separated row orders (user, shuffled, hot_users)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="movielens: held-out ratings, as a fraction of --ratings",
    )
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.problem].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.problem == "movielens":
        return movielens(args)
    return large_table(args)


def large_table(args: argparse.Namespace) -> int:
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
                regularization="occurrence",  # as measured in benchmarks/README.md
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
                n_streams=args.n_streams,
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
        f"{'step':>5} {'M rows/s':>8} {'read MB':>8} {'written MB':>10} "  # checkpoints
        f"{'shards written':>14} {'written / touched':>17}"
    )
    ratios = []
    for r in rows:
        if "shards_written" not in r:
            continue  # a step inside a segment: its checkpoint writes later
        touched = r["shards_written"] * per_shard
        ratio = r["shard_bytes_written"] / touched if touched else float("nan")
        ratios.append(ratio)
        if len(ratios) <= 3 or len(ratios) % 20 == 0 or r is rows[-1]:
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
        f"bytes written per checkpoint / changed shards' size: median "
        f"{statistics.median(ratios):.2f}, max {max(ratios):.2f} (target <= 2)"
    )
    checkpoints = [r["shard_bytes_written"] for r in rows if "shards_written" in r]
    print(
        f"table size {table_bytes / 1e6:.0f} MB; median written per checkpoint "
        f"{statistics.median(checkpoints) / 1e6:.1f} MB"
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


# -- movielens: a problem where embeddings matter ------------------------------


def load_rows(ds: Any) -> dict[int, dict[str, np.ndarray]]:
    """Every chunk of ``ds`` in RAM on the client: chunk id -> fields."""
    return {
        c: {f: np.asarray(ds.read(f, c)) for f in ("user", "item", "rating")}
        for c in ds.chunk_ids
    }


def _touched(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, rows)``: a stable argsort of ``ids``, where each run
    of equal ids starts in the sorted order, and the distinct ids."""
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return order, starts, ordered[starts]


class NumpyAdagradMF:
    """Biased matrix factorization trained by the sparse Adagrad update of
    dasktrain's sharded tables, in one process with the tables in RAM.

    Per step, on the step's rows: the errors; per table, the touched rows
    (argsort) and their summed gradients (``np.add.reduceat``), plus
    ``l2 * e`` once per touched row (``regularization="row"``), divided by
    the step's row count (a mean loss); Adagrad on the touched rows only:
    ``a += g^2; e -= lr * g / (sqrt(a) + eps)``.  The global offset ``mu``
    takes the same Adagrad step.  ``rank=0`` is the bias-only model.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        rank: int,
        *,
        learning_rate: float,
        l2: float,
        mu_init: float,
        init_scale: float,
        eps: float,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.rank, self.lr, self.l2, self.eps = rank, learning_rate, l2, eps
        self.tables = {}
        for name, n in (("user", n_users), ("item", n_items)):
            table = np.zeros((n, rank + 1))
            table[:, :rank] = rng.normal(0.0, init_scale, (n, rank))
            self.tables[name] = table
        self.acc = {name: np.zeros_like(t) for name, t in self.tables.items()}
        self.mu = mu_init
        self.mu_acc = 0.0

    def predict(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        U, V, k = self.tables["user"][user], self.tables["item"][item], self.rank
        return self.mu + U[:, k] + V[:, k] + np.einsum("ij,ij->i", U[:, :k], V[:, :k])

    def step(self, user: np.ndarray, item: np.ndarray, rating: np.ndarray) -> None:
        k, n = self.rank, rating.shape[0]
        U, V = self.tables["user"][user], self.tables["item"][item]
        err = self.predict(user, item) - rating
        for name, ids, other in (("user", user, V), ("item", item, U)):
            g = np.empty((n, k + 1))
            g[:, :k] = err[:, None] * other[:, :k]
            g[:, k] = err
            order, starts, rows = _touched(ids)
            grad = np.add.reduceat(g[order], starts, axis=0)
            table, acc = self.tables[name], self.acc[name]
            grad[:, :k] += self.l2 * table[rows, :k]
            grad /= n
            acc[rows] += grad * grad
            table[rows] -= self.lr * grad / (np.sqrt(acc[rows]) + self.eps)
        g_mu = float(err.mean())
        self.mu_acc += g_mu * g_mu
        self.mu -= self.lr * g_mu / (np.sqrt(self.mu_acc) + self.eps)

    def rmse(self, rows: dict[int, dict[str, np.ndarray]]) -> float:
        sq = n = 0.0
        for r in rows.values():
            err = self.predict(r["user"], r["item"]) - r["rating"]
            sq += float(err @ err)
            n += err.shape[0]
        return float(np.sqrt(sq / n))


def numpy_fit(
    model: NumpyAdagradMF,
    rows: dict[int, dict[str, np.ndarray]],
    plans: list[list[list[Any]]],
) -> float:
    """Train ``model`` over the steps of ``plans`` (one list of steps per
    epoch, each step a list of pieces); returns the seconds spent."""
    t0 = time.perf_counter()
    for steps in plans:
        for pieces in steps:
            batch = {
                f: np.concatenate(
                    [rows[p.chunk_id][f][p.start : p.stop] for p in pieces]
                )
                for f in ("user", "item", "rating")
            }
            model.step(batch["user"], batch["item"], batch["rating"].astype(np.float64))
    return time.perf_counter() - t0


def movielens(args: argparse.Namespace) -> int:
    from distributed import Client, LocalCluster

    import dasktrain as dt
    from dasktrain.engine.plan import epoch_steps

    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    n_val = max(1, round(args.val_fraction * args.ratings))
    eps, init_scale, seed = 1e-8, 0.1, 0
    results = []
    with tempfile.TemporaryDirectory(prefix="dasktrain-ps-", dir="data") as tmp:
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            memory_limit=_parse_bytes(args.memory_limit),
            local_directory=tmp,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
        try:
            for order in orders:
                base = (
                    f"data/bench-movielens-{args.users}u-{args.items}i-"
                    f"{args.ratings}r-{args.chunk_rows}-{order}"
                )
                common = {
                    "n_users": args.users,
                    "n_items": args.items,
                    "rank": 8,
                    "noise": args.noise,
                    "item_skew": 1.0,
                    "order": order,
                    "chunk_rows": args.chunk_rows,
                    "seed": seed,
                    "client": client,
                    "progress": False,
                }
                t0 = time.perf_counter()
                train = dt.datasets.make_ratings(
                    f"{base}.zarr", n_ratings=args.ratings, **common
                )
                # Held out: the same true factors, other rows (for the
                # grouped order, the same users' other ratings).
                val_order = "shuffled" if order == "user" else order
                val = dt.datasets.make_ratings(
                    f"{base}-val.zarr",
                    n_ratings=n_val,
                    draw=1,
                    **{**common, "order": val_order},
                )
                print(
                    f"[{order}] stores: {train.n_rows:,} training ratings in "
                    f"{train.n_chunks} chunks, {val.n_rows:,} held out "
                    f"({time.perf_counter() - t0:.0f} s to make or open)"
                )
                train_rows, val_rows = load_rows(train), load_rows(val)
                mean = float(
                    np.mean(np.concatenate([r["rating"] for r in train_rows.values()]))
                )
                plans = [
                    epoch_steps(
                        train.chunk_ids,
                        train.chunk_n_rows,
                        batch_rows=args.batch_rows,
                        seed=seed,
                        epoch=e,
                    )
                    for e in range(args.epochs)
                ]
                n_steps = sum(len(p) for p in plans)
                trained_rows = args.epochs * train.n_rows
                hyper = {
                    "learning_rate": args.learning_rate,
                    "l2": args.l2,
                    "mu_init": mean,
                    "init_scale": init_scale,
                    "eps": eps,
                }
                ref = NumpyAdagradMF(args.users, args.items, args.rank, **hyper)
                ref_seconds = numpy_fit(ref, train_rows, plans)
                bias = NumpyAdagradMF(args.users, args.items, 0, **hyper)
                numpy_fit(bias, train_rows, plans)

                model = dt.models.MatrixFactorization(
                    args.users,
                    args.items,
                    args.rank,
                    l2=args.l2,
                    regularization="row",
                    init_scale=init_scale,
                    mu_init=mean,
                    dtype="float32",
                )
                trainer = dt.Trainer(
                    model,
                    dt.optim.Adagrad(
                        args.learning_rate, initial_accumulator=0.0, eps=eps
                    ),
                    store=os.path.abspath(os.path.join(tmp, f"{order}.zarr")),
                    client=client,
                    sharded=True,
                    seed=seed,
                )
                t0 = time.perf_counter()
                history = trainer.fit(
                    train,
                    epochs=args.epochs,
                    batch_rows=args.batch_rows,
                    n_streams=args.n_streams,
                    validation=val,
                    progress=False,
                )
                fit_seconds = time.perf_counter() - t0
                trainer.close()
                hist = history.to_pandas()
                step_seconds = float(hist["seconds"].sum())
                val_rmse = [v for v in hist.get("val_rmse", []) if v == v]
                results.append(
                    {
                        "order": order,
                        "steps": n_steps,
                        "dasktrain_rmse": val_rmse[-1] if val_rmse else float("nan"),
                        "rmse_per_epoch": val_rmse,
                        "numpy_rmse": ref.rmse(val_rows),
                        "bias_rmse": bias.rmse(val_rows),
                        "fit_seconds": fit_seconds,
                        "step_seconds": step_seconds,
                        "numpy_seconds": ref_seconds,
                        "rows": trained_rows,
                    }
                )
                r = results[-1]
                print(
                    f"[{order}] validation RMSE per epoch: "
                    f"{', '.join(f'{v:.4f}' for v in val_rmse)}"
                )
        finally:
            client.close()
            cluster.close()

    print()
    print(
        f"MatrixFactorization(rank={args.rank}, l2={args.l2}, regularization='row', "
        f"mu_init=mean), Adagrad({args.learning_rate}, initial_accumulator=0), "
        f"{args.epochs} epochs, batch_rows={args.batch_rows:,}, "
        f"{args.workers} workers; noise floor {args.noise}"
    )
    print(
        f"{'order':>9} {'steps':>5} {'RMSE':>7} {'/floor':>6} {'numpy':>7} "
        f"{'bias-only':>9} {'dasktrain M rows/s':>18} {'numpy M rows/s':>14} "
        f"{'ratio':>6}"
    )
    ok = True
    for r in results:
        dt_rate = r["rows"] / r["step_seconds"]
        np_rate = r["rows"] / r["numpy_seconds"]
        print(
            f"{r['order']:>9} {r['steps']:>5} {r['dasktrain_rmse']:>7.4f} "
            f"{r['dasktrain_rmse'] / args.noise:>6.3f} {r['numpy_rmse']:>7.4f} "
            f"{r['bias_rmse']:>9.4f} {dt_rate / 1e6:>18.3f} {np_rate / 1e6:>14.3f} "
            f"{dt_rate / np_rate:>6.3f}"
        )
        print(
            f"{'':>9} fit wall time {r['fit_seconds']:.1f} s (steps "
            f"{r['step_seconds']:.1f} s, the rest table init and validation); "
            f"NumPy loop {r['numpy_seconds']:.1f} s"
        )
        ok = ok and r["dasktrain_rmse"] <= 1.1 * args.noise
        ok = ok and r["dasktrain_rmse"] < r["bias_rmse"] - 0.5 * (
            r["bias_rmse"] - args.noise
        )
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
