"""Bounds on what a request body may hold, checked while it is parsed (never after work on it).

``parse_json`` turns a body into Python values with every number's digits, every object's key
count, every list's length and the nesting depth bounded, and every string checked to be
encodable (JSON's ``\\ud800`` escape can carry a lone UTF-16 surrogate, which no tokenizer
takes). Field-level limits (``model``, ``stop``, names) live on the request shapes in
protocol.py and use the constants here, so docs/serve.md's table has one source.
"""

from __future__ import annotations

import json
import re
from typing import Any, Union

from caa_local.serve.errors import ApiError, clip

MAX_DEPTH = 32  # a chat request nests 5 deep; tools' JSON schemas a few more
MAX_NUMBER_CHARS = 40  # any float or 64-bit integer fits; "1" * 5000 does not
MAX_KEYS = 256  # keys of one JSON object
MAX_ITEMS = 4096  # items of one JSON list (messages have their own, smaller limit)
MAX_NAME_CHARS = 256  # `model`, a vector id, a layer spec, one stop string
MAX_STOPS = 4  # as OpenAI
MAX_CONTENT_PARTS = 256  # parts of one message's content list
MAX_LAYER_ITEMS = 1024  # a layers list (more than any model's blocks)

Path = Union[tuple[Any, Union[str, int]], None]  # a node's (parent path, key or index)
_SURROGATE = re.compile("[\ud800-\udfff]")


class _NumberTooLong(Exception):
    pass


def _number(kind: type) -> Any:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise _NumberTooLong(len(text))
        return kind(text)
    return parse


_LONG_NUMBER = re.compile(r"-?[0-9][0-9.eE+-]{%d,}" % MAX_NUMBER_CHARS)
_LAST_KEY = re.compile(r'"([^"\\]{1,%d})"\s*:\s*\[?\s*$' % MAX_NAME_CHARS)


def _number_error(text: str, size: int) -> ApiError:
    """Name the key whose value is the long number, when the text before it shows one."""
    match = _LONG_NUMBER.search(text)
    key = _LAST_KEY.search(text[max(0, match.start() - MAX_NAME_CHARS - 8):match.start()]) if match else None
    param = key.group(1) if key else None
    return ApiError(f"{param or 'request body'}: a number of {size} characters; numbers may have at most "
                    f"{MAX_NUMBER_CHARS}", "invalid_request", param, "number_too_long")


_DECODER = json.JSONDecoder(parse_int=_number(int), parse_float=_number(float))


def parse_json(body: bytes) -> Any:
    """The body as JSON values, within the bounds above; an ApiError naming what broke them."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(f"request body is not UTF-8: byte {err.start}", "invalid_request", None,
                       "invalid_json") from None
    try:
        data = _DECODER.decode(text)
    except RecursionError:
        raise _too_deep() from None
    except _NumberTooLong as err:
        raise _number_error(text, err.args[0]) from None
    except ValueError as err:
        raise ApiError(f"request body is not valid JSON: {err}", "invalid_request", None, "invalid_json") from None
    check_shape(data)
    return data


def _too_deep() -> ApiError:
    return ApiError(f"request body nests deeper than {MAX_DEPTH} levels", "invalid_request", None, "too_deep")


def check_shape(data: Any) -> None:
    """Depth, key and item counts, and strings, of parsed JSON (iterative: no recursion to exhaust).

    A node's path is kept as a link to its parent and spelled out only for an error, so a long
    key under a long list costs nothing.
    """
    stack: list[tuple[Any, Path, int]] = [(data, None, 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _shape_error(path, "a lone UTF-16 surrogate is not text", "invalid_text")
        elif isinstance(value, dict):
            if depth >= MAX_DEPTH:
                raise _too_deep()
            if len(value) > MAX_KEYS:
                raise _shape_error(path, f"an object with {len(value)} keys; at most {MAX_KEYS}", "too_many_keys")
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise _shape_error(path, "a key holds a lone UTF-16 surrogate", "invalid_text")
                stack.append((item, (path, key), depth + 1))
        elif isinstance(value, list):
            if depth >= MAX_DEPTH:
                raise _too_deep()
            if len(value) > MAX_ITEMS:
                raise _shape_error(path, f"a list of {len(value)} items; at most {MAX_ITEMS}", "too_many_items")
            stack.extend((item, (path, i), depth + 1) for i, item in enumerate(value))


def spell(path: Path) -> str:
    """('messages', 0, 'content') spelled as a parameter: messages[0].content."""
    parts: list[str | int] = []
    while path is not None:
        path, part = path
        parts.append(part)
    out = ""
    for part in reversed(parts):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _shape_error(path: Path, problem: str, code: str) -> ApiError:
    param = clip(spell(path)) or None
    return ApiError(f"{param or 'request body'}: {problem}", "invalid_request", param, code)
