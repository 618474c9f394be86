"""The result of one inference pass: inputs, logits and the captured hidden activations.

A captured layer is named by its *capture key*: the ONNX tensor name for the whole tensor, or
``mean(<tensor>)`` (:func:`channel_means`) for its per-channel means, which ONNX Runtime computes inside the
graph (a ReduceMean over every axis after the channel axis), so that a wide conv map never leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Capture", "channel_means", "mean_source", "softmax"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits`` of shape (n_samples, n_classes), computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def channel_means(tensor: str) -> str:
    """Capture key of the per-channel means of ``tensor``: ``"mean(<tensor>)"``.

    For a per-sample shape (C, d1, d2, ...) the means are over d1, d2, ... (global average pooling of a conv
    map (C, H, W); for a token sequence (T, D), the mean over D of each token), shape (C,).
    """
    return f"mean({tensor})"


def mean_source(key: str) -> str | None:
    """The tensor whose channel means ``key`` names, or None when ``key`` is not of the ``mean(...)`` form."""
    return key[5:-1] if key.startswith("mean(") and key.endswith(")") else None


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class Capture:
    """What one ONNX Runtime run returns for a batch.

    Attributes
    ----------
    inputs : ndarray of shape (n_samples, ...), float32, or None
        The batch as it was fed to the model (pixels in [0, 1] for the bundled data readers); None in a
        reduced capture (:meth:`reduced`), which keeps only what the scorers read.
    logits : ndarray of shape (n_samples, n_classes), float32
        The classifier's output.
    activations : dict of str to ndarray of shape (n_samples, ...)
        Captured intermediate tensors keyed by capture key (the ONNX tensor name, or ``mean(<tensor>)`` for
        its channel means, shape (n_samples, C)), in graph (topological) order.
    squeezed_logits : dict of str to ndarray of shape (n_samples, n_classes)
        Logits of squeezed copies of the inputs (feature squeezing), keyed by squeezer name; computed in
        the same ONNX Runtime run (:func:`detector.squeeze.run_with_squeezers`). Empty unless asked for, and
        in a reduced capture.
    features : dict of str to ndarray of shape (n_samples, ...)
        Per-input features that scorers derived from this batch's large tensors (:meth:`Scorer.reduce
        <detector.scorers.base.Scorer.reduce>`) before the tensors were dropped: a scorer reads its own
        features here when they are present, and computes them from the tensors otherwise. Empty unless
        the capture was reduced.
    """

    inputs: np.ndarray | None
    logits: np.ndarray
    activations: Mapping[str, np.ndarray] = field(default_factory=dict)
    squeezed_logits: Mapping[str, np.ndarray] = field(default_factory=dict)
    features: Mapping[str, np.ndarray] = field(default_factory=dict)

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
            inputs=None if self.inputs is None else self.inputs[index],
            logits=self.logits[index],
            activations={k: v[index] for k, v in self.activations.items()},
            squeezed_logits={k: v[index] for k, v in self.squeezed_logits.items()},
            features={k: v[index] for k, v in self.features.items()},
        )

    def reduced(self, keep: Sequence[str], features: Mapping[str, np.ndarray]) -> "Capture":
        """A copy without the inputs and with only the activations ``keep``, plus per-input ``features``.

        What streaming keeps of a batch (:func:`detector.stream.reduced_capture`): the logits, the small tensors
        the scorers read (channel means, dense layers) and the features scorers derived from the rest (the
        squeezed copies' logits are dropped too: feature squeezing keeps its score). The kept arrays are
        copied, so that they hold no view of the batch's large outputs.
        """
        kept = set(keep)
        return Capture(inputs=None, logits=self.logits.copy(),
                       activations={k: v.copy() for k, v in self.activations.items() if k in kept},
                       features={**self.features, **features})

    @staticmethod
    def concatenate(parts: "list[Capture]") -> "Capture":
        """Stack captures of several batches (same layers) along the sample axis."""
        if not parts:
            raise ValueError("no captures to concatenate")
        first = parts[0]
        return Capture(
            inputs=None if first.inputs is None else np.concatenate([p.inputs for p in parts]),
            logits=np.concatenate([p.logits for p in parts]),
            activations={n: np.concatenate([p.activations[n] for p in parts]) for n in first.activations},
            squeezed_logits={n: np.concatenate([p.squeezed_logits[n] for p in parts]) for n in first.squeezed_logits},
            features={n: np.concatenate([p.features[n] for p in parts]) for n in first.features},
        )
