"""Load benchmark: a closed-loop gRPC client against a real ``advdetect serve`` process.

For the digits CNN and LeNet-5 (28x28, MNIST), the server runs in its own process on a loopback port; N
client threads each send single-input Open Inference Protocol ``ModelInfer`` requests back to back for a fixed
time, in two modes in the same run:

- detection on: every output (flags, adversarial score, p-values): the whole pipeline;
- detection off: only ``predicted_class``: the ONNX Runtime pass alone.

Reported per mode: requests, throughput (requests/s), p50 and p99 latency (ms), and the ratios. One caller
measures the latency detection adds; several callers measure throughput. Results go to
``bench/results/load.md``. Run: ``make bench`` or ``.venv/bin/python bench/load.py [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, digits_cnn, lenet5, mnist_splits  # noqa: E402  (puts ROOT on sys.path)

from detector import load_dataset  # noqa: E402

BASELINES = ROOT / "build" / "baselines"


def _prepare() -> dict[str, tuple[Path, Path, np.ndarray]]:
    """(model, baseline, inputs) per model; trains and calibrates what is missing."""
    from detector.calibration import CalibrationConfig, calibrate

    mnist = mnist_splits()
    jobs = {"digits_cnn": (digits_cnn()[0], load_dataset("digits:calib"), load_dataset("digits:test").x),
            "lenet5": (lenet5()[0], mnist["calib"], mnist["eval"].x[:500])}
    out = {}
    for name, (model, calib, inputs) in jobs.items():
        baseline = BASELINES / name
        if not (baseline / "manifest.json").is_file():
            print(f"[load] calibrating {name} ...", flush=True)
            calibrate(model, calib, baseline, CalibrationConfig(progress=False))
        out[name] = (model, baseline, inputs)
    return out


def _start_server(model: Path, baseline: Path, workers: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "ADVDETECT_GRPC_HOST": "127.0.0.1", "ADVDETECT_METRICS_HOST": "127.0.0.1",
           "ADVDETECT_WORKERS": str(workers), "ADVDETECT_MAX_INFLIGHT_REQUESTS": "256"}
    proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "serve", "--model", str(model), "--baseline",
                             str(baseline), "--grpc-port", "0", "--metrics-port", "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    if "advdetect serving" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, int(line.split(" on port ")[1].split(",")[0])


def _run(port: int, model_name: str, inputs: np.ndarray, callers: int, seconds: float, detection: bool) -> dict:
    import tritonclient.grpc as triton

    latencies: list[list[float]] = [[] for _ in range(callers)]
    errors = [0] * callers
    stop_at = time.perf_counter() + seconds
    outputs = None if detection else [triton.InferRequestedOutput("predicted_class")]

    def caller(k: int) -> None:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        i = k
        while time.perf_counter() < stop_at:
            inp = triton.InferInput("input", [1, *inputs.shape[1:]], "FP32")
            inp.set_data_from_numpy(inputs[i % len(inputs)][None])
            t0 = time.perf_counter()
            try:
                client.infer(model_name, [inp], outputs=outputs)
                latencies[k].append(time.perf_counter() - t0)
            except Exception:  # counted, not hidden
                errors[k] += 1
            i += callers
        client.close()

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    return {"requests": int(lat.size), "errors": int(sum(errors)), "rps": lat.size / elapsed,
            "p50_ms": float(np.median(lat)) if lat.size else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers of the throughput runs")
    parser.add_argument("--workers", type=int, default=4, help="server worker threads")
    args = parser.parse_args()
    rows = []
    for name, (model, baseline, inputs) in _prepare().items():
        proc, port = _start_server(model, baseline, args.workers)
        try:
            _run(port, name, inputs, 1, 1.0, True)  # warm-up
            for callers in (1, args.callers):
                on = _run(port, name, inputs, callers, args.seconds, True)
                off = _run(port, name, inputs, callers, args.seconds, False)
                rows.append((name, callers, on, off))
                print(f"[load] {name} callers={callers}: on {on}, off {off}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    lines = ["# Load benchmark", "",
             f"`bench/load.py --seconds {args.seconds:g} --callers {args.callers} --workers {args.workers}` on "
             f"{platform.machine()}, {os.cpu_count()} cores (client and server share them), Python "
             f"{platform.python_version()}. Single-input Open Inference Protocol requests, closed loop.", "",
             "| model | callers | detection | requests | errors | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for name, callers, on, off in rows:
        for mode, r in (("on", on), ("off", off)):
            lines.append(f"| {name} | {callers} | {mode} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | "
                         f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    lines += ["", "| model | callers | p50 added by detection (ms) | throughput on / off |", "|---|---|---|---|"]
    for name, callers, on, off in rows:
        lines.append(f"| {name} | {callers} | {on['p50_ms'] - off['p50_ms']:.2f} | {on['rps'] / off['rps']:.2f} |")
    text = "\n".join(lines) + "\n"
    out = RESULTS / "load.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
