"""The alert engine on real Redis and real SQL (SQLite and PostgreSQL): decision-log records go
through the real consumer into the rollups, rules fire with stable ids and resolve; replicas from a
fake config service, drift from a fake drift source, RPC errors from a real metrics page, and
webhooks posted to a real local HTTP receiver that fails before it takes them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid as uuid_module
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from libs.common.database import apply_migrations, create_database_engine
from libs.common.decision_log import Contact, Response
from libs.common.errors import InvalidArgument, Unavailable
from libs.stack.processes import free_port
from services.monitor.core import schema
from services.monitor.core.alert_engine import AlertEngine, FeatureDrift
from services.monitor.core.alert_rules import WebhookReceiver, parse_rules
from services.monitor.core.alert_store import alert_id
from services.monitor.core.decision_archive import DecisionArchive
from services.monitor.core.decision_consumer import ConsumerOptions, DecisionLogConsumer
from services.monitor.core.monitor_service import ReplicaState
from services.monitor.core.rollup_store import RollupStore
from services.monitor.core.webhooks import ZERO_TIME, WebhookNotifier
from tests.decision_records import contact, response
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

T0 = 1_765_000_020.0  # the start of a minute; every record of these tests falls near it


@dataclass
class Rig:
    redis: Redis
    store: RollupStore
    consumer: DecisionLogConsumer
    stream: str
    deployment: str

    async def write(self, records: Sequence[Contact | Response]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                entry: Any = record.encode()
                pipe.xadd(self.stream, entry)
            await pipe.execute()

    async def consume(self) -> None:
        """Steps until a step finds nothing to do: everything written is in the rollups."""
        for _ in range(10_000):
            if await self.consumer.step() == 0:
                return
        raise AssertionError("the consumer never caught up")

    def alert_engine(self, rules_yaml: str, **options: Any) -> AlertEngine:
        return AlertEngine(parse_rules(rules_yaml), self.store, decision_log=self.consumer, **options)


@pytest.fixture
async def rig(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    engine = create_database_engine(database_url)
    apply_migrations(engine, schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE)
    redis = Redis.from_url(redis_url)
    suffix = uuid_module.uuid4().hex[:8]
    stream = f"test-decisions-{suffix}"
    store = RollupStore(engine)
    consumer = DecisionLogConsumer(
        redis,
        store,
        DecisionArchive(tmp_path / "decisions", retention_hours=24 * 365 * 30),
        ConsumerOptions(
            stream=stream, group="monitor", consumer="monitor-a", block_ms=20, check_every_seconds=0.0
        ),
    )
    try:
        yield Rig(redis, store, consumer, stream, f"deployment-{suffix}")
    finally:
        await redis.aclose()
        engine.dispose()


def firing_gauge(rule: str, severity: str) -> float | None:
    return REGISTRY.get_sample_value("liveloop_monitor_alerts_firing", {"rule": rule, "severity": severity})


def test_the_schema_module_matches_the_migrations(rig: Rig) -> None:
    with rig.store.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": schema.VERSION_TABLE}
        )
        assert compare_metadata(context, schema.metadata) == []


# -- uptake_drop -----------------------------------------------------------------------------------


def shown_and_taken(
    deployment: str, start: float, contacts: int, take_every: int, spacing: float
) -> list[Any]:
    """Contacts showing alpha and bravo; alpha taken by one in `take_every`, bravo by one in three."""
    records: list[Any] = []
    for i in range(contacts):
        shown = contact(deployment, time=start + i * spacing, shown=("alpha", "bravo"))
        records.append(shown)
        taken = [offer for offer, every in (("alpha", take_every), ("bravo", 3)) if i % every == 0]
        if taken:
            records.append(response(shown, taken))
    return records


UPTAKE_RULES = """
rules:
  - name: uptake-{suffix}
    kind: uptake_drop
    severity: critical
    recent_window: 10m
    baseline_window: 1h
    response_delay: 2m
    significance: 0.01
    min_relative_drop: 0.3
    min_impressions: 100
