"""Second-order passes: data loss, gradient and Hessian sums on the workers.

A pass of :class:`~dasktrain.optim.Newton` is a pass of the engine (one task
per worker thread, each chunk on the worker that caches it, the fixed
reduction tree, retries on lost workers) whose leaves compute
:func:`~dasktrain.models.glm.second_order_terms` at one or a few points, or,
for the one-pass start, a local Newton solve per chunk
(:func:`~dasktrain.optim.newton.local_newton_solve`) and its quadratic
model.  Gradients and Hessians are float64 arrays summed by the tree like any
gradient, so they have the same bits on any number of workers.

Leaf partials, per point (packed with
:func:`~dasktrain.engine.tasks.pack_candidates` when there are several)::

    grads["grad"]     (P,)    sum of the data-loss gradients
    grads["hessian"]  (P, P)  sum of the data-loss Hessians (one point only)

and of a local pass (its ``loss_sum`` is at the starting point)::

    grads["model_hessian"]  (P, P)    sum of the chunks' H_c at their solutions
    grads["model_linear"]   (P,)      sum of H_c w_c - G_c
    metrics["model_constant"]         sum of L_c - G_c.w_c + w_c.H_c.w_c / 2
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dasktrain.data.io import DatasetRef
from dasktrain.engine.engine import Engine, PassResult
from dasktrain.engine.plan import Piece
from dasktrain.engine.tasks import (
    LoadedChunk,
    TaskReport,
    _batch,
    _check_labels,
    leaf_partials,
    pack_candidates,
    unpack_candidates,
)
from dasktrain.models.base import Model
from dasktrain.models.glm import (
    SecondOrderTerms,
    penalty_vectors,
    second_order_terms,
    second_order_terms_many,
)
from dasktrain.optim.newton import (
    DEFAULT_LOCAL_ROWS,
    LOCAL_MIN_ROWS_PER_COEF,
    LocalValue,
    PointValue,
    local_newton_solve,
)
from dasktrain.partial import Node, Partial

logger = logging.getLogger(__name__)

__all__ = [
    "GRAD",
    "HESSIAN",
    "MODEL_CONSTANT",
    "MODEL_HESSIAN",
    "MODEL_LINEAR",
    "SecondOrderEngine",
    "local_partial",
    "local_value",
    "point_value",
    "second_order_leaves",
]

GRAD = "grad"
HESSIAN = "hessian"
MODEL_HESSIAN = "model_hessian"
MODEL_LINEAR = "model_linear"
MODEL_CONSTANT = "model_constant"


def _terms_partial(terms: SecondOrderTerms) -> Partial:
    grads: dict[str, np.ndarray] = {GRAD: terms.grad}
    if terms.hessian is not None:
        grads[HESSIAN] = terms.hessian
    return Partial(terms.loss_sum, grads, terms.n_rows, terms.metrics)


def local_partial(
    model: Model,
    start: np.ndarray,
    batch: Mapping[str, np.ndarray],
    *,
    iterations: int,
    first_rows: int,
    hessian_rows: int | None,
) -> Partial:
    """The leaf of a local pass for one piece of data (pure NumPy): the loss
    sum at ``start`` and the quadratic model of the piece's loss sum around
    the end of its local Newton solve (see the module docs)."""
    X = batch["X"]
    n_rows = int(X.shape[0])
    l2, l1 = penalty_vectors(model, int(X.shape[1]))
    metrics: list[dict[str, float]] = []

    def evaluate(
        x: np.ndarray, rows: int | None, with_grad: bool
    ) -> tuple[float, np.ndarray | None, np.ndarray | None, int]:
        if rows is None or rows >= n_rows:
            part = batch
        else:
            stride = -(-n_rows // rows)
            part = {k: v[::stride] for k, v in batch.items()}
        terms = second_order_terms(
            model,
            x,
            part,
            with_grad=with_grad,
            with_hessian=with_grad,
            hessian_rows=hessian_rows,
        )
        if not metrics:
            metrics.append(terms.metrics)  # at the start, on every row
        grad = terms.grad if with_grad else None
        return terms.loss_sum, grad, terms.hessian, terms.n_rows

    enough = n_rows >= LOCAL_MIN_ROWS_PER_COEF * start.size
    solve = local_newton_solve(
        evaluate,
        start,
        l2,
        l1,
        iterations=iterations if enough else 0,
        first_rows=first_rows,
    )
    A, r, c0 = solve.model()
    grads = {MODEL_HESSIAN: A, MODEL_LINEAR: r}
    return Partial(solve.start_loss, grads, n_rows, {**metrics[0], MODEL_CONSTANT: c0})


def second_order_leaves(
    ref: DatasetRef,
    model: Model,
    points: Sequence[np.ndarray],
    leaves: Sequence[tuple[int, Piece]],
    n_leaves: int,
    *,
    hessian_index: int | None,
    hessian_rows: int | None,
    local_iterations: int | None = None,
    local_rows: int = DEFAULT_LOCAL_ROWS,
    nonfinite: str = "raise",
) -> tuple[dict[Node, Partial], TaskReport]:
    """A task of a second-order pass: for each leaf, the terms at every
    point (packed), or with ``local_iterations``, the local solve from
    ``points[0]``; pre-reduced into the largest subtrees this task holds.
    Chunks are read ahead as in :func:`~dasktrain.engine.tasks.leaf_partials`.
    """

    def compute(piece: Piece, loaded: LoadedChunk, was_hit: bool) -> Partial:
        _check_labels(model, ref, piece.chunk_id, loaded)
        batch = _batch(loaded, piece)
        if local_iterations is not None:
            return local_partial(
                model,
                np.asarray(points[0], dtype=np.float64),
                batch,
                iterations=local_iterations,
                first_rows=local_rows,
                hessian_rows=hessian_rows,
            )
        terms = second_order_terms_many(
            model,
            list(points),
            batch,
            hessian_index=hessian_index,
            hessian_rows=hessian_rows,
        )
        return pack_candidates([_terms_partial(t) for t in terms])

    return leaf_partials(
        ref, model.fields, leaves, n_leaves, compute, nonfinite=nonfinite
    )


def point_value(partial: Partial) -> PointValue:
    """Means over rows of a point's reduced sums (``nan`` without rows)."""
    n = partial.n_rows
    scale = 1.0 / n if n else float("nan")
    grad = np.asarray(partial.grads[GRAD], dtype=np.float64) * scale
    hessian = partial.grads.get(HESSIAN)
    return PointValue(
        float(partial.loss_sum) * scale,
        grad,
        None if hessian is None else np.asarray(hessian, dtype=np.float64) * scale,
    )


