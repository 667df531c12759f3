"""The ranking step's propensities are exact: checked against a brute-force enumeration of every
equally likely outcome of the logging policy (exploration's permutations, a randomised scorer's
draws, a deterministic scorer's tie-breaks), with category caps; and calibrated over 20,000
decisions of a stationary deployment for every algorithm, through `PreparedDeployment.choose`,
the step the predictor, the simulation and the monitor's evaluation share."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from libs.common.deployment_spec import ThompsonAlgorithm, deployment_spec_from_mapping
from libs.policy.context import derive_context
from libs.policy.deployment import PreparedDeployment
from libs.policy.models import LoadedModel, load_model
from libs.policy.ranking import _arrange, rank
from libs.policy.scorers import Scores, ThompsonScorer
from libs.policy.statistics import ArmCounts, LinearState, Statistics
from tests.propensity_calibration import Calibration
from tests.trainer_datasets import take_up_spec, train_artifact

pytestmark = pytest.mark.timeout(120)

CATEGORIES = ["data", "data", "voice", "roaming"]


def enumerate_prefixes(
    scores: Scores, categories: Sequence[str], epsilon: float, count: int, limit: int | None
) -> dict[tuple[int, ...], float]:
    """P(every prefix of the shown list), by listing the policy's equally likely outcomes."""
    width = len(categories)
    outcomes: list[tuple[float, list[int]]] = []
    permutations = list(itertools.permutations(range(width)))
    for order in permutations:  # exploring: a uniformly random order
        outcomes.append((epsilon / len(permutations), list(order)))
    values = np.where(np.isnan(scores.score), -np.inf, scores.score)
    if scores.outcomes is not None:
        for row in scores.outcomes:
            order = np.argsort(-row, kind="stable").tolist()
            outcomes.append(((1 - epsilon) / len(scores.outcomes), order))
    else:
        for keys in permutations:  # exploiting: by value, ties broken by uniformly random keys
            order = np.lexsort((np.array(keys, dtype=float), -values)).tolist()
            outcomes.append(((1 - epsilon) / len(permutations), order))
    probability: dict[tuple[int, ...], float] = defaultdict(float)
    for weight, order in outcomes:
        shown = _arrange(np.array(order), categories, count, limit)
        for length in range(len(shown) + 1):
            probability[tuple(shown[:length])] += weight
    return probability


CASES = [
    ("draws", 0.3, 3, None),
    ("draws", 0.3, 3, 1),
    ("draws", 0.0, 4, 1),
    ("ties", 0.25, 3, None),
    ("ties", 0.25, 3, 1),
    ("ties", 0.0, 2, None),
    ("distinct", 0.1, 4, 1),
]


@pytest.mark.parametrize(("kind", "epsilon", "count", "limit"), CASES)
def test_every_logged_propensity_equals_the_enumerated_probability(
    kind: str, epsilon: float, count: int, limit: int | None
) -> None:
    rng = np.random.default_rng(11)
    for trial in range(60):
        if kind == "draws":
            outcomes = rng.beta([2, 3, 1, 2], [5, 4, 6, 3], size=(6, 4))
            outcomes[0] = outcomes[1]  # a repeated draw: its weight counts twice
            scores = Scores(outcomes[rng.integers(6)], np.zeros(4), np.zeros(4), outcomes)
        elif kind == "ties":
            scores = Scores(
                np.array([0.5, 0.5, 0.5, 0.2]) if trial % 2 else np.full(4, 0.3), np.zeros(4), np.zeros(4)
            )
        else:
            scores = Scores(np.array([0.4, 0.1, 0.3, 0.2]), np.zeros(4), np.zeros(4))
        exact = enumerate_prefixes(scores, CATEGORIES, epsilon, count, limit)
        ranking = rank(scores, CATEGORIES, epsilon=epsilon, count=count, category_limit=limit, rng=rng)
        # The first slot of every eligible offer.
        first = [exact.get((index,), 0.0) for index in range(4)]
        assert ranking.first_slot.propensities.tolist() == pytest.approx(first, abs=1e-12)
        # Each shown offer: P(at its rank | the ranks above), never 0, and their product the prefix's.
        product = 1.0
        for position, propensity in enumerate(ranking.propensities):
            prefix = tuple(ranking.shown[: position + 1])
            assert 0 < propensity <= 1
            assert propensity == pytest.approx(exact[prefix] / exact[prefix[:-1]], abs=1e-12)
            product *= propensity
        assert product == pytest.approx(exact[tuple(ranking.shown)], abs=1e-12)


def test_a_deterministic_policy_without_exploration_is_certain_slot_by_slot() -> None:
    scores = Scores(np.array([0.4, 0.1, 0.3, 0.2]), np.zeros(4), np.zeros(4))
    ranking = rank(scores, CATEGORIES, epsilon=0.0, count=3, category_limit=1, rng=np.random.default_rng(0))
    assert ranking.shown == [0, 2, 3]  # the second data offer waits behind the cap
    assert ranking.propensities == [1.0, 1.0, 1.0]
    assert ranking.first_slot.counts.tolist() == [1, 0, 0, 0]
    assert ranking.first_slot.outcomes == 1


# Calibration over 20,000 decisions ----------------------------------------------------------------

DECISIONS = 20_000
OFFERS = ["alpha", "bravo", "charlie", "delta", "echo"]


