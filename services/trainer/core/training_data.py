"""Training sets in the offline store: checked before a job is queued, then read into numpy columns.

A training set is a table ingest wrote (listed in its `ll_tables` catalog, with column types, keys
and event-time column) or the result of a SELECT over the offline store. Rows are read in a fixed
order (every selected column, ascending), so the same data always gives the same arrays, the same
split and, with the same seed, the same model; the fingerprint is a hash of exactly those arrays.

An evaluation table (Compare's `evaluation_table`) is a table of the same store, checked and read
the same way (same column types, same value conversions), but whole: no split, no fixed order.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from libs.common.errors import InvalidArgument, NotFound
from libs.common.model_artifacts import category_label
from libs.common.offline_store import CATALOG_SQL_TYPES, CatalogEntry, catalog_entry, quote, reading
from libs.common.training_spec import COLUMN_PATTERN, Encoding, FeatureSpec, TrainingJobSpec

ColumnKind = Literal["numeric", "bool", "string", "time", "other"]
SAMPLE_ROWS = 1000
READ_CHUNK_ROWS = 50_000

_CATALOG_KINDS: dict[str, ColumnKind] = {
    "int64": "numeric",
    "float64": "numeric",
    "bool": "bool",
    "string": "string",
    "timestamp": "time",
    "date": "time",
    "json": "other",
}


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    kind: ColumnKind
    dtype: str  # as the catalog names it ("int64", "string", ...) or as inferred from a sample


@dataclass(frozen=True)
class ResolvedFeature:
    """A model input with its encoding decided (standardize, one_hot or offer)."""

    name: str
    encoding: Encoding
    dtype: str


@dataclass(frozen=True)
class TrainingSetPlan:
    """What a spec will read, once the offline store has been checked against it."""

    columns: dict[str, ColumnInfo]
    features: tuple[ResolvedFeature, ...]
    label: str
    split_column: str  # the time or group column of the split, or ""
    row_count: int
    positives: int
    in_catalog: bool

    @property
    def offer_feature(self) -> str:
        return next((f.name for f in self.features if f.encoding is Encoding.OFFER), "")


@dataclass(frozen=True)
class TrainingData:
    """The rows of a training set, column by column, in their fixed order."""

    labels: np.ndarray  # float64 0/1
    columns: dict[str, np.ndarray]  # numeric and bool: float64 with NaN for missing; others: object
    split_values: np.ndarray | None  # time as float seconds, or group labels (object)
    fingerprint: str

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])


def _source(connection: Connection, spec: TrainingJobSpec) -> str:
    if spec.training_set:
        return quote(connection, spec.training_set)
    return f"({spec.query.strip().rstrip(';')}) AS ll_source"


def _catalog_infos(entry: CatalogEntry) -> dict[str, ColumnInfo]:
    return {
        c["name"]: ColumnInfo(c["name"], _CATALOG_KINDS.get(c["type"], "other"), c["type"])
        for c in entry.columns
    }


def _kind_of_values(values: Sequence[Any]) -> tuple[ColumnKind, str]:
    present = [v for v in values if v is not None]
    if not present:
        return "numeric", "float64"  # nothing to go on; all-missing numbers stand in as the mean
    if all(isinstance(v, bool) for v in present):
        return "bool", "bool"
    if all(isinstance(v, int | float | Decimal) and not isinstance(v, bool) for v in present):
        integral = all(isinstance(v, int) for v in present)
        return "numeric", "int64" if integral else "float64"
    if all(isinstance(v, datetime | date) for v in present):
        return "time", "timestamp"
    if all(isinstance(v, str) for v in present):
        return "string", "string"
    return "other", "json"


def _sampled_kinds(connection: Connection, source: str) -> dict[str, ColumnInfo] | None:
    """Column types inferred from the first rows of a source; None when it has no rows."""
    result = connection.execute(sa.text(f"SELECT * FROM {source} LIMIT {SAMPLE_ROWS}"))
    names = list(result.keys())
    rows = result.fetchall()
    if not rows:
        return None
    columns = {}
    for index, name in enumerate(names):
        kind, dtype = _kind_of_values([row[index] for row in rows])
        columns[name] = ColumnInfo(name, kind, dtype)
    return columns


def _sampled_columns(connection: Connection, spec: TrainingJobSpec) -> dict[str, ColumnInfo]:
    columns = _sampled_kinds(connection, _source(connection, spec))
    if columns is None:  # nothing to infer column types from, and nothing to train on
        raise InvalidArgument(
            "the training set is empty", field="spec.training_set" if spec.training_set else "spec.query"
        )
    return columns


def _describe_source(
    connection: Connection, spec: TrainingJobSpec
) -> tuple[dict[str, ColumnInfo], set[str], bool]:
    """Columns of the source, the columns never used as features (keys, event time), in_catalog."""
    if spec.training_set:
        entry = catalog_entry(connection, spec.training_set)
        if entry is not None:
            infos = _catalog_infos(entry)
            excluded = set(entry.key_columns)
            if entry.event_time_column:
                excluded.add(entry.event_time_column)
            return infos, excluded, True
        if not sa.inspect(connection).has_table(spec.training_set):
            raise NotFound(f"no table '{spec.training_set}' in the offline store", field="spec.training_set")
    try:
        infos = _sampled_columns(connection, spec)
    except sa.exc.DBAPIError as exc:
        if isinstance(exc, sa.exc.OperationalError) and spec.training_set:
            raise
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        raise InvalidArgument(f"the query fails: {reason}", field="spec.query") from None
    return infos, set(), False


def _resolve_features(
    spec: TrainingJobSpec, columns: dict[str, ColumnInfo], excluded: set[str]
) -> list[tuple[str, ResolvedFeature]]:
    """(field of the feature in the spec, feature) pairs, in model order."""
    requested: list[tuple[str, FeatureSpec]]
    if spec.features:
        requested = [(f"spec.features[{i}]", feature) for i, feature in enumerate(spec.features)]
    else:
        skip = excluded | {spec.label, spec.split.time_column, spec.split.group_column}
        requested = [
            ("spec.features", FeatureSpec(name=name))
            for name, info in columns.items()
            if name not in skip and info.kind in ("numeric", "bool", "string")
        ]
        if not requested:
            raise InvalidArgument("the training set has no column to use as a feature", field="spec.features")
    resolved = []
    for where, feature in requested:
        info = columns.get(feature.name)
        if info is None:
            raise InvalidArgument(
                f"no column '{feature.name}' in the training set (it has: {', '.join(columns)})",
                field=f"{where}.name",
            )
        encoding = feature.encoding
        if encoding is Encoding.AUTO:
            if info.kind in ("numeric", "bool"):
                encoding = Encoding.STANDARDIZE
            elif info.kind == "string" and not spec.features:
                encoding = Encoding.ONE_HOT  # every column was asked for: strings are categories
            else:
                raise InvalidArgument(
                    f"'{feature.name}' is a {info.dtype} column, not numeric: give it encoding one_hot",
                    field=f"{where}.encoding",
                )
        if encoding is Encoding.STANDARDIZE and info.kind not in ("numeric", "bool"):
            raise InvalidArgument(
                f"'{feature.name}' is a {info.dtype} column and cannot be standardized; use one_hot",
                field=f"{where}.encoding",
            )
        if encoding in (Encoding.ONE_HOT, Encoding.OFFER) and (
            info.kind not in ("string", "bool", "numeric") or info.dtype == "float64"
        ):
            raise InvalidArgument(
                f"'{feature.name}' is a {info.dtype} column; one-hot takes string, integer or bool columns",
                field=f"{where}.encoding",
            )
        resolved.append((where, ResolvedFeature(feature.name, encoding, info.dtype)))
    return resolved


def _label_counts(connection: Connection, source: str, info: ColumnInfo) -> tuple[int, int, int, int]:
    """(rows, rows without a label (NULL or NaN), positives, negatives) of a numeric or bool label."""
    label = quote(connection, info.name)
    value = f"(CASE WHEN {label} THEN 1 ELSE 0 END)" if info.kind == "bool" else label
    postgres = connection.dialect.name == "postgresql"
    # SQLite stores NaN as NULL; PostgreSQL keeps NaN, which compares equal to itself there.
    nan = (
        f"SUM(CASE WHEN {label} = 'NaN'::float8 THEN 1 ELSE 0 END)"
        if postgres and info.kind != "bool"
        else "0"
    )
    row = connection.execute(
        sa.text(
            f"SELECT COUNT(*), COUNT({label}), {nan}, "
            f"SUM(CASE WHEN {value} = 1 THEN 1 ELSE 0 END), "
            f"SUM(CASE WHEN {value} = 0 THEN 1 ELSE 0 END) "
            f"FROM {source}"
        )
    ).one()
    rows, present, nans = int(row[0]), int(row[1]), int(row[2] or 0)
    return rows, rows - present + nans, int(row[3] or 0), int(row[4] or 0)


def _check_label(connection: Connection, spec: TrainingJobSpec, info: ColumnInfo) -> tuple[int, int]:
    """(rows, positives), or InvalidArgument naming spec.label / spec.training_set."""
    if info.kind not in ("numeric", "bool"):
        raise InvalidArgument(
            f"'{spec.label}' is a {info.dtype} column; the label must be 0/1 or true/false",
            field="spec.label",
        )
    rows, missing, positives, negatives = _label_counts(connection, _source(connection, spec), info)
    where = "spec.training_set" if spec.training_set else "spec.query"
    if rows == 0:
        raise InvalidArgument("the training set is empty", field=where)
    if missing:
        raise InvalidArgument(
            f"'{spec.label}' is NaN or missing in {missing} of {rows} rows", field="spec.label"
        )
    others = rows - positives - negatives
    if others:
        raise InvalidArgument(
            f"'{spec.label}' must be 0 or 1 (or true/false); {others} rows hold other values",
            field="spec.label",
        )
    if positives == 0 or negatives == 0:
        only = "1" if negatives == 0 else "0"
        raise InvalidArgument(
            f"'{spec.label}' has one class only (every row is {only}); a classifier needs both",
            field="spec.label",
        )
    return rows, positives


def inspect_training_set(engine: Engine, spec: TrainingJobSpec) -> TrainingSetPlan:
    """Check a spec against the offline store before any work; InvalidArgument names the field."""
    with reading(engine) as connection:
        columns, excluded, in_catalog = _describe_source(connection, spec)
        label = columns.get(spec.label)
        if label is None:
            raise InvalidArgument(
                f"no column '{spec.label}' in the training set (it has: {', '.join(columns)})",
                field="spec.label",
            )
        resolved = _resolve_features(spec, columns, excluded)
        split_column = spec.split.time_column or spec.split.group_column
        if split_column:
            where = "spec.split.time_column" if spec.split.time_column else "spec.split.group_column"
            split_info = columns.get(split_column)
            if split_info is None:
                raise InvalidArgument(f"no column '{split_column}' in the training set", field=where)
            if spec.split.time_column and not (
                split_info.kind in ("time", "numeric")
                or (split_info.kind == "string" and _holds_times(connection, spec, split_column))
            ):
                raise InvalidArgument(
                    f"'{split_column}' is a {split_info.dtype} column, not a time", field=where
                )
        rows, positives = _check_label(connection, spec, label)
        for where, feature in resolved:
            if feature.encoding in (Encoding.ONE_HOT, Encoding.OFFER):
                quoted = quote(connection, feature.name)
                distinct = int(
                    connection.scalar(
                        sa.text(f"SELECT COUNT(DISTINCT {quoted}) FROM {_source(connection, spec)}")
                    )
                    or 0
                )
                if distinct > spec.max_categories:
                    raise InvalidArgument(
                        f"'{feature.name}' has {distinct} categories, more than max_categories "
                        f"({spec.max_categories})",
                        field=f"{where}.name" if where != "spec.features" else "spec.features",
                    )
    return TrainingSetPlan(
        columns=columns,
        features=tuple(feature for _, feature in resolved),
        label=spec.label,
        split_column=split_column,
        row_count=rows,
        positives=positives,
        in_catalog=in_catalog,
    )


def _holds_times(connection: Connection, spec: TrainingJobSpec, column: str) -> bool:
    """Whether a text column holds ISO-8601 times (how SQLite returns a query's timestamps)."""
    sample = connection.execute(
        sa.text(
            f"SELECT {quote(connection, column)} FROM {_source(connection, spec)} "
            f"WHERE {quote(connection, column)} IS NOT NULL LIMIT {SAMPLE_ROWS}"
        )
    ).scalars()
    seen = False
    for value in sample:
        try:
            datetime.fromisoformat(str(value))
        except ValueError:
            return False
        seen = True
    return seen


def _as_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, date):
        return float(value.toordinal() * 86400)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            try:
                return datetime.fromisoformat(value).timestamp()
            except ValueError:
                return math.nan
    return float(value)


