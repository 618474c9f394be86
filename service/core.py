"""The transport-free core of the server: one :class:`DetectionCore` serves both gRPC APIs.

It owns what every request shares: the loaded :class:`~detector.Detector`, the readiness state, the stage
and flag metrics, the audit log of flagged inputs, and the rolling population window. Servicers only
convert protobuf to numpy, call :meth:`DetectionCore.detect`, and convert back (MLServer's DataPlane shape).

Population window: the last ``window_size`` inputs' flags and node values (one value per node of the
calibrated functional graph) are kept. A request only records its flags and a reference to the activations
the nodes are read from; a background thread turns those into node values (one batched call instead of
one per request), recomputes the window's population Betti curves (ripser, tens of milliseconds) at most
every ``window_interval_s`` seconds, off the request path, and publishes ``advdetect_window_flag_ratio``
and ``advdetect_population_anomaly_score``.
"""

from __future__ import annotations

import collections
import logging
import threading
import uuid

import numpy as np

from detector import Capture, DetectionBatch, Detector, InvalidInput, NotReady
from service.audit import AuditLog
from service.errors import ModelNotFound
from service.metrics import ServiceMetrics
from service.tensors import quote

__all__ = ["DetectionCore"]

logger = logging.getLogger(__name__)

#: Longest a request waits for its audit records with ``audit_sync`` before it fails with UNAVAILABLE.
AUDIT_SYNC_TIMEOUT_S = 10.0


