"""A live "dasktrain" page on the Dask dashboard.

The trainer logs one event per optimizer step to the scheduler's event log
under the topic ``"dasktrain"`` (``{"store": path, **history_row}``).  This
module turns those events into a Bokeh page served by the scheduler at
``/individual-dasktrain``: loss and validation loss per step (one line per
run), rows per second, step time and worker cache hit rate, under a header
naming the current run.  At each epoch's end the trainer also logs the
workers' memory budgets, one row per worker, under the topic
``"dasktrain-memory"``; the page shows the current run's latest as a table.

The page reaches a scheduler in two ways, so that it is served wherever a
trainer runs, without any set-up:

- ``import dasktrain`` registers it with
  ``distributed.dashboard.scheduler.applications``, the table a scheduler
  builds its dashboard from when its HTTP server starts.  Bokeh is not
  imported for this: if distributed's dashboard module is not imported yet,
  the page is added the moment it is (which a scheduler does only when it
  starts a dashboard).  So an in-process ``LocalCluster`` created after
  ``import dasktrain`` serves the page.
- A :class:`~dasktrain.Trainer` registers :class:`DashboardPagePlugin` on
  its scheduler.  On a scheduler whose dashboard runs without the page (one
  started by ``dask scheduler`` with no preload, or a cluster created
  before ``import dasktrain``), the plugin adds the page to the running
  Bokeh server (:func:`install_page`).

The page is then served, listed in ``/individual-plots.json`` (the buttons of
the JupyterLab Dask extension) and in the dashboard's "More..." menu.
``dask scheduler --preload dasktrain.dashboard`` still works, and serves the
page before any trainer connects.

Examples
--------
>>> from dasktrain.monitor.dashboard import APP_PATH, dashboard_data
>>> APP_PATH
'/individual-dasktrain'
>>> data = dashboard_data([(0.0, {"store": "runs/a.zarr", "step": 1, "loss": 0.7})])
>>> data.current["step"], data.sources["loss"]["ys"]
(1, [[0.7]])
"""

from __future__ import annotations

import contextlib
import functools
import html
import importlib.abc
import importlib.machinery
import logging
import math
import os
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

from distributed.diagnostics.plugin import SchedulerPlugin

from dasktrain.monitor.topics import BATCH_KEY, EVENT_TOPIC, MEMORY_TOPIC, address_order

logger = logging.getLogger(__name__)

__all__ = [
    "APP_PATH",
    "EVENT_TOPIC",
    "MEMORY_COLUMNS",
    "MEMORY_TOPIC",
    "DashboardData",
    "DashboardPagePlugin",
    "MemoryTable",
    "RunSeries",
    "dashboard_data",
    "dasktrain_doc",
    "ensure_page",
    "header_html",
    "install_page",
    "memory_html",
    "memory_table",
    "register",
]

#: Where the scheduler serves the page.  The ``individual-`` prefix is what
#: lists it in ``/individual-plots.json`` and the "More..." menu.
APP_PATH = "/individual-dasktrain"
#: The module of distributed that holds the dashboard's applications (and
#: imports Bokeh).
DASHBOARD_MODULE = "distributed.dashboard.scheduler"
#: Name of the page in the dashboard's "More..." menu.
MENU_NAME = "Dasktrain"
#: How often an open page re-reads the scheduler's event log.
UPDATE_INTERVAL_MS = 500
#: Height of the per-worker memory table before it scrolls.
MEMORY_TABLE_MAX_HEIGHT_PX = 200
#: Lines drawn at most: the runs with the most recent events.
MAX_RUNS = 10
#: One colour per run, assigned in order of first appearance.
RUN_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
#: Per-step fields of the trainer's history rows drawn as one line per run.
STEP_METRICS = (
    "loss",
    "rows_per_s",
    "seconds",
    "cache_hit_rate",
    "shard_bytes_read",
    "shard_bytes_written",
)
WAITING_TEXT = (
    "<b>dasktrain</b>: waiting for a fit. No <code>dasktrain</code> events on "
    "this scheduler yet; a <code>Trainer.fit</code> with a client connected to "
    "this scheduler logs one per step."
)


# --------------------------------------------------------------------------
# Events -> column data (pure Python: no Bokeh, no scheduler)
# --------------------------------------------------------------------------


