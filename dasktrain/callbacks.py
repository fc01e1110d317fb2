"""Callbacks: hooks into :meth:`dasktrain.Trainer.fit`.

A callback receives the trainer and the history rows as they are logged.  It
may set ``trainer.stop_training = True`` to end the fit after the current
step (the store then holds that step's parameters).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dasktrain.history import History
    from dasktrain.trainer import Trainer

logger = logging.getLogger(__name__)

__all__ = ["Callback", "EarlyStopping", "ProgressBar"]


class Callback:
    """Base class; override the hooks you need."""

    def on_fit_begin(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None: ...

    def on_fit_end(self, trainer: Trainer, history: History) -> None: ...

    # Callbacks whose decisions must survive a resume store their state here
    # (JSON data); the trainer saves it with each committed version.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EarlyStopping(Callback):
    """Stop when a metric measured at epoch ends stops improving.

    Parameters
    ----------
    monitor:
        History column, e.g. ``"val_loss"`` (default) or ``"val_accuracy"``.
    patience:
        Epochs without improvement before stopping.
    min_delta:
        Smallest change that counts as an improvement.
    mode:
        ``"min"`` or ``"max"``; default: ``"max"`` for accuracy-like names,
        else ``"min"``.

    The best value and the epochs waited are saved in the parameter store, so
    a resumed run stops at the same epoch as an uninterrupted one.

    Examples
    --------
    >>> stop = EarlyStopping(monitor="val_loss", patience=2)
    >>> stop.mode
    'min'
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        patience: int = 3,
        min_delta: float = 0.0,
        mode: str | None = None,
    ) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        if mode is None:
            mode = "max" if any(s in monitor for s in ("accuracy", "r2")) else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode
        self.best: float | None = None
        self.wait = 0

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.monitor not in row:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r}, which the history does not "
                f"have at epoch ends (columns: {sorted(row)}); pass validation= to fit"
            )
        value = float(row[self.monitor])
        if not math.isfinite(value):
            return
        improved = self.best is None or (
            value < self.best - self.min_delta
            if self.mode == "min"
            else value > self.best + self.min_delta
        )
        if improved:
            self.best = value
            self.wait = 0
            return
        self.wait += 1
        if self.wait > self.patience:
            logger.info(
                "early stopping: %s did not improve on %.6g for %d epochs",
                self.monitor,
                self.best,
                self.wait,
            )
            trainer.stop_training = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.wait = int(state.get("wait", 0))


class ProgressBar(Callback):
    """A tqdm progress bar over the fit's steps (notebook-aware)."""

    def __init__(self, *, total_steps: int | None = None, initial: int = 0) -> None:
        self.total_steps = total_steps
        self.initial = initial
        self._bar: Any = None

    def on_fit_begin(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=self.total_steps,
            initial=self.initial,
            unit="step",
            desc="fit",
            leave=True,
        )

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        post = {"epoch": row.get("epoch"), "loss": f"{row.get('loss', math.nan):.4g}"}
        if "val_loss" in row:
            post["val_loss"] = f"{row['val_loss']:.4g}"
        post["rows/s"] = f"{row.get('rows_per_s', 0):.3g}"
        self._bar.set_postfix(post, refresh=False)

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        if self._bar is not None:
            if self._bar.total is not None and self._bar.n < self._bar.total:
                # Converged or stopped early: show the bar as complete.
                self._bar.total = self._bar.n
                self._bar.refresh()
            self._bar.close()
            self._bar = None
