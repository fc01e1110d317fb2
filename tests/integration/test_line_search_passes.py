"""Several parameter sets evaluated in one pass over stored data: the
multi-candidate line search of L-BFGS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from distributed import Client

import dasktrain as dt
from dasktrain.engine.engine import Engine
from dasktrain.engine.plan import full_pass
from dasktrain.models.base import Model

pytestmark = pytest.mark.cluster


def _store(path: Path, n_classes: int = 2) -> dt.Dataset:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3_000, 6))
    if n_classes == 2:  # three informative features, three noise ones
        y = (X[:, :3] @ [1.5, -1.0, 0.5] + rng.logistic(size=3_000) > 0).astype(int)
    else:
        y = rng.integers(0, n_classes, 3_000)
    return dt.Dataset.from_arrays(path, X=X, y=y, chunk_rows=400)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(dt.models.LogisticRegression(l2=1e-3), id="logistic"),
        pytest.param(dt.models.MLP((4,), 3, loss="softmax"), id="mlp"),
    ],
)
def test_one_pass_at_several_points_equals_one_pass_each(
    tmp_path: Path, client: Client, model: Model
) -> None:
    ds = _store(tmp_path / "d.zarr", 3 if isinstance(model, dt.models.MLP) else 2)
    rng = np.random.default_rng(1)
    sets = [model.init(np.random.default_rng(i), ds.schema) for i in range(3)]
    sets = [{k: v + 0.1 * rng.normal(size=v.shape) for k, v in p.items()} for p in sets]
    engine = Engine(client, cache_fraction=0.0)  # every pass reads the store
    pieces = full_pass(ds.chunk_ids, ds.chunk_n_rows)
    many = engine.run_pass_many(ds.ref, model, sets, pieces)
    assert len(many) == 3
    # One read per chunk for all three sets.
    assert many[0].cache_misses == ds.n_chunks and many[0].cache_hits == 0
    for params, got in zip(sets, many, strict=True):
        want = engine.run_pass(ds.ref, model, params, pieces).partial
        part = got.partial
        assert part.n_rows == want.n_rows == ds.n_rows
        assert set(part.grads) == set(want.grads)
        assert part.metrics.keys() == want.metrics.keys()
        if isinstance(model, dt.models.MLP):
            # Evaluated one set at a time on each chunk: the same bits.
            assert part.loss_sum == want.loss_sum
            for k in want.grads:
                np.testing.assert_array_equal(part.grads[k], want.grads[k])
        else:
            # One matrix product for all sets: rounding may differ.
            assert part.loss_sum == pytest.approx(want.loss_sum, rel=1e-12)
            for k in want.grads:
                np.testing.assert_allclose(part.grads[k], want.grads[k], rtol=1e-10)


def test_lbfgs_with_several_step_sizes_per_pass(tmp_path: Path, client: Client) -> None:
    """A fixed number of step sizes per pass converges to the same optimum as
    one at a time, and the history counts passes and trials."""
    ds = _store(tmp_path / "d.zarr")
    results = {}
    for k in (1, 3):
        trainer = dt.Trainer(
            dt.models.LogisticRegression(l2=1e-2),
            dt.optim.LBFGS(line_search_candidates=k, tol=1e-8),
            store=tmp_path / f"run{k}.zarr",
            client=client,
        )
        frame = trainer.fit(ds, epochs=30, progress=False).to_pandas()
        trainer.close()
        assert (frame["evals"] == k * frame["passes"]).all()
        assert (frame["rows"] == frame["passes"] * ds.n_rows).all()
        results[k] = (frame, trainer.params)
    f1 = results[1][0]["objective"].iloc[-1]
    f3 = results[3][0]["objective"].iloc[-1]
    assert f3 == pytest.approx(f1, rel=1e-9)
    np.testing.assert_allclose(results[3][1]["w"], results[1][1]["w"], atol=1e-4)
    assert dt.ParamStore.open(tmp_path / "run3.zarr").committed == len(results[3][0])


@pytest.mark.parametrize("l1", [0.0, 0.02], ids=["l2", "l1-owlqn"])
def test_resume_with_several_step_sizes_per_pass_equals_one_run(
    tmp_path: Path, client: Client, l1: float
) -> None:
    """A trial from a several-candidate pass has other rounding than a pass at
    one point: the state keeps the objective and gradient at the committed
    point, so a resumed run goes on with the same bits."""
    ds = _store(tmp_path / "d.zarr")

    def trainer(name: str) -> dt.Trainer:
        return dt.Trainer(
            dt.models.LogisticRegression(l2=1e-3, l1=l1),
            dt.optim.LBFGS(line_search_candidates=3, tol=1e-12, ftol=0.0),
            store=tmp_path / name,
            client=client,
        )

    straight = trainer("straight.zarr")
    expected = straight.fit(ds, epochs=6, progress=False)
    first = trainer("split.zarr")
    first.fit(ds, epochs=3, progress=False)
    state = dt.ParamStore.open(tmp_path / "split.zarr").read().opt_state
    assert {"point_objective", "point_grad"} <= set(state)
    resumed = dt.Trainer.resume(tmp_path / "split.zarr", client=client)
    history = resumed.fit(ds, epochs=6, progress=False)
    assert history.column("objective") == expected.column("objective")
    for k, v in straight.params.items():
        np.testing.assert_array_equal(resumed.params[k], v)
    if l1:
        assert 0 < int((straight.params["w"] == 0).sum()) < 6  # exact zeros
