"""Cost of detection on real architectures: ``python bench/scale.py`` writes ``bench/results/scale.md``.

For each architecture of :mod:`detector.offline.zoo` at full width, with random weights (BatchNorm
statistics from a few random batches, the last linear layer centred on the inputs' features so that the
predictions spread over the classes, :func:`_spread_head`):

- parameters and the model's own ONNX Runtime time (one thread, batch 1, median);
- topology features time per input (median, p99) for each induced-graph edge budget (the last stages of
  the network that fit it, see :mod:`detector.topology.induced_graph`), and the edges and layers it covers;
- calibration seconds and peak RSS for each of ``--memory`` input counts (default 1,000 and 5,000), each in a
  fresh process (``ru_maxrss`` of that process) with default settings. The inputs are MNIST digits (padded to
  32x32, or scaled 8x to 224x224 for ResNet-50), repeated to 3 channels, stored as uint8 in an uncompressed
  ``.npz`` that calibration reads batch by batch; their labels are the model's own predictions, so that every
  input counts as correctly classified (as for a trained model: the tuning attacks run on all of them);
- the p50 that detection adds in the served path: ``Detector.detect`` of one input (ONNX Runtime one thread)
  minus the model's own ORT time, timed alternately on the same inputs, with the baseline of the first
  ``--memory`` count; once with every score and once with only the scores the flags fuse
  (``flagged_scores_only``), with the median of each stage.

With ``--quality``, instead: detection quality by edge budget on a narrow ResNet-18 (width 8) trained for
3 epochs on MNIST-32 ([0, 3000)), calibrated on [3000, 3600): AUROC of clean [8000, 8400) against its
FGSM (eps 0.2) copies that fool the model, for the fused ``adversarial`` statistic, the two topology
scores and the best other score (introspection or a peer); written to ``bench/results/scale-quality.md``.

Timings are wall-clock on a shared 2-core machine: other jobs may inflate them (the load average is written
beside them).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_result  # noqa: E402
from detector import load_dataset  # noqa: E402
from detector.data import Dataset  # noqa: E402
from detector.topology.induced_graph import DEFAULT_MAX_EDGES, InducedGraph  # noqa: E402

ARCHS = {"resnet18": 32, "mobilenetv2": 32, "vit_tiny": 32, "resnet50": 224}
BUDGETS = (100_000, 300_000, DEFAULT_MAX_EDGES, 3_000_000)


def _export(name: str, size: int, path: Path) -> int:
    """Build the architecture with seeded random weights and BN statistics, export it; return its parameter count."""
    import torch

    from detector.offline.zoo import ZOO

    torch.manual_seed(0)
    model = ZOO[name]()
    model.train()
    with torch.no_grad():  # BatchNorm running statistics from a few random batches
        for _ in range(3):
            model(torch.rand(8, 3, size, size))
    model.eval()
    _spread_head(model, torch.from_numpy(_mnist_images(size, 64).astype(np.float32) / 255))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, size, size),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buf.getvalue())
    return sum(p.numel() for p in model.parameters())


def _spread_head(model: "torch.nn.Module", x: "torch.Tensor") -> None:
    """Redraw the last linear layer, centred and scaled on its input features for ``x``, so that a random network
    spreads its predictions over many classes.

    The features of a random ResNet-50 differ by 0.3 % between MNIST inputs, so its head predicts one class for
    all of them; calibration needs labels of at least two classes (the trust score's references), and a real
    classifier's inputs spread over its classes. Random weights still: w ~ N(0, 1) / (s sqrt(d)), b = -w mu,
    with mu and s the mean and mean standard deviation of the d head inputs over ``x``.
    """
    import torch

    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    with torch.no_grad():
        model(x)
        hook.remove()
        f = seen[0].reshape(len(x), -1)
        w = torch.randn_like(head.weight) / (f.std(dim=0).mean() * f.shape[1] ** 0.5)
        head.weight.copy_(w)
        head.bias.copy_(-(w @ f.mean(dim=0)))


def _mnist_images(size: int, n: int) -> np.ndarray:
    """n MNIST digits as uint8 (n, 3, size, size): padded to 32x32, or scaled up 8x to 224x224."""
    m = load_dataset("mnist")
    x = np.rint(m.x[:n] * 255).astype(np.uint8)
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2))) if size == 32 else np.repeat(np.repeat(x, 8, axis=2), 8, axis=3)
    return np.repeat(x, 3, axis=1)


def _write_data(path: Path, model: Path, size: int, n: int) -> Path:
    """An uncompressed .npz of n inputs labelled with the model's own predictions (several ORT threads)."""
    import onnxruntime as ort

    from detector.model import session_options

    x = _mnist_images(size, n)
    session = ort.InferenceSession(str(model), session_options(0), providers=["CPUExecutionProvider"])
    y = np.concatenate([session.run(None, {"input": x[i:i + 16].astype(np.float32) / 255})[0].argmax(axis=1)
                        for i in range(0, n, 16)])
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def _lazy(data_path: Path, n: int | None = None) -> Dataset:
    """The .npz read batch by batch (never loaded), its first ``n`` inputs."""
    import detector.data

    detector.data.LAZY_BYTES = 0
    data = load_dataset(str(data_path))
    n = len(data) if n is None else n
    return Dataset(data.x.head(n), data.y[:n], f"{data_path.name}[:{n}]")


def _calibrate_child(model: str, data_path: str, n: int, out: str) -> dict[str, float]:
    """In a fresh process: calibrate with default settings on the first n inputs; seconds and peak RSS."""
    from detector.calibration import CalibrationConfig, calibrate

    data = _lazy(Path(data_path), n)
    t0 = time.perf_counter()
    calibrate(model, data, out, CalibrationConfig(progress=False))
    return {"calib_s": time.perf_counter() - t0, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB -> GiB


def _serve_child(model: str, baseline: str, data_path: str, repeats: int) -> dict[str, object]:
    """In a fresh process: the model's ORT time and detect() with every score and with the flagged ones only,
    alternately on the last ``repeats`` inputs of the data (not calibrated on)."""
    import onnxruntime as ort

    from detector.model import session_options
    from detector.pipeline import Detector

    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")  # as the server does (service/server.py)
    data = _lazy(Path(data_path))
    x = np.asarray(data.x[len(data) - repeats - 3:])
    session = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
    modes = {"all": Detector.load(model, baseline, intra_op_threads=1),
             "flagged": Detector.load(model, baseline, intra_op_threads=1, flagged_scores_only=True)}
    times: dict[str, list[float]] = {"ort": [], **{m: [] for m in modes}}
    stages: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for i in range(len(x)):
        t0 = time.perf_counter()
        session.run(None, {"input": x[i:i + 1]})
        times["ort"].append(time.perf_counter() - t0)
        for mode, detector in modes.items():
            t0 = time.perf_counter()
            batch = detector.detect(x[i:i + 1])
            times[mode].append(time.perf_counter() - t0)
            stages[mode].append(batch.stage_seconds)
    med = {k: float(np.median(v[3:]) * 1e3) for k, v in times.items()}
    return {**med, "stages": {m: {k: float(np.median([s[k] for s in v[3:]]) * 1e3) for k in v[0]} for m, v in stages.items()},
            "scores": {m: len(d.score_names) for m, d in modes.items()},
            "flags": {r.name: r.describe() for r in modes["all"].manifest.flags}}


def _child(*args: str) -> dict:
    """Run ``bench/scale.py --child ...`` in a fresh interpreter and return its JSON answer."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ort_ms(path: Path, x: np.ndarray, repeats: int) -> float:
    import onnxruntime as ort

    from detector.model import session_options

    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        session.run(None, {"input": x[i % len(x):i % len(x) + 1]})
        times.append(time.perf_counter() - t0)
    return float(np.median(times[3:]) * 1e3)


def _topology_ms(path: Path, x: np.ndarray, budget: int) -> tuple[float, float, int, int]:
    """Median and p99 ms of one input's features, and the graph's edges and pairs."""
    from detector.topology.graph_features import InducedGraphFeatures
    from detector.model import OnnxClassifier

    clf = OnnxClassifier(path, capture=[], intra_op_threads=1)
    graph = InducedGraph.from_classifier(clf, max_edges=budget)
    features = InducedGraphFeatures(graph)
    clf.set_capture(graph.required_tensors, intra_op_threads=1)
    capture = clf.run(x)
    features.one(capture, 0)  # compile
    times = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        features.one(capture, i)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), float(np.percentile(times, 99) * 1e3), graph.n_static_edges, len(graph.pairs)


def _quality(budgets: tuple[int, ...]) -> None:
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    from detector.calibration import CalibrationConfig, calibrate
    from detector.offline.demo_models import accuracy, export_onnx, train_classifier
    from detector.offline.zoo import ResNet, mnist32
    from detector.pipeline import Detector

    torch.set_num_threads(1)
    data = mnist32(load_dataset("mnist"))
    part = lambda a, b: Dataset(data.x[a:b], data.y[a:b], f"mnist-32[{a}:{b}]")  # noqa: E731
    train, calib, test = part(0, 3000), part(3000, 3600), part(8000, 8400)
    model = train_classifier(ResNet.resnet18(width=8), train, epochs=3, seed=0, lr=3e-3)
    work = Path(tempfile.mkdtemp())
    export_onnx(model, test.x, work / "resnet18_w8.onnx")
    x = torch.from_numpy(test.x).requires_grad_(True)
    nn.functional.cross_entropy(model(x), torch.from_numpy(test.y)).backward()
    adversarial = np.clip(test.x + 0.2 * np.sign(x.grad.numpy()), 0, 1).astype(np.float32)
    lines = ["# Detection quality by induced-graph edge budget (`python bench/scale.py --quality`)", "",
             f"Narrow ResNet-18 (width 8), test accuracy {accuracy(model, test):.3f}; FGSM eps 0.2. AUROC, clean "
             "against the FGSM inputs that fool the model.", "",
             "| budget | graph edges | pairs | fused | induced_persistence | betti_density | best other score | ms/input topology |",
             "|---|---|---|---|---|---|---|---|"]
    for budget in budgets:
        out = work / f"baseline-{budget}"
        calibrate(work / "resnet18_w8.onnx", calib, out, CalibrationConfig(fprs=(0.05,), window_size=32,
                                                                             max_edges=budget, progress=False))
        detector = Detector.load(work / "resnet18_w8.onnx", out, intra_op_threads=1)
        clean, attacked = detector.detect(test.x), detector.detect(adversarial)
        fooled = np.array([d.predicted_class for d in attacked.detections]) != test.y
        rows = list(clean.detections) + [d for d, f in zip(attacked.detections, fooled) if f]
        truth = np.r_[np.zeros(len(clean.detections)), np.ones(int(fooled.sum()))]
        auc = {n: roc_auc_score(truth, [d.scores[n] for d in rows]) for n in rows[0].scores}
        fused = roc_auc_score(truth, [d.statistics["adversarial"] for d in rows])
        others = {n: v for n, v in auc.items() if n not in ("induced_persistence", "betti_density")}
        best = max(others, key=others.__getitem__)
        graph = InducedGraph.from_classifier(detector.model, max_edges=budget)
        lines.append(f"| {budget:,} | {graph.n_static_edges:,} | {len(graph.pairs)} | {fused:.3f} "
                     f"| {auc['induced_persistence']:.3f} | {auc['betti_density']:.3f} | {best} {others[best]:.3f} "
                     f"| {clean.stage_seconds['topology'] / len(test) * 1e3:.2f} |")
        print(lines[-1], flush=True)
    write_result("scale-quality.md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of " + ",".join(ARCHS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--memory", default="1000,5000",
                        help="calibration input counts (the first one's baseline is served); default 1000,5000")
    parser.add_argument("--quality", action="store_true", help="detection quality by edge budget instead of cost")
    parser.add_argument("--out", default="scale.md", help="file name under bench/results (default scale.md)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        answer = _calibrate_child(rest[0], rest[1], int(rest[2]), rest[3]) if kind == "calibrate" else \
            _serve_child(rest[0], rest[1], rest[2], int(rest[3]))
        print(json.dumps(answer))
        return
    if args.quality:
        _quality((30_000, 300_000, DEFAULT_MAX_EDGES, 3_000_000))
        return
    counts = [int(n) for n in args.memory.split(",")]
    work = Path(tempfile.mkdtemp())
    load = [f"{os.getloadavg()[0]:.1f}"]
    cost = ["| model | input | parameters | ORT ms | budget (edges) | graph edges | pairs | topology ms median | p99 "
            "| topology / ORT |", "|---|---|---|---|---|---|---|---|---|---|"]
    served = ["| model | ORT ms | scores | detect p50 ms | added p50 ms | added / ORT | stage medians ms | flags fuse |",
              "|---|---|---|---|---|---|---|---|"]
    memory = ["| model | inputs | calibration s | peak RSS GiB |", "|---|---|---|---|"]
    for name in args.archs.split(","):
        size = ARCHS[name]
        path = work / f"{name}.onnx"
        params = _export(name, size, path)
        x = _mnist_images(size, args.repeats).astype(np.float32) / 255
        ort_ms = _ort_ms(path, x, args.repeats)
        for budget in BUDGETS:
            med, p99, edges, pairs = _topology_ms(path, x, budget)
            cost.append(f"| {name} | {size}x{size} | {params / 1e6:.1f}M | {ort_ms:.1f} | {budget:,} | {edges:,} | {pairs} "
                        f"| {med:.2f} | {p99:.2f} | {med / ort_ms:.2f}x |")
            print(cost[-1], flush=True)
        data = _write_data(work / f"{name}-data.npz", path, size, max(counts) + args.repeats + 3)
        for n in counts:
            r = _child("calibrate", str(path), str(data), str(n), str(work / f"{name}-baseline-{n}"))
            memory.append(f"| {name} {size}x{size} | {n:,} | {r['calib_s']:.0f} | {r['rss_gib']:.2f} |")
            print(memory[-1], flush=True)
        r = _child("serve", str(path), str(work / f"{name}-baseline-{counts[0]}"), str(data), str(args.repeats))
        for mode in ("all", "flagged"):
            added = r[mode] - r["ort"]
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"][mode].items() if v >= 0.05)
            fused = "; ".join(f"{k}: {v}" for k, v in r["flags"].items()) if mode == "all" else ""
            served.append(f"| {name} {size}x{size} | {r['ort']:.1f} | {mode} ({r['scores'][mode]}) | {r[mode]:.1f} "
                          f"| {added:.1f} | {added / r['ort']:.2f}x | {stages} | {fused} |")
            print(served[-1], flush=True)
        load.append(f"{os.getloadavg()[0]:.1f}")
    write_result(args.out, [
        f"# Detection cost on real architectures (`python bench/scale.py{''.join(' ' + a for a in sys.argv[1:])}`)", "",
        "Random weights (BatchNorm statistics from random batches), full width; ONNX Runtime one thread, batch 1. "
        "Wall-clock on a shared 2-core machine: the 1-minute load average was " + ", ".join(load) +
        " at the start and after each model, so other jobs shared the cores and the figures are noisy.", "",
        "## Topology features per input, by edge budget (the last stages that fit it)", "", *cost, "",
        "## Served path (`Detector.detect` of one input, the baseline of the first calibration below)", "",
        "`all`: every score; `flagged`: only the scores the flags fuse (`flagged_scores_only`). Added = detect minus "
        "the model's own ORT time, timed alternately on the same inputs; feature squeezing runs two squeezed copies "
        "of the input in the same ORT run, so it alone adds about 2x.", "", *served, "",
        "## Calibration (default settings, data read batch by batch from an uncompressed uint8 .npz)", "",
        "Each row is its own process; peak RSS is its `ru_maxrss`.", "", *memory, "",
    ])


if __name__ == "__main__":
    main()
