"""H0 persistence of weighted graphs: closed forms, the fast path against ripser, features."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from detector.topology import persistence
from detector.errors import InvalidInput
from detector.topology.persistence import (
    DEFAULT_QUANTILES,
    H0Diagram,
    h0_feature_names,
    h0_features,
    h0_features_by_group,
    h0_features_of_descending,
    h0_persistence,
    h0_persistence_ripser,
)


# --------------------------------------------------------------------------------------------------
# graph generators


def random_graph(rng: np.random.Generator, kind: str) -> tuple[int, np.ndarray, np.ndarray]:
    """A random weighted graph of one of several awkward kinds (ties, zeros, blocks, loops...)."""
    n = int(rng.integers(1, 60))
    m = int(rng.integers(0, 4 * n + 2))
    edges = rng.integers(0, n, size=(m, 2))
    if kind == "continuous":
        weights = rng.exponential(size=m)
    elif kind == "ties":
        weights = rng.integers(1, 4, size=m).astype(np.float64)  # three distinct values
    elif kind == "zeros":
        weights = rng.random(m) * (rng.random(m) < 0.5)
    elif kind == "blocks":  # two (or more) disconnected blocks plus isolated vertices
        cut = max(1, n // 2)
        side = rng.random(m) < 0.5
        edges = np.where(side[:, None], edges % cut, cut + edges % max(1, n - cut))
        edges = np.minimum(edges, n - 1)
        weights = np.round(rng.random(m), 1)
    elif kind == "loops_and_parallel":
        edges = np.concatenate([edges, edges[: m // 3], np.repeat(edges[: m // 4, :1], 2, axis=1)])
        weights = rng.integers(0, 3, size=edges.shape[0]).astype(np.float64)
    else:  # pragma: no cover
        raise ValueError(kind)
    return n, edges.astype(np.int64), weights


def layered_graph(
    rng: np.random.Generator, sizes: list[int], dead: float
) -> tuple[int, np.ndarray, np.ndarray]:
    """A Gebhart-style induced graph: complete bipartite between layers, weight |w h|, dead units."""
    offsets = np.cumsum([0] + sizes)
    edges, weights = [], []
    for layer in range(len(sizes) - 1):
        h = np.abs(rng.standard_normal(sizes[layer])) * (rng.random(sizes[layer]) > dead)
        w = rng.standard_normal((sizes[layer], sizes[layer + 1]))
        u, v = np.meshgrid(np.arange(sizes[layer]), np.arange(sizes[layer + 1]), indexing="ij")
        edges.append(np.stack([u.ravel() + offsets[layer], v.ravel() + offsets[layer + 1]], axis=1))
        # float32 weights, as an ONNX model produces them
        weights.append(np.abs(w * h[:, None]).astype(np.float32).astype(np.float64).ravel())
    return int(offsets[-1]), np.concatenate(edges), np.concatenate(weights)


def assert_valid_forest(n: int, edges: np.ndarray, weights: np.ndarray, diagram: H0Diagram) -> None:
    """merge_edges/merge_index/deaths agree, form a forest, and span the non-zero graph's components."""
    k = diagram.n_merges
    assert diagram.merge_index.shape == (k,) and diagram.merge_edges.shape == (k, 2)
    np.testing.assert_array_equal(diagram.deaths, weights[diagram.merge_index])
    np.testing.assert_array_equal(diagram.merge_edges, edges[diagram.merge_index])
    assert np.all(np.diff(diagram.deaths) <= 0), "deaths must be in descending order"
    assert np.all(diagram.deaths > 0)
    forest = csr_matrix((np.ones(k), (diagram.merge_edges[:, 0], diagram.merge_edges[:, 1])), shape=(n, n))
    n_forest, forest_labels = connected_components(forest, directed=False)
    assert n_forest == n - k, "merge edges contain a cycle"
    positive = weights > 0
    full = csr_matrix(
        (np.ones(int(positive.sum())), (edges[positive, 0], edges[positive, 1])), shape=(n, n)
    )
    n_full, _ = connected_components(full, directed=False)
    assert diagram.n_components == n_full == n_forest
    # every non-zero edge lies inside one tree of the forest
    np.testing.assert_array_equal(forest_labels[edges[positive, 0]], forest_labels[edges[positive, 1]])


