"""Feature squeezing's squeezers (Xu, Evans & Qi, NDSS 2018), run in the classifier's own ONNX Runtime pass.

A squeezer maps a batch of images in [0, 1] to a coarser copy: ``bit_depth_<b>`` keeps b bits per pixel,
``median_2x2`` is a 2x2 median filter over the two trailing (spatial) axes. :func:`run_with_squeezers`
stacks the inputs and their squeezed copies into one larger batch, so feature squeezing costs one ONNX
Runtime call like every other scorer (the batch is (1 + n_squeezers) times larger).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.ndimage import median_filter

from detector.capture import Capture
from detector.errors import InvalidInput
from detector.model import OnnxClassifier

__all__ = ["SQUEEZERS", "bit_depth", "median_2x2", "run_with_squeezers", "squeeze"]


def bit_depth(x: np.ndarray, bits: int) -> np.ndarray:
    """Reduce pixels in [0, 1] to ``bits`` bits: ``round(x (2^b - 1)) / (2^b - 1)``, same shape and dtype."""
    levels = np.float32(2**bits - 1)
    return (np.rint(np.clip(x, 0.0, 1.0) * levels) / levels).astype(x.dtype)


def median_2x2(x: np.ndarray) -> np.ndarray:
    """2x2 median filter over the last two axes of (n_samples, ..., H, W) images (edges reflected).

    An even window has no centre: scipy's window for size 2 covers the pixel and its upper/left
    neighbours, and of four values it takes the upper middle one (rank 2 of 0..3). Xu et al.'s code
    (EvadeML-Zoo) makes the same ``scipy.ndimage.median_filter`` call.
    """
    if x.ndim < 3:
        raise InvalidInput(f"median_2x2 needs images (n_samples, ..., H, W), got shape {x.shape}")
    return median_filter(x, size=(1,) * (x.ndim - 2) + (2, 2), mode="reflect")


#: Squeezer name -> function of a float32 batch.
SQUEEZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    **{f"bit_depth_{b}": (lambda x, b=b: bit_depth(x, b)) for b in range(1, 8)},
    "median_2x2": median_2x2,
}


def squeeze(name: str, x: np.ndarray) -> np.ndarray:
    """The squeezed copy ``SQUEEZERS[name](x)``; raises InvalidInput for an unknown name."""
    if name not in SQUEEZERS:
        raise InvalidInput(f"unknown squeezer {name!r}; expected one of {', '.join(SQUEEZERS)}")
    return SQUEEZERS[name](x)


def run_with_squeezers(model: OnnxClassifier, x: np.ndarray, names: Sequence[str]) -> Capture:
    """One ONNX Runtime run over ``x`` and its squeezed copies; the capture of ``x`` with ``squeezed_logits``.

    Parameters
    ----------
    model : OnnxClassifier
    x : ndarray of shape (n_samples, ...) matching the model's input
    names : sequence of str
        Squeezers (keys of :data:`SQUEEZERS`); empty: a plain :meth:`OnnxClassifier.run`.

    Returns
    -------
    Capture
        Inputs, logits and activations of ``x`` alone; ``squeezed_logits[name]`` of shape (n_samples, n_classes).
    """
    if not names:
        return model.run(x)
    x = model.validate(x)
    n = len(x)
    stacked = model.run(np.concatenate([x, *(squeeze(name, x) for name in names)]))
    return Capture(inputs=x, logits=stacked.logits[:n], activations={k: v[:n] for k, v in stacked.activations.items()},
                   squeezed_logits={name: stacked.logits[(i + 1) * n:(i + 2) * n] for i, name in enumerate(names)})


def run_batches_with_squeezers(model: OnnxClassifier, x: np.ndarray, names: Sequence[str],
                               batch_size: int | None = None) -> Capture:
    """:func:`run_with_squeezers` over ``x`` in batches of ``batch_size`` (bounded memory), concatenated.

    The default batch is :meth:`OnnxClassifier.batch_size` for the input and its squeezed copies. The
    result holds every captured tensor of every input: for many inputs of a large model, stream instead
    (:func:`detector.stream.reduced_capture`).
    """
    batch_size = batch_size or model.batch_size(copies=1 + len(names))
    return Capture.concatenate([run_with_squeezers(model, x[i:i + batch_size], names)
                                for i in range(0, len(x), batch_size)])


#: Inputs :func:`default_squeezers` reads at most.
SQUEEZER_CHOICE_INPUTS = 1000


def default_squeezers(model: OnnxClassifier, x: np.ndarray, y: np.ndarray, max_drop: float = 0.01,
                      max_inputs: int = SQUEEZER_CHOICE_INPUTS) -> list[str]:
    """Xu et al.'s squeezers for this model, chosen on clean data: the fewest bits that cost little accuracy.

    Returns ``["bit_depth_<b>", "median_2x2"]`` (the median filter only for image inputs) with b the smallest
    bit depth in 1..7 whose accuracy on clean ``x`` (n_samples, ...) with labels ``y`` stays within
    ``max_drop`` of the unsqueezed accuracy (Xu et al. pick squeezers that keep accuracy: 1 bit on MNIST).
    Only the first ``max_inputs`` inputs are read, batch by batch (``x`` may be any array or
    :class:`~detector.data.Rows` sliced by ``x[a:b]``): each bit depth tried is a pass over them.
    """
    n = min(len(x), int(max_inputs))
    size = model.batch_size()

    def accuracy(squeezer: Callable[[np.ndarray], np.ndarray] = lambda batch: batch) -> float:
        correct = 0
        for start in range(0, n, size):
            batch = model.validate(x[start:min(start + size, n)])
            correct += int(np.sum(model.run(squeezer(batch)).predicted == y[start:start + len(batch)]))
        return correct / n

    clean = accuracy()
    bits = next((b for b in range(1, 8) if accuracy(lambda batch, b=b: bit_depth(batch, b)) >= clean - max_drop), 7)
    return [f"bit_depth_{bits}"] + (["median_2x2"] if len(x.shape) >= 4 else [])
