"""The "dasktrain" page of the Dask dashboard, served by real schedulers.

An in-process LocalCluster started after importing the module; in fresh
interpreters, a user's own LocalCluster after a plain ``import dasktrain``,
one started before it, and the trainer's embedded cluster; a
``dask scheduler`` subprocess with no preload (and one with
``--preload dasktrain.dashboard``) with a ``dask worker`` subprocess; all on
127.0.0.1.  The page's content is read back with
``bokeh.client.pull_session`` and, if Chromium is installed, rendered
headless and screenshotted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bokeh.client import pull_session
from distributed import Client, LocalCluster

import dasktrain as dt
from dasktrain.monitor import dashboard
from dasktrain.monitor.dashboard import APP_PATH, RUN_COLORS, WAITING_TEXT

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / ".ci" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
STARTUP_TIMEOUT_S = 60.0
EPOCHS = 3
STEPS_PER_EPOCH = 3


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


def _individual_plots(base_url: str) -> dict[str, str]:
    status, body = _get(base_url + "/individual-plots.json")
    assert status == 200
    plots: dict[str, str] = json.loads(body)
    return plots


def _doc_state(doc: Any) -> dict[str, Any]:
    """The header text, the per-worker memory table (HTML) and the data
    sources' columns of a page document."""
    state: dict[str, Any] = {
        "header": doc.get_model_by_name("dasktrain-header").text,
        "memory": doc.get_model_by_name("dasktrain-memory").text,
    }
    for name in ("loss", "val_loss", "val_points", "rows_per_s", "seconds"):
        state[name] = dict(doc.get_model_by_name(f"dasktrain-{name}").data)
    return state


def _page_state(base_url: str) -> dict[str, Any]:
    """The page's state, as a new browser session gets it."""
    with pull_session(url=base_url + APP_PATH) as session:
        return _doc_state(session.document)


def _small_dataset(path: Path, *, n_rows: int = 1_200) -> tuple[dt.Dataset, dt.Dataset]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_rows, 4)).astype(np.float32)
    y = (X @ np.array([1.0, -2.0, 0.5, 0.0]) > 0).astype(np.float32)
    ds = dt.Dataset.from_arrays(path, X=X, y=y, chunk_rows=100)
    return ds.split(val_fraction=0.25, seed=0)


@dataclass
class FitResult:
    store: str
    history: dt.History


def _fit(client: Client, tmp: Path, *, epochs: int) -> FitResult:
    train, val = _small_dataset(tmp / "data.zarr")
    store = str(tmp / "run.zarr")
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.Adam(learning_rate=0.1),
        store=store,
        client=client,
    )
    batch_rows = math.ceil(train.n_rows / STEPS_PER_EPOCH)
    history = trainer.fit(
        train, epochs=epochs, batch_rows=batch_rows, validation=val, progress=False
    )
    trainer.close()
    return FitResult(store, history)


# --------------------------------------------------------------------------
# an in-process LocalCluster, started after the import above
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dash_cluster() -> Iterator[tuple[Client, str]]:
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit="2GiB",
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    try:
        yield client, f"http://127.0.0.1:{cluster.scheduler.http_server.port}"
    finally:
        client.close()
        cluster.close()


@pytest.fixture(scope="module")
def fitted(
    dash_cluster: tuple[Client, str], tmp_path_factory: pytest.TempPathFactory
) -> FitResult:
    client, _ = dash_cluster
    return _fit(client, tmp_path_factory.mktemp("dashboard-fit"), epochs=EPOCHS)


def test_dashboard_shows_shard_traffic_of_sharded_models() -> None:
    events = [
        (1.0, {"store": "/r/mf.zarr", "step": 1, "loss": 3.0}),
        (
            2.0,
            {
                "store": "/r/mf.zarr",
                "step": 2,
                "loss": 2.0,
                "shard_bytes_read": 9_000_000,
                "shard_bytes_written": 4_500_000,
            },
        ),
    ]
    data = dashboard.dashboard_data(events)
    written = data.sources["shard_bytes_written"]["ys"][0]
    assert math.isnan(written[0]) and written[1] == 4_500_000
    assert data.sources["shard_bytes_read"]["ys"][0][1] == 9_000_000
    header = dashboard.header_html(data.current)
    assert "shards read 9.0 MB, written 4.5 MB" in header
    # Dense models have no shard traffic in the header.
    assert "shards" not in dashboard.header_html(events[0][1])


