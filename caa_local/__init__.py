"""caa-local: Contrastive Activation Addition steering on llama.cpp.

Public API: ``ControlVector`` (vector files), ``Model`` (a loaded GGUF) and ``Engine`` (a
context on it with live steering; ``Engine(path)`` loads the model and opens one context).
Nothing here imports torch; extraction lives in ``caa_local.torch.extract`` (the ``extract`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["ControlVector", "Engine", "Model", "Sampling", "__version__"]

if TYPE_CHECKING:
    from caa_local.engine.engine import Engine, Sampling
    from caa_local.engine.model import Model
    from caa_local.core.vector import ControlVector


def __getattr__(name: str) -> object:
    # Lazy, so `import caa_local` stays cheap and the CLI loads only what a command needs.
    if name == "ControlVector":
        from caa_local.core.vector import ControlVector

        return ControlVector
    if name == "Model":
        from caa_local.engine.model import Model

        return Model
    if name in ("Engine", "Sampling"):
        from caa_local.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'caa_local' has no attribute {name!r}")
