"""Scheduler overhead, tasks per block, driver work, and the projection to a large cluster.

Used by :mod:`flow.bench` (stage ``scheduler`` and ``--projection``).

:func:`measure_model` measures, on a local cluster of 2 worker processes started here:

- the scheduler's cost per task: ``n_tasks`` independent trivial tasks computed as one graph,
  wall time / tasks (after a warm-up graph);
- for each stage of ``flow run`` with given dictionaries (convert, tokenize, export), run in
  this process at two sizes: the tasks the cluster ran (its task stream) and the CPU time of
  this process's main thread (the driver: planning, graph building, barcodes and per-cell
  arrays; the scheduler runs on another thread), each fitted as ``fixed + per block`` and
  ``fixed + per cell``.

The projection (:func:`projection`) is a simple model; its assumptions:

1. every stage's parallel work scales perfectly: ``N / (W * r)`` with ``r`` the per-worker
   rate measured by :mod:`flow.bench` (cells per second of one worker process of the bench's
   threads, from the stage's wall time less the start-up (4.) and the driver's serial work);
   storage bandwidth and stragglers are not modelled;
2. the scheduler handles one task at a time at the measured cost per task, whatever the number
   of workers (one scheduler process), and its time is *added* to the parallel work (no
   overlap: an upper bound);
3. the driver's work is serial and also added: ``fixed + per cell x N`` per stage;
4. start-up is paid once, as measured on this machine: the no-op rerun of ``flow tokenize``
   (imports, opening, planning) plus the start of flow's local cluster.
"""

from __future__ import annotations

import operator
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from dask.delayed import Delayed, delayed
from distributed import Client, LocalCluster, get_task_stream

from . import pipeline

__all__ = ["MODEL_STAGES", "measure_model", "projection", "projection_table"]

#: The stages of ``flow run`` with given dictionaries.
MODEL_STAGES = ("convert", "tokenize", "export")


def scheduler_cost(client: Client, n_tasks: int) -> dict[str, float]:
    """Seconds per task of ``n_tasks`` independent trivial tasks (a builtin: nothing to import
    on the workers) and one task gathering them, computed as one graph with one result, as
    flow's writers are (after a warm-up graph)."""

    def graph(n: int) -> Delayed:
        return delayed(sum, pure=False)([delayed(operator.pos, pure=False)(i) for i in range(n)])

    client.compute(graph(min(1000, n_tasks))).result()
    work = graph(n_tasks)
    start = time.perf_counter()
    client.compute(work).result()
    seconds = time.perf_counter() - start
    return {"tasks": n_tasks + 1, "seconds": seconds, "per_task_s": seconds / (n_tasks + 1)}


def _stage_calls(
    h5ad: str, work: str, preset: str, block_size: int
) -> dict[str, Callable[[Any], Any]]:
    """The three stages of ``flow run --preset`` as calls, each taking the previous' result."""
    d = pipeline.preset_dictionaries(preset)
    return {
        "convert": lambda _: pipeline.convert(
            [h5ad], os.path.join(work, "counts.zarr"), block_size=block_size
        ),
        "tokenize": lambda store: pipeline.tokenize(
            store, os.path.join(work, "encoding.zarr"), overwrite=True, **d
        ),
        "export": lambda enc: pipeline.export(enc, os.path.join(work, "dataset"), preset=preset),
    }


