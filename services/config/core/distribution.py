"""Live distribution of revisions to replicas (the server half of Watch), with xDS/etcd semantics.

A replica subscribes with the revision it has. The session replays what it missed (or sends a full
snapshot when replay cannot cover it), then pushes every new revision of the deployments it
follows, with heartbeats carrying the head revision in between. The replica ACKs what it applied
or NACKs with a reason; the registry remembers, per replica and per deployment, what is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import Histogram

from libs.common.errors import InvalidArgument
from services.config.core.store import ConfigStore, StoredRevision

logger = logging.getLogger(__name__)

PROPAGATION_SECONDS = Histogram(
    "liveloop_config_propagation_seconds",
    "From a revision's commit to a replica's ACK of it",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Replaying more than this many changes costs more than a snapshot of the current state.
MAX_REPLAY = 500


# Messages of the Watch protocol, as domain types (the servicer maps them to protobuf) ----------


@dataclass(frozen=True)
class Subscribe:
    replica_id: str
    deployments: tuple[str, ...]
    known_revision: int
    service: str = ""
    version: str = ""


@dataclass(frozen=True)
class Ack:
    revision: int
    plugins: Mapping[str, str] = field(default_factory=dict)  # name -> version, as the replica reports


@dataclass(frozen=True)
class Nack:
    revision: int
    reason: str
    deployment: str = ""


ReplicaMessage = Subscribe | Ack | Nack


@dataclass(frozen=True)
class Snapshot:
    revision: int
    deployments: list[StoredRevision]
    refresh: bool


@dataclass(frozen=True)
class Update:
    change: StoredRevision


@dataclass(frozen=True)
class Heartbeat:
    head_revision: int
    server_time: datetime


ServerMessage = Snapshot | Update | Heartbeat


# Head-revision notifications -------------------------------------------------------------------


class RevisionFeed:
    """Wakes every session when the head revision moves. Publishes through this process notify at
    once; a slow poll of the database also catches revisions written by another config instance."""

    def __init__(self, store: ConfigStore, poll_seconds: float = 1.0) -> None:
        self._store = store
        self._poll_seconds = poll_seconds
        self._head = 0
        self._changed = asyncio.Condition()
        self._commit_times: dict[int, float] = {}
        self._poller: asyncio.Task[None] | None = None

    @property
    def head(self) -> int:
        return self._head

    async def start(self) -> None:
        self._head = await asyncio.to_thread(self._store.head_revision)
        self._poller = asyncio.create_task(self._poll(), name="config-revision-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def advance(self, revision: int) -> None:
        """Called after a commit: record when, and wake the sessions."""
        self._commit_times[revision] = time.monotonic()
        if len(self._commit_times) > 10_000:
            for old in sorted(self._commit_times)[:5_000]:
                del self._commit_times[old]
        async with self._changed:
            if revision > self._head:
                self._head = revision
                self._changed.notify_all()

    def committed_at(self, revision: int) -> float | None:
        return self._commit_times.get(revision)

    async def wait_beyond(self, revision: int, max_wait: float, wake: asyncio.Event) -> None:
        """Return when the head passes `revision`, `wake` is set, or `max_wait` seconds elapse."""

        async def head_moves() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self._head > revision)

        waiters = {asyncio.ensure_future(head_moves()), asyncio.ensure_future(wake.wait())}
        try:
            await asyncio.wait(waiters, timeout=max_wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                head = await asyncio.to_thread(self._store.head_revision)
            except Exception:  # the database may be briefly away; sessions keep heartbeating
                logger.warning("could not read the head revision", exc_info=True)
                continue
            if head > self._head:
                await self.advance(head)


# What the service knows about each replica ---------------------------------------------------


@dataclass
class ReplicaRecord:
    replica_id: str
    service: str = ""
    version: str = ""
    peer: str = ""
    deployments_followed: tuple[str, ...] = ()
    applied_revision: int = 0
    deployment_revisions: dict[str, int] = field(default_factory=dict)
    last_nack_revision: int = 0
    last_nack_reason: str = ""
    plugins: dict[str, str] = field(default_factory=dict)  # name -> version, from the last Ack
    last_seen: datetime = field(default_factory=lambda: datetime.now(UTC))
    connected: bool = False
    refresh: asyncio.Event = field(default_factory=asyncio.Event)
    # revision -> {deployment: deployment revision} sent and not yet acknowledged
    pending: dict[int, dict[str, int | None]] = field(default_factory=dict)
    sessions: int = 0


@dataclass(frozen=True)
class ReplicaReport:
    record: ReplicaRecord
    revisions_behind: int
    staleness_seconds: float


class ReplicaRegistry:
    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaRecord] = {}

    def get(self, replica_id: str) -> ReplicaRecord | None:
        return self._replicas.get(replica_id)

    def all(self) -> list[ReplicaRecord]:
        return [self._replicas[key] for key in sorted(self._replicas)]

    def connect(self, subscribe: Subscribe, peer: str) -> ReplicaRecord:
        record = self._replicas.get(subscribe.replica_id)
        if record is None:
            record = ReplicaRecord(replica_id=subscribe.replica_id)
            self._replicas[subscribe.replica_id] = record
        record.service, record.version, record.peer = subscribe.service, subscribe.version, peer
        record.deployments_followed = subscribe.deployments
        record.connected = True
        record.sessions += 1
        record.pending.clear()
        record.refresh.clear()
        record.last_seen = datetime.now(UTC)
        return record

    def disconnect(self, record: ReplicaRecord) -> None:
        record.sessions -= 1
        if record.sessions <= 0:
            record.connected = False

    def request_refresh(self, replica_id: str = "") -> int:
        targets = [
            r
            for r in self._replicas.values()
            if r.connected and (not replica_id or r.replica_id == replica_id)
        ]
        for record in targets:
            record.refresh.set()
        return len(targets)


# One Watch stream ------------------------------------------------------------------------------


class WatchSession:
    def __init__(
        self,
        store: ConfigStore,
        feed: RevisionFeed,
        registry: ReplicaRegistry,
        *,
        heartbeat_seconds: float,
    ) -> None:
        self._store = store
        self._feed = feed
        self._registry = registry
        self._heartbeat_seconds = heartbeat_seconds

    async def run(self, incoming: AsyncIterator[ReplicaMessage], peer: str) -> AsyncIterator[ServerMessage]:
        try:
            first = await anext(incoming)
        except StopAsyncIteration:
            return
        if not isinstance(first, Subscribe):
            raise InvalidArgument(
                "the first message on a Watch stream must be a subscribe", field="subscribe"
            )
        if not first.replica_id:
            raise InvalidArgument("must name the replica", field="subscribe.replica_id")
        if first.known_revision < 0:
            raise InvalidArgument("must not be negative", field="subscribe.known_revision")
        record = self._registry.connect(first, peer)
        logger.info(
            "replica %s subscribed at revision %d from %s", first.replica_id, first.known_revision, peer
        )
        reader = asyncio.create_task(self._read(incoming, record))
        try:
            async for message in self._push(first, record):
                yield message
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._registry.disconnect(record)
            logger.info("replica %s unsubscribed", record.replica_id)

    async def _push(self, subscribe: Subscribe, record: ReplicaRecord) -> AsyncIterator[ServerMessage]:
        followed = subscribe.deployments
        sent = subscribe.known_revision
        head = await asyncio.to_thread(self._store.head_revision)
        held_revisions: dict[str, int] | None = None
        if 0 < sent <= head and not record.deployment_revisions:
            # A registry that never saw this replica (this service restarted, say) takes its word
            # that it holds what it follows as of `sent`, so ReplicaStatus can list it.
            held, _ = await asyncio.to_thread(self._store.list_current, followed, sent)
            held_revisions = {d.deployment: d.revision for d in held}
        # The revision it holds (from its last-known-good copy) and what that revision holds are
        # set together, with no await in between: a status never shows one without the other.
        if held_revisions is not None:
            record.deployment_revisions = held_revisions
        if sent and not record.applied_revision:
            record.applied_revision = sent
        changes: list[StoredRevision] = []
        if 0 < sent <= head:
            changes = await asyncio.to_thread(self._store.changes_after, sent, followed, MAX_REPLAY + 1)
        if sent == 0 or sent > head or len(changes) > MAX_REPLAY:
            # Nothing to replay from (new replica, or a store that was reset), or too much.
            snapshot = await self._snapshot(record, followed, refresh=False)
            sent = snapshot.revision
            yield snapshot
        else:
            for change in changes:
                self._expect(record, change)
                yield Update(change)
            # The replay may reach past `head` (a commit between the two reads): never resend it.
            sent = max([head, *(change.revision for change in changes)])
            if not changes:
                yield Heartbeat(head, datetime.now(UTC))
        while True:
            await self._feed.wait_beyond(sent, self._heartbeat_seconds, record.refresh)
            if record.refresh.is_set():
                record.refresh.clear()
                snapshot = await self._snapshot(record, followed, refresh=True)
                sent = snapshot.revision
                yield snapshot
                continue
            if self._feed.head > sent:
                head = self._feed.head
                changes = await asyncio.to_thread(self._store.changes_after, sent, followed)
                for change in changes:
                    if change.revision > head:
                        break
                    self._expect(record, change)
                    yield Update(change)
                sent = head
                if not changes:
                    yield Heartbeat(head, datetime.now(UTC))
            else:
                yield Heartbeat(self._feed.head, datetime.now(UTC))

    async def _snapshot(self, record: ReplicaRecord, followed: Sequence[str], *, refresh: bool) -> Snapshot:
        deployments, head = await asyncio.to_thread(self._store.list_current, followed)
        record.pending[head] = {d.deployment: d.revision for d in deployments} | {
            name: None
            for name in record.deployment_revisions
            if name not in {d.deployment for d in deployments}
        }
        return Snapshot(head, deployments, refresh)

    @staticmethod
    def _expect(record: ReplicaRecord, change: StoredRevision) -> None:
        record.pending[change.revision] = {change.deployment: None if change.deleted else change.revision}

    async def _read(self, incoming: AsyncIterator[ReplicaMessage], record: ReplicaRecord) -> None:
        async for message in incoming:
            record.last_seen = datetime.now(UTC)
            if isinstance(message, Ack):
                self._acknowledge(record, message.revision)
                if message.plugins:
                    record.plugins = dict(message.plugins)
            elif isinstance(message, Nack):
                record.last_nack_revision = message.revision
                record.last_nack_reason = message.reason[:2000]
                record.pending.pop(message.revision, None)
                logger.warning(
                    "replica %s rejected revision %d: %s", record.replica_id, message.revision, message.reason
                )
            elif isinstance(message, Subscribe):
                record.refresh.set()  # a resubscribe on an open stream asks for a fresh snapshot

    def _acknowledge(self, record: ReplicaRecord, revision: int) -> None:
        applied = record.pending.pop(revision, None)
        if applied is not None:
            for deployment, deployment_revision in applied.items():
                if deployment_revision is None:
                    record.deployment_revisions.pop(deployment, None)
                else:
                    record.deployment_revisions[deployment] = deployment_revision
        record.applied_revision = max(record.applied_revision, revision)
        committed = self._feed.committed_at(revision)
        if committed is not None:
            PROPAGATION_SECONDS.observe(time.monotonic() - committed)


def replica_reports(
    store: ConfigStore, registry: ReplicaRegistry, replica_id: str = ""
) -> tuple[list[ReplicaReport], int]:
    """Per replica: how many revisions of what it follows it has not applied, and for how long."""
    head = store.head_revision()
    reports = []
    for record in registry.all():
        if replica_id and record.replica_id != replica_id:
            continue
        missing = store.changes_after(record.applied_revision, record.deployments_followed, limit=MAX_REPLAY)
        staleness = 0.0
        if missing:
            staleness = max((datetime.now(UTC) - missing[0].created_at).total_seconds(), 0.0)
        reports.append(ReplicaReport(record, len(missing), staleness))
    return reports, head
