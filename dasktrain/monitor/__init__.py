"""Monitoring: the Dask dashboard page (:mod:`dasktrain.monitor.dashboard`)."""
