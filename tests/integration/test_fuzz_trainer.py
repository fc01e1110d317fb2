"""Fuzzing the trainer's arguments with hypothesis.

Each example mixes valid values with at least one invalid one, for the
``Trainer`` constructor or for ``fit``.  The call must fail with a documented
exception type (``TypeError``, ``ValueError`` or a ``DasktrainError``) whose
message names the argument at fault, and no parameter store may be created or
changed by it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dasktrain as dt
from dasktrain.errors import DasktrainError

DOCUMENTED = (DasktrainError, ValueError, TypeError)

#: Per fit argument: values that must be accepted, values that must be refused.
FIT_ARGS: dict[str, tuple[list[Any], list[Any]]] = {
    "epochs": ([1], [-1, 1.5, "2", None, True]),
    "batch_rows": ([None, 100], [0, -5, 2.5, "100", True]),
    "checkpoint_steps": ([None, 1], [0, -1, 1.5, "1"]),
    "checkpoint_seconds": ([60.0, 0, math.inf], [-1.0, math.nan, "60", None, True]),
    "on_nonfinite": (["raise", "skip"], ["ignore", None, 1]),
    "callbacks": ([(), []], [None, "cb", [object()], dt.callbacks.EarlyStopping()]),
    "early_stopping": ([None], ["yes", 3, object()]),
    "progress": ([False], [None, "no", 2]),
    "local_steps": ([None], [0, -2, 1.5, "3"]),
    "staleness": ([0], [-1, 1.5, "1", 1]),  # 1: only for sharded tables
}

#: Per constructor argument, the same.
INIT_ARGS: dict[str, tuple[list[Any], list[Any]]] = {
    "keep_versions": ([3], [0, -1]),
    "seed": ([0, 7], [None, "seed", 1.5, -1]),
    "cache_fraction": ([0.25, None], [-0.1, 1.5, "half"]),
    "sharded": ([None, False], [True]),  # True: this model has no tables
    "shard_rows": ([None], [0, -3, 2.5, "many"]),
}


def _mixed(table: dict[str, tuple[list[Any], list[Any]]]) -> Any:
    """Strategy: (kwargs, names of the invalid ones), at least one invalid."""

    @st.composite
    def draw_mixed(draw: Any) -> tuple[dict[str, Any], list[str]]:
        names = sorted(table)
        bad = draw(
            st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)
        )
        kwargs = {}
        for name in names:
            good, wrong = table[name]
            pool = wrong if name in bad else good
            kwargs[name] = draw(st.sampled_from(pool))
        return kwargs, bad

    return draw_mixed()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dt.Dataset:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3)).astype(np.float32)
    return dt.Dataset.from_arrays(
        tmp_path_factory.mktemp("fuzz") / "d.zarr",
        X=X,
        y=(X[:, 0] > 0).astype(np.int8),
        chunk_rows=100,
    )


def _check_refused(exc: BaseException, bad: list[str], store: Path) -> None:
    assert isinstance(exc, DOCUMENTED), f"undocumented {type(exc).__name__}: {exc}"
    message = str(exc)
    assert message, "empty error message"
    named = [name for name in bad if name in message]
    assert named, f"the message names none of {bad}: {message}"
    assert not store.exists(), f"a failed call left {os.listdir(store)} behind"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=_mixed(FIT_ARGS))
def test_bad_fit_arguments_are_refused_before_anything_runs(
    tmp_path: Path,
    client: Client,
    data: dt.Dataset,
    case: tuple[dict[str, Any], list[str]],
) -> None:
    kwargs, bad = case
    store = tmp_path / f"run-{abs(hash(repr(kwargs)))}.zarr"
    trainer = dt.Trainer(
        dt.models.LogisticRegression(), dt.optim.SGD(0.1), store=store, client=client
    )
    with pytest.raises(BaseException) as info:
        trainer.fit(data, **kwargs)
    _check_refused(info.value, bad, store)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=_mixed(INIT_ARGS))
def test_bad_trainer_arguments_are_refused(
    tmp_path: Path, client: Client, case: tuple[dict[str, Any], list[str]]
) -> None:
    kwargs, bad = case
    store = tmp_path / f"run-{abs(hash(repr(kwargs)))}.zarr"
    with pytest.raises(BaseException) as info:
        dt.Trainer(
            dt.models.LogisticRegression(),
            dt.optim.SGD(0.1),
            store=store,
            client=client,
            **kwargs,
        )
    _check_refused(info.value, bad, store)


@pytest.mark.parametrize(
    ("model", "optimizer", "named"),
    [
        ("logistic", dt.optim.SGD(0.1), "model"),
        (dt.models.LogisticRegression(), "adam", "optimizer"),
        (dt.models.LogisticRegression, dt.optim.SGD(0.1), "model"),
    ],
)
def test_model_and_optimizer_must_be_dasktrain_objects(
    tmp_path: Path, client: Client, model: Any, optimizer: Any, named: str
) -> None:
    with pytest.raises(TypeError, match=named):
        dt.Trainer(model, optimizer, store=tmp_path / "r.zarr", client=client)
    assert not (tmp_path / "r.zarr").exists()
