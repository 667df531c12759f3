"""Seeded environments with known take-up rates, the simulated deployment that serves them, and
the rounds that drive it.

One round is one customer: Invoke asks for one offer, the environment draws the click from the
offer's take-up in the customer's segment, Respond reports it. Every round advances a simulated
clock by `step_seconds` (1 s by default), so a half-life of h seconds forgets half of the evidence
every h rounds.
"""

from __future__ import annotations

import uuid as uuid_module
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from libs.common.deployment_spec import DeploymentSpec, deployment_spec_from_mapping
from libs.common.errors import InvalidArgument

EnvironmentName = Literal["stationary", "reversed", "segments", "gradual", "single"]
AlgorithmName = Literal["thompson", "epsilon_greedy", "uniform"]
ENVIRONMENTS: tuple[EnvironmentName, ...] = ("stationary", "reversed", "segments", "gradual", "single")
GRADUAL_DRIFT_ROUNDS = 20_000  # `gradual`: rounds over which the take-up moves from before to after
ALGORITHMS: tuple[AlgorithmName, ...] = ("thompson", "epsilon_greedy", "uniform")
SIMULATION_START = 1_700_000_000.0  # simulated epoch seconds of round 0 (whole, so time arithmetic is exact)
SEGMENT_COUNT = 4
SEGMENT_VARIABLE = "segment"


# Environments -------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Environment:
    """Known take-up per segment x offer, one matrix before the change and one after, plus the
    seeded per-round draws (segment of the customer, uniform number deciding the click)."""

    name: EnvironmentName
    seed: int
    offers: tuple[str, ...]
    segments: tuple[str, ...]
    before: np.ndarray  # (segments, offers) take-up before change_round
    after: np.ndarray  # (segments, offers) take-up from change_round on
    change_round: int | None
    segment_of_round: np.ndarray  # (rounds,) index into segments
    click_draw: np.ndarray  # (rounds,) uniform [0, 1): a click when below the take-up
    drift_rounds: int = 0  # the change is linear over this many rounds from change_round (0: a step)

    @property
    def rounds(self) -> int:
        return len(self.segment_of_round)

    @property
    def contextual(self) -> bool:
        return len(self.segments) > 1

    def take_up(self, round_index: int) -> np.ndarray:
        """The take-up matrix in force at this round."""
        weight = float(self.after_weights(np.array([round_index]))[0])
        if weight == 0.0:
            return self.before
        if weight == 1.0:
            return self.after
        return self.before * (1.0 - weight) + self.after * weight

    def after_weights(self, rounds: np.ndarray) -> np.ndarray:
        """Per round, how far the take-up has moved from `before` (0) to `after` (1)."""
        if self.change_round is None:
            return np.zeros(len(rounds))
        if self.drift_rounds <= 0:
            return (rounds >= self.change_round).astype(np.float64)
        return np.clip((rounds - self.change_round) / self.drift_rounds, 0.0, 1.0)

    def clicked(self, round_index: int, offer: int) -> bool:
        segment = int(self.segment_of_round[round_index])
        return bool(self.click_draw[round_index] < self.take_up(round_index)[segment, offer])

    def best_offer(self, round_index: int) -> int:
        segment = int(self.segment_of_round[round_index])
        return int(np.argmax(self.take_up(round_index)[segment]))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "rounds": self.rounds,
            "offers": list(self.offers),
            "segments": list(self.segments),
            "change_round": self.change_round,
            "drift_rounds": self.drift_rounds,
            "take_up_before": np.round(self.before, 6).tolist(),
            "take_up_after": np.round(self.after, 6).tolist(),
        }


