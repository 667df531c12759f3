"""gRPC face of the ingest service: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

from google.protobuf.struct_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.errors import InvalidArgument
from libs.common.paging import page_of
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.ingest.core.columns import Column, ColumnType
from services.ingest.core.ingest_service import IngestService, TableSummary
from services.ingest.core.loader import LoadProgress, LoadResult, LoadTarget, WriteMode
from services.ingest.core.online_store import MaterializeProgress
from services.ingest.core.sources import FileFormat, Reject

MAX_UPLOAD_BYTES = 20 * 1024**3
MAX_CHUNK_ROWS = 1_000_000

_FORMATS = {
    ingest_pb2.FILE_FORMAT_UNSPECIFIED: None,
    ingest_pb2.FILE_FORMAT_CSV: FileFormat.CSV,
    ingest_pb2.FILE_FORMAT_JSONL: FileFormat.JSONL,
    ingest_pb2.FILE_FORMAT_PARQUET: FileFormat.PARQUET,
}
_TYPES = {
    ingest_pb2.COLUMN_TYPE_STRING: ColumnType.STRING,
    ingest_pb2.COLUMN_TYPE_INT64: ColumnType.INT64,
    ingest_pb2.COLUMN_TYPE_FLOAT64: ColumnType.FLOAT64,
    ingest_pb2.COLUMN_TYPE_BOOL: ColumnType.BOOL,
    ingest_pb2.COLUMN_TYPE_TIMESTAMP: ColumnType.TIMESTAMP,
    ingest_pb2.COLUMN_TYPE_DATE: ColumnType.DATE,
    ingest_pb2.COLUMN_TYPE_JSON: ColumnType.JSON,
}
_TYPE_MESSAGES = {value: key for key, value in _TYPES.items()}
_KINDS = {
    "raw": ingest_pb2.TABLE_KIND_RAW,
    "feature_view": ingest_pb2.TABLE_KIND_FEATURE_VIEW,
    "training_set": ingest_pb2.TABLE_KIND_TRAINING_SET,
}


def _target(message: ingest_pb2.LoadTarget) -> LoadTarget:
    if not message.table:
        raise InvalidArgument("must name the table to load into", field="target.table")
    overrides = {}
    for name, column_type in message.schema_overrides.items():
        if column_type not in _TYPES:
            raise InvalidArgument(f"unknown type for column '{name}'", field="target.schema_overrides")
        overrides[name] = _TYPES[column_type]
    budget = message.reject_budget
    if budget.max_rows < 0 or not 0 <= budget.max_fraction <= 1:
        raise InvalidArgument(
            "max_rows must be >= 0 and max_fraction between 0 and 1", field="target.reject_budget"
        )
    return LoadTarget(
        table=message.table,
        key=tuple(message.key),
        mode=WriteMode.REPLACE if message.mode == ingest_pb2.WRITE_MODE_REPLACE else WriteMode.APPEND,
        schema_overrides=overrides,
        max_rejected_rows=budget.max_rows,
        max_rejected_fraction=budget.max_fraction,
        event_time_column=message.event_time_column,
    )


def _columns(columns: list[Column]) -> list[ingest_pb2.ColumnSchema]:
    return [
        ingest_pb2.ColumnSchema(name=c.name, type=_TYPE_MESSAGES[c.type], nullable=not c.key, key=c.key)
        for c in columns
    ]


def _rejects(rejects: list[Reject]) -> list[ingest_pb2.RejectedRow]:
    return [
        ingest_pb2.RejectedRow(row_number=r.row_number, column=r.column, reason=r.reason, raw=r.raw)
        for r in rejects
    ]


def _summary(result: LoadResult) -> ingest_pb2.LoadSummary:
    return ingest_pb2.LoadSummary(
        table=result.table,
        rows_read=result.rows_read,
        rows_written=result.rows_written,
        rows_rejected=result.rows_rejected,
        columns=_columns(result.columns),
        seconds=result.seconds,
        fingerprint=result.fingerprint,
        table_rows=result.table_rows,
    )


def _timestamp(moment: Any) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return value


def _table_info(summary: TableSummary) -> ingest_pb2.TableInfo:
    return ingest_pb2.TableInfo(
        name=summary.name,
        kind=_KINDS.get(summary.kind, ingest_pb2.TABLE_KIND_UNSPECIFIED),
        row_count=summary.row_count,
        key=summary.key,
        column_count=len(summary.columns),
        updated_at=_timestamp(summary.updated_at),
        fingerprint=summary.fingerprint,
        event_time_column=summary.event_time_column,
    )


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, service: IngestService) -> None:
        self._service = service

    async def Ingest(
        self, request: ingest_pb2.IngestRequest, context: Any
    ) -> AsyncIterator[ingest_pb2.IngestProgress]:
        target = _target(request.target)
        if not 0 <= request.chunk_rows <= MAX_CHUNK_ROWS:
            raise InvalidArgument(f"must be between 0 and {MAX_CHUNK_ROWS}", field="chunk_rows")
        which = request.WhichOneof("source")
        if which == "file":
            events = self._service.ingest_file(
                request.file.path,
                _FORMATS.get(request.file.format),
                request.file.delimiter,
                target,
                request.chunk_rows,
            )
        elif which == "sql":
            if not request.sql.url:
                raise InvalidArgument("must be a SQLAlchemy URL", field="sql.url")
            events = self._service.ingest_sql(request.sql.url, request.sql.query, target, request.chunk_rows)
        else:
            raise InvalidArgument("give a file or a sql source", field="source")
        reported = 0
        async for event in events:
            if isinstance(event, LoadResult):
                yield ingest_pb2.IngestProgress(
                    progress=common_pb2.Progress(
                        done=event.rows_read,
                        unit="rows",
                        stage="done",
                        elapsed_seconds=event.seconds,
                        message="already loaded: nothing written"
                        if event.already_loaded
                        else f"loaded {event.rows_written} rows",
                    ),
                    rows_written=event.rows_written,
                    rows_rejected=event.rows_rejected,
                    rejects=_rejects(event.rejects[reported:]),
                    summary=_summary(event),
                )
                return
            assert isinstance(event, LoadProgress)
            new_rejects = event.rejects[reported:]
            reported = len(event.rejects)
            yield ingest_pb2.IngestProgress(
                progress=common_pb2.Progress(
                    done=event.rows_read, unit="rows", rate=event.rate, stage="write", message="loading"
                ),
                rows_written=event.rows_written,
                rows_rejected=event.rows_rejected,
                rejects=_rejects(new_rejects),
            )

    async def Upload(
        self, request_iterator: AsyncIterator[ingest_pb2.UploadRequest], context: Any
    ) -> ingest_pb2.UploadResponse:
        header: ingest_pb2.UploadHeader | None = None
        path, handle = None, None
        digest = hashlib.sha256()
        received = 0
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "header":
                    if header is not None:
                        raise InvalidArgument("only the first message may be a header", field="header")
                    header = message.header
                    target = _target(header.target)  # a bad target fails before the bytes are sent
                    path, handle = self._service.staging_file()
                    continue
                if header is None or handle is None:
                    raise InvalidArgument("the first message must be the header", field="header")
                received += len(message.chunk)
                if received > MAX_UPLOAD_BYTES:
                    raise InvalidArgument(f"uploads are limited to {MAX_UPLOAD_BYTES} bytes", field="chunk")
                digest.update(message.chunk)
                handle.write(message.chunk)
            if header is None or handle is None or path is None:
                raise InvalidArgument("the upload had no header", field="header")
            handle.close()
            if received == 0:
                raise InvalidArgument("the upload is empty (zero bytes)", field="chunk")
            if header.size_bytes and header.size_bytes != received:
                raise InvalidArgument(
                    f"header says {header.size_bytes} bytes, received {received}", field="header.size_bytes"
                )
            if header.sha256 and header.sha256.lower() != digest.hexdigest():
                raise InvalidArgument(
                    "the bytes received do not match the header's sha256", field="header.sha256"
                )
            from services.ingest.core.sources import detect_format

            file_format = detect_format(header.filename, _FORMATS.get(header.format))
            result = await self._service.load_upload(path, file_format, header.delimiter, target)
            path = None  # load_upload removed it
        finally:
            if handle is not None and not handle.closed:
                handle.close()
            if path is not None:
                path.unlink(missing_ok=True)
        return ingest_pb2.UploadResponse(
            summary=_summary(result), rejects=_rejects(result.rejects), bytes_received=received
        )

    async def ListTables(
        self, request: ingest_pb2.ListTablesRequest, context: Any
    ) -> ingest_pb2.ListTablesResponse:
        tables = await self._service.list_tables(request.prefix)
        page, following = page_of(tables, request.page.page_size, request.page.page_token)
        return ingest_pb2.ListTablesResponse(
            tables=[_table_info(t) for t in page],
            page=common_pb2.PageResponse(total_size=len(tables), next_page_token=following),
        )

    async def Describe(
        self, request: ingest_pb2.DescribeRequest, context: Any
    ) -> ingest_pb2.DescribeResponse:
        summary, stats = await self._service.describe(
            request.table, not request.skip_stats, request.top_values or 5
        )
        response = ingest_pb2.DescribeResponse(table=_table_info(summary), columns=_columns(summary.columns))
        for item in stats:
            message = response.stats.add(
                column=item.column,
                count=item.count,
                null_count=item.null_count,
                distinct_count=item.distinct_count,
                min_text=item.min_text,
                max_text=item.max_text,
                top_values=[ingest_pb2.ValueCount(value=v, count=n) for v, n in item.top_values],
            )
            for field in ("minimum", "maximum", "mean", "stddev"):
                value = getattr(item, field)
                if value is not None:
                    setattr(message, {"minimum": "min", "maximum": "max"}.get(field, field), value)
        return response

    async def ReadRows(
        self, request: ingest_pb2.ReadRowsRequest, context: Any
    ) -> ingest_pb2.ReadRowsResponse:
        summary, rows = await self._service.read_rows(request.table, request.limit)
        response = ingest_pb2.ReadRowsResponse(table=_table_info(summary), columns=_columns(summary.columns))
        for row in rows:
            response.rows.add().update(row)
        return response

    async def ApplyFeatures(
        self, request: ingest_pb2.ApplyFeaturesRequest, context: Any
    ) -> ingest_pb2.ApplyFeaturesResponse:
        result = await self._service.apply_features(request.spec_yaml, request.dry_run)
        return ingest_pb2.ApplyFeaturesResponse(
            views=[
                ingest_pb2.FeatureViewInfo(
                    name=view.name,
                    source_table=view.source_table,
                    entity_keys=view.entity_keys,
                    features=[
                        ingest_pb2.FeatureInfo(
                            name=feature.name,
                            type=_TYPE_MESSAGES[feature.type],
                            transform=feature.transform,
                            description=feature.description,
                        )
                        for feature in view.features
                    ],
                    version=view.version,
                    changed=view.changed,
                )
                for view in result.views
            ],
            warnings=result.warnings,
            dry_run=result.dry_run,
        )

    async def BuildTrainingSet(
        self, request: ingest_pb2.BuildTrainingSetRequest, context: Any
    ) -> ingest_pb2.BuildTrainingSetResponse:
        for name, what in (
            ("output_table", "the training-set table to write"),
            ("label_table", "the table of labels"),
            ("label_column", "the label column of label_table"),
        ):
            if not getattr(request, name):
                raise InvalidArgument(f"must name {what}", field=name)
        result = await self._service.build_training_set(
            output_table=request.output_table,
            label_table=request.label_table,
            label_column=request.label_column,
            features=list(request.features),
            event_time_column=request.event_time_column,
            mode=WriteMode.REPLACE if request.mode == ingest_pb2.WRITE_MODE_REPLACE else WriteMode.APPEND,
            sample_fraction=request.sample_fraction,
            seed=request.seed,
            carried_columns=list(request.label_table_columns),
        )
        return ingest_pb2.BuildTrainingSetResponse(
            table=result.table,
            row_count=result.row_count,
            columns=_columns(result.columns),
            fingerprint=result.fingerprint,
            label_mean=result.label_mean,
            rows_missing_features=result.rows_missing_features,
        )

    async def Materialize(
        self, request: ingest_pb2.MaterializeRequest, context: Any
    ) -> AsyncIterator[ingest_pb2.MaterializeProgress]:
        as_of = request.as_of.ToDatetime(tzinfo=UTC) if request.HasField("as_of") else None
        async for event in self._service.materialize(list(request.feature_views), request.full, as_of):
            if isinstance(event, list):
                return
            assert isinstance(event, MaterializeProgress)
            yield ingest_pb2.MaterializeProgress(
                progress=common_pb2.Progress(
                    done=event.entities_written,
                    total=event.total,
                    unit="entities",
                    stage="done" if event.done else "write",
                    message="unchanged since the last run" if event.skipped else "",
                ),
                feature_view=event.feature_view,
                entities_written=event.entities_written,
                done=event.done,
            )

    async def GetOnlineFeatures(
        self, request: ingest_pb2.GetOnlineFeaturesRequest, context: Any
    ) -> ingest_pb2.GetOnlineFeaturesResponse:
        found = await self._service.get_online_features(list(request.entity_keys), list(request.features))
        response = ingest_pb2.GetOnlineFeaturesResponse()
        for key, values in found:
            entity = response.entities.add(entity_key=key, found=values is not None)
            for name, text in (values or {}).items():
                entity.features[name].CopyFrom(Value(string_value=text))
        return response

    async def GenerateOptions(
        self, request: ingest_pb2.GenerateOptionsRequest, context: Any
    ) -> ingest_pb2.GenerateOptionsResponse:
        result, revision = await self._service.generate_options(
            request.deployment,
            request.config_revision,
            request.history_table,
            request.prior_weight,
            request.mode == ingest_pb2.OPTIONS_MODE_UPDATE,
            request.dry_run,
        )
        return ingest_pb2.GenerateOptionsResponse(
            deployment=result.deployment,
            config_revision=revision,
            arms_created=result.arms_created,
            arms_updated=result.arms_updated,
            arms_kept=result.arms_kept,
            arms_removed=result.arms_removed,
            offers=result.offers,
            segments=result.segments,
            history_rows=result.history_rows,
            dry_run=result.dry_run,
        )
