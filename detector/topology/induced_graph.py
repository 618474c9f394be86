"""The per-input induced graph of Gebhart et al. (2019).

Vertices are the units of the input and of every layer the structure reader knows; an edge u -> v joins
consecutive layers and weighs

    phi(u, v) = |w_{u->v} * h_u|,

where h_u is the value of the source unit for this input and w_{u->v} the parameter that carries it:

- Dense: the weight matrix entry; Conv: the kernel tap, following the real receptive field (stride,
  padding, dilation, groups); a BatchNorm right after a Dense/Conv is folded into its weights;
- MaxPool: only the arg-max input of each window has an edge (w = 1);
- AveragePool: each input of the window, w = 1/k (k = cells counted by the op); GlobalAveragePool: w = 1/(H W);
- residual Add: identity edges (w = 1) from both summands;
- Flatten / Reshape / element-wise activations: no new layer, the units are the same;
- a gate (:class:`~detector.topology.structure.Gate`: squeeze-and-excitation, SiLU, decomposed GELU) or a
  BatchNorm/LayerNorm that no Dense/Conv precedes: no new layer, the units are those of the main operand,
  and the next layer's edges carry the gated (normalised) values: the input's gate is folded into the
  next weights;
- a Dense over a tensor of tokens (MatMul of (N, T, D) by a (D, F) weight): one copy of the weight per token;
- an op without a unit map (:class:`~detector.topology.structure.Opaque`: attention's token mixing, Transpose,
  Concat, Pad, ...): its output, when a later op reads it, is a *root* layer with no in-edges whose
  values come from the capture, as the graph input's do.

Edge budget ("last stages"): with ``max_edges``, the graph is built over the longest suffix of the ops
(in graph order) with at most that many edges (at least the last op): the last stages of the network, up
to the logits; tensors that the kept ops read but no kept op writes become root layers. Under the budget
(LeNet-5, 282k edges; the digits models) the graph is the full unrolled graph, unchanged.

The edge *structure* (sources, targets, parameters) is computed once per model; per input only a gather
and a multiply remain (plus the arg-max of each max-pool window), with no Python loop over edges.

Oracle (tested): for every Dense/Conv unit v, sum_u w_{u->v} h_u = pre-activation(v) - bias(v), with
ONNX Runtime's pre-activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.capture import Capture
from detector.errors import ModelError
from detector.topology.reference_ops import conv_windows
from detector.topology.structure import (
    Activation,
    AvgPool,
    BatchNorm,
    Conv,
    Dense,
    Gate,
    GlobalAvgPool,
    MaxPool,
    Op,
    Opaque,
    Reshape,
    ResidualAdd,
)

__all__ = ["InducedGraph", "GraphEdges", "LayerPair", "DEFAULT_MAX_EDGES", "op_edge_count"]

#: Default edge budget of the induced graph: LeNet-5 (282k edges) and the digits models stay whole.
DEFAULT_MAX_EDGES = 1_000_000


@dataclass(frozen=True)
class LayerPair:
    """The edges that one op adds between two unit layers.

    ``src`` / ``dst`` are local unit indices (C order inside each tensor); ``param`` the signed parameter w.
    For a max-pool, ``windows`` (n_dst, k) holds each output's candidate inputs (padding: the source tensor's
    size, one past its end) and the edges are chosen per input.
    """

    name: str
    kind: str
    source_tensor: str
    target_tensor: str
    src_layer: int
    dst_layer: int
    src: np.ndarray
    dst: np.ndarray
    param: np.ndarray
    bias: np.ndarray | None = None
    windows: np.ndarray | None = None


@dataclass(frozen=True)
class GraphEdges:
    """One input's induced graph.

    Attributes
    ----------
    n_vertices : int
    edges : ndarray of shape (n_edges, 2), int64
        Global vertex indices (source, target).
    weights : ndarray of shape (n_edges,), float32
        |w h| (or w h with ``signed=True``).
    pair_ptr : ndarray of shape (n_pairs + 1,), int64
        Edges of layer pair p are ``edges[pair_ptr[p]:pair_ptr[p + 1]]``.
    """

    n_vertices: int
    edges: np.ndarray
    weights: np.ndarray
    pair_ptr: np.ndarray


def _index_windows(shape: tuple[int, int, int], kernel: tuple[int, int], strides: tuple[int, int],
                   pads: tuple[int, int, int, int], dilations: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Local input index of each window cell, shape (C, oH, oW, kH, kW); -1 marks padding."""
    idx = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(1, *shape)
    return conv_windows(idx, kernel, strides, pads, dilations, -1.0, out_hw)[0].astype(np.int64)


