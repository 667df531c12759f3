"""Shadow deployments and routing (prediction activators), through the decision engine on a real
Redis: a shadow's decision is logged for every live request and never served, learned from or
charged to a budget; a routing deployment sends each request to the deployment its switch or its
ranking chooses, the response reaches that deployment by uuid, and a ranking router learns which
deployment earns."""

from __future__ import annotations

import uuid as uuid_module
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.decision_log import Contact, Response, decode_entry
from libs.common.deployment_spec import DeploymentSpec, deployment_spec_from_mapping
from libs.common.errors import FailedPrecondition
from libs.policy.context import derive_context
from services.predictor.core import decision as decision_module
from services.predictor.core.decision import DecisionEngine, InvokeInput, RespondInput
from services.predictor.core.engine_simulation import applied_config
from services.predictor.core.metrics import SHADOW_DECISIONS
from services.predictor.core.options_store import OptionsStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def engine(redis_client: Redis) -> DecisionEngine:
    return DecisionEngine(OptionsStore(redis_client), "replica-1", rng=np.random.default_rng(3))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid_module.uuid4().hex[:8]}"


def spec(name: str, **fields: Any) -> DeploymentSpec:
    document = {"name": name, "offers": [{"id": "a"}, {"id": "b"}, {"id": "c"}], **fields}
    return deployment_spec_from_mapping(document)


def invoke_input(campaign: str, customer: str = "c1", params: Any = None, count: int = 1) -> InvokeInput:
    return InvokeInput(campaign, "", "app", customer, "", count, params, None)


async def logged(redis_client: Redis, after: str) -> list[Contact | Response]:
    entries = await redis_client.xrange(redis_keys.DECISION_STREAM, min=f"({after}")
    return [decode_entry(fields) for _, fields in entries]


async def stream_tail(redis_client: Redis) -> str:
    last = await redis_client.xrevrange(redis_keys.DECISION_STREAM, count=1)
    return last[0][0].decode() if last else "0-0"


def metric(deployment: str, shadow: str, outcome: str) -> float:
    return SHADOW_DECISIONS.labels(deployment, shadow, outcome)._value.get()


async def test_a_shadow_decides_every_request_and_is_logged_never_served(
    engine: DecisionEngine, redis_client: Redis
) -> None:
    live_name, shadow_name = unique("live"), unique("shadow")
    live = spec(live_name, shadow=shadow_name)
    budget = {"limit": 1, "period": "total"}
    shadow = spec(
        shadow_name,
        offers=[{"id": "a", "budget": budget}, {"id": "b"}, {"id": "c"}],
        algorithm={"approach": "epsilon_greedy"},
    )
    config = applied_config(live, shadow)
    after = await stream_tail(redis_client)
    decisions = [await engine.invoke(invoke_input(live_name, f"c{i}", count=2), config) for i in range(30)]
    await engine.drain_shadows()
    assert all(d.deployment == live_name and len(d.offers) == 2 and not d.warnings for d in decisions)

    records = [r for r in await logged(redis_client, after) if isinstance(r, Contact)]
    served = [r for r in records if not r.is_shadow]
    shadowed = {r.shadow_of: r for r in records if r.is_shadow}
    assert [r.uuid for r in served] == [d.uuid for d in decisions]
    assert set(shadowed) == {d.uuid for d in decisions}  # one shadow decision per live request
    for record in shadowed.values():
        assert record.deployment == shadow_name
        assert record.live_deployment == live_name
        assert record.uuid not in shadowed
        assert len(record.shown) == 2
        assert 0 < record.shown[0].propensity <= 1
        assert not await redis_client.exists(redis_keys.contact(record.uuid))  # nothing to answer
    # Never learned from, never charged: the shadow's statistics and budget are untouched.
    segment = derive_context(shadow, {}, {}, "app").segment
    assert not await redis_client.exists(redis_keys.arm_statistics(shadow_name, "0", segment))
    assert not await redis_client.keys(f"*{shadow_name}*")
    assert metric(live_name, shadow_name, "logged") == 30

    # The live contact answers as usual; the shadow's uuid is no contact.
    outcome = await engine.respond(RespondInput(decisions[0].uuid, [decisions[0].offers[0].offer.id]), config)
    assert outcome.learned
    assert outcome.deployment == live_name


