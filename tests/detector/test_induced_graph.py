"""Induced graph oracle: incoming signed products sum to ORT's output of every layer (minus bias)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from detector import OnnxClassifier
from detector.topology.induced_graph import InducedGraph


class StridedNet(nn.Module):
    """Stride-2 padded conv + folded BN, dilated grouped conv in a residual block, max/avg/global pools."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.c3 = nn.Conv2d(6, 8, (2, 3), stride=(1, 2), padding=(1, 0))
        self.avg = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = h + torch.relu(self.c2(h))
        h = self.avg(torch.relu(self.c3(self.pool(h))))
        return self.fc(h.mean(dim=(2, 3), keepdim=True).flatten(1))


class TwoPoolNet(nn.Module):
    """Two max-pools of different window sizes, the second one without a ReLU before it (signed inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.c2 = nn.Conv2d(4, 5, 2)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.c1(x)), 3, stride=2, padding=1)
        return self.fc(nn.functional.max_pool2d(self.c2(h), 2).flatten(1))


def _export(model: nn.Module, path, shape) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.rand(2, *shape),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buf.getvalue())


def _capture_for(clf: OnnxClassifier, graph: InducedGraph, x: np.ndarray):
    every = [layer.name for layer in clf.layers() if layer.name != clf.output_name]
    clf.set_capture(every)
    capture = clf.run(x)
    return capture, {clf.input_name: capture.inputs, **capture.activations, clf.output_name: capture.logits}


def _assert_oracle(clf: OnnxClassifier, x: np.ndarray, max_edges: int | None = None) -> InducedGraph:
    graph = InducedGraph.from_classifier(clf, max_edges=max_edges)
    capture, values = _capture_for(clf, graph, x)
    for i in range(len(x)):
        g = graph.edges(capture, i, signed=True)
        for p, pair in enumerate(graph.pairs):
            lo, hi = g.pair_ptr[p], g.pair_ptr[p + 1]
            dst_local = g.edges[lo:hi, 1] - graph.offsets[pair.dst_layer]
            sums = np.bincount(dst_local, weights=g.weights[lo:hi].astype(np.float64),
                               minlength=graph.layer_sizes[pair.dst_layer])
            target = values[pair.target_tensor][i].reshape(-1).astype(np.float64)
            if pair.kind == "add":  # both summands' identity edges together make the sum
                continue
            if pair.bias is not None:
                channel = np.arange(len(target)) // (len(target) // len(pair.bias))
                target = target - pair.bias[channel]
            np.testing.assert_allclose(sums, target, atol=2e-5, rtol=1e-4, err_msg=f"{pair.kind} {pair.name}")
        adds = [p for p, pair in enumerate(graph.pairs) if pair.kind == "add"]
        for a, b in zip(adds[::2], adds[1::2]):
            total = np.zeros(graph.layer_sizes[graph.pairs[a].dst_layer])
            for p in (a, b):
                lo, hi = g.pair_ptr[p], g.pair_ptr[p + 1]
                np.add.at(total, g.edges[lo:hi, 1] - graph.offsets[graph.pairs[p].dst_layer], g.weights[lo:hi])
            np.testing.assert_allclose(total, values[graph.pairs[a].target_tensor][i].reshape(-1), atol=2e-5, rtol=1e-4)
    return graph


def test_oracle_on_strided_padded_dilated_grouped_residual_model(tmp_path):
    torch.manual_seed(0)
    model = StridedNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.3, 0.3)
        model.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "strided.onnx"
    _export(model, path, (1, 11, 11))
    x = np.random.default_rng(1).random((3, 1, 11, 11), dtype=np.float32)
    graph = _assert_oracle(OnnxClassifier(path), x)
    kinds = [p.kind for p in graph.pairs]
    assert kinds.count("conv") == 3 and {"maxpool", "avgpool", "globalavgpool", "add", "dense"} <= set(kinds)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_oracle_on_demo_models(demo_models, digits_split_arrays, name):
    _assert_oracle(OnnxClassifier(demo_models / f"{name}.onnx"), digits_split_arrays["x_test"][:5])


def _graph_and_capture(path, x: np.ndarray, max_edges: int | None = None):
    """A model's induced graph and a capture of ``x`` holding every tensor the graph reads."""
    clf = OnnxClassifier(path)
    graph = InducedGraph.from_classifier(clf, max_edges=max_edges)
    clf.set_capture(clf.default_capture() + graph.required_tensors)
    return graph, clf.run(x)


