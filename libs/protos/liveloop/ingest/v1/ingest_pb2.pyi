import datetime

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

class FileFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILE_FORMAT_UNSPECIFIED: _ClassVar[FileFormat]
    FILE_FORMAT_CSV: _ClassVar[FileFormat]
    FILE_FORMAT_JSONL: _ClassVar[FileFormat]
    FILE_FORMAT_PARQUET: _ClassVar[FileFormat]

class WriteMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WRITE_MODE_UNSPECIFIED: _ClassVar[WriteMode]
    WRITE_MODE_APPEND: _ClassVar[WriteMode]
    WRITE_MODE_REPLACE: _ClassVar[WriteMode]

class ColumnType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLUMN_TYPE_UNSPECIFIED: _ClassVar[ColumnType]
    COLUMN_TYPE_STRING: _ClassVar[ColumnType]
    COLUMN_TYPE_INT64: _ClassVar[ColumnType]
    COLUMN_TYPE_FLOAT64: _ClassVar[ColumnType]
    COLUMN_TYPE_BOOL: _ClassVar[ColumnType]
    COLUMN_TYPE_TIMESTAMP: _ClassVar[ColumnType]
    COLUMN_TYPE_DATE: _ClassVar[ColumnType]
    COLUMN_TYPE_JSON: _ClassVar[ColumnType]

class TableKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TABLE_KIND_UNSPECIFIED: _ClassVar[TableKind]
    TABLE_KIND_RAW: _ClassVar[TableKind]
    TABLE_KIND_FEATURE_VIEW: _ClassVar[TableKind]
    TABLE_KIND_TRAINING_SET: _ClassVar[TableKind]

class OptionsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIONS_MODE_UNSPECIFIED: _ClassVar[OptionsMode]
    OPTIONS_MODE_GENERATE: _ClassVar[OptionsMode]
    OPTIONS_MODE_UPDATE: _ClassVar[OptionsMode]
FILE_FORMAT_UNSPECIFIED: FileFormat
FILE_FORMAT_CSV: FileFormat
FILE_FORMAT_JSONL: FileFormat
FILE_FORMAT_PARQUET: FileFormat
WRITE_MODE_UNSPECIFIED: WriteMode
WRITE_MODE_APPEND: WriteMode
WRITE_MODE_REPLACE: WriteMode
COLUMN_TYPE_UNSPECIFIED: ColumnType
COLUMN_TYPE_STRING: ColumnType
COLUMN_TYPE_INT64: ColumnType
COLUMN_TYPE_FLOAT64: ColumnType
COLUMN_TYPE_BOOL: ColumnType
COLUMN_TYPE_TIMESTAMP: ColumnType
COLUMN_TYPE_DATE: ColumnType
COLUMN_TYPE_JSON: ColumnType
TABLE_KIND_UNSPECIFIED: TableKind
TABLE_KIND_RAW: TableKind
TABLE_KIND_FEATURE_VIEW: TableKind
TABLE_KIND_TRAINING_SET: TableKind
OPTIONS_MODE_UNSPECIFIED: OptionsMode
OPTIONS_MODE_GENERATE: OptionsMode
OPTIONS_MODE_UPDATE: OptionsMode

class FileSource(_message.Message):
    __slots__ = ("path", "format", "delimiter")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DELIMITER_FIELD_NUMBER: _ClassVar[int]
    path: str
    format: FileFormat
    delimiter: str
    def __init__(self, path: _Optional[str] = ..., format: _Optional[_Union[FileFormat, str]] = ..., delimiter: _Optional[str] = ...) -> None: ...

class SqlSource(_message.Message):
    __slots__ = ("url", "query")
    URL_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    url: str
    query: str
    def __init__(self, url: _Optional[str] = ..., query: _Optional[str] = ...) -> None: ...

class RejectBudget(_message.Message):
    __slots__ = ("max_rows", "max_fraction")
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRACTION_FIELD_NUMBER: _ClassVar[int]
    max_rows: int
    max_fraction: float
    def __init__(self, max_rows: _Optional[int] = ..., max_fraction: _Optional[float] = ...) -> None: ...

