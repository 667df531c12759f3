"""gRPC face of a predictor replica: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

from google.api.httpbody_pb2 import HttpBody
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.config_follower import ConfigFollower
from libs.common.errors import InvalidArgument, Unavailable
from libs.policy.deployment import PreparedDeployment
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.predictor.core import ecosystem_api
from services.predictor.core.decision import Decision, DecisionEngine, InvokeInput, RespondInput
from services.predictor.core.replica import ReplicaState


def _plain(value: Value) -> Any:
    """A google.protobuf.Value as plain Python. Not MessageToDict: that raises on NaN and
    infinities, which a client can send and which must come back as INVALID_ARGUMENT."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        # JSON has one number type: 20 arrives as 20.0. A whole number comes back as an int.
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: _plain(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    return None  # null_value, or no kind set


def _struct(struct: Struct) -> dict[str, Any]:
    """A google.protobuf.Struct as a plain dict."""
    return {key: _plain(item) for key, item in struct.fields.items()}


def _json_body(document: dict[str, Any]) -> HttpBody:
    """A REST reply's body as it is sent; a number that is not finite (not JSON) is sent as null."""
    try:
        data = json.dumps(document, allow_nan=False)
    except ValueError:
        data = json.dumps(_finite(document), allow_nan=False)
    return HttpBody(content_type="application/json", data=data.encode())


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _value(message: predictor_pb2.InvokeRequest, field: str) -> Any:
    """A google.protobuf.Value field as plain Python (None when unset)."""
    if not message.HasField(field):
        return None
    value: Value = getattr(message, field)
    return _plain(value)


def _accepted_offers(request: predictor_pb2.RespondRequest) -> list[str]:
    """accepted_offers, and offers_accepted in any form the REST face takes (ecosystem_api)."""
    names = list(request.accepted_offers)
    if request.HasField("offers_accepted"):
        names += ecosystem_api.offer_names(_plain(request.offers_accepted), "offers_accepted")
    return names


def _event_time(request: predictor_pb2.RespondRequest) -> float | None:
    """Seconds since the epoch. An aware datetime: a naive one's .timestamp() reads it as local time."""
    if not request.HasField("event_time"):
        return None
    try:
        return request.event_time.ToDatetime(tzinfo=datetime.UTC).timestamp()
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(f"is not a valid timestamp: {exc}", field="event_time") from None


class PredictorServicer(predictor_pb2_grpc.PredictorServiceServicer):
    def __init__(
        self, replica: ReplicaState, follower: ConfigFollower[PreparedDeployment], engine: DecisionEngine
    ) -> None:
        self._replica = replica
        self._follower = follower
        self._engine = engine

    async def Ping(self, request: predictor_pb2.PingRequest, context: Any) -> predictor_pb2.PingResponse:
        server_time = Timestamp()
        server_time.GetCurrentTime()
        return predictor_pb2.PingResponse(
            replica_id=self._replica.replica_id,
            config_revision=self._replica.config_revision,
            server_time=server_time,
        )

    async def Invoke(
        self, request: predictor_pb2.InvokeRequest, context: Any
    ) -> predictor_pb2.InvokeResponse:
        config = self._replica.config
        if config is None:
            raise Unavailable("this replica has no config yet")
        decision = await self._engine.invoke(
            InvokeInput(
                campaign=request.campaign,
                subcampaign=request.subcampaign,
                channel=request.channel,
                customer=request.customer,
                userid=request.userid,
                numberoffers=_value(request, "numberoffers"),
                params=_value(request, "params"),
                in_param=_value(request, "in_param"),
                deployment=request.deployment,
            ),
            config,
        )
        return self._invoke_response(decision, request)

    def _invoke_response(
        self, decision: Decision, request: predictor_pb2.InvokeRequest
    ) -> predictor_pb2.InvokeResponse:
        context = {name: str(value) for name, value in decision.context.items()}
        rows = []
        for row in decision.offers:
            details = Struct()
            if row.offer.attributes:
                details.update(dict(row.offer.attributes))
            rows.append(
                predictor_pb2.FinalResult(
                    result=predictor_pb2.FinalResult.Result(
                        offer=row.offer.id,
                        offer_name=row.offer.name,
                        score=row.score,
                        final_score=row.final_score,
                        arm_reward=row.arm_reward,
                        propensity=row.propensity,
                        price=row.offer.price,
                        cost=row.offer.cost,
                        rank=row.rank,
                        explored=row.explored,
                        context=context,
                        segment=decision.segment,
                        arm_count=row.arm_count,
                        offer_details=details,
                        model_score=row.model_score or 0.0,
                    )
                )
            )
        return predictor_pb2.InvokeResponse(
            uuid=decision.uuid,
            deployment=decision.deployment,
            config_revision=decision.config_revision,
            variant=decision.variant,
            explore=int(decision.explore),
            final_result=rows,
            customer=request.customer,
            campaign=request.campaign,
            channel=request.channel,
            segment=decision.segment,
            replica_id=self._replica.replica_id,
            warnings=decision.warnings,
            model=decision.model,
            routed_by=decision.routed_by,
        )

    async def Respond(
        self, request: predictor_pb2.RespondRequest, context: Any
    ) -> predictor_pb2.RespondResponse:
        outcome = await self._engine.respond(
            RespondInput(
                uuid=request.uuid,
                accepted=_accepted_offers(request),
                channel_name=request.channel_name,
                reward=request.reward if request.HasField("reward") else None,
                event_time=_event_time(request),
                payload=_struct(request.payload),
            ),
            self._replica.config,
        )
        return predictor_pb2.RespondResponse(
            uuid=outcome.uuid,
            learned=outcome.learned,
            late=outcome.late,
            duplicate=outcome.duplicate,
            message=outcome.message,
            matched_offers=outcome.matched_offers,
            deployment=outcome.deployment,
        )

    async def EcosystemInvoke(
        self, request: predictor_pb2.EcosystemInvokeRequest, context: Any
    ) -> predictor_pb2.EcosystemInvokeResponse:
        config = self._replica.config
        if config is None:
            raise Unavailable("this replica has no config yet")
        invocation = ecosystem_api.read_invocation(_struct(request.payload))
        decision = await self._engine.invoke(invocation.request, config)
        reply = ecosystem_api.invocation_reply(decision, invocation, self._replica.replica_id)
        return predictor_pb2.EcosystemInvokeResponse(body=_json_body(reply))

    async def EcosystemRespond(
        self, request: predictor_pb2.EcosystemRespondRequest, context: Any
    ) -> predictor_pb2.EcosystemRespondResponse:
        response = ecosystem_api.read_response(_struct(request.payload))
        outcome = await self._engine.respond(response.request, self._replica.config)
        reply = ecosystem_api.response_reply(outcome, response)
        return predictor_pb2.EcosystemRespondResponse(body=_json_body(reply))

    async def Health(
        self, request: predictor_pb2.HealthRequest, context: Any
    ) -> predictor_pb2.HealthResponse:
        config = self._replica.config
        return predictor_pb2.HealthResponse(
            status="UP" if config is not None else "STARTING",
            replica_id=self._replica.replica_id,
            config_revision=self._replica.config_revision,
            deployments=len(config.deployments) if config is not None else 0,
        )

    async def Refresh(
        self, request: predictor_pb2.RefreshRequest, context: Any
    ) -> predictor_pb2.RefreshResponse:
        try:
            revision = await self._follower.refresh()
        except (ConnectionError, TimeoutError) as exc:
            raise Unavailable(f"cannot resynchronise with the config service: {exc}") from None
        return predictor_pb2.RefreshResponse(config_revision=revision, replica_id=self._replica.replica_id)
