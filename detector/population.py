"""Population monitor: Betti curves of a window of recent requests against clean windows (Corneanu et al.).

A single adversarial input barely moves a population statistic, but a stream of them (an attack campaign,
a shifted input distribution) changes the functional graph of the hidden units. At calibration we draw
``n_windows`` random windows of ``window_size`` clean inputs, compute each window's population Betti curves
(beta1..beta3 of the clique complexes of the |Pearson| correlation graph at several densities), and keep
their mean curve m and the mean L1 distance of a clean window to it. A live window with curves c gets

    a = ||c - m||_1 / mean_i ||c_i - m||_1,

about 1 for windows like the clean ones and larger for windows unlike them. (A per-point z-score was
tried first and rejected: many curve points are 0 in every clean window, so a single cavity seen in a
live window gave arbitrarily large scores.)
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from detector.betti import DEFAULT_POPULATION_DENSITIES, NodeSelector, population_betti_curves
from detector.errors import InvalidInput, NotReady

__all__ = ["PopulationMonitor"]


class PopulationMonitor:
    """Reference population Betti curves of clean windows, and the anomaly score of a live window.

    Parameters
    ----------
    window_size : int
        Inputs per window (the service's rolling window uses the same size).
    n_windows : int
        Clean windows drawn (with replacement across windows) at calibration.
    node_budget : int
        Nodes of the functional graph (:class:`~detector.betti.NodeSelector`).
    densities : sequence of float
        Graph densities of the curves.
    max_dim : int
        Highest Betti number computed.
    seed : int
        Seed of the window draws.
    """

    def __init__(self, window_size: int = 128, n_windows: int = 20, node_budget: int = 48,
                 densities: Any = tuple(DEFAULT_POPULATION_DENSITIES), max_dim: int = 3, seed: int = 0):
        self.window_size = window_size
        self.n_windows = n_windows
        self.node_budget = node_budget
        self.densities = [float(d) for d in densities]
        self.max_dim = max_dim
        self.seed = seed

    def params(self) -> dict[str, Any]:
        """Constructor parameters, JSON-able."""
        return {"window_size": self.window_size, "n_windows": self.n_windows, "node_budget": self.node_budget,
                "densities": self.densities, "max_dim": self.max_dim, "seed": self.seed}

    def fit(self, activations: Mapping[str, np.ndarray]) -> "PopulationMonitor":
        """Choose nodes on clean ``activations`` and compute the clean windows' curves; return self."""
        n = len(next(iter(activations.values())))
        if n < self.window_size:
            raise InvalidInput(f"population monitor: {n} clean inputs, fewer than one window of {self.window_size}")
        self.selector_ = NodeSelector(self.node_budget).fit(activations)
        values = self.selector_.transform(activations)
        rng = np.random.default_rng(self.seed)
        curves = np.stack([
            self.curves(values[rng.choice(n, self.window_size, replace=False)]) for _ in range(self.n_windows)
        ])
        self.reference_mean_ = curves.mean(axis=0)
        distances = np.abs(curves - self.reference_mean_).sum(axis=(1, 2))
        self.reference_scale_ = np.array(max(float(distances.mean()), 1e-12))
        self.clean_scores_ = distances / self.reference_scale_
        return self

    def curves(self, node_values: np.ndarray) -> np.ndarray:
        """Betti curves (max_dim, n_densities) of one window's node values (window_size, n_nodes)."""
        return population_betti_curves(node_values, np.asarray(self.densities), self.max_dim)


    def node_values(self, activations: Mapping[str, np.ndarray]) -> np.ndarray:
        """Node values (n, n_nodes) of captured activations: what the service keeps per request."""
        if not hasattr(self, "selector_"):
            raise NotReady("PopulationMonitor is not fitted")
        return self.selector_.transform(activations)

    def score(self, node_values: np.ndarray) -> float:
        """Anomaly score of a window of node values (window_size, n_nodes); higher = less like clean windows."""
        if not hasattr(self, "reference_mean_"):
            raise NotReady("PopulationMonitor is not fitted")
        return float(np.abs(self.curves(node_values) - self.reference_mean_).sum() / self.reference_scale_)

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Parameters and arrays (the node selector's included, under ``selector/``)."""
        sel_params, sel_arrays = self.selector_.get_state()
        arrays = {"reference_mean": self.reference_mean_, "reference_scale": self.reference_scale_,
                  "clean_scores": self.clean_scores_, **{f"selector/{k}": v for k, v in sel_arrays.items()}}
        return {**self.params(), "selector": sel_params}, arrays

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> "PopulationMonitor":
        """Rebuild from :meth:`get_state`'s output."""
        params = dict(params)
        sel_params = params.pop("selector")
        monitor = cls(**params)
        monitor.selector_ = NodeSelector.from_state(
            sel_params, {k.removeprefix("selector/"): v for k, v in arrays.items() if k.startswith("selector/")})
        monitor.reference_mean_ = np.asarray(arrays["reference_mean"])
        monitor.reference_scale_ = np.asarray(arrays["reference_scale"])
        monitor.clean_scores_ = np.asarray(arrays["clean_scores"])
        return monitor
