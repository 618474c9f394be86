"""ONNX graphs as torch modules (onnx2torch), for the offline attacks that need gradients.

:func:`onnx_to_torch` converts an ONNX model with extra graph outputs (captured hidden tensors) to a
``torch.fx.GraphModule`` that returns the original outputs followed by those tensors, in that order.

onnx2torch imports torchvision for two converters (NonMaxSuppression, RoIAlign) that classifiers never
use. No torchvision build matches the pinned CPU torch (``torch==2.13.0``): the one pip installs raises
at import. When torchvision cannot be imported, a stand-in module whose ``ops`` functions raise takes its
place while onnx2torch imports, so onnx2torch converts every other op; a graph that does use those two ops
gets a clear error when run.

onnx2torch 1.5.15 converts ops up to opset 17 (ReduceMean took its axes as an input from opset 18 on, as
torch's exporter writes it): a newer graph is first converted to opset 17 with onnx's version converter.
"""

from __future__ import annotations

import sys
import types
from typing import Sequence

import onnx
import torch

__all__ = ["onnx_to_torch"]

#: Newest opset whose ops onnx2torch 1.5.15 converts (ReduceMean-18 is missing).
ONNX2TORCH_OPSET = 17


def _torchvision_unavailable(*_: object, **__: object) -> None:
    raise NotImplementedError("torchvision cannot be imported with the pinned torch: NonMaxSuppression and "
                              "RoIAlign graphs cannot run in torch here")


def _import_onnx2torch() -> types.ModuleType:
    """onnx2torch, with a stand-in for torchvision while it imports, when the installed one cannot be imported.

    The stand-in leaves ``sys.modules`` once onnx2torch is imported (its converters keep their references),
    so that nothing else (torch's ONNX exporter looks torchvision up) mistakes it for the real package.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # RuntimeError ("operator torchvision::nms does not exist") or ImportError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    else:
        import onnx2torch

        return onnx2torch
    stand_in, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.box_convert = ops.roi_align = _torchvision_unavailable  # type: ignore[attr-defined]
    stand_in.ops = ops  # type: ignore[attr-defined]
    sys.modules.update({"torchvision": stand_in, "torchvision.ops": ops})
    try:
        import onnx2torch
    finally:
        for name in ("torchvision", "torchvision.ops"):
            sys.modules.pop(name, None)
    return onnx2torch


def onnx_to_torch(model: onnx.ModelProto | bytes, extra_outputs: Sequence[str] = ()) -> torch.fx.GraphModule:
    """Convert ``model`` (a ModelProto or its bytes) to torch, exposing ``extra_outputs`` as further outputs.

    Parameters
    ----------
    model : onnx.ModelProto or bytes
    extra_outputs : sequence of str
        Names of intermediate tensors to return after the graph's own outputs (as
        :meth:`detector.model.OnnxClassifier.set_capture` does for ONNX Runtime).

    Returns
    -------
    torch.fx.GraphModule
        In evaluation mode, float32, parameters frozen (``requires_grad=False``); called on the graph's
        inputs it returns a tuple of the outputs (or one tensor when there is one output).
    """
    proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else model
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(proto)
    present = {o.name for o in rewritten.graph.output}
    for name in extra_outputs:
        if name not in present:
            rewritten.graph.output.append(onnx.ValueInfoProto(name=name))
    opset = next((o.version for o in rewritten.opset_import if o.domain in ("", "ai.onnx")), ONNX2TORCH_OPSET)
    if opset > ONNX2TORCH_OPSET:
        from onnx import version_converter

        rewritten = version_converter.convert_version(rewritten, ONNX2TORCH_OPSET)
    module = _import_onnx2torch().convert(rewritten).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module
