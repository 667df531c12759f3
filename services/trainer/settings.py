"""Settings of the trainer service (env prefix LIVELOOP_TRAINER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.common.settings import ServiceSettings
from libs.stack.topology import CONFIG, TRAINER


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_TRAINER_", extra="ignore", frozen=True)

    port: int = Field(TRAINER.port, ge=0, le=65535)
    database_url: str = Field("sqlite:///.liveloop/data/trainer.db", description="Jobs and model registry")
    artifact_dir: Path = Field(Path(".liveloop/artifacts"), description="Where model artifacts are written")
    config_target: str = Field(f"127.0.0.1:{CONFIG.port}", description="host:port of the config service")
