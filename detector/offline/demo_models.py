"""Small classifiers trained deterministically, exported to ONNX (for serving) and TorchScript (for attacks).

- ``digits_mlp``: 64-64-32-10 ReLU MLP on the 8x8 sklearn digits;
- ``digits_cnn``: two conv-relu-pool blocks and two dense layers on the digits;
- ``lenet5``: LeNet-5 (5x5 convolutions without padding, 28 -> 24 -> 12 -> 8 -> 4, dense 256-120-84-10) for 28x28
  IDX data such as MNIST. Its full induced graph has about 282k edges.

Training is seeded (``torch.manual_seed``, deterministic algorithms, a seeded data order), so the same seed
on the same machine gives the same weights.
"""

from __future__ import annotations

import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from detector.data import Dataset, digits_split, mnist_split

__all__ = ["DigitsMLP", "DigitsCNN", "LeNet5", "train_classifier", "accuracy", "export_onnx", "export_torchscript",
           "build_demo_models", "build_lenet5", "train_lenet5", "TrainedModel"]


class DigitsMLP(nn.Sequential):
    """MLP for (N, 1, 8, 8) inputs: flatten, 64 -> 64 -> 32 -> 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__(
            nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
        )


class DigitsCNN(nn.Sequential):
    """CNN for (N, 1, 8, 8) inputs: [conv3x3-relu-maxpool2] x 2 (16, 32 channels), dense 128 -> 64 -> 10."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10),
        )


class LeNet5(nn.Sequential):
    """LeNet-5 for (N, 1, 28, 28) inputs: conv5x5(6)-relu-maxpool2, conv5x5(16)-relu-maxpool2, dense 256-120-84-10."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )


@dataclass(frozen=True)
class TrainedModel:
    """A trained classifier and its accuracy on the held-out test data."""

    name: str
    model: nn.Module
    test_accuracy: float


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def accuracy(model: nn.Module, data: Dataset) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly."""
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(data.x)).argmax(dim=1).numpy()
    return float(np.mean(pred == data.y))


def train_classifier(model: nn.Module, train: Dataset, epochs: int, seed: int = 0, lr: float = 1e-3,
                     batch_size: int = 64, weight_decay: float = 1e-4,
                     progress: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train ``model`` with Adam on cross-entropy; deterministic for a given ``seed``.

    ``progress(epoch, mean_loss)`` is called after each epoch when given.
    """
    _seed_everything(seed)
    for module in model.modules():  # re-initialise from the seed, whatever happened before
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if progress is not None:
            progress(epoch + 1, total / len(x))
    return model.eval()


def export_onnx(model: nn.Module, example: np.ndarray, path: Path) -> None:
    """Export to ONNX (opset 17) with input ``input`` (batch, ...) and output ``logits`` (batch, n_classes).

    Uses the TorchScript-based exporter: its tensor names follow the module path (``/1/Relu_output_0``),
    which makes ``advdetect layers`` readable; the torch.export-based exporter's output is read too.
    """
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.from_numpy(example[:1]),), buf, dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    path.write_bytes(buf.getvalue())


def export_torchscript(model: nn.Module, example: np.ndarray, path: Path) -> None:
    """Save a traced TorchScript copy (loaded with ``torch.jit.load`` by the attack suite)."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.from_numpy(example[:1]))
    traced.save(str(path))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_demo_models(out: Path, seed: int = 0, epochs: int = 60, verbose: bool = True) -> dict[str, float]:
    """Train the digits MLP and CNN, write ONNX + TorchScript copies and the split; return test accuracies.

    Files written to ``out``: ``digits_mlp.onnx``, ``digits_cnn.onnx``, ``digits_mlp.pt``, ``digits_cnn.pt`` and
    ``digits_split.npz`` (``x_train, y_train, x_calib, y_calib, x_test, y_test``).
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # identical reductions on every machine
    split = digits_split()
    np.savez_compressed(out / "digits_split.npz", **{f"{a}_{k}": getattr(d, a) for k, d in split.items() for a in "xy"})
    accuracies = {}
    for name, factory in (("digits_mlp", DigitsMLP), ("digits_cnn", DigitsCNN)):
        model = train_classifier(factory(), split["train"], epochs=epochs, seed=seed)
        acc = accuracy(model, split["test"])
        export_onnx(model, split["test"].x, out / f"{name}.onnx")
        export_torchscript(model, split["test"].x, out / f"{name}.pt")
        accuracies[name] = acc
        if verbose:
            _say(f"{name}: test accuracy {acc:.4f} on {len(split['test'])} held-out digits -> {out / name}.onnx, .pt")
    return accuracies


def build_lenet5(out: Path, seed: int = 0, epochs: int = 8, verbose: bool = True) -> TrainedModel:
    """LeNet-5 trained on ``mnist:train`` and tested on ``mnist:test`` (:func:`detector.data.mnist_split`), written
    to ``out`` as ``lenet5.onnx`` and ``lenet5.pt``: the demo's and the benchmarks' LeNet-5."""
    split = mnist_split()
    return train_lenet5(split["train"], split["test"], out, seed=seed, epochs=epochs, verbose=verbose)


def train_lenet5(train: Dataset, test: Dataset, out: Path, seed: int = 0, epochs: int = 8,
                 verbose: bool = True) -> TrainedModel:
    """Train LeNet-5 on 28x28 images, write ``lenet5.onnx`` and ``lenet5.pt`` to ``out``."""
    if train.x.shape[1:] != (1, 28, 28):
        raise ValueError(f"LeNet-5 expects 28x28 single-channel images, got per-sample shape {train.x.shape[1:]}")
    out.mkdir(parents=True, exist_ok=True)
    report = (lambda e, loss: _say(f"lenet5 epoch {e}/{epochs}: loss {loss:.4f}")) if verbose else None
    model = train_classifier(LeNet5(), train, epochs=epochs, seed=seed, progress=report)
    acc = accuracy(model, test)
    export_onnx(model, test.x, out / "lenet5.onnx")
    export_torchscript(model, test.x, out / "lenet5.pt")
    if verbose:
        _say(f"lenet5: test accuracy {acc:.4f} on {len(test)} images -> {out / 'lenet5'}.onnx, .pt")
    return TrainedModel("lenet5", model, acc)
