"""Feature spec parsing and every transform on small arrays (no database)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.errors import InvalidArgument
from services.ingest.core.columns import ColumnType
from services.ingest.core.features import (
    AggregateFunction,
    DatePart,
    WindowAggregator,
    _PointInTime,
    _whole_groups,
    cast_values,
    date_part,
    discretize,
    fill_nulls,
    log_transform,
    one_hot,
    parse_feature_spec,
    ratio,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "features" / "telco-features.yaml"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def spec_with(feature: str, view_extra: str = "") -> str:
    return f"""
views:
  - name: v
    source: events
    entity: customer
{view_extra}    features:
{feature}
"""


def error_field(text: str) -> str | None:
    with pytest.raises(InvalidArgument) as caught:
        parse_feature_spec(text)
    return caught.value.field


# Spec -----------------------------------------------------------------------------------------


def test_the_example_spec_parses_and_uses_every_transform() -> None:
    spec = parse_feature_spec(EXAMPLE.read_text())

    kinds = {feature.kind for view in spec.views for feature in view.features}
    assert kinds == {"column", "discretize", "one_hot", "log", "ratio", "date_part", "aggregate"}
    assert any(feature.fill is not None for view in spec.views for feature in view.features)
    assert any(feature.cast is not None for view in spec.views for feature in view.features)
    assert any(view.joins for view in spec.views)


@pytest.mark.parametrize(
    ("feature", "field"),
    [
        ("      - {name: f, discretize: {input: a, edges: [3, 1], labels: [x, y, z]}}", "discretize.edges"),
        ("      - {name: f, discretize: {input: a, edges: [1, 3], labels: [x, y]}}", "discretize.labels"),
        ("      - {name: f, discretize: {input: a, bins: 3, edges: [1], labels: [x, y]}}", "discretize.bins"),
        ("      - {name: f, bins: 3, column: a}", "bins"),
        ("      - {name: f, column: a, log: {input: a}}", ""),
        ("      - {name: f}", ""),
        ("      - {name: f, aggregate: {input: a, function: sum, window: 30 days}}", "aggregate.window"),
        ("      - {name: f, aggregate: {input: a, function: median, window: 30d}}", "aggregate.function"),
        ("      - {name: f, date_part: {input: a, part: minute}}", "date_part.part"),
        ("      - {name: f, column: a, cast: int32}", "cast"),
        ("      - {name: f, one_hot: {input: a, categories: [x]}, fill: 0}", ""),
        ("      - {name: f, log: {input: a, offset: .inf}}", "log.offset"),
        ("      - {name: f, column: a, fill: [1, 2]}", "fill"),
    ],
)
def test_spec_errors_name_the_field(feature: str, field: str) -> None:
    expected = "views[0].features[0]" + (f".{field}" if field else "")
    assert error_field(spec_with(feature)) == expected


def test_spec_errors_name_the_view_field() -> None:
    text = "views:\n  - {name: v, source: s, entity: e, features: [], wat: 1}\n"
    with pytest.raises(InvalidArgument) as caught:
        parse_feature_spec(text)
    assert caught.value.field == "views[0].features"
    assert "views[0].wat" in caught.value.message


@pytest.mark.parametrize("text", ["", "  \n", "views: [", "- a\n- b\n", "just text"])
def test_a_spec_that_is_not_a_yaml_mapping_names_spec_yaml(text: str) -> None:
    assert error_field(text) == "spec_yaml"


def test_yes_and_no_stay_text_in_categories() -> None:
    spec = parse_feature_spec(
        spec_with("      - {name: f, one_hot: {input: a, categories: [yes, no, on, 3]}}")
    )
    one_hot_spec = spec.views[0].features[0].one_hot
    assert one_hot_spec is not None
    assert one_hot_spec.categories == ["yes", "no", "on", 3]


def test_a_join_on_one_column_may_be_written_as_text() -> None:
    extra = "    joins: [{table: customers, on: customer, columns: [age]}]\n"
    spec = parse_feature_spec(spec_with("      - {name: f, column: age}", extra))
    assert spec.views[0].joins[0].on == ["customer"]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (
            "views: [{name: 'x; DROP TABLE y', source: s, entity: e, features: [{name: f, column: a}]}]",
            "views[0].name",
        ),
        (
            "views: [{name: v, source: 's\"; --', entity: e, features: [{name: f, column: a}]}]",
            "views[0].source",
        ),
        ('views: [{name: v, source: s, entity: "e\'", features: [{name: f, column: a}]}]', "views[0].entity"),
        (
            "views: [{name: v, source: s, entity: e, event_time: 't)', features: [{name: f, column: a}]}]",
            "views[0].event_time",
        ),
        (
            "views: [{name: v, source: s, entity: e, features: [{name: f, column: a}, {name: 'b\"c', column: a}]}]",
            "views[0].features[1].name",
        ),
        (
            "views: [{name: v, source: s, entity: e, features: [{name: f, ratio: {numerator: a, denominator: 'a/0'}}]}]",
            "views[0].features[0].ratio.denominator",
        ),
        (
            "views: [{name: v, source: s, entity: e, joins: [{table: 't;', on: e, columns: [a]}], features: [{name: f, column: a}]}]",
            "views[0].joins[0].table",
        ),
        (
            "views: [{name: v, source: s, entity: e, joins: [{table: t, on: [e, 'e e'], columns: [a]}], features: [{name: f, column: a}]}]",
            "views[0].joins[0].on[1]",
        ),
        ("views: [{name: ll_v, source: s, entity: e, features: [{name: f, column: a}]}]", "views[0].name"),
        (
            "views: [{name: v, source: s, entity: e, features: [{name: f, column: a}]}, {name: V, source: s, entity: e, features: [{name: f, column: a}]}]",
            "views[1].name",
        ),
    ],
)
def test_hostile_or_invalid_names_are_rejected_naming_the_field(text: str, field: str) -> None:
    assert error_field(text) == field


# Casts and fills ------------------------------------------------------------------------------


def test_text_to_int64_nulls_what_does_not_parse_and_counts_it() -> None:
    result, failed, example = cast_values(pa.array([" 12", "x", None, "", "-3", "2.5"]), ColumnType.INT64)
    assert result.to_pylist() == [12, None, None, None, -3, None]
    assert (failed, example) == (2, "x")


def test_float_to_int64_truncates_toward_zero_and_nulls_non_finite() -> None:
    values = pa.array([2.7, -2.7, float("nan"), float("inf"), None, 1e300])
    result, failed, _ = cast_values(values, ColumnType.INT64)
    assert result.to_pylist() == [2, -2, None, None, None, None]
    assert failed == 3


def test_text_to_float64_and_bool() -> None:
    numbers, failed, _ = cast_values(pa.array(["1.5", "nan", "abc", None]), ColumnType.FLOAT64)
    assert numbers.to_pylist() == [1.5, None, None, None]
    assert failed == 2
    flags, failed, example = cast_values(
        pa.array(["TRUE", "no", "1", " false ", "maybe", None]), ColumnType.BOOL
    )
    assert flags.to_pylist() == [True, False, True, False, None, None]
    assert (failed, example) == (1, "maybe")


def test_other_casts() -> None:
    assert cast_values(pa.array([True, None]), ColumnType.STRING)[0].to_pylist() == ["true", None]
    assert cast_values(pa.array([True, False]), ColumnType.INT64)[0].to_pylist() == [1, 0]
    assert cast_values(pa.array([0, 5, None]), ColumnType.BOOL)[0].to_pylist() == [False, True, None]
    assert cast_values(pa.array([3, None]), ColumnType.FLOAT64)[0].to_pylist() == [3.0, None]


def test_fill_replaces_nulls_with_a_value_of_the_column_type() -> None:
    assert fill_nulls(pa.array([1.5, None]), 0, ColumnType.FLOAT64).to_pylist() == [1.5, 0.0]
    assert fill_nulls(pa.array(["a", None]), "none", ColumnType.STRING).to_pylist() == ["a", "none"]
    with pytest.raises(ValueError, match="whole number"):
        fill_nulls(pa.array([1, None]), 0.5, ColumnType.INT64)
    with pytest.raises(ValueError, match="true or false"):
        fill_nulls(pa.array([True, None]), 1, ColumnType.BOOL)


# Transforms -----------------------------------------------------------------------------------


def test_discretize_buckets_are_left_closed_with_open_ends() -> None:
    values = pa.array([-5, 17.999, 18, 29, 30, 64.9, 65, 200, None, float("nan")])
    result = discretize(values, [18, 30, 65], ["minor", "young", "adult", "senior"])
    assert result.to_pylist() == [
        "minor",
        "minor",
        "young",
        "young",
        "adult",
        "adult",
        "senior",
        "senior",
        None,
        None,
    ]


def test_one_hot_gives_zero_for_unknown_and_missing_values() -> None:
    female, male = one_hot(pa.array(["female", "male", "other", None]), ["female", "male"])
    assert female.to_pylist() == [1, 0, 0, 0]
    assert male.to_pylist() == [0, 1, 0, 0]
    (three,) = one_hot(pa.array([3, 4, None]), [3])
    assert three.to_pylist() == [1, 0, 0]
    (yes,) = one_hot(pa.array([True, False, None]), [True])
    assert yes.to_pylist() == [1, 0, 0]


def test_log_is_null_where_the_argument_is_not_positive() -> None:
    result = log_transform(pa.array([0, 1, math.e - 1, -1, None]), offset=1).to_pylist()
    assert result[0] == 0.0
    assert result[1] == pytest.approx(math.log(2))
    assert result[2] == pytest.approx(1.0)
    assert result[3:] == [None, None]
    assert log_transform(pa.array([0.0]), offset=0).to_pylist() == [None]


def test_ratio_is_null_on_division_by_zero_or_missing_values() -> None:
    result = ratio(pa.array([1, 3, 0, None, 5]), pa.array([2, 0, 0, 1, None]))
    assert result.to_pylist() == [0.5, None, None, None, None]
    assert ratio(pa.array([-1.0]), pa.array([-0.0])).to_pylist() == [None]


def test_date_parts_are_computed_in_utc() -> None:
    moments = pa.array(
        [
            datetime(2024, 3, 31, 1, 30, tzinfo=UTC),  # a Sunday; the night clocks change in Europe
            datetime(2024, 3, 31, 23, 30, tzinfo=timezone(timedelta(hours=2))),  # 21:30 UTC
            datetime(2021, 1, 3, 12, tzinfo=UTC),  # Sunday of ISO week 53 of 2020
            datetime(2024, 12, 30, 0, tzinfo=UTC),  # Monday of ISO week 1 of 2025
            None,
        ],
        type=pa.timestamp("us", tz="UTC"),
    )
    assert date_part(moments, DatePart.HOUR).to_pylist() == [1, 21, 12, 0, None]
    assert date_part(moments, DatePart.DAY_OF_WEEK).to_pylist() == [6, 6, 6, 0, None]
    assert date_part(moments, DatePart.WEEKEND).to_pylist() == [True, True, True, False, None]
    assert date_part(moments, DatePart.WEEK_OF_YEAR).to_pylist() == [13, 13, 53, 1, None]
    assert date_part(moments, DatePart.MONTH).to_pylist() == [3, 3, 1, 12, None]
    days = pa.array([datetime(2024, 6, 1).date()], type=pa.date32())
    assert date_part(days, DatePart.WEEKEND).to_pylist() == [True]


# Windows --------------------------------------------------------------------------------------


def micros(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // US


def test_the_window_includes_its_end_and_excludes_its_start() -> None:
    day = timedelta(days=1)
    aggregator = WindowAggregator(AggregateFunction.SUM, 30 * day, ColumnType.INT64)
    times = [T0, T0 + 30 * day - US, T0 + 30 * day, T0 + 60 * day]
    result = aggregator.update(["c"] * 4, [micros(t) for t in times], [1, 10, 100, 1000])
    # at T0+30d the row at T0 is exactly one window old: out; the row 1 us later is still in.
    # At T0+60d the row at T0+30d is out in turn.
    assert result.to_pylist() == [1, 11, 110, 1000]


def test_rows_at_the_same_time_see_each_other_and_entities_do_not_mix() -> None:
    aggregator = WindowAggregator(AggregateFunction.COUNT, timedelta(hours=1), ColumnType.INT64)
    t = micros(T0)
    result = aggregator.update(["a", "a", "a", "b"], [t, t, t + 1, t + 1], ["x", None, "y", "z"])
    assert result.to_pylist() == [1, 1, 2, 1]


def test_sum_and_mean_skip_nulls_and_are_null_for_an_empty_window() -> None:
    t = micros(T0)
    total = WindowAggregator(AggregateFunction.SUM, timedelta(hours=1), ColumnType.FLOAT64)
    mean = WindowAggregator(AggregateFunction.MEAN, timedelta(hours=1), ColumnType.FLOAT64)
    entities, times, values = ["a", "a", "a"], [t, t + 10, t + 3_600_000_000 + 10], [None, 2.0, None]
    assert total.update(entities, times, values).to_pylist() == [None, 2.0, None]
    assert mean.update(entities, times, [True, False, None]).to_pylist() == [1.0, 0.5, None]


def test_state_carries_over_from_one_chunk_to_the_next() -> None:
    aggregator = WindowAggregator(AggregateFunction.SUM, timedelta(seconds=10), ColumnType.INT64)
    second = 1_000_000
    assert aggregator.update(["a", "a"], [0, 5 * second], [1, 2]).to_pylist() == [1, 3]
    assert aggregator.update(["a", "b"], [12 * second, 12 * second], [4, 8]).to_pylist() == [6, 8]


histories = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(min_value=0, max_value=20),
        st.one_of(st.none(), st.integers(min_value=-5, max_value=5)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    rows=histories,
    window=st.integers(min_value=1, max_value=8),
    function=st.sampled_from(list(AggregateFunction)),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=4),
)
def test_streamed_windows_match_a_brute_force_over_the_whole_history(
    rows: list[tuple[str, int, int | None]], window: int, function: AggregateFunction, cuts: list[int]
) -> None:
    rows = sorted(rows, key=lambda r: (r[0], r[1]))
    output = ColumnType.FLOAT64 if function is AggregateFunction.MEAN else ColumnType.INT64
    table = pa.table(
        {
            "e": [r[0] for r in rows],
            "t": pa.array([r[1] for r in rows], pa.int64()),
            "v": pa.array([r[2] for r in rows], pa.int64()),
        }
    )
    chunks, start = [], 0
    for cut in sorted(set(cuts)):
        if start < cut < len(rows):
            chunks.append(table.slice(start, cut - start))
            start = cut
    chunks.append(table.slice(start))
    aggregator = WindowAggregator(function, timedelta(microseconds=window), output)
    streamed: list[Any] = []
    for chunk in _whole_groups(iter(chunks), "e", "t"):
        streamed += aggregator.update(
            chunk.column("e").to_pylist(), chunk.column("t").to_pylist(), chunk.column("v").to_pylist()
        ).to_pylist()

    expected: list[Any] = []
    for entity, moment, _ in rows:
        inside = [v for e, t, v in rows if e == entity and moment - window < t <= moment and v is not None]
        if function is AggregateFunction.COUNT:
            expected.append(len(inside))
        elif not inside:
            expected.append(None)
        elif function is AggregateFunction.SUM:
            expected.append(sum(inside))
        else:
            expected.append(pytest.approx(sum(inside) / len(inside)))
    assert streamed == expected


def test_whole_groups_never_split_rows_of_one_entity_and_time() -> None:
    table = pa.table({"e": ["a", "a", "a", "b", "b"], "t": [1, 2, 2, 2, 2]})
    chunks = [table.slice(0, 2), table.slice(2, 2), table.slice(4)]
    regrouped = [chunk.to_pydict() for chunk in _whole_groups(iter(chunks), "e", "t")]
    assert regrouped == [
        {"e": ["a"], "t": [1]},
        {"e": ["a", "a"], "t": [2, 2]},
        {"e": ["b", "b"], "t": [2, 2]},
    ]


# Point in time ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    features=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 10), st.integers(0, 99)), max_size=20
    ),
    labels=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 10)), max_size=20),
)
def test_the_merge_finds_the_newest_row_at_or_before_each_label(
    features: list[tuple[str, int, int]], labels: list[tuple[str, int]]
) -> None:
    rows = sorted(features)  # (entity, time, value): the last of equal times wins, as in the SQL order
    cursor = _PointInTime(iter(rows), timed=True)
    for entity, moment in sorted(labels):
        found = cursor.at(entity, moment)  # type: ignore[arg-type]
        candidates = [row for row in rows if row[0] == entity and row[1] <= moment]
        assert found == (max(candidates) if candidates else None)
