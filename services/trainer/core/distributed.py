"""One process of a distributed training job, started by torchrun (`spec.workers` > 1):

    python -m torch.distributed.run --standalone --nproc_per_node=N \\
        -m services.trainer.core.distributed TASK.json

Every process joins the gloo process group, reads the training set and trains its share of each
batch (see training.train_model); rank 0 writes the artifact and reports on stdout, one line per
message, each line `liveloop-event <json>`: {"kind": "epoch" | "done" | "error", "payload": ...}.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from libs.common.errors import LiveloopError
from services.trainer.core.worker import WorkerTask

logger = logging.getLogger(__name__)

EVENT_PREFIX = "liveloop-event "


def task_document(task: WorkerTask) -> dict[str, str]:
    return {
        "job_id": task.job_id,
        "spec_json": task.spec_json,
        "offline_store_url": task.offline_store_url,
        "staging_dir": str(task.staging_dir),
    }


def task_from_document(document: dict[str, Any]) -> WorkerTask:
    return WorkerTask(
        str(document["job_id"]),
        str(document["spec_json"]),
        str(document["offline_store_url"]),
        Path(document["staging_dir"]),
    )


def parse_event(line: str) -> tuple[str, Any] | None:
    """(kind, payload) of a line rank 0 printed, or None for any other output."""
    position = line.find(EVENT_PREFIX)
    if position < 0:
        return None
    try:
        document = json.loads(line[position + len(EVENT_PREFIX) :])
        return str(document["kind"]), document["payload"]
    except (ValueError, KeyError, TypeError):
        return None


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from libs.common.offline_store import open_offline_store
    from libs.common.training_spec import TrainingJobSpec
    from services.trainer.core import training
    from services.trainer.core.training_data import (
        inspect_training_set,
        read_training_set,
    )

    task = task_from_document(json.loads(Path(argv[0]).read_text()))
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def emit(kind: str, payload: Any) -> None:
        if rank == 0:
            sys.stdout.write(EVENT_PREFIX + json.dumps({"kind": kind, "payload": payload}) + "\n")
            sys.stdout.flush()

    try:
        spec = TrainingJobSpec.model_validate_json(task.spec_json)
        training.configure_determinism(spec.seed)
        engine = open_offline_store(task.offline_store_url)
        try:
            plan = inspect_training_set(engine, spec)
            data = read_training_set(engine, spec, plan)
        finally:
            engine.dispose()
        outcome = training.train_model(
            spec, plan, data, lambda report: emit("epoch", asdict(report)), distributed=True
        )
        if rank == 0:
            training.write_artifact(outcome, task.staging_dir)
        dist.barrier()
        emit("done", asdict(outcome.summary))
        return 0
    except LiveloopError as exc:
        emit("error", exc.message)
        return 1
    except Exception as exc:
        logger.exception("rank %d of training job %s failed", rank, task.job_id)
        emit("error", f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
