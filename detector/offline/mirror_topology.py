"""Differentiable induced-graph topology features (persistence and Betti density), for adaptive attacks only.

The per-input features of :class:`detector.topology.graph_features.InducedGraphFeatures` are piecewise smooth in
the activations: once the maximum spanning forest (MSF) of the induced graph is fixed, every H0 death is
the weight phi(u, v) = |w_{u->v} h_u| of one forest edge, a differentiable function of the input through
h_u. :class:`TopologyMirror` therefore

1. recomputes the forest of the current iterate with the serving kernel
   (:class:`detector.topology.induced_forest.InducedForest`, on the detached activations), which returns the
   forest's edges, and
2. re-weighs exactly those edges in torch, so that gradients flow through the selected edges (the
   forest choice itself is treated as locally constant: a BPDA-style step, Athalye et al. 2018).

Persistence summaries (quantiles, p-norm, persistent entropy, merged fraction, per layer pair) are then
the same formulas as :func:`detector.topology.persistence.h0_features_by_group`, in torch.

The Betti-density signature counts forest deaths above a cut c(rho), the k-th largest edge weight
(k = ceil(rho m)): beta0(rho) = |V| - M(rho), beta1(rho) = |E_rho| - M(rho), M(rho) = #{d_i >= c(rho)}.
The count is a step function; its smooth surrogate is

    M~(rho) = sum_i sigmoid((log d_i - log c(rho)) / tau),

with the cut edge re-weighed in torch too (its gradient moves the cut). The density is relative to m, the
number of non-zero edges, which jumps whenever a unit or pixel leaves zero (a lit background pixel adds
all its edges): |E_rho| (about rho m) gets the surrogate rho m~ with

    m~ = sum_pairs sum_u deg(u) s(h_u),   s(h) = 1 - exp(-|h| / (0.05 mean_{h_v != 0} |h_v|)),

deg(u) the unit's non-zero out-edges in the pair (a max-pool window counts once, through its maximum). With ``straight_through=True`` the forward value is the exact count and the backward pass
the surrogate's gradient; otherwise the surrogate is used both ways (for finite-difference checks).
"""

from __future__ import annotations

import numpy as np
import torch

from detector.topology.betti import strongest_cuts
from detector.capture import Capture
from detector.topology.graph_features import InducedGraphFeatures

__all__ = ["TopologyMirror", "straight_through"]


