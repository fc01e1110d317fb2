"""Dataset and parameter stores on a real S3 protocol server (moto's server
mode on 127.0.0.1) through s3fs, with workers in separate processes.

The server runs as a subprocess for the module.  The module's cluster is
started after the ``AWS_*`` variables are set, so its workers inherit them
(the filesystem configures itself from the environment); two tests start
clusters whose workers have no such variables, with explicit
``storage_options`` that travel with the dataset and the parameter store.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import s3fs
from distributed import Client, LocalCluster
from trainer_support import assert_same_params, classification_arrays, losses

import dasktrain as dt
from dasktrain import cli
from dasktrain.data.io import clear_handle_cache, read_chunk
from dasktrain.errors import (
    LabelError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
)
from dasktrain.params import ParamStore
from dasktrain.params.lock import ObjectLockFile, WriteLock
from dasktrain.params.store import _Location
from dasktrain.params.tables import PARAM, ParamStoreRef, read_shard

pytestmark = pytest.mark.cluster

BUCKET = "dasktrain-test"
KEY_ID = "dasktrain-key"
SECRET = "dasktrain-secret"
REGION = "us-east-1"
SERVER_START_SECONDS = 60.0
CHUNK_ROWS = 500


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on 127.0.0.1 with one bucket."""

    endpoint: str

    @property
    def options(self) -> dict[str, Any]:
        """Explicit storage_options reaching the server without environment."""
        return {
            "key": KEY_ID,
            "secret": SECRET,
            "endpoint_url": self.endpoint,
        }

    def url(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"

    def fs(self) -> s3fs.S3FileSystem:
        """A filesystem on the server, with no stale cached listings."""
        fs: s3fs.S3FileSystem = fsspec.filesystem("s3", **self.options)
        fs.invalidate_cache()
        return fs

    def require_auth(self, required: bool) -> None:
        """Make the server check credentials (moto accepts any by default)."""
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0" if required else b"inf",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_server(endpoint: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto server at {endpoint} did not start")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto server subprocess with the bucket, and the ``AWS_*`` variables
    of this process pointing at it (isolated from any real configuration)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_server(endpoint, proc)
        server = S3Server(endpoint)
        with pytest.MonkeyPatch.context() as mp:
            nowhere = str(tmp_path_factory.mktemp("aws") / "absent")
            for name, value in {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": KEY_ID,
                "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": REGION,
                # Never look for credentials anywhere but here (no instance
                # metadata service, no user configuration files).
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": nowhere,
                "AWS_CONFIG_FILE": nowhere,
            }.items():
                mp.setenv(name, value)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                mp.delenv(name, raising=False)
            s3fs.S3FileSystem.clear_instance_cache()
            server.fs().mkdir(BUCKET)
            yield server
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def s3_client(s3: S3Server) -> Iterator[Client]:
    """Two worker processes started with the ``AWS_*`` environment of ``s3``."""
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _model() -> tuple[dt.models.LogisticRegression, dt.optim.Adam]:
    return dt.models.LogisticRegression(l2=1e-3), dt.optim.Adam(learning_rate=0.1)


class Interrupted(Exception):
    pass


class StopAt(dt.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: dt.Trainer, row: dict[str, Any]) -> None:
        if row["step"] == self.step:
            raise Interrupted(f"stopped at step {self.step}")


# -- the store root abstraction -------------------------------------------------


