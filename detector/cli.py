"""The ``advdetect`` command line.

Every command reads data through :func:`detector.data.load_dataset`; user errors print one line to stderr
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from detector.errors import AdvDetectError

__all__ = ["main"]


def _cmd_layers(args: argparse.Namespace) -> int:
    from detector.model import OnnxClassifier

    model = OnnxClassifier(args.model)
    default = set(model.default_capture())
    rows = [("name", "op", "shape", "units", "default")]
    rows += [
        (layer.name, layer.op_type, "x".join(map(str, layer.shape)), str(layer.size), "yes" if layer.name in default else "")
        for layer in model.layers()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{model.path}: input {model.input_name!r} {('batch',) + model.input_shape}, "
          f"{model.n_classes} classes, sha256 {model.sha256[:12]}")
    return 0


def _cmd_demo_models(args: argparse.Namespace) -> int:
    from detector.offline.demo_models import build_demo_models

    accuracies = build_demo_models(Path(args.out), seed=args.seed, epochs=args.epochs)
    for name, acc in accuracies.items():
        print(f"{name}\ttest_accuracy={acc:.4f}")
    return 0


def _cmd_train_lenet5(args: argparse.Namespace) -> int:
    from detector.data import Dataset, load_dataset
    from detector.offline.demo_models import train_lenet5

    data = load_dataset(args.data)
    n_train = args.n_train
    if n_train >= len(data):
        raise AdvDetectError(f"--n-train {n_train} leaves no test images: {args.data} has {len(data)}")
    train = Dataset(data.x[:n_train], data.y[:n_train], f"{data.name}[:{n_train}]")
    test = Dataset(data.x[n_train:], data.y[n_train:], f"{data.name}[{n_train}:]")
    trained = train_lenet5(train, test, Path(args.out), seed=args.seed, epochs=args.epochs)
    print(f"lenet5\ttest_accuracy={trained.test_accuracy:.4f}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advdetect", description="Adversarial-input detection for ONNX classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list the capturable layers of an ONNX classifier")
    p.add_argument("--model", required=True, help="path to the .onnx classifier")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("demo-models", help="train the embedded digits MLP and CNN (ONNX + TorchScript)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=60)
    p.set_defaults(func=_cmd_demo_models)

    p = sub.add_parser("train-lenet5", help="train LeNet-5 on 28x28 data (e.g. an MNIST IDX folder)")
    p.add_argument("--data", required=True, help="digits | FILE.npz | IDX file or folder")
    p.add_argument("--out", required=True, help="output folder for lenet5.onnx and lenet5.pt")
    p.add_argument("--n-train", type=int, default=6000, help="first N images train, the rest test (default 6000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.set_defaults(func=_cmd_train_lenet5)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AdvDetectError as exc:
        print(f"advdetect {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
