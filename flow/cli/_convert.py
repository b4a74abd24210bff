"""``flow convert`` and ``flow info``."""

from __future__ import annotations

import argparse
from typing import Any

from .. import pipeline
from .._claim import claim_output
from ..ingest import ReadOptions
from ..store import open_counts
from ._common import client_from_args, reporter, storage_options


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the sub-commands of this module."""
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="convert count matrices (h5ad, 10x h5/MTX, loom, AnnData zarr) into a count store",
        description=(
            "Convert one or more count matrices into one AnnData-compatible Zarr count store. "
            "The inputs are read by many tasks at once (one per file, and one per range of "
            "cells of h5ad, 10x h5, loom, AnnData zarr and TileDB-SOMA inputs) on a local "
            "cluster (started for 50,000 cells or more; threads below), or with --scheduler on "
            "that cluster's workers (which must see the inputs and the output). Many inputs make one store."
        ),
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="h5ad, 10x .h5, 10x MTX directory, .loom, AnnData .zarr or TileDB-SOMA experiment",
    )
    p.add_argument("-o", "--output", required=True, metavar="STORE.zarr")
    p.add_argument(
        "--format",
        choices=["h5ad", "10x-h5", "10x-mtx", "loom", "anndata-zarr", "soma"],
        help="input format (default: from the path)",
    )
    p.add_argument(
        "--layer", help="h5ad/zarr/loom: read this layer instead of X; soma: the X layer"
    )
    p.add_argument("--use-raw", action="store_true", help="h5ad/zarr: read raw.X")
    p.add_argument(
        "--gene-id-column", metavar="COL", help="var (row attribute) column holding Ensembl IDs"
    )
    p.add_argument(
        "--obs-columns",
        metavar="A,B",
        help="cell metadata columns to carry (default: all simple ones)",
    )
    p.add_argument("--genome", help="10x h5 v2 files with several genomes: which one")
    p.add_argument("--measurement", help="TileDB-SOMA: the measurement to read (default RNA)")
    p.add_argument(
        "--obs-filter",
        metavar="EXPR",
        help='TileDB-SOMA: read only the cells this obs value filter keeps, e.g. "n_counts > 500"',
    )
    p.add_argument(
        "--block-size", type=int, default=4096, metavar="N", help="cells per block (default 4096)"
    )
    p.add_argument(
        "--allow-non-integer",
        action="store_true",
        help="admit non-integer counts (stored as float32)",
    )
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "info",
        parents=[common],
        help="summarise a count store",
        description="Summarise a count store: cells, genes, detected genes per cell, blocks, sources.",
    )
    p.add_argument("store", metavar="STORE.zarr")
    p.set_defaults(func=_info)


def _convert(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:  # local: started only for large inputs
        return _convert_with(args, client() if args.scheduler else None)


def _convert_with(args: argparse.Namespace, client: Any) -> int:
    so = storage_options(args)
    with claim_output(args.output, command="convert", storage_options=so):  # one writer
        store = pipeline.convert(
            args.inputs,
            args.output,
            read=read_options(args),
            block_size=args.block_size,
            allow_non_integer=args.allow_non_integer,
            storage_options=so,
            reporter=reporter(args),
            client=client,
        )
    print(store.describe())
    return 0


def read_options(args: argparse.Namespace) -> ReadOptions:
    """The reader options of ``flow convert`` (``flow run`` reads with the defaults)."""
    return ReadOptions(
        format=args.format,
        layer=args.layer,
        use_raw=args.use_raw,
        gene_id_column=args.gene_id_column,
        obs_columns=tuple(args.obs_columns.split(",")) if args.obs_columns else None,
        genome=args.genome,
        measurement=args.measurement,
        obs_filter=args.obs_filter,
    )


def _info(args: argparse.Namespace) -> int:
    print(open_counts(args.store, storage_options=storage_options(args)).describe())
    return 0
