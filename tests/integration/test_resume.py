"""Interrupted runs finish with the bits of uninterrupted ones, and the store
stays safe: one writer at a time, divergence and Ctrl-C keep the last good
version."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client
from trainer_support import (
    assert_same_params,
    classification_arrays,
    classification_store,
    losses,
    regression_arrays,
    store,
    store_files,
    stored_params,
)

import dasktrain as dt
from dasktrain.errors import DivergenceError, NonFiniteDataError, StoreLockedError

pytestmark = pytest.mark.cluster

EPOCHS = 5


class StopAt(dt.Callback):
    """Raises ``error`` from ``on_step_end`` of step ``step``."""

    def __init__(self, step: int, error: BaseException) -> None:
        self.step = step
        self.error = error

    def on_step_end(self, trainer: dt.Trainer, row: dict[str, Any]) -> None:
        if row["step"] == self.step:
            raise self.error


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[dt.Dataset, dt.Dataset]:
    ds = classification_store(tmp_path_factory.mktemp("data") / "d.zarr", 6_500)
    return ds.split(0.3, seed=1)


def _make(opt: str) -> tuple[dt.models.LogisticRegression, Any]:
    model = dt.models.LogisticRegression(l2=1e-3)
    if opt == "lbfgs":
        return model, dt.optim.LBFGS()
    if opt == "sgd":
        return model, dt.optim.SGD(0.1, momentum=0.9)
    return model, dt.optim.Adam(0.05)


# (optimizer, batch_rows): Adam full batch, SGD with momentum in both minibatch
# regimes (slices of a chunk; whole chunks), L-BFGS.
CASES = [("adam", None), ("sgd", 500), ("sgd", 2_000), ("lbfgs", None)]


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
    client: Client,
    data: tuple[dt.Dataset, dt.Dataset],
) -> dict[tuple[str, int | None], tuple[dict[str, np.ndarray], dt.History]]:
    """Uninterrupted fit(epochs=5) of every case."""
    train, val = data
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for opt, batch_rows in CASES:
        trainer = dt.Trainer(
            *_make(opt), store=root / f"{opt}-{batch_rows}.zarr", client=client
        )
        history = trainer.fit(
            train, epochs=EPOCHS, batch_rows=batch_rows, validation=val, progress=False
        )
        out[opt, batch_rows] = (trainer.params, history)
    return out


@pytest.mark.parametrize(("opt", "batch_rows"), CASES)
def test_resume_after_some_epochs(
    tmp_path: Path,
    client: Client,
    data: tuple[dt.Dataset, dt.Dataset],
    reference: dict[Any, Any],
    opt: str,
    batch_rows: int | None,
) -> None:
    train, val = data
    path = tmp_path / "run.zarr"
    first = dt.Trainer(*_make(opt), store=path, client=client)
    first.fit(train, epochs=2, batch_rows=batch_rows, validation=val, progress=False)
    assert first.epoch == 2
    del first

    trainer = dt.Trainer.resume(path, client=client)
    steps_done = dt.ParamStore.open(path).committed
    assert f"committed step {steps_done}, epoch 2, finished" in repr(trainer)
    history = trainer.fit(
        train, epochs=EPOCHS, batch_rows=batch_rows, validation=val, progress=False
    )
    assert f"epoch {EPOCHS}, finished" in repr(trainer)
    params, expected = reference[opt, batch_rows]
    assert_same_params(trainer.params, params, f"{opt} batch_rows={batch_rows}")
    assert_same_params(stored_params(path), params, "store")
    assert losses(history) == losses(expected)
    assert [r["step"] for r in history] == [r["step"] for r in expected]
    np.testing.assert_array_equal(
        history.column("val_loss"), expected.column("val_loss")
    )


@pytest.mark.parametrize(("opt", "batch_rows"), CASES)
def test_resume_after_an_error_mid_epoch(
    tmp_path: Path,
    client: Client,
    data: tuple[dt.Dataset, dt.Dataset],
    reference: dict[Any, Any],
    opt: str,
    batch_rows: int | None,
) -> None:
    train, val = data
    params, expected = reference[opt, batch_rows]
    n_steps = len(expected)
    stop = n_steps // 2 + 1  # mid-epoch for the minibatch cases
    path = tmp_path / "run.zarr"
    trainer = dt.Trainer(*_make(opt), store=path, client=client)
    with pytest.raises(Interrupted):
        trainer.fit(
            train,
            epochs=EPOCHS,
            batch_rows=batch_rows,
            validation=val,
            callbacks=[StopAt(stop, Interrupted())],
            checkpoint_steps=1,
            progress=False,
        )
    store_ = dt.ParamStore.open(path)
    assert store_.committed == stop
    assert store_.meta["status"] == "running"

    resumed = dt.Trainer.resume(path, client=client)
    assert resumed.step == stop
    history = resumed.fit(
        train, epochs=EPOCHS, batch_rows=batch_rows, validation=val, progress=False
    )
    assert_same_params(resumed.params, params, f"{opt} batch_rows={batch_rows}")
    assert losses(history) == losses(expected)


def test_failed_validation_leaves_a_consistent_run(
    tmp_path: Path,
    client: Client,
    data: tuple[dt.Dataset, dt.Dataset],
    reference: dict[Any, Any],
) -> None:
    """Validation data that fails at the end of epoch 1: the store keeps the
    epoch's steps with the epoch still open, and a resumed run (with good
    validation data) closes it and gives the uninterrupted run's parameters
    and history."""
    train, val = data
    X, y = classification_arrays(2_000)
    X[1_500, 3] = np.nan
    bad_val = store(tmp_path / "bad.zarr", X, y)
    path = tmp_path / "run.zarr"
    with pytest.raises(NonFiniteDataError, match="chunk 1: row 1500, column 3"):
        dt.Trainer(*_make("sgd"), store=path, client=client).fit(
            train, epochs=EPOCHS, batch_rows=2_000, validation=bad_val, progress=False
        )
    params, expected = reference["sgd", 2_000]
    per_epoch = len(expected) // EPOCHS
    ps = dt.ParamStore.open(path)
    assert ps.committed == per_epoch
    assert len(ps.meta["history"]) == per_epoch
    assert ps.meta["progress"]["epoch"] == 0
    assert "val_loss" not in ps.meta["history"][-1]
    resumed = dt.Trainer.resume(path, client=client)
    history = resumed.fit(
        train, epochs=EPOCHS, batch_rows=2_000, validation=val, progress=False
    )
    assert_same_params(resumed.params, params, "after a failed validation")
    assert losses(history) == losses(expected)
    np.testing.assert_array_equal(
        history.column("val_loss"), expected.column("val_loss")
    )


def test_ctrl_c_keeps_the_steps_done(
    tmp_path: Path,
    client: Client,
    data: tuple[dt.Dataset, dt.Dataset],
    reference: dict[Any, Any],
) -> None:
    train, _ = data
    path = tmp_path / "run.zarr"
    trainer = dt.Trainer(*_make("sgd"), store=path, client=client)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(
            train,
            epochs=EPOCHS,
            batch_rows=500,
            callbacks=[StopAt(7, KeyboardInterrupt())],
            checkpoint_seconds=3600,
            progress=False,
        )
    store_ = dt.ParamStore.open(path)
    # No checkpoint was due; the interrupted fit still committed step 7.
    assert store_.committed == 7
    assert len(store_.meta["history"]) == 7
    assert not store_.holds_lock and store_.lock_holder() is None
    assert_same_params(stored_params(path), trainer.params, "after Ctrl-C")
    # The lock was released: the run continues to the uninterrupted result
    # (without validation this time: it does not change the parameters).
    trainer.fit(train, epochs=EPOCHS, batch_rows=500, progress=False)
    assert_same_params(trainer.params, reference["sgd", 500][0], "continued")


def test_early_stopping_survives_resume(
    tmp_path: Path, client: Client, data: tuple[dt.Dataset, dt.Dataset]
) -> None:
    train, val = data

    def fit(path: Path, epochs: int) -> dt.History:
        # min_delta=10: only the first epoch counts as an improvement, so the
        # run stops after epoch 1 + patience + 1 = 4.
        return dt.Trainer.resume(path, client=client).fit(
            train,
            epochs=epochs,
            batch_rows=2_000,
            validation=val,
            early_stopping=dt.EarlyStopping("val_loss", patience=2, min_delta=10.0),
            progress=False,
        )

    straight, split = tmp_path / "straight.zarr", tmp_path / "split.zarr"
    for path in (straight, split):
        dt.Trainer(*_make("adam"), store=path, client=client).fit(
            train, epochs=0, batch_rows=2_000, progress=False
        )
    full = fit(straight, 10)
    assert full[-1]["epoch"] == 4
    assert dt.ParamStore.open(straight).meta["status"] == "stopped"

    fit(split, 2)
    state = dt.ParamStore.open(split).meta["callbacks"]["EarlyStopping"]
    assert state["wait"] == 1 and math.isfinite(state["best"])
    resumed = fit(split, 10)
    assert resumed[-1]["epoch"] == 4
    assert losses(resumed) == losses(full)
    assert_same_params(stored_params(split), stored_params(straight), "early stop")


def test_finished_run_is_not_trained_again(
    tmp_path: Path, client: Client, data: tuple[dt.Dataset, dt.Dataset]
) -> None:
    train, val = data
    path = tmp_path / "run.zarr"
    trainer = dt.Trainer(*_make("sgd"), store=path, client=client)
    history = trainer.fit(
        train, epochs=2, batch_rows=2_000, validation=val, progress=False
    )
    before = store_files(path)
    n_rows = len(history)
    again = trainer.fit(
        train, epochs=2, batch_rows=2_000, validation=val, progress=False
    )
    assert len(again) == n_rows and losses(again) == losses(history)
    fresh = dt.Trainer(*_make("sgd"), store=path, client=client)
    assert len(fresh.fit(train, epochs=1, progress=False)) == n_rows
    assert store_files(path) == before
    assert dt.ParamStore.open(path).meta["status"] == "finished"


def test_lbfgs_converged_run_stays_converged(
    tmp_path: Path, client: Client, data: tuple[dt.Dataset, dt.Dataset]
) -> None:
    train, _ = data
    path = tmp_path / "run.zarr"
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-2),
        dt.optim.LBFGS(),
        store=path,
        client=client,
    )
    history = trainer.fit(train, epochs=100, progress=False)
    assert len(history) < 100
    assert dt.ParamStore.open(path).meta["status"] == "converged"
    before = store_files(path)
    again = dt.Trainer.resume(path, client=client).fit(
        train, epochs=200, progress=False
    )
    assert len(again) == len(history)
    assert store_files(path) == before


# -- store safety --------------------------------------------------------------


def test_second_writer_is_refused(
    tmp_path: Path, client: Client, data: tuple[dt.Dataset, dt.Dataset]
) -> None:
    train, _ = data
    path = tmp_path / "run.zarr"
    dt.Trainer(*_make("adam"), store=path, client=client).fit(
        train, epochs=1, progress=False
    )
    before = store_files(path)
    holder = dt.ParamStore.open(path)
    with holder.lock(owner="notebook of the test"):
        trainer = dt.Trainer.resume(path, client=client)
        with pytest.raises(StoreLockedError) as info:
            trainer.fit(train, epochs=3, progress=False)
        message = str(info.value)
        assert "run.zarr" in message
        assert "notebook of the test" in message
        assert f"pid {os.getpid()}" in message
        assert store_files(path) == before
    # Released: the same trainer may now write.
    assert len(trainer.fit(train, epochs=3, progress=False)) == 3


@pytest.mark.slow
def test_fit_in_another_process_holds_the_lock(
    tmp_path: Path, client: Client, data: tuple[dt.Dataset, dt.Dataset]
) -> None:
    train, _ = data
    path = tmp_path / "run.zarr"
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import dasktrain as dt
        from distributed import Client

        class Slow(dt.Callback):
            def on_step_end(self, trainer, row):
                Path({str(ready)!r}).touch()
                time.sleep(0.4)

        client = Client({client.scheduler.address!r})
        data = dt.Dataset.open({train.path!r}).subset({list(train.chunk_ids)!r})
        trainer = dt.Trainer(dt.models.LogisticRegression(), dt.optim.Adam(0.05),
                             store={str(path)!r}, client=client)
        trainer.fit(data, epochs=4, callbacks=[Slow()], progress=False)
        client.close()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), proc.communicate()[0]
        with pytest.raises(StoreLockedError, match=rf"pid {proc.pid}"):
            dt.Trainer.resume(path, client=client).fit(train, epochs=4, progress=False)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert dt.ParamStore.open(path).committed == 4


def test_divergence_keeps_the_last_finite_version(
    tmp_path: Path, client: Client
) -> None:
    X, y = regression_arrays(4_000)
    data = store(tmp_path / "d.zarr", X, y)
    path = tmp_path / "run.zarr"
    trainer = dt.Trainer(
        dt.models.LinearRegression(), dt.optim.SGD(1e3), store=path, client=client
    )
    with pytest.raises(DivergenceError, match=r"step \d+: .*run\.zarr.*last good"):
        trainer.fit(data, epochs=500, progress=False)
    ps = dt.ParamStore.open(path)
    version = ps.read()
    assert version.step == ps.committed
    assert version.step > 1
    assert all(np.all(np.isfinite(v)) for v in version.params.values())
    rows = ps.meta["history"]
    assert len(rows) == version.step
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] > 1e6 * rows[0]["loss"]  # it did diverge
    assert not ps.holds_lock and ps.lock_holder() is None
