"""GetSummary over real Invokes and Responds: two predictor replicas and the config service
in-process, the monitor's real server consuming the decision log from the same Redis. A known
sequence of calls is summarised with every count exact; bad requests get clear errors."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from libs.common.client import open_channel
from libs.common.server import RunningServer
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.server import build_server as build_monitor
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, target
from tests.integration.test_predictor_decision import (
    Loop,
    invoke_request,
    respond_request,
    spec_document,
    unique_name,
)
from tests.integration.test_predictor_decision import loop as loop  # the fixture
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

INVOKE = "/liveloop.predictor.v1.PredictorService/Invoke"
RESPOND = "/liveloop.predictor.v1.PredictorService/Respond"


@pytest.fixture
async def monitor(
    loop: Loop, tmp_path: Path, api_keys: ApiKeys, redis_url: str
) -> AsyncIterator[monitor_pb2_grpc.MonitorServiceStub]:
    settings = SERVICES_UNDER_TEST["monitor"].settings(
        tmp_path / "monitor",
        api_keys,
        redis_url,
        config_target=target(loop.config),
        config_api_key=api_keys.admin,
    )
    (tmp_path / "monitor").mkdir()
    running: RunningServer = await build_monitor(settings)
    channel = open_channel(target(running), api_key=api_keys.admin, deadline_seconds=15)
    try:
        yield monitor_pb2_grpc.MonitorServiceStub(channel)
    finally:
        await channel.close()
        await running.stop()


async def test_a_known_sequence_of_invokes_and_responds_is_summarised_exactly(
    loop: Loop, monitor: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    name = unique_name("summary")
    revision = await loop.publish(
        spec_document(
            name,
            algorithm={"approach": "epsilon_greedy"},
            exploration_epsilon=0.5,
            reward={"window_seconds": 60},  # a late response is one 2 minutes after its contact
        )
    )
    replies = []
    for i in range(12):
        region = "north" if i < 6 else "south"
        stub = loop.a if i % 2 == 0 else loop.b
        replies.append(await stub.Invoke(invoke_request(name, customer=f"c-{i}", params={"region": region})))
    impressions: Counter[str] = Counter()
    explored: Counter[str] = Counter()
    accepted: Counter[str] = Counter()
    reward: Counter[str] = Counter()
    segment_impressions: Counter[str] = Counter()
    segment_accepted: Counter[str] = Counter()
    for reply in replies:
        for row in reply.final_result:
            impressions[row.result.offer] += 1
            explored[row.result.offer] += int(row.result.explored)
            segment_impressions[reply.segment] += 1
    # Four take the first offer (reward 1, the default), two take both (reward 2.0 each), one
    # answers twice (a duplicate), one answers after the reward window (late), one takes nothing.
    for reply in replies[:4]:
        offer = reply.final_result[0].result.offer
        await loop.b.Respond(respond_request(reply.uuid, [offer]))
        accepted[offer] += 1
        reward[offer] += 1
        segment_accepted[reply.segment] += 1
    for reply in replies[6:8]:
        offers = [row.result.offer for row in reply.final_result]
        await loop.a.Respond(respond_request(reply.uuid, offers, reward=2.0))
        for offer in offers:
            accepted[offer] += 1
            reward[offer] += 2
            segment_accepted[reply.segment] += 1
    duplicate = await loop.a.Respond(
        respond_request(replies[0].uuid, [replies[0].final_result[0].result.offer])
    )
    assert duplicate.duplicate
    late_time = Timestamp()
    late_time.FromNanoseconds(time.time_ns() + 120 * 10**9)
    late = await loop.a.Respond(
        respond_request(replies[8].uuid, [replies[8].final_result[0].result.offer], event_time=late_time)
    )
    assert late.late
    await loop.b.Respond(respond_request(replies[9].uuid, []))

    async def summarised() -> monitor_pb2.GetSummaryResponse | None:
        summary = await monitor.GetSummary(monitor_pb2.GetSummaryRequest(deployment=name))
        return summary if (summary.invocations, summary.responses) == (12, 9) else None

    summary = await eventually(summarised, within=20, what="every call summarised")
    assert (summary.late_responses, summary.duplicate_responses) == (1, 1)
    assert summary.impressions == sum(impressions.values()) == 24
    assert summary.accepted == sum(accepted.values()) == 8
    assert summary.uptake_rate == pytest.approx(8 / 24)
    assert summary.explore_share == pytest.approx(sum(explored.values()) / 24)
    assert {row.offer: row.impressions for row in summary.by_offer} == dict(impressions)
    assert {row.offer: row.accepted for row in summary.by_offer if row.accepted} == dict(accepted)
    assert {row.offer: row.reward_sum for row in summary.by_offer if row.reward_sum} == pytest.approx(
        dict(reward)
    )
    assert {row.offer: row.explored_impressions for row in summary.by_offer} == dict(explored)
    assert {row.segment: row.impressions for row in summary.by_segment} == dict(segment_impressions)
    assert {row.segment: row.accepted for row in summary.by_segment if row.accepted} == dict(segment_accepted)
    assert sum(row.impressions for row in summary.by_offer_segment) == 24
    assert [row.offer for row in summary.by_offer] == sorted(impressions)
    assert {
        row.replica_id: (row.invocations, row.config_revision, row.stale) for row in summary.replicas
    } == {
        "replica-a": (6, revision, False),
        "replica-b": (6, revision, False),
    }
    assert summary.head_revision == revision
    latency = {row.method: row for row in summary.latency}
    assert latency[INVOKE].count == 12
    assert latency[RESPOND].count == 9
    assert 0 < latency[INVOKE].p50_seconds <= latency[INVOKE].p99_seconds <= latency[INVOKE].max_seconds
    assert summary.decision_log.lag == 0

    # A new revision of the deployment: until the replicas serve with it, what they served is stale.
    newer = await loop.publish(spec_document(name, default_number_of_offers=1))
    summary = await monitor.GetSummary(monitor_pb2.GetSummaryRequest(deployment=name))
    assert summary.head_revision == newer
    assert all(row.stale for row in summary.replicas)

    series = await monitor.GetTimeSeries(monitor_pb2.GetTimeSeriesRequest(deployment=name))
    assert sum(point.impressions for point in series.offers) == 24
    assert sum(point.accepted for point in series.offers) == 8
    assert sum(point.invocations for point in series.invocations) == 12


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (monitor_pb2.GetSummaryRequest(), grpc.StatusCode.INVALID_ARGUMENT, "deployment"),
        (
            monitor_pb2.GetSummaryRequest(deployment="no-such-deployment"),
            grpc.StatusCode.NOT_FOUND,
            "deployment",
        ),
        (
            monitor_pb2.GetSummaryRequest(deployment="x", window=Duration(seconds=0, nanos=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "window",
        ),
        (
            monitor_pb2.GetSummaryRequest(deployment="x", window=Duration(seconds=10 * 365 * 86400)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "window",
        ),
        (
            monitor_pb2.GetSummaryRequest(
                deployment="x", end_time=Timestamp(seconds=int(time.time()) + 86400)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "end_time",
        ),
    ],
)
async def test_bad_summary_requests_are_refused_with_the_field_named(
    tmp_path: Path,
    api_keys: ApiKeys,
    redis_url: str,
    request_: monitor_pb2.GetSummaryRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    # No config service: the monitor still answers, from what it has logged.
    running = await build_monitor(SERVICES_UNDER_TEST["monitor"].settings(tmp_path, api_keys, redis_url))
    try:
        async with open_channel(target(running), api_key=api_keys.admin, deadline_seconds=15) as channel:
            with pytest.raises(aio.AioRpcError) as caught:
                await monitor_pb2_grpc.MonitorServiceStub(channel).GetSummary(request_)
    finally:
        await running.stop()
    assert caught.value.code() == code
    assert words in (caught.value.details() or "")