def test_location_on_s3(s3: S3Server) -> None:
    loc = _Location.from_user(s3.url("location/run.zarr/"))
    assert str(loc) == s3.url("location/run.zarr") and loc.remote
    assert loc.kind() == "missing"
    fs = s3.fs()
    for key in ("versions/1/a/c/0", "versions/10/a/c/0", "versions/11/b"):
        fs.pipe_file(f"{BUCKET}/location/run.zarr/{key}", key.encode())
    assert loc.kind() == "dir"
    assert loc.children("versions") == ["1", "10", "11"]
    assert loc.children("versions/11/b") == []
    assert loc.has("versions/10/a/c/0") and not loc.has("versions/2")

    loc.link("versions/10/a/c/0", "versions/12/a/c/0")
    assert fs.cat_file(f"{BUCKET}/location/run.zarr/versions/12/a/c/0") == (
        b"versions/10/a/c/0"
    )
    loc.link("versions/1/a/c/0", "versions/12/a/c/0")  # replaces
    assert fs.cat_file(f"{BUCKET}/location/run.zarr/versions/12/a/c/0") == (
        b"versions/1/a/c/0"
    )
    with pytest.raises(StoreNotFoundError, match=r"versions/9/a/c/0 does not exist"):
        loc.link("versions/9/a/c/0", "versions/12/a/c/1")

    loc.delete("versions/1")  # a prefix, not "versions/1*"
    assert loc.children("versions") == ["10", "11", "12"]
    loc.delete("versions/1")  # absent: nothing to do
    loc.delete("versions/11/b")  # a single object
    assert loc.children("versions") == ["10", "12"]


def test_object_lock_is_create_only_on_s3(s3: S3Server) -> None:
    fs = s3.fs()
    path = f"{BUCKET}/locks/run.zarr/.dasktrain-lock"
    lock_file = ObjectLockFile(fs, path, f"s3://{path}")
    assert lock_file.atomic
    assert lock_file.create(b'{"first": 1}', label="x")
    # The server refuses a second create-only write: nothing is overwritten.
    assert not lock_file.create(b'{"second": 2}', label="x")
    assert fs.cat_file(path) == b'{"first": 1}'
    assert lock_file.remove_if_token(None)
    with WriteLock.acquire(lock_file, owner="a test") as lock:
        assert lock.held
        with pytest.raises(StoreLockedError, match="a test"):
            WriteLock.acquire(lock_file, owner="another")
    assert not fs.exists(path)


def test_param_store_on_s3(s3: S3Server) -> None:
    url = s3.url("params/run.zarr")
    store = ParamStore.create(url, keep_versions=1, meta={"model": "m"})
    assert store.path == url and ParamStore.exists(url)
    with store.lock(owner="the test"):
        assert ParamStore.open(url).lock_holder().owner == "the test"
        for step in (1, 10):
            store.commit(step, {"w": np.full(3, float(step))}, {}, {"step": step})
        assert store.versions == [10]  # keep_versions=1: version 1 deleted
        assert store._location.children("versions") == ["10", "zarr.json"]
        # What an interrupted commit leaves is ignored, then cleaned up.
        s3.fs().pipe_file(f"{BUCKET}/params/run.zarr/versions/11/zarr.json", b"{}")
        assert ParamStore.open(url).committed == 10
        assert store.cleanup() == ["versions/11"]
    reader = ParamStore.open(url)
    assert reader.committed == 10
    np.testing.assert_array_equal(reader.read().params["w"], np.full(3, 10.0))
    with pytest.raises(StoreError, match="already exists"):
        ParamStore.create(url)

    taken = reader.lock(owner="a crashed job")
    assert ParamStore.break_lock(url).owner == "a crashed job"
    assert not taken.held
    with reader.lock():
        reader.remove()
    assert not ParamStore.exists(url)
    assert not s3.fs().exists(f"{BUCKET}/params/run.zarr")


# -- training on the object store -------------------------------------------------


