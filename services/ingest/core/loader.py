"""Loading a source into the offline store: typed, validated, all or nothing.

The whole load is one transaction. `replace` writes into a staging table and swaps it in at the
end; `append` inserts into the table. Rows that fail validation are rejected with their row
number and reason; when rejects pass the budget, the transaction rolls back and nothing is written.
The same source (by content fingerprint) is never loaded twice into the same table.
"""

from __future__ import annotations

import enum
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from libs.common.database import write_transaction
from libs.common.errors import FailedPrecondition, InvalidArgument
from services.ingest.core import catalog
from services.ingest.core.columns import (
    ARROW_TYPES,
    RESERVED_PREFIX,
    Column,
    ColumnType,
    cast,
    check_name,
    convert_value,
    infer_type,
    sql_type,
)
from services.ingest.core.sources import RawChunk, Reject, csv_bytes, decode_utf8

MAX_REJECTS_REPORTED = 1000


class WriteMode(enum.StrEnum):
    APPEND = "append"
    REPLACE = "replace"


@dataclass(frozen=True)
class LoadTarget:
    table: str
    key: tuple[str, ...] = ()
    mode: WriteMode = WriteMode.APPEND
    schema_overrides: Mapping[str, ColumnType] = field(default_factory=dict)
    max_rejected_rows: int = 0
    max_rejected_fraction: float = 0.0
    event_time_column: str = ""
    kind: str = "raw"


@dataclass
class LoadProgress:
    rows_read: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    started: float = field(default_factory=time.monotonic)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows_read / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True)
class LoadResult:
    table: str
    columns: list[Column]
    rows_read: int
    rows_written: int
    rows_rejected: int
    rejects: list[Reject]
    seconds: float
    fingerprint: str
    table_rows: int
    already_loaded: bool = False


ProgressCallback = Callable[[LoadProgress], None]


class RejectBudgetExceeded(InvalidArgument):
    pass


def _budget_exceeded(target: LoadTarget, progress: LoadProgress, final: bool) -> bool:
    if progress.rows_rejected > target.max_rejected_rows and target.max_rejected_fraction <= 0:
        return True
    if target.max_rejected_fraction > 0 and final and progress.rows_read:
        allowed = max(target.max_rejected_rows, int(target.max_rejected_fraction * progress.rows_read))
        return progress.rows_rejected > allowed
    return False


def _plan_columns(first: RawChunk, target: LoadTarget) -> list[Column]:
    names = first.batch.schema.names
    for index, name in enumerate(names):
        check_name(name, f"columns[{index}]")
        if name.lower().startswith(RESERVED_PREFIX):
            raise InvalidArgument(
                f"'{name}' uses the reserved prefix {RESERVED_PREFIX}", field=f"columns[{index}]"
            )
    if len({name.lower() for name in names}) != len(names):
        raise InvalidArgument("column names repeat (names are case-insensitive)", field="columns")
    for name in target.schema_overrides:
        if name not in names:
            raise InvalidArgument(
                f"'{name}' is not a column of the source ({', '.join(names)})", field="schema_overrides"
            )
    for name in target.key:
        if name not in names:
            raise InvalidArgument(
                f"key column '{name}' is missing from the source ({', '.join(names)})", field="target.key"
            )
    if target.event_time_column and target.event_time_column not in names:
        raise InvalidArgument(
            f"'{target.event_time_column}' is not a column of the source", field="target.event_time_column"
        )
    columns = []
    for index, name in enumerate(names):
        raw = first.batch.column(index)
        if pa.types.is_binary(raw.type):
            raw, _, keep = decode_utf8(raw, name, first.row_number)
            raw = raw.filter(pa.array(keep))
        column_type = target.schema_overrides.get(name) or infer_type(raw)
        if name == target.event_time_column and column_type is not ColumnType.TIMESTAMP:
            column_type = ColumnType.TIMESTAMP
        columns.append(Column(name, column_type, key=name in target.key))
    return columns


