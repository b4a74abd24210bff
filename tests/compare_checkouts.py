"""Check that two checkouts of flow write byte-identical stores (a maintainer's script).

Runs the same ``flow`` commands with the code of each checkout, on PBMC 3k, PBMC 1k and a
seeded synthetic h5ad with doublets (deep cells), duplicate and versioned gene IDs, then
compares every file of every store and dataset written, byte for byte::

    python tests/compare_checkouts.py OLD_CHECKOUT [NEW_CHECKOUT] [--data ../shared/data]

Each checkout runs in its own interpreter whose ``sys.path`` starts with that checkout (the
dependencies are the current environment's; an editable install of flow is left out), workers
of the local cluster included. Exits 0 when everything is identical, 1 otherwise, and prints
one line per store compared.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTER = ["--workers", "2", "--threads-per-worker", "1", "-q"]


def synthetic_h5ad(path: Path, *, n_cells: int = 3_000, n_genes: int = 4_000) -> None:
    """A seeded h5ad: ~300 genes per cell, 2% doublets with ~6x the genes, duplicate IDs."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(7)
    depth = rng.poisson(300, n_cells)
    depth[rng.random(n_cells) < 0.02] *= 6  # doublets: the deepest cells set the old width
    rows, cols = [], []
    for i, d in enumerate(np.minimum(depth, n_genes)):
        rows.append(np.full(d, i))
        cols.append(rng.choice(n_genes, d, replace=False))
    r, c = np.concatenate(rows), np.concatenate(cols)
    data = rng.geometric(0.4, r.size).astype(np.int32)
    x = sp.csr_matrix((data, (r, c)), shape=(n_cells, n_genes))
    ids = [f"ENSG{1_000_000 + 3 * g:011d}" for g in range(n_genes)]
    ids[10] = ids[11] + ".7"  # a versioned duplicate: summed after normalisation
    ids[20] = ids[21].lower()  # a lower-case duplicate
    var = pd.DataFrame({"gene_symbol": [f"G{g}" for g in range(n_genes)]}, index=ids)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], n_cells)),
            "filter_pass": (rng.random(n_cells) > 0.05).astype(np.int8),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    anndata.AnnData(x, obs=obs, var=var).write_h5ad(path)


def commands(data: Path, synthetic: Path) -> dict[str, list[list[str]]]:
    """The runs to compare: name -> flow commands (output paths relative to the run folder)."""
    v1 = data / "geneformer" / "v1_gc30M"
    v2 = data / "geneformer" / "v2_gc104M"
    pbmc3k = data / "pbmc3k" / "filtered_gene_bc_matrices" / "hg19"
    pbmc1k = data / "pbmc1k_v2" / "pbmc_1k_v2_filtered_feature_bc_matrix.h5"
    v1_dicts = [
        "--medians", str(v1 / "gene_median_dictionary_gc30M.pkl"),
        "--vocabulary", str(v1 / "token_dictionary_gc30M.pkl"),
    ]  # fmt: skip
    v2_dicts = [
        "--medians", str(v2 / "gene_median_dictionary_gc104M.pkl"),
        "--vocabulary", str(v2 / "token_dictionary_gc104M.pkl"),
        "--gene-mapping", str(v2 / "ensembl_mapping_dict_gc104M.pkl"),
    ]  # fmt: skip
    return {
        "pbmc3k": [
            ["convert", str(pbmc3k), "-o", "counts.zarr"],
            ["medians", "counts.zarr", "-o", "medians.zarr"],
            ["medians", "counts.zarr", "-o", "exact.zarr", "--method", "exact"],
            ["tokenize", "counts.zarr", "-o", "enc_v1.zarr", *v1_dicts],
            ["tokenize", "counts.zarr", "-o", "enc_own.zarr", "--medians", "medians.zarr"],
            ["export", "enc_v1.zarr", "-o", "v1.dataset", "--preset", "V1"],
            ["export", "enc_own.zarr", "-o", "own.parquet", "--format", "parquet"],
        ],
        "pbmc1k": [
            ["run", str(pbmc1k), "-o", "run_v2", *v2_dicts, "--preset", "V2"],
            ["run", str(pbmc1k), "-o", "run_own", "--block-size", "300"],
        ],
        "synthetic": [
            ["convert", str(synthetic), "-o", "counts.zarr", "--block-size", "512"],
            ["medians", "counts.zarr", "-o", "medians.zarr"],
            ["medians", "counts.zarr", "-o", "exact.zarr", "--method", "exact"],
            ["tokenize", "counts.zarr", "-o", "enc.zarr", "--medians", "exact.zarr"],
            ["export", "enc.zarr", "-o", "v2.dataset", "--preset", "V2"],
        ],
    }


def _interpreter(work: Path) -> Path:
    """A venv whose site-packages are this environment's, without its ``.pth`` hooks (so an
    editable install of flow does not shadow the checkout put first on ``PYTHONPATH``)."""
    venv = work / "venv"
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        purelib = Path(sysconfig.get_paths()["purelib"])
        inner = next((venv / "lib").glob("python*/site-packages"))
        (inner / "flow_compare_deps.pth").write_text(f"{purelib}\n")
    return venv / "bin" / "python"


def run_checkout(checkout: Path, python: Path, cmds: list[list[str]], where: Path) -> None:
    """Run ``cmds`` with ``checkout``'s flow in ``where`` (created empty)."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    for cmd in cmds:
        full = [str(python), "-m", "flow.cli", cmd[0], *cmd[1:], *CLUSTER]
        done = subprocess.run(full, cwd=where, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            msg = f"{checkout}: flow {' '.join(cmd)} failed:\n{done.stderr}"
            raise SystemExit(msg)


def differences(a: Path, b: Path) -> list[str]:
    """Relative paths of files that differ, or exist on one side only."""
    out = []
    cmp = filecmp.dircmp(a, b)
    out += [f"only in old: {name}" for name in cmp.left_only]
    out += [f"only in new: {name}" for name in cmp.right_only]
    for name in cmp.common_files:
        if not filecmp.cmp(a / name, b / name, shallow=False):
            out.append(f"differs: {name}")
    for name in cmp.common_dirs:
        out += [f"{name}/{d}" for d in differences(a / name, b / name)]
    return out


def main(argv: list[str] | None = None) -> int:
    """Compare the stores the two checkouts write; 0 when all are identical."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=REPO)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=None, help="working folder (kept)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="flow-compare-"))
    python = _interpreter(work)
    synthetic = work / "synthetic.h5ad"
    if not synthetic.exists():
        synthetic_h5ad(synthetic)
    failed = 0
    for name, cmds in commands(args.data.resolve(), synthetic).items():
        run = work / "run"  # both write to the same path: recorded URLs are equal
        run_checkout(args.old.resolve(), python, cmds, run)
        old = work / f"{name}-old"
        shutil.rmtree(old, ignore_errors=True)
        run.rename(old)
        run_checkout(args.new.resolve(), python, cmds, run)
        new = work / f"{name}-new"
        shutil.rmtree(new, ignore_errors=True)
        run.rename(new)
        diff = differences(old, new)
        n_files = sum(len(files) for _, _, files in os.walk(new))
        print(
            f"{name}: {n_files} files compared, {len(diff)} differ"
            + "".join(f"\n  {d}" for d in diff)
        )
        failed += bool(diff)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
