"""Betti numbers as a function of graph density: per input and per population.

Two signatures, both after Corneanu et al. (CVPR 2019, paper 000), who map a weighted graph to the
sequence of binary graphs obtained by adding its edges from the strongest to the weakest
(their Algorithm 1), index that sequence by the *density* rho = (edges kept) / (non-zero edges), and
follow the Betti numbers of the clique complex along it.

Per input (:func:`betti_density_signature`)
    The graph is the induced graph of one input (Gebhart et al., weights |w_{u->v} h_u|). It is
    layered: edges only join consecutive layers, so it has no triangles and its clique complex is
    the graph itself. Then beta0 = number of components and beta1 = |E| - |V| + beta0 (the cycle
    rank), and beta0 comes for free from the H0 diagram of :mod:`detector.topology.persistence`.

Per population (:class:`NodeSelector`, :func:`correlation_distance`, :func:`population_betti_curves`)
    The *functional* graph of a set of inputs (a class of clean calibration data, or a window of
    live requests): nodes are units of the network, edge weights the absolute Pearson correlation
    of their activations over the set. Its clique complexes do have higher simplices; beta1..beta3
    are computed with ripser on the distance 1 - |c|.
"""

from __future__ import annotations

from typing import Any, Mapping

import numba
import numpy as np

from detector.errors import BaselineError, InvalidInput, NotReady
from detector.topology.persistence import H0Diagram, check_graph, h0_persistence

__all__ = [
    "DEFAULT_DENSITIES",
    "DEFAULT_NODE_BUDGET",
    "DEFAULT_POPULATION_DENSITIES",
    "NodeSelector",
    "betti_density_signature",
    "betti_signature_from_weights",
    "check_densities",
    "clique_complex_betti",
    "clique_counts",
    "correlation_distance",
    "density_thresholds",
    "population_betti_curves",
    "population_signature",
    "strongest_cuts",
]

#: Densities of the per-input signature: 16 log-spaced values from 1e-3 to 1. An induced graph has
#: up to ~10^5-10^6 edges of which the persistent structure is a small fraction, so the grid is
#: dense where few edges are kept (a linear grid would spend most points on nearly full graphs).
DEFAULT_DENSITIES: np.ndarray = np.geomspace(1e-3, 1.0, 16)

#: Densities of the population curves: 0.05, 0.10, ..., 0.50 (Corneanu et al. plot their curves
#: over low and middle densities; above 0.5 clique complexes of correlation graphs fill in and
#: ripser's cost grows fast).
DEFAULT_POPULATION_DENSITIES: np.ndarray = np.linspace(0.05, 0.5, 10)

#: Default number of population nodes. ripser on 64 nodes at density 0.5 with maxdim 3 takes tens
#: of milliseconds; at 100 nodes it is already near a second (cost grows roughly like n^5).
DEFAULT_NODE_BUDGET = 64

# Safety valve for clique_counts: largest (cliques x nodes) boolean table it will build.
_MAX_CLIQUE_TABLE = 200_000_000


def check_densities(densities: Any) -> np.ndarray:
    """A density grid as a float64 array, or InvalidInput unless it is non-empty, 1-D, finite and in (0, 1]."""
    rho = np.atleast_1d(np.asarray(densities, dtype=np.float64))
    if rho.ndim != 1 or rho.size == 0 or not np.all(np.isfinite(rho)):
        raise InvalidInput(f"densities must be a non-empty 1-D array of finite numbers, got {densities!r}")
    if not np.all((rho > 0) & (rho <= 1)):
        raise InvalidInput(f"densities must lie in (0, 1], got range [{rho.min()}, {rho.max()}]")
    return rho


@numba.njit(cache=True, nogil=True)
def _kept_count(rho: np.ndarray, total: int) -> np.ndarray:  # pragma: no cover (compiled)
    """k = ceil(rho * total), at least 1 and at most ``total`` (rounding noise below 1e-9 ignored)."""
    k = np.ceil(rho * total - 1e-9).astype(np.int64)
    return np.minimum(np.maximum(k, 1), max(total, 1))


# --------------------------------------------------------------------------------------------------
# per input


