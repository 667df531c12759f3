"""The config service's client of the monitor: a candidate spec's estimated value (publish gate)."""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc import aio

from libs.common.client import open_channel
from libs.common.deployment_spec import PublishGate
from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.tls import ChannelTls
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.config.core.publish_gate import CandidateEstimate

_ESTIMATORS = {
    "ips": monitor_pb2.ESTIMATOR_IPS,
    "snips": monitor_pb2.ESTIMATOR_SNIPS,
    "dr": monitor_pb2.ESTIMATOR_DR,
}


class MonitorServiceClient:
    """Implements services.config.core.publish_gate.PolicyEvaluator over gRPC."""

    def __init__(
        self, target: str, api_key: str | None, deadline_seconds: float, tls: ChannelTls | None = None
    ) -> None:
        self._target = target
        self._channel = open_channel(target, api_key=api_key, deadline_seconds=deadline_seconds, tls=tls)
        self._stub = monitor_pb2_grpc.MonitorServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def estimate(self, deployment: str, spec_json: str, gate: PublishGate) -> CandidateEstimate | None:
        window = Duration()
        window.FromNanoseconds(int(gate.window_seconds * 1e9))
        request = monitor_pb2.EvaluatePolicyRequest(
            deployment=deployment,
            candidate_spec_json=spec_json,
            window=window,
            estimators=[_ESTIMATORS[gate.estimator]],
            confidence_level=gate.confidence_level,
        )
        try:
            reply = await self._stub.EvaluatePolicy(request)
        except aio.AioRpcError as error:
            details = error.details() or error.code().name
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION and "no decisions" in details:
                return None
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(f"monitor at {self._target}: {details}", field="monitor_target") from None
            raise FailedPrecondition(
                f"the monitor said {error.code().name}: {details}", field="publish_gate"
            ) from None
        estimate = next(
            (row for row in reply.estimates if row.estimator == _ESTIMATORS[gate.estimator]), None
        )
        if estimate is None:
            why = "; ".join(reply.refused) or f"no {gate.estimator} estimate"
            raise FailedPrecondition(why, field="publish_gate")
        return CandidateEstimate(
            estimator=gate.estimator,
            value=estimate.value,
            lower=estimate.lower,
            upper=estimate.upper,
            live_value=reply.logged_value,
            decisions=reply.usable_decisions,
            warnings=list(reply.warnings),
        )
