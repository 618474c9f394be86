"""Hostile-traffic benchmark: malformed requests, stall probes, overload and SIGKILL at a real server.

A real ``advdetect serve`` process (digits CNN, default settings unless said) on 127.0.0.1 gets, from raw
gRPC channels (requests serialised once, bytes on the wire):

1. **malformed requests** (``--malformed``, default 100,000) of every kind in :func:`malformed_kinds`, round
   robin from 4 callers: status codes by kind, the INTERNAL and UNKNOWN counts, and the server's RSS before
   (after a warm-up of 2,000 malformed requests, and before any) and after;
2. **stall probes** (``--stall-seconds``): 4 callers send the heaviest requests the limits allow to fail
   (20,000 input entries, 600,000 dimensions, 16 MiB of garbage) while one caller per port checks health
   (``health_port`` and ``grpc_port``) and another sends valid requests, back to back: their p99 latencies
   and the largest health-check delay;
3. **overload**: a server with ``max_inflight_requests`` 4 (``workers`` at its default, 4); 4 callers
   first (the normal latency), 8 (the limit always full), then 64 callers, from :mod:`overload_client`
   (one thread, its own process), with a fixed and an exponential retry backoff: OK and RESOURCE_EXHAUSTED
   counts and the admitted calls' latency, in the client and in the server; health checks on both ports
   throughout;
4. **SIGKILL trials** (``--kills`` per mode): 4 callers send flagged inputs; the server is killed after
   ``--kill-after-s``; the answered flagged records missing from the audit log are counted, with how long
   before the kill each was answered. Default mode (``audit_flush_batch_size`` 8, interval 1 s) against
   the documented bound, and ``audit_sync``; the flagged requests' p50 latency of each mode is the cost
   of ``audit_sync``;
5. **where undecodable requests' memory goes**: a plain grpc server in this process, health service only,
   gets ``--leak-requests`` health checks that are not protobuf, parsed by grpc's generated deserializer
   (grpc answers INTERNAL) and by :class:`service.wire.RawRequestInterceptor`: RSS growth per request.

Every loop is bounded in count and time. The benchmark pins itself (every client) to the last CPU and each
server to the others (:data:`CLIENT_CPU`), so that client work does not slow the server; other jobs on the
machine still make latencies noisy. Results go to ``bench/results/hostile.md``.
Run: ``.venv/bin/python bench/hostile.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar
from pathlib import Path

import numpy as np

from common import ROOT, digits_cnn, start_server, write_result  # noqa: E402  (puts ROOT on sys.path)

from detector import load_dataset  # noqa: E402

DETECT = "/advdetect.v1.Detector/Detect"
STREAM = "/advdetect.v1.Detector/DetectStream"
INFER = "/inference.GRPCInferenceService/ModelInfer"
HEALTH = "/grpc.health.v1.Health/Check"
HOST = "127.0.0.1"
T = TypeVar("T")
#: The benchmark (every client, and the overload client's process) runs on this CPU and each server on the
#: others, so that latencies measure the server, not clients competing with it for the cores: in production
#: the clients run elsewhere. On one CPU both share it.
CLIENT_CPU = (os.cpu_count() or 1) - 1
SERVER_CPUS = set(range(CLIENT_CPU)) or {0}
#: A refused caller's wait before it tries again (as a client's retry policy would): without it, 60 client
#: threads retrying in a loop take the client process's interpreter lock from the admitted ones.


def _baseline(model: Path) -> Path:
    from detector.calibration import CalibrationConfig, calibrate

    baseline = ROOT / "build" / "baselines" / "digits_cnn"
    if not (baseline / "manifest.json").is_file():
        print("[hostile] calibrating digits_cnn ...", flush=True)
        calibrate(model, load_dataset("digits:calib"), baseline, CalibrationConfig(progress=False))
    return baseline


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# -- request kinds ---------------------------------------------------------------------------------


def malformed_kinds(x: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """Every kind of malformed request: name -> (method, serialised request)."""
    from service.protocol import detector_pb2 as d
    from service.protocol import oip_pb2 as o
    from service.tensors import tensor_to_proto

    rng = np.random.default_rng(0)
    good = tensor_to_proto(x[:2])

    def detect(**kw: object) -> tuple[str, bytes]:
        return DETECT, d.DetectRequest(**kw).SerializeToString()

    def infer(n_inputs: int = 1, datatype: str = "FP32", shape: tuple = (1, 1, 8, 8), raw: list[bytes] | None = None,
              names: list[str] | None = None, **kw: object) -> tuple[str, bytes]:
        request = o.ModelInferRequest(**kw)
        for i in range(n_inputs):
            request.inputs.add(name=(names or ["input"] * n_inputs)[i], datatype=datatype, shape=list(shape))
        request.raw_input_contents.extend(raw if raw is not None else [x[:1].tobytes()] * n_inputs)
        return INFER, request.SerializeToString()

    nan = x[:1].copy()
    nan[0, 0, 3, 3] = np.nan
    kinds = {
        "native wrong shape": detect(inputs=tensor_to_proto(np.zeros((1, 1, 28, 28), np.float32))),
        "native wrong dtype": detect(inputs=tensor_to_proto(x[:1].astype(np.float64))),
        "native byte count": detect(inputs=d.Tensor(data=good.data[:-4], shape=good.shape, dtype="float32")),
        "native garbage data": detect(inputs=d.Tensor(data=rng.bytes(37), shape=good.shape, dtype="float32")),
        "native NaN": detect(inputs=tensor_to_proto(nan)),
        "native empty batch": detect(inputs=d.Tensor(data=b"", shape=[0, 1, 8, 8], dtype="float32")),
        "native oversized batch": detect(inputs=tensor_to_proto(np.zeros((257, 1, 8, 8), np.float32))),
        "native unknown model": detect(inputs=good, model_name="resnet50"),
        "native huge model name": detect(inputs=good, model_name="m" * 100_000),
        "native huge dtype string": detect(inputs=d.Tensor(data=good.data, shape=good.shape, dtype="f" * 100_000)),
        "native 600k dimensions": detect(inputs=d.Tensor(data=good.data, shape=[1] * 600_000, dtype="float32")),
        "native int64-max dimensions": detect(inputs=d.Tensor(data=good.data, shape=[2**63 - 1] * 8, dtype="float32")),
        "native no inputs": detect(),
        "OIP wrong shape": infer(shape=(1, 1, 4, 4)),
        "OIP BYTES input": infer(datatype="BYTES", raw=[b"\x05\x00\x00\x00hello"], shape=(1, 1)),
        "OIP unknown datatype": infer(datatype="COMPLEX64"),
        "OIP byte count": infer(raw=[x[:1].tobytes()[:-1]]),
        "OIP duplicate inputs": infer(n_inputs=2),
        "OIP missing inputs": infer(n_inputs=0, raw=[]),
        "OIP raw count mismatch": infer(raw=[x[:1].tobytes()] * 2),
        "OIP unknown model": infer(model_name="resnet50"),
        "OIP unknown output": (INFER, _with_output(infer()[1], "nope")),
        "OIP huge id": infer(id="i" * 100_000),
        "OIP 1,000 inputs": infer(n_inputs=1000, names=[f"n{i}" for i in range(1000)]),
        "raw garbage Detect": (DETECT, rng.bytes(64)),
        "raw garbage ModelInfer": (INFER, b"\xff" * 5 + rng.bytes(59)),
        "raw garbage health": (HEALTH, b"\xff\xff\xff\xff\x0f" + rng.bytes(20)),
        "truncated protobuf": (INFER, infer()[1][:-7]),
    }
    return kinds


def _with_output(raw: bytes, name: str) -> bytes:
    from service.protocol import oip_pb2 as o

    request = o.ModelInferRequest.FromString(raw)
    request.outputs.add(name=name)
    return request.SerializeToString()


def stall_probes(x: np.ndarray) -> list[tuple[str, bytes]]:
    """The heaviest malformed requests: 20,000 inputs (430 kB), 600,000 dimensions, 16 MiB of garbage."""
    from service.protocol import detector_pb2 as d
    from service.protocol import oip_pb2 as o

    many = o.ModelInferRequest()
    many.inputs.extend(o.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 8, 8])
                       for _ in range(20_000))
    dims = d.DetectRequest(inputs=d.Tensor(data=x[:1].tobytes(), shape=[1] * 600_000, dtype="float32"))
    return [(INFER, many.SerializeToString()), (DETECT, dims.SerializeToString()),
            (DETECT, b"\xff" * 16 + os.urandom(16 * 2**20 - 64))]


def valid_request(x: np.ndarray) -> bytes:
    from service.protocol import oip_pb2 as o

    request = o.ModelInferRequest()
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(x[:1].tobytes())
    return request.SerializeToString()


# -- phases ----------------------------------------------------------------------------------------


def _code(call: Callable[[], object]) -> str:
    import grpc

    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def _send(port: int, kinds: dict[str, tuple[str, bytes]], total: int, callers: int = 4) -> dict[str, Counter]:
    """``total`` requests round robin over the kinds from ``callers`` threads; status codes by kind."""
    import grpc

    names = list(kinds)
    counts: dict[str, Counter] = {name: Counter() for name in names}
    lock = threading.Lock()

    def caller(k: int) -> None:
        local: dict[str, Counter] = {name: Counter() for name in names}
        with grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            calls = {name: channel.unary_unary(method) for name, (method, _) in kinds.items()}
            for i in range(k, total, callers):
                name = names[i % len(names)]
                local[name][_code(lambda: calls[name](kinds[name][1], timeout=30))] += 1
        with lock:
            for name in names:
                counts[name].update(local[name])

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def _stream_garbage(port: int, good: bytes) -> list[str]:
    """A DetectStream with a garbage message between two valid ones: each reply's outcome."""
    import grpc

    from service.protocol import detector_pb2 as d

    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        replies = channel.stream_stream(STREAM)(iter([good, b"\xff\xff\xff\xff\x0f junk", good]), timeout=30)
        return [grpc.StatusCode.INVALID_ARGUMENT.name if r.error.code else "OK"
                for r in map(d.DetectResponse.FromString, replies)]


