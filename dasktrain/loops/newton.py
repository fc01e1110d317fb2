"""Newton's method for linear models and GLMs over full passes of the engine.

Each iteration (an "epoch" of the run) is a damped Newton step from the
gradient and Hessian sums of one full pass, checked by a backtracking line
search whose rounds are passes too; the first pass of a run may solve every
chunk locally (the one-pass start).  The pure logic is
:class:`~dasktrain.optim.newton.NewtonRun`; this loop runs its passes, builds
the history rows and commits.  The run's optimizer state holds the objective,
gradient, Hessian and next direction at the committed point, so a resumed
run continues with the same bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import numpy as np

from dasktrain._tree import flatten, unflatten
from dasktrain.engine.plan import full_pass
from dasktrain.engine.second_order import SecondOrderEngine, local_value, point_value
from dasktrain.errors import DivergenceError
from dasktrain.loops.base import FitLoop, hit_rate
from dasktrain.models.glm import penalty_vectors
from dasktrain.optim.newton import Newton, NewtonRun, PointValue
from dasktrain.partial import Partial

__all__ = ["NewtonLoop"]


class NewtonLoop(FitLoop):
    """``fit()`` with :class:`~dasktrain.optim.Newton`."""

    def loop(self) -> None:
        run, data, options = self.run, self.data, self.options
        opt = self.optimizer
        assert isinstance(opt, Newton)
        engine = SecondOrderEngine(self.engine)
        pieces = full_pass(data.chunk_ids, data.chunk_n_rows)
        like = run.params
        l2, l1 = penalty_vectors(self.model, data.schema.n_features)
        machine = NewtonRun(opt, run.opt_state, flatten(run.params), l2, l1)
        t0 = time.perf_counter()
        rows_read = 0
        while run.epoch < options.epochs and not self.stop_training:
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
                nonfinite=options.on_nonfinite,
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
                self._check_start(results[0].partial, like, run.step + 1)
            values: list[PointValue] = [point_value(r.partial) for r in results]
            step = machine.observe(values)
            if step is None:
                continue
            res = results[step.point_index]
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
                "cache_hit_rate": hit_rate(res.cache_hits, res.cache_misses),
            }
            # An iteration is an epoch: validate before the run moves on (if
            # that fails, the run stays at the last iteration), move on,
            # commit when due.
            params = unflatten(step.x, like)
            self.validate(row, params)
            self.advance(row, params, machine.state(), True)
            if machine.done:
                run.status = "converged"
            if self.commit_due():
                self.commit()
            if machine.done:
                break
            t0 = time.perf_counter()
            rows_read = 0

    def _check_start(
        self, partial: Partial, like: Mapping[str, np.ndarray], step: int
    ) -> None:
        """The starting point of a Newton run must be finite (trial points
        may not be: the line search shortens the step)."""
        grads = unflatten(np.asarray(partial.grads["grad"]), like)
        hessian = np.asarray(partial.grads["hessian"])
        self.objective(Partial(partial.loss_sum, grads, partial.n_rows), like, step)
        if not np.all(np.isfinite(hessian)):
            raise DivergenceError(
                f"step {step}: the Hessian is not finite at the starting point; "
                f"the store {self.store_path!r} keeps the last good version"
            )
