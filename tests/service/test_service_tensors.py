"""protobuf <-> numpy conversion: round trips, byte layouts, and every rejection with its message."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from sklearn.datasets import load_digits

from detector.errors import InvalidInput
from service.protocol import detector_pb2, oip_pb2
from service.tensors import (
    NATIVE_DTYPES,
    RequestLimits,
    check_shape,
    decode_array,
    encode_array,
    infer_input_to_array,
    infer_request_arrays,
    infer_response_arrays,
    make_infer_response,
    oip_datatype,
    requested_output_names,
    tensor_from_proto,
    tensor_to_proto,
)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Eight real digits images, float32 in [0, 1], shape (8, 1, 8, 8)."""
    images = load_digits().images[:8].astype(np.float32) / 16.0
    return images[:, None, :, :]


def test_native_round_trip_of_real_digits(digits) -> None:
    message = detector_pb2.Tensor.FromString(tensor_to_proto(digits).SerializeToString())
    assert list(message.shape) == [8, 1, 8, 8] and message.dtype == "float32"
    assert len(message.data) == 8 * 64 * 4
    back = tensor_from_proto(message, expected_dtype="float32", limits=RequestLimits(max_batch_size=8))
    np.testing.assert_array_equal(back, digits)
    assert back.dtype == np.float32 and not back.flags.writeable


@pytest.mark.parametrize("dtype", sorted(NATIVE_DTYPES))
def test_every_native_dtype_round_trips(dtype) -> None:
    values = (np.arange(12) % 2).astype(dtype).reshape(3, 4) if dtype == "bool" else np.arange(12).astype(dtype).reshape(3, 4)
    data, shape, name = encode_array(values)
    assert name == dtype and shape == [3, 4]
    np.testing.assert_array_equal(decode_array(data, shape, name), values)


def test_bytes_are_little_endian_whatever_the_input_order() -> None:
    big = np.array([[1.0, -2.5]], dtype=">f4")
    data, _, name = encode_array(big)
    assert name == "float32"
    assert data == struct.pack("<2f", 1.0, -2.5)
    back = decode_array(data, [1, 2], "float32")
    assert back.dtype.isnative and back.tolist() == [[1.0, -2.5]]


def test_wrong_byte_length_says_expected_and_got(digits) -> None:
    data, shape, dtype = encode_array(digits[:2])
    with pytest.raises(InvalidInput, match=r"expected 512 bytes for shape \[2, 1, 8, 8\] of float32 \(128 elements x 4 bytes\), got 511"):
        decode_array(data[:-1], shape, dtype)
    with pytest.raises(InvalidInput, match="expected 512 bytes .* got 1024"):
        decode_array(data + data, shape, dtype)


def test_garbage_bytes_are_rejected() -> None:
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, 256, size=1000, dtype=np.uint8).tobytes()
    # 1000 bytes is no whole number of float32 images of shape [1, 1, 8, 8] (256 bytes).
    with pytest.raises(InvalidInput, match="expected 256 bytes .* got 1000"):
        decode_array(garbage, [1, 1, 8, 8], "float32")
    # The right length of bytes that are NaN patterns.
    nan_bytes = np.full(64, np.nan, dtype=np.float32).tobytes()
    with pytest.raises(InvalidInput, match=r"64 non-finite value\(s\) \(NaN or Inf\), first at index \(0, 0, 0, 0\)"):
        decode_array(nan_bytes, [1, 1, 8, 8], "float32")
    # Bytes that are not 0/1 are not a bool tensor.
    with pytest.raises(InvalidInput, match="bool tensor holds bytes other than 0 and 1"):
        decode_array(bytes([0, 1, 7, 1]), [4], "bool")


