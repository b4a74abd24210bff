"""The ``flow`` command line, called in-process through :func:`flow.cli.main`.

Commands that compute start a one-worker, one-thread local cluster (``--workers 1
--threads-per-worker 1``), as a user on a small machine would; ``-q`` keeps them silent.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from flow import __version__
from flow.cli import build_parser, main
from flow.datasets import synthetic_counts
from flow.encode.store import open_encoding

datasets = pytest.importorskip("datasets")

CLUSTER = ["--workers", "1", "--threads-per-worker", "1", "-q"]
N_CELLS, N_GENES = 150, 120


def write_h5ad(path, *, symbols: bool = False) -> str:
    """A small h5ad of synthetic counts (Ensembl IDs, or symbols), with filter_pass and a label."""
    import anndata as ad
    import scipy.sparse as sp

    counts = synthetic_counts(N_CELLS, N_GENES, seed=11, mean_genes=40).to_dense()
    genes = [f"GENE{g}" if symbols else f"ENSG{100_000 + 7 * g:011d}" for g in range(N_GENES)]
    obs = pd.DataFrame(
        {
            "filter_pass": (np.arange(N_CELLS) % 10 != 0).astype(np.int64),  # every 10th fails
            "cell_label": [f"type{i % 3}" for i in range(N_CELLS)],
        },
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    adata = ad.AnnData(
        sp.csr_matrix(counts.astype(np.int32)), obs=obs, var=pd.DataFrame(index=genes)
    )
    adata.write_h5ad(path)
    return os.fspath(path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory) -> str:
    return write_h5ad(tmp_path_factory.mktemp("cli") / "small.h5ad")


# ----------------------------------------------------------------------------------------------
# the stages one by one, then run
# ----------------------------------------------------------------------------------------------


def test_stages_then_run(capsys, tmp_path, h5ad):
    counts, med, enc, ds = (os.fspath(tmp_path / n) for n in ("c.zarr", "m.zarr", "e.zarr", "ds"))

    status, out, _ = run_cli(capsys, "convert", h5ad, "-o", counts, "-q")
    assert status == 0
    assert f"{N_CELLS:,} x {N_GENES:,}" in out

    status, out, _ = run_cli(capsys, "info", counts)
    assert status == 0
    assert f"count store {counts}" in out
    assert "blocks: 1 block of 4,096 cells" in out

    status, out, _ = run_cli(capsys, "medians", counts, "-o", med, *CLUSTER)
    assert status == 0
    assert f"median set -> {med}" in out

    status, out, _ = run_cli(capsys, "tokenize", counts, "-o", enc, "--medians", med, *CLUSTER)
    assert status == 0
    assert f"{N_CELLS:,} cells ({N_CELLS - 15:,} passing filter)" in out

    status, out, _ = run_cli(capsys, "export", enc, "-o", ds, "--preset", "V2", *CLUSTER)
    assert status == 0
    assert ds in out
    stages = datasets.load_from_disk(ds)
    encoding = open_encoding(enc)
    tokens = np.asarray(encoding.tokens.compute())
    keep = np.arange(N_CELLS) % 10 != 0
    assert len(stages) == keep.sum()
    special = encoding.attrs["special"]
    for ids, row, n in zip(stages["input_ids"], tokens[keep], encoding.lengths[keep], strict=True):
        assert ids == [special["<cls>"], *row[:n].tolist(), special["<eos>"]]
    assert stages["cell_label"] == [f"type{i % 3}" for i in np.flatnonzero(keep)]

    # run: the same four steps in one command gives the same dataset
    outdir = os.fspath(tmp_path / "run")
    own = ("--preset", "V2", "--own-dictionaries")  # the data's medians, as the stages above
    status, out, err = run_cli(capsys, "run", h5ad, "-o", outdir, *own, *CLUSTER)
    assert status == 0
    assert f"dataset: {os.path.join(outdir, 'dataset')}" in out
    assert "tokenize ->" in err  # what it did, on standard error
    ran = datasets.load_from_disk(os.path.join(outdir, "dataset"))
    assert ran["input_ids"] == stages["input_ids"]
    assert ran.column_names == stages.column_names

    # run from the count store: used as it is, not converted again; the same dataset
    outdir = os.fspath(tmp_path / "from-store")
    status, out, err = run_cli(capsys, "run", counts, "-o", outdir, *own, *CLUSTER)
    assert status == 0
    assert f"counts: {counts}" in out
    assert f"using the count store {counts} as it is" in err
    assert not os.path.exists(os.path.join(outdir, "counts.zarr"))
    reran = datasets.load_from_disk(os.path.join(outdir, "dataset"))
    assert reran["input_ids"] == stages["input_ids"]


def test_input_size_without_preset_and_parquet(capsys, tmp_path, h5ad):
    """--input-size alone: that many genes, no special tokens; export's default preset is V1."""
    import pyarrow.parquet as pq

    outdir = tmp_path / "run"
    status, _, _ = run_cli(capsys, "run", h5ad, "-o", outdir, "--input-size", "5", *CLUSTER)
    assert status == 0
    encoding = open_encoding(outdir / "encoding.zarr")
    keep = np.arange(N_CELLS) % 10 != 0
    tokens = np.asarray(encoding.tokens.compute())[keep]
    lengths = encoding.lengths[keep]
    ds = datasets.load_from_disk(os.fspath(outdir / "dataset"))
    assert ds["input_ids"] == [
        row[: min(5, n)].tolist() for row, n in zip(tokens, lengths, strict=True)
    ]

    status, out, _ = run_cli(
        capsys, "export", outdir / "encoding.zarr", "-o", tmp_path / "pq", "--format", "parquet",
        *CLUSTER,
    )  # fmt: skip
    assert status == 0
    assert "exported parquet dataset" in out
    table = pq.read_table(tmp_path / "pq")
    expected = [row[: min(2048, n)].tolist() for row, n in zip(tokens, lengths, strict=True)]
    assert table.column("input_ids").to_pylist() == expected


