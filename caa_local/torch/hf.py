"""Loading models with transformers (torch), for extraction and the torch reference path.

Accepts a Hugging Face model directory, a hub id or a GGUF file. transformers dequantizes a
GGUF on every load (tens of seconds), so the converted weights and tokenizer are cached with
``save_pretrained`` under ``$CAA_LOCAL_CACHE`` (default ``~/.cache/caa-local``) in
``hf/<sha256 of the file>/<dtype>/``; file hashes are cached by (path, size, mtime).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caa_local.core.errors import ModelLoadError
from caa_local.core.locate import cache_root, cached_sha256, default_model_path, resolve_gguf
from caa_local.core.templates import ChatTemplate, resolve_template

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DONE_MARKER = "caa-local.json"  # written last: a cache dir without it is incomplete


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded: ``name`` is the file name, directory or hub id."""

    name: str
    source: str  # "gguf", "dir" or "hub"
    path: Path | None
    sha256: str | None  # of the GGUF file; None for directories and hub ids
    arch: str  # transformers model_type, e.g. "llama" (the control vector's model_hint)
    n_layer: int
    n_embd: int
    dtype: str
    from_cache: bool = False


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _placement(device: str) -> dict[str, Any]:
    if device == "auto":
        return {"device_map": "auto"}
    if device == "cpu":
        return {}
    return {"device_map": {"": device}}


def _from_pretrained(where: str, what: str, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_kwargs = {k: v for k, v in kwargs.items() if k == "gguf_file"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{what}: transformers cannot load this model ({first})") from err
    return model.eval(), tokenizer


def _save_cache(model: Any, tokenizer: Any, target: Path, meta: dict[str, Any]) -> None:
    """Save a dequantized GGUF model to ``target`` atomically (temp dir, then rename)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer, "packed_modules", None):
        return  # weights kept packed (GGUF kernels installed): nothing dense to save
    # The weights are plain dense tensors now; only the quantizer marker blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if target.exists() and not (target / _DONE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)  # a leftover without the marker
        with contextlib.suppress(OSError):  # another process may have won the race: keep theirs
            os.rename(tmp, target)
    except OSError as err:
        warnings.warn(f"{target}: could not cache the converted model ({err})", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(path: Path, dtype: str, device: str) -> tuple[Any, Any, str, bool]:
    resolve_gguf(path)  # the magic check
    sha = cached_sha256(path)
    target = cache_root() / "hf" / sha / dtype
    kwargs = {"dtype": _torch_dtype(dtype), **_placement(device)}
    if (target / _DONE_MARKER).is_file():
        with contextlib.suppress(ModelLoadError):
            model, tokenizer = _from_pretrained(str(target), f"{target} (cache of {path})", **kwargs)
            return model, tokenizer, sha, True
        warnings.warn(f"{target}: unreadable cache, converting {path} again", stacklevel=3)
        shutil.rmtree(target, ignore_errors=True)
    model, tokenizer = _from_pretrained(str(path.parent), str(path), gguf_file=path.name, **kwargs)
    meta = {"gguf": str(path), "sha256": sha, "dtype": dtype, "created": time.time()}
    _save_cache(model, tokenizer, target, meta)
    return model, tokenizer, sha, False


def load_hf(
    model: str | Path | None = None, device: str = "cpu", dtype: str = "float32"
) -> tuple[Any, Any, ModelInfo]:
    """Load (model, tokenizer, info) from a HF directory, a hub id or a .gguf file.

    ``None`` is the default model. ``device``: "cpu", "cuda", "cuda:1", ... or "auto"
    (accelerate's ``device_map="auto"``, spreading a big model over GPUs and CPU).
    """
    _torch_dtype(dtype)
    path: Path | None = default_model_path() if model is None else Path(model).expanduser()
    from_cache = False
    sha: str | None = None
    if path is not None and path.is_file():
        source = "gguf"
        name = path.name
        hf_model, tokenizer, sha, from_cache = _load_gguf(path, dtype, device)
    elif path is not None and path.is_dir():
        source, name = "dir", str(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no config.json (expected a Hugging Face model directory)")
        kwargs = {"dtype": _torch_dtype(dtype), **_placement(device)}
        hf_model, tokenizer = _from_pretrained(str(path), str(path), **kwargs)
    else:
        text = str(model)
        looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
        if not looks_like_hub_id or text.endswith(".gguf"):
            raise ModelLoadError(
                f"{text}: no such file or directory (expected a .gguf file, a model directory "
                "or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct')"
            )
        source, name, path = "hub", text, None
        kwargs = {"dtype": _torch_dtype(dtype), **_placement(device)}
        hf_model, tokenizer = _from_pretrained(text, text, **kwargs)
    config = hf_model.config
    info = ModelInfo(
        name=name,
        source=source,
        path=path,
        sha256=sha,
        arch=str(config.model_type),
        n_layer=int(config.num_hidden_layers),
        n_embd=int(config.hidden_size),
        dtype=dtype,
        from_cache=from_cache,
    )
    return hf_model, tokenizer, info


def chat_template_of(tokenizer: Any, spec: str | None = None, fmt: str = "chat", where: str = "model") -> ChatTemplate:
    """The template for a Hugging Face tokenizer, chosen as for a GGUF (``Model.chat_template``):
    ``--chat-template``/``--format base``, else the tokenizer's own, refused when it has none."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: use the default one
        source = source.get("default") or next(iter(source.values()), None)
    return resolve_template(source, spec, fmt, tokenizer.bos_token or "", tokenizer.eos_token or "", where)


def set_threads(n_threads: int) -> None:
    """torch's CPU threads (0: leave torch's default)."""
    if n_threads:
        torch.set_num_threads(n_threads)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's decoder blocks: block L's output is CAA layer L."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ModelLoadError(f"{type(model).__name__}: cannot find its decoder blocks")


def input_device(model: Any) -> torch.device:
    """Where input ids must go (the embedding's device, also under device_map='auto')."""
    return model.get_input_embeddings().weight.device
