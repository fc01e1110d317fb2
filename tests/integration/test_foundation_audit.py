"""Requirements of the foundation that other test files leave implicit: the
callback hook, learning-rate schedules and gradient clipping inside a real fit
(and across a resume), numeric-only input to ``predict``, and what the README's
quickstart command prints."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
from distributed import Client
from trainer_support import (
    N_FEATURES,
    assert_same_params,
    classification_store,
    losses,
    stored_params,
)

import dasktrain as dt
from dasktrain.cli import QUICKSTART_DATA, QUICKSTART_RUN, _parser

pytestmark = pytest.mark.cluster

QUICKSTART_TIMEOUT = 180


class Recorder(dt.Callback):
    """Records every hook call; stops the fit at the end of ``stop_epoch``."""

    def __init__(self, stop_epoch: int) -> None:
        self.stop_epoch = stop_epoch
        self.events: list[tuple[Any, ...]] = []

    def on_fit_begin(self, trainer: dt.Trainer) -> None:
        self.events.append(("begin", trainer.step))

    def on_step_end(self, trainer: dt.Trainer, row: dict[str, Any]) -> None:
        self.events.append(("step", row["step"], row["epoch"]))

    def on_epoch_end(self, trainer: dt.Trainer, row: dict[str, Any]) -> None:
        self.events.append(("epoch", row["epoch"], row["step"], row["val_loss"]))
        if row["epoch"] == self.stop_epoch:
            trainer.stop_training = True

    def on_fit_end(self, trainer: dt.Trainer, history: dt.History) -> None:
        self.events.append(("end", len(history)))


def test_callback_hooks_and_stop_training(
    tmp_path: Path, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # 4 chunks: 3 to train (3 steps of one chunk per epoch), 1 to validate.
    train, val = classification_store(tmp_path / "d.zarr", 4_000).split(0.25, seed=0)
    path = tmp_path / "run.zarr"
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.Adam(0.05),
        store=path,
        client=client,
    )
    recorder = Recorder(stop_epoch=2)
    history = trainer.fit(
        train,
        epochs=10,
        batch_rows=1_000,
        validation=val,
        callbacks=[recorder],
        progress=False,
    )
    events = recorder.events
    assert events[0] == ("begin", 0)
    assert events[-1] == ("end", 6)
    steps = [e[1:] for e in events if e[0] == "step"]
    assert steps == [(s, 1 + (s - 1) // 3) for s in range(1, 7)]
    epochs = [e[1:] for e in events if e[0] == "epoch"]
    assert [(epoch, step) for epoch, step, _ in epochs] == [(1, 3), (2, 6)]
    assert all(np.isfinite(v) for _, _, v in epochs)
    # stop_training ended the fit after epoch 2; the store has that step.
    assert len(history) == 6 and trainer.step == 6 and trainer.epoch == 2
    ps = dt.ParamStore.open(path)
    assert ps.committed == 6
    assert ps.meta["status"] == "stopped"
    assert_same_params(stored_params(path), trainer.params, "stopped run")

    # Running the script again does not extend the stopped run, and says so.
    with caplog.at_level(logging.WARNING, logger="dasktrain"):
        again = dt.Trainer.resume(path, client=client).fit(
            train, epochs=10, batch_rows=1_000, progress=False
        )
    assert len(again) == 6 and dt.ParamStore.open(path).committed == 6
    assert "ended as 'stopped' at epoch 2" in caplog.text


def test_schedule_and_clipping_in_a_fit_and_a_resume(
    tmp_path: Path, client: Client
) -> None:
    data = classification_store(tmp_path / "d.zarr", 4_000)
    schedule = dt.optim.ExponentialDecay(0.5, decay_rate=0.5, decay_steps=4)
    clip = 0.05

    def trainer(name: str) -> dt.Trainer:
        return dt.Trainer(
            dt.models.LogisticRegression(l2=1e-3),
            dt.optim.SGD(schedule, clip_norm=clip),
            store=tmp_path / name,
            client=client,
            keep_versions=100,
        )

    # 4 chunks in 2 slices each: 8 steps per epoch; a version per step.
    straight = trainer("straight.zarr")
    history = straight.fit(
        data, epochs=2, batch_rows=500, checkpoint_steps=1, progress=False
    )
    frame = history.to_pandas()
    n_steps = 16
    assert frame["step"].tolist() == list(range(1, n_steps + 1))
    expected_rates = [schedule(s) for s in range(n_steps)]
    np.testing.assert_allclose(frame["learning_rate"], expected_rates, rtol=1e-12)
    # Every step's gradient is larger than the clip norm, so each step moves
    # the parameters by exactly learning_rate * clip_norm.
    assert (frame["grad_norm"] > 2 * clip).all()
    ps = dt.ParamStore.open(straight.store_path)
    assert ps.versions[-n_steps:] == list(range(1, n_steps + 1))
    for step in range(2, n_steps + 1):
        before, after = ps.read(step - 1).params, ps.read(step).params
        moved = np.sqrt(sum(np.sum((after[k] - before[k]) ** 2) for k in after))
        assert moved == pytest.approx(expected_rates[step - 1] * clip, rel=1e-6)

    # The schedule's position is part of the stored state: a run resumed after
    # one epoch ends with the same bits.
    first = trainer("split.zarr")
    first.fit(data, epochs=1, batch_rows=500, progress=False)
    resumed = dt.Trainer.resume(tmp_path / "split.zarr", client=client)
    rest = resumed.fit(data, epochs=2, batch_rows=500, progress=False)
    assert_same_params(resumed.params, straight.params, "resumed schedule")
    assert losses(rest) == losses(history)
    assert rest.column("learning_rate") == frame["learning_rate"].tolist()


def test_predict_refuses_non_numeric_arrays(tmp_path: Path, client: Client) -> None:
    data = classification_store(tmp_path / "d.zarr", 2_000)
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.Adam(0.05),
        store=tmp_path / "run.zarr",
        client=client,
    )
    trainer.fit(data, epochs=1, progress=False)
    for bad in (
        np.full((3, N_FEATURES), "a"),
        np.full((3, N_FEATURES), None, dtype=object),
        np.ones((3, N_FEATURES), dtype=complex),
    ):
        with pytest.raises(TypeError, match=rf"numeric.*{bad.dtype}"):
            trainer.predict(bad)
        lazy = da.from_array(bad, chunks=2)
        with pytest.raises(TypeError, match=rf"numeric.*{bad.dtype}"):
            trainer.predict(lazy)
    # Integers and lists of numbers are fine.
    ints = np.ones((3, N_FEATURES), dtype=np.int64)
    np.testing.assert_array_equal(
        trainer.predict(ints), trainer.predict(ints.astype(np.float64))
    )
    assert trainer.predict(ints.tolist()).shape == (3,)


def _quickstart(cwd: Path, address: str) -> subprocess.CompletedProcess[str]:
    args = ("--rows", "20000", "--features", "8", "--chunk-rows", "4000")
    command = [sys.executable, "-m", "dasktrain", "quickstart", *args]
    return subprocess.run(
        [*command, "--scheduler", address],
        capture_output=True,
        text=True,
        timeout=QUICKSTART_TIMEOUT,
        cwd=cwd,
    )


def test_quickstart_defaults_are_at_least_one_gigabyte() -> None:
    args = _parser().parse_args(["quickstart"])
    assert args.rows * args.features * np.dtype(np.float32).itemsize >= 10**9
    assert args.data == QUICKSTART_DATA == str(Path("data") / "quickstart.zarr")
    assert args.run == QUICKSTART_RUN
    assert args.scheduler is None  # an embedded LocalCluster


@pytest.mark.slow
def test_quickstart_prints_the_promised_report(tmp_path: Path, client: Client) -> None:
    address = str(client.scheduler.address)
    res = _quickstart(tmp_path, address)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert re.search(r"^Dask dashboard: http://\S+$", out, re.M), out
    data = tmp_path / "data" / "quickstart.zarr"
    assert f"Dataset: {data}: 20,000 rows x 8 features" in out
    for split in ("train", "valid"):
        assert re.search(rf"^  {split}: loss 0\.\d+  accuracy 0\.[89]\d+$", out, re.M)
    run = tmp_path / "runs" / "quickstart.zarr"
    assert f"Parameters stored in {run} (step " in out
    # The progress bar (tqdm, on stderr) went through the fit's steps.
    assert re.search(r"fit: 100%.*step", res.stderr), res.stderr
    assert dt.ParamStore.open(run).meta["status"] in ("finished", "converged")

    # A second run reuses the generated data as it is.
    uuid = dt.Dataset.open(data).uuid
    again = _quickstart(tmp_path, address)
    assert again.returncode == 0, again.stderr
    assert dt.Dataset.open(data).uuid == uuid
    assert re.search(r"^  valid: loss", again.stdout, re.M)
