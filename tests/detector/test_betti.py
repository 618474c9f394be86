"""Betti numbers by density: per-input signatures and population curves, with known answers."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.datasets import load_digits

from detector.topology.betti import (
    strongest_cuts,
    DEFAULT_DENSITIES,
    DEFAULT_NODE_BUDGET,
    DEFAULT_POPULATION_DENSITIES,
    NodeSelector,
    betti_density_signature,
    clique_complex_betti,
    clique_counts,
    correlation_distance,
    density_thresholds,
    population_betti_curves,
)
from detector.errors import BaselineError, InvalidInput, NotReady
from detector.topology.persistence import h0_persistence


# --------------------------------------------------------------------------------------------------
# helpers


def graph_distance(n: int, edges: list[tuple[int, int]], d_edge: float = 0.5) -> np.ndarray:
    """Distance matrix whose graph {d <= d_edge} is exactly ``edges`` (others at 1.0)."""
    distance = np.ones((n, n))
    for i, j in edges:
        distance[i, j] = distance[j, i] = d_edge
    np.fill_diagonal(distance, 0.0)
    return distance


def cycle_edges(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


@pytest.fixture(scope="module")
def digits_pixels() -> np.ndarray:
    """The real sklearn digits as (1797, 64) pixel features in [0, 1] (several pixels are constant 0)."""
    return load_digits().data / 16.0


@pytest.fixture(scope="module")
def digits_activations(digits_pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Conv-like (N, 4, 7, 7) ReLU responses of fixed 2x2 filters on the digits, plus the pixels."""
    images = digits_pixels.reshape(-1, 8, 8)
    patches = np.stack(
        [images[:, :-1, :-1], images[:, :-1, 1:], images[:, 1:, :-1], images[:, 1:, 1:]], axis=-1
    )  # (N, 7, 7, 4): the 2x2 neighbourhood of each position
    filters = np.array(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=np.float64
    ) / 4.0  # mean, vertical edge, horizontal edge, diagonal
    conv = np.maximum(np.einsum("nhwk,ck->nchw", patches, filters), 0.0)
    return {"conv": conv.astype(np.float32), "dense": digits_pixels.astype(np.float32)}


# --------------------------------------------------------------------------------------------------
# per-input signature