def local_value(partial: Partial) -> LocalValue:
    """Means over rows of a local pass's reduced sums."""
    n = partial.n_rows
    scale = 1.0 / n if n else float("nan")
    return LocalValue(
        float(partial.loss_sum) * scale,
        np.asarray(partial.grads[MODEL_HESSIAN], dtype=np.float64) * scale,
        np.asarray(partial.grads[MODEL_LINEAR], dtype=np.float64) * scale,
        float(partial.metrics[MODEL_CONSTANT]) * scale,
    )


class SecondOrderEngine:
    """Runs second-order passes with an :class:`~dasktrain.engine.Engine`
    (same placement, cache, tree and retries as its passes)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run_pass(
        self,
        ref: DatasetRef,
        model: Model,
        points: Sequence[np.ndarray],
        pieces: Sequence[Piece],
        *,
        placement_chunks: Sequence[int] | None = None,
        hessian_index: int | None = 0,
        hessian_rows: int | None = None,
        local_iterations: int | None = None,
        local_rows: int = DEFAULT_LOCAL_ROWS,
        nonfinite: str = "raise",
    ) -> list[PassResult]:
        """One pass over ``pieces``: a result per point (its partial holds
        the sums of :func:`second_order_leaves`), or, with
        ``local_iterations``, one result of the local pass from
        ``points[0]``.  The results share the pass's time and reports."""
        if not points:
            raise ValueError("a pass needs at least one point")
        if not pieces:
            raise ValueError("a pass needs at least one piece")
        payload = [np.asarray(p, dtype=np.float64) for p in points]
        kwargs: dict[str, Any] = {
            "hessian_index": hessian_index,
            "hessian_rows": hessian_rows,
            "local_iterations": local_iterations,
            "local_rows": local_rows,
            "nonfinite": nonfinite,
        }
        # One pass on the cluster (sync point; see Engine.run_pass).
        packed = self.engine._leaf_pass(
            ref,
            model,
            pieces,
            placement_chunks,
            second_order_leaves,
            payload,
            sum(p.nbytes for p in payload),
            kwargs,
        )
        if local_iterations is not None:
            return [packed]
        return [
            PassResult(part, packed.seconds, packed.reports)
            for part in unpack_candidates(packed.partial, len(payload))
        ]
