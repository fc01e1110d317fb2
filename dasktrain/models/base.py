"""The model interface.  Models are pure NumPy: no dask, no zarr.

A model is a small immutable object holding hyper-parameters.  It turns a
batch (field name -> rows) and parameters (name -> array) into a
:class:`~dasktrain.partial.Partial` of *sums* over the batch's rows.  The
trainer divides by the row count and adds :meth:`Model.penalty`.

Numerics: kernels compute in the dtype of the batch's ``X`` (float32 or
float64; the caller casts parameters to that dtype) and return float64 sums.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from dasktrain.partial import Partial
from dasktrain.schema import Schema

__all__ = ["Batch", "LabelProblem", "Model", "Params", "model_from_config", "register"]

Params = dict[str, np.ndarray]
Batch = Mapping[str, np.ndarray]
#: (row index within the batch, description of the problem)
LabelProblem = tuple[int, str]

_REGISTRY: dict[str, type[Model]] = {}


def register(cls: type[Model]) -> type[Model]:
    """Class decorator: make ``cls`` reconstructible by :func:`model_from_config`."""
    _REGISTRY[cls.kind] = cls
    return cls


def model_from_config(config: Mapping[str, Any]) -> Model:
    """Rebuild a model from :meth:`Model.config` output (JSON data, no code)."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in _REGISTRY:
        # Registered when their modules are imported: all of them are by the
        # package (``import dasktrain`` does not import it by itself).
        importlib.import_module("dasktrain.models")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown model type {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind].from_config(cfg)


class Model(ABC):
    """Base class of all models."""

    #: registry name, written to parameter stores
    kind: ClassVar[str]
    #: dataset fields the model reads
    fields: ClassVar[tuple[str, ...]] = ("X", "y")
    #: classifiers report accuracy and predict labels
    is_classifier: ClassVar[bool] = False
    #: part of the penalty is a sum over the batch's rows, reported in
    #: ``Partial.metrics["penalty"]`` (per-occurrence penalties of tables)
    batch_penalty: ClassVar[bool] = False

    # -- configuration -----------------------------------------------------
    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serializable hyper-parameters, with ``"type": self.kind``."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Model)
            and type(other) is type(self)
            and (other.config() == self.config())
        )

    def __hash__(self) -> int:
        return hash(repr(sorted(self.config().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"

    # -- data checks -------------------------------------------------------
    @abstractmethod
    def check_schema(self, schema: Schema) -> None:
        """Raise :class:`~dasktrain.errors.DataValidationError` if the dataset's
        fields cannot feed this model (missing field, wrong shape or dtype)."""

    @abstractmethod
    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        """First row of ``y`` whose label the model cannot use, or ``None``."""

    # -- maths -------------------------------------------------------------
    @abstractmethod
    def init(self, rng: np.random.Generator, schema: Schema) -> Params:
        """Initial parameters (float64) for data with this schema."""

    @abstractmethod
    def loss_and_grad(self, params: Params, batch: Batch) -> Partial:
        """Sums over the batch rows: data loss, gradient of it, row count,
        metrics (see :meth:`metric_names`)."""

    def loss_and_grad_many(
        self, params_list: Sequence[Params], batch: Batch
    ) -> list[Partial]:
        """:meth:`loss_and_grad` at several parameter sets over one batch.

        Used by line searches that try several step sizes in one pass over
        the data.  The default evaluates each set in turn (the batch is read
        once); models whose cost is dominated by reading the batch override it
        with one fused computation.
        """
        return [self.loss_and_grad(p, batch) for p in params_list]

    @abstractmethod
    def loss(self, params: Params, batch: Batch) -> Partial:
        """Like :meth:`loss_and_grad` with ``grads == {}`` (cheaper)."""

    @abstractmethod
    def penalty(self, params: Params) -> float:
        """Regularization term added to the *mean* data loss."""

    def l1_strengths(self) -> dict[str, float]:
        """L1 strength per parameter name, for the L1 part of :meth:`penalty`
        (``strength * sum(|param|)``); names not listed have none.  L-BFGS
        treats this part apart (OWL-QN)."""
        return {}

    @abstractmethod
    def penalty_grad(self, params: Params) -> Params:
        """Gradient of :meth:`penalty` (a subgradient for L1)."""

    @abstractmethod
    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Labels for classifiers, values for regressors."""

    def metric_names(self) -> tuple[str, ...]:
        """Keys of ``Partial.metrics`` this model reports."""
        return ()

    def summarize(self, partial: Partial) -> dict[str, float]:
        """Turn sums into means: ``{"loss": ..., "accuracy": ...}``."""
        return {"loss": partial.mean_loss()}
