"""Settings of the ingest service (env prefix LIVELOOP_INGEST_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.common.settings import ServiceSettings
from libs.stack.topology import CONFIG, INGEST


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_INGEST_", extra="ignore", frozen=True)

    port: int = Field(INGEST.port, ge=0, le=65535)
    database_url: str = Field("sqlite:///.liveloop/data/ingest.db", description="Offline feature store")
    redis_url: str = Field("redis://127.0.0.1:6380/0", description="Online feature store and options store")
    config_target: str = Field(f"127.0.0.1:{CONFIG.port}", description="host:port of the config service")
