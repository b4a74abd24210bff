"""Errors and warnings raised by flow.

Every error is both a :class:`FlowError` and the builtin it specialises, so callers can
catch either (``except ValueError`` keeps working).
"""

from __future__ import annotations

__all__ = [
    "ChunkingError",
    "DamagedChunkError",
    "DiskFullError",
    "FlowError",
    "FlowWarning",
    "IncompleteStoreError",
    "InputError",
    "OutputBusyError",
    "SchemaError",
    "StoreNotFoundError",
    "VocabularyError",
]


class FlowError(Exception):
    """Base class for flow errors."""


class InputError(FlowError, ValueError):
    """The input data is unusable: bad counts, missing IDs, corrupt or unknown file."""


class SchemaError(FlowError, ValueError):
    """A Zarr store's layout or attributes are not what this flow store type needs."""


class StoreNotFoundError(FlowError, FileNotFoundError):
    """No flow store at the given path."""


class IncompleteStoreError(FlowError, RuntimeError):
    """A store was not finished (its writer was stopped); rerun the same command to finish it."""


class OutputExistsError(FlowError, FileExistsError):
    """The output path holds something a run would replace (pass ``overwrite`` to allow it)."""


class DamagedChunkError(FlowError, ValueError):
    """A stored chunk fails its checksum: its bytes changed after it was written.

    ``store``, ``array`` and ``chunk`` name it (the chunk key inside the array, ``c/0/3``).
    """

    def __init__(self, message: str, store: str = "", array: str = "", chunk: str = "") -> None:
        super().__init__(message, store, array, chunk)
        self.store, self.array, self.chunk = store, array, chunk

    def __str__(self) -> str:
        return str(self.args[0])


class OutputBusyError(FlowError, BlockingIOError):
    """Another run is writing the same output (it holds the output's claim)."""


class DiskFullError(FlowError, OSError):
    """The output's file system is full (or over quota); free space and rerun to finish."""


class VocabularyError(FlowError, ValueError):
    """Gene identifiers and the vocabulary or median set do not fit together."""


class ChunkingError(FlowError, ValueError):
    """Array chunking violates a stage's contract."""


class FlowWarning(UserWarning):
    """Something a user should know about, but not an error (e.g. barcodes made unique)."""
