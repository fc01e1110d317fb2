"""Time to a given training objective: dasktrain vs. scikit-learn and Dask peers.

Run by hand from the repository root (it is not a test)::

    pip install -e ".[bench]"        # scikit-learn, glum, dask-ml, dask-glm
    python3 benchmarks/compare_peers.py                       # everything, 2M x 100
    python3 benchmarks/compare_peers.py --problem scaled      # badly scaled, 1M x 100
    python3 benchmarks/compare_peers.py --only dasktrain-newton,daskglm-newton
    python3 benchmarks/compare_peers.py --rows 500000 --budget 60

The problem is L2-regularized binary logistic regression on one of two
synthetic stores (float32 ``X``, int8 ``y``, lz4, 65,536-row chunks;
generated once under ``data/`` and reused):

* ``--problem isotropic`` (default): the store of
  ``benchmarks/epoch_throughput.py`` (``make_classification``: standard normal
  columns), 2,000,000 rows.
* ``--problem scaled``: badly conditioned, 1,000,000 rows (400 MB): latent
  standard normal columns correlated with their neighbour (``x_j += 0.5
  x_{j-1}``), labels from a logistic model of the latent columns (Bayes
  accuracy about 0.9), then each column multiplied by a scale from
  ``logspace(-3, 3)`` in a seeded random order.  The L2 penalty makes the
  optimum well defined; the condition number of the Hessian is of order
  1e12.

The in-RAM solvers get ``X`` as stored (float32) on the isotropic problem
and widened to float64 (not timed) on the scaled one: in float32,
scikit-learn's newton-cholesky stalls there 40% above the optimum, its lbfgs
is 16% above after 1,024 iterations and glum 5% above after 200 (measured on
200,000 rows).  dasktrain computes in float32 on both (float32 kernels,
float64 sums, Hessians solved in float64 after Jacobi scaling).

The store is split by whole chunks with ``Dataset.split(0.1, seed=0)``; every
method trains on the same training chunks and is scored on the same held-out
chunks.

The training objective, for every method, is dasktrain's::

    f(w, b) = mean_i logloss(y_i, x_i @ w + b) + (l2 / 2) * ||w||^2

evaluated by this script in float64 on the data held in RAM.  A reference
fit, glum's ``GeneralizedLinearRegressor`` on the data in RAM with a tiny
gradient tolerance, gives the stopping threshold of the runs; ``f*`` is the
lowest objective any method reached.  (scikit-learn's converged lbfgs would
take minutes on the scaled problem, and its converged newton-cholesky stops
above the optimum there.)  Each method
is then timed to a relative gap ``(f - f*) / f*`` of 0.5% and 0.1%:

* dasktrain (``Trainer.fit``) reports every iteration or epoch through a
  callback: the time is the wall time since the ``Trainer`` was created, so it
  includes the first (cold) pass and the store commits.  Its SGD-family
  setting is local SGD (``fit(batch_rows=1024, local_steps=64)``): one
  round of minibatch SGD over each chunk on its worker, then averaging, per
  pass over the data.
* dasktrain's Newton (``dt.optim.Newton()``, its defaults: the one-pass start
  from per-chunk local solves, then damped Newton steps).
* The in-RAM baselines (scikit-learn's ``lbfgs`` and ``newton-cholesky``,
  glum) and the Dask peers only return their final coefficients: they
  are re-run with ``max_iter`` = 1, 2, 4, 8, ... and the time is that of the
  first run whose result reaches the gap.  That is the time-to-solution of a
  run *configured* with that ``max_iter``; solvers whose work per run does not
  depend on ``max_iter`` (a normalization pass) pay it again in every run.
* ``Incremental(SGDClassifier)`` runs 3 epochs (``partial_fit`` calls) and
  reports each.

Every measured run is a separate client process (started by this script)
connected to one 2-worker process ``LocalCluster`` (one thread per worker, on
127.0.0.1) held by this script; the workers are restarted before each method
so that one method's memory (dasktrain's chunk cache, say) does not count for
the next.  A background thread samples the resident memory (psutil) of the
client process and of the worker processes (``client.run(os.getpid)``).  A run
that passes ``--budget`` seconds is killed and reported as "> budget".

Peers and their regularization (see :data:`REGULARIZATION`)::

    scikit-learn  C = 1 / (l2 * n)                 (intercept not penalized)
    glum          alpha = l2, l1_ratio = 0         (mean loss + alpha/2 ||w||^2)
    dask-ml       C = 1 / (l2 * n); lamduh = 1 / C (intercept penalized)
    dask-glm      lamduh = l2 * n                  (intercept column penalized)
    dask-glm gradient_descent, newton: no regularization (no such parameter)
    SGDClassifier alpha = l2  (mean loss + alpha / 2 * ||w||^2)

dask-glm (used by dask-ml) also standardizes the columns by default, so its
penalty applies to coefficients on the standardized scale; on standard
normal columns that changes the optimum by far less than 0.1%, but on the
scaled problem it is another problem altogether, so there the penalized
dask-glm and dask-ml solvers get ``normalize=False``.

dask-ml 2025.1.0 and dask-glm 0.4.0 install and run unchanged with dask /
distributed 2026.8, numpy 2.4, pandas 3 and scikit-learn 1.9 (checked when this
benchmark was written); dask-glm's line searches make the scheduler log
"Detected different run_spec" warnings, which are silenced here.

Nothing is left behind but the data store: the cluster's scratch space and
dasktrain's parameter stores live in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

if TYPE_CHECKING:
    from distributed import Client

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = ("isotropic", "scaled")
DEFAULT_ROWS = {"isotropic": 2_000_000, "scaled": 1_000_000}
N_FEATURES = 100
#: The scaled problem: column scales, neighbour correlation, label signal
#: (norm of the latent coefficients) and seed.
SCALED_LOG10_RANGE = (-3.0, 3.0)
SCALED_NEIGHBOUR = 0.5
SCALED_SIGNAL = 3.0
SCALED_SEED = 7
SCALED_CHUNK_ROWS = 65_536
#: dasktrain's ``l2`` (scikit-learn's ``C = 1 / (l2 * n_train)``).
DEFAULT_L2 = 1e-4
DEFAULT_BUDGET = 180.0
VAL_FRACTION = 0.1
SPLIT_SEED = 0
N_WORKERS = 2
#: Relative gaps to ``f*`` that are timed, loosest first.
GAPS = (0.005, 0.001)
#: Seconds between two memory samples.
SAMPLE_SECONDS = 0.05
#: Seconds a client process may take to import its libraries and connect.
STARTUP_SECONDS = 300.0
#: Largest ``max_iter`` tried by the doubling runs.
MAX_ITER_CAP = 1024
#: ADMM iterations are expensive (an L-BFGS solve per chunk): smaller cap.
ADMM_MAX_ITER_CAP = 256
#: The reference fit: glum with a tiny gradient tolerance and a cap on its
#: iterations (it converges quadratically: 4-6 iterations reach the optimum
#: to 1e-10 on both problems, but in float32 it may never meet the
#: tolerance; 200 iterations took 533 s on the isotropic problem).
REFERENCE_TOL = 1e-10
REFERENCE_MAX_ITER = 12
#: Tolerances given to the peers so that ``max_iter`` is what stops them.
PEER_TOL = 1e-12
#: dasktrain runs stop at the 0.1% gap, or after this many epochs.
DASKTRAIN_MAX_EPOCHS = 300
#: The SGD-family setting: full-batch SGD with heavy-ball momentum, found by a
#: short search on a 262,144-row subset (see benchmarks/README.md).  Adam
#: (full batch, learning rate 0.05-0.4, cosine decay) and minibatch SGD (one
#: chunk per step) were far slower to a 0.1% gap on this problem.
SGD_LEARNING_RATE = 4.0
SGD_MOMENTUM = 0.5
#: dasktrain's best SGD-family setting: local SGD (model averaging).  Each
#: round, every training chunk runs plain SGD over its own rows in minibatches
#: of LOCAL_SGD_BATCH_ROWS, LOCAL_SGD_STEPS of them (65,536 / 1,024: the whole
#: chunk, so one round is one pass over the data), with a learning rate that
#: decays along a cosine over those steps, from LOCAL_SGD_LEARNING_RATE to
#: LOCAL_SGD_ALPHA times it; then the chunks' parameters are averaged.  Found
#: by a short search in NumPy (see benchmarks/README.md).
LOCAL_SGD_BATCH_ROWS = 1_024
LOCAL_SGD_STEPS = 64
LOCAL_SGD_LEARNING_RATE = 8.0
LOCAL_SGD_ALPHA = 0.05
#: A local-SGD history row reports the objective seen during the round's
#: steps, above that of the averaged point, so the stop rule fires late:
#: rounds are capped instead.
LOCAL_SGD_MAX_EPOCHS = 4
INCREMENTAL_EPOCHS = 3
#: Two runs whose objectives agree to this relative tolerance: the solver
#: stopped on its own criterion, more ``max_iter`` will not help.
STALL_RTOL = 1e-12
#: Rows per block of the in-RAM objective evaluation (bounds temporaries).
EVAL_BLOCK_ROWS = 131_072
MESSAGE_PREFIX = "@@compare_peers "
#: What the peers' fits import.
PEER_MODULES = (
    "dask_glm.algorithms",
    "dask_ml.linear_model",
    "dask_ml.linear_model.utils",
    "dask_ml.wrappers",
)
#: Label of the reference fit, and the method that makes it.
REFERENCE = "reference"
REFERENCE_METHOD = "glum"

#: How each method's regularization parameter maps to dasktrain's ``l2``.
REGULARIZATION = {
    "glum": "alpha = l2",
    "sklearn": "C = 1/(l2*n)",
    "sklearn-newton-cholesky": "C = 1/(l2*n)",
    "dasktrain-newton": "l2",
    "dasktrain-lbfgs": "l2",
    "dasktrain-sgd": "l2",
    "dasktrain-local-sgd": "l2",
    "daskml-lbfgs": "C = 1/(l2*n)",
    "daskml-admm": "C = 1/(l2*n)",
    "daskglm-lbfgs": "lamduh = l2*n",
    "daskglm-admm": "lamduh = l2*n",
    "daskglm-gd": "none (unsupported)",
    "daskglm-newton": "none (unsupported)",
    "daskml-incremental-sgd": "alpha = l2",
}
METHOD_LABELS = {
    "glum": "glum irls, in RAM",
    "sklearn": "scikit-learn lbfgs, in RAM",
    "sklearn-newton-cholesky": "scikit-learn newton-cholesky, in RAM",
    "dasktrain-newton": "dasktrain Newton, full batch",
    "dasktrain-lbfgs": "dasktrain LBFGS, full batch",
    "dasktrain-sgd": "dasktrain SGD+momentum, full batch",
    "dasktrain-local-sgd": "dasktrain local SGD, 1 round/pass",
    "daskml-lbfgs": "dask-ml LogisticRegression lbfgs",
    "daskml-admm": "dask-ml LogisticRegression admm",
    "daskglm-lbfgs": "dask-glm lbfgs",
    "daskglm-admm": "dask-glm admm",
    "daskglm-gd": "dask-glm gradient_descent",
    "daskglm-newton": "dask-glm newton",
    "daskml-incremental-sgd": "dask-ml Incremental(SGDClassifier)",
}
#: Solvers with the data in RAM in the client process (no cluster).
IN_RAM = ("glum", "sklearn", "sklearn-newton-cholesky")
#: Methods re-run with max_iter = 1, 2, 4, ...; the others report each epoch.
DOUBLING = {
    *IN_RAM,
    "daskml-lbfgs",
    "daskml-admm",
    "daskglm-lbfgs",
    "daskglm-admm",
    "daskglm-gd",
    "daskglm-newton",
}
METHODS = tuple(REGULARIZATION)
COMPARED = tuple(m for m in METHODS if m != REFERENCE_METHOD)
DASKTRAIN_METHODS = (
    "dasktrain-newton",
    "dasktrain-lbfgs",
    "dasktrain-sgd",
    "dasktrain-local-sgd",
)
PEERS = tuple(m for m in COMPARED if m not in DASKTRAIN_METHODS and m not in IN_RAM)
#: dask-glm solvers with a penalty (they get ``normalize=False`` on the
#: scaled problem, so that the penalty is on the problem's own columns).
PENALIZED_DASK = ("daskml-lbfgs", "daskml-admm", "daskglm-lbfgs", "daskglm-admm")


# -- the objective, evaluated in RAM ------------------------------------------


def objective(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, l2: float
) -> float:
    """dasktrain's training objective in float64 (see the module docstring)."""
    w64 = np.asarray(w, dtype=np.float64)
    total = 0.0
    for start in range(0, X.shape[0], EVAL_BLOCK_ROWS):
        xb = X[start : start + EVAL_BLOCK_ROWS].astype(np.float64)
        z = xb @ w64 + b
        yb = y[start : start + EVAL_BLOCK_ROWS].astype(np.float64)
        total += float(np.sum(np.logaddexp(0.0, z) - yb * z))
    return total / X.shape[0] + 0.5 * l2 * float(w64 @ w64)