class InducedGraph:
    """The static part of a classifier's induced graph; :meth:`edges` weighs it for one input.

    Parameters
    ----------
    ops : list of Op
        From :func:`detector.topology.structure.extract_structure`, in graph order.
    shapes : dict of str to tuple of int
        Per-sample shape of every tensor the ops read or write (batch axis excluded).
    input_name : str
        The graph input (layer 0 when the first kept op reads it).
    max_edges : int or None
        Edge budget (see the module docstring); None keeps every op.

    Attributes
    ----------
    roots : list of str
        Tensors whose layer has no in-edges: the graph input and the outputs of opaque or cut-off ops.
    coverage : dict of str to str
        For each op's output tensor: ``induced graph``, ``induced graph (root)``, ``opaque <op>`` (no
        unit map; the topology scorers do not see through it) or ``outside the edge budget``
        (what ``advdetect layers`` prints).
    start_op : int
        Index in ``ops`` of the first op the graph covers (0 when the whole model fits the budget).
    """

    def __init__(self, ops: list[Op], shapes: dict[str, tuple[int, ...]], input_name: str,
                 max_edges: int | None = None):
        self.input_name = input_name
        self.max_edges = max_edges
        self.start_op = _budget_start(ops, shapes, max_edges) if max_edges is not None else 0
        self.layer_sizes: list[int] = []
        self.layer_names: list[str] = []
        self.roots: list[str] = []
        unit_of: dict[str, int] = {}
        last_linear: dict[str, int] = {}  # tensor written by a Dense/Conv -> its pair index (for BN folding)
        self.pairs: list[LayerPair] = []

        def new_layer(name: str) -> int:
            if name not in shapes:
                raise ModelError(f"induced graph: the shape of tensor {name!r} is unknown (ONNX shape inference)")
            self.layer_sizes.append(int(np.prod(shapes[name])))
            self.layer_names.append(name)
            unit_of[name] = len(self.layer_sizes) - 1
            return unit_of[name]

        def layer_of(name: str) -> int:
            if name not in unit_of:  # the graph input, or the output of an opaque or cut-off op
                self.roots.append(name)
                new_layer(name)
            return unit_of[name]

        if self.start_op == 0:
            layer_of(input_name)  # layer 0, as ever: a Flatten of the input keeps its units
        for op in ops[self.start_op:]:
            if isinstance(op, Opaque):
                continue
            if isinstance(op, (Activation, Reshape, Gate)) or (isinstance(op, BatchNorm) and op.input not in last_linear):
                if op.input in unit_of:
                    unit_of[op.output] = unit_of[op.input]
                continue
            inputs = op.inputs if isinstance(op, ResidualAdd) else (op.input,)
            for t in inputs:
                layer_of(t)
            if isinstance(op, BatchNorm):
                p = last_linear.pop(op.input)
                self.pairs[p] = _fold_batchnorm(self.pairs[p], op, shapes[op.input])
                unit_of[op.output] = unit_of[op.input]
                last_linear[op.output] = p
                continue
            src_layer = unit_of[inputs[0]]
            dst_layer = new_layer(op.output)
            if isinstance(op, ResidualAdd):
                for t in op.inputs:
                    n = self.layer_sizes[unit_of[t]]
                    ident = np.arange(n, dtype=np.int64)
                    self.pairs.append(LayerPair(op.node or op.output, "add", t, op.output, unit_of[t], dst_layer, ident, ident,
                                                np.ones(n, np.float32)))
                continue
            pair = _pair(op, shapes[op.input], shapes[op.output], src_layer, dst_layer)
            self.pairs.append(pair)
            if isinstance(op, (Dense, Conv)):
                last_linear[op.output] = len(self.pairs) - 1
        if len(self.pairs) == 0:
            raise ModelError("induced graph: the model has no layer the structure reader can connect")
        self.coverage = {op.output: "opaque " + op.op_type if isinstance(op, Opaque) else "outside the edge budget"
                         for op in ops[:self.start_op] + [op for op in ops[self.start_op:] if isinstance(op, Opaque)]}
        self.coverage.update({name: "induced graph" for name in unit_of})
        self.coverage.update({name: "induced graph (root)" for name in self.roots})
        self.offsets = np.concatenate([[0], np.cumsum(self.layer_sizes)]).astype(np.int64)
        self.n_vertices = int(self.offsets[-1])
        self.required_tensors = list(dict.fromkeys(p.source_tensor for p in self.pairs if p.source_tensor != input_name))
        self.n_static_edges = sum(len(p.src) for p in self.pairs)
        # The edge list is static but for the max-pool sources, which edges() fills in per input.
        self._static_edges = np.concatenate([
            np.stack([p.src + self.offsets[p.src_layer], p.dst + self.offsets[p.dst_layer]], axis=1) for p in self.pairs
        ]).astype(np.int64)
        self._static_ptr = np.concatenate([[0], np.cumsum([len(p.src) for p in self.pairs])]).astype(np.int64)
        self._has_maxpool = any(p.windows is not None for p in self.pairs)

    @classmethod
    def from_classifier(cls, clf: "object", max_edges: int | None = None) -> "InducedGraph":
        """Build from an :class:`~detector.model.OnnxClassifier` (its structure and tensor shapes)."""
        shapes = {layer.name: layer.shape for layer in clf.layers()}  # type: ignore[attr-defined]
        shapes[clf.input_name] = clf.input_shape  # type: ignore[attr-defined]
        return cls(clf.structure(), shapes, clf.input_name, max_edges)  # type: ignore[attr-defined]

    @property
    def pair_names(self) -> list[str]:
        """One name per layer pair: ``source layer -> target layer``."""
        return [f"{self.layer_names[p.src_layer]}->{self.layer_names[p.dst_layer]}" for p in self.pairs]

    def source_values(self, capture: Capture, i: int, tensor: str) -> np.ndarray:
        """Flat values of ``tensor`` (the graph input or a captured activation) for input ``i`` of ``capture``."""
        if tensor == self.input_name:
            return capture.inputs[i].reshape(-1)
        if tensor not in capture.activations:
            raise ModelError(f"induced graph needs tensor {tensor!r}: capture it (InducedGraph.required_tensors)")
        return capture.activations[tensor][i].reshape(-1)

    def edges(self, capture: Capture, i: int, top_q: float = 1.0, signed: bool = False) -> GraphEdges:
        """The weighted induced graph of input ``i`` of ``capture``.

        Parameters
        ----------
        capture : Capture
            Must hold every tensor in :attr:`required_tensors`.
        i : int
            Row of the batch.
        top_q : float in (0, 1]
            Keep, per layer pair, the edges at least as strong as the ceil(q m)-th strongest of its m edges
            (ties at the cut kept, zero weights dropped); 1 keeps all.
        signed : bool
            Return w h instead of |w h| (the oracle uses it).
        """
        if not 0.0 < top_q <= 1.0:
            raise ValueError(f"top_q must be in (0, 1], got {top_q}")
        edges = self._static_edges.copy() if self._has_maxpool else self._static_edges
        weights = np.empty(len(edges), np.float32)
        ptr = self._static_ptr
        for p, pair in enumerate(self.pairs):
            h = self.source_values(capture, i, pair.source_tensor)
            lo, hi = ptr[p], ptr[p + 1]
            if pair.windows is not None:  # max-pool: the arg-max input of each window
                padded = np.append(h, -np.inf)  # padding cells point past the end
                choice = pair.windows[np.arange(len(pair.windows)), np.argmax(padded[pair.windows], axis=1)]
                edges[lo:hi, 0] = choice + self.offsets[pair.src_layer]
                weights[lo:hi] = h[choice]
            else:
                np.multiply(pair.param, h[pair.src], out=weights[lo:hi], casting="unsafe")
        if not signed:
            np.abs(weights, out=weights)
        if top_q < 1.0:
            keep = []
            magnitude = weights if not signed else np.abs(weights)
            for p in range(len(self.pairs)):
                lo, hi = int(ptr[p]), int(ptr[p + 1])
                seg = magnitude[lo:hi]
                k = int(np.ceil(top_q * (hi - lo)))
                # the k-th largest |w h| by partition (several times faster than argpartition), ties kept;
                # zero-weight edges are absent from the graph anyway and never kept
                cut = np.partition(seg, hi - lo - k)[hi - lo - k]
                keep.append(lo + np.flatnonzero(seg >= cut if cut > 0 else seg > 0))
            counts = [len(k) for k in keep]
            sel = np.concatenate(keep)
            return GraphEdges(self.n_vertices, edges[sel], weights[sel], np.concatenate([[0], np.cumsum(counts)]))
        return GraphEdges(self.n_vertices, edges, weights, ptr)