@dataclass
class RunSeries:
    """The per-step metrics of one run, in event order.

    A run is a stretch of events with the same ``store`` and increasing
    steps; a store whose step goes back (a rerun from scratch, or steps
    redone after a crash) starts a new run.
    """

    store: str
    label: str
    color: str
    last_time: float = 0.0
    steps: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(
        default_factory=lambda: {name: [] for name in STEP_METRICS}
    )
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    #: The workers' memory budgets as the latest epoch-end row gave them.
    memory: dict[str, Any] = field(default_factory=dict)
    #: Time of the run's first event.
    first_time: float = math.nan


@dataclass(frozen=True)
class DashboardData:
    """What the page shows, computed from the event log.

    Attributes
    ----------
    runs : list of RunSeries
        The runs drawn (at most :data:`MAX_RUNS`, oldest first).
    sources : dict
        Column data of the page's Bokeh data sources, by source name:
        ``"loss"``, ``"val_loss"``, ``"rows_per_s"``, ``"seconds"``,
        ``"cache_hit_rate"`` (multi-line columns ``xs``, ``ys``, ``color``,
        ``label``, ``store``) and ``"val_points"`` (flat columns ``step``,
        ``val_loss``, ``color``, ``label``, ``store``).
    current : dict or None
        The last event (the current run's latest row), ``None`` before any.
    n_events : int
        Number of events read.
    memory : MemoryTable or None
        The current run's latest per-worker memory table (an epoch's end),
        ``None`` before its first.
    """

    runs: list[RunSeries]
    sources: dict[str, dict[str, list[Any]]]
    current: dict[str, Any] | None
    n_events: int
    memory: MemoryTable | None = None


