"""The maximum spanning forest of one input's induced graph, computed block by block.

The per-input topology features need two things of the induced graph G of an input
(:mod:`detector.topology.induced_graph`, weights phi(u, v) = |w_{u->v} h_u|): its H0 diagram under the
superlevel filtration, i.e. the weights of a maximum spanning forest (MSF), and the weights of all
its edges (for the Betti-density cuts). Listing all edges and sorting them costs O(m log m) with
m ~ 3 * 10^5 for LeNet-5; this module reaches the same diagram while sorting ~5% of them.

Blocks
------
A layer pair's edges split into *blocks*: the targets whose in-edges come from the same source set
S form a complete bipartite graph K(S, T) with weights phi(u, c) = |h_u| |W[c, u]| (a dense layer is
one block; a convolution has one block per output position (and group), whose sources are its
receptive field and whose targets are its output channels). Blocks are edge-disjoint, so

    MSF(G) has the same weights as MSF(union over blocks b of MSF(b)  +  the max-pool edges),

because an MSF F_b of a block keeps, at every threshold t, the connectivity of the block's edges of
weight >= t, hence so does the union; the H0 deaths (the number of merges above each t) follow.

One block's candidates (one Boruvka round, then the links between its components)
---------------------------------------------------------------------------------
Boruvka's first round: a set F of edges, each the heaviest edge at one of its endpoints (its
"picker"), lies in some MSF as long as F has no cycle, however ties are broken (root each tree of F
at the vertex that picked none of its edges: every picker's edge then leads to its parent, and
breaking ties by depth makes it the picker's strictly heaviest edge). A source u's heaviest edge
goes to the target argmax_c |W[c, u]|, the same for every input (h_u scales the whole column): it is
precomputed, and a block's sources are stored grouped by it, so these edges form stars, one per
target. A target's heaviest edge is found from its row of products and kept unless a union-find of
the targets says it closes a cycle. The block then has k <= |T| components, each holding at least
one target, and the rest of its MSF is an MSF of the graph with each component contracted to a
vertex, where only the heaviest of the parallel edges between two components can serve: a maximum
spanning tree of those k (k - 1) / 2 links (dense Prim, O(k^2)) adds k - 1 candidates. A block thus
passes on at most |S| + |T| - 1 edges, a spanning forest of it; one Kruskal over all blocks'
candidates (about 17,000 for LeNet-5) and the max-pool pairs' arg-max edges gives the forest.

The per-input work runs in numba kernels (no Python loop over blocks or edges) that release the
GIL, so the service's worker threads compute features in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from detector.capture import Capture
from detector.topology.induced_graph import InducedGraph
from detector.topology.persistence import H0Diagram, forest_edges

__all__ = ["ForestOfInput", "InducedForest"]


@dataclass(frozen=True)
class ForestOfInput:
    """What the topology features need of one input's induced graph.

    Attributes
    ----------
    diagram : H0Diagram
        H0 persistence under the superlevel filtration; ``merge_edges`` are the MSF edges (global
        vertex ids), ``merge_index`` is None (there is no edge list to index).
    merge_pair : ndarray of shape (n_merges,), int64
        Layer pair of each merging edge (an index into ``InducedGraph.pairs``).
    weights : ndarray, float32
        The weight of every edge of the full induced graph, in no particular order, zeros included
        (zero = absent edge).
    """

    diagram: H0Diagram
    merge_pair: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class _Blocks:
    """Static block tables, concatenated over blocks (see the module docstring).

    Block b has sources ``src_vertex[src_ptr[b]:src_ptr[b+1]]`` (global vertex ids; values at
    ``src_value`` in the per-input value vector) and targets ``dst_vertex[dst_ptr[b]:dst_ptr[b+1]]``.
    Its |W| and the grouping of its sources by heaviest target belong to its *shape*
    ``block_shape[b]``, shared by all the blocks with the same matrix (every interior position of a
    convolution): |W| source-major (sources x targets, so that the kernel's inner loops run over
    contiguous targets) at ``weight[weight_ptr[k]:weight_ptr[k+1]]`` and group g of the sources at
    ``[group_ptr[group_start[k] + g], group_ptr[group_start[k] + g + 1])`` for shape k. Sharing keeps
    the matrices of LeNet-5 at ~10 kB, in cache, instead of one copy per block (~1 MB).
    """

    src_vertex: np.ndarray
    src_value: np.ndarray
    src_ptr: np.ndarray
    dst_vertex: np.ndarray
    dst_ptr: np.ndarray
    block_pair: np.ndarray
    block_shape: np.ndarray
    weight: np.ndarray
    weight_ptr: np.ndarray
    group_ptr: np.ndarray
    group_start: np.ndarray

    @property
    def n_edges(self) -> int:
        """Number of block edges (the products a kernel call may write)."""
        return int((np.diff(self.src_ptr) * np.diff(self.dst_ptr)).sum())

    @property
    def max_candidates(self) -> int:
        """Upper bound on the candidate edges of all blocks: |S| + |T| - 1 per block (a spanning forest)."""
        return int((np.diff(self.src_ptr) + np.diff(self.dst_ptr) - 1).sum())


def _build_blocks(graph: InducedGraph, value_offset: dict[str, int]) -> _Blocks:
    """Group every static (non max-pool) pair's edges into complete bipartite blocks."""
    src_vertex, src_value, src_ptr = [], [], [0]
    dst_vertex, dst_ptr, block_pair, block_shape = [], [0], [], []
    shapes: dict[bytes, int] = {}
    weight, weight_ptr, group_ptr, group_start = [], [0], [], [0]
    for p, pair in enumerate(graph.pairs):
        if pair.windows is not None:
            continue
        order = np.lexsort((pair.src, pair.dst))
        src, dst, magnitude = pair.src[order], pair.dst[order], np.abs(pair.param[order]).astype(np.float32)
        bounds = np.flatnonzero(np.diff(dst)) + 1
        starts, ends = np.r_[0, bounds], np.r_[bounds, len(dst)]
        by_sources: dict[bytes, list[int]] = {}
        for j, (a, b) in enumerate(zip(starts, ends)):
            by_sources.setdefault(src[a:b].tobytes(), []).append(j)
        for members in by_sources.values():
            w = np.stack([magnitude[starts[j]:ends[j]] for j in members])  # (targets, sources)
            best = np.argmax(w, axis=0)  # heaviest target of each source (lowest index on ties)
            live = w[best, np.arange(w.shape[1])] > 0  # a column of zeros has no edge at all
            column = np.flatnonzero(live)[np.argsort(best[live], kind="stable")]
            matrix = np.ascontiguousarray(w[:, column].T)  # source-major
            key = matrix.tobytes() + np.asarray(matrix.shape).tobytes()
            if key not in shapes:
                shapes[key] = len(shapes)
                weight.append(matrix.reshape(-1))
                weight_ptr.append(weight_ptr[-1] + matrix.size)
                group_ptr.append(np.r_[0, np.cumsum(np.bincount(best[live], minlength=len(members)))])
                group_start.append(group_start[-1] + len(members) + 1)
            block_shape.append(shapes[key])
            sources = src[starts[members[0]]:ends[members[0]]][column]
            src_vertex.append(sources + graph.offsets[pair.src_layer])
            src_value.append(sources + value_offset[pair.source_tensor])
            src_ptr.append(src_ptr[-1] + len(column))
            dst_vertex.append(dst[starts[members]] + graph.offsets[pair.dst_layer])
            dst_ptr.append(dst_ptr[-1] + len(members))
            block_pair.append(p)

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return _Blocks(
        src_vertex=cat(src_vertex, np.int32), src_value=cat(src_value, np.int32), src_ptr=np.asarray(src_ptr, np.int64),
        dst_vertex=cat(dst_vertex, np.int32), dst_ptr=np.asarray(dst_ptr, np.int64),
        block_pair=np.asarray(block_pair, np.int32), block_shape=np.asarray(block_shape, np.int64),
        weight=cat(weight, np.float32), weight_ptr=np.asarray(weight_ptr, np.int64),
        group_ptr=cat(group_ptr, np.int64), group_start=np.asarray(group_start[:-1], np.int64),
    )


