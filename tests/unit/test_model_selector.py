"""The model selector (a prediction activator, the ecosystem.Ai runtime's predictor.selector): the
bound model chosen per request by a context variable's value, the deployment's model for any other
value, a variant's own model kept."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from libs.common.deployment_spec import deployment_spec_from_mapping
from libs.common.errors import InvalidArgument
from libs.policy.context import derive_context
from libs.policy.deployment import PreparedDeployment
from libs.policy.models import LoadedModel, load_model
from libs.policy.statistics import Statistics
from tests.trainer_datasets import OFFERS, take_up_spec, train_artifact

pytestmark = pytest.mark.timeout(120)

CUSTOMER = {"age": "25", "tenure_months": "60"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], LoadedModel]:
    scratch = tmp_path_factory.mktemp("trained")
    loaded = {}
    for version, seed in ((1, 5), (2, 11)):
        trained = train_artifact(
            scratch, scratch / "artifacts", take_up_spec(seed=seed), version=version, rows=300
        )
        loaded[("take-up", version)] = load_model(trained.directory, "take-up", version)
    return loaded


def document(**changes: Any) -> dict[str, Any]:
    return {
        "name": "selected",
        "offers": [{"id": offer} for offer in OFFERS],
        "algorithm": {"approach": "model"},
        "exploration_epsilon": 0.0,
        "context_variables": [{"name": "region", "source": "param", "default": "north"}],
        "model": {"name": "take-up", "version": 1},
        "model_selector": {"variable": "region", "models": {"south": {"name": "take-up", "version": 2}}},
        **changes,
    }


def test_the_value_of_the_variable_picks_the_model_and_other_values_keep_the_default(
    models: dict[tuple[str, int], LoadedModel],
) -> None:
    spec = deployment_spec_from_mapping(document())
    assert [(b.name, b.version) for b in spec.model_bindings()] == [("take-up", 1), ("take-up", 2)]
    prepared = PreparedDeployment.prepare(spec, models)
    for region, version in (("south", 2), ("north", 1), ("east", 1)):
        params = {"region": region, **CUSTOMER}
        context = derive_context(spec, {}, params, "")
        plan = prepared.selected(prepared.plans[""], context)
        assert plan.model_ref == f"take-up:{version}"
        choice = prepared.choose(
            plan,
            prepared.eligible(context, params),
            context,
            _no_statistics(),
            np.random.default_rng(0),
            count=3,
            params=params,
        )
        expected = models[("take-up", version)].predict_offers({**CUSTOMER, "region": region}, list(OFFERS))
        assert [row.model_score for row in choice.offers] == pytest.approx(sorted(expected, reverse=True))
    # the two versions do score differently, so the check above can tell them apart
    south = {**CUSTOMER, "region": "south"}
    assert models[("take-up", 1)].predict_offers(south, list(OFFERS)) != pytest.approx(
        models[("take-up", 2)].predict_offers(south, list(OFFERS))
    )


def test_a_variant_with_its_own_model_keeps_it(models: dict[tuple[str, int], LoadedModel]) -> None:
    spec = deployment_spec_from_mapping(
        document(
            variants=[
                {"name": "own", "weight": 1, "model": {"name": "take-up", "version": 1}},
                {"name": "plain", "weight": 1},
            ]
        )
    )
    prepared = PreparedDeployment.prepare(spec, models)
    context = derive_context(spec, {}, {"region": "south"}, "")
    assert prepared.selected(prepared.plans["own"], context).model_ref == "take-up:1"
    assert prepared.selected(prepared.plans["plain"], context).model_ref == "take-up:2"


@pytest.mark.parametrize(
    ("selector", "field"),
    [
        (
            {"variable": "nowhere", "models": {"a": {"name": "take-up", "version": 1}}},
            "model_selector.variable",
        ),
        ({"variable": "region", "models": {}}, "model_selector.models"),
    ],
)
def test_a_selector_must_name_a_categorical_variable_and_some_models(
    selector: dict[str, Any], field: str
) -> None:
    with pytest.raises((InvalidArgument, ValidationError)) as refused:
        deployment_spec_from_mapping(document(model_selector=selector))
    assert field in str(refused.value)


def _no_statistics() -> Statistics:
    return Statistics()
