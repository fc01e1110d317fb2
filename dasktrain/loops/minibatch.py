"""Minibatch steps and local-SGD rounds, run as segments of long-lived ranks.

Each checkpoint interval is one *segment* (see :mod:`dasktrain.engine.rank`):
the client plans it, submits one rank per worker thread and is then out of
the step loop; the ranks exchange partials directly and all apply the same
update.  Rows stream back for the progress bar and callbacks while the ranks
train; at the segment's end the leader returns the state, which is
validated (at an epoch end), taken by the run and committed.

A segment ends at the epoch's end, after ``checkpoint_steps`` steps of the
run, after ``checkpoint_seconds``, or when a callback sets
``trainer.stop_training``.  A lost rank costs a rerun of the segment from its
start state, to the same bits.
"""

from __future__ import annotations

import math
import time
from typing import Any

import dask

from dasktrain.engine.comm import ChannelTimeouts
from dasktrain.engine.plan import default_n_streams, local_sgd_rounds, steps_per_epoch
from dasktrain.engine.rank import SegmentSpec
from dasktrain.engine.segments import SegmentResult, SegmentRunner
from dasktrain.engine.tasks import chunk_nbytes
from dasktrain.loops.base import FitLoop

__all__ = [
    "DEFAULT_ONE_RANK_WORK",
    "ONE_RANK_WORK_KEY",
    "MinibatchLoop",
    "one_rank_fits",
    "resolve_n_streams",
]

#: Config key: synchronous steps whose work (rows of a step times the
#: model's parameters) is at most this run on one rank, which computes all
#: the streams (0: always spread the streams over the workers' threads).
ONE_RANK_WORK_KEY = "dasktrain.ranks.one-rank-work"
#: Its default.  On 2 worker processes here a step's exchange between two
#: ranks costs 1-2 ms, more than the compute it saves below this work (an
#: MLP 64-256-1 at batch 1,024 is 17 M: one rank ran 1.2-1.5x faster than
#: two; see benchmarks/README.md).
DEFAULT_ONE_RANK_WORK = 32_000_000
#: One rank is used only if the dataset's decoded chunks take at most this
#: fraction of its worker's memory limit (it then caches all of them).
ONE_RANK_DATA_FRACTION = 0.25


def one_rank_fits(
    batch_rows: int,
    n_params: int,
    data_bytes: int,
    memory_limit: int,
    *,
    work_limit: int | None = None,
) -> bool:
    """Whether steps of ``batch_rows`` rows of a model of ``n_params``
    parameters run faster on one rank than spread over several: the step's
    work (``batch_rows * n_params``) is at most ``work_limit`` (default: the
    ``dasktrain.ranks.one-rank-work`` config) and the data (``data_bytes``
    decoded) fits a quarter of the worker's ``memory_limit`` (0: no limit).
    The ranks do not change the bits: the streams and their reduction tree
    are the same.

    Examples
    --------
    >>> one_rank_fits(1_024, 101, 800 << 20, 12 << 30)
    True
    >>> one_rank_fits(8_192, 16_897, 800 << 20, 12 << 30)
    False
    >>> one_rank_fits(1_024, 101, 8 << 30, 12 << 30)
    False
    """
    if work_limit is None:
        work_limit = int(dask.config.get(ONE_RANK_WORK_KEY, DEFAULT_ONE_RANK_WORK))
    if work_limit <= 0 or batch_rows * n_params > work_limit:
        return False
    return memory_limit <= 0 or data_bytes <= ONE_RANK_DATA_FRACTION * memory_limit


def resolve_n_streams(
    requested: int | None,
    batch_rows: int,
    stored: int | None,
    mid_epoch: bool,
    *,
    tables: bool = False,
) -> int:
    """The streams of a run's plan: the user's choice, else the run's own in
    the middle of an epoch, else :func:`default_n_streams` (for a model with
    sharded ``tables`` or not)."""
    if requested is not None:
        return int(requested)
    if mid_epoch and stored is not None:
        return int(stored)
    return default_n_streams(batch_rows, tables=tables)