def _timed_loop(port: int, method: str, payload: bytes, stop: threading.Event, out: list[float], codes: Counter) -> None:
    import grpc

    with grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = channel.unary_unary(method)
        while not stop.is_set() and len(out) < 100_000:
            t0 = time.perf_counter()
            codes[_code(lambda: call(payload, timeout=30))] += 1
            out.append(time.perf_counter() - t0)
            time.sleep(0.005)


def _watched(targets: dict[str, tuple[int, str, bytes]], during: Callable[[], T]) -> tuple[T, dict[str, dict]]:
    """Run ``during()`` while one caller per target sends its request back to back (5 ms apart, own
    connection); returns what ``during`` returned and, per target, its calls' status codes and latency
    quantiles (ms)."""
    stop = threading.Event()
    seen = {name: ([], Counter()) for name in targets}
    threads = [threading.Thread(target=_timed_loop, args=(*targets[name], stop, *seen[name])) for name in targets]
    for t in threads:
        t.start()
    try:
        result = during()
    finally:
        stop.set()
        for t in threads:
            t.join()
    stats = {}
    for name, (seconds, codes) in seen.items():
        ms = np.asarray(seconds) * 1e3
        stats[name] = {"n": ms.size, "codes": codes, "p50": np.median(ms), "p99": np.percentile(ms, 99), "max": ms.max()}
    return result, stats


