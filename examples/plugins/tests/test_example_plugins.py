"""The example plugins, as a deployment binds them: found among the installed packages by name,
their parameters validated, then run on requests."""

from __future__ import annotations

from typing import Any

import pytest

from libs.common.deployment_spec import Corpus, Offer, PluginRef
from libs.common.errors import InvalidArgument
from libs.policy.context import Context
from libs.policy.plugins import PluginChain, RewardInput, bind_plugins, corpora_of, installed_plugins

pytestmark = pytest.mark.timeout(30)

OFFERS = [
    Offer(id="gold-data", category="data", attributes={"tier": "gold"}),
    Offer(id="basic-data", category="data", attributes={"tier": "basic"}),
    Offer(id="roam-eu", category="roaming", attributes={"tier": "gold"}),
]


def bound(*plugins: dict[str, Any]) -> PluginChain:
    return bind_plugins([PluginRef.model_validate(plugin) for plugin in plugins])


def context(**values: str | float) -> Context:
    return Context(dict(values), "all", {}, ())


def test_all_three_are_installed_from_this_package() -> None:
    installed = installed_plugins()
    for name, stage in (
        ("hide_categories", "pre_score"),
        ("loyalty_boost", "post_score"),
        ("amount_reward", "reward"),
        ("catalog_margin", "post_score"),
    ):
        assert installed[name].distribution == "liveloop-example-plugins"
        assert installed[name].stage.value == stage


def test_hide_categories_always_or_when_a_param_says_so() -> None:
    always = bound({"name": "hide_categories", "stage": "pre_score", "params": {"categories": ["roaming"]}})
    when = bound(
        {
            "name": "hide_categories",
            "stage": "pre_score",
            "params": {"categories": ["roaming"], "when_param": "travelling"},
        }
    )

    def kept(chain: PluginChain, params: dict[str, Any]) -> list[str]:
        skips: list[Any] = []
        offers = chain.filter("d", "c", OFFERS, context(), params, {}, skips)
        assert skips == []
        return [offer.id for offer in offers]

    assert kept(always, {}) == ["gold-data", "basic-data"]
    assert kept(when, {}) == ["gold-data", "basic-data", "roam-eu"]
    assert kept(when, {"travelling": "no"}) == ["gold-data", "basic-data", "roam-eu"]
    assert kept(when, {"travelling": True}) == ["gold-data", "basic-data"]


def test_loyalty_boost_multiplies_the_offers_of_the_customers_tier() -> None:
    chain = bound({"name": "loyalty_boost", "stage": "post_score", "params": {"boost": 3.0}})
    factors, cap = chain.post_score_factors("d", "c", OFFERS, context(tier="gold"), {}, [])
    assert factors.tolist() == [3.0, 1.0, 3.0]
    assert cap is None
    untiered, _ = chain.post_score_factors("d", "c", OFFERS, context(), {}, [])
    assert untiered.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("plugin", "field"),
    [
        ({"name": "hide_categories", "stage": "pre_score", "params": {}}, "plugins[0].params.categories"),
        (
            {"name": "hide_categories", "stage": "post_score", "params": {"categories": ["x"]}},
            "plugins[0].stage",
        ),
        (
            {"name": "loyalty_boost", "stage": "post_score", "params": {"boost": -1}},
            "plugins[0].params.boost",
        ),
        ({"name": "loyalty_boost", "stage": "post_score", "params": {"bost": 2}}, "plugins[0].params.bost"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(plugin: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        bound(plugin)
    assert refused.value.field == field


def rewarded(
    chain: PluginChain, payload: dict[str, Any], reward: float = 1.0, channel: str = "app"
) -> tuple[float, float]:
    request = RewardInput("d", "u", ["gold-data"], reward, payload, channel, {}, "all")
    skips: list[Any] = []
    result = chain.rewarded(request, takes_negative=False, skips=skips)
    assert skips == []
    return result


def test_amount_reward_scales_and_caps_the_amount_and_weighs_by_channel() -> None:
    chain = bound(
        {
            "name": "amount_reward",
            "stage": "reward",
            "params": {"scale": 0.01, "cap": 0.5, "channel_weights": {"call-centre": 0.25}},
        }
    )
    assert rewarded(chain, {"amount": 20}) == (0.2, 1.0)
    assert rewarded(chain, {"amount": 2000}) == (0.5, 1.0)  # capped
    assert rewarded(chain, {"amount": -5}) == (0.0, 1.0)  # never negative
    assert rewarded(chain, {"amount": 20}, channel="call-centre") == (0.2, 0.25)
    assert rewarded(chain, {}, reward=0.75) == (0.75, 1.0)  # no amount: the reward it had
    assert rewarded(chain, {"amount": "20"}, reward=0.75) == (0.75, 1.0)


def test_catalog_margin_weighs_offers_by_the_corpus_the_deployment_names() -> None:
    corpora = corpora_of(
        {
            "catalog": Corpus(
                key="offer", rows=[{"offer": "gold-data", "margin": 4.0}, {"offer": "roam-eu", "margin": 0.5}]
            )
        }
    )
    plugin = PluginRef.model_validate(
        {"name": "catalog_margin", "stage": "post_score", "params": {"missing": 2}}
    )
    chain = bind_plugins([plugin], corpora=corpora)
    factors, _ = chain.post_score_factors("d", "c", OFFERS, context(), {}, [])
    assert factors.tolist() == [4.0, 2.0, 0.5]  # basic-data is not in the catalog

    skips: list[Any] = []
    without = bind_plugins([plugin])  # a deployment without the corpus: skipped, with the reason
    assert without.post_score_factors("d", "c", OFFERS, context(), {}, skips)[0].tolist() == [1.0, 1.0, 1.0]
    assert [(skip.plugin, skip.reason) for skip in skips] == [("catalog_margin", "error")]
    assert "no corpus 'catalog'" in skips[0].detail
