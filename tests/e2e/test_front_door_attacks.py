"""Attacks on the front door of a whole local stack, with legitimate load running through it:
neither thousands of truncated streams from one client without a key nor huge identifiers from
another take more than 1% of the legitimate calls (issue: one client could take the door down)."""

from __future__ import annotations

import json
from collections import Counter

import grpc
import pytest

from libs.common.client import open_blocking_channel
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.launcher import is_healthy
from tests.chaos.report import report
from tests.e2e.conftest import REPO, LocalStack
from tests.e2e.truncated_streams import truncated_streams

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = REPO / "examples" / "deployments" / "telco-offers.yaml"
LEGITIMATE_CALLS = 300


def _legitimate_load(
    stack: LocalStack, attacker: predictor_pb2_grpc.PredictorServiceStub | None = None
) -> Counter[str]:
    """LEGITIMATE_CALLS Invokes, each status counted; with an attacker, a 70 KB campaign from it
    between every ten."""
    outcomes: Counter[str] = Counter()
    with open_blocking_channel(
        stack.front_door, api_key=stack.credentials()["invoke"], deadline_seconds=10
    ) as ch:
        stub = predictor_pb2_grpc.PredictorServiceStub(ch)
        for index in range(LEGITIMATE_CALLS):
            if attacker is not None and index % 10 == 0:
                with pytest.raises(grpc.RpcError) as refused:
                    attacker.Invoke(predictor_pb2.InvokeRequest(campaign="x" * 70_000, customer="c"))
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            try:
                stub.Invoke(predictor_pb2.InvokeRequest(campaign="telco-offers", customer=f"c{index}"))
                outcomes["OK"] += 1
            except grpc.RpcError as error:
                outcomes[error.code().name] += 1  # type: ignore[attr-defined]
    return outcomes


def _figures(outcomes: Counter[str]) -> dict[str, object]:
    failed = {name: count for name, count in outcomes.items() if name != "OK"}
    return {"invokes_ok": outcomes["OK"], "invokes_failed": sum(failed.values()), "failures": failed}


def test_truncated_streams_and_huge_identifiers_do_not_starve_legitimate_calls(
    running_stack: LocalStack,
) -> None:
    stack = running_stack
    published = stack.cli("config", "publish", str(EXAMPLE), "--no-diff")
    assert published.returncode == 0, published.stderr
    host, port = stack.front_door.split(":")
    # 2,200 stuck streams: twice Envoy's default request limit per cluster, and more than the
    # services' own limit of calls in flight, which counts only calls whose message arrived.
    with truncated_streams(
        host,
        int(port),
        connections=4,
        streams_per_connection=550,
        path="/liveloop.predictor.v1.PredictorService/Invoke",
    ):
        outcomes = _legitimate_load(stack)
    report("2,200 truncated streams held open", _figures(outcomes))
    assert outcomes["OK"] >= 0.99 * LEGITIMATE_CALLS, outcomes

    with open_blocking_channel(
        stack.front_door, api_key=stack.credentials()["invoke"], deadline_seconds=10
    ) as ch:
        outcomes = _legitimate_load(stack, attacker=predictor_pb2_grpc.PredictorServiceStub(ch))
    report("a 70 KB campaign between every ten calls", _figures(outcomes))
    assert outcomes["OK"] >= 0.99 * LEGITIMATE_CALLS, outcomes

    status = stack.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert all(is_healthy(row) for row in json.loads(status.stdout)["processes"])
