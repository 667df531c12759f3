"""Respond's cost in the predictor's own code path: the real DecisionEngine over a real redis-server
(no gRPC, no Envoy), Invoke as the same-run baseline.

    .venv/bin/python bench/respond_path.py --contacts 2000 --rounds 3

Per round: N Invokes (one offer each), then N Responds taking that offer, each timed once one at a
time (latency) and once 50 at a time (throughput); the Redis commands each Respond sent are read
from INFO commandstats. The example deployment (examples/deployments/telco-offers.yaml) serves. The
script runs against whatever `libs` and `services` are first on the path, so two checkouts can be
compared in one sitting (PYTHONPATH=<other checkout>). It prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from redis.asyncio import Redis

from libs.common.deployment_spec import deployment_spec_from_mapping
from libs.stack.processes import free_port, redis_argv, wait_until
from services.predictor.core.decision import DecisionEngine, InvokeInput, RespondInput
from services.predictor.core.engine_simulation import applied_config
from services.predictor.core.options_store import OptionsStore

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deployments" / "telco-offers.yaml"
IN_FLIGHT = 50


def _invoke_input(index: int) -> InvokeInput:
    return InvokeInput(
        campaign="telco-offers",
        subcampaign="",
        channel="app",
        customer=f"c{index}",
        userid="",
        numberoffers=1,
        params={},
        in_param=None,
    )


async def _commands(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(value["calls"]) for key, value in stats.items() if key != "cmdstat_info")


async def _timed(
    call: Callable[[Any], Awaitable[Any]], items: list[Any], in_flight: int
) -> tuple[float, list[Any]]:
    """(seconds, results) of `call` over the items, `in_flight` at a time."""
    results: list[Any] = []
    started = time.perf_counter()
    for start in range(0, len(items), in_flight):
        results += await asyncio.gather(*(call(item) for item in items[start : start + in_flight]))
    return time.perf_counter() - started, results


async def _round(redis: Redis, contacts: int) -> dict[str, float]:
    spec = deployment_spec_from_mapping(yaml.safe_load(EXAMPLE.read_text()))
    config = applied_config(spec)
    engine = DecisionEngine(OptionsStore(redis), "bench")

    async def invoke(index: int) -> Any:
        return await engine.invoke(_invoke_input(index), config)

    async def respond(decision: Any) -> None:
        outcome = await engine.respond(RespondInput(decision.uuid, [decision.offers[0].offer.id]), config)
        assert outcome.learned, outcome

    result: dict[str, float] = {}
    for in_flight in (1, IN_FLIGHT):
        invoke_seconds, decisions = await _timed(invoke, list(range(contacts)), in_flight)
        before = await _commands(redis)
        respond_seconds, _ = await _timed(respond, decisions, in_flight)
        result[f"respond_commands_{in_flight}"] = (await _commands(redis) - before) / contacts
        result[f"invoke_per_s_{in_flight}"] = contacts / invoke_seconds
        result[f"respond_per_s_{in_flight}"] = contacts / respond_seconds
    return result


async def _run(port: int, contacts: int, rounds: int) -> list[dict[str, float]]:
    redis = Redis(host="127.0.0.1", port=port)
    try:
        return [await _round(redis, contacts) for _ in range(rounds)]
    finally:
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        process = subprocess.Popen(
            redis_argv(port, Path(scratch), persistent=False),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            import redis as blocking

            client = blocking.Redis(host="127.0.0.1", port=port)
            if not wait_until(lambda: _pings(client), timeout=15):
                print("redis-server did not start", file=sys.stderr)
                return 1
            rounds = asyncio.run(_run(port, args.contacts, args.rounds))
        finally:
            process.terminate()
            process.wait(timeout=10)
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    document = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code": os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parents[1]),
        "load_average": os.getloadavg(),
        "rounds": rounds,
        "medians": medians,
        "respond_over_invoke_1": medians["respond_per_s_1"] / medians["invoke_per_s_1"],
        "respond_over_invoke_50": medians[f"respond_per_s_{IN_FLIGHT}"]
        / medians[f"invoke_per_s_{IN_FLIGHT}"],
    }
    print(json.dumps(document, indent=2))
    return 0


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
