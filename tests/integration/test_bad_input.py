"""Bad input to the trainer: each mistake raises its documented exception,
with a message naming the problem, and leaves every store as it was."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from distributed import Client
from trainer_support import (
    CHUNK_ROWS,
    N_FEATURES,
    classification_arrays,
    classification_store,
    regression_arrays,
    store,
    store_files,
)

import dasktrain as dt
from dasktrain.errors import (
    ConfigMismatchError,
    DataValidationError,
    LabelError,
    NonFiniteDataError,
    StoreNotFoundError,
)

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, client: Client
) -> tuple[Path, dt.Dataset]:
    """A store holding two epochs of logistic regression on 12 features."""
    root = tmp_path_factory.mktemp("trained")
    data = classification_store(root / "data.zarr", 4_000)
    run = root / "run.zarr"
    trainer = dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.Adam(0.05),
        store=run,
        client=client,
    )
    trainer.fit(data, epochs=2, progress=False)
    return run, data


def _trainer(path: Path, client: Client) -> dt.Trainer:
    return dt.Trainer(
        dt.models.LogisticRegression(l2=1e-3),
        dt.optim.Adam(0.05),
        store=path,
        client=client,
    )


def test_fit_needs_a_dataset(tmp_path: Path, client: Client) -> None:
    X, y = classification_arrays(100)
    trainer = _trainer(tmp_path / "run.zarr", client)
    with pytest.raises(TypeError, match=r"fit\(\) needs a dasktrain\.Dataset.*ndarray"):
        trainer.fit(X, epochs=1, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="validation must be a Dataset"):
        trainer.fit(
            classification_store(tmp_path / "d.zarr", 2_000),
            epochs=1,
            validation=(X, y),  # type: ignore[arg-type]
            progress=False,
        )
    assert not (tmp_path / "run.zarr").exists()


@pytest.mark.parametrize("batch_rows", [None, 300])
def test_three_classes_for_logistic_regression(
    tmp_path: Path, client: Client, batch_rows: int | None
) -> None:
    X, y = classification_arrays(4_000)
    y[3 * CHUNK_ROWS + 17] = 2
    data = store(tmp_path / "d.zarr", X, y)
    run = tmp_path / "run.zarr"
    with pytest.raises(LabelError) as info:
        _trainer(run, client).fit(data, epochs=2, batch_rows=batch_rows, progress=False)
    # Raised in a worker task, re-raised on the client with its own type.
    assert info.type is LabelError
    message = str(info.value)
    assert "d.zarr" in message
    assert "chunk 3" in message
    assert f"row {3 * CHUNK_ROWS + 17}" in message
    assert "label 2 is not in {0, 1}" in message
    if batch_rows is None:
        # A first fit that failed before its first step leaves no store behind.
        assert not run.exists()
    else:
        # Minibatches met chunk 3 after some steps: those steps are kept.
        version = dt.ParamStore.open(run).read()
        assert version.step > 0
        assert all(np.all(np.isfinite(v)) for v in version.params.values())


def test_labels_of_an_existing_run_are_checked_too(
    tmp_path: Path, client: Client, trained: tuple[Path, dt.Dataset]
) -> None:
    run, _ = trained
    before = store_files(run)
    X, y = classification_arrays(4_000)
    y[CHUNK_ROWS + 5] = -1
    bad = store(tmp_path / "bad.zarr", X, y)
    with pytest.raises(LabelError, match=rf"chunk 1: row {CHUNK_ROWS + 5}: label -1"):
        dt.Trainer.resume(run, client=client).fit(bad, epochs=4, progress=False)
    assert store_files(run) == before


def test_class_id_beyond_n_classes(tmp_path: Path, client: Client) -> None:
    X, y = classification_arrays(3_000, n_classes=3)
    y[2 * CHUNK_ROWS + 999] = 3
    data = store(tmp_path / "d.zarr", X, y)
    run = tmp_path / "run.zarr"
    trainer = dt.Trainer(
        dt.models.SoftmaxRegression(n_classes=3),
        dt.optim.Adam(0.05),
        store=run,
        client=client,
    )
    with pytest.raises(LabelError) as info:
        trainer.fit(data, epochs=1, progress=False)
    assert info.type is LabelError
    assert f"chunk 2: row {2 * CHUNK_ROWS + 999}: class id 3 is not in [0, 3)" in str(
        info.value
    )
    assert not run.exists()


def _with_nonfinite(tmp_path: Path) -> tuple[dt.Dataset, int, int]:
    X, y = classification_arrays(5_000)
    X[2 * CHUNK_ROWS + 5, 7] = np.nan
    X[2 * CHUNK_ROWS + 40, 0] = np.inf
    X[4 * CHUNK_ROWS + 3, 11] = -np.inf
    return store(tmp_path / "d.zarr", X, y), 2 * CHUNK_ROWS + 5, 3


@pytest.mark.parametrize("batch_rows", [None, 2_000])
def test_nonfinite_features_are_named(
    tmp_path: Path, client: Client, batch_rows: int | None
) -> None:
    data, row, _ = _with_nonfinite(tmp_path)
    run = tmp_path / "run.zarr"
    with pytest.raises(NonFiniteDataError) as info:
        _trainer(run, client).fit(data, epochs=3, batch_rows=batch_rows, progress=False)
    assert info.type is NonFiniteDataError
    message = str(info.value)
    # Chunks 2 and 4 are read in parallel; the error reported is that of the
    # first bad piece of the step in tree order, on any cluster.
    if "chunk 2" in message:
        assert f"NaN in dataset store {data.path!r}, array 'X', chunk 2" in message
        assert f"row {row}, column 7 (2 non-finite values in this chunk)" in message
    else:  # minibatches visit the chunks in a shuffled order
        assert batch_rows is not None
        assert f"-inf in dataset store {data.path!r}, array 'X', chunk 4" in message
        assert f"row {4 * CHUNK_ROWS + 3}, column 11 (1 non-finite value" in message
    assert not run.exists()


def test_nonfinite_rows_can_be_skipped(tmp_path: Path, client: Client) -> None:
    data, _, n_bad = _with_nonfinite(tmp_path)
    trainer = _trainer(tmp_path / "run.zarr", client)
    history = trainer.fit(data, epochs=3, on_nonfinite="skip", progress=False)
    assert [r["rows"] for r in history] == [data.n_rows - n_bad] * 3
    assert all(math.isfinite(r["loss"]) for r in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(np.all(np.isfinite(v)) for v in trainer.params.values())
    result = trainer.evaluate(data, on_nonfinite="skip")
    assert result["accuracy"] > 0.8
    with pytest.raises(NonFiniteDataError, match="chunk 2: row 2005, column 7"):
        trainer.evaluate(data)


def test_store_for_other_width(
    tmp_path: Path, client: Client, trained: tuple[Path, dt.Dataset]
) -> None:
    run, _ = trained
    before = store_files(run)
    narrow = classification_store(tmp_path / "narrow.zarr", 2_000, N_FEATURES - 2)
    trainer = dt.Trainer.resume(run, client=client)
    with pytest.raises(ConfigMismatchError, match=r"12 features.*narrow\.zarr.*10"):
        trainer.fit(narrow, epochs=4, progress=False)
    with pytest.raises(ConfigMismatchError, match=r"12 features.*narrow\.zarr.*10"):
        dt.Trainer.resume(run, client=client).evaluate(narrow)
    with pytest.raises(ConfigMismatchError, match=r"12 features.*narrow\.zarr.*10"):
        trainer.predict(narrow)
    assert store_files(run) == before


def test_store_of_another_model(
    tmp_path: Path, client: Client, trained: tuple[Path, dt.Dataset]
) -> None:
    run, data = trained
    before = store_files(run)
    with pytest.raises(ConfigMismatchError, match=r"run\.zarr.*holds a run of"):
        dt.Trainer(
            dt.models.LogisticRegression(l2=1e-2),
            dt.optim.Adam(0.05),
            store=run,
            client=client,
        )
    with pytest.raises(ConfigMismatchError, match=r"run\.zarr.*SoftmaxRegression"):
        dt.Trainer(
            dt.models.SoftmaxRegression(n_classes=2),
            dt.optim.Adam(0.05),
            store=run,
            client=client,
        )
    with pytest.raises(ConfigMismatchError, match=r"run\.zarr.*optimizer"):
        dt.Trainer(
            dt.models.LogisticRegression(l2=1e-3),
            dt.optim.SGD(0.05),
            store=run,
            client=client,
        )
    with pytest.raises(ConfigMismatchError, match=r"run\.zarr.*seed 0, not 1"):
        dt.Trainer(
            dt.models.LogisticRegression(l2=1e-3),
            dt.optim.Adam(0.05),
            store=run,
            client=client,
            seed=1,
        )
    assert store_files(run) == before
    # A store that is not a parameter store at all.
    with pytest.raises(dt.errors.StoreError):
        dt.Trainer.resume(data.path, client=client)


def test_bad_fit_arguments(tmp_path: Path, client: Client) -> None:
    data = classification_store(tmp_path / "d.zarr", 2_000)
    run = tmp_path / "run.zarr"
    trainer = _trainer(run, client)
    for epochs in (-1, 2.5, True, "3", None):
        with pytest.raises(ValueError, match=rf"epochs must be.*{epochs!r}"):
            trainer.fit(data, epochs=epochs, progress=False)  # type: ignore[arg-type]
    for batch_rows in (0, -5, 1.5, False):
        with pytest.raises(ValueError, match=rf"batch_rows must be.*{batch_rows!r}"):
            trainer.fit(
                data,
                epochs=1,
                batch_rows=batch_rows,  # type: ignore[arg-type]
                progress=False,
            )
    with pytest.raises(ValueError, match="checkpoint_steps"):
        trainer.fit(data, epochs=1, checkpoint_steps=0, progress=False)
    with pytest.raises(ValueError, match="on_nonfinite"):
        trainer.fit(data, epochs=1, on_nonfinite="ignore", progress=False)
    lbfgs = dt.Trainer(
        dt.models.LogisticRegression(), dt.optim.LBFGS(), store=run, client=client
    )
    with pytest.raises(ValueError, match=r"LBFGS needs full-batch.*batch_rows=None"):
        lbfgs.fit(data, epochs=2, batch_rows=500, progress=False)
    assert not run.exists()


def test_predict_with_wrong_width(
    client: Client, trained: tuple[Path, dt.Dataset]
) -> None:
    run, _ = trained
    trainer = dt.Trainer.resume(run, client=client)
    X, _ = classification_arrays(10, N_FEATURES + 1)
    with pytest.raises(ValueError, match="X has 13 features, the model was trained"):
        trainer.predict(X)
    with pytest.raises(ValueError, match="X has 13 features"):
        trainer.predict_proba(X)
    with pytest.raises(ValueError, match="2-d"):
        trainer.predict(X[0])
    assert trainer.predict(X[:, :N_FEATURES]).shape == (10,)


def test_resume_of_a_missing_store(tmp_path: Path, client: Client) -> None:
    with pytest.raises(StoreNotFoundError, match=r"nowhere\.zarr"):
        dt.Trainer.resume(tmp_path / "nowhere.zarr", client=client)
    assert not (tmp_path / "nowhere.zarr").exists()


def test_regression_targets_must_be_finite(tmp_path: Path, client: Client) -> None:
    X, y = regression_arrays(3_000)
    y[1_234] = np.nan
    data = store(tmp_path / "d.zarr", X, y)
    trainer = dt.Trainer(
        dt.models.LinearRegression(),
        dt.optim.Adam(0.05),
        store=tmp_path / "run.zarr",
        client=client,
    )
    with pytest.raises(NonFiniteDataError, match=r"'y', chunk 1: row 1234"):
        trainer.fit(data, epochs=1, progress=False)
    history = trainer.fit(data, epochs=2, on_nonfinite="skip", progress=False)
    assert [r["rows"] for r in history] == [2_999, 2_999]


def test_validation_of_another_width(tmp_path: Path, client: Client) -> None:
    data = classification_store(tmp_path / "d.zarr", 2_000)
    narrow = classification_store(tmp_path / "narrow.zarr", 1_000, N_FEATURES - 1)
    run = tmp_path / "run.zarr"
    with pytest.raises(
        DataValidationError,
        match=r"validation dataset .*narrow\.zarr.*'X'.*\(11,\).*d\.zarr.*\(12,\)",
    ):
        _trainer(run, client).fit(data, epochs=2, validation=narrow, progress=False)
    assert not run.exists()
