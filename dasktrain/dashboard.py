"""The dasktrain page of the Dask dashboard, registered on import.

A short alias of :mod:`dasktrain.monitor.dashboard` for the command line::

    dask scheduler --preload dasktrain.dashboard
"""

from __future__ import annotations

from dasktrain.monitor.dashboard import APP_PATH, dashboard_data, register

__all__ = ["APP_PATH", "dashboard_data", "register"]
