"""The trainer's operations: validate and queue jobs, follow them, the registry, comparison and
promotion.

Promotion talks to the config service through the `DeploymentConfig` interface (the gRPC client
lives outside core/), so this module never imports grpc. Comparing on an evaluation table scores in
a worker process (services.trainer.core.evaluation), so this process never imports torch either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Protocol

from sqlalchemy import Engine

from libs.common.deployment_spec import deployment_spec_from_mapping
from libs.common.distribution_drift import TrainingReference
from libs.common.errors import FailedPrecondition, InvalidArgument, LiveloopError
from libs.common.model_artifacts import MANIFEST_FILE, PREPROCESSING_FILE
from libs.common.paging import next_page_token, page_window
from libs.common.training_spec import Encoding, TrainingJobSpec
from services.trainer.core.artifacts import artifact_path, read_verified_artifact
from services.trainer.core.evaluation import (
    MAX_CONCURRENT_EVALUATIONS,
    MAX_EVALUATION_ROWS,
    EvaluationResult,
    EvaluationRunner,
    EvaluationTask,
)
from services.trainer.core.job_runner import JobNotifier, JobRunner
from services.trainer.core.jobs import FINAL_STATES, JobEvent, JobRecord, TrainingSummary
from services.trainer.core.store import (
    SERVICE_RUNNER,
    ModelSummaryRecord,
    ModelVersionRecord,
    TrainerStore,
)
from services.trainer.core.training_data import (
    ResolvedFeature,
    inspect_evaluation_table,
    inspect_training_set,
)

logger = logging.getLogger(__name__)

WATCH_POLL_SECONDS = 2.0  # watchers also re-read SQL this often, in case a wake-up was missed
# Metric -> True when higher is better.
COMPARED_METRICS: dict[str, bool] = {
    "auc": True,
    "log_loss": False,
    "calibration_error": False,
    "brier_score": False,
}


class DeploymentConfig(Protocol):
    """What promotion needs from the config service."""

    async def get(self, deployment: str) -> tuple[str, int]:
        """The deployment's head spec (JSON) and its revision; NotFound when there is none."""

    async def publish(
        self, spec_json: str, *, deployment: str, expected_revision: int, message: str, dry_run: bool
    ) -> tuple[int, str]:
        """Publish a spec; returns (revision, diff)."""

    async def bindings(self) -> Mapping[str, tuple[str, int]]:
        """Deployment -> (model, version) bound by its head spec."""


class ModelUse(StrEnum):
    """What a promoted model does in its deployment."""

    BIND = "bind"  # bound only: served over the Open Inference Protocol, the algorithm unchanged
    SCORE = "score"  # the deployment ranks by it (algorithm `model`)
    PRIOR = "prior"  # Thompson sampling starts each arm at its take-up (model_prior_weight)


DEFAULT_MODEL_PRIOR_WEIGHT = 20.0


@dataclass(frozen=True)
class PromoteResult:
    revision: int
    deployment: str
    diff: str
    model: str
    version: int


@dataclass(frozen=True)
class Comparison:
    a: ModelVersionRecord
    b: ModelVersionRecord
    deltas: list[tuple[str, float, float, float, bool]]  # metric, a, b, b - a, b better
    features_added: list[str]
    features_removed: list[str]
    same_data: bool
    evaluated_rows: int = 0  # rows of the evaluation table scored; 0: stored test metrics compared


def code_version(repository: Path | None = None) -> str:
    """Package version, plus `git describe` of the source tree when there is one."""
    try:
        package = version("liveloop")
    except PackageNotFoundError:
        package = "0.0.0"
    root = repository or Path(__file__).resolve().parents[3]
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return package
    return f"{package}+git.{described}" if described else package


