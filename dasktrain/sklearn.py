"""scikit-learn estimators that train with :class:`~dasktrain.Trainer` on a
Dask cluster.

:class:`LogisticRegression`, :class:`LinearRegression`, :class:`SGDClassifier`,
:class:`SGDRegressor` and :class:`MLPClassifier` follow scikit-learn's
conventions: ``__init__`` only stores its keyword arguments, ``fit`` returns
``self``, learned attributes end in ``_``, and ``get_params``, ``set_params``,
``clone``, ``Pipeline`` and ``GridSearchCV`` work.  scikit-learn (>= 1.4) is
needed for this module only; ``import dasktrain`` works without it.

Inputs
------
``X`` may be

* array-like (NumPy, lists, pandas): validated as scikit-learn does, written to
  a dataset store, trained on the cluster;
* a Dask array (``y`` a Dask or NumPy array): written to a dataset store by
  :meth:`Dataset.from_dask <dasktrain.Dataset.from_dask>`, chunk by chunk on
  the cluster; it is never gathered on the client;
* a :class:`~dasktrain.Dataset` or the path of a dataset store: trained on as
  is (``y`` must be ``None``: labels come from the store's ``y`` array;
  classifiers whose labels are not already ``0 .. k-1`` get an encoded copy
  written on the cluster).

Stores written from array inputs go to ``store_dir`` if given, else to a
temporary directory that the estimator owns and that is removed when the
estimator is garbage collected (or at interpreter exit).  Each ``fit`` starts a
new run whose parameter store is :attr:`store_`; in ``store_dir`` it is kept,
so ``Trainer.resume(est.store_)`` can inspect or continue it.  The dataset
stores written from array inputs are scratch copies, removed once training
ends.  With a cluster on other machines, ``store_dir`` must be on storage that
the workers can read: it may be an fsspec URL (``s3://bucket/runs``), reached
with ``storage_options`` (credentials, endpoint...; also used to open a store
path passed as ``X``).

Predictions on NumPy input are computed on the client (the parameters are
small); Dask arrays, Datasets and store paths give lazy Dask arrays.

Cluster
-------
``client=None`` uses the current default :class:`distributed.Client` if there
is one, else a *shared* embedded ``LocalCluster`` started on first use by
:func:`shared_client` (one single-threaded worker process per core), reused by
every estimator of the process and closed at interpreter exit (or by
:func:`close_shared_cluster`).  ``client`` may also be a ``Client`` or a
scheduler address; an address is clone-safe (a ``Client`` object cannot be
deep-copied, so ``clone``/``GridSearchCV`` need an address or ``None``).

Not supported
-------------
``sample_weight``: no estimator here accepts it, and ``fit`` has no such
argument, so :func:`sklearn.utils.validation.has_fit_parameter` reports it
correctly to meta-estimators and passing one raises ``TypeError``.  Sparse
input, multi-output targets and ``fit_intercept=False`` are not supported
either; the intercept is never penalized.

Conformance
-----------
``tests/integration/test_sklearn_estimators.py`` runs
:func:`sklearn.utils.estimator_checks.parametrize_with_checks` (scikit-learn
1.9, legacy checks included) over the five estimators, with iteration budgets
cut to 5 as scikit-learn does for its own estimators.  Every check passes, so
:func:`expected_failed_checks` (the ``expected_failed_checks`` argument)
lists none.  Two groups pass vacuously: the sample-weight checks
(``check_sample_weights_*``, ``check_sample_weight_equivalence_*``), since
``fit`` has no ``sample_weight``, and the array-API checks, which scikit-learn
skips unless ``SCIPY_ARRAY_API=1``.

Examples
--------
>>> import numpy as np
>>> from dasktrain.sklearn import LogisticRegression
>>> rng = np.random.default_rng(0)
>>> X = rng.standard_normal((200, 3))
>>> y = np.where(X[:, 0] - X[:, 1] > 0, "yes", "no")
>>> clf = LogisticRegression(C=10.0).fit(X, y)
>>> clf.classes_.tolist(), clf.score(X, y) > 0.95
(['no', 'yes'], True)
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import numbers
import os
import shutil
import tempfile
import threading
import uuid
import warnings
import weakref
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from distributed import Client, LocalCluster, default_client
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning, DataConversionWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state

from dasktrain import models
from dasktrain.callbacks import Callback
from dasktrain.data import DEFAULT_CHUNK_ROWS, Dataset
from dasktrain.engine.cluster import DEFAULT_THREADS_PER_WORKER
from dasktrain.errors import ConfigMismatchError
from dasktrain.history import History
from dasktrain.optim import LBFGS, SGD, Adam, Newton, Optimizer, Schedule
from dasktrain.optim.newton import MAX_HESSIAN_PARAMS
from dasktrain.params import ParamStore
from dasktrain.trainer import Trainer

try:
    from sklearn.utils.validation import validate_data
except ImportError:  # scikit-learn < 1.6

    def validate_data(estimator: Any, *args: Any, **kwargs: Any) -> Any:
        return estimator._validate_data(*args, **kwargs)


if TYPE_CHECKING:
    import dask.array as da

    from dasktrain.models import Model

logger = logging.getLogger(__name__)

__all__ = [
    "LinearRegression",
    "LogisticRegression",
    "MLPClassifier",
    "SGDClassifier",
    "SGDRegressor",
    "close_shared_cluster",
    "expected_failed_checks",
    "shared_client",
]

#: ``chunk_rows="auto"``: stores of up to this many rows are one chunk (one
#: task per pass: the lowest latency for small data).
AUTO_MIN_CHUNK_ROWS = 16_384
#: ``chunk_rows="auto"``: larger inputs are split in about this many chunks,
#: up to :data:`~dasktrain.data.DEFAULT_CHUNK_ROWS` rows each.  The rule
#: depends on the row count only, never on the cluster, so minibatches (and
#: hence results) are the same on any number of workers.
AUTO_TARGET_CHUNKS = 8
#: Codec of the scratch dataset stores written from array inputs.
SCRATCH_CODEC = "lz4"
#: Committed versions kept in the parameter store of a run.
KEEP_VERSIONS = 1
#: ``batch_size="auto"`` of :class:`MLPClassifier`: ``min(200, n_rows)``, as
#: in scikit-learn.
MLP_AUTO_BATCH_ROWS = 200
#: Epochs without improvement that stop ``LogisticRegression(solver="adam")``.
ADAM_PATIENCE = 5

_SOLVERS = ("auto", "newton", "lbfgs", "adam")
_LINEAR_PENALTIES = ("l2", "l1", "elasticnet", None)
_MLP_SOLVERS = ("adam", "sgd")
_MLP_ACTIVATIONS = ("relu", "tanh")


# ---------------------------------------------------------------------------
# The shared embedded cluster
# ---------------------------------------------------------------------------

_shared_lock = threading.Lock()
_shared: tuple[Client, LocalCluster] | None = None
_address_clients: dict[str, Client] = {}
_atexit_registered = False


def shared_client() -> Client:
    """The client of the embedded cluster shared by all estimators.

    Started on first use (one single-threaded worker process per core, on
    127.0.0.1) and closed at interpreter exit or by
    :func:`close_shared_cluster`.  It is not made the default client.

    Returns
    -------
    distributed.Client
    """
    global _shared
    with _shared_lock:
        if _shared is not None and _shared[0].status == "running":
            return _shared[0]
        if _shared is not None:
            _close(*_shared)
        cluster = LocalCluster(
            n_workers=max(1, os.cpu_count() or 1),
            threads_per_worker=DEFAULT_THREADS_PER_WORKER,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )
        client = Client(cluster, set_as_default=False)
        logger.info("started the shared embedded cluster: %s", client.dashboard_link)
        _shared = (client, cluster)
        _register_atexit()
        return client


def close_shared_cluster() -> None:
    """Close the shared embedded cluster (if started) and the clients this
    module opened for scheduler addresses.  Safe to call more than once."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _close(*_shared)
            _shared = None
        for client in _address_clients.values():
            _close(client, None)
        _address_clients.clear()


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(close_shared_cluster)
        _atexit_registered = True


