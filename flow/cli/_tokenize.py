"""Sub-commands added by a later stage."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the sub-commands of this module (none yet)."""