# --------------------------------------------------------------------------------------------------
# closed forms


def test_hand_made_graph_gives_maximum_spanning_forest_weights() -> None:
    # triangle 0-1-2 with weights 3, 1, 2; an edge 3-4 of weight 5; vertex 5 isolated;
    # a zero-weight edge 4-5 that must count as absent.
    edges = np.array([[0, 1], [1, 2], [0, 2], [3, 4], [4, 5]])
    weights = np.array([3.0, 1.0, 2.0, 5.0, 0.0])
    for compute in (h0_persistence, h0_persistence_ripser):
        diagram = compute(6, edges, weights)
        np.testing.assert_array_equal(diagram.deaths, [5.0, 3.0, 2.0])
        assert diagram.n_components == 3  # {0,1,2}, {3,4}, {5}
        assert diagram.n_vertices == 6
    fast = h0_persistence(6, edges, weights)
    np.testing.assert_array_equal(fast.merge_index, [3, 0, 2])
    np.testing.assert_array_equal(fast.merge_edges, [[3, 4], [0, 1], [0, 2]])
    # the forest itself, with a label carried along, from float32 weights (what induced graphs carry): with
    # the edge packed in the sort key (15 labels) and, when it does not fit in 32 bits, looked up by position
    for n_labels in (15, 2**30):
        deaths, forest, labels = persistence.forest_edges(6, edges[:, 0], edges[:, 1], weights.astype(np.float32),
                                                          np.arange(10, 15), n_labels)
        np.testing.assert_array_equal(deaths, [5.0, 3.0, 2.0])
        np.testing.assert_array_equal(forest, [[3, 4], [0, 1], [0, 2]])
        np.testing.assert_array_equal(labels, [13, 10, 12])
        assert deaths.dtype == np.float64 and forest.dtype == labels.dtype == np.int64


def test_forest_edges_with_packed_keys_match_the_positional_scan_with_ties() -> None:
    rng = np.random.default_rng(0)
    n, m = 3000, 20000
    u, v = rng.integers(0, n, m).astype(np.int32), rng.integers(0, n, m).astype(np.int32)
    weights = (rng.integers(0, 200, m) / 50).astype(np.float32)  # many ties, and zeros (absent edges)
    label = rng.integers(0, 7, m).astype(np.int32)
    packed = persistence.forest_edges(n, u, v, weights, label, 7)
    positional = persistence.forest_edges(n, u, v, weights, label, 2**30)
    np.testing.assert_array_equal(packed[0], positional[0])
    np.testing.assert_array_equal(packed[0], h0_persistence(n, np.c_[u, v], weights).deaths)
    edge_weights: dict[tuple[int, int, int], set[float]] = {}
    for a, b, w, lab in zip(u.tolist(), v.tolist(), weights.tolist(), label.tolist()):
        edge_weights.setdefault((a, b, lab), set()).add(w)
    for (a, b), lab, d in zip(packed[1], packed[2], packed[0]):  # real edges, with their own weight and label
        assert d in edge_weights[(int(a), int(b), int(lab))]
    assert len(np.unique(np.sort(packed[1], axis=1), axis=0)) == len(packed[1])  # no edge twice


def test_graph_without_nonzero_edges_has_only_essential_bars() -> None:
    edges = np.array([[0, 1], [1, 2]])
    for compute in (h0_persistence, h0_persistence_ripser):
        diagram = compute(4, edges, np.zeros(2))
        assert diagram.n_merges == 0 and diagram.n_components == 4
        empty = compute(1, np.zeros((0, 2), dtype=np.int64), np.zeros(0))
        assert empty.n_merges == 0 and empty.n_components == 1


def test_parallel_edges_act_through_the_heaviest_and_loops_never_merge() -> None:
    edges = np.array([[0, 1], [1, 0], [0, 1], [1, 1], [1, 2]])
    weights = np.array([1.0, 7.0, 2.0, 9.0, 4.0])
    for compute in (h0_persistence, h0_persistence_ripser):
        np.testing.assert_array_equal(compute(3, edges, weights).deaths, [7.0, 4.0])
    np.testing.assert_array_equal(h0_persistence(3, edges, weights).merge_edges, [[1, 0], [1, 2]])


