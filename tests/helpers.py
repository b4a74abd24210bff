"""Test helpers: refuse computes while building graphs; compare stores; watch a run."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import zarr


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
        index=pd.Index(src.info.barcodes.astype(object)),
    )
    var = pd.DataFrame(
        {"gene_symbol": np.asarray(src.info.gene_symbols).astype(object)},
        index=pd.Index(src.info.gene_ids.astype(object)),
    )
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return path


def stored_files(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """SHA-256 of every stored object under ``url`` (chunks and metadata), by relative path.

    The root ``zarr.json`` (its attributes record where the store and its inputs are) and an
    export's ``state.json`` (its fingerprint hashes the output path) are left out.
    """
    import hashlib
    import posixpath

    import fsspec

    options = dict(storage_options or {}) if "://" in url else {}
    fs, root = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    out = {}
    for path in fs.find(root):
        rel = posixpath.relpath(path, root)
        if rel not in ("zarr.json", "state.json"):
            out[rel] = hashlib.sha256(fs.cat_file(path)).hexdigest()
    return out


def array_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every array of a Zarr store, decoded: (dtype, shape, chunks, SHA-256 of the values)."""
    import hashlib

    import numpy as np
    import zarr

    opts = dict(storage_options or {}) if "://" in url else None
    group = zarr.open_group(url, mode="r", storage_options=opts)
    out = {}
    for name, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            values = node[...]
            if values.dtype.kind in "OTU":  # strings: compare the text
                data = "\x00".join(map(str, np.ravel(values).tolist())).encode()
            else:
                data = np.ascontiguousarray(values).tobytes()
            out[name] = (
                str(values.dtype),
                values.shape,
                node.chunks,
                hashlib.sha256(data).hexdigest(),
            )
    return out


def flow_meta(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    drop: tuple[str, ...] = ("counts_url",),
) -> dict[str, Any]:
    """A store's ``attrs["flow"]`` without ``drop`` keys and the URLs of the stores it covers."""
    import zarr

    opts = dict(storage_options or {}) if "://" in url else None
    meta = dict(zarr.open_group(url, mode="r", storage_options=opts).attrs["flow"])
    for key in drop:
        meta.pop(key, None)
    if "stores" in meta:  # a median set: the count stores it covers
        meta["stores"] = [{k: v for k, v in s.items() if k != "url"} for s in meta["stores"]]
    return meta


def block_done(encoding: Path) -> np.ndarray | None:
    """The ``block_done`` flags of an encoding store being written (None if not there yet)."""
    try:
        return np.asarray(zarr.open_array(encoding / "block_done", mode="r")[:], dtype=bool)
    except Exception:  # not created yet, or being created right now
        return None


def wait_for_blocks(encoding: Path, proc: subprocess.Popen[Any], *, timeout: float = 120) -> int:
    """Wait until some but not all blocks of ``encoding`` are done; return how many are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = block_done(encoding)
        if done is not None and 0 < done.sum() < done.size:
            return int(done.sum())
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    pytest.fail(f"no block of {encoding} was written within {timeout} s")


def plant_cut_write(encoding: Path) -> Path:
    """Leave what a chunk write cut off by a kill leaves in a local store: zarr's temporary
    ``<chunk>.<uuid>.partial`` file, here in the first block not done yet."""
    done = block_done(encoding)
    assert done is not None
    assert not done.all()
    tokens = zarr.open_array(encoding / "bands" / "0" / "tokens", mode="r")
    start = int(zarr.open_array(encoding / "band_start", mode="r")[np.flatnonzero(~done)[0], 0])
    folder = encoding / "bands" / "0" / "tokens" / "c"  # the block's first chunk of band 0
    folder.mkdir(parents=True, exist_ok=True)
    leftover = folder / f"{start // tokens.chunks[0]}.0123456789abcdef.partial"
    leftover.write_bytes(b"cut")
    return leftover
