"""Bounds-checked walk of a GGUF header, before gguf's reader sees an untrusted file.

gguf's GGUFReader trusts the header: a huge array length makes it loop forever past the end
of the file, and short reads come back as short memmap slices instead of errors. So before the
reader sees a file, walk its header with bounds checks, applying the rules of llama.cpp's own
reader (ggml/src/gguf.cpp): versions 2-3, little-endian, no nested arrays, tensor names under
64 bytes, at most 4 dims, general.alignment a uint32 power of two, tensor data packed in order
at aligned offsets and present in the file. A file that passes is one llama.cpp can parse.
"""

from __future__ import annotations

import math
import mmap
import struct

from caa_local.core.errors import VectorFileError

MAX_LAYER = 1024
MAX_ARRAY_LEN = 1 << 16  # metadata arrays: gguf's reader builds one numpy object per element

GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
_GGUF_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGML_MAX_NAME = 64  # llama.cpp rejects tensor names of 64 bytes or more
_GGML_MAX_DIMS = 4
_DEFAULT_ALIGNMENT = 32
_KEY_ALIGNMENT = "general.alignment"
HEADER_BYTES = 24  # magic, version, tensor count, kv count
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


def short(text: object, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def skip(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise VectorFileError(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {self.size - self.pos} left"
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.skip(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.skip(8, what))[0]

    def text(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        start = self.skip(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise VectorFileError(f"{what} at offset {start} is not valid UTF-8") from None

    def left(self) -> int:
        return self.size - self.pos


def _check_count(count: int, min_bytes: int, cur: _Cursor, what: str, limit: int) -> None:
    if count > limit or count * min_bytes > cur.left():
        raise VectorFileError(
            f"header claims {count} {what}, but the file has only {cur.size} bytes "
            f"(at most {min(limit, cur.left() // min_bytes)} fit)"
        )


def _check_kv_value(cur: _Cursor, key: str, vtype: int) -> int | None:
    """Skip one value; return it when it is a uint32 (for general.alignment)."""
    where = f"key {short(key)}"
    if vtype in _GGUF_SCALAR_SIZE:
        start = cur.skip(_GGUF_SCALAR_SIZE[vtype], f"value of {where}")
        return struct.unpack_from("<I", cur.buf, start)[0] if vtype == _GGUF_UINT32 else None
    if vtype == _GGUF_STRING:
        cur.text(f"value of {where}")
        return None
    if vtype != _GGUF_ARRAY:
        raise VectorFileError(f"{where} has unknown value type {vtype}")
    etype = cur.u32(f"array type of {where}")
    count = cur.u64(f"array length of {where}")
    if etype == _GGUF_STRING:
        _check_count(count, 8, cur, f"strings in {where}", MAX_ARRAY_LEN)
        for _ in range(count):
            cur.text(f"string in {where}")
    elif etype in _GGUF_SCALAR_SIZE:
        _check_count(count, _GGUF_SCALAR_SIZE[etype], cur, f"values in {where}", MAX_ARRAY_LEN)
        cur.skip(count * _GGUF_SCALAR_SIZE[etype], f"array {where}")
    else:
        raise VectorFileError(f"{where} is an array of unsupported type {etype}")
    return None


def check_layout(buf: mmap.mmap, size: int) -> None:
    """Raise VectorFileError unless the file's header and data layout are what llama.cpp reads."""
    import gguf

    cur = _Cursor(buf, size)
    magic = buf[cur.skip(4, "magic") : 4]
    if magic != GGUF_MAGIC:
        raise VectorFileError(f"not a GGUF file: starts with {magic!r}, expected {GGUF_MAGIC!r}")
    version = cur.u32("version")
    if version and version & 0xFFFF == 0:
        raise VectorFileError(
            f"GGUF version {version:#x}: a big-endian file, llama.cpp cannot read it"
        )
    if version not in _GGUF_VERSIONS:
        raise VectorFileError(f"GGUF version {version}: expected 2 or 3")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("key count")
    _check_count(n_kv, _MIN_KV_BYTES, cur, "keys", 1 << 20)
    _check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, cur, "tensors", MAX_LAYER)

    keys: set[str] = set()
    alignment = _DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.text(f"key {i}")
        if key in keys:
            raise VectorFileError(f"key {short(key)} appears twice")
        keys.add(key)
        vtype = cur.u32(f"value type of key {short(key)}")
        value = _check_kv_value(cur, key, vtype)
        if key == _KEY_ALIGNMENT:
            if value is None or value == 0 or value & (value - 1):
                raise VectorFileError(
                    f"{_KEY_ALIGNMENT}: expected a uint32 power of two, "
                    f"got type {vtype} value {value}"
                )
            alignment = value

    names: set[str] = set()
    expected_offset = 0  # llama.cpp: each tensor starts where the previous (padded) one ends
    for i in range(n_tensors):
        name = cur.text(f"name of tensor {i}")
        where = f"tensor {short(name)}"
        if len(name.encode("utf-8")) >= _GGML_MAX_NAME:
            raise VectorFileError(
                f"{where}: name is longer than llama.cpp's {_GGML_MAX_NAME - 1} bytes"
            )
        if name in names:
            raise VectorFileError(f"{where} appears twice")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {where}")
        if n_dims > _GGML_MAX_DIMS:
            raise VectorFileError(
                f"{where} has {n_dims} dimensions, llama.cpp allows {_GGML_MAX_DIMS}"
            )
        dims = [cur.u64(f"shape of {where}") for _ in range(n_dims)]
        n_elements = math.prod(dims)
        if any(d >= 1 << 63 for d in dims) or n_elements >= 1 << 63:
            raise VectorFileError(f"{where} has an impossible shape {dims}")
        type_id = cur.u32(f"type of {where}")
        try:
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        except (ValueError, KeyError):
            raise VectorFileError(f"{where} has unknown tensor type {type_id}") from None
        if dims and dims[0] % block_size:
            raise VectorFileError(f"{where}: {dims[0]} values is not a whole number of blocks")
        offset = cur.u64(f"data offset of {where}")
        if offset != expected_offset:
            raise VectorFileError(
                f"{where} has data offset {offset}, expected {expected_offset} "
                "(llama.cpp needs tensor data packed in order)"
            )
        expected_offset += _pad(n_elements // block_size * type_size, alignment)
    data_start = _pad(cur.pos, alignment)
    if data_start + expected_offset > size:
        raise VectorFileError(
            f"truncated: tensor data needs {data_start + expected_offset} bytes, "
            f"the file has {size}"
        )
