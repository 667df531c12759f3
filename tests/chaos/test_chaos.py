"""Chaos on a whole local stack under legitimate load (issue 13): a replica SIGKILLed and SIGTERMed,
Redis restarted and killed, the config service killed, the monitor killed while the log grows. Each asserts a
bound on failed requests (zero through Envoy for the replica cases), that no acknowledged response
was lost or learned twice, and that every process is healthy afterwards (the supervisor starts
killed ones again). Figures go to $LIVELOOP_CHAOS_REPORT (JSON lines) when set: bench/chaos.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from libs.common import decision_log, redis_keys
from libs.common.client import open_blocking_channel
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from libs.stack.launcher import is_healthy
from libs.stack.processes import wait_until
from tests.chaos.load import Load, LoadFigures, running_load
from tests.chaos.report import report
from tests.e2e.conftest import LocalStack, local_stack, started

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

WARM_CYCLES = 100  # cycles before the fault, and again after recovery, before the load stops
RECOVERY_SECONDS = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with started(local_stack(tmp_path_factory.mktemp("chaos") / "state")) as running:
        yield running


def _deployment(stack: LocalStack, tmp_path: Path) -> str:
    """A fresh deployment (four offers, Thompson sampling) for one scenario, published live."""
    name = f"chaos-{uuid.uuid4().hex[:8]}"
    document = {
        "name": name,
        "campaigns": [name],
        "offers": [{"id": f"offer-{i}", "name": f"Offer {i}", "price": 10.0 + i} for i in range(4)],
        "context_variables": [{"name": "channel", "source": "param", "default": "app"}],
        "algorithm": {"approach": "thompson"},
        "reward": {"window_seconds": 3600},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    published = stack.cli("config", "publish", str(path), "--no-diff")
    assert published.returncode == 0, published.stderr
    waited = stack.cli("config", "status", "--wait-for-head", "30")
    assert waited.returncode == 0, waited.stdout
    return name


def _process(stack: LocalStack, name: str) -> dict[str, object]:
    return next(p for p in stack.record()["processes"] if p["name"] == name)


def _all_healthy(stack: LocalStack) -> bool:
    status = stack.cli("status", "--json")
    rows = json.loads(status.stdout)["processes"]
    return status.returncode == 0 and all(is_healthy(row) for row in rows)


def _under_load(stack: LocalStack, deployment: str, fault: Callable[[], None]) -> LoadFigures:
    """Load runs; after WARM_CYCLES the fault; once every process is healthy again (the supervisor
    restarts what died) and WARM_CYCLES more cycles are done, the load stops."""
    with running_load(stack.front_door, stack.credentials()["invoke"], deployment) as load:
        _wait_cycles(load, WARM_CYCLES)
        fault()
        assert wait_until(lambda: _all_healthy(stack), timeout=RECOVERY_SECONDS, interval=0.5)
        _wait_cycles(load, load.cycles + WARM_CYCLES)
    return load.figures


def _wait_cycles(load: Load, cycles: int) -> None:
    assert wait_until(lambda: load.cycles >= cycles, timeout=RECOVERY_SECONDS), (
        f"the load did {load.cycles} cycles, not {cycles}: {load.figures.summary()}"
    )


def _learned_exactly_once(stack: LocalStack, deployment: str, figures: LoadFigures) -> None:
    """Every acknowledged response is in the log once as learned and counted once in the arms."""
    assert figures.unanswered == [], "a response was never acknowledged"
    client = redis.Redis.from_url(stack.redis_url)
    try:
        records = [
            decision_log.decode_entry(fields) for _id, fields in client.xrange(redis_keys.DECISION_STREAM)
        ]
        learned = Counter(
            r.uuid
            for r in records
            if isinstance(r, decision_log.Response) and r.deployment == deployment and r.learned
        )
        successes = 0.0
        for key in client.scan_iter(match=f"{redis_keys.arm_statistics(deployment, '*', '*')}"):
            successes += sum(float(v) for k, v in client.hgetall(key).items() if k.endswith(b"|s"))
    finally:
        client.close()
    assert {uuid_: count for uuid_, count in learned.items() if count > 1} == {}, "learned twice"
    assert set(figures.answered) <= set(learned), "an acknowledged response was not learned"
    assert successes == len(learned) == len(figures.answered)


def _failures(figures: LoadFigures) -> str:
    """The failures first: pytest shortens a long message."""
    summary = figures.summary()
    return f"failures {summary.pop('failures')}; {summary}"


def _report(scenario: str, figures: LoadFigures, **extra: object) -> None:
    report(scenario, {**figures.summary(), **extra})


def _kill(stack: LocalStack, name: str, signal_number: int = signal.SIGKILL) -> Callable[[], None]:
    def fault() -> None:
        os.kill(int(_process(stack, name)["pid"]), signal_number)  # type: ignore[call-overload]

    return fault


def test_a_replica_killed_under_load_fails_no_request(stack: LocalStack, tmp_path: Path) -> None:
    deployment = _deployment(stack, tmp_path)
    before = _process(stack, "predictor-1")
    figures = _under_load(stack, deployment, _kill(stack, "predictor-1"))
    _report("predictor-1 SIGKILL", figures)
    assert (figures.failed_invokes, figures.failed_responds) == (0, 0), _failures(figures)
    _learned_exactly_once(stack, deployment, figures)
    after = _process(stack, "predictor-1")
    assert after["pid"] != before["pid"]
    assert after["restarts"] == before["restarts"] + 1  # type: ignore[operator]


def test_a_replica_restarted_gracefully_under_load_fails_no_request(
    stack: LocalStack, tmp_path: Path
) -> None:
    deployment = _deployment(stack, tmp_path)

    def graceful() -> None:
        result = stack.cli("restart", "predictor-2", "--json")
        assert result.returncode == 0, result.stderr

    figures = _under_load(stack, deployment, graceful)
    _report("predictor-2 SIGTERM (liveloop restart)", figures)
    assert (figures.failed_invokes, figures.failed_responds) == (0, 0), _failures(figures)
    _learned_exactly_once(stack, deployment, figures)


def test_redis_restarted_under_load_loses_no_acknowledged_response(stack: LocalStack, tmp_path: Path) -> None:
    deployment = _deployment(stack, tmp_path)
    outage: dict[str, float] = {}

    def restart_redis() -> None:
        began = time.monotonic()
        result = stack.cli("restart", "redis", "--json")
        assert result.returncode == 0, result.stderr
        outage["seconds"] = round(time.monotonic() - began, 2)

    figures = _under_load(stack, deployment, restart_redis)
    _report("Redis restarted (SIGTERM, AOF)", figures, **{"restart_seconds": outage["seconds"]})
    # Calls fail while Redis is down (each after Envoy's retries): bounded by the outage, a small
    # share of the run; none after, and no acknowledged response is lost.
    total = figures.invokes.total()
    assert figures.failed_invokes <= 0.1 * total, _failures(figures)
    _learned_exactly_once(stack, deployment, figures)


def test_redis_killed_under_load_loses_no_acknowledged_response(stack: LocalStack, tmp_path: Path) -> None:
    """A crash of the Redis process (SIGKILL): Redis writes its append-only file before it answers,
    so what it acknowledged is in the kernel's hands and survives the process (a crash of the whole
    machine can lose up to the last second: appendfsync everysec)."""
    deployment = _deployment(stack, tmp_path)
    figures = _under_load(stack, deployment, _kill(stack, "redis"))
    _report("Redis SIGKILL", figures)
    assert figures.failed_invokes <= 0.1 * figures.invokes.total(), _failures(figures)
    _learned_exactly_once(stack, deployment, figures)


def test_the_config_service_killed_under_load_fails_no_request_and_replicas_follow_it_back(
    stack: LocalStack, tmp_path: Path
) -> None:
    deployment = _deployment(stack, tmp_path)
    figures = _under_load(stack, deployment, _kill(stack, "config"))
    _report("config SIGKILL", figures)
    # Replicas serve their last configuration while the config service is away.
    assert (figures.failed_invokes, figures.failed_responds) == (0, 0), _failures(figures)
    _learned_exactly_once(stack, deployment, figures)
    # ...and follow it again: a publish after the restart reaches every replica.
    _deployment(stack, tmp_path)


def test_the_monitor_killed_while_the_log_grows_counts_every_decision_once(
    stack: LocalStack, tmp_path: Path
) -> None:
    deployment = _deployment(stack, tmp_path)
    figures = _under_load(stack, deployment, _kill(stack, "monitor"))
    _report("monitor SIGKILL", figures)
    assert (figures.failed_invokes, figures.failed_responds) == (0, 0), _failures(figures)
    _learned_exactly_once(stack, deployment, figures)
    contacts = figures.invokes["OK"]
    with open_blocking_channel(
        stack.front_door, api_key=stack.credentials()["admin"], deadline_seconds=10
    ) as channel:
        monitor = monitor_pb2_grpc.MonitorServiceStub(channel)

        def summarised() -> bool:
            summary = monitor.GetSummary(monitor_pb2.GetSummaryRequest(deployment=deployment))
            return (summary.invocations, summary.responses) == (contacts, len(figures.answered))

        assert wait_until(summarised, timeout=60, interval=0.5)
        # Exactly once: the counts stay there (nothing consumed twice arrives later).
        summary = monitor.GetSummary(monitor_pb2.GetSummaryRequest(deployment=deployment))
        assert (summary.invocations, summary.responses) == (contacts, len(figures.answered))
