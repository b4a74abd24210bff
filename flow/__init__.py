"""flow: out-of-core Geneformer rank value encodings with Dask and Zarr.

Three stored artifacts, each a Zarr v3 store: the count store (:func:`open_counts`), the
median set (:func:`open_medians`) and the encoding store (:func:`open_encoding`), which keeps
every cell's full ranking so the genes a model's input size drops stay queryable
(:func:`dropped_genes`, :func:`gene_drop`, :func:`drop_rates`, :func:`coverage`,
:func:`gene_retention`). The stages
are chained in :mod:`flow.pipeline`; the command line is ``flow``.
"""

from __future__ import annotations

from ._version import __version__
from .encode.store import EncodingStore, open_encoding
from .errors import (
    ChunkingError,
    FlowError,
    FlowWarning,
    IncompleteStoreError,
    InputError,
    OutputExistsError,
    SchemaError,
    StoreNotFoundError,
    VocabularyError,
)
from .medians import MedianSet, open_medians
from .query import coverage, coverage_summary, drop_rates, dropped_genes, gene_drop
from .retention import gene_retention, read_gene_sets
from .store import CountStore, open_counts, write_counts
from .vocab import read_vocabulary

__all__ = [
    "ChunkingError",
    "CountStore",
    "EncodingStore",
    "FlowError",
    "FlowWarning",
    "IncompleteStoreError",
    "InputError",
    "MedianSet",
    "OutputExistsError",
    "SchemaError",
    "StoreNotFoundError",
    "VocabularyError",
    "__version__",
    "coverage",
    "coverage_summary",
    "drop_rates",
    "dropped_genes",
    "gene_drop",
    "gene_retention",
    "open_counts",
    "open_encoding",
    "open_medians",
    "read_gene_sets",
    "read_vocabulary",
    "write_counts",
]
