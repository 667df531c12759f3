"""Benchmark: Invoke throughput and latency through Envoy, against Ping through the same Envoy.

    .venv/bin/python bench/invoke_throughput.py --duration 10 --rounds 3 --profile

Starts the local stack (`libs.stack.launcher.up`: Redis, config, two predictor replicas, ingest,
trainer, monitor, Envoy) on free ports in a temporary state directory, publishes a benchmark
deployment (50 offers, Thompson sampling, two context variables: `gender` from the `customers`
feature view and `channel` from the request params), writes online features for 10,000 customers
into Redis and waits until both replicas serve that revision. Then h2load (a C load generator,
Debian package `nghttp2-client`) sends gRPC frames through Envoy, Ping and Invoke alternately:

- 1 in flight (`-c1 -m1`): latency p50;
- 50 in flight (`-c10 -m5`: 10 HTTP/2 connections x 5 streams): throughput and p99;
- paced: one connection sending on a fixed schedule (open loop) at half of Invoke's capacity, the
  same rate for both RPCs: latency below saturation.

An unrecorded warm-up per RPC and level measures the rate that sizes each measured run (`-n`, about
`--duration` seconds). Runs are bounded by count, not time: a run cut by time cancels the requests in
flight. Rounds repeat everything (medians are reported); each round's Invoke uses another customer,
since h2load repeats one body. Latency percentiles come from h2load's per-request `--log-file`.
h2load counts HTTP 200 as success, which says nothing about the gRPC status, so each run checks that
the replicas' `liveloop_rpc_requests_total` counted exactly h2load's requests, all OK; before the
load a Python client and `nghttp -v` check grpc-status 0 for the exact bodies, and a negative control
with a wrong API key shows that failing calls would be caught.

It records CPU of every process per run, RSS per process before and after the load, what the load
left in Redis, and with `--profile` a py-spy profile of one replica under Invoke and under Ping.
Results go to bench/results/invoke_throughput.{json,md}. The stack is always stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402
import redis.asyncio  # noqa: E402
import yaml  # noqa: E402
from google.protobuf.struct_pb2 import Struct, Value  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from libs.common import redis_keys  # noqa: E402
from libs.common.client import open_blocking_channel  # noqa: E402
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc  # noqa: E402
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc  # noqa: E402
from libs.stack.credentials import load_credentials  # noqa: E402
from libs.stack.launcher import (  # noqa: E402
    StackRecord,
    StackSettings,
    down,
    envoy_plan,
    envoy_upstream_health,
    stack_redis_url,
    up,
)
from libs.stack.processes import free_port, wait_until  # noqa: E402

SERVICE_PATH = "/liveloop.predictor.v1.PredictorService/"
# What h2load sends: the bare grpc.aio servers' Ping (the baseline), liveloop's Ping, Invoke.
METHODS = ("Bare", "Ping", "Invoke")
DEPLOYMENT = "bench-offers"
CAMPAIGN = "bench-offers"
FEATURE_VIEW = "customers"
GENDERS = ("f", "m", "x")
INSTALL_HINT = "apt-get update && apt-get install -y nghttp2-client"


# The deployment ------------------------------------------------------------------------------------


def deployment_spec(offers: int) -> str:
    """50 offers, Thompson sampling, a feature-sourced and a param-sourced context variable."""
    categories = ("data", "voice", "roaming", "bundle", "content")
    offer_list: list[dict[str, Any]] = []
    for index in range(offers):
        offer: dict[str, Any] = {
            "id": f"offer-{index + 1:03d}",
            "name": f"Offer {index + 1:03d}",
            "price": round(2.0 + index * 0.75, 2),
            "cost": round(0.5 + index * 0.1, 2),
            "category": categories[index % len(categories)],
        }
        if index % 5 == 4:  # every fifth offer is shown only on digital channels
            offer["eligibility"] = [{"variable": "channel", "operator": "in", "value": ["app", "web"]}]
        offer_list.append(offer)
    spec = {
        "name": DEPLOYMENT,
        "environment": "dev",
        "description": "invoke_throughput benchmark",
        "campaigns": [CAMPAIGN],
        "default_number_of_offers": 3,
        "exploration_epsilon": 0.05,
        "offers": offer_list,
        "context_variables": [
            {"name": "gender", "source": "feature", "default": "unknown"},
            {"name": "channel", "source": "param", "default": "app"},
        ],
        "algorithm": {"approach": "thompson", "alpha0": 1.0, "beta0": 1.0, "half_life_seconds": 604800},
        "feature_lookup": {
            "feature_view": FEATURE_VIEW,
            "key": "customer",
            "defaults": {"gender": "unknown"},
        },
        "reward": {"window_seconds": 86400, "default_reward": 1.0},
    }
    return yaml.safe_dump(spec, sort_keys=False)


def customer_id(index: int) -> str:
    return f"cust-{index:06d}"


def write_features(redis_url: str, customers: int) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        pipeline = client.pipeline(transaction=False)
        for index in range(customers):
            pipeline.hset(
                redis_keys.online_features(FEATURE_VIEW, customer_id(index)),
                mapping={
                    "gender": GENDERS[index % len(GENDERS)],
                    "age": 18 + index % 60,
                    "plan": "postpaid" if index % 4 == 0 else "prepaid",
                    "tenure_months": index % 120,
                },
            )
            if index % 1000 == 999:
                pipeline.execute()
        pipeline.execute()
    finally:
        client.close()


# Request bodies ------------------------------------------------------------------------------------


def invoke_request(customer: str) -> predictor_pb2.InvokeRequest:
    params = Struct()
    params.update({"channel": "app"})
    return predictor_pb2.InvokeRequest(
        campaign=CAMPAIGN,
        customer=customer,
        numberoffers=Value(number_value=3),
        params=Value(struct_value=params),
    )


def grpc_frame(message: bytes) -> bytes:
    """A length-prefixed gRPC message: no compression flag, 4-byte big-endian length, bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# The stack -----------------------------------------------------------------------------------------


def stack_settings(state_dir: Path) -> StackSettings:
    # Metrics on: the replicas' RPC counters by status code are how gRPC failures are counted.
    return StackSettings.on_free_ports(state_dir, metrics=True, startup_timeout_seconds=90.0)


@contextlib.contextmanager
def running_stack(settings: StackSettings) -> Iterator[StackRecord]:
    record: StackRecord | None = None
    try:
        record = up(settings, progress=lambda message: print(f"  {message}", flush=True))
        yield record
    finally:
        result = down(settings.state_dir)
        print(f"stack: {result['message']} ({', '.join(result['stopped'])})", flush=True)


def publish(config_target: str, admin_key: str, spec_text: str) -> int:
    with open_blocking_channel(config_target, api_key=admin_key, deadline_seconds=30) as channel:
        reply = config_pb2_grpc.ConfigServiceStub(channel).Publish(
            config_pb2.PublishRequest(spec_text=spec_text, message="invoke_throughput benchmark")
        )
    return int(reply.revision)


def replica_revision(target: str, invoke_key: str) -> int:
    with open_blocking_channel(target, api_key=invoke_key, deadline_seconds=2) as channel:
        return int(
            predictor_pb2_grpc.PredictorServiceStub(channel).Ping(predictor_pb2.PingRequest()).config_revision
        )


# The baseline: bare grpc.aio servers behind an Envoy configured like the stack's ------------------

BARE_SERVER = Path(__file__).resolve().parent / "bare_grpc_server.py"


@dataclass
class BareFrontDoor:
    """Two bare grpc.aio servers (Ping's contract, nothing else) behind an Envoy built by the same
    code and with the same options as the stack's, its predictor cluster pointing at them."""

    envoy_port: int
    envoy_admin_port: int
    processes: list[tuple[str, subprocess.Popen[bytes]]]


@contextlib.contextmanager
def bare_front_door(settings: StackSettings, work: Path) -> Iterator[BareFrontDoor]:
    bare_ports = [free_port(), free_port()]
    bare_settings = settings.model_copy(
        update={
            "state_dir": work / "bare",
            "envoy_port": free_port(),
            "envoy_admin_port": free_port(),
            "envoy_base_id": None,
            "predictor_ports": bare_ports,
        }
    )
    bare_settings.state_dir.mkdir(parents=True, exist_ok=True)
    plan = envoy_plan(bare_settings)
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for index, port in enumerate(bare_ports, start=1):
            argv = [sys.executable, str(BARE_SERVER), "--port", str(port), "--replica-id", f"bare-{index}"]
            started.append((f"bare-{index}", subprocess.Popen(argv)))
        started.append(("envoy-bare", subprocess.Popen(plan.argv, stdout=subprocess.DEVNULL)))

        def predictors_healthy() -> bool:
            try:
                hosts = envoy_upstream_health(bare_settings.host, bare_settings.envoy_admin_port)
            except OSError:
                return False
            wanted = [f"predictor/127.0.0.1:{port}" for port in bare_ports]
            return all(hosts.get(name) == "healthy" for name in wanted)

        if not wait_until(predictors_healthy, 60, 0.2):
            raise RuntimeError("the bare servers' Envoy did not see both servers healthy")
        yield BareFrontDoor(bare_settings.envoy_port, bare_settings.envoy_admin_port, started)
    finally:
        for _, process in started:
            process.terminate()
        for _, process in started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


