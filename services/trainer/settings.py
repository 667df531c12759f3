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
    offline_store_url: str = Field(
        "sqlite:///.liveloop/data/ingest.db",
        description="The offline feature store (ingest's database) that training sets are read from",
    )
    artifact_dir: Path = Field(Path(".liveloop/artifacts"), description="Where model artifacts are written")
    config_target: str = Field(f"127.0.0.1:{CONFIG.port}", description="host:port of the config service")
    config_api_key: str | None = Field(
        None, description="Admin key this service presents to the config service (Promote publishes)"
    )
    max_concurrent_jobs: int = Field(1, ge=1, le=16, description="Training jobs running at once")
    max_concurrent_evaluations: int = Field(
        2,
        ge=1,
        le=16,
        description="Compare calls scoring an evaluation table at once (one worker process each)",
    )
    max_evaluation_rows: int = Field(
        1_000_000, ge=1, le=100_000_000, description="Most rows Compare scores; a larger table is refused"
    )
    config_deadline_seconds: float = Field(10.0, gt=0, le=120, description="Deadline of calls to config")
