"""Settings of the monitor service (env prefix LIVELOOP_MONITOR_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.common.settings import ServiceSettings
from libs.stack.topology import MONITOR


class MonitorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_MONITOR_", extra="ignore", frozen=True)

    port: int = Field(MONITOR.port, ge=0, le=65535)
    database_url: str = Field("sqlite:///.liveloop/data/monitor.db", description="Decision log and summaries")
    redis_url: str = Field("redis://127.0.0.1:6380/0", description="Decision log stream source")
