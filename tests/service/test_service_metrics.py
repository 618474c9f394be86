"""Metrics scraped over real HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import math
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import REQUEST_BUCKETS_S, STAGES, ServiceMetrics, start_metrics_server
from service.protocol import DETECTOR_METHODS, OIP_METHODS


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(family, name=None) -> list:
    return [s for s in family.samples if name is None or s.name == name]


@pytest.fixture
def exported(registry):
    metrics = ServiceMetrics(registry)
    server = start_metrics_server(registry, port=0, host="127.0.0.1")
    yield metrics, server
    server.shutdown()


def test_series_exist_at_zero_with_the_right_types(exported) -> None:
    metrics, server = exported
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
    methods = DETECTOR_METHODS + OIP_METHODS
    metrics.touch(methods=methods, flags=("adversarial", "out_of_distribution"), predicted_classes=range(10))
    metrics.set_baseline("2025-01-01-abc", "f" * 64)
    families = _scrape(server.url)
    expected_types = {
        "advdetect_requests": "counter",
        "advdetect_inputs": "counter",
        "advdetect_flags": "counter",
        "advdetect_request_duration_seconds": "histogram",
        "advdetect_stage_duration_seconds": "histogram",
        "advdetect_inflight_requests": "gauge",
        "advdetect_window_flag_ratio": "gauge",
        "advdetect_population_anomaly_score": "gauge",
        # An Info is exposed in the text format as a gauge named <name>_info, always 1.
        "advdetect_baseline_info": "gauge",
    }
    for name, kind in expected_types.items():
        assert families[name].type == kind, name
    # Counters are exposed with _total; every (method, code) series exists at zero.
    requests = _samples(families["advdetect_requests"], "advdetect_requests_total")
    assert {(s.labels["method"], s.labels["code"]) for s in requests} >= {(m, "OK") for m in methods}
    assert {s.labels["code"] for s in requests} == {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL"}
    assert all(s.value == 0 for s in requests)
    flags = _samples(families["advdetect_flags"], "advdetect_flags_total")
    assert len(flags) == 2 * 10 and {s.labels["predicted_class"] for s in flags} == {str(c) for c in range(10)}
    stages = _samples(families["advdetect_stage_duration_seconds"], "advdetect_stage_duration_seconds_count")
    assert sorted(s.labels["stage"] for s in stages) == sorted(STAGES)
    buckets = _samples(families["advdetect_request_duration_seconds"], "advdetect_request_duration_seconds_bucket")
    detect_les = sorted(float(s.labels["le"]) for s in buckets if s.labels["method"] == "Detect")
    assert detect_les == sorted([*REQUEST_BUCKETS_S, math.inf])
    assert sum(1 for le in detect_les if 0.001 <= le <= 0.01) >= 5  # ms-scale resolution
    info = _samples(families["advdetect_baseline_info"])
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels == {"version": "2025-01-01-abc", "model_sha256": "f" * 64}
    assert math.isnan(_samples(families["advdetect_population_anomaly_score"])[0].value)
    assert math.isnan(_samples(families["advdetect_window_flag_ratio"])[0].value)


def test_values_move_as_recorded(exported) -> None:
    metrics, server = exported
    metrics.record_results([3, 3, 5, 1], [["adversarial"], [], ["adversarial", "out_of_distribution"], []])
    metrics.record_results([3], [["adversarial"]])
    with metrics.stage_timer("topology"):
        time.sleep(0.002)
    metrics.observe_stages({"fusion": 0.0004, "peers": 0.0002})
    metrics.request_duration_seconds.labels(method="Detect").observe(0.004)
    metrics.set_window(flag_ratio=0.25, population_anomaly_score=3.5)
    metrics.set_baseline("v2", "a" * 64)  # replaces, not adds
    families = _scrape(server.url)
    assert _samples(families["advdetect_inputs"], "advdetect_inputs_total")[0].value == 5
    flags = {(s.labels["flag"], s.labels["predicted_class"]): s.value
             for s in _samples(families["advdetect_flags"], "advdetect_flags_total")}
    assert flags == {("adversarial", "3"): 2, ("adversarial", "5"): 1, ("out_of_distribution", "5"): 1}
    topology = {s.name: s.value for s in _samples(families["advdetect_stage_duration_seconds"])
                if s.labels.get("stage") == "topology"}
    assert topology["advdetect_stage_duration_seconds_count"] == 1
    assert 0.002 <= topology["advdetect_stage_duration_seconds_sum"] < 1.0
    sums = {s.labels["stage"]: s.value for s in _samples(families["advdetect_stage_duration_seconds"],
                                                         "advdetect_stage_duration_seconds_sum")}
    assert (sums["fusion"], sums["peers"], sums["inference"]) == (0.0004, 0.0002, 0.0)
    detect = {(s.name, s.labels.get("le")): s.value for s in _samples(families["advdetect_request_duration_seconds"])}
    assert detect[("advdetect_request_duration_seconds_bucket", "0.003")] == 0
    assert detect[("advdetect_request_duration_seconds_bucket", "0.005")] == 1
    assert _samples(families["advdetect_window_flag_ratio"])[0].value == 0.25
    assert _samples(families["advdetect_population_anomaly_score"])[0].value == 3.5
    info = _samples(families["advdetect_baseline_info"])
    assert [s.labels["version"] for s in info] == ["v2"]


def test_registries_are_independent_and_labels_bounded() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    a, b = ServiceMetrics(first), ServiceMetrics(second)
    a.inputs_total.inc(7)
    assert first.get_sample_value("advdetect_inputs_total") == 7
    assert second.get_sample_value("advdetect_inputs_total") == 0
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        ServiceMetrics(first)
    with pytest.raises(ValueError, match="unknown stage 'tda'; expected one of inference, topology"):
        b.stage_timer("tda")
    with pytest.raises(ValueError, match="predicted_classes has 2 entries but flags has 1"):
        b.record_results([1, 2], [[]])
