"""The config service's operations, asynchronous, over the SQL store and the live distribution."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any, Literal

from libs.common.deployment_spec import (
    DeploymentSpec,
    canonical_json,
    deployment_spec_from_mapping,
    parse_deployment_spec,
)
from libs.common.errors import FailedPrecondition, InvalidArgument, LiveloopError, NotFound, Unavailable
from libs.policy.plugins import bind_plugins
from services.config.core.distribution import (
    ReplicaMessage,
    ReplicaRegistry,
    ReplicaReport,
    RevisionFeed,
    ServerMessage,
    WatchSession,
    replica_reports,
)
from services.config.core.publish_gate import GateOutcome, PolicyEvaluator, evaluate_candidate
from services.config.core.store import ChangeResult, ConfigStore, HistoryEntry, StoredRevision


class ConfigService:
    def __init__(
        self,
        store: ConfigStore,
        *,
        heartbeat_seconds: float = 5.0,
        poll_seconds: float = 1.0,
        evaluator: PolicyEvaluator | None = None,
    ) -> None:
        self.store = store
        self.evaluator = evaluator
        self.feed = RevisionFeed(store, poll_seconds=poll_seconds)
        self.registry = ReplicaRegistry()
        self._heartbeat_seconds = heartbeat_seconds

    async def start(self) -> None:
        await self.feed.start()

    async def stop(self) -> None:
        await self.feed.stop()

    async def publish(
        self,
        *,
        spec_text: str | None,
        spec_document: dict[str, Any] | None,
        format: Literal["json", "yaml"] | None,
        author: str,
        message: str = "",
        dry_run: bool = False,
        expected_deployment: str = "",
        expected_revision: int = 0,
        evaluate: bool = False,
        force: bool = False,
    ) -> tuple[ChangeResult, GateOutcome | None]:
        try:
            spec = self._validate(spec_text, spec_document, format)
            if expected_deployment and expected_deployment != spec.name:
                raise InvalidArgument(
                    f"the spec is named '{spec.name}', not '{expected_deployment}'", field="deployment"
                )
            gate = await self._gate(spec, evaluate=evaluate, force=force, dry_run=dry_run)
            if gate is not None:
                message = f"{message} | {gate.audit_text()}" if message else gate.audit_text()
            result = await asyncio.to_thread(
                self.store.publish,
                spec,
                author=author,
                message=message,
                dry_run=dry_run,
                expected_revision=expected_revision,
            )
        except LiveloopError as refused:
            if not dry_run:
                await asyncio.to_thread(
                    self.store.record_refusal,
                    author,
                    "publish_refused",
                    {"reason": refused.message, "deployment": expected_deployment},
                )
            raise
        await self._announce(result)
        return result, gate

    async def _gate(
        self, spec: DeploymentSpec, *, evaluate: bool, force: bool, dry_run: bool
    ) -> GateOutcome | None:
        """The candidate's evaluation when asked for or required by the live spec; refuses (unless
        forced or a dry run) a candidate the live spec's gate does not let through."""
        try:
            live, _head = await asyncio.to_thread(self.store.get, spec.name, 0)
        except NotFound:
            live = None
        live_gate = parse_deployment_spec(live.spec_json, "json").publish_gate if live is not None else None
        required = live_gate is not None and live_gate.require_evaluation
        if not (evaluate or required):
            return None
        if live_gate is None:
            return GateOutcome(None, True, "a new deployment: no logged decisions to evaluate on")
        outcome = await evaluate_candidate(self.evaluator, spec.name, canonical_json(spec), live_gate)
        if outcome.passed or not required or dry_run:
            return outcome
        if not force:
            raise FailedPrecondition(
                f"the publish gate refuses it: {outcome.audit_text()} (force to store it anyway)",
                field="publish_gate",
            )
        return replace(outcome, forced=True)

    @staticmethod
    def _validate(
        spec_text: str | None, spec_document: dict[str, Any] | None, format: Literal["json", "yaml"] | None
    ) -> DeploymentSpec:
        if spec_text:
            spec = parse_deployment_spec(spec_text, format)
        elif spec_document:
            spec = deployment_spec_from_mapping(spec_document)
        else:
            raise InvalidArgument("no spec given: send spec_text or spec_struct", field="spec")
        bind_plugins(spec.plugins)  # a plugin not installed here, or parameters it refuses
        return spec

    async def rollback(
        self, deployment: str, to_revision: int, *, author: str, message: str = "", dry_run: bool = False
    ) -> ChangeResult:
        _require_name(deployment)
        try:
            target, _ = await self.get(deployment, to_revision)
        except LiveloopError:
            target = None  # the rollback itself names what is wrong
        if target is not None and target.revision == to_revision and target.spec_json:
            # What Publish checks that can change after a spec was stored: its plugins are installed.
            bind_plugins(deployment_spec_from_mapping(json.loads(target.spec_json)).plugins)
        result = await asyncio.to_thread(
            self.store.rollback, deployment, to_revision, author=author, message=message, dry_run=dry_run
        )
        await self._announce(result)
        return result

    async def delete(self, deployment: str, *, author: str, message: str = "") -> ChangeResult:
        _require_name(deployment)
        result = await asyncio.to_thread(self.store.delete, deployment, author=author, message=message)
        await self._announce(result)
        return result

    async def _announce(self, result: ChangeResult) -> None:
        if result.stored is not None:
            await self.feed.advance(result.revision)

    async def get(self, deployment: str, revision: int = 0) -> tuple[StoredRevision, int]:
        _require_name(deployment)
        return await asyncio.to_thread(self.store.get, deployment, revision)

    async def list_deployments(self) -> tuple[list[StoredRevision], int]:
        return await asyncio.to_thread(self.store.list_current)

    async def history(self, deployment: str, limit: int, before_revision: int) -> list[HistoryEntry]:
        return await asyncio.to_thread(self.store.history, deployment, limit, before_revision)

    def watch(self, incoming: AsyncIterator[ReplicaMessage], peer: str) -> AsyncIterator[ServerMessage]:
        session = WatchSession(
            self.store, self.feed, self.registry, heartbeat_seconds=self._heartbeat_seconds
        )
        return session.run(incoming, peer)

    async def replica_status(self, replica_id: str = "") -> tuple[list[ReplicaReport], int]:
        return await asyncio.to_thread(replica_reports, self.store, self.registry, replica_id)

    def refresh(self, replica_id: str = "") -> int:
        """How many connected replicas were sent a snapshot; none is an error, not a success."""
        notified = self.registry.request_refresh(replica_id)
        if notified == 0 and replica_id:
            raise NotFound(f"no replica '{replica_id}' is connected", field="replica_id")
        if notified == 0:
            raise Unavailable("no replica is connected to the config service: nothing to refresh")
        return notified


def _require_name(deployment: str) -> None:
    if not deployment:
        raise InvalidArgument("must name a deployment", field="deployment")


def deployment_names(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted({value for value in values if value}))
