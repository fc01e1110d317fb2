"""Small synchronous steps run on one rank (``dasktrain.ranks.one-rank-work``):
the same bits as on one rank per worker thread, and large steps still spread."""

from __future__ import annotations

from pathlib import Path

import dask
import pytest
from distributed import Client
from trainer_support import assert_same_params, classification_store, losses

import dasktrain as dt
from dasktrain.loops.minibatch import DEFAULT_ONE_RANK_WORK, ONE_RANK_WORK_KEY

pytestmark = [pytest.mark.cluster]


def _fit(
    client: Client, data: dt.Dataset, store: Path, work: int, model: dt.models.Model
) -> tuple[dt.Trainer, dt.History]:
    with dask.config.set({ONE_RANK_WORK_KEY: work}):
        trainer = dt.Trainer(
            model, dt.optim.SGD(0.1, momentum=0.9), store=store, client=client
        )
        history = trainer.fit(
            data, epochs=2, batch_rows=600, n_streams=3, progress=False
        )
    return trainer, history


def test_small_steps_run_on_one_rank_with_the_same_bits(
    tmp_path: Path, client: Client
) -> None:
    assert len(client.nthreads()) == 2
    data = classification_store(tmp_path / "data.zarr", 5_300)
    spread, spread_history = _fit(
        client, data, tmp_path / "spread.zarr", 0, dt.models.LogisticRegression()
    )
    one, one_history = _fit(
        client,
        data,
        tmp_path / "one.zarr",
        DEFAULT_ONE_RANK_WORK,
        dt.models.LogisticRegression(),
    )
    # 3 streams on 2 workers: two ranks, unless the steps are small.
    assert set(spread._segment_runner().rank_counts) == {2}
    assert set(one._segment_runner().rank_counts) == {1}
    assert len(one_history) == len(spread_history) > 2
    assert_same_params(one.params, spread.params, "one rank vs two")
    assert losses(one_history) == losses(spread_history)


def test_steps_above_the_work_limit_spread_over_the_workers(
    tmp_path: Path, client: Client
) -> None:
    data = classification_store(tmp_path / "data.zarr", 3_000)
    # 600 rows x (N_FEATURES + 1) parameters is above a limit of 100.
    trainer, _ = _fit(
        client, data, tmp_path / "run.zarr", 100, dt.models.LogisticRegression()
    )
    assert set(trainer._segment_runner().rank_counts) == {2}
