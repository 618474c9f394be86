"""The layered structure of an ONNX classifier: what each node does to its units, with its parameters.

The induced graph of Gebhart et al. needs, for every operation between two captured tensors, which input
units feed which output units and with what weight. :func:`extract_structure` walks an ONNX graph in its
(topological) node order and returns one small frozen dataclass per node:

==========================  =========================================================================
ONNX op                     dataclass
==========================  =========================================================================
Gemm, MatMul (+ Add)        :class:`Dense` ``y = x @ weight.T + bias``
Conv                        :class:`Conv` (strides, pads, dilations, groups)
BatchNormalization          :class:`BatchNorm` folded to ``y = x * scale + shift`` per channel
MaxPool                     :class:`MaxPool`
AveragePool                 :class:`AvgPool`
GlobalAveragePool           :class:`GlobalAvgPool` (also ReduceMean over H, W)
Flatten, Reshape, Identity  :class:`Reshape` (units keep their C order)
Relu, Clip (ReLU6), ...     :class:`Activation` (element-wise; also Erf, LayerNormalization, Softmax and
                            Add/Sub/Mul/Div/Pow of a constant: the units are those of the input)
Add of two tensors          :class:`ResidualAdd`
Mul/Sub/Div of two tensors  :class:`Gate` (SiLU x * sigmoid(x), squeeze-and-excitation x * g, GELU's
                            x * Phi(x)): the units are those of the full-size operand
anything else               :class:`Opaque` (Transpose, Concat, Pad, Slice, Gather, MatMul of two data
                            tensors as in attention, ...): no unit map is written
==========================  =========================================================================

Constants may be initializers or ``Constant`` nodes (the torch.export-based exporter emits both).

Treatments where the induced graph cannot be written exactly
------------------------------------------------------------
- *Input-dependent gates* (:class:`Gate`: squeeze-and-excitation, SiLU, decomposed GELU, and
  :class:`Activation` for LayerNorm, whose scale is the token's own standard deviation): the op keeps
  the units of its main operand and the next Dense/Conv reads the gated values, so its edges weigh
  |w * g(x) * h|: the input's gate is folded into the next layer's weights, as an element-wise activation
  is. The gate's own branch (pool -> 1x1 convs -> sigmoid) stays in the graph as a side branch.
- *Token mixing with input-dependent weights* (attention's ``softmax(q k^T) v``) and every other op
  without a unit map (:class:`Opaque`): the op's output starts a new root layer of the induced graph,
  whose values are read from the capture like the graph input's. The topology thus covers the
  analysable part of the network that ends at the logits (and every analysable segment before it);
  ``advdetect layers`` says which ops are opaque.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np
import onnx
from onnx import numpy_helper

from detector.errors import ModelError

__all__ = [
    "Dense",
    "Conv",
    "BatchNorm",
    "MaxPool",
    "AvgPool",
    "GlobalAvgPool",
    "Reshape",
    "Activation",
    "ResidualAdd",
    "Gate",
    "Opaque",
    "Op",
    "ACTIVATION_OPS",
    "extract_structure",
]

#: Element-wise activation ops whose outputs count as "post-activation hidden layers".
ACTIVATION_OPS = frozenset(
    {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu", "HardSigmoid", "HardSwish", "Softplus", "PRelu",
     "Clip", "Mish"}
)
_IDENTITY_OPS = frozenset({"Flatten", "Reshape", "Identity", "Dropout", "Squeeze", "Unsqueeze", "Cast"})
#: Element-wise ops that keep their input's units but are not "activations" (not captured by default).
_ELEMENTWISE_OPS = frozenset({"Softmax", "Erf", "LayerNormalization", "Sqrt", "Neg", "Abs", "Exp", "Log", "Reciprocal"})
#: Binary element-wise ops: of a constant, an :class:`Activation`; of two data tensors, a :class:`Gate`.
_BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})


@dataclass(frozen=True)
class Dense:
    """Fully connected layer ``y = x @ weight.T + bias``.

    ``weight`` has shape (n_out, n_in) and ``bias`` (n_out,), both float32. Gemm's ``alpha``, ``beta`` and
    ``transB`` are folded in; MatMul followed by an Add of a constant becomes one Dense with that bias.
    """

    input: str
    output: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    node: str = ""


@dataclass(frozen=True)
class Conv:
    """2-D convolution (cross-correlation, as in ONNX) over an (N, C, H, W) tensor.

    ``weight`` has shape (C_out, C_in / groups, kH, kW); ``pads`` is (top, left, bottom, right) as in
    ONNX; output unit (o, y, x) reads input (c, y*sH - top + ky*dH, x*sW - left + kx*dW) for c in o's group.
    """

    input: str
    output: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    groups: int = 1
    node: str = ""


@dataclass(frozen=True)
class BatchNorm:
    """Inference-mode batch normalisation folded to ``y = x * scale + shift`` per channel (axis 1).

    ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``, both of shape (C,).
    """

    input: str
    output: str
    scale: np.ndarray = field(repr=False)
    shift: np.ndarray = field(repr=False)
    node: str = ""


@dataclass(frozen=True)
class MaxPool:
    """2-D max pooling; ``pads`` is (top, left, bottom, right), padded cells never win."""

    input: str
    output: str
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    node: str = ""


@dataclass(frozen=True)
class AvgPool:
    """2-D average pooling: each output is the mean of its window (1/k per input with k cells)."""

    input: str
    output: str
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    count_include_pad: bool = False
    ceil_mode: bool = False
    node: str = ""


@dataclass(frozen=True)
class GlobalAvgPool:
    """Mean over all spatial positions of each channel: (N, C, H, W) -> (N, C, 1, 1)."""

    input: str
    output: str
    node: str = ""


@dataclass(frozen=True)
class Reshape:
    """Flatten, Reshape, Identity, Dropout (inference): units are unchanged, in C order."""

    input: str
    output: str
    op_type: str = "Reshape"
    node: str = ""


@dataclass(frozen=True)
class Activation:
    """Element-wise non-linearity (Relu, LeakyRelu with ``alpha``, Sigmoid, Tanh, ...)."""

    input: str
    output: str
    op_type: str
    alpha: float = 0.0
    node: str = ""


@dataclass(frozen=True)
class ResidualAdd:
    """Sum of two tensors of the same shape: each output unit has identity edges from both inputs."""

    inputs: tuple[str, str]
    output: str
    node: str = ""

    @property
    def input(self) -> str:
        """The first summand (the residual branch's main path)."""
        return self.inputs[0]


@dataclass(frozen=True)
class Gate:
    """Element-wise product (or Sub, Div) of two data tensors: ``output = input (op) gate``.

    ``input`` is the operand of the output's shape (its units are the output's); ``gate`` may broadcast
    (a squeeze-and-excitation gate is (N, C, 1, 1)). The induced graph keeps ``input``'s units, so the next
    layer's edges carry the gated values: the input's gate is folded into the next weights.
    """

    input: str
    gate: str
    output: str
    op_type: str = "Mul"
    node: str = ""


@dataclass(frozen=True)
class Opaque:
    """An op whose unit-to-unit map advdetect does not write (Transpose, Concat, Pad, attention's MatMul, ...).

    Its output starts a new root layer of the induced graph (values read from the capture).
    """

    inputs: tuple[str, ...]
    output: str
    op_type: str
    node: str = ""

    @property
    def input(self) -> str:
        """The first data input."""
        return self.inputs[0]


Op = Union[Dense, Conv, BatchNorm, MaxPool, AvgPool, GlobalAvgPool, Reshape, Activation, ResidualAdd, Gate, Opaque]


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pair(values: object, default: int) -> tuple[int, int]:
    if not values:
        return (default, default)
    v = [int(x) for x in values]  # type: ignore[union-attr]
    if len(v) != 2:
        raise ModelError(f"only 2-D convolution and pooling are supported, got a spatial attribute of length {len(v)}")
    return (v[0], v[1])


def _pads(node: onnx.NodeProto, attrs: dict[str, object]) -> tuple[int, int, int, int]:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        raise ModelError(f"node {node.name or node.op_type!r}: auto_pad={auto_pad} is not supported; export with explicit pads")
    pads = attrs.get("pads")
    if not pads:
        return (0, 0, 0, 0)
    p = [int(x) for x in pads]  # type: ignore[union-attr]
    if len(p) != 4:
        raise ModelError(f"node {node.name or node.op_type!r}: expected 4 pads for 2-D, got {p}")
    # ONNX orders pads as (x1_begin, x2_begin, x1_end, x2_end) = (top, left, bottom, right).
    return (p[0], p[1], p[2], p[3])


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            attrs = {a.name: a for a in node.attribute}
            if "value" in attrs:
                consts[node.output[0]] = numpy_helper.to_array(attrs["value"].t)
            elif "value_float" in attrs:
                consts[node.output[0]] = np.array(attrs["value_float"].f, dtype=np.float32)
            elif "value_ints" in attrs:
                consts[node.output[0]] = np.array(list(attrs["value_ints"].ints), dtype=np.int64)
        elif node.op_type == "Identity" and node.input[0] in consts:  # the exporter's copy of a shared weight
            consts[node.output[0]] = consts[node.input[0]]
    return consts


def _reduce_axes(node: onnx.NodeProto, attrs: dict[str, object], consts: dict[str, np.ndarray]) -> set[int]:
    """Axes of a ReduceMean (attribute before opset 18, constant input after), negatives taken as 4-D."""
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1] in consts:
        axes = consts[node.input[1]].tolist()
    return {int(v) % 4 for v in (axes or [])}  # type: ignore[union-attr]


