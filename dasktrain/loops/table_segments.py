"""Minibatch training of models with sharded tables, as segments of ranks
that serve the tables (see :mod:`dasktrain.engine.table_rank`).

Each segment starts from the committed version's tables, which the ranks
load into their workers' shard caches as they need them (a worker keeps its
shards from one segment to the next while its memory budget allows).  The
ranks write the shards they changed into the attempt's *stage* version; at
the segment's end the client makes the next version from it (the changed
shards from the stage, the others shared with the previous version), then
validates at an epoch's end and commits.  Every segment ends with a commit.

A rerun of a segment (a lost rank) discards its attempt's stage and starts
again from the committed version, to the same bits.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from dasktrain.engine.rank import SegmentSpec
from dasktrain.engine.segments import SegmentResult
from dasktrain.engine.shard_cache import stage_step
from dasktrain.engine.sharded import ShardedEngine
from dasktrain.engine.table_rank import TableSegmentSpec, run_table_rank
from dasktrain.loops.minibatch import MinibatchLoop
from dasktrain.loops.tables import sharded_pass
from dasktrain.models.sparse import SparseModel
from dasktrain.params.tables import ParamStoreRef, link_shards

__all__ = ["TableSegmentsLoop"]


class TableSegmentsLoop(MinibatchLoop):
    """``fit(batch_rows=B)`` of a model with sharded tables."""

    def __init__(
        self,
        *args: Any,
        sharded: ShardedEngine,
        store_ref: ParamStoreRef,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.model, SparseModel)
        self.sharded = sharded
        self.store_ref = store_ref
        #: shards cached by the workers are used only within this fit
        self.token = uuid.uuid4().hex
        #: versions whose values the workers' cached shards may hold
        self.labels: tuple[int, ...] = ()
        self._stage: int | None = None

    # -- segments -------------------------------------------------------------------
    def segment_spec(self, **fields: Any) -> SegmentSpec:
        run = self.run
        assert run.table_step is not None
        return TableSegmentSpec(
            **fields,
            table_store=self.store_ref,
            tables=tuple(run.tables),
            base_step=run.table_step,
            labels=(run.table_step, *self.labels),
            token=self.token,
        )

    def rank_limit(self) -> int | None:
        """Every thread: the ranks serve the tables' shards."""
        return None

    def run_segment(self, spec: SegmentSpec, **hooks: Any) -> SegmentResult:
        planned = spec.run_step + spec.stop_step - spec.first_step

        def prepare(attempt_spec: SegmentSpec, attempt: int) -> SegmentSpec:
            stage = stage_step(planned, attempt)
            self.ps.prepare_version(stage, self.run.tables)
            self._stage = stage
            return _with_stage(attempt_spec, stage)

        def discard(attempt_spec: SegmentSpec) -> None:
            assert isinstance(attempt_spec, TableSegmentSpec)
            self.ps.discard_version(attempt_spec.stage)
            self._stage = None

        return super().run_segment(
            spec, rank_fn=run_table_rank, prepare=prepare, discard=discard
        )

    def _apply(self, result: SegmentResult, first: int, epoch_len: int) -> None:
        """Make the segment's version from its stage, then as every segment:
        the run takes the steps, validates at an epoch's end, commits."""
        stage, self._stage = self._stage, None
        assert stage is not None
        run = self.run
        if result.n_steps:
            assert run.table_step is not None
            step = run.step + result.n_steps
            written: dict[str, set[int]] = {}
            for r in result.ranks:
                for table, shards in getattr(r, "written", {}).items():
                    written.setdefault(table, set()).update(shards)
            self.ps.prepare_version(step, run.tables)
            shared = 0
            for layout in run.tables:
                mine = written.get(layout.name, set())
                link_shards(self.store_ref, stage, step, layout)
                skip = dict.fromkeys(layout.arrays, mine)
                shared += link_shards(
                    self.store_ref, run.table_step, step, layout, skip
                )
            run.table_step = step
            self.labels = (stage,)
            if result.rows:
                # The checkpoint's writes go with the segment's last step.
                total = sum(
                    int(getattr(r, "traffic", {}).get("bytes_written", 0))
                    for r in result.ranks
                )
                reported = sum(
                    int(row.get("shard_bytes_written", 0)) for row in result.rows
                )
                last = result.rows[-1]
                last["shard_bytes_written"] = (
                    int(last.get("shard_bytes_written", 0)) + total - reported
                )
                last["shards_written"] = sum(len(v) for v in written.values())
                last["shards_shared"] = shared
        self.ps.discard_version(stage)
        super()._apply(result, first, epoch_len)

    def commit_due(self, *, in_flight: bool = False) -> bool:
        # Every segment ends with a checkpoint: its stage becomes a version.
        return True

    def validate(self, row: dict[str, Any], params: Mapping[str, np.ndarray]) -> None:
        validation = self.options.validation
        if validation is None:
            return
        model = self.model
        assert isinstance(model, SparseModel) and self.run.table_step is not None
        val = sharded_pass(
            self.sharded,
            self.store_ref,
            model,
            validation,
            params,
            self.run.table_step,
            self.run,
            self.options.on_nonfinite,
        )
        for k, v in model.summarize(val.partial).items():
            row[f"val_{k}"] = v


def _with_stage(spec: SegmentSpec, stage: int) -> SegmentSpec:
    assert isinstance(spec, TableSegmentSpec)
    return dataclasses.replace(spec, stage=stage)
