"""EvaluatePolicy end to end: decisions logged through real Invokes and Responds (two replicas, the
config service, Redis), a customer whose take-up per offer is known, the monitor's real server
consuming the log; candidates with known true values are estimated with intervals that cover them."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from grpc import aio

from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from tests.integration.test_monitor_summary import monitor as monitor  # the fixture
from tests.integration.test_predictor_decision import (
    OFFERS,
    Loop,
    invoke_request,
    respond_request,
    spec_document,
    unique_name,
)
from tests.integration.test_predictor_decision import loop as loop  # the fixture
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

TAKE_UP = {"alpha": 0.6, "bravo": 0.3, "charlie": 0.1, "delta": 0.05}
DECISIONS = 800


def logging_spec(name: str) -> dict[str, object]:
    # Uniformly random first offers: every candidate below is well supported.
    return spec_document(
        name, algorithm={"approach": "epsilon_greedy"}, exploration_epsilon=1.0, default_number_of_offers=1
    )


async def log_decisions(loop: Loop, name: str) -> None:
    rng = np.random.default_rng(7)
    for i in range(DECISIONS):
        stub = loop.a if i % 2 == 0 else loop.b
        reply = await stub.Invoke(invoke_request(name, customer=f"c-{i}"))
        offer = reply.final_result[0].result.offer
        if rng.random() < TAKE_UP[offer]:
            await stub.Respond(respond_request(reply.uuid, [offer]))


async def evaluate(
    monitor: monitor_pb2_grpc.MonitorServiceStub, name: str, confidence: float = 0.99, **fields: object
) -> monitor_pb2.EvaluatePolicyResponse:
    request = monitor_pb2.EvaluatePolicyRequest(
        deployment=name, confidence_level=confidence, seed=3, **fields
    )  # type: ignore[arg-type]
    reply: monitor_pb2.EvaluatePolicyResponse = await monitor.EvaluatePolicy(request, timeout=60)
    return reply


async def test_candidates_with_known_values_are_estimated_within_their_intervals(
    loop: Loop, monitor: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    name = unique_name("evaluate")
    live = await loop.publish(logging_spec(name))
    await log_decisions(loop, name)

    async def all_logged() -> bool:
        summary = await monitor.GetSummary(monitor_pb2.GetSummaryRequest(deployment=name))
        return summary.invocations == DECISIONS

    await eventually(all_logged, within=30, what="every decision consumed")

    # The live spec itself: its first-slot distribution is the logging policy's, every weight is 1.
    on_policy = await evaluate(monitor, name, candidate_revision=live)
    estimates = {row.estimator: row for row in on_policy.estimates}
    assert on_policy.decisions == DECISIONS
    assert on_policy.usable_decisions == DECISIONS - DECISIONS // 10  # the first tenth warms up
    assert estimates[monitor_pb2.ESTIMATOR_IPS].value == pytest.approx(on_policy.logged_value, abs=1e-12)
    assert on_policy.effective_sample_size == pytest.approx(on_policy.usable_decisions)
    assert on_policy.max_weight == pytest.approx(1.0)
    assert any("replaying" in note for note in on_policy.notes)

    # Always alpha (every other offer excluded): true value 0.6.
    only_alpha = logging_spec(name)
    only_alpha["plugins"] = [
        {
            "name": "exclude_offers",
            "stage": "pre_score",
            "params": {"offers": [o for o in OFFERS if o != "alpha"]},
        }
    ]
    # The logged first offers come from the replicas' own random draws, so a 99% interval misses the
    # truth in about one run in a hundred (CI saw IPS 2.5 standard errors low once): 99.9% here.
    reply = await evaluate(monitor, name, confidence=0.999, candidate_spec_json=json.dumps(only_alpha))
    assert not reply.refused
    for row in reply.estimates:
        if row.estimator == monitor_pb2.ESTIMATOR_DM:
            # DM's interval holds the reward model fixed (the notes say so): only its value is checked.
            assert row.value == pytest.approx(TAKE_UP["alpha"], abs=0.1)
        else:
            assert row.lower <= TAKE_UP["alpha"] <= row.upper, (row, reply)
    assert any("reward model fixed" in note for note in reply.notes)
    assert reply.max_weight == pytest.approx(4.0)

    # Greedy on what the replayed statistics learned: it should mostly pick alpha, and beat the log.
    greedy = logging_spec(name)
    greedy["exploration_epsilon"] = 0.0
    reply = await evaluate(monitor, name, candidate_spec_json=json.dumps(greedy))
    dr = {row.estimator: row for row in reply.estimates}[monitor_pb2.ESTIMATOR_DR]
    assert dr.lift > 0.15
    assert dr.value <= TAKE_UP["alpha"] + 0.1


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"candidate_spec_json": "{not json"}, grpc.StatusCode.INVALID_ARGUMENT, "spec"),
        (
            {"candidate_spec_json": json.dumps({"name": "{name}", "offers": []})},
            grpc.StatusCode.INVALID_ARGUMENT,
            "",
        ),
        ({"candidate_revision": 987654}, grpc.StatusCode.NOT_FOUND, "candidate_revision"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "candidate"),
        (
            {"candidate_spec_json": json.dumps(logging_spec("other-name"))},
            grpc.StatusCode.INVALID_ARGUMENT,
            "other-name",
        ),
        (
            {
                "candidate_spec_json": json.dumps(
                    spec_document(
                        "{name}",
                        algorithm={"approach": "model"},
                        model={"name": "never-trained", "version": 3},
                    )
                )
            },
            grpc.StatusCode.FAILED_PRECONDITION,
            "model 'never-trained' version 3 cannot be loaded",
        ),
        (
            {"candidate_spec_json": json.dumps(logging_spec("{name}")), "logged_table": "old_system"},
            grpc.StatusCode.NOT_FOUND,
            "no table 'old_system' in the offline store",
        ),
    ],
)
async def test_bad_candidates_are_refused_with_the_field_named(
    loop: Loop,
    monitor: monitor_pb2_grpc.MonitorServiceStub,
    fields: dict[str, object],
    code: grpc.StatusCode,
    words: str,
) -> None:
    name = unique_name("evaluate-bad")
    await loop.publish(logging_spec(name))
    resolved = {
        key: value.replace("{name}", name) if isinstance(value, str) else value
        for key, value in fields.items()
    }
    with pytest.raises(aio.AioRpcError) as caught:
        await evaluate(monitor, name, **resolved)
    assert caught.value.code() == code
    assert words in (caught.value.details() or "")


async def test_a_window_without_decisions_is_a_failed_precondition(
    loop: Loop, monitor: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    name = unique_name("evaluate-empty")
    revision = await loop.publish(logging_spec(name))
    with pytest.raises(aio.AioRpcError) as caught:
        await evaluate(monitor, name, candidate_revision=revision)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no decisions" in (caught.value.details() or "")
