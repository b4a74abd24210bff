"""Convert Geneformer's dictionary pickles into flow's bundled, code-free package data.

Run from the repository::

    python -m flow.geneformer.build [SOURCE_DIR] [--output DIR]

``SOURCE_DIR`` holds Geneformer's pickles as ``v1_gc30M/*_gc30M.pkl`` and
``v2_gc104M/*_gc104M.pkl`` (default: ``$FLOW_SHARED_DATA/geneformer``, else
``../shared/data/geneformer`` beside the repository). The pickles are read with the restricted
unpickler :func:`flow._pickle.load_dict`, never with :func:`pickle.load`. Each of the eight
dictionaries is written as ``DIR/<preset>/<name>.json.gz`` (default ``DIR``: this package's
folder) and ``DIR/SOURCES.json`` records the checksums.

The output is deterministic, so a rerun gives byte-identical files:

- JSON: one object, keys in the pickle's own order, one entry per line, UTF-8, ints as ints and
  floats written with Python's ``repr`` (which round-trips every float64 exactly); NaN and
  infinities are refused. Each table is decoded again and compared with the pickle's,
  value types and float bits included, before anything is written.
- gzip: level 9, ``mtime`` 0, no file name in the header. Compressed bytes depend on the zlib
  library too; its version is recorded in ``SOURCES.json``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from flow._pickle import load_dict
from flow.errors import FlowError, InputError
from flow.geneformer import (
    CORPORA,
    KINDS,
    PACKAGE_DIR,
    PRESETS,
    SOURCES_FILE,
    output_name,
    source_name,
)

__all__ = ["build", "default_source_dir", "encode_table", "gzip_bytes", "main"]

#: gzip compression level of the bundled files (fixed: the bytes depend on it).
GZIP_LEVEL: Final = 9
_UPSTREAM: Final = "https://huggingface.co/ctheodoris/Geneformer"


def default_source_dir() -> Path:
    """Geneformer's dictionary folder: ``$FLOW_SHARED_DATA/geneformer``, else the shared data.

    Returns
    -------
    pathlib.Path
        ``$FLOW_SHARED_DATA/geneformer`` when that variable is set, otherwise
        ``../shared/data/geneformer`` relative to the repository holding this package.
    """
    shared = os.environ.get("FLOW_SHARED_DATA")
    if shared:
        return Path(shared) / "geneformer"
    return PACKAGE_DIR.parents[1].parent / "shared" / "data" / "geneformer"


def _identical(a: object, b: object) -> bool:
    """Same type and value; floats compared bit for bit (``-0.0`` differs from ``0.0``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex()
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def encode_table(table: Mapping[str, Any], *, source: str | os.PathLike[str]) -> bytes:
    """Deterministic UTF-8 JSON of a dictionary that decodes back to exactly ``table``.

    Parameters
    ----------
    table
        A dictionary as :func:`flow._pickle.load_dict` returns it: ``str`` keys, values
        ``str``/``int``/``float``/``bool`` or lists of those.
    source
        The file ``table`` came from, named in error messages.

    Returns
    -------
    bytes
        One JSON object, keys in ``table``'s order, one entry per line. Eager, no Dask.

    Raises
    ------
    InputError
        If a value is NaN or infinite (not JSON) or the JSON would not decode to ``table``
        with the same keys, order, value types and float bits.
    """
    try:
        text = json.dumps(
            table, ensure_ascii=False, allow_nan=False, indent=0, separators=(",", ":")
        )
    except (ValueError, TypeError) as err:
        msg = f"{os.fspath(source)}: cannot be written as exact JSON ({err}); expected finite numbers and strings."
        raise InputError(msg) from err
    payload = (text + "\n").encode("utf-8")
    decoded = json.loads(payload)
    same = list(decoded) == list(table) and all(
        _identical(decoded[key], value) for key, value in table.items()
    )
    if not same:
        msg = (
            f"{os.fspath(source)}: its JSON form does not decode to the same table; not converted."
        )
        raise InputError(msg)
    return payload


def gzip_bytes(payload: bytes) -> bytes:
    """gzip ``payload`` reproducibly: level :data:`GZIP_LEVEL`, ``mtime`` 0, no file name.

    Parameters
    ----------
    payload
        The bytes to compress.

    Returns
    -------
    bytes
        A gzip member whose bytes depend only on ``payload`` and the zlib library. Eager.
    """
    buffer = io.BytesIO()
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=buffer, compresslevel=GZIP_LEVEL, mtime=0
    ) as fh:
        fh.write(payload)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _missing_sources(source_dir: Path) -> list[str]:
    return [
        source_name(p, k)
        for p in PRESETS
        for k in KINDS
        if not (source_dir / source_name(p, k)).is_file()
    ]


