"""Scorers: each scores every eligible offer of one request and says how the policy would order
them when it exploits (ranking.py mixes in exploration, applies the top-k and the caps, and derives
the exact propensities from what a scorer returns).

A deterministic scorer returns one value per offer: the policy orders by it, exact ties broken
uniformly at random. A randomised one (Thompson sampling, linear Thompson sampling) returns a set
of equally likely outcomes, posterior draws, and the one draw this request is ranked by, chosen
uniformly among them: the probability of any ordering is then the share of outcomes that give it,
exactly, with no estimate in between.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
from libs.policy.models import LoadedModel
from libs.policy.statistics import Statistics, StatisticsKind, arm_columns

POSTERIOR_DRAWS = 256  # equally likely outcomes of a randomised scorer: propensities are multiples of 1/256
POOL_REFRESH_DRAWS = 32  # fresh draws per call into a segment's pool of POSTERIOR_DRAWS
POOL_TOLERANCE = 0.05  # a pool is drawn afresh when an arm's alpha or beta moved by more than this share
POOL_BYTES = 64 * 1024 * 1024  # draws kept per Thompson scorer (segment x eligible offers x weights)


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


@dataclass(frozen=True)
class Scores:
    """Per offer, in the order given: the value the request is ranked by (descending), the reward
    estimate and the evidence count. `outcomes` (randomised scorers only) holds equally likely
    rows of values, one of which is `score`; a deterministic scorer leaves it None."""

    score: np.ndarray
    arm_reward: np.ndarray
    arm_count: np.ndarray
    outcomes: np.ndarray | None = None  # never NaN (a deterministic score may be: it ranks last)
    # The bound model's predicted take-up per offer, when the scorer consulted it.
    model_score: np.ndarray | None = None
    # A Beta posterior's parameters per offer (Thompson sampling), reported with each result.
    alpha: np.ndarray | None = None
    beta: np.ndarray | None = None


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
    ) -> Scores:
        """`segment` names the statistics' segment (a randomised policy may reuse draws per segment)."""
        return self._score(
            ScoringRequest(offers, weights, statistics, numeric_context, categorical_context, rng, segment)
        )

    def _score(self, request: ScoringRequest) -> Scores:
        raise NotImplementedError


class ThompsonScorer(Scorer):
    """Beta-Bernoulli Thompson sampling. With a bound model and `model_prior_weight` w > 0, each arm's
    prior also gets w pseudo-observations at the model's predicted take-up p for this customer and
    offer (alpha += w p, beta += w (1 - p)): a cold arm starts where the model expects it, and the
    segment's evidence takes over as it accumulates.

    Drawing POSTERIOR_DRAWS samples per request would cost most of an Invoke, so each segment (with
    its eligible offers and weights) keeps a pool of them: every call replaces POOL_REFRESH_DRAWS of
    the oldest with fresh draws from the current posterior and ranks by one row of the pool chosen
    uniformly at random. That row is a posterior draw at most POSTERIOR_DRAWS / POOL_REFRESH_DRAWS
    calls old; the pool is drawn afresh when any arm's alpha or beta has moved by more than
    POOL_TOLERANCE since it was. The logged propensities count rows of the very pool the decision
    came from, so they are exact."""

    def __init__(self, algorithm: ThompsonAlgorithm, model: LoadedModel | None = None) -> None:
        self._algorithm = algorithm
        self._model = model if algorithm.model_prior_weight > 0 else None
        self.reads_raw_features = self._model is not None
        self._pools: dict[tuple[str, tuple[str, ...], bytes], _DrawPool] = {}  # (segment, offers, weights)
        self._pool_bytes = 0

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
            # A prediction that is not a number adds no pseudo-counts (the draws stay numbers).
            known = ~np.isnan(take_up)
            weight = np.where(known, algorithm.model_prior_weight, 0.0)
            take_up_or_0 = np.where(known, take_up, 0.0)
            alpha = alpha + weight * take_up_or_0
            beta = beta + weight * (1.0 - take_up_or_0)
        return alpha, beta, impressions, take_up

    def _score(self, request: ScoringRequest) -> Scores:
        alpha, beta, impressions, take_up = self._posterior(
            request.offers, request.statistics, {**request.categorical_context, **request.numeric_context}
        )
        draws = self._pool(request, alpha, beta)  # the pool itself: read it before the next call
        row = int(request.rng.integers(POSTERIOR_DRAWS))
        return Scores(draws[row].copy(), alpha / (alpha + beta), impressions, draws, take_up, alpha, beta)

    def _pool(self, request: ScoringRequest, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """The segment's POSTERIOR_DRAWS weighted posterior draws, refreshed for this call."""
        rng, weights, width = request.rng, request.weights, len(request.offers)
        key = (request.segment, tuple(request.offers), weights.tobytes())
        pool = self._pools.get(key)
        if pool is not None and (
            (np.abs(alpha - pool.alpha) > POOL_TOLERANCE * pool.alpha).any()
            or (np.abs(beta - pool.beta) > POOL_TOLERANCE * pool.beta).any()
        ):
            self._forget(key)
            pool = None
        if pool is None:
            draws: np.ndarray = rng.beta(alpha, beta, size=(POSTERIOR_DRAWS, width)) * weights
            while self._pools and self._pool_bytes + draws.nbytes > POOL_BYTES:
                self._forget(next(iter(self._pools)))  # the oldest
            self._pools[key] = _DrawPool(alpha, beta, draws)
            self._pool_bytes += draws.nbytes
            return draws
        start = pool.next_row
        pool.draws[start : start + POOL_REFRESH_DRAWS] = (
            rng.beta(alpha, beta, size=(POOL_REFRESH_DRAWS, width)) * weights
        )
        pool.next_row = (start + POOL_REFRESH_DRAWS) % POSTERIOR_DRAWS
        return pool.draws

    def _forget(self, key: tuple[str, tuple[str, ...], bytes]) -> None:
        self._pool_bytes -= self._pools.pop(key).draws.nbytes


@dataclass
class _DrawPool:
    """POSTERIOR_DRAWS weighted posterior draws of one segment, refreshed a slice a call."""

    alpha: np.ndarray
    beta: np.ndarray
    draws: np.ndarray  # (POSTERIOR_DRAWS, offers)
    next_row: int = 0


class EpsilonGreedyScorer(Scorer):
    def __init__(self, algorithm: EpsilonGreedyAlgorithm) -> None:
        self._algorithm = algorithm

    def _score(self, request: ScoringRequest) -> Scores:
        impressions, successes, _, _ = arm_columns(request.statistics.arms, request.offers)
        prior = self._algorithm.prior_take_up
        take_up = np.where(impressions > 0, (successes + prior) / (impressions + 1.0), prior)
        return Scores(take_up * request.weights, take_up, impressions)


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
        return Scores(take_up * request.weights, take_up, evidence)


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
            return Scores(upper, mean, counts)
        # Linear Thompson sampling: the context differs per customer, so no pool; the request is
        # ranked by one of POSTERIOR_DRAWS fresh draws, chosen uniformly.
        scale = self._algorithm.scale
        draws = (
            mean
            + scale * np.sqrt(variance) * request.rng.standard_normal((POSTERIOR_DRAWS, len(request.offers)))
        ) * request.weights
        return Scores(draws[int(request.rng.integers(POSTERIOR_DRAWS))], mean, counts, draws)


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
        return Scores(take_up * request.weights, take_up, impressions, model_score=take_up)


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
