"""Domain errors raised by the detector library.

They subclass built-in exceptions and know nothing of any transport: the gRPC service maps them to
status codes in one place, the CLI turns them into a message and a non-zero exit code.
"""

from __future__ import annotations

__all__ = ["AdvDetectError", "InvalidInput", "ModelError", "BaselineError", "NotReady", "DataError"]


class AdvDetectError(Exception):
    """Base class of every error a user of advdetect can cause."""


class InvalidInput(AdvDetectError, ValueError):
    """A request or batch is not what the model expects (shape, dtype, NaN/Inf, empty, unknown layer)."""


class ModelError(AdvDetectError, ValueError):
    """A model file cannot be used: not ONNX, no classifier-shaped output, unsupported structure."""


class DataError(AdvDetectError, ValueError):
    """A data set cannot be read: missing file, unknown format, mismatched lengths."""


class BaselineError(AdvDetectError, ValueError):
    """A baseline artifact is missing, corrupt, from a newer schema or made for another model."""


class NotReady(AdvDetectError, RuntimeError):
    """The detector was used before it was fitted or loaded."""
