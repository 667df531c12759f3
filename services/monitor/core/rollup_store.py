"""The monitor's SQL store: applies a batch of decision-log entries exactly once (rollups and the
batch's ledger row in one transaction) and answers window queries over the per-minute rollups.

Exactly once: a stream entry id is applied when it is at or below the stream's watermark or listed
in an `applied_batches` row. Both are checked and the new row written under the database write lock
(SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-level advisory lock), so two monitor replicas
handed the same entry (one died before acknowledging it, the other claimed it) count it once. Rows
are pruned by raising the watermark past them once no older entry can still be delivered.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from libs.common.database import write_transaction
from libs.common.decision_log import Contact, Response
from services.monitor.core import schema
from services.monitor.core.rollups import (
    INVOKE_METHOD,
    LatencyCounts,
    OfferCounts,
    Rollup,
    merged_latency,
    rollup,
)

_WRITE_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"liveloop:monitor:applied_batches").digest()[:8], "big", signed=True
)


@dataclass(frozen=True, order=True)
class EntryId:
    """A Redis stream entry id, ordered as Redis orders them."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str | bytes) -> EntryId:
        raw = text.decode() if isinstance(text, bytes) else text
        ms, _, seq = raw.partition("-")
        return cls(int(ms), int(seq or 0))

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


@dataclass(frozen=True)
class StreamEntry:
    """One decoded entry of the decision log."""

    id: EntryId
    record: Contact | Response


@dataclass(frozen=True)
class AppliedBatch:
    applied: int  # entries counted now
    skipped: int  # entries already counted by an earlier batch


def _watermark_name(stream: str) -> str:
    return f"watermark:{stream}"


def _trimmed_name(stream: str) -> str:
    return f"trimmed:{stream}"


def _malformed_name(kind: str) -> str:
    return f"malformed:{kind}"


@dataclass
class ReplicaTotals:
    replica: str
    revision: int
    last_seen: float
    invocations: int


@dataclass
class WindowTotals:
    """The rollups of one deployment summed over a window of whole minutes."""

    invocations: int = 0
    explore_decisions: int = 0
    responses: int = 0
    late_responses: int = 0
    duplicate_responses: int = 0
    by_offer: dict[str, OfferCounts] = field(default_factory=dict)
    by_segment: dict[str, OfferCounts] = field(default_factory=dict)
    by_offer_segment: dict[tuple[str, str], OfferCounts] = field(default_factory=dict)
    by_variant: dict[str, OfferCounts] = field(default_factory=dict)
    replicas: list[ReplicaTotals] = field(default_factory=list)
    latency: dict[str, LatencyCounts] = field(default_factory=dict)

    @property
    def impressions(self) -> int:
        return sum(row.impressions for row in self.by_offer.values())


@dataclass(frozen=True)
class MinuteSeries:
    """Per minute of a window: impressions, accepted and explored impressions per offer, and the
    calls and latency of Invoke."""

    minute: int
    offer: str
    impressions: int
    accepted: int
    explored_impressions: int


class RollupStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- writing ---------------------------------------------------------------------------------

    def apply(self, stream: str, batch: str, entries: Sequence[StreamEntry]) -> AppliedBatch:
        """Count the entries not counted before, and record them as counted, in one transaction."""
        if not entries:
            return AppliedBatch(0, 0)
        with write_transaction(self._engine) as connection:
            self._lock(connection)
            seen = self._applied_among(connection, stream, [entry.id for entry in entries])
            fresh = [entry for entry in entries if entry.id not in seen]
            if fresh:
                self._add(connection, rollup(entry.record for entry in fresh))
                ids = sorted(entry.id for entry in fresh)
                connection.execute(
                    schema.applied_batches.insert().values(
                        batch=batch,
                        stream=stream,
                        first_ms=ids[0].ms,
                        first_seq=ids[0].seq,
                        last_ms=ids[-1].ms,
                        last_seq=ids[-1].seq,
                        entries=",".join(str(entry_id) for entry_id in ids),
                        applied_at=time.time(),
                    )
                )
        return AppliedBatch(len(fresh), len(entries) - len(fresh))

    def raise_watermark(self, stream: str, to: EntryId) -> int:
        """Every entry at or below `to` is applied or will never be delivered: drop their ledger rows."""
        with write_transaction(self._engine) as connection:
            self._lock(connection)
            current = self._watermark(connection, stream)
            if current is not None and to <= current:
                return 0
            table = schema.applied_batches
            below = sa.or_(
                table.c.last_ms < to.ms, sa.and_(table.c.last_ms == to.ms, table.c.last_seq <= to.seq)
            )
            removed = connection.execute(table.delete().where(table.c.stream == stream, below)).rowcount
            self._set_counter(connection, _watermark_name(stream), 0, str(to))
            return int(removed or 0)

    def count_trimmed(self, stream: str, entries: int, gap_marker: str) -> bool:
        """Add entries trimmed before they were read; a gap is counted once (by its marker)."""
        with write_transaction(self._engine) as connection:
            self._lock(connection)
            name = _trimmed_name(stream)
            row = connection.execute(
                sa.select(schema.monitor_counters.c.count, schema.monitor_counters.c.text).where(
                    schema.monitor_counters.c.name == name
                )
            ).first()
            if row is not None and row[1] == gap_marker:
                return False
            self._set_counter(connection, name, (int(row[0]) if row else 0) + entries, gap_marker)
            return True

    def count_malformed(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        with write_transaction(self._engine) as connection:
            for kind, entries in counts.items():
                self._increment(connection, _malformed_name(kind), entries)

    # -- reading ---------------------------------------------------------------------------------

    def trimmed(self, stream: str) -> int:
        return self._counter(_trimmed_name(stream))

    def malformed(self) -> dict[str, int]:
        table = schema.monitor_counters
        with self._engine.connect() as connection:
            rows = connection.execute(
                sa.select(table.c.name, table.c.count).where(table.c.name.like("malformed:%"))
            ).all()
        return {str(name).split(":", 1)[1]: int(count) for name, count in rows}

    def watermark(self, stream: str) -> EntryId | None:
        with self._engine.connect() as connection:
            return self._watermark(connection, stream)

    def ledger_rows(self, stream: str) -> int:
        table = schema.applied_batches
        with self._engine.connect() as connection:
            return int(
                connection.execute(
                    sa.select(sa.func.count()).select_from(table).where(table.c.stream == stream)
                ).scalar_one()
            )

    def deployments(self) -> list[str]:
        table = schema.decision_minutes
        with self._engine.connect() as connection:
            return [row[0] for row in connection.execute(sa.select(table.c.deployment).distinct()).all()]

    def window(self, deployment: str, start: int, end: int) -> WindowTotals:
        """Sums over the minutes in [start, end) (epoch seconds, whole minutes)."""
        totals = WindowTotals()
        offers, decisions, latency = schema.offer_minutes, schema.decision_minutes, schema.latency_minutes
        with self._engine.connect() as connection:
            decision_rows = connection.execute(
                sa.select(
                    sa.func.sum(decisions.c.invocations),
                    sa.func.sum(decisions.c.explore_decisions),
                    sa.func.sum(decisions.c.responses),
                    sa.func.sum(decisions.c.late_responses),
                    sa.func.sum(decisions.c.duplicate_responses),
                ).where(*_in_window(decisions, deployment, start, end))
            ).one()
            (
                totals.invocations,
                totals.explore_decisions,
                totals.responses,
                totals.late_responses,
                totals.duplicate_responses,
            ) = (int(value or 0) for value in decision_rows)
            offer_rows = connection.execute(
                sa.select(
                    offers.c.offer,
                    offers.c.segment,
                    offers.c.variant,
                    sa.func.sum(offers.c.impressions),
                    sa.func.sum(offers.c.explored_impressions),
                    sa.func.sum(offers.c.accepted),
                    sa.func.sum(offers.c.reward_sum),
                )
                .where(*_in_window(offers, deployment, start, end))
                .group_by(offers.c.offer, offers.c.segment, offers.c.variant)
            ).all()
            for offer, segment, variant, impressions, explored, accepted, reward_sum in offer_rows:
                cell = OfferCounts(
                    int(impressions or 0), int(explored or 0), int(accepted or 0), float(reward_sum or 0.0)
                )
                _add_counts(totals.by_offer.setdefault(offer, OfferCounts()), cell)
                _add_counts(totals.by_segment.setdefault(segment, OfferCounts()), cell)
                _add_counts(totals.by_offer_segment.setdefault((offer, segment), OfferCounts()), cell)
                _add_counts(totals.by_variant.setdefault(variant, OfferCounts()), cell)
            replica_rows = connection.execute(
                sa.select(
                    decisions.c.replica,
                    sa.func.max(decisions.c.revision),
                    sa.func.max(decisions.c.last_seen),
                    sa.func.sum(decisions.c.invocations),
                )
                .where(*_in_window(decisions, deployment, start, end), decisions.c.invocations > 0)
                .group_by(decisions.c.replica)
                .order_by(decisions.c.replica)
            ).all()
            totals.replicas = [
                ReplicaTotals(str(replica), int(revision), float(last_seen), int(invocations))
                for replica, revision, last_seen, invocations in replica_rows
            ]
            latency_rows = connection.execute(
                sa.select(latency.c.method, latency.c.calls, latency.c.max_seconds, latency.c.buckets).where(
                    *_in_window(latency, deployment, start, end)
                )
            ).all()
        by_method: dict[str, list[tuple[int, float, dict[int, int]]]] = {}
        for method, calls, max_seconds, buckets in latency_rows:
            by_method.setdefault(method, []).append((int(calls), float(max_seconds), _buckets(buckets)))
        totals.latency = {method: merged_latency(rows) for method, rows in sorted(by_method.items())}
        return totals

    def offer_series(self, deployment: str, start: int, end: int) -> list[MinuteSeries]:
        """Per minute and offer, for charts."""
        offers = schema.offer_minutes
        with self._engine.connect() as connection:
            rows = connection.execute(
                sa.select(
                    offers.c.minute,
                    offers.c.offer,
                    sa.func.sum(offers.c.impressions),
                    sa.func.sum(offers.c.accepted),
                    sa.func.sum(offers.c.explored_impressions),
                )
                .where(*_in_window(offers, deployment, start, end))
                .group_by(offers.c.minute, offers.c.offer)
                .order_by(offers.c.minute, offers.c.offer)
            ).all()
        return [
            MinuteSeries(int(minute), str(offer), int(impressions), int(accepted), int(explored))
            for minute, offer, impressions, accepted, explored in rows
        ]

    def invoke_series(self, deployment: str, start: int, end: int) -> list[tuple[int, int, LatencyCounts]]:
        """Per minute with traffic: (minute, Invoke calls logged, Invoke latency)."""
        decisions, latency = schema.decision_minutes, schema.latency_minutes
        with self._engine.connect() as connection:
            calls = dict(
                connection.execute(
                    sa.select(decisions.c.minute, sa.func.sum(decisions.c.invocations))
                    .where(*_in_window(decisions, deployment, start, end))
                    .group_by(decisions.c.minute)
                ).all()
            )
            latency_rows = connection.execute(
                sa.select(latency.c.minute, latency.c.calls, latency.c.max_seconds, latency.c.buckets).where(
                    *_in_window(latency, deployment, start, end), latency.c.method == INVOKE_METHOD
                )
            ).all()
        by_minute = {
            int(minute): LatencyCounts(int(count), float(max_seconds), _buckets(buckets))
            for minute, count, max_seconds, buckets in latency_rows
        }
        return [
            (int(minute), int(count or 0), by_minute.get(int(minute), LatencyCounts()))
            for minute, count in sorted(calls.items())
            if count
        ]

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _lock(connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_WRITE_LOCK_KEY)))

    def _applied_among(self, connection: Connection, stream: str, ids: Sequence[EntryId]) -> set[EntryId]:
        watermark = self._watermark(connection, stream)
        seen = {entry_id for entry_id in ids if watermark is not None and entry_id <= watermark}
        low, high = min(ids), max(ids)
        table = schema.applied_batches
        overlapping = connection.execute(
            sa.select(table.c.entries).where(
                table.c.stream == stream,
                sa.or_(
                    table.c.last_ms > low.ms, sa.and_(table.c.last_ms == low.ms, table.c.last_seq >= low.seq)
                ),
                sa.or_(
                    table.c.first_ms < high.ms,
                    sa.and_(table.c.first_ms == high.ms, table.c.first_seq <= high.seq),
                ),
            )
        ).all()
        wanted = set(ids)
        for (listed,) in overlapping:
            seen.update(entry_id for entry_id in map(EntryId.parse, listed.split(",")) if entry_id in wanted)
        return seen

    @staticmethod
    def _watermark(connection: Connection, stream: str) -> EntryId | None:
        text = connection.execute(
            sa.select(schema.monitor_counters.c.text).where(
                schema.monitor_counters.c.name == _watermark_name(stream)
            )
        ).scalar()
        return EntryId.parse(text) if text else None

    def _counter(self, name: str) -> int:
        with self._engine.connect() as connection:
            value = connection.execute(
                sa.select(schema.monitor_counters.c.count).where(schema.monitor_counters.c.name == name)
            ).scalar()
        return int(value or 0)

    @staticmethod
    def _set_counter(connection: Connection, name: str, count: int, text: str) -> None:
        _upsert(
            connection,
            schema.monitor_counters,
            [{"name": name, "count": count, "text": text}],
            set_columns=("count", "text"),
        )

    @staticmethod
    def _increment(connection: Connection, name: str, count: int) -> None:
        _upsert(
            connection,
            schema.monitor_counters,
            [{"name": name, "count": count, "text": ""}],
            sum_columns=("count",),
        )

    @staticmethod
    def _add(connection: Connection, increments: Rollup) -> None:
        _upsert(
            connection,
            schema.offer_minutes,
            [
                {
                    "minute": minute,
                    "deployment": deployment,
                    "variant": variant,
                    "segment": segment,
                    "offer": offer,
                    "revision": revision,
                    "replica": replica,
                    "impressions": counts.impressions,
                    "explored_impressions": counts.explored_impressions,
                    "accepted": counts.accepted,
                    "reward_sum": counts.reward_sum,
                }
                for (
                    minute,
                    deployment,
                    variant,
                    segment,
                    offer,
                    revision,
                    replica,
                ), counts in increments.offers.items()
            ],
            sum_columns=("impressions", "explored_impressions", "accepted", "reward_sum"),
        )
        _upsert(
            connection,
            schema.decision_minutes,
            [
                {
                    "minute": minute,
                    "deployment": deployment,
                    "variant": variant,
                    "segment": segment,
                    "revision": revision,
                    "replica": replica,
                    "invocations": counts.invocations,
                    "explore_decisions": counts.explore_decisions,
                    "responses": counts.responses,
                    "late_responses": counts.late_responses,
                    "duplicate_responses": counts.duplicate_responses,
                    "last_seen": counts.last_seen,
                }
                for (
                    minute,
                    deployment,
                    variant,
                    segment,
                    revision,
                    replica,
                ), counts in increments.decisions.items()
            ],
            sum_columns=(
                "invocations",
                "explore_decisions",
                "responses",
                "late_responses",
                "duplicate_responses",
            ),
            max_columns=("last_seen",),
        )
        if increments.latency:
            _merge_latency(connection, increments)


