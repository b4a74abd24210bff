"""10x Genomics inputs: Cell Ranger HDF5 (v3 ``/matrix`` and v2 per-genome) and MEX directories.

**HDF5.** Cell Ranger stores genes x cells CSC, which is cells x genes CSR: opening reads the
shape, barcodes and features; each block reads ``indptr`` of its cells and the matching ranges
of ``data`` and ``indices``. Files with several feature types (antibody capture, CRISPR guides)
keep only ``Gene Expression`` features, and say so in the source's notes.

**MEX (Matrix Market) directories.** ``matrix.mtx[.gz]`` is genes x cells, one ``gene cell
value`` line per nonzero (1-based), with ``features.tsv[.gz]`` (Cell Ranger 3+) or
``genes.tsv[.gz]`` (Cell Ranger 2) and ``barcodes.tsv[.gz]`` beside it. Opening reads the
header, features and barcodes. The first pass over the blocks starts with one parse of the
whole file (fast and multi-threaded, keeping one chunk of parsed lines at a time) that checks
every line, counts the entries against the header (a truncated file is refused before any block is
yielded) and learns whether entries are sorted by cell, as Cell Ranger writes them:

- sorted: blocks are streamed in file order, holding one parsed piece plus one block;
- not sorted: the entries are transposed through temporary files
  (:func:`flow.ingest._transpose.bucket_transpose`), which the source's notes say.

Lines are parsed with pyarrow's streaming CSV reader (single-space separated, as every writer
we know produces); files that need general whitespace splitting fall back to pandas.
"""

from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._io import content_hasher
from ..errors import InputError
from ._fs import (
    basename,
    fingerprint,
    is_url,
    isdir,
    isfile,
    join,
    listdir,
    open_input,
    redact,
    split,
)
from ._source import SourceInfo
from ._transpose import (
    bucket_transpose,
    csr_row_pieces,
    filter_columns,
    rebatch,
    transpose_disk_bytes,
)
from .h5ad import as_str_array, check_ids, guard_reads, input_errors, open_h5, read_ids

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    import h5py

__all__ = ["GENE_EXPRESSION", "TenxH5Source", "TenxMtxSource", "open_10x_h5", "open_10x_mtx"]

#: The feature type kept when a file has several.
GENE_EXPRESSION = "Gene Expression"
_MTX_NAMES = ("matrix.mtx.gz", "matrix.mtx")
_FEATURE_NAMES = ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
_BARCODE_NAMES = ("barcodes.tsv.gz", "barcodes.tsv")
_ARROW_BLOCK_BYTES = 1 << 20
#: Read-ahead when a Matrix Market file or TSV is streamed from a URL.
_STREAM_BLOCK_SIZE = 8 << 20
#: Entries per parsed piece of a Matrix Market file (about 4 MB per column).
_MTX_ENTRIES_PER_READ = 1 << 18


def _feature_filter(
    ids: np.ndarray,
    types: np.ndarray | None,
    genomes: np.ndarray | None,
    genome: str | None,
    path: str,
    notes: list[str],
) -> np.ndarray | None:
    """Column map (old -> new index, -1 = dropped) keeping Gene Expression (and ``genome``)."""
    keep = np.ones(len(ids), dtype=bool)
    if types is not None:
        kinds, counts = np.unique(types.astype(str), return_counts=True)
        if len(kinds) > 1 and GENE_EXPRESSION in kinds:
            keep &= types == GENE_EXPRESSION
            dropped = ", ".join(
                f"{k} x{c}"
                for k, c in zip(kinds.tolist(), counts.tolist(), strict=True)
                if k != GENE_EXPRESSION
            )
            notes.append(
                f"kept the {int(keep.sum())} '{GENE_EXPRESSION}' features of {len(ids)}; "
                f"dropped {dropped}."
            )
    if genome is None and genomes is not None and len(set(genomes.tolist())) > 1:
        notes.append(
            f"features of several genomes kept ({', '.join(sorted(set(genomes.tolist())))}); "
            "pass genome= to keep one."
        )
    if genome is not None:
        if genomes is None:
            msg = f"{path}: has no per-feature genome, so genome={genome!r} cannot be applied."
            raise InputError(msg)
        found = sorted(set(genomes.tolist()))
        if genome not in found:
            msg = f"{path}: has no genome {genome!r}; its genomes: {', '.join(found)}."
            raise InputError(msg)
        keep &= genomes == genome
        notes.append(f"kept the {int(keep.sum())} features of genome {genome!r}.")
    if keep.all():
        return None
    col_map = np.full(len(ids), -1, dtype=np.int64)
    col_map[keep] = np.arange(int(keep.sum()))
    return col_map


