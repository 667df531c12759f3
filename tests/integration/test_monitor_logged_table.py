"""EvaluatePolicy on another system's decisions: a log ingested into the offline store (through
ingest's own loader, SQLite and PostgreSQL), a logging policy and take-up per region that are
known, so each candidate's true value is known; through the core and through the real monitor
server, with the bad tables refused naming the column."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from grpc import aio

from libs.common.client import open_channel
from libs.common.deployment_spec import parse_deployment_spec
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from libs.common.offline_store import open_offline_store
from libs.common.server import RunningServer
from libs.policy.model_repository import ModelRepository
from libs.policy.models import load_model
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.ingest.core.columns import ColumnType
from services.monitor.core.logged_table import inspect_logged_table, read_logged_rows
from services.monitor.core.policy_evaluation import EvaluationRequest, evaluate_logged_rows
from services.monitor.server import build_server as build_monitor
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, target
from tests.integration.test_predictor_decision import OFFERS, spec_document
from tests.trainer_datasets import OFFERS as MODEL_OFFERS
from tests.trainer_datasets import load_table, offline_store, take_up_rows, take_up_spec, train_artifact

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TAKE_UP = {
    "north": {"alpha": 0.6, "bravo": 0.3, "charlie": 0.1, "delta": 0.05},
    "south": {"alpha": 0.1, "bravo": 0.3, "charlie": 0.6, "delta": 0.05},
}
# The old system's first-slot policy per region (not uniform, so the weights matter).
LOGGING = {"north": [0.4, 0.3, 0.2, 0.1], "south": [0.1, 0.2, 0.3, 0.4]}
DECISIONS = 3000
COLUMNS = ("time", "customer", "region", "age", "north", "offer", "slot", "propensity", "reward")


def old_system_log(decisions: int = DECISIONS, seed: int = 11) -> list[dict[str, Any]]:
    """Two rows per decision: the first slot drawn from LOGGING, a second slot (never evaluated)."""
    rng = np.random.default_rng(seed)
    start = datetime(2025, 3, 1, tzinfo=UTC)
    rows = []
    for index in range(decisions):
        region = "north" if rng.random() < 0.5 else "south"
        first = int(rng.choice(len(OFFERS), p=LOGGING[region]))
        second = (first + 1 + int(rng.integers(len(OFFERS) - 1))) % len(OFFERS)
        for slot, offer_index, propensity in ((1, first, LOGGING[region][first]), (2, second, 0.5)):
            offer = OFFERS[offer_index]
            rows.append(
                {
                    "time": (start + timedelta(seconds=10 * index)).isoformat(),
                    "customer": 1000 + index,
                    "region": region,
                    "age": int(rng.integers(18, 80)),
                    "north": int(region == "north"),
                    "offer": offer,
                    "slot": slot,
                    "propensity": propensity,
                    "reward": int(rng.random() < TAKE_UP[region][offer]),
                }
            )
    return rows


def only(offer: str) -> dict[str, Any]:
    """A candidate that always shows `offer` first (the others excluded)."""
    document = spec_document("switch-over", algorithm={"approach": "epsilon_greedy"}, exploration_epsilon=0.0)
    document["plugins"] = [
        {
            "name": "exclude_offers",
            "stage": "pre_score",
            "params": {"offers": [o for o in OFFERS if o != offer]},
        }
    ]
    return document


GREEDY_PER_REGION = spec_document(
    "switch-over",
    algorithm={"approach": "epsilon_greedy"},
    exploration_epsilon=0.0,
    default_number_of_offers=1,
)
# Learners of other kinds of statistics, rebuilt by the replay the same way.
NAIVE_BAYES = spec_document(
    "switch-over", algorithm={"approach": "naive_bayes"}, exploration_epsilon=0.0, default_number_of_offers=1
)
LINUCB = spec_document(
    "switch-over",
    algorithm={"approach": "linucb", "alpha": 0.1, "features": ["north"]},
    exploration_epsilon=0.0,
    default_number_of_offers=1,
)
LINUCB["context_variables"].append({"name": "north", "source": "param", "kind": "numeric", "default": 0})
REQUEST = EvaluationRequest(estimators=("ips", "snips", "dm", "dr"), confidence_level=0.99, seed=3)


@pytest.fixture
def old_log(database_url: str, tmp_path: Path) -> Iterator[tuple[str, sa.Engine]]:
    """(URL, read-only engine) of an offline store holding the old system's log as `old_system`."""
    writer = offline_store(database_url)
    try:
        load_table(
            writer,
            "old_system",
            old_system_log(),
            tmp_path,
            columns=COLUMNS,
            types={"time": ColumnType.TIMESTAMP},
        )
        load_table(
            writer,
            "no_propensity",
            old_system_log(20),
            tmp_path,
            columns=[c for c in COLUMNS if c != "propensity"],
        )
        bad = old_system_log(20)
        bad[3]["propensity"] = 4.0
        load_table(writer, "bad_propensity", bad, tmp_path, columns=COLUMNS)
        with writer.begin() as connection:
            connection.execute(sa.text("CREATE TABLE not_ingested (offer TEXT)"))
    finally:
        writer.dispose()
    reader = open_offline_store(database_url)
    try:
        yield database_url, reader
    finally:
        reader.dispose()


