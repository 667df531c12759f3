"""The config store against real SQLite files and PostgreSQL databases (see conftest.py)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from libs.common.database import apply_migrations, create_database_engine
from libs.common.deployment_spec import (
    DeploymentSpec,
    canonical_json,
    deployment_spec_from_mapping,
    spec_checksum,
)
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.config.core import distribution
from services.config.core.schema import (
    CHANGE_KIND_DELETE,
    CHANGE_KIND_PUBLISH,
    CHANGE_KIND_ROLLBACK,
    MIGRATIONS_PACKAGE,
    VERSION_TABLE,
    config_audit,
    deployment_revisions,
)
from services.config.core.store import ConfigStore, StoredRevision

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

T = TypeVar("T")


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_database_engine(database_url)
    try:
        apply_migrations(engine, MIGRATIONS_PACKAGE, version_table=VERSION_TABLE)
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def store(engine: sa.Engine) -> ConfigStore:
    return ConfigStore(engine)


def spec(name: str = "offers", price: float = 5.0, **extra: Any) -> DeploymentSpec:
    document = {"name": name, "offers": [{"id": "a", "price": price}, {"id": "b"}], **extra}
    return deployment_spec_from_mapping(document)


def rows(engine: sa.Engine) -> list[sa.Row[Any]]:
    with engine.connect() as connection:
        return list(
            connection.execute(sa.select(deployment_revisions).order_by(deployment_revisions.c.revision))
        )


def test_publish_numbers_revisions_from_one(store: ConfigStore) -> None:
    assert store.head_revision() == 0
    first = store.publish(spec(price=5), author="alice", message="first")
    assert (first.revision, first.deployment, first.changed, first.dry_run) == (1, "offers", True, False)
    assert first.diff.startswith("--- /dev/null\n+++ offers@1\n")
    second = store.publish(spec(price=6), author="bob")
    assert (second.revision, second.changed) == (2, True)
    assert '-      "price": 5.0,' in second.diff
    assert '+      "price": 6.0,' in second.diff
    assert second.diff.startswith("--- offers@1\n+++ offers@2\n")
    assert store.head_revision() == 2

    stored, head = store.get("offers")
    assert (stored.revision, head, stored.author, stored.change_kind) == (2, 2, "bob", CHANGE_KIND_PUBLISH)
    assert stored.spec_json == canonical_json(spec(price=6))
    assert stored.checksum == spec_checksum(stored.spec_json)
    assert stored.created_at.tzinfo is not None
    assert deployment_spec_from_mapping(json.loads(stored.spec_json)) == spec(price=6)


def test_identical_content_makes_no_new_revision(store: ConfigStore, engine: sa.Engine) -> None:
    store.publish(spec(), author="alice")
    again = store.publish(spec(), author="bob", message="same again")
    assert (again.revision, again.changed, again.diff, again.stored) == (1, False, "", None)
    # Written differently (defaults spelled out, keys in another order): still the same content.
    explicit = deployment_spec_from_mapping(
        {
            "offers": [{"price": 5.0, "id": "a", "name": "a", "weighting": 1.0}, {"id": "b", "cost": 0}],
            "campaigns": ["offers"],
            "environment": "dev",
            "algorithm": {"approach": "thompson", "alpha0": 1.0},
            "name": "offers",
        }
    )
    assert store.publish(explicit, author="carol").changed is False
    assert len(rows(engine)) == 1
    # A real change still makes one.
    assert store.publish(spec(price=1), author="alice").revision == 2


def test_expected_revision_must_match_the_head_of_the_deployment(store: ConfigStore) -> None:
    store.publish(spec(price=1), author="alice")
    store.publish(spec(price=2), author="alice")
    with pytest.raises(FailedPrecondition) as raised:
        store.publish(spec(price=3), author="bob", expected_revision=1)
    assert raised.value.field == "expected_revision"
    assert "at revision 2, not 1" in raised.value.message
    assert store.head_revision() == 2
    assert store.publish(spec(price=3), author="bob", expected_revision=2).revision == 3
    # A deployment that does not exist yet has no revision to expect.
    with pytest.raises(FailedPrecondition):
        store.publish(spec("other"), author="bob", expected_revision=3)


def test_get_at_a_revision_returns_the_spec_as_it_was(store: ConfigStore) -> None:
    store.publish(spec(price=1), author="alice")
    store.publish(spec("other"), author="alice")
    store.publish(spec(price=3), author="alice")
    old, head = store.get("offers", revision=2)  # revision 2 changed another deployment
    assert (old.revision, head) == (1, 3)
    assert json.loads(old.spec_json)["offers"][0]["price"] == 1.0
    assert store.get("offers", revision=3)[0].revision == 3
    assert store.get("offers")[0].revision == 3
    with pytest.raises(NotFound) as raised:
        store.get("other", revision=1)
    assert raised.value.field == "deployment"
    assert "at revision 1" in raised.value.message
    with pytest.raises(InvalidArgument):
        store.get("offers", revision=-1)


def test_history_is_newest_first_with_diffs(store: ConfigStore) -> None:
    store.publish(spec(price=1), author="alice", message="one")
    store.publish(spec("other"), author="bob")
    store.publish(spec(price=2), author="carol", message="two")
    entries = store.history("offers")
    assert [entry.stored.revision for entry in entries] == [3, 1]
    assert [entry.stored.message for entry in entries] == ["two", "one"]
    assert '-      "price": 1.0,' in entries[0].diff
    assert '+      "price": 2.0,' in entries[0].diff
    assert entries[1].diff.startswith("--- previous\n+++ revision 1\n")
    # All deployments, paged with a limit and a cursor.
    assert [e.stored.revision for e in store.history()] == [3, 2, 1]
    assert [e.stored.revision for e in store.history(limit=2)] == [3, 2]
    assert [e.stored.revision for e in store.history(limit=2, before_revision=2)] == [1]
    assert [e.stored.deployment for e in store.history("other")] == ["other"]


def test_rollback_republishes_an_old_payload_under_a_new_revision(store: ConfigStore) -> None:
    store.publish(spec(price=1), author="alice")
    store.publish(spec(price=2), author="alice")
    dry = store.rollback("offers", 1, author="bob", dry_run=True)
    assert (dry.revision, dry.changed, dry.dry_run, dry.stored) == (3, True, True, None)
    assert store.head_revision() == 2

    result = store.rollback("offers", 1, author="bob")
    assert (result.revision, result.changed) == (3, True)
    stored, _ = store.get("offers")
    assert stored.spec_json == store.get("offers", revision=1)[0].spec_json
    assert (stored.change_kind, stored.source_revision, stored.author) == (CHANGE_KIND_ROLLBACK, 1, "bob")
    assert stored.message == "rollback to revision 1"
    history = store.history("offers")
    assert history[0].stored.source_revision == 1
    assert '+      "price": 1.0,' in history[0].diff
    # Rolling back to what is already live changes nothing.
    assert store.rollback("offers", 3, author="bob").changed is False
    assert store.rollback("offers", 1, author="bob").changed is False


def test_rollback_refuses_what_it_cannot_restore(store: ConfigStore) -> None:
    store.publish(spec(), author="alice")
    store.publish(spec("other"), author="alice")
    with pytest.raises(NotFound) as not_found:
        store.rollback("offers", 99, author="bob")
    assert not_found.value.field == "to_revision"
    with pytest.raises(InvalidArgument, match="belongs to deployment 'other'"):
        store.rollback("offers", 2, author="bob")
    with pytest.raises(InvalidArgument) as zero:
        store.rollback("offers", 0, author="bob")
    assert zero.value.field == "to_revision"
    store.delete("other", author="bob")
    with pytest.raises(InvalidArgument, match="is a deletion"):
        store.rollback("other", 3, author="bob")


def test_delete_removes_the_deployment_and_rollback_restores_it(store: ConfigStore) -> None:
    store.publish(spec(price=1), author="alice")
    store.publish(spec("other"), author="alice")
    deleted = store.delete("offers", author="bob", message="retired")
    assert (deleted.revision, deleted.changed) == (3, True)
    assert deleted.stored is not None
    assert deleted.stored.deleted
    with pytest.raises(NotFound) as raised:
        store.get("offers")
    assert raised.value.field == "deployment"
    assert "deleted at revision 3" in raised.value.message
    current, head = store.list_current()
    assert ([d.deployment for d in current], head) == (["other"], 3)
    assert store.history("offers")[0].stored.change_kind == CHANGE_KIND_DELETE
    assert store.get("offers", revision=2)[0].revision == 1  # the past is still readable
    with pytest.raises(NotFound):
        store.delete("offers", author="bob")  # already gone

    restored = store.rollback("offers", 1, author="bob")
    assert restored.revision == 4
    assert store.get("offers")[0].spec_json == canonical_json(spec(price=1))
    assert [d.deployment for d in store.list_current()[0]] == ["offers", "other"]
    # Publishing a deleted deployment's old content again is a change too.
    store.delete("other", author="bob")
    assert store.publish(spec("other"), author="bob").revision == 6


def test_unknown_deployments_are_not_found(store: ConfigStore) -> None:
    store.publish(spec(), author="alice")
    for attempt in (
        lambda: store.get("nope"),
        lambda: store.history("nope"),
        lambda: store.delete("nope", author="bob"),
        lambda: store.rollback("nope", 1, author="bob"),  # revision 1 is another deployment's
    ):
        with pytest.raises(NotFound) as raised:
            attempt()
        assert raised.value.field == "deployment"
        assert "'nope'" in raised.value.message
    assert store.history("nope", before_revision=1) == []


def test_list_current_and_changes_after(store: ConfigStore) -> None:
    store.publish(spec("b-deployment"), author="alice")
    store.publish(spec("a-deployment"), author="alice")
    store.publish(spec("b-deployment", price=9), author="alice")
    current, head = store.list_current()
    assert [(d.deployment, d.revision) for d in current] == [("a-deployment", 2), ("b-deployment", 3)]
    assert head == 3
    assert [d.deployment for d in store.list_current(["b-deployment", "missing"])[0]] == ["b-deployment"]
    # As of an earlier revision (what a replica that holds that revision serves).
    as_of_two, head = store.list_current(at_revision=2)
    assert ([(d.deployment, d.revision) for d in as_of_two], head) == (
        [("a-deployment", 2), ("b-deployment", 1)],
        3,
    )
    assert [(d.deployment, d.revision) for d in store.list_current(["b-deployment"], at_revision=1)[0]] == [
        ("b-deployment", 1)
    ]
    assert [c.revision for c in store.changes_after(0)] == [1, 2, 3]
    assert [c.revision for c in store.changes_after(1)] == [2, 3]
    assert [c.revision for c in store.changes_after(0, ["b-deployment"])] == [1, 3]
    assert [c.revision for c in store.changes_after(1, limit=1)] == [2]
    assert store.changes_after(3) == []
    store.delete("a-deployment", author="alice")
    assert [d.deployment for d in store.list_current(at_revision=4)[0]] == ["b-deployment"]
    assert [d.deployment for d in store.list_current(at_revision=3)[0]] == ["a-deployment", "b-deployment"]
    assert [c.revision for c in store.changes_after(3)] == [4]


def test_dry_run_stores_nothing(store: ConfigStore, engine: sa.Engine) -> None:
    dry = store.publish(spec(), author="alice", dry_run=True)
    assert (dry.revision, dry.changed, dry.dry_run, dry.stored) == (1, True, True, None)
    assert dry.diff.startswith("--- /dev/null\n")
    assert store.head_revision() == 0
    assert rows(engine) == []
    with engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(config_audit)) == 0
    store.publish(spec(), author="alice")
    assert store.publish(spec(price=7), author="alice", dry_run=True).revision == 2
    assert store.head_revision() == 1


def test_every_change_is_audited_with_its_actor(store: ConfigStore, engine: sa.Engine) -> None:
    store.publish(spec(), author="alice")
    store.delete("offers", author="bob")
    store.record_refusal("carol", "publish_refused", {"reason": "offers[0].price: negative"})
    with engine.connect() as connection:
        audit = connection.execute(sa.select(config_audit).order_by(config_audit.c.id)).all()
    assert [(row.revision, row.actor, row.action) for row in audit] == [
        (1, "alice", "publish"),
        (2, "bob", "delete"),
        (None, "carol", "publish_refused"),
    ]
    assert json.loads(audit[2].detail)["reason"].startswith("offers[0].price")


def _concurrently(count: int, work: Callable[[int], T]) -> list[T]:
    """Run `work(i)` for i in range(count) on `count` threads released at the same moment."""
    start = threading.Barrier(count, timeout=30)

    def run(index: int) -> T:
        start.wait()
        return work(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count), timeout=60))


def test_twenty_concurrent_publishes_to_twenty_deployments_get_revisions_one_to_twenty(
    store: ConfigStore, engine: sa.Engine
) -> None:
    results = _concurrently(20, lambda i: store.publish(spec(f"deployment-{i:02d}"), author=f"writer-{i}"))
    assert sorted(result.revision for result in results) == list(range(1, 21))
    stored = rows(engine)
    assert [row.revision for row in stored] == list(range(1, 21))
    assert sorted(row.deployment for row in stored) == [f"deployment-{i:02d}" for i in range(20)]
    for result in results:  # each writer got the revision its own row carries
        assert store.get(result.deployment)[0].revision == result.revision
    current, head = store.list_current()
    assert (len(current), head) == (20, 20)


def test_twenty_concurrent_publishes_to_one_deployment_lose_nothing(
    store: ConfigStore, engine: sa.Engine
) -> None:
    results = _concurrently(20, lambda i: store.publish(spec(price=float(i + 1)), author=f"writer-{i}"))
    assert sorted(result.revision for result in results) == list(range(1, 21))
    assert all(result.changed for result in results)
    stored = rows(engine)
    assert [row.revision for row in stored] == list(range(1, 21))
    prices = sorted(json.loads(row.spec)["offers"][0]["price"] for row in stored)
    assert prices == [float(i + 1) for i in range(20)]  # every writer's spec is there
    by_revision = {result.revision: result for result in results}
    for row in stored:  # each reply names the revision that holds its writer's spec
        assert row.author == f"writer-{int(json.loads(row.spec)['offers'][0]['price']) - 1}"
        # ... and the diff it got was against the revision just before (read and write were atomic).
        before = f"offers@{row.revision - 1}" if row.revision > 1 else "/dev/null"
        assert by_revision[row.revision].diff.startswith(f"--- {before}\n+++ offers@{row.revision}\n")
    assert [entry.stored.revision for entry in store.history("offers", limit=100)] == list(range(20, 0, -1))


# The live distribution over this store ------------------------------------------------------------


class _PublishDuringReplay(ConfigStore):
    """A store where another writer commits between a session's head read and its replay query."""

    late_spec: DeploymentSpec | None = None

    def changes_after(
        self, revision: int, deployments: Sequence[str] = (), limit: int = 10_000
    ) -> list[StoredRevision]:
        late, self.late_spec = self.late_spec, None
        if late is not None:
            self.publish(late, author="late-writer")
        return super().changes_after(revision, deployments, limit)


