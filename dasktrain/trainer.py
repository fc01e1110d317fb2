"""The training loop.

``Trainer.fit`` reads top to bottom in stages: open the parameter store (take
its write lock, load or initialize the run), then per step: plan the batch,
compute the reduced partial on the cluster (the one sync point of a step),
check it, update the parameters, log, commit when due, validate and stop at
epoch ends.  Everything that decides the numbers (the batch plan, the
reduction tree, the optimizer) is a pure function of the seed and the
committed state, so a resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dasktrain._tree import flatten, global_norm, unflatten
from dasktrain.callbacks import Callback, EarlyStopping, ProgressBar
from dasktrain.data import Dataset
from dasktrain.engine.cache import DEFAULT_CACHE_FRACTION, worker_cache
from dasktrain.engine.cluster import ClientHandle, get_client
from dasktrain.engine.engine import Engine, PassResult
from dasktrain.engine.plan import Piece, epoch_steps, full_pass, local_sgd_rounds
from dasktrain.engine.second_order import (
    SecondOrderEngine,
    local_value,
    point_value,
)
from dasktrain.engine.sharded import (
    ShardedEngine,
    ShardedPassResult,
    StepHandle,
    predict_sparse_chunk,
    table_layouts,
)
from dasktrain.engine.tasks import (
    LOCAL_GRAD_NORM_SUM,
    LOCAL_OBJECTIVE_SUM,
    NONFINITE_POLICIES,
    load_chunk,
    local_average,
)
from dasktrain.errors import (
    ConfigMismatchError,
    DataValidationError,
    DivergenceError,
    StoreError,
)
from dasktrain.history import History
from dasktrain.models.base import Model, model_from_config
from dasktrain.models.glm import penalty_vectors, supports_second_order
from dasktrain.models.sparse import SparseModel
from dasktrain.optim import (
    LBFGS,
    Optimizer,
    advance_counts,
    apply_updates,
    is_count,
    optimizer_from_config,
)
from dasktrain.optim.lbfgs import OrthantSearch, WolfeLineSearch, pseudo_gradient
from dasktrain.optim.newton import Newton, NewtonRun, PointValue
from dasktrain.params import ParamStore
from dasktrain.params.tables import (
    PARAM,
    ParamStoreRef,
    TableLayout,
    open_table_array,
    read_rows,
)
from dasktrain.partial import Partial, RowSparse
from dasktrain.schema import Schema

logger = logging.getLogger(__name__)

__all__ = ["Trainer"]

#: Topic of the events the trainer logs to the Dask scheduler (one per step).
EVENT_TOPIC = "dasktrain"
STORE_FORMAT_META_KEYS = ("model", "optimizer", "seed", "schema", "progress")
#: With ``sharded=None``, tables of a SparseModel larger than this in total
#: are kept in row shards of the store; smaller ones are dense parameters.
DENSE_TABLE_LIMIT_BYTES = 64 << 20


@dataclass
class _Run:
    """The state a committed version captures."""

    params: dict[str, np.ndarray]
    opt_state: dict[str, np.ndarray]
    step: int = 0  # optimizer steps done in the whole run
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # steps done in the current, incomplete epoch
    batch_rows: int | None = None
    local_steps: int | None = None  # local SGD: local steps per round
    status: str = "new"
    history: History = field(default_factory=History)
    callbacks: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    #: sharded tables (empty: every parameter is dense, in ``params``)
    tables: list[TableLayout] = field(default_factory=list)
    #: the version whose tables hold this run's current values
    table_step: int | None = None


class Trainer:
    """Trains a model on a :class:`~dasktrain.Dataset` with a Dask cluster,
    keeping parameters, optimizer state and history in a parameter store.

    Parameters
    ----------
    model:
        A model from :mod:`dasktrain.models`.
    optimizer:
        An optimizer from :mod:`dasktrain.optim`.
    store:
        Path of the parameter store (a Zarr group; created on first fit).  If it
        already holds a run of the same model and optimizer, ``fit`` continues
        that run.
    client:
        A :class:`distributed.Client`, a scheduler address, or ``None``: the
        current client if there is one, else an embedded ``LocalCluster``
        started for this trainer and closed by :meth:`close`.
    seed:
        Seeds parameter initialization and minibatch order.
    keep_versions:
        Committed versions kept in the store (older ones are deleted).
    cache_fraction:
        Fraction of each worker's memory limit used to keep decoded chunks.
    storage_options:
        fsspec options of a parameter store on an object store (credentials,
        endpoint...), used by the client and sent to the workers that read
        and write sharded tables; ignored for local paths.  Without them, the
        filesystem configures itself from the environment.

    Examples
    --------
    >>> import numpy as np, dasktrain as dt
    >>> X = np.random.default_rng(0).normal(size=(1000, 5)).astype("float32")
    >>> ds = dt.Dataset.from_arrays("/tmp/doc-train.zarr", X=X, y=(X[:, 0] > 0),
    ...                             chunk_rows=250, overwrite=True)
    >>> with dt.Trainer(dt.models.LogisticRegression(l2=1e-3), dt.optim.Adam(0.1),
    ...                 store="/tmp/doc-run.zarr") as trainer:  # doctest: +SKIP
    ...     history = trainer.fit(ds, epochs=20)
    ...     trainer.evaluate(ds)["accuracy"] > 0.9
    True
    """

    def __init__(
        self,
        model: Model,
        optimizer: Optimizer,
        *,
        store: str | os.PathLike[str],
        client: Any = None,
        seed: int = 0,
        keep_versions: int = 3,
        cache_fraction: float = DEFAULT_CACHE_FRACTION,
        sharded: bool | None = None,
        shard_rows: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, Model):
            raise TypeError(
                f"model must be a dasktrain model, got {type(model).__name__}"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a dasktrain optimizer, "
                f"got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, Newton) and not supports_second_order(model):
            raise ValueError(
                f"Newton needs a linear model or GLM with a Hessian "
                f"(LinearRegression, LogisticRegression, SoftmaxRegression, "
                f"PoissonRegression, GammaRegression), not {type(model).__name__}; "
                f"use LBFGS or a first-order optimizer"
            )
        if (
            isinstance(keep_versions, bool)
            or not isinstance(keep_versions, int | np.integer)
            or keep_versions < 1
        ):
            raise ValueError(
                f"keep_versions must be an integer >= 1, got {keep_versions!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if (
            isinstance(cache_fraction, bool)
            or not isinstance(cache_fraction, int | float | np.integer | np.floating)
            or not 0.0 <= cache_fraction < 1.0
        ):
            raise ValueError(
                f"cache_fraction must be a number in [0, 1), got {cache_fraction!r}"
            )
        if sharded is not None and not isinstance(sharded, bool):
            raise TypeError(f"sharded must be True, False or None, got {sharded!r}")
        if sharded and not isinstance(model, SparseModel):
            raise ValueError(
                f"sharded=True needs a model with tables (MatrixFactorization, "
                f"SparseLogisticRegression), not {type(model).__name__}"
            )
        if shard_rows is not None and (
            not isinstance(shard_rows, int | np.integer)
            or isinstance(shard_rows, bool)
            or shard_rows < 1
        ):
            raise ValueError(
                f"shard_rows must be a positive integer, got {shard_rows!r}"
            )
        if isinstance(model, SparseModel) and sharded is None:
            total = sum(t.nbytes for t in model.tables().values())
            sharded = total > DENSE_TABLE_LIMIT_BYTES
        self.sharded = bool(sharded)
        self.shard_rows = None if shard_rows is None else int(shard_rows)
        self.model = model
        self.optimizer = optimizer
        self.store_path = os.fspath(store)
        # The store as the workers reach it (URL and storage options).
        self._store_ref = ParamStoreRef.from_user(store, storage_options)
        self.seed = int(seed)
        self.keep_versions = keep_versions
        self.stop_training = False
        self._run: _Run | None = None
        self._schema: Schema | None = None
        if self._store_exists():
            self._check_store_matches(self._open_store())
        self._handle: ClientHandle = get_client(client)
        self._engine = Engine(self._handle.client, cache_fraction=cache_fraction)
        self._sharded_engine = ShardedEngine(self._engine)

    # -- construction from a store ---------------------------------------------
    @classmethod
    def resume(
        cls,
        store: str | os.PathLike[str],
        *,
        client: Any = None,
        cache_fraction: float = DEFAULT_CACHE_FRACTION,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Trainer:
        """A trainer for the run in ``store``, continuing from its last
        committed version (model, optimizer and seed come from the store;
        ``storage_options`` as in :class:`Trainer`)."""
        ps = ParamStore.open(os.fspath(store), storage_options=storage_options)
        meta = ps.meta
        try:
            model = model_from_config(meta["model"])
            optimizer = optimizer_from_config(meta["optimizer"])
            seed = int(meta["seed"])
            sharded = bool(ps.table_layouts())
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"parameter store {os.fspath(store)!r} does not describe a run: {exc}"
            ) from exc
        return cls(
            model,
            optimizer,
            store=store,
            client=client,
            seed=seed,
            keep_versions=ps.keep_versions,
            cache_fraction=cache_fraction,
            sharded=sharded,
            storage_options=storage_options,
        )

    def _store_exists(self) -> bool:
        return ParamStore.exists(
            self.store_path, storage_options=self._store_ref.storage_options
        )

    def _open_store(self) -> ParamStore:
        return ParamStore.open(
            self.store_path, storage_options=self._store_ref.storage_options
        )

    def _check_store_matches(self, ps: ParamStore) -> None:
        meta = ps.meta
        if "model" not in meta:
            return
        if meta["model"] != self.model.config():
            raise ConfigMismatchError(
                f"parameter store {self.store_path!r} holds a run of {meta['model']}, "
                f"not {self.model.config()}; use another store, or Trainer.resume() "
                f"to continue that run"
            )
        if meta.get("optimizer") != self.optimizer.config():
            raise ConfigMismatchError(
                f"parameter store {self.store_path!r} was trained with optimizer "
                f"{meta.get('optimizer')}, not {self.optimizer.config()}; "
                f"its optimizer state cannot be reused"
            )
        if int(meta.get("seed", self.seed)) != self.seed:
            raise ConfigMismatchError(
                f"parameter store {self.store_path!r} was trained with seed "
                f"{meta.get('seed')}, not {self.seed}"
            )

    # -- public properties -----------------------------------------------------
    @property
    def client(self) -> Any:
        return self._handle.client

    @property
    def dashboard_link(self) -> str | None:
        try:
            return str(self._handle.client.dashboard_link)
        except Exception:
            return None

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Current parameters (name -> numpy array): the last step of this
        session, or else the store's committed version."""
        run = self._current_run()
        out: dict[str, Any] = {k: v.copy() for k, v in run.params.items()}
        if run.tables:
            assert run.table_step is not None
            for layout in run.tables:
                out[layout.name] = open_table_array(
                    self._store_ref, run.table_step, layout.name, PARAM
                )
        return out

    @property
    def history(self) -> History:
        return self._current_run().history

    @property
    def step(self) -> int:
        return self._current_run().step

    @property
    def epoch(self) -> int:
        return self._current_run().epoch

    def _current_run(self) -> _Run:
        if self._run is None:
            if not self._store_exists():
                raise RuntimeError(
                    f"no parameters yet: the store {self.store_path!r} does not exist; "
                    f"call fit() first"
                )
            ps = self._open_store()
            if ps.committed is None:
                raise RuntimeError(
                    f"store {self.store_path!r} has no committed version"
                )
            self._run = self._load(ps)
        return self._run

    # -- loading and committing -----------------------------------------------
    def _load(self, ps: ParamStore) -> _Run:
        version = ps.read()
        meta = ps.meta
        prog = meta.get("progress", {})
        tables = list(ps.table_layouts(version.step).values())
        self._schema = Schema.from_json(meta["schema"]) if "schema" in meta else None
        return _Run(
            params={k: np.asarray(v) for k, v in version.params.items()},
            opt_state={k: np.asarray(v) for k, v in version.opt_state.items()},
            step=int(prog.get("step", version.step)),
            epoch=int(prog.get("epoch", 0)),
            epoch_step=int(prog.get("epoch_step", 0)),
            batch_rows=prog.get("batch_rows"),
            local_steps=prog.get("local_steps"),
            status=str(meta.get("status", "running")),
            history=History(meta.get("history", [])),
            callbacks=dict(meta.get("callbacks", {})),
            dataset=dict(meta.get("dataset", {})),
            tables=tables,
            table_step=version.step if tables else None,
        )

    def _meta(self, run: _Run) -> dict[str, Any]:
        assert self._schema is not None
        return {
            "model": self.model.config(),
            "optimizer": self.optimizer.config(),
            "seed": self.seed,
            "schema": self._schema.to_json(),
            "progress": {
                "step": run.step,
                "epoch": run.epoch,
                "epoch_step": run.epoch_step,
                "batch_rows": run.batch_rows,
                "local_steps": run.local_steps,
            },
            "status": run.status,
            "dataset": run.dataset,
            "history": run.history.rows,
            "callbacks": run.callbacks,
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
        }

    def _commit(
        self, ps: ParamStore, run: _Run, *, protect: set[int] | None = None
    ) -> None:
        if run.tables:
            # The version of this step holds the tables already (see
            # _fit_sharded); add the dense arrays and make it the committed one.
            assert run.table_step == run.step
            ps.commit(
                run.step,
                run.params,
                run.opt_state,
                self._meta(run),
                prepared=True,
                protect=protect or set(),
            )
        else:
            ps.commit(run.step, run.params, run.opt_state, self._meta(run))
        logger.debug("committed step %d to %s", run.step, self.store_path)

    def _open_for_fit(self, data: Dataset) -> ParamStore:
        """Create or open the store for writing; the caller holds its lock."""
        if self._store_exists():
            ps = self._open_store()
            self._check_store_matches(ps)
            return ps
        return ParamStore.create(
            self.store_path,
            keep_versions=self.keep_versions,
            meta={},
            storage_options=self._store_ref.storage_options,
        )

    def _start_run(self, ps: ParamStore, data: Dataset) -> _Run:
        if ps.committed is not None:
            run = self._load(ps)
            assert self._schema is not None
            if bool(run.tables) != self.sharded:
                raise ConfigMismatchError(
                    f"parameter store {self.store_path!r} keeps the model's tables "
                    f"{'sharded' if run.tables else 'dense'}; create the Trainer with "
                    f"sharded={bool(run.tables)} (or use Trainer.resume)"
                )
            if self._schema.n_features != data.schema.n_features:
                raise ConfigMismatchError(
                    f"parameter store {self.store_path!r} holds a model for "
                    f"{self._schema.n_features} features, but dataset {data.path!r} "
                    f"has {data.schema.n_features}"
                )
            for name, info in self._schema.fields.items():
                found = data.schema.fields.get(name)
                if found is None or found.shape != info.shape:
                    raise ConfigMismatchError(
                        f"parameter store {self.store_path!r} was trained on field "
                        f"{name!r} with row shape {info.shape}, dataset {data.path!r} "
                        f"has {None if found is None else found.shape}"
                    )
            return run
        # A fresh run: initialize parameters and commit them as step 0.
        self._schema = data.schema
        rng = np.random.default_rng([self.seed, 0xD7])
        if self.sharded:
            return self._start_sharded_run(ps, data, rng)
        params = {
            k: np.asarray(v, dtype=np.float64)
            for k, v in self.model.init(rng, data.schema).items()
        }
        run = _Run(
            params=params, opt_state=self.optimizer.init(params), status="running"
        )
        run.dataset = _dataset_meta(data)
        self._commit(ps, run)
        return run

    # -- the training loop -----------------------------------------------------
    def fit(
        self,
        data: Dataset,
        *,
        epochs: int,
        batch_rows: int | None = None,
        validation: Dataset | None = None,
        callbacks: Sequence[Callback] = (),
        early_stopping: EarlyStopping | None = None,
        checkpoint_every: int | None = None,
        checkpoint_seconds: float = 60.0,
        on_nonfinite: str = "raise",
        progress: bool = True,
        local_steps: int | None = None,
        staleness: int = 0,
    ) -> History:
        """Train until the run has completed ``epochs`` epochs in total.

        Parameters
        ----------
        data:
            Training :class:`~dasktrain.Dataset` (a store or a view of one).
        epochs:
            Total epochs of the run, counting those already in the store: the
            same call after a crash finishes the same run.  With
            :class:`~dasktrain.optim.LBFGS`, an epoch is one iteration.
        batch_rows:
            Rows per step; ``None`` for full-batch steps.  Minibatches are whole
            shuffled chunks when ``batch_rows >= chunk_rows``, else shuffled
            slices of one chunk (see :func:`dasktrain.engine.plan.epoch_steps`).
        validation:
            Evaluated at each epoch end; adds ``val_*`` columns to the history.
        callbacks:
            :class:`~dasktrain.callbacks.Callback` objects.
        early_stopping:
            An :class:`~dasktrain.callbacks.EarlyStopping` (state kept in the store).
        checkpoint_every, checkpoint_seconds:
            Commit a version every this many steps, and whenever this many
            seconds passed since the last commit; always at the end of the fit.
        on_nonfinite:
            ``"raise"`` (default): NaN/inf in a data chunk stops the fit with an
            error naming the chunk and row; ``"skip"``: such rows are dropped.
        progress:
            Show a progress bar.
        local_steps:
            Local SGD (model averaging): ``None`` (default) for synchronous
            steps.  An integer ``K`` makes each step a *round*: every chunk of
            ``data`` starts from the current parameters and optimizer state,
            runs ``K`` minibatch steps of ``batch_rows`` rows (required) over
            its own shuffled rows, on the worker that caches it; the chunks'
            parameters and float optimizer state are then averaged, weighted
            by the rows each trained on, through the fixed reduction tree
            (same bits on any cluster).  Step counters (hence learning-rate
            schedules) advance by the round's local steps.  An epoch visits
            every row once: ``ceil(minibatches per chunk / K)`` rounds, so a
            ``K`` of at least ``ceil(chunk_rows / batch_rows)`` makes one
            round per epoch.  A history row is a round; its ``loss``,
            ``objective`` and ``grad_norm`` are means over the round's local
            steps (each measured before its step).  Not for
            :class:`~dasktrain.optim.LBFGS` or sparse models.
        staleness:
            Models with sharded tables only: ``0`` (default) runs synchronous
            steps.  ``k > 0`` pipelines steps: step ``s`` computes its
            gradients with the parameters after step ``s - 1 - k`` while the
            workers still apply steps ``s - k .. s - 1``, overlapping
            computation and table updates.  Updates are applied in order,
            and which parameters a step reads depends on ``k`` only, so
            results remain reproducible for a given ``k`` (but differ from
            ``k = 0``).  Each epoch's last steps drain the pipeline.

        Returns
        -------
        History
            All steps of the run (including earlier sessions').
        """
        self._check_fit_args(data, epochs, batch_rows, validation, checkpoint_every)
        _check_fit_options(checkpoint_seconds, callbacks, early_stopping, progress)
        self._check_local_steps(local_steps, batch_rows)
        if (
            not isinstance(staleness, int | np.integer)
            or isinstance(staleness, bool)
            or staleness < 0
        ):
            raise ValueError(f"staleness must be an integer >= 0, got {staleness!r}")
        if staleness and not self.sharded:
            raise ValueError(
                "staleness applies to models with sharded tables (sharded=True)"
            )
        _check_nonfinite_policy(on_nonfinite)
        self.model.check_schema(data.schema)
        if validation is not None:
            self.model.check_schema(validation.schema)
            self._check_validation_fields(data, validation)
        all_callbacks: list[Callback] = list(callbacks)
        if early_stopping is not None:
            all_callbacks.append(early_stopping)

        created = not self._store_exists()
        if created:
            self._run = None
        ps = self._open_for_fit(data)
        with ps.lock(owner=f"Trainer.fit pid {os.getpid()}"):
            try:
                return self._fit_locked(
                    ps,
                    data,
                    epochs,
                    batch_rows,
                    validation,
                    all_callbacks,
                    checkpoint_every,
                    checkpoint_seconds,
                    on_nonfinite,
                    progress,
                    local_steps,
                    staleness=int(staleness),
                )
            except BaseException:
                if created and (self._run is None or self._run.step == 0):
                    # The store is this call's and holds no step: the failure
                    # (bad labels, NaN in the first chunks, Ctrl-C...) came
                    # before any progress, so leave nothing behind.
                    self._discard_new_store(ps)
                raise
            finally:
                if created and not self._store_exists():
                    self._run = None

    def _discard_new_store(self, ps: ParamStore) -> None:
        """Delete a store created by the failing fit (the caller holds its
        lock, which goes last; local path or URL alike)."""
        with contextlib.suppress(StoreError):
            ps.remove()
        ps.release()
        logger.info("removed %s: the fit that created it failed", self.store_path)

    def _fit_locked(
        self,
        ps: ParamStore,
        data: Dataset,
        epochs: int,
        batch_rows: int | None,
        validation: Dataset | None,
        all_callbacks: list[Callback],
        checkpoint_every: int | None,
        checkpoint_seconds: float,
        on_nonfinite: str,
        progress: bool,
        local_steps: int | None = None,
        *,
        staleness: int = 0,
    ) -> History:
        """The body of :meth:`fit`, run while holding the store's lock."""
        ps.cleanup()
        run = self._start_run(ps, data)
        self._run = run
        self._check_resumable(run, data, batch_rows)
        if run.epoch_step != 0 and run.local_steps != local_steps:
            raise ConfigMismatchError(
                f"parameter store {self.store_path!r} stopped in the middle of epoch "
                f"{run.epoch + 1} with local_steps={run.local_steps}; continue it "
                f"with the same local_steps (the rounds of an epoch depend on it)"
            )
        for cb in all_callbacks:
            saved = run.callbacks.get(type(cb).__name__)
            if saved is not None:
                cb.load_state_dict(saved)
        if run.epoch < epochs and run.status in ("converged", "stopped"):
            # Re-running a script must not extend a run that ended on its own
            # (early stopping, a callback, convergence): say so loudly.
            logger.warning(
                "store %s holds a run that ended as %r at epoch %d; fit(epochs=%d) "
                "does not continue it (train further in a new store)",
                self.store_path,
                run.status,
                run.epoch,
                epochs,
            )
            return run.history
        if run.epoch >= epochs:
            logger.info(
                "store %s already has %d epochs (status %s); nothing to do",
                self.store_path,
                run.epoch,
                run.status,
            )
            return run.history
        run.batch_rows = batch_rows
        run.local_steps = None if local_steps is None else int(local_steps)
        run.dataset = _dataset_meta(data)
        # A finished run continued to more epochs is running again (its status
        # decides when versions are committed).
        run.status = "running"
        if progress:
            steps_per_epoch = (
                self._steps_per_epoch(data, batch_rows)
                if local_steps is None or batch_rows is None
                else len(self._local_rounds(data, batch_rows, local_steps, 0))
            )
            all_callbacks.insert(
                0,
                ProgressBar(
                    total_steps=steps_per_epoch * epochs,
                    initial=min(run.step, steps_per_epoch * epochs),
                ),
            )
        self.stop_training = False
        for cb in all_callbacks:
            cb.on_fit_begin(self)
        try:
            if run.tables:
                self._fit_sharded(
                    ps,
                    run,
                    data,
                    epochs,
                    batch_rows,
                    validation,
                    all_callbacks,
                    checkpoint_every,
                    checkpoint_seconds,
                    on_nonfinite,
                    staleness,
                )
            elif local_steps is not None:
                assert batch_rows is not None
                self._fit_local(
                    ps,
                    run,
                    data,
                    epochs,
                    batch_rows,
                    local_steps,
                    validation,
                    all_callbacks,
                    checkpoint_every,
                    checkpoint_seconds,
                    on_nonfinite,
                )
            elif isinstance(self.optimizer, Newton):
                self._fit_newton(
                    ps,
                    run,
                    data,
                    epochs,
                    validation,
                    all_callbacks,
                    checkpoint_every,
                    checkpoint_seconds,
                    on_nonfinite,
                )
            elif isinstance(self.optimizer, LBFGS):
                self._fit_lbfgs(
                    ps,
                    run,
                    data,
                    epochs,
                    validation,
                    all_callbacks,
                    checkpoint_every,
                    checkpoint_seconds,
                    on_nonfinite,
                )
            else:
                self._fit_steps(
                    ps,
                    run,
                    data,
                    epochs,
                    batch_rows,
                    validation,
                    all_callbacks,
                    checkpoint_every,
                    checkpoint_seconds,
                    on_nonfinite,
                )
        finally:
            for cb in all_callbacks:
                cb.on_fit_end(self, run.history)
        return run.history

    def _check_fit_args(
        self,
        data: Any,
        epochs: Any,
        batch_rows: Any,
        validation: Any,
        checkpoint_every: Any,
    ) -> None:
        if not isinstance(data, Dataset):
            raise TypeError(
                f"fit() needs a dasktrain.Dataset, got {type(data).__name__}; "
                f"write arrays with Dataset.from_arrays() first"
            )
        if validation is not None and not isinstance(validation, Dataset):
            raise TypeError(
                f"validation must be a Dataset, got {type(validation).__name__}"
            )
        if (
            not isinstance(epochs, int | np.integer)
            or isinstance(epochs, bool)
            or epochs < 0
        ):
            raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
        if batch_rows is not None and (
            not isinstance(batch_rows, int | np.integer)
            or isinstance(batch_rows, bool)
            or batch_rows < 1
        ):
            raise ValueError(
                f"batch_rows must be a positive integer or None, got {batch_rows!r}"
            )
        if batch_rows is not None and self.optimizer.full_batch_only:
            raise ValueError(
                f"{type(self.optimizer).__name__} needs full-batch training: "
                f"use batch_rows=None"
            )
        if checkpoint_every is not None and (
            not isinstance(checkpoint_every, int | np.integer) or checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every must be a positive integer, got {checkpoint_every!r}"
            )

    def _check_validation_fields(self, data: Dataset, validation: Dataset) -> None:
        for name in self.model.fields:
            ours = data.schema.fields.get(name)
            theirs = validation.schema.fields.get(name)
            if ours is not None and theirs is not None and ours.shape != theirs.shape:
                raise DataValidationError(
                    f"validation dataset {validation.path!r} has field {name!r} with "
                    f"row shape {theirs.shape}, training dataset {data.path!r} has "
                    f"{ours.shape}"
                )

    def _check_resumable(
        self, run: _Run, data: Dataset, batch_rows: int | None
    ) -> None:
        if run.epoch_step == 0:
            return
        if run.batch_rows != batch_rows:
            raise ConfigMismatchError(
                f"parameter store {self.store_path!r} stopped in the middle of epoch "
                f"{run.epoch + 1} with batch_rows={run.batch_rows}; continue it with "
                f"the same batch_rows (the batch plan of an epoch depends on it)"
            )
        if run.dataset.get("uuid") != data.uuid or list(
            run.dataset.get("chunk_ids", [])
        ) != list(data.chunk_ids):
            raise ConfigMismatchError(
                f"parameter store {self.store_path!r} stopped in the middle of epoch "
                f"{run.epoch + 1} on dataset {run.dataset.get('url')!r}; continue it "
                f"on the same dataset (and split) to finish that epoch"
            )

    def _steps_per_epoch(self, data: Dataset, batch_rows: int | None) -> int:
        if batch_rows is None:
            return 1
        return len(
            epoch_steps(
                data.chunk_ids,
                data.chunk_n_rows,
                batch_rows=batch_rows,
                seed=0,
                epoch=0,
            )
        )

    def _pass(
        self,
        data: Dataset,
        params: Mapping[str, np.ndarray],
        pieces: Any,
        *,
        with_grads: bool,
        nonfinite: str,
    ) -> PassResult:
        return self._engine.run_pass(
            data.ref,
            self.model,
            params,
            pieces,
            placement_chunks=data.chunk_ids,
            with_grads=with_grads,
            nonfinite=nonfinite,
        )

    def _objective(
        self, partial: Partial, params: Mapping[str, np.ndarray], step: int
    ) -> tuple[float, float, dict[str, np.ndarray]]:
        """Mean data loss, objective and objective gradient; raises
        :class:`DivergenceError` on non-finite values."""
        n = partial.n_rows
        if n == 0:
            raise DivergenceError(f"step {step}: the batch has no rows (all skipped?)")
        # Non-finite values are checked below (no floating-point warnings).
        with np.errstate(over="ignore", invalid="ignore"):
            loss = partial.loss_sum / n
            objective = loss + self.model.penalty(dict(params))
            if isinstance(self.model, SparseModel):
                # The per-occurrence penalty of sparse models is a batch sum.
                objective += partial.metrics.get("penalty", 0.0) / n
            pgrad = self.model.penalty_grad(dict(params))
            grads = {
                k: (
                    g.to_dense()
                    if isinstance(g, RowSparse)
                    else np.asarray(g, np.float64)
                )
                / n
                + pgrad[k]
                for k, g in partial.grads.items()
            }
        bad = [k for k, g in grads.items() if not np.all(np.isfinite(g))]
        if not math.isfinite(objective) or bad:
            what = (
                f"loss is {objective}"
                if not math.isfinite(objective)
                else f"gradient of {bad} is not finite"
            )
            raise DivergenceError(
                f"step {step}: {what}; the store {self.store_path!r} keeps the last "
                f"good version. Lower the learning rate or add gradient clipping."
            )
        return loss, objective, grads

    def _log_row(self, row: dict[str, Any], callbacks: Sequence[Callback]) -> None:
        """Report a step already appended to the history: a dashboard event,
        then the callbacks' ``on_step_end``."""
        try:
            # One small message to the scheduler's event log per step (~1 ms):
            # feeds the dashboard page.
            self._handle.client.log_event(
                EVENT_TOPIC, {"store": self.store_path, **row}
            )
        except Exception:
            logger.debug("could not log a dashboard event", exc_info=True)
        for cb in callbacks:
            cb.on_step_end(self, row)

    def _validate(
        self,
        row: dict[str, Any],
        params: Mapping[str, np.ndarray],
        validation: Dataset | None,
        on_nonfinite: str,
    ) -> None:
        """Add ``val_*`` metrics of ``params`` on ``validation`` to ``row``."""
        if validation is None:
            return
        res = self._pass(
            validation,
            params,
            full_pass(validation.chunk_ids, validation.chunk_n_rows),
            with_grads=False,
            nonfinite=on_nonfinite,
        )
        for k, v in self.model.summarize(res.partial).items():
            row[f"val_{k}"] = v

    def _epoch_callbacks(
        self, run: _Run, row: dict[str, Any], callbacks: Sequence[Callback]
    ) -> None:
        try:
            for cb in callbacks:
                cb.on_epoch_end(self, row)
        finally:
            # Saved with the next commit, even if a callback raised.
            run.callbacks = {
                type(cb).__name__: cb.state_dict()
                for cb in callbacks
                if cb.state_dict()
            }

    def _fit_steps(
        self,
        ps: ParamStore,
        run: _Run,
        data: Dataset,
        epochs: int,
        batch_rows: int | None,
        validation: Dataset | None,
        callbacks: Sequence[Callback],
        checkpoint_every: int | None,
        checkpoint_seconds: float,
        on_nonfinite: str,
    ) -> None:
        last_commit = time.monotonic()
        committed_step = run.step
        try:
            while run.epoch < epochs and not self.stop_training:
                # Plan: the epoch's batches are a pure function of (seed, epoch).
                plan = epoch_steps(
                    data.chunk_ids,
                    data.chunk_n_rows,
                    batch_rows=batch_rows,
                    seed=self.seed,
                    epoch=run.epoch,
                )
                for pieces in plan[run.epoch_step :]:
                    if self.stop_training:
                        break
                    t0 = time.perf_counter()
                    # Gradients: one pass over the batch on the cluster (sync point).
                    res = self._pass(
                        data,
                        run.params,
                        pieces,
                        with_grads=True,
                        nonfinite=on_nonfinite,
                    )
                    loss, objective, grads = self._objective(
                        res.partial, run.params, run.step + 1
                    )
                    grad_norm = global_norm(grads)
                    # Update: optimizer on the client (parameters are small here).
                    with np.errstate(over="ignore", invalid="ignore"):
                        updates, opt_state = self.optimizer.update(
                            grads, run.opt_state, run.params
                        )
                        params = apply_updates(run.params, updates)
                    if not all(np.all(np.isfinite(v)) for v in params.values()):
                        raise DivergenceError(
                            f"step {run.step + 1}: the update made parameters "
                            f"non-finite; the store {self.store_path!r} keeps the last "
                            f"good version. Lower the learning rate or add gradient "
                            f"clipping."
                        )
                    row = self._step_row(
                        run,
                        res,
                        loss=loss,
                        objective=objective,
                        grad_norm=grad_norm,
                        learning_rate=self.optimizer.learning_rate_at(run.step),
                        seconds=time.perf_counter() - t0,
                    )
                    if self._close_step(
                        ps,
                        run,
                        row,
                        params,
                        opt_state,
                        end_of_epoch=run.epoch_step + 1 == len(plan),
                        epochs=epochs,
                        validation=validation,
                        on_nonfinite=on_nonfinite,
                        callbacks=callbacks,
                        checkpoint_every=checkpoint_every,
                        checkpoint_seconds=checkpoint_seconds,
                        last_commit=last_commit,
                    ):
                        committed_step, last_commit = run.step, time.monotonic()
        finally:
            # On an error or Ctrl-C, keep the steps computed since the last
            # commit: ``run`` only ever holds checked, finite states.
            if run.step > committed_step:
                self._commit(ps, run)

    def _step_row(
        self,
        run: _Run,
        res: PassResult | ShardedPassResult,
        *,
        loss: float,
        objective: float,
        grad_norm: float,
        learning_rate: float,
        seconds: float,
        **extra: Any,
    ) -> dict[str, Any]:
        """The history row of the step that follows ``run``'s last one."""
        n = res.partial.n_rows
        return {
            "step": run.step + 1,
            "epoch": run.epoch + 1,
            "loss": loss,
            "objective": objective,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "rows": n,
            "rows_per_s": n / seconds if seconds > 0 else math.nan,
            "seconds": seconds,
            **{k: v for k, v in extra.items() if k == "local_steps"},
            **{
                f"train_{k}": v
                for k, v in self.model.summarize(res.partial).items()
                if k != "loss"
            },
            "cache_hit_rate": _hit_rate(res),
            **{k: v for k, v in extra.items() if k != "local_steps"},
        }

    def _close_step(
        self,
        ps: ParamStore,
        run: _Run,
        row: dict[str, Any],
        params: dict[str, np.ndarray],
        opt_state: dict[str, np.ndarray],
        *,
        end_of_epoch: bool,
        epochs: int,
        validation: Dataset | None,
        on_nonfinite: str,
        callbacks: Sequence[Callback],
        checkpoint_every: int | None,
        checkpoint_seconds: float,
        last_commit: float,
    ) -> bool:
        """End a checked step (or round) of a dense model: validate at an
        epoch's end, move the run on, and commit when due.  Returns whether
        it committed."""
        if end_of_epoch:
            # Validate before the run moves on: if this fails, the run (and
            # what the store gets) stays at the last step.
            self._validate(row, params, validation, on_nonfinite)
        self._advance(run, row, params, opt_state, end_of_epoch, epochs, callbacks)
        # Checkpoint: a new version, then one metadata write; always at the
        # end of the fit.
        if self._commit_due(run, checkpoint_every, checkpoint_seconds, last_commit):
            self._commit(ps, run)
            return True
        return False

    def _advance(
        self,
        run: _Run,
        row: dict[str, Any],
        params: dict[str, np.ndarray],
        opt_state: dict[str, np.ndarray],
        end_of_epoch: bool,
        epochs: int,
        callbacks: Sequence[Callback],
    ) -> None:
        """Move the run on by one step.  It gets its history row even if a
        callback raises (a consistent run to commit)."""
        run.params, run.opt_state = params, opt_state
        run.step += 1
        run.epoch_step += 1
        if end_of_epoch:
            run.epoch += 1
            run.epoch_step = 0
        try:
            if end_of_epoch:
                self._epoch_callbacks(run, row, callbacks)
        finally:
            run.history.append(row)
        self._log_row(row, callbacks)
        if run.epoch >= epochs:
            run.status = "finished"
        elif self.stop_training:
            run.status = "stopped"

    @staticmethod
    def _commit_due(
        run: _Run,
        checkpoint_every: int | None,
        checkpoint_seconds: float,
        last_commit: float,
        in_flight: bool = False,
    ) -> bool:
        """A checkpoint is due: every ``checkpoint_every`` steps, after
        ``checkpoint_seconds``, and when the run ends (once no step is in
        flight)."""
        return (
            (run.status != "running" and not in_flight)
            or (checkpoint_every is not None and run.step % checkpoint_every == 0)
            or time.monotonic() - last_commit >= checkpoint_seconds
        )

    def _check_local_steps(self, local_steps: Any, batch_rows: Any) -> None:
        if local_steps is None:
            return
        if (
            not isinstance(local_steps, int | np.integer)
            or isinstance(local_steps, bool)
            or local_steps < 1
        ):
            raise ValueError(
                f"local_steps must be a positive integer or None, got {local_steps!r}"
            )
        if batch_rows is None:
            raise ValueError(
                "local_steps needs batch_rows: the rows of each local minibatch step"
            )
        if self.optimizer.full_batch_only:
            raise ValueError(
                f"{type(self.optimizer).__name__} needs full-batch training; local "
                f"SGD (local_steps) runs minibatch steps: use SGD, Adam, AdamW or "
                f"Adagrad"
            )
        if self.sharded or isinstance(self.model, SparseModel):
            raise ValueError(
                f"local_steps (model averaging) is not supported for "
                f"{type(self.model).__name__}: averaging embedding tables dilutes "
                f"the updates of rows few chunks touch; use local_steps=None"
            )

    def _local_rounds(
        self, data: Dataset, batch_rows: int, local_steps: int, epoch: int
    ) -> list[list[tuple[Piece, ...]]]:
        return local_sgd_rounds(
            data.chunk_ids,
            data.chunk_n_rows,
            batch_rows=batch_rows,
            local_steps=local_steps,
            seed=self.seed,
            epoch=epoch,
        )

    def _fit_local(
        self,
        ps: ParamStore,
        run: _Run,
        data: Dataset,
        epochs: int,
        batch_rows: int,
        local_steps: int,
        validation: Dataset | None,
        callbacks: Sequence[Callback],
        checkpoint_every: int | None,
        checkpoint_seconds: float,
        on_nonfinite: str,
    ) -> None:
        """Local SGD: each step of the run is a round in which every chunk runs
        ``local_steps`` minibatch steps from the current point on its worker,
        then the chunks' parameters and float optimizer state are averaged by
        the fixed tree, weighted by rows (see ``fit(local_steps=...)``)."""
        last_commit = time.monotonic()
        committed_step = run.step
        try:
            while run.epoch < epochs and not self.stop_training:
                # Plan: the epoch's rounds are a pure function of (seed, epoch).
                plan = self._local_rounds(data, batch_rows, local_steps, run.epoch)
                for leaves in plan[run.epoch_step :]:
                    if self.stop_training:
                        break
                    t0 = time.perf_counter()
                    # Local steps on the workers, averaged by the fixed tree:
                    # the client gets one reduced partial (sync point).
                    res = self._engine.run_local_round(
                        data.ref,
                        self.model,
                        self.optimizer,
                        run.params,
                        run.opt_state,
                        leaves,
                        placement_chunks=data.chunk_ids,
                        nonfinite=on_nonfinite,
                    )
                    partial = res.partial
                    round_steps = max(len(leaf) for leaf in leaves)
                    n = partial.n_rows
                    if n == 0:
                        raise DivergenceError(
                            f"step {run.step + 1}: the round has no rows (all skipped?)"
                        )
                    # Average: divide the tree's row-weighted sums by the rows.
                    params, float_state = local_average(partial)
                    opt_state = {
                        **advance_counts(run.opt_state, round_steps),
                        **float_state,
                    }
                    loss = partial.mean_loss()
                    objective = partial.metrics[LOCAL_OBJECTIVE_SUM] / n
                    bad = [
                        k
                        for k, v in {**params, **float_state}.items()
                        if not np.all(np.isfinite(v))
                    ]
                    if bad or not math.isfinite(objective):
                        raise DivergenceError(
                            f"step {run.step + 1}: local SGD made "
                            f"{bad or 'the loss'} non-finite; the store "
                            f"{self.store_path!r} keeps the last good version. "
                            f"Lower the learning rate or add gradient clipping."
                        )
                    row = self._step_row(
                        run,
                        res,
                        loss=loss,
                        objective=objective,
                        grad_norm=partial.metrics[LOCAL_GRAD_NORM_SUM] / n,
                        learning_rate=self.optimizer.learning_rate_at(
                            _step_count(run.opt_state)
                        ),
                        seconds=time.perf_counter() - t0,
                        local_steps=round_steps,
                    )
                    if self._close_step(
                        ps,
                        run,
                        row,
                        params,
                        opt_state,
                        end_of_epoch=run.epoch_step + 1 == len(plan),
                        epochs=epochs,
                        validation=validation,
                        on_nonfinite=on_nonfinite,
                        callbacks=callbacks,
                        checkpoint_every=checkpoint_every,
                        checkpoint_seconds=checkpoint_seconds,
                        last_commit=last_commit,
                    ):
                        committed_step, last_commit = run.step, time.monotonic()
        finally:
            # On an error or Ctrl-C, keep the rounds since the last commit.
            if run.step > committed_step:
                self._commit(ps, run)

    def _fit_lbfgs(
        self,
        ps: ParamStore,
        run: _Run,
        data: Dataset,
        epochs: int,
        validation: Dataset | None,
        callbacks: Sequence[Callback],
        checkpoint_every: int | None,
        checkpoint_seconds: float,
        on_nonfinite: str,
    ) -> None:
        """L-BFGS: each iteration (an "epoch" of the run) is a direction from
        the stored curvature pairs and a strong-Wolfe line search whose every
        round is one full pass over the data.  With an L1 penalty, OWL-QN: the
        pairs and trial gradients describe the smooth part of the objective,
        the direction follows the pseudo-gradient and trial points stay in
        its orthant (see :class:`~dasktrain.optim.lbfgs.OrthantSearch`)."""
        opt = self.optimizer
        assert isinstance(opt, LBFGS)
        pieces = full_pass(data.chunk_ids, data.chunk_n_rows)
        like = run.params
        l1 = flatten(
            {
                k: np.full(np.shape(v), self.model.l1_strengths().get(k, 0.0))
                for k, v in like.items()
            }
        )
        owl = bool(np.any(l1 > 0.0))

        def smooth(x: np.ndarray, g: np.ndarray) -> np.ndarray:
            """The gradient without the L1 subgradient (OWL-QN's pairs)."""
            return g - l1 * np.sign(x) if owl else g

        def evaluate(x: np.ndarray) -> tuple[float, float, np.ndarray, PassResult]:
            params = unflatten(x, like)
            # One full pass on the cluster (sync point).
            res = self._pass(
                data, params, pieces, with_grads=True, nonfinite=on_nonfinite
            )
            loss, objective, grads = self._objective(res.partial, params, run.step + 1)
            return loss, objective, smooth(x, flatten(grads)), res

        def evaluate_many(xs: list[np.ndarray]) -> list[_Trial]:
            """Trials at several points: one pass if more than one."""
            if len(xs) == 1:
                try:
                    return [(xs[0], *evaluate(xs[0]))]
                except DivergenceError:
                    return [_nonfinite_trial(xs[0])]
            params_list = [unflatten(x, like) for x in xs]
            # One full pass on the cluster for all points (sync point).
            results = self._engine.run_pass_many(
                data.ref,
                self.model,
                params_list,
                pieces,
                placement_chunks=data.chunk_ids,
                nonfinite=on_nonfinite,
            )
            out: list[_Trial] = []
            for x, params, res in zip(xs, params_list, results, strict=True):
                try:
                    loss, objective, grads = self._objective(
                        res.partial, params, run.step + 1
                    )
                except DivergenceError:
                    out.append(_nonfinite_trial(x))
                    continue
                out.append((x, loss, objective, smooth(x, flatten(grads)), res))
            return out

        last_commit = time.monotonic()
        committed_step = run.step
        x = flatten(run.params)
        # The objective and gradient at the committed point, as the run that
        # committed it had them: a trial of a several-candidate pass (one
        # matrix product for all candidates) has other rounding than a pass
        # at one point, so they are kept in the state, not recomputed.
        point = _lbfgs_point(run.opt_state, x.size)
        if point is None:  # the first point of a run: one pass
            _, f, g, _ = evaluate(x)
        else:
            f, g = point
        try:
            while run.epoch < epochs and not self.stop_training:
                pg = pseudo_gradient(x, g, l1) if owl else g
                if opt.converged(f, pg):
                    run.status = "converged"
                    break
                t0 = time.perf_counter()
                ls: WolfeLineSearch | OrthantSearch
                if owl:
                    p = opt.orthant_direction(run.opt_state, pg)
                    ls = opt.orthant_search(f, x, p, pg, l1)
                else:
                    p = opt.direction(run.opt_state, g)
                    ls = opt.line_search(f, float(g @ p))
                trials: list[_Trial] = []
                while not ls.done:
                    alphas = ls.next_alphas(opt.n_candidates(run.opt_state, ls))
                    if isinstance(ls, OrthantSearch):
                        batch = evaluate_many([ls.point(a) for a in alphas])
                        ls.observe_many(
                            [(a, t[2]) for a, t in zip(alphas, batch, strict=True)]
                        )
                    else:
                        batch = evaluate_many([x + alpha * p for alpha in alphas])
                        # A non-finite trial (nan) makes the line search
                        # shorten the step.
                        ls.observe_many(
                            [
                                (alpha, ft, float(gt @ p))
                                for alpha, (_, _, ft, gt, _) in zip(
                                    alphas, batch, strict=True
                                )
                            ]
                        )
                    trials.extend(batch)
                result = ls.result
                if not result.accepted:
                    if int(run.opt_state["n_hist"]) == 0:
                        logger.info("L-BFGS: no decrease along the gradient; stopping")
                        run.status = "converged"
                        break
                    run.opt_state = {
                        **opt.reset(run.opt_state),
                        **_lbfgs_point_state(f, g),
                    }
                    continue
                x_new, loss, f_new, g_new, accepted = trials[result.trial_index]
                assert accepted is not None
                res = accepted
                new_params = unflatten(x_new, like)
                seconds = time.perf_counter() - t0
                n_rows = res.partial.n_rows * ls.n_rounds
                row = {
                    "step": run.step + 1,
                    "epoch": run.epoch + 1,
                    "loss": loss,
                    "objective": f_new,
                    "grad_norm": float(
                        np.linalg.norm(
                            pseudo_gradient(x_new, g_new, l1) if owl else g_new
                        )
                    ),
                    "learning_rate": float(result.alpha),
                    "rows": n_rows,
                    "rows_per_s": n_rows / seconds if seconds > 0 else math.nan,
                    "seconds": seconds,
                    "evals": len(trials),
                    "passes": ls.n_rounds,
                    **{
                        f"train_{k}": v
                        for k, v in self.model.summarize(res.partial).items()
                        if k != "loss"
                    },
                    "cache_hit_rate": _hit_rate(res),
                }
                # Validate before the run moves on (see _fit_steps).
                self._validate(row, new_params, validation, on_nonfinite)
                run.opt_state = {
                    **opt.push(run.opt_state, x_new - x, g_new - g),
                    **_lbfgs_point_state(f_new, g_new),
                }
                stalled = opt.stalled(f, f_new)
                x, f, g = x_new, f_new, g_new
                run.params = new_params
                run.step += 1
                run.epoch += 1
                try:
                    self._epoch_callbacks(run, row, callbacks)
                finally:
                    run.history.append(row)
                self._log_row(row, callbacks)
                if opt.converged(f, g) or stalled:
                    run.status = "converged"
                elif run.epoch >= epochs:
                    run.status = "finished"
                elif self.stop_training:
                    run.status = "stopped"
                now = time.monotonic()
                if (
                    run.status != "running"
                    or (
                        checkpoint_every is not None
                        and run.step % checkpoint_every == 0
                    )
                    or now - last_commit >= checkpoint_seconds
                ):
                    self._commit(ps, run)
                    committed_step, last_commit = run.step, now
                if run.status == "converged":
                    break
        finally:
            # On an error or Ctrl-C, keep the iterations since the last commit.
            if run.step > committed_step:
                self._commit(ps, run)

    def _fit_newton(
        self,
        ps: ParamStore,
        run: _Run,
        data: Dataset,
        epochs: int,
        validation: Dataset | None,
        callbacks: Sequence[Callback],
        checkpoint_every: int | None,
        checkpoint_seconds: float,
        on_nonfinite: str,
    ) -> None:
        """Newton: each iteration (an "epoch" of the run) is a damped Newton
        step from the gradient and Hessian of a full pass, checked by a
        line search whose rounds are passes too; the first pass of a run
        may solve every chunk locally (the one-pass start).  The pure logic
        is :class:`~dasktrain.optim.newton.NewtonRun`; here are the passes,
        rows and commits.  Its state holds the objective, gradient, Hessian
        and next direction at the committed point, so a resumed run
        continues with the same bits."""
        opt = self.optimizer
        assert isinstance(opt, Newton)
        engine = SecondOrderEngine(self._engine)
        pieces = full_pass(data.chunk_ids, data.chunk_n_rows)
        like = run.params
        l2, l1 = penalty_vectors(self.model, data.schema.n_features)
        machine = NewtonRun(opt, run.opt_state, flatten(run.params), l2, l1)
        last_commit = time.monotonic()
        committed_step = run.step
        t0 = time.perf_counter()
        rows_read = 0
        try:
            while run.epoch < epochs and not self.stop_training:
                request = machine.request()
                if request is None:
                    run.status = "converged"
                    break
                # One full pass on the cluster for all points (sync point).
                results = engine.run_pass(
                    data.ref,
                    self.model,
                    request.points,
                    pieces,
                    placement_chunks=data.chunk_ids,
                    hessian_index=request.hessian_index,
                    hessian_rows=opt.hessian_rows,
                    local_iterations=opt.local_iterations if request.local else None,
                    local_rows=opt.local_rows,
                    nonfinite=on_nonfinite,
                )
                rows_read += results[0].partial.n_rows
                if request.local:
                    start = local_value(results[0].partial)
                    if not math.isfinite(start.start_loss):
                        raise DivergenceError(
                            f"step {run.step + 1}: the loss is {start.start_loss} "
                            f"at the starting point; the store {self.store_path!r} "
                            f"keeps the last good version"
                        )
                    machine.observe(start)
                    continue
                if request.hessian_index is not None and not machine.started:
                    self._check_newton_start(results[0].partial, like, run.step + 1)
                values: list[PointValue] = [point_value(r.partial) for r in results]
                step = machine.observe(values)
                if step is None:
                    continue
                res = results[step.point_index]
                new_params = unflatten(step.x, like)
                seconds = time.perf_counter() - t0
                row = {
                    "step": run.step + 1,
                    "epoch": run.epoch + 1,
                    "loss": step.loss,
                    "objective": step.objective,
                    "grad_norm": step.grad_norm,
                    "learning_rate": step.alpha,
                    "rows": rows_read,
                    "rows_per_s": rows_read / seconds if seconds > 0 else math.nan,
                    "seconds": seconds,
                    "evals": step.evals,
                    "passes": step.passes,
                    "damping": step.damping,
                    **{
                        f"train_{k}": v
                        for k, v in self.model.summarize(res.partial).items()
                        if k != "loss"
                    },
                    "cache_hit_rate": _hit_rate(res),
                }
                # Validate before the run moves on (see _fit_steps).
                self._validate(row, new_params, validation, on_nonfinite)
                run.params = new_params
                run.opt_state = machine.state()
                run.step += 1
                run.epoch += 1
                try:
                    self._epoch_callbacks(run, row, callbacks)
                finally:
                    run.history.append(row)
                self._log_row(row, callbacks)
                if machine.done:
                    run.status = "converged"
                elif run.epoch >= epochs:
                    run.status = "finished"
                elif self.stop_training:
                    run.status = "stopped"
                if self._commit_due(
                    run, checkpoint_every, checkpoint_seconds, last_commit
                ):
                    self._commit(ps, run)
                    committed_step, last_commit = run.step, time.monotonic()
                if run.status == "converged":
                    break
                t0 = time.perf_counter()
                rows_read = 0
        finally:
            # On an error or Ctrl-C, keep the iterations since the last commit.
            if run.step > committed_step:
                self._commit(ps, run)

    def _check_newton_start(
        self, partial: Partial, like: Mapping[str, np.ndarray], step: int
    ) -> None:
        """The starting point of a Newton run must be finite (trial points
        may not be: the line search shortens the step)."""
        grads = unflatten(np.asarray(partial.grads["grad"]), like)
        hessian = np.asarray(partial.grads["hessian"])
        self._objective(Partial(partial.loss_sum, grads, partial.n_rows), like, step)
        if not np.all(np.isfinite(hessian)):
            raise DivergenceError(
                f"step {step}: the Hessian is not finite at the starting point; "
                f"the store {self.store_path!r} keeps the last good version"
            )

    # -- sharded tables (the parameter-server path) ----------------------------
    def _start_sharded_run(
        self, ps: ParamStore, data: Dataset, rng: np.random.Generator
    ) -> _Run:
        """Initialize a run whose tables live in row shards of the store:
        dense parameters on the client, tables written by the workers into
        version 0, then committed."""
        model = self.model
        assert isinstance(model, SparseModel)
        params = {
            k: np.asarray(v, dtype=np.float64) for k, v in model.init_dense(rng).items()
        }
        seed = model.table_seed(rng)
        layouts, _ = table_layouts(
            model, self.optimizer, params, shard_rows=self.shard_rows
        )
        run = _Run(
            params=params,
            opt_state=self.optimizer.init(params),
            status="running",
            tables=layouts,
            table_step=0,
        )
        run.dataset = _dataset_meta(data)
        self._sharded_engine.init_tables(ps, 0, model, seed, layouts)
        self._commit(ps, run)
        return run

    def _global_state(self, run: _Run) -> dict[str, np.ndarray]:
        """Optimizer state not tied to a parameter (e.g. step counts)."""
        return {
            k: v
            for k, v in run.opt_state.items()
            if not any(k.endswith("." + name) for name in run.params)
        }

    def _fit_sharded(
        self,
        ps: ParamStore,
        run: _Run,
        data: Dataset,
        epochs: int,
        batch_rows: int | None,
        validation: Dataset | None,
        callbacks: Sequence[Callback],
        checkpoint_every: int | None,
        checkpoint_seconds: float,
        on_nonfinite: str,
        staleness: int = 0,
    ) -> None:
        """Steps of a model with sharded tables.  Each step writes a new
        version of the store (changed shards written by workers, the others
        shared with the previous version); a checkpoint commits it, and
        versions no longer needed are dropped unless they are kept committed
        ones.  With ``staleness = k``, up to ``k + 1`` steps are in flight
        (see :meth:`fit`)."""
        model = self.model
        assert isinstance(model, SparseModel)
        engine = self._sharded_engine
        last_commit = time.monotonic()
        committed_step = run.step
        pending: list[tuple[StepHandle, dict[str, np.ndarray]]] = []
        readers: dict[int, int] = {}  # version -> steps in flight reading it

        def drop_unused_versions() -> None:
            assert run.table_step is not None
            busy = {v for v, n in readers.items() if n > 0}
            for step in ps.version_dirs():
                if (
                    step < run.table_step
                    and step not in ps.versions
                    and step not in busy
                ):
                    ps.discard_version(step)

        def finish_oldest(plan_len: int) -> None:
            nonlocal committed_step, last_commit
            handle, _ = pending.pop(0)
            res = engine.finish_step(handle)
            readers[handle.read_step] -= 1
            step = handle.write_step
            loss, objective, grads = self._objective(res.partial, run.params, step)
            with np.errstate(over="ignore", invalid="ignore"):
                updates, opt_state = self.optimizer.update(
                    grads, run.opt_state, run.params
                )
                params = apply_updates(run.params, updates)
            if not all(np.all(np.isfinite(v)) for v in params.values()):
                raise DivergenceError(
                    f"step {step}: the update made parameters non-finite; the store "
                    f"{self.store_path!r} keeps the last good version. Lower the "
                    f"learning rate."
                )
            row = self._step_row(
                run,
                res,
                loss=loss,
                objective=objective,
                grad_norm=global_norm(grads),
                learning_rate=self.optimizer.learning_rate_at(run.step),
                seconds=time.perf_counter() - handle.t0,
                **res.stats.to_row(),
            )
            end_of_epoch = run.epoch_step + 1 == plan_len
            if end_of_epoch and validation is not None:
                self._validate_sharded(row, params, step, run, validation, on_nonfinite)
            run.table_step = step
            self._advance(run, row, params, opt_state, end_of_epoch, epochs, callbacks)
            if self._commit_due(
                run, checkpoint_every, checkpoint_seconds, last_commit, bool(pending)
            ):
                self._commit(ps, run, protect={h.read_step for h, _ in pending})
                committed_step, last_commit = run.step, time.monotonic()
            drop_unused_versions()

        try:
            while run.epoch < epochs and not self.stop_training:
                plan = epoch_steps(
                    data.chunk_ids,
                    data.chunk_n_rows,
                    batch_rows=batch_rows,
                    seed=self.seed,
                    epoch=run.epoch,
                )
                for pieces in plan[run.epoch_step + len(pending) :]:
                    if self.stop_training:
                        break
                    assert run.table_step is not None
                    # Optimizer counters before this step: those of the last
                    # finished step, advanced by the steps still in flight.
                    gstate = pending[-1][1] if pending else self._global_state(run)
                    handle = engine.submit_step(
                        ps,
                        data.ref,
                        model,
                        self.optimizer,
                        run.params,
                        gstate,
                        run.tables,
                        pieces,
                        read_step=run.table_step,
                        write_step=run.step + len(pending) + 1,
                        after=pending[-1][0] if pending else None,
                        placement_chunks=data.chunk_ids,
                        nonfinite=on_nonfinite,
                    )
                    readers[run.table_step] = readers.get(run.table_step, 0) + 1
                    _, gstate_after = self.optimizer.update({}, gstate, {})
                    pending.append((handle, gstate_after))
                    if len(pending) > staleness:
                        finish_oldest(len(plan))
                # The end of the epoch (or a stop): finish the steps in flight.
                while pending:
                    finish_oldest(len(plan))
        finally:
            if pending:
                # An error or Ctrl-C: drop the steps in flight; the run keeps
                # every step that finished.
                engine.cancel([h for h, _ in pending])
                for h, _ in pending:
                    with contextlib.suppress(Exception):
                        ps.discard_version(h.write_step)
                pending.clear()
            if run.step > committed_step:
                self._commit(ps, run)

    def _validate_sharded(
        self,
        row: dict[str, Any],
        params: Mapping[str, np.ndarray],
        step: int,
        run: _Run,
        validation: Dataset,
        on_nonfinite: str,
    ) -> None:
        res = self._sharded_pass(validation, params, step, run, on_nonfinite)
        for k, v in self.model.summarize(res.partial).items():
            row[f"val_{k}"] = v

    def _sharded_pass(
        self,
        data: Dataset,
        params: Mapping[str, np.ndarray],
        step: int,
        run: _Run,
        on_nonfinite: str,
    ) -> ShardedPassResult:
        assert isinstance(self.model, SparseModel)
        return self._sharded_engine.run_pass(
            self._store_ref,
            step,
            data.ref,
            self.model,
            params,
            run.tables,
            full_pass(data.chunk_ids, data.chunk_n_rows),
            placement_chunks=data.chunk_ids,
            nonfinite=on_nonfinite,
        )

    def _apply_sparse(self, kind: str, X: Any, run: _Run) -> Any:
        """Predictions of a SparseModel for a Dataset (a dask array, computed
        by tasks that pull the table rows they need) or a mapping of fields
        to arrays (numpy)."""
        import dask
        import dask.array as da

        model = self.model
        assert isinstance(model, SparseModel)
        layouts = {t.name: t for t in run.tables}
        if isinstance(X, Dataset):
            missing = [f for f in model.input_fields if f not in X.schema.fields]
            if missing:
                raise DataValidationError(
                    f"dataset {X.path!r} lacks fields {missing} that "
                    f"{type(model).__name__} predicts from"
                )
            parts = []
            probe = self._apply_sparse(
                kind,
                {
                    f: np.zeros((1, *X.schema.fields[f].shape), dtype=np.int64)
                    for f in model.input_fields
                },
                run,
            )
            for c in X.chunk_ids:
                n = X.chunk_n_rows(c)
                if run.tables:
                    delayed = dask.delayed(predict_sparse_chunk, pure=True)(
                        X.ref,
                        model,
                        dict(run.params),
                        self._store_ref,
                        run.table_step,
                        layouts,
                        c,
                        kind,
                    )
                else:
                    delayed = dask.delayed(_predict_dense_sparse_chunk, pure=True)(
                        X.ref, model, dict(run.params), c, kind
                    )
                parts.append(
                    da.from_delayed(
                        delayed, shape=(n, *probe.shape[1:]), dtype=probe.dtype
                    )
                )
            return da.concatenate(parts)
        if not isinstance(X, Mapping):
            raise TypeError(
                f"{type(model).__name__} predicts from a Dataset or a mapping of "
                f"fields {list(model.input_fields)} to arrays, got {type(X).__name__}"
            )
        if not run.tables:
            return getattr(model, kind)(run.params, X)
        batch = {f: np.asarray(X[f]) for f in model.input_fields if f in X}
        missing = [f for f in model.input_fields if f not in batch]
        if missing:
            raise ValueError(
                f"missing fields {missing}; {type(model).__name__} "
                f"needs {list(model.input_fields)}"
            )
        model._raise_bad_ids(batch)
        assert run.table_step is not None
        rows = {}
        for table, ids in model.row_ids(batch).items():
            uniq = np.unique(ids)
            rows[table] = (
                uniq,
                read_rows(self._store_ref, run.table_step, layouts[table], uniq),
            )
        return model.predict_rows(run.params, rows, batch, kind)

    # -- evaluation and prediction ---------------------------------------------
    def evaluate(
        self, data: Dataset, *, on_nonfinite: str = "raise"
    ) -> dict[str, float]:
        """Mean data loss and the model's metrics on ``data`` (one pass).

        Returns ``{"loss": ..., "accuracy": ...}`` for classifiers and
        ``{"loss": ..., "mse": ..., "r2": ...}`` for regressors.
        """
        if not isinstance(data, Dataset):
            raise TypeError(
                f"evaluate() needs a dasktrain.Dataset, got {type(data).__name__}"
            )
        _check_nonfinite_policy(on_nonfinite)
        self.model.check_schema(data.schema)
        run = self._current_run()
        self._check_features(data)
        if run.tables:
            assert run.table_step is not None
            partial = self._sharded_pass(
                data, run.params, run.table_step, run, on_nonfinite
            ).partial
        else:
            partial = self._pass(
                data,
                run.params,
                full_pass(data.chunk_ids, data.chunk_n_rows),
                with_grads=False,
                nonfinite=on_nonfinite,
            ).partial
        return {k: float(v) for k, v in self.model.summarize(partial).items()}

    def _check_features(self, data: Dataset) -> None:
        if (
            self._schema is not None
            and self._schema.n_features != data.schema.n_features
        ):
            raise ConfigMismatchError(
                f"the model was trained on {self._schema.n_features} features, "
                f"dataset {data.path!r} has {data.schema.n_features}"
            )

    def predict(self, X: Any) -> Any:
        """Predictions (labels for classifiers): numpy in, numpy out; dask
        array in, dask array out; a Dataset in, a dask array out."""
        return self._apply("predict", X)

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities (classifiers only)."""
        if not self.model.is_classifier:
            raise AttributeError(f"{type(self.model).__name__} is not a classifier")
        return self._apply("predict_proba", X)

    def _apply(self, kind: str, X: Any) -> Any:
        import dask.array as da

        run = self._current_run()
        if isinstance(self.model, SparseModel):
            return self._apply_sparse(kind, X, run)
        params = {k: v for k, v in run.params.items()}
        fn = getattr(self.model, kind)
        if isinstance(X, Dataset):
            self._check_features(X)
            X = X.to_dask("X")
        if isinstance(X, da.Array):
            if X.ndim != 2:
                raise ValueError(f"X must be 2-d, got shape {X.shape}")
            if X.dtype.kind not in "fiub":
                raise TypeError(f"X must be numeric, got dtype {X.dtype}")
            self._check_width(X.shape[1])
            if X.chunks[1] != (X.shape[1],):
                X = X.rechunk({1: -1})
            probe = fn(params, np.zeros((1, X.shape[1]), dtype=X.dtype))
            out_shape = probe.shape[1:]
            return X.map_blocks(
                _apply_block,
                fn,
                params,
                dtype=probe.dtype,
                drop_axis=1 if not out_shape else None,
                chunks=(X.chunks[0], *tuple((s,) for s in out_shape)),
            )
        arr = np.asarray(X)
        if arr.ndim != 2:
            raise ValueError(f"X must be 2-d (rows, features), got shape {arr.shape}")
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"X must be numeric, got dtype {arr.dtype}")
        self._check_width(arr.shape[1])
        return fn(params, arr if arr.dtype.kind == "f" else arr.astype(np.float64))

    def _check_width(self, width: int) -> None:
        if self._schema is not None and self._schema.n_features != width:
            raise ValueError(
                f"X has {width} features, the model was trained on "
                f"{self._schema.n_features}"
            )

    # -- lifecycle ---------------------------------------------------------------
    def close(self) -> None:
        """Close the embedded cluster, if this trainer started one."""
        self._handle.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "no run yet"
        if self._run is not None:
            state = (
                f"step {self._run.step}, epoch {self._run.epoch}, {self._run.status}"
            )
        else:
            # A resumed run not loaded yet: describe the store's committed
            # version (a repr must not fail, and reads metadata only).
            try:
                if self._store_exists():
                    meta = self._open_store().meta
                    prog = meta.get("progress", {})
                    if "step" in prog:
                        state = (
                            f"committed step {prog['step']}, epoch "
                            f"{prog.get('epoch', '?')}, {meta.get('status', '?')}"
                        )
            except Exception:
                state = "store unreadable"
        return (
            f"Trainer({self.model!r}, {self.optimizer!r}, "
            f"store={self.store_path!r}; {state})"
        )


def _apply_block(
    block: np.ndarray, fn: Any, params: Mapping[str, np.ndarray]
) -> np.ndarray:
    return np.asarray(fn(dict(params), block))


def _predict_dense_sparse_chunk(
    ref: Any,
    model: SparseModel,
    params: Mapping[str, np.ndarray],
    chunk_id: int,
    kind: str,
) -> np.ndarray:
    loaded, _ = load_chunk(ref, model.input_fields, chunk_id, cache=worker_cache())
    return np.asarray(getattr(model, kind)(dict(params), dict(loaded.arrays)))


def _check_fit_options(
    checkpoint_seconds: Any, callbacks: Any, early_stopping: Any, progress: Any
) -> None:
    """Check fit's options before anything runs or is written."""
    if (
        isinstance(checkpoint_seconds, bool)
        or not isinstance(checkpoint_seconds, int | float | np.integer | np.floating)
        or not checkpoint_seconds >= 0
    ):
        raise ValueError(
            "checkpoint_seconds must be a number >= 0 (math.inf: never by time), "
            f"got {checkpoint_seconds!r}"
        )
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Sequence):
        raise TypeError(
            f"callbacks must be a list of dasktrain Callbacks, got "
            f"{type(callbacks).__name__}"
        )
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(
                f"callbacks must be dasktrain Callbacks, got {type(cb).__name__}"
            )
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError(
            f"early_stopping must be an EarlyStopping or None, got "
            f"{type(early_stopping).__name__}"
        )
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")


