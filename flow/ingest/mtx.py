"""10x MEX (Matrix Market) directories: ``matrix.mtx[.gz]`` with its features and barcodes.

``matrix.mtx[.gz]`` is genes x cells, one ``gene cell value`` line per nonzero (1-based), with
``features.tsv[.gz]`` (Cell Ranger 3+) or ``genes.tsv[.gz]`` (Cell Ranger 2) and
``barcodes.tsv[.gz]`` beside it. Opening reads the header, features and barcodes. The first
pass over the blocks starts with one parse of the whole file (fast and multi-threaded, keeping
one chunk of parsed lines at a time) that checks every line, counts the entries against the
header (a truncated file is refused before any block is yielded) and learns whether entries
are sorted by cell, as Cell Ranger writes them:

- sorted: blocks are streamed in file order, holding one parsed piece plus one block;
- not sorted: the entries are transposed through temporary files
  (:func:`flow.ingest._transpose.bucket_transpose`), which the source's notes say.

Lines are parsed with pyarrow's streaming CSV reader (single-space separated, as every writer
we know produces); files that need general whitespace splitting fall back to pandas. The text
has no index, so a range of cells cannot be read on its own (``supports_ranges`` is False).
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import scipy.sparse as sp

from .._io import content_hasher
from ..errors import InputError
from ._columns import as_str_array, check_ids
from ._fs import (
    cause,
    describe,
    fingerprint,
    guard_reads,
    isdir,
    isfile,
    listdir,
    open_input,
    parent,
    redact,
)
from ._source import SourceInfo, check_block_size
from ._transpose import bucket_transpose, transpose_disk_bytes
from .tenx import feature_filter

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from .._location import Location
    from ._options import ReadOptions

__all__ = ["TenxMtxSource", "read_10x_mtx"]

_MTX_NAMES = ("matrix.mtx.gz", "matrix.mtx")
_FEATURE_NAMES = ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
_BARCODE_NAMES = ("barcodes.tsv.gz", "barcodes.tsv")
_ARROW_BLOCK_BYTES = 1 << 20
#: Read-ahead when a Matrix Market file or TSV is streamed from a URL.
_STREAM_BLOCK_SIZE = 8 << 20
#: Entries per parsed piece of a Matrix Market file (about 4 MB per column).
_MTX_ENTRIES_PER_READ = 1 << 18

Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- the files


def _unreadable(location: Location, err: BaseException) -> InputError:
    detail = describe(err, location)
    return InputError(
        f"{location.path}: cannot be read ({detail}). The file is truncated or corrupt."
    )


@contextlib.contextmanager
def _readable(location: Location) -> Iterator[Any]:
    """What pandas and pyarrow read from: a local path as it is, a URL as an open file."""
    if not location.is_url:
        yield location.path
        return
    with open_input(location, block_size=_STREAM_BLOCK_SIZE) as fh:
        yield fh


def _read_tsv(location: Location) -> pd.DataFrame:
    path = location.path
    try:
        with _readable(location) as source:
            remote = {"compression": "gzip" if path.endswith(".gz") else None}
            return pd.read_csv(
                source,
                sep="\t",
                header=None,
                dtype=str,
                quoting=csv.QUOTE_NONE,
                na_filter=False,
                keep_default_na=False,
                **(remote if location.is_url else {}),  # local paths: compression from the name
            )
    except pd.errors.EmptyDataError:
        return pd.DataFrame({0: pd.Series([], dtype=object)})
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise _unreadable(location, err) from cause(err, location)


def _find(folder: Location, prefix: str, names: tuple[str, ...], what: str, given: str) -> Location:
    """The first of ``prefix + name`` present in ``folder`` (``given`` names the input)."""
    files = None
    if folder.is_url:
        try:
            files = {n for n, is_file in listdir(folder).items() if is_file}
        except InputError:  # not listable (https without directory listings): ask by name
            files = None
    for name in names:
        candidate = folder.join(prefix + name)
        found = prefix + name in files if files is not None else isfile(candidate)
        if found:
            return candidate
    msg = (
        f"{given}: no {what} beside it (looked for {', '.join(prefix + n for n in names)} in "
        f"{folder.path}). A 10x matrix directory needs matrix.mtx, features.tsv (or genes.tsv) "
        "and barcodes.tsv, optionally gzipped."
    )
    raise InputError(msg)


def _matrix_file(location: Location) -> tuple[Location, Location, str]:
    """(matrix file, its folder, the prefix its neighbours share) of a MEX input: a directory,
    or the matrix file itself (files may share a prefix, as in ``GSM123_matrix.mtx.gz`` /
    ``GSM123_barcodes.tsv.gz``)."""
    named_file = location.is_url and location.name.endswith((".mtx", ".mtx.gz"))
    if not named_file and isdir(location):  # (https "lists" a URL by GET: not a file's)
        return _find(location, "", _MTX_NAMES, "matrix.mtx", location.path), location, ""
    folder, name = parent(location)
    stem = name.removesuffix(".gz").removesuffix(".mtx")
    prefix = stem.removesuffix("matrix") if stem.endswith("matrix") else ""
    return location, folder, prefix


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Header:
    field: str  # "integer", "real" or "pattern"
    n_genes: int
    n_cells: int
    nnz: int
    header_lines: int

    @property
    def names(self) -> list[str]:
        return ["g", "c"] if self.field == "pattern" else ["g", "c", "v"]

    @property
    def value_dtype(self) -> np.dtype[Any]:
        field = self.field
        return np.dtype(
            np.float64 if field == "real" else np.int64 if field == "integer" else np.int32
        )


_HEADER_FIX = "Pass a Matrix Market coordinate file as written by Cell Ranger or scipy.io.mmwrite."


def _header_lines(location: Location) -> tuple[list[str], bytes, int]:
    """(banner words, size line, lines up to it) of a Matrix Market file."""
    path = location.path
    try:
        with open_input(location, block_size=1 << 16, gunzip=path.endswith(".gz")) as fh:
            banner = fh.readline().decode("ascii", errors="replace").strip().split()
            lines = 1
            while True:
                line = fh.readline()
                lines += 1
                if not line:
                    msg = f"{path}: ends before the Matrix Market size line. {_HEADER_FIX}"
                    raise InputError(msg)
                if line.startswith(b"%") or not line.strip():
                    continue
                return banner, line, lines
    except (OSError, EOFError) as err:
        raise _unreadable(location, err) from cause(err, location)


def _read_header(location: Location) -> _Header:
    path = location.path
    banner, line, lines = _header_lines(location)
    words = [w.lower() for w in banner]
    if len(words) < 5 or words[0] != "%%matrixmarket" or words[1] != "matrix":
        msg = f"{path}: does not start with a '%%MatrixMarket matrix ...' line. {_HEADER_FIX}"
        raise InputError(msg)
    if (
        words[2] != "coordinate"
        or words[3] not in ("integer", "real", "double", "pattern")
        or words[4] != "general"
    ):
        msg = (
            f"{path}: is a Matrix Market '{' '.join(words[2:5])}' matrix; flow reads "
            f"'coordinate integer|real|pattern general' count matrices. {_HEADER_FIX}"
        )
        raise InputError(msg)
    size = line.split()
    try:
        n_genes, n_cells, nnz = (int(s) for s in size[:3])
        if len(size) != 3:
            raise ValueError
    except ValueError as err:
        msg = f"{path}: the size line {line!r} is not 'genes cells entries'. {_HEADER_FIX}"
        raise InputError(msg) from err
    field = "real" if words[3] == "double" else words[3]
    return _Header(field, n_genes, n_cells, nnz, lines)


class _NeedsWhitespaceParser(Exception):
    """Internal: the lines are not single-space separated; parse with pandas instead."""


@dataclass(frozen=True)
class _Scan:
    engine: str  # "arrow" or "pandas"
    sorted: bool


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


@dataclass(frozen=True)
class _Parser:
    """The entries of one Matrix Market file, parsed in chunks (columns ``g``, ``c``, ``v``)."""

    matrix: Location
    header: _Header

    def chunks(self, engine: str) -> Iterator[dict[str, np.ndarray]]:
        """Parsed entries, column by name, in file order (1-based indices as in the file)."""
        location, path = self.matrix, self.matrix.path
        try:
            if engine == "arrow":
                yield from self._arrow_chunks()
            else:
                yield from self._pandas_chunks()
        except (_NeedsWhitespaceParser, InputError):
            raise
        except (OSError, EOFError) as err:
            msg = f"{path}: reading failed ({describe(err, location)}). The file is truncated or corrupt."
            raise InputError(msg) from cause(err, location)
        except (ValueError, pd.errors.ParserError) as err:
            detail = redact(str(err), location.options, keep=path)
            msg = (
                f"{path}: malformed entries ({detail}). Each line after the header must be "
                f"'gene cell value' with {self.header.field} values; the file is corrupt."
            )
            raise InputError(msg) from cause(err, location)

    def _arrow_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        names, field = self.header.names, self.header.field
        vtype = {"integer": pa.int64(), "real": pa.float64()}.get(field)
        types = {"g": pa.int64(), "c": pa.int64(), **({"v": vtype} if vtype is not None else {})}
        gz = "gzip" if self.matrix.path.endswith(".gz") else None
        with (
            _readable(self.matrix) as source,
            pa.input_stream(source, compression=gz) as stream,
        ):
            try:
                reader = pacsv.open_csv(
                    stream,
                    read_options=pacsv.ReadOptions(
                        skip_rows=self.header.header_lines,
                        column_names=names,
                        block_size=_ARROW_BLOCK_BYTES,
                    ),
                    parse_options=pacsv.ParseOptions(
                        delimiter=" ", quote_char=False, double_quote=False, escape_char=False
                    ),
                    convert_options=pacsv.ConvertOptions(
                        column_types=types,
                        include_columns=names,
                        null_values=[],
                        strings_can_be_null=False,
                        quoted_strings_can_be_null=False,
                    ),
                )
                for batch in reader:
                    yield {c: batch.column(c).to_numpy() for c in names}
            except pa.ArrowInvalid as err:  # odd whitespace, or malformed: pandas decides
                raise _NeedsWhitespaceParser(str(err)) from err

    def _pandas_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        names, header = self.header.names, self.header
        vdtype = header.value_dtype if header.field != "pattern" else None
        dtypes = {"g": np.int64, "c": np.int64, **({"v": vdtype} if vdtype is not None else {})}
        remote = {"compression": "gzip" if self.matrix.path.endswith(".gz") else None}
        with (
            _readable(self.matrix) as source,
            pd.read_csv(
                source,
                sep=r"\s+",
                header=None,
                names=names,
                usecols=names,
                dtype=dtypes,
                skiprows=header.header_lines,
                chunksize=_ARROW_BLOCK_BYTES // 16,
                **(remote if self.matrix.is_url else {}),  # local: compression from the name
            ) as reader,
        ):
            for frame in reader:
                yield {c: frame[c].to_numpy() for c in names}

    def check_count(self, count: int) -> None:
        if count != self.header.nnz:
            msg = (
                f"{self.matrix.path}: has {count} entries but its header says "
                f"{self.header.nnz}. The file is truncated (or was edited): re-download or "
                "re-export it."
            )
            raise InputError(msg)

    def scan(self) -> _Scan:
        """One pass before any block: the parser that works, sortedness, and the entry count.

        Parses every line (so a malformed or truncated file is refused before anything is
        written), keeping only the cell column of one chunk at a time.
        """
        for engine in ("arrow", "pandas"):
            count, last, is_sorted = 0, -1, True
            try:
                for chunk in self.chunks(engine):
                    c = chunk["c"]
                    if c.size:
                        if is_sorted and (int(c[0]) < last or bool((c[1:] < c[:-1]).any())):
                            is_sorted = False
                        last = int(c[-1])
                    count += c.size
            except _NeedsWhitespaceParser:
                continue
            self.check_count(count)
            return _Scan(engine, is_sorted)
        msg = "unreachable: the pandas parser never asks for another parser"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover

    def _parsed(self, engine: str) -> Iterator[dict[str, np.ndarray]]:
        try:
            yield from self.chunks(engine)
        except _NeedsWhitespaceParser as err:  # the first pass parsed it: changed since?
            msg = f"{self.matrix.path}: malformed entries ({err}); was the file changed while read?"
            raise InputError(msg) from err

    def triplets(
        self, engine: str, read_size: int, col_map: np.ndarray | None
    ) -> Iterator[Triplets]:
        """(cell, gene, value) pieces of ``read_size`` entries, 0-based, checked, filtered."""
        header, path = self.header, self.matrix.path
        count = 0
        pattern = header.field == "pattern"
        for chunk in _resize(self._parsed(engine), read_size):
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
            if col_map is not None:
                g = col_map[g]
                keep = g >= 0
                g, c, v = g[keep], c[keep], v[keep]
            yield c.astype(np.int32), g.astype(np.int32), v  # in range: checked above
        self.check_count(count)


# --------------------------------------------------------------------------- the source


def _features_and_barcodes(
    features: Location, barcodes: Location, header: _Header
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(gene IDs, symbols, feature types, barcodes) from the TSV files, checked."""
    table = _read_tsv(features)
    cells = as_str_array(_read_tsv(barcodes)[0].to_numpy())
    cells = cells.astype(np.dtypes.StringDType())  # compact (see read_ids)
    ids = as_str_array(table[0].to_numpy())
    fix = "The matrix and its features/barcodes files do not belong together: re-export them."
    check_ids(ids, n=header.n_genes, path=features.path, what="gene IDs", fix=fix)
    check_ids(cells, n=header.n_cells, path=barcodes.path, what="barcodes", fix=fix)
    symbols = as_str_array(table[1].to_numpy()) if table.shape[1] > 1 else None
    types = as_str_array(table[2].to_numpy()) if table.shape[1] > 2 else None
    return ids, symbols, types, cells


