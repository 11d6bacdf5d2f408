"""Parsers for what users type: `NAME|FILE[:SCALE]` vector specs, scales, multiplier lists and
the chat's `/params key=value` values. Each raises one clear CaaError; the CLI and the chat
REPL share them, so a spec means the same everywhere.
"""

from __future__ import annotations

import math
from pathlib import Path

from caa_local.core.errors import CaaError
from caa_local.core.steering import check_multipliers

SPEC_HINT = "use NAME|FILE[:SCALE], e.g. sentiment:2"
# /params: name -> (type, lowest allowed, whether the lowest is allowed, highest)
PARAMS: dict[str, tuple[type, float, bool, float]] = {
    "temperature": (float, 0.0, True, math.inf), "top_p": (float, 0.0, False, 1.0),
    "top_k": (int, 0, True, 2**31 - 1), "min_p": (float, 0.0, True, 1.0),
    "repeat_penalty": (float, 0.0, False, math.inf), "max_tokens": (int, 1, True, math.inf),
    "seed": (int, 0, True, 2**32 - 1),
}


def parse_scale(text: str, where: str = "scale", hint: str = "") -> float:
    """A finite float, or a CaaError naming ``where``."""
    note = f" ({hint})" if hint else ""
    try:
        value = float(text)
    except ValueError:
        raise CaaError(f"{where}: {text!r} is not a number{note}") from None
    if not math.isfinite(value):
        raise CaaError(f"{where}: expected a finite number, got {text!r}")
    return value


def split_vector_spec(spec: str) -> tuple[str, float | None]:
    """'NAME|FILE[:SCALE]' -> (NAME|FILE, SCALE or None): the one parser for vector specs.

    A colon belongs to the path when the whole spec is an existing file or what follows the
    last colon looks like a path; otherwise what follows it must be a number.
    """
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or "/" in tail or "\\" in tail or Path(spec).exists():
        return spec, None
    return head, parse_scale(tail, f"vector {spec!r}", SPEC_HINT)


def parse_multipliers(text: str) -> list[float]:
    """'-1,-0.5,0,0.5,1' -> sorted finite floats; anything else is one clear CaaError."""
    values = []
    for part in text.split(","):
        try:
            values.append(float(part.strip()))
        except ValueError:
            raise CaaError(
                f"bad multipliers list {text!r}: {part.strip()!r} is not a number "
                "(expected e.g. '-1,-0.5,0,0.5,1')"
            ) from None
    return check_multipliers(values)


def parse_param(key: str, value: str) -> float | int:
    """One `/params key=value` value, checked against PARAMS."""
    if key not in PARAMS:
        raise CaaError(f"/params: expected key=value with key in {', '.join(PARAMS)}, got {key!r}")
    kind, lo, lo_ok, hi = PARAMS[key]
    try:
        number = kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise CaaError(f"/params {key}: expected {expected}, got {value!r}") from None
    if not math.isfinite(number) or not (lo <= number if lo_ok else lo < number) or number > hi:
        low = f"{'>=' if lo_ok else '>'} {lo:g}"
        raise CaaError(f"/params {key}: expected a value {low}" + (f" and <= {hi:g}" if hi < math.inf else "")
                       + f", got {value!r}")
    return number
