"""``flow retention``: what input size keeps each gene and gene set, and what the tail is."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import report
from .._names import table_writer
from ..cluster import compute
from ..encode.store import open_encoding
from ..errors import InputError
from ..retention import (
    DEFAULT_CUTOFFS,
    DEFAULT_KEEP,
    RetentionResult,
    gene_retention,
    read_gene_list,
    write_retention,
)
from ._common import client_from_args, storage_options


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``retention`` sub-command."""
    p = sub.add_parser(
        "retention",
        parents=[common],
        help="what input size keeps each gene and gene set; the fold change of the tail",
        description="For every gene (or the given genes) and gene set, in passing cells: "
        "expressing cells, cells dropping it at each cutoff, and the input size that keeps it "
        "in a fraction p of its expressing cells (exact). With --tail-output, the fold change "
        "against the corpus of the occurrences kept and dropped at each cutoff.",
    )
    p.add_argument("encoding", metavar="ENCODING.zarr")
    p.add_argument(
        "--cutoffs",
        default=",".join(map(str, DEFAULT_CUTOFFS)),
        metavar="L1,L2,...",
        help="model input sizes (default %(default)s)",
    )
    p.add_argument(
        "--keep",
        default=",".join(DEFAULT_KEEP),
        metavar="P1,P2,...",
        help="fractions of expressing cells to keep each gene in (default %(default)s)",
    )
    genes = p.add_mutually_exclusive_group()
    genes.add_argument("--genes", metavar="G1,G2,...", help="only these genes (IDs or symbols)")
    genes.add_argument("--genes-file", metavar="FILE", help="only these genes, one per line")
    p.add_argument(
        "--gene-sets", metavar="FILE.gmt", help="gene sets: a GMT file, or one gene per line"
    )
    p.add_argument("--group-by", metavar="COLUMN", help="a carried cell column, e.g. cell_type")
    p.add_argument(
        "-o", "--output", required=True, metavar="GENES.csv", help="the genes table (.parquet too)"
    )
    p.add_argument("--sets-output", metavar="SETS.csv", help="the gene sets table")
    p.add_argument("--tail-output", metavar="TAIL.csv", help="the tail's fold-change table")
    p.add_argument("--plot", metavar="RETENTION.png", help="share kept vs input size")
    p.add_argument("--tail-plot", metavar="TAIL.png", help="fold change of kept vs dropped")
    p.set_defaults(func=_retention)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse unusable outputs before any pass runs."""
    if args.sets_output and not args.gene_sets:
        msg = "--sets-output needs --gene-sets FILE.gmt."
        raise InputError(msg)
    tables = (args.output, args.sets_output, args.tail_output)
    for path in (*tables, args.plot, args.tail_plot):
        if path is None:
            continue
        if path in tables:
            table_writer(path)
        elif not path.lower().endswith(".png"):
            msg = f"Plots are PNG files: {path!r} should end in .png."
            raise InputError(msg)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            msg = f"No folder {folder!r} to write {os.path.basename(path)!r} in: create it first."
            raise InputError(msg)


def _genes(args: argparse.Namespace) -> list[str] | None:
    if args.genes_file:
        return list(read_gene_list(args.genes_file))
    if args.genes is not None:
        names = [g for g in args.genes.replace(",", " ").split() if g]
        if not names:
            msg = "--genes takes gene IDs or symbols separated by commas."
            raise InputError(msg)
        return names
    return None


def _summary(result: RetentionResult) -> str:
    genes = result.genes_frame()
    lines = [f"{len(genes):,} gene rows; {result.passes} passes over the encoding store"]
    tail = result.tail_frame() if result.value_key is not None else None
    if tail is not None and "group" in tail:
        tail = tail[tail["group"] == tail["group"].iloc[-1]]
    for cutoff in result.spec.cutoffs:
        col = f"dropped_at_{cutoff}"
        line = f"at {cutoff:,}: {int(genes[col].sum()):,} of {int(genes['expressing_cells'].sum()):,} occurrences dropped"
        if tail is not None:
            rows = tail[tail["cutoff"] == cutoff].set_index("part")["below_median_fraction"]
            line += "; below the corpus median: " + ", ".join(
                f"{100 * rows[part]:.1f}% of {part}" if rows[part] == rows[part] else f"none {part}"
                for part in ("dropped", "kept")
            )
        lines.append(line)
    return "\n".join(lines)


def _retention(args: argparse.Namespace) -> int:
    _check_outputs(args)
    enc = open_encoding(args.encoding, storage_options=storage_options(args) or None)
    retention = gene_retention(
        enc,
        args.cutoffs,
        keep=args.keep,
        genes=_genes(args),
        gene_sets=args.gene_sets,
        group_by=args.group_by,
        tail=bool(args.tail_output or args.tail_plot),
    )
    with client_from_args(args, cells=enc.layout.n_cells):
        result = retention.compute(
            compute=lambda *graphs: compute(*graphs, quiet=args.quiet, label="retention")
        )
    write_retention(result, args.output, sets=args.sets_output, tail=args.tail_output)
    written = [p for p in (args.output, args.sets_output, args.tail_output) if p]
    if args.plot:
        report.plot_retention(result, args.plot)
        written.append(args.plot)
    if args.tail_plot:
        report.plot_fold_change(result, args.tail_plot)
        written.append(args.tail_plot)
    print(_summary(result))
    print(f"wrote {', '.join(written)}")
    return 0
