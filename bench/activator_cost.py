"""What plugins and prediction activators cost an Invoke, in the predictor's own code path: the real
DecisionEngine over a real redis-server (no gRPC, no Envoy), the plain benchmark deployment as the
same-run baseline.

    .venv/bin/python bench/activator_cost.py --invokes 2000 --rounds 5

Variants of the invoke_throughput benchmark's deployment (50 offers, Thompson sampling, a feature
lookup for `gender`, `channel` from the params, 3 offers a request):
- plain: as it is;
- plugins + whitelist: two plugins of the example package (hide_categories, pre_score, told to hide
  roaming only when a param says so, so it runs and keeps every offer; loyalty_boost, post_score)
  and a whitelist read from a materialized view (every customer lists 40 of the 50 offers);
- corpus plugin: catalog_margin (post_score) weighing each offer by a 50-row corpus;
- shadow: the deployment names a shadow (the same deployment under another name), decided and
  logged after each reply (the time includes waiting for the shadows in flight);
- switch router: a routing deployment that sends every request to the plain one by a param.

Per round, the variants in turn (the order rotates), each timed over N Invokes one at a time and N
at 50 at a time: Invokes per second, this process's CPU per Invoke (it runs the engine and the
client's gather; Redis is another process) and Redis commands per Invoke (INFO commandstats). The
report gives the medians and, per round, each variant's CPU per Invoke over the plain one's in the
same round; the median of those ratios is the cost. It prints one JSON document.
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

from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.deployment_spec import DeploymentSpec, deployment_spec_from_mapping
from libs.common.redis_connection import open_redis
from libs.stack.processes import free_port, redis_argv, wait_until
from services.predictor.core.decision import DecisionEngine, InvokeInput
from services.predictor.core.engine_simulation import applied_config
from services.predictor.core.options_store import OptionsStore
from services.predictor.server import REDIS_CONNECTION_WAIT_SECONDS, REDIS_MAX_CONNECTIONS

IN_FLIGHT = 50
OFFERS = 50
CUSTOMERS = 2000
CATEGORIES = ("data", "voice", "roaming", "bundle", "content")
FEATURES = "bench_customers"
ALLOWED = "bench_allowed"


def base_document(name: str) -> dict[str, Any]:
    offers = []
    for index in range(OFFERS):
        offer: dict[str, Any] = {
            "id": f"offer-{index + 1:03d}",
            "price": round(2.0 + index * 0.75, 2),
            "category": CATEGORIES[index % len(CATEGORIES)],
            "attributes": {"tier": "gold" if index % 3 == 0 else "basic"},
        }
        if index % 5 == 4:
            offer["eligibility"] = [{"variable": "channel", "operator": "in", "value": ["app", "web"]}]
        offers.append(offer)
    return {
        "name": name,
        "campaigns": [name],
        "default_number_of_offers": 3,
        "exploration_epsilon": 0.05,
        "offers": offers,
        "context_variables": [
            {"name": "gender", "source": "feature", "default": "unknown"},
            {"name": "channel", "source": "param", "default": "app"},
        ],
        "algorithm": {"approach": "thompson", "half_life_seconds": 604800},
        "feature_lookup": {"feature_view": FEATURES, "key": "customer", "defaults": {"gender": "unknown"}},
    }


def variants() -> dict[str, tuple[str, list[DeploymentSpec]]]:
    """Variant -> (the campaign to invoke, the specs the replica serves)."""
    plain = base_document("plain")
    plugins = {
        **base_document("activated"),
        "whitelist": {"feature_view": ALLOWED, "column": "offers"},
        "plugins": [
            {
                "name": "hide_categories",
                "stage": "pre_score",
                "params": {"categories": ["roaming"], "when_param": "travelling"},
            },
            {"name": "loyalty_boost", "stage": "post_score", "params": {"boost": 2.0}},
        ],
    }
    corpus = {
        **base_document("corpus"),
        "corpora": {
            "catalog": {
                "key": "offer",
                "rows": [{"offer": f"offer-{i + 1:03d}", "margin": 1.0 + i % 7} for i in range(OFFERS)],
            }
        },
        "plugins": [{"name": "catalog_margin", "stage": "post_score", "params": {"corpus": "catalog"}}],
    }
    shadowed = {**base_document("shadowed"), "shadow": "candidate"}
    candidate = {**base_document("candidate"), "exploration_epsilon": 0.2}
    router = {
        "name": "router",
        "campaigns": ["router"],
        "offers": [{"id": "plain"}],
        "context_variables": [{"name": "channel", "source": "param", "default": "app"}],
        "routing": {"by": "switch", "variable": "channel", "default": "plain"},
    }

    def specs(*documents: dict[str, Any]) -> list[DeploymentSpec]:
        return [deployment_spec_from_mapping(document) for document in documents]

    return {
        "plain": ("plain", specs(plain)),
        "plugins + whitelist": ("activated", specs(plugins)),
        "corpus plugin": ("corpus", specs(corpus)),
        "shadow": ("shadowed", specs(shadowed, candidate)),
        "switch router": ("router", specs(router, plain)),
    }


async def write_customers(redis: Redis) -> None:
    allowed = ",".join(f"offer-{i + 1:03d}" for i in range(OFFERS) if i % 5 != 3)  # 40 of 50
    pipeline = redis.pipeline(transaction=False)
    for index in range(CUSTOMERS):
        customer = f"c{index}"
        pipeline.hset(redis_keys.online_features(FEATURES, customer), mapping={"gender": "fm"[index % 2]})
        pipeline.hset(redis_keys.online_features(ALLOWED, customer), mapping={"offers": allowed})
    await pipeline.execute()


async def commands(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(value["calls"]) for key, value in stats.items() if key != "cmdstat_info")


async def timed(call: Callable[[int], Awaitable[Any]], count: int, in_flight: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of `count` calls, `in_flight` at a time."""
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, count, in_flight):
        await asyncio.gather(*(call(index) for index in range(start, min(start + in_flight, count))))
    return time.perf_counter() - wall, time.process_time() - cpu