def test_header_keeps_the_latest_memory_budget_of_a_run() -> None:
    epoch_end = {
        "store": "a.zarr",
        "step": 10,
        "loss": 0.5,
        "cache_bytes": 100 * 2**20,
        "cache_capacity_bytes": 300 * 2**20,
        "cache_evictions": 4,
        "worker_pauses": 0,
        "peak_rss_fraction": 0.64,
    }
    events = [
        (1.0, {"store": "a.zarr", "step": 9, "loss": 0.6}),
        (2.0, epoch_end),
        (3.0, {"store": "a.zarr", "step": 11, "loss": 0.4}),
    ]
    header = dashboard.header_html(dashboard.dashboard_data(events).current)
    assert "step <b>11</b>" in header
    assert "worker caches 100 of 300 MiB, 4 evictions, peak RSS 64%" in header
    assert "0 pauses" in header
    # Before any epoch end there is no budget to show.
    assert "worker caches" not in dashboard.header_html(events[0][1])


def test_dashboard_data_splits_runs_and_tolerates_gaps() -> None:
    events = [
        (1.0, {"store": "/r/a.zarr", "step": 1, "loss": 0.9, "rows_per_s": 10.0}),
        (2.0, "not a dasktrain row"),
        (3.0, {"store": "/r/b.zarr", "step": 1, "loss": 0.8, "cache_hit_rate": None}),
        (4.0, {"store": "/r/a.zarr", "step": 2, "loss": 0.7, "val_loss": 0.75}),
        # a.zarr starts again from step 1: a second run of that store
        (5.0, {"store": "/r/a.zarr", "step": 1, "epoch": 1, "loss": 0.95}),
    ]
    data = dashboard.dashboard_data(events)
    assert data.n_events == 4
    loss = data.sources["loss"]
    assert loss["label"] == ["a.zarr", "b.zarr", "a.zarr (run 2)"]
    assert loss["xs"] == [[1, 2], [1], [1]]
    assert loss["ys"] == [[0.9, 0.7], [0.8], [0.95]]
    assert len(set(loss["color"])) == 3
    assert math.isnan(data.sources["rows_per_s"]["ys"][1][0])
    assert math.isnan(data.sources["cache_hit_rate"]["ys"][1][0])
    assert data.sources["val_points"]["step"] == [2]
    assert data.current is not None
    assert data.current["store"] == "/r/a.zarr" and data.current["step"] == 1
    assert "/r/a.zarr" in dashboard.header_html(data.current)
    assert dashboard.header_html(dashboard.dashboard_data([]).current) == WAITING_TEXT


def test_dashboard_data_keeps_most_recent_runs() -> None:
    n_runs = dashboard.MAX_RUNS + 3
    events = [
        (float(i), {"store": f"/r/{i}.zarr", "step": 1, "loss": 1.0})
        for i in range(n_runs)
    ]
    data = dashboard.dashboard_data(events)
    assert data.sources["loss"]["store"] == [f"/r/{i}.zarr" for i in range(3, n_runs)]


def test_import_registers_page_once() -> None:
    from distributed.dashboard.scheduler import applications

    assert applications[APP_PATH] is dashboard.dasktrain_doc
    n_apps = len(applications)
    assert dashboard.register()
    assert len(applications) == n_apps
    assert applications[APP_PATH] is dashboard.dasktrain_doc


def test_page_listed_in_individual_plots(dash_cluster: tuple[Client, str]) -> None:
    _, base_url = dash_cluster
    assert _individual_plots(base_url)["Individual Dasktrain"] == APP_PATH
    status, body = _get(base_url + "/status")
    assert status == 200
    # The "More..." menu of the dashboard's pages links to the page.
    assert b'href="individual-dasktrain"' in body
    status, body = _get(base_url + APP_PATH)
    assert status == 200
    assert b"<title>Dask: dasktrain</title>" in body


