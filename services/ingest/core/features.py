"""Feature engineering over the offline store: a YAML feature spec, feature views, training sets.

A feature spec declares feature views. A view reads one source table (plus key joins to other
tables), streamed in chunks ordered by entity and event time, computes its features chunk by chunk
(pyarrow compute; windowed aggregations keep one per-entity deque), and replaces its output table in
the same transaction as every other view of the spec, through a staging table: a failure anywhere
leaves the previous version of every view in place. Memory is bounded by the chunk size (and, for a
windowed aggregation, by one entity's rows inside one window).

A training set joins label rows with the newest feature row of the same entity whose event time is at
or before the label's event time (point in time: nothing from the label's future). Labels and every
feature view are read sorted the same way, by (entity, event time), and merged in one pass with one
pending row per view, so neither side is ever held in memory.

All timestamps are UTC; date parts are computed in UTC (no daylight-saving shifts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import itertools
import json
import math
import re
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import Connection, Engine

from libs.common.database import write_transaction
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.ingest.core import catalog
from services.ingest.core.columns import (
    ARROW_TYPES,
    RESERVED_PREFIX,
    Column,
    ColumnType,
    arrow_to_column_type,
    check_name,
    sql_type,
)
from services.ingest.core.loader import WriteMode, _insert, sql_table
from services.ingest.core.sources import csv_bytes

DEFAULT_CHUNK_ROWS = 10_000
FEATURE_VIEW = "feature_view"
TRAINING_SET = "training_set"
WRITE_LOCK_TIMEOUT_S = 60

# Feature spec ---------------------------------------------------------------------------------


class CastType(enum.StrEnum):
    INT64 = "int64"
    FLOAT64 = "float64"
    STRING = "string"
    BOOL = "bool"


class DatePart(enum.StrEnum):
    DAY_OF_WEEK = "day_of_week"  # Monday 0 .. Sunday 6
    HOUR = "hour"  # 0 .. 23
    WEEKEND = "weekend"  # Saturday or Sunday
    WEEK_OF_YEAR = "week_of_year"  # ISO 8601 week, 1 .. 53
    MONTH = "month"  # 1 .. 12


class AggregateFunction(enum.StrEnum):
    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"


_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smhdw])$")
_WINDOW_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_TRANSFORMS = ("column", "discretize", "one_hot", "log", "ratio", "date_part", "aggregate")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Discretize(_Spec):
    """Labelled buckets: labels[0] below edges[0], labels[i] for edges[i-1] <= x < edges[i], the last
    label from edges[-1] up."""

    input: str
    edges: list[float] = Field(min_length=1)
    labels: list[str]

    @field_validator("edges")
    @classmethod
    def _increasing(cls, edges: list[float]) -> list[float]:
        if not all(math.isfinite(edge) for edge in edges):
            raise ValueError("edges must be finite numbers")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("edges must increase strictly")
        return edges

    @field_validator("labels")
    @classmethod
    def _one_more_label_than_edges(cls, labels: list[str], info: Any) -> list[str]:
        edges = info.data.get("edges")
        if edges is not None and len(labels) != len(edges) + 1:
            raise ValueError(
                f"give one label more than edges ({len(edges) + 1} for {len(edges)} edges): "
                "below the first edge, between each pair, from the last edge up"
            )
        return labels


class OneHot(_Spec):
    """One 0/1 column per category, named <feature>_<category>; nulls and unknown values are 0 in all."""

    input: str
    categories: list[str | bool | int] = Field(min_length=1)


class LogTransform(_Spec):
    """Natural log of (input + offset); null where that is not positive."""

    input: str
    offset: float = 0.0

    @field_validator("offset")
    @classmethod
    def _finite(cls, offset: float) -> float:
        if not math.isfinite(offset):
            raise ValueError("must be a finite number")
        return offset


class Ratio(_Spec):
    """numerator / denominator as float64; null where the denominator is 0 or either is null."""

    numerator: str
    denominator: str


class DatePartSpec(_Spec):
    input: str
    part: DatePart


class Aggregate(_Spec):
    """Per entity, over the window (t - window, t] ending at each row's event time t: the row itself
    and rows at the same time are in, a row exactly one window earlier is out."""

    input: str
    function: AggregateFunction
    window: str

    @field_validator("window")
    @classmethod
    def _window(cls, window: str) -> str:
        if not _WINDOW.fullmatch(window):
            raise ValueError("must be a whole number and a unit: s, m, h, d or w (e.g. 30d, 12h)")
        return window

    @property
    def window_delta(self) -> timedelta:
        match = _WINDOW.fullmatch(self.window)
        assert match is not None
        return timedelta(**{_WINDOW_UNITS[match.group(2)]: int(match.group(1))})


class Feature(_Spec):
    """One feature: a name and exactly one transform; `cast` and then `fill` apply to its result."""

    name: str
    description: str = ""
    column: str | None = None
    discretize: Discretize | None = None
    one_hot: OneHot | None = None
    log: LogTransform | None = None
    ratio: Ratio | None = None
    date_part: DatePartSpec | None = None
    aggregate: Aggregate | None = None
    cast: CastType | None = None
    fill: bool | int | float | str | None = None

    @model_validator(mode="after")
    def _one_transform(self) -> Feature:
        given = [name for name in _TRANSFORMS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one transform of {', '.join(_TRANSFORMS)}"
                + (f" (found {', '.join(given)})" if given else "")
            )
        if self.one_hot is not None and (self.cast is not None or self.fill is not None):
            raise ValueError("one_hot columns are 0/1: cast and fill do not apply")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in _TRANSFORMS if getattr(self, name) is not None)

    def inputs(self) -> list[tuple[str, str]]:
        """(field path within the feature, column name) of every input."""
        if self.column is not None:
            return [("column", self.column)]
        if self.ratio is not None:
            return [("ratio.numerator", self.ratio.numerator), ("ratio.denominator", self.ratio.denominator)]
        spec = getattr(self, self.kind)
        return [(f"{self.kind}.input", spec.input)]

    def transform_text(self) -> str:
        """The transform as written in the spec (without name and description)."""
        written = self.model_dump(mode="json", exclude={"name", "description"}, exclude_none=True)
        return json.dumps(written, separators=(", ", ": "))


class Join(_Spec):
    """A key lookup: adds `columns` of `table` to each source row whose `on` columns match (left join).
    The `on` columns must identify at most one row of `table`."""

    table: str
    on: list[str] = Field(min_length=1)
    columns: list[str] = Field(min_length=1)

    @field_validator("on", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class FeatureView(_Spec):
    name: str
    source: str
    entity: str
    event_time: str | None = None
    description: str = ""
    joins: list[Join] = Field(default_factory=list)
    features: list[Feature] = Field(min_length=1)


class FeatureSpec(_Spec):
    views: list[FeatureView] = Field(min_length=1)


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so categories like yes, no, on, off stay text."""


_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_UNION_MEMBERS = {"str", "int", "float", "bool"}


def _field_path(location: Sequence[int | str]) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_MEMBERS:
            path += f".{part}" if path else part
    return path