def convert_chunk(
    chunk: RawChunk, columns: Sequence[Column]
) -> tuple[pa.RecordBatch, list[Reject], list[int]]:
    """Typed batch of the rows that pass, the rejects (row number, column, reason), and the row
    numbers of the rows kept."""
    rejects = list(chunk.rejects)
    rows = chunk.batch.num_rows
    keep = [True] * rows
    texts: list[pa.Array] = []
    for index, column in enumerate(columns):
        raw = chunk.batch.column(index)
        raw, bad, mask = decode_utf8(raw, column.name, chunk.row_number)
        rejects += bad
        keep = [k and m for k, m in zip(keep, mask, strict=True)]
        texts.append(raw)
    typed: list[pa.Array] = []
    for column, raw in zip(columns, texts, strict=True):
        try:
            values = cast(raw, column.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, TypeError):
            converted = []
            for row, value in enumerate(raw.to_pylist()):
                try:
                    converted.append(convert_value(value, column.type))
                except (ValueError, TypeError) as exc:
                    converted.append(None)
                    if keep[row]:
                        keep[row] = False
                        rejects.append(Reject(chunk.row_number(row), column.name, str(exc), str(value)[:200]))
            values = pa.array(converted, type=ARROW_TYPES[column.type])
        if column.key:
            nulls = pc.is_null(values).to_pylist()
            for row, is_null in enumerate(nulls):
                if is_null and keep[row]:
                    keep[row] = False
                    rejects.append(Reject(chunk.row_number(row), column.name, "the key is empty"))
        typed.append(values)
    batch = pa.RecordBatch.from_arrays(typed, names=[c.name for c in columns])
    if all(keep):
        return (
            batch,
            rejects,
            [chunk.row_number(i) for i in range(rows)] if any(c.key for c in columns) else [],
        )
    kept = [chunk.row_number(i) for i in range(rows) if keep[i]]
    return batch.filter(pa.array(keep)), rejects, kept


def _drop_duplicate_keys(
    batch: pa.RecordBatch,
    columns: Sequence[Column],
    row_numbers: Sequence[int],
    seen: set[int],
    rejects: list[Reject],
) -> pa.RecordBatch:
    key_names = [c.name for c in columns if c.key]
    if not key_names:
        return batch
    keys = list(zip(*(batch.column(name).to_pylist() for name in key_names), strict=True))
    keep = []
    for index, key in enumerate(keys):
        digest = hash(key)
        if digest in seen:
            keep.append(False)
            rejects.append(
                Reject(
                    row_numbers[index],
                    ",".join(key_names),
                    f"duplicate key {key if len(key) > 1 else key[0]!r}",
                )
            )
        else:
            seen.add(digest)
            keep.append(True)
    return batch.filter(pa.array(keep)) if not all(keep) else batch


def sql_table(name: str, columns: Sequence[Column], metadata: sa.MetaData | None = None) -> sa.Table:
    return sa.Table(
        name,
        metadata or sa.MetaData(),
        *(sa.Column(c.name, sql_type(c.type), nullable=not c.key) for c in columns),
        *(
            [sa.PrimaryKeyConstraint(*[c.name for c in columns if c.key])]
            if any(c.key for c in columns)
            else []
        ),
    )


def _insert(
    connection: Connection, table: sa.Table, batch: pa.RecordBatch, columns: Sequence[Column]
) -> None:
    if batch.num_rows == 0:
        return
    if connection.dialect.name == "postgresql":
        names = ", ".join(connection.dialect.identifier_preparer.quote(c.name) for c in columns)
        quoted = connection.dialect.identifier_preparer.quote(table.name)
        cursor = connection.connection.cursor()
        with cursor.copy(f"COPY {quoted} ({names}) FROM STDIN (FORMAT csv)") as copy:
            copy.write(csv_bytes(batch))
        return
    # SQLite: executemany of plain tuples; timestamps as the text UtcDateTime stores.
    values = []
    for column in columns:
        array = batch.column(column.name)
        if column.type is ColumnType.TIMESTAMP:
            array = pc.strftime(array, format="%Y-%m-%d %H:%M:%S", locale="C")  # %S carries the microseconds
        values.append(array.to_pylist())
    placeholders = ", ".join("?" for _ in columns)
    quoted = connection.dialect.identifier_preparer.quote(table.name)
    connection.exec_driver_sql(
        f"INSERT INTO {quoted} VALUES ({placeholders})", list(zip(*values, strict=True))
    )


