"""Benchmarks: cells/s and peak memory of every stage at several sizes (``python -m flow.bench``).

Each stage runs as its own ``flow`` command in a subprocess, the way a user runs it; the
resident memory of the whole process tree (the command and its local Dask workers) is sampled
every 50 ms and its peak reported. Inputs are seeded synthetic data made by :mod:`flow.datasets`.

Example::

    python -m flow.bench --cells 100000 1000000 --genes-per-cell 1000 --out bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import anndata as ad
import dask
import h5py
import numpy as np
import pandas as pd
from dask.base import compute as dask_compute

from . import medians as med
from ._genes import normalize_gene_ids
from .datasets import synthetic_counts, write_synthetic
from .encode.store import open_encoding, plan_encoding, write_encoding
from .errors import FlowError
from .query import dropped_genes
from .store import open_counts
from .vocab import vocabulary_from_genes

__all__ = ["main", "median_accuracy", "run_stage", "write_h5ad"]

STAGES = (
    "convert",
    "medians",
    "medians-exact",
    "tokenize",
    "tokenize-floor",
    "export",
    "drop-rates",
    "retention",
)
#: The plain numpy floor of tokenize, run as a script (it must not import flow).
FLOOR_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bench_floor.py")


def _tree_rss(pid: int) -> tuple[int, int, int]:
    """RSS of a process tree: (all processes, the root alone, its largest descendant)."""
    import psutil  # optional: in the test and bench extras, not a dependency of flow

    def rss(p: psutil.Process) -> int:
        with contextlib.suppress(psutil.NoSuchProcess):
            return int(p.memory_info().rss)
        return 0

    try:
        root = psutil.Process(pid)
        children = [rss(c) for c in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    own = rss(root)
    return own + sum(children), own, max(children, default=0)


def run_stage(argv: Sequence[str], *, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run one command; return its wall time (s) and peak RSS (bytes) of its process tree.

    ``peak_rss`` is the peak of the sum over all processes; ``peak_rss_driver`` that of the
    command's own process (with a local cluster: the client, scheduler and nannies) and
    ``peak_rss_worker`` that of its largest child (a worker).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peaks = [0, 0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[:] = map(max, peaks, _tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        msg = f"{' '.join(argv)} failed ({proc.returncode}):\n{out}"
        raise RuntimeError(msg)
    total, driver, worker = map(float, peaks)
    return {
        "seconds": seconds,
        "peak_rss": total,
        "peak_rss_driver": driver,
        "peak_rss_worker": worker,
    }


def write_h5ad(
    path: str, n_cells: int, n_genes: int, *, seed: int, mean_genes: float, block: int = 4096
) -> None:
    """Write a synthetic CSR h5ad block by block with h5py (out of core)."""
    src = synthetic_counts(n_cells, n_genes, seed=seed, mean_genes=mean_genes)
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
        data = x.create_dataset(
            "data", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 18,)
        )
        indices = x.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 18,)
        )
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
    with h5py.File(path, "a") as f:
        obs = pd.DataFrame(
            {"cell_type": src.info.obs["cell_type"].astype(str).to_numpy()},
            index=pd.Index(src.info.barcodes.astype(object)),
        )
        var = pd.DataFrame(
            {"gene_symbol": np.asarray(src.info.gene_symbols).astype(object)},
            index=pd.Index(src.info.gene_ids.astype(object)),
        )
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)


def median_accuracy(store_path: str, workdir: str) -> dict[str, Any]:
    """t-digest medians against exact ones on a count store, and the tokens that change.

    Relative error |tdigest - exact| / exact over expressed genes (all, and genes with at least
    1,000 nonzeros), and the rank positions (first 2,048 and full rankings) whose token differs
    when cells are ranked with the t-digest medians instead of the exact ones.
    """
    store = open_counts(store_path)
    with dask.config.set(scheduler="threads"):
        approx = med.medians_of([store], compute=dask_compute)
        exact = med.medians_of([store], method="exact", compute=dask_compute)
        ok = np.isfinite(exact.medians)
        rel = np.abs(approx.medians[ok] - exact.medians[ok]) / exact.medians[ok]
        big = exact.n_nonzero[ok] >= 1000
        vocab = vocabulary_from_genes(exact.gene_ids[ok])
        encs = [
            write_encoding(
                plan_encoding(store, m, vocab),
                os.path.join(workdir, f"acc-{name}.zarr"),
                compute=dask_compute,
            )
            for name, m in (("tdigest", approx), ("exact", exact))
        ]
        a, b = encs[0].tokens, encs[1].tokens
        head = min(2048, a.shape[1])
        diff_head, diff_all, cells_diff = dask_compute(
            (a[:, :head] != b[:, :head]).sum(),
            (a != b).sum(),
            (a[:, :head] != b[:, :head]).any(axis=1).sum(),
        )
        filled = int(np.minimum(encs[1].lengths, head).sum())
    quantiles = lambda x: [float(v) for v in np.percentile(x, [50, 99, 100])] if x.size else []  # noqa: E731
    return {
        "store": store_path,
        "cells": int(store.attrs["n_cells"]),
        "genes_expressed": int(ok.sum()),
        "rel_error_all_p50_p99_max": quantiles(rel),
        "genes_ge_1000_nonzeros": int(big.sum()),
        "rel_error_ge1000_p50_p99_max": quantiles(rel[big]),
        "token_positions_first_2048": filled,
        "token_positions_changed_first_2048": int(diff_head),
        "token_positions_changed_full": int(diff_all),
        "cells_with_any_change_first_2048": int(cells_diff),
    }


def floor_command(work: str, processes: int) -> list[str]:
    """The floor of ``flow tokenize`` on ``work``'s count store and median set (see
    :mod:`flow._bench_floor`): writes the per-column medians and tokens it reads first."""
    store = open_counts(os.path.join(work, "counts.zarr"))
    median_set = med.open_medians(os.path.join(work, "medians.zarr"))
    table = dict(zip(median_set.gene_ids.tolist(), median_set.medians.tolist(), strict=True))
    ids = normalize_gene_ids(store.var.index.to_numpy(dtype=str)).tolist()
    medians = np.array([table.get(g, np.nan) for g in ids], dtype=np.float64)
    medians[~(np.isfinite(medians) & (medians > 0))] = 1.0
    np.save(os.path.join(work, "floor-medians.npy"), medians)
    np.save(os.path.join(work, "floor-tokens.npy"), np.arange(len(ids), dtype=np.int32))
    out = os.path.join(work, "floor")
    shutil.rmtree(out, ignore_errors=True)
    # run from a copy: beside flow's own modules, its imports would find flow/_pickle.py etc.
    script = shutil.copy(FLOOR_SCRIPT, os.path.join(work, "tokenize_floor.py"))
    return [
        sys.executable, script, os.path.join(work, "counts.zarr"),
        os.path.join(work, "floor-medians.npy"), os.path.join(work, "floor-tokens.npy"), out,
        str(processes),
    ]  # fmt: skip


def disk_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (a local store)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _time_cell_queries(encoding: str, n: int = 5) -> float:
    """Median seconds of ``dropped_genes`` at 2,048 for the ``n`` longest cells (after a warm-up)."""
    enc = open_encoding(encoding)
    cells = np.argsort(enc.lengths, kind="stable")[-n:]
    dropped_genes(enc, int(cells[0]), 2048)  # opens the store, reads attributes
    times = []
    for cell in cells:
        start = time.perf_counter()
        dropped_genes(enc, int(cell), 2048)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _same_store(path: str, n_cells: int, n_genes: int) -> bool:
    """Whether ``path`` is a complete count store of ``n_cells`` x ``n_genes``."""
    try:
        attrs = open_counts(path).attrs
    except (FlowError, OSError):
        return False
    return (int(attrs["n_cells"]), int(attrs["n_genes"])) == (n_cells, n_genes)


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flow.bench", description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, nargs="+", default=[20_000, 100_000])
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--genes-per-cell", type=float, default=1_000.0)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument(
        "--workers", type=int, default=1, help="local cluster workers (default 1 process)"
    )
    p.add_argument("--threads", type=int, default=2, help="threads per worker (default 2)")
    p.add_argument("--memory-limit", default="4GiB")
    p.add_argument(
        "--workdir", default=None, help="where to write (default: a temporary directory)"
    )
    p.add_argument("--keep", action="store_true", help="keep the data written")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="use the count store an earlier --keep run left in --workdir (same cells and genes)",
    )
    p.add_argument("--out", default=None, help="append results as JSON lines to this file")
    p.add_argument(
        "--accuracy",
        nargs="+",
        metavar="STORE.zarr",
        help="instead: t-digest vs exact medians on these count stores, and tokens changed",
    )
    return p


def _commands(args: argparse.Namespace, work: str) -> dict[str, list[str]]:
    """The ``flow`` command of each stage after convert, on the files of ``work``."""
    flow = [sys.executable, "-m", "flow.cli"]
    cluster = ["--workers", str(args.workers), "--threads-per-worker", str(args.threads)]
    cluster += ["--memory-limit", args.memory_limit, "-q"]
    store, enc = os.path.join(work, "counts.zarr"), os.path.join(work, "encoding.zarr")
    medians = os.path.join(work, "medians.zarr")
    return {
        "medians": [*flow, "medians", store, "-o", medians, *cluster],
        "medians-exact": [
            *flow, "medians", store, "-o", medians + ".exact", "--method", "exact", *cluster
        ],
        "tokenize": [*flow, "tokenize", store, "-o", enc, "--medians", medians, *cluster],
        "export": [
            *flow, "export", enc, "-o", os.path.join(work, "dataset"), "--preset", "V2", *cluster
        ],
        "drop-rates": [
            *flow, "drop-rates", enc, "--cutoff", "2048", "-o", os.path.join(work, "rates.csv"),
            *cluster,
        ],
        "retention": [
            *flow, "retention", enc, "-o", os.path.join(work, "retention.csv"),
            "--tail-output", os.path.join(work, "tail.csv"), *cluster,
        ],
    }  # fmt: skip


def _bench_size(args: argparse.Namespace, n: int, stages: list[str], work: str) -> dict[str, Any]:
    """Every chosen stage at ``n`` cells, in ``work``: the results of :func:`run_stage`."""
    os.makedirs(work, exist_ok=True)
    store = os.path.join(work, "counts.zarr")
    result: dict[str, Any] = {
        "cells": n,
        "genes": args.genes,
        "genes_per_cell": args.genes_per_cell,
    }
    t = time.perf_counter()
    if "convert" in stages:
        h5ad = os.path.join(work, "input.h5ad")
        write_h5ad(h5ad, n, args.genes, seed=1, mean_genes=args.genes_per_cell)
        result["generate_h5ad_s"] = time.perf_counter() - t
        convert = [sys.executable, "-m", "flow.cli", "convert", h5ad, "-o", store, "-q"]
        result["convert"] = run_stage(convert)
        os.remove(h5ad)
    elif not (args.reuse and _same_store(store, n, args.genes)):
        write_synthetic(store, n, args.genes, seed=1, mean_genes=args.genes_per_cell)
        result["generate_store_s"] = time.perf_counter() - t
    for old in ("medians.zarr", "medians.zarr.exact", "encoding.zarr", "dataset"):
        shutil.rmtree(os.path.join(work, old), ignore_errors=True)  # never resume an old run
    for stage, cmd in _commands(args, work).items():
        if stage in stages:
            result[stage] = run_stage(cmd)
    if "tokenize" in stages:
        enc = os.path.join(work, "encoding.zarr")
        result["encoding_bytes"] = disk_bytes(enc)
        result["cell_query_s"] = _time_cell_queries(enc)
    if "tokenize-floor" in stages:
        result["tokenize-floor"] = run_stage(floor_command(work, args.workers * args.threads))
        if "tokenize" in stages:
            result["tokenize_over_floor"] = (
                result["tokenize"]["seconds"] / result["tokenize-floor"]["seconds"]
            )
        shutil.rmtree(os.path.join(work, "floor"), ignore_errors=True)
    return result


def _print_table(rows: list[dict[str, Any]], stages: list[str]) -> None:
    print(
        "| cells | stage | seconds | cells/s | peak RSS (MiB) | driver / largest worker (MiB) |\n"
        "|---:|---|---:|---:|---:|---:|"
    )
    for r in rows:
        for stage in (s for s in stages if s in r):
            s = r[stage]
            print(
                f"| {_fmt(r['cells'])} | {stage} | {s['seconds']:.1f} | {_fmt(r['cells'] / s['seconds'])} | "
                f"{_fmt(s['peak_rss'] / 2**20)} | {_fmt(s['peak_rss_driver'] / 2**20)} / "
                f"{_fmt(s['peak_rss_worker'] / 2**20)} |"
            )
    for r in rows:
        if "tokenize_over_floor" in r:
            print(
                f"| {_fmt(r['cells'])} | tokenize / its numpy floor | "
                f"{r['tokenize_over_floor']:.2f}x | | encoding store "
                f"{r['encoding_bytes'] / 2**20:,.1f} MiB on disk | |"
            )
    for r in rows:
        if "cell_query_s" in r:
            print(
                f"| {_fmt(r['cells'])} | one-cell dropped-genes query | {r['cell_query_s']:.3f} | | | |"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and print a Markdown table (and write JSON with --out)."""
    args = _parser().parse_args(argv)
    if args.accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            for path in args.accuracy:
                print(json.dumps(median_accuracy(path, tmp)))
        return 0
    stages = [s for s in args.stages.split(",") if s]
    root = args.workdir or tempfile.mkdtemp(prefix="flow-bench-")
    rows = []
    for n in args.cells:
        work = os.path.join(root, f"n{n}")
        result = _bench_size(args, n, stages, work)
        rows.append(result)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(result) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(result), file=sys.stderr)
    _print_table(rows, stages)
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