"""


async def test_an_uptake_collapse_fires_with_a_stable_id_and_resolves_when_it_recovers(rig: Rig) -> None:
    rule = f"uptake-{rig.deployment}"
    engine = rig.alert_engine(UPTAKE_RULES.format(suffix=rig.deployment))
    now = T0 + 30  # recent window [T0 - 720, T0 - 120), baseline the hour before it
    # Baseline: alpha taken 2 times in 5; recent: 1 in 10. bravo steady at 1 in 3 throughout.
    await rig.write(shown_and_taken(rig.deployment, T0 - 4200, 300, take_every=2, spacing=11.0))
    await rig.write(shown_and_taken(rig.deployment, T0 - 700, 200, take_every=10, spacing=2.8))
    await rig.consume()

    fired = (await engine.evaluate_once(now)).fired
    assert [(a.rule, a.deployment, a.labels, a.severity, a.state) for a in fired] == [
        (rule, rig.deployment, {"offer": "alpha"}, "critical", "firing")
    ]
    alert = fired[0]
    assert alert.id == alert_id(rule, rig.deployment, {"offer": "alpha"})
    assert alert.value == pytest.approx(0.8)  # 50% -> 10%
    assert alert.threshold == 0.3
    assert "offer alpha fell 80%" in alert.summary
    assert firing_gauge(rule, "critical") == 1

    again = await engine.evaluate_once(now + 30)
    assert (again.fired, again.resolved) == ([], [])
    alerts, next_token, total = await engine.list_alerts(deployment=rig.deployment)
    assert ([a.id for a in alerts], next_token, total) == ([alert.id], "", 1)
    assert alerts[0].started_at == now
    assert alerts[0].updated_at == now + 30

    # Recovery: the next ten minutes at the old uptake.
    await rig.write(shown_and_taken(rig.deployment, T0 + 490, 200, take_every=2, spacing=2.9))
    await rig.consume()
    later = T0 + 1230  # recent window [T0 + 480, T0 + 1080)
    resolved = (await engine.evaluate_once(later)).resolved
    assert [(a.id, a.state, a.resolved_at) for a in resolved] == [(alert.id, "resolved", later)]
    assert await engine.list_alerts(deployment=rig.deployment) == ([], "", 0)
    history, _, total = await engine.list_alerts(deployment=rig.deployment, include_resolved=True)
    assert [(a.id, a.state, a.started_at, a.resolved_at) for a in history] == [
        (alert.id, "resolved", now, later)
    ]
    assert firing_gauge(rule, "critical") == 0


# -- latency_burn_rate, no_traffic, explore_share ------------------------------------------------------


async def test_slow_invokes_burn_the_latency_budget_and_fire_at_the_severity_of_the_fastest_burn(
    rig: Rig,
) -> None:
    rule = f"latency-{rig.deployment}"
    engine = rig.alert_engine(
        f"""
rules:
  - name: {rule}
    kind: latency_burn_rate
    objective: 0.99
    threshold_seconds: 0.1
    min_calls: 20
"""
    )
    now = T0 + 3570
    fast = [contact(rig.deployment, time=T0 + i * 20, latency_ms=5.0) for i in range(150)]  # to T0 + 2980
    await rig.write(fast)
    await rig.consume()
    quiet = await engine.evaluate_once(now)
    assert quiet.fired == []
    slow = [contact(rig.deployment, time=now - 230 + i * 4, latency_ms=500.0) for i in range(50)]
    await rig.write(slow)
    await rig.consume()
    (alert,) = (await engine.evaluate_once(now + 5)).fired
    # 1h: 50 slow of 200 calls = 25% slow, 25x the 1% budget; 5m: all slow. Both pairs burn; the
    # 1h/5m pair at 14.4 is the critical one.
    assert (alert.rule, alert.severity, alert.labels) == (rule, "critical", {})
    assert alert.value == pytest.approx(25.0)
    assert alert.threshold == 14.4
    assert "25.0x too fast over 1h and 100.0x over 5m" in alert.summary
    # Ten minutes later the 5m window is clean again, but 30 minutes still burn at 6x: a warning.
    recovered = [contact(rig.deployment, time=now + 300 + i * 10, latency_ms=5.0) for i in range(30)]
    await rig.write(recovered)
    await rig.consume()
    calmer = await engine.evaluate_once(now + 600)
    assert [(a.id, a.severity) for a in calmer.changed_severity] == [(alert.id, "warning")]
    assert calmer.resolved == []
    # Half an hour of fast calls later, every window pair is clean: resolved.
    await rig.write([contact(rig.deployment, time=now + 1900 + i * 8, latency_ms=5.0) for i in range(60)])
    await rig.consume()
    assert [a.id for a in (await engine.evaluate_once(now + 2400)).resolved] == [alert.id]


async def test_a_deployment_gone_quiet_and_one_that_never_explores_fire(rig: Rig) -> None:
    engine = rig.alert_engine(
        """
