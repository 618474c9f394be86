"""NumPy re-implementation of every :mod:`detector.topology.structure` op.

It is the oracle that proves the structure reader understood each layer (the tests compare it with ONNX
Runtime's output of the same layer), and it documents, in executable form, which input unit feeds which
output unit: the induced graph uses exactly these index maps.
"""

from __future__ import annotations

import numpy as np

from detector.topology.structure import (
    Activation,
    AvgPool,
    BatchNorm,
    Conv,
    Dense,
    GlobalAvgPool,
    MaxPool,
    Op,
    Reshape,
    ResidualAdd,
)

__all__ = ["apply_op", "pool_output_size", "conv_windows"]


def pool_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """Output length of a convolution or pooling along one axis (ONNX formula)."""
    span = size + pad_begin + pad_end - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + pad_begin:  # the last window must start inside the input or left pad
            out -= 1
        return out
    return span // stride + 1


def conv_windows(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
                 dilations: tuple[int, int], fill: float, out_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Sliding windows of an (N, C, H, W) array: shape (N, C, oH, oW, kH, kW), padding filled with ``fill``."""
    n, c, h, w = x.shape
    top, left, bottom, right = pads
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    oh, ow = out_hw or (pool_output_size(h, kh, sh, top, bottom, dh), pool_output_size(w, kw, sw, left, right, dw))
    # Pad enough on the far side for ceil_mode windows that run past the explicit pad.
    extra_h = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (h + top + bottom))
    extra_w = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (w + left + right))
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom + extra_h), (left, right + extra_w)), constant_values=fill)
    iy = (np.arange(oh) * sh)[:, None] + (np.arange(kh) * dh)[None, :]  # (oH, kH)
    ix = (np.arange(ow) * sw)[:, None] + (np.arange(kw) * dw)[None, :]  # (oW, kW)
    return xp[:, :, iy[:, None, :, None], ix[None, :, None, :]]  # (N, C, oH, oW, kH, kW)


def _activation(op: Activation, x: np.ndarray) -> np.ndarray:
    t = op.op_type
    if t == "Relu":
        return np.maximum(x, 0)
    if t == "LeakyRelu":
        return np.where(x >= 0, x, op.alpha * x)
    if t == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if t == "Tanh":
        return np.tanh(x)
    if t == "Elu":
        alpha = op.alpha or 1.0
        return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))
    if t == "Softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise NotImplementedError(f"no NumPy reference for activation {t}")


def apply_op(op: Op, x: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """Compute ``op`` on input ``x`` (and ``other`` for a residual Add) in float64.

    ``x`` has the shape ONNX Runtime gives the op's input; the result has the op's output shape, except for
    :class:`Reshape`, which returns ``x`` flattened to (N, -1) (units keep their C order).
    """
    x = np.asarray(x, dtype=np.float64)
    if isinstance(op, Dense):
        return x.reshape(len(x), -1) @ op.weight.T.astype(np.float64) + op.bias
    if isinstance(op, Conv):
        n, c = x.shape[:2]
        co, cg, kh, kw = op.weight.shape
        win = conv_windows(x, (kh, kw), op.strides, op.pads, op.dilations, 0.0)  # (N, C, oH, oW, kH, kW)
        g = op.groups
        win = win.reshape(n, g, c // g, *win.shape[2:])
        wt = op.weight.astype(np.float64).reshape(g, co // g, cg, kh, kw)
        out = np.einsum("ngcyxij,gocij->ngoyx", win, wt).reshape(n, co, *win.shape[3:5])
        return out + op.bias[None, :, None, None]
    if isinstance(op, BatchNorm):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * op.scale.reshape(shape) + op.shift.reshape(shape)
    if isinstance(op, MaxPool):
        h, w = x.shape[2:]
        oh = pool_output_size(h, op.kernel[0], op.strides[0], op.pads[0], op.pads[2], op.dilations[0], op.ceil_mode)
        ow = pool_output_size(w, op.kernel[1], op.strides[1], op.pads[1], op.pads[3], op.dilations[1], op.ceil_mode)
        return conv_windows(x, op.kernel, op.strides, op.pads, op.dilations, -np.inf, (oh, ow)).max(axis=(4, 5))
    if isinstance(op, AvgPool):
        h, w = x.shape[2:]
        oh = pool_output_size(h, op.kernel[0], op.strides[0], op.pads[0], op.pads[2], 1, op.ceil_mode)
        ow = pool_output_size(w, op.kernel[1], op.strides[1], op.pads[1], op.pads[3], 1, op.ceil_mode)
        win = conv_windows(x, op.kernel, op.strides, op.pads, (1, 1), 0.0, (oh, ow))
        inside = conv_windows(np.ones((1, 1, h, w)), op.kernel, op.strides, op.pads, (1, 1), 0.0, (oh, ow))
        if op.count_include_pad:
            padded = np.pad(np.ones((1, 1, h, w)), ((0, 0), (0, 0), op.pads[0:3:2], op.pads[1:4:2]), constant_values=1.0)
            inside = conv_windows(padded, op.kernel, op.strides, (0, 0, 0, 0), (1, 1), 0.0, (oh, ow))
        return win.sum(axis=(4, 5)) / inside.sum(axis=(4, 5))
    if isinstance(op, GlobalAvgPool):
        return x.mean(axis=(2, 3), keepdims=True)
    if isinstance(op, Reshape):
        return x.reshape(len(x), -1)
    if isinstance(op, Activation):
        return _activation(op, x)
    if isinstance(op, ResidualAdd):
        if other is None:
            raise ValueError("a residual Add needs both summands")
        return x + np.asarray(other, dtype=np.float64)
    raise TypeError(f"unknown op {type(op).__name__}")
