"""The local stack end to end: real Redis, five services, two predictor replicas, real Envoy."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import urllib.request

import grpc
import psutil
import pytest

from libs.common.client import open_blocking_channel
from libs.common.health_check import grpc_health
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack import topology
from libs.stack.launcher import is_healthy
from libs.stack.processes import wait_until
from tests.e2e.conftest import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]


def _ping_replicas(stack: LocalStack, calls: int) -> list[str]:
    key = stack.credentials()["invoke"]
    with open_blocking_channel(stack.front_door, api_key=key, deadline_seconds=5) as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        return [stub.Ping(predictor_pb2.PingRequest()).replica_id for _ in range(calls)]


def test_up_status_routing_failover_and_down(running_stack: LocalStack) -> None:
    stack = running_stack
    status = stack.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    names = {row["name"] for row in report["processes"]}
    assert names == {
        "redis",
        "config",
        "predictor-1",
        "predictor-2",
        "ingest",
        "trainer",
        "monitor",
        "envoy",
        "supervisor",
    }
    assert all(is_healthy(row) for row in report["processes"]), report
    assert all(row["envoy"] == "healthy" for row in report["processes"] if row["kind"] == "service")

    # What the stack writes is the user's alone: the state directory 0700, every file in it 0600.
    assert stat.S_IMODE(stack.state_dir.stat().st_mode) == 0o700
    exposed = [
        str(path)
        for path in stack.state_dir.rglob("*")
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077
    ]
    assert exposed == []

    # Every service answers its health check through the front door.
    for service in topology.SERVICES:
        pin = ((topology.SERVICE_HEADER, service.name),)
        assert grpc_health(stack.front_door, service.health_service, timeout=3, metadata=pin) == "SERVING"

    # Consecutive calls through Envoy reach both replicas.
    replicas = _ping_replicas(stack, 20)
    assert set(replicas) == {"predictor-1", "predictor-2"}, replicas

    # REST through the transcoder answers with the ecosystem.Ai-style snake_case names.
    request = urllib.request.Request(
        f"http://{stack.front_door}/ping", headers={"x-api-key": stack.credentials()["invoke"]}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = json.loads(response.read())
    assert body["replica_id"] in {"predictor-1", "predictor-2"}

    # Kill one replica hard: calls keep succeeding, and the supervisor starts it again.
    victim = next(p for p in stack.record()["processes"] if p["name"] == "predictor-1")
    os.kill(victim["pid"], signal.SIGKILL)
    assert len(_ping_replicas(stack, 40)) == 40

    def predictor_1_is_back() -> bool:
        rows = {row["name"]: row for row in json.loads(stack.cli("status", "--json").stdout)["processes"]}
        row = rows["predictor-1"]
        return row["pid"] != victim["pid"] and row["health"] == "SERVING" and row["envoy"] == "healthy"

    assert wait_until(predictor_1_is_back, timeout=60)
    restarted = stack.cli("status", "--json")
    assert restarted.returncode == 0, restarted.stdout
    rows = {row["name"]: row for row in json.loads(restarted.stdout)["processes"]}
    assert rows["predictor-1"]["restarts"] == 1
    assert rows["predictor-2"]["restarts"] == 0
    assert set(_ping_replicas(stack, 20)) == {"predictor-1", "predictor-2"}
    supervisor_log = (stack.state_dir / "logs" / "supervisor.log").read_text()
    assert f"predictor-1 (pid {victim['pid']}) exited" in supervisor_log

    # `liveloop restart` stops one gracefully and returns once it is healthy again.
    before = rows["predictor-2"]["pid"]
    result = stack.cli("restart", "predictor-2", "--json")
    assert result.returncode == 0, result.stderr
    restart = json.loads(result.stdout)
    assert restart["old_pid"] == before
    assert restart["pid"] != before
    assert restart["restarts"] == 1
    assert (
        grpc_health(f"127.0.0.1:{rows['predictor-2']['port']}", topology.PREDICTOR.health_service)
        == "SERVING"
    )
    # A restart asked for is no crash: logged as such, and not slowed by the crash back-off.
    supervisor_log = (stack.state_dir / "logs" / "supervisor.log").read_text()
    assert f"predictor-2 (pid {before}) stopped by `liveloop restart`" in supervisor_log
    unknown = stack.cli("restart", "predictor-9")
    assert unknown.returncode != 0
    assert "no process 'predictor-9'" in unknown.stderr + unknown.stdout

    # Down stops every recorded process and frees the ports.
    pids = [p["pid"] for p in stack.record()["processes"]]
    down = stack.cli("down", "--json")
    assert down.returncode == 0, down.stderr
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (stack.state_dir / "stack.json").exists()
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", stack.envoy_port))


def test_api_keys_are_enforced_through_envoy(running_stack: LocalStack) -> None:
    stack = running_stack
    with (
        open_blocking_channel(stack.front_door, deadline_seconds=5) as channel,
        pytest.raises(grpc.RpcError) as missing,
    ):
        predictor_pb2_grpc.PredictorServiceStub(channel).Ping(predictor_pb2.PingRequest())
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    invoke = stack.credentials()["invoke"]
    with (
        open_blocking_channel(stack.front_door, api_key=invoke, deadline_seconds=5) as channel,
        pytest.raises(grpc.RpcError) as denied,
    ):
        config_pb2_grpc.ConfigServiceStub(channel).Publish(config_pb2.PublishRequest())
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_taken_port_is_a_clear_error_and_nothing_is_left_running(stack_config: LocalStack) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", stack_config.envoy_port))
        squatter.listen()
        result = stack_config.cli("up")
    assert result.returncode != 0
    assert str(stack_config.envoy_port) in result.stderr
    assert not (stack_config.state_dir / "stack.json").exists()


def test_down_without_a_stack_says_so(stack_config: LocalStack) -> None:
    result = stack_config.cli("down")
    assert result.returncode == 0
    assert "no stack" in result.stdout