class LoadTarget(_message.Message):
    __slots__ = ("table", "key", "mode", "schema_overrides", "reject_budget", "event_time_column")
    class SchemaOverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ColumnType
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ColumnType, str]] = ...) -> None: ...
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    REJECT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_COLUMN_FIELD_NUMBER: _ClassVar[int]
    table: str
    key: _containers.RepeatedScalarFieldContainer[str]
    mode: WriteMode
    schema_overrides: _containers.ScalarMap[str, ColumnType]
    reject_budget: RejectBudget
    event_time_column: str
    def __init__(self, table: _Optional[str] = ..., key: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[WriteMode, str]] = ..., schema_overrides: _Optional[_Mapping[str, ColumnType]] = ..., reject_budget: _Optional[_Union[RejectBudget, _Mapping]] = ..., event_time_column: _Optional[str] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("file", "sql", "target", "chunk_rows")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    file: FileSource
    sql: SqlSource
    target: LoadTarget
    chunk_rows: int
    def __init__(self, file: _Optional[_Union[FileSource, _Mapping]] = ..., sql: _Optional[_Union[SqlSource, _Mapping]] = ..., target: _Optional[_Union[LoadTarget, _Mapping]] = ..., chunk_rows: _Optional[int] = ...) -> None: ...

class RejectedRow(_message.Message):
    __slots__ = ("row_number", "column", "reason", "raw")
    ROW_NUMBER_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    row_number: int
    column: str
    reason: str
    raw: str
    def __init__(self, row_number: _Optional[int] = ..., column: _Optional[str] = ..., reason: _Optional[str] = ..., raw: _Optional[str] = ...) -> None: ...

class ColumnSchema(_message.Message):
    __slots__ = ("name", "type", "nullable", "key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NULLABLE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ColumnType
    nullable: bool
    key: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ColumnType, str]] = ..., nullable: _Optional[bool] = ..., key: _Optional[bool] = ...) -> None: ...