class TrainerService:
    def __init__(
        self,
        store: TrainerStore,
        offline_engine: Engine,
        *,
        offline_store_url: str,
        artifact_dir: Path,
        max_concurrent_jobs: int,
        config: DeploymentConfig | None,
        max_concurrent_evaluations: int = MAX_CONCURRENT_EVALUATIONS,
        max_evaluation_rows: int = MAX_EVALUATION_ROWS,
        runner_name: str = SERVICE_RUNNER,
    ) -> None:
        self.store = store
        self._offline_engine = offline_engine
        self._offline_store_url = offline_store_url
        self._artifact_dir = artifact_dir
        self._max_evaluation_rows = max_evaluation_rows
        self.evaluations = EvaluationRunner(max_concurrent_evaluations)
        self._config = config
        self._code_version = "unknown"
        self.notifier = JobNotifier()
        self.runner = JobRunner(
            store,
            offline_store_url=offline_store_url,
            artifact_dir=artifact_dir,
            max_concurrent_jobs=max_concurrent_jobs,
            register=self._register,
            notifier=self.notifier,
            runner_name=runner_name,
        )

    async def _prepare(self) -> None:
        self._code_version = await asyncio.to_thread(code_version)
        await asyncio.to_thread(self._artifact_dir.mkdir, parents=True, exist_ok=True)

    async def start(self) -> None:
        await self._prepare()
        await self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()
        await self.evaluations.stop()

    async def _register(self, job_id: str, summary: TrainingSummary, staging_dir: Path) -> None:
        record = await asyncio.to_thread(
            self.store.register_version, job_id, summary, staging_dir, self._artifact_dir, self._code_version
        )
        logger.info("job %s registered %s version %d", job_id, record.name, record.version)

    # Jobs ---------------------------------------------------------------------------------------

    async def start_training(self, spec: TrainingJobSpec, *, author: str, dry_run: bool) -> JobRecord | None:
        """Check the spec against the offline store, then queue it (nothing for a dry run)."""
        await asyncio.to_thread(inspect_training_set, self._offline_engine, spec)
        if dry_run:
            return None
        record = await asyncio.to_thread(self.store.create_job, spec, author)
        self.runner.submit(record.id)
        return record

    async def record_batch_job(self, spec: TrainingJobSpec, *, author: str) -> JobRecord:
        """Check the spec against the data and record a job that this process will run itself with
        run_batch_job (a batch run: the Kubernetes training Job). The job, its epochs and the version
        it registers are in the service's SQL store, so `liveloop models` and WatchJob see them."""
        await self._prepare()
        await asyncio.to_thread(inspect_training_set, self._offline_engine, spec)
        return await asyncio.to_thread(self.store.create_job, spec, author)

    async def run_batch_job(self, job_id: str) -> JobRecord:
        """Run a job recorded by record_batch_job to its end; its final record."""
        await self.runner.run_now(job_id)
        return await asyncio.to_thread(self.store.get_job, job_id)

    async def watch(self, job_id: str, from_start: bool) -> AsyncIterator[JobEvent]:
        """Events of a job until it ends: the past ones first if `from_start`, else the latest."""
        if not job_id:
            raise InvalidArgument("must name a job", field="job_id")
        await asyncio.to_thread(self.store.get_job, job_id)
        sequence = 0
        events = await asyncio.to_thread(self.store.events_after, job_id, 0)
        if not from_start and events:
            events = events[-1:]
        while True:
            for event in events:
                sequence = event.sequence
                yield event
                if event.state in FINAL_STATES:
                    return
            await self.notifier.wait(job_id, WATCH_POLL_SECONDS)
            events = await asyncio.to_thread(self.store.events_after, job_id, sequence)

    async def cancel(self, job_id: str, reason: str) -> JobRecord:
        if not job_id:
            raise InvalidArgument("must name a job", field="job_id")
        record = await asyncio.to_thread(self.store.get_job, job_id)
        if record.final:
            return record
        return await self.runner.cancel(job_id, reason or "cancelled by request")

    async def get_job(self, job_id: str) -> JobRecord:
        return await asyncio.to_thread(self.store.get_job, job_id)

    async def list_jobs(
        self, *, state: str, model_name: str, page_size: int, page_token: str
    ) -> tuple[list[JobRecord], int, str]:
        limit, offset = page_window(page_size, page_token)
        jobs, total = await asyncio.to_thread(
            lambda: self.store.list_jobs(state=state, model_name=model_name, limit=limit, offset=offset)
        )
        return jobs, total, next_page_token(limit, offset, total)

    # Registry -----------------------------------------------------------------------------------

    async def list_models(
        self, *, name_prefix: str, page_size: int, page_token: str
    ) -> tuple[list[ModelSummaryRecord], int, str, Mapping[str, tuple[str, int]]]:
        limit, offset = page_window(page_size, page_token)
        models, total = await asyncio.to_thread(
            lambda: self.store.list_models(name_prefix=name_prefix, limit=limit, offset=offset)
        )
        return models, total, next_page_token(limit, offset, total), await self._bindings()

    async def get_model(self, name: str, version: int) -> tuple[ModelVersionRecord, list[int], list[str]]:
        """The version, every version number, and the deployments whose head spec binds it."""
        if not name:
            raise InvalidArgument("must name a model", field="name")
        if version < 0:
            raise InvalidArgument("must not be negative", field="version")
        record, versions = await asyncio.to_thread(self.store.get_version, name, version)
        bound = sorted(
            d for d, (m, v) in (await self._bindings()).items() if (m, v) == (name, record.version)
        )
        return record, versions, bound

    async def input_columns(self, record: ModelVersionRecord) -> list[str]:
        """The version's input columns in order, from its artifact; empty when it cannot be read."""
        try:
            artifact = await asyncio.to_thread(read_verified_artifact, record, field="name")
            return [str(name) for name in json.loads(artifact.files[PREPROCESSING_FILE])["inputs"]]
        except (LiveloopError, ValueError, KeyError, TypeError) as exc:
            logger.warning("input columns of %s:%d unavailable: %s", record.name, record.version, exc)
            return []

    async def get_training_reference(self, name: str, version: int) -> TrainingReference:
        """What the version's inputs and predicted score looked like in training (0: the newest
        version); NotFound for a version registered before the trainer recorded references."""
        if not name:
            raise InvalidArgument("must name a model", field="name")
        if version < 0:
            raise InvalidArgument("must not be negative", field="version")
        return await asyncio.to_thread(self.store.get_training_reference, name, version)

    async def _bindings(self) -> Mapping[str, tuple[str, int]]:
        if self._config is None:
            return {}
        try:
            return await self._config.bindings()
        except LiveloopError as exc:  # informative only: the registry answers without config
            logger.warning("cannot read deployment bindings from the config service: %s", exc.message)
            return {}

    async def compare(self, name: str, version_a: int, version_b: int, evaluation_table: str) -> Comparison:
        """Two versions side by side: their stored test metrics, or, with `evaluation_table`, the
        metrics of both scored on that table of the offline store (see `_evaluate`)."""
        if not name:
            raise InvalidArgument("must name a model", field="name")
        for field, value in (("version_a", version_a), ("version_b", version_b)):
            if value <= 0:
                raise InvalidArgument("must be a version number (1, 2, ...)", field=field)
        a, _ = await asyncio.to_thread(
            lambda: self.store.get_version(name, version_a, version_field="version_a")
        )
        b, _ = await asyncio.to_thread(
            lambda: self.store.get_version(name, version_b, version_field="version_b")
        )
        metrics_a: Mapping[str, float | None] = a.metrics
        metrics_b: Mapping[str, float | None] = b.metrics
        evaluated_rows = 0
        if evaluation_table:
            evaluated = await self._evaluate(a, b, evaluation_table)
            (metrics_a, metrics_b), evaluated_rows = evaluated.metrics, evaluated.rows
        deltas = []
        for metric, higher_better in COMPARED_METRICS.items():
            value_a, value_b = metrics_a.get(metric), metrics_b.get(metric)
            # Missing (older versions) or undefined (AUC on a table with one class): not compared.
            if value_a is None or value_b is None or not math.isfinite(value_a + value_b):
                continue
            delta = value_b - value_a
            deltas.append((metric, value_a, value_b, delta, delta > 0 if higher_better else delta < 0))
        names_a = [f["name"] for f in a.features]
        names_b = [f["name"] for f in b.features]
        return Comparison(
            a=a,
            b=b,
            deltas=deltas,
            features_added=[n for n in names_b if n not in names_a],
            features_removed=[n for n in names_a if n not in names_b],
            same_data=a.data_fingerprint == b.data_fingerprint,
            evaluated_rows=evaluated_rows,
        )

    async def _evaluate(self, a: ModelVersionRecord, b: ModelVersionRecord, table: str) -> EvaluationResult:
        """Score both versions on `table` and measure them against its label.

        Both must predict the same label (else InvalidArgument naming evaluation_table). The table
        is checked here (NotFound, or InvalidArgument naming evaluation_table and the column: a
        missing label or feature, an unusable type, no rows, more than `max_evaluation_rows` rows:
        no sampling, the caller chooses the sample), then both artifacts are verified
        (FailedPrecondition naming version_a / version_b), all in threads; the scoring itself runs
        in a worker process (EvaluationRunner, which says why).
        """
        if a.label != b.label:
            raise InvalidArgument(
                f"version {a.version} predicts '{a.label}' and version {b.version} predicts '{b.label}'; "
                "one table cannot score both",
                field="evaluation_table",
            )
        features = {
            f"version {record.version}": [
                ResolvedFeature(f["name"], Encoding(f["encoding"]), f["dtype"]) for f in record.features
            ]
            for record in (a, b)
        }
        plan = await asyncio.to_thread(
            lambda: inspect_evaluation_table(
                self._offline_engine, table, a.label, features, max_rows=self._max_evaluation_rows
            )
        )
        artifacts = await asyncio.to_thread(
            lambda: tuple(
                (field, read_verified_artifact(record, field=field))
                for field, record in (("version_a", a), ("version_b", b))
            )
        )
        result = await self.evaluations.evaluate(
            EvaluationTask(self._offline_store_url, plan, artifacts, self._max_evaluation_rows)
        )
        logger.info(
            "compared %s versions %d and %d on table %s (%d rows)",
            a.name,
            a.version,
            b.version,
            table,
            result.rows,
        )
        return result

    # Promotion ----------------------------------------------------------------------------------

    async def promote(
        self,
        model: str,
        version: int,
        deployment: str,
        *,
        dry_run: bool,
        message: str,
        use: ModelUse = ModelUse.BIND,
        prior_weight: float = 0.0,
    ) -> PromoteResult:
        """Publish a config revision binding the version to the deployment and, by `use`, making it
        the scorer (algorithm `model`) or Thompson sampling's prior (`model_prior_weight`)."""
        if not model:
            raise InvalidArgument("must name a model", field="model")
        if not deployment:
            raise InvalidArgument("must name a deployment", field="deployment")
        if version < 0:
            raise InvalidArgument("must not be negative", field="version")
        if not math.isfinite(prior_weight) or prior_weight < 0:
            raise InvalidArgument("must be a non-negative number", field="prior_weight")
        if prior_weight and use is not ModelUse.PRIOR:
            raise InvalidArgument("applies only when the model is used as the prior", field="prior_weight")
        record, _ = await asyncio.to_thread(
            lambda: self.store.get_version(model, version, name_field="model")
        )
        artifact = artifact_path(record.artifact_uri)
        if not await asyncio.to_thread((artifact / MANIFEST_FILE).is_file):
            raise FailedPrecondition(
                f"the artifact of {model} version {record.version} is missing at {artifact}", field="model"
            )
        if self._config is None:
            raise FailedPrecondition("the trainer has no config service to publish to", field="deployment")
        spec_json, revision = await self._config.get(deployment)
        document = json.loads(spec_json)
        document["model"] = {"name": model, "version": record.version}
        how = ""
        if use is ModelUse.SCORE:
            document["algorithm"] = {"approach": "model"}
            how = ", ranking by its take-up"
        elif use is ModelUse.PRIOR:
            algorithm = dict(document.get("algorithm") or {"approach": "thompson"})
            approach = algorithm.get("approach", "thompson")
            if approach != "thompson":
                raise FailedPrecondition(
                    f"deployment '{deployment}' uses the '{approach}' algorithm; a model prior needs "
                    "'thompson' (or promote with use MODEL_USE_SCORE)",
                    field="use",
                )
            algorithm["model_prior_weight"] = prior_weight or DEFAULT_MODEL_PRIOR_WEIGHT
            document["algorithm"] = algorithm
            how = f", as Thompson sampling's prior (weight {algorithm['model_prior_weight']:g})"
        deployment_spec_from_mapping(document)  # refuse here, naming the field, what config would refuse
        new_revision, diff = await self._config.publish(
            json.dumps(document, sort_keys=True),
            deployment=deployment,
            expected_revision=revision,
            message=message or f"promote {model} version {record.version}{how}",
            dry_run=dry_run,
        )
        return PromoteResult(new_revision, deployment, diff, model, record.version)