def test_edge_counts_and_weights(demo_models, digits_split_arrays):
    graph, capture = _graph_and_capture(demo_models / "digits_cnn.onnx", digits_split_arrays["x_test"][:2])
    g = graph.edges(capture, 0)
    # conv1 8x8 pad 1: 16 * sum over outputs of in-bounds taps = 16 * (6*6*9 + 4*6*6 + 4*4) ; pool: one per output
    conv1 = 16 * (36 * 9 + 24 * 6 + 4 * 4)
    assert g.pair_ptr[1] - g.pair_ptr[0] == conv1
    assert g.pair_ptr[2] - g.pair_ptr[1] == 16 * 4 * 4
    assert g.n_vertices == 64 + 1024 + 256 + 512 + 128 + 64 + 10
    assert (g.weights >= 0).all() and g.weights.dtype == np.float32
    # max-pool edges carry the pooled value itself: their weights are the pool output
    lo, hi = g.pair_ptr[1], g.pair_ptr[2]
    pooled = capture.activations[graph.pairs[2].source_tensor][0].reshape(-1)
    np.testing.assert_allclose(np.sort(g.weights[lo:hi]), np.sort(pooled), atol=1e-6)
    # top-q keeps, per pair, every non-zero edge at least as strong as the ceil(q m)-th strongest
    sparse = graph.edges(capture, 0, top_q=0.1)
    for p in range(len(graph.pairs)):
        full = np.sort(g.weights[g.pair_ptr[p]:g.pair_ptr[p + 1]])
        cut = full[len(full) - int(np.ceil(0.1 * len(full)))]
        kept = np.sort(sparse.weights[sparse.pair_ptr[p]:sparse.pair_ptr[p + 1]])
        np.testing.assert_array_equal(kept, full[(full >= cut) & (full > 0)])
        assert len(kept) >= int(np.ceil(0.1 * len(full))) or cut == 0


# --------------------------------------------------------------------------------------------------
# the block-by-block spanning forest (the features' fast path) against the full edge list


def _assert_forest_matches_edges(path, x: np.ndarray, *, reference: str = "kruskal", max_edges: int | None = None) -> None:
    from detector.topology.induced_forest import InducedForest
    from detector.topology.persistence import h0_persistence, h0_persistence_ripser

    graph, capture = _graph_and_capture(path, x, max_edges)
    forest = InducedForest(graph)
    for i in range(len(x)):
        g = graph.edges(capture, i)
        fast = forest.compute(capture, i)
        full = (h0_persistence_ripser if reference == "ripser" else h0_persistence)(g.n_vertices, g.edges, g.weights)
        np.testing.assert_array_equal(fast.diagram.deaths, full.deaths)
        assert fast.diagram.n_components == full.n_components
        # the forest is a forest of real edges of the graph, of those weights, each in its pair
        pair_of_edge = np.searchsorted(g.pair_ptr, np.arange(len(g.weights)), side="right") - 1
        weight_of = {(int(u), int(v), int(p)): w for (u, v), p, w in zip(g.edges, pair_of_edge, g.weights)}
        for (u, v), p, d in zip(fast.diagram.merge_edges, fast.merge_pair, fast.diagram.deaths):
            assert weight_of[(int(u), int(v), int(p))] == np.float32(d)
        np.testing.assert_array_equal(np.sort(fast.weights[fast.weights > 0]), np.sort(g.weights[g.weights > 0]))
        if reference == "kruskal":  # continuous weights: no ties, so the same edges merge
            merge_pair = np.searchsorted(g.pair_ptr, full.merge_index, side="right") - 1
            np.testing.assert_array_equal(np.bincount(fast.merge_pair, minlength=len(graph.pairs)),
                                          np.bincount(merge_pair, minlength=len(graph.pairs)))


def test_forest_matches_the_full_graph_on_every_op_kind(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "strided.onnx"
    _export(StridedNet(), path, (1, 11, 11))
    x = np.random.default_rng(2).random((4, 1, 11, 11), dtype=np.float32)
    x[0, 0, :4] = 0.0  # dead inputs: sources without edges
    _assert_forest_matches_edges(path, x)


def test_forest_matches_the_full_graph_with_max_pools_of_two_sizes(tmp_path):
    torch.manual_seed(4)
    path = tmp_path / "two_pools.onnx"
    _export(TwoPoolNet(), path, (1, 12, 12))
    _assert_forest_matches_edges(path, np.random.default_rng(5).random((4, 1, 12, 12), dtype=np.float32))


def test_forest_matches_ripser_with_massive_ties(tmp_path):
    # Weights on a grid of 1/4 and inputs in {0, 1/2, 1}: many equal products, within and across blocks.
    torch.manual_seed(1)
    model = StridedNet()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.round(parameter * 4) / 4)
    path = tmp_path / "ties.onnx"
    _export(model, path, (1, 11, 11))
    x = (np.random.default_rng(3).integers(0, 3, size=(3, 1, 11, 11)) / 2).astype(np.float32)
    _assert_forest_matches_edges(path, x, reference="ripser")


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_forest_matches_the_full_graph_on_demo_models(demo_models, digits_split_arrays, name):
    _assert_forest_matches_edges(demo_models / f"{name}.onnx", digits_split_arrays["x_test"][:6])