def _window_max(h: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Signed maximum of ``h`` over each max-pool window (rows of indices; index len(h) is padding)."""
    return torch.cat([h, h.new_full((1,), -torch.inf)])[windows].max(dim=1).values


def _scatter(n: int, parts: list[tuple[np.ndarray, torch.Tensor]]) -> torch.Tensor:
    """A float32 tensor (n,) with ``values`` at ``rows`` for every (rows, values) of ``parts`` (differentiable)."""
    if not parts:
        return torch.zeros(n, dtype=torch.float32)
    index = torch.from_numpy(np.concatenate([rows for rows, _ in parts]))
    return torch.zeros(n, dtype=torch.float32).index_put((index,), torch.cat([values for _, values in parts]))


def straight_through(hard: torch.Tensor | np.ndarray | float, soft: torch.Tensor) -> torch.Tensor:
    """``hard`` in the forward pass, the gradient of ``soft`` in the backward pass: hard + soft - stop(soft)."""
    hard_t = torch.as_tensor(hard, dtype=soft.dtype)
    return hard_t + (soft - soft.detach())


class TopologyMirror:
    """Induced persistence and Betti-density features of a batch, differentiable given each input's forest.

    Parameters
    ----------
    features : InducedGraphFeatures
        The serving feature extractor (full graph, ``top_q == 1``); its graph, densities, quantiles and p
        are mirrored.
    temperature : float, default 0.05
        tau of the Betti-count surrogate, in units of log weight (0.05: a death 5 % above the cut counts
        about 0.73).
    straight_through : bool, default True
        Exact forward values with surrogate gradients (True), or the surrogate both ways (False).
    """

    def __init__(self, features: InducedGraphFeatures, temperature: float = 0.05, straight_through: bool = True):
        if features.forest is None:
            raise ValueError("the mirror needs the full induced graph (top_q == 1); a sparsified graph has no forest kernel")
        self.features = features
        self.graph = features.graph
        self.temperature = float(temperature)
        self.straight_through = bool(straight_through)
        graph = self.graph
        self._edge_keys, self._edge_order = [], []
        self._pair_ptr = [0]
        for pair in graph.pairs:
            if pair.windows is None:  # (src, dst) -> position in the pair's edge arrays
                keys = pair.src.astype(np.int64) * graph.layer_sizes[pair.dst_layer] + pair.dst
                order = np.argsort(keys, kind="stable")
                self._edge_keys.append(keys[order])
                self._edge_order.append(order)
                self._pair_ptr.append(self._pair_ptr[-1] + len(pair.src))
            else:
                self._edge_keys.append(None)
                self._edge_order.append(None)
                self._pair_ptr.append(self._pair_ptr[-1] + len(pair.windows))
        self._src = [torch.from_numpy(p.src.astype(np.int64)) for p in graph.pairs]
        self._param = [torch.from_numpy(np.asarray(p.param, np.float32)) for p in graph.pairs]
        self._windows = [None if p.windows is None else torch.from_numpy(p.windows.astype(np.int64)) for p in graph.pairs]
        self._vertex_counts = [float(graph.n_vertices)] + [float(s) for s in features._pair_sizes]
        self._degree = [None if p.windows is not None else torch.from_numpy(np.bincount(
            p.src[np.asarray(p.param) != 0], minlength=graph.layer_sizes[p.src_layer]).astype(np.float64))
            for p in graph.pairs]

    def _sources(self, values: dict[str, torch.Tensor], i: int) -> list[torch.Tensor]:
        """Flat source values h of every pair for input ``i`` (views into ``values``)."""
        return [values[p.source_tensor][i].reshape(-1) for p in self.graph.pairs]

    def _all_weights(self, h: list[torch.Tensor]) -> np.ndarray:
        """Every edge's weight (float32, pairs in order; a max-pool pair's edges are its windows' arg-max edges)."""
        out = []
        with torch.no_grad():
            for p, hp in enumerate(h):
                if self._windows[p] is None:
                    out.append(torch.abs(self._param[p] * hp[self._src[p]]))
                else:
                    out.append(torch.abs(_window_max(hp, self._windows[p])))
        return torch.cat(out).numpy()

    def _edge_weight(self, h: list[torch.Tensor], edge: np.ndarray) -> torch.Tensor:
        """Differentiable weights of edges given by their global position in :meth:`_all_weights`."""
        ptr = np.asarray(self._pair_ptr)
        pair = np.searchsorted(ptr, edge, side="right") - 1
        parts = []
        for p in np.unique(pair):
            rows = np.flatnonzero(pair == p)
            local = torch.from_numpy(edge[rows] - ptr[p])
            if self._windows[p] is None:
                w = torch.abs(self._param[p][local] * h[p][self._src[p][local]])
            else:
                w = torch.abs(_window_max(h[p], self._windows[p][local]))
            parts.append((rows, w))
        return _scatter(len(edge), parts)

    def _forest_weights(self, h: list[torch.Tensor], merge_edges: np.ndarray, merge_pair: np.ndarray) -> torch.Tensor:
        """Differentiable weights (deaths) of the forest edges (u, v) (global vertex ids) of each layer pair."""
        graph = self.graph
        parts = []
        for p in np.unique(merge_pair):
            rows = np.flatnonzero(merge_pair == p)
            pair = graph.pairs[p]
            u = merge_edges[rows, 0] - graph.offsets[pair.src_layer]
            if self._windows[p] is None:
                v = merge_edges[rows, 1] - graph.offsets[pair.dst_layer]
                keys = u * graph.layer_sizes[pair.dst_layer] + v
                at = np.searchsorted(self._edge_keys[p], keys)
                local = torch.from_numpy(self._edge_order[p][at])
                w = torch.abs(self._param[p][local] * h[p][self._src[p][local]])
            else:
                w = torch.abs(h[p][torch.from_numpy(u.astype(np.int64))])
            parts.append((rows, w))
        return _scatter(len(merge_pair), parts)

    def _summaries(self, deaths: torch.Tensor, group: np.ndarray) -> torch.Tensor:
        """Rows of :func:`detector.topology.persistence.h0_features_by_group` in torch: whole diagram, then each pair."""
        q = torch.as_tensor(self.features.quantiles, dtype=torch.float64)
        p = self.features.p
        d_all = deaths.to(torch.float64)
        rows = []
        for r, n_vertices in enumerate(self._vertex_counts):
            d = d_all if r == 0 else d_all[torch.from_numpy(np.flatnonzero(group == r - 1))]
            k = d.shape[0]
            if k == 0:
                rows.append(torch.zeros(len(q) + 3, dtype=torch.float64))
                continue
            quantiles = torch.quantile(d, q)
            norm = d.max() if np.isinf(p) else (d ** p).sum() ** (1.0 / p)
            total = d.sum()
            if k > 1 and float(total.detach()) > 0:
                dlogd = (d * torch.log(torch.clamp(d, min=1e-300))).sum()
                entropy = (torch.log(total) - dlogd / total) / np.log(k)
            else:
                entropy = torch.zeros((), dtype=torch.float64)
            fraction = torch.tensor(k / n_vertices, dtype=torch.float64)
            rows.append(torch.cat([quantiles, norm.reshape(1), entropy.reshape(1), fraction.reshape(1)]))
        return torch.stack(rows).reshape(-1)

    def _edge_count(self, h: list[torch.Tensor]) -> torch.Tensor:
        """m~, the smooth count of non-zero edges (module notes), float64."""
        total = torch.zeros((), dtype=torch.float64)
        for p, hp in enumerate(h):
            if self._windows[p] is not None:
                hp = _window_max(hp, self._windows[p])
            magnitude = torch.abs(hp).to(torch.float64)
            live = magnitude.detach() > 0
            if not bool(live.any()):
                continue
            scale = 0.05 * magnitude.detach()[live].mean()
            lit = 1.0 - torch.exp(-magnitude / scale)
            total = total + (lit.sum() if self._degree[p] is None else (self._degree[p] * lit).sum())
        return total

    def _betti(self, h: list[torch.Tensor], deaths: torch.Tensor) -> torch.Tensor:
        """beta0(rho) / |V| then beta1(rho) / |V| (2 n_densities,), with the count surrogate of the module notes."""
        n = float(self.graph.n_vertices)
        densities = self.features.densities
        weights = self._all_weights(h)
        cut, n_kept = strongest_cuts(weights, densities)
        if cut.shape[0] == 0:  # no edge at all: beta0 = |V|, beta1 = 0 at every density
            return torch.cat([torch.ones(len(densities)), torch.zeros(len(densities))]).to(torch.float64)
        edge = np.array([np.flatnonzero(weights == np.float32(c))[0] for c in cut], dtype=np.int64)
        cut_t = self._edge_weight(h, edge).to(torch.float64)
        d = deaths.to(torch.float64)
        log_d = torch.log(torch.clamp(d, min=1e-30))
        soft = torch.sigmoid((log_d[None, :] - torch.log(cut_t)[:, None]) / self.temperature).sum(dim=1)
        kept_soft = torch.as_tensor(densities, dtype=torch.float64) * self._edge_count(h)
        if self.straight_through:
            hard = (d.detach().numpy()[None, :] >= cut[:, None]).sum(axis=1).astype(np.float64)
            merges, kept = straight_through(hard, soft), straight_through(n_kept.astype(np.float64), kept_soft)
        else:
            merges, kept = soft, kept_soft
        beta0 = (n - merges) / n
        beta1 = (kept - merges) / n
        return torch.cat([beta0, beta1])

    def transform(self, inputs: torch.Tensor, logits: torch.Tensor, activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Features of a batch: ``{"persistence": (n, n_persistence), "betti": (n, 2 n_densities)}``, float64.

        ``activations`` must hold every tensor of :attr:`InducedGraph.required_tensors` (torch, with the
        batch axis first); the forest of each input is computed from their detached values.
        """
        values = {self.graph.input_name: inputs, **activations}
        capture = Capture(inputs=inputs.detach().numpy(), logits=logits.detach().numpy(),
                          activations={k: v.detach().numpy() for k, v in activations.items()})
        persistence, betti = [], []
        for i in range(len(capture)):
            forest = self.features.forest.compute(capture, i)
            h = self._sources(values, i)
            deaths = self._forest_weights(h, np.asarray(forest.diagram.merge_edges), np.asarray(forest.merge_pair))
            persistence.append(self._summaries(deaths, np.asarray(forest.merge_pair)))
            betti.append(self._betti(h, deaths))
        return {"persistence": torch.stack(persistence), "betti": torch.stack(betti)}