# Observation: metrics, CPU, memory -----------------------------------------------------------------


def rpc_counts(metrics_port: int) -> dict[tuple[str, str], float]:
    """(method, code) -> liveloop_rpc_requests_total of one replica."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[tuple[str, str], float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name != "liveloop_rpc_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts[(sample.labels["method"], sample.labels["code"])] += sample.value
    return counts


def envoy_stats(admin_port: int) -> dict[str, int]:
    url = f"http://127.0.0.1:{admin_port}/stats?filter=^cluster%5C.predictor%5C.upstream_rq_(total|retry|5xx|pending_overflow|timeout)$"
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    stats = {}
    for line in lines:
        name, _, value = line.partition(": ")
        with contextlib.suppress(ValueError):
            stats[name.removeprefix("cluster.predictor.")] = int(value)
    return stats


def redis_usage(redis_url: str) -> dict[str, int]:
    """What the load left in Redis: every Invoke keeps a contact hash and a decision stream entry."""
    client = redis.Redis.from_url(redis_url)
    try:
        used = int(client.info("memory")["used_memory"])
        stream = (
            int(client.xlen(redis_keys.DECISION_STREAM)) if client.exists(redis_keys.DECISION_STREAM) else 0
        )
        contact_keys = list(client.scan_iter(match=redis_keys.contact("*"), count=10_000))
        usage = {"used_memory": used, "keys": int(client.dbsize()), "contacts": len(contact_keys)}
        usage["decision_stream"] = stream
        if contact_keys:
            sample = contact_keys[:: max(1, len(contact_keys) // 20)]
            usage["bytes_per_contact"] = round(
                statistics.fmean(int(client.memory_usage(k) or 0) for k in sample)
            )
        if stream:
            usage["bytes_per_stream_entry"] = round(
                int(client.memory_usage(redis_keys.DECISION_STREAM) or 0) / stream
            )
        return usage
    finally:
        client.close()


@dataclass
class Observed:
    name: str
    process: psutil.Process


def observed_processes(record: StackRecord) -> list[Observed]:
    found = []
    for process_record in record.processes:
        process = process_record.process()
        if process is not None:
            found.append(Observed(process_record.name, process))
    return found


def cpu_seconds(processes: list[Observed]) -> dict[str, float]:
    times = {}
    for item in processes:
        with contextlib.suppress(psutil.Error):
            cpu = item.process.cpu_times()
            times[item.name] = cpu.user + cpu.system
    return times


def memory(processes: list[Observed]) -> dict[str, dict[str, float]]:
    result = {}
    for item in processes:
        with contextlib.suppress(psutil.Error):
            info = item.process.memory_full_info()
            result[item.name] = {"rss_mib": round(info.rss / 2**20, 1), "uss_mib": round(info.uss / 2**20, 1)}
    return result


# h2load --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    name: str
    clients: int
    streams: int
    paced_rate: float = 0.0  # requests per second sent on a fixed schedule (0: as fast as answers come)

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_h2load(output: str) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    if match := re.search(r"finished in ([\d.]+(?:us|ms|s)), ([\d.]+) req/s", output):
        parsed["seconds"] = round(_ms(match.group(1)) / 1000, 3)
        parsed["req_per_s"] = float(match.group(2))
    if match := re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
        r"(\d+) timeout",
        output,
    ):
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        parsed["requests"] = dict(zip(keys, map(int, match.groups()), strict=True))
    if match := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output):
        parsed["http_status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, match.groups()), strict=True))
    if match := re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output):
        parsed["time_for_request_ms"] = dict(
            zip(("min", "max", "mean", "sd"), (round(_ms(v), 3) for v in match.groups()), strict=True)
        )
    return parsed


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q / 100 * len(ordered) // 1))))
    return ordered[rank - 1]


def log_latencies(path: Path) -> tuple[dict[str, float], int]:
    """Latency percentiles (ms) of the requests with HTTP 200 in an h2load --log-file, and the
    number of rows that were not 200."""
    durations, other = [], 0
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        if parts[1] == "200":
            durations.append(int(parts[2]) / 1000.0)
        else:
            other += 1
    durations.sort()
    summary = {
        "count": len(durations),
        "p50": percentile(durations, 50),
        "p90": percentile(durations, 90),
        "p99": percentile(durations, 99),
        "p99_9": percentile(durations, 99.9),
        "max": durations[-1] if durations else float("nan"),
        "mean": statistics.fmean(durations) if durations else float("nan"),
    }
    return {key: round(value, 3) for key, value in summary.items()}, other


def _duration(seconds: float) -> str:
    """h2load takes whole numbers with a unit ("500ms"), not "0.5"."""
    return f"{round(seconds * 1000)}ms"


def for_seconds(seconds: float, warm_up: float = 0.5) -> list[str]:
    return ["-D", _duration(seconds), "--warm-up-time", _duration(warm_up)]


def for_requests(requests: int) -> list[str]:
    return ["-n", str(requests)]


def h2load_argv(
    url: str, body: Path, level: Level, bound: list[str], api_key: str, log_file: Path | None
) -> list[str]:
    """`bound` is ["-n", "<requests>"] or ["-D", "<duration>", "--warm-up-time", "<duration>"]."""
    argv = [
        "h2load",
        "-t1",
        f"-c{level.clients}",
        f"-m{level.streams}",
        *bound,
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        f"x-api-key: {api_key}",
    ]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    if level.paced_rate:
        # An open-loop schedule: request i leaves at i / rate seconds whether or not earlier ones
        # were answered (h2load's --rps fires every client's timer together, which sends bursts).
        requests = int(bound[1]) if bound[:1] == ["-n"] else 100
        script = (log_file or body).with_suffix(".schedule")
        script.write_text("".join(f"{1000 * i / level.paced_rate:.3f}\t{url}\n" for i in range(requests)))
        return [*(a for a in argv if a not in bound), f"--timing-script-file={script}"]
    return [*argv, url]


def shown(argv: list[str], api_key: str) -> str:
    return shlex.join(argv).replace(api_key, "$INVOKE_KEY")


# Verification --------------------------------------------------------------------------------------


def verify_with_python(front_door: str, invoke_key: str, method: str, body: bytes) -> dict[str, Any]:
    """Send these exact message bytes through Envoy with grpcio and decode the answer."""
    response_type = predictor_pb2.InvokeResponse if method == "Invoke" else predictor_pb2.PingResponse
    with grpc.insecure_channel(front_door) as channel:
        call = channel.unary_unary(
            SERVICE_PATH + method,
            request_serializer=lambda raw: raw,
            response_deserializer=response_type.FromString,
        )
        try:
            reply = call(body, timeout=5, metadata=(("x-api-key", invoke_key),))
        except grpc.RpcError as exc:
            return {"grpc_status": exc.code().name, "detail": exc.details()}
    result: dict[str, Any] = {"grpc_status": "OK"}
    if isinstance(reply, predictor_pb2.InvokeResponse):
        result.update(
            offers=[row.result.offer for row in reply.final_result],
            segment=reply.segment,
            replica=reply.replica_id,
            config_revision=reply.config_revision,
            warnings=list(reply.warnings),
        )
    elif isinstance(reply, predictor_pb2.PingResponse):
        result.update(replica=reply.replica_id, config_revision=reply.config_revision)
    return result


def verify_with_nghttp(url: str, body_file: Path, invoke_key: str) -> dict[str, Any]:
    if shutil.which("nghttp") is None:
        return {"skipped": "nghttp is not installed"}
    argv = [
        "nghttp",
        "-v",
        "-n",
        "-d",
        str(body_file),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        f"x-api-key: {invoke_key}",
        url,
    ]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    # nghttp -v prints each received header as "[  0.003] recv (stream_id=13) name: value".
    statuses = re.findall(r"recv \(stream_id=\d+\) :status: (\d+)", completed.stdout)
    grpc_statuses = re.findall(r"recv \(stream_id=\d+\) grpc-status: (\d+)", completed.stdout)
    return {
        "http_status": statuses[-1] if statuses else None,
        "grpc_status": int(grpc_statuses[-1]) if grpc_statuses else None,
        "exit_code": completed.returncode,
    }


def negative_control(base_url: str, body: Path, metrics_ports: list[int]) -> dict[str, Any]:
    """The same requests with a wrong API key: h2load and nghttp see HTTP 200, the replicas answer
    UNAUTHENTICATED. Shows that the status count above would catch failing calls."""
    wrong = "ll_000000000000_not-a-key"
    before = [rpc_counts(port) for port in metrics_ports]
    completed = subprocess.run(
        h2load_argv(base_url + "Ping", body, Level("negative control", 1, 1), for_requests(20), wrong, None),
        capture_output=True,
        text=True,
        check=False,
    )
    after = [rpc_counts(port) for port in metrics_ports]
    codes: collections.Counter[str] = collections.Counter()
    for old, new in zip(before, after, strict=True):
        for (method, code), value in new.items():
            if method == "PredictorService/Ping" and value > old.get((method, code), 0.0):
                codes[code] += int(value - old.get((method, code), 0.0))
    return {
        "h2load_requests": parse_h2load(completed.stdout).get("requests", {}),
        "replica_grpc_codes": dict(codes),
        "nghttp": verify_with_nghttp(base_url + "Ping", body, wrong),
    }


# Respond, and Redis traffic per request ----------------------------------------------------------

GRPC_CLIENT_CHANNELS = 10  # as h2load's -c10


async def _grpc_load(
    front_door: str, api_key: str, method: str, requests: list[bytes], in_flight: int
) -> dict[str, Any]:
    """Send these serialized requests through Envoy with grpc.aio, `in_flight` at a time over
    GRPC_CLIENT_CHANNELS channels: req/s, latency percentiles and status codes."""
    from grpc import aio

    channels = [aio.insecure_channel(front_door) for _ in range(GRPC_CLIENT_CHANNELS)]
    calls = [
        channel.unary_unary(
            SERVICE_PATH + method, request_serializer=lambda raw: raw, response_deserializer=None
        )
        for channel in channels
    ]
    metadata = (("x-api-key", api_key),)
    latencies: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    replies: list[bytes | None] = [None] * len(requests)
    position = 0

    async def worker(call: Any) -> None:
        nonlocal position
        while position < len(requests):
            index = position
            position += 1
            started = time.perf_counter()
            try:
                replies[index] = await call(requests[index], timeout=10, metadata=metadata)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1  # type: ignore[attr-defined]
            latencies.append((time.perf_counter() - started) * 1000)

    try:
        for channel in channels:
            await channel.channel_ready()
        wall_start = time.perf_counter()
        await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(in_flight)))
        wall = time.perf_counter() - wall_start
    finally:
        for channel in channels:
            await channel.close()
    latencies.sort()
    return {
        "req_per_s": round(len(requests) / wall, 1),
        "wall_seconds": round(wall, 3),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "codes": dict(codes),
        "replies": replies,
    }


def grpc_load(
    front_door: str, api_key: str, method: str, requests: list[bytes], in_flight: int
) -> dict[str, Any]:
    return asyncio.run(_grpc_load(front_door, api_key, method, requests, in_flight))


def respond_requests(invoke_replies: list[bytes | None]) -> list[bytes]:
    """A Respond per contact, taking its first offer."""
    requests = []
    for raw in invoke_replies:
        assert raw is not None
        reply = predictor_pb2.InvokeResponse.FromString(raw)
        respond = predictor_pb2.RespondRequest(
            uuid=reply.uuid, accepted_offers=[reply.final_result[0].result.offer]
        )
        requests.append(respond.SerializeToString())
    return requests


class _CountingConnection(redis.asyncio.Connection):
    """Counts what this client sends: writes to the socket (round trips) and commands."""

    writes = 0
    commands = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        _CountingConnection.writes += 1
        _CountingConnection.commands += _commands_in(command)
        await super().send_packed_command(command, check_health)


def _commands_in(packed: Any) -> int:
    """How many commands a write holds: its top-level RESP arrays (each `*N`, then N bulk strings)."""
    data = packed if isinstance(packed, bytes | str) else b"".join(packed)
    data = data.encode() if isinstance(data, str) else data
    position = count = 0
    while position < len(data):
        end = data.index(b"\r\n", position)
        arguments = int(data[position + 1 : end])
        position = end + 2
        for _ in range(arguments):
            end = data.index(b"\r\n", position)
            position = end + 2 + int(data[position + 1 : end]) + 2
        count += 1
    return count


async def _redis_traffic(redis_url: str, spec_text: str, customers: int, contacts: int) -> dict[str, Any]:
    """The real DecisionEngine in this process, over the stack's Redis, as a replica runs it
    (statistics kept 100 ms): round trips and commands per Invoke and per Respond, one at a time."""
    from libs.common.deployment_spec import deployment_spec_from_mapping
    from services.predictor.core.decision import DecisionEngine, InvokeInput, RespondInput
    from services.predictor.core.engine_simulation import applied_config
    from services.predictor.core.options_store import OptionsStore
    from services.predictor.settings import PredictorSettings

    client = redis.asyncio.Redis.from_url(redis_url, connection_class=_CountingConnection)
    max_age = PredictorSettings.model_fields["statistics_max_age_ms"].default / 1000
    engine = DecisionEngine(OptionsStore(client, statistics_max_age=max_age), "bench-traffic")
    config = applied_config(deployment_spec_from_mapping(yaml.safe_load(spec_text)))
    try:
        await client.ping()
        decisions = []
        counted = _CountingConnection
        writes, commands = counted.writes, counted.commands
        for index in range(contacts):
            request = InvokeInput(
                campaign=CAMPAIGN,
                subcampaign="",
                channel="",
                customer=customer_id(index % customers),
                userid="",
                numberoffers=3,
                params={"channel": "app"},
                in_param=None,
            )
            decisions.append(await engine.invoke(request, config))
            await asyncio.sleep(0.002)  # requests spaced as at 500 req/s: kept statistics age
        invoke = (counted.writes - writes, counted.commands - commands)
        writes, commands = counted.writes, counted.commands
        for decision in decisions:
            outcome = await engine.respond(RespondInput(decision.uuid, [decision.offers[0].offer.id]), config)
            assert outcome.learned, outcome
        respond = (counted.writes - writes, counted.commands - commands)
    finally:
        await client.aclose()
    return {
        "contacts": contacts,
        "invoke_round_trips": round(invoke[0] / contacts, 2),
        "invoke_commands": round(invoke[1] / contacts, 2),
        "respond_round_trips": round(respond[0] / contacts, 2),
        "respond_commands": round(respond[1] / contacts, 2),
    }


# Profiling -----------------------------------------------------------------------------------------

# A sample counts for a bucket when every `all_of` pattern matches some frame of its stack, no
# `none_of` pattern does, and `leaf` (when given) matches the innermost frame. py-spy names a frame "Class.function (path/below/site-packages/or/cwd.py:line)".
HANDLER = r"^PredictorServicer\.(Invoke|Respond|Ping) \("
PROFILE_BUCKETS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str], ...] = (
    ("the RPC handler (servicer.Invoke / Respond / Ping), inclusive", (HANDLER,), (), ""),
    ("  DecisionEngine.invoke", (r"^DecisionEngine\.invoke \(",), (), ""),
    (
        "    Redis calls outside pipelines (feature HGETALL, generation GET)",
        (r"^DecisionEngine\.invoke \(", r"^Redis\.execute_command \("),
        (r"^OptionsStore\.read_statistics \(", r"^DecisionEngine\._record_contact \("),
        "",
    ),
    (
        "    OptionsStore.read_statistics (arm statistics HGETALL, or the kept copy, decayed)",
        (r"^OptionsStore\.read_statistics \(",),
        (),
        "",
    ),
    (
        "      ArmFields.read + ArmFields.at (parse once, decay per Invoke)",
        (r"^ArmFields\.(read|at) \(",),
        (),
        "",
    ),
    ("    ThompsonScorer._score", (r"^ThompsonScorer\._score \(",), (), ""),
    (
        "      numpy draws in _score itself (the pool's 32 fresh rows a call)",
        (),
        (),
        r"^ThompsonScorer\._score \(",
    ),
    ("    rank (explore/exploit, top-k, exact propensities)", (r"^rank \(",), (), ""),
    ("    derive_context + eligibility rules", (r"^(derive_context|rule_holds) \(",), (), ""),
    ("    _record_contact (contact write pipeline)", (r"^DecisionEngine\._record_contact \(",), (), ""),
    (
        "      SCRIPT EXISTS before the pipeline (redis-py load_scripts)",
        (r"^Pipeline\.load_scripts \(",),
        (),
        "",
    ),
    ("  servicer._invoke_response (reply message)", (r"^PredictorServicer\._invoke_response \(",), (), ""),
    (
        "  servicer._value (MessageToDict of Value fields)",
        (r"^_value \(services/predictor/servicer\.py",),
        (),
        "",
    ),
    ("  DecisionEngine.respond", (r"^DecisionEngine\.respond \(",), (), ""),
    (
        "    the answer in Python: offer matching, learning and the log entry, queued (when the script leaves it)",
        (r"^DecisionEngine\.respond\.<locals>\.answer \(",),
        (),
        "",
    ),
    (
        "    OptionsStore.answer_contact (the script that reads and answers the contact, batched)",
        (r"^OptionsStore\.answer_contact \(",),
        (),
        "",
    ),
    ("redis-py, all of it (commands, pipelines, reply parsing)", (r"\(redis/",), (), ""),
    ("  RESP reply parsing in pure Python (no hiredis)", (r"\(redis/_parsers/",), (), ""),
    (
        "  socket writes (asyncio transport write; StreamWriter.writelines under uvloop)",
        (r"^(_SelectorSocketTransport\.write|StreamWriter\.writelines) \(",),
        (),
        "",
    ),
    (
        "interceptors outside the handler (telemetry, auth, errors)",
        (r"\(libs/common/interceptors\.py",),
        (HANDLER,),
        "",
    ),
    ("prometheus_client", (r"\(prometheus_client/",), (), ""),
)
# Self time of asyncio's Handle._run is native work run from the event loop that has no Python
# frame: grpc.aio's Cython core (HTTP/2, message (de)serialization, call setup) and C task steps.
# Under uvloop the loop itself is native too: its self time shows under Runner.run.
NATIVE_UNDER_LOOP = r"^(Handle\._run|Runner\.run) \("


PROFILE_RATE_HZ = 250


@contextlib.contextmanager
def replica_profile(pid: int, metrics_port: int, method: str, out: Path) -> Iterator[dict[str, Any]]:
    """py-spy record (raw collapsed stacks) of one replica while the block runs; the dict it yields
    then holds the summary, the requests of `method` that replica answered meanwhile and its busy ms
    per request (or why it was skipped)."""
    result: dict[str, Any] = {}
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        result["skipped"] = "py-spy is not installed (pip install py-spy into the venv)"
        yield result
        return
    raw = out / f"py-spy-{method}.txt"
    counts_before = rpc_counts(metrics_port)
    spy = subprocess.Popen(
        [
            *(py_spy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE_HZ)),
            *("--format", "raw", "--nonblocking", "--output", str(raw)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield result
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it recorded and exits
        _, error = spy.communicate(timeout=60)
    counts_after = rpc_counts(metrics_port)
    if spy.returncode != 0 or not raw.exists():
        result["skipped"] = f"py-spy failed: {error.strip()[-500:]}"
        return
    result.update(summarize_profile(raw.read_text()))
    key = (f"PredictorService/{method}", "OK")
    handled = int(counts_after.get(key, 0.0) - counts_before.get(key, 0.0))
    result["requests_on_this_replica"] = handled
    if handled and result.get("samples"):
        # Busy time per request, approximately: py-spy takes PROFILE_RATE_HZ samples per busy second.
        result["busy_ms_per_request"] = round(1000 * result["samples"] / PROFILE_RATE_HZ / handled, 3)


def profile_replica(
    pid: int,
    metrics_port: int,
    method: str,
    url: str,
    body: Path,
    level: Level,
    seconds: float,
    api_key: str,
    out: Path,
) -> dict[str, Any]:
    """The replica's profile while h2load sends `method` through Envoy for `seconds`."""
    with replica_profile(pid, metrics_port, method, out) as profile:
        subprocess.run(
            h2load_argv(url, body, level, for_seconds(seconds), api_key, None),
            capture_output=True,
            check=False,
        )
    return profile


