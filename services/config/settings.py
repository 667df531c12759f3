"""Settings of the config service (env prefix LIVELOOP_CONFIG_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.common.settings import ServiceSettings
from libs.stack.topology import CONFIG


class ConfigSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_CONFIG_", extra="ignore", frozen=True)

    port: int = Field(CONFIG.port, ge=0, le=65535)
    database_url: str = Field(
        "sqlite:///.liveloop/data/config.db", description="SQLAlchemy URL of the config store"
    )
