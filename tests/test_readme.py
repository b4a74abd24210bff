"""The README's "Using it" section runs as written, on PBMC 3k and PBMC 1k.

The fenced blocks of that section that follow a ``<!-- readme-test: commands -->`` or
``<!-- readme-test: python -->`` marker are run in a temporary folder, with only the data path
(``../shared/data``) replaced by the real data folder: each ``flow ...`` line through the
virtualenv's entry point, then the Python snippet. Every command must exit with status 0,
print no traceback, and print each text its ``# prints "..."`` comment quotes; the snippet too,
and what it binds is checked against what its comments say. The outputs are then checked
against the data (files written, rows, the example cell and the group column).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.data

REPO = Path(__file__).resolve().parents[1]
DATA = "../shared/data"
"""The data path as the README writes it (from the repository root); the only substitution."""
MARKER = re.compile(r"<!-- readme-test: (\w+) -->\n```\w+\n(.*?)```", re.S)
COMMAND_TIMEOUT = 600  # seconds per command: generous for a loaded 2-core machine
EXAMPLE_CELL = "ACGAACTGGCTATG-1"
CD3E = "ENSG00000198851"


def using_it_blocks() -> dict[str, list[str]]:
    """The marked fenced blocks of the README's "Using it" section, by kind."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Using it\n")
    end = text.find("\n## ", start + 1)
    blocks: dict[str, list[str]] = {}
    for kind, body in MARKER.findall(text[start : end if end > 0 else None]):
        blocks.setdefault(kind, []).append(body)
    return blocks


def claims(comment: str) -> list[str]:
    """The quoted texts of a comment that says it ``prints "..."``."""
    _, said, rest = comment.partition("prints ")
    return re.findall(r'"([^"]+)"', rest) if said else []


@dataclass
class Ran:
    line: str
    claims: list[str]
    status: int | None = None
    out: str = ""
    err: str = ""


def flow_entry_point() -> str:
    """The ``flow`` command of the virtualenv running the tests."""
    path = Path(sys.executable).parent / "flow"
    if not path.exists():
        pytest.fail(f"no flow entry point beside {sys.executable}: pip install -e . first")
    return os.fspath(path)


def run_commands(body: str, folder: Path, data: Path) -> list[Ran]:
    """Run each command line of ``body`` in ``folder``; stop after the first failure."""
    flow = flow_entry_point()
    ran: list[Ran] = []
    for line in body.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        code, _, comment = line.partition("#")
        argv = shlex.split(code.replace(DATA, os.fspath(data)))
        assert argv[0] == "flow", f"README command does not start with flow: {line}"
        result = Ran(line, claims(comment))
        ran.append(result)
        proc = subprocess.run(
            [flow, *argv[1:]],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        result.status, result.out, result.err = proc.returncode, proc.stdout, proc.stderr
        if proc.returncode != 0:
            break
    return ran


@pytest.fixture(scope="module")
def walkthrough(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Ran]]:
    """The README's commands, run once in a temporary folder."""
    (body,) = using_it_blocks()["commands"]
    folder = tmp_path_factory.mktemp("readme")
    return folder, run_commands(body, folder, shared_data)


def test_the_section_has_the_marked_blocks():
    """Exactly one command block and one Python block are marked (so none is skipped)."""
    blocks = using_it_blocks()
    assert sorted(blocks) == ["commands", "python"]
    assert len(blocks["commands"]) == len(blocks["python"]) == 1
    lines = [x for x in blocks["commands"][0].splitlines() if x.startswith("flow ")]
    used = {x.split()[1] for x in lines}
    assert {"convert", "info", "medians", "tokenize", "export", "run"} <= used
    assert {"coverage", "dropped", "drop-rates", "report", "retention"} <= used
    assert sum("prints" in x for x in lines) >= 8


@pytest.mark.timeout(3600)
def test_every_command_runs_and_prints_what_it_claims(walkthrough):
    _, ran = walkthrough
    (body,) = using_it_blocks()["commands"]
    n_commands = sum(1 for x in body.splitlines() if x.startswith("flow "))
    for r in ran:
        assert r.status == 0, f"{r.line}\nexit {r.status}; stderr:\n{r.err[-3000:]}"
        assert "Traceback" not in r.err, f"{r.line}\n{r.err[-3000:]}"
        for text in r.claims:
            assert text in r.out, f"{r.line}\ndoes not print {text!r}; it printed:\n{r.out}"
    assert len(ran) == n_commands


