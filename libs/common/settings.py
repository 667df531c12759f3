"""Typed settings shared by every service.

Each service subclasses `ServiceSettings` with its own env prefix (`LIVELOOP_<SERVICE>_`).
Settings are read once, in the service's `__main__`, and passed on; nothing else reads os.environ.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.common.tls import ChannelTls


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class EventLoop(enum.StrEnum):
    # libuv's loop: 10% less CPU per Ping, 3% per Invoke (bench/invoke_throughput.py)
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class TracingExporter(enum.StrEnum):
    NONE = "none"
    CONSOLE = "console"
    OTLP = "otlp"


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address the gRPC server binds")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics port; unset disables it"
    )
    log_format: LogFormat = LogFormat.TEXT
    log_level: LogLevel = LogLevel.INFO
    auth_enabled: bool = Field(True, description="Require API keys (health and reflection stay open)")
    api_keys_file: Path | None = Field(None, description="JSON file of hashed API keys")
    tracing_exporter: TracingExporter = TracingExporter.NONE
    otlp_endpoint: str = "http://127.0.0.1:4317"
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate of this server: with tls_key_file, it serves TLS only"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="Mutual TLS: clients must present a certificate signed by this CA (PEM)"
    )
    tls_ca_file: Path | None = Field(
        None,
        description="CA (PEM) this service trusts for its own calls to other services; set, those "
        "calls use TLS and present tls_cert_file as the client certificate",
    )
    shutdown_drain_seconds: float = Field(
        1.0, ge=0, description="After NOT_SERVING, how long to wait for balancers to notice"
    )
    shutdown_grace_seconds: float = Field(5.0, ge=0, description="Grace for in-flight RPCs on stop")
    event_loop: EventLoop = Field(EventLoop.UVLOOP, description="The asyncio event loop the service runs on")
    max_concurrent_rpcs: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="RPCs in flight at once (streams included); one more is answered RESOURCE_EXHAUSTED "
        "at once instead of queueing behind them",
    )

    @model_validator(mode="after")
    def _tls_files_come_in_pairs(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "tls_client_ca_file: mutual TLS needs the server's own tls_cert_file and tls_key_file"
            )
        return self

    def outgoing_tls(self) -> ChannelTls | None:
        """How this service calls the others: TLS when tls_ca_file is set, with its own certificate."""
        if self.tls_ca_file is None:
            return None
        return ChannelTls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)


class ClientSettings(BaseSettings):
    """Where a command-line client finds the stack."""

    model_config = SettingsConfigDict(env_prefix="LIVELOOP_", extra="ignore", frozen=True)

    target: str | None = Field(None, description="Front door host:port; default: the local stack's Envoy")
    api_key: str | None = None
    deadline_seconds: float = Field(10.0, gt=0)
    tls_ca_file: Path | None = Field(
        None,
        description="Call the front door over TLS, trusting this CA (PEM); default: plaintext, "
        "or the local stack's own CA when it runs TLS",
    )
    tls_cert_file: Path | None = Field(
        None, description="Client certificate (PEM), where the front door asks for one"
    )
    tls_key_file: Path | None = Field(None, description="Private key of tls_cert_file")

    def front_door_tls(self) -> ChannelTls | None:
        if self.tls_ca_file is None:
            return None
        return ChannelTls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(settings_class: type[SettingsT]) -> SettingsT:
    """Read settings from the environment; on a bad value exit naming the variable."""
    try:
        return settings_class()
    except ValidationError as exc:
        prefix = str(settings_class.model_config.get("env_prefix", ""))
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            lines.append(f"  {prefix}{field.upper()}: {error['msg']} (got {error.get('input')!r})")
        sys.stderr.write(f"invalid settings for {settings_class.__name__}:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None
