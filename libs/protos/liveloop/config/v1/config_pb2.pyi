import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from libs.protos.liveloop.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpecFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPEC_FORMAT_UNSPECIFIED: _ClassVar[SpecFormat]
    SPEC_FORMAT_JSON: _ClassVar[SpecFormat]
    SPEC_FORMAT_YAML: _ClassVar[SpecFormat]

class ChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANGE_KIND_UNSPECIFIED: _ClassVar[ChangeKind]
    CHANGE_KIND_PUBLISH: _ClassVar[ChangeKind]
    CHANGE_KIND_ROLLBACK: _ClassVar[ChangeKind]
    CHANGE_KIND_DELETE: _ClassVar[ChangeKind]
SPEC_FORMAT_UNSPECIFIED: SpecFormat
SPEC_FORMAT_JSON: SpecFormat
SPEC_FORMAT_YAML: SpecFormat
CHANGE_KIND_UNSPECIFIED: ChangeKind
CHANGE_KIND_PUBLISH: ChangeKind
CHANGE_KIND_ROLLBACK: ChangeKind
CHANGE_KIND_DELETE: ChangeKind

class Deployment(_message.Message):
    __slots__ = ("name", "revision", "spec_json", "updated_at", "author", "checksum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    revision: int
    spec_json: str
    updated_at: _timestamp_pb2.Timestamp
    author: str
    checksum: str
    def __init__(self, name: _Optional[str] = ..., revision: _Optional[int] = ..., spec_json: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., author: _Optional[str] = ..., checksum: _Optional[str] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("spec_text", "spec_struct", "format", "dry_run", "deployment", "author", "message", "expected_revision", "evaluate", "force")
    SPEC_TEXT_FIELD_NUMBER: _ClassVar[int]
    SPEC_STRUCT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    spec_text: str
    spec_struct: _struct_pb2.Struct
    format: SpecFormat
    dry_run: bool
    deployment: str
    author: str
    message: str
    expected_revision: int
    evaluate: bool
    force: bool
    def __init__(self, spec_text: _Optional[str] = ..., spec_struct: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., format: _Optional[_Union[SpecFormat, str]] = ..., dry_run: _Optional[bool] = ..., deployment: _Optional[str] = ..., author: _Optional[str] = ..., message: _Optional[str] = ..., expected_revision: _Optional[int] = ..., evaluate: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class PublishEvaluation(_message.Message):
    __slots__ = ("estimator", "value", "lower", "upper", "live_value", "decisions", "passed", "reason", "warnings", "forced")
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    LIVE_VALUE_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    estimator: str
    value: float
    lower: float
    upper: float
    live_value: float
    decisions: int
    passed: bool
    reason: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    forced: bool
    def __init__(self, estimator: _Optional[str] = ..., value: _Optional[float] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., live_value: _Optional[float] = ..., decisions: _Optional[int] = ..., passed: _Optional[bool] = ..., reason: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., forced: _Optional[bool] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("revision", "deployment", "diff", "changed", "evaluation", "dry_run", "warnings")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    deployment: str
    diff: str
    changed: bool
    evaluation: PublishEvaluation
    dry_run: bool
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, revision: _Optional[int] = ..., deployment: _Optional[str] = ..., diff: _Optional[str] = ..., changed: _Optional[bool] = ..., evaluation: _Optional[_Union[PublishEvaluation, _Mapping]] = ..., dry_run: _Optional[bool] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: _common_pb2.DeploymentRef
    def __init__(self, deployment: _Optional[_Union[_common_pb2.DeploymentRef, _Mapping]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("deployment", "head_revision")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    head_revision: int
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., head_revision: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("page", "include_spec")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SPEC_FIELD_NUMBER: _ClassVar[int]
    page: _common_pb2.PageRequest
    include_spec: bool
    def __init__(self, page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ..., include_spec: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("deployments", "head_revision", "page")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    head_revision: int
    page: _common_pb2.PageResponse
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., head_revision: _Optional[int] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("deployment", "limit", "before_revision")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_REVISION_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    limit: int
    before_revision: int
    def __init__(self, deployment: _Optional[str] = ..., limit: _Optional[int] = ..., before_revision: _Optional[int] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("revision", "deployment", "author", "time", "diff", "message", "kind", "source_revision")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    deployment: str
    author: str
    time: _timestamp_pb2.Timestamp
    diff: str
    message: str
    kind: ChangeKind
    source_revision: int
    def __init__(self, revision: _Optional[int] = ..., deployment: _Optional[str] = ..., author: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., diff: _Optional[str] = ..., message: _Optional[str] = ..., kind: _Optional[_Union[ChangeKind, str]] = ..., source_revision: _Optional[int] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("deployment", "to_revision", "dry_run", "author", "message")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TO_REVISION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    to_revision: int
    dry_run: bool
    author: str
    message: str
    def __init__(self, deployment: _Optional[str] = ..., to_revision: _Optional[int] = ..., dry_run: _Optional[bool] = ..., author: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("revision", "deployment", "diff", "changed")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    deployment: str
    diff: str
    changed: bool
    def __init__(self, revision: _Optional[int] = ..., deployment: _Optional[str] = ..., diff: _Optional[str] = ..., changed: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("deployment", "author", "message")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    author: str
    message: str
    def __init__(self, deployment: _Optional[str] = ..., author: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("subscribe", "ack", "nack")
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    subscribe: Subscribe
    ack: Ack
    nack: Nack
    def __init__(self, subscribe: _Optional[_Union[Subscribe, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., nack: _Optional[_Union[Nack, _Mapping]] = ...) -> None: ...

class Subscribe(_message.Message):
    __slots__ = ("replica_id", "deployments", "known_revision", "service", "version")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_REVISION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    deployments: _containers.RepeatedScalarFieldContainer[str]
    known_revision: int
    service: str
    version: str
    def __init__(self, replica_id: _Optional[str] = ..., deployments: _Optional[_Iterable[str]] = ..., known_revision: _Optional[int] = ..., service: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("revision", "plugins")
    class PluginsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    plugins: _containers.ScalarMap[str, str]
    def __init__(self, revision: _Optional[int] = ..., plugins: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("revision", "reason", "deployment")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    revision: int
    reason: str
    deployment: str
    def __init__(self, revision: _Optional[int] = ..., reason: _Optional[str] = ..., deployment: _Optional[str] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("snapshot", "update", "heartbeat")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    snapshot: Snapshot
    update: Update
    heartbeat: Heartbeat
    def __init__(self, snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., update: _Optional[_Union[Update, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("revision", "deployments", "refresh")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    revision: int
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    refresh: bool
    def __init__(self, revision: _Optional[int] = ..., deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., refresh: _Optional[bool] = ...) -> None: ...

class Update(_message.Message):
    __slots__ = ("revision", "deployment", "spec_json", "deleted", "checksum")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    revision: int
    deployment: str
    spec_json: str
    deleted: bool
    checksum: str
    def __init__(self, revision: _Optional[int] = ..., deployment: _Optional[str] = ..., spec_json: _Optional[str] = ..., deleted: _Optional[bool] = ..., checksum: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("head_revision", "server_time")
    HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    head_revision: int
    server_time: _timestamp_pb2.Timestamp
    def __init__(self, head_revision: _Optional[int] = ..., server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReplicaStatusRequest(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class ReplicaState(_message.Message):
    __slots__ = ("replica_id", "applied_revision", "last_nack_revision", "last_nack_reason", "last_seen", "staleness_seconds", "revisions_behind", "connected", "service", "version", "peer", "deployments", "plugins")
    class PluginsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_REVISION_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    STALENESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_BEHIND_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    applied_revision: int
    last_nack_revision: int
    last_nack_reason: str
    last_seen: _timestamp_pb2.Timestamp
    staleness_seconds: float
    revisions_behind: int
    connected: bool
    service: str
    version: str
    peer: str
    deployments: _containers.RepeatedCompositeFieldContainer[_common_pb2.DeploymentRef]
    plugins: _containers.ScalarMap[str, str]
    def __init__(self, replica_id: _Optional[str] = ..., applied_revision: _Optional[int] = ..., last_nack_revision: _Optional[int] = ..., last_nack_reason: _Optional[str] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., staleness_seconds: _Optional[float] = ..., revisions_behind: _Optional[int] = ..., connected: _Optional[bool] = ..., service: _Optional[str] = ..., version: _Optional[str] = ..., peer: _Optional[str] = ..., deployments: _Optional[_Iterable[_Union[_common_pb2.DeploymentRef, _Mapping]]] = ..., plugins: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReplicaStatusResponse(_message.Message):
    __slots__ = ("replicas", "head_revision")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaState]
    head_revision: int
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaState, _Mapping]]] = ..., head_revision: _Optional[int] = ...) -> None: ...

class RefreshRequest(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class RefreshResponse(_message.Message):
    __slots__ = ("replicas_notified", "head_revision")
    REPLICAS_NOTIFIED_FIELD_NUMBER: _ClassVar[int]
    HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    replicas_notified: int
    head_revision: int
    def __init__(self, replicas_notified: _Optional[int] = ..., head_revision: _Optional[int] = ...) -> None: ...
