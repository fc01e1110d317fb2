"""Throughput of one full-batch gradient pass: NumPy in RAM vs. dasktrain.

Run by hand from the repository root (it is not a test)::

    python3 benchmarks/epoch_throughput.py                  # lz4 store, 2M x 100
    python3 benchmarks/epoch_throughput.py --codec zstd
    python3 benchmarks/epoch_throughput.py --rows 500000 --repeats 3

The synthetic store (``make_classification``: float32 ``X``, int8 ``y``) is
generated once per codec under ``data/`` (git-ignored) and reused.  One run
measures, for binary logistic regression:

1. In RAM: a plain NumPy gradient pass over the whole array held in this
   process (margins ``X @ w``, sigmoid residual, ``X.T @ r``; float32
   arithmetic, float64 sums) with the default BLAS threads and with one, and
   the dasktrain kernel chunk by chunk on one thread.  The faster of the two
   NumPy passes is the in-RAM baseline.
2. The decode limit: every chunk of ``X`` and ``y`` read and decoded with
   :func:`dasktrain.data.io.read_chunk` by ``--workers`` processes (started
   without, then with the environment Dask gives its workers), and by as many
   threads of one process, over disjoint chunks.
3. dasktrain on an embedded process ``LocalCluster`` (one thread per worker):
   full-batch ``Trainer.fit`` steps (``history`` ``seconds``) and bare
   ``Engine.run_pass`` calls, alternating, with the data cold (worker chunk
   caches cleared before each pass) and cached on the workers, plus passes of
   one-row pieces (the fixed cost of a pass).

``--malloc-trim unset`` starts the workers without Dask's
``MALLOC_TRIM_THRESHOLD_`` (an experiment: glibc then reuses the buffers of
decoded chunks instead of page-faulting fresh memory for each).

It prints a table, where the time of a pass goes, and the ratios.  "Cold"
means cold worker caches: the operating system's page cache is warm (the store
was just read), so "read" is a copy from memory, not disk I/O.

Nothing is left behind but the data store: the cluster, its scratch space and
the trainer's parameter store live in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from distributed import Client

    from dasktrain import Dataset
    from dasktrain.data.io import DatasetRef
    from dasktrain.engine.engine import Engine
    from dasktrain.models.base import Model
    from dasktrain.partial import Partial

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROWS = 2_000_000
N_FEATURES = 100
DEFAULT_CODEC = "lz4"
CODECS = ("lz4", "zstd", "none")
DEFAULT_REPEATS = 5
DEFAULT_COLD_REPEATS = 3
DEFAULT_WORKERS = 2
#: Untimed passes before the in-process measurements (page faults, BLAS
#: thread start-up).
WARMUP_PASSES = 1
#: cached / in-RAM throughput we aim for.
TARGET_CACHED_RATIO = 0.5
#: Learning rate of the full-batch SGD steps (its value does not matter here).
LEARNING_RATE = 0.1
#: Seconds each decode-pool process sleeps once, so that all of them are
#: running before the timed reads are submitted.
POOL_READY_SECONDS = 0.3
#: Engine and NumPy gradients agree to float32 accumulation error.
GRAD_RTOL = 1e-3
LABEL_WIDTH = 58
#: glibc reads it at process start; Dask sets it for workers (65536 by default).
MALLOC_TRIM_VARIABLE = "MALLOC_TRIM_THRESHOLD_"
MALLOC_TRIM_CHOICES = ("dask", "unset")


# -- value types ----------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds per pass of one measurement, one entry per repeat."""

    label: str
    seconds: tuple[float, ...]
    n_rows: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rows_per_s(self) -> float:
        return self.n_rows / self.median


@dataclass(frozen=True)
class PassCost:
    """One ``Engine.run_pass``: wall time and what its tasks reported."""

    wall: float
    task_seconds: tuple[float, ...]
    hits: int
    misses: int

    @property
    def task_max(self) -> float:
        """The slowest task: the compute critical path (tasks run in parallel)."""
        return max(self.task_seconds)

    @property
    def task_sum(self) -> float:
        return sum(self.task_seconds)