def betti_density_signature(
    n_vertices: int,
    edges: np.ndarray,
    weights: np.ndarray,
    densities: np.ndarray = DEFAULT_DENSITIES,
    *,
    diagram: H0Diagram | None = None,
) -> np.ndarray:
    """Betti numbers per vertex of one weighted graph at several densities.

    Parameters
    ----------
    n_vertices : int
        Number of vertices (all of them count, isolated ones included).
    edges : ndarray of shape (n_edges, 2), integer
        Edge endpoints.
    weights : ndarray of shape (n_edges,), float
        Edge weights >= 0; zero-weight edges are absent and do not count towards the density.
    densities : array-like of shape (n_densities,), values in (0, 1], default DEFAULT_DENSITIES
        Fractions rho of the non-zero edges to keep, strongest first.
    diagram : H0Diagram, optional
        The graph's H0 diagram if already computed (:func:`detector.topology.persistence.h0_persistence`);
        it must belong to this very graph. Computed when omitted.

    Returns
    -------
    ndarray of shape (2, n_densities), float64
        Row 0: beta0(rho) / |V|; row 1: beta1(rho) / |V|.

    Raises
    ------
    InvalidInput
        On a malformed graph or densities, or a diagram of another vertex count.

    Notes
    -----
    With m non-zero edges and k = ceil(rho m), the graph at density rho is

        G_rho = (V, {e : w(e) >= w_(k)}),   w_(k) the k-th largest non-zero weight.

    Ties at the cut are all kept (so |E_rho| >= k): the graph then depends only on the weights,
    never on the order the edges arrive in. V is always the full vertex set. Because a layered graph
    has no triangles, its clique complex is the graph itself and

        beta0(rho) = |V| - #{H0 deaths >= w_(k)},   beta1(rho) = |E_rho| - |V| + beta0(rho):

    the merges among the edges kept (H0 persistence = Kruskal on decreasing weights) give beta0
    without a second union-find. Edges are counted as given: a repeated pair or a loop is a cycle
    of the multigraph and adds to beta1 (induced graphs have neither). A graph without non-zero
    edges has beta0 = |V|, beta1 = 0 at every density. Corneanu et al. normalise Betti numbers by
    the number of nodes; so do we, which makes signatures of different models comparable.
    """
    n, edges, weights = check_graph(n_vertices, edges, weights)
    rho = check_densities(densities)
    if diagram is None:
        diagram = h0_persistence(n, edges, weights)
    elif not isinstance(diagram, H0Diagram) or diagram.n_vertices != n:
        raise InvalidInput(
            f"diagram must be the H0Diagram of this {n}-vertex graph, got "
            f"{getattr(diagram, 'n_vertices', type(diagram).__name__)!r} vertices"
        )
    return betti_signature_from_weights(n, weights, diagram.deaths, rho)


def betti_signature_from_weights(
    n_vertices: int, weights: np.ndarray, deaths: np.ndarray, densities: np.ndarray
) -> np.ndarray:
    """:func:`betti_density_signature` from the edge weights and the H0 deaths alone (no validation).

    ``weights`` holds every edge's weight (zeros are absent edges; edges may be listed in any
    order), ``deaths`` the graph's H0 deaths in descending order, ``densities`` a checked grid.
    This is what the per-input features call, with the weights of the whole induced graph and the
    deaths of its maximum spanning forest, which need no edge list.
    """
    n = int(n_vertices)
    out = np.empty((2, densities.shape[0]), dtype=np.float64)
    cut, n_edges = strongest_cuts(weights, densities)
    if cut.shape[0] == 0:  # no non-zero edge
        out[0] = 1.0
        out[1] = 0.0
        return out
    deaths_ascending = np.asarray(deaths, dtype=np.float64)[::-1]
    n_merges = deaths_ascending.shape[0] - np.searchsorted(deaths_ascending, cut, side="left")
    beta0 = n - n_merges
    beta1 = n_edges - n + beta0
    out[0] = beta0 / n
    out[1] = beta1 / n
    return out


# Buckets of the selection histogram: the top 15 bits of a non-negative float32 (the sign bit is 0):
# exponent and 7 mantissa bits, i.e. log-spaced bins 1/128 of an octave wide.
_BUCKET_SHIFT = 16
_N_BUCKETS = 1 << (31 - _BUCKET_SHIFT)


