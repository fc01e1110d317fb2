"""Partial results of a pass over data, and their fixed-shape tree reduction.

A :class:`Partial` holds *sums* over the rows it covers (loss, gradients,
metrics) and the row count.  ``combine`` adds two partials; it is associative
in exact arithmetic, and :func:`tree_reduce` fixes the order of additions so
that floating point results depend only on the number of leaves, never on
which worker computed what or when results arrived.

This module imports neither dask nor zarr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Partial",
    "RowSparse",
    "combine",
    "covering_nodes",
    "id_positions",
    "node_span",
    "reduce_node",
    "reduce_rows",
    "sum_by_index",
    "tree_depth",
    "tree_reduce",
    "unique_ids",
    "weighted_mean",
    "weighted_sum",
]


@dataclass(frozen=True)
class RowSparse:
    """A row-sparse gradient: ``values[i]`` belongs to row ``rows[i]`` of a
    tensor of shape ``shape``.  ``rows`` is sorted and unique."""

    rows: np.ndarray
    values: np.ndarray
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.rows.ndim != 1 or self.values.shape[0] != self.rows.shape[0]:
            raise ValueError("RowSparse: rows must be 1-d and match values' first axis")

    @classmethod
    def from_unsorted(
        cls, rows: np.ndarray, values: np.ndarray, shape: tuple[int, ...]
    ) -> RowSparse:
        """Sum duplicate rows and sort (deterministic: ``np.add.at`` in input
        order)."""
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = sum_by_index(inverse, values, uniq.shape[0]).astype(values.dtype)
        return cls(uniq.astype(np.int64), out, tuple(shape))

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=self.values.dtype)
        dense[self.rows] = self.values
        return dense

    def __add__(self, other: RowSparse) -> RowSparse:
        if self.shape != other.shape:
            raise ValueError(f"RowSparse shapes differ: {self.shape} vs {other.shape}")
        # A merge of two sorted row sets.  Each row's sum is formed as
        # ``(0.0 + a) + b`` in float64, the same bits as ``from_unsorted`` of
        # the concatenation (``np.bincount`` adds in input order from 0.0).
        a, b = self.rows, other.rows
        dtype = np.result_type(self.values, other.values)
        va = np.asarray(self.values, dtype=np.float64)
        vb = np.asarray(other.values, dtype=np.float64)
        if a.shape == b.shape and np.array_equal(a, b):
            out = (0.0 + va) + vb
            union = a
        else:
            rows = np.concatenate([a, b])
            rows.sort(kind="stable")  # two sorted runs: a linear merge
            if rows.shape[0]:
                first = np.empty(rows.shape[0], dtype=bool)
                first[0] = True
                np.not_equal(rows[1:], rows[:-1], out=first[1:])
                union = rows[first]
            else:
                union = rows
            out = np.zeros((union.shape[0], *va.shape[1:]), dtype=np.float64)
            out[np.searchsorted(union, a)] += va
            out[np.searchsorted(union, b)] += vb
        return RowSparse(
            union.astype(np.int64, copy=False),
            out.astype(dtype, copy=False),
            self.shape,
        )

    def scaled(self, factor: float) -> RowSparse:
        return RowSparse(self.rows, self.values * factor, self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.values.nbytes)


Grad = np.ndarray | RowSparse


#: Bounded ids are found by a mask of the table's rows, instead of a sort,
#: when the table has at most this many rows per id looked at (plus
#: :data:`_MASK_SLACK`): a mask costs a byte per table row, a sort
#: ``log2(m)`` comparisons per id.
_MASK_ROWS_PER_ID = 64
_MASK_SLACK = 1 << 18
#: Likewise, positions are looked up in a table of one index per row (8 bytes
#: per table row) instead of by binary search.
_LOOKUP_ROWS_PER_ID = 16
_LOOKUP_SLACK = 1 << 16


def unique_ids(ids: np.ndarray, n_rows: int) -> np.ndarray:
    """``np.unique(ids)`` (sorted, unique, same dtype) for ids known to lie
    in ``[0, n_rows)``: by a mask of the rows when the table is small
    compared with the number of ids, an order of magnitude faster."""
    ids = np.asarray(ids).reshape(-1)
    if n_rows > _MASK_ROWS_PER_ID * ids.shape[0] + _MASK_SLACK:
        return np.unique(ids)
    mask = np.zeros(n_rows, dtype=bool)
    mask[ids] = True
    return np.flatnonzero(mask).astype(ids.dtype, copy=False)


def id_positions(sorted_ids: np.ndarray, ids: np.ndarray, n_rows: int) -> np.ndarray:
    """``np.searchsorted(sorted_ids, ids)`` when every id of ``ids`` is in
    ``sorted_ids`` (sorted, unique, within ``[0, n_rows)``): by a lookup
    table of the rows when the table is small compared with the ids."""
    ids = np.asarray(ids)
    if n_rows > _LOOKUP_ROWS_PER_ID * ids.size + _LOOKUP_SLACK:
        return np.searchsorted(sorted_ids, ids)
    where = np.empty(n_rows, dtype=np.intp)
    where[sorted_ids] = np.arange(sorted_ids.shape[0], dtype=np.intp)
    return where[ids]


def sum_by_index(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """``out[j] = sum of values[i] for index[i] == j`` in float64, adding in
    the order of ``i`` from 0.0: the same bits as ``np.add.at``, an order of
    magnitude faster (one ``np.bincount`` per column)."""
    values = np.asarray(values, dtype=np.float64)
    index = np.asarray(index, dtype=np.intp).reshape(-1)
    if values.ndim == 1:
        return np.bincount(index, weights=values, minlength=n)
    flat = values.reshape(values.shape[0], math.prod(values.shape[1:]))
    columns = np.ascontiguousarray(flat.T)
    out = np.empty((n, columns.shape[0]), dtype=np.float64)
    for j in range(columns.shape[0]):
        out[:, j] = np.bincount(index, weights=columns[j], minlength=n)
    return out.reshape((n, *values.shape[1:]))


@dataclass(frozen=True)
class Partial:
    """Sums over a set of rows.

    Attributes
    ----------
    loss_sum:
        Sum of the per-row data loss (no regularization), float64.
    grads:
        Parameter name -> sum over rows of the gradient of the per-row loss
        (float64 dense arrays, or :class:`RowSparse`).
    n_rows:
        Number of rows summed.
    metrics:
        Other sums, e.g. ``{"correct": 1234.0}`` for classifiers.
    """

    loss_sum: float
    grads: Mapping[str, Grad]
    n_rows: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(g.nbytes) for g in self.grads.values())

    def mean_loss(self) -> float:
        return self.loss_sum / self.n_rows if self.n_rows else float("nan")

    def mean_grads(self) -> dict[str, Grad]:
        scale = 1.0 / self.n_rows if self.n_rows else float("nan")
        return {
            k: (g.scaled(scale) if isinstance(g, RowSparse) else g * scale)
            for k, g in self.grads.items()
        }


def combine(a: Partial, b: Partial) -> Partial:
    """Add two partials (``a`` first: the order is part of the result)."""
    if a.grads.keys() != b.grads.keys():
        raise ValueError(
            f"cannot combine partials with different gradients: "
            f"{sorted(a.grads)} vs {sorted(b.grads)}"
        )
    grads: dict[str, Grad] = {}
    for k, ga in a.grads.items():
        gb = b.grads[k]
        if isinstance(ga, RowSparse) or isinstance(gb, RowSparse):
            if not (isinstance(ga, RowSparse) and isinstance(gb, RowSparse)):
                raise TypeError(
                    f"gradient {k!r} is dense in one partial, sparse in other"
                )
            grads[k] = ga + gb
        else:
            grads[k] = ga + gb
    metrics = dict(a.metrics)
    for k, v in b.metrics.items():
        metrics[k] = metrics.get(k, 0.0) + v
    return Partial(a.loss_sum + b.loss_sum, grads, a.n_rows + b.n_rows, metrics)


# ---------------------------------------------------------------------------
# The fixed reduction tree.
#
# Leaves are positions 0 .. n-1.  Node (level, i) covers leaves
# [i * 2**level, min((i + 1) * 2**level, n)).  A node with two non-empty
# children is combine(left, right); a node whose right child is empty is its
# left child unchanged.  The root is (tree_depth(n), 0).  Any worker that holds
# every leaf of a node may compute that node itself: the result is the same
# bits, because the same additions happen in the same order.
# ---------------------------------------------------------------------------

Node = tuple[int, int]


def tree_depth(n_leaves: int) -> int:
    """Level of the root of the tree over ``n_leaves`` leaves."""
    if n_leaves < 1:
        raise ValueError("a reduction tree needs at least one leaf")
    return int(n_leaves - 1).bit_length()


def node_span(node: Node, n_leaves: int) -> range:
    level, i = node
    start = i << level
    return range(start, min((i + 1) << level, n_leaves))


def covering_nodes(leaves: Iterable[int], n_leaves: int) -> list[Node]:
    """The maximal tree nodes whose leaves are all in ``leaves``, in leaf order.

    A worker holding ``leaves`` reduces each of these nodes locally and sends
    only them.
    """
    held = set(leaves)
    out: list[Node] = []

    def visit(node: Node) -> None:
        span = node_span(node, n_leaves)
        if len(span) == 0:
            return
        if all(j in held for j in span):
            out.append(node)
            return
        level, i = node
        if level == 0:
            return
        visit((level - 1, 2 * i))
        visit((level - 1, 2 * i + 1))

    visit((tree_depth(n_leaves), 0))
    return out


def reduce_node(node: Node, n_leaves: int, known: Mapping[Node, Partial]) -> Partial:
    """Value of ``node`` from known nodes (leaves or pre-reduced subtrees)."""
    if node in known:
        return known[node]
    level, i = node
    if level == 0:
        raise KeyError(f"leaf {i} of the reduction tree is missing")
    left = (level - 1, 2 * i)
    right = (level - 1, 2 * i + 1)
    if len(node_span(right, n_leaves)) == 0:
        return reduce_node(left, n_leaves, known)
    return combine(
        reduce_node(left, n_leaves, known), reduce_node(right, n_leaves, known)
    )


#: :func:`reduce_rows` adds on dense row arrays only while one holds at most
#: this many bytes (about one per tree level is alive at a time: a few times
#: this on a worker's memory, outside its budget), and the table has at most
#: :data:`_DENSE_ROWS_PER_ROW` rows per row the node's leaves hold.
_DENSE_NODE_BYTES = 8 << 20
_DENSE_ROWS_PER_ROW = 4


def reduce_rows(
    node: Node, n_leaves: int, known: Mapping[Node, RowSparse]
) -> RowSparse:
    """:func:`reduce_node` for one row-sparse gradient, with the same bits.

    Merging sorted row sets costs a sort and a gather per addition; when the
    rows the leaves touch cover a good part of the table, the additions are
    made instead on dense ``(n_rows, width)`` arrays (absent rows hold
    ``+0.0``) with a mask of the rows present.  Each row's value is then
    ``(0.0 + left) + right``, exactly as :meth:`RowSparse.__add__` forms it
    (``x + 0.0 == x`` for any ``x`` that is not ``-0.0``, and ``0.0 + left``
    never is).  Float64 values only; others take :func:`reduce_node`.
    """
    if node in known:
        return known[node]
    span = node_span(node, n_leaves)
    parts = [
        g
        for n, g in known.items()
        if n[0] < node[0]
        and node_span(n, n_leaves).start >= span.start
        and node_span(n, n_leaves).stop <= span.stop
    ]
    if not parts:
        raise KeyError(f"no known node under {node} of the reduction tree")
    shape = parts[0].shape
    n_rows = int(shape[0]) if shape else 0
    width = math.prod(shape[1:])
    held = sum(int(g.rows.shape[0]) for g in parts)
    if (
        any(g.values.dtype != np.float64 or g.shape != shape for g in parts)
        or n_rows * width * 8 > _DENSE_NODE_BYTES
        or n_rows > _DENSE_ROWS_PER_ROW * held
    ):
        wrapped = {n: Partial(0.0, {"g": g}, 0) for n, g in known.items()}
        out = reduce_node(node, n_leaves, wrapped).grads["g"]
        assert isinstance(out, RowSparse)
        return out

    def scattered(g: RowSparse, plus_zero: bool) -> tuple[np.ndarray, np.ndarray]:
        values = np.zeros((n_rows, *shape[1:]), dtype=np.float64)
        values[g.rows] = (0.0 + g.values) if plus_zero else g.values
        present = np.zeros(n_rows, dtype=bool)
        present[g.rows] = True
        return values, present

    def dense(at: Node) -> tuple[np.ndarray, np.ndarray]:
        if at in known:
            return scattered(known[at], False)
        level, i = at
        if level == 0:
            raise KeyError(f"leaf {i} of the reduction tree is missing")
        left = (level - 1, 2 * i)
        right = (level - 1, 2 * i + 1)
        if len(node_span(right, n_leaves)) == 0:
            return dense(left)
        # (0.0 + left): absent rows hold +0.0 already, so a known left node
        # needs it on its own rows only.
        if left in known:
            values, present = scattered(known[left], True)
        else:
            values, present = dense(left)
            np.add(0.0, values, out=values)
        if right in known:
            # Adding +0.0 changes no row of (0.0 + left): add on its rows.
            g = known[right]
            values[g.rows] += g.values
            present[g.rows] = True
        else:
            other, other_present = dense(right)
            values += other
            present |= other_present
        return values, present

    values, present = dense(node)
    rows = np.flatnonzero(present)
    return RowSparse(rows.astype(np.int64, copy=False), values[rows], tuple(shape))


def tree_reduce(
    items: Mapping[Node, Partial] | list[Partial], n_leaves: int | None = None
) -> Partial:
    """Reduce partials by the fixed tree.

    ``items`` is either the list of leaf partials in leaf order, or a mapping
    ``(level, index) -> Partial`` of nodes that together cover all leaves.
    """
    if isinstance(items, list):
        n = len(items)
        known: dict[Node, Partial] = {(0, j): p for j, p in enumerate(items)}
    else:
        if n_leaves is None:
            raise ValueError("n_leaves is required when reducing tree nodes")
        n = n_leaves
        known = dict(items)
    return reduce_node((tree_depth(n), 0), n, known)


# ---------------------------------------------------------------------------
# Row-weighted averages through the same tree (local SGD's model averaging).
#
# A leaf that trained its own copy of some arrays on ``n`` rows sends them as
# a Partial whose ``grads`` hold ``n * value`` (float64) and whose ``n_rows``
# is ``n``; the fixed tree sums these like gradients, and dividing by the
# total row count gives the row-weighted mean, with the same bits on any
# cluster.
# ---------------------------------------------------------------------------


def weighted_sum(
    values: Mapping[str, np.ndarray],
    n_rows: int,
    *,
    loss_sum: float = 0.0,
    metrics: Mapping[str, float] | None = None,
) -> Partial:
    """A leaf of a row-weighted average: ``grads[k] = n_rows * values[k]``.

    Parameters
    ----------
    values:
        Name -> array (any float dtype; summed in float64).
    n_rows:
        The weight: the rows the values were trained on (``>= 0``).
    loss_sum, metrics:
        Other sums carried along (see :class:`Partial`).

    Examples
    --------
    >>> a = weighted_sum({"w": np.array([1.0, 2.0])}, 1)
    >>> b = weighted_sum({"w": np.array([4.0, 8.0])}, 3)
    >>> weighted_mean(combine(a, b))["w"]
    array([3.25, 6.5 ])
    """
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    weight = np.float64(n_rows)
    grads = {k: np.asarray(v, dtype=np.float64) * weight for k, v in values.items()}
    return Partial(float(loss_sum), grads, int(n_rows), dict(metrics or {}))


def weighted_mean(partial: Partial) -> dict[str, np.ndarray]:
    """The row-weighted mean of the values summed by :func:`weighted_sum`:
    ``grads[k] / n_rows`` in float64 (``nan`` for zero rows)."""
    dense = {}
    for k, g in partial.grads.items():
        if isinstance(g, RowSparse):
            raise TypeError(f"weighted_mean: {k!r} is row-sparse, expected dense")
        dense[k] = np.asarray(g, dtype=np.float64)
    if partial.n_rows == 0:
        return {k: np.full_like(g, np.nan) for k, g in dense.items()}
    n = np.float64(partial.n_rows)
    return {k: g / n for k, g in dense.items()}