# --------------------------------------------------------------------------- 10x HDF5


def _h5_strings(group: h5py.Group, name: str) -> np.ndarray | None:
    return as_str_array(group[name][:]) if name in group else None


def _h5_genome_groups(fh: h5py.File) -> list[str]:
    return sorted(k for k, v in fh.items() if hasattr(v, "keys") and "indptr" in v and "genes" in v)


class TenxH5Source:
    """A Cell Ranger HDF5 matrix read block by block (see :func:`open_10x_h5`)."""

    def __init__(
        self,
        path: str,
        *,
        genome: str | None = None,
        read_size: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._read_size = read_size
        self._storage_options = storage_options
        notes: list[str] = []
        fix = "The file is not a complete Cell Ranger HDF5 matrix: re-download or re-export it."
        with (
            input_errors(
                path, "the metadata", (OSError, KeyError), storage_options=storage_options
            ),
            open_h5(path, storage_options) as fh,
        ):
            if "matrix" in fh and "features" in fh["matrix"]:
                self._group = "matrix"
                features = fh["matrix/features"]
                if "id" not in features:
                    msg = f"{path}: has no gene IDs (matrix/features/id). {fix}"
                    raise InputError(msg)
                ids = as_str_array(features["id"][:])
                symbols = _h5_strings(features, "name")
                types = _h5_strings(features, "feature_type")
                genomes = _h5_strings(features, "genome")
            else:
                groups = _h5_genome_groups(fh)
                if not groups:
                    msg = (
                        f"{path}: is HDF5 but not a Cell Ranger matrix (no /matrix group with "
                        "features, and no /<genome> group with indptr and genes). If it is an "
                        "AnnData file, name it .h5ad or pass format='h5ad'."
                    )
                    raise InputError(msg)
                if genome is None and len(groups) > 1:
                    msg = (
                        f"{path}: holds several genomes ({', '.join(groups)}). Pass genome= "
                        "(--genome) naming one of them."
                    )
                    raise InputError(msg)
                if genome is not None and genome not in groups:
                    msg = f"{path}: has no genome {genome!r}; its genomes: {', '.join(groups)}."
                    raise InputError(msg)
                self._group = genome or groups[0]
                ids = as_str_array(fh[self._group]["genes"][:])
                symbols = _h5_strings(fh[self._group], "gene_names")
                types, genomes, genome = None, None, None
            group = fh[self._group]
            missing = [
                k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in group
            ]
            if missing:
                msg = f"{path}: /{self._group} lacks {', '.join(missing)}. {fix}"
                raise InputError(msg)
            n_all_genes, n_cells = (int(s) for s in group["shape"][:])
            barcodes = read_ids(group["barcodes"])
        check_ids(ids, n=n_all_genes, path=path, what="gene IDs", fix=fix)
        check_ids(barcodes, n=n_cells, path=path, what="barcodes", fix=fix)
        if n_cells == 0 or n_all_genes == 0:
            msg = f"{path}: the matrix is empty ({n_cells} cells x {n_all_genes} genes)."
            raise InputError(msg)
        self._n_all_genes = n_all_genes
        self._col_map = _feature_filter(ids, types, genomes, genome, path, notes)
        if self._col_map is not None:
            kept = self._col_map >= 0
            ids = ids[kept]
            symbols = symbols[kept] if symbols is not None else None
        self.info = SourceInfo(
            path=path,
            format="10x-h5",
            n_cells=n_cells,
            n_genes=len(ids),
            gene_ids=ids,
            gene_symbols=symbols,
            barcodes=barcodes,
            obs=pd.DataFrame(index=pd.RangeIndex(n_cells)),
            fingerprint=fingerprint(path, storage_options),
            notes=notes,
        )

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells, reading only those cells.

        Counts are returned as stored; only columns of dropped feature types are removed.
        """
        if n_cells < 1:
            msg = f"n_cells must be >= 1; got {n_cells}."
            raise ValueError(msg)
        return guard_reads(
            self.info.path, self._blocks(n_cells), storage_options=self._storage_options
        )

    def _blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        info = self.info
        with open_h5(info.path, self._storage_options) as fh:
            group = fh[self._group]
            pieces: Iterable[sp.csr_matrix] = csr_row_pieces(
                group["data"],
                group["indices"],
                group["indptr"],
                n_rows=info.n_cells,
                n_cols=self._n_all_genes,
                rows_per_read=self._read_size or n_cells,
                path=info.path,
                what=self._group,
            )
            col_map = self._col_map
            if col_map is not None:
                pieces = (filter_columns(p, col_map, info.n_genes) for p in pieces)
            yield from rebatch(pieces, n_cells)


def open_10x_h5(
    path: str | os.PathLike[str],
    *,
    genome: str | None = None,
    read_size: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> TenxH5Source:
    """Open a Cell Ranger HDF5 matrix (``filtered_feature_bc_matrix.h5``); reads metadata only.

    Parameters
    ----------
    path
        The ``.h5`` file.
    genome
        Cell Ranger 2 files: the genome group to read (needed when there are several).
        Cell Ranger 3+ files: keep only this genome's features (multi-species references).
    read_size
        Cells per read (default: the block size).
    storage_options
        fsspec options when ``path`` is a URL (``s3://...``); ignored for local paths. A URL
        is read range by range (metadata, then each block's rows), never downloaded whole.

    Raises
    ------
    InputError
        Not HDF5 or truncated, not a Cell Ranger layout, several genomes and none chosen, no
        gene IDs, barcodes not matching the matrix, or an empty matrix.
    """
    text = os.fspath(path)
    return TenxH5Source(
        text,
        genome=genome,
        read_size=read_size,
        storage_options=dict(storage_options or {}) if is_url(text) else None,
    )


# --------------------------------------------------------------------------- 10x MEX


@dataclass(frozen=True)
class _MtxHeader:
    field: str  # "integer", "real" or "pattern"
    n_genes: int
    n_cells: int
    nnz: int
    header_lines: int


@dataclass(frozen=True)
class _Scan:
    engine: str  # "arrow" or "pandas"
    sorted: bool


class _NeedsWhitespaceParser(Exception):
    """Internal: the lines are not single-space separated; parse with pandas instead."""


def _read_mtx_header(path: str, storage_options: Mapping[str, Any] | None) -> _MtxHeader:
    fix = "Pass a Matrix Market coordinate file as written by Cell Ranger or scipy.io.mmwrite."
    try:
        with open_input(
            path, storage_options, block_size=1 << 16, gunzip=path.endswith(".gz")
        ) as fh:
            banner = fh.readline().decode("ascii", errors="replace").strip().split()
            lines = 1
            while True:
                line = fh.readline()
                lines += 1
                if not line:
                    msg = f"{path}: ends before the Matrix Market size line. {fix}"
                    raise InputError(msg)
                if line.startswith(b"%") or not line.strip():
                    continue
                size = line.split()
                break
    except (OSError, EOFError) as err:
        raise _unreadable(path, err, storage_options) from (None if storage_options else err)
    words = [w.lower() for w in banner]
    if len(words) < 5 or words[0] != "%%matrixmarket" or words[1] != "matrix":
        msg = f"{path}: does not start with a '%%MatrixMarket matrix ...' line. {fix}"
        raise InputError(msg)
    if (
        words[2] != "coordinate"
        or words[3] not in ("integer", "real", "double", "pattern")
        or words[4] != "general"
    ):
        msg = (
            f"{path}: is a Matrix Market '{' '.join(words[2:5])}' matrix; flow reads "
            f"'coordinate integer|real|pattern general' count matrices. {fix}"
        )
        raise InputError(msg)
    try:
        n_genes, n_cells, nnz = (int(s) for s in size[:3])
        if len(size) != 3:
            raise ValueError
    except ValueError as err:
        msg = f"{path}: the size line {line!r} is not 'genes cells entries'. {fix}"
        raise InputError(msg) from err
    field = "real" if words[3] == "double" else words[3]
    return _MtxHeader(field, n_genes, n_cells, nnz, lines)


def _unreadable(
    path: str, err: BaseException, storage_options: Mapping[str, Any] | None
) -> InputError:
    detail = redact(f"{type(err).__name__}: {err}", storage_options, keep=path)
    return InputError(f"{path}: cannot be read ({detail}). The file is truncated or corrupt.")


@contextlib.contextmanager
def _readable(path: str, storage_options: Mapping[str, Any] | None) -> Iterator[Any]:
    """What pandas and pyarrow read from: a local path as it is, a URL as an open file."""
    if not is_url(path):
        yield path
        return
    with open_input(path, storage_options, block_size=_STREAM_BLOCK_SIZE) as fh:
        yield fh


def _read_tsv(path: str, storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
    try:
        with _readable(path, storage_options) as source:
            remote = {"compression": "gzip" if path.endswith(".gz") else None}
            return pd.read_csv(
                source,
                sep="\t",
                header=None,
                dtype=str,
                quoting=csv.QUOTE_NONE,
                na_filter=False,
                keep_default_na=False,
                **(remote if is_url(path) else {}),  # local paths: compression from the name
            )
    except pd.errors.EmptyDataError:
        return pd.DataFrame({0: pd.Series([], dtype=object)})
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise _unreadable(path, err, storage_options) from (None if storage_options else err)


def _find(
    folder: str,
    prefix: str,
    names: tuple[str, ...],
    what: str,
    matrix: str,
    storage_options: Mapping[str, Any] | None,
) -> str:
    files = None
    if is_url(folder):
        try:
            files = {n for n, is_file in listdir(folder, storage_options).items() if is_file}
        except InputError:  # not listable (https without directory listings): ask by name
            files = None
    for name in names:
        candidate = join(folder, prefix + name)
        if files is not None:
            found = prefix + name in files
        else:
            found = isfile(candidate, storage_options)  # (os.path.isfile for local paths)
        if found:
            return candidate
    msg = (
        f"{matrix}: no {what} beside it (looked for {', '.join(prefix + n for n in names)} in "
        f"{folder}). A 10x matrix directory needs matrix.mtx, features.tsv (or genes.tsv) and "
        "barcodes.tsv, optionally gzipped."
    )
    raise InputError(msg)


def _resize(chunks: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Re-cut parsed chunks into pieces of exactly ``size`` entries (the last may be shorter)."""
    pending: list[dict[str, np.ndarray]] = []
    n_pending = 0
    for chunk in chunks:
        n = len(next(iter(chunk.values())))
        if not pending and n == size:
            yield chunk
            continue
        pending.append(chunk)
        n_pending += n
        if n_pending < size:
            continue
        merged = {k: np.concatenate([p[k] for p in pending]) for k in chunk}
        start = 0
        while n_pending - start >= size:
            yield {k: v[start : start + size] for k, v in merged.items()}
            start += size
        rest = {k: v[start:] for k, v in merged.items()}
        pending, n_pending = ([rest] if n_pending > start else []), n_pending - start
    if pending:
        yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}


class TenxMtxSource:
    """A 10x MEX directory (``matrix.mtx[.gz]``, genes x cells) read block by block.

    See :func:`open_10x_mtx` and the module notes on sorted and unsorted files.
    """

    def __init__(
        self,
        path: str,
        *,
        read_size: int | None = None,
        temp_dir: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._read_size = read_size or _MTX_ENTRIES_PER_READ
        self._temp_dir = temp_dir
        self._storage_options = so = storage_options
        self._scan: _Scan | None = None
        named_file = is_url(path) and basename(path).endswith((".mtx", ".mtx.gz"))
        if not named_file and isdir(path, so):  # (https "lists" a URL by GET: not a file's)
            folder, prefix = path, ""
            self._matrix = _find(folder, "", _MTX_NAMES, "matrix.mtx", path, so)
        else:
            folder, name = split(path)
            stem = name.removesuffix(".gz").removesuffix(".mtx")
            prefix = stem.removesuffix("matrix") if stem.endswith("matrix") else ""
            self._matrix = path
        header = _read_mtx_header(self._matrix, so)
        self._header = header
        features_path = _find(folder, prefix, _FEATURE_NAMES, "features.tsv/genes.tsv", path, so)
        barcodes_path = _find(folder, prefix, _BARCODE_NAMES, "barcodes.tsv", path, so)
        features = _read_tsv(features_path, so)
        barcodes = as_str_array(_read_tsv(barcodes_path, so)[0].to_numpy())
        barcodes = barcodes.astype(np.dtypes.StringDType())  # compact (see read_ids)
        ids = as_str_array(features[0].to_numpy())
        fix = "The matrix and its features/barcodes files do not belong together: re-export them."
        check_ids(ids, n=header.n_genes, path=features_path, what="gene IDs", fix=fix)
        check_ids(barcodes, n=header.n_cells, path=barcodes_path, what="barcodes", fix=fix)
        if header.n_cells == 0 or header.n_genes == 0:
            msg = f"{self._matrix}: the matrix is empty ({header.n_cells} cells x {header.n_genes} genes)."
            raise InputError(msg)
        symbols = as_str_array(features[1].to_numpy()) if features.shape[1] > 1 else None
        types = as_str_array(features[2].to_numpy()) if features.shape[1] > 2 else None
        notes: list[str] = []
        self._col_map = _feature_filter(ids, types, None, None, path, notes)
        if self._col_map is not None:
            kept = self._col_map >= 0
            ids = ids[kept]
            symbols = symbols[kept] if symbols is not None else None
        if is_url(self._matrix):  # no index into Matrix Market text: it is read whole
            notes.append(
                f"{basename(self._matrix)} is streamed from its URL twice (a checking pass, "
                "then the blocks); it is not copied to local disk."
            )
        h = content_hasher()
        for part in (self._matrix, features_path, barcodes_path):
            h.update(fingerprint(part, so).encode())
        self.info = SourceInfo(
            path=path,
            format="10x-mtx",
            n_cells=header.n_cells,
            n_genes=len(ids),
            gene_ids=ids,
            gene_symbols=symbols,
            barcodes=barcodes,
            obs=pd.DataFrame(index=pd.RangeIndex(header.n_cells)),
            fingerprint=h.hexdigest(),
            notes=notes,
        )

    @property
    def sorted_by_cell(self) -> bool | None:
        """Whether entries are sorted by cell (None until the first pass has scanned them)."""
        return None if self._scan is None else self._scan.sorted

    # ---------------------------------------------------------------- parsing

    def _names(self) -> list[str]:
        return ["g", "c"] if self._header.field == "pattern" else ["g", "c", "v"]

    def _value_dtype(self) -> np.dtype[Any]:
        field = self._header.field
        return np.dtype(
            np.float64 if field == "real" else np.int64 if field == "integer" else np.int32
        )

    def _chunks(self, engine: str, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Parsed entries, column by name, in file order (1-based indices as in the file)."""
        path = self._matrix
        try:
            if engine == "arrow":
                yield from self._arrow_chunks(columns)
            else:
                yield from self._pandas_chunks(columns)
        except (_NeedsWhitespaceParser, InputError):
            raise
        except (OSError, EOFError) as err:
            so = self._storage_options
            detail = redact(f"{type(err).__name__}: {err}", so, keep=path)
            msg = f"{path}: reading failed ({detail}). The file is truncated or corrupt."
            raise InputError(msg) from (None if so else err)
        except (ValueError, pd.errors.ParserError) as err:
            so = self._storage_options
            msg = (
                f"{path}: malformed entries ({redact(str(err), so, keep=path)}). Each line after "
                f"the header must be 'gene cell value' with {self._header.field} values; the "
                "file is corrupt."
            )
            raise InputError(msg) from (None if so else err)

    def _arrow_chunks(self, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        names = self._names()
        vtype = {"integer": pa.int64(), "real": pa.float64()}.get(self._header.field)
        types = {"g": pa.int64(), "c": pa.int64(), **({"v": vtype} if vtype is not None else {})}
        with (
            _readable(self._matrix, self._storage_options) as source,
            pa.input_stream(
                source, compression="gzip" if self._matrix.endswith(".gz") else None
            ) as stream,
        ):
            try:
                reader = pacsv.open_csv(
                    stream,
                    read_options=pacsv.ReadOptions(
                        skip_rows=self._header.header_lines,
                        column_names=names,
                        block_size=_ARROW_BLOCK_BYTES,
                    ),
                    parse_options=pacsv.ParseOptions(
                        delimiter=" ", quote_char=False, double_quote=False, escape_char=False
                    ),
                    convert_options=pacsv.ConvertOptions(
                        column_types=types,
                        include_columns=columns,
                        null_values=[],
                        strings_can_be_null=False,
                        quoted_strings_can_be_null=False,
                    ),
                )
                for batch in reader:
                    yield {c: batch.column(c).to_numpy() for c in columns}
            except pa.ArrowInvalid as err:  # odd whitespace, or malformed: pandas decides
                raise _NeedsWhitespaceParser(str(err)) from err

    def _pandas_chunks(self, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
        names = self._names()
        vdtype = self._value_dtype() if self._header.field != "pattern" else None
        dtypes = {"g": np.int64, "c": np.int64, **({"v": vdtype} if vdtype is not None else {})}
        remote = {"compression": "gzip" if self._matrix.endswith(".gz") else None}
        with (
            _readable(self._matrix, self._storage_options) as source,
            pd.read_csv(
                source,
                sep=r"\s+",
                header=None,
                names=names,
                usecols=columns,
                dtype=dtypes,
                skiprows=self._header.header_lines,
                chunksize=_ARROW_BLOCK_BYTES // 16,
                **(remote if is_url(self._matrix) else {}),  # local: compression from the name
            ) as reader,
        ):
            for frame in reader:
                yield {c: frame[c].to_numpy() for c in columns}

    def _scan_entries(self) -> _Scan:
        """One pass before any block: the parser that works, sortedness, and the entry count.

        Parses every line (so a malformed or truncated file is refused before anything is
        written), keeping only the cell column of one chunk at a time.
        """
        for engine in ("arrow", "pandas"):
            count, last, is_sorted = 0, -1, True
            try:
                for chunk in self._chunks(engine, self._names()):
                    c = chunk["c"]
                    if c.size:
                        if is_sorted and (int(c[0]) < last or bool((c[1:] < c[:-1]).any())):
                            is_sorted = False
                        last = int(c[-1])
                    count += c.size
            except _NeedsWhitespaceParser:
                continue
            self._check_count(count)
            return _Scan(engine, is_sorted)
        msg = "unreachable: the pandas parser never asks for another parser"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover

    def _check_count(self, count: int) -> None:
        if count != self._header.nnz:
            msg = (
                f"{self._matrix}: has {count} entries but its header says {self._header.nnz}. "
                "The file is truncated (or was edited): re-download or re-export it."
            )
            raise InputError(msg)

    def _parsed(self, engine: str) -> Iterator[dict[str, np.ndarray]]:
        try:
            yield from self._chunks(engine, self._names())
        except _NeedsWhitespaceParser as err:  # the first pass parsed it: changed since?
            msg = f"{self._matrix}: malformed entries ({err}); was the file changed while read?"
            raise InputError(msg) from err

    def _triplets(self, engine: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(cell, gene, value) pieces of ``read_size`` entries, 0-based, checked, filtered."""
        header, path = self._header, self._matrix
        count = 0
        pattern = header.field == "pattern"
        for chunk in _resize(self._parsed(engine), self._read_size):
            g, c = chunk["g"] - 1, chunk["c"] - 1
            v = np.ones(g.size, dtype=np.int32) if pattern else chunk["v"]
            for arr, n, what in ((g, header.n_genes, "gene"), (c, header.n_cells, "cell")):
                if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n):
                    k = int(np.flatnonzero((arr < 0) | (arr >= n))[0])
                    msg = (
                        f"{path}: entry {count + k + 1} has {what} index {int(arr[k]) + 1}, but "
                        f"the header says {n} {what}s (1-based). The file is corrupt."
                    )
                    raise InputError(msg)
            count += g.size
            if self._col_map is not None:
                g = self._col_map[g]
                keep = g >= 0
                g, c, v = g[keep], c[keep], v[keep]
            yield c.astype(np.int32), g.astype(np.int32), v  # in range: checked above
        self._check_count(count)

    # ---------------------------------------------------------------- blocks

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells.

        The first call parses the file once to check it (see the module notes). Sorted files are
        then streamed in order; unsorted files are transposed through temporary files before
        the first block is yielded. Values are returned as parsed (int64, float64 for
        ``real`` files), unchanged.
        """
        if n_cells < 1:
            msg = f"n_cells must be >= 1; got {n_cells}."
            raise ValueError(msg)
        return guard_reads(
            self._matrix, self._blocks(n_cells), storage_options=self._storage_options
        )

    def _blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        if self._scan is None:
            self._scan = self._scan_entries()
            if not self._scan.sorted:
                gb = transpose_disk_bytes(self._header.nnz, self._value_dtype()) / 1e9
                self.info.notes.append(
                    f"{basename(self._matrix)} is not sorted by cell: transposed through "
                    f"temporary files (about {gb:.2f} GB of temporary disk)."
                )
        triplets = self._triplets(self._scan.engine)
        if self._scan.sorted:
            yield from self._stream_sorted(triplets, n_cells)
        else:
            yield from bucket_transpose(
                triplets,
                n_rows=self.info.n_cells,
                n_cols=self.info.n_genes,
                block_rows=n_cells,
                value_dtype=self._value_dtype(),
                path=self._matrix,
                temp_dir=self._temp_dir,
            )

    def _stream_sorted(
        self, triplets: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], n_cells: int
    ) -> Iterator[sp.csr_matrix]:
        total = self.info.n_cells
        b0, b1 = 0, min(n_cells, total)
        last = -1
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for c, g, v in triplets:
            if not c.size:
                continue
            if int(c[0]) < last or bool((c[1:] < c[:-1]).any()):
                msg = (
                    f"{self._matrix}: entries are no longer sorted by cell although a first "
                    "pass found them sorted: was the file changed while it was read?"
                )
                raise InputError(msg)
            last = int(c[-1])
            while True:
                split = int(np.searchsorted(c, b1, side="left"))
                if split == c.size:
                    pending.append((c, g, v))
                    break
                pending.append((c[:split], g[:split], v[:split]))
                yield self._assemble(pending, b0, b1)
                pending, (c, g, v) = [], (c[split:], g[split:], v[split:])
                b0, b1 = b1, min(b1 + n_cells, total)
        while b0 < total:
            yield self._assemble(pending, b0, b1)
            pending = []
            b0, b1 = b1, min(b1 + n_cells, total)

    def _assemble(
        self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], b0: int, b1: int
    ) -> sp.csr_matrix:
        if parts:
            rows = np.concatenate([p[0] for p in parts]) - b0
            cols = np.concatenate([p[1] for p in parts])
            vals = np.concatenate([p[2] for p in parts])
        else:
            rows, cols = np.empty(0, np.int32), np.empty(0, np.int32)
            vals = np.empty(0, self._value_dtype())
        indptr = np.searchsorted(rows, np.arange(b1 - b0 + 1), side="left")
        return sp.csr_matrix((vals, cols, indptr), shape=(b1 - b0, self.info.n_genes))


def open_10x_mtx(
    path: str | os.PathLike[str],
    *,
    read_size: int | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> TenxMtxSource:
    """Open a 10x MEX directory (or its ``matrix.mtx[.gz]``); reads the header and TSVs only.

    Parameters
    ----------
    path
        The directory holding ``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or ``genes.tsv[.gz]``
        and ``barcodes.tsv[.gz]``, or the matrix file itself (files may share a prefix, as in
        ``GSM123_matrix.mtx.gz`` / ``GSM123_barcodes.tsv.gz``).
    read_size
        Entries per parsed piece (default 262,144).
    temp_dir
        Where unsorted files are transposed (default: the system's temporary directory).
    storage_options
        fsspec options when ``path`` is a URL (``s3://...``); ignored for local paths. The
        directory is listed and its files streamed through fsspec (the text has no index, so
        the matrix is streamed whole, twice, which the source's notes say); unsorted files are
        still transposed on local temporary disk.

    Raises
    ------
    InputError
        A missing file, a header that is not a general coordinate matrix, feature or barcode
        counts not matching the header, an empty matrix; while reading: malformed lines,
        indices out of range, or fewer entries than the header says (truncated).
    """
    text = os.fspath(path)
    return TenxMtxSource(
        text,
        read_size=read_size,
        temp_dir=temp_dir,
        storage_options=dict(storage_options or {}) if is_url(text) else None,
    )
