"""The ingest service's operations. Heavy work (reading, converting, writing) runs in worker threads;
progress comes back through an asyncio queue so the server loop never blocks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from redis import Redis
from sqlalchemy import Engine

from libs.common.deployment_spec import DeploymentSpec
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.ingest.core import catalog
from services.ingest.core import features as feature_engineering
from services.ingest.core.columns import Column, ColumnType, check_name
from services.ingest.core.loader import AlreadyLoaded, LoadProgress, LoadResult, LoadTarget, WriteMode, load
from services.ingest.core.online_store import MaterializeProgress, materialize, online_features
from services.ingest.core.options_generation import OptionsResult, generate_options
from services.ingest.core.sources import FileFormat, RawChunk, csv_bytes, read_file, read_sql

T = TypeVar("T")

MAX_READ_ROWS = 100_000  # ReadRows: a corpus, not an export
Event = TypeVar("Event")
_DONE = object()


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _StreamedFingerprint:
    """SHA-256 over a query's result as it streams: the column names, then every chunk as CSV rows,
    so the same result has the same fingerprint however it was cut into chunks."""

    def __init__(self, chunks: Iterator[RawChunk]) -> None:
        self._chunks = chunks
        self._digest = hashlib.sha256()

    def __iter__(self) -> Iterator[RawChunk]:
        for index, chunk in enumerate(self._chunks):
            if index == 0:
                self._digest.update(json.dumps(chunk.batch.schema.names).encode())
            self._digest.update(csv_bytes(chunk.batch))
            yield chunk

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@dataclass(frozen=True)
class TableSummary:
    name: str
    kind: str
    row_count: int
    key: list[str]
    columns: list[Column]
    updated_at: datetime
    fingerprint: str
    event_time_column: str


@dataclass(frozen=True)
class ColumnStatistics:
    column: str
    count: int
    null_count: int
    distinct_count: int
    minimum: float | None
    maximum: float | None
    mean: float | None
    stddev: float | None
    min_text: str
    max_text: str
    top_values: list[tuple[str, int]]


class WorkAbandoned(Exception):
    """Raised in the worker at its next progress report once nobody waits for it (the client
    cancelled), so a load rolls back instead of committing behind the caller's back."""


