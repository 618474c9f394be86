"""Benchmark: per-input topological feature time and the effect of top-q sparsification on detection.

For the digits CNN and for LeNet-5 at 28x28 (trained on 6,000 real MNIST test-set images), over 1,000
inputs, one at a time:

- time of the induced-graph features (block-wise spanning forest, persistence summaries, Betti signature),
  median and p99, the forest's share, and the ratio to one single-input ONNX Runtime inference; an ORT
  run precedes each feature call, as on the serving path, so the caches are as cold as they are there;
- for comparison, the edge-list path on the first 200 inputs: weigh every edge, then the generic H0
  persistence and Betti signature (what top-q < 1 uses);
- AUROC of the induced-persistence scorer for Gaussian noise (sigma 0.3) against clean inputs, for top-q
  in {1, 0.5, 0.25, 0.1}, and the change against the exact graph (q = 1).

Run: ``make bench`` or ``.venv/bin/python bench/topology.py``; writes ``bench/results/topology.md``.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from common import ROOT, digits_cnn, lenet5, write_result  # noqa: E402  (puts ROOT on sys.path)

from detector import Dataset, OnnxClassifier, load_dataset  # noqa: E402
from detector.data import mnist_split  # noqa: E402
from detector.topology.graph_features import InducedGraphFeatures  # noqa: E402
from detector.topology.induced_graph import InducedGraph  # noqa: E402
from detector.scorers.topology import InducedPersistenceScorer  # noqa: E402

N_TIMED = 1000
N_EDGE_LIST = 200
Q_VALUES = (1.0, 0.5, 0.25, 0.1)


def _models() -> dict[str, tuple[Path, Dataset, Dataset, Dataset]]:
    """(onnx path, calibration data, evaluation data, timing data) per model; builds what is missing."""
    digits = load_dataset("digits")
    mnist = mnist_split()
    return {
        "digits_cnn": (digits_cnn()[0], load_dataset("digits:calib"), load_dataset("digits:test"),
                       Dataset(digits.x[:N_TIMED], digits.y[:N_TIMED], "digits[:1000]")),
        "lenet5": (lenet5()[0], mnist["calib"], Dataset(mnist["test"].x[:500], mnist["test"].y[:500], "mnist:test[:500]"),
                   Dataset(mnist["test"].x[:N_TIMED], mnist["test"].y[:N_TIMED], "mnist:test[:1000]")),
    }


def _quantiles_ms(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.median(a)), float(np.percentile(a, 99))


def time_features(path: Path, data: Dataset) -> dict[str, float]:
    clf = OnnxClassifier(path, intra_op_threads=1)
    graph = InducedGraph.from_classifier(clf)
    clf.set_capture(clf.default_capture() + graph.required_tensors)
    features = InducedGraphFeatures(graph)
    edge_list = InducedGraphFeatures(graph)
    edge_list.forest = None  # the top-q path at q = 1: weigh and list every edge
    captures = [clf.run(data.x[i : i + 1]) for i in range(len(data))]
    features.one(captures[0], 0)  # compile (or load from numba's cache) the kernels
    edge_list.one(captures[0], 0)
    total, in_forest, ort, listed = [], [], [], []
    for i, capture in enumerate(captures):
        t0 = time.perf_counter()
        clf.run(data.x[i : i + 1])
        ort.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        features.one(capture, 0)
        total.append(time.perf_counter() - t0)
        clf.run(data.x[i : i + 1])
        t0 = time.perf_counter()
        features.forest.compute(capture, 0)
        in_forest.append(time.perf_counter() - t0)
        if i < N_EDGE_LIST:
            clf.run(data.x[i : i + 1])
            t0 = time.perf_counter()
            edge_list.one(capture, 0)
            listed.append(time.perf_counter() - t0)
    med, p99 = _quantiles_ms(total)
    ort_med, _ = _quantiles_ms(ort)
    return {"edges": graph.n_static_edges, "vertices": graph.n_vertices, "median_ms": med, "p99_ms": p99,
            "forest_ms": _quantiles_ms(in_forest)[0], "edge_list_ms": _quantiles_ms(listed)[0],
            "ort_ms": ort_med, "ratio": med / ort_med}


def top_q_auroc(path: Path, calib: Dataset, evaluation: Dataset) -> dict[float, float]:
    clf = OnnxClassifier(path)
    graph = InducedGraph.from_classifier(clf)
    clf.set_capture(clf.default_capture() + graph.required_tensors)
    noisy_x = np.clip(evaluation.x + np.random.default_rng(0).normal(0, 0.3, evaluation.x.shape), 0, 1).astype(np.float32)
    cal, clean, noisy = clf.run_batches(calib.x), clf.run_batches(evaluation.x), clf.run_batches(noisy_x)
    out = {}
    for q in Q_VALUES:
        scorer = InducedPersistenceScorer(InducedGraphFeatures(graph, top_q=q)).fit(cal, calib.y)
        s0, s1 = scorer.score(clean), scorer.score(noisy)
        out[q] = float(roc_auc_score(np.r_[np.zeros(len(s0)), np.ones(len(s1))], np.r_[s0, s1]))
    return out


def main() -> None:
    rows, aurocs = {}, {}
    for name, (path, calib, evaluation, timed) in _models().items():
        print(f"[topology] timing {name} over {len(timed)} inputs ...", flush=True)
        rows[name] = time_features(path, timed)
        print(f"[topology] top-q AUROC {name} ...", flush=True)
        aurocs[name] = top_q_auroc(path, calib, evaluation)
    lines = [
        "# Topology benchmark",
        "",
        f"`{Path(__file__).relative_to(ROOT)}` on {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}. "
        f"Per-input times over {N_TIMED} inputs, one at a time, ORT single-threaded.",
        "",
        "| model | vertices | edges (full graph) | features median ms | p99 ms | of which spanning forest ms | "
        f"edge-list path ms (first {N_EDGE_LIST}) | ORT inference ms | ratio features / ORT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['vertices']} | {r['edges']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['forest_ms']:.2f} | {r['edge_list_ms']:.2f} | {r['ort_ms']:.3f} | {r['ratio']:.1f}x |")
    lines += ["", "Induced-persistence AUROC, Gaussian noise (sigma 0.3) against clean inputs, by top-q edges kept per layer pair:", "",
              "| model | " + " | ".join(f"q={q}" for q in Q_VALUES) + " | max change vs q=1 |",
              "|---|" + "---|" * (len(Q_VALUES) + 1)]
    for name, a in aurocs.items():
        change = max(abs(a[q] - a[1.0]) for q in Q_VALUES)
        lines.append(f"| {name} | " + " | ".join(f"{a[q]:.4f}" for q in Q_VALUES) + f" | {change:.4f} |")
    write_result("topology.md", lines)


if __name__ == "__main__":
    main()
