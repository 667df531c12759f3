"""Off-policy estimators and the cross-fitted reward model of the monitor's offline evaluation:
formulas on hand-computed arrays, clipping, the refusals, the bootstrap, and accuracy against the
exact value of a candidate on synthetic logs from a known logging policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from libs.common.errors import InvalidArgument
from services.monitor.core.estimators import (
    ESTIMATORS,
    MAX_UNSUPPORTED_MASS,
    SUPPORT_FLOOR,
    WEIGHT_BASED_ESTIMATORS,
    LoggedDecisions,
    estimate_policy_value,
)
from services.monitor.core.reward_model import cross_fitted_expected_rewards

pytestmark = pytest.mark.timeout(60)


def hand_computed() -> LoggedDecisions:
    """Three decisions; the second has two eligible offers (its third column is padding).

    w = candidate[i, action] / propensity = [0.4, 2, 4]; rewards [1, 0, 2].
    """
    return LoggedDecisions(
        eligible=np.array([[True, True, True], [True, True, False], [True, True, True]]),
        action=np.array([0, 1, 2]),
        logging_propensity=np.array([0.5, 0.25, 0.2]),
        reward=np.array([1.0, 0.0, 2.0]),
        candidate=np.array([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]]),
        # 9.0 sits in padding: it must not count
        expected_reward=np.array([[0.5, 0.2, 0.1], [0.3, 0.6, 9.0], [0.0, 0.4, 1.5]]),
    )


def test_formulas_on_hand_computed_arrays() -> None:
    evaluation = estimate_policy_value(hand_computed(), ESTIMATORS, bootstrap_samples=50)

    # dm per decision: 0.21, 0.45, 1.24; residuals r - q[action]: 0.5, -0.6, 0.5
    expected = {
        "ips": (0.4 * 1 + 2 * 0 + 4 * 2) / 3,
        "snips": 8.4 / 6.4,
        "dm": (0.21 + 0.45 + 1.24) / 3,
        "dr": (0.21 + 0.4 * 0.5 + 0.45 - 2 * 0.6 + 1.24 + 4 * 0.5) / 3,
        "sndr": (0.21 + 0.45 + 1.24) / 3 + (0.4 * 0.5 - 2 * 0.6 + 4 * 0.5) / 6.4,
        "switch-dr": (0.21 + 0.4 * 0.5 + 0.45 - 2 * 0.6 + 1.24 + 4 * 0.5) / 3,  # nothing switched off
    }
    assert set(evaluation.estimates) == set(expected)
    for name, value in expected.items():
        estimate = evaluation.estimates[name]
        assert estimate.value == pytest.approx(value, abs=1e-12), name
        assert estimate.lift == pytest.approx(value - 1.0, abs=1e-12), name
    assert evaluation.logged_value == pytest.approx(1.0)
    assert evaluation.effective_sample_size == pytest.approx(6.4**2 / (0.4**2 + 2**2 + 4**2))
    assert evaluation.max_weight == pytest.approx(4.0)
    assert (evaluation.decisions, evaluation.usable_decisions) == (3, 3)
    assert evaluation.warnings == []
    assert evaluation.refused == {}


def test_clipping_follows_obp_lambda() -> None:
    evaluation = estimate_policy_value(
        hand_computed(), ESTIMATORS, max_importance_weight=3.0, bootstrap_samples=50
    )

    values = {name: estimate.value for name, estimate in evaluation.estimates.items()}
    assert values["ips"] == pytest.approx((0.4 + 3 * 2) / 3)  # w = 4 clipped to 3
    assert values["dr"] == pytest.approx((0.21 + 0.2 + 0.45 - 1.2 + 1.24 + 3 * 0.5) / 3)
    assert values["switch-dr"] == pytest.approx((0.21 + 0.2 + 0.45 - 1.2 + 1.24) / 3)  # w = 4 > 3: dm only
    assert values["snips"] == pytest.approx(8.4 / 6.4)  # obp clips neither self-normalised estimator
    assert values["sndr"] == pytest.approx(1.9 / 3 + 1.0 / 6.4)
    assert evaluation.max_weight == pytest.approx(4.0)  # reported before clipping
    assert evaluation.effective_sample_size == pytest.approx(6.4**2 / 20.16)


def test_bootstrap_interval_contains_the_value_and_repeats_for_a_seed() -> None:
    data = synthetic_log(SYNTHETIC, seed=7, decisions=5_000)

    first = estimate_policy_value(data, ESTIMATORS, bootstrap_samples=300, seed=11)
    again = estimate_policy_value(data, ESTIMATORS, bootstrap_samples=300, seed=11)
    other = estimate_policy_value(data, ESTIMATORS, bootstrap_samples=300, seed=12)

    assert first == again
    assert first.bootstrap_samples == 300
    for name, estimate in first.estimates.items():
        assert estimate.lower < estimate.value < estimate.upper, name
        assert estimate.std_error > 0, name
        # a percentile interval of a near-normal mean spans about 2 * 1.96 standard errors
        assert 2.5 < (estimate.upper - estimate.lower) / estimate.std_error < 5.5, name
        assert other.estimates[name].value == estimate.value
        assert other.estimates[name].lower != estimate.lower, name


def test_confidence_level_sets_the_interval_width() -> None:
    data = synthetic_log(SYNTHETIC, seed=3, decisions=3_000)
    wide = estimate_policy_value(data, ("ips",), confidence_level=0.99, bootstrap_samples=400).estimates[
        "ips"
    ]
    narrow = estimate_policy_value(data, ("ips",), confidence_level=0.5, bootstrap_samples=400).estimates[
        "ips"
    ]
    assert wide.upper - wide.lower > 2 * (narrow.upper - narrow.lower)


def favoured_offer_log(
    favoured_propensity: float, candidate_share: float, decisions: int = 1_000
) -> LoggedDecisions:
    """Four offers; the logging policy shows offer 3 first with `favoured_propensity` and the others
    evenly; the candidate puts `candidate_share` on offer 3 and spreads the rest evenly. Offer 3 is
    logged in exactly one decision."""
    logging = np.array([(1 - favoured_propensity) / 3] * 3 + [favoured_propensity])
    candidate = np.array([(1 - candidate_share) / 3] * 3 + [candidate_share])
    action = np.arange(decisions) % 3
    action[0] = 3
    return LoggedDecisions(
        eligible=np.ones((decisions, 4), dtype=bool),
        action=action,
        logging_propensity=logging[action],
        reward=(np.arange(decisions) % 2).astype(float),
        candidate=np.tile(candidate, (decisions, 1)),
        expected_reward=np.full((decisions, 4), 0.5),
        logging_distribution=np.tile(logging, (decisions, 1)),
    )


def test_low_effective_sample_size_refuses_the_weight_based_estimates() -> None:
    # Only one logged decision agrees with the candidate: its weight carries everything.
    data = favoured_offer_log(favoured_propensity=0.002, candidate_share=1.0)

    evaluation = estimate_policy_value(data, ESTIMATORS, bootstrap_samples=50)

    assert evaluation.effective_sample_size == pytest.approx(1.0)
    assert set(evaluation.refused) == WEIGHT_BASED_ESTIMATORS
    assert all(reason.startswith("low-effective-sample-size") for reason in evaluation.refused.values())
    assert list(evaluation.estimates) == ["dm"]  # DM uses no weights
    assert evaluation.estimates["dm"].value == pytest.approx(0.5)
    assert len(evaluation.warnings) == 1
    assert evaluation.warnings[0].startswith("low-effective-sample-size")
    assert evaluation.max_weight == pytest.approx(500.0)


@pytest.mark.parametrize(
    ("candidate_share", "refused"),
    [(2 * MAX_UNSUPPORTED_MASS, True), (0.8 * MAX_UNSUPPORTED_MASS, False)],
)
def test_mass_on_offers_hardly_ever_shown_refuses_the_weight_based_estimates(
    candidate_share: float, refused: bool
) -> None:
    data = favoured_offer_log(
        favoured_propensity=SUPPORT_FLOOR / 2, candidate_share=candidate_share, decisions=3_000
    )

    evaluation = estimate_policy_value(data, ("ips", "snips", "dm", "dr"), bootstrap_samples=50)

    assert evaluation.unsupported_mass == pytest.approx(candidate_share)  # exact from logging_distribution
    if refused:
        assert set(evaluation.refused) == {"ips", "snips", "dr"}
        assert all(reason.startswith("poor-support") for reason in evaluation.refused.values())
        assert list(evaluation.estimates) == ["dm"]
        assert [warning.split(":")[0] for warning in evaluation.warnings] == [
            "poor-support",
            "dm-extrapolates",
        ]
    else:
        assert evaluation.refused == {}
        assert list(evaluation.estimates) == ["ips", "snips", "dm", "dr"]


def test_support_is_estimated_from_the_logged_actions_without_the_distribution() -> None:
    supported = synthetic_log(SYNTHETIC, seed=5, decisions=20_000)
    # The logging policy never shows offer 4 first; the candidate moves 30% more of its mass there.
    never_shown = replace_logging_logit(SYNTHETIC, offer=4, logit=-np.inf)
    candidate = 0.7 * SYNTHETIC.candidate + 0.3 * np.eye(SYNTHETIC.offers)[4]
    data = synthetic_log(never_shown, seed=5, decisions=20_000, candidate=candidate)

    exact = estimate_policy_value(data, ("ips", "dr"), bootstrap_samples=10)
    flagged = estimate_policy_value(without_distribution(data), ("ips", "dr"), bootstrap_samples=10)
    clean = estimate_policy_value(without_distribution(supported), ("ips", "dr"), bootstrap_samples=10)

    assert exact.unsupported_mass > 0.3
    assert flagged.unsupported_mass == pytest.approx(exact.unsupported_mass, abs=0.03)
    assert set(flagged.refused) == {"ips", "dr"}
    assert flagged.warnings[0].startswith("poor-support")
    assert clean.refused == {}
    assert clean.unsupported_mass < MAX_UNSUPPORTED_MASS


def test_missing_propensities_are_left_out_and_warned_about() -> None:
    data = synthetic_log(SYNTHETIC, seed=2, decisions=4_000)
    propensity = data.logging_propensity.copy()
    propensity[::20] = np.nan  # 5%: at the limit, no warning
    propensity[1::40] = 0.0  # 2.5% more: over it
    usable = propensity > 0
    partial = LoggedDecisions(
        eligible=data.eligible,
        action=data.action,
        logging_propensity=propensity,
        reward=data.reward,
        candidate=data.candidate,
        expected_reward=data.expected_reward,
    )
    subset = LoggedDecisions(
        eligible=data.eligible[usable],
        action=data.action[usable],
        logging_propensity=propensity[usable],
        reward=data.reward[usable],
        candidate=data.candidate[usable],
        expected_reward=None if data.expected_reward is None else data.expected_reward[usable],
    )

    evaluation = estimate_policy_value(partial, bootstrap_samples=50)
    reference = estimate_policy_value(subset, bootstrap_samples=50)

    assert (evaluation.decisions, evaluation.usable_decisions) == (4_000, 3_700)
    assert [warning.split(":")[0] for warning in evaluation.warnings] == ["missing-propensities"]
    assert evaluation.refused == {}
    assert evaluation.logged_value == pytest.approx(float(data.reward[usable].mean()))
    for name, estimate in reference.estimates.items():
        assert evaluation.estimates[name] == estimate
    propensity[1::40] = data.logging_propensity[1::40]
    at_limit = LoggedDecisions(data.eligible, data.action, propensity, data.reward, data.candidate)
    assert estimate_policy_value(at_limit, ("ips",), bootstrap_samples=10).warnings == []


def test_no_usable_decision_refuses_everything() -> None:
    data = hand_computed()
    missing = LoggedDecisions(
        data.eligible,
        data.action,
        np.array([np.nan, 0.0, np.nan]),
        data.reward,
        data.candidate,
        data.expected_reward,
    )

    evaluation = estimate_policy_value(missing, ("ips", "dm"))

    assert evaluation.estimates == {}
    assert set(evaluation.refused) == {"ips", "dm"}
    assert evaluation.logged_value is None
    assert evaluation.usable_decisions == 0
    assert [warning.split(":")[0] for warning in evaluation.warnings] == [
        "missing-propensities",
        "no-usable-decisions",
    ]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"action": np.array([0, 2, 2])}, "action"),  # column 2 is padding in decision 1
        ({"candidate": np.array([[0.2, 0.3, 0.4], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])}, "candidate"),
        ({"candidate": np.array([[0.2, 0.3, 0.5], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])}, "candidate"),
        ({"logging_propensity": np.array([0.5, -0.1, 0.2])}, "logging_propensity"),
        ({"reward": np.array([1.0, np.inf, 0.0])}, "reward"),
        ({"expected_reward": np.zeros((3, 2))}, "expected_reward"),
    ],
)
def test_malformed_arrays_name_the_field(change: dict[str, np.ndarray], field: str) -> None:
    data = hand_computed()
    arrays: dict[str, Any] = {
        "eligible": data.eligible,
        "action": data.action,
        "logging_propensity": data.logging_propensity,
        "reward": data.reward,
        "candidate": data.candidate,
        "expected_reward": data.expected_reward,
    }
    with pytest.raises(InvalidArgument) as raised:
        LoggedDecisions(**(arrays | change))
    assert raised.value.field == field


def test_arguments_are_checked() -> None:
    data = hand_computed()
    without_model = LoggedDecisions(
        data.eligible, data.action, data.logging_propensity, data.reward, data.candidate
    )
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: estimate_policy_value(without_model), "expected_reward"),
        (lambda: estimate_policy_value(data, ("ips", "magic")), "estimators"),
        (lambda: estimate_policy_value(data, confidence_level=1.0), "confidence_level"),
        (lambda: estimate_policy_value(data, max_importance_weight=-1.0), "max_importance_weight"),
        (lambda: estimate_policy_value(data, bootstrap_samples=-1), "bootstrap_samples"),
    ]
    for call, field in calls:
        with pytest.raises(InvalidArgument) as raised:
            call()
        assert raised.value.field == field
    assert set(estimate_policy_value(without_model, ("ips", "snips")).estimates) == {"ips", "snips"}


def test_reward_model_predictions_do_not_see_their_own_decision() -> None:
    rng = np.random.default_rng(0)
    segments = [f"s{value}" for value in rng.integers(0, 3, 600)]
    offers = ["a", "b", "c"]
    logged = [offers[value] for value in rng.integers(0, 3, 600)]
    rewards = rng.random(600)
    eligible = [offers] * 600

    before = cross_fitted_expected_rewards(segments, logged, rewards, eligible, folds=4)
    changed = rewards.copy()
    changed[17] = 1_000.0
    after = cross_fitted_expected_rewards(segments, logged, changed, eligible, folds=4)

    assert np.allclose(after[17], before[17], rtol=0, atol=1e-9)  # fitted on the other folds
    assert not np.allclose(after, before)  # ... which do see it, for the other decisions


def test_reward_model_shrinks_to_the_offer_and_global_means() -> None:
    # Segment x has only offer "a" logged, "b" is logged in segment y only, "c" never.
    segments = ["x"] * 40 + ["y"] * 40
    logged = ["a"] * 40 + ["b"] * 40
    rewards = np.array([1.0, 0.0] * 20 + [1.0, 1.0, 1.0, 0.0] * 10)
    eligible = [["a", "b", "c"]] * 80

    expected = cross_fitted_expected_rewards(segments, logged, rewards, eligible, folds=2, prior_strength=5.0)

    # Never-logged c predicts the global mean of the other fold: two values, one per fold of 40,
    # whose average is the mean of all rewards.
    global_means = np.unique(expected[:, 2].round(12))
    assert global_means.size == 2
    assert global_means.mean() == pytest.approx(rewards.mean())
    # The unseen cell (x, b) predicts offer b's mean (0.75 in the log), shrunk toward the global one.
    assert np.all((expected[:40, 1] > 0.6) & (expected[:40, 1] < 0.85))
    assert np.all(np.abs(expected[:40, 1] - 0.75) < np.abs(expected[:40, 2] - 0.75))
    assert np.all((expected[:40, 0] > 0.35) & (expected[:40, 0] < 0.65))


def test_reward_model_recovers_cell_means_and_pads_with_zero() -> None:
    rng = np.random.default_rng(1)
    means = rng.uniform(0.05, 0.6, (5, 4))
    n = 40_000
    segment = rng.integers(0, 5, n)
    offer = rng.integers(0, 4, n)
    offer[segment == 4] %= 3  # segment 4 has three eligible offers
    rewards = (rng.random(n) < means[segment, offer]).astype(float)
    names = ["o0", "o1", "o2", "o3"]
    eligible = [names[:3] if value == 4 else names for value in segment]

    expected = cross_fitted_expected_rewards(
        [int(value) for value in segment], [names[value] for value in offer], rewards, eligible
    )

    assert expected.shape == (n, 4)
    assert np.all(expected[segment == 4, 3] == 0.0)
    truth = np.where(segment[:, None] == 4, np.append(means[4, :3], 0.0), means[segment])
    assert np.abs(expected - truth).max() < 0.06


def test_reward_model_rejects_a_logged_offer_that_was_not_eligible() -> None:
    with pytest.raises(InvalidArgument) as raised:
        cross_fitted_expected_rewards(["x", "x"], ["a", "z"], [1.0, 0.0], [["a", "b"], ["a", "b"]])
    assert raised.value.field == "logged_offers"


# Synthetic logs: a known logging policy and a known candidate, with the candidate's exact value.


@dataclass(frozen=True)
class SyntheticConfig:
    segment_share: np.ndarray  # P(segment)
    reward_mean: np.ndarray  # (segments, offers) Bernoulli means
    logging_logit: np.ndarray  # (segments, offers); each decision adds noise
    eligible: np.ndarray  # (segments, offers) bool
    candidate: np.ndarray  # (segments, offers) the candidate's distribution
    logit_noise: float = 0.3

    @property
    def offers(self) -> int:
        return int(self.reward_mean.shape[1])

    @property
    def true_value(self) -> float:
        return float(self.segment_share @ (self.candidate * self.reward_mean).sum(axis=1))

    @classmethod
    def default(cls) -> SyntheticConfig:
        design = np.random.default_rng(12345)
        reward_mean = design.uniform(0.05, 0.35, (4, 10))
        eligible = np.ones((4, 10), dtype=bool)
        eligible[3, 8:] = False  # the last segment has 8 eligible offers: padding
        return cls(
            segment_share=np.array([0.4, 0.3, 0.2, 0.1]),
            reward_mean=reward_mean,
            logging_logit=design.normal(0.0, 1.0, (4, 10)),
            eligible=eligible,
            candidate=softmax(10.0 * reward_mean, eligible),  # prefers the better offers
        )


def softmax(logits: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    shifted = np.where(eligible, logits, -np.inf)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return np.asarray(exponentials / exponentials.sum(axis=-1, keepdims=True))


SYNTHETIC = SyntheticConfig.default()


def replace_logging_logit(config: SyntheticConfig, offer: int, logit: float) -> SyntheticConfig:
    logging_logit = config.logging_logit.copy()
    logging_logit[:, offer] = logit
    return SyntheticConfig(
        config.segment_share,
        config.reward_mean,
        logging_logit,
        config.eligible,
        config.candidate,
        config.logit_noise,
    )


def synthetic_log(
    config: SyntheticConfig, seed: int, decisions: int, candidate: np.ndarray | None = None
) -> LoggedDecisions:
    """Decisions logged by a per-decision softmax policy, with cross-fitted reward predictions."""
    rng = np.random.default_rng(seed)
    segment = rng.choice(config.segment_share.size, size=decisions, p=config.segment_share)
    eligible = config.eligible[segment]
    noise = rng.normal(0.0, config.logit_noise, (decisions, config.offers))
    logging = softmax(config.logging_logit[segment] + noise, eligible)
    action = (logging.cumsum(axis=1) > rng.random((decisions, 1))).argmax(axis=1)
    reward = (rng.random(decisions) < config.reward_mean[segment, action]).astype(float)
    names = [f"offer-{column}" for column in range(config.offers)]
    eligible_names = [[names[column] for column in np.flatnonzero(row)] for row in config.eligible]
    expected = cross_fitted_expected_rewards(
        [f"segment-{value}" for value in segment],
        [names[column] for column in action],
        reward,
        [eligible_names[value] for value in segment],  # eligible columns come first: names line up
        seed=seed,
    )
    return LoggedDecisions(
        eligible=eligible,
        action=action,
        logging_propensity=logging[np.arange(decisions), action],
        reward=reward,
        candidate=(config.candidate if candidate is None else candidate)[segment],
        expected_reward=expected,
        logging_distribution=logging,
    )


def without_distribution(data: LoggedDecisions) -> LoggedDecisions:
    return LoggedDecisions(
        data.eligible, data.action, data.logging_propensity, data.reward, data.candidate, data.expected_reward
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_estimates_recover_the_true_value_of_a_known_candidate() -> None:
    true_value = SYNTHETIC.true_value
    names = ("ips", "snips", "dr")
    errors: dict[str, list[float]] = {name: [] for name in names}
    covered = dict.fromkeys(names, 0)
    for seed in range(20):
        evaluation = estimate_policy_value(
            synthetic_log(SYNTHETIC, seed=seed, decisions=40_000), names, bootstrap_samples=200, seed=seed
        )
        assert evaluation.warnings == [], seed
        for name in names:
            estimate = evaluation.estimates[name]
            errors[name].append(abs(estimate.value - true_value) / true_value)
            covered[name] += estimate.lower <= true_value <= estimate.upper
            assert estimate.lift > 0, (seed, name)  # the candidate beats the logging policy

    mean_error = {name: float(np.mean(values)) for name, values in errors.items()}
    assert mean_error["ips"] <= 0.05, mean_error
    assert mean_error["snips"] <= 0.025, mean_error
    assert mean_error["dr"] <= 0.025, mean_error
    assert all(count >= 15 for count in covered.values()), covered  # nominal 95%: 19 of 20
