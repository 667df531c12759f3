"""`liveloop simulate --engine grpc` against a whole local stack: a simulation deployment published with
the admin key, every round an Invoke and a Respond with the invoke key through Envoy, learning in
the stack's Redis shared by both predictor replicas. The same seed driven in process (the
DecisionEngine over the same Redis, and the in-memory engine) must behave the same way."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.decision_log import decode_entry
from libs.simulation.environments import Environment, PolicySettings, make_environment
from libs.simulation.runs import SimulationReport, run_in_memory
from services.predictor.core.engine_simulation import run_with_redis
from tests.e2e.conftest import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(120)]

ROUNDS = 2_000
# Four offers from 5% to 30% take-up: large gaps, so Thompson sampling settles within a few hundred rounds.
ARGS = ["--environment", "stationary", "--rounds", str(ROUNDS), "--offers", "4", "--take-up", "0.05,0.30"]
SEED = 4


def stationary(seed: int) -> Environment:
    return make_environment("stationary", rounds=ROUNDS, seed=seed, offers=4, low=0.05, high=0.30)


def replicas_in_decision_log(stack: LocalStack, deployment: str) -> dict[str, set[str]]:
    """Which replicas logged the deployment's contacts (Invoke) and responses (Respond)."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    served: dict[str, set[str]] = {"contact": set(), "response": set()}
    try:
        entries: list[tuple[str, dict[str, str]]] = client.xrange(redis_keys.DECISION_STREAM)  # type: ignore[assignment]
        for _, entry in entries:
            record = decode_entry(entry)
            if record.deployment == deployment:
                served[entry["kind"]].add(record.replica)
    finally:
        client.close()
    return served


async def engine_over_redis(stack: LocalStack) -> SimulationReport:
    client = Redis.from_url(stack.redis_url)
    try:
        return await run_with_redis(stationary(SEED), PolicySettings(), client)
    finally:
        await client.aclose()


def test_simulation_through_the_front_door_learns_like_the_core(running_stack: LocalStack) -> None:
    result = running_stack.cli(
        "simulate", *ARGS, "--seed", str(SEED), "--engine", "grpc", "--json", timeout=90
    )
    assert result.returncode == 0, f"simulate failed:\n{result.stdout}\n{result.stderr}"
    through_grpc = json.loads(result.stdout)
    assert through_grpc["engine"] == "grpc"
    assert through_grpc["rounds"] == ROUNDS
    # Both replicas took part, so statistics learned on one were used by the other. (Envoy's round
    # robin with the strict Invoke/Respond alternation can send every Invoke to one replica and every
    # Respond to the other: the decision log says which replica handled each.)
    served = replicas_in_decision_log(running_stack, through_grpc["settings"]["deployment"])
    assert served["contact"] | served["response"] == {"predictor-1", "predictor-2"}, served

    # The same seed in process: the environment (segments, click draws) is identical; the replicas'
    # own random draws are not, so the regret through gRPC is one draw from the spread of seeded
    # runs. Measured: in memory over 60 seeds 14..58 (mean 28, sd 10); through gRPC 20 runs here,
    # idle and beside two CPU hogs, 13..41; but two CI runs of the whole suite drew 85, which a
    # bound of mean + 4 sd + 10 from 8 seeds (59 then) failed. So the check is that it learned:
    # uniform random choice loses (30% - mean take-up) per round, about 250 clicks here, and a
    # front door whose Responds taught nothing stays near that. The share
    # of the best offer in the last window swings with the unseeded draws, so it is reported only.
    in_memory = run_in_memory(stationary(SEED), PolicySettings())
    assert in_memory.best_share_last_window >= 0.7
    observed = (through_grpc["regret"], through_grpc["best_share_last_window"], in_memory.regret)
    assert through_grpc["regret"] < 0.4 * ROUNDS * (0.30 - 0.175), observed

    # The DecisionEngine in process over the stack's Redis, same seed: the same choices.
    in_process = asyncio.run(engine_over_redis(running_stack))
    assert in_process.regret == pytest.approx(in_memory.regret, abs=1e-9)  # same draws, same choices
    assert in_process.best_share_last_window >= 0.7

    # the simulation deployment was removed again
    listed = running_stack.cli("config", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["deployments"] == []