def extract_structure(model: onnx.ModelProto) -> list[Op]:
    """Read the layered structure of ``model``: one :data:`Op` per computing node, in graph order.

    Parameters
    ----------
    model : onnx.ModelProto
        A classifier exported from PyTorch (TorchScript-based or torch.export-based exporter).

    Returns
    -------
    list of Op
        Nodes that only compute constants (``Constant``, shape arithmetic) are left out.

    Raises
    ------
    ModelError
        For a Gemm with a transposed input or a non-constant weight, a Conv of more than 2-D, or a pooling
        with unsupported attributes. Ops without a known unit map are not refused: they become
        :class:`Opaque`.
    """
    consts = _constants(model)
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer = {o: n for n in nodes for o in n.output}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def const(name: str, node: onnx.NodeProto) -> np.ndarray:
        if name not in consts:
            raise ModelError(f"node {node.name or node.op_type!r}: input {name!r} must be a constant (a weight), it is computed")
        return consts[name]

    # Data tensors descend from the graph input; shape arithmetic (Shape -> Gather -> Concat -> Reshape's
    # second input) does not carry units and is skipped.
    data = {i.name for i in model.graph.input if i.name not in consts}
    ops: list[Op] = []
    fused: set[int] = set()
    for node in nodes:
        if id(node) in fused:
            continue
        t, a, name = node.op_type, _attrs(node), node.name
        positions = node.input[:1] if t in ("Reshape", "Shape") else node.input
        data_inputs = [i for i in positions if i in data]
        if not data_inputs or t == "Shape":
            continue
        data.update(o for o in node.output if o)
        x, y = data_inputs[0], node.output[0]
        if t == "Gemm":
            if int(a.get("transA", 0)):
                raise ModelError(f"node {name!r}: Gemm with transA=1 is not a classifier layer advdetect understands")
            b = const(node.input[1], node).astype(np.float32)
            w = b if int(a.get("transB", 0)) else b.T
            w = float(a.get("alpha", 1.0)) * w
            bias = np.zeros(w.shape[0], np.float32)
            if len(node.input) > 2 and node.input[2]:
                bias = float(a.get("beta", 1.0)) * np.broadcast_to(const(node.input[2], node), (w.shape[0],))
            ops.append(Dense(x, y, np.ascontiguousarray(w, np.float32), np.asarray(bias, np.float32), name))
        elif t == "MatMul" and node.input[1] not in consts:  # attention: q k^T, attn v
            ops.append(Opaque(tuple(data_inputs), y, t, name))
        elif t == "MatMul":
            w = np.ascontiguousarray(const(node.input[1], node).T, np.float32)
            bias = np.zeros(w.shape[0], np.float32)
            nxt = consumers.get(y, [])
            if len(nxt) == 1 and nxt[0].op_type == "Add":
                other = [i for i in nxt[0].input if i != y]
                if len(other) == 1 and other[0] in consts:
                    bias = np.broadcast_to(consts[other[0]], (w.shape[0],)).astype(np.float32)
                    y = nxt[0].output[0]
                    data.add(y)
                    fused.add(id(nxt[0]))
            ops.append(Dense(x, y, w, np.asarray(bias, np.float32), name))
        elif t == "Conv":
            w = const(node.input[1], node).astype(np.float32)
            if w.ndim != 4:
                raise ModelError(f"node {name!r}: only 2-D convolutions are supported, weight has shape {w.shape}")
            bias = np.zeros(w.shape[0], np.float32)
            if len(node.input) > 2 and node.input[2]:
                bias = const(node.input[2], node).astype(np.float32)
            ops.append(
                Conv(x, y, w, bias, _pair(a.get("strides"), 1), _pads(node, a), _pair(a.get("dilations"), 1),
                     int(a.get("group", 1)), name)
            )
        elif t == "BatchNormalization":
            gamma, beta, mean, var = (const(node.input[i], node).astype(np.float64) for i in range(1, 5))
            scale = gamma / np.sqrt(var + float(a.get("epsilon", 1e-5)))
            ops.append(BatchNorm(x, y, scale.astype(np.float32), (beta - mean * scale).astype(np.float32), name))
        elif t == "MaxPool":
            if len(node.output) > 1 and node.output[1]:
                raise ModelError(f"node {name!r}: MaxPool with an Indices output is not supported")
            ops.append(
                MaxPool(x, y, _pair(a.get("kernel_shape"), 1), _pair(a.get("strides"), 1), _pads(node, a),
                        _pair(a.get("dilations"), 1), bool(a.get("ceil_mode", 0)), name)
            )
        elif t == "AveragePool":
            ops.append(
                AvgPool(x, y, _pair(a.get("kernel_shape"), 1), _pair(a.get("strides"), 1), _pads(node, a),
                        bool(a.get("count_include_pad", 0)), bool(a.get("ceil_mode", 0)), name)
            )
        elif t == "GlobalAveragePool":
            ops.append(GlobalAvgPool(x, y, name))
        elif t == "ReduceMean" and _reduce_axes(node, a, consts) == {2, 3}:
            ops.append(GlobalAvgPool(x, y, name))  # how the torch.export-based exporter writes AdaptiveAvgPool2d(1)
        elif t in _IDENTITY_OPS:
            ops.append(Reshape(x, y, t, name))
        elif t in ACTIVATION_OPS or t in _ELEMENTWISE_OPS or (t in _BINARY_OPS and len(data_inputs) == 1):
            alpha = float(a.get("alpha", 0.01 if t == "LeakyRelu" else 0.0))  # type: ignore[arg-type]
            ops.append(Activation(x, y, t, alpha, name))
        elif t == "Add" and len(data_inputs) == 2 and data_inputs[0] != data_inputs[1]:
            ops.append(ResidualAdd((data_inputs[0], data_inputs[1]), y, name))
        elif t in _BINARY_OPS and len(data_inputs) == 2:
            ops.append(Gate(*_gate_operands(data_inputs[0], data_inputs[1], producer), y, t, name))
        else:
            ops.append(Opaque(tuple(data_inputs), y, t, name))
    return ops


def _gate_operands(a: str, b: str, producer: dict[str, onnx.NodeProto]) -> tuple[str, str]:
    """(main operand, gate) of a binary op of two data tensors.

    The gate is the operand computed from the other one through a chain of single-input ops or a reduction
    (sigmoid(x), the squeeze-and-excitation branch, erf(x / sqrt 2) + 1); otherwise the first operand is
    the main one.
    """

    def descends(t: str, ancestor: str) -> bool:
        seen, stack = set(), [t]
        while stack:
            cur = stack.pop()
            if cur == ancestor:
                return True
            node = producer.get(cur)
            if node is None or cur in seen:
                continue
            seen.add(cur)
            stack.extend(node.input)
        return False

    return (b, a) if descends(a, b) and not descends(b, a) else (a, b)
