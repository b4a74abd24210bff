"""A flaky object store: ``flow run`` on ``s3://`` URLs through a proxy that fails requests.

moto's S3 server sits behind :class:`flaky_proxy.FlakyProxy`, which answers a seeded share of
requests with HTTP 500 or 503, resets others' connections and delays some. The whole run must
give the bytes of a local run of the same input (flow's bounded retries absorb the faults);
with retries switched off the same proxy breaks it (so the retries are what saves it); and a
store that is down ends the command within a bounded time with one line naming the URL and
the retries.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import pytest
from flaky_proxy import Faults, FlakyProxy
from test_s3 import FLOW, assert_same

from flow._location import STORE_RETRIES, Location

from conftest import S3, SECRET
from helpers import array_bytes, write_synthetic_h5ad

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STAGES = ("counts.zarr", "medians.zarr", "encoding.zarr", "dataset")
#: About one request in forty fails (500, 503 or a reset connection: some 30 of a run's 1,200
#: requests, each retried after a backoff of up to a second); 3% are slow.
FAULTS = Faults(http_500=0.01, http_503=0.01, reset=0.008, slow=0.03)
RUN = ["--own-dictionaries", "--block-size", "300", "--workers", "1", "--threads-per-worker", "2"]


def flow_run(h5ad: Path, out: str, *extra: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLOW, "run", os.fspath(h5ad), "-o", out, *RUN, "-q", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The input file and ``flow run`` on it with a local output folder."""
    tmp = tmp_path_factory.mktemp("flaky-local")
    h5ad = write_synthetic_h5ad(tmp / "cells.h5ad", 600, 200, seed=5, mean_genes=80, fail_every=6)
    proc = flow_run(h5ad, os.fspath(tmp / "run"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return h5ad, tmp / "run"


def test_run_through_a_flaky_store_equals_local(
    s3: S3, local_run: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Every stage's stored bytes equal the local run's although about 2.5% of the requests
    failed; the failed requests were retried (and the retries logged at debug level)."""
    h5ad, local = local_run
    out = s3.url("flaky", "run")
    with FlakyProxy(s3.endpoint, faults=FAULTS, seed=14) as proxy:
        endpoint = ["--storage-option", f"endpoint_url={proxy.endpoint}"]
        proc = flow_run(h5ad, out, *endpoint, timeout=420)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_counts = proxy.counts
        # Read back through the proxy too, in this process: botocore logs each retry (debug).
        options = {**s3.options, "client_kwargs": {"endpoint_url": proxy.endpoint}}
        with caplog.at_level(logging.DEBUG, logger="botocore"):
            read_back = array_bytes(f"{out}/encoding.zarr", Location.of(out, options).options)
        read_counts = proxy.counts - run_counts
    assert SECRET not in proc.stdout + proc.stderr
    for name in STAGES:
        assert_same(f"{out}/{name}", os.fspath(local / name), s3.options)
    assert read_back == array_bytes(os.fspath(local / "encoding.zarr"))

    print(f"\nflaky run: {dict(run_counts)}; read back: {dict(read_counts)}")
    assert run_counts["failed"] >= 10  # the run really met faults ...
    assert min(run_counts["500"], run_counts["503"], run_counts["reset"]) > 0
    assert run_counts["retried"] >= 0.9 * run_counts["failed"]  # ... and retried them
    if read_counts["failed"]:
        retries = [r for r in caplog.records if "retry" in r.getMessage().lower()]
        assert retries
        assert all(r.levelno == logging.DEBUG for r in retries)


def test_without_retries_the_flaky_store_breaks_the_run(
    s3: S3, local_run: tuple[Path, Path]
) -> None:
    """The control: with botocore's retries switched off (a user's storage option replaces
    flow's default), the same faults end the run, in one line naming the store."""
    h5ad, _ = local_run
    out = s3.url("no-retries", "run")
    with FlakyProxy(s3.endpoint, faults=FAULTS, seed=14) as proxy:
        options = [f"endpoint_url={proxy.endpoint}", "config_kwargs.retries.max_attempts=0"]
        proc = flow_run(
            h5ad, out, *(a for o in options for a in ("--storage-option", o)), timeout=300
        )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("flow run: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_store_down_ends_in_one_line(s3: S3, local_run: tuple[Path, Path]) -> None:
    """Every request answered 503: the command stops within a bounded time, with one line that
    says the object store failed after the retries and names the URL; nothing hangs."""
    h5ad, _ = local_run
    out = s3.url("down", "run")
    with FlakyProxy(s3.endpoint, down=True) as proxy:
        start = time.monotonic()
        proc = flow_run(
            h5ad, out, "--storage-option", f"endpoint_url={proxy.endpoint}", timeout=180
        )
        elapsed = time.monotonic() - start
        counts = proxy.counts
    print(f"\nstore down: {dict(counts)} in {elapsed:.1f} s")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        f"flow run: error: {out}: the object store failed after {STORE_RETRIES} retries "
        "(HTTP 503: [Errno 16] flaky proxy: injected 503); check that it is reachable, then "
        "rerun the same command to finish."
    )
    assert counts["requests"] == counts["failed"] == STORE_RETRIES + 1
    assert elapsed < 120
