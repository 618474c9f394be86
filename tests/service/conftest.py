"""Fixtures of the service tests: fresh metric registries, a clean environment, real gRPC servers, a test CA."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry


#: Set to 1 (``.ci/run`` does) to make a missing Prometheus binary fail the tests that need it instead of
#: skipping them, so CI cannot pass without running them.
REQUIRE_PROMETHEUS_ENV = "ADVDETECT_REQUIRE_PROMETHEUS"


def _prometheus_tool(name: str) -> str:
    """The path of ``prometheus`` or ``promtool`` (Debian's ``prometheus`` package).

    When the binary is missing the calling test is skipped with the install command, or fails when
    ``ADVDETECT_REQUIRE_PROMETHEUS=1``.
    """
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not on PATH (Debian/Ubuntu: apt-get install prometheus)"
        if os.environ.get(REQUIRE_PROMETHEUS_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_PROMETHEUS_ENV}=1 requires it")
        pytest.skip(reason)
    return path


@pytest.fixture
def promtool() -> str:
    """promtool's path (skips, or fails under ``ADVDETECT_REQUIRE_PROMETHEUS=1``, when it is missing)."""
    return _prometheus_tool("promtool")


@pytest.fixture
def prometheus_binary() -> str:
    """The Prometheus server's path (skips, or fails under ``ADVDETECT_REQUIRE_PROMETHEUS=1``, when missing)."""
    return _prometheus_tool("prometheus")


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh Prometheus registry (never the global one)."""
    return CollectorRegistry()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove every ``ADVDETECT_*`` variable so settings tests see only what they set."""
    for key in list(os.environ):
        if key.upper().startswith("ADVDETECT_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture
def grpc_server() -> Iterator[Callable[..., int]]:
    """Factory: ``port = grpc_server(add, interceptors=(), workers=4)`` starts a real server.

    ``add(server)`` registers servicers; the server listens on 127.0.0.1 on a free port (bound to
    port 0) and is stopped at teardown.
    """
    servers: list[grpc.Server] = []

    def start(
        add: Callable[[grpc.Server], None],
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        workers: int = 4,
        options: Sequence[tuple[str, int]] = (),
    ) -> int:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers), interceptors=list(interceptors), options=list(options)
        )
        add(server)
        port = server.add_insecure_port("127.0.0.1:0")
        assert port > 0
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(grace=None).wait(5)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _certificate(subject: str, issuer_name, issuer_key, public_key, *, ca: bool, sans=()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), name


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA made for the test session, a server certificate it signs (SAN 127.0.0.1 and localhost),
    a client certificate it signs, and an unrelated CA (for "wrong CA" checks)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("tls")
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, ca_name = _certificate("advdetect test CA", None, ca_key, ca_key.public_key(), ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert, _ = _certificate(
        "localhost", ca_name, ca_key, server_key.public_key(), ca=False,
        sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert, _ = _certificate("advdetect test client", ca_name, ca_key, client_key.public_key(), ca=False)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_cert, _ = _certificate("unrelated CA", None, other_key, other_key.public_key(), ca=True)
    files = TlsFiles(
        ca_cert=folder / "ca.pem", server_cert=folder / "server.pem", server_key=folder / "server.key",
        client_cert=folder / "client.pem", client_key=folder / "client.key", other_ca_cert=folder / "other-ca.pem",
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_key(files.server_key, server_key)
    files.client_cert.write_bytes(client_cert.public_bytes(pem))
    _write_key(files.client_key, client_key)
    files.other_ca_cert.write_bytes(other_cert.public_bytes(pem))
    return files