@dataclass(frozen=True)
class InRam:
    numpy_default: Timing
    numpy_one_thread: Timing
    kernel: Timing
    finite_check_seconds: float
    loss_sum: float
    grad_w: np.ndarray

    @property
    def baseline(self) -> Timing:
        """The faster NumPy pass (a loaded machine can make two threads slower)."""
        return min(self.numpy_default, self.numpy_one_thread, key=lambda t: t.median)


@dataclass(frozen=True)
class Decode:
    processes: Timing
    processes_dask_env: Timing
    threads: Timing
    per_core_rows_per_s: float

    @property
    def limit(self) -> Timing:
        """The fastest way of reading the store found here."""
        return min(
            self.processes,
            self.processes_dask_env,
            self.threads,
            key=lambda t: t.median,
        )


@dataclass
class Cluster:
    fresh: float = float("nan")
    trainer_cold: list[float] = field(default_factory=list)
    trainer_cached: list[float] = field(default_factory=list)
    fit_fixed: list[float] = field(default_factory=list)
    hit_rates_cold: list[float] = field(default_factory=list)
    hit_rates_cached: list[float] = field(default_factory=list)
    engine_cold: list[PassCost] = field(default_factory=list)
    engine_cached: list[PassCost] = field(default_factory=list)
    engine_floor: list[PassCost] = field(default_factory=list)
    partial: Partial | None = None


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_median(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of ``a[i] - b[i]``: differences of measurements taken one after
    the other cancel most of a shared machine's drifting load."""
    return _median([x - y for x, y in zip(a, b, strict=True)])


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:8.1f}"


# -- 1. in RAM ------------------------------------------------------------------


def numpy_gradient_pass(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.float32
) -> tuple[float, np.ndarray, float]:
    """Logistic loss sum and gradient sums over all rows of ``X``.

    ``X`` and ``w`` are float32; the loss and bias-gradient sums are float64
    and the weight gradient is returned as float64.
    """
    z = X @ w  # margins, float32
    z += b
    yf = y.astype(np.float32)
    softplus = np.logaddexp(np.float32(0.0), z)  # log(1 + e^z)
    residual = np.exp(z - softplus)  # sigmoid(z)
    residual -= yf
    z *= yf
    softplus -= z  # per-row loss: log(1 + e^z) - y z
    loss_sum = float(np.sum(softplus, dtype=np.float64))
    grad_w = (X.T @ residual).astype(np.float64)
    grad_b = float(np.sum(residual, dtype=np.float64))
    return loss_sum, grad_w, grad_b


def time_repeats(
    label: str, fn: Callable[[], object], repeats: int, n_rows: int
) -> Timing:
    """Wall seconds of ``repeats`` calls of ``fn`` after warm-up calls."""
    for _ in range(WARMUP_PASSES):
        fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return Timing(label, tuple(seconds), n_rows)