def summarize_profile(collapsed: str) -> dict[str, Any]:
    stacks: list[tuple[list[str], int]] = []
    for line in collapsed.splitlines():
        stack, _, weight = line.rpartition(" ")
        if stack and weight.isdigit():
            stacks.append((stack.split(";"), int(weight)))
    total = sum(count for _, count in stacks)
    if total == 0:
        return {"samples": 0}
    buckets = {}
    for label, all_of, none_of, leaf in PROFILE_BUCKETS:
        wanted = [re.compile(pattern) for pattern in all_of]
        unwanted = [re.compile(pattern) for pattern in none_of]
        innermost = re.compile(leaf) if leaf else None
        hit = sum(
            count
            for frames, count in stacks
            if all(any(regex.search(frame) for frame in frames) for regex in wanted)
            and not any(regex.search(frame) for regex in unwanted for frame in frames)
            and (innermost is None or innermost.search(frames[-1]))
        )
        buckets[label] = round(100 * hit / total, 1)
    native = re.compile(NATIVE_UNDER_LOOP)
    buckets["native work under the event loop (grpc.aio Cython core, C task steps, uvloop): self time"] = (
        round(100 * sum(count for frames, count in stacks if native.search(frames[-1])) / total, 1)
    )
    leaves: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        leaves[frames[-1]] += count
    return {
        "samples": total,
        "inclusive_percent": buckets,
        "top_self_percent": {name: round(100 * count / total, 1) for name, count in leaves.most_common(15)},
    }


