"""The config service over gRPC: its RPCs, the Watch protocol on a raw stream, and real followers.

The server is built as `python -m services.config` builds it (auth on, interceptors, SQLite file),
with a short heartbeat so heartbeat-driven behaviour shows within a test's time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml
from google.protobuf.struct_pb2 import Struct
from grpc import aio

from libs.common.client import open_channel
from libs.common.config_follower import LAST_KNOWN_GOOD_FILE, AppliedConfig, ConfigFollower
from libs.common.deployment_spec import DeploymentSpec, canonical_json, deployment_spec_from_mapping
from libs.common.errors import FailedPrecondition
from libs.common.server import MAX_MESSAGE_BYTES, RunningServer
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from services.config.server import build_server as build_config
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, target
from tests.grpc.probe_service import status_of
from tests.plugin_packages import install_plugin_package
from tests.polling import eventually

pytestmark = pytest.mark.timeout(60)

HEARTBEAT_SECONDS = 0.2
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deployments" / "telco-offers.yaml"

T = TypeVar("T")


def spec_document(name: str, price: float = 5.0, **extra: Any) -> dict[str, Any]:
    return {"name": name, "offers": [{"id": "a", "price": price}, {"id": "b"}], **extra}


def spec_text(name: str, price: float = 5.0, **extra: Any) -> str:
    return yaml.safe_dump(spec_document(name, price, **extra))


@dataclass
class ConfigUnderTest:
    running: RunningServer
    admin: config_pb2_grpc.ConfigServiceStub
    invoke: config_pb2_grpc.ConfigServiceStub
    service: config_pb2_grpc.ConfigServiceStub
    anonymous: config_pb2_grpc.ConfigServiceStub
    channels: list[aio.Channel] = field(default_factory=list)
    stopped: bool = False

    @property
    def target(self) -> str:
        return target(self.running)

    async def publish(self, name: str, price: float = 5.0, **extra: Any) -> config_pb2.PublishResponse:
        request = config_pb2.PublishRequest(spec_text=spec_text(name, price, **extra))
        reply: config_pb2.PublishResponse = await self.admin.Publish(request)
        return reply

    async def replica(self, replica_id: str) -> config_pb2.ReplicaState | None:
        status = await self.admin.ReplicaStatus(config_pb2.ReplicaStatusRequest(replica_id=replica_id))
        return status.replicas[0] if status.replicas else None

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.running.stop()


@pytest.fixture
async def config(tmp_path: Path, api_keys: ApiKeys) -> AsyncIterator[ConfigUnderTest]:
    settings = SERVICES_UNDER_TEST["config"].settings(
        tmp_path, api_keys, None, heartbeat_seconds=HEARTBEAT_SECONDS, poll_seconds=0.2
    )
    running = await build_config(settings)
    channels = [
        open_channel(target(running), api_key=key, deadline_seconds=15)
        for key in (api_keys.admin, api_keys.invoke, api_keys.service, None)
    ]
    stubs = [config_pb2_grpc.ConfigServiceStub(channel) for channel in channels]
    under_test = ConfigUnderTest(
        running, admin=stubs[0], invoke=stubs[1], service=stubs[2], anonymous=stubs[3], channels=channels
    )
    try:
        yield under_test
    finally:
        for channel in channels:
            await channel.close()
        await under_test.stop()


def _kind(message: config_pb2.WatchResponse) -> str:
    return str(message.WhichOneof("kind"))


class RawWatch:
    """One Watch stream driven message by message, as a replica would."""

    def __init__(self, stub: config_pb2_grpc.ConfigServiceStub) -> None:
        self.call = stub.Watch()

    async def send(self, request: config_pb2.WatchRequest) -> None:
        await self.call.write(request)

    async def subscribe(
        self, replica_id: str, known_revision: int = 0, deployments: Sequence[str] = ()
    ) -> None:
        await self.send(
            config_pb2.WatchRequest(
                subscribe=config_pb2.Subscribe(
                    replica_id=replica_id,
                    deployments=list(deployments),
                    known_revision=known_revision,
                    service="raw-test",
                    version="0.0.1",
                )
            )
        )

    async def ack(self, revision: int) -> None:
        await self.send(config_pb2.WatchRequest(ack=config_pb2.Ack(revision=revision)))

    async def nack(self, revision: int, reason: str, deployment: str = "") -> None:
        await self.send(
            config_pb2.WatchRequest(
                nack=config_pb2.Nack(revision=revision, reason=reason, deployment=deployment)
            )
        )

    async def read(self, within: float = 5.0) -> config_pb2.WatchResponse:
        message = await asyncio.wait_for(self.call.read(), within)
        assert message is not aio.EOF, "the server closed the stream"
        return message  # type: ignore[no-any-return]

    async def next(self, kind: str, within: float = 5.0) -> Any:
        """The next message that is not a heartbeat (or the next heartbeat), checked to be `kind`."""
        while True:
            message = await self.read(within)
            if _kind(message) == "heartbeat" and kind != "heartbeat":
                continue
            assert _kind(message) == kind, message
            return getattr(message, kind)

    async def status(self) -> tuple[grpc.StatusCode, str]:
        try:
            while await asyncio.wait_for(self.call.read(), 5) is not aio.EOF:
                pass
        except aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return await self.call.code(), await self.call.details()

    def close(self) -> None:
        self.call.cancel()


@pytest.fixture
async def watches(config: ConfigUnderTest) -> AsyncIterator[Callable[[], RawWatch]]:
    """Opens raw Watch streams with the service key (as replicas have); cancels them after the test."""
    opened: list[RawWatch] = []

    def open_() -> RawWatch:
        watch = RawWatch(config.service)
        opened.append(watch)
        return watch

    yield open_
    for watch in opened:
        watch.close()


# Publish, Get, List, History, Rollback, Delete ----------------------------------------------------


async def test_publish_get_list_history_rollback_delete_round_trip(config: ConfigUnderTest) -> None:
    admin = config.admin
    first = await admin.Publish(
        config_pb2.PublishRequest(spec_text=EXAMPLE.read_text(), message="the example", author="alice")
    )
    assert (first.revision, first.deployment, first.changed, first.dry_run) == (
        1,
        "telco-offers",
        True,
        False,
    )
    assert first.diff.startswith("--- /dev/null\n+++ telco-offers@1\n")

    struct = Struct()
    struct.update(spec_document("second", price=3))
    second = await admin.Publish(
        config_pb2.PublishRequest(spec_struct=struct, format=config_pb2.SPEC_FORMAT_JSON)
    )
    assert (second.revision, second.deployment) == (2, "second")

    # The same content again, written another way: no new revision.
    same = await admin.Publish(
        config_pb2.PublishRequest(
            spec_text=json.dumps(spec_document("second", price=3.0)), deployment="second"
        )
    )
    assert (same.revision, same.changed, same.diff) == (2, False, "")

    dry = await admin.Publish(config_pb2.PublishRequest(spec_text=spec_text("second", 4), dry_run=True))
    assert (dry.revision, dry.changed, dry.dry_run) == (3, True, True)
    assert '+      "price": 4.0,' in dry.diff
    third = await admin.Publish(
        config_pb2.PublishRequest(spec_text=spec_text("second", 4), expected_revision=2, message="dearer")
    )
    assert third.revision == 3

    got = await admin.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="telco-offers")))
    assert (got.deployment.revision, got.head_revision, got.deployment.author) == (1, 3, "alice")
    example = deployment_spec_from_mapping(yaml.safe_load(EXAMPLE.read_text()))
    assert got.deployment.spec_json == canonical_json(example)
    assert len(got.deployment.checksum) == 64
    assert got.deployment.updated_at.seconds > 0
    old = await admin.Get(
        config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="second", revision=2))
    )
    assert json.loads(old.deployment.spec_json)["offers"][0]["price"] == 3.0

    listed = await admin.List(config_pb2.ListRequest())
    assert [(d.name, d.revision) for d in listed.deployments] == [("second", 3), ("telco-offers", 1)]
    assert (listed.head_revision, listed.page.total_size) == (3, 2)
    assert all(d.spec_json == "" for d in listed.deployments)
    with_specs = await admin.List(config_pb2.ListRequest(include_spec=True))
    assert json.loads(with_specs.deployments[0].spec_json)["name"] == "second"
    # Paged: one deployment a page, the token leads to the next, the last page has none.
    first = await admin.List(config_pb2.ListRequest(page=common_pb2.PageRequest(page_size=1)))
    assert ([d.name for d in first.deployments], first.page.total_size) == (["second"], 2)
    assert first.page.next_page_token
    last = await admin.List(
        config_pb2.ListRequest(
            page=common_pb2.PageRequest(page_size=1, page_token=first.page.next_page_token)
        )
    )
    assert ([d.name for d in last.deployments], last.page.next_page_token) == (["telco-offers"], "")
    code, details = await status_of(
        admin.List(config_pb2.ListRequest(page=common_pb2.PageRequest(page_token="not-a-token")))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("page.page_token: ")

    history = await admin.History(config_pb2.HistoryRequest(deployment="second"))
    assert [(e.revision, e.kind, e.message) for e in history.entries] == [
        (3, config_pb2.CHANGE_KIND_PUBLISH, "dearer"),
        (2, config_pb2.CHANGE_KIND_PUBLISH, ""),
    ]
    assert '+      "price": 4.0,' in history.entries[0].diff
    assert history.entries[0].author == "test-admin"  # the caller, when the request names no author
    everything = await admin.History(config_pb2.HistoryRequest())
    assert [e.revision for e in everything.entries] == [3, 2, 1]

    rolled = await admin.Rollback(config_pb2.RollbackRequest(deployment="second", to_revision=2))
    assert (rolled.revision, rolled.deployment, rolled.changed) == (4, "second", True)
    assert '-      "price": 4.0,' in rolled.diff
    history = await admin.History(config_pb2.HistoryRequest(deployment="second", limit=1))
    assert [(e.revision, e.kind, e.source_revision) for e in history.entries] == [
        (4, config_pb2.CHANGE_KIND_ROLLBACK, 2)
    ]
    current = await admin.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="second")))
    assert current.deployment.spec_json == old.deployment.spec_json

    deleted = await admin.Delete(config_pb2.DeleteRequest(deployment="second", message="retired"))
    assert deleted.revision == 5
    code, details = await status_of(
        admin.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="second")))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "deployment: deployment 'second' was deleted at revision 5"
    listed = await admin.List(config_pb2.ListRequest())
    assert [d.name for d in listed.deployments] == ["telco-offers"]
    history = await admin.History(config_pb2.HistoryRequest(deployment="second", limit=1))
    assert history.entries[0].kind == config_pb2.CHANGE_KIND_DELETE

    restored = await admin.Rollback(config_pb2.RollbackRequest(deployment="second", to_revision=3))
    assert restored.revision == 6
    listed = await admin.List(config_pb2.ListRequest())
    assert [(d.name, d.revision) for d in listed.deployments] == [("second", 6), ("telco-offers", 1)]


async def test_a_stale_expected_revision_is_failed_precondition(config: ConfigUnderTest) -> None:
    await config.publish("offers", 1)
    await config.publish("offers", 2)
    code, details = await status_of(
        config.admin.Publish(config_pb2.PublishRequest(spec_text=spec_text("offers", 3), expected_revision=1))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == "expected_revision: deployment 'offers' is at revision 2, not 1"


@pytest.mark.parametrize(
    ("request_", "details"),
    [
        pytest.param(
            config_pb2.PublishRequest(spec_text=spec_text("offers", -1)),
            "offers[0].price: Input should be greater than or equal to 0",
            id="negative-price",
        ),
        pytest.param(
            config_pb2.PublishRequest(spec_text='{"name": "offers", "offers": [{"id": "a"}], "colour": 1}'),
            "colour: Extra inputs are not permitted",
            id="unknown-key",
        ),
        pytest.param(
            config_pb2.PublishRequest(spec_text="name: [unclosed"),
            "spec: not valid YAML",
            id="not-yaml",
        ),
        pytest.param(
            config_pb2.PublishRequest(spec_text=spec_text("offers"), format=config_pb2.SPEC_FORMAT_JSON),
            "spec: not valid JSON",
            id="yaml-declared-as-json",
        ),
        pytest.param(config_pb2.PublishRequest(), "spec: no spec given", id="no-spec"),
        pytest.param(
            config_pb2.PublishRequest(spec_text=spec_text("offers"), deployment="other"),
            "deployment: the spec is named 'offers', not 'other'",
            id="wrong-deployment",
        ),
        pytest.param(
            config_pb2.PublishRequest(spec_text=spec_text("Bad Name")),
            "name: String should match pattern",
            id="bad-name",
        ),
        pytest.param(
            config_pb2.PublishRequest(
                spec_text=json.dumps(
                    {
                        "name": "offers",
                        "offers": [{"id": "a"}],
                        "plugins": [{"name": "nope", "stage": "pre_score"}],
                    }
                )
            ),
            "plugins[0].name: unknown plugin 'nope'; installed here: exclude_offers (pre_score)",
            id="unknown-plugin",
        ),
        pytest.param(
            config_pb2.PublishRequest(
                spec_text=json.dumps(
                    {
                        "name": "offers",
                        "offers": [{"id": "a"}],
                        "plugins": [
                            {"name": "exclude_offers", "stage": "pre_score"},
                            {"name": "loyalty_boost", "stage": "post_score", "params": {"boost": "lots"}},
                        ],
                    }
                )
            ),
            "plugins[1].params.boost: Input should be a valid number",
            id="plugin-params",
        ),
    ],
)
async def test_an_invalid_spec_is_invalid_argument_naming_the_field(
    config: ConfigUnderTest, request_: config_pb2.PublishRequest, details: str
) -> None:
    code, message = await status_of(config.admin.Publish(request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(details), message
    # Nothing was stored, and the server keeps serving.
    assert (await config.admin.List(config_pb2.ListRequest())).head_revision == 0
    assert (await config.publish("offers")).revision == 1


async def test_an_invalid_spec_struct_names_the_field(config: ConfigUnderTest) -> None:
    struct = Struct()
    struct.update(
        {
            "name": "offers",
            "offers": [
                {"id": "a"},
                {"id": "b", "eligibility": [{"variable": "x", "operator": "eq", "value": 1}]},
            ],
        }
    )
    code, details = await status_of(config.admin.Publish(config_pb2.PublishRequest(spec_struct=struct)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("offers[1].eligibility[0].variable: 'x' is not a context variable")


async def test_publish_needs_an_admin_key(config: ConfigUnderTest) -> None:
    request = config_pb2.PublishRequest(spec_text=spec_text("offers"))
    code, details = await status_of(config.invoke.Publish(request))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "admin" in details
    code, _ = await status_of(config.anonymous.Publish(request))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # Other changes, history and replica state need admin too; reading current specs needs service.
    admin_only: dict[str, Callable[[config_pb2_grpc.ConfigServiceStub], Awaitable[Any]]] = {
        "History": lambda stub: stub.History(config_pb2.HistoryRequest()),
        "Rollback": lambda stub: stub.Rollback(config_pb2.RollbackRequest(deployment="x", to_revision=1)),
        "Delete": lambda stub: stub.Delete(config_pb2.DeleteRequest(deployment="x")),
        "ReplicaStatus": lambda stub: stub.ReplicaStatus(config_pb2.ReplicaStatusRequest()),
    }
    for name, call in admin_only.items():
        assert (await status_of(call(config.invoke)))[0] == grpc.StatusCode.PERMISSION_DENIED, name
        assert (await status_of(call(config.anonymous)))[0] == grpc.StatusCode.UNAUTHENTICATED, name
    # Refresh only resends the head to the replicas (the ecosystem.Ai /refresh): invoke may.
    code, details = await status_of(config.invoke.Refresh(config_pb2.RefreshRequest()))
    assert code == grpc.StatusCode.UNAVAILABLE  # allowed, and no replica to refresh is an error
    assert "no replica is connected" in details
    assert (await status_of(config.anonymous.Refresh(config_pb2.RefreshRequest())))[0] == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert (await config.service.List(config_pb2.ListRequest())).head_revision == 0
    assert (await status_of(config.anonymous.List(config_pb2.ListRequest())))[0] == (
        grpc.StatusCode.UNAUTHENTICATED
    )


async def _refused_watch(
    stub: config_pb2_grpc.ConfigServiceStub, replica_id: str
) -> tuple[grpc.StatusCode, str]:
    """A Watch whose subscription goes with the call (grpc sends it while the server decides): the
    status it ends with. Written message by message instead, a write racing the server's refusal
    was seen to end the call INTERNAL on the client, once in many runs."""
    subscribe = config_pb2.WatchRequest(
        subscribe=config_pb2.Subscribe(replica_id=replica_id, service="raw-test")
    )
    call = stub.Watch(iter([subscribe]))
    try:
        async for _message in call:
            pass
    except aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return await call.code(), await call.details()


async def test_watch_without_a_key_is_unauthenticated(config: ConfigUnderTest) -> None:
    code, _ = await _refused_watch(config.anonymous, "anonymous")
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_an_application_key_can_neither_read_specs_nor_report_as_a_replica(
    config: ConfigUnderTest,
) -> None:
    """The invoke key is what applications hold: a replica's Watch (and its state) and the specs
    need the services' own role, so that key can no longer plant a NACK or a phantom replica."""
    await config.publish("offers")
    code, details = await _refused_watch(config.invoke, "phantom")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs role 'service'" in details
    assert await config.replica("phantom") is None
    get = config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="offers"))
    for reading in (config.invoke.Get(get), config.invoke.List(config_pb2.ListRequest())):
        code, details = await status_of(reading)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "the key has 'invoke'" in details
    assert (await config.service.Get(get)).deployment.name == "offers"
    # ...and the service key changes nothing: publishing still takes admin.
    publish = config_pb2.PublishRequest(spec_text=spec_text("other"))
    assert (await status_of(config.service.Publish(publish)))[0] == grpc.StatusCode.PERMISSION_DENIED


