"""The trainer: a thin face over the fit loops.

``Trainer.fit`` reads top to bottom in stages: check the arguments, open the
parameter store (take its write lock, load or initialize the run), choose
the loop that runs this kind of fit (:mod:`dasktrain.loops`: full-batch
passes, minibatch segments, L-BFGS, sharded tables), and run it.  Every loop
ends its steps and checkpoints through one protocol
(:class:`~dasktrain.loops.base.FitLoop`).  Everything that decides the
numbers (the plan, the reduction tree, the optimizer) is a pure function of
the seed and the committed state, so a resumed run reproduces an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from dasktrain.callbacks import Callback, EarlyStopping, ProgressBar
from dasktrain.data import Dataset
from dasktrain.engine.budget import MEMORY_TOPIC, NO_ANSWER_STATUS, worst_worker
from dasktrain.engine.cache import DEFAULT_CACHE_FRACTION, worker_cache
from dasktrain.engine.cluster import ClientHandle, get_client, prepare_client
from dasktrain.engine.engine import Engine
from dasktrain.engine.plan import full_pass
from dasktrain.engine.rank import EVENT_TOPIC
from dasktrain.engine.segments import SegmentRunner
from dasktrain.engine.sharded import (
    ShardedEngine,
    predict_sparse_chunk,
    table_layouts,
)
from dasktrain.engine.tasks import NONFINITE_POLICIES, load_chunk
from dasktrain.errors import (
    ConfigMismatchError,
    DataValidationError,
    StoreError,
)
from dasktrain.history import History
from dasktrain.loops.base import FitLoop, FitOptions, Run, dataset_meta
from dasktrain.loops.full_batch import FullBatchLoop
from dasktrain.loops.lbfgs import LBFGSLoop
from dasktrain.loops.minibatch import MinibatchLoop, resolve_n_streams
from dasktrain.loops.newton import NewtonLoop
from dasktrain.loops.table_segments import TableSegmentsLoop
from dasktrain.loops.tables import TablesLoop, sharded_pass
from dasktrain.models.base import Model, model_from_config
from dasktrain.models.glm import supports_second_order
from dasktrain.models.sparse import SparseModel
from dasktrain.optim import LBFGS, Optimizer, optimizer_from_config
from dasktrain.optim.newton import Newton
from dasktrain.params import ParamStore
from dasktrain.params.tables import (
    PARAM,
    ParamStoreRef,
    open_table_array,
)
from dasktrain.predictor import apply_dense, apply_table_rows
from dasktrain.preprocessing import (
    MAX_CANCELLATION,
    Moments,
    Standardize,
    moment_statistics,
    standardize_option,
)
from dasktrain.schema import Schema

logger = logging.getLogger(__name__)

__all__ = ["Trainer"]

STORE_FORMAT_META_KEYS = ("model", "optimizer", "seed", "schema", "progress")
#: Default of ``fit(checkpoint_seconds=...)``.
DEFAULT_CHECKPOINT_SECONDS = 60.0
#: With ``sharded=None``, tables of a SparseModel larger than this in total
#: are kept in row shards of the store; smaller ones are dense parameters.
DENSE_TABLE_LIMIT_BYTES = 64 << 20


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
        Cap on the decoded chunks each worker keeps, as a fraction of its
        memory limit; ``None`` (the default): whatever the worker's memory
        budget has room for (see "Memory" in the README); ``0`` disables the
        cache.
    storage_options:
        fsspec options of a parameter store on an object store (credentials,
        endpoint...), used by the client and sent to the workers that read
        and write sharded tables; ignored for local paths.  Without them, the
        filesystem configures itself from the environment.
    standardize:
        ``True`` (or a :class:`~dasktrain.preprocessing.Standardize` naming
        some columns) trains on standardized features ``(X - mean) / std``:
        the statistics are computed in one pass over the training data when
        the run starts, stored in the parameter store's metadata, and applied
        by ``fit``, ``evaluate``, ``predict`` and resumed trainers (see
        :mod:`dasktrain.preprocessing`).  Models that read ``X`` only.

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
        cache_fraction: float | None = DEFAULT_CACHE_FRACTION,
        sharded: bool | None = None,
        shard_rows: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        standardize: bool | Standardize = False,
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
        if cache_fraction is not None and (
            isinstance(cache_fraction, bool)
            or not isinstance(cache_fraction, int | float | np.integer | np.floating)
            or not 0.0 <= cache_fraction < 1.0
        ):
            raise ValueError(
                "cache_fraction must be None or a number in [0, 1), "
                f"got {cache_fraction!r}"
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
        self._standardize = standardize_option(standardize)
        if self._standardize is not None and "X" not in model.fields:
            raise ValueError(
                f"standardize applies to models that read X, not "
                f"{type(model).__name__} (fields {list(model.fields)})"
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
        self._run: Run | None = None
        self._schema: Schema | None = None
        if self._store_exists():
            self._check_store_matches(self._open_store())
        self._handle: ClientHandle = get_client(client)
        prepare_client(self._handle.client)
        self._engine = Engine(self._handle.client, cache_fraction=cache_fraction)
        self._sharded_engine = ShardedEngine(self._engine)
        self._segments: SegmentRunner | None = None

    # -- construction from a store ---------------------------------------------
    @classmethod
    def resume(
        cls,
        store: str | os.PathLike[str],
        *,
        client: Any = None,
        cache_fraction: float | None = DEFAULT_CACHE_FRACTION,
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
            # Stores written before "sharded" was recorded: their tables say.
            sharded = bool(meta.get("sharded", bool(ps.table_layouts())))
            shard_rows = meta.get("shard_rows")
            shard_rows = None if shard_rows is None else int(shard_rows)
            stored = meta.get("preprocessing", {}).get("standardize")
            standardize = None if stored is None else Standardize.from_config(stored)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"parameter store {os.fspath(store)!r} does not describe a run "
                f"(its metadata lack {exc}); it was not written by a Trainer"
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
            shard_rows=shard_rows,
            storage_options=storage_options,
            standardize=standardize or False,
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
        if ps.committed is None and bool(meta.get("sharded", self.sharded)) != (
            self.sharded
        ):
            raise ConfigMismatchError(
                f"parameter store {self.store_path!r} was created for a run with "
                f"sharded={meta.get('sharded')}; create the Trainer with the same "
                f"sharded (or use Trainer.resume)"
            )
        self._adopt_standardize(meta)

    def _adopt_standardize(self, meta: Mapping[str, Any]) -> None:
        """Check the store's standardization against this trainer's, and take
        its statistics."""
        stored_config = meta.get("preprocessing", {}).get("standardize")
        stored = (
            None if stored_config is None else Standardize.from_config(stored_config)
        )
        ours = self._standardize
        if (stored is None) != (ours is None) or (
            stored is not None
            and ours is not None
            and (
                not stored.same_spec(ours)
                or (stored.fitted and ours.fitted and stored != ours)
            )
        ):
            raise ConfigMismatchError(
                f"parameter store {self.store_path!r} holds a run with "
                f"standardize={None if stored is None else stored.config()}, this "
                f"trainer has standardize={None if ours is None else ours.config()}; "
                f"use the same option (or Trainer.resume)"
            )
        if stored is not None and stored.fitted:
            self._standardize = stored

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

    def _current_run(self) -> Run:
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
    def _load(self, ps: ParamStore) -> Run:
        version = ps.read()
        meta = ps.meta
        prog = meta.get("progress", {})
        tables = list(ps.table_layouts(version.step).values())
        self._schema = Schema.from_json(meta["schema"]) if "schema" in meta else None
        self._adopt_standardize(meta)
        return Run(
            params={k: np.asarray(v) for k, v in version.params.items()},
            opt_state={k: np.asarray(v) for k, v in version.opt_state.items()},
            step=int(prog.get("step", version.step)),
            epoch=int(prog.get("epoch", 0)),
            epoch_step=int(prog.get("epoch_step", 0)),
            batch_rows=prog.get("batch_rows"),
            local_steps=prog.get("local_steps"),
            n_streams=prog.get("n_streams"),
            status=str(meta.get("status", "running")),
            history=History(meta.get("history", [])),
            callbacks=dict(meta.get("callbacks", {})),
            dataset=dict(meta.get("dataset", {})),
            tables=tables,
            table_step=version.step if tables else None,
        )

    def _meta(self, run: Run) -> dict[str, Any]:
        assert self._schema is not None
        return {
            **self._run_config(),
            "schema": self._schema.to_json(),
            "progress": {
                "step": run.step,
                "epoch": run.epoch,
                "epoch_step": run.epoch_step,
                "batch_rows": run.batch_rows,
                "local_steps": run.local_steps,
                "n_streams": run.n_streams,
            },
            "status": run.status,
            "dataset": run.dataset,
            "history": run.history.rows,
            "callbacks": run.callbacks,
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
            **(
                {"preprocessing": {"standardize": self._standardize.config()}}
                if self._standardize is not None
                else {}
            ),
        }

    def _commit(
        self, ps: ParamStore, run: Run, protect: set[int] | None = None
    ) -> None:
        if ps.committed == run.step:
            # Same step, new state (an epoch closed without a new step).
            ps.update_meta(self._meta(run))
        elif run.tables:
            # The version of this step holds the tables already (see
            # loops.tables); add the dense arrays and make it the committed one.
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
        # The run's configuration goes in with the store (one atomic write):
        # a driver killed before its first commit leaves a store that
        # Trainer.resume, or the same script run again, starts cleanly.
        return ParamStore.create(
            self.store_path,
            keep_versions=self.keep_versions,
            meta={**self._run_config(), "status": "starting"},
            storage_options=self._store_ref.storage_options,
        )

    def _run_config(self) -> dict[str, Any]:
        """What a store records of its run from its creation on: all that
        :meth:`resume` needs to make the same trainer."""
        return {
            "model": self.model.config(),
            "optimizer": self.optimizer.config(),
            "seed": self.seed,
            "sharded": self.sharded,
            "shard_rows": self.shard_rows,
        }

    def _start_run(self, ps: ParamStore, data: Dataset) -> Run:
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
        run = Run(
            params=params, opt_state=self.optimizer.init(params), status="running"
        )
        run.dataset = dataset_meta(data)
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
        checkpoint_steps: int | None = None,
        checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
        on_nonfinite: str = "raise",
        progress: bool = True,
        local_steps: int | None = None,
        n_streams: int | None = None,
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
            Rows per step; ``None`` for full-batch steps.  An epoch of
            minibatches has ``ceil(n_rows / batch_rows)`` steps; each step
            takes about ``batch_rows / n_streams`` rows from each stream (see
            ``n_streams``).
        validation:
            Evaluated at each epoch end; adds ``val_*`` columns to the history.
        callbacks:
            :class:`~dasktrain.callbacks.Callback` objects.  With minibatches,
            ``on_step_end`` receives rows while the workers train (the
            parameters and history of the trainer are updated at checkpoints).
        early_stopping:
            An :class:`~dasktrain.callbacks.EarlyStopping` (state kept in the store).
        checkpoint_steps, checkpoint_seconds:
            Commit a version every this many steps of the run, and whenever
            this many seconds passed since the last commit (``math.inf``:
            never by time); always at epoch ends of minibatch runs and at the
            end of the fit.  Minibatch steps run on the workers between two
            checkpoints (a *segment*); a lost worker costs a rerun of the
            current segment, to the same bits.
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
        n_streams:
            Minibatch runs: the dataset's rows are split into this many
            contiguous *streams*; each step takes about ``batch_rows /
            n_streams`` rows from every stream (each stream walks its own
            chunks in an order shuffled per epoch, their rows shuffled too),
            and the streams' partial sums are the leaves of the fixed
            reduction tree.  Part of the run's plan, never of the cluster:
            the bits are the same on any number of workers; a step uses up
            to ``n_streams`` worker threads.  ``None``: the run's own in the
            middle of an epoch, else one stream per 256 rows of a step (at
            most 32; with sharded tables one per 16,384 rows, at least 2 from
            512 rows; see :func:`dasktrain.engine.plan.default_n_streams`).
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
        self._check_fit_args(data, epochs, batch_rows, validation, checkpoint_steps)
        _check_fit_options(checkpoint_seconds, callbacks, early_stopping, progress)
        self._check_local_steps(local_steps, batch_rows)
        _check_n_streams(n_streams, batch_rows, local_steps, data)
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
        options = FitOptions(
            epochs=int(epochs),
            batch_rows=None if batch_rows is None else int(batch_rows),
            validation=validation,
            callbacks=all_callbacks,
            checkpoint_steps=None
            if checkpoint_steps is None
            else int(checkpoint_steps),
            checkpoint_seconds=float(checkpoint_seconds),
            on_nonfinite=on_nonfinite,
            local_steps=None if local_steps is None else int(local_steps),
            staleness=int(staleness),
            n_streams=None if n_streams is None else int(n_streams),
        )

        created = not self._store_exists()
        if created:
            self._run = None
        ps = self._open_for_fit(data)
        with ps.lock(owner=f"Trainer.fit pid {os.getpid()}"):
            try:
                return self._fit_locked(ps, data, options, progress)
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
        self, ps: ParamStore, data: Dataset, options: FitOptions, progress: bool
    ) -> History:
        """The body of :meth:`fit`, run while holding the store's lock."""
        ps.cleanup()
        if (
            self._standardize is not None
            and not self._standardize.fitted
            and ps.committed is None
        ):
            self._standardize = self._fit_standardize(data, options.on_nonfinite)
        run = self._start_run(ps, data)
        self._run = run
        # The model sees standardized features (read so on the workers).
        data = self._prepared(data)
        if options.validation is not None:
            options = replace(options, validation=self._prepared(options.validation))
        batch_rows, local_steps = options.batch_rows, options.local_steps
        self._check_resumable(run, data, batch_rows)
        if run.epoch_step != 0 and run.local_steps != local_steps:
            raise ConfigMismatchError(
                f"parameter store {self.store_path!r} stopped in the middle of epoch "
                f"{run.epoch + 1} with local_steps={run.local_steps}; continue it "
                f"with the same local_steps (the rounds of an epoch depend on it)"
            )
        n_streams = None
        if (
            batch_rows is not None
            and local_steps is None
            and (not run.tables or _table_segments(run, options))
        ):
            n_streams = resolve_n_streams(
                options.n_streams,
                batch_rows,
                run.n_streams,
                run.epoch_step != 0,
                tables=bool(run.tables),
            )
            if options.n_streams is None and run.n_streams is None:
                # The default never asks for more streams than rows.
                n_rows = sum(data.chunk_n_rows(c) for c in data.chunk_ids)
                n_streams = max(1, min(n_streams, n_rows))
            if run.epoch_step != 0 and run.n_streams not in (None, n_streams):
                raise ConfigMismatchError(
                    f"parameter store {self.store_path!r} stopped in the middle of "
                    f"epoch {run.epoch + 1} with n_streams={run.n_streams}; continue "
                    f"it with the same n_streams (the steps of an epoch depend on it)"
                )
        for cb in options.callbacks:
            saved = run.callbacks.get(type(cb).__name__)
            if saved is not None:
                cb.load_state_dict(saved)
        if run.epoch < options.epochs and run.status in ("converged", "stopped"):
            # Re-running a script must not extend a run that ended on its own
            # (early stopping, a callback, convergence): say so loudly.
            logger.warning(
                "store %s holds a run that ended as %r at epoch %d; fit(epochs=%d) "
                "does not continue it (train further in a new store)",
                self.store_path,
                run.status,
                run.epoch,
                options.epochs,
            )
            return run.history
        if run.epoch >= options.epochs:
            logger.info(
                "store %s already has %d epochs (status %s); nothing to do",
                self.store_path,
                run.epoch,
                run.status,
            )
            return run.history
        run.batch_rows = batch_rows
        run.local_steps = local_steps
        run.n_streams = n_streams
        run.dataset = dataset_meta(data)
        # A finished run continued to more epochs is running again (its status
        # decides when versions are committed).
        run.status = "running"
        loop = self._loop(ps, run, data, options)
        callbacks = loop.callbacks
        if progress:
            total = loop.steps_per_epoch() * options.epochs
            callbacks.insert(
                0, ProgressBar(total_steps=total, initial=min(run.step, total))
            )
        self.stop_training = False
        for cb in callbacks:
            cb.on_fit_begin(self)
        try:
            loop.fit()
        finally:
            for cb in callbacks:
                cb.on_fit_end(self, run.history)
        return run.history

    def _loop(
        self, ps: ParamStore, run: Run, data: Dataset, options: FitOptions
    ) -> FitLoop:
        """The loop module that runs this fit (one per way of training)."""
        common: dict[str, Any] = {
            "engine": self._engine,
            "commit": self._commit,
            "log_event": self._log_event,
            "log_memory": self._log_memory_event,
        }
        if run.tables and _table_segments(run, options):
            return TableSegmentsLoop(
                self,
                ps,
                run,
                data,
                options,
                segments=self._segment_runner(),
                sharded=self._sharded_engine,
                store_ref=self._store_ref,
                **common,
            )
        if run.tables:
            return TablesLoop(
                self,
                ps,
                run,
                data,
                options,
                sharded=self._sharded_engine,
                store_ref=self._store_ref,
                **common,
            )
        if isinstance(self.optimizer, Newton):
            return NewtonLoop(self, ps, run, data, options, **common)
        if isinstance(self.optimizer, LBFGS):
            return LBFGSLoop(self, ps, run, data, options, **common)
        if options.batch_rows is None:
            return FullBatchLoop(self, ps, run, data, options, **common)
        return MinibatchLoop(
            self, ps, run, data, options, segments=self._segment_runner(), **common
        )

    def _segment_runner(self) -> SegmentRunner:
        if self._segments is None:
            self._segments = SegmentRunner(self._engine)
        return self._segments

    def _log_event(self, row: dict[str, Any]) -> None:
        """One row to the scheduler's event log (~1 ms): the dashboard page."""
        try:
            self._handle.client.log_event(
                EVENT_TOPIC, {"store": self.store_path, **row}
            )
        except Exception:
            logger.debug("could not log a dashboard event", exc_info=True)

    def _log_memory_event(self, table: dict[str, Any]) -> None:
        """The workers' memory table of an epoch's end to the scheduler's
        event log, under its own topic (the dashboard's per-worker table)."""
        try:
            self._handle.client.log_event(
                MEMORY_TOPIC, {"store": self.store_path, **table}
            )
        except Exception:
            logger.debug("could not log a memory event", exc_info=True)

    def _check_fit_args(
        self,
        data: Any,
        epochs: Any,
        batch_rows: Any,
        validation: Any,
        checkpoint_steps: Any,
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
        if checkpoint_steps is not None and (
            not isinstance(checkpoint_steps, int | np.integer)
            or isinstance(checkpoint_steps, bool)
            or checkpoint_steps < 1
        ):
            raise ValueError(
                f"checkpoint_steps must be a positive integer, got {checkpoint_steps!r}"
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

    def _check_resumable(self, run: Run, data: Dataset, batch_rows: int | None) -> None:
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

    # -- sharded tables (the parameter-server path) ----------------------------
    def _start_sharded_run(
        self, ps: ParamStore, data: Dataset, rng: np.random.Generator
    ) -> Run:
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
        run = Run(
            params=params,
            opt_state=self.optimizer.init(params),
            status="running",
            tables=layouts,
            table_step=0,
        )
        run.dataset = dataset_meta(data)
        self._sharded_engine.init_tables(ps, 0, model, seed, layouts)
        self._commit(ps, run)
        return run

    def _apply_sparse(self, kind: str, X: Any, run: Run) -> Any:
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
        assert run.table_step is not None
        return apply_table_rows(
            model, run.params, self._store_ref, run.table_step, layouts, kind, X
        )

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
        data = self._prepared(data)
        if run.tables:
            assert run.table_step is not None
            assert isinstance(self.model, SparseModel)
            partial = sharded_pass(
                self._sharded_engine,
                self._store_ref,
                self.model,
                data,
                run.params,
                run.table_step,
                run,
                on_nonfinite,
            ).partial
        else:
            # One pass on the cluster (sync point).
            partial = self._engine.run_pass(
                data.ref,
                self.model,
                run.params,
                full_pass(data.chunk_ids, data.chunk_n_rows),
                placement_chunks=data.chunk_ids,
                with_grads=False,
                nonfinite=on_nonfinite,
            ).partial
        return {k: float(v) for k, v in self.model.summarize(partial).items()}

    # -- standardization ----------------------------------------------------------
    def _fit_standardize(self, data: Dataset, on_nonfinite: str) -> Standardize:
        """The standardization statistics of ``data``: one pass on the
        cluster, the chunks' moments summed by the fixed tree."""
        spec = self._standardize
        assert spec is not None
        spec.check_width(data.n_features)
        moments = Moments()
        moments.check_schema(data.schema)
        # The pass sums about a shift in X's dtype (the workers cast it so).
        shift = np.zeros(data.n_features, dtype=np.dtype(data.fields["X"].dtype))
        for _ in range(2):
            # One pass on the cluster (sync point).
            partial = self._engine.run_pass(
                data.ref,
                moments,
                {"shift": shift},
                full_pass(data.chunk_ids, data.chunk_n_rows),
                placement_chunks=data.chunk_ids,
                nonfinite=on_nonfinite,
            ).partial
            mean, std, cancellation = moment_statistics(partial, shift)
            if cancellation <= MAX_CANCELLATION:
                break
            # Data far from zero for their spread: again about their mean.
            shift = mean.astype(shift.dtype)
        logger.info(
            "standardization statistics of %s from %d rows", data.path, partial.n_rows
        )
        return spec.with_statistics(mean, std)

    def _prepared(self, data: Dataset) -> Dataset:
        """``data`` as the model sees it: standardized when the run is."""
        spec = self._standardize
        if spec is None:
            return data
        if spec.mean is None or spec.std is None:
            raise RuntimeError(
                "the standardization statistics are not known yet: call fit() first"
            )
        spec.check_width(data.n_features)
        return data.with_transform("X", shift=spec.mean, scale=spec.std)

    @property
    def standardize(self) -> Standardize | None:
        """The run's standardization (with its statistics once fitted)."""
        if self._standardize is not None and not self._standardize.fitted:
            with contextlib.suppress(RuntimeError):
                self._current_run()
        return self._standardize

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
            X = self._prepared(X).to_dask("X")
        elif self._standardize is not None and isinstance(X, da.Array):
            self._check_width(X.shape[1])
            X = X.rechunk({1: -1}).map_blocks(
                self._standardize.transform,
                dtype=X.dtype if X.dtype.kind == "f" else np.float64,
            )
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
        # The same computation as dasktrain.load_model(store).predict(X).
        n_features = None if self._schema is None else self._schema.n_features
        return apply_dense(
            self.model, params, n_features, kind, X, standardize=self._standardize
        )

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
            f"store={self.store_path!r}; {state}{self._memory_repr()})"
        )

    def _memory_repr(self) -> str:
        """The workers' budgets as last asked, in a few words: the caches'
        total, the worker nearest its limit, and how many did not answer."""
        engine = getattr(self, "_engine", None)
        reports = getattr(engine, "last_memory", None)
        worst = worst_worker(reports) if reports else None
        if not reports or worst is None:
            return ""
        held = sum(r["held"] for r in reports.values()) / 2**20
        room = sum(r["capacity"] for r in reports.values()) / 2**20
        address, peak = worst
        text = (
            f"; worker caches {held:.0f} of {room:.0f} MiB, "
            f"peak RSS {peak:.0%} of the limit on {address}"
        )
        missing = getattr(engine, "last_memory_missing", {})
        silent = sum(1 for status, _ in missing.values() if status == NO_ANSWER_STATUS)
        if silent:
            text += f", {silent} worker(s) not answering"
        return text

    def memory_report(self) -> dict[str, dict[str, Any]]:
        """Each worker's memory budget: its limit and ceiling, what dasktrain
        keeps there (``held``, by consumer in ``held_by``) and may keep
        (``capacity``), RSS now and at peak, evictions and pauses, and the
        chunk and shard caches' lookups since the worker started (``reads_by``).

        Examples
        --------
        >>> report = trainer.memory_report()  # doctest: +SKIP
        >>> {w: r["held"] >> 20 for w, r in report.items()}  # doctest: +SKIP
        {'tcp://127.0.0.1:40411': 180, 'tcp://127.0.0.1:41023': 176}
        """
        # Sync point: one Client.run (paused workers answer too).
        return self._engine.memory_reports()


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


def _check_n_streams(
    n_streams: Any, batch_rows: Any, local_steps: Any, data: Dataset
) -> None:
    if n_streams is None:
        return
    if (
        not isinstance(n_streams, int | np.integer)
        or isinstance(n_streams, bool)
        or n_streams < 1
    ):
        raise ValueError(
            f"n_streams must be a positive integer or None, got {n_streams!r}"
        )
    if batch_rows is None or local_steps is not None:
        raise ValueError(
            "n_streams applies to minibatch steps (batch_rows set, local_steps=None)"
        )
    if n_streams > batch_rows:
        raise ValueError(
            f"n_streams={n_streams} is more than batch_rows={batch_rows}: each "
            f"stream gives a step at least one row"
        )
    n_rows = sum(data.chunk_n_rows(c) for c in data.chunk_ids)
    if n_streams > n_rows:
        raise ValueError(
            f"n_streams={n_streams} is more than the {n_rows} rows of the data"
        )


def _check_nonfinite_policy(on_nonfinite: Any) -> None:
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}"
        )


def _table_segments(run: Run, options: FitOptions) -> bool:
    """Whether a fit of sharded tables runs as segments of ranks that serve
    them: synchronous minibatch steps (``staleness=0``).  Full-batch steps
    and steps in flight keep the per-step path, and so does an epoch that
    per-step path started (its steps depend on that plan)."""
    return (
        options.batch_rows is not None
        and options.staleness == 0
        and not (run.epoch_step != 0 and run.n_streams is None)
    )