def test_diagram_is_immutable_without_freezing_the_callers_arrays() -> None:
    diagram = h0_persistence(3, np.array([[0, 1], [1, 2]]), np.array([1.0, 2.0]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        diagram.n_components = 0  # type: ignore[misc]
    with pytest.raises(ValueError):
        diagram.deaths[0] = 10.0
    deaths = np.array([2.0, 1.0])
    H0Diagram(deaths=deaths, merge_edges=None, n_vertices=3, n_components=1)
    deaths[0] = 3.0  # still writable


# --------------------------------------------------------------------------------------------------
# fast path == ripser


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "blocks", "loops_and_parallel"])
def test_fast_path_matches_ripser_on_random_graphs(kind: str) -> None:
    rng = np.random.default_rng(sum(map(ord, kind)))
    for _ in range(40):
        n, edges, weights = random_graph(rng, kind)
        fast = h0_persistence(n, edges, weights)
        reference = h0_persistence_ripser(n, edges, weights)
        # Multisets of death weights, compared in float32 as the brief asks; the rank map of the
        # reference is exact, so they are in fact equal in float64 too.
        np.testing.assert_array_equal(fast.deaths.astype(np.float32), reference.deaths.astype(np.float32))
        np.testing.assert_array_equal(fast.deaths, reference.deaths)
        assert fast.n_components == reference.n_components
        assert_valid_forest(n, edges, weights, fast)


@pytest.mark.parametrize(
    ("seed", "n", "m", "levels", "zero_fraction"),
    [(0, 300, 20_000, 0, 0.0), (1, 300, 20_000, 5, 0.3), (2, 1_000, 30_000, 50, 0.1)],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_path_matches_ripser_on_large_graphs(
    seed: int, n: int, m: int, levels: int, zero_fraction: float, dtype: type
) -> None:
    rng = np.random.default_rng(seed)
    edges = rng.integers(0, n, size=(m, 2))
    weights = rng.integers(1, levels + 1, size=m).astype(dtype) if levels else rng.random(m).astype(dtype)
    weights[rng.random(m) < zero_fraction] = 0.0
    fast = h0_persistence(n, edges, weights)
    reference = h0_persistence_ripser(n, edges, weights)
    np.testing.assert_array_equal(fast.deaths, reference.deaths)
    assert fast.n_components == reference.n_components
    assert_valid_forest(n, edges, weights.astype(np.float64), fast)


def test_fast_path_matches_ripser_on_layered_induced_graph() -> None:
    # Dead units leave many vertices isolated and the strongest edges cluster on a few hubs.
    rng = np.random.default_rng(0)
    n, edges, weights = layered_graph(rng, [64, 256, 256, 10], dead=0.5)
    fast = h0_persistence(n, edges, weights)
    reference = h0_persistence_ripser(n, edges, weights)
    np.testing.assert_array_equal(fast.deaths, reference.deaths)
    assert fast.n_components == reference.n_components > 1
    assert_valid_forest(n, edges, weights, fast)


@pytest.mark.parametrize("levels", [0, 3])
def test_sort_keys_order_float32_weights_like_a_stable_argsort(levels: int) -> None:
    rng = np.random.default_rng(levels)
    w = (rng.integers(0, levels + 1, size=5_000) if levels else rng.exponential(size=5_000) * (rng.random(5_000) < 0.7))
    w32 = w.astype(np.float32)
    expected = np.flatnonzero(w32 > 0)[np.argsort(-w32[w32 > 0], kind="stable")]
    for weights in (w32, w32.astype(np.float64)):  # the packed-key sort, and the argsort of other dtypes
        positions = persistence._sorted_keys(weights) & np.uint64(0xFFFFFFFF)
        np.testing.assert_array_equal(positions.astype(np.int64), expected)


# --------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("n", "edges", "weights", "match"),
    [
        (0, np.zeros((0, 2), dtype=np.int64), np.zeros(0), "n_vertices must be >= 1"),
        (2.0, np.array([[0, 1]]), np.array([1.0]), "n_vertices must be an int"),
        (3, np.array([0, 1]), np.array([1.0]), r"edges must have shape \(m, 2\)"),
        (3, np.array([[0.0, 1.0]]), np.array([1.0]), "integer vertex ids"),
        (3, np.array([[0, 3]]), np.array([1.0]), r"\[0, 3\)"),
        (3, np.array([[-1, 2]]), np.array([1.0]), r"\[0, 3\)"),
        (3, np.array([[0, 1]]), np.array([1.0, 2.0]), r"shape \(1,\)"),
        (3, np.array([[0, 1]]), np.array([-1.0]), ">= 0"),
        (3, np.array([[0, 1]]), np.array([np.nan]), "finite"),
        (3, np.array([[0, 1]]), np.array([np.inf]), "finite"),
    ],
)
def test_malformed_graphs_are_rejected(n, edges, weights, match: str) -> None:
    for compute in (h0_persistence, h0_persistence_ripser):
        with pytest.raises(InvalidInput, match=match):
            compute(n, edges, weights)


