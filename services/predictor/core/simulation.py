"""Decision quality: seeded environments with known take-up rates, driven through the decision core,
scored against an oracle that knows the rates.

One round is one customer: Invoke asks for one offer, the environment draws the click from the
offer's take-up in the customer's segment, Respond reports it. Regret is *expected* regret, the
oracle's take-up minus the chosen offer's take-up, summed over rounds; it does not depend on the
luck of the click draws, so runs compare without click noise. Clicks and CTR are the sampled ones.

Three ways to drive the loop, one bookkeeping (`RunRecorder`):

- `InMemoryPolicy`: the engine's decision step with the same `Scorer` classes, reading statistics
  through `parse_arms` and writing them with `update_arm_fields`, a line-by-line twin of the
  `UPDATE_ARMS` Lua script. No Redis; fast enough for 100k-round runs.
- `EnginePolicy`: a real `DecisionEngine` over a real `OptionsStore` in Redis (contact join,
  Lua updates, decay, windows, the decision log), with a simulated clock so a half-life is in
  simulated seconds.
- the gRPC policy of `liveloop simulate --engine grpc` (in the CLI: core/ never imports grpc).

Time: every round advances a simulated clock by `step_seconds` (1 s by default), so a half-life of
h seconds forgets half of the evidence every h rounds.
"""

from __future__ import annotations

import math
import time
import uuid as uuid_module
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.config_follower import AppliedConfig, AppliedDeployment
from libs.common.deployment_spec import (
    DeploymentSpec,
    canonical_json,
    deployment_spec_from_mapping,
    spec_checksum,
)
from libs.common.errors import InvalidArgument
from services.predictor.core.algorithms import Statistics
from services.predictor.core.context import derive_context
from services.predictor.core.decision import DecisionEngine, DeploymentRuntime, InvokeInput, RespondInput
from services.predictor.core.options_store import ArmPolicy, OptionsStore, parse_arms

EnvironmentName = Literal["stationary", "reversed", "segments"]
AlgorithmName = Literal["thompson", "epsilon_greedy", "uniform"]
ENVIRONMENTS: tuple[EnvironmentName, ...] = ("stationary", "reversed", "segments")
ALGORITHMS: tuple[AlgorithmName, ...] = ("thompson", "epsilon_greedy", "uniform")