async def test_unknown_deployments_are_not_found(config: ConfigUnderTest) -> None:
    await config.publish("offers")
    admin = config.admin
    calls = {
        "Get": admin.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="nope"))),
        "History": admin.History(config_pb2.HistoryRequest(deployment="nope")),
        "Rollback": admin.Rollback(config_pb2.RollbackRequest(deployment="nope", to_revision=1)),
        "Delete": admin.Delete(config_pb2.DeleteRequest(deployment="nope")),
    }
    outcomes = {name: await status_of(call) for name, call in calls.items()}
    assert {name: code for name, (code, _) in outcomes.items()} == dict.fromkeys(
        calls, grpc.StatusCode.NOT_FOUND
    )
    assert outcomes["Get"][1] == "deployment: deployment 'nope' does not exist"
    assert outcomes["Delete"][1] == "deployment: deployment 'nope' does not exist"
    assert outcomes["History"][1] == "deployment: deployment 'nope' has no history"
    # Revision 1 exists, but it is another deployment's: still the deployment that is not found.
    assert outcomes["Rollback"][1] == "deployment: deployment 'nope' does not exist"


async def test_a_ten_megabyte_spec_is_invalid_argument_and_the_server_keeps_serving(
    config: ConfigUnderTest,
) -> None:
    huge = json.dumps(spec_document("offers", description="x" * (10 * 1024 * 1024)))
    code, details = await status_of(config.admin.Publish(config_pb2.PublishRequest(spec_text=huge)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("spec: spec is 104")
    assert details.endswith("bytes; the limit is 1048576")
    assert (await config.publish("offers")).revision == 1


async def test_a_message_over_the_cap_is_resource_exhausted_and_the_server_keeps_serving(
    config: ConfigUnderTest, api_keys: ApiKeys
) -> None:
    huge = config_pb2.PublishRequest(spec_text="x" * (20 * 1024 * 1024))
    assert huge.ByteSize() > MAX_MESSAGE_BYTES
    # The project's client refuses to send it (same cap on both sides)...
    code, details = await status_of(config.admin.Publish(huge))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Sent message larger than max" in details
    # ...and a client without that cap gets the server's refusal, from gRPC itself.
    async with aio.insecure_channel(config.target) as bare:
        stub = config_pb2_grpc.ConfigServiceStub(bare)
        code, details = await status_of(
            stub.Publish(huge, metadata=(("x-api-key", api_keys.admin),), timeout=30)
        )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in details
    assert (await config.publish("offers")).revision == 1


# The Watch protocol on a raw stream --------------------------------------------------------------


async def test_the_first_watch_message_must_be_a_subscribe(
    config: ConfigUnderTest, watches: Callable[[], RawWatch]
) -> None:
    watch = watches()
    await watch.ack(1)
    code, details = await watch.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "subscribe: the first message on a Watch stream must be a subscribe"

    empty = watches()
    await empty.send(config_pb2.WatchRequest())
    code, details = await empty.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("kind:")

    nameless = watches()
    await nameless.subscribe("")
    code, details = await nameless.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "subscribe.replica_id: must name the replica"

    # The service goes on answering.
    assert (await config.publish("offers")).revision == 1


async def test_subscribe_from_zero_gets_a_snapshot_of_every_current_deployment(
    config: ConfigUnderTest, watches: Callable[[], RawWatch]
) -> None:
    await config.publish("alpha")
    await config.publish("beta")
    await config.publish("gamma")
    await config.admin.Delete(config_pb2.DeleteRequest(deployment="gamma"))
    await config.publish("alpha", price=7)
    watch = watches()
    await watch.subscribe("replica-a")
    snapshot = await watch.next("snapshot")
    assert (snapshot.revision, snapshot.refresh) == (5, False)
    assert [(d.name, d.revision) for d in snapshot.deployments] == [("alpha", 5), ("beta", 2)]
    assert json.loads(snapshot.deployments[0].spec_json)["offers"][0]["price"] == 7.0
    assert all(len(d.checksum) == 64 for d in snapshot.deployments)
    # Following only some deployments: the snapshot holds only those.
    only_beta = watches()
    await only_beta.subscribe("replica-b", deployments=["beta", "gamma"])
    snapshot = await only_beta.next("snapshot")
    assert [(d.name, d.revision) for d in snapshot.deployments] == [("beta", 2)]
    assert snapshot.revision == 5


async def test_an_empty_store_answers_with_an_empty_snapshot(watches: Callable[[], RawWatch]) -> None:
    watch = watches()
    await watch.subscribe("replica-a")
    snapshot = await watch.next("snapshot")
    assert (snapshot.revision, list(snapshot.deployments)) == (0, [])


async def test_updates_acks_and_nacks_show_in_replica_status(
    config: ConfigUnderTest, watches: Callable[[], RawWatch]
) -> None:
    await config.publish("alpha")
    await config.publish("beta")
    watch = watches()
    await watch.subscribe("replica-a")
    snapshot = await watch.next("snapshot")
    await watch.ack(snapshot.revision)

    async def replica_on(revision: int) -> config_pb2.ReplicaState | None:
        state = await config.replica("replica-a")
        return state if state is not None and state.applied_revision == revision else None

    state = await eventually(lambda: replica_on(2), what="replica-a applied revision 2")
    assert [(d.name, d.revision) for d in state.deployments] == [("alpha", 1), ("beta", 2)]
    assert state.connected
    assert (state.service, state.version, state.revisions_behind) == ("raw-test", "0.0.1", 0)
    assert state.peer
    assert state.last_seen.seconds > 0

    published = await config.publish("alpha", price=9)
    update = await watch.next("update")
    assert (update.revision, update.deployment, update.deleted) == (published.revision, "alpha", False)
    assert json.loads(update.spec_json)["offers"][0]["price"] == 9.0
    assert len(update.checksum) == 64
    await watch.ack(update.revision)
    state = await eventually(lambda: replica_on(3), what="replica-a applied revision 3")
    assert [(d.name, d.revision) for d in state.deployments] == [("alpha", 3), ("beta", 2)]

    await config.publish("beta", price=11)
    update = await watch.next("update")
    assert (update.revision, update.deployment) == (4, "beta")
    await watch.nack(4, "model 'm' version 9 cannot be loaded", "beta")

    async def nacked() -> config_pb2.ReplicaState | None:
        state = await config.replica("replica-a")
        return state if state is not None and state.last_nack_revision == 4 else None

    state = await eventually(nacked, what="replica-a's NACK of revision 4")
    assert state.last_nack_reason == "model 'm' version 9 cannot be loaded"
    assert state.applied_revision == 3
    assert [(d.name, d.revision) for d in state.deployments] == [("alpha", 3), ("beta", 2)]
    assert state.revisions_behind == 1

    # A delete reaches the stream as an update with `deleted`, and its ACK drops the deployment.
    await config.admin.Delete(config_pb2.DeleteRequest(deployment="alpha"))
    update = await watch.next("update")
    assert (update.revision, update.deployment, update.deleted, update.spec_json) == (5, "alpha", True, "")
    await watch.ack(5)
    state = await eventually(lambda: replica_on(5), what="replica-a applied revision 5")
    assert [(d.name, d.revision) for d in state.deployments] == [("beta", 2)]

    # Closing the stream marks the replica disconnected.
    watch.close()

    async def disconnected() -> bool:
        state = await config.replica("replica-a")
        return state is not None and not state.connected

    await eventually(disconnected, what="replica-a disconnected")


async def test_subscribe_from_a_known_revision_replays_exactly_what_was_missed(
    config: ConfigUnderTest, watches: Callable[[], RawWatch]
) -> None:
    await config.publish("alpha", 1)  # 1
    await config.publish("beta", 1)  # 2
    await config.publish("alpha", 2)  # 3
    await config.publish("gamma", 1)  # 4
    await config.publish("beta", 2)  # 5
    await config.admin.Delete(config_pb2.DeleteRequest(deployment="alpha"))  # 6
    await config.publish("gamma", 2)  # 7

    watch = watches()
    await watch.subscribe("replica-a", known_revision=2, deployments=["alpha", "beta"])
    replayed = [await watch.next("update") for _ in range(3)]
    assert [(u.revision, u.deployment, u.deleted) for u in replayed] == [
        (3, "alpha", False),
        (5, "beta", False),
        (6, "alpha", True),
    ]
    # Then nothing but heartbeats at the head until something it follows changes.
    heartbeat = await watch.read()
    assert _kind(heartbeat) == "heartbeat", heartbeat
    assert heartbeat.heartbeat.head_revision == 7
    await config.publish("gamma", 3)  # 8: not followed
    await config.publish("beta", 3)  # 9
    update = await watch.next("update")
    assert (update.revision, update.deployment) == (9, "beta")

    # Following everything from revision 5: revisions 6 to 9, in order.
    everything = watches()
    await everything.subscribe("replica-b", known_revision=5)
    assert [(await everything.next("update")).revision for _ in range(4)] == [6, 7, 8, 9]

    # Already at the head: a heartbeat, no replay.
    current = watches()
    await current.subscribe("replica-c", known_revision=9)
    first = await current.read()
    assert (_kind(first), first.heartbeat.head_revision) == ("heartbeat", 9)


async def test_a_replica_the_service_has_not_seen_is_listed_with_what_it_holds(
    config: ConfigUnderTest, watches: Callable[[], RawWatch]
) -> None:
    """After a config service restart its registry is empty: a replica resuming from revision N is
    listed with the deployments it holds as of N, not with none until something changes."""
    await config.publish("alpha", 1)  # 1
    await config.publish("beta", 1)  # 2
    await config.publish("alpha", 2)  # 3
    await config.publish("gamma", 1)  # 4
    watch = watches()
    await watch.subscribe("replica-a", known_revision=3, deployments=["alpha", "beta"])
    await watch.read()  # nothing it follows changed after 3: a heartbeat

    async def listed() -> config_pb2.ReplicaState | None:
        state = await config.replica("replica-a")
        return state if state is not None and state.deployments else None

    state = await eventually(listed, what="replica-a listed with its deployments")
    assert [(d.name, d.revision) for d in state.deployments] == [("alpha", 3), ("beta", 2)]
    assert (state.applied_revision, state.revisions_behind, state.connected) == (3, 0, True)


async def test_a_known_revision_beyond_the_head_gets_a_snapshot(
    config: ConfigUnderTest, watches: Callable[[], RawWatch]
) -> None:
    await config.publish("alpha")
    watch = watches()
    await watch.subscribe("replica-a", known_revision=42)  # e.g. the store was reset
    snapshot = await watch.next("snapshot")
    assert (snapshot.revision, [d.name for d in snapshot.deployments]) == (1, ["alpha"])


async def test_refresh_sends_the_stream_a_snapshot_marked_refresh(
    config: ConfigUnderTest, watches: Callable[[], RawWatch]
) -> None:
    await config.publish("alpha")
    first, second = watches(), watches()
    await first.subscribe("replica-a")
    await second.subscribe("replica-b")
    assert (await first.next("snapshot")).refresh is False
    assert (await second.next("snapshot")).refresh is False

    only_a = await config.admin.Refresh(config_pb2.RefreshRequest(replica_id="replica-a"))
    assert (only_a.replicas_notified, only_a.head_revision) == (1, 1)
    snapshot = await first.next("snapshot")
    assert (snapshot.refresh, snapshot.revision, [d.name for d in snapshot.deployments]) == (
        True,
        1,
        ["alpha"],
    )

    everyone = await config.admin.Refresh(config_pb2.RefreshRequest())
    assert everyone.replicas_notified == 2
    assert (await first.next("snapshot")).refresh is True
    assert (await second.next("snapshot")).refresh is True
    code, details = await status_of(config.admin.Refresh(config_pb2.RefreshRequest(replica_id="nobody")))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "replica_id: no replica 'nobody' is connected"

    # A replica may also ask on its own stream by subscribing again.
    await first.subscribe("replica-a")
    assert (await first.next("snapshot")).refresh is True


async def test_heartbeats_carry_the_head_revision(
    config: ConfigUnderTest, watches: Callable[[], RawWatch]
) -> None:
    await config.publish("alpha")
    await config.publish("beta")
    watch = watches()
    await watch.subscribe("replica-a", deployments=["alpha"])
    await watch.next("snapshot")
    heartbeat = await watch.next("heartbeat", within=HEARTBEAT_SECONDS * 10)
    assert heartbeat.head_revision == 2
    assert heartbeat.server_time.seconds > 0
    await config.publish("beta", 2)  # not followed: only the heartbeats show it

    async def head_seen() -> bool:
        return bool((await watch.next("heartbeat", within=HEARTBEAT_SECONDS * 10)).head_revision == 3)

    await eventually(head_seen, what="a heartbeat with head revision 3")


# Real followers ----------------------------------------------------------------------------------


def _model_check(spec: DeploymentSpec) -> None:
    if spec.model is not None and spec.model.version > 1:
        raise FailedPrecondition(
            f"model '{spec.model.name}' version {spec.model.version} cannot be loaded", field="model"
        )


@dataclass
class Replica:
    follower: ConfigFollower
    prepared: list[tuple[str, str]] = field(default_factory=list)  # (deployment, description)
    changes: list[AppliedConfig] = field(default_factory=list)

    @property
    def revision(self) -> int:
        current = self.follower.current
        return current.revision if current is not None else -1

    def deployments(self) -> dict[str, int]:
        current = self.follower.current
        return {name: d.revision for name, d in current.deployments.items()} if current else {}


@pytest.fixture
async def replicas(
    config: ConfigUnderTest, api_keys: ApiKeys, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    """Starts ConfigFollowers with an invoke key and a prepare hook that refuses model versions > 1."""
    started: list[ConfigFollower] = []

    async def start(replica_id: str, *, state_dir: Path | None = None, target_: str | None = None) -> Replica:
        replica: Replica

        async def prepare(spec: DeploymentSpec) -> object:
            _model_check(spec)
            replica.prepared.append((spec.name, spec.description))
            return f"prepared {spec.name}"

        async def on_change(applied: AppliedConfig) -> None:
            replica.changes.append(applied)

        follower = ConfigFollower(
            target=target_ or config.target,
            api_key=api_keys.service,
            replica_id=replica_id,
            state_dir=state_dir or tmp_path / replica_id,
            service="grpc-test",
            version="1.0",
            prepare=prepare,
            on_change=on_change,
            heartbeat_timeout_seconds=5,
            backoff_initial_seconds=0.05,
            backoff_max_seconds=0.5,
        )
        replica = Replica(follower)
        started.append(follower)
        await follower.start()
        return replica

    yield start
    for follower in started:
        await follower.stop()


async def _on_revision(replica: Replica, revision: int) -> None:
    async def there() -> bool:
        return replica.revision == revision

    await eventually(
        there, what=f"{replica.follower.last_known_good_path.parent.name} at revision {revision}"
    )


async def test_two_followers_apply_a_publish_and_replica_status_shows_both_on_head(
    config: ConfigUnderTest, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    await config.publish("alpha")
    one, two = await replicas("replica-1"), await replicas("replica-2")
    await asyncio.wait_for(asyncio.gather(one.follower.ready.wait(), two.follower.ready.wait()), 10)
    assert one.deployments() == two.deployments() == {"alpha": 1}
    current = one.follower.current
    assert current is not None
    assert current.source == "stream"
    assert current.deployments["alpha"].prepared == "prepared alpha"
    assert current.deployments["alpha"].spec == deployment_spec_from_mapping(spec_document("alpha"))

    await config.publish("beta")
    await config.publish("alpha", price=8)
    for replica in (one, two):
        await _on_revision(replica, 3)
        assert replica.deployments() == {"alpha": 3, "beta": 2}

    async def both_on_head() -> config_pb2.ReplicaStatusResponse | None:
        status = await config.admin.ReplicaStatus(config_pb2.ReplicaStatusRequest())
        on_head = [r for r in status.replicas if r.applied_revision == status.head_revision == 3]
        return status if len(on_head) == 2 else None

    status = await eventually(both_on_head, what="both replicas ACKed revision 3")
    assert [r.replica_id for r in status.replicas] == ["replica-1", "replica-2"]
    for state in status.replicas:
        assert state.connected
        assert state.revisions_behind == 0
        assert (state.service, state.version) == ("grpc-test", "1.0")
        assert [(d.name, d.revision) for d in state.deployments] == [("alpha", 3), ("beta", 2)]
        assert state.last_nack_revision == 0
    # A delete is applied too: the deployment leaves the replica's config.
    await config.admin.Delete(config_pb2.DeleteRequest(deployment="beta"))
    for replica in (one, two):
        await _on_revision(replica, 4)
        assert replica.deployments() == {"alpha": 3}


async def test_a_follower_that_rejects_a_spec_nacks_it_and_keeps_serving_the_old_config(
    config: ConfigUnderTest, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    await config.publish("alpha", description="good one")
    replica = await replicas("replica-1")
    await _on_revision(replica, 1)
    before = replica.follower.current
    assert before is not None

    bad = await config.publish("alpha", description="needs model 9", model={"name": "m", "version": 9})
    assert bad.revision == 2

    async def nacked() -> config_pb2.ReplicaState | None:
        state = await config.replica("replica-1")
        return state if state is not None and state.last_nack_revision == 2 else None

    state = await eventually(nacked, what="the NACK of revision 2")
    assert state.last_nack_reason == "model: model 'm' version 9 cannot be loaded"
    assert state.applied_revision == 1
    assert [(d.name, d.revision) for d in state.deployments] == [("alpha", 1)]
    assert replica.follower.current is before  # the old config object keeps serving, untouched
    assert replica.follower.last_rejection is not None
    assert replica.follower.last_rejection[0] == 2
    assert "version 9" in replica.follower.last_rejection[1]
    # The persisted copy is still the good one.
    persisted = json.loads(replica.follower.last_known_good_path.read_text())
    assert persisted["revision"] == 1

    good = await config.publish("alpha", description="good two", model={"name": "m", "version": 1})
    await _on_revision(replica, good.revision)
    current = replica.follower.current
    assert current is not None
    assert current.deployments["alpha"].spec.description == "good two"
    assert replica.follower.last_rejection is None
    assert [description for _, description in replica.prepared] == ["good one", "good two"]

    async def acked() -> config_pb2.ReplicaState | None:
        state = await config.replica("replica-1")
        return state if state is not None and state.applied_revision == 3 else None

    state = await eventually(acked, what="the ACK of revision 3")
    assert [(d.name, d.revision) for d in state.deployments] == [("alpha", 3)]
    assert state.last_nack_revision == 2  # history of the last refusal stays visible
    assert state.revisions_behind == 0


async def test_a_follower_refresh_resyncs_from_a_snapshot(
    config: ConfigUnderTest, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    await config.publish("alpha")
    replica = await replicas("replica-1")
    await _on_revision(replica, 1)
    await eventually(lambda: _true(replica.follower.connected), what="connected")
    assert await replica.follower.refresh(wait_seconds=5) == 1
    assert replica.changes[-1].revision == 1
    assert len(replica.prepared) == 1  # an unchanged spec is not prepared again


async def _true(value: bool) -> bool:
    return value


async def test_last_known_good_makes_a_new_follower_ready_while_the_service_is_away(
    config: ConfigUnderTest, replicas: Callable[..., Awaitable[Replica]], tmp_path: Path
) -> None:
    await config.publish("alpha", price=1)
    await config.publish("beta", price=2)
    await config.publish("alpha", price=3)
    first = await replicas("replica-1", state_dir=tmp_path / "shared-state")
    await _on_revision(first, 3)
    assert (tmp_path / "shared-state" / LAST_KNOWN_GOOD_FILE).exists()
    expected = first.follower.current
    assert expected is not None
    await first.follower.stop()
    dead_target = config.target
    await config.stop()

    second = await replicas("replica-1-restarted", state_dir=tmp_path / "shared-state", target_=dead_target)
    assert second.follower.ready.is_set()  # before any stream: start() loaded the copy
    current = second.follower.current
    assert current is not None
    assert (current.source, current.revision) == ("last_known_good", 3)
    assert second.deployments() == {"alpha": 3, "beta": 2}
    for name in ("alpha", "beta"):
        assert current.deployments[name].spec == expected.deployments[name].spec
        assert current.deployments[name].checksum == expected.deployments[name].checksum
    assert current.deployments["alpha"].prepared == "prepared alpha"  # prepared again on load
    assert second.changes == [current]
    assert not second.follower.connected


async def test_a_corrupt_last_known_good_copy_is_ignored(
    config: ConfigUnderTest, replicas: Callable[..., Awaitable[Replica]], tmp_path: Path
) -> None:
    state_dir = tmp_path / "corrupt"
    state_dir.mkdir()
    (state_dir / LAST_KNOWN_GOOD_FILE).write_text("{not json")
    await config.stop()
    replica = await replicas("replica-1", state_dir=state_dir, target_=config.target)
    assert not replica.follower.ready.is_set()
    assert replica.follower.current is None


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.1])
async def test_a_follower_stops_promptly_while_the_service_is_away(
    config: ConfigUnderTest, replicas: Callable[..., Awaitable[Replica]], delay: float
) -> None:
    await config.stop()
    replica = await replicas("replica-1", target_=config.target)
    await asyncio.sleep(delay)  # where in the reconnect loop the stop lands, not synchronisation
    loop = asyncio.get_running_loop()
    asked = loop.time()
    # (wait_for alone would not show a hang: stop() swallows the cancel wait_for sends it.)
    await asyncio.wait_for(replica.follower.stop(), 10)
    assert loop.time() - asked < 2


async def test_a_rollback_to_a_spec_whose_plugin_is_gone_is_refused(
    config: ConfigUnderTest, tmp_path: Path
) -> None:
    """Publish checks a spec's plugins against the installed ones; so does a rollback, since the
    package may have been removed since the spec was stored."""
    site = tmp_path / "site"
    site.mkdir()
    body = """
        from typing import ClassVar
        from libs.common.deployment_spec import PluginStage
        from libs.policy.plugins import PluginParams

        class KeepAll:
            stage: ClassVar[PluginStage] = PluginStage.PRE_SCORE
            Params = PluginParams

            def __init__(self, params):
                pass

            def pre_score(self, request):
                return list(request.offers)
    """
    install_plugin_package(site, "1.0", body, {"keep_all": "KeepAll"}, module="acme_rollback")
    sys.path.insert(0, str(site))
    try:
        plugged = {
            "name": "offers",
            "offers": [{"id": "a"}],
            "plugins": [{"name": "keep_all", "stage": "pre_score"}],
        }
        first = await config.admin.Publish(config_pb2.PublishRequest(spec_text=json.dumps(plugged)))
        await config.admin.Publish(config_pb2.PublishRequest(spec_text=spec_text("offers")))
        for info in site.glob("acme_plugins-*.dist-info"):
            shutil.rmtree(info)  # uninstalled
        code, details = await status_of(
            config.admin.Rollback(config_pb2.RollbackRequest(deployment="offers", to_revision=first.revision))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("plugins[0].name: unknown plugin 'keep_all'"), details
        assert (await config.admin.List(config_pb2.ListRequest())).head_revision == 2  # nothing stored
    finally:
        sys.path.remove(str(site))
