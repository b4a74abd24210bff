"""The obs and var tables of a count store: written a slice at a time, in anndata's encoding.

Private to :mod:`flow.store` (its writer). Barcodes are made unique across the inputs,
carried input columns are united over the sources (a source without a column fills it in),
and every column but the categoricals is written in consecutive slices, so no per-cell table
is held whole.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anndata as ad  # ~0.1 s on top of flow's own imports (measured): not worth hiding
import numpy as np
import pandas as pd
import zarr
from pandas.api.types import union_categoricals

from ._io import DEFAULT_CODECS, ChunkedWriter, create_1d, write_1d
from .errors import FlowWarning

if TYPE_CHECKING:
    from .ingest._source import Source

__all__ = [
    "OBS_STEP",
    "barcode_slices",
    "carried_column",
    "carried_obs",
    "obs_array",
    "obs_column_name",
    "obs_group",
    "unique_barcodes",
    "write_obs",
    "write_var",
]

OBS_STEP = 1 << 16  # cells per chunk of an obs column, and per slice written
_CARRIED_RESERVED = ("n_counts", "n_genes", "source")


def barcode_slices(sources: Sequence[Source]) -> Iterator[np.ndarray]:
    """The sources' barcodes as they are, in consecutive slices of at most ``OBS_STEP``."""
    for src in sources:
        for a in range(0, src.info.n_cells, OBS_STEP):
            yield np.asarray(src.info.barcodes[a : a + OBS_STEP], dtype=object)


def unique_barcodes(sources: Sequence[Source]) -> np.ndarray | None:
    """None when the sources' barcodes are unique; else all of them made unique (``-1``,
    ``-2`` ... appended to repeats, with a warning).

    Uniqueness is checked on 64-bit hashes (8 bytes per cell), not on an index of the strings;
    only when two hashes are equal are the strings themselves compared.
    """
    hashes = np.concatenate([pd.util.hash_array(piece) for piece in barcode_slices(sources)])
    hashes.sort()
    if not (hashes[1:] == hashes[:-1]).any():
        return None
    del hashes
    barcodes = pd.Index(
        np.concatenate([np.asarray(s.info.barcodes, dtype=object) for s in sources])
    )
    dup = barcodes.duplicated(keep="first")
    n_dup = int(dup.sum())
    counter = barcodes.to_series().groupby(barcodes).cumcount().to_numpy()
    fixed = np.where(dup, barcodes.astype(str) + "-" + counter.astype(str), barcodes.astype(str))
    while not pd.Index(fixed).is_unique:  # a made-up name can itself exist already
        again = pd.Index(fixed).duplicated(keep="first")
        fixed = np.where(again, fixed + "-dup", fixed)
    if n_dup:  # else: equal hashes of different strings
        warnings.warn(
            f"{n_dup} duplicate cell barcodes across the inputs were made unique by appending "
            "'-1', '-2', ... (the input column 'source' tells which file each cell came from).",
            FlowWarning,
            stacklevel=4,  # the caller of write_counts
        )
    return np.asarray(fixed, dtype=object)


def carried_obs(sources: Sequence[Source]) -> list[str]:
    """Obs columns carried from the inputs: every column any source has, in first-seen order."""
    names: list[str] = []
    for src in sources:
        names.extend(c for c in map(str, src.info.obs.columns) if c not in names)
    return names


def obs_column_name(name: str) -> str:
    return f"input_{name}" if name in _CARRIED_RESERVED else name


