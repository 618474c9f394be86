"""H0 persistence of a weighted graph under the superlevel filtration (strongest edges first).

The per-input *induced graph* of Gebhart et al. (2019, papers 001/002) carries edge weights
phi(u, v) = |w_{u->v} h_u| >= 0. Its filtration adds edges from the strongest to the weakest,

    G_t = (V, {e : phi(e) >= t}),   t running from +inf down to 0,

with every vertex present from the start. A weight of exactly 0 means "no edge": such edges never
enter the filtration.

Convention for the H0 diagram
-----------------------------
Every vertex is born at the top of the filtration (before any edge). When an edge of weight w joins
two different components, one of them dies at w. The merging edges are exactly the edges Kruskal's
algorithm keeps when it scans the edges by decreasing weight: they form a maximum spanning forest
(MSF), the *persistent subgraph*, and the multiset of their weights (the death values) is the same for
every MSF, ties included. Components that never merge (``n_components`` of them) live for ever.
Because every birth is the top, a diagram is fully described by its death weights.

Two implementations compute it:

* :func:`h0_persistence` - the fast path: a filter-Kruskal on scipy's ``minimum_spanning_tree`` (the
  strongest ~4|V| edges first, then only the edges that still cross components).
* :func:`h0_persistence_ripser` - the reference: ripser on a sparse distance matrix, against which the
  fast path is tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from detector.errors import InvalidInput

__all__ = [
    "DEFAULT_QUANTILES",
    "H0Diagram",
    "check_graph",
    "h0_feature_names",
    "h0_features",
    "h0_persistence",
    "h0_persistence_ripser",
]

#: Quantile levels of the merge weights reported by :func:`h0_features`.
DEFAULT_QUANTILES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)

# A candidate edge set at most this many times the current number of components is handed to
# scipy's MST in one go; a larger one is filtered first (filter-Kruskal).
_FILTER_FACTOR = 8
# Target size of the first "strongest edges" batch, in multiples of the number of vertices ...
_TOP_FACTOR = 4
# ... multiplied by this after every round (the strongest edges of a layered graph often pile up
# on a few hub vertices, so later rounds need bigger batches to make progress).
_GROWTH = 2
# Edges sampled (evenly strided, so deterministic) to estimate the weight cut of that batch.
_SAMPLE_SIZE = 4096
# Pairs and ranks are packed into one int64 (pair * k + rank) while this bound holds.
_PACK_LIMIT = 2**62


@dataclass(frozen=True, eq=False)
class H0Diagram:
    """The H0 persistence diagram of a weighted graph under the superlevel filtration.

    Every bar is born at the top of the filtration (all vertices are present before any edge), so
    only the deaths are stored. The arrays are read-only.

    Attributes
    ----------
    deaths : ndarray of shape (n_merges,), float64
        Weights at which two components merge, in descending order. Equal to the edge weights of a
        maximum spanning forest of the graph restricted to its non-zero edges.
    merge_edges : ndarray of shape (n_merges, 2), int64, or None
        The merging edges (u, v) as given in the input, row ``i`` dying at ``deaths[i]``: the
        persistent subgraph (an MSF). ``None`` when the diagram came from ripser, which does not
        report which edge kills a component.
    n_vertices : int
        Number of vertices of the graph, isolated ones included.
    n_components : int
        Number of connected components of the whole non-zero graph, ``n_vertices - n_merges``: the
        bars that never die.
    merge_index : ndarray of shape (n_merges,), int64, or None
        Row of each merging edge in the input ``edges`` array (``None`` for ripser diagrams). With
        ties, which of several equally heavy edges is reported is implementation-defined; the
        deaths are not.
    """

    deaths: np.ndarray
    merge_edges: np.ndarray | None
    n_vertices: int
    n_components: int
    merge_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("deaths", "merge_edges", "merge_index"):
            array = getattr(self, name)
            if array is not None:
                view = np.asarray(array).view()  # read-only view; the caller's array stays writable
                view.setflags(write=False)
                object.__setattr__(self, name, view)

    @property
    def n_merges(self) -> int:
        """Number of finite bars (merges), ``n_vertices - n_components``."""
        return int(self.deaths.shape[0])


# --------------------------------------------------------------------------------------------------
# validation


def check_graph(
    n_vertices: int, edges: np.ndarray, weights: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Validate a weighted graph and return ``(n_vertices, edges int64 (m, 2), weights float64 (m,))``.

    Raises
    ------
    InvalidInput
        If ``n_vertices`` is not a positive integer, ``edges`` is not an integer array of shape (m, 2)
        with entries in [0, n_vertices), or ``weights`` is not a finite array of shape (m,) with
        entries >= 0.
    """
    if isinstance(n_vertices, (bool, np.bool_)) or not isinstance(n_vertices, (int, np.integer)):
        raise InvalidInput(f"n_vertices must be an int, got {type(n_vertices).__name__}")
    n = int(n_vertices)
    if n < 1:
        raise InvalidInput(f"n_vertices must be >= 1, got {n}")
    edges = np.asarray(edges)
    if edges.ndim != 2 or edges.shape[1] != 2:
        raise InvalidInput(f"edges must have shape (m, 2), got {edges.shape}")
    if edges.size and not np.issubdtype(edges.dtype, np.integer):
        raise InvalidInput(f"edges must hold integer vertex ids, got dtype {edges.dtype}")
    edges = edges.astype(np.int64, copy=False)
    weights = np.asarray(weights)
    if weights.shape != (edges.shape[0],):
        raise InvalidInput(
            f"weights must have shape ({edges.shape[0]},) to match edges, got {weights.shape}"
        )
    if weights.size and not (
        np.issubdtype(weights.dtype, np.floating) or np.issubdtype(weights.dtype, np.integer)
    ):
        raise InvalidInput(f"weights must be real numbers, got dtype {weights.dtype}")
    weights = weights.astype(np.float64, copy=False)
    if edges.size:
        low, high = int(edges.min()), int(edges.max())
        if low < 0 or high >= n:
            raise InvalidInput(
                f"edge endpoints must lie in [0, {n}) for n_vertices={n}, got range [{low}, {high}]"
            )
        if not np.isfinite(weights).all():
            raise InvalidInput("weights must be finite, got NaN or Inf")
        if weights.min() < 0:
            raise InvalidInput(f"weights must be >= 0, got minimum {weights.min()!r}")
    return n, edges, weights


