"""The decision loop over gRPC: an in-process config service and two predictor replicas (real servers
on port 0, auth on) sharing one real Redis. Publishes go through the config service and reach the
replicas over Watch, exactly as in production.

What is shown here: learning on one replica is visible on the other within a second (measured),
cold start, idempotent / late / unknown responses, logged propensities against the observed
frequency at rank 1, the decision log stream, bad input, and a property test over request fields.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.parse
import uuid as uuid_module
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.client import open_blocking_channel, open_channel
from libs.common.server import RunningServer
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.config.server import build_server as build_config
from services.predictor.server import build_server as build_predictor
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, target

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HEARTBEAT_SECONDS = 0.2
REPLICAS = ("replica-a", "replica-b")
OFFERS = ("alpha", "bravo", "charlie", "delta")


def value(item: Any) -> Value:
    """Any JSON-like Python value (NaN and infinities too) as a google.protobuf.Value."""
    holder = Struct()
    holder.update({"v": item})
    return holder.fields["v"]


def spec_document(name: str, **overrides: Any) -> dict[str, Any]:
    """A small deployment: four offers, a feature-free segment from params, Thompson, no decay."""
    document: dict[str, Any] = {
        "name": name,
        "campaigns": [name],
        "offers": [
            {"id": offer, "name": f"{offer.title()} offer", "price": 10.0 + i, "category": f"c{i % 2}"}
            for i, offer in enumerate(OFFERS)
        ],
        "context_variables": [
            {"name": "region", "source": "param", "default": "north"},
            {"name": "age", "source": "param", "kind": "numeric", "default": 30},
            {
                "name": "age_band",
                "source": "virtual",
                "segment": False,
                "transform": {"kind": "discretize", "input": "age", "edges": [40], "labels": ["y", "o"]},
            },
        ],
        "algorithm": {"approach": "thompson"},
        "default_number_of_offers": 2,
        "reward": {"window_seconds": 3600},
    }
    document.update(overrides)
    return document


async def eventually(probe: Any, within: float = 10.0, what: str = "") -> Any:
    """Poll an async probe until it returns something truthy (bounded; no sleeps as synchronisation)."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what} (last: {result!r})")
        await asyncio.sleep(0.01)


@dataclass
class Loop:
    """The config service, two replicas, stubs on each and a Redis client on the shared store."""

    config: RunningServer
    replicas: list[RunningServer]
    admin: config_pb2_grpc.ConfigServiceStub
    predictors: list[predictor_pb2_grpc.PredictorServiceStub]
    redis: Redis
    invoke_key: str
    channels: list[aio.Channel] = field(default_factory=list)

    @property
    def a(self) -> predictor_pb2_grpc.PredictorServiceStub:
        return self.predictors[0]

    @property
    def b(self) -> predictor_pb2_grpc.PredictorServiceStub:
        return self.predictors[1]

    def replica_target(self, index: int) -> str:
        return target(self.replicas[index])

    async def publish(self, document: Mapping[str, Any]) -> int:
        """Publish and wait until both replicas serve the new revision."""
        reply = await self.admin.Publish(config_pb2.PublishRequest(spec_text=json.dumps(document)))
        revision = reply.revision

        async def both_on_it() -> bool:
            pings = [await stub.Ping(predictor_pb2.PingRequest()) for stub in self.predictors]
            return all(ping.config_revision >= revision for ping in pings)

        await eventually(both_on_it, what=f"both replicas on revision {revision}")
        return int(revision)

    async def arms(self, deployment: str, segment: str) -> dict[str, str]:
        raw = await self.redis.hgetall(redis_keys.arm_statistics(deployment, "0", segment))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def stream_tail_id(self) -> str:
        """The id of the newest decision log entry (read the log after it to see this test's entries)."""
        newest = await self.redis.xrevrange(redis_keys.DECISION_STREAM, count=1)
        return newest[0][0].decode() if newest else "0-0"

    async def log_entries(self, after: str, deployment: str) -> list[dict[str, Any]]:
        entries = await self.redis.xrange(redis_keys.DECISION_STREAM, min=f"({after}")
        found = []
        for _id, fields in entries:
            body = json.loads(fields[b"body"])
            if body.get("deployment") == deployment:
                found.append({"kind": fields[b"kind"].decode(), "uuid": fields[b"uuid"].decode(), **body})
        return found


