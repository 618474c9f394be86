"""``make demo``: serve the digits CNN, send clean then adversarial traffic, print what was flagged.

Steps: build the embedded digits models and the baseline if missing; start ``advdetect serve`` in a child
process; send clean test digits one request each, then adversarial versions of the same digits made by the
attack suite (FGSM, foreground PGD, DeepFool, CW with kappa = 10; the Adversarial Robustness Toolbox on the
ONNX model converted by onnx2torch); print a table of flags per kind, flag rates, latency and where the
metrics are; stop the server with SIGTERM (graceful drain). Images reach a service as 8-bit pixels: the
clean digits and every adversarial example are rounded to 8-bit, and only the examples that are still
adversarial after rounding are sent.

This is a client: it imports torch for the attacks, so it is not part of the serving path.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from detector import load_dataset
from service.protocol import detector_pb2, detector_pb2_grpc
from service.tensors import tensor_to_proto

ATTACKS = ("fgsm", "pgd_foreground", "deepfool", "cw_k10")


def ensure_artifacts(models: Path, baseline: Path) -> None:
    """Train the demo models and calibrate the CNN's baseline unless they exist."""
    if not (models / "digits_cnn.onnx").is_file():
        from detector.offline.demo_models import build_demo_models

        print("[demo] training the embedded digits models ...", flush=True)
        build_demo_models(models)
    if not (baseline / "manifest.json").is_file():
        from detector.calibration import CalibrationConfig, calibrate

        print("[demo] calibrating the baseline on digits:calib ...", flush=True)
        calibrate(models / "digits_cnn.onnx", load_dataset("digits:calib"), baseline, CalibrationConfig(progress=True))


def _send(stub: detector_pb2_grpc.DetectorStub, x: np.ndarray, tag: str) -> tuple[list[list[str]], list[float]]:
    flags, latencies = [], []
    for i in range(len(x)):
        t0 = time.perf_counter()
        response = stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(x[i : i + 1]), request_id=f"{tag}-{i}"))
        latencies.append(time.perf_counter() - t0)
        flags.append([f.name for f in response.results[0].flags])
    return flags, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="build/models")
    parser.add_argument("--baseline", default="build/baselines/digits_cnn")
    parser.add_argument("--n", type=int, default=100, help="clean inputs sent (and attacked)")
    parser.add_argument("--grpc-port", type=int, default=0, help="default 0: any free port")
    parser.add_argument("--metrics-port", type=int, default=0, help="default 0: any free port")
    parser.add_argument("--health-port", type=int, default=0, help="default 0: any free port")
    args = parser.parse_args()
    models, baseline = Path(args.models), Path(args.baseline)
    ensure_artifacts(models, baseline)

    import torch

    from detector.offline.attacks import load_torch_classifier, round_to_grid, run_attack

    torch.set_num_threads(1)
    test = load_dataset("digits:test")
    x, y = round_to_grid(test.x[: args.n]), test.y[: args.n]
    model = load_torch_classifier(models / "digits_cnn.onnx")
    print(f"[demo] attacking {len(x)} test digits with {', '.join(ATTACKS)} ...", flush=True)
    adversarial = {}
    for name in ATTACKS:
        result = run_attack(name, model, x, y)
        adversarial[name] = result.x_adv[result.success]

    audit = Path("build") / "demo-audit.jsonl"
    env = {**os.environ, "ADVDETECT_GRPC_HOST": "127.0.0.1", "ADVDETECT_METRICS_HOST": "127.0.0.1",
           "ADVDETECT_AUDIT_LOG_PATH": str(audit)}
    server = subprocess.Popen([sys.executable, "-m", "detector.cli", "serve", "--model", str(models / "digits_cnn.onnx"),
                               "--baseline", str(baseline), "--grpc-port", str(args.grpc_port), "--metrics-port",
                               str(args.metrics_port), "--health-port", str(args.health_port)],
                              stdout=subprocess.PIPE, text=True, env=env)
    line = server.stdout.readline() if server.stdout else ""
    started = re.search(r"advdetect serving .* on port (\d+), metrics on port (\d+)", line)
    if started is None:
        server.kill()
        sys.exit("[demo] the server did not start; its messages are above")
    print(f"[demo] {line.strip()}", flush=True)
    grpc_port, metrics_port = int(started[1]), int(started[2])
    rows = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = detector_pb2_grpc.DetectorStub(channel)
            rows.append(("clean",) + _send(stub, x, "clean"))
            for name, xa in adversarial.items():
                rows.append((name,) + _send(stub, xa, name))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    print()
    print(f"{'traffic':<16}{'requests':>9}{'adversarial':>13}{'likely_miscl.':>15}{'flag rate':>11}{'p50 ms':>9}")
    for name, flags, latencies in rows:
        n = len(flags)
        adv = sum("adversarial" in f for f in flags)
        mis = sum("likely_misclassified" in f for f in flags)
        rate = np.mean([bool(f) for f in flags]) if n else float("nan")
        print(f"{name:<16}{n:>9}{adv:>13}{mis:>15}{rate:>11.2f}{np.median(latencies) * 1e3:>9.1f}")
    flagged = [ln for ln in metrics.splitlines() if ln.startswith("advdetect_flags_total") and not ln.endswith(" 0.0")]
    print(f"\nflags counted by the server: {sum(float(ln.rsplit(' ', 1)[1]) for ln in flagged):.0f}; metrics were at "
          f"http://127.0.0.1:{metrics_port}/metrics, audit log of flagged inputs in {audit} "
          f"(`advdetect audit {audit}`). `make serve` keeps the server up.")


if __name__ == "__main__":
    main()
