"""``examples/explore.ipynb``, executed top to bottom in a real Jupyter kernel.

The notebook starts its own LocalCluster (two worker processes on 127.0.0.1),
writes its stores relative to its working directory (a temporary one here),
and must run without an error output.  Its key outputs are checked: the
dataset's rich repr, the figures, a progress bar, an accuracy above 0.8 on
the validation chunks, the dasktrain dashboard link, and a resumed run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import pytest
from jupyter_client import kernelspec

import dasktrain as dt

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "explore.ipynb"
KERNEL_NAME = "python3"
#: Seconds allowed to any one cell (cluster start-up, data generation, fit).
CELL_TIMEOUT = 240
#: Seconds allowed to the kernel to start.
STARTUP_TIMEOUT = 120
#: make_classification's labels have a Bayes accuracy of about 0.9.
MIN_ACCURACY = 0.8
#: Interpreter names a kernel spec may give that Jupyter maps to its own.
GENERIC_PYTHONS = {"python", "python3", f"python3.{sys.version_info.minor}"}


def ensure_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``python3`` kernel run this interpreter (which has dasktrain).

    A fresh virtualenv with ipykernel has such a kernel spec already.  If
    there is none, or it names another interpreter, one is written into a
    temporary Jupyter data directory that ``JUPYTER_PATH`` points at.
    """
    try:
        spec = kernelspec.KernelSpecManager().get_kernel_spec(KERNEL_NAME)
        argv0 = spec.argv[0]
        if (
            argv0 in GENERIC_PYTHONS
            or Path(argv0).resolve() == Path(sys.executable).resolve()
        ):
            return
    except kernelspec.NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter-prefix"
    install(prefix=str(prefix), kernel_name=KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    spec = kernelspec.KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()


def cell_tagged(nb: Any, tag: str) -> Any:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def text_of(cell: Any, *, streams: tuple[str, ...] = ("stdout",)) -> str:
    """Printed text and plain-text results of a cell."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name in streams:
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def mime_types(cell: Any) -> set[str]:
    return {
        mime
        for out in cell.get("outputs", [])
        if out.output_type in ("execute_result", "display_data")
        for mime in out.data
    }


def accuracy_in(text: str) -> float:
    match = re.search(r"accuracy (\d\.\d+)", text)
    assert match, f"no accuracy printed in {text!r}"
    return float(match.group(1))


def test_explore_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_kernel(tmp_path, monkeypatch)
    # The notebook starts its own cluster unless a scheduler address is set.
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    workdir = tmp_path / "work"
    workdir.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "the committed notebook must not store outputs"
    )

    executor = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT,
        startup_timeout=STARTUP_TIMEOUT,
        resources={"metadata": {"path": str(workdir)}},
    )
    executor.execute()  # raises CellExecutionError on the first failing cell

    errors = [
        out
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.outputs
        if out.output_type == "error"
    ]
    assert not errors, errors
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")

    assert re.search(r"Dask dashboard: http://\S+", text_of(cell_tagged(nb, "cluster")))

    dataset = cell_tagged(nb, "dataset")
    assert "text/html" in mime_types(dataset)
    assert "dasktrain.Dataset" in text_of(dataset)
    assert "200,000 rows" in text_of(dataset)
    assert "text/html" in mime_types(cell_tagged(nb, "head"))
    assert "image/png" in mime_types(cell_tagged(nb, "histogram"))

    fit = cell_tagged(nb, "fit")
    # tqdm.auto: a widget where ipywidgets is installed, else text on stderr.
    bar_text = text_of(fit, streams=("stderr",))
    assert (
        "application/vnd.jupyter.widget-view+json" in mime_types(fit)
        or "step" in bar_text
    ), bar_text
    assert "History(" in text_of(fit) and "epoch 4" in text_of(fit)
    assert "image/png" in mime_types(cell_tagged(nb, "history"))

    assert accuracy_in(text_of(cell_tagged(nb, "evaluate"))) > MIN_ACCURACY
    assert "predicted" in text_of(cell_tagged(nb, "predict"))

    link = text_of(cell_tagged(nb, "dashboard-link"))
    assert re.search(r"dasktrain page: http://\S+/individual-dasktrain\b", link)

    resumed = text_of(cell_tagged(nb, "resume"))
    assert "at step 40, epoch 4" in resumed  # where the first fit left the store
    assert "after 6 epochs (60 steps)" in resumed
    assert accuracy_in(resumed) > MIN_ACCURACY

    # The stores were written under the notebook's working directory.
    run = dt.ParamStore.open(workdir / "runs" / "explore.zarr").meta
    assert run["progress"]["epoch"] == 6
    assert run["status"] == "finished"
    assert dt.Dataset.open(workdir / "data" / "explore.zarr").n_rows == 200_000


XARRAY_NOTEBOOK = NOTEBOOK.with_name("xarray_zarr.ipynb")


def test_xarray_zarr_notebook_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``examples/xarray_zarr.ipynb`` trains on a store written by xarray in
    place: the dataset reads the source's chunks, the model learns, and the
    source store's files are the same after training."""
    ensure_kernel(tmp_path, monkeypatch)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    workdir = tmp_path / "work"
    workdir.mkdir()
    nb = nbformat.read(XARRAY_NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "the committed notebook must not store outputs"
    )
    nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT,
        startup_timeout=STARTUP_TIMEOUT,
        resources={"metadata": {"path": str(workdir)}},
    ).execute()

    dataset = cell_tagged(nb, "dataset")
    assert "in place: True" in text_of(dataset)
    assert "10,000 rows in 14 chunks of 720" in text_of(dataset)
    assert accuracy_in(text_of(cell_tagged(nb, "evaluate"))) > MIN_ACCURACY
    assert "rain probability" in text_of(cell_tagged(nb, "predict"))
    assert "source store unchanged: True" in text_of(cell_tagged(nb, "unchanged"))
    meta = dt.ParamStore.open(workdir / "runs" / "era.zarr").meta
    assert len(meta["preprocessing"]["standardize"]["mean"]) == 3
