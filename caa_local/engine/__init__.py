"""The llama.cpp engine: the only package that imports the native extension (`_native`)."""

from caa_local.engine.engine import ContextFullError, Engine, GenerationResult, Model, Sampling

__all__ = ["ContextFullError", "Engine", "GenerationResult", "Model", "Sampling"]
