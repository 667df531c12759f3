"""What an Invoke reads, on a real Redis: the features and statistics in one round trip when the
statistics' key is known from the request, two when the segment comes from the customer's
features, the writes (impressions, contact, decision log) always in one more; and the feature
lookup's defaults where the customer's features lack one."""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from libs.common import redis_keys
from libs.common.config_follower import AppliedConfig, AppliedDeployment
from libs.common.deployment_spec import deployment_spec_from_mapping
from libs.policy.deployment import PreparedDeployment
from libs.policy.models import load_model
from services.predictor.core.decision import DecisionEngine, InvokeInput
from services.predictor.core.engine_simulation import applied_config
from services.predictor.core.options_store import OptionsStore
from tests.counting_redis import CountingRedis
from tests.trainer_datasets import OFFERS, take_up_spec, train_artifact

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def counting(redis_url: str) -> AsyncIterator[CountingRedis]:
    client = CountingRedis.from_url(redis_url)
    assert isinstance(client, CountingRedis)
    yield client
    await client.aclose()


def document(name: str, segment_source: str, algorithm: str) -> dict[str, Any]:
    return {
        "name": name,
        "offers": [{"id": f"o{i}"} for i in range(5)],
        "algorithm": {"approach": algorithm, **({"features": ["age"]} if algorithm == "linucb" else {})},
        "context_variables": [
            {"name": "tier", "source": segment_source, "default": "basic"},
            {"name": "age", "source": "feature", "kind": "numeric", "default": 30, "segment": False},
        ],
        "feature_lookup": {"feature_view": name.replace("-", "_")},
    }


@pytest.mark.parametrize(
    ("segment_source", "algorithm", "trips"),
    [
        ("param", "thompson", 2),  # features + arm statistics, then the writes
        ("feature", "thompson", 3),  # features, then the segment's arm statistics, then the writes
        ("feature", "naive_bayes", 2),  # one hash per deployment, whatever the segment
        ("param", "linucb", 3),  # per eligible offer: the offers must be known first
    ],
)
async def test_an_invoke_costs_the_round_trips_it_needs(
    counting: CountingRedis, segment_source: str, algorithm: str, trips: int
) -> None:
    name = f"trips-{uuid_module.uuid4().hex[:8]}"
    spec = deployment_spec_from_mapping(document(name, segment_source, algorithm))
    await counting.hset(
        redis_keys.online_features(name.replace("-", "_"), "c1"), mapping={"tier": "gold", "age": "41"}
    )
    engine = DecisionEngine(OptionsStore(counting), "replica-trips")
    config = applied_config(spec)
    request = InvokeInput(
        "", "", "", "c1", "", 2, {"tier": "gold"} if segment_source == "param" else None, None, name
    )
    first = await engine.invoke(request, config)  # reads the options generation once (cached after)
    assert first.segment == "tier=gold"

    def round_trips() -> int:
        return counting.executed + engine.options.batched_round_trips

    before = round_trips()
    decision = await engine.invoke(request, config)
    assert round_trips() - before == trips
    assert decision.segment == "tier=gold"
    assert len(decision.offers) == 2
    assert decision.context["age"] == 41.0  # the features were read


async def test_a_bound_model_reads_the_lookups_default_for_a_missing_feature(
    counting: CountingRedis, tmp_path: Path
) -> None:
    """A customer whose online features lack one gets the feature lookup's default for it, in the
    context and in what the bound model scores (as ModelInfer with the same inputs would)."""
    trained = train_artifact(tmp_path, tmp_path / "artifacts", take_up_spec(), rows=300)
    model = load_model(trained.directory, "take-up", 1)
    name = f"model-{uuid_module.uuid4().hex[:8]}"
    view = name.replace("-", "_")
    spec = deployment_spec_from_mapping(
        {
            "name": name,
            "offers": [{"id": offer} for offer in OFFERS],
            "algorithm": {"approach": "model"},
            "model": {"name": "take-up", "version": 1},
            "exploration_epsilon": 0.0,
            "context_variables": [{"name": "region", "source": "feature", "default": "unknown"}],
            "feature_lookup": {"feature_view": view, "defaults": {"region": "south", "tenure_months": 48}},
        }
    )
    await counting.hset(redis_keys.online_features(view, "c1"), mapping={"age": "33"})  # no region, no tenure
    prepared = PreparedDeployment.prepare(spec, {("take-up", 1): model})
    config = AppliedConfig(1, {name: AppliedDeployment(name, 1, "", spec, prepared)}, "stream")
    engine = DecisionEngine(OptionsStore(counting), "replica-model")
    decision = await engine.invoke(InvokeInput("", "", "", "c1", "", 3, None, None, name), config)
    assert decision.context["region"] == "south"
    expected = model.predict_offers({"age": "33", "region": "south", "tenure_months": 48}, list(OFFERS))
    scored = {row.offer.id: row.model_score for row in decision.offers}
    assert scored == dict(zip(OFFERS, expected.tolist(), strict=True))
    without_defaults = model.predict_offers({"age": "33"}, list(OFFERS))
    assert not np.allclose(expected, without_defaults)  # the defaults make a difference here