rules:
  - name: quiet
    kind: no_traffic
    window: 10m
    baseline_window: 1h
  - name: explore
    kind: explore_share
    window: 1h
    min_share: 0.01
    max_share: 0.5
    min_impressions: 100
"""
    )
    await rig.write([contact(rig.deployment, time=T0 + i * 10, explored=(False, False)) for i in range(100)])
    await rig.consume()
    busy = await engine.evaluate_once(T0 + 1000)
    assert [(a.rule, a.deployment, a.value, a.threshold) for a in busy.fired] == [
        ("explore", rig.deployment, 0.0, 0.01)
    ]
    quiet = await engine.evaluate_once(T0 + 2200)  # the last Invoke was at T0 + 990
    assert [(a.rule, a.deployment) for a in quiet.fired] == [("quiet", rig.deployment)]
    assert "no Invoke" in quiet.fired[0].summary
    assert [a.rule for a in quiet.resolved] == []  # explore: the hour still holds 100 impressions


# -- decision log ---------------------------------------------------------------------------------


async def test_a_lagging_and_a_trimmed_decision_log_fire(rig: Rig) -> None:
    engine = rig.alert_engine(
        f"""
rules:
  - name: lag-{rig.deployment}
    kind: decision_log_lag
    max_lag: 5
  - name: trimmed-{rig.deployment}
    kind: decision_log_trimmed
"""
    )
    consumer = rig.consumer
    first = await engine.evaluate_once(T0)
    assert first.fired == []
    assert "lag" in engine.rule_errors[f"lag-{rig.deployment}"]  # not measured yet: undecided
    await consumer._ensure_group()
    await rig.write([contact(rig.deployment, time=T0 + i) for i in range(10)])
    await consumer.check_stream()
    assert consumer.state.lag == 10
    lagging = await engine.evaluate_once(T0 + 30)
    assert [(a.rule, a.value, a.threshold) for a in lagging.fired] == [(f"lag-{rig.deployment}", 10.0, 5.0)]

    await rig.redis.xtrim(rig.stream, maxlen=4, approximate=False)
    await rig.consume()
    assert rig.store.trimmed(rig.stream) == 6
    trimmed = await engine.evaluate_once(T0 + 60)
    assert [(a.rule, a.value, a.severity) for a in trimmed.fired] == [
        (f"trimmed-{rig.deployment}", 6.0, "warning")
    ]
    assert "6 decision log entries were trimmed" in trimmed.fired[0].summary
    assert [a.rule for a in trimmed.resolved] == [f"lag-{rig.deployment}"]  # caught up
    # Nothing trimmed since the last evaluation: resolved.
    assert [a.rule for a in (await engine.evaluate_once(T0 + 90)).resolved] == [f"trimmed-{rig.deployment}"]


# -- replicas ---------------------------------------------------------------------------------------


@dataclass
class FakeConfig:
    replicas: list[ReplicaState]
    heads: dict[str, int] = field(default_factory=dict)
    away: bool = False

    async def head_revision(self, deployment: str) -> int | None:
        if self.away:
            raise Unavailable("config service away")
        return self.heads.get(deployment)

    async def spec(self, deployment: str, revision: int) -> tuple[str, int] | None:
        return None

    async def replica_states(self) -> list[ReplicaState]:
        if self.away:
            raise Unavailable("config service away")
        return list(self.replicas)


def replica(name: str, deployment: str, **state: Any) -> ReplicaState:
    values: dict[str, Any] = {
        "replica_id": name,
        "applied_revision": 7,
        "last_nack_revision": 0,
        "last_nack_reason": "",
        "revisions_behind": 0,
        "connected": True,
        "staleness_seconds": 0.0,
        "deployments": [deployment],
    }
    values.update(state)
    return ReplicaState(**values)


REPLICA_RULES = """
rules:
  - name: stale
    kind: replica_stale
    min_revisions_behind: 2
    for: 2m
  - name: nack
    kind: replica_nack
    severity: critical