def load_in_ram(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole store in this process (untimed)."""
    import zarr

    group = zarr.open_group(path, mode="r", use_consolidated=False)
    X = np.asarray(group["X"][:])  # type: ignore[index]
    y = np.asarray(group["y"][:])  # type: ignore[index]
    return X, y


def measure_in_ram(
    ds: Dataset, model: Model, w: np.ndarray, b: float, repeats: int
) -> InRam:
    from threadpoolctl import threadpool_info, threadpool_limits

    from dasktrain.data.io import check_finite

    X, y = load_in_ram(ds.path)
    w32, b32 = w.astype(np.float32), np.float32(b)
    loss_sum, grad_w, _ = numpy_gradient_pass(X, y, w32, b32)
    n_threads = max((p["num_threads"] for p in threadpool_info()), default=1)
    numpy_default = time_repeats(
        f"NumPy in RAM, 1 process, {n_threads} BLAS threads",
        lambda: numpy_gradient_pass(X, y, w32, b32),
        repeats,
        ds.n_rows,
    )
    bounds = [ds.chunk_bounds(c) for c in ds.chunk_ids]
    params32 = {"w": w32, "b": np.asarray(b32)}

    def kernel_pass() -> None:
        for start, stop in bounds:
            model.loss_and_grad(params32, {"X": X[start:stop], "y": y[start:stop]})

    with threadpool_limits(1):
        numpy_one_thread = time_repeats(
            "NumPy in RAM, 1 process, 1 BLAS thread",
            lambda: numpy_gradient_pass(X, y, w32, b32),
            repeats,
            ds.n_rows,
        )
        kernel = time_repeats(
            "dasktrain kernel per chunk, in RAM, 1 thread",
            kernel_pass,
            repeats,
            ds.n_rows,
        )
    t0 = time.perf_counter()
    for chunk_id, (start, stop) in zip(ds.chunk_ids, bounds, strict=True):
        check_finite(X[start:stop], ds.ref, "X", chunk_id)
    finite_s = time.perf_counter() - t0
    return InRam(numpy_default, numpy_one_thread, kernel, finite_s, loss_sum, grad_w)


# -- 2. the decode limit --------------------------------------------------------


def split_parts(chunk_ids: Sequence[int], n_parts: int) -> list[list[int]]:
    """Contiguous, nearly equal, disjoint parts (as the engine places chunks)."""
    bounds = np.linspace(0, len(chunk_ids), n_parts + 1).round().astype(int)
    return [list(chunk_ids[a:b]) for a, b in itertools.pairwise(bounds)]


def read_chunks(ref: DatasetRef, chunk_ids: Sequence[int]) -> tuple[float, int]:
    """Read and decode ``X`` and ``y`` of the chunks; (seconds, rows)."""
    from dasktrain.data.io import read_chunk

    t0 = time.perf_counter()
    n_rows = 0
    for c in chunk_ids:
        n_rows += read_chunk(ref, "X", c).shape[0]
        read_chunk(ref, "y", c)
    return time.perf_counter() - t0, n_rows


def open_handles(ref: DatasetRef) -> None:
    """Import zarr and open the array handles (untimed)."""
    from dasktrain.data.io import read_chunk

    read_chunk(ref, "X", ref.n_chunks - 1)
    read_chunk(ref, "y", ref.n_chunks - 1)


def _ready() -> int:
    time.sleep(POOL_READY_SECONDS)
    return os.getpid()


def time_decode(
    label: str, pool: Executor, ref: DatasetRef, parts: list[list[int]], repeats: int
) -> tuple[Timing, list[float]]:
    """Passes of ``len(parts)`` concurrent readers; also each reader's seconds."""
    # Sync point: wait until every pool member runs (spawned processes start lazily).
    for f in [pool.submit(_ready) for _ in parts]:
        f.result()
    walls, part_seconds = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        futures = [pool.submit(read_chunks, ref, part) for part in parts]
        results = [f.result() for f in futures]
        walls.append(time.perf_counter() - t0)
        part_seconds += [s for s, _ in results]
    return Timing(label, tuple(walls), ref.n_rows), part_seconds


@contextlib.contextmanager
def environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for ``None``, remove) environment variables for a while; child
    processes started meanwhile inherit them."""
    saved = {k: os.environ.get(k) for k in changes}

    def apply(values: Mapping[str, str | None]) -> None:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    apply(changes)
    try:
        yield
    finally:
        apply(saved)


def dask_worker_environ() -> dict[str, str | None]:
    """Variables a Dask nanny sets before it starts a worker process (e.g.
    ``MALLOC_TRIM_THRESHOLD_``, read by glibc only at process start)."""
    import dask

    env = dask.config.get("distributed.nanny.pre-spawn-environ")
    return {k: None if v is None else str(v) for k, v in env.items()}


def decode_in_processes(
    label: str,
    ds: Dataset,
    parts: list[list[int]],
    repeats: int,
    env: Mapping[str, str | None],
) -> tuple[Timing, list[float]]:
    ctx = multiprocessing.get_context("spawn")
    with (
        environment(env),
        ProcessPoolExecutor(
            len(parts), mp_context=ctx, initializer=open_handles, initargs=(ds.ref,)
        ) as pool,
    ):
        return time_decode(label, pool, ds.ref, parts, repeats)


def measure_decode(ds: Dataset, n_readers: int, repeats: int) -> Decode:
    parts = split_parts(ds.chunk_ids, n_readers)
    dask_env = dask_worker_environ()
    processes, part_seconds = decode_in_processes(
        f"decode limit: read_chunk X+y, {n_readers} processes",
        ds,
        parts,
        repeats,
        dict.fromkeys(dask_env),
    )
    processes_dask_env, _ = decode_in_processes(
        f"  same, with Dask's worker environment (malloc trim {_trim(dask_env)})",
        ds,
        parts,
        repeats,
        dask_env,
    )
    open_handles(ds.ref)
    with ThreadPoolExecutor(n_readers) as pool:
        threads, _ = time_decode(
            f"decode limit: read_chunk X+y, {n_readers} threads",
            pool,
            ds.ref,
            parts,
            repeats,
        )
    per_core = ds.n_rows / len(parts) / _median(part_seconds)
    return Decode(processes, processes_dask_env, threads, per_core)


def _trim(env: Mapping[str, str | None]) -> str:
    return env.get(MALLOC_TRIM_VARIABLE) or "unset"


# -- 3. the cluster -------------------------------------------------------------


def clear_worker_cache(dask_worker: Any) -> int:
    """``client.run`` target: empty the worker's decoded-chunk cache."""
    from dasktrain.engine.cache import PLUGIN_NAME, CachePlugin

    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CachePlugin) or plugin.cache is None:
        return 0
    n_entries = plugin.cache.stats().n_entries
    plugin.cache.clear()
    gc.collect()
    return n_entries


