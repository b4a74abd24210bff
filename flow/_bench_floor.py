"""The plain floors of ``flow tokenize`` and ``flow run``: the step with nothing but numpy.

Run as a script, not as ``-m flow._bench_floor``: it must not pay for importing flow (run it
from a copy outside the package: beside flow's modules its imports would find flow's own).
:mod:`flow.bench` runs it beside ``flow tokenize`` and ``flow run`` on the same data::

    python floor.py zarr STORE.zarr MEDIANS.npy TOKENS.npy OUT PROCESSES   # tokenize-floor
    python floor.py h5ad INPUT.h5ad MEDIANS.npy TOKENS.npy OUT PROCESSES   # run-floor

``MEDIANS.npy`` (float64) and ``TOKENS.npy`` (int32) hold one entry per column of the input;
a negative token marks a column outside the vocabulary (dropped, as flow drops it). Per block
of cells (the count store's blocks; 4,096 cells of the h5ad), in ``PROCESSES`` processes:

1. read the block's CSR entries (zarr, or h5py: the input's nonzeros, read once);
2. normalise: ``count / n_counts * 10,000 / median`` (``n_counts`` is the store's column, or
   the cell's total over all columns of the h5ad, summed from the same entries);
3. one ``argsort`` of packed 64-bit keys (cell, inverted value bits) over the whole block;
4. gather tokens and counts in ranked order and write both raw (uncompressed ``.npy``).

No gene-ID mapping, no checks, no exact tie order, no resume, no cell table: a floor, not a
tokenizer. Prints the number of cells ranked.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

import h5py
import numpy as np
import zarr

H5AD_BLOCK = 4096
_STATE: dict[str, Any] = {}


def _common(medians: str, tokens: str, out: str) -> None:
    tok = np.load(tokens)
    top = int(tok.max(initial=0))
    _STATE.update(
        medians=np.load(medians),
        tokens=tok.astype(np.uint16 if top < 2**16 else np.int32),
        keep=(tok >= 0) if bool((tok < 0).any()) else None,
        out=out,
    )


def _init_zarr(store: str, medians: str, tokens: str, out: str) -> None:
    root: Any = zarr.open_group(store, mode="r")
    _STATE.update(
        data=root["X"]["data"],
        indices=root["X"]["indices"],
        n_counts=np.asarray(root["obs"]["n_counts"][:], dtype=np.float64),
        indptr=np.asarray(root["X"]["indptr"][:], dtype=np.int64),
    )
    _common(medians, tokens, out)


def _init_h5ad(path: str, medians: str, tokens: str, out: str) -> None:
    f = h5py.File(path, "r")
    _STATE.update(
        data=f["X/data"],
        indices=f["X/indices"],
        n_counts=None,
        indptr=np.asarray(f["X/indptr"][:], dtype=np.int64),
    )
    _common(medians, tokens, out)


def _block(rows: tuple[int, int]) -> int:
    r0, r1 = rows
    s = _STATE
    indptr = s["indptr"]
    a, b = int(indptr[r0]), int(indptr[r1])
    data = s["data"][a:b]
    cols = s["indices"][a:b]
    lens = np.diff(indptr[r0 : r1 + 1])
    if s["n_counts"] is None:  # the total over all genes of the input, from the same entries
        total = np.concatenate([[0.0], np.cumsum(data, dtype=np.float64)])
        ends = indptr[r0 : r1 + 1] - a
        n_counts = total[ends[1:]] - total[ends[:-1]]
    else:
        n_counts = s["n_counts"][r0:r1]
    row = np.repeat(np.arange(r1 - r0, dtype=np.int64), lens)
    if s["keep"] is not None:  # genes outside the vocabulary
        kept = s["keep"][cols]
        data, cols, row = data[kept], cols[kept], row[kept]
    values = data / n_counts[row] * 10_000.0 / s["medians"][cols]
    key = row.astype(np.uint64) << np.uint64(52)
    key |= ~values.view(np.uint64) >> np.uint64(12)
    order = np.argsort(key)
    np.save(os.path.join(s["out"], f"{r0}.tokens.npy"), s["tokens"][cols[order]])
    np.save(os.path.join(s["out"], f"{r0}.counts.npy"), data[order])
    return r1 - r0


def _grid(source: str, path: str) -> tuple[int, int]:
    """Cells and cells per block of the input."""
    if source == "zarr":
        root: Any = zarr.open_group(path, mode="r")
        return int(root["X"]["indptr"].shape[0]) - 1, int(root.attrs["flow"]["block_size"])
    with h5py.File(path, "r") as f:
        return int(f["X/indptr"].shape[0]) - 1, H5AD_BLOCK


def run(source: str, path: str, medians: str, tokens: str, out: str, processes: int) -> int:
    """Rank every block of ``path`` (``source`` ``"zarr"`` or ``"h5ad"``); returns the cells."""
    n_cells, block = _grid(source, path)
    os.makedirs(out, exist_ok=True)
    blocks = [(r, min(r + block, n_cells)) for r in range(0, n_cells, block)]
    init = _init_zarr if source == "zarr" else _init_h5ad
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, initializer=init, initargs=(path, medians, tokens, out)) as pool:
        return sum(pool.imap_unordered(_block, blocks))


if __name__ == "__main__":
    source_arg, path_arg, medians_arg, tokens_arg, out_arg, processes_arg = sys.argv[1:7]
    n = run(source_arg, path_arg, medians_arg, tokens_arg, out_arg, int(processes_arg))
    print(n)