def op_edge_count(op: Op, shapes: dict[str, tuple[int, ...]]) -> int:
    """Edges ``op`` adds to the induced graph (padding taps included, so an upper bound for a Conv)."""
    size = lambda name: int(np.prod(shapes.get(name, (0,))))  # noqa: E731
    if isinstance(op, Dense):
        return size(op.input) * op.weight.shape[0]
    if isinstance(op, Conv):
        return size(op.output) * int(np.prod(op.weight.shape[1:]))
    if isinstance(op, (MaxPool, AvgPool)):
        return size(op.output) * (op.kernel[0] * op.kernel[1] if isinstance(op, AvgPool) else 1)
    if isinstance(op, GlobalAvgPool):
        return size(op.input)
    if isinstance(op, ResidualAdd):
        return 2 * size(op.output)
    return 0


def _budget_start(ops: list[Op], shapes: dict[str, tuple[int, ...]], max_edges: int) -> int:
    """Index of the first op of the longest suffix of ``ops`` with at most ``max_edges`` edges (at least the last op)."""
    total, start = 0, len(ops)
    for k in range(len(ops) - 1, -1, -1):
        total += op_edge_count(ops[k], shapes)
        if total > max_edges and start < len(ops):
            break
        start = k
    return start


def _pair(op: Op, in_shape: tuple[int, ...], out_shape: tuple[int, ...], src_layer: int, dst_layer: int) -> LayerPair:
    name, t = op.node or op.output, op.output  # type: ignore[union-attr]
    if isinstance(op, Dense):
        n_out, n_in = op.weight.shape
        tokens = int(np.prod(in_shape)) // n_in  # 1, or the tokens of a (T, D) input
        src = np.tile(np.arange(n_in, dtype=np.int64), n_out)
        dst = np.repeat(np.arange(n_out, dtype=np.int64), n_in)
        param = op.weight.ravel().copy()
        if tokens > 1:
            src = (np.arange(tokens)[:, None] * n_in + src[None, :]).ravel()
            dst = (np.arange(tokens)[:, None] * n_out + dst[None, :]).ravel()
            param = np.tile(param, tokens)
        return LayerPair(name, "dense", op.input, t, src_layer, dst_layer, src, dst, param,
                         op.bias if tokens == 1 else np.tile(op.bias, tokens))
    if isinstance(op, Conv):
        c_in, h, w = in_shape
        c_out, cg, kh, kw = op.weight.shape
        oh, ow = out_shape[1:]
        win = _index_windows((c_in, h, w), (kh, kw), op.strides, op.pads, op.dilations, (oh, ow))  # (Cin, oH, oW, kH, kW)
        per_group = c_out // op.groups
        groups = np.arange(c_out) // per_group
        chans = groups[:, None] * cg + np.arange(cg)[None, :]  # (Cout, cg) input channels of each output channel
        src = win[chans]  # (Cout, cg, oH, oW, kH, kW)
        param = np.broadcast_to(op.weight[:, :, None, None, :, :], src.shape)
        dst = np.broadcast_to(
            (np.arange(c_out)[:, None, None] * oh * ow + np.arange(oh)[None, :, None] * ow + np.arange(ow)[None, None, :])
            [:, None, :, :, None, None], src.shape)
        valid = src >= 0
        return LayerPair(name, "conv", op.input, t, src_layer, dst_layer, src[valid], dst[valid],
                         param[valid].astype(np.float32), op.bias)
    if isinstance(op, MaxPool):
        c, h, w = in_shape
        oh, ow = out_shape[1:]
        win = _index_windows((c, h, w), op.kernel, op.strides, op.pads, op.dilations, (oh, ow))
        windows = win.reshape(c * oh * ow, -1)
        windows = np.where(windows < 0, c * h * w, windows)  # padding points at the appended -inf
        dst = np.arange(c * oh * ow, dtype=np.int64)
        return LayerPair(name, "maxpool", op.input, t, src_layer, dst_layer, dst, dst, np.ones(len(dst), np.float32),
                         windows=windows)
    if isinstance(op, AvgPool):
        c, h, w = in_shape
        oh, ow = out_shape[1:]
        win = _index_windows((c, h, w), op.kernel, op.strides, op.pads, (1, 1), (oh, ow)).reshape(c * oh * ow, -1)
        if op.count_include_pad:
            # ONNX counts pad cells inside the explicit pads but not cells past them (ceil_mode overhang)
            ones = np.pad(np.ones((1, 1, h, w)), ((0, 0), (0, 0), op.pads[0:3:2], op.pads[1:4:2]), constant_values=1.0)
            k = conv_windows(ones, op.kernel, op.strides, (0, 0, 0, 0), (1, 1), 0.0, (oh, ow))[0].sum(axis=(3, 4))
            k = np.broadcast_to(k, (c, oh, ow)).reshape(-1)
        else:
            k = (win >= 0).sum(axis=1)
        dst = np.broadcast_to(np.arange(c * oh * ow)[:, None], win.shape)
        param = np.broadcast_to((1.0 / k)[:, None], win.shape)
        valid = win >= 0
        return LayerPair(name, "avgpool", op.input, t, src_layer, dst_layer, win[valid], dst[valid],
                         param[valid].astype(np.float32))
    if isinstance(op, GlobalAvgPool):
        c, h, w = in_shape
        src = np.arange(c * h * w, dtype=np.int64)
        return LayerPair(name, "globalavgpool", op.input, t, src_layer, dst_layer, src, src // (h * w),
                         np.full(len(src), 1.0 / (h * w), np.float32))
    raise ModelError(f"induced graph: op {type(op).__name__} is not supported")


def _fold_batchnorm(pair: LayerPair, bn: BatchNorm, shape: tuple[int, ...]) -> LayerPair:
    """Scale a Dense/Conv pair's parameters and bias by a following BatchNorm (per output channel)."""
    per_channel = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    channel = pair.dst // per_channel
    assert pair.bias is not None
    return LayerPair(pair.name, pair.kind, pair.source_tensor, bn.output, pair.src_layer, pair.dst_layer, pair.src, pair.dst,
                     (pair.param * bn.scale[channel]).astype(np.float32), pair.bias * bn.scale + bn.shift)
