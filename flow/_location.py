"""Where something lives: a local path or an fsspec URL, with its storage options, parsed once.

A :class:`Location` is made where a user's words enter (the CLI, or the first public call) and
passed down; nothing below re-checks ``"://"`` or repacks ``storage_options``. Local paths keep
using the operating system directly; a URL is resolved with ``fsspec.core.url_to_fs`` at each
use (fsspec caches filesystem instances), so a Location pickles as two small values and each
task opens its own handles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import zarr

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

__all__ = ["Located", "Location", "LocationLike"]


@dataclass(frozen=True)
class Location:
    """A local path or fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``, ...).

    Parameters
    ----------
    path
        The path or URL as the user gave it (kept as given: messages and recorded sources
        show it so).
    storage_options
        fsspec options of a URL (credentials, endpoint, ...); ignored for local paths.
    """

    path: str
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        where: str | os.PathLike[str] | Location,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Location:
        """``where`` as a Location (a Location is returned as it is)."""
        if isinstance(where, Location):
            return where
        return cls(os.fspath(where), dict(storage_options) if storage_options else None)

    @property
    def is_url(self) -> bool:
        """Whether the path is written as a URL (``protocol://...``, ``file://`` included)."""
        return "://" in self.path

    @property
    def is_local(self) -> bool:
        """Whether this is on the local file system (a plain path or a ``file://`` URL)."""
        return not self.is_url or self.path.startswith("file://")

    @property
    def url(self) -> str:
        """The absolute local path, or the URL unchanged: the same from any working directory."""
        return self.path if self.is_url else os.path.abspath(self.path)

    @property
    def local_path(self) -> str:
        """The path on the local file system (``file://`` removed); only for local locations."""
        return self.path.removeprefix("file://")

    @property
    def options(self) -> dict[str, Any] | None:
        """Storage options to hand to fsspec or Zarr: a dict for a URL, None for a local path."""
        return dict(self.storage_options or {}) if self.is_url else None

    @property
    def store_options(self) -> dict[str, Any] | None:
        """Storage options for Zarr: None for local paths and ``file://`` URLs."""
        return None if self.is_local else dict(self.storage_options or {})

    def fs(self) -> tuple[AbstractFileSystem, str]:
        """The fsspec filesystem of this location and the path inside it."""
        fs, root = fsspec.core.url_to_fs(self.path, **(self.options or {}))
        return fs, root

    @property
    def name(self) -> str:
        """The last part of the path or URL, without a trailing ``/`` (or an https query)."""
        path = self.path
        if self.is_url:
            if path.startswith(("http://", "https://")):
                path = path.split("?", 1)[0].split("#", 1)[0]
            return path.rstrip("/").rsplit("/", 1)[-1]
        return os.path.basename(path.rstrip("/" + os.sep))

    def join(self, name: str) -> Location:
        """``name`` inside this directory, with the same storage options."""
        if not self.is_url:
            return Location(os.path.join(self.path, name), self.storage_options)
        sep = "" if self.path.endswith("/") else "/"
        return Location(self.path + sep + name, self.storage_options)

    def exists(self) -> bool:
        """Whether anything is at this location."""
        if self.is_local:
            return os.path.exists(self.local_path)
        fs, root = self.fs()
        return bool(fs.exists(root))

    def makedirs(self) -> None:
        """Create this local directory (and its parents); object stores need none."""
        if self.is_local:
            os.makedirs(self.local_path, exist_ok=True)

    def open_group(self, *, mode: str = "r", zarr_format: int | None = None) -> zarr.Group:
        """The Zarr group at this location (no flow checks: see :mod:`flow._io`)."""
        return zarr.open_group(
            self.url,
            mode=mode,  # type: ignore[arg-type]
            zarr_format=zarr_format,  # type: ignore[arg-type]
            storage_options=self.store_options,
        )

    def __str__(self) -> str:
        return self.path


#: What public functions accept where a place is meant.
LocationLike = str | os.PathLike[str] | Location


class Located:
    """For stores that hold a :class:`Location` (as ``self.location``): its URL and options."""

    location: Location

    @property
    def url(self) -> str:
        """Where the store is: an absolute local path or a URL."""
        return self.location.url

    @property
    def storage_options(self) -> Mapping[str, Any] | None:
        """The fsspec options the store was opened with (credentials: not in the repr)."""
        return self.location.storage_options
