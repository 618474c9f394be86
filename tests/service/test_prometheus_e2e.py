"""End to end with a real Prometheus server: it scrapes advdetect, and its query API sees the flag rate rise
when adversarial traffic follows clean traffic. Skipped without Debian's `prometheus` package, unless
ADVDETECT_REQUIRE_PROMETHEUS=1 (`.ci/run` installs the package and sets it)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest

from detector import load_dataset
from service.protocol import detector_pb2, detector_pb2_grpc
from service.server import create_server
from service.settings import load_settings
from service.tensors import tensor_to_proto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _wait_for(port: int, expr: str, predicate, timeout_s: float = 30.0) -> float:
    deadline = time.time() + timeout_s
    value = None
    while time.time() < deadline:
        try:
            value = _query(port, expr)
        except urllib.error.URLError:  # Prometheus still starting
            value = None
        if value is not None and predicate(value):
            return value
        time.sleep(0.5)
    raise AssertionError(f"{expr} never satisfied the condition; last value {value}")


def test_prometheus_sees_the_flag_rate_rise(prometheus_binary, demo_models, cnn_baseline, tmp_path):
    from detector.offline.attacks import load_torch_classifier, run_attack

    running = create_server(load_settings(None, model_path=demo_models / "digits_cnn.onnx",
                                          baseline_path=cnn_baseline[0], grpc_port=0, metrics_port=0, health_port=0,
                                          grpc_host="127.0.0.1", metrics_host="127.0.0.1"))
    prom_port = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: advdetect\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{running.metrics_server.port}']\n"
    )
    prom = subprocess.Popen([prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(prom_port, 'up{job="advdetect"}', lambda v: v == 1.0)
        test = load_dataset("digits:test")
        x, y = test.x[:96], test.y[:96]
        adversarial = run_attack("fgsm", load_torch_classifier(demo_models / "digits_cnn.onnx"), x, y).x_adv
        ratio = 'sum(advdetect_flags_total{flag="adversarial"}) / sum(advdetect_inputs_total)'
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = detector_pb2_grpc.DetectorStub(channel)
            for i in range(0, len(x), 8):
                stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(x[i : i + 8])))
            _wait_for(prom_port, "sum(advdetect_inputs_total)", lambda v: v >= 96)
            clean_ratio = _query(prom_port, ratio)
            for i in range(0, len(adversarial), 8):
                stub.Detect(detector_pb2.DetectRequest(inputs=tensor_to_proto(adversarial[i : i + 8])))
        _wait_for(prom_port, "sum(advdetect_inputs_total)", lambda v: v >= 192)
        attacked_ratio = _query(prom_port, ratio)
        assert clean_ratio is not None and attacked_ratio is not None
        assert clean_ratio <= 0.1 and attacked_ratio >= clean_ratio + 0.3, (clean_ratio, attacked_ratio)
        window = _wait_for(prom_port, "advdetect_window_flag_ratio", lambda v: v >= 0.3)
        assert np.isfinite(window)
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        running.stop(grace_s=0)
