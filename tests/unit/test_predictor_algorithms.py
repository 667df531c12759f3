"""Scoring algorithms and plugins, without a server or Redis.

Every algorithm's scores give, per offer, the probability that exploiting ranks it first (see
libs/policy/ranking.py): those probabilities sum to 1; deterministic scorers give 1 to the top
offer (split evenly over exact ties) and 0 to the rest; randomised ones count them over their
equally likely posterior draws, one of which is the request's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from libs.common.deployment_spec import Algorithm, Offer, PluginRef, ThompsonAlgorithm
from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.policy.context import Context
from libs.policy.plugins import PluginChain, bind_plugins
from libs.policy.ranking import rank
from libs.policy.scorers import POSTERIOR_DRAWS, LinearScorer, Scorer, Scores, ThompsonScorer, build_scorer
from libs.policy.statistics import ArmCounts, LinearState, Statistics

pytestmark = pytest.mark.timeout(60)

OFFERS = ["a", "b", "c", "d"]
ALGORITHM = TypeAdapter(Algorithm)


def scorer(**document: Any) -> Scorer:
    return build_scorer(ALGORITHM.validate_python(document))


def score(
    scorer_: Scorer,
    statistics: Statistics,
    *,
    offers: Sequence[str] = OFFERS,
    weights: Sequence[float] | None = None,
    numeric: Mapping[str, float] | None = None,
    categorical: Mapping[str, str] | None = None,
    seed: int | np.random.Generator = 0,
) -> Scores:
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return scorer_.score(
        list(offers),
        np.ones(len(offers)) if weights is None else np.array(weights, dtype=float),
        statistics,
        numeric or {},
        categorical or {},
        rng,
    )


def first_slot(scored: Scores) -> np.ndarray:
    """P(each offer is ranked first) when the policy exploits (no exploration)."""
    ranking = rank(
        scored,
        ["any"] * len(scored.score),
        epsilon=0.0,
        count=1,
        category_limit=None,
        rng=np.random.default_rng(0),
    )
    return ranking.first_slot.propensities


def arms(**counts: tuple[float, float]) -> Statistics:
    return Statistics(arms={offer: ArmCounts(n, s) for offer, (n, s) in counts.items()})


def linear_statistics(rows: Sequence[tuple[str, Sequence[float], float]], d: int) -> Statistics:
    """A, b per offer from (offer, x with intercept, reward) rows, as the options store keeps them."""
    a: dict[str, np.ndarray] = {}
    b: dict[str, np.ndarray] = {}
    for offer, x, reward in rows:
        vector = np.array(x, dtype=float)
        a[offer] = a.get(offer, np.zeros((d, d))) + np.outer(vector, vector)
        b[offer] = b.get(offer, np.zeros(d)) + reward * vector
    return Statistics(linear={offer: LinearState(a[offer], b[offer]) for offer in a})


RANDOM_STATISTICS = [
    ("thompson", {"approach": "thompson"}, arms(a=(50, 10), b=(40, 9), c=(5, 1), d=(0, 0))),
    ("thompson-decayed", {"approach": "thompson", "alpha0": 2, "beta0": 5}, arms(a=(3.5, 0.7), b=(1.2, 1.2))),
    ("epsilon-greedy", {"approach": "epsilon_greedy"}, arms(a=(50, 10), b=(40, 9), c=(5, 1))),
    ("epsilon-greedy-prior", {"approach": "epsilon_greedy", "prior_take_up": 0.3}, arms(a=(50, 10))),
    ("naive-bayes", {"approach": "naive_bayes"}, Statistics()),
    ("linucb", {"approach": "linucb", "features": ["x"]}, Statistics()),
    ("linear-thompson", {"approach": "linear_thompson", "features": ["x"]}, Statistics()),
]


@pytest.mark.parametrize(
    ("case", "document", "statistics"), RANDOM_STATISTICS, ids=[c[0] for c in RANDOM_STATISTICS]
)
def test_top_probabilities_are_a_distribution(
    case: str, document: dict[str, Any], statistics: Statistics
) -> None:
    scored = score(scorer(**document), statistics, numeric={"x": 0.7}, categorical={"region": "north"})
    for array in (scored.score, scored.arm_reward, scored.arm_count, first_slot(scored)):
        assert array.shape == (len(OFFERS),)
        assert np.all(np.isfinite(array))
    assert np.all(first_slot(scored) >= 0)
    assert first_slot(scored).sum() == pytest.approx(1.0)


def test_deterministic_scorers_give_one_to_the_best_and_split_exact_ties() -> None:
    greedy = scorer(approach="epsilon_greedy")
    best = score(greedy, arms(a=(100, 10), b=(100, 30), c=(100, 20), d=(100, 5)))
    assert first_slot(best).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert int(np.argmax(best.score)) == 1
    tied = score(greedy, arms(a=(100, 30), b=(100, 30), c=(100, 20), d=(100, 5)))
    assert first_slot(tied).tolist() == [0.5, 0.5, 0.0, 0.0]
    cold = score(greedy, Statistics())
    assert first_slot(cold).tolist() == [0.25] * 4
    # Ties are ranked at random (and evenly), as the split propensity says.
    cold_scores = score(greedy, Statistics())
    leaders = [
        rank(
            cold_scores,
            ["any"] * 4,
            epsilon=0.0,
            count=1,
            category_limit=None,
            rng=np.random.default_rng(seed),
        ).shown[0]
        for seed in range(2000)
    ]
    shares = np.bincount(leaders, minlength=4) / 2000
    assert np.all(np.abs(shares - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 2000)), shares


def test_weights_scale_scores_and_a_zero_weight_never_leads() -> None:
    greedy = scorer(approach="epsilon_greedy")
    statistics = arms(a=(100, 30), b=(100, 20), c=(100, 10), d=(100, 5))
    weighted = score(greedy, statistics, weights=[1.0, 2.0, 1.0, 0.0])
    assert first_slot(weighted).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert weighted.arm_reward.tolist() == pytest.approx([30 / 101, 20 / 101, 10 / 101, 5 / 101])
    thompson = score(scorer(approach="thompson"), statistics, weights=[1.0, 1.0, 1.0, 0.0])
    assert first_slot(thompson)[3] == 0.0


def test_thompson_reward_estimate_and_counts() -> None:
    scored = score(
        scorer(approach="thompson", alpha0=1, beta0=1), arms(a=(10, 4), b=(0, 0), c=(3, 3), d=(1, 0))
    )
    assert scored.arm_reward.tolist() == pytest.approx([5 / 12, 1 / 2, 4 / 5, 1 / 3])
    assert scored.arm_count.tolist() == [10, 0, 3, 1]


@pytest.mark.parametrize(
    ("document", "statistics", "numeric"),
    [
        ({"approach": "thompson"}, arms(a=(60, 12), b=(50, 9), c=(20, 3), d=(5, 1)), {}),
        (
            {"approach": "linear_thompson", "features": ["x"], "scale": 0.5},
            linear_statistics(
                [(o, [1, x], r) for o, x, r in [("a", 1, 1), ("a", 0.5, 0), ("b", 1, 0.5), ("c", 0, 1)]], 2
            ),
            {"x": 0.8},
        ),
    ],
    ids=["thompson", "linear-thompson"],
)
def test_sampled_propensity_is_the_share_of_draws_and_matches_the_observed_frequency(
    document: dict[str, Any], statistics: Statistics, numeric: Mapping[str, float]
) -> None:
    """A randomised scorer ranks by one of its POSTERIOR_DRAWS equally likely draws, so the
    first-slot propensity of an offer is exactly the share of draws it wins: over many calls the
    share of calls it came first matches the mean propensity within binomial noise alone
    (4 standard errors of sqrt(p (1 - p) / calls))."""
    scorer_ = scorer(**document)
    rng = np.random.default_rng(2024)
    calls = 4000
    estimated = np.zeros(len(OFFERS))
    leads = np.zeros(len(OFFERS))
    for _ in range(calls):
        scored = score(scorer_, statistics, numeric=numeric, seed=rng)
        assert scored.outcomes is not None
        assert scored.outcomes.shape == (POSTERIOR_DRAWS, len(OFFERS))
        assert any(np.array_equal(row, scored.score) for row in scored.outcomes)  # the request's own draw
        propensities = first_slot(scored)
        assert np.all(propensities * POSTERIOR_DRAWS == np.round(propensities * POSTERIOR_DRAWS))
        assert propensities[int(np.argmax(scored.score))] >= 1 / POSTERIOR_DRAWS  # never 0 for the winner
        estimated += propensities
        leads[int(np.argmax(scored.score))] += 1
    estimated /= calls
    observed = leads / calls
    tolerance = 4 * np.sqrt(np.maximum(estimated * (1 - estimated), 1e-4) / calls)
    assert np.all(np.abs(observed - estimated) < tolerance), (estimated, observed, tolerance)
    assert estimated.max() < 0.95  # a genuinely randomised choice


def test_thompson_pools_follow_the_posterior_at_once_and_per_segment() -> None:
    """A segment's pool of draws is reused and refreshed a slice per call, but a posterior that moved
    (a response learned) or another segment gets fresh draws at once."""
    scorer_ = ThompsonScorer(ThompsonAlgorithm())
    a_leads = arms(a=(100, 60), b=(100, 10), c=(100, 10), d=(100, 10))
    b_leads = arms(a=(100, 10), b=(100, 60), c=(100, 10), d=(100, 10))
    rng = np.random.default_rng(3)

    def top(statistics: Statistics, segment: str) -> np.ndarray:
        return first_slot(scorer_.score(OFFERS, np.ones(4), statistics, {}, {}, rng, segment=segment))

    assert top(a_leads, "s1")[0] == 1.0
    pool = scorer_._pools[("s1", tuple(OFFERS), np.ones(4).tobytes())]
    assert top(a_leads, "s1")[0] == 1.0  # the pool, refreshed by a slice
    assert scorer_._pools[("s1", tuple(OFFERS), np.ones(4).tobytes())] is pool
    assert pool.next_row == 32
    assert top(b_leads, "s1")[1] == 1.0  # the posterior moved: fresh draws, not the old pool
    assert top(a_leads, "s2")[0] == 1.0  # another segment has its own pool
    assert top(b_leads, "s1")[1] == 1.0
    # A flat posterior: no offer wins every draw.
    flat = arms(a=(2, 1), b=(2, 1), c=(2, 1), d=(2, 1))
    first = top(flat, "s3")
    assert first.sum() == pytest.approx(1.0)
    assert first.max() < 1.0


def test_linucb_prefers_the_offer_whose_linear_model_fits_the_context() -> None:
    # Offer "young" is taken by low x, "old" by high x, "flat" half the time whatever x is.
    rng = np.random.default_rng(7)
    rows = []
    for _ in range(400):
        x = float(rng.uniform(0, 1))
        rows += [("young", [1, x], float(x < 0.5)), ("old", [1, x], float(x >= 0.5)), ("flat", [1, x], 0.5)]
    statistics = linear_statistics(rows, 2)
    linucb = scorer(approach="linucb", features=["x"], alpha=0.5)
    offers = ["young", "old", "flat"]
    low = score(linucb, statistics, offers=offers, numeric={"x": 0.05})
    high = score(linucb, statistics, offers=offers, numeric={"x": 0.95})
    assert first_slot(low).tolist() == [1.0, 0.0, 0.0]
    assert first_slot(high).tolist() == [0.0, 1.0, 0.0]
    assert low.arm_reward[0] > 0.6 > low.arm_reward[1]
    assert low.arm_count.tolist() == [400, 400, 400]
    # With no evidence the upper bounds tie: split evenly, ranked at random.
    assert first_slot(score(linucb, Statistics(), offers=offers, numeric={"x": 0.3})).tolist() == [1 / 3] * 3


def test_linear_models_over_other_features_are_ignored() -> None:
    # Learned when the deployment had two features; it now has one (dimension 2, not 3).
    stale = linear_statistics([("a", [1, 0.5, 2.0], 1.0)], 3)
    scored = score(scorer(approach="linucb", features=["x"]), stale, offers=["a", "b"], numeric={"x": 1})
    assert scored.arm_count.tolist() == [0.0, 0.0]
    assert first_slot(scored).tolist() == [0.5, 0.5]


def test_linear_vector_has_an_intercept_and_zero_for_missing_features() -> None:
    linear = scorer(approach="linucb", features=["x", "y"])
    assert isinstance(linear, LinearScorer)
    assert linear.dimension == 3
    assert linear.vector({"y": 2.0, "z": 9.0}).tolist() == [1.0, 0.0, 2.0]


def test_naive_bayes_uses_the_context() -> None:
    # "a" is taken in the north, "b" in the south, each with the same overall take-up.
    counts = {
        "a|n": 200, "a|s": 40, "a|region=north|n": 100, "a|region=north|s": 35, "a|region=south|n": 100, "a|region=south|s": 5,
        "b|n": 200, "b|s": 40, "b|region=north|n": 100, "b|region=north|s": 5, "b|region=south|n": 100, "b|region=south|s": 35,
    }  # fmt: skip
    bayes = scorer(approach="naive_bayes")
    statistics = Statistics(naive_bayes={k: float(v) for k, v in counts.items()})
    north = score(bayes, statistics, offers=["a", "b"], categorical={"region": "north"})
    south = score(bayes, statistics, offers=["a", "b"], categorical={"region": "south"})
    assert first_slot(north).tolist() == [1.0, 0.0]
    assert first_slot(south).tolist() == [0.0, 1.0]
    assert north.arm_reward[0] > 0.3 > north.arm_reward[1]
    assert north.arm_count.tolist() == [200, 200]


def test_the_model_algorithm_needs_a_loaded_model() -> None:
    with pytest.raises(FailedPrecondition, match="model"):
        scorer(approach="model")


# Plugins --------------------------------------------------------------------------------------

CATALOGUE = [
    Offer(id="d1", price=10, cost=4, category="data"),
    Offer(id="d2", price=30, cost=5, category="data"),
    Offer(id="v1", price=8, cost=1, category="voice"),
    Offer(id="v2", price=20, cost=20, category="voice"),
    Offer(id="r1", price=12, cost=2, category="roaming"),
]
NO_CONTEXT = Context({}, "all", {}, ())


def chain(*plugins: dict[str, Any]) -> PluginChain:
    return bind_plugins([PluginRef.model_validate(plugin) for plugin in plugins])


def kept(plugins: PluginChain, params: dict[str, Any]) -> list[str]:
    skips: list[Any] = []
    offers = plugins.filter("d", "c", CATALOGUE, NO_CONTEXT, params, {}, skips)
    assert skips == []
    return ids(offers)


def factors(plugins: PluginChain) -> list[float]:
    skips: list[Any] = []
    result, _ = plugins.post_score_factors("d", "c", CATALOGUE, NO_CONTEXT, {}, skips)
    assert skips == []
    return list(result.tolist())


def category_limit(plugins: PluginChain) -> int | None:
    return plugins.post_score_factors("d", "c", CATALOGUE, NO_CONTEXT, {}, [])[1]


def ids(offers: Sequence[Offer]) -> list[str]:
    return [offer.id for offer in offers]


def test_exclude_offers_from_the_spec_and_from_a_param() -> None:
    plugins = chain(
        {"name": "exclude_offers", "stage": "pre_score", "params": {"offers": ["v2"], "param": "exclude"}}
    )
    assert kept(plugins, {}) == ["d1", "d2", "v1", "r1"]
    assert kept(plugins, {"exclude": "d1, r1"}) == ["d2", "v1"]
    assert kept(plugins, {"exclude": ["d2"]}) == ["d1", "v1", "r1"]
    assert kept(plugins, {"exclude": 42}) == ["d1", "d2", "v1", "r1"]
    assert kept(plugins, {"other": "d1"}) == ["d1", "d2", "v1", "r1"]


def test_value_weighting_by_margin_or_price_with_a_power() -> None:
    margin = chain({"name": "value_weighting", "stage": "post_score"})
    assert factors(margin) == [6, 25, 7, 0, 10]
    price = chain(
        {"name": "value_weighting", "stage": "post_score", "params": {"basis": "price", "power": 0.5}}
    )
    assert factors(price) == pytest.approx(np.sqrt([10, 30, 8, 20, 12]))
    both = chain(
        {"name": "value_weighting", "stage": "post_score"},
        {"name": "value_weighting", "stage": "post_score", "params": {"basis": "price"}},
    )
    assert factors(both) == [60, 750, 56, 0, 120]
    assert factors(chain()) == [1.0] * 5


def test_category_cap_keeps_the_order_and_skips_over_full_categories() -> None:
    capped = chain({"name": "category_cap", "stage": "post_score", "params": {"max_per_category": 1}})
    two = chain({"name": "category_cap", "stage": "post_score", "params": {"max_per_category": 2}})
    assert (category_limit(capped), category_limit(two), category_limit(chain())) == (1, 2, None)
    # Ranked d2, d1, v2, v1, r1 by score.
    scores = Scores(np.array([4.0, 5.0, 2.0, 3.0, 1.0]), np.zeros(5), np.zeros(5))
    categories = [offer.category for offer in CATALOGUE]

    def shown(count: int, limit: int | None) -> list[str]:
        ranking = rank(
            scores, categories, epsilon=0.0, count=count, category_limit=limit, rng=np.random.default_rng(0)
        )
        assert ranking.propensities == [1.0] * len(ranking.shown)  # deterministic: each slot certain
        return [CATALOGUE[index].id for index in ranking.shown]

    assert shown(3, 1) == ["d2", "v2", "r1"]
    assert shown(5, 1) == ["d2", "v2", "r1"]  # fewer than asked
    assert shown(2, None) == ["d2", "d1"]
    assert shown(4, 2) == ["d2", "d1", "v2", "v1"]


@pytest.mark.parametrize(
    ("plugin", "field"),
    [
        ({"name": "no_such_plugin", "stage": "pre_score"}, "plugins[0].name"),
        ({"name": "exclude_offers", "stage": "post_score"}, "plugins[0].stage"),
        (
            {"name": "exclude_offers", "stage": "pre_score", "params": {"offers": "d1"}},
            "plugins[0].params.offers",
        ),
        (
            {"name": "value_weighting", "stage": "post_score", "params": {"basis": "love"}},
            "plugins[0].params.basis",
        ),
        (
            {"name": "category_cap", "stage": "post_score", "params": {"max_per_category": 0}},
            "plugins[0].params.max_per_category",
        ),
        ({"name": "category_cap", "stage": "post_score", "params": {}}, "plugins[0].params.max_per_category"),
        (
            {"name": "exclude_offers", "stage": "pre_score", "params": {"offer": ["d1"]}},
            "plugins[0].params.offer",
        ),
    ],
)
def test_bad_plugin_settings_name_the_field(plugin: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        chain(plugin)
    assert error.value.field == field
