"""The activation-space map of Pardo et al. (2019): 2-D introspection codes over the estimated error.

Each input is a point z in the 2-D latent space of the introspection autoencoder (coloured by its true
class, misclassified inputs marked); the background is the error estimator's log10 e-hat evaluated on
a grid of codes, so fringe areas where the classifier errs show up as hot regions (the paper's Fig. 2
and 6). Adversarial inputs can be drawn on top.

Matplotlib is used through its object API with the Agg canvas, so nothing touches pyplot's global state
or needs a display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from detector.errors import InvalidInput

__all__ = ["plot_activation_map", "ErrorEstimator"]


class ErrorEstimator(Protocol):
    """Anything with ``estimate_log10_error(z) -> ndarray`` (e.g. a fitted IntrospectionScorer)."""

    def estimate_log10_error(self, z: np.ndarray) -> np.ndarray: ...


def _as_codes(name: str, codes: np.ndarray) -> np.ndarray:
    z = np.asarray(codes, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != 2:
        raise InvalidInput(f"{name} must have shape (n, 2) (a 2-D latent space), got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise InvalidInput(f"{name} contain NaN or Inf")
    return z


def plot_activation_map(
    codes: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    estimator: ErrorEstimator | Callable[[np.ndarray], np.ndarray],
    out_png: str | os.PathLike[str],
    adversarial_codes: np.ndarray | None = None,
    grid_size: int = 150,
    margin: float = 0.1,
    title: str | None = None,
) -> Path:
    """Draw the activation map and write it to ``out_png``.

    Parameters
    ----------
    codes : ndarray of shape (n_samples, 2)
        Introspection codes z of clean (e.g. calibration) inputs, from ``IntrospectionScorer.transform``.
    labels : ndarray of shape (n_samples,), int
        True classes; they set the colours.
    predicted : ndarray of shape (n_samples,), int
        The classifier's outputs; points with ``predicted != labels`` get a black cross.
    estimator : object with ``estimate_log10_error`` or callable
        Maps grid codes (m, 2) to log10 e-hat (m,), drawn as the background heat map.
    out_png : path
        Where the PNG goes; parent folders must exist.
    adversarial_codes : ndarray of shape (n_adv, 2), optional
        Codes of adversarial (or otherwise suspect) inputs, drawn as red triangles on top.
    grid_size : int, default=150
        The background is evaluated on grid_size x grid_size codes.
    margin : float, default=0.1
        The grid spans every point's bounding box, widened by this fraction of its size on each side.
    title : str, optional

    Returns
    -------
    Path
        ``out_png``.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    z = _as_codes("codes", codes)
    labels = np.asarray(labels).reshape(-1)
    predicted = np.asarray(predicted).reshape(-1)
    if len(z) == 0 or labels.shape != (len(z),) or predicted.shape != (len(z),):
        raise InvalidInput(
            f"codes, labels and predicted must have the same non-zero length, got {len(z)}, {labels.shape}, {predicted.shape}"
        )
    adv = None if adversarial_codes is None else _as_codes("adversarial_codes", adversarial_codes)
    if int(grid_size) < 2:
        raise InvalidInput(f"grid_size must be >= 2, got {grid_size}")
    evaluate = estimator.estimate_log10_error if hasattr(estimator, "estimate_log10_error") else estimator
    if not callable(evaluate):
        raise InvalidInput(f"estimator must be callable or have estimate_log10_error, got {type(estimator).__name__}")

    everything = z if adv is None else np.concatenate([z, adv])
    low, high = everything.min(axis=0), everything.max(axis=0)
    span = np.maximum(high - low, 1e-6)
    low, high = low - margin * span, high + margin * span
    gx, gy = np.meshgrid(np.linspace(low[0], high[0], grid_size), np.linspace(low[1], high[1], grid_size))
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    background = np.asarray(evaluate(grid), dtype=np.float64).reshape(grid_size, grid_size)

    fig = Figure(figsize=(7.5, 6.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # The colour range is that of the estimates at the plotted points: the estimator extrapolates
    # wildly far from the data, and those corners would otherwise wash out the map.
    at_points = np.asarray(evaluate(everything), dtype=np.float64).reshape(-1)
    vmin, vmax = float(at_points.min()), float(at_points.max())
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    mesh = ax.pcolormesh(gx, gy, background, cmap="Greys", vmin=vmin, vmax=vmax, shading="auto")
    fig.colorbar(mesh, ax=ax, label="estimated log10 error (log10 ê), clipped to the points' range")

    classes = np.unique(labels)
    cmap = colormaps["tab10"]
    handles = []
    for i, k in enumerate(classes):
        rows = labels == k
        colour = cmap(i % 10)
        ax.scatter(z[rows, 0], z[rows, 1], s=16, color=colour, edgecolors="black", linewidths=0.3)
        handles.append(Line2D([], [], marker="o", ls="", color=colour, label=str(k)))
    wrong = predicted != labels
    if wrong.any():
        ax.scatter(z[wrong, 0], z[wrong, 1], s=70, marker="X", color="black", edgecolors="white", linewidths=0.8)
        handles.append(Line2D([], [], marker="X", ls="", color="black", label=f"misclassified ({int(wrong.sum())})"))
    if adv is not None and len(adv):
        ax.scatter(adv[:, 0], adv[:, 1], s=30, marker="^", color="red", edgecolors="black", linewidths=0.4)
        handles.append(Line2D([], [], marker="^", ls="", color="red", label=f"adversarial ({len(adv)})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.25, 1.0), fontsize=8, title="true class")
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(title or "Activation map (self-introspection)")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, format="png")
    return out
