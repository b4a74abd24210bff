"""HDF5 inputs (h5ad, Cell Ranger ``.h5``, loom): opening, telling them apart, reading text.

:func:`open_h5` opens a local file with h5py, or a URL through fsspec as a file object with a
read-ahead of :data:`H5_BLOCK_SIZE` (HDF5 then reads only the byte ranges it
needs). Readers read all their metadata in one open, and each pass over the counts opens the
file again for itself (a source holds no open handle, so it pickles and many can be open).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import h5py

from ..errors import InputError
from ._columns import as_str_array
from ._fs import cause, input_errors, open_input, redact

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np

    from .._location import Location

__all__ = ["H5_BLOCK_SIZE", "H5_ERRORS", "h5_strings", "open_h5", "sniff_h5"]

#: What h5py raises on a damaged file once it is open: OSError ("Can't read data"),
#: RuntimeError ("wrong B-tree signature"), KeyError (a damaged link or object header),
#: UnicodeDecodeError (a damaged byte in a text dataset: barcodes, gene IDs).
H5_ERRORS: tuple[type[Exception], ...] = (OSError, RuntimeError, KeyError, UnicodeDecodeError)

#: Read-ahead of remote HDF5 files (h5ad, 10x h5, loom): one request per miss fetches this much.
H5_BLOCK_SIZE = 2 << 20


@contextlib.contextmanager
def open_h5(location: Location) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only; a file HDF5 cannot open or read is an :class:`InputError`.

    A URL is opened with fsspec (its storage options) and handed to h5py as a file object;
    both are closed on exit, so each use opens its own handle.
    """
    path = location.path
    with contextlib.ExitStack() as stack:
        try:
            if location.is_url:  # missing or unreachable: InputError from open_input
                raw = stack.enter_context(open_input(location, block_size=H5_BLOCK_SIZE))
                fh = h5py.File(raw, "r")
            else:
                fh = h5py.File(path, "r")
        except FileNotFoundError as err:
            msg = f"{path}: no such file."
            raise InputError(msg) from err
        except OSError as err:
            detail = redact(str(err), location.options, keep=path)
            msg = (
                f"{path}: cannot be opened as HDF5 ({detail}). The file is truncated, corrupt "
                "or not HDF5: re-download or re-export it."
            )
            raise InputError(msg) from cause(err, location)
        stack.enter_context(fh)
        # anything HDF5 fails to read while the file is in use names the file (a damaged file)
        stack.enter_context(input_errors(location, "the file", H5_ERRORS))
        yield fh


def sniff_h5(fh: h5py.File) -> str:
    """The format of an open HDF5 file from its layout: ``"h5ad"``, ``"loom"`` or ``"10x-h5"``."""
    if fh.attrs.get("encoding-type") == "anndata" or ("X" in fh and "obs" in fh):
        return "h5ad"
    if "matrix" in fh and hasattr(fh["matrix"], "shape"):  # a dataset: loom's layout
        return "loom"
    return "10x-h5"


def h5_strings(group: Any, name: str) -> np.ndarray | None:
    """The text dataset ``name`` of ``group`` as ``str`` objects, or None when absent."""
    return as_str_array(group[name][:]) if name in group else None
