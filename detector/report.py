"""The calibration report: ``report.html`` with PNG figures, written beside the baseline.

Figures: for every score, the histogram of the fit split against the held-out split (a scorer whose held-out
scores run far above its fit scores is overfitting the fit data); the fused statistic of each flag on
held-out clean inputs with its thresholds; the clean population Betti curves; the activation-space map of
the introspection model (Pardo et al., Fig. 2). A table says which scorer reads which captured layer, and
in which form (the whole tensor, or its channel means computed in the graph). Not read back when loading:
it is for people.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure

from detector.capture import mean_source
from detector.manifest import Manifest

__all__ = ["write_report"]


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path.name


def _histograms(fit: dict[str, np.ndarray], held: dict[str, np.ndarray], out: Path) -> str:
    names = list(held)
    cols = 3
    rows = int(np.ceil(len(names) / cols))
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        both = np.r_[fit[name], held[name]]
        bins = np.histogram_bin_edges(both[np.isfinite(both)], bins=30)
        ax.hist(fit[name], bins=bins, alpha=0.6, density=True, label="fit")
        ax.hist(held[name], bins=bins, alpha=0.6, density=True, label="held-out")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    return _save(fig, out / "scores.png")


def _fused(statistics: dict[str, np.ndarray], manifest: Manifest, out: Path) -> str:
    fig = Figure(figsize=(5 * len(manifest.flags), 3))
    for k, rule in enumerate(manifest.flags):
        ax = fig.add_subplot(1, len(manifest.flags), k + 1)
        ax.hist(statistics[rule.name], bins=30, color="grey")
        for t in rule.thresholds:
            ax.axvline(t.value, color="red", ls="--", lw=1)
            ax.text(t.value, ax.get_ylim()[1] * 0.9, f" FPR {t.target_fpr:g}", color="red", fontsize=7)
        ax.set_title(f"{rule.name}: Fisher statistic, held-out clean", fontsize=9)
    return _save(fig, out / "fused.png")


def _betti(reference_mean: np.ndarray, densities: list[float], out: Path) -> str:
    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot(1, 1, 1)
    for k, curve in enumerate(reference_mean):
        ax.plot(densities, curve, marker="o", ms=3, label=f"beta{k + 1}")
    ax.set(xlabel="density", ylabel="Betti number / node", title="clean population Betti curves (window mean)")
    ax.legend(fontsize=8)
    return _save(fig, out / "betti_curves.png")


def write_report(out: Path, manifest: Manifest, fit_scores: dict[str, np.ndarray], held_scores: dict[str, np.ndarray],
                 statistics: dict[str, np.ndarray], reference_curves: np.ndarray,
                 activation_map: Callable[[Path], None] | None = None,
                 layers: list[tuple[str, tuple[int, ...], list[str]]] = ()) -> Path:
    """Write the figures and ``report.html`` into ``out``; returns the HTML path.

    ``layers``: (capture key, per-sample shape, readers) of every captured layer
    (:func:`detector.calibration.layer_readers`).
    """
    figures = [("Scores: fit vs held-out clean inputs", _histograms(fit_scores, held_scores, out)),
               ("Fused statistics and thresholds", _fused(statistics, manifest, out)),
               ("Population Betti curves", _betti(reference_curves, manifest.population.get("densities", []), out))]
    if activation_map is not None:
        activation_map(out / "activation_map.png")
        figures.append(("Activation-space map (introspection codes over the estimated log10 error)", "activation_map.png"))
    rows = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{t.target_fpr:g}</td><td>{t.value:.4g}</td><td>{t.heldout_fpr:.4f}</td>"
        f"<td>{html.escape(r.describe())}</td></tr>"
        for r in manifest.flags for t in r.thresholds
    )
    body = "".join(f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>" for title, name in figures)
    layer_rows = "".join(
        f"<tr><td><code>{html.escape(mean_source(key) or key)}</code></td>"
        f"<td>{'channel means' if mean_source(key) else 'whole'}</td><td>{'x'.join(map(str, shape))}</td>"
        f"<td>{html.escape(', '.join(readers))}</td></tr>"
        for key, shape, readers in layers
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>advdetect baseline {html.escape(manifest.version)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>advdetect baseline {html.escape(manifest.version)}</h1>
<p>Model <code>{html.escape(manifest.model.file_name)}</code> (sha256 {manifest.model.sha256[:16]}...), data
<code>{html.escape(manifest.data.spec)}</code>: {manifest.data.n_samples} clean inputs, {manifest.data.describe_split()}, seed {manifest.data.seed}.</p>
<h2>Thresholds</h2><table><tr><th>flag</th><th>target FPR</th><th>threshold</th><th>held-out FPR</th><th>statistic</th></tr>{rows}</table>
<h2>Captured layers and their readers</h2><p>Channel means are computed inside the ONNX Runtime run (a ReduceMean over
the axes after the channel axis); topology: induced persistence and Betti density.</p>
<table><tr><th>layer</th><th>read as</th><th>shape per input</th><th>read by</th></tr>{layer_rows}</table>
{body}</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
