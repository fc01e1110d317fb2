"""Which rows each step reads, and which worker reads them.  Pure functions.

A *piece* is a contiguous range of a chunk's rows, in the chunk's natural row
order or in a seeded permutation of it.  A step is a list of pieces; the
pieces' partials are the leaves of the fixed reduction tree, in list order.
Everything here is a function of the dataset's chunk ids, the seed and the
epoch: never of the workers, so results are identical on any cluster.
Placement (which worker computes a piece) only affects speed.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_DEFAULT_STREAMS",
    "MIN_STREAM_ROWS",
    "PLACEMENT_GROUPS_TARGET",
    "Piece",
    "Span",
    "StreamWalk",
    "Take",
    "assign_pieces",
    "chunk_owners",
    "default_n_streams",
    "epoch_steps",
    "full_pass",
    "group_key",
    "group_size",
    "local_sgd_rounds",
    "rendezvous_owners",
    "row_permutation",
    "span_order",
    "split_contiguous",
    "steps_per_epoch",
    "stream_spans",
]

#: Placement groups per worker we aim for at least: consecutive chunks share
#: an owner (so a worker can pre-reduce whole subtrees of the reduction tree
#: and send one partial for them) only when there are enough chunks to keep
#: the load balanced.
PLACEMENT_GROUPS_TARGET = 64


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of chunk ``chunk_id``.

    If ``shuffle`` is set, positions index the permutation
    :func:`row_permutation` ``(*shuffle, n_rows_of_chunk)`` instead of the
    natural row order.
    """

    chunk_id: int
    start: int
    stop: int
    shuffle: tuple[int, int] | None = None  # (seed, epoch)

    @property
    def n_rows(self) -> int:
        return self.stop - self.start


def row_permutation(seed: int, epoch: int, chunk_id: int, n_rows: int) -> np.ndarray:
    """The row order of a chunk in an epoch, seeded by (seed, epoch, chunk)."""
    rng = np.random.default_rng([seed, epoch, chunk_id])
    return rng.permutation(n_rows)


def full_pass(
    chunk_ids: Sequence[int], chunk_n_rows: Callable[[int], int]
) -> list[Piece]:
    """One whole-chunk piece per chunk, in the dataset's chunk order."""
    return [Piece(c, 0, chunk_n_rows(c)) for c in chunk_ids]


def epoch_steps(
    chunk_ids: Sequence[int],
    chunk_n_rows: Callable[[int], int],
    *,
    batch_rows: int | None,
    seed: int,
    epoch: int,
) -> list[list[Piece]]:
    """The steps of one epoch.

    ``batch_rows=None``: one full-batch step.  Otherwise the chunks are visited
    in an order shuffled by ``(seed, epoch)``.  If ``batch_rows`` is at least a
    chunk, each step takes ``round(batch_rows / chunk_rows)`` whole chunks;
    otherwise each chunk's rows are shuffled by ``(seed, epoch, chunk)`` and
    split into ``ceil(rows / batch_rows)`` nearly equal steps.
    """
    if batch_rows is None:
        return [full_pass(chunk_ids, chunk_n_rows)]
    if batch_rows < 1:
        raise ValueError(
            f"batch_rows must be a positive integer or None, got {batch_rows}"
        )
    rng = np.random.default_rng([seed, epoch])
    order = [int(chunk_ids[i]) for i in rng.permutation(len(chunk_ids))]
    chunk_rows = max(chunk_n_rows(c) for c in chunk_ids)
    steps: list[list[Piece]] = []
    if batch_rows >= chunk_rows:
        per_step = max(1, round(batch_rows / chunk_rows))
        for i in range(0, len(order), per_step):
            steps.append(
                [Piece(c, 0, chunk_n_rows(c)) for c in order[i : i + per_step]]
            )
        return steps
    for c in order:
        n = chunk_n_rows(c)
        n_pieces = max(1, math.ceil(n / batch_rows))
        bounds = np.linspace(0, n, n_pieces + 1).round().astype(int)
        for a, b in itertools.pairwise(bounds):
            if b > a:
                steps.append([Piece(c, int(a), int(b), (seed, epoch))])
    return steps


