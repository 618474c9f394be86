"""Benchmark: what each scorer of a calibrated baseline adds to a single request, measured in one process.

Loads the LeNet-5 (and digits CNN) baseline that ``bench/quality.py`` wrote under ``build/bench/`` (run it
first), then for ``N_TIMED`` evaluation inputs one at a time: the ONNX Runtime pass of the served detector
(:meth:`detector.pipeline.Detector.classify`: logits, captures and squeezed copies), then every scorer's
``scores`` on that capture, each timed alone, in the order the pipeline runs them. Reports the median and p99
per scorer in ms and the ratio of the median to the ONNX Runtime pass's. Betti density reads the induced-graph
features that induced persistence computed for the same capture (shared, :class:`~detector.scorers.base.ScorerContext`),
so its row is what it adds after them. One ONNX Runtime thread; the numbers are as noisy as the machine (ratios
within one run are the figure to read; a p99 near 12 ms is the scheduler, not the scorer).

Run: ``.venv/bin/python bench/scorer_cost.py [digits_cnn] [lenet5]`` (default: both); writes
``bench/results/scorer-cost.md``.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
import time

import numpy as np

from common import ROOT, digits_cnn, lenet5, write_result  # noqa: E402  (puts ROOT on sys.path)

from detector import load_dataset  # noqa: E402
from detector.data import mnist_split  # noqa: E402
from detector.pipeline import Detector  # noqa: E402

N_TIMED = 300


def time_scorers(name: str) -> list[str]:
    """Markdown lines: per-scorer median / p99 ms per single input and the ratio to the ORT pass."""
    onnx = digits_cnn()[0] if name == "digits_cnn" else lenet5()[0]
    data = load_dataset("digits:test") if name == "digits_cnn" else mnist_split()["test"]
    baseline = ROOT / "build" / "bench" / f"quality-{name}" / "baseline"
    if not baseline.is_dir():
        sys.exit(f"bench/scorer_cost.py: no baseline at {baseline}; run bench/quality.py {name} first")
    detector = Detector.load(onnx, baseline, intra_op_threads=1)
    x = data.x[:N_TIMED]
    detector.raw_scores(detector.classify(x[:1]))  # warm-up (numba kernels, first ORT run)
    ort, per = [], {s.kind: [] for s in detector.scorers}
    for i in range(len(x)):
        t0 = time.perf_counter()
        capture = detector.classify(x[i:i + 1])
        ort.append(time.perf_counter() - t0)
        for scorer in detector.scorers:
            t0 = time.perf_counter()
            scorer.scores(capture)
            per[scorer.kind].append(time.perf_counter() - t0)
    ort_ms = np.median(ort) * 1e3
    lines = [f"## {name}", "", f"Baseline `{baseline.relative_to(ROOT)}`, {len(x)} inputs of `{data.name}` one at a time.",
             "", "| stage | median ms | p99 ms | median / ORT pass |", "|---|---|---|---|",
             f"| ONNX Runtime pass (with captures and squeezed copies) | {ort_ms:.3f} | "
             f"{np.percentile(ort, 99) * 1e3:.3f} | 1.00 |"]
    for kind, samples in per.items():
        med = np.median(samples) * 1e3
        lines.append(f"| {kind} | {med:.3f} | {np.percentile(samples, 99) * 1e3:.3f} | {med / ort_ms:.2f} |")
    return lines + [""]


def main(argv: list[str]) -> None:
    names = argv or ["digits_cnn", "lenet5"]
    command = " ".join([".venv/bin/python bench/scorer_cost.py", *argv])
    lines = ["# Per-scorer cost of a single request", "",
             f"- Command: `{command}`, {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
             f"- Machine: {platform.machine()}, 2 cores shared with other work (noisy: read the ratios), Python "
             f"{platform.python_version()}; one ONNX Runtime thread.", ""]
    for name in names:
        lines += time_scorers(name)
    write_result("scorer-cost.md", lines)


if __name__ == "__main__":
    main(sys.argv[1:])
