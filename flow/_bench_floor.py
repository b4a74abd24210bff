"""The plain floor of ``flow tokenize``: what the step costs with nothing but numpy and zarr.

Run as a script (``python path/to/_bench_floor.py STORE MEDIANS.npy TOKENS.npy OUT PROCESSES``),
not as ``-m flow._bench_floor``: it must not pay for importing flow. :mod:`flow.bench` runs it
beside ``flow tokenize`` on the same count store and reports the ratio.

Per cell block of the store, in ``PROCESSES`` processes: read the block's CSR entries, normalise
(``count / n_counts * 10,000 / median``), one ``argsort`` of packed 64-bit keys (cell, inverted
value bits), gather tokens and counts in ranked order, write both raw (uncompressed ``.npy``).
No gene map, no checks, no exact tie order, no resume: a floor, not a tokenizer.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

import numpy as np
import zarr

_STATE: dict[str, Any] = {}


def _init(store: str, medians: str, tokens: str, out: str) -> None:
    root: Any = zarr.open_group(store, mode="r")
    _STATE.update(
        x=root["X"],
        n_counts=np.asarray(root["obs"]["n_counts"][:], dtype=np.float64),
        indptr=np.asarray(root["X"]["indptr"][:], dtype=np.int64),
        medians=np.load(medians),
        tokens=np.load(tokens),
        out=out,
    )


def _block(rows: tuple[int, int]) -> int:
    r0, r1 = rows
    s = _STATE
    indptr = s["indptr"]
    a, b = int(indptr[r0]), int(indptr[r1])
    data = s["x"]["data"][a:b]
    cols = s["x"]["indices"][a:b]
    row = np.repeat(np.arange(r1 - r0, dtype=np.uint64), np.diff(indptr[r0 : r1 + 1]))
    values = data / s["n_counts"][r0:r1][row.astype(np.int64)] * 10_000.0 / s["medians"][cols]
    key = row << np.uint64(52)
    key |= ~values.view(np.uint64) >> np.uint64(12)
    order = np.argsort(key)
    np.save(os.path.join(s["out"], f"{r0}.tokens.npy"), s["tokens"][cols[order]])
    np.save(os.path.join(s["out"], f"{r0}.counts.npy"), data[order])
    return r1 - r0


def run(store: str, medians: str, tokens: str, out: str, processes: int) -> int:
    """Rank every block of ``store``; returns the number of cells."""
    root: Any = zarr.open_group(store, mode="r")
    n_cells = int(root["X"]["indptr"].shape[0]) - 1
    block = int(root.attrs["flow"]["block_size"])
    os.makedirs(out, exist_ok=True)
    blocks = [(r, min(r + block, n_cells)) for r in range(0, n_cells, block)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, initializer=_init, initargs=(store, medians, tokens, out)) as pool:
        return sum(pool.imap_unordered(_block, blocks))


if __name__ == "__main__":
    store_arg, medians_arg, tokens_arg, out_arg, processes_arg = sys.argv[1:6]
    n = run(store_arg, medians_arg, tokens_arg, out_arg, int(processes_arg))
    print(n)
