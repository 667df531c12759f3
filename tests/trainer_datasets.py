"""Training sets for the trainer's tests, written into a real offline store the way ingest writes them.

The take-up data is synthetic with a known signal: take-up rises with tenure, falls with age, differs
by region, and each offer suits a different kind of customer, so a model that scores customer x offer
has something to learn (an AUC well above 0.5) from a few hundred rows in a few epochs.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from libs.common.database import apply_migrations, create_database_engine
from libs.common.training_spec import TrainingJobSpec
from services.ingest.core.catalog import MIGRATIONS_PACKAGE as INGEST_MIGRATIONS
from services.ingest.core.columns import ColumnType
from services.ingest.core.loader import LoadTarget, WriteMode, load
from services.ingest.core.sources import FileFormat, read_file

OFFERS = ("airtime_50", "data_1gb", "voice_bundle")
REGIONS = ("north", "south", "east")
COLUMNS = ("entity", "event_time", "age", "tenure_months", "region", "offer_id", "label")


def take_up_rows(count: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    rows = []
    for index in range(count):
        age = rng.randint(18, 75)
        tenure = rng.randint(0, 120)
        region = rng.choice(REGIONS)
        offer = rng.choice(OFFERS)
        logit = -0.4 + 0.02 * tenure - 0.03 * (age - 45) + {"north": 0.6, "south": -0.6, "east": 0.0}[region]
        logit += {
            "airtime_50": 0.8 if age < 35 else -0.8,
            "data_1gb": 0.0,
            "voice_bundle": 0.9 if age > 55 else -0.5,
        }[offer]
        label = int(rng.random() < 1 / (1 + math.exp(-logit)))
        rows.append(
            {
                "entity": f"c{index % (count // 2 or 1):05d}",
                "event_time": (start + timedelta(hours=index)).isoformat(),
                "age": age,
                "tenure_months": tenure,
                "region": region,
                "offer_id": offer,
                "label": label,
            }
        )
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in columns})
    return path


def offline_store(url: str) -> sa.Engine:
    """An engine on an offline store whose catalog tables exist (ingest's migrations applied)."""
    engine = create_database_engine(url)
    apply_migrations(engine, INGEST_MIGRATIONS, version_table="alembic_version_ingest")
    return engine


def load_table(
    engine: sa.Engine,
    table: str,
    rows: Sequence[dict[str, Any]],
    scratch: Path,
    *,
    columns: Sequence[str] = COLUMNS,
    types: dict[str, ColumnType] | None = None,
) -> None:
    """Load rows through ingest's own loader (types inferred, catalog row written)."""
    path = write_csv(scratch / f"{table}.csv", rows, columns)
    target = LoadTarget(
        table=table,
        mode=WriteMode.REPLACE,
        schema_overrides=types or {},
        event_time_column="event_time" if "event_time" in columns else "",
        kind="training_set",
    )
    load(engine, read_file(path, FileFormat.CSV, 10_000), target, f"test:{table}:{len(rows)}")


@dataclass(frozen=True)
class TrainedArtifact:
    directory: Path
    outcome: Any  # services.trainer.core.training.TrainingOutcome
    plan: Any  # services.trainer.core.training_data.TrainingSetPlan
    data: Any  # services.trainer.core.training_data.TrainingData


def take_up_spec(name: str = "take-up", **overrides: Any) -> TrainingJobSpec:
    document: dict[str, Any] = {
        "model_name": name,
        "training_set": "take_up",
        "label": "label",
        "features": [
            "age",
            "tenure_months",
            {"name": "region", "encoding": "one_hot"},
            {"name": "offer_id", "encoding": "offer"},
        ],
        "hyperparameters": {"epochs": 3, "learning_rate": 0.05, "batch_size": 128, "hidden_sizes": [8]},
        "seed": 5,
        **overrides,
    }
    return TrainingJobSpec.model_validate(document)


def train_artifact(
    scratch: Path, artifact_root: Path, spec: TrainingJobSpec, version: int = 1, rows: int = 400
) -> TrainedArtifact:
    """Train in this process (no worker) and write a sealed artifact where a predictor looks for it."""
    from libs.common.offline_store import open_offline_store
    from services.trainer.core import training
    from services.trainer.core.store import seal_artifact
    from services.trainer.core.training_data import (
        inspect_training_set,
        read_training_set,
    )

    url = f"sqlite:///{scratch / f'offline-{spec.model_name}-{version}.db'}"
    engine = offline_store(url)
    load_table(engine, "take_up", take_up_rows(rows), scratch)
    engine.dispose()
    reader = open_offline_store(url)
    try:
        plan = inspect_training_set(reader, spec)
        data = read_training_set(reader, spec, plan)
    finally:
        reader.dispose()
    outcome = training.train_model(spec, plan, data)
    staging = scratch / f"staging-{spec.model_name}-{version}"
    training.write_artifact(outcome, staging)
    directory = artifact_root / spec.model_name / str(version)
    seal_artifact(staging, directory, spec.model_name, version)
    return TrainedArtifact(directory, outcome, plan, data)