@dataclass(frozen=True)
class _MaxPools:
    """Every max-pool window of the graph, for one kernel call over the values of all their source tensors.

    The source tensors' signed values are laid one after the other (:func:`_build_maxpools` gives their
    order); value i is vertex ``value_vertex[i]``. Window j (a row of ``windows``, padded with indices past
    the end) feeds vertex ``dst_vertex[j]`` through layer pair ``window_pair[j]``.
    """

    windows: np.ndarray
    value_vertex: np.ndarray
    dst_vertex: np.ndarray
    window_pair: np.ndarray


def _build_maxpools(graph: InducedGraph) -> tuple[list[str], _MaxPools]:
    """The max-pool pairs' source tensors, in value order, and their windows in global value indices."""
    pools = [(p, pair, pair.windows) for p, pair in enumerate(graph.pairs) if pair.windows is not None]
    layer_of = {pair.source_tensor: pair.src_layer for _, pair, _ in pools}
    sizes = [graph.layer_sizes[layer] for layer in layer_of.values()]
    start = dict(zip(layer_of, np.r_[0, np.cumsum(sizes)].tolist()))
    end = sum(sizes)
    windows = np.full((sum(len(w) for _, _, w in pools), max((w.shape[1] for _, _, w in pools), default=1)), end, np.int64)
    row = 0
    for _, pair, w in pools:  # each pair's windows moved to its tensor's place; narrower ones padded on the right
        windows[row:row + len(w), :w.shape[1]] = np.where(w >= graph.layer_sizes[pair.src_layer], end,
                                                          w + start[pair.source_tensor])
        row += len(w)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    return list(layer_of), _MaxPools(
        windows=windows,
        value_vertex=cat([np.arange(size) + graph.offsets[layer] for size, layer in zip(sizes, layer_of.values())]),
        dst_vertex=cat([pair.dst + graph.offsets[pair.dst_layer] for _, pair, _ in pools]),
        window_pair=cat([np.full(len(w), p) for p, _, w in pools]),
    )


