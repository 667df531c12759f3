"""ListAlerts over gRPC on the real monitor server: a rule of the configured rules file fires on
decisions the monitor consumed and is listed with its id, rule, labels and severity; a bad rules
file stops the monitor at start, naming the line."""

from __future__ import annotations

import time
import uuid as uuid_module
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.errors import InvalidArgument
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.server import build_server as build_monitor
from tests.conftest import ApiKeys
from tests.decision_records import contact
from tests.grpc.conftest import SERVICES_UNDER_TEST, channel
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RULES = """\
rules:
  - name: too_much_exploring
    kind: explore_share
    severity: critical
    window: 1h
    max_share: 0.5
    min_impressions: 20
"""


async def test_a_rule_fires_on_consumed_decisions_and_is_listed(
    tmp_path: Path, api_keys: ApiKeys, redis_url: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    settings = SERVICES_UNDER_TEST["monitor"].settings(
        tmp_path, api_keys, redis_url, alert_rules_file=rules, alert_interval_seconds=0.2
    )
    running = await build_monitor(settings)
    redis = Redis.from_url(redis_url)
    deployment = f"explorer-{uuid_module.uuid4().hex[:8]}"
    try:
        async with channel(running, api_keys.admin) as open_:
            monitor = monitor_pb2_grpc.MonitorServiceStub(open_)
            for i in range(30):  # every impression explored
                record = contact(deployment, time=time.time() - 30 + i, shown=("alpha",), explored=(True,))
                entry: Any = record.encode()
                await redis.xadd(redis_keys.DECISION_STREAM, entry)

            async def firing() -> monitor_pb2.ListAlertsResponse | None:
                reply = await monitor.ListAlerts(monitor_pb2.ListAlertsRequest(deployment=deployment))
                return reply if reply.alerts else None

            reply = await eventually(firing, within=20, what="the explore share alert firing")
            (alert,) = reply.alerts
            assert alert.rule == "too_much_exploring"
            assert alert.deployment == deployment
            assert alert.severity == monitor_pb2.SEVERITY_CRITICAL
            assert alert.state == monitor_pb2.ALERT_STATE_FIRING
            assert alert.value == pytest.approx(1.0)
            assert alert.threshold == pytest.approx(0.5)
            assert len(alert.id) == 16
            assert reply.page.total_size == 1
            again = await monitor.ListAlerts(monitor_pb2.ListAlertsRequest(deployment=deployment))
            assert [a.id for a in again.alerts] == [alert.id]  # stable while it keeps firing
            other = await monitor.ListAlerts(monitor_pb2.ListAlertsRequest(deployment="someone-else"))
            assert not other.alerts
    finally:
        await redis.aclose()
        await running.stop()


async def test_a_bad_rules_file_stops_the_monitor_naming_the_line(tmp_path: Path, api_keys: ApiKeys) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES + "  - name: nonsense\n    kind: no_such_rule\n    severity: warning\n")
    settings = SERVICES_UNDER_TEST["monitor"].settings(tmp_path, api_keys, None, alert_rules_file=rules)
    with pytest.raises(InvalidArgument, match="line 9: rule 'nonsense': unknown kind"):
        await build_monitor(settings)
