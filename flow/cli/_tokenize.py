"""``flow tokenize``, ``flow export`` and ``flow run``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import pipeline
from ._common import client_from_args, storage_options


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=["V1", "V2"],
        default=None,
        help="V1: 2,048 tokens, no special tokens; V2: 4,096 tokens with <cls> and <eos> (default V1)",
    )
    p.add_argument(
        "--input-size", type=int, metavar="N", help="model input size (overrides the preset's)"
    )


def _vocab_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vocabulary",
        metavar="DICT.pkl|MEDIANS.zarr",
        help="token dictionary (.pkl/.json/.tsv) or a median set to build one from (default: the medians)",
    )
    p.add_argument(
        "--gene-mapping",
        metavar="PKL|TSV",
        help="gene ID mapping, e.g. Geneformer's ensembl_mapping_dict",
    )


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the sub-commands of this module."""
    p = sub.add_parser(
        "tokenize",
        parents=[common],
        help="rank every cell into an encoding store",
        description="Rank-value encode every cell of a count store (full rankings; resumable).",
    )
    p.add_argument("store", metavar="STORE.zarr")
    p.add_argument("-o", "--output", required=True, metavar="ENCODING.zarr")
    p.add_argument("--medians", required=True, metavar="MEDIANS.zarr|DICT.pkl")
    _vocab_options(p)
    p.add_argument("--n-counts-column", default="n_counts")
    p.set_defaults(func=_tokenize)

    p = sub.add_parser(
        "export",
        parents=[common],
        help="write the model input as a Hugging Face dataset or Parquet",
    )
    p.add_argument("encoding", metavar="ENCODING.zarr")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--format", choices=["hf", "parquet"], default="hf")
    _model_options(p)
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "run",
        parents=[common],
        help="convert, medians, tokenize and export in one go",
        description="Convert inputs, compute medians (unless --medians), tokenize and export.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="input matrices, or one count store (used as it is, not converted again)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument(
        "--medians",
        metavar="MEDIANS.zarr|DICT.pkl",
        help="use these medians instead of computing them",
    )
    _vocab_options(p)
    _model_options(p)
    p.add_argument("--format", choices=["hf", "parquet"], default="hf")
    p.add_argument(
        "--block-size", type=int, default=4096, metavar="N", help="cells per block (default 4096)"
    )
    p.set_defaults(func=_run)


def _preset(args: argparse.Namespace) -> str | None:
    return args.preset or ("V1" if args.input_size is None else None)


def _tokenize(args: argparse.Namespace) -> int:
    with client_from_args(args):
        enc = pipeline.tokenize(
            args.store,
            args.output,
            medians=args.medians,
            vocabulary=args.vocabulary,
            gene_mapping=args.gene_mapping,
            n_counts_column=args.n_counts_column,
            storage_options=storage_options(args),
            quiet=args.quiet,
        )
    print(pipeline.describe_encoding(enc))
    return 0


def _export(args: argparse.Namespace) -> int:
    with client_from_args(args):
        out = pipeline.export(
            args.encoding,
            args.output,
            format=args.format,
            preset=_preset(args),
            input_size=args.input_size,
            storage_options=storage_options(args),
            quiet=args.quiet,
        )
    print(f"exported {args.format} dataset -> {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        # with --scheduler the input is read on the cluster too (see `flow convert`)
        on_cluster = {"client": client} if args.scheduler else {}
        paths = pipeline.run(
            args.inputs,
            args.output,
            medians_path=args.medians,
            vocabulary=args.vocabulary,
            preset=_preset(args),
            input_size=args.input_size,
            gene_mapping=args.gene_mapping,
            format=args.format,
            convert_options={"block_size": args.block_size, **on_cluster},
            storage_options=storage_options(args),
            quiet=args.quiet,
            say=lambda text: print(text, file=sys.stderr),
        )
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
