"""dasktrain: out-of-core, data-parallel training on Zarr data with Dask.

Examples
--------
>>> import dasktrain as dt
>>> sorted(n for n in dt.__all__ if n[0].isupper())[:3]
['Dataset', 'EarlyStopping', 'History']
"""

from __future__ import annotations

from dasktrain import datasets, errors, models, optim, preprocessing
from dasktrain.callbacks import Callback, EarlyStopping, ProgressBar
from dasktrain.data import Dataset
from dasktrain.engine.cluster import CLIENT_HOOKS
from dasktrain.history import History
from dasktrain.monitor import dashboard as _dashboard
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
