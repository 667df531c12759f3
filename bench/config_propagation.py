"""Benchmark: propagation latency from Publish to the ACK of every replica.

    .venv/bin/python bench/config_propagation.py --publishes 200 --watchers 2 16

Starts a real config service process (SQLite, auth on) and N watcher processes, each running the
same ConfigFollower a predictor replica runs (validate, swap, persist last-known-good, ACK). Each
watcher prints the wall-clock time it applied every revision; the benchmark publishes a change,
waits for every watcher to apply it, and records (last apply - publish start). In the same run it
records the Publish RPC alone (validation + SQL commit) as the baseline the propagation adds to.
Results go to bench/results/config_propagation.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libs.common.auth import ApiKeyStore, Role, generate_api_key  # noqa: E402
from libs.common.client import open_blocking_channel  # noqa: E402
from libs.common.health_check import grpc_health  # noqa: E402
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc  # noqa: E402
from libs.stack.processes import free_port, wait_until  # noqa: E402

SPEC = (REPO / "examples" / "deployments" / "telco-offers.yaml").read_text()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# Watcher process ---------------------------------------------------------------------------------


def run_watcher(target: str, api_key: str, replica_id: str, state_dir: Path) -> None:
    from libs.common.config_follower import AppliedConfig, ConfigFollower

    async def main() -> None:
        async def on_change(applied: AppliedConfig) -> None:
            sys.stdout.write(
                json.dumps({"replica": replica_id, "revision": applied.revision, "t": time.time()}) + "\n"
            )
            sys.stdout.flush()

        follower = ConfigFollower(
            target=target, api_key=api_key, replica_id=replica_id, state_dir=state_dir, on_change=on_change
        )
        await follower.start()
        await asyncio.Event().wait()

    asyncio.run(main())


class Watchers:
    """Starts watcher processes and collects (replica, revision) -> apply time from their output."""

    def __init__(self, count: int, target: str, api_key: str, work: Path) -> None:
        self.applied: dict[tuple[str, int], float] = {}
        self._condition = threading.Condition()
        self.ids = [f"watcher-{i + 1}" for i in range(count)]
        self.processes = []
        for replica_id in self.ids:
            process = subprocess.Popen(
                [sys.executable, __file__, "--watcher", target, api_key, replica_id, str(work / replica_id)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=REPO,
            )
            self.processes.append(process)
            threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            event = json.loads(line)
            with self._condition:
                self.applied[(event["replica"], event["revision"])] = event["t"]
                self._condition.notify_all()

    def wait_all(self, revision: int, timeout: float) -> list[float]:
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                times = [self.applied.get((replica, revision)) for replica in self.ids]
                if all(t is not None for t in times):
                    return [t for t in times if t is not None]
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r, t in zip(self.ids, times, strict=True) if t is None]
                    raise TimeoutError(f"revision {revision} not applied by {missing}")
                self._condition.wait(left)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=10)


# Benchmark ---------------------------------------------------------------------------------------


def scenario(watchers_count: int, publishes: int, work: Path) -> dict[str, Any]:
    admin_key, admin = generate_api_key(Role.ADMIN, "bench-admin")
    service_key, service = generate_api_key(Role.SERVICE, "bench-replica")
    keys = work / "keys.json"
    ApiKeyStore([admin, service]).save(keys)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIVELOOP_")}
    env.update(
        {
            "LIVELOOP_CONFIG_PORT": str(port),
            "LIVELOOP_CONFIG_DATABASE_URL": f"sqlite:///{work / 'config.db'}",
            "LIVELOOP_CONFIG_API_KEYS_FILE": str(keys),
            "LIVELOOP_CONFIG_LOG_LEVEL": "WARNING",
        }
    )
    config = subprocess.Popen(
        [sys.executable, "-m", "services.config"], cwd=REPO, env=env, stderr=subprocess.DEVNULL
    )
    target = f"127.0.0.1:{port}"
    watchers: Watchers | None = None
    try:
        if not wait_until(lambda: grpc_health(target, "liveloop.config.v1.ConfigService") == "SERVING", 30):
            raise RuntimeError("config service did not start")
        watchers = Watchers(watchers_count, target, service_key, work)
        watchers.wait_all(0, 60)  # every watcher applied the initial (empty) snapshot
        propagation, publish_only, commit_to_all = [], [], []
        with open_blocking_channel(target, api_key=admin_key, deadline_seconds=10) as channel:
            stub = config_pb2_grpc.ConfigServiceStub(channel)
            for index in range(publishes):
                text = SPEC.replace(
                    "exploration_epsilon: 0.05", f"exploration_epsilon: {0.01 + index * 1e-4:.4f}"
                )
                started_wall, started = time.time(), time.perf_counter()
                reply = stub.Publish(config_pb2.PublishRequest(spec_text=text, message=f"bench {index}"))
                committed_wall = started_wall + (time.perf_counter() - started)
                publish_only.append((time.perf_counter() - started) * 1000)
                applied = watchers.wait_all(reply.revision, 30)
                propagation.append((max(applied) - started_wall) * 1000)
                commit_to_all.append((max(applied) - committed_wall) * 1000)
        return {
            "watchers": watchers_count,
            "publishes": publishes,
            "publish_to_all_acks_ms": summary(propagation),
            "publish_rpc_alone_ms": summary(publish_only),
            "commit_to_all_acks_ms": summary(commit_to_all),
        }
    finally:
        if watchers is not None:
            watchers.stop()
        config.terminate()
        config.wait(timeout=30)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), 2),
        "p99": round(percentile(values, 99), 2),
        "max": round(max(values), 2),
        "mean": round(statistics.fmean(values), 2),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--watcher":
        run_watcher(sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--publishes", type=int, default=200)
    parser.add_argument("--watchers", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    results = []
    for count in args.watchers:
        with tempfile.TemporaryDirectory(prefix="liveloop-bench-") as work:
            result = scenario(count, args.publishes, Path(work))
        print(json.dumps(result))
        results.append(result)
    report = {
        "benchmark": "config propagation: Publish -> ACK of every replica",
        "command": "python bench/config_propagation.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "goal": "p99 under 50 ms",
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config_propagation.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Config propagation: Publish to the ACK of every replica",
        "",
        f"Command: `{report['command']}` ({report['when']}, {os.cpu_count()} CPUs, Python {platform.python_version()}).",
        "Each watcher is a separate process running the predictor's ConfigFollower (validate, swap,",
        "persist last-known-good, ACK). Times in milliseconds over every publish; the Publish RPC",
        "alone (validation + SQLite commit) is the same-run baseline the distribution adds to.",
        "",
        "| watchers | publishes | publish->all ACKs p50 | p99 | max | Publish RPC alone p50 | p99 | commit->all ACKs p50 | p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, b, c = r["publish_to_all_acks_ms"], r["publish_rpc_alone_ms"], r["commit_to_all_acks_ms"]
        lines.append(
            f"| {r['watchers']} | {r['publishes']} | {p['p50']} | {p['p99']} | {p['max']} | {b['p50']} | {b['p99']} "
            f"| {c['p50']} | {c['p99']} |"
        )
    lines += ["", f"Goal: {report['goal']} (etcd delivers a watch event about 10 ms after a write)."]
    (args.out / "config_propagation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
