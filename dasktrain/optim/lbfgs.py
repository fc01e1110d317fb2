"""L-BFGS for full-batch training, as pure building blocks (pure NumPy).

Each evaluation of the objective is a pass over a large dataset, done
remotely by the trainer.  So L-BFGS is not an ``update`` function: it is a
set of pure pieces that a driver strings together, keeping evaluations few.
All vectors are flat float64 (see :func:`dasktrain._tree.flatten`).

* :func:`two_loop_direction`: the quasi-Newton direction from the history.
* :class:`WolfeLineSearch`: a strong-Wolfe line search as a state machine;
  the caller evaluates the trial points it asks for.
* :class:`LBFGS`: the configuration, the state (history of ``(s, y)`` pairs)
  and the convergence test.
* :func:`minimize_lbfgs`: the reference driver loop.

A driver does, with ``opt = LBFGS()`` and ``f, g = fun_and_grad(x)``::

    state = opt.init_state(x.size)          # or opt.init(params)
    while not opt.converged(f, g):
        p = opt.direction(state, g)          # descent direction
        ls = opt.line_search(f, float(g @ p))
        trials = []
        while not ls.done:
            alpha = ls.next_alpha()
            f_t, g_t = fun_and_grad(x + alpha * p)   # one pass over the data
            ls.observe(alpha, f_t, float(g_t @ p))
            trials.append((x + alpha * p, f_t, g_t))
        if not ls.result.accepted:           # no decrease found along p
            if int(state["n_hist"]) == 0:
                break                        # not even along -g: stop
            state = opt.reset(state)         # retry along -g
            continue
        x_new, f_new, g_new = trials[ls.result.trial_index]
        state = opt.push(state, x_new - x, g_new - g)
        x, f, g = x_new, f_new, g_new

:func:`minimize_lbfgs` is exactly this loop, with an iteration limit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from dasktrain.optim.base import Optimizer, OptState, Params, register
from dasktrain.optim.schedules import (
    _check_int,
    _check_nonnegative,
    _check_real,
)

__all__ = [
    "LBFGS",
    "IterationInfo",
    "LineSearchResult",
    "MinimizeResult",
    "OrthantSearch",
    "WolfeLineSearch",
    "l1_norm",
    "minimize_lbfgs",
    "pseudo_gradient",
    "two_loop_direction",
]

logger = logging.getLogger(__name__)

#: pairs with ``s @ y <= CURVATURE_EPS * ||s|| * ||y||`` are not stored
CURVATURE_EPS = float(np.finfo(np.float64).eps)
#: an interpolated zoom trial keeps this fraction of the interval away from
#: the worse end, and a much smaller one from the best end (the minimizer is
#: often very close to the best point)
_MARGIN_FROM_HI = 0.1
_MARGIN_FROM_LO = 1e-3
#: bisect if the zoom interval did not shrink by this factor in two trials
_SHRINK_EVERY_TWO = 0.66
#: function values closer than this (relative) are compared as equal: near a
#: minimizer differences in ``f`` are rounding noise, slopes still inform
_F_RTOL = 1e-12
#: after a non-finite trial, retry at this fraction of the way from the
#: best point to the failed one
_NONFINITE_SHRINK = 0.25
#: extrapolation range while bracketing: cur + [min, max] * (cur - prev)
_EXTRAPOLATE_MIN = 1.1
_EXTRAPOLATE_MAX = 4.0
#: stop zooming when the interval is this small relative to the step
_INTERVAL_RTOL = 1e-12

#: step sizes per pass of an automatic multi-candidate line search
AUTO_CANDIDATES = 3

#: line search outcomes
WOLFE = "wolfe"  # strong Wolfe conditions hold at the accepted step
#: Default relative-decrease tolerance of :class:`LBFGS` (as scipy's
#: L-BFGS-B ``factr=1e7`` times float64 epsilon).
DEFAULT_FTOL = 2.2e-9
ARMIJO = "armijo"  # steps exhausted: best step with sufficient decrease
FAILED = "failed"  # no trial decreased the objective enough


# -- the two-loop recursion ----------------------------------------------------
def two_loop_direction(
    grad: np.ndarray, s_hist: np.ndarray, y_hist: np.ndarray
) -> np.ndarray:
    r"""The L-BFGS direction :math:`p = -H g` by the two-loop recursion.

    :math:`H` is the inverse-Hessian approximation built from the pairs
    :math:`s_i = x_{i+1} - x_i`, :math:`y_i = g_{i+1} - g_i` (rows of
    ``s_hist`` and ``y_hist``, oldest first), starting from
    :math:`H_0 = \gamma I` with :math:`\gamma = s^\top y / y^\top y` of the
    newest pair.  With an empty history the direction is
    :math:`-g / \max(1, \lVert g \rVert_2)`, so that a unit step has norm at
    most 1.

    Parameters
    ----------
    grad : ndarray, shape (n,)
    s_hist, y_hist : ndarray, shape (k, n)
        The ``k`` stored pairs, oldest first; each with ``s @ y > 0``.

    Returns
    -------
    ndarray, shape (n,)
        The search direction (float64).

    Examples
    --------
    >>> import numpy as np
    >>> hess = np.diag([1.0, 10.0])  # exact pairs of a quadratic
    >>> s = np.eye(2)
    >>> y = s @ hess
    >>> p = two_loop_direction(np.array([1.0, 1.0]), s, y)
    >>> np.round(p, 6)  # Newton's direction -H^{-1} g
    array([-1. , -0.1])
    """
    g = np.asarray(grad, dtype=np.float64)
    s_hist = np.asarray(s_hist, dtype=np.float64)
    y_hist = np.asarray(y_hist, dtype=np.float64)
    if s_hist.shape != y_hist.shape or s_hist.ndim != 2 or s_hist.shape[1] != g.size:
        raise ValueError(
            f"s_hist {s_hist.shape} and y_hist {y_hist.shape} must both have "
            f"shape (k, {g.size})"
        )
    n_pairs = s_hist.shape[0]
    if n_pairs == 0:
        return -g / max(1.0, float(np.linalg.norm(g)))
    rho = 1.0 / np.einsum("ij,ij->i", s_hist, y_hist)
    alphas = np.zeros(n_pairs)
    q = g.copy()
    for i in range(n_pairs - 1, -1, -1):
        alphas[i] = rho[i] * float(s_hist[i] @ q)
        q -= alphas[i] * y_hist[i]
    newest_s, newest_y = s_hist[-1], y_hist[-1]
    gamma = float(newest_s @ newest_y) / float(newest_y @ newest_y)
    r = gamma * q
    for i in range(n_pairs):
        beta = rho[i] * float(y_hist[i] @ r)
        r += (alphas[i] - beta) * s_hist[i]
    return -r


# -- the line search ---------------------------------------------------------
class LineSearchResult(NamedTuple):
    """Outcome of a :class:`WolfeLineSearch`.

    Attributes
    ----------
    status : str
        ``"wolfe"`` (strong Wolfe conditions hold at ``alpha``), ``"armijo"``
        (steps exhausted; ``alpha`` is the best step with sufficient decrease)
        or ``"failed"`` (no acceptable step; ``alpha`` is 0).
    alpha : float
        The accepted step (0 when failed).
    f : float
        Objective at the accepted step.
    gdotp : float
        Directional derivative ``g(x + alpha p) @ p`` at the accepted step.
    trial_index : int
        Position of the accepted step among the observed trials (0-based),
        -1 when failed.
    n_evals : int
        Number of trials observed.
    """

    status: str
    alpha: float
    f: float
    gdotp: float
    trial_index: int
    n_evals: int

    @property
    def accepted(self) -> bool:
        """Whether the step decreases the objective (status is not failed)."""
        return self.status != FAILED


class _Trial(NamedTuple):
    alpha: float
    f: float
    gdotp: float
    position: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.f) and math.isfinite(self.gdotp)


def _cubic_minimizer(a: _Trial, b: _Trial) -> float | None:
    """Minimizer of the cubic matching values and slopes at ``a`` and ``b``."""
    if a.alpha == b.alpha:
        return None
    d1 = a.gdotp + b.gdotp - 3.0 * (a.f - b.f) / (a.alpha - b.alpha)
    radicand = d1 * d1 - a.gdotp * b.gdotp
    if not math.isfinite(radicand) or radicand < 0.0:
        return None
    d2 = math.copysign(math.sqrt(radicand), b.alpha - a.alpha)
    denominator = b.gdotp - a.gdotp + 2.0 * d2
    if denominator == 0.0:
        return None
    x = b.alpha - (b.alpha - a.alpha) * (b.gdotp + d2 - d1) / denominator
    return x if math.isfinite(x) else None


def _quadratic_minimizer(a: _Trial, b: _Trial) -> float | None:
    """Minimizer of the quadratic matching value and slope at ``a``, value at ``b``."""
    step = b.alpha - a.alpha
    if step == 0.0:
        return None
    curvature = (b.f - a.f - a.gdotp * step) / (step * step)
    if not math.isfinite(curvature) or curvature <= 0.0:
        return None
    x = a.alpha - a.gdotp / (2.0 * curvature)
    return x if math.isfinite(x) else None


class _Search:
    """What both caller-driven line searches share: the result once done, and
    the number of rounds (passes over the data) so far."""

    _result: LineSearchResult | None = None
    _n_rounds: int = 0

    @property
    def done(self) -> bool:
        """Whether :attr:`result` is available."""
        return self._result is not None

    @property
    def result(self) -> LineSearchResult:
        """The outcome; only once :attr:`done`."""
        if self._result is None:
            raise RuntimeError("line search is not done: observe more trials")
        return self._result

    @property
    def n_rounds(self) -> int:
        """Rounds (calls of ``observe_many``, that is passes over the data)
        so far."""
        return self._n_rounds


class WolfeLineSearch(_Search):
    r"""A strong-Wolfe line search driven by the caller, one trial at a time.

    Finds a step :math:`\alpha > 0` along a descent direction :math:`p` with

    .. math::

        f(x + \alpha p) \le f(x) + c_1 \alpha\, g(x)^\top p
        \quad\text{and}\quad
        |g(x + \alpha p)^\top p| \le c_2 |g(x)^\top p|.

    Bracketing then zoom (Nocedal & Wright, Algorithms 3.5 and 3.6): trial
    steps grow by safeguarded cubic extrapolation until an interval containing
    acceptable steps is found, then shrink it by safeguarded cubic (or
    quadratic) interpolation, falling back to bisection.  A trial with a
    non-finite value or slope is treated as too long: the next trial is
    shorter.

    The object holds the machine's state; nothing is evaluated here.  Ask for
    a step with :meth:`next_alpha`, evaluate the objective and the slope
    there, report them with :meth:`observe`, until :attr:`done`; then read
    :attr:`result`.

    Parameters
    ----------
    f0 : float
        :math:`f(x)`, finite.
    g0_dot_p : float
        :math:`g(x)^\top p`, finite and negative.
    alpha0 : float
        First trial step, ``> 0``.
    c1, c2 : float
        Wolfe constants, ``0 < c1 < c2 < 1``.
    max_steps : int
        Maximum number of rounds (calls of :meth:`observe` or
        :meth:`observe_many`).

    Examples
    --------
    >>> import numpy as np
    >>> fun = lambda a: ((a - 3.0) ** 2, 2.0 * (a - 3.0))  # along p = 1
    >>> f0, d0 = fun(0.0)
    >>> ls = WolfeLineSearch(f0, d0, 1.0, c1=1e-4, c2=0.1, max_steps=20)
    >>> while not ls.done:
    ...     alpha = ls.next_alpha()
    ...     ls.observe(alpha, *fun(alpha))
    >>> ls.result.status, round(ls.result.alpha, 6)
    ('wolfe', 3.0)
    """

    def __init__(
        self,
        f0: float,
        g0_dot_p: float,
        alpha0: float = 1.0,
        *,
        c1: float = 1e-4,
        c2: float = 0.9,
        max_steps: int = 20,
    ) -> None:
        self._f0 = _check_real("f0", f0)
        self._d0 = _check_real("g0_dot_p", g0_dot_p)
        if self._d0 >= 0.0:
            raise ValueError(
                f"g0_dot_p must be < 0 (p must be a descent direction), got {g0_dot_p}"
            )
        alpha0 = _check_real("alpha0", alpha0)
        if alpha0 <= 0.0:
            raise ValueError(f"alpha0 must be > 0, got {alpha0}")
        self._c1, self._c2 = _check_wolfe_constants(c1, c2)
        self._max_steps = _check_int("max_steps", max_steps, minimum=1)
        self._origin = _Trial(0.0, self._f0, self._d0, -1)
        self._zooming = False
        self._prev = self._origin
        self._lo = self._origin
        self._hi = self._origin
        self._best: _Trial | None = None
        self._widths: list[float] = []
        self._pending = alpha0
        self._n_evals = 0
        self._n_rounds = 0
        #: speculative trials (not asked for by the machine) that satisfy
        #: both strong-Wolfe conditions
        self._extra_wolfe: list[_Trial] = []
        self._result: LineSearchResult | None = None
        self._result_trial = self._origin

    # -- public state ---------------------------------------------------------
    @property
    def n_evals(self) -> int:
        """Number of trials observed so far."""
        return self._n_evals

    def next_alpha(self) -> float:
        """The step to evaluate next."""
        if self._result is not None:
            raise RuntimeError("line search is done: read .result")
        return self._pending

    def next_alphas(self, k: int) -> list[float]:
        """The pending step first, then up to ``k - 1`` guesses of steps the
        search may want next, to be evaluated together (one pass over the
        data) and reported with :meth:`observe_many`.

        While bracketing, the guesses halve the step and extend it fourfold
        (then quarter it, and tenfold); while zooming, they bisect the two
        parts of the interval on either side of the pending step (then its
        quarters), so that whichever part the pending trial leaves, a guess
        lies inside it.
        """
        pending = self.next_alpha()
        k = _check_int("k", k, minimum=1)
        if self._zooming:
            a, b = sorted((self._lo.alpha, self._hi.alpha))
            fractions = (0.5, 0.25, 0.75)
            guesses = [
                edge + frac * (pending - edge) for frac in fractions for edge in (a, b)
            ]
        else:
            start = self._prev.alpha
            width = pending - start
            guesses = [start + m * width for m in (0.5, 4.0, 0.25, 10.0, 0.1)]
        out = [pending]
        for guess in guesses:
            if len(out) >= k:
                break
            if math.isfinite(guess) and guess > 0.0 and guess not in out:
                out.append(guess)
        return out

    def usable(self, alpha: float) -> bool:
        """Whether a trial at ``alpha`` can move the search now: the pending
        step, a step inside the zoom interval, or (while bracketing) a step
        beyond the last one."""
        if self._result is not None or not (math.isfinite(alpha) and alpha > 0.0):
            return False
        if alpha == self._pending:
            return True
        if self._zooming:
            a, b = sorted((self._lo.alpha, self._hi.alpha))
            return a < alpha < b
        return alpha > self._prev.alpha

    def observe(self, alpha: float, f: float, gdotp: float) -> None:
        """Report ``f(x + alpha p)`` and ``g(x + alpha p) @ p`` for the pending step.

        ``f`` or ``gdotp`` may be non-finite (the step is then shortened).
        """
        self.observe_many([(alpha, f, gdotp)])

    def observe_many(self, trials: Sequence[tuple[float, float, float]]) -> None:
        """Report a round of trials ``(alpha, f, gdotp)`` evaluated together:
        the pending step first (as from :meth:`next_alphas`), then any others.

        The pending trial moves the machine as in :meth:`observe`; each other
        trial then moves it too if it is still :meth:`usable`, in the given
        order.  A speculative trial that satisfies both strong-Wolfe
        conditions ends the search; among such trials (and the machine's own
        Wolfe step) the one with the lowest objective is taken.  Trials are
        numbered in the order reported, across rounds
        (:attr:`LineSearchResult.trial_index`).  ``max_steps`` counts rounds.
        """
        if self._result is not None:
            raise RuntimeError("line search is done: read .result")
        if not trials or trials[0][0] != self._pending:
            got = trials[0][0] if trials else None
            raise ValueError(
                f"the first trial must be the pending step {self._pending!r} "
                f"(from next_alpha()), got alpha={got!r}"
            )
        batch = []
        for alpha, f, gdotp in trials:
            trial = _Trial(float(alpha), float(f), float(gdotp), self._n_evals)
            self._n_evals += 1
            batch.append(trial)
            if (
                trial.finite
                and self._sufficient_decrease(trial)
                and (self._best is None or trial.f < self._best.f)
            ):
                self._best = trial
        self._n_rounds += 1
        self._extra_wolfe.extend(
            t
            for t in batch[1:]
            if t.finite and self._sufficient_decrease(t) and self._curvature(t)
        )
        for i, trial in enumerate(batch):
            if self._result is not None:
                break
            if i > 0 and not self.usable(trial.alpha):
                continue
            if self._zooming:
                self._observe_zoom(trial)
            else:
                self._observe_bracket(trial)
        if self._extra_wolfe:
            found = list(self._extra_wolfe)
            if self._result is not None and self._result.status == WOLFE:
                found.append(self._result_trial)
            self._finish(WOLFE, min(found, key=lambda t: (t.f, t.position)))
            return
        if self._result is None and self._n_rounds >= self._max_steps:
            logger.debug("line search: %d rounds without a Wolfe step", self._n_rounds)
            self._finish_without_wolfe()

    # -- the machine ----------------------------------------------------------
    def _sufficient_decrease(self, trial: _Trial) -> bool:
        # Strictly lower, too: at the precision limit the Armijo term rounds
        # away and ``f == f0`` would pass, accepting steps that do nothing.
        return trial.f < self._f0 and (
            trial.f <= self._f0 + self._c1 * trial.alpha * self._d0
        )

    def _curvature(self, trial: _Trial) -> bool:
        return abs(trial.gdotp) <= -self._c2 * self._d0

    def _finish(self, status: str, trial: _Trial) -> None:
        self._result_trial = trial
        self._result = LineSearchResult(
            status, trial.alpha, trial.f, trial.gdotp, trial.position, self._n_evals
        )

    def _finish_without_wolfe(self) -> None:
        if self._best is not None:
            self._finish(ARMIJO, self._best)
        else:
            self._finish(FAILED, self._origin)

    def _observe_bracket(self, trial: _Trial) -> None:
        prev = self._prev
        if (
            not trial.finite
            or not self._sufficient_decrease(trial)
            or (prev.alpha > 0.0 and _worse(trial, prev))
        ):
            self._start_zoom(prev, trial)
        elif self._curvature(trial):
            self._finish(WOLFE, trial)
        elif trial.gdotp >= 0.0:
            self._start_zoom(trial, prev)
        else:
            self._prev = trial
            self._pending = self._extrapolate(prev, trial)

    def _extrapolate(self, prev: _Trial, cur: _Trial) -> float:
        width = cur.alpha - prev.alpha
        low = cur.alpha + _EXTRAPOLATE_MIN * width
        high = cur.alpha + _EXTRAPOLATE_MAX * width
        guess = _cubic_minimizer(prev, cur)
        if guess is None or guess > high:
            return high
        return max(guess, low)

    def _start_zoom(self, lo: _Trial, hi: _Trial) -> None:
        self._zooming = True
        self._lo, self._hi = lo, hi
        self._widths = []
        self._next_zoom_trial()

    def _observe_zoom(self, trial: _Trial) -> None:
        lo = self._lo
        if (
            not trial.finite
            or not self._sufficient_decrease(trial)
            or _worse(trial, lo)
        ):
            self._hi = trial
        else:
            if self._curvature(trial):
                self._finish(WOLFE, trial)
                return
            if trial.gdotp * (self._hi.alpha - lo.alpha) >= 0.0:
                self._hi = lo
            self._lo = trial
        self._next_zoom_trial()

    def _next_zoom_trial(self) -> None:
        lo, hi = self._lo, self._hi
        width = abs(hi.alpha - lo.alpha)
        if width <= _INTERVAL_RTOL * max(lo.alpha, hi.alpha):
            logger.debug("line search: interval collapsed at alpha=%g", lo.alpha)
            self._finish_without_wolfe()
            return
        self._widths.append(width)
        if not hi.finite:
            self._pending = lo.alpha + _NONFINITE_SHRINK * (hi.alpha - lo.alpha)
            return
        if len(self._widths) >= 3 and width > _SHRINK_EVERY_TWO * self._widths[-3]:
            self._pending = 0.5 * (lo.alpha + hi.alpha)
            return
        toward_hi = math.copysign(1.0, hi.alpha - lo.alpha)
        near_lo = lo.alpha + toward_hi * _MARGIN_FROM_LO * width
        near_hi = hi.alpha - toward_hi * _MARGIN_FROM_HI * width
        left, right = min(near_lo, near_hi), max(near_lo, near_hi)
        inside = min(lo.alpha, hi.alpha), max(lo.alpha, hi.alpha)
        for guess in (_cubic_minimizer(lo, hi), _quadratic_minimizer(lo, hi)):
            if guess is not None and inside[0] < guess < inside[1]:
                self._pending = min(max(guess, left), right)
                return
        self._pending = 0.5 * (lo.alpha + hi.alpha)


def _worse(a: _Trial, b: _Trial) -> bool:
    """``a.f > b.f`` beyond rounding noise."""
    return a.f > b.f + _F_RTOL * abs(b.f)


def _check_wolfe_constants(c1: object, c2: object) -> tuple[float, float]:
    c1 = _check_real("c1", c1)
    c2 = _check_real("c2", c2)
    if not 0.0 < c1 < 1.0:
        raise ValueError(f"c1 must be in (0, 1), got {c1}")
    if not c1 < c2 < 1.0:
        raise ValueError(f"c2 must be in (c1, 1) = ({c1}, 1), got {c2}")
    return c1, c2


# -- the optimizer -----------------------------------------------------------
@register
class LBFGS(Optimizer):
    r"""Limited-memory BFGS for full-batch training.

    Iteration :math:`k`: direction :math:`p_k = -H_k g_k` by
    :func:`two_loop_direction` from the last ``history`` pairs
    :math:`s_i = x_{i+1} - x_i`, :math:`y_i = g_{i+1} - g_i`; step
    :math:`x_{k+1} = x_k + \alpha_k p_k` with :math:`\alpha_k` from a
    strong-Wolfe :class:`WolfeLineSearch` (first trial :math:`\alpha = 1`);
    then the pair is stored if :math:`s^\top y > \epsilon \lVert s \rVert
    \lVert y \rVert` (:data:`CURVATURE_EPS`).

    Convergence (:meth:`converged`):
    :math:`\lVert g_k \rVert_\infty \le \mathrm{tol} \cdot \max(1, |f_k|)`,
    that is an absolute gradient tolerance for losses of order one and a
    relative one for large losses.  A driver also stops when an iteration
    decreases the objective by at most ``ftol`` relative to it
    (:meth:`stalled`; float32 data reach this before the gradient test), when
    no step decreases the objective along the steepest-descent direction (the
    precision limit), or after its iteration budget.

    It has no per-step :meth:`update`: the trainer drives it with full passes
    (``Trainer.fit(..., batch_rows=None)``); the module docstring of
    :mod:`dasktrain.optim.lbfgs` shows the loop, and :func:`minimize_lbfgs`
    runs it on a local function.

    Parameters
    ----------
    history : int
        Number of ``(s, y)`` pairs kept, ``>= 1``.
    tol : float
        Gradient tolerance, ``>= 0``.
    max_line_search : int
        Maximum passes (rounds of trials) per line search, ``>= 1``.
    ftol : float
        Relative decrease below which an iteration counts as stalled, ``>= 0``.
    c1, c2 : float
        Wolfe constants, ``0 < c1 < c2 < 1``.
    line_search_candidates : int or None
        Step sizes evaluated together in one pass of the line search
        (:meth:`WolfeLineSearch.next_alphas`); ``None`` (default) chooses
        per pass (:meth:`n_candidates`).  On cached data a linear model
        evaluates three step sizes in about twice the time of one; on data
        read from the store they cost one read.  With a local function
        (:func:`minimize_lbfgs` without ``fun_and_grad_many``) there is
        nothing to share and one step is evaluated at a time.

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.optim import LBFGS, minimize_lbfgs
    >>> def fun_and_grad(x):
    ...     return float(0.5 * x @ x - x.sum()), x - 1.0
    >>> x, f, n_evals, n_iter = minimize_lbfgs(
    ...     fun_and_grad, np.zeros(3), optimizer=LBFGS(), max_iter=50)
    >>> np.round(x, 6), n_evals
    (array([1., 1., 1.]), 3)
    """

    kind: ClassVar[str] = "LBFGS"
    full_batch_only: ClassVar[bool] = True

    def __init__(
        self,
        *,
        history: int = 10,
        tol: float = 1e-6,
        max_line_search: int = 20,
        ftol: float = DEFAULT_FTOL,
        c1: float = 1e-4,
        c2: float = 0.9,
        line_search_candidates: int | None = None,
    ) -> None:
        if line_search_candidates is not None:
            line_search_candidates = _check_int(
                "line_search_candidates", line_search_candidates, minimum=1
            )
        self.line_search_candidates = line_search_candidates
        self.history = _check_int("history", history, minimum=1)
        self.tol = _check_nonnegative("tol", tol)
        self.ftol = _check_nonnegative("ftol", ftol)
        self.max_line_search = _check_int("max_line_search", max_line_search, minimum=1)
        self.c1, self.c2 = _check_wolfe_constants(c1, c2)

    def config(self) -> dict[str, Any]:
        """JSON data; ``optimizer_from_config(opt.config()) == opt``."""
        return {
            "type": self.kind,
            "history": self.history,
            "tol": self.tol,
            "max_line_search": self.max_line_search,
            "ftol": self.ftol,
            "c1": self.c1,
            "c2": self.c2,
            "line_search_candidates": self.line_search_candidates,
        }

    # -- state ----------------------------------------------------------------
    def init(self, params: Mapping[str, np.ndarray]) -> OptState:
        """Empty history for ``params`` (flattened as by ``_tree.flatten``)."""
        n_params = sum(int(np.size(v)) for v in params.values())
        return self.init_state(n_params)

    def init_state(self, n_params: int) -> OptState:
        """Empty history for a vector of ``n_params`` entries.

        Returns
        -------
        dict
            ``"s"``, ``"y"``: float64 ``(history, n_params)``, rows
            ``0 .. n_hist - 1`` hold the pairs, oldest first;
            ``"n_hist"``: int64 0-d, number of stored pairs;
            ``"count"``: int64 0-d, number of completed iterations.
        """
        n_params = _check_int("n_params", n_params, minimum=0)
        return {
            "s": np.zeros((self.history, n_params)),
            "y": np.zeros((self.history, n_params)),
            "n_hist": np.zeros((), dtype=np.int64),
            "count": np.zeros((), dtype=np.int64),
        }

    def push(
        self, state: Mapping[str, np.ndarray], s: np.ndarray, y: np.ndarray
    ) -> OptState:
        """Record a completed iteration; store ``(s, y)`` if it has curvature.

        ``s = x_new - x``, ``y = g_new - g``.  The pair is skipped when
        ``s @ y <= CURVATURE_EPS * ||s|| * ||y||``.  When the history is full
        the oldest pair is dropped.  Returns a new state (``count`` + 1).
        """
        s_hist = np.asarray(state["s"], dtype=np.float64)
        y_hist = np.asarray(state["y"], dtype=np.float64)
        n_hist = int(state["n_hist"])
        s = np.asarray(s, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        if s.shape != (s_hist.shape[1],) or y.shape != s.shape:
            raise ValueError(
                f"s {s.shape} and y {y.shape} must have shape ({s_hist.shape[1]},)"
            )
        count = np.asarray(int(state["count"]) + 1, dtype=np.int64)
        curvature = float(s @ y)
        threshold = CURVATURE_EPS * float(np.linalg.norm(s) * np.linalg.norm(y))
        if not curvature > threshold:
            logger.debug("L-BFGS: skipped a pair with s.y=%g", curvature)
            return {
                "s": s_hist.copy(),
                "y": y_hist.copy(),
                "n_hist": np.asarray(n_hist, dtype=np.int64),
                "count": count,
            }
        if n_hist < s_hist.shape[0]:
            new_s, new_y = s_hist.copy(), y_hist.copy()
            row = n_hist
            n_hist += 1
        else:
            new_s = np.roll(s_hist, -1, axis=0)
            new_y = np.roll(y_hist, -1, axis=0)
            row = n_hist - 1
        new_s[row] = s
        new_y[row] = y
        return {
            "s": new_s,
            "y": new_y,
            "n_hist": np.asarray(n_hist, dtype=np.int64),
            "count": count,
        }

    def reset(self, state: Mapping[str, np.ndarray]) -> OptState:
        """Forget the history (keeps ``count``)."""
        return {
            "s": np.zeros_like(state["s"], dtype=np.float64),
            "y": np.zeros_like(state["y"], dtype=np.float64),
            "n_hist": np.zeros((), dtype=np.int64),
            "count": np.asarray(int(state["count"]), dtype=np.int64),
        }

    # -- one iteration --------------------------------------------------------
    def direction(
        self, state: Mapping[str, np.ndarray], grad: np.ndarray
    ) -> np.ndarray:
        """The search direction at gradient ``grad``.

        The two-loop direction from the stored pairs; if it is not a descent
        direction (rounding), ``-grad / max(1, ||grad||)``.
        """
        n_hist = int(state["n_hist"])
        g = np.asarray(grad, dtype=np.float64).ravel()
        p = two_loop_direction(g, state["s"][:n_hist], state["y"][:n_hist])
        if n_hist > 0 and not float(g @ p) < 0.0:
            logger.debug("L-BFGS: two-loop direction is not a descent direction")
            p = two_loop_direction(g, state["s"][:0], state["y"][:0])
        return p

    def orthant_direction(
        self, state: Mapping[str, np.ndarray], pg: np.ndarray
    ) -> np.ndarray:
        """The OWL-QN direction at pseudo-gradient ``pg``: the two-loop
        direction of ``pg``, with the coordinates whose sign disagrees with
        ``-pg`` set to zero (``-pg / max(1, ||pg||)`` if none is left)."""
        n_hist = int(state["n_hist"])
        pg = np.asarray(pg, dtype=np.float64).ravel()
        p = two_loop_direction(pg, state["s"][:n_hist], state["y"][:n_hist])
        p[p * pg >= 0.0] = 0.0
        if not float(pg @ p) < 0.0:
            p = two_loop_direction(pg, state["s"][:0], state["y"][:0])
        return p

    def orthant_search(
        self,
        f0: float,
        x: np.ndarray,
        direction: np.ndarray,
        pg: np.ndarray,
        l1: np.ndarray,
    ) -> OrthantSearch:
        """An :class:`OrthantSearch` with this optimizer's constants."""
        return OrthantSearch(
            f0, x, direction, pg, l1, c1=self.c1, max_rounds=self.max_line_search
        )

    def line_search(
        self, f0: float, g0_dot_p: float, *, alpha0: float = 1.0
    ) -> WolfeLineSearch:
        """A :class:`WolfeLineSearch` with this optimizer's constants."""
        return WolfeLineSearch(
            f0,
            g0_dot_p,
            alpha0,
            c1=self.c1,
            c2=self.c2,
            max_steps=self.max_line_search,
        )

    def n_candidates(
        self, state: Mapping[str, np.ndarray], search: WolfeLineSearch | OrthantSearch
    ) -> int:
        """How many step sizes to evaluate in the next pass of ``search``.

        ``line_search_candidates`` if set.  Otherwise (``None``, automatic):
        one for the first pass of a search (the first trial step is accepted
        in most iterations, and extra candidates would cost compute for
        nothing), and :data:`AUTO_CANDIDATES` in every later pass (the first
        step was rejected: the search needs to look around, and one pass now
        brings several answers).  The choice depends on the search only, so
        runs stay reproducible on any cluster.
        """
        if self.line_search_candidates is not None:
            return self.line_search_candidates
        return 1 if search.n_rounds == 0 else AUTO_CANDIDATES

    def converged(self, f: float, grad: np.ndarray) -> bool:
        """``max|grad| <= tol * max(1, |f|)``."""
        g = np.asarray(grad, dtype=np.float64)
        if g.size == 0:
            return True
        return float(np.max(np.abs(g))) <= self.tol * max(1.0, abs(float(f)))

    def stalled(self, f_prev: float, f: float) -> bool:
        """``f_prev - f <= ftol * max(|f_prev|, |f|, 1)``: the last iteration
        made no meaningful progress."""
        scale = max(abs(float(f_prev)), abs(float(f)), 1.0)
        return float(f_prev) - float(f) <= self.ftol * scale

    def update(
        self,
        grads: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        params: Mapping[str, np.ndarray],
    ) -> tuple[Params, OptState]:
        """Not available: L-BFGS is not a per-step optimizer."""
        raise TypeError(
            "LBFGS has no per-step update(): it needs full-batch training, "
            "where the trainer drives its line search over full passes "
            "(Trainer.fit(..., batch_rows=None)); for a local function use "
            "dasktrain.optim.minimize_lbfgs"
        )