@pytest.mark.slow
def test_fit_evaluate_predict_and_lock_with_both_stores_on_s3(
    s3: S3Server, s3_client: Client
) -> None:
    data_url = s3.url("data/classification.zarr")
    run_url = s3.url("runs/exp1.zarr")
    ds = dt.datasets.make_classification(
        data_url,
        n_rows=2_000,
        n_features=6,
        chunk_rows=CHUNK_ROWS,
        seed=3,
        client=s3_client,
        progress=False,
    )
    assert ds.path == data_url and ds.storage_options == {}
    assert dt.Dataset.open(data_url) == ds
    train, val = ds.split(val_fraction=0.25, seed=0)
    assert (train.n_chunks, val.n_chunks) == (3, 1)

    trainer = dt.Trainer(*_model(), store=run_url, client=s3_client)
    history = trainer.fit(train, epochs=2, batch_rows=1_000, progress=False)
    assert len(history) == 2 * 2  # two steps (2 chunks, then 1) per epoch
    metrics = trainer.evaluate(val)
    assert metrics["accuracy"] > 0.7

    stored = ParamStore.open(run_url)
    assert stored.committed == trainer.step == 4
    assert_same_params(stored.read().params, trainer.params, "store vs trainer")
    objects = s3.fs().find(f"{BUCKET}/runs/exp1.zarr")
    assert f"{BUCKET}/runs/exp1.zarr/zarr.json" in objects
    assert not any(".dasktrain-lock" in name for name in objects)  # released

    # Predictions: a Dataset read by the workers, and numpy rows from the client.
    labels = trainer.predict(val).compute()
    y_val = val.read("y", val.chunk_ids[0])
    assert np.mean(labels == y_val) == pytest.approx(metrics["accuracy"])
    X_val = val.read("X", val.chunk_ids[0])
    np.testing.assert_array_equal(trainer.predict(X_val), labels)

    # One writer at a time: the lock object refuses a second trainer.
    holder = ParamStore.open(run_url)
    with holder.lock(owner="notebook of the test"):
        assert s3.fs().exists(f"{BUCKET}/runs/exp1.zarr/.dasktrain-lock")
        second = dt.Trainer.resume(run_url, client=s3_client)
        with pytest.raises(StoreLockedError) as info:
            second.fit(train, epochs=3, batch_rows=1_000, progress=False)
        message = str(info.value)
        assert run_url in message and "notebook of the test" in message
        assert ParamStore.open(run_url).committed == 4
    # Released: the refused trainer may now continue the run.
    assert len(second.fit(train, epochs=3, batch_rows=1_000, progress=False)) == 6
    assert ParamStore.open(run_url).committed == 6
    second.close()
    trainer.close()

    # The command line takes the URLs as they are.
    assert cli.main(["inspect", run_url, "--json"]) == 0
    assert cli.main(["inspect", data_url]) == 0


@pytest.mark.slow
def test_resume_from_s3_is_bit_identical_to_a_local_run(
    s3: S3Server, s3_client: Client, tmp_path: Path
) -> None:
    X, y = classification_arrays(1_500, 5, seed=7)
    local = dt.Dataset.from_arrays(tmp_path / "d.zarr", X=X, y=y, chunk_rows=CHUNK_ROWS)
    remote = dt.Dataset.from_arrays(
        s3.url("data/resume.zarr"), X=X, y=y, chunk_rows=CHUNK_ROWS
    )
    for c in range(remote.n_chunks):
        np.testing.assert_array_equal(remote.read("X", c), local.read("X", c))
    kwargs: dict[str, Any] = {"epochs": 2, "batch_rows": 1_000, "progress": False}

    reference = dt.Trainer(*_model(), store=tmp_path / "run.zarr", client=s3_client)
    expected = losses(reference.fit(local, **kwargs))
    reference.close()

    run_url = s3.url("runs/resumed.zarr")
    first = dt.Trainer(*_model(), store=run_url, client=s3_client)
    with pytest.raises(Interrupted):
        first.fit(remote, callbacks=[StopAt(1)], checkpoint_steps=1, **kwargs)
    first.close()
    assert ParamStore.open(run_url).committed == 1  # mid-epoch

    resumed = dt.Trainer.resume(run_url, client=s3_client)
    history = resumed.fit(remote, **kwargs)
    resumed.close()
    assert losses(history) == expected
    assert_same_params(
        ParamStore.open(run_url).read().params,
        ParamStore.open(tmp_path / "run.zarr").read().params,
        "resumed on s3 vs uninterrupted local run",
    )


