"""Unit tests of the ingest scan and row selection on one block of rows (pure
NumPy, no cluster)."""

from __future__ import annotations

import numpy as np

from dasktrain.data.ingest import _scan_block, _select_rows


def _block() -> dict[str, np.ndarray]:
    X = np.arange(15.0).reshape(5, 3)
    X[3, 2] = np.inf
    X[4, 0] = np.nan
    w = np.ones((5, 2), dtype=np.float32)
    w[3, 1] = np.nan  # same row as X's inf, later field: X is named
    w[1, 0] = -np.inf  # the first bad row
    return {"ids": np.array([0, 1, 2, 3, 4]), "X": X, "w": w, "y": np.arange(5.0)}


def test_scan_names_the_first_bad_row_then_field_then_column() -> None:
    block = _block()
    assert _scan_block(block) == (5, 2, (1, "w", 0, "an infinite value"))
    block["w"][1, 0] = 1.0
    assert _scan_block(block) == (5, 3, (3, "X", 2, "an infinite value"))
    block["X"][3, 2] = 0.0
    assert _scan_block(block) == (5, 3, (3, "w", 1, "NaN (a missing value)"))
    assert _scan_block({"ids": np.arange(4), "y": np.zeros(4)}) == (4, 4, None)


def test_select_keeps_the_rows_the_scan_counts() -> None:
    block = _block()
    n_rows, n_kept, _ = _scan_block(block)
    for field in block:
        kept = _select_rows(block, field, "float64", drop=True)
        assert kept.shape[0] == n_kept
        np.testing.assert_array_equal(kept, block[field][[0, 2]].astype("float64"))
        assert _select_rows(block, field, "float64", drop=False).shape[0] == n_rows