# The benchmark -------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    settings = stack_settings(work / "state")
    levels = [
        Level("1 in flight", 1, 1),
        Level(f"{args.clients * args.streams} in flight", args.clients, args.streams),
    ]
    report: dict[str, Any] = {}
    with running_stack(settings) as record, bare_front_door(settings, work) as bare:
        credentials = load_credentials(settings.state_dir)
        assert credentials is not None
        invoke_key = credentials.invoke_key
        front_door = f"127.0.0.1:{settings.envoy_port}"
        base_url = f"http://{front_door}{SERVICE_PATH}"
        bare_door = f"127.0.0.1:{bare.envoy_port}"
        bare_url = f"http://{bare_door}{SERVICE_PATH}Ping"
        redis_url = stack_redis_url(settings, credentials)

        print(f"writing features for {args.customers} customers", flush=True)
        write_features(redis_url, args.customers)
        revision = publish(
            f"127.0.0.1:{settings.config_port}", credentials.admin_key, deployment_spec(args.offers)
        )
        print(f"published revision {revision}; waiting for both replicas", flush=True)
        replicas = [f"127.0.0.1:{port}" for port in settings.predictor_ports]
        for target in replicas:
            if not wait_until(lambda t=target: _safe_revision(t, invoke_key) >= revision, 60, 0.2):
                raise RuntimeError(f"replica {target} did not apply revision {revision}")

        customers = [customer_id((index * 3331 + 17) % args.customers) for index in range(args.rounds)]
        bodies: dict[str, Path] = {"Ping": work / "ping.bin"}
        bodies["Ping"].write_bytes(grpc_frame(predictor_pb2.PingRequest().SerializeToString()))
        for customer in customers:
            path = work / f"invoke-{customer}.bin"
            path.write_bytes(grpc_frame(invoke_request(customer).SerializeToString()))
            bodies[customer] = path

        verification: dict[str, Any] = {}
        for key, path in bodies.items():
            method = "Ping" if key == "Ping" else "Invoke"
            message = path.read_bytes()[5:]
            checks = [verify_with_python(front_door, invoke_key, method, message) for _ in range(2)]
            verification[key] = {
                "python_client": checks,
                "nghttp": verify_with_nghttp(base_url + method, path, invoke_key),
            }
            bad = [
                c
                for c in checks
                if c["grpc_status"] != "OK"
                or c.get("warnings")
                or (method == "Invoke" and len(c["offers"]) != 3)
            ]
            nghttp = verification[key]["nghttp"]
            if bad or ("skipped" not in nghttp and nghttp.get("grpc_status") != 0):
                raise RuntimeError(f"verification failed for {key}: {json.dumps(verification[key])}")
        verification["bare"] = verify_with_python(
            bare_door, invoke_key, "Ping", bodies["Ping"].read_bytes()[5:]
        )
        if verification["bare"]["grpc_status"] != "OK":
            raise RuntimeError(f"the bare servers did not answer Ping: {verification['bare']}")
        print("verified: grpc-status 0 for every body (Python client and nghttp)", flush=True)
        verification["negative_control"] = negative_control(
            base_url, bodies["Ping"], settings.predictor_metrics_ports
        )
        print(f"negative control (wrong API key): {verification['negative_control']}", flush=True)

        processes = observed_processes(record) + [
            Observed(name, psutil.Process(process.pid)) for name, process in bare.processes
        ]

        def url_of(method: str) -> str:
            return bare_url if method == "Bare" else base_url + method

        def body_of(method: str, customer: str) -> Path:
            return bodies[customer] if method == "Invoke" else bodies["Ping"]

        memory_before = memory(processes)
        redis_before = redis_usage(redis_url)
        invokes_before = sum(
            rpc_counts(port)[("PredictorService/Invoke", "OK")] for port in settings.predictor_metrics_ports
        )

        # Warm-up, not recorded: each RPC at each level for a fixed time. Its rate sizes the measured
        # runs, which are bounded by a request count: a run stopped by time cancels the requests
        # still in flight, and those would blur the exact count of gRPC statuses.
        warm_up_rates: dict[tuple[str, str], float] = {}
        for level in levels:
            for method in METHODS:
                body = body_of(method, customers[0])
                completed = subprocess.run(
                    h2load_argv(url_of(method), body, level, for_seconds(args.warm_up), invoke_key, None),
                    capture_output=True,
                    text=True,
                    check=True,
                )
                warm_up_rates[(method, level.name)] = parse_h2load(completed.stdout)["req_per_s"]
        if args.pace > 0:
            # Both RPCs at the same offered rate, a share of Invoke's capacity: latency when not saturated.
            rate = max(1, round(args.pace * warm_up_rates[("Invoke", levels[1].name)]))
            levels.append(Level(f"paced {rate} req/s", 1, levels[1].in_flight, paced_rate=rate))
        time.sleep(1.0)  # requests cancelled at the end of the warm-up finish before counting starts
        print(
            f"warm-up done: {', '.join(f'{m} {name} {r:.0f} req/s' for (m, name), r in warm_up_rates.items())}",
            flush=True,
        )

        runs = []
        log_file = work / "h2load.log"
        metrics_ports = settings.predictor_metrics_ports
        for round_index, customer in enumerate(customers):
            # Alternate which RPC goes first, so neither always runs on a warmer (or busier) machine.
            shift = round_index % len(METHODS)
            order = METHODS[shift:] + METHODS[:shift]
            for level in levels:
                for method in order:
                    body = body_of(method, customer)
                    log_file.unlink(missing_ok=True)  # h2load appends
                    rate = level.paced_rate or warm_up_rates[(method, level.name)]
                    requests = max(100, round(rate * args.duration))
                    argv = h2load_argv(
                        url_of(method), body, level, for_requests(requests), invoke_key, log_file
                    )
                    counts_before = [rpc_counts(port) for port in metrics_ports]
                    envoy_admin = bare.envoy_admin_port if method == "Bare" else settings.envoy_admin_port
                    envoy_before = envoy_stats(envoy_admin)
                    cpu_before = cpu_seconds(processes)
                    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    wall_start = time.perf_counter()
                    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
                    wall = time.perf_counter() - wall_start
                    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu_after = cpu_seconds(processes)
                    envoy_after = envoy_stats(envoy_admin)
                    counts_after = [rpc_counts(port) for port in metrics_ports]
                    if completed.returncode != 0:
                        raise RuntimeError(
                            f"h2load failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
                        )
                    parsed = parse_h2load(completed.stdout)
                    latency, non_200 = log_latencies(log_file)
                    rpc_name = f"PredictorService/{method}"
                    per_replica = []
                    codes: collections.Counter[str] = collections.Counter()
                    for before, after in zip(counts_before, counts_after, strict=True):
                        replica_codes = {
                            code: int(after[(m, code)] - before.get((m, code), 0.0))
                            for (m, code) in after
                            if m == rpc_name and after[(m, code)] - before.get((m, code), 0.0) > 0
                        }
                        per_replica.append(replica_codes)
                        codes.update(replica_codes)
                    h2load_cpu = (children_after.ru_utime + children_after.ru_stime) - (
                        children_before.ru_utime + children_before.ru_stime
                    )
                    cores = {
                        name: round((cpu_after[name] - cpu_before[name]) / wall, 3)
                        for name in cpu_after
                        if name in cpu_before
                    }
                    cores["h2load"] = round(h2load_cpu / wall, 3)
                    done = parsed.get("requests", {}).get("done", 0)
                    succeeded = parsed.get("requests", {}).get("succeeded", 0)
                    if method == "Bare":
                        # No metrics on the bare servers: HTTP 200 for every request, and the
                        # Python client's grpc-status OK before the load.
                        codes = collections.Counter({"OK (HTTP 200; not counted by the server)": succeeded})
                        every_ok = succeeded == requests == parsed.get("http_status", {}).get("2xx")
                    else:
                        every_ok = codes.get("OK", 0) == succeeded == requests and len(codes) == 1
                    run = {
                        "round": round_index + 1,
                        "rpc": method,
                        "level": level.name,
                        "clients": level.clients,
                        "streams": level.streams,
                        "customer": customer if method == "Invoke" else None,
                        "command": shown(argv, invoke_key),
                        "h2load": parsed,
                        "latency_ms": latency,
                        "log_rows_not_200": non_200,
                        "server_grpc_codes": dict(codes),
                        "server_grpc_codes_per_replica": per_replica,
                        # Every request h2load counted as a success got grpc-status OK from a replica.
                        "every_request_grpc_ok": every_ok,
                        "envoy_upstream": {
                            k: envoy_after.get(k, 0) - envoy_before.get(k, 0) for k in envoy_after
                        },
                        "cpu_cores": cores,
                        "wall_seconds": round(wall, 2),
                        "load_average_1m_after": round(os.getloadavg()[0], 2),
                        "cpu_ms_per_request": {
                            name: round(1000 * value * wall / done, 3) for name, value in cores.items()
                        }
                        if done
                        else {},
                        "memory_after": memory(processes),
                    }
                    runs.append(run)
                    print(
                        f"round {round_index + 1} {method:6s} {level.name:13s} "
                        f"{parsed.get('req_per_s', 0):8.0f} req/s  p50 {latency['p50']:.2f} ms  "
                        f"p99 {latency['p99']:.2f} ms  grpc codes {dict(codes)}",
                        flush=True,
                    )
        # Respond, with a grpc.aio client (each Respond needs its own uuid, which h2load cannot
        # send), against Ping and the bare server with the same client.
        client_runs = []
        respond_profiles: list[dict[str, Any]] = []
        busy = levels[1]
        count = max(200, round(warm_up_rates[("Invoke", busy.name)] * args.duration))
        for round_index in range(args.rounds):
            invoke_bodies = [
                invoke_request(customer_id((round_index * count + i) % args.customers)).SerializeToString()
                for i in range(count)
            ]
            contacts = grpc_load(front_door, invoke_key, "Invoke", invoke_bodies, busy.in_flight)
            if contacts["codes"] != {"OK": count}:
                raise RuntimeError(f"Invokes for the Respond run failed: {contacts['codes']}")
            responds = respond_requests(contacts["replies"])
            ping = predictor_pb2.PingRequest().SerializeToString()
            targets = {
                "Respond": (front_door, "Respond", responds),
                "Ping": (front_door, "Ping", [ping] * count),
                "Bare": (bare_door, "Ping", [ping] * count),
            }
            order = list(targets)
            order = order[round_index % 3 :] + order[: round_index % 3]
            for name in order:
                door, method, requests_sent = targets[name]
                cpu_before = cpu_seconds(processes)
                result = grpc_load(door, invoke_key, method, requests_sent, busy.in_flight)
                cpu_after = cpu_seconds(processes)
                server = "bare-" if name == "Bare" else "predictor"
                replies = result.pop("replies")
                learned = (
                    sum(predictor_pb2.RespondResponse.FromString(raw).learned for raw in replies if raw)
                    if name == "Respond"
                    else None
                )
                row = {
                    "round": round_index + 1,
                    "rpc": name,
                    "requests": count,
                    **result,
                    "learned": learned,
                    "server_cpu_ms_per_request": round(
                        1000
                        * sum(
                            cpu_after[k] - cpu_before[k]
                            for k in cpu_after
                            if k.startswith(server) and k in cpu_before
                        )
                        / count,
                        3,
                    ),
                }
                client_runs.append(row)
                print(
                    f"round {round_index + 1} grpc.aio client {name:8s} {row['req_per_s']:8.0f} req/s  "
                    f"p50 {row['p50_ms']:.2f} ms  codes {row['codes']}"
                    + (f"  learned {learned}" if learned is not None else ""),
                    flush=True,
                )
        report["grpc_client_runs"] = client_runs
        if args.profile:
            # Unrecorded: a replica under Respond load, with fresh contacts to answer.
            print("profiling predictor-1 under Respond load (py-spy, grpc.aio client)", flush=True)
            contacts = grpc_load(front_door, invoke_key, "Invoke", invoke_bodies, busy.in_flight)
            pid = next(p.process.pid for p in processes if p.name == "predictor-1")
            with replica_profile(
                pid, settings.predictor_metrics_ports[0], "Respond", work
            ) as respond_profile:
                grpc_load(
                    front_door, invoke_key, "Respond", respond_requests(contacts["replies"]), busy.in_flight
                )
            respond_profiles.append(respond_profile)
        print("counting Redis round trips and commands per Invoke and per Respond", flush=True)
        report["redis_traffic"] = asyncio.run(
            _redis_traffic(redis_url, deployment_spec(args.offers), args.customers, contacts=300)
        )
        print(f"redis traffic: {report['redis_traffic']}", flush=True)

        memory_after = memory(processes)
        redis_after = redis_usage(redis_url)
        invokes = int(
            sum(
                rpc_counts(port)[("PredictorService/Invoke", "OK")]
                for port in settings.predictor_metrics_ports
            )
            - invokes_before
        )
        report["runs"] = runs
        report["verification"] = verification
        report["memory"] = {"before_load": memory_before, "after_load": memory_after}
        report["redis"] = {
            "before_load": redis_before,
            "after_load": redis_after,
            "invokes_between": invokes,
            "bytes_per_invoke": round((redis_after["used_memory"] - redis_before["used_memory"]) / invokes)
            if invokes
            else None,
        }
        report["deployment"] = {
            "offers": args.offers,
            "algorithm": "thompson (half_life 7 d), exploration_epsilon 0.05",
            "context_variables": ["gender (feature, customers view)", "channel (param)"],
            "feature_lookup": f"{FEATURE_VIEW} ({args.customers} customers written to Redis hashes)",
            "eligibility": "every fifth offer: channel in [app, web]",
            "request": "campaign, customer, numberoffers 3, params {channel: app}",
            "customers_per_round": customers,
        }
        if args.profile:
            pid = next(p.process.pid for p in processes if p.name == "predictor-1")
            report["profile"] = {
                "setup": (
                    f"py-spy record --rate {PROFILE_RATE_HZ} --format raw --nonblocking on predictor-1 while "
                    f"h2load sends the RPC at {levels[1].name} (-c{levels[1].clients} -m{levels[1].streams}) for "
                    f"{args.profile_seconds:g} s; shares are of the samples in which the replica was busy (py-spy "
                    f"leaves idle samples out); ms per request = share x busy samples / {PROFILE_RATE_HZ} Hz / "
                    "requests that replica answered (approximate: sampling costs the replica some time too)"
                )
            }
            if respond_profiles:
                report["profile"]["Respond"] = respond_profiles[0]
            for method in ("Invoke", "Ping"):
                print(f"profiling predictor-1 under {method} load (py-spy)", flush=True)
                report["profile"][method] = profile_replica(
                    pid,
                    settings.predictor_metrics_ports[0],
                    method,
                    base_url + method,
                    bodies["Ping"] if method == "Ping" else bodies[customers[0]],
                    levels[1],
                    args.profile_seconds,
                    invoke_key,
                    work,
                )
        report["levels"] = [level.__dict__ | {"in_flight": level.in_flight} for level in levels]
    return report