def test_non_finite_values_are_located(digits) -> None:
    x = digits[:3].copy()
    x[1, 0, 2, 5] = np.inf
    x[2, 0, 0, 0] = np.nan
    data, shape, dtype = encode_array(x)
    with pytest.raises(InvalidInput, match=r"2 non-finite value\(s\).*first at index \(1, 0, 2, 5\)"):
        decode_array(data, shape, dtype)
    assert np.isinf(decode_array(data, shape, dtype, require_finite=False)[1, 0, 2, 5])


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ([1, 1, 8, 8], "float128", "dtype 'float128' is not supported; expected one of float16, float32"),
        ([1, 1, 8, 8], "", "dtype '' is not supported"),
        ([1, 1, 8, 8], "FP32", "dtype 'FP32' is not supported"),
        ([], "float32", r"shape is empty; expected a batch shape \[N, ...\]"),
        ([0, 1, 8, 8], "float32", r"empty batch \(shape \[0, 1, 8, 8\]\); expected at least one input"),
        ([2, 0, 8, 8], "float32", r"shape \[2, 0, 8, 8\] has no elements"),
        ([-1, 1, 8, 8], "float32", "has a negative dimension"),
        ([300, 1, 8, 8], "float32", "batch of 300 inputs exceeds the server's max_batch_size of 256"),
    ],
)
def test_bad_dtype_and_shape_messages(shape, dtype, message) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_array(b"", shape, dtype, limits=RequestLimits(max_batch_size=256))


def test_expected_dtype_and_shape(digits) -> None:
    data, shape, _ = encode_array(digits.astype(np.float64))
    with pytest.raises(InvalidInput, match="expected dtype float32, got float64"):
        decode_array(data, shape, "float64", expected_dtype="float32")
    check_shape(digits, [-1, 1, 8, 8])
    with pytest.raises(InvalidInput, match=r"expected shape \[N, 1, 8, 8\], got \[8, 1, 28, 28\]"):
        check_shape(np.zeros((8, 1, 28, 28), np.float32), [None, 1, 8, 8])
    with pytest.raises(InvalidInput, match=r"expected shape \[N, 1, 8, 8\], got \[8, 64\]"):
        check_shape(np.zeros((8, 64), np.float32), [-1, 1, 8, 8])


def test_huge_claimed_shape_does_not_allocate() -> None:
    with pytest.raises(InvalidInput, match=r"shape \[1000000, 1000000\] has more than the server's max_tensor_elements"):
        decode_array(b"\0" * 16, [10**6, 10**6], "float32")
    with pytest.raises(InvalidInput, match=r"expected 4000000000000 bytes .* got 16"):
        decode_array(b"\0" * 16, [10**6, 10**6], "float32", limits=RequestLimits(max_elements=10**13))


def test_cost_limits_are_checked_before_the_shape_is_read() -> None:
    # 600,000 dimensions (the probe's stall) and int64-maximum dimensions whose product has 4,000+ digits.
    message = detector_pb2.Tensor(data=b"\0" * 16, shape=[2] * 600_000, dtype="float32")
    with pytest.raises(InvalidInput, match="shape has 600000 dimensions; the server accepts at most 8"):
        tensor_from_proto(message)
    with pytest.raises(InvalidInput, match="more than the server's max_tensor_elements of 16777216"):
        decode_array(b"", [2**63 - 1] * 8, "float32")
    with pytest.raises(InvalidInput, match=r"dtype 'x{40}'\.\.\. is not supported"):
        decode_array(b"", [1], "x" * 100_000)


# -- Open Inference Protocol -------------------------------------------------------------------------


def test_request_counts_and_strings_are_bounded_and_never_echoed_in_full() -> None:
    many = oip_pb2.ModelInferRequest()
    many.inputs.extend(oip_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1])
                       for _ in range(20_000))
    with pytest.raises(InvalidInput, match="inputs: 20000 entries; the server accepts at most 16"):
        infer_request_arrays(many)
    long_name = oip_pb2.ModelInferRequest(model_name="m" * 10_000)
    long_name.inputs.add(name="x", datatype="FP32", shape=[1])
    with pytest.raises(InvalidInput, match=r"model_name 'm{40}'\.\.\. is longer than the server's max_string_bytes of 256") as err:
        infer_request_arrays(long_name)
    assert len(str(err.value)) < 200
    params = oip_pb2.ModelInferRequest()
    params.inputs.add(name="x", datatype="FP32", shape=[1]).parameters["k"].string_param = "v" * 300
    with pytest.raises(InvalidInput, match=r"input 'x': parameters\['k'\] 'v{40}'\.\.\. is longer"):
        infer_request_arrays(params, limits=RequestLimits(max_tensors=20_000))
    for _ in range(17):
        params.parameters[f"p{_}"].bool_param = True
    with pytest.raises(InvalidInput, match="parameters: 17 entries; the server accepts at most 16"):
        infer_request_arrays(params)


