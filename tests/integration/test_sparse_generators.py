"""The sparse-data generators (make_ratings, make_sparse_classification) on a
real process cluster (fixtures in tests/conftest.py)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client

from dasktrain.data import Dataset
from dasktrain.datasets import (
    RATING_MEAN,
    RatingsSpec,
    SparseClassificationSpec,
    expected_ratings,
    field_id_ranges,
    hash_ids,
    make_ratings,
    make_sparse_classification,
    rating_factors,
    rating_users,
    ratings_chunk,
    sparse_classification_chunk,
    sparse_classification_truth,
    sparse_classification_weights,
)
from dasktrain.errors import StoreError
from dasktrain.models import MatrixFactorization, SparseLogisticRegression

pytestmark = pytest.mark.cluster

RATINGS: dict[str, Any] = {
    "n_users": 400,
    "n_items": 150,
    "n_ratings": 12_000,
    "rank": 4,
    "noise": 0.3,
    "chunk_rows": 1_500,
    "seed": 3,
    "progress": False,
}
SPARSE: dict[str, Any] = {
    "n_rows": 12_000,
    "n_fields": 5,
    "n_ids": 3_000,
    "chunk_rows": 2_500,
    "seed": 4,
    "progress": False,
}


def _all(ds: Dataset, field: str) -> np.ndarray:
    return np.concatenate([ds.read(field, c) for c in ds.chunk_ids])


def _chunk_files(path: Path) -> dict[str, bytes]:
    """Encoded chunk files of a store (the metadata holds a fresh uuid)."""
    return {
        os.path.relpath(os.path.join(d, f), path): Path(d, f).read_bytes()
        for d, _, files in os.walk(path)
        for f in files
        if f != "zarr.json"
    }


def test_ratings_store_fields_and_user_grouped_layout(
    tmp_path: Path, client: Client
) -> None:
    ds = make_ratings(tmp_path / "r.zarr", client=client, **RATINGS)
    ds = Dataset.open(ds.path)
    assert ds.n_rows == 12_000 and ds.n_chunks == 8
    assert {k: (v.shape, v.dtype) for k, v in ds.fields.items()} == {
        "user": ((), "int64"),
        "item": ((), "int64"),
        "rating": ((), "float32"),
    }
    MatrixFactorization(400, 150, 4).check_schema(ds.schema)
    user, item = _all(ds, "user"), _all(ds, "item")
    assert user.min() >= 0 and user.max() < 400
    assert item.min() >= 0 and item.max() < 150

    # Grouped by user: sorted, so each chunk covers a contiguous range of
    # users and neighbouring chunks share at most their boundary user.
    ranges = []
    for chunk_id in ds.chunk_ids:
        users = ds.read("user", chunk_id)
        assert (np.diff(users) >= 0).all()
        ranges.append((int(users[0]), int(users[-1])))
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi <= lo
    assert max(hi - lo + 1 for lo, hi in ranges) < 400 / 4
    np.testing.assert_array_equal(user, rating_users(3, 400, 12_000, 0, 12_000))
    counts = np.bincount(user, minlength=400)
    assert counts.std() > np.sqrt(counts.mean())  # more varied than Poisson
    # Popularity skew: the 10% most rated items get far more than 10%.
    top = np.sort(np.bincount(item, minlength=150))[::-1]
    assert top[:15].sum() > 0.25 * top.sum()

    prov = ds.provenance
    assert prov["source"] == "dasktrain.datasets.make_ratings"
    assert prov["generator"]["n_ratings"] == 12_000
    truth = prov["true_model"]
    assert (truth["seed"], truth["rank"], truth["noise_floor_rmse"]) == (3, 4, 0.3)
    assert truth["mu"] == RATING_MEAN


def test_rating_noise_matches_the_requested_level(
    tmp_path: Path, client: Client
) -> None:
    ds = make_ratings(tmp_path / "r.zarr", client=client, **RATINGS)
    user, item, rating = (_all(ds, f) for f in ("user", "item", "rating"))
    signal = expected_ratings(3, 4, user, item)
    assert 0.6 < signal.var() < 1.5
    residual = rating - signal
    assert abs(residual.mean()) < 0.02
    assert residual.std() == pytest.approx(0.3, rel=0.05)

    # The true model, as MatrixFactorization parameters, reaches the noise
    # floor: its RMSE is the noise level.
    model = MatrixFactorization(400, 150, 4)
    params = {
        "mu": np.asarray(RATING_MEAN),
        "user": rating_factors(3, 4, "user", np.arange(400)),
        "item": rating_factors(3, 4, "item", np.arange(150)),
    }
    part = model.loss(params, {"user": user, "item": item, "rating": rating})
    assert model.summarize(part)["rmse"] == pytest.approx(0.3, rel=0.05)


def test_sparse_classification_store_and_hidden_model(
    tmp_path: Path, client: Client
) -> None:
    ds = make_sparse_classification(
        tmp_path / "s.zarr",
        with_values=True,
        client=client,
        **SPARSE,
    )
    ds = Dataset.open(ds.path)
    assert ds.n_rows == 12_000 and ds.n_chunks == 5
    assert {k: (v.shape, v.dtype) for k, v in ds.fields.items()} == {
        "ids": ((5,), "int64"),
        "values": ((5,), "float32"),
        "y": ((), "int8"),
    }
    SparseLogisticRegression(3_000, use_values=True).check_schema(ds.schema)
    ids, values, y = (_all(ds, f) for f in ("ids", "values", "y"))
    bounds = field_id_ranges(3_000, 5)
    assert ((ids >= bounds[:-1]) & (ids < bounds[1:])).all()
    assert values.min() >= 0.0 and values.max() < 2.0
    assert set(np.unique(y)) == {0, 1}
    prov = ds.provenance
    assert prov["class_counts"] == np.bincount(y, minlength=2).tolist()
    assert prov["field_id_ranges"] == bounds.tolist()
    # Each field is skewed: its most common id is far above uniform (1/600).
    for j in range(5):
        assert np.bincount(ids[:, j]).max() / 12_000 > 0.05

    # The hidden logistic model: its weights as a SparseLogisticRegression
    # table classify about 90% of rows correctly (the Bayes accuracy).
    weight_std, intercept = sparse_classification_truth(4, 5, True)
    assert prov["true_model"]["weight_std"] == weight_std
    model = SparseLogisticRegression(3_000, use_values=True)
    params = {
        "w": sparse_classification_weights(4, 5, True, np.arange(3_000))[:, None],
        "b": np.asarray(intercept),
    }
    part = model.loss(params, {"ids": ids, "values": values, "y": y})
    assert 0.86 < model.summarize(part)["accuracy"] < 0.94


def test_hashed_ids(tmp_path: Path, client: Client) -> None:
    plain = make_sparse_classification(tmp_path / "p.zarr", client=client, **SPARSE)
    hashed = make_sparse_classification(
        tmp_path / "h.zarr",
        hashed=True,
        client=client,
        **SPARSE,
    )
    raw, stored = _all(plain, "ids"), _all(hashed, "ids")
    assert "values" not in hashed.fields
    assert stored.min() >= 0 and stored.max() > 2**40
    np.testing.assert_array_equal(stored, hash_ids(4, raw))
    # hashing is one-to-one on the ids that occur
    assert np.unique(stored).size == np.unique(raw).size


def test_same_bytes_on_one_and_two_workers(
    tmp_path: Path, client: Client, make_client: Callable[[int], Client]
) -> None:
    single = make_client(1)
    for name, make, options in (
        ("r", make_ratings, RATINGS),
        ("s", make_sparse_classification, {**SPARSE, "with_values": True}),
    ):
        two = make(tmp_path / f"{name}2.zarr", client=client, **options)
        one = make(tmp_path / f"{name}1.zarr", client=single, **options)
        assert one.uuid != two.uuid
        files_one = _chunk_files(tmp_path / f"{name}1.zarr")
        files_two = _chunk_files(tmp_path / f"{name}2.zarr")
        assert len(files_one) == len(one.fields) * one.n_chunks
        assert files_one == files_two
        for field in one.fields:
            np.testing.assert_array_equal(_all(one, field), _all(two, field))


def test_chunks_depend_on_parameters_and_chunk_id_only(
    tmp_path: Path, client: Client
) -> None:
    ds = make_ratings(tmp_path / "r.zarr", client=client, **RATINGS)
    spec = RatingsSpec(3, 400, 150, 12_000, 4, 0.3, 0.8, 1_500)
    rows = ratings_chunk(spec, 5)
    for field, values in rows.items():
        np.testing.assert_array_equal(ds.read(field, 5), values)
    sparse = make_sparse_classification(tmp_path / "s.zarr", client=client, **SPARSE)
    sparse_spec = SparseClassificationSpec(4, 5, 3_000, 1.0, False, False, 1.0)
    rows = sparse_classification_chunk(sparse_spec, 4, sparse.chunk_n_rows(4))
    assert sorted(rows) == ["ids", "y"]
    for field, values in rows.items():
        np.testing.assert_array_equal(sparse.read(field, 4), values)
    other = make_ratings(tmp_path / "o.zarr", client=client, **{**RATINGS, "seed": 4})
    assert not np.array_equal(other.read("item", 0), ds.read("item", 0))


def test_reuse_overwrite_and_refusal(tmp_path: Path, client: Client) -> None:
    path = tmp_path / "r.zarr"
    first = make_ratings(path, client=client, **RATINGS)
    again = make_ratings(path, client=client, **RATINGS)
    assert again.uuid == first.uuid
    with pytest.raises(StoreError, match=r"r\.zarr.*rank: stored 4, requested 5"):
        make_ratings(path, client=client, **{**RATINGS, "rank": 5})
    with pytest.raises(StoreError, match=r"name: stored 'make_ratings'"):
        make_sparse_classification(path, client=client, **SPARSE)
    before = first.read("rating", 2)
    fresh = make_ratings(path, client=client, overwrite=True, **RATINGS)
    assert fresh.uuid != first.uuid
    np.testing.assert_array_equal(fresh.read("rating", 2), before)
    with pytest.raises(StoreError, match="changed since it was opened"):
        first.read("rating", 2)


def test_invalid_parameters_create_nothing(tmp_path: Path, client: Client) -> None:
    base = {"n_users": 10, "n_items": 10, "n_ratings": 100}
    for bad, error in [
        ({"n_users": 0}, ValueError),
        ({"n_items": 2**32 + 1}, ValueError),
        ({"rank": 0}, ValueError),
        ({"noise": -0.1}, ValueError),
        ({"item_skew": float("nan")}, ValueError),
        ({"n_ratings": 10.0}, TypeError),
    ]:
        with pytest.raises(error):
            make_ratings(
                tmp_path / "r.zarr", client=client, progress=False, **{**base, **bad}
            )
    for bad, error in [
        ({"n_fields": 0}, ValueError),
        ({"n_ids": 3}, ValueError),  # fewer ids than fields
        ({"id_skew": -1.0}, ValueError),
        ({"with_values": 1}, TypeError),
    ]:
        with pytest.raises(error):
            make_sparse_classification(
                tmp_path / "s.zarr",
                client=client,
                progress=False,
                **{"n_rows": 10, "n_fields": 4, **bad},
            )
    assert not os.listdir(tmp_path)


def test_make_ratings_orders(tmp_path: Path, client: Client) -> None:
    """The same truth in three row orders: grouped by user, users drawn i.i.d.
    with the grouped order's activity, and Zipf-like hot users."""
    grouped = make_ratings(tmp_path / "g.zarr", client=client, **RATINGS)
    shuffled = make_ratings(
        tmp_path / "s.zarr", client=client, order="shuffled", **RATINGS
    )
    hot = make_ratings(
        tmp_path / "h.zarr", client=client, order="hot_users", user_skew=1.0, **RATINGS
    )
    n_users = RATINGS["n_users"]
    assert "order" not in grouped.provenance["generator"]
    assert shuffled.provenance["generator"]["order"] == "shuffled"
    assert hot.provenance["generator"]["user_skew"] == 1.0
    counts = {}
    for name, ds in (("grouped", grouped), ("shuffled", shuffled), ("hot", hot)):
        assert ds.n_rows == RATINGS["n_ratings"]
        users = _all(ds, "user")
        assert users.min() >= 0 and users.max() < n_users
        counts[name] = np.bincount(users, minlength=n_users)
        # Ratings follow the same truth whatever the order.
        resid = _all(ds, "rating") - expected_ratings(
            RATINGS["seed"], RATINGS["rank"], users, _all(ds, "item")
        )
        assert abs(resid.std() - RATINGS["noise"]) < 0.02
    # Grouped chunks cover narrow, sorted user ranges; shuffled ones do not.
    first = np.asarray(grouped.read("user", 0))
    assert (np.diff(first) >= 0).all() and np.ptp(first) < n_users // 4
    mixed = np.asarray(shuffled.read("user", 0))
    assert (np.diff(mixed) < 0).any() and np.ptp(mixed) > 0.9 * n_users
    # Shuffled users keep the grouped order's activity (in expectation).
    assert np.corrcoef(counts["grouped"], counts["shuffled"])[0, 1] > 0.8
    # Hot users: the top 1% give a large share (bounded Zipf, exponent 1).
    top = np.sort(counts["hot"])[::-1][: n_users // 100]
    assert top.sum() > 0.25 * RATINGS["n_ratings"]
    assert np.sort(counts["grouped"])[::-1][: n_users // 100].sum() < top.sum() / 2
    # Bytes are those of the chunk's own generator.
    spec = RatingsSpec(
        RATINGS["seed"],
        n_users,
        RATINGS["n_items"],
        RATINGS["n_ratings"],
        RATINGS["rank"],
        RATINGS["noise"],
        0.8,
        RATINGS["chunk_rows"],
        "hot_users",
        1.0,
    )
    rows = ratings_chunk(spec, 3)
    np.testing.assert_array_equal(rows["user"], hot.read("user", 3))
    np.testing.assert_array_equal(rows["rating"], hot.read("rating", 3))
    with pytest.raises(ValueError, match="order"):
        make_ratings(tmp_path / "x.zarr", client=client, order="random", **RATINGS)
    # Another draw: the same truth and user counts, other items and noise.
    held_out = make_ratings(tmp_path / "d.zarr", client=client, draw=1, **RATINGS)
    assert held_out.provenance["generator"]["draw"] == 1
    np.testing.assert_array_equal(_all(held_out, "user"), _all(grouped, "user"))
    assert (_all(held_out, "item") != _all(grouped, "item")).mean() > 0.5
    resid = _all(held_out, "rating") - expected_ratings(
        RATINGS["seed"], RATINGS["rank"], _all(held_out, "user"), _all(held_out, "item")
    )
    assert abs(resid.std() - RATINGS["noise"]) < 0.02
    other = make_ratings(
        tmp_path / "d2.zarr", client=client, order="shuffled", draw=1, **RATINGS
    )
    assert (_all(other, "user") != _all(shuffled, "user")).mean() > 0.5