@pytest.mark.parametrize("with_lookup", [True, False])
async def test_a_whitelist_is_read_in_the_first_round_trip_and_limits_the_offers(
    counting: CountingRedis, with_lookup: bool
) -> None:
    """The whitelist activator: a materialized view lists each customer's allowed offers (ids or
    names, comma-separated or a JSON list); it is read with the features and statistics, so an
    Invoke costs no round trip more; a customer without a list gets every offer, or none."""
    name = f"white-{uuid_module.uuid4().hex[:8]}"
    view = f"{name.replace('-', '_')}_allowed"
    spec_document = document(name, "param", "thompson")
    spec_document["offers"] = [{"id": f"o{i}", "name": f"Offer {i}"} for i in range(5)]
    spec_document["whitelist"] = {"feature_view": view, "column": "offers"}
    if not with_lookup:
        del spec_document["feature_lookup"]
        spec_document["context_variables"] = spec_document["context_variables"][:1]
    strict = {**spec_document, "whitelist": {**spec_document["whitelist"], "when_missing": "none"}}
    await counting.hset(redis_keys.online_features(view, "listed"), mapping={"offers": "o1, Offer 3,o9"})
    await counting.hset(redis_keys.online_features(view, "json"), mapping={"offers": '["o2", "o4"]'})
    engine = DecisionEngine(OptionsStore(counting), "replica-white", rng=np.random.default_rng(5))
    config = applied_config(deployment_spec_from_mapping(spec_document))

    def request(customer: str) -> InvokeInput:
        return InvokeInput("", "", "", customer, "", 5, {"tier": "gold"}, None, name)

    await engine.invoke(request("listed"), config)  # reads the options generation once (cached after)
    before = counting.executed + engine.options.batched_round_trips
    listed = await engine.invoke(request("listed"), config)
    assert counting.executed + engine.options.batched_round_trips - before == 2  # as without a whitelist
    assert sorted(row.offer.id for row in listed.offers) == ["o1", "o3"]
    assert "5 offers asked for, 2 eligible" in listed.warnings
    assert sorted(row.offer.id for row in (await engine.invoke(request("json"), config)).offers) == [
        "o2",
        "o4",
    ]

    await counting.hset(redis_keys.online_features(view, "garbled"), mapping={"offers": "['o1', 'o2']"})
    garbled = await engine.invoke(request("garbled"), config)
    assert garbled.offers == []
    assert any(
        "the whitelist for 'garbled'" in warning and "names no offer" in warning
        for warning in garbled.warnings
    )

    unlisted = await engine.invoke(request("nobody"), config)
    assert len(unlisted.offers) == 5
    assert any("no whitelist for 'nobody'" in warning for warning in unlisted.warnings)
    refused = await engine.invoke(request("nobody"), applied_config(deployment_spec_from_mapping(strict)))
    assert refused.offers == []
    assert "no offer is eligible for this customer" in refused.warnings


async def test_the_model_selector_picks_the_model_an_invoke_scores_and_logs(
    counting: CountingRedis, tmp_path: Path
) -> None:
    loaded = {}
    for version, seed in ((1, 5), (2, 11)):
        trained = train_artifact(
            tmp_path, tmp_path / "artifacts", take_up_spec(seed=seed), version=version, rows=300
        )
        loaded[("take-up", version)] = load_model(trained.directory, "take-up", version)
    name = f"selector-{uuid_module.uuid4().hex[:8]}"
    spec = deployment_spec_from_mapping(
        {
            "name": name,
            "offers": [{"id": offer} for offer in OFFERS],
            "algorithm": {"approach": "model"},
            "exploration_epsilon": 0.0,
            "context_variables": [{"name": "region", "source": "param", "default": "north"}],
            "model": {"name": "take-up", "version": 1},
            "model_selector": {"variable": "region", "models": {"south": {"name": "take-up", "version": 2}}},
        }
    )
    prepared = PreparedDeployment.prepare(spec, loaded)
    config = AppliedConfig(1, {name: AppliedDeployment(name, 1, "", spec, prepared)}, "stream")
    engine = DecisionEngine(OptionsStore(counting), "replica-selector")
    for region, version in (("south", 2), ("north", 1)):
        params = {"region": region, "age": "33", "tenure_months": "12"}
        decision = await engine.invoke(InvokeInput("", "", "", "c1", "", 3, params, None, name), config)
        assert decision.model == f"take-up:{version}"
        expected = loaded[("take-up", version)].predict_offers({**params}, list(OFFERS))
        assert {row.offer.id: row.model_score for row in decision.offers} == dict(
            zip(OFFERS, expected.tolist(), strict=True)
        )
