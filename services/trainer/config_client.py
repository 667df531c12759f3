"""The trainer's client of the config service: read a deployment, publish a new revision of it."""

from __future__ import annotations

import json
from collections.abc import Mapping

import grpc
from grpc import aio

from libs.common.client import open_channel
from libs.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    LiveloopError,
    NotFound,
    Unavailable,
)
from libs.common.tls import ChannelTls
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc

_ERRORS: dict[grpc.StatusCode, type[LiveloopError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
}


def _translate(error: aio.AioRpcError, target: str, field: str) -> LiveloopError:
    details = error.details() or error.code().name
    code = error.code()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return FailedPrecondition(
            f"the config service refused the trainer's key ({code.name}): set config_api_key to an admin key",
            field="config_api_key",
        )
    error_class = _ERRORS.get(code)
    if error_class is not None:
        return error_class(f"config service: {details}", field=field)
    return Unavailable(f"config service at {target}: {code.name}: {details}", field="config_target")


class ConfigServiceClient:
    """Implements services.trainer.core.trainer_service.DeploymentConfig over gRPC."""

    def __init__(
        self, target: str, api_key: str | None, deadline_seconds: float, tls: ChannelTls | None = None
    ) -> None:
        self._target = target
        self._channel = open_channel(target, api_key=api_key, deadline_seconds=deadline_seconds, tls=tls)
        self._stub = config_pb2_grpc.ConfigServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def get(self, deployment: str) -> tuple[str, int]:
        try:
            response = await self._stub.Get(
                config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name=deployment))
            )
        except aio.AioRpcError as error:
            raise _translate(error, self._target, "deployment") from None
        return response.deployment.spec_json, response.deployment.revision

    async def publish(
        self, spec_json: str, *, deployment: str, expected_revision: int, message: str, dry_run: bool
    ) -> tuple[int, str]:
        try:
            response = await self._stub.Publish(
                config_pb2.PublishRequest(
                    spec_text=spec_json,
                    format=config_pb2.SPEC_FORMAT_JSON,
                    deployment=deployment,
                    expected_revision=expected_revision,
                    message=message,
                    dry_run=dry_run,
                )
            )
        except aio.AioRpcError as error:
            raise _translate(error, self._target, "deployment") from None
        return response.revision, response.diff

    async def bindings(self) -> Mapping[str, tuple[str, int]]:
        try:
            response = await self._stub.List(config_pb2.ListRequest(include_spec=True), timeout=2.0)
        except aio.AioRpcError as error:
            raise _translate(error, self._target, "deployment") from None
        bound: dict[str, tuple[str, int]] = {}
        for item in response.deployments:
            model = json.loads(item.spec_json).get("model") if item.spec_json else None
            if isinstance(model, dict) and "name" in model and "version" in model:
                bound[item.name] = (str(model["name"]), int(model["version"]))
        return bound