def test_signature_of_a_path() -> None:
    # path 0-1-2-3-4 with distinct weights: after the k strongest edges, beta0 = 5 - k, beta1 = 0
    edges = np.array([[0, 1], [1, 2], [2, 3], [3, 4]])
    weights = np.array([4.0, 3.0, 2.0, 1.0])
    signature = betti_density_signature(5, edges, weights, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(signature, [[4 / 5, 3 / 5, 2 / 5, 1 / 5], [0, 0, 0, 0]])


def test_signature_of_a_cycle_closes_one_loop_at_the_last_edge() -> None:
    n = 6
    edges = np.array(cycle_edges(n))
    weights = np.arange(n, 0, -1, dtype=np.float64)  # edge (5, 0) is the weakest
    signature = betti_density_signature(n, edges, weights, np.arange(1, n + 1) / n)
    expected_beta0 = np.array([5, 4, 3, 2, 1, 1]) / n
    expected_beta1 = np.array([0, 0, 0, 0, 0, 1]) / n
    np.testing.assert_allclose(signature, [expected_beta0, expected_beta1])


def test_signature_of_two_components_and_an_isolated_vertex() -> None:
    # two disjoint 4-cycles (vertices 0-3 and 4-7) and vertex 8 alone: beta0 = 3, beta1 = 2
    edges = np.array(cycle_edges(4) + [(i + 4, j + 4) for i, j in cycle_edges(4)])
    weights = np.linspace(1.0, 2.0, 8)
    signature = betti_density_signature(9, edges, weights, [1.0])
    np.testing.assert_allclose(signature[:, 0], [3 / 9, 2 / 9])


def test_signature_keeps_ties_at_the_cut_and_ignores_zero_weights() -> None:
    # a 4-cycle with weights 2, 1, 1, 1 and a zero-weight chord: at density 1/2 (k = 2 of the 4
    # non-zero edges) the cut weight is 1, so all four edges are kept and the loop is closed.
    edges = np.array(cycle_edges(4) + [(0, 2)])
    weights = np.array([2.0, 1.0, 1.0, 1.0, 0.0])
    signature = betti_density_signature(4, edges, weights, [0.25, 0.5])
    np.testing.assert_allclose(signature, [[3 / 4, 1 / 4], [0, 1 / 4]])
    # no non-zero edge at all: every vertex its own component, no loop
    empty = betti_density_signature(4, edges, np.zeros(5))
    np.testing.assert_array_equal(empty, np.vstack([np.ones(16), np.zeros(16)]))


def test_signature_matches_components_counted_from_scratch() -> None:
    # independent reference: build each G_rho and count its components with scipy
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(2, 80))
        m = int(rng.integers(1, 6 * n))
        edges = rng.integers(0, n, size=(m, 2))
        edges = edges[edges[:, 0] != edges[:, 1]]
        weights = rng.integers(0, 6, size=edges.shape[0]).astype(np.float64)  # ties and zeros
        diagram = h0_persistence(n, edges, weights)
        signature = betti_density_signature(n, edges, weights, DEFAULT_DENSITIES, diagram=diagram)
        np.testing.assert_array_equal(signature, betti_density_signature(n, edges, weights))
        positive = np.sort(weights[weights > 0])[::-1]
        for column, rho in enumerate(DEFAULT_DENSITIES):
            if positive.size == 0:
                expected = (n, 0)
            else:
                cut = positive[int(np.ceil(rho * positive.size - 1e-9)) - 1]
                kept = weights >= cut
                graph = csr_matrix((np.ones(kept.sum()), (edges[kept, 0], edges[kept, 1])), shape=(n, n))
                beta0 = connected_components(graph, directed=False)[0]
                expected = (beta0, int(kept.sum()) - n + beta0)
            np.testing.assert_allclose(signature[:, column] * n, expected, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["continuous", "ties", "huge_range"])
def test_strongest_cuts_equal_a_full_sort(dtype: type, kind: str) -> None:
    rng = np.random.default_rng(len(kind))
    m = 20_000
    if kind == "continuous":
        w = rng.exponential(size=m) * rng.exponential(size=m)
    elif kind == "ties":  # whole buckets of equal weights, and a rank inside them
        w = rng.integers(1, 6, size=m) / 4
    else:  # 1e-60 .. 1e30: below float32's smallest subnormal (float64 only) and far above 1
        w = 10.0 ** rng.uniform(-60 if dtype == np.float64 else -40, 30, size=m)
    w = w.astype(dtype)
    w[rng.random(m) < 0.2] = 0.0
    rho = np.r_[DEFAULT_DENSITIES, 0.5, 1.0 / 3.0]
    cut, n_kept = strongest_cuts(w, rho)
    descending = np.sort(w[w > 0])[::-1]
    k = np.ceil(rho * descending.shape[0] - 1e-9).astype(int)
    np.testing.assert_array_equal(cut, descending[k - 1].astype(np.float64))
    np.testing.assert_array_equal(n_kept, [(w >= c).sum() for c in descending[k - 1]])
    empty_cut, empty_kept = strongest_cuts(np.zeros(5, dtype), rho)
    assert empty_cut.size == 0 and empty_kept.size == 0


def test_signature_validates_its_inputs() -> None:
    edges, weights = np.array([[0, 1]]), np.array([1.0])
    with pytest.raises(InvalidInput, match=r"densities must lie in \(0, 1\]"):
        betti_density_signature(2, edges, weights, [0.0, 0.5])
    with pytest.raises(InvalidInput, match="densities"):
        betti_density_signature(2, edges, weights, [np.nan])
    with pytest.raises(InvalidInput, match="H0Diagram of this 3-vertex graph"):
        betti_density_signature(3, edges, weights, diagram=h0_persistence(2, edges, weights))
    with pytest.raises(InvalidInput, match=">= 0"):
        betti_density_signature(2, edges, -weights)


# --------------------------------------------------------------------------------------------------
# clique complexes: known answers