def spec(algorithm: dict[str, Any], epsilon: float, model: bool = False) -> PreparedDeployment:
    document: dict[str, Any] = {
        "name": "calibration",
        "offers": [{"id": offer} for offer in OFFERS],
        "algorithm": algorithm,
        "exploration_epsilon": epsilon,
        "context_variables": [{"name": "x", "source": "param", "kind": "numeric", "default": 0}],
        "default_number_of_offers": 2,
    }
    if model:
        document["model"] = {"name": "take-up", "version": 1}
    return document  # type: ignore[return-value]


@pytest.fixture(scope="module")
def take_up_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    scratch = tmp_path_factory.mktemp("calibration-model")
    trained = train_artifact(scratch, scratch / "artifacts", take_up_spec(), rows=500)
    return load_model(trained.directory, "take-up", 1)


def linear_statistics(rng: np.random.Generator) -> Statistics:
    models = {}
    for index, offer in enumerate(OFFERS):
        x = np.column_stack([np.ones(200), rng.uniform(-1, 1, 200)])
        y = (rng.random(200) < 0.3 + 0.1 * index * x[:, 1]).astype(float)
        models[offer] = LinearState(x.T @ x, x.T @ y)
    return Statistics(linear=models)


ALGORITHMS = {
    "thompson": ({"approach": "thompson"}, 0.05),
    "epsilon_greedy": ({"approach": "epsilon_greedy"}, 0.2),
    "linucb": ({"approach": "linucb", "features": ["x"], "alpha": 0.3}, 0.1),
    "linear_thompson": ({"approach": "linear_thompson", "features": ["x"], "scale": 0.3}, 0.05),
    "model": ({"approach": "model"}, 0.1),
}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_first_slot_propensities_are_calibrated_over_20000_decisions(
    algorithm: str, request: pytest.FixtureRequest
) -> None:
    """Every propensity bucket within binomial noise (tests/propensity_calibration.py)."""
    document, epsilon = ALGORITHMS[algorithm]
    models: dict[tuple[str, int], LoadedModel] = {}
    if algorithm == "model":
        models = {("take-up", 1): request.getfixturevalue("take_up_model")}
    prepared = PreparedDeployment.prepare(
        deployment_spec_from_mapping(spec(document, epsilon, model=bool(models))), models
    )
    rng = np.random.default_rng(20_000)
    statistics = {
        "thompson": Statistics(arms={o: ArmCounts(400, 40 + 6 * i) for i, o in enumerate(OFFERS)}),
        "epsilon_greedy": Statistics(arms={o: ArmCounts(400, 40 + 6 * i) for i, o in enumerate(OFFERS)}),
    }.get(algorithm) or (linear_statistics(rng) if "lin" in algorithm else Statistics())
    plan = prepared.plans[""]
    calibration = Calibration()
    for decision in range(DECISIONS):
        params = {"x": float(rng.uniform(-1, 1))}
        features = {"age": str(20 + decision % 50), "tenure_months": str(decision % 90), "region": "north"}
        context = derive_context(prepared.spec, {}, params, "")
        eligible = prepared.eligible(context, params)
        choice = prepared.choose(
            plan, eligible, context, statistics, rng, count=2, features=features, params=params
        )
        propensities = choice.first_slot.propensities
        first = OFFERS.index(choice.offers[0].offer.id)
        assert propensities[first] == choice.offers[0].propensity
        assert all(0 < row.propensity <= 1 for row in choice.offers)
        calibration.add(propensities, first)
    calibration.check(algorithm)


def test_nothing_asked_shows_nothing_and_nothing_eligible_is_refused() -> None:
    scores = Scores(np.array([0.4, 0.1, 0.3, 0.2]), np.zeros(4), np.zeros(4))
    ranking = rank(
        scores, CATEGORIES, epsilon=0.1, count=0, category_limit=None, rng=np.random.default_rng(0)
    )
    assert (ranking.shown, ranking.propensities) == ([], [])
    assert ranking.first_slot.propensities.sum() == pytest.approx(1.0)
    empty = Scores(np.zeros(0), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="no eligible offer"):
        rank(empty, [], epsilon=0.1, count=1, category_limit=None, rng=np.random.default_rng(0))


def test_a_model_prior_that_predicts_no_number_adds_no_pseudo_counts() -> None:
    """Thompson's draws stay numbers, so the first slot's counts and the decision agree."""

    class Unsure:
        name, version = "unsure", 1

        def predict_offers(self, values: Any, offers: Sequence[str]) -> np.ndarray:
            return np.array([np.nan, 0.9, np.nan])

    scorer = ThompsonScorer(ThompsonAlgorithm(model_prior_weight=50), Unsure())  # type: ignore[arg-type]
    rng = np.random.default_rng(4)
    scores = scorer.score(["a", "b", "c"], np.ones(3), Statistics(), {}, {}, rng)
    assert scores.outcomes is not None
    assert np.isfinite(scores.outcomes).all()
    ranking = rank(scores, ["x"] * 3, epsilon=0.0, count=2, category_limit=None, rng=rng)
    assert ranking.shown[0] == int(np.argmax(scores.score))
    assert all(0 < p <= 1 for p in ranking.propensities)
    assert scores.arm_reward.tolist() == pytest.approx([0.5, (1 + 45) / (2 + 50), 0.5])
