"""Serve one model from several processes that share the gRPC port (``processes`` > 1).

Why: every request runs about 1 ms of Python (protobuf, scorers' glue, fusion, metrics) under the
interpreter lock, so one process's worker threads use about 1.4 of 2 cores however many there are.
Separate processes do not share a lock. Measured on this 2-core machine with ``bench/load.py``
(LeNet-5, detection on, 8 callers each on its own connection): 211 requests/s from one process,
412 from two.

The layout is grpc's multiprocessing example:

- the supervisor (the ``advdetect serve`` process) reserves the gRPC and health ports with ``SO_REUSEPORT``
  sockets that never listen (so that port 0 resolves to one port for all workers), starts the workers with
  the ``spawn`` method (a fresh interpreter each: no ONNX Runtime or gRPC state crosses a fork), and
  serves ``/metrics``: the aggregate of what the workers write to a private
  ``PROMETHEUS_MULTIPROC_DIR`` (:mod:`service.metrics`);
- each worker is a whole server (:func:`service.server.create_server`) bound to the same port with
  ``SO_REUSEPORT``, with its own model and baseline, health and reflection services, population
  window, and audit file (``audit.worker<k>.jsonl`` beside the configured path; ``advdetect audit``
  reads them all). The kernel spreads *connections* over the workers: one client connection stays
  on one worker, so a single caller gains nothing, and many callers gain up to one core each.

Lifecycle: the supervisor prints its ready line once every worker is warmed up. A worker that cannot
start (bad model, bad baseline) stops the others, and its error is the supervisor's. SIGTERM or SIGINT
is forwarded to every worker, which drains as a single server does. A worker that dies while serving
stops the rest and the supervisor exits with status 1, so that the orchestrator restarts the whole
server rather than leaving it at reduced capacity. Workers exit when the supervisor disappears.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess

from detector.errors import AdvDetectError
from service.audit import worker_log_path
from service.settings import ServiceSettings

__all__ = ["WorkerFailed", "serve_processes"]

logger = logging.getLogger("advdetect.workers")

#: Longest wait for a worker to load, compile its kernels and warm up.
START_TIMEOUT_S = 600.0


class WorkerFailed(AdvDetectError, RuntimeError):
    """A worker process died without reporting why (see its log above)."""


@contextlib.contextmanager
def _reserved_port(host: str, port: int) -> Iterator[int]:
    """Bind (without listening) an ``SO_REUSEPORT`` socket on ``host:port``; yields the bound port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def worker_settings(settings: ServiceSettings, index: int, port: int, health_port: int) -> ServiceSettings:
    """A worker's settings: the reserved ports and its own audit file."""
    update: dict[str, object] = {"grpc_port": port, "health_port": health_port}
    if settings.audit_log_path is not None:
        update["audit_log_path"] = worker_log_path(settings.audit_log_path, index)
    return settings.model_copy(update=update)


def _watch_parent(parent: int, done: threading.Event) -> None:
    while not done.wait(1.0):
        if os.getppid() != parent:
            logger.error("the supervisor (pid %d) is gone: draining", parent)
            done.set()


def _worker(settings: ServiceSettings, index: int, events: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Body of worker ``index``: serve until SIGTERM, SIGINT or the supervisor's exit."""
    from service.server import SWITCH_INTERVAL_S, create_server, stop_event

    logging.basicConfig(level=settings.log_level, format=f"%(asctime)s %(levelname)s %(name)s[{index}]: %(message)s")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    parent = os.getppid()
    done = stop_event(settings)
    try:
        running = create_server(settings, serve_metrics=False)
    except AdvDetectError as exc:
        events.put((index, exc))
        return
    except BaseException as exc:
        events.put((index, WorkerFailed(f"worker {index} failed to start: {exc!r}")))
        raise
    events.put((index, None))
    threading.Thread(target=_watch_parent, args=(parent, done), daemon=True).start()
    done.wait()
    running.stop()
    logger.info("stopped")


def _stop(workers: list[BaseProcess], grace_s: float) -> None:
    """SIGTERM every live worker, wait for them to drain, SIGKILL what is left."""
    for w in workers:
        if w.is_alive() and w.pid is not None:
            os.kill(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s + 15.0
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():
            logger.error("worker pid %s did not drain in time: killed", w.pid)
            w.kill()
            w.join()


def _wait_ready(workers: list[BaseProcess], events: multiprocessing.Queue,  # type: ignore[type-arg]
                done: threading.Event) -> None:
    """Block until every worker reported ready (or ``done`` is set); raise the first worker's error."""
    pending = set(range(len(workers)))
    deadline = time.monotonic() + START_TIMEOUT_S
    while pending and not done.is_set():
        try:
            index, error = events.get(timeout=0.5)
        except queue.Empty:
            dead = [i for i in pending if not workers[i].is_alive()]
            if dead:
                raise WorkerFailed(f"worker {dead[0]} exited with status {workers[dead[0]].exitcode} while starting")
            if time.monotonic() > deadline:
                raise WorkerFailed(f"workers {sorted(pending)} not ready after {START_TIMEOUT_S:.0f} s")
            continue
        if error is not None:
            raise error
        pending.discard(index)


def _supervise(workers: list[BaseProcess], done: threading.Event) -> bool:
    """Wait for ``done``; True if a worker died first."""
    while not done.wait(0.5):
        dead = [w for w in workers if not w.is_alive()]
        if dead:
            logger.error("worker pid %s exited with status %s: stopping the server", dead[0].pid, dead[0].exitcode)
            return True
    return False


def serve_processes(settings: ServiceSettings) -> None:
    """Run ``settings.processes`` workers on one port until SIGTERM or SIGINT, then drain them all.

    Raises
    ------
    AdvDetectError
        A worker could not start (the worker's own error: ModelError, BaselineError, ...).
    SystemExit
        With status 1 when a worker dies while serving.
    """
    from service.metrics import multiprocess_registry, start_metrics_server
    from service.server import stop_event

    metrics_dir = tempfile.mkdtemp(prefix="advdetect-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client when a worker imports it
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    done = stop_event(settings)
    workers: list[BaseProcess] = []
    metrics_server = None
    failed = False
    try:
        with _reserved_port(settings.grpc_host, settings.grpc_port) as port, \
                _reserved_port(settings.grpc_host, settings.health_port) as health_port:
            metrics_server = start_metrics_server(multiprocess_registry(metrics_dir), settings.metrics_port,
                                                  settings.metrics_host)
            for index in range(settings.processes):
                worker = context.Process(target=_worker, name=f"advdetect-worker-{index}",
                                         args=(worker_settings(settings, index, port, health_port), index, events))
                worker.start()
                workers.append(worker)
            _wait_ready(workers, events, done)
            if not done.is_set():
                print(f"advdetect serving {settings.model_name} on port {port}, metrics on port "
                      f"{metrics_server.port}, health on port {health_port} ({settings.processes} processes)", flush=True)
                failed = _supervise(workers, done)
    finally:
        _stop(workers, settings.grace_period_s)
        if metrics_server is not None:
            metrics_server.shutdown()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    logger.info("stopped")
    if failed:
        raise SystemExit(1)