def cache_budget(dask_worker: Any) -> int:
    """``client.run`` target: the worker's cache budget in bytes."""
    from dasktrain.engine.cache import PLUGIN_NAME

    cache = getattr(dask_worker.plugins.get(PLUGIN_NAME), "cache", None)
    return int(cache.budget_bytes) if cache is not None else 0


def clear_caches(client: Client) -> None:
    # Sync point: one round trip to every worker.
    client.run(clear_worker_cache)


def engine_pass(
    engine: Engine,
    ds: Dataset,
    model: Model,
    params: dict[str, np.ndarray],
    pieces: Sequence[Any],
) -> tuple[PassCost, Partial]:
    # Sync point: run_pass returns the reduced partial of the whole pass.
    t0 = time.perf_counter()
    res = engine.run_pass(ds.ref, model, params, pieces, placement_chunks=ds.chunk_ids)
    wall = time.perf_counter() - t0
    reports = tuple(r.seconds for r in res.reports)
    return PassCost(wall, reports, res.cache_hits, res.cache_misses), res.partial


@contextlib.contextmanager
def worker_malloc_trim(setting: str) -> Iterator[None]:
    """``"dask"``: workers start with Dask's ``MALLOC_TRIM_THRESHOLD_``;
    ``"unset"``: without it (glibc's adaptive thresholds)."""
    if setting == "dask":
        yield
        return
    import dask

    key = f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM_VARIABLE}"
    with environment({MALLOC_TRIM_VARIABLE: None}), dask.config.set({key: None}):
        yield


