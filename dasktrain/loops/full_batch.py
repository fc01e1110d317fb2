"""Full-batch steps of SGD-family optimizers: one pass over the data per
step, through the engine's task-per-worker-thread passes.

A full-batch step reads every chunk, so the scheduler's few milliseconds per
pass are small next to the pass itself; such steps keep the pass engine
(measured in ``benchmarks/step_engine.py``), and each step is a checkpoint
candidate like any other.
"""

from __future__ import annotations

import time

import numpy as np

from dasktrain._tree import global_norm
from dasktrain.engine.plan import full_pass
from dasktrain.loops.base import FitLoop, hit_rate
from dasktrain.objective import all_finite
from dasktrain.optim import apply_updates

__all__ = ["FullBatchLoop"]


class FullBatchLoop(FitLoop):
    """``fit(batch_rows=None)`` with SGD, Adam, AdamW or Adagrad."""

    def loop(self) -> None:
        run = self.run
        pieces = full_pass(self.data.chunk_ids, self.data.chunk_n_rows)
        while run.epoch < self.options.epochs and not self.stop_training:
            t0 = time.perf_counter()
            # Gradients: one pass over the data on the cluster (sync point).
            res = self.pass_(self.data, run.params, pieces, with_grads=True)
            loss, objective, grads = self.objective(
                res.partial, run.params, run.step + 1
            )
            # Update: the optimizer on the client (one step per pass).
            with np.errstate(over="ignore", invalid="ignore"):
                updates, opt_state = self.optimizer.update(
                    grads, run.opt_state, run.params
                )
                params = apply_updates(run.params, updates)
            if not all_finite(params):
                raise self.divergence(
                    run.step + 1, "the update made parameters non-finite"
                )
            row = self.step_row(
                res.partial,
                loss=loss,
                objective=objective,
                grad_norm=global_norm(grads),
                learning_rate=self.optimizer.learning_rate_at(run.step),
                seconds=time.perf_counter() - t0,
                cache_hit_rate=hit_rate(res.cache_hits, res.cache_misses),
            )
            self.close_step(row, params, opt_state, end_of_epoch=True)