def test_failed_first_fit_leaves_nothing_on_s3(s3: S3Server, s3_client: Client) -> None:
    X, _ = classification_arrays(1_000, 4, seed=4)
    bad = dt.Dataset.from_arrays(
        s3.url("data/bad-labels.zarr"),
        X=X,
        y=np.full(1_000, 3, np.int8),
        chunk_rows=CHUNK_ROWS,
    )
    run_url = s3.url("runs/failed.zarr")
    with pytest.raises(LabelError):
        dt.Trainer(*_model(), store=run_url, client=s3_client).fit(
            bad, epochs=1, progress=False
        )
    assert not ParamStore.exists(run_url)
    assert s3.fs().find(f"{BUCKET}/runs/failed.zarr") == []  # nor a lock


def test_explicit_storage_options_travel_to_workers(
    s3: S3Server,
    make_client: Callable[..., Client],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # A cluster whose workers know neither the endpoint nor credentials (and
    # look for none elsewhere): they reach the server only through the
    # options in the dataset ref.
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    client = make_client(1)
    assert not any(client.run(lambda: "AWS_ENDPOINT_URL" in os.environ).values())
    X, y = classification_arrays(1_500, 4, seed=2)
    url = s3.url("data/explicit.zarr")
    ds = dt.Dataset.from_arrays(
        url, X=X, y=y, chunk_rows=CHUNK_ROWS, storage_options=s3.options
    )
    assert ds.ref.storage_options == s3.options
    assert SECRET not in repr(ds.ref)
    reopened = dt.Dataset.open(url, storage_options=s3.options)
    assert reopened == ds

    trainer = dt.Trainer(*_model(), store=tmp_path / "run.zarr", client=client)
    trainer.fit(reopened, epochs=2, progress=False)
    assert trainer.evaluate(reopened)["accuracy"] > 0.7
    trainer.close()


def _table_keys(fs: s3fs.S3FileSystem, run_key: str, step: int) -> set[str]:
    """Keys of the shard objects of version ``step``, relative to its tables."""
    base = f"{BUCKET}/{run_key}/versions/{step}/tables/"
    fs.invalidate_cache()
    return {
        key[len(base) :]
        for key in fs.find(base)
        if "/c/" in key  # shard objects, not zarr.json metadata
    }


@pytest.mark.slow
def test_sharded_tables_on_s3_with_storage_options_only(
    s3: S3Server,
    make_client: Callable[..., Client],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The parameter-server path on an object store reached only through
    ``storage_options``: workers pull, update and share table shards with the
    options of the parameter store (no ``AWS_*`` variable anywhere), and an
    interrupted run resumed from S3 ends with the bits of a local run."""
    n_users, n_items, rank, shard_rows = 2_000, 100, 3, 250
    run_key = "runs/sharded.zarr"
    run_url = s3.url(run_key)
    # A checkpoint (a version of the tables) after every step; one stream:
    # a step is one chunk's ratings, which leave some shards untouched.
    kwargs: dict[str, Any] = {
        "epochs": 1,
        "batch_rows": 1_000,
        "progress": False,
        "checkpoint_steps": 1,
        "n_streams": 1,
    }

    def model() -> dt.models.MatrixFactorization:
        return dt.models.MatrixFactorization(
            n_users, n_items, rank, l2=1e-3, dtype="float64"
        )

    def opt() -> dt.optim.Adagrad:
        return dt.optim.Adagrad(0.3)

    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.delenv(name)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            client = make_client(2)
            for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
                assert not any(client.run(lambda n=name: n in os.environ).values())
            # The data is local: this test is about the parameter store
            # (datasets with options are covered above).
            data = dt.datasets.make_ratings(
                tmp_path / "r.zarr",
                n_users=n_users,
                n_items=n_items,
                n_ratings=3_000,
                chunk_rows=1_000,
                seed=4,
                client=client,
                progress=False,
            )

            reference = dt.Trainer(
                model(),
                opt(),
                store=tmp_path / "run.zarr",
                client=client,
                sharded=True,
                shard_rows=shard_rows,
            )
            expected = losses(reference.fit(data, **kwargs))
            assert len(expected) == 3

            # Interrupted after the first step (committed on the way out)...
            first = dt.Trainer(
                model(),
                opt(),
                store=run_url,
                client=client,
                sharded=True,
                shard_rows=shard_rows,
                storage_options=s3.options,
            )
            assert SECRET not in repr(first)
            with pytest.raises(Interrupted):
                first.fit(data, callbacks=[StopAt(1)], **kwargs)
            first.close()
            stored = ParamStore.open(run_url, storage_options=s3.options)
            assert stored.committed == 1
            assert stored.ref == ParamStoreRef(run_url, s3.options)
            assert SECRET not in repr(stored.ref)

            # ...then resumed from the store, with the options only.
            resumed = dt.Trainer.resume(
                run_url, client=client, storage_options=s3.options
            )
            history = resumed.fit(data, **kwargs)
            assert losses(history) == expected
            stored.refresh()
            assert stored.committed == resumed.step == 3

            # Same bits as the uninterrupted local run, read on the client.
            got = {k: np.asarray(v[...]) for k, v in resumed.params.items()}
            want = {k: np.asarray(v[...]) for k, v in reference.params.items()}
            assert_same_params(got, want, "resumed on s3 vs local")
            np.testing.assert_array_equal(stored.table("user")[...], want["user"])

            # Every step wrote the shards it changed and shared the others with
            # the new version by a server-side copy: the last version holds
            # every shard object, like the local run's (hard links there).
            layouts = stored.table_layouts()
            n_user_shards = layouts["user"].n_shards
            assert n_user_shards == n_users // shard_rows
            n_shards = sum(layout.n_shards for layout in layouts.values())
            for row in history.rows:
                assert 0 < row["shards_written"] < n_shards
                assert row["shards_shared"] > 0
            keys = _table_keys(s3.fs(), run_key, 3)
            want_keys = {
                f"{table}/{array}/c/{shard}/0"
                for table, layout in layouts.items()
                for array in layout.arrays
                for shard in range(layout.n_shards)
            }
            assert keys == want_keys
            local_keys = {
                str(p.relative_to(tmp_path / "run.zarr/versions/3/tables"))
                for p in (tmp_path / "run.zarr/versions/3/tables").rglob("c/*/0")
            }
            assert local_keys == want_keys

            # A worker reads a shard with the options of the reference it is
            # given, and without them says what is missing.
            user = layouts["user"]
            shard = client.submit(
                read_shard, stored.ref, 3, user, PARAM, 1, pure=False
            ).result()
            np.testing.assert_array_equal(shard, want["user"][250:500])
            no_options = client.submit(
                read_shard, ParamStoreRef(run_url), 3, user, PARAM, 1, pure=False
            )
            with pytest.raises(StoreError, match="no credentials found") as info:
                no_options.result()
            assert run_url in str(info.value) and "storage_options" in str(info.value)

            # Evaluation and predictions pull rows with the same options.
            assert resumed.evaluate(data) == reference.evaluate(data)
            on_workers = resumed.predict(data).compute()
            np.testing.assert_array_equal(on_workers, reference.predict(data).compute())
            rows = {f: data.read(f, 0)[:50] for f in ("user", "item")}
            np.testing.assert_array_equal(resumed.predict(rows), on_workers[:50])
            resumed.close()
            reference.close()
        finally:
            s3fs.S3FileSystem.clear_instance_cache()

    # The command line configures S3 from the environment (it takes no
    # storage_options); it lists the tables of the store.
    capsys.readouterr()
    assert cli.main(["inspect", run_url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["committed_step"] == 3
    assert info["tables"]["user"]["n_shards"] == n_user_shards
    assert sorted(info["tables"]) == ["item", "user"]


# -- errors ----------------------------------------------------------------------


def test_missing_bucket_is_named(s3: S3Server, tmp_path: Path) -> None:
    url = "s3://no-such-bucket/d.zarr"
    with pytest.raises(StoreNotFoundError, match="bucket 'no-such-bucket'") as info:
        dt.Dataset.open(url)
    assert url in str(info.value)
    with pytest.raises(StoreNotFoundError, match="bucket 'no-such-bucket'"):
        dt.Dataset.from_arrays(url, y=np.zeros(10, np.float32))
    with pytest.raises(StoreNotFoundError, match="bucket 'no-such-bucket'"):
        ParamStore.open("s3://no-such-bucket/run.zarr")
    with pytest.raises(StoreNotFoundError, match="never creates buckets"):
        ParamStore.create("s3://no-such-bucket/run.zarr")
    # A missing key in an existing bucket is just "no store".
    with pytest.raises(StoreNotFoundError, match=r"no dataset store at 's3://"):
        dt.Dataset.open(s3.url("nothing/here.zarr"))
    assert not s3.fs().exists("no-such-bucket")


def test_wrong_credentials(s3: S3Server) -> None:
    url = s3.url("data/private.zarr")
    dt.Dataset.from_arrays(url, y=np.arange(10.0), chunk_rows=4)
    ParamStore.create(s3.url("runs/private.zarr"))
    wrong = {**s3.options, "key": "not-a-key", "secret": "not-a-secret"}
    s3.require_auth(True)
    try:
        with pytest.raises(StoreError, match="access denied") as info:
            dt.Dataset.open(url, storage_options=wrong)
        assert url in str(info.value) and "credentials" in str(info.value)
        with pytest.raises(StoreError, match="access denied"):
            ParamStore.open(s3.url("runs/private.zarr"), storage_options=wrong)
    finally:
        s3.require_auth(False)


def test_no_credentials(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    url = s3.url("data/anyone.zarr")
    dt.Dataset.from_arrays(url, y=np.arange(10.0), chunk_rows=4)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(StoreError, match="no credentials found") as info:
            dt.Dataset.open(url)
        assert url in str(info.value) and "AWS_ACCESS_KEY_ID" in str(info.value)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_unreachable_endpoint(s3: S3Server) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    options = {
        **s3.options,
        "endpoint_url": closed,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    url = s3.url("data/classification.zarr")
    with pytest.raises(StoreError, match="cannot reach the storage service") as info:
        dt.Dataset.open(url, storage_options=options)
    assert url in str(info.value)


def test_missing_chunk_on_s3_is_named(s3: S3Server) -> None:
    ds = dt.Dataset.from_arrays(
        s3.url("data/reads.zarr"), y=np.arange(10.0), chunk_rows=4
    )
    clear_handle_cache()
    np.testing.assert_array_equal(read_chunk(ds.ref, "y", 2), [8.0, 9.0])
    s3.fs().rm(f"{BUCKET}/data/reads.zarr/y/c/1")
    with pytest.raises(StoreError, match=r"chunk 1 .* is missing"):
        read_chunk(ds.ref, "y", 1)


# -- file:// URLs ----------------------------------------------------------------


def test_file_urls(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A URL must never be taken for a relative path ("file:/tmp/...").
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    X, y = classification_arrays(1_200, 4, seed=5)
    data_url = f"file://{tmp_path}/d.zarr"
    ds = dt.Dataset.from_arrays(data_url, X=X, y=y, chunk_rows=CHUNK_ROWS)
    assert ds.path == str(tmp_path / "d.zarr")  # a local store, read directly
    assert dt.Dataset.open(tmp_path / "d.zarr") == dt.Dataset.open(data_url)

    run_url = f"file://{tmp_path}/run.zarr"
    trainer = dt.Trainer(*_model(), store=run_url, client=client)
    trainer.fit(ds, epochs=1, progress=False)
    trainer.close()
    assert (tmp_path / "run.zarr" / "zarr.json").is_file()
    assert ParamStore.open(tmp_path / "run.zarr").committed == 1  # full batch
    resumed = dt.Trainer.resume(run_url, client=client)
    resumed.fit(ds, epochs=2, progress=False)
    resumed.close()
    assert ParamStore.open(run_url).committed == 2
    assert ParamStore.open(run_url).path == str(tmp_path / "run.zarr")
    assert list(cwd.iterdir()) == []
