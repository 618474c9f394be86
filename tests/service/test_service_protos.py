"""The protos: stubs are current, OIP matches Triton's wire format, reflection, health, real clients."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service import protogen
from service.protocol import (
    DETECTOR_METHODS,
    DETECTOR_SERVICE,
    HEALTH_SERVICE,
    OIP_METHODS,
    OIP_SERVICE,
    DetectOptions,
    detector_pb2,
    detector_pb2_grpc,
    enable_reflection,
    oip_pb2,
    oip_pb2_grpc,
)
from service.tensors import infer_request_arrays, make_infer_response


def test_checked_in_stubs_are_current() -> None:
    problems = protogen.stale_files()
    assert problems == [], (
        f"service/_generated is stale ({problems}); run `make protos` "
        f"(installed grpcio-tools {version('grpcio-tools')})"
    )


def test_generation_is_deterministic_and_rewrites_imports(tmp_path) -> None:
    first = protogen.generate(tmp_path / "a")
    second = protogen.generate(tmp_path / "b")
    assert first == second
    names = {str(p) for p in first}
    assert {
        "__init__.py",
        "advdetect/v1/detector_pb2.py",
        "advdetect/v1/detector_pb2_grpc.py",
        "advdetect/v1/detector_pb2.pyi",
        "inference/grpc_service_pb2.py",
        "inference/grpc_service_pb2_grpc.py",
    } <= names
    for rel in first:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    grpc_module = (tmp_path / "a" / "inference/grpc_service_pb2_grpc.py").read_text()
    assert "from service._generated.inference import grpc_service_pb2" in grpc_module
    pb2 = (tmp_path / "a" / "advdetect/v1/detector_pb2.py").read_text()
    assert "_POOL.AddSerializedFile(" in pb2 and "Default().AddSerializedFile" not in pb2


def test_stale_stub_is_detected(tmp_path) -> None:
    out = tmp_path / "gen"
    protogen.generate(out)
    assert protogen.stale_files(out) == []
    target = out / "advdetect/v1/detector_pb2.py"
    target.write_text(target.read_text() + "# edited by hand\n")
    (out / "inference/extra_pb2.py").write_text("# left over\n")
    problems = protogen.stale_files(out)
    assert "advdetect/v1/detector_pb2.py (differs)" in problems
    assert "inference/extra_pb2.py (not generated any more)" in problems


def _fields(message) -> dict[str, tuple[int, int, bool]]:
    return {f.name: (f.number, f.type, f.is_repeated) for f in message.fields}


def _walk(message, prefix=""):
    yield prefix + message.name, message
    for nested in message.nested_types:
        yield from _walk(nested, prefix + message.name + ".")


def test_oip_messages_match_tritonclient_wire_format() -> None:
    from tritonclient.grpc import service_pb2 as triton

    ours = oip_pb2.DESCRIPTOR
    assert ours.package == triton.DESCRIPTOR.package == "inference"
    compared = 0
    for top in ours.message_types_by_name.values():
        for name, message in _walk(top):
            theirs = triton.DESCRIPTOR.pool.FindMessageTypeByName(f"inference.{name}")
            assert _fields(message) == _fields(theirs), name
            compared += 1
    assert compared >= 20
    service, triton_service = ours.services_by_name["GRPCInferenceService"], triton.DESCRIPTOR.services_by_name[
        "GRPCInferenceService"
    ]
    assert OIP_METHODS == ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
    for method in service.methods:
        twin = triton_service.methods_by_name[method.name]
        assert method.input_type.full_name == twin.input_type.full_name
        assert method.output_type.full_name == twin.output_type.full_name


def test_detector_service_shape() -> None:
    assert DETECTOR_SERVICE == "advdetect.v1.Detector"
    assert DETECTOR_METHODS == ("Detect", "DetectStream", "GetBaselineInfo")
    stream = detector_pb2.DESCRIPTOR.services_by_name["Detector"].methods_by_name["DetectStream"]
    assert stream.client_streaming and stream.server_streaming
    result = detector_pb2.InputResult(predicted_class=3, scores={"topology": 1.5}, p_values={"topology": 0.01})
    result.flags.add(name="adversarial", reasons=["topology p=0.01"])
    back = detector_pb2.InputResult.FromString(result.SerializeToString())
    assert back.scores["topology"] == 1.5 and back.flags[0].reasons == ["topology p=0.01"]
    # Unset options mean "yes"; an explicit false is kept.
    assert vars_of(DetectOptions.from_proto(detector_pb2.DetectOptions())) == (True, True)
    explicit = detector_pb2.DetectOptions(return_probabilities=False)
    assert vars_of(DetectOptions.from_proto(explicit)) == (False, True)


def vars_of(options: DetectOptions) -> tuple[bool, bool]:
    return options.return_probabilities, options.include_scores


class _EchoOip(oip_pb2_grpc.GRPCInferenceServiceServicer):
    """A minimal OIP model: output ``doubled`` = 2 * input, and one BYTES ``flags`` entry per input."""

    def ServerLive(self, request, context):
        return oip_pb2.ServerLiveResponse(live=True)

    def ModelMetadata(self, request, context):
        response = oip_pb2.ModelMetadataResponse(name=request.name, versions=["1"], platform="onnxruntime_onnx")
        response.inputs.add(name="x", datatype="FP32", shape=[-1, 1, 8, 8])
        response.outputs.add(name="doubled", datatype="FP32", shape=[-1, 1, 8, 8])
        response.outputs.add(name="flags", datatype="BYTES", shape=[-1])
        return response

    def ModelInfer(self, request, context):
        x = infer_request_arrays(request)["x"]
        flags = np.array(["adversarial" if v > 0.5 else "" for v in x.reshape(len(x), -1).mean(axis=1)], dtype=object)
        return make_infer_response(
            {"doubled": 2 * x, "flags": flags}, model_name=request.model_name, request_id=request.id
        )


def test_tritonclient_and_our_stubs_share_a_process(grpc_server) -> None:
    import tritonclient.grpc as triton

    port = grpc_server(lambda s: oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoOip(), s))
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_live()
        meta = client.get_model_metadata("digits", as_json=True)
        assert meta["name"] == "digits"
        assert [o["name"] for o in meta["outputs"]] == ["doubled", "flags"]
        assert meta["inputs"][0]["shape"] == ["-1", "1", "8", "8"]  # int64 travels as a JSON string
        x = np.zeros((3, 1, 8, 8), dtype=np.float32)
        x[1] = 0.75
        x[2] = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("digits", [inp], request_id="req-7")
        np.testing.assert_array_equal(result.as_numpy("doubled"), 2 * x)
        assert result.as_numpy("flags").tolist() == [b"", b"adversarial", b""]
        assert result.get_response().id == "req-7"
    finally:
        client.close()


def test_reflection_and_health_list_and_describe_services(grpc_server) -> None:
    health_servicer = health.HealthServicer()

    def add(server):
        detector_pb2_grpc.add_DetectorServicer_to_server(detector_pb2_grpc.DetectorServicer(), server)
        oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoOip(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        enable_reflection(server)

    port = grpc_server(add)
    health_servicer.set(DETECTOR_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == {
            DETECTOR_SERVICE, OIP_SERVICE, HEALTH_SERVICE, "grpc.reflection.v1alpha.ServerReflection"
        }
        pool = descriptor_pool.DescriptorPool(database)
        detector = pool.FindServiceByName(DETECTOR_SERVICE)
        assert [m.name for m in detector.methods] == list(DETECTOR_METHODS)
        infer = pool.FindServiceByName(OIP_SERVICE).methods_by_name["ModelInfer"]
        assert infer.input_type.fields_by_name["raw_input_contents"].number == 7
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=DETECTOR_SERVICE), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        health_servicer.set(DETECTOR_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        status = stub.Check(health_pb2.HealthCheckRequest(service=DETECTOR_SERVICE), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        # The generated default servicer answers UNIMPLEMENTED, and that reaches the client as such.
        with pytest.raises(grpc.RpcError) as info:
            detector_pb2_grpc.DetectorStub(channel).GetBaselineInfo(detector_pb2.GetBaselineInfoRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_service_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import service.protocol, service.tensors, service.errors, service.metrics, service.settings, service.audit\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
