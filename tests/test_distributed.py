"""The pipeline on a real ``distributed`` cluster: a ``dask scheduler`` and two ``dask worker``
processes started here, driven through the ``flow`` command line with ``--scheduler``.

Results must be byte-identical to a local run, also when a worker is killed mid-run; the
dashboard of a run answers while it runs; progress bars show without ``-q`` and not with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from flow import pipeline
from flow.datasets import write_synthetic

from helpers import (
    array_bytes,
    plant_cut_write,
    stored_files,
    wait_for_blocks,
    write_synthetic_h5ad,
)
from helpers import flow_meta as _flow_meta

pytestmark = pytest.mark.distributed

BIN = Path(sys.executable).parent  # the virtual environment's scripts: flow, dask
FLOW = os.fspath(BIN / "flow")
DASK = os.fspath(BIN / "dask")


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_flow(*args: Any, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ``flow`` command; fail the test with its output when it fails."""
    proc = subprocess.run(
        [FLOW, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"flow {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def flow_meta(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``attrs["flow"]`` without locations and the resume counter (it differs after a kill)."""
    return _flow_meta(url, storage_options, drop=("counts_url", "blocks_written_last_run"))


def assert_same_store(
    got: str, want: str, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Both Zarr stores hold the same arrays, byte for byte (decoded and as stored), and the
    same flow attributes (block grid, fingerprints, parameters) but for locations."""
    arrays = array_bytes(got, storage_options)
    assert arrays, f"no arrays in {got}"
    assert arrays == array_bytes(want)
    assert stored_files(got, storage_options) == stored_files(want)
    meta = flow_meta(got, storage_options)
    assert meta["complete"] is True
    assert meta == flow_meta(want)


def assert_same_dataset(
    got: str, want: str, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Both exported datasets hold the same Arrow shards and metadata, byte for byte."""
    files = stored_files(got, storage_options)
    assert any(name.endswith(".arrow") for name in files)
    assert files == stored_files(want)


def write_h5ad(path: Path, n_cells: int, n_genes: int, *, seed: int) -> Path:
    """A synthetic h5ad input (raw counts, a cell type and a filter_pass column)."""
    return write_synthetic_h5ad(path, n_cells, n_genes, seed=seed, mean_genes=150, fail_every=10)


# --------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """A scheduler and its workers, each a ``dask`` process of its own."""

    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    logs: Path


def _start(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process and everything it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (the nanny's worker)
    proc.wait(timeout=15)


def _wait_for_log(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"{text!r} not in {log} within {timeout} s:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def _cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """``dask scheduler`` + two ``dask worker`` processes (1 thread, 1 GiB each) on localhost."""
    tmp = tmp_path_factory.mktemp("cluster")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        scheduler = _start(
            [
                DASK,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
            ],
            tmp / "scheduler.log",
            tmp,
        )
        procs.append(scheduler)
        _wait_for_log(scheduler, tmp / "scheduler.log", "Scheduler at:", 60)
        workers = []
        for i in range(2):
            log = tmp / f"worker-{i}.log"
            cmd = [DASK, "worker", address, "--nthreads", "1", "--memory-limit", "1GiB"]
            cmd += ["--name", f"worker-{i}", "--local-directory", os.fspath(tmp / f"w{i}")]
            workers.append(_start(cmd, log, tmp))
            procs.append(workers[-1])
        for i, worker in enumerate(workers):
            _wait_for_log(worker, tmp / f"worker-{i}.log", "Registered to:", 60)
        yield Cluster(address, scheduler, workers, tmp)
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture
def cluster(_cluster: Cluster) -> Cluster:
    """The module's cluster with both workers running: a test that kills a worker leaves its
    nanny restarting it, and the next test must not find one worker only."""
    with Client(_cluster.address) as client:
        client.wait_for_workers(2, timeout=120)
    return _cluster


def worker_processes(cluster: Cluster) -> list[int]:
    """PIDs of the worker processes the nannies (the ``dask worker`` processes) started, in
    the order of ``cluster.workers``."""
    import psutil

    pids = []
    for nanny in cluster.workers:
        children = psutil.Process(nanny.pid).children()
        pids += [c.pid for c in children if "spawn_main" in " ".join(c.cmdline())]
    return pids


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def small_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3,000 cells x 500 genes h5ad input."""
    return write_h5ad(tmp_path_factory.mktemp("input") / "cells.h5ad", 3_000, 500, seed=7)


@pytest.fixture(scope="module")
def local_run(small_input: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The whole pipeline on a local cluster of one worker process (flow's Python API)."""
    from flow.cluster import flow_client

    out = tmp_path_factory.mktemp("local")
    paths = {
        n: os.fspath(out / n) for n in ("counts.zarr", "medians.zarr", "encoding.zarr", "dataset")
    }
    with flow_client(n_workers=1, threads_per_worker=1, memory_limit="1GiB", quiet=True):
        pipeline.convert([small_input], paths["counts.zarr"], block_size=500)
        pipeline.medians([paths["counts.zarr"]], paths["medians.zarr"])
        pipeline.tokenize(
            paths["counts.zarr"], paths["encoding.zarr"], medians=paths["medians.zarr"]
        )
        pipeline.export(paths["encoding.zarr"], paths["dataset"])
    return paths


@dataclass
class Big:
    """A larger count store (several seconds of work), its medians and a local encoding."""

    counts: Path
    medians: Path
    encoding: Path
    n_blocks: int


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    """20,000 cells x 2,000 genes in 40 blocks of 500; medians and encoding run in process."""
    tmp = tmp_path_factory.mktemp("big")
    store = write_synthetic(tmp / "counts.zarr", 20_000, 2_000, seed=3, block_size=500)
    pipeline.medians([tmp / "counts.zarr"], tmp / "medians.zarr")
    pipeline.tokenize(tmp / "counts.zarr", tmp / "encoding.zarr", medians=tmp / "medians.zarr")
    return Big(tmp / "counts.zarr", tmp / "medians.zarr", tmp / "encoding.zarr", store.n_blocks)


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_cluster_run_is_byte_identical_to_local_run(
    cluster: Cluster, small_input: Path, local_run: dict[str, str], tmp_path: Path
) -> None:
    """convert, medians, tokenize and export with --scheduler give the local run's bytes."""
    sched = ("--scheduler", cluster.address)
    counts, medians, encoding, dataset = (
        tmp_path / n for n in ("counts.zarr", "medians.zarr", "encoding.zarr", "dataset")
    )
    before = convert_tasks(cluster.address)
    converted = run_flow("convert", small_input, "-o", counts, "--block-size", 500, *sched)
    quiet = [run_flow("medians", counts, "-o", medians, *sched, "-q")]
    loud = run_flow("tokenize", counts, "-o", encoding, "--medians", medians, *sched)
    quiet.append(run_flow("export", encoding, "-o", dataset, *sched, "-q"))
    for proc in quiet:  # -q: the result line(s) only, nothing on standard error
        assert proc.stderr == ""
        assert proc.stdout.strip()
    # convert ran as one task on a worker; its progress reached the command
    assert convert_tasks(cluster.address) == before + 1
    assert "convert: 3,000/3,000 cells (100%)" in converted.stderr
    assert converted.stdout.startswith("count store ")
    assert f"Connected to scheduler {cluster.address}; dashboard: http://" in loud.stderr
    # progress: stderr is not a terminal here, so plain lines at a modest rate (a log file)
    assert "tokenize: " in loud.stderr
    assert "tasks (100%)" in loud.stderr
    assert "\r" not in loud.stderr
    assert "\x1b" not in loud.stderr
    assert loud.stdout.startswith("encoding store ")
    for name in ("counts.zarr", "medians.zarr", "encoding.zarr"):
        assert_same_store(os.fspath(tmp_path / name), local_run[name])
    assert_same_dataset(os.fspath(dataset), local_run["dataset"])


@pytest.mark.slow
def test_killed_worker_is_rescheduled_with_identical_output(
    cluster: Cluster, big: Big, tmp_path: Path
) -> None:
    """SIGKILL of a worker process while tokenize runs: the run completes, same bytes."""
    import psutil

    encoding = tmp_path / "encoding.zarr"
    cmd = [FLOW, "tokenize", big.counts, "-o", encoding, "--medians", big.medians]
    cmd += ["--scheduler", cluster.address, "-q"]
    proc = subprocess.Popen(
        list(map(os.fspath, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        n_done = wait_for_blocks(encoding, proc)
        leftover = plant_cut_write(encoding)  # what a kill mid-write leaves, every time
        victims = worker_processes(cluster)
        assert len(victims) == 2
        os.kill(victims[0], signal.SIGKILL)
        assert n_done < big.n_blocks
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.startswith("encoding store ")
    assert not leftover.exists()
    assert_same_store(os.fspath(encoding), os.fspath(big.encoding))
    # the worker died mid-run, its work was redone elsewhere, and its nanny restarted it
    assert not psutil.pid_exists(victims[0]) or psutil.Process(victims[0]).status() == "zombie"
    assert (
        f"Worker process {victims[0]} was killed by signal 9"
        in (cluster.logs / "worker-0.log").read_text()
    )
    assert "Remove worker" in (cluster.logs / "scheduler.log").read_text()


def test_dashboard_answers_and_progress_bar_shows(big: Big, tmp_path: Path) -> None:
    """Without -q: the dashboard link is printed and answers 200 while the run goes on; a
    progress bar is drawn on standard error; standard output has the result line only."""
    cmd = [FLOW, "medians", big.counts, "-o", tmp_path / "medians.zarr"]
    cmd += ["--workers", "1", "--threads-per-worker", "1", "--memory-limit", "1GiB"]
    proc = subprocess.Popen(
        list(map(os.fspath, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    link_seen = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # universal newlines: each "\r" redraw is a line
            lines.append(line)
            if "dashboard: " in line:
                link_seen.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert link_seen.wait(120), "".join(lines)
        link = next(ln for ln in lines if "dashboard: " in ln).split("dashboard: ", 1)[1].strip()
        assert link.startswith("http://")
        assert proc.poll() is None, "the run ended before its dashboard was checked"
        with urllib.request.urlopen(link, timeout=60) as response:  # served by the run itself
            status = response.status
            page = response.read()
        # stderr belongs to the reader thread: communicate() would close it under the thread
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=30)
    assert not reader.is_alive()
    assert proc.returncode == 0, "".join(lines)
    assert status == 200
    assert b"<html" in page.lower()
    err = "".join(lines)
    assert "tasks (100%)" in err  # progress as plain lines: stderr is a pipe here
    assert out.strip().splitlines() == [out.strip()]
    assert out.startswith("median set -> ")


def test_unreachable_scheduler_is_a_clear_error(tmp_path: Path) -> None:
    """A wrong --scheduler address: exit status 1 and a message saying what to do (the
    cluster is reached when the command first computes, after its arguments are checked)."""
    from flow.datasets import write_synthetic

    write_synthetic(tmp_path / "counts.zarr", 50, 20, seed=1, mean_genes=5)
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    args = ["medians", tmp_path / "counts.zarr", "-o", tmp_path / "m", "--scheduler", address]
    proc = subprocess.run(
        [FLOW, *map(os.fspath, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"},
    )
    assert proc.returncode == 1
    assert f"Cannot reach the Dask scheduler at '{address}'" in proc.stderr
    assert "dask scheduler" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_convert_on_a_client_is_one_task_with_progress_and_errors(
    small_input: Path, local_run: dict[str, str], tmp_path: Path
) -> None:
    """``pipeline.convert(client=...)`` reads on a worker process: the same store as in
    process, its progress relayed, and a bad input raised here as flow's error."""
    from flow.cluster import Reporter, flow_client
    from flow.errors import InputError

    calls: list[tuple[int, int]] = []

    class Recording(Reporter):
        def progress(self, label: str) -> Callable[[int, int], None]:
            return lambda *a: calls.append(a)

    out = tmp_path / "counts.zarr"
    with flow_client(n_workers=1, threads_per_worker=1, memory_limit="1GiB", quiet=True) as client:
        store = pipeline.convert(
            [small_input], out, block_size=500, client=client, reporter=Recording()
        )
        with pytest.raises(InputError, match=r"no such file or directory.*read on a worker"):
            pipeline.convert([tmp_path / "missing.h5ad"], tmp_path / "x.zarr", client=client)
        n_tasks = convert_tasks(client.scheduler.address)
        variables = client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.extensions["variables"].variables)
        )
    assert variables == []  # the progress variables were deleted
    assert n_tasks == 2  # the second one failed on the worker
    assert store.url == os.fspath(out)
    assert_same_store(os.fspath(out), local_run["counts.zarr"])
    # the latest of one report per block of 500 cells, polled: in order, ending at all cells
    assert calls, "no progress reached the caller"
    assert set(calls) <= {(n, 3_000) for n in range(500, 3_001, 500)}
    assert calls == sorted(set(calls))
    assert calls[-1] == (3_000, 3_000)


def test_readme_slurm_snippet_runs_with_a_local_cluster(small_input: Path, tmp_path: Path) -> None:
    """The README's dask-jobqueue snippet, with ``LocalCluster`` in place of ``SLURMCluster``
    and a temporary directory for ``/shared``: every call runs, and its count store is the
    one an in-process convert writes."""
    import re

    from datasets import load_from_disk

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### SLURM with dask-jobqueue", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace(
        "from dask_jobqueue import SLURMCluster", "from distributed import LocalCluster"
    )
    snippet, n = re.subn(
        r"cluster = SLURMCluster\(.*?\)\n(?=\S)",
        'cluster = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="1GiB")\n',
        snippet,
        flags=re.DOTALL,
    )
    assert n == 1, snippet
    snippet = re.sub(r"cluster\.scale\(.*?\)", "", snippet)
    snippet = snippet.replace("/shared/cells.h5ad", os.fspath(small_input))
    snippet = snippet.replace("/shared/", f"{tmp_path}/")
    exec(compile(snippet + "\ncluster.close()\n", "README.md (SLURM)", "exec"), {})

    pipeline.convert([small_input], tmp_path / "in_process.zarr")
    assert_same_store(os.fspath(tmp_path / "corpus.zarr"), os.fspath(tmp_path / "in_process.zarr"))
    dataset = load_from_disk(os.fspath(tmp_path / "dataset"))
    assert dataset.num_rows == 2_700  # filter_pass drops every tenth cell
    assert max(dataset["length"]) <= 4_096  # V2's input size


def convert_tasks(address: str) -> int:
    """How many ``flow-convert`` tasks the scheduler at ``address`` has finished (with a
    result or an error): its per-prefix counts of transitions, kept for its whole life."""

    def count(dask_scheduler: Any) -> int:
        prefix = dask_scheduler.task_prefixes.get("flow-convert")
        if prefix is None:
            return 0
        return int(prefix.state_counts.get("memory", 0) + prefix.state_counts.get("erred", 0))

    with Client(address) as client:
        return int(client.run_on_scheduler(count))


@pytest.mark.slow
def test_flow_run_with_scheduler_converts_on_the_cluster(
    cluster: Cluster, small_input: Path, tmp_path: Path
) -> None:
    """``flow run INPUT --scheduler``: every stage, convert included, runs on the cluster."""
    from datasets import load_from_disk

    before = convert_tasks(cluster.address)
    proc = run_flow("run", small_input, "-o", tmp_path, "--scheduler", cluster.address, "-q")
    assert "convert 1 input(s)" in proc.stderr  # what it does; -q drops only progress bars
    assert "tasks (" not in proc.stderr  # no progress
    assert "convert: " not in proc.stderr
    assert convert_tasks(cluster.address) == before + 1
    assert load_from_disk(os.fspath(tmp_path / "dataset")).num_rows == 2_700


def _count_runs(address: str, since: float) -> list[tuple[str, float, float]]:
    """The convert count tasks the scheduler's task stream recorded since ``since``: (worker,
    start, stop) of each."""
    with Client(address) as client:
        records = client.get_task_stream(start=since)
    return [
        (str(r["worker"]), float(s["start"]), float(s["stop"]))
        for r in records
        if "flow-convert-count-" in str(r["key"])
        for s in r["startstops"]
        if s["action"] == "compute"
    ]


def test_many_inputs_convert_on_both_workers_at_once(cluster: Cluster, tmp_path: Path) -> None:
    """``flow convert`` of 8 files with ``--scheduler``: the files' count tasks run on both
    workers of a real ``dask scheduler``, at the same time (the scheduler's task stream), and
    the store is a local convert's, byte for byte. A serial convert (one stream, or one
    worker) fails here."""
    paths = [write_h5ad(tmp_path / f"in{i}.h5ad", 4_000, 800, seed=20 + i) for i in range(8)]
    local = tmp_path / "local.zarr"
    run_flow("convert", *paths, "-o", local, "--block-size", "500", "-q")
    with Client(cluster.address) as client:
        client.get_task_stream()  # installs the scheduler's task-stream plugin (kept after)
        since = client.run_on_scheduler(time.time)
    remote = tmp_path / "remote.zarr"
    run_flow(
        "convert", *paths, "-o", remote, "--block-size", "500", "--scheduler", cluster.address, "-q"
    )
    runs = _count_runs(cluster.address, since)
    assert len(runs) >= len(paths)  # at least a task per file
    assert len({w for w, _, _ in runs}) == 2, f"count tasks ran on one worker only: {runs}"
    overlapping = [
        (a, b)
        for a in runs
        for b in runs
        if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]  # two workers, overlapping in time
    ]
    assert overlapping, f"no two count tasks ran at the same time: {runs}"
    assert_same_store(os.fspath(remote), os.fspath(local))
