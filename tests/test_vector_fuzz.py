"""Property-based fuzzing of ControlVector.load, the GGUF reader and validator.

Every case starts from a valid control-vector file and damages it: truncation, bit flips,
byte overwrites, huge numbers patched into the header, wrong key types, odd tensor names,
non-F32 types, bad shapes and offsets, NaN/Inf, missing keys. For every case ``load`` must
either raise VectorFileError (no other exception, no hang) or return a well-formed vector;
where the damage makes the file unusable for llama.cpp, it must raise.

Files are built byte by byte here (``build``), so each field's offset is known. The last
test hands every accepted file to llama.cpp's own GGUF reader (libggml-base from
llama-cpp-python, in a subprocess) and checks it reads the same layers and values.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from caa_local.core.errors import VectorFileError
from caa_local.core.vector import ControlVector

# -- raw GGUF building ------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
        BOOL: "<B", U64: "<Q", I64: "<q", F64: "<d"}
# ggml type id -> (block size, bytes per block), for the ids used here
_GGML_SIZES = {0: (1, 4), 1: (1, 2), 8: (32, 34), 28: (1, 8), 30: (1, 2), 24: (1, 1)}
ALIGN = 32


def gstr(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def scalar(vtype: int, value: object) -> bytes:
    return struct.pack(_FMT[vtype], value)


def array(etype: int, items: list[object]) -> bytes:
    body = b"".join(gstr(x) if etype == STR else scalar(etype, x)  # type: ignore[arg-type]
                    for x in items)
    return struct.pack("<IQ", etype, len(items)) + body


@dataclass
class Tensor:
    name: bytes
    dims: list[int]
    ggml_type: int = 0
    data: bytes = b""
    offset: int | None = None  # None: where llama.cpp expects it (packed, aligned)


@dataclass
class Spec:
    kvs: list[tuple[bytes, int, bytes]]  # (key, value type, encoded value)
    tensors: list[Tensor]
    version: int = 3
    alignment: int = ALIGN  # used for packing; set general.alignment to match
    n_tensors: int | None = None
    n_kv: int | None = None
    values: dict[int, np.ndarray] = field(default_factory=dict)  # what a valid file holds


def _declared_nbytes(t: Tensor) -> int:
    block, size = _GGML_SIZES.get(t.ggml_type, (1, 4))
    return math.prod(t.dims) // block * size


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def build(spec: Spec) -> tuple[bytes, dict[str, int]]:
    """Serialize ``spec``; also return the byte offset of every field by name."""
    out = bytearray(b"GGUF")
    offs: dict[str, int] = {}
    out += struct.pack("<I", spec.version)
    offs["n_tensors"] = len(out)
    out += struct.pack("<Q", len(spec.tensors) if spec.n_tensors is None else spec.n_tensors)
    offs["n_kv"] = len(out)
    out += struct.pack("<Q", len(spec.kvs) if spec.n_kv is None else spec.n_kv)
    for i, (key, vtype, payload) in enumerate(spec.kvs):
        offs[f"kv{i}.key_len"] = len(out)
        out += gstr(key)
        offs[f"kv{i}.type"] = len(out)
        out += struct.pack("<I", vtype)
        offs[f"kv{i}.value"] = len(out)
        out += payload
    packed = 0
    for i, t in enumerate(spec.tensors):
        offs[f"t{i}.name_len"] = len(out)
        out += gstr(t.name)
        offs[f"t{i}.n_dims"] = len(out)
        out += struct.pack("<I", len(t.dims))
        offs[f"t{i}.dims"] = len(out)
        out += b"".join(struct.pack("<Q", d) for d in t.dims)
        offs[f"t{i}.type"] = len(out)
        out += struct.pack("<I", t.ggml_type)
        offs[f"t{i}.offset"] = len(out)
        out += struct.pack("<Q", packed if t.offset is None else t.offset)
        packed += _pad(_declared_nbytes(t), spec.alignment)
    out += bytes(_pad(len(out), spec.alignment) - len(out))
    for i, t in enumerate(spec.tensors):
        offs[f"t{i}.data"] = len(out)
        out += t.data
        out += bytes(_pad(len(t.data), spec.alignment) - len(t.data))
    return bytes(out), offs


def valid_spec(layers: list[int], n_embd: int, seed: int, hint: str = "llama",
               extra: bool = True) -> Spec:
    rng = np.random.default_rng(seed)
    values = {layer: rng.standard_normal(n_embd).astype(np.float32) for layer in layers}
    kvs = [
        (b"general.architecture", STR, gstr("controlvector")),
        (b"controlvector.model_hint", STR, gstr(hint)),
        (b"controlvector.layer_count", U32, scalar(U32, len(layers))),
    ]
    if extra:  # the kinds of keys a real file may carry: ours, repeng's, arrays
        kvs += [
            (b"caa.behavior", STR, gstr("sycophancy")),
            (b"caa.layers", ARR, array(U32, layers)),
            (b"caa.notes", ARR, array(STR, ["a", "", "ünï"])),
        ]
    tensors = [Tensor(f"direction.{layer}".encode(), [n_embd], 0, values[layer].tobytes())
               for layer in layers]
    return Spec(kvs, tensors, values=values)


# -- the property -----------------------------------------------------------------------------

ACCEPT, REJECT, EITHER = "accept", "reject", "either"
ACCEPTED: list[bytes] = []  # accepted files, checked against llama.cpp at the end
LOAD_TIMEOUT_S = 2.0
TEST_TIMEOUT_S = 120


class Hang(BaseException):
    """Raised by SIGALRM; a BaseException so that no `except Exception` can swallow it."""


@contextlib.contextmanager
def _alarm(seconds: float, what: str) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"{what} took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    previous = signal.setitimer(signal.ITIMER_REAL, seconds)[0]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if previous:  # re-arm an outer guard
            signal.setitimer(signal.ITIMER_REAL, previous)


@pytest.fixture(autouse=True)
def _test_timeout() -> Iterator[None]:
    with _alarm(TEST_TIMEOUT_S, "fuzz test"):
        yield


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "case.gguf"


def check_load(path: Path, data: bytes, expect: str = EITHER,
               values: dict[int, np.ndarray] | None = None) -> ControlVector | None:
    """Load ``data``; assert VectorFileError or a well-formed vector, as ``expect`` says."""
    path.write_bytes(data)
    try:
        with _alarm(LOAD_TIMEOUT_S, f"loading a {len(data)}-byte file"):
            vector = ControlVector.load(path)
    except VectorFileError as err:
        assert str(err).startswith(str(path)), err
        assert expect != ACCEPT, f"valid file rejected: {err}"
        _event(f"rejected: {str(err)[len(str(path)) + 2 :]}")
        return None
    assert expect != REJECT, f"damaged file accepted: {vector.layers}"
    _event("accepted")
    assert isinstance(vector, ControlVector)
    assert isinstance(vector.model_hint, str)
    assert vector.layers and all(type(layer) is int and layer >= 1 for layer in vector.layers)
    n_embd = vector.n_embd
    for direction in vector.directions.values():
        assert isinstance(direction, np.ndarray)
        assert direction.dtype == np.float32 and direction.ndim == 1
        assert direction.size == n_embd >= 1
        assert np.isfinite(direction).all()
        assert not isinstance(direction, np.memmap) and direction.base is None
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in vector.metadata.items())
    if values is not None:
        assert vector.layers == sorted(values)
        for layer, want in values.items():
            np.testing.assert_array_equal(vector.directions[layer], want)
    if len(ACCEPTED) < 400:
        ACCEPTED.append(data)
    return vector


def _event(text: str) -> None:
    """Outcome statistics for --hypothesis-show-statistics (outside hypothesis: a no-op)."""
    with contextlib.suppress(Exception):
        event(" ".join(w for w in text.split()[:4] if not any(c.isdigit() for c in w)))


FUZZ = dict(
    derandomize=True,
    deadline=timedelta(seconds=2),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

layer_lists = st.lists(st.integers(1, 40), min_size=1, max_size=4, unique=True)
embd_sizes = st.sampled_from([1, 3, 8, 16])
seeds = st.integers(0, 2**16)


@st.composite
def valid_specs(draw: st.DrawFn) -> Spec:
    spec = valid_spec(draw(layer_lists), draw(embd_sizes), draw(seeds),
                      hint=draw(st.sampled_from(["llama", "qwen2", "", "ünï"])),
                      extra=draw(st.booleans()))
    if draw(st.booleans()):  # key order is free
        spec.kvs = draw(st.permutations(spec.kvs))
    return spec


# -- byte-level damage ------------------------------------------------------------------------

def test_every_truncation_of_a_valid_file_is_rejected(fuzz_file: Path) -> None:
    data, _ = build(valid_spec([1, 5, 6], 8, seed=1))
    check_load(fuzz_file, data, ACCEPT)
    for cut in range(len(data)):  # every field, every byte inside it
        check_load(fuzz_file, data[:cut], REJECT)


@settings(max_examples=120, **FUZZ)
@given(spec=valid_specs(), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files(fuzz_file: Path, spec: Spec, cut: float) -> None:
    data, _ = build(spec)
    check_load(fuzz_file, data[: int(cut * len(data))], REJECT)


@settings(max_examples=300, **FUZZ)
@given(
    spec=valid_specs(),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=4),
    writes=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)),
                    max_size=3),
)
def test_bit_flips_and_byte_overwrites(fuzz_file: Path, spec: Spec, flips: list[tuple[float, int]],
                                       writes: list[tuple[float, bytes]]) -> None:
    data, _ = build(spec)
    buf = bytearray(data)
    for where, bit in flips:
        buf[int(where * len(buf))] ^= 1 << bit
    for where, chunk in writes:
        at = int(where * len(buf))
        buf[at : at + len(chunk)] = chunk[: len(buf) - at]
    # a flip inside tensor data may leave a valid file holding other (finite) values
    check_load(fuzz_file, bytes(buf), EITHER)


@settings(max_examples=100, **FUZZ)
@given(tail=st.binary(max_size=400), version=st.sampled_from([2, 3]),
       counts=st.tuples(st.integers(0, 3), st.integers(0, 3)))
def test_random_bytes_after_a_valid_preamble(fuzz_file: Path, tail: bytes, version: int,
                                             counts: tuple[int, int]) -> None:
    data = b"GGUF" + struct.pack("<IQQ", version, *counts) + tail
    check_load(fuzz_file, data, EITHER)


HUGE = st.sampled_from([2, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1,
                        2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)


@settings(max_examples=200, **FUZZ)
@given(spec=valid_specs(), data=st.data())
def test_huge_numbers_patched_into_the_header(fuzz_file: Path, spec: Spec,
                                              data: st.DataObject) -> None:
    raw, offs = build(spec)
    # counts and lengths: tensor/kv counts, string and array lengths, n_dims, dims, offsets
    targets = ["n_tensors", "n_kv"]
    for i, (_, vtype, _) in enumerate(spec.kvs):
        targets.append(f"kv{i}.key_len")
        targets += [f"kv{i}.value"] if vtype == STR else [f"kv{i}.array_len"] if vtype == ARR else []
    for i in range(len(spec.tensors)):
        targets += [f"t{i}.name_len", f"t{i}.n_dims", f"t{i}.dims", f"t{i}.offset"]
    target = data.draw(st.sampled_from(targets), label="field")
    value = data.draw(HUGE, label="value")
    buf = bytearray(raw)
    at, width = offs.get(target, 0), 8
    if target.endswith(".array_len"):
        at = offs[target.replace("array_len", "value")] + 4
    elif target.endswith(".n_dims"):
        width, value = 4, value & 0xFFFFFFFF
    original = int.from_bytes(buf[at : at + width], "little")
    buf[at : at + width] = value.to_bytes(width, "little")
    if value == original:
        expect = ACCEPT
    elif target.endswith(".dims") or target == "n_tensors" and value < original:
        expect = EITHER  # a smaller vector, or fewer tensors read from shifted bytes
    else:
        expect = REJECT
    check_load(fuzz_file, bytes(buf), expect, spec.values if expect == ACCEPT else None)


# -- structured damage ------------------------------------------------------------------------

ODD_NAMES = ["direction.", "direction.01", "direction.-1", "direction.1x", "direction.+1",
             "direction. 1", "direction.1.0", "Direction.1", "direction_1", "direction.0",
             "direction.١", "dirección.1", "direction.1\x00", "", "direction." + "9" * 60,
             "direction.1025", "direction.99999999999", "blk.0.attn_q.weight"]


def _is_valid_name(name: bytes) -> bool:
    text = name.decode("utf-8", "replace")
    digits = text[len("direction."):]
    return (text.startswith("direction.") and digits.isascii() and digits.isdigit()
            and not digits.startswith("0") and int(digits) <= 1024)


Mutation = Callable[[st.DrawFn, Spec], str]


def _pick(draw: st.DrawFn, spec: Spec) -> int:
    if not spec.tensors:  # an earlier mutation removed them all: put one back
        spec.tensors.append(Tensor(b"direction.3", [4], 0, bytes(16)))
    return draw(st.integers(0, len(spec.tensors) - 1))


def m_wrong_value_type(draw: st.DrawFn, spec: Spec) -> str:
    key = draw(st.sampled_from([b"general.architecture", b"controlvector.model_hint",
                                b"controlvector.layer_count"]))
    vtype, payload = draw(st.sampled_from([
        (U8, scalar(U8, 1)), (I8, scalar(I8, -1)), (U16, scalar(U16, 3)), (I32, scalar(I32, 4)),
        (F32, scalar(F32, 1.0)), (BOOL, scalar(BOOL, 1)), (U64, scalar(U64, 4)),
        (I64, scalar(I64, 4)), (F64, scalar(F64, 2.0)), (STR, gstr("controlvector")),
        (ARR, array(U32, [1, 2])), (ARR, array(STR, ["controlvector"])), (ARR, array(U8, [])),
    ]))
    spec.kvs = [(k, vtype, payload) if k == key else (k, t, p) for k, t, p in spec.kvs]
    if key == b"controlvector.layer_count":
        return EITHER if vtype in (U8, U16, I32, U64, I64) else REJECT
    if key == b"general.architecture" and vtype == STR:
        return ACCEPT
    return ACCEPT if key == b"controlvector.model_hint" and vtype == STR else REJECT


def m_missing_key(draw: st.DrawFn, spec: Spec) -> str:
    i = draw(st.integers(0, len(spec.kvs) - 1))
    key = spec.kvs.pop(i)[0]
    return ACCEPT if key.startswith(b"caa.") else REJECT


def m_wrong_arch(draw: st.DrawFn, spec: Spec) -> str:
    arch = draw(st.sampled_from(["llama", "", "ControlVector", "controlvector\x00", " controlvector"])
                | st.text(max_size=20).filter(lambda s: s != "controlvector"))
    spec.kvs = [(k, t, gstr(arch) if k == b"general.architecture" else p) for k, t, p in spec.kvs]
    return REJECT


def m_odd_name(draw: st.DrawFn, spec: Spec) -> str:
    i = _pick(draw, spec)
    name = draw(st.sampled_from([n.encode() for n in ODD_NAMES])
                | st.text(max_size=20).map(lambda s: s.encode())
                | st.binary(max_size=12)
                | st.integers(1, 2000).map(lambda n: f"direction.{n}".encode()))
    spec.tensors[i].name = name
    others = [t.name for j, t in enumerate(spec.tensors) if j != i]
    if not _is_valid_name(name) or name in others:
        return REJECT
    return EITHER  # a valid new layer number (layer_count may then disagree)


def m_duplicate_name(draw: st.DrawFn, spec: Spec) -> str:
    t = spec.tensors[_pick(draw, spec)]
    spec.tensors.append(replace(t))
    return REJECT


def m_direction_zero(draw: st.DrawFn, spec: Spec) -> str:
    spec.tensors[_pick(draw, spec)].name = b"direction.0"
    return REJECT


def m_tensor_type(draw: st.DrawFn, spec: Spec) -> str:
    t = spec.tensors[_pick(draw, spec)]
    t.ggml_type = draw(st.sampled_from([1, 8, 28, 30, 24]) | st.integers(2, 50)
                       | HUGE.map(lambda v: v & 0xFFFFFFFF))
    if t.ggml_type in _GGML_SIZES and t.ggml_type:  # data length to match the new type
        if t.dims[0] % _GGML_SIZES[t.ggml_type][0] == 0:
            t.data = bytes(_declared_nbytes(t))
    return ACCEPT if t.ggml_type == 0 else REJECT


def m_shape(draw: st.DrawFn, spec: Spec) -> str:
    t = spec.tensors[_pick(draw, spec)]
    n_embd = next(iter(spec.values.values())).size
    t.dims = draw(st.lists(st.sampled_from([0, 1, 2, n_embd, n_embd + 1]), max_size=6))
    t.data = bytes(4 * math.prod(t.dims)) if math.prod(t.dims) < 4096 else t.data
    one_d = 1 <= len(t.dims) <= 4 and t.dims[0] >= 1 and all(d == 1 for d in t.dims[1:])
    if one_d and (t.dims[0] == n_embd or len(spec.tensors) == 1):
        spec.values[int(t.name.decode().split(".")[1])] = np.zeros(t.dims[0], np.float32)
        return ACCEPT
    return REJECT


def m_data_length(draw: st.DrawFn, spec: Spec) -> str:
    i = _pick(draw, spec)
    t = spec.tensors[i]
    t.data = draw(st.sampled_from([b"", t.data[:-4], t.data[:-1], t.data + b"\0" * 4, t.data * 3]))
    # the last tensor cut short: the file ends too early, unless the cut stays in its padding
    declared = _pad(_declared_nbytes(t), spec.alignment)
    last = i == len(spec.tensors) - 1
    return REJECT if last and _pad(len(t.data), spec.alignment) < declared else EITHER


def m_offset(draw: st.DrawFn, spec: Spec) -> str:
    i = _pick(draw, spec)
    packed = sum(_pad(_declared_nbytes(t), spec.alignment) for t in spec.tensors[:i])
    spec.tensors[i].offset = draw(st.sampled_from([packed + 1, packed + 4, packed + 32, 0, 2**63])
                                  | HUGE)
    return ACCEPT if spec.tensors[i].offset == packed else REJECT


def m_not_finite(draw: st.DrawFn, spec: Spec) -> str:
    t = spec.tensors[_pick(draw, spec)]
    values = np.frombuffer(t.data[: len(t.data) // 4 * 4], np.float32).copy()
    if not values.size:
        return EITHER
    values[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    t.data = values.tobytes()
    return REJECT


def m_ragged(draw: st.DrawFn, spec: Spec) -> str:
    n = next(iter(spec.values.values())).size + draw(st.integers(1, 4))
    spec.tensors.append(Tensor(b"direction.77", [n], 0, np.ones(n, np.float32).tobytes()))
    return REJECT


def m_no_tensors(draw: st.DrawFn, spec: Spec) -> str:
    spec.tensors = []
    return REJECT


def m_alignment(draw: st.DrawFn, spec: Spec) -> str:
    vtype, value = draw(st.sampled_from([(U32, 1), (U32, 8), (U32, 64), (U32, 0), (U32, 48),
                                         (U64, 32), (I32, 32), (STR, "32")]))
    payload = gstr(value) if vtype == STR else scalar(vtype, value)
    spec.kvs.append((b"general.alignment", vtype, payload))
    good = vtype == U32 and value and not value & (value - 1)
    if good:
        spec.alignment = int(value)
    return ACCEPT if good else REJECT


def m_version(draw: st.DrawFn, spec: Spec) -> str:
    spec.version = draw(st.sampled_from([0, 1, 2, 4, 0x03000000, 2**32 - 1]))
    return ACCEPT if spec.version == 2 else REJECT


def m_extra_key(draw: st.DrawFn, spec: Spec) -> str:
    vtype, payload, ok = draw(st.sampled_from([
        (ARR, struct.pack("<IQ", ARR, 1) + array(U8, [1]), False),  # nested array
        (ARR, struct.pack("<IQ", 13, 1) + b"\0", False),  # unknown element type
        (13, b"\0" * 8, False),  # unknown value type
        (2**32 - 1, b"", False),
        (ARR, array(F64, [1.5, -2.0]), True),
        (ARR, array(BOOL, [1, 0]), True),
        (ARR, struct.pack("<IQ", U8, 1 << 17) + bytes(1 << 17), False),  # longer than we allow
        (BOOL, scalar(BOOL, 2), True),
        (STR, gstr(b"\xff\xfe"), False),  # not UTF-8
    ]))
    key = draw(st.sampled_from([b"caa.extra", b"repeng.x", b"general.name", b"\xff"]))
    spec.kvs.insert(draw(st.integers(0, len(spec.kvs))), (key, vtype, payload))
    return REJECT if not ok or key == b"\xff" else ACCEPT


def m_duplicate_key(draw: st.DrawFn, spec: Spec) -> str:
    spec.kvs.append(spec.kvs[draw(st.integers(0, len(spec.kvs) - 1))])
    return REJECT


def m_layer_count(draw: st.DrawFn, spec: Spec) -> str:
    count = draw(st.integers(0, 2**32 - 1))
    spec.kvs = [(k, t, scalar(U32, count) if k == b"controlvector.layer_count" else p)
                for k, t, p in spec.kvs]
    layers = sorted(spec.values)
    return ACCEPT if count == len(layers) or count >= layers[-1] else REJECT


MUTATIONS: list[Mutation] = [
    m_wrong_value_type, m_missing_key, m_wrong_arch, m_odd_name, m_duplicate_name,
    m_direction_zero, m_tensor_type, m_shape, m_data_length, m_offset, m_not_finite, m_ragged,
    m_no_tensors, m_alignment, m_version, m_extra_key, m_duplicate_key, m_layer_count,
]


@settings(max_examples=450, **FUZZ)
@given(spec=valid_specs(), data=st.data())
def test_structured_damage(fuzz_file: Path, spec: Spec, data: st.DataObject) -> None:
    mutations = data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=2),
                          label="mutations")
    expects = [m(data.draw, spec) for m in mutations]
    expect = expects[0] if len(expects) == 1 else EITHER  # two may undo each other
    raw, _ = build(spec)
    check_load(fuzz_file, raw, expect, spec.values if expect == ACCEPT else None)


# -- llama.cpp as the oracle ------------------------------------------------------------------

_ORACLE = textwrap.dedent(r"""
    # Mirrors common_control_vector_load_one (llama.cpp common.cpp) on libggml-base.
    import ctypes, json, sys
    lib = ctypes.CDLL(sys.argv[1])
    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_get_tensor.restype = ctypes.c_void_p
    lib.ggml_get_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_n_dims.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    lib.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    out = []
    for path in sys.argv[2:]:
        ctx = ctypes.c_void_p()
        g = lib.gguf_init_from_file(path.encode(), Params(False, ctypes.pointer(ctx)))
        if not g:
            out.append(None); continue
        layers = {}
        for i in range(lib.gguf_get_n_tensors(g)):
            name = lib.gguf_get_tensor_name(g, i)
            t = lib.ggml_get_tensor(ctx, name)
            if lib.gguf_get_tensor_type(g, i) != 0 or lib.ggml_n_dims(t) != 1:
                layers = "not F32 1-D"; break
            n = lib.ggml_nelements(t)
            layers[name.decode()] = lib.ggml_get_data_f32(t)[:n]
        out.append(layers)
    print(json.dumps(out))
""")


def _libggml_base() -> Path | None:
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - any import problem means no oracle
        return None
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    return lib if lib.exists() else None


def test_accepted_files_read_the_same_in_llama_cpp(tmp_path: Path) -> None:
    """Run last: every file load accepted above must read the same in llama.cpp's gguf."""
    lib = _libggml_base()
    if lib is None:
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    if not ACCEPTED:  # run alone: make some
        ACCEPTED.extend(build(valid_spec([1, 2, 9], 8, seed))[0] for seed in range(20))
    paths = []
    for i, data in enumerate(ACCEPTED):
        paths.append(tmp_path / f"{i}.gguf")
        paths[-1].write_bytes(data)
    run = subprocess.run([sys.executable, "-c", _ORACLE, str(lib), *map(str, paths)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    assert len(results) == len(paths)
    for path, got in zip(paths, results):
        ours = ControlVector.load(path)
        assert isinstance(got, dict), f"{path}: llama.cpp rejects a file we accept ({got})"
        assert sorted(got) == sorted(f"direction.{layer}" for layer in ours.layers)
        for layer, direction in ours.directions.items():
            np.testing.assert_array_equal(np.float32(got[f"direction.{layer}"]), direction)
