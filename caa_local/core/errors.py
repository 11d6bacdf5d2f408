"""Errors the library raises; only cli.py turns them into user-facing messages."""


class CaaError(Exception):
    """Base class: a problem with the user's input that deserves one clear message."""


class VectorFileError(CaaError):
    """A control-vector file is malformed or cannot be read or written."""


class ModelMismatchError(CaaError):
    """A vector does not fit the model it is applied to (n_embd, layer count, hint)."""


class LayerRangeError(CaaError):
    """A layer index that the model cannot steer."""


class DatasetError(CaaError):
    """A dataset file is malformed or has the wrong schema."""


class ModelLoadError(CaaError):
    """A model file cannot be found or loaded."""
