"""Optimizers (pure NumPy): optax-like ``(init, update)`` pairs, schedules, L-BFGS.

Step-by-step optimizers (:class:`SGD`, :class:`Adam`, :class:`AdamW`,
:class:`Adagrad`) are chains of gradient transformations with explicit flat
state; :class:`LBFGS` and :class:`Newton` are driven by the trainer over full
passes.

Examples
--------
>>> import numpy as np
>>> import dasktrain.optim as optim
>>> opt = optim.Adam(learning_rate=optim.CosineDecay(0.1, decay_steps=100))
>>> optim.optimizer_from_config(opt.config()) == opt
True
"""

from __future__ import annotations

from dasktrain.optim.base import (
    Optimizer,
    OptState,
    Params,
    advance_counts,
    apply_updates,
    is_count,
    optimizer_from_config,
)
from dasktrain.optim.lbfgs import (
    LBFGS,
    IterationInfo,
    LineSearchResult,
    MinimizeResult,
    WolfeLineSearch,
    minimize_lbfgs,
    two_loop_direction,
)
from dasktrain.optim.newton import Newton, NewtonRun, minimize_newton
from dasktrain.optim.optimizers import SGD, Adagrad, Adam, AdamW, decays_weight
from dasktrain.optim.schedules import (
    Constant,
    CosineDecay,
    ExponentialDecay,
    Schedule,
    StepDecay,
    WarmupCosine,
    as_schedule,
    schedule_from_config,
)
from dasktrain.optim.transforms import (
    GradientTransformation,
    add_decayed_weights,
    chain,
    clip_by_global_norm,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rss,
    trace,
)

__all__ = [
    "LBFGS",
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Constant",
    "CosineDecay",
    "ExponentialDecay",
    "GradientTransformation",
    "IterationInfo",
    "LineSearchResult",
    "MinimizeResult",
    "Newton",
    "NewtonRun",
    "OptState",
    "Optimizer",
    "Params",
    "Schedule",
    "StepDecay",
    "WarmupCosine",
    "WolfeLineSearch",
    "add_decayed_weights",
    "advance_counts",
    "apply_updates",
    "as_schedule",
    "chain",
    "clip_by_global_norm",
    "decays_weight",
    "is_count",
    "minimize_lbfgs",
    "minimize_newton",
    "optimizer_from_config",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rss",
    "schedule_from_config",
    "trace",
    "two_loop_direction",
]