def build(
    source_dir: str | os.PathLike[str] | None = None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Convert the eight Geneformer pickles and write them with ``SOURCES.json``.

    Parameters
    ----------
    source_dir
        Folder with ``v1_gc30M/`` and ``v2_gc104M/``; default :func:`default_source_dir`.
    output_dir
        Where to write ``V1/``, ``V2/`` and ``SOURCES.json``; default: this package's folder
        (the bundled data). Files are replaced atomically.

    Returns
    -------
    dict
        The record written to ``SOURCES.json``. Eager: reads the pickles and writes the files
        now (no Dask, no chunking).

    Raises
    ------
    InputError
        If a pickle is missing (all are checked before anything is written), refused by the
        restricted unpickler, or holds a value that JSON cannot carry exactly.
    """
    src = Path(default_source_dir() if source_dir is None else source_dir)
    out = Path(PACKAGE_DIR if output_dir is None else output_dir)
    missing = _missing_sources(src)
    if missing:
        msg = (
            f"Geneformer pickles not found in {src}: {', '.join(missing)}; pass the folder holding "
            "v1_gc30M/ and v2_gc104M/ (or set FLOW_SHARED_DATA)."
        )
        raise InputError(msg)
    outputs: dict[str, dict[str, Any]] = {}
    for preset in PRESETS:
        for kind in KINDS:
            source = src / source_name(preset, kind)
            raw = source.read_bytes()
            table = load_dict(source)
            payload = encode_table(table, source=source)
            packed = gzip_bytes(payload)
            name = output_name(preset, kind)
            _write_atomic(out / name, packed)
            outputs[name] = {
                "preset": preset,
                "kind": kind,
                "corpus": CORPORA[preset],
                "source": source_name(preset, kind),
                "source_sha256": hashlib.sha256(raw).hexdigest(),
                "source_size": len(raw),
                "sha256": hashlib.sha256(packed).hexdigest(),
                "size": len(packed),
                "json_sha256": hashlib.sha256(payload).hexdigest(),
                "entries": len(table),
            }
    record = {
        "about": (
            "Geneformer's dictionaries (Apache-2.0, see NOTICE and LICENSE-Geneformer), converted "
            "from its pickles by `python -m flow.geneformer.build`; do not edit by hand."
        ),
        "upstream": _UPSTREAM,
        "format": {
            "content": "one UTF-8 JSON object per file, keys in the pickle's order",
            "gzip_level": GZIP_LEVEL,
            "gzip_mtime": 0,
            "zlib": zlib.ZLIB_RUNTIME_VERSION,
        },
        "outputs": outputs,
    }
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    _write_atomic(out / SOURCES_FILE, text.encode("utf-8"))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of ``python -m flow.geneformer.build``.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success; 2 with a one-line message on standard error when the input is unusable.
    """
    parser = argparse.ArgumentParser(
        prog="python -m flow.geneformer.build",
        description="Convert Geneformer's dictionary pickles into flow's bundled JSON files.",
    )
    parser.add_argument(
        "source_dir",
        nargs="?",
        type=Path,
        default=None,
        help="folder with v1_gc30M/ and v2_gc104M/ (default: $FLOW_SHARED_DATA/geneformer "
        "or ../shared/data/geneformer)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="output folder (default: the flow package)"
    )
    args = parser.parse_args(argv)
    try:
        record = build(args.source_dir, output_dir=args.output)
    except FlowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = PACKAGE_DIR if args.output is None else args.output
    for name, entry in record["outputs"].items():
        print(f"{name:40} {entry['entries']:>9,} entries {entry['size']:>11,} bytes")
    print(f"wrote {len(record['outputs'])} files and {SOURCES_FILE} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
