"""Settings of a predictor replica (env prefix LIVELOOP_PREDICTOR_)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.common.settings import ServiceSettings
from libs.stack.topology import CONFIG, PREDICTOR


class PredictorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_PREDICTOR_", extra="ignore", frozen=True)

    port: int = Field(PREDICTOR.port, ge=0, le=65535)
    replica_id: str = Field(
        default_factory=socket.gethostname, min_length=1, description="Name of this replica"
    )
    redis_url: str = Field("redis://127.0.0.1:6380/0", description="Options store and decision log")
    config_target: str = Field(f"127.0.0.1:{CONFIG.port}", description="host:port of the config service")
    config_api_key: str | None = Field(None, description="Key this replica presents to the config service")
    state_dir: Path = Field(
        Path(".liveloop/predictor"), description="Last-known-good config and scratch files"
    )
    model_dir: Path = Field(
        Path(".liveloop/artifacts"), description="Model artifacts, as the trainer writes them"
    )
    deployments: list[str] = Field(default_factory=list, description="Deployments to serve; empty serves all")
    statistics_max_age_ms: int = Field(
        100,
        ge=0,
        le=1000,
        description="Reuse a segment's arm statistics this long (responses still reach every replica at "
        "once; only impressions wait); 0 reads them from Redis on every Invoke",
    )
