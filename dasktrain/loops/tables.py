"""Steps of models with sharded tables (the parameter-server path).

Each step writes a new version of the store: workers write the shards the
step changed, the others are shared with the previous version; a checkpoint
commits such a version, and versions no longer needed are dropped unless
they are kept committed ones.  With ``staleness = k``, up to ``k + 1`` steps
are in flight (see :meth:`dasktrain.Trainer.fit`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from dasktrain._tree import global_norm
from dasktrain.data import Dataset
from dasktrain.engine.plan import epoch_steps, full_pass
from dasktrain.engine.sharded import ShardedEngine, ShardedPassResult, StepHandle
from dasktrain.loops.base import FitLoop, Run, hit_rate
from dasktrain.models.sparse import SparseModel
from dasktrain.objective import all_finite
from dasktrain.optim import apply_updates
from dasktrain.params.tables import ParamStoreRef

__all__ = ["TablesLoop", "global_state", "sharded_pass"]


def global_state(run: Run) -> dict[str, np.ndarray]:
    """Optimizer state not tied to a parameter (e.g. step counts)."""
    return {
        k: v
        for k, v in run.opt_state.items()
        if not any(k.endswith("." + name) for name in run.params)
    }


def sharded_pass(
    engine: ShardedEngine,
    store: ParamStoreRef,
    model: SparseModel,
    data: Dataset,
    params: Mapping[str, np.ndarray],
    step: int,
    run: Run,
    on_nonfinite: str,
) -> ShardedPassResult:
    """A full pass of a model whose tables are those of version ``step``."""
    return engine.run_pass(
        store,
        step,
        data.ref,
        model,
        params,
        run.tables,
        full_pass(data.chunk_ids, data.chunk_n_rows),
        placement_chunks=data.chunk_ids,
        nonfinite=on_nonfinite,
    )


class TablesLoop(FitLoop):
    """``fit()`` of a model with sharded tables."""

    def __init__(
        self,
        *args: Any,
        sharded: ShardedEngine,
        store_ref: ParamStoreRef,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sharded = sharded
        self.store_ref = store_ref

    def steps_per_epoch(self) -> int:
        if self.options.batch_rows is None:
            return 1
        return len(
            epoch_steps(
                self.data.chunk_ids,
                self.data.chunk_n_rows,
                batch_rows=self.options.batch_rows,
                seed=0,
                epoch=0,
            )
        )

    def loop(self) -> None:
        model = self.model
        assert isinstance(model, SparseModel)
        run, data, ps, engine = self.run, self.data, self.ps, self.sharded
        staleness = self.options.staleness
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
            handle, _ = pending.pop(0)
            res = engine.finish_step(handle)
            readers[handle.read_step] -= 1
            step = handle.write_step
            loss, objective, grads = self.objective(res.partial, run.params, step)
            with np.errstate(over="ignore", invalid="ignore"):
                updates, opt_state = self.optimizer.update(
                    grads, run.opt_state, run.params
                )
                params = apply_updates(run.params, updates)
            if not all_finite(params):
                raise self.divergence(step, "the update made parameters non-finite")
            row = self.step_row(
                res.partial,
                loss=loss,
                objective=objective,
                grad_norm=global_norm(grads),
                learning_rate=self.optimizer.learning_rate_at(run.step),
                seconds=time.perf_counter() - handle.t0,
                cache_hit_rate=hit_rate(res.cache_hits, res.cache_misses),
                **res.stats.to_row(),
            )
            end_of_epoch = run.epoch_step + 1 == plan_len
            validation = self.options.validation
            if end_of_epoch and validation is not None:
                val = sharded_pass(
                    engine,
                    self.store_ref,
                    model,
                    validation,
                    params,
                    step,
                    run,
                    self.options.on_nonfinite,
                )
                for k, v in model.summarize(val.partial).items():
                    row[f"val_{k}"] = v
            run.table_step = step
            self.advance(row, params, opt_state, end_of_epoch)
            if self.commit_due(in_flight=bool(pending)):
                self.commit(protect={h.read_step for h, _ in pending})
            drop_unused_versions()

        try:
            while run.epoch < self.options.epochs and not self.stop_training:
                plan = epoch_steps(
                    data.chunk_ids,
                    data.chunk_n_rows,
                    batch_rows=self.options.batch_rows,
                    seed=self.seed,
                    epoch=run.epoch,
                )
                for pieces in plan[run.epoch_step + len(pending) :]:
                    if self.stop_training:
                        break
                    assert run.table_step is not None
                    # Optimizer counters before this step: those of the last
                    # finished step, advanced by the steps still in flight.
                    gstate = pending[-1][1] if pending else global_state(run)
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
                        nonfinite=self.options.on_nonfinite,
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
                # every step that finished (committed by FitLoop.fit).
                engine.cancel([h for h, _ in pending])
                for h, _ in pending:
                    with contextlib.suppress(Exception):
                        ps.discard_version(h.write_step)
                pending.clear()
