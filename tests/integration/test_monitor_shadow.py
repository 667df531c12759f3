"""CompareShadow over real traffic: two predictor replicas serve a deployment that names a shadow,
the monitor consumes the decision log, and its comparison of the shadow with the live decisions
equals one computed by hand from the logged records (agreement, live value, IPS, SNIPS). The
shadow's decisions are not counted as served in the shadow deployment's summary."""

from __future__ import annotations

import random

import grpc
import pytest

from libs.common.decision_log import Contact
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from tests.integration.test_monitor_summary import monitor as monitor  # the fixture
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


async def test_the_shadow_is_compared_with_live_decisions_as_computed_by_hand(
    loop: Loop, monitor: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    live, shadow = unique_name("live"), unique_name("shadow")
    await loop.publish(spec_document(shadow, campaigns=[f"{shadow}-campaign"], exploration_epsilon=0.3))
    await loop.publish(spec_document(live, shadow=shadow, exploration_epsilon=0.5))
    after = await loop.stream_tail_id()
    rng = random.Random(4)
    replies = []
    for i in range(60):
        stub = loop.a if i % 2 == 0 else loop.b
        reply = await stub.Invoke(invoke_request(live, customer=f"c-{i}", numberoffers=1))
        replies.append(reply)
        first = reply.final_result[0].result.offer
        if first in ("alpha", "bravo") and rng.random() < 0.7:
            await loop.a.Respond(respond_request(reply.uuid, [first]))

    async def all_shadowed() -> dict[str, Contact] | None:
        shadows = {r.shadow_of: r for r in (await loop.contacts(after, shadow)).values() if r.is_shadow}
        return shadows if len(shadows) == 60 else None

    shadows = await eventually(all_shadowed, what="a shadow decision per live request")
    contacts = await loop.contacts(after, live)
    rewards = {
        r.uuid: 1.0
        for r in await loop.log_entries(after, live)
        if not isinstance(r, Contact) and r.new_offers
    }
    # By hand: IPS weighs the live reward where both put the same offer first by 1 / P_live(it first).
    weights, terms, agreed = [], [], []
    for uuid, record in shadows.items():
        contact = contacts[uuid]
        shadow_first, live_first = record.shown[0].offer, contact.shown[0].offer
        p = contact.first_slot_propensities()[list(contact.eligible).index(shadow_first)]
        match = shadow_first == live_first
        weights.append(match / p)
        terms.append(match / p * rewards.get(uuid, 0.0))
        agreed.append(match)

    async def compared() -> monitor_pb2.CompareShadowResponse | None:
        reply = await monitor.CompareShadow(monitor_pb2.CompareShadowRequest(deployment=live))
        return reply if reply.shadows and reply.shadows[0].compared == 60 else None

    reply = await eventually(compared, within=20, what="the monitor compares all 60")
    (row,) = reply.shadows
    assert (row.shadow, row.live_decisions, row.not_comparable) == (shadow, 60, 0)
    assert row.agreement == pytest.approx(sum(agreed) / 60)
    assert row.live_value == pytest.approx(len(rewards) / 60)
    estimates = {monitor_pb2.Estimator.Name(e.estimator): e for e in row.estimates}
    assert estimates["ESTIMATOR_IPS"].value == pytest.approx(sum(terms) / 60)
    assert estimates["ESTIMATOR_SNIPS"].value == pytest.approx(sum(terms) / sum(weights))
    assert estimates["ESTIMATOR_IPS"].lower <= estimates["ESTIMATOR_IPS"].upper

    # Never served: the shadow deployment's own summary counts none of its shadow decisions.
    summary = await monitor.GetSummary(monitor_pb2.GetSummaryRequest(deployment=live))
    assert summary.invocations == 60
    shadow_summary = await monitor.GetSummary(monitor_pb2.GetSummaryRequest(deployment=shadow))
    assert shadow_summary.invocations == 0

    # A deployment that names no shadow, and has none logged, is told so.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await monitor.CompareShadow(monitor_pb2.CompareShadowRequest(deployment=shadow))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"'{shadow}' names no shadow" in (refused.value.details() or "")
