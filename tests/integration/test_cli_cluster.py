"""The same fit on a ``dask scheduler`` + ``dask worker`` cluster.

A scheduler and two workers run as separate processes on 127.0.0.1, as they
would on separate machines (here they share this machine's filesystem, which
stands for the shared storage of a real cluster).  A fit through the Python
API with ``client="tcp://..."`` and one through ``dasktrain train --scheduler``
must give the same bits as the same fit on the session's LocalCluster: the
result depends on the seed only, not on the cluster, its worker names or the
order in which results arrive.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

import dasktrain as dt
from dasktrain.engine.rank import EVENT_TOPIC

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

N_WORKERS = 2
#: Seconds to wait for the scheduler file and for the workers to connect.
STARTUP_TIMEOUT = 90
#: Seconds allowed to the ``dasktrain train`` subprocess.
CLI_TIMEOUT = 180
#: Seconds a process gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 15
LOG_TAIL_CHARS = 3000

#: One fit, spelled for the Python API and for the command line: whole-chunk
#: minibatches (two chunks, so two leaves of the reduction tree, per step) and
#: a validation pass over three chunks at each epoch end.
L2 = 1e-4
LEARNING_RATE = 0.05
EPOCHS = 3
BATCH_ROWS = 4_000
VAL_FRACTION = 0.25
SEED = 0
CLI_ARGS = (
    "--model", "logistic", "--l2", "1e-4", "--optimizer", "adam",
    "--learning-rate", "0.05", "--epochs", "3", "--batch-rows", "4000",
    "--val-fraction", "0.25", "--seed", "0", "--quiet",
)  # fmt: skip


def dask_command(command: str) -> list[str]:
    """``dask scheduler`` / ``dask worker`` of this interpreter's environment
    (the console script if installed beside it, else the module)."""
    script = Path(sys.executable).with_name("dask")
    if script.exists():
        return [str(script), command]
    return [sys.executable, "-m", f"distributed.cli.dask_{command}"]


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except FileNotFoundError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started (a nanny and its worker), then
    SIGKILL it if it is still there after STOP_TIMEOUT."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def cli_cluster(tmp_path: Path) -> Iterator[tuple[str, list[Path]]]:
    """Start a scheduler and N_WORKERS workers as subprocesses (all at once:
    the workers wait for the scheduler file); yield the scheduler file and
    the log files.  Every process is stopped on exit."""
    scheduler_file = tmp_path / "scheduler.json"
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start(args: list[str], log: Path) -> None:
        logs.append(log)
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    args,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=tmp_path,
                    start_new_session=True,  # its own process group, for stop()
                )
            )

    scheduler_args = [
        "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
        "--scheduler-file", str(scheduler_file),
    ]  # fmt: skip
    try:
        start([*dask_command("scheduler"), *scheduler_args], tmp_path / "scheduler.log")
        for i in range(N_WORKERS):
            worker_args = [
                "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                "--name", f"cli-worker-{i}", "--nthreads", "1",
                "--memory-limit", "1GiB", "--no-dashboard",
                "--local-directory", str(tmp_path / f"worker-{i}"),
            ]  # fmt: skip
            start([*dask_command("worker"), *worker_args], tmp_path / f"worker-{i}.log")
        yield str(scheduler_file), logs
    finally:
        for proc in reversed(procs):  # workers first, then the scheduler
            stop(proc)


def wait_for_address(scheduler_file: str, logs: list[Path]) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(FileNotFoundError, json.JSONDecodeError),
            open(scheduler_file) as f,
        ):
            return str(json.load(f)["address"])
        time.sleep(0.2)
    raise AssertionError(
        f"no scheduler after {STARTUP_TIMEOUT} s:\n{log_tail(logs[0])}"
    )


def python_fit(store: Path, data: dt.Dataset, client: object) -> dt.Trainer:
    train, val = data.split(VAL_FRACTION, seed=0)
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=L2),
        dt.optim.Adam(LEARNING_RATE),
        store=store,
        client=client,
        seed=SEED,
    )
    trainer.fit(
        train, epochs=EPOCHS, batch_rows=BATCH_ROWS, validation=val, progress=False
    )
    return trainer


def assert_same_run(a: dt.Trainer, b: dt.Trainer) -> None:
    assert a.step == b.step and a.epoch == b.epoch == EPOCHS
    assert a.params.keys() == b.params.keys()
    for name, value in a.params.items():
        np.testing.assert_array_equal(b.params[name], value, strict=True)
    for column in ("loss", "grad_norm", "val_loss", "val_accuracy"):
        # Exact equality (val_* columns are NaN between epoch ends).
        np.testing.assert_array_equal(
            b.history.column(column), a.history.column(column), err_msg=column
        )


def test_fit_on_a_cli_cluster_matches_local_cluster(
    tmp_path: Path, client: Client
) -> None:
    data = dt.datasets.make_classification(
        tmp_path / "data.zarr",
        n_rows=24_000,
        n_features=10,
        chunk_rows=2_000,
        seed=3,
        client=client,
        progress=False,
    )
    with cli_cluster(tmp_path) as (scheduler_file, logs):
        # The reference fit runs while the subprocesses start.
        reference = python_fit(tmp_path / "local.zarr", data, client)
        address = wait_for_address(scheduler_file, logs)
        assert address.startswith("tcp://127.0.0.1:")
        with Client(address, set_as_default=False, timeout=STARTUP_TIMEOUT) as watch:
            try:
                watch.wait_for_workers(N_WORKERS, timeout=STARTUP_TIMEOUT)
            except TimeoutError as exc:
                tails = "\n".join(f"{p.name}:\n{log_tail(p)}" for p in logs)
                raise AssertionError(f"workers did not connect:\n{tails}") from exc
            names = sorted(
                w["name"]
                for w in watch.scheduler_info(n_workers=-1)["workers"].values()
            )
            assert names == [f"cli-worker-{i}" for i in range(N_WORKERS)]

            # The Python API, given the scheduler's address: the trainer opens
            # (and on close() closes) its own client.
            remote = python_fit(tmp_path / "remote.zarr", data, address)
            remote_client = remote.client
            assert remote_client.scheduler.address == address
            remote.close()
            assert remote_client.status == "closed"
            assert_same_run(reference, remote)

            # The command line, given the same address.
            cli = [
                sys.executable, "-m", "dasktrain", "train", str(data.path),
                "--store", str(tmp_path / "cli.zarr"), *CLI_ARGS,
                "--scheduler", address,
            ]  # fmt: skip
            res = subprocess.run(
                cli,
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
            assert res.returncode == 0, res.stderr
            summary = json.loads(res.stdout.strip().splitlines()[-1])
            assert summary["step"] == reference.step
            assert summary["epoch"] == EPOCHS
            # Both fits ran through this scheduler (each step logs an event
            # naming its store), the reference fit did not.
            stores = {msg["store"] for _, msg in watch.get_events(EVENT_TOPIC)}
            assert stores == {str(tmp_path / "remote.zarr"), str(tmp_path / "cli.zarr")}

        from_cli = dt.Trainer.resume(tmp_path / "cli.zarr", client=client)
        assert_same_run(reference, from_cli)
        # And the run is good, not just reproducible.
        assert reference.history.column("val_accuracy")[-1] > 0.8