async def run_with_progress(work: Callable[[Callable[[Event], None]], T]) -> AsyncIterator[Event | T]:
    """Run `work(report)` in a thread; yield every reported event, then the result."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    abandoned = threading.Event()

    def report(event: Event) -> None:
        if abandoned.is_set():
            raise WorkAbandoned()
        loop.call_soon_threadsafe(queue.put_nowait, event)

    def run() -> None:
        try:
            result = work(report)
        except BaseException as exc:  # delivered to the caller below
            loop.call_soon_threadsafe(queue.put_nowait, (_DONE, exc, None))
            return
        loop.call_soon_threadsafe(queue.put_nowait, (_DONE, None, result))

    task = loop.run_in_executor(None, run)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, tuple) and len(item) == 3 and item[0] is _DONE:
                if item[1] is not None:
                    raise item[1]
                yield item[2]
                return
            yield item
    finally:
        abandoned.set()  # a no-op once the work is done
        await asyncio.shield(task)


class IngestService:
    def __init__(
        self,
        engine: Engine,
        redis: Redis,
        *,
        chunk_rows: int,
        upload_dir: Path,
        data_dir: Path | None,
        online_ttl_seconds: int | None,
        fetch_spec: Callable[[str, int], Any],
    ) -> None:
        self.engine = engine
        self.redis = redis
        self._chunk_rows = chunk_rows
        self._upload_dir = upload_dir
        self._data_dir = data_dir.resolve() if data_dir is not None else None
        self._ttl = online_ttl_seconds
        self._fetch_spec = fetch_spec

    def _readable_path(self, path: str) -> Path:
        if not path:
            raise InvalidArgument("must name a file the ingest service can read", field="file.path")
        given = Path(path).expanduser()
        if not given.is_absolute() and self._data_dir is not None:
            given = self._data_dir / given  # relative paths resolve against the data directory
        resolved = given.resolve()
        if self._data_dir is not None and not resolved.is_relative_to(self._data_dir):
            raise InvalidArgument(f"must lie under {self._data_dir}", field="file.path")
        return resolved

    def ingest_file(
        self, path: str, file_format: FileFormat | None, delimiter: str, target: LoadTarget, chunk_rows: int
    ) -> AsyncIterator[LoadProgress | LoadResult]:
        from services.ingest.core.sources import detect_format

        resolved = self._readable_path(path)
        chosen = detect_format(str(resolved), file_format)

        def work(report: Callable[[LoadProgress], None]) -> LoadResult:
            chunks = read_file(resolved, chosen, chunk_rows or self._chunk_rows, delimiter or ",")
            return load(self.engine, chunks, target, file_fingerprint(resolved), report)

        return run_with_progress(work)

    def ingest_sql(
        self, url: str, query: str, target: LoadTarget, chunk_rows: int
    ) -> AsyncIterator[LoadProgress | LoadResult]:
        def work(report: Callable[[LoadProgress], None]) -> LoadResult:
            streamed = _StreamedFingerprint(read_sql(url, query, chunk_rows or self._chunk_rows))
            try:
                return load(self.engine, iter(streamed), target, streamed.hexdigest, report)
            except AlreadyLoaded as repeat:
                return self._already_loaded(target.table, str(repeat))

        return run_with_progress(work)

    def _already_loaded(self, table: str, fingerprint: str) -> LoadResult:
        summary = self._table(table)
        return LoadResult(
            table, summary.columns, 0, 0, 0, [], 0.0, fingerprint, summary.row_count, already_loaded=True
        )

    def staging_file(self) -> tuple[Path, Any]:
        self._upload_dir.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=self._upload_dir, prefix="upload-")
        return Path(name), os.fdopen(descriptor, "wb")

    async def load_upload(
        self, path: Path, file_format: FileFormat, delimiter: str, target: LoadTarget
    ) -> LoadResult:
        def work() -> LoadResult:
            try:
                chunks = read_file(path, file_format, self._chunk_rows, delimiter or ",")
                return load(self.engine, chunks, target, file_fingerprint(path))
            finally:
                path.unlink(missing_ok=True)

        return await asyncio.to_thread(work)

    # Catalog --------------------------------------------------------------------------------

    def _table(self, name: str) -> TableSummary:
        check_name(name, "table")
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(catalog.tables).where(catalog.tables.c.name == name)).first()
        if row is None:
            raise NotFound(f"no table '{name}' in the offline store", field="table")
        return _summary(row)

    async def read_rows(self, name: str, limit: int) -> tuple[TableSummary, list[dict[str, Any]]]:
        """Every row of a small table, in key order; FailedPrecondition when it holds more than `limit`."""
        if limit < 0 or limit > MAX_READ_ROWS:
            raise InvalidArgument(f"must be in [0, {MAX_READ_ROWS}] (0: {MAX_READ_ROWS})", field="limit")
        most = limit or MAX_READ_ROWS

        def work() -> tuple[TableSummary, list[dict[str, Any]]]:
            summary = self._table(name)
            table = sa.Table(name, sa.MetaData(), autoload_with=self.engine)
            order = [table.c[key] for key in summary.key] or list(table.c)  # the same rows, the same order
            query = sa.select(table).order_by(*order).limit(most + 1)
            with self.engine.connect() as connection:
                rows = [dict(row._mapping) for row in connection.execute(query)]
            if len(rows) > most:
                raise FailedPrecondition(
                    f"'{name}' holds {summary.row_count} rows; at most {most} can be read this way",
                    field="table",
                )
            return summary, [{key: _plain(value) for key, value in row.items()} for row in rows]

        return await asyncio.to_thread(work)

    async def list_tables(self, prefix: str) -> list[TableSummary]:
        def work() -> list[TableSummary]:
            query = sa.select(catalog.tables).order_by(catalog.tables.c.name)
            if prefix:
                query = query.where(catalog.tables.c.name.startswith(prefix, autoescape=True))
            with self.engine.connect() as connection:
                return [_summary(row) for row in connection.execute(query)]

        return await asyncio.to_thread(work)

    async def describe(
        self, name: str, with_stats: bool, top_values: int
    ) -> tuple[TableSummary, list[ColumnStatistics]]:
        def work() -> tuple[TableSummary, list[ColumnStatistics]]:
            summary = self._table(name)
            if not with_stats:
                return summary, []
            table = sa.Table(name, sa.MetaData(), autoload_with=self.engine)
            stats = []
            with self.engine.connect() as connection:
                for column in summary.columns:
                    c = table.c[column.name]
                    numeric = column.type in (ColumnType.INT64, ColumnType.FLOAT64)
                    # PostgreSQL has no min/max of booleans; the order false < true is the same.
                    ordered = sa.cast(c, sa.Integer) if column.type is ColumnType.BOOL else c
                    aggregates: list[Any] = [
                        sa.func.count(c),
                        sa.func.count(sa.distinct(c)),
                        sa.func.min(ordered),
                        sa.func.max(ordered),
                    ]
                    if numeric:
                        as_float = sa.cast(c, sa.Float(precision=53))  # c * c overflows a bigint
                        aggregates += [sa.func.avg(as_float), sa.func.avg(as_float * as_float)]
                    row = connection.execute(sa.select(*aggregates)).one()
                    count, distinct, low, high = int(row[0]), int(row[1]), row[2], row[3]
                    if column.type is ColumnType.BOOL:
                        low, high = (None if v is None else "true" if v else "false" for v in (low, high))
                    mean = stddev = None
                    if numeric and row[4] is not None:
                        mean = float(row[4])
                        stddev = max(float(row[5]) - mean * mean, 0.0) ** 0.5
                    top: list[tuple[str, int]] = []
                    if top_values > 0:
                        for value, n in connection.execute(
                            sa.select(c, sa.func.count())
                            .where(c.is_not(None))
                            .group_by(c)
                            .order_by(sa.func.count().desc(), c)
                            .limit(top_values)
                        ):
                            shown = ("true" if value else "false") if isinstance(value, bool) else str(value)
                            top.append((shown, int(n)))
                    stats.append(
                        ColumnStatistics(
                            column.name,
                            count,
                            summary.row_count - count,
                            distinct,
                            float(low) if numeric and low is not None else None,
                            float(high) if numeric and high is not None else None,
                            mean,
                            stddev,
                            "" if low is None else str(low),
                            "" if high is None else str(high),
                            top,
                        )
                    )
            return summary, stats

        return await asyncio.to_thread(work)

    # Online store and options -------------------------------------------------------------

    def materialize(
        self, views: list[str], full: bool, as_of: datetime | None
    ) -> AsyncIterator[MaterializeProgress | list[MaterializeProgress]]:
        def work(report: Callable[[MaterializeProgress], None]) -> list[MaterializeProgress]:
            return materialize(
                self.engine, self.redis, views, full=full, as_of=as_of, ttl_seconds=self._ttl, progress=report
            )

        return run_with_progress(work)

    async def get_online_features(
        self, entities: list[str], features: list[str]
    ) -> list[tuple[str, dict[str, str] | None]]:
        if not entities:
            raise InvalidArgument("name at least one entity key", field="entity_keys")
        views: dict[str, list[str]] = {}
        for item in features:
            view, _, feature = item.partition(".")
            check_name(view, "features")
            views.setdefault(view, [])
            if feature:
                views[view].append(feature)

        def work() -> list[tuple[str, dict[str, str] | None]]:
            if not views:  # every view in the online store
                with self.engine.connect() as connection:
                    materialized = connection.scalars(sa.select(catalog.materializations.c.feature_view))
                    views.update({view: [] for view in sorted(materialized)})
            merged: list[dict[str, str] | None] = [None] * len(entities)
            for view, names in views.items():
                for index, found in enumerate(online_features(self.redis, view, entities, names)):
                    if found is None:
                        continue
                    combined = merged[index] or {}
                    combined.update({f"{view}.{k}": v for k, v in found.items()})
                    merged[index] = combined
            return list(zip(entities, merged, strict=True))

        return await asyncio.to_thread(work)

    # Features -----------------------------------------------------------------------------

    async def apply_features(self, spec_yaml: str, dry_run: bool) -> feature_engineering.ApplyFeaturesResult:
        """Parse the YAML feature spec and apply it (or, with dry_run, only validate it)."""

        def work() -> feature_engineering.ApplyFeaturesResult:
            spec = feature_engineering.parse_feature_spec(spec_yaml)
            return feature_engineering.apply_features(
                self.engine, spec, dry_run=dry_run, chunk_rows=self._chunk_rows
            )

        return await asyncio.to_thread(work)

    async def build_training_set(
        self,
        *,
        output_table: str,
        label_table: str,
        label_column: str,
        features: list[str],
        event_time_column: str,
        mode: WriteMode,
        sample_fraction: float,
        seed: int,
        carried_columns: list[str] | None = None,
    ) -> feature_engineering.TrainingSetResult:
        def work() -> feature_engineering.TrainingSetResult:
            return feature_engineering.build_training_set(
                self.engine,
                output_table=output_table,
                label_table=label_table,
                label_column=label_column,
                features=features,
                event_time_column=event_time_column,
                mode=mode,
                sample_fraction=sample_fraction,
                seed=seed,
                carried_columns=carried_columns or [],
                chunk_rows=self._chunk_rows,
            )

        return await asyncio.to_thread(work)

    async def generate_options(
        self,
        deployment: str,
        revision: int,
        history_table: str,
        prior_weight: float,
        update: bool,
        dry_run: bool,
    ) -> tuple[OptionsResult, int]:
        if not deployment:
            raise InvalidArgument("must name a deployment", field="deployment")
        spec, spec_revision = await self._fetch_spec(deployment, revision)
        assert isinstance(spec, DeploymentSpec)
        result = await asyncio.to_thread(
            generate_options,
            self.engine,
            self.redis,
            spec,
            history_table=history_table,
            prior_weight=prior_weight,
            update=update,
            dry_run=dry_run,
        )
        return result, spec_revision


def _summary(row: Any) -> TableSummary:
    keys = json.loads(row.key_columns)
    columns = [Column(c["name"], ColumnType(c["type"]), c["name"] in keys) for c in json.loads(row.columns)]
    return TableSummary(
        row.name,
        row.kind,
        int(row.row_count),
        keys,
        columns,
        row.updated_at,
        row.fingerprint,
        row.event_time_column,
    )


def elapsed(started: float) -> float:
    return time.monotonic() - started


def _plain(value: Any) -> Any:
    """A value of a row as JSON holds it: times as ISO 8601 text, NaN as null, an integer a double
    cannot hold exactly as text."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)  # a double (a Struct's number) would round it
    return value
