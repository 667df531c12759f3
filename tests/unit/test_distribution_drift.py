"""Distribution references and drift (libs.common.distribution_drift): the bins and the sketch a
reference keeps, PSI and KS against hand computation and scipy, what is flagged and what is not,
missing values, served text, and the JSON round trip."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import numpy as np
import pytest
from scipy import stats

from libs.common.distribution_drift import (
    OTHER_CATEGORY,
    PSI_EPSILON,
    SCORE,
    SKETCH_SIZE,
    DistributionReference,
    DriftThresholds,
    TrainingReference,
    build_reference,
    category_text,
    compare,
    describe_categorical,
    describe_numeric,
    ks_statistic,
    model_input_value,
    parse_number,
    population_stability_index,
)

pytestmark = pytest.mark.timeout(30)

SEED = 20261207
SKETCH_ERROR = 1 / (2 * SKETCH_SIZE) + 1e-12  # how far KS against the sketch can be from the exact one


def normal(mean: float, size: int, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, 10.0, size)


def test_served_text_is_read_as_the_model_reads_it() -> None:
    assert [parse_number(v) for v in ("34", "34.0", " 7 ", "-1e3", "True", "false")] == [
        34.0,
        34.0,
        7.0,
        -1000.0,
        1.0,
        0.0,
    ]
    # The model encoder reads these as missing (and substitutes the training mean): so does drift.
    assert [parse_number(v) for v in ("", "f", "t", "n/a", "nan", "inf", None, math.nan)] == [None] * 8
    assert parse_number(np.float32(2.5)) == 2.5
    assert parse_number(True) == 1.0
    assert [category_text(v) for v in ("north", 34, 34.0, True, np.str_("x"))] == [
        "north",
        "34",
        "34",
        "true",
        "x",
    ]
    assert [category_text(v) for v in (None, "", math.nan)] == [None, None, None]


def test_numeric_bins_are_the_deciles_and_every_bin_holds_training_values() -> None:
    values = np.arange(1, 101, dtype=np.float64)  # 1..100: deciles 10, 20, ..., 90
    reference = describe_numeric("age", values)
    assert reference.bin_edges == tuple(float(edge) for edge in range(10, 91, 10))
    assert reference.bin_shares == (0.1,) * 10
    assert reference.mean == 50.5
    assert reference.bin_labels()[:2] == ["<= 10", "(10, 20]"]
    assert reference.bin_labels()[-1] == "> 90"
    # Ties: a 0/1 column keeps one edge (no always-empty bin above the maximum), a constant one none.
    flags = describe_numeric("flag", [0] * 70 + [1] * 30)
    assert (flags.bin_edges, flags.bin_shares) == ((0.0,), (0.7, 0.3))
    constant = describe_numeric("constant", [5.0] * 20)
    assert (constant.bin_edges, constant.bin_shares, constant.bin_labels()) == ((), (1.0,), ["all"])
    skewed = describe_numeric("skewed", np.random.default_rng(SEED).exponential(1.0, 10_000).round(1))
    assert all(share > 0 for share in skewed.bin_shares)
    assert math.isclose(sum(skewed.bin_shares), 1.0)


def test_missing_values_are_counted_apart_from_the_shares() -> None:
    reference = describe_numeric("tenure", [1.0, 2.0, None, math.nan, "", "x", 3.0, 4.0])
    assert (reference.count, reference.missing_count, reference.missing_rate) == (8, 4, 0.5)
    assert reference.mean == 2.5
    assert math.isclose(sum(reference.bin_shares), 1.0)
    empty = describe_numeric("never", [None, None])
    assert (empty.missing_rate, empty.bin_shares, empty.mean, empty.quantiles) == (1.0, (), None, ())
    drift = compare(empty, ["1", "2"])
    assert (drift.psi, drift.ks_statistic, drift.current_missing_rate) == (None, None, 0.0)

    served = compare(describe_numeric("age", normal(40, 5000)), ["41", "", "f", "39.5"] * 100)
    assert served.current_missing_rate == 0.5
    assert served.current_count == 400
    assert served.current_mean == 40.25
    assert served.severity == "critical"
    assert any("missing rate 0.500" in reason for reason in served.reasons)


def test_psi_matches_the_hand_computation_with_epsilon_for_empty_bins() -> None:
    expected, actual = [0.5, 0.3, 0.2, 0.0], [0.4, 0.4, 0.1, 0.1]
    by_hand = (
        (0.4 - 0.5) * math.log(0.4 / 0.5)
        + (0.4 - 0.3) * math.log(0.4 / 0.3)
        + (0.1 - 0.2) * math.log(0.1 / 0.2)
        + (0.1 - PSI_EPSILON) * math.log(0.1 / PSI_EPSILON)
    )
    assert math.isclose(population_stability_index(expected, actual), by_hand)
    assert population_stability_index([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == 0.0  # empty on both sides
    with pytest.raises(ValueError, match="expected shares"):
        population_stability_index([0.5, 0.5], [1.0])

    reference = describe_numeric("x", np.arange(1, 101))
    drift = compare(reference, [5, 15, 25, 35] * 10)  # a quarter in each of the first four bins
    assert drift.current_bin_shares == (0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0, 0, 0)
    assert drift.psi is not None
    assert math.isclose(drift.psi, population_stability_index([0.1] * 10, [0.25] * 4 + [0.0] * 6))


def test_ks_against_the_sketch_is_scipys_two_sample_statistic_within_the_sketch_error() -> None:
    training = normal(50, 20_000)
    reference = describe_numeric("x", training)
    assert len(reference.quantiles) == SKETCH_SIZE
    for shift, seed in ((0.0, 1), (2.0, 2), (6.0, 3)):
        served = normal(50 + shift, 3000, seed)
        exact = stats.ks_2samp(training, served).statistic
        assert ks_statistic(reference.quantiles, served) == pytest.approx(exact, abs=SKETCH_ERROR)
        assert compare(reference, served).ks_statistic == pytest.approx(exact, abs=SKETCH_ERROR)
    # Discrete values with ties: the sketch's CDF is the training CDF rounded to 1/(2 * SKETCH_SIZE).
    ages = np.random.default_rng(SEED).integers(18, 76, 5000)
    served_ages = np.random.default_rng(SEED + 1).integers(25, 76, 800)
    exact = stats.ks_2samp(ages, served_ages).statistic
    assert compare(describe_numeric("age", ages), served_ages).ks_statistic == pytest.approx(
        exact, abs=SKETCH_ERROR
    )
    # A small column keeps every value, so the statistic is exact.
    assert ks_statistic(describe_numeric("x", [1, 2, 3, 4]).quantiles, [3, 4, 5]) == pytest.approx(
        stats.ks_2samp([1, 2, 3, 4], [3, 4, 5]).statistic
    )


def test_a_shifted_numeric_distribution_is_flagged_and_an_unshifted_one_is_not() -> None:
    reference = describe_numeric("age", normal(50, 20_000))
    same = compare(reference, [str(value) for value in normal(50, 5000, seed=9)])
    assert same.severity == "ok", same.reasons
    assert same.psi is not None
    assert same.psi < 0.02
    assert same.ks_statistic is not None
    assert same.ks_statistic < 0.05
    assert same.reference_mean == pytest.approx(50, abs=0.2)
    assert same.current_mean == pytest.approx(50, abs=0.5)

    shifted = compare(reference, [str(value) for value in normal(60, 5000, seed=9)])  # one std
    assert shifted.severity == "critical"
    assert shifted.psi is not None
    assert shifted.psi >= 0.25
    assert shifted.ks_statistic is not None
    assert shifted.ks_statistic >= 0.2
    assert shifted.current_mean == pytest.approx(60, abs=0.5)
    half = compare(reference, normal(55, 5000, seed=9))  # half a std
    assert half.severity in ("warning", "critical")
    assert half.psi is not None
    assert half.psi >= 0.1

    # KS sees a shift within bins that PSI alone would call a warning at most.
    slight = compare(reference, normal(52.5, 5000, seed=9))
    assert slight.psi is not None
    assert slight.psi < 0.1
    assert slight.ks_statistic is not None
    assert slight.ks_statistic >= 0.09
    psi_only = compare(
        reference, normal(52.5, 5000, seed=9), DriftThresholds(ks_warning=math.inf, ks_critical=math.inf)
    )
    assert psi_only.severity == "ok"


def test_a_small_window_is_not_flagged_for_its_own_sampling_noise() -> None:
    reference = describe_numeric("age", normal(50, 20_000))
    small = compare(reference, normal(50, 30, seed=4))
    assert small.psi is not None
    assert small.psi > 0.1
    assert small.severity == "ok"  # ... and judged against that noise
    assert any("within the sampling noise" in reason for reason in small.reasons)
    assert compare(reference, normal(90, 30, seed=4)).severity == "critical"  # a gross shift still is
    nothing = compare(reference, [])
    assert (nothing.severity, nothing.current_count, nothing.psi) == ("ok", 0, None)
    assert nothing.reasons == ("no values in the window",)


def test_categories_keep_the_most_frequent_and_a_shift_between_them_is_flagged() -> None:
    rng = np.random.default_rng(SEED)
    training = rng.choice(["north", "south", "east", "west"], size=10_000, p=[0.4, 0.3, 0.2, 0.1])
    reference = describe_categorical("region", training, max_categories=3)
    assert reference.categories == ("north", "south", "east")
    assert reference.bin_labels() == ["north", "south", "east", OTHER_CATEGORY]
    assert reference.bin_shares == pytest.approx((0.4, 0.3, 0.2, 0.1), abs=0.015)
    assert reference.mean is None

    same = compare(
        reference, rng.choice(["north", "south", "east", "west"], size=3000, p=[0.4, 0.3, 0.2, 0.1])
    )
    assert (same.severity, same.ks_statistic) == ("ok", None)
    moved = compare(
        reference, rng.choice(["north", "south", "east", "west"], size=3000, p=[0.1, 0.3, 0.2, 0.4])
    )
    assert moved.severity == "critical"
    assert moved.current_bin_shares[-1] == pytest.approx(0.4, abs=0.03)  # "west" is in "other"
    unseen = compare(reference, ["north"] * 500 + ["mars"] * 500)  # unseen categories count as other
    assert unseen.current_bin_shares == (0.5, 0.0, 0.0, 0.5)
    assert unseen.severity == "critical"
    missing = compare(reference, ["north", "", None] * 100)
    assert missing.current_missing_rate == pytest.approx(2 / 3)
    assert missing.severity == "critical"


def test_references_read_back_equal_from_json() -> None:
    columns = {
        "age": normal(40, 500).round(),
        "region": np.array(["north", "south", None, "east"] * 125, dtype=object),
        "spend": np.array([1.5, math.nan] * 250),
    }
    scores = np.random.default_rng(SEED).random(500)
    created = datetime(2026, 12, 7, 9, 30, tzinfo=UTC)
    reference = build_reference(
        columns, scores, categorical={"region"}, offer_input="", model_name="take-up", created_at=created
    )
    assert list(reference.inputs) == ["age", "region", "spend"]
    assert reference.score.name == SCORE
    assert (reference.rows, reference.model_version) == (500, 0)
    assert reference.inputs["region"].missing_rate == 0.25
    assert reference.inputs["spend"].missing_rate == 0.5
    text = json.dumps(reference.to_json(), allow_nan=False)
    back = TrainingReference.from_json(json.loads(text))
    assert back == reference
    assert list(back.inputs) == list(reference.inputs)
    numbered = reference.for_version("take-up", 3)
    assert TrainingReference.from_json(numbered.to_json()).model_version == 3
    for single in reference.inputs.values():
        assert DistributionReference.from_json(json.loads(json.dumps(single.to_json()))) == single

    with pytest.raises(ValueError, match="unknown training reference format"):
        TrainingReference.from_json({**reference.to_json(), "format": "liveloop.training_reference/9"})
    broken = reference.inputs["age"].to_json()
    with pytest.raises(ValueError, match="unknown distribution reference format"):
        DistributionReference.from_json({**broken, "format": "other/1"})
    with pytest.raises(ValueError, match="bin shares"):
        DistributionReference.from_json({**broken, "bin_shares": broken["bin_shares"][:-1]})
    with pytest.raises(ValueError, match="values for 1 scores"):
        build_reference({"age": [1, 2]}, [0.5])


def test_thresholds_are_checked_and_a_served_input_is_found_under_its_training_name() -> None:
    with pytest.raises(ValueError, match="warning threshold"):
        DriftThresholds(psi_warning=0.3, psi_critical=0.2)
    with pytest.raises(ValueError, match="significance"):
        DriftThresholds(significance=0)
    features = {"age": "34", "region": "north"}
    assert model_input_value("age", features) == "34"
    assert model_input_value("customers__age", features) == "34"  # a BuildTrainingSet column
    assert model_input_value("band", features, {"band": "young"}) == "young"  # a context variable
    assert model_input_value("region", features, {"region": "south"}) == "south"  # the context wins
    assert model_input_value("offer_id", features) is None
