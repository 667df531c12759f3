"""Runs queued training jobs in worker processes, a bounded number at a time.

Workers are started with the multiprocessing `spawn` context (forking a process that runs a gRPC
server breaks the child) and import torch themselves; the trainer process never trains on its
event loop. A worker reports over a pipe; this side records each report in SQL and wakes the
job's watchers. Cancelling a running job terminates its worker; its staging directory is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

from libs.common.errors import LiveloopError
from services.trainer.core.distributed import parse_event, task_document
from services.trainer.core.jobs import EpochReport, JobRecord, JobState, TrainingSummary
from services.trainer.core.store import SERVICE_RUNNER, TrainerStore
from services.trainer.core.worker import WorkerTask, run_training_job

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"  # the service's; it clears it when it starts
BATCH_STAGING_DIR = ".staging-batch"  # batch runs', one directory per job, never cleared wholesale
INTERRUPTED_REASON = "the trainer stopped while this job was running; start it again"
SILENT_REASON = "its batch run stopped reporting (killed?); start it again"
TERMINATE_GRACE_SECONDS = 5.0
JOB_HEARTBEAT_SECONDS = 10.0  # a runner says it still runs its jobs this often
JOB_SILENT_SECONDS = 60.0  # a batch run's job whose heartbeat is this old is failed by the service


class JobNotifier:
    """Wakes WatchJob streams when a job has a new event."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def notify(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()

    async def wait(self, job_id: str, at_most_seconds: float) -> None:
        event = self._events.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), at_most_seconds)


@dataclass
class _Running:
    stop_worker: Callable[[], Awaitable[None]] | None = None  # set once the worker has started
    cancel_reason: str | None = None
    cancel_state: JobState = "cancelled"
    done: asyncio.Event = field(default_factory=asyncio.Event)
    summary: TrainingSummary | None = None
    error: str = ""
    exit_code: int | None = None


Registrar = Callable[[str, TrainingSummary, Path], Awaitable[None]]


