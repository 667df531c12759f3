"""The monitor's logic behind its RPCs: the decision-log consumer in the background, and the
window queries over what it stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Engine

from libs.common.deployment_spec import DeploymentSpec, parse_deployment_spec
from libs.common.distribution_drift import DriftThresholds, TrainingReference
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from libs.policy.model_repository import ModelRepository
from services.monitor.core.alert_rules import Severity
from services.monitor.core.alert_store import Alert
from services.monitor.core.decision_archive import DecisionArchive
from services.monitor.core.decision_consumer import DecisionLogConsumer
from services.monitor.core.drift import DRIFT_COLUMNS, DriftReport, drift_report
from services.monitor.core.logged_table import inspect_logged_table, read_logged_rows
from services.monitor.core.policy_evaluation import (
    CONTACT_COLUMNS,
    CandidateEvaluation,
    EvaluationRequest,
    ModelsByKey,
    evaluate_candidate,
    evaluate_logged_rows,
)
from services.monitor.core.rollup_store import MinuteSeries, RollupStore
from services.monitor.core.rollups import LatencyCounts, minute_of
from services.monitor.core.shadow_comparison import ShadowComparison, compare_shadows
from services.monitor.core.summaries import Summary, build_summary

logger = logging.getLogger(__name__)

DEFAULT_SUMMARY_WINDOW_SECONDS = 3600.0
MAX_SUMMARY_WINDOW_SECONDS = 90 * 86400.0  # the rollups are kept this long
ARCHIVE_PRUNE_EVERY_SECONDS = 600.0
DEFAULT_EVALUATION_WINDOW_SECONDS = 7 * 86400.0
MAX_LOGGED_TABLE_WINDOW_SECONDS = 5 * 366 * 86400.0  # another system's log may be old
DEFAULT_DRIFT_WINDOW_SECONDS = 86400.0
DEFAULT_SHADOW_WINDOW_SECONDS = 86400.0
SHADOW_CONTACT_COLUMNS = ["uuid", "eligible", "epsilon", "outcomes", "counts", "shown"]


@dataclass(frozen=True)
class ReplicaState:
    """A predictor replica as the config service sees it."""

    replica_id: str
    applied_revision: int
    last_nack_revision: int
    last_nack_reason: str
    revisions_behind: int
    connected: bool
    staleness_seconds: float
    deployments: list[str]


class AlertEvaluation(Protocol):
    """The alert rules engine (alert_engine.AlertEngine), as the service runs and lists it."""

    async def run(self) -> None: ...

    async def list_alerts(
        self,
        deployment: str = "",
        include_resolved: bool = False,
        min_severity: Severity | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Alert], str, int]: ...


class TrainingReferences(Protocol):
    """What the monitor reads of the trainer."""

    async def training_reference(self, name: str, version: int) -> TrainingReference | None:
        """The reference recorded with `name:version` (0: newest); None when there is none."""


class DeploymentConfig(Protocol):
    """What the monitor reads of the config service."""

    async def head_revision(self, deployment: str) -> int | None:
        """The revision the deployment last changed at; None when the config service has no such deployment."""

    async def spec(self, deployment: str, revision: int) -> tuple[str, int] | None:
        """(spec JSON, revision) at `revision` (0: head); None when there is none."""

    async def replica_states(self) -> list[ReplicaState]:
        """Every replica the config service knows."""


@dataclass(frozen=True)
class Window:
    start: float  # epoch seconds, the first whole minute in the window
    end: float  # epoch seconds, exclusive

    @property
    def minutes(self) -> tuple[int, int]:
        return minute_of(self.start), minute_of(self.end - 1e-9) + 60


def resolve_window(
    window_seconds: float | None,
    end_time: float | None,
    *,
    default_seconds: float,
    max_seconds: float,
    now: float,
    field: str = "window",
) -> Window:
    """[end - window, end), checked: a zero, negative or over-long window is refused with its field."""
    seconds = default_seconds if window_seconds is None else window_seconds
    if seconds <= 0:
        raise InvalidArgument(f"must be longer than zero, got {seconds:g} s", field=field)
    if seconds > max_seconds:
        raise InvalidArgument(
            f"must be at most {max_seconds / 86400:g} days (what is kept), got {seconds / 86400:g} days",
            field=field,
        )
    end = now if end_time is None else end_time
    if end > now + 60:
        raise InvalidArgument("is in the future", field="end_time")
    return Window(end - seconds, end)


class MonitorService:
    def __init__(
        self,
        store: RollupStore,
        archive: DecisionArchive,
        consumer: DecisionLogConsumer | None,
        config: DeploymentConfig | None,
        trainer: TrainingReferences | None = None,
        drift_thresholds: DriftThresholds | None = None,
        clock: Callable[[], float] = time.time,
        offline_store: Engine | None = None,
        models: ModelRepository | None = None,
    ) -> None:
        self.offline_store = offline_store  # read only: other systems' decision logs
        self.models = models  # the trainer's artifacts: the model versions candidates bind
        self.trainer = trainer
        self.alerts: AlertEvaluation | None = None
        self.drift_thresholds = drift_thresholds or DriftThresholds()
        self.store = store
        self.archive = archive
        self.consumer = consumer
        self.config = config
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.consumer is not None:
            self._background(self.consumer.run(), "decision-log-consumer")
        self._background(self._prune_archive(), "archive-retention")
        if self.alerts is not None:
            self._background(self.alerts.run(), "alert-rules")

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(_report_end)
        self._tasks.append(task)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _prune_archive(self) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.archive.prune, self._clock())
                if removed:
                    logger.info("removed %d decision archive partitions past the retention", removed)
            except OSError:
                logger.exception("decision archive retention failed")
            await asyncio.sleep(ARCHIVE_PRUNE_EVERY_SECONDS)

    def _rollup_window(self, window_seconds: float | None, end_time: float | None) -> Window:
        return resolve_window(
            window_seconds,
            end_time,
            default_seconds=DEFAULT_SUMMARY_WINDOW_SECONDS,
            max_seconds=MAX_SUMMARY_WINDOW_SECONDS,
            now=self._clock(),
        )

    async def head_revision(self, deployment: str) -> int:
        """The deployment's head revision; NotFound when neither the config service nor the log knows it."""
        if not deployment:
            raise InvalidArgument("is required", field="deployment")
        head: int | None = None
        if self.config is not None:
            try:
                head = await self.config.head_revision(deployment)
            except Unavailable:
                logger.warning(
                    "config service unavailable: %s answered without its head revision", deployment
                )
        if head is None:
            known = await asyncio.to_thread(self.store.deployments)
            if deployment not in known:
                raise NotFound(
                    f"no deployment '{deployment}' in the config or the decision log", field="deployment"
                )
            head = 0
        return head

    async def summary(self, deployment: str, window_seconds: float | None, end_time: float | None) -> Summary:
        window = self._rollup_window(window_seconds, end_time)
        head = await self.head_revision(deployment)
        start, end = window.minutes
        totals = await asyncio.to_thread(self.store.window, deployment, start, end)
        return build_summary(deployment, window.start, window.end, totals, head)

    async def time_series(
        self, deployment: str, window_seconds: float | None, end_time: float | None
    ) -> tuple[Window, list[MinuteSeries], list[tuple[int, int, LatencyCounts]]]:
        window = self._rollup_window(window_seconds, end_time)
        await self.head_revision(deployment)
        start, end = window.minutes
        offers = await asyncio.to_thread(self.store.offer_series, deployment, start, end)
        invokes = await asyncio.to_thread(self.store.invoke_series, deployment, start, end)
        return window, offers, invokes

    async def evaluate(
        self,
        deployment: str,
        *,
        candidate_spec_json: str | None,
        candidate_revision: int | None,
        window_seconds: float | None,
        end_time: float | None,
        request: EvaluationRequest,
        logged_table: str = "",
    ) -> CandidateEvaluation:
        """The candidate's estimated value on the decisions the deployment logged in the window, or
        on another system's decisions in an ingested table (`logged_table`)."""
        if not (logged_table and candidate_spec_json):
            # A team evaluating its old system's log may have published nothing yet.
            await self.head_revision(deployment)
        if candidate_spec_json:
            spec = parse_deployment_spec(candidate_spec_json, "json")
        elif candidate_revision:
            stored = (
                await self.config.spec(deployment, candidate_revision) if self.config is not None else None
            )
            if stored is None:
                raise NotFound(
                    f"the config service has no revision {candidate_revision} of '{deployment}'",
                    field="candidate_revision",
                )
            spec = parse_deployment_spec(stored[0], "json")
        else:
            raise InvalidArgument("name a candidate: a spec or a stored revision", field="candidate")
        if spec.name != deployment:
            raise InvalidArgument(
                f"the candidate is a spec of '{spec.name}', not of '{deployment}'",
                field="candidate_spec_json",
            )
        models = await asyncio.to_thread(self._candidate_models, spec)
        if logged_table:
            return await self._evaluate_logged_table(
                spec, models, logged_table, window_seconds, end_time, request
            )
        window = resolve_window(
            window_seconds,
            end_time,
            default_seconds=min(DEFAULT_EVALUATION_WINDOW_SECONDS, self.archive.retention_seconds),
            max_seconds=self.archive.retention_seconds,
            now=self._clock(),
        )
        contacts = await asyncio.to_thread(
            self.archive.contacts, deployment, window.start, window.end, CONTACT_COLUMNS
        )
        responses = await asyncio.to_thread(
            self.archive.responses, deployment, window.start, self._clock() + 60
        )
        if contacts.num_rows == 0:
            raise FailedPrecondition(
                f"no decisions of '{deployment}' logged between {window.start:.0f} and {window.end:.0f}",
                field="window",
            )
        return await asyncio.to_thread(evaluate_candidate, spec, contacts, responses, request, models)

    async def compare_shadow(
        self, deployment: str, window_seconds: float | None, end_time: float | None
    ) -> tuple[Window, list[ShadowComparison]]:
        """The deployment's shadow decisions in the window against its live ones (shadow_comparison.py)."""
        await self.head_revision(deployment)
        window = resolve_window(
            window_seconds,
            end_time,
            default_seconds=min(DEFAULT_SHADOW_WINDOW_SECONDS, self.archive.retention_seconds),
            max_seconds=self.archive.retention_seconds,
            now=self._clock(),
        )
        contacts = await asyncio.to_thread(
            self.archive.contacts, deployment, window.start, window.end, SHADOW_CONTACT_COLUMNS
        )
        shadows = await asyncio.to_thread(self.archive.shadows, deployment, window.start, window.end)
        responses = await asyncio.to_thread(
            self.archive.responses, deployment, window.start, self._clock() + 60
        )
        comparisons = await asyncio.to_thread(compare_shadows, contacts, responses, shadows)
        if not comparisons and self.config is not None:
            try:
                stored = await self.config.spec(deployment, 0)
            except Unavailable:
                stored = None  # answer what the log says: no shadow decisions
            if stored is not None and parse_deployment_spec(stored[0], "json").shadow is None:
                raise FailedPrecondition(
                    f"'{deployment}' names no shadow (its spec's `shadow`), and no shadow decisions of it "
                    "were logged in the window",
                    field="deployment",
                )
        return window, comparisons

    def _candidate_models(self, spec: DeploymentSpec) -> ModelsByKey:
        """The model versions the candidate binds, loaded and verified as a replica loads them."""
        if self.models is None:
            if spec.model_bindings():
                raise FailedPrecondition(
                    "the candidate binds a model and this monitor has no model artifacts to load it from "
                    "(set LIVELOOP_MONITOR_ARTIFACT_DIR)",
                    field="model",
                )
            return {}
        return self.models.load_bindings(spec)

    async def _evaluate_logged_table(
        self,
        spec: DeploymentSpec,
        models: ModelsByKey,
        table: str,
        window_seconds: float | None,
        end_time: float | None,
        request: EvaluationRequest,
    ) -> CandidateEvaluation:
        if self.offline_store is None:
            raise FailedPrecondition(
                "this monitor has no offline store to read logged tables from", field="logged_table"
            )
        start: float | None = None
        end: float | None = None
        if window_seconds is not None or end_time is not None:  # else the whole table
            window = resolve_window(
                window_seconds,
                end_time,
                default_seconds=MAX_LOGGED_TABLE_WINDOW_SECONDS,
                max_seconds=MAX_LOGGED_TABLE_WINDOW_SECONDS,
                now=self._clock(),
            )
            start, end = window.start, window.end
        engine = self.offline_store
        logged = await asyncio.to_thread(inspect_logged_table, engine, table, start, end)
        return await asyncio.to_thread(
            lambda: evaluate_logged_rows(
                spec,
                read_logged_rows(engine, logged, start, end),
                logged.first_slot_rows,
                logged.offers,
                request,
                source=f"table '{table}'",
                models=models,
            )
        )

    async def drift(
        self,
        deployment: str,
        *,
        window_seconds: float | None = None,
        features: Sequence[str] = (),
        model: tuple[str, int] | None = None,
    ) -> tuple[Window, DriftReport]:
        """Served model inputs and scores over the window against the model version's training reference."""
        await self.head_revision(deployment)
        window = resolve_window(
            window_seconds,
            None,
            default_seconds=min(DEFAULT_DRIFT_WINDOW_SECONDS, self.archive.retention_seconds),
            max_seconds=self.archive.retention_seconds,
            now=self._clock(),
        )
        if model is None:
            stored = await self.config.spec(deployment, 0) if self.config is not None else None
            binding = parse_deployment_spec(stored[0], "json").model if stored is not None else None
            if binding is None:
                raise FailedPrecondition(
                    f"'{deployment}' binds no model: name the reference model", field="reference_model"
                )
            model = (binding.name, binding.version)
        if self.trainer is None:
            raise Unavailable("the monitor has no trainer to read references from", field="trainer_target")
        reference = await self.trainer.training_reference(*model)
        if reference is None:
            raise NotFound(
                f"no training reference for {model[0]}:{model[1] or 'newest'} (unknown, or trained "
                "before the trainer recorded references)",
                field="reference_model",
            )
        contacts = await asyncio.to_thread(
            self.archive.contacts, deployment, window.start, window.end, DRIFT_COLUMNS
        )
        report = await asyncio.to_thread(drift_report, reference, contacts, features, self.drift_thresholds)
        return window, report

    async def list_alerts(
        self,
        deployment: str,
        include_resolved: bool,
        min_severity: Severity | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Alert], str, int]:
        if self.alerts is None:
            raise Unavailable("this monitor evaluates no alert rules", field="alert_rules_file")
        return await self.alerts.list_alerts(
            deployment, include_resolved, min_severity, page_size, page_token
        )

    def decision_log_status(self) -> DecisionLogStatus:
        consumer = self.consumer
        return DecisionLogStatus(
            lag=consumer.state.lag if consumer is not None else None,
            trimmed_entries=self.store.trimmed(consumer.options.stream) if consumer is not None else 0,
            malformed_entries=self.store.malformed(),
            consumed_entries=consumer.state.applied if consumer is not None else 0,
        )


def _report_end(task: asyncio.Task[None]) -> None:
    """A background task is meant to run until the service stops: say so loudly if it ends."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        logger.error("%s stopped: %r", task.get_name(), error, exc_info=error)
    else:
        logger.error("%s stopped", task.get_name())


@dataclass(frozen=True)
class DecisionLogStatus:
    lag: int | None
    trimmed_entries: int
    malformed_entries: dict[str, int]
    consumed_entries: int
