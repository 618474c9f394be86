"""Property tests of the request decoders: any message decodes to a valid batch or raises InvalidInput.

Hypothesis builds hostile requests of both APIs (wrong, huge and negative shapes, any dtype string,
mismatched byte counts, stray typed contents, NaN, duplicate names, parameters) and raw bytes that
may or may not parse as protobuf. No other exception may come out of the decoders.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.errors import InvalidInput
from service.protocol import detector_pb2, oip_pb2
from service.tensors import (
    NATIVE_DTYPES,
    OIP_DATATYPES,
    RequestLimits,
    check_shape,
    check_string,
    infer_request_arrays,
    tensor_from_proto,
)

LIMITS = RequestLimits(max_batch_size=8, max_tensors=4, max_dims=6, max_elements=4096, max_parameters=3,
                       max_string_bytes=32)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dims = st.one_of(st.integers(0, 9), st.integers(-(2**63), 2**63 - 1))
shapes = st.one_of(st.lists(dims, max_size=8), st.lists(st.integers(1, 3), min_size=100, max_size=3000))
names = st.one_of(st.sampled_from(["x", "y", ""]), st.text(max_size=40))
element_bytes = st.one_of(st.binary(max_size=300),
                          st.builds(lambda n, v: np.full(n, v, np.float32).tobytes(),
                                    st.integers(0, 200), st.sampled_from([0.5, np.nan, np.inf])))


def _valid(array: np.ndarray, shape: object) -> None:
    assert isinstance(array, np.ndarray) and array.dtype.kind in "biuf"
    assert list(array.shape) == list(shape) and 1 <= array.shape[0] <= LIMITS.max_batch_size
    assert array.ndim <= LIMITS.max_dims and math.prod(array.shape) <= LIMITS.max_elements
    if array.dtype.kind == "f":
        assert np.isfinite(array).all()


native_tensors = st.builds(detector_pb2.Tensor, data=element_bytes, shape=shapes,
                           dtype=st.one_of(st.sampled_from(sorted(NATIVE_DTYPES)), st.text(max_size=300)))


@FUZZ
@given(request=st.builds(detector_pb2.DetectRequest, model_name=names, request_id=st.text(max_size=60),
                         inputs=native_tensors))
def test_native_decoder_gives_a_valid_batch_or_invalid_input(request: detector_pb2.DetectRequest) -> None:
    try:
        check_string(request.request_id, "request_id", LIMITS)
        x = tensor_from_proto(request.inputs, expected_dtype="float32", limits=LIMITS)
        check_shape(x, [-1, 1, 2, 2])
    except InvalidInput as exc:
        assert len(str(exc)) < 1000
        return
    _valid(x, request.inputs.shape)


def _contents(draw: st.DrawFn) -> oip_pb2.InferTensorContents:
    contents = oip_pb2.InferTensorContents()
    field = draw(st.sampled_from(["bool_contents", "int_contents", "int64_contents", "uint_contents",
                                  "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents"]))
    n = draw(st.integers(0, 64))
    values = {"bool_contents": st.booleans(), "int_contents": st.integers(-(2**31), 2**31 - 1),
              "int64_contents": st.integers(-(2**63), 2**63 - 1), "uint_contents": st.integers(0, 2**32 - 1),
              "uint64_contents": st.integers(0, 2**64 - 1), "fp32_contents": st.floats(width=32),
              "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=8)}[field]
    getattr(contents, field).extend(draw(st.lists(values, min_size=n, max_size=n)))
    return contents


@st.composite
def infer_requests(draw: st.DrawFn) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name=draw(names), id=draw(st.text(max_size=60)))
    for _ in range(draw(st.integers(0, 6))):
        tensor = request.inputs.add(name=draw(names), shape=draw(shapes),
                                    datatype=draw(st.one_of(st.sampled_from(sorted(OIP_DATATYPES)), st.text(max_size=8))))
        if draw(st.booleans()):
            tensor.contents.CopyFrom(_contents(draw))
        for key in draw(st.lists(st.text(max_size=40), max_size=5)):
            tensor.parameters[key].string_param = draw(st.text(max_size=40))
    for _ in range(draw(st.integers(0, 6))):
        request.outputs.add(name=draw(names))
    if draw(st.booleans()):
        request.raw_input_contents.extend(draw(st.lists(element_bytes, max_size=5)))
    return request


@FUZZ
@given(request=infer_requests())
def test_oip_decoder_gives_valid_batches_or_invalid_input(request: oip_pb2.ModelInferRequest) -> None:
    try:
        arrays = infer_request_arrays(request, limits=LIMITS)
    except InvalidInput as exc:
        assert len(str(exc)) < 1000
        return
    assert list(arrays) == [t.name for t in request.inputs]
    for tensor in request.inputs:
        _valid(arrays[tensor.name], tensor.shape)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=400), infer_requests().map(lambda r: r.SerializeToString()[:-1])))
def test_raw_bytes_parse_or_raise_decode_error_then_decode_or_raise_invalid_input(raw: bytes) -> None:
    for message_type in (detector_pb2.DetectRequest, oip_pb2.ModelInferRequest):
        try:
            request = message_type.FromString(raw)
        except DecodeError:
            continue
        try:
            if isinstance(request, detector_pb2.DetectRequest):
                tensor_from_proto(request.inputs, limits=LIMITS)
            else:
                infer_request_arrays(request, limits=LIMITS)
        except InvalidInput:
            pass