def _catalog_table(table: str, columns: Mapping[str, ColumnInfo]) -> sa.TableClause:
    """A catalogued table with its columns typed as ingest wrote them."""
    return sa.table(
        table,
        *(sa.column(name, CATALOG_SQL_TYPES.get(info.dtype, sa.Text())) for name, info in columns.items()),
    )


def _typed_source(connection: Connection, spec: TrainingJobSpec, plan: TrainingSetPlan) -> Any:
    if spec.training_set and plan.in_catalog:
        return _catalog_table(spec.training_set, plan.columns)
    return sa.text(
        spec.query.strip().rstrip(";") if spec.query else f"SELECT * FROM {_source(connection, spec)}"
    )


def read_training_set(engine: Engine, spec: TrainingJobSpec, plan: TrainingSetPlan) -> TrainingData:
    """Every row of the training set (label, features, split column), in the fixed order."""
    names = [plan.label, *(f.name for f in plan.features)]
    if plan.split_column and plan.split_column not in names:
        names.append(plan.split_column)
    with reading(engine) as connection:
        source = _typed_source(connection, spec, plan)
        if isinstance(source, sa.TextClause):
            subquery = source.columns(*(sa.column(name) for name in plan.columns)).subquery("ll_source")
        else:
            subquery = source
        selected = [subquery.c[name] for name in names]
        query = sa.select(*selected).order_by(*(column.asc().nulls_first() for column in selected))
        values: list[list[Any]] = [[] for _ in names]
        result = connection.execution_options(stream_results=True).execute(query)
        for chunk in result.partitions(READ_CHUNK_ROWS):
            for row in chunk:
                for index, value in enumerate(row):
                    values[index].append(value)
    labels = np.array([_as_float(v) for v in values[0]], dtype=np.float64)
    columns: dict[str, np.ndarray] = {}
    digest = hashlib.sha256()
    digest.update(json.dumps(names).encode())
    digest.update(labels.tobytes())
    for offset, feature in enumerate(plan.features, start=1):
        raw = values[offset]
        if feature.encoding is Encoding.STANDARDIZE:
            array = numeric_values(raw)
            digest.update(array.tobytes())
        else:
            array = category_values(raw)
            digest.update("\x1f".join("\x00" if v is None else v for v in array).encode())
        columns[feature.name] = array
    split_values: np.ndarray | None = None
    if plan.split_column:
        raw = values[names.index(plan.split_column)]
        if spec.split.time_column:
            split_values = np.array([_as_float(v) for v in raw], dtype=np.float64)
        else:
            split_values = np.array([category_label(v) or "" for v in raw], dtype=object)
    return TrainingData(labels, columns, split_values, digest.hexdigest())


