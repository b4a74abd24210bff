"""Input readers: one per format, each giving a :class:`Source` that yields blocks of cells.

Every reader reads metadata only when opened (shape, gene IDs and symbols, barcodes, the cell
columns to carry) and reads counts block by block in :meth:`Source.iter_blocks`, so memory
does not grow with the input. Where a format forces more (CSC AnnData matrices, Matrix Market
files not sorted by cell) the reader transposes through temporary files and says so in
``source.info.notes``.

Every format can also be read from an fsspec URL (``s3://bucket/x.h5ad``, ``gs://...``,
``https://...``, ``memory://...``, ``file:///abs/path``) with ``storage_options``: HDF5 files
(h5ad, 10x h5, loom) are read range by range through a file object, AnnData Zarr chunk by
chunk, and 10x MEX files streamed (the one format read whole, which its notes say).

Examples
--------
>>> import os, tempfile, numpy as np, scipy.sparse as sp, scipy.io
>>> from flow.ingest import open_source
>>> with tempfile.TemporaryDirectory() as tmp:
...     scipy.io.mmwrite(os.path.join(tmp, "matrix.mtx"), sp.coo_matrix(np.eye(3, 2, dtype=int)))
...     _ = open(os.path.join(tmp, "genes.tsv"), "w").write("ENSG1\\tA\\nENSG2\\tB\\nENSG3\\tC\\n")
...     _ = open(os.path.join(tmp, "barcodes.tsv"), "w").write("c1\\nc2\\n")
...     src = open_source(tmp)
...     blocks = [b.toarray().tolist() for b in src.iter_blocks(1)]
>>> src.info.format, src.info.n_cells, src.info.n_genes
('10x-mtx', 2, 3)
>>> blocks
[[[1, 0, 0]], [[0, 1, 0]]]
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ._fs import basename, exists, is_url, isdir, listdir
from ._source import Source, SourceInfo

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["FORMATS", "Source", "SourceInfo", "detect_format", "open_source"]

#: Input format names accepted by :func:`open_source` (``format=``).
FORMATS = ("h5ad", "10x-h5", "10x-mtx", "loom", "anndata-zarr")

_DESCRIPTIONS = (
    "h5ad (.h5ad)",
    "10x-h5 (Cell Ranger .h5)",
    "10x-mtx (directory with matrix.mtx[.gz])",
    "loom (.loom)",
    "anndata-zarr (.zarr directory)",
)


#: Names of files (not directories) flow reads.
_FILE_SUFFIXES = (".h5ad", ".loom", ".mtx", ".mtx.gz", ".h5", ".hdf5")


def _unknown(path: str, why: str) -> InputError:
    return InputError(
        f"{path}: {why}. Supported formats: {'; '.join(_DESCRIPTIONS)}. Name the file with its "
        "format's extension or pass format= (--format) with one of: " + ", ".join(FORMATS) + "."
    )


def _sniff_h5(path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """``"h5ad"`` or ``"10x-h5"`` for an HDF5 file named ``.h5``/``.hdf5``, from its contents."""
    from .h5ad import open_h5

    with open_h5(path, storage_options) as fh:
        if fh.attrs.get("encoding-type") == "anndata" or ("X" in fh and "obs" in fh):
            return "h5ad"
        if "matrix" in fh and hasattr(fh["matrix"], "shape"):  # a dataset: loom's layout
            return "loom"
    return "10x-h5"


def _missing(path: str) -> InputError:
    if is_url(path):
        return InputError(f"{path}: not found (no such file, directory or object).")
    return InputError(f"{path}: no such file or directory.")


def detect_format(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> str:
    """The format of an input, from its name (and, for ``.h5``, its contents).

    ``path`` may be an fsspec URL, looked at with ``storage_options`` (a directory is listed;
    an ``.h5`` file's first HDF5 metadata is read).

    Raises
    ------
    InputError
        The path does not exist, or its format is not one flow reads (the message lists them).
    """
    text = os.fspath(path)
    options = dict(storage_options or {}) if is_url(text) else None
    if not exists(text, options):
        raise _missing(text)
    name = basename(text).lower()
    # a URL named like a file or a Zarr store is not listed (https "lists" a URL by GET)
    named = is_url(text) and name.endswith((*_FILE_SUFFIXES, ".zarr"))
    if name.endswith(".zarr") and named:
        return "anndata-zarr"
    if not named and isdir(text, options):
        entries = set(listdir(text, options))
        if entries & {"matrix.mtx", "matrix.mtx.gz"}:
            return "10x-mtx"
        if name.endswith(".zarr") or entries & {"zarr.json", ".zgroup"}:
            return "anndata-zarr"
        why = "is a directory with neither matrix.mtx[.gz] (10x) nor Zarr metadata"
        raise _unknown(text, why)
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".loom"):
        return "loom"
    if name.endswith((".mtx", ".mtx.gz")):
        return "10x-mtx"
    if name.endswith((".h5", ".hdf5")):
        return _sniff_h5(text, options)
    raise _unknown(text, "has an extension flow does not know")


def open_source(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_id_column: str | None = None,
    obs_columns: Sequence[str] | None = None,
    genome: str | None = None,
    read_size: int | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Source:
    """Open an input count matrix as a :class:`Source`; reads its metadata only.

    The counts are read later, one block of cells at a time, by ``source.iter_blocks(n)``
    (as :func:`flow.write_counts` does), so nothing here grows with the number of cells
    except the per-cell metadata (barcodes and carried columns).

    Parameters
    ----------
    path
        An ``.h5ad`` file, a Cell Ranger ``.h5`` file, a 10x MEX directory (or its
        ``matrix.mtx[.gz]``), a ``.loom`` file or an AnnData ``.zarr`` directory: a local
        path or an fsspec URL (``s3://``, ``gs://``, ``https://``, ``file://``, ...).
    format
        One of :data:`FORMATS`; detected from ``path`` when not given.
    layer
        AnnData/loom: read this layer instead of ``X`` (the main matrix).
    use_raw
        AnnData: read ``raw.X`` (with ``raw.var`` genes) instead of ``X``.
    gene_id_column
        AnnData: ``var`` column with gene IDs (default: ``ensembl_id`` if present, else
        ``var_names``). Loom: row attribute (default ``ensembl_id``).
    obs_columns
        AnnData/loom: cell columns to carry (default: all 1-D columns of numbers, booleans,
        strings or categoricals). ``filter_pass`` and ``n_counts`` are always carried when
        present.
    genome
        10x HDF5: the genome to read (Cell Ranger 2 files with several genomes need it).
    read_size
        How much one read takes: cells for row-wise layouts (CSR, dense, loom; default: the
        block size, or 64 MB of dense values), entries for CSC (default 1,048,576) and
        Matrix Market (default 262,144). Results do not depend on it.
    temp_dir
        Where CSC and unsorted Matrix Market inputs are transposed (default: the system's
        temporary directory, also for URL inputs). The source's ``info.notes`` say when this
        happens.
    storage_options
        fsspec options for a URL ``path`` (credentials, ``client_kwargs={"endpoint_url":
        ...}``, ...); ignored for local paths. They never appear in messages.

    Returns
    -------
    Source
        ``source.info`` (:class:`SourceInfo`) and ``source.iter_blocks(n_cells)``.

    Raises
    ------
    InputError
        Unknown format (the message lists the supported ones), a file that cannot be read,
        options that do not apply to the format, missing gene IDs, wrong layer name, barcodes
        not matching the matrix, or an empty matrix; for a URL also one that is not found,
        refused or unreachable with the given options. The message names the file.
    """
    text = os.fspath(path)
    options = dict(storage_options or {}) if is_url(text) else None
    if format is None:
        fmt = detect_format(text, storage_options=options)
    elif format in FORMATS:
        fmt = format
        if not exists(text, options):
            raise _missing(text)
    else:
        raise _unknown(text, f"format={format!r} is not a format flow reads")
    if isinstance(obs_columns, str):
        obs_columns = [obs_columns]
    if read_size is not None and read_size < 1:
        msg = f"read_size must be a positive number; got {read_size}."
        raise ValueError(msg)
    _check_options(
        text,
        fmt,
        layer=layer,
        use_raw=use_raw,
        gene_id_column=gene_id_column,
        obs_columns=obs_columns,
        genome=genome,
    )
    if fmt in ("h5ad", "anndata-zarr"):
        from .anndata_zarr import open_anndata_zarr
        from .h5ad import open_h5ad

        opener = open_h5ad if fmt == "h5ad" else open_anndata_zarr
        return opener(
            text,
            layer=layer,
            use_raw=use_raw,
            gene_id_column=gene_id_column,
            obs_columns=obs_columns,
            read_size=read_size,
            temp_dir=temp_dir,
            storage_options=options,
        )
    if fmt == "loom":
        from .loom import open_loom

        return open_loom(
            text,
            layer=layer,
            gene_id_column=gene_id_column,
            obs_columns=obs_columns,
            read_size=read_size,
            storage_options=options,
        )
    if fmt == "10x-h5":
        from .tenx import open_10x_h5

        return open_10x_h5(text, genome=genome, read_size=read_size, storage_options=options)
    from .tenx import open_10x_mtx

    return open_10x_mtx(text, read_size=read_size, temp_dir=temp_dir, storage_options=options)


def _check_options(
    path: str,
    fmt: str,
    *,
    layer: str | None,
    use_raw: bool,
    gene_id_column: str | None,
    obs_columns: Sequence[str] | None,
    genome: str | None,
) -> None:
    """Refuse options that do not apply to the input's format (rather than ignoring them)."""
    anndata, loom = ("h5ad", "anndata-zarr"), ("loom",)
    applies = {
        "layer": (layer is not None, anndata + loom),
        "use_raw": (use_raw, anndata),
        "gene_id_column": (gene_id_column is not None, anndata + loom),
        "obs_columns": (obs_columns is not None, anndata + loom),
        "genome": (genome is not None, ("10x-h5",)),
    }
    for option, (given, formats) in applies.items():
        if given and fmt not in formats:
            msg = (
                f"{path}: {option}= applies to {', '.join(formats)} inputs, and this input is "
                f"{fmt}. Drop {option}."
            )
            raise InputError(msg)