async def measure(
    redis: Redis, name: str, campaign: str, specs: list[DeploymentSpec], invokes: int
) -> dict[str, float]:
    config = applied_config(*specs)
    engine = DecisionEngine(OptionsStore(redis), "bench")

    async def invoke(index: int) -> None:
        request = InvokeInput(campaign, "", "app", f"c{index % CUSTOMERS}", "", 3, {"channel": "app"}, None)
        decision = await engine.invoke(request, config)
        assert len(decision.offers) == 3, (name, decision.warnings)

    await timed(invoke, 200, IN_FLIGHT)  # warm: generations read, Thompson pools filled
    await engine.drain_shadows()
    result: dict[str, float] = {}
    for in_flight in (1, IN_FLIGHT):
        before = await commands(redis)
        wall, cpu = await timed(invoke, invokes, in_flight)
        drain_wall, drain_cpu = time.perf_counter(), time.process_time()
        await engine.drain_shadows()  # the shadows of these Invokes are part of their cost
        wall += time.perf_counter() - drain_wall
        cpu += time.process_time() - drain_cpu
        result[f"invokes_per_s_{in_flight}"] = invokes / wall
        result[f"cpu_ms_per_invoke_{in_flight}"] = 1000 * cpu / invokes
        result[f"redis_commands_per_invoke_{in_flight}"] = (await commands(redis) - before) / invokes
    return result


async def run(port: int, invokes: int, rounds: int) -> list[dict[str, dict[str, float]]]:
    # As a replica opens it (services/predictor/server.py): 100 connections, a request waits for one.
    redis = open_redis(
        f"redis://127.0.0.1:{port}/0",
        socket_timeout=5,
        max_connections=REDIS_MAX_CONNECTIONS,
        wait_for_connection_seconds=REDIS_CONNECTION_WAIT_SECONDS,
    )
    try:
        await write_customers(redis)
        table = variants()
        names = list(table)
        results = []
        for round_index in range(rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            measured = {}
            for name in order:
                campaign, specs = table[name]
                measured[name] = await measure(redis, name, campaign, specs, invokes)
            results.append({name: measured[name] for name in names})
        return results
    finally:
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--invokes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
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
            load_before = os.getloadavg()
            rounds = asyncio.run(run(port, args.invokes, args.rounds))
        finally:
            process.terminate()
            process.wait(timeout=10)
    names = list(rounds[0])
    keys = list(rounds[0]["plain"])
    medians = {name: {key: statistics.median(r[name][key] for r in rounds) for key in keys} for name in names}
    ratios = {
        name: {
            f"cpu_over_plain_{level}": statistics.median(
                r[name][f"cpu_ms_per_invoke_{level}"] / r["plain"][f"cpu_ms_per_invoke_{level}"]
                for r in rounds
            )
            for level in (1, IN_FLIGHT)
        }
        | {
            f"throughput_over_plain_{level}": statistics.median(
                r[name][f"invokes_per_s_{level}"] / r["plain"][f"invokes_per_s_{level}"] for r in rounds
            )
            for level in (1, IN_FLIGHT)
        }
        for name in names
    }
    document = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code": os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parents[1]),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "medians": medians,
        "ratios_to_plain": ratios,
        "rounds": rounds,
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
