"""The same run gives the same bits on 1, 2 or 3 workers: the reduction tree
depends on the chunks only, never on placement or arrival order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client
from trainer_support import assert_same_params, classification_store, losses

import dasktrain as dt

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# name -> (model, optimizer, batch_rows, epochs)
CASES: dict[str, tuple[Callable[[], Any], Callable[[], Any], int | None, int]] = {
    "adam-full-batch": (
        lambda: dt.models.LogisticRegression(l2=1e-3),
        lambda: dt.optim.Adam(0.1),
        None,
        4,
    ),
    "sgd-momentum-slices": (
        lambda: dt.models.LogisticRegression(l2=1e-3),
        lambda: dt.optim.SGD(0.1, momentum=0.9),
        400,
        1,
    ),
    "sgd-momentum-chunks": (
        lambda: dt.models.LogisticRegression(l2=1e-3),
        lambda: dt.optim.SGD(0.1, momentum=0.9),
        2_000,
        2,
    ),
    "lbfgs": (
        lambda: dt.models.LogisticRegression(l2=1e-3),
        dt.optim.LBFGS,
        None,
        4,
    ),
    "lbfgs-l1-owlqn": (
        lambda: dt.models.LogisticRegression(l2=1e-3, l1=0.01),
        dt.optim.LBFGS,
        None,
        4,
    ),
    "mlp-adam-slices": (
        lambda: dt.models.MLP((8,), 3, loss="softmax"),
        lambda: dt.optim.Adam(0.02),
        700,
        1,
    ),
    # ~169k parameters (1.35 MB): above the inline limit, scattered per pass.
    "mlp-big-sgd-chunks": (
        lambda: dt.models.MLP((256, 640), 3, loss="softmax"),
        lambda: dt.optim.SGD(0.05, momentum=0.9),
        1_000,
        1,
    ),
}


def _run_all(
    client: Client, root: Path, binary: dt.Dataset, classes: dt.Dataset
) -> dict[str, tuple[dict[str, np.ndarray], dt.History]]:
    out = {}
    for name, (model, opt, batch_rows, epochs) in CASES.items():
        data = binary
        if name.startswith("mlp"):
            data = classes.subset(classes.chunk_ids[:3]) if "big" in name else classes
        trainer = dt.Trainer(model(), opt(), store=root / f"{name}.zarr", client=client)
        history = trainer.fit(
            data, epochs=epochs, batch_rows=batch_rows, progress=False
        )
        out[name] = (trainer.params, history)
    return out


def test_same_bits_on_one_two_and_three_workers(
    tmp_path: Path, client: Client, make_client: Callable[[int], Client]
) -> None:
    # 6 chunks (the last one short): an odd tree, uneven placement.
    binary = classification_store(tmp_path / "binary.zarr", 5_300)
    classes = classification_store(tmp_path / "classes.zarr", 5_500, n_classes=3)
    runs: dict[str, Any] = {}
    for n_workers in (1, 3, 2):
        c = client if n_workers == 2 else make_client(n_workers)
        assert len(c.nthreads()) == n_workers
        runs[f"{n_workers}x1"] = _run_all(
            c, tmp_path / f"w{n_workers}", binary, classes
        )
    # One worker with two threads: two ranks in one process.
    c = make_client(1, threads_per_worker=2)
    assert list(c.nthreads().values()) == [2]
    runs["1x2"] = _run_all(c, tmp_path / "w1x2", binary, classes)
    for name in CASES:
        params, history = runs["2x1"][name]
        assert len(history) > 1, name
        for layout in ("1x1", "3x1", "1x2"):
            other_params, other_history = runs[layout][name]
            what = f"{name}: {layout} vs 2x1 workers x threads"
            assert_same_params(other_params, params, what)
            assert losses(other_history) == losses(history), what
            assert [r["grad_norm"] for r in other_history] == [
                r["grad_norm"] for r in history
            ], what
