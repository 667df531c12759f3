"""`liveloop ingest`, `tables`, `materialize`, `features apply` and `options generate`: data into the
offline store, the newest features into the online store, priors into the options store.

Every command calls IngestService through the front door with the admin key. Long work streams
progress messages, shown as a progress bar on stderr (so `--json` output on stdout stays clean).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from libs.cli.output import (
    JsonFlag,
    StateDir,
    TargetOption,
    TimeoutOption,
    console,
    emit_json,
    errors,
    fail,
    front_door,
    front_door_tls,
    plain,
)
from libs.common.client import open_blocking_channel
from libs.common.paging import MAX_PAGE_SIZE
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.ingest.v1 import ingest_pb2, ingest_pb2_grpc

UPLOAD_CHUNK_BYTES = 1 << 20  # the size the protocol recommends
REJECTS_SHOWN = 20
DEFAULT_LONG_TIMEOUT_S = 3600.0

features_app = typer.Typer(help="Feature views: declare them from a feature spec.", no_args_is_help=True)
options_app = typer.Typer(
    help="Options stores: the arm statistics a deployment's predictors read.", no_args_is_help=True
)


class Mode(enum.StrEnum):
    APPEND = "append"
    REPLACE = "replace"


class Format(enum.StrEnum):
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"


class OptionsMode(enum.StrEnum):
    GENERATE = "generate"
    UPDATE = "update"


_MODES = {Mode.APPEND: ingest_pb2.WRITE_MODE_APPEND, Mode.REPLACE: ingest_pb2.WRITE_MODE_REPLACE}
_FORMATS = {
    Format.CSV: ingest_pb2.FILE_FORMAT_CSV,
    Format.JSONL: ingest_pb2.FILE_FORMAT_JSONL,
    Format.PARQUET: ingest_pb2.FILE_FORMAT_PARQUET,
}
_TYPES: dict[str, ingest_pb2.ColumnType] = {
    "string": ingest_pb2.COLUMN_TYPE_STRING,
    "str": ingest_pb2.COLUMN_TYPE_STRING,
    "text": ingest_pb2.COLUMN_TYPE_STRING,
    "int64": ingest_pb2.COLUMN_TYPE_INT64,
    "int": ingest_pb2.COLUMN_TYPE_INT64,
    "integer": ingest_pb2.COLUMN_TYPE_INT64,
    "float64": ingest_pb2.COLUMN_TYPE_FLOAT64,
    "float": ingest_pb2.COLUMN_TYPE_FLOAT64,
    "double": ingest_pb2.COLUMN_TYPE_FLOAT64,
    "bool": ingest_pb2.COLUMN_TYPE_BOOL,
    "boolean": ingest_pb2.COLUMN_TYPE_BOOL,
    "timestamp": ingest_pb2.COLUMN_TYPE_TIMESTAMP,
    "datetime": ingest_pb2.COLUMN_TYPE_TIMESTAMP,
    "date": ingest_pb2.COLUMN_TYPE_DATE,
    "json": ingest_pb2.COLUMN_TYPE_JSON,
}
_OPTIONS_MODES = {
    OptionsMode.GENERATE: ingest_pb2.OPTIONS_MODE_GENERATE,
    OptionsMode.UPDATE: ingest_pb2.OPTIONS_MODE_UPDATE,
}


def _type_name(column_type: int) -> str:
    return str(ingest_pb2.ColumnType.Name(column_type)).removeprefix("COLUMN_TYPE_").lower()


def _time(value: Timestamp) -> str:
    if not value.seconds and not value.nanos:
        return ""
    return value.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _IngestCalls:
    """IngestService calls whose failures become one clear line (status and the server's message)."""

    def __init__(self, stub: ingest_pb2_grpc.IngestServiceStub, target: str) -> None:
        self.stub = stub
        self.target = target

    def fail(self, method: str, exc: grpc.RpcError) -> NoReturn:
        code = exc.code()
        hint = ""
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = " (is the stack running? `liveloop up`, or pass --target)"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            hint = " (raise --timeout)"
        fail(f"{method} via {self.target} failed: {code.name}: {exc.details()}{hint}")

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        rpc: Callable[..., Any] = getattr(self.stub, method)
        try:
            return rpc(request, timeout=timeout) if timeout else rpc(request)
        except grpc.RpcError as exc:
            self.fail(method, exc)

    def stream(self, method: str, request: Any, timeout: float) -> Iterator[Any]:
        """The messages of a server stream; a failure at any point exits with the status."""
        call = getattr(self.stub, method)(request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as exc:
            self.fail(method, exc)
        except KeyboardInterrupt:
            call.cancel()
            fail(f"interrupted: {method} was cancelled", code=130)


@contextlib.contextmanager
def _ingest_service(state_dir: Path | None, target: str | None) -> Iterator[_IngestCalls]:
    from libs.common.settings import ClientSettings

    resolved, api_key = front_door(state_dir, target, role="admin")
    deadline = ClientSettings().deadline_seconds
    with open_blocking_channel(
        resolved, api_key=api_key, deadline_seconds=deadline, tls=front_door_tls(state_dir)
    ) as channel:
        yield _IngestCalls(ingest_pb2_grpc.IngestServiceStub(channel), resolved)


def read_table_rows(
    state_dir: Path | None, target: str | None, table: str
) -> tuple[list[dict[str, Any]], str]:
    """Every row of a small ingested table (ReadRows), an INT64 column's numbers as integers, and a
    note naming the write they come from (its fingerprint)."""
    with _ingest_service(state_dir, target) as service:
        reply = service.call("ReadRows", ingest_pb2.ReadRowsRequest(table=table))
    integers = {column.name for column in reply.columns if column.type == ingest_pb2.COLUMN_TYPE_INT64}
    rows = [
        {
            name: int(value) if name in integers and isinstance(value, float) else value
            for name, value in json_format.MessageToDict(row).items()
        }
        for row in reply.rows
    ]
    return rows, f"table {table} fingerprint:{reply.table.fingerprint[:16]}"


def _progress(enabled: bool, *columns: Any) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        *columns,
        TimeElapsedColumn(),
        console=errors,
        disable=not enabled,
        transient=False,
    )


# ingest --------------------------------------------------------------------------------------


def _overrides(types: list[str]) -> dict[str, ingest_pb2.ColumnType]:
    overrides: dict[str, ingest_pb2.ColumnType] = {}
    for item in types:
        name, sep, type_name = item.partition("=")
        if not sep or not name.strip():
            fail(f"--type {item!r}: write COLUMN=TYPE, e.g. --type age=float64")
        column_type = _TYPES.get(type_name.strip().lower())
        if column_type is None:
            fail(
                f"--type {item!r}: unknown type; use one of string, int64, float64, bool, timestamp, date, json"
            )
        overrides[name.strip()] = column_type
    return overrides


def _keys(keys: list[str]) -> list[str]:
    return [name.strip() for item in keys for name in item.split(",") if name.strip()]


def _reject_json(row: ingest_pb2.RejectedRow) -> dict[str, Any]:
    return {"row": row.row_number, "column": row.column, "reason": row.reason, "raw": row.raw}


def _summary_json(summary: ingest_pb2.LoadSummary, rejects: list[ingest_pb2.RejectedRow]) -> dict[str, Any]:
    return {
        "table": summary.table,
        "rows_read": summary.rows_read,
        "rows_written": summary.rows_written,
        "rows_rejected": summary.rows_rejected,
        "table_rows": summary.table_rows,
        "seconds": round(summary.seconds, 3),
        "fingerprint": summary.fingerprint,
        "already_loaded": summary.rows_read == 0,
        "columns": [
            {"name": c.name, "type": _type_name(c.type), "key": c.key, "nullable": c.nullable}
            for c in summary.columns
        ],
        "rejects": [_reject_json(r) for r in rejects],
    }


def _print_rejects(rejects: list[ingest_pb2.RejectedRow], total: int) -> None:
    if not rejects:
        return
    shown = rejects[:REJECTS_SHOWN]
    title = f"rejected rows ({len(shown)} of {total})" if total > len(shown) else "rejected rows"
    table = Table(title=title)
    table.add_column("row", justify="right", no_wrap=True)
    table.add_column("column", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=2)
    table.add_column("raw", overflow="fold", ratio=1)
    for row in shown:
        table.add_row(str(row.row_number), escape(row.column) or "-", escape(row.reason), escape(row.raw))
    errors.print(table)


def _print_summary(summary: ingest_pb2.LoadSummary, rejects: list[ingest_pb2.RejectedRow]) -> None:
    name = escape(summary.table)
    if summary.rows_read == 0:
        console.print(
            f"{name}: [yellow]already loaded[/yellow]: this source was loaded before, nothing written "
            f"(the table has {summary.table_rows} rows)"
        )
        return
    _print_rejects(rejects, summary.rows_rejected)
    rate = summary.rows_read / summary.seconds if summary.seconds > 0 else 0.0
    console.print(
        f"{name}: [green]loaded[/green] {summary.rows_written} rows ({summary.rows_read} read, "
        f"{summary.rows_rejected} rejected) in {summary.seconds:.1f} s, {rate:,.0f} rows/s; "
        f"the table has {summary.table_rows} rows"
    )
    table = Table(title=f"columns of {name}")
    for header in ("column", "type", "key"):
        table.add_column(header, no_wrap=True)
    for column in summary.columns:
        table.add_row(escape(column.name), _type_name(column.type), "yes" if column.key else "")
    console.print(table)


def _upload_requests(
    file: Path, header: ingest_pb2.UploadHeader, progress: Progress, task: TaskID
) -> Iterator[ingest_pb2.UploadRequest]:
    yield ingest_pb2.UploadRequest(header=header)
    with file.open("rb") as handle:
        while block := handle.read(UPLOAD_CHUNK_BYTES):
            yield ingest_pb2.UploadRequest(chunk=block)
            progress.advance(task, len(block))
    progress.update(task, description="loading on the server")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while block := handle.read(UPLOAD_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def ingest(
    file: Annotated[
        Path | None,
        typer.Argument(
            help="CSV, JSON lines or Parquet file: a path the ingest service reads, or sent with --upload"
        ),
    ] = None,
    table: Annotated[str, typer.Option("--table", "-t", help="Table of the offline store to load")] = "",
    key: Annotated[
        list[str] | None,
        typer.Option("--key", "-k", help="Key column (repeat it, or a,b); rows without it are rejected"),
    ] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="append to the table or replace it")] = Mode.APPEND,
    reject_budget: Annotated[
        int,
        typer.Option(
            "--reject-budget", min=0, help="How many bad rows may be rejected (over it: nothing is written)"
        ),
    ] = 0,
    reject_fraction: Annotated[
        float,
        typer.Option(
            "--reject-fraction", min=0.0, max=1.0, help="...or what fraction of the rows read (0 to 1)"
        ),
    ] = 0.0,
    types: Annotated[
        list[str] | None, typer.Option("--type", help="Column type instead of the inferred one: COLUMN=TYPE")
    ] = None,
    event_time: Annotated[
        str, typer.Option("--event-time", help="Column holding each row's event time")
    ] = "",
    file_format: Annotated[
        Format | None, typer.Option("--format", help="File format (default: from the extension)")
    ] = None,
    delimiter: Annotated[str, typer.Option("--delimiter", help="CSV field delimiter (default ,)")] = "",
    upload: Annotated[
        bool, typer.Option("--upload", help="Stream the file to the service instead of sending its path")
    ] = False,
    sql_url: Annotated[
        str, typer.Option("--sql-url", help="Load a query's result from this database (SQLAlchemy URL)")
    ] = "",
    query: Annotated[
        str, typer.Option("--query", help="SELECT whose result is loaded (with --sql-url)")
    ] = "",
    chunk_rows: Annotated[
        int, typer.Option("--chunk-rows", min=0, help="Rows per chunk (0: the server's)")
    ] = 0,
    timeout: TimeoutOption = DEFAULT_LONG_TIMEOUT_S,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Load a file (or a SQL query's result) into a typed table of the offline store.

    Types are inferred (override them with --type); bad rows are rejected with their row number and reason; over the reject budget nothing is written. Loading the same file again writes nothing."""
    if not table:
        fail("name the table to load with --table")
    if (file is None) == (not query):
        fail("give a FILE, or --sql-url with --query (not both)")
    if query and not sql_url:
        fail("--query needs --sql-url")
    target_message = ingest_pb2.LoadTarget(
        table=table,
        key=_keys(key or []),
        mode=_MODES[mode],
        schema_overrides=_overrides(types or []),
        reject_budget=ingest_pb2.RejectBudget(max_rows=reject_budget, max_fraction=reject_fraction),
        event_time_column=event_time,
    )
    with _ingest_service(state_dir, target) as service:
        if file is not None and upload:
            if not file.is_file():
                fail(f"{file} is not a readable file")
            header = ingest_pb2.UploadHeader(
                filename=file.name,
                format=_FORMATS[file_format] if file_format else ingest_pb2.FILE_FORMAT_UNSPECIFIED,
                target=target_message,
                size_bytes=file.stat().st_size,
                sha256=_sha256(file),
                delimiter=delimiter,
            )
            progress = _progress(not as_json, BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with progress:
                task = progress.add_task(f"uploading {file.name}", total=file.stat().st_size)
                try:
                    reply = service.stub.Upload(
                        _upload_requests(file, header, progress, task), timeout=timeout
                    )
                except grpc.RpcError as exc:
                    service.fail("Upload", exc)
            summary, rejects = reply.summary, list(reply.rejects)
        else:
            request = ingest_pb2.IngestRequest(target=target_message, chunk_rows=chunk_rows)
            if file is not None:
                # The local stack shares this filesystem; a remote service reads the path as given.
                path = str(file.resolve()) if file.exists() else str(file)
                request.file.CopyFrom(
                    ingest_pb2.FileSource(
                        path=path,
                        format=_FORMATS[file_format] if file_format else ingest_pb2.FILE_FORMAT_UNSPECIFIED,
                        delimiter=delimiter,
                    )
                )
                what = file.name
            else:
                request.sql.CopyFrom(ingest_pb2.SqlSource(url=sql_url, query=query))
                what = "query"
            summary, rejects = _stream_ingest(service, request, what, timeout, show=not as_json)
    if as_json:
        emit_json(_summary_json(summary, rejects))
        return
    _print_summary(summary, rejects)


def _stream_ingest(
    service: _IngestCalls, request: ingest_pb2.IngestRequest, what: str, timeout: float, *, show: bool
) -> tuple[ingest_pb2.LoadSummary, list[ingest_pb2.RejectedRow]]:
    rejects: list[ingest_pb2.RejectedRow] = []
    summary: ingest_pb2.LoadSummary | None = None
    progress = _progress(show, BarColumn(), TextColumn("{task.fields[counts]}"))
    call = service.stub.Ingest(request, timeout=timeout)
    with progress:
        task = progress.add_task(f"loading {escape(what)}", total=None, counts="")
        try:
            for message in call:
                rejects += message.rejects
                rate = message.progress.rate
                if message.HasField("summary"):
                    summary = message.summary
                    rate = summary.rows_read / summary.seconds if summary.seconds > 0 else 0.0
                    progress.update(task, total=1, completed=1)
                progress.update(
                    task,
                    counts=f"{message.progress.done:,} rows read, {message.rows_written:,} written, "
                    f"{message.rows_rejected:,} rejected" + (f" ({rate:,.0f} rows/s)" if rate else ""),
                )
        except grpc.RpcError as exc:
            progress.stop()
            _print_rejects(rejects, len(rejects))  # what the service reported before it gave up
            service.fail("Ingest", exc)
        except KeyboardInterrupt:
            call.cancel()
            progress.stop()
            fail("interrupted: the load was cancelled", code=130)
    if summary is None:
        fail("the Ingest stream ended without a summary")
    return summary, rejects


# tables --------------------------------------------------------------------------------------


def _kind(kind: int) -> str:
    return str(ingest_pb2.TableKind.Name(kind)).removeprefix("TABLE_KIND_").lower()


def _table_json(info: ingest_pb2.TableInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "kind": _kind(info.kind),
        "row_count": info.row_count,
        "key": list(info.key),
        "column_count": info.column_count,
        "event_time_column": info.event_time_column,
        "updated_at": _time(info.updated_at),
        "fingerprint": info.fingerprint,
    }


def tables(
    describe: Annotated[
        str, typer.Option("--describe", "-d", help="Show one table's schema and column statistics")
    ] = "",
    prefix: Annotated[str, typer.Option("--prefix", help="Only tables whose name starts with this")] = "",
    top: Annotated[int, typer.Option("--top", min=0, max=100, help="Most frequent values per column")] = 3,
    no_stats: Annotated[
        bool, typer.Option("--no-stats", help="Skip statistics (no scan of the table)")
    ] = False,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """The tables of the offline store, or (--describe) one table's schema and statistics."""
    with _ingest_service(state_dir, target) as service:
        if describe:
            reply = service.call(
                "Describe",
                ingest_pb2.DescribeRequest(table=describe, skip_stats=no_stats, top_values=top),
                timeout=DEFAULT_LONG_TIMEOUT_S,
            )
            _print_description(reply, as_json)
            return
        listed = service.call(
            "ListTables",
            ingest_pb2.ListTablesRequest(prefix=prefix, page=common_pb2.PageRequest(page_size=MAX_PAGE_SIZE)),
        )
        while listed.page.next_page_token:  # every page, in order
            following = service.call(
                "ListTables",
                ingest_pb2.ListTablesRequest(
                    prefix=prefix,
                    page=common_pb2.PageRequest(
                        page_size=MAX_PAGE_SIZE, page_token=listed.page.next_page_token
                    ),
                ),
            )
            listed.tables.extend(following.tables)
            listed.page.CopyFrom(following.page)
    if as_json:
        emit_json([_table_json(t) for t in listed.tables])
        return
    if not listed.tables:
        console.print("no tables" + (f" starting with {escape(prefix)}" if prefix else ""))
        return
    table = Table(title="tables of the offline store")
    for column in ("table", "kind", "rows", "columns", "key", "event time", "updated", "fingerprint"):
        table.add_column(column, no_wrap=column != "table", justify="right" if column == "rows" else "left")
    for info in listed.tables:
        table.add_row(
            escape(info.name),
            _kind(info.kind),
            f"{info.row_count:,}",
            str(info.column_count),
            escape(", ".join(info.key)) or "-",
            escape(info.event_time_column) or "-",
            _time(info.updated_at),
            info.fingerprint[:12],
        )
    console.print(table)


def _number(value: float) -> str:
    return f"{value:.6g}"


def _print_description(reply: ingest_pb2.DescribeResponse, as_json: bool) -> None:
    stats = {s.column: s for s in reply.stats}
    if as_json:
        document = _table_json(reply.table)
        document["columns"] = [
            {"name": c.name, "type": _type_name(c.type), "key": c.key, "nullable": c.nullable}
            | ({"stats": plain(stats[c.name])} if c.name in stats else {})
            for c in reply.columns
        ]
        emit_json(document)
        return
    info = reply.table
    console.print(
        f"[bold]{escape(info.name)}[/bold] ({_kind(info.kind)}): {info.row_count:,} rows, key "
        f"{escape(', '.join(info.key)) or 'none'}"
        + (f", event time {escape(info.event_time_column)}" if info.event_time_column else "")
        + f", updated {_time(info.updated_at)}, fingerprint {info.fingerprint[:12]}"
    )
    table = Table()
    headers = ["column", "type", "key", "values", "nulls", "distinct", "min", "max", "mean", "stddev", "top"]
    for header in headers:
        table.add_column(header, no_wrap=header not in ("top", "min", "max"), overflow="fold")
    for column in reply.columns:
        item = stats.get(column.name)
        cells = [escape(column.name), _type_name(column.type), "yes" if column.key else ""]
        if item is None:
            cells += [""] * (len(headers) - len(cells))
        else:
            cells += [
                f"{item.count:,}",
                f"{item.null_count:,}",
                f"{item.distinct_count:,}",
                _number(item.min) if item.HasField("min") else escape(item.min_text),
                _number(item.max) if item.HasField("max") else escape(item.max_text),
                _number(item.mean) if item.HasField("mean") else "",
                _number(item.stddev) if item.HasField("stddev") else "",
                escape(", ".join(f"{v.value} ({v.count})" for v in item.top_values)),
            ]
        table.add_row(*cells)
    console.print(table)


# materialize ---------------------------------------------------------------------------------


def materialize(
    views: Annotated[
        list[str] | None,
        typer.Argument(
            help="Feature views or tables keyed by one entity (default: every one materialized before)"
        ),
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Rewrite every entity, not only those changed since the last run")
    ] = False,
    as_of: Annotated[
        str, typer.Option("--as-of", help="Values as of this ISO 8601 time (default: now)")
    ] = "",
    timeout: TimeoutOption = DEFAULT_LONG_TIMEOUT_S,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Write the newest feature values of every entity into the online store, where predictors read them."""
    request = ingest_pb2.MaterializeRequest(feature_views=views or [], full=full)
    if as_of:
        try:
            moment = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
        except ValueError:
            fail(f"--as-of {as_of!r} is not an ISO 8601 time")
        request.as_of.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    results: dict[str, ingest_pb2.MaterializeProgress] = {}
    progress = _progress(not as_json, BarColumn(), TextColumn("{task.fields[counts]}"))
    with _ingest_service(state_dir, target) as service, progress:
        tasks: dict[str, TaskID] = {}
        for message in service.stream("Materialize", request, timeout):
            view = message.feature_view
            if view not in tasks:
                tasks[view] = progress.add_task(
                    f"materializing {escape(view)}", total=message.progress.total or None, counts=""
                )
            results[view] = message
            progress.update(
                tasks[view],
                completed=message.entities_written,
                counts=f"{message.entities_written:,} entities",
            )
            if message.done:
                progress.update(
                    tasks[view],
                    total=max(message.entities_written, 1),
                    completed=max(message.entities_written, 1),
                )
    rows: list[dict[str, Any]] = [
        {
            "feature_view": view,
            "entities_written": message.entities_written,
            "unchanged": message.progress.message == "unchanged since the last run",
        }
        for view, message in results.items()
    ]
    if as_json:
        emit_json(rows)
        return
    for view, message in results.items():
        if message.progress.message == "unchanged since the last run":
            console.print(f"{escape(view)}: unchanged since the last run, nothing written")
        else:
            console.print(
                f"{escape(view)}: [green]materialized[/green] {message.entities_written:,} entities"
                + ("" if full else " (new or changed since the last run)")
            )


# features apply ------------------------------------------------------------------------------


@features_app.command("apply")
def features_apply(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Feature spec (YAML)")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and report; change nothing")] = False,
    timeout: TimeoutOption = DEFAULT_LONG_TIMEOUT_S,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Declare or update feature views from a feature spec and compute their tables."""
    try:
        text = spec.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{spec} is not UTF-8 text")
    except OSError as exc:
        fail(f"cannot read {spec}: {exc.strerror}")
    request = ingest_pb2.ApplyFeaturesRequest(spec_yaml=text, dry_run=dry_run)
    with _ingest_service(state_dir, target) as service:
        try:
            reply = service.stub.ApplyFeatures(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                fail(
                    f"the ingest service at {service.target} does not implement ApplyFeatures yet (UNIMPLEMENTED)"
                )
            service.fail("ApplyFeatures", exc)
    if as_json:
        emit_json(plain(reply))
        return
    for warning in reply.warnings:
        errors.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    table = Table(title="feature views" + (" (dry run: nothing changed)" if reply.dry_run else ""))
    for column in ("view", "source", "entity", "features", "version", "changed"):
        table.add_column(column, no_wrap=column != "features", overflow="fold")
    for view in reply.views:
        table.add_row(
            escape(view.name),
            escape(view.source_table),
            escape(", ".join(view.entity_keys)),
            escape(", ".join(f.name for f in view.features)),
            str(view.version),
            "yes" if view.changed else "no",
        )
    console.print(table)


# features training-set ----------------------------------------------------------------------


@features_app.command("training-set")
def features_training_set(
    output: Annotated[str, typer.Argument(help="Name of the training-set table to write")],
    labels: Annotated[str, typer.Option("--labels", help="Table of entity keys, event times and labels")],
    label: Annotated[str, typer.Option("--label", help="Label column of the --labels table")],
    feature: Annotated[
        list[str] | None,
        typer.Option(
            "--feature",
            "-f",
            help="A feature view (all its features) or view.feature; repeat it; none: every view",
        ),
    ] = None,
    event_time: Annotated[
        str, typer.Option("--event-time", help="Event-time column of --labels (default: the table's own)")
    ] = "",
    keep: Annotated[
        list[str] | None,
        typer.Option("--keep", help="Another column of --labels to copy (e.g. the offer shown); repeat it"),
    ] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="append to the table or replace it")] = Mode.REPLACE,
    sample: Annotated[
        float, typer.Option("--sample", min=0.0, max=1.0, help="Share of label rows to keep (0: all)")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample")] = 0,
    timeout: TimeoutOption = DEFAULT_LONG_TIMEOUT_S,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Join labels with point-in-time-correct features (each label gets the newest feature values at
    or before its event time) into a training-set table that `liveloop train` reads."""
    request = ingest_pb2.BuildTrainingSetRequest(
        output_table=output,
        label_table=labels,
        label_column=label,
        features=feature or [],
        event_time_column=event_time,
        mode=_MODES[mode],
        sample_fraction=sample,
        seed=seed,
        label_table_columns=keep or [],
    )
    with _ingest_service(state_dir, target) as service:
        reply = service.call("BuildTrainingSet", request, timeout=timeout)
    if as_json:
        emit_json(plain(reply))
        return
    console.print(
        f"{escape(reply.table)}: [green]written[/green] {reply.row_count:,} rows, label mean "
        f"{reply.label_mean:.4f}, {reply.rows_missing_features:,} rows without features at their time "
        f"(defaults used); fingerprint {reply.fingerprint[:12]}"
    )
    console.print("columns: " + escape(", ".join(f"{c.name} ({_type_name(c.type)})" for c in reply.columns)))


# options generate ----------------------------------------------------------------------------


@options_app.command("generate")
def options_generate(
    deployment: Annotated[
        str, typer.Option("--deployment", "-d", help="Deployment whose options to build")
    ] = "",
    history_table: Annotated[
        str,
        typer.Option(
            "--history-table",
            help="Table of past presentations (offer, accepted, [presented], segment variables) for priors",
        ),
    ] = "",
    mode: Annotated[
        OptionsMode,
        typer.Option("--mode", help="generate: start over from the priors; update: keep what was learned"),
    ] = OptionsMode.UPDATE,
    prior_weight: Annotated[
        float,
        typer.Option(
            "--prior-weight", min=0.0, help="Pseudo-observations per arm from history (0: the server's)"
        ),
    ] = 0.0,
    revision: Annotated[int, typer.Option("--revision", min=0, help="Config revision (0: the head)")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compute, report, write nothing")] = False,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Build a deployment's options store (offers x segments) with priors from historical take-up.

    The new generation becomes live all at once: predictors never see half of it."""
    if not deployment:
        fail("name the deployment with --deployment")
    request = ingest_pb2.GenerateOptionsRequest(
        deployment=deployment,
        mode=_OPTIONS_MODES[mode],
        history_table=history_table,
        prior_weight=prior_weight,
        dry_run=dry_run,
        config_revision=revision,
    )
    with _ingest_service(state_dir, target) as service:
        reply = service.call("GenerateOptions", request, timeout=DEFAULT_LONG_TIMEOUT_S)
    if as_json:
        emit_json(plain(reply))
        return
    done = "dry run, nothing written" if reply.dry_run else f"[green]{mode.value}d[/green]"
    console.print(
        f"{escape(reply.deployment)}: options {done} from config revision {reply.config_revision}: "
        f"{reply.offers} offers, {reply.segments} segments with statistics; arms created {reply.arms_created}, "
        f"updated {reply.arms_updated}, kept {reply.arms_kept}, removed {reply.arms_removed}; "
        f"{reply.history_rows:,} history rows"
    )


def register(app: typer.Typer) -> None:
    """Adds these commands to the `liveloop` command line."""
    app.command("ingest")(ingest)
    app.command("tables")(tables)
    app.command("materialize")(materialize)
    app.add_typer(features_app, name="features")
    app.add_typer(options_app, name="options")
