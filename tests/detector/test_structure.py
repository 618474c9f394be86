"""The structure reader: a NumPy re-implementation from the extracted parameters reproduces ORT, layer by layer."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from detector import OnnxClassifier
from detector.topology.reference_ops import apply_op
from detector.topology.structure import AvgPool, BatchNorm, Conv, Dense, GlobalAvgPool, MaxPool, Opaque, ResidualAdd, extract_structure


class Residual(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ZooNet(nn.Module):
    """Every op the structure reader knows: strided/padded/dilated/grouped conv, BN, pools, residual, MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(8),           # 12x12 -> 6x6; BN after
            # the ReLU so that no exporter can fold it into the conv
            Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), nn.LeakyReLU(0.1))),
            nn.MaxPool2d(3, stride=2, padding=1),                                             # 6x6 -> 3x3
            nn.Conv2d(8, 12, (2, 3), stride=(1, 2), padding=(1, 0)), nn.Tanh(),               # 3x3 -> 4x1
            nn.AvgPool2d((2, 1), stride=1),                                                   # 4x1 -> 3x1
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, 16, bias=False)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gap(self.features(x)).flatten(1)
        h = torch.sigmoid(h @ self.head.weight.T)  # a bare MatMul, no Gemm
        return self.out(h)


def _export(model: nn.Module, path: Path, dynamo: bool) -> None:
    model.eval()
    buf = io.BytesIO()
    example = torch.rand(2, 1, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (example,), buf, dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        else:
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def zoo_model():
    torch.manual_seed(1)
    model = ZooNet()
    bn = model.features[2]
    with torch.no_grad():  # non-trivial running statistics so that folding BN matters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _check_every_op(clf: OnnxClassifier, x: np.ndarray) -> set[type]:
    names = [layer.name for layer in clf.layers()]
    clf.set_capture([n for n in names if n != clf.output_name])
    capture = clf.run(x)
    values = {clf.input_name: capture.inputs, **capture.activations, clf.output_name: capture.logits}
    seen = set()
    for op in clf.structure():
        if isinstance(op, ResidualAdd):
            got = apply_op(op, values[op.inputs[0]], values[op.inputs[1]])
        else:
            got = apply_op(op, values[op.input])
        expected = values[op.output]
        np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=2e-5, rtol=1e-4,
                                   err_msg=f"{type(op).__name__} {op.output}")
        seen.add(type(op))
    return seen


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "torch.export-exporter"])
def test_numpy_reference_reproduces_ort_for_every_layer(tmp_path, zoo_model, dynamo):
    path = tmp_path / "zoo.onnx"
    _export(zoo_model, path, dynamo)
    x = np.random.default_rng(0).random((4, 1, 12, 12), dtype=np.float32)
    seen = _check_every_op(OnnxClassifier(path), x)
    must = {Conv, BatchNorm, MaxPool, AvgPool, GlobalAvgPool, Dense, ResidualAdd}
    assert must <= seen, f"not exercised: {must - seen}"


def test_strided_padded_conv_parameters_are_read(tmp_path, zoo_model):
    path = tmp_path / "zoo.onnx"
    _export(zoo_model, path, dynamo=False)
    convs = [op for op in extract_structure(onnx.load(str(path))) if isinstance(op, Conv)]
    assert [(c.strides, c.pads, c.dilations, c.groups) for c in convs] == [
        ((2, 2), (1, 1, 1, 1), (1, 1), 1),
        ((1, 1), (2, 2, 2, 2), (2, 2), 2),
        ((1, 2), (1, 0, 1, 0), (1, 1), 1),
    ]


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_numpy_reference_reproduces_ort_on_demo_models(demo_models, digits_split_arrays, name):
    seen = _check_every_op(OnnxClassifier(demo_models / f"{name}.onnx"), digits_split_arrays["x_test"][:64])
    assert Dense in seen


def test_an_op_without_a_unit_map_is_opaque_not_refused():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Cos", ["x"], ["y"], name="cosine")], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert extract_structure(model) == [Opaque(("x",), "y", "Cos", "cosine")]
