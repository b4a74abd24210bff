"""The median set: each gene's nonzero median of count / n_counts x 10,000 over a corpus.

A median set is a Zarr v3 store that opens as an :class:`xarray.Dataset` with dimension
``gene`` (``xarray.open_zarr(path, consolidated=False)``)::

    gene_id (gene)        normalized Ensembl IDs (coordinate)
    median (gene)         float64 nonzero median (NaN: never expressed)
    n_nonzero (gene)      number of cells expressing the gene (-1: unknown, imported)
    digest_offset (gene_edge), digest_mean/_weight/_min/_max (centroid)
                          the t-digest state, kept so new data can be merged in later
    attrs["flow"]         kind "medians", method, compression, normalization, the stores it
                          covers (URL, fingerprint, cells), complete

Methods: ``"tdigest"`` (one pass, mergeable), ``"exact"`` (two passes, bit-identical to
``numpy.median`` of each gene's nonzero values), ``"imported"`` (from a Geneformer dictionary).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import zarr

from . import __version__
from ._io import create_flow_group, flow_attrs, mark_complete, open_flow_group, store_url
from .errors import VocabularyError
from .sketch import _tdigest
from .sketch.reduce import MEDIAN_SPLIT_EVERY, TARGET_SUM, bracket_values, nonzero_digests

if TYPE_CHECKING:
    import scipy.sparse as sp
    import xarray as xr
    from dask.delayed import Delayed

    from .store import CountStore

__all__ = [
    "MedianSet",
    "compute_medians",
    "export_medians",
    "import_median_dictionary",
    "merge_median_sets",
    "open_medians",
    "write_medians",
]

KIND = "medians"
SCHEMA_VERSION = 1
Method = Literal["tdigest", "exact"]
NORMALIZATION = {
    "target_sum": TARGET_SUM,
    "n_counts": "total counts over all genes of the input",
    "zeros": "excluded",
}


@dataclass(frozen=True)
class MedianSet:
    """Per-gene nonzero medians, with the digests they came from (in memory: one row per gene)."""

    gene_ids: np.ndarray
    medians: np.ndarray
    n_nonzero: np.ndarray
    digests: _tdigest.Digests | None
    method: str
    compression: float | None
    stores: tuple[dict[str, Any], ...] = ()

    def as_dict(self) -> dict[str, float]:
        """``{gene_id: median}`` for genes with a median (Geneformer's dictionary format)."""
        ok = ~np.isnan(self.medians)
        return dict(zip(self.gene_ids[ok].tolist(), self.medians[ok].tolist(), strict=True))

    @property
    def fingerprint(self) -> str:
        """SHA-256 of gene IDs and medians: identifies the values tokens depend on."""
        import hashlib

        h = hashlib.sha256()
        h.update("\n".join(map(str, self.gene_ids)).encode())
        h.update(np.ascontiguousarray(self.medians, dtype=np.float64).tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------- computing


def _store_genes(
    store: CountStore, mapping: Mapping[str, str] | None
) -> tuple[np.ndarray, sp.csr_matrix | None]:
    """Normalized gene IDs of a store, and the matrix that sums columns sharing one ID."""
    import scipy.sparse as sp

    from .vocab import normalize_gene_ids

    ids = normalize_gene_ids(store.var.index.to_numpy(dtype=str))
    if mapping:
        ids = np.asarray([mapping.get(g, g) for g in ids], dtype=object)
    inverse, unique = pd.factorize(pd.Index(ids))  # first-seen order: store order if no repeats
    unique = np.asarray(unique, dtype=object)
    if unique.size == ids.size:
        return ids, None
    collapse = sp.csr_matrix(
        (np.ones(ids.size, dtype=np.float64), (np.arange(ids.size), inverse)),
        shape=(ids.size, unique.size),
    )
    return unique, collapse


def _cells(store: CountStore, n_counts_column: str) -> tuple[np.ndarray, np.ndarray | None]:
    n_counts, keep = store.cells(n_counts_column)
    return n_counts, None if keep.all() else keep


def compute_medians(
    store: CountStore,
    *,
    compression: float = _tdigest.DEFAULT_COMPRESSION,
    split_every: int = MEDIAN_SPLIT_EVERY,
    n_counts_column: str = "n_counts",
    gene_mapping: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, Delayed]:
    """The t-digest pass over a count store, as a lazy graph.

    Genes are identified by normalized Ensembl ID (version stripped, upper-case, optionally
    mapped); columns sharing an ID are summed first, as tokenization does. Cells with
    ``filter_pass`` false are left out. Requires the store's own block grid (one chunk along
    genes); computes nothing.

    Returns
    -------
    gene_ids, digests
        The gene IDs (numpy) and a Delayed that computes to their
        :class:`~flow.sketch._tdigest.Digests`.
    """
    gene_ids, collapse = _store_genes(store, gene_mapping)
    n_counts, keep = _cells(store, n_counts_column)
    digests = nonzero_digests(
        store.counts,
        n_counts,
        keep=keep,
        collapse=collapse,
        compression=compression,
        split_every=split_every,
    )
    return gene_ids, digests


def exact_medians_pass(
    store: CountStore,
    digests: _tdigest.Digests,
    *,
    n_counts_column: str = "n_counts",
    gene_mapping: Mapping[str, str] | None = None,
    split_every: int = MEDIAN_SPLIT_EVERY,
) -> Delayed:
    """Second pass of exact mode, given the first pass's computed digests (lazy).

    Computes to float64 medians bit-identical to ``numpy.median`` of each gene's nonzero values
    (count / n_counts) * 10,000, whatever the block size.
    """
    _, collapse = _store_genes(store, gene_mapping)
    n_counts, keep = _cells(store, n_counts_column)
    lo, hi = _tdigest.median_bracket(digests)
    return bracket_values(
        store.counts,
        n_counts,
        lo,
        hi,
        digests.counts,
        keep=keep,
        collapse=collapse,
        split_every=split_every,
    )


def _store_record(store: CountStore) -> dict[str, Any]:
    return {
        "url": store.url,
        "fingerprint": store.fingerprint,
        "n_cells": int(store.attrs["n_cells"]),
    }


def medians_of(
    stores: Sequence[CountStore],
    *,
    method: Method = "tdigest",
    compression: float = _tdigest.DEFAULT_COMPRESSION,
    split_every: int = MEDIAN_SPLIT_EVERY,
    n_counts_column: str = "n_counts",
    gene_mapping: Mapping[str, str] | None = None,
    compute: Any = None,
) -> MedianSet:
    """Compute the median set of one or more count stores (a compute boundary).

    ``compute`` is the function that runs graphs (default :func:`flow.cluster.compute`).
    With several stores their digests are merged (genes united by ID). Exact mode needs the
    first pass's digests first, so it runs two passes, over one store (several are refused
    before anything is computed: convert them into one store).
    """
    from .cluster import compute as default_compute

    run = compute or default_compute
    if method not in ("tdigest", "exact"):
        msg = f"method must be 'tdigest' or 'exact'; got {method!r}."
        raise ValueError(msg)
    if method == "exact" and len(stores) > 1:  # the bracket pass needs every cell of one store
        msg = "Exact mode over several stores: convert them into one store first (flow convert A B -o AB)."
        raise VocabularyError(msg)
    graphs = [
        compute_medians(
            s,
            compression=compression,
            split_every=split_every,
            n_counts_column=n_counts_column,
            gene_mapping=gene_mapping,
        )
        for s in stores
    ]
    digest_list = run(*[g for _, g in graphs])
    parts = [
        MedianSet(ids, _tdigest.median(d), d.counts, d, "tdigest", compression, (_store_record(s),))
        for (ids, _), d, s in zip(graphs, digest_list, stores, strict=True)
    ]
    merged = merge_median_sets(parts) if len(parts) > 1 else parts[0]
    if method == "tdigest":
        return merged
    assert merged.digests is not None
    (exact,) = run(
        exact_medians_pass(
            stores[0],
            merged.digests,
            n_counts_column=n_counts_column,
            gene_mapping=gene_mapping,
            split_every=split_every,
        )
    )
    return MedianSet(
        merged.gene_ids,
        np.asarray(exact),
        merged.n_nonzero,
        merged.digests,
        "exact",
        compression,
        merged.stores,
    )


# --------------------------------------------------------------------------- merging


def merge_median_sets(sets: Sequence[MedianSet]) -> MedianSet:
    """Merge t-digest median sets (genes united by ID; digests merged, medians recomputed).

    Raises
    ------
    VocabularyError
        A set is exact or imported (no mergeable digests), or compressions differ.
    """
    for s in sets:
        if s.method != "tdigest" or s.digests is None:
            msg = (
                f"Cannot merge a median set computed with method {s.method!r}: only t-digest sets "
                "keep what a merge needs. Recompute it with --method tdigest, or recompute the "
                "exact medians over all stores together."
            )
            raise VocabularyError(msg)
    if len({s.compression for s in sets}) > 1:
        msg = f"Cannot merge median sets with different compressions: {[s.compression for s in sets]}."
        raise VocabularyError(msg)
    all_ids = pd.Index(np.concatenate([s.gene_ids for s in sets])).unique()
    aligned = []
    for s in sets:
        assert s.digests is not None
        where = all_ids.get_indexer(pd.Index(s.gene_ids))
        aligned.append(_reindex(s.digests, where, len(all_ids)))
    merged = _tdigest.merge(aligned)
    stores = tuple(r for s in sets for r in s.stores)
    return MedianSet(
        all_ids.to_numpy(dtype=object),
        _tdigest.median(merged),
        merged.counts,
        merged,
        "tdigest",
        sets[0].compression,
        stores,
    )


def _reindex(d: _tdigest.Digests, where: np.ndarray, n_genes: int) -> _tdigest.Digests:
    """The same digests with gene ``g`` moved to index ``where[g]`` of ``n_genes`` (others empty)."""
    sizes = np.zeros(n_genes, dtype=np.int64)
    sizes[where] = np.diff(d.offsets)
    offsets = np.zeros(n_genes + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    order = np.argsort(where, kind="stable")  # old genes in new-index order
    take = (
        np.concatenate([np.arange(d.offsets[g], d.offsets[g + 1]) for g in order])
        if order.size
        else np.zeros(0, np.int64)
    )
    return _tdigest.Digests(
        offsets, d.means[take], d.weights[take], d.mins[take], d.maxs[take], d.compression
    )


# --------------------------------------------------------------------------- storage


def _create_1d(group: zarr.Group, name: str, data: np.ndarray, dim: str) -> None:
    chunks = (max(1, min(data.size, 1 << 20)),)
    dtype = str if data.dtype.kind in "OUS" else data.dtype  # variable-length strings
    arr = group.create_array(
        name, shape=data.shape, dtype=dtype, chunks=chunks, dimension_names=(dim,)
    )
    if data.size:
        arr[:] = data


def write_medians(
    medians: MedianSet,
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write a median set to a Zarr store (replacing it); returns its URL."""
    url = store_url(path)
    root = create_flow_group(url, KIND, SCHEMA_VERSION, storage_options=storage_options)
    _create_1d(root, "gene_id", np.asarray(medians.gene_ids, dtype=str), "gene")
    _create_1d(root, "median", np.asarray(medians.medians, dtype=np.float64), "gene")
    _create_1d(root, "n_nonzero", np.asarray(medians.n_nonzero, dtype=np.int64), "gene")
    d = medians.digests or _tdigest.empty(len(medians.gene_ids))
    arrays = _tdigest.to_arrays(d)
    _create_1d(root, "digest_offset", arrays["offsets"], "gene_edge")
    for key in ("means", "weights", "mins", "maxs"):
        _create_1d(root, f"digest_{key.rstrip('s')}", arrays[key], "centroid")
    mark_complete(
        root,
        method=medians.method,
        compression=medians.compression,
        normalization=NORMALIZATION,
        stores=list(medians.stores),
        n_genes=len(medians.gene_ids),
        fingerprint=medians.fingerprint,
        flow_version=__version__,
    )
    return url


def open_medians(
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    digests: bool = True,
) -> MedianSet:
    """Read a median set store (small: one row per gene), or a Geneformer median pickle.

    ``digests=False`` leaves the t-digests unread (``MedianSet.digests`` is None): enough to
    tokenize, and tens of MB less memory at 20,000 genes.
    """
    text = os.fspath(path)
    if text.endswith((".pkl", ".pickle")):
        return import_median_dictionary(text)
    root: Any = open_flow_group(
        text, KIND, storage_options=storage_options, finish_hint="run `flow medians` again"
    )
    meta = flow_attrs(root)
    compression = meta.get("compression")
    state = None
    if digests and meta["method"] == "tdigest":
        arrays = {
            k: np.asarray(root[f"digest_{k.rstrip('s')}"][:])
            for k in ("means", "weights", "mins", "maxs")
        }
        arrays["offsets"] = np.asarray(root["digest_offset"][:])
        arrays["compression"] = np.asarray(compression or _tdigest.DEFAULT_COMPRESSION)
        state = _tdigest.from_arrays(arrays)
    return MedianSet(
        np.asarray(root["gene_id"][:], dtype=object),
        np.asarray(root["median"][:], dtype=np.float64),
        np.asarray(root["n_nonzero"][:], dtype=np.int64),
        state,
        str(meta["method"]),
        compression,
        tuple(meta.get("stores", [])),
    )


def open_medians_dataset(path: str | os.PathLike[str], **kwargs: Any) -> xr.Dataset:
    """Open a median set store as a lazy :class:`xarray.Dataset` with dimension ``gene``."""
    import xarray as xr

    root = open_flow_group(path, KIND, storage_options=kwargs.get("storage_options"))
    ds = xr.open_zarr(store_url(path), consolidated=False, **kwargs)
    ds.attrs["flow"] = flow_attrs(root)
    return ds.set_coords("gene_id")


# --------------------------------------------------------------------------- interchange


def import_median_dictionary(path: str | os.PathLike[str]) -> MedianSet:
    """Import Geneformer's ``gene_median_dictionary*.pkl`` (read with a restricted unpickler)."""
    from ._pickle import load_dict
    from .vocab import normalize_gene_ids

    raw = load_dict(path)
    ids = normalize_gene_ids(list(map(str, raw.keys())))
    values = np.asarray([float(v) for v in raw.values()], dtype=np.float64)
    order = np.argsort(ids, kind="stable")
    ids, values = ids[order], values[order]
    if np.unique(ids).size != ids.size:
        msg = f"{path}: gene IDs repeat after normalization (version suffix / case); cannot import."
        raise VocabularyError(msg)
    record = {"url": store_url(path), "fingerprint": "imported", "n_cells": -1}
    return MedianSet(
        ids, values, np.full(ids.size, -1, dtype=np.int64), None, "imported", None, (record,)
    )


def export_medians(
    medians: MedianSet, path: str | os.PathLike[str], *, format: str | None = None
) -> None:
    """Write ``{gene_id: median}`` as a Geneformer pickle (.pkl), TSV (.tsv) or JSON (.json)."""
    text = os.fspath(path)
    fmt = format or os.path.splitext(text)[1].lstrip(".").lower()
    table = medians.as_dict()
    if fmt in ("pkl", "pickle"):
        with open(text, "wb") as fh:
            pickle.dump(table, fh, protocol=4)
    elif fmt == "json":
        with open(text, "w") as fh:
            json.dump(table, fh, indent=0)
    elif fmt == "tsv":
        frame = pd.DataFrame(
            {"gene_id": medians.gene_ids, "median": medians.medians, "n_nonzero": medians.n_nonzero}
        )
        frame.to_csv(text, sep="\t", index=False, float_format="%.17g")
    else:
        msg = f"Unknown median export format {fmt!r} for {text!r}; use .pkl, .tsv or .json."
        raise ValueError(msg)