def _watch_table(stats: dict[str, dict]) -> list[str]:
    """Markdown rows of :func:`_watched`'s statistics."""
    return ["| caller | calls | p50 ms | p99 ms | max ms | status codes |", "|---|---|---|---|---|---|",
            *(f"| {name} | {r['n']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | {dict(r['codes'])} |"
              for name, r in stats.items()), ""]


def _health_targets(port: int, health_port: int) -> dict[str, tuple[int, str, bytes]]:
    from grpc_health.v1 import health_pb2

    check = health_pb2.HealthCheckRequest(service="").SerializeToString()
    return {"health (health_port)": (health_port, HEALTH, check), "health (grpc_port)": (port, HEALTH, check)}


def _stall(port: int, health_port: int, x: np.ndarray, seconds: float) -> dict[str, dict]:
    """Stall probes from 4 callers for ``seconds`` while health checks (both ports) and valid requests are timed."""
    probes = stall_probes(x)
    targets = {**_health_targets(port, health_port), "valid ModelInfer": (port, INFER, valid_request(x)),
               **{f"stall probe {i}": (port, m, p) for i, (m, p) in enumerate(probes + probes[:1])}}
    _, stats = _watched(targets, lambda: time.sleep(seconds))
    return stats


def _pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus`` (threads started later inherit the mask)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def _serve(model: Path, baseline: Path, **settings: str) -> tuple[subprocess.Popen, int, int, int]:
    """:func:`common.start_server` with the server pinned to :data:`SERVER_CPUS`."""
    proc, port, metrics_port, health_port = start_server(model, baseline, **settings)
    _pin(proc.pid, SERVER_CPUS)
    return proc, port, metrics_port, health_port