async def test_a_shadow_that_fails_or_is_missing_never_touches_the_live_reply(
    engine: DecisionEngine, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    live_name, shadow_name = unique("live"), unique("shadow")
    live = spec(live_name, shadow=shadow_name)
    failing = spec(
        shadow_name,
        plugins=[
            {"name": "exclude_offers", "stage": "pre_score", "params": {"offers": ["a"]}, "on_error": "fail"}
        ],
    )
    missing = await engine.invoke(invoke_input(live_name), applied_config(live))
    assert missing.offers
    assert missing.warnings == [f"shadow '{shadow_name}' is not served here; no shadow decision"]
    assert metric(live_name, shadow_name, "not_served") == 1

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise FailedPrecondition("plugin exclude_offers builtin failed (error): boom", field="plugins")

    config = applied_config(live, failing)
    object.__setattr__(config.deployments[shadow_name].prepared, "choose", fail)  # this instance only
    served = await engine.invoke(invoke_input(live_name), config)
    await engine.drain_shadows()
    assert served.offers
    assert not served.warnings
    assert metric(live_name, shadow_name, "failed") == 1

    monkeypatch.setattr(decision_module, "MAX_SHADOWS_IN_FLIGHT", 0)
    await engine.invoke(invoke_input(live_name), config)
    assert metric(live_name, shadow_name, "busy") == 1


async def test_a_switch_routes_by_a_context_value_and_the_response_reaches_the_deployment_that_served(
    engine: DecisionEngine, redis_client: Redis
) -> None:
    router_name, gold_name, other_name = unique("router"), unique("gold"), unique("other")
    router = deployment_spec_from_mapping(
        {
            "name": router_name,
            "offers": [{"id": gold_name}, {"id": other_name}],
            "context_variables": [{"name": "tier", "source": "param", "default": "basic"}],
            "routing": {
                "by": "switch",
                "variable": "tier",
                "routes": {"gold": gold_name},
                "default": other_name,
            },
        }
    )
    config = applied_config(router, spec(gold_name), spec(other_name))
    after = await stream_tail(redis_client)
    gold = await engine.invoke(invoke_input(router_name, params={"tier": "gold"}), config)
    basic = await engine.invoke(invoke_input(router_name), config)
    assert (gold.deployment, gold.routed_by) == (gold_name, router_name)
    assert (basic.deployment, basic.routed_by) == (other_name, router_name)
    contacts = {r.uuid: r for r in await logged(redis_client, after) if isinstance(r, Contact)}
    assert contacts[gold.uuid].deployment == gold_name
    assert (contacts[gold.uuid].routed_by, contacts[gold.uuid].route_propensity) == (router_name, 1.0)

    offer = gold.offers[0].offer.id
    outcome = await engine.respond(RespondInput(gold.uuid, [offer]), config)
    assert outcome.learned
    assert outcome.deployment == gold_name
    statistics = await redis_client.hgetall(redis_keys.arm_statistics(gold_name, "0", gold.segment))
    assert float(statistics[f"{offer}|s".encode()]) == 1.0


async def test_a_ranking_router_learns_which_deployment_earns(
    engine: DecisionEngine, redis_client: Redis
) -> None:
    router_name, good_name, poor_name = unique("router"), unique("good"), unique("poor")
    router = deployment_spec_from_mapping(
        {"name": router_name, "offers": [{"id": good_name}, {"id": poor_name}], "routing": {"by": "ranking"}}
    )
    config = applied_config(router, spec(good_name), spec(poor_name))
    after = await stream_tail(redis_client)
    served: list[str] = []
    accepted = 0
    for i in range(200):
        decision = await engine.invoke(invoke_input(router_name, f"c{i}"), config)
        assert decision.routed_by == router_name
        served.append(decision.deployment)
        if decision.deployment == good_name:  # only what the good deployment shows is taken up
            await engine.respond(RespondInput(decision.uuid, [decision.offers[0].offer.id]), config)
            accepted += 1
    segment = derive_context(router, {}, {}, "app").segment
    arms = await redis_client.hgetall(redis_keys.arm_statistics(router_name, "0", segment))
    assert float(arms[f"{good_name}|s".encode()]) == accepted
    assert float(arms[f"{good_name}|n".encode()]) + float(arms[f"{poor_name}|n".encode()]) == 200
    assert f"{poor_name}|s".encode() not in arms or float(arms[f"{poor_name}|s".encode()]) == 0
    assert served[-50:].count(good_name) >= 45  # learned: the last requests go to the one that earns
    routed = [r for r in await logged(redis_client, after) if isinstance(r, Contact)]
    assert all(r.routed_by == router_name and 0 < r.route_propensity <= 1 for r in routed)
    assert any(r.route_propensity < 1 for r in routed)


async def test_routing_to_what_is_not_served_or_routes_again_is_refused(engine: DecisionEngine) -> None:
    router_name, other_router, target = unique("router"), unique("router"), unique("target")
    router = deployment_spec_from_mapping(
        {
            "name": router_name,
            "offers": [{"id": target}, {"id": other_router}],
            "routing": {"by": "switch", "variable": "to", "routes": {"r": other_router}, "default": target},
            "context_variables": [{"name": "to", "source": "param", "default": "t"}],
        }
    )
    nested = deployment_spec_from_mapping(
        {"name": other_router, "offers": [{"id": target}], "routing": {"by": "ranking"}}
    )
    with pytest.raises(FailedPrecondition, match=f"routes to '{target}', which is not served here"):
        await engine.invoke(invoke_input(router_name), applied_config(router))
    config = applied_config(router, nested, spec(target))
    with pytest.raises(FailedPrecondition, match="which routes too"):
        await engine.invoke(invoke_input(router_name, params={"to": "r"}), config)
    assert (await engine.invoke(invoke_input(router_name), config)).deployment == target


async def test_a_ranking_router_learns_once_per_request_never_a_negative_reward_and_skips_routers(
    engine: DecisionEngine, redis_client: Redis
) -> None:
    """Review findings: two responses to one routed contact teach the router once; a negative
    reward the serving deployment takes (linear models do) teaches the router 0, not a broken
    posterior; a route that routes itself is never chosen; the call's `eligible_offers` names the
    serving deployment's offers, not the router's."""
    router_name, linear_name, nested_name = unique("router"), unique("linear"), unique("nested")
    router = deployment_spec_from_mapping(
        {
            "name": router_name,
            "offers": [{"id": linear_name}, {"id": nested_name}],
            "routing": {"by": "ranking"},
        }
    )
    linear = spec(
        linear_name,
        context_variables=[{"name": "x", "source": "param", "kind": "numeric", "default": 1.0}],
        algorithm={"approach": "linucb", "features": ["x"]},
    )
    nested = deployment_spec_from_mapping(
        {"name": nested_name, "offers": [{"id": linear_name}], "routing": {"by": "ranking"}}
    )
    config = applied_config(router, linear, nested)
    segment = derive_context(router, {}, {}, "app").segment
    arms_key = redis_keys.arm_statistics(router_name, "0", segment)

    served = [await engine.invoke(invoke_input(router_name, f"c{i}", count=2), config) for i in range(20)]
    assert {d.deployment for d in served} == {linear_name}  # the nested router is never chosen
    first = served[0]
    for offer in (first.offers[0].offer.id, first.offers[1].offer.id):  # two responses, two offers
        assert (await engine.respond(RespondInput(first.uuid, [offer]), config)).learned
    arms = await redis_client.hgetall(arms_key)
    assert float(arms[f"{linear_name}|s".encode()]) == 1.0
    assert float(arms[f"{linear_name}|n".encode()]) == 20.0

    negative = served[1]
    outcome = await engine.respond(
        RespondInput(negative.uuid, [negative.offers[0].offer.id], reward=-5.0), config
    )
    assert outcome.learned
    assert float((await redis_client.hgetall(arms_key))[f"{linear_name}|s".encode()]) == 1.0
    after = await engine.invoke(invoke_input(router_name, "c-after"), config)  # the router still ranks
    assert after.deployment == linear_name

    narrowed = await engine.invoke(
        invoke_input(router_name, "c-narrow", params={"eligible_offers": ["b"]}, count=3), config
    )
    assert [row.offer.id for row in narrowed.offers] == ["b"]