def test_duplicate_names_are_found_in_linear_time_and_quoted_briefly() -> None:
    request = oip_pb2.ModelInferRequest()
    request.inputs.extend(oip_pb2.ModelInferRequest.InferInputTensor(name=f"{i // 2}" + "n" * 100, datatype="FP32",
                                                                     shape=[1]) for i in range(20_000))
    with pytest.raises(InvalidInput, match="given more than once") as err:
        infer_request_arrays(request, limits=RequestLimits(max_tensors=20_000))
    assert len(str(err.value)) < 400


def test_a_bytes_input_is_invalid_argument_not_a_cast_error() -> None:
    request = _request(_input(datatype="BYTES", shape=[1, 1]))
    request.inputs[0].contents.bytes_contents.append(b"abc")
    with pytest.raises(InvalidInput, match="datatype 'BYTES' is not supported; expected one of BOOL"):
        infer_request_arrays(request)


def _request(*tensors, raw=None) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name="digits")
    for tensor in tensors:
        request.inputs.append(tensor)
    if raw is not None:
        request.raw_input_contents.extend(raw)
    return request


def _input(name="x", datatype="FP32", shape=(2, 1, 8, 8), **contents) -> oip_pb2.ModelInferRequest.InferInputTensor:
    tensor = oip_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return tensor


def test_oip_raw_and_typed_contents_give_the_same_array(digits) -> None:
    x = digits[:2]
    raw = infer_request_arrays(_request(_input(), raw=[x.tobytes()]))["x"]
    typed = infer_request_arrays(_request(_input(fp32_contents=x.reshape(-1).tolist())))["x"]
    np.testing.assert_array_equal(raw, x)
    np.testing.assert_array_equal(typed, x)
    assert raw.dtype == typed.dtype == np.float32


@pytest.mark.parametrize(
    ("datatype", "field", "values", "expected_dtype"),
    [
        ("INT8", "int_contents", [-128, 0, 127], np.int8),
        ("INT16", "int_contents", [-300, 0, 300], np.int16),
        ("INT32", "int_contents", [-(2**31), 0, 2**31 - 1], np.int32),
        ("INT64", "int64_contents", [-(2**40), 0, 2**40], np.int64),
        ("UINT8", "uint_contents", [0, 1, 255], np.uint8),
        ("UINT32", "uint_contents", [0, 1, 2**32 - 1], np.uint32),
        ("UINT64", "uint64_contents", [0, 1, 2**63], np.uint64),
        ("FP64", "fp64_contents", [0.5, -1.25, 3.0], np.float64),
        ("BOOL", "bool_contents", [True, False, True], np.bool_),
    ],
)
def test_oip_typed_contents_per_datatype(datatype, field, values, expected_dtype) -> None:
    array = infer_input_to_array(_input(datatype=datatype, shape=(1, 3), **{field: values}))
    assert array.dtype == expected_dtype and array.shape == (1, 3)
    assert array.reshape(-1).tolist() == list(values)


def _bytes_response(shape, raw=None, typed=()) -> oip_pb2.ModelInferResponse:
    response = oip_pb2.ModelInferResponse()
    response.outputs.add(name="flags", datatype="BYTES", shape=list(shape)).contents.bytes_contents.extend(typed)
    if raw is not None:
        response.raw_output_contents.append(raw)
    return response


def test_oip_bytes_outputs_raw_and_typed() -> None:
    items = [b"abc", b"", "ünï".encode()]
    raw = b"".join(struct.pack("<I", len(i)) + i for i in items)
    from_raw = infer_response_arrays(_bytes_response((3,), raw))["flags"]
    from_typed = infer_response_arrays(_bytes_response((3,), typed=items))["flags"]
    assert from_raw.tolist() == from_typed.tolist() == items
    with pytest.raises(InvalidInput, match="BYTES element 1 claims 9 bytes but only 3 remain"):
        infer_response_arrays(_bytes_response((2,), struct.pack("<I", 1) + b"a" + struct.pack("<I", 9) + b"xyz"))
    with pytest.raises(InvalidInput, match="2 bytes left over after 1 BYTES elements"):
        infer_response_arrays(_bytes_response((1,), struct.pack("<I", 1) + b"abc"))


