"""protobuf <-> numpy tensor conversion for the native API and the Open Inference Protocol.

Every check raises :class:`~detector.errors.InvalidInput` with a message saying what was expected
and what arrived; the interceptor turns that into INVALID_ARGUMENT.

Wire layouts
------------
* Native ``advdetect.v1.Tensor``: ``data`` holds the little-endian bytes of the array in C
  (row-major) order, ``len(data) == prod(shape) * itemsize(dtype)``; ``dtype`` is a numpy name.
* OIP ``raw_input_contents`` / ``raw_output_contents``: the same layout, one entry per tensor, in
  tensor order. BYTES elements are each a 4-byte little-endian length followed by that many
  bytes (Triton's serialisation, what ``tritonclient`` reads and writes).
* OIP ``InferTensorContents``: one repeated field per datatype family (``fp32_contents`` for FP32,
  ``int_contents`` for INT8/INT16/INT32, ...), flattened row-major.

Cost bounds
-----------
A request's decoder checks it against :class:`RequestLimits` before it allocates or loops over
anything whose size the client chose: the number of tensors, outputs and parameters, the length of
every string, the dimension count (``len(shape)``, O(1)), each dimension and the element count
(a product over at most ``max_dims`` factors, each below ``max_elements``). Error messages quote
at most :data:`QUOTE_CHARS` characters of any client string.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.errors import InvalidInput
from service.protocol import detector_pb2, oip_pb2

__all__ = [
    "QUOTE_CHARS",
    "RequestLimits",
    "quote",
    "check_string",
    "check_parameters",
    "NATIVE_DTYPES",
    "OIP_DATATYPES",
    "decode_array",
    "encode_array",
    "tensor_from_proto",
    "tensor_to_proto",
    "oip_datatype",
    "infer_input_to_array",
    "infer_request_arrays",
    "requested_output_names",
    "make_infer_response",
    "infer_response_arrays",
    "check_shape",
]

#: Native dtype names accepted in ``advdetect.v1.Tensor.dtype``.
NATIVE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "float16", "float32", "float64",
        "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64",
        "bool",
    )
}

#: OIP datatype names and their numpy dtypes (BYTES is an object array of ``bytes``).
OIP_DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NUMPY_TO_OIP = {dt: name for name, dt in OIP_DATATYPES.items() if name != "BYTES"}

#: The ``InferTensorContents`` field carrying each OIP datatype (FP16 has none: raw only).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_CONTENTS_FIELDS = tuple(sorted(set(_CONTENTS_FIELD.values())))


#: Most characters of a client's string that an error message repeats.
QUOTE_CHARS = 40


@dataclass(frozen=True)
class RequestLimits:
    """Cost bounds of one request, checked before any work (settings ``max_*``, see the README).

    Parameters
    ----------
    max_batch_size : int or None, default None
        Largest ``shape[0]`` of an input tensor; ``None`` for no bound.
    max_tensors : int, default 16
        Most input tensors and most requested outputs of an OIP request.
    max_dims : int, default 8
        Most dimensions of a shape.
    max_elements : int, default 2**24
        Most elements of one tensor.
    max_parameters : int, default 16
        Most ``parameters`` entries of an OIP request and of each of its tensors.
    max_string_bytes : int, default 256
        Longest client string (names, ids, dtypes, parameter keys and string values), in bytes of UTF-8.
    """

    max_batch_size: int | None = None
    max_tensors: int = 16
    max_dims: int = 8
    max_elements: int = 2**24
    max_parameters: int = 16
    max_string_bytes: int = 256


#: No bounds beyond what a tensor that fits in memory needs (client-side decoding of responses).
_UNLIMITED = RequestLimits(max_tensors=2**31, max_dims=64, max_elements=2**40, max_parameters=2**31,
                          max_string_bytes=2**31)


def quote(text: str) -> str:
    """``repr`` of a client string cut to :data:`QUOTE_CHARS` characters (``'abc'...`` when cut)."""
    return repr(text[:QUOTE_CHARS]) + ("..." if len(text) > QUOTE_CHARS else "")


def check_string(value: str, field: str, limits: RequestLimits) -> None:
    """Refuse a client string longer than ``limits.max_string_bytes`` (bytes of UTF-8).

    Raises
    ------
    InvalidInput
        Naming ``field`` and quoting only the string's start.
    """
    # The length in characters first: encoding a huge string only to refuse it would cost time.
    if len(value) > limits.max_string_bytes or len(value.encode("utf-8", "surrogatepass")) > limits.max_string_bytes:
        raise InvalidInput(f"{field} {quote(value)} is longer than the server's max_string_bytes of "
                           f"{limits.max_string_bytes}")


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _check_dims(shape: Sequence[int], name: str, limits: RequestLimits, *, batch: bool = True) -> tuple[int, ...]:
    """Validate a client's shape in O(``limits.max_dims``); returns it as a tuple of ints."""
    if len(shape) > limits.max_dims:
        raise InvalidInput(f"{name}: shape has {len(shape)} dimensions; the server accepts at most {limits.max_dims}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"{name}: shape {_shape_str(dims)} has a negative dimension")
    count = 1
    for d in dims:  # capped at each step: at most max_dims small products, never a huge integer
        count = min(count * d, limits.max_elements + 1)
    if count > limits.max_elements:
        raise InvalidInput(f"{name}: shape {_shape_str(dims)} has more than the server's max_tensor_elements of "
                           f"{limits.max_elements} elements")
    if not batch:
        return dims
    if not dims:
        raise InvalidInput(f"{name}: shape is empty; expected a batch shape [N, ...] with N >= 1")
    if dims[0] == 0:
        raise InvalidInput(f"{name}: empty batch (shape {_shape_str(dims)}); expected at least one input")
    if any(d == 0 for d in dims):
        raise InvalidInput(f"{name}: shape {_shape_str(dims)} has no elements")
    if limits.max_batch_size is not None and dims[0] > limits.max_batch_size:
        raise InvalidInput(
            f"{name}: batch of {dims[0]} inputs exceeds the server's max_batch_size of {limits.max_batch_size}"
        )
    return dims


def _check_finite(array: np.ndarray, name: str) -> None:
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InvalidInput(
            f"{name}: {bad} non-finite value(s) (NaN or Inf), first at index {first}; expected finite numbers"
        )


def _from_le_bytes(data: bytes, dims: tuple[int, ...], dtype: np.dtype, name: str, label: str) -> np.ndarray:
    count = math.prod(dims)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{name}: expected {expected} bytes for shape {_shape_str(dims)} of {label} "
            f"({count} elements x {dtype.itemsize} bytes), got {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(dims)
    if dtype == np.dtype(bool):
        # Any byte other than 0 or 1 is not a bool numpy would produce.
        raw = np.frombuffer(data, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidInput(f"{name}: bool tensor holds bytes other than 0 and 1")
    if not array.dtype.isnative:
        array = array.astype(dtype)
    return array


def decode_array(
    data: bytes,
    shape: Sequence[int],
    dtype: str,
    *,
    name: str = "inputs",
    expected_dtype: str | None = None,
    require_finite: bool = True,
    limits: RequestLimits = RequestLimits(),
) -> np.ndarray:
    """Little-endian bytes + shape + numpy dtype name -> ndarray, validated.

    Parameters
    ----------
    data : bytes
        C-order little-endian element bytes.
    shape : sequence of int
        Batch first; every dimension >= 1.
    dtype : str
        One of :data:`NATIVE_DTYPES`.
    name : str, default "inputs"
        Used in error messages.
    expected_dtype : str or None
        When given, ``dtype`` must equal it (no silent casts).
    require_finite : bool, default True
        Reject NaN and +-Inf in floating tensors.
    limits : RequestLimits, default RequestLimits()
        Cost bounds (batch size, dimensions, elements, dtype length) checked before any work.

    Returns
    -------
    ndarray of shape ``shape`` and dtype ``dtype``
        A read-only view of ``data`` (no copy on little-endian hosts).

    Raises
    ------
    InvalidInput
        Unknown or unexpected dtype, empty/negative/oversized shape, byte length not
        ``prod(shape) * itemsize``, non-finite values, bool bytes other than 0/1, a limit exceeded.
    """
    if dtype not in NATIVE_DTYPES:
        raise InvalidInput(
            f"{name}: dtype {quote(dtype)} is not supported; expected one of {', '.join(NATIVE_DTYPES)}"
        )
    if expected_dtype is not None and dtype != expected_dtype:
        raise InvalidInput(f"{name}: expected dtype {expected_dtype}, got {dtype}")
    dims = _check_dims(shape, name, limits)
    array = _from_le_bytes(bytes(data), dims, NATIVE_DTYPES[dtype], name, dtype)
    if require_finite:
        _check_finite(array, name)
    return array


def encode_array(array: np.ndarray) -> tuple[bytes, list[int], str]:
    """ndarray -> (little-endian C-order bytes, shape, numpy dtype name); inverse of :func:`decode_array`."""
    array = np.asarray(array)
    name = array.dtype.name
    if name not in NATIVE_DTYPES:
        raise InvalidInput(f"cannot encode dtype {name}; expected one of {', '.join(NATIVE_DTYPES)}")
    le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return le.tobytes(), [int(d) for d in array.shape], name


def tensor_from_proto(tensor: detector_pb2.Tensor, **kwargs: Any) -> np.ndarray:
    """``advdetect.v1.Tensor`` -> ndarray; keyword arguments as in :func:`decode_array`."""
    return decode_array(tensor.data, tensor.shape, tensor.dtype, **kwargs)


def tensor_to_proto(array: np.ndarray) -> detector_pb2.Tensor:
    """ndarray -> ``advdetect.v1.Tensor``."""
    data, shape, dtype = encode_array(array)
    return detector_pb2.Tensor(data=data, shape=shape, dtype=dtype)


def check_shape(array: np.ndarray, expected: Sequence[int | None], *, name: str = "inputs") -> None:
    """Require ``array.shape`` to match ``expected``, where ``None`` or -1 marks a free dimension.

    Raises
    ------
    InvalidInput
        Rank or a fixed dimension differs, e.g. "expected shape [N, 1, 8, 8], got [2, 1, 28, 28]".
    """
    want = [None if d is None or int(d) < 0 else int(d) for d in expected]
    got = tuple(array.shape)
    if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
        shown = ", ".join("N" if i == 0 and w is None else ("?" if w is None else str(w)) for i, w in enumerate(want))
        raise InvalidInput(f"{name}: expected shape [{shown}], got {_shape_str(got)}")


# -- Open Inference Protocol ------------------------------------------------------------------------


def oip_datatype(dtype: np.dtype | str) -> str:
    """numpy dtype -> OIP datatype name (``float32`` -> ``FP32``; str/bytes/object -> ``BYTES``)."""
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    try:
        return _NUMPY_TO_OIP[dt.newbyteorder("=")]
    except KeyError:
        raise InvalidInput(f"no Open Inference Protocol datatype for numpy dtype {dt}") from None


def _deserialize_bytes(data: bytes, count: int, name: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(data):
            raise InvalidInput(f"{name}: BYTES tensor ends after {i} of {count} elements")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidInput(
                f"{name}: BYTES element {i} claims {length} bytes but only {len(data) - offset} remain"
            )
        out[i] = bytes(data[offset:offset + length])
        offset += length
    if offset != len(data):
        raise InvalidInput(f"{name}: {len(data) - offset} bytes left over after {count} BYTES elements")
    return out


def _serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _decode_oip(
    name: str,
    datatype: str,
    shape: Sequence[int],
    contents: oip_pb2.InferTensorContents | None,
    raw: bytes | None,
    *,
    batch: bool,
    require_finite: bool,
    limits: RequestLimits,
) -> np.ndarray:
    if datatype not in OIP_DATATYPES or (batch and datatype == "BYTES"):
        accepted = [d for d in OIP_DATATYPES if not (batch and d == "BYTES")]
        raise InvalidInput(f"{name}: datatype {quote(datatype)} is not supported; expected one of {', '.join(accepted)}")
    dims = _check_dims(shape, name, limits, batch=batch)
    count = math.prod(dims)
    dtype = OIP_DATATYPES[datatype]
    if raw is not None:
        if datatype == "BYTES":
            array = _deserialize_bytes(raw, count, name).reshape(dims)
        else:
            array = _from_le_bytes(raw, dims, dtype, name, datatype)
    else:
        if datatype == "FP16":
            raise InvalidInput(f"{name}: FP16 tensors must be sent in raw contents")
        field = _CONTENTS_FIELD[datatype]
        if contents is None:
            contents = oip_pb2.InferTensorContents()
        stray = [f for f in _ALL_CONTENTS_FIELDS if f != field and len(getattr(contents, f))]
        if stray:
            raise InvalidInput(f"{name}: {datatype} values belong in contents.{field}, got {', '.join(stray)}")
        values = getattr(contents, field)
        if len(values) != count:
            raise InvalidInput(
                f"{name}: shape {_shape_str(dims)} needs {count} elements, got {len(values)} in contents.{field}"
            )
        if datatype == "BYTES":
            array = np.empty(count, dtype=object)
            array[:] = [bytes(v) for v in values]
            array = array.reshape(dims)
        elif dtype.kind in "iu" and dtype.itemsize < 8:
            wide = np.asarray(values, dtype=np.int64)
            info = np.iinfo(dtype)
            if wide.size and (wide.min() < info.min or wide.max() > info.max):
                raise InvalidInput(f"{name}: values outside the {datatype} range [{info.min}, {info.max}]")
            array = wide.astype(dtype).reshape(dims)
        else:
            array = np.asarray(values, dtype=dtype).reshape(dims)
    if require_finite:
        _check_finite(array, name)
    return array


def infer_input_to_array(
    tensor: oip_pb2.ModelInferRequest.InferInputTensor,
    raw: bytes | None = None,
    *,
    require_finite: bool = True,
    limits: RequestLimits = RequestLimits(),
) -> np.ndarray:
    """One OIP input tensor -> ndarray, from ``raw`` bytes when given, else from ``tensor.contents``.

    Parameters
    ----------
    tensor : ModelInferRequest.InferInputTensor
    raw : bytes or None
        The tensor's entry of ``raw_input_contents``.
    require_finite, limits
        As in :func:`decode_array`.

    Returns
    -------
    ndarray of shape ``tensor.shape``
        dtype from :data:`OIP_DATATYPES` (a numeric one: a model input is never BYTES).

    Raises
    ------
    InvalidInput
        Unknown datatype or BYTES, bad or empty shape, too many parameters or too long a string,
        byte or element count not matching the shape, contents in a field that does not belong to
        the datatype, integers out of the datatype's range, FP16 sent as typed contents, non-finite
        values.
    """
    name = f"input {quote(tensor.name)}"
    check_string(tensor.name, "input name", limits)
    check_string(tensor.datatype, f"{name}: datatype", limits)
    check_parameters(tensor.parameters, f"{name}: parameters", limits)
    return _decode_oip(
        name, tensor.datatype, tensor.shape, tensor.contents if tensor.HasField("contents") else None, raw,
        batch=True, require_finite=require_finite, limits=limits,
    )


def check_parameters(parameters: Mapping[str, oip_pb2.InferParameter], field: str, limits: RequestLimits) -> None:
    """Refuse more than ``limits.max_parameters`` entries, or a key or string value longer than
    ``limits.max_string_bytes``.

    Raises
    ------
    InvalidInput
    """
    if len(parameters) > limits.max_parameters:
        raise InvalidInput(f"{field}: {len(parameters)} entries; the server accepts at most {limits.max_parameters}")
    for key, value in parameters.items():
        check_string(key, f"{field}: key", limits)
        if value.WhichOneof("parameter_choice") == "string_param":
            check_string(value.string_param, f"{field}[{quote(key)}]", limits)


def infer_request_arrays(
    request: oip_pb2.ModelInferRequest,
    *,
    require_finite: bool = True,
    limits: RequestLimits = RequestLimits(),
) -> dict[str, np.ndarray]:
    """All inputs of an OIP ``ModelInferRequest`` by name, from raw or typed contents.

    The counts and strings of the request itself (inputs, outputs, parameters, model name, id) are
    checked against ``limits`` first, in time proportional to their number, before any tensor.

    Raises
    ------
    InvalidInput
        No inputs, more inputs or outputs than ``limits.max_tensors``, duplicate input names, a
        ``raw_input_contents`` count different from the number of inputs, raw and typed contents
        mixed, a string or parameter limit exceeded, or any per-tensor problem of
        :func:`infer_input_to_array`.
    """
    inputs = request.inputs
    if not inputs:
        raise InvalidInput("the request has no inputs; expected one input tensor")
    for field, count in (("inputs", len(inputs)), ("outputs", len(request.outputs))):
        if count > limits.max_tensors:
            raise InvalidInput(f"{field}: {count} entries; the server accepts at most {limits.max_tensors}")
    check_string(request.model_name, "model_name", limits)
    check_string(request.model_version, "model_version", limits)
    check_string(request.id, "id", limits)
    check_parameters(request.parameters, "parameters", limits)
    for output in request.outputs:
        check_string(output.name, "output name", limits)
        check_parameters(output.parameters, f"output {quote(output.name)}: parameters", limits)
    duplicates = sorted(n for n, k in Counter(t.name for t in inputs).items() if k > 1)
    if duplicates:
        raise InvalidInput(f"input name(s) given more than once: {', '.join(quote(n) for n in duplicates[:4])}")
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(inputs):
            raise InvalidInput(
                f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; expected one per input"
            )
        typed = [t.name for t in inputs if t.HasField("contents")]
        if typed:
            raise InvalidInput(
                f"input(s) {', '.join(quote(n) for n in typed[:4])} have typed contents while raw_input_contents "
                "is used; use one or the other"
            )
        return {t.name: infer_input_to_array(t, r, require_finite=require_finite, limits=limits)
                for t, r in zip(inputs, raw)}
    return {t.name: infer_input_to_array(t, None, require_finite=require_finite, limits=limits) for t in inputs}


def requested_output_names(request: oip_pb2.ModelInferRequest) -> list[str] | None:
    """Names in ``request.outputs``, or ``None`` when the client asked for every output."""
    names = [o.name for o in request.outputs]
    return names or None


def make_infer_response(
    outputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str = "",
    request_id: str = "",
    raw: bool = True,
) -> oip_pb2.ModelInferResponse:
    """Build an OIP ``ModelInferResponse`` from named arrays (in mapping order).

    Parameters
    ----------
    outputs : mapping of str to ndarray
        Numeric arrays, or arrays of str/bytes (sent as BYTES).
    raw : bool, default True
        Put the data in ``raw_output_contents`` (what Triton does; compact) rather than typed
        ``contents``; FP16 outputs need it.

    Raises
    ------
    InvalidInput
        An array dtype with no OIP datatype.
    ValueError
        FP16 output with ``raw=False``.
    """
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    datatypes = {name: oip_datatype(array.dtype) for name, array in arrays.items()}
    if not raw and "FP16" in datatypes.values():
        raise ValueError("FP16 outputs need raw=True: typed contents have no FP16 field")
    response = oip_pb2.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for name, array in arrays.items():
        datatype = datatypes[name]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=[int(d) for d in array.shape])
        if raw:
            if datatype == "BYTES":
                response.raw_output_contents.append(_serialize_bytes(array))
            else:
                le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                response.raw_output_contents.append(le.tobytes())
        else:
            field = getattr(tensor.contents, _CONTENTS_FIELD[datatype])
            flat = array.reshape(-1)
            if datatype == "BYTES":
                field.extend(x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in flat)
            else:
                field.extend(flat.tolist())
    return response


def infer_response_arrays(response: oip_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode every output of a ``ModelInferResponse`` (raw or typed), the client-side inverse."""
    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise InvalidInput(f"raw_output_contents has {len(raw)} entries for {len(response.outputs)} outputs")
    return {
        tensor.name: _decode_oip(
            f"output {tensor.name!r}", tensor.datatype, tensor.shape, tensor.contents, raw[i] if raw else None,
            batch=False, require_finite=False, limits=_UNLIMITED,
        )
        for i, tensor in enumerate(response.outputs)
    }