SIMULATION_START = 1_700_000_000.0  # simulated epoch seconds of round 0 (whole, so time arithmetic is exact)
SEGMENT_COUNT = 4
SEGMENT_VARIABLE = "segment"
RECOVERY_WINDOW = 500  # rounds in the trailing window of the recovery rule
RECOVERY_SHARE = 0.9  # share of that window that must pick the best offer
# The looser variant counts an offer within this much take-up of the best as a good choice: with
# offers 0.9 points apart, telling the best from the runner-up at 90% takes >10k rounds even from a
# fresh start, so the strict rule mostly measures that, not how fast the change was absorbed.
NEAR_BEST_TOLERANCE = 0.01


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

    @property
    def rounds(self) -> int:
        return len(self.segment_of_round)

    @property
    def contextual(self) -> bool:
        return len(self.segments) > 1

    def take_up(self, round_index: int) -> np.ndarray:
        """The take-up matrix in force at this round."""
        if self.change_round is not None and round_index >= self.change_round:
            return self.after
        return self.before

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
    [low, high] per segment, the whole matrix redrawn at half time. Segments of customers are drawn
    uniformly at random in every environment (one segment where there is one)."""
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
    if name == "segments":
        before = rng.uniform(low, high, size=(len(segments), offers))
        after = rng.uniform(low, high, size=(len(segments), offers))
        change_round = rounds // 2
    else:
        before = np.linspace(low, high, offers)[None, :]
        after = before[:, ::-1].copy() if name == "reversed" else before
        change_round = rounds // 2 if name == "reversed" else None
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


def applied_config(spec: DeploymentSpec, revision: int = 1) -> AppliedConfig:
    """What a replica would serve after applying the spec."""
    deployment = AppliedDeployment(
        name=spec.name,
        revision=revision,
        checksum=spec_checksum(canonical_json(spec)),
        spec=spec,
        prepared=DeploymentRuntime.prepare(spec),
    )
    return AppliedConfig(revision=revision, deployments={spec.name: deployment}, source="stream")


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


# The options store's arm arithmetic, in memory ----------------------------------------------------


ArmHash = dict[bytes | str, bytes | str]  # one arm statistics hash, as HGETALL returns it


def _lua_number(value: float) -> str:
    return "%.17g" % value  # noqa: UP031 - the exact format UPDATE_ARMS writes with string.format


def update_arm_fields(
    fields: ArmHash,
    policy: ArmPolicy,
    updates: Sequence[tuple[str, float, float]],
    now: float,
) -> None:
    """The UPDATE_ARMS Lua script applied to a dict standing in for the Redis hash: decay the
    evidence to now, add, cap, keep the two-bucket window. Mirrors the script step for step
    (including `%.17g` storage), so the same sequence gives the same hash."""

    def number(name: str) -> float | None:
        value = fields.get(name)
        return float(value) if value is not None else None

    half_life = policy.half_life_seconds
    window = policy.window_seconds
    cap = policy.count_cap
    for offer, dn, ds in updates:
        n = number(f"{offer}|n") or 0.0
        s = number(f"{offer}|s") or 0.0
        stored_t = number(f"{offer}|t")
        t = stored_t if stored_t is not None else now
        if half_life > 0 and now > t:
            factor = math.pow(0.5, (now - t) / half_life)
            n = n * factor
            s = s * factor
        n = n + dn
        s = s + ds
        if s > n:
            n = s
        if cap > 0 and n > cap:
            s = s * cap / n
            n = cap
        if now > t:
            t = now
        fields[f"{offer}|n"] = _lua_number(n)
        fields[f"{offer}|s"] = _lua_number(s)
        fields[f"{offer}|t"] = _lua_number(t)
        if window > 0:
            wn = number(f"{offer}|wn") or 0.0
            ws = number(f"{offer}|ws") or 0.0
            pn = number(f"{offer}|pn") or 0.0
            ps = number(f"{offer}|ps") or 0.0
            wb = number(f"{offer}|wb") or 0.0
            bucket = math.floor(now / window) * window
            if bucket > wb:
                if bucket - wb >= 2 * window:
                    pn = ps = 0.0
                else:
                    pn, ps = wn, ws
                wn = ws = 0.0
                wb = bucket
            wn = wn + dn
            ws = ws + ds
            fields[f"{offer}|wn"] = _lua_number(wn)
            fields[f"{offer}|ws"] = _lua_number(ws)
            fields[f"{offer}|pn"] = _lua_number(pn)
            fields[f"{offer}|ps"] = _lua_number(ps)
            fields[f"{offer}|wb"] = _lua_number(wb)


class InMemoryPolicy:
    """DecisionEngine's decision step without Redis: same prepared runtime, same Scorer, same draws
    from the random generator in the same order (scores, explore coin, permutation), statistics read
    with `parse_arms` and written with `update_arm_fields`. Serves arm algorithms (thompson,
    epsilon_greedy) without plugins or eligibility rules, which is what simulation specs use."""

    def __init__(self, spec: DeploymentSpec, rng: np.random.Generator) -> None:
        self._runtime = DeploymentRuntime.prepare(spec)
        self._rng = rng
        self._arms: dict[str, ArmHash] = {}
        self._offer_ids = [offer.id for offer in spec.offers]
        self._index = {offer: index for index, offer in enumerate(self._offer_ids)}
        self._weights = np.array([offer.weighting for offer in spec.offers])
        self._segments: dict[str, tuple[str, Mapping[str, float], dict[str, str]]] = {}
        if self._runtime.plans[""].scorer.statistics != "arms" or spec.plugins or spec.variants:
            raise InvalidArgument("the in-memory engine serves arm algorithms without plugins", field="spec")

    def arm_fields(self, segment: str) -> ArmHash:
        """The stand-in for the Redis hash of one segment's arm statistics."""
        return self._arms.setdefault(segment, {})

    def _context(self, params: Mapping[str, str] | None) -> tuple[str, Mapping[str, float], dict[str, str]]:
        cache_key = "" if params is None else "|".join(f"{k}={v}" for k, v in sorted(params.items()))
        cached = self._segments.get(cache_key)
        if cached is None:
            context = derive_context(self._runtime.spec, {}, params or {}, "")
            categorical = {k: v for k, v in context.values.items() if isinstance(v, str)}
            cached = (context.segment, context.numeric, categorical)
            self._segments[cache_key] = cached
        return cached

    def choose(self, round: Round) -> int:
        plan = self._runtime.variant_for(round.customer)
        segment, numeric, categorical = self._context(round.params)
        statistics = Statistics(arms=parse_arms(self.arm_fields(segment), plan.policy, round.now))
        scores = plan.scorer.score(
            self._offer_ids,
            self._weights,
            statistics,
            numeric,
            categorical,
            self._rng,
            segment=segment,
            propensities=False,  # a simulated round logs nothing
        )
        explore = bool(self._rng.random() < plan.epsilon)
        if explore:
            chosen = int(self._rng.permutation(len(self._offer_ids))[0])
        else:
            chosen = int(np.argsort(-scores.score, kind="stable")[0])
        update_arm_fields(
            self.arm_fields(segment), plan.policy, [(self._offer_ids[chosen], 1.0, 0.0)], round.now
        )
        return chosen

    def learn(self, round: Round, offer: int, clicked: bool) -> None:
        if not clicked:
            return  # a response without uptake changes no statistics (as in DecisionEngine.respond)
        plan = self._runtime.variant_for(round.customer)
        segment, _, _ = self._context(round.params)
        reward = self._runtime.spec.reward.default_reward
        update_arm_fields(
            self.arm_fields(segment), plan.policy, [(self._offer_ids[offer], 0.0, reward)], round.now
        )