@numba.njit(cache=True, nogil=True)
def _bucket_counts(bits: np.ndarray) -> np.ndarray:  # pragma: no cover (compiled)
    """Histogram of the non-zero bit patterns by bucket."""
    counts = np.zeros(_N_BUCKETS, dtype=np.int64)
    zeros = 0
    for x in bits:
        counts[x >> _BUCKET_SHIFT] += 1
        zeros += x == 0
    counts[0] -= zeros
    return counts


@numba.njit(cache=True, nogil=True)
def _select_descending(weights, bits, counts, ranks):  # pragma: no cover (compiled)
    """k-th largest positive weight for each k in ``ranks`` (1-based), and how many weights are >= it."""
    n_ranks = ranks.shape[0]
    from_top = np.cumsum(counts[::-1])  # weights in the top i + 1 buckets
    position = np.searchsorted(from_top, ranks)  # first prefix holding the rank
    bucket = _N_BUCKETS - 1 - position
    above = from_top[position] - counts[bucket]  # positive weights in the buckets above
    slot = np.full(_N_BUCKETS, -1, dtype=np.int32)
    n_slots = 0
    for j in range(n_ranks):
        if slot[bucket[j]] < 0:
            slot[bucket[j]] = n_slots
            n_slots += 1
    start = np.zeros(n_slots + 1, dtype=np.int64)
    for j in range(n_ranks):
        start[slot[bucket[j]] + 1] = counts[bucket[j]]
    for k in range(n_slots):
        start[k + 1] += start[k]
    fill = start[:-1].copy()
    values = np.empty(start[n_slots], dtype=weights.dtype)
    for i in range(bits.shape[0]):
        k = slot[bits[i] >> _BUCKET_SHIFT]
        if k >= 0 and bits[i] != 0:
            values[fill[k]] = weights[i]
            fill[k] += 1
    cut = np.empty(n_ranks, dtype=np.float64)
    n_kept = np.empty(n_ranks, dtype=np.int64)
    for j in range(n_ranks):  # a selection inside the rank's bucket (4x faster than sorting the buckets)
        k = slot[bucket[j]]
        inside = values[start[k]:start[k + 1]]
        r = inside.shape[0] - (ranks[j] - above[j])  # the rank's position in the bucket, ascending
        c = np.partition(inside, r)[r]
        n_kept[j] = above[j] + np.count_nonzero(inside >= c)
        cut[j] = c
    return cut, n_kept