def _merge_latency(connection: Connection, increments: Rollup) -> None:
    # Histograms merge in Python: a handful of rows per batch, under the write lock.
    table = schema.latency_minutes
    for (minute, deployment, method), counts in increments.latency.items():
        key = (table.c.minute == minute, table.c.deployment == deployment, table.c.method == method)
        row = connection.execute(
            sa.select(table.c.calls, table.c.max_seconds, table.c.buckets).where(*key)
        ).first()
        if row is None:
            connection.execute(
                table.insert().values(
                    minute=minute,
                    deployment=deployment,
                    method=method,
                    calls=counts.calls,
                    max_seconds=counts.max_seconds,
                    buckets=_buckets_text(counts.buckets),
                )
            )
            continue
        total = LatencyCounts(int(row[0]), float(row[1]), _buckets(row[2]))
        total.merge(counts)
        connection.execute(
            table.update()
            .where(*key)
            .values(calls=total.calls, max_seconds=total.max_seconds, buckets=_buckets_text(total.buckets))
        )


def _add_counts(target: OfferCounts, cell: OfferCounts) -> None:
    target.impressions += cell.impressions
    target.explored_impressions += cell.explored_impressions
    target.accepted += cell.accepted
    target.reward_sum += cell.reward_sum


def _buckets(text: str) -> dict[int, int]:
    return {int(index): int(calls) for index, calls in json.loads(text).items()}