# -- L1 penalties: orthant-wise L-BFGS (OWL-QN) -------------------------------
def pseudo_gradient(x: np.ndarray, grad: np.ndarray, l1: np.ndarray) -> np.ndarray:
    r"""The pseudo-gradient of :math:`F(x) = f(x) + \sum_i l1_i |x_i|`.

    ``grad`` is the gradient of the smooth part :math:`f`.  Where
    :math:`x_i \ne 0` it is :math:`g_i + l1_i \operatorname{sign}(x_i)`; at
    :math:`x_i = 0` it is the one-sided derivative that decreases :math:`F`
    (:math:`g_i + l1_i` if negative, :math:`g_i - l1_i` if positive), else 0:
    the coordinate is optimal at zero.

    Examples
    --------
    >>> import numpy as np
    >>> pseudo_gradient(np.array([1.0, 0.0, 0.0, 0.0]),
    ...                 np.array([0.5, 0.5, 2.0, -2.0]), np.ones(4))
    array([ 1.5,  0. ,  1. , -1. ])
    """
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64)
    l1 = np.broadcast_to(np.asarray(l1, dtype=np.float64), x.shape)
    pg = g + l1 * np.sign(x)
    at_zero = (x == 0.0) & (l1 > 0.0)
    right = g[at_zero] + l1[at_zero]
    left = g[at_zero] - l1[at_zero]
    pg[at_zero] = np.where(right < 0.0, right, np.where(left > 0.0, left, 0.0))
    return pg


