"""Helpers for parameter dicts (name -> numpy array).  Pure NumPy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["Params", "flatten", "global_norm", "tree_map2", "unflatten"]

Params = dict[str, np.ndarray]


def flatten(tree: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate arrays in sorted-name order into one float64 vector."""
    if not tree:
        return np.zeros(0)
    return np.concatenate(
        [np.asarray(tree[k], dtype=np.float64).ravel() for k in sorted(tree)]
    )


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> Params:
    """Inverse of :func:`flatten`, with the shapes of ``like``."""
    out: Params = {}
    offset = 0
    for k in sorted(like):
        shape = np.shape(like[k])
        size = int(np.prod(shape, dtype=np.int64))
        out[k] = np.asarray(vector[offset : offset + size], dtype=np.float64).reshape(
            shape
        )
        offset += size
    if offset != vector.shape[0]:
        raise ValueError(f"vector has {vector.shape[0]} entries, parameters {offset}")
    return out


def global_norm(tree: Mapping[str, np.ndarray]) -> float:
    """Euclidean norm of all entries together."""
    return float(np.sqrt(sum(float(np.vdot(v, v).real) for v in tree.values())))


def tree_map2(
    fn: object, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]
) -> Params:
    """``{k: fn(a[k], b[k])}`` over the keys of ``a``."""
    return {k: fn(a[k], b[k]) for k in a}  # type: ignore[operator]
