"""The body of a training worker process (started with the multiprocessing `spawn` context).

The worker reads the training set itself, trains, writes the artifact into its staging directory
and reports over a one-way pipe: ("epoch", EpochReport) per epoch, then ("done", TrainingSummary)
or ("error", message). torch is imported here, inside the worker, never in the trainer process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from libs.common.errors import LiveloopError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerTask:
    job_id: str
    spec_json: str
    offline_store_url: str
    staging_dir: Path


def run_training_job(task: WorkerTask, channel: Connection) -> None:
    """Entry point of the spawned process; never raises (the parent reads the outcome from the pipe)."""
    try:
        from libs.common.offline_store import open_offline_store
        from libs.common.training_spec import TrainingJobSpec
        from services.trainer.core import training
        from services.trainer.core.training_data import (
            inspect_training_set,
            read_training_set,
        )

        spec = TrainingJobSpec.model_validate_json(task.spec_json)
        training.configure_determinism(spec.seed)
        engine = open_offline_store(task.offline_store_url)
        try:
            plan = inspect_training_set(engine, spec)
            data = read_training_set(engine, spec, plan)
        finally:
            engine.dispose()
        outcome = training.train_model(spec, plan, data, lambda report: channel.send(("epoch", report)))
        training.write_artifact(outcome, task.staging_dir)
        channel.send(("done", outcome.summary))
    except LiveloopError as exc:
        channel.send(("error", exc.message))
    except Exception as exc:
        logger.exception("training job %s failed", task.job_id)
        channel.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        channel.close()