def test_page_shows_fit_live(
    dash_cluster: tuple[Client, str], request: pytest.FixtureRequest
) -> None:
    client, base_url = dash_cluster
    # A session opened before the fit: empty plots and a waiting note.
    with pull_session(url=base_url + APP_PATH) as session:
        state = _doc_state(session.document)
        assert state["header"] == WAITING_TEXT
        assert state["memory"] == ""
        assert state["loss"]["xs"] == []
        assert state["val_points"]["step"] == []

        fit: FitResult = request.getfixturevalue("fitted")
        # The server-side document of that same session is refreshed by the
        # page's periodic callback (every 500 ms): pull it again.
        n_steps = EPOCHS * STEPS_PER_EPOCH
        deadline = time.monotonic() + 20
        while True:
            time.sleep(0.6)
            session.pull()
            state = _doc_state(session.document)
            xs = state["loss"]["xs"]
            if (xs and len(xs[0]) == n_steps) or time.monotonic() > deadline:
                break

    rows = fit.history.to_pandas()
    assert list(rows["step"]) == list(range(1, n_steps + 1))
    assert state["loss"]["xs"] == [list(rows["step"])]
    np.testing.assert_allclose(state["loss"]["ys"][0], rows["loss"])
    assert state["loss"]["store"] == [fit.store]
    epoch_ends = [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert state["val_points"]["step"] == epoch_ends
    np.testing.assert_allclose(
        state["val_points"]["val_loss"], rows["val_loss"].dropna()
    )
    np.testing.assert_allclose(state["rows_per_s"]["ys"][0], rows["rows_per_s"])
    np.testing.assert_allclose(state["seconds"]["ys"][0], rows["seconds"])
    assert fit.store in state["header"]
    assert f"step <b>{n_steps}</b>" in state["header"]
    assert f"epoch <b>{EPOCHS}</b>" in state["header"]
    # The same column data, computed from the client's copy of the events.
    data = dashboard.dashboard_data(client.get_events("dasktrain"))
    assert data.sources["loss"]["xs"] == state["loss"]["xs"]
    assert data.current is not None and data.current["step"] == n_steps

    # One memory table per epoch end, one row per worker, sane numbers.
    memory_events = client.get_events(dashboard.MEMORY_TOPIC)
    assert [m["step"] for _, m in memory_events if m["store"] == fit.store] == (
        epoch_ends
    )
    table = dashboard.memory_table(memory_events, store=fit.store)
    assert table is not None and (table.step, table.epoch) == (n_steps, EPOCHS)
    workers = sorted(client.scheduler_info()["workers"])
    assert table.columns["worker"] == workers
    for i in range(table.n_workers):
        row = {name: values[i] for name, values in table.columns.items()}
        assert row["status"] == "running", row
        assert 0 < row["capacity_bytes"] <= row["ceiling_bytes"] < row["limit_bytes"]
        # Every admission into a cache is checked against the capacity of
        # the moment, which is at most the ceiling minus the start-up RSS.
        assert (
            0 <= row["held_bytes"] <= (row["ceiling_bytes"] - row["baseline_rss_bytes"])
        )
        assert row["held_bytes"] == row["chunks_bytes"] + row["shards_bytes"]
        assert 0 < row["rss_bytes"] <= row["peak_rss_bytes"] < row["limit_bytes"]
        assert row["peak_rss_fraction"] == pytest.approx(
            row["peak_rss_bytes"] / row["limit_bytes"]
        )
        # The small dataset fits in the cache: epochs 2 and 3 hit.
        assert row["cache_misses"] > 0 and row["cache_hits"] > 0
        assert 0 < row["cache_hit_rate"] <= 1
        assert row["pauses"] == 0
    # The page shows that table.
    body = state["memory"].split("<tbody>")[1]
    assert body.count("<tr>") == len(workers)
    assert all(f"<code>{w}</code>" in body for w in workers)
    assert f"end of epoch {EPOCHS} (step {n_steps})" in state["memory"]


#: Run in a fresh interpreter: start a cluster the way a user would (argv[1]),
#: fit, print the dashboard's address, and keep serving until stdin closes.
SERVE_SCRIPT = """
import json, sys
import numpy as np

mode, tmp = sys.argv[1], sys.argv[2]
client = cluster = None
if mode == "cluster-first":
    # A cluster created before dasktrain is imported: its dashboard is built
    # without the page; the trainer adds it.
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address="127.0.0.1:0")
    client = Client(cluster)
    before = "Individual Dasktrain" in client.run_on_scheduler(
        lambda dask_scheduler: {
            p.strip("/").replace("-", " ").title()
            for a in dask_scheduler.http_application.applications
            for p in getattr(a, "app_paths", ())
        }
    )
import dasktrain as dt
bokeh_after_import = "bokeh" in sys.modules
if mode == "own":
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address="127.0.0.1:0")
    client = Client(cluster)
rng = np.random.default_rng(0)
X = rng.normal(size=(900, 4)).astype(np.float32)
y = (X @ np.array([1.0, -2.0, 0.5, 0.0]) > 0).astype(np.float32)
ds = dt.Dataset.from_arrays(tmp + "/data.zarr", X=X, y=y, chunk_rows=100)
store = tmp + "/run.zarr"
trainer = dt.Trainer(dt.models.LogisticRegression(l2=1e-3),
                     dt.optim.Adam(learning_rate=0.1), store=store, client=client)
history = trainer.fit(ds, epochs=1, batch_rows=300, progress=False)
link = trainer.dashboard_link
print(json.dumps({
    "base_url": link.rsplit("/", 1)[0],
    "store": store,
    "steps": [int(s) for s in history.to_pandas()["step"]],
    "bokeh_after_import": bokeh_after_import,
    "page_before_trainer": before if mode == "cluster-first" else None,
}), flush=True)
sys.stdin.read()
trainer.close()
if client is not None:
    client.close()
    cluster.close()
"""


@contextlib.contextmanager
def _serving(mode: str, tmp: Path) -> Iterator[dict[str, Any]]:
    """Run :data:`SERVE_SCRIPT` in ``mode``; yield what it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, mode, str(tmp)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the serving script exited with {proc.wait(60)}")
        yield json.loads(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=STARTUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _assert_serves_fit(base_url: str, store: str, steps: list[int]) -> None:
    """The page is listed, served, and shows the fit; then, in Chromium if
    installed, rendered with the run's loss line."""
    assert _individual_plots(base_url)["Individual Dasktrain"] == APP_PATH
    status, body = _get(base_url + APP_PATH)
    assert status == 200
    assert b"<title>Dask: dasktrain</title>" in body
    state = _page_state(base_url)
    assert state["loss"]["xs"] == [steps]
    assert state["loss"]["store"] == [store]
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"{CHROMIUM} not installed (Debian: apt-get install chromium "
            "fonts-dejavu-core); the page was checked without a browser"
        )
    rgb = _render(base_url + APP_PATH)
    assert rgb.std() > 10
    assert _pixels_of(rgb, RUN_COLORS[0]) > 500


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["own", "cluster-first", "embedded"])
def test_page_served_wherever_a_trainer_runs(mode: str, tmp_path: Path) -> None:
    # A fresh interpreter each: no preload, no `import dasktrain.dashboard`.
    with _serving(mode, tmp_path) as info:
        # Registering the page does not import Bokeh.
        assert info["bokeh_after_import"] is (mode == "cluster-first")
        if mode == "cluster-first":
            assert info["page_before_trainer"] is False
        _assert_serves_fit(info["base_url"], info["store"], info["steps"])