@pytest.mark.parametrize(
    ("request_factory", "message"),
    [
        (lambda x: _request(), "the request has no inputs"),
        (lambda x: _request(_input(), _input()), "input name\\(s\\) given more than once: 'x'"),
        (lambda x: _request(_input(), raw=[x.tobytes(), x.tobytes()]), "raw_input_contents has 2 entries for 1 inputs"),
        (
            lambda x: _request(_input(fp32_contents=[0.0] * 128), raw=[x.tobytes()]),
            "have typed contents while raw_input_contents is used",
        ),
        (lambda x: _request(_input(datatype="FLOAT32"), raw=[x.tobytes()]), "datatype 'FLOAT32' is not supported"),
        (lambda x: _request(_input(), raw=[x.tobytes()[:-4]]), "expected 512 bytes for shape \\[2, 1, 8, 8\\] of FP32"),
        (lambda x: _request(_input(fp32_contents=[0.0] * 100)), "needs 128 elements, got 100 in contents.fp32_contents"),
        (lambda x: _request(_input(int_contents=[0] * 128)), "FP32 values belong in contents.fp32_contents, got int_contents"),
        (lambda x: _request(_input(datatype="FP16")), "FP16 tensors must be sent in raw contents"),
        (lambda x: _request(_input(datatype="INT8", shape=(1, 2), int_contents=[1, 200])), "outside the INT8 range \\[-128, 127\\]"),
        (lambda x: _request(_input(shape=(0, 1, 8, 8)), raw=[b""]), "empty batch"),
        (lambda x: _request(_input(fp32_contents=[float("nan")] * 128)), "non-finite"),
    ],
)
def test_oip_rejections(digits, request_factory, message) -> None:
    with pytest.raises(InvalidInput, match=message):
        infer_request_arrays(request_factory(digits[:2]))


def test_oip_fp16_raw_and_batch_limit() -> None:
    x = np.linspace(0, 1, 128, dtype=np.float16).reshape(2, 1, 8, 8)
    array = infer_request_arrays(_request(_input(datatype="FP16"), raw=[x.tobytes()]))["x"]
    np.testing.assert_array_equal(array, x)
    with pytest.raises(InvalidInput, match="batch of 2 inputs exceeds the server's max_batch_size of 1"):
        infer_request_arrays(_request(_input(datatype="FP16"), raw=[x.tobytes()]), limits=RequestLimits(max_batch_size=1))


@pytest.mark.parametrize("raw", [True, False])
def test_response_round_trip(digits, raw) -> None:
    outputs = {
        "logits": digits[:3].reshape(3, -1)[:, :10].astype(np.float32),
        "predicted": np.array([0, 1, 2], dtype=np.int64),
        "adversarial_score": np.array([0.1, 2.5, -1.0], dtype=np.float64),
        "flags": np.array(["", "adversarial", "adversarial,ood"], dtype=object),
    }
    response = make_infer_response(outputs, model_name="digits", request_id="r1", raw=raw)
    response = oip_pb2.ModelInferResponse.FromString(response.SerializeToString())
    assert [(o.name, o.datatype) for o in response.outputs] == [
        ("logits", "FP32"), ("predicted", "INT64"), ("adversarial_score", "FP64"), ("flags", "BYTES")
    ]
    assert len(response.raw_output_contents) == (4 if raw else 0)
    back = infer_response_arrays(response)
    for name in ("logits", "predicted", "adversarial_score"):
        np.testing.assert_array_equal(back[name], outputs[name])
        assert back[name].dtype == outputs[name].dtype
    assert back["flags"].tolist() == [b"", b"adversarial", b"adversarial,ood"]


def test_oip_datatype_names_and_requested_outputs() -> None:
    assert oip_datatype(np.float32) == "FP32" and oip_datatype(">i8") == "INT64"
    assert oip_datatype(np.dtype("U5")) == "BYTES" and oip_datatype(bool) == "BOOL"
    with pytest.raises(InvalidInput, match="no Open Inference Protocol datatype for numpy dtype complex64"):
        oip_datatype(np.complex64)
    request = _request(_input())
    assert requested_output_names(request) is None
    request.outputs.add(name="flags")
    assert requested_output_names(request) == ["flags"]
    with pytest.raises(ValueError, match="FP16 outputs need raw=True"):
        make_infer_response({"h": np.zeros(2, np.float16)}, model_name="m", raw=False)
