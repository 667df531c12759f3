"""Scoring algorithms. Each scores every eligible offer for one request and reports, honestly, the
probability that it would put each offer first (its propensity), before exploration is mixed in.

Randomised policies (Thompson sampling) estimate that probability by drawing many posterior samples;
deterministic ones report 1 for the top offer (split evenly among exact ties) and 0 for the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
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
PROPENSITY_REFRESH_SAMPLES = 32  # fresh draws per call into a segment's pool of PROPENSITY_SAMPLES
PROPENSITY_POOL_SECONDS = 1.0  # a pool is drawn afresh this often at least
PROPENSITY_POOL_TOLERANCE = 0.05  # ... and when an arm's alpha or beta moved by more than this share
PROPENSITY_POOLS = 4096  # pools kept per scorer (segment x eligible offers x weights)
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


@dataclass(frozen=True, slots=True)
class ScoringRequest:
    """What a scorer scores: the eligible offers with their weights, the segment's statistics and
    the customer's context (see Scorer.score)."""

    offers: Sequence[str]
    weights: np.ndarray
    statistics: Statistics
    numeric_context: Mapping[str, float]
    categorical_context: Mapping[str, str]
    rng: np.random.Generator
    segment: str = ""
    propensities: bool = True


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


def arm_columns(
    arms: Mapping[str, ArmCounts], offers: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(impressions, successes, prior alpha, prior beta) of these offers, zeros where unknown; at
    once from the options store's column table, offer by offer from any other mapping."""
    columns = getattr(arms, "columns", None)
    if columns is not None:
        result: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] = columns(offers)
        return result
    counts = [arms.get(offer, ArmCounts()) for offer in offers]
    return (
        np.array([c.impressions for c in counts], dtype=np.float64),
        np.array([c.successes for c in counts], dtype=np.float64),
        np.array([c.prior_alpha for c in counts], dtype=np.float64),
        np.array([c.prior_beta for c in counts], dtype=np.float64),
    )


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
        *,
        segment: str = "",
        propensities: bool = True,
    ) -> Scores:
        """`segment` names the statistics' segment (a randomised policy may reuse work per segment);
        with `propensities` False (a simulation) the top probability need not be estimated."""
        return self._score(
            ScoringRequest(
                offers, weights, statistics, numeric_context, categorical_context, rng, segment, propensities
            )
        )

    def _score(self, request: ScoringRequest) -> Scores:
        raise NotImplementedError