def _close(client: Client, cluster: LocalCluster | None) -> None:
    try:
        client.close()
        if cluster is not None:
            cluster.close()
    except Exception:  # closing at exit: nothing useful to do with an error
        logger.debug("error while closing a cluster", exc_info=True)


def _resolve_client(client: Any) -> Client:
    """The client an estimator uses (see the module documentation)."""
    if client is None:
        try:
            return default_client()
        except ValueError:
            return shared_client()
    if isinstance(client, Client):
        return client
    if isinstance(client, str):
        with _shared_lock:
            found = _address_clients.get(client)
            if found is None or found.status != "running":
                found = Client(client, set_as_default=False)
                _address_clients[client] = found
                _register_atexit()
            return found
    raise TypeError(
        f"client must be None, a distributed.Client or a scheduler address, "
        f"got {type(client).__name__}"
    )


# ---------------------------------------------------------------------------
# Scratch space
# ---------------------------------------------------------------------------


class _ScratchDir:
    """A temporary directory, removed when this object is garbage collected
    or at interpreter exit."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="dasktrain-sklearn-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def remove(self) -> None:
        self._finalizer()


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if _is_url(root) else os.path.join(root, name)


def _remove_store(path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    if not _is_url(path):
        shutil.rmtree(path.removeprefix("file://"), ignore_errors=True)
        return
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    try:
        fs.rm(fs_path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception:
        logger.warning("could not remove the scratch store %s", path, exc_info=True)


def _auto_chunk_rows(n_rows: int) -> int:
    per_chunk = max(AUTO_MIN_CHUNK_ROWS, math.ceil(n_rows / AUTO_TARGET_CHUNKS))
    return max(1, min(DEFAULT_CHUNK_ROWS, per_chunk, n_rows))


# ---------------------------------------------------------------------------
# Parameter checks (run by fit, never by __init__ or set_params)
# ---------------------------------------------------------------------------


def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_number(
    name: str, value: object, *, low: float = 0.0, strict: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < low or (strict and out == low):
        sign = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {sign} {low}, got {value!r}")
    return out


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_learning_rate(name: str, value: object) -> float | Schedule:
    if isinstance(value, Schedule):
        return value
    return _check_number(name, value, strict=True)


def _check_tol(value: object) -> float | None:
    return None if value is None else _check_number("tol", value)


def _check_batch_size(value: object) -> int | None:
    return None if value is None else _check_int("batch_size", value, 1)


def _check_chunk_rows(value: object) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return _check_int("chunk_rows", value, 1)
    raise ValueError(f"chunk_rows must be 'auto' or an integer >= 1, got {value!r}")


def _penalties(penalty: object, alpha: float, l1_ratio: object) -> tuple[float, float]:
    """``(l2, l1)`` strengths of an SGD-style ``penalty`` and ``alpha``."""
    _check_choice("penalty", penalty, _LINEAR_PENALTIES)
    if penalty == "l2":
        return alpha, 0.0
    if penalty == "l1":
        return 0.0, alpha
    if penalty == "elasticnet":
        ratio = _check_number("l1_ratio", l1_ratio)
        if ratio > 1:
            raise ValueError(f"l1_ratio must be in [0, 1], got {l1_ratio!r}")
        return alpha * (1.0 - ratio), alpha * ratio
    return 0.0, 0.0


# ---------------------------------------------------------------------------
# Stopping rule of the step optimizers
# ---------------------------------------------------------------------------


class _Plateau(Callback):
    """scikit-learn's stopping rule of its SGD and MLP estimators: stop when
    the epoch's mean objective has not improved by more than ``tol`` on the
    best one for ``patience`` epochs in a row.

    It only keeps the count: the estimator trains in segments of
    :attr:`epochs_to_decision` epochs (the rule cannot trigger earlier) and
    stops between segments, so an early-stopped run ends "finished", not
    "stopped", and ``partial_fit`` can continue it.
    """

    def __init__(self, tol: float, patience: int) -> None:
        self.tol = tol
        self.patience = patience
        self.best: float | None = None
        self.wait = 0
        self._sum = 0.0
        self._rows = 0
        self._last_step = 0

    @property
    def triggered(self) -> bool:
        return self.wait >= self.patience

    @property
    def epochs_to_decision(self) -> int:
        """Epochs before the rule can first trigger (``wait`` grows by one
        per epoch at most)."""
        return max(1, self.patience - self.wait)

    def _add(self, row: dict[str, Any]) -> None:
        if int(row["step"]) > self._last_step:
            self._last_step = int(row["step"])
            self._sum += float(row["objective"]) * float(row["rows"])
            self._rows += int(row["rows"])

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self._add(row)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        # Called before on_step_end for the epoch's last step.
        self._add(row)
        mean = self._sum / max(self._rows, 1)
        self._sum, self._rows = 0.0, 0
        if self.best is not None and mean > self.best - self.tol:
            self.wait += 1
        else:
            self.wait = 0
        if self.best is None or mean < self.best:
            self.best = mean

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.wait = int(state.get("wait", 0))


# ---------------------------------------------------------------------------
# Functions that run in Dask tasks.  They are model methods and NumPy
# functions only, so that workers never import this module (and scikit-learn).
# ---------------------------------------------------------------------------

#: What each prediction output calls on the fitted model.
_MODEL_METHODS = {
    "predict": "predict",
    "proba": "predict_proba",
    "decision": "decision_function",
    "log_proba": "decision_function",
}


def _label_encoder(classes: np.ndarray) -> Any:
    """``labels -> class ids`` (positions in the sorted ``classes``)."""
    return functools.partial(np.searchsorted, classes)


def _log_proba(z: Any, xp: Any) -> Any:
    """Log-probabilities from logits, stably; ``xp`` is ``numpy`` or
    ``dask.array``."""
    if z.ndim == 1:  # binary: log(sigmoid(-z)), log(sigmoid(z))
        return xp.stack([-xp.logaddexp(0, z), -xp.logaddexp(0, -z)], axis=1)
    top = z.max(axis=1, keepdims=True)
    return z - (top + xp.log(xp.exp(z - top).sum(axis=1, keepdims=True)))


def _is_dask(a: object) -> bool:
    return type(a).__module__.startswith("dask.array") and hasattr(a, "chunks")


def _is_store(a: object) -> bool:
    return isinstance(a, Dataset | str | os.PathLike)


@dataclass
class _Input:
    """A training dataset, the scratch store to remove after training, and
    the classes found (classifiers)."""

    dataset: Dataset
    scratch: str | None = None
    classes: np.ndarray | None = None


@dataclass(frozen=True)
class _Plan:
    """What a run trains and how."""

    model: Model
    optimizer: Optimizer
    epochs: int
    batch_rows: int | None = None
    tol: float | None = None  # stopping rule of step optimizers
    patience: int = 0


# ---------------------------------------------------------------------------
# The base estimator
# ---------------------------------------------------------------------------


class _DasktrainEstimator(BaseEstimator):
    """Shared input handling, training and prediction."""

    _is_classifier_model: ClassVar[bool] = False

    # Parameters every estimator has (set by the subclasses' __init__).
    chunk_rows: int | str
    store_dir: str | os.PathLike[str] | None
    storage_options: Mapping[str, Any] | None
    client: Any
    random_state: Any
    verbose: bool
    tol: Any
    standardize: bool

    # -- hooks of the estimators -------------------------------------------
    @abstractmethod
    def _plan(self, n_rows: int, n_classes: int | None) -> _Plan:
        """Model, optimizer and options of a run (validates parameters)."""

    @abstractmethod
    def _set_learned(self, params: dict[str, np.ndarray]) -> None:
        """Set ``coef_``/``intercept_`` (or ``coefs_``...) from parameters."""

    @abstractmethod
    def _model_params(self) -> dict[str, np.ndarray]:
        """The model's parameters, from the learned attributes."""

    # -- fitting ------------------------------------------------------------
    def _fit(
        self,
        X: Any,
        y: Any,
        *,
        partial: bool,
        classes: Any = None,
    ) -> _DasktrainEstimator:
        _check_chunk_rows(self.chunk_rows)
        _check_choice("standardize", self.standardize, (False, True))
        self._options()
        self._plan(1, None)  # check the hyper-parameters before any I/O
        continuing = partial and hasattr(self, "store_")
        if not continuing:
            self._discard_run()
        client = _resolve_client(self.client)
        data = self._ingest(X, y, client=client, reset=not continuing, classes=classes)
        try:
            if continuing:
                self._continue(data, client)
            else:
                self._start(data, client, partial=partial)
        finally:
            if data.scratch is not None:
                _remove_store(data.scratch, self._options())
        return self

    def _start(self, data: _Input, client: Client, *, partial: bool) -> None:
        n_rows = data.dataset.n_rows
        n_classes = None if data.classes is None else len(data.classes)
        plan = self._plan(n_rows, n_classes)
        seed = _seed(self.random_state)
        store = _join(
            self._store_root(), f"{type(self).__name__}-{uuid.uuid4().hex[:12]}.zarr"
        )
        plateau = None
        callbacks: list[Callback] = []
        if plan.tol is not None and not partial:
            plateau = _Plateau(plan.tol, plan.patience)
            callbacks.append(plateau)
        with Trainer(
            plan.model,
            plan.optimizer,
            store=store,
            client=client,
            seed=seed,
            keep_versions=KEEP_VERSIONS,
            storage_options=self._options(),
            standardize=bool(self.standardize),
        ) as trainer:
            if plateau is None:
                trainer.fit(
                    data.dataset,
                    epochs=1 if partial else plan.epochs,
                    batch_rows=plan.batch_rows,
                    callbacks=callbacks,
                    progress=bool(self.verbose),
                )
            else:
                # Train to the first epoch where the stopping rule can
                # trigger, look, repeat (see _Plateau).
                done = 0
                while done < plan.epochs and not plateau.triggered:
                    trainer.fit(
                        data.dataset,
                        epochs=min(plan.epochs, done + plateau.epochs_to_decision),
                        batch_rows=plan.batch_rows,
                        callbacks=callbacks,
                        progress=bool(self.verbose),
                    )
                    if trainer.epoch == done:  # the run would not go on
                        break
                    done = trainer.epoch
            self._finish(trainer, store, data)
        self._seed = seed
        self._basis_rows = n_rows
        if partial:
            return
        if isinstance(plan.optimizer, LBFGS | Newton):
            converged = self.n_iter_ < plan.epochs
        else:
            converged = plateau is None or plateau.triggered
        if not converged:
            warnings.warn(
                f"{type(self).__name__}: maximum iterations ({plan.epochs}) reached "
                f"and the optimization has not converged yet; increase max_iter",
                ConvergenceWarning,
                stacklevel=4,
            )

    def _continue(self, data: _Input, client: Client) -> None:
        options = self._options()
        if not ParamStore.exists(self.store_, storage_options=options):
            raise RuntimeError(
                f"the parameter store of this run, {self.store_!r}, no longer exists "
                f"(a copy outlived the estimator that owned its scratch directory?); "
                f"call fit() to start a new run, or pass store_dir= to keep stores"
            )
        committed = ParamStore.open(self.store_, storage_options=options).committed
        if committed != self._run_step:
            raise RuntimeError(
                f"the parameter store {self.store_!r} is at step {committed}, but "
                f"this estimator left it at step {self._run_step}: another estimator "
                f"(a copy of this one?) continued the run; call fit() to start anew"
            )
        n_classes = None if not hasattr(self, "classes_") else len(self.classes_)
        plan = self._plan(self._basis_rows, n_classes)
        try:
            trainer = Trainer(
                plan.model,
                plan.optimizer,
                store=self.store_,
                client=client,
                seed=self._seed,
                keep_versions=KEEP_VERSIONS,
                storage_options=options,
                standardize=bool(self.standardize),
            )
        except ConfigMismatchError as exc:
            raise ValueError(
                f"the hyper-parameters of {type(self).__name__} changed since its run "
                f"started; partial_fit continues a run with the settings it started "
                f"with: call fit() (or clone the estimator) to start a new run"
            ) from exc
        with trainer:
            done = trainer.epoch
            trainer.fit(
                data.dataset,
                epochs=done + 1,
                batch_rows=plan.batch_rows,
                progress=bool(self.verbose),
            )
            if trainer.epoch == done:
                raise RuntimeError(
                    f"the run in {self.store_!r} was stopped and cannot be "
                    f"continued; call fit() to start a new run"
                )
            self._finish(trainer, self.store_, data)

    def _finish(self, trainer: Trainer, store: str, data: _Input) -> None:
        if data.classes is not None:
            self.classes_ = data.classes
        self._set_learned(trainer.params)
        self._fitted_model = trainer.model
        self._standardize = trainer.standardize
        self.history_: History = History(trainer.history.rows)
        self.n_iter_: int = trainer.epoch
        self.store_: str = store
        self._run_step = trainer.step

    def _options(self) -> dict[str, Any] | None:
        """``storage_options``, checked (by fit, never by ``__init__``)."""
        options = self.storage_options
        if options is None:
            return None
        if not isinstance(options, Mapping) or not all(
            isinstance(k, str) for k in options
        ):
            raise ValueError(
                f"storage_options must be a dict of fsspec options or None, "
                f"got {options!r}"
            )
        return dict(options)

    def _open(self, X: Any) -> Dataset:
        """A Dataset, or the store at path ``X`` (with ``storage_options``)."""
        if isinstance(X, Dataset):
            return X
        return Dataset.open(X, storage_options=self._options())

    def _store_root(self) -> str:
        if self.store_dir is not None:
            root = os.fspath(self.store_dir)
            if _is_url(root):
                return root.rstrip("/")
            os.makedirs(root, exist_ok=True)
            return root
        scratch = getattr(self, "_scratch", None)
        if scratch is None:
            scratch = self._scratch = _ScratchDir()
        return scratch.path

    def _discard_run(self) -> None:
        """Forget the previous run; remove its store if it is scratch."""
        old = getattr(self, "store_", None)
        scratch = getattr(self, "_scratch", None)
        if (
            old is not None
            and scratch is not None
            and os.path.dirname(old) == scratch.path
        ):
            _remove_store(old)
        learned = [k for k in vars(self) if k.endswith("_") and not k.startswith("__")]
        for name in learned:
            delattr(self, name)

    def __getstate__(self) -> dict[str, Any]:
        # Copies and unpickled estimators do not own the scratch directory.
        state = dict(super().__getstate__())
        state.pop("_scratch", None)
        return state

    # -- inputs ---------------------------------------------------------------
    def _ingest(
        self, X: Any, y: Any, *, client: Client, reset: bool, classes: Any
    ) -> _Input:
        if _is_store(X):
            return self._ingest_store(X, y, client=client, reset=reset, classes=classes)
        if _is_dask_frame(X) or _is_dask_frame(y):
            names = getattr(X, "columns", None)
            with _scheduler_config(client):
                if _is_dask_frame(X):
                    X = self._frame_features(X, reset=reset)
                if _is_dask_frame(y):
                    # Sync point: the partitions' lengths (rows of each block).
                    y = y.to_dask_array(lengths=True)
            data = self._ingest_dask(X, y, client=client, reset=reset, classes=classes)
            if reset and names is not None:
                self.feature_names_in_ = np.asarray([str(c) for c in names], object)
            return data
        if _is_dask(X) or _is_dask(y):
            return self._ingest_dask(X, y, client=client, reset=reset, classes=classes)
        return self._ingest_arrays(X, y, reset=reset, classes=classes)

    def _scratch_path(self) -> str:
        return _join(self._store_root(), f"data-{uuid.uuid4().hex[:12]}.zarr")

    def _chunk_rows_for(self, n_rows: int) -> int:
        chunk_rows = _check_chunk_rows(self.chunk_rows)
        return _auto_chunk_rows(n_rows) if chunk_rows is None else chunk_rows

    def _ingest_arrays(self, X: Any, y: Any, *, reset: bool, classes: Any) -> _Input:
        X, y = validate_data(
            self,
            X,
            y,
            reset=reset,
            dtype=(np.float64, np.float32),
            y_numeric=not self._is_classifier_model,
        )
        found = None
        if self._is_classifier_model:
            check_classification_targets(y)
            found = self._classes(np.unique(y), classes, reset=reset)
            y = np.searchsorted(found, y).astype(np.int64)
        else:
            y = np.asarray(y, dtype=np.float64)
        path = self._scratch_path()
        ds = Dataset.from_arrays(
            path,
            X=X,
            y=y,
            chunk_rows=self._chunk_rows_for(X.shape[0]),
            codec=SCRATCH_CODEC,
            source=f"dasktrain.sklearn.{type(self).__name__}",
            storage_options=self._options(),
        )
        return _Input(ds, scratch=path, classes=found)

    def _ingest_dask(
        self, X: Any, y: Any, *, client: Client, reset: bool, classes: Any
    ) -> _Input:
        import dask
        import dask.array as da

        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y "
                f"is None"
            )
        X = _dask_features(X if _is_dask(X) else da.asarray(X))
        y = y if _is_dask(y) else da.asarray(np.asarray(y))
        if y.ndim == 2 and y.shape[1] == 1:
            warnings.warn(
                "A column-vector y was passed when a 1d array was expected; "
                "using its only column",
                DataConversionWarning,
                stacklevel=4,
            )
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(f"y must be 1-d, got shape {y.shape}")
        self._check_width(X.shape[1], reset=reset)
        found = None
        if self._is_classifier_model:
            # Sync point: the distinct labels, computed on the cluster.
            labels = da.unique(y).compute(scheduler=client)
            check_classification_targets(labels)
            found = self._classes(labels, classes, reset=reset)
            y = y.map_blocks(_label_encoder(found), dtype=np.intp)
        else:
            if y.dtype.kind not in "biuf":
                raise ValueError(f"y must be numeric, got dtype {y.dtype}")
            y = y.astype(np.float64)
        path = self._scratch_path()
        with dask.config.set(scheduler=client):
            ds = Dataset.from_dask(
                path,
                X=X,
                y=y,
                chunk_rows=self._chunk_rows_for(int(X.shape[0])),
                codec=SCRATCH_CODEC,
                source=f"dasktrain.sklearn.{type(self).__name__}",
                storage_options=self._options(),
            )
        return _Input(ds, scratch=path, classes=found)

    def _ingest_store(
        self, X: Any, y: Any, *, client: Client, reset: bool, classes: Any
    ) -> _Input:
        import dask
        import dask.array as da

        if y is not None:
            raise ValueError(
                "y must be None when X is a Dataset or a store path: the targets "
                "are the store's 'y' array"
            )
        ds = self._open(X)
        missing = [f for f in ("X", "y") if f not in ds.fields]
        if missing:
            raise ValueError(
                f"dataset {ds.path!r} has no {' or '.join(map(repr, missing))} array; "
                f"{type(self).__name__} trains on 'X' and 'y'"
            )
        self._check_width(ds.n_features, reset=reset)
        if not self._is_classifier_model:
            return _Input(ds)
        labels_dask: Any = ds.to_dask("y")
        # Sync point: the distinct labels, computed on the cluster.
        labels = da.unique(labels_dask).compute(scheduler=client)
        check_classification_targets(labels)
        found = self._classes(labels, classes, reset=reset)
        if found.dtype.kind in "biuf" and np.array_equal(found, np.arange(len(found))):
            return _Input(ds, classes=found)
        # Labels other than 0..k-1: an encoded copy, written on the cluster.
        path = self._scratch_path()
        with dask.config.set(scheduler=client):
            copy = Dataset.from_dask(
                path,
                X=ds.to_dask("X"),
                y=labels_dask.map_blocks(_label_encoder(found), dtype=np.intp),
                chunk_rows=ds.chunk_rows,
                codec=SCRATCH_CODEC,
                source=f"dasktrain.sklearn.{type(self).__name__}",
                storage_options=self._options(),
            )
        return _Input(copy, scratch=path, classes=found)

    def _frame_features(self, X: Any, *, reset: bool) -> Any:
        """A Dask DataFrame's numeric columns as a Dask array with known
        chunk sizes (the frame is never gathered)."""
        if hasattr(X, "columns"):
            bad = [str(c) for c, t in X.dtypes.items() if t.kind not in "biuf"]
            if bad:
                raise ValueError(
                    f"X has non-numeric columns {bad}; encode them first (e.g. "
                    f"Dataset.from_parquet(categorical=...))"
                )
            known = getattr(self, "feature_names_in_", None)
            if (
                not reset
                and known is not None
                and list(known) != [str(c) for c in X.columns]
            ):
                raise ValueError(
                    f"X has columns {list(X.columns)}, but {type(self).__name__} "
                    f"was fitted with {list(known)}"
                )
        else:
            X = X.to_frame()
        # Sync point: the partitions' lengths (rows of each block).
        return X.to_dask_array(lengths=True)

    def _check_width(self, n_features: int, *, reset: bool) -> None:
        if reset:
            self.n_features_in_ = int(n_features)
            if "feature_names_in_" in self.__dict__:
                del self.feature_names_in_
        elif n_features != self.n_features_in_:
            raise ValueError(
                f"X has {n_features} features, but {type(self).__name__} is "
                f"expecting {self.n_features_in_} features as input."
            )

    def _classes(self, found: np.ndarray, classes: Any, *, reset: bool) -> np.ndarray:
        """The classes of a run, checking the labels ``found`` in ``y``."""
        if reset:
            known = found if classes is None else np.unique(np.asarray(classes))
        else:
            known = self.classes_
            if classes is not None and not np.array_equal(
                np.unique(np.asarray(classes)), known
            ):
                raise ValueError(
                    f"classes={np.unique(np.asarray(classes)).tolist()} is not the "
                    f"same as on the first call to partial_fit: {known.tolist()}"
                )
        unseen = np.setdiff1d(found, known)
        if unseen.size:
            raise ValueError(
                f"y has labels {unseen.tolist()} that are not in classes "
                f"{known.tolist()}"
            )
        if len(known) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in the "
                f"data, but the data contains only one class: {known.tolist()}"
            )
        return known

    # -- predictions -------------------------------------------------------------
    def _apply(self, X: Any, output: str) -> Any:
        check_is_fitted(self)
        fn = functools.partial(
            getattr(self._fitted_model, _MODEL_METHODS[output]), self._model_params()
        )
        standardize = getattr(self, "_standardize", None)
        if standardize is not None:
            fn = functools.partial(_standardized, fn, standardize)
        labels = output == "predict" and self._is_classifier_model
        if _is_store(X):
            ds = self._open(X)
            X = ds.to_dask("X")
        elif _is_dask_frame(X):
            X = self._frame_features(X, reset=False)
        if not _is_dask(X):
            X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
            out = np.asarray(fn(X))
            if labels:
                out = self.classes_[out]
            return _log_proba(out, np) if output == "log_proba" else out

        import dask.array as da

        X = _dask_features(X)
        self._check_width(int(X.shape[1]), reset=False)
        probe = np.asarray(fn(np.zeros((1, X.shape[1]), dtype=X.dtype)))
        tail = probe.shape[1:]
        result = X.map_blocks(
            fn,
            dtype=probe.dtype,
            drop_axis=None if tail else 1,
            chunks=(X.chunks[0], *((s,) for s in tail)),
            meta=np.empty((0, *tail), dtype=probe.dtype),
        )
        if labels:
            result = result.map_blocks(
                functools.partial(np.take, self.classes_),
                dtype=self.classes_.dtype,
                meta=np.empty(0, dtype=self.classes_.dtype),
            )
        return _log_proba(result, da) if output == "log_proba" else result

    def _score_inputs(self, X: Any, y: Any) -> tuple[Any, Any, bool]:
        """``(predictions, y, lazy)`` for :meth:`score`."""
        if _is_store(X):
            if y is not None:
                raise ValueError(
                    "y must be None when X is a Dataset or a store path: the "
                    "targets are the store's 'y' array"
                )
            ds = self._open(X)
            return self._apply(ds, "predict"), ds.to_dask("y"), True
        if _is_dask(X) or _is_dask(y):
            import dask.array as da

            if y is None:
                raise ValueError("score() needs y for Dask inputs")
            pred = self._apply(X if _is_dask(X) else da.asarray(X), "predict")
            return pred, y if _is_dask(y) else da.asarray(np.asarray(y)), True
        return None, y, False


