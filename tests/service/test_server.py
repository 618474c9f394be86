"""The real server on loopback ports: native API, Open Inference Protocol via tritonclient, health, reflection,
metrics scraped over HTTP, bad inputs, TLS, SIGTERM drain and SIGKILL audit recovery."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from detector import BaselineError, load_dataset
from service.audit import AuditReader
from service.protocol import detector_pb2, detector_pb2_grpc, oip_pb2, oip_pb2_grpc
from service.server import create_server
from service.settings import SettingsError, load_settings
from service.tensors import tensor_to_proto


def _settings(demo_models: Path, baseline: Path, **extra):
    return load_settings(None, model_path=demo_models / "digits_cnn.onnx", baseline_path=baseline, grpc_port=0,
                         metrics_port=0, health_port=0, grpc_host="127.0.0.1", metrics_host="127.0.0.1", **extra)


@pytest.fixture(scope="module")
def server(demo_models, cnn_baseline, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    running = create_server(_settings(demo_models, cnn_baseline[0], audit_log_path=audit,
                                      audit_flush_interval_s=0.05))
    yield running
    running.stop(grace_s=1)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield detector_pb2_grpc.DetectorStub(channel)


def _scrape(server) -> dict[tuple[str, tuple], float]:
    return _scrape_url(server.metrics_server.url)


def _scrape_url(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _flags_sum(metrics: dict, flag: str) -> float:
    return sum(v for (name, labels), v in metrics.items()
               if name == "advdetect_flags_total" and dict(labels).get("flag") == flag)


def test_clean_and_adversarial_traffic_move_the_counters(server, stub, demo_models):
    from detector.offline.attacks import load_torch_classifier, run_attack

    test = load_dataset("digits:test")
    clean_x, clean_y = test.x[:64], test.y[:64]
    adv = run_attack("fgsm", load_torch_classifier(demo_models / "digits_cnn.onnx"), clean_x, clean_y)
    before = _scrape(server)
    clean = stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(clean_x), request_id="clean-1"))
    mid = _scrape(server)
    attacked = stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(adv.x_adv), request_id="adv-1"))
    after = _scrape(server)

    assert clean.request_id == "clean-1" and len(clean.results) == 64
    assert np.mean([r.predicted_class == y for r, y in zip(clean.results, clean_y)]) > 0.95
    clean_rate = np.mean([any(f.name == "adversarial" for f in r.flags) for r in clean.results])
    adv_rate = np.mean([any(f.name == "adversarial" for f in r.flags) for r in attacked.results])
    assert clean_rate <= 0.1 and adv_rate >= 0.8, (clean_rate, adv_rate)
    assert mid[("advdetect_inputs_total", ())] - before[("advdetect_inputs_total", ())] == 64
    assert after[("advdetect_inputs_total", ())] - mid[("advdetect_inputs_total", ())] == 64
    assert _flags_sum(after, "adversarial") - _flags_sum(mid, "adversarial") == round(adv_rate * 64)
    ok = ("advdetect_requests_total", (("code", "OK"), ("method", "Detect")))
    assert after[ok] - before[ok] == 2
    stage = ("advdetect_stage_duration_seconds_count", (("stage", "topology"),))
    assert after[stage] - before[stage] == 2
    assert after[("advdetect_baseline_info", (("model_sha256", server.core.detector.model.sha256),
                                              ("version", server.core.detector.version)))] == 1.0
    flagged = next(r.flags[0] for r in attacked.results if r.flags)
    assert flagged.reasons and all(" p=" in r for r in flagged.reasons)
    # the audit log receives the flagged inputs of the adversarial request
    server.audit.flush(timeout_s=5)
    records = [r for r in AuditReader(server.settings.audit_log_path) if r["request_id"] == "adv-1"]
    assert len(records) == round(adv_rate * 64)
    assert all("adversarial" in r["flags"] and r["reasons"]["adversarial"] for r in records)


def test_tritonclient_calls_the_open_inference_protocol(server):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits_cnn")
    meta = client.get_model_metadata("digits_cnn")
    assert meta.inputs[0].name == "input" and list(meta.inputs[0].shape) == [-1, 1, 8, 8]
    assert [o.name for o in meta.outputs] == ["logits", "probabilities", "predicted_class", "adversarial_score",
                                              "flags", "p_values"]
    x = load_dataset("digits:test").x[:5]
    noisy = np.clip(x + np.random.default_rng(0).normal(0, 0.6, x.shape), 0, 1).astype(np.float32)
    batch = np.concatenate([x, noisy])
    inp = triton.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    result = client.infer("digits_cnn", [inp], request_id="triton-1")
    assert result.get_response().id == "triton-1"
    predicted = result.as_numpy("predicted_class")
    logits = result.as_numpy("logits")
    assert predicted.shape == (10,) and (predicted == logits.argmax(1)).all()
    score = result.as_numpy("adversarial_score")
    assert score[5:].mean() > score[:5].mean()
    flags = [f.decode() for f in result.as_numpy("flags")]
    assert sum("adversarial" in f for f in flags[5:]) >= 4 and sum("adversarial" in f for f in flags[:5]) <= 1
    assert result.as_numpy("p_values").shape == (10, len(server.core.detector.score_names))
    before = _scrape(server)
    only = client.infer("digits_cnn", [inp], outputs=[triton.InferRequestedOutput("predicted_class")])
    after = _scrape(server)
    assert only.as_numpy("logits") is None and (only.as_numpy("predicted_class") == predicted).all()
    topology = ("advdetect_stage_duration_seconds_count", (("stage", "topology"),))
    assert after[topology] == before[topology]  # prediction-only requests skip detection
    assert after[("advdetect_inputs_total", ())] - before[("advdetect_inputs_total", ())] == 10
    with pytest.raises(triton.InferenceServerException, match="not served here"):
        client.get_model_metadata("resnet50")


def test_health_and_reflection(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "advdetect.v1.Detector", "inference.GRPCInferenceService"):
            status = health_stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"advdetect.v1.Detector", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_baseline_info(stub, server):
    info = stub.GetBaselineInfo(detector_pb2.GetBaselineInfoRequest())
    assert info.model_name == "digits_cnn" and info.num_classes == 10 and list(info.input_shape) == [-1, 1, 8, 8]
    assert info.baseline_version == server.core.detector.version and "adversarial" in info.flags
    assert "adversarial@fpr=0.01" in info.thresholds


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_every_bad_input_gets_a_clear_status_and_the_server_keeps_serving(stub):
    x = load_dataset("digits:test").x[:2]
    good = tensor_to_proto(x)

    def detect(tensor, **kw):
        return lambda: stub.Detect(detector_pb2.DetectRequest(inputs=tensor, **kw))

    cases = {
        "shape": (detect(tensor_to_proto(np.zeros((1, 1, 28, 28), np.float32))), grpc.StatusCode.INVALID_ARGUMENT,
                  "expected shape [N, 1, 8, 8], got [1, 1, 28, 28]"),
        "dtype": (detect(tensor_to_proto(x.astype(np.float64))), grpc.StatusCode.INVALID_ARGUMENT,
                  "expected dtype float32, got float64"),
        "bytes": (detect(detector_pb2.Tensor(data=good.data[:-4], shape=good.shape, dtype="float32")),
                  grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
        "nan": (detect(tensor_to_proto(np.where(np.arange(128).reshape(x.shape) == 5, np.nan, x).astype(np.float32))),
                grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        "empty": (detect(detector_pb2.Tensor(data=b"", shape=[0, 1, 8, 8], dtype="float32")),
                  grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        "garbage": (detect(detector_pb2.Tensor(data=b"\x00\xffgarbage", shape=[1, 1, 8, 8], dtype="float32")),
                    grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
        "unknown dtype": (detect(detector_pb2.Tensor(data=good.data, shape=good.shape, dtype="complex64")),
                          grpc.StatusCode.INVALID_ARGUMENT, "complex64"),
        "model": (detect(good, model_name="resnet50"), grpc.StatusCode.NOT_FOUND, "'resnet50' is not served here"),
    }
    for name, (call, code, text) in cases.items():
        got_code, details = _code(call)
        assert got_code == code, (name, got_code, details)
        assert text in details, (name, details)
    assert len(stub.Detect(detector_pb2.DetectRequest(inputs=good)).results) == 2  # still serving


def test_detect_stream_reports_a_bad_message_and_goes_on(stub):
    x = load_dataset("digits:test").x[:3]
    requests = [detector_pb2.DetectRequest(inputs=tensor_to_proto(x), request_id="s1"),
                detector_pb2.DetectRequest(inputs=tensor_to_proto(np.zeros((1, 1, 4, 4), np.float32)), request_id="s2"),
                detector_pb2.DetectRequest(inputs=tensor_to_proto(x[:1]), request_id="s3")]
    responses = list(stub.DetectStream(iter(requests)))
    assert [r.request_id for r in responses] == ["s1", "s2", "s3"]
    assert len(responses[0].results) == 3 and len(responses[2].results) == 1
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "expected shape" in responses[1].error.message


def test_an_expired_deadline_is_refused(stub):
    x = load_dataset("digits:test").x[:256]
    code, _ = _code(lambda: stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(x)), timeout=0.001))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_population_window_metrics_are_published(server, stub):
    x = load_dataset("digits:test").x
    for start in range(0, 256, 64):
        stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(x[start : start + 64])))
    deadline = time.time() + 10
    while time.time() < deadline:
        m = _scrape(server)
        if np.isfinite(m[("advdetect_population_anomaly_score", ())]):
            break
        time.sleep(0.2)
    assert 0.0 <= m[("advdetect_window_flag_ratio", ())] <= 1.0
    assert np.isfinite(m[("advdetect_population_anomaly_score", ())]) and m[("advdetect_population_anomaly_score", ())] >= 0


def test_the_population_window_holds_the_node_values_and_flags_of_the_last_inputs(server, stub):
    """Requests only record activations; the window's node values are computed later, in one batch, and must
    be those of the last inputs, in order, however the batches fall (pending batches beyond the window dropped)."""
    x = load_dataset("digits:test").x
    batches = [x[0:100], x[100:107], x[107:307], x[307:367]]  # 367 inputs: the first two batches leave the window
    flagged = []
    for batch in batches:
        response = stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(batch)))
        flagged += [bool(r.flags) for r in response.results]
    core = server.core
    ratio, score = core.window_statistics()
    population = core.detector.population
    nodes = np.concatenate([population.node_values(core.detector.classify(b).activations) for b in batches])
    assert ratio == np.mean(flagged[-core.window_size:])
    assert score == population.score(nodes[-core.window_size:][-population.window_size:])

def test_tls_with_a_ca_made_in_the_test(demo_models, cnn_baseline, tls_files):
    settings = _settings(demo_models, cnn_baseline[0], tls_cert_path=tls_files.server_cert,
                         tls_key_path=tls_files.server_key)
    running = create_server(settings)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_files.ca_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{running.port}", creds) as channel:
            info = detector_pb2_grpc.DetectorStub(channel).GetBaselineInfo(detector_pb2.GetBaselineInfoRequest())
            assert info.model_name == "digits_cnn"
        with grpc.insecure_channel(f"localhost:{running.port}") as channel:  # plaintext is refused
            code, _ = _code(lambda: detector_pb2_grpc.DetectorStub(channel).GetBaselineInfo(
                detector_pb2.GetBaselineInfoRequest(), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace_s=0)


def test_a_mismatched_or_corrupt_baseline_refuses_to_start(demo_models, cnn_baseline, tmp_path):
    with pytest.raises(BaselineError, match="calibrate a baseline for this model"):
        create_server(load_settings(None, model_path=demo_models / "digits_mlp.onnx", baseline_path=cnn_baseline[0],
                                    grpc_port=0, metrics_port=0, health_port=0))
    (tmp_path / "manifest.json").write_text("{broken")
    proc = subprocess.run([sys.executable, "-m", "detector.cli", "serve", "--model", str(demo_models / "digits_cnn.onnx"),
                           "--baseline", str(tmp_path), "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "corrupt: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "detector.cli", "serve", "--model", str(demo_models / "digits_cnn.onnx"),
                           "--baseline", str(tmp_path), "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0",
                           "--processes", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "corrupt: not valid JSON" in proc.stderr, proc.stderr  # a worker's error


def test_a_port_in_use_refuses_to_start(demo_models, cnn_baseline, server):
    with pytest.raises(SettingsError, match="cannot listen on 127.0.0.1.*grpc_port in use"):
        create_server(_settings(demo_models, cnn_baseline[0]).model_copy(update={"grpc_port": server.port}))
    with pytest.raises(SettingsError, match="cannot listen on 127.0.0.1.*health_port in use"):
        create_server(_settings(demo_models, cnn_baseline[0]).model_copy(update={"health_port": server.health_port}))


def _start_subprocess_server(demo_models, baseline, tmp_path, *extra_env) -> tuple[subprocess.Popen, int, int]:
    """``advdetect serve`` in a subprocess: (process, gRPC port, metrics port) once it is ready."""
    env = {**os.environ, "ADVDETECT_GRPC_HOST": "127.0.0.1", "ADVDETECT_METRICS_HOST": "127.0.0.1",
           "ADVDETECT_GRACE_PERIOD_S": "30", **dict(extra_env)}
    proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "serve", "--model", str(demo_models / "digits_cnn.onnx"),
                             "--baseline", str(baseline), "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # "advdetect serving digits_cnn on port N, metrics on port M, health on port H"
    started = re.search(r"on port (\d+), metrics on port (\d+), health on port (\d+)", line)
    assert started, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(started[1]), int(started[2])


def test_sigterm_drains_in_flight_requests(demo_models, cnn_baseline, tmp_path):
    proc, port, _ = _start_subprocess_server(demo_models, cnn_baseline[0], tmp_path)
    x = load_dataset("digits:test").x[:256]  # a batch that takes seconds to score
    results: dict[str, object] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = detector_pb2_grpc.DetectorStub(channel)
        health_stub = health_pb2_grpc.HealthStub(channel)

        def slow() -> None:
            try:
                results["slow"] = len(stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(x))).results)
            except grpc.RpcError as exc:
                results["slow"] = exc.code()

        worker = threading.Thread(target=slow)
        worker.start()
        time.sleep(0.5)  # the slow request is in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            status = health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            results["health"] = status
        except grpc.RpcError as exc:
            results["health"] = exc.code()
        try:
            stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(x[:1])), timeout=5)
            results["new"] = "accepted"
        except grpc.RpcError as exc:
            results["new"] = exc.code()
        worker.join(timeout=60)
    assert proc.wait(timeout=60) == 0
    assert results["slow"] == 256  # the in-flight request finished with all its results
    assert results["new"] != "accepted"  # new calls are refused while draining
    assert results["health"] in (health_pb2.HealthCheckResponse.NOT_SERVING, grpc.StatusCode.UNAVAILABLE)


def _noisy_digits(n: int) -> np.ndarray:
    """The first ``n`` test digits under strong Gaussian noise (sd 0.7): most of them get flagged."""
    x = load_dataset("digits:test").x[:n]
    return np.clip(x + np.random.default_rng(1).normal(0, 0.7, x.shape), 0, 1).astype(np.float32)


def test_sigkill_keeps_the_records_of_past_flush_intervals(demo_models, cnn_baseline, tmp_path):
    audit = tmp_path / "audit.jsonl"
    proc, port, _ = _start_subprocess_server(demo_models, cnn_baseline[0], tmp_path,
                                             ("ADVDETECT_AUDIT_LOG_PATH", str(audit)),
                                             ("ADVDETECT_AUDIT_FLUSH_INTERVAL_S", "0.1"),
                                             ("ADVDETECT_AUDIT_FLUSH_BATCH_SIZE", "8"))
    noisy = _noisy_digits(32)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = detector_pb2_grpc.DetectorStub(channel)
        first = stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(noisy), request_id="before-kill"))
        n_flagged = sum(bool(r.flags) for r in first.results)
        time.sleep(1.0)  # several flush intervals: the first request's records are durable
        stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(noisy), request_id="racing-kill"))
    proc.kill()
    proc.wait(timeout=30)
    reader = AuditReader(audit)
    records = list(reader)
    assert n_flagged >= 16
    assert sum(r["request_id"] == "before-kill" for r in records) == n_flagged
    assert reader.torn_lines <= 1
    assert all(r["request_id"] in ("before-kill", "racing-kill") for r in records)


def test_audit_sync_loses_no_answered_flagged_record_to_sigkill(demo_models, cnn_baseline, tmp_path):
    audit = tmp_path / "audit.jsonl"
    # Without audit_sync nothing would be written before the kill: batches of 64, flushed every 60 s.
    proc, port, _ = _start_subprocess_server(demo_models, cnn_baseline[0], tmp_path,
                                             ("ADVDETECT_AUDIT_LOG_PATH", str(audit)),
                                             ("ADVDETECT_AUDIT_FLUSH_INTERVAL_S", "60"),
                                             ("ADVDETECT_AUDIT_SYNC", "true"))
    noisy = _noisy_digits(4)
    answered: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def caller(k: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = detector_pb2_grpc.DetectorStub(channel)
            for i in range(10_000):
                if stop.is_set():
                    return
                try:
                    reply = stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(noisy), request_id=f"c{k}-{i}"))
                except grpc.RpcError:
                    return  # the server is gone
                with lock:
                    answered[reply.request_id] = sum(bool(r.flags) for r in reply.results)

    callers = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in callers:
        t.start()
    while len(answered) < 40 and all(t.is_alive() for t in callers):
        time.sleep(0.01)
    proc.kill()  # while the callers' requests are in flight
    proc.wait(timeout=30)
    stop.set()
    for t in callers:
        t.join(timeout=30)
    stored: dict[str, int] = {}
    for record in AuditReader(audit):
        stored[record["request_id"]] = stored.get(record["request_id"], 0) + 1
    assert len(answered) >= 40 and sum(answered.values()) >= 40
    assert {rid: n for rid, n in answered.items() if n} == {rid: stored.get(rid, 0) for rid, n in answered.items() if n}


def test_several_processes_share_the_port_metrics_and_audit(demo_models, cnn_baseline, tmp_path):
    audit = tmp_path / "audit.jsonl"
    proc, port, metrics_port = _start_subprocess_server(demo_models, cnn_baseline[0], tmp_path,
                                                        ("ADVDETECT_PROCESSES", "2"),
                                                        ("ADVDETECT_AUDIT_LOG_PATH", str(audit)),
                                                        ("ADVDETECT_AUDIT_FLUSH_INTERVAL_S", "0.05"))
    x = load_dataset("digits:test").x[:8]
    noisy = np.clip(x + np.random.default_rng(2).normal(0, 0.7, x.shape), 0, 1).astype(np.float32)
    n_flagged = 0
    # 16 connections (a local subchannel pool each): the kernel spreads connections over the 2 workers,
    # so both get some (all on one worker has probability 2 ** -15)
    for k in range(16):
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            reply = detector_pb2_grpc.DetectorStub(channel).Detect(
                detector_pb2.DetectRequest(inputs=tensor_to_proto(noisy), request_id=f"conn-{k}"), timeout=60)
            n_flagged += sum(bool(r.flags) for r in reply.results)
    metrics = _scrape_url(f"http://127.0.0.1:{metrics_port}/metrics")
    assert metrics[("advdetect_inputs_total", ())] == 16 * len(noisy)  # summed over the workers
    assert metrics[("advdetect_requests_total", (("code", "OK"), ("method", "Detect")))] == 16
    assert metrics[("advdetect_inflight_requests", ())] == 0
    pids = {dict(labels)["pid"] for name, labels in metrics if name == "advdetect_window_flag_ratio"}
    assert len(pids) == 2  # one rolling window per worker
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    workers = sorted(p.name for p in tmp_path.glob("audit.worker*.jsonl"))
    assert workers == ["audit.worker0.jsonl", "audit.worker1.jsonl"]
    assert all(any(AuditReader(tmp_path / w, include_rotated=False)) for w in workers)  # both workers served
    records = list(AuditReader(audit))  # the configured path reads every worker's log
    assert n_flagged >= 16 and len(records) == n_flagged
    assert {r["request_id"] for r in records} <= {f"conn-{k}" for k in range(16)}


def test_serving_path_does_not_import_torch():
    code = ("import sys, service.server, service.servicers, service.core, detector.pipeline; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


GARBAGE = b"\xff\xff\xff\xff\x0f garbage that is no protobuf"


def test_requests_that_are_not_protobuf_get_invalid_argument(server, stub):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in ("/advdetect.v1.Detector/Detect", "/inference.GRPCInferenceService/ModelInfer",
                       "/grpc.health.v1.Health/Check"):
            code, details = _code(lambda: channel.unary_unary(method)(GARBAGE, timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert f"is not a valid protobuf message for {method}" in details
        good = detector_pb2.DetectRequest(inputs=tensor_to_proto(load_dataset("digits:test").x[:1]), request_id="ok")
        stream = channel.stream_stream("/advdetect.v1.Detector/DetectStream")
        replies = [detector_pb2.DetectResponse.FromString(r)
                   for r in stream(iter([GARBAGE, good.SerializeToString()]), timeout=30)]
    assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not a valid protobuf" in replies[0].error.message
    assert replies[1].request_id == "ok" and len(replies[1].results) == 1


def test_hostile_shapes_and_inputs_get_invalid_argument_with_short_details(server, stub):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = oip_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        many = oip_pb2.ModelInferRequest()
        many.inputs.extend(oip_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1])
                           for _ in range(20_000))
        text = oip_pb2.ModelInferRequest()
        text.inputs.add(name="x", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hello")
        cases = [
            lambda: infer(many),
            lambda: infer(text),
            lambda: stub.Detect(detector_pb2.DetectRequest(inputs=detector_pb2.Tensor(shape=[2] * 600_000, dtype="float32"))),
            lambda: stub.Detect(detector_pb2.DetectRequest(inputs=detector_pb2.Tensor(shape=[2**63 - 1] * 4, dtype="float32"))),
        ]
        for call in cases:
            code, details = _code(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        code, details = _code(lambda: stub.Detect(detector_pb2.DetectRequest(model_name="m" * 100_000)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) <= 512 and "m" * 41 not in details
        code, details = _code(lambda: stub.Detect(detector_pb2.DetectRequest(model_name="m" * 200)))
        assert code == grpc.StatusCode.NOT_FOUND and "m" * 41 not in details


def test_calls_beyond_max_inflight_are_refused_at_once_whatever_workers_is(demo_models, cnn_baseline):
    running = create_server(_settings(demo_models, cnn_baseline[0], max_inflight_requests=2, workers=1))
    x = tensor_to_proto(load_dataset("digits:test").x[:256])  # a batch that takes about a second to score
    codes: list[grpc.StatusCode] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = detector_pb2_grpc.DetectorStub(channel)

            def call() -> None:
                try:
                    stub.Detect(detector_pb2.DetectRequest(inputs=x), timeout=120)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())

            callers = [threading.Thread(target=call) for _ in range(8)]
            for t in callers:
                t.start()
            for t in callers:
                t.join()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    finally:
        running.stop(grace_s=1)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_health_port_answers_every_probe_while_a_flood_is_refused(demo_models, cnn_baseline):
    """40 callers with no backoff against an in-flight bound of 2: the main port refuses the excess, some of it
    in grpc itself once its call slots (the bound plus CONTROL_THREADS) are full, which can refuse a health
    check there too; the health-only server on ``health_port`` answers every probe."""
    running = create_server(_settings(demo_models, cnn_baseline[0], max_inflight_requests=2, workers=1))
    request = detector_pb2.DetectRequest(inputs=tensor_to_proto(load_dataset("digits:test").x[:1]))
    check = health_pb2.HealthCheckRequest(service="")
    flood: list[grpc.StatusCode] = []
    probes: dict[int, list] = {running.health_port: [], running.port: []}
    stop_at = time.monotonic() + 3.0

    def caller() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = detector_pb2_grpc.DetectorStub(ch)
            while time.monotonic() < stop_at:
                try:
                    stub.Detect(request, timeout=30)
                    flood.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    flood.append(exc.code())

    def prober(port: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < stop_at:
                try:
                    probes[port].append(stub.Check(check, timeout=30).status)
                except grpc.RpcError as exc:
                    probes[port].append(exc.code())
                time.sleep(0.005)

    threads = [threading.Thread(target=caller) for _ in range(40)]
    threads += [threading.Thread(target=prober, args=(port,)) for port in probes]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        running.stop(grace_s=1)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in flood and grpc.StatusCode.OK in flood
    assert len(probes[running.health_port]) >= 20
    assert set(probes[running.health_port]) == {health_pb2.HealthCheckResponse.SERVING}, probes[running.health_port]
