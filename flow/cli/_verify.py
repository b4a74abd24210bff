"""``flow verify``: check stores chunk by chunk; repair an encoding store's damaged blocks."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..verify import repair_encoding, verify
from ._common import client_from_args, reporter, storage_options


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the sub-command of this module."""
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check stores: structure, completeness and every chunk's checksum",
        description=(
            "Read every chunk of every array of count stores, median sets or encoding stores "
            "(in parallel) and list each damaged chunk. Exit status 1 when anything is damaged, "
            "missing or unfinished. --repair marks the damaged blocks of an encoding store so "
            "that the same `flow tokenize` command recomputes only those."
        ),
    )
    p.add_argument("stores", nargs="+", metavar="STORE.zarr")
    p.add_argument(
        "--repair",
        action="store_true",
        help="encoding stores: mark the blocks of damaged chunks to be recomputed by rerunning "
        "the `flow tokenize` command that made the store",
    )
    p.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    so = storage_options(args)
    status = 0
    with client_from_args(args):
        for where in args.stores:
            report = verify(where, storage_options=so, reporter=reporter(args, steps=False))
            print(report.summary())
            if report.ok:
                continue
            status = 1
            if args.repair and report.damaged:
                blocks = repair_encoding(where, storage_options=so, report=report)
                print(
                    f"  marked {len(blocks):,} blocks to recompute ({_listed(blocks)}); the store "
                    "is unfinished until you rerun the same `flow tokenize` command, which "
                    "recomputes only those",
                    file=sys.stdout,
                )
    return status


def _listed(blocks: list[int]) -> str:
    shown = ", ".join(map(str, blocks[:10]))
    return shown + (" ..." if len(blocks) > 10 else "") if blocks else "none"