@numba.njit(cache=True, nogil=True, inline="always")
def _root(parent: np.ndarray, a: int) -> int:  # pragma: no cover (compiled)
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


@numba.njit(cache=True, nogil=True, fastmath=True)
def _block_forests(values, src_vertex, src_value, src_ptr, dst_vertex, dst_ptr, block_pair, block_shape,
                   weight, weight_ptr, group_ptr, group_start, products, cand_u, cand_v, cand_w, cand_pair):  # pragma: no cover
    """MSF edges of every block for one input (written to ``cand_*``) and every block edge's weight.

    ``values``: |h| per source value position. Returns (products written, candidates written).
    Products are laid out source-major inside a block: phi(q, c) at ``base + q * t + c``.
    """
    n_blocks = block_pair.shape[0]
    max_s = 1
    max_t = 1
    for b in range(n_blocks):
        max_s = max(max_s, src_ptr[b + 1] - src_ptr[b])
        max_t = max(max_t, dst_ptr[b + 1] - dst_ptr[b])
    sval = np.empty(max_s, np.float32)  # the sources with h != 0: value, column in the block, group
    scol = np.empty(max_s, np.int64)
    sgroup = np.empty(max_s, np.int64)
    gp = np.empty(max_t + 1, np.int64)  # group bounds among them
    row_max = np.empty(max_t, np.float32)  # heaviest in-edge of each target ...
    row_pick = np.empty(max_t, np.int32)  # ... and its source
    bins = np.empty(max_t * max_t, np.float32)  # bins[g, c]: heaviest edge from group g into target c
    parent = np.empty(max_t, np.int64)
    comp = np.empty(max_t, np.int64)
    reach = np.empty(max_t * max_t, np.float32)  # reach[ra, c]: heaviest edge from component ra into target c
    link = np.empty(max_t * max_t, np.float32)  # link[ra, rb]: heaviest edge from component ra into component rb
    best = np.empty(max_t, np.float32)  # Prim: heaviest link from the tree into each component ...
    frm = np.empty(max_t, np.int64)  # ... its end in the tree
    done = np.empty(max_t, np.bool_)  # component in the tree
    m = 0
    nc = 0
    for b in range(n_blocks):
        s0 = src_ptr[b]
        d0 = dst_ptr[b]
        t = dst_ptr[b + 1] - d0
        w0 = weight_ptr[block_shape[b]]
        g0 = group_start[block_shape[b]]
        pair = block_pair[b]
        ns = 0
        for g in range(t):
            gp[g] = ns
            for j in range(group_ptr[g0 + g], group_ptr[g0 + g + 1]):
                x = values[src_value[s0 + j]]
                sval[ns] = x
                scol[ns] = j
                sgroup[ns] = g
                ns += x != 0
        gp[t] = ns
        if ns == 0:
            continue
        # every product phi(q, c), source by source, and each target's heaviest in-edge
        base = m
        for c in range(t):
            row_max[c] = 0
            row_pick[c] = 0
        for q in range(ns):
            x_q = sval[q]
            w_q = weight[w0 + scol[q] * t:w0 + (scol[q] + 1) * t]
            p_q = products[m:m + t]
            for c in range(t):
                x = x_q * w_q[c]
                p_q[c] = x
                better = x > row_max[c]
                row_pick[c] = np.int32(q) if better else row_pick[c]
                row_max[c] = x if better else row_max[c]
            m += t
        # Boruvka, sources: each source's edge to its group's target (its heaviest edge)
        for q in range(ns):
            cand_u[nc] = src_vertex[s0 + scol[q]]
            cand_v[nc] = dst_vertex[d0 + sgroup[q]]
            cand_w[nc] = products[base + q * t + sgroup[q]]
            cand_pair[nc] = pair
            nc += 1
        # Boruvka, targets: each target's heaviest in-edge, unless it closes a cycle
        for c in range(t):
            parent[c] = c
        for c in range(t):
            q = row_pick[c]
            g = sgroup[q]
            if row_max[c] == 0 or g == c:  # no edge, or the source's own edge (listed above)
                continue
            a = _root(parent, c)
            r = _root(parent, g)
            if a != r:
                parent[r] = a
                cand_u[nc] = src_vertex[s0 + scol[q]]
                cand_v[nc] = dst_vertex[d0 + c]
                cand_w[nc] = row_max[c]
                cand_pair[nc] = pair
                nc += 1
        # components of the targets, each with the sources of its group
        k = 0
        for c in range(t):
            if _root(parent, c) == c:
                comp[c] = k
                k += 1
        if k == 1:
            continue
        for c in range(t):
            comp[c] = comp[_root(parent, c)]
        # the heaviest edge between each pair of components, from the group maxima
        for g in range(t):
            for c in range(t):
                bins[g * t + c] = 0
            bin_g = bins[g * t:(g + 1) * t]
            for q in range(gp[g], gp[g + 1]):
                p_q = products[base + q * t:base + (q + 1) * t]
                for c in range(t):
                    bin_g[c] = max(bin_g[c], p_q[c])
        # the heaviest edge from (the groups of) component ra into target c, R[ra, c], by whole rows
        for i in range(k * t):
            reach[i] = 0
        for g in range(t):
            r_g = reach[comp[g] * t:(comp[g] + 1) * t]
            bin_g = bins[g * t:(g + 1) * t]
            for c in range(t):
                r_g[c] = max(r_g[c], bin_g[c])
        # ... then between components: link[ra, rb] = max over targets c of rb of R[ra, c]
        for i in range(k * k):
            link[i] = 0
        for ra in range(k):
            for c in range(t):
                i = ra * k + comp[c]
                link[i] = max(link[i], reach[ra * t + c])
        # a maximum spanning forest of the components (dense Prim on the heavier direction of each link)
        for a in range(k):
            best[a] = 0
            done[a] = False
        for _ in range(k):
            a = -1
            for r in range(k):  # the heaviest link into the tree so far, or a new root
                if not done[r] and (a < 0 or best[r] > best[a]):
                    a = r
            done[a] = True
            top = best[a]
            if top > 0:
                ra, rb = (frm[a], a) if link[frm[a] * k + a] >= link[a * k + frm[a]] else (a, frm[a])  # sources in ra, targets in rb
                c = 0
                while comp[c] != rb or reach[ra * t + c] != top:
                    c += 1
                g = 0
                while comp[g] != ra or bins[g * t + c] != top:
                    g += 1
                q = gp[g]
                while products[base + q * t + c] != top:
                    q += 1
                cand_u[nc] = src_vertex[s0 + scol[q]]
                cand_v[nc] = dst_vertex[d0 + c]
                cand_w[nc] = top
                cand_pair[nc] = pair
                nc += 1
            for r in range(k):
                if not done[r]:
                    x = max(link[a * k + r], link[r * k + a])
                    if x > best[r]:
                        best[r] = x
                        frm[r] = a
    return m, nc


