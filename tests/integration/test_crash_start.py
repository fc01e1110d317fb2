"""A driver SIGKILLed at any moment of its start leaves a run that completes.

A fork server (``DRIVER_SCRIPT``) runs each driver: it connects to the shared
cluster and calls ``Trainer(...).fit(...)`` on a new store.  The driver counts
the files zarr writes (the lowest-level write of zarr's ``LocalStore``) and,
when asked, SIGKILLs itself just before its k-th one.  A reference driver
lists every write of an undisturbed run; the kills cover each write of the
store's creation and of the first commit, and the first write after it (for a
matrix factorization with sharded tables, the first write of each kind).
Each killed store is then completed twice, by ``Trainer.resume(store).fit(...)``
and by running the same driver again, and both must end with the bits of the
undisturbed run.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client

import dasktrain as dt
from dasktrain.errors import StoreNotFoundError

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DRIVER_TIMEOUT = 120.0
EPOCHS = 2
BATCH_ROWS = 200
SEED = 3

DRIVER_SCRIPT = """
import json, logging, os, signal, sys, traceback

import dasktrain as dt


def count_writes(kill_at, trace):
    import zarr.storage._local as local

    original = local._put
    n_writes = [0]

    def put(path, value, exclusive=False):
        n_writes[0] += 1
        if trace is not None:
            with open(trace, "a") as f:
                f.write(json.dumps([str(path), exclusive]) + "\\n")
        if n_writes[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, value, exclusive=exclusive)

    local._put = put


def run(job):
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    count_writes(job.get("kill_at"), job.get("trace"))
    data = dt.Dataset.open(job["data"])
    if job["model"] == "sharded":
        model = dt.models.MatrixFactorization(*job["mf"], l2=1e-3, dtype="float64")
        optimizer = dt.optim.Adagrad(0.2)
        extra = {"sharded": True, "shard_rows": job["shard_rows"]}
    else:
        model = dt.models.LogisticRegression(l2=1e-3)
        optimizer = dt.optim.Adam(0.1)
        extra = {}
    with dt.Trainer(
        model,
        optimizer,
        store=job["store"],
        client=job["address"],
        seed=job["seed"],
        **extra,
    ) as trainer:
        trainer.fit(
            data, epochs=job["epochs"], batch_rows=job["batch_rows"], progress=False
        )


for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 0
        try:
            run(job)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}),
          flush=True)
