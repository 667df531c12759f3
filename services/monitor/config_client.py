"""The monitor's client of the config service: a deployment's head revision and stored specs."""

from __future__ import annotations

import grpc
from grpc import aio

from libs.common.client import open_channel
from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.tls import ChannelTls
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from services.monitor.core.monitor_service import ReplicaState


class ConfigServiceClient:
    """Implements services.monitor.core.monitor_service.DeploymentConfig over gRPC."""

    def __init__(
        self, target: str, api_key: str | None, deadline_seconds: float, tls: ChannelTls | None = None
    ) -> None:
        self._target = target
        self._channel = open_channel(target, api_key=api_key, deadline_seconds=deadline_seconds, tls=tls)
        self._stub = config_pb2_grpc.ConfigServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def head_revision(self, deployment: str) -> int | None:
        spec = await self.spec(deployment, 0)
        return None if spec is None else spec[1]

    async def spec(self, deployment: str, revision: int) -> tuple[str, int] | None:
        """(spec JSON, revision) of the deployment at `revision` (0: head); None when there is none."""
        try:
            response = await self._stub.Get(
                config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name=deployment, revision=revision))
            )
        except aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._translate(error) from None
        if revision > response.head_revision:
            return None  # the store reads "as of" a revision: one past its head does not exist yet
        return response.deployment.spec_json, response.deployment.revision

    def _translate(self, error: aio.AioRpcError) -> Exception:
        code = error.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return FailedPrecondition(
                f"the config service refused the monitor's key ({code.name})", field="config_api_key"
            )
        return Unavailable(
            f"config service at {self._target}: {code.name}: {error.details() or ''}", field="config_target"
        )

    async def replica_states(self) -> list[ReplicaState]:
        """Every replica the config service knows: what it applied, its last NACK, whether connected."""
        try:
            response = await self._stub.ReplicaStatus(config_pb2.ReplicaStatusRequest())
        except aio.AioRpcError as error:
            raise self._translate(error) from None
        return [
            ReplicaState(
                replica_id=state.replica_id,
                applied_revision=state.applied_revision,
                last_nack_revision=state.last_nack_revision,
                last_nack_reason=state.last_nack_reason,
                revisions_behind=state.revisions_behind,
                connected=state.connected,
                staleness_seconds=state.staleness_seconds,
                deployments=[ref.name for ref in state.deployments],
            )
            for state in response.replicas
        ]