def measure_cluster(
    ds: Dataset,
    model: Model,
    w: np.ndarray,
    b: float,
    *,
    n_workers: int,
    repeats: int,
    cold_repeats: int,
    malloc_trim: str,
) -> Cluster:
    """Trainer steps and bare engine passes, alternating so that both see the
    same machine load; they share the workers' chunk caches."""
    from distributed import Client, LocalCluster

    import dasktrain as dt
    from dasktrain.engine.engine import Engine
    from dasktrain.engine.plan import Piece, full_pass

    out = Cluster()
    params = {"w": w, "b": np.asarray(b)}
    pieces = full_pass(ds.chunk_ids, ds.chunk_n_rows)
    one_row = [Piece(c, 0, 1) for c in ds.chunk_ids]
    with tempfile.TemporaryDirectory(prefix="dasktrain-bench-") as tmp:
        with worker_malloc_trim(malloc_trim):
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                local_directory=tmp,
                silence_logs=logging.ERROR,
            )
        client = Client(cluster)
        try:
            trainer = dt.Trainer(
                model,
                dt.optim.SGD(LEARNING_RATE),
                store=os.path.join(tmp, "run.zarr"),
                client=client,
            )
            # Installs the cache plugin again; the trainer's tasks use it too.
            engine = Engine(client)
            budget = min(client.run(cache_budget).values())
            if budget < ds.nbytes / n_workers:
                print(
                    f"  warning: worker cache budget {budget / 2**20:,.0f} MiB < "
                    f"{ds.nbytes / n_workers / 2**20:,.0f} MiB of data per worker: "
                    f"'cached' passes re-read chunks"
                )

            epochs: list[int] = []  # (Trainer.epoch raises before the first fit)

            def fit_step() -> float:
                """One full-batch step of ``Trainer.fit``: its ``history``
                seconds; the rest of the fit call is its fixed cost."""
                epochs.append(len(epochs) + 1)
                t0 = time.perf_counter()
                trainer.fit(ds, epochs=epochs[-1], progress=False)
                wall = time.perf_counter() - t0
                step = trainer.history.column("seconds")[-1]
                out.fit_fixed.append(wall - step)
                return step

            def hit_rate() -> float:
                return trainer.history.column("cache_hit_rate")[-1]

            # (a) The first pass of a fresh cluster, then cold passes.
            out.fresh = fit_step()
            for _ in range(cold_repeats):
                clear_caches(client)
                out.trainer_cold.append(fit_step())
                out.hit_rates_cold.append(hit_rate())
                clear_caches(client)
                out.engine_cold.append(
                    engine_pass(engine, ds, model, params, pieces)[0]
                )
            # (b) Cached: the last cold pass filled the caches.
            for _ in range(repeats):
                out.trainer_cached.append(fit_step())
                out.hit_rates_cached.append(hit_rate())
                cost, out.partial = engine_pass(engine, ds, model, params, pieces)
                out.engine_cached.append(cost)
                out.engine_floor.append(
                    engine_pass(engine, ds, model, params, one_row)[0]
                )
            trainer.close()  # a cluster passed in: close() leaves it running
        finally:
            client.close()
            cluster.close()
    return out


# -- report ---------------------------------------------------------------------


def print_table(timings: Sequence[Timing], floor: Sequence[PassCost]) -> None:
    print(
        f"{'measurement':<{LABEL_WIDTH}} {'M rows/s':>9} {'ms/pass':>8} "
        f"{'min-max ms':>12} {'n':>3}"
    )
    for t in timings:
        spread = f"{1e3 * min(t.seconds):.0f}-{1e3 * max(t.seconds):.0f}"
        print(
            f"{t.label:<{LABEL_WIDTH}} {t.rows_per_s / 1e6:9.2f} {_ms(t.median)} "
            f"{spread:>12} {len(t.seconds):3d}"
        )
    walls = [c.wall for c in floor]
    spread = f"{1e3 * min(walls):.0f}-{1e3 * max(walls):.0f}"
    print(
        f"{'Engine.run_pass, 1-row pieces (fixed cost of a pass)':<{LABEL_WIDTH}} "
        f"{'':>9} {_ms(_median(walls))} {spread:>12} {len(walls):3d}"
    )


def print_checks(ram: InRam, res: Cluster) -> None:
    engine_hits = sum(c.hits for c in res.engine_cold)
    engine_misses = sum(c.misses for c in res.engine_cached)
    if engine_hits or engine_misses:
        print(
            f"  warning: engine passes had {engine_hits} cache hits when cold and "
            f"{engine_misses} misses when cached (expected 0 and 0)"
        )
    if any(h != 0 for h in res.hit_rates_cold) or any(
        h != 1 for h in res.hit_rates_cached
    ):
        print(
            f"  warning: cache hit rates cold {res.hit_rates_cold}, cached "
            f"{res.hit_rates_cached} (expected all 0 and all 1)"
        )
    if res.partial is not None:
        grad = np.asarray(res.partial.grads["w"], dtype=np.float64)
        rel = float(np.max(np.abs(grad - ram.grad_w)) / np.max(np.abs(ram.grad_w)))
        loss_rel = abs(res.partial.loss_sum - ram.loss_sum) / abs(ram.loss_sum)
        ok = rel < GRAD_RTOL and loss_rel < GRAD_RTOL
        print(
            f"  check: engine vs NumPy: gradient max rel diff {rel:.1e}, loss sum "
            f"rel diff {loss_rel:.1e} ({'ok' if ok else 'MISMATCH'})"
        )


