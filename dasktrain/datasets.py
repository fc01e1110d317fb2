"""Synthetic datasets, generated and written chunk by chunk on the cluster.

Each chunk is drawn from ``np.random.default_rng([seed, chunk_id])`` on a
worker and written there, so the data is identical whatever the number of
workers and never passes through the client.  The true coefficients come from
``np.random.default_rng([seed])``.  The generation parameters are kept in the
store's provenance: calling a generator again with the same parameters
returns the existing store without regenerating it.

Examples
--------
>>> import tempfile, os
>>> from dasktrain.datasets import make_regression
>>> path = os.path.join(tempfile.mkdtemp(), "reg.zarr")
>>> ds = make_regression(path, n_rows=1000, n_features=5, chunk_rows=256,
...                      progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from dasktrain.data.dataset import DEFAULT_CHUNK_ROWS, Dataset
from dasktrain.data.io import (
    DEFAULT_CODEC,
    FORMAT_NAME,
    DatasetRef,
    check_chunk_rows,
    check_codec,
    create_store,
    finalize_store,
    normalize_url,
    read_attrs,
    store_exists,
    write_chunk,
)
from dasktrain.engine.cluster import get_client, run_tasks
from dasktrain.errors import StoreError
from dasktrain.schema import FieldInfo

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

__all__ = [
    "classification_coefficients",
    "make_classification",
    "make_regression",
    "regression_coefficients",
]

#: Bumped whenever a generator's output for given parameters changes, so that
#: stores written by an older generator are not mistaken for current ones.
GENERATOR_VERSION = 1
#: Bayes accuracy of make_classification at ``noise=1``: the coefficient scale
#: is calibrated so that the best possible classifier reaches about this.
TARGET_BAYES_ACCURACY = 0.9
#: Monte Carlo samples used to calibrate the coefficient scale (the Bayes
#: accuracy estimate has a standard error of about 0.002).
CALIBRATION_SAMPLES = 20_000
#: Bisection steps of the calibration (the scale is exact to ~1e-7 relative).
CALIBRATION_STEPS = 25
#: Largest coefficient scale tried by the calibration.
MAX_SCALE = 1e6
#: Intercepts of make_classification are uniform in ``[-INTERCEPT_RANGE, +]``,
#: which keeps the classes roughly balanced.
INTERCEPT_RANGE = 0.25
#: True coefficients are stored in the provenance only up to this many values.
MAX_PROVENANCE_COEFFICIENTS = 1_000


# -- true coefficients --------------------------------------------------------


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _check_noise(noise: object) -> float:
    if isinstance(noise, bool) or not isinstance(noise, int | float | np.floating):
        raise TypeError(f"noise must be a number, got {type(noise).__name__}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be finite and >= 0, got {noise}")
    return float(noise)


def _bayes_accuracy(logits: np.ndarray) -> float:
    """Mean probability of the most likely class, for logits of shape
    ``(m, 1)`` (binary: ``p = sigmoid(z)``) or ``(m, k)`` (softmax)."""
    if logits.shape[1] == 1:
        return float(np.mean(1.0 / (1.0 + np.exp(-np.abs(logits[:, 0])))))
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    return float(np.mean(1.0 / probs.sum(axis=1)))


def _calibrated_scale(
    direction: np.ndarray, intercept: np.ndarray, rng: np.random.Generator
) -> float:
    """Scale ``c`` such that logits ``c * x @ direction + intercept`` with
    ``x ~ N(0, I)`` give a Bayes accuracy of :data:`TARGET_BAYES_ACCURACY`."""
    # x @ direction is Gaussian with covariance direction.T @ direction; sample
    # it in the (small) output space instead of the feature space.
    eigvals, eigvecs = np.linalg.eigh(direction.T @ direction)
    factor = eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))
    samples = rng.standard_normal((CALIBRATION_SAMPLES, direction.shape[1])) @ factor.T

    def accuracy(scale: float) -> float:
        return _bayes_accuracy(scale * samples + intercept)

    low, high = 0.0, 1.0
    while accuracy(high) < TARGET_BAYES_ACCURACY and high < MAX_SCALE:
        low, high = high, high * 2.0
    for _ in range(CALIBRATION_STEPS):
        mid = 0.5 * (low + high)
        if accuracy(mid) < TARGET_BAYES_ACCURACY:
            low = mid
        else:
            high = mid
    return high


@functools.lru_cache(maxsize=8)
def classification_coefficients(
    seed: int, n_features: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """True coefficients of :func:`make_classification` (read-only arrays).

    Returns ``(w, b)``: shapes ``(n_features,)`` and ``()`` for two classes,
    ``(n_features, n_classes)`` and ``(n_classes,)`` otherwise.  Random
    directions from ``np.random.default_rng([seed])``, scaled so that the Bayes
    accuracy at ``noise=1`` is about :data:`TARGET_BAYES_ACCURACY`.

    Examples
    --------
    >>> w, b = classification_coefficients(0, 10, 2)
    >>> w.shape, b.shape
    ((10,), ())
    """
    _check_int(seed, "seed", 0)
    _check_int(n_features, "n_features", 1)
    _check_int(n_classes, "n_classes", 2)
    rng = np.random.default_rng([seed])
    n_outputs = 1 if n_classes == 2 else n_classes
    direction = rng.standard_normal((n_features, n_outputs))
    direction /= np.linalg.norm(direction, axis=0, keepdims=True)
    intercept = rng.uniform(-INTERCEPT_RANGE, INTERCEPT_RANGE, size=n_outputs)
    scale = _calibrated_scale(direction, intercept, rng)
    w = direction * scale
    b = intercept
    if n_classes == 2:
        w, b = w[:, 0].copy(), np.asarray(b[0])
    w.setflags(write=False)
    b.setflags(write=False)
    return w, b


@functools.lru_cache(maxsize=8)
def regression_coefficients(
    seed: int, n_features: int
) -> tuple[np.ndarray, np.ndarray]:
    """True coefficients ``(w, b)`` of :func:`make_regression`: standard
    normal draws from ``np.random.default_rng([seed])`` (read-only arrays).

    Examples
    --------
    >>> w, b = regression_coefficients(0, 3)
    >>> w.shape, b.shape
    ((3,), ())
    """
    _check_int(seed, "seed", 0)
    _check_int(n_features, "n_features", 1)
    rng = np.random.default_rng([seed])
    w = rng.standard_normal(n_features)
    b = np.asarray(rng.standard_normal())
    w.setflags(write=False)
    b.setflags(write=False)
    return w, b


def _label_dtype(n_classes: int) -> np.dtype[Any]:
    for dtype in (np.int8, np.int16, np.int32):
        if n_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


# -- worker tasks (module level, so CLI-started workers can import them) ------


@dataclass(frozen=True)
class ClassificationSpec:
    """What a worker needs to generate a chunk of :func:`make_classification`."""

    seed: int
    n_features: int
    n_classes: int
    noise: float


@dataclass(frozen=True)
class RegressionSpec:
    """What a worker needs to generate a chunk of :func:`make_regression`."""

    seed: int
    n_features: int
    noise: float


def classification_chunk(
    spec: ClassificationSpec, chunk_id: int, n_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one chunk of :func:`make_classification`: ``(X, y)``.

    Examples
    --------
    >>> X, y = classification_chunk(ClassificationSpec(0, 4, 2, 1.0), 0, 5)
    >>> X.dtype, X.shape, y.dtype
    (dtype('float32'), (5, 4), dtype('int8'))
    """
    w, b = classification_coefficients(spec.seed, spec.n_features, spec.n_classes)
    rng = np.random.default_rng([spec.seed, chunk_id])
    X = rng.standard_normal((n_rows, spec.n_features), dtype=np.float32)
    logits = X @ w + b
    dtype = _label_dtype(spec.n_classes)
    if spec.n_classes == 2:
        # y = 1[z + noise * Logistic > 0], i.e. Bernoulli(sigmoid(z / noise)).
        noisy = logits + spec.noise * rng.logistic(size=n_rows)
        y = (noisy > 0).astype(dtype)
    else:
        # argmax of logits + noise * Gumbel samples softmax(logits / noise).
        noisy = logits + spec.noise * rng.gumbel(size=(n_rows, spec.n_classes))
        y = np.argmax(noisy, axis=1).astype(dtype)
    return X, y