class SimulatedClock:
    """The options store's clock during a simulation: set by the runner every round."""

    def __init__(self, now: float = SIMULATION_START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class EnginePolicy:
    """A real DecisionEngine over Redis: Invoke for one offer, Respond with the click, by uuid."""

    def __init__(
        self, engine: DecisionEngine, config: AppliedConfig, clock: SimulatedClock, environment: Environment
    ) -> None:
        self._engine = engine
        self._config = config
        self._clock = clock
        (self._deployment,) = config.deployments
        self._index = {offer: index for index, offer in enumerate(environment.offers)}
        self._offers = environment.offers
        self._uuid = ""
        self.uuids: list[str] = []

    async def choose(self, round: Round) -> int:
        self._clock.now = round.now
        decision = await self._engine.invoke(
            InvokeInput(
                campaign=self._deployment,
                subcampaign="",
                channel="",
                customer=round.customer,
                userid="",
                numberoffers=1,
                params=round.params,
                in_param=None,
            ),
            self._config,
        )
        self._uuid = decision.uuid
        self.uuids.append(decision.uuid)
        return self._index[decision.offers[0].offer.id]

    async def learn(self, round: Round, offer: int, clicked: bool) -> None:
        self._clock.now = round.now
        accepted = [self._offers[offer]] if clicked else []
        await self._engine.respond(RespondInput(uuid=self._uuid, accepted=accepted), self._config)


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
        take_up = np.where(
            after[:, None], environment.after[segments], environment.before[segments]
        )  # (done, offers): the take-up each customer faced
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
            recovery_rounds=rounds_to_window_share(best[change:]) if has_change else None,
            convergence_rounds=rounds_to_window_share(best[:change]),
            near_best_recovery_rounds=rounds_to_window_share(near_best[change:]) if has_change else None,
            near_best_convergence_rounds=rounds_to_window_share(near_best[:change]),
            best_share_last_window=float(best[-RECOVERY_WINDOW:].mean()) if done else 0.0,
            regret_curve=[(point, float(cumulative[point - 1])) for point in points],
            wall_seconds=wall_seconds,
            settings=dict(settings or {}),
        )


