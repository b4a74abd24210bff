"""Benchmarks: cells/s and peak memory of every stage at several sizes (``python -m flow.bench``).

Each stage runs as its own ``flow`` command in a subprocess, the way a user runs it; the
resident memory of the whole process tree (the command and its local Dask workers) is sampled
every 50 ms and its peak reported. Inputs are seeded synthetic data made by :mod:`flow.datasets`.

Example::

    python -m flow.bench --cells 100000 1000000 --genes-per-cell 1000 --out bench.json

End to end against the floor (issue 11's targets; :mod:`flow._bench_e2e`,
:mod:`flow._bench_model`)::

    python -m flow.bench --shape pbmc90k --workers 2 --threads 1 --out e2e.json \
        --stages convert,medians,tokenize,tokenize-floor,kernel,export,run,run-floor,scheduler
    python -m flow.bench --projection e2e.json --projection-cells 1e8 --projection-workers 64

Stages beyond the per-stage commands: ``run`` (``flow run --preset V1`` on an h5ad whose genes
are Geneformer V1 IDs), ``run-floor`` (its plain numpy floor: :mod:`flow._bench_floor` on the
h5ad), ``tokenize-floor`` (the same on the count store), ``kernel`` (the bare rank kernel over
every block in one process, one block's peak memory, and the bytes of the rankings with no
padding at all), ``scheduler`` (the cost per task and each stage's tasks and driver work, for
``--projection``). After ``tokenize``, a no-op rerun of it and the start of flow's local
cluster measure its start-up. A second table prints the targets' ratios.
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

import dask
import numpy as np
from dask.base import compute as dask_compute

from . import medians as med
from ._bench_e2e import (
    SHAPES,
    cluster_start_command,
    disk_bytes,
    floor_command,
    genes_per_cell,
    run_floor_command,
    synthetic_options,
    v1_gene_ids,
    write_h5ad,
)
from ._bench_model import MODEL_STAGES, measure_model, projection, projection_table
from .datasets import write_synthetic
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
    "kernel",
    "export",
    "drop-rates",
    "retention",
    "run",
    "run-floor",
    "scheduler",
)
#: Stages run unless ``--stages`` says otherwise (``scheduler`` takes minutes: on demand).
DEFAULT_STAGES = tuple(s for s in STAGES if s != "scheduler")


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
    p.add_argument("--cells", type=int, nargs="+", default=None, help="default 20000 100000")
    p.add_argument("--genes", type=int, default=None, help="default 20000")
    p.add_argument("--genes-per-cell", type=float, default=None, help="default 1000")
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="a data set's shape: its cells, genes and spread of genes per cell (the options "
        "above override its parts)",
    )
    p.add_argument(
        "--library-sigma",
        type=float,
        default=None,
        help="sd of the log library size of the synthetic cells (default: the shape's)",
    )
    p.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated subset of {STAGES} (default all but scheduler)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local cluster workers (default 1 process; 0: no cluster options, flow chooses)",
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
        "--model-cells",
        type=int,
        nargs=2,
        default=[8192, 32768],
        help="stage scheduler: the two sizes its tasks and driver work are measured at",
    )
    p.add_argument(
        "--scheduler-tasks", type=int, default=20_000, help="stage scheduler: trivial tasks"
    )
    p.add_argument(
        "--projection",
        metavar="BENCH.json",
        help="instead: project flow run on --projection-cells cells and --projection-workers "
        "workers from a JSON file written with --out (stages convert, tokenize, export and "
        "scheduler)",
    )
    p.add_argument("--projection-cells", type=float, default=100e6)
    p.add_argument("--projection-workers", type=int, default=64)
    p.add_argument(
        "--accuracy",
        nargs="+",
        metavar="STORE.zarr",
        help="instead: t-digest vs exact medians on these count stores, and tokens changed",
    )
    return p


def _shape(args: argparse.Namespace) -> argparse.Namespace:
    """The options a ``--shape`` sets, where not given; the defaults otherwise."""
    shape = SHAPES.get(args.shape) if args.shape else None
    if args.cells is None:
        args.cells = [shape.cells] if shape else [20_000, 100_000]
    if args.genes is None:
        args.genes = shape.genes if shape else 20_000
    if args.genes_per_cell is None:
        args.genes_per_cell = shape.genes_per_cell if shape else 1_000.0
    if args.library_sigma is None and shape is not None:
        args.library_sigma = shape.library_sigma
    return args


def _cluster(args: argparse.Namespace) -> list[str]:
    """The bench's cluster options, for every ``flow`` command."""
    if not args.workers:  # flow chooses: threads in its own process for small inputs
        return ["-q"]
    return [
        "--workers", str(args.workers), "--threads-per-worker", str(args.threads),
        "--memory-limit", args.memory_limit, "-q",
    ]  # fmt: skip


