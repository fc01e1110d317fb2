"""Standardization statistics (pure NumPy): chunk moments summed in any
grouping give numpy's mean and std, also far from the origin; the JSON form
round-trips; bad statistics are refused."""

from __future__ import annotations

import numpy as np
import pytest

from dasktrain.partial import Partial, combine
from dasktrain.preprocessing import (
    MAX_CANCELLATION,
    Moments,
    Standardize,
    moment_statistics,
    standardize_option,
)


def _summed(parts: list[Partial]) -> Partial:
    total = parts[0]
    for p in parts[1:]:
        total = combine(total, p)
    return total


def _moments(chunks: list[np.ndarray], shift: np.ndarray) -> Partial:
    return _summed(
        [Moments().loss_and_grad({"shift": shift}, {"X": c}) for c in chunks]
    )


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_moments_of_chunks_give_numpy_statistics(offset: float) -> None:
    rng = np.random.default_rng(0)
    X = offset + rng.normal(size=(1_003, 3)) * [1.0, 1e-3, 5.0]
    chunks = np.array_split(X, [100, 101, 500, 900])  # uneven, one of 1 row
    shift = np.zeros(3)
    mean, std, cancellation = moment_statistics(_moments(chunks, shift), shift)
    if offset:
        # 1e6 / 1e-3: about zero, the between-chunk term cancels ~18 digits.
        assert cancellation > MAX_CANCELLATION
        shift = mean
        mean, std, cancellation = moment_statistics(_moments(chunks, shift), shift)
    assert cancellation < 1.0
    np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(std, X.std(axis=0), rtol=1e-7)
    fitted = Standardize().with_statistics(mean, std)
    Z = fitted.transform(X)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(Z.std(axis=0), 1.0, rtol=1e-6)


def test_constant_and_excluded_columns() -> None:
    X = np.column_stack([np.full(10, 3.0), np.arange(10.0), np.arange(10.0) * 2])
    partial = Moments().loss_and_grad({}, {"X": X})
    fitted = Standardize(columns=[0, 1]).fitted_from(partial)
    assert fitted.mean == (3.0, 4.5, 0.0)
    assert fitted.std[0] == 1.0 and fitted.std[2] == 1.0  # constant; excluded
    assert fitted.transform(X.astype(np.float32)).dtype == np.float32
    assert Standardize.from_config(fitted.config()) == fitted


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="both mean and std"):
        Standardize(mean=(0.0,))
    with pytest.raises(ValueError, match="std finite and > 0"):
        Standardize(mean=(0.0,), std=(0.0,))
    with pytest.raises(ValueError, match="distinct non-negative"):
        Standardize(columns=(1, 1))
    with pytest.raises(RuntimeError, match="no statistics"):
        Standardize().transform(np.zeros((1, 1)))
    with pytest.raises(TypeError, match="standardize must be"):
        standardize_option("yes")  # type: ignore[arg-type]
    assert standardize_option(True) == Standardize()
    assert standardize_option(False) is None
