"""Minibatch training speed: dasktrain's segments against one process.

Run by hand from the repository root (it is not a test; PyTorch comes from
the ``bench`` extra, ``pip install -e '.[bench]' torch``)::

    python3 benchmarks/step_engine.py                   # every case, 3 repeats
    python3 benchmarks/step_engine.py --only mlp --repeats 5
    python3 benchmarks/step_engine.py --rows 200000     # a quick look

Cases, each timed on the same data in the same run:

``mlp``, ``mlp-deep``
    MLP 64 -> 256 -> 1 (logistic) and 64 -> 256 -> 128 -> 10 (softmax), Adam
    1e-3, one epoch at batch 512 (and 1,024, 8,192 for ``mlp``).  dasktrain:
    ``Trainer.fit`` on an embedded ``LocalCluster`` of ``--workers`` worker
    processes with one thread each (the second epoch, data cached on the
    workers), against one PyTorch CPU process with as many threads, the
    data as one tensor in RAM, a shuffled minibatch per step.  The loss of
    each after that epoch, on all the rows, is printed with the ratio.
``logistic``
    Logistic regression, 100 float32 features, SGD 0.1, batch 1,024, one
    epoch (the second: cached), against a single-process NumPy minibatch loop
    over the same rows in RAM (float32 products, float64 parameters, the same
    shuffled contiguous slices).
``overhead``
    A 4-feature logistic regression at batch 512 in 2 streams: the step time
    is almost all the engine's fixed cost.  Timed twice: as dasktrain runs
    it (such small steps run on one rank: the optimizer and the bookkeeping)
    and forced onto one rank per worker (``dasktrain.ranks.one-rank-work``
    0: the exchange between the two ranks too).  Printed as milliseconds
    per step with the single-process NumPy step beside it.

The MLP and logistic cases run as dasktrain chooses: steps of at most
``dasktrain.ranks.one-rank-work`` (rows x parameters) run on one rank.
``--spread`` sets it to 0 (one rank per worker thread for every case).

Timings are medians over ``--repeats`` runs; ratios are dasktrain's rows/s
over the baseline's (above 1.0: dasktrain is faster).  Nothing is left behind
but the data stores under ``data/`` (reused by later runs).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import dasktrain as dt

DATA = Path(__file__).resolve().parents[1] / "data"


@dataclass
class Timing:
    name: str
    baseline: str
    ours: list[float]  # rows/s
    theirs: list[float]
    loss_ours: float = float("nan")
    loss_theirs: float = float("nan")

    def line(self) -> str:
        a, b = statistics.median(self.ours), statistics.median(self.theirs)
        loss = ""
        if np.isfinite(self.loss_ours):
            loss = (
                f"  loss {self.loss_ours:.4f} vs {self.loss_theirs:.4f} "
                f"({self.loss_ours / self.loss_theirs - 1:+.1%})"
            )
        return (
            f"  {self.name:<28} dasktrain {a:>10,.0f} rows/s   {self.baseline} "
            f"{b:>10,.0f} rows/s   ratio {a / b:5.2f}x{loss}"
        )


class EpochClock(dt.Callback):
    """When each epoch ended (the client's view: the end of its segment)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_epoch_end(self, trainer: dt.Trainer, row: dict[str, Any]) -> None:
        self.times.append(time.perf_counter())


def dasktrain_epoch(
    client: Any,
    data: dt.Dataset,
    model: Callable[[], dt.models.Model],
    opt: Callable[[], Any],
    batch: int,
    workdir: Path,
    n_streams: int | None = None,
) -> float:
    """Seconds of the second epoch (the first warms the workers' caches and
    the ranks' connections)."""
    clock = EpochClock()
    store = Path(tempfile.mkdtemp(dir=workdir)) / "run.zarr"
    trainer = dt.Trainer(model(), opt(), store=store, client=client)
    trainer.fit(
        data,
        epochs=2,
        batch_rows=batch,
        n_streams=n_streams,
        callbacks=[clock],
        progress=False,
    )
    assert len(clock.times) == 2, clock.times
    trainer.close()
    return clock.times[1] - clock.times[0]


def one_epoch_loss(
    client: Any,
    data: dt.Dataset,
    model: Callable[[], dt.models.Model],
    opt: Callable[[], Any],
    batch: int,
    workdir: Path,
) -> float:
    store = Path(tempfile.mkdtemp(dir=workdir)) / "run.zarr"
    trainer = dt.Trainer(model(), opt(), store=store, client=client)
    trainer.fit(data, epochs=1, batch_rows=batch, progress=False)
    loss = float(trainer.evaluate(data)["loss"])
    trainer.close()
    return loss


# -- PyTorch ---------------------------------------------------------------------
def torch_mlp(
    X: np.ndarray,
    y: np.ndarray,
    sizes: tuple[int, ...],
    n_outputs: int,
    batch: int,
    threads: int,
    seed: int,
) -> tuple[float, float]:
    """Seconds of one epoch of Adam (after a few warm-up steps) and the loss
    on all rows after it."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    layers: list[Any] = []
    fan_in = X.shape[1]
    for h in sizes:
        layers += [torch.nn.Linear(fan_in, h), torch.nn.ReLU()]
        fan_in = h
    layers.append(torch.nn.Linear(fan_in, n_outputs))
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    Xt = torch.from_numpy(X)
    if n_outputs == 1:
        yt = torch.from_numpy(y.astype(np.float32)).unsqueeze(1)
        loss_fn: Any = torch.nn.BCEWithLogitsLoss()
    else:
        yt = torch.from_numpy(y.astype(np.int64))
        loss_fn = torch.nn.CrossEntropyLoss()
    n = X.shape[0]

    def step(idx: Any) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(Xt[idx]), yt[idx])
        loss.backward()
        opt.step()

    for _ in range(5):  # warm-up
        step(torch.randint(0, n, (batch,)))
    perm = torch.randperm(n)
    t0 = time.perf_counter()
    for a in range(0, n, batch):
        step(perm[a : a + batch])
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        loss = float(loss_fn(net(Xt), yt))
    return seconds, loss


# -- NumPy ------------------------------------------------------------------------
def numpy_logistic_epoch(X: np.ndarray, y: np.ndarray, batch: int, lr: float) -> float:
    """One epoch of plain minibatch SGD in one process: shuffled contiguous
    slices, float32 products, float64 parameters."""
    n, d = X.shape
    w = np.zeros(d)
    b = 0.0
    yf = y.astype(np.float32)
    starts = np.random.default_rng(0).permutation(np.arange(0, n, batch))
    t0 = time.perf_counter()
    for a in starts:
        Xb = X[a : a + batch]
        z = Xb @ w.astype(np.float32) + np.float32(b)
        r = 1.0 / (1.0 + np.exp(-z)) - yf[a : a + batch]
        m = Xb.shape[0]
        w -= lr * (Xb.T @ r).astype(np.float64) / m
        b -= lr * float(r.sum(dtype=np.float64)) / m
    return time.perf_counter() - t0


# -- the run ------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="mlp,mlp-deep,logistic,overhead")
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--logistic-rows", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--spread",
        action="store_true",
        help="one rank per worker thread for every case (no one-rank steps)",
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    import dask
    import distributed
    from distributed import Client, LocalCluster

    from dasktrain.loops.minibatch import ONE_RANK_WORK_KEY

    if args.spread:
        dask.config.set({ONE_RANK_WORK_KEY: 0})

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
        if only & {"mlp", "mlp-deep"}:
            print("PyTorch is not installed: skipping the MLP cases", file=sys.stderr)
            only -= {"mlp", "mlp-deep"}
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, dask "
        f"{dask.__version__}, distributed {distributed.__version__}, torch "
        f"{torch_version}; {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    print(
        f"{args.workers} worker processes x 1 thread; baselines: one process with "
        f"{args.workers} threads; medians of {args.repeats} runs"
    )
    DATA.mkdir(exist_ok=True)
    results: list[Timing] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
            local_directory=tmp,
        ) as cluster,
        Client(cluster) as client,
    ):
        work = Path(tmp)
        mlp_cases = []
        if "mlp" in only:
            mlp_cases += [("mlp", (256,), 1, b) for b in (512, 1_024, 8_192)]
        if "mlp-deep" in only:
            mlp_cases += [("mlp-deep", (256, 128), 10, 512)]
        for name, hidden, n_out, batch in mlp_cases:
            n_classes = 2 if n_out == 1 else n_out
            data = dt.datasets.make_classification(
                DATA / f"step_engine_{n_classes}c_{args.rows}.zarr",
                n_rows=args.rows,
                n_features=64,
                n_classes=n_classes,
                chunk_rows=32_768,
                client=client,
                progress=False,
            )
            X = np.asarray(data.to_dask("X").compute())
            y = np.asarray(data.to_dask("y").compute())
            loss = "logistic" if n_out == 1 else "softmax"

            def model(
                hidden: tuple[int, ...] = hidden, n_out: int = n_out, loss: str = loss
            ) -> dt.models.Model:
                return dt.models.MLP(hidden, n_out, loss=loss)

            def adam() -> Any:
                return dt.optim.Adam(1e-3)

            t = Timing(f"{name} batch {batch}", "torch", [], [])
            for r in range(args.repeats):
                secs = dasktrain_epoch(client, data, model, adam, batch, work)
                t.ours.append(args.rows / secs)
                tsecs, tloss = torch_mlp(
                    X, y, hidden, n_out, batch, args.workers, seed=r
                )
                t.theirs.append(args.rows / tsecs)
            t.loss_ours = one_epoch_loss(client, data, model, adam, batch, work)
            t.loss_theirs = tloss
            print(t.line(), flush=True)
            results.append(t)
        if "logistic" in only:
            data = dt.datasets.make_classification(
                DATA / f"step_engine_logistic_{args.logistic_rows}.zarr",
                n_rows=args.logistic_rows,
                n_features=100,
                chunk_rows=65_536,
                client=client,
                progress=False,
            )
            X = np.asarray(data.to_dask("X").compute())
            y = np.asarray(data.to_dask("y").compute())
            t = Timing("logistic 100 batch 1024", "NumPy", [], [])
            for _ in range(args.repeats):
                secs = dasktrain_epoch(
                    client,
                    data,
                    lambda: dt.models.LogisticRegression(),
                    lambda: dt.optim.SGD(0.1),
                    1_024,
                    work,
                )
                t.ours.append(args.logistic_rows / secs)
                t.theirs.append(
                    args.logistic_rows / numpy_logistic_epoch(X, y, 1_024, 0.1)
                )
            print(t.line(), flush=True)
            results.append(t)
            del X, y
        if "overhead" in only:
            rows = 512 * 2_000
            data = dt.datasets.make_classification(
                DATA / f"step_engine_tiny_{rows}.zarr",
                n_rows=rows,
                n_features=4,
                chunk_rows=16_384,
                client=client,
                progress=False,
            )
            X = np.asarray(data.to_dask("X").compute())
            y = np.asarray(data.to_dask("y").compute())
            for label, work_limit in (("", None), (", 2 ranks", 0)):
                ours, theirs = [], []
                for _ in range(args.repeats):
                    with dask.config.set(
                        {} if work_limit is None else {ONE_RANK_WORK_KEY: work_limit}
                    ):
                        secs = dasktrain_epoch(
                            client,
                            data,
                            lambda: dt.models.LogisticRegression(),
                            lambda: dt.optim.SGD(0.1),
                            512,
                            work,
                            n_streams=2,
                        )
                    ours.append(secs / 2_000 * 1e3)
                    theirs.append(numpy_logistic_epoch(X, y, 512, 0.1) / 2_000 * 1e3)
                name = f"overhead: 4 features, b 512{label}"
                print(
                    f"  {name:<28} dasktrain "
                    f"{statistics.median(ours):6.3f} ms/step   NumPy in one process "
                    f"{statistics.median(theirs):6.3f} ms/step   fixed cost "
                    f"{statistics.median(ours) - statistics.median(theirs):6.3f} "
                    "ms/step",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
