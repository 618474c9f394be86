"""Service settings: environment, TOML, priorities, every validation error, TLS credentials that work."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from service.protocol import oip_pb2, oip_pb2_grpc
from service.settings import ServiceSettings, SettingsError, load_settings


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A model file and a baseline folder to point at (settings only check that they exist)."""
    model = tmp_path / "digits_cnn.onnx"
    model.write_bytes(b"onnx bytes are not read by the settings")
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    return {"model": model, "baseline": baseline, "dir": tmp_path}


def test_defaults_and_derived_values(files, clean_env) -> None:
    settings = load_settings(model_path=files["model"], baseline_path=files["baseline"])
    assert settings.model_name == "digits_cnn"
    assert (settings.grpc_port, settings.metrics_port, settings.workers) == (50051, 9100, 4)
    assert settings.max_message_bytes == 16 * 2**20 and settings.grace_period_s == 10.0
    assert settings.audit_log_path is None and not settings.tls_enabled and not settings.mutual_tls
    assert settings.grpc_address == "0.0.0.0:50051"
    assert settings.server_credentials() is None
    assert dict(settings.grpc_options())["grpc.max_receive_message_length"] == 16 * 2**20
    with pytest.raises(ValidationError, match="frozen"):
        settings.grpc_port = 1  # type: ignore[misc]


def test_environment_variables(files, clean_env) -> None:
    env = {
        "ADVDETECT_MODEL_PATH": str(files["model"]),
        "ADVDETECT_BASELINE_PATH": str(files["baseline"]),
        "ADVDETECT_MODEL_NAME": "lenet5",
        "ADVDETECT_GRPC_HOST": "::1",
        "ADVDETECT_GRPC_PORT": "6000",
        "ADVDETECT_METRICS_PORT": "0",
        "ADVDETECT_GRACE_PERIOD_S": "2.5",
        "ADVDETECT_AUDIT_LOG_PATH": str(files["dir"] / "audit.jsonl"),
        "ADVDETECT_AUDIT_INCLUDE_INPUTS": "true",
        "ADVDETECT_TLS_CA_PATH": "",  # empty means unset
        "advdetect_log_level": "debug",
    }
    for key, value in env.items():
        clean_env.setenv(key, value)
    settings = load_settings()
    assert settings.model_name == "lenet5"
    assert settings.grpc_port == 6000 and settings.metrics_port == 0
    assert settings.grpc_address == "[::1]:6000"
    assert settings.grace_period_s == 2.5
    assert settings.audit_log_path == files["dir"] / "audit.jsonl" and settings.audit_include_inputs is True
    assert settings.tls_ca_path is None
    assert settings.log_level == "DEBUG"


def test_toml_file_and_priorities(files, clean_env) -> None:
    config = files["dir"] / "advdetect.toml"
    config.write_text(
        f'model_path = "{files["model"]}"\n'
        f'baseline_path = "{files["baseline"]}"\n'
        "grpc_port = 7000\nmetrics_port = 7001\nworkers = 2\nmax_batch_size = 32\n"
        "audit_flush_interval_s = 0.25\n"
    )
    settings = load_settings(config)
    assert (settings.grpc_port, settings.metrics_port, settings.workers, settings.max_batch_size) == (7000, 7001, 2, 32)
    assert settings.audit_flush_interval_s == 0.25
    clean_env.setenv("ADVDETECT_WORKERS", "3")
    assert load_settings(config).workers == 3  # the environment beats the file
    assert load_settings(config, workers=5, grpc_port=None).workers == 5  # flags beat both; None is "not given"
    assert load_settings(config, workers=5).grpc_port == 7000
    # A TOML file does not leak into the next settings built without it.
    with pytest.raises(SettingsError, match="model_path .*required"):
        load_settings()


def _error(**kwargs) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(**kwargs)
    return str(info.value)


def test_missing_required_values_name_their_variables(clean_env) -> None:
    message = _error()
    assert message.startswith("invalid service settings:")
    assert "model_path [ADVDETECT_MODEL_PATH]: required" in message
    assert "baseline_path [ADVDETECT_BASELINE_PATH]: required" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"grpc_port": 70000}, "grpc_port [ADVDETECT_GRPC_PORT]: Input should be less than or equal to 65535 (got 70000)"),
        ({"metrics_port": -1}, "metrics_port [ADVDETECT_METRICS_PORT]: Input should be greater than or equal to 0"),
        ({"workers": 0}, "workers [ADVDETECT_WORKERS]: Input should be greater than or equal to 1"),
        ({"max_inflight_requests": 0}, "max_inflight_requests [ADVDETECT_MAX_INFLIGHT_REQUESTS]"),
        ({"max_message_bytes": 10}, "max_message_bytes [ADVDETECT_MAX_MESSAGE_BYTES]: Input should be greater than or equal to 1024"),
        ({"grace_period_s": -1}, "grace_period_s [ADVDETECT_GRACE_PERIOD_S]"),
        ({"audit_flush_interval_s": 0}, "audit_flush_interval_s [ADVDETECT_AUDIT_FLUSH_INTERVAL_S]: Input should be greater than 0"),
        ({"audit_backups": 0}, "audit_backups [ADVDETECT_AUDIT_BACKUPS]"),
        ({"population_window_size": 1}, "population_window_size [ADVDETECT_POPULATION_WINDOW_SIZE]"),
        ({"grpc_port": "not-a-port"}, "grpc_port [ADVDETECT_GRPC_PORT]: Input should be a valid integer"),
        ({"log_level": "chatty"}, "log_level [ADVDETECT_LOG_LEVEL]"),
        ({"grpc_port": 9100}, "metrics_port: 9100 is also grpc_port; each needs its own port"),
        ({"health_port": 50051}, "health_port: 50051 is also grpc_port; each needs its own port"),
        ({"model_name": "my model!"}, "model_name: 'my model!' is not a valid name"),
    ],
)
def test_value_errors(files, clean_env, overrides, expected) -> None:
    assert expected in _error(model_path=files["model"], baseline_path=files["baseline"], **overrides)


