"""Stock llama.cpp through llama-cpp-python's low-level (ctypes) API: the baselines the bench
compares caa-local with, set up as llama.cpp's own CLI sets itself up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def attach_cli_threadpool(lc: Any, ctx: Any, threads: int) -> Callable[[], None] | None:
    """Attach a persistent CPU threadpool with llama.cpp's default polling to ``ctx``, as
    llama.cpp's CLI (common_init_from_params) does; llama-cpp-python does not bind these calls,
    so they go through ctypes. Returns the pool's free function (call it after freeing the
    context), or None when the libraries do not offer them."""
    import ctypes

    class PoolParams(ctypes.Structure):  # ggml.h: struct ggml_threadpool_params
        _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                    ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]

    libs = Path(lc.__file__).parent / "lib"
    try:
        base = ctypes.CDLL(str(next(libs.glob("*ggml-base.*"))))
        cpu = ctypes.CDLL(str(next(libs.glob("*ggml-cpu.*"))))
        attach = ctypes.CDLL(str(next(libs.glob("*llama.*")))).llama_attach_threadpool
    except (StopIteration, OSError, AttributeError):
        return None
    base.ggml_threadpool_params_default.restype = PoolParams
    base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
    cpu.ggml_threadpool_new.restype = ctypes.c_void_p
    cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(PoolParams)]
    attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    attach.restype = None
    params = base.ggml_threadpool_params_default(threads)
    pool = cpu.ggml_threadpool_new(ctypes.byref(params))
    if not pool:
        return None
    attach(ctx, pool, None)
    cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    return lambda: cpu.ggml_threadpool_free(pool)


class LlamaCppDecoder:
    """Stock llama.cpp through llama-cpp-python's low-level (ctypes) API: the same GGUF, context
    size, batch and threads as the Engine, a persistent threadpool as llama.cpp's CLI attaches,
    a greedy sampler chain, one llama_decode per token. Its rate is llama.cpp's own timing, as
    llama-completion reports it: eval time plus sampling time per generated token (the Python
    loop around the calls is not counted)."""

    def __init__(self, model_path: str, n_ctx: int, threads: int, flash_attn: int, n_batch: int = 512) -> None:
        import llama_cpp as lc

        self.lc = lc
        self.model = lc.llama_model_load_from_file(model_path.encode(), lc.llama_model_default_params())
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = False
        params.flash_attn_type = flash_attn  # the Engine's (Model.native.flash_attn): like for like
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.threadpool = attach_cli_threadpool(lc, self.ctx, threads)
        self.vocab = lc.llama_model_get_vocab(self.model)

    def decode_rate(self, prompt: list[int], max_tokens: int) -> float:
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        tokens = (lc.llama_token * len(prompt))(*prompt)
        if lc.llama_decode(self.ctx, lc.llama_batch_get_one(tokens, len(prompt))) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        chain_params = lc.llama_sampler_chain_default_params()
        chain_params.no_perf = False
        sampler = lc.llama_sampler_chain_init(chain_params)
        lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_greedy())
        lc.llama_perf_context_reset(self.ctx)
        one = (lc.llama_token * 1)()
        try:
            for _ in range(max_tokens):
                token = lc.llama_sampler_sample(sampler, self.ctx, -1)
                if lc.llama_vocab_is_eog(self.vocab, token):
                    break
                one[0] = token
                if lc.llama_decode(self.ctx, lc.llama_batch_get_one(one, 1)) != 0:
                    raise RuntimeError("llama_decode failed")
            perf, sampling = lc.llama_perf_context(self.ctx), lc.llama_perf_sampler(sampler)
        finally:
            lc.llama_sampler_free(sampler)
        return perf.n_eval / ((perf.t_eval_ms + sampling.t_sample_ms) / 1e3)

    def close(self) -> None:
        self.lc.llama_free(self.ctx)
        if self.threadpool:
            self.threadpool()
        self.lc.llama_model_free(self.model)
