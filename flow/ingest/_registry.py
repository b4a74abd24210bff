"""Which reader reads which format: the registry, format detection and :func:`open_source`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from .._location import Location
from ..errors import InputError
from ._anndata import ANNDATA_OPTIONS
from ._fs import exists, isdir, listdir
from ._hdf5 import open_h5, sniff_h5
from ._options import FORMAT_OPTIONS, ReadOptions
from .anndata_zarr import read_anndata_zarr
from .h5ad import h5ad_from_file, read_h5ad
from .loom import LOOM_OPTIONS, loom_from_file, read_loom
from .mtx import read_10x_mtx
from .soma import SOMA_OPTIONS, is_soma_experiment, read_soma
from .tenx import TENX_H5_OPTIONS, read_10x_h5, tenx_h5_from_file

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    import h5py

    from ._source import Source

__all__ = [
    "FORMATS",
    "READERS",
    "Reader",
    "detect_format",
    "open_source",
    "register_reader",
]


class Reader(Protocol):
    """Opens one input of a format as a :class:`~flow.ingest.Source`, reading metadata only."""

    def __call__(self, location: Location, options: ReadOptions, /) -> Source: ...


#: format -> its reader; :func:`open_source` looks formats up here.
READERS: dict[str, Reader] = {}
#: format -> the format-specific options (:data:`~flow.ingest._options.FORMAT_OPTIONS`) it takes.
_ACCEPTS: dict[str, tuple[str, ...]] = {}
#: format -> how a user recognises it (listed when a format is unknown).
_DESCRIPTIONS: dict[str, str] = {}


def register_reader(
    format: str,
    reader: Reader,
    *,
    accepts: Iterable[str] = (),
    description: str | None = None,
) -> None:
    """Read inputs of ``format`` with ``reader`` (replacing any reader of that format).

    Parameters
    ----------
    format
        The name given as ``ReadOptions(format=...)`` (``--format``).
    reader
        ``reader(location, options) -> Source``: reads metadata only; counts are read by the
        source's ``iter_blocks``.
    accepts
        The format-specific options the reader takes (of ``layer``, ``use_raw``,
        ``gene_id_column``, ``obs_columns``, ``genome``); any other one given is refused by
        :func:`open_source` rather than ignored. ``read_size`` and ``temp_dir`` are the
        reader's to use or not.
    description
        How to recognise the format, listed when an input's format is unknown.
    """
    unknown = sorted(set(accepts) - set(FORMAT_OPTIONS))
    if unknown:
        msg = f"accepts names no format option: {', '.join(unknown)} (options: {', '.join(FORMAT_OPTIONS)})."
        raise ValueError(msg)
    READERS[format] = reader
    _ACCEPTS[format] = tuple(accepts)
    _DESCRIPTIONS[format] = description or format


register_reader("h5ad", read_h5ad, accepts=ANNDATA_OPTIONS, description="h5ad (.h5ad)")
register_reader(
    "10x-h5", read_10x_h5, accepts=TENX_H5_OPTIONS, description="10x-h5 (Cell Ranger .h5)"
)
register_reader("10x-mtx", read_10x_mtx, description="10x-mtx (directory with matrix.mtx[.gz])")
register_reader("loom", read_loom, accepts=LOOM_OPTIONS, description="loom (.loom)")
register_reader(
    "anndata-zarr",
    read_anndata_zarr,
    accepts=ANNDATA_OPTIONS,
    description="anndata-zarr (.zarr directory)",
)
register_reader(
    "soma", read_soma, accepts=SOMA_OPTIONS, description="soma (TileDB-SOMA experiment directory)"
)

#: The formats flow reads itself (``format=`` / ``--format``); see also :data:`READERS`.
FORMATS = tuple(READERS)

#: Built-in HDF5 readers that take the file already open (a sniffed ``.h5`` is opened once).
_FROM_H5: dict[str, tuple[Reader, Callable[[h5py.File, Location, ReadOptions], Source]]] = {
    "h5ad": (read_h5ad, h5ad_from_file),
    "10x-h5": (read_10x_h5, tenx_h5_from_file),
    "loom": (read_loom, loom_from_file),
}

#: Names of files (not directories) flow reads.
_FILE_SUFFIXES = (".h5ad", ".loom", ".mtx", ".mtx.gz", ".h5", ".hdf5")
_SNIFFED = (".h5", ".hdf5")


def _unknown(path: str, why: str) -> InputError:
    return InputError(
        f"{path}: {why}. Supported formats: {'; '.join(_DESCRIPTIONS.values())}. Name the file "
        "with its format's extension or pass format= (--format) with one of: "
        + ", ".join(READERS)
        + "."
    )


def _missing(location: Location) -> InputError:
    if location.is_url:
        return InputError(f"{location.path}: not found (no such file, directory or object).")
    return InputError(f"{location.path}: no such file or directory.")


def _format_by_name(location: Location) -> str | None:
    """The format told by the name (and, for a directory, its entries); None for an HDF5
    file named ``.h5``/``.hdf5``, whose contents tell."""
    text, name = location.path, location.name.lower()
    # a URL named like a file or a Zarr store is not listed (https "lists" a URL by GET)
    named = location.is_url and name.endswith((*_FILE_SUFFIXES, ".zarr"))
    if name.endswith(".zarr") and named:
        return "anndata-zarr"
    if not named and isdir(location):
        entries = set(listdir(location))
        if entries & {"matrix.mtx", "matrix.mtx.gz"}:
            return "10x-mtx"
        if is_soma_experiment(entries):
            return "soma"
        if name.endswith(".zarr") or entries & {"zarr.json", ".zgroup"}:
            return "anndata-zarr"
        why = (
            "is a directory with neither matrix.mtx[.gz] (10x), Zarr metadata nor a SOMA experiment"
        )
        raise _unknown(text, why)
    for suffixes, fmt in (
        ((".h5ad",), "h5ad"),
        ((".loom",), "loom"),
        ((".mtx", ".mtx.gz"), "10x-mtx"),
    ):
        if name.endswith(suffixes):
            return fmt
    if name.endswith(_SNIFFED):
        return None
    raise _unknown(text, "has an extension flow does not know")


def detect_format(
    where: Location | str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> str:
    """The format of an input, from its name (and, for ``.h5``, its contents).

    ``where`` may be an fsspec URL, looked at with ``storage_options`` (used only when
    ``where`` is not already a :class:`~flow._location.Location`): a directory is listed; an
    ``.h5`` file's first HDF5 metadata is read.

    Raises
    ------
    InputError
        The path does not exist, or its format is not one flow reads (the message lists them).
    """
    location = Location.of(where, storage_options)
    if not exists(location):
        raise _missing(location)
    fmt = _format_by_name(location)
    if fmt is None:
        with open_h5(location) as fh:
            return sniff_h5(fh)
    return fmt


def _refuse_options(location: Location, fmt: str, options: ReadOptions) -> None:
    """Refuse options that do not apply to the input's format (rather than ignoring them)."""
    for option in options.given():
        if option not in _ACCEPTS[fmt]:
            formats = [f for f, accepted in _ACCEPTS.items() if option in accepted]
            msg = (
                f"{location.path}: {option}= applies to {', '.join(formats)} inputs, and this "
                f"input is {fmt}. Drop {option}."
            )
            raise InputError(msg)


