"""The monitor's consumer of the decision log, on a real Redis and real SQL (SQLite and PostgreSQL):
exact counts, and no event lost or counted twice when an entry is delivered again, claimed by
another replica, replayed by rewinding the group, when SQL is unavailable for a while, when Redis
is killed and restarted, and when the monitor restarts mid-stream. Malformed entries and entries
trimmed before they were read are counted, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import uuid as uuid_module
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.common.database import apply_migrations, create_database_engine
from libs.common.decision_log import Contact, Response
from libs.stack.processes import free_port, redis_argv
from services.monitor.core.decision_archive import DecisionArchive
from services.monitor.core.decision_consumer import ConsumerOptions, DecisionLogConsumer
from services.monitor.core.rollup_store import RollupStore, WindowTotals
from services.monitor.core.schema import MIGRATIONS_PACKAGE, VERSION_TABLE
from tests.decision_records import contact, response
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

T0 = 1_765_000_020.0  # a fixed time: every record of these tests falls in the minutes after it


@dataclass
class Rig:
    redis: Redis
    store: RollupStore
    archive: DecisionArchive
    stream: str
    group: str
    deployment: str

    def consumer(self, name: str = "monitor-a", **options: Any) -> DecisionLogConsumer:
        values: dict[str, Any] = {
            "stream": self.stream,
            "group": self.group,
            "consumer": name,
            "block_ms": 20,
            "check_every_seconds": 0.0,
            "max_backoff_seconds": 0.2,
        }
        values.update(options)
        return DecisionLogConsumer(self.redis, self.store, self.archive, ConsumerOptions(**values))

    async def write(self, records: Sequence[Contact | Response]) -> list[str]:
        ids = []
        for record in records:
            entry: Any = record.encode()
            ids.append((await self.redis.xadd(self.stream, entry)).decode())
        return ids

    def totals(self) -> WindowTotals:
        return self.store.window(self.deployment, int(T0) - 3600, int(T0) + 3600)


async def drain(consumer: DecisionLogConsumer) -> None:
    """Steps until a step finds nothing to do."""
    for _ in range(10_000):
        if await consumer.step() == 0:
            return
    raise AssertionError("the consumer never caught up")


@pytest.fixture
async def rig(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    engine = create_database_engine(database_url)
    apply_migrations(engine, MIGRATIONS_PACKAGE, version_table=VERSION_TABLE)
    redis = Redis.from_url(redis_url)
    suffix = uuid_module.uuid4().hex[:8]
    try:
        yield Rig(
            redis,
            RollupStore(engine),
            DecisionArchive(tmp_path / "decisions", retention_hours=24 * 365 * 30),
            f"test-decisions-{suffix}",
            "monitor",
            f"deployment-{suffix}",
        )
    finally:
        await redis.aclose()
        engine.dispose()


def known_sequence(deployment: str) -> list[Contact | Response]:
    c1 = contact(deployment, time=T0 + 1, shown=("alpha", "bravo"), explored=(False, True), latency_ms=1.0)
    c2 = contact(deployment, time=T0 + 2, shown=("alpha", "charlie"), segment="south", replica="predictor-2")
    c3 = contact(deployment, time=T0 + 61, shown=("bravo", "alpha"), revision=2, latency_ms=3.0)
    return [
        c1,
        c2,
        c3,
        response(c1, ["alpha"]),
        response(c2, ["charlie"], reward=2.5),
        response(c1, ["alpha"], duplicate=True),
        response(c3, ["bravo"], late=True),
    ]


def assert_known_totals(totals: WindowTotals) -> None:
    assert (totals.invocations, totals.responses, totals.late_responses, totals.duplicate_responses) == (
        3,
        4,
        1,
        1,
    )
    assert totals.explore_decisions == 1
    by_offer = {
        offer: (row.impressions, row.accepted, row.reward_sum, row.explored_impressions)
        for offer, row in totals.by_offer.items()
    }
    assert by_offer == {"alpha": (3, 1, 1.0, 0), "bravo": (2, 0, 0.0, 1), "charlie": (1, 1, 2.5, 0)}
    by_segment = {segment: (row.impressions, row.accepted) for segment, row in totals.by_segment.items()}
    assert by_segment == {"north": (4, 1), "south": (2, 1)}
    assert {key: row.accepted for key, row in totals.by_offer_segment.items()} == {
        ("alpha", "north"): 1,
        ("bravo", "north"): 0,
        ("alpha", "south"): 0,
        ("charlie", "south"): 1,
    }
    replicas = {row.replica: (row.revision, row.invocations) for row in totals.replicas}
    assert replicas == {"predictor-1": (2, 2), "predictor-2": (1, 1)}
    invoke = totals.latency["/liveloop.predictor.v1.PredictorService/Invoke"]
    assert invoke.calls == 3
    assert invoke.max_seconds == pytest.approx(0.003)


async def test_a_known_sequence_is_counted_exactly_and_archived_once(rig: Rig) -> None:
    records = known_sequence(rig.deployment)
    await rig.write(records)
    consumer = rig.consumer()
    await drain(consumer)
    assert consumer.state.applied == len(records)
    assert_known_totals(rig.totals())
    contacts = rig.archive.contacts(rig.deployment, T0, T0 + 3600)
    responses = rig.archive.responses(rig.deployment, T0, T0 + 3600)
    assert contacts.column("uuid").to_pylist() == [r.uuid for r in records[:3]]
    assert responses.num_rows == 4
    assert contacts.column("shown").to_pylist()[0] == ["alpha", "bravo"]
    pending = await rig.redis.xpending(rig.stream, rig.group)
    assert pending["pending"] == 0


async def test_entries_arriving_within_the_batch_interval_are_applied_as_one_batch(rig: Rig) -> None:
    records = known_sequence(rig.deployment)
    await rig.write(records[:1])
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 1:
            await rig.write(records[1:])  # what the replicas log while the consumer waits

    consumer = DecisionLogConsumer(
        rig.redis,
        rig.store,
        rig.archive,
        ConsumerOptions(stream=rig.stream, group=rig.group, block_ms=20, batch_interval_seconds=0.5),
        pause=pause,
    )
    assert await consumer.step() == 1
    assert len(pauses) == 1
    assert 0.0 < pauses[0] <= 0.5  # the interval, less the time the first batch took
    assert await consumer.step() == len(records) - 1  # one batch, not one per entry
    assert consumer.state.batches == 2
    assert len(pauses) == 2  # that batch was not full either
    assert_known_totals(rig.totals())


async def test_an_entry_delivered_again_after_a_crash_before_the_acknowledgement_counts_once(
    rig: Rig,
) -> None:
    records = known_sequence(rig.deployment)
    await rig.write(records)
    dying = rig.consumer("monitor-a")

    async def no_ack(*_args: Any) -> None:
        raise RedisConnectionError("killed before XACK")

    dying._redis = _RedisWithout(rig.redis, xack=no_ack)  # type: ignore[assignment]
    with pytest.raises(RedisConnectionError):
        await dying.step()
    assert dying.state.applied == 0  # counted in SQL, but the step never finished
    restarted = rig.consumer("monitor-a")  # same name: reads its own pending entries first
    await drain(restarted)
    assert (restarted.state.applied, restarted.state.skipped) == (0, len(records))
    assert_known_totals(rig.totals())
    assert rig.archive.contacts(rig.deployment, T0, T0 + 3600).num_rows == 3


async def test_another_replica_claims_what_a_dead_one_held_and_counts_it_once(rig: Rig) -> None:
    records = known_sequence(rig.deployment)
    await rig.write(records)
    dead = rig.consumer("monitor-dead")
    await dead._ensure_group()
    assert len(await dead._read(">", block=False)) == len(records)  # delivered, never applied
    alive = rig.consumer("monitor-alive", claim_idle_ms=0)
    await drain(alive)
    assert alive.state.applied == len(records)
    assert_known_totals(rig.totals())
    assert (await rig.redis.xpending(rig.stream, rig.group))["pending"] == 0


async def test_rewinding_the_group_replays_nothing(rig: Rig) -> None:
    records = known_sequence(rig.deployment)
    await rig.write(records)
    consumer = rig.consumer()
    await drain(consumer)
    await rig.redis.xgroup_setid(rig.stream, rig.group, "0")
    await drain(consumer)
    assert consumer.state.skipped == len(records)  # found in the ledger
    await consumer.check_stream()  # raises the watermark: the ledger rows go
    assert rig.store.ledger_rows(rig.stream) == 0
    await rig.redis.xgroup_setid(rig.stream, rig.group, "0")
    await drain(consumer)
    assert consumer.state.skipped == 2 * len(records)  # below the watermark
    assert_known_totals(rig.totals())


async def test_malformed_entries_are_counted_by_kind_and_never_stop_the_consumer(rig: Rig) -> None:
    good = contact(rig.deployment, time=T0 + 1)
    await rig.redis.xadd(rig.stream, {"kind": "contact", "uuid": "x", "schema": "99", "body": "{}"})
    await rig.redis.xadd(rig.stream, {"kind": "contact", "uuid": "y", "schema": "1", "body": "not json"})
    await rig.redis.xadd(rig.stream, {"kind": "contact", "uuid": "z", "schema": "1", "body": "{}"})
    await rig.redis.xadd(rig.stream, {"kind": "contact", "schema": "1", "body": "{}"})
    await rig.write([good])
    consumer = rig.consumer()
    await drain(consumer)
    assert rig.store.malformed() == {"unknown_schema": 1, "malformed_body": 2, "missing_uuid": 1}
    assert consumer.state.applied == 1
    assert rig.totals().invocations == 1
    assert (await rig.redis.xpending(rig.stream, rig.group))["pending"] == 0


async def test_entries_trimmed_before_they_were_read_are_counted(rig: Rig) -> None:
    consumer = rig.consumer()
    await consumer._ensure_group()
    await rig.write([contact(rig.deployment, time=T0 + i) for i in range(10)])
    await rig.redis.xtrim(rig.stream, maxlen=4, approximate=False)
    await drain(consumer)
    assert rig.store.trimmed(rig.stream) == 6
    assert consumer.state.applied == 4
    await consumer.check_stream()
    assert rig.store.trimmed(rig.stream) == 6  # the same gap is not counted twice
    assert consumer.state.lag == 0


async def test_a_monitor_restarted_mid_stream_loses_and_repeats_nothing(rig: Rig) -> None:
    records: list[Contact | Response] = []
    for i in range(40):
        shown = contact(rig.deployment, time=T0 + i, shown=("alpha",))
        records += [shown, response(shown, ["alpha"])]
    await rig.write(records)
    first = rig.consumer("monitor-a", batch_size=7)
    task = asyncio.create_task(first.run())
    await eventually(holds(lambda: first.state.applied >= 20), what="a few batches applied")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    second = rig.consumer("monitor-a", batch_size=7)
    await drain(second)
    # A batch the cancelled consumer committed but never acknowledged is skipped by the second.
    assert first.state.applied + second.state.applied + second.state.skipped == len(records)
    totals = rig.totals()
    assert (totals.invocations, totals.responses) == (40, 40)
    assert totals.by_offer["alpha"].accepted == 40


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sql_unavailable_for_a_while_delays_counting_but_loses_nothing(
    rig: Rig, database_url: str
) -> None:
    records = known_sequence(rig.deployment)
    consumer = rig.consumer()
    await consumer._ensure_group()
    path = sa.make_url(database_url).database
    assert path is not None
    # The blocker's calls run in a thread: the event loop (and pytest's timeout) never wait on SQLite.
    blocker = await asyncio.to_thread(
        sqlite3.connect, path, isolation_level=None, timeout=1, check_same_thread=False
    )
    await asyncio.to_thread(blocker.execute, "BEGIN EXCLUSIVE")  # nobody else can write until it ends
    task = asyncio.create_task(consumer.run())
    try:
        await rig.write(records)
        await eventually(
            holds(lambda: consumer.state.errors["sql"] >= 1), within=30, what="a failed SQL commit"
        )
        assert (await rig.redis.xpending(rig.stream, rig.group))["pending"] == len(
            records
        )  # not acknowledged
        await asyncio.to_thread(blocker.execute, "ROLLBACK")
        await eventually(
            holds(lambda: consumer.state.applied == len(records)), within=30, what="the batch applied"
        )
    finally:
        await asyncio.to_thread(blocker.close)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    assert_known_totals(rig.totals())
    assert (await rig.redis.xpending(rig.stream, rig.group))["pending"] == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_redis_killed_and_restarted_loses_no_acknowledged_entry(rig: Rig, tmp_path: Path) -> None:
    port = free_port()
    argv = [*redis_argv(port, tmp_path / "redis", persistent=True), "--appendfsync", "always"]
    with _redis_process(argv) as process:
        redis = Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1)
        await eventually(_pings(redis), what="redis up")
        rig.redis = redis
        consumer = rig.consumer()
        task = asyncio.create_task(consumer.run())
        try:
            first = [contact(rig.deployment, time=T0 + i) for i in range(5)]
            await rig.write(first)
            await eventually(holds(lambda: consumer.state.applied == 5), what="the first entries applied")
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            await eventually(holds(lambda: consumer.state.errors["redis"] >= 1), what="the consumer noticing")
            with _redis_process(argv):
                await eventually(_pings(redis), what="redis back")
                second = [contact(rig.deployment, time=T0 + 10 + i) for i in range(5)]
                await rig.write(second)
                await eventually(
                    holds(lambda: consumer.state.applied == 10), within=30, what="the rest applied"
                )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await redis.aclose()
    assert rig.totals().invocations == 10


def holds(predicate: Any) -> Any:
    async def probe() -> bool:
        return bool(predicate())

    return probe


def _pings(redis: Redis) -> Any:
    async def answers() -> bool:
        try:
            return bool(await redis.ping())
        except (RedisConnectionError, OSError):
            return False

    return answers


@contextlib.contextmanager
def _redis_process(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


class _RedisWithout:
    """A Redis client whose named commands fail, the rest going through."""

    def __init__(self, redis: Redis, **replaced: Any) -> None:
        self._redis = redis
        self._replaced = replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced.get(name) or getattr(self._redis, name)


async def test_an_unexpected_error_is_retried_and_never_stops_the_consumer(rig: Rig) -> None:
    records = known_sequence(rig.deployment)
    await rig.write(records)
    consumer = rig.consumer()
    real_write = rig.archive.write
    failures = []

    def failing_once(entries: Any) -> Any:
        if not failures:
            failures.append(1)
            raise RuntimeError("a bug in the archive")
        return real_write(entries)

    rig.archive.write = failing_once  # type: ignore[method-assign]
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(
            holds(lambda: consumer.state.applied == len(records)), what="applied after the failure"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    assert consumer.state.errors["unexpected"] == 1
    assert_known_totals(rig.totals())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_archive_files_of_an_earlier_schema_are_read_and_compacted_with_new_ones(rig: Rig) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from services.monitor.core.decision_archive import CONTACT_SCHEMA

    records = known_sequence(rig.deployment)
    await rig.write(records)
    await drain(rig.consumer())
    (partition,) = (rig.archive.root / "contacts").glob("*/*")
    current = pq.read_table(next(partition.glob("*.parquet")))
    # The same rows as an older monitor wrote them: float64 scores, no latency column.
    older = current.drop_columns(["latency_ms"]).set_column(
        current.schema.get_field_index("scores"),
        pa.field("scores", pa.list_(pa.float64())),
        current.column("scores").cast(pa.list_(pa.float64())),
    )
    pq.write_table(older, partition / "part-older.parquet")
    contacts = rig.archive.contacts(rig.deployment, T0, T0 + 3600)
    assert contacts.schema == CONTACT_SCHEMA
    assert contacts.num_rows == 3  # the same entries, once
    assert rig.archive.compact(partition)
    assert len(list(partition.glob("*.parquet"))) == 1
    assert rig.archive.contacts(rig.deployment, T0, T0 + 3600).num_rows == 3
