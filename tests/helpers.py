"""Test helpers: refuse computes while building graphs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dask


class CountingScheduler:
    """A dask scheduler that counts computes and raises past ``max_computes``."""

    def __init__(self, max_computes: int = 0) -> None:
        self.total = 0
        self.max_computes = max_computes

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        self.total += 1
        if self.total > self.max_computes:
            msg = f"Too many dask computations were scheduled: {self.total}"
            raise RuntimeError(msg)
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def no_compute(max_computes: int = 0) -> Iterator[CountingScheduler]:
    """Inside this block, computing any dask collection raises."""
    sched = CountingScheduler(max_computes)
    with dask.config.set(scheduler=sched):
        yield sched


def write_synthetic_h5ad(
    path: Any, n_cells: int, n_genes: int, *, seed: int, mean_genes: float, fail_every: int
) -> Any:
    """A synthetic h5ad input: raw counts, a cell type, and filter_pass failing every n-th cell."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from flow.datasets import synthetic_counts

    src = synthetic_counts(n_cells, n_genes, seed=seed, mean_genes=mean_genes)
    x = sp.vstack(list(src.iter_blocks(n_cells)), format="csr")
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(src.info.obs["cell_type"].to_numpy()),
            "filter_pass": (np.arange(n_cells) % fail_every != fail_every - 1).astype(np.int8),
        },
        index=pd.Index(src.info.barcodes.astype(str)),
    )
    var = pd.DataFrame(
        {"gene_symbol": np.asarray(src.info.gene_symbols, dtype=str)},
        index=pd.Index(src.info.gene_ids.astype(str)),
    )
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return path
