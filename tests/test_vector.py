"""ControlVector: validation, float32 arithmetic, and GGUF files in llama.cpp's layout."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from caa_local.core.errors import CaaError, LayerRangeError, ModelMismatchError, VectorFileError
from caa_local.core.vector import ControlVector
from conftest import write_raw_vector

N_EMBD = 16


def _directions(layers: list[int], seed: int = 0, n_embd: int = N_EMBD) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: rng.standard_normal(n_embd).astype(np.float32) for layer in layers}


@pytest.fixture
def vec() -> ControlVector:
    meta = {"behavior": "sycophancy", "recommended_layer": "13"}
    return ControlVector("llama", _directions([3, 1, 13]), meta)




def _only_file(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- GGUF round trip and layout -----------------------------------------------------------------

def test_round_trip(tmp_path: Path, vec: ControlVector) -> None:
    path = tmp_path / "syc.gguf"
    vec.save(path)
    loaded = ControlVector.load(path)
    assert loaded.model_hint == "llama"
    assert loaded.layers == [1, 3, 13]
    assert dict(loaded.metadata) == {"behavior": "sycophancy", "recommended_layer": "13"}
    for layer, direction in vec.directions.items():
        assert loaded.directions[layer].dtype == np.float32
        np.testing.assert_array_equal(loaded.directions[layer], direction)  # bit for bit
    assert loaded == vec
    assert loaded.recommended_layer() == 13


def test_loaded_arrays_are_owned_read_only_copies(tmp_path: Path, vec: ControlVector) -> None:
    path = tmp_path / "v.gguf"
    vec.save(path)
    loaded = ControlVector.load(path)
    for direction in loaded.directions.values():
        assert not isinstance(direction, np.memmap) and direction.base is None
        assert not direction.flags.writeable
    path.unlink()  # nothing keeps the file mapped
    assert loaded.norms()[1] > 0


def test_file_is_in_llama_cpp_layout(tmp_path: Path, vec: ControlVector) -> None:
    path = tmp_path / "v.gguf"
    vec.save(path)
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "controlvector"
    assert fields["controlvector.model_hint"].contents() == "llama"
    assert fields["controlvector.model_hint"].types == [gguf.GGUFValueType.STRING]
    assert fields["controlvector.layer_count"].types == [gguf.GGUFValueType.UINT32]
    assert fields["controlvector.layer_count"].contents() == 3
    assert fields["caa.behavior"].contents() == "sycophancy"
    user_keys = [k for k in fields if not k.startswith("GGUF.")]
    ours = ("general.architecture", "controlvector.", "caa.")
    assert all(k.startswith(ours) for k in user_keys), user_keys
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.3", "direction.13"]
    expected_offset = 0
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert tensor.shape.tolist() == [N_EMBD]  # 1-D
        assert tensor.n_elements == N_EMBD
        assert tensor.data.dtype == np.float32
        # llama.cpp's gguf reader wants the data packed in order at aligned offsets
        assert tensor.data_offset - reader.data_offset == expected_offset
        expected_offset += -(-tensor.n_bytes // 32) * 32
    assert path.stat().st_size == reader.data_offset + expected_offset


def test_repeng_style_file_loads(tmp_path: Path) -> None:
    dirs = _directions([1, 2, 3, 4], seed=7, n_embd=32)
    path = write_raw_vector(tmp_path / "repeng.gguf", {f"direction.{l}": v for l, v in dirs.items()},
                       hint="mistral")
    loaded = ControlVector.load(path)
    assert loaded.model_hint == "mistral" and loaded.layers == [1, 2, 3, 4]
    assert dict(loaded.metadata) == {}
    for layer, direction in dirs.items():
        np.testing.assert_array_equal(loaded.directions[layer], direction)


def test_cvector_generator_style_int32_layer_count_loads(tmp_path: Path) -> None:
    # llama.cpp's cvector-generator stores the layer count as int32 and may skip layers
    dirs = _directions([5, 9], n_embd=8)
    path = write_raw_vector(tmp_path / "gen.gguf", {f"direction.{l}": v for l, v in dirs.items()},
                       layer_count=31, layer_count_type="int32")
    assert ControlVector.load(path).layers == [5, 9]


# -- arithmetic ---------------------------------------------------------------------------------

def _assert_f32(vector: ControlVector) -> None:
    assert isinstance(vector, ControlVector)
    assert all(v.dtype == np.float32 for v in vector.directions.values())


def test_arithmetic_stays_float32(vec: ControlVector) -> None:
    v1 = vec.directions[1]
    cases: dict[str, tuple[object, np.ndarray]] = {
        "add": (vec + vec, v1 + v1),
        "sub": (vec - vec, np.zeros_like(v1)),
        "neg": (-vec, -v1),
        "mul": (vec * 2.5, v1 * np.float32(2.5)),
        "rmul": (2.5 * vec, v1 * np.float32(2.5)),
        "int": (vec * 3, v1 * 3),
        "div": (vec / 4, v1 / np.float32(4)),
        "np.float64 * v": (np.float64(2) * vec, v1 * 2),
        "v * np.float64": (vec * np.float64(2), v1 * 2),
        "np.float32 * v": (np.float32(2) * vec, v1 * 2),
        "np.int64 * v": (np.int64(2) * vec, v1 * 2),
        "v / np.float64": (vec / np.float64(0.5), v1 * 2),
    }
    for name, (got, want) in cases.items():
        _assert_f32(got)  # type: ignore[arg-type]
        got_1 = got.directions[1]  # type: ignore[union-attr]
        np.testing.assert_allclose(got_1, want, rtol=1e-6, err_msg=name)


def test_scaling_keeps_metadata_and_layers(vec: ControlVector) -> None:
    scaled = -(vec * 2)
    assert scaled.layers == vec.layers and scaled.metadata == vec.metadata


def test_add_unions_layers(vec: ControlVector) -> None:
    other = ControlVector("llama", _directions([13, 20], seed=1))
    total = vec + other
    assert total.layers == [1, 3, 13, 20]
    np.testing.assert_allclose(total.directions[13], vec.directions[13] + other.directions[13])
    np.testing.assert_allclose((vec - other).directions[20], -other.directions[20])
    np.testing.assert_array_equal(total.directions[1], vec.directions[1])
    _assert_f32(total)


@pytest.mark.parametrize(
    "op",
    [
        lambda v: v + 1, lambda v: 1 + v, lambda v: v - 1.0, lambda v: v * "2",
        lambda v: v * True, lambda v: v / None, lambda v: v * complex(1, 1),
        lambda v: np.ones(3) * v, lambda v: v * np.ones(3), lambda v: v + np.ones(16),
        lambda v: v * v,
    ],
)
def test_foreign_operands_raise_type_error(
    vec: ControlVector, op: Callable[[ControlVector], object]
) -> None:
    with pytest.raises(TypeError):
        op(vec)


def test_dunder_methods_return_not_implemented(vec: ControlVector) -> None:
    assert vec.__add__(1) is NotImplemented
    assert vec.__sub__("x") is NotImplemented
    assert vec.__mul__("x") is NotImplemented
    assert vec.__rmul__(None) is NotImplemented
    assert vec.__truediv__([2]) is NotImplemented


def test_combining_different_models_raises(vec: ControlVector) -> None:
    other = ControlVector("qwen2", _directions([1]))
    with pytest.raises(ModelMismatchError, match="'llama' and 'qwen2'"):
        vec + other
    with pytest.raises(ModelMismatchError):
        vec - other
    wider = ControlVector("llama", _directions([1], n_embd=N_EMBD + 1))
    with pytest.raises(ModelMismatchError, match="n_embd"):
        vec + wider


def test_division_by_zero(vec: ControlVector) -> None:
    with pytest.raises(ZeroDivisionError):
        vec / 0


def test_equality_and_immutability(vec: ControlVector) -> None:
    same = ControlVector("llama", {l: v.copy() for l, v in vec.directions.items()}, vec.metadata)
    assert same == vec and not (same != vec)
    assert vec != vec * 2 and vec != vec.with_metadata(behavior="x") and vec != "llama"
    with pytest.raises(TypeError):
        hash(vec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        vec.model_hint = "qwen2"  # type: ignore[misc]
    with pytest.raises(ValueError):
        vec.directions[1][0] = 1.0
    with pytest.raises(TypeError):
        vec.directions[2] = np.ones(N_EMBD, np.float32)  # type: ignore[index]


def test_constructor_copies_its_inputs() -> None:
    data = np.ones(4, np.float32)
    v = ControlVector("llama", {1: data})
    data[0] = 5
    assert v.directions[1][0] == 1


def test_only_and_with_metadata(vec: ControlVector) -> None:
    assert vec.only([13]).layers == [13]
    with pytest.raises(LayerRangeError, match="no direction for layer 7"):
        vec.only([7])
    assert vec.with_metadata(recommended_multiplier=1.5).recommended_multiplier() == 1.5


# -- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("directions", "match"),
    [
        ({0: np.ones(4, np.float32)}, "block 0"),
        ({-1: np.ones(4, np.float32)}, "block -1"),
        ({}, "at least one layer"),
        ({1: np.ones((2, 2), np.float32)}, "1-D"),
        ({1: np.ones(0, np.float32)}, "1-D"),
        ({1: np.array([1.0, np.nan], np.float32)}, "NaN or Inf"),
        ({1: np.array([1.0, np.inf], np.float32)}, "NaN or Inf"),
        ({1: np.array([1e300, 1.0])}, "NaN or Inf"),  # overflows float32
        ({1: np.ones(4, np.float32), 2: np.ones(5, np.float32)}, "direction.2 has 5 values"),
        ({1: np.ones(4, np.int32)}, "expected floats"),
        ({"1": np.ones(4, np.float32)}, "integers"),
        ({True: np.ones(4, np.float32)}, "integers"),
        ({1: np.ones(4), "a": np.ones(4)}, "integers"),
        ({5000: np.ones(4, np.float32)}, "above"),
    ],
)
def test_constructor_refuses(directions: dict, match: str) -> None:
    with pytest.raises(VectorFileError, match=match):
        ControlVector("llama", directions)


def test_float64_input_is_stored_as_float32() -> None:
    v = ControlVector("llama", {np.int64(2): np.arange(3, dtype=np.float64)})
    assert v.layers == [2] and type(v.layers[0]) is int
    assert v.directions[2].dtype == np.float32


# -- refusing bad files ------------------------------------------------------------------------

def _refused(path: Path, match: str) -> None:
    with pytest.raises(VectorFileError, match=match) as err:
        ControlVector.load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert isinstance(err.value, CaaError)


def test_refuses_direction_0(tmp_path: Path) -> None:
    path = write_raw_vector(tmp_path / "v.gguf", {"direction.0": np.ones(8, np.float32),
                                              "direction.1": np.ones(8, np.float32)})
    _refused(path, r"'direction\.0': llama\.cpp cannot steer block 0")


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_refuses_non_f32_tensors(tmp_path: Path, dtype: type) -> None:
    path = write_raw_vector(tmp_path / "v.gguf", {"direction.1": np.ones(8, dtype)})
    _refused(path, r"'direction\.1' is (F64|F16|I32), llama\.cpp needs F32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_refuses_non_finite_values(tmp_path: Path, bad: float) -> None:
    data = np.ones(8, np.float32)
    data[3] = bad
    path = write_raw_vector(tmp_path / "v.gguf",
                       {"direction.1": np.ones(8, np.float32), "direction.2": data})
    _refused(path, r"direction\.2: holds NaN or Inf")


def test_refuses_ragged_n_embd(tmp_path: Path) -> None:
    path = write_raw_vector(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32),
                                              "direction.2": np.ones(16, np.float32)})
    _refused(path, r"direction\.2 has 16 values, other layers have 8")


def test_refuses_file_without_tensors(tmp_path: Path) -> None:
    _refused(write_raw_vector(tmp_path / "v.gguf", {}), "no 'direction.N' tensors")


def test_refuses_2d_tensors(tmp_path: Path) -> None:
    path = write_raw_vector(tmp_path / "v.gguf", {"direction.1": np.ones((2, 8), np.float32)})
    _refused(path, r"shape \[8, 2\], expected 1-D")


@pytest.mark.parametrize("name", ["direction.", "direction.01", "direction.1x", "blk.1.weight"])
def test_refuses_other_tensor_names(tmp_path: Path, name: str) -> None:
    path = write_raw_vector(tmp_path / "v.gguf", {name: np.ones(8, np.float32)})
    _refused(path, "expected names 'direction.N'")


def test_refuses_model_files(tmp_path: Path) -> None:
    path = write_raw_vector(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32)}, arch="llama")
    _refused(path, "general.architecture is 'llama', expected 'controlvector'")


def test_refuses_missing_model_hint(tmp_path: Path) -> None:
    path = write_raw_vector(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32)}, hint=None)
    _refused(path, "controlvector.model_hint")


def test_refuses_big_endian_files(tmp_path: Path) -> None:
    # gguf's reader would read them; llama.cpp cannot
    path = write_raw_vector(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32)},
                       endianess=gguf.GGUFEndian.BIG)
    _refused(path, "big-endian")


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "too short"), (b"hello world, not a gguf file", "not a GGUF file"),
     (b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, "header claims")],
)
def test_refuses_non_gguf_files(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "v.gguf"
    path.write_bytes(content)
    _refused(path, match)


def test_refuses_missing_paths(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.gguf", "no such file")
    _refused(tmp_path, "no such file")


# -- saving -----------------------------------------------------------------------------------

def test_save_refuses_to_overwrite_without_force(tmp_path: Path, vec: ControlVector) -> None:
    path = tmp_path / "v.gguf"
    path.write_bytes(b"precious")
    with pytest.raises(CaaError, match="file exists"):
        vec.save(path)
    assert path.read_bytes() == b"precious"
    assert _only_file(tmp_path) == ["v.gguf"]
    vec.save(path, force=True)
    assert ControlVector.load(path) == vec
    assert _only_file(tmp_path) == ["v.gguf"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_no_temp_and_no_target(tmp_path: Path, vec: ControlVector,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  error: BaseException, existing: bool) -> None:
    path = tmp_path / "v.gguf"
    if existing:
        vec.save(path)
    before = path.read_bytes() if existing else None
    real = gguf.GGUFWriter.write_tensors_to_file

    def half_then_fail(self: gguf.GGUFWriter, **kwargs: object) -> None:
        real(self)
        for fout in self.fout or []:
            fout.flush()
            assert os.path.getsize(fout.name) > 0  # a half-written temp file exists now
        raise error

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_fail)
    with pytest.raises(type(error)):
        (vec * 2).save(path, force=True)
    assert _only_file(tmp_path) == (["v.gguf"] if existing else [])
    if existing:
        assert path.read_bytes() == before


def test_save_refuses_a_directory(tmp_path: Path, vec: ControlVector) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(CaaError, match="directory"):
        vec.save(tmp_path / "d", force=True)


# -- fitting a model ---------------------------------------------------------------------------

def test_check_fits(vec: ControlVector) -> None:
    vec.check_fits(N_EMBD, 14)  # layers 1, 3, 13 fit a 14-block model
    with pytest.raises(ModelMismatchError) as err:
        vec.check_fits(576, 30, where="vectors/syc.gguf")
    assert str(err.value) == (
        f"vectors/syc.gguf: directions have {N_EMBD} values, model n_embd is 576 "
        "(vector from another model?)"
    )
    with pytest.raises(ModelMismatchError) as err:
        vec.check_fits(N_EMBD, 13, where="vectors/syc.gguf")
    assert str(err.value) == (
        "vectors/syc.gguf: direction.13 is beyond this model's 13 blocks (valid: 1..12)"
    )
