"""The median set: each gene's nonzero median of count / n_counts x 10,000 over a corpus.

A median set is a Zarr v3 store that opens as an :class:`xarray.Dataset` with dimension
``gene`` (``xarray.open_zarr(path)``: its metadata is consolidated, so no warning), the
normalized Ensembl IDs being the ``gene`` coordinate (``ds.sel(gene="ENSG00000167286")``)::

    gene (gene)           normalized Ensembl IDs (the dimension coordinate)
    median (gene)         float64 nonzero median (NaN: never expressed)
    n_nonzero (gene)      number of cells expressing the gene (-1: unknown, imported)
    digest_offset (gene_edge), digest_mean/_weight/_min/_max (centroid)
                          the t-digest state, kept so new data can be merged in later
    attrs["flow"]         kind "medians", method, compression, normalization, the stores it
                          covers (URL, fingerprint, cells), complete

Median sets written before schema version 2 (IDs in a ``gene_id`` data variable, metadata
not consolidated) still open with :func:`open_medians` and :func:`open_medians_dataset`
(which gives them the ``gene`` coordinate too); ``xarray.open_zarr`` needs
``consolidated=False`` for them, and rewriting one (``flow medians --merge OLD.zarr -o NEW.zarr``)
brings it to the current layout.

Methods: ``"tdigest"`` (one pass, mergeable), ``"exact"`` (two passes, bit-identical to
``numpy.median`` of each gene's nonzero values), ``"imported"`` (from a Geneformer dictionary).

Genes are the store's columns collapsed by :func:`flow._genes.collapse_gene_ids` (normalised,
optionally mapped, duplicates summed), in first-seen order: the same collapse tokenization uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr
import zarr

from . import geneformer
from ._genes import GeneMapping, collapse_gene_ids, normalize_gene_ids
from ._io import DEFAULT_CODECS, create_flow_group, flow_attrs, mark_complete, open_flow_group
from ._kernels import TARGET_SUM
from ._location import Location, LocationLike
from ._pickle import load_dict
from ._version import __version__
from .cluster import compute as cluster_compute
from .errors import VocabularyError
from .sketch import _tdigest
from .sketch.reduce import MEDIAN_SPLIT_EVERY, bracket_values, nonzero_digests

if TYPE_CHECKING:
    from dask.delayed import Delayed

    from .store import CountStore

__all__ = [
    "MedianSet",
    "compute_medians",
    "export_medians",
    "import_median_dictionary",
    "medians_of",
    "merge_median_sets",
    "open_medians",
    "open_medians_dataset",
    "write_medians",
]

KIND = "medians"
SCHEMA_VERSION = 2
"""2: IDs are the ``gene`` coordinate and the metadata is consolidated (1: ``gene_id``)."""
GENE = "gene"
"""The name of the gene dimension and of its coordinate (the IDs)."""
_OLD_GENE = "gene_id"  # schema version 1
Method = Literal["tdigest", "exact"]
NORMALIZATION = {
    "target_sum": TARGET_SUM,
    "n_counts": "total counts over all genes of the input",
    "zeros": "excluded",
}


@dataclass(frozen=True)
class MedianSet:
    """Per-gene nonzero medians, with the digests they came from (in memory: one row per gene).

    ``location`` is where the set is stored (:func:`write_medians` and :func:`open_medians`
    bind it), or None for a set only in memory (computed, merged or imported).
    """

    gene_ids: np.ndarray
    medians: np.ndarray
    n_nonzero: np.ndarray
    digests: _tdigest.Digests | None
    method: str
    compression: float | None
    stores: tuple[dict[str, Any], ...] = ()
    location: Location | None = field(default=None, compare=False)

    @property
    def url(self) -> str | None:
        """Where the set is stored (absolute local path or URL), or None (in memory only)."""
        return None if self.location is None else self.location.url

    def as_dict(self) -> dict[str, float]:
        """``{gene_id: median}`` for genes with a median (Geneformer's dictionary format)."""
        ok = ~np.isnan(self.medians)
        return dict(zip(self.gene_ids[ok].tolist(), self.medians[ok].tolist(), strict=True))

    @property
    def fingerprint(self) -> str:
        """SHA-256 of gene IDs and medians: identifies the values tokens depend on."""
        h = hashlib.sha256()
        h.update("\n".join(map(str, self.gene_ids)).encode())
        h.update(np.ascontiguousarray(self.medians, dtype=np.float64).tobytes())
        return h.hexdigest()

    def describe(self, output: LocationLike | None = None) -> str:
        """A short summary of the median set (``output``: where it was written, if shown)."""
        expressed = int(np.sum(~np.isnan(self.medians)))
        where = f" -> {output}" if output else ""
        head = f"median set{where}: {len(self.gene_ids):,} genes ({expressed:,} expressed), "
        if self.method == "imported":
            sources = ", ".join(_describe_source(str(s.get("url"))) for s in self.stores)
            return head + f"imported from {sources or 'a dictionary'}"
        cells = sum(max(0, int(s.get("n_cells", 0))) for s in self.stores)
        return head + f"method {self.method}, {cells:,} cells from {len(self.stores)} store(s)"


def _describe_source(url: str) -> str:
    """An imported dictionary's file, or which preset, for a dictionary shipped with flow."""
    try:
        inside = Path(url).resolve().relative_to(geneformer.PACKAGE_DIR)
    except (ValueError, OSError):
        return url
    preset = inside.parts[0]
    if preset not in geneformer.PRESETS:
        return url
    name = geneformer.source_name(preset, "medians")
    return f"Geneformer's {preset} medians shipped with flow (converted from {name})"


# --------------------------------------------------------------------------- computing


@dataclass(frozen=True)
class _StoreInputs:
    """What both passes read besides the counts: genes, their collapse, and the cells."""

    gene_ids: np.ndarray
    collapse: sp.csr_matrix | None  # sums the columns sharing one gene; None: no sharing
    n_counts: np.ndarray
    keep: np.ndarray | None  # None: every cell passes filter


def _store_inputs(
    store: CountStore, mapping: GeneMapping | None, n_counts_column: str
) -> _StoreInputs:
    genes = collapse_gene_ids(store.var.index.to_numpy(dtype=str), mapping)
    collapse = None
    if genes.has_duplicates:
        n = genes.n_columns
        collapse = sp.csr_matrix(
            (np.ones(n, dtype=np.float64), (np.arange(n), genes.index)),
            shape=(n, genes.ids.size),
        )
    n_counts, keep = store.cells(n_counts_column)
    return _StoreInputs(genes.ids, collapse, n_counts, None if keep.all() else keep)


def _digest_graph(
    store: CountStore, inputs: _StoreInputs, compression: float, split_every: int
) -> Delayed:
    return nonzero_digests(
        store.counts,
        inputs.n_counts,
        keep=inputs.keep,
        collapse=inputs.collapse,
        compression=compression,
        split_every=split_every,
    )


def _bracket_graph(
    store: CountStore, inputs: _StoreInputs, digests: _tdigest.Digests, split_every: int
) -> Delayed:
    lo, hi = _tdigest.median_bracket(digests)
    return bracket_values(
        store.counts,
        inputs.n_counts,
        lo,
        hi,
        digests.counts,
        keep=inputs.keep,
        collapse=inputs.collapse,
        split_every=split_every,
    )


def compute_medians(
    store: CountStore,
    *,
    compression: float = _tdigest.DEFAULT_COMPRESSION,
    split_every: int = MEDIAN_SPLIT_EVERY,
    n_counts_column: str = "n_counts",
    gene_mapping: GeneMapping | None = None,
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
    inputs = _store_inputs(store, gene_mapping, n_counts_column)
    return inputs.gene_ids, _digest_graph(store, inputs, compression, split_every)


def exact_medians_pass(
    store: CountStore,
    digests: _tdigest.Digests,
    *,
    n_counts_column: str = "n_counts",
    gene_mapping: GeneMapping | None = None,
    split_every: int = MEDIAN_SPLIT_EVERY,
) -> Delayed:
    """Second pass of exact mode, given the first pass's computed digests (lazy).

    Computes to float64 medians bit-identical to ``numpy.median`` of each gene's nonzero values
    (count / n_counts) * 10,000, whatever the block size.
    """
    inputs = _store_inputs(store, gene_mapping, n_counts_column)
    return _bracket_graph(store, inputs, digests, split_every)


def _store_record(store: CountStore) -> dict[str, Any]:
    return {
        "url": store.url,
        "fingerprint": store.fingerprint,
        "n_cells": int(store.attrs["n_cells"]),
    }


def _check_method(method: str, n_stores: int) -> None:
    if method not in ("tdigest", "exact"):
        msg = f"method must be 'tdigest' or 'exact'; got {method!r}."
        raise ValueError(msg)
    if method == "exact" and n_stores > 1:  # the bracket pass needs every cell of one store
        msg = "Exact mode over several stores: convert them into one store first (flow convert A B -o AB)."
        raise VocabularyError(msg)


def medians_of(
    stores: Sequence[CountStore],
    *,
    method: Method = "tdigest",
    compression: float = _tdigest.DEFAULT_COMPRESSION,
    split_every: int = MEDIAN_SPLIT_EVERY,
    n_counts_column: str = "n_counts",
    gene_mapping: GeneMapping | None = None,
    compute: Callable[..., Sequence[Any]] = cluster_compute,
) -> MedianSet:
    """Compute the median set of one or more opened count stores (a compute boundary).

    ``compute`` is the function that runs graphs (default :func:`flow.cluster.compute`).
    With several stores their digests are merged (genes united by ID). Exact mode needs the
    first pass's digests first, so it runs two passes, over one store (several are refused
    before anything is computed: convert them into one store). The result is in memory
    (``location`` None): :func:`write_medians` stores it.
    """
    _check_method(method, len(stores))
    inputs = [_store_inputs(s, gene_mapping, n_counts_column) for s in stores]
    graphs = [
        _digest_graph(s, i, compression, split_every) for s, i in zip(stores, inputs, strict=True)
    ]
    digest_list = compute(*graphs)
    parts = [
        MedianSet(
            i.gene_ids, _tdigest.median(d), d.counts, d, "tdigest", compression, (_store_record(s),)
        )
        for s, i, d in zip(stores, inputs, digest_list, strict=True)
    ]
    if method == "tdigest":
        return merge_median_sets(parts) if len(parts) > 1 else parts[0]
    # exact: one store (checked above), its digests bracket each median for the second pass
    (exact,) = compute(_bracket_graph(stores[0], inputs[0], digest_list[0], split_every))
    return dataclasses.replace(parts[0], medians=np.asarray(exact), method="exact")


# --------------------------------------------------------------------------- merging


def merge_median_sets(sets: Sequence[MedianSet]) -> MedianSet:
    """Merge t-digest median sets (genes united by ID; digests merged, medians recomputed).

    Raises
    ------
    VocabularyError
        A set is exact or imported (no mergeable digests), or compressions differ.
    """
    digests = []
    for s in sets:
        if s.method != "tdigest" or s.digests is None:
            msg = (
                f"Cannot merge a median set computed with method {s.method!r}: only t-digest sets "
                "keep what a merge needs. Recompute it with --method tdigest, or recompute the "
                "exact medians over all stores together."
            )
            raise VocabularyError(msg)
        digests.append(s.digests)
    if len({s.compression for s in sets}) > 1:
        msg = f"Cannot merge median sets with different compressions: {[s.compression for s in sets]}."
        raise VocabularyError(msg)
    all_ids = pd.Index(np.concatenate([s.gene_ids for s in sets])).unique()
    aligned = [
        _reindex(d, all_ids.get_indexer(pd.Index(s.gene_ids)), len(all_ids))
        for s, d in zip(sets, digests, strict=True)
    ]
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
        name,
        shape=data.shape,
        dtype=dtype,
        chunks=chunks,
        dimension_names=(dim,),
        compressors=DEFAULT_CODECS,
    )
    if data.size:
        arr[:] = data


def write_medians(
    medians: MedianSet,
    where: LocationLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> MedianSet:
    """Write a median set to a Zarr store (replacing it); returns it bound to that store.

    The store's metadata is consolidated after the last write (the set is never modified in
    place: a merge or an update writes a whole new set), so ``xarray.open_zarr`` opens it
    without a warning. ``storage_options`` is used only when ``where`` is not already a
    :class:`~flow._location.Location`. The returned set is ``medians`` with ``location`` set:
    use it on without reading the store back.
    """
    location = Location.of(where, storage_options)
    root = create_flow_group(location, KIND, SCHEMA_VERSION)
    _create_1d(root, GENE, np.asarray(medians.gene_ids, dtype=str), GENE)
    _create_1d(root, "median", np.asarray(medians.medians, dtype=np.float64), GENE)
    _create_1d(root, "n_nonzero", np.asarray(medians.n_nonzero, dtype=np.int64), GENE)
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
    # last: the consolidated metadata (read by xarray.open_zarr) includes every array and attr
    with warnings.catch_warnings():  # zarr: consolidated metadata is not in the v3 spec yet
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        zarr.consolidate_metadata(root.store, root.path)
    return dataclasses.replace(medians, location=location)


def _read_digests(root: Any, compression: float | None) -> _tdigest.Digests:
    arrays = {
        k: np.asarray(root[f"digest_{k.rstrip('s')}"][:])
        for k in ("means", "weights", "mins", "maxs")
    }
    arrays["offsets"] = np.asarray(root["digest_offset"][:])
    arrays["compression"] = np.asarray(compression or _tdigest.DEFAULT_COMPRESSION)
    return _tdigest.from_arrays(arrays)


def open_medians(
    where: LocationLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
    digests: bool = True,
) -> MedianSet:
    """Read a median set store (small: one row per gene), or a Geneformer median pickle.

    ``storage_options`` is used only when ``where`` is not already a
    :class:`~flow._location.Location`. ``digests=False`` leaves the t-digests unread
    (``MedianSet.digests`` is None): enough to tokenize, and tens of MB less memory at 20,000
    genes. A store's set is bound to it (``location``); an imported pickle's is not.
    """
    location = Location.of(where, storage_options)
    if location.path.endswith((".pkl", ".pickle")):
        return import_median_dictionary(location.path)
    root: Any = open_flow_group(location, KIND, finish_hint="run `flow medians` again")
    meta = flow_attrs(root)
    compression = meta.get("compression")
    state = None
    if digests and meta["method"] == "tdigest":
        state = _read_digests(root, compression)
    return MedianSet(
        np.asarray(root[_gene_array(root)][:], dtype=object),
        np.asarray(root["median"][:], dtype=np.float64),
        np.asarray(root["n_nonzero"][:], dtype=np.int64),
        state,
        str(meta["method"]),
        compression,
        tuple(meta.get("stores", [])),
        location,
    )


def _gene_array(root: Any) -> str:
    """The name of the array of gene IDs: ``gene`` (schema 2) or ``gene_id`` (schema 1)."""
    return _OLD_GENE if int(flow_attrs(root).get("schema_version", 1)) < 2 else GENE


def open_medians_dataset(
    where: LocationLike, *, storage_options: Mapping[str, Any] | None = None, **kwargs: Any
) -> xr.Dataset:
    """Open a median set store as a lazy :class:`xarray.Dataset` with dimension ``gene``.

    The gene IDs are the ``gene`` coordinate, also for sets written before schema version 2
    (which kept them in a ``gene_id`` variable). ``kwargs`` go to :func:`xarray.open_zarr`.
    """
    location = Location.of(where, storage_options)
    root = open_flow_group(location, KIND)
    old = _gene_array(root) == _OLD_GENE
    options: dict[str, Any] = {"consolidated": not old, **kwargs}
    ds = xr.open_zarr(location.url, storage_options=location.store_options, **options)
    ds.attrs["flow"] = flow_attrs(root)
    if old:
        ds = ds.assign_coords({GENE: ds[_OLD_GENE].values}).drop_vars(_OLD_GENE)
    return ds


# --------------------------------------------------------------------------- interchange


def import_median_dictionary(path: str | os.PathLike[str]) -> MedianSet:
    """Import Geneformer's ``gene_median_dictionary*.pkl`` (read with a restricted unpickler).

    The result is in memory (``location`` None); its record names the pickle.
    """
    return median_set_from_dict(load_dict(path), Location.of(path).url)


def bundled_medians(preset: str) -> MedianSet:
    """Geneformer's gene median dictionary of ``preset`` (``"V1"``/``"V2"``), as shipped with
    flow (see :mod:`flow.geneformer`); equal to importing the pickle it was converted from."""
    name = geneformer.bundled_path(preset, "medians")
    return median_set_from_dict(geneformer.load(preset, "medians"), str(name))


def median_set_from_dict(raw: Mapping[Any, Any], source: str) -> MedianSet:
    """An in-memory median set from ``{gene_id: median}`` (IDs normalised and sorted)."""
    ids = normalize_gene_ids(list(map(str, raw.keys())))
    values = np.asarray([float(v) for v in raw.values()], dtype=np.float64)
    order = np.argsort(ids, kind="stable")
    ids, values = ids[order], values[order]
    if np.unique(ids).size != ids.size:
        msg = (
            f"{source}: gene IDs repeat after normalization (version suffix / case); cannot import."
        )
        raise VocabularyError(msg)
    record = {"url": source, "fingerprint": "imported", "n_cells": -1}
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