def numeric_values(values: Iterable[Any]) -> np.ndarray:
    """Raw values of a standardized feature (or of the label): float64, NaN for missing."""
    return np.array([_as_float(v) for v in values], dtype=np.float64)


def category_values(values: Iterable[Any]) -> np.ndarray:
    """Raw values of a one-hot or offer feature: category labels (object), None for missing."""
    return np.array([category_label(v) for v in values], dtype=object)


# Evaluation tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationTablePlan:
    """What Compare reads from an evaluation table, once the table has been checked."""

    table: str
    columns: dict[str, ColumnInfo]
    in_catalog: bool
    label: str
    numeric: tuple[str, ...]  # columns read as numbers: features some version standardizes
    categorical: tuple[str, ...]  # columns read as category labels: one-hot and offer features
    row_count: int
    positives: int


@dataclass(frozen=True)
class EvaluationData:
    """Every row of an evaluation table: the label, and each feature column as its encodings need it."""

    labels: np.ndarray  # float64 0/1
    numbers: dict[str, np.ndarray]  # float64, NaN for missing
    categories: dict[str, np.ndarray]  # category labels (object), None for missing

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    def columns_for(self, features: Iterable[tuple[str, Encoding]]) -> dict[str, np.ndarray]:
        """The raw columns one version's preprocessing encodes, as read_training_set gives them."""
        return {
            name: self.numbers[name] if encoding is Encoding.STANDARDIZE else self.categories[name]
            for name, encoding in features
        }