"""


async def test_stale_and_nacking_replicas_fire_after_their_wait_and_survive_an_unreachable_config(
    rig: Rig,
) -> None:
    d = rig.deployment
    config = FakeConfig(
        [
            replica("r-stale", d, applied_revision=5, revisions_behind=2, staleness_seconds=300.0),
            replica("r-one-behind", d, applied_revision=6, revisions_behind=1),
            replica("r-gone", d, applied_revision=1, revisions_behind=6, connected=False),
            replica("r-nack", d, applied_revision=5, last_nack_revision=7, last_nack_reason="plugin missing"),
            replica("r-old-nack", d, applied_revision=5, last_nack_revision=6, last_nack_reason="old"),
        ],
        heads={d: 7},
    )
    engine = rig.alert_engine(REPLICA_RULES, config=config)
    other_replica = rig.alert_engine(REPLICA_RULES, config=config)  # a second monitor on the same database

    first = await engine.evaluate_once(T0)
    assert [(a.rule, a.labels, a.severity, a.value) for a in first.fired] == [
        ("nack", {"replica": "r-nack"}, "critical", 7.0)
    ]
    assert "plugin missing" in first.fired[0].summary
    assert (await other_replica.evaluate_once(T0)).fired == []  # already firing: not fired nor sent twice
    assert (await engine.evaluate_once(T0 + 60)).fired == []  # stale for 1 minute of the 2
    stale = (await engine.evaluate_once(T0 + 120)).fired
    assert [(a.rule, a.labels, a.value, a.threshold) for a in stale] == [
        ("stale", {"replica": "r-stale"}, 2.0, 2.0)
    ]

    config.away = True
    away = await engine.evaluate_once(T0 + 150)
    assert (away.fired, away.resolved) == ([], [])  # unknown: neither fired nor resolved
    assert "config service away" in engine.rule_errors["stale"]
    alerts, _, total = await engine.list_alerts(deployment=d)
    assert (total, sorted(a.rule for a in alerts)) == (2, ["nack", "stale"])

    config.away = False
    config.replicas = [replica(r.replica_id, d) for r in config.replicas]  # every replica caught up
    back = await engine.evaluate_once(T0 + 180)
    assert sorted(a.rule for a in back.resolved) == ["nack", "stale"]
    assert engine.rule_errors == {}


async def test_alerts_are_listed_newest_first_in_pages_filtered_by_deployment_and_severity(rig: Rig) -> None:
    d = rig.deployment
    config = FakeConfig([replica(f"r{i}", d, revisions_behind=3) for i in range(5)], heads={d: 6})
    config.replicas.append(replica("elsewhere", "other-deployment", revisions_behind=3))
    engine = rig.alert_engine(
        "rules:\n  - {name: stale, kind: replica_stale}\n  - {name: nack, kind: replica_nack, severity: critical}\n",
        config=config,
    )
    await engine.evaluate_once(T0)
    config.replicas.append(replica("late", d, revisions_behind=3))
    config.replicas.append(replica("nacker", d, applied_revision=5, last_nack_revision=6))
    await engine.evaluate_once(T0 + 60)
    seen: list[str] = []
    token = ""
    while True:
        page, token, total = await engine.list_alerts(deployment=d, page_size=3, page_token=token)
        assert total == 7
        assert len(page) <= 3
        seen += [a.labels["replica"] for a in page]
        if not token:
            break
    # The two newest started together: then by id, descending.
    newest = sorted(
        [
            (alert_id("stale", d, {"replica": "late"}), "late"),
            (alert_id("nack", d, {"replica": "nacker"}), "nacker"),
        ],
        reverse=True,
    )
    assert seen[:2] == [name for _, name in newest]
    assert sorted(seen[2:]) == [f"r{i}" for i in range(5)]
    critical, _, total = await engine.list_alerts(deployment=d, min_severity="critical")
    assert ([a.labels["replica"] for a in critical], total) == (["nacker"], 1)
    everywhere, _, total = await engine.list_alerts()
    assert total == 8
    assert {a.deployment for a in everywhere} == {d, "other-deployment"}
    with pytest.raises(InvalidArgument) as bad_token:
        await engine.list_alerts(page_token="not-a-token")
    assert bad_token.value.field == "page.page_token"
    with pytest.raises(InvalidArgument):
        await engine.list_alerts(page_size=-1)


# -- drift -------------------------------------------------------------------------------------------


@dataclass
class FakeDrift:
    results: dict[str, list[FeatureDrift]]
    failing: bool = False
    calls: int = 0

    async def drift(self, deployment: str) -> list[FeatureDrift]:
        self.calls += 1
        if self.failing:
            raise OSError("archive unreadable")
        return list(self.results.get(deployment, []))


DRIFT_RULES = """
rules:
  - name: features
    kind: feature_drift
    deployments: [{deployment}]
  - name: score
    kind: score_drift
    severity: critical
    deployments: [{deployment}]