def test_coverage_and_report_say_what_cost_is(capsys, tmp_path, h5ad):
    """The cost beside each input size is named (attention relative to 2,048 tokens), and the
    report's rates keep their small digits (a rate of 0.3% is never shown as 0%)."""
    from flow.query import drop_rates
    from flow.report import COST_HEADER, format_percent

    outdir = tmp_path / "run"
    status, _, _ = run_cli(capsys, "run", h5ad, "-o", outdir, "--input-size", "5", *CLUSTER)
    assert status == 0
    enc = outdir / "encoding.zarr"
    status, out, _ = run_cli(capsys, "coverage", enc, "--sizes", "2048,4096")
    assert status == 0
    summary, header = out.splitlines()
    assert summary.startswith("2,048 covers ")
    assert summary.endswith("at cost 4.0")
    assert header == f"({COST_HEADER})"
    assert "relative to an input of 2,048 tokens, (L / 2,048)^2" in header

    page = tmp_path / "report.html"
    status, out, _ = run_cli(capsys, "report", enc, "-o", page, "--cutoff", "45", *CLUSTER)
    assert status == 0
    assert f"({COST_HEADER})" in out.splitlines()
    html = page.read_text(encoding="utf-8")
    assert COST_HEADER in html
    frame = drop_rates(open_encoding(enc), 45).to_frame()
    shown = frame[frame["cells_dropped"] > 0].head(20)
    assert len(shown)
    for rate in shown["rate"]:
        assert 0 < rate < 1
        assert f"<td>{format_percent(rate)}</td>" in html
        assert format_percent(rate) not in ("0%", "0.0%", "100%")


def test_format_percent_keeps_small_rates():
    from flow.report import format_percent

    assert format_percent(0.002) == "0.2%"
    assert format_percent(0.0035) == "0.35%"
    assert format_percent(0.00004) == "<0.1%"
    assert format_percent(0.99996) == ">99.9%"
    assert format_percent(0.123) == "12.3%"
    assert format_percent(0.0) == "0%"
    assert format_percent(1.0) == "100%"


# ----------------------------------------------------------------------------------------------
# help, version, bad input
# ----------------------------------------------------------------------------------------------


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if a.dest == "command")
    return list(sub.choices)


def test_every_subcommand_is_covered():
    assert {"convert", "info", "medians", "tokenize", "export", "run"} <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: flow {command}" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"flow {__version__}"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tokenize", "store.zarr"])  # -o and --medians missing
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def test_missing_store(capsys, tmp_path):
    status, _, err = run_cli(capsys, "info", tmp_path / "nothing.zarr")
    assert status == 1
    assert "flow info: error: No flow counts store at" in err
    assert "nothing.zarr" in err


def test_missing_input_file(capsys, tmp_path):
    status, _, err = run_cli(
        capsys, "convert", tmp_path / "nothing.h5ad", "-o", tmp_path / "c.zarr"
    )
    assert status == 1
    assert "flow convert: error:" in err
    assert "nothing.h5ad" in err