def evaluate(
    engine: sa.Engine, document: dict[str, Any], start: float | None = None, end: float | None = None
) -> Any:
    logged = inspect_logged_table(engine, "old_system", start, end)
    return evaluate_logged_rows(
        parse_deployment_spec(json.dumps(document), "json"),
        read_logged_rows(engine, logged, start, end),
        logged.first_slot_rows,
        logged.offers,
        REQUEST,
        source="table 'old_system'",
    )


def test_candidates_with_known_values_are_estimated_on_an_ingested_log(
    old_log: tuple[str, sa.Engine],
) -> None:
    _, engine = old_log
    logged = inspect_logged_table(engine, "old_system", None, None)
    assert logged.first_slot_rows == DECISIONS
    assert logged.offers == sorted(OFFERS)
    assert logged.context_columns == ["region", "age", "north"]
    rows = list(read_logged_rows(engine, logged, None, None))
    assert len(rows) == 2 * DECISIONS
    assert [row.time for row in rows] == sorted(row.time for row in rows)
    assert rows[0].customer == "1000"
    assert rows[0].context["region"] in TAKE_UP

    # Always alpha: half the traffic is north (0.6), half south (0.1).
    evaluation = evaluate(engine, only("alpha"))
    result = evaluation.result
    assert evaluation.decisions == DECISIONS
    assert result.usable_decisions == DECISIONS - DECISIONS // 10  # the first tenth warms up
    truth = 0.5 * TAKE_UP["north"]["alpha"] + 0.5 * TAKE_UP["south"]["alpha"]
    for name in ("ips", "snips", "dr"):
        estimate = result.estimates[name]
        assert estimate.lower <= truth <= estimate.upper, (name, estimate)
    assert any("another system" in note for note in evaluation.notes)
    # The weight of a north decision that showed alpha is 1 / 0.4, of a south one 1 / 0.1.
    assert result.max_weight == pytest.approx(10.0)

    # Greedy per region learns alpha for the north and charlie for the south from the replayed log:
    # close to 0.6, far above what the old system earned.
    greedy = evaluate(engine, GREEDY_PER_REGION).result
    dr = greedy.estimates["dr"]
    assert dr.value > greedy.logged_value + 0.15
    assert dr.lower <= 0.6 + 0.02

    # Naive Bayes over region and a linear model over `north` learn the same thing their own way.
    for learner in (NAIVE_BAYES, LINUCB):
        learned = evaluate(engine, learner).result
        assert learned.estimates["dr"].value > learned.logged_value + 0.15, learner["algorithm"]
        assert learned.estimates["dr"].lower <= 0.6 + 0.02

    # A window over the event time: the first half of the log only.
    start = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
    half = evaluate(engine, only("alpha"), start, start + 10 * DECISIONS / 2)
    assert half.decisions == DECISIONS // 2


def test_bad_logged_tables_are_refused_naming_the_column(old_log: tuple[str, sa.Engine]) -> None:
    _, engine = old_log
    with pytest.raises(InvalidArgument) as caught:
        inspect_logged_table(engine, "no_propensity", None, None)
    assert caught.value.field == "logged_table.propensity"
    with pytest.raises(InvalidArgument) as caught:
        inspect_logged_table(engine, "bad_propensity", None, None)
    assert caught.value.field == "logged_table.propensity"
    assert "1 rows" in str(caught.value)
    with pytest.raises(NotFound):
        inspect_logged_table(engine, "no_such_table", None, None)
    with pytest.raises(FailedPrecondition) as caught:
        inspect_logged_table(engine, "not_ingested", None, None)
    assert "ingest" in str(caught.value)
    with pytest.raises(FailedPrecondition) as caught:  # a window before the log began
        inspect_logged_table(engine, "old_system", 0.0, 3600.0)
    assert caught.value.field == "window"


@pytest.fixture
async def monitor_on(
    old_log: tuple[str, sa.Engine], tmp_path: Path, api_keys: ApiKeys, redis_url: str
) -> Any:
    url, _ = old_log
    settings = SERVICES_UNDER_TEST["monitor"].settings(
        tmp_path / "monitor", api_keys, redis_url, offline_store_url=url
    )
    (tmp_path / "monitor").mkdir()
    running: RunningServer = await build_monitor(settings)
    channel = open_channel(target(running), api_key=api_keys.admin, deadline_seconds=60)
    try:
        yield monitor_pb2_grpc.MonitorServiceStub(channel)
    finally:
        await channel.close()
        await running.stop()


