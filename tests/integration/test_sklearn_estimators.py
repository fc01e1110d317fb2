"""The scikit-learn estimators of :mod:`dasktrain.sklearn` on a real cluster:
scikit-learn's conformance checks, accuracy against scikit-learn on its
bundled data, and every kind of input."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn", minversion="1.6")

import dask.array as da
from distributed import Client, get_worker
from sklearn import linear_model
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import has_fit_parameter

import dasktrain as dt
from dasktrain.sklearn import (
    LinearRegression,
    LogisticRegression,
    MLPClassifier,
    SGDClassifier,
    SGDRegressor,
    expected_failed_checks,
)

pytestmark = pytest.mark.cluster

#: Accuracy may differ from scikit-learn's by at most this much.
ACCURACY_SLACK = 0.02


@pytest.fixture(autouse=True)
def default_client(client: Client) -> Iterator[Client]:
    """Every test runs with the session cluster as the current client, so
    estimators built with ``client=None`` use it."""
    with client.as_current():
        yield client


@pytest.fixture(scope="module")
def cancer() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_breast_cancer(return_X_y=True)
    return tuple(train_test_split(X, y, test_size=0.3, stratify=y, random_state=0))


def blobs(n_rows: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated classes in 4 features (labels 0, 1, 2)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_rows) % 3
    centers = np.array([[2.0, 0, 0, 1], [0, 2.0, 0, -1], [0, 0, 2.0, 0]])
    return centers[y] + 0.7 * rng.standard_normal((n_rows, 4)), y


# -- conformance ----------------------------------------------------------------

# Instances for the conformance checks.  As scikit-learn does for its own
# estimators in its test suite, iteration budgets are cut to 5 (the checks fit
# about a hundred times per estimator and every step here is a cluster pass),
# with step sizes large enough for the checks' small standardized problems.
CHECKED = [
    LogisticRegression(max_iter=5),
    LinearRegression(max_iter=5),
    SGDClassifier(learning_rate=0.5, batch_size=None, max_iter=5, tol=None),
    SGDRegressor(learning_rate=0.3, batch_size=None, max_iter=5, tol=None),
    MLPClassifier(
        hidden_layer_sizes=(8,),
        learning_rate_init=0.1,
        batch_size=1000,
        max_iter=5,
        tol=None,
    ),
]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks)
def test_sklearn_conformance(estimator, check) -> None:
    check(estimator)


# -- accuracy against scikit-learn ----------------------------------------------


def test_pipeline_matches_sklearn_accuracy(cancer) -> None:
    X_train, X_test, y_train, y_test = cancer
    ours = make_pipeline(StandardScaler(), LogisticRegression()).fit(X_train, y_train)
    ref = make_pipeline(StandardScaler(), linear_model.LogisticRegression())
    ref.fit(X_train, y_train)
    accuracy = ours.score(X_test, y_test)
    assert accuracy > 0.95
    assert abs(accuracy - ref.score(X_test, y_test)) <= ACCURACY_SLACK
    # Same objective (C maps to l2 = 1 / (C n)): the same solution, to the
    # precision of the solvers (scikit-learn's default tol=1e-4 stops earlier).
    precise = make_pipeline(
        StandardScaler(), linear_model.LogisticRegression(tol=1e-10, max_iter=1000)
    ).fit(X_train, y_train)
    ours_coef, ref_coef = ours[-1].coef_, precise[-1].coef_
    assert ours_coef.shape == ref_coef.shape == (1, X_train.shape[1])
    np.testing.assert_allclose(ours_coef, ref_coef, atol=1e-3 * np.abs(ref_coef).max())


def test_grid_search_over_C_matches_sklearn(cancer) -> None:
    X_train, X_test, y_train, y_test = cancer
    grid = {"clf__C": [0.01, 1.0]}

    def search(clf: object) -> GridSearchCV:
        pipe = Pipeline([("scale", StandardScaler()), ("clf", clf)])
        return GridSearchCV(pipe, grid, cv=3).fit(X_train, y_train)

    ours = search(LogisticRegression(tol=1e-4))
    ref = search(linear_model.LogisticRegression(tol=1e-4))
    assert abs(ours.best_score_ - ref.best_score_) <= ACCURACY_SLACK
    np.testing.assert_allclose(
        ours.cv_results_["mean_test_score"],
        ref.cv_results_["mean_test_score"],
        atol=ACCURACY_SLACK,
    )
    assert abs(ours.score(X_test, y_test) - ref.score(X_test, y_test)) <= (
        ACCURACY_SLACK
    )


def test_multinomial_matches_sklearn_probabilities() -> None:
    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    ours = LogisticRegression(C=0.5).fit(X, y)
    ref = linear_model.LogisticRegression(C=0.5, tol=1e-8, max_iter=1000).fit(X, y)
    assert ours.coef_.shape == (3, 4) and ours.intercept_.shape == (3,)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=2e-3)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-3)
    np.testing.assert_allclose(
        ours.predict_log_proba(X), np.log(ours.predict_proba(X)), atol=1e-9
    )


def test_linear_regression_alpha_is_ridge() -> None:
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    ours = LinearRegression(alpha=10.0, max_iter=300).fit(X, y)
    ref = linear_model.Ridge(alpha=10.0).fit(X, y)
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-3 * scale)
    assert ours.intercept_ == pytest.approx(ref.intercept_, rel=1e-4)
    assert ours.score(X, y) == pytest.approx(ref.score(X, y), abs=1e-4)


# -- inputs -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_dask_arrays_are_written_on_workers_and_match_numpy() -> None:
    X, y = blobs(150)

    def on_worker_only(block: np.ndarray) -> np.ndarray:
        get_worker()  # raises ValueError outside a Dask worker
        return block

    X_dask = da.from_array(X, chunks=(40, 4)).map_blocks(
        on_worker_only, dtype=X.dtype, meta=np.empty((0, 4))
    )
    y_dask = da.from_array(y, chunks=40).map_blocks(
        on_worker_only, dtype=y.dtype, meta=np.empty(0, dtype=y.dtype)
    )
    from_dask = LogisticRegression(max_iter=8).fit(X_dask, y_dask)
    from_numpy = LogisticRegression(max_iter=8).fit(X, y)
    # The same store content and the same deterministic run: the same bits.
    np.testing.assert_array_equal(from_dask.coef_, from_numpy.coef_)
    np.testing.assert_array_equal(from_dask.classes_, [0, 1, 2])

    pred = from_dask.predict(X_dask)
    assert isinstance(pred, da.Array)
    np.testing.assert_array_equal(pred.compute(), from_numpy.predict(X))
    proba = from_dask.predict_proba(X_dask)
    assert isinstance(proba, da.Array) and proba.shape == (150, 3)
    np.testing.assert_allclose(proba.compute(), from_numpy.predict_proba(X))
    assert from_dask.score(X_dask, y_dask) == from_numpy.score(X, y)


def test_dask_regression_score_matches_numpy() -> None:
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    reg = LinearRegression(alpha=1.0, max_iter=300).fit(X, y)
    X_dask, y_dask = da.from_array(X, chunks=(100, 10)), da.from_array(y, chunks=100)
    assert reg.score(X_dask, y_dask) == pytest.approx(reg.score(X, y), rel=1e-9)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_dataset_and_store_path_with_non_contiguous_labels(tmp_path: Path) -> None:
    X, ids = blobs(120)
    labels = np.array([3, 7, 11])[ids]
    ds = dt.Dataset.from_arrays(
        tmp_path / "train.zarr", X=X.astype(np.float32), y=labels, chunk_rows=50
    )
    clf = LogisticRegression(max_iter=8).fit(ds)
    np.testing.assert_array_equal(clf.classes_, [3, 7, 11])
    assert clf.n_features_in_ == 4
    pred = clf.predict(ds)
    assert isinstance(pred, da.Array)
    assert set(np.unique(pred.compute())) <= {3, 7, 11}
    assert clf.score(ds) == pytest.approx(np.mean(pred.compute() == labels))
    assert clf.score(ds) > 0.9
    # A store path gives the same run.
    by_path = LogisticRegression(max_iter=8).fit(str(tmp_path / "train.zarr"))
    np.testing.assert_array_equal(by_path.coef_, clf.coef_)
    with pytest.raises(ValueError, match="y must be None"):
        LogisticRegression().fit(ds, labels)
    with pytest.raises(ValueError, match="expecting 4 features"):
        clf.predict(X[:, :3])


def test_dataset_regression(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 3))
    y = X @ np.array([1.5, -2.0, 0.5]) + 4.0
    ds = dt.Dataset.from_arrays(tmp_path / "reg.zarr", X=X, y=y, chunk_rows=64)
    reg = LinearRegression().fit(ds)
    np.testing.assert_allclose(reg.coef_, [1.5, -2.0, 0.5], atol=1e-4)
    assert reg.intercept_ == pytest.approx(4.0, abs=1e-4)
    assert reg.score(ds) == pytest.approx(1.0, abs=1e-6)


def test_string_labels() -> None:
    X, ids = blobs(150)
    y = np.array(["cat", "dog", "emu"])[ids]
    clf = LogisticRegression(C=10.0).fit(X, y)
    np.testing.assert_array_equal(clf.classes_, ["cat", "dog", "emu"])
    pred = clf.predict(X)
    assert pred.dtype.kind == "U" and np.mean(pred == y) > 0.9
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], pred)
    binary = SGDClassifier(learning_rate=0.5, batch_size=None, random_state=0)
    mask = y != "emu"
    binary.fit(X[mask], y[mask])
    assert binary.coef_.shape == (1, 4)
    assert binary.score(X[mask], y[mask]) > 0.9
    assert set(binary.predict(X[mask])) <= {"cat", "dog"}


# -- partial_fit ------------------------------------------------------------------


def test_sgd_partial_fit_continues_the_run() -> None:
    X, y = blobs(120)
    kwargs = {"learning_rate": 0.3, "batch_size": None, "tol": None, "random_state": 3}
    fitted = SGDClassifier(max_iter=3, **kwargs).fit(X, y)
    stepped = SGDClassifier(**kwargs)
    with pytest.raises(ValueError, match="classes must be passed"):
        stepped.partial_fit(X, y)
    stepped.partial_fit(X, y, classes=[0, 1, 2])
    store = stepped.store_
    assert stepped.n_iter_ == 1
    stepped.partial_fit(X, y)
    stepped.partial_fit(X, y)
    assert stepped.n_iter_ == 3 and stepped.store_ == store
    assert len(stepped.history_) == 3
    # Three one-epoch calls are the three epochs of fit, bit for bit.
    np.testing.assert_array_equal(stepped.coef_, fitted.coef_)
    np.testing.assert_array_equal(stepped.intercept_, fitted.intercept_)
    # partial_fit after fit continues that run.
    fitted.partial_fit(X, y)
    assert fitted.n_iter_ == 4
    with pytest.raises(ValueError, match="not the same"):
        stepped.partial_fit(X, y, classes=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="expecting 4 features"):
        stepped.partial_fit(X[:, :2], y)
    stepped.set_params(learning_rate=0.01)
    with pytest.raises(ValueError, match="hyper-parameters"):
        stepped.partial_fit(X, y)


def test_early_stopping_follows_sklearns_rule_and_can_continue() -> None:
    X, y = blobs(90)
    tol, patience = 1e-3, 3
    clf = SGDClassifier(
        learning_rate=0.5,
        batch_size=None,
        max_iter=200,
        tol=tol,
        n_iter_no_change=patience,
        random_state=0,
    )
    clf.fit(X, y)  # no ConvergenceWarning (an error here): it stopped early
    # Replay the rule on the logged objectives (one full-batch step per epoch).
    best, wait, stop = np.inf, 0, None
    for epoch, objective in enumerate(clf.history_.column("objective"), start=1):
        wait = wait + 1 if objective > best - tol else 0
        best = min(best, objective)
        if wait >= patience:
            stop = epoch
            break
    assert stop is not None and clf.n_iter_ == stop < 200
    clf.partial_fit(X, y)
    assert clf.n_iter_ == stop + 1


def test_mlp_and_regressor_partial_fit() -> None:
    X, y = blobs(90)
    kwargs = {
        "hidden_layer_sizes": (6,),
        "learning_rate_init": 0.05,
        "tol": None,
        "random_state": 0,
    }
    fitted = MLPClassifier(max_iter=2, **kwargs).fit(X, y)
    stepped = MLPClassifier(**kwargs)
    stepped.partial_fit(X, y, classes=np.unique(y))
    stepped.partial_fit(X, y)
    for ours, ref in zip(stepped.coefs_, fitted.coefs_, strict=True):
        np.testing.assert_array_equal(ours, ref)
    assert len(stepped.loss_curve_) == 2 and stepped.n_iter_ == 2

    target = X @ np.array([1.0, -1.0, 0.5, 0.0])
    kwargs = {"learning_rate": 0.05, "batch_size": None, "tol": None}
    reg_fitted = SGDRegressor(max_iter=3, random_state=1, **kwargs).fit(X, target)
    reg = SGDRegressor(random_state=1, **kwargs)
    for _ in range(3):
        reg.partial_fit(X, target)
    assert reg.n_iter_ == 3
    np.testing.assert_array_equal(reg.coef_, reg_fitted.coef_)
    losses = reg.history_.column("loss")
    assert losses[0] > losses[1] > losses[2]


# -- estimator protocol -------------------------------------------------------------


def test_clone_and_pickle() -> None:
    X, y = blobs(60)
    est = SGDClassifier(learning_rate=0.5, batch_size=None, max_iter=5, tol=None)
    est.fit(X, y)
    twin = clone(est)
    assert twin.get_params() == est.get_params()
    with pytest.raises(NotFittedError):
        twin.predict(X)
    twin.set_params(learning_rate=0.1).fit(X, y)
    assert twin.store_ != est.store_
    assert not np.array_equal(twin.coef_, est.coef_)

    copy = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(copy.predict_proba(X), est.predict_proba(X))
    # The copy does not own the scratch directory: once the original is gone,
    # it still predicts, but its run can no longer be continued.
    del est
    gc.collect()
    assert not os.path.exists(copy.store_)
    assert copy.score(X, y) > 0.9
    with pytest.raises(RuntimeError, match="no longer exists"):
        copy.partial_fit(X, y)


def test_sample_weight_is_not_accepted() -> None:
    X, y = blobs(30)
    for est in (LogisticRegression(), LinearRegression(), MLPClassifier()):
        assert not has_fit_parameter(est, "sample_weight")
    with pytest.raises(TypeError, match="sample_weight"):
        LogisticRegression().fit(X, y, sample_weight=np.ones(len(y)))


def test_store_dir_keeps_resumable_runs(tmp_path: Path) -> None:
    X, y = blobs(90)
    runs = tmp_path / "runs"
    clf = LogisticRegression(C=10.0, store_dir=runs).fit(X, y)
    first = clf.store_
    assert Path(first).parent == runs
    # Only the parameter store is kept: the scratch copy of the input is gone.
    assert [p.name for p in runs.iterdir()] == [Path(first).name]
    with dt.Trainer.resume(first) as trainer:
        np.testing.assert_array_equal(trainer.params["w"].T, clf.coef_)
    clf.fit(X, y)
    assert clf.store_ != first and os.path.exists(first)


def test_scratch_directory_is_removed_with_the_estimator() -> None:
    X, y = blobs(60)
    clf = LinearRegression().fit(X, y.astype(float))
    scratch = os.path.dirname(clf.store_)
    first = clf.store_
    clf.fit(X, y.astype(float))
    assert not os.path.exists(first)  # a refit drops the previous scratch run
    assert os.listdir(scratch) == [os.path.basename(clf.store_)]
    del clf
    gc.collect()
    assert not os.path.exists(scratch)


def test_bad_parameters_are_reported_by_fit() -> None:
    X, y = blobs(30)
    clf = LogisticRegression(C=-1.0)  # __init__ never validates
    with pytest.raises(ValueError, match="C must be"):
        clf.fit(X, y)
    with pytest.raises(ValueError, match="solver"):
        LogisticRegression(solver="saga").fit(X, y)
    with pytest.raises(ValueError, match="loss"):
        SGDClassifier(loss="hinge").fit(X, y)
    with pytest.raises(ValueError, match="activation"):
        MLPClassifier(activation="logistic").fit(X, y)
    with pytest.raises(ValueError, match="one class"):
        LogisticRegression().fit(X, np.zeros(len(X)))


@pytest.mark.slow
def test_shared_embedded_cluster_without_a_client(tmp_path: Path) -> None:
    """Without a default client, estimators share one embedded cluster that
    closes at interpreter exit."""
    script = textwrap.dedent(
        """
        import numpy as np
        from distributed import default_client
        from dasktrain.sklearn import LogisticRegression, shared_client

        X = np.random.default_rng(0).standard_normal((60, 3))
        y = (X[:, 0] > 0).astype(int)
        a = LogisticRegression(max_iter=5).fit(X, y)
        client = shared_client()
        b = LogisticRegression(max_iter=5).fit(X, y)
        assert shared_client() is client
        stores = {e[1]["store"] for e in client.get_events("dasktrain")}
        assert {a.store_, b.store_} <= stores, stores
        try:
            default_client()
        except ValueError:
            print("not the default client")
        print("ok", len(client.scheduler_info()["workers"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not the default client" in done.stdout
    assert done.stdout.strip().endswith(f"ok {max(1, os.cpu_count() or 1)}")
    assert "Traceback" not in done.stderr
