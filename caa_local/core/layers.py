"""The only place for layer-index facts (see docs: CAA layer L = decoder block L, 0-based).

- transformers: ``hidden_states[0]`` is the embedding output and ``hidden_states[L + 1]`` is the
  output of block L, so CAA layer L reads ``hidden_states[L + 1]`` (or a hook on block L).
- llama.cpp: control-vector tensor ``direction.L`` is added to the output of block L; block 0
  can never be steered, so steerable layers are 1 .. n_layer - 1.
- ``llama_set_adapter_cvec`` takes one buffer of n_embd floats per layer, laid out from layer 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import LayerRangeError

FIRST_STEERABLE_LAYER = 1


def hidden_state_index(layer: int) -> int:
    """Index into transformers' ``hidden_states`` tuple holding the output of CAA layer ``layer``."""
    return layer + 1


def tensor_name(layer: int) -> str:
    """GGUF tensor name that llama.cpp adds at the output of block ``layer``."""
    return f"direction.{layer}"


_TENSOR_RE = re.compile(r"direction\.(0|[1-9][0-9]{0,5})")


def layer_from_tensor_name(name: str) -> int | None:
    """Inverse of :func:`tensor_name`; None for names llama.cpp would not accept."""
    match = _TENSOR_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def steerable_range(n_layer: int) -> range:
    """Layers llama.cpp can steer in a model of ``n_layer`` blocks."""
    return range(FIRST_STEERABLE_LAYER, n_layer)


BLOCK_0 = "llama.cpp cannot steer block 0"


def no_direction(where: str, layer: int, held: Iterable[int]) -> LayerRangeError:
    """The one error for a layer a vector holds no direction for."""
    return LayerRangeError(f"{where} has no direction for layer {layer} (it holds {format_layers(held)})")


def check_steerable(layer: int, n_layer: int, what: str = "layer") -> int:
    """Return ``layer`` if llama.cpp can steer it, else raise a clear LayerRangeError."""
    if layer not in steerable_range(n_layer):
        hint = f" ({BLOCK_0})" if layer == 0 else ""
        raise LayerRangeError(
            f"{what} {layer} is out of range for this model (valid: 1..{n_layer - 1}){hint}"
        )
    return layer


MAX_LAYER = 999_999  # the largest index a GGUF tensor name can carry (see _TENSOR_RE)


def parse_layer_spec(spec: str, n_layer: int | None = None) -> list[int]:
    """Parse '13', '10-15', '4,8,12-14' or 'all' into a sorted list of layers.

    With ``n_layer`` given, every bound is checked against the model before a range is
    expanded, so no spec costs more than the model's layers; without it, bounds above
    MAX_LAYER are refused.
    """
    text = spec.strip().lower()
    if text == "all":
        if n_layer is None:
            raise LayerRangeError("layer spec 'all' needs the model's layer count")
        return list(steerable_range(n_layer))
    shown = spec if len(spec) <= 40 else spec[:40] + "..."
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d{1,12})(?:\s*-\s*(\d{1,12}))?", part)
        if not match:
            raise LayerRangeError(
                f"bad layer spec {shown!r}: expected e.g. '13', '10-15', '4,8,12-14' or 'all'"
            )
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else lo
        if hi < lo:
            raise LayerRangeError(f"bad layer spec {shown!r}: range {lo}-{hi} is empty")
        for bound in (lo, hi):
            if n_layer is not None:
                check_steerable(bound, n_layer)
            elif bound > MAX_LAYER:
                raise LayerRangeError(f"bad layer spec {shown!r}: layer {bound} is beyond any model")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def cvec_buffer(
    directions: Mapping[int, npt.NDArray[np.float32]], n_embd: int, n_layer: int
) -> npt.NDArray[np.float32]:
    """Lay out per-layer directions as ``llama_set_adapter_cvec`` wants them.

    One row of n_embd floats per layer 1 .. n_layer - 1 (row 0 is layer 1); layers without a
    direction are zero. Always the full buffer: llama.cpp keeps old values past a short one.
    """
    buf = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
    for layer, direction in directions.items():
        check_steerable(layer, n_layer)
        buf[layer - FIRST_STEERABLE_LAYER] = direction
    return buf


def format_layers(layers: Iterable[int]) -> str:
    """Compact form of a layer list: [4, 5, 6, 9] -> '4-6,9'."""
    ordered = sorted(set(layers))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)



def check_vector_layers(layers: Iterable[int], held: Iterable[int], n_layer: int) -> list[int]:
    """``layers`` sorted and deduplicated, each steerable in the model and held by the vector."""
    asked, held = list(layers), set(held)
    if not asked:
        raise LayerRangeError("no layers given")
    for layer in asked:
        check_steerable(layer, n_layer)
    missing = [layer for layer in asked if layer not in held]
    if missing:
        raise no_direction("the vector", missing[0], held)
    return sorted(set(asked))