"""


class Drivers:
    """The fork server: one driver at a time, each a forked child."""

    def __init__(self, directory: Path) -> None:
        script = directory / "driver.py"
        script.write_text(DRIVER_SCRIPT)
        self.directory = directory
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(directory / "server.log", "wb"),  # noqa: SIM115
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.n_jobs = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def run(self, **job: Any) -> tuple[int, str]:
        """Run a driver to its end; its exit code (-9: SIGKILL) and log."""
        self.n_jobs += 1
        log = self.directory / f"driver-{self.n_jobs}.log"
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({**job, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        try:
            msg = json.loads(self._lines.get(timeout=DRIVER_TIMEOUT))
        except queue.Empty:
            raise AssertionError(f"no driver result in {DRIVER_TIMEOUT} s") from None
        text = log.read_text(errors="replace") if log.exists() else ""
        return int(msg["code"]), text

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def drivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drivers]:
    server = Drivers(tmp_path_factory.mktemp("crash-start-drivers"))
    yield server
    server.close()


def _final_state(store: Path) -> dict[str, np.ndarray]:
    ps = dt.ParamStore.open(store)
    version = ps.read()
    meta = ps.meta
    assert meta["progress"]["epoch"] == EPOCHS and meta["status"] == "finished"
    arrays = {f"params/{k}": v for k, v in version.params.items()}
    arrays |= {f"opt/{k}": v for k, v in version.opt_state.items()}
    for name in ps.table_layouts():
        arrays[f"tables/{name}"] = np.asarray(ps.table(name)[...])
    arrays["step"] = np.array(version.step)
    arrays["losses"] = np.array([row["loss"] for row in meta["history"]])
    return arrays


def _assert_same_bits(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(ref)
    for name, array in ref.items():
        assert ours[name].dtype == array.dtype, name
        assert np.array_equal(ours[name], array), name


def _leftovers(store: Path) -> list[str]:
    """Files next to the store that are not the store (creation debris)."""
    return sorted(
        p.name
        for p in store.parent.iterdir()
        if p.name != store.name and p.name.startswith(f".{store.name}")
    )


MF_SHAPE = (200, 60, 4)  # users, items, rank
SHARD_ROWS = 50


def _data(path: Path, model: str) -> dt.Dataset:
    rng = np.random.default_rng(0)
    if model == "sharded":
        n = 600
        return dt.Dataset.from_arrays(
            path,
            user=np.sort(rng.integers(0, MF_SHAPE[0], size=n)),
            item=rng.integers(0, MF_SHAPE[1], size=n),
            rating=rng.normal(size=n).astype(np.float32),
            chunk_rows=250,
        )
    X = rng.normal(size=(1_000, 5)).astype(np.float32)
    y = (X @ np.linspace(-1.0, 1.0, 5) > 0).astype(np.float32)
    return dt.Dataset.from_arrays(path, X=X, y=y, chunk_rows=250)


@pytest.mark.parametrize("model", ["dense", "sharded"])
def test_driver_killed_at_every_write_of_its_start(
    model: str, drivers: Drivers, client: Client, tmp_path: Path
) -> None:
    """``dense``: logistic regression, Adam minibatch segments.  ``sharded``:
    a matrix factorization whose tables the workers write into version 0
    before the driver commits it."""
    data_path = tmp_path / "data.zarr"
    data = _data(data_path, model)
    job = {
        "address": client.scheduler.address,
        "data": str(data_path),
        "seed": SEED,
        "epochs": EPOCHS,
        "batch_rows": BATCH_ROWS,
        "model": model,
        "mf": MF_SHAPE,
        "shard_rows": SHARD_ROWS,
    }

    # An undisturbed run, with the list of the files it writes.
    trace = tmp_path / "writes.jsonl"
    ref_store = tmp_path / "ref.zarr"
    code, log = drivers.run(**job, store=str(ref_store), trace=str(trace))
    assert code == 0, log
    ref = _final_state(ref_store)
    writes = [json.loads(line) for line in trace.read_text().splitlines()]
    # Kill points: just before each write of the store's creation and of the
    # first commit (version 0, then the root metadata), and of the first
    # write after it.  zarr's exclusive writes of implicit parents that exist
    # already are no-ops (a kill there is a kill after the write before), but
    # the first write into the renamed store follows the rename and the lock.
    in_store = f"/{ref_store.name}/"
    first_commit = next(
        i
        for i, (path, exclusive) in enumerate(writes)
        if path.endswith(f"{in_store}zarr.json")
        and not exclusive
        and any(f"{in_store}versions/0/" in p for p, _ in writes[:i])
    )
    first_in_store = next(i for i, (p, _) in enumerate(writes) if in_store in p)
    after_commit = next(
        i
        for i, (_, exclusive) in enumerate(writes)
        if i > first_commit and not exclusive
    )
    kill_points = sorted(
        {
            i + 1
            for i, (_, exclusive) in enumerate(writes[: first_commit + 1])
            if not exclusive
        }
        | {first_in_store + 1, after_commit + 1}
    )
    if model == "sharded":
        # Its start writes the same kinds of files as the dense one, many
        # times over (one group per table array): kill before the first of
        # each kind (the tables' metadata, the dense parameters, the
        # optimizer state) and at the commit's edges.
        firsts = {
            next(i for i, (p, _) in enumerate(writes) if f"versions/0/{part}/" in p)
            for part in ("tables", "params", "opt")
        }
        kill_points = sorted(
            {1, 2, first_in_store + 1, first_commit + 1, after_commit + 1}
            | {i + 1 for i in firsts}
        )
    assert len(kill_points) >= 6, writes[: first_commit + 2]

    for k in kill_points:
        store = tmp_path / f"run-{k}.zarr"
        code, log = drivers.run(**job, store=str(store), kill_at=k)
        assert code == -signal.SIGKILL, f"kill point {k}: {log}"
        if store.exists():
            # Trainer.resume continues the run from what the store records
            # (on a copy: the original is for running the script again).
            copy = tmp_path / f"resumed-{k}.zarr"
            shutil.copytree(store, copy)
            trainer = dt.Trainer.resume(copy, client=client)
            trainer.fit(data, epochs=EPOCHS, batch_rows=BATCH_ROWS, progress=False)
            trainer.close()
            _assert_same_bits(_final_state(copy), ref)
        else:
            # Killed before the store existed: there is no run to resume.
            with pytest.raises(StoreNotFoundError, match=str(store)):
                dt.Trainer.resume(store, client=client)
        # Running the same script again completes the run too.
        code, log = drivers.run(**job, store=str(store))
        assert code == 0, f"kill point {k}: {log}"
        _assert_same_bits(_final_state(store), ref)
        assert _leftovers(store) == [], f"kill point {k}"
    assert _leftovers(ref_store) == []
