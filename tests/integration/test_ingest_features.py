"""Feature views and point-in-time training sets on a real offline store (SQLite and PostgreSQL)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common.database import apply_migrations
from libs.common.errors import FailedPrecondition, InvalidArgument, LiveloopError, NotFound
from libs.protos.liveloop.ingest.v1 import ingest_pb2
from services.ingest.core import catalog, features, loader
from services.ingest.core.features import apply_features, build_training_set, parse_feature_spec
from services.ingest.core.ingest_service import IngestService
from services.ingest.core.loader import LoadTarget, WriteMode, load
from services.ingest.core.sources import RawChunk
from services.ingest.servicer import IngestServicer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "features" / "telco-features.yaml"
T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
DAY = timedelta(days=1)
UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")
VERSION_TABLE = "alembic_version_ingest"


@pytest.fixture
def engine(database_engine: sa.Engine) -> sa.Engine:
    apply_migrations(database_engine, catalog.MIGRATIONS_PACKAGE, version_table=VERSION_TABLE)
    return database_engine


def put(
    engine: sa.Engine, table: str, columns: dict[str, Any], key: Sequence[str] = (), event_time: str = ""
) -> None:
    """Load (replace) a table through the loader, as Ingest would."""
    batch = pa.RecordBatch.from_pydict(columns)
    target = LoadTarget(table, key=tuple(key), mode=WriteMode.REPLACE, event_time_column=event_time)
    load(engine, iter([RawChunk(batch, 1)]), target, uuid.uuid4().hex)


def rows(engine: sa.Engine, table: str, order: str) -> list[dict[str, Any]]:
    """The table's rows with typed values (timestamps as aware datetimes on SQLite too)."""
    with engine.connect() as connection:
        info = features._table_info(connection, table)
        assert info is not None
        clause = features._table_clause(info)
        query = sa.select(clause).order_by(*(clause.c[name.strip()] for name in order.split(",")))
        return [dict(row) for row in connection.execute(query).mappings()]


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def apply(engine: sa.Engine, text: str, **options: Any) -> features.ApplyFeaturesResult:
    return apply_features(engine, parse_feature_spec(text), **options)


def load_telco(engine: sa.Engine) -> None:
    put(
        engine,
        "customers",
        {
            "customer": ["c1", "c2", "c3"],
            "age": pa.array([22, None, 70], pa.int64()),
            "gender": ["female", "male", "other"],
            "trips_per_year": pa.array([0, 4, 9], pa.int64()),
            "signup_time": pa.array([T0, T0 + 5 * DAY + timedelta(hours=13), T0], UTC_TIMESTAMP),
        },
        key=["customer"],
    )
    times = [T0 + DAY, T0 + DAY, T0 + 20 * DAY, T0 + 31 * DAY, T0 + 2 * DAY, T0 + 3 * DAY]
    put(
        engine,
        "events",
        {
            "customer": ["c1", "c1", "c1", "c1", "c2", "c9"],
            "event_time": pa.array(times, UTC_TIMESTAMP),
            "offer": ["a", "b", None, "a", "a", "b"],
            "accepted": [True, False, True, False, True, False],
            "amount": [10.0, 5.0, 2.5, None, 8.0, 1.0],
        },
        event_time="event_time",
    )


# Applying the example spec ----------------------------------------------------------------------


