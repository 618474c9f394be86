"""The error table and the interceptor, on a real gRPC server with real clients."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detector.errors import BaselineError, DataError, InvalidInput, ModelError, NotReady
from service.errors import INTERNAL_MESSAGE, ModelNotFound, Overloaded, ServiceInterceptor, status_for
from service.metrics import ServiceMetrics
from service.protocol import detector_pb2, detector_pb2_grpc, oip_pb2, oip_pb2_grpc
from service.tensors import tensor_from_proto, tensor_to_proto


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (InvalidInput("expected shape [N, 1, 8, 8], got [2, 64]"), grpc.StatusCode.INVALID_ARGUMENT,
         "expected shape [N, 1, 8, 8], got [2, 64]"),
        (ModelNotFound("no model 'x'; this server serves 'digits_cnn'"), grpc.StatusCode.NOT_FOUND,
         "no model 'x'; this server serves 'digits_cnn'"),
        (NotReady("warming up"), grpc.StatusCode.UNAVAILABLE, "warming up"),
        (Overloaded("64 in flight"), grpc.StatusCode.RESOURCE_EXHAUSTED, "64 in flight"),
        (ModelError("not ONNX"), grpc.StatusCode.FAILED_PRECONDITION, "not ONNX"),
        (BaselineError("made for another model"), grpc.StatusCode.FAILED_PRECONDITION, "made for another model"),
        (DataError("calibration file gone"), grpc.StatusCode.FAILED_PRECONDITION, "calibration file gone"),
        (TimeoutError("deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed"),
        (KeyError("secret internals"), grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE),
        (ValueError("a plain ValueError is a bug, not bad input"), grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE),
    ],
)
def test_status_table(exc, code, message) -> None:
    assert status_for(exc) == (code, message)


class _Detector(detector_pb2_grpc.DetectorServicer):
    """Raises what the request's model name asks for; otherwise echoes the batch size."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def _act(self, request):
        name = request.model_name
        if name == "missing":
            raise ModelNotFound("no model 'missing'; this server serves 'digits'")
        if name == "notready":
            raise NotReady("the baseline is still loading")
        if name == "baseline":
            raise BaselineError("baseline made for model sha256 abc, serving def")
        if name == "boom":
            raise RuntimeError("secret detail that must not reach the client")
        if name == "abort":
            raise AssertionError("unreachable")  # replaced below by context.abort
        if name == "block":
            self.entered.release()
            assert self.release.wait(10)
        x = tensor_from_proto(request.inputs, expected_dtype="float32")
        result = detector_pb2.DetectResponse(model_name=name, request_id=request.request_id)
        for _ in range(len(x)):
            result.results.add(predicted_class=0)
        return result

    def Detect(self, request, context):
        if request.model_name == "abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "servicer's own status")
        return self._act(request)

    def DetectStream(self, request_iterator, context):
        for request in request_iterator:
            yield self._act(request)


def _request(model="digits", batch=2, data=None) -> detector_pb2.DetectRequest:
    x = np.linspace(0, 1, batch * 64, dtype=np.float32).reshape(batch, 1, 8, 8)
    tensor = tensor_to_proto(x)
    if data is not None:
        tensor.data = data
    return detector_pb2.DetectRequest(model_name=model, request_id="r", inputs=tensor)


def _value(registry: CollectorRegistry, name: str, **labels) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def served(grpc_server, registry):
    servicer = _Detector()
    metrics = ServiceMetrics(registry)
    interceptor = ServiceInterceptor(metrics=metrics, max_inflight=2)
    port = grpc_server(lambda s: detector_pb2_grpc.add_DetectorServicer_to_server(servicer, s), [interceptor], workers=6)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, detector_pb2_grpc.DetectorStub(channel), registry, interceptor
    servicer.release.set()
    channel.close()


