"""Build, start and drain the advdetect gRPC server.

:func:`create_server` loads the model and baseline (refusing to start, with the reason, when either is
unusable), wires the servicers, health, reflection, metrics and the audit log, and binds the port (0 picks a
free one; the bound port is returned). :func:`serve` runs it until SIGTERM or SIGINT, then drains: health
goes NOT_SERVING, new calls are refused, calls in flight get ``grace_period_s`` to finish, the audit log is
flushed and closed.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from threadpoolctl import threadpool_limits

from detector import Detector
from service.audit import AuditLog
from service.core import DetectionCore
from service.errors import ServiceInterceptor
from service.metrics import MetricsServer, ServiceMetrics, start_metrics_server
from service.protocol import (
    DETECTOR_METHODS,
    DETECTOR_SERVICE,
    OIP_METHODS,
    SERVED_SERVICES,
    detector_pb2_grpc,
    enable_reflection,
    oip_pb2_grpc,
)
from service.servicers import DetectorServicer, InferenceServicer
from service.settings import ServiceSettings, SettingsError
from service.wire import RawRequestInterceptor

__all__ = ["CONTROL_THREADS", "HEALTH_THREADS", "RunningServer", "SWITCH_INTERVAL_S", "create_server", "serve", "stop_event"]

logger = logging.getLogger("advdetect.server")

#: Threads (and concurrent calls) of the main server beyond ``max_inflight_requests``: for health and
#: reflection on ``grpc_port``, which the in-flight bound does not count, and for refusing data-plane calls
#: at the bound with a counted RESOURCE_EXHAUSTED. A flood fills them too; grpc then refuses any further
#: call itself (uncounted), a health check there included: probes belong on ``health_port``.
CONTROL_THREADS = 8
#: Threads of the health server (:attr:`~service.settings.ServiceSettings.health_port`): a check takes
#: microseconds, so two answer any probe rate an orchestrator sends.
HEALTH_THREADS = 2
DETECT_STREAM = f"/{DETECTOR_SERVICE}/DetectStream"


@dataclass
class RunningServer:
    """A started server and what it owns; :meth:`stop` drains and releases everything."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    health_server: grpc.Server
    health_port: int
    core: DetectionCore
    metrics: ServiceMetrics
    metrics_server: MetricsServer | None
    audit: AuditLog | None
    settings: ServiceSettings

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        self.health.enter_graceful_shutdown()  # both ports report NOT_SERVING while the data plane drains
        self.server.stop(grace).wait()
        self.health_server.stop(None)
        self.core.stop()
        if self.audit is not None:
            self.audit.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


def _version() -> str:
    try:
        return metadata.version("advdetect")
    except metadata.PackageNotFoundError:
        return "0"