def test_symbols_instead_of_ensembl_ids(capsys, tmp_path, h5ad):
    """A store with gene symbols against an Ensembl vocabulary: exit 1, and the fix is named."""
    good, med = os.fspath(tmp_path / "good.zarr"), os.fspath(tmp_path / "m.zarr")
    assert run_cli(capsys, "convert", h5ad, "-o", good, "-q")[0] == 0
    assert run_cli(capsys, "medians", good, "-o", med, "--method", "exact", *CLUSTER)[0] == 0
    symbols = write_h5ad(tmp_path / "symbols.h5ad", symbols=True)
    bad = os.fspath(tmp_path / "symbols.zarr")
    assert run_cli(capsys, "convert", symbols, "-o", bad, "-q")[0] == 0
    status, _, err = run_cli(
        capsys, "tokenize", bad, "-o", tmp_path / "e.zarr", "--medians", med, *CLUSTER
    )
    assert status == 1
    assert err.startswith("flow tokenize: error: Only 0 of 120 store gene IDs")
    assert "gene symbols" in err
    assert "ensembl_mapping_dict" in err
    assert "Traceback" not in err


def test_demo_runs_every_stage(capsys, tmp_path):
    import datasets

    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "-o",
            str(out),
            "--cells",
            "1500",
            "--genes",
            "600",
            "--workers",
            "1",
            "--threads-per-worker",
            "2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    text = printed.out
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "covers", "Done in"):
        assert step in text
    assert "dashboard:" in printed.err
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds.num_rows == 1500
    enc = open_encoding(out / "encoding.zarr")
    lengths = enc.lengths
    assert all(
        row["input_ids"][0] == 2 and row["input_ids"][-1] == 3 for row in ds.select(range(20))
    )
    assert [row["length"] for row in ds.select(range(20))] == (
        np.minimum(lengths[:20], 4094) + 2
    ).tolist()


# ----------------------------------------------------------------------------------------------
# user mistakes: one line, no traceback, before any cluster starts
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_stores(tmp_path_factory, h5ad) -> dict[str, str]:
    """A count store, its medians and a V1-style encoding (a vocabulary without <cls>/<eos>)."""
    import json

    from flow import pipeline

    tmp = tmp_path_factory.mktemp("mistakes")
    paths = {n: os.fspath(tmp / f"{n}.zarr") for n in ("counts", "medians", "encoding")}
    counts = pipeline.convert([h5ad], paths["counts"])
    pipeline.medians([paths["counts"]], paths["medians"])
    genes = counts.var.index.tolist()
    vocabulary = tmp / "v1_like.json"
    vocabulary.write_text(
        json.dumps({"<pad>": 0, "<mask>": 1} | {g: i + 2 for i, g in enumerate(genes)})
    )
    pipeline.tokenize(counts, paths["encoding"], medians=paths["medians"], vocabulary=vocabulary)
    return paths


MISTAKES = {
    "missing medians pickle": (
        ["tokenize", "{counts}", "-o", "{tmp}/e.zarr", "--medians", "gene_median_dictionary.pkl"],
        "No such file or directory: 'gene_median_dictionary.pkl'",
    ),
    "missing vocabulary": (
        ["tokenize", "{counts}", "-o", "{tmp}/e.zarr", "--medians", "{medians}",
         "--vocabulary", "token_dictionary.pkl"],
        "No such file or directory: 'token_dictionary.pkl'",
    ),
    "missing gene mapping": (
        ["tokenize", "{counts}", "-o", "{tmp}/e.zarr", "--medians", "{medians}",
         "--gene-mapping", "map.tsv"],
        "No such file or directory: 'map.tsv'",
    ),
    "missing import": (
        ["medians", "--import", "gene_median_dictionary.pkl", "-o", "{tmp}/m.zarr"],
        "No such file or directory: 'gene_median_dictionary.pkl'",
    ),
    "no medians and no preset": (
        ["tokenize", "{counts}", "-o", "{tmp}/e.zarr"],
        "give the medians (--medians MEDIANS.zarr|DICT.pkl) or a preset (--preset V1|V2)",
    ),
    "V2 export of an encoding without <cls>": (
        ["export", "{encoding}", "-o", "{tmp}/ds", "--preset", "V2"],
        "Preset V2 needs special tokens",
    ),
    "a medians store given as the counts": (
        ["tokenize", "{medians}", "-o", "{tmp}/e.zarr", "--preset", "V1"],
        "is not a flow counts store (found kind 'medians')",
    ),
    "unknown obs column to export": (
        ["export", "{encoding}", "-o", "{tmp}/ds", "--obs-columns", "cell_type"],
        "obs columns ['cell_type'] are not in the encoding store",
    ),
}  # fmt: skip


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_user_mistakes_are_one_line_before_any_cluster(capsys, tmp_path, small_stores, mistake):
    argv, expected = MISTAKES[mistake]
    fill = {**small_stores, "tmp": os.fspath(tmp_path)}
    status, _, err = run_cli(capsys, *(a.format(**fill) for a in argv), "--workers", "1")
    assert status == 1
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert "dashboard" not in err  # no cluster was started to learn it
    assert not any(p.name.endswith((".zarr", "ds")) for p in tmp_path.iterdir())  # nothing written