class DetectionCore:
    """Detection for one served model, shared by the native and the Open Inference Protocol servicers.

    Parameters
    ----------
    detector : Detector
    model_name : str
    metrics : ServiceMetrics
    audit : AuditLog or None
        Started by the caller; flagged inputs are submitted to it.
    audit_sync : bool, default False
        Return from :meth:`detect` only once the flagged inputs' records are written and fsync'ed;
        raise :class:`~detector.NotReady` (UNAVAILABLE) when they could not be.
    max_batch_size : int
    window_size : int
        Inputs in the rolling population window.
    window_interval_s : float
        Least time between two recomputations of the window's population statistics.
    """

    def __init__(self, detector: Detector, model_name: str, metrics: ServiceMetrics, audit: AuditLog | None = None,
                 max_batch_size: int = 256, window_size: int = 256, window_interval_s: float = 2.0, *,
                 audit_sync: bool = False):
        self.detector = detector
        self.model_name = model_name
        self.metrics = metrics
        self.audit = audit
        self.audit_sync = audit_sync
        self.max_batch_size = max_batch_size
        self.flag_names = [rule.name for rule in detector.manifest.flags]
        self._ready = threading.Event()
        self.window_size = window_size
        self._window_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._window_flags: collections.deque[bool] = collections.deque(maxlen=window_size)
        self._window_nodes: collections.deque[np.ndarray] = collections.deque(maxlen=window_size)
        # batches whose node values are not computed yet: (number of inputs, activations of the window layers)
        self._pending: collections.deque[tuple[int, dict[str, np.ndarray]]] = collections.deque()
        self._pending_inputs = 0
        self._window_layers = detector.population.layers if detector.population is not None else []
        self._window_dirty = threading.Event()
        self._stop = threading.Event()
        self._window_interval_s = window_interval_s
        self._window_thread = threading.Thread(target=self._window_loop, name="population-window", daemon=True)
        metrics.set_baseline(detector.version, detector.model.sha256)
        metrics.touch(flags=self.flag_names, predicted_classes=range(detector.model.n_classes))

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Loaded and warmed up (and not shutting down)."""
        return self._ready.is_set()

    def warm_up(self) -> None:
        """Run one batch through every stage and one population window, then become ready.

        The first calls allocate ONNX Runtime's buffers, load the numba kernels and import ripser (about a
        second, holding the GIL): better before the first request than in the middle of traffic.
        """
        shape = tuple(1 if d is None else d for d in self.detector.model.input_shape)
        batch = self.detector.detect(np.zeros((2, *shape), dtype=self.detector.model.input_dtype))
        population = self.detector.population
        if population is not None:
            nodes = population.node_values(batch.capture.activations)
            population.score(np.random.default_rng(0).normal(size=(population.window_size, nodes.shape[1])))
        self._window_thread.start()
        self._ready.set()

    def stop(self) -> None:
        """No longer ready; stop the window thread."""
        self._ready.clear()
        self._stop.set()
        self._window_dirty.set()
        if self._window_thread.is_alive():
            self._window_thread.join(timeout=5)

    # -- requests ------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        """Accept the served model's name (or an empty one); anything else is NOT_FOUND."""
        if name and name != self.model_name:
            raise ModelNotFound(f"model {quote(name)} is not served here; this server serves {self.model_name!r}")

    def expected_shape(self) -> list[int]:
        """The input shape with -1 for the batch dimension."""
        return [-1, *(-1 if d is None else int(d) for d in self.detector.model.input_shape)]

    def _check_batch(self, x: np.ndarray) -> None:
        if not self.ready:
            raise NotReady("the model is not loaded yet, or the server is shutting down")
        if len(x) > self.max_batch_size:
            raise InvalidInput(f"batch of {len(x)} inputs exceeds the maximum batch size {self.max_batch_size}")

    def classify(self, x: np.ndarray) -> Capture:
        """Prediction only (detection off): the ONNX Runtime pass, counted in ``advdetect_inputs_total``."""
        self._check_batch(x)
        with self.metrics.stage_timer("inference"):
            capture = self.detector.classify(x)
        self.metrics.inputs_total.inc(len(capture))
        return capture

    def detect(self, x: np.ndarray, request_id: str = "", fpr: float | None = None) -> tuple[DetectionBatch, str]:
        """Score a batch; record metrics, audit flagged inputs, feed the window. Returns the batch and request id."""
        self._check_batch(x)
        request_id = request_id or uuid.uuid4().hex
        batch = self.detector.detect(x, fpr=fpr)
        self.metrics.observe_stages(batch.stage_seconds)
        flags = [list(d.flags) for d in batch.detections]
        self.metrics.record_results([d.predicted_class for d in batch.detections], flags)
        if self.audit is not None:
            self._audit(batch, request_id, x)
        with self._window_lock:
            self._window_flags.extend(bool(f) for f in flags)
            if self._window_layers:
                self._pending.append((len(flags), {name: batch.capture.activations[name] for name in self._window_layers}))
                self._pending_inputs += len(flags)
                while self._pending_inputs - self._pending[0][0] >= self.window_size:  # older ones would leave the window
                    self._pending_inputs -= self._pending.popleft()[0]
        self._window_dirty.set()
        return batch, request_id

    def _audit(self, batch: DetectionBatch, request_id: str, x: np.ndarray) -> None:
        """Submit a record per flagged input; with ``audit_sync``, wait until they are durable."""
        assert self.audit is not None
        submitted = [
            self.audit.log(request_id=request_id, model=self.model_name, predicted_class=d.predicted_class,
                           flags=d.flags, scores=d.scores, p_values=d.p_values, index=i,
                           baseline_version=self.detector.version, input_array=x[i])
            for i, d in enumerate(batch.detections) if d.flags
        ]
        if self.audit_sync and submitted:
            failed = self.audit.failed_records
            if not (all(submitted) and self.audit.flush(AUDIT_SYNC_TIMEOUT_S) and self.audit.failed_records == failed):
                raise NotReady("the audit log could not store this request's flagged inputs; retry later")

    # -- population window ----------------------------------------------------------------------
    def window_statistics(self) -> tuple[float, float]:
        """(flag ratio, population anomaly score) of the current window; NaN where not computable yet."""
        self._add_pending_nodes()
        with self._window_lock:
            flags = list(self._window_flags)
            nodes = np.array(self._window_nodes) if self._window_nodes else None
        ratio = float(np.mean(flags)) if flags else float("nan")
        population = self.detector.population
        score = float("nan")
        if population is not None and nodes is not None and len(nodes) >= population.window_size:
            score = population.score(nodes[-population.window_size :])
        return ratio, score

    def _add_pending_nodes(self) -> None:
        """Node values of every batch recorded since the last call, in one call, into the window (in order)."""
        with self._drain_lock:
            with self._window_lock:
                pending = list(self._pending)
                self._pending.clear()
                self._pending_inputs = 0
            if pending:
                nodes = self.detector.population.node_values(
                    {name: np.concatenate([a[name] for _, a in pending]) for name in self._window_layers})
                with self._window_lock:
                    self._window_nodes.extend(nodes)

    def _window_loop(self) -> None:
        while not self._stop.is_set():
            self._window_dirty.wait()
            if self._stop.is_set():
                return
            self._window_dirty.clear()
            try:
                self.metrics.set_window(*self.window_statistics())
            except Exception:  # the monitor must never take the server down
                logger.exception("population window update failed")
            self._stop.wait(self._window_interval_s)
