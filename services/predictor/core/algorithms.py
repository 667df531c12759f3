"""Scoring algorithms. Each scores every eligible offer for one request and reports, honestly, the
probability that it would put each offer first (its propensity), before exploration is mixed in.

Randomised policies (Thompson sampling) estimate that probability by drawing many posterior samples;
deterministic ones report 1 for the top offer (split evenly among exact ties) and 0 for the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from libs.common.deployment_spec import (
    Algorithm,
    EpsilonGreedyAlgorithm,
    LinearThompsonAlgorithm,
    LinUcbAlgorithm,
    ModelAlgorithm,
    NaiveBayesAlgorithm,
    ThompsonAlgorithm,
)
from libs.common.errors import FailedPrecondition
from services.predictor.core.models import LoadedModel

PROPENSITY_SAMPLES = 256  # the estimate's standard error is at most 1/(2*16) = 0.031
StatisticsKind = Literal["arms", "naive_bayes", "linear"]


@dataclass(frozen=True)
class ArmCounts:
    """One offer's evidence in a segment, decayed to now."""

    impressions: float = 0.0
    successes: float = 0.0
    prior_alpha: float = 0.0
    prior_beta: float = 0.0


@dataclass(frozen=True)
class LinearState:
    a: np.ndarray  # (d, d)
    b: np.ndarray  # (d,)


@dataclass
class Statistics:
    arms: Mapping[str, ArmCounts] = field(default_factory=dict)
    naive_bayes: Mapping[str, float] = field(default_factory=dict)  # "<offer>|<var>=<value>|n|s" counts
    linear: Mapping[str, LinearState] = field(default_factory=dict)


@dataclass(frozen=True)
class Scores:
    """Per offer, in the order given: the ranking score, the reward estimate, the evidence count and
    the probability of being ranked first (before exploration)."""

    score: np.ndarray
    arm_reward: np.ndarray
    arm_count: np.ndarray
    top_probability: np.ndarray
    # The bound model's predicted take-up per offer, when the scorer consulted it.
    model_score: np.ndarray | None = None


def _top_probability_deterministic(values: np.ndarray) -> np.ndarray:
    ties = np.isclose(values, values.max(), rtol=0, atol=1e-12).astype(float)
    result: np.ndarray = ties / ties.sum()
    return result


def _top_probability_sampled(samples: np.ndarray) -> np.ndarray:
    """samples: (draws, offers) -> share of draws in which each offer is the largest."""
    winners = samples.argmax(axis=1)
    result: np.ndarray = np.bincount(winners, minlength=samples.shape[1]) / samples.shape[0]
    return result


