"""Compare on an evaluation table: each version scores every row of an offline-store table with its
own preprocessing, and the metrics training reports (services.trainer.core.metrics) are computed
against the table's label.

Where the work runs: in a spawned worker process, one per evaluation, as training runs (job_runner),
not in a thread of the trainer (asyncio.to_thread). The trainer process never imports torch; the
table's columns (up to `max_rows` rows) live in the worker only and are freed when it exits; the
per-row encoding is CPU-bound Python that would otherwise hold the server's GIL; and an evaluation
whose call is cancelled (client gone, deadline passed, trainer stopping) is ended by terminating
its worker, which a thread cannot be. The price is a process start (a few seconds, mostly importing
torch) per call, small next to reading and scoring a large table. At most `max_concurrent`
evaluations run at once; further calls wait for a slot (bounded by their deadline).

What needs no torch is checked first in the trainer process, so bad requests fail fast: the table
(training_data.inspect_evaluation_table) and the artifacts' checksums (artifacts.read_verified_
artifact). The worker receives the verified bytes and loads from them, so it scores exactly what
was registered; a loaded model must also reproduce the trainer's predictions for its reference rows,
as a predictor requires before serving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import multiprocessing
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

import numpy as np

from libs.common.errors import FailedPrecondition, InvalidArgument, LiveloopError
from libs.common.model_artifacts import (
    MODEL_FILE,
    PREPROCESSING_FILE,
    REFERENCE_FILE,
    REFERENCE_TOLERANCE,
    VerifiedArtifact,
)
from libs.common.offline_store import open_offline_store
from libs.common.training_spec import Encoding
from services.trainer.core.metrics import binary_metrics
from services.trainer.core.preprocessing import Preprocessing
from services.trainer.core.training_data import (
    EvaluationData,
    EvaluationTablePlan,
    category_values,
    numeric_values,
    read_evaluation_table,
)

logger = logging.getLogger(__name__)

MAX_EVALUATION_ROWS = 1_000_000
MAX_CONCURRENT_EVALUATIONS = 2
SCORING_BATCH_ROWS = 65_536
TERMINATE_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class EvaluationTask:
    offline_store_url: str
    plan: EvaluationTablePlan
    artifacts: tuple[tuple[str, VerifiedArtifact], ...]  # (request field it came from, artifact)
    max_rows: int


@dataclass(frozen=True)
class EvaluationResult:
    rows: int
    metrics: tuple[dict[str, float], ...]  # per artifact, in task order, as binary_metrics gives them


@dataclass(frozen=True)
class ScoringModel:
    """One version loaded for scoring: its preprocessing and its TorchScript module."""

    preprocessing: Preprocessing
    module: Any  # torch.jit.ScriptModule

    def score(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Take-up probabilities (float64) of raw columns, as read_training_set gives them."""
        import torch

        rows = len(next(iter(columns.values()))) if columns else 0
        parts = []
        with torch.inference_mode():
            for start in range(0, rows, SCORING_BATCH_ROWS):
                batch = {name: values[start : start + SCORING_BATCH_ROWS] for name, values in columns.items()}
                matrix = np.ascontiguousarray(self.preprocessing.encode(batch), dtype=np.float32)
                output = self.module(torch.from_numpy(matrix))
                parts.append(output.numpy().reshape(-1).astype(np.float64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    def score_table(self, data: EvaluationData) -> np.ndarray:
        return self.score(data.columns_for((f.name, f.encoding) for f in self.preprocessing.features))


def load_scoring_model(artifact: VerifiedArtifact, field: str) -> ScoringModel:
    """Load a verified artifact and replay its reference rows; FailedPrecondition names `field`."""
    import torch

    where = artifact.where
    try:
        preprocessing = Preprocessing.from_json(json.loads(artifact.files[PREPROCESSING_FILE]))
        reference = json.loads(artifact.files[REFERENCE_FILE])
        rows: list[dict[str, Any]] = list(reference["rows"])
        expected = np.asarray(reference["predictions"], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(f"{where}: bad preprocessing or reference ({exc})", field=field) from None
    try:
        with warnings.catch_warnings():  # TorchScript is the artifact format; torch 2.13 deprecates it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                io.BytesIO(artifact.files[MODEL_FILE]), map_location="cpu"
            )
        module.eval()
    except Exception as exc:
        raise FailedPrecondition(f"{where}: cannot load {MODEL_FILE}: {exc}", field=field) from None
    model = ScoringModel(preprocessing, module)
    columns = {
        feature.name: (numeric_values if feature.encoding is Encoding.STANDARDIZE else category_values)(
            [row.get(feature.name) for row in rows]
        )
        for feature in preprocessing.features
    }
    try:
        predicted = model.score(columns)
    except Exception as exc:
        raise FailedPrecondition(
            f"{where}: the model does not accept its {preprocessing.width} inputs: {str(exc).splitlines()[0]}",
            field=field,
        ) from None
    if predicted.shape != expected.shape or not np.allclose(
        predicted, expected, rtol=0, atol=REFERENCE_TOLERANCE
    ):
        raise FailedPrecondition(
            f"{where}: does not reproduce the trainer's predictions for its reference rows", field=field
        )
    return model


def evaluate(task: EvaluationTask) -> EvaluationResult:
    """The worker's job: load every version, read the table once, score it with each, measure."""
    import torch

    torch.set_num_threads(1)  # as training predicts: the same scores for the same rows
    models = [load_scoring_model(artifact, field) for field, artifact in task.artifacts]
    engine = open_offline_store(task.offline_store_url)
    try:
        data = read_evaluation_table(engine, task.plan, max_rows=task.max_rows)
    finally:
        engine.dispose()
    if data.rows == 0:  # emptied since it was inspected
        raise InvalidArgument(
            f"table '{task.plan.table}' is empty: there are no rows to score", field="evaluation_table"
        )
    return EvaluationResult(
        data.rows, tuple(binary_metrics(data.labels, m.score_table(data)) for m in models)
    )


def run_evaluation(task: EvaluationTask, channel: Connection) -> None:
    """Entry point of the spawned worker; never raises (the parent reads the outcome from the pipe):
    ("done", EvaluationResult), ("error", (LiveloopError subclass, message, field)) or ("failed", text)."""
    try:
        channel.send(("done", evaluate(task)))
    except LiveloopError as exc:
        message = exc.message.removeprefix(f"{exc.field}: ") if exc.field else exc.message
        channel.send(("error", (type(exc), message, exc.field)))
    except Exception as exc:
        logger.exception("evaluating on table %s failed", task.plan.table)
        channel.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        channel.close()


class EvaluationRunner:
    """Runs evaluations in spawned workers, at most `max_concurrent` at once."""

    def __init__(self, max_concurrent: int = MAX_CONCURRENT_EVALUATIONS) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        # Threads that block on a worker (start, pipe, exit), kept apart from asyncio's default pool;
        # two per evaluation: one may still wait on a pipe while another stops the worker.
        self._threads = ThreadPoolExecutor(2 * max_concurrent, thread_name_prefix="trainer-evaluation")
        self._context = multiprocessing.get_context("spawn")
        self._workers: set[SpawnProcess] = set()

    async def evaluate(self, task: EvaluationTask) -> EvaluationResult:
        async with self._slots:
            kind, payload = await self._run(task)
        if kind == "done" and isinstance(payload, EvaluationResult):
            return payload
        if kind == "error":
            error_class, message, field = payload
            if isinstance(error_class, type) and issubclass(error_class, LiveloopError):
                raise error_class(message, field=field)
        raise RuntimeError(f"evaluating on table '{task.plan.table}' failed: {payload}")

    async def _run(self, task: EvaluationTask) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_evaluation, args=(task, sender), name="liveloop-evaluation", daemon=True
        )
        starting = loop.run_in_executor(self._threads, _start, process, sender)
        receiving = False
        try:
            await asyncio.shield(starting)
            self._workers.add(process)
            receiving = True
            kind, payload = await loop.run_in_executor(self._threads, _receive, receiver)
            await loop.run_in_executor(self._threads, process.join, TERMINATE_GRACE_SECONDS)
            if kind == "exited":
                payload = f"the worker exited with code {process.exitcode} before it answered"
            return kind, payload
        finally:
            if not starting.done():  # cancelled while the worker was starting: let it start, then stop it
                with contextlib.suppress(Exception):
                    await starting
            if not receiving:
                receiver.close()  # else _receive closes it, once the worker is gone
            self._workers.discard(process)
            if process.pid is not None and process.exitcode is None:
                await loop.run_in_executor(self._threads, _stop, process)

    async def stop(self) -> None:
        """Stop the workers of evaluations still running (their calls fail)."""
        for process in list(self._workers):
            await asyncio.get_running_loop().run_in_executor(self._threads, _stop, process)
        self._threads.shutdown(wait=False, cancel_futures=True)


def _start(process: SpawnProcess, sender: Connection) -> None:
    try:
        process.start()
    finally:
        sender.close()  # the child holds its own copy; EOF reaches us when the child exits


def _receive(receiver: Connection) -> tuple[str, Any]:
    try:
        message = receiver.recv()
    except EOFError:
        return "exited", None
    finally:
        receiver.close()
    if not (isinstance(message, tuple) and len(message) == 2):
        return "failed", f"unexpected message from the worker: {type(message).__name__}"
    return str(message[0]), message[1]


def _stop(process: SpawnProcess) -> None:
    process.terminate()
    process.join(TERMINATE_GRACE_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()