class LoadSummary(_message.Message):
    __slots__ = ("table", "rows_read", "rows_written", "rows_rejected", "columns", "seconds", "fingerprint", "table_rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_READ_FIELD_NUMBER: _ClassVar[int]
    ROWS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    ROWS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TABLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows_read: int
    rows_written: int
    rows_rejected: int
    columns: _containers.RepeatedCompositeFieldContainer[ColumnSchema]
    seconds: float
    fingerprint: str
    table_rows: int
    def __init__(self, table: _Optional[str] = ..., rows_read: _Optional[int] = ..., rows_written: _Optional[int] = ..., rows_rejected: _Optional[int] = ..., columns: _Optional[_Iterable[_Union[ColumnSchema, _Mapping]]] = ..., seconds: _Optional[float] = ..., fingerprint: _Optional[str] = ..., table_rows: _Optional[int] = ...) -> None: ...

class IngestProgress(_message.Message):
    __slots__ = ("progress", "rows_written", "rows_rejected", "rejects", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ROWS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    ROWS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    rows_written: int
    rows_rejected: int
    rejects: _containers.RepeatedCompositeFieldContainer[RejectedRow]
    summary: LoadSummary
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., rows_written: _Optional[int] = ..., rows_rejected: _Optional[int] = ..., rejects: _Optional[_Iterable[_Union[RejectedRow, _Mapping]]] = ..., summary: _Optional[_Union[LoadSummary, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("filename", "format", "target", "size_bytes", "sha256", "delimiter")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DELIMITER_FIELD_NUMBER: _ClassVar[int]
    filename: str
    format: FileFormat
    target: LoadTarget
    size_bytes: int
    sha256: str
    delimiter: str
    def __init__(self, filename: _Optional[str] = ..., format: _Optional[_Union[FileFormat, str]] = ..., target: _Optional[_Union[LoadTarget, _Mapping]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., delimiter: _Optional[str] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("summary", "rejects", "bytes_received")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REJECTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    summary: LoadSummary
    rejects: _containers.RepeatedCompositeFieldContainer[RejectedRow]
    bytes_received: int
    def __init__(self, summary: _Optional[_Union[LoadSummary, _Mapping]] = ..., rejects: _Optional[_Iterable[_Union[RejectedRow, _Mapping]]] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "kind", "row_count", "key", "column_count", "updated_at", "fingerprint", "event_time_column")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    COLUMN_COUNT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_COLUMN_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: TableKind
    row_count: int
    key: _containers.RepeatedScalarFieldContainer[str]
    column_count: int
    updated_at: _timestamp_pb2.Timestamp
    fingerprint: str
    event_time_column: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[TableKind, str]] = ..., row_count: _Optional[int] = ..., key: _Optional[_Iterable[str]] = ..., column_count: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fingerprint: _Optional[str] = ..., event_time_column: _Optional[str] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ("page", "prefix")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    page: _common_pb2.PageRequest
    prefix: str
    def __init__(self, page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ..., prefix: _Optional[str] = ...) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables", "page")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    page: _common_pb2.PageResponse
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("table", "skip_stats", "top_values")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SKIP_STATS_FIELD_NUMBER: _ClassVar[int]
    TOP_VALUES_FIELD_NUMBER: _ClassVar[int]
    table: str
    skip_stats: bool
    top_values: int
    def __init__(self, table: _Optional[str] = ..., skip_stats: _Optional[bool] = ..., top_values: _Optional[int] = ...) -> None: ...

class ValueCount(_message.Message):
    __slots__ = ("value", "count")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    value: str
    count: int
    def __init__(self, value: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class ColumnStats(_message.Message):
    __slots__ = ("column", "count", "null_count", "distinct_count", "min", "max", "mean", "stddev", "top_values", "min_text", "max_text")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NULL_COUNT_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STDDEV_FIELD_NUMBER: _ClassVar[int]
    TOP_VALUES_FIELD_NUMBER: _ClassVar[int]
    MIN_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_FIELD_NUMBER: _ClassVar[int]
    column: str
    count: int
    null_count: int
    distinct_count: int
    min: float
    max: float
    mean: float
    stddev: float
    top_values: _containers.RepeatedCompositeFieldContainer[ValueCount]
    min_text: str
    max_text: str
    def __init__(self, column: _Optional[str] = ..., count: _Optional[int] = ..., null_count: _Optional[int] = ..., distinct_count: _Optional[int] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., mean: _Optional[float] = ..., stddev: _Optional[float] = ..., top_values: _Optional[_Iterable[_Union[ValueCount, _Mapping]]] = ..., min_text: _Optional[str] = ..., max_text: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("table", "columns", "stats")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    table: TableInfo
    columns: _containers.RepeatedCompositeFieldContainer[ColumnSchema]
    stats: _containers.RepeatedCompositeFieldContainer[ColumnStats]
    def __init__(self, table: _Optional[_Union[TableInfo, _Mapping]] = ..., columns: _Optional[_Iterable[_Union[ColumnSchema, _Mapping]]] = ..., stats: _Optional[_Iterable[_Union[ColumnStats, _Mapping]]] = ...) -> None: ...

class ApplyFeaturesRequest(_message.Message):
    __slots__ = ("spec_yaml", "dry_run")
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    dry_run: bool
    def __init__(self, spec_yaml: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class FeatureInfo(_message.Message):
    __slots__ = ("name", "type", "transform", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ColumnType
    transform: str
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ColumnType, str]] = ..., transform: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class FeatureViewInfo(_message.Message):
    __slots__ = ("name", "source_table", "entity_keys", "features", "version", "changed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TABLE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    name: str
    source_table: str
    entity_keys: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedCompositeFieldContainer[FeatureInfo]
    version: int
    changed: bool
    def __init__(self, name: _Optional[str] = ..., source_table: _Optional[str] = ..., entity_keys: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[_Union[FeatureInfo, _Mapping]]] = ..., version: _Optional[int] = ..., changed: _Optional[bool] = ...) -> None: ...

class ApplyFeaturesResponse(_message.Message):
    __slots__ = ("views", "warnings", "dry_run")
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedCompositeFieldContainer[FeatureViewInfo]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    def __init__(self, views: _Optional[_Iterable[_Union[FeatureViewInfo, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class BuildTrainingSetRequest(_message.Message):
    __slots__ = ("output_table", "label_table", "label_column", "features", "event_time_column", "mode", "sample_fraction", "seed", "label_table_columns")
    OUTPUT_TABLE_FIELD_NUMBER: _ClassVar[int]
    LABEL_TABLE_FIELD_NUMBER: _ClassVar[int]
    LABEL_COLUMN_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_COLUMN_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LABEL_TABLE_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    output_table: str
    label_table: str
    label_column: str
    features: _containers.RepeatedScalarFieldContainer[str]
    event_time_column: str
    mode: WriteMode
    sample_fraction: float
    seed: int
    label_table_columns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, output_table: _Optional[str] = ..., label_table: _Optional[str] = ..., label_column: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., event_time_column: _Optional[str] = ..., mode: _Optional[_Union[WriteMode, str]] = ..., sample_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., label_table_columns: _Optional[_Iterable[str]] = ...) -> None: ...

class BuildTrainingSetResponse(_message.Message):
    __slots__ = ("table", "row_count", "columns", "fingerprint", "label_mean", "rows_missing_features")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LABEL_MEAN_FIELD_NUMBER: _ClassVar[int]
    ROWS_MISSING_FEATURES_FIELD_NUMBER: _ClassVar[int]
    table: str
    row_count: int
    columns: _containers.RepeatedCompositeFieldContainer[ColumnSchema]
    fingerprint: str
    label_mean: float
    rows_missing_features: int
    def __init__(self, table: _Optional[str] = ..., row_count: _Optional[int] = ..., columns: _Optional[_Iterable[_Union[ColumnSchema, _Mapping]]] = ..., fingerprint: _Optional[str] = ..., label_mean: _Optional[float] = ..., rows_missing_features: _Optional[int] = ...) -> None: ...

class MaterializeRequest(_message.Message):
    __slots__ = ("feature_views", "full", "as_of")
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    full: bool
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, feature_views: _Optional[_Iterable[str]] = ..., full: _Optional[bool] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class MaterializeProgress(_message.Message):
    __slots__ = ("progress", "feature_view", "entities_written", "done")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VIEW_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    feature_view: str
    entities_written: int
    done: bool
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., feature_view: _Optional[str] = ..., entities_written: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class GenerateOptionsRequest(_message.Message):
    __slots__ = ("deployment", "mode", "history_table", "prior_weight", "dry_run", "config_revision")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TABLE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    mode: OptionsMode
    history_table: str
    prior_weight: float
    dry_run: bool
    config_revision: int
    def __init__(self, deployment: _Optional[str] = ..., mode: _Optional[_Union[OptionsMode, str]] = ..., history_table: _Optional[str] = ..., prior_weight: _Optional[float] = ..., dry_run: _Optional[bool] = ..., config_revision: _Optional[int] = ...) -> None: ...

class GenerateOptionsResponse(_message.Message):
    __slots__ = ("deployment", "config_revision", "arms_created", "arms_updated", "arms_kept", "arms_removed", "offers", "segments", "history_rows", "dry_run")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    ARMS_CREATED_FIELD_NUMBER: _ClassVar[int]
    ARMS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    ARMS_KEPT_FIELD_NUMBER: _ClassVar[int]
    ARMS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ROWS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    config_revision: int
    arms_created: int
    arms_updated: int
    arms_kept: int
    arms_removed: int
    offers: int
    segments: int
    history_rows: int
    dry_run: bool
    def __init__(self, deployment: _Optional[str] = ..., config_revision: _Optional[int] = ..., arms_created: _Optional[int] = ..., arms_updated: _Optional[int] = ..., arms_kept: _Optional[int] = ..., arms_removed: _Optional[int] = ..., offers: _Optional[int] = ..., segments: _Optional[int] = ..., history_rows: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class GetOnlineFeaturesRequest(_message.Message):
    __slots__ = ("entity_keys", "features", "entity")
    ENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    entity_keys: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedScalarFieldContainer[str]
    entity: str
    def __init__(self, entity_keys: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[str]] = ..., entity: _Optional[str] = ...) -> None: ...

class EntityFeatures(_message.Message):
    __slots__ = ("entity_key", "found", "features", "updated_at")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    ENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    entity_key: str
    found: bool
    features: _containers.MessageMap[str, _struct_pb2.Value]
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, entity_key: _Optional[str] = ..., found: _Optional[bool] = ..., features: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetOnlineFeaturesResponse(_message.Message):
    __slots__ = ("entities",)
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedCompositeFieldContainer[EntityFeatures]
    def __init__(self, entities: _Optional[_Iterable[_Union[EntityFeatures, _Mapping]]] = ...) -> None: ...

class ReadRowsRequest(_message.Message):
    __slots__ = ("table", "limit")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    table: str
    limit: int
    def __init__(self, table: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ReadRowsResponse(_message.Message):
    __slots__ = ("table", "rows", "columns")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    table: TableInfo
    rows: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    columns: _containers.RepeatedCompositeFieldContainer[ColumnSchema]
    def __init__(self, table: _Optional[_Union[TableInfo, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., columns: _Optional[_Iterable[_Union[ColumnSchema, _Mapping]]] = ...) -> None: ...
