"""L-BFGS (and OWL-QN for L1 penalties) over full passes of the engine.

Each iteration (an "epoch" of the run) is a direction from the stored
curvature pairs and a strong-Wolfe line search whose every round is one full
pass over the data, possibly at several step sizes at once
(:meth:`~dasktrain.engine.engine.Engine.run_pass_many`).  A pass reads every
chunk, so the scheduler's cost per pass is small next to it: these passes
stay on the engine's task-per-worker-thread path.  Every iteration is a
checkpoint candidate.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import numpy as np

from dasktrain._tree import flatten, unflatten
from dasktrain.engine.engine import PassResult
from dasktrain.engine.plan import full_pass
from dasktrain.errors import DivergenceError
from dasktrain.loops.base import FitLoop, hit_rate
from dasktrain.optim import LBFGS
from dasktrain.optim.lbfgs import OrthantSearch, WolfeLineSearch, pseudo_gradient

logger = logging.getLogger(__name__)

__all__ = ["LBFGSLoop"]


class LBFGSLoop(FitLoop):
    """``fit()`` with :class:`~dasktrain.optim.LBFGS`."""

    def loop(self) -> None:
        """L-BFGS: each iteration (an "epoch" of the run) is a direction from
        the stored curvature pairs and a strong-Wolfe line search whose every
        round is one full pass over the data.  With an L1 penalty, OWL-QN: the
        pairs and trial gradients describe the smooth part of the objective,
        the direction follows the pseudo-gradient and trial points stay in
        its orthant (see :class:`~dasktrain.optim.lbfgs.OrthantSearch`)."""
        run, data = self.run, self.data
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
            res = self.pass_(data, params, pieces, with_grads=True)
            loss, objective, grads = self.objective(res.partial, params, run.step + 1)
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
            results = self.engine.run_pass_many(
                data.ref,
                self.model,
                params_list,
                pieces,
                placement_chunks=data.chunk_ids,
                nonfinite=self.options.on_nonfinite,
            )
            out: list[_Trial] = []
            for x, params, res in zip(xs, params_list, results, strict=True):
                try:
                    loss, objective, grads = self.objective(
                        res.partial, params, run.step + 1
                    )
                except DivergenceError:
                    out.append(_nonfinite_trial(x))
                    continue
                out.append((x, loss, objective, smooth(x, flatten(grads)), res))
            return out

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
        while run.epoch < self.options.epochs and not self.stop_training:
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
                    np.linalg.norm(pseudo_gradient(x_new, g_new, l1) if owl else g_new)
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
                "cache_hit_rate": hit_rate(res.cache_hits, res.cache_misses),
            }
            # Validate before the run moves on (see FitLoop.close_step).
            self.validate(row, new_params)
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
                self.epoch_callbacks(row)
            finally:
                run.history.append(row)
            self.log_row(row)
            if opt.converged(f, g) or stalled:
                run.status = "converged"
            elif run.epoch >= self.options.epochs:
                run.status = "finished"
            elif self.stop_training:
                run.status = "stopped"
            if self.commit_due():
                self.commit()
            if run.status == "converged":
                break


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
