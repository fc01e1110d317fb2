"""Functions that run inside worker processes.

They live in the installed package so that any worker, including ones
started by ``dask worker`` on other machines, can import them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dasktrain.data.io import DatasetRef, check_finite, read_chunk
from dasktrain.engine.cache import ChunkCache, worker_cache
from dasktrain.engine.plan import Piece, row_permutation
from dasktrain.errors import LabelError
from dasktrain.models.base import Model
from dasktrain.partial import Node, Partial, covering_nodes, reduce_node

logger = logging.getLogger(__name__)

__all__ = [
    "FAILED_LEAF_ATTRIBUTE",
    "NONFINITE_POLICIES",
    "LoadedChunk",
    "TaskReport",
    "compute_leaves",
    "load_chunk",
    "predict_chunk",
]

NONFINITE_POLICIES = ("raise", "skip")
#: Attribute set on an exception raised for a leaf: the leaf's position.
FAILED_LEAF_ATTRIBUTE = "dasktrain_leaf"


@dataclass(frozen=True)
class LoadedChunk:
    """A decoded, validated chunk: arrays by field and, if rows with NaN/inf
    were dropped, the mask of rows kept."""

    arrays: Mapping[str, np.ndarray]
    valid: np.ndarray | None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.valid is None else int(self.valid.nbytes)
        return sum(int(a.nbytes) for a in self.arrays.values()) + extra


@dataclass(frozen=True)
class TaskReport:
    """What one task did, for throughput and cache metrics."""

    worker: str
    seconds: float
    n_rows: int
    cache_hits: int
    cache_misses: int


def _finite_rows(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "fc":
        return np.ones(arr.shape[0], dtype=bool)
    ok = np.isfinite(arr)
    return ok.reshape(ok.shape[0], -1).all(axis=1) if ok.ndim > 1 else ok


def load_chunk(
    ref: DatasetRef,
    fields: Sequence[str],
    chunk_id: int,
    *,
    nonfinite: str = "raise",
    cache: ChunkCache | None = None,
) -> tuple[LoadedChunk, bool]:
    """Decoded chunk from the worker cache, or read, checked and cached.

    Returns the chunk and whether it came from the cache.  NaN/inf raise
    :class:`~dasktrain.errors.NonFiniteDataError` naming store, array, chunk
    and row, unless ``nonfinite="skip"``, which drops those rows.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}"
        )
    key = (ref.url, ref.uuid, int(chunk_id), tuple(fields), nonfinite)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit, True
    arrays = {f: read_chunk(ref, f, chunk_id) for f in fields}
    valid: np.ndarray | None = None
    if nonfinite == "raise":
        for f, a in arrays.items():
            check_finite(a, ref, f, chunk_id)
    else:
        mask = np.ones(next(iter(arrays.values())).shape[0], dtype=bool)
        for a in arrays.values():
            mask &= _finite_rows(a)
        if not mask.all():
            start, _ = ref.chunk_bounds(chunk_id)
            logger.warning(
                "store %s chunk %d: skipping %d rows with NaN/inf (first: row %d)",
                ref.url,
                chunk_id,
                int((~mask).sum()),
                start + int(np.argmin(mask)),
            )
            valid = mask
    loaded = LoadedChunk(arrays, valid)
    if cache is not None:
        cache.put(key, loaded, loaded.nbytes, group=(ref.url, ref.uuid))
    return loaded, False


def _batch(loaded: LoadedChunk, piece: Piece) -> dict[str, np.ndarray]:
    n = next(iter(loaded.arrays.values())).shape[0]
    if (
        piece.shuffle is None
        and piece.start == 0
        and piece.stop == n
        and loaded.valid is None
    ):
        return dict(loaded.arrays)
    if piece.shuffle is not None:
        idx = row_permutation(piece.shuffle[0], piece.shuffle[1], piece.chunk_id, n)[
            piece.start : piece.stop
        ]
    else:
        idx = np.arange(piece.start, piece.stop)
    if loaded.valid is not None:
        idx = idx[loaded.valid[idx]]
    if piece.shuffle is None and loaded.valid is None:
        return {f: a[piece.start : piece.stop] for f, a in loaded.arrays.items()}
    return {f: a[idx] for f, a in loaded.arrays.items()}


def _check_labels(
    model: Model, ref: DatasetRef, chunk_id: int, loaded: LoadedChunk
) -> None:
    """Raise :class:`LabelError` naming the first row of the chunk whose label
    does not fit ``model``.

    The whole chunk (less skipped rows) is checked, not the step's rows: a
    minibatch is a shuffled slice, whose positions are not chunk rows.
    """
    y = loaded.arrays.get("y")
    if y is None:
        return
    kept: np.ndarray | None = None
    if loaded.valid is not None:
        kept = np.flatnonzero(loaded.valid)
        y = y[kept]
    problem = model.check_labels(y)
    if problem is not None:
        row, message = problem
        if kept is not None:
            row = int(kept[row])
        start, _ = ref.chunk_bounds(chunk_id)
        raise LabelError(
            f"store {ref.url!r}, array 'y', chunk {chunk_id}: "
            f"row {start + row}: {message}"
        )


def compute_leaves(
    ref: DatasetRef,
    model: Model,
    params: Mapping[str, np.ndarray],
    leaves: Sequence[tuple[int, Piece]],
    n_leaves: int,
    *,
    with_grads: bool = True,
    nonfinite: str = "raise",
) -> tuple[dict[Node, Partial], TaskReport]:
    """Partials of the given leaves of the reduction tree, pre-reduced into the
    largest subtrees this task holds completely."""
    t0 = time.perf_counter()
    cache = worker_cache()
    hits = misses = n_rows = 0
    cast: dict[str, np.ndarray] | None = None
    known: dict[Node, Partial] = {}
    for leaf, piece in leaves:
        try:
            loaded, was_hit = load_chunk(
                ref, model.fields, piece.chunk_id, nonfinite=nonfinite, cache=cache
            )
            hits += was_hit
            misses += not was_hit
            _check_labels(model, ref, piece.chunk_id, loaded)
            batch = _batch(loaded, piece)
            if cast is None:
                dtype = batch["X"].dtype if "X" in batch else np.dtype(np.float64)
                cast = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
            part = (
                model.loss_and_grad(cast, batch)
                if with_grads
                else model.loss(cast, batch)
            )
        except Exception as exc:
            # Tag the error with its leaf: the engine reports the failure of
            # the first leaf in tree order, whichever task failed first.
            setattr(exc, FAILED_LEAF_ATTRIBUTE, leaf)
            raise
        known[(0, leaf)] = part
        n_rows += part.n_rows
    nodes = covering_nodes([leaf for leaf, _ in leaves], n_leaves)
    out = {node: reduce_node(node, n_leaves, known) for node in nodes}
    try:
        from distributed import get_worker

        address = get_worker().address
    except ValueError:
        address = "local"
    report = TaskReport(address, time.perf_counter() - t0, n_rows, hits, misses)
    return out, report


def predict_chunk(
    ref: DatasetRef,
    model: Model,
    params: Mapping[str, np.ndarray],
    chunk_id: int,
    kind: str,
) -> np.ndarray:
    """Predictions for one chunk of a stored dataset (``kind``: "predict",
    "predict_proba" or "decision_function")."""
    loaded, _ = load_chunk(ref, ("X",), chunk_id, cache=worker_cache())
    X = loaded.arrays["X"]
    fn: Any = getattr(model, kind)
    return np.asarray(fn({k: np.asarray(v) for k, v in params.items()}, X))