"""


async def test_feature_and_score_drift_fire_per_feature_at_the_drifts_severity(rig: Rig) -> None:
    d = rig.deployment
    drift = FakeDrift(
        {
            d: [
                FeatureDrift("age", 0.42, "critical"),
                FeatureDrift("region", 0.05, "ok"),
                FeatureDrift("tenure", 0.15, "warning"),
                FeatureDrift("score", 0.2, "warning"),  # below the score rule's severity
            ]
        }
    )
    engine = rig.alert_engine(DRIFT_RULES.format(deployment=d), drift=drift, resolved_retention_seconds=600)
    fired = (await engine.evaluate_once(T0)).fired
    assert sorted((a.rule, a.labels.get("feature"), a.severity, a.value) for a in fired) == [
        ("features", "age", "critical", 0.42),
        ("features", "tenure", "warning", 0.15),
    ]
    assert drift.calls == 1  # both rules share one call per deployment

    drift.results[d] = [FeatureDrift("age", 0.2, "warning"), FeatureDrift("score", 0.6, "critical")]
    changed = await engine.evaluate_once(T0 + 30)
    assert [(a.rule, a.labels, a.severity) for a in changed.fired] == [("score", {}, "critical")]
    assert [(a.labels["feature"], a.severity) for a in changed.changed_severity] == [("age", "warning")]
    assert [a.labels["feature"] for a in changed.resolved] == ["tenure"]

    drift.failing = True
    failing = await engine.evaluate_once(T0 + 60)
    assert (failing.fired, failing.resolved) == ([], [])
    assert "archive unreadable" in engine.rule_errors["features"]

    drift.failing = False
    drift.results[d] = []
    assert len((await engine.evaluate_once(T0 + 90)).resolved) == 2
    _, _, kept = await engine.list_alerts(deployment=d, include_resolved=True)
    assert kept == 3
    pruned = await engine.evaluate_once(T0 + 650)  # tenure resolved 620 s ago, the others 560 s ago
    assert pruned.deleted == 1
    _, _, kept = await engine.list_alerts(deployment=d, include_resolved=True)
    assert kept == 2


async def test_the_engine_evaluates_every_interval_until_cancelled(rig: Rig) -> None:
    d = rig.deployment
    drift = FakeDrift({d: [FeatureDrift("age", 0.42, "critical")]})
    engine = rig.alert_engine(DRIFT_RULES.format(deployment=d), drift=drift, interval_seconds=0.05)
    task = asyncio.create_task(engine.run())

    async def firing() -> list[Any]:
        return (await engine.list_alerts(deployment=d))[0]

    async def evaluated_again() -> bool:
        return drift.calls >= 3

    try:
        (alert,) = await eventually(firing, what="an alert fired by the loop")
        assert (alert.rule, alert.labels) == ("features", {"feature": "age"})
        await eventually(evaluated_again, what="later evaluations")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.cancelled()
    assert len(await firing()) == 1  # evaluated again and again, fired once


# -- error_rate from a real metrics page -----------------------------------------------------------


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def metrics_page(ok: int, internal: int, invalid: int) -> str:
    line = (
        'liveloop_rpc_requests_total{{service="predictor",method="PredictorService/Invoke",code="{}"}} {}\n'
    )
    return (
        "# TYPE liveloop_rpc_requests_total counter\n"
        + line.format("OK", float(ok))
        + line.format("INTERNAL", float(internal))
        + line.format("INVALID_ARGUMENT", float(invalid))
        + 'liveloop_rpc_requests_total{service="config",method="ConfigService/Get",code="INTERNAL"} 999.0\n'
    )


async def test_predictor_errors_fire_from_the_increase_between_scrapes(rig: Rig) -> None:
    page = {"text": metrics_page(1000, 0, 0)}

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page["text"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    nobody = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    with http_server(Metrics) as url:
        engine = rig.alert_engine(
            """