def test_the_example_spec_builds_its_views_with_the_expected_values(engine: sa.Engine) -> None:
    load_telco(engine)

    result = apply(engine, EXAMPLE.read_text())

    assert [(v.name, v.version, v.changed, v.rebuilt) for v in result.views] == [
        ("customer_profile", 1, True, True),
        ("customer_activity", 1, True, True),
    ]
    assert result.warnings == []
    profile = {row["customer"]: row for row in rows(engine, "customer_profile", "customer")}
    assert profile["c1"]["age"] == 22.0
    assert profile["c2"]["age"] == 38.0  # filled
    assert [profile[c]["age_band"] for c in ("c1", "c2", "c3")] == ["under_25", "from_35", "from_65"]
    assert [(profile[c]["gender_female"], profile[c]["gender_male"]) for c in ("c1", "c2", "c3")] == [
        (1, 0),
        (0, 1),
        (0, 0),
    ]
    assert profile["c1"]["log_trips"] == 0.0
    assert profile["c3"]["log_trips"] == pytest.approx(math.log(10))
    assert profile["c1"]["trips_per_year_of_age"] == 0.0
    assert profile["c2"]["trips_per_year_of_age"] == pytest.approx(4 / 38)
    assert profile["c2"]["signup_day_of_week"] == 5  # Saturday 6 January
    assert profile["c2"]["signup_month"] == 1
    assert profile["c2"]["signup_time"] == T0 + 5 * DAY + timedelta(hours=13)

    activity = rows(engine, "customer_activity", "customer, event_time, last_offer")
    c1 = [row for row in activity if row["customer"] == "c1"]
    assert [row["last_offer"] for row in c1] == ["a", "b", "none", "a"]
    assert [row["events_30d"] for row in c1] == [2, 2, 2, 1]  # the 31st day: days 1 are out
    assert [row["amount_30d"] for row in c1] == [15.0, 15.0, 17.5, 2.5]  # a missing amount is 0
    assert [row["take_rate_90d"] for row in c1] == [0.5, 0.5, pytest.approx(2 / 3), 0.5]
    assert [row["takes_12h"] for row in c1] == [1, 1, 1, 0]
    assert [row["amount_per_trip"] for row in c1] == [None] * 4  # c1 takes no trips
    assert [row["weekend"] for row in c1] == [False, False, True, False]  # day 20 is a Sunday
    assert [row["week_of_year"] for row in c1] == [1, 1, 3, 5]
    assert [row["hour"] for row in c1] == [0, 0, 0, 0]
    c9 = next(row for row in activity if row["customer"] == "c9")
    assert c9["amount_per_trip"] is None  # no customer row to join

    with engine.connect() as connection:
        record = connection.execute(
            sa.select(catalog.tables).where(catalog.tables.c.name == "customer_activity")
        ).one()
    assert (record.kind, record.key_columns, record.event_time_column, record.row_count) == (
        "feature_view",
        '["customer"]',
        "event_time",
        6,
    )


def test_reapplying_is_a_no_op_and_a_changed_definition_gets_a_new_version(engine: sa.Engine) -> None:
    load_telco(engine)
    text = EXAMPLE.read_text()
    apply(engine, text)

    again = apply(engine, text)
    assert [(v.version, v.changed, v.rebuilt) for v in again.views] == [(1, False, False), (1, False, False)]

    changed = text.replace("window: 12h", "window: 24h")
    dry = apply(engine, changed, dry_run=True)
    assert dry.dry_run
    assert [(v.version, v.changed) for v in dry.views] == [(1, False), (2, True)]
    assert apply(engine, text).views[1].version == 1  # the dry run changed nothing

    applied = apply(engine, changed)
    assert [(v.version, v.changed, v.rebuilt) for v in applied.views] == [(1, False, False), (2, True, True)]
    with engine.connect() as connection:
        stored = connection.execute(
            sa.select(catalog.feature_views).where(catalog.feature_views.c.name == "customer_activity")
        ).one()
    assert stored.version == 2
    assert "24h" in stored.definition

    load_telco(engine)  # new source data: same definitions, rebuilt
    reloaded = apply(engine, changed)
    assert [(v.version, v.changed, v.rebuilt) for v in reloaded.views] == [(1, False, True), (2, False, True)]


def test_small_chunks_give_the_same_views_as_one_chunk(engine: sa.Engine) -> None:
    load_telco(engine)
    apply(engine, EXAMPLE.read_text(), chunk_rows=100_000)
    whole = rows(engine, "customer_activity", "customer, event_time, last_offer")

    load_telco(engine)
    apply(engine, EXAMPLE.read_text(), chunk_rows=1)

    assert rows(engine, "customer_activity", "customer, event_time, last_offer") == whole


