"""The publish gate: a deployment that requires evaluation refuses a candidate whose estimated
value (the monitor's EvaluatePolicy on decisions logged through real Invokes and Responds) is worse
than what the live revision earned, unless forced; the estimate is in the audit trail either way."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from libs.common.database import apply_migrations, create_database_engine
from libs.common.errors import FailedPrecondition
from libs.common.server import RunningServer
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.config.core.config_service import ConfigService
from services.config.core.store import ConfigStore
from services.config.monitor_client import MonitorServiceClient
from services.monitor.server import build_server as build_monitor
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, channel, target
from tests.integration.test_monitor_evaluation import DECISIONS, log_decisions, logging_spec
from tests.integration.test_predictor_decision import OFFERS, Loop, unique_name
from tests.integration.test_predictor_decision import loop as loop  # the fixture
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
async def monitor_server(
    loop: Loop, tmp_path: Path, api_keys: ApiKeys, redis_url: str
) -> AsyncIterator[RunningServer]:
    (tmp_path / "monitor").mkdir()
    settings = SERVICES_UNDER_TEST["monitor"].settings(
        tmp_path / "monitor",
        api_keys,
        redis_url,
        config_target=target(loop.config),
        config_api_key=api_keys.admin,
    )
    running = await build_monitor(settings)
    try:
        yield running
    finally:
        await running.stop()


def only(name: str, offer: str) -> str:
    document = logging_spec(name)
    document["plugins"] = [
        {
            "name": "exclude_offers",
            "stage": "pre_score",
            "params": {"offers": [o for o in OFFERS if o != offer]},
        }
    ]
    document["publish_gate"] = {"require_evaluation": True, "estimator": "dr"}
    return json.dumps(document)


async def test_a_gated_deployment_refuses_a_worse_candidate_unless_forced_and_records_the_estimate(
    loop: Loop, monitor_server: RunningServer, tmp_path: Path, api_keys: ApiKeys
) -> None:
    name = unique_name("gated")
    live = logging_spec(name)
    live["publish_gate"] = {"require_evaluation": True, "estimator": "dr"}
    await loop.publish(live)
    await log_decisions(loop, name)
    async with channel(monitor_server, api_keys.admin) as open_:
        monitor = monitor_pb2_grpc.MonitorServiceStub(open_)

        async def all_logged() -> bool:
            summary = await monitor.GetSummary(monitor_pb2.GetSummaryRequest(deployment=name))
            return summary.invocations == DECISIONS

        await eventually(all_logged, within=30, what="every decision consumed")

    # A second face on the same config store, whose evaluator is the monitor under test.
    engine = create_database_engine(f"sqlite:///{tmp_path / 'config.db'}")
    evaluator = MonitorServiceClient(target(monitor_server), api_keys.admin, 60)
    service = ConfigService(ConfigStore(engine), evaluator=evaluator)
    try:
        worse = only(name, "delta")  # take-up 0.05 against about 0.26 logged
        _, dry = await service.publish(
            spec_text=worse, spec_document=None, format="json", author="test", dry_run=True
        )
        assert dry is not None
        assert not dry.passed
        with pytest.raises(
            FailedPrecondition, match="publish gate refuses it: evaluation refused: dr"
        ) as refused:
            await service.publish(spec_text=worse, spec_document=None, format="json", author="test")
        assert "vs live" in refused.value.message
        forced, outcome = await service.publish(
            spec_text=worse, spec_document=None, format="json", author="test", message="we know", force=True
        )
        assert outcome is not None
        assert outcome.forced
        assert outcome.estimate is not None
        assert outcome.estimate.upper < outcome.estimate.live_value
        assert forced.stored is not None
        assert "forced past the gate: dr" in forced.stored.message
        assert forced.stored.message.startswith("we know | ")

        better, passed = await service.publish(
            spec_text=only(name, "alpha"), spec_document=None, format="json", author="test"
        )
        assert passed is not None
        assert passed.passed
        assert passed.estimate is not None
        assert passed.estimate.lower <= 0.6 <= passed.estimate.upper
        assert better.stored is not None
        assert "evaluation passed: dr" in better.stored.message
    finally:
        await evaluator.close()
        engine.dispose()


async def test_a_new_deployment_and_an_ungated_one_publish_without_a_monitor(tmp_path: Path) -> None:
    engine = create_database_engine(f"sqlite:///{tmp_path / 'config.db'}")
    apply_migrations(engine, "services.config.core.migrations", version_table="alembic_version_config")
    service = ConfigService(ConfigStore(engine), evaluator=None)
    try:
        name = unique_name("ungated")
        first, gate = await service.publish(
            spec_text=json.dumps(logging_spec(name)),
            spec_document=None,
            format="json",
            author="t",
            evaluate=True,
        )
        assert gate is not None
        assert gate.passed
        assert "new deployment" in gate.reason
        document = logging_spec(name)
        document["exploration_epsilon"] = 0.5
        second, gate = await service.publish(
            spec_text=json.dumps(document), spec_document=None, format="json", author="t"
        )
        assert gate is None  # not asked for, not required
        assert second.revision == first.revision + 1
        document["exploration_epsilon"] = 0.4
        _, gate = await service.publish(
            spec_text=json.dumps(document), spec_document=None, format="json", author="t", evaluate=True
        )
        assert gate is not None
        assert not gate.passed  # asked for, but no monitor: reported, not refused (not required)
        assert "no monitor" in gate.reason
    finally:
        engine.dispose()
