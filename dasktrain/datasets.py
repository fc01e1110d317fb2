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
    check_storage_options,
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
    "drawn_users",
    "expected_ratings",
    "field_id_ranges",
    "hash_ids",
    "make_classification",
    "make_ratings",
    "make_regression",
    "make_sparse_classification",
    "rating_factors",
    "rating_users",
    "regression_coefficients",
    "sparse_classification_truth",
    "sparse_classification_weights",
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
    url: str,
    params: dict[str, Any],
    overwrite: bool,
    storage_options: dict[str, Any],
) -> Dataset | None:
    """The existing store if it was generated with ``params``; else ``None``
    after checking that a new one may be written at ``url``."""
    if not store_exists(url, storage_options):
        return None
    meta = read_attrs(url, storage_options=storage_options)
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
        dataset = Dataset.open(url, storage_options=storage_options)
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
    storage_options: dict[str, Any] | None,
) -> Dataset:
    url = normalize_url(path)
    params = _normalized(params)
    options = check_storage_options(storage_options)
    existing = _reuse_or_prepare(url, params, overwrite, options)
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
            storage_options=options,
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
    finalize_store(
        url,
        provenance={"source": source, **summarize(results)},
        storage_options=options,
    )
    return Dataset.open(url, storage_options=options)


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
    storage_options: dict[str, Any] | None = None,
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
    storage_options : dict, optional
        fsspec options of a remote ``path`` (credentials, endpoint...),
        JSON-serializable; they travel to the workers with the tasks and are
        not recorded in the store.  Without them, the client and the workers
        configure the filesystem from their environment.

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
        storage_options=storage_options,
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
    storage_options: dict[str, Any] | None = None,
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
        storage_options=storage_options,
    )


# -- sparse data: ratings and hashed-feature classification --------------------
#
# The true parameters of these generators are tables with one row per id (a
# user's embedding, a feature's weight), possibly far too large for one
# process.  They are never materialized: each value is a pure function of
# (seed, table, id, column), computed with a counter-based hash only for the
# ids a chunk uses.  Seeding numpy generators per block of ids would make a
# chunk that touches items all over the id space (popular items are spread
# over it) generate the whole item table; the hash costs O(ids used).

#: Ratings are ``RATING_MEAN + b_u + b_i + p_u . q_i + noise * N(0, 1)``.
RATING_MEAN = 3.5
#: Variance of ``p_u . q_i`` over random users and items.
INTERACTION_VARIANCE = 0.8
#: Variance of each bias ``b_u`` and ``b_i``; with the interaction, the
#: variance of the noiseless rating (the signal) is 1.
BIAS_VARIANCE = 0.1
#: Users get their ratings in blocks of this many consecutive ids: the
#: ratings are first split between blocks, then within each block between its
#: users, so that any chunk can find its users without a pass over all users.
USER_BLOCK = 4096
#: Sigma of the log-normal activity of users (how many ratings each gives).
USER_ACTIVITY_SIGMA = 1.0
#: Row orders of make_ratings: grouped by user, users drawn i.i.d. per row
#: (same expected activity as the grouped order), or drawn from a Zipf-like
#: popularity of users (a few hot users give a large share of the ratings).
RATING_ORDERS = ("user", "shuffled", "hot_users")
#: Item ids, and the ids of each field of make_sparse_classification, are
#: limited to this many (the popularity permutation works in uint64).
MAX_IDS = 2**32
#: make_sparse_classification values are uniform in ``[0, MAX_VALUE)``.
MAX_VALUE = 2.0

# Random streams: every key is ``[seed, stream, index]``, so that no two
# streams share a key (numpy pads short keys with zeros: ``[s, t]`` and
# ``[s, t, 0]`` are the same generator).
_STREAM_RATING_CHUNK = 0x52430001
_STREAM_BLOCK_TOTALS = 0x52430002
_STREAM_USER_ACTIVITY = 0x52430003
_STREAM_ITEM_ORDER = 0x52430004
_STREAM_USER_FACTORS = 0x52430005
_STREAM_ITEM_FACTORS = 0x52430006
_STREAM_ROW_USERS = 0x52430007
_STREAM_USER_ORDER = 0x52430008
_STREAM_SPARSE_CHUNK = 0x53430001
_STREAM_SPARSE_TRUTH = 0x53430002
_STREAM_FIELD_ORDER = 0x53430003
_STREAM_SPARSE_WEIGHTS = 0x53430004
_STREAM_ID_HASH = 0x53430005

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
#: Fraction of the id space between consecutive popularity ranks (the golden
#: ratio's fractional part spreads popular ids evenly over the space).
_SPREAD = 0.6180339887498949


