"""The online store: the latest features of every entity in Redis, one hash per entity.

Materialization streams the offline table ordered by key (bounded memory), keeps the newest row per
entity (as of a time, by the table's event-time column when it has one), and writes batches in
Redis transactions so an entity is never half written. Incremental runs only touch entities with
rows newer than the last run's watermark (or skip a table whose content did not change).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from redis import Redis
from sqlalchemy import Engine

from libs.common import redis_keys
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.ingest.core import catalog
from services.ingest.core.columns import check_name

UPDATED_AT_FIELD = "_updated_at"
WRITE_BATCH = 1000


@dataclass
class MaterializeProgress:
    feature_view: str
    entities_written: int
    total: int
    started: float
    done: bool = False
    skipped: bool = False


def _text(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return str(value)
    if kind is int or kind is float:
        return str(value)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _table_record(engine: Engine, view: str) -> sa.Row[Any]:
    check_name(view, "feature_views")
    with engine.connect() as connection:
        row = connection.execute(sa.select(catalog.tables).where(catalog.tables.c.name == view)).first()
    if row is None:
        raise NotFound(f"no table '{view}' in the offline store", field="feature_views")
    if len(_entity_keys(row)) != 1:
        keys = json.loads(row.key_columns)
        raise FailedPrecondition(
            f"'{view}' needs exactly one key column (the entity), besides its event time, to be "
            f"materialized; it has {keys or 'none'}",
            field="feature_views",
        )
    return row


def _entity_keys(record: sa.Row[Any]) -> list[str]:
    """The key columns that name the entity: an event-time table keyed by (customer, time) holds
    the history of each customer, of which the newest row is materialized."""
    keys: list[str] = json.loads(record.key_columns)
    return [k for k in keys if k != record.event_time_column] if record.event_time_column else keys


def _latest_rows(
    engine: Engine, view: str, key: str, event_time: str, since: datetime | None, as_of: datetime | None
) -> Iterator[dict[str, Any]]:
    table = sa.Table(view, sa.MetaData(), autoload_with=engine)
    query = sa.select(table)
    if event_time:
        if as_of is not None:
            query = query.where(table.c[event_time] <= as_of)
        if since is not None:
            changed = sa.select(table.c[key]).where(table.c[event_time] > since)
            if as_of is not None:
                changed = changed.where(table.c[event_time] <= as_of)
            query = query.where(table.c[key].in_(changed))
        query = query.order_by(table.c[key], table.c[event_time])
    else:
        query = query.order_by(table.c[key])
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=WRITE_BATCH).execute(query)
        current_key: Any = None
        latest: dict[str, Any] | None = None
        for row in result.mappings():
            if latest is not None and row[key] != current_key:
                yield latest
            current_key, latest = row[key], dict(row)
        if latest is not None:
            yield latest


def _command(*parts: bytes) -> bytes:
    """One command in the Redis protocol (RESP)."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


class _EntityWriter:
    """Writes entities in batches, each batch one MULTI/EXEC (an entity is never seen half
    written). The commands are packed here: redis-py's own packing took 60% of materialization."""

    def __init__(self, redis: Redis, ttl_seconds: int | None) -> None:
        self._redis = redis
        self._ttl = str(ttl_seconds).encode() if ttl_seconds else None
        self._commands: list[bytes] = []
        self.pending = 0

    def add(self, key: str, mapping: dict[str, str]) -> None:
        name = key.encode()
        fields: list[bytes] = []
        for field_name, value in mapping.items():
            fields += (field_name.encode(), value.encode())
        self._commands.append(_command(b"DEL", name))
        self._commands.append(_command(b"HSET", name, *fields))
        if self._ttl is not None:
            self._commands.append(_command(b"EXPIRE", name, self._ttl))
        self.pending += 1

    def flush(self) -> int:
        """Sends the batch; the number of entities written."""
        if not self.pending:
            return 0
        written, commands = self.pending, self._commands
        self._commands, self.pending = [], 0
        pool = self._redis.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([_command(b"MULTI"), *commands, _command(b"EXEC")])  # type: ignore[no-untyped-call]
            for _ in range(len(commands) + 1):  # +OK, then +QUEUED per command
                connection.read_response()
            replies = connection.read_response()
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]  # its state is unknown now
            raise
        finally:
            pool.release(connection)
        if replies is None:
            raise RuntimeError("the Redis transaction was aborted")
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return written


