"""Column types of the offline store, inference from raw text, and per-row validation.

Raw values arrive as text (CSV, JSON lines) or typed (Parquet, SQL). Each chunk is converted with
one vectorised cast per column; only when that cast fails does a slow per-value pass find the bad
rows, so clean data pays nothing for row-level reporting.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from libs.common.database import UtcDateTime
from libs.common.errors import InvalidArgument

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
RESERVED_PREFIX = "ll_"  # liveloop's own bookkeeping tables


class ColumnType(enum.StrEnum):
    STRING = "string"
    INT64 = "int64"
    FLOAT64 = "float64"
    BOOL = "bool"
    TIMESTAMP = "timestamp"
    DATE = "date"
    JSON = "json"


ARROW_TYPES: dict[ColumnType, pa.DataType] = {
    ColumnType.STRING: pa.string(),
    ColumnType.INT64: pa.int64(),
    ColumnType.FLOAT64: pa.float64(),
    ColumnType.BOOL: pa.bool_(),
    ColumnType.TIMESTAMP: pa.timestamp("us", tz="UTC"),
    ColumnType.DATE: pa.date32(),
    ColumnType.JSON: pa.string(),
}


def sql_type(column_type: ColumnType) -> Any:
    types: dict[ColumnType, Any] = {
        ColumnType.STRING: sa.Text(),
        ColumnType.INT64: sa.BigInteger(),
        ColumnType.FLOAT64: sa.Float(precision=53),
        ColumnType.BOOL: sa.Boolean(),
        ColumnType.TIMESTAMP: UtcDateTime(),
        ColumnType.DATE: sa.Date(),
        ColumnType.JSON: sa.Text(),
    }
    return types[column_type]


def check_name(name: str, field: str) -> str:
    """Table and column names are checked, never interpolated unchecked into SQL."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"'{name[:80]}' is not a valid name: use letters, digits and _, starting with a letter or _, "
            "at most 63 characters",
            field=field,
        )
    return name


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    key: bool = False


_INT = re.compile(r"^[+-]?\d{1,18}$")
_BOOL_WORDS = {"true": True, "false": False}


def infer_type(values: pa.Array) -> ColumnType:
    """The narrowest type every non-null sample value fits."""
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        return arrow_to_column_type(values.type)
    present = pc.drop_null(values)
    present = present.filter(pc.not_equal(pc.utf8_trim_whitespace(present), ""))
    if len(present) == 0:
        return ColumnType.STRING
    texts = present.to_pylist()
    if all(_INT.match(text.strip()) for text in texts):
        return ColumnType.INT64
    for column_type in (ColumnType.FLOAT64, ColumnType.DATE, ColumnType.TIMESTAMP):
        try:
            cast(present, column_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            continue
        return column_type
    if all(text.strip().lower() in _BOOL_WORDS for text in texts):
        return ColumnType.BOOL
    return ColumnType.STRING


def arrow_to_column_type(arrow_type: pa.DataType) -> ColumnType:
    if pa.types.is_boolean(arrow_type):
        return ColumnType.BOOL
    if pa.types.is_integer(arrow_type):
        return ColumnType.INT64
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return ColumnType.FLOAT64
    if pa.types.is_timestamp(arrow_type):
        return ColumnType.TIMESTAMP
    if pa.types.is_date(arrow_type):
        return ColumnType.DATE
    return ColumnType.STRING


def cast(values: pa.Array, column_type: ColumnType) -> pa.Array:
    """Vectorised conversion; raises on any value that does not fit."""
    target = ARROW_TYPES[column_type]
    if values.type == target:
        return values
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        trimmed = pc.utf8_trim_whitespace(values)
        trimmed = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, values.type), trimmed)
        if column_type is ColumnType.STRING:
            return values
        if column_type is ColumnType.JSON:
            for text in trimmed.to_pylist():
                if text is not None:
                    json.loads(text)
            return trimmed
        if column_type is ColumnType.BOOL:
            lowered = pc.utf8_lower(trimmed)
            if not pc.all(
                pc.or_kleene(pc.is_in(lowered, pa.array(["true", "false"])), pc.is_null(lowered))
            ).as_py():
                raise ValueError("not a boolean")
            return pc.equal(lowered, "true")
        if column_type is ColumnType.TIMESTAMP:
            return _parse_timestamps(trimmed)
        if column_type is ColumnType.FLOAT64:
            result = pc.cast(trimmed, pa.float64())
            if not pc.all(pc.or_kleene(pc.is_finite(result), pc.is_null(result))).as_py():
                raise ValueError("not a finite number")
            return result
        return pc.cast(trimmed, target)
    if column_type is ColumnType.STRING:
        return pc.cast(values, pa.string())
    if column_type is ColumnType.TIMESTAMP and pa.types.is_timestamp(values.type):
        if values.type.tz is None:
            return pc.cast(pc.assume_timezone(values, "UTC"), target)
        return pc.cast(values, target)
    return pc.cast(values, target)


def _parse_timestamps(texts: pa.Array) -> pa.Array:
    """ISO 8601 with or without an offset; naive values are UTC."""
    # Vectorised when a chunk is uniform (all with an offset, or all naive); per value otherwise.
    try:
        return pc.cast(texts, ARROW_TYPES[ColumnType.TIMESTAMP])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    try:
        return pc.assume_timezone(pc.cast(texts, pa.timestamp("us")), "UTC")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    parsed = []
    for text in texts.to_pylist():
        parsed.append(None if text is None else _parse_one_timestamp(text))
    return pa.array(parsed, type=ARROW_TYPES[ColumnType.TIMESTAMP])


def _parse_one_timestamp(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def convert_value(value: object, column_type: ColumnType) -> object:
    """One value, for the slow path that names a bad row; raises ValueError with the reason."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    text = str(value).strip()
    if text == "" and column_type is not ColumnType.STRING:
        return None
    if column_type is ColumnType.STRING:
        return value
    if column_type is ColumnType.INT64:
        if not _INT.match(text):
            raise ValueError(f"'{text[:40]}' is not a whole number")
        return int(text)
    if column_type is ColumnType.FLOAT64:
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(f"'{text[:40]}' is not a finite number")
        return number
    if column_type is ColumnType.BOOL:
        if text.lower() not in _BOOL_WORDS:
            raise ValueError(f"'{text[:40]}' is not true or false")
        return _BOOL_WORDS[text.lower()]
    if column_type is ColumnType.TIMESTAMP:
        try:
            return _parse_one_timestamp(text)
        except ValueError:
            raise ValueError(f"'{text[:40]}' is not an ISO 8601 timestamp") from None
    if column_type is ColumnType.DATE:
        return date.fromisoformat(text)
    json.loads(text)
    return text
