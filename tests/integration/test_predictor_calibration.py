"""Logged propensities are calibrated, through the predictor's real DecisionEngine on a real Redis:
20,000 Invokes of a stationary deployment (each answered with a click drawn from fixed take-up
rates, so the statistics learn as they would in production), read back from the decision log as
the monitor reads it; every bucket of first-slot propensities within binomial noise
(tests/propensity_calibration.py)."""

from __future__ import annotations

import uuid as uuid_module

import numpy as np
import pytest
from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.decision_log import Contact, decode_entry
from libs.common.deployment_spec import deployment_spec_from_mapping
from services.predictor.core.decision import DecisionEngine, InvokeInput, RespondInput
from services.predictor.core.engine_simulation import applied_config
from services.predictor.core.options_store import OptionsStore
from tests.propensity_calibration import Calibration

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

INVOKES = 20_000
TAKE_UP = {"alpha": 0.12, "bravo": 0.10, "charlie": 0.08, "delta": 0.05, "echo": 0.02}


@pytest.mark.parametrize(
    ("algorithm", "epsilon"),
    [({"approach": "thompson"}, 0.05), ({"approach": "epsilon_greedy"}, 0.2)],
    ids=["thompson", "epsilon_greedy"],
)
async def test_propensities_in_the_decision_log_are_calibrated_over_20000_invokes(
    redis_client: Redis, algorithm: dict[str, object], epsilon: float
) -> None:
    name = f"calibration-{uuid_module.uuid4().hex[:8]}"
    spec = deployment_spec_from_mapping(
        {
            "name": name,
            "offers": [{"id": offer} for offer in TAKE_UP],
            "algorithm": algorithm,
            "exploration_epsilon": epsilon,
            "default_number_of_offers": 2,
        }
    )
    engine = DecisionEngine(OptionsStore(redis_client), "calibration", rng=np.random.default_rng(7))
    config = applied_config(spec)
    clicks = np.random.default_rng(8)
    tail = await redis_client.xrevrange(redis_keys.DECISION_STREAM, count=1)
    after = tail[0][0].decode() if tail else "0-0"
    for index in range(INVOKES):
        decision = await engine.invoke(
            InvokeInput(name, "", "", f"customer-{index}", "", None, None, None), config
        )
        first = decision.offers[0].offer.id
        accepted = [first] if clicks.random() < TAKE_UP[first] else []
        await engine.respond(RespondInput(decision.uuid, accepted), config)

    contacts: list[Contact] = []
    while True:
        entries = await redis_client.xrange(redis_keys.DECISION_STREAM, min=f"({after}", count=5000)
        if not entries:
            break
        after = entries[-1][0].decode()
        for _, fields in entries:
            record = decode_entry(fields)
            if isinstance(record, Contact) and record.deployment == name:
                contacts.append(record)
    assert len(contacts) == INVOKES
    calibration = Calibration()
    for contact in contacts:
        propensities = contact.first_slot_propensities()
        first = list(contact.eligible).index(contact.shown[0].offer)
        assert propensities[first] == contact.shown[0].propensity
        assert all(0 < row.propensity <= 1 for row in contact.shown)
        calibration.add(propensities, first)
    calibration.check(str(algorithm["approach"]))
    await redis_client.delete(*[key async for key in redis_client.scan_iter(match=f"ll:*{name}*")])
