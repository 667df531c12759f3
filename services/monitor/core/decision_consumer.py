"""The monitor's consumer of the decision log: a Redis consumer group on `ll:decisions`.

Each batch is archived (Parquet), then counted in SQL together with its ledger row, and only then
acknowledged (XACK). What fails in between leaves the entries pending: this consumer reads its own
pending entries again first, and a live replica claims (XAUTOCLAIM) the entries a dead one held.
The ledger makes a second delivery count nothing, so several replicas can share the group and any
of Redis, SQL or the monitor can restart without an event lost or counted twice.

Entries that cannot be read (unknown schema, malformed body) are acknowledged, counted by kind and
logged once per kind. The stream is capped by the predictors: entries trimmed before the group read
them are counted (`trimmed`), and the group's lag is reported.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid as uuid_module
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import SQLAlchemyError

from libs.common import redis_keys
from libs.common.decision_log import Contact, MalformedEntry, decode_entry
from services.monitor.core import metrics
from services.monitor.core.decision_archive import DecisionArchive
from services.monitor.core.rollup_store import EntryId, RollupStore, StreamEntry

logger = logging.getLogger(__name__)

DEFAULT_GROUP = "liveloop-monitor"


@dataclass(frozen=True)
class ConsumerOptions:
    stream: str = redis_keys.DECISION_STREAM
    group: str = DEFAULT_GROUP
    start_at_newest: bool = False  # a new group reads only entries added after it was created
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid_module.uuid4().hex[:6]}")
    batch_size: int = 1000
    # A batch that is not full is followed by the next no sooner than this (0: at once): under load
    # the entries of the interval are applied together, paying a batch's archive file and SQL
    # transaction once, at the cost of that much delay on the monitor's view.
    batch_interval_seconds: float = 0.0
    block_ms: int = 500
    claim_idle_ms: int = 30_000  # another consumer's entry pending this long is taken over
    check_every_seconds: float = 5.0  # lag, trimmed entries, ledger pruning
    max_backoff_seconds: float = 5.0


@dataclass
class ConsumerState:
    """What the consumer has done since it started, for metrics and tests."""

    applied: int = 0
    skipped: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    lag: int | None = None
    trimmed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    last_error: str = ""
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)


class DecisionLogConsumer:
    def __init__(
        self,
        redis: Redis,
        store: RollupStore,
        archive: DecisionArchive,
        options: ConsumerOptions | None = None,
        on_batch: Callable[[ConsumerState], None] | None = None,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._redis = redis
        self._pause = pause
        self._store = store
        self._archive = archive
        self.options = options or ConsumerOptions()
        self.state = ConsumerState()
        self._on_batch = on_batch
        self._logged_kinds: set[str] = set()
        self._next_check = 0.0
        self._read_own_pending = True
        self._group_ready = False
        self._next_claim = 0.0

    async def run(self) -> None:
        """Until cancelled. Errors of Redis or SQL back off and retry; nothing is acknowledged unapplied."""
        backoff = 0.1
        while True:
            try:
                while True:
                    stop_if_cancelled()
                    await self.step()
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self._failed("redis", exc)
            except SQLAlchemyError as exc:
                self._failed("sql", exc)
                # The batch stays pending: read it again from this consumer's pending list.
                self._read_own_pending = True
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    self._failed("redis", exc)
                else:
                    # Redis lost the stream or the group (a restart without persistence): make it again.
                    self._failed("nogroup", exc)
                    self._group_ready = False
            except Exception as exc:
                # Never die silently: whatever failed (the archive, a bug), the batch stays pending and
                # is tried again; the errors metric and the lag alert make a stuck consumer visible.
                logger.exception("decision log consumer: unexpected error, will retry")
                self._failed("unexpected", exc)
                self._read_own_pending = True
            stop_if_cancelled()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.options.max_backoff_seconds)

    def _failed(self, reason: str, exc: BaseException) -> None:
        self.state.errors[reason] += 1
        metrics.CONSUMER_ERRORS.labels(reason).inc()
        self.state.last_error = f"{reason}: {exc}"
        logger.warning("decision log consumer: %s error, will retry: %s", reason, exc)

    async def step(self) -> int:
        """One read-apply-acknowledge round; returns the entries handled."""
        if not self._group_ready:
            await self._ensure_group()
        if time.monotonic() >= self._next_check:
            await self.check_stream()
            self._next_check = time.monotonic() + self.options.check_every_seconds
        raw: list[tuple[Any, Any]] = []
        if self._read_own_pending:
            raw = await self._read("0", block=False)
            self._read_own_pending = bool(raw)
        if not raw and time.monotonic() >= self._next_claim:
            raw = await self._claim()
            if not raw:
                self._next_claim = time.monotonic() + min(self.options.claim_idle_ms / 2000, 5.0)
        if not raw:
            raw = await self._read(">", block=True)
        if not raw:
            self.state.caught_up.set()
            return 0
        self.state.caught_up.clear()
        started = time.monotonic()
        await self._handle(raw)
        if len(raw) < self.options.batch_size and self.options.batch_interval_seconds > 0:
            await self._pause(max(0.0, self.options.batch_interval_seconds - (time.monotonic() - started)))
        return len(raw)

    async def _ensure_group(self) -> None:
        self._group_ready = True
        try:
            await self._redis.xgroup_create(
                self.options.stream,
                self.options.group,
                id="$" if self.options.start_at_newest else "0",
                mkstream=True,
            )
            logger.info("created consumer group %s on %s", self.options.group, self.options.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self, start: str, block: bool) -> list[tuple[Any, Any]]:
        reply: Any = await self._redis.xreadgroup(
            self.options.group,
            self.options.consumer,
            {self.options.stream: start},
            count=self.options.batch_size,
            block=self.options.block_ms if block else None,
        )
        if not reply:
            return []
        entries: list[tuple[Any, Any]] = reply[0][1]
        return entries

    async def _claim(self) -> list[tuple[Any, Any]]:
        reply = await self._redis.xautoclaim(
            self.options.stream,
            self.options.group,
            self.options.consumer,
            min_idle_time=self.options.claim_idle_ms,
            start_id="0-0",
            count=self.options.batch_size,
        )
        claimed: list[tuple[Any, Any]] = reply[1] if reply else []
        deleted = reply[2] if reply and len(reply) > 2 else []
        if deleted:
            # Pending entries trimmed before anyone applied them: gone, count them.
            self.state.trimmed += len(deleted)
            metrics.ENTRIES_TRIMMED.inc(len(deleted))
            await asyncio.to_thread(
                self._store.count_trimmed, self.options.stream, len(deleted), f"claimed:{_text(deleted[0])}"
            )
        return claimed

    async def _handle(self, raw: Sequence[tuple[Any, Any]]) -> None:
        entries: list[StreamEntry] = []
        malformed: Counter[str] = Counter()
        unreadable_ids = []
        gone = 0
        for raw_id, fields in raw:
            entry_id = EntryId.parse(_text(raw_id))
            if not fields:
                # A pending entry the stream no longer holds (trimmed after delivery).
                gone += 1
                unreadable_ids.append(raw_id)
                continue
            try:
                entries.append(StreamEntry(entry_id, decode_entry(fields)))
            except MalformedEntry as exc:
                malformed[exc.kind] += 1
                unreadable_ids.append(raw_id)
                if exc.kind not in self._logged_kinds:
                    self._logged_kinds.add(exc.kind)
                    logger.warning(
                        "decision log entry %s not read (%s); further ones are only counted", raw_id, exc
                    )
        if entries:
            await asyncio.to_thread(self._archive.write, entries)
        batch = uuid_module.uuid4().hex
        applied = await asyncio.to_thread(self._store.apply, self.options.stream, batch, entries)
        if malformed:
            await asyncio.to_thread(self._store.count_malformed, dict(malformed))
        if gone:
            await asyncio.to_thread(
                self._store.count_trimmed, self.options.stream, gone, f"pending:{_text(raw[0][0])}"
            )
        await self._redis.xack(self.options.stream, self.options.group, *[raw_id for raw_id, _ in raw])
        contacts = sum(isinstance(entry.record, Contact) for entry in entries)
        metrics.ENTRIES_CONSUMED.labels("contact").inc(contacts)
        metrics.ENTRIES_CONSUMED.labels("response").inc(len(entries) - contacts)
        for reason, count in malformed.items():
            metrics.ENTRIES_MALFORMED.labels(reason).inc(count)
        metrics.ENTRIES_TRIMMED.inc(gone)
        self.state.applied += applied.applied
        self.state.skipped += applied.skipped
        self.state.malformed.update(malformed)
        self.state.trimmed += gone
        self.state.batches += 1
        if self._on_batch is not None:
            self._on_batch(self.state)

    async def check_stream(self) -> None:
        """Lag and trimmed-before-read from XINFO; prune the ledger below the oldest pending entry."""
        try:
            stream = await self._redis.xinfo_stream(self.options.stream)
            groups = await self._redis.xinfo_groups(self.options.stream)
        except ResponseError:
            return  # no stream yet
        group = next((g for g in groups if _text(g.get("name")) == self.options.group), None)
        if group is None:
            return
        last_delivered = EntryId.parse(_text(group.get("last-delivered-id", "0-0")))
        lag = group.get("lag")
        self.state.lag = int(lag) if lag is not None else None
        if self.state.lag is not None:
            metrics.CONSUMER_LAG.set(self.state.lag)
        first = stream.get("first-entry")
        added, read = stream.get("entries-added"), group.get("entries-read")
        length = int(stream.get("length", 0))
        if read is None and last_delivered == EntryId(0, 0):
            read = 0  # a group that has read nothing yet reports no count
        if first and added is not None and read is not None:
            first_id = EntryId.parse(_text(first[0]))
            gap = int(added) - length - int(read)
            if last_delivered < first_id and gap > 0:
                marker = f"gap:{last_delivered}"
                if await asyncio.to_thread(self._store.count_trimmed, self.options.stream, gap, marker):
                    self.state.trimmed += gap
                    metrics.ENTRIES_TRIMMED.inc(gap)
                    logger.warning(
                        "%d decision log entries were trimmed before the monitor read them (stream capped)",
                        gap,
                    )
        # Everything below the oldest pending entry and at or below the last delivered one is
        # applied (or gone): the ledger rows there are no longer needed.
        pending = await self._redis.xpending(self.options.stream, self.options.group)
        oldest = pending.get("min") if pending and pending.get("pending") else None
        floor = last_delivered
        if oldest is not None:
            oldest_id = EntryId.parse(_text(oldest))
            floor = min(
                floor,
                EntryId(oldest_id.ms, oldest_id.seq - 1)
                if oldest_id.seq
                else EntryId(oldest_id.ms - 1, 2**63 - 1),
            )
        if floor > EntryId(0, 0):
            await asyncio.to_thread(self._store.raise_watermark, self.options.stream, floor)

    def stats(self) -> dict[str, Any]:
        return {
            "applied": self.state.applied,
            "skipped": self.state.skipped,
            "batches": self.state.batches,
            "lag": self.state.lag,
            "malformed": dict(self.state.malformed),
            "errors": dict(self.state.errors),
        }


def stop_if_cancelled() -> None:
    """redis-py can turn a cancellation that lands inside a command into a connection error: the
    task was still asked to stop, and must not retry forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