def parse_feature_spec(text: str) -> FeatureSpec:
    """The spec from YAML; errors name the field, e.g. views[0].features[2].discretize.edges."""
    if not text.strip():
        raise InvalidArgument("must hold a feature spec (YAML with a views: list)", field="spec_yaml")
    try:
        document = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"not valid YAML: {exc}"[:500], field="spec_yaml") from None
    if not isinstance(document, dict):
        raise InvalidArgument("must be a YAML mapping with a views: list", field="spec_yaml")
    try:
        spec = FeatureSpec.model_validate(document)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        if len(errors) > 1:
            more = "; ".join(
                f"{_field_path(e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}" for e in errors[1:6]
            )
            message += f" (and {len(errors) - 1} more: {more})"
        raise InvalidArgument(message, field=_field_path(first["loc"]) or "spec_yaml") from None
    check_spec_names(spec)
    return spec


def _check_table_name(name: str, field_name: str) -> str:
    check_name(name, field_name)
    if name.lower().startswith(RESERVED_PREFIX):
        raise InvalidArgument(f"names starting with {RESERVED_PREFIX} are reserved", field=field_name)
    return name


def check_spec_names(spec: FeatureSpec) -> None:
    """Every table and column name of the spec is a plain identifier (they end up in SQL)."""
    seen: set[str] = set()
    for i, view in enumerate(spec.views):
        path = f"views[{i}]"
        _check_table_name(view.name, f"{path}.name")
        if view.name.lower() in seen:
            raise InvalidArgument(f"view '{view.name}' is declared twice", field=f"{path}.name")
        seen.add(view.name.lower())
        check_name(view.source, f"{path}.source")
        check_name(view.entity, f"{path}.entity")
        if view.event_time is not None:
            check_name(view.event_time, f"{path}.event_time")
        for k, join in enumerate(view.joins):
            check_name(join.table, f"{path}.joins[{k}].table")
            for m, name in enumerate(join.on):
                check_name(name, f"{path}.joins[{k}].on[{m}]")
            for m, name in enumerate(join.columns):
                check_name(name, f"{path}.joins[{k}].columns[{m}]")
        for j, feature in enumerate(view.features):
            check_name(feature.name, f"{path}.features[{j}].name")
            for where, name in feature.inputs():
                check_name(name, f"{path}.features[{j}].{where}")


# Transforms: pure functions on Arrow arrays ---------------------------------------------------


def _null(arrow_type: pa.DataType) -> pa.Scalar:
    return pa.scalar(None, type=arrow_type)


def _bad_values(before: pa.Array, after: pa.Array) -> tuple[int, str]:
    """How many present values became null, and the first of them as text."""
    lost = pc.and_(pc.is_valid(before), pc.is_null(after))
    count = int(pc.sum(pc.cast(lost, pa.int64())).as_py() or 0)
    if not count:
        return 0, ""
    return count, str(before.filter(lost)[0].as_py())[:80]


def cast_values(values: pa.Array, to: ColumnType) -> tuple[pa.Array, int, str]:
    """Cast to int64, float64, string or bool. Values that do not fit become null; returns the result,
    how many did not fit, and the first of them. Floats cast to int64 are truncated toward zero."""
    target = ARROW_TYPES[to]
    if values.type == target:
        return values, 0, ""
    source = arrow_to_column_type(values.type)
    if to is ColumnType.STRING:
        if source is ColumnType.BOOL:
            return pc.if_else(values, "true", "false"), 0, ""
        return pc.cast(values, pa.string()), 0, ""
    if source is ColumnType.STRING:
        return _parse_texts(values, to)
    if to is ColumnType.BOOL:
        return pc.not_equal(values, pa.scalar(0, values.type)), 0, ""
    if to is ColumnType.FLOAT64 or source is ColumnType.BOOL:
        return pc.cast(values, target), 0, ""
    # float64 -> int64: finite values within range, truncated toward zero
    fits = pc.and_(pc.is_finite(values), pc.less(pc.abs(values), 2.0**63))
    result = pc.cast(pc.trunc(pc.if_else(fits, values, _null(values.type))), pa.int64())
    return (result, *_bad_values(values, result))


def _parse_texts(values: pa.Array, to: ColumnType) -> tuple[pa.Array, int, str]:
    trimmed = pc.utf8_trim_whitespace(values)
    trimmed = pc.if_else(pc.equal(trimmed, ""), _null(pa.string()), trimmed)
    if to is ColumnType.BOOL:
        lowered = pc.utf8_lower(trimmed)
        true = pc.is_in(lowered, pa.array(["true", "1", "yes"]))
        false = pc.is_in(lowered, pa.array(["false", "0", "no"]))
        result = pc.if_else(true, True, pc.if_else(false, False, _null(pa.bool_())))
        return (result, *_bad_values(trimmed, result))
    try:
        result = pc.cast(trimmed, ARROW_TYPES[to])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        parsed: list[int | float | None] = []
        for text in trimmed.to_pylist():
            parsed.append(None if text is None else _parse_number(text, to))
        result = pa.array(parsed, type=ARROW_TYPES[to])
    if to is ColumnType.FLOAT64:
        result = pc.if_else(pc.is_finite(result), result, _null(pa.float64()))
    return (result, *_bad_values(trimmed, result))


def _parse_number(text: str, to: ColumnType) -> int | float | None:
    try:
        return int(text) if to is ColumnType.INT64 else float(text)
    except ValueError:
        return None


def fill_value(value: bool | int | float | str, column_type: ColumnType) -> Any:
    """The spec's fill value as a value of the column's type; ValueError when it does not fit."""
    if column_type is ColumnType.BOOL:
        if not isinstance(value, bool):
            raise ValueError("must be true or false for a bool feature")
        return value
    if column_type is ColumnType.INT64:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number for an int64 feature")
        return value
    if column_type is ColumnType.FLOAT64:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError("must be a finite number for a float64 feature")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"must be text for a {column_type.value} feature (quote it)")
    if column_type is ColumnType.TIMESTAMP:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if column_type is ColumnType.DATE:
        return date.fromisoformat(value)
    if column_type is ColumnType.JSON:
        json.loads(value)
    return value


def fill_nulls(values: pa.Array, value: bool | int | float | str, column_type: ColumnType) -> pa.Array:
    return pc.fill_null(values, pa.scalar(fill_value(value, column_type), type=ARROW_TYPES[column_type]))


def discretize(values: pa.Array, edges: Sequence[float], labels: Sequence[str]) -> pa.Array:
    """Bucket i holds edges[i-1] <= x < edges[i] (left-closed); nulls and NaN stay null."""
    numbers = pc.cast(values, pa.float64())
    numbers = pc.if_else(pc.is_nan(numbers), _null(pa.float64()), numbers)
    index: pa.Array | None = None
    for edge in edges:
        above = pc.cast(pc.greater_equal(numbers, edge), pa.int64())
        index = above if index is None else pc.add(index, above)
    assert index is not None
    return pc.take(pa.array(list(labels), type=pa.string()), index)