def strongest_cuts(weights: np.ndarray, densities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight cuts of a density grid: ``(w_(k), #{e : w_e >= w_(k)})`` for k = ceil(rho m).

    m is the number of positive entries of ``weights`` (float32 or float64, >= 0, any order) and
    w_(k) the k-th largest of them. Empty arrays when m = 0.

    A selection, not a sort: for x >= 0 the float32 bit pattern is monotone in x, so one pass counts
    the weights in log-spaced buckets (the pattern's top bits), a second pass gathers only the
    buckets that hold a requested rank, and a quickselect inside the rank's bucket gives the cut.
    O(m), against O(m log m).
    """
    weights = np.ascontiguousarray(weights)
    if weights.dtype == np.float32:
        bits = weights.view(np.uint32)
    else:  # float32 rounding is monotone too; a positive weight must not round to 0
        narrow = weights.astype(np.float32)
        narrow[(weights > 0) & (narrow == 0)] = np.float32(1e-45)
        bits = narrow.view(np.uint32)
    return _strongest_cuts(weights, bits, densities)


@numba.njit(cache=True, nogil=True)
def _strongest_cuts(weights, bits, densities):  # pragma: no cover (compiled)
    """:func:`strongest_cuts` given the float32 bit patterns ``bits`` of ``weights``."""
    counts = _bucket_counts(bits)
    m = counts.sum()
    if m == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return _select_descending(weights, bits, counts, _kept_count(densities, m))


# --------------------------------------------------------------------------------------------------
# population: nodes


def _node_values(name: str, array: np.ndarray) -> np.ndarray:
    """(n_samples, n_units) node values of one captured tensor (spatial mean for rank >= 3)."""
    values = array.reshape(array.shape[0], array.shape[1], -1).mean(axis=2, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise InvalidInput(f"activations of layer {name!r} contain NaN or Inf")
    return values


def _check_activations(activations: Any) -> dict[str, np.ndarray]:
    if not isinstance(activations, Mapping) or len(activations) == 0:
        raise InvalidInput(
            f"activations must be a non-empty mapping of layer name to array, got {type(activations).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    n_samples = None
    for name, value in activations.items():
        array = np.asarray(value)
        if array.ndim < 2:
            raise InvalidInput(
                f"layer {name!r}: expected (n_samples, units) or (n_samples, channels, ...), got shape {array.shape}"
            )
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise InvalidInput(f"layer {name!r}: expected real numbers, got dtype {array.dtype}")
        if n_samples is None:
            n_samples = array.shape[0]
        elif array.shape[0] != n_samples:
            raise InvalidInput(
                f"every layer must have the same number of samples: {n_samples} before, "
                f"{array.shape[0]} in layer {name!r}"
            )
        out[str(name)] = array
    return out


def _round_robin(capacity: list[int], budget: int) -> list[int]:
    """Deal ``budget`` nodes to layers one at a time, in layer order, skipping full layers."""
    quota = [0] * len(capacity)
    remaining = min(budget, sum(capacity))
    while remaining:
        for i, cap in enumerate(capacity):
            if remaining and quota[i] < cap:
                quota[i] += 1
                remaining -= 1
    return quota


class NodeSelector:
    """Choose the nodes of the functional graph from captured activations.

    Parameters
    ----------
    node_budget : int >= 2, default DEFAULT_NODE_BUDGET (64)
        Maximum number of nodes over all layers. Keeps ripser's cost bounded (see
        :func:`population_betti_curves`).

    Attributes
    ----------
    layers_ : list of str
        Layer names seen in ``fit``, in mapping order.
    layer_shapes_ : list of tuple of int
        Per-sample shape of each layer (without the sample axis).
    node_layer_ : ndarray of shape (n_nodes,), int64
        Index into ``layers_`` of each node.
    node_unit_ : ndarray of shape (n_nodes,), int64
        Channel (rank >= 3) or unit (rank 2) of each node within its layer.
    node_variance_ : ndarray of shape (n_nodes,), float64
        Variance of each node's value over the fit data (what it was ranked by).

    Notes
    -----
    Node values: for a tensor of shape (n_samples, C, H, W) (any rank >= 3, channels first as in
    ONNX) one node per channel, valued by the spatial mean over the trailing axes; for a dense
    tensor (n_samples, units) one node per unit.

    Budget rule: nodes are dealt to the layers round-robin, one at a time in layer order, skipping
    a layer once all its channels/units are taken, until the budget or the candidates run out. So
    every layer gets floor(B/L) or one more (earlier layers first), and what a small layer cannot
    use goes to the others. Within a layer the nodes with the largest variance over the fit data
    are kept (ties to the lower index), then listed in index order. Constant nodes are chosen only
    when a layer has nothing better; :func:`correlation_distance` gives them distance 1 to all.
    """

    def __init__(self, node_budget: int = DEFAULT_NODE_BUDGET) -> None:
        self.node_budget = node_budget

    def fit(self, activations: Mapping[str, np.ndarray]) -> "NodeSelector":
        """Pick the nodes from clean ``activations`` (name -> (n_samples, ...)); return self."""
        budget = self.node_budget
        if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)) or budget < 2:
            raise InvalidInput(f"node_budget must be an int >= 2, got {budget!r}")
        layers = _check_activations(activations)
        n_samples = next(iter(layers.values())).shape[0]
        if n_samples < 2:
            raise InvalidInput(f"fit needs at least 2 samples to rank nodes by variance, got {n_samples}")
        variances = [_node_values(name, a).var(axis=0) for name, a in layers.items()]
        quota = _round_robin([v.shape[0] for v in variances], int(budget))
        node_layer, node_unit, node_var = [], [], []
        for i, (var, q) in enumerate(zip(variances, quota)):
            units = np.sort(np.argsort(-var, kind="stable")[:q])
            node_layer.append(np.full(q, i, dtype=np.int64))
            node_unit.append(units.astype(np.int64))
            node_var.append(var[units])
        return self._set_nodes(list(layers), [tuple(int(s) for s in a.shape[1:]) for a in layers.values()],
                               np.concatenate(node_layer), np.concatenate(node_unit), np.concatenate(node_var))

    def _set_nodes(self, layers: list[str], shapes: list[tuple[int, ...]], node_layer: np.ndarray,
                   node_unit: np.ndarray, node_variance: np.ndarray) -> "NodeSelector":
        """Set the fitted attributes, and the node columns of each layer that :meth:`transform` fills."""
        self.layers_ = layers
        self.layer_shapes_ = shapes
        self.node_layer_ = node_layer.astype(np.int64)
        self.node_unit_ = node_unit.astype(np.int64)
        self.node_variance_ = node_variance.astype(np.float64)
        self._columns = [np.flatnonzero(self.node_layer_ == i) for i in range(len(layers))]
        return self

    @property
    def n_nodes_(self) -> int:
        """Number of selected nodes."""
        self._check_fitted()
        return int(self.node_layer_.shape[0])

    def node_names(self) -> list[str]:
        """A label per node, ``"<layer>[<unit>]"``."""
        self._check_fitted()
        return [f"{self.layers_[l]}[{u}]" for l, u in zip(self.node_layer_, self.node_unit_)]

    def transform(self, activations: Mapping[str, np.ndarray]) -> np.ndarray:
        """Node values of a batch, ndarray of shape (n_samples, n_nodes), float64.

        Raises
        ------
        NotReady
            Before ``fit`` / ``from_state``.
        InvalidInput
            If a fitted layer is missing, has another per-sample shape, or holds NaN/Inf.
        """
        self._check_fitted()
        if not isinstance(activations, Mapping):
            raise InvalidInput(f"activations must be a mapping of layer name to array, got {type(activations).__name__}")
        missing = [name for name in self.layers_ if name not in activations]
        if missing:
            raise InvalidInput(f"activations lack layer(s) {missing}; expected {self.layers_}")
        layers = _check_activations({name: activations[name] for name in self.layers_})  # only the fitted ones
        n_samples = layers[self.layers_[0]].shape[0]
        out = np.empty((n_samples, self.node_layer_.shape[0]), dtype=np.float64)
        for i, (name, shape) in enumerate(zip(self.layers_, self.layer_shapes_)):
            array = layers[name]
            if tuple(array.shape[1:]) != shape:
                raise InvalidInput(
                    f"layer {name!r}: expected per-sample shape {shape}, got {tuple(array.shape[1:])}"
                )
            columns = self._columns[i]
            if columns.size:  # only the selected units (channels): a window sees every request
                out[:, columns] = _node_values(name, array[:, self.node_unit_[columns]])
        return out

    def fit_transform(self, activations: Mapping[str, np.ndarray]) -> np.ndarray:
        """``fit(activations).transform(activations)``."""
        return self.fit(activations).transform(activations)

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able parameters and the fitted state as plain numpy arrays."""
        self._check_fitted()
        params = {
            "node_budget": int(self.node_budget),
            "layers": list(self.layers_),
            "layer_shapes": [list(s) for s in self.layer_shapes_],
        }
        arrays = {
            "node_layer": self.node_layer_.copy(),
            "node_unit": self.node_unit_.copy(),
            "node_variance": self.node_variance_.copy(),
        }
        return params, arrays

    @classmethod
    def from_state(cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> "NodeSelector":
        """Rebuild a fitted selector from :meth:`get_state` output.

        Raises
        ------
        BaselineError
            If keys are missing or the arrays do not fit the layers.
        """
        try:
            selector = cls(node_budget=int(params["node_budget"]))
            layers = [str(name) for name in params["layers"]]
            shapes = [tuple(int(s) for s in shape) for shape in params["layer_shapes"]]
            node_layer = np.asarray(arrays["node_layer"])
            node_unit = np.asarray(arrays["node_unit"])
            node_variance = np.asarray(arrays["node_variance"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BaselineError(f"NodeSelector state is incomplete or malformed: {exc!r}") from exc
        n = node_layer.shape[0]
        if (
            len(layers) != len(shapes)
            or any(len(s) < 1 for s in shapes)
            or node_layer.shape != (n,)
            or node_unit.shape != (n,)
            or node_variance.shape != (n,)
            or not np.issubdtype(node_layer.dtype, np.integer)
            or not np.issubdtype(node_unit.dtype, np.integer)
        ):
            raise BaselineError("NodeSelector state arrays have inconsistent shapes or dtypes")
        if n and (
            node_layer.min() < 0
            or node_layer.max() >= len(layers)
            or node_unit.min() < 0
            or np.any(node_unit >= np.array([shapes[i][0] for i in node_layer]))
        ):
            raise BaselineError("NodeSelector state refers to layers or units that do not exist")
        return selector._set_nodes(layers, shapes, node_layer, node_unit, node_variance)

    def _check_fitted(self) -> None:
        if not hasattr(self, "node_layer_"):
            raise NotReady("NodeSelector is not fitted: call fit() or from_state() first")


# --------------------------------------------------------------------------------------------------
# population: graphs and their topology


def correlation_distance(node_values: np.ndarray) -> np.ndarray:
    """Functional-graph distance 1 - |Pearson correlation| between nodes.

    Parameters
    ----------
    node_values : ndarray of shape (n_samples, n_nodes)
        One row per input, n_samples >= 2.

    Returns
    -------
    ndarray of shape (n_nodes, n_nodes), float64
        Symmetric, values in [0, 1], zero diagonal.

    Notes
    -----
    c_ij = cov(a_i, a_j) / (s_i s_j) over the samples (Corneanu et al., eq. 5), D_ij = 1 - |c_ij|.
    A constant node (s_i = 0) has no defined correlation; it is given c_ij = 0 with every other
    node (distance 1, never an edge) instead of NaN.
    """
    x = np.asarray(node_values)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise InvalidInput(f"node_values must have shape (n_samples >= 2, n_nodes >= 1), got {x.shape}")
    x = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        raise InvalidInput("node_values contain NaN or Inf")
    centred = x - x.mean(axis=0)
    scale = np.sqrt(np.einsum("ij,ij->j", centred, centred))
    # Relative test: a column whose spread is at rounding level of its mean is constant.
    constant = scale <= 1e-12 * (np.abs(x).max(axis=0) * np.sqrt(x.shape[0]) + 1e-300)
    z = np.where(constant, 0.0, centred / np.where(constant, 1.0, scale))
    corr = z.T @ z
    distance = 1.0 - np.clip(np.abs(corr), 0.0, 1.0)
    distance = 0.5 * (distance + distance.T)
    np.fill_diagonal(distance, 0.0)
    return distance


def _check_distance(distance: Any) -> np.ndarray:
    """float32 copy of a symmetric non-negative distance matrix, upper triangle mirrored, zero diagonal."""
    d = np.asarray(distance)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 1:
        raise InvalidInput(f"distance must be a square (n, n) matrix with n >= 1, got shape {d.shape}")
    if not (np.issubdtype(d.dtype, np.floating) or np.issubdtype(d.dtype, np.integer)):
        raise InvalidInput(f"distance must hold real numbers, got dtype {d.dtype}")
    d = d.astype(np.float64, copy=False)
    if not np.all(np.isfinite(d)):
        raise InvalidInput("distance contains NaN or Inf")
    if d.min() < 0:
        raise InvalidInput(f"distance must be >= 0, got minimum {d.min()}")
    if not np.allclose(d, d.T, rtol=1e-6, atol=1e-6):
        raise InvalidInput("distance must be symmetric")
    upper = np.triu(d.astype(np.float32), 1)
    return upper + upper.T  # the entries ripser reads (i < j), mirrored; zero diagonal


def _check_thresholds(thresholds: Any) -> np.ndarray:
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)):
        raise InvalidInput(f"thresholds must be a non-empty 1-D array of finite numbers, got {thresholds!r}")
    return t.astype(np.float32)


def _check_max(value: Any, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidInput(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def clique_complex_betti(distance: np.ndarray, thresholds: np.ndarray, max_dim: int = 3) -> np.ndarray:
    """Betti numbers beta1..beta_max_dim of clique complexes of the graphs {d <= t}.

    Parameters
    ----------
    distance : ndarray of shape (n, n)
        Symmetric, >= 0; only the upper triangle (i < j) is read, the diagonal is ignored.
    thresholds : array-like of shape (n_thresholds,)
        Edge (i, j) is in the graph at threshold t when distance[i, j] <= t.
    max_dim : int >= 1, default 3
        Highest homology dimension.

    Returns
    -------
    ndarray of shape (max_dim, n_thresholds), int64
        Row k-1 holds beta_k (over the field F2) of the clique (Vietoris-Rips) complex at each
        threshold.

    Notes
    -----
    One ripser call with ``thresh`` = the largest threshold and ``maxdim`` = max_dim gives every
    bar [b, d) of the filtration up to that threshold; beta_k(t) is the number of dimension-k bars
    alive at t, i.e. with b <= t < d (bars still alive at the largest threshold have d = inf).
    ripser stores distances as float32, so distances and thresholds are compared in float32 here
    (and in :func:`clique_counts`), which keeps every function of this module on the same graph.
    """
    from ripser import ripser  # heavy import, only where needed

    d32 = _check_distance(distance)
    t32 = _check_thresholds(thresholds)
    max_dim = _check_max(max_dim, "max_dim", 1)
    out = np.zeros((max_dim, t32.shape[0]), dtype=np.int64)
    top = float(t32.max())
    if d32.shape[0] < 2 or top < 0:
        return out
    diagrams = ripser(d32, distance_matrix=True, maxdim=max_dim, thresh=top)["dgms"]
    for k in range(1, max_dim + 1):
        bars = np.asarray(diagrams[k], dtype=np.float32)
        if bars.size == 0:
            continue
        alive = (bars[:, :1] <= t32[None, :]) & (t32[None, :] < bars[:, 1:2])
        out[k - 1] = alive.sum(axis=0)
    return out


def clique_counts(distance: np.ndarray, threshold: float, max_size: int = 4) -> np.ndarray:
    """Number of cliques with 1, 2, ..., max_size vertices in the graph {d <= threshold}.

    Parameters
    ----------
    distance : ndarray of shape (n, n)
        As in :func:`clique_complex_betti` (upper triangle read, compared in float32).
    threshold : float
        Edge threshold.
    max_size : int >= 1, default 4
        Largest clique size (number of vertices) counted.

    Returns
    -------
    ndarray of shape (max_size,), int64
        Entry s-1 is the number of s-vertex cliques: n, |E|, triangles, ... (K4 gives 4, 6, 4, 1).
        Corneanu et al. call an s-vertex clique an (s-1)-clique; entry s-1 is their (s-1)-cliques.

    Notes
    -----
    Level-wise vectorised enumeration: every s-clique {v1 < ... < vs} is stored only through the
    boolean row of its possible extensions, ext = A[v1] & ... & A[vs] & (index > vs); its
    (s+1)-cliques are the true entries of that row, and each new row is the parent row AND the new
    vertex's adjacency row. Each clique is produced once (increasing vertex order). Cost and memory
    are O(#cliques x n) per level, fine for the few dozen nodes of a population graph; a table
    beyond 2e8 entries raises InvalidInput.
    """
    d32 = _check_distance(distance)
    t32 = _check_thresholds(threshold)
    if t32.shape != (1,):
        raise InvalidInput(f"threshold must be a single number, got {threshold!r}")
    max_size = _check_max(max_size, "max_size", 1)
    n = d32.shape[0]
    adjacency = d32 <= t32[0]
    np.fill_diagonal(adjacency, False)
    later = np.arange(n)[None, :] > np.arange(n)[:, None]  # later[i, j] = j > i
    counts = np.zeros(max_size, dtype=np.int64)
    counts[0] = n
    extensions = adjacency & later  # row v: the 2-cliques {v, j}, j > v
    for size in range(2, max_size + 1):
        rows, last = np.nonzero(extensions)
        counts[size - 1] = rows.shape[0]
        if size == max_size or rows.shape[0] == 0:
            break
        if rows.shape[0] * n > _MAX_CLIQUE_TABLE:
            raise InvalidInput(
                f"too many {size}-cliques ({rows.shape[0]}) to extend on {n} nodes; lower max_size or the threshold"
            )
        extensions = extensions[rows] & adjacency[last] & later[last]
    return counts


def density_thresholds(distance: np.ndarray, densities: np.ndarray) -> np.ndarray:
    """Distance thresholds that keep a fraction ``densities`` of the correlated node pairs.

    Parameters
    ----------
    distance : ndarray of shape (n, n)
        A correlation distance (:func:`correlation_distance`), values in [0, 1].
    densities : array-like of shape (n_densities,), values in (0, 1]

    Returns
    -------
    ndarray of shape (n_densities,), float64
        Threshold t_rho (a float32 value): the graph {d <= t_rho} holds the ceil(rho P) most
        correlated pairs, P = number of pairs with non-zero correlation (d < 1), plus any pair tied
        with the last one. -1.0 (an empty graph) where P = 0.

    Notes
    -----
    Corneanu et al., Algorithm 1: add node pairs by decreasing |c_ij|; density
    rho_k = k / #{i < j : |c_ij| > 0}. Uncorrelated pairs (d = 1) never become edges.
    """
    d32 = _check_distance(distance)
    rho = check_densities(densities)
    n = d32.shape[0]
    pairs = d32[np.triu_indices(n, 1)]
    correlated = np.sort(pairs[pairs < 1.0])
    if correlated.shape[0] == 0:
        return np.full(rho.shape[0], -1.0)
    return correlated[_kept_count(rho, correlated.shape[0]) - 1].astype(np.float64)


def population_betti_curves(
    node_values: np.ndarray,
    densities: np.ndarray = DEFAULT_POPULATION_DENSITIES,
    max_dim: int = 3,
    *,
    normalize: bool = True,
) -> np.ndarray:
    """Betti curves of the functional graph of a population of inputs (Corneanu et al.).

    Parameters
    ----------
    node_values : ndarray of shape (n_samples, n_nodes)
        Node values of the population (:meth:`NodeSelector.transform`), n_samples >= 2.
    densities : array-like of shape (n_densities,), default DEFAULT_POPULATION_DENSITIES
        Graph densities rho in (0, 1] (0.05, 0.10, ..., 0.50 by default).
    max_dim : int >= 1, default 3
        Curves for beta1 .. beta_max_dim.
    normalize : bool, default True
        Divide by the number of nodes ("cavities per node", as in Corneanu et al., Fig. 5).

    Returns
    -------
    ndarray of shape (max_dim, n_densities), float64
        Row k-1: beta_k of the clique complex of the binary graph at each density.

    Notes
    -----
    D = 1 - |corr| (:func:`correlation_distance`), thresholds from :func:`density_thresholds`,
    Betti numbers from one ripser call (:func:`clique_complex_betti`). Cost: ripser with maxdim 3
    on 64 nodes at density 0.5 runs in tens of milliseconds; it grows roughly like n^5, so keep the
    node budget near the default.
    """
    return population_signature(node_values, densities, max_dim, normalize=normalize)[0]


def population_signature(
    node_values: np.ndarray,
    densities: np.ndarray = DEFAULT_POPULATION_DENSITIES,
    max_dim: int = 3,
    *,
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Population Betti curves and the distance thresholds at which each density is reached.

    Returns
    -------
    curves : ndarray of shape (max_dim, n_densities), float64
        As :func:`population_betti_curves`.
    thresholds : ndarray of shape (n_densities,), float64
        The filtration value 1 - |c| of the binary graph at each density (:func:`density_thresholds`):
        how strongly the nodes co-vary, a scale that the density-indexed curves normalise away.
    """
    distance = correlation_distance(node_values)
    thresholds = density_thresholds(distance, densities)
    betti = clique_complex_betti(distance, thresholds, max_dim=max_dim).astype(np.float64)
    if normalize:
        betti /= distance.shape[0]
    return betti, thresholds
