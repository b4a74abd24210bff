"""End to end against the floor (:mod:`flow.bench`): inputs, the floors, and the bare kernel.

- :func:`write_h5ad` writes a synthetic CSR h5ad out of core, with Geneformer V1 gene IDs
  (:func:`v1_gene_ids`) so that ``flow run --preset V1`` matches them; :data:`SHAPES` names
  the shapes of the issue's data sets (``pbmc90k``: 33,538 genes, ~1,000 median detected genes
  per cell, a long tail of deep cells).
- :func:`run_floor_command` is the plain floor of ``flow run`` with given dictionaries
  (:mod:`flow._bench_floor` on the h5ad), :func:`floor_command` that of ``flow tokenize``.
- ``python -m flow._bench_e2e STORE ...`` (:func:`main`) profiles the bare rank kernel in a
  process of its own: the peak memory of one block, then every block in turn (seconds of
  read, gene map and rank kernel), writing the rankings flat, with no padding at all, with the
  encoding store's codecs and chunks, to measure the bytes of that layout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import zarr

from ._genes import normalize_gene_ids
from .datasets import SyntheticCounts, synthetic_counts
from .encode._bands import FLAT_CHUNK
from .encode._kernels import rank_block_flat
from .encode.store import RANKING_CODECS, EncodingPlan, plan_encoding
from .medians import MedianSet, bundled_medians
from .pipeline import load_medians, load_vocabulary, preset_dictionaries
from .store import open_counts
from .vocab import Vocabulary, bundled_vocabulary

__all__ = [
    "SHAPES",
    "Shape",
    "cluster_start_command",
    "disk_bytes",
    "floor_command",
    "genes_per_cell",
    "main",
    "run_floor_command",
    "synthetic_options",
    "v1_gene_ids",
    "write_h5ad",
]

#: The plain numpy floors, run as a script (they must not import flow).
FLOOR_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bench_floor.py")


@dataclass(frozen=True)
class Shape:
    """A synthetic data set's shape: cells, genes, and the spread of detected genes per cell.

    ``library_sigma`` (sd of the log library size) is passed to
    :class:`flow.datasets.SyntheticCounts` when it has that parameter (None: its default).
    """

    cells: int
    genes: int
    genes_per_cell: float
    library_sigma: float | None = None


#: ``pbmc90k``: the issue's 90,000 real PBMC cells (33,538 genes, median 1,033 detected genes
#: per cell, p99 4,541, max 7,383, 116M nonzeros). Measured at 90,000 cells (seed 1): library
#: sigma 0.75 gives median 985, p99 3,621, max 7,169; 0.85 gives 985 / 4,169 / 8,725 (108M
#: nonzeros); 0.9 gives 985 / 4,464 / 9,489. 0.85: the p99 within 10%, a deeper deepest cell.
SHAPES = {"pbmc90k": Shape(90_000, 33_538, 1_000.0, library_sigma=0.85)}


def synthetic_options(shape_sigma: float | None) -> dict[str, Any]:
    """``library_sigma`` for the generator, if it has that parameter and one is asked for."""
    known = {f.name for f in dataclasses.fields(SyntheticCounts)}
    if shape_sigma is None or "library_sigma" not in known:
        return {}
    return {"library_sigma": shape_sigma}


def v1_gene_ids(n_genes: int, *, seed: int | None = 0) -> np.ndarray:
    """``n_genes`` Ensembl IDs: Geneformer V1's (in both its medians and its vocabulary), then
    filler IDs outside it; shuffled with ``seed`` (as a real file lists its genes: in genome
    order, not the vocabulary's, so tokenize's gene map has rows to reorder), or, with
    ``seed=None``, the vocabulary's genes sorted first."""
    vocab = set(bundled_vocabulary("V1").gene_ids.tolist())
    ids = [g for g in bundled_medians("V1").gene_ids.tolist() if g in vocab]
    ids = sorted(ids)[:n_genes]
    ids += [f"ENSGFAKE{i:08d}" for i in range(n_genes - len(ids))]
    out = np.array(ids, dtype=object)
    return out if seed is None else out[np.random.default_rng(seed).permutation(out.size)]