@pytest.fixture
async def loop(tmp_path: Path, api_keys: ApiKeys, redis_url: str) -> AsyncIterator[Loop]:
    config_settings = SERVICES_UNDER_TEST["config"].settings(
        tmp_path, api_keys, None, heartbeat_seconds=HEARTBEAT_SECONDS, poll_seconds=0.2
    )
    config = await build_config(config_settings)
    replicas: list[RunningServer] = []
    channels: list[aio.Channel] = []
    store = Redis.from_url(redis_url)
    try:
        for replica_id in REPLICAS:
            settings_ = SERVICES_UNDER_TEST["predictor"].settings(
                tmp_path,
                api_keys,
                redis_url,
                config_target=target(config),
                config_api_key=api_keys.invoke,
                replica_id=replica_id,
                state_dir=tmp_path / replica_id,
            )
            replicas.append(await build_predictor(settings_))
        admin_channel = open_channel(target(config), api_key=api_keys.admin, deadline_seconds=15)
        channels.append(admin_channel)
        predictors = []
        for running in replicas:
            channel = open_channel(target(running), api_key=api_keys.invoke, deadline_seconds=15)
            channels.append(channel)
            predictors.append(predictor_pb2_grpc.PredictorServiceStub(channel))
        yield Loop(
            config,
            replicas,
            config_pb2_grpc.ConfigServiceStub(admin_channel),
            predictors,
            store,
            api_keys.invoke,
            channels,
        )
    finally:
        for channel in channels:
            await channel.close()
        for running in replicas:
            await running.stop()
        await config.stop()
        await store.aclose()


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid_module.uuid4().hex[:10]}"


def invoke_request(campaign: str, customer: str = "c-1", **fields: Any) -> predictor_pb2.InvokeRequest:
    request = predictor_pb2.InvokeRequest(campaign=campaign, customer=customer, channel="app")
    for name in ("numberoffers", "params", "in_param"):
        if name in fields:
            getattr(request, name).CopyFrom(value(fields.pop(name)))
    for name, item in fields.items():
        setattr(request, name, item)
    return request


def respond_request(uuid: str, accepted: Any = None, **fields: Any) -> predictor_pb2.RespondRequest:
    request = predictor_pb2.RespondRequest(uuid=uuid, **fields)
    if accepted is not None:
        request.offers_accepted.CopyFrom(value(accepted))
    return request


def by_offer(reply: predictor_pb2.InvokeResponse) -> dict[str, predictor_pb2.FinalResult.Result]:
    return {row.result.offer: row.result for row in reply.final_result}


# Learning across replicas ----------------------------------------------------------------------


async def test_a_response_on_one_replica_changes_what_the_other_scores_within_a_second(loop: Loop) -> None:
    name = unique_name("learn")
    await loop.publish(spec_document(name, exploration_epsilon=0.0))
    everything = {"numberoffers": len(OFFERS)}
    shown = await loop.a.Invoke(invoke_request(name, **everything))
    assert {row.result.offer for row in shown.final_result} == set(OFFERS)
    segment = shown.segment
    # Thompson without decay: arm_reward = (1 + s) / (2 + n) with n = arm_count, so B's reply tells
    # how many successes B saw for the offer.
    before = by_offer(await loop.b.Invoke(invoke_request(name, **everything)))["charlie"]
    assert round(before.arm_reward * (2 + before.arm_count) - 1, 9) == 0

    answered = await loop.a.Respond(respond_request(shown.uuid, ["charlie"]))
    assert answered.learned
    assert list(answered.matched_offers) == ["charlie"]
    responded_at = time.perf_counter()

    async def b_sees_the_success() -> float | None:
        row = by_offer(await loop.b.Invoke(invoke_request(name, **everything)))["charlie"]
        successes = row.arm_reward * (2 + row.arm_count) - 1
        return time.perf_counter() - responded_at if abs(successes - 1) < 1e-9 else None

    latency = await eventually(b_sees_the_success, within=5, what="replica B sees the response")
    print(f"\ncross-replica learning latency (Respond on A returned -> B's Invoke reflects it): "
          f"{latency * 1000:.1f} ms")
    assert latency < 1.0
    stored = await loop.arms(name, segment)
    assert float(stored["charlie|s"]) == 1.0


async def test_b_ranks_by_what_a_learned(loop: Loop) -> None:
    name = unique_name("greedy")
    await loop.publish(
        spec_document(name, algorithm={"approach": "epsilon_greedy"}, exploration_epsilon=0.0)
    )
    shown = await loop.a.Invoke(invoke_request(name, numberoffers=len(OFFERS)))
    await loop.a.Respond(respond_request(shown.uuid, "Delta offer"))  # by name, as a plain string
    for _ in range(5):
        reply = await loop.b.Invoke(invoke_request(name, customer="someone-else"))
        assert reply.final_result[0].result.offer == "delta"
        assert reply.final_result[0].result.propensity == 1.0
