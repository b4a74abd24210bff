"""``flow tokenize``, ``flow export`` and ``flow run``."""

from __future__ import annotations

import argparse
from typing import Any

from .. import pipeline
from ..encode.store import open_encoding
from ..errors import InputError
from ..export import export_summary
from ..store import open_counts
from ..vocab import DEFAULT_PRESET, resolve_preset
from ._common import client_from_args, reporter, storage_options


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=["V1", "V2"],
        type=str.upper,
        default=None,
        help="V1: 2,048 tokens, no special tokens; V2: 4,096 tokens with <cls> and <eos> "
        "(default V1); with `flow run` also Geneformer's dictionaries for that model, shipped "
        "with flow (--medians/--vocabulary/--gene-mapping override each part)",
    )
    p.add_argument(
        "--input-size", type=int, metavar="N", help="model input size (overrides the preset's)"
    )
    p.add_argument(
        "--obs-columns",
        metavar="A,B",
        help="carried cell columns to export beside each row's cell_id (default: all)",
    )


def _preset_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=["V1", "V2"],
        type=str.upper,
        default=None,
        help="Geneformer's dictionaries shipped with flow: V1 (gc30M) or V2 (gc104M, with its "
        "gene mapping); --medians/--vocabulary/--gene-mapping override each part",
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
    p.add_argument(
        "--medians", metavar="MEDIANS.zarr|DICT.pkl", help="the medians (default: the preset's)"
    )
    _preset_option(p)
    _vocab_options(p)
    p.add_argument("--n-counts-column", default="n_counts")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output written from other inputs or parameters (a rerun with the same "
        "ones finishes or keeps it)",
    )
    p.set_defaults(func=_tokenize)

    p = sub.add_parser(
        "export",
        parents=[common],
        help="write the model input as a Hugging Face dataset or Parquet",
        description="Write each passing cell's model input (its first ranks, with the preset's "
        "special tokens) as a Hugging Face dataset (datasets.load_from_disk) or Parquet files.",
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
    p.add_argument(
        "--own-dictionaries",
        action="store_true",
        help="with --preset: compute the medians from the inputs and build the vocabulary from "
        "them (a new model's) instead of using Geneformer's; the preset sets the model input",
    )
    p.add_argument("--format", choices=["hf", "parquet"], default="hf")
    p.add_argument(
        "--block-size", type=int, default=4096, metavar="N", help="cells per block (default 4096)"
    )
    p.set_defaults(func=_run)


def _obs_columns(args: argparse.Namespace) -> list[str] | None:
    return args.obs_columns.split(",") if args.obs_columns else None


def _preset(args: argparse.Namespace) -> str | None:
    return args.preset or (DEFAULT_PRESET if args.input_size is None else None)


def _dictionaries(args: argparse.Namespace, preset: str | None) -> dict[str, Any]:
    """The medians, vocabulary and gene mapping named on the command line, opened once; the
    parts not named come from ``preset``'s bundled Geneformer dictionaries, if given."""
    so = storage_options(args)
    given = {
        "medians": None
        if args.medians is None
        else pipeline.load_medians(args.medians, storage_options=so),
        "vocabulary": None
        if args.vocabulary is None
        else pipeline.load_vocabulary(args.vocabulary, storage_options=so),
        "gene_mapping": pipeline.load_gene_mapping(args.gene_mapping),
    }
    if preset is None:
        return given
    bundled = pipeline.preset_dictionaries(preset)
    return {k: bundled[k] if v is None else v for k, v in given.items()}


def _tokenize(args: argparse.Namespace) -> int:
    so = storage_options(args)
    if args.medians is None and args.preset is None:
        msg = "give the medians (--medians MEDIANS.zarr|DICT.pkl) or a preset (--preset V1|V2)"
        raise InputError(msg)
    store = open_counts(args.store, storage_options=so)
    dictionaries = _dictionaries(args, args.preset)
    with client_from_args(args):
        enc = pipeline.tokenize(
            store,
            args.output,
            n_counts_column=args.n_counts_column,
            overwrite=args.overwrite,
            storage_options=so,
            reporter=reporter(args, steps=not args.quiet),
            **dictionaries,
        )
    print(enc.describe())
    return 0


def _export(args: argparse.Namespace) -> int:
    so = storage_options(args)
    enc = open_encoding(args.encoding, storage_options=so)
    preset = resolve_preset(_preset(args), args.input_size)
    with client_from_args(args):
        out = pipeline.export(
            enc,
            args.output,
            format=args.format,
            preset=preset,
            obs_columns=_obs_columns(args),
            storage_options=so,
            reporter=reporter(args, steps=False),
        )
    print(f"exported {args.format} dataset -> {out}: {export_summary(enc, preset)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    preset = resolve_preset(_preset(args), args.input_size)
    dictionaries = _dictionaries(args, None if args.own_dictionaries else args.preset)
    with client_from_args(args) as client:
        result = pipeline.run(
            args.inputs,
            args.output,
            preset=preset,
            format=args.format,
            obs_columns=_obs_columns(args),
            block_size=args.block_size,
            storage_options=storage_options(args),
            reporter=reporter(args),
            # with --scheduler the input is read on the cluster too (see `flow convert`)
            client=client() if args.scheduler else None,
            **dictionaries,
        )
    for name, path in result.paths.items():
        print(f"{name}: {path}")
    return 0
