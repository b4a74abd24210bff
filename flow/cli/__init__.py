"""The ``flow`` command line: a thin shell over :mod:`flow.pipeline` and :mod:`flow.query`.

Each sub-command lives in its own module with a ``register(subparsers, common)`` function;
``common`` holds the options every command takes (cluster, progress).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

from .._checksum import is_checksum_error
from .._location import store_failure
from .._version import __version__
from ..cluster import Interrupted, stop_on_signals
from ..errors import FlowError, FlowWarning
from . import _convert, _demo, _medians, _query, _retention, _tokenize, _verify

__all__ = ["main"]


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    grp = common.add_argument_group(
        "cluster and output",
        "Work on fewer than $FLOW_CLUSTER_CELLS cells (default 50,000) runs on threads in this "
        "process; larger work starts a local Dask cluster, as do --workers, "
        "--threads-per-worker and --memory-limit for any size.",
    )
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
    for module in (_demo, _convert, _medians, _tokenize, _query, _retention, _verify):
        module.register(sub, common)
    return parser


def _one_line_warning(
    message: Warning | str, category: type[Warning], *args: object, **kwargs: object
) -> str:
    """flow's own warnings as ``warning: ...`` (no file and source line); others as Python's."""
    if issubclass(category, FlowWarning):
        return f"warning: {message}\n"
    return _PYTHON_FORMAT(message, category, *args, **kwargs)  # type: ignore[arg-type]


_PYTHON_FORMAT = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flow`` command; returns the exit status (0 ok, 1 flow error, 2 usage,
    130/143 interrupted by SIGINT/SIGTERM: rerun the same command to finish)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        with stop_on_signals():  # Ctrl-C, SIGTERM: Interrupted, the cluster shut down
            status = args.func(args)
    except FlowError as err:
        print(f"flow {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # zarr's bare checksum error (flow's own names the chunk)
        damaged = "a stored chunk fails its checksum: `flow verify STORE` names it"
        if isinstance(err, json.JSONDecodeError):
            damaged = (
                f"a store's metadata (zarr.json) is damaged, not valid JSON ({err}): "
                "`flow verify STORE` names it; rerun the command that wrote the store"
            )
        checksum = is_checksum_error(err) or isinstance(err, json.JSONDecodeError)
        failed = damaged if checksum else store_failure(err, vars(args).values())
        if failed is None:
            raise
        print(f"flow {args.command}: error: {failed}", file=sys.stderr)
        return 1
    except OSError as err:  # a file not found, not readable, a full disk: the user can act
        where = f": {err.filename!r}" if err.filename else ""
        msg = store_failure(err, vars(args).values()) or f"{err.strerror or err}{where}"
        print(f"flow {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(
            f"flow {args.command}: interrupted: rerun the same command to finish", file=sys.stderr
        )
        return err.exit_status if isinstance(err, Interrupted) else 130
    except Exception as err:  # an object store still failing after its retries; else a bug
        if (failure := store_failure(err, vars(args).values())) is None:
            raise
        print(f"flow {args.command}: error: {failure}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