# --------------------------------------------------------------------------------------------------
# features


def test_features_follow_their_definitions() -> None:
    diagram = H0Diagram(
        deaths=np.array([4.0, 3.0, 2.0, 1.0]), merge_edges=None, n_vertices=8, n_components=4
    )
    features = h0_features(diagram, quantiles=(0.0, 0.5, 1.0), p=2.0)
    names = h0_feature_names(quantiles=(0.0, 0.5, 1.0), p=2.0)
    assert names == [
        "h0_death_q0",
        "h0_death_q50",
        "h0_death_q100",
        "h0_total_persistence_p2",
        "h0_persistent_entropy",
        "h0_merged_fraction",
    ]
    share = np.array([4.0, 3.0, 2.0, 1.0]) / 10.0
    expected = [1.0, 2.5, 4.0, np.sqrt(30.0), -(share * np.log(share)).sum() / np.log(4), 0.5]
    np.testing.assert_allclose(features, expected, rtol=1e-12)
    # p = 1 is the weight of the maximum spanning forest, p = inf its largest edge
    assert h0_features(diagram, p=1.0)[-3] == pytest.approx(10.0)
    assert h0_features(diagram, p=np.inf)[-3] == pytest.approx(4.0)
    assert h0_feature_names(p=np.inf)[-3] == "h0_total_persistence_pinf"
    # equal deaths spread the strength evenly: entropy 1
    even = H0Diagram(deaths=np.full(5, 0.7), merge_edges=None, n_vertices=6, n_components=1)
    assert h0_features(even)[-2] == pytest.approx(1.0)


def test_features_by_group_equal_the_features_of_each_sub_diagram() -> None:
    rng = np.random.default_rng(5)
    n, edges, weights = layered_graph(rng, [30, 20, 10], dead=0.3)
    diagram = h0_persistence(n, edges, weights)
    group = rng.integers(0, 3, size=diagram.n_merges)
    sizes = np.array([50, 30, 7])
    rows = h0_features_by_group(diagram, group, sizes, quantiles=(0.0, 0.3, 0.5, 1.0), p=3.0)
    assert rows.shape == (4, 7)
    np.testing.assert_allclose(rows[0], h0_features(diagram, quantiles=(0.0, 0.3, 0.5, 1.0), p=3.0), rtol=1e-12)
    for g, size in enumerate(sizes):
        sub = H0Diagram(deaths=diagram.deaths[group == g], merge_edges=None, n_vertices=int(size),
                        n_components=int(size) - int((group == g).sum()))
        np.testing.assert_allclose(rows[1 + g], h0_features(sub, quantiles=(0.0, 0.3, 0.5, 1.0), p=3.0), rtol=1e-12)
        # and against numpy's own quantile, the reference for the interpolation
        np.testing.assert_allclose(rows[1 + g, :4], np.quantile(sub.deaths, (0.0, 0.3, 0.5, 1.0)), rtol=1e-12)
    # deaths given out of order (a hand-made diagram) are summarised as if sorted
    shuffled = H0Diagram(deaths=rng.permutation(diagram.deaths), merge_edges=None, n_vertices=n,
                         n_components=diagram.n_components)
    np.testing.assert_allclose(h0_features(shuffled), h0_features(diagram), rtol=1e-12)
    order = rng.permutation(diagram.n_merges)  # ... also with their groups
    shuffled = H0Diagram(deaths=diagram.deaths[order], merge_edges=None, n_vertices=n, n_components=diagram.n_components)
    np.testing.assert_allclose(h0_features_by_group(shuffled, group[order], sizes, quantiles=(0.0, 0.3, 0.5, 1.0), p=3.0),
                               rows, rtol=1e-12)
    with pytest.raises(InvalidInput, match="group"):
        h0_features_by_group(diagram, group + 3, sizes)
    # the unchecked entry of the per-request path gives the same rows for a Kruskal (descending) diagram
    fast = h0_features_of_descending(np.asarray(diagram.deaths), group, np.r_[n, sizes].astype(np.float64),
                                     np.array([0.0, 0.3, 0.5, 1.0]), 3.0)
    np.testing.assert_array_equal(fast, rows)


