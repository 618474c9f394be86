"""Wrap an ONNX classifier so that one ONNX Runtime run returns logits and hidden activations.

At load time the graph is rewritten: every tensor to capture becomes an extra graph output, and every
channel-mean key ``mean(<tensor>)`` (:func:`detector.capture.channel_means`) a ReduceMean node whose output is
one, so that ONNX Runtime hands out C numbers instead of a C x H x W map. Serving then calls ``session.run``
once per batch and gets the logits and all captured activations together, never a second model run.

Default capture (:meth:`OnnxClassifier.default_capture`): what the peers, the introspection VAE and the
population monitor read.

- **Which layers.** A network with residual blocks (ResNet, MobileNetV2, ViT): the output of every block
  (the residual Add, or the activation applied to it alone, as ResNet's ReLU), plus the first and the last
  post-activation layer (the stem and the penultimate features), as Lee et al. (2018)'s feature ensemble
  and JTLA (Raghuram et al. 2021) read block outputs. When those layers give more than
  :data:`MAX_DEFAULT_FEATURES` features per input (a conv map gives one per channel), only the last block
  of each stage is kept (a block whose output shape differs from the next block's): Lee et al.'s choice
  for ResNet, and what keeps ResNet-50's features at 3,904 instead of 15,168 (calibration memory per
  input and the peers' cost per request grow with them). A network without residual blocks (LeNet-5,
  the digits models): every post-activation hidden layer.
- **In which form.** In a network with residual blocks every default layer with a channel axis is read as
  its channel means, computed in the graph (``mean(<tensor>)``). In one without, a layer of more than
  :data:`WIDE_LAYER_UNITS` units with a channel axis is read so; a smaller one is handed out whole, and the
  scorers average its channels themselves (in float64), as before: LeNet-5 (at most 3,456 units per layer)
  and the digits models are thus captured exactly as they were. (MobileNetV2's block outputs of 2,560 to
  4,096 units, kept whole, made calibration's peak RSS grow from 1.02 GB at 1,000 inputs to 1.58 GB at 5,000.)

The topology scorers add the whole tensors of their edge-budget window (:attr:`InducedGraph.required_tensors
<detector.topology.induced_graph.InducedGraph.required_tensors>`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from detector.capture import Capture, channel_means, mean_source
from detector.errors import InvalidInput, ModelError
from detector.topology.structure import ACTIVATION_OPS, Op, ResidualAdd, extract_structure

__all__ = ["LayerInfo", "MAX_DEFAULT_FEATURES", "OnnxClassifier", "WIDE_LAYER_UNITS", "file_sha256", "load_onnx", "session_options"]

#: A default layer of a network without residual blocks with more units than this (and a channel axis) is
#: captured as its channel means (every default layer of a network with residual blocks is).
WIDE_LAYER_UNITS = 4096
#: Most features (channels of conv maps, units of dense layers) the default layers give per input before
#: only the last block of each stage is kept.
MAX_DEFAULT_FEATURES = 4096
#: Working memory one ONNX Runtime run of :meth:`OnnxClassifier.batch_size` may take (bytes).
BATCH_BYTES = 256 * 2**20

_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (identifies the model a baseline was calibrated for)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LayerInfo:
    """One capturable tensor: the output of a node.

    Attributes
    ----------
    name : str
        ONNX tensor name (what ``--layers`` takes).
    op_type : str
        The op that produces it (``Relu``, ``Conv``, ...).
    shape : tuple of int
        Shape of one input's tensor, batch axis excluded.
    post_activation : bool
        Whether it is the output of an element-wise activation (captured by default).
    """

    name: str
    op_type: str
    shape: tuple[int, ...]
    post_activation: bool

    @property
    def size(self) -> int:
        """Number of units (vertices in the induced graph)."""
        return int(np.prod(self.shape)) if self.shape else 1


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """ONNX Runtime session options: ``intra_op_threads`` threads per run (0 = one per core), no inter-op pool.

    The server passes 1: its worker threads already run requests in parallel, and an intra-op pool
    would spin on every core after each small run, starving the other workers.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class OnnxClassifier:
    """An ONNX classifier whose hidden activations are captured in the same inference pass.

    Parameters
    ----------
    path : str or PathLike
        The ``.onnx`` file. It must have one float input of shape (batch, ...) and a first output of shape
        (batch, n_classes) with n_classes >= 2 (the logits).
    capture : sequence of str, optional
        Capture keys: tensor names, or ``mean(<tensor>)`` for a tensor's channel means. Default:
        :meth:`default_capture` (module docstring). :meth:`layers` lists the tensors.
    intra_op_threads : int, optional
        ONNX Runtime intra-op thread count (0 lets ONNX Runtime choose).

    Raises
    ------
    ModelError
        The file is missing, not ONNX, or not classifier-shaped.
    InvalidInput
        A key in ``capture`` names no tensor of the model (or the channel means of a tensor without channels).
    """

    def __init__(self, path: str | os.PathLike[str], capture: Sequence[str] | None = None, intra_op_threads: int = 0):
        self.path = Path(path)
        self.model_ = load_onnx(self.path)
        self.sha256 = file_sha256(self.path)
        graph = self.model_.graph
        inits = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: expected a classifier with exactly one input tensor, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_dtype = np.dtype(_tensor_dtype(inputs[0], self.path))
        self.input_shape = _static_shape(inputs[0])  # per-sample shape, batch excluded
        self.output_name = graph.output[0].name
        self._shapes = _infer_shapes(self.model_)
        logits_shape = self._shapes.get(self.output_name)
        if logits_shape is None or len(logits_shape) != 1 or (logits_shape[0] is not None and logits_shape[0] < 2):
            raise ModelError(
                f"{self.path}: the first output {self.output_name!r} must have shape (batch, n_classes) with n_classes >= 2, "
                f"got {('batch',) + tuple(logits_shape) if logits_shape is not None else 'an unknown shape'}"
            )
        self.n_classes = logits_shape[0]
        self._layers = self._list_layers()
        self._shape_of = {layer.name: layer.shape for layer in self._layers}
        self._block_outputs: list[str] | None = None
        self.capture = list(capture) if capture is not None else self.default_capture()
        self.set_capture(self.capture, intra_op_threads=intra_op_threads)

    # -- description -----------------------------------------------------------------------------
    def _list_layers(self) -> list[LayerInfo]:
        layers = []
        for node in self.model_.graph.node:
            if node.op_type in ("Constant", "Shape"):
                continue
            for out in node.output:
                shape = self._shapes.get(out)
                if not out or shape is None or any(d is None for d in shape):
                    continue
                layers.append(LayerInfo(out, node.op_type, tuple(int(d) for d in shape), node.op_type in ACTIVATION_OPS))
        return layers

    def layers(self) -> list[LayerInfo]:
        """Every capturable tensor (node output with a known per-sample shape), in graph order."""
        return list(self._layers)

    def default_capture(self) -> list[str]:
        """Capture keys of the layers the peers, the introspection VAE and the population monitor read.

        Block outputs (plus the first and last post-activation layers) of a network with residual blocks,
        only the last block of each stage when they give more than :data:`MAX_DEFAULT_FEATURES` features,
        every post-activation hidden layer of a network without residual blocks; wide layers as their
        channel means. See the module docstring for the rule.
        """
        layers = {layer.name: layer for layer in self._layers}
        post = [layer.name for layer in self._layers if layer.post_activation and layer.name != self.output_name]
        blocks = self.block_outputs()
        features = lambda names: sum(_features(layers[n].shape) for n in set(names))  # noqa: E731
        if blocks and features(blocks + post[:1] + post[-1:]) > MAX_DEFAULT_FEATURES:
            blocks = [b for b, after in zip(blocks, blocks[1:] + [None])
                      if after is None or layers[b].shape != layers[after].shape]
        names = set(blocks + post[:1] + post[-1:]) if blocks else set(post)
        wide = 0 if blocks else WIDE_LAYER_UNITS  # block outputs: channel means whatever their size
        return [channel_means(layer.name) if len(layer.shape) >= 2 and layer.size > wide else layer.name
                for layer in self._layers if layer.name in names]

    def block_outputs(self) -> list[str]:
        """Output of every residual block, in graph order: each residual Add, or the element-wise activation
        that alone reads it (ResNet's ReLU after the Add)."""
        if self._block_outputs is None:
            readers: dict[str, list[onnx.NodeProto]] = {}
            for node in self.model_.graph.node:
                for name in node.input:
                    readers.setdefault(name, []).append(node)
            known = {layer.name for layer in self._layers}
            self._block_outputs = []
            for op in extract_structure(self.model_):
                if isinstance(op, ResidualAdd):
                    after = readers.get(op.output, [])
                    name = after[0].output[0] if len(after) == 1 and after[0].op_type in ACTIVATION_OPS else op.output
                    if name in known and name != self.output_name:
                        self._block_outputs.append(name)
        return list(self._block_outputs)

    def structure(self) -> list[Op]:
        """The layered structure (weights, strides, pads, ...) of the graph; see :mod:`detector.topology.structure`."""
        return extract_structure(self.model_)

    # -- capture -----------------------------------------------------------------------------------
    def capture_shape(self, key: str) -> tuple[int, ...]:
        """Per-sample shape of what capture key ``key`` returns ((C,) for ``mean(<tensor>)``).

        Raises
        ------
        InvalidInput
            ``key`` names no tensor, or the channel means of a tensor without a channel axis.
        """
        self._check_keys([key])
        shapes = self._shape_of
        return shapes[key] if key in shapes else shapes[mean_source(key)][:1]

    def _check_keys(self, keys: Sequence[str]) -> None:
        shapes = self._shape_of
        unknown = [k for k in keys if k not in shapes and mean_source(k) not in shapes]
        if unknown:
            raise InvalidInput(
                f"unknown layer name(s) {unknown}; capturable layers are: {', '.join(sorted(shapes)) or 'none'} "
                "(see `advdetect layers --model ...`), or mean(<layer>) for a layer's channel means"
            )
        flat = [k for k in keys if k not in shapes and len(shapes[mean_source(k)]) < 2]
        if flat:
            raise InvalidInput(f"{flat}: channel means of layer(s) without a channel axis (per-sample shapes "
                               f"{[shapes[mean_source(k)] for k in flat]})")

    def set_capture(self, names: Sequence[str], intra_op_threads: int = 0) -> None:
        """Make the capture keys ``names`` extra outputs of the graph (:meth:`capture_model`) and build the session."""
        self._check_keys(names)
        order = {layer.name: i for i, layer in enumerate(self._layers)}
        tensor = lambda key: key if key in order else mean_source(key)  # noqa: E731
        self.capture = sorted(dict.fromkeys(names), key=lambda key: (order[tensor(key)], key != tensor(key)))
        self._session = ort.InferenceSession(self.capture_model().SerializeToString(), session_options(intra_op_threads),
                                             providers=["CPUExecutionProvider"])

    def capture_model(self) -> onnx.ModelProto:
        """The graph ONNX Runtime runs: the model with every capture key as an extra output.

        A key ``mean(<tensor>)`` adds a ReduceMean over the tensor's axes after the channel axis, whose output,
        of shape (batch, C), is the graph output. Built on demand (a copy of the model's weights).
        """
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(self.model_)
        graph = rewritten.graph
        present = {o.name for o in graph.output}
        opset = next((o.version for o in rewritten.opset_import if o.domain in ("", "ai.onnx")), 13)
        shapes = self._shape_of
        for name in self.capture:
            source = mean_source(name) if name not in shapes else None
            if source is not None:
                axes = list(range(2, len(shapes[source]) + 1))
                if opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on
                    graph.initializer.append(numpy_helper.from_array(np.asarray(axes, np.int64), f"{name}/axes"))
                    graph.node.append(helper.make_node("ReduceMean", [source, f"{name}/axes"], [name], keepdims=0))
                else:
                    graph.node.append(helper.make_node("ReduceMean", [source], [name], axes=axes, keepdims=0))
            if name not in present:
                graph.output.append(onnx.ValueInfoProto(name=name))
        return rewritten

    def batch_size(self, copies: int = 1, budget_bytes: int = BATCH_BYTES, limit: int = 256) -> int:
        """Inputs per ONNX Runtime run so that a run of ``copies`` x that many rows stays within ``budget_bytes``.

        Counts 4 bytes per unit of every tensor of the graph (an upper bound: ONNX Runtime reuses buffers),
        between 1 and ``limit``: 256 for LeNet-5, 1 for ResNet-50 at 224x224 with feature squeezing's copies.
        """
        per_input = 4 * sum(layer.size for layer in self._layers) * max(int(copies), 1)
        return int(min(max(budget_bytes // max(per_input, 1), 1), limit))

    def validate(self, x: np.ndarray) -> np.ndarray:
        """Check a batch and return it as a C-contiguous array of the model's input dtype.

        Raises
        ------
        InvalidInput
            Not an array of real numbers, empty batch, wrong per-sample shape, NaN or Inf values.
        """
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise InvalidInput(f"input must be an array of real numbers ({self.input_dtype}), got dtype {x.dtype}")
        expected = ("batch",) + tuple("?" if d is None else d for d in self.input_shape)
        if x.ndim != len(self.input_shape) + 1 or any(
            d is not None and d != s for d, s in zip(self.input_shape, x.shape[1:])
        ):
            raise InvalidInput(f"input must have shape {expected}, got {x.shape}")
        if x.shape[0] == 0:
            raise InvalidInput(f"empty batch: input must have shape {expected} with batch >= 1")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = int(np.count_nonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1)))
            raise InvalidInput(f"input contains NaN or Inf values ({bad} of {len(x)} inputs)")
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def run(self, x: np.ndarray) -> Capture:
        """One ONNX Runtime run: logits and every captured activation for the batch ``x``.

        Parameters
        ----------
        x : ndarray of shape (n_samples, ...) matching the model's input

        Returns
        -------
        Capture
        """
        x = self.validate(x)
        outputs = self._session.run([self.output_name, *self.capture], {self.input_name: x})
        return Capture(inputs=x, logits=outputs[0], activations=dict(zip(self.capture, outputs[1:])))

    def run_batches(self, x: np.ndarray, batch_size: int | None = None) -> Capture:
        """:meth:`run` over ``x`` in batches of ``batch_size`` (default :meth:`batch_size`), concatenated."""
        x = self.validate(x)
        batch_size = batch_size or self.batch_size()
        return Capture.concatenate([self.run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _features(shape: tuple[int, ...]) -> int:
    """Features the scorers read of a layer of per-sample ``shape``: its channels (conv map), else its units."""
    return int(shape[0]) if len(shape) >= 2 else int(np.prod(shape))


def load_onnx(path: Path) -> onnx.ModelProto:
    """The checked ONNX model at ``path``; :class:`ModelError` (one line) when it is missing or not ONNX."""
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ... for a file that is not ONNX
        raise ModelError(f"{path} is not a valid ONNX model: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not model.graph.node or not model.graph.output:
        raise ModelError(f"{path} is not a valid ONNX model: the graph has no nodes or no outputs")
    return model


def _tensor_dtype(value: onnx.ValueInfoProto, path: Path) -> type:
    elem = value.type.tensor_type.elem_type
    if elem not in _FLOAT_TYPES:
        raise ModelError(f"{path}: the input {value.name!r} must be a float tensor, got {onnx.TensorProto.DataType.Name(elem)}")
    return _FLOAT_TYPES[elem]


def _dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _static_shape(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    dims = _dims(value)
    if not dims:
        raise ModelError(f"the input {value.name!r} has no declared shape; export with a shape (batch, ...)")
    return tuple(dims[1:])


def _infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Per-sample shapes (batch axis dropped) of every tensor ONNX shape inference can tell."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    shapes = {}
    for value in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims(value)
        if dims:
            shapes[value.name] = tuple(dims[1:])
    return shapes