def _cores(args: argparse.Namespace) -> int:
    """Cores the stages run on: workers x threads (with ``--workers 0``, the machine's)."""
    return args.workers * args.threads if args.workers else os.cpu_count() or 1


def _commands(args: argparse.Namespace, work: str) -> dict[str, list[str]]:
    """The ``flow`` command of each stage after convert, on the files of ``work``."""
    flow = [sys.executable, "-m", "flow.cli"]
    cluster = _cluster(args)
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


def _json_command(argv: Sequence[str]) -> dict[str, Any]:
    """Run a command that prints JSON on its last line; return it."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        raise RuntimeError(msg)
    parsed: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return parsed


def _inputs(args: argparse.Namespace, n: int, stages: list[str], work: str) -> dict[str, Any]:
    """Write the inputs the stages need: the h5ad (V1 gene IDs) and the count store."""
    store = os.path.join(work, "counts.zarr")
    result: dict[str, Any] = {}
    t = time.perf_counter()
    if any(s in stages for s in ("convert", "run", "run-floor")):
        h5ad = os.path.join(work, "input.h5ad")
        write_h5ad(
            h5ad, n, args.genes, seed=1, mean_genes=args.genes_per_cell,
            gene_ids=v1_gene_ids(args.genes), library_sigma=args.library_sigma,
        )  # fmt: skip
        result["generate_h5ad_s"] = time.perf_counter() - t
        result["input_genes_per_cell"] = genes_per_cell(h5ad)
        if "convert" in stages:
            convert = [sys.executable, "-m", "flow.cli", "convert", h5ad, "-o", store, "-q"]
            result["convert"] = run_stage(convert)
    if "convert" not in stages and not (args.reuse and _same_store(store, n, args.genes)):
        t = time.perf_counter()
        write_synthetic(
            store, n, args.genes, seed=1, mean_genes=args.genes_per_cell,
            **synthetic_options(args.library_sigma),
        )  # fmt: skip
        result["generate_store_s"] = time.perf_counter() - t
    return result


def _tokenize_figures(args: argparse.Namespace, stages: list[str], work: str) -> dict[str, Any]:
    """After tokenize: its no-op rerun (start-up), store bytes, queries, floor and kernel."""
    result: dict[str, Any] = {}
    enc = os.path.join(work, "encoding.zarr")
    if "tokenize" in stages:
        result["tokenize-noop"] = run_stage(_commands(args, work)["tokenize"])
        if args.workers:
            start = cluster_start_command(args.workers, args.threads, args.memory_limit)
            result["cluster_start_s"] = _json_command(start)["seconds"]
        result["encoding_bytes"] = disk_bytes(enc)
        result["encoding_band_bytes"] = disk_bytes(os.path.join(enc, "bands"))
        result["cell_query_s"] = _time_cell_queries(enc)
    if "tokenize-floor" in stages:
        result["tokenize-floor"] = run_stage(floor_command(work, _cores(args)))
        shutil.rmtree(os.path.join(work, "floor-zarr"), ignore_errors=True)
    if "kernel" in stages:
        flat = os.path.join(work, "flat.zarr")
        store, medians = os.path.join(work, "counts.zarr"), os.path.join(work, "medians.zarr")
        like = ["--like", enc] if os.path.isdir(enc) else []
        argv = [sys.executable, "-m", "flow._bench_e2e", store, "--medians", medians]
        result["kernel_profile"] = _json_command([*argv, "--flat", flat, *like])
    return result


def _run_figures(args: argparse.Namespace, n: int, stages: list[str], work: str) -> dict[str, Any]:
    """``flow run --preset V1`` on the h5ad, its floor, and the scheduler model."""
    result: dict[str, Any] = {}
    h5ad = os.path.join(work, "input.h5ad")
    if "run" in stages:
        out = os.path.join(work, "run")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "flow.cli", "run", h5ad, "-o", out, "--preset", "V1"]
        result["run"] = run_stage([*cmd, *_cluster(args)])
        result["run_encoding_bytes"] = disk_bytes(os.path.join(out, "encoding.zarr"))
        shutil.rmtree(out, ignore_errors=True)
    if "run-floor" in stages:
        result["run-floor"] = run_stage(run_floor_command(work, h5ad, _cores(args)))
        shutil.rmtree(os.path.join(work, "floor-h5ad"), ignore_errors=True)
    if os.path.exists(h5ad):
        os.remove(h5ad)
    if "scheduler" in stages:
        inputs = []
        for m in args.model_cells:
            path = os.path.join(work, f"model-{m}.h5ad")
            write_h5ad(
                path, m, args.genes, seed=2, mean_genes=args.genes_per_cell,
                gene_ids=v1_gene_ids(args.genes), library_sigma=args.library_sigma,
            )  # fmt: skip
            inputs.append((m, path))
        result["model"] = measure_model(inputs, work, n_tasks=args.scheduler_tasks)
        for _, path in inputs:
            os.remove(path)
    return result


def _ratios(r: dict[str, Any], cores: int) -> dict[str, float]:
    """The figures of issue 11's targets that ``r`` has the measurements for."""
    out: dict[str, float] = {}
    sec = {k: v["seconds"] for k, v in r.items() if isinstance(v, dict) and "seconds" in v}
    for a, b in (("run", "run-floor"), ("run", "tokenize-floor"), ("tokenize", "tokenize-floor")):
        if a in sec and b in sec:
            out[f"{a}/{b}"] = sec[a] / sec[b]
    k = r.get("kernel_profile")
    if k and "tokenize" in sec:
        work = sec["tokenize"] - sec.get("tokenize-noop", 0.0) - r.get("cluster_start_s", 0.0)
        for name, bare in (
            ("kernel", k["kernel_s"]),
            ("read+map+kernel", k["read_s"] + k["gene_map_s"] + k["kernel_s"]),
        ):
            out[f"tokenize/{name}"] = sec["tokenize"] / (bare / cores)
            out[f"tokenize less start-up/{name}"] = work / (bare / cores)
        one = k["one_block"]
        worker = r["tokenize"]["peak_rss_worker"]
        out["tokenize worker peak RSS/one-block process"] = worker / one["rss_peak"]
        out["tokenize worker RSS above imports per thread/one block's"] = (
            (worker - one["rss_before"])
            / int(r.get("threads", 1))
            / max(one["rss_peak"] - one["rss_before"], 1)
        )
        if "flat_bytes" in k and "encoding_bytes" in r:
            out["encoding store bytes/no padding"] = r["encoding_bytes"] / k["flat_bytes"]
            out["encoding bands bytes/no padding"] = r["encoding_band_bytes"] / k["flat_bytes"]
    return out


