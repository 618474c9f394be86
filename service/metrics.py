"""Prometheus metrics of the service, declared on a registry passed in, and their HTTP exporter.

Every metric is declared once in :class:`ServiceMetrics` on the ``CollectorRegistry`` it is given
(never the global one), so a test makes a fresh registry and no unregister fixtures are needed.
Names follow Prometheus practice: one ``advdetect_`` prefix, base units (seconds), ``_total``
counters, histograms rather than summaries for latency, bounded label values.

===========================================  =========  =====================================
name                                         type       labels
===========================================  =========  =====================================
``advdetect_requests_total``                 counter    method, code (gRPC status name)
``advdetect_inputs_total``                   counter    (inputs scored; a batch of N adds N)
``advdetect_flags_total``                    counter    flag, predicted_class
``advdetect_request_duration_seconds``       histogram  method
``advdetect_stage_duration_seconds``         histogram  stage (inference, topology,
                                                        introspection, fusion)
``advdetect_inflight_requests``              gauge
``advdetect_window_flag_ratio``              gauge      (flagged / inputs in the rolling window)
``advdetect_population_anomaly_score``       gauge      (rolling window vs calibrated windows)
``advdetect_baseline_info``                  gauge (1)  version, model_sha256
===========================================  =========  =====================================

The two window gauges are NaN until the window has data.

Several server processes (``processes`` > 1, :mod:`service.workers`) write their metrics to memory-mapped
files (prometheus_client's multiprocess mode, switched on by ``PROMETHEUS_MULTIPROC_DIR`` in each worker's
environment) and the supervisor serves their aggregate: counters and histograms are summed,
``advdetect_inflight_requests`` is the sum over live processes, the two window gauges keep one series per
process (a ``pid`` label: each process has its own window) and ``advdetect_baseline_info`` the maximum.
The baseline's info is therefore a gauge set to 1 (the ``*_info`` convention), since prometheus_client's
``Info`` type has no multiprocess mode.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ContextManager

from detector import STAGES as PIPELINE_STAGES
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

__all__ = [
    "STAGES",
    "REQUEST_BUCKETS_S",
    "STAGE_BUCKETS_S",
    "ServiceMetrics",
    "MetricsServer",
    "start_metrics_server",
    "multiprocess_registry",
]

#: Pipeline stages timed by ``advdetect_stage_duration_seconds``.
STAGES: tuple[str, ...] = PIPELINE_STAGES  # inference, topology, introspection, peers, fusion
#: Request latency buckets (s): dense from 0.5 ms to 50 ms, where single-input requests land.
REQUEST_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
#: Stage latency buckets (s): one stage is a fraction of a request.
STAGE_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
)
#: Status codes whose series exist from the start for every application method (error ratios).
DEFAULT_CODES: tuple[str, ...] = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL")


class ServiceMetrics:
    """The service's metrics on one registry.

    Parameters
    ----------
    registry : CollectorRegistry
        Where the metrics are registered; a fresh ``CollectorRegistry()`` per server (or test).

    Attributes
    ----------
    requests_total, inputs_total, flags_total : Counter
    request_duration_seconds, stage_duration_seconds : Histogram
    inflight_requests, window_flag_ratio, population_anomaly_score : Gauge
    baseline_info : Gauge
        ``advdetect_baseline_info{version,model_sha256} 1``.

    Notes
    -----
    The constructor creates the stage series (all four stages) and sets the window gauges to NaN;
    :meth:`touch` creates the request and flag series once the served methods, flag names and
    classes are known, so that every series exists at zero before the first request.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests_total = Counter(
            "advdetect_requests", "gRPC calls of the application services by method and final status code.",
            ["method", "code"], registry=registry,
        )
        self.inputs_total = Counter(
            "advdetect_inputs", "Inputs scored (a batch of N inputs adds N).", registry=registry,
        )
        self.flags_total = Counter(
            "advdetect_flags", "Flags raised, by flag name and the model's predicted class.",
            ["flag", "predicted_class"], registry=registry,
        )
        self.request_duration_seconds = Histogram(
            "advdetect_request_duration_seconds", "Time to serve one unary call (or one stream message), in seconds.",
            ["method"], buckets=REQUEST_BUCKETS_S, registry=registry,
        )
        self.stage_duration_seconds = Histogram(
            "advdetect_stage_duration_seconds", "Time spent in one pipeline stage for one request, in seconds.",
            ["stage"], buckets=STAGE_BUCKETS_S, registry=registry,
        )
        self.inflight_requests = Gauge(
            "advdetect_inflight_requests", "Calls of the application services in progress.", registry=registry,
            multiprocess_mode="livesum",
        )
        self.window_flag_ratio = Gauge(
            "advdetect_window_flag_ratio", "Fraction of the inputs in the rolling window that raised any flag.",
            registry=registry, multiprocess_mode="liveall",
        )
        self.population_anomaly_score = Gauge(
            "advdetect_population_anomaly_score",
            "Anomaly score of the rolling window's population Betti curves against the calibrated clean windows "
            "(higher = more suspicious).",
            registry=registry, multiprocess_mode="liveall",
        )
        self.baseline_info = Gauge(
            "advdetect_baseline_info", "The baseline being served (value 1): its version and the sha256 of its model.",
            ["version", "model_sha256"], registry=registry, multiprocess_mode="livemax",
        )
        self._stage_series = {stage: self.stage_duration_seconds.labels(stage=stage) for stage in STAGES}
        self.window_flag_ratio.set(float("nan"))
        self.population_anomaly_score.set(float("nan"))
        self._lock = threading.Lock()
        self._baseline_labels: tuple[str, str] | None = None

    def touch(
        self,
        *,
        methods: Iterable[str] = (),
        codes: Iterable[str] = DEFAULT_CODES,
        flags: Iterable[str] = (),
        predicted_classes: Iterable[int | str] = (),
    ) -> None:
        """Create series at zero: requests for every (method, code), flags for every (flag, class).

        Parameters
        ----------
        methods : iterable of str
            Method names, e.g. ``protocol.DETECTOR_METHODS + protocol.OIP_METHODS``.
        codes : iterable of str, default ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL")
            gRPC status names.
        flags : iterable of str
            Flag names the pipeline can raise.
        predicted_classes : iterable of int or str
            Class indices, e.g. ``range(num_classes)``.
        """
        codes = tuple(codes)
        classes = tuple(str(c) for c in predicted_classes)
        for method in methods:
            self.request_duration_seconds.labels(method=method)
            for code in codes:
                self.requests_total.labels(method=method, code=code)
        for flag in flags:
            for cls in classes:
                self.flags_total.labels(flag=flag, predicted_class=cls)

    def set_baseline(self, version: str, model_sha256: str) -> None:
        """Publish the served baseline's version and model hash (replaces any earlier value)."""
        labels = (str(version), str(model_sha256))
        if self._baseline_labels not in (None, labels):
            self.baseline_info.remove(*self._baseline_labels)
        self.baseline_info.labels(*labels).set(1)
        self._baseline_labels = labels

    def stage_timer(self, stage: str) -> ContextManager[object]:
        """``with metrics.stage_timer("topology"): ...`` observes the block's duration.

        Raises
        ------
        ValueError
            For a stage not in :data:`STAGES` (label values stay bounded).
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        return self._stage_series[stage].time()

    def observe_stages(self, seconds: Mapping[str, float]) -> None:
        """Observe each stage's duration in seconds (keys from :data:`STAGES`), with the series looked up once."""
        for stage, value in seconds.items():
            self._stage_series[stage].observe(value)

    def record_results(self, predicted_classes: Sequence[int], flags: Sequence[Iterable[str]]) -> None:
        """Count a scored batch: N inputs, and each raised flag with its input's predicted class.

        Parameters
        ----------
        predicted_classes : sequence of int, length N
        flags : sequence of iterables of str, length N
            The flag names raised for each input (empty for a clean input).
        """
        if len(predicted_classes) != len(flags):
            raise ValueError(
                f"predicted_classes has {len(predicted_classes)} entries but flags has {len(flags)}"
            )
        self.inputs_total.inc(len(predicted_classes))
        for cls, names in zip(predicted_classes, flags):
            for name in names:
                self.flags_total.labels(flag=name, predicted_class=str(int(cls))).inc()

    def set_window(self, flag_ratio: float, population_anomaly_score: float) -> None:
        """Publish the rolling window's flag ratio (in [0, 1]) and population anomaly score."""
        with self._lock:
            self.window_flag_ratio.set(flag_ratio)
            self.population_anomaly_score.set(population_anomaly_score)


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; :meth:`shutdown` stops it."""

    host: str
    port: int
    _server: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """``http://host:port/metrics``"""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread."""
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout_s)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Parameters
    ----------
    registry : CollectorRegistry
    port : int
        TCP port; 0 picks a free one (read it back from the result's ``port``).
    host : str, default "0.0.0.0"

    Returns
    -------
    MetricsServer
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host=host, port=server.server_port, _server=server, _thread=thread)


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry that collects the metrics every worker process wrote under ``path`` (their
    ``PROMETHEUS_MULTIPROC_DIR``), aggregated as the module docstring says."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry
