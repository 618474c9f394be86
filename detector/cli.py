"""The ``advdetect`` command line.

Every command reads data through :func:`detector.data.load_dataset`; user errors print one line to stderr
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from detector.errors import AdvDetectError

if TYPE_CHECKING:
    from detector.data import Dataset
    from detector.pipeline import Detector
    from detector.preprocessing import Preprocessing

__all__ = ["main"]


def _preprocessing(model: str, manifest_spec: "Preprocessing | None" = None, resize: int | None = None,
                   crop: int | None = None) -> "Preprocessing":
    """How folders of images are read: the baseline's spec when there is one, else the model's channel count
    with ``resize`` and ``crop``."""
    from pydantic import ValidationError

    from detector.preprocessing import Preprocessing, input_channels

    if manifest_spec is not None:
        return manifest_spec
    try:
        return Preprocessing(channels=input_channels(model), resize=resize, crop=crop)
    except ValidationError as exc:
        raise AdvDetectError(f"invalid preprocessing: {exc.errors()[0]['msg']}") from None


def _cmd_layers(args: argparse.Namespace) -> int:
    from detector.calibration import CalibrationConfig, build_scorers, layer_readers
    from detector.capture import channel_means
    from detector.model import OnnxClassifier
    from detector.scorers.topology import InducedPersistenceScorer

    model = OnnxClassifier(args.model)
    scorers = build_scorers(model, CalibrationConfig(max_edges=args.max_edges), squeezers=[])
    readers = layer_readers(scorers, list(model.capture))
    coverage = next(s for s in scorers if isinstance(s, InducedPersistenceScorer)).features.graph.coverage

    def read_as(name: str) -> tuple[str, str]:
        forms = [(form, readers[key]) for form, key in (("whole", name), ("channel means", channel_means(name)))
                 if key in readers]
        return " + ".join(f for f, _ in forms), "; ".join(f"{f}: {', '.join(r)}" if len(forms) > 1 else ", ".join(r)
                                                          for f, r in forms)

    rows = [("name", "op", "shape", "units", "captured as", "topology", "read by")]
    rows += [(layer.name, layer.op_type, "x".join(map(str, layer.shape)), str(layer.size), *read_as(layer.name)[:1],
              coverage.get(layer.name, ""), read_as(layer.name)[1]) for layer in model.layers()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{model.path}: input {model.input_name!r} {('batch',) + model.input_shape}, "
          f"{model.n_classes} classes, sha256 {model.sha256[:12]}")
    print("captured as: what one ONNX Runtime run hands out for the default scorers (channel means are computed "
          "in the graph); read by: the scorers that read it (topology: induced persistence and Betti density)")
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


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.01,0.05, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from detector.calibration import CalibrationConfig, calibrate
    from detector.data import load_dataset

    tuning = {} if args.tuning_attacks is None else {
        "tuning_attacks": () if args.tuning_attacks == ["none"] else tuple(args.tuning_attacks)}
    if args.screen is not None:
        tuning["adversarial_screen"] = None if args.screen == "none" else args.screen
    try:
        config = CalibrationConfig(layers=args.layers, fprs=args.fpr, seed=args.seed, top_q=args.top_q,
                                   max_edges=args.max_edges, latent_dim=args.latent_dim,
                                   max_fit_per_class=args.max_fit_per_class, screen_share=args.screen_share,
                                   max_squeezed_copies=args.max_squeezed_copies, progress=not args.quiet, **tuning)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise AdvDetectError(f"invalid calibration settings: {problems}") from None
    data = load_dataset(args.data, preprocessing=_preprocessing(args.model, resize=args.resize, crop=args.crop))
    manifest = calibrate(args.model, data, args.out, config)
    print(f"baseline {manifest.version} written to {args.out}")
    print(f"  data: {manifest.data.spec}, {manifest.data.n_samples} inputs ({manifest.data.describe_split()})")
    for rule in manifest.flags:
        all_clean = manifest.heldout_metrics
        rates = ", ".join(f"target {t.target_fpr:g}: held-out {t.heldout_fpr:.3f}, all clean inputs "
                          f"{all_clean[f'{rule.name}_flag_rate_all_clean@{t.target_fpr}']:.3f}" for t in rule.thresholds)
        print(f"  flag {rule.name}: {rule.describe()}; FPR on correctly classified inputs {rates}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import csv

    from detector.data import load_dataset
    from detector.pipeline import Detector

    detector = Detector.load(args.model, args.baseline)
    data = load_dataset(args.inputs, require_labels=False,
                        preprocessing=_preprocessing(args.model, detector.manifest.data.preprocessing))
    flag_names = [rule.name for rule in detector.manifest.flags]
    size = args.batch_size or detector.batch_size
    with open(args.out, "w", newline="") as fh:
        writer = None
        for start in range(0, len(data), size):
            batch = detector.detect(data.x[start : start + size], fpr=args.fpr)
            for i, d in enumerate(batch.detections):
                row = {"index": start + i, "label": int(data.y[start + i]), "predicted_class": d.predicted_class,
                       "confidence": float(d.probabilities.max())}
                row |= {f"score_{k}": v for k, v in d.scores.items()}
                row |= {f"p_{k}": v for k, v in d.p_values.items()}
                row |= {f"stat_{k}": v for k, v in d.statistics.items()}
                row |= {f"flag_{f}": int(f in d.flags) for f in flag_names}
                row |= {f"reasons_{f}": ";".join(d.flags.get(f, ())) for f in flag_names}
                if writer is None:
                    writer = csv.DictWriter(fh, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
    print(f"scored {len(data)} inputs -> {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detector.data import load_dataset
    from detector.offline.attacks import load_torch_classifier
    from detector.offline.evaluate import ATTACK_NAMES, evaluate, results_markdown, write_results
    from detector.pipeline import Detector

    attacks = ATTACK_NAMES if args.attacks == ["all"] else args.attacks
    detector = Detector.load(args.model, args.baseline)
    data = load_dataset(args.data, preprocessing=_preprocessing(args.model, detector.manifest.data.preprocessing))
    if args.limit:
        data = type(data)(data.x[: args.limit], data.y[: args.limit], f"{data.name}[:{args.limit}]")
    if args.adaptive:
        return _evaluate_adaptive(args, detector, data)
    import torch

    torch.set_num_threads(1)  # the attacks' small batches run 10-20x slower with 2 threads on a 2-core machine
    levels = None if args.pixel_levels == 0 else args.pixel_levels
    result = evaluate(detector, load_torch_classifier(args.model), data, attacks, model_name=Path(args.model).stem,
                      progress=not args.quiet, pixel_levels=levels, max_attacked=args.max_attacked or None)
    write_results(result, Path(args.out))
    print(results_markdown(result.table))
    print(f"results written to {args.out}/results.json, results.md and roc_*.png")
    return 0


def _evaluate_adaptive(args: argparse.Namespace, detector: Detector, data: Dataset) -> int:
    """``evaluate --adaptive``: adaptive attacks and their sanity checks, written to ``--out``/adaptive.*."""
    from pydantic import ValidationError

    from detector.offline.adaptive_report import AdaptiveConfig, adaptive_evaluate, write_adaptive

    settings = {"n_inputs": args.max_attacked, "steps": args.steps, "queries": args.queries, "linf_budgets": args.budgets}
    try:
        config = AdaptiveConfig(**{k: v for k, v in settings.items() if v not in (None, 0)})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise AdvDetectError(f"invalid adaptive settings: {problems}") from None
    if args.queries == 0:
        config = config.model_copy(update={"queries": 0})
    say = None if args.quiet else (lambda message: print(f"[adaptive] {message}", file=sys.stderr, flush=True))
    table = adaptive_evaluate(detector, data, config, progress=say) | {"model": Path(args.model).stem}
    print(write_adaptive(table, Path(args.out), command="advdetect " + " ".join(sys.argv[1:])))
    print(f"results written to {args.out}/adaptive.json, adaptive.md and adaptive.png")
    return 0


def _cmd_add_normalization(args: argparse.Namespace) -> int:
    from detector.preprocessing import add_normalization

    out = add_normalization(args.model, args.mean, args.std, args.out)
    print(f"{out}: takes pixels in [0, 1] and computes (x - {list(args.mean)}) / {list(args.std)} before {args.model}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from service.server import serve
    from service.settings import load_settings

    settings = load_settings(args.config, model_path=args.model, baseline_path=args.baseline,
                             model_name=args.model_name, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                             health_port=args.health_port,
                             processes=args.processes)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from service.audit import print_summary

    print_summary(args.file, as_json=args.json)
    return 0


def _parser() -> argparse.ArgumentParser:
    from detector.topology.induced_graph import DEFAULT_MAX_EDGES
    parser = argparse.ArgumentParser(prog="advdetect", description="Adversarial-input detection for ONNX classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list the capturable layers of an ONNX classifier and what covers them")
    p.add_argument("--model", required=True, help="path to the .onnx classifier")
    p.add_argument("--max-edges", type=int, default=DEFAULT_MAX_EDGES, help="induced-graph edge budget (as calibrate)")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("demo-models", help="train the embedded digits MLP and CNN (ONNX + TorchScript)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=60)
    p.set_defaults(func=_cmd_demo_models)

    p = sub.add_parser("train-lenet5", help="train LeNet-5 on 28x28 data (default: the MNIST test set in data/mnist)")
    p.add_argument("--data", default="mnist", help="mnist (default) | FILE.npz | IDX file or folder")
    p.add_argument("--out", required=True, help="output folder for lenet5.onnx and lenet5.pt")
    p.add_argument("--n-train", type=int, default=6000, help="first N images train, the rest test (default 6000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.set_defaults(func=_cmd_train_lenet5)

    p = sub.add_parser("calibrate", help="fit every scorer on clean data and write a baseline directory")
    p.add_argument("--model", required=True, help="path to the .onnx classifier")
    p.add_argument("--data", required=True,
                   help="clean data: digits | digits:SPLIT | mnist | FILE.npz | IDX file or folder | folder of images")
    p.add_argument("--out", required=True, help="baseline directory to write")
    p.add_argument("--resize", type=int, default=None,
                   help="folders of images: resize the shorter side to this many pixels (stored in the baseline)")
    p.add_argument("--crop", type=int, default=None,
                   help="folders of images: cut a centre square of this many pixels after the resize (stored too)")
    p.add_argument("--layers", type=_names, default=None,
                   help="comma-separated layers the peers and the introspection VAE read, mean(NAME) for channel "
                        "means (default: block outputs, wide ones as channel means; see `advdetect layers`)")
    p.add_argument("--fpr", type=_floats, default=(0.01, 0.05), help="target false-positive rates (default 0.01,0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-q", type=float, default=1.0, help="induced-graph edges kept per layer pair (default 1 = exact)")
    p.add_argument("--max-edges", type=int, default=DEFAULT_MAX_EDGES,
                   help=f"induced-graph edge budget: the last stages that fit it (default {DEFAULT_MAX_EDGES:,})")
    p.add_argument("--latent-dim", type=int, default=8, help="introspection VAE latent size (default 8)")
    p.add_argument("--max-fit-per-class", type=int, default=50,
                   help="the scorers fit on at most this many inputs per class present in the data, on average; "
                        "the rest are held out (default 50; bounds calibration memory)")
    p.add_argument("--tuning-attacks", type=_names, default=None,
                   help="attacks made on calibration data to choose the adversarial fusion (default "
                        "fgsm,fgsm_foreground: CalibrationConfig's; add deepfool,fgsm_minimal_foreground for "
                        "boundary attacks; 'none': Fisher over the default members, no attack data)")
    p.add_argument("--screen", default=None,
                   help="score OR-ed with the adversarial fusion instead of fused into it (default patch_pca, "
                        "for image inputs; 'none': no screen)")
    p.add_argument("--screen-share", type=float, default=0.05,
                   help="share of the false-positive rate the screen spends (default 0.05)")
    p.add_argument("--max-squeezed-copies", type=int, default=None,
                   help="most squeezed copies of an input the flags' members may add to the model call (feature "
                        "squeezing needs 2, about 2x the model's time); 0 keeps one model pass per request "
                        "(default: no limit)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("score", help="score a batch of inputs offline and write a CSV")
    p.add_argument("--model", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--inputs", required=True, help="FILE.npz with x (y optional), or any data spec")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--fpr", type=float, default=None, help="target FPR (one of the calibrated ones)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="inputs per run (default: as many as keep one run within 256 MiB; 256 for small models)")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("evaluate", help="attack suite and side-by-side detector comparison")
    p.add_argument("--model", required=True, help="the .onnx classifier the baseline was calibrated for")
    p.add_argument("--baseline", required=True)
    p.add_argument("--data", required=True, help="clean evaluation data (not the calibration data)")
    p.add_argument("--attacks", type=_names, default=["all"], help="comma-separated attacks or 'all' (default)")
    p.add_argument("--out", required=True, help="output folder for results.json, results.md, roc_*.png")
    p.add_argument("--limit", type=int, default=0, help="evaluate on the first N inputs only")
    p.add_argument("--pixel-levels", type=int, default=255,
                   help="round clean and adversarial pixels to k/LEVELS (default 255: 8-bit); 0: no rounding")
    p.add_argument("--max-attacked", type=int, default=0,
                   help="attack only the first N correct inputs (0: all; with --adaptive, 0 means 100)")
    p.add_argument("--adaptive", action="store_true",
                   help="attacks that know the detector (white-box through its mirror, score-based Square) with "
                        "Tramer et al.'s sanity checks; writes adaptive.md, adaptive.json, adaptive.png (needs torch)")
    p.add_argument("--budgets", type=_floats, default=None,
                   help="with --adaptive: L-inf eps on the digit's pixels (default 0.1,0.2,0.3)")
    p.add_argument("--steps", type=int, default=None, help="with --adaptive: PGD steps per run (default 30)")
    p.add_argument("--queries", type=int, default=None, help="with --adaptive: Square queries per input (default 1000; 0: none)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("add-normalization",
                       help="write a copy of an ONNX model that takes pixels in [0, 1] and normalises them itself")
    p.add_argument("--model", required=True, help="the .onnx classifier, which expects (x - mean) / std")
    p.add_argument("--mean", type=_floats, required=True, help="per-channel mean in [0, 1] units, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", type=_floats, required=True, help="per-channel std in [0, 1] units, e.g. 0.229,0.224,0.225")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.set_defaults(func=_cmd_add_normalization)

    p = sub.add_parser("serve", help="serve the model with detection over gRPC (native API + Open Inference Protocol)")
    p.add_argument("--model", default=None, help="the .onnx classifier (or ADVDETECT_MODEL_PATH)")
    p.add_argument("--baseline", default=None, help="its baseline directory (or ADVDETECT_BASELINE_PATH)")
    p.add_argument("--model-name", default=None, help="name clients use (default: the ONNX file's stem)")
    p.add_argument("--config", default=None, help="TOML settings file (ADVDETECT_* environment variables also apply)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50051)")
    p.add_argument("--health-port", type=int, default=None,
                   help="port of the health-only gRPC server that probes should use (default 50052)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (default 9100)")
    p.add_argument("--processes", type=int, default=None,
                   help="server processes sharing the port (default 1; set to the number of cores)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("audit", help="summarise an audit log of flagged inputs")
    p.add_argument("file", help="the audit log (rotated files and per-process logs beside it are read too)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_audit)
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
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
