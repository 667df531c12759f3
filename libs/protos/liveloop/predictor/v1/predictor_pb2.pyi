import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("replica_id", "config_revision", "server_time")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    config_revision: int
    server_time: _timestamp_pb2.Timestamp
    def __init__(self, replica_id: _Optional[str] = ..., config_revision: _Optional[int] = ..., server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class InvokeRequest(_message.Message):
    __slots__ = ("campaign", "subcampaign", "channel", "customer", "userid", "numberoffers", "params", "in_param", "deployment")
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    SUBCAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    USERID_FIELD_NUMBER: _ClassVar[int]
    NUMBEROFFERS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    IN_PARAM_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    subcampaign: str
    channel: str
    customer: str
    userid: str
    numberoffers: _struct_pb2.Value
    params: _struct_pb2.Value
    in_param: _struct_pb2.Value
    deployment: str
    def __init__(self, campaign: _Optional[str] = ..., subcampaign: _Optional[str] = ..., channel: _Optional[str] = ..., customer: _Optional[str] = ..., userid: _Optional[str] = ..., numberoffers: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., params: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., in_param: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., deployment: _Optional[str] = ...) -> None: ...

class FinalResult(_message.Message):
    __slots__ = ("result",)
    class Result(_message.Message):
        __slots__ = ("offer", "offer_name", "score", "final_score", "arm_reward", "propensity", "price", "cost", "rank", "explored", "context", "segment", "model_score", "arm_count", "offer_details")
        class ContextEntry(_message.Message):
            __slots__ = ("key", "value")
            KEY_FIELD_NUMBER: _ClassVar[int]
            VALUE_FIELD_NUMBER: _ClassVar[int]
            key: str
            value: str
            def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
        OFFER_FIELD_NUMBER: _ClassVar[int]
        OFFER_NAME_FIELD_NUMBER: _ClassVar[int]
        SCORE_FIELD_NUMBER: _ClassVar[int]
        FINAL_SCORE_FIELD_NUMBER: _ClassVar[int]
        ARM_REWARD_FIELD_NUMBER: _ClassVar[int]
        PROPENSITY_FIELD_NUMBER: _ClassVar[int]
        PRICE_FIELD_NUMBER: _ClassVar[int]
        COST_FIELD_NUMBER: _ClassVar[int]
        RANK_FIELD_NUMBER: _ClassVar[int]
        EXPLORED_FIELD_NUMBER: _ClassVar[int]
        CONTEXT_FIELD_NUMBER: _ClassVar[int]
        SEGMENT_FIELD_NUMBER: _ClassVar[int]
        MODEL_SCORE_FIELD_NUMBER: _ClassVar[int]
        ARM_COUNT_FIELD_NUMBER: _ClassVar[int]
        OFFER_DETAILS_FIELD_NUMBER: _ClassVar[int]
        offer: str
        offer_name: str
        score: float
        final_score: float
        arm_reward: float
        propensity: float
        price: float
        cost: float
        rank: int
        explored: bool
        context: _containers.ScalarMap[str, str]
        segment: str
        model_score: float
        arm_count: float
        offer_details: _struct_pb2.Struct
        def __init__(self, offer: _Optional[str] = ..., offer_name: _Optional[str] = ..., score: _Optional[float] = ..., final_score: _Optional[float] = ..., arm_reward: _Optional[float] = ..., propensity: _Optional[float] = ..., price: _Optional[float] = ..., cost: _Optional[float] = ..., rank: _Optional[int] = ..., explored: _Optional[bool] = ..., context: _Optional[_Mapping[str, str]] = ..., segment: _Optional[str] = ..., model_score: _Optional[float] = ..., arm_count: _Optional[float] = ..., offer_details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: FinalResult.Result
    def __init__(self, result: _Optional[_Union[FinalResult.Result, _Mapping]] = ...) -> None: ...

class InvokeResponse(_message.Message):
    __slots__ = ("uuid", "deployment", "config_revision", "variant", "explore", "final_result", "customer", "campaign", "channel", "segment", "replica_id", "model", "warnings", "routed_by")
    UUID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    EXPLORE_FIELD_NUMBER: _ClassVar[int]
    FINAL_RESULT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_BY_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    deployment: str
    config_revision: int
    variant: str
    explore: int
    final_result: _containers.RepeatedCompositeFieldContainer[FinalResult]
    customer: str
    campaign: str
    channel: str
    segment: str
    replica_id: str
    model: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    routed_by: str
    def __init__(self, uuid: _Optional[str] = ..., deployment: _Optional[str] = ..., config_revision: _Optional[int] = ..., variant: _Optional[str] = ..., explore: _Optional[int] = ..., final_result: _Optional[_Iterable[_Union[FinalResult, _Mapping]]] = ..., customer: _Optional[str] = ..., campaign: _Optional[str] = ..., channel: _Optional[str] = ..., segment: _Optional[str] = ..., replica_id: _Optional[str] = ..., model: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., routed_by: _Optional[str] = ...) -> None: ...

class RespondRequest(_message.Message):
    __slots__ = ("uuid", "offers_accepted", "channel_name", "reward", "event_time", "accepted_offers", "payload")
    UUID_FIELD_NUMBER: _ClassVar[int]
    OFFERS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_OFFERS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    offers_accepted: _struct_pb2.Value
    channel_name: str
    reward: float
    event_time: _timestamp_pb2.Timestamp
    accepted_offers: _containers.RepeatedScalarFieldContainer[str]
    payload: _struct_pb2.Struct
    def __init__(self, uuid: _Optional[str] = ..., offers_accepted: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., channel_name: _Optional[str] = ..., reward: _Optional[float] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., accepted_offers: _Optional[_Iterable[str]] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RespondResponse(_message.Message):
    __slots__ = ("uuid", "learned", "late", "duplicate", "message", "matched_offers", "deployment")
    UUID_FIELD_NUMBER: _ClassVar[int]
    LEARNED_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_OFFERS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    learned: bool
    late: bool
    duplicate: bool
    message: str
    matched_offers: _containers.RepeatedScalarFieldContainer[str]
    deployment: str
    def __init__(self, uuid: _Optional[str] = ..., learned: _Optional[bool] = ..., late: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., message: _Optional[str] = ..., matched_offers: _Optional[_Iterable[str]] = ..., deployment: _Optional[str] = ...) -> None: ...

class RefreshRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefreshResponse(_message.Message):
    __slots__ = ("config_revision", "replica_id")
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    config_revision: int
    replica_id: str
    def __init__(self, config_revision: _Optional[int] = ..., replica_id: _Optional[str] = ...) -> None: ...

class EcosystemInvokeRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: _struct_pb2.Struct
    def __init__(self, payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class EcosystemInvokeResponse(_message.Message):
    __slots__ = ("body",)
    BODY_FIELD_NUMBER: _ClassVar[int]
    body: _httpbody_pb2.HttpBody
    def __init__(self, body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ...) -> None: ...

class EcosystemRespondRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: _struct_pb2.Struct
    def __init__(self, payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class EcosystemRespondResponse(_message.Message):
    __slots__ = ("body",)
    BODY_FIELD_NUMBER: _ClassVar[int]
    body: _httpbody_pb2.HttpBody
    def __init__(self, body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "replica_id", "config_revision", "deployments")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    status: str
    replica_id: str
    config_revision: int
    deployments: int
    def __init__(self, status: _Optional[str] = ..., replica_id: _Optional[str] = ..., config_revision: _Optional[int] = ..., deployments: _Optional[int] = ...) -> None: ...
