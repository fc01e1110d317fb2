"""Parameter stores: versioned model parameters and optimizer state in Zarr.

A store is a Zarr v3 group holding one group of arrays per committed step and
root attributes that name the committed version; commits are atomic and a
store has at most one writer at a time.  See :mod:`dasktrain.params.store` for
the layout and the commit protocol, and :mod:`dasktrain.params.lock` for the
write lock and its stale-lock rule.

Examples
--------
>>> import os, tempfile
>>> import numpy as np
>>> from dasktrain.params import ParamStore
>>> store = ParamStore.create(os.path.join(tempfile.mkdtemp(), "run.zarr"))
>>> with store.lock(owner="example"):
...     store.commit(1, {"w": np.zeros(4)}, {}, {"epoch": 0})
>>> ParamStore.open(store.path).read().step
1
"""

from __future__ import annotations

from dasktrain.params.lock import LOCK_FILENAME, LockInfo, WriteLock
from dasktrain.params.store import (
    FLOAT_TAG,
    FORMAT,
    FORMAT_VERSION,
    ParamStore,
    Version,
    decode_meta,
    encode_meta,
)

__all__ = [
    "FLOAT_TAG",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK_FILENAME",
    "LockInfo",
    "ParamStore",
    "Version",
    "WriteLock",
    "decode_meta",
    "encode_meta",
]
