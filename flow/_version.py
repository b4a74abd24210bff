"""The version of flow (its own module, so that every layer can record it in the stores)."""

from __future__ import annotations

__version__ = "0.1.0"