rules:
  - name: errors
    kind: error_rate
    window: 0
    max_error_share: 0.05
    min_requests: 100
""",
            metrics_urls=[f"{url}/metrics", nobody],
            scrape_timeout_seconds=2.0,
        )
        assert (await engine.evaluate_once(T0)).fired == []  # the first scrape is the reference
        assert "errors" not in engine.rule_errors
        # 200 more Invokes: 30 INTERNAL, 20 INVALID_ARGUMENT (a client error, not counted as failed).
        page["text"] = metrics_page(1150, 30, 20)
        (alert,) = (await engine.evaluate_once(T0 + 30)).fired
        assert (alert.deployment, alert.labels) == (
            "",
            {"instance": f"{url}/metrics", "service": "predictor"},
        )
        assert alert.value == pytest.approx(30 / 200)
        assert alert.threshold == 0.05
        assert "15.0% of 200 predictor RPCs" in alert.summary
        page["text"] = metrics_page(1350, 30, 20)  # 200 more, all fine
        assert [a.id for a in (await engine.evaluate_once(T0 + 60)).resolved] == [alert.id]


# -- webhooks ---------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A real HTTP receiver: answers the statuses in `answers` in turn, then 200; keeps every body."""

    answers: list[int]
    bodies: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.bodies.append((status, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        return Hook

    def taken(self) -> list[dict[str, Any]]:
        with self.lock:
            return [body for status, body in self.bodies if status == 200]


@contextlib.asynccontextmanager
async def sending(engine: AlertEngine) -> AsyncIterator[None]:
    task = asyncio.create_task(engine.notifier.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_webhooks_deliver_fired_and_resolved_alerts_in_alertmanagers_format_after_a_retry(
    rig: Rig,
) -> None:
    d = rig.deployment
    receiver = Receiver(answers=[500])
    drift = FakeDrift({d: [FeatureDrift("age", 0.42, "critical")]})
    with http_server(receiver.handler()) as url:
        rules = f"""
rules:
  - name: features
    kind: feature_drift
    deployments: [{d}]
receivers:
  - name: ops
    url: {url}/hook
    timeout_seconds: 5
    max_attempts: 3
    initial_backoff_seconds: 0.05
"""
        engine = rig.alert_engine(rules, drift=drift, external_url="http://monitor.example:9491")
        async with sending(engine):
            (alert,) = (await engine.evaluate_once(T0)).fired
            (fired,) = await eventually(taken(receiver, 1), within=20, what="the firing notification")
            assert [status for status, _ in receiver.bodies] == [500, 200]  # taken on the second attempt
            # The receiver has the body before the sender has its answer and counts the delivery.
            state = engine.notifier.state["ops"]
            await eventually(delivered(engine, 1), within=20, what="the delivery counted")
            assert (state.delivered, state.retries, state.failed) == (1, 1, 0)
            assert state.last_error == "HTTP 500"

            assert fired["version"] == "4"
            assert fired["status"] == "firing"
            assert fired["receiver"] == "ops"
            assert fired["groupKey"] == f'{{}}:{{alertname="features",deployment="{d}"}}'
            assert fired["groupLabels"] == {"alertname": "features", "deployment": d}
            labels = {"alertname": "features", "severity": "critical", "deployment": d, "feature": "age"}
            assert fired["commonLabels"] == labels
            assert fired["commonAnnotations"]["summary"] == alert.summary
            assert fired["externalURL"] == "http://monitor.example:9491"
            assert fired["truncatedAlerts"] == 0
            (entry,) = fired["alerts"]
            assert entry["status"] == "firing"
            assert entry["labels"] == labels
            assert entry["annotations"] == {"summary": alert.summary, "value": "0.42", "threshold": "0"}
            assert entry["startsAt"] == "2025-12-06T05:47:00.000Z"  # T0
            assert entry["endsAt"] == ZERO_TIME
            assert entry["generatorURL"] == "http://monitor.example:9491"
            assert entry["fingerprint"] == alert.id

            drift.results[d] = []
            (resolved_alert,) = (await engine.evaluate_once(T0 + 90)).resolved
            await eventually(taken(receiver, 2), within=20, what="the resolved notification")
            resolved = receiver.taken()[1]
            assert resolved["status"] == "resolved"
            (entry,) = resolved["alerts"]
            assert (entry["status"], entry["fingerprint"]) == ("resolved", alert.id)
            assert entry["startsAt"] == "2025-12-06T05:47:00.000Z"
            assert entry["endsAt"] == "2025-12-06T05:48:30.000Z"  # T0 + 90
            assert resolved_alert.resolved_at == T0 + 90
            await eventually(delivered(engine, 2), within=20, what="the second delivery counted")
            assert engine.notifier.state["ops"].delivered == 2


async def test_firing_alerts_are_sent_again_after_a_restart_and_every_repeat_interval(rig: Rig) -> None:
    """The queue of a crashed monitor is lost: its successor announces what fires on its first
    evaluation, then again every repeat interval, never the same alert twice in between."""
    d = rig.deployment
    drift = FakeDrift({d: [FeatureDrift("age", 0.42, "critical")]})
    first, second = Receiver(answers=[]), Receiver(answers=[])
    with http_server(first.handler()) as url, http_server(second.handler()) as url_after:
        template = """
rules:
  - name: features
    kind: feature_drift
    deployments: [{d}]
receivers:
  - name: ops
    url: {url}/hook
    repeat_interval_seconds: 3600
"""
        crashed = rig.alert_engine(template.format(d=d, url=url), drift=drift)
        (alert,) = (await crashed.evaluate_once(T0)).fired  # queued, never sent: the process dies
        assert crashed.notifier.pending() == 1

        restarted = rig.alert_engine(template.format(d=d, url=url_after), drift=drift)
        transitions = await restarted.evaluate_once(T0 + 30)
        assert transitions.notable == []  # nothing changed, but what fires is announced
        assert restarted.notifier.pending() == 1
        await restarted.evaluate_once(T0 + 60)
        await restarted.evaluate_once(T0 + 3000)
        assert restarted.notifier.pending() == 1  # not again within the repeat interval
        await restarted.evaluate_once(T0 + 30 + 3600)
        assert restarted.notifier.pending() == 2  # the repeat interval has passed
        async with sending(restarted):
            bodies = await eventually(taken(second, 2), within=20, what="the announcement and the repeat")
        for body in bodies:
            assert body["status"] == "firing"
            assert [entry["fingerprint"] for entry in body["alerts"]] == [alert.id]
    assert first.taken() == []


def delivered(engine: AlertEngine, count: int) -> Callable[[], Awaitable[bool]]:
    """A probe: the notifier has counted `count` deliveries to the receiver "ops"."""

    async def probe() -> bool:
        return engine.notifier.state["ops"].delivered >= count

    return probe


def taken(receiver: Receiver, count: int) -> Callable[[], Awaitable[list[dict[str, Any]]]]:
    """A probe: the bodies the receiver took, once there are `count` of them."""

    async def probe() -> list[dict[str, Any]]:
        bodies = receiver.taken()
        return bodies if len(bodies) >= count else []

    return probe


async def test_a_receiver_that_keeps_failing_is_given_up_and_a_refusal_is_not_retried() -> None:
    failing = Receiver(answers=[503, 503, 503])
    refusing = Receiver(answers=[400])
    with http_server(failing.handler()) as failing_url, http_server(refusing.handler()) as refusing_url:
        notifier = WebhookNotifier(
            [
                WebhookReceiver(name="down", url=failing_url, max_attempts=2, initial_backoff_seconds=0.01),
                WebhookReceiver(name="picky", url=refusing_url, max_attempts=5, initial_backoff_seconds=0.01),
            ]
        )
        payload = {"version": "4", "alerts": []}
        assert await notifier.deliver(notifier.receivers[0], payload) is False
        assert await notifier.deliver(notifier.receivers[1], payload) is False
    assert [status for status, _ in failing.bodies] == [503, 503]  # max_attempts, then given up
    assert [status for status, _ in refusing.bodies] == [400]  # not retried
    assert (notifier.state["down"].failed, notifier.state["down"].retries) == (1, 1)
    assert (notifier.state["picky"].failed, notifier.state["picky"].retries) == (1, 0)