async def test_a_team_evaluates_a_spec_on_its_old_systems_log_through_the_api(monitor_on: Any) -> None:
    """No deployment published yet (the config service is unreachable): a spec is enough."""
    stub: monitor_pb2_grpc.MonitorServiceStub = monitor_on
    reply = await stub.EvaluatePolicy(
        monitor_pb2.EvaluatePolicyRequest(
            deployment="switch-over",
            candidate_spec_json=json.dumps(only("alpha")),
            logged_table="old_system",
            confidence_level=0.99,
            seed=3,
        )
    )
    assert reply.decisions == DECISIONS
    ips = {row.estimator: row for row in reply.estimates}[monitor_pb2.ESTIMATOR_IPS]
    assert ips.lower <= 0.35 <= ips.upper
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.EvaluatePolicy(
            monitor_pb2.EvaluatePolicyRequest(
                deployment="switch-over",
                candidate_spec_json=json.dumps(only("alpha")),
                logged_table="no_propensity",
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "propensity" in (caught.value.details() or "")
    # The service keeps serving.
    again = await stub.EvaluatePolicy(
        monitor_pb2.EvaluatePolicyRequest(
            deployment="switch-over",
            candidate_spec_json=json.dumps(only("alpha")),
            logged_table="old_system",
            estimators=[monitor_pb2.ESTIMATOR_SNIPS],
        )
    )
    assert [row.estimator for row in again.estimates] == [monitor_pb2.ESTIMATOR_SNIPS]


@pytest.mark.slow
def test_a_candidate_ranking_by_a_model_scores_each_logged_decision_with_that_model(tmp_path: Path) -> None:
    """The take-up rows show offers uniformly at random: a log with propensity 1/3. The candidate
    ranks by the trained model with no exploration, so its IPS estimate is exactly 3 x the mean
    reward of the evaluated rows whose offer is the model's best, computed here independently."""
    trained = train_artifact(tmp_path, tmp_path / "artifacts", take_up_spec(), rows=400)
    rows = take_up_rows(600, seed=23)
    log = [
        {
            "time": row["event_time"],
            "age": row["age"],
            "tenure_months": row["tenure_months"],
            "region": row["region"],
            "offer": row["offer_id"],
            "slot": 1,
            "propensity": 1 / 3,
            "reward": row["label"],
        }
        for row in rows
    ]
    url = f"sqlite:///{tmp_path / 'old.db'}"
    writer = offline_store(url)
    columns = ("time", "age", "tenure_months", "region", "offer", "slot", "propensity", "reward")
    load_table(writer, "old_system", log, tmp_path, columns=columns, types={"time": ColumnType.TIMESTAMP})
    writer.dispose()
    document = {
        "name": "switch-over",
        "offers": [{"id": offer} for offer in MODEL_OFFERS],
        "context_variables": [
            {"name": "age", "source": "param", "kind": "numeric", "default": 40},
            {"name": "tenure_months", "source": "param", "kind": "numeric", "default": 0},
            {"name": "region", "source": "param", "default": "east", "segment": False},
        ],
        "algorithm": {"approach": "model"},
        "model": {"name": "take-up", "version": 1},
        "exploration_epsilon": 0.0,
        "default_number_of_offers": 1,
    }
    spec = parse_deployment_spec(json.dumps(document), "json")
    models = ModelRepository(tmp_path / "artifacts").load_bindings(spec)
    engine = open_offline_store(url)
    try:
        logged = inspect_logged_table(engine, "old_system", None, None)
        evaluation = evaluate_logged_rows(
            spec,
            read_logged_rows(engine, logged, None, None),
            logged.first_slot_rows,
            logged.offers,
            EvaluationRequest(estimators=("ips",), seed=1),
            source="table 'old_system'",
            models=models,
        )
    finally:
        engine.dispose()
    model = load_model(trained.directory, "take-up", 1)
    evaluated = rows[len(rows) // 10 :]
    matches = []
    for row in evaluated:
        predicted = model.predict_offers(
            {"age": float(row["age"]), "tenure_months": float(row["tenure_months"]), "region": row["region"]},
            list(MODEL_OFFERS),
        )
        best = MODEL_OFFERS[int(np.argmax(predicted))]
        matches.append(3.0 * row["label"] if row["offer_id"] == best else 0.0)
    assert 0 < sum(1 for value in matches if value) < len(evaluated)  # the model does not pick one offer
    assert evaluation.result.estimates["ips"].value == pytest.approx(float(np.mean(matches)), abs=1e-9)