def _safe_revision(target: str, invoke_key: str) -> int:
    try:
        return replica_revision(target, invoke_key)
    except grpc.RpcError:
        return -1


def _server_prefix(method: str) -> str:
    return "bare-" if method == "Bare" else "predictor"


def _envoy_name(method: str) -> str:
    return "envoy-bare" if method == "Bare" else "envoy"


def _per_round_ratio(runs: list[dict[str, Any]], level: str, over: str, under: str) -> dict[str, Any]:
    ratios = []
    for round_number in sorted({r["round"] for r in runs}):
        pair = {
            r["rpc"]: r["h2load"]["req_per_s"]
            for r in runs
            if r["round"] == round_number and r["level"] == level
        }
        ratios.append(round(pair[over] / pair[under], 3))
    return {"per_round": ratios, "median": round(statistics.median(ratios), 3)}


def summarize(report: dict[str, Any], levels: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    runs = report["runs"]
    for method in METHODS:
        summary[method] = {}
        server, envoy = _server_prefix(method), _envoy_name(method)
        for level in levels:
            rows = [r for r in runs if r["rpc"] == method and r["level"] == level["name"]]
            summary[method][level["name"]] = {
                "req_per_s": round(statistics.median(r["h2load"]["req_per_s"] for r in rows), 1),
                "p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in rows), 3),
                "p99_ms": round(statistics.median(r["latency_ms"]["p99"] for r in rows), 3),
                "max_ms": round(max(r["latency_ms"]["max"] for r in rows), 3),
                "envoy_cores": round(statistics.median(r["cpu_cores"].get(envoy, 0) for r in rows), 3),
                "predictor_cores": round(
                    statistics.median(
                        sum(v for k, v in r["cpu_cores"].items() if k.startswith(server)) for r in rows
                    ),
                    3,
                ),
                "redis_cores": round(statistics.median(r["cpu_cores"].get("redis", 0) for r in rows), 3),
                "predictor_cpu_ms_per_request": round(
                    statistics.median(
                        sum(v for k, v in r["cpu_ms_per_request"].items() if k.startswith(server))
                        for r in rows
                    ),
                    3,
                ),
                "envoy_cpu_ms_per_request": round(
                    statistics.median(r["cpu_ms_per_request"].get(envoy, 0) for r in rows), 4
                ),
                "cpu_ms_per_request_by_process": {
                    name: round(statistics.median(r["cpu_ms_per_request"].get(name, 0.0) for r in rows), 3)
                    for name in rows[0]["cpu_ms_per_request"]
                },
                "grpc_non_ok": sum(
                    v for r in rows for code, v in r["server_grpc_codes"].items() if not code.startswith("OK")
                ),
                "every_request_grpc_ok": all(r["every_request_grpc_ok"] for r in rows),
                "grpc_ok": sum(
                    v for r in rows for code, v in r["server_grpc_codes"].items() if code.startswith("OK")
                ),
                "per_round_req_per_s": [r["h2load"]["req_per_s"] for r in rows],
            }
    busy = levels[1]["name"]
    summary["invoke_over_bare_throughput"] = _per_round_ratio(runs, busy, "Invoke", "Bare")
    summary["ping_over_bare_throughput"] = _per_round_ratio(runs, busy, "Ping", "Bare")
    summary["invoke_over_ping_throughput"] = _per_round_ratio(runs, busy, "Invoke", "Ping")
    client_runs = report.get("grpc_client_runs", [])
    if client_runs:
        client: dict[str, Any] = {}
        for name in ("Respond", "Ping", "Bare"):
            rows = [r for r in client_runs if r["rpc"] == name]
            client[name] = {
                "req_per_s": round(statistics.median(r["req_per_s"] for r in rows), 1),
                "p50_ms": round(statistics.median(r["p50_ms"] for r in rows), 3),
                "p99_ms": round(statistics.median(r["p99_ms"] for r in rows), 3),
                "server_cpu_ms_per_request": round(
                    statistics.median(r["server_cpu_ms_per_request"] for r in rows), 3
                ),
                "non_ok": sum(v for r in rows for code, v in r["codes"].items() if code != "OK"),
                "learned": sum(r["learned"] or 0 for r in rows) if name == "Respond" else None,
                "requests": sum(r["requests"] for r in rows),
            }
        ratios = []
        for round_number in sorted({r["round"] for r in client_runs}):
            pair = {r["rpc"]: r["req_per_s"] for r in client_runs if r["round"] == round_number}
            ratios.append(round(pair["Respond"] / pair["Ping"], 3))
        client["respond_over_ping_throughput"] = {
            "per_round": ratios,
            "median": round(statistics.median(ratios), 3),
        }
        summary["grpc_client"] = client
    return summary


def goals(report: dict[str, Any], levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = report["summary"]
    calm, busy = levels[0]["name"], levels[1]["name"]
    invoke_ratio = summary["invoke_over_bare_throughput"]["median"]
    ping_ratio = summary["ping_over_bare_throughput"]["median"]
    p50 = summary["Invoke"][calm]["p50_ms"]
    non_ok = sum(summary[m][level["name"]]["grpc_non_ok"] for m in METHODS for level in levels)
    exact = all(summary[m][level["name"]]["every_request_grpc_ok"] for m in METHODS for level in levels)
    replicas = {k: v for k, v in report["memory"]["after_load"].items() if k.startswith("predictor")}
    rows = [
        {
            "goal": f"Invoke throughput >= 0.3 of the bare grpc.aio server's (same Envoy, {busy})",
            "value": f"{invoke_ratio:.2f}",
            "met": invoke_ratio >= 0.3,
        },
        {"goal": "Invoke p50 <= 1.0 ms with 1 in flight", "value": f"{p50:.2f} ms", "met": p50 <= 1.0},
        {
            "goal": f"Ping throughput >= 0.9 of the bare server's ({busy})",
            "value": f"{ping_ratio:.2f}",
            "met": ping_ratio >= 0.9,
        },
    ]
    client = summary.get("grpc_client")
    if client:
        ratio = client["respond_over_ping_throughput"]["median"]
        rows.append(
            {
                "goal": "Respond throughput >= 0.6 of Ping's, same grpc.aio client",
                "value": f"{ratio:.2f}",
                "met": ratio >= 0.6,
            }
        )
    traffic = report.get("redis_traffic")
    if traffic:
        rows.append(
            {
                "goal": "Respond: one Redis round trip",
                "value": f"{traffic['respond_round_trips']} round trips, {traffic['respond_commands']} commands",
                "met": traffic["respond_round_trips"] <= 1.0,
            }
        )
    rows += [
        {
            "goal": "memory per replica reported",
            "value": ", ".join(f"{k} {v['rss_mib']} MiB RSS" for k, v in replicas.items()),
            "met": bool(replicas),
        },
        {
            "goal": "every request answered with grpc-status OK (replica counters = h2load's count)",
            "value": f"{non_ok} non-OK" + ("" if exact else "; counts differ in some run"),
            "met": non_ok == 0 and exact and (not client or client["Respond"]["non_ok"] == 0),
        },
    ]
    return rows


def code_version() -> dict[str, Any]:
    """The commit measured, and which files differed from it (others may be editing the tree)."""

    def git(*argv: str) -> str:
        completed = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, check=False)
        return completed.stdout

    changed = [
        line[3:] for line in git("status", "--porcelain", "--", "services", "libs").splitlines() if line
    ]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_changes_in": changed}


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    h2load_version = subprocess.run(
        ["h2load", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "h2load": h2load_version,
        "grpcio": grpc.__version__,
    }


def _ms_per_request(share: float, part: dict[str, Any]) -> str:
    busy = part.get("busy_ms_per_request")
    return f"{share / 100 * busy:.3f}" if busy else "n/a"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    summary, levels = report["summary"], report["levels"]
    calm, busy = levels[0], levels[1]
    machine = report["machine"]
    lines = [
        "# Invoke throughput and latency through Envoy, against Ping",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['when']}  ",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, shared with other work "
        f"(load average {machine['load_average_at_start']} at start, {machine['load_average_at_end']} at end); Python {machine['python']}, grpcio {machine['grpcio']}, "
        f"{machine['h2load']}.  ",
        f"Code: commit {report['code']['commit']}"
        + (
            f", with uncommitted changes in {len(report['code']['uncommitted_changes_in'])} files under services/ and "
            "libs/ (listed in the JSON)."
            if report["code"]["uncommitted_changes_in"]
            else "."
        ),
        "",
        "Stack: `libs.stack.launcher.up` on free ports (Redis, config, 2 predictor replicas, ingest, trainer, monitor, "
        "Envoy `--concurrency 1`, round robin). Deployment: "
        f"{report['deployment']['offers']} offers, {report['deployment']['algorithm']}, context "
        f"{' and '.join(report['deployment']['context_variables'])}, feature lookup {report['deployment']['feature_lookup']}, "
        f"{report['deployment']['eligibility']}; every Invoke logs the contact (arm update Lua script, contact hash, "
        f"decision stream XADD). Request: {report['deployment']['request']}.",
        "",
        f"Load: h2load through Envoy, {calm['name']} = `-c{calm['clients']} -m{calm['streams']}`, {busy['name']} = "
        f"`-c{busy['clients']} -m{busy['streams']}` ({busy['clients']} HTTP/2 connections x {busy['streams']} streams)"
        + (
            f", {levels[2]['name']} = one connection, up to {levels[2]['streams']} streams, requests sent on a fixed "
            f"schedule (`--timing-script-file`, open loop; both RPCs at the same offered rate, "
            f"{report['settings']['pace']:g} of Invoke's warm-up throughput at {busy['name']}: latency when the "
            "replicas are not saturated); "
            if len(levels) > 2
            else "; "
        )
        + f"first an unrecorded {report['settings']['warm_up']:g} s warm-up (`-D`) per RPC and level, whose rate sets each "
        f"measured run's request count (`-n`, about {report['settings']['duration']:g} s; a run cut by time would cancel the "
        f"requests in flight and blur the gRPC status count); {report['settings']['rounds']} rounds, "
        "Ping and Invoke alternating (which goes first alternates too); medians of the rounds. h2load repeats one body, so "
        "each round's Invoke uses another customer. Percentiles from h2load's per-request `--log-file`. gRPC success is "
        "counted from the replicas' `liveloop_rpc_requests_total` by status code (HTTP 200 alone proves nothing).",
        "",
        "Baseline (Bare): two bare grpc.aio servers (bench/bare_grpc_server.py: Ping's contract, no interceptors, no "
        "metrics) behind a second Envoy built by the same code as the stack's (its predictor cluster pointing at them), "
        "measured in the same rounds; its CPU columns are the bare servers' and that Envoy's.",
        "",
        "| RPC | load | req/s (median) | p50 ms | p99 ms | max ms | predictor cores | Envoy cores | Redis cores "
        "| predictor CPU ms/req | Envoy CPU ms/req | gRPC OK | non-OK |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for level in levels:
            row = summary[method][level["name"]]
            lines.append(
                f"| {'bare grpc.aio Ping' if method == 'Bare' else method} | {level['name']} | {row['req_per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
                f"| {row['max_ms']:.1f} | {row['predictor_cores']:.2f} | {row['envoy_cores']:.2f} | {row['redis_cores']:.2f} "
                f"| {row['predictor_cpu_ms_per_request']:.3f} | {row['envoy_cpu_ms_per_request']:.4f} | {row['grpc_ok']} "
                f"| {row['grpc_non_ok']} |"
            )
    lines.append("")
    for key, label in (
        ("invoke_over_bare_throughput", "Invoke / bare server"),
        ("ping_over_bare_throughput", "Ping / bare server"),
        ("invoke_over_ping_throughput", "Invoke / Ping"),
    ):
        ratio = summary[key]
        lines.append(
            f"{label}, throughput at {busy['name']}: per round {ratio['per_round']}, median **{ratio['median']:.2f}**.  "
        )
    lines += [
        "",
        "Per round (req/s at "
        + busy["name"]
        + "): "
        + "; ".join(f"{m} {summary[m][busy['name']]['per_round_req_per_s']}" for m in METHODS)
        + ".",
        "",
        "CPU ms per request by process at "
        + busy["name"]
        + " (medians): "
        + "; ".join(
            f"{m}: "
            + ", ".join(
                f"{name} {value:.3f}"
                for name, value in summary[m][busy["name"]]["cpu_ms_per_request_by_process"].items()
                if value >= 0.001
            )
            for m in METHODS
        )
        + ".",
        "",
        *_client_section(report),
        "## Memory per process (MiB)",
        "",
        "| process | RSS before load | RSS after load | USS after load |",
        "|---|---|---|---|",
    ]
    for name, after in report["memory"]["after_load"].items():
        before = report["memory"]["before_load"].get(name, {})
        lines.append(f"| {name} | {before.get('rss_mib', '')} | {after['rss_mib']} | {after['uss_mib']} |")
    checks = report["verification"]
    control = checks.get("negative_control", {})
    bodies = [key for key in checks if key != "negative_control"]
    lines += [
        "",
        f"Checks before the load: for each of the {len(bodies)} request bodies (Ping and one Invoke per round), two "
        "calls with grpcio sending the exact message bytes and one with `nghttp -v` got grpc-status 0 (Invoke: 3 offers, "
        "no warnings, so the customer's features were found). Negative control, 20 Pings with a wrong API key: h2load "
        f"counted {control.get('h2load_requests', {}).get('succeeded')} of them as succeeded, the replicas answered "
        f"{control.get('replica_grpc_codes')}, nghttp saw HTTP {control.get('nghttp', {}).get('http_status')} with "
        f"grpc-status {control.get('nghttp', {}).get('grpc_status')}. Every measured run also checks that the replicas "
        "counted exactly h2load's number of requests, all OK (`every_request_grpc_ok` in the JSON).",
    ]
    usage = report["redis"]
    lines += [
        "",
        f"Redis: used_memory {usage['before_load']['used_memory'] / 2**20:.1f} MiB before the load, "
        f"{usage['after_load']['used_memory'] / 2**20:.1f} MiB after {usage['invokes_between']} Invokes "
        f"({usage['after_load']['contacts']} contact hashes, {usage['after_load']['decision_stream']} decision stream "
        f"entries): about {usage['bytes_per_invoke']} bytes per Invoke (MEMORY USAGE: "
        f"{usage['after_load'].get('bytes_per_contact')} bytes per contact hash, "
        f"{usage['after_load'].get('bytes_per_stream_entry')} per stream entry). Contacts live max(2 x reward window, "
        "24 h), so at 1,000 Invoke/s and a 1-day window they hold about 173 million contacts; the stream is capped at "
        "1 million entries.",
    ]
    lines += ["", "## Goals", "", "| goal | value | met |", "|---|---|---|"]
    for goal in report["goals"]:
        lines.append(f"| {goal['goal']} | {goal['value']} | {'yes' if goal['met'] else '**no**'} |")
    ping_busy = summary["Ping"][busy["name"]]
    lines += [
        "",
        f"With {busy['in_flight']} requests kept in flight, mean latency = {busy['in_flight']} / throughput (Little's "
        f"law): even Ping, which does nothing, reaches {ping_busy['req_per_s']:.0f} req/s with p50 "
        f"{ping_busy['p50_ms']:.1f} ms and p99 {ping_busy['p99_ms']:.1f} ms on this machine. The paced rows show "
        "latency below saturation.",
    ]
    profile = report.get("profile")
    if profile:
        lines += ["", "## Where a replica's time goes (py-spy)", "", profile["setup"] + "."]
        parts = {method: profile[method] for method in ("Invoke", "Respond", "Ping") if method in profile}
        for method, part in parts.items():
            if not part.get("samples"):
                lines += ["", f"{method}: profile skipped: {part.get('skipped')}"]
        parts = {method: part for method, part in parts.items() if part.get("samples")}
        if parts:
            lines += [
                "",
                " ".join(
                    f"{method}: {part['samples']} busy samples, {part.get('requests_on_this_replica')} requests "
                    f"on this replica, about {part.get('busy_ms_per_request', 'n/a')} busy ms per request."
                    for method, part in parts.items()
                ),
                "",
                "| where (stack contains) | " + " | ".join(f"{m} % | {m} ms/req" for m in parts) + " |",
                "|---|" + "---|---|" * len(parts),
            ]
            labels = list(
                dict.fromkeys(label for part in parts.values() for label in part["inclusive_percent"])
            )
            for label in labels:
                cells = []
                for part in parts.values():
                    share = part["inclusive_percent"].get(label, 0.0)
                    cells += [str(share), _ms_per_request(share, part)]
                lines.append(f"| {label.replace('  ', '&nbsp;&nbsp;')} | " + " | ".join(cells) + " |")
            for method, part in parts.items():
                lines += ["", f"| {method}: top self time (leaf frame) | % |", "|---|---|"]
                lines += [f"| `{name}` | {value} |" for name, value in part["top_self_percent"].items()]
    if report.get("findings"):
        lines += ["", "## Findings", ""] + [f"- {item}" for item in report["findings"]]
    path.write_text("\n".join(lines) + "\n")


def _client_section(report: dict[str, Any]) -> list[str]:
    client = report["summary"].get("grpc_client")
    if not client:
        return []
    traffic = report.get("redis_traffic", {})
    ratio = client["respond_over_ping_throughput"]
    lines = [
        "## Respond, with a grpc.aio client",
        "",
        f"h2load repeats one body and Respond needs a distinct uuid each, so a grpc.aio client in the benchmark's "
        f"process sends Respond, Ping and the bare server's Ping ({GRPC_CLIENT_CHANNELS} channels, the busy level's "
        "requests in flight, the same count each; first that many Invokes make the contacts, each Respond takes the "
        "first offer of one). The client shares the machine's 2 CPUs with the servers, so its rates are lower than "
        "h2load's; the ratio between RPCs with the same client is what counts.",
        "",
        "| RPC | req/s (median) | p50 ms | p99 ms | server CPU ms/req | non-OK | learned |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("Bare", "Ping", "Respond"):
        row = client[name]
        learned = "" if row["learned"] is None else f"{row['learned']} of {row['requests']}"
        lines.append(
            f"| {'bare grpc.aio Ping' if name == 'Bare' else name} | {row['req_per_s']:.0f} | {row['p50_ms']:.2f} "
            f"| {row['p99_ms']:.2f} | {row['server_cpu_ms_per_request']:.3f} | {row['non_ok']} "
            f"| {learned} |"
        )
    lines += [
        "",
        f"Respond / Ping throughput: per round {ratio['per_round']}, median **{ratio['median']:.2f}**.",
        "",
    ]
    if traffic:
        lines += [
            f"Redis traffic, counted in a client of the real DecisionEngine run in the benchmark's process over the "
            f"stack's Redis ({traffic['contacts']} Invokes 2 ms apart, statistics kept as a replica keeps them, then a "
            f"Respond to each): **{traffic['invoke_round_trips']} round trips and {traffic['invoke_commands']} commands "
            f"per Invoke, {traffic['respond_round_trips']} round trips and {traffic['respond_commands']} commands per "
            "Respond** (a round trip is a write to the socket; commands as sent, a script counting once).",
            "",
        ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="about how long each measured run lasts (sets its -n)"
    )
    parser.add_argument(
        "--warm-up", type=float, default=4.0, help="seconds of the unrecorded warm-up per RPC and level"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--pace", type=float, default=0.5, help="paced level at this share of Invoke's capacity (0: none)"
    )
    parser.add_argument("--clients", type=int, default=10, help="connections of the busy level")
    parser.add_argument("--streams", type=int, default=5, help="streams per connection of the busy level")
    parser.add_argument("--offers", type=int, default=50)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--profile", action="store_true", help="py-spy one replica under Invoke load")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument(
        "--findings", type=Path, help="a text file of findings (one per line) to add to the report"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--from-json",
        type=Path,
        help="run nothing: rewrite the .md from this recorded JSON (with --findings, replace its findings)",
    )
    args = parser.parse_args()

    if args.from_json is not None:
        recorded = json.loads(args.from_json.read_text())
        if args.findings is not None:
            recorded["findings"] = [
                line.strip() for line in args.findings.read_text().splitlines() if line.strip()
            ]
            args.from_json.write_text(json.dumps(recorded, indent=2) + "\n")
        write_markdown(recorded, args.from_json.with_suffix(".md"))
        return 0

    missing = [tool for tool in ("h2load",) if shutil.which(tool) is None]
    if missing:
        print(
            f"{', '.join(missing)} is not installed. It comes with Debian's nghttp2-client; install it with:\n"
            f"  {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2

    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "Invoke vs Ping throughput and latency through Envoy, 2 predictor replicas, h2load",
        "command": "python bench/invoke_throughput.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine_facts(),
        "code": code_version(),
        "settings": {
            "duration": args.duration,
            "warm_up": args.warm_up,
            "pace": args.pace,
            "rounds": args.rounds,
        },
    }
    with tempfile.TemporaryDirectory(prefix="liveloop-bench-invoke-") as work:
        report |= run_benchmark(args, Path(work))
    report["seconds"] = round(time.time() - started, 1)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["summary"] = summarize(report, report["levels"])
    report["goals"] = goals(report, report["levels"])
    if args.findings is not None:
        report["findings"] = [line.strip() for line in args.findings.read_text().splitlines() if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "invoke_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "invoke_throughput.md")
    print(json.dumps({"summary": report["summary"], "goals": report["goals"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
