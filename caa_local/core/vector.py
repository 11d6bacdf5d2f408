"""ControlVector: per-layer steering directions, and their GGUF file format.

The file layout is the one llama.cpp's control-vector loader accepts (and repeng writes):
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (str),
``controlvector.layer_count`` (uint32) and one F32 1-D tensor ``direction.L`` per layer L >= 1.
Our own metadata goes under ``caa.*`` string keys, which llama.cpp ignores.
numpy + gguf only: loading a vector never imports torch.
"""

from __future__ import annotations

import json
import math
import mmap
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from caa_local.core.atomic import atomic_path
from caa_local.core.errors import ModelMismatchError, VectorFileError
from caa_local.core.gguf_check import HEADER_BYTES, MAX_LAYER, check_layout, short
from caa_local.core.layers import BLOCK_0, FIRST_STEERABLE_LAYER, layer_from_tensor_name, no_direction, tensor_name

ARCH = "controlvector"
KEY_HINT = "controlvector.model_hint"
KEY_LAYER_COUNT = "controlvector.layer_count"
META_PREFIX = "caa."
MAX_FILE_BYTES = 1 << 30  # 1 GiB: far above any real vector (a 70B model's is ~2 MiB)
MAX_N_EMBD = 1 << 16
# Metadata that holds only for this vector at its present scale (written by `caa-local calibrate`).
CALIBRATION_KEYS = ("recommended_multiplier", "negative_multiplier_limit", "calibration")


