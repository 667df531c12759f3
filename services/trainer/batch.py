"""`python -m services.trainer.batch SPEC.yaml`: one training job, run to its end in this process, as
the Kubernetes training Job does (deploy/k8s/training-job.yaml).

It reads the trainer's settings (LIVELOOP_TRAINER_*: its SQL store, the offline store, the artifact
directory), checks the spec against the data before any work, records the job in the trainer's SQL
store, trains it (a spec with `workers: N` > 1 runs N processes under torchrun, DistributedDataParallel
over gloo) and registers the version with its checksummed artifact, exactly as a job the trainer
service runs: `liveloop models`, WatchJob and Promote see it. Progress goes to stdout, one JSON object
per line. Exit status: 0 registered, 1 the job failed or was stopped (SIGTERM: the job is marked
failed), 2 the spec, the data or the settings are invalid (nothing recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
from pathlib import Path

from libs.common.errors import LiveloopError
from libs.common.offline_store import open_offline_store
from libs.common.service_database import open_service_database
from libs.common.settings import load_settings
from libs.common.training_spec import TrainingJobSpec, parse_training_spec
from libs.stack.topology import TRAINER
from services.trainer.core.schema import MIGRATIONS_PACKAGE
from services.trainer.core.store import TrainerStore
from services.trainer.core.trainer_service import TrainerService
from services.trainer.settings import TrainerSettings

STOPPED_REASON = "the batch training run was stopped (SIGTERM)"


def _line(document: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(document, default=str) + "\n")
    sys.stdout.flush()


async def run(spec: TrainingJobSpec, settings: TrainerSettings, author: str) -> int:
    engine = await open_service_database(
        settings.database_url, service=TRAINER.name, migrations_package=MIGRATIONS_PACKAGE
    )
    offline = open_offline_store(settings.offline_store_url)
    service = TrainerService(
        TrainerStore(engine),
        offline,
        offline_store_url=settings.offline_store_url,
        artifact_dir=settings.artifact_dir,
        max_concurrent_jobs=1,
        config=None,
        runner_name=f"batch:{author}",
    )
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[object]] = []
    try:
        try:
            job = await service.record_batch_job(spec, author=author)
        except LiveloopError as exc:
            _line({"event": "refused", "field": exc.field, "message": exc.message})
            return 2
        _line({"event": "started", "job_id": job.id, "model": spec.model_name, "workers": spec.workers})

        def stop() -> None:  # SIGTERM (the Job's deadline, `kubectl delete`): the job ends as failed
            stopping.append(
                loop.create_task(service.runner.cancel(job.id, STOPPED_REASON, final_state="failed"))
            )

        loop.add_signal_handler(signal.SIGTERM, stop)
        follower = asyncio.create_task(_follow(service, job.id))
        try:
            record = await service.run_batch_job(job.id)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            await asyncio.gather(*stopping, return_exceptions=True)
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    finally:
        await service.stop()
        offline.dispose()
        engine.dispose()
    if record.model_name and record.model_version:
        version = service.store.get_version(record.model_name, record.model_version)[0]
        _line(
            {
                "event": "registered",
                "job_id": record.id,
                "model": record.model_name,
                "version": record.model_version,
                "artifact_uri": version.artifact_uri,
                "metrics": version.metrics,
            }
        )
        return 0
    _line({"event": "failed", "job_id": record.id, "state": record.state, "message": record.error})
    return 1


async def _follow(service: TrainerService, job_id: str) -> None:
    """One line per epoch of the job (read back from the SQL store, as WatchJob does)."""
    async for event in service.watch(job_id, from_start=True):
        if event.epoch and event.state == "running":
            _line(
                {
                    "event": "epoch",
                    "job_id": job_id,
                    "epoch": event.epoch,
                    "max_epochs": event.max_epochs,
                    "loss": event.loss,
                    "validation_loss": event.validation_loss,
                    "metrics": event.metrics,
                }
            )


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.trainer.batch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("spec", type=Path, help="training spec (YAML), as for `liveloop train`")
    parser.add_argument(
        "--author", default=f"batch:{socket.gethostname()}", help="who the job is recorded as started by"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = argument_parser().parse_args(argv)
    settings = load_settings(TrainerSettings)
    try:
        spec = parse_training_spec(arguments.spec.read_text(encoding="utf-8"))
    except OSError as exc:
        _line(
            {"event": "refused", "field": "spec", "message": f"cannot read {arguments.spec}: {exc.strerror}"}
        )
        return 2
    except LiveloopError as exc:
        _line({"event": "refused", "field": exc.field, "message": exc.message})
        return 2
    return asyncio.run(run(spec, settings, arguments.author))


if __name__ == "__main__":
    raise SystemExit(main())