def _tie_break(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order-preserving tiny noise so exact ties (cold start) are ranked at random."""
    return values + rng.uniform(0, 1e-9, size=values.shape)


class Scorer:
    statistics: StatisticsKind = "arms"
    # Whether score() needs the customer's raw features and params beside the context (a model does).
    reads_raw_features: bool = False

    def score(
        self,
        offers: Sequence[str],
        weights: np.ndarray,
        statistics: Statistics,
        numeric_context: Mapping[str, float],
        categorical_context: Mapping[str, str],
        rng: np.random.Generator,
    ) -> Scores:
        raise NotImplementedError


class ThompsonScorer(Scorer):
    """Beta-Bernoulli Thompson sampling. With a bound model and `model_prior_weight` w > 0, each arm's
    prior also gets w pseudo-observations at the model's predicted take-up p for this customer and
    offer (alpha += w p, beta += w (1 - p)): a cold arm starts where the model expects it, and the
    segment's evidence takes over as it accumulates."""

    def __init__(self, algorithm: ThompsonAlgorithm, model: LoadedModel | None = None) -> None:
        self._algorithm = algorithm
        self._model = model if algorithm.model_prior_weight > 0 else None
        self.reads_raw_features = self._model is not None

    def _posterior(
        self,
        offers: Sequence[str],
        statistics: Statistics,
        context: Mapping[str, str | float],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        algorithm = self._algorithm
        counts = [statistics.arms.get(offer, ArmCounts()) for offer in offers]
        successes = np.array([c.successes for c in counts])
        impressions = np.array([c.impressions for c in counts])
        failures = np.maximum(impressions - successes, 0.0)
        alpha = (
            algorithm.alpha0
            + np.array([c.prior_alpha for c in counts])
            + successes * algorithm.success_increment
        )
        beta = (
            algorithm.beta0 + np.array([c.prior_beta for c in counts]) + failures * algorithm.fail_increment
        )
        take_up = None
        if self._model is not None:
            take_up = np.clip(self._model.predict_offers(context, offers), 0.0, 1.0)
            alpha = alpha + algorithm.model_prior_weight * take_up
            beta = beta + algorithm.model_prior_weight * (1.0 - take_up)
        return alpha, beta, impressions, take_up

    def score(self, offers, weights, statistics, numeric_context, categorical_context, rng):  # type: ignore[no-untyped-def]
        alpha, beta, impressions, take_up = self._posterior(
            offers, statistics, {**categorical_context, **numeric_context}
        )
        decision = rng.beta(alpha, beta) * weights
        draws = rng.beta(alpha, beta, size=(PROPENSITY_SAMPLES, len(offers))) * weights
        return Scores(decision, alpha / (alpha + beta), impressions, _top_probability_sampled(draws), take_up)


class EpsilonGreedyScorer(Scorer):
    def __init__(self, algorithm: EpsilonGreedyAlgorithm) -> None:
        self._algorithm = algorithm

    def score(self, offers, weights, statistics, numeric_context, categorical_context, rng):  # type: ignore[no-untyped-def]
        counts = [statistics.arms.get(offer, ArmCounts()) for offer in offers]
        impressions = np.array([c.impressions for c in counts])
        successes = np.array([c.successes for c in counts])
        prior = self._algorithm.prior_take_up
        take_up = np.where(impressions > 0, (successes + prior) / (impressions + 1.0), prior)
        ranked = take_up * weights
        return Scores(_tie_break(ranked, rng), take_up, impressions, _top_probability_deterministic(ranked))


class NaiveBayesScorer(Scorer):
    statistics: StatisticsKind = "naive_bayes"

    def __init__(self, algorithm: NaiveBayesAlgorithm) -> None:
        self._smoothing = algorithm.smoothing

    def score(self, offers, weights, statistics, numeric_context, categorical_context, rng):  # type: ignore[no-untyped-def]
        counts = statistics.naive_bayes
        a = self._smoothing
        take_up = np.zeros(len(offers))
        evidence = np.zeros(len(offers))
        for index, offer in enumerate(offers):
            n = counts.get(f"{offer}|n", 0.0)
            s = min(counts.get(f"{offer}|s", 0.0), n)
            log_odds = np.log((s + a) / (n - s + a))
            for name, value in categorical_context.items():
                n_x = counts.get(f"{offer}|{name}={value}|n", 0.0)
                s_x = min(counts.get(f"{offer}|{name}={value}|s", 0.0), n_x)
                log_odds += np.log((s_x + a) / (s + 2 * a)) - np.log((n_x - s_x + a) / (n - s + 2 * a))
            take_up[index] = 1.0 / (1.0 + np.exp(-log_odds))
            evidence[index] = n
        ranked = take_up * weights
        return Scores(_tie_break(ranked, rng), take_up, evidence, _top_probability_deterministic(ranked))


class LinearScorer(Scorer):
    """Disjoint linear models per offer over numeric context (LinUCB or linear Thompson sampling)."""

    statistics: StatisticsKind = "linear"

    def __init__(self, algorithm: LinUcbAlgorithm | LinearThompsonAlgorithm) -> None:
        self._algorithm = algorithm
        self.features = list(algorithm.features)

    @property
    def dimension(self) -> int:
        return len(self.features) + 1  # an intercept

    def vector(self, numeric_context: Mapping[str, float]) -> np.ndarray:
        return np.array([1.0, *(numeric_context.get(name, 0.0) for name in self.features)])

    def score(self, offers, weights, statistics, numeric_context, categorical_context, rng):  # type: ignore[no-untyped-def]
        d = self.dimension
        x = self.vector(numeric_context)
        ridge = self._algorithm.ridge
        # Models of another dimension were learned over features the deployment no longer uses.
        models = {o: m for o, m in statistics.linear.items() if m.b.shape == (d,) and m.a.shape == (d, d)}
        a = np.stack([models[o].a if o in models else np.zeros((d, d)) for o in offers])
        b = np.stack([models[o].b if o in models else np.zeros(d) for o in offers])
        a = a + ridge * np.eye(d)
        a_inverse = np.linalg.inv(a)
        theta = np.einsum("kij,kj->ki", a_inverse, b)
        mean = theta @ x
        variance = np.maximum(np.einsum("i,kij,j->k", x, a_inverse, x), 0.0)
        counts = np.array([models[o].a[0, 0] if o in models else 0.0 for o in offers])
        if isinstance(self._algorithm, LinUcbAlgorithm):
            upper = (mean + self._algorithm.alpha * np.sqrt(variance)) * weights
            return Scores(_tie_break(upper, rng), mean, counts, _top_probability_deterministic(upper))
        scale = self._algorithm.scale
        decision = (mean + scale * np.sqrt(variance) * rng.standard_normal(len(offers))) * weights
        draws = (
            mean + scale * np.sqrt(variance) * rng.standard_normal((PROPENSITY_SAMPLES, len(offers)))
        ) * weights
        return Scores(decision, mean, counts, _top_probability_sampled(draws))


class ModelScorer(Scorer):
    """Score = the bound model's predicted take-up for the customer's features x each offer.

    Deterministic: the top offer has propensity 1 before exploration, so with exploration_epsilon
    it is (1 - eps) + eps / K. Arm statistics are still read and kept, for reporting.
    """

    reads_raw_features = True

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def score(self, offers, weights, statistics, numeric_context, categorical_context, rng):  # type: ignore[no-untyped-def]
        take_up = self.model.predict_offers({**categorical_context, **numeric_context}, offers)
        impressions = np.array([statistics.arms.get(offer, ArmCounts()).impressions for offer in offers])
        ranked = take_up * weights
        return Scores(
            _tie_break(ranked, rng), take_up, impressions, _top_probability_deterministic(ranked), take_up
        )


def build_scorer(algorithm: Algorithm, model: LoadedModel | None = None) -> Scorer:
    if isinstance(algorithm, ThompsonAlgorithm):
        if algorithm.model_prior_weight > 0 and model is None:
            raise FailedPrecondition("model_prior_weight needs a loaded model binding", field="model")
        return ThompsonScorer(algorithm, model)
    if isinstance(algorithm, EpsilonGreedyAlgorithm):
        return EpsilonGreedyScorer(algorithm)
    if isinstance(algorithm, NaiveBayesAlgorithm):
        return NaiveBayesScorer(algorithm)
    if isinstance(algorithm, LinUcbAlgorithm | LinearThompsonAlgorithm):
        return LinearScorer(algorithm)
    if isinstance(algorithm, ModelAlgorithm):
        if model is None:
            raise FailedPrecondition("the 'model' algorithm needs a loaded model binding", field="model")
        return ModelScorer(model)
    raise FailedPrecondition(f"unknown algorithm {algorithm!r}")