@dataclass(frozen=True, eq=False)
class ControlVector:
    """Steering directions keyed by CAA layer (0-based decoder block, >= 1), all float32."""

    model_hint: str
    directions: Mapping[int, npt.NDArray[np.float32]]
    metadata: Mapping[str, str] = field(default_factory=dict)

    # numpy defers to our reflected operators: np.float64(2) * v calls v.__rmul__ (float32
    # result), and np.ones(3) * v raises TypeError instead of building an object array.
    __array_ufunc__ = None
    __hash__ = None  # type: ignore[assignment]  # holds arrays: equal by value, not hashable

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ControlVector):
            return NotImplemented
        return (
            self.model_hint == other.model_hint
            and dict(self.metadata) == dict(other.metadata)
            and self.layers == other.layers
            and all(np.array_equal(v, other.directions[l]) for l, v in self.directions.items())
        )

    def __post_init__(self) -> None:
        if not isinstance(self.model_hint, str):
            raise VectorFileError(f"model_hint must be a string, got {type(self.model_hint).__name__}")
        if not self.directions:
            raise VectorFileError("a control vector needs at least one layer")
        clean: dict[int, npt.NDArray[np.float32]] = {}
        n_embd = None
        for key in self.directions:
            if not isinstance(key, numbers.Integral) or isinstance(key, bool):
                raise VectorFileError(f"layer keys must be integers, got {key!r}")
        for key in sorted(self.directions, key=int):
            layer = int(key)
            if layer < FIRST_STEERABLE_LAYER:
                raise VectorFileError(
                    f"{tensor_name(layer)}: llama.cpp cannot steer block {layer} "
                    f"(layers start at {FIRST_STEERABLE_LAYER})"
                )
            if layer > MAX_LAYER:
                raise VectorFileError(f"{tensor_name(layer)}: layer {layer} is above {MAX_LAYER}")
            if layer in clean:
                raise VectorFileError(f"layer {layer} appears twice")
            arr = np.asarray(self.directions[key])
            if arr.ndim != 1 or arr.size == 0:
                raise VectorFileError(
                    f"{tensor_name(layer)}: expected a 1-D array, got shape {arr.shape}"
                )
            if not np.issubdtype(arr.dtype, np.floating):
                raise VectorFileError(f"{tensor_name(layer)}: expected floats, got {arr.dtype}")
            with np.errstate(over="ignore"):  # overflow becomes Inf, refused below
                arr = arr.astype(np.float32, copy=True)
            if n_embd is None:
                n_embd = arr.size
            elif arr.size != n_embd:
                raise VectorFileError(
                    f"{tensor_name(layer)} has {arr.size} values, other layers have {n_embd}"
                )
            if not np.all(np.isfinite(arr)):
                raise VectorFileError(f"{tensor_name(layer)}: holds NaN or Inf values")
            arr.flags.writeable = False
            clean[layer] = arr
        meta = {str(k): str(v) for k, v in self.metadata.items()}
        object.__setattr__(self, "directions", MappingProxyType(clean))
        object.__setattr__(self, "metadata", MappingProxyType(meta))

    # -- shape ------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def n_embd(self) -> int:
        return next(iter(self.directions.values())).size

    @property
    def kind(self) -> str:
        """'behavior' (a steering vector) or 'condition' (CAST, core/condition.py): ``caa.kind``."""
        return self.metadata.get("kind", "behavior")

    def norms(self) -> dict[int, float]:
        return {layer: float(np.linalg.norm(v)) for layer, v in self.directions.items()}

    def recommended_layer(self) -> int | None:
        value = self.metadata.get("recommended_layer")
        return int(value) if value and value.isdigit() else None

    def recommended_multiplier(self) -> float | None:
        try:
            value = float(self.metadata.get("recommended_multiplier", ""))
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    def negative_multiplier_limit(self) -> float | None:
        try:
            value = float(self.metadata.get("negative_multiplier_limit", ""))
        except ValueError:
            return None
        return value if math.isfinite(value) and value < 0 else None

    def calibration(self) -> dict[str, Any] | None:
        """The ``caa.calibration`` summary (JSON written by `caa-local calibrate`), or None."""
        try:
            value = json.loads(self.metadata.get("calibration", ""))
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def check_fits(self, n_embd: int, n_layer: int, where: str = "vector") -> None:
        """Raise ModelMismatchError unless every layer and its length fit the model."""
        if self.n_embd != n_embd:
            raise ModelMismatchError(
                f"{where}: directions have {self.n_embd} values, model n_embd is {n_embd} "
                "(vector from another model?)"
            )
        bad = [layer for layer in self.layers if layer >= n_layer]
        if bad:
            raise ModelMismatchError(
                f"{where}: {tensor_name(bad[0])} is beyond this model's {n_layer} blocks "
                f"(valid: 1..{n_layer - 1})"
            )

    # -- derived vectors --------------------------------------------------------------------
    def only(self, layers: list[int]) -> "ControlVector":
        missing = [layer for layer in layers if layer not in self.directions]
        if missing:
            raise no_direction("vector", missing[0], self.layers)
        return ControlVector(self.model_hint, {l: self.directions[l] for l in layers}, self.metadata)

    def with_metadata(self, **updates: object) -> "ControlVector":
        return ControlVector(self.model_hint, self.directions, {**self.metadata, **{k: str(v) for k, v in updates.items()}})

    def rescaled_metadata(self, factor: float) -> dict[str, str]:
        """Metadata for this vector multiplied by ``factor``: the recommended multipliers divide by it.

        A multiplier x on the old vector steers like x / factor on the new one, so the
        calibration still holds; its curve is re-labelled (a negative factor swaps the two
        sides). A factor of 0 drops the calibration.
        """
        meta = dict(self.metadata)
        if factor == 1.0 or not any(k in meta for k in CALIBRATION_KEYS):
            return meta
        for key in CALIBRATION_KEYS:
            meta.pop(key, None)
        if factor == 0 or not math.isfinite(factor):
            return meta
        positive = self.recommended_multiplier()
        negative = self.negative_multiplier_limit()
        moved = [m / factor for m in (positive, negative) if m is not None]
        new_pos = next((m for m in moved if m > 0), None)
        new_neg = next((m for m in moved if m < 0), None)
        if new_pos is not None:
            meta["recommended_multiplier"] = f"{new_pos:.6g}"
        if new_neg is not None:
            meta["negative_multiplier_limit"] = f"{new_neg:.6g}"
        summary = self.calibration()
        if summary is not None:
            for point in summary.get("curve", []):
                if isinstance(point.get("multiplier"), (int, float)):
                    point["multiplier"] = point["multiplier"] / factor
            summary.update(recommended_multiplier=new_pos, positive_limit=new_pos, negative_limit=new_neg,
                           rescaled_by=summary.get("rescaled_by", 1.0) * factor)
            meta["calibration"] = json.dumps(summary, separators=(",", ":"))
        return meta

    def _combine(self, other: object, sign: float) -> "ControlVector":
        if not isinstance(other, ControlVector):
            return NotImplemented
        if other.model_hint != self.model_hint:
            raise ModelMismatchError(
                f"cannot combine vectors for {self.model_hint!r} and {other.model_hint!r}"
            )
        if other.n_embd != self.n_embd:
            raise ModelMismatchError(f"cannot combine n_embd {self.n_embd} with {other.n_embd}")
        out: dict[int, np.ndarray] = {l: v.copy() for l, v in self.directions.items()}
        for layer, v in other.directions.items():
            out[layer] = out[layer] + sign * v if layer in out else sign * v
        return ControlVector(self.model_hint, out)

    def __add__(self, other: object) -> "ControlVector":
        return self._combine(other, 1.0)

    def __sub__(self, other: object) -> "ControlVector":
        return self._combine(other, -1.0)

    def __mul__(self, scale: object) -> "ControlVector":
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            return NotImplemented
        factor = np.float32(scale)
        return ControlVector(
            self.model_hint, {l: v * factor for l, v in self.directions.items()},
            self.rescaled_metadata(float(scale)),
        )

    __rmul__ = __mul__

    def __truediv__(self, scale: object) -> "ControlVector":
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            return NotImplemented
        if scale == 0:
            raise ZeroDivisionError("cannot divide a control vector by zero")
        divisor = np.float32(scale)
        return ControlVector(
            self.model_hint, {l: v / divisor for l, v in self.directions.items()},
            self.rescaled_metadata(1.0 / float(scale)),
        )

    def __neg__(self) -> "ControlVector":
        return self * -1.0

    # -- files ------------------------------------------------------------------------------
    def save(self, path: Path, force: bool = False) -> None:
        """Write atomically; refuses to replace an existing file unless ``force``."""
        import gguf

        path = Path(path)
        with atomic_path(path, force) as tmp:
            writer = gguf.GGUFWriter(str(tmp), ARCH)
            try:
                writer.add_string(KEY_HINT, self.model_hint)
                writer.add_uint32(KEY_LAYER_COUNT, len(self.directions))
                for key, value in sorted(self.metadata.items()):
                    writer.add_string(META_PREFIX + key, value)
                for layer, direction in self.directions.items():
                    writer.add_tensor(tensor_name(layer), np.ascontiguousarray(direction, np.float32))
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()

    @classmethod
    def load(cls, path: Path) -> "ControlVector":
        """Read and validate a control-vector GGUF; any problem is a VectorFileError."""
        path = Path(path)
        try:
            return _read(path)
        except VectorFileError as err:
            raise VectorFileError(f"{path}: {err}") from None