class ThompsonScorer(Scorer):
    """Beta-Bernoulli Thompson sampling. With a bound model and `model_prior_weight` w > 0, each arm's
    prior also gets w pseudo-observations at the model's predicted take-up p for this customer and
    offer (alpha += w p, beta += w (1 - p)): a cold arm starts where the model expects it, and the
    segment's evidence takes over as it accumulates."""

    def __init__(
        self,
        algorithm: ThompsonAlgorithm,
        model: LoadedModel | None = None,
        clock: Callable[[], float] = time.monotonic,
        propensity_rng: np.random.Generator | None = None,
    ) -> None:
        self._algorithm = algorithm
        # The draws that estimate propensities come from a generator of their own, so the decisions'
        # generator yields the same decisions whether or not (and however often) they are estimated.
        self._propensity_rng = propensity_rng or np.random.default_rng()
        self._model = model if algorithm.model_prior_weight > 0 else None
        self.reads_raw_features = self._model is not None
        self._clock = clock
        self._pools: dict[tuple[str, tuple[str, ...], bytes], _DrawPool] = {}  # (segment, offers, weights)

    def _posterior(
        self,
        offers: Sequence[str],
        statistics: Statistics,
        context: Mapping[str, str | float],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        algorithm = self._algorithm
        impressions, successes, prior_alpha, prior_beta = arm_columns(statistics.arms, offers)
        failures = np.maximum(impressions - successes, 0.0)
        alpha = algorithm.alpha0 + prior_alpha + successes * algorithm.success_increment
        beta = algorithm.beta0 + prior_beta + failures * algorithm.fail_increment
        take_up = None
        if self._model is not None:
            take_up = np.clip(self._model.predict_offers(context, offers), 0.0, 1.0)
            alpha = alpha + algorithm.model_prior_weight * take_up
            beta = beta + algorithm.model_prior_weight * (1.0 - take_up)
        return alpha, beta, impressions, take_up

    def _score(self, request: ScoringRequest) -> Scores:
        alpha, beta, impressions, take_up = self._posterior(
            request.offers, request.statistics, {**request.categorical_context, **request.numeric_context}
        )
        decision = request.rng.beta(alpha, beta) * request.weights
        if request.propensities:
            top = self._top_probability(request.offers, request.weights, alpha, beta, request.segment)
        else:
            top = np.full(len(request.offers), np.nan)
        return Scores(decision, alpha / (alpha + beta), impressions, top, take_up)

    def _top_probability(
        self,
        offers: Sequence[str],
        weights: np.ndarray,
        alpha: np.ndarray,
        beta: np.ndarray,
        segment: str,
    ) -> np.ndarray:
        """P(each offer ranks first), as the share of PROPENSITY_SAMPLES posterior draws in which it
        is the largest. The draws cost most of an Invoke, so each segment (with its offers and
        weights) keeps a pool of them and every call replaces PROPENSITY_REFRESH_SAMPLES of the
        oldest with fresh ones: every draw counts in PROPENSITY_SAMPLES / PROPENSITY_REFRESH_SAMPLES
        estimates, so the estimates stay unbiased and their mean converges as with independent
        pools. The pool is drawn afresh when any arm's alpha or beta has moved by more than
        PROPENSITY_POOL_TOLERANCE since it was, or after PROPENSITY_POOL_SECONDS."""
        key = (segment, tuple(offers), weights.tobytes())
        now = self._clock()
        pool = self._pools.get(key)
        if pool is not None and (
            now - pool.drawn_at >= PROPENSITY_POOL_SECONDS
            or np.any(np.abs(alpha - pool.alpha) > PROPENSITY_POOL_TOLERANCE * pool.alpha)
            or np.any(np.abs(beta - pool.beta) > PROPENSITY_POOL_TOLERANCE * pool.beta)
        ):
            del self._pools[key]
            pool = None
        if pool is None:
            if len(self._pools) >= PROPENSITY_POOLS:
                del self._pools[next(iter(self._pools))]  # the oldest
            draws = self._propensity_rng.beta(alpha, beta, size=(PROPENSITY_SAMPLES, len(offers))) * weights
            self._pools[key] = _DrawPool(now, alpha, beta, draws.argmax(axis=1))
            return _top_probability_sampled(draws)
        fresh = (
            self._propensity_rng.beta(alpha, beta, size=(PROPENSITY_REFRESH_SAMPLES, len(offers))) * weights
        )
        start = pool.next_row
        pool.winners[start : start + PROPENSITY_REFRESH_SAMPLES] = fresh.argmax(axis=1)
        pool.next_row = (start + PROPENSITY_REFRESH_SAMPLES) % PROPENSITY_SAMPLES
        result: np.ndarray = np.bincount(pool.winners, minlength=len(offers)) / PROPENSITY_SAMPLES
        return result


@dataclass
class _DrawPool:
    """The winners (argmax offer) of PROPENSITY_SAMPLES posterior draws, refreshed a slice a call."""

    drawn_at: float
    alpha: np.ndarray
    beta: np.ndarray
    winners: np.ndarray
    next_row: int = 0


class EpsilonGreedyScorer(Scorer):
    def __init__(self, algorithm: EpsilonGreedyAlgorithm) -> None:
        self._algorithm = algorithm

    def _score(self, request: ScoringRequest) -> Scores:
        impressions, successes, _, _ = arm_columns(request.statistics.arms, request.offers)
        prior = self._algorithm.prior_take_up
        take_up = np.where(impressions > 0, (successes + prior) / (impressions + 1.0), prior)
        ranked = take_up * request.weights
        return Scores(
            _tie_break(ranked, request.rng), take_up, impressions, _top_probability_deterministic(ranked)
        )


class NaiveBayesScorer(Scorer):
    statistics: StatisticsKind = "naive_bayes"

    def __init__(self, algorithm: NaiveBayesAlgorithm) -> None:
        self._smoothing = algorithm.smoothing

    def _score(self, request: ScoringRequest) -> Scores:
        counts = request.statistics.naive_bayes
        a = self._smoothing
        take_up = np.zeros(len(request.offers))
        evidence = np.zeros(len(request.offers))
        for index, offer in enumerate(request.offers):
            n = counts.get(f"{offer}|n", 0.0)
            s = min(counts.get(f"{offer}|s", 0.0), n)
            log_odds = np.log((s + a) / (n - s + a))
            for name, value in request.categorical_context.items():
                n_x = counts.get(f"{offer}|{name}={value}|n", 0.0)
                s_x = min(counts.get(f"{offer}|{name}={value}|s", 0.0), n_x)
                log_odds += np.log((s_x + a) / (s + 2 * a)) - np.log((n_x - s_x + a) / (n - s + 2 * a))
            take_up[index] = 1.0 / (1.0 + np.exp(-log_odds))
            evidence[index] = n
        ranked = take_up * request.weights
        return Scores(
            _tie_break(ranked, request.rng), take_up, evidence, _top_probability_deterministic(ranked)
        )


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

    def _score(self, request: ScoringRequest) -> Scores:
        d = self.dimension
        x = self.vector(request.numeric_context)
        ridge = self._algorithm.ridge
        # Models of another dimension were learned over features the deployment no longer uses.
        models = {
            o: m for o, m in request.statistics.linear.items() if m.b.shape == (d,) and m.a.shape == (d, d)
        }
        a = np.stack([models[o].a if o in models else np.zeros((d, d)) for o in request.offers])
        b = np.stack([models[o].b if o in models else np.zeros(d) for o in request.offers])
        a = a + ridge * np.eye(d)
        a_inverse = np.linalg.inv(a)
        theta = np.einsum("kij,kj->ki", a_inverse, b)
        mean = theta @ x
        variance = np.maximum(np.einsum("i,kij,j->k", x, a_inverse, x), 0.0)
        counts = np.array([models[o].a[0, 0] if o in models else 0.0 for o in request.offers])
        if isinstance(self._algorithm, LinUcbAlgorithm):
            upper = (mean + self._algorithm.alpha * np.sqrt(variance)) * request.weights
            return Scores(_tie_break(upper, request.rng), mean, counts, _top_probability_deterministic(upper))
        scale = self._algorithm.scale
        decision = (
            mean + scale * np.sqrt(variance) * request.rng.standard_normal(len(request.offers))
        ) * request.weights
        draws = (
            mean
            + scale
            * np.sqrt(variance)
            * request.rng.standard_normal((PROPENSITY_SAMPLES, len(request.offers)))
        ) * request.weights
        return Scores(decision, mean, counts, _top_probability_sampled(draws))


class ModelScorer(Scorer):
    """Score = the bound model's predicted take-up for the customer's features x each offer.

    Deterministic: the top offer has propensity 1 before exploration, so with exploration_epsilon
    it is (1 - eps) + eps / K. Arm statistics are still read and kept, for reporting.
    """

    reads_raw_features = True

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def _score(self, request: ScoringRequest) -> Scores:
        take_up = self.model.predict_offers(
            {**request.categorical_context, **request.numeric_context}, request.offers
        )
        impressions = arm_columns(request.statistics.arms, request.offers)[0]
        ranked = take_up * request.weights
        return Scores(
            _tie_break(ranked, request.rng),
            take_up,
            impressions,
            _top_probability_deterministic(ranked),
            take_up,
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