def _default_views(engine: Engine) -> list[str]:
    """No views named: every feature view, and every table materialized before."""
    with engine.connect() as connection:
        names = set(connection.scalars(sa.select(catalog.materializations.c.feature_view)))
        names |= set(
            connection.scalars(
                sa.select(catalog.tables.c.name).where(catalog.tables.c.kind == "feature_view")
            )
        )
    if not names:
        raise InvalidArgument(
            "nothing to materialize: there is no feature view and no table was materialized before; "
            "name the tables",
            field="feature_views",
        )
    return sorted(names)


def materialize(
    engine: Engine,
    redis: Redis,
    views: Sequence[str],
    *,
    full: bool,
    as_of: datetime | None,
    ttl_seconds: int | None,
    progress: Callable[[MaterializeProgress], None] = lambda _p: None,
) -> list[MaterializeProgress]:
    if not views:
        views = _default_views(engine)
    results = []
    for view in views:
        record = _table_record(engine, view)
        key = _entity_keys(record)[0]
        event_time = record.event_time_column
        with engine.connect() as connection:
            previous = connection.execute(
                sa.select(catalog.materializations).where(catalog.materializations.c.feature_view == view)
            ).first()
        state = MaterializeProgress(view, 0, int(record.row_count), time.monotonic())
        since: datetime | None = None
        watermark: str = record.fingerprint
        if not full and previous is not None:
            if event_time:
                since = datetime.fromisoformat(previous.watermark) if previous.watermark else None
            elif previous.watermark == record.fingerprint:
                state.done = state.skipped = True
                progress(state)
                results.append(state)
                continue
        newest: datetime | None = since
        writer = _EntityWriter(redis, ttl_seconds)
        stamp = datetime.now(UTC).isoformat()
        for row in _latest_rows(engine, view, key, event_time, since, as_of):
            mapping = {name: _text(value) for name, value in row.items() if value is not None and name != key}
            mapping[UPDATED_AT_FIELD] = stamp
            writer.add(redis_keys.online_features(view, _text(row[key])), mapping)
            if event_time and row.get(event_time) is not None:
                moment = row[event_time] if row[event_time].tzinfo else row[event_time].replace(tzinfo=UTC)
                newest = moment if newest is None or moment > newest else newest
            if writer.pending >= WRITE_BATCH:
                state.entities_written += writer.flush()
                stamp = datetime.now(UTC).isoformat()
                progress(state)
        state.entities_written += writer.flush()
        columns = [str(column["name"]) for column in json.loads(record.columns)]
        features = [name for name in columns if name not in (key, event_time)]
        redis.set(redis_keys.feature_view_columns(view), json.dumps(features))
        if event_time:
            watermark = newest.isoformat() if newest is not None else (previous.watermark if previous else "")
        now = datetime.now(UTC)
        with engine.begin() as connection:
            values = {"watermark": watermark, "entities": state.entities_written, "materialized_at": now}
            if previous is None:
                connection.execute(sa.insert(catalog.materializations).values(feature_view=view, **values))
            else:
                connection.execute(
                    sa.update(catalog.materializations)
                    .where(catalog.materializations.c.feature_view == view)
                    .values(**values)
                )
        state.done = True
        progress(state)
        results.append(state)
    return results


def online_features(
    redis: Redis, view: str, entities: Sequence[str], features: Sequence[str]
) -> list[dict[str, str] | None]:
    pipeline = redis.pipeline(transaction=False)
    for entity in entities:
        pipeline.hgetall(redis_keys.online_features(view, entity))
    found: list[dict[str, str] | None] = []
    for raw in pipeline.execute():
        if not raw:
            found.append(None)
            continue
        values = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        if features:
            values = {k: v for k, v in values.items() if k in features or k == UPDATED_AT_FIELD}
        found.append(values)
    return found