def regression_chunk(
    spec: RegressionSpec, chunk_id: int, n_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one chunk of :func:`make_regression`: ``(X, y)``.

    Examples
    --------
    >>> X, y = regression_chunk(RegressionSpec(0, 4, 1.0), 0, 5)
    >>> X.shape, y.shape, y.dtype
    ((5, 4), (5,), dtype('float32'))
    """
    w, b = regression_coefficients(spec.seed, spec.n_features)
    rng = np.random.default_rng([spec.seed, chunk_id])
    X = rng.standard_normal((n_rows, spec.n_features), dtype=np.float32)
    y = X @ w + b + spec.noise * rng.standard_normal(n_rows)
    return X, y.astype(np.float32)


def write_classification_chunk(
    ref: DatasetRef, chunk_id: int, spec: ClassificationSpec
) -> list[int]:
    """Task: generate and write one chunk; returns its class counts."""
    X, y = classification_chunk(spec, chunk_id, ref.chunk_n_rows(chunk_id))
    write_chunk(ref, "X", chunk_id, X)
    write_chunk(ref, "y", chunk_id, y)
    return [int(c) for c in np.bincount(y, minlength=spec.n_classes)]


def write_regression_chunk(
    ref: DatasetRef, chunk_id: int, spec: RegressionSpec
) -> None:
    """Task: generate and write one chunk."""
    X, y = regression_chunk(spec, chunk_id, ref.chunk_n_rows(chunk_id))
    write_chunk(ref, "X", chunk_id, X)
    write_chunk(ref, "y", chunk_id, y)


# -- driver -------------------------------------------------------------------


def _normalized(params: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(json.dumps(params))
    return result


def _reuse_or_prepare(
    url: str, params: dict[str, Any], overwrite: bool
) -> Dataset | None:
    """The existing store if it was generated with ``params``; else ``None``
    after checking that a new one may be written at ``url``."""
    if not store_exists(url):
        return None
    meta = read_attrs(url)
    if meta is None or meta.get("format") != FORMAT_NAME:
        raise StoreError(
            f"{url!r} already exists and is not a dasktrain dataset store; choose "
            f"another path (it is never deleted, even with overwrite=True)"
        )
    provenance = meta.get("provenance")
    found = provenance.get("generator") if isinstance(provenance, dict) else None
    same = found == params
    if meta.get("complete") is not True:
        if same or overwrite:
            logger.info("replacing the incomplete store %s", url)
            return None
        raise StoreError(
            f"an incomplete dataset store with other contents exists at {url!r}; "
            f"pass overwrite=True to replace it"
        )
    if overwrite:
        return None
    if same:
        dataset = Dataset.open(url)
        logger.info("reusing %s (same generation parameters)", url)
        return dataset
    if isinstance(found, dict):
        differ = sorted(
            k for k in set(found) | set(params) if found.get(k) != params.get(k)
        )
        detail = ", ".join(
            f"{k}: stored {found.get(k)!r}, requested {params.get(k)!r}" for k in differ
        )
    else:
        detail = f"it was not written by {params['name']} (source {provenance!r})"
    raise StoreError(
        f"a dataset store with different contents exists at {url!r} ({detail}); "
        f"pass overwrite=True to replace it"
    )


def _generate(
    path: str | os.PathLike[str],
    *,
    params: dict[str, Any],
    fields: dict[str, FieldInfo],
    task: Callable[..., Any],
    spec: object,
    client: Client | str | None,
    overwrite: bool,
    progress: bool,
    summarize: Callable[[Sequence[Any]], dict[str, Any]],
) -> Dataset:
    url = normalize_url(path)
    params = _normalized(params)
    existing = _reuse_or_prepare(url, params, overwrite)
    if existing is not None:
        return existing
    source = f"{__name__}.{params['name']}"
    handle = get_client(client)
    try:
        ref = create_store(
            url,
            fields=fields,
            n_rows=params["n_rows"],
            chunk_rows=params["chunk_rows"],
            codec=params["codec"],
            overwrite=True,
            provenance={"source": source, "generator": params},
        )
        with tqdm(
            total=ref.n_chunks, desc=params["name"], unit="chunk", disable=not progress
        ) as bar:
            # Sync point: waits until every chunk has been generated and written.
            results = run_tasks(
                handle.client,
                task,
                [(ref, chunk_id, spec) for chunk_id in range(ref.n_chunks)],
                progress=bar.update,
                key_prefix=f"dasktrain-{params['name']}",
            )
    finally:
        handle.close()
    finalize_store(url, provenance={"source": source, **summarize(results)})
    return Dataset.open(url)


def _coefficient_provenance(w: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    if w.size + b.size > MAX_PROVENANCE_COEFFICIENTS:
        return {}
    return {"coefficients": {"w": w.tolist(), "b": b.tolist()}}


def make_classification(
    path: str | os.PathLike[str],
    *,
    n_rows: int,
    n_features: int = 100,
    n_classes: int = 2,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    codec: str = DEFAULT_CODEC,
    seed: int = 0,
    noise: float = 1.0,
    client: Client | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Dataset:
    """Generate a classification dataset store on the cluster.

    ``X`` (float32) is standard normal.  With logits ``z = X @ w + b``
    (coefficients from :func:`classification_coefficients`), labels ``y`` are
    ``1[z + noise * Logistic > 0]`` for two classes, i.e. Bernoulli
    ``sigmoid(z / noise)``, and ``argmax(z + noise * Gumbel)``, i.e. softmax
    ``(z / noise)``, for more.  At ``noise=1`` the Bayes accuracy is about 0.9;
    ``noise=0`` gives noiseless labels.  ``y`` is int8 (int16 beyond 128
    classes).

    Parameters
    ----------
    path : str or os.PathLike
        Store to write (local path or fsspec URL reachable from the workers).
    n_rows, n_features, n_classes : int
        Size of the problem.
    chunk_rows : int
        Rows per chunk.
    codec : {"lz4", "zstd", "none"}
        Chunk compression.
    seed : int
        Seeds the coefficients (``default_rng([seed])``) and each chunk
        (``default_rng([seed, chunk_id])``).
    noise : float
        Temperature of the label noise (see above).
    client : distributed.Client, str or None
        Where to run; ``None`` uses the current client or starts (and then
        closes) a local cluster.
    overwrite : bool
        Regenerate even if a store with the same parameters exists, and
        replace a dataset store with other contents.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Dataset
        The existing store if one with the same parameters is complete at
        ``path``, else a newly generated one.  Its provenance holds the
        parameters, the class counts and (when small) the true coefficients.

    Raises
    ------
    StoreError
        A store with other contents exists at ``path`` and ``overwrite`` is
        false, or ``path`` holds something that is not a dataset store.

    Examples
    --------
    >>> import dasktrain as dt
    >>> ds = dt.datasets.make_classification(
    ...     "data/quickstart.zarr", n_rows=3_000_000, n_features=100
    ... )  # doctest: +SKIP
    >>> ds.n_chunks  # doctest: +SKIP
    46
    """
    n_rows = _check_int(n_rows, "n_rows", 1)
    n_features = _check_int(n_features, "n_features", 1)
    n_classes = _check_int(n_classes, "n_classes", 2)
    chunk_rows = check_chunk_rows(chunk_rows)
    codec = check_codec(codec)
    seed = _check_int(seed, "seed", 0)
    noise = _check_noise(noise)
    params = {
        "name": "make_classification",
        "version": GENERATOR_VERSION,
        "n_rows": n_rows,
        "n_features": n_features,
        "n_classes": n_classes,
        "chunk_rows": chunk_rows,
        "codec": codec,
        "seed": seed,
        "noise": noise,
    }
    label_dtype = _label_dtype(n_classes)

    def summarize(results: Sequence[Any]) -> dict[str, Any]:
        counts = np.sum(np.asarray(results, dtype=np.int64), axis=0)
        w, b = classification_coefficients(seed, n_features, n_classes)
        return {"class_counts": counts.tolist(), **_coefficient_provenance(w, b)}

    return _generate(
        path,
        params=params,
        fields={
            "X": FieldInfo((n_features,), "float32"),
            "y": FieldInfo((), label_dtype.name),
        },
        task=write_classification_chunk,
        spec=ClassificationSpec(seed, n_features, n_classes, noise),
        client=client,
        overwrite=overwrite,
        progress=progress,
        summarize=summarize,
    )


def make_regression(
    path: str | os.PathLike[str],
    *,
    n_rows: int,
    n_features: int = 100,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    codec: str = DEFAULT_CODEC,
    seed: int = 0,
    noise: float = 1.0,
    client: Client | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Dataset:
    """Generate a linear regression dataset store on the cluster.

    ``X`` (float32) is standard normal and ``y = X @ w + b + noise * N(0, 1)``
    (float32), with ``w`` and ``b`` standard normal draws from
    ``default_rng([seed])`` (see :func:`regression_coefficients`).  Options,
    reuse and errors are those of :func:`make_classification`.

    Examples
    --------
    >>> import dasktrain as dt
    >>> ds = dt.datasets.make_regression(
    ...     "data/regression.zarr", n_rows=1_000_000, n_features=20
    ... )  # doctest: +SKIP
    """
    n_rows = _check_int(n_rows, "n_rows", 1)
    n_features = _check_int(n_features, "n_features", 1)
    chunk_rows = check_chunk_rows(chunk_rows)
    codec = check_codec(codec)
    seed = _check_int(seed, "seed", 0)
    noise = _check_noise(noise)
    params = {
        "name": "make_regression",
        "version": GENERATOR_VERSION,
        "n_rows": n_rows,
        "n_features": n_features,
        "chunk_rows": chunk_rows,
        "codec": codec,
        "seed": seed,
        "noise": noise,
    }

    def summarize(results: Sequence[Any]) -> dict[str, Any]:
        return _coefficient_provenance(*regression_coefficients(seed, n_features))

    return _generate(
        path,
        params=params,
        fields={
            "X": FieldInfo((n_features,), "float32"),
            "y": FieldInfo((), "float32"),
        },
        task=write_regression_chunk,
        spec=RegressionSpec(seed, n_features, noise),
        client=client,
        overwrite=overwrite,
        progress=progress,
        summarize=summarize,
    )
