"""The vectors a request may name: the shipped ones plus --vectors-dir, loaded once at start-up.

Requests name vectors by id only (llama.cpp's `lora: [{id, scale}]`); an id is looked up in a
dict, so no request can make the server open a path.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caa_local.core.errors import CaaError
from caa_local.core.locate import shipped_vectors_dir
from caa_local.core.vector import ControlVector

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


@dataclass(frozen=True)
class Entry:
    name: str
    vector: ControlVector
    source: Path
    fits: bool
    problem: str  # why it does not fit; "" when it does


class VectorLibrary:
    """name -> loaded vector; later directories win over earlier ones (shipped first)."""

    def __init__(self, entries: dict[str, Entry], skipped: list[str]) -> None:
        self.entries = entries
        self.skipped = skipped  # "file: reason" for files that could not be read

    @classmethod
    def load(cls, dirs: tuple[Path, ...], n_embd: int, n_layer: int, architecture: str) -> VectorLibrary:
        entries: dict[str, Entry] = {}
        skipped: list[str] = []
        for directory in (shipped_vectors_dir(), *dirs):
            if not directory.is_dir():
                raise CaaError(f"--vectors-dir {directory}: not a directory")
            for path in sorted(directory.glob("*.gguf")):
                if not NAME.match(path.stem):
                    skipped.append(f"{path}: name is not a plain id (letters, digits, _ . + -)")
                    continue
                try:
                    vector = ControlVector.load(path)
                except CaaError as err:
                    skipped.append(f"{path}: {err}")
                    continue
                problem = ""
                try:
                    vector.check_fits(n_embd, n_layer, path.stem)
                except CaaError as err:
                    problem = str(err)
                if not problem and vector.model_hint != architecture:
                    problem = f"made for a {vector.model_hint!r} model, this one is {architecture!r}"
                entries[path.stem] = Entry(path.stem, vector, path, not problem, problem)
        return cls(entries, skipped)

    def get(self, name: str, param: str) -> Entry:
        from caa_local.serve.errors import ApiError

        if not isinstance(name, str) or not NAME.match(name):
            raise ApiError(f"{param}: {name!r} is not a vector id (ids are names from GET /v1/vectors, "
                           "never paths)", "invalid_request", param, "invalid_vector_name")
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise ApiError(f"{param}: no vector named {name!r} (available: {known})", "not_found", param,
                           "unknown_vector")
        if not entry.fits:
            raise ApiError(f"{param}: vector {name!r} does not fit the loaded model: {entry.problem}",
                           "invalid_request", param, "vector_mismatch")
        return entry

    def describe(self) -> list[dict[str, Any]]:
        return [describe_entry(entry) for entry in sorted(self.entries.values(), key=lambda e: e.name)]


def calibration(vector: ControlVector) -> dict[str, Any] | None:
    """The calibration summary (metadata `caa.calibration`, JSON with a `curve` list), or None."""
    raw = vector.metadata.get("calibration")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("curve"), list):
        return None
    curve = [p for p in data["curve"] if isinstance(p, dict) and _finite(p.get("multiplier"))]
    return {**data, "curve": curve} if curve else None


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def describe_entry(entry: Entry) -> dict[str, Any]:
    vector = entry.vector
    return {
        "id": entry.name,
        "object": "vector",
        "kind": vector.kind,
        "behavior": vector.metadata.get("behavior", ""),
        "layers": vector.layers,
        "model_hint": vector.model_hint,
        "n_embd": vector.n_embd,
        "recommended_layer": vector.recommended_layer(),
        "recommended_multiplier": vector.recommended_multiplier(),
        "fits": entry.fits,
        "problem": entry.problem or None,
        "calibration": calibration(vector),
    }
