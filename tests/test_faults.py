"""Faults a long run meets on a shared machine (issue 14): two writers on one output, Ctrl-C
and SIGTERM, a full disk, a worker out of memory. Each ends in the bytes of an undisturbed
run after a rerun, or in one line that names what happened and what to do."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import psutil
import pytest

from flow import pipeline
from flow._claim import CLAIM_SUFFIX, ClaimInfo, claim_output, read_claim
from flow._location import Location
from flow.cli import main
from flow.datasets import write_synthetic
from flow.encode.store import open_encoding
from flow.errors import DiskFullError, IncompleteStoreError, OutputBusyError
from flow.medians import open_medians
from flow.store import open_counts

from conftest import S3  # the s3 fixture (moto's server)
from helpers import block_done, flow_meta, stored_files, wait_for_blocks

FLOW = os.fspath(Path(sys.executable).parent / "flow")
PY = sys.executable


def _dead_pid() -> int:
    """The id of a process that has ended (so a claim recorded by it is stale)."""
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6,000 synthetic cells x 1,000 genes in 60 blocks, their medians, an undisturbed encoding."""
    tmp = tmp_path_factory.mktemp("faults")
    paths = {n: tmp / f"{n}.zarr" for n in ("counts", "medians", "reference")}
    write_synthetic(paths["counts"], 6_000, 1_000, seed=14, block_size=100, mean_genes=400)
    pipeline.medians([paths["counts"]], paths["medians"])
    pipeline.tokenize(paths["counts"], paths["reference"], medians=paths["medians"])
    return paths


def _tokenize_cmd(small: dict[str, Path], output: Path, *cluster: str) -> list[str]:
    cmd = [FLOW, "tokenize", small["counts"], "-o", output, "--medians", small["medians"]]
    return [os.fspath(c) for c in [*cmd, *cluster, "-q"]]


# --------------------------------------------------------------------------- two writers


@pytest.mark.distributed
def test_two_tokenize_runs_at_once_one_writes(
    small: dict[str, Path], tmp_path: Path, local_cluster_address: str
) -> None:
    out = tmp_path / "encoding.zarr"
    cmd = _tokenize_cmd(small, out, "--scheduler", local_cluster_address)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ended = {}
    results = {}
    while len(results) < 2:
        for p in procs:
            if p.pid not in results and p.poll() is not None:
                results[p.pid] = (p.returncode, *p.communicate(timeout=30))
                ended[p.pid] = time.monotonic()
        time.sleep(0.05)
    winners = [pid for pid, r in results.items() if r[0] == 0]
    losers = [pid for pid, r in results.items() if r[0] != 0]
    assert len(winners) == 1, results
    assert len(losers) == 1, results
    rc, stdout, stderr = results[losers[0]]
    assert rc == 1
    assert stdout == ""
    assert stderr.count("\n") == 1, stderr  # one line
    assert f"{out} is being written by another run" in stderr
    assert f"host {socket.gethostname()}, pid {winners[0]}, since " in stderr
    assert "flow tokenize" in stderr  # the other run's command
    assert ended[losers[0]] < ended[winners[0]]  # stopped at once, not after the writer
    assert results[winners[0]][1].startswith("encoding store ")
    assert not Path(f"{out}{CLAIM_SUFFIX}").exists()  # released at the end
    assert stored_files(os.fspath(out)) == stored_files(os.fspath(small["reference"]))
    assert flow_meta(os.fspath(out)) == flow_meta(os.fspath(small["reference"]))


_HOLD = """
import os, sys, time
from flow._claim import claim_output
from flow.errors import OutputBusyError
if len(sys.argv) > 3:  # imported: wait for the start signal, to race the others
    print("ready", flush=True)
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.001)
try:
    with claim_output(sys.argv[1], command="hold"):
        print("won", flush=True)
        time.sleep(float(sys.argv[2]))
except OutputBusyError as err:
    print("busy", err, flush=True)
"""


