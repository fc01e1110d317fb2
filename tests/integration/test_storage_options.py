"""``--storage-option`` on every CLI command and ``storage_options=`` on the
scikit-learn estimators, against a real S3 protocol server (moto's, a
subprocess on 127.0.0.1).

No ``AWS_*`` variable is set anywhere (this process, the CLI subprocesses,
the workers): the server is reached only through the options, so a command
that dropped them would fail.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from distributed import Client, LocalCluster

import dasktrain as dt
from dasktrain.cli import parse_storage_option

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BUCKET = "dasktrain-options"
KEY_ID = "options-key"
SECRET = "options-secret"
SERVER_START_SECONDS = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A moto server; yields the storage options that reach it."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto-options") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
        )
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            try:
                with urllib.request.urlopen(
                    f"{endpoint}/moto-api/data.json", timeout=2
                ):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto did not start: {log.read_text()}"
                    ) from None
                time.sleep(0.2)
        options = {"key": KEY_ID, "secret": SECRET, "endpoint_url": endpoint}
        fsspec.filesystem("s3", **options).mkdir(BUCKET)
        yield options
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.environ.update(saved)


@pytest.fixture(scope="module")
def s3_cluster(s3: dict[str, Any]) -> Iterator[Client]:
    """Workers without any AWS configuration."""
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
        assert not any(
            client.run(lambda: any(k.startswith("AWS_") for k in os.environ)).values()
        )
        yield client


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dasktrain", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**_clean_env(), "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )


def test_parse_storage_option() -> None:
    assert parse_storage_option("key=a=b") == (["key"], "a=b")
    assert parse_storage_option("secret=123") == (["secret"], "123")
    assert parse_storage_option("use_ssl:=false") == (["use_ssl"], False)
    assert parse_storage_option('client_kwargs:={"region_name": "x"}') == (
        ["client_kwargs"],
        {"region_name": "x"},
    )
    assert parse_storage_option("config_kwargs.retries.max_attempts:=2") == (
        ["config_kwargs", "retries", "max_attempts"],
        2,
    )


def test_every_cli_command_with_storage_options(
    s3: dict[str, Any], s3_cluster: Client, tmp_path: Path
) -> None:
    address = s3_cluster.scheduler.address
    flags = [f"--storage-option=key={KEY_ID}", f"--storage-option=secret={SECRET}"]
    endpoint = f"--storage-option=endpoint_url={s3['endpoint_url']}"
    data = f"s3://{BUCKET}/cli/data.zarr"
    run = f"s3://{BUCKET}/cli/run.zarr"

    # Without the options, the server refuses to be found (no AWS config).
    out = _cli("inspect", data, cwd=tmp_path)
    assert out.returncode != 0

    out = _cli(
        "make-data", data, "--rows", "4000", "--features", "5", "--chunk-rows",
        "1000", "--quiet", "--scheduler", address, *flags, endpoint, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    out = _cli("inspect", data, "--json", *flags, endpoint, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["n_rows"] == 4000

    # train: the endpoint from the config file's table, credentials as flags.
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "logistic"\nepochs = 3\n\n[storage_options]\n'
        f'endpoint_url = "{s3["endpoint_url"]}"\n'
    )
    out = _cli(
        "train", data, "--store", run, "--config", str(config), "--quiet",
        "--scheduler", address, *flags, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["epoch"] == 3

    out = _cli("inspect", run, "--json", *flags, endpoint, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["kind"] == "parameter store"
    out = _cli(
        "evaluate", run, data, "--scheduler", address, *flags, endpoint, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["accuracy"] > 0.6

    preds = f"s3://{BUCKET}/cli/preds.npy"
    out = _cli(
        "predict", run, data, "--out", preds, "--scheduler", address, *flags,
        endpoint, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    with fsspec.open(preds, "rb", **s3) as f:
        values = np.load(f)
    served = dt.load_model(run, storage_options=s3)
    X = np.asarray(dt.Dataset.open(data, storage_options=s3).to_dask("X"))
    assert np.array_equal(values, served.predict(X))

    zarr_out = f"s3://{BUCKET}/cli/preds.zarr"
    out = _cli(
        "predict", run, data, "--out", zarr_out, "--proba", "--scheduler", address,
        *flags, endpoint, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    import zarr

    stored = zarr.open_array(zarr_out, mode="r", storage_options=s3)
    assert np.array_equal(stored[...], served.predict_proba(X))

    bad = _cli("inspect", data, "--storage-option", "novalue", cwd=tmp_path)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_sklearn_estimator_with_storage_options(
    s3: dict[str, Any], s3_cluster: Client
) -> None:
    from sklearn.base import clone

    from dasktrain.sklearn import LogisticRegression, close_shared_cluster

    try:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(3_000, 4))
        y = (X @ np.array([1.0, -1.0, 0.5, 0.0]) > 0).astype(np.int64)
        store_dir = f"s3://{BUCKET}/sklearn"
        est = LogisticRegression(
            store_dir=store_dir, storage_options=s3, client=s3_cluster.scheduler.address
        )
        assert est.get_params()["storage_options"] is s3  # __init__ only stores
        est.fit(X, y)
        assert est.store_.startswith(store_dir + "/")
        fs = fsspec.filesystem("s3", **s3)
        fs.invalidate_cache()
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/sklearn")]
        # The run's store is kept; the scratch copy of the arrays is removed.
        assert names == [est.store_.rsplit("/", 1)[-1]]
        assert est.score(X, y) > 0.95
        served = dt.load_model(est.store_, storage_options=s3)
        np.testing.assert_allclose(served.params["w"], est.coef_.ravel())

        # A store path as X: opened with the same options.
        data = f"s3://{BUCKET}/sklearn-data.zarr"
        dt.Dataset.from_arrays(data, X=X, y=y, chunk_rows=1_000, storage_options=s3)
        from_store = clone(est).fit(data)
        np.testing.assert_allclose(from_store.predict(data).compute(), est.predict(X))

        with pytest.raises(ValueError, match="storage_options must be a dict"):
            LogisticRegression(storage_options="key=x").fit(X, y)
    finally:
        close_shared_cluster()  # the client it opened for the address