def make_environment(
    name: str,
    *,
    rounds: int,
    seed: int,
    offers: int = 10,
    low: float = 0.02,
    high: float = 0.10,
) -> Environment:
    """`stationary`: take-up evenly spaced from `low` to `high`. `reversed`: the same, the order
    reversed at half time. `segments`: 4 segments, each offer's take-up drawn uniformly from
    [low, high] per segment, the whole matrix redrawn at half time. `gradual`: the stationary rates
    moving linearly to the reversed order over GRADUAL_DRIFT_ROUNDS (a fifth of the run when it is
    shorter) from half time. `single`: one offer changes while the others stay: at half time the
    worst becomes the best (`high` plus one step). Segments of customers are drawn uniformly at
    random in every environment (one segment where there is one)."""
    if name not in ENVIRONMENTS:
        raise InvalidArgument(f"must be one of {', '.join(ENVIRONMENTS)}", field="environment")
    if rounds < 1:
        raise InvalidArgument("must be at least 1", field="rounds")
    if offers < 2:
        raise InvalidArgument("must be at least 2", field="offers")
    if not 0.0 <= low < high <= 1.0:
        raise InvalidArgument(f"needs 0 <= low < high <= 1, got {low}..{high}", field="take_up")
    environment_seed, _ = _seed_streams(seed)
    rng = np.random.default_rng(environment_seed)
    offer_ids = tuple(f"offer-{index + 1:02d}" for index in range(offers))
    segments = tuple(f"s{index + 1}" for index in range(SEGMENT_COUNT)) if name == "segments" else ("all",)
    change_round: int | None = None
    drift_rounds = 0
    if name == "segments":
        before = rng.uniform(low, high, size=(len(segments), offers))
        after = rng.uniform(low, high, size=(len(segments), offers))
        change_round = rounds // 2
    else:
        before = np.linspace(low, high, offers)[None, :]
        after = before[:, ::-1].copy() if name in ("reversed", "gradual") else before
        change_round = rounds // 2 if name in ("reversed", "gradual") else None
        if name == "gradual":
            drift_rounds = min(GRADUAL_DRIFT_ROUNDS, max(rounds // 5, 1))
        if name == "single":
            after = before.copy()
            after[0, 0] = min(high + (high - low) / max(offers - 1, 1), 1.0)
            change_round = rounds // 2
    return Environment(
        name=name,
        seed=seed,
        offers=offer_ids,
        segments=segments,
        before=before,
        after=after,
        change_round=change_round,
        segment_of_round=rng.integers(len(segments), size=rounds),
        click_draw=rng.random(rounds),
        drift_rounds=drift_rounds,
    )


def _seed_streams(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent streams for the environment and the policy from one seed."""
    environment, policy = np.random.SeedSequence(seed).spawn(2)
    return environment, policy


def policy_rng(seed: int) -> np.random.Generator:
    """The random generator a seeded policy (the engine's scorer and exploration) draws from."""
    return np.random.default_rng(_seed_streams(seed)[1])


# The deployment under test ------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySettings:
    """What the simulated deployment serves with. `uniform` is epsilon-greedy with epsilon 1: every
    request ranked at random, the no-learning baseline."""

    algorithm: AlgorithmName = "thompson"
    half_life_seconds: float | None = None
    half_life_impressions: float | None = None
    change_detection: bool = False
    epsilon: float = 0.1  # exploration share for epsilon_greedy
    use_segment: bool = True  # declare the segment as a context variable (segments environment)
    alpha0: float = 1.0  # thompson prior successes
    beta0: float = 1.0  # thompson prior failures

    @property
    def label(self) -> str:
        parts: list[str] = [self.algorithm]
        if self.algorithm == "epsilon_greedy":
            parts.append(f"eps={self.epsilon:g}")
        if self.algorithm == "thompson" and (self.alpha0, self.beta0) != (1.0, 1.0):
            parts.append(f"prior=Beta({self.alpha0:g},{self.beta0:g})")
        if self.half_life_seconds:
            parts.append(f"half-life={self.half_life_seconds:g}s")
        if self.half_life_impressions:
            parts.append(f"half-life={self.half_life_impressions:g} impressions")
        if self.change_detection:
            parts.append("change-detection")
        if not self.use_segment:
            parts.append("no-context")
        return " ".join(parts)


def simulation_spec_document(environment: Environment, policy: PolicySettings, name: str) -> dict[str, Any]:
    """The deployment spec (as published) that serves the environment's offers with the policy."""
    if policy.algorithm == "thompson":
        algorithm: dict[str, Any] = {"approach": "thompson", "alpha0": policy.alpha0, "beta0": policy.beta0}
        epsilon = 0.0
    else:
        algorithm = {"approach": "epsilon_greedy"}
        epsilon = 1.0 if policy.algorithm == "uniform" else policy.epsilon
    if policy.half_life_seconds:
        algorithm["half_life_seconds"] = policy.half_life_seconds
    if policy.half_life_impressions:
        algorithm["half_life_impressions"] = policy.half_life_impressions
    if policy.change_detection:
        algorithm["change_detection"] = True
    document: dict[str, Any] = {
        "name": name,
        "description": f"simulation: {environment.name} environment, seed {environment.seed}, {policy.label}",
        "offers": [{"id": offer} for offer in environment.offers],
        "algorithm": algorithm,
        "exploration_epsilon": epsilon,
        "default_number_of_offers": 1,
    }
    if environment.contextual and policy.use_segment:
        document["context_variables"] = [
            {"name": SEGMENT_VARIABLE, "source": "param", "kind": "categorical", "default": "unknown"}
        ]
    return document


def simulation_spec(environment: Environment, policy: PolicySettings, name: str) -> DeploymentSpec:
    return deployment_spec_from_mapping(simulation_spec_document(environment, policy, name))


def deployment_name(environment: Environment) -> str:
    """Unique per run, so runs sharing a Redis never share arm statistics."""
    return f"sim-{environment.name}-{environment.seed}-{uuid_module.uuid4().hex[:8]}"


# Rounds and policies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    index: int
    segment: str
    now: float  # simulated clock
    customer: str
    params: dict[str, str] | None  # what the caller sends in Invoke params


def make_round(environment: Environment, index: int, step_seconds: float = 1.0) -> Round:
    segment = environment.segments[int(environment.segment_of_round[index])]
    return Round(
        index=index,
        segment=segment,
        now=SIMULATION_START + index * step_seconds,
        customer=f"sim-customer-{index}",
        params={SEGMENT_VARIABLE: segment} if environment.contextual else None,
    )


class Policy(Protocol):
    def choose(self, round: Round) -> int: ...

    def learn(self, round: Round, offer: int, clicked: bool) -> None: ...


class AsyncPolicy(Protocol):
    async def choose(self, round: Round) -> int: ...

    async def learn(self, round: Round, offer: int, clicked: bool) -> None: ...


class OraclePolicy:
    """Knows the take-up: always the best offer (zero regret by definition)."""

    def __init__(self, environment: Environment) -> None:
        self._environment = environment

    def choose(self, round: Round) -> int:
        return self._environment.best_offer(round.index)

    def learn(self, round: Round, offer: int, clicked: bool) -> None:
        return None