def create_server(settings: ServiceSettings, registry: CollectorRegistry | None = None, *,
                  serve_metrics: bool = True) -> RunningServer:
    """Load, warm up and start a server for ``settings``; health is SERVING once it returns.

    ``serve_metrics=False`` starts no ``/metrics`` endpoint (a worker process whose metrics its
    supervisor serves, :mod:`service.workers`).

    Raises
    ------
    ModelError, BaselineError
        The model or baseline cannot be used (the message says why).
    SettingsError
        The gRPC or health port cannot be bound (in use: only several processes of one server share them).
    """
    health_servicer = health.HealthServicer()
    all_services = ("", *SERVED_SERVICES)
    for name in all_services:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # One thread per computation, as ONNX Runtime's: the workers already run requests in parallel, and numpy's
    # BLAS pool (the peers' matrix products) spins on every core after each product. On the busy 2-core machine
    # a 1280 x 1280 float64 product (MobileNetV2's Mahalanobis) took 13.8 ms with OpenBLAS's two threads, 0.75
    # ms with one. Set for the whole process.
    threadpool_limits(1, user_api="blas")
    detector = Detector.load(settings.model_path, settings.baseline_path, intra_op_threads=1,
                             flagged_scores_only=settings.flagged_scores_only)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = ServiceMetrics(registry)
    metrics.touch(methods=DETECTOR_METHODS + OIP_METHODS)
    # One thread per call the server takes at once: a call never waits in the executor's queue, so the
    # in-flight bound is checked as soon as it arrives and health checks find a thread of their own.
    # grpc refuses calls beyond that number with RESOURCE_EXHAUSTED before they reach a thread.
    threads = settings.max_inflight_requests + CONTROL_THREADS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="advdetect"),
        interceptors=[ServiceInterceptor(metrics, max_inflight=settings.max_inflight_requests, workers=settings.workers),
                      RawRequestInterceptor(per_message_errors=frozenset({DETECT_STREAM}))],
        options=settings.grpc_options(),
        maximum_concurrent_rpcs=threads,
    )
    credentials = settings.server_credentials()
    port = _listen(server, settings.grpc_address, credentials, "grpc_port")
    # Probes get a server of their own: data-plane calls refused at the in-flight bound still take the
    # main server's call slots, so a health check there can be refused under overload (measured:
    # bench/hostile.py); here no data-plane call is ever counted or queued.
    health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="advdetect-health"),
                                options=settings.grpc_options())
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    health_port = _listen(health_server, settings.health_address, credentials, "health_port")
    audit = AuditLog.from_settings(settings)
    if audit is not None:
        audit.start()
    core = DetectionCore(detector, settings.model_name or Path(settings.model_path).stem, metrics, audit,
                         max_batch_size=settings.max_batch_size, window_size=settings.population_window_size,
                         audit_sync=settings.audit_sync)
    limits = settings.request_limits()
    detector_pb2_grpc.add_DetectorServicer_to_server(DetectorServicer(core, limits), server)
    oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core, _version(), limits), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server)
    metrics_server = start_metrics_server(registry, settings.metrics_port, settings.metrics_host) if serve_metrics else None
    server.start()
    health_server.start()
    core.warm_up()
    for name in all_services:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("serving %s (baseline %s) on port %d, health on port %d%s%s", core.model_name, detector.version, port,
                health_port, f", metrics on port {metrics_server.port}" if metrics_server else "",
                " with TLS" if credentials else "")
    return RunningServer(server, port, health_servicer, health_server, health_port, core, metrics, metrics_server, audit,
                         settings)


def _listen(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None, setting: str) -> int:
    """Bind ``server`` to ``address`` (TLS when ``credentials``); the bound port, or SettingsError naming ``setting``."""
    try:
        return server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise SettingsError(f"cannot listen on {address} ({setting} in use, or the host is not local?): {exc}") from None


#: GIL switch interval of the serving process (Python's default is 5 ms). Worker threads drop the GIL for
#: every ONNX Runtime and numba call and must take it back afterwards; with the default a thread can wait up
#: to 5 ms for it behind one running Python code, leaving a core idle. Measured with bench/load.py-style
#: traffic on LeNet-5 (8 callers, 2 workers): 185-250 req/s at 5 ms, 264-270 at 0.5 ms.
SWITCH_INTERVAL_S = 0.0005


def stop_event(settings: ServiceSettings) -> threading.Event:
    """An event set by SIGTERM or SIGINT (installed on the calling, main, thread)."""
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %d: draining (grace %.1f s)", signum, settings.grace_period_s)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return done


def serve(settings: ServiceSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully; ``processes`` > 1 runs :func:`service.workers.serve_processes`."""
    if settings.processes > 1:
        from service.workers import serve_processes

        serve_processes(settings)
        return
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    running = create_server(settings)
    done = stop_event(settings)
    assert running.metrics_server is not None
    print(f"advdetect serving {running.core.model_name} on port {running.port}, "
          f"metrics on port {running.metrics_server.port}, health on port {running.health_port}", flush=True)
    done.wait()
    running.stop()
    logger.info("stopped")
