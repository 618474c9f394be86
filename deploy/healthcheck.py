"""Container health check: ask the server's ``grpc.health.v1.Health`` service; exit 0 when SERVING.

Used by the image's ``HEALTHCHECK`` (Docker and compose) and usable as a Kubernetes ``exec`` probe
where the native ``grpc:`` probe cannot be used (it speaks plaintext only, so not with TLS on).
It imports only grpcio and grpcio-health-checking (runtime dependencies of the package), never the
service, so it costs one short Python start and one RPC per service checked.

Usage::

    python healthcheck.py [--address HOST:PORT] [--service NAME ...] [--timeout-s S]
                          [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--server-name NAME]]

``--address`` defaults to ``127.0.0.1:$ADVDETECT_HEALTH_PORT`` (50052 when unset): the server's
health-only port, which data-plane overload cannot refuse. ``--service`` may be
repeated; the default checks both the whole server (``""``) and ``advdetect.v1.Detector``, which the
server reports NOT_SERVING until the model and baseline are loaded and warmed up, and again while
draining after SIGTERM. Exit status: 0 when every service checked is SERVING, 1 otherwise (Docker
reads 1 as unhealthy); one line per service goes to stdout, which Docker keeps in
``docker inspect``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["DEFAULT_SERVICES", "check", "main"]

#: Health service names checked by default: the whole server and the native Detector API.
DEFAULT_SERVICES: tuple[str, ...] = ("", "advdetect.v1.Detector")
_DEFAULT_HEALTH_PORT = 50052


def _default_address() -> str:
    port = os.environ.get("ADVDETECT_HEALTH_PORT", "").strip() or str(_DEFAULT_HEALTH_PORT)
    return f"127.0.0.1:{port}"


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        if args.tls_cert is not None or args.tls_key is not None:
            raise SystemExit("healthcheck: --tls-cert/--tls-key need --tls-ca (the CA that signed the server)")
        return grpc.insecure_channel(args.address)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("healthcheck: mutual TLS needs both --tls-cert and --tls-key")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes(),
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def check(channel: grpc.Channel, services: Sequence[str], timeout_s: float) -> list[tuple[str, str]]:
    """Health status of each service: ``(service, status)`` with status a ``ServingStatus`` name
    (``SERVING``, ``NOT_SERVING``, ...) or ``RPC_<CODE>: details`` when the call failed
    (``RPC_NOT_FOUND`` for a service the server does not know, ``RPC_UNAVAILABLE`` when nothing listens).
    """
    stub = health_pb2_grpc.HealthStub(channel)
    results = []
    for service in services:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            status = f"RPC_{exc.code().name}: {exc.details()}"
        results.append((service, status))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; return 0 when every service is SERVING, else 1."""
    parser = argparse.ArgumentParser(description="gRPC health check of an advdetect server")
    parser.add_argument("--address", default=_default_address(),
                        help="host:port (default 127.0.0.1:$ADVDETECT_HEALTH_PORT, else 127.0.0.1:50052)")
    parser.add_argument("--service", action="append", default=None,
                        help="health service name, repeatable (default: '' and advdetect.v1.Detector)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of each call in seconds (default 3)")
    parser.add_argument("--tls-ca", default=None, help="PEM CA bundle that signed the server certificate")
    parser.add_argument("--tls-cert", default=None, help="client certificate chain (PEM), for mutual TLS")
    parser.add_argument("--tls-key", default=None, help="client private key (PEM), for mutual TLS")
    parser.add_argument("--server-name", default=None, help="name to verify in the server certificate")
    args = parser.parse_args(argv)
    services = tuple(args.service) if args.service is not None else DEFAULT_SERVICES
    with _channel(args) as channel:
        results = check(channel, services, args.timeout_s)
    for service, status in results:
        print(f"{args.address} {service or '(server)'}: {status}")
    return 0 if all(status == "SERVING" for _, status in results) else 1


if __name__ == "__main__":
    sys.exit(main())
