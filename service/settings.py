"""How to run the service: a pydantic-settings model read from the environment or a TOML file.

Settings (ports, limits, TLS, audit log) are kept apart from the baseline manifest (what to serve
and how it was calibrated), as MLServer keeps ``Settings`` apart from ``ModelSettings``.

Sources, highest priority first: keyword arguments (the CLI's flags), environment variables
``ADVDETECT_<FIELD>`` (e.g. ``ADVDETECT_GRPC_PORT=50052``), the TOML file given to
:func:`load_settings` (flat keys named like the fields), then the defaults. Units are in the
names (``grace_period_s``, ``max_message_bytes``). Everything is checked at start, and
:func:`load_settings` reports every problem at once in a :class:`SettingsError`.

Example TOML::

    model_path = "build/models/digits_cnn.onnx"
    baseline_path = "build/baselines/digits_cnn"
    grpc_port = 50051
    metrics_port = 9100
    audit_log_path = "/var/log/advdetect/audit.jsonl"
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from detector.errors import AdvDetectError

if TYPE_CHECKING:  # pragma: no cover
    from service.tensors import RequestLimits

__all__ = ["ServiceSettings", "SettingsError", "load_settings", "ENV_PREFIX"]

ENV_PREFIX = "ADVDETECT_"
_MIB = 2**20
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: The TOML file of the settings being built (set by :func:`load_settings` for one call).
_TOML_FILE: ContextVar[Path | None] = ContextVar("advdetect_settings_toml", default=None)


class SettingsError(AdvDetectError, ValueError):
    """The service's settings are invalid; the message lists every problem, one per line."""


