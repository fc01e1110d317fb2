"""Small stores and helpers shared by the trainer's integration tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import dasktrain as dt

N_FEATURES = 12
CHUNK_ROWS = 1_000


def classification_arrays(
    n_rows: int,
    n_features: int = N_FEATURES,
    *,
    n_classes: int = 2,
    seed: int = 0,
    noise: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features and labels from a linear model with logistic (or
    Gumbel) noise: a Bayes accuracy well above 0.9."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    if n_classes == 2:
        w = rng.normal(size=n_features)
        z = X @ w + 0.5 + noise * rng.logistic(size=n_rows)
        return X, (z > 0).astype(np.int8)
    W = rng.normal(size=(n_features, n_classes))
    z = X @ W + noise * rng.gumbel(size=(n_rows, n_classes))
    return X, np.argmax(z, axis=1).astype(np.int8)


def regression_arrays(
    n_rows: int, n_features: int = N_FEATURES, *, seed: int = 0, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    w = rng.normal(size=n_features)
    y = X @ w - 1.0 + noise * rng.normal(size=n_rows)
    return X, y.astype(np.float32)


def store(
    path: str | os.PathLike[str],
    X: np.ndarray,
    y: np.ndarray,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> dt.Dataset:
    return dt.Dataset.from_arrays(path, X=X, y=y, chunk_rows=chunk_rows)


def classification_store(
    path: str | os.PathLike[str],
    n_rows: int = 9_500,
    n_features: int = N_FEATURES,
    *,
    n_classes: int = 2,
    seed: int = 0,
    chunk_rows: int = CHUNK_ROWS,
) -> dt.Dataset:
    """A classification store; 9,500 rows make 10 chunks, the last one short."""
    X, y = classification_arrays(n_rows, n_features, n_classes=n_classes, seed=seed)
    return store(path, X, y, chunk_rows=chunk_rows)


def store_files(path: str | os.PathLike[str]) -> dict[str, str]:
    """Relative path -> content digest of every file of a store except its
    write lock: equal snapshots mean the store was not modified."""
    out: dict[str, str] = {}
    root = Path(path)
    for d, _, files in os.walk(root):
        for name in files:
            if "dasktrain-lock" in name:
                continue
            full = Path(d) / name
            out[str(full.relative_to(root))] = hashlib.blake2b(
                full.read_bytes(), digest_size=16
            ).hexdigest()
    return out


def assert_same_params(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], what: str = ""
) -> None:
    """Bit-for-bit equality of two parameter dicts."""
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what}: {k} dtype"
        assert np.array_equal(a[k], b[k]), (
            f"{what}: parameter {k!r} differs (max abs diff "
            f"{np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))})"
        )


def losses(history: Any) -> list[float]:
    return [float(r["loss"]) for r in history]


def stored_params(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    return dict(dt.ParamStore.open(path).read().params)