def print_breakdown(ram: InRam, dec: Decode, res: Cluster, n_workers: int) -> None:
    cached_wall = _median([c.wall for c in res.engine_cached])
    cached_max = _median([c.task_max for c in res.engine_cached])
    cached_sum = _median([c.task_sum for c in res.engine_cached])
    n_tasks = len(res.engine_cached[0].task_seconds)
    cold_wall = _median([c.wall for c in res.engine_cold])
    cold_max = _median([c.task_max for c in res.engine_cold])
    cold_sum = _median([c.task_sum for c in res.engine_cold])
    read_sum = cold_sum - cached_sum
    floor = _median([c.wall for c in res.engine_floor])
    step = _median(res.trainer_cached)

    def line(label: str, seconds: float, note: str = "") -> None:
        print(f"    {label:<38}{_ms(seconds)}   {note}".rstrip())

    print()
    print("Where the time goes (medians, ms per pass). Tasks run in parallel: the")
    print("slowest task is the compute critical path.")
    print(f"  cached pass (Engine.run_pass), wall    {_ms(cached_wall)}")
    line("slowest task (compute)", cached_max)
    line(
        "overhead = wall - slowest task",
        cached_wall - cached_max,
        "scheduling, transfer, reduction",
    )
    line("a pass of 1-row pieces", floor, "the fixed cost alone")
    line(
        f"task time summed over {n_tasks} tasks",
        cached_sum,
        f"parallel efficiency {cached_sum / (n_workers * cached_wall):.0%}",
    )
    print(f"  cold pass (Engine.run_pass), wall      {_ms(cold_wall)}")
    line("slowest task", cold_max)
    line("task time summed", cold_sum)
    line(
        "read+decode+checks (cold - cached)",
        read_sum,
        f"{read_sum / cold_sum:.0%} of task time",
    )
    line("compute (cached task time)", cached_sum)
    line("check_finite of X alone (1 thread)", ram.finite_check_seconds)
    print(
        f"    decode per core (read_chunk X+y)      "
        f"{dec.per_core_rows_per_s / 1e6:8.2f} M rows/s"
    )
    print(f"  Trainer.fit step, cached               {_ms(step)}")
    line(
        "trainer overhead = step - run_pass",
        paired_median(res.trainer_cached, [c.wall for c in res.engine_cached]),
        "objective, optimizer update, checks",
    )
    line(
        "fit() call fixed cost",
        _median(res.fit_fixed),
        "lock, store, commit: once per fit call",
    )


def print_ratios(ram: InRam, dec: Decode, res: Cluster) -> None:
    n_rows = ram.baseline.n_rows
    cached = Timing("", tuple(res.trainer_cached), n_rows)
    cold = Timing("", tuple(res.trainer_cold), n_rows)
    base = ram.baseline.rows_per_s
    ratio = cached.rows_per_s / base
    met = "met" if ratio >= TARGET_CACHED_RATIO else "NOT met"
    overhead = paired_median(
        res.trainer_cached, [c.task_max for c in res.engine_cached]
    )
    print()
    print(f"Ratios (Trainer.fit steps; in-RAM = {ram.baseline.label}):")
    print(
        f"  cached / in-RAM       {ratio:6.2f}x   "
        f"target >= {TARGET_CACHED_RATIO}x: {met}"
    )
    print(f"  cold / in-RAM         {cold.rows_per_s / base:6.2f}x")
    print(
        f"  cold / decode limit   {cold.rows_per_s / dec.limit.rows_per_s:6.2f}x   "
        f"({dec.limit.label.split(', ')[-1]})"
    )
    print(
        f"  step overhead         {1e3 * overhead:6.1f} ms  "
        f"cached step - slowest task of the engine pass run after it"
    )


# -- main -----------------------------------------------------------------------