def _buckets_text(buckets: dict[int, int]) -> str:
    return json.dumps({str(index): calls for index, calls in sorted(buckets.items())}, separators=(",", ":"))


def _in_window(table: sa.Table, deployment: str, start: int, end: int) -> list[sa.ColumnElement[bool]]:
    return [table.c.deployment == deployment, table.c.minute >= start, table.c.minute < end]


def _upsert(
    connection: Connection,
    table: sa.Table,
    rows: Iterable[dict[str, object]],
    *,
    sum_columns: Sequence[str] = (),
    max_columns: Sequence[str] = (),
    set_columns: Sequence[str] = (),
) -> None:
    """INSERT ... ON CONFLICT (primary key) DO UPDATE, adding, maximising or replacing columns."""
    values = list(rows)
    if not values:
        return
    dialect = connection.dialect.name
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    excluded = insert.excluded
    updates: dict[str, object] = {name: table.c[name] + excluded[name] for name in sum_columns}
    updates.update(
        {
            name: sa.func.greatest(table.c[name], excluded[name])
            if dialect == "postgresql"
            else sa.func.max(table.c[name], excluded[name])
            for name in max_columns
        }
    )
    updates.update({name: excluded[name] for name in set_columns})
    statement = insert.on_conflict_do_update(index_elements=list(table.primary_key.columns), set_=updates)
    connection.execute(statement, values)