def _existing_columns(connection: Connection, name: str) -> list[Column] | None:
    row = connection.execute(
        sa.select(catalog.tables.c.columns, catalog.tables.c.key_columns).where(catalog.tables.c.name == name)
    ).first()
    if row is None:
        return None
    keys = set(json.loads(row.key_columns))
    return [Column(c["name"], ColumnType(c["type"]), c["name"] in keys) for c in json.loads(row.columns)]


def load(
    engine: Engine,
    chunks: Iterator[RawChunk],
    target: LoadTarget,
    fingerprint: str | Callable[[], str],
    progress: ProgressCallback = lambda _p: None,
) -> LoadResult:
    """`fingerprint` identifies the source's content: known up front (a file's SHA-256), or computed
    while streaming (a query's result), in which case a repeat is detected before commit."""
    if callable(fingerprint):
        return _load(engine, chunks, target, None, fingerprint, progress)
    return _load(engine, chunks, target, fingerprint, None, progress)


class AlreadyLoaded(Exception):
    pass


def _load(
    engine: Engine,
    chunks: Iterator[RawChunk],
    target: LoadTarget,
    known_fingerprint: str | None,
    streamed_fingerprint: Callable[[], str] | None,
    progress: ProgressCallback,
) -> LoadResult:
    fingerprint = known_fingerprint or ""
    check_name(target.table, "target.table")
    if target.table.lower().startswith(RESERVED_PREFIX):
        raise InvalidArgument(
            f"table names starting with {RESERVED_PREFIX} are reserved", field="target.table"
        )
    started = time.monotonic()
    with engine.connect() as connection:
        seen_before = connection.execute(
            sa.select(catalog.loads.c.id).where(
                catalog.loads.c.table_name == target.table, catalog.loads.c.fingerprint == fingerprint
            )
        ).first()
        current = connection.execute(
            sa.select(catalog.tables.c.fingerprint, catalog.tables.c.row_count).where(
                catalog.tables.c.name == target.table
            )
        ).first()
    if (
        known_fingerprint is not None
        and seen_before is not None
        and (target.mode is WriteMode.APPEND or (current is not None and current.fingerprint == fingerprint))
    ):
        with engine.connect() as connection:
            columns = _existing_columns(connection, target.table) or []
        rows = int(current.row_count) if current is not None else 0
        return LoadResult(
            target.table,
            columns,
            0,
            0,
            0,
            [],
            time.monotonic() - started,
            fingerprint,
            rows,
            already_loaded=True,
        )
    try:
        first = next(chunks)
    except StopIteration:
        raise InvalidArgument("the source has no rows", field="source") from None
    columns = _plan_columns(first, target)
    state = LoadProgress()
    seen_keys: set[int] = set()
    with write_transaction(engine, lock_timeout_s=60) as connection:
        existing = _existing_columns(connection, target.table)
        if target.mode is WriteMode.APPEND and existing is not None:
            if [(c.name, c.type) for c in existing] != [(c.name, c.type) for c in columns]:
                raise FailedPrecondition(
                    f"table '{target.table}' has columns {[(c.name, c.type.value) for c in existing]}; the source has "
                    f"{[(c.name, c.type.value) for c in columns]}; use mode replace or schema_overrides",
                    field="target.table",
                )
            table = sql_table(target.table, existing)
        else:
            name = (
                target.table
                if existing is None and target.mode is WriteMode.APPEND
                else f"{RESERVED_PREFIX}staging_{uuid.uuid4().hex[:12]}"
            )
            table = sql_table(name, columns)
            table.create(connection)
        if existing is not None and target.mode is WriteMode.APPEND and any(c.key for c in columns):
            key_names = [c.name for c in columns if c.key]
            for row in connection.execute(sa.select(*[table.c[n] for n in key_names])):
                seen_keys.add(hash(tuple(row)))
        for chunk in itertools.chain([first], chunks):
            batch, rejects, row_numbers = convert_chunk(chunk, columns)
            state.rows_read += chunk.batch.num_rows + len(chunk.rejects)
            batch = _drop_duplicate_keys(batch, columns, row_numbers, seen_keys, rejects)
            state.rows_rejected += len(rejects)
            room = MAX_REJECTS_REPORTED - len(state.rejects)
            if room > 0:
                state.rejects += sorted(rejects, key=lambda r: r.row_number)[:room]
            if _budget_exceeded(target, state, final=False):
                raise RejectBudgetExceeded(_budget_message(target, state), field="target.reject_budget")
            _insert(connection, table, batch, columns)
            state.rows_written += batch.num_rows
            progress(state)
        if _budget_exceeded(target, state, final=True):
            raise RejectBudgetExceeded(_budget_message(target, state), field="target.reject_budget")
        if streamed_fingerprint is not None:
            fingerprint = streamed_fingerprint()
            repeat = connection.execute(
                sa.select(catalog.loads.c.id).where(
                    catalog.loads.c.table_name == target.table, catalog.loads.c.fingerprint == fingerprint
                )
            ).first()
            if repeat is not None:
                raise AlreadyLoaded(fingerprint)  # rolls the transaction back: nothing is written twice
        if table.name != target.table:
            preparer = connection.dialect.identifier_preparer
            if existing is not None:
                connection.exec_driver_sql(f"DROP TABLE {preparer.quote(target.table)}")
            connection.exec_driver_sql(
                f"ALTER TABLE {preparer.quote(table.name)} RENAME TO {preparer.quote(target.table)}"
            )
        table_rows = int(
            connection.scalar(sa.select(sa.func.count()).select_from(sa.table(target.table))) or 0
        )
        now = datetime.now(UTC)
        record = {
            "kind": target.kind,
            "key_columns": json.dumps([c.name for c in columns if c.key]),
            "event_time_column": target.event_time_column,
            "columns": json.dumps([{"name": c.name, "type": c.type.value} for c in columns]),
            "fingerprint": fingerprint,
            "row_count": table_rows,
            "updated_at": now,
        }
        if existing is None:
            connection.execute(sa.insert(catalog.tables).values(name=target.table, **record))
        else:
            connection.execute(
                sa.update(catalog.tables).where(catalog.tables.c.name == target.table).values(**record)
            )
        connection.execute(
            sa.insert(catalog.loads).values(
                table_name=target.table,
                fingerprint=fingerprint,
                mode=target.mode.value,
                rows_written=state.rows_written,
                rows_rejected=state.rows_rejected,
                loaded_at=now,
            )
        )
    return LoadResult(
        target.table,
        columns,
        state.rows_read,
        state.rows_written,
        state.rows_rejected,
        state.rejects,
        time.monotonic() - started,
        fingerprint,
        table_rows,
    )


def _budget_message(target: LoadTarget, state: LoadProgress) -> str:
    first = state.rejects[0] if state.rejects else None
    example = f"; first: row {first.row_number} {first.column}: {first.reason}" if first else ""
    budget = f"{target.max_rejected_rows} rows" + (
        f" or {target.max_rejected_fraction:.1%}" if target.max_rejected_fraction else ""
    )
    return f"{state.rows_rejected} rows rejected, over the budget of {budget}; nothing was written{example}"
