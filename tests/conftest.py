"""Shared fixtures: data location, hypothesis profiles, a session distributed cluster."""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, settings

from flow.ingest._source import SourceInfo

settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(
    "ci" if os.environ.get("CI") == "true" else os.environ.get("HYPOTHESIS_PROFILE", "dev")
)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real-data folder: $FLOW_SHARED_DATA, default ../shared/data beside the repository."""
    return Path(os.environ.get("FLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; skips (or fails in CI) when it is absent."""
    path = shared_data_dir()
    if not (path / "pbmc3k").is_dir():
        msg = f"{path} not found: set FLOW_SHARED_DATA to the folder with pbmc3k/, pbmc1k_v2/, geneformer/"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded random generator."""
    return np.random.default_rng(20261124)


@pytest.fixture(autouse=True)
def _sync_scheduler():
    """Tests run on the synchronous scheduler unless they start a cluster themselves."""
    with dask.config.set(scheduler="sync"):
        yield


@pytest.fixture(scope="session")
def local_cluster_address():
    """Address of a session-wide LocalCluster with 2 worker processes (catches pickling bugs)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        memory_limit="2GiB",
    ) as cluster:
        yield cluster.scheduler_address


# --- S3 server (tests/test_s3.py, tests/test_s3_flaky.py) ---
BUCKET = "flow-test"
KEY_ID = "testing"
SECRET = "testing-secret-7c1e5a"  # distinctive, so that a leak into any output is found


@dataclass
class S3:
    """A running S3 server and the options that reach it."""

    endpoint: str

    @property
    def options(self) -> dict[str, Any]:
        """Python storage options with explicit credentials."""
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "key": KEY_ID, "secret": SECRET}

    def url(self, *parts: str) -> str:
        return posixpath.join(f"s3://{BUCKET}", *parts)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """moto's S3 server on a free localhost port with one bucket; dummy credentials in the
    environment (inherited by the ``flow`` commands and their local clusters)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    werkzeug = logging.getLogger("werkzeug")  # one log line per request otherwise
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield S3(endpoint)
        finally:
            server.stop()
            werkzeug.setLevel(level)


# --- ingest fixtures ---
# (owned by the ingest work: flow/ingest and tests/test_ingest.py; edit the rest freely)


@pytest.fixture(scope="session")
def pbmc_inputs(shared_data: Path) -> dict[str, Path]:
    """The real inputs by format: PBMC 3k as 10x MEX and h5ad, PBMC 1k v2 as Cell Ranger 3 h5."""
    return {
        "10x-mtx": shared_data / "pbmc3k" / "filtered_gene_bc_matrices" / "hg19",
        "h5ad": shared_data / "pbmc3k" / "pbmc3k_raw_counts.h5ad",
        "10x-h5": shared_data / "pbmc1k_v2" / "pbmc_1k_v2_filtered_feature_bc_matrix.h5",
    }


# --- end ingest fixtures ---


class MatrixSource:
    """A Source over an in-memory count matrix (test input; tests import it from here)."""

    def __init__(self, matrix: sp.csr_matrix, obs: pd.DataFrame) -> None:
        n, g = matrix.shape
        self.matrix = matrix
        self.info = SourceInfo(
            path="memory.h5ad",
            format="h5ad",
            n_cells=n,
            n_genes=g,
            gene_ids=np.array([f"ENSG{i:011d}" for i in range(g)], dtype=object),
            gene_symbols=None,
            barcodes=np.array([f"c{i}" for i in range(n)], dtype=object),
            obs=obs,
            fingerprint="test",
        )

    def iter_blocks(self, n_cells: int):
        for i in range(0, self.matrix.shape[0], n_cells):
            yield self.matrix[i : i + n_cells]
