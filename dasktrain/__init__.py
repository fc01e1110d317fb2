"""dasktrain: out-of-core, data-parallel training on Zarr data with Dask.

The names below are imported on first use: a process that only unpickles
dasktrain's objects (the scheduler, for the dashboard page; a worker, for the
tasks it runs) imports only what those need.

Examples
--------
>>> import dasktrain as dt
>>> sorted(n for n in dt.__all__ if n[0].isupper())[:3]
['Callback', 'Dataset', 'EarlyStopping']
>>> dt.Trainer.__name__
'Trainer'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dasktrain.engine.cluster import CLIENT_HOOKS
from dasktrain.monitor import dashboard as _dashboard

if TYPE_CHECKING:
    from dasktrain import datasets, errors, models, optim, preprocessing
    from dasktrain.callbacks import Callback, EarlyStopping, ProgressBar
    from dasktrain.data import Dataset
    from dasktrain.history import History
    from dasktrain.params import ParamStore
    from dasktrain.predictor import Predictor, load_model
    from dasktrain.trainer import Trainer

__version__ = "0.1.0"

# The dashboard page, wherever a trainer runs: registered for schedulers
# started in this process from now on (without importing Bokeh), and added
# by every trainer to a running scheduler that lacks it.
_dashboard.register()
if _dashboard.ensure_page not in CLIENT_HOOKS:
    CLIENT_HOOKS.append(_dashboard.ensure_page)

#: Public name -> the module it is defined in (``None``: a submodule).
_LAZY: dict[str, str | None] = {
    "Callback": "dasktrain.callbacks",
    "Dataset": "dasktrain.data",
    "EarlyStopping": "dasktrain.callbacks",
    "History": "dasktrain.history",
    "ParamStore": "dasktrain.params",
    "Predictor": "dasktrain.predictor",
    "ProgressBar": "dasktrain.callbacks",
    "Trainer": "dasktrain.trainer",
    "datasets": None,
    "errors": None,
    "load_model": "dasktrain.predictor",
    "models": None,
    "optim": None,
    "preprocessing": None,
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name, "")
    if where == "":
        raise AttributeError(f"module 'dasktrain' has no attribute {name!r}")
    if where is None:
        value: Any = importlib.import_module(f"dasktrain.{name}")
    else:
        value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Callback",
    "Dataset",
    "EarlyStopping",
    "History",
    "ParamStore",
    "Predictor",
    "ProgressBar",
    "Trainer",
    "__version__",
    "datasets",
    "errors",
    "load_model",
    "models",
    "optim",
    "preprocessing",
]