def test_views_and_training_sets_are_written_in_chunks_of_bounded_size(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 50
    put(
        engine,
        "price_history",
        {
            "customer": [f"c{i % 7}" for i in range(count)],
            "changed_at": pa.array([T0 + i * DAY for i in range(count)], UTC_TIMESTAMP),
            "price": [float(i) for i in range(count)],
        },
        event_time="changed_at",
    )
    put(
        engine,
        "labels",
        {
            "customer": [f"c{i % 5}" for i in range(count)],
            "at": pa.array([T0 + i * DAY for i in range(count)], UTC_TIMESTAMP),
            "took": [i % 2 for i in range(count)],
        },
        event_time="at",
    )
    written: list[int] = []

    def recording_insert(connection: Any, table: Any, batch: pa.RecordBatch, columns: Any) -> None:
        written.append(batch.num_rows)
        loader._insert(connection, table, batch, columns)

    monkeypatch.setattr(features, "_insert", recording_insert)
    apply(engine, PRICE_VIEW, chunk_rows=4)
    assert sum(written) == count
    assert max(written) <= 4

    written.clear()
    build_training_set(engine, output_table="train", label_table="labels", label_column="took", chunk_rows=4)
    assert sum(written) == count
    assert max(written) <= 4


def test_cast_failures_and_skipped_rows_are_reported_as_warnings(engine: sa.Engine) -> None:
    put(
        engine,
        "raw",
        {
            "id": pa.array([1, 2, 3, None], pa.int64()),
            "score": ["7", "seven", None, "1"],
        },
    )
    spec = "views: [{name: scores, source: raw, entity: id, features: [{name: score, column: score, cast: int64}]}]"

    result = apply(engine, spec)

    assert len(result.warnings) == 2
    assert "1 rows of 'raw' have no entity" in result.warnings[0]
    assert "views[0].features[0]: 1 values could not be cast to int64" in result.warnings[1]
    assert rows(engine, "scores", "id") == [
        {"id": 1, "score": 7},
        {"id": 2, "score": None},
        {"id": 3, "score": None},
    ]


# Validation against the store ------------------------------------------------------------------


def base_spec(feature: str = "{name: f, column: amount}", view: str = "") -> str:
    return f"""
views:
  - name: v
    source: events
    entity: customer
    event_time: event_time
{view}    features:
      - {feature}
"""


@pytest.mark.parametrize(
    ("spec", "error", "field"),
    [
        (base_spec().replace("source: events", "source: nowhere"), NotFound, "views[0].source"),
        (base_spec().replace("entity: customer", "entity: client"), InvalidArgument, "views[0].entity"),
        (base_spec().replace("entity: customer", "entity: amount"), InvalidArgument, "views[0].entity"),
        (
            base_spec().replace("event_time: event_time", "event_time: offer"),
            InvalidArgument,
            "views[0].event_time",
        ),
        (base_spec("{name: f, column: nope}"), InvalidArgument, "views[0].features[0].column"),
        (
            base_spec("{name: f, discretize: {input: offer, edges: [1], labels: [a, b]}}"),
            InvalidArgument,
            "views[0].features[0].discretize.input",
        ),
        (
            base_spec("{name: f, date_part: {input: amount, part: hour}}"),
            InvalidArgument,
            "views[0].features[0].date_part.input",
        ),
        (
            base_spec("{name: f, aggregate: {input: offer, function: mean, window: 1d}}"),
            InvalidArgument,
            "views[0].features[0].aggregate.input",
        ),
        (
            base_spec("{name: f, aggregate: {input: amount, function: sum, window: 1d}}").replace(
                "    event_time: event_time\n", ""
            ),
            InvalidArgument,
            "views[0].features[0].aggregate",
        ),
        (base_spec("{name: f, column: amount, fill: none}"), InvalidArgument, "views[0].features[0].fill"),
        (
            base_spec("{name: f, column: event_time, cast: int64}"),
            InvalidArgument,
            "views[0].features[0].cast",
        ),
        (base_spec("{name: customer, column: amount}"), InvalidArgument, "views[0].features[0].name"),
        (base_spec().replace("name: v", "name: customers"), FailedPrecondition, "views[0].name"),
        (
            base_spec(view="    joins: [{table: events, on: customer, columns: [offer]}]\n"),
            InvalidArgument,
            "views[0].joins[0].columns[0]",
        ),
        (
            base_spec(view="    joins: [{table: customers, on: customer, columns: [nope]}]\n"),
            InvalidArgument,
            "views[0].joins[0].columns[0]",
        ),
        (
            base_spec(view="    joins: [{table: customers, on: [customer, age], columns: [gender]}]\n"),
            InvalidArgument,
            "views[0].joins[0].on[1]",
        ),
    ],
)
def test_a_spec_that_does_not_fit_the_tables_is_rejected_naming_the_field(
    engine: sa.Engine, spec: str, error: type[LiveloopError], field: str
) -> None:
    load_telco(engine)

    with pytest.raises(error) as caught:
        apply(engine, spec, dry_run=True)

    assert caught.value.field == field


def test_a_join_that_matches_several_rows_is_rejected(engine: sa.Engine) -> None:
    load_telco(engine)
    put(engine, "segments", {"customer": ["c1", "c1"], "segment": ["x", "y"]})
    spec = base_spec(
        "{name: f, column: segment}", "    joins: [{table: segments, on: customer, columns: [segment]}]\n"
    )

    with pytest.raises(InvalidArgument) as caught:
        apply(engine, spec, dry_run=True)

    assert caught.value.field == "views[0].joins[0].on"
    assert "'c1' matches several rows" in caught.value.message


# Hostile names -------------------------------------------------------------------------------


HOSTILE = ["x; DROP TABLE customers", 'a"b', "a'b", "customers--", "t\x00", "é", "a b", "1abc", "x" * 64]


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_names_are_invalid_argument_naming_the_field(engine: sa.Engine, name: str) -> None:
    load_telco(engine)
    servicer = IngestServicer(
        IngestService(
            engine,
            None,  # type: ignore[arg-type]
            chunk_rows=1000,
            upload_dir=Path("/nonexistent"),
            data_dir=None,
            online_ttl_seconds=None,
            fetch_spec=lambda _d, _r: None,
        )
    )
    quoted = name.replace("\\", "\\\\").replace('"', '\\"').replace("\x00", "\\0")
    cases = [
        (base_spec().replace("name: v", f'name: "{quoted}"'), "views[0].name"),
        (base_spec().replace("source: events", f'source: "{quoted}"'), "views[0].source"),
        (base_spec(f'{{name: "{quoted}", column: amount}}'), "views[0].features[0].name"),
        (base_spec(f'{{name: f, column: "{quoted}"}}'), "views[0].features[0].column"),
    ]
    for spec, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            await servicer.ApplyFeatures(ingest_pb2.ApplyFeaturesRequest(spec_yaml=spec), None)
        assert (caught.value.status, caught.value.field) == ("INVALID_ARGUMENT", field)

    request: dict[str, Any] = {"output_table": "ts", "label_table": "events", "label_column": "accepted"}
    for field in ("output_table", "label_table", "label_column", "event_time_column"):
        with pytest.raises(InvalidArgument) as caught:
            await servicer.BuildTrainingSet(
                ingest_pb2.BuildTrainingSetRequest(**{**request, field: name}), None
            )
        assert caught.value.field == field
    with pytest.raises(InvalidArgument) as caught:
        await servicer.BuildTrainingSet(
            ingest_pb2.BuildTrainingSetRequest(**request, features=["ok", f"v.{name}"]), None
        )
    assert caught.value.field == "features[1]"
    assert {"customers", "events"} <= table_names(engine)


# Failures leave the previous version --------------------------------------------------------


TWO_VIEWS = """
views:
  - name: activity
    source: events
    entity: customer
    event_time: event_time
    features:
      - {name: amount, column: amount}
  - name: profile
    source: people
    entity: customer
    features:
      - {name: age, column: age}
"""


def test_a_failure_midway_leaves_every_view_as_it_was(engine: sa.Engine) -> None:
    load_telco(engine)
    put(engine, "people", {"customer": ["c1", "c2"], "age": pa.array([30, 40], pa.int64())})
    apply(engine, TWO_VIEWS)
    before_activity = rows(engine, "activity", "customer, event_time, amount")
    before_profile = rows(engine, "profile", "customer")

    # the first view changes and is rebuilt; the second then fails on a repeated entity
    put(engine, "people", {"customer": ["c1", "c1"], "age": pa.array([30, 41], pa.int64())})
    with pytest.raises(FailedPrecondition) as caught:
        apply(
            engine,
            TWO_VIEWS.replace("{name: amount, column: amount}", "{name: amount, column: amount, fill: 0}"),
        )

    assert caught.value.field == "views[1].entity"
    assert rows(engine, "activity", "customer, event_time, amount") == before_activity
    assert rows(engine, "profile", "customer") == before_profile
    assert not any(name.startswith("ll_staging") for name in table_names(engine))
    with engine.connect() as connection:
        query = sa.select(catalog.feature_views.c.name, catalog.feature_views.c.version)
        versions = {row.name: row.version for row in connection.execute(query)}
    assert versions == {"activity": 1, "profile": 1}


def test_an_error_while_writing_leaves_the_previous_table(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_telco(engine)
    apply(engine, TWO_VIEWS.split("  - name: profile")[0])
    before = rows(engine, "activity", "customer, event_time, amount")
    calls = 0

    def failing_insert(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("disk full")
        loader._insert(*args)

    monkeypatch.setattr(features, "_insert", failing_insert)
    load_telco(engine)
    with pytest.raises(RuntimeError, match="disk full"):
        apply(engine, TWO_VIEWS.split("  - name: profile")[0], chunk_rows=1)

    assert rows(engine, "activity", "customer, event_time, amount") == before
    assert not any(name.startswith("ll_staging") for name in table_names(engine))


# Training sets ---------------------------------------------------------------------------------


PRICE_VIEW = """
views:
  - name: prices
    source: price_history
    entity: customer
    event_time: changed_at
    features:
      - {name: price, column: price}
"""


def test_labels_before_at_and_after_each_change_get_the_value_in_force(engine: sa.Engine) -> None:
    t1, t2 = T0 + DAY, T0 + 3 * DAY
    second = timedelta(seconds=1)
    put(
        engine,
        "price_history",
        {"customer": ["c1", "c1"], "changed_at": pa.array([t1, t2], UTC_TIMESTAMP), "price": [10.0, 20.0]},
        event_time="changed_at",
    )
    apply(engine, PRICE_VIEW)
    moments = [t1 - second, t1, t1 + second, t2 - second, t2, t2 + second]
    put(
        engine,
        "labels",
        {"customer": ["c1"] * 6, "at": pa.array(moments, UTC_TIMESTAMP), "took": [0, 1, 0, 1, 1, 0]},
        event_time="at",
    )

    result = build_training_set(engine, output_table="train", label_table="labels", label_column="took")

    written = rows(engine, "train", "at")
    assert [row["at"] for row in written] == moments
    assert [row["prices__price"] for row in written] == [None, 10.0, 10.0, 10.0, 20.0, 20.0]
    assert (result.row_count, result.rows_missing_features, result.label_mean) == (6, 1, 0.5)
    assert [c.name for c in result.columns] == ["customer", "at", "took", "prices__price"]
    with engine.connect() as connection:
        record = connection.execute(sa.select(catalog.tables).where(catalog.tables.c.name == "train")).one()
    assert (record.kind, record.row_count, record.fingerprint) == ("training_set", 6, result.fingerprint)
    assert (record.key_columns, record.event_time_column) == ('["customer"]', "at")


history_rows = st.lists(
    st.tuples(st.sampled_from(["a", "b", "B"]), st.integers(0, 6), st.integers(0, 50)),
    min_size=1,
    max_size=15,
)
label_rows = st.lists(
    st.tuples(st.sampled_from(["a", "b", "B", "z"]), st.integers(0, 7), st.booleans()),
    min_size=1,
    max_size=15,
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=history_rows, labels=label_rows)
def test_training_sets_use_the_newest_value_at_or_before_each_label_and_never_a_later_one(
    engine: sa.Engine, history: list[tuple[str, int, int]], labels: list[tuple[str, int, bool]]
) -> None:
    hour = timedelta(hours=1)
    put(
        engine,
        "price_history",
        {
            "customer": [h[0] for h in history],
            "changed_at": pa.array([T0 + h[1] * hour for h in history], UTC_TIMESTAMP),
            "price": pa.array([h[2] for h in history], pa.int64()),
        },
        event_time="changed_at",
    )
    apply(engine, PRICE_VIEW, chunk_rows=4)
    put(
        engine,
        "labels",
        {
            "customer": [label[0] for label in labels],
            "at": pa.array([T0 + label[1] * hour for label in labels], UTC_TIMESTAMP),
            "took": [label[2] for label in labels],
        },
        event_time="at",
    )

    result = build_training_set(
        engine, output_table="train", label_table="labels", label_column="took", chunk_rows=3
    )

    written = sorted(
        (row["customer"], row["at"], row["took"], row["prices__price"])
        for row in rows(engine, "train", "customer, at")
    )
    expected = []
    for customer, at, took in labels:
        known = [(t, price) for c, t, price in history if c == customer and t <= at]
        newest = max(known)[1] if known else None  # at one time, the largest value is the last in order
        expected.append((customer, T0 + at * hour, took, newest))
    assert written == sorted(expected)
    assert result.rows_missing_features == sum(1 for row in expected if row[3] is None)
    assert result.label_mean == pytest.approx(sum(label[2] for label in labels) / len(labels))


def test_training_sets_are_deterministic_and_sampled_by_seed(engine: sa.Engine) -> None:
    load_telco(engine)
    apply(engine, EXAMPLE.read_text())
    count = 200
    put(
        engine,
        "responses",
        {
            "customer": [f"c{1 + i % 3}" for i in range(count)],
            "responded_at": pa.array([T0 + i * timedelta(hours=5) for i in range(count)], UTC_TIMESTAMP),
            "took": [i % 4 == 0 for i in range(count)],
        },
        event_time="responded_at",
    )

    def build(seed: int, fraction: float) -> features.TrainingSetResult:
        return build_training_set(
            engine,
            output_table="train",
            label_table="responses",
            label_column="took",
            features=["customer_profile.age", "customer_profile.gender", "customer_activity"],
            sample_fraction=fraction,
            seed=seed,
        )

    full = build(0, 0.0)
    assert (full.row_count, full.label_mean) == (count, 0.25)
    assert [c.name for c in full.columns][:6] == [
        "customer",
        "responded_at",
        "took",
        "customer_profile__age",
        "customer_profile__gender_female",
        "customer_profile__gender_male",
    ]
    first = build(7, 0.5)
    first_rows = rows(engine, "train", "customer, responded_at")
    again = build(7, 0.5)
    assert again.fingerprint == first.fingerprint
    assert rows(engine, "train", "customer, responded_at") == first_rows
    assert 60 <= first.row_count <= 140
    other = build(8, 0.5)
    assert other.fingerprint != first.fingerprint

    appended = build_training_set(
        engine,
        output_table="train",
        label_table="responses",
        label_column="took",
        features=["customer_profile.age", "customer_profile.gender", "customer_activity"],
        mode=WriteMode.APPEND,
    )
    assert appended.row_count == count
    assert len(rows(engine, "train", "customer")) == other.row_count + count


@pytest.mark.parametrize(
    ("options", "error", "field"),
    [
        ({"label_table": "nowhere"}, NotFound, "label_table"),
        ({"label_column": "nope"}, InvalidArgument, "label_column"),
        ({"features": ["missing_view"]}, NotFound, "features[0]"),
        ({"features": ["customer_activity", "customer_activity.nope"]}, NotFound, "features[1]"),
        ({"features": ["customers"]}, InvalidArgument, "features[0]"),
        ({"event_time_column": "offer"}, InvalidArgument, "event_time_column"),
        ({"label_table": "customers", "label_column": "age"}, InvalidArgument, "event_time_column"),
        ({"output_table": "customers"}, FailedPrecondition, "output_table"),
        ({"output_table": "events"}, InvalidArgument, "output_table"),
        ({"sample_fraction": 1.5}, InvalidArgument, "sample_fraction"),
        ({"label_column": "customer"}, InvalidArgument, "label_column"),
        ({"carried_columns": ["offer", "nope"]}, InvalidArgument, "label_table_columns[1]"),
        ({"carried_columns": ["accepted"]}, InvalidArgument, "label_table_columns[0]"),
    ],
)
def test_training_set_errors_name_the_field(
    engine: sa.Engine, options: dict[str, Any], error: type[LiveloopError], field: str
) -> None:
    load_telco(engine)
    apply(engine, EXAMPLE.read_text())
    arguments: dict[str, Any] = {
        "output_table": "train",
        "label_table": "events",
        "label_column": "accepted",
        "features": ["customer_activity"],
    }

    with pytest.raises(error) as caught:
        build_training_set(engine, **{**arguments, **options})

    assert caught.value.field == field
    assert "train" not in table_names(engine)


def test_a_training_set_carries_the_label_tables_columns_asked_for(engine: sa.Engine) -> None:
    """An offer take-up model needs the offer each label is about: copied from the label table."""
    load_telco(engine)
    apply(engine, EXAMPLE.read_text())
    result = build_training_set(
        engine,
        output_table="take_up",
        label_table="events",
        label_column="accepted",
        features=["customer_profile"],
        carried_columns=["offer", "amount"],
    )
    names = [c.name for c in result.columns]
    assert names[:5] == ["customer", "event_time", "accepted", "offer", "amount"]
    assert all(name.startswith("customer_profile__") for name in names[5:])
    written = rows(engine, "take_up", "customer, event_time, offer")
    events = rows(engine, "events", "customer, event_time, offer")
    assert [(r["customer"], r["event_time"], r["offer"], r["amount"]) for r in written] == [
        (r["customer"], r["event_time"], r["offer"], r["amount"]) for r in events
    ]


async def test_the_servicer_answers_with_views_and_training_sets(engine: sa.Engine) -> None:
    load_telco(engine)
    servicer = IngestServicer(
        IngestService(
            engine,
            None,  # type: ignore[arg-type]
            chunk_rows=2,
            upload_dir=Path("/nonexistent"),
            data_dir=None,
            online_ttl_seconds=None,
            fetch_spec=lambda _d, _r: None,
        )
    )

    applied = await servicer.ApplyFeatures(
        ingest_pb2.ApplyFeaturesRequest(spec_yaml=EXAMPLE.read_text()), None
    )
    assert [(v.name, v.version, v.changed, list(v.entity_keys)) for v in applied.views] == [
        ("customer_profile", 1, True, ["customer"]),
        ("customer_activity", 1, True, ["customer"]),
    ]
    age = applied.views[0].features[0]
    assert (age.name, age.type, age.description) == (
        "age",
        ingest_pb2.COLUMN_TYPE_FLOAT64,
        "Age in years; unknown ages are taken as the median, 38.",
    )
    assert '"cast": "float64"' in age.transform

    built = await servicer.BuildTrainingSet(
        ingest_pb2.BuildTrainingSetRequest(
            output_table="train",
            label_table="events",
            label_column="accepted",
            features=["customer_profile.age_band"],
            mode=ingest_pb2.WRITE_MODE_REPLACE,
        ),
        None,
    )
    assert (built.table, built.row_count, built.rows_missing_features) == ("train", 6, 2)
    assert [c.name for c in built.columns] == [
        "customer",
        "event_time",
        "accepted",
        "customer_profile__age_band",
    ]
    assert built.label_mean == pytest.approx(0.5)

    with pytest.raises(InvalidArgument) as caught:
        await servicer.BuildTrainingSet(ingest_pb2.BuildTrainingSetRequest(label_table="events"), None)
    assert caught.value.field == "output_table"


def test_the_catalog_module_matches_the_migrations(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
        )
        assert compare_metadata(context, catalog.metadata) == []