@pytest.mark.timeout(3600)
def test_what_the_commands_wrote(walkthrough):
    """The outputs hold what the README says: the dataset, the example cell, the group column."""
    import datasets
    import xarray as xr

    from flow import open_encoding

    folder, ran = walkthrough
    if any(r.status != 0 for r in ran):
        pytest.skip("a README command failed (reported by the test above)")
    assert len(datasets.load_from_disk(os.fspath(folder / "pbmc3k.dataset"))) == 2_700
    for name in ("coverage.png", "rates.csv", "genes.csv", "tail.csv", "report.html"):
        assert (folder / name).stat().st_size > 0, name
    rates = pd.read_csv(folder / "rates.csv")
    assert rates["cells_dropped"].gt(0).any()
    enc = open_encoding(folder / "enc.zarr")
    lengths = pd.Series(np.asarray(enc.lengths), index=enc.dataset().indexes["cell"])
    assert lengths[EXAMPLE_CELL] > 2048  # the example cell exists and drops genes at 2,048
    merged = xr.open_zarr(folder / "merged.zarr")
    assert merged.attrs["flow"]["method"] == "tdigest"
    assert len(merged.attrs["flow"]["stores"]) == 2
    # --group-by source: the column exists and tells the two inputs apart
    both = open_encoding(folder / "both" / "encoding.zarr")
    sources = pd.Series(np.asarray(both.cell_column("source"), dtype=str))
    assert sources.nunique() == 2
    assert sorted(sources.value_counts().tolist()) == [996, 2_700]
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "By source" in page
    assert all(s in page for s in sources.unique())


@pytest.mark.timeout(3600)
def test_the_python_snippet(walkthrough, monkeypatch):
    """The snippet runs in the same folder, prints what it claims, and binds what it says."""
    import dask.array as da
    import xarray as xr

    import flow

    folder, ran = walkthrough
    if any(r.status != 0 for r in ran):
        pytest.skip("a README command failed (reported by the command test)")
    (snippet,) = using_it_blocks()["python"]
    monkeypatch.chdir(folder)
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md (Using it)", "exec"), namespace)
    out = printed.getvalue()
    for line in snippet.splitlines():
        for text in claims(line.partition("#")[2]):
            assert text in out, f"{line}\ndoes not print {text!r}; it printed:\n{out}"

    store, enc = namespace["store"], namespace["enc"]
    assert isinstance(store.counts, da.Array)  # type: ignore[attr-defined]
    assert store.counts.shape == (2_700, 32_738)  # type: ignore[attr-defined]
    ds = enc.dataset()  # type: ignore[attr-defined]
    assert isinstance(ds, xr.Dataset)
    assert {"tokens", "counts", "values"} <= set(ds.data_vars)
    assert ds["tokens"].dims == ("cell", "rank")
    assert EXAMPLE_CELL in ds.indexes["cell"]
    deepest = namespace["deepest"]
    assert isinstance(deepest, pd.Series)
    assert len(deepest) == 6
    assert (deepest > 2048).all()
    assert EXAMPLE_CELL in deepest.index
    dropped = namespace["dropped"]
    assert isinstance(dropped, pd.DataFrame)
    assert len(dropped) == 329 == int(deepest[EXAMPLE_CELL]) - 2048
    assert dropped["rank"].tolist() == list(range(2048, 2048 + 329))
    rates = namespace["rates"]
    assert isinstance(rates, pd.DataFrame)
    assert int(rates.set_index("gene_id").loc[CD3E, "cells_dropped"]) == 4
    medians = namespace["medians"]
    assert isinstance(medians, xr.Dataset)
    reference = flow.open_medians(folder / "medians.zarr")
    i = reference.gene_ids.tolist().index(CD3E)
    assert out.splitlines()[-1] == repr(float(reference.medians[i]))