def _number(value: Any) -> float:
    """A float for plotting; NaN for anything missing or non-numeric."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _short_name(store: str) -> str:
    name = os.path.basename(store.rstrip("/")) or store
    return name or "?"


def _rows_of(events: Iterable[tuple[float, Any]]) -> Iterable[tuple[float, Any]]:
    """One ``(timestamp, row)`` per step: events hold one row (logged by the
    client) or a batch of them under ``"step_rows"`` (logged by a segment's
    leader)."""
    for timestamp, msg in events:
        if isinstance(msg, Mapping) and isinstance(msg.get(BATCH_KEY), (list, tuple)):
            store = msg.get("store", "?")
            for row in msg[BATCH_KEY]:
                if isinstance(row, Mapping):
                    yield timestamp, {"store": store, **row}
        else:
            yield timestamp, msg


def _rewind(run: RunSeries, step: int) -> None:
    """Drop the points of ``run`` at ``step`` and later."""
    keep = sum(1 for s in run.steps if s < step)
    del run.steps[keep:]
    for values in run.metrics.values():
        del values[keep:]
    kept_val = sum(1 for s in run.val_steps if s < step)
    del run.val_steps[kept_val:]
    del run.val_loss[kept_val:]


def _runs_from_events(
    events: Iterable[tuple[float, Any]],
) -> tuple[list[RunSeries], int]:
    runs: list[RunSeries] = []
    open_runs: dict[str, RunSeries] = {}
    runs_per_store: dict[str, int] = {}
    n_events = 0
    for timestamp, msg in _rows_of(events):
        if not isinstance(msg, Mapping) or "step" not in msg:
            continue
        try:
            step = int(msg["step"])
        except (TypeError, ValueError):
            continue
        n_events += 1
        store = str(msg.get("store", "?"))
        run = open_runs.get(store)
        if run is not None and run.steps and run.steps[0] < step <= run.steps[-1]:
            # A segment run again after a lost worker (or a resume from an
            # earlier checkpoint) sends its steps again: rewind the series.
            _rewind(run, step)
        if run is None or (run.steps and step <= run.steps[-1]):
            k = runs_per_store.get(store, 0) + 1
            runs_per_store[store] = k
            label = _short_name(store) + (f" (run {k})" if k > 1 else "")
            run = RunSeries(
                store=store, label=label, color=RUN_COLORS[len(runs) % len(RUN_COLORS)]
            )
            runs.append(run)
            open_runs[store] = run
            run.first_time = _number(timestamp)
        run.last_time = _number(timestamp)
        run.steps.append(step)
        for name in STEP_METRICS:
            run.metrics[name].append(_number(msg.get(name)))
        if "val_loss" in msg:
            run.val_steps.append(step)
            run.val_loss.append(_number(msg["val_loss"]))
        run.last = dict(msg)
        run.memory.update({k: msg[k] for k in MEMORY_KEYS if k in msg})
    return runs, n_events


def dashboard_data(
    events: Iterable[tuple[float, Any]],
    memory_events: Iterable[tuple[float, Any]] = (),
) -> DashboardData:
    """Turn ``"dasktrain"`` events into the page's column data.

    Parameters
    ----------
    events : iterable of (timestamp, message)
        Events of the ``"dasktrain"`` topic, oldest first, as returned by
        ``Scheduler.get_events("dasktrain")`` or
        ``Client.get_events("dasktrain")``.  Messages without a ``step`` are
        ignored; missing or non-numeric metrics become NaN (a gap).
    memory_events : iterable of (timestamp, message)
        Events of the ``"dasktrain-memory"`` topic (:data:`MEMORY_TOPIC`):
        the workers' memory tables of epoch ends.  The current run's latest
        becomes :attr:`DashboardData.memory` (:func:`memory_table`).

    Returns
    -------
    DashboardData

    Examples
    --------
    >>> events = [
    ...     (1.0, {"store": "a.zarr", "step": 1, "loss": 0.9}),
    ...     (2.0, {"store": "a.zarr", "step": 2, "loss": 0.5, "val_loss": 0.6}),
    ... ]
    >>> d = dashboard_data(events)
    >>> d.sources["loss"]["xs"], d.sources["val_points"]["val_loss"]
    ([[1, 2]], [0.6])
    """
    runs, n_events = _runs_from_events(events)
    recent = {id(r) for r in sorted(runs, key=lambda r: r.last_time)[-MAX_RUNS:]}
    shown = [r for r in runs if id(r) in recent]

    def multi_line(xs: list[list[int]], ys: list[list[float]]) -> dict[str, list[Any]]:
        return {
            "xs": xs,
            "ys": ys,
            "color": [r.color for r in shown],
            "label": [r.label for r in shown],
            "store": [r.store for r in shown],
        }

    sources = {
        name: multi_line([r.steps for r in shown], [r.metrics[name] for r in shown])
        for name in STEP_METRICS
    }
    sources["val_loss"] = multi_line(
        [r.val_steps for r in shown], [r.val_loss for r in shown]
    )
    sources["val_points"] = {
        "step": [s for r in shown for s in r.val_steps],
        "val_loss": [v for r in shown for v in r.val_loss],
        "color": [r.color for r in shown for _ in r.val_steps],
        "label": [r.label for r in shown for _ in r.val_steps],
        "store": [r.store for r in shown for _ in r.val_steps],
    }
    current = None
    memory = None
    if runs:
        latest = max(runs, key=lambda r: r.last_time)
        current = {
            **latest.memory,
            **latest.last,
            "store": latest.store,
            "label": latest.label,
        }
        if latest.val_loss:
            current.setdefault("val_loss", latest.val_loss[-1])
        memory = memory_table(
            memory_events, store=latest.store, since=latest.first_time
        )
    return DashboardData(
        runs=shown, sources=sources, current=current, n_events=n_events, memory=memory
    )


#: History-row fields of the workers' memory budgets (epoch-end rows).
MEMORY_KEYS = (
    "cache_bytes",
    "cache_capacity_bytes",
    "cache_evictions",
    "worker_pauses",
    "peak_rss_fraction",
)


#: Columns of the per-worker memory table, in the order of
#: :func:`~dasktrain.engine.budget.memory_rows` (sizes in bytes); ``worker``,
#: ``status`` and ``note`` are text, the others numbers (NaN: not reported).
MEMORY_COLUMNS = (
    "worker",
    "status",
    "limit_bytes",
    "ceiling_bytes",
    "capacity_bytes",
    "held_bytes",
    "chunks_bytes",
    "shards_bytes",
    "baseline_rss_bytes",
    "rss_bytes",
    "rss_fraction",
    "peak_rss_bytes",
    "peak_rss_fraction",
    "evictions",
    "evicted_bytes",
    "pauses",
    "cache_hits",
    "cache_misses",
    "cache_hit_rate",
    "shard_hits",
    "shard_misses",
    "shard_hit_rate",
    "note",
)
_TEXT_COLUMNS = frozenset({"worker", "status", "note"})
#: The status of a worker that answered and is working.
RUNNING_STATUS = "running"


@dataclass(frozen=True)
class MemoryTable:
    """The workers' memory budgets at one epoch's end.

    Attributes
    ----------
    store : str
        The run's parameter store.
    step, epoch : int or None
        The step and epoch that ended.
    columns : dict
        One list per name of :data:`MEMORY_COLUMNS`, one value per worker,
        sorted by address.
    """

    store: str
    step: int | None
    epoch: int | None
    columns: dict[str, list[Any]]

    @property
    def n_workers(self) -> int:
        return len(self.columns["worker"])


def _int_or_none(value: Any) -> int | None:
    x = _number(value)
    return None if math.isnan(x) else int(x)


def memory_table(
    events: Iterable[tuple[float, Any]],
    *,
    store: str | None = None,
    since: float = -math.inf,
) -> MemoryTable | None:
    """The latest memory table of ``"dasktrain-memory"`` events.

    Parameters
    ----------
    events : iterable of (timestamp, message)
        Events of :data:`MEMORY_TOPIC`, oldest first: ``{"store", "step",
        "epoch", "workers": [row, ...]}`` (rows of
        :func:`~dasktrain.engine.budget.memory_rows`).  Others are ignored.
    store : str, optional
        Only tables of this store.
    since : float
        Only tables logged at this time or later (a run's first event: the
        tables of an earlier run of the same store are not shown).

    Returns
    -------
    MemoryTable or None
        ``None`` if no event qualifies.  A row's missing numbers are NaN,
        missing text is empty; rows are sorted by worker address.

    Examples
    --------
    >>> row = {"worker": "tcp://w:1", "status": "running", "held_bytes": 5}
    >>> t = memory_table([(1.0, {"store": "a", "step": 3, "workers": [row]})])
    >>> t.step, t.columns["held_bytes"], t.columns["pauses"]
    (3, [5.0], [nan])
    """
    chosen: Mapping[str, Any] | None = None
    for timestamp, msg in events:
        if not isinstance(msg, Mapping) or not isinstance(
            msg.get("workers"), (list, tuple)
        ):
            continue
        if store is not None and str(msg.get("store", "?")) != store:
            continue
        if _number(timestamp) < since:
            continue
        chosen = msg
    if chosen is None:
        return None
    rows = [r for r in chosen["workers"] if isinstance(r, Mapping)]
    rows.sort(key=lambda r: address_order(str(r.get("worker", ""))))
    columns: dict[str, list[Any]] = {
        name: [
            str(r.get(name, "")) if name in _TEXT_COLUMNS else _number(r.get(name))
            for r in rows
        ]
        for name in MEMORY_COLUMNS
    }
    return MemoryTable(
        store=str(chosen.get("store", "?")),
        step=_int_or_none(chosen.get("step")),
        epoch=_int_or_none(chosen.get("epoch")),
        columns=columns,
    )


#: Units of sizes in the memory table (binary multiples, as Dask's limits).
_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_SIZE_STEP = 1024


def _size(value: Any) -> str:
    """A byte count with a binary unit and three significant figures or so:
    ``1.30 GiB``, ``650 MiB``, ``19.5 KiB``, ``0 B``."""
    x = _number(value)
    if math.isnan(x):
        return "n/a"
    unit = _SIZE_UNITS[0]
    for unit in _SIZE_UNITS:
        if abs(x) < _SIZE_STEP or unit == _SIZE_UNITS[-1]:
            break
        x /= _SIZE_STEP
    if unit == _SIZE_UNITS[0] or abs(x) >= 100:
        return f"{x:.0f} {unit}"
    return f"{x:.1f} {unit}" if abs(x) >= 10 else f"{x:.2f} {unit}"


def _with_fraction(n_bytes: Any, fraction: Any) -> str:
    return f"{_size(n_bytes)} ({_format(fraction, '.0%')})"


#: The table's headings and how a worker's cells are made from its columns.
_MEMORY_CELLS: tuple[tuple[str, str], ...] = (
    ("limit", "limit_bytes"),
    ("ceiling", "ceiling_bytes"),
    ("capacity", "capacity_bytes"),
    ("held", "held_bytes"),
    ("chunks", "chunks_bytes"),
    ("shards", "shards_bytes"),
    ("RSS (of limit)", "rss_bytes"),
    ("peak RSS (of limit)", "peak_rss_bytes"),
    ("evictions", "evictions"),
    ("pauses", "pauses"),
    ("chunk-cache hit rate", "cache_hit_rate"),
    ("shard-cache hit rate", "shard_hit_rate"),
)
_CELL_STYLE = "padding:1px 6px;text-align:right;border-bottom:1px solid #ddd"
_TEXT_CELL_STYLE = "padding:1px 6px;text-align:left;border-bottom:1px solid #ddd"
_ALERT_STYLE = "color:#b2182b;font-weight:bold"


def _cell(columns: Mapping[str, list[Any]], name: str, i: int) -> str:
    value = columns[name][i]
    if name == "rss_bytes":
        return _with_fraction(value, columns["rss_fraction"][i])
    if name == "peak_rss_bytes":
        return _with_fraction(value, columns["peak_rss_fraction"][i])
    if name in ("cache_hit_rate", "shard_hit_rate"):
        return _format(value, ".1%")
    if name.endswith("_bytes"):
        return _size(value)
    return _format(value, ",.0f")


def memory_html(table: MemoryTable | None) -> str:
    """The per-worker memory table as HTML (every value escaped).

    A worker that did not answer (status ``"no answer"``) or has left
    (``"gone"``) keeps its row, with why in place of its numbers.

    Examples
    --------
    >>> t = memory_table([(1.0, {"store": "a", "step": 3, "epoch": 1,
    ...     "workers": [{"worker": "<w>", "status": "gone", "note": "left"}]})])
    >>> "&lt;w&gt;" in memory_html(t) and "<w>" not in memory_html(t)
    True
    """
    if table is None:
        return ""
    columns = table.columns
    esc = html.escape
    heads = ["worker", "status", *(head for head, _ in _MEMORY_CELLS)]
    lines = [
        f"<b>Workers</b> at the end of epoch {esc(str(table.epoch))} "
        f"(step {esc(str(table.step))}): memory budget, what dasktrain keeps, "
        f"RSS; chunk- and shard-cache hit rates since the fit started",
        '<table style="border-collapse:collapse;font-size:12px">',
        "<thead><tr>"
        + "".join(f'<th style="{_TEXT_CELL_STYLE}">{esc(h)}</th>' for h in heads)
        + "</tr></thead>",
        "<tbody>",
    ]
    for i in range(table.n_workers):
        status = columns["status"][i]
        status_style = _TEXT_CELL_STYLE
        if status != RUNNING_STATUS:
            status_style += ";" + _ALERT_STYLE
        cells = [
            f'<td style="{_TEXT_CELL_STYLE}"><code>{esc(columns["worker"][i])}'
            "</code></td>",
            f'<td style="{status_style}">{esc(status)}</td>',
        ]
        note = columns["note"][i]
        if note and all(math.isnan(columns[name][i]) for _, name in _MEMORY_CELLS):
            cells.append(
                f'<td style="{_TEXT_CELL_STYLE}" colspan="{len(_MEMORY_CELLS)}">'
                f"{esc(note)}</td>"
            )
        else:
            cells += [
                f'<td style="{_CELL_STYLE}">{esc(_cell(columns, name, i))}</td>'
                for _, name in _MEMORY_CELLS
            ]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _format(value: Any, spec: str) -> str:
    x = _number(value)
    return "n/a" if math.isnan(x) else format(x, spec)


def header_html(current: Mapping[str, Any] | None) -> str:
    """The page's header: the current run's store, step, epoch and metrics."""
    if current is None:
        return WAITING_TEXT
    parts = [
        f"<b>dasktrain</b> run <code>{html.escape(str(current['store']))}</code>",
        f"step <b>{html.escape(str(current.get('step', '?')))}</b>",
        f"epoch <b>{html.escape(str(current.get('epoch', '?')))}</b>",
        f"loss {_format(current.get('loss'), '.6g')}",
    ]
    if "val_loss" in current:
        parts.append(f"val_loss {_format(current['val_loss'], '.6g')}")
    parts += [
        f"{_format(current.get('rows_per_s'), ',.0f')} rows/s",
        f"step time {_format(current.get('seconds'), '.3f')} s",
        f"cache hits {_format(current.get('cache_hit_rate'), '.0%')}",
    ]
    if "cache_capacity_bytes" in current:
        # The workers' memory budgets at the latest epoch end.
        held = _number(current.get("cache_bytes")) / 2**20
        room = _number(current["cache_capacity_bytes"]) / 2**20
        parts.append(
            f"worker caches {_format(held, '.0f')} of {_format(room, '.0f')} MiB, "
            f"{_format(current.get('cache_evictions'), '.0f')} evictions, "
            f"peak RSS {_format(current.get('peak_rss_fraction'), '.0%')} of a "
            f"limit, {_format(current.get('worker_pauses'), '.0f')} pauses"
        )
    if "shard_bytes_written" in current:
        # Models with sharded tables: the step's table shard traffic.
        read = _number(current.get("shard_bytes_read")) / 1e6
        written = _number(current["shard_bytes_written"]) / 1e6
        parts.append(
            f"shards read {_format(read, '.1f')} MB, "
            f"written {_format(written, '.1f')} MB"
        )
    return " &middot; ".join(parts)


# --------------------------------------------------------------------------
# The Bokeh document
# --------------------------------------------------------------------------


class _Page:
    """The page's models, and their update from the scheduler's event log."""

    def __init__(self, scheduler: Any) -> None:
        from bokeh.layouts import column, gridplot
        from bokeh.models import ColumnDataSource, HoverTool, NumeralTickFormatter
        from bokeh.models.widgets import Div
        from bokeh.plotting import figure

        self.scheduler = scheduler
        self._token: tuple[int, float, int, float] | None = None
        empty = dashboard_data(())
        self.sources = {
            name: ColumnDataSource(data=data, name=f"dasktrain-{name}")
            for name, data in empty.sources.items()
        }
        self.header = Div(
            text=WAITING_TEXT,
            name="dasktrain-header",
            sizing_mode="stretch_width",
            styles={"font-size": "13px", "padding": "4px 8px"},
        )
        # The workers' memory budgets at the latest epoch end: one row per
        # worker, scrolled when there are many.
        self.memory = Div(
            text="",
            name="dasktrain-memory",
            sizing_mode="stretch_width",
            styles={
                "font-size": "12px",
                "padding": "0 8px",
                "max-height": f"{MEMORY_TABLE_MAX_HEIGHT_PX}px",
                "overflow-y": "auto",
            },
        )
        tools = "pan,wheel_zoom,box_zoom,reset,save"

        def new_figure(title: str, y_label: str, **kwargs: Any) -> Any:
            fig = figure(
                title=title,
                x_axis_label="step",
                y_axis_label=y_label,
                tools=tools,
                toolbar_location="above",
                sizing_mode="stretch_both",
                min_height=180,
                min_width=240,
                **kwargs,
            )
            fig.add_tools(
                HoverTool(
                    tooltips=[("run", "@store"), ("step", "$x{0}"), (y_label, "$y")],
                    line_policy="nearest",
                )
            )
            return fig

        loss = new_figure("Loss per step (dashed: validation)", "loss")
        loss.multi_line(
            xs="xs",
            ys="ys",
            line_color="color",
            line_width=2,
            source=self.sources["loss"],
            legend_field="label",
        )
        loss.multi_line(
            xs="xs",
            ys="ys",
            line_color="color",
            line_width=2,
            line_dash="dashed",
            source=self.sources["val_loss"],
        )
        loss.scatter(
            x="step",
            y="val_loss",
            color="color",
            size=7,
            source=self.sources["val_points"],
            legend_label="val_loss",
        )
        self.legend = loss.legend[0]
        self.legend.visible = False  # shown with the first run
        loss.legend.location = "top_right"
        loss.legend.background_fill_alpha = 0.6
        loss.legend.label_text_font_size = "9pt"

        shared = {"x_range": loss.x_range}
        rows = new_figure("Throughput", "rows/s", **shared)
        rows.yaxis.formatter = NumeralTickFormatter(format="0.[0]a")
        seconds = new_figure("Step time", "seconds", **shared)
        hits = new_figure("Worker cache hit rate", "hit rate", **shared)
        hits.y_range.start = 0.0
        hits.y_range.end = 1.05
        traffic = new_figure(
            "Table shard traffic per step (sharded models; dashed: read)",
            "bytes",
            **shared,
        )
        traffic.yaxis.formatter = NumeralTickFormatter(format="0.[0]b")
        for fig, name, dash in (
            (rows, "rows_per_s", "solid"),
            (seconds, "seconds", "solid"),
            (hits, "cache_hit_rate", "solid"),
            (traffic, "shard_bytes_written", "solid"),
            (traffic, "shard_bytes_read", "dashed"),
        ):
            fig.multi_line(
                xs="xs",
                ys="ys",
                line_color="color",
                line_width=2,
                line_dash=dash,
                source=self.sources[name],
            )
        grid = gridplot(
            [[loss, rows], [seconds, hits], [traffic, None]],
            sizing_mode="stretch_both",
            toolbar_location="right",
        )
        self.root = column(self.header, self.memory, grid, sizing_mode="stretch_both")

    def update(self) -> None:
        """Re-read the event log; push new column data if it changed.

        Runs on the scheduler's event loop (Bokeh periodic callback), so it
        reads the scheduler's state without locks; the event log holds at
        most 1,000 events per topic, so a full rebuild stays cheap.
        """
        events = self.scheduler.get_events(EVENT_TOPIC)
        memory = self.scheduler.get_events(MEMORY_TOPIC)
        token = (
            len(events),
            events[-1][0] if events else 0.0,
            len(memory),
            memory[-1][0] if memory else 0.0,
        )
        if token == self._token:
            return
        self._token = token
        data = dashboard_data(events, memory)
        for name, columns in data.sources.items():
            self.sources[name].data = columns
        self.header.text = header_html(data.current)
        self.memory.text = memory_html(data.memory)
        self.legend.visible = bool(data.runs)


def dasktrain_doc(scheduler: Any, extra: Mapping[str, Any], doc: Any) -> None:
    """Build the page in a Bokeh document (called by the scheduler's dashboard).

    Parameters
    ----------
    scheduler : distributed.Scheduler
        The scheduler whose ``"dasktrain"`` events are shown.
    extra : dict
        Template variables from the dashboard (unused: individual pages have
        no navigation bar).
    doc : bokeh.document.Document
        The document of one browser session.
    """
    page = _Page(scheduler)
    page.update()
    doc.add_root(page.root)
    doc.add_periodic_callback(page.update, UPDATE_INTERVAL_MS)
    doc.title = "Dask: dasktrain"
    try:
        from distributed.dashboard.components.scheduler import BOKEH_THEME

        doc.theme = BOKEH_THEME
    except ImportError:  # the page still works with Bokeh's default theme
        pass


def _add_to_applications(module: types.ModuleType) -> None:
    module.applications[APP_PATH] = dasktrain_doc


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of distributed's dashboard module, then adds the
    page to its ``applications``."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        _add_to_applications(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ...
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of :data:`DASHBOARD_MODULE` when it is first
    imported, then leaves ``sys.meta_path``."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != DASHBOARD_MODULE:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisteringLoader(spec.loader)
            return spec
        return None


_ON_IMPORT = _RegisterOnImport()


def register() -> bool:
    """Add the page to the scheduler dashboard's applications (idempotent).

    If distributed's dashboard module (which imports Bokeh) is not imported
    yet, it is not imported here: the page is added when it is, that is when
    a scheduler in this process starts its dashboard.  Only schedulers whose
    HTTP server starts after this call serve the page this way; running ones
    get it from :func:`install_page`.

    Returns
    -------
    bool
        ``True`` (the page is registered, or will be on import).
    """
    module = sys.modules.get(DASHBOARD_MODULE)
    if module is not None:
        _add_to_applications(module)
    elif _ON_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _ON_IMPORT)
    return True


def _bokeh_server(scheduler: Any) -> Any:
    """The Bokeh server (a ``BokehTornado``) of a scheduler's dashboard, or
    ``None`` if it runs none."""
    from bokeh.server.tornado import BokehTornado

    http_application = getattr(scheduler, "http_application", None)
    for app in getattr(http_application, "applications", ()):
        if isinstance(app, BokehTornado):
            return app
    return None


def install_page(scheduler: Any) -> bool:
    """Serve the page on the running dashboard of ``scheduler`` (idempotent).

    A scheduler's Bokeh server makes its routes from the applications it
    knows when its HTTP server starts.  This adds the page to a server that
    runs without it, the way that server adds its own applications: an
    application context for :data:`APP_PATH`, Bokeh's per-application routes
    (document, websocket, metadata, autoload script, static files), the load
    hook, and an entry in the "More..." menu.  Runs on the scheduler's event
    loop (from :class:`DashboardPagePlugin`).

    Returns
    -------
    bool
        ``True`` if the page is served (already, or now); ``False`` if the
        scheduler runs no Bokeh dashboard.
    """
    try:
        from bokeh.application import Application
        from bokeh.application.handlers.function import FunctionHandler
        from bokeh.server.contexts import ApplicationContext
        from bokeh.server.tornado import create_static_handler
        from bokeh.server.urls import per_app_patterns
        from bokeh.server.views.ws import WSHandler
        from distributed.dashboard.scheduler import template_variables
    except ImportError:
        return False
    server = _bokeh_server(scheduler)
    if server is None:
        return False
    if APP_PATH in server.app_paths:
        return True
    prefix = server.prefix
    variables = template_variables(scheduler)
    extra = {"prefix": prefix + "/", **variables}
    application = Application(
        FunctionHandler(functools.partial(dasktrain_doc, scheduler, extra))
    )
    logout_url = server.auth_provider.logout_url
    if logout_url is not None:
        logout_url = urljoin(prefix + "/", logout_url.lstrip("/"))
    context = ApplicationContext(
        application, io_loop=server.io_loop, url=APP_PATH, logout_url=logout_url
    )
    # BokehTornado has no public way to add an application once built: its
    # table of applications is what /individual-plots.json and the sessions
    # look up, and the routes below are what its constructor would have made.
    server._applications[APP_PATH] = context
    websocket_path = prefix + APP_PATH + "/ws"
    routes: list[tuple[str, Any, dict[str, Any]]] = []
    for pattern, handler, *_ in per_app_patterns:
        kwargs: dict[str, Any] = {
            "application_context": context,
            "bokeh_websocket_path": websocket_path,
        }
        if issubclass(handler, WSHandler):
            kwargs["compression_level"] = None
            kwargs["mem_level"] = None
        routes.append((prefix + APP_PATH + pattern, handler, kwargs))
    routes.append(create_static_handler(prefix, APP_PATH, application))
    server.add_handlers(r".*", routes)
    server.io_loop.add_callback(context.run_load_hook)
    plots = variables.get("plots")
    if isinstance(plots, list) and not any(
        p.get("url") == APP_PATH.strip("/") for p in plots
    ):
        plots.append({"url": APP_PATH.strip("/"), "name": MENU_NAME})
        plots.sort(key=lambda p: p["name"])
    logger.info("added the dasktrain page to the dashboard at %s", APP_PATH)
    return True


class DashboardPagePlugin(SchedulerPlugin):
    """A scheduler plugin that serves the page on the scheduler's running
    dashboard (see :func:`install_page`); registered by every trainer."""

    name = "dasktrain-dashboard-page"
    idempotent = True

    async def start(self, scheduler: Any) -> None:
        if not install_page(scheduler):
            logger.info("scheduler %s runs no Bokeh dashboard", scheduler.address)


def ensure_page(client: Any) -> None:
    """Make the scheduler of ``client`` serve the page (one round trip;
    idempotent).  A scheduler that refuses plugins (or has no dashboard)
    only costs a log line: training does not depend on the page."""
    try:
        client.register_plugin(DashboardPagePlugin())  # sync point
    except Exception:
        logger.info(
            "could not add the dasktrain page to the dashboard of %s",
            getattr(client, "scheduler", None),
            exc_info=True,
        )


register()
