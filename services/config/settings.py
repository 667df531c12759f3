"""Settings of the config service (env prefix LIVELOOP_CONFIG_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.common.settings import ServiceSettings
from libs.stack.topology import CONFIG, MONITOR


class ConfigSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_CONFIG_", extra="ignore", frozen=True)

    port: int = Field(CONFIG.port, ge=0, le=65535)
    database_url: str = Field(
        "sqlite:///.liveloop/data/config.db", description="SQLAlchemy URL of the config store"
    )
    heartbeat_seconds: float = Field(5.0, gt=0, le=300, description="Watch heartbeat interval")
    poll_seconds: float = Field(
        1.0, gt=0, le=60, description="How often to look for revisions written by another config instance"
    )
    monitor_target: str = Field(
        f"127.0.0.1:{MONITOR.port}", description="host:port of the monitor (evaluates candidates at Publish)"
    )
    monitor_api_key: str | None = Field(None, description="Admin key this service presents to the monitor")
    monitor_deadline_seconds: float = Field(
        120.0, gt=0, le=600, description="How long a publish waits for the candidate's evaluation"
    )