def _stages_once(
    client: Client, h5ad: str, work: str, preset: str, block_size: int
) -> dict[str, dict[str, float]]:
    """Tasks run and driver CPU seconds of each stage on ``h5ad``."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    out: dict[str, dict[str, float]] = {}
    previous: Any = None
    for stage, call in _stage_calls(h5ad, work, preset, block_size).items():
        with get_task_stream(client) as stream:
            cpu, wall = time.thread_time(), time.perf_counter()
            previous = call(previous)
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        out[stage] = {"tasks": float(len(stream.data)), "driver_cpu_s": cpu, "wall_s": wall}
    shutil.rmtree(work, ignore_errors=True)
    return out


def _fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """``(fixed, slope)`` of the line through two points (slope >= 0; 0 if ``x`` are equal)."""
    slope = max((y[1] - y[0]) / (x[1] - x[0]), 0.0) if x[1] != x[0] else 0.0
    return y[1] - slope * x[1], slope


def measure_model(
    inputs: Sequence[tuple[int, str]],
    work: str,
    *,
    n_tasks: int = 20_000,
    block_size: int = 4096,
    preset: str = "V1",
) -> dict[str, Any]:
    """Scheduler cost per task, and per stage tasks and driver CPU as lines in the cells.

    ``inputs``: two ``(cells, h5ad path)`` of different sizes (V1 gene IDs for ``preset``).
    Starts (and times) a local cluster of 2 single-threaded worker processes.
    """
    start = time.perf_counter()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        started = time.perf_counter() - start
        sched = scheduler_cost(client, n_tasks)
        runs = [
            _stages_once(client, h5ad, os.path.join(work, "model"), preset, block_size)
            for _, h5ad in inputs
        ]
    cells = [float(n) for n, _ in inputs]
    blocks = [float(-(-n // block_size)) for n, _ in inputs]
    stages: dict[str, Any] = {}
    for stage in MODEL_STAGES:
        tasks = _fit(blocks, [r[stage]["tasks"] for r in runs])
        driver = _fit(cells, [r[stage]["driver_cpu_s"] for r in runs])
        stages[stage] = {
            "tasks_fixed": tasks[0],
            "tasks_per_block": tasks[1],
            "driver_fixed_s": driver[0],
            "driver_per_cell_s": driver[1],
            "measured": [{"cells": c, **r[stage]} for c, r in zip(cells, runs, strict=True)],
        }
    return {
        "cluster_start_s": started,
        "scheduler": sched,
        "block_size": block_size,
        "stages": stages,
    }


def _startup(row: dict[str, Any], model: dict[str, Any]) -> float:
    """Start-up of one command: the no-op rerun of tokenize (imports, opening, planning) and
    the start of flow's local cluster (as the bench measured it, else the model's cluster)."""
    noop = row.get("tokenize-noop")
    cluster = row.get("cluster_start_s", model["cluster_start_s"]) if row.get("workers") else 0.0
    return (float(noop["seconds"]) if noop else 0.0) + float(cluster)


def projection(
    row: dict[str, Any], model: dict[str, Any], *, cells: float, workers: int
) -> list[dict[str, float | str]]:
    """The projected seconds of each stage of ``flow run`` on ``cells`` cells and ``workers``
    workers (see the module docstring for the model), from a bench result ``row`` (stage wall
    times at ``row["cells"]`` on ``row["workers"]`` workers) and :func:`measure_model`'s
    ``model``. One dict per stage, then the start-up, then the total."""
    n0, w0 = float(row["cells"]), float(row.get("workers") or 1)
    per_task = float(model["scheduler"]["per_task_s"])
    start = _startup(row, model)
    rows: list[dict[str, float | str]] = []
    for stage in MODEL_STAGES:
        m = model["stages"][stage]
        driver0 = m["driver_fixed_s"] + m["driver_per_cell_s"] * n0
        work = max(float(row[stage]["seconds"]) - start - driver0, 1e-9)
        rate = n0 / work / w0
        blocks = -(-cells // model["block_size"])
        tasks = m["tasks_fixed"] + m["tasks_per_block"] * blocks
        parallel = cells / (workers * rate)
        sched = tasks * per_task
        driver = m["driver_fixed_s"] + m["driver_per_cell_s"] * cells
        rows.append(
            {
                "stage": stage,
                "rate_per_worker": rate,
                "parallel_s": parallel,
                "tasks": tasks,
                "scheduler_s": sched,
                "driver_s": driver,
                "total_s": parallel + sched + driver,
            }
        )
    rows.append({"stage": "start-up (once)", "total_s": start})
    total = sum(float(r["total_s"]) for r in rows)
    serial = start + sum(float(r["scheduler_s"]) + float(r["driver_s"]) for r in rows[:-1])
    rows.append({"stage": "total", "total_s": total, "serial_s": serial})
    return rows


def projection_table(rows: list[dict[str, Any]], *, cells: float, workers: int) -> str:
    """Markdown table of :func:`projection`'s rows."""

    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else ""

    lines = [
        f"Projection: {cells:,.0f} cells on {workers} workers",
        "",
        "| stage | cells/s per worker | parallel (s) | tasks | scheduler (s) | driver, serial (s) "
        "| total (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines.extend(
        f"| {r['stage']} | {cell(r, 'rate_per_worker', ',.0f')} | {cell(r, 'parallel_s', ',.1f')} "
        f"| {cell(r, 'tasks', ',.0f')} | {cell(r, 'scheduler_s', ',.1f')} "
        f"| {cell(r, 'driver_s', ',.1f')} | {cell(r, 'total_s', ',.1f')} |"
        for r in rows
    )
    total = rows[-1]
    share = float(total["serial_s"]) / float(total["total_s"]) if total["total_s"] else np.nan
    lines.append("")
    lines.append(
        f"Serial (start-up, scheduler, driver): {total['serial_s']:,.1f} s of "
        f"{total['total_s']:,.1f} s ({share:.0%})."
    )
    return "\n".join(lines)
