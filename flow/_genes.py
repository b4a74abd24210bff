"""Gene identifiers: normalisation, gene mappings, and the collapse of a store's columns.

The one place where gene IDs are compared (``DESIGN.md`` section 3):

- :func:`normalize_gene_ids`: surrounding whitespace removed, upper-cased, and a trailing
  Ensembl version suffix (``ENSG00000123.12`` -> ``ENSG00000123``) removed from
  Ensembl-looking IDs.
- :class:`GeneMapping`: an optional ID/symbol -> gene ID table (Geneformer's
  ``ensembl_mapping_dict``, a ``.json`` or ``.tsv``), read and normalised once by
  :func:`read_gene_mapping`; IDs it does not know are kept as they are.
- :func:`collapse_gene_ids`: a store's gene IDs, normalised and mapped, as the distinct genes
  in first-seen order plus each column's gene among them. Columns that land on the same gene
  (exact duplicates included) are summed by every stage: the median set keeps this gene order,
  and :func:`flow.vocab.build_gene_map` places the genes on a vocabulary.

Eager and small (one entry per gene); nothing here touches Dask. Pickles are read with
:func:`flow._pickle.load_dict`, which refuses pickles that would run code.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ._pickle import load_dict
from .errors import InputError, VocabularyError

__all__ = [
    "CollapsedGenes",
    "GeneMapping",
    "collapse_gene_ids",
    "file_kind",
    "normalize_gene_ids",
    "open_text",
    "read_gene_mapping",
    "read_pairs",
]

# Ensembl stable IDs: ENS + optional species code + feature letter(s) + digits, e.g.
# ENSG00000139618, ENSMUSG00000064370, ENSDARG00000000001. Only a trailing ".digits" is a version.
_ENSEMBL_VERSIONED: Final = re.compile(r"^(ENS[A-Z]*\d+)\.\d+$")

StrArray = npt.NDArray[np.str_]


# --------------------------------------------------------------------------------------------
# gene identifiers


def _normalize_one(gene_id: str) -> str:
    s = gene_id.strip().upper()
    m = _ENSEMBL_VERSIONED.match(s)
    return m.group(1) if m is not None else s


#: What :meth:`str.strip` removes from ASCII text (``str.isspace`` in the ASCII range).
_ASCII_SPACE: Final = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def normalize_gene_ids(ids: Iterable[str]) -> StrArray:
    """Normalise gene identifiers for matching against a vocabulary.

    Parameters
    ----------
    ids
        Gene identifiers (Ensembl IDs, symbols, ...). Must be strings.

    Returns
    -------
    numpy.ndarray of str
        One normalised ID per input, in input order: surrounding whitespace stripped,
        upper-cased, and on Ensembl-looking IDs (``ENS`` + letters + digits) a trailing version
        suffix ``.<digits>`` removed: ``ensg00000123.12`` -> ``ENSG00000123``. Other IDs keep
        their dots (``RP11-34P13.3`` stays as it is), and suffixes such as GENCODE's
        ``_PAR_Y`` are kept, so ``ENSG00000002586.20_PAR_Y`` is not merged with its X copy.

    Raises
    ------
    InputError
        If an identifier is not a string (e.g. a missing value).

    Notes
    -----
    Vectorised for ASCII IDs (a numpy array of str is taken as it is; 143,000 IDs in about
    30 ms instead of 0.13 s one by one); other text goes one ID at a time, with the same result.

    Examples
    --------
    >>> normalize_gene_ids([" ENSG00000139618.15", "tp53", "ENSG00000141510"]).tolist()
    ['ENSG00000139618', 'TP53', 'ENSG00000141510']
    """
    arr = _str_array(ids)
    if arr.size == 0:
        return np.empty(0, dtype="<U1")
    if int(arr.view(np.uint32).max()) >= 128:  # not ASCII: Python's own rules, one by one
        return np.array([_normalize_one(g) for g in arr.tolist()], dtype=np.str_)
    stripped = np.ascontiguousarray(np.strings.strip(arr, _ASCII_SPACE))
    codes = stripped.view(np.uint32).copy()
    codes[(codes >= 97) & (codes <= 122)] -= 32  # a-z -> A-Z
    upper = codes.view(stripped.dtype)
    dotted = np.flatnonzero(np.strings.find(upper, ".") >= 0)
    if dotted.size == 0:
        return upper
    # ENS + [A-Z]* + digits, "." + digits: the part before the dot is the ID (as the regex)
    head, _, version = np.strings.partition(upper[dotted], ".")
    letters = np.strings.rstrip(head, "0123456789")
    versioned = (
        np.strings.startswith(head, "ENS")
        & np.strings.isdigit(version)
        & (np.strings.str_len(letters) < np.strings.str_len(head))
        & (np.strings.lstrip(letters, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") == "")
    )
    if not versioned.any():
        return upper
    out = upper.copy()
    out[dotted[versioned]] = head[versioned]
    return out


def _str_array(ids: Iterable[str]) -> StrArray:
    """``ids`` as a numpy array of str (as it is when it is one), checking each is a string."""
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind == "U":
        return np.ascontiguousarray(ids)
    items = ids.tolist() if isinstance(ids, np.ndarray) and ids.ndim == 1 else list(ids)
    for i, gene_id in enumerate(items):
        if not isinstance(gene_id, str):
            msg = (
                f"Gene identifier {i} is {gene_id!r} ({type(gene_id).__name__}), expected a "
                "string. Fill or drop genes with missing IDs before encoding."
            )
            raise InputError(msg)
    return np.array(items, dtype=np.str_) if items else np.empty(0, dtype="<U1")


# --------------------------------------------------------------------------------------------
# small text files (gene mappings and token dictionaries)


def open_text(path: Path) -> io.TextIOBase:
    """A UTF-8 text file, gunzipped on the fly when its name ends in ``.gz``."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Two tab-separated columns; '#' comment lines and blank lines are skipped."""
    pairs: list[tuple[str, str]] = []
    with open_text(path) as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            if not row or not "".join(row).strip() or row[0].startswith("#"):
                continue
            if len(row) < 2:
                msg = (
                    f"{os.fspath(path)!r} line {lineno}: expected two tab-separated columns "
                    f"(ID<TAB>value), got {row!r}."
                )
                raise InputError(msg)
            pairs.append((row[0], row[1]))
    return pairs