async def _messages(*messages: distribution.ReplicaMessage) -> AsyncIterator[distribution.ReplicaMessage]:
    for message in messages:
        yield message
    await asyncio.Event().wait()  # the replica keeps its stream open


async def test_a_revision_committed_during_the_replay_is_sent_once(engine: sa.Engine) -> None:
    store = _PublishDuringReplay(engine)
    store.publish(spec(price=1), author="alice")
    store.publish(spec(price=2), author="alice")
    feed = distribution.RevisionFeed(store, poll_seconds=0.05)
    await feed.start()
    session = distribution.WatchSession(store, feed, distribution.ReplicaRegistry(), heartbeat_seconds=0.05)
    store.late_spec = spec(price=3)
    stream = session.run(_messages(distribution.Subscribe("replica-a", (), known_revision=1)), "test")
    assert isinstance(stream, AsyncGenerator)
    updates: list[int] = []
    heartbeats_at_three = 0
    try:
        while heartbeats_at_three < 3:  # the stream has settled at revision 3
            message = await asyncio.wait_for(anext(stream), 10)
            if isinstance(message, distribution.Update):
                updates.append(message.change.revision)
            elif isinstance(message, distribution.Heartbeat) and message.head_revision == 3:
                heartbeats_at_three += 1
            assert not isinstance(message, distribution.Snapshot)
    finally:
        await stream.aclose()
        await feed.stop()
    assert updates == [2, 3]  # revision 3 exactly once