def _is_dask_frame(a: object) -> bool:
    return type(a).__module__.startswith("dask.dataframe") and hasattr(
        a, "to_dask_array"
    )


def _scheduler_config(client: Client) -> Any:
    import dask

    return dask.config.set(scheduler=client)


def _standardized(fn: Any, standardize: Any, X: np.ndarray) -> Any:
    """``fn`` of standardized features (the run's statistics)."""
    return fn(standardize.transform(X))


def _dask_features(X: da.Array) -> da.Array:
    """A Dask ``X`` checked (2-d, known rows, numeric) and cast to float."""
    if X.ndim != 2:
        raise ValueError(f"X must be 2-d (rows, features), got shape {X.shape}")
    if any(math.isnan(s) for s in X.shape):
        raise ValueError(
            f"X has unknown chunk sizes {X.shape}; call X.compute_chunk_sizes() first"
        )
    if X.dtype.kind not in "biuf":
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    if X.chunks[1] != (X.shape[1],):
        X = X.rechunk({1: -1})
    return X


def _seed(random_state: Any) -> int:
    if isinstance(random_state, numbers.Integral) and not isinstance(
        random_state, bool
    ):
        return int(random_state) % (2**32)
    return int(check_random_state(random_state).randint(2**31 - 1))


# ---------------------------------------------------------------------------
# Classifier and regressor faces
# ---------------------------------------------------------------------------