def category_text(value: str | bool | int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def one_hot_column_name(feature: str, category: str | bool | int) -> str:
    """<feature>_<category>, with characters that cannot be in a column name replaced by _."""
    return f"{feature}_{re.sub(r'[^A-Za-z0-9_]', '_', category_text(category))}"


def one_hot(values: pa.Array, categories: Sequence[str | bool | int]) -> list[pa.Array]:
    """One int64 0/1 array per category; a null or an unknown value is 0 in every one."""
    texts = pc.if_else(values, "true", "false") if pa.types.is_boolean(values.type) else values
    texts = pc.cast(texts, pa.string())
    return [
        pc.fill_null(pc.cast(pc.equal(texts, category_text(category)), pa.int64()), 0)
        for category in categories
    ]


def log_transform(values: pa.Array, offset: float = 0.0) -> pa.Array:
    """ln(x + offset); null where x + offset <= 0 or x is null."""
    shifted = pc.add(pc.cast(values, pa.float64()), offset)
    positive = pc.greater(shifted, 0.0)
    return pc.if_else(positive, pc.ln(pc.if_else(positive, shifted, 1.0)), _null(pa.float64()))


def ratio(numerator: pa.Array, denominator: pa.Array) -> pa.Array:
    """numerator / denominator as float64; null where the denominator is 0 or either is null."""
    top = pc.cast(numerator, pa.float64())
    bottom = pc.cast(denominator, pa.float64())
    zero = pc.equal(bottom, 0.0)
    return pc.if_else(zero, _null(pa.float64()), pc.divide(top, pc.if_else(zero, 1.0, bottom)))


def date_part(values: pa.Array, part: DatePart) -> pa.Array:
    """A calendar part of a UTC timestamp (or date): computed in UTC, whatever the server's zone."""
    moments = pc.cast(values, pa.timestamp("us", tz="UTC"))
    if part is DatePart.DAY_OF_WEEK:
        return pc.cast(pc.day_of_week(moments), pa.int64())
    if part is DatePart.HOUR:
        return pc.cast(pc.hour(moments), pa.int64())
    if part is DatePart.WEEKEND:
        return pc.greater_equal(pc.day_of_week(moments), 5)
    if part is DatePart.WEEK_OF_YEAR:
        return pc.cast(pc.iso_week(moments), pa.int64())
    return pc.cast(pc.month(moments), pa.int64())


_NO_ENTITY = object()


class WindowAggregator:
    """count, sum or mean of one input per entity over the window (t - window, t] ending at each row's
    event time t. Rows arrive ordered by (entity, time), chunk after chunk; only the current entity's
    rows inside the window are kept, in a deque. Rows at the same (entity, time) get the same value (all
    of them are in each other's window), so a chunk must not split such a group. Nulls are skipped:
    count counts present values; sum and mean are null when the window holds none."""

    def __init__(self, function: AggregateFunction, window: timedelta, output: ColumnType) -> None:
        self._function = function
        self._window_us = window // timedelta(microseconds=1)
        self._output = ARROW_TYPES[output]
        self._entity: Any = _NO_ENTITY
        self._rows: deque[tuple[int, int | float]] = deque()
        self._sum: int | float = 0

    def update(self, entities: Sequence[Any], times_us: Sequence[int], values: Sequence[Any]) -> pa.Array:
        out: list[int | float | None] = [None] * len(entities)
        rows, i, n = self._rows, 0, len(entities)
        while i < n:
            entity, moment = entities[i], times_us[i]
            if entity != self._entity:
                self._entity = entity
                rows.clear()
                self._sum = 0
            j = i
            while j < n and entities[j] == entity and times_us[j] == moment:
                value = values[j]
                if value is not None:
                    if self._function is AggregateFunction.COUNT:
                        number: int | float = 1
                    else:
                        number = int(value) if isinstance(value, bool) else value
                    rows.append((moment, number))
                    self._sum += number
                j += 1
            oldest_out = moment - self._window_us
            while rows and rows[0][0] <= oldest_out:
                self._sum -= rows.popleft()[1]
            if not rows:
                self._sum = 0  # no drift carried into the next rows
            if self._function is AggregateFunction.COUNT:
                result: int | float | None = len(rows)
            elif not rows:
                result = None
            elif self._function is AggregateFunction.SUM:
                result = self._sum
            else:
                result = self._sum / len(rows)
            out[i:j] = [result] * (j - i)
            i = j
        return pa.array(out, type=self._output)


# Catalog access -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _TableInfo:
    name: str
    kind: str
    columns: dict[str, ColumnType]
    key: list[str]
    event_time: str
    fingerprint: str
    row_count: int
    state: str  # what identifies the content: changes whenever the table is written
    planned: bool = False  # declared by the spec being applied, not yet in the catalog


def _table_info(connection: Connection, name: str) -> _TableInfo | None:
    row = connection.execute(sa.select(catalog.tables).where(catalog.tables.c.name == name)).first()
    if row is None:
        return None
    updated = row.updated_at.isoformat() if row.updated_at is not None else ""
    return _TableInfo(
        name=row.name,
        kind=row.kind,
        columns={c["name"]: ColumnType(c["type"]) for c in json.loads(row.columns)},
        key=list(json.loads(row.key_columns)),
        event_time=row.event_time_column,
        fingerprint=row.fingerprint,
        row_count=int(row.row_count),
        state=f"{row.fingerprint}:{row.row_count}:{updated}",
    )


def _column_type(table: _TableInfo, name: str, field_name: str) -> ColumnType:
    if name not in table.columns:
        raise InvalidArgument(
            f"'{name}' is not a column of '{table.name}' ({', '.join(table.columns)})", field=field_name
        )
    return table.columns[name]


def _table_clause(info: _TableInfo) -> sa.TableClause:
    return sa.table(info.name, *(sa.column(name, sql_type(t)) for name, t in info.columns.items()))


def _lock(connection: Connection, name: str) -> None:
    """Serialize writers of the same thing (SQLite's BEGIN IMMEDIATE already serializes all writers)."""
    if connection.dialect.name == "postgresql":
        digest = hashlib.sha256(f"liveloop:ingest:{name}".encode()).digest()
        connection.execute(
            sa.select(sa.func.pg_advisory_xact_lock(int.from_bytes(digest[:8], "big", signed=True)))
        )


def _staging_name() -> str:
    return f"{RESERVED_PREFIX}staging_{uuid.uuid4().hex[:12]}"


def _replace_table(connection: Connection, staging: str, target: str) -> None:
    preparer = connection.dialect.identifier_preparer
    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {preparer.quote(target)}")
    connection.exec_driver_sql(f"ALTER TABLE {preparer.quote(staging)} RENAME TO {preparer.quote(target)}")


def _record_table(
    connection: Connection,
    name: str,
    *,
    kind: str,
    columns: Sequence[Column],
    key: Sequence[str],
    event_time: str,
    fingerprint: str,
) -> int:
    rows = int(connection.scalar(sa.select(sa.func.count()).select_from(sa.table(name))) or 0)
    record = {
        "kind": kind,
        "key_columns": json.dumps(list(key)),
        "event_time_column": event_time,
        "columns": json.dumps([{"name": c.name, "type": c.type.value} for c in columns]),
        "fingerprint": fingerprint,
        "row_count": rows,
        "updated_at": datetime.now(UTC),
    }
    exists = connection.execute(sa.select(catalog.tables.c.name).where(catalog.tables.c.name == name)).first()
    if exists is None:
        connection.execute(sa.insert(catalog.tables).values(name=name, **record))
    else:
        connection.execute(sa.update(catalog.tables).where(catalog.tables.c.name == name).values(**record))
    return rows


def _stream(
    connection: Connection,
    query: sa.Select[Any],
    schema: pa.Schema,
    chunk_rows: int,
    stack: contextlib.ExitStack,
) -> Iterator[pa.Table]:
    """The query's rows as Arrow tables of at most chunk_rows rows (a server-side cursor where the
    driver has one); the cursor closes with `stack`, even when the reader stops early."""
    result = connection.execute(query, execution_options={"stream_results": True, "yield_per": chunk_rows})
    stack.callback(result.close)

    def generate() -> Iterator[pa.Table]:
        for partition in result.partitions(chunk_rows):
            columns = list(zip(*partition, strict=True))
            arrays = [pa.array(list(values), type=f.type) for values, f in zip(columns, schema, strict=True)]
            yield pa.Table.from_arrays(arrays, schema=schema)

    return generate()


def _whole_groups(chunks: Iterator[pa.Table], entity: str, event_time: str) -> Iterator[pa.Table]:
    """Re-cut chunks so that rows of the same (entity, event time) never straddle two chunks."""
    carry: pa.Table | None = None
    for chunk in chunks:
        table = chunk if carry is None else pa.concat_tables([carry, chunk])
        entities = table.column(entity).to_pylist()
        times = table.column(event_time).to_pylist()
        cut = len(entities) - 1
        while cut > 0 and entities[cut - 1] == entities[-1] and times[cut - 1] == times[-1]:
            cut -= 1
        if cut == 0:
            carry = table
            continue
        yield table.slice(0, cut)
        carry = table.slice(cut)
    if carry is not None and carry.num_rows:
        yield carry


# Planning: the spec checked against the catalog -------------------------------------------------


@dataclass(frozen=True)
class FeatureOutput:
    """One column of a feature view."""

    name: str
    type: ColumnType
    transform: str
    description: str


@dataclass(frozen=True)
class _Step:
    path: str
    spec: Feature
    outputs: list[FeatureOutput]
    value_type: ColumnType  # the transform's own result type, before cast


@dataclass(frozen=True)
class _ViewPlan:
    index: int
    path: str
    spec: FeatureView
    source: _TableInfo
    joins: list[_TableInfo]
    source_reads: list[str]
    join_reads: list[list[str]]
    steps: list[_Step]
    columns: list[Column]
    definition: str
    definition_hash: str
    fingerprint: str

    @property
    def features(self) -> list[FeatureOutput]:
        return [output for step in self.steps for output in step.outputs]


_NUMERIC = (ColumnType.INT64, ColumnType.FLOAT64)
_TEMPORAL = (ColumnType.TIMESTAMP, ColumnType.DATE)
_CATEGORICAL = (ColumnType.STRING, ColumnType.INT64, ColumnType.BOOL)
_CASTABLE = (ColumnType.INT64, ColumnType.FLOAT64, ColumnType.BOOL, ColumnType.STRING)


def _expect(column_type: ColumnType, allowed: Sequence[ColumnType], what: str, field_name: str) -> None:
    if column_type not in allowed:
        raise InvalidArgument(
            f"{what} must be {' or '.join(t.value for t in allowed)}, not {column_type.value}",
            field=field_name,
        )


def _plan_feature(view: FeatureView, feature: Feature, path: str, available: dict[str, ColumnType]) -> _Step:
    types: dict[str, ColumnType] = {}
    for where, name in feature.inputs():
        if name not in available:
            raise InvalidArgument(
                f"'{name}' is neither a column of the source (or its joins) nor an earlier feature",
                field=f"{path}.{where}",
            )
        types[where] = available[name]
    kind = feature.kind
    transform = feature.transform_text()
    if kind == "column":
        value_type = types["column"]
    elif kind == "discretize":
        _expect(types["discretize.input"], _NUMERIC, "the input", f"{path}.discretize.input")
        value_type = ColumnType.STRING
    elif kind == "one_hot":
        assert feature.one_hot is not None
        _expect(types["one_hot.input"], _CATEGORICAL, "the input", f"{path}.one_hot.input")
        outputs = [
            FeatureOutput(
                one_hot_column_name(feature.name, category),
                ColumnType.INT64,
                f"{transform} [{category_text(category)}]",
                feature.description,
            )
            for category in feature.one_hot.categories
        ]
        for k, output in enumerate(outputs):
            check_name(output.name, f"{path}.one_hot.categories[{k}]")
        return _Step(path, feature, outputs, ColumnType.INT64)
    elif kind == "log":
        _expect(types["log.input"], _NUMERIC, "the input", f"{path}.log.input")
        value_type = ColumnType.FLOAT64
    elif kind == "ratio":
        _expect(types["ratio.numerator"], _NUMERIC, "the numerator", f"{path}.ratio.numerator")
        _expect(types["ratio.denominator"], _NUMERIC, "the denominator", f"{path}.ratio.denominator")
        value_type = ColumnType.FLOAT64
    elif kind == "date_part":
        assert feature.date_part is not None
        _expect(types["date_part.input"], _TEMPORAL, "the input", f"{path}.date_part.input")
        value_type = ColumnType.BOOL if feature.date_part.part is DatePart.WEEKEND else ColumnType.INT64
    else:
        assert feature.aggregate is not None
        if view.event_time is None:
            raise InvalidArgument(
                "an aggregation over a time window needs the view's event_time", field=f"{path}.aggregate"
            )
        input_type = types["aggregate.input"]
        function = feature.aggregate.function
        if function is AggregateFunction.COUNT:
            value_type = ColumnType.INT64
        else:
            _expect(input_type, (*_NUMERIC, ColumnType.BOOL), "the input", f"{path}.aggregate.input")
            floating = function is AggregateFunction.MEAN or input_type is ColumnType.FLOAT64
            value_type = ColumnType.FLOAT64 if floating else ColumnType.INT64
    output_type = value_type
    if feature.cast is not None:
        output_type = ColumnType(feature.cast.value)
        if output_type is not ColumnType.STRING and value_type not in _CASTABLE:
            raise InvalidArgument(
                f"a {value_type.value} cannot be cast to {output_type.value} (only to string)",
                field=f"{path}.cast",
            )
    if feature.fill is not None:
        try:
            fill_value(feature.fill, output_type)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field=f"{path}.fill") from None
    return _Step(
        path, feature, [FeatureOutput(feature.name, output_type, transform, feature.description)], value_type
    )


