"""Thompson sampling with a bound model as its prior (`model_prior_weight`): each arm starts with
pseudo-observations at the model's predicted take-up for the customer and offer, and the arm's own
evidence takes over as it accumulates."""

from __future__ import annotations

import numpy as np
import pytest

from libs.common.deployment_spec import ThompsonAlgorithm
from libs.common.errors import FailedPrecondition
from libs.policy.models import LoadedModel, load_model
from libs.policy.ranking import rank
from libs.policy.scorers import ThompsonScorer, build_scorer
from libs.policy.statistics import ArmCounts, Statistics
from tests.trainer_datasets import OFFERS, take_up_spec, train_artifact

pytestmark = pytest.mark.timeout(60)

CUSTOMER = {"age": "25", "tenure_months": "60", "region": "north"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    scratch = tmp_path_factory.mktemp("trained")
    trained = train_artifact(scratch, scratch / "artifacts", take_up_spec(), rows=500)
    return load_model(trained.directory, "take-up", 1)


def test_a_strong_model_prior_puts_every_arm_at_the_models_take_up(model: LoadedModel) -> None:
    expected = model.predict_offers(CUSTOMER, list(OFFERS))
    weight = 1e6  # so strong that every posterior sample sits on the model's take-up
    scorer = build_scorer(ThompsonAlgorithm(model_prior_weight=weight), model)
    assert scorer.reads_raw_features
    scores = scorer.score(list(OFFERS), np.ones(3), Statistics(), {}, CUSTOMER, np.random.default_rng(0))
    assert np.allclose(scores.arm_reward, (1 + weight * expected) / (2 + weight), atol=1e-9)
    assert np.allclose(scores.score, expected, atol=0.005)
    best = int(np.argmax(expected))
    first = rank(scores, ["any"] * 3, epsilon=0.0, count=1, category_limit=None, rng=np.random.default_rng(0))
    assert first.first_slot.propensities[best] == 1.0


def test_evidence_adds_to_the_models_pseudo_counts(model: LoadedModel) -> None:
    expected = model.predict_offers(CUSTOMER, list(OFFERS))
    best = int(np.argmax(expected))
    scorer = build_scorer(ThompsonAlgorithm(model_prior_weight=10), model)
    cold = scorer.score(list(OFFERS), np.ones(3), Statistics(), {}, CUSTOMER, np.random.default_rng(0))
    assert np.allclose(cold.arm_reward, (1 + 10 * expected) / 12, atol=1e-9)
    failing = Statistics(arms={OFFERS[best]: ArmCounts(impressions=1000, successes=0)})
    taught = scorer.score(list(OFFERS), np.ones(3), failing, {}, CUSTOMER, np.random.default_rng(0))
    assert taught.arm_reward[best] == pytest.approx((1 + 10 * expected[best]) / 1012, abs=1e-9)
    assert taught.arm_count[best] == 1000


def test_without_a_weight_the_model_is_not_consulted(model: LoadedModel) -> None:
    plain = ThompsonScorer(ThompsonAlgorithm(), model)
    assert not plain.reads_raw_features
    flat = plain.score(list(OFFERS), np.ones(3), Statistics(), {}, CUSTOMER, np.random.default_rng(0))
    assert flat.arm_reward.tolist() == [0.5, 0.5, 0.5]


def test_a_model_prior_without_a_loaded_model_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match="model_prior_weight needs a loaded model"):
        build_scorer(ThompsonAlgorithm(model_prior_weight=5))
