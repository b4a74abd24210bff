"""The stages chained together; the only place (with the CLI) that decides what to compute when.

Each function here is a compute boundary: it reads inputs, runs graphs on the current Dask
client (see :mod:`flow.cluster`) and writes a store.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .store import DEFAULT_BLOCK_SIZE, CountStore, write_counts

__all__ = ["convert", "demo", "describe_counts", "describe_medians", "medians"]


def convert(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    format: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_id_column: str | None = None,
    obs_columns: Sequence[str] | None = None,
    genome: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    allow_non_integer: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: Any = None,
) -> CountStore:
    """Convert input matrices into one count store (computes and writes; see :func:`write_counts`)."""
    from .ingest import open_source

    sources = [
        open_source(
            p,
            format=format,
            layer=layer,
            use_raw=use_raw,
            gene_id_column=gene_id_column,
            obs_columns=list(obs_columns) if obs_columns is not None else None,
            genome=genome,
        )
        for p in inputs
    ]
    return write_counts(
        sources,
        output,
        block_size=block_size,
        allow_non_integer=allow_non_integer,
        storage_options=storage_options,
        progress=progress,
    )


def describe_counts(store: CountStore) -> str:
    """A short human-readable summary of a count store (reads obs only)."""
    a = store.attrs
    genes = store.obs["n_genes"].to_numpy()
    q = np.percentile(genes, [0, 50, 90, 99, 100]) if genes.size else np.zeros(5)
    sources = "\n".join(
        f"    {s['path']} ({s['format']}, {s['n_cells']:,} cells)" for s in a["sources"]
    )
    return (
        f"count store {store.url}\n"
        f"  cells x genes: {a['n_cells']:,} x {a['n_genes']:,}; nonzeros {a['nnz']:,}; dtype {a['dtype']}\n"
        f"  detected genes per cell: min {q[0]:.0f}, median {q[1]:.0f}, p90 {q[2]:.0f}, "
        f"p99 {q[3]:.0f}, max {q[4]:.0f}\n"
        f"  blocks: {store.n_blocks} of {a['block_size']:,} cells\n"
        f"  sources:\n{sources}"
    )


def medians(
    stores: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] | None,
    *,
    method: str = "tdigest",
    compression: float | None = None,
    update: str | os.PathLike[str] | None = None,
    merge: Sequence[str | os.PathLike[str]] = (),
    import_dictionary: str | os.PathLike[str] | None = None,
    export: str | os.PathLike[str] | None = None,
    n_counts_column: str = "n_counts",
    gene_mapping: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    quiet: bool = True,
) -> Any:
    """Compute, merge, update, import and/or export a median set (computes and writes).

    ``update`` and ``merge`` name existing median sets whose digests are merged with those of
    ``stores``; the old data is not read again. Returns the resulting :class:`MedianSet`.
    """
    from functools import partial

    from . import medians as med
    from .cluster import compute
    from .sketch import _tdigest
    from .store import open_counts
    from .vocab import read_gene_mapping

    mapping = read_gene_mapping(gene_mapping) if gene_mapping else None
    parts = []
    if import_dictionary is not None:
        parts.append(med.import_median_dictionary(import_dictionary))
    for path in [*([update] if update else []), *merge]:
        parts.append(med.open_medians(path, storage_options=storage_options))
    if stores:
        opened = [open_counts(s, storage_options=storage_options) for s in stores]
        parts.append(
            med.medians_of(
                opened,
                method=method,  # type: ignore[arg-type]
                compression=compression or _tdigest.DEFAULT_COMPRESSION,
                n_counts_column=n_counts_column,
                gene_mapping=mapping,
                compute=partial(compute, quiet=quiet, label=f"medians ({method})"),
            )
        )
    result = med.merge_median_sets(parts) if len(parts) > 1 else parts[0]
    if output is not None:
        med.write_medians(result, output, storage_options=storage_options)
    if export is not None:
        med.export_medians(result, export)
    return result


def describe_medians(result: Any, output: str | os.PathLike[str] | None) -> str:
    """A short summary of a median set."""
    expressed = int(np.sum(~np.isnan(result.medians)))
    where = f" -> {output}" if output else ""
    cells = sum(max(0, int(s.get("n_cells", 0))) for s in result.stores)
    return (
        f"median set{where}: {len(result.gene_ids):,} genes ({expressed:,} expressed), "
        f"method {result.method}, {cells:,} cells from {len(result.stores)} store(s)"
    )


def demo(
    outdir: str | os.PathLike[str],
    *,
    n_cells: int = 20_000,
    n_genes: int = 20_000,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, str]:
    """The whole pipeline on seeded synthetic data, printing what it did (computes and writes).

    Returns the paths of what it wrote.
    """
    import sys
    import time

    from .cli._common import TextProgress
    from .datasets import write_synthetic

    os.makedirs(outdir, exist_ok=True)
    paths = {"counts": os.path.join(outdir, "counts.zarr"), "medians": os.path.join(outdir, "medians.zarr")}

    def say(text: str) -> None:
        print(text, file=sys.stderr if quiet else sys.stdout)

    t0 = time.perf_counter()
    say(f"[1/2] generating {n_cells:,} synthetic cells x {n_genes:,} genes (seed {seed}) into {paths['counts']}")
    store = write_synthetic(
        paths["counts"], n_cells, n_genes, seed=seed, progress=TextProgress("      cells", quiet=quiet)
    )
    say(describe_counts(store))
    t1 = time.perf_counter()
    say(f"      {n_cells / (t1 - t0):,.0f} cells/s")
    say(f"[2/2] per-gene nonzero medians (t-digest) -> {paths['medians']}")
    result = medians([paths["counts"]], paths["medians"], quiet=quiet)
    say(describe_medians(result, paths["medians"]))
    t2 = time.perf_counter()
    say(f"      {n_cells / (t2 - t1):,.0f} cells/s")
    say(f"Done in {t2 - t0:.1f} s. Results are in {os.path.abspath(outdir)}/")
    return paths
