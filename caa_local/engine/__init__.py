"""The llama.cpp engine: the only package that imports the native extension (`_native`)."""

from caa_local.engine.engine import ContextFullError, Engine, GenerationResult, Sampling
from caa_local.engine.model import Model

__all__ = ["ContextFullError", "Engine", "GenerationResult", "Model", "Sampling"]
