"""Driving a policy through an environment's rounds, and the report: cumulative expected regret
against the oracle, CTR, and the rounds to recover after a change.

Regret is *expected* regret, the oracle's take-up minus the chosen offer's take-up, summed over
rounds; it does not depend on the luck of the click draws, so runs compare without click noise.
Clicks and CTR are the sampled ones. Engines: `run_in_memory` here (the shared policy, no Redis),
the predictor's engine over Redis (services/predictor/core/engine_simulation.py, for the benchmark
and the tests), and the gRPC API (`liveloop simulate --engine grpc`): one bookkeeping for all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from libs.simulation.environments import (
    AsyncPolicy,
    Environment,
    Policy,
    PolicySettings,
    Round,
    make_round,
    policy_rng,
    simulation_spec,
)
from libs.simulation.in_memory import InMemoryPolicy

RECOVERY_WINDOW = 500  # rounds in the trailing window of the recovery rule
RECOVERY_SHARE = 0.9  # share of that window that must pick the best offer
# The looser variant counts an offer within this much take-up of the best as a good choice: with
# offers 0.9 points apart, telling the best from the runner-up at 90% takes >10k rounds even from a
# fresh start, so the strict rule mostly measures that, not how fast the change was absorbed.
NEAR_BEST_TOLERANCE = 0.01


# Bookkeeping and the report -----------------------------------------------------------------------


@dataclass
class SimulationReport:
    environment: str
    engine: str
    policy: str
    seed: int
    rounds: int
    clicks: int
    expected_clicks: float  # sum of the chosen offers' take-up
    oracle_expected_clicks: float  # sum of the best offers' take-up
    regret: float  # oracle_expected_clicks - expected_clicks (expected, not sampled)
    ctr: float  # sampled clicks / rounds
    oracle_ctr: float
    regret_before_change: float
    regret_after_change: float
    change_round: int | None
    recovery_rounds: int | None  # see rounds_to_window_share; None: no change, or never recovered
    convergence_rounds: int | None  # the same rule from round 0 (before any change)
    near_best_recovery_rounds: int | None  # the same rule, counting offers within NEAR_BEST_TOLERANCE
    near_best_convergence_rounds: int | None
    best_share_last_window: float  # share of the last RECOVERY_WINDOW rounds that chose the best offer
    regret_curve: list[tuple[int, float]]  # (rounds done, cumulative regret)
    wall_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def rounds_per_second(self) -> float:
        return self.rounds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["regret_curve"] = [[rounds, round(value, 4)] for rounds, value in self.regret_curve]
        document["rounds_per_second"] = round(self.rounds_per_second, 1)
        for key in ("expected_clicks", "oracle_expected_clicks", "regret", "regret_before_change"):
            document[key] = round(document[key], 4)
        document["regret_after_change"] = round(document["regret_after_change"], 4)
        document["wall_seconds"] = round(self.wall_seconds, 3)
        return document


def rounds_to_window_share(
    best: np.ndarray, window: int = RECOVERY_WINDOW, share: float = RECOVERY_SHARE
) -> int | None:
    """Rounds until the policy has settled on the best offer: the smallest k >= window such that in
    rounds [k - window, k) (counted from the start of `best`) at least `share` of the choices were
    the best offer. None when no such window exists. After a change, `best` starts at the change, so
    the result is the rounds to recover (at least `window`)."""
    if len(best) < window:
        return None
    cumulative = np.concatenate(([0], np.cumsum(best, dtype=np.int64)))
    sums = cumulative[window:] - cumulative[:-window]
    hits = np.nonzero(sums >= math.ceil(share * window - 1e-9))[0]
    return int(hits[0]) + window if hits.size else None


class RunRecorder:
    """Keeps each round's choice and click; computes the report at the end."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self.chosen = np.full(environment.rounds, -1, dtype=np.int64)
        self.clicked = np.zeros(environment.rounds, dtype=bool)
        self.done = 0

    def record(self, round_index: int, offer: int, clicked: bool) -> None:
        self.chosen[round_index] = offer
        self.clicked[round_index] = clicked
        self.done = round_index + 1

    def report(
        self,
        *,
        engine: str,
        policy: str,
        wall_seconds: float,
        sample_every: int | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> SimulationReport:
        environment = self.environment
        done = self.done
        rounds = np.arange(done)
        segments = environment.segment_of_round[:done]
        chosen = self.chosen[:done]
        change = environment.change_round if environment.change_round is not None else done
        after = rounds >= change
        weights = environment.after_weights(rounds)[:, None]
        # (done, offers): the take-up each customer faced (exactly before or after outside a drift)
        take_up = environment.before[segments] * (1.0 - weights) + environment.after[segments] * weights
        chosen_take_up = take_up[rounds, chosen] if done else np.zeros(0)
        oracle_take_up = take_up.max(axis=1) if done else np.zeros(0)
        regret = oracle_take_up - chosen_take_up
        cumulative = np.cumsum(regret)
        best = chosen == (take_up.argmax(axis=1) if done else np.zeros(0, dtype=np.int64))
        near_best = chosen_take_up >= oracle_take_up - NEAR_BEST_TOLERANCE - 1e-12
        every = sample_every or max(1, environment.rounds // 100)
        points = [*range(every, done + 1, every)]
        if done and (not points or points[-1] != done):
            points.append(done)
        has_change = environment.change_round is not None and environment.change_round < done
        # Recovery counts from the first round whose best offer is not what that customer's segment
        # had before: the change itself for a step, the crossing of the rates within a drift.
        moved = change
        if has_change and environment.drift_rounds > 0:
            was_best = environment.before[segments].argmax(axis=1)
            differs = np.flatnonzero(take_up.argmax(axis=1)[change:] != was_best[change:])
            moved = change + int(differs[0]) if differs.size else done
        return SimulationReport(
            environment=environment.name,
            engine=engine,
            policy=policy,
            seed=environment.seed,
            rounds=done,
            clicks=int(self.clicked[:done].sum()),
            expected_clicks=float(chosen_take_up.sum()),
            oracle_expected_clicks=float(oracle_take_up.sum()),
            regret=float(regret.sum()),
            ctr=float(self.clicked[:done].mean()) if done else 0.0,
            oracle_ctr=float(oracle_take_up.mean()) if done else 0.0,
            regret_before_change=float(regret[~after].sum()),
            regret_after_change=float(regret[after].sum()),
            change_round=environment.change_round,
            recovery_rounds=rounds_to_window_share(best[moved:]) if has_change else None,
            convergence_rounds=rounds_to_window_share(best[:change]),
            near_best_recovery_rounds=rounds_to_window_share(near_best[moved:]) if has_change else None,
            near_best_convergence_rounds=rounds_to_window_share(near_best[:change]),
            best_share_last_window=float(best[-RECOVERY_WINDOW:].mean()) if done else 0.0,
            regret_curve=[(point, float(cumulative[point - 1])) for point in points],
            wall_seconds=wall_seconds,
            settings=dict(settings or {}),
        )


Progress = Callable[[int], None]


def _progress_every(rounds: int) -> int:
    return max(1, min(1000, rounds // 200))


class _Drive:
    """What driving any policy through an environment takes besides the policy: the rounds in
    order, the click of each choice, the record, progress, and the report at the end."""

    def __init__(self, environment: Environment, step_seconds: float, progress: Progress | None) -> None:
        self.environment = environment
        self._recorder = RunRecorder(environment)
        self._step_seconds = step_seconds
        self._progress = progress
        self._every = _progress_every(environment.rounds)
        self._started = time.perf_counter()

    def rounds(self) -> Iterator[Round]:
        for index in range(self.environment.rounds):
            yield make_round(self.environment, index, self._step_seconds)

    def outcome(self, round_: Round, offer: int) -> bool:
        """Whether the customer took the offer chosen for this round (recorded)."""
        clicked = self.environment.clicked(round_.index, offer)
        self._recorder.record(round_.index, offer, clicked)
        if self._progress is not None and (round_.index + 1) % self._every == 0:
            self._progress(round_.index + 1)
        return clicked

    def report(
        self, *, engine: str, label: str, sample_every: int | None, settings: Mapping[str, Any] | None
    ) -> SimulationReport:
        return self._recorder.report(
            engine=engine,
            policy=label,
            wall_seconds=time.perf_counter() - self._started,
            sample_every=sample_every,
            settings=settings,
        )


def run_policy(
    environment: Environment,
    policy: Policy,
    *,
    engine: str,
    label: str,
    step_seconds: float = 1.0,
    sample_every: int | None = None,
    progress: Progress | None = None,
    settings: Mapping[str, Any] | None = None,
) -> SimulationReport:
    """Drive a synchronous policy through every round of the environment."""
    drive = _Drive(environment, step_seconds, progress)
    for round_ in drive.rounds():
        offer = policy.choose(round_)
        policy.learn(round_, offer, drive.outcome(round_, offer))
    return drive.report(engine=engine, label=label, sample_every=sample_every, settings=settings)


async def run_async_policy(
    environment: Environment,
    policy: AsyncPolicy,
    *,
    engine: str,
    label: str,
    step_seconds: float = 1.0,
    sample_every: int | None = None,
    progress: Progress | None = None,
    settings: Mapping[str, Any] | None = None,
) -> SimulationReport:
    """Drive an asynchronous policy (the engine over Redis, or the gRPC API) round by round: each
    Respond completes before the next Invoke, so every decision sees all earlier feedback."""
    drive = _Drive(environment, step_seconds, progress)
    for round_ in drive.rounds():
        offer = await policy.choose(round_)
        await policy.learn(round_, offer, drive.outcome(round_, offer))
    return drive.report(engine=engine, label=label, sample_every=sample_every, settings=settings)


def _settings(policy: PolicySettings, step_seconds: float, **extra: Any) -> dict[str, Any]:
    return {**asdict(policy), "step_seconds": step_seconds, **extra}


def run_in_memory(
    environment: Environment,
    policy: PolicySettings,
    *,
    step_seconds: float = 1.0,
    sample_every: int | None = None,
    progress: Progress | None = None,
) -> SimulationReport:
    """The long-run engine: the decision core's scorers and arm arithmetic, without Redis."""
    spec = simulation_spec(environment, policy, f"sim-{environment.name}")
    return run_policy(
        environment,
        InMemoryPolicy(spec, policy_rng(environment.seed)),
        engine="memory",
        label=policy.label,
        step_seconds=step_seconds,
        sample_every=sample_every,
        progress=progress,
        settings=_settings(policy, step_seconds),
    )
