"""Models: pure NumPy kernels turning parameters and a batch into sums.

Each model holds hyper-parameters only; :meth:`~Model.config` and
:func:`model_from_config` round-trip it through JSON data.
"""

from __future__ import annotations

from dasktrain.models.base import Model, model_from_config
from dasktrain.models.fm import FactorizationMachine
from dasktrain.models.glm import GammaRegression, PoissonRegression
from dasktrain.models.linear import (
    LinearRegression,
    LogisticRegression,
    SoftmaxRegression,
)
from dasktrain.models.mlp import MLP
from dasktrain.models.sparse import (
    MatrixFactorization,
    SparseLogisticRegression,
    SparseModel,
    TableSpec,
)

__all__ = [
    "MLP",
    "FactorizationMachine",
    "GammaRegression",
    "LinearRegression",
    "LogisticRegression",
    "MatrixFactorization",
    "Model",
    "PoissonRegression",
    "SoftmaxRegression",
    "SparseLogisticRegression",
    "SparseModel",
    "TableSpec",
    "model_from_config",
]