def _table_columns(connection: Connection, table: str, field: str) -> tuple[dict[str, ColumnInfo], bool]:
    """(columns, in_catalog) of an offline-store table; NotFound, or InvalidArgument when it is empty
    and not in the catalog (nothing to learn its column types from)."""
    entry = catalog_entry(connection, table)
    if entry is not None:
        return _catalog_infos(entry), True
    if not sa.inspect(connection).has_table(table):
        raise NotFound(f"no table '{table}' in the offline store", field=field)
    sampled = _sampled_kinds(connection, quote(connection, table))
    if sampled is None:
        raise InvalidArgument(f"table '{table}' is empty: there are no rows to score", field=field)
    return sampled, False


def inspect_evaluation_table(
    engine: Engine,
    table: str,
    label: str,
    features: Mapping[str, Sequence[ResolvedFeature]],
    *,
    max_rows: int,
    field: str = "evaluation_table",
) -> EvaluationTablePlan:
    """Check that `table` holds the label and every feature (`features`: by who reads them, e.g.
    "version 2") with types their encodings accept, and 1 to `max_rows` rows with a 0/1 label.

    NotFound for an unknown table; InvalidArgument otherwise; both name `field` and say which column.
    A table with one class only passes (AUC is then undefined; the other metrics are not).
    """
    if not re.fullmatch(COLUMN_PATTERN, table):
        raise InvalidArgument(f"'{table[:80]}' is not a table name", field=field)
    with reading(engine) as connection:
        columns, in_catalog = _table_columns(connection, table, field)
        present = ", ".join(columns)
        label_info = columns.get(label)
        if label_info is None:
            raise InvalidArgument(
                f"no label column '{label}' in table '{table}' (it has: {present})", field=field
            )
        if label_info.kind not in ("numeric", "bool"):
            raise InvalidArgument(
                f"the label '{label}' is a {label_info.dtype} column in table '{table}'; "
                "it must be 0/1 or true/false",
                field=field,
            )
        numeric: dict[str, None] = {}
        categorical: dict[str, None] = {}
        for reader, wanted in features.items():
            for feature in wanted:
                info = columns.get(feature.name)
                if info is None:
                    raise InvalidArgument(
                        f"no column '{feature.name}' in table '{table}'; {reader} reads it as a feature "
                        f"(the table has: {present})",
                        field=field,
                    )
                if feature.encoding is Encoding.STANDARDIZE:
                    accepted: tuple[ColumnKind, ...] = ("numeric", "bool")
                    numeric[feature.name] = None
                else:
                    accepted = ("string", "bool", "numeric")
                    categorical[feature.name] = None
                if info.kind not in accepted:
                    raise InvalidArgument(
                        f"column '{feature.name}' of table '{table}' is {info.dtype}; {reader} encodes it "
                        f"with {feature.encoding.value} (trained on {feature.dtype})",
                        field=field,
                    )
        rows, missing, positives, negatives = _label_counts(connection, quote(connection, table), label_info)
    if rows == 0:
        raise InvalidArgument(f"table '{table}' is empty: there are no rows to score", field=field)
    if rows > max_rows:
        raise InvalidArgument(
            f"table '{table}' has {rows:,} rows, more than the {max_rows:,} an evaluation reads; "
            "compare on a sample of it",
            field=field,
        )
    if missing:
        raise InvalidArgument(
            f"the label '{label}' is NaN or missing in {missing} of {rows} rows of table '{table}'",
            field=field,
        )
    others = rows - positives - negatives
    if others:
        raise InvalidArgument(
            f"the label '{label}' must be 0 or 1 (or true/false); {others} rows of table '{table}' hold "
            "other values",
            field=field,
        )
    return EvaluationTablePlan(
        table=table,
        columns=columns,
        in_catalog=in_catalog,
        label=label,
        numeric=tuple(numeric),
        categorical=tuple(categorical),
        row_count=rows,
        positives=positives,
    )


