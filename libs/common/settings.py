"""Typed settings shared by every service.

Each service subclasses `ServiceSettings` with its own env prefix (`LIVELOOP_<SERVICE>_`).
Settings are read once, in the service's `__main__`, and passed on; nothing else reads os.environ.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


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
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    shutdown_drain_seconds: float = Field(
        1.0, ge=0, description="After NOT_SERVING, how long to wait for balancers to notice"
    )
    shutdown_grace_seconds: float = Field(5.0, ge=0, description="Grace for in-flight RPCs on stop")
    max_concurrent_rpcs: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="RPCs in flight at once (streams included); one more is answered RESOURCE_EXHAUSTED "
        "at once instead of queueing behind them",
    )


class ClientSettings(BaseSettings):
    """Where a command-line client finds the stack."""

    model_config = SettingsConfigDict(env_prefix="LIVELOOP_", extra="ignore", frozen=True)

    target: str | None = Field(None, description="Front door host:port; default: the local stack's Envoy")
    api_key: str | None = None
    deadline_seconds: float = Field(10.0, gt=0)


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