def test_seven_cycle_has_one_loop_until_it_is_triangulated() -> None:
    # the 7-cycle at distance 0.5, then chords from vertex 0 (a fan) at 0.6 and 0.7
    distance = graph_distance(7, cycle_edges(7), 0.5)
    for j, d in [(2, 0.6), (3, 0.6), (4, 0.7), (5, 0.7)]:
        distance[0, j] = distance[j, 0] = d
    betti = clique_complex_betti(distance, [0.4, 0.5, 0.6, 0.7], max_dim=3)
    # 0.5: one loop. 0.6: triangles 012, 023 shorten it, still one loop. 0.7: fully triangulated.
    np.testing.assert_array_equal(betti, [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_octahedron_has_one_void_and_no_loop() -> None:
    # K(2,2,2): every pair adjacent except the three antipodal ones -> the octahedron, a 2-sphere
    antipodal = {(0, 1), (2, 3), (4, 5)}
    edges = [e for e in itertools.combinations(range(6), 2) if e not in antipodal]
    betti = clique_complex_betti(graph_distance(6, edges), [0.5], max_dim=3)
    np.testing.assert_array_equal(betti[:, 0], [0, 1, 0])
    np.testing.assert_array_equal(clique_counts(graph_distance(6, edges), 0.5, max_size=4), [6, 12, 8, 0])


def test_complete_graph_k4_is_contractible_and_has_the_right_cliques() -> None:
    k4 = graph_distance(4, list(itertools.combinations(range(4), 2)), 0.3)
    np.testing.assert_array_equal(clique_complex_betti(k4, [0.3], max_dim=3)[:, 0], [0, 0, 0])
    np.testing.assert_array_equal(clique_counts(k4, 0.3), [4, 6, 4, 1])
    np.testing.assert_array_equal(clique_counts(k4, 0.29), [4, 0, 0, 0])
    np.testing.assert_array_equal(clique_counts(k4, 0.3, max_size=6), [4, 6, 4, 1, 0, 0])


def test_clique_counts_match_brute_force() -> None:
    rng = np.random.default_rng(2)
    for _ in range(10):
        n = int(rng.integers(3, 11))
        points = rng.random((n, 2))
        distance = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        t = float(rng.uniform(0.2, 0.7))
        adjacent = distance.astype(np.float32) <= np.float32(t)
        expected = [
            sum(all(adjacent[i, j] for i, j in itertools.combinations(c, 2)) for c in itertools.combinations(range(n), s))
            for s in range(1, 6)
        ]
        np.testing.assert_array_equal(clique_counts(distance, t, max_size=5), expected)


def test_betti_numbers_satisfy_the_euler_characteristic() -> None:
    # chi = sum_s (-1)^(s-1) #(s-cliques) = sum_k (-1)^k beta_k, on random flag complexes
    rng = np.random.default_rng(4)
    for _ in range(10):
        n = 9
        points = rng.random((n, 3))
        distance = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        t = float(np.quantile(distance[np.triu_indices(n, 1)], rng.uniform(0.2, 0.8)))
        counts = clique_counts(distance, t, max_size=n)
        chi = sum((-1) ** s * c for s, c in enumerate(counts))
        beta = clique_complex_betti(distance, [t], max_dim=n - 2)[:, 0]
        adjacency = (distance.astype(np.float32) <= np.float32(t)).astype(float)
        beta0 = connected_components(csr_matrix(adjacency), directed=False)[0]
        assert chi == beta0 + sum((-1) ** k * b for k, b in enumerate(beta, start=1))


def test_clique_functions_validate_their_inputs() -> None:
    with pytest.raises(InvalidInput, match="square"):
        clique_complex_betti(np.zeros((2, 3)), [0.5])
    with pytest.raises(InvalidInput, match="symmetric"):
        clique_complex_betti(np.array([[0.0, 0.2], [0.9, 0.0]]), [0.5])
    with pytest.raises(InvalidInput, match=">= 0"):
        clique_counts(np.array([[0.0, -0.2], [-0.2, 0.0]]), 0.5)
    with pytest.raises(InvalidInput, match="max_dim"):
        clique_complex_betti(np.zeros((3, 3)), [0.5], max_dim=0)
    with pytest.raises(InvalidInput, match="single number"):
        clique_counts(np.zeros((3, 3)), [0.1, 0.2])
    with pytest.raises(InvalidInput, match="NaN"):
        clique_counts(np.full((2, 2), np.nan), 0.1)


# --------------------------------------------------------------------------------------------------
# correlation and density


def test_correlation_distance_handles_signs_and_constant_nodes() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(200)
    b = rng.standard_normal(200)
    values = np.stack([a, -3 * a + 1, b, np.full(200, 2.5), a + b], axis=1)
    distance = correlation_distance(values)
    assert distance.shape == (5, 5)
    np.testing.assert_array_equal(distance, distance.T)
    np.testing.assert_array_equal(np.diag(distance), 0.0)
    assert distance[0, 1] == pytest.approx(0.0, abs=1e-12)  # perfectly anti-correlated
    np.testing.assert_array_equal(distance[3, [0, 1, 2, 4]], 1.0)  # constant node: no NaN
    expected = 1 - abs(np.corrcoef(a, a + b)[0, 1])
    assert distance[0, 4] == pytest.approx(expected, rel=1e-10)
    with pytest.raises(InvalidInput, match="n_samples >= 2"):
        correlation_distance(values[:1])


def test_density_thresholds_keep_the_requested_fraction_of_correlated_pairs(digits_pixels) -> None:
    distance = correlation_distance(digits_pixels)
    n = distance.shape[0]
    pairs = distance.astype(np.float32)[np.triu_indices(n, 1)]
    correlated = int((pairs < 1).sum())
    assert correlated < n * (n - 1) // 2  # digits have constant pixels: uncorrelated pairs exist
    for rho, t in zip(DEFAULT_POPULATION_DENSITIES, density_thresholds(distance, DEFAULT_POPULATION_DENSITIES)):
        kept = clique_counts(distance, t, max_size=2)[1]
        assert kept >= np.ceil(rho * correlated - 1e-9)
        assert (pairs < np.float32(t)).sum() < np.ceil(rho * correlated - 1e-9)  # t is the k-th value
    empty = density_thresholds(np.ones((3, 3)) - np.eye(3), [0.5])
    np.testing.assert_array_equal(clique_counts(np.ones((3, 3)) - np.eye(3), empty[0], 2), [3, 0])


# --------------------------------------------------------------------------------------------------
# NodeSelector and population curves on real data


def test_node_selector_splits_the_budget_and_prefers_variable_nodes(digits_activations) -> None:
    selector = NodeSelector(node_budget=10).fit(digits_activations)
    # conv has 4 channels (all taken), dense gets the rest of the round-robin budget
    np.testing.assert_array_equal(selector.node_layer_, [0] * 4 + [1] * 6)
    np.testing.assert_array_equal(selector.node_unit_[:4], np.arange(4))
    pixel_var = digits_activations["dense"].astype(np.float64).var(axis=0)
    np.testing.assert_array_equal(np.sort(selector.node_unit_[4:]), np.sort(np.argsort(-pixel_var)[:6]))
    values = selector.transform(digits_activations)
    assert values.shape == (1797, 10) and values.dtype == np.float64
    spatial_mean = digits_activations["conv"].astype(np.float64).mean(axis=(2, 3))
    np.testing.assert_allclose(values[:, :4], spatial_mean, rtol=1e-12)
    assert selector.node_names()[0] == "conv[0]"
    # an odd budget: equal shares, the first layer gets the extra node
    small = NodeSelector(node_budget=5).fit({"a": digits_activations["dense"], "b": digits_activations["dense"]})
    np.testing.assert_array_equal(np.bincount(small.node_layer_), [3, 2])


def test_node_selector_round_trips_through_its_state(digits_activations) -> None:
    selector = NodeSelector().fit(digits_activations)
    assert selector.n_nodes_ == DEFAULT_NODE_BUDGET
    params, arrays = selector.get_state()
    params = json.loads(json.dumps(params))  # JSON-able
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    restored = NodeSelector.from_state(params, arrays)
    np.testing.assert_array_equal(restored.transform(digits_activations), selector.transform(digits_activations))
    with pytest.raises(BaselineError):
        NodeSelector.from_state(params, {k: v for k, v in arrays.items() if k != "node_unit"})
    broken = dict(arrays, node_unit=arrays["node_unit"] + 1000)
    with pytest.raises(BaselineError, match="do not exist"):
        NodeSelector.from_state(params, broken)


def test_node_selector_reports_misuse(digits_activations) -> None:
    with pytest.raises(NotReady):
        NodeSelector().transform(digits_activations)
    selector = NodeSelector(node_budget=8).fit(digits_activations)
    with pytest.raises(InvalidInput, match="lack layer"):
        selector.transform({"conv": digits_activations["conv"]})
    with pytest.raises(InvalidInput, match="per-sample shape"):
        selector.transform({"conv": digits_activations["conv"][:, :3], "dense": digits_activations["dense"]})
    with pytest.raises(InvalidInput, match="node_budget"):
        NodeSelector(node_budget=1).fit(digits_activations)
    with pytest.raises(InvalidInput, match="same number of samples"):
        NodeSelector().fit({"conv": digits_activations["conv"], "dense": digits_activations["dense"][:10]})
    bad = digits_activations["dense"].copy()
    dense = selector.layers_.index("dense")
    bad[0, selector.node_unit_[selector.node_layer_ == dense][0]] = np.nan  # a unit the selector reads
    with pytest.raises(InvalidInput, match="layer 'dense' contain NaN"):
        selector.transform({"conv": digits_activations["conv"], "dense": bad})


def test_population_curves_of_digits_are_finite(digits_activations) -> None:
    values = NodeSelector().fit_transform(digits_activations)
    curves = population_betti_curves(values)
    assert curves.shape == (3, DEFAULT_POPULATION_DENSITIES.shape[0])
    assert np.all(np.isfinite(curves)) and np.all(curves >= 0)
    assert curves[0].max() > 0, "a 64-node functional graph of real data should have 1D holes"
    counts = population_betti_curves(values, normalize=False)
    np.testing.assert_allclose(curves * values.shape[1], counts)
    np.testing.assert_array_equal(counts, np.round(counts))


def test_population_curves_with_constant_pixels_and_random_correlated_data(digits_pixels) -> None:
    # every pixel, constant ones included (budget above the 61 variable pixels)
    values = NodeSelector(node_budget=64).fit_transform({"pixels": digits_pixels})
    assert np.any(values.std(axis=0) == 0)
    curves = population_betti_curves(values, densities=[0.1, 0.3], max_dim=2)
    assert curves.shape == (2, 2) and np.all(np.isfinite(curves))
    # small random correlated data: a latent factor model
    rng = np.random.default_rng(9)
    latent = rng.standard_normal((300, 5))
    data = latent @ rng.standard_normal((5, 30)) + 0.5 * rng.standard_normal((300, 30))
    curves = population_betti_curves(data)
    assert curves.shape == (3, 10) and np.all(np.isfinite(curves)) and np.all(curves >= 0)


def test_population_curves_of_the_demo_cnn_activations(demo_models, digits_split_arrays) -> None:
    from detector.model import OnnxClassifier

    capture = OnnxClassifier(demo_models / "digits_cnn.onnx").run(digits_split_arrays["x_calib"])
    ranks = {name: a.ndim for name, a in capture.activations.items()}
    assert 4 in ranks.values() and 2 in ranks.values()  # conv channels and dense units
    selector = NodeSelector().fit(capture.activations)
    assert selector.n_nodes_ == DEFAULT_NODE_BUDGET
    assert len(set(selector.node_layer_.tolist())) == len(ranks)  # every layer is represented
    values = selector.transform(capture.activations)
    curves = population_betti_curves(values)
    assert curves.shape == (3, 10) and np.all(np.isfinite(curves)) and curves.max() > 0
    restored = NodeSelector.from_state(*selector.get_state())
    np.testing.assert_array_equal(restored.transform(capture.activations), values)