def store_path(rows: int, codec: str) -> Path:
    """``data/bench-2m.zarr`` for the default; other codecs get a suffix."""
    if rows % 1_000_000 == 0:
        size = f"{rows // 1_000_000}m"
    elif rows % 1_000 == 0:
        size = f"{rows // 1_000}k"
    else:
        size = str(rows)
    suffix = "" if codec == DEFAULT_CODEC else f"-{codec}"
    return REPO_ROOT / "data" / f"bench-{size}{suffix}.zarr"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Rows/s of a full-batch logistic-regression gradient pass: "
        "NumPy in RAM vs. dasktrain with cold and cached worker data.",
    )
    parser.add_argument(
        "--codec",
        choices=CODECS,
        default=DEFAULT_CODEC,
        help="store codec; each codec has its own store (default %(default)s)",
    )
    parser.add_argument(
        "--rows", type=int, default=DEFAULT_ROWS, help="rows (default %(default)s)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="timed repeats of each warm measurement (default %(default)s)",
    )
    parser.add_argument(
        "--cold-repeats",
        type=int,
        default=DEFAULT_COLD_REPEATS,
        help="cold passes, caches cleared before each (default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="worker processes, one thread each; also the decode-limit readers "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--malloc-trim",
        choices=MALLOC_TRIM_CHOICES,
        default="dask",
        help="workers' MALLOC_TRIM_THRESHOLD_: as Dask sets it (default), or "
        "unset (an experiment: glibc then reuses freed decode buffers)",
    )
    parser.add_argument(
        "--store", type=Path, default=None, help="data store path (default: per codec)"
    )
    args = parser.parse_args(argv)
    if min(args.rows, args.repeats, args.cold_repeats, args.workers) < 1:
        parser.error("--rows, --repeats, --cold-repeats and --workers must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import dask
    import distributed
    import zarr

    import dasktrain as dt

    logging.getLogger("distributed").setLevel(logging.ERROR)
    path = args.store or store_path(args.rows, args.codec)
    print(
        f"dasktrain epoch throughput: {args.rows:,} x {N_FEATURES} float32, codec "
        f"{args.codec}, {args.workers} workers x 1 thread; store {path}"
    )
    worker_trim = (
        _trim(dask_worker_environ()) if args.malloc_trim == "dask" else "unset"
    )
    print(
        f"  workers' {MALLOC_TRIM_VARIABLE}: {worker_trim} "
        f"(--malloc-trim {args.malloc_trim})"
    )
    print(
        f"  python {platform.python_version()}, numpy {np.__version__}, dask "
        f"{dask.__version__}, distributed {distributed.__version__}, zarr "
        f"{zarr.__version__}; {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    # Generated once per codec (on a temporary local cluster), then reused.
    ds = dt.datasets.make_classification(
        path, n_rows=args.rows, n_features=N_FEATURES, codec=args.codec, seed=0
    )
    if ds.codec != args.codec:
        print(f"error: {path} holds a {ds.codec} store, not {args.codec}")
        return 2
    print(
        f"  {ds.n_chunks} chunks of {ds.chunk_rows:,} rows, "
        f"{ds.nbytes / 2**20:,.0f} MiB decoded"
    )
    model = dt.models.LogisticRegression()
    rng = np.random.default_rng(0)
    w, b = rng.normal(scale=0.05, size=N_FEATURES), 0.1

    ram = measure_in_ram(ds, model, w, b, args.repeats)
    gc.collect()
    dec = measure_decode(ds, args.workers, args.repeats)
    res = measure_cluster(
        ds,
        model,
        w,
        b,
        n_workers=args.workers,
        repeats=args.repeats,
        cold_repeats=args.cold_repeats,
        malloc_trim=args.malloc_trim,
    )
    n = ds.n_rows
    timings = [
        ram.numpy_default,
        ram.numpy_one_thread,
        ram.kernel,
        dec.processes,
        dec.processes_dask_env,
        dec.threads,
        Timing("Trainer.fit step, first pass of a fresh cluster", (res.fresh,), n),
        Timing("Trainer.fit step, cold worker caches", tuple(res.trainer_cold), n),
        Timing("Trainer.fit step, cached on workers", tuple(res.trainer_cached), n),
        Timing(
            "Engine.run_pass, cold worker caches",
            tuple(c.wall for c in res.engine_cold),
            n,
        ),
        Timing(
            "Engine.run_pass, cached on workers",
            tuple(c.wall for c in res.engine_cached),
            n,
        ),
    ]
    print()
    print_table(timings, res.engine_floor)
    print_checks(ram, res)
    print_breakdown(ram, dec, res, args.workers)
    print_ratios(ram, dec, res)
    print(f"  load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
