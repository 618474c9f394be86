"""What every benchmark shares: the models under ``build/models`` and the data splits they use.

- digits CNN: trained on ``digits:train`` (``build_demo_models``), calibrated on ``digits:calib``,
  evaluated on ``digits:test``;
- LeNet-5: trained on ``mnist:train`` (``build_lenet5``), calibrated on ``mnist:calib``, evaluated on
  ``mnist:test`` (``detector.data.mnist_split``: the t10k set in ``data/mnist`` cut at 6,000 and 8,000);
- the MNIST-32 models (``MNIST32_MODELS``: narrow ResNet-18, MobileNetV2 and ViT of ``detector.offline.zoo``):
  the same splits padded to 32x32 and repeated to 3 channels (``mnist32``).

Models are built when missing, so any benchmark runs on a fresh clone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from detector import Dataset  # noqa: E402
from detector.data import mnist_split  # noqa: E402

MODELS = ROOT / "build" / "models"
RESULTS = ROOT / "bench" / "results"


def write_result(name: str, lines: list[str]) -> str:
    """Write a benchmark's markdown lines to ``bench/results/<name>``, print them, and return the text."""
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(text)
    print(text)
    return text


def digits_cnn() -> tuple[Path, Path]:
    """The digits CNN's ONNX and TorchScript files (built with the demo models when missing)."""
    if not (MODELS / "digits_cnn.onnx").is_file() or not (MODELS / "digits_cnn.pt").is_file():
        from detector.offline.demo_models import build_demo_models

        build_demo_models(MODELS)
    return MODELS / "digits_cnn.onnx", MODELS / "digits_cnn.pt"


def lenet5() -> tuple[Path, Path]:
    """LeNet-5's ONNX and TorchScript files (trained on the ``train`` split when missing)."""
    if not (MODELS / "lenet5.onnx").is_file() or not (MODELS / "lenet5.pt").is_file():
        from detector.offline.demo_models import build_lenet5

        build_lenet5(MODELS)
    return MODELS / "lenet5.onnx", MODELS / "lenet5.pt"


#: The MNIST-32 models of ``bench/quality.py``: name -> (architecture note, factory, epochs, learning rate).
#: Narrow widths, so that training and the quality run of one model fit in ~20 minutes on one core.
MNIST32_MODELS: dict[str, tuple[str, Callable[[], Any], int, float]] = {
    "resnet18_32": ("CIFAR-style ResNet-18 at width 8 (stages 8-16-32-64 channels, 0.18M parameters)",
                    lambda: _zoo().ResNet.resnet18(width=8), 3, 3e-3),
    "mobilenetv2_32": ("MobileNetV2 at width 0.25 (0.16M parameters)", lambda: _zoo().MobileNetV2(width=0.25), 6, 3e-3),
    "vit_32": ("ViT with 4x4 patches, dim 64, depth 4, 4 heads (0.21M parameters)",
               lambda: _zoo().ViT(patch=4, dim=64, depth=4, heads=4), 15, 1e-3),
}


def _zoo() -> Any:
    import detector.offline.zoo as zoo

    return zoo


def mnist32_splits() -> dict[str, Dataset]:
    """``mnist_split`` padded to 32x32 and repeated to 3 channels (``detector.offline.zoo.mnist32``)."""
    zoo = _zoo()
    return {k: zoo.mnist32(d) for k, d in mnist_split().items()}


def mnist32_model(name: str, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """The ONNX file of the MNIST-32 model ``name`` (a key of ``MNIST32_MODELS``) and its training record
    (``build/models/<name>.json``: architecture, epochs, lr, seed, parameters, test accuracy on the ``test`` split,
    seconds); trained on the ``train`` split with ``train_classifier`` when missing."""
    onnx_path, record_path = MODELS / f"{name}.onnx", MODELS / f"{name}.json"
    if not onnx_path.is_file() or not record_path.is_file():
        import time

        import torch

        from detector.offline.demo_models import accuracy, export_onnx, train_classifier

        note, factory, epochs, lr = MNIST32_MODELS[name]
        torch.set_num_threads(1)
        splits = mnist32_splits()
        t0 = time.perf_counter()
        model = train_classifier(factory(), splits["train"], epochs=epochs, seed=seed, lr=lr,
                                 progress=lambda e, loss: print(f"{name} epoch {e}/{epochs}: loss {loss:.4f}",
                                                                file=sys.stderr, flush=True))
        seconds = time.perf_counter() - t0
        acc = accuracy(model, splits["test"])
        MODELS.mkdir(parents=True, exist_ok=True)
        export_onnx(model, splits["test"].x, onnx_path)
        record = {"name": name, "architecture": note, "epochs": epochs, "lr": lr, "seed": seed,
                  "parameters": sum(p.numel() for p in model.parameters()), "test_accuracy": acc,
                  "train_seconds": seconds}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name}: test accuracy {acc:.4f} after {seconds:.0f} s -> {onnx_path}", file=sys.stderr, flush=True)
    return onnx_path, json.loads(record_path.read_text())


def start_server(model: Path, baseline: Path, **settings: str) -> tuple[subprocess.Popen, int, int, int]:
    """``advdetect serve`` on 127.0.0.1 (free ports) in a subprocess, with ``ADVDETECT_<NAME>`` set from
    ``settings``; returns the process, its gRPC, metrics and health ports once it is ready."""
    env = {**os.environ, "ADVDETECT_GRPC_HOST": "127.0.0.1", "ADVDETECT_METRICS_HOST": "127.0.0.1",
           **{f"ADVDETECT_{name.upper()}": value for name, value in settings.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "serve", "--model", str(model), "--baseline",
                             str(baseline), "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    started = re.search(r"on port (\d+), metrics on port (\d+), health on port (\d+)", line)
    if started is None:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    grpc_port, metrics_port, health_port = (int(p) for p in started.groups())
    return proc, grpc_port, metrics_port, health_port
