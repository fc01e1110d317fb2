"""Serving without a cluster: a trained model from its parameter store, in
this process.

:func:`load_model` reads the committed version of a store (or a given kept
one) with plain zarr and returns a :class:`Predictor`: the model's NumPy
kernels over those parameters, with no Dask client.  It is meant for small
inputs (a request, a batch of a few thousand rows); for a whole dataset, use
``Trainer.predict`` or ``dasktrain predict``, which run on a cluster.

Models with sharded tables (``MatrixFactorization``,
``SparseLogisticRegression`` trained with ``sharded=True``) keep their tables
in the store: each call reads only the shards holding the rows it uses.

The functions :func:`apply_dense` and :func:`apply_table_rows` are the
computations ``Trainer.predict`` runs on NumPy input too, so both give the
same bits.

Examples
--------
>>> import numpy as np, dasktrain as dt
>>> model = dt.load_model("runs/example.zarr")  # doctest: +SKIP
>>> model.predict(np.zeros((2, 20), dtype="float32"))  # doctest: +SKIP
array([0, 0], dtype=int8)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dasktrain.errors import StoreError
from dasktrain.models.base import Model, model_from_config
from dasktrain.models.sparse import SparseModel
from dasktrain.params import ParamStore
from dasktrain.params.tables import ParamStoreRef, TableLayout, read_rows
from dasktrain.preprocessing import Standardize
from dasktrain.schema import Schema

__all__ = ["Predictor", "apply_dense", "apply_table_rows", "load_model"]

#: Ways of predicting a model may offer, beyond ``predict``.
OPTIONAL_KINDS = ("predict_proba", "decision_function")


def apply_dense(
    model: Model,
    params: Mapping[str, np.ndarray],
    n_features: int | None,
    kind: str,
    X: Any,
    *,
    standardize: Standardize | None = None,
) -> np.ndarray:
    """``model.<kind>(params, X)`` for a 2-d numeric array ``X`` (integers
    are computed as float64), after checking its shape against the
    ``n_features`` the model was trained on (``None``: not checked) and
    applying the run's ``standardize`` statistics, if any."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"X must be 2-d (rows, features), got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"X must be numeric, got dtype {arr.dtype}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(
            f"X has {arr.shape[1]} features, the model was trained on {n_features}"
        )
    if standardize is not None:
        arr = standardize.transform(arr)
    fn = getattr(model, kind)
    out: np.ndarray = fn(
        dict(params), arr if arr.dtype.kind == "f" else arr.astype(np.float64)
    )
    return out


def apply_table_rows(
    model: SparseModel,
    params: Mapping[str, np.ndarray],
    store: ParamStoreRef,
    step: int,
    layouts: Mapping[str, TableLayout],
    kind: str,
    X: Mapping[str, Any],
) -> np.ndarray:
    """``kind`` predictions of a model whose tables are sharded in version
    ``step`` of ``store``: reads the rows ``X`` uses, shard by shard."""
    batch = {f: np.asarray(X[f]) for f in model.input_fields if f in X}
    missing = [f for f in model.input_fields if f not in batch]
    if missing:
        raise ValueError(
            f"missing fields {missing}; {type(model).__name__} "
            f"needs {list(model.input_fields)}"
        )
    model._raise_bad_ids(batch)
    rows = {}
    for table, ids in model.row_ids(batch).items():
        uniq = np.unique(ids)
        rows[table] = (uniq, read_rows(store, step, layouts[table], uniq))
    return model.predict_rows(dict(params), rows, batch, kind)