def _bench_size(args: argparse.Namespace, n: int, stages: list[str], work: str) -> dict[str, Any]:
    """Every chosen stage at ``n`` cells, in ``work``: the results of :func:`run_stage` and
    the figures derived from them."""
    os.makedirs(work, exist_ok=True)
    result: dict[str, Any] = {
        "cells": n,
        "genes": args.genes,
        "genes_per_cell": args.genes_per_cell,
        "library_sigma": args.library_sigma,
        "workers": args.workers,
        "threads": args.threads,
        "load_average": list(os.getloadavg()),
    }
    result.update(_inputs(args, n, stages, work))
    for old in ("medians.zarr", "medians.zarr.exact", "encoding.zarr", "dataset"):
        shutil.rmtree(os.path.join(work, old), ignore_errors=True)  # never resume an old run
    for stage, cmd in _commands(args, work).items():
        if stage in stages:
            result[stage] = run_stage(cmd)
    result.update(_tokenize_figures(args, stages, work))
    result.update(_run_figures(args, n, stages, work))
    result["ratios"] = _ratios(result, _cores(args))
    result["load_average_after"] = list(os.getloadavg())
    return result


#: Issue 11's targets for the figures of :func:`_ratios` (None: reported, no target).
TARGETS: dict[str, str] = {
    "run/run-floor": "<= 1.0x",
    "run/tokenize-floor": "<= 1.0x",
    "tokenize/kernel": "<= 1.5x",
    "tokenize less start-up/kernel": "<= 1.5x",
    "tokenize worker peak RSS/one-block process": "<= 1.5x",
    "tokenize worker RSS above imports per thread/one block's": "<= 1.5x",
    "encoding store bytes/no padding": "<= 1.5x",
    "encoding bands bytes/no padding": "<= 1.5x",
}


