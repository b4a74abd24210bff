"""Kill ``flow tokenize`` mid-run (SIGKILL of its whole process group), rerun the same command:
the unfinished store is refused with a hint, the rerun computes only the missing blocks, and
the result is byte-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from flow import pipeline
from flow.datasets import write_synthetic
from flow.encode._bands import BandLayout
from flow.encode.store import open_encoding
from flow.errors import IncompleteStoreError

from helpers import block_done, plant_cut_write, wait_for_blocks

pytestmark = pytest.mark.distributed

FLOW = os.fspath(Path(sys.executable).parent / "flow")


def stored_files(root: Path) -> dict[str, str]:
    """SHA-256 of every file of a local store but its root ``zarr.json``, by relative path."""
    out = {}
    for path in root.rglob("*"):
        rel = posixpath.join(*path.relative_to(root).parts)
        if path.is_file() and rel != "zarr.json":
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def flow_meta(root: Path) -> dict[str, Any]:
    """``attrs["flow"]`` without what differs between two runs into two places."""
    meta = dict(zarr.open_group(root, mode="r").attrs["flow"])  # type: ignore[arg-type]
    for key in ("counts_url", "blocks_written_last_run"):
        meta.pop(key)
    return meta


def tokens_mtimes(encoding: Path, blocks: np.ndarray) -> dict[str, int]:
    """Modification times of the token and count chunk files of the given cell blocks (their
    regions of every rank band)."""
    meta: Any = zarr.open_group(encoding, mode="r").attrs["flow"]
    layout = BandLayout.from_attrs(meta["bands"])
    mine = {int(b) for b in blocks}
    found = {
        os.fspath(p): p.stat().st_mtime_ns
        for p in (encoding / "bands").glob("*/*/c/*")
        if p.name.isdigit() and set(layout.blocks_of_flat_chunk(int(p.name))) <= mine
    }
    assert found or not mine
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """30,000 cells x 1,000 genes in 60 blocks of 500, their medians, an uninterrupted encoding."""
    tmp = tmp_path_factory.mktemp("resume")
    paths = {n: tmp / f"{n}.zarr" for n in ("counts", "medians", "reference")}
    write_synthetic(paths["counts"], 30_000, 1_000, seed=5, block_size=500, mean_genes=400)
    pipeline.medians([paths["counts"]], paths["medians"])
    pipeline.tokenize(paths["counts"], paths["reference"], medians=paths["medians"])
    return paths


@pytest.mark.slow
def test_killed_tokenize_resumes_only_missing_blocks(data: dict[str, Path], tmp_path: Path) -> None:
    encoding = tmp_path / "encoding.zarr"
    cmd = [FLOW, "tokenize", data["counts"], "-o", encoding, "--medians", data["medians"]]
    cmd = [os.fspath(c) for c in [*cmd, "--workers", "1", "--threads-per-worker", "1", "-q"]]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_blocks(encoding, proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the command, its local cluster and its workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(proc.pid), "processes of the killed run survived"

    done = block_done(encoding)
    assert done is not None
    n_blocks, n_done = done.size, int(done.sum())
    assert n_blocks == 60
    assert 0 < n_done < n_blocks

    # an unfinished store is never taken for a finished one, and says how to finish it
    with pytest.raises(IncompleteStoreError, match="rerun the same `flow tokenize` command"):
        open_encoding(encoding)
    with pytest.raises(IncompleteStoreError):
        pipeline.export(encoding, tmp_path / "dataset")

    leftover = plant_cut_write(encoding)  # what a kill mid-write leaves, every time

    before = tokens_mtimes(encoding, np.flatnonzero(done))
    time.sleep(0.05)  # so that a rewrite would show in the modification times
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr == ""
    assert rerun.stdout.startswith("encoding store ")
    assert not leftover.exists()

    enc = open_encoding(encoding)
    assert enc.attrs["blocks_written_last_run"] == n_blocks - n_done
    assert tokens_mtimes(encoding, np.flatnonzero(done)) == before  # done blocks untouched
    assert np.asarray(zarr.open_array(encoding / "block_done", mode="r")[:]).all()

    # byte-identical to the uninterrupted run
    assert stored_files(encoding) == stored_files(data["reference"])
    assert flow_meta(encoding) == flow_meta(data["reference"])
    assert open_encoding(data["reference"]).attrs["blocks_written_last_run"] == n_blocks
