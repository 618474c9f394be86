"""Cost of detection on real architectures: ``python bench/scale.py`` writes ``bench/results/scale.md``.

For each architecture of :mod:`detector.offline.zoo` at full width, with random weights (BatchNorm
statistics from a few random batches):

- parameters and the model's own ONNX Runtime time (one thread, batch 1, median);
- topology features time per input (median, p99) for each induced-graph edge budget (the last stages of
  the network that fit it, see :mod:`detector.topology.induced_graph`), and the edges and layers it covers;
- for the 32x32 models, the p50 that detection adds in the served path (``Detector.detect`` of one input,
  ONNX Runtime one thread, minus the model's own ORT time: capturing the hidden tensors counts as added),
  the median of each stage, and calibration seconds and peak RSS of a calibration on ``--n-calib``
  MNIST-32 inputs (each in its own process).

With ``--quality``, instead: detection quality by edge budget on a narrow ResNet-18 (width 8) trained for
3 epochs on MNIST-32 ([0, 3000)), calibrated on [3000, 3600): AUROC of clean [8000, 8400) against its
FGSM (eps 0.2) copies that fool the model, for the fused ``adversarial`` statistic, the two topology
scores and the best other score (introspection or a peer); written to ``bench/results/scale-quality.md``.

Timings are wall-clock on a shared 2-core machine: other jobs may inflate them.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import resource
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
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, size, size),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buf.getvalue())
    return sum(p.numel() for p in model.parameters())


def _inputs(size: int, n: int) -> np.ndarray:
    if size == 32:
        from detector.offline.zoo import mnist32

        return mnist32(load_dataset("mnist")).x[8000:8000 + n]
    return np.random.default_rng(0).random((n, 3, size, size), dtype=np.float32)


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


def _served(path: str, n_calib: int, repeats: int, queue: "mp.Queue[dict[str, object]]") -> None:
    """In a child process: calibrate on MNIST-32, then time Detector.detect of single inputs."""
    from detector.calibration import CalibrationConfig, calibrate
    from detector.offline.zoo import mnist32
    from detector.pipeline import Detector

    data = mnist32(load_dataset("mnist"))
    calib = Dataset(data.x[:n_calib], data.y[:n_calib], f"mnist-32[:{n_calib}]")
    out = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    calibrate(path, calib, out, CalibrationConfig(fprs=(0.05,), window_size=32, progress=False))
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    detector = Detector.load(path, out, intra_op_threads=1)
    x = data.x[8000:8000 + repeats + 3]
    total, stages = [], []
    for i in range(len(x)):
        t0 = time.perf_counter()
        batch = detector.detect(x[i:i + 1])
        total.append(time.perf_counter() - t0)
        stages.append(batch.stage_seconds)
    per_stage = {k: float(np.median([s[k] for s in stages[3:]]) * 1e3) for k in stages[0]}
    queue.put({"calib_s": seconds, "rss_gb": rss, "total_ms": float(np.median(total[3:]) * 1e3), "stages": per_stage})


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
    parser.add_argument("--n-calib", type=int, default=1000)
    parser.add_argument("--quality", action="store_true", help="detection quality by edge budget instead of cost")
    args = parser.parse_args()
    if args.quality:
        _quality((30_000, 300_000, DEFAULT_MAX_EDGES, 3_000_000))
        return
    work = Path(tempfile.mkdtemp())
    cost = ["| model | input | parameters | ORT ms | budget (edges) | graph edges | pairs | topology ms median | p99 "
            "| topology / ORT |", "|---|---|---|---|---|---|---|---|---|---|"]
    served = [f"| model | ORT ms | detect p50 ms (budget {DEFAULT_MAX_EDGES:,}) | added p50 ms | added / ORT "
              "| stage medians ms | calibration s " f"({args.n_calib} inputs) | peak RSS GB |",
              "|---|---|---|---|---|---|---|---|"]
    for name in args.archs.split(","):
        size = ARCHS[name]
        path = work / f"{name}.onnx"
        params = _export(name, size, path)
        x = _inputs(size, args.repeats if size == 32 else min(args.repeats, 10))
        ort_ms = _ort_ms(path, x, args.repeats)
        for budget in BUDGETS:
            med, p99, edges, pairs = _topology_ms(path, x, budget)
            cost.append(f"| {name} | {size}x{size} | {params / 1e6:.1f}M | {ort_ms:.1f} | {budget:,} | {edges:,} | {pairs} "
                        f"| {med:.2f} | {p99:.2f} | {med / ort_ms:.2f}x |")
            print(cost[-1], flush=True)
        if size == 32:
            queue: mp.Queue[dict[str, object]] = mp.get_context("fork").Queue()
            child = mp.get_context("fork").Process(target=_served, args=(str(path), args.n_calib, args.repeats, queue))
            child.start()
            r = queue.get()
            child.join()
            added = r["total_ms"] - ort_ms
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
            served.append(f"| {name} | {ort_ms:.1f} | {r['total_ms']:.1f} | {added:.1f} | {added / ort_ms:.2f}x "
                          f"| {stages} | {r['calib_s']:.0f} | {r['rss_gb']:.2f} |")
            print(served[-1], flush=True)
    write_result("scale.md", [
        "# Detection cost on real architectures (`python bench/scale.py`)", "",
        "Random weights (BatchNorm statistics from random batches), full width; ONNX Runtime one thread, batch 1. "
        "Wall-clock on a shared 2-core machine with other jobs running: figures are noisy.", "",
        "## Topology features per input, by edge budget (the last stages that fit it)", "", *cost, "",
        "## Served path (32x32 models; calibrated on MNIST-32, default settings but one FPR and window 32)", "",
        *served, "",
    ])


if __name__ == "__main__":
    main()