class MinibatchLoop(FitLoop):
    """``fit(batch_rows=B)`` (synchronous minibatch steps over streams) and
    ``fit(batch_rows=B, local_steps=K)`` (local-SGD rounds)."""

    def __init__(self, *args: Any, segments: SegmentRunner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.segments = segments
        self.local = self.options.local_steps is not None
        assert self.options.batch_rows is not None
        self.batch_rows = int(self.options.batch_rows)
        self.n_streams = int(self.run.n_streams or 1)
        self.chunk_ids = tuple(int(c) for c in self.data.chunk_ids)
        self.chunk_rows = tuple(int(self.data.chunk_n_rows(c)) for c in self.chunk_ids)
        #: the last step reported to the callbacks (rows arrive live, and a
        #: rerun segment sends rows again)
        self.delivered = self.run.step

    def steps_per_epoch(self) -> int:
        return self._epoch_len(0)

    def held_chunks_per_thread(self) -> int:
        if self.local:
            return 0
        # Each stream holds its span's chunk; streams map onto ranks (one
        # per worker thread, or a single rank for small steps) contiguously.
        threads = sum(w.nthreads for w in self.engine.workers()) or 1
        if self.rank_limit() == 1:
            threads = 1
        return math.ceil(self.n_streams / threads)

    def rank_limit(self) -> int | None:
        """1 if the steps are small enough to run faster on one rank than
        spread over the workers (:func:`one_rank_fits`), else ``None`` (one
        rank per worker thread, at most one per stream).  Local-SGD rounds
        always use every thread."""
        if self.local or self.n_streams < 2:
            return None
        workers = self.engine.workers()
        if sum(w.nthreads for w in workers) < 2:
            return None
        n_params = sum(int(a.size) for a in self.run.params.values())
        data_bytes = chunk_nbytes(self.data.ref, self.model.fields) * len(
            self.chunk_ids
        )
        # The tightest limit (0: none) of the workers the rank may land on.
        limit = min((w.memory_limit for w in workers if w.memory_limit > 0), default=0)
        if one_rank_fits(self.batch_rows, n_params, data_bytes, limit):
            return 1
        return None

    def _epoch_len(self, epoch: int) -> int:
        if not self.local:
            return steps_per_epoch(sum(self.chunk_rows), self.batch_rows)
        rows = dict(zip(self.chunk_ids, self.chunk_rows, strict=True))
        assert self.options.local_steps is not None
        return len(
            local_sgd_rounds(
                self.chunk_ids,
                rows.__getitem__,
                batch_rows=self.batch_rows,
                local_steps=self.options.local_steps,
                seed=self.seed,
                epoch=epoch,
            )
        )

    # -- the loop ------------------------------------------------------------------
    def loop(self) -> None:
        run = self.run
        while run.epoch < self.options.epochs and not self.stop_training:
            epoch_len = self._epoch_len(run.epoch)
            if run.epoch_step >= epoch_len:
                # An epoch whose steps are done but whose end was not (its
                # validation failed): close it now.
                self.close_epoch()
                self.update_status()
                self.commit()  # the same step: the store's meta only
                continue
            first = run.epoch_step
            stop = epoch_len
            every = self.options.checkpoint_steps
            if every is not None:
                stop = min(stop, first + every - run.step % every)
            spec = self.segment_spec(
                key="",
                store=self.store_path,
                kind="local" if self.local else "steps",
                ref=self.data.ref,
                model=self.model,
                optimizer=self.optimizer,
                chunk_ids=self.chunk_ids,
                chunk_rows=self.chunk_rows,
                addresses=(),
                leaves=(),
                seed=self.seed,
                epoch=run.epoch,
                first_step=first,
                stop_step=stop,
                run_step=run.step,
                batch_rows=self.batch_rows,
                n_streams=self.n_streams,
                local_steps=self.options.local_steps,
                # The time left to the next checkpoint by checkpoint_seconds.
                time_budget=max(
                    0.0,
                    float(self.options.checkpoint_seconds)
                    - (time.monotonic() - self.last_commit),
                ),
                nonfinite=self.options.on_nonfinite,
                timeouts=ChannelTimeouts.from_config(),
            )
            # The segment: ranks on the workers, the client only watches
            # (sync point: returns at the segment's end).
            result = self.run_segment(spec)
            self._apply(result, first, epoch_len)

    def segment_spec(self, **fields: Any) -> SegmentSpec:
        """The segment's plan (subclasses add their own fields)."""
        return SegmentSpec(**fields)

    def run_segment(self, spec: SegmentSpec, **hooks: Any) -> SegmentResult:
        """Run one segment from the run's state (sync point)."""
        run = self.run
        return self.segments.run(
            spec,
            {"params": run.params, "opt_state": run.opt_state},
            n_leaves=len(self.chunk_ids) if self.local else self.n_streams,
            on_rows=self._live_rows,
            stop_requested=lambda: self.stop_training,
            max_ranks=self.rank_limit(),
            **hooks,
        )

    def _live_rows(self, rows: list[dict[str, Any]]) -> None:
        """Rows of steps the ranks finished: callbacks and progress bar (the
        history takes them at the segment's end)."""
        for row in rows:
            self._deliver(row)

    def _apply(self, result: SegmentResult, first: int, epoch_len: int) -> None:
        """The run takes the segment's steps (state, history, callbacks),
        closes the epoch if the segment ended it, and commits."""
        run = self.run
        run.params, run.opt_state = result.params, result.opt_state
        end_of_epoch = first + result.n_steps == epoch_len
        for i, row in enumerate(result.rows):
            run.step += 1
            run.epoch_step += 1
            run.history.append(row)
            last = end_of_epoch and i == len(result.rows) - 1
            if not last and result.interrupted is None:
                self._deliver(row)
        if end_of_epoch and result.interrupted is None:
            self.close_epoch()
        self.update_status()
        # Checkpoint: when one is due (every ``checkpoint_steps``, after
        # ``checkpoint_seconds``, at the end), and for a segment that ended
        # early on bad data, a divergence or a stop: the steps before are kept.
        ended_early = (
            result.interrupted is not None
            or result.error is not None
            or result.diverged is not None
        )
        if run.step > self.committed_step and (ended_early or self.commit_due()):
            self.commit()
        if result.interrupted is not None:
            raise result.interrupted
        if result.error is not None:
            raise result.error
        if result.diverged is not None:
            raise self.divergence(run.step + 1, result.diverged.split(": ", 1)[-1])

    def _deliver(self, row: dict[str, Any], *, event: bool = False) -> None:
        """``on_step_end`` for a row not yet reported (and a dashboard event
        for a row the ranks did not send)."""
        if int(row["step"]) > self.delivered:
            self.delivered = int(row["step"])
            self.log_row(row, event=event)

    def close_epoch(self) -> None:
        """The end of an epoch whose steps the run has: validate with the
        final parameters (into the epoch's last row), epoch callbacks, then
        the last row's ``on_step_end``.  If validation fails, the run keeps
        its steps and the epoch stays open: a resumed fit closes it."""
        run = self.run
        row = run.history.rows[-1]
        self.validate(row, run.params)
        run.epoch += 1
        run.epoch_step = 0
        self.epoch_callbacks(row)
        # The epoch's last row (with its validation metrics) was not sent by
        # the ranks: the dashboard gets it from here.
        self._deliver(row, event=True)