def _check_nonfinite_policy(on_nonfinite: Any) -> None:
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}"
        )


def _step_count(opt_state: Mapping[str, np.ndarray]) -> int:
    """Optimizer updates done so far: the largest step counter of the state."""
    counts = [int(v) for v in opt_state.values() if is_count(v)]
    return max(counts, default=0)


def _hit_rate(res: PassResult | ShardedPassResult) -> float:
    total = res.cache_hits + res.cache_misses
    return res.cache_hits / total if total else math.nan


def _dataset_meta(data: Dataset) -> dict[str, Any]:
    return {
        "url": data.path,
        "uuid": data.uuid,
        "n_rows": int(sum(data.chunk_n_rows(c) for c in data.chunk_ids)),
        "chunk_ids": [int(c) for c in data.chunk_ids],
    }


#: An L-BFGS trial: point, mean loss, objective, gradient, and its pass
#: (``None`` for a non-finite trial).
_Trial = tuple[np.ndarray, float, float, np.ndarray, "PassResult | None"]


def _nonfinite_trial(x: np.ndarray) -> _Trial:
    return (x, math.nan, math.nan, np.full_like(x, np.nan), None)


#: Keys of the L-BFGS state the trainer adds: objective and gradient at the
#: current point.
_LBFGS_POINT_F = "point_objective"
_LBFGS_POINT_G = "point_grad"


def _lbfgs_point_state(f: float, g: np.ndarray) -> dict[str, np.ndarray]:
    return {
        _LBFGS_POINT_F: np.asarray(f, dtype=np.float64),
        _LBFGS_POINT_G: np.asarray(g, dtype=np.float64).copy(),
    }


def _lbfgs_point(
    state: Mapping[str, np.ndarray], n_params: int
) -> tuple[float, np.ndarray] | None:
    """Objective and gradient kept in an L-BFGS state, if any."""
    if _LBFGS_POINT_F not in state or _LBFGS_POINT_G not in state:
        return None
    g = np.asarray(state[_LBFGS_POINT_G], dtype=np.float64).ravel()
    if g.size != n_params:
        return None
    return float(state[_LBFGS_POINT_F]), g