def read_evaluation_table(engine: Engine, plan: EvaluationTablePlan, *, max_rows: int) -> EvaluationData:
    """Every row of the table (at most `max_rows`, should it have grown since it was inspected), with
    the conversions read_training_set applies: same values, same arrays, in the table's own order."""
    names = list(dict.fromkeys([plan.label, *plan.numeric, *plan.categorical]))
    position = {name: index for index, name in enumerate(names)}
    labels: list[np.ndarray] = []
    numbers: dict[str, list[np.ndarray]] = {name: [] for name in plan.numeric}
    categories: dict[str, list[np.ndarray]] = {name: [] for name in plan.categorical}
    with reading(engine) as connection:
        source: Any
        if plan.in_catalog:
            source = _catalog_table(plan.table, plan.columns)
        else:
            text = sa.text(f"SELECT * FROM {quote(connection, plan.table)}")
            source = text.columns(*(sa.column(name) for name in plan.columns)).subquery("ll_source")
        query = sa.select(*(source.c[name] for name in names)).limit(max_rows)
        result = connection.execution_options(stream_results=True).execute(query)
        for chunk in result.partitions(READ_CHUNK_ROWS):
            values = list(zip(*chunk, strict=True))
            labels.append(numeric_values(values[0]))
            for name, parts in numbers.items():
                parts.append(numeric_values(values[position[name]]))
            for name, parts in categories.items():
                parts.append(category_values(values[position[name]]))

    def joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return EvaluationData(
        labels=joined(labels, np.float64),
        numbers={name: joined(parts, np.float64) for name, parts in numbers.items()},
        categories={name: joined(parts, object) for name, parts in categories.items()},
    )