def test_features_fast_path_equals_the_edge_list_path(demo_models, digits_split_arrays):
    from detector.topology.graph_features import InducedGraphFeatures

    graph, capture = _graph_and_capture(demo_models / "digits_cnn.onnx", digits_split_arrays["x_test"][:5])
    fast = InducedGraphFeatures(graph)
    listed = InducedGraphFeatures(graph)
    listed.forest = None  # the top-q path with q = 1: every edge weighed and listed
    a, b = fast.transform(capture), listed.transform(capture)
    np.testing.assert_allclose(a["persistence"], b["persistence"], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(a["betti"], b["betti"])


# --------------------------------------------------------------------------------------------------
# real architectures: gates, depthwise convolutions, attention, and the edge budget


def _zoo(name: str) -> nn.Module:
    from detector.offline.zoo import MobileNetV2, ResNet, ViT

    torch.manual_seed(0)
    return {"resnet18": lambda: ResNet.resnet18(width=4),
            "mobilenetv2_se_hardswish": lambda: MobileNetV2(width=0.25, se=True, act=nn.Hardswish),
            "mobilenetv2_silu": lambda: MobileNetV2(width=0.25, act=nn.SiLU),
            "vit": lambda: ViT(dim=16, depth=2, heads=2)}[name]()


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_se_hardswish", "mobilenetv2_silu", "vit"])
def test_oracle_on_zoo_architectures(tmp_path, name):
    from detector.topology.structure import Gate, Opaque

    path = tmp_path / f"{name}.onnx"
    _export(_zoo(name), path, (3, 32, 32))
    clf = OnnxClassifier(path)
    graph = _assert_oracle(clf, np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32))
    ops = clf.structure()
    gates = [op for op in ops if isinstance(op, Gate)]
    opaque = {op.op_type for op in ops if isinstance(op, Opaque)}
    if name == "resnet18":
        assert not gates and not opaque and graph.roots == [clf.input_name]
    elif name == "vit":
        # attention's q k^T and attn v are the only MatMuls of two data tensors; the head reads the class token
        assert sum(isinstance(op, Opaque) and op.op_type == "MatMul" for op in ops) == 4
        assert {"Transpose", "Concat", "Gather"} <= opaque
        assert [p.kind for p in graph.pairs][-1] == "dense" and graph.pairs[-1].target_tensor == clf.output_name
        tokens = [p for p in graph.pairs if p.kind == "dense" and len(p.src) == 65 * 16 * 64]
        assert len(tokens) == 4  # fc1 and fc2 of each block, one copy of the weight per token
    else:
        producer = {op.output: op for op in ops}
        # every gate's gate operand is a sigmoid (SE: of the squeezed branch; SiLU: of the main operand)
        assert gates and all(producer[g.gate].op_type == "Sigmoid" for g in gates)
        assert all(g.input != g.gate for g in gates)
        assert not opaque and any(p.kind == "conv" and len(p.src) == p.dst.size for p in graph.pairs)


def test_edge_budget_keeps_the_last_stages_up_to_the_logits(tmp_path):
    path = tmp_path / "resnet18.onnx"
    _export(_zoo("resnet18"), path, (3, 32, 32))
    clf = OnnxClassifier(path)
    full = InducedGraph.from_classifier(clf)
    budget = InducedGraph.from_classifier(clf, max_edges=30_000)
    assert full.start_op == 0 and full.n_static_edges > 30_000
    assert 0 < budget.n_static_edges <= 30_000 and budget.start_op > 0
    assert budget.pairs[-1].target_tensor == clf.output_name == full.pairs[-1].target_tensor
    assert clf.input_name not in budget.roots and set(budget.roots) <= set(budget.required_tensors)
    assert budget.coverage[budget.roots[0]] == "induced graph (root)"
    assert "outside the edge budget" in budget.coverage.values()
    x = np.random.default_rng(6).random((3, 3, 32, 32), dtype=np.float32)
    _assert_oracle(clf, x, max_edges=30_000)
    _assert_forest_matches_edges(path, x, max_edges=30_000)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_default_budget_keeps_the_whole_graph_of_small_models(demo_models, digits_split_arrays, name):
    from detector.topology.graph_features import InducedGraphFeatures
    from detector.topology.induced_graph import DEFAULT_MAX_EDGES

    graph, capture = _graph_and_capture(demo_models / f"{name}.onnx", digits_split_arrays["x_test"][:4], DEFAULT_MAX_EDGES)
    unbounded, _ = _graph_and_capture(demo_models / f"{name}.onnx", digits_split_arrays["x_test"][:1])
    assert graph.start_op == 0 and graph.roots == ["input"] and graph.n_static_edges == unbounded.n_static_edges
    a, b = InducedGraphFeatures(graph).transform(capture), InducedGraphFeatures(unbounded).transform(capture)
    for block in ("persistence", "betti"):
        np.testing.assert_array_equal(a[block], b[block])
