"""Helpers several commands share; commands import this, never each other's modules for it."""

from __future__ import annotations

from pathlib import Path

from caa_local.core.errors import CaaError


BACKEND_HELP = ("native: llama.cpp on the GGUF itself (no torch, quantized memory); torch: transformers, the "
                "reference; auto: native for a GGUF (and the default model), torch for HF directories and hub ids.")


def resolve_backend(backend: str, model_ref: str | None) -> str:
    """'native' or 'torch' for --backend and --model; a clear error where they do not fit."""
    if backend == "torch":
        return "torch"
    path = Path(model_ref).expanduser() if model_ref is not None else None
    if path is not None and not path.is_file():
        if backend == "auto" and (path.is_dir() or not model_ref.endswith(".gguf")):
            return "torch"
        if model_ref.endswith(".gguf") and not path.exists():
            raise CaaError(f"{model_ref}: no such model file")
        what = "a directory" if path.is_dir() else "not a file (a hub id?)"
        raise CaaError(f"{model_ref}: --backend native needs a .gguf file, this is {what} "
                       "(use --backend torch for Hugging Face models)")
    return "native"


def target_path(vector_path: Path, out: Path | None, force: bool, already: bool) -> Path:
    """Where the calibrated file goes: --out, else the vector's own file (checked before any work).

    Updating the file in place only adds metadata (the directions stay as they are); replacing
    an earlier calibration, like overwriting another file, needs --force.
    """
    from caa_local.core.atomic import check_writable

    if out is not None and out.resolve() != vector_path.resolve():
        check_writable(out, force)
        return out
    if already and not force:
        raise CaaError(f"{vector_path}: already calibrated (use --force to replace it, or --out FILE)")
    return vector_path
