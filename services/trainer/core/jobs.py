"""Domain types of training jobs: records, the events WatchJob streams, and what a worker reports.

Nothing here imports torch: the trainer process unpickles worker messages of these types.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from libs.common.training_spec import TrainingJobSpec

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# What a worker leaves in its staging directory beside the artifact: the TrainingReference
# (libs.common.distribution_drift) of the model inputs and score. The registry stores it with the
# version and takes it out before sealing, so the artifact format is unchanged. A file, not a field
# of TrainingSummary: it can be long, and a distributed job reports the summary on one stdout line.
TRAINING_REFERENCE_FILE = "training_reference.json"


@dataclass(frozen=True)
class EpochReport:
    """One finished epoch, sent by the worker."""

    epoch: int
    max_epochs: int
    loss: float  # mean training loss
    validation_loss: float
    metrics: dict[str, float]  # validation metrics
    eta_seconds: float
    elapsed_seconds: float
    rows_per_second: float


@dataclass(frozen=True)
class TrainingSummary:
    """What a worker reports once the artifact is written to its staging directory."""

    test_metrics: dict[str, float]
    validation_metrics: dict[str, float]
    epochs_trained: int
    best_epoch: int
    training_rows: int
    validation_rows: int
    test_rows: int
    data_fingerprint: str
    features: list[dict[str, str]]  # {name, dtype, encoding} in model input order
    inputs: int  # width of the encoded input


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    sequence: int
    state: JobState
    time: datetime
    epoch: int = 0
    max_epochs: int = 0
    loss: float = 0.0
    validation_loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    eta_seconds: float = -1.0
    elapsed_seconds: float = 0.0
    rows_per_second: float = 0.0
    message: str = ""
    model_name: str = ""
    model_version: int = 0

    def payload(self) -> str:
        document = asdict(self)
        for key in ("job_id", "sequence", "time"):
            document.pop(key)
        return json.dumps(document, sort_keys=True)

    @classmethod
    def from_payload(cls, job_id: str, sequence: int, time: datetime, payload: str) -> JobEvent:
        return cls(job_id=job_id, sequence=sequence, time=time, **json.loads(payload))


@dataclass(frozen=True)
class JobRecord:
    id: str
    model_name: str
    spec: TrainingJobSpec
    state: JobState
    epochs_done: int
    max_epochs: int
    progress: float
    error: str
    author: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    model_version: int | None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def metrics_json(metrics: dict[str, Any]) -> str:
    """JSON with NaN written as null (JSON has no NaN)."""
    return json.dumps(
        {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()},
        sort_keys=True,
    )
