from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class DetectOptions(_message.Message):
    __slots__ = ("return_probabilities", "include_scores")
    RETURN_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SCORES_FIELD_NUMBER: _ClassVar[int]
    return_probabilities: bool
    include_scores: bool
    def __init__(self, return_probabilities: _Optional[bool] = ..., include_scores: _Optional[bool] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("model_name", "request_id", "inputs", "options")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    request_id: str
    inputs: Tensor
    options: DetectOptions
    def __init__(self, model_name: _Optional[str] = ..., request_id: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., options: _Optional[_Union[DetectOptions, _Mapping]] = ...) -> None: ...

class Flag(_message.Message):
    __slots__ = ("name", "reasons")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class InputResult(_message.Message):
    __slots__ = ("predicted_class", "probabilities", "scores", "p_values", "flags")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    P_VALUES_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    predicted_class: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    scores: _containers.ScalarMap[str, float]
    p_values: _containers.ScalarMap[str, float]
    flags: _containers.RepeatedCompositeFieldContainer[Flag]
    def __init__(self, predicted_class: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., scores: _Optional[_Mapping[str, float]] = ..., p_values: _Optional[_Mapping[str, float]] = ..., flags: _Optional[_Iterable[_Union[Flag, _Mapping]]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("model_name", "request_id", "results", "baseline_version", "error")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[InputResult]
    baseline_version: str
    error: Error
    def __init__(self, model_name: _Optional[str] = ..., request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[InputResult, _Mapping]]] = ..., baseline_version: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetBaselineInfoRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class BaselineInfo(_message.Message):
    __slots__ = ("model_name", "baseline_version", "model_sha256", "schema_version", "input_shape", "input_dtype", "num_classes", "layers", "scores", "flags", "thresholds", "metadata")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    baseline_version: str
    model_sha256: str
    schema_version: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: str
    num_classes: int
    layers: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[str]
    flags: _containers.RepeatedScalarFieldContainer[str]
    thresholds: _containers.ScalarMap[str, float]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, model_name: _Optional[str] = ..., baseline_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., schema_version: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[str] = ..., num_classes: _Optional[int] = ..., layers: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[str]] = ..., flags: _Optional[_Iterable[str]] = ..., thresholds: _Optional[_Mapping[str, float]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