def test_file_errors(files, clean_env) -> None:
    message = _error(model_path=files["dir"] / "nope.onnx", baseline_path=files["dir"] / "no-baseline")
    assert "model_path: " in message and "nope.onnx is not an existing file (expected an ONNX model)" in message
    assert "no-baseline does not exist (expected a baseline directory)" in message
    message = _error(model_path=files["model"], baseline_path=files["baseline"], audit_log_path=files["dir"] / "x" / "a.jsonl")
    assert f"audit_log_path: folder {files['dir'] / 'x'} does not exist" in message
    message = _error(model_path=files["model"], baseline_path=files["baseline"], audit_log_path=files["baseline"])
    assert "is a directory; expected a file path" in message


def test_tls_errors(files, clean_env, tls_files) -> None:
    base = {"model_path": files["model"], "baseline_path": files["baseline"]}
    assert "tls_key_path is set without tls_cert_path" in _error(**base, tls_key_path=tls_files.server_key)
    assert "tls_cert_path is set without tls_key_path" in _error(**base, tls_cert_path=tls_files.server_cert)
    assert "tls_ca_path is set without tls_cert_path and tls_key_path" in _error(**base, tls_ca_path=tls_files.ca_cert)
    missing = files["dir"] / "missing.pem"
    message = _error(**base, tls_cert_path=missing, tls_key_path=tls_files.server_key)
    assert f"tls_cert_path: {missing} is not an existing file (expected PEM)" in message


def test_toml_errors(files, clean_env) -> None:
    absent = files["dir"] / "absent.toml"
    assert f"config file {absent} does not exist" in _error(config_file=absent)
    typo = files["dir"] / "typo.toml"
    typo.write_text(f'model_path = "{files["model"]}"\nbaseline_path = "{files["baseline"]}"\ngrcp_port = 1\n')
    assert "grcp_port [ADVDETECT_GRCP_PORT]: unknown setting (a typo?)" in _error(config_file=typo)
    broken = files["dir"] / "broken.toml"
    broken.write_text("grpc_port = = 3\n")
    message = _error(config_file=broken)
    assert f"config file {broken}" in message


def test_mutual_tls_credentials_work_on_a_real_server(files, clean_env, tls_files) -> None:
    settings = load_settings(
        model_path=files["model"], baseline_path=files["baseline"],
        tls_cert_path=tls_files.server_cert, tls_key_path=tls_files.server_key, tls_ca_path=tls_files.ca_cert,
    )
    assert settings.tls_enabled and settings.mutual_tls
    assert isinstance(settings, ServiceSettings)

    class Live(oip_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return oip_pb2.ServerLiveResponse(live=True)

    server = grpc.server(futures.ThreadPoolExecutor(2), options=settings.grpc_options())
    oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Live(), server)
    port = server.add_secure_port("127.0.0.1:0", settings.server_credentials())
    server.start()
    try:
        ca = tls_files.ca_cert.read_bytes()
        good = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=tls_files.client_key.read_bytes(),
            certificate_chain=tls_files.client_cert.read_bytes(),
        )
        with grpc.secure_channel(f"127.0.0.1:{port}", good) as channel:
            assert oip_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip_pb2.ServerLiveRequest(), timeout=5).live
        # Without a client certificate, mutual TLS refuses the call.
        anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(f"127.0.0.1:{port}", anonymous) as channel:
            with pytest.raises(grpc.RpcError) as info:
                oip_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip_pb2.ServerLiveRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA does not accept the server.
        wrong = grpc.ssl_channel_credentials(
            root_certificates=tls_files.other_ca_cert.read_bytes(),
            private_key=tls_files.client_key.read_bytes(),
            certificate_chain=tls_files.client_cert.read_bytes(),
        )
        with grpc.secure_channel(f"127.0.0.1:{port}", wrong) as channel:
            with pytest.raises(grpc.RpcError) as info:
                oip_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip_pb2.ServerLiveRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None).wait(5)
