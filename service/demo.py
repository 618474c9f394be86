"""``make demo``: serve the digits CNN, then LeNet-5, send clean then adversarial traffic, print what was flagged.

Steps, for each demo model (:data:`DEMO_MODELS`: the embedded 8x8 digits CNN, then LeNet-5 on the 28x28 MNIST
digits the repository carries): build the model and its baseline if missing; start ``advdetect serve`` in a
child process; send clean test digits one request each, then adversarial versions of the same digits made by
the attack suite (FGSM, foreground PGD, DeepFool, CW with kappa = 10; the Adversarial Robustness Toolbox on the
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
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from detector import load_dataset
from service.protocol import detector_pb2, detector_pb2_grpc
from service.tensors import tensor_to_proto

ATTACKS = ("fgsm", "pgd_foreground", "deepfool", "cw_k10")


@dataclass(frozen=True)
class DemoModel:
    """A model the demo serves: ``<models>/<name>.onnx``, its baseline ``<baselines>/<name>``, its data specs."""

    name: str
    calibration: str
    test: str
    about: str


DEMO_MODELS = (
    DemoModel("digits_cnn", "digits:calib", "digits:test", "the embedded digits CNN (8x8 digits)"),
    DemoModel("lenet5", "mnist:calib", "mnist:test", "LeNet-5 (28x28 MNIST digits)"),
)


def ensure_artifacts(models: Path, baselines: Path) -> None:
    """Train the demo models and calibrate their baselines unless they exist."""
    if not (models / "digits_cnn.onnx").is_file():
        from detector.offline.demo_models import build_demo_models

        print("[demo] training the embedded digits models ...", flush=True)
        build_demo_models(models)
    if not (models / "lenet5.onnx").is_file():
        from detector.offline.demo_models import build_lenet5

        print("[demo] training LeNet-5 on mnist:train ...", flush=True)
        build_lenet5(models)
    for demo in DEMO_MODELS:
        if not (baselines / demo.name / "manifest.json").is_file():
            from detector.calibration import CalibrationConfig, calibrate

            print(f"[demo] calibrating the {demo.name} baseline on {demo.calibration} ...", flush=True)
            calibrate(models / f"{demo.name}.onnx", load_dataset(demo.calibration), baselines / demo.name,
                      CalibrationConfig(progress=True))


def _send(stub: detector_pb2_grpc.DetectorStub, x: np.ndarray, tag: str) -> tuple[list[list[str]], list[float]]:
    flags, latencies = [], []
    for i in range(len(x)):
        t0 = time.perf_counter()
        response = stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(x[i : i + 1]), request_id=f"{tag}-{i}"))
        latencies.append(time.perf_counter() - t0)
        flags.append([f.name for f in response.results[0].flags])
    return flags, latencies


def run_demo(demo: DemoModel, models: Path, baselines: Path, n: int, ports: tuple[int, int, int]) -> None:
    """Attack ``n`` test digits, serve ``demo``'s model, send clean then adversarial traffic, print the table."""
    import torch

    from detector.offline.attacks import load_torch_classifier, round_to_grid, run_attack

    torch.set_num_threads(1)
    test = load_dataset(demo.test)
    x, y = round_to_grid(test.x[:n]), test.y[:n]
    model = load_torch_classifier(models / f"{demo.name}.onnx")
    print(f"\n[demo] {demo.about}: attacking {len(x)} test digits with {', '.join(ATTACKS)} ...", flush=True)
    adversarial = {}
    for name in ATTACKS:
        result = run_attack(name, model, x, y)
        adversarial[name] = result.x_adv[result.success]

    audit = Path("build") / f"demo-audit-{demo.name}.jsonl"
    env = {**os.environ, "ADVDETECT_GRPC_HOST": "127.0.0.1", "ADVDETECT_METRICS_HOST": "127.0.0.1",
           "ADVDETECT_AUDIT_LOG_PATH": str(audit)}
    grpc_port, metrics_port, health_port = ports
    server = subprocess.Popen([sys.executable, "-m", "detector.cli", "serve", "--model", str(models / f"{demo.name}.onnx"),
                               "--baseline", str(baselines / demo.name), "--grpc-port", str(grpc_port),
                               "--metrics-port", str(metrics_port), "--health-port", str(health_port)],
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

    print(f"\n{demo.about}, default 1 % FPR")
    print(f"{'traffic':<16}{'requests':>9}{'adversarial':>13}{'likely_miscl.':>15}{'flag rate':>11}{'p50 ms':>9}")
    for name, flags, latencies in rows:
        count = len(flags)
        adv = sum("adversarial" in f for f in flags)
        mis = sum("likely_misclassified" in f for f in flags)
        rate = np.mean([bool(f) for f in flags]) if count else float("nan")
        print(f"{name:<16}{count:>9}{adv:>13}{mis:>15}{rate:>11.2f}{np.median(latencies) * 1e3:>9.1f}")
    flagged = [ln for ln in metrics.splitlines() if ln.startswith("advdetect_flags_total") and not ln.endswith(" 0.0")]
    print(f"\nflags counted by the server: {sum(float(ln.rsplit(' ', 1)[1]) for ln in flagged):.0f}; metrics were at "
          f"http://127.0.0.1:{metrics_port}/metrics, audit log of flagged inputs in {audit} "
          f"(`advdetect audit {audit}`).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="build/models")
    parser.add_argument("--baselines", default="build/baselines", help="one baseline folder per demo model")
    parser.add_argument("--n", type=int, default=100, help="clean inputs sent (and attacked) per model")
    parser.add_argument("--grpc-port", type=int, default=0, help="default 0: any free port")
    parser.add_argument("--metrics-port", type=int, default=0, help="default 0: any free port")
    parser.add_argument("--health-port", type=int, default=0, help="default 0: any free port")
    args = parser.parse_args()
    models, baselines = Path(args.models), Path(args.baselines)
    ensure_artifacts(models, baselines)
    for demo in DEMO_MODELS:
        run_demo(demo, models, baselines, args.n, (args.grpc_port, args.metrics_port, args.health_port))
    print("\n`make serve` keeps the digits CNN's server up.")


if __name__ == "__main__":
    main()