def l1_norm(x: np.ndarray, l1: np.ndarray) -> float:
    r""":math:`\sum_i l1_i |x_i|`."""
    return float(np.sum(np.asarray(l1, dtype=np.float64) * np.abs(x)))


class OrthantSearch(_Search):
    r"""The backtracking line search of OWL-QN, driven by the caller.

    Trial points stay in the orthant of the current point:
    :math:`x(\alpha) = \pi(x + \alpha p)`, where :math:`\pi` sets to zero the
    penalized coordinates whose sign leaves the orthant :math:`\xi`
    (:math:`\xi_i = \operatorname{sign}(x_i)`, or
    :math:`\operatorname{sign}(-pg_i)` where :math:`x_i = 0`).  A step is
    accepted when :math:`F(x(\alpha)) \le F(x) + c_1\, pg^\top (x(\alpha) -
    x)` and :math:`F(x(\alpha)) < F(x)`.  Steps are :math:`1, 1/2, 1/4,
    \dots`, several per round if asked (:meth:`next_alphas`); the accepted
    one is the trial with the lowest objective among those that qualify, in
    the first round that has any.

    Parameters
    ----------
    f0 : float
        :math:`F(x)` (with the L1 term).
    x : ndarray
        The current point.
    direction : ndarray
        From :meth:`LBFGS.orthant_direction`.
    pg : ndarray
        :func:`pseudo_gradient` at ``x``.
    l1 : ndarray
        Per-coordinate L1 strengths (0 where not penalized).
    c1 : float
        Sufficient-decrease constant.
    max_rounds : int
        Rounds (passes) before giving up.

    Examples
    --------
    >>> import numpy as np
    >>> x, l1 = np.array([1.0]), np.array([0.5])
    >>> F = lambda z: float((z[0] - 0.2) ** 2 + 0.5 * abs(z[0]))
    >>> pg = pseudo_gradient(x, 2 * (x - 0.2), l1)
    >>> ls = OrthantSearch(F(x), x, -pg, pg, l1)
    >>> alphas = ls.next_alphas(3)
    >>> ls.observe_many([(a, F(ls.point(a))) for a in alphas])
    >>> ls.result.alpha, ls.point(ls.result.alpha)  # projected onto x >= 0
    (1.0, array([0.]))
    """

    def __init__(
        self,
        f0: float,
        x: np.ndarray,
        direction: np.ndarray,
        pg: np.ndarray,
        l1: np.ndarray,
        *,
        c1: float = 1e-4,
        max_rounds: int = 20,
    ) -> None:
        self._f0 = float(f0)
        self._x = np.asarray(x, dtype=np.float64)
        self._p = np.asarray(direction, dtype=np.float64)
        self._pg = np.asarray(pg, dtype=np.float64)
        penalized = np.broadcast_to(np.asarray(l1) > 0.0, self._x.shape)
        orthant = np.where(self._x != 0.0, np.sign(self._x), -np.sign(self._pg))
        self._orthant = np.where(penalized, orthant, 0.0)
        self._c1 = float(c1)
        self._max_rounds = _check_int("max_rounds", max_rounds, minimum=1)
        self._next = 0  # the next step is 2 ** -next
        self._n_rounds = 0
        self._n_evals = 0
        self._result: LineSearchResult | None = None

    def next_alphas(self, k: int) -> list[float]:
        """The next ``k`` steps of the halving sequence."""
        if self._result is not None:
            raise RuntimeError("line search is done: read .result")
        k = _check_int("k", k, minimum=1)
        return [2.0 ** -(self._next + j) for j in range(k)]

    def point(self, alpha: float) -> np.ndarray:
        """The trial point of step ``alpha``, projected on the orthant."""
        trial = self._x + alpha * self._p
        leaves = (self._orthant != 0.0) & (np.sign(trial) != self._orthant)
        trial[leaves] = 0.0
        return trial

    def observe_many(self, trials: Sequence[tuple[float, float]]) -> None:
        """Report ``(alpha, F(point(alpha)))`` for the steps of
        :meth:`next_alphas`, in that order (``F`` may be non-finite)."""
        if self._result is not None:
            raise RuntimeError("line search is done: read .result")
        got = [a for a, _ in trials]
        if not trials or got != self.next_alphas(len(trials)):
            raise ValueError(
                f"observe_many() got steps {got}, expected the next steps of "
                f"next_alphas() from {2.0**-self._next}"
            )
        good = []
        for alpha, f in trials:
            position = self._n_evals
            self._n_evals += 1
            if not (math.isfinite(f) and f < self._f0):
                continue
            decrease = float(self._pg @ (self.point(alpha) - self._x))
            if f <= self._f0 + self._c1 * decrease:
                good.append((float(f), position, float(alpha)))
        self._next += len(trials)
        self._n_rounds += 1
        if good:
            f, position, alpha = min(good)
            self._result = LineSearchResult(
                ARMIJO, alpha, f, math.nan, position, self._n_evals
            )
        elif self._n_rounds >= self._max_rounds:
            self._result = LineSearchResult(
                FAILED, 0.0, self._f0, math.nan, -1, self._n_evals
            )


