"""gRPC servicers: the native ``advdetect.v1.Detector`` and the Open Inference Protocol.

Each method converts the request to numpy, calls :class:`~service.core.DetectionCore`, and converts the
result back. Errors are raised as domain exceptions; :class:`~service.errors.ServiceInterceptor` maps them
to status codes in one place.

Open Inference Protocol outputs of ``ModelInfer`` (all with the batch as first dimension):

=====================  =======  ================================================================
output                 type     meaning
=====================  =======  ================================================================
``logits``             FP32     the classifier's output, [N, n_classes]
``probabilities``      FP32     softmax, [N, n_classes]
``predicted_class``    INT64    [N]
``adversarial_score``  FP64     the ``adversarial`` flag's fused statistic (higher = more suspicious)
``flags``              BYTES    comma-separated names of the flags raised ("" when none)
``p_values``           FP64     [N, n_scores], in the order of :attr:`Detector.score_names`
=====================  =======  ================================================================

A client that asks only for prediction outputs (``logits``, ``probabilities``, ``predicted_class``) gets
them from the ONNX Runtime pass alone, without detection: the "detection off" path, which the load
benchmark compares against.
"""

from __future__ import annotations

import time
from typing import Iterator

import grpc
import numpy as np

from detector import AdvDetectError, Capture, InvalidInput
from service.core import DetectionCore
from service.errors import status_for
from service.protocol import DetectOptions, detector_pb2, detector_pb2_grpc, oip_pb2, oip_pb2_grpc
from service.tensors import (
    RequestLimits,
    check_shape,
    check_string,
    infer_request_arrays,
    make_infer_response,
    quote,
    requested_output_names,
    tensor_from_proto,
)

__all__ = ["DetectorServicer", "InferenceServicer", "OIP_OUTPUTS"]

OIP_OUTPUTS = ("logits", "probabilities", "predicted_class", "adversarial_score", "flags", "p_values")
PREDICTION_OUTPUTS = frozenset({"logits", "probabilities", "predicted_class"})


def _prediction_outputs(capture: Capture) -> dict[str, np.ndarray]:
    """The prediction outputs of an ONNX Runtime pass (what the "detection off" path returns)."""
    return {"logits": capture.logits.astype(np.float32), "probabilities": capture.probabilities.astype(np.float32),
            "predicted_class": capture.predicted}


def _check_deadline(context: grpc.ServicerContext) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the request could be scored")


class DetectorServicer(detector_pb2_grpc.DetectorServicer):
    """``advdetect.v1.Detector``: Detect, DetectStream, GetBaselineInfo.

    ``limits`` bounds each request's cost (:meth:`ServiceSettings.request_limits`).
    ``DetectStream`` takes, in place of a message, the :class:`InvalidInput` that
    :class:`~service.wire.RawRequestInterceptor` gives for one that does not parse, and answers it.
    """

    def __init__(self, core: DetectionCore, limits: RequestLimits):
        self.core = core
        self.limits = limits

    def _detect(self, request: detector_pb2.DetectRequest | InvalidInput) -> detector_pb2.DetectResponse:
        if isinstance(request, InvalidInput):
            raise request
        check_string(request.model_name, "model_name", self.limits)
        check_string(request.request_id, "request_id", self.limits)
        self.core.check_model(request.model_name)
        model = self.core.detector.model
        x = tensor_from_proto(request.inputs, expected_dtype=np.dtype(model.input_dtype).name, limits=self.limits)
        check_shape(x, self.core.expected_shape())
        batch, request_id = self.core.detect(x, request.request_id)
        options = DetectOptions.from_proto(request.options)
        response = detector_pb2.DetectResponse(model_name=self.core.model_name, request_id=request_id,
                                               baseline_version=self.core.detector.version)
        for d in batch.detections:
            result = response.results.add(predicted_class=d.predicted_class)
            if options.return_probabilities:
                result.probabilities.extend(d.probabilities.astype(np.float32).tolist())
            if options.include_scores:
                result.scores.update(d.scores)
                result.p_values.update(d.p_values)
            for name, reasons in d.flags.items():
                result.flags.add(name=name, reasons=[f"{r} p={d.p_values[r]:.3g}" for r in reasons])
        return response

    def Detect(self, request: detector_pb2.DetectRequest, context: grpc.ServicerContext) -> detector_pb2.DetectResponse:
        _check_deadline(context)
        return self._detect(request)

    def DetectStream(self, request_iterator: Iterator[detector_pb2.DetectRequest | InvalidInput],
                     context: grpc.ServicerContext) -> Iterator[detector_pb2.DetectResponse]:
        timer = self.core.metrics.request_duration_seconds.labels(method="DetectStream")
        for request in request_iterator:
            start = time.perf_counter()
            try:
                yield self._detect(request)
            except AdvDetectError as exc:  # one bad message does not end the stream
                code, message = status_for(exc)
                request_id = "" if isinstance(request, InvalidInput) else request.request_id[: self.limits.max_string_bytes]
                yield detector_pb2.DetectResponse(model_name=self.core.model_name, request_id=request_id,
                                                  error=detector_pb2.Error(code=code.value[0], message=message))
            timer.observe(time.perf_counter() - start)

    def GetBaselineInfo(self, request: detector_pb2.GetBaselineInfoRequest,
                        context: grpc.ServicerContext) -> detector_pb2.BaselineInfo:
        self.core.check_model(request.model_name)
        det = self.core.detector
        m = det.manifest
        return detector_pb2.BaselineInfo(
            model_name=self.core.model_name, baseline_version=det.version, model_sha256=m.model.sha256,
            schema_version=m.schema_version, input_shape=self.core.expected_shape(),
            input_dtype=np.dtype(det.model.input_dtype).name, num_classes=det.model.n_classes,
            layers=m.model.captured_layers, scores=det.score_names, flags=self.core.flag_names,
            thresholds={f"{r.name}@fpr={t.target_fpr:g}": t.value for r in m.flags for t in r.thresholds},
            metadata={"created_at": m.created_at, "data": m.data.spec, "data_sha256": m.data.sha256,
                      "tool_version": m.tool_version},
        )


