"""Geneformer's V1 and V2 dictionaries, bundled with flow in a code-free format.

Geneformer (Theodoris et al., Apache-2.0; see ``NOTICE`` and ``LICENSE-Geneformer`` beside this
file) publishes four dictionaries per model generation as pickles. flow ships them converted by
``python -m flow.geneformer.build`` (:mod:`flow.geneformer.build`) into gzip-compressed JSON,
so a preset needs no file from the user and no pickle is ever loaded at run time:

- ``token_dictionary`` (``token_dictionary_*.pkl``): Ensembl ID or special token -> token ID;
- ``medians`` (``gene_median_dictionary_*.pkl``): Ensembl ID -> nonzero median (float64);
- ``name_id`` (``gene_name_id_dict_*.pkl``): gene symbol -> Ensembl ID;
- ``gene_mapping`` (``ensembl_mapping_dict_*.pkl``): Ensembl ID, and in V2 also the
  upper-cased symbol -> Ensembl ID.

Preset ``V1`` holds the Genecorpus-30M set (suffix ``gc30M``), ``V2`` the ~104M-cell set
(``gc104M``). ``SOURCES.json`` records, for every bundled file, the source pickle's name,
SHA-256 and size, the bundled file's SHA-256, size and number of entries; :func:`verify` checks
the bundled files against it and :func:`load` checks each file before parsing it.

This module imports only the standard library and :mod:`flow.errors`.

Examples
--------
>>> from flow import geneformer
>>> tokens = geneformer.load("V2", "token_dictionary")
>>> tokens["<cls>"], tokens["<eos>"], len(tokens)
(2, 3, 20275)
>>> geneformer.load("V1", "medians")["ENSG00000000003"]
2.001186019549122
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any, Final, Literal, overload

from flow.errors import InputError

__all__ = ["KINDS", "PRESETS", "bundled_path", "load", "verify"]

Preset = Literal["V1", "V2"]
Kind = Literal["token_dictionary", "medians", "name_id", "gene_mapping"]

#: The bundled presets.
PRESETS: Final[tuple[Preset, ...]] = ("V1", "V2")
#: The dictionaries each preset holds.
KINDS: Final[tuple[Kind, ...]] = ("token_dictionary", "medians", "name_id", "gene_mapping")

#: Geneformer's name of each dictionary (its file name without the corpus suffix).
FILE_STEMS: Final[dict[Kind, str]] = {
    "token_dictionary": "token_dictionary",
    "medians": "gene_median_dictionary",
    "name_id": "gene_name_id_dict",
    "gene_mapping": "ensembl_mapping_dict",
}
#: Geneformer's corpus suffix of each preset's files.
CORPORA: Final[dict[Preset, str]] = {"V1": "gc30M", "V2": "gc104M"}
#: The folder of each preset's pickles in the shared data (``../shared/data/geneformer``).
SOURCE_DIRS: Final[dict[Preset, str]] = {"V1": "v1_gc30M", "V2": "v2_gc104M"}

#: Where the bundled files live: this package's folder.
PACKAGE_DIR: Final = Path(__file__).resolve().parent
#: The checksum record, beside the preset folders.
SOURCES_FILE: Final = "SOURCES.json"
_SUFFIX: Final = ".json.gz"
_REBUILD: Final = "reinstall flow (or rebuild it with `python -m flow.geneformer.build`)"


def _parse_preset(preset: object) -> Preset:
    if not isinstance(preset, str):
        msg = f"preset must be a str such as 'V2', got {type(preset).__name__}"
        raise TypeError(msg)
    for name in PRESETS:
        if preset.strip().upper() == name:
            return name
    msg = f"Unknown Geneformer preset {preset!r}: the bundled presets are {', '.join(PRESETS)}."
    raise InputError(msg)


def _parse_kind(kind: object) -> Kind:
    if not isinstance(kind, str):
        msg = f"kind must be a str such as 'medians', got {type(kind).__name__}"
        raise TypeError(msg)
    for name in KINDS:
        if kind == name:
            return name
    msg = f"Unknown dictionary kind {kind!r}: choose one of {', '.join(KINDS)}."
    raise InputError(msg)


def output_name(preset: Preset, kind: Kind) -> str:
    """The bundled file of ``preset``/``kind`` relative to the data folder, e.g. ``V1/medians``.

    Parameters
    ----------
    preset, kind
        An already-validated preset and kind.

    Returns
    -------
    str
        ``"<preset>/<Geneformer stem>.json.gz"``, the key of that file in ``SOURCES.json``.
    """
    return f"{preset}/{FILE_STEMS[kind]}{_SUFFIX}"


def source_name(preset: Preset, kind: Kind) -> str:
    """The source pickle of ``preset``/``kind`` relative to Geneformer's dictionary folder.

    Parameters
    ----------
    preset, kind
        An already-validated preset and kind.

    Returns
    -------
    str
        For example ``"v2_gc104M/gene_median_dictionary_gc104M.pkl"``.
    """
    return f"{SOURCE_DIRS[preset]}/{FILE_STEMS[kind]}_{CORPORA[preset]}.pkl"


def bundled_path(preset: str, kind: str) -> Path:
    """Path of one bundled dictionary file (gzip-compressed JSON).

    Parameters
    ----------
    preset
        ``"V1"`` or ``"V2"`` (case-insensitive).
    kind
        ``"token_dictionary"``, ``"medians"``, ``"name_id"`` or ``"gene_mapping"``.

    Returns
    -------
    pathlib.Path
        The file inside the installed package. Nothing is read: the result is a path, and
        there is no Dask involvement (no laziness or chunking applies).

    Raises
    ------
    InputError
        (a ``ValueError``) If ``preset`` or ``kind`` is unknown; the message lists the valid ones.
    TypeError
        If either is not a ``str``.
    """
    return PACKAGE_DIR / output_name(_parse_preset(preset), _parse_kind(kind))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_sources(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / SOURCES_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        outputs: dict[str, dict[str, Any]] = record["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        msg = f"Cannot read {path}: {type(err).__name__}: {err}; {_REBUILD}."
        raise InputError(msg) from err
    return outputs


@functools.cache
def _sources() -> dict[str, dict[str, Any]]:
    return _read_sources(PACKAGE_DIR)


def _checked_bytes(directory: Path, name: str, entry: dict[str, Any]) -> bytes:
    """The bytes of one bundled file, after checking its size and SHA-256 against its record."""
    path = directory / name
    try:
        raw = path.read_bytes()
    except OSError as err:
        msg = f"Bundled Geneformer file {path} cannot be read ({err.strerror}); {_REBUILD}."
        raise InputError(msg) from err
    if len(raw) != entry["size"] or _sha256(raw) != entry["sha256"]:
        msg = (
            f"Bundled Geneformer file {path} does not match its SHA-256 in {SOURCES_FILE} "
            f"(damaged or edited); {_REBUILD}."
        )
        raise InputError(msg)
    return raw


@functools.cache
def _load_cached(preset: Preset, kind: Kind) -> dict[str, Any]:
    name = output_name(preset, kind)
    entry = _sources().get(name)
    if entry is None:
        msg = f"{PACKAGE_DIR / SOURCES_FILE} has no record of {name}; {_REBUILD}."
        raise InputError(msg)
    table = json.loads(gzip.decompress(_checked_bytes(PACKAGE_DIR, name, entry)))
    if not isinstance(table, dict) or len(table) != entry["entries"]:
        msg = f"Bundled Geneformer file {PACKAGE_DIR / name} is not the recorded table; {_REBUILD}."
        raise InputError(msg)
    return table


@overload
def load(preset: str, kind: Literal["token_dictionary"]) -> dict[str, int]: ...
@overload
def load(preset: str, kind: Literal["medians"]) -> dict[str, float]: ...
@overload
def load(preset: str, kind: Literal["name_id", "gene_mapping"]) -> dict[str, str]: ...
@overload
def load(preset: str, kind: str) -> dict[str, Any]: ...
def load(preset: str, kind: str) -> dict[str, Any]:
    """One of Geneformer's dictionaries, exactly as in its pickle, from flow's bundled copy.

    Parameters
    ----------
    preset
        ``"V1"`` (Genecorpus-30M dictionaries, ``*_gc30M.pkl``) or ``"V2"`` (``*_gc104M.pkl``);
        case-insensitive.
    kind
        ``"token_dictionary"`` (str -> int token ID), ``"medians"`` (Ensembl ID -> float
        nonzero median), ``"name_id"`` (gene symbol -> Ensembl ID) or ``"gene_mapping"``
        (Geneformer's ``ensembl_mapping_dict``: str -> Ensembl ID).

    Returns
    -------
    dict
        A fresh ``dict`` (the caller may modify it) equal to what
        :func:`flow._pickle.load_dict` returns for the source pickle: same keys in the same
        order, ``int`` values as ``int``, ``float`` values bit-for-bit. Eager and small (no Dask,
        no chunking): the file is read, checked against its SHA-256 and parsed once per process
        and cached; each call copies the cached table.

    Raises
    ------
    InputError
        (a ``ValueError``) If ``preset`` or ``kind`` is unknown (the message lists the valid
        ones), or if the bundled file is missing or does not match ``SOURCES.json``.
    TypeError
        If ``preset`` or ``kind`` is not a ``str``.

    Examples
    --------
    >>> mapping = load("V2", "gene_mapping")
    >>> mapping["GAPDH"]
    'ENSG00000111640'
    """
    return dict(_load_cached(_parse_preset(preset), _parse_kind(kind)))


def verify(*, directory: str | Path | None = None) -> None:
    """Check every bundled dictionary file against the checksums in ``SOURCES.json``.

    Parameters
    ----------
    directory
        The data folder to check (``V1/``, ``V2/`` and ``SOURCES.json``); default: the
        installed package's own. A folder written by ``python -m flow.geneformer.build
        --output DIR`` can be checked the same way.

    Returns
    -------
    None
        Eager: every file is read and hashed now (a few MB; no Dask, no chunking).

    Raises
    ------
    InputError
        If ``SOURCES.json`` is missing or does not list exactly one file per preset and kind,
        or if any file is missing, has another size or SHA-256 than recorded, or decompresses
        to other bytes than recorded (``json_sha256``). The message names the file.
    """
    root = PACKAGE_DIR if directory is None else Path(directory)
    outputs = _read_sources(root)
    expected = {output_name(p, k) for p in PRESETS for k in KINDS}
    if set(outputs) != expected:
        msg = (
            f"{root / SOURCES_FILE} lists {sorted(outputs)}, expected one file per preset and "
            f"kind ({sorted(expected)}); {_REBUILD}."
        )
        raise InputError(msg)
    for name in sorted(expected):
        entry = outputs[name]
        payload = gzip.decompress(_checked_bytes(root, name, entry))
        if _sha256(payload) != entry["json_sha256"]:
            msg = f"Bundled Geneformer file {root / name} decompresses to unrecorded content; {_REBUILD}."
            raise InputError(msg)
