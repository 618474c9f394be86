"""Load benchmark: a closed-loop gRPC client against a real ``advdetect serve`` process.

For the digits CNN and LeNet-5 (28x28, MNIST), the server runs in its own process(es) on a loopback port
(``--processes``, default: one per core, sharing the port); N client threads, each on its own connection,
send single-input Open Inference Protocol ``ModelInfer`` requests back to back for a fixed time, in two
modes in the same run:

- detection on: every output (flags, adversarial score, p-values): the whole pipeline;
- detection off: only ``predicted_class``: the ONNX Runtime pass alone.

The client and the server share the machine's 2 cores, so the callers send requests serialised once before
the clock starts, on raw gRPC channels: per call the client does no protobuf work (tritonclient builds and
parses each message in Python, which takes a large share of a core; the tests exercise tritonclient itself).

Reported per mode: requests, throughput (requests/s), p50 and p99 latency (ms), and the ratios; several
callers measure throughput. The latency detection adds to a single request is measured by one caller
alternating detection-on and detection-off requests, so that both modes meet the same phase of a shared
machine's speed (two separate-run measurements of the same code gave 3.36 and 3.56 ms for LeNet-5). Last, the
cost of ``audit_sync`` (a durable audit record before each flagged response): flagged traffic against the digits
CNN with the audit log on, without and with it. Results go to ``bench/results/load.md``.
Run: ``make bench`` or ``.venv/bin/python bench/load.py [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import ROOT, digits_cnn, lenet5, start_server, write_result  # noqa: E402  (puts ROOT on sys.path)

from detector import load_dataset  # noqa: E402
from detector.data import mnist_split  # noqa: E402

BASELINES = ROOT / "build" / "baselines"


def _prepare() -> dict[str, tuple[Path, Path, np.ndarray]]:
    """(model, baseline, inputs) per model; trains and calibrates what is missing."""
    from detector.calibration import CalibrationConfig, calibrate

    mnist = mnist_split()
    jobs = {"digits_cnn": (digits_cnn()[0], load_dataset("digits:calib"), load_dataset("digits:test").x),
            "lenet5": (lenet5()[0], mnist["calib"], mnist["test"].x[:500])}
    out = {}
    for name, (model, calib, inputs) in jobs.items():
        baseline = BASELINES / name
        if not (baseline / "manifest.json").is_file():
            print(f"[load] calibrating {name} ...", flush=True)
            calibrate(model, calib, baseline, CalibrationConfig(progress=False))
        out[name] = (model, baseline, inputs)
    return out


def _requests(model_name: str, inputs: np.ndarray, detection: bool) -> list[bytes]:
    """Serialised single-input ``ModelInfer`` requests, one per input, built once before the clock starts."""
    from service._generated.inference import grpc_service_pb2 as oip

    out = []
    for x in inputs:
        request = oip.ModelInferRequest(model_name=model_name)
        request.inputs.add(name="input", datatype="FP32", shape=[1, *x.shape])
        request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
        if not detection:
            request.outputs.add(name="predicted_class")
        out.append(request.SerializeToString())
    return out


def _check_outputs(port: int, model_name: str, inputs: np.ndarray) -> None:
    """The two request kinds get what they ask for: every detection output, or the class alone."""
    import grpc

    from service._generated.inference import grpc_service_pb2 as oip

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for detection in (True, False):
            reply = oip.ModelInferResponse.FromString(infer(_requests(model_name, inputs[:1], detection)[0], timeout=60))
            names = {o.name for o in reply.outputs}
            if ("adversarial_score" in names) != detection or "predicted_class" not in names:
                raise RuntimeError(f"unexpected outputs with detection={detection}: {sorted(names)}")


def _run(port: int, model_name: str, inputs: np.ndarray, callers: int, seconds: float, detection: bool) -> dict:
    """Closed loop: each caller sends the next request as soon as the previous answer arrives.

    The callers send pre-serialised requests on a raw channel (no client-side protobuf work per call),
    so the load generator takes as little as possible of the cores it shares with the server. Each
    caller has its own connection (a local subchannel pool; grpc otherwise shares one connection among
    channels to the same address), as independent clients would: with several server processes, the
    kernel balances connections, not requests.
    """
    import grpc

    requests = _requests(model_name, inputs, detection)
    latencies: list[list[float]] = [[] for _ in range(callers)]
    errors = [0] * callers
    stop_at = time.perf_counter() + seconds

    def caller(k: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
            i = k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    infer(requests[i % len(requests)], timeout=30)
                    latencies[k].append(time.perf_counter() - t0)
                except grpc.RpcError:  # counted, not hidden
                    errors[k] += 1
                i += callers

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


def _alternating(port: int, model_name: str, inputs: np.ndarray, seconds: float) -> dict:
    """One caller alternating detection-on and detection-off requests: the latency detection adds, paired in time.

    Separate on and off runs can land in different phases of a shared machine's speed; alternating puts
    every on request next to an off one. Returns the p50 of each mode and their difference.
    """
    import grpc

    requests = {mode: _requests(model_name, inputs, mode) for mode in (True, False)}
    latencies: dict[bool, list[float]] = {True: [], False: []}
    stop_at = time.perf_counter() + seconds
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        i = 0
        while time.perf_counter() < stop_at:
            for mode in (True, False):
                t0 = time.perf_counter()
                infer(requests[mode][i % len(inputs)], timeout=30)
                latencies[mode].append(time.perf_counter() - t0)
            i += 1
    on, off = (float(np.median(latencies[m]) * 1e3) for m in (True, False))
    return {"pairs": i, "on_p50_ms": on, "off_p50_ms": off, "added_p50_ms": on - off}


def _audit_cost(model: Path, baseline: Path, inputs: np.ndarray, callers: int, seconds: float) -> dict[bool, dict]:
    """Flagged traffic with the audit log on, without and with ``audit_sync``: the cost of a durable record.

    The inputs are digits with Gaussian noise of sd 0.7, clipped to [0, 1]: nearly all of them are flagged
    (``flagged_share``: audit records per request), and with ``audit_sync`` each flagged response waits for
    its record's write and fsync. One server process.
    """
    import tempfile

    noisy = np.clip(inputs + np.random.default_rng(0).normal(0, 0.7, inputs.shape), 0, 1).astype(np.float32)
    out = {}
    for sync in (False, True):
        with tempfile.TemporaryDirectory(prefix="advdetect-load-") as folder:
            proc, port, _, _ = start_server(model, baseline, workers="4", processes="1", max_inflight_requests="256",
                                         audit_log_path=str(Path(folder) / "audit.jsonl"), audit_sync=str(sync).lower())
            try:
                warm = _run(port, "digits_cnn", noisy, 1, 1.0, True)
                out[sync] = _run(port, "digits_cnn", noisy, callers, seconds, True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            from service.audit import AuditReader

            records = sum(1 for _ in AuditReader(Path(folder) / "audit.jsonl"))
        out[sync]["flagged_share"] = records / (warm["requests"] + out[sync]["requests"])
        print(f"[load] audit_sync={sync}: {out[sync]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers of the throughput runs")
    parser.add_argument("--workers", type=int, default=4, help="server worker threads per process")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="server processes (default: cores)")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    rows, paired = [], {}
    prepared = _prepare()
    for name, (model, baseline, inputs) in prepared.items():
        proc, port, _, _ = start_server(model, baseline, workers=str(args.workers), processes=str(args.processes),
                                  max_inflight_requests="256")
        try:
            _check_outputs(port, name, inputs)
            _run(port, name, inputs, 1, 1.0, True)  # warm-up
            for callers in (1, args.callers):
                on = _run(port, name, inputs, callers, args.seconds, True)
                off = _run(port, name, inputs, callers, args.seconds, False)
                rows.append((name, callers, on, off))
                print(f"[load] {name} callers={callers}: on {on}, off {off}", flush=True)
            paired[name] = _alternating(port, name, inputs, args.seconds)
            print(f"[load] {name} alternating on/off: {paired[name]}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    lines = ["# Load benchmark", "",
             f"`bench/load.py --seconds {args.seconds:g} --callers {args.callers} --workers {args.workers} "
             f"--processes {args.processes}` on "
             f"{platform.machine()}, {os.cpu_count()} cores (client and server share them; load average "
             f"{load_at_start:.1f} at the start: above 0.5, other jobs shared the machine), Python "
             f"{platform.python_version()}. Single-input Open Inference Protocol requests, closed loop.", "",
             "| model | callers | detection | requests | errors | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for name, callers, on, off in rows:
        for mode, r in (("on", on), ("off", off)):
            lines.append(f"| {name} | {callers} | {mode} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | "
                         f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    lines += ["", "| model | callers | p50 added by detection (ms) | throughput on / off |", "|---|---|---|---|"]
    for name, callers, on, off in rows:
        lines.append(f"| {name} | {callers} | {on['p50_ms'] - off['p50_ms']:.2f} | {on['rps'] / off['rps']:.2f} |")
    lines += ["", "Latency added by detection to a single-input request, one caller alternating detection-on and "
              "detection-off requests (each pair back to back, so both modes see the same machine):", "",
              "| model | pairs | p50 on ms | p50 off ms | p50 added by detection (ms) |", "|---|---|---|---|---|"]
    for name, r in paired.items():
        lines.append(f"| {name} | {r['pairs']} | {r['on_p50_ms']:.2f} | {r['off_p50_ms']:.2f} | {r['added_p50_ms']:.2f} |")
    audit = _audit_cost(*prepared["digits_cnn"], args.callers, args.seconds)
    lines += ["", f"Cost of `audit_sync` (digits CNN, one server process, {args.callers} callers, inputs: digits with "
              "Gaussian noise of sd 0.7, nearly all flagged (records / requests); the audit log on, batch 64, interval 1 s; with `audit_sync` each "
              "flagged response waits for its record's write and fsync):", "",
              "| audit_sync | requests | records / requests | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for sync, r in audit.items():
        lines.append(f"| {'on' if sync else 'off'} | {r['requests']} | {r['flagged_share']:.2f} | {r['rps']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    write_result("load.md", lines)


if __name__ == "__main__":
    main()