class _Classifier(ClassifierMixin, _DasktrainEstimator):
    _is_classifier_model: ClassVar[bool] = True

    def predict(self, X: Any) -> Any:
        """Class labels (from :attr:`classes_`).

        Parameters
        ----------
        X : array-like, Dask array, Dataset or store path

        Returns
        -------
        ndarray or dask.array.Array of shape (n_rows,)
        """
        return self._apply(X, "predict")

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities, columns in the order of :attr:`classes_`.

        Returns
        -------
        ndarray or dask.array.Array of shape (n_rows, n_classes)
        """
        return self._apply(X, "proba")

    def predict_log_proba(self, X: Any) -> Any:
        """Logarithm of :meth:`predict_proba`, computed stably from the logits.

        Returns
        -------
        ndarray or dask.array.Array of shape (n_rows, n_classes)
        """
        return self._apply(X, "log_proba")

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Accuracy of :meth:`predict` on ``X`` against ``y`` (for a Dataset
        or store path, its ``y`` array; ``sample_weight`` only for array
        inputs)."""
        pred, y, lazy = self._score_inputs(X, y)
        if not lazy:
            return float(super().score(X, y, sample_weight=sample_weight))
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported with Dask or store inputs")
        client = _resolve_client(self.client)
        # Sync point: one small reduction on the cluster.
        return float((pred == y).mean().compute(scheduler=client))


