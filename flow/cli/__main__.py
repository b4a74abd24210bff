"""``python -m flow.cli``: the flow command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
