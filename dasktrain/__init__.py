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
from dasktrain.history import History
from dasktrain.params import ParamStore
from dasktrain.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "Dataset",
    "EarlyStopping",
    "History",
    "ParamStore",
    "ProgressBar",
    "Trainer",
    "__version__",
    "datasets",
    "errors",
    "models",
    "optim",
    "preprocessing",
]
