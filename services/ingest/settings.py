"""Settings of the ingest service (env prefix LIVELOOP_INGEST_)."""

from __future__ import annotations

from pathlib import Path

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
    config_api_key: str | None = Field(None, description="Key this service presents to the config service")
    online_ttl_seconds: int | None = Field(None, gt=0, description="Expire online features after this long")
    upload_dir: Path = Field(Path(".liveloop/uploads"), description="Where uploaded files are staged")
    chunk_rows: int = Field(
        50_000, ge=100, le=1_000_000, description="Rows per chunk when streaming a source"
    )
    data_dir: Path | None = Field(None, description="If set, file paths must lie under this directory")