def _score(key: str, worker: str) -> int:
    digest = hashlib.blake2b(f"{key}|{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rendezvous_owners(
    groups: Sequence[str],
    workers: Sequence[str],
    *,
    weights: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Assign each group to a worker by rendezvous hashing with bounded load.

    Each group goes to its highest-scoring worker that still has room, room
    being an equal share of the groups (rounded up).  The result depends only
    on the group keys and the set of worker names, so it is stable across
    steps and runs, and a departing worker moves only the load it had (plus
    the spill-over of the bounded load).
    """
    if not workers:
        raise ValueError("no workers to place work on")
    names = sorted(set(workers))
    capacity = math.ceil(len(groups) / len(names))
    load = dict.fromkeys(names, 0)
    owners: dict[str, str] = {}
    for g in groups:
        ranked = sorted(names, key=lambda w: _score(g, w), reverse=True)
        for w in ranked:
            if load[w] < capacity:
                owners[g] = w
                load[w] += 1
                break
    return owners


def group_size(n_chunks: int) -> int:
    """Chunks per placement group: a power of two, 1 for fewer than
    ``2 * PLACEMENT_GROUPS_TARGET`` chunks."""
    g = 1
    while n_chunks // (2 * g) >= PLACEMENT_GROUPS_TARGET:
        g *= 2
    return g


def group_key(url: str, chunk_id: int, size: int = 1) -> str:
    """Placement unit of a chunk: aligned groups of ``size`` chunks."""
    return f"{url}#{chunk_id // size}"


def chunk_owners(
    url: str, chunk_ids: Sequence[int], workers: Sequence[str]
) -> dict[int, str]:
    """Chunk id -> worker name, balanced over all of ``chunk_ids``.

    Computed over a dataset's whole chunk list (not one step's), so a chunk
    keeps its owner, and its cached decoded copy, from step to step.
    """
    size = group_size(len(chunk_ids))
    keys = sorted({group_key(url, c, size) for c in chunk_ids})
    owners = rendezvous_owners(keys, workers)
    return {int(c): owners[group_key(url, c, size)] for c in chunk_ids}


def assign_pieces(
    pieces: Sequence[Piece], owners: Mapping[int, str], workers: Sequence[str]
) -> dict[str, list[int]]:
    """Worker name -> leaf positions it computes (ascending).

    Pieces of chunks without a known owner go to a worker by hashing.
    """
    names = sorted(set(workers))
    out: dict[str, list[int]] = {}
    for leaf, p in enumerate(pieces):
        w = owners.get(p.chunk_id)
        if w is None or w not in names:
            w = max(names, key=lambda n: _score(str(p.chunk_id), n))
        out.setdefault(w, []).append(leaf)
    return out


def local_sgd_rounds(
    chunk_ids: Sequence[int],
    chunk_n_rows: Callable[[int], int],
    *,
    batch_rows: int,
    local_steps: int,
    seed: int,
    epoch: int,
) -> list[list[tuple[Piece, ...]]]:
    """The rounds of one epoch of local SGD.  A pure function.

    Each chunk's rows are shuffled by ``(seed, epoch, chunk)`` and split into
    ``ceil(rows / batch_rows)`` nearly equal minibatches (the slices of
    :func:`~dasktrain.engine.plan.epoch_steps`; a chunk of at most
    ``batch_rows`` rows is one minibatch in its natural order).  Round ``r``
    holds, for each chunk in ``chunk_ids`` order that has any left, its
    minibatches ``r * local_steps`` to ``(r + 1) * local_steps - 1``: one leaf
    of the reduction tree per chunk.  So every row is visited once per epoch,
    and ``local_steps`` at least a chunk's minibatch count makes one round
    per epoch.

    Examples
    --------
    >>> rounds = local_sgd_rounds([0, 1], lambda c: 10 if c == 0 else 4,
    ...                           batch_rows=4, local_steps=2, seed=0, epoch=0)
    >>> [[[(p.chunk_id, p.start, p.stop) for p in leaf] for leaf in r]
    ...  for r in rounds]
    [[[(0, 0, 3), (0, 3, 7)], [(1, 0, 4)]], [[(0, 7, 10)]]]
    """
    if batch_rows < 1 or local_steps < 1:
        raise ValueError(
            f"batch_rows and local_steps must be >= 1, got {batch_rows} and "
            f"{local_steps}"
        )
    per_chunk: list[list[Piece]] = []
    for c in chunk_ids:
        n = chunk_n_rows(c)
        if n <= batch_rows:
            per_chunk.append([Piece(int(c), 0, n)])
            continue
        n_batches = math.ceil(n / batch_rows)
        bounds = np.linspace(0, n, n_batches + 1).round().astype(int)
        per_chunk.append(
            [
                Piece(int(c), int(a), int(b), (seed, epoch))
                for a, b in itertools.pairwise(bounds)
                if b > a
            ]
        )
    n_rounds = max(math.ceil(len(batches) / local_steps) for batches in per_chunk)
    rounds = []
    for r in range(n_rounds):
        window = slice(r * local_steps, (r + 1) * local_steps)
        rounds.append([tuple(b[window]) for b in per_chunk if b[window]])
    return rounds


# -- streams: the data-parallel minibatch plan of the step engine ------------------
#: Rows per stream and step below which more streams add overhead, not speed.
MIN_STREAM_ROWS = 256
#: The most streams :func:`default_n_streams` picks.
MAX_DEFAULT_STREAMS = 32
#: Rows per stream and step of models with sharded tables: a leaf's cost
#: there grows with the table rows it touches, not only with its rows, so
#: fewer, larger leaves are faster (``benchmarks/parameter_server.py
#: --n-streams``: 8 streams of 16,384 rows ran 1.3x 32 streams of 4,096).
MIN_TABLE_STREAM_ROWS = 16_384
#: Salt of the per-epoch span order of a stream (keeps it apart from the
#: chunk-order and row-order seeds).
_SPAN_ORDER_SALT = 0x57
#: Salt of the row order inside a span that is only part of a chunk.
_PART_ORDER_SALT = 0x5A


def default_n_streams(batch_rows: int, *, tables: bool = False) -> int:
    """Streams of a run with minibatches of ``batch_rows`` rows when the user
    does not choose: one per :data:`MIN_STREAM_ROWS` rows of a step, at least
    1 and at most :data:`MAX_DEFAULT_STREAMS`.  With sharded ``tables``, one
    per :data:`MIN_TABLE_STREAM_ROWS` rows, but as many as the first rule
    gives up to 2 (so steps of 512 rows or more still use two ranks).  A
    function of the plan only (never of the cluster), so runs are
    reproducible on any cluster.

    Examples
    --------
    >>> default_n_streams(100), default_n_streams(512), default_n_streams(1 << 20)
    (1, 2, 32)
    >>> [default_n_streams(b, tables=True) for b in (100, 512, 131_072, 1 << 20)]
    [1, 2, 8, 32]
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    dense = max(1, min(MAX_DEFAULT_STREAMS, batch_rows // MIN_STREAM_ROWS))
    if not tables:
        return dense
    return max(
        min(2, dense), min(MAX_DEFAULT_STREAMS, batch_rows // MIN_TABLE_STREAM_ROWS)
    )


def steps_per_epoch(n_rows: int, batch_rows: int) -> int:
    """Steps of one epoch of minibatches: ``ceil(n_rows / batch_rows)``."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    return max(1, math.ceil(n_rows / batch_rows))


@dataclass(frozen=True)
class Span:
    """Rows ``[start, stop)`` of chunk ``chunk_id``: a stream's share of it."""

    chunk_id: int
    start: int
    stop: int

    @property
    def n_rows(self) -> int:
        return self.stop - self.start


def stream_spans(
    chunk_ids: Sequence[int], chunk_n_rows: Callable[[int], int], n_streams: int
) -> list[list[Span]]:
    """Split the rows of a dataset view into ``n_streams`` contiguous ranges of
    nearly equal size (stream ``k`` gets the view's rows ``k * n // S`` to
    ``(k + 1) * n // S``, counted over ``chunk_ids`` in order), each as the
    chunk spans it covers.  Fixed for a run: a stream reads the same chunks
    in every epoch, so the rank that holds it keeps them cached.

    Examples
    --------
    >>> [[(s.chunk_id, s.start, s.stop) for s in spans]
    ...  for spans in stream_spans([0, 1, 2], lambda c: 4, 2)]
    [[(0, 0, 4), (1, 0, 2)], [(1, 2, 4), (2, 0, 4)]]
    """
    if n_streams < 1:
        raise ValueError(f"n_streams must be >= 1, got {n_streams}")
    sizes = [int(chunk_n_rows(c)) for c in chunk_ids]
    total = sum(sizes)
    if n_streams > total:
        raise ValueError(f"{n_streams} streams for {total} rows: at most one per row")
    starts = [0, *itertools.accumulate(sizes)]
    out: list[list[Span]] = []
    j = 0
    for k in range(n_streams):
        lo, hi = k * total // n_streams, (k + 1) * total // n_streams
        spans: list[Span] = []
        while j < len(sizes) and starts[j + 1] <= lo:
            j += 1
        i = j
        while i < len(sizes) and starts[i] < hi:
            a = max(lo, starts[i]) - starts[i]
            b = min(hi, starts[i + 1]) - starts[i]
            if b > a:
                spans.append(Span(int(chunk_ids[i]), a, b))
            i += 1
        out.append(spans)
    return out


def span_order(span: Span, chunk_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Row indices (within the chunk) of ``span`` in the order an epoch visits
    them: the chunk's :func:`row_permutation` for a whole chunk, else a
    permutation of the span's rows seeded by ``(seed, epoch, chunk, start)``.
    """
    if span.start == 0 and span.stop == chunk_rows:
        return row_permutation(seed, epoch, span.chunk_id, chunk_rows)
    rng = np.random.default_rng(
        [seed, epoch, span.chunk_id, span.start, _PART_ORDER_SALT]
    )
    return span.start + rng.permutation(span.n_rows)


@dataclass(frozen=True)
class Take:
    """Positions ``[lo, hi)`` of ``span``'s row order (:func:`span_order`)."""

    span: Span
    lo: int
    hi: int

    @property
    def n_rows(self) -> int:
        return self.hi - self.lo


class StreamWalk:
    """One stream's path through one epoch: its spans in an order seeded by
    ``(seed, epoch, stream)``, the rows of each span in :func:`span_order`,
    cut into ``n_steps`` nearly equal slices (a slice may cross from one
    span into the next).  ``take(t)`` is step ``t``'s slice.  Pure and cheap:
    nothing is materialized but the span order.

    Examples
    --------
    >>> walk = StreamWalk([Span(0, 0, 3), Span(1, 0, 3)], n_steps=2, seed=0,
    ...                   epoch=0, stream=0)
    >>> [sum(t.n_rows for t in walk.take(s)) for s in range(2)]
    [3, 3]
    """

    def __init__(
        self,
        spans: Sequence[Span],
        *,
        n_steps: int,
        seed: int,
        epoch: int,
        stream: int,
    ) -> None:
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        rng = np.random.default_rng([seed, epoch, stream, _SPAN_ORDER_SALT])
        self.spans = [spans[i] for i in rng.permutation(len(spans))]
        self.n_steps = n_steps
        self._starts = [0, *itertools.accumulate(s.n_rows for s in self.spans)]
        self.n_rows = self._starts[-1]

    def bounds(self, step: int) -> tuple[int, int]:
        """The stream positions of step ``step``: ``[lo, hi)``."""
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} of an epoch of {self.n_steps} steps")
        return (
            step * self.n_rows // self.n_steps,
            (step + 1) * self.n_rows // self.n_steps,
        )

    def take(self, step: int) -> list[Take]:
        lo, hi = self.bounds(step)
        out: list[Take] = []
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        while i < len(self.spans) and self._starts[i] < hi:
            a = max(lo, self._starts[i]) - self._starts[i]
            b = min(hi, self._starts[i + 1]) - self._starts[i]
            if b > a:
                out.append(Take(self.spans[i], a, b))
            i += 1
        return out


def split_contiguous(n_items: int, n_parts: int) -> list[range]:
    """``range(n_items)`` in ``n_parts`` contiguous, nearly equal parts (some
    empty if ``n_parts > n_items``).

    Examples
    --------
    >>> split_contiguous(5, 2)
    [range(0, 2), range(2, 5)]
    """
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    bounds = [i * n_items // n_parts for i in range(n_parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]
