"""Training history: one row per optimizer step."""

from __future__ import annotations

import html
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMNS", "History"]

#: Columns every row has (others, e.g. ``val_loss``, appear when measured).
COLUMNS = (
    "step",
    "epoch",
    "loss",
    "objective",
    "grad_norm",
    "learning_rate",
    "rows",
    "rows_per_s",
    "seconds",
)


class History:
    """The rows logged by :meth:`dasktrain.Trainer.fit`.

    Each row is a dict with at least :data:`COLUMNS`: ``step`` (1-based count
    of optimizer steps in the whole run), ``epoch`` (1-based epoch the step
    belongs to), ``loss`` (mean data loss of the step's batch, at the
    parameters before the step), ``objective`` (``loss`` plus the
    regularization term), ``grad_norm`` (norm of the objective's gradient),
    ``learning_rate``, ``rows``, ``rows_per_s`` and ``seconds`` (wall time of
    the step).  Rows at the end of an epoch with validation data also hold
    ``val_loss`` and the model's other validation metrics (``val_accuracy``...).

    With :class:`~dasktrain.optim.LBFGS` a row is an accepted iteration (one
    epoch): ``loss``, ``objective`` and ``grad_norm`` are those of the accepted
    point, ``learning_rate`` is the line search's step length, ``evals`` the
    number of full passes it took and ``rows`` the rows they read.

    Examples
    --------
    >>> h = History([{"step": 1, "epoch": 1, "loss": 0.69}])
    >>> h.to_pandas()["loss"].tolist()
    [0.69]
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]] = ()) -> None:
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]

    def append(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    @property
    def last(self) -> dict[str, Any] | None:
        return self.rows[-1] if self.rows else None

    def column(self, name: str) -> list[float]:
        return [float(r.get(name, math.nan)) for r in self.rows]

    def to_pandas(self) -> pd.DataFrame:
        """One row per step, indexed 0..n-1."""
        import pandas as pd

        columns = list(COLUMNS)
        for r in self.rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
        return pd.DataFrame(self.rows, columns=columns)

    def plot(
        self, columns: Sequence[str] = ("loss", "val_loss"), *, ax: Any = None
    ) -> Any:
        """Plot columns against ``step`` with matplotlib; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        steps = self.column("step")
        for name in columns:
            pts = [
                (s, r[name]) for s, r in zip(steps, self.rows, strict=True) if name in r
            ]
            pts = [(s, v) for s, v in pts if v is not None and math.isfinite(float(v))]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="." if len(pts) < 50 else None, label=name)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
        return ax

    def __repr__(self) -> str:
        last = self.last
        if last is None:
            return "History(0 steps)"
        return (
            f"History({len(self)} steps, epoch {last.get('epoch')}, "
            f"loss {float(last.get('loss', math.nan)):.6g})"
        )

    def _repr_html_(self) -> str:
        head = self.to_pandas().tail(10)
        return f"<b>{html.escape(repr(self))}</b>" + head.to_html(
            index=False, float_format=lambda v: f"{v:.6g}"
        )