def test_features_scale_with_weights_except_entropy() -> None:
    rng = np.random.default_rng(3)
    n, edges, weights = layered_graph(rng, [30, 20, 10], dead=0.3)
    base = h0_features(h0_persistence(n, edges, weights))
    doubled = h0_features(h0_persistence(n, edges, 2.0 * weights))
    q = len(DEFAULT_QUANTILES)
    np.testing.assert_allclose(doubled[: q + 1], 2.0 * base[: q + 1], rtol=1e-12)
    np.testing.assert_allclose(doubled[q + 1 :], base[q + 1 :], rtol=1e-12)
    assert base.shape == (len(h0_feature_names()),)
    assert np.all(np.isfinite(base)) and 0.0 < base[-2] < 1.0


def test_empty_and_single_bar_diagrams_are_padded_not_nan() -> None:
    empty = h0_persistence(3, np.array([[0, 1]]), np.array([0.0]))
    features = h0_features(empty)
    np.testing.assert_array_equal(features, np.zeros(len(DEFAULT_QUANTILES) + 3))
    single = h0_features(h0_persistence(3, np.array([[0, 1]]), np.array([2.5])))
    assert np.all(np.isfinite(single))
    assert single[-2] == 0.0 and single[-1] == pytest.approx(1 / 3) and single[0] == 2.5


def test_feature_arguments_are_validated() -> None:
    diagram = h0_persistence(2, np.array([[0, 1]]), np.array([1.0]))
    with pytest.raises(InvalidInput, match="quantiles"):
        h0_features(diagram, quantiles=(0.5, 1.5))
    with pytest.raises(InvalidInput, match="p must be >= 1"):
        h0_features(diagram, p=0.5)
    with pytest.raises(InvalidInput, match="H0Diagram"):
        h0_features(np.array([1.0]))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_fast_path_matches_ripser_on_real_induced_graphs(demo_models, digits_split_arrays, name: str) -> None:
    from detector.topology.induced_graph import InducedGraph
    from detector.model import OnnxClassifier

    structure = InducedGraph.from_classifier(OnnxClassifier(demo_models / f"{name}.onnx"))
    classifier = OnnxClassifier(demo_models / f"{name}.onnx", capture=structure.required_tensors)
    graph = InducedGraph.from_classifier(classifier)
    capture = classifier.run(digits_split_arrays["x_test"][:8])
    for i in range(len(capture)):
        g = graph.edges(capture, i)
        fast = h0_persistence(g.n_vertices, g.edges, g.weights)
        reference = h0_persistence_ripser(g.n_vertices, g.edges, g.weights)
        np.testing.assert_array_equal(fast.deaths.astype(np.float32), reference.deaths.astype(np.float32))
        assert fast.n_components == reference.n_components
        assert_valid_forest(g.n_vertices, g.edges, g.weights.astype(np.float64), fast)
