"""Stores hold plain data only, and the client works over Dask TLS."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster
from distributed.security import Security

import dasktrain as dt
from dasktrain.errors import DasktrainError, StoreError

pytestmark = pytest.mark.cluster


def small_dataset(path: Path) -> dt.Dataset:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 4)).astype("float32")
    y = (X @ np.array([1.0, -1.0, 0.5, 0.0]) > 0).astype("int8")
    return dt.Dataset.from_arrays(path, X=X, y=y, chunk_rows=500)


def trained_store(tmp_path: Path, client: Client) -> Path:
    ds = small_dataset(tmp_path / "d.zarr")
    store = tmp_path / "run.zarr"
    with dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.Adam(0.1),
        store=store,
        client=client,
    ) as tr:
        tr.fit(ds, epochs=2, progress=False)
    return store


def all_metadata(root: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in root.rglob("zarr.json")]


def test_stores_hold_only_plain_data(tmp_path: Path, client: Client) -> None:
    store = trained_store(tmp_path, client)
    for root in (store, tmp_path / "d.zarr"):
        docs = all_metadata(root)
        assert docs, f"no zarr metadata under {root}"
        for doc in docs:
            text = json.dumps(doc)
            assert "pickle" not in text.lower()
            if doc.get("node_type") == "array":
                assert doc["data_type"] not in ("object", "|O"), doc
        # Every array reads back with plain zarr, without dasktrain.
        group = zarr.open_group(root, mode="r")
        for _, arr in group.arrays():
            np.asarray(arr[...])


CRAFTED_MODELS = [
    {"type": "__import__('os').system('touch PWNED')"},
    {"type": "LogisticRegression", "l2": "__import__('os').system('touch PWNED')"},
    {"type": "LogisticRegression", "l2": 0.0, "__class__": "os.system"},
    {"type": "builtins.eval", "source": "open('PWNED', 'w')"},
    {"py/object": "os.system", "args": ["touch PWNED"]},
    "gASVIAAAAAAAAACMAm9zlIwGc3lzdGVtlJOUjAt0b3VjaCBQV05FRJSFlFKULg==",
]


@pytest.mark.parametrize("crafted", CRAFTED_MODELS)
def test_crafted_attributes_are_rejected_as_data(
    tmp_path: Path, client: Client, crafted: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = trained_store(tmp_path, client)
    monkeypatch.chdir(tmp_path)
    root = store / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["dasktrain"]["meta"]["model"] = crafted
    root.write_text(json.dumps(doc))
    with pytest.raises(DasktrainError) as info:
        dt.Trainer.resume(store, client=client)
    assert "run.zarr" in str(info.value)
    assert not (tmp_path / "PWNED").exists()


def test_crafted_optimizer_state_names_are_plain_data(
    tmp_path: Path, client: Client
) -> None:
    store = trained_store(tmp_path, client)
    root = store / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["dasktrain"]["meta"]["optimizer"] = {
        "type": "Adam",
        "learning_rate": [],
    }
    root.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"run\.zarr"):
        dt.Trainer.resume(store, client=client)


@pytest.mark.slow
def test_training_over_tls(tmp_path: Path, client: Client) -> None:
    security = Security.temporary()
    ds = small_dataset(tmp_path / "d.zarr")
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            protocol="tls://",
            security=security,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster, security=security) as tls_client,
    ):
        assert tls_client.scheduler.address.startswith("tls://")
        with dt.Trainer(
            dt.models.LogisticRegression(l2=1e-3),
            dt.optim.LBFGS(),
            store=tmp_path / "tls.zarr",
            client=tls_client,
        ) as tr:
            tr.fit(ds, epochs=10, progress=False)
            tls_params = tr.params
    # The same fit over plain TCP gives the same bits.
    with dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.LBFGS(),
        store=tmp_path / "tcp.zarr",
        client=client,
    ) as tr:
        tr.fit(ds, epochs=10, progress=False)
        for name, value in tr.params.items():
            np.testing.assert_array_equal(value, tls_params[name])