def file_kind(path: Path) -> str:
    """The lower-case extension that says how to read ``path`` (``.gz`` looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


# --------------------------------------------------------------------------------------------
# gene mappings


@dataclass(frozen=True, eq=False)
class GeneMapping(Mapping[str, str]):
    """A gene-ID mapping (ID or symbol -> gene ID), normalised once; read-only.

    Build one with :func:`read_gene_mapping` (from a file) or :meth:`from_dict`. It is a
    read-only :class:`~collections.abc.Mapping` of normalised keys to normalised IDs (so it
    compares equal to a plain ``dict`` with the same pairs).

    Attributes
    ----------
    table
        The normalised pairs (a read-only view).
    source
        Where the pairs came from (a path, or a short description).
    """

    table: Mapping[str, str]
    source: str = "gene mapping"

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], *, source: str = "gene mapping") -> GeneMapping:
        """Normalise the keys and values of ``mapping`` (:func:`normalize_gene_ids`).

        Raises
        ------
        InputError
            A value is not a string.
        VocabularyError
            Two keys become equal after normalisation but map to different IDs.
        """
        keys = normalize_gene_ids(list(mapping.keys()))
        raw_values = list(mapping.values())
        if not all(isinstance(v, str) for v in raw_values):
            bad = next(v for v in raw_values if not isinstance(v, str))
            msg = f"{source}: mapping values must be gene ID strings, got {bad!r}."
            raise InputError(msg)
        values = normalize_gene_ids(raw_values)
        out: dict[str, str] = {}
        for k, v in zip(keys.tolist(), values.tolist(), strict=True):
            prev = out.setdefault(k, v)
            if prev != v:
                msg = (
                    f"{source}: {k!r} maps to both {prev!r} and {v!r} after normalisation "
                    "(version suffix stripped, upper-cased). Each key must map to one gene ID."
                )
                raise VocabularyError(msg)
        return cls(MappingProxyType(out), source)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the normalised pairs, sorted: identifies the mapping's content."""
        return hashlib.sha256(json.dumps(sorted(self.table.items())).encode()).hexdigest()

    def apply(self, ids: StrArray) -> StrArray:
        """Normalised IDs with the mapped ones replaced (IDs it does not know are kept)."""
        table = self.table
        return np.array([table.get(g, g) for g in ids.tolist()], dtype=np.str_)

    def __getitem__(self, key: str) -> str:
        return self.table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def __reduce__(self) -> tuple[Any, ...]:  # a MappingProxyType does not pickle
        return (type(self), (dict(self.table), self.source))

    def __post_init__(self) -> None:
        if not isinstance(self.table, MappingProxyType):
            object.__setattr__(self, "table", MappingProxyType(dict(self.table)))

    def __repr__(self) -> str:
        return f"GeneMapping({len(self):,} keys from {self.source})"


