"""``flow medians``: nonzero medians of one or more count stores, merged or updated."""

from __future__ import annotations

import argparse
from typing import Any

from .. import pipeline
from ..cluster import MEDIANS_MMAP_THRESHOLD, worker_environ
from ._common import client_from_args, reporter, storage_options


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the sub-command of this module."""
    p = sub.add_parser(
        "medians",
        parents=[common],
        help="compute each gene's nonzero median over count stores (t-digest or exact)",
        description=(
            "Compute per-gene nonzero medians of count / n_counts x 10,000 over one or more count "
            "stores into a median set. --update merges new stores into an existing t-digest median "
            "set without reading the old data. --import/--export convert Geneformer dictionaries."
        ),
    )
    p.add_argument("stores", nargs="*", metavar="STORE.zarr")
    p.add_argument("-o", "--output", metavar="MEDIANS.zarr", help="median set to write")
    p.add_argument("--method", choices=["tdigest", "exact"], default="tdigest")
    p.add_argument(
        "--compression", type=float, default=None, help="t-digest compression (default: flow's)"
    )
    p.add_argument(
        "--update", metavar="MEDIANS.zarr", help="merge the stores into this existing median set"
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="MEDIANS.zarr",
        help="also merge these median sets",
    )
    p.add_argument(
        "--import",
        dest="import_",
        metavar="DICT.pkl",
        help="import Geneformer's gene_median_dictionary pickle",
    )
    p.add_argument(
        "--preset",
        choices=["V1", "V2"],
        type=str.upper,
        help="import Geneformer's medians of this model, shipped with flow (V1: gc30M, V2: gc104M)",
    )
    p.add_argument(
        "--export",
        metavar="FILE",
        help="also write the medians as .pkl (Geneformer), .tsv or .json",
    )
    p.add_argument(
        "--n-counts-column", default="n_counts", help="obs column with each cell's total counts"
    )
    p.add_argument(
        "--gene-mapping", metavar="PKL|TSV", help="gene ID mapping applied before medians"
    )
    p.set_defaults(func=_medians)


def _medians(args: argparse.Namespace) -> int:
    if not (args.stores or args.import_ or args.preset or args.merge or args.update):
        print(
            "flow medians: nothing to do: give count stores, --import, --preset, --merge or --update"
        )
        return 2
    if not args.output and not args.export:
        print("flow medians: give -o MEDIANS.zarr and/or --export FILE")
        return 2
    with client_from_args(args, environ=worker_environ(MEDIANS_MMAP_THRESHOLD)):
        result = pipeline.medians(
            args.stores,
            args.output,
            method=args.method,
            compression=args.compression,
            update=args.update,
            merge=args.merge,
            import_dictionary=args.import_,
            preset=args.preset,
            export=args.export,
            n_counts_column=args.n_counts_column,
            gene_mapping=args.gene_mapping,
            storage_options=storage_options(args),
            reporter=reporter(args),
        )
    print(result.describe(args.output))
    return 0