def carried_column(name: str, sources: Sequence[Source]) -> Iterable[np.ndarray] | pd.Categorical:
    """One obs column over all sources (consecutive slices); a source without it fills it in.

    The fill is 1 for ``filter_pass`` (no column means every cell passes, as in Geneformer),
    NaN for numbers and "" for text; booleans and numbers stay numbers when no fill is needed.
    When every source holds the column as a categorical (readers hold repetitive text so) it
    stays one, with the union of the categories; other text becomes ``str``.
    """
    columns = [s.info.obs[name] if name in s.info.obs.columns else None for s in sources]
    present = [c for c in columns if c is not None]
    if all(isinstance(c.dtype, pd.CategoricalDtype) for c in present):
        fill = "1" if name == "filter_pass" else ""
        parts = [
            c.array
            if c is not None
            else pd.Categorical.from_codes(np.zeros(s.info.n_cells, np.int8), categories=[fill])
            for c, s in zip(columns, sources, strict=True)
        ]
        return union_categoricals(parts) if len(parts) > 1 else parts[0]
    numeric = all(c.dtype.kind in "biuf" for c in present)
    fill_value: Any = 1 if name == "filter_pass" else (np.nan if numeric else "")
    out_dtype = np.dtype(object)
    if numeric:  # as numpy concatenates them (NaN fills make integers float)
        fills = [np.asarray(fill_value).dtype] if len(present) < len(sources) else []
        out_dtype = np.result_type(*(c.dtype for c in present), *fills)

    def piece(column: pd.Series | None, a: int, b: int) -> np.ndarray:
        if column is None:
            return np.full(b - a, fill_value, dtype=out_dtype)
        values = np.asarray(column.iloc[a:b].to_numpy())
        if numeric:
            return values.astype(out_dtype)
        return np.asarray([_text(v) for v in values], dtype=object)

    return (
        piece(column, a, min(a + OBS_STEP, src.info.n_cells))
        for column, src in zip(columns, sources, strict=True)
        for a in range(0, src.info.n_cells, OBS_STEP)
    )


def _text(value: Any) -> str:
    """A cell's text value: missing ones (None, NaN) as ""."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def obs_group(root: zarr.Group, columns: list[str]) -> zarr.Group:
    """Create ``obs`` in anndata's dataframe encoding (columns written separately)."""
    obs = root.create_group("obs")
    obs.attrs.update(
        {
            "_index": "_index",
            "column-order": columns,
            "encoding-type": "dataframe",
            "encoding-version": "0.2.0",
        }
    )
    return obs


def obs_attrs(dtype: Any) -> dict[str, str]:
    """anndata's encoding attributes of a plain obs column of ``dtype``."""
    text = np.dtype(dtype).kind in "OUST"
    return {"encoding-type": "string-array" if text else "array", "encoding-version": "0.2.0"}


def obs_array(obs: zarr.Group, name: str, dtype: Any, n_cells: int) -> ChunkedWriter:
    """A writer of one obs column (anndata's array encoding), filled in order."""
    attrs = obs_attrs(dtype)
    return create_1d(obs, name, dtype, size=n_cells, chunk=OBS_STEP, dim="cell", attrs=attrs)


def write_obs(
    obs: zarr.Group, columns: Mapping[str, Iterable[np.ndarray] | pd.Categorical], n_cells: int
) -> None:
    """Write obs columns: categoricals with anndata, the others one slice at a time."""
    for name, column in columns.items():
        if isinstance(column, pd.Categorical):  # one small code per cell
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zarr v3 string dtype spec warnings (third party)
                ad.io.write_elem(obs, name, column, dataset_kwargs={"compressors": DEFAULT_CODECS})
            continue
        pieces = iter(column)
        first = next(pieces)  # its dtype is the column's
        attrs = obs_attrs(first.dtype)
        pieces = itertools.chain([first], pieces)
        write_1d(obs, name, pieces, size=n_cells, chunk=OBS_STEP, dim="cell", attrs=attrs)


def write_var(root: zarr.Group, var: pd.DataFrame) -> None:
    """Write var (one row per gene: small) with anndata, and the empty elements it expects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr v3 string dtype spec warnings (third party)
        ad.io.write_elem(root, "var", var, dataset_kwargs={"compressors": DEFAULT_CODECS})
        for name in ("obsm", "obsp", "varm", "varp", "layers", "uns"):
            ad.io.write_elem(root, name, {})
