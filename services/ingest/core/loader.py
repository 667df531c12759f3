"""Loading a source into the offline store: typed, validated, all or nothing.

The whole load is one transaction. `replace` writes into a staging table and swaps it in at the
end; `append` inserts into the table. Rows that fail validation are rejected with their row
number and reason; when rejects pass the budget, the transaction rolls back and nothing is written.
The same source (by content fingerprint) is never loaded twice into the same table.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

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
    """Over either limit that is set (both unset: no reject allowed). The row limit is checked as
    rows stream; the fraction only at the end, when the number of rows read is known."""
    rows_limit_set = target.max_rejected_rows > 0 or target.max_rejected_fraction <= 0
    if rows_limit_set and progress.rows_rejected > target.max_rejected_rows:
        return True
    if target.max_rejected_fraction > 0 and final and progress.rows_read:
        return progress.rows_rejected > target.max_rejected_fraction * progress.rows_read
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
        if bad:
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
            missing = pc.is_null(values)
            if pa.types.is_string(values.type):  # a blank text key is as missing as an absent one
                missing = pc.fill_null(pc.or_(missing, pc.equal(pc.utf8_trim_whitespace(values), "")), True)
            for row, is_null in enumerate(missing.to_pylist()):
                if is_null and keep[row]:
                    keep[row] = False
                    rejects.append(Reject(chunk.row_number(row), column.name, "the key is empty"))
        typed.append(values)
    batch = pa.RecordBatch.from_arrays(typed, names=[c.name for c in columns])
    if all(keep):
        return batch, rejects, chunk.row_numbers() if any(c.key for c in columns) else []
    numbers = chunk.row_numbers()
    kept = [numbers[i] for i in range(rows) if keep[i]]
    return batch.filter(pa.array(keep)), rejects, kept


def _drop_duplicate_keys(
    connection: Connection,
    table: sa.Table,
    batch: pa.RecordBatch,
    columns: Sequence[Column],
    row_numbers: Sequence[int],
    rejects: list[Reject],
) -> pa.RecordBatch:
    """Rejects rows whose key repeats an earlier row of the chunk or a row already in the table.

    Only this chunk's keys are held in memory; earlier ones are looked up in the table through its
    primary key, so memory stays flat however many rows the source (or the table) has.
    """
    key_columns = [c for c in columns if c.key]
    if not key_columns or batch.num_rows == 0:
        return batch
    dialect = connection.dialect.name
    keys = list(
        zip(*(_stored_values(batch.column(c.name), c.type, dialect) for c in key_columns), strict=True)
    )
    stored = _stored_keys(connection, table, key_columns, keys)
    if not stored and len(key_columns) == 1:
        key = batch.column(key_columns[0].name)
        if pc.count_distinct(key, mode="all").as_py() == len(key):
            return batch  # the common case, decided without a Python loop over the rows
    seen: set[tuple[object, ...]] = set()
    keep = []
    for index, key in enumerate(keys):
        if key in seen or key in stored:
            keep.append(False)
            rejects.append(
                Reject(
                    row_numbers[index],
                    ",".join(c.name for c in key_columns),
                    "duplicate key "
                    + ", ".join(f"{c.name}={_shown(v)}" for c, v in zip(key_columns, key, strict=True)),
                )
            )
        else:
            seen.add(key)
            keep.append(True)
    return batch.filter(pa.array(keep)) if not all(keep) else batch


_POSTGRESQL_TYPES = {
    ColumnType.STRING: "text",
    ColumnType.INT64: "bigint",
    ColumnType.FLOAT64: "double precision",
    ColumnType.BOOL: "boolean",
    ColumnType.TIMESTAMP: "timestamptz",
    ColumnType.DATE: "date",
    ColumnType.JSON: "text",
}


def _stored_keys(
    connection: Connection, table: sa.Table, key_columns: Sequence[Column], keys: Sequence[tuple[object, ...]]
) -> set[tuple[object, ...]]:
    """Which of `keys` the table holds already, as the driver returns them (one indexed query)."""
    quote = connection.dialect.identifier_preparer.quote
    names = [quote(c.name) for c in key_columns]
    selected = ", ".join(f"t.{name}" for name in names)
    if connection.dialect.name == "postgresql":
        # The keys as one JSON document: far cheaper to send than an array parameter per column.
        if len(key_columns) == 1:
            source = "jsonb_array_elements_text(%s::jsonb) AS j(v)"
            matches = f"t.{names[0]} = j.v::{_POSTGRESQL_TYPES[key_columns[0].type]}"
            document = json.dumps([key[0] for key in keys], default=_json_text)
        else:
            source = "jsonb_array_elements(%s::jsonb) AS j(v)"
            matches = " AND ".join(
                f"t.{name} = (j.v->>{i})::{_POSTGRESQL_TYPES[c.type]}"
                for i, (name, c) in enumerate(zip(names, key_columns, strict=True))
            )
            document = json.dumps([list(key) for key in keys], default=_json_text)
        cursor = connection.connection.cursor()
        cursor.execute(
            f"SELECT {selected} FROM {source} JOIN {quote(table.name)} AS t ON {matches}", (document,)
        )
        return {tuple(row) for row in cursor.fetchall()}
    # SQLite: the keys as one JSON array; CROSS JOIN keeps json_each outside, so every key is one
    # probe of the primary key's index rather than a scan of the table.
    if len(key_columns) == 1:
        document = json.dumps([key[0] for key in keys])
        matches = f"t.{names[0]} = j.value"
    else:
        document = json.dumps([list(key) for key in keys])
        matches = " AND ".join(f"t.{name} = json_extract(j.value, '$[{i}]')" for i, name in enumerate(names))
    rows = connection.exec_driver_sql(
        f"SELECT {selected} FROM json_each(?) AS j CROSS JOIN {quote(table.name)} AS t ON {matches}",
        (document,),
    )
    return {tuple(row) for row in rows}


def _shown(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime | date) else repr(value)


def _json_text(value: object) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"cannot send {type(value).__name__} as a key")


def _stored_values(array: pa.Array, column_type: ColumnType, dialect: str) -> list[object]:
    """Python values as the driver takes them (and, on SQLite, returns them)."""
    if dialect == "sqlite":
        if column_type is ColumnType.TIMESTAMP:
            # The text UtcDateTime stores; %S carries the microseconds.
            array = pc.strftime(array, format="%Y-%m-%d %H:%M:%S", locale="C")
        elif column_type is ColumnType.DATE:
            array = pc.strftime(array, format="%Y-%m-%d", locale="C")
    values: list[object] = array.to_pylist()
    return values


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


SQLITE_INSERT_ROWS = 5000  # rows turned into Python objects at a time


def _insert(
    connection: Connection, table: sa.Table, batch: pa.RecordBatch, columns: Sequence[Column]
) -> None:
    if batch.num_rows == 0:
        return
    quoted = connection.dialect.identifier_preparer.quote(table.name)
    if connection.dialect.name == "postgresql":
        names = ", ".join(connection.dialect.identifier_preparer.quote(c.name) for c in columns)
        cursor = connection.connection.cursor()
        # Timestamps go out as naive UTC text (Arrow writes zoned ones ten times slower), read as
        # UTC by a session time zone set for this transaction only.
        cursor.execute("SET LOCAL TIME ZONE 'UTC'")
        arrays = [
            batch.column(c.name).cast(pa.timestamp("us"))
            if c.type is ColumnType.TIMESTAMP
            else batch.column(c.name)
            for c in columns
        ]
        with cursor.copy(f"COPY {quoted} ({names}) FROM STDIN (FORMAT csv)") as copy:
            copy.write(csv_bytes(pa.RecordBatch.from_arrays(arrays, names=[c.name for c in columns])))
        return
    # SQLite: executemany of plain tuples, a slice at a time so the Python objects stay few.
    placeholders = ", ".join("?" for _ in columns)
    for offset in range(0, batch.num_rows, SQLITE_INSERT_ROWS):
        part = batch.slice(offset, SQLITE_INSERT_ROWS)
        values = [_stored_values(part.column(c.name), c.type, "sqlite") for c in columns]
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


def _append_columns(target: LoadTarget, existing: list[Column], planned: list[Column]) -> list[Column]:
    """Appending converts to the table's own types and key (the source's inferred types may be
    narrower: a file of whole numbers appended to a float column); names must match in order."""
    if [c.name for c in existing] != [c.name for c in planned]:
        raise FailedPrecondition(
            f"table '{target.table}' has columns {[c.name for c in existing]}; the source has "
            f"{[c.name for c in planned]} (same names in the same order are needed); use mode replace",
            field="target.table",
        )
    for name, column_type in target.schema_overrides.items():
        stored = next(c.type for c in existing if c.name == name)
        if column_type is not stored:
            raise FailedPrecondition(
                f"column '{name}' of table '{target.table}' is {stored.value}, not {column_type.value}; "
                "use mode replace to change its type",
                field="schema_overrides",
            )
    keys = [c.name for c in existing if c.key]
    if target.key and list(target.key) != keys:
        raise FailedPrecondition(
            f"table '{target.table}' has key {keys or 'none'}, not {list(target.key)}; use mode replace",
            field="target.key",
        )
    return existing


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
    if known_fingerprint is not None:
        with engine.connect() as connection:
            if _loaded_before(connection, target, known_fingerprint):
                rows = connection.scalar(
                    sa.select(catalog.tables.c.row_count).where(catalog.tables.c.name == target.table)
                )
                return LoadResult(
                    target.table,
                    _existing_columns(connection, target.table) or [],
                    0,
                    0,
                    0,
                    [],
                    time.monotonic() - started,
                    known_fingerprint,
                    int(rows or 0),
                    already_loaded=True,
                )
    try:
        first = next(chunks)
    except StopIteration:
        raise InvalidArgument("the source has no rows", field="source") from None
    columns = _plan_columns(first, target)
    state = LoadProgress()
    with write_transaction(engine, lock_timeout_s=60) as connection:
        existing = _existing_columns(connection, target.table)
        if target.mode is WriteMode.APPEND and existing is not None:
            columns = _append_columns(target, existing, columns)
            table = sql_table(target.table, existing)
        else:
            name = (
                target.table
                if existing is None and target.mode is WriteMode.APPEND
                else f"{RESERVED_PREFIX}staging_{uuid.uuid4().hex[:12]}"
            )
            table = sql_table(name, columns)
            table.create(connection)
        for chunk in itertools.chain([first], chunks):
            batch, rejects, row_numbers = convert_chunk(chunk, columns)
            state.rows_read += chunk.batch.num_rows + len(chunk.rejects)
            batch = _drop_duplicate_keys(connection, table, batch, columns, row_numbers, rejects)
            state.rows_rejected += len(rejects)
            room = MAX_REJECTS_REPORTED - len(state.rejects)
            if room > 0:
                state.rejects += sorted(rejects, key=lambda r: r.row_number)[:room]
            if _budget_exceeded(target, state, final=False):
                if streamed_fingerprint is not None:
                    _raise_if_loaded_before(connection, target, chunks, streamed_fingerprint)
                raise RejectBudgetExceeded(_budget_message(target, state), field="target.reject_budget")
            _insert(connection, table, batch, columns)
            state.rows_written += batch.num_rows
            progress(state)
        if _budget_exceeded(target, state, final=True):
            raise RejectBudgetExceeded(_budget_message(target, state), field="target.reject_budget")
        if streamed_fingerprint is not None:
            fingerprint = streamed_fingerprint()
            if _loaded_before(connection, target, fingerprint):
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
        table_fingerprint = fingerprint
        if existing is not None and target.mode is WriteMode.APPEND:
            # The table now holds more than this source: its fingerprint must not match the source's,
            # or a replace with that source alone would be skipped as already loaded.
            before = connection.scalar(
                sa.select(catalog.tables.c.fingerprint).where(catalog.tables.c.name == target.table)
            )
            table_fingerprint = hashlib.sha256(f"{before}+{fingerprint}".encode()).hexdigest()
        record = {
            "kind": target.kind,
            "key_columns": json.dumps([c.name for c in columns if c.key]),
            "event_time_column": target.event_time_column,
            "columns": json.dumps([{"name": c.name, "type": c.type.value} for c in columns]),
            "fingerprint": table_fingerprint,
            "row_count": table_rows,
            "updated_at": now,
        }
        if existing is not None and target.mode is WriteMode.APPEND and not target.event_time_column:
            del record["event_time_column"]  # an append keeps the table's event time
        if existing is None:
            connection.execute(sa.insert(catalog.tables).values(name=target.table, **record))
        else:
            connection.execute(
                sa.update(catalog.tables).where(catalog.tables.c.name == target.table).values(**record)
            )
        if target.mode is WriteMode.REPLACE:
            # What earlier loads wrote is gone: loading one of them again must write it again.
            connection.execute(sa.delete(catalog.loads).where(catalog.loads.c.table_name == target.table))
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


def _loaded_before(connection: Connection, target: LoadTarget, fingerprint: str) -> bool:
    """Appending: this source went into the table since its last replace. Replacing: the table holds
    exactly this source (its fingerprint is the source's, which no append since has changed)."""
    if target.mode is WriteMode.REPLACE:
        current = connection.scalar(
            sa.select(catalog.tables.c.fingerprint).where(catalog.tables.c.name == target.table)
        )
        return current == fingerprint
    seen = connection.execute(
        sa.select(catalog.loads.c.id).where(
            catalog.loads.c.table_name == target.table, catalog.loads.c.fingerprint == fingerprint
        )
    ).first()
    return seen is not None


def _raise_if_loaded_before(
    connection: Connection, target: LoadTarget, rest: Iterator[RawChunk], fingerprint: Callable[[], str]
) -> None:
    """A query's result known only once read: the rows of a repeat are all duplicates of the rows the
    first load wrote, so before reporting them read the rest, and call a repeat a repeat."""
    for _ in rest:
        pass
    if _loaded_before(connection, target, fingerprint()):
        raise AlreadyLoaded(fingerprint())


def _budget_message(target: LoadTarget, state: LoadProgress) -> str:
    first = state.rejects[0] if state.rejects else None
    example = f"; first: row {first.row_number} {first.column}: {first.reason}" if first else ""
    budget = f"{target.max_rejected_rows} rows" + (
        f" or {target.max_rejected_fraction:.1%}" if target.max_rejected_fraction else ""
    )
    return f"{state.rows_rejected} rows rejected, over the budget of {budget}; nothing was written{example}"
