"""A multi-layer perceptron with a squared, logistic or softmax loss.

Pure NumPy: no dask, no zarr.  The output layer feeds the same loss heads as
the linear models (:mod:`dasktrain.models.linear`).
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from dasktrain.models.base import Batch, LabelProblem, Model, Params, register
from dasktrain.models.linear import (
    Head,
    as_features,
    check_binary_labels,
    check_class_labels,
    check_features,
    check_finite_labels,
    check_targets,
    classification_summary,
    integer_at_least,
    logistic_head,
    nonnegative_float,
    regression_metric_names,
    regression_summary,
    sigmoid_columns,
    softmax_head,
    softmax_rows,
    squared_head,
    to_float64,
    weight_penalty,
    weight_penalty_grad,
)
from dasktrain.partial import Partial
from dasktrain.schema import Schema

__all__ = ["MLP"]

logger = logging.getLogger(__name__)

#: accepted values of ``MLP(loss=...)``
LOSSES = ("squared", "logistic", "softmax")
#: accepted values of ``MLP(activation=...)``
ACTIVATIONS = ("relu", "tanh")


def _layer_sizes(hidden: object) -> tuple[int, ...]:
    if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence):
        raise ValueError(f"hidden must be a sequence of layer widths, got {hidden!r}")
    if len(hidden) == 0:
        raise ValueError(
            "hidden must name at least one layer width (for no hidden layer use "
            "LinearRegression, LogisticRegression or SoftmaxRegression)"
        )
    return tuple(integer_at_least("hidden", width, 1) for width in hidden)


@register
class MLP(Model):
    """Fully connected network: hidden layers with an activation, linear output.

    With ``a_0 = x``, ``a_{i+1} = act(a_i @ w_i + b_i)`` for the hidden layers
    and ``out = a_L @ w_L + b_L`` (``n_outputs`` values), minimizes::

        mean_rows loss(out, y) + (l2 / 2) * sum_i ||w_i||^2

    where ``loss`` is one of

    * ``"squared"``: ``0.5 * sum_j (out_j - y_j)**2``; ``y`` has shape ``(n,)``
      if ``n_outputs == 1``, else ``(n, n_outputs)``;
    * ``"logistic"``: ``log(1 + exp(-(2y - 1) * out))`` with ``y`` in
      ``{0, 1}`` (``n_outputs`` must be 1);
    * ``"softmax"``: ``logsumexp(out) - out[y]`` with class ids ``y`` in
      ``[0, n_outputs)`` (``n_outputs`` is the number of classes, >= 2).

    Biases are not penalized.  Parameters are ``"w0", "b0", "w1", "b1", ...``;
    ``w_i`` has shape ``(fan_in, fan_out)``.

    Parameters
    ----------
    hidden : sequence of int, default (64,)
        Widths of the hidden layers (at least one, each >= 1).
    n_outputs : int, default 1
        Width of the output layer.
    loss : {"squared", "logistic", "softmax"}, default "squared"
        Per-row loss of the output.
    activation : {"relu", "tanh"}, default "relu"
        Activation of the hidden layers.
    l2 : float, default 0.0
        L2 penalty strength on the weights (>= 0).

    Notes
    -----
    :meth:`init` draws hidden weights He-normal (relu) or Glorot-normal (tanh)
    and output weights Glorot-normal; biases start at zero.  Metrics and
    :meth:`summarize` are those of the matching linear model
    (:class:`~dasktrain.models.LinearRegression` for ``"squared"``, with
    per-target sums suffixed ``_0``, ``_1``, ... when ``n_outputs > 1``).

    Examples
    --------
    >>> import numpy as np
    >>> from dasktrain.schema import FieldInfo, Schema
    >>> schema = Schema({"X": FieldInfo((3,), "float32"), "y": FieldInfo((), "int64")})
    >>> model = MLP(hidden=(8,), n_outputs=4, loss="softmax")
    >>> params = model.init(np.random.default_rng(0), schema)
    >>> [(name, value.shape) for name, value in params.items()]
    [('w0', (3, 8)), ('b0', (8,)), ('w1', (8, 4)), ('b1', (4,))]
    >>> batch = {"X": np.ones((5, 3), dtype=np.float32), "y": np.arange(5) % 4}
    >>> part = model.loss_and_grad(params, batch)
    >>> part.n_rows, part.grads["w0"].dtype
    (5, dtype('float64'))
    >>> model.predict(params, batch["X"]).shape
    (5,)
    """

    kind: ClassVar[str] = "MLP"

    def __init__(
        self,
        hidden: Sequence[int] = (64,),
        n_outputs: int = 1,
        *,
        loss: str = "squared",
        activation: str = "relu",
        l2: float = 0.0,
    ) -> None:
        self._hidden = _layer_sizes(hidden)
        self._n_outputs = integer_at_least("n_outputs", n_outputs, 1)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        if loss == "logistic" and self._n_outputs != 1:
            raise ValueError(
                f"n_outputs must be 1 for loss='logistic', got {n_outputs!r}"
            )
        if loss == "softmax" and self._n_outputs < 2:
            raise ValueError(
                "n_outputs must be the number of classes (>= 2) for loss='softmax', "
                f"got {n_outputs!r}"
            )
        self._loss = loss
        self._activation = activation
        self._l2 = nonnegative_float("l2", l2)

    # -- hyper-parameters ------------------------------------------------------
    @property
    def hidden(self) -> tuple[int, ...]:
        """Widths of the hidden layers."""
        return self._hidden

    @property
    def n_outputs(self) -> int:
        """Width of the output layer."""
        return self._n_outputs

    @property
    def loss_name(self) -> str:
        """The per-row loss: ``"squared"``, ``"logistic"`` or ``"softmax"``."""
        return self._loss

    @property
    def activation(self) -> str:
        """Activation of the hidden layers: ``"relu"`` or ``"tanh"``."""
        return self._activation

    @property
    def l2(self) -> float:
        """L2 penalty strength on the weights."""
        return self._l2

    @property
    def is_classifier(self) -> bool:  # type: ignore[override]
        """``True`` for the logistic and softmax losses."""
        return self._loss != "squared"

    def config(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "hidden": list(self._hidden),
            "n_outputs": self._n_outputs,
            "loss": self._loss,
            "activation": self._activation,
            "l2": self._l2,
        }

    def param_names(self) -> tuple[str, ...]:
        """``("w0", "b0", "w1", "b1", ...)`` in layer order."""
        return tuple(f"{p}{i}" for i in range(len(self._hidden) + 1) for p in "wb")

    @property
    def _owner(self) -> str:
        return f"{self.kind}(loss={self._loss!r}, n_outputs={self._n_outputs})"

    # -- data checks -----------------------------------------------------------
    def check_schema(self, schema: Schema) -> None:
        check_features(schema, self._owner)
        multi_target = self._loss == "squared" and self._n_outputs > 1
        check_targets(schema, self._owner, (self._n_outputs,) if multi_target else ())

    def check_labels(self, y: np.ndarray) -> LabelProblem | None:
        if self._loss == "logistic":
            return check_binary_labels(y, self._owner)
        if self._loss == "softmax":
            return check_class_labels(y, self._n_outputs, self._owner)
        return check_finite_labels(y, self._owner)

    # -- maths -----------------------------------------------------------------
    def init(self, rng: np.random.Generator, schema: Schema) -> Params:
        """He-normal (relu) or Glorot-normal (tanh) hidden weights,
        Glorot-normal output weights, zero biases; float64."""
        self.check_schema(schema)
        sizes = (schema.n_features, *self._hidden, self._n_outputs)
        params: Params = {}
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            if i < len(self._hidden) and self._activation == "relu":
                std = math.sqrt(2.0 / fan_in)
            else:
                std = math.sqrt(2.0 / (fan_in + fan_out))
            params[f"w{i}"] = rng.standard_normal((fan_in, fan_out)) * std
            params[f"b{i}"] = np.zeros(fan_out)
        logger.debug("%s: init layer sizes %s", self._owner, sizes)
        return params

    def _forward(
        self, params: Params, X: np.ndarray, *, keep: bool
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Output ``(n, n_outputs)`` in ``X``'s dtype, and the layer inputs
        ``[X, a_1, ..., a_L]`` when ``keep`` (else ``[X]``)."""
        dtype = X.dtype
        inputs = [X]
        a = X
        for i in range(len(self._hidden)):
            h = a @ np.asarray(params[f"w{i}"], dtype=dtype)
            h += np.asarray(params[f"b{i}"], dtype=dtype)
            if self._activation == "relu":
                np.maximum(h, 0, out=h)
            else:
                np.tanh(h, out=h)
            if keep:
                inputs.append(h)
            a = h
        last = len(self._hidden)
        out = a @ np.asarray(params[f"w{last}"], dtype=dtype)
        out += np.asarray(params[f"b{last}"], dtype=dtype)
        return inputs, out

    def _head(self, out: np.ndarray, y: np.ndarray, *, need_grad: bool) -> Head:
        if self._loss == "softmax":
            return softmax_head(out, y, need_grad=need_grad)
        if self._loss == "logistic":
            return logistic_head(out[:, 0], y, need_grad=need_grad)
        z = out[:, 0] if self._n_outputs == 1 else out
        return squared_head(z, y, need_grad=need_grad)

    def _backward(
        self, params: Params, inputs: list[np.ndarray], delta: np.ndarray
    ) -> Params:
        """Gradient sums from the output gradient ``delta`` (``(n, n_outputs)``);
        overwrites the hidden activations in ``inputs``.

        Products and their sums over the batch's rows run through BLAS in the
        data's dtype (``a.T @ delta`` for weights, ``ones @ delta`` for biases);
        the results are float64.
        """
        dtype = delta.dtype
        ones = np.ones(delta.shape[0], dtype=dtype)
        grads: Params = {}
        for i in reversed(range(len(inputs))):
            a = inputs[i]
            grads[f"w{i}"] = to_float64(a.T @ delta)
            grads[f"b{i}"] = to_float64(np.asarray(ones @ delta))
            if i == 0:
                break
            w = np.asarray(params[f"w{i}"], dtype=dtype)
            # With one output column this is an outer product: broadcasting
            # beats a matrix product of inner dimension 1 several times.
            delta = delta * w[:, 0] if delta.shape[1] == 1 else delta @ w.T
            if self._activation == "relu":
                # relu'(h) = (a > 0) from a = relu(h)
                np.multiply(delta, a > 0, out=delta)
            else:
                np.square(a, out=a)
                np.subtract(1, a, out=a)  # tanh'(h) = 1 - a**2
                delta *= a
        return {name: grads[name] for name in self.param_names()}

    def _evaluate(self, params: Params, batch: Batch, *, need_grad: bool) -> Partial:
        X = as_features(batch["X"])
        n_rows = int(X.shape[0])
        inputs, out = self._forward(params, X, keep=need_grad)
        head = self._head(out, np.asarray(batch["y"]), need_grad=need_grad)
        grads: Params = {}
        if head.dz is not None:
            delta = head.dz.reshape(n_rows, self._n_outputs)
            grads = self._backward(params, inputs, delta)
        return Partial(head.loss_sum, grads, n_rows, head.metrics)

    def loss_and_grad(self, params: Params, batch: Batch) -> Partial:
        return self._evaluate(params, batch, need_grad=True)

    def loss(self, params: Params, batch: Batch) -> Partial:
        return self._evaluate(params, batch, need_grad=False)

    def penalty(self, params: Params) -> float:
        return sum(
            weight_penalty(params[f"w{i}"], l2=self._l2, l1=0.0)
            for i in range(len(self._hidden) + 1)
        )

    def penalty_grad(self, params: Params) -> Params:
        grads: Params = {}
        for name in self.param_names():
            if name.startswith("w"):
                grads[name] = weight_penalty_grad(params[name], l2=self._l2, l1=0.0)
            else:
                grads[name] = np.zeros(np.shape(params[name]))
        return grads

    def decision_function(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Raw network output: ``(n,)`` if ``n_outputs == 1`` else
        ``(n, n_outputs)``; float32 for float32 (or smaller) ``X``."""
        _, out = self._forward(params, as_features(X), keep=False)
        return out[:, 0] if self._n_outputs == 1 else out

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Values for ``"squared"`` (as :meth:`decision_function`), int64
        labels for ``"logistic"`` and ``"softmax"``."""
        out = self.decision_function(params, X)
        if self._loss == "logistic":
            return (out > 0).astype(np.int64)
        if self._loss == "softmax":
            return out.argmax(axis=1).astype(np.int64)
        return out

    def predict_proba(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Class probabilities: ``(n, 2)`` for ``"logistic"``, ``(n, n_outputs)``
        for ``"softmax"``."""
        if self._loss == "squared":
            raise ValueError(f"{self._owner} is a regressor: it has no predict_proba")
        out = self.decision_function(params, X)
        return sigmoid_columns(out) if self._loss == "logistic" else softmax_rows(out)

    def metric_names(self) -> tuple[str, ...]:
        if self._loss == "squared":
            return regression_metric_names(self._n_outputs)
        return ("correct",)

    def summarize(self, partial: Partial) -> dict[str, float]:
        if self._loss == "squared":
            return regression_summary(partial, self._n_outputs)
        return classification_summary(partial)
