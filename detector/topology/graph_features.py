"""Per-input topological features of the induced graph: H0 persistence summaries and Betti-density signatures.

For each input of a :class:`~detector.capture.Capture`:

1. compute the H0 diagram of its induced graph under the superlevel filtration: for the full graph with
   :class:`detector.topology.induced_forest.InducedForest` (block by block, without listing the edges); with top-q
   sparsification by weighing the kept edges (:meth:`detector.topology.induced_graph.InducedGraph.edges`) and
   :func:`detector.topology.persistence.h0_persistence`;
2. summarise it (:func:`detector.topology.persistence.h0_features_by_group`) for the whole graph and for each layer pair, the
   pair's part being the persistent-subgraph (maximum spanning forest) edges that lie in that pair;
3. read the Betti-density signature beta0(rho), beta1(rho) off the same diagram and the edge weights
   (:func:`detector.topology.betti.betti_signature_from_weights`).
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from detector.topology.betti import DEFAULT_DENSITIES, betti_signature_from_weights, check_densities
from detector.capture import Capture
from detector.topology.induced_forest import InducedForest
from detector.topology.induced_graph import InducedGraph
from detector.topology.persistence import (
    DEFAULT_QUANTILES,
    h0_feature_names,
    h0_features_by_group,
    h0_features_of_descending,
    h0_persistence,
)

__all__ = ["InducedGraphFeatures"]


class InducedGraphFeatures:
    """Compute persistence and Betti-density features of each input's induced graph.

    Parameters
    ----------
    graph : InducedGraph
        The classifier's static induced-graph structure.
    top_q : float in (0, 1], default 1.0
        Fraction of edges kept per layer pair (strongest first); 1.0 is the exact full graph.
    densities : array-like, default :data:`detector.topology.betti.DEFAULT_DENSITIES`
        Density grid of the Betti signature.
    quantiles : sequence of float, default :data:`detector.topology.persistence.DEFAULT_QUANTILES`
    p : float, default 2.0
        Order of the total-persistence norm.

    Notes
    -----
    :meth:`transform` remembers its last result in each thread, so that two scorers reading the same
    capture (induced persistence and Betti density) compute the forest once, also when several threads
    score different requests at the same time.
    """

    def __init__(self, graph: InducedGraph, top_q: float = 1.0, densities: Sequence[float] = tuple(DEFAULT_DENSITIES),
                 quantiles: Sequence[float] = DEFAULT_QUANTILES, p: float = 2.0):
        self.graph = graph
        self.top_q = float(top_q)
        self.densities = check_densities(densities)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.p = float(p)
        self.forest = InducedForest(graph) if self.top_q == 1.0 else None
        self._pair_sizes = np.array([graph.layer_sizes[pr.src_layer] + graph.layer_sizes[pr.dst_layer] for pr in graph.pairs])
        # what the forest path hands h0_features_of_descending, checked once here
        self._vertex_counts = np.r_[graph.n_vertices, self._pair_sizes].astype(np.float64)
        self._quantile_array = np.asarray(self.quantiles, dtype=np.float64)
        h0_feature_names(self.quantiles, self.p)  # raises InvalidInput on bad quantiles or p
        self._memo = threading.local()  # per thread: the server scores requests in parallel

    def params(self) -> dict[str, object]:
        """Constructor parameters (JSON-able) and the graph's edge budget ``max_edges`` (None: the whole graph)."""
        return {"top_q": self.top_q, "densities": self.densities.tolist(), "quantiles": list(self.quantiles), "p": self.p,
                "max_edges": self.graph.max_edges}

    @property
    def persistence_names(self) -> list[str]:
        """Names of the columns of the ``persistence`` block: whole graph, then each layer pair."""
        base = h0_feature_names(self.quantiles, self.p)
        names = [f"graph/{n}" for n in base]
        for pair in self.graph.pair_names:
            names += [f"{pair}/{n}" for n in base]
        return names

    @property
    def betti_names(self) -> list[str]:
        """Names of the columns of the ``betti`` block: beta0 then beta1 at each density."""
        return [f"beta{k}/rho={r:.4g}" for k in (0, 1) for r in self.densities]

    def one(self, capture: Capture, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Persistence features (n_persistence,) and Betti signature (2 * n_densities,) of input ``i``."""
        if self.forest is not None:
            forest = self.forest.compute(capture, i)
            diagram, weights = forest.diagram, forest.weights
            persistence = h0_features_of_descending(diagram.deaths, forest.merge_pair, self._vertex_counts,
                                                    self._quantile_array, self.p)
        else:
            g = self.graph.edges(capture, i, top_q=self.top_q)
            diagram = h0_persistence(g.n_vertices, g.edges, g.weights)
            merge_pair = np.searchsorted(g.pair_ptr, diagram.merge_index, side="right") - 1
            weights = g.weights
            persistence = h0_features_by_group(diagram, merge_pair, self._pair_sizes, self.quantiles, self.p)
        betti = betti_signature_from_weights(self.graph.n_vertices, weights, diagram.deaths, self.densities)
        return persistence.reshape(-1), betti.reshape(-1)

    def transform(self, capture: Capture) -> dict[str, np.ndarray]:
        """Features of every input: ``{"persistence": (n, n_persistence), "betti": (n, 2 * n_densities)}``."""
        last = getattr(self._memo, "last", None)
        if last is not None and last[0] is capture:
            return last[1]
        rows = [self.one(capture, i) for i in range(len(capture))]
        out = {"persistence": np.stack([r[0] for r in rows]), "betti": np.stack([r[1] for r in rows])}
        self._memo.last = (capture, out)
        return out