class InferenceServicer(oip_pb2_grpc.GRPCInferenceServiceServicer):
    """The KServe / Triton Open Inference Protocol, with detection results as extra outputs."""

    def __init__(self, core: DetectionCore, server_version: str, limits: RequestLimits):
        self.core = core
        self.server_version = server_version
        self.limits = limits

    def ServerLive(self, request: oip_pb2.ServerLiveRequest, context: grpc.ServicerContext) -> oip_pb2.ServerLiveResponse:
        return oip_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: oip_pb2.ServerReadyRequest, context: grpc.ServicerContext) -> oip_pb2.ServerReadyResponse:
        return oip_pb2.ServerReadyResponse(ready=self.core.ready)

    def ModelReady(self, request: oip_pb2.ModelReadyRequest, context: grpc.ServicerContext) -> oip_pb2.ModelReadyResponse:
        self.core.check_model(request.name)
        return oip_pb2.ModelReadyResponse(ready=self.core.ready)

    def ServerMetadata(self, request: oip_pb2.ServerMetadataRequest,
                       context: grpc.ServicerContext) -> oip_pb2.ServerMetadataResponse:
        return oip_pb2.ServerMetadataResponse(name="advdetect", version=self.server_version, extensions=[])

    def ModelMetadata(self, request: oip_pb2.ModelMetadataRequest,
                      context: grpc.ServicerContext) -> oip_pb2.ModelMetadataResponse:
        self.core.check_model(request.name)
        det = self.core.detector
        k, n_scores = det.model.n_classes, len(det.score_names)
        tm = oip_pb2.ModelMetadataResponse.TensorMetadata
        return oip_pb2.ModelMetadataResponse(
            name=self.core.model_name, versions=["1"], platform="onnxruntime_onnx",
            inputs=[tm(name=det.model.input_name, datatype="FP32", shape=self.core.expected_shape())],
            outputs=[tm(name="logits", datatype="FP32", shape=[-1, k]),
                     tm(name="probabilities", datatype="FP32", shape=[-1, k]),
                     tm(name="predicted_class", datatype="INT64", shape=[-1]),
                     tm(name="adversarial_score", datatype="FP64", shape=[-1]),
                     tm(name="flags", datatype="BYTES", shape=[-1]),
                     tm(name="p_values", datatype="FP64", shape=[-1, n_scores])],
        )

    def ModelInfer(self, request: oip_pb2.ModelInferRequest, context: grpc.ServicerContext) -> oip_pb2.ModelInferResponse:
        _check_deadline(context)
        self.core.check_model(request.model_name)
        arrays = infer_request_arrays(request, limits=self.limits)
        if len(arrays) != 1:
            raise InvalidInput(f"expected one input tensor, got {len(arrays)}: {', '.join(map(quote, list(arrays)[:4]))}")
        x = next(iter(arrays.values()))
        check_shape(x, self.core.expected_shape(), name=next(iter(arrays)))
        wanted = requested_output_names(request)
        unknown = [n for n in wanted or () if n not in OIP_OUTPUTS]
        if unknown:
            raise InvalidInput(f"unknown output(s) {', '.join(map(quote, unknown[:4]))}; "
                               f"this model has {', '.join(OIP_OUTPUTS)}")
        x = x.astype(self.core.detector.model.input_dtype, copy=False)
        if wanted is not None and set(wanted) <= PREDICTION_OUTPUTS:
            outputs, request_id = _prediction_outputs(self.core.classify(x)), request.id
        else:
            batch, request_id = self.core.detect(x, request.id)
            det = batch.detections
            names = self.core.detector.score_names
            outputs = _prediction_outputs(batch.capture) | {
                "adversarial_score": np.array([d.statistics.get("adversarial", np.nan) for d in det], dtype=np.float64),
                "flags": np.array([",".join(d.flags) for d in det], dtype=object),
                "p_values": np.array([[d.p_values[n] for n in names] for d in det], dtype=np.float64),
            }
        if wanted is not None:
            outputs = {n: outputs[n] for n in wanted}
        return make_infer_response(outputs, model_name=self.core.model_name, request_id=request_id)
