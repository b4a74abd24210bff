"""Gene lists and gene sets for :mod:`flow.retention`: reading files, resolving names.

Formats: a gene list is one Ensembl ID or symbol per line (commas and spaces also separate,
``#`` starts a comment); a gene set file is GMT (MSigDB's format: one set per line,
``NAME<TAB>DESCRIPTION<TAB>GENE<TAB>GENE...``) or a gene list (one set, named after the file).
Names are resolved as :func:`flow._names.resolve_gene` resolves one gene; names the vocabulary
does not know are left out with a warning that lists them (with close matches), never silently.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._names import GeneIndex
from .errors import FlowWarning, InputError

__all__ = [
    "GeneSet",
    "RetentionWarning",
    "read_gene_list",
    "read_gene_sets",
    "resolve_sets",
    "set_membership",
]


class RetentionWarning(FlowWarning):
    """A gene set names genes the vocabulary does not have (they are left out, and listed)."""


@dataclass(frozen=True)
class GeneSet:
    """A named list of genes (Ensembl IDs or symbols), and where it was read."""

    name: str
    genes: tuple[str, ...]
    description: str = ""
    where: str = ""


def _lines(path: str | os.PathLike[str], what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().splitlines()
    except FileNotFoundError as err:
        msg = f"{what} file {os.fspath(path)!r} not found."
        raise InputError(msg) from err
    except (OSError, UnicodeDecodeError) as err:
        msg = f"Cannot read {what.lower()} file {os.fspath(path)!r}: {err}."
        raise InputError(msg) from err


def read_gene_list(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Gene IDs or symbols, one per line (commas and spaces also separate; ``#`` comments).

    Raises
    ------
    InputError
        The file is missing or lists no gene.
    """
    names = []
    for line in _lines(path, "Gene list"):
        names += [t for t in line.split("#", 1)[0].replace(",", " ").split() if t]
    if not names:
        msg = f"Gene list {os.fspath(path)!r} lists no gene (one ID or symbol per line)."
        raise InputError(msg)
    return tuple(dict.fromkeys(names))


def _gmt_set(fields: list[str], where: str) -> GeneSet:
    name = fields[0].strip()
    if len(fields) < 2 or not name:
        msg = (
            f"{where}: not a GMT line (NAME<TAB>DESCRIPTION<TAB>GENE<TAB>...); "
            f"fix or remove the line."
        )
        raise InputError(msg)
    genes = tuple(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
    if not genes:
        msg = f"{where}: gene set {name!r} lists no genes; add its genes or remove the line."
        raise InputError(msg)
    return GeneSet(name, genes, fields[1].strip(), where)


def read_gene_sets(path: str | os.PathLike[str]) -> tuple[GeneSet, ...]:
    """Gene sets from a GMT file (MSigDB's format) or a gene list (one set, named after the file).

    A file ending in ``.gmt``, or with a tab on any line, is GMT: one set per line,
    ``NAME<TAB>DESCRIPTION<TAB>GENE<TAB>GENE...``; blank lines are skipped.

    Raises
    ------
    InputError
        Missing file; a malformed GMT line or a set without genes (the file and line are
        named); a set name given twice; no set at all.
    """
    text = os.fspath(path)
    lines = _lines(path, "Gene set")
    if not (text.lower().endswith(".gmt") or any("\t" in line for line in lines)):
        return (GeneSet(Path(text).stem, read_gene_list(path), "", text),)
    sets: dict[str, GeneSet] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        found = _gmt_set(line.rstrip("\r\n").split("\t"), f"{text}, line {number}")
        if found.name in sets:
            msg = f"{found.where}: gene set {found.name!r} is also on {sets[found.name].where}."
            raise InputError(msg)
        sets[found.name] = found
    if not sets:
        msg = f"No gene set in {text!r} (GMT: NAME<TAB>DESCRIPTION<TAB>GENE... per line)."
        raise InputError(msg)
    return tuple(sets.values())


def resolve_sets(
    sets: Sequence[GeneSet], index: GeneIndex
) -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    """Tokens of each set; unknown names warned about (with close matches), never dropped silently."""
    names, tokens, unknown = [], [], []
    for s in sets:
        found = [index.lookup(g) for g in s.genes]
        unknown += [(s.name, g) for g, t in zip(s.genes, found, strict=True) if not t]
        names.append(s.name)
        tokens.append(np.unique(np.array([t for ts in found for t in ts], dtype=np.int64)))
    if unknown and all(t.size == 0 for t in tokens):
        msg = (
            f"No gene of the gene sets is in the vocabulary (e.g. {unknown[0][1]!r}): "
            f"give Ensembl IDs or symbols of the species of the encoding."
        )
        raise InputError(msg)
    if unknown:
        shown = []
        for set_name, gene in unknown[:10]:  # close matches cost ~ms each: only the first few
            close = index.close(gene)
            hint = f" (close: {', '.join(close)})" if close else ""
            shown.append(f"{gene}{hint} in {set_name}")
        more = f" and {len(unknown) - 10:,} more" if len(unknown) > 10 else ""
        empty = [n for n, t in zip(names, tokens, strict=True) if not t.size]
        none = f"; sets with no gene in the vocabulary: {', '.join(empty)}" if empty else ""
        msg = (
            f"{len(unknown):,} gene name(s) of the gene sets are not in the vocabulary and are "
            f"left out: {'; '.join(shown)}{more}{none}."
        )
        warnings.warn(msg, RetentionWarning, stacklevel=3)
    return tuple(names), tuple(tokens)


def set_membership(
    set_tokens: Sequence[np.ndarray], n_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR from token to the sets that hold it."""
    if not set_tokens:
        return np.zeros(n_tokens + 1, np.int64), np.zeros(0, np.int32)
    toks = np.concatenate([np.asarray(t, np.int64) for t in set_tokens])
    ids = np.repeat(np.arange(len(set_tokens), dtype=np.int32), [len(t) for t in set_tokens])
    order = np.argsort(toks, kind="stable")
    ptr = np.zeros(n_tokens + 1, np.int64)
    ptr[1:] = np.cumsum(np.bincount(toks, minlength=n_tokens))
    return ptr, ids[order]
