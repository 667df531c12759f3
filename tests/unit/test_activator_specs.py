"""The spec fields of the shadow and routing activators: what Publish refuses, naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from libs.common.deployment_spec import deployment_spec_from_mapping
from libs.common.errors import InvalidArgument

pytestmark = pytest.mark.timeout(30)

ROUTER = {
    "name": "router",
    "offers": [{"id": "plan-a"}, {"id": "plan-b"}],
    "context_variables": [
        {"name": "tier", "source": "param"},
        {"name": "age", "source": "param", "kind": "numeric"},
    ],
}


def test_a_switch_and_a_ranking_router_are_accepted() -> None:
    switch = deployment_spec_from_mapping(
        {
            **ROUTER,
            "routing": {
                "by": "switch",
                "variable": "tier",
                "routes": {"gold": "plan-b"},
                "default": "plan-a",
            },
        }
    )
    assert switch.routing is not None
    assert switch.routing.routes == {"gold": "plan-b"}
    ranking = deployment_spec_from_mapping({**ROUTER, "routing": {"by": "ranking"}})
    assert ranking.routing is not None
    assert ranking.routing.by == "ranking"
    shadowed = deployment_spec_from_mapping({"name": "live", "offers": [{"id": "a"}], "shadow": "candidate"})
    assert shadowed.shadow == "candidate"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shadow": "router"}, "shadow: a deployment cannot shadow itself"),
        ({"shadow": "Not A Name"}, "shadow: String should match pattern"),
        ({"routing": {"by": "switch", "variable": "age"}}, "routing.variable: a switch needs a categorical"),
        (
            {"routing": {"by": "switch", "variable": "tier", "routes": {"x": "plan-c"}}},
            "routing.routes.x: 'plan-c'",
        ),
        ({"routing": {"by": "switch", "variable": "tier", "default": "plan-c"}}, "routing.default: 'plan-c'"),
        ({"routing": {"by": "ranking", "variable": "tier"}}, "routing: variable, routes and default belong"),
        (
            {"routing": {"by": "ranking"}, "algorithm": {"approach": "naive_bayes"}},
            "algorithm: a ranking router",
        ),
        (
            {"routing": {"by": "ranking"}, "offers": [{"id": "Plan_A"}]},
            "offers[0].id: a routing deployment's",
        ),
        (
            {"routing": {"by": "ranking"}, "offers": [{"id": "router"}]},
            "offers[0].id: a routing deployment's",
        ),
        ({"routing": {"by": "ranking"}, "shadow": "other"}, "shadow: a routing deployment has no shadow"),
        ({"routing": {"by": "coin"}}, "routing.by"),
        (
            {
                "routing": {"by": "ranking"},
                "offers": [{"id": "plan-a", "budget": {"limit": 5, "period": "day"}}],
            },
            "offers[0].budget: a route has no budget",
        ),
    ],
)
def test_refused_naming_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        deployment_spec_from_mapping({**ROUTER, **overrides})
    assert message in str(refused.value)
