"""The ``flow`` command line: a thin shell over :mod:`flow.pipeline` and :mod:`flow.query`.

Each sub-command lives in its own module with a ``register(subparsers, common)`` function;
``common`` holds the options every command takes (cluster, progress).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import FlowError
from . import _convert, _demo, _medians, _query, _retention, _tokenize

__all__ = ["main"]


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    grp = common.add_argument_group("cluster and output")
    grp.add_argument(
        "--scheduler", metavar="ADDRESS", help="use this distributed scheduler (tcp://host:8786)"
    )
    grp.add_argument("--workers", type=int, metavar="N", help="local cluster: worker processes")
    grp.add_argument(
        "--threads-per-worker", type=int, metavar="T", help="local cluster: threads per worker"
    )
    grp.add_argument(
        "--memory-limit",
        metavar="M",
        default="auto",
        help="local cluster: memory per worker (e.g. 2GiB; default auto)",
    )
    grp.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or dashboard link"
    )
    grp.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for s3:// etc. URLs (repeatable)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flow`` command."""
    parser = argparse.ArgumentParser(
        prog="flow",
        description="Geneformer rank value encodings, out of core, with Dask and Zarr.",
    )
    parser.add_argument("--version", action="version", version=f"flow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_parser()
    for module in (_demo, _convert, _medians, _tokenize, _query, _retention):
        module.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flow`` command; returns the exit status (0 ok, 1 flow error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except FlowError as err:
        print(f"flow {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a file not found, not readable, a full disk: the user can act
        where = f": {err.filename!r}" if err.filename else ""
        print(f"flow {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"flow {args.command}: interrupted; rerun the same command to finish.", file=sys.stderr
        )
        return 130
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