# --------------------------------------------------------------------------
# `dask scheduler --preload dasktrain.dashboard` and `dask worker`
# --------------------------------------------------------------------------


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {proc.returncode}")
        try:
            info: dict[str, Any] = json.loads(path.read_text())
            return info
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.1)
    raise TimeoutError(f"no scheduler file {path} after {STARTUP_TIMEOUT_S} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_cli_scheduler(preload: bool, tmp_path: Path) -> None:
    scheduler_file = tmp_path / "scheduler.json"
    dask_cli = [sys.executable, "-m", "dask"]
    scheduler = subprocess.Popen(
        [
            *dask_cli,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--scheduler-file",
            str(scheduler_file),
            *(["--preload", "dasktrain.dashboard"] if preload else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    # Started at once: the worker waits for the scheduler file.
    worker = subprocess.Popen(
        [
            *dask_cli,
            "worker",
            "--scheduler-file",
            str(scheduler_file),
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--no-nanny",
            "--memory-limit",
            "1GiB",
            "--no-dashboard",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        info = _wait_for_file(scheduler_file, scheduler)
        base_url = f"http://127.0.0.1:{info['services']['dashboard']}"
        listed = "Individual Dasktrain" in _individual_plots(base_url)
        # Without a preload, the scheduler has no page until a trainer comes.
        assert listed is preload
        if preload:
            status, body = _get(base_url + APP_PATH)
            assert status == 200
            assert b"<title>Dask: dasktrain</title>" in body

        with Client(scheduler_file=str(scheduler_file)) as client:
            client.wait_for_workers(1, timeout=STARTUP_TIMEOUT_S)
            fit = _fit(client, tmp_path, epochs=1)
            # A second trainer on the same scheduler changes nothing.
            dt.Trainer(
                dt.models.LogisticRegression(l2=1e-3),
                dt.optim.Adam(learning_rate=0.1),
                store=fit.store,
                client=client,
            ).close()
        status, body = _get(base_url + "/status")
        assert status == 200 and b'href="individual-dasktrain"' in body
        state = _page_state(base_url)
        assert f"step <b>{STEPS_PER_EPOCH}</b>" in state["header"]
        _assert_serves_fit(base_url, fit.store, list(fit.history.to_pandas()["step"]))
    finally:
        _stop(worker)
        _stop(scheduler)


# --------------------------------------------------------------------------
# headless Chromium
# --------------------------------------------------------------------------

VIEWPORT = (1200, 900)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
)
#: True once BokehJS has built the views of the page's document.
RENDERED_JS = (
    "(() => { const d = window.Bokeh && Bokeh.documents[0];"
    " return !!d && d.roots().length > 0 && Object.keys(Bokeh.index).length > 0; })()"
)


async def _screenshot(url: str, profile: Path, *, settle_s: float = 1.5) -> bytes:
    """Render ``url`` in headless Chromium and return a PNG of the viewport.

    ``chromium --screenshot`` captures before BokehJS has pulled the
    document over its websocket (a blank page, even with
    ``--virtual-time-budget``), so the page is driven through the DevTools
    protocol instead: navigate, wait until Bokeh has rendered, let the
    plots draw, capture.
    """
    from tornado.websocket import websocket_connect

    proc = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        _, body = _get(f"http://127.0.0.1:{port}/json/list")
        target = next(t for t in json.loads(body) if t["type"] == "page")
        conn = await websocket_connect(
            target["webSocketDebuggerUrl"], max_message_size=64 << 20
        )
        next_id = 0

        async def call(method: str, **params: Any) -> dict[str, Any]:
            nonlocal next_id
            next_id += 1
            await conn.write_message(
                json.dumps({"id": next_id, "method": method, "params": params})
            )
            while True:
                raw = await asyncio.wait_for(conn.read_message(), STARTUP_TIMEOUT_S)
                if raw is None:
                    raise RuntimeError("chromium closed the DevTools connection")
                msg = json.loads(raw)
                if msg.get("id") == next_id:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    result: dict[str, Any] = msg["result"]
                    return result

        try:
            await call(
                "Emulation.setDeviceMetricsOverride",
                width=VIEWPORT[0],
                height=VIEWPORT[1],
                deviceScaleFactor=1,
                mobile=False,
            )
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                res = await call(
                    "Runtime.evaluate", expression=RENDERED_JS, returnByValue=True
                )
                if res["result"].get("value") is True:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"BokehJS did not render {url}")
                await asyncio.sleep(0.1)
            await asyncio.sleep(settle_s)
            shot = await call("Page.captureScreenshot", format="png")
            return base64.b64decode(shot["data"])
        finally:
            conn.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _render(url: str) -> np.ndarray:
    """``url`` rendered in headless Chromium (a fresh profile), as RGB."""
    from PIL import Image

    profile = Path(tempfile.mkdtemp(prefix="dasktrain-chromium-"))
    try:
        png = asyncio.run(_screenshot(url, profile))
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == VIEWPORT
        return np.asarray(image.convert("RGB"))


def _pixels_of(rgb: np.ndarray, hex_color: str, tolerance: int = 40) -> int:
    target = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb.astype(int) - target).max(axis=-1) <= tolerance).sum())


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} not installed (Debian: apt-get install chromium "
    "fonts-dejavu-core)",
)
def test_headless_chromium_screenshot(
    dash_cluster: tuple[Client, str], fitted: FitResult
) -> None:
    from PIL import Image

    _, base_url = dash_cluster
    profile = Path(tempfile.mkdtemp(prefix="dasktrain-chromium-"))
    try:
        png = asyncio.run(_screenshot(base_url + APP_PATH, profile))
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "dashboard-dasktrain.png"
    path.write_bytes(png)
    print(f"dashboard screenshot: {path}")

    with Image.open(path) as image:
        assert image.size == VIEWPORT
        rgb = np.asarray(image.convert("RGB"))
    # Not blank: axes, text and lines on a light background ...
    assert rgb.std() > 10
    # ... and the run's loss line (first run colour) drawn in more than one plot.
    assert _pixels_of(rgb, RUN_COLORS[0]) > 500