class JobRunner:
    def __init__(
        self,
        store: TrainerStore,
        *,
        offline_store_url: str,
        artifact_dir: Path,
        max_concurrent_jobs: int,
        register: Registrar,
        notifier: JobNotifier,
        runner_name: str = SERVICE_RUNNER,
    ) -> None:
        self._store = store
        self._offline_store_url = offline_store_url
        self._runner_name = runner_name
        self._batch_staging_root = artifact_dir / BATCH_STAGING_DIR
        is_service = runner_name == SERVICE_RUNNER
        self._staging_root = artifact_dir / STAGING_DIR if is_service else self._batch_staging_root
        self._heartbeat: asyncio.Task[None] | None = None
        self._register = register
        self._notifier = notifier
        self._slots = asyncio.Semaphore(max_concurrent_jobs)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: dict[str, _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        # One thread per running job blocks on its pipe; kept apart from asyncio's default pool.
        self._readers = ThreadPoolExecutor(max_concurrent_jobs, thread_name_prefix="trainer-job-reader")
        self._context = multiprocessing.get_context("spawn")

    async def start(self) -> None:
        interrupted = await asyncio.to_thread(
            self._store.fail_interrupted_jobs, INTERRUPTED_REASON, self._runner_name
        )
        for job_id in interrupted:
            logger.warning("training job %s was running when the trainer stopped; marked failed", job_id)
        await asyncio.to_thread(shutil.rmtree, self._staging_root, True)
        for job_id in await asyncio.to_thread(self._store.queued_job_ids):
            self._queue.put_nowait(job_id)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="trainer-dispatcher")
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name="trainer-job-heartbeat")

    async def _beat(self) -> None:
        """Every JOB_HEARTBEAT_SECONDS: this runner still runs its jobs; and (the service) batch
        runs' jobs that went silent are failed and their staging directories removed."""
        while True:
            await asyncio.sleep(JOB_HEARTBEAT_SECONDS)
            try:
                await self.sweep()
            except Exception:  # a database hiccup: the next beat tries again
                logger.exception("training job heartbeat failed")

    async def sweep(self) -> list[str]:
        """One heartbeat: beat for the running jobs; the service also fails silent batch jobs
        (returned) and removes their staging directories."""
        await asyncio.to_thread(self._store.beat, list(self._running))
        if self._runner_name != SERVICE_RUNNER:
            return []
        older_than = datetime.now(UTC) - timedelta(seconds=JOB_SILENT_SECONDS)
        silent = await asyncio.to_thread(self._store.fail_silent_jobs, SILENT_REASON, older_than)
        for job_id in silent:
            logger.warning("training job %s: its batch run went silent; marked failed", job_id)
            await asyncio.to_thread(shutil.rmtree, self._batch_staging_root / job_id, True)
            self._notifier.notify(job_id)
        return silent

    async def stop(self) -> None:
        for task in (self._dispatcher, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for job_id in list(self._running):
            await self.cancel(job_id, INTERRUPTED_REASON, final_state="failed")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._readers.shutdown(wait=False, cancel_futures=True)

    def submit(self, job_id: str) -> None:
        self._queue.put_nowait(job_id)

    async def run_now(self, job_id: str) -> None:
        """Run one queued job to its end here, without the dispatcher: a batch run (the Kubernetes
        training Job). Unlike start(), this touches no other job: it neither fails interrupted jobs
        nor clears the staging directory, which a trainer service may share."""
        self._start_heartbeat()
        await self._slots.acquire()
        await self._run_then_release(job_id)

    @property
    def running_jobs(self) -> list[str]:
        return list(self._running)

    async def cancel(self, job_id: str, reason: str, final_state: JobState = "cancelled") -> JobRecord:
        running = self._running.get(job_id)
        if running is None:
            # Queued (or already ended): recorded at once; the dispatcher skips it when it comes up.
            record = await asyncio.to_thread(self._store.finish_job, job_id, final_state, reason)
            self._notifier.notify(job_id)
            return record
        if running.cancel_reason is None:
            running.cancel_reason, running.cancel_state = reason, final_state
            if running.stop_worker is not None:
                await running.stop_worker()
        await running.done.wait()
        return await asyncio.to_thread(self._store.get_job, job_id)

    async def _dispatch(self) -> None:
        while True:
            job_id = await self._queue.get()
            await self._slots.acquire()
            task = asyncio.create_task(self._run_then_release(job_id), name=f"training-{job_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_then_release(self, job_id: str) -> None:
        try:
            await self._run(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("training job %s could not be run", job_id)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    self._store.finish_job, job_id, "failed", "internal error running the job"
                )
                self._notifier.notify(job_id)
        finally:
            self._slots.release()

    async def _run(self, job_id: str) -> None:
        running = _Running()
        self._running[job_id] = running
        staging_dir = self._staging_root / job_id
        try:
            record = await asyncio.to_thread(self._store.claim_job, job_id, self._runner_name)
            if record is None:
                return  # cancelled while queued
            self._notifier.notify(job_id)
            task = WorkerTask(job_id, record.spec.canonical_json(), self._offline_store_url, staging_dir)
            if record.spec.workers > 1:
                await self._train_distributed(task, record.spec.workers, running)
            else:
                await self._train_in_process(task, running)
            await self._conclude(job_id, running, staging_dir)
        finally:
            self._running.pop(job_id, None)
            running.done.set()
            await asyncio.to_thread(shutil.rmtree, staging_dir, True)
            self._notifier.notify(job_id)

    async def _handle(self, job_id: str, running: _Running, kind: str, payload: Any) -> None:
        if kind == "epoch" and isinstance(payload, EpochReport):
            await asyncio.to_thread(self._store.record_epoch, job_id, payload)
            self._notifier.notify(job_id)
        elif kind == "done" and isinstance(payload, TrainingSummary):
            running.summary = payload
        elif kind == "error":
            running.error = str(payload)

    async def _train_in_process(self, task: WorkerTask, running: _Running) -> None:
        """One spawned worker process, reporting over a pipe."""
        job_id = task.job_id
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_training_job, args=(task, sender), name=f"liveloop-training-{job_id}", daemon=True
        )
        loop = asyncio.get_running_loop()

        async def stop_worker() -> None:
            await asyncio.to_thread(_terminate, process)

        reading: asyncio.Future[tuple[str, Any]] | None = None
        try:
            await asyncio.to_thread(process.start)
            sender.close()  # the child holds its own copy; EOF reaches us when the child exits
            running.stop_worker = stop_worker
            if running.cancel_reason is not None:  # cancelled while the worker was starting
                await stop_worker()
            logger.info("training job %s started in worker process %s", job_id, process.pid)
            while True:
                reading = loop.run_in_executor(self._readers, _receive, receiver)
                try:
                    kind, payload = await reading
                except EOFError:
                    break
                await self._handle(job_id, running, kind, payload)
            await loop.run_in_executor(self._readers, process.join)
            running.exit_code = process.exitcode
        finally:
            if process.is_alive():  # this task was cancelled (the trainer is stopping)
                await stop_worker()
            if reading is not None:
                # A reader thread may still block in recv on this pipe: the worker has exited, so it
                # gets EOF; close the pipe only after it is done (closing under it could hand its file
                # descriptor to the next file opened, and the thread would read from that).
                await asyncio.gather(reading, return_exceptions=True)
            receiver.close()

    async def _train_distributed(self, task: WorkerTask, workers: int, running: _Running) -> None:
        """torchrun with `workers` processes (DDP over gloo); rank 0 reports on stdout."""
        job_id = task.job_id
        task.staging_dir.parent.mkdir(parents=True, exist_ok=True)
        task_file = task.staging_dir.parent / f"{job_id}.json"
        task_file.write_text(json.dumps(task_document(task)))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # rendezvous on a free local port
            f"--nproc_per_node={workers}",
            "-m",
            "services.trainer.core.distributed",
            str(task_file),
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: stopping it stops every rank
        )

        async def stop_worker() -> None:
            await _stop_group(process)

        running.stop_worker = stop_worker
        try:
            if running.cancel_reason is not None:
                await stop_worker()
            logger.info(
                "training job %s started under torchrun (pid %s, %d workers)", job_id, process.pid, workers
            )
            assert process.stdout is not None
            async for raw in process.stdout:
                event = parse_event(raw.decode(errors="replace"))
                if event is None:
                    continue
                kind, payload = event
                if kind == "epoch":
                    payload = EpochReport(**payload)
                elif kind == "done":
                    payload = TrainingSummary(**payload)
                await self._handle(job_id, running, kind, payload)
            running.exit_code = await process.wait()
        finally:
            if process.returncode is None:  # this task was cancelled (the trainer is stopping)
                await _stop_group(process)
            task_file.unlink(missing_ok=True)

    async def _conclude(self, job_id: str, running: _Running, staging_dir: Path) -> None:
        summary, error = running.summary, running.error
        if running.cancel_reason is not None:
            state = running.cancel_state
            await asyncio.to_thread(self._store.finish_job, job_id, state, running.cancel_reason)
            logger.info("training job %s %s: %s", job_id, state, running.cancel_reason)
            return
        if summary is not None:
            try:
                await self._register(job_id, summary, staging_dir)
            except LiveloopError as exc:
                await asyncio.to_thread(self._store.finish_job, job_id, "failed", exc.message)
            except Exception as exc:
                logger.exception("registering the model of job %s failed", job_id)
                await asyncio.to_thread(
                    self._store.finish_job, job_id, "failed", f"registering the model failed: {exc}"
                )
            return
        message = error or f"the worker process exited with code {running.exit_code}"
        logger.warning("training job %s failed: %s", job_id, message)
        await asyncio.to_thread(self._store.finish_job, job_id, "failed", message)


def _receive(connection: Connection) -> tuple[str, Any]:
    message = connection.recv()
    if not (isinstance(message, tuple) and len(message) == 2):
        return "error", f"unexpected message from the worker: {type(message).__name__}"
    return str(message[0]), message[1]


async def _stop_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to torchrun's process group (it and every rank), SIGKILL if it lingers."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), TERMINATE_GRACE_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def _terminate(process: SpawnProcess) -> None:
    if process.pid is None:
        return
    process.terminate()
    process.join(TERMINATE_GRACE_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()
