"""The predictor's real DecisionEngine over an options store in Redis, driven through a
simulation's rounds on a simulated clock (so a half-life is in simulated seconds): Invoke for one
offer, Respond with the click, by uuid. The benchmark and the tests run it beside the in-memory
engine of libs/simulation to check that both choose identically, round for round.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.config_follower import AppliedConfig, AppliedDeployment
from libs.common.deployment_spec import DeploymentSpec, canonical_json, spec_checksum
from libs.policy.deployment import PreparedDeployment
from libs.simulation.environments import (
    SEGMENT_VARIABLE,
    SIMULATION_START,
    Environment,
    PolicySettings,
    Round,
    deployment_name,
    policy_rng,
    simulation_spec,
)
from libs.simulation.runs import Progress, SimulationReport, _settings, run_async_policy
from services.predictor.core.decision import DecisionEngine, InvokeInput, RespondInput
from services.predictor.core.options_store import OptionsStore


def applied_config(
    spec: DeploymentSpec, *more: DeploymentSpec, revision: int = 1
) -> AppliedConfig[PreparedDeployment]:
    """What a replica would serve after applying the specs."""
    deployments = {
        each.name: AppliedDeployment(
            name=each.name,
            revision=revision,
            checksum=spec_checksum(canonical_json(each)),
            spec=each,
            prepared=PreparedDeployment.prepare(each),
        )
        for each in (spec, *more)
    }
    return AppliedConfig(revision=revision, deployments=deployments, source="stream")


class SimulatedClock:
    """The options store's clock during a simulation: set by the runner every round."""

    def __init__(self, now: float = SIMULATION_START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class EnginePolicy:
    """A real DecisionEngine over Redis: Invoke for one offer, Respond with the click, by uuid."""

    def __init__(
        self,
        engine: DecisionEngine,
        config: AppliedConfig[PreparedDeployment],
        clock: SimulatedClock,
        environment: Environment,
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