def write_h5ad(
    path: str,
    n_cells: int,
    n_genes: int,
    *,
    seed: int,
    mean_genes: float,
    block: int = 4096,
    gene_ids: np.ndarray | None = None,
    library_sigma: float | None = None,
) -> None:
    """Write a synthetic CSR h5ad block by block with h5py (out of core).

    ``gene_ids`` replaces the generator's gene IDs (e.g. :func:`v1_gene_ids`);
    ``library_sigma`` is passed to the generator when it has that parameter.
    """
    src = synthetic_counts(
        n_cells, n_genes, seed=seed, mean_genes=mean_genes, **synthetic_options(library_sigma)
    )
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = f.create_group("X")
        x.attrs.update(
            {
                "encoding-type": "csr_matrix",
                "encoding-version": "0.1.0",
                "shape": (n_cells, n_genes),
            }
        )
        entries = {"chunks": (1 << 18,), "maxshape": (None,), "shape": (0,), "dtype": "int32"}
        data = x.create_dataset("data", **entries)
        indices = x.create_dataset("indices", **entries)
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        row = 0
        for blk in src.iter_blocks(block):
            n0 = data.shape[0]
            data.resize((n0 + blk.nnz,))
            indices.resize((n0 + blk.nnz,))
            data[n0:] = blk.data.astype(np.int32)
            indices[n0:] = blk.indices
            indptr[row + 1 : row + 1 + blk.shape[0]] = blk.indptr[1:] + n0
            row += blk.shape[0]
        x.create_dataset("indptr", data=indptr)
        ids = src.info.gene_ids if gene_ids is None else gene_ids
        obs = pd.DataFrame(
            {"cell_type": src.info.obs["cell_type"].astype(str).to_numpy()},
            index=pd.Index(src.info.barcodes.astype(object)),
        )
        var = pd.DataFrame(
            {"gene_symbol": np.asarray(src.info.gene_symbols).astype(object)},
            index=pd.Index(np.asarray(ids).astype(object)),
        )
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)


def genes_per_cell(h5ad: str) -> dict[str, float]:
    """Detected genes per cell of a CSR h5ad: median, p99, max, and the nonzeros in all."""
    with h5py.File(h5ad, "r") as f:
        d = np.diff(np.asarray(f["X/indptr"][:], dtype=np.int64))
    return {
        "median": float(np.median(d)),
        "p99": float(np.percentile(d, 99)),
        "max": float(d.max(initial=0)),
        "nnz": float(d.sum()),
    }


def _floor_script(work: str) -> str:
    # run from a copy: beside flow's own modules, its imports would find flow/_pickle.py etc.
    return shutil.copy(FLOOR_SCRIPT, os.path.join(work, "floor.py"))