class Predictor:
    """A trained model served in this process (see :func:`load_model`).

    Attributes
    ----------
    model : Model
        The model, rebuilt from the store's configuration.
    params : dict of str to numpy.ndarray
        Its dense parameters (tables kept in shards stay in the store).
    step : int
        The version the parameters come from.
    store : str
        The store's path or URL.
    """

    def __init__(
        self,
        model: Model,
        params: Mapping[str, np.ndarray],
        *,
        step: int,
        store: ParamStoreRef,
        schema: Schema | None,
        tables: Mapping[str, TableLayout],
        standardize: Standardize | None = None,
    ) -> None:
        self.model = model
        self.params = dict(params)
        self.step = step
        self._store = store
        self._schema = schema
        self._tables = dict(tables)
        #: The run's standardization of ``X`` (applied before the model).
        self.standardize = standardize

    @property
    def store(self) -> str:
        return self._store.url

    @property
    def n_features(self) -> int | None:
        """Features of ``X`` for dense models (``None`` for table models)."""
        if isinstance(self.model, SparseModel) or self._schema is None:
            return None
        return self._schema.n_features

    def __repr__(self) -> str:
        return f"Predictor({self.model!r}, store={self.store!r}, step={self.step})"

    def _apply(self, kind: str, X: Any) -> np.ndarray:
        model = self.model
        if isinstance(model, SparseModel):
            if not isinstance(X, Mapping):
                raise TypeError(
                    f"{type(model).__name__} predicts from a mapping of fields "
                    f"{list(model.input_fields)} to arrays, got {type(X).__name__}"
                )
            if self._tables:
                return apply_table_rows(
                    model, self.params, self._store, self.step, self._tables, kind, X
                )
            out: np.ndarray = getattr(model, kind)(dict(self.params), X)
            return out
        return apply_dense(
            model, self.params, self.n_features, kind, X, standardize=self.standardize
        )

    def predict(self, X: Any) -> np.ndarray:
        """Predictions (labels for classifiers) for ``X``: a 2-d array of
        rows, or for table models a mapping of their input fields to arrays."""
        return self._apply("predict", X)

    def _optional(self, kind: str) -> Callable[[Any], np.ndarray]:
        if not hasattr(self.model, kind):
            raise AttributeError(f"{type(self.model).__name__} has no {kind}")
        return functools.partial(self._apply, kind)

    @property
    def predict_proba(self) -> Callable[[Any], np.ndarray]:
        """Class probabilities (classifiers only; ``AttributeError``
        otherwise, so ``hasattr`` tells)."""
        return self._optional("predict_proba")

    @property
    def decision_function(self) -> Callable[[Any], np.ndarray]:
        """Raw scores before the link (models that have them)."""
        return self._optional("decision_function")


def load_model(
    store: str | os.PathLike[str],
    *,
    step: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Predictor:
    """The model trained in ``store``, for predictions in this process.

    Parameters
    ----------
    store : str or path-like
        A parameter store (local path or fsspec URL) written by a
        :class:`~dasktrain.Trainer`.
    step : int, optional
        A kept version (default: the committed one).
    storage_options : dict, optional
        fsspec options of a remote store (credentials, endpoint...).

    Returns
    -------
    Predictor
        With ``predict(X)``, and ``predict_proba(X)`` /
        ``decision_function(X)`` where the model has them.

    Raises
    ------
    StoreNotFoundError, StoreError
        No store at ``store``, nothing committed yet, or a store that does
        not describe a model (the message names the store).
    """
    ps = ParamStore.open(store, storage_options=storage_options)
    if ps.committed is None:
        raise StoreError(
            f"parameter store {ps.path} has no committed version yet: its run has "
            f"not trained a step (continue it with Trainer.resume)"
        )
    version = ps.read(step)
    meta = ps.meta
    try:
        model = model_from_config(meta["model"])
        schema = Schema.from_json(meta["schema"]) if "schema" in meta else None
        stored = meta.get("preprocessing", {}).get("standardize")
        standardize = None if stored is None else Standardize.from_config(stored)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(
            f"parameter store {ps.path} does not describe a model: {exc!r}"
        ) from exc
    return Predictor(
        model,
        {k: np.asarray(v) for k, v in version.params.items()},
        step=version.step,
        store=ps.ref,
        schema=schema,
        tables=ps.table_layouts(version.step),
        standardize=standardize
        if standardize is not None and standardize.fitted
        else None,
    )
