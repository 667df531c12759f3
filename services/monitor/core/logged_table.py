"""Another system's decision log, ingested into the offline store, read for offline evaluation.

The table is one ingest loaded (CSV or Parquet through `liveloop ingest load`), so its catalog
entry gives the column types. It holds one row per offer shown:

- `offer` (string): the offer shown;
- `slot` (integer): its position, 1 = first;
- `propensity` (number): the logging system's probability of showing that offer at that slot;
  missing, 0 or NaN makes the row unusable for the weight-based estimators (it is counted);
- `reward` (number or bool): what showing it earned;
- optionally `time` (timestamp or epoch seconds): rows are read in its order, and a window applies
  to it; without it, in the table's order, and no window can be asked for;
- optionally `customer` (string or integer): for the candidate's variant split;
- every other column is context, offered to the candidate both as a param and as a feature: a
  context variable named like the column, or reading a param or a feature of that name, takes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from libs.common.offline_store import CATALOG_SQL_TYPES, catalog_entry, reading
from services.monitor.core.policy_evaluation import LoggedRow

REQUIRED_COLUMNS = {
    "offer": ("string", "int64"),
    "slot": ("int64", "float64"),
    "propensity": ("float64", "int64"),
    "reward": ("float64", "int64", "bool"),
}
OPTIONAL_COLUMNS = {"time": ("timestamp", "date", "float64", "int64"), "customer": ("string", "int64")}
READ_CHUNK_ROWS = 10_000
FIELD = "logged_table"


@dataclass(frozen=True)
class LoggedTable:
    """A checked table: its column types, how many first-slot rows and which offers it holds."""

    name: str
    types: dict[str, str]  # column -> catalog type
    first_slot_rows: int
    offers: list[str]

    @property
    def has_time(self) -> bool:
        return "time" in self.types

    @property
    def context_columns(self) -> list[str]:
        return [name for name in self.types if name not in REQUIRED_COLUMNS and name not in OPTIONAL_COLUMNS]


def inspect_logged_table(engine: Engine, name: str, start: float | None, end: float | None) -> LoggedTable:
    """The table checked against the layout above; errors name `logged_table` and the column."""
    if not name:
        raise InvalidArgument("is required", field=FIELD)
    with reading(engine) as connection:
        entry = catalog_entry(connection, name)
        if entry is None:
            if sa.inspect(connection).has_table(name):
                raise FailedPrecondition(
                    f"table '{name}' was not loaded through ingest (it is not in the catalog); "
                    "load the log with `liveloop ingest load`",
                    field=FIELD,
                )
            raise NotFound(f"no table '{name}' in the offline store", field=FIELD)
        types = {column["name"]: column["type"] for column in entry.columns}
        for column, accepted in (REQUIRED_COLUMNS | OPTIONAL_COLUMNS).items():
            kind = types.get(column)
            if kind is None and column in REQUIRED_COLUMNS:
                raise InvalidArgument(
                    f"table '{name}' has no column '{column}' (it has: {', '.join(types)}); a logged "
                    "decision table needs offer, slot, propensity and reward",
                    field=f"{FIELD}.{column}",
                )
            if kind is not None and kind not in accepted:
                raise InvalidArgument(
                    f"column '{column}' of table '{name}' is {kind}; it must be {' or '.join(accepted)}",
                    field=f"{FIELD}.{column}",
                )
        table = _table(name, types)
        if (start is not None or end is not None) and "time" not in types:
            raise InvalidArgument(
                f"table '{name}' has no 'time' column, so no window can be applied; leave the window out",
                field="window",
            )
        where = _window(table, types, start, end)
        first_slot = connection.scalar(
            sa.select(sa.func.count()).select_from(table).where(table.c.slot == 1, *where)
        )
        offers = connection.scalars(sa.select(table.c.offer).where(*where).distinct()).all()
        bad_propensity = connection.scalar(
            sa.select(sa.func.count())
            .select_from(table)
            .where(sa.or_(table.c.propensity < 0, table.c.propensity > 1), *where)
        )
        if bad_propensity:
            raise InvalidArgument(
                f"{bad_propensity} rows of table '{name}' have a propensity outside [0, 1]",
                field=f"{FIELD}.propensity",
            )
        missing_reward = connection.scalar(
            sa.select(sa.func.count()).select_from(table).where(table.c.reward.is_(None), *where)
        )
        if missing_reward:
            raise InvalidArgument(
                f"{missing_reward} rows of table '{name}' have no reward", field=f"{FIELD}.reward"
            )
    if not first_slot:
        raise FailedPrecondition(
            f"table '{name}' holds no first-slot rows (slot = 1)" + (" in the window" if where else ""),
            field="window" if where else f"{FIELD}.slot",
        )
    return LoggedTable(
        name, types, int(first_slot), sorted(str(offer) for offer in offers if offer is not None)
    )


def read_logged_rows(
    engine: Engine, logged: LoggedTable, start: float | None, end: float | None
) -> Iterator[LoggedRow]:
    """Every row in the window, in time order (the table's order without a time column)."""
    table = _table(logged.name, logged.types)
    context_columns = logged.context_columns
    query = sa.select(table).where(*_window(table, logged.types, start, end))
    if logged.has_time:
        query = query.order_by(table.c.time)
    with reading(engine) as connection:
        result = connection.execution_options(stream_results=True, yield_per=READ_CHUNK_ROWS).execute(query)
        for index, row in enumerate(result.mappings()):
            offer = row["offer"]
            if offer is None or row["slot"] is None:
                continue  # not a shown offer
            yield LoggedRow(
                time=_seconds(row["time"]) if logged.has_time else float(index),
                customer="" if row.get("customer") is None else str(row["customer"]),
                context={name: row[name] for name in context_columns if row[name] is not None},
                offer=str(offer),
                slot=int(row["slot"]),
                propensity=_propensity(row["propensity"]),
                reward=float(row["reward"]),
            )


def _table(name: str, types: dict[str, str]) -> sa.TableClause:
    return sa.table(
        name, *(sa.column(column, CATALOG_SQL_TYPES.get(kind, sa.Text())) for column, kind in types.items())
    )


def _window(
    table: sa.TableClause, types: dict[str, str], start: float | None, end: float | None
) -> list[Any]:
    if "time" not in types or (start is None and end is None):
        return []
    kind = types["time"]

    def bound(seconds: float) -> Any:
        if kind == "timestamp":
            return datetime.fromtimestamp(seconds, tz=UTC)
        if kind == "date":
            return datetime.fromtimestamp(seconds, tz=UTC).date()
        return seconds

    clauses = []
    if start is not None:
        clauses.append(table.c.time >= bound(start))
    if end is not None:
        clauses.append(table.c.time < bound(end))
    return clauses


def _seconds(value: Any) -> float:
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or UTC).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    return float(value) if value is not None else 0.0


def _propensity(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) or number <= 0 else number