def _overload_run(port: int, payload: bytes, callers: int, seconds: float, policy: str) -> dict:
    """One run of :mod:`overload_client` in a process of its own (on the benchmark's CPU): status codes and
    client-side p50/p99 (ms)."""
    import json

    with tempfile.NamedTemporaryFile(suffix=".bin") as request:
        request.write(payload)
        request.flush()
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("overload_client.py")), str(port),
                              str(callers), str(seconds), request.name, policy],
                             capture_output=True, text=True, check=True, timeout=seconds + 120)
    return json.loads(out.stdout)


def _server_buckets(metrics_port: int) -> dict[float, float]:
    """Cumulative bucket counts of ``advdetect_request_duration_seconds{method="ModelInfer"}``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10).read().decode()
    return {float(s.labels["le"]): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "advdetect_request_duration_seconds_bucket" and s.labels.get("method") == "ModelInfer"}


def _quantiles(before: dict[float, float], after: dict[float, float]) -> tuple[float, float]:
    """(p50, p99) in ms of the calls counted between two scrapes, interpolated linearly inside the bucket
    that holds each quantile, as PromQL's ``histogram_quantile`` does."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1]

    def quantile(q: float) -> float:
        lower, below = 0.0, 0.0
        for le, n in delta:
            if n >= q * total:
                return 1e3 * (lower + (le - lower) * (q * total - below) / max(n - below, 1e-12))
            lower, below = le, n
        return float("inf")

    return quantile(0.5), quantile(0.99)


def _kill_trial(model: Path, baseline: Path, x: np.ndarray, sync: bool, kill_after_s: float) -> dict:
    """Flagged traffic from 4 callers, SIGKILL, then compare the answered flagged inputs with the audit log."""
    import grpc

    from service.audit import AuditReader
    from service.protocol import detector_pb2 as d
    from service.tensors import tensor_to_proto

    folder = Path(tempfile.mkdtemp(prefix="advdetect-hostile-"))
    audit = folder / "audit.jsonl"
    proc, port, _, _ = _serve(model, baseline, log_level="ERROR", audit_log_path=str(audit), audit_flush_batch_size="8",
                              audit_flush_interval_s="1.0", audit_sync=str(sync).lower())
    noisy = np.clip(x[:2] + np.random.default_rng(1).normal(0, 0.7, x[:2].shape), 0, 1).astype(np.float32)
    answered: dict[str, tuple[int, float]] = {}
    latencies: list[float] = []
    lock = threading.Lock()

    def caller(k: int) -> None:
        with grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = channel.unary_unary(DETECT)
            for i in range(100_000):
                request = d.DetectRequest(inputs=tensor_to_proto(noisy), request_id=f"c{k}-{i}")
                t0 = time.perf_counter()
                try:
                    reply = d.DetectResponse.FromString(stub(request.SerializeToString(), timeout=30))
                except grpc.RpcError:
                    return
                done = time.monotonic()
                with lock:
                    answered[reply.request_id] = (sum(bool(r.flags) for r in reply.results), done)
                    latencies.append(done - t0)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(kill_after_s)
    proc.kill()
    killed_at = time.monotonic()
    proc.wait(timeout=30)
    for t in threads:
        t.join(timeout=60)
    stored = Counter(r["request_id"] for r in AuditReader(audit))
    shutil.rmtree(folder)
    lost = [(rid, n - stored[rid], max(0.0, killed_at - when)) for rid, (n, when) in answered.items() if stored[rid] < n]
    return {"answered_flagged": sum(n for n, _ in answered.values()), "lost": sum(n for _, n, _ in lost),
            "oldest_lost_s": max((age for _, _, age in lost), default=0.0),
            "p50_ms": float(np.median(latencies)) * 1e3 if latencies else float("nan")}