def no_layer_warning(name: str, vector: ControlVector, scale: float) -> str | None:
    """The one-line warning for steering a vector that records no recommended layer, or None.

    Such a vector steers every layer it holds (llama.cpp's behaviour), usually far too strong.
    """
    layer = vector.recommended_layer()
    if layer is not None and layer in vector.directions:
        return None
    return (f"Warning: {name} records no recommended layer: steering all its {len(vector.layers)} layers "
            f"({_span(vector.layers)}) at x{scale:g} (choose with `caa-local calibrate`, or pass --layers)")


def _span(layers: list[int]) -> str:
    from caa_local.core.layers import format_layers

    return format_layers(layers) or "no layers"


def _field_value(field_obj) -> object:  # noqa: ANN001 - gguf ReaderField
    import gguf

    types = field_obj.types
    if not types:
        raise VectorFileError(f"key {short(field_obj.name)} has no type")
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field_obj.parts[-1]).decode("utf-8")
    if types[0] == gguf.GGUFValueType.ARRAY:
        return None
    if len(field_obj.data) != 1:
        raise VectorFileError(f"key {short(field_obj.name)} is malformed")
    return field_obj.parts[field_obj.data[0]][0].item()


# -- GGUF layout check ------------------------------------------------------------------------
def _read(path: Path) -> ControlVector:
    import gguf

    if not path.is_file():
        raise VectorFileError("no such file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise VectorFileError(f"file is {size} bytes, too large for a control vector")
    if size < HEADER_BYTES:
        raise VectorFileError(f"file is {size} bytes, too short for a GGUF header")
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            check_layout(buf, min(size, len(buf)))
        reader = gguf.GGUFReader(str(path), "r")
        fields = {name: _field_value(f) for name, f in reader.fields.items()}
        tensors = list(reader.tensors)
    except VectorFileError:
        raise
    except Exception as err:  # noqa: BLE001 - the gguf reader raises many types on bad input
        raise VectorFileError(f"not a readable GGUF file ({type(err).__name__}: {err})") from None

    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise VectorFileError(
            f"general.architecture is {short(arch)}, expected 'controlvector' "
            "(is this a model file?)"
        )
    hint = fields.get(KEY_HINT)
    if not isinstance(hint, str):
        raise VectorFileError(f"missing or non-string key {KEY_HINT!r}")
    layer_count = fields.get(KEY_LAYER_COUNT)
    if not isinstance(layer_count, int) or isinstance(layer_count, bool):
        raise VectorFileError(f"missing or non-integer key {KEY_LAYER_COUNT!r}")

    directions: dict[int, np.ndarray] = {}
    for tensor in tensors:
        where = f"tensor {short(tensor.name)}"
        layer = layer_from_tensor_name(tensor.name)
        if layer is None:
            raise VectorFileError(f"{where}: expected names 'direction.N' (N = 1, 2, ...)")
        if layer == 0:
            raise VectorFileError(
                f"tensor 'direction.0': {BLOCK_0} (use layers 1 and up)"
            )
        if layer in directions:  # names are checked unique above; keep layers unique too
            raise VectorFileError(f"{where} appears twice")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise VectorFileError(f"{where} is {tensor.tensor_type.name}, llama.cpp needs F32")
        # GGUF lists dims fastest first (ggml's ne); llama.cpp wants ggml_n_dims == 1, that is
        # every dim after the first equal to 1.
        shape = [int(d) for d in tensor.shape]
        if not shape or any(d != 1 for d in shape[1:]):
            raise VectorFileError(f"{where} has shape {shape}, expected 1-D")
        if not 0 < shape[0] <= MAX_N_EMBD:
            raise VectorFileError(f"{where} has {shape[0]} values, expected 1..{MAX_N_EMBD}")
        data = np.asarray(tensor.data).reshape(-1)
        if data.dtype != np.float32 or data.size != shape[0]:
            raise VectorFileError(f"{where} is truncated")
        directions[layer] = np.array(data, dtype=np.float32, copy=True)
    del reader, tensors
    if not directions:
        raise VectorFileError("holds no 'direction.N' tensors")
    if layer_count != len(directions) and layer_count < max(directions):
        # repeng writes the tensor count; llama.cpp only uses it as a hint. Reject nonsense.
        raise VectorFileError(
            f"{KEY_LAYER_COUNT} is {layer_count}, but the file holds {len(directions)} layers"
        )
    metadata = {
        name[len(META_PREFIX):]: value
        for name, value in fields.items()
        if name.startswith(META_PREFIX) and isinstance(value, str)
    }
    return ControlVector(hint, directions, metadata)