def test_claim_of_a_killed_run_is_taken_over(small: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "encoding.zarr"
    holder = subprocess.Popen([PY, "-c", _HOLD, out, "300"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "won"
        with pytest.raises(OutputBusyError, match=f"pid {holder.pid}, since"):  # alive: refused
            pipeline.tokenize(small["counts"], out, medians=small["medians"])
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    left = read_claim(out)
    assert left is not None
    assert left.pid == holder.pid
    enc = pipeline.tokenize(small["counts"], out, medians=small["medians"])
    assert enc.attrs["complete"]
    assert read_claim(out) is None
    assert stored_files(os.fspath(out)) == stored_files(os.fspath(small["reference"]))


def test_many_runs_taking_over_one_stale_claim_one_wins(tmp_path: Path) -> None:
    out = tmp_path / "medians.zarr"
    stale = ClaimInfo("elsewhere", _dead_pid(), time.time() - 3600, "flow medians", "old")
    Path(f"{out}{CLAIM_SUFFIX}").write_bytes(stale.dumps())
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([PY, "-c", _HOLD, out, "5", go], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for p in procs:  # all imported and waiting
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    said = sorted(p.communicate(timeout=120)[0].split()[0] for p in procs)
    assert said == ["busy", "busy", "busy", "won"]
    assert read_claim(out) is None


def test_claims_on_an_object_store() -> None:
    fs = fsspec.filesystem("memory")
    out = "memory://faults/encoding.zarr"
    # a claim left on this host by a process that has ended is stale: taken over
    left = ClaimInfo(socket.gethostname(), _dead_pid(), time.time(), "flow tokenize", "t0")
    fs.pipe_file(f"/faults/encoding.zarr{CLAIM_SUFFIX}", left.dumps())
    with claim_output(out, command="tokenize"):
        now = read_claim(out)
        assert now is not None
        assert now.pid == os.getpid()
        assert now.token != "t0"
        # a live claim (another thread here: claims are re-entrant per thread only)
        errors: list[BaseException] = []

        def second() -> None:
            try:
                with claim_output(out, command="tokenize"):
                    pass
            except OutputBusyError as err:
                errors.append(err)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert f"pid {os.getpid()}" in str(errors[0])
    assert not fs.exists(f"/faults/encoding.zarr{CLAIM_SUFFIX}")
    # on another host and silent for longer than the timeout: stale too
    old = ClaimInfo("elsewhere", 1, time.time() - 7200, "flow tokenize", "t1", time.time() - 7200)
    fs.pipe_file(f"/faults/encoding.zarr{CLAIM_SUFFIX}", old.dumps())
    with claim_output(out, command="tokenize"):
        pass
    # on another host, heartbeat fresh: refused
    busy = ClaimInfo("elsewhere", 1, time.time() - 7200, "flow tokenize", "t2", time.time())
    fs.pipe_file(f"/faults/encoding.zarr{CLAIM_SUFFIX}", busy.dumps())
    with (
        pytest.raises(OutputBusyError, match="host elsewhere, pid 1"),
        claim_output(out, command="t"),
    ):
        pass


def test_claims_on_s3_use_conditional_writes(s3: S3) -> None:
    """On a real S3 protocol server (moto): the claim is created with ``If-None-Match: *``, so
    a second writer gets 412 and stops; a stale claim (its process gone) is taken over."""
    out = s3.url("faults", "encoding.zarr")
    with claim_output(out, command="tokenize", storage_options=s3.options):
        errors: list[BaseException] = []

        def second() -> None:
            try:
                with claim_output(out, command="tokenize", storage_options=s3.options):
                    pass
            except OutputBusyError as err:
                errors.append(err)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert f"{out} is being written by another run" in str(errors[0])
    fs = fsspec.filesystem("s3", **s3.options)
    assert not fs.exists(f"{out}{CLAIM_SUFFIX}")
    left = ClaimInfo(socket.gethostname(), _dead_pid(), time.time(), "flow tokenize", "t0")
    fs.pipe_file(f"{out}{CLAIM_SUFFIX}", left.dumps())
    with claim_output(out, command="tokenize", storage_options=s3.options):
        now = read_claim(Location(out, s3.options))
        assert now is not None
        assert now.pid == os.getpid()
    fs.invalidate_cache()
    assert not fs.exists(f"{out}{CLAIM_SUFFIX}")


# --------------------------------------------------------------------------- Ctrl-C, SIGTERM


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("signum", "to_group"), [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_interrupted_run_stops_cleanly_and_resumes(
    small: dict[str, Path], tmp_path: Path, signum: int, to_group: bool
) -> None:
    """Ctrl-C at a terminal signals the whole process group (workers too); ``kill`` signals
    the command only. Either way: one line, 130/143, no process left, resumable."""
    out = tmp_path / "encoding.zarr"
    cmd = _tokenize_cmd(small, out, "--workers", "1", "--threads-per-worker", "1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        wait_for_blocks(out, proc)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "no local worker processes"
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum
    assert stdout == ""
    assert stderr == "flow tokenize: interrupted: rerun the same command to finish\n"
    deadline = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        assert time.monotonic() < deadline, "worker processes outlived the command"
        time.sleep(0.1)
    assert not Path(f"{out}{CLAIM_SUFFIX}").exists()
    done = block_done(out)
    assert done is not None
    assert 0 < done.sum() < done.size
    with pytest.raises(IncompleteStoreError):
        open_encoding(out)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert open_encoding(out).attrs["blocks_written_last_run"] == done.size - done.sum()
    assert stored_files(os.fspath(out)) == stored_files(os.fspath(small["reference"]))


# --------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def tmpfs(where: Path, size_mib: int) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` (skips, or fails under CI, where mounting is refused)."""
    where.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}M", "tmpfs", os.fspath(where)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:  # no mount command
        done = subprocess.CompletedProcess(cmd, 1, "", str(err))
    if done.returncode != 0:
        msg = f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", os.fspath(where)], check=False)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fill(disk: Path, leave: int) -> Path:
    """A filler file taking all the free space of ``disk`` but ``leave`` bytes."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as fh:
        fh.truncate(0)
        chunk = b"\0" * (1 << 20)
        todo = max(0, free - leave)
        while todo > 0:
            n = fh.write(chunk[: min(len(chunk), todo)])
            todo -= n
    return filler


@pytest.fixture(scope="module")
def pbmc(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Undisturbed outputs of every stage on real PBMC 3k (blocks of 256 cells)."""
    tmp = tmp_path_factory.mktemp("pbmc")
    src = shared_data / "pbmc3k" / "pbmc3k_raw_counts.h5ad"
    ref = {"input": src, **{n: tmp / n for n in ("counts.zarr", "medians.zarr", "encoding.zarr")}}
    ref["dataset"] = tmp / "dataset"
    pipeline.convert([src], ref["counts.zarr"], block_size=256)
    pipeline.medians([ref["counts.zarr"]], ref["medians.zarr"])
    pipeline.tokenize(ref["counts.zarr"], ref["encoding.zarr"], medians=ref["medians.zarr"])
    pipeline.export(ref["encoding.zarr"], ref["dataset"], preset="V1")
    return ref


def _stage_args(stage: str, ref: dict[str, Path], out: Path, address: str) -> list[str]:
    cluster = ["--scheduler", address]  # the error comes from a Dask worker
    args = {
        "convert": ["convert", ref["input"], "-o", out, "--block-size", "256"],
        "medians": ["medians", ref["counts.zarr"], "-o", out, *cluster],
        "tokenize": [
            "tokenize",
            ref["counts.zarr"],
            "-o",
            out,
            "--medians",
            ref["medians.zarr"],
            *cluster,
        ],
        "export": ["export", ref["encoding.zarr"], "-o", out, "--preset", "V1", *cluster],
    }[stage]
    return [os.fspath(a) for a in [*args, "-q"]]


def _refuses(stage: str, out: Path) -> None:
    """Readers refuse the unfinished output."""
    if stage == "export":
        datasets = pytest.importorskip("datasets")
        with pytest.raises(FileNotFoundError):
            datasets.load_from_disk(os.fspath(out))
        return
    opener = {"convert": open_counts, "medians": open_medians, "tokenize": open_encoding}[stage]
    with pytest.raises(IncompleteStoreError):
        opener(out)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["convert", "medians", "tokenize", "export"])
def test_disk_full_then_rerun(
    stage: str,
    pbmc: dict[str, Path],
    tmp_path: Path,
    local_cluster_address: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = {"convert": "counts.zarr", "medians": "medians.zarr", "tokenize": "encoding.zarr"}
    reference = pbmc[name.get(stage, "dataset")]
    need = _size(reference)
    with tmpfs(tmp_path / "disk", max(4, 2 * need // (1 << 20) + 2)) as disk:
        out = disk / reference.name
        filler = _fill(disk, need // 2)  # room for half of the output
        args = _stage_args(stage, pbmc, out, local_cluster_address)
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # one line, no traceback
        assert err.startswith(f"flow {stage}: error: no space left on the device of {out}")
        assert "rerun the same command" in err
        _refuses(stage, out)
        assert not Path(f"{out}{CLAIM_SUFFIX}").exists()

        filler.unlink()  # space freed: the same command finishes (or rewrites) it
        assert main(args) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert stored_files(os.fspath(out)) == stored_files(os.fspath(reference))
        if stage != "export":
            drop = ("counts_url", "blocks_written_last_run")
            assert flow_meta(os.fspath(out), drop=drop) == flow_meta(
                os.fspath(reference), drop=drop
            )


def test_disk_full_error_is_an_oserror(tmp_path: Path) -> None:
    """The error of a full disk names the output and is still an ``OSError`` (ENOSPC)."""
    with (
        pytest.raises(DiskFullError, match="no space left on the device of") as info,
        claim_output(tmp_path / "out.zarr", command="test"),
    ):
        raise OSError(28, "No space left on device", os.fspath(tmp_path / "out.zarr/c/0"))
    assert isinstance(info.value, OSError)
    assert info.value.errno == 28


# --------------------------------------------------------------------------- out of memory


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One block of 4,000 deep cells (~2,000 genes each): too large for a 400 MB worker."""
    tmp = tmp_path_factory.mktemp("deep")
    paths = {n: tmp / f"{n}.zarr" for n in ("counts", "medians")}
    write_synthetic(paths["counts"], 4_000, 3_000, seed=3, block_size=4_000, mean_genes=2_000)
    pipeline.medians([paths["counts"]], paths["medians"])
    return paths


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_block_too_large_for_worker_memory(deep: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "encoding.zarr"
    cmd = [FLOW, "tokenize", deep["counts"], "-o", out, "--medians", deep["medians"]]
    cmd = [os.fspath(c) for c in cmd]
    cmd += ["--workers", "1", "--threads-per-worker", "1", "--memory-limit", "400MB", "-q"]
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}  # 2 kills
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=360, env=env, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "KilledWorker" not in done.stderr
    # besides distributed's own log lines (memory warnings, restarts) and multiprocessing's
    # note on the killed workers' semaphores: flow's one line
    ours = [line for line in done.stderr.splitlines() if line.startswith("flow ")]
    assert len(ours) == 1, done.stderr
    last = ours[0]
    nnz = open_counts(deep["counts"]).attrs["nnz"]
    assert last.startswith(f"flow tokenize: error: block 0 of {deep['counts']} ")
    assert f"(4,000 cells, {nnz:,} nonzeros) killed its worker 2 times" in last
    assert "smaller --block-size (now 4,000 cells)" in last
    assert "--memory-limit" in last
    with pytest.raises(IncompleteStoreError):
        open_encoding(out)
    assert not Path(f"{out}{CLAIM_SUFFIX}").exists()


def test_claim_file_records_the_run(tmp_path: Path) -> None:
    out = tmp_path / "x.zarr"
    with claim_output(out, command="medians"):
        raw = json.loads(Path(f"{out}{CLAIM_SUFFIX}").read_text())
        assert raw["pid"] == os.getpid()
        assert raw["host"] == socket.gethostname()
        with claim_output(out, command="medians"):  # re-entrant in one thread
            pass
        assert Path(f"{out}{CLAIM_SUFFIX}").exists()
    assert not Path(f"{out}{CLAIM_SUFFIX}").exists()