def _open_sniffed(location: Location, options: ReadOptions) -> Source:
    """An HDF5 file named ``.h5``/``.hdf5``: told apart and read in one open."""
    with open_h5(location) as fh:
        fmt = sniff_h5(fh)
        _refuse_options(location, fmt, options)
        reader, from_file = _FROM_H5[fmt]
        if READERS[fmt] is reader:
            return from_file(fh, location, options)
    return READERS[fmt](location, options)  # a reader registered in place of flow's


def open_source(
    where: Location | str | os.PathLike[str],
    options: ReadOptions | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Source:
    """Open an input count matrix as a :class:`~flow.ingest.Source`; reads its metadata only.

    The counts are read later, one block of cells at a time, by ``source.iter_blocks(n)``
    (as :func:`flow.store.write_counts` does), so nothing here grows with the number of cells
    except the per-cell metadata (barcodes and carried columns). An HDF5 input (h5ad, 10x h5,
    loom) is opened once here, for all its metadata, and once per pass over its counts.

    Parameters
    ----------
    where
        An ``.h5ad`` file, a Cell Ranger ``.h5`` file, a 10x MEX directory (or its
        ``matrix.mtx[.gz]``), a ``.loom`` file or an AnnData ``.zarr`` directory: a local
        path or an fsspec URL (``s3://``, ``gs://``, ``https://``, ``file://``, ...), or a
        :class:`~flow._location.Location` of one.
    options
        How to read it (:class:`~flow.ingest.ReadOptions`; the defaults read the main matrix
        of any format, detected from ``where``). Options that do not apply to the format are
        refused.
    storage_options
        fsspec options for a URL (credentials, ``client_kwargs={"endpoint_url": ...}``, ...),
        used only when ``where`` is not already a Location; ignored for local paths. They
        never appear in messages.

    Returns
    -------
    Source
        ``source.info`` (:class:`~flow.ingest.SourceInfo`), ``source.iter_blocks(n_cells)``,
        and ``source.read_rows(start, stop)`` where ``source.supports_ranges``.

    Raises
    ------
    InputError
        Unknown format (the message lists the supported ones), a file that cannot be read,
        options that do not apply to the format, missing gene IDs, wrong layer name, barcodes
        not matching the matrix, or an empty matrix; for a URL also one that is not found,
        refused or unreachable with the given options. The message names the file.
    """
    location = Location.of(where, storage_options)
    options = ReadOptions() if options is None else options
    fmt = options.format
    if fmt is not None and fmt not in READERS:
        raise _unknown(location.path, f"format={fmt!r} is not a format flow reads")
    if not exists(location):
        raise _missing(location)
    if fmt is None:
        fmt = _format_by_name(location)
        if fmt is None:
            return _open_sniffed(location, options)
    _refuse_options(location, fmt, options)
    return READERS[fmt](location, options)