def _column_dictionaries(
    gene_ids: np.ndarray, median_set: MedianSet, vocab: Vocabulary | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the median (1.0 where none) and the token (-1: outside the vocabulary;
    without ``vocab``, the column number for every gene with a median)."""
    ids = normalize_gene_ids(np.asarray(gene_ids, dtype=str)).tolist()
    table = dict(zip(median_set.gene_ids.tolist(), median_set.medians.tolist(), strict=True))
    medians = np.array([table.get(g, np.nan) for g in ids], dtype=np.float64)
    ok = np.isfinite(medians) & (medians > 0)
    if vocab is None:
        tokens = np.arange(len(ids), dtype=np.int32)
    else:
        token_of = dict(zip(vocab.gene_ids.tolist(), vocab.token_ids.tolist(), strict=True))
        tokens = np.array([token_of.get(g, -1) for g in ids], dtype=np.int32)
        tokens[~ok] = -1
    medians[~ok] = 1.0
    return medians, tokens


def _floor_argv(
    work: str, source: str, path: str, columns: tuple[np.ndarray, np.ndarray], processes: int
) -> list[str]:
    medians, tokens = columns
    np.save(os.path.join(work, f"floor-{source}-medians.npy"), medians)
    np.save(os.path.join(work, f"floor-{source}-tokens.npy"), tokens)
    out = os.path.join(work, f"floor-{source}")
    shutil.rmtree(out, ignore_errors=True)
    return [
        sys.executable, _floor_script(work), source, path,
        os.path.join(work, f"floor-{source}-medians.npy"),
        os.path.join(work, f"floor-{source}-tokens.npy"), out, str(processes),
    ]  # fmt: skip


def floor_command(work: str, processes: int) -> list[str]:
    """The floor of ``flow tokenize`` on ``work``'s ``counts.zarr`` and ``medians.zarr``
    (every gene with a median ranked, as the vocabulary built from the medians does)."""
    store = open_counts(os.path.join(work, "counts.zarr"))
    median_set = load_medians(os.path.join(work, "medians.zarr"))
    columns = _column_dictionaries(store.var.index.to_numpy(dtype=str), median_set, None)
    return _floor_argv(work, "zarr", store.url, columns, processes)


def run_floor_command(work: str, h5ad: str, processes: int, preset: str = "V1") -> list[str]:
    """The floor of ``flow run --preset V1`` on ``h5ad``: its nonzeros read once (h5py),
    genes outside the preset's vocabulary dropped, normalised by the preset's medians, one
    sort per 4,096 cells, raw tokens and counts written (see :mod:`flow._bench_floor`)."""
    with h5py.File(h5ad, "r") as f:
        ids = ad.io.read_elem(f["var"]).index.to_numpy(dtype=str)
    dicts = preset_dictionaries(preset)
    columns = _column_dictionaries(ids, dicts["medians"], dicts["vocabulary"])
    return _floor_argv(work, "h5ad", h5ad, columns, processes)


_CLUSTER_START = """
import json, time
from flow.cluster import flow_client
start = time.perf_counter()
with flow_client(n_workers={workers}, threads_per_worker={threads}, memory_limit={memory!r},
                 quiet=True) as client:
    client.wait_for_workers({workers})
    print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def cluster_start_command(workers: int, threads: int, memory_limit: str) -> list[str]:
    """A command printing (JSON) the seconds flow takes to start its local cluster with these
    options, once flow is imported: the cluster part of a command's start-up."""
    code = _CLUSTER_START.format(workers=workers, threads=threads, memory=memory_limit)
    return [sys.executable, "-c", code]


def disk_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (a local store)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# --------------------------------------------------------------------------- the bare kernel


def _plan(store: str, medians: str | None, preset: str | None) -> EncodingPlan:
    """The plan ``flow tokenize`` makes: with a median set's store (its vocabulary built from
    it), or with a preset's Geneformer dictionaries (as ``flow run --preset``)."""
    counts = open_counts(store)
    if preset is not None:
        d = preset_dictionaries(preset)
        return plan_encoding(counts, d["medians"], d["vocabulary"], gene_mapping=d["gene_mapping"])
    median_set = load_medians(str(medians))
    return plan_encoding(counts, median_set, load_vocabulary(None, median_set))


def _reset_rss_peak() -> None:
    """Reset this process's peak resident memory (Linux: ``/proc/self/clear_refs``)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _rss() -> tuple[int, int]:
    """This process's resident memory now and its peak since the last reset (bytes)."""
    now = peak = 0
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                value = int(line.split()[1]) * 1024
                now, peak = (value, peak) if line.startswith("VmRSS") else (now, value)
    if not peak:  # not Linux: the peak since the process started
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return now, peak


def _rank(
    plan: EncodingPlan, b: int, times: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Read, gene-map and rank block ``b`` as a tokenize task does, timing each step."""
    edges = np.cumsum((0, *plan.store.counts.chunks[0]))
    r0, r1 = int(edges[b]), int(edges[b + 1])
    t0 = time.perf_counter()
    block = plan.store.counts.blocks[b, 0].compute(scheduler="sync")
    t1 = time.perf_counter()
    kept = plan.gene_map.apply(block, sort=False)  # as flow.encode.rank._rank_block_flat
    t2 = time.perf_counter()
    tokens, counts, lengths = rank_block_flat(
        kept,
        plan.n_counts[r0:r1],
        plan.medians,
        plan.gene_map.kept_tokens,
        row_offset=r0,
        rows_unique=True,
    )
    t3 = time.perf_counter()
    for name, dt in (("read_s", t1 - t0), ("gene_map_s", t2 - t1), ("kernel_s", t3 - t2)):
        times[name] = times.get(name, 0.0) + dt
    return tokens, counts.astype(plan.count_dtype, copy=False), int(lengths.sum())


def one_block_memory(plan: EncodingPlan) -> dict[str, Any]:
    """Peak memory of reading, gene-mapping and ranking the block with the most nonzeros:
    this process's RSS before (imports, plan) and its peak during the block (the peak is
    reset first), and the peak traced by tracemalloc during the same work."""
    nnz = np.diff(np.asarray(plan.store.attrs["block_nnz_offsets"], dtype=np.int64))
    b = int(np.argmax(nnz))
    _reset_rss_peak()
    before, _ = _rss()
    _rank(plan, b, {})
    _, after = _rss()
    tracemalloc.start()
    _rank(plan, b, {})
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "block": b,
        "block_nnz": int(nnz[b]),
        "rss_before": before,
        "rss_peak": after,
        "traced_peak": traced,
    }


class _FlatWriter:
    """Append entries to a 1-D zarr array in whole chunks (or shards; the last at
    :meth:`close`), with the chunking and codecs of ``like`` (a band's flat array) if given,
    else the encoding store's defaults."""

    def __init__(
        self, group: Any, name: str, dtype: np.dtype[Any], fill: Any, like: Any = None
    ) -> None:
        layout: dict[str, Any] = {"chunks": (FLAT_CHUNK,), "compressors": RANKING_CODECS}
        if like is not None:
            layout = {"chunks": like.chunks, "compressors": like.compressors}
            if getattr(like, "shards", None):
                layout["shards"] = like.shards
        self.array = group.create_array(name, shape=(0,), dtype=dtype, fill_value=fill, **layout)
        self.step = int((layout.get("shards") or layout["chunks"])[0])
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def _flush(self, n: int) -> None:
        buf = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n0 = self.array.shape[0]
        self.array.resize((n0 + n,))
        self.array[n0:] = buf[:n]
        rest = buf[n:]
        self.pending, self.n_pending = ([rest] if rest.size else []), int(rest.size)

    def add(self, values: np.ndarray) -> None:
        self.pending.append(values)
        self.n_pending += values.size
        if self.n_pending >= self.step:
            self._flush(self.n_pending // self.step * self.step)

    def close(self) -> None:
        if self.n_pending:
            self._flush(self.n_pending)


def all_blocks(plan: EncodingPlan, flat: str | None, like: str | None = None) -> dict[str, Any]:
    """Every block ranked in turn in this process (seconds per step summed), the rankings
    written flat (no padding at all) to ``flat``, with the chunks and codecs of the band
    arrays of the encoding store ``like`` (default: the encoding store's defaults)."""
    times: dict[str, float] = {}
    writers: list[_FlatWriter] = []
    if flat is not None:
        shutil.rmtree(flat, ignore_errors=True)
        root = zarr.open_group(flat, mode="w", zarr_format=3)
        pad = plan.vocab.pad_token or 0
        bands: Any = zarr.open_group(like, mode="r")["bands/0"] if like else None
        writers = [
            _FlatWriter(root, "tokens", plan.vocab.token_dtype, pad, bands and bands["tokens"]),
            _FlatWriter(root, "counts", plan.count_dtype, 0, bands and bands["counts"]),
        ]
    entries = 0
    for b in range(plan.store.n_blocks):
        tokens, counts, n = _rank(plan, b, times)
        entries += n
        for w, values in zip(writers, (tokens, counts), strict=False):
            w.add(values)
    for w in writers:
        w.close()
    result: dict[str, Any] = {
        "cells": int(plan.store.attrs["n_cells"]),
        "blocks": plan.store.n_blocks,
        "entries": entries,
        **times,
    }
    if flat is not None:
        result["flat_bytes"] = disk_bytes(flat)
        shutil.rmtree(flat, ignore_errors=True)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flow._bench_e2e", description="Profile the bare rank kernel."
    )
    p.add_argument("store", metavar="STORE.zarr")
    p.add_argument("--medians", metavar="MEDIANS.zarr", help="median set (vocabulary from it)")
    p.add_argument("--preset", choices=["V1", "V2"], help="instead: Geneformer's dictionaries")
    p.add_argument("--flat", metavar="FLAT.zarr", help="write the flat layout here (deleted)")
    p.add_argument(
        "--like", metavar="ENCODING.zarr", help="the encoding store whose chunks and codecs to use"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print the kernel profile (JSON): one block's memory, then every block's time."""
    args = _parser().parse_args(argv)
    plan = _plan(args.store, args.medians, args.preset)
    out = {"one_block": one_block_memory(plan), **all_blocks(plan, args.flat, args.like)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