# -- the reference driver ----------------------------------------------------
class MinimizeResult(NamedTuple):
    """Result of :func:`minimize_lbfgs`."""

    x: np.ndarray
    f: float
    n_evals: int
    n_iter: int


class IterationInfo(NamedTuple):
    """What :func:`minimize_lbfgs` passes to its callback after each iteration."""

    n_iter: int
    n_evals: int
    x: np.ndarray
    f: float
    grad: np.ndarray
    state: OptState


FunAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]
FunAndGradMany = Callable[[list[np.ndarray]], Sequence[tuple[float, np.ndarray]]]


def minimize_lbfgs(
    fun_and_grad: FunAndGrad,
    x0: np.ndarray,
    *,
    optimizer: LBFGS,
    max_iter: int,
    state: Mapping[str, np.ndarray] | None = None,
    callback: Callable[[IterationInfo], bool | None] | None = None,
    fun_and_grad_many: FunAndGradMany | None = None,
    l1: float | np.ndarray = 0.0,
) -> MinimizeResult:
    """Minimize ``fun_and_grad`` from ``x0`` with L-BFGS.

    The reference loop (see the module docstring): direction, line search
    (one evaluation per trial), push the pair, test convergence.

    Parameters
    ----------
    fun_and_grad : callable
        ``x -> (f, grad)`` for a flat float64 ``x``.
    x0 : ndarray, shape (n,)
        Starting point.
    optimizer : LBFGS
        Settings (history, tolerance, line search).
    max_iter : int
        Maximum number of iterations (line searches).
    state : dict, optional
        A state from an earlier run, to continue with its history.
    callback : callable, optional
        Called with an :class:`IterationInfo` after each accepted step;
        returning True stops.
    fun_and_grad_many : callable, optional
        ``[x_1, ..., x_k] -> [(f_1, grad_1), ...]``, evaluating several
        points at once (for example in one pass over data).  When given, the
        line search evaluates :meth:`LBFGS.n_candidates` step sizes per call.
    l1 : float or ndarray, optional
        L1 strengths (a scalar or one per coordinate, ``>= 0``): minimizes
        ``f(x) + sum(l1 * |x|)`` with OWL-QN (orthant-wise L-BFGS), where
        ``fun_and_grad`` gives the smooth part ``f`` and its gradient.  The
        result's ``f`` includes the L1 term.

    Returns
    -------
    MinimizeResult
        ``(x, f, n_evals, n_iter)``: the final point and value, the number of
        evaluation rounds (calls of ``fun_and_grad`` or of
        ``fun_and_grad_many``) and of completed iterations.

    Examples
    --------
    >>> import numpy as np
    >>> def rosenbrock(x):
    ...     f = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
    ...     g = np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2),
    ...                   200 * (x[1] - x[0] ** 2)])
    ...     return float(f), g
    >>> res = minimize_lbfgs(rosenbrock, np.array([-1.2, 1.0]),
    ...                      optimizer=LBFGS(), max_iter=200)
    >>> np.round(res.x, 5)
    array([1., 1.])
    """
    max_iter = _check_int("max_iter", max_iter, minimum=0)
    x = np.array(x0, dtype=np.float64).ravel()
    l1v = check_l1(l1, x.size)
    owl = bool(np.any(l1v > 0.0))
    f, g = _evaluate(fun_and_grad, x)
    n_evals = 1
    if not math.isfinite(f) or not np.all(np.isfinite(g)):
        raise ValueError(f"objective or gradient is not finite at x0 (f={f})")
    total = f + l1_norm(x, l1v) if owl else f  # F: the objective minimized
    current = optimizer.init_state(x.size) if state is None else dict(state)
    n_iter = 0
    for _ in range(max_iter):
        pg = pseudo_gradient(x, g, l1v) if owl else g
        if optimizer.converged(total, pg):
            logger.debug("L-BFGS converged: max|g|=%g", float(np.max(np.abs(pg))))
            break
        ls: WolfeLineSearch | OrthantSearch
        if owl:
            p = optimizer.orthant_direction(current, pg)
            ls = optimizer.orthant_search(total, x, p, pg, l1v)
        else:
            p = optimizer.direction(current, g)
            ls = optimizer.line_search(f, float(g @ p))
        trials: list[tuple[np.ndarray, float, np.ndarray]] = []
        while not ls.done:
            k = 1 if fun_and_grad_many is None else optimizer.n_candidates(current, ls)
            alphas = ls.next_alphas(k)
            points = [
                ls.point(a) if isinstance(ls, OrthantSearch) else x + a * p
                for a in alphas
            ]
            if fun_and_grad_many is None:
                values = [_evaluate(fun_and_grad, points[0])]
            else:
                values = _evaluate_many(fun_and_grad_many, points)
            n_evals += 1
            if isinstance(ls, OrthantSearch):
                ls.observe_many(
                    [
                        (a, f_t + l1_norm(x_t, l1v))
                        for a, x_t, (f_t, _) in zip(alphas, points, values, strict=True)
                    ]
                )
            else:
                ls.observe_many(
                    [
                        (a, f_t, float(g_t @ p))
                        for a, (f_t, g_t) in zip(alphas, values, strict=True)
                    ]
                )
            trials.extend(
                (x_t, f_t, g_t) for x_t, (f_t, g_t) in zip(points, values, strict=True)
            )
        result = ls.result
        if not result.accepted:
            if int(current["n_hist"]) == 0:
                logger.debug("L-BFGS: no decrease along -grad; stopping at %r", total)
                break
            logger.debug("L-BFGS: line search failed; restarting from -grad")
            current = optimizer.reset(current)
            continue
        x_new, f_new, g_new = trials[result.trial_index]
        # The pairs describe the smooth part only (OWL-QN).
        current = optimizer.push(current, x_new - x, g_new - g)
        total_new = f_new + l1_norm(x_new, l1v) if owl else f_new
        stalled = optimizer.stalled(total, total_new)
        x, f, g, total = x_new, f_new, g_new, total_new
        n_iter += 1
        logger.debug(
            "L-BFGS iteration %d: f=%r alpha=%g evals=%d (%s)",
            n_iter,
            total,
            result.alpha,
            result.n_evals,
            result.status,
        )
        if callback is not None and callback(
            IterationInfo(n_iter, n_evals, x.copy(), total, g.copy(), current)
        ):
            break
        if stalled:
            logger.debug("L-BFGS: relative decrease below ftol; stopping at %r", total)
            break
    logger.info(
        "L-BFGS: f=%r after %d iterations, %d evaluations", total, n_iter, n_evals
    )
    return MinimizeResult(x, total, n_evals, n_iter)


