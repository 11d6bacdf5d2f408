"""The server's errors: one table from kind to (OpenAI error type, HTTP status), one body builder.

Every error a client sees, ours or the framework's (422 validation, router 404/405, 413 from the
body limit), leaves as ``{"error": {"message", "type", "param", "code"}}`` through ``error_body``.
"""

from __future__ import annotations

import re
from typing import Any

# kind -> (OpenAI "type", HTTP status), as llama.cpp's format_error_response lays them out
KINDS: dict[str, tuple[str, int]] = {
    "invalid_request": ("invalid_request_error", 400),
    "context_length": ("invalid_request_error", 400),
    "authentication": ("authentication_error", 401),
    "permission": ("permission_error", 403),
    "not_found": ("not_found_error", 404),
    "method_not_allowed": ("invalid_request_error", 405),
    "timeout": ("invalid_request_error", 408),
    "conflict": ("invalid_request_error", 409),
    "too_large": ("invalid_request_error", 413),
    "unsupported_media_type": ("invalid_request_error", 415),
    "validation": ("invalid_request_error", 422),
    "not_implemented": ("not_implemented_error", 501),
    "unavailable": ("unavailable_error", 503),
    "server": ("server_error", 500),
}

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "literal"}
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


class ApiError(Exception):
    """An error for the client: a kind from KINDS, a message, the offending parameter."""

    def __init__(self, message: str, kind: str = "invalid_request", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    @property
    def status(self) -> int:
        return KINDS[self.kind][1]

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    # Memory addresses in a message say nothing to a client and leak layout.
    return {"error": {"message": _ADDRESS.sub("0x...", message), "type": KINDS[kind][0],
                      "param": param, "code": code}}


def clip(text: str, limit: int = 80) -> str:
    """``text`` for an error message: never more than ``limit`` characters of what a client sent."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def status_kind(status: int) -> str:
    """The kind for a bare HTTP status (framework errors carry only the status)."""
    for kind, (_, code) in KINDS.items():
        if code == status and kind not in ("context_length",):
            return kind
    return "server" if status >= 500 else "invalid_request"


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's error list -> one message naming the first problem, and its parameter path."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    # Union members appear in the path as type tags ("str", "list[TextPart]"); a client needs the field.
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and str(part) not in _TYPE_TAGS
           and "[" not in str(part) and not str(part).startswith("constrained-")]
    param = ""
    for part in loc:
        param += f"[{part}]" if part.isdigit() else (f".{part}" if param else part)
    param = clip(param)
    message = str(first.get("msg", "invalid value"))
    if "input" in first and first.get("type") != "missing":
        shown = repr(first["input"])
        message += f", got {shown[:80] + '...' if len(shown) > 80 else shown}"
    return (f"{param}: {message}" if param else message), (param or None)
