"""Dataset stores: Zarr groups of arrays chunked by whole rows.

:class:`Dataset` is the user-facing handle; :mod:`dasktrain.data.io` holds the
worker-side reads and the writers (pure Zarr, no Dask).

Examples
--------
>>> import numpy as np, tempfile, os
>>> from dasktrain.data import Dataset
>>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
>>> Dataset.from_arrays(path, y=np.zeros(3, np.int8), chunk_rows=2).n_chunks
2
"""

from __future__ import annotations

from dasktrain.data.dataset import DEFAULT_CHUNK_ROWS, Dataset
from dasktrain.data.io import (
    CODECS,
    DEFAULT_CODEC,
    DatasetRef,
    check_finite,
    create_store,
    finalize_store,
    read_chunk,
    write_chunk,
)
from dasktrain.schema import FieldInfo

__all__ = [
    "CODECS",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_CODEC",
    "Dataset",
    "DatasetRef",
    "FieldInfo",
    "check_finite",
    "create_store",
    "finalize_store",
    "read_chunk",
    "write_chunk",
]