class TenxMtxSource:
    """A 10x MEX directory (``matrix.mtx[.gz]``, genes x cells) read block by block.

    See :func:`read_10x_mtx` and the module notes on sorted and unsorted files.
    """

    supports_ranges = False

    def __init__(
        self,
        options: ReadOptions,
        *,
        info: SourceInfo,
        parser: _Parser,
        col_map: np.ndarray | None,
    ) -> None:
        self.info = info
        self._options = options
        self._parser = parser
        self._col_map = col_map
        self._scan: _Scan | None = None

    @classmethod
    def from_location(cls, location: Location, options: ReadOptions) -> TenxMtxSource:
        """Find the files, read the matrix header, the features and the barcodes."""
        path = location.path
        matrix, folder, prefix = _matrix_file(location)
        header = _read_header(matrix)
        features = _find(folder, prefix, _FEATURE_NAMES, "features.tsv/genes.tsv", path)
        barcodes = _find(folder, prefix, _BARCODE_NAMES, "barcodes.tsv", path)
        ids, symbols, types, cells = _features_and_barcodes(features, barcodes, header)
        if header.n_cells == 0 or header.n_genes == 0:
            msg = f"{matrix.path}: the matrix is empty ({header.n_cells} cells x {header.n_genes} genes)."
            raise InputError(msg)
        notes: list[str] = []
        col_map = feature_filter(ids, types, None, None, path, notes)
        if col_map is not None:
            kept = col_map >= 0
            ids = ids[kept]
            symbols = symbols[kept] if symbols is not None else None
        if matrix.is_url:  # no index into Matrix Market text: it is read whole
            notes.append(
                f"{matrix.name} is streamed from its URL twice (a checking pass, "
                "then the blocks); it is not copied to local disk."
            )
        h = content_hasher()
        for part in (matrix, features, barcodes):
            h.update(fingerprint(part).encode())
        info = SourceInfo(
            path=path,
            format="10x-mtx",
            n_cells=header.n_cells,
            n_genes=len(ids),
            gene_ids=ids,
            gene_symbols=symbols,
            barcodes=cells,
            obs=pd.DataFrame(index=pd.RangeIndex(header.n_cells)),
            fingerprint=h.hexdigest(),
            notes=notes,
        )
        return cls(options, info=info, parser=_Parser(matrix, header), col_map=col_map)

    @property
    def sorted_by_cell(self) -> bool | None:
        """Whether entries are sorted by cell (None until the first pass has scanned them)."""
        return None if self._scan is None else self._scan.sorted

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells.

        The first call parses the file once to check it (see the module notes). Sorted files are
        then streamed in order; unsorted files are transposed through temporary files before
        the first block is yielded. Values are returned as parsed (int64, float64 for
        ``real`` files), unchanged.
        """
        check_block_size(n_cells)
        return guard_reads(self._parser.matrix, self._blocks(n_cells))

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Not available: Matrix Market text has no index by cell (use :meth:`iter_blocks`)."""
        msg = f"{self._parser.matrix.path}: a Matrix Market file cannot be read by cell ranges."
        raise NotImplementedError(msg)

    def _blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        parser = self._parser
        if self._scan is None:
            self._scan = parser.scan()
            if not self._scan.sorted:
                gb = transpose_disk_bytes(parser.header.nnz, parser.header.value_dtype) / 1e9
                self.info.notes.append(
                    f"{parser.matrix.name} is not sorted by cell: transposed through "
                    f"temporary files (about {gb:.2f} GB of temporary disk)."
                )
        read_size = self._options.read_size or _MTX_ENTRIES_PER_READ
        triplets = parser.triplets(self._scan.engine, read_size, self._col_map)
        if self._scan.sorted:
            yield from self._stream_sorted(triplets, n_cells)
        else:
            yield from bucket_transpose(
                triplets,
                n_rows=self.info.n_cells,
                n_cols=self.info.n_genes,
                block_rows=n_cells,
                value_dtype=parser.header.value_dtype,
                path=parser.matrix.path,
                temp_dir=self._options.temp_dir,
            )

    def _stream_sorted(self, triplets: Iterator[Triplets], n_cells: int) -> Iterator[sp.csr_matrix]:
        total = self.info.n_cells
        b0, b1 = 0, min(n_cells, total)
        last = -1
        pending: list[Triplets] = []
        for c, g, v in triplets:
            if not c.size:
                continue
            if int(c[0]) < last or bool((c[1:] < c[:-1]).any()):
                msg = (
                    f"{self._parser.matrix.path}: entries are no longer sorted by cell although "
                    "a first pass found them sorted: was the file changed while it was read?"
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

    def _assemble(self, parts: list[Triplets], b0: int, b1: int) -> sp.csr_matrix:
        if parts:
            rows = np.concatenate([p[0] for p in parts]) - b0
            cols = np.concatenate([p[1] for p in parts])
            vals = np.concatenate([p[2] for p in parts])
        else:
            rows, cols = np.empty(0, np.int32), np.empty(0, np.int32)
            vals = np.empty(0, self._parser.header.value_dtype)
        indptr = np.searchsorted(rows, np.arange(b1 - b0 + 1), side="left")
        return sp.csr_matrix((vals, cols, indptr), shape=(b1 - b0, self.info.n_genes))


def read_10x_mtx(location: Location, options: ReadOptions) -> TenxMtxSource:
    """Open a 10x MEX directory (or its ``matrix.mtx[.gz]``); reads the header and TSVs only.

    ``location`` is the directory holding ``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or
    ``genes.tsv[.gz]`` and ``barcodes.tsv[.gz]``, or the matrix file itself (files may share
    a prefix, as in ``GSM123_matrix.mtx.gz`` / ``GSM123_barcodes.tsv.gz``). Options (see
    :class:`~flow.ingest.ReadOptions`): ``read_size`` (entries per parsed piece, default
    262,144) and ``temp_dir`` (where unsorted files are transposed). A URL directory is
    listed and its files streamed through fsspec (the text has no index, so the matrix is
    streamed whole, twice, which the source's notes say); unsorted files are still
    transposed on local temporary disk.

    Raises
    ------
    InputError
        A missing file, a header that is not a general coordinate matrix, feature or barcode
        counts not matching the header, an empty matrix; while reading: malformed lines,
        indices out of range, or fewer entries than the header says (truncated).
    """
    return TenxMtxSource.from_location(location, options)