def test_statuses_reach_the_client_and_are_counted(served, caplog) -> None:
    servicer, stub, registry, _ = served
    assert len(stub.Detect(_request(batch=3), timeout=5).results) == 3
    cases = [
        (_request(data=b"\x00" * 7), grpc.StatusCode.INVALID_ARGUMENT, "expected 512 bytes"),
        (_request(model="missing"), grpc.StatusCode.NOT_FOUND, "no model 'missing'"),
        (_request(model="notready"), grpc.StatusCode.UNAVAILABLE, "still loading"),
        (_request(model="baseline"), grpc.StatusCode.FAILED_PRECONDITION, "made for model sha256"),
        (_request(model="abort"), grpc.StatusCode.PERMISSION_DENIED, "servicer's own status"),
    ]
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Detect(request, timeout=5)
        assert info.value.code() == code
        assert text in info.value.details()
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Detect(_request(model="boom"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == INTERNAL_MESSAGE
    assert "secret detail" in caplog.text  # the details go to the log
    # The server kept serving through all of it.
    assert len(stub.Detect(_request(batch=1), timeout=5).results) == 1
    counts = {
        code: _value(registry, "advdetect_requests_total", method="Detect", code=code)
        for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "FAILED_PRECONDITION",
                     "PERMISSION_DENIED", "INTERNAL")
    }
    assert counts == {
        "OK": 2, "INVALID_ARGUMENT": 1, "NOT_FOUND": 1, "UNAVAILABLE": 1, "FAILED_PRECONDITION": 1,
        "PERMISSION_DENIED": 1, "INTERNAL": 1,
    }
    assert _value(registry, "advdetect_request_duration_seconds_count", method="Detect") == 8
    assert _value(registry, "advdetect_inflight_requests") == 0


def test_inflight_bound_gives_resource_exhausted(served) -> None:
    servicer, stub, registry, interceptor = served
    with futures.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(stub.Detect, _request(model="block"), timeout=10) for _ in range(2)]
        for _ in range(2):
            assert servicer.entered.acquire(timeout=5)
        assert interceptor.inflight == 2
        assert _value(registry, "advdetect_inflight_requests") == 2
        with pytest.raises(grpc.RpcError) as info:
            stub.Detect(_request(), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 requests in flight" in info.value.details()
        servicer.release.set()
        assert all(len(f.result(timeout=10).results) == 2 for f in held)
    assert interceptor.inflight == 0
    assert _value(registry, "advdetect_requests_total", method="Detect", code="RESOURCE_EXHAUSTED") == 1
    assert _value(registry, "advdetect_requests_total", method="Detect", code="OK") == 2
    # Free slots again: a new call goes through.
    assert len(stub.Detect(_request(), timeout=5).results) == 2


def test_stream_error_is_mapped_and_counted_once(served) -> None:
    _, stub, registry, interceptor = served
    responses = stub.DetectStream(iter([_request(batch=1), _request(batch=2), _request(data=b"junk")]), timeout=5)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for response in responses:
            got.append(len(response.results))
    assert got == [1, 2]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected 512 bytes" in info.value.details()
    ok = stub.DetectStream(iter([_request(batch=1)] * 3), timeout=5)
    assert [len(r.results) for r in ok] == [1, 1, 1]
    assert _value(registry, "advdetect_requests_total", method="DetectStream", code="INVALID_ARGUMENT") == 1
    assert _value(registry, "advdetect_requests_total", method="DetectStream", code="OK") == 1
    assert interceptor.inflight == 0


def test_other_services_pass_through_untouched(grpc_server, registry) -> None:
    class Oip(oip_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return oip_pb2.ServerLiveResponse(live=True)

    metrics = ServiceMetrics(registry)
    interceptor = ServiceInterceptor(metrics=metrics, max_inflight=1, services=("advdetect.v1.Detector",))
    port = grpc_server(lambda s: oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Oip(), s), [interceptor])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(oip_pb2.ServerLiveRequest(), timeout=5).live
        with pytest.raises(grpc.RpcError) as info:  # not implemented by Oip: grpc's own status
            stub.ServerReady(oip_pb2.ServerReadyRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert _value(registry, "advdetect_requests_total", method="ServerLive", code="OK") == 0
    with pytest.raises(ValueError, match="max_inflight must be >= 1"):
        ServiceInterceptor(max_inflight=0)