def _definition(view: FeatureView) -> tuple[str, str]:
    """(the view's definition as YAML, its hash)."""
    canonical = json.dumps(view.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    written = yaml.safe_dump(view.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    return written, hashlib.sha256(canonical.encode()).hexdigest()


def _table(connection: Connection, name: str, planned: dict[str, _ViewPlan], field_name: str) -> _TableInfo:
    if name in planned:
        plan = planned[name]
        return _TableInfo(
            name=name,
            kind=FEATURE_VIEW,
            columns={c.name: c.type for c in plan.columns},
            key=[plan.spec.entity],
            event_time=plan.spec.event_time or "",
            fingerprint=plan.fingerprint,
            row_count=0,
            state=plan.fingerprint,
            planned=True,
        )
    info = _table_info(connection, name)
    if info is None:
        raise NotFound(f"no table '{name}' in the offline store", field=field_name)
    return info


def _check_join_unique(connection: Connection, join: Join, table: _TableInfo, field_name: str) -> None:
    key_is_unique = set(table.key) <= set(join.on) and bool(table.key)
    if key_is_unique and (table.kind != FEATURE_VIEW or not table.event_time):
        return
    if table.planned:
        raise InvalidArgument(
            f"'{table.name}' has several rows per {table.key[0]} (it has an event_time); "
            "join a table with one row per key",
            field=field_name,
        )
    clause = _table_clause(table)
    keys = [clause.c[name] for name in join.on]
    duplicate = connection.execute(
        sa.select(*keys)
        .where(*(key.is_not(None) for key in keys))
        .group_by(*keys)
        .having(sa.func.count() > 1)
        .limit(1)
    ).first()
    if duplicate is not None:
        raise InvalidArgument(
            f"{tuple(duplicate) if len(keys) > 1 else duplicate[0]!r} matches several rows of "
            f"'{table.name}'; the join columns must identify one row",
            field=field_name,
        )


def _plan_view(
    connection: Connection, index: int, view: FeatureView, planned: dict[str, _ViewPlan]
) -> _ViewPlan:
    path = f"views[{index}]"
    if view.source == view.name:
        raise InvalidArgument("a view cannot read its own table", field=f"{path}.source")
    existing = _table_info(connection, view.name)
    if existing is not None and existing.kind != FEATURE_VIEW:
        raise FailedPrecondition(
            f"'{view.name}' is a {existing.kind} table; a feature view of that name would replace it",
            field=f"{path}.name",
        )
    source = _table(connection, view.source, planned, f"{path}.source")
    entity_type = _column_type(source, view.entity, f"{path}.entity")
    _expect(entity_type, (ColumnType.INT64, ColumnType.STRING), "the entity", f"{path}.entity")
    available: dict[str, ColumnType] = dict(source.columns)
    origin: dict[str, int] = dict.fromkeys(source.columns, -1)  # -1: the source, k: joins[k]
    if view.event_time is not None:
        time_type = _column_type(source, view.event_time, f"{path}.event_time")
        _expect(time_type, (ColumnType.TIMESTAMP,), "the event time", f"{path}.event_time")
    joins: list[_TableInfo] = []
    for k, join in enumerate(view.joins):
        jpath = f"{path}.joins[{k}]"
        if join.table == view.name:
            raise InvalidArgument("a view cannot read its own table", field=f"{jpath}.table")
        table = _table(connection, join.table, planned, f"{jpath}.table")
        for m, name in enumerate(join.on):
            left = _column_type(source, name, f"{jpath}.on[{m}]")
            right = _column_type(table, name, f"{jpath}.on[{m}]")
            if left is not right:
                raise InvalidArgument(
                    f"'{name}' is {left.value} in '{source.name}' but {right.value} in '{table.name}'",
                    field=f"{jpath}.on[{m}]",
                )
        for m, name in enumerate(join.columns):
            column_type = _column_type(table, name, f"{jpath}.columns[{m}]")
            if name in available:
                raise InvalidArgument(
                    f"'{name}' is already a column of the view's inputs; joined columns need new names",
                    field=f"{jpath}.columns[{m}]",
                )
            available[name] = column_type
            origin[name] = k
        _check_join_unique(connection, join, table, f"{jpath}.on")
        joins.append(table)
    fixed = [view.entity, *([view.event_time] if view.event_time else [])]
    taken = {name.lower() for name in fixed}
    steps: list[_Step] = []
    reads: set[str] = set(fixed)
    joined_reads: set[str] = set()
    for j, feature in enumerate(view.features):
        fpath = f"{path}.features[{j}]"
        for _where, name in feature.inputs():
            if name in origin:  # a column of the source or of a join, unless an earlier feature
                (reads if origin[name] < 0 else joined_reads).add(name)
        step = _plan_feature(view, feature, fpath, available)
        for output in step.outputs:
            if output.name.lower().startswith(RESERVED_PREFIX):
                raise InvalidArgument(
                    f"names starting with {RESERVED_PREFIX} are reserved", field=f"{fpath}.name"
                )
            if output.name.lower() in taken:
                raise InvalidArgument(
                    f"'{output.name}' is already a column of the view (names are case-insensitive)",
                    field=f"{fpath}.name",
                )
            taken.add(output.name.lower())
            available[output.name] = output.type
            origin.pop(output.name, None)  # later features reading this name get the feature
        steps.append(step)
    source_reads = fixed + [name for name in source.columns if name in reads and name not in fixed]
    join_reads = [[name for name in join.columns if name in joined_reads] for join in view.joins]
    columns = [Column(view.entity, entity_type, key=view.event_time is None)]
    if view.event_time:
        columns.append(Column(view.event_time, ColumnType.TIMESTAMP))
    columns += [Column(output.name, output.type) for step in steps for output in step.outputs]
    definition, definition_hash = _definition(view)
    fingerprint = hashlib.sha256(
        json.dumps([definition_hash, source.state, *(table.state for table in joins)]).encode()
    ).hexdigest()
    return _ViewPlan(
        index,
        path,
        view,
        source,
        joins,
        source_reads,
        join_reads,
        steps,
        columns,
        definition,
        definition_hash,
        fingerprint,
    )


def _plan(connection: Connection, spec: FeatureSpec) -> list[_ViewPlan]:
    planned: dict[str, _ViewPlan] = {}
    for index, view in enumerate(spec.views):
        planned[view.name] = _plan_view(connection, index, view, planned)
    return list(planned.values())


# Applying a spec -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureViewResult:
    name: str
    source_table: str
    entity_keys: list[str]
    event_time_column: str
    features: list[FeatureOutput]
    version: int
    changed: bool  # the definition is new or differs from the applied one
    rebuilt: bool  # the view's table was (or, in a dry run, would be) written
    row_count: int


@dataclass(frozen=True)
class ApplyFeaturesResult:
    views: list[FeatureViewResult]
    warnings: list[str]
    dry_run: bool


@dataclass
class _Findings:
    warnings: list[str] = field(default_factory=list)
    cast_failures: dict[str, tuple[int, str, ColumnType]] = field(default_factory=dict)

    def cast_failed(self, path: str, count: int, example: str, to: ColumnType) -> None:
        before, first, _ = self.cast_failures.get(path, (0, example, to))
        self.cast_failures[path] = (before + count, first or example, to)

    def flush(self) -> None:
        for path, (count, example, to) in self.cast_failures.items():
            self.warnings.append(
                f"{path}: {count} values could not be cast to {to.value} and are null (first: {example!r})"
            )
        self.cast_failures.clear()


def apply_features(
    engine: Engine, spec: FeatureSpec, *, dry_run: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> ApplyFeaturesResult:
    """Validate the spec against the offline store and (unless dry_run) rebuild every view whose
    definition or inputs changed, all in one transaction."""
    check_spec_names(spec)
    findings = _Findings()
    if dry_run:
        with engine.connect() as connection:
            plans = _plan(connection, spec)
            results = [_view_result(connection, plan) for plan in plans]
        return ApplyFeaturesResult(results, findings.warnings, dry_run=True)
    with write_transaction(engine, lock_timeout_s=WRITE_LOCK_TIMEOUT_S) as connection:
        _lock(connection, "feature_views")
        plans = _plan(connection, spec)
        results = []
        for plan in plans:
            result = _view_result(connection, plan)
            if result.rebuilt:
                _build_view(connection, plan, chunk_rows, findings)
                rows = _record_table(
                    connection,
                    plan.spec.name,
                    kind=FEATURE_VIEW,
                    columns=plan.columns,
                    key=[plan.spec.entity],
                    event_time=plan.spec.event_time or "",
                    fingerprint=plan.fingerprint,
                )
                result = dataclasses.replace(result, row_count=rows)
            if result.changed:
                _record_definition(connection, plan, result.version)
            results.append(result)
    return ApplyFeaturesResult(results, findings.warnings, dry_run=False)


def _view_result(connection: Connection, plan: _ViewPlan) -> FeatureViewResult:
    stored = connection.execute(
        sa.select(catalog.feature_views.c.version, catalog.feature_views.c.definition_hash).where(
            catalog.feature_views.c.name == plan.spec.name
        )
    ).first()
    if stored is None:
        version, changed = 1, True
    elif stored.definition_hash != plan.definition_hash:
        version, changed = int(stored.version) + 1, True
    else:
        version, changed = int(stored.version), False
    existing = _table_info(connection, plan.spec.name)
    rebuilt = existing is None or existing.fingerprint != plan.fingerprint
    return FeatureViewResult(
        name=plan.spec.name,
        source_table=plan.spec.source,
        entity_keys=[plan.spec.entity],
        event_time_column=plan.spec.event_time or "",
        features=plan.features,
        version=version,
        changed=changed,
        rebuilt=rebuilt,
        row_count=existing.row_count if existing is not None else 0,
    )


def _record_definition(connection: Connection, plan: _ViewPlan, version: int) -> None:
    values = {
        "version": version,
        "definition_hash": plan.definition_hash,
        "definition": plan.definition,
        "source_table": plan.spec.source,
        "applied_at": datetime.now(UTC),
    }
    table = catalog.feature_views
    if version == 1:
        connection.execute(sa.insert(table).values(name=plan.spec.name, **values))
    else:
        connection.execute(sa.update(table).where(table.c.name == plan.spec.name).values(**values))


def _source_query(plan: _ViewPlan) -> tuple[sa.Select[Any], pa.Schema, sa.Select[Any]]:
    """(the rows to read, ordered by entity and time; their Arrow schema; a count of the rows skipped
    for a missing entity or event time)."""
    view = plan.spec
    source = _table_clause(plan.source).alias("s")
    selected: list[Any] = [source.c[name].label(name) for name in plan.source_reads]
    fields = [pa.field(name, ARROW_TYPES[plan.source.columns[name]]) for name in plan.source_reads]
    joined: sa.FromClause = source
    for k, (join, table, reads) in enumerate(zip(view.joins, plan.joins, plan.join_reads, strict=True)):
        other = _table_clause(table).alias(f"j{k}")
        joined = joined.outerjoin(other, sa.and_(*(source.c[name] == other.c[name] for name in join.on)))
        selected += [other.c[name].label(name) for name in reads]
        fields += [pa.field(name, ARROW_TYPES[table.columns[name]]) for name in reads]
    present = [source.c[view.entity].is_not(None)]
    order = [source.c[view.entity]]
    if view.event_time:
        present.append(source.c[view.event_time].is_not(None))
        order.append(source.c[view.event_time])
    query = sa.select(*selected).select_from(joined).where(*present).order_by(*order)
    skipped = sa.select(sa.func.count()).select_from(source).where(sa.not_(sa.and_(*present)))
    return query, pa.schema(fields), skipped


def _build_view(connection: Connection, plan: _ViewPlan, chunk_rows: int, findings: _Findings) -> None:
    view = plan.spec
    staging = _staging_name()
    table = sql_table(staging, plan.columns)
    table.create(connection)
    query, schema, skipped = _source_query(plan)
    missing = int(connection.scalar(skipped) or 0)
    if missing:
        what = "entity or event time" if view.event_time else "entity"
        findings.warnings.append(
            f"{plan.path}: {missing} rows of '{view.source}' have no {what} and were skipped"
        )
    aggregators = {
        step.path: WindowAggregator(
            step.spec.aggregate.function, step.spec.aggregate.window_delta, step.value_type
        )
        for step in plan.steps
        if step.spec.aggregate is not None
    }
    with contextlib.ExitStack() as stack:  # closed before the swap: SQLite cannot drop what is read
        chunks = _stream(connection, query, schema, chunk_rows, stack)
        if view.event_time and aggregators:
            chunks = _whole_groups(chunks, view.entity, view.event_time)
        previous: Any = _NO_ENTITY
        for chunk in chunks:
            if not view.event_time:
                previous = _check_one_row_per_entity(plan, chunk.column(view.entity).to_pylist(), previous)
            batch = _compute(plan, chunk, aggregators, findings)
            _insert(connection, table, batch, plan.columns)
    findings.flush()
    _replace_table(connection, staging, view.name)


def _check_one_row_per_entity(plan: _ViewPlan, entities: list[Any], previous: Any) -> Any:
    for entity in entities:
        if entity == previous:
            raise FailedPrecondition(
                f"entity {entity!r} has several rows in '{plan.spec.source}'; a view without event_time "
                "needs one row per entity (name the event_time column to keep a history)",
                field=f"{plan.path}.entity",
            )
        previous = entity
    return previous


def _compute(
    plan: _ViewPlan, chunk: pa.Table, aggregators: dict[str, WindowAggregator], findings: _Findings
) -> pa.RecordBatch:
    view = plan.spec
    values: dict[str, pa.Array] = {name: chunk.column(name).combine_chunks() for name in chunk.column_names}
    entities: list[Any] = []
    times_us: list[int] = []
    if aggregators:
        assert view.event_time is not None
        entities = values[view.entity].to_pylist()
        times_us = pc.cast(values[view.event_time], pa.int64()).to_pylist()
    for step in plan.steps:
        feature = step.spec
        if feature.one_hot is not None:
            arrays = one_hot(values[feature.one_hot.input], feature.one_hot.categories)
            for output, array in zip(step.outputs, arrays, strict=True):
                values[output.name] = array
            continue
        result = _transform(feature, values, aggregators.get(step.path), entities, times_us)
        if feature.cast is not None:
            result, failed, example = cast_values(result, ColumnType(feature.cast.value))
            if failed:
                findings.cast_failed(step.path, failed, example, ColumnType(feature.cast.value))
        output = step.outputs[0]
        if feature.fill is not None:
            result = fill_nulls(result, feature.fill, output.type)
        values[output.name] = result
    arrays = []
    for column in plan.columns:
        array = values[column.name]
        target = ARROW_TYPES[column.type]
        arrays.append(array if array.type == target else pc.cast(array, target))
    return pa.RecordBatch.from_arrays(arrays, names=[c.name for c in plan.columns])


def _transform(
    feature: Feature,
    values: dict[str, pa.Array],
    aggregator: WindowAggregator | None,
    entities: list[Any],
    times_us: list[int],
) -> pa.Array:
    if feature.column is not None:
        return values[feature.column]
    if feature.discretize is not None:
        spec = feature.discretize
        return discretize(values[spec.input], spec.edges, spec.labels)
    if feature.log is not None:
        return log_transform(values[feature.log.input], feature.log.offset)
    if feature.ratio is not None:
        return ratio(values[feature.ratio.numerator], values[feature.ratio.denominator])
    if feature.date_part is not None:
        return date_part(values[feature.date_part.input], feature.date_part.part)
    assert feature.aggregate is not None
    assert aggregator is not None
    return aggregator.update(entities, times_us, values[feature.aggregate.input].to_pylist())


# Training sets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSetResult:
    table: str
    row_count: int  # rows written by this build
    columns: list[Column]
    fingerprint: str
    label_mean: float
    rows_missing_features: int  # rows where some view had no row at or before the label's time


@dataclass
class _Selection:
    view: _TableInfo
    features: list[str] = field(default_factory=list)


def _definition_of(connection: Connection, view: str) -> FeatureView | None:
    text = connection.scalar(
        sa.select(catalog.feature_views.c.definition).where(catalog.feature_views.c.name == view)
    )
    if text is None:
        return None
    return FeatureView.model_validate(yaml.load(text, Loader=_SpecLoader))


def _select_features(connection: Connection, requested: Sequence[str]) -> list[_Selection]:
    """The views and feature columns named by "view.feature" or "view"; none named means every
    feature of every feature view."""
    if not requested:
        names = connection.scalars(
            sa.select(catalog.tables.c.name)
            .where(catalog.tables.c.kind == FEATURE_VIEW)
            .order_by(catalog.tables.c.name)
        ).all()
        if not names:
            raise FailedPrecondition(
                "the offline store has no feature views; apply a feature spec", field="features"
            )
        requested = list(names)
    parsed = []
    for i, text in enumerate(requested):  # every name is checked before any is looked up
        path = f"features[{i}]"
        view_name, _, feature = text.partition(".")
        check_name(view_name, path)
        if feature:
            check_name(feature, path)
        parsed.append((path, view_name, feature))
    selections: dict[str, _Selection] = {}
    for path, view_name, feature in parsed:
        if view_name not in selections:
            info = _table_info(connection, view_name)
            if info is None:
                raise NotFound(f"no feature view '{view_name}' in the offline store", field=path)
            if info.kind != FEATURE_VIEW:
                raise InvalidArgument(f"'{view_name}' is a {info.kind} table, not a feature view", field=path)
            selections[view_name] = _Selection(info)
        selection = selections[view_name]
        own = [
            name
            for name in selection.view.columns
            if name not in (*selection.view.key, selection.view.event_time)
        ]
        if not feature:
            chosen = own
        elif feature in own:
            chosen = [feature]
        else:
            chosen = _one_hot_columns(connection, view_name, feature, own)
            if not chosen:
                raise NotFound(
                    f"view '{view_name}' has no feature '{feature}' ({', '.join(own)})", field=path
                )
        selection.features += [name for name in chosen if name not in selection.features]
    return list(selections.values())


def _one_hot_columns(connection: Connection, view: str, feature: str, own: list[str]) -> list[str]:
    definition = _definition_of(connection, view)
    for declared in definition.features if definition is not None else []:
        if declared.name == feature and declared.one_hot is not None:
            names = [one_hot_column_name(feature, c) for c in declared.one_hot.categories]
            return [name for name in names if name in own]
    return []


def _sort_key(connection: Connection, column: Any, column_type: ColumnType) -> Any:
    """Text sorts by code point on both backends (PostgreSQL's "C" collation, SQLite's default), the
    order Python compares strings in: the merge below relies on it."""
    if column_type is ColumnType.STRING and connection.dialect.name == "postgresql":
        return sa.collate(column, "C")
    return column


def _sampled(seed: int, entity: Any, moment: datetime, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}\x1f{entity!r}\x1f{moment.isoformat()}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


class _PointInTime:
    """The newest row of one feature view at or before each label, for labels that arrive ordered by
    (entity, time) while the view's rows stream in the same order: one pending row, one current row."""

    def __init__(self, rows: Iterator[Any], timed: bool) -> None:
        self._rows = rows
        self._timed = timed
        self._pending: Any = next(rows, None)
        self._current: Any = None

    def at(self, entity: Any, moment: datetime) -> Any:
        if self._current is not None and self._current[0] != entity:
            self._current = None
        while self._pending is not None:
            key = self._pending[0]
            if key < entity or (key == entity and (not self._timed or self._pending[1] <= moment)):
                if key == entity:
                    self._current = self._pending
                self._pending = next(self._rows, None)
            else:
                break
        return self._current


def _rows(
    connection: Connection, query: sa.Select[Any], chunk_rows: int, stack: contextlib.ExitStack
) -> Iterator[Any]:
    result = connection.execute(query, execution_options={"stream_results": True, "yield_per": chunk_rows})
    stack.callback(result.close)

    def generate() -> Iterator[Any]:
        for partition in result.partitions(chunk_rows):
            yield from partition

    return generate()


@dataclass(frozen=True)
class _TrainingPlan:
    labels: _TableInfo
    entity: str
    entity_type: ColumnType
    time_column: str
    label_column: str
    label_type: ColumnType
    selections: list[_Selection]
    columns: list[Column]
    carried: list[tuple[str, ColumnType]] = field(default_factory=list)  # label-table columns copied


def _plan_training_set(
    connection: Connection,
    output_table: str,
    label_table: str,
    label_column: str,
    features: Sequence[str],
    event_time_column: str,
    carried_columns: Sequence[str] = (),
) -> _TrainingPlan:
    labels = _table_info(connection, label_table)
    if labels is None:
        raise NotFound(f"no table '{label_table}' in the offline store", field="label_table")
    label_type = _column_type(labels, label_column, "label_column")
    time_column = event_time_column or labels.event_time
    if not time_column:
        raise InvalidArgument(
            f"'{label_table}' has no event-time column; name the one to join at", field="event_time_column"
        )
    time_type = _column_type(labels, time_column, "event_time_column")
    _expect(time_type, (ColumnType.TIMESTAMP,), "the event time", "event_time_column")
    selections = _select_features(connection, features)
    entities = {s.view.key[0] for s in selections if s.view.key}
    if len(entities) != 1:
        raise InvalidArgument(
            f"the feature views have different entities ({', '.join(sorted(entities))}); "
            "a training set joins views of one entity",
            field="features",
        )
    entity = entities.pop()
    entity_type = _column_type(labels, entity, "label_table")
    for selection in selections:
        view_entity_type = selection.view.columns[entity]
        if view_entity_type is not entity_type:
            raise InvalidArgument(
                f"'{entity}' is {entity_type.value} in '{label_table}' but {view_entity_type.value} in "
                f"'{selection.view.name}'",
                field="label_table",
            )
        if selection.view.name == output_table:
            raise InvalidArgument("must not be one of the feature views", field="output_table")
    if label_column in (entity, time_column):
        raise InvalidArgument(f"'{label_column}' is the entity or the event time", field="label_column")
    columns = [
        Column(entity, entity_type),
        Column(time_column, ColumnType.TIMESTAMP),
        Column(label_column, label_type),
    ]
    carried: list[tuple[str, ColumnType]] = []
    for index, name in enumerate(carried_columns):
        check_name(name, f"label_table_columns[{index}]")
        if name in (entity, time_column, label_column):
            raise InvalidArgument(
                f"'{name}' is the entity, the event time or the label, copied already",
                field=f"label_table_columns[{index}]",
            )
        carried.append((name, _column_type(labels, name, f"label_table_columns[{index}]")))
        columns.append(Column(name, carried[-1][1]))
    for selection in selections:
        for name in selection.features:
            output = f"{selection.view.name}__{name}"
            check_name(output, "features")
            columns.append(Column(output, selection.view.columns[name]))
    names = [c.name.lower() for c in columns]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"the training set's column names repeat: {names}", field="features")
    return _TrainingPlan(
        labels, entity, entity_type, time_column, label_column, label_type, selections, columns, carried
    )


def _label_query(connection: Connection, plan: _TrainingPlan) -> sa.Select[Any]:
    """(entity, time, label, carried...) ordered by entity and time; the label and the carried
    columns break ties, for a stable output."""
    table = _table_clause(plan.labels)
    entity, moment, label = table.c[plan.entity], table.c[plan.time_column], table.c[plan.label_column]
    carried = [table.c[name] for name, _ in plan.carried]
    return (
        sa.select(entity, moment, label, *carried)
        .where(entity.is_not(None), moment.is_not(None))
        .order_by(
            _sort_key(connection, entity, plan.entity_type),
            moment,
            _sort_key(connection, label, plan.label_type).asc().nulls_first(),
            *(
                _sort_key(connection, column, column_type).asc().nulls_first()
                for column, (_, column_type) in zip(carried, plan.carried, strict=True)
            ),
        )
    )


def _view_query(connection: Connection, plan: _TrainingPlan, selection: _Selection) -> sa.Select[Any]:
    """(entity, [time], features...) ordered like the labels; of rows at the same time the last one in
    this order wins, so the features break ties and the result does not depend on storage order."""
    view = selection.view
    table = _table_clause(view)
    keys = [table.c[plan.entity], *([table.c[view.event_time]] if view.event_time else [])]
    values = [table.c[name] for name in selection.features]
    order = [_sort_key(connection, keys[0], plan.entity_type), *keys[1:]]
    order += [
        _sort_key(connection, column, view.columns[name]).asc().nulls_first()
        for column, name in zip(values, selection.features, strict=True)
    ]
    return sa.select(*keys, *values).where(*(key.is_not(None) for key in keys)).order_by(*order)


def _training_rows(
    connection: Connection,
    plan: _TrainingPlan,
    *,
    sample_fraction: float,
    seed: int,
    chunk_rows: int,
    stack: contextlib.ExitStack,
) -> Iterator[tuple[list[list[Any]], int]]:
    """Chunks of output rows (entity, time, label, carried..., features...) and how many of them miss
    a view."""
    labels = _rows(connection, _label_query(connection, plan), chunk_rows, stack)
    cursors = []
    for selection in plan.selections:
        rows = _rows(connection, _view_query(connection, plan, selection), chunk_rows, stack)
        timed = bool(selection.view.event_time)
        cursors.append((_PointInTime(rows, timed), 1 + timed, len(selection.features)))
    sampling = 0.0 < sample_fraction < 1.0
    chunk: list[list[Any]] = []
    missing = 0
    for entity, moment, label, *carried in labels:
        if sampling and not _sampled(seed, entity, moment, sample_fraction):
            continue
        out = [entity, moment, label, *carried]
        complete = True
        for cursor, width, count in cursors:
            found = cursor.at(entity, moment)
            if found is None:
                complete = False
                out += [None] * count
            else:
                out += list(found[width:])
        missing += not complete
        chunk.append(out)
        if len(chunk) >= chunk_rows:
            yield chunk, missing
            chunk, missing = [], 0
    if chunk:
        yield chunk, missing


def build_training_set(
    engine: Engine,
    *,
    output_table: str,
    label_table: str,
    label_column: str,
    features: Sequence[str] = (),
    event_time_column: str = "",
    mode: WriteMode = WriteMode.REPLACE,
    sample_fraction: float = 0.0,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    carried_columns: Sequence[str] = (),
) -> TrainingSetResult:
    """Labels joined with point-in-time-correct features: for each label row and each view, the view's
    newest row of the same entity with event time <= the label's event time (a view without an event
    time is valid at all times). Columns: entity, event time, label, the carried_columns of the label
    table as they are (e.g. the offer shown), then <view>__<feature>. A
    sample_fraction in (0, 1) keeps the label rows whose seeded hash of (entity, time) falls below it."""
    _check_table_name(output_table, "output_table")
    check_name(label_table, "label_table")
    check_name(label_column, "label_column")
    if event_time_column:
        check_name(event_time_column, "event_time_column")
    if not 0.0 <= sample_fraction <= 1.0:
        raise InvalidArgument("must be between 0 and 1 (0 means all rows)", field="sample_fraction")
    if output_table == label_table:
        raise InvalidArgument("must differ from label_table", field="output_table")
    with write_transaction(engine, lock_timeout_s=WRITE_LOCK_TIMEOUT_S) as connection:
        _lock(connection, f"table:{output_table}")
        plan = _plan_training_set(
            connection, output_table, label_table, label_column, features, event_time_column, carried_columns
        )
        columns = plan.columns
        existing = _table_info(connection, output_table)
        if existing is not None and existing.kind != TRAINING_SET:
            raise FailedPrecondition(
                f"'{output_table}' is a {existing.kind} table; a training set would replace it",
                field="output_table",
            )
        append = mode is WriteMode.APPEND and existing is not None
        if existing is not None and append:
            if list(existing.columns.items()) != [(c.name, c.type) for c in columns]:
                raise FailedPrecondition(
                    f"'{output_table}' has other columns ({', '.join(existing.columns)}); use mode replace",
                    field="output_table",
                )
            table = sql_table(output_table, columns)
        else:
            table = sql_table(_staging_name(), columns)
            table.create(connection)
        digest = hashlib.sha256(json.dumps([(c.name, c.type.value) for c in columns]).encode())
        numeric_label = plan.label_type in (ColumnType.INT64, ColumnType.FLOAT64, ColumnType.BOOL)
        written = missing = labelled = 0
        label_sum = 0.0
        with contextlib.ExitStack() as stack:
            for rows, chunk_missing in _training_rows(
                connection,
                plan,
                sample_fraction=sample_fraction,
                seed=seed,
                chunk_rows=chunk_rows,
                stack=stack,
            ):
                batch = _to_batch(rows, columns)
                _insert(connection, table, batch, columns)
                digest.update(csv_bytes(batch))
                written += batch.num_rows
                missing += chunk_missing
                if numeric_label:
                    present = [float(row[2]) for row in rows if row[2] is not None]
                    label_sum += sum(present)
                    labelled += len(present)
        # every cursor is closed before the swap (SQLite cannot drop a table a statement still reads)
        fingerprint = digest.hexdigest()
        if existing is not None and append:
            fingerprint = hashlib.sha256(f"{existing.fingerprint}:{fingerprint}".encode()).hexdigest()
        else:
            _replace_table(connection, table.name, output_table)
        _record_table(
            connection,
            output_table,
            kind=TRAINING_SET,
            columns=columns,
            key=[plan.entity],  # not unique; recorded so consumers (the trainer) never take it as a feature
            event_time=plan.time_column,
            fingerprint=fingerprint,
        )
    return TrainingSetResult(
        output_table, written, columns, fingerprint, label_sum / labelled if labelled else 0.0, missing
    )


def _to_batch(rows: Sequence[Sequence[Any]], columns: Sequence[Column]) -> pa.RecordBatch:
    arrays = [pa.array([row[i] for row in rows], type=ARROW_TYPES[c.type]) for i, c in enumerate(columns)]
    return pa.RecordBatch.from_arrays(arrays, names=[c.name for c in columns])
