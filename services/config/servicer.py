"""gRPC face of the config service: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.auth import CALLER
from libs.common.errors import InvalidArgument
from libs.common.paging import page_of
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from services.config.core import distribution
from services.config.core.config_service import ConfigService, deployment_names
from services.config.core.publish_gate import GateOutcome
from services.config.core.schema import CHANGE_KIND_DELETE, CHANGE_KIND_PUBLISH, CHANGE_KIND_ROLLBACK
from services.config.core.store import StoredRevision

_FORMATS: dict[int, Literal["json", "yaml"] | None] = {
    config_pb2.SPEC_FORMAT_UNSPECIFIED: None,
    config_pb2.SPEC_FORMAT_JSON: "json",
    config_pb2.SPEC_FORMAT_YAML: "yaml",
}
_KINDS = {
    CHANGE_KIND_PUBLISH: config_pb2.CHANGE_KIND_PUBLISH,
    CHANGE_KIND_ROLLBACK: config_pb2.CHANGE_KIND_ROLLBACK,
    CHANGE_KIND_DELETE: config_pb2.CHANGE_KIND_DELETE,
}


def timestamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def deployment_message(stored: StoredRevision, *, include_spec: bool = True) -> config_pb2.Deployment:
    return config_pb2.Deployment(
        name=stored.deployment,
        revision=stored.revision,
        spec_json=stored.spec_json if include_spec else "",
        updated_at=timestamp(stored.created_at),
        author=stored.author,
        checksum=stored.checksum,
    )


def _author(requested: str) -> str:
    return requested or CALLER.get()


def _evaluation(gate: GateOutcome) -> config_pb2.PublishEvaluation:
    estimate = gate.estimate
    return config_pb2.PublishEvaluation(
        estimator=estimate.estimator if estimate else "",
        value=estimate.value if estimate else 0.0,
        lower=estimate.lower if estimate else 0.0,
        upper=estimate.upper if estimate else 0.0,
        live_value=estimate.live_value if estimate else 0.0,
        decisions=estimate.decisions if estimate else 0,
        passed=gate.passed,
        reason=gate.reason,
        warnings=gate.warnings,
        forced=gate.forced,
    )


class ConfigServicer(config_pb2_grpc.ConfigServiceServicer):
    def __init__(self, service: ConfigService) -> None:
        self._service = service

    async def Publish(self, request: config_pb2.PublishRequest, context: Any) -> config_pb2.PublishResponse:
        which = request.WhichOneof("spec")
        result, gate = await self._service.publish(
            spec_text=request.spec_text if which == "spec_text" else None,
            spec_document=MessageToDict(request.spec_struct) if which == "spec_struct" else None,
            format=_FORMATS.get(request.format),
            author=_author(request.author),
            message=request.message,
            dry_run=request.dry_run,
            expected_deployment=request.deployment,
            expected_revision=request.expected_revision,
            evaluate=request.evaluate,
            force=request.force,
        )
        return config_pb2.PublishResponse(
            revision=result.revision,
            deployment=result.deployment,
            diff=result.diff,
            changed=result.changed,
            dry_run=result.dry_run,
            evaluation=_evaluation(gate) if gate is not None else None,
        )

    async def Get(self, request: config_pb2.GetRequest, context: Any) -> config_pb2.GetResponse:
        stored, head = await self._service.get(request.deployment.name, request.deployment.revision)
        return config_pb2.GetResponse(deployment=deployment_message(stored), head_revision=head)

    async def List(self, request: config_pb2.ListRequest, context: Any) -> config_pb2.ListResponse:
        deployments, head = await self._service.list_deployments()
        page, following = page_of(deployments, request.page.page_size, request.page.page_token)
        return config_pb2.ListResponse(
            deployments=[deployment_message(d, include_spec=request.include_spec) for d in page],
            head_revision=head,
            page=common_pb2.PageResponse(total_size=len(deployments), next_page_token=following),
        )

    async def History(self, request: config_pb2.HistoryRequest, context: Any) -> config_pb2.HistoryResponse:
        entries = await self._service.history(request.deployment, request.limit, request.before_revision)
        return config_pb2.HistoryResponse(
            entries=[
                config_pb2.HistoryEntry(
                    revision=entry.stored.revision,
                    deployment=entry.stored.deployment,
                    author=entry.stored.author,
                    time=timestamp(entry.stored.created_at),
                    diff=entry.diff,
                    message=entry.stored.message,
                    kind=_KINDS[entry.stored.change_kind],
                    source_revision=entry.stored.source_revision or 0,
                )
                for entry in entries
            ]
        )

    async def Rollback(
        self, request: config_pb2.RollbackRequest, context: Any
    ) -> config_pb2.RollbackResponse:
        result = await self._service.rollback(
            request.deployment,
            request.to_revision,
            author=_author(request.author),
            message=request.message,
            dry_run=request.dry_run,
        )
        return config_pb2.RollbackResponse(
            revision=result.revision, deployment=result.deployment, diff=result.diff, changed=result.changed
        )

    async def Delete(self, request: config_pb2.DeleteRequest, context: Any) -> config_pb2.DeleteResponse:
        result = await self._service.delete(
            request.deployment, author=_author(request.author), message=request.message
        )
        return config_pb2.DeleteResponse(revision=result.revision)

    async def Watch(
        self, request_iterator: AsyncIterator[config_pb2.WatchRequest], context: Any
    ) -> AsyncIterator[config_pb2.WatchResponse]:
        async for message in self._service.watch(_replica_messages(request_iterator), context.peer()):
            yield _watch_response(message)

    async def ReplicaStatus(
        self, request: config_pb2.ReplicaStatusRequest, context: Any
    ) -> config_pb2.ReplicaStatusResponse:
        reports, head = await self._service.replica_status(request.replica_id)
        return config_pb2.ReplicaStatusResponse(
            head_revision=head,
            replicas=[
                config_pb2.ReplicaState(
                    replica_id=report.record.replica_id,
                    applied_revision=report.record.applied_revision,
                    last_nack_revision=report.record.last_nack_revision,
                    last_nack_reason=report.record.last_nack_reason,
                    last_seen=timestamp(report.record.last_seen),
                    staleness_seconds=report.staleness_seconds,
                    revisions_behind=report.revisions_behind,
                    connected=report.record.connected,
                    service=report.record.service,
                    version=report.record.version,
                    peer=report.record.peer,
                    plugins=report.record.plugins,
                    deployments=[
                        common_pb2.DeploymentRef(name=name, revision=revision)
                        for name, revision in sorted(report.record.deployment_revisions.items())
                    ],
                )
                for report in reports
            ],
        )

    async def Refresh(self, request: config_pb2.RefreshRequest, context: Any) -> config_pb2.RefreshResponse:
        notified = self._service.refresh(request.replica_id)
        return config_pb2.RefreshResponse(replicas_notified=notified, head_revision=self._service.feed.head)


async def _replica_messages(
    requests: AsyncIterator[config_pb2.WatchRequest],
) -> AsyncIterator[distribution.ReplicaMessage]:
    async for request in requests:
        kind = request.WhichOneof("kind")
        if kind == "subscribe":
            subscribe = request.subscribe
            yield distribution.Subscribe(
                replica_id=subscribe.replica_id,
                deployments=deployment_names(subscribe.deployments),
                known_revision=subscribe.known_revision,
                service=subscribe.service,
                version=subscribe.version,
            )
        elif kind == "ack":
            yield distribution.Ack(request.ack.revision, dict(request.ack.plugins))
        elif kind == "nack":
            yield distribution.Nack(request.nack.revision, request.nack.reason, request.nack.deployment)
        else:
            raise InvalidArgument("a Watch message must be a subscribe, ack or nack", field="kind")


def _watch_response(message: distribution.ServerMessage) -> config_pb2.WatchResponse:
    if isinstance(message, distribution.Snapshot):
        return config_pb2.WatchResponse(
            snapshot=config_pb2.Snapshot(
                revision=message.revision,
                deployments=[deployment_message(d) for d in message.deployments],
                refresh=message.refresh,
            )
        )
    if isinstance(message, distribution.Update):
        change = message.change
        return config_pb2.WatchResponse(
            update=config_pb2.Update(
                revision=change.revision,
                deployment=change.deployment,
                spec_json=change.spec_json,
                deleted=change.deleted,
                checksum=change.checksum,
            )
        )
    return config_pb2.WatchResponse(
        heartbeat=config_pb2.Heartbeat(
            head_revision=message.head_revision, server_time=timestamp(message.server_time)
        )
    )
