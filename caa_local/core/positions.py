"""Which prompt positions steering touches: the one list of choices, cheap to import (the CLI's
--positions option reads it before anything heavy loads).

- ``response``: the paper's mask, everything before the end of the user's instruction is
  decoded unsteered, the instruction's last token and everything after it steered;
- ``all``: every token steered, as llama.cpp's own CLI does.
"""

from __future__ import annotations

from caa_local.core.errors import CaaError

POSITIONS = ("response", "all")


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise CaaError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    return positions