def _read_raw_mapping(p: Path, source: str) -> dict[str, Any]:
    kind = file_kind(p)
    raw: dict[str, Any]
    if kind == ".pkl":
        return load_dict(p)
    if kind == ".json":
        with open_text(p) as fh:
            try:
                raw = json.load(fh)
            except json.JSONDecodeError as err:
                msg = f"{source!r} is not valid JSON: {err}."
                raise InputError(msg) from err
        if not isinstance(raw, dict):
            msg = f"{source!r}: expected a JSON object of key -> gene ID."
            raise InputError(msg)
        return raw
    if kind in {".tsv", ".txt"}:
        raw = {}
        for k, v in read_pairs(p):
            if raw.setdefault(k, v) != v:
                msg = f"{source!r}: {k!r} maps to both {raw[k]!r} and {v!r}."
                raise VocabularyError(msg)
        return raw
    msg = (
        f"Cannot read a gene mapping from {source!r}: expected a .pkl (Geneformer "
        "ensembl_mapping_dict), .json or a two-column .tsv."
    )
    raise InputError(msg)


def read_gene_mapping(path: str | os.PathLike[str]) -> GeneMapping:
    """Read a gene-ID mapping (ID or symbol -> Ensembl ID), normalised once.

    Parameters
    ----------
    path
        Geneformer's ``ensembl_mapping_dict_*.pkl`` (keys: Ensembl IDs and upper-cased symbols;
        read with a restricted unpickler), a ``.json`` object, or a two-column ``.tsv``/``.txt``
        (optionally ``.gz``) ``key<TAB>gene ID`` (``#`` comments skipped; a header line is
        harmless: it maps one more key).

    Returns
    -------
    GeneMapping
        Keys and values normalised with :func:`normalize_gene_ids`. Eager.

    Raises
    ------
    VocabularyError
        If two keys become equal after normalisation but map to different IDs.
    InputError
        Unreadable or unsafe file, unsupported extension, non-string values.
    """
    p = Path(path)
    source = os.fspath(p)
    return GeneMapping.from_dict(_read_raw_mapping(p, source), source=repr(source))


# --------------------------------------------------------------------------------------------
# the collapse of a store's columns


@dataclass(frozen=True, eq=False)
class CollapsedGenes:
    """A store's columns as distinct genes: built by :func:`collapse_gene_ids`.

    Attributes
    ----------
    ids
        ``(n_genes,)`` the distinct normalised (and mapped) gene IDs, in the order their first
        column appears: the store's own order when no two columns share a gene.
    index
        ``(n_columns,)`` int64: each column's gene, an index into ``ids``.
    """

    ids: StrArray
    index: npt.NDArray[np.int64]

    @property
    def n_columns(self) -> int:
        """Number of columns of the store."""
        return int(self.index.size)

    @property
    def has_duplicates(self) -> bool:
        """Whether two columns land on one gene (and are summed)."""
        return self.ids.size != self.index.size

    @property
    def column_ids(self) -> StrArray:
        """``(n_columns,)`` the normalised (and mapped) gene ID of each column."""
        return self.ids[self.index]


def collapse_gene_ids(ids: Iterable[str], mapping: GeneMapping | None = None) -> CollapsedGenes:
    """Normalise a store's gene IDs, apply a mapping, and find the columns that share a gene.

    Parameters
    ----------
    ids
        The store's gene IDs, in column order.
    mapping
        Optional :class:`GeneMapping` applied after normalisation.

    Returns
    -------
    CollapsedGenes
        The distinct genes in first-seen order (as :func:`pandas.factorize` orders them) and
        each column's index among them. Eager (one entry per column).

    Examples
    --------
    >>> genes = collapse_gene_ids(["ENSG2", "ensg1.3", "ENSG2.1"])
    >>> genes.ids.tolist(), genes.index.tolist()
    (['ENSG2', 'ENSG1'], [0, 1, 0])
    """
    if mapping is not None and not isinstance(mapping, GeneMapping):
        msg = (
            f"mapping must be a GeneMapping (read_gene_mapping or GeneMapping.from_dict), got "
            f"{type(mapping).__name__}."
        )
        raise TypeError(msg)
    column_ids = normalize_gene_ids(ids)
    if mapping is not None and column_ids.size:
        column_ids = mapping.apply(column_ids)
    uniq, first, inverse = np.unique(column_ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # distinct genes by first column
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    index = position[inverse.reshape(-1)].astype(np.int64, copy=False)
    index.setflags(write=False)
    unique = uniq[order]
    unique.setflags(write=False)
    return CollapsedGenes(unique, index)
