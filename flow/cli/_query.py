"""``flow dropped``, ``flow drop-rates``, ``flow coverage`` and ``flow report``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import query, report
from ..encode.store import open_encoding
from ._common import client_from_args, storage_options


def _encoding_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("encoding", metavar="ENCODING.zarr")


def _cutoff_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cutoff",
        type=int,
        default=query.DEFAULT_CUTOFF,
        metavar="L",
        help=f"model input size: ranks L and beyond are dropped (default {query.DEFAULT_CUTOFF})",
    )


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the sub-commands of this module."""
    for add in (_add_dropped, _add_drop_rates, _add_coverage, _add_report):
        add(sub, common)


def _add_dropped(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "dropped",
        parents=[common],
        help="genes one cell drops past the cutoff, or how often a gene is dropped",
        description="For a cell: the genes ranked at L or beyond, with value and fold change. "
        "For a gene: in how many expressing cells it is dropped at L, and its rank distribution.",
    )
    _encoding_arg(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--cell", metavar="BARCODE|INDEX", help="a barcode or 0-based cell index")
    what.add_argument("--gene", metavar="ID|SYMBOL", help="an Ensembl ID or a symbol (any case)")
    _cutoff_arg(p)
    p.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="output format (default table)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE instead (.csv, .tsv, .json, .parquet by suffix)",
    )
    p.set_defaults(func=_dropped)


def _add_drop_rates(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "drop-rates",
        parents=[common],
        help="per-gene drop rates at the cutoff, for all genes",
        description="One out-of-core pass over ranks >= L: for every gene, the passing cells "
        "expressing it, the cells dropping it and the rate.",
    )
    _encoding_arg(p)
    _cutoff_arg(p)
    p.add_argument(
        "-o",
        "--output",
        metavar="RATES.csv|RATES.parquet",
        help="write the full table (else print the top)",
    )
    p.add_argument(
        "--top", type=int, default=20, metavar="N", help="genes to print without -o (default 20)"
    )
    p.set_defaults(func=_drop_rates)


def _add_coverage(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "coverage",
        parents=[common],
        help="fraction of cells fully encoded at each input size",
        description="Prints what input sizes cover and cost, e.g. "
        "'2,048 covers 93.0%% of cells at cost 1.0', the cost being the dense attention "
        "cost relative to 2,048 tokens, (L / 2,048)^2.",
    )
    _encoding_arg(p)
    p.add_argument(
        "--sizes",
        default="2048,4096",
        metavar="L1,L2,...",
        help="sizes for the summary line (default 2048,4096)",
    )
    p.add_argument("--plot", metavar="COVERAGE.png", help="also draw the coverage curve")
    p.add_argument(
        "-o", "--output", metavar="COVERAGE.csv", help="also write the curve for every input size"
    )
    p.set_defaults(func=_coverage)


def _add_report(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "report",
        parents=[common],
        help="a one-page HTML report of what the cutoff drops",
        description="Write one self-contained HTML page: coverage curve, detected genes per "
        "cell, the genes dropped most often, and drop rates (per group with --group-by).",
    )
    _encoding_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="REPORT.html")
    _cutoff_arg(p)
    p.add_argument(
        "--group-by",
        metavar="COLUMN",
        help="a carried cell column (e.g. cell_type) to summarise per group",
    )
    p.add_argument(
        "--top", type=int, default=20, metavar="N", help="top dropped genes to show (default 20)"
    )
    p.add_argument(
        "--retention",
        action="store_true",
        help="add retention by input size and the tail's fold change (flow retention)",
    )
    p.set_defaults(func=_report)


def _open(args: argparse.Namespace) -> Any:
    return open_encoding(args.encoding, storage_options=storage_options(args) or None)


def _emit(text: str | None) -> None:
    if text is None:
        return
    try:
        print(text, end="" if text.endswith("\n") else "\n", flush=True)
    except BrokenPipeError:  # `flow dropped ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _dropped(args: argparse.Namespace) -> int:
    enc = _open(args)
    if args.cell is not None:
        answer: Any = query.dropped_genes(enc, args.cell, args.cutoff)
    else:
        with client_from_args(args, cells=enc.layout.n_cells):
            answer = query.gene_drop(enc, args.gene, args.cutoff)
    _emit(report.write_answer(answer, fmt=args.format, path=args.output))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _drop_rates(args: argparse.Namespace) -> int:
    enc = _open(args)
    rates = query.drop_rates(enc, args.cutoff)
    with client_from_args(args, cells=enc.layout.n_cells):
        frame = query.write_drop_rates(rates, args.output) if args.output else rates.to_frame()
    print(report.format_drop_rates(frame, top=args.top))
    if args.output:
        print(f"wrote {len(frame):,} genes -> {args.output}")
    return 0


def _coverage(args: argparse.Namespace) -> int:
    enc = _open(args)
    sizes = query.parse_sizes(args.sizes)
    print(query.coverage_summary(enc, sizes))
    print(f"({report.COST_HEADER})")
    if args.plot:
        report.plot_coverage(enc, args.plot)
        print(f"wrote {args.plot}")
    if args.output:
        query.coverage(enc).to_csv(args.output, index=False)
        print(f"wrote {args.output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    enc = _open(args)
    with client_from_args(args, cells=enc.layout.n_cells):
        out = report.write_report(
            enc, args.output, args.cutoff, args.group_by, top=args.top, retention=args.retention
        )
    print(query.coverage_summary(enc))
    print(f"({report.COST_HEADER})")
    print(f"wrote {out}")
    return 0