# --------------------------------------------------------------------------------------------------
# fast path


def _kruskal(
    n_labels: int, a: np.ndarray, b: np.ndarray, w: np.ndarray, index: np.ndarray | None
) -> np.ndarray:
    """Maximum spanning forest of the multigraph on ``n_labels`` vertices with edges (a, b, w), w > 0.

    Loops (a == b) are ignored and parallel edges act through their heaviest copy. Returns the
    entries of ``index`` (or the positions, if ``index`` is None) of the chosen edges.
    """
    k = w.shape[0]
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    lo = np.minimum(a, b).astype(np.int64, copy=False)  # labels may arrive as int32
    hi = np.maximum(a, b).astype(np.int64, copy=False)
    # Rank of each edge by decreasing weight (ties in arbitrary order): an exact, distinct,
    # positive stand-in for the weight that also says which edge it is.
    order = np.argsort(-w)
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k, dtype=np.int64)
    # Keep the heaviest copy of each vertex pair (scipy's sparse constructor would *sum* parallel
    # edges): sort the packed values pair * k + rank, a plain int64 sort, and keep the first of
    # each pair.
    if n_labels * n_labels * k < _PACK_LIMIT:
        packed = np.sort((lo * n_labels + hi) * k + rank)
        pair, pair_rank = np.divmod(packed, k)
    else:  # huge graphs (~10^6 vertices): the packed value would overflow int64; a slower sort
        by_pair = np.lexsort((rank, lo * n_labels + hi))
        pair, pair_rank = (lo * n_labels + hi)[by_pair], rank[by_pair]
    first = np.empty(k, dtype=bool)
    first[0] = True
    np.not_equal(pair[1:], pair[:-1], out=first[1:])
    first &= (pair // n_labels) != (pair % n_labels)  # drop loops
    keep_rank = pair_rank[first]
    edge = order[keep_rank]
    # csgraph minimises and reads stored zeros as missing edges: rank + 1 >= 1 is exact in float64,
    # strictly positive and increasing in the Kruskal order.
    graph = csr_matrix(
        (keep_rank.astype(np.float64) + 1.0, (lo[edge], hi[edge])), shape=(n_labels, n_labels)
    )
    tree = minimum_spanning_tree(graph)
    chosen = order[tree.data.astype(np.int64) - 1]
    return chosen if index is None else index[chosen]


def _top_cut(w: np.ndarray, target: int) -> float:
    """A weight t such that roughly ``target`` entries of ``w`` are >= t (from a strided sample)."""
    step = max(1, w.shape[0] // _SAMPLE_SIZE)
    sample = w[::step]
    fraction = target / w.shape[0]
    position = min(sample.shape[0] - 1, max(0, int(sample.shape[0] * (1.0 - fraction))))
    return float(np.partition(sample, position)[position])


def _msf_index(n: int, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Rows of a maximum spanning forest of the graph's edges with w > 0 (filter-Kruskal).

    Kruskal scanning by decreasing weight can be cut anywhere: after the edges with weight >= t
    (ties included) its state is the component partition of G_t, and every later edge only matters
    if it crosses that partition. So: take the strongest ~4|V| candidates (twice as many in each
    later round), solve them with scipy, contract the components and keep only the crossing edges;
    repeat until few remain, then solve the rest in one go.
    """
    n_labels = n
    chosen: list[np.ndarray] = []
    positive = w > 0
    candidate: np.ndarray | None  # rows of the candidates in the input; None = all rows
    if positive.all():
        candidate = None
        lab_u, lab_v, cand_w = u, v, w
    else:
        candidate = np.flatnonzero(positive)
        lab_u, lab_v, cand_w = u[candidate], v[candidate], w[candidate]
    # Invariant: lab_u, lab_v are the endpoints of the candidates in the current contraction
    # (component labels in [0, n_labels)).
    target = _TOP_FACTOR * n_labels
    while cand_w.shape[0]:
        if cand_w.shape[0] <= _FILTER_FACTOR * n_labels + 1024:
            chosen.append(_kruskal(n_labels, lab_u, lab_v, cand_w, candidate))
            break
        cut = _top_cut(cand_w, target)
        target *= _GROWTH
        top = np.flatnonzero(cand_w >= cut)
        picked = top[_kruskal(n_labels, lab_u[top], lab_v[top], cand_w[top], None)]
        chosen.append(picked if candidate is None else candidate[picked])
        # Contract the components of (current partition + picked edges).
        merge_graph = csr_matrix(
            (np.ones(picked.shape[0]), (lab_u[picked], lab_v[picked])), shape=(n_labels, n_labels)
        )
        n_labels, relabel = connected_components(merge_graph, directed=False)
        new_u = relabel[lab_u]
        new_v = relabel[lab_v]
        # Crossing edges: every edge of ``top`` is now internal, so this also drops them.
        crossing = np.flatnonzero(new_u != new_v)
        candidate = crossing if candidate is None else candidate[crossing]
        lab_u, lab_v, cand_w = new_u[crossing], new_v[crossing], cand_w[crossing]
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(chosen).astype(np.int64, copy=False)


def h0_persistence(n_vertices: int, edges: np.ndarray, weights: np.ndarray) -> H0Diagram:
    """H0 persistence of a weighted graph under the superlevel filtration (fast path).

    Parameters
    ----------
    n_vertices : int
        Number of vertices; vertex ids run over [0, n_vertices). Isolated vertices count.
    edges : ndarray of shape (n_edges, 2), integer
        Edge endpoints (u, v). Orientation is irrelevant; loops never merge anything and parallel
        edges act through their heaviest copy.
    weights : ndarray of shape (n_edges,), float
        Edge weights >= 0 (Gebhart et al.: |w_{u->v} h_u|). Edges of weight 0 are absent.

    Returns
    -------
    H0Diagram
        Deaths in descending order with their merging edges (a maximum spanning forest).

    Raises
    ------
    InvalidInput
        On malformed input (see :func:`check_graph`).

    Notes
    -----
    The death weights are those of a maximum spanning forest (Kruskal on decreasing weights); this
    is computed by a filter-Kruskal around ``scipy.sparse.csgraph.minimum_spanning_tree`` applied to
    -w (csgraph minimises and reads stored zeros as missing edges; -w < 0 for every kept edge). It
    is tested against :func:`h0_persistence_ripser`.
    """
    n, edges, weights = check_graph(n_vertices, edges, weights)
    index = _msf_index(n, edges[:, 0], edges[:, 1], weights)
    deaths = weights[index]
    order = np.argsort(-deaths, kind="stable")
    index = index[order]
    return H0Diagram(
        deaths=deaths[order],
        merge_edges=edges[index],
        n_vertices=n,
        n_components=n - int(index.shape[0]),
        merge_index=index,
    )


# --------------------------------------------------------------------------------------------------
# reference


def h0_persistence_ripser(n_vertices: int, edges: np.ndarray, weights: np.ndarray) -> H0Diagram:
    """H0 persistence of a weighted graph under the superlevel filtration, computed by ripser.

    The reference implementation :func:`h0_persistence` is tested against. Same parameters.

    Returns
    -------
    H0Diagram
        Deaths in descending order; ``merge_edges`` and ``merge_index`` are ``None``.

    Notes
    -----
    ripser computes a *sublevel* (Vietoris-Rips) filtration of a distance matrix, so each weight
    is mapped to a distance by its dense descending rank,

        d(w) = 1 + #{distinct weights w' of the graph with w' > w},

    i.e. the strongest weight gets 1, the next distinct one 2, and so on. The map is strictly
    decreasing (the superlevel order becomes a sublevel order and ties stay ties), and it sidesteps
    three facts about ripser: it casts distances to float32 (small integers up to 2**24 are exact,
    so no two weights collide and the map back is exact), it drops zero-length bars (every
    distance is >= 1 while vertices are born at 0, so no merge is lost, unlike d = w_max - w which
    maps the strongest edge to 0), and it reads vertex births from the diagonal of a sparse matrix
    (none is stored, so every birth is 0, the top of the filtration). Each edge is stored once in
    the upper triangle (i < j) because ripser ignores entries with i > j; loops are dropped and
    parallel edges reduced to their heaviest (the smallest distance). A finite ripser death d maps
    back to the weight of rank d; the infinite bars are the final components.
    """
    from ripser import ripser  # heavy import, only for the reference

    n, edges, weights = check_graph(n_vertices, edges, weights)
    lo = np.minimum(edges[:, 0], edges[:, 1])
    hi = np.maximum(edges[:, 0], edges[:, 1])
    keep = (weights > 0) & (lo != hi)
    lo, hi, w = lo[keep], hi[keep], weights[keep]
    distinct = np.unique(w)[::-1]  # descending
    if distinct.shape[0] > 2**24:
        raise InvalidInput(
            f"ripser stores distances as float32: at most 2**24 distinct weights, got {distinct.shape[0]}"
        )
    rank = np.searchsorted(-distinct, -w)  # 0 for the strongest weight
    key = lo * n + hi
    order = np.lexsort((rank, key))
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    pick = order[first]
    distance = coo_matrix(
        ((rank[pick] + 1).astype(np.float64), (lo[pick], hi[pick])), shape=(n, n)
    )
    diagram = ripser(distance, distance_matrix=True, maxdim=0)["dgms"][0]
    finite = np.isfinite(diagram[:, 1])
    death_rank = np.rint(diagram[finite, 1]).astype(np.int64) - 1
    deaths = np.sort(distinct[death_rank])[::-1].copy()
    return H0Diagram(
        deaths=deaths,
        merge_edges=None,
        n_vertices=n,
        n_components=int(np.count_nonzero(~finite)),
        merge_index=None,
    )


# --------------------------------------------------------------------------------------------------
# fixed-length features


def _check_quantiles(quantiles: Sequence[float]) -> np.ndarray:
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 1 or q.size == 0 or not np.all((q >= 0) & (q <= 1)):
        raise InvalidInput(f"quantiles must be a non-empty 1-D sequence in [0, 1], got {quantiles!r}")
    return q


def _check_p(p: float) -> float:
    p = float(p)
    if not p >= 1.0:  # also rejects NaN
        raise InvalidInput(f"p must be >= 1 (a norm), got {p}")
    return p


def h0_feature_names(
    quantiles: Sequence[float] = DEFAULT_QUANTILES, p: float = 2.0
) -> list[str]:
    """Names of the entries of :func:`h0_features` with the same arguments, in order."""
    q = _check_quantiles(quantiles)
    p = _check_p(p)
    p_name = "inf" if np.isinf(p) else f"{p:g}"
    return [f"h0_death_q{100 * level:g}" for level in q] + [
        f"h0_total_persistence_p{p_name}",
        "h0_persistent_entropy",
        "h0_merged_fraction",
    ]


def h0_features(
    diagram: H0Diagram, quantiles: Sequence[float] = DEFAULT_QUANTILES, p: float = 2.0
) -> np.ndarray:
    """Fixed-length summary of an H0 diagram.

    Parameters
    ----------
    diagram : H0Diagram
        From :func:`h0_persistence` or :func:`h0_persistence_ripser`.
    quantiles : sequence of float in [0, 1], default (0.1, 0.25, 0.5, 0.75, 0.9)
        Levels of the death-weight quantiles (linear interpolation, ``numpy.quantile``).
    p : float >= 1, default 2.0
        Order of the total-persistence norm (``inf`` allowed).

    Returns
    -------
    ndarray of shape (len(quantiles) + 3,), float64
        ``[q_1, ..., q_Q, total_persistence, persistent_entropy, merged_fraction]``; names from
        :func:`h0_feature_names`. Never NaN.

    Notes
    -----
    Every bar is born at the top of the filtration, so the birth carries no information. We take the
    *persistence* of the bar dying at weight d_i to be d_i itself: the length of the weight interval
    [0, d_i] over which its merging edge is present, 0 being the bottom of the filtration (where
    every edge is present). Then, over the k = n_merges bars,

    * quantiles of {d_i} (in weight units);
    * total persistence ``||d||_p = (sum_i d_i^p)^(1/p)``, the p-norm of the persistent subgraph's
      weights (p = 1: the weight of the maximum spanning forest);
    * persistent entropy normalised to [0, 1]: with ``p_i = d_i / sum_j d_j``,
      ``E = -sum_i p_i log p_i / log k`` (1 = strength spread evenly over the persistent subgraph,
      near 0 = a few dominant edges);
    * merged fraction ``k / n_vertices = 1 - n_components / n_vertices``.

    Scale-aware but robust: quantiles and the norm are in weight units (they double when every
    activation doubles, which a detector must see), the entropy is scale-free, and no feature rests
    on a single extreme bar (no min or max, unlike Rieck et al.'s ``1 - w / w_max`` normalisation,
    which ties every bar to the largest weight, the one an adversarial perturbation moves most
    easily).

    Padding: an empty diagram (no merges) gives 0 for the quantiles, the norm and the entropy (the
    weight of an absent edge, "no structure"); a single bar has entropy 0 (log 1 = 0).
    The merged fraction tells a padded 0 from a real one.
    """
    q = _check_quantiles(quantiles)
    p = _check_p(p)
    if not isinstance(diagram, H0Diagram):
        raise InvalidInput(f"diagram must be an H0Diagram, got {type(diagram).__name__}")
    d = np.asarray(diagram.deaths, dtype=np.float64)
    k = d.shape[0]
    out = np.zeros(q.shape[0] + 3, dtype=np.float64)
    out[-1] = k / diagram.n_vertices
    if k == 0:
        return out
    out[: q.shape[0]] = np.quantile(d, q)
    out[-3] = float(np.max(d)) if np.isinf(p) else float(np.linalg.norm(d, ord=p))
    total = float(d.sum())
    if k > 1 and total > 0:
        share = d[d > 0] / total
        out[-2] = float(-(share * np.log(share)).sum() / np.log(k))
    return out