class _Regressor(RegressorMixin, _DasktrainEstimator):
    _is_classifier_model: ClassVar[bool] = False

    def predict(self, X: Any) -> Any:
        """Predicted values.

        Parameters
        ----------
        X : array-like, Dask array, Dataset or store path

        Returns
        -------
        ndarray or dask.array.Array of shape (n_rows,)
        """
        return self._apply(X, "predict")

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Coefficient of determination R^2 of :meth:`predict` (for a Dataset
        or store path, against its ``y`` array; ``sample_weight`` only for
        array inputs)."""
        pred, y, lazy = self._score_inputs(X, y)
        if not lazy:
            return float(super().score(X, y, sample_weight=sample_weight))
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported with Dask or store inputs")
        import dask

        y = y.astype(np.float64)
        client = _resolve_client(self.client)
        # Sync point: three small reductions on the cluster.
        mean, ss_res, ss_y = dask.compute(
            y.mean(), ((y - pred) ** 2).sum(), (y**2).sum(), scheduler=client
        )
        ss_tot = ss_y - y.shape[0] * mean**2
        return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def _linear_classifier_params(
    coef: np.ndarray, intercept: np.ndarray
) -> dict[str, np.ndarray]:
    if coef.shape[0] == 1:  # binary: a weight vector and a scalar bias
        return {"w": coef[0], "b": np.asarray(intercept[0])}
    return {"w": coef.T, "b": intercept}


def _linear_classifier_attrs(
    params: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    if w.ndim == 1:
        return w[None, :].copy(), b.reshape(1).copy()
    return np.ascontiguousarray(w.T), b.copy()


def _second_order(
    solver: str, tol: float, n_coefs: int | None, owner: str
) -> Optimizer:
    """The full-batch optimizer of ``solver``: ``"auto"`` is Newton (the
    fastest to the optimum in ``benchmarks/compare_peers.py``) up to
    :data:`~dasktrain.optim.newton.MAX_HESSIAN_PARAMS` coefficients, L-BFGS
    beyond (``n_coefs`` is ``None`` before the data is known)."""
    too_many = n_coefs is not None and n_coefs > MAX_HESSIAN_PARAMS
    if solver == "newton" and too_many:
        raise ValueError(
            f"{owner}(solver='newton') keeps a dense Hessian of {n_coefs} "
            f"coefficients, more than {MAX_HESSIAN_PARAMS}: use solver='lbfgs' "
            f"(or 'auto')"
        )
    if solver == "lbfgs" or (solver == "auto" and too_many):
        return LBFGS(tol=tol)
    return Newton(tol=tol)


def _linear_classifier_model(
    n_classes: int | None, *, l2: float, l1: float = 0.0
) -> Model:
    if n_classes is None or n_classes == 2:
        return models.LogisticRegression(l2=l2, l1=l1)
    return models.SoftmaxRegression(n_classes, l2=l2, l1=l1)


# ---------------------------------------------------------------------------
# The estimators
# ---------------------------------------------------------------------------


class LogisticRegression(_Classifier):
    """Logistic regression (binary, or multinomial for more classes).

    Minimizes the mean log loss plus ``||w||^2 / (2 C n_rows)``, which is
    scikit-learn's ``LogisticRegression(C=C)`` objective (``l2 = 1 / (C *
    n_rows)`` of :class:`dasktrain.models.LogisticRegression`; more than two
    classes use :class:`~dasktrain.models.SoftmaxRegression`).  The intercept
    is not penalized.

    Parameters
    ----------
    penalty : {"l2", None}, default="l2"
        ``None`` fits without regularization (``C`` is then unused).
    C : float, default=1.0
        Inverse regularization strength, > 0.
    solver : {"auto", "newton", "lbfgs", "adam"}, default="auto"
        ``"newton"``: full-batch damped Newton steps from the gradient and
        Hessian of each pass, after a first pass that solves every chunk
        locally (:class:`dasktrain.optim.Newton`); ``"auto"`` (the default,
        the fastest in the project's benchmarks) is Newton up to 4,096
        coefficients and L-BFGS beyond.  ``"lbfgs"``: full-batch L-BFGS, each
        iteration a strong-Wolfe line search over full passes.  ``"adam"``:
        Adam steps on batches of ``batch_size`` rows (``None``: full batch)
        with ``learning_rate``.
    max_iter : int, default=100
        Newton or L-BFGS iterations, or Adam epochs.
    tol : float, default=1e-6
        Newton and L-BFGS: stop when ``max|gradient| <= tol * max(1,
        |objective|)``.
        Adam: stop when the epoch's mean objective has not improved by more
        than ``tol`` for 5 epochs in a row.
    learning_rate : float or Schedule, default=0.01
        Adam's step size (``solver="adam"``).
    batch_size : int or None, default=None
        Rows per Adam step (``solver="adam"``); ``None`` for full batches.
    chunk_rows : int or "auto", default="auto"
        Rows per chunk of the stores written from array inputs; ``"auto"``:
        one chunk up to 16,384 rows, else about 8 chunks of at most 65,536.
    store_dir : str or PathLike, optional
        Where stores are written (see the module documentation): a local
        directory or an fsspec URL (``s3://bucket/runs``).
    storage_options : dict, optional
        fsspec options (credentials, endpoint...) of the stores given as
        URLs: ``store_dir``, and a store path passed as ``X``.  Sent to the
        workers with the stores; ignored for local paths.
    client : distributed.Client, str or None, default=None
        The cluster (see the module documentation).
    random_state : int, RandomState or None, default=None
        Seeds the run (minibatch order).
    verbose : bool, default=False
        Show a progress bar.
    standardize : bool, default=False
        Train on standardized features ``(X - mean) / std``, with statistics
        computed on the cluster in one pass and stored with the run (see
        :mod:`dasktrain.preprocessing`); predictions standardize their input.
        ``coef_`` then applies to standardized features, as behind a
        ``StandardScaler``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels, sorted; predictions map back to them.
    coef_ : ndarray of shape (1, n_features) or (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` had string column names.
    n_iter_ : int
        Newton or L-BFGS iterations (or Adam epochs) run.
    history_ : History
        One row per optimizer step (loss, objective, gradient norm, ...).
    store_ : str
        Path of the run's parameter store.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from dasktrain.sklearn import LogisticRegression
    >>> X, y = load_iris(return_X_y=True)
    >>> pipe = make_pipeline(StandardScaler(), LogisticRegression(C=10.0))
    >>> pipe.fit(X, y).score(X, y) > 0.95
    True
    >>> pipe[-1].coef_.shape, pipe.predict_proba(X[:2]).shape
    ((3, 4), (2, 3))
    """

    def __init__(
        self,
        *,
        penalty: str | None = "l2",
        C: float = 1.0,
        solver: str = "auto",
        max_iter: int = 100,
        tol: float = 1e-6,
        learning_rate: float | Schedule = 0.01,
        batch_size: int | None = None,
        chunk_rows: int | str = "auto",
        store_dir: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        client: Any = None,
        random_state: Any = None,
        verbose: bool = False,
        standardize: bool = False,
    ) -> None:
        self.penalty = penalty
        self.C = C
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.chunk_rows = chunk_rows
        self.store_dir = store_dir
        self.storage_options = storage_options
        self.client = client
        self.random_state = random_state
        self.verbose = verbose
        self.standardize = standardize

    def fit(self, X: Any, y: Any = None) -> LogisticRegression:
        """Train on ``X`` and ``y`` (or on a Dataset or store path ``X``).

        Returns
        -------
        self
        """
        self._fit(X, y, partial=False)
        return self

    def decision_function(self, X: Any) -> Any:
        """Logits ``X @ coef_.T + intercept_``: shape (n_rows,) for two
        classes (positive for ``classes_[1]``), else (n_rows, n_classes)."""
        return self._apply(X, "decision")

    def _plan(self, n_rows: int, n_classes: int | None) -> _Plan:
        _check_choice("penalty", self.penalty, ("l2", None))
        _check_choice("solver", self.solver, _SOLVERS)
        C = _check_number("C", self.C, strict=True)
        max_iter = _check_int("max_iter", self.max_iter, 1)
        tol = _check_number("tol", self.tol)
        l2 = 1.0 / (C * n_rows) if self.penalty == "l2" else 0.0
        model = _linear_classifier_model(n_classes, l2=l2)
        if self.solver != "adam":
            n_features = getattr(self, "n_features_in_", None)
            k = 1 if n_classes is None or n_classes == 2 else n_classes
            n_coefs = None if n_features is None else (int(n_features) + 1) * k
            optimizer = _second_order(self.solver, tol, n_coefs, type(self).__name__)
            return _Plan(model, optimizer, max_iter)
        return _Plan(
            model,
            Adam(_check_learning_rate("learning_rate", self.learning_rate)),
            max_iter,
            batch_rows=_check_batch_size(self.batch_size),
            tol=tol,
            patience=ADAM_PATIENCE,
        )

    def _set_learned(self, params: dict[str, np.ndarray]) -> None:
        self.coef_, self.intercept_ = _linear_classifier_attrs(params)

    def _model_params(self) -> dict[str, np.ndarray]:
        return _linear_classifier_params(self.coef_, self.intercept_)


class LinearRegression(_Regressor):
    """Least squares, with an optional ridge penalty, trained with Newton
    (one step solves it) or L-BFGS.

    Minimizes ``mean_i 0.5 * (y_i - x_i @ w - b)**2 + alpha / (2 n_rows) *
    ||w||^2``: the minimizer of scikit-learn's ``Ridge(alpha)`` (and of
    ``LinearRegression`` for ``alpha=0``), through
    :class:`dasktrain.models.LinearRegression` with ``l2 = alpha / n_rows``.
    The intercept is not penalized.

    Parameters
    ----------
    alpha : float, default=0.0
        Ridge strength, >= 0 (scikit-learn's ``Ridge`` semantics).
    max_iter : int, default=100
        Newton or L-BFGS iterations.
    tol : float, default=1e-6
        Stop when ``max|gradient| <= tol * max(1, |objective|)``.
    solver : {"auto", "newton", "lbfgs"}, default="auto"
        As in :class:`LogisticRegression`.
    chunk_rows, store_dir, storage_options, client, random_state, verbose, standardize
        As in :class:`LogisticRegression`.

    Attributes
    ----------
    coef_ : ndarray of shape (n_features,)
    intercept_ : float
    n_features_in_, feature_names_in_, n_iter_, history_, store_
        As in :class:`LogisticRegression`.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.sklearn import LinearRegression
    >>> X = np.random.default_rng(0).standard_normal((100, 2))
    >>> reg = LinearRegression().fit(X, 3 * X[:, 0] - X[:, 1] + 2)
    >>> np.round(reg.coef_, 4), round(reg.intercept_, 4)
    (array([ 3., -1.]), 2.0)
    """

    def __init__(
        self,
        *,
        alpha: float = 0.0,
        max_iter: int = 100,
        tol: float = 1e-6,
        solver: str = "auto",
        chunk_rows: int | str = "auto",
        store_dir: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        client: Any = None,
        random_state: Any = None,
        verbose: bool = False,
        standardize: bool = False,
    ) -> None:
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.chunk_rows = chunk_rows
        self.store_dir = store_dir
        self.storage_options = storage_options
        self.client = client
        self.random_state = random_state
        self.verbose = verbose
        self.standardize = standardize

    def fit(self, X: Any, y: Any = None) -> LinearRegression:
        """Train on ``X`` and ``y`` (or on a Dataset or store path ``X``).

        Returns
        -------
        self
        """
        self._fit(X, y, partial=False)
        return self

    def _plan(self, n_rows: int, n_classes: int | None) -> _Plan:
        alpha = _check_number("alpha", self.alpha)
        max_iter = _check_int("max_iter", self.max_iter, 1)
        tol = _check_number("tol", self.tol)
        _check_choice("solver", self.solver, ("auto", "newton", "lbfgs"))
        n_features = getattr(self, "n_features_in_", None)
        optimizer = _second_order(
            self.solver,
            tol,
            None if n_features is None else int(n_features) + 1,
            type(self).__name__,
        )
        return _Plan(models.LinearRegression(l2=alpha / n_rows), optimizer, max_iter)

    def _set_learned(self, params: dict[str, np.ndarray]) -> None:
        self.coef_ = np.asarray(params["w"]).copy()
        self.intercept_ = float(params["b"])

    def _model_params(self) -> dict[str, np.ndarray]:
        return {"w": self.coef_, "b": np.asarray(self.intercept_)}


class _SGDMixin:
    """Parameters shared by the SGD estimators."""

    penalty: str | None
    alpha: float
    l1_ratio: float
    max_iter: int
    tol: float | None
    n_iter_no_change: int
    learning_rate: float | Schedule
    momentum: float
    nesterov: bool
    batch_size: int | None

    def _sgd_plan(self, model: Model) -> _Plan:
        return _Plan(
            model,
            SGD(
                _check_learning_rate("learning_rate", self.learning_rate),
                momentum=self.momentum,
                nesterov=self.nesterov,
            ),
            _check_int("max_iter", self.max_iter, 1),
            batch_rows=_check_batch_size(self.batch_size),
            tol=_check_tol(self.tol),
            patience=_check_int("n_iter_no_change", self.n_iter_no_change, 1),
        )

    def _sgd_penalties(self) -> tuple[float, float]:
        alpha = _check_number("alpha", self.alpha)
        return _penalties(self.penalty, alpha, self.l1_ratio)


class SGDClassifier(_SGDMixin, _Classifier):
    """Logistic regression trained by minibatch SGD (``loss="log_loss"``).

    Minimizes the mean log loss plus ``alpha * R(w)`` with ``R`` the
    ``penalty`` (``"l2"``: ``||w||^2 / 2``; ``"l1"``: ``||w||_1``;
    ``"elasticnet"``: ``(1 - l1_ratio) ||w||^2 / 2 + l1_ratio ||w||_1``), as
    scikit-learn's ``SGDClassifier``; more than two classes use a softmax
    (multinomial) model rather than one-versus-all.  Each step is one
    cluster pass over ``batch_size`` rows, so batches are larger than
    scikit-learn's single rows.

    Parameters
    ----------
    loss : {"log_loss"}, default="log_loss"
    penalty : {"l2", "l1", "elasticnet", None}, default="l2"
    alpha : float, default=1e-4
    l1_ratio : float, default=0.15
        Used by ``penalty="elasticnet"``.
    max_iter : int, default=100
        Epochs of :meth:`fit`.
    tol : float or None, default=1e-3
        Stop when the epoch's mean objective has not improved by more than
        ``tol`` for ``n_iter_no_change`` epochs; ``None``: run ``max_iter``
        epochs.
    n_iter_no_change : int, default=5
    learning_rate : float or Schedule, default=0.01
        Step size, or a :mod:`dasktrain.optim` schedule of the step count.
    momentum : float, default=0.0
    nesterov : bool, default=False
    batch_size : int or None, default=256
        Rows per step; ``None`` for full batches.
    chunk_rows, store_dir, storage_options, client, random_state, verbose, standardize
        As in :class:`LogisticRegression`.

    Attributes
    ----------
    classes_, coef_, intercept_, n_features_in_, feature_names_in_, history_,
    store_
        As in :class:`LogisticRegression`.
    n_iter_ : int
        Epochs run (over all :meth:`partial_fit` calls of the run).

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.sklearn import SGDClassifier
    >>> X = np.random.default_rng(0).standard_normal((300, 2))
    >>> y = (X[:, 0] > 0).astype(int)
    >>> clf = SGDClassifier(learning_rate=0.5, batch_size=None, max_iter=10,
    ...                     tol=None, random_state=0)
    >>> clf.fit(X, y).score(X, y) > 0.95
    True
    >>> clf.partial_fit(X, y).n_iter_
    11
    """

    def __init__(
        self,
        *,
        loss: str = "log_loss",
        penalty: str | None = "l2",
        alpha: float = 1e-4,
        l1_ratio: float = 0.15,
        max_iter: int = 100,
        tol: float | None = 1e-3,
        n_iter_no_change: int = 5,
        learning_rate: float | Schedule = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        batch_size: int | None = 256,
        chunk_rows: int | str = "auto",
        store_dir: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        client: Any = None,
        random_state: Any = None,
        verbose: bool = False,
        standardize: bool = False,
    ) -> None:
        self.loss = loss
        self.penalty = penalty
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov
        self.batch_size = batch_size
        self.chunk_rows = chunk_rows
        self.store_dir = store_dir
        self.storage_options = storage_options
        self.client = client
        self.random_state = random_state
        self.verbose = verbose
        self.standardize = standardize

    def fit(self, X: Any, y: Any = None) -> SGDClassifier:
        """Train a new run for up to ``max_iter`` epochs.

        Returns
        -------
        self
        """
        self._fit(X, y, partial=False)
        return self

    def partial_fit(self, X: Any, y: Any = None, classes: Any = None) -> SGDClassifier:
        """One more epoch over ``X``, ``y``, continuing the current run.

        Parameters
        ----------
        X, y
            As in :meth:`fit`.
        classes : array-like, optional
            All the labels; required on the first call (unless after
            :meth:`fit`).

        Returns
        -------
        self
        """
        if classes is None and not hasattr(self, "classes_"):
            raise ValueError("classes must be passed on the first call to partial_fit")
        self._fit(X, y, partial=True, classes=classes)
        return self

    def decision_function(self, X: Any) -> Any:
        """Logits, as :meth:`LogisticRegression.decision_function`."""
        return self._apply(X, "decision")

    def _plan(self, n_rows: int, n_classes: int | None) -> _Plan:
        _check_choice("loss", self.loss, ("log_loss",))
        l2, l1 = self._sgd_penalties()
        return self._sgd_plan(_linear_classifier_model(n_classes, l2=l2, l1=l1))

    def _set_learned(self, params: dict[str, np.ndarray]) -> None:
        self.coef_, self.intercept_ = _linear_classifier_attrs(params)

    def _model_params(self) -> dict[str, np.ndarray]:
        return _linear_classifier_params(self.coef_, self.intercept_)


class SGDRegressor(_SGDMixin, _Regressor):
    """Linear least squares trained by minibatch SGD (``loss="squared_error"``).

    Minimizes ``mean_i 0.5 * (y_i - x_i @ w - b)**2 + alpha * R(w)``, as
    scikit-learn's ``SGDRegressor``; see :class:`SGDClassifier` for the
    penalties, the stopping rule and the other parameters.

    Parameters
    ----------
    loss : {"squared_error"}, default="squared_error"
    penalty, alpha, l1_ratio, max_iter, tol, n_iter_no_change, learning_rate,
    momentum, nesterov, batch_size, chunk_rows, store_dir, storage_options,
    client, random_state, verbose, standardize
        As in :class:`SGDClassifier`.

    Attributes
    ----------
    coef_ : ndarray of shape (n_features,)
    intercept_ : ndarray of shape (1,)
    n_features_in_, feature_names_in_, n_iter_, history_, store_
        As in :class:`SGDClassifier`.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.sklearn import SGDRegressor
    >>> X = np.random.default_rng(0).standard_normal((200, 2))
    >>> reg = SGDRegressor(learning_rate=0.3, batch_size=None, tol=None,
    ...                    max_iter=50, alpha=0.0).fit(X, X @ [2.0, -1.0])
    >>> np.round(reg.coef_, 2)
    array([ 2., -1.])
    """

    def __init__(
        self,
        *,
        loss: str = "squared_error",
        penalty: str | None = "l2",
        alpha: float = 1e-4,
        l1_ratio: float = 0.15,
        max_iter: int = 100,
        tol: float | None = 1e-3,
        n_iter_no_change: int = 5,
        learning_rate: float | Schedule = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        batch_size: int | None = 256,
        chunk_rows: int | str = "auto",
        store_dir: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        client: Any = None,
        random_state: Any = None,
        verbose: bool = False,
        standardize: bool = False,
    ) -> None:
        self.loss = loss
        self.penalty = penalty
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov
        self.batch_size = batch_size
        self.chunk_rows = chunk_rows
        self.store_dir = store_dir
        self.storage_options = storage_options
        self.client = client
        self.random_state = random_state
        self.verbose = verbose
        self.standardize = standardize

    def fit(self, X: Any, y: Any = None) -> SGDRegressor:
        """Train a new run for up to ``max_iter`` epochs.

        Returns
        -------
        self
        """
        self._fit(X, y, partial=False)
        return self

    def partial_fit(self, X: Any, y: Any = None) -> SGDRegressor:
        """One more epoch over ``X``, ``y``, continuing the current run.

        Returns
        -------
        self
        """
        self._fit(X, y, partial=True)
        return self

    def _plan(self, n_rows: int, n_classes: int | None) -> _Plan:
        _check_choice("loss", self.loss, ("squared_error",))
        l2, l1 = self._sgd_penalties()
        return self._sgd_plan(models.LinearRegression(l2=l2, l1=l1))

    def _set_learned(self, params: dict[str, np.ndarray]) -> None:
        self.coef_ = np.asarray(params["w"]).copy()
        self.intercept_ = np.asarray(params["b"]).reshape(1).copy()

    def _model_params(self) -> dict[str, np.ndarray]:
        return {"w": self.coef_, "b": np.asarray(self.intercept_[0])}


class MLPClassifier(_Classifier):
    """A multi-layer perceptron classifier (:class:`dasktrain.models.MLP`).

    Two classes use one logistic output, more a softmax output.  As in
    scikit-learn, the L2 penalty is ``alpha / 2 * sum ||W||^2`` divided by
    the rows of a batch (here fixed when the run starts: ``l2 = alpha /
    min(batch_size, n_rows)``); biases are not penalized.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(100,)
    activation : {"relu", "tanh"}, default="relu"
    solver : {"adam", "sgd"}, default="adam"
    alpha : float, default=1e-4
    batch_size : int or "auto", default="auto"
        Rows per step; ``"auto"``: ``min(200, n_rows)``.
    learning_rate_init : float or Schedule, default=1e-3
    max_iter : int, default=200
        Epochs of :meth:`fit`.
    tol : float or None, default=1e-4
    n_iter_no_change : int, default=10
        :meth:`fit` stops when the epoch's mean objective has not improved by
        more than ``tol`` for ``n_iter_no_change`` epochs.
    momentum : float, default=0.9
        For ``solver="sgd"``.
    nesterovs_momentum : bool, default=True
        For ``solver="sgd"``.
    chunk_rows, store_dir, storage_options, client, random_state, verbose, standardize
        As in :class:`LogisticRegression`.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coefs_ : list of ndarray
        Weight matrices, layer by layer, shape (fan_in, fan_out).
    intercepts_ : list of ndarray
    n_layers_ : int
    n_outputs_ : int
    out_activation_ : {"logistic", "softmax"}
    loss_ : float
        Mean training loss of the last epoch.
    loss_curve_ : list of float
        Mean training loss of each epoch.
    n_features_in_, feature_names_in_, n_iter_, history_, store_
        As in :class:`SGDClassifier`.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.preprocessing import StandardScaler
    >>> from dasktrain.sklearn import MLPClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> clf = MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.05,
    ...                     max_iter=40, tol=None, random_state=0)
    >>> clf.fit(X, y).score(X, y) > 0.9
    True
    >>> [w.shape for w in clf.coefs_]
    [(4, 16), (16, 3)]
    """

    def __init__(
        self,
        *,
        hidden_layer_sizes: Sequence[int] = (100,),
        activation: str = "relu",
        solver: str = "adam",
        alpha: float = 1e-4,
        batch_size: int | str = "auto",
        learning_rate_init: float | Schedule = 1e-3,
        max_iter: int = 200,
        tol: float | None = 1e-4,
        n_iter_no_change: int = 10,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        chunk_rows: int | str = "auto",
        store_dir: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        client: Any = None,
        random_state: Any = None,
        verbose: bool = False,
        standardize: bool = False,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.chunk_rows = chunk_rows
        self.store_dir = store_dir
        self.storage_options = storage_options
        self.client = client
        self.random_state = random_state
        self.verbose = verbose
        self.standardize = standardize

    def fit(self, X: Any, y: Any = None) -> MLPClassifier:
        """Train a new run for up to ``max_iter`` epochs.

        Returns
        -------
        self
        """
        self._fit(X, y, partial=False)
        return self

    def partial_fit(self, X: Any, y: Any = None, classes: Any = None) -> MLPClassifier:
        """One more epoch over ``X``, ``y``, continuing the current run.

        Parameters
        ----------
        X, y
            As in :meth:`fit`.
        classes : array-like, optional
            All the labels; required on the first call (unless after
            :meth:`fit`).

        Returns
        -------
        self
        """
        if classes is None and not hasattr(self, "classes_"):
            raise ValueError("classes must be passed on the first call to partial_fit")
        self._fit(X, y, partial=True, classes=classes)
        return self

    def _batch_rows(self, n_rows: int) -> int:
        if self.batch_size == "auto":
            return min(MLP_AUTO_BATCH_ROWS, n_rows)
        return min(_check_int("batch_size", self.batch_size, 1), n_rows)

    def _plan(self, n_rows: int, n_classes: int | None) -> _Plan:
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
            sizes = (int(sizes),)
        if isinstance(sizes, str) or not isinstance(sizes, Sequence) or not sizes:
            raise ValueError(
                f"hidden_layer_sizes must be a non-empty sequence of layer widths, "
                f"got {self.hidden_layer_sizes!r}"
            )
        hidden = tuple(_check_int("hidden_layer_sizes", s, 1) for s in sizes)
        _check_choice("activation", self.activation, _MLP_ACTIVATIONS)
        _check_choice("solver", self.solver, _MLP_SOLVERS)
        alpha = _check_number("alpha", self.alpha)
        batch_rows = self._batch_rows(n_rows)
        lr = _check_learning_rate("learning_rate_init", self.learning_rate_init)
        n_outputs = 1 if n_classes is None or n_classes == 2 else n_classes
        model = models.MLP(
            hidden,
            n_outputs,
            loss="logistic" if n_outputs == 1 else "softmax",
            activation=str(self.activation),
            l2=alpha / batch_rows,
        )
        optimizer: Optimizer
        if self.solver == "adam":
            optimizer = Adam(lr)
        else:
            optimizer = SGD(
                lr,
                momentum=self.momentum,
                nesterov=bool(self.nesterovs_momentum) and self.momentum > 0,
            )
        return _Plan(
            model,
            optimizer,
            _check_int("max_iter", self.max_iter, 1),
            batch_rows=batch_rows,
            tol=_check_tol(self.tol),
            patience=_check_int("n_iter_no_change", self.n_iter_no_change, 1),
        )

    def _set_learned(self, params: dict[str, np.ndarray]) -> None:
        n_layers = len(params) // 2
        self.coefs_ = [np.asarray(params[f"w{i}"]).copy() for i in range(n_layers)]
        self.intercepts_ = [np.asarray(params[f"b{i}"]).copy() for i in range(n_layers)]
        self.n_layers_ = n_layers + 1
        self.n_outputs_ = int(self.coefs_[-1].shape[1])
        self.out_activation_ = "logistic" if self.n_outputs_ == 1 else "softmax"

    def _finish(self, trainer: Trainer, store: str, data: _Input) -> None:
        super()._finish(trainer, store, data)
        sums: dict[int, list[float]] = {}
        for row in self.history_:
            acc = sums.setdefault(int(row["epoch"]), [0.0, 0.0])
            acc[0] += float(row["loss"]) * float(row["rows"])
            acc[1] += float(row["rows"])
        self.loss_curve_ = [s / n for _, (s, n) in sorted(sums.items()) if n > 0]
        self.loss_ = self.loss_curve_[-1] if self.loss_curve_ else float("nan")

    def _model_params(self) -> dict[str, np.ndarray]:
        params: dict[str, np.ndarray] = {}
        for i, (w, b) in enumerate(zip(self.coefs_, self.intercepts_, strict=True)):
            params[f"w{i}"], params[f"b{i}"] = w, b
        return params


# ---------------------------------------------------------------------------
# Conformance
# ---------------------------------------------------------------------------

#: scikit-learn checks expected to fail, by estimator class, with the reason.
_EXPECTED_FAILED_CHECKS: dict[str, dict[str, str]] = {}


def expected_failed_checks(estimator: BaseEstimator) -> dict[str, str]:
    """The scikit-learn estimator checks that ``estimator`` is expected to
    fail, with the reason: the ``expected_failed_checks`` argument of
    :func:`sklearn.utils.estimator_checks.parametrize_with_checks`.

    Examples
    --------
    >>> from dasktrain.sklearn import LinearRegression, expected_failed_checks
    >>> isinstance(expected_failed_checks(LinearRegression()), dict)
    True
    """
    return dict(_EXPECTED_FAILED_CHECKS.get(type(estimator).__name__, {}))