def _print_table(rows: list[dict[str, Any]], stages: list[str]) -> None:
    print(
        "| cells | stage | seconds | cells/s | peak RSS (MiB) | driver / largest worker (MiB) |\n"
        "|---:|---|---:|---:|---:|---:|"
    )
    shown = [*stages, "tokenize-noop"]
    for r in rows:
        for stage in (s for s in (*STAGES, "tokenize-noop") if s in shown and s in r):
            s = r[stage]
            if not (isinstance(s, dict) and "seconds" in s):
                continue
            print(
                f"| {_fmt(r['cells'])} | {stage} | {s['seconds']:.1f} | {_fmt(r['cells'] / s['seconds'])} | "
                f"{_fmt(s['peak_rss'] / 2**20)} | {_fmt(s['peak_rss_driver'] / 2**20)} / "
                f"{_fmt(s['peak_rss_worker'] / 2**20)} |"
            )
    for r in rows:
        if "encoding_bytes" in r:
            print(
                f"| {_fmt(r['cells'])} | encoding store on disk (MiB) | "
                f"{r['encoding_bytes'] / 2**20:,.1f} | | | |"
            )
        if "cell_query_s" in r:
            print(
                f"| {_fmt(r['cells'])} | one-cell dropped-genes query | {r['cell_query_s']:.3f} | | | |"
            )


def _print_e2e(rows: list[dict[str, Any]]) -> None:
    """The figures of issue 11's targets: ratios, the kernel's and the scheduler's numbers."""
    if not any(r.get("ratios") or "model" in r for r in rows):
        return
    print("\n| cells | figure | value | target |\n|---:|---|---:|---|")
    for r in rows:
        n = _fmt(r["cells"])
        g = r.get("input_genes_per_cell")
        if g:
            print(
                f"| {n} | detected genes per cell: median / p99 / max | "
                f"{g['median']:,.0f} / {g['p99']:,.0f} / {g['max']:,.0f} | ~1,000 / 4,500 / 7,000 |"
            )
        for name, value in r.get("ratios", {}).items():
            print(f"| {n} | {name} | {value:.2f}x | {TARGETS.get(name, '')} |")
        k = r.get("kernel_profile")
        if k:
            print(
                f"| {n} | bare kernel, one process: read / gene map / rank (s) | "
                f"{k['read_s']:.2f} / {k['gene_map_s']:.2f} / {k['kernel_s']:.2f} | |"
            )
            one = k["one_block"]
            print(
                f"| {n} | one block ({one['block_nnz']:,} nonzeros): process RSS before / peak, "
                f"traced peak (MiB) | {one['rss_before'] / 2**20:,.0f} / "
                f"{one['rss_peak'] / 2**20:,.0f}, {one['traced_peak'] / 2**20:,.0f} | |"
            )
        m = r.get("model")
        if m:
            sched = m["scheduler"]
            print(
                f"| {n} | scheduler per task ({sched['tasks']:,} trivial tasks, 2 workers) | "
                f"{sched['per_task_s'] * 1e3:.2f} ms | |"
            )
            for stage, st in m["stages"].items():
                print(
                    f"| {n} | {stage}: tasks per block / fixed; driver per 1M cells / fixed (s) | "
                    f"{st['tasks_per_block']:.1f} / {st['tasks_fixed']:.0f}; "
                    f"{st['driver_per_cell_s'] * 1e6:.1f} / {st['driver_fixed_s']:.2f} | |"
                )


def _read_json_lines(path: str) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _projection(args: argparse.Namespace) -> int:
    """Print the projection of ``flow run`` from a bench JSON file (see
    :mod:`flow._bench_model`)."""
    rows = _read_json_lines(args.projection)
    models = [r["model"] for r in rows if "model" in r]
    timed = [r for r in rows if all(s in r for s in MODEL_STAGES)]
    if not models or not timed:
        msg = (
            f"{args.projection} lacks what the projection needs: run the bench with --stages "
            f"convert,medians,tokenize,export,scheduler --out {args.projection}"
        )
        raise SystemExit(msg)
    row = max(timed, key=lambda r: r["cells"])
    cells, workers = args.projection_cells, args.projection_workers
    print(projection_table(projection(row, models[-1], cells=cells, workers=workers),
                           cells=cells, workers=workers))  # fmt: skip
    return 0


def _check_stages(stages: list[str]) -> None:
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        msg = f"--stages: unknown {unknown}; choose from {STAGES}"
        raise SystemExit(msg)
    for stage in ("tokenize-floor", "kernel"):
        if stage in stages and "medians" not in stages:
            msg = f"--stages: {stage} needs medians (and tokenize for its ratios)"
            raise SystemExit(msg)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and print Markdown tables (and write JSON with --out)."""
    args = _shape(_parser().parse_args(argv))
    if args.accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            for path in args.accuracy:
                print(json.dumps(median_accuracy(path, tmp)))
        return 0
    if args.projection:
        return _projection(args)
    stages = [s for s in args.stages.split(",") if s]
    _check_stages(stages)
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
    _print_e2e(rows)
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
