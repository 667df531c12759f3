"""Settings of the monitor service (env prefix LIVELOOP_MONITOR_)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.common.settings import ServiceSettings
from libs.stack.topology import CONFIG, MONITOR, TRAINER


class MonitorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_MONITOR_", extra="ignore", frozen=True)

    port: int = Field(MONITOR.port, ge=0, le=65535)
    database_url: str = Field("sqlite:///.liveloop/data/monitor.db", description="Per-minute rollups, alerts")
    redis_url: str = Field("redis://127.0.0.1:6380/0", description="Decision log stream source")
    archive_dir: Path = Field(
        Path(".liveloop/decisions"), description="Hourly Parquet partitions of the raw decision log"
    )
    archive_retention_hours: int = Field(
        24 * 8, ge=1, le=24 * 400, description="How long raw decisions are kept (evaluation, drift)"
    )
    replica_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=100,
        description="This replica's consumer name in the decision log's consumer group",
    )
    consumer_group: str = Field("liveloop-monitor", min_length=1, description="Decision log consumer group")
    consumer_start: Literal["oldest", "newest"] = Field(
        "oldest",
        description="Where a new consumer group starts: every entry the stream holds, or only new ones",
    )
    consumer_batch_size: int = Field(1000, ge=1, le=100_000, description="Entries read per batch")
    consumer_batch_interval_seconds: float = Field(
        0.5,
        ge=0,
        le=10,
        description="A batch that is not full is followed by the next no sooner than this: the entries of "
        "the interval are applied together (each batch writes an archive file and a SQL transaction, so "
        "small batches cost the machine more than the serving they watch); 0 reads again at once",
    )
    consumer_claim_idle_seconds: float = Field(
        30.0, gt=0, description="Another replica's unacknowledged entry is taken over after this long"
    )
    offline_store_url: str = Field(
        "sqlite:///.liveloop/data/ingest.db",
        description="The offline store ingest writes (read only): other systems' decision logs to evaluate",
    )
    artifact_dir: Path | None = Field(
        Path(".liveloop/artifacts"),
        description="The trainer's model artifacts (read only): the model versions an evaluated candidate binds",
    )
    trainer_target: str = Field(
        f"127.0.0.1:{TRAINER.port}", description="host:port of the trainer (training references for drift)"
    )
    trainer_api_key: str | None = Field(None, description="Key this service presents to the trainer (admin)")
    drift_psi_warning: float = Field(0.1, gt=0, description="PSI from which a distribution drifts (warning)")
    drift_psi_critical: float = Field(0.25, gt=0, description="PSI from which drift is critical")
    drift_ks_warning: float = Field(0.1, gt=0, le=1, description="KS statistic from which drift is a warning")
    drift_ks_critical: float = Field(0.2, gt=0, le=1, description="KS statistic from which drift is critical")
    alert_rules_file: Path | None = Field(
        None,
        description="Alert rules (YAML); unset: the defaults shipped in services/monitor/alert-rules.yaml",
    )
    alert_interval_seconds: float = Field(
        30.0, gt=0, le=3600, description="How often the rules are evaluated"
    )
    alert_metrics_urls: list[str] = Field(
        default_factory=list,
        description="Each predictor replica's own /metrics URL, for the error_rate rule (JSON list)",
    )
    alert_external_url: str = Field("", description="Where people see the alerts (webhooks' externalURL)")
    config_target: str = Field(f"127.0.0.1:{CONFIG.port}", description="host:port of the config service")
    config_api_key: str | None = Field(None, description="Key this service presents to the config service")
    config_deadline_seconds: float = Field(5.0, gt=0, le=120, description="Deadline of calls to config")