Progress = Callable[[int], None]


def _progress_every(rounds: int) -> int:
    return max(1, min(1000, rounds // 200))


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
    recorder = RunRecorder(environment)
    every = _progress_every(environment.rounds)
    started = time.perf_counter()
    for index in range(environment.rounds):
        round_ = make_round(environment, index, step_seconds)
        offer = policy.choose(round_)
        clicked = environment.clicked(index, offer)
        policy.learn(round_, offer, clicked)
        recorder.record(index, offer, clicked)
        if progress is not None and (index + 1) % every == 0:
            progress(index + 1)
    return recorder.report(
        engine=engine,
        policy=label,
        wall_seconds=time.perf_counter() - started,
        sample_every=sample_every,
        settings=settings,
    )


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
    recorder = RunRecorder(environment)
    every = _progress_every(environment.rounds)
    started = time.perf_counter()
    for index in range(environment.rounds):
        round_ = make_round(environment, index, step_seconds)
        offer = await policy.choose(round_)
        clicked = environment.clicked(index, offer)
        await policy.learn(round_, offer, clicked)
        recorder.record(index, offer, clicked)
        if progress is not None and (index + 1) % every == 0:
            progress(index + 1)
    return recorder.report(
        engine=engine,
        policy=label,
        wall_seconds=time.perf_counter() - started,
        sample_every=sample_every,
        settings=settings,
    )


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


async def run_with_redis(
    environment: Environment,
    policy: PolicySettings,
    redis: Redis,
    *,
    step_seconds: float = 1.0,
    sample_every: int | None = None,
    progress: Progress | None = None,
    name: str | None = None,
    keep_state: bool = False,
) -> SimulationReport:
    """The real DecisionEngine over the options store in Redis, on a simulated clock. The arm
    statistics and contacts of the run are deleted afterwards unless `keep_state`; the decision log
    keeps its entries (capped like any other)."""
    spec = simulation_spec(environment, policy, name or deployment_name(environment))
    clock = SimulatedClock()
    engine = DecisionEngine(OptionsStore(redis, clock=clock), "simulator", rng=policy_rng(environment.seed))
    driver = EnginePolicy(engine, applied_config(spec), clock, environment)
    try:
        return await run_async_policy(
            environment,
            driver,
            engine="redis",
            label=policy.label,
            step_seconds=step_seconds,
            sample_every=sample_every,
            progress=progress,
            settings=_settings(policy, step_seconds, deployment=spec.name),
        )
    finally:
        if not keep_state:
            await _delete_run_state(redis, spec, environment, driver.uuids)


async def _delete_run_state(
    redis: Redis, spec: DeploymentSpec, environment: Environment, uuids: Sequence[str]
) -> None:
    generation = await redis.get(redis_keys.options_generation(spec.name))
    generation_text = generation.decode() if isinstance(generation, bytes) else str(generation or "0")
    keys = [redis_keys.arm_statistics(spec.name, generation_text, "all")]
    keys += [
        redis_keys.arm_statistics(spec.name, generation_text, f"{SEGMENT_VARIABLE}={segment}")
        for segment in (*environment.segments, "unknown")
    ]
    keys += [redis_keys.contact(uuid) for uuid in uuids]
    for start in range(0, len(keys), 1000):
        await redis.delete(*keys[start : start + 1000])