class ServiceSettings(BaseSettings):
    """Settings of the advdetect gRPC server. Frozen once built.

    Parameters
    ----------
    model_path : Path
        The ONNX classifier; must be an existing file.
    baseline_path : Path
        The calibrated baseline (a directory with ``manifest.json``); must exist.
    model_name : str or None, default None
        The name clients use; defaults to the model file's stem (``digits_cnn.onnx`` ->
        ``digits_cnn``). Letters, digits, ``_ . -``.
    grpc_host : str, default "0.0.0.0"
    grpc_port : int, default 50051
        0 picks a free port (tests).
    health_port : int, default 50052
        A second gRPC server on ``grpc_host`` with only ``grpc.health.v1.Health``, its own threads and no
        in-flight bound: probes there are answered however many data-plane calls arrive (the health
        service on ``grpc_port`` shares that port's bound and may be refused under overload). Same TLS
        settings as ``grpc_port``; 0 picks a free port.
    metrics_host : str, default "0.0.0.0"
    metrics_port : int, default 9100
        Prometheus ``/metrics`` over HTTP; 0 picks a free port.
    processes : int, default 1
        Server processes sharing the gRPC port (SO_REUSEPORT; :mod:`service.workers`). Python threads
        share one interpreter lock, so one process uses about 1.4 cores under load; set this to the
        number of cores the server may use. Each process holds its own copy of the model and
        baseline, population window and audit file; connections, not requests, are balanced.
    workers : int, default 4
        Calls of the application services computed at once, per process; admitted calls beyond
        it wait for a free worker.
    max_inflight_requests : int, default 64
        Calls of the application services admitted at once (per process, running or waiting for a
        worker); a call beyond it gets RESOURCE_EXHAUSTED at once, before its request is decoded.
    max_batch_size : int, default 256
        Largest batch (inputs per request) accepted.
    max_request_tensors : int, default 16
        Most input tensors, and most requested outputs, in one Open Inference Protocol request.
    max_tensor_dims : int, default 8
        Most dimensions of a tensor's shape.
    max_tensor_elements : int, default 2**24
        Most elements of one input tensor (the product of its shape).
    max_request_parameters : int, default 16
        Most ``parameters`` entries of an Open Inference Protocol request and of each of its tensors.
    max_string_bytes : int, default 256
        Longest client string: model name, request id, tensor and output names, dtype, parameter
        keys and string values.
    max_message_bytes : int, default 16 MiB
        Largest gRPC message received or sent.
    grace_period_s : float, default 10.0
        On SIGTERM, how long in-flight calls may take to finish.
    tls_cert_path, tls_key_path : Path or None
        Server certificate chain and private key (PEM); both or neither.
    tls_ca_path : Path or None
        CA bundle (PEM) of client certificates; when given, clients must present one (mutual TLS).
    audit_log_path : Path or None, default None
        JSON-lines audit log of flagged inputs; ``None`` disables it. Its folder must exist.
    audit_max_bytes : int, default 64 MiB
        Rotate the audit log when it would grow past this size.
    audit_backups : int, default 5
        Rotated files kept (``audit.jsonl.1`` ... ``audit.jsonl.N``).
    audit_flush_batch_size : int, default 64
        Records written and fsync'ed together.
    audit_flush_interval_s : float, default 1.0
        Longest a record waits before its batch is flushed.
    audit_include_inputs : bool, default False
        Store each flagged input in the audit log (base64 of its ``.npy`` bytes).
    audit_sync : bool, default False
        Answer a request with flagged inputs only once their records are written and fsync'ed (a
        SIGKILL then loses no record whose response was sent); the writer then flushes whatever is
        queued at once instead of waiting ``audit_flush_interval_s`` for a batch to fill.
    population_window_size : int, default 256
        Inputs in the rolling window behind the population metrics.
    flagged_scores_only : bool, default True
        Compute only the scores some flag fuses (:meth:`detector.pipeline.Detector.load`): the same flags
        at less cost (feature squeezing's extra model runs only when a flag fuses it); responses, metrics
        and audit records then carry those scores only. False computes and returns every calibrated score
        (for investigation): 2-4x the model's own time on ResNet, MobileNetV2 and ViT models, against
        0.03-0.9x for the flagged scores (``bench/results/scale*.md``).
    log_level : {"DEBUG", "INFO", "WARNING", "ERROR"}, default "INFO"
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        validate_default=True,
        case_sensitive=False,
    )

    model_path: Path
    baseline_path: Path
    model_name: str | None = None

    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(50051, ge=0, le=65535)
    health_port: int = Field(50052, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9100, ge=0, le=65535)

    processes: int = Field(1, ge=1, le=64)
    workers: int = Field(4, ge=1, le=256)
    max_inflight_requests: int = Field(64, ge=1)
    max_batch_size: int = Field(256, ge=1)
    max_request_tensors: int = Field(16, ge=1)
    max_tensor_dims: int = Field(8, ge=2, le=64)
    max_tensor_elements: int = Field(2**24, ge=1)
    max_request_parameters: int = Field(16, ge=0)
    max_string_bytes: int = Field(256, ge=16)
    max_message_bytes: int = Field(16 * _MIB, ge=1024, le=2**31 - 1)
    grace_period_s: float = Field(10.0, ge=0.0)

    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    tls_ca_path: Path | None = None

    audit_log_path: Path | None = None
    audit_max_bytes: int = Field(64 * _MIB, ge=4096)
    audit_backups: int = Field(5, ge=1, le=1000)
    audit_flush_batch_size: int = Field(64, ge=1)
    audit_flush_interval_s: float = Field(1.0, gt=0.0)
    audit_include_inputs: bool = False
    audit_sync: bool = False

    population_window_size: int = Field(256, ge=2)
    flagged_scores_only: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _TOML_FILE.get()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @field_validator("model_name", "tls_cert_path", "tls_key_path", "tls_ca_path", "audit_log_path", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # ADVDETECT_TLS_CA_PATH= (empty) means "not set", not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        problems: list[str] = []
        if not self.model_path.is_file():
            problems.append(f"model_path: {self.model_path} is not an existing file (expected an ONNX model)")
        if not self.baseline_path.exists():
            problems.append(f"baseline_path: {self.baseline_path} does not exist (expected a baseline directory)")
        if self.model_name is None:
            object.__setattr__(self, "model_name", self.model_path.stem)
        if not _MODEL_NAME.match(self.model_name or ""):
            problems.append(
                f"model_name: {self.model_name!r} is not a valid name (letters, digits, '_', '.', '-'; "
                "starting with a letter or digit)"
            )
        ports = {"grpc_port": self.grpc_port, "health_port": self.health_port, "metrics_port": self.metrics_port}
        for i, (name, port) in enumerate(ports.items()):
            for other, other_port in list(ports.items())[i + 1:]:
                if port != 0 and port == other_port:
                    problems.append(f"{other}: {other_port} is also {name}; each needs its own port")
        if self.tls_key_path is not None and self.tls_cert_path is None:
            problems.append("tls_key_path is set without tls_cert_path; TLS needs both the certificate and the key")
        if self.tls_cert_path is not None and self.tls_key_path is None:
            problems.append("tls_cert_path is set without tls_key_path; TLS needs both the certificate and the key")
        if self.tls_ca_path is not None and (self.tls_cert_path is None or self.tls_key_path is None):
            problems.append(
                "tls_ca_path is set without tls_cert_path and tls_key_path; mutual TLS needs the server's own "
                "certificate and key too"
            )
        for field in ("tls_cert_path", "tls_key_path", "tls_ca_path"):
            path = getattr(self, field)
            if path is not None and not path.is_file():
                problems.append(f"{field}: {path} is not an existing file (expected PEM)")
        if self.audit_log_path is not None:
            if self.audit_log_path.is_dir():
                problems.append(f"audit_log_path: {self.audit_log_path} is a directory; expected a file path")
            elif not self.audit_log_path.parent.is_dir():
                problems.append(f"audit_log_path: folder {self.audit_log_path.parent} does not exist")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- derived values ---------------------------------------------------------------------------
    @property
    def tls_enabled(self) -> bool:
        """True when the server speaks TLS."""
        return self.tls_cert_path is not None

    @property
    def mutual_tls(self) -> bool:
        """True when clients must present a certificate signed by ``tls_ca_path``."""
        return self.tls_ca_path is not None

    @property
    def grpc_address(self) -> str:
        """``host:port`` for ``server.add_*_port`` (IPv6 hosts in brackets)."""
        return f"{self._bracketed_host}:{self.grpc_port}"

    @property
    def health_address(self) -> str:
        """``host:port`` of the health server (:attr:`grpc_host`, IPv6 in brackets)."""
        return f"{self._bracketed_host}:{self.health_port}"

    @property
    def _bracketed_host(self) -> str:
        host = self.grpc_host
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    def server_credentials(self) -> Any:
        """``grpc.ssl_server_credentials`` from the TLS files, or ``None`` without TLS.

        With ``tls_ca_path`` the credentials require and verify client certificates.
        """
        if not self.tls_enabled:
            return None
        import grpc

        assert self.tls_cert_path is not None and self.tls_key_path is not None
        ca = self.tls_ca_path.read_bytes() if self.tls_ca_path is not None else None
        return grpc.ssl_server_credentials(
            [(self.tls_key_path.read_bytes(), self.tls_cert_path.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def request_limits(self) -> RequestLimits:
        """The per-request cost bounds the decoders check (:class:`service.tensors.RequestLimits`)."""
        from service.tensors import RequestLimits

        return RequestLimits(max_batch_size=self.max_batch_size, max_tensors=self.max_request_tensors,
                             max_dims=self.max_tensor_dims, max_elements=self.max_tensor_elements,
                             max_parameters=self.max_request_parameters, max_string_bytes=self.max_string_bytes)

    def grpc_options(self) -> list[tuple[str, int]]:
        """Server options: ``max_message_bytes`` for received and sent messages; with several
        processes, ``SO_REUSEPORT`` so that they can bind the same port."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", int(self.processes > 1)),
        ]


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if loc:
            env = f"{ENV_PREFIX}{loc.upper()}"
            shown = f" (got {item['input']!r})" if item["type"] not in {"missing", "extra_forbidden"} else ""
            if item["type"] == "missing":
                message = f"required (set {env}, the TOML key {loc!r} or the command-line flag)"
            elif item["type"] == "extra_forbidden":
                message = "unknown setting (a typo?)"
            lines.append(f"  {loc} [{env}]: {message}{shown}")
        else:
            lines.extend(f"  {part}" for part in message.split("\n"))
    return "invalid service settings:\n" + "\n".join(lines)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServiceSettings:
    """Build and validate :class:`ServiceSettings`.

    Parameters
    ----------
    config_file : str or Path or None
        A TOML file with flat keys named like the fields.
    **overrides
        Values that win over the environment and the file (the CLI's flags); ``None`` values are
        ignored, so unset flags fall through.

    Returns
    -------
    ServiceSettings

    Raises
    ------
    SettingsError
        The file is missing or not valid TOML, or any value is invalid; the message lists every
        problem with its environment variable.
    """
    values = {key: value for key, value in overrides.items() if value is not None}
    toml_path = None
    if config_file is not None:
        toml_path = Path(config_file)
        if not toml_path.is_file():
            raise SettingsError(f"invalid service settings:\n  config file {toml_path} does not exist")
    token = _TOML_FILE.set(toml_path)
    try:
        return ServiceSettings(**values)
    except ValidationError as exc:
        raise SettingsError(_format_error(exc)) from None
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise SettingsError(f"invalid service settings:\n  config file {toml_path}: {exc}") from None
    finally:
        _TOML_FILE.reset(token)