def check_l1(l1: float | np.ndarray, n: int) -> np.ndarray:
    """Per-coordinate L1 strengths as a float64 vector of ``n`` (>= 0)."""
    l1v = np.array(np.broadcast_to(np.asarray(l1, dtype=np.float64), (n,)))
    if not np.all(np.isfinite(l1v)) or np.any(l1v < 0.0):
        raise ValueError("l1 strengths must be finite and >= 0")
    return l1v


def _evaluate(fun_and_grad: FunAndGrad, x: np.ndarray) -> tuple[float, np.ndarray]:
    f, g = fun_and_grad(x.copy())
    return _checked(x, f, g)


def _checked(x: np.ndarray, f: object, g: object) -> tuple[float, np.ndarray]:
    grad = np.asarray(g, dtype=np.float64).ravel()
    if grad.shape != x.shape:
        raise ValueError(f"gradient has shape {grad.shape}, expected {x.shape}")
    return float(f), grad  # type: ignore[arg-type]


def _evaluate_many(
    fun_and_grad_many: FunAndGradMany, points: list[np.ndarray]
) -> list[tuple[float, np.ndarray]]:
    values = list(fun_and_grad_many([x.copy() for x in points]))
    if len(values) != len(points):
        raise ValueError(
            f"fun_and_grad_many returned {len(values)} values for {len(points)} points"
        )
    return [_checked(x, f, g) for x, (f, g) in zip(points, values, strict=True)]
