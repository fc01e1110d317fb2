"""What every fit loop shares: the run's state, the fit's options, and one
protocol for ending a step and checkpointing.

A loop (one module per way of running a fit: :mod:`~dasktrain.loops.full_batch`,
:mod:`~dasktrain.loops.minibatch`, :mod:`~dasktrain.loops.lbfgs`,
:mod:`~dasktrain.loops.tables`) advances the run in its own way and ends every
step (or round, or iteration) the same way:

1. at an epoch's end, validate with the new parameters, before the run moves
   on (if validation fails, the store keeps the last step);
2. :meth:`FitLoop.advance`: the run takes the new state, the history its row,
   epoch callbacks then step callbacks are called, the status is updated;
3. checkpoint when due (:meth:`FitLoop.commit_due`): every
   ``checkpoint_steps`` steps, every ``checkpoint_seconds``, at epoch ends of
   segment loops and when the run ends; and always, on any error or Ctrl-C,
   for the steps done since the last checkpoint (:meth:`FitLoop.fit`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dasktrain.callbacks import Callback
from dasktrain.data import Dataset
from dasktrain.data.io import read_peak_nbytes
from dasktrain.engine.budget import MemoryPlan
from dasktrain.engine.engine import Engine, PassResult
from dasktrain.engine.plan import full_pass
from dasktrain.engine.tasks import chunk_nbytes
from dasktrain.errors import DivergenceError
from dasktrain.history import History
from dasktrain.models.base import Model
from dasktrain.objective import NonFiniteStep, step_objective
from dasktrain.optim import Optimizer
from dasktrain.params import ParamStore
from dasktrain.params.tables import TableLayout
from dasktrain.partial import Partial

if TYPE_CHECKING:
    from dasktrain.trainer import Trainer

logger = logging.getLogger(__name__)

__all__ = ["FitLoop", "FitOptions", "Run", "dataset_meta", "hit_rate"]


@dataclass
class Run:
    """The state a committed version captures."""

    params: dict[str, np.ndarray]
    opt_state: dict[str, np.ndarray]
    step: int = 0  # optimizer steps done in the whole run
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # steps done in the current, incomplete epoch
    batch_rows: int | None = None
    local_steps: int | None = None  # local SGD: local steps per round
    n_streams: int | None = None  # minibatch streams of the run's plan
    status: str = "new"
    history: History = field(default_factory=History)
    callbacks: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    #: sharded tables (empty: every parameter is dense, in ``params``)
    tables: list[TableLayout] = field(default_factory=list)
    #: the version whose tables hold this run's current values
    table_step: int | None = None


@dataclass(frozen=True)
class FitOptions:
    """The options of one ``fit`` call (checked by the trainer)."""

    epochs: int
    batch_rows: int | None
    validation: Dataset | None
    callbacks: Sequence[Callback]
    checkpoint_steps: int | None
    checkpoint_seconds: float
    on_nonfinite: str
    local_steps: int | None = None
    staleness: int = 0
    n_streams: int | None = None


def dataset_meta(data: Dataset) -> dict[str, Any]:
    """What the store records of the dataset a run trains on."""
    return {
        "url": data.path,
        "uuid": data.uuid,
        "n_rows": int(sum(data.chunk_n_rows(c) for c in data.chunk_ids)),
        "chunk_ids": [int(c) for c in data.chunk_ids],
    }


def hit_rate(hits: int, misses: int) -> float:
    total = hits + misses
    return hits / total if total else math.nan


class FitLoop:
    """Base of the fit loops: the shared step-ending and checkpoint protocol.

    Parameters
    ----------
    trainer:
        The trainer (callbacks receive it; its ``stop_training`` flag ends
        the fit).
    ps:
        The parameter store, write-locked by the caller.
    run:
        The run, loaded or freshly initialized.
    data:
        The training dataset.
    options:
        The fit's options.
    engine:
        The engine that runs passes.
    commit:
        Writes ``run`` to ``ps`` as a new committed version.
    log_event:
        Sends a history row to the dashboard page.
    log_memory:
        Sends the workers' memory table of an epoch's end to the dashboard
        page (``{"step", "epoch", "workers"}``; none: not sent).
    """

    def __init__(
        self,
        trainer: Trainer,
        ps: ParamStore,
        run: Run,
        data: Dataset,
        options: FitOptions,
        *,
        engine: Engine,
        commit: Callable[[ParamStore, Run, set[int] | None], None],
        log_event: Callable[[dict[str, Any]], None],
        log_memory: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.trainer = trainer
        self.ps = ps
        self.run = run
        self.data = data
        self.options = options
        self.engine = engine
        self._commit = commit
        self._log_event = log_event
        self._log_memory = log_memory
        self.model: Model = trainer.model
        self.optimizer: Optimizer = trainer.optimizer
        self.seed: int = trainer.seed
        self.store_path: str = trainer.store_path
        self.callbacks = list(options.callbacks)
        self.last_commit = time.monotonic()
        self.committed_step = run.step

    # -- the loop ----------------------------------------------------------------
    def fit(self) -> None:
        """Run the loop; on an error or Ctrl-C, keep the steps done since the
        last checkpoint (``run`` only ever holds checked, finite states).

        A plan that cannot fit in a worker's memory is refused first, before
        any work (:class:`~dasktrain.errors.MemoryBudgetError`)."""
        self.engine.check_memory(self.memory_plan())
        # The per-worker chunk-cache hit rates count from here.
        self.engine.mark_fit_start()
        try:
            self.loop()
        finally:
            if self.run.step > self.committed_step:
                self.commit()

    def loop(self) -> None:
        raise NotImplementedError

    # -- memory ------------------------------------------------------------------
    def held_chunks_per_thread(self) -> int:
        """Decoded chunks a task thread holds besides the one it reads."""
        return 0

    def memory_plan(self) -> MemoryPlan:
        """What each task thread of this fit needs in memory at least."""
        dense = sum(int(a.nbytes) for a in self.run.params.values())
        state = sum(int(a.nbytes) for a in self.run.opt_state.values())
        return MemoryPlan(
            chunk_bytes=chunk_nbytes(self.data.ref, self.model.fields),
            read_bytes=read_peak_nbytes(self.data.ref, self.model.fields),
            held_chunks=self.held_chunks_per_thread(),
            # parameters, gradients and optimizer state, as a rank holds them
            state_bytes=2 * dense + state,
            what=f"training {type(self.model).__name__} on {self.data.path}",
        )

    @property
    def stop_training(self) -> bool:
        return bool(self.trainer.stop_training)

    def steps_per_epoch(self) -> int:
        """For the progress bar: steps (rounds, iterations) of one epoch."""
        return 1

    # -- checkpoints ---------------------------------------------------------------
    def commit(self, *, protect: set[int] | None = None) -> None:
        """Commit the run as a new version (``protect``: versions that steps
        in flight still read, kept even if older than ``keep_versions``)."""
        self._commit(self.ps, self.run, protect)
        self.committed_step = self.run.step
        self.last_commit = time.monotonic()

    def commit_due(self, *, in_flight: bool = False) -> bool:
        """A checkpoint is due: every ``checkpoint_steps`` steps, after
        ``checkpoint_seconds``, and when the run ends (once no step is in
        flight)."""
        every = self.options.checkpoint_steps
        return (
            (self.run.status != "running" and not in_flight)
            or (every is not None and self.run.step % every == 0)
            or time.monotonic() - self.last_commit >= self.options.checkpoint_seconds
        )

    # -- numbers --------------------------------------------------------------------
    def divergence(self, step: int, what: str) -> DivergenceError:
        return DivergenceError(
            f"step {step}: {what}; the store {self.store_path!r} keeps the last "
            f"good version. Lower the learning rate or add gradient clipping."
        )

    def objective(
        self, partial: Partial, params: Mapping[str, np.ndarray], step: int
    ) -> tuple[float, float, dict[str, np.ndarray]]:
        """Mean data loss, objective and objective gradient; raises
        :class:`DivergenceError` on non-finite values."""
        try:
            return step_objective(self.model, partial, params)
        except NonFiniteStep as exc:
            raise self.divergence(step, str(exc)) from None

    def pass_(
        self,
        data: Dataset,
        params: Mapping[str, np.ndarray],
        pieces: Any,
        *,
        with_grads: bool,
    ) -> PassResult:
        """One pass of the engine over ``pieces`` of ``data`` (sync point)."""
        return self.engine.run_pass(
            data.ref,
            self.model,
            params,
            pieces,
            placement_chunks=data.chunk_ids,
            with_grads=with_grads,
            nonfinite=self.options.on_nonfinite,
        )

    # -- ending a step -----------------------------------------------------------------
    def validate(self, row: dict[str, Any], params: Mapping[str, np.ndarray]) -> None:
        """Add ``val_*`` metrics of ``params`` on the validation data to ``row``."""
        validation = self.options.validation
        if validation is None:
            return
        res = self.pass_(
            validation,
            params,
            full_pass(validation.chunk_ids, validation.chunk_n_rows),
            with_grads=False,
        )
        for k, v in self.model.summarize(res.partial).items():
            row[f"val_{k}"] = v

    def epoch_callbacks(self, row: dict[str, Any]) -> None:
        # The workers' memory budgets at the epoch's end (one Client.run):
        # summed up in the row, one line per worker to the dashboard.
        try:
            row.update(self.engine.memory_summary())
            if self._log_memory is not None:
                self._log_memory(
                    {
                        "step": row.get("step"),
                        "epoch": row.get("epoch"),
                        "workers": self.engine.memory_table(),
                    }
                )
        except Exception as exc:  # a worker leaving must not fail the epoch
            logger.debug("no memory summary at the epoch's end: %r", exc)
        try:
            for cb in self.callbacks:
                cb.on_epoch_end(self.trainer, row)
        finally:
            # Saved with the next commit, even if a callback raised.
            self.run.callbacks = {
                type(cb).__name__: cb.state_dict()
                for cb in self.callbacks
                if cb.state_dict()
            }

    def log_row(self, row: dict[str, Any], *, event: bool = True) -> None:
        """Report a step already appended to the history: a dashboard event
        (unless the ranks sent it already), then the callbacks'
        ``on_step_end``."""
        if event:
            self._log_event(row)
        for cb in self.callbacks:
            cb.on_step_end(self.trainer, row)

    def update_status(self) -> None:
        run = self.run
        if run.epoch >= self.options.epochs:
            run.status = "finished"
        elif self.stop_training:
            run.status = "stopped"

    def advance(
        self,
        row: dict[str, Any],
        params: dict[str, np.ndarray],
        opt_state: dict[str, np.ndarray],
        end_of_epoch: bool,
    ) -> None:
        """Move the run on by one step.  It gets its history row even if a
        callback raises (a consistent run to commit)."""
        run = self.run
        run.params, run.opt_state = params, opt_state
        run.step += 1
        run.epoch_step += 1
        if end_of_epoch:
            run.epoch += 1
            run.epoch_step = 0
        try:
            if end_of_epoch:
                self.epoch_callbacks(row)
        finally:
            run.history.append(row)
        self.log_row(row)
        self.update_status()

    def close_step(
        self,
        row: dict[str, Any],
        params: dict[str, np.ndarray],
        opt_state: dict[str, np.ndarray],
        *,
        end_of_epoch: bool,
    ) -> bool:
        """End a checked step: validate at an epoch's end, move the run on,
        commit when due.  Returns whether it committed."""
        if end_of_epoch:
            # Validate before the run moves on: if this fails, the run (and
            # what the store gets) stays at the last step.
            self.validate(row, params)
        self.advance(row, params, opt_state, end_of_epoch)
        # Checkpoint: a new version, then one metadata write.
        if self.commit_due():
            self.commit()
            return True
        return False

    def step_row(
        self,
        partial: Partial,
        *,
        loss: float,
        objective: float,
        grad_norm: float,
        learning_rate: float,
        seconds: float,
        cache_hit_rate: float,
        **extra: Any,
    ) -> dict[str, Any]:
        """The history row of the step that follows the run's last one."""
        n = partial.n_rows
        return {
            "step": self.run.step + 1,
            "epoch": self.run.epoch + 1,
            "loss": loss,
            "objective": objective,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "rows": n,
            "rows_per_s": n / seconds if seconds > 0 else math.nan,
            "seconds": seconds,
            **{
                f"train_{k}": v
                for k, v in self.model.summarize(partial).items()
                if k != "loss"
            },
            "cache_hit_rate": cache_hit_rate,
            **extra,
        }