def _check_exponent(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {value}")
    return float(value)


def _stream_key(seed: int, stream: int) -> np.uint64:
    """A 64-bit key for the hashed values of one stream."""
    state = np.random.SeedSequence([seed, stream, 0]).generate_state(1, np.uint64)
    return np.uint64(state[0])


def _mix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer: a bijection of uint64 with full avalanche."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _MIX_1
        x = x ^ (x >> np.uint64(27))
        x = x * _MIX_2
        return x ^ (x >> np.uint64(31))


def _hashed_normals(key: np.uint64, ids: np.ndarray, width: int) -> np.ndarray:
    """Standard normals of shape ``(len(ids), width)``: entry ``[i, j]`` is a
    pure function of ``(key, ids[i], j)`` (Box-Muller on 32-bit uniforms, so
    values are bounded by about 6.7)."""
    n_pairs = (width + 1) // 2
    flat = np.asarray(ids).astype(np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        counters = flat * np.uint64(n_pairs) + np.arange(n_pairs, dtype=np.uint64)
        bits = _mix64(counters * _GOLDEN_GAMMA + key)
    scale = 2.0**-32
    u1 = ((bits >> np.uint64(32)).astype(np.float64) + 0.5) * scale
    u2 = ((bits & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) * scale
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = (2.0 * np.pi) * u2
    # Columns [0, n_pairs) are radius * cos(angle), the rest radius * sin(angle).
    n_sin = width - n_pairs
    out = np.empty((flat.shape[0], width), dtype=np.float64)
    np.multiply(radius, np.cos(angle), out=out[:, :n_pairs])
    np.multiply(radius[:, :n_sin], np.sin(angle[:, :n_sin]), out=out[:, n_pairs:])
    return out


def _power_law_ranks(u: np.ndarray, n: np.ndarray | int, exponent: float) -> np.ndarray:
    """Popularity ranks in ``[0, n)`` from uniforms ``u``: a bounded Zipf-like
    law, ``P(rank r)`` about proportional to ``(r + 1) ** -exponent``
    (``exponent=0`` is uniform).  ``n`` broadcasts against ``u``."""
    n_float = np.asarray(n, dtype=np.float64)
    log_top = np.log(n_float + 1.0)
    t = 1.0 - exponent
    if abs(t) * float(np.max(log_top)) < 1e-12:
        log_x = u * log_top
    else:
        log_x = np.log1p(u * np.expm1(t * log_top)) / t
    ranks = np.floor(np.exp(log_x)).astype(np.int64) - 1
    return np.clip(ranks, 0, np.asarray(n, dtype=np.int64) - 1)


def _popularity_order(
    seed: int, stream: int, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(step, shift)`` of the bijections ``rank -> (step * rank + shift) mod
    size`` that place popularity ranks in id spaces of the given sizes."""
    rng = np.random.default_rng([seed, stream, 0])
    shift = np.array([rng.integers(0, int(s)) for s in sizes], dtype=np.uint64)
    steps = []
    for size in sizes.tolist():
        step = max(1, round(size * _SPREAD))
        while math.gcd(step, size) != 1:
            step += 1
        steps.append(step % size if size > 1 else 0)
    return np.asarray(steps, dtype=np.uint64), shift


def _place(
    ranks: np.ndarray, step: np.ndarray, shift: np.ndarray, size: np.ndarray
) -> np.ndarray:
    """``(step * ranks + shift) mod size`` without overflow (sizes <= 2**32)."""
    r = ranks.astype(np.uint64)
    with np.errstate(over="ignore"):
        placed = (step * r + shift) % size.astype(np.uint64)
    return placed.astype(np.int64)


# -- make_ratings: truth and rows ---------------------------------------------


def _factor_scales(rank: int) -> tuple[float, float]:
    """Standard deviations ``(embedding, bias)`` of the true factors."""
    return (INTERACTION_VARIANCE / rank) ** 0.25, math.sqrt(BIAS_VARIANCE)


def rating_factors(seed: int, rank: int, table: str, ids: np.ndarray) -> np.ndarray:
    """True factors of :func:`make_ratings` for some user or item ids.

    Returns an array of shape ``(len(ids), rank + 1)`` (float64): the
    embedding (normal, standard deviation ``(0.8 / rank) ** 0.25``, so that
    ``p_u . q_i`` has variance 0.8) and, in the last column, the bias (normal,
    variance 0.1), laid out like the tables of
    :class:`~dasktrain.models.MatrixFactorization`.  Each row is a pure
    function of ``(seed, table, rank, id)``: any subset of ids can be
    computed anywhere, and the table is never materialized.

    Parameters
    ----------
    seed, rank : int
        As given to :func:`make_ratings`.
    table : {"user", "item"}
        Which table.
    ids : array of int
        Ids (any shape is flattened).

    Examples
    --------
    >>> rows = rating_factors(0, 4, "user", np.array([7, 3, 7]))
    >>> rows.shape, bool((rows[0] == rows[2]).all())
    ((3, 5), True)
    """
    streams = {"user": _STREAM_USER_FACTORS, "item": _STREAM_ITEM_FACTORS}
    if table not in streams:
        raise ValueError(f"table must be 'user' or 'item', got {table!r}")
    rank = _check_int(rank, "rank", 1)
    flat = np.asarray(ids).reshape(-1)
    if flat.size and flat.min() < 0:
        raise ValueError(f"{table} ids must be >= 0, found {int(flat.min())}")
    values = _hashed_normals(_stream_key(seed, streams[table]), flat, rank + 1)
    embedding_std, bias_std = _factor_scales(rank)
    values[:, :rank] *= embedding_std
    values[:, rank] *= bias_std
    return values


def expected_ratings(
    seed: int, rank: int, user: np.ndarray, item: np.ndarray
) -> np.ndarray:
    """Noiseless ratings of :func:`make_ratings`: ``RATING_MEAN + b_u + b_i +
    p_u . q_i`` (float64), computing each distinct id's factors once.

    Examples
    --------
    >>> expected_ratings(0, 4, np.array([0, 1]), np.array([5, 5])).shape
    (2,)
    """
    users, user_index = np.unique(np.asarray(user), return_inverse=True)
    items, item_index = np.unique(np.asarray(item), return_inverse=True)
    U = rating_factors(seed, rank, "user", users)[user_index.reshape(-1)]
    V = rating_factors(seed, rank, "item", items)[item_index.reshape(-1)]
    return (
        RATING_MEAN
        + U[:, rank]
        + V[:, rank]
        + np.einsum("ij,ij->i", U[:, :rank], V[:, :rank])
    )


@functools.lru_cache(maxsize=8)
def _user_block_offsets(seed: int, n_users: int, n_ratings: int) -> np.ndarray:
    """First row of each block of :data:`USER_BLOCK` users, and ``n_ratings``
    at the end (a multinomial split of the ratings, in proportion to block
    sizes)."""
    n_blocks = math.ceil(n_users / USER_BLOCK)
    sizes = np.full(n_blocks, USER_BLOCK, dtype=np.float64)
    sizes[-1] = n_users - (n_blocks - 1) * USER_BLOCK
    rng = np.random.default_rng([seed, _STREAM_BLOCK_TOTALS, 0])
    totals = rng.multinomial(n_ratings, sizes / n_users)
    offsets = np.concatenate([[0], np.cumsum(totals)]).astype(np.int64)
    offsets.setflags(write=False)
    return offsets


def _block_user_counts(seed: int, n_users: int, block: int, total: int) -> np.ndarray:
    """Ratings of each user of a block: multinomial over log-normal activity."""
    first = block * USER_BLOCK
    size = min(USER_BLOCK, n_users - first)
    rng = np.random.default_rng([seed, _STREAM_USER_ACTIVITY, block])
    activity = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, size)
    counts: np.ndarray = rng.multinomial(total, activity / activity.sum())
    return counts


def rating_users(
    seed: int, n_users: int, n_ratings: int, start: int, stop: int
) -> np.ndarray:
    """User id of rows ``[start, stop)`` of :func:`make_ratings` (int64).

    Rows are sorted by user: user ``u`` has the rows between the ratings of
    users ``< u`` and ``<= u``.  The ratings are split multinomially between
    blocks of :data:`USER_BLOCK` users, then within a block in proportion to
    each user's log-normal activity (so counts vary a lot around
    ``n_ratings / n_users``, and some users have none).  Only the blocks that
    overlap the rows are drawn.

    Examples
    --------
    >>> users = rating_users(0, n_users=10, n_ratings=100, start=0, stop=100)
    >>> users[:8]
    array([1, 1, 1, 1, 1, 2, 2, 2])
    >>> bool((rating_users(0, 10, 100, 3, 8) == users[3:8]).all())
    True
    """
    offsets = _user_block_offsets(seed, n_users, n_ratings)
    out = np.empty(stop - start, dtype=np.int64)
    if stop <= start:
        return out
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop - 1, side="right")) - 1
    for block in range(first, last + 1):
        lo = max(start, int(offsets[block]))
        hi = min(stop, int(offsets[block + 1]))
        if hi <= lo:
            continue
        total = int(offsets[block + 1] - offsets[block])
        ends = offsets[block] + np.cumsum(
            _block_user_counts(seed, n_users, block, total)
        )
        rows = np.arange(lo, hi, dtype=np.int64)
        out[lo - start : hi - start] = block * USER_BLOCK + np.searchsorted(
            ends, rows, side="right"
        )
    return out


@dataclass(frozen=True)
class RatingsSpec:
    """What a worker needs to generate a chunk of :func:`make_ratings`."""

    seed: int
    n_users: int
    n_items: int
    n_ratings: int
    rank: int
    noise: float
    item_skew: float
    chunk_rows: int
    order: str = "user"
    user_skew: float = 1.0
    draw: int = 0


@functools.lru_cache(maxsize=8)
def _user_activity_cdf(seed: int, n_users: int, n_ratings: int) -> np.ndarray:
    """Cumulative share of the ratings of users ``[0, u]`` expected in the
    grouped order: each block's share (of :func:`_user_block_offsets`), split
    between its users in proportion to their log-normal activity."""
    offsets = _user_block_offsets(seed, n_users, n_ratings)
    cdf = np.empty(n_users, dtype=np.float64)
    for block in range(offsets.shape[0] - 1):
        first = block * USER_BLOCK
        size = min(USER_BLOCK, n_users - first)
        rng = np.random.default_rng([seed, _STREAM_USER_ACTIVITY, block])
        activity = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, size)
        share = (offsets[block + 1] - offsets[block]) / n_ratings
        cdf[first : first + size] = offsets[block] / n_ratings + share * np.cumsum(
            activity / activity.sum()
        )
    cdf[-1] = 1.0
    cdf.setflags(write=False)
    return cdf


def drawn_users(spec: RatingsSpec, chunk_id: int, n_rows: int) -> np.ndarray:
    """User ids of a chunk of :func:`make_ratings` in the ``"shuffled"`` and
    ``"hot_users"`` orders (int64), from ``default_rng([seed, stream,
    chunk_id])``.

    ``"shuffled"``: i.i.d. draws with the expected per-user activity of the
    grouped order.  ``"hot_users"``: i.i.d. draws of a bounded Zipf-like
    popularity of exponent ``user_skew``, the hot users spread over the id
    space.

    Examples
    --------
    >>> spec = RatingsSpec(0, n_users=50, n_items=20, n_ratings=500, rank=4,
    ...                    noise=0.5, item_skew=0.8, chunk_rows=128,
    ...                    order="hot_users", user_skew=1.0)
    >>> drawn_users(spec, 0, 5).shape
    (5,)
    """
    rng = np.random.default_rng([spec.seed, _STREAM_ROW_USERS, chunk_id, spec.draw])
    u = rng.random(n_rows)
    if spec.order == "shuffled":
        cdf = _user_activity_cdf(spec.seed, spec.n_users, spec.n_ratings)
        users: np.ndarray = np.minimum(
            np.searchsorted(cdf, u, side="right"), spec.n_users - 1
        ).astype(np.int64)
        return users
    ranks = _power_law_ranks(u, spec.n_users, spec.user_skew)
    sizes = np.array([spec.n_users], dtype=np.int64)
    step, shift = _popularity_order(spec.seed, _STREAM_USER_ORDER, sizes)
    return _place(ranks, step, shift, sizes)


def ratings_chunk(spec: RatingsSpec, chunk_id: int) -> dict[str, np.ndarray]:
    """Rows of one chunk of :func:`make_ratings`: ``user``, ``item`` (int64)
    and ``rating`` (float32).

    Items are drawn from ``default_rng([seed, stream, chunk_id])`` with a
    bounded Zipf-like popularity (exponent ``item_skew``), then the noise.

    Examples
    --------
    >>> spec = RatingsSpec(0, n_users=50, n_items=20, n_ratings=500, rank=4,
    ...                    noise=0.5, item_skew=0.8, chunk_rows=128)
    >>> rows = ratings_chunk(spec, 3)
    >>> rows["user"].shape, rows["rating"].dtype
    ((116,), dtype('float32'))
    """
    start = chunk_id * spec.chunk_rows
    stop = min(start + spec.chunk_rows, spec.n_ratings)
    if spec.order == "user":
        user = rating_users(spec.seed, spec.n_users, spec.n_ratings, start, stop)
    else:
        user = drawn_users(spec, chunk_id, stop - start)
    # draw=0 is the key [seed, stream, chunk_id] (numpy pads keys with zeros)
    rng = np.random.default_rng([spec.seed, _STREAM_RATING_CHUNK, chunk_id, spec.draw])
    ranks = _power_law_ranks(rng.random(stop - start), spec.n_items, spec.item_skew)
    sizes = np.array([spec.n_items], dtype=np.int64)
    step, shift = _popularity_order(spec.seed, _STREAM_ITEM_ORDER, sizes)
    item = _place(ranks, step, shift, sizes)
    noise = rng.standard_normal(stop - start)
    rating = expected_ratings(spec.seed, spec.rank, user, item) + spec.noise * noise
    return {"user": user, "item": item, "rating": rating.astype(np.float32)}


def write_ratings_chunk(ref: DatasetRef, chunk_id: int, spec: RatingsSpec) -> None:
    """Task: generate and write one chunk of :func:`make_ratings`."""
    for name, values in ratings_chunk(spec, chunk_id).items():
        write_chunk(ref, name, chunk_id, values)


def make_ratings(
    path: str | os.PathLike[str],
    *,
    n_users: int,
    n_items: int,
    n_ratings: int,
    rank: int = 8,
    noise: float = 0.5,
    item_skew: float = 0.8,
    order: str = "user",
    user_skew: float = 1.0,
    draw: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    codec: str = DEFAULT_CODEC,
    seed: int = 0,
    client: Client | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Dataset:
    """Generate an explicit-ratings dataset store on the cluster (for
    :class:`~dasktrain.models.MatrixFactorization`).

    The store has ``n_ratings`` rows with fields ``user``, ``item`` (int64)
    and ``rating`` (float32)::

        rating = 3.5 + b_u + b_i + p_u . q_i + noise * N(0, 1)

    The true factors (see :func:`rating_factors`) are normal, scaled so that
    the noiseless rating has variance about 1 (0.8 from ``p_u . q_i``, 0.1
    from each bias); each id's factors are computed from the seed when a
    chunk needs them, so tables of any size cost nothing up front.  The
    best possible RMSE (the noise floor) is ``noise``.

    With ``order="user"`` (the default) rows are **grouped by user**, in user
    order (see :func:`rating_users`): each chunk covers a contiguous range of
    user ids, so it touches few shards of the user table, like real rating
    logs sorted by user.  Users give a varying number of ratings around
    ``n_ratings / n_users``.  With ``order="shuffled"`` each row's user is
    drawn independently with the same expected activity (every chunk touches
    users all over the id space, like a shuffled log), and with
    ``order="hot_users"`` from a bounded Zipf-like popularity of exponent
    ``user_skew`` (a few hot users give a large share of the rows, spread
    over the id space; see :func:`drawn_users`).  Items
    follow a bounded Zipf-like popularity with exponent ``item_skew``, the
    popular ones spread over the id space.  Items are drawn with
    replacement: a user may rate an item twice (with independent noise).
    Each chunk's items and noise come from a generator seeded by ``(seed,
    chunk_id)``: the bytes do not depend on the number of workers.  Reuse,
    ``overwrite`` and errors are those of :func:`make_classification`.

    Parameters
    ----------
    path : str or os.PathLike
        Store to write (local path or fsspec URL reachable from the workers).
    n_users, n_items : int
        Id ranges: ``user`` in ``[0, n_users)``, ``item`` in ``[0, n_items)``
        (``n_items <= 2**32``).
    n_ratings : int
        Rows of the store.
    rank : int
        Width of the true embeddings.
    noise : float
        Standard deviation of the rating noise.
    item_skew : float
        Popularity exponent of items (0: uniform; 1: Zipf).
    order : {"user", "shuffled", "hot_users"}
        Row order (see above).
    user_skew : float
        Popularity exponent of users with ``order="hot_users"``.
    draw : int
        Which draw of rows: stores with the same seed and sizes but another
        ``draw`` share the true factors (and, in the grouped order, each
        user's rating count) and have independent items and noise (and, in
        the other orders, users).  Use one as a held-out set: a split by
        chunks of user-grouped rows holds out whole users, whose embeddings
        training never sees.
    chunk_rows, codec, seed, client, overwrite, progress, storage_options
        As in :func:`make_classification`.

    Returns
    -------
    Dataset
        Its provenance holds the parameters and, under ``"true_model"``, the
        recipe of the true factors (seed, rank, scales) and
        ``"noise_floor_rmse"``.

    Examples
    --------
    >>> import dasktrain as dt
    >>> ds = dt.datasets.make_ratings(
    ...     "data/ratings.zarr", n_users=1_000_000, n_items=100_000,
    ...     n_ratings=50_000_000, rank=16, noise=0.5,
    ... )  # doctest: +SKIP
    >>> model = dt.models.MatrixFactorization(
    ...     n_users=1_000_000, n_items=100_000, rank=16, l2=1e-2
    ... )  # doctest: +SKIP
    >>> ds.provenance["true_model"]["noise_floor_rmse"]  # doctest: +SKIP
    0.5
    """
    n_users = _check_int(n_users, "n_users", 1)
    n_items = _check_int(n_items, "n_items", 1)
    if n_items > MAX_IDS:
        raise ValueError(f"n_items must be <= {MAX_IDS}, got {n_items}")
    n_ratings = _check_int(n_ratings, "n_ratings", 1)
    rank = _check_int(rank, "rank", 1)
    noise = _check_noise(noise)
    item_skew = _check_exponent(item_skew, "item_skew")
    if order not in RATING_ORDERS:
        raise ValueError(f"order must be one of {RATING_ORDERS}, got {order!r}")
    user_skew = _check_exponent(user_skew, "user_skew")
    draw = _check_int(draw, "draw", 0)
    chunk_rows = check_chunk_rows(chunk_rows)
    codec = check_codec(codec)
    seed = _check_int(seed, "seed", 0)
    params: dict[str, Any] = {
        "name": "make_ratings",
        "version": GENERATOR_VERSION,
        "n_rows": n_ratings,
        "n_users": n_users,
        "n_items": n_items,
        "n_ratings": n_ratings,
        "rank": rank,
        "noise": noise,
        "item_skew": item_skew,
        "chunk_rows": chunk_rows,
        "codec": codec,
        "seed": seed,
    }
    if order != "user":  # grouped stores keep the parameters they always had
        params["order"] = order
        if order == "hot_users":
            params["user_skew"] = user_skew
    if draw:
        params["draw"] = draw

    def summarize(results: Sequence[Any]) -> dict[str, Any]:
        embedding_std, bias_std = _factor_scales(rank)
        return {
            "true_model": {
                "recipe": f"{__name__}.rating_factors",
                "seed": seed,
                "rank": rank,
                "mu": RATING_MEAN,
                "embedding_std": embedding_std,
                "bias_std": bias_std,
                "signal_variance": INTERACTION_VARIANCE + 2 * BIAS_VARIANCE,
                "noise": noise,
                "noise_floor_rmse": noise,
            }
        }

    return _generate(
        path,
        params=params,
        fields={
            "item": FieldInfo((), "int64"),
            "rating": FieldInfo((), "float32"),
            "user": FieldInfo((), "int64"),
        },
        task=write_ratings_chunk,
        spec=RatingsSpec(
            seed,
            n_users,
            n_items,
            n_ratings,
            rank,
            noise,
            item_skew,
            chunk_rows,
            order,
            user_skew,
            draw,
        ),
        client=client,
        overwrite=overwrite,
        progress=progress,
        summarize=summarize,
        storage_options=storage_options,
    )


# -- make_sparse_classification: truth and rows --------------------------------


def field_id_ranges(n_ids: int, n_fields: int) -> np.ndarray:
    """Boundaries of the id range of each field of
    :func:`make_sparse_classification`: field ``j`` draws its (unhashed) ids
    from ``[bounds[j], bounds[j + 1])``; the ranges split ``[0, n_ids)``
    evenly.

    Examples
    --------
    >>> field_id_ranges(10, 3).tolist()
    [0, 4, 7, 10]
    """
    n_fields = _check_int(n_fields, "n_fields", 1)
    n_ids = _check_int(n_ids, "n_ids", n_fields)
    sizes = np.full(n_fields, n_ids // n_fields, dtype=np.int64)
    sizes[: n_ids % n_fields] += 1
    bounds: np.ndarray = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return bounds


@functools.lru_cache(maxsize=8)
def sparse_classification_truth(
    seed: int, n_fields: int, with_values: bool
) -> tuple[float, float]:
    """``(weight_std, intercept)`` of the hidden model of
    :func:`make_sparse_classification`.

    The intercept is uniform in ``[-0.25, 0.25]``; the weights are normal
    with a standard deviation such that the logit ``z = sum_j v_j w[ids_j] +
    intercept`` (``v_j = 1`` without values) gives a Bayes accuracy of about
    0.9 at ``noise=1``, as in :func:`make_classification`.

    Examples
    --------
    >>> std, b = sparse_classification_truth(0, 8, False)
    >>> 0 < std < 10 and abs(b) <= 0.25
    True
    """
    rng = np.random.default_rng([seed, _STREAM_SPARSE_TRUTH, 0])
    intercept = rng.uniform(-INTERCEPT_RANGE, INTERCEPT_RANGE, size=1)
    logit_std = _calibrated_scale(np.ones((1, 1)), intercept, rng)
    mean_square_value = MAX_VALUE**2 / 3.0 if with_values else 1.0
    weight_std = logit_std / math.sqrt(n_fields * mean_square_value)
    return float(weight_std), float(intercept[0])


def sparse_classification_weights(
    seed: int, n_fields: int, with_values: bool, ids: np.ndarray
) -> np.ndarray:
    """True weights (float64, the shape of ``ids``) of the ids stored by
    :func:`make_sparse_classification` (hashed ids when ``hashed=True``):
    a pure function of ``(seed, id)`` times the ``weight_std`` of
    :func:`sparse_classification_truth`.

    Examples
    --------
    >>> sparse_classification_weights(0, 8, False, np.array([[1, 2], [2, 1]])).shape
    (2, 2)
    """
    ids = np.asarray(ids)
    weight_std, _ = sparse_classification_truth(seed, n_fields, with_values)
    key = _stream_key(seed, _STREAM_SPARSE_WEIGHTS)
    # Hashing every entry is cheaper than finding the distinct ids first.
    weights = weight_std * _hashed_normals(key, ids, 1)[:, 0]
    result: np.ndarray = weights.reshape(ids.shape)
    return result


def hash_ids(seed: int, ids: np.ndarray) -> np.ndarray:
    """The ids :func:`make_sparse_classification` stores with ``hashed=True``:
    a 63-bit hash of each unhashed id (non-negative int64).

    Examples
    --------
    >>> h = hash_ids(0, np.array([0, 1]))
    >>> h.dtype, bool((h >= 0).all())
    (dtype('int64'), True)
    """
    key = _stream_key(seed, _STREAM_ID_HASH)
    with np.errstate(over="ignore"):
        bits = _mix64(np.asarray(ids).astype(np.uint64) * _GOLDEN_GAMMA + key)
    return (bits >> np.uint64(1)).astype(np.int64)


@dataclass(frozen=True)
class SparseClassificationSpec:
    """What a worker needs to generate a chunk of
    :func:`make_sparse_classification`."""

    seed: int
    n_fields: int
    n_ids: int
    id_skew: float
    with_values: bool
    hashed: bool
    noise: float


def sparse_classification_chunk(
    spec: SparseClassificationSpec, chunk_id: int, n_rows: int
) -> dict[str, np.ndarray]:
    """Rows of one chunk of :func:`make_sparse_classification`: ``ids``
    (int64, ``(n_rows, n_fields)``), ``values`` (float32, same shape; only
    with ``with_values``) and ``y`` (int8).

    Examples
    --------
    >>> spec = SparseClassificationSpec(0, n_fields=3, n_ids=30, id_skew=1.0,
    ...                                 with_values=False, hashed=False, noise=1.0)
    >>> rows = sparse_classification_chunk(spec, 0, 5)
    >>> rows["ids"].shape, sorted(rows)
    ((5, 3), ['ids', 'y'])
    """
    rng = np.random.default_rng([spec.seed, _STREAM_SPARSE_CHUNK, chunk_id])
    bounds = field_id_ranges(spec.n_ids, spec.n_fields)
    sizes = np.diff(bounds)
    step, shift = _popularity_order(spec.seed, _STREAM_FIELD_ORDER, sizes)
    ranks = _power_law_ranks(
        rng.random((n_rows, spec.n_fields)), sizes[None, :], spec.id_skew
    )
    ids = bounds[:-1] + _place(ranks, step, shift, sizes)
    if spec.hashed:
        ids = hash_ids(spec.seed, ids)
    rows = {"ids": ids}
    weights = sparse_classification_weights(
        spec.seed, spec.n_fields, spec.with_values, ids
    )
    if spec.with_values:
        values = rng.uniform(0.0, MAX_VALUE, (n_rows, spec.n_fields))
        rows["values"] = values.astype(np.float32)
        weights = weights * rows["values"]
    _, intercept = sparse_classification_truth(
        spec.seed, spec.n_fields, spec.with_values
    )
    logits = weights.sum(axis=1) + intercept
    # y = 1[z + noise * Logistic > 0], i.e. Bernoulli(sigmoid(z / noise)).
    noisy = logits + spec.noise * rng.logistic(size=n_rows)
    rows["y"] = (noisy > 0).astype(np.int8)
    return rows


def write_sparse_classification_chunk(
    ref: DatasetRef, chunk_id: int, spec: SparseClassificationSpec
) -> list[int]:
    """Task: generate and write one chunk; returns its class counts."""
    rows = sparse_classification_chunk(spec, chunk_id, ref.chunk_n_rows(chunk_id))
    for name, values in rows.items():
        write_chunk(ref, name, chunk_id, values)
    return [int(c) for c in np.bincount(rows["y"], minlength=2)]


def make_sparse_classification(
    path: str | os.PathLike[str],
    *,
    n_rows: int,
    n_fields: int = 8,
    n_ids: int = 1_000_000,
    id_skew: float = 1.0,
    with_values: bool = False,
    hashed: bool = False,
    noise: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    codec: str = DEFAULT_CODEC,
    seed: int = 0,
    client: Client | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Dataset:
    """Generate a sparse (categorical) classification dataset store on the
    cluster (for :class:`~dasktrain.models.SparseLogisticRegression`).

    Each row has one id per field: ``ids`` (int64, ``(n_rows, n_fields)``).
    Field ``j`` draws from its own range of :func:`field_id_ranges` (the
    fields split ``[0, n_ids)``) with a bounded Zipf-like popularity of
    exponent ``id_skew``, the popular ids spread over the range.  With
    ``hashed=True`` the stored ids are 63-bit hashes of those (see
    :func:`hash_ids`), like hashed categorical features.  With
    ``with_values=True`` a ``values`` field (float32, uniform in ``[0, 2)``)
    weights each id.

    Labels ``y`` (int8) follow a hidden logistic model: with a weight per
    stored id (:func:`sparse_classification_weights`, computed from the seed
    for the ids a chunk uses) and an intercept,
    ``z = sum_j values_j * w[ids_j] + b`` and ``y = 1[z + noise * Logistic >
    0]``, i.e. Bernoulli ``sigmoid(z / noise)``; the Bayes accuracy is about
    0.9 at ``noise=1``.  Chunks are seeded by ``(seed, chunk_id)``: the bytes
    do not depend on the number of workers.  Reuse, ``overwrite`` and errors
    are those of :func:`make_classification`.

    Parameters
    ----------
    path : str or os.PathLike
        Store to write (local path or fsspec URL reachable from the workers).
    n_rows, n_fields : int
        Rows, and ids per row.
    n_ids : int
        Size of the (unhashed) id space, ``n_fields <= n_ids <= 2**32``.
    id_skew : float
        Popularity exponent within each field (0: uniform; 1: Zipf).
    with_values : bool
        Write a ``values`` field and use it in the hidden model.
    hashed : bool
        Store 63-bit hashes of the ids instead of ids in ``[0, n_ids)``.
    noise : float
        Temperature of the label noise.
    chunk_rows, codec, seed, client, overwrite, progress, storage_options
        As in :func:`make_classification`.

    Returns
    -------
    Dataset
        Its provenance holds the parameters, the class counts, the field
        ranges and the hidden model's ``weight_std`` and ``intercept``.

    Examples
    --------
    >>> import dasktrain as dt
    >>> ds = dt.datasets.make_sparse_classification(
    ...     "data/ctr.zarr", n_rows=10_000_000, n_fields=16, n_ids=2_000_000
    ... )  # doctest: +SKIP
    >>> model = dt.models.SparseLogisticRegression(n_buckets=2_000_000, l2=1e-6)
    ...     # doctest: +SKIP
    """
    n_rows = _check_int(n_rows, "n_rows", 1)
    n_fields = _check_int(n_fields, "n_fields", 1)
    n_ids = _check_int(n_ids, "n_ids", n_fields)
    if n_ids > MAX_IDS:
        raise ValueError(f"n_ids must be <= {MAX_IDS}, got {n_ids}")
    id_skew = _check_exponent(id_skew, "id_skew")
    for name, flag in (("with_values", with_values), ("hashed", hashed)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    noise = _check_noise(noise)
    chunk_rows = check_chunk_rows(chunk_rows)
    codec = check_codec(codec)
    seed = _check_int(seed, "seed", 0)
    params = {
        "name": "make_sparse_classification",
        "version": GENERATOR_VERSION,
        "n_rows": n_rows,
        "n_fields": n_fields,
        "n_ids": n_ids,
        "id_skew": id_skew,
        "with_values": with_values,
        "hashed": hashed,
        "noise": noise,
        "chunk_rows": chunk_rows,
        "codec": codec,
        "seed": seed,
    }
    fields = {
        "ids": FieldInfo((n_fields,), "int64"),
        "y": FieldInfo((), "int8"),
    }
    if with_values:
        fields["values"] = FieldInfo((n_fields,), "float32")

    def summarize(results: Sequence[Any]) -> dict[str, Any]:
        counts = np.sum(np.asarray(results, dtype=np.int64), axis=0)
        weight_std, intercept = sparse_classification_truth(seed, n_fields, with_values)
        return {
            "class_counts": counts.tolist(),
            "field_id_ranges": field_id_ranges(n_ids, n_fields).tolist(),
            "true_model": {
                "recipe": f"{__name__}.sparse_classification_weights",
                "seed": seed,
                "weight_std": weight_std,
                "intercept": intercept,
            },
        }

    return _generate(
        path,
        params=params,
        fields=fields,
        task=write_sparse_classification_chunk,
        spec=SparseClassificationSpec(
            seed, n_fields, n_ids, id_skew, with_values, hashed, noise
        ),
        client=client,
        overwrite=overwrite,
        progress=progress,
        summarize=summarize,
        storage_options=storage_options,
    )
