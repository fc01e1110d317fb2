r"""Newton's method for GLMs over full passes, as pure building blocks.

Each pass over the data returns sums of the data loss, its gradient and its
Hessian at one or a few points (see :mod:`dasktrain.models.glm`); everything
here runs on the client, on flat float64 vectors of ``P`` coefficients and
``P x P`` matrices, and knows nothing of the data or the cluster.

The objective is :math:`F(x) = L(x) + \sum_j \frac{l2_j}{2} x_j^2 + \sum_j
l1_j |x_j|`, with :math:`L` the mean data loss.  An iteration at the current
point :math:`x` (with :math:`F`, the smooth gradient :math:`g = \nabla L +
l2 \odot x` and a data Hessian :math:`H`):

1. **Step.**  With :math:`Q = H + \operatorname{diag}(l2)`, its clipped
   diagonal :math:`D` and a damping :math:`\mu \ge 0` (Levenberg-Marquardt),
   the trial :math:`x + p` minimizes the model

   .. math::

      g^\top p + \tfrac12 p^\top (Q + \mu D) p + \textstyle\sum_j l1_j |x_j + p_j|,

   by a Cholesky solve of the Jacobi-scaled system (no L1), or by coordinate
   descent (L1: a proximal Newton step, which sets coefficients exactly to
   zero).  :math:`\Delta = F(x) - m(x + p)` is the decrease the model
   predicts (without the damping term).
2. **Line search.**  A pass evaluates :math:`F(x + \alpha p)` at
   :math:`\alpha = 1` first, with the Hessian there if it is due; if that is
   not a sufficient decrease (:math:`F \le F(x) - c_1 \alpha \Delta`), the
   next passes try three steps at once, :math:`4^{-1}, 4^{-2}, 4^{-3}`, then
   :math:`4^{-4} ...`, and the lowest sufficient one is taken.  A Hessian
   that is due is computed at the longest step of each pass.
3. **Update.**  The damping shrinks after a full step that the model
   predicted well (ratio :math:`\rho > 3/4`) and grows otherwise.  The new
   point keeps its Hessian if one was computed there, else the previous
   one; the next trial computes a fresh Hessian unless the step shrank the
   gradient by at least ``keep_hessian_below`` (then the current Hessian is
   good enough and the next pass costs a gradient only).

Convergence: :math:`\max_j |pg_j| \le \mathrm{tol} \max(1, |F|)` with the
pseudo-gradient :math:`pg` (:func:`~dasktrain.optim.lbfgs.pseudo_gradient`:
the gradient plus the one-sided derivative of the L1 term), a relative decrease
of at most ``ftol``, or a predicted decrease :math:`\Delta` of at most
``ftol * max(1, |F|)`` (nothing left to gain at this precision).

**One-pass start.**  With ``local_iterations = k > 0`` the first pass is a
*local* pass: every piece of data (a chunk) runs ``k`` Newton steps on its
own rows (on growing row subsets), from the starting point, minimizing its
own mean loss plus the penalty (:func:`local_newton_solve`), and returns,
besides the loss at the starting point, the quadratic model of its loss sum
around where it ended, :math:`\tfrac12 w^\top H_c w - (H_c w_c -
G_c)^\top w + const`.  The fixed tree sums these models; the first trial
minimizes their sum plus the penalty.  Each chunk's solution lies near the
optimum, so this lands close to it after one pass, like ADMM's or local
SGD's first round, but the models weight each chunk by its curvature
instead of averaging, and their gradients correct what the chunks did not
solve.  If that trial is not a decrease, a plain first pass follows.

:class:`NewtonRun` is the state machine a driver (the trainer, or
:func:`minimize_newton` for a local function) feeds with pass results.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from dasktrain.optim.base import Optimizer, OptState, Params, register
from dasktrain.optim.lbfgs import DEFAULT_FTOL, pseudo_gradient
from dasktrain.optim.schedules import (
    _check_int,
    _check_nonnegative,
    _check_real,
)

__all__ = [
    "LOCAL_MIN_ROWS_PER_COEF",
    "MAX_HESSIAN_PARAMS",
    "LocalSolve",
    "LocalValue",
    "Newton",
    "NewtonRun",
    "NewtonStep",
    "PassRequest",
    "PointValue",
    "damped_solve",
    "local_newton_solve",
    "minimize_l1_quadratic",
    "minimize_newton",
    "newton_step",
]

logger = logging.getLogger(__name__)

#: Largest number of coefficients with a dense Hessian: its ``P x P``
#: float64 matrix (128 MiB at this size) travels from every task and is kept
#: in the parameter store.
MAX_HESSIAN_PARAMS = 4096
#: Diagonal entries of ``Q`` below this fraction of the largest are raised
#: to it before scaling (a dead feature must not divide by zero).
DIAG_FLOOR = 1e-12
#: The smallest damping tried when a Cholesky factorization fails, and the
#: factor it grows by until one succeeds (up to :data:`MAX_DAMPING`).
SOLVE_DAMPING_FLOOR = 1e-10
SOLVE_DAMPING_GROWTH = 10.0
#: Damping (relative to the scaled diagonal, which is 1) beyond which the
#: step is plain scaled gradient descent: no larger value is used.
MAX_DAMPING = 1e12
#: Damping after an unsuccessful step starts at least here, grows by
#: ``DAMPING_UP`` and shrinks by ``DAMPING_DOWN``; below
#: ``DAMPING_ZERO`` it is set to zero (a pure Newton step).
MIN_DAMPING = 1e-4
DAMPING_UP = 4.0
DAMPING_DOWN = 1.0 / 3.0
DAMPING_ZERO = 1e-8
#: Ratios of actual to predicted decrease: above ``GOOD_RATIO`` a full step
#: earns less damping, below ``POOR_RATIO`` more.
GOOD_RATIO = 0.75
POOR_RATIO = 0.25
#: Step factor of the line search, and trial steps per pass after the first.
BACKTRACK = 0.25
BACKTRACK_CANDIDATES = 3
#: Coordinate descent (L1 steps): at most this many sweeps; it stops when no
#: coordinate moves by more than ``CD_TOL`` in the scaled norm (relative to
#: the scaled size of the solution).
CD_MAX_SWEEPS = 500
CD_TOL = 1e-12
#: Local solves: backtracking halvings per local step; a piece with fewer
#: rows than this many per coefficient does not solve its own problem (its
#: solution would fit its rows' noise), and the row subsets of the local
#: steps are never smaller.
LOCAL_MAX_HALVINGS = 30
LOCAL_MIN_ROWS_PER_COEF = 4
#: Default rows of each piece used by the first local step (doubled for
#: every further step).
DEFAULT_LOCAL_ROWS = 1_024
#: Default rows per piece for Hessians (an evenly strided subset, scaled).
DEFAULT_HESSIAN_ROWS = 4_096
#: Default Newton steps per chunk in the one-pass start.
DEFAULT_LOCAL_ITERATIONS = 5
#: Default: keep the Hessian for the next step when a step shrank the
#: gradient by at least this factor.
DEFAULT_KEEP_HESSIAN_BELOW = 0.1


# -- linear algebra --------------------------------------------------------------
def _jacobi_scale(Q: np.ndarray) -> np.ndarray:
    """``1 / sqrt(diag)`` with the diagonal clipped at ``DIAG_FLOOR`` times
    its largest entry (all ones for a zero or non-positive diagonal)."""
    diag = np.diag(Q).astype(np.float64, copy=True)
    top = float(np.max(diag)) if diag.size else 0.0
    if not top > 0.0 or not math.isfinite(top):
        return np.ones_like(diag)
    return 1.0 / np.sqrt(np.maximum(diag, DIAG_FLOOR * top))


def damped_solve(Q: np.ndarray, rhs: np.ndarray, damping: float = 0.0) -> np.ndarray:
    r"""Solve :math:`(Q + \mu D) p = r` for symmetric positive semi-definite
    ``Q``, with :math:`D` its (clipped) diagonal.

    The system is scaled to a unit diagonal first, so ``damping`` is
    relative and the solve does not depend on the scales of the features.
    If the Cholesky factorization fails (``Q`` singular or, by rounding,
    slightly indefinite), the damping is raised from
    :data:`SOLVE_DAMPING_FLOOR` by factors of 10 until it succeeds; nothing
    is ever divided by zero.

    Examples
    --------
    >>> import numpy as np
    >>> damped_solve(np.diag([4.0, 1e-6]), np.array([4.0, 1e-6]))
    array([1., 1.])
    >>> damped_solve(np.zeros((2, 2)), np.array([1.0, 0.0]))  # singular: damped
    array([1.e+10, 0.e+00])
    """
    Q = np.asarray(Q, dtype=np.float64)
    rhs = np.asarray(rhs, dtype=np.float64)
    s = _jacobi_scale(Q)
    scaled = Q * s[:, None] * s[None, :]
    b = rhs * s
    mu = float(damping)
    eye = np.eye(Q.shape[0])
    while True:
        system = scaled + mu * eye
        try:
            if not np.all(np.isfinite(system)):
                raise np.linalg.LinAlgError("non-finite system")
            np.linalg.cholesky(system)
            p = np.linalg.solve(system, b)
            if np.all(np.isfinite(p)):
                return s * p
        except np.linalg.LinAlgError:
            pass
        if mu >= MAX_DAMPING:
            # Nothing factorizes: a (scaled) gradient step.
            return s * (b / MAX_DAMPING)
        mu = max(mu * SOLVE_DAMPING_GROWTH, SOLVE_DAMPING_FLOOR)


def minimize_l1_quadratic(
    Q: np.ndarray,
    c: np.ndarray,
    l1: np.ndarray,
    start: np.ndarray,
    *,
    max_sweeps: int = CD_MAX_SWEEPS,
    tol: float = CD_TOL,
) -> np.ndarray:
    r"""Minimize :math:`\tfrac12 w^\top Q w + c^\top w + \sum_j l1_j |w_j|` by
    cyclic coordinate descent from ``start``.

    Each coordinate update is exact (a soft threshold), so coefficients
    become exactly zero; a coordinate with no curvature gets the floored
    diagonal of :func:`damped_solve`.

    Examples
    --------
    >>> import numpy as np
    >>> Q, c = np.eye(2), np.array([-3.0, -0.5])
    >>> minimize_l1_quadratic(Q, c, np.array([1.0, 1.0]), np.zeros(2))
    array([2., 0.])
    """
    Q = np.asarray(Q, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    l1 = np.asarray(l1, dtype=np.float64)
    w = np.array(start, dtype=np.float64)
    s = _jacobi_scale(Q)
    diag = 1.0 / (s * s)
    u = Q @ w  # Q w, kept up to date
    for sweep in range(max_sweeps):
        biggest = 0.0
        for j in range(w.size):
            qjj = diag[j]
            # The derivative of the smooth part without coordinate j's own
            # contribution.
            gj = u[j] + c[j] - Q[j, j] * w[j]
            if gj > l1[j]:
                new = -(gj - l1[j]) / qjj
            elif gj < -l1[j]:
                new = -(gj + l1[j]) / qjj
            else:
                new = 0.0
            delta = new - w[j]
            if delta != 0.0:
                u += delta * Q[:, j]
                w[j] = new
                biggest = max(biggest, abs(delta) / s[j])
        size = float(np.max(np.abs(w) / s)) if w.size else 0.0
        if biggest <= tol * max(1.0, size):
            logger.debug("coordinate descent: %d sweeps", sweep + 1)
            break
    return w


def _model_value(
    g: np.ndarray, Q: np.ndarray, p: np.ndarray, l1: np.ndarray, x: np.ndarray
) -> float:
    """Change of the model ``g.p + p.Q.p / 2 + l1.|x + p| - l1.|x|``."""
    change = float(g @ p + 0.5 * p @ (Q @ p))
    if np.any(l1 > 0.0):
        change += float(l1 @ np.abs(x + p) - l1 @ np.abs(x))
    return change


def newton_step(
    x: np.ndarray,
    g: np.ndarray,
    H: np.ndarray,
    l2: np.ndarray,
    l1: np.ndarray,
    damping: float = 0.0,
) -> tuple[np.ndarray, float]:
    r"""The damped (proximal) Newton step ``p`` at ``x`` and the decrease
    :math:`\Delta` the model predicts for it (see the module docs).

    ``g`` is the gradient of the smooth part (data loss and L2 term), ``H``
    the data Hessian; ``l2`` and ``l1`` hold per-coefficient strengths.

    Examples
    --------
    >>> import numpy as np
    >>> x, g, H = np.zeros(2), np.array([-2.0, -1.0]), np.diag([2.0, 1.0])
    >>> p, decrease = newton_step(x, g, H, np.zeros(2), np.zeros(2))
    >>> p, decrease
    (array([1., 1.]), 1.5)
    >>> newton_step(x, g, H, np.zeros(2), np.array([0.0, 2.0]))[0]  # L1 zeroes
    array([1., 0.])
    """
    Q = np.asarray(H, dtype=np.float64) + np.diag(l2)
    if np.any(l1 > 0.0):
        s = _jacobi_scale(Q)
        damped = Q + np.diag(damping / (s * s)) if damping > 0.0 else Q
        # Minimize over w = x + p: g.(w - x) + (w - x).Q.(w - x) / 2 + l1.|w|.
        w = minimize_l1_quadratic(damped, g - damped @ x, l1, x)
        p = w - x
    else:
        p = damped_solve(Q, -g, damping)
    return p, -_model_value(g, Q, p, l1, x)


# -- what passes return ------------------------------------------------------------
class PointValue(NamedTuple):
    """What a pass gives at one point: the mean data loss, the mean gradient
    of the data loss and, if asked for, its mean Hessian (flat float64)."""

    loss: float
    grad: np.ndarray
    hessian: np.ndarray | None


class LocalValue(NamedTuple):
    """What a local pass gives: the mean data loss at the starting point and
    the sum of the chunks' local quadratic models of the data loss, as means
    over rows: ``w.A.w / 2 - r.w + c0``."""

    start_loss: float
    model_hessian: np.ndarray
    model_linear: np.ndarray
    model_constant: float


class PassRequest(NamedTuple):
    """A pass a driver must run: the data loss and gradient at ``points``;
    the Hessian at ``points[hessian_index]`` (``None``: nowhere); with
    ``local``, a local pass from ``points[0]`` (its answer is a
    :class:`LocalValue`)."""

    points: list[np.ndarray]
    hessian_index: int | None
    local: bool


class NewtonStep(NamedTuple):
    """A completed iteration: the new point and what was measured there."""

    x: np.ndarray
    objective: float
    loss: float
    grad_norm: float
    alpha: float
    damping: float
    passes: int
    evals: int
    #: index of the accepted point in the last pass's points
    point_index: int


# -- the optimizer ---------------------------------------------------------------
@register
class Newton(Optimizer):
    r"""Damped (proximal) Newton for GLMs, with a one-pass start.

    Each pass over the data returns the gradient and the Hessian of the mean
    data loss (a ``P x P`` matrix for ``P`` coefficients, accumulated in
    float64 through the fixed reduction tree); the client takes a
    Levenberg-Marquardt damped Newton step (L2, or a proximal Newton step by
    coordinate descent with an L1 penalty) checked by a backtracking line
    search.  The first pass solves each chunk locally and combines the
    chunks' quadratic models (see :mod:`dasktrain.optim.newton`).  An
    "epoch" of a Newton run is one iteration.

    For :class:`~dasktrain.models.LinearRegression`,
    :class:`~dasktrain.models.LogisticRegression`,
    :class:`~dasktrain.models.SoftmaxRegression`,
    :class:`~dasktrain.models.PoissonRegression` and
    :class:`~dasktrain.models.GammaRegression` with up to
    :data:`MAX_HESSIAN_PARAMS` coefficients, full batch only.

    Parameters
    ----------
    tol : float
        Gradient tolerance: stop when ``max|pg| <= tol * max(1, |f|)``.
    ftol : float
        Relative decrease (achieved, or predicted by the model) below which
        the run has converged.
    max_line_search : int
        Passes per iteration before giving up (the run has then converged
        to the precision of the data).
    local_iterations : int
        Newton steps each chunk takes on its own rows in the first pass;
        0 makes the first pass an ordinary one at the starting point.
    local_rows : int
        Rows of a chunk (an evenly strided subset) used by its first local
        step; each further step doubles them.
    hessian_rows : int or None
        Rows per piece of data used for Hessians (an evenly strided subset,
        scaled to the piece's rows); ``None``: every row.
    keep_hessian_below : float
        After a step that shrank the gradient norm by at least this factor,
        the next pass skips the Hessian and the current one is used again;
        0 computes a Hessian in every pass.
    c1 : float
        Sufficient-decrease constant of the line search, in ``(0, 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.optim import Newton
    >>> from dasktrain.optim.newton import minimize_newton
    >>> A = np.array([[3.0, 1.0], [1.0, 2.0]])
    >>> def fun(x, hessian):  # a quadratic: one Newton step solves it
    ...     return float(0.5 * x @ A @ x - x.sum()), A @ x - 1.0, A
    >>> res = minimize_newton(fun, np.zeros(2), optimizer=Newton(), max_iter=10)
    >>> np.round(res.x, 6), res.n_iter
    (array([0.2, 0.4]), 1)
    """

    kind: ClassVar[str] = "Newton"
    full_batch_only: ClassVar[bool] = True

    def __init__(
        self,
        *,
        tol: float = 1e-6,
        ftol: float = DEFAULT_FTOL,
        max_line_search: int = 10,
        local_iterations: int = DEFAULT_LOCAL_ITERATIONS,
        local_rows: int = DEFAULT_LOCAL_ROWS,
        hessian_rows: int | None = DEFAULT_HESSIAN_ROWS,
        keep_hessian_below: float = DEFAULT_KEEP_HESSIAN_BELOW,
        c1: float = 1e-4,
    ) -> None:
        self.tol = _check_nonnegative("tol", tol)
        self.ftol = _check_nonnegative("ftol", ftol)
        self.max_line_search = _check_int("max_line_search", max_line_search, minimum=1)
        self.local_iterations = _check_int(
            "local_iterations", local_iterations, minimum=0
        )
        self.local_rows = _check_int("local_rows", local_rows, minimum=1)
        if hessian_rows is not None:
            hessian_rows = _check_int("hessian_rows", hessian_rows, minimum=1)
        self.hessian_rows = hessian_rows
        keep = _check_real("keep_hessian_below", keep_hessian_below)
        if not 0.0 <= keep < 1.0:
            raise ValueError(f"keep_hessian_below must be in [0, 1), got {keep}")
        self.keep_hessian_below = keep
        c1 = _check_real("c1", c1)
        if not 0.0 < c1 < 1.0:
            raise ValueError(f"c1 must be in (0, 1), got {c1}")
        self.c1 = c1

    def config(self) -> dict[str, Any]:
        """JSON data; ``optimizer_from_config(opt.config()) == opt``."""
        return {
            "type": self.kind,
            "tol": self.tol,
            "ftol": self.ftol,
            "max_line_search": self.max_line_search,
            "local_iterations": self.local_iterations,
            "local_rows": self.local_rows,
            "hessian_rows": self.hessian_rows,
            "keep_hessian_below": self.keep_hessian_below,
            "c1": self.c1,
        }

    # -- state ----------------------------------------------------------------
    def init(self, params: Mapping[str, np.ndarray]) -> OptState:
        """The state before the first pass, for ``params`` (flattened as by
        ``_tree.flatten``)."""
        n_params = sum(int(np.size(v)) for v in params.values())
        return self.init_state(n_params)

    def init_state(self, n_params: int) -> OptState:
        """The state before the first pass, for ``n_params`` coefficients.

        Returns
        -------
        dict
            ``"started"`` (int64 0-d: whether the point below was
            evaluated), ``"count"`` (iterations done), ``"objective"``,
            ``"grad"`` (smooth gradient) and ``"hessian"`` (data Hessian) at
            the current point, ``"damping"``, and the next trial:
            ``"direction"``, ``"decrease"`` (predicted) and
            ``"hessian_due"`` (int64: compute the Hessian there).
        """
        n_params = _check_int("n_params", n_params, minimum=0)
        if n_params > MAX_HESSIAN_PARAMS:
            raise ValueError(
                f"Newton keeps a dense {n_params} x {n_params} Hessian; it "
                f"supports up to {MAX_HESSIAN_PARAMS} coefficients: use LBFGS"
            )
        return {
            "started": np.zeros((), dtype=np.int64),
            "count": np.zeros((), dtype=np.int64),
            "objective": np.asarray(math.nan),
            "grad": np.zeros(n_params),
            "hessian": np.zeros((n_params, n_params)),
            "damping": np.zeros(()),
            "direction": np.zeros(n_params),
            "decrease": np.zeros(()),
            "hessian_due": np.ones((), dtype=np.int64),
        }

    def converged(self, f: float, pg: np.ndarray) -> bool:
        """``max|pg| <= tol * max(1, |f|)``."""
        pg = np.asarray(pg, dtype=np.float64)
        if pg.size == 0:
            return True
        return float(np.max(np.abs(pg))) <= self.tol * max(1.0, abs(float(f)))

    def negligible(self, f_prev: float, decrease: float) -> bool:
        """A decrease (achieved or predicted) of at most ``ftol`` relative
        to the objective: nothing left to gain at this precision."""
        return decrease <= self.ftol * max(abs(float(f_prev)), 1.0)

    def update(
        self,
        grads: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        params: Mapping[str, np.ndarray],
    ) -> tuple[Params, OptState]:
        """Not available: Newton is not a per-step optimizer."""
        raise TypeError(
            "Newton has no per-step update(): it needs full-batch training, "
            "where the trainer drives it with full passes "
            "(Trainer.fit(..., batch_rows=None)); for a local function use "
            "dasktrain.optim.newton.minimize_newton"
        )


def _finite(f: float, value: PointValue) -> bool:
    """A trial is usable: finite objective, gradient and (if any) Hessian."""
    return (
        math.isfinite(f)
        and bool(np.all(np.isfinite(value.grad)))
        and (value.hessian is None or bool(np.all(np.isfinite(value.hessian))))
    )


def _check_vector(name: str, value: np.ndarray | float, n: int) -> np.ndarray:
    out = np.array(np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)))
    if not np.all(np.isfinite(out)) or np.any(out < 0.0):
        raise ValueError(f"{name} strengths must be finite and >= 0")
    return out


class NewtonRun:
    """The iterations of :class:`Newton` from a committed state, driven by
    the caller: ask :meth:`request` for the next pass, run it, give its
    results to :meth:`observe`; an accepted iteration comes back as a
    :class:`NewtonStep` (then :meth:`state` is what to commit).  Pure: the
    same results give the same bits.

    Parameters
    ----------
    optimizer : Newton
    state : dict
        From :meth:`Newton.init` or a committed :meth:`state`.
    x : ndarray
        The current point (flat float64).
    l2, l1 : ndarray or float
        Per-coefficient penalty strengths (0 for intercepts).
    """

    def __init__(
        self,
        optimizer: Newton,
        state: Mapping[str, np.ndarray],
        x: np.ndarray,
        l2: np.ndarray | float,
        l1: np.ndarray | float,
    ) -> None:
        self.opt = optimizer
        self.x = np.array(x, dtype=np.float64).ravel()
        n = self.x.size
        self.l2 = _check_vector("l2", l2, n)
        self.l1 = _check_vector("l1", l1, n)
        self._owl = bool(np.any(self.l1 > 0.0))
        self._state = {k: np.array(v, copy=True) for k, v in state.items()}
        self.started = bool(int(self._state["started"]))
        self.f = float(self._state["objective"])
        self.g = np.asarray(self._state["grad"], dtype=np.float64)
        self.H = np.asarray(self._state["hessian"], dtype=np.float64)
        self.damping = float(self._state["damping"])
        self.count = int(self._state["count"])
        self._direction = np.asarray(self._state["direction"], dtype=np.float64)
        self._decrease = float(self._state["decrease"])
        self._hessian_due = bool(int(self._state["hessian_due"]))
        #: the run has converged (``status`` says why)
        self.done = False
        self.status = ""
        # Within an iteration (never committed): passes and trials so far,
        # and the first trial of a one-pass start with its model Hessian.
        self._round = 0
        self._passes = 0
        self._evals = 0
        self._alphas: list[float] = []
        self._local_trial: tuple[np.ndarray, np.ndarray] | None = None
        # The one-pass start was tried (and its trial was no decrease).
        self._local_tried = False
        if self.started:
            self._check_done()

    # -- what the caller sees ----------------------------------------------------
    def penalty(self, x: np.ndarray) -> float:
        """The penalty at ``x``."""
        out = 0.5 * float(self.l2 @ (x * x))
        if self._owl:
            out += float(self.l1 @ np.abs(x))
        return out

    def pseudo_gradient(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return pseudo_gradient(x, g, self.l1) if self._owl else g

    def state(self) -> OptState:
        """The state to commit with the current point."""
        return {
            "started": np.asarray(int(self.started), dtype=np.int64),
            "count": np.asarray(self.count, dtype=np.int64),
            "objective": np.asarray(self.f, dtype=np.float64),
            "grad": self.g.copy(),
            "hessian": self.H.copy(),
            "damping": np.asarray(self.damping, dtype=np.float64),
            "direction": self._direction.copy(),
            "decrease": np.asarray(self._decrease, dtype=np.float64),
            "hessian_due": np.asarray(int(self._hessian_due), dtype=np.int64),
        }

    def request(self) -> PassRequest | None:
        """The next pass to run (``None`` once :attr:`done`)."""
        if self.done:
            return None
        if self._local_trial is not None:
            return PassRequest([self._local_trial[0].copy()], None, False)
        if not self.started:
            local = self.opt.local_iterations > 0 and not self._local_tried
            return PassRequest([self.x.copy()], 0, local)
        if self._round == 0:
            self._alphas = [1.0]
        else:
            first = BACKTRACK_CANDIDATES * (self._round - 1) + 1
            self._alphas = [
                BACKTRACK ** (first + j) for j in range(BACKTRACK_CANDIDATES)
            ]
        points = [self.x + a * self._direction for a in self._alphas]
        # The Hessian, when due, at the longest step of the pass: the one
        # most likely to be taken.
        return PassRequest(points, 0 if self._hessian_due else None, False)

    # -- feeding results ---------------------------------------------------------
    def observe(self, values: LocalValue | Sequence[PointValue]) -> NewtonStep | None:
        """The results of the pass :meth:`request` asked for; a
        :class:`NewtonStep` if an iteration completed."""
        if self.done:
            raise RuntimeError("the Newton run is done")
        self._passes += 1
        if self._local_trial is not None:
            assert not isinstance(values, LocalValue)
            return self._observe_local_trial(values)
        if not self.started:
            self._observe_start(values)
            return None
        assert not isinstance(values, LocalValue)
        return self._observe_search(values)

    def _objective_of(self, x: np.ndarray, value: PointValue) -> float:
        return float(value.loss) + self.penalty(x)

    def _smooth_grad(self, x: np.ndarray, value: PointValue) -> np.ndarray:
        return np.asarray(value.grad, dtype=np.float64) + self.l2 * x

    def _observe_start(self, values: LocalValue | Sequence[PointValue]) -> None:
        self._evals += 1
        self.damping = 0.0
        if isinstance(values, LocalValue):
            # Only the objective is known at the start; the gradient there is
            # not needed unless the local models' trial fails (then a plain
            # start pass measures it).
            self._local_tried = True
            self.f = float(values.start_loss) + self.penalty(self.x)
            self.g = np.zeros_like(self.x)
            trial = self._local_minimizer(values)
            if trial is not None:
                self._local_trial = trial
            return
        start = values[0]
        self.f = self._objective_of(self.x, start)
        self.g = self._smooth_grad(self.x, start)
        assert start.hessian is not None
        self.H = np.asarray(start.hessian, dtype=np.float64)
        self.started = True
        self._check_done()
        if not self.done:
            self._plan_step()

    def _local_minimizer(
        self, local: LocalValue
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The minimizer of the summed local models plus the penalty, if the
        models predict a decrease there; with the models' Hessian."""
        A = np.asarray(local.model_hessian, dtype=np.float64)
        r = np.asarray(local.model_linear, dtype=np.float64)
        Q = A + np.diag(self.l2)
        if self._owl:
            w = minimize_l1_quadratic(Q, -r, self.l1, self.x)
        else:
            w = damped_solve(Q, r)
        predicted = (
            0.5 * float(w @ (A @ w)) - float(r @ w) + float(local.model_constant)
        ) + self.penalty(w)
        if not (math.isfinite(predicted) and predicted < self.f):
            logger.info("Newton: the local models predict no decrease; plain start")
            return None
        self._decrease = self.f - predicted
        self._direction = w - self.x
        return w, A

    def _observe_local_trial(self, values: Sequence[PointValue]) -> NewtonStep | None:
        assert self._local_trial is not None
        w, A = self._local_trial
        self._local_trial = None
        self._evals += 1
        value = values[0]
        f_new = self._objective_of(w, value)
        if _finite(f_new, value) and f_new <= self.f - self.opt.c1 * self._decrease:
            # The local models' Hessian, from points near w, is the curvature
            # at w: the next pass needs no Hessian.
            self.started = True
            return self._accept(w, f_new, value, A, alpha=1.0, index=0)
        logger.info("Newton: the one-pass start was no decrease; plain start")
        return None

    def _observe_search(self, values: Sequence[PointValue]) -> NewtonStep | None:
        if len(values) != len(self._alphas):
            raise ValueError(
                f"expected results at {len(self._alphas)} points, got {len(values)}"
            )
        self._evals += len(values)
        best: tuple[float, int] | None = None
        for i, (alpha, value) in enumerate(zip(self._alphas, values, strict=True)):
            x_t = self.x + alpha * self._direction
            f_t = self._objective_of(x_t, value)
            sufficient = f_t <= self.f - self.opt.c1 * alpha * self._decrease
            usable = _finite(f_t, value) and f_t < self.f and sufficient
            if usable and (best is None or f_t < best[0]):
                best = (f_t, i)
        if best is not None:
            f_new, i = best
            alpha = self._alphas[i]
            value = values[i]
            return self._accept(
                self.x + alpha * self._direction,
                f_new,
                value,
                value.hessian,
                alpha=alpha,
                index=i,
            )
        self._round += 1
        if self._round >= self.opt.max_line_search:
            logger.info("Newton: no decrease along the Newton direction; stopping")
            self._finish("no decrease (precision limit)")
        return None

    def _accept(
        self,
        x_new: np.ndarray,
        f_new: float,
        value: PointValue,
        hessian: np.ndarray | None,
        *,
        alpha: float,
        index: int,
    ) -> NewtonStep:
        g_new = self._smooth_grad(x_new, value)
        pg_old = self.pseudo_gradient(self.x, self.g)
        pg_new = self.pseudo_gradient(x_new, g_new)
        ratio = (self.f - f_new) / self._decrease if self._decrease > 0 else 0.0
        if alpha == 1.0 and ratio > GOOD_RATIO:
            self.damping *= DAMPING_DOWN
            if self.damping < DAMPING_ZERO:
                self.damping = 0.0
        elif alpha < 1.0 or ratio < POOR_RATIO:
            self.damping = min(MAX_DAMPING, max(self.damping, MIN_DAMPING) * DAMPING_UP)
        stalled = self.opt.negligible(self.f, self.f - f_new)
        old_norm = float(np.linalg.norm(pg_old))
        contraction = float(np.linalg.norm(pg_new)) / old_norm if old_norm else 0.0
        if hessian is not None:
            self.H = np.asarray(hessian, dtype=np.float64)
        fresh = hessian is not None
        self._hessian_due = not (fresh and contraction <= self.opt.keep_hessian_below)
        self.x, self.f, self.g = np.asarray(x_new, dtype=np.float64), f_new, g_new
        self.count += 1
        step = NewtonStep(
            x=self.x.copy(),
            objective=f_new,
            loss=float(value.loss),
            grad_norm=float(np.linalg.norm(pg_new)),
            alpha=alpha,
            damping=self.damping,
            passes=self._passes,
            evals=self._evals,
            point_index=index,
        )
        self._passes = self._evals = 0
        self._round = 0
        if stalled:
            self._finish("stalled")
        else:
            self._check_done()
            if not self.done:
                self._plan_step()
        return step

    def _check_done(self) -> None:
        if self.opt.converged(self.f, self.pseudo_gradient(self.x, self.g)):
            self._finish("gradient tolerance")

    def _finish(self, why: str) -> None:
        self.done = True
        self.status = why
        logger.debug("Newton: converged (%s) at f=%r", why, self.f)

    def _plan_step(self) -> None:
        """The next direction and its predicted decrease; converged if the
        model predicts nothing worth a pass."""
        self._round = 0
        p, decrease = newton_step(
            self.x, self.g, self.H, self.l2, self.l1, self.damping
        )
        if not (math.isfinite(decrease) and decrease > 0.0):
            self._finish("no descent direction")
            return
        if self.damping == 0.0 and self.opt.negligible(self.f, decrease):
            self._finish("predicted decrease below ftol")
            return
        self._direction, self._decrease = p, decrease


# -- the local solve of the one-pass start ---------------------------------------------
#: ``evaluate(x, rows, with_grad) -> (loss_sum, grad_sum, hessian_sum,
#: n_used)`` over an evenly strided subset of about ``rows`` rows of a piece
#: of data (``None``: every row); gradient and Hessian (else ``None``) only
#: ``with_grad``.  Sums over the rows used; no penalty.
LocalEvaluate = Callable[
    [np.ndarray, int | None, bool],
    tuple[float, np.ndarray | None, np.ndarray | None, int],
]


class LocalSolve(NamedTuple):
    """The result of :func:`local_newton_solve`: the loss sum at the
    starting point, and the point reached with the sums there."""

    start_loss: float
    point: np.ndarray
    loss: float
    grad: np.ndarray
    hessian: np.ndarray
    iterations: int

    def model(self) -> tuple[np.ndarray, np.ndarray, float]:
        """The quadratic model of the piece's loss sum around :attr:`point`,
        as ``(A, r, c0)`` with ``L(w) ~ w.A.w / 2 - r.w + c0`` (sums, to be
        added over pieces)."""
        w = self.point
        A = self.hessian
        r = A @ w - self.grad
        c0 = self.loss - float(self.grad @ w) + 0.5 * float(w @ (A @ w))
        return A, r, c0


def local_newton_solve(
    evaluate: LocalEvaluate,
    x0: np.ndarray,
    l2: np.ndarray,
    l1: np.ndarray,
    *,
    iterations: int,
    first_rows: int,
) -> LocalSolve:
    r"""Up to ``iterations`` Newton steps on one piece's own objective
    (mean data loss plus penalty) from ``x0``, on growing row subsets.

    Step ``i`` uses an evenly strided subset of ``first_rows * 2**i`` rows
    (at least :data:`LOCAL_MIN_ROWS_PER_COEF` per coefficient; every row once
    that is more than the piece has): the first steps, far from the
    solution, need little precision, and the last ones refine it on more
    rows.  Each is a Newton (proximal, with L1) step halved until it
    decreases the subset's objective (at most :data:`LOCAL_MAX_HALVINGS`
    times; then the solve stops).  The sums at the end use every row: they
    are the piece's quadratic model (:meth:`LocalSolve.model`).

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([1.0, 2.0, 6.0])
    >>> def evaluate(x, rows, with_grad):  # sum of (x - y_i)^2 / 2
    ...     loss = float(0.5 * ((x[0] - y) ** 2).sum())
    ...     if not with_grad:
    ...         return loss, None, None, 3
    ...     return loss, np.array([3 * x[0] - y.sum()]), 3 * np.eye(1), 3
    >>> solve = local_newton_solve(evaluate, np.zeros(1), np.zeros(1),
    ...                            np.zeros(1), iterations=2, first_rows=2)
    >>> solve.point, solve.start_loss
    (array([3.]), 20.5)
    """
    x = np.array(x0, dtype=np.float64)
    owl = bool(np.any(l1 > 0.0))
    min_rows = LOCAL_MIN_ROWS_PER_COEF * x.size

    def objective(point: np.ndarray, loss_sum: float, n_used: int) -> float:
        value = loss_sum / max(n_used, 1) + 0.5 * float(l2 @ (point * point))
        return value + float(l1 @ np.abs(point)) if owl else value

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        start_loss = evaluate(x, None, False)[0]
        done = 0
        for i in range(iterations):
            rows = max(first_rows << i, min_rows)
            loss, grad, hess, n_used = evaluate(x, rows, True)
            assert grad is not None and hess is not None
            f = objective(x, loss, n_used)
            g = grad / max(n_used, 1) + l2 * x
            p, decrease = newton_step(x, g, hess / max(n_used, 1), l2, l1)
            if not (math.isfinite(decrease) and decrease > 0.0):
                break
            alpha = 1.0
            for _ in range(LOCAL_MAX_HALVINGS):
                trial = x + alpha * p
                if objective(trial, evaluate(trial, rows, False)[0], n_used) < f:
                    break
                alpha *= 0.5
            else:
                break
            x = x + alpha * p
            done += 1
        loss, grad, hess, _ = evaluate(x, None, True)
    assert grad is not None and hess is not None
    return LocalSolve(start_loss, x, loss, grad, hess, done)


# -- the reference driver ----------------------------------------------------------
class NewtonResult(NamedTuple):
    """Result of :func:`minimize_newton`."""

    x: np.ndarray
    f: float
    n_passes: int
    n_iter: int
    status: str


#: ``fun(x, with_hessian) -> (mean data loss, its gradient, Hessian or None)``
NewtonFunction = Callable[[np.ndarray, bool], tuple[float, np.ndarray, Any]]


def minimize_newton(
    fun: NewtonFunction,
    x0: np.ndarray,
    *,
    optimizer: Newton,
    max_iter: int,
    l2: np.ndarray | float = 0.0,
    l1: np.ndarray | float = 0.0,
    local: Callable[[np.ndarray], LocalValue] | None = None,
) -> NewtonResult:
    """Minimize ``fun`` plus the penalty from ``x0`` with :class:`NewtonRun`,
    the loop the trainer runs over passes (each call of ``fun`` or ``local``
    stands for one pass; several points of one pass are evaluated in turn).

    ``local(x)`` answers the one-pass start (a :class:`LocalValue`); without
    it the first pass is an ordinary one.

    Examples
    --------
    >>> import numpy as np
    >>> def fun(x, with_hessian):  # mean of log(1 + exp(-x)) + log(1 + exp(x))
    ...     p = 1 / (1 + np.exp(-x))
    ...     f = float(np.logaddexp(0, -x).sum() + np.logaddexp(0, x).sum()) / 2
    ...     return f, (2 * p - 1) / 2, np.diag(p * (1 - p))
    >>> res = minimize_newton(fun, np.array([3.0]), optimizer=Newton(), max_iter=20)
    >>> bool(abs(res.x[0]) < 1e-5), res.status
    (True, 'gradient tolerance')
    """
    max_iter = _check_int("max_iter", max_iter, minimum=0)
    x = np.array(x0, dtype=np.float64).ravel()
    opt = optimizer
    if local is None and opt.local_iterations > 0:
        opt = _without_local(opt)
    run = NewtonRun(opt, opt.init_state(x.size), x, l2, l1)
    n_passes = n_iter = 0
    while n_iter < max_iter:
        request = run.request()
        if request is None:
            break
        n_passes += 1
        if request.local:
            assert local is not None
            run.observe(local(request.points[0]))
            continue
        values = []
        for i, point in enumerate(request.points):
            loss, grad, hess = fun(point.copy(), request.hessian_index == i)
            values.append(
                PointValue(
                    float(loss),
                    np.asarray(grad, dtype=np.float64).ravel(),
                    None if hess is None else np.asarray(hess, dtype=np.float64),
                )
            )
        if run.observe(values) is not None:
            n_iter += 1
    return NewtonResult(run.x, run.f, n_passes, n_iter, run.status or "max_iter")


def _without_local(opt: Newton) -> Newton:
    config = opt.config()
    config.pop("type")
    config["local_iterations"] = 0
    return Newton(**config)
