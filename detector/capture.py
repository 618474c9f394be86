"""The result of one inference pass: inputs, logits and the captured hidden activations."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

import numpy as np

__all__ = ["Capture", "softmax"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits`` of shape (n_samples, n_classes), computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class Capture:
    """What one ONNX Runtime run returns for a batch.

    Attributes
    ----------
    inputs : ndarray of shape (n_samples, ...), float32
        The batch as it was fed to the model (pixels in [0, 1] for the bundled data readers).
    logits : ndarray of shape (n_samples, n_classes), float32
        The classifier's output.
    activations : dict of str to ndarray of shape (n_samples, ...)
        Captured intermediate tensors keyed by ONNX tensor name, in graph (topological) order.
    squeezed_logits : dict of str to ndarray of shape (n_samples, n_classes)
        Logits of squeezed copies of the inputs (feature squeezing), keyed by squeezer name; computed in
        the same ONNX Runtime run (:func:`detector.squeeze.run_with_squeezers`). Empty unless asked for.
    """

    inputs: np.ndarray
    logits: np.ndarray
    activations: Mapping[str, np.ndarray] = field(default_factory=dict)
    squeezed_logits: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @cached_property
    def predicted(self) -> np.ndarray:
        """Predicted class per input, ndarray of shape (n_samples,), int64 (computed once, read-only)."""
        return _read_only(np.argmax(self.logits, axis=1).astype(np.int64))

    @cached_property
    def probabilities(self) -> np.ndarray:
        """Softmax of the logits, ndarray of shape (n_samples, n_classes), float64 (computed once, read-only)."""
        return _read_only(softmax(self.logits))

    def subset(self, index: np.ndarray | slice) -> "Capture":
        """The same capture restricted to the rows selected by ``index``."""
        return Capture(
            inputs=self.inputs[index],
            logits=self.logits[index],
            activations={k: v[index] for k, v in self.activations.items()},
            squeezed_logits={k: v[index] for k, v in self.squeezed_logits.items()},
        )

    @staticmethod
    def concatenate(parts: "list[Capture]") -> "Capture":
        """Stack captures of several batches (same layers) along the sample axis."""
        if not parts:
            raise ValueError("no captures to concatenate")
        names = list(parts[0].activations)
        return Capture(
            inputs=np.concatenate([p.inputs for p in parts]),
            logits=np.concatenate([p.logits for p in parts]),
            activations={n: np.concatenate([p.activations[n] for p in parts]) for n in names},
            squeezed_logits={n: np.concatenate([p.squeezed_logits[n] for p in parts]) for n in parts[0].squeezed_logits},
        )