@numba.njit(cache=True, nogil=True)
def _maxpool_edges(h, windows, value_vertex, dst_vertex, window_pair, products, m, cand_u, cand_v, cand_w, cand_pair, nc):  # pragma: no cover
    """The arg-max edge of each max-pool window (first maximum, as ``numpy.argmax``), appended at m / nc.

    ``h`` holds the signed source values of every max-pool pair (vertex ``value_vertex[i]`` for
    ``h[i]``); window entries >= len(h) are padding.
    """
    for j in range(windows.shape[0]):
        pick = windows[j, 0]
        best = -np.inf
        for idx in windows[j]:
            if idx < h.shape[0] and h[idx] > best:
                best = h[idx]
                pick = idx
        x = np.float32(abs(h[pick]))
        products[m] = x
        cand_u[nc] = value_vertex[pick]
        cand_v[nc] = dst_vertex[j]
        cand_w[nc] = x
        cand_pair[nc] = window_pair[j]
        m += 1
        nc += 1
    return m, nc


class InducedForest:
    """Compute :class:`ForestOfInput` for the inputs of a capture, without listing the induced graph.

    Parameters
    ----------
    graph : InducedGraph
        The classifier's static induced-graph structure; the block tables are built from it once
        (a few ms for LeNet-5).

    Notes
    -----
    Equal to :meth:`InducedGraph.edges` followed by :func:`detector.topology.persistence.h0_persistence`
    (same deaths, same number of components, same weights multiset; tested on real models, ties
    included). With tied weights, which of the equally heavy edges is reported as merging, and so
    the layer pair it counts for, may differ.
    """

    def __init__(self, graph: InducedGraph):
        self.graph = graph
        # one value vector per input: the |values| of each distinct source tensor, in pair order
        self._tensors = list(dict.fromkeys(p.source_tensor for p in graph.pairs if p.windows is None))
        sizes = [graph.layer_sizes[next(p.src_layer for p in graph.pairs if p.source_tensor == t)] for t in self._tensors]
        offsets = np.r_[0, np.cumsum(sizes)].astype(int)
        self._blocks = _build_blocks(graph, dict(zip(self._tensors, offsets.tolist())))
        self._maxpool_tensors, self._maxpool = _build_maxpools(graph)
        n_maxpool_edges = len(self._maxpool.windows)
        self._n_products = self._blocks.n_edges + n_maxpool_edges
        self._n_candidates = self._blocks.max_candidates + n_maxpool_edges

    def compute(self, capture: Capture, i: int) -> ForestOfInput:
        """The H0 diagram, merging pairs and edge weights of input ``i`` of ``capture``."""
        graph, blocks = self.graph, self._blocks
        values = np.abs(np.concatenate([graph.source_values(capture, i, t) for t in self._tensors]
                                       or [np.zeros(0, np.float32)]).astype(np.float32, copy=False))
        products = np.empty(self._n_products, np.float32)
        size = self._n_candidates
        cand_u, cand_v = np.empty(size, np.int32), np.empty(size, np.int32)
        cand_w, cand_pair = np.empty(size, np.float32), np.empty(size, np.int32)
        m, nc = _block_forests(values, blocks.src_vertex, blocks.src_value, blocks.src_ptr, blocks.dst_vertex,
                               blocks.dst_ptr, blocks.block_pair, blocks.block_shape, blocks.weight, blocks.weight_ptr,
                               blocks.group_ptr, blocks.group_start, products, cand_u, cand_v, cand_w, cand_pair)
        if self._maxpool_tensors:
            h = np.concatenate([graph.source_values(capture, i, t) for t in self._maxpool_tensors])
            mp = self._maxpool
            m, nc = _maxpool_edges(h, mp.windows, mp.value_vertex, mp.dst_vertex, mp.window_pair, products, m,
                                   cand_u, cand_v, cand_w, cand_pair, nc)
        deaths, edges, merge_pair = forest_edges(graph.n_vertices, cand_u[:nc], cand_v[:nc], cand_w[:nc], cand_pair[:nc],
                                                  len(graph.pairs))
        diagram = H0Diagram(deaths=deaths, merge_edges=edges, n_vertices=graph.n_vertices,
                            n_components=graph.n_vertices - int(deaths.shape[0]))
        return ForestOfInput(diagram=diagram, merge_pair=merge_pair, weights=products[:m])