def accuracy(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    hits = 0
    w64 = np.asarray(w, dtype=np.float64)
    for start in range(0, X.shape[0], EVAL_BLOCK_ROWS):
        z = X[start : start + EVAL_BLOCK_ROWS].astype(np.float64) @ w64 + b
        hits += int(np.sum((z > 0) == (y[start : start + EVAL_BLOCK_ROWS] > 0)))
    return hits / X.shape[0]


def load_rows(path: str, bounds: Sequence[tuple[int, int]]) -> tuple[Any, Any]:
    """``X`` and ``y`` of the given row ranges, read with plain zarr."""
    import zarr

    group = zarr.open_group(path, mode="r")
    x_arr, y_arr = group["X"], group["y"]
    assert isinstance(x_arr, zarr.Array) and isinstance(y_arr, zarr.Array)
    n = sum(stop - start for start, stop in bounds)
    X = np.empty((n, x_arr.shape[1]), dtype=x_arr.dtype)
    y = np.empty(n, dtype=y_arr.dtype)
    row = 0
    for start, stop in bounds:
        X[row : row + stop - start] = x_arr[start:stop]
        y[row : row + stop - start] = y_arr[start:stop]
        row += stop - start
    return X, y


# -- the client processes -------------------------------------------------------
# Each measured run happens in a child process started with --child NAME: the
# parent sends "run K" lines on stdin (doubling methods) or nothing (the
# others), and the child answers with MESSAGE_PREFIX + JSON lines on stdout:
# {"event": "start"} when the timed fit begins, {"event": "point", ...} for each
# result and {"event": "done"} at the end.


def _send(event: str, **fields: Any) -> None:
    print(MESSAGE_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def _send_point(seconds: float, w: Any, b: Any, label: str, **extra: Any) -> None:
    _send(
        "point",
        seconds=seconds,
        w=[float(v) for v in np.ravel(w)],
        b=float(np.ravel(b)[0]) if np.ndim(b) else float(b),
        label=label,
        **extra,
    )


def _dask_arrays(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The training rows as dask arrays read by the workers from the store
    (one block per store chunk)."""
    import dask.array as da

    X = da.from_zarr(spec["store"], component="X")
    y = da.from_zarr(spec["store"], component="y")
    bounds = spec["train_bounds"]
    Xt = da.concatenate([X[a:b] for a, b in bounds])
    yt = da.concatenate([y[a:b] for a, b in bounds])
    return Xt, yt


def _fit_peer(name: str, spec: dict[str, Any], max_iter: int, X: Any, y: Any) -> Any:
    """Fit one Dask peer with ``max_iter``; returns ``(w, b)`` as numpy."""
    l2, n = spec["l2"], spec["n_train"]
    # Standardizing the columns changes a penalized problem (see the module
    # docs): off on the scaled problem.
    normalize = (
        {} if spec["normalize"] or name not in PENALIZED_DASK else {"normalize": False}
    )
    if name.startswith("daskml-"):
        from dask_ml.linear_model import LogisticRegression

        solver = name.removeprefix("daskml-")
        # dask-ml: lamduh = 1 / C on the SUM of the losses, so C = 1/(l2 * n)
        # gives dasktrain's mean-loss objective (intercept penalized too).
        solver_kwargs = {
            **({"abstol": PEER_TOL, "reltol": PEER_TOL} if solver == "admm" else {}),
            **normalize,
        }
        est = LogisticRegression(
            solver=solver,
            C=1.0 / (l2 * n),
            max_iter=max_iter,
            tol=PEER_TOL,
            solver_kwargs=solver_kwargs or None,
        )
        est.fit(X, y)
        return np.asarray(est.coef_), float(np.asarray(est.intercept_).ravel()[0])
    from dask_glm import algorithms
    from dask_ml.linear_model.utils import add_intercept

    # dask-glm fits no intercept itself: a column of ones is appended (as
    # dask-ml does), and its coefficient is the intercept.
    Xi = add_intercept(X)
    if name == "daskglm-lbfgs":
        # lamduh * ||beta||^2 / 2 is added to the SUM of the losses.
        beta = algorithms.lbfgs(
            Xi,
            y,
            regularizer="l2",
            lamduh=l2 * n,
            max_iter=max_iter,
            tol=PEER_TOL,
            **normalize,
        )
    elif name == "daskglm-admm":
        # The consensus step applies lamduh to the SUM of the losses.
        beta = algorithms.admm(
            Xi,
            y,
            regularizer="l2",
            lamduh=l2 * n,
            max_iter=max_iter,
            abstol=PEER_TOL,
            reltol=PEER_TOL,
            **normalize,
        )
    elif name == "daskglm-newton":
        # newton takes no regularizer: it minimizes the unregularized sum.
        beta = algorithms.newton(Xi, y, max_iter=max_iter, tol=PEER_TOL)
    elif name == "daskglm-gd":
        # gradient_descent takes no regularizer (extra keywords are swallowed):
        # it minimizes the unregularized sum of the losses.
        beta = algorithms.gradient_descent(Xi, y, max_iter=max_iter, tol=PEER_TOL)
    else:
        raise ValueError(f"unknown peer {name!r}")
    beta = np.asarray(beta, dtype=np.float64)
    return beta[:-1], float(beta[-1])


def _in_ram_fit(name: str, spec: dict[str, Any], X: Any, y: Any) -> Any:
    """``fit(max_iter) -> (w, b, info)`` of an in-RAM solver (``max_iter=0``:
    the converged reference fit)."""
    from sklearn.linear_model import LogisticRegression

    C = 1.0 / (spec["l2"] * spec["n_train"])

    def fit(max_iter: int) -> tuple[Any, Any, dict[str, Any]]:
        full = max_iter == 0
        if name == "glum":
            import glum

            # glum: mean half binomial deviance (the log loss) plus
            # alpha * (1 - l1_ratio) / 2 * ||w||^2: alpha = l2.
            est = glum.GeneralizedLinearRegressor(
                family="binomial",
                alpha=spec["l2"],
                l1_ratio=0.0,
                gradient_tol=REFERENCE_TOL if full else PEER_TOL,
                max_iter=REFERENCE_MAX_ITER if full else max_iter,
            )
            est.fit(X, y)
            return est.coef_, float(est.intercept_), {"n_iter": int(est.n_iter_)}
        solver = "lbfgs" if name == "sklearn" else "newton-cholesky"
        est = LogisticRegression(
            C=C,
            solver=solver,
            tol=REFERENCE_TOL if full else PEER_TOL,
            max_iter=REFERENCE_MAX_ITER if full else max_iter,
        )
        est.fit(X, y)
        return est.coef_[0], est.intercept_[0], {"n_iter": int(est.n_iter_[0])}

    return fit


def _child_doubling(name: str, spec: dict[str, Any], client: Client) -> None:
    """Answer "run K" lines: fit with max_iter=K (K=0: the reference fit)."""
    if name in IN_RAM:
        t0 = time.perf_counter()
        X, y = load_rows(spec["store"], spec["train_bounds"])
        # float32 as stored, or widened (see --in-ram-dtype); not timed.
        X = X.astype(spec["in_ram_dtype"], copy=False)
        _send("loaded", seconds=time.perf_counter() - t0)
        fit = _in_ram_fit(name, spec, X, y)
    else:
        # Imported before any timed fit (dask-ml's import takes seconds).
        for module in PEER_MODULES:
            importlib.import_module(module)

        X, y = _dask_arrays(spec)

        def fit(max_iter: int) -> tuple[Any, Any, dict[str, Any]]:
            w, b = _fit_peer(name, spec, max_iter, X, y)
            return w, b, {}

    for line in sys.stdin:
        command = line.split()
        if not command or command[0] != "run":
            break
        max_iter = int(command[1])
        _send("start", max_iter=max_iter)
        t0 = time.perf_counter()
        w, b, extra = fit(max_iter)
        seconds = time.perf_counter() - t0
        label = REFERENCE if max_iter == 0 else f"max_iter={max_iter}"
        _send_point(seconds, w, b, label, max_iter=max_iter, **extra)


def _child_dasktrain(name: str, spec: dict[str, Any], client: Client) -> None:
    import dasktrain as dt
    from dasktrain.callbacks import Callback

    ds = dt.Dataset.open(spec["store"])
    train = ds.subset(spec["train_chunk_ids"])
    stop_at = spec["f_star"] * (1.0 + min(GAPS))

    class Report(Callback):
        """Sends the parameters and the elapsed time at every epoch end."""

        def __init__(self, t0: float) -> None:
            self.t0 = t0

        def on_epoch_end(self, trainer: Any, row: dict[str, Any]) -> None:
            seconds = time.perf_counter() - self.t0
            params = trainer.params
            _send_point(
                seconds,
                params["w"],
                params["b"],
                f"epoch {row['epoch']}",
                step=row["step"],
                evals=row.get("passes", 1),
                reported_objective=row["objective"],
            )
            # The full-batch objective at the new parameters (L-BFGS rows), or
            # at the step's starting point, i.e. the previous point (SGD rows):
            # stop once within the tightest gap; the parent checks the points
            # again in float64.
            if row["objective"] <= stop_at:
                trainer.stop_training = True

    model = dt.models.LogisticRegression(l2=spec["l2"])
    fit_options: dict[str, Any] = {"epochs": DASKTRAIN_MAX_EPOCHS, "batch_rows": None}
    if name == "dasktrain-newton":
        opt: Any = dt.optim.Newton()
    elif name == "dasktrain-lbfgs":
        opt = dt.optim.LBFGS()
    elif name == "dasktrain-local-sgd":
        opt = dt.optim.SGD(
            learning_rate=dt.optim.CosineDecay(
                LOCAL_SGD_LEARNING_RATE,
                decay_steps=LOCAL_SGD_STEPS,
                alpha=LOCAL_SGD_ALPHA,
            )
        )
        fit_options = {
            "epochs": LOCAL_SGD_MAX_EPOCHS,
            "batch_rows": LOCAL_SGD_BATCH_ROWS,
            "local_steps": LOCAL_SGD_STEPS,
        }
    else:
        opt = dt.optim.SGD(learning_rate=SGD_LEARNING_RATE, momentum=SGD_MOMENTUM)
    with tempfile.TemporaryDirectory(prefix="compare-peers-") as tmp:
        _send("start")
        t0 = time.perf_counter()
        trainer = dt.Trainer(
            model, opt, store=os.path.join(tmp, "run.zarr"), client=client
        )
        trainer.fit(train, callbacks=[Report(t0)], progress=False, **fit_options)
        _send("fit_returned", seconds=time.perf_counter() - t0)
        trainer.close()


def _child_incremental(spec: dict[str, Any], client: Client) -> None:
    from dask_ml.wrappers import Incremental
    from sklearn.linear_model import SGDClassifier

    X, y = _dask_arrays(spec)
    # SGDClassifier minimizes mean loss + alpha * ||w||^2 / 2: alpha = l2.
    est = Incremental(
        SGDClassifier(loss="log_loss", alpha=spec["l2"], random_state=0),
        shuffle_blocks=True,
        random_state=0,
    )
    _send("start")
    t0 = time.perf_counter()
    for epoch in range(1, INCREMENTAL_EPOCHS + 1):
        # One partial_fit call = one pass over the blocks, one block at a time.
        est.partial_fit(X, y, classes=[0, 1])
        inner = est.estimator_
        _send_point(
            time.perf_counter() - t0,
            inner.coef_[0],
            inner.intercept_[0],
            f"epoch {epoch}",
        )


def child_main(name: str, spec_path: str) -> int:
    from distributed import Client

    warnings.simplefilter("ignore")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    with open(spec_path) as f:
        spec = json.load(f)
    with Client(spec["address"]) as client:
        try:
            if name in DOUBLING:
                _child_doubling(name, spec, client)
            elif name in DASKTRAIN_METHODS:
                _child_dasktrain(name, spec, client)
            else:
                _child_incremental(spec, client)
        except Exception as exc:
            _send("error", message=f"{type(exc).__name__}: {exc}")
            raise
        _send("done")
    return 0


# -- the parent: cluster, memory sampling, orchestration --------------------------


class PeakSampler:
    """Samples the resident memory of some processes in a background thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[str, list[Any]] = {}
        self._peaks: dict[str, dict[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def track(self, pids: dict[str, Sequence[int]]) -> None:
        """Replace the tracked processes (role -> pids) and reset the peaks."""
        import psutil

        procs: dict[str, list[Any]] = {}
        for role, ids in pids.items():
            procs[role] = []
            for pid in ids:
                with contextlib.suppress(psutil.Error):
                    procs[role].append(psutil.Process(pid))
        with self._lock:
            self._procs = procs
            self._peaks = {role: {} for role in procs}
        self._sample()

    def peaks(self) -> dict[str, dict[int, int]]:
        """role -> pid -> peak RSS in bytes since the last :meth:`track`."""
        self._sample()
        with self._lock:
            return {role: dict(p) for role, p in self._peaks.items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        with self._lock:
            for role, procs in self._procs.items():
                for proc in procs:
                    try:
                        rss = proc.memory_info().rss
                    except psutil.Error:
                        continue
                    peaks = self._peaks[role]
                    peaks[proc.pid] = max(peaks.get(proc.pid, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()


@dataclass
class Point:
    """One result of a method: coefficients and the time it took to get them."""

    seconds: float
    w: np.ndarray
    b: float
    label: str
    objective: float = math.nan
    accuracy: float = math.nan
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    points: list[Point] = field(default_factory=list)
    status: str = "ok"
    client_peak: int = 0
    worker_peaks: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)
    wall: float = 0.0

    def first_within(self, f_star: float, gap: float) -> Point | None:
        """The first timed point within ``gap`` of ``f_star`` (scikit-learn's
        reference fit is not one: its time-to-gap comes from its own
        max_iter doubling, like the peers')."""
        for p in self.points:
            if p.label != REFERENCE and p.objective <= f_star * (1.0 + gap):
                return p
        return None

    def final(self, f_star: float) -> Point | None:
        """The point the run ended on: the first within the tightest gap (for
        scikit-learn, the reference fit)."""
        for p in self.points:
            if p.label == REFERENCE:
                return p
        return self.first_within(f_star, min(GAPS)) or (
            self.points[-1] if self.points else None
        )


class ChildProcess:
    """A client process running one method; messages arrive on a queue."""

    def __init__(self, name: str, spec_path: str, log: TextIO) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", name, spec_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
            cwd=REPO_ROOT,
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MESSAGE_PREFIX):
                self.messages.put(json.loads(line[len(MESSAGE_PREFIX) :]))
        self.messages.put(None)  # end of output

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def next(self, deadline: float) -> dict[str, Any] | None:
        """The next message, ``None`` at the end of output; raises
        TimeoutError when ``deadline`` (time.monotonic) passes first."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise TimeoutError
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    def wait_for(self, events: set[str], deadline: float) -> dict[str, Any]:
        while True:
            msg = self.next(deadline)
            if msg is None:
                raise ChildFailed("the client process exited")
            if msg["event"] == "error":
                raise ChildFailed(msg["message"])
            if msg["event"] in events:
                return msg

    def stop(self) -> None:
        """Close stdin, then kill the process if it does not exit by itself."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class ChildFailed(RuntimeError):
    pass


@dataclass
class Bench:
    """What the parent holds during a run."""

    args: argparse.Namespace
    client: Client
    sampler: PeakSampler
    spec: dict[str, Any]
    tmp: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    log: TextIO

    def score(self, point: Point) -> None:
        point.objective = objective(
            self.X_train, self.y_train, point.w, point.b, self.args.l2
        )
        point.accuracy = accuracy(self.X_val, self.y_val, point.w, point.b)

    def restart_workers(self) -> list[int]:
        # Fresh worker processes for each method (sync point with the cluster).
        self.client.restart()
        self.client.wait_for_workers(N_WORKERS)
        return sorted(self.client.run(os.getpid).values())

    def run(self, name: str, f_star: float | None) -> Outcome:
        out = Outcome(name)
        spec = dict(self.spec, f_star=f_star)
        spec_path = os.path.join(self.tmp, f"{name}.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        worker_pids = self.restart_workers()
        self.log.write(f"\n==== {name} ====\n")
        self.log.flush()
        child = ChildProcess(name, spec_path, self.log)
        self.sampler.track({"client": [child.proc.pid], "workers": worker_pids})
        t_begin = time.monotonic()
        try:
            if name in DOUBLING:
                self._run_doubling(name, child, out, f_star)
            else:
                self._run_trajectory(child, out)
        except ChildFailed as exc:
            out.status = f"failed: {exc}"
        except TimeoutError:
            out.status = "timed out waiting for the client process"
        finally:
            peaks = self.sampler.peaks()
            if child.proc.poll() is None:
                child.stop()
        out.wall = time.monotonic() - t_begin
        out.client_peak = max(peaks["client"].values(), default=0)
        out.worker_peaks = tuple(peaks["workers"].get(p, 0) for p in worker_pids)
        return out

    def _accept(self, out: Outcome, msg: dict[str, Any]) -> Point:
        info = {k: v for k, v in msg.items() if k not in ("event", "seconds", "w", "b")}
        point = Point(
            seconds=msg["seconds"],
            w=np.asarray(msg["w"], dtype=np.float64),
            b=msg["b"],
            label=msg["label"],
            info=info,
        )
        self.score(point)
        out.points.append(point)
        passes = f"  ({info['evals']} passes)" if "evals" in info else ""
        print(
            f"    {out.name:24s} {point.label:14s} {point.seconds:8.2f} s  "
            f"objective {point.objective:.8f}  held-out accuracy "
            f"{point.accuracy:.4f}{passes}",
            flush=True,
        )
        return point

    def _run_doubling(
        self, name: str, child: ChildProcess, out: Outcome, f_star: float | None
    ) -> None:
        budget = self.args.budget
        startup = time.monotonic() + STARTUP_SECONDS
        if name in IN_RAM:
            loaded = child.wait_for({"loaded"}, startup)
            out.notes.append(f"data load {loaded['seconds']:.1f} s (not timed)")
        if name == REFERENCE_METHOD:
            child.send("run 0")  # the reference fit
            child.wait_for({"start"}, startup)
            ref = self._accept(out, child.wait_for({"point"}, startup + budget * 10))
            f_star = ref.objective
            out.notes.append(
                f"reference: {ref.info.get('n_iter')} iterations, {ref.seconds:.1f} s"
            )
        assert f_star is not None
        cap = ADMM_MAX_ITER_CAP if name.endswith("admm") else MAX_ITER_CAP
        previous: Point | None = None
        max_iter = 1
        while max_iter <= cap:
            child.send(f"run {max_iter}")
            child.wait_for({"start"}, startup)
            deadline = time.monotonic() + budget
            try:
                point = self._accept(out, child.wait_for({"point"}, deadline))
            except TimeoutError:
                child.kill()
                out.status = f"> budget at max_iter={max_iter}"
                return
            if point.objective <= f_star * (1.0 + min(GAPS)):
                return
            if previous is not None and abs(
                point.objective - previous.objective
            ) <= STALL_RTOL * abs(previous.objective):
                out.status = f"stalled (own stopping rule) at max_iter={max_iter}"
                return
            previous = point
            max_iter *= 2
        out.status = f"not reached by max_iter={cap}"

    def _run_trajectory(self, child: ChildProcess, out: Outcome) -> None:
        child.wait_for({"start"}, time.monotonic() + STARTUP_SECONDS)
        deadline = time.monotonic() + self.args.budget
        try:
            while True:
                msg = child.wait_for({"point", "fit_returned", "done"}, deadline)
                if msg["event"] == "point":
                    self._accept(out, msg)
                elif msg["event"] == "fit_returned":
                    out.notes.append(f"fit() returned at {msg['seconds']:.1f} s")
                else:
                    break
        except TimeoutError:
            child.kill()
            out.status = "> budget"
        if out.points:
            first = out.points[0]
            out.notes.append(f"first {first.label} at {first.seconds:.1f} s")
        if any("evals" in p.info for p in out.points):
            passes = passes_before(out, len(out.points))
            out.notes.append(f"{passes} passes over the data")


# -- report ---------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def _time_to(out: Outcome, f_star: float, gap: float, budget: float) -> str:
    p = out.first_within(f_star, gap)
    if p is not None:
        return f"{p.seconds:.2f}"
    if out.status.startswith("> budget"):
        return f"> {budget:.0f}"
    return "never"


def passes_before(out: Outcome, k: int) -> int:
    """Passes over the data of a dasktrain run up to its ``k``-th point:
    L-BFGS: one pass to evaluate the starting point, then each line
    search's; Newton: each row counts its own (the start's included); the SGD
    family: one pass per epoch."""
    start = 1 if out.name == "dasktrain-lbfgs" else 0
    return start + sum(int(p.info.get("evals", 1)) for p in out.points[:k])


def _cost_to(out: Outcome, f_star: float, gap: float) -> str:
    """What the first point within ``gap`` cost: passes (dasktrain) or the
    ``max_iter`` of the run (doubling methods)."""
    p = out.first_within(f_star, gap)
    if p is None:
        return "-"
    if out.name in DASKTRAIN_METHODS:
        return f"{passes_before(out, out.points.index(p) + 1)} passes"
    return str(p.label)


def report(
    outcomes: Sequence[Outcome], f_star: float, budget: float, n_train: int
) -> None:
    print()
    print(
        f"f* = {f_star:.8f} (training objective at the optimum, {n_train:,} rows); "
        f"times in seconds from the start of the fit"
    )
    header = (
        f"{'method':38s} {'reg. parameter':18s} {'t 0.5%':>8s} {'t 0.1%':>8s} "
        f"{'to 0.1%':>13s} {'final gap':>10s} {'held-out acc':>12s} "
        f"{'client MiB':>10s} {'workers MiB':>12s}  status / notes"
    )
    print(header)
    print("-" * len(header))
    for out in outcomes:
        final = out.final(f_star)
        gap = "-" if final is None else f"{(final.objective - f_star) / f_star:.2e}"
        acc = "-" if final is None else f"{final.accuracy:.4f}"
        workers = "/".join(_mib(p) for p in out.worker_peaks)
        notes = ", ".join([out.status, *out.notes])
        print(
            f"{METHOD_LABELS[out.name]:38s} {REGULARIZATION[out.name]:18s} "
            f"{_time_to(out, f_star, GAPS[0], budget):>8s} "
            f"{_time_to(out, f_star, GAPS[1], budget):>8s} "
            f"{_cost_to(out, f_star, GAPS[1]):>13s} {gap:>10s} {acc:>12s} "
            f"{_mib(out.client_peak):>10s} {workers:>12s}  {notes}"
        )


def ratios(outcomes: dict[str, Outcome], f_star: float, budget: float) -> None:
    """Each dasktrain method's time to 0.1% against the in-RAM baselines' and
    the fastest Dask peer's, all measured in this run."""
    print()
    gap = min(GAPS)
    in_ram = {
        name: p.seconds
        for name in IN_RAM
        if name in outcomes and (p := outcomes[name].first_within(f_star, gap))
    }
    peer_times: list[tuple[float, bool, str]] = []
    for name in PEERS:
        if name not in outcomes:
            continue
        p = outcomes[name].first_within(f_star, gap)
        if p is not None:
            peer_times.append((p.seconds, True, name))
        elif outcomes[name].status.startswith("> budget"):
            peer_times.append((budget, False, name))
    fastest = min(peer_times) if peer_times else None
    reached = False
    for name in DASKTRAIN_METHODS:
        out = outcomes.get(name)
        p = out.first_within(f_star, gap) if out is not None else None
        if out is None or p is None:
            continue
        reached = True
        passes = passes_before(out, out.points.index(p) + 1)
        print(f"{METHOD_LABELS[name]}: 0.1% at {p.seconds:.2f} s ({passes} passes)")
        for base, seconds in in_ram.items():
            target = "   (target <= 0.5)" if base.startswith("sklearn") else ""
            print(
                f"  / {METHOD_LABELS[base]} ({seconds:.2f} s): "
                f"{p.seconds / seconds:6.2f}{target}"
            )
        if fastest is not None:
            seconds, done, peer = fastest
            bound = "" if done else ">= "
            print(
                f"  fastest Dask peer / this: {bound}{seconds / p.seconds:.1f}x   "
                f"({METHOD_LABELS[peer]}: {'' if done else '> '}{seconds:.2f} s; "
                f"target >= 10x)"
            )
    if not reached:
        print("no dasktrain method reached the 0.1% gap: no ratios")
    elif fastest is None and any(n in outcomes for n in PEERS):
        print("fastest peer / dasktrain: no peer reached 0.1% (stalled or failed)")


def make_scaled_store(path: Path, n_rows: int) -> Any:
    """The badly conditioned problem (see the module docs), written once and
    reused when a store with these rows exists at ``path``."""
    import dasktrain as dt

    with contextlib.suppress(Exception):
        existing = dt.Dataset.open(str(path))
        if existing.n_rows == n_rows and existing.n_features == N_FEATURES:
            return existing
    rng = np.random.default_rng([SCALED_SEED])
    scales = np.logspace(*SCALED_LOG10_RANGE, N_FEATURES)
    rng.shuffle(scales)
    coef = rng.normal(size=N_FEATURES)
    coef *= SCALED_SIGNAL / np.linalg.norm(coef)
    X = np.empty((n_rows, N_FEATURES), dtype=np.float32)
    y = np.empty(n_rows, dtype=np.int8)
    for start in range(0, n_rows, SCALED_CHUNK_ROWS):
        stop = min(n_rows, start + SCALED_CHUNK_ROWS)
        block = np.random.default_rng([SCALED_SEED, start]).normal(
            size=(stop - start, N_FEATURES)
        )
        for j in range(1, N_FEATURES):
            block[:, j] += SCALED_NEIGHBOUR * block[:, j - 1]
        block /= block.std(axis=0)
        noise = np.random.default_rng([SCALED_SEED, start, 1]).logistic(
            size=stop - start
        )
        y[start:stop] = block @ coef + noise > 0
        X[start:stop] = block * scales
    return dt.Dataset.from_arrays(
        str(path), X=X, y=y, chunk_rows=SCALED_CHUNK_ROWS, overwrite=True
    )


# -- main -------------------------------------------------------------------------


def store_path(rows: int) -> Path:
    """The store of ``benchmarks/epoch_throughput.py``: ``data/bench-2m.zarr``."""
    if rows % 1_000_000 == 0:
        size = f"{rows // 1_000_000}m"
    elif rows % 1_000 == 0:
        size = f"{rows // 1_000}k"
    else:
        size = str(rows)
    return REPO_ROOT / "data" / f"bench-{size}.zarr"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time to 0.5% / 0.1% of the optimal training objective of "
        "L2 logistic regression: dasktrain vs. scikit-learn in RAM, dask-ml and "
        "dask-glm on the same Zarr store and 2-worker cluster.",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated methods to compare ({REFERENCE_METHOD}, the "
        f"reference, always runs); choose from {', '.join(COMPARED)}",
    )
    parser.add_argument(
        "--problem",
        choices=PROBLEMS,
        default=PROBLEMS[0],
        help="isotropic (standard normal columns, the default) or scaled (badly "
        "conditioned: column scales 1e-3 .. 1e3)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help="seconds after which one run is killed (default %(default)s)",
    )
    parser.add_argument(
        "--in-ram-dtype",
        choices=("auto", "float32", "float64"),
        default="auto",
        help="dtype of X given to the in-RAM solvers; auto: float32 (as stored) "
        "on the isotropic problem, float64 on the scaled one, where their float32 "
        "runs stop far above the optimum",
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows (default 2,000,000 isotropic, 1,000,000 scaled)",
    )
    parser.add_argument(
        "--l2",
        type=float,
        default=DEFAULT_L2,
        help="dasktrain's l2; the peers get the equivalent (default %(default)s)",
    )
    parser.add_argument(
        "--log",
        type=Path,
        default=None,
        help="file for the client processes' stderr (default: a temporary file)",
    )
    parser.add_argument(
        "--child", nargs=2, metavar=("METHOD", "SPEC"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        return args
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(COMPARED))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(COMPARED)}")
    args.methods = [n for n in COMPARED if n in names] if names else list(COMPARED)
    if args.rows is None:
        args.rows = DEFAULT_ROWS[args.problem]
    if args.budget <= 0 or args.rows < 2 or args.l2 <= 0:
        parser.error("--budget and --l2 must be > 0 and --rows >= 2")
    return args


@contextlib.contextmanager
def cluster(tmp: str) -> Iterator[Client]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=N_WORKERS,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            local_directory=tmp,
        ) as lc,
        Client(lc) as client,
    ):
        yield client


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    import dask
    import distributed
    import sklearn
    import zarr

    import dasktrain as dt

    logging.getLogger("distributed").setLevel(logging.ERROR)
    path = store_path(args.rows)
    if args.problem == "scaled":
        path = path.with_name(path.name.replace("bench-", "bench-scaled-"))
    versions = [
        f"python {platform.python_version()}",
        f"numpy {np.__version__}",
        f"dask {dask.__version__}",
        f"distributed {distributed.__version__}",
        f"zarr {zarr.__version__}",
        f"scikit-learn {sklearn.__version__}",
    ]
    for mod in ("dask_ml", "dask_glm", "glum"):
        try:
            versions.append(f"{mod.replace('_', '-')} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod.replace('_', '-')} missing")
    print(
        f"compare peers: L2 logistic regression, {args.problem} problem, "
        f"{args.rows:,} x {N_FEATURES} float32, l2 = {args.l2:g}, budget "
        f"{args.budget:g} s per run; store {path}"
    )
    print(
        f"  {', '.join(versions)}; {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    with (
        tempfile.TemporaryDirectory(prefix="compare-peers-") as tmp,
        cluster(tmp) as client,
        open(args.log or os.path.join(tmp, "children.log"), "w") as log,
    ):
        # Generated once (on the workers), then reused; the parameters match
        # benchmarks/epoch_throughput.py's store at the same path.
        if args.problem == "scaled":
            ds = make_scaled_store(path, args.rows)
        else:
            ds = dt.datasets.make_classification(
                path, n_rows=args.rows, n_features=N_FEATURES, seed=0, client=client
            )
        train, val = ds.split(VAL_FRACTION, seed=SPLIT_SEED)
        train_bounds = [train.chunk_bounds(c) for c in train.chunk_ids]
        val_bounds = [val.chunk_bounds(c) for c in val.chunk_ids]
        print(
            f"  {ds.n_chunks} chunks of {ds.chunk_rows:,} rows: {train.n_rows:,} "
            f"training rows, {val.n_rows:,} held out ({len(val.chunk_ids)} whole "
            f"chunks); {N_WORKERS} worker processes x 1 thread on 127.0.0.1"
        )
        X_train, y_train = load_rows(str(path), train_bounds)
        X_val, y_val = load_rows(str(path), val_bounds)
        spec = {
            "address": client.scheduler_info()["address"],
            "store": str(path),
            "train_bounds": train_bounds,
            "train_chunk_ids": list(train.chunk_ids),
            "n_train": train.n_rows,
            "l2": args.l2,
            "normalize": args.problem == "isotropic",
            "in_ram_dtype": (
                ("float32" if args.problem == "isotropic" else "float64")
                if args.in_ram_dtype == "auto"
                else args.in_ram_dtype
            ),
        }
        sampler = PeakSampler()
        bench = Bench(
            args, client, sampler, spec, tmp, X_train, y_train, X_val, y_val, log
        )
        outcomes: dict[str, Outcome] = {}
        try:
            print(f"  {REFERENCE_METHOD} (reference) ...", flush=True)
            reference = bench.run(REFERENCE_METHOD, None)
            outcomes[REFERENCE_METHOD] = reference
            if not reference.points:
                print(f"error: the reference fit failed: {reference.status}")
                return 1
            f_ref = reference.points[0].objective
            for name in args.methods:
                print(f"  {name} ...", flush=True)
                outcomes[name] = bench.run(name, f_ref)
                print(
                    f"    {outcomes[name].status}; {outcomes[name].wall:.0f} s",
                    flush=True,
                )
        finally:
            sampler.close()
    f_star = min(p.objective for out in outcomes.values() for p in out.points)
    if f_star < f_ref:
        print(
            f"note: a method went below the reference fit's objective by "
            f"{(f_ref - f_star) / f_ref:.1e} (relative); f* is that lowest value"
        )
    ordered = [outcomes[n] for n in METHODS if n in outcomes]
    report(ordered, f_star, args.budget, train.n_rows)
    ratios(outcomes, f_star, args.budget)
    print(f"\n  load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