def _parse_failure_growth(raw: bool, n: int) -> tuple[Counter, float]:
    """A plain grpc server in this process (health only), with grpc's deserializer or with
    :class:`~service.wire.RawRequestInterceptor`: status codes of ``n`` undecodable health checks, and
    this process's RSS growth per check in bytes (after 2,000 of warm-up)."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from service.wire import RawRequestInterceptor

    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[RawRequestInterceptor()] if raw else [])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    codes: Counter = Counter()
    try:
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            call = channel.unary_unary(HEALTH)
            for i in range(2_000 + n):
                if i == 2_000:
                    before = _rss_mib(os.getpid())
                codes[_code(lambda: call(b"\xff\xff\xff\xff\x0f garbage", timeout=10))] += 1
            after = _rss_mib(os.getpid())
    finally:
        server.stop(None)
    return codes, (after - before) * 2**20 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--malformed", type=int, default=100_000, help="malformed requests of phase 1")
    parser.add_argument("--stall-seconds", type=float, default=10.0)
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILL trials per audit mode")
    parser.add_argument("--kill-after-s", type=float, default=3.0)
    parser.add_argument("--leak-requests", type=int, default=20_000, help="undecodable requests of phase 5")
    args = parser.parse_args()
    model = digits_cnn()[0]
    baseline = _baseline(model)
    _pin(os.getpid(), {CLIENT_CPU})
    x = load_dataset("digits:test").x[:8].astype(np.float32)
    kinds = malformed_kinds(x)
    lines = ["# Hostile traffic (bench/hostile.py)", "",
             f"`{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`, digits CNN. The benchmark's clients run on CPU "
             f"{CLIENT_CPU} and each server on CPU(s) {sorted(SERVER_CPUS)} of this {os.cpu_count()}-core machine, so "
             "that client work does not slow the server (in production the clients run elsewhere); other jobs on "
             f"the machine still share the CPUs (load average at the start: {os.getloadavg()[0]:.1f}).", ""]

    proc, port, _, health_port = _serve(model, baseline, log_level="ERROR")
    try:
        rss_start = _rss_mib(proc.pid)
        _send(port, kinds, 2_000)
        rss_warm = _rss_mib(proc.pid)
        t0 = time.perf_counter()
        counts = _send(port, kinds, args.malformed)
        elapsed = time.perf_counter() - t0
        rss_end = _rss_mib(proc.pid)
        stream = _stream_garbage(port, _detect_bytes(x))
        stall = _stall(port, health_port, x, args.stall_seconds)
        rss_stall = _rss_mib(proc.pid)
    finally:
        _stop(proc)
    total = Counter()
    for c in counts.values():
        total.update(c)
    lines += [f"## 1. {args.malformed:,} malformed requests ({elapsed:.0f} s, 4 callers), after 2,000 of warm-up", "",
              "| kind | status codes |", "|---|---|"]
    lines += [f"| {name} | {', '.join(f'{k} {v:,}' for k, v in sorted(c.items()))} |" for name, c in counts.items()]
    lines += ["", f"All: {', '.join(f'{k} {v:,}' for k, v in sorted(total.items()))}. "
              f"**INTERNAL {total['INTERNAL']}, UNKNOWN {total['UNKNOWN']}.**",
              f"DetectStream with a garbage message between two valid ones: replies {stream}.", "",
              f"Server RSS: {rss_start:.1f} MiB at start, {rss_warm:.1f} MiB after the warm-up, {rss_end:.1f} MiB "
              f"after the {args.malformed:,} requests (**{100 * (rss_end / rss_warm - 1):+.2f} %** over them), "
              f"{rss_stall:.1f} MiB after the stall phase.", "",
              f"## 2. Stall probes ({args.stall_seconds:.0f} s)", "",
              "4 callers send 20,000-input ModelInfer requests (two of them), 600,000-dimension shapes and 16 MiB "
              "of garbage, back to back; one caller checks health on each port (`health_port`, the health-only "
              "server probes use, and `grpc_port`) and one sends valid single-input requests (each pausing 5 ms "
              "between calls).", ""]
    probes = Counter()
    for name in [n for n in stall if n.startswith("stall probe")]:
        probes.update(stall.pop(name)["codes"])
    lines += _watch_table(stall) + [f"Stall probes: {sum(probes.values())} calls, {dict(probes)}.", ""]

    proc, port, metrics_port, health_port = _serve(model, baseline, log_level="ERROR", max_inflight_requests="4")
    runs = []

    def overload() -> None:
        for callers, policy, seconds in ((4, "fixed", args.overload_seconds / 2), (8, "fixed", args.overload_seconds / 2),
                                         (64, "fixed", args.overload_seconds), (64, "exponential", args.overload_seconds)):
            before = _server_buckets(metrics_port)
            run = _overload_run(port, valid_request(x), callers, seconds, policy)
            run["server"] = _quantiles(before, _server_buckets(metrics_port))
            runs.append((callers, policy, run))

    try:
        _, overload_health = _watched(_health_targets(port, health_port), overload)
    finally:
        _stop(proc)
    lines += ["## 3. Overload: `max_inflight_requests` 4, `workers` 4 (default)", "",
              f"Closed loop of valid single-input requests from `bench/overload_client.py`: the callers are coroutines "
              "of one thread in a process of their own. A refused "
              "caller waits before it tries again: `fixed` 20 ms each time (an impatient client); `exponential` "
              "gRPC's retry backoff (gRFC A6: uniform in [0, min(20 ms * 2^(n-1), 1 s)] after the n-th refusal "
              "in a row). With 4 callers the server is at its limit only part of the time (each caller's round trip "
              "leaves a gap); with 8 it is at its limit nearly always, as with 64.", "",
              "Admitted calls' latency seen by the clients, and in the server from admission to response "
              "(`advdetect_request_duration_seconds`, interpolated within its buckets as PromQL's "
              "`histogram_quantile` does).", "",
              "| callers | backoff | status codes | client p50 ms | client p99 ms | server p50 ms | server p99 ms |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {policy} | {r['codes']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['server'][0]:.1f} | "
              f"{r['server'][1]:.1f} |" for n, policy, r in runs]
    lines += ["", "Health checks on each port during all four runs (one caller per port, 5 ms between calls):", ""]
    lines += _watch_table(overload_health)

    lines += ["## 4. SIGKILL with flagged traffic (4 callers, batch 8, interval 1 s, killed after "
              f"{args.kill_after_s:g} s)", "",
              "| mode | trial | flagged inputs answered | lost | oldest lost answered before the kill (s) | "
              "flagged request p50 ms |", "|---|---|---|---|---|---|"]
    for sync in (False, True):
        for trial in range(args.kills):
            r = _kill_trial(model, baseline, x, sync, args.kill_after_s)
            lines.append(f"| {'audit_sync' if sync else 'default'} | {trial + 1} | {r['answered_flagged']} | "
                         f"{r['lost']} | {r['oldest_lost_s']:.3f} | {r['p50_ms']:.2f} |")
    lines += ["", "The documented bound (README, Serving): without `audit_sync`, the records answered within the last "
              "`audit_flush_interval_s` (1 s here) plus one write and fsync before the kill; with it, none."]
    lines += ["", f"## 5. Where undecodable requests' memory went ({args.leak_requests:,} health checks per row)", "",
              "A plain grpc server in the benchmark's process with only the health service; the request is not "
              "protobuf.", "", "| parsed by | status codes | RSS growth per request (bytes) |", "|---|---|---|"]
    for raw in (False, True):
        codes, growth = _parse_failure_growth(raw, args.leak_requests)
        lines.append(f"| {'RawRequestInterceptor' if raw else 'grpc (generated deserializer)'} | {dict(codes)} | "
                     f"{growth:,.0f} |")
    write_result("hostile.md", lines)


def _detect_bytes(x: np.ndarray) -> bytes:
    from service.protocol import detector_pb2 as d
    from service.tensors import tensor_to_proto

    return d.DetectRequest(inputs=tensor_to_proto(x[:1])).SerializeToString()


if __name__ == "__main__":
    main()
