"""Offer budgets (a prediction activator), on a real Redis with two replicas' engines racing: an
offer is shown at most its budget per period across both, an exhausted one is left out with the
reason in the reply, and the next period starts afresh."""

from __future__ import annotations

import asyncio
import uuid as uuid_module
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.deployment_spec import deployment_spec_from_mapping
from libs.policy.context import derive_context
from services.predictor.core.budgets import period_start
from services.predictor.core.decision import Decision, DecisionEngine, InvokeInput
from services.predictor.core.engine_simulation import SimulatedClock, applied_config
from services.predictor.core.options_store import OptionsStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MONDAY_NOON = 1_765_195_200.0  # 2025-12-08, a Monday, 12:00 UTC


def spec_with(budget: dict[str, Any], price: float = 1.0) -> Any:
    name = f"budget-{uuid_module.uuid4().hex[:8]}"
    return deployment_spec_from_mapping(
        {
            "name": name,
            "offers": [
                {"id": "limited", "price": price, "budget": budget},
                {"id": "plain-a"},
                {"id": "plain-b"},
            ],
            "algorithm": {"approach": "epsilon_greedy"},
            "exploration_epsilon": 0.0,
        }
    )


async def race(redis_client: Redis, spec: Any, clock: SimulatedClock, invokes: int) -> list[Decision]:
    """Two replicas (each its own engine, options store and memory), `invokes` requests at once.
    Epsilon-greedy exploits what the arms have taken up: 'limited' the most, so it comes first
    whenever its budget allows."""
    segment = derive_context(spec, {}, {}, "").segment
    taken_up = {
        "limited|n": 100,
        "limited|s": 90,
        "plain-a|n": 100,
        "plain-a|s": 10,
        "plain-b|n": 100,
        "plain-b|s": 5,
    }
    await redis_client.hset(redis_keys.arm_statistics(spec.name, "0", segment), mapping=taken_up)
    config = applied_config(spec)
    engines = [
        DecisionEngine(OptionsStore(redis_client, clock=clock), f"replica-{i}", rng=np.random.default_rng(i))
        for i in range(2)
    ]
    request = InvokeInput(spec.name, "", "", "c1", "", 1, None, None)
    return list(await asyncio.gather(*(engines[i % 2].invoke(request, config) for i in range(invokes))))


def shown(decisions: list[Decision]) -> list[str]:
    return [row.offer.id for decision in decisions for row in decision.offers]


async def test_two_replicas_racing_show_an_offer_exactly_its_budget(redis_client: Redis) -> None:
    clock = SimulatedClock(MONDAY_NOON)
    spec = spec_with({"limit": 7, "period": "day"})
    decisions = await race(redis_client, spec, clock, 60)
    assert shown(decisions).count("limited") == 7
    assert len(shown(decisions)) == 60  # every request still got an offer
    key = redis_keys.offer_budget(spec.name, "limited", period_start(spec.offers[0].budget, clock.now))
    assert float(await redis_client.get(key)) == 7.0
    assert 0 < await redis_client.ttl(key) <= 2 * 86400
    refused = [d for d in decisions if d.offers[0].offer.id != "limited"]
    assert all(
        "offer 'limited' left out: its budget (7 presentations per day) is used up" in d.warnings
        for d in refused
    )

    # The next day starts afresh.
    clock.now += 86400
    assert shown(await race(redis_client, spec, clock, 10)).count("limited") == 7


async def test_a_value_budget_counts_the_price_and_a_total_one_never_resets(redis_client: Redis) -> None:
    clock = SimulatedClock(MONDAY_NOON)
    spec = spec_with({"limit": 10, "period": "total", "measure": "value"}, price=2.5)
    assert shown(await race(redis_client, spec, clock, 12)).count("limited") == 4
    clock.now += 30 * 86400
    assert shown(await race(redis_client, spec, clock, 4)).count("limited") == 0


def test_periods_start_on_utc_boundaries() -> None:
    spec = spec_with({"limit": 1, "period": "week"})
    week = spec.offers[0].budget
    assert period_start(week, MONDAY_NOON) == MONDAY_NOON - 12 * 3600  # Monday 00:00 UTC
    assert period_start(week, MONDAY_NOON - 12 * 3600 - 1) == MONDAY_NOON - 12 * 3600 - 7 * 86400
    hour = week.model_copy(update={"period": "hour"})
    assert period_start(hour, MONDAY_NOON + 1799) == MONDAY_NOON
