"""flow: out-of-core Geneformer rank value encodings with Dask and Zarr.

The pipeline has three stored artifacts, each a Zarr v3 store: the count store
(:func:`write_counts`, :func:`open_counts`), the median set and the encoding store.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    ChunkingError,
    FlowError,
    FlowWarning,
    IncompleteStoreError,
    InputError,
    SchemaError,
    StoreNotFoundError,
    VocabularyError,
)
from .store import CountStore, open_counts, write_counts

__all__ = [
    "ChunkingError",
    "CountStore",
    "FlowError",
    "FlowWarning",
    "IncompleteStoreError",
    "InputError",
    "SchemaError",
    "StoreNotFoundError",
    "VocabularyError",
    "__version__",
    "open_counts",
    "write_counts",
]
