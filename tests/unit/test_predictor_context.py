"""From a request to context: `params` in every form clients send, `numberoffers`, context
variables (features, params, defaults, virtual discretize/concat), the segment key, eligibility rules
and sticky experiment variants."""

from __future__ import annotations

import json
import math
import urllib.parse
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.deployment_spec import DeploymentSpec, EligibilityRule, Offer
from libs.common.errors import InvalidArgument
from libs.policy.context import (
    MAX_PARAMS_BYTES,
    derive_context,
    parse_number_of_offers,
    parse_params,
    segment_reads_features,
)
from libs.policy.deployment import PreparedDeployment
from libs.policy.eligibility import EligibilityRules, eligible_offers, rule_holds

pytestmark = pytest.mark.timeout(30)

PARAMS = {"region": "south", "age": 50, "tags": ["a", "b"], "nested": {"x": 1}}


def spec(**overrides: Any) -> DeploymentSpec:
    document: dict[str, Any] = {
        "name": "ctx",
        "offers": [{"id": "a"}, {"id": "b"}, {"id": "c"}],
        "context_variables": [
            {"name": "age", "source": "feature", "kind": "numeric", "default": 35},
            {
                "name": "age_band",
                "source": "virtual",
                "transform": {
                    "kind": "discretize",
                    "input": "age",
                    "edges": [25, 40, 60],
                    "labels": ["young", "adult", "middle", "senior"],
                },
            },
            {"name": "gender", "source": "feature", "field": "sex", "default": "unknown"},
            {"name": "channel", "source": "param", "default": "app"},
            {"name": "plan", "source": "param", "field": "plan_type", "segment": False},
            {
                "name": "profile",
                "source": "virtual",
                "segment": False,
                "transform": {"kind": "concat", "inputs": ["gender", "age_band"], "separator": "/"},
            },
            {"name": "spend", "source": "feature", "kind": "numeric", "segment": False},
        ],
    }
    document.update(overrides)
    return DeploymentSpec.model_validate(document)


# params -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        PARAMS,
        json.dumps(PARAMS),
        "  " + json.dumps(PARAMS) + "\n",
        urllib.parse.quote(json.dumps(PARAMS)),
        urllib.parse.quote_plus(json.dumps(PARAMS)),
        json.dumps(json.dumps(PARAMS)),
        urllib.parse.quote(json.dumps(json.dumps(PARAMS))),
    ],
    ids=["object", "json", "json-padded", "url-encoded", "url-encoded-plus", "doubly", "url-doubly"],
)
def test_params_in_every_form(form: Any) -> None:
    assert parse_params(form) == PARAMS


def test_a_whole_surrogate_pair_escaped_is_its_character() -> None:
    assert parse_params('{"mood": "\\ud83d\\ude00", "note": "\\u00e9"}') == {
        "mood": "\U0001f600",
        "note": "\u00e9",
    }


@pytest.mark.parametrize("empty", [None, "", "{}", "%7B%7D", {}])
def test_empty_params(empty: Any) -> None:
    assert parse_params(empty) == {}


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must decode to a JSON object"),
        ("42", "must decode to a JSON object"),
        ('"just a string"', "not valid JSON"),
        ("%7B%22region", "not valid JSON"),
        ("[" * 50_000, "nested too deeply"),
        (12, "must be a JSON object or a string"),
        (["a"], "must be a JSON object or a string"),
        (True, "must be a JSON object or a string"),
        ("{" + " " * MAX_PARAMS_BYTES + "}", "the limit is"),
        ("{" + " " * (1024 * 1024) + "}", "the limit is"),
        ('{"tier": "gold\\ud800"}', "half a surrogate pair"),
        ('{"tier": "\\uDFFF"}', "half a surrogate pair"),
        ('"{\\"tier\\": \\"\\\\ud800\\"}"', "half a surrogate pair"),
    ],
)
def test_bad_params_name_the_field(bad: Any, why: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_params(bad, "in_param")
    assert error.value.field == "in_param"
    assert error.value.message.startswith("in_param: ")
    assert why in error.value.message
    assert len(error.value.message) < 300  # never echoes a large input back


# numberoffers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 2),
        ("", 2),
        (0, 2),  # documented: 0 means the deployment's default
        ("0", 2),
        (0.0, 2),
        ("-0", 2),
        (1, 1),
        (3, 3),
        (3.0, 3),
        ("3", 3),
        (" 3 ", 3),
        (5, 5),
    ],
)
def test_numberoffers_forms(value: Any, expected: int) -> None:
    assert parse_number_of_offers(value, default=2, available=5) == expected


def test_a_default_above_the_offer_count_gives_every_offer() -> None:
    assert parse_number_of_offers(None, default=10, available=4) == 4
    assert parse_number_of_offers("0", default=10, available=4) == 4


@pytest.mark.parametrize(
    "value",
    [
        -1,
        "-2",
        2.5,
        "2.5",
        "two",
        "0x2",
        "1e3",
        True,
        False,
        math.inf,
        -math.inf,
        math.nan,
        [2],
        {"n": 2},
        1001,
        1e300,
        -1e300,
        "9" * 4000,
        "-" + "9" * 4000,
        "9" * 5000,
    ],
)
def test_bad_numberoffers_name_the_field(value: Any) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_number_of_offers(value, default=2, available=5)
    assert error.value.field == "numberoffers"
    assert len(error.value.message) < 300


def test_numberoffers_above_the_offers_is_left_to_the_engine_to_cap_with_a_warning() -> None:
    assert parse_number_of_offers(6, default=2, available=5) == 6
    assert parse_number_of_offers("1000", default=2, available=5) == 1000


# Context and segment --------------------------------------------------------------------------


def test_features_params_defaults_and_virtual_variables() -> None:
    context = derive_context(
        spec(),
        features={"age": "52", "sex": "f", "spend": "12.5"},
        params={"plan_type": "prepaid"},
        channel="ussd",
    )
    assert context.values == {
        "age": 52.0,
        "age_band": "middle",
        "gender": "f",
        "channel": "ussd",
        "plan": "prepaid",
        "profile": "f/middle",
        "spend": 12.5,
    }
    assert context.segment == "age_band=middle|gender=f|channel=ussd"
    assert context.numeric == {"age": 52.0, "spend": 12.5}
    assert context.warnings == ()


def test_params_override_features_and_the_request_channel() -> None:
    context = derive_context(
        spec(),
        features={"age": "52", "sex": "f"},
        params={"age": 20, "gender": "m", "channel": "web"},
        channel="ussd",
    )
    assert (context.values["age"], context.values["age_band"], context.values["gender"]) == (
        20.0,
        "young",
        "m",
    )
    assert context.values["channel"] == "web"
    assert context.segment == "age_band=young|gender=m|channel=web"


def test_defaults_on_a_miss_and_warnings_for_what_has_none() -> None:
    context = derive_context(spec(), features={}, params={}, channel="")
    assert context.values["age"] == 35.0  # the default
    assert context.values["age_band"] == "adult"
    assert (context.values["gender"], context.values["channel"]) == ("unknown", "app")
    assert context.values["plan"] == ""
    assert context.values["spend"] == 0.0
    assert any("'plan'" in warning for warning in context.warnings)
    assert any("'spend'" in warning for warning in context.warnings)


def test_a_non_numeric_value_for_a_numeric_variable_falls_back_to_its_default() -> None:
    context = derive_context(spec(), features={"age": "old"}, params={}, channel="")
    assert context.values["age"] == 35.0
    assert any("not numeric" in warning for warning in context.warnings)
    for bad in ("nan", "inf", True):
        assert derive_context(spec(), features={}, params={"age": bad}, channel="").values["age"] in (
            35.0,
            1.0,
        )


@pytest.mark.parametrize(
    ("age", "band"),
    [
        (-5, "young"),
        (24.99, "young"),
        (25, "adult"),
        (39.9, "adult"),
        (40, "middle"),
        (60, "senior"),
        (1e9, "senior"),
    ],
)
def test_discretize_edges_are_lower_inclusive(age: float, band: str) -> None:
    assert derive_context(spec(), features={}, params={"age": age}, channel="").values["age_band"] == band


def test_whole_numbers_label_without_a_decimal_point() -> None:
    context = derive_context(spec(), features={}, params={"gender": 3.0, "plan_type": 7}, channel="")
    assert (context.values["gender"], context.values["plan"]) == ("3", "7")


def test_without_segment_variables_the_segment_is_all() -> None:
    bare = spec(
        context_variables=[{"name": "age", "source": "feature", "kind": "numeric", "default": 1}],
    )
    assert derive_context(bare, features={}, params={}, channel="app").segment == "all"
    assert DeploymentSpec.model_validate({"name": "x", "offers": [{"id": "a"}]}).segment_variables == []


def test_whether_the_segment_can_depend_on_the_features() -> None:
    """The engine reads a segment's statistics with the features when the segment is known from
    the request alone; a feature, or a virtual variable built on one, in the segment means not."""
    assert segment_reads_features(spec())  # age_band (from the feature age) and gender
    from_params = [
        {"name": "channel", "source": "param", "default": "app"},
        {"name": "spend", "source": "feature", "kind": "numeric", "segment": False},
        {"name": "tier", "source": "feature", "segment": False},
        {
            "name": "where",
            "source": "virtual",
            "transform": {"kind": "concat", "inputs": ["channel", "channel"]},
        },
    ]
    assert not segment_reads_features(spec(context_variables=from_params))
    built_on_a_feature = [
        *from_params,
        {
            "name": "mixed",
            "source": "virtual",
            "transform": {"kind": "concat", "inputs": ["channel", "tier"]},
        },
    ]
    assert segment_reads_features(spec(context_variables=built_on_a_feature))
    assert not segment_reads_features(spec(context_variables=[]))


# Eligibility rules ----------------------------------------------------------------------------


def rule(operator: str, target: Any) -> EligibilityRule:
    return EligibilityRule.model_validate({"variable": "v", "operator": operator, "value": target})


@pytest.mark.parametrize(
    ("operator", "target", "value", "holds"),
    [
        ("eq", "gold", "gold", True),
        ("eq", "gold", "silver", False),
        ("eq", 25, "25", True),
        ("eq", 25, 25.0, True),
        ("eq", "25", "25.0", True),
        ("ne", "none", "some", True),
        ("ne", "none", "none", False),
        ("in", ["a", "b"], "b", True),
        ("in", ["a", "b"], "c", False),
        ("in", [1, 2], "2.0", True),
        ("not_in", ["a", "b"], "c", True),
        ("not_in", ["a", "b"], "a", False),
        ("gt", 18, 18.5, True),
        ("gt", 18, 18, False),
        ("ge", 18, 18, True),
        ("ge", 18, "20", True),
        ("lt", 18, 17, True),
        ("le", 18, 18.0, True),
        ("le", 18, 18.01, False),
        ("ge", 18, "not a number", False),
        ("eq", "gold", None, False),  # a missing value fails every rule
        ("ne", "gold", None, False),
        ("not_in", ["a"], None, False),
    ],
)
def test_eligibility_rules(operator: str, target: Any, value: Any, holds: bool) -> None:
    assert rule_holds(rule(operator, target), value) is holds


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "channel": st.sampled_from(["app", "web", "call", 1, 1.0, "1", "1.0", None, "app" * 30]),
                "age": st.one_of(st.none(), st.sampled_from([17, 18, 18.0, "18", "x"]), st.floats(0, 99)),
                "unrelated": st.text(max_size=3),
            }
        ),
        min_size=1,
        max_size=30,
    )
)
def test_remembered_eligibility_is_the_rules_answer_for_every_context(contexts: list[dict[str, Any]]) -> None:
    offers = [
        Offer.model_validate({"id": "any", "name": "any"}),
        Offer.model_validate(
            {
                "id": "digital",
                "name": "digital",
                "eligibility": [{"variable": "channel", "operator": "in", "value": ["app", "web"]}],
            }
        ),
        Offer.model_validate(
            {
                "id": "one",
                "name": "one",
                "eligibility": [{"variable": "channel", "operator": "eq", "value": "1"}],
            }
        ),
        Offer.model_validate(
            {
                "id": "adult-app",
                "name": "adult-app",
                "eligibility": [
                    {"variable": "age", "operator": "ge", "value": 18},
                    {"variable": "channel", "operator": "ne", "value": "web"},
                ],
            }
        ),
        Offer.model_validate({"id": "off", "name": "off", "weighting": 0}),
    ]
    rules = EligibilityRules(offers)
    for context in contexts + contexts:  # each context twice: computed, then remembered
        values = {name: value for name, value in context.items() if value is not None}
        assert rules.eligible(values) == eligible_offers(offers, values)


# Experiment variants --------------------------------------------------------------------------


def test_variants_are_sticky_per_customer_and_split_by_weight() -> None:
    runtime = PreparedDeployment.prepare(
        DeploymentSpec.model_validate(
            {
                "name": "experiment",
                "offers": [{"id": "a"}, {"id": "b"}],
                "exploration_epsilon": 0.05,
                "variants": [
                    {"name": "control", "weight": 3},
                    {
                        "name": "greedy",
                        "weight": 1,
                        "algorithm": {"approach": "epsilon_greedy"},
                        "exploration_epsilon": 0.2,
                    },
                ],
            }
        )
    )
    assigned = Counter(runtime.variant_for(f"customer-{i}").name for i in range(4000))
    assert set(assigned) == {"control", "greedy"}
    # Weights 3:1; 4000 customers: the share's standard error is 0.007.
    assert abs(assigned["greedy"] / 4000 - 0.25) < 0.03
    for i in range(50):
        assert runtime.variant_for(f"customer-{i}") is runtime.variant_for(f"customer-{i}")
    greedy = runtime.plans["greedy"]
    assert (greedy.algorithm.approach, greedy.epsilon) == ("epsilon_greedy", 0.2)
    assert (runtime.plans["control"].algorithm.approach, runtime.plans["control"].epsilon) == (
        "thompson",
        0.05,
    )


def test_without_variants_everyone_gets_the_default_plan() -> None:
    runtime = PreparedDeployment.prepare(
        DeploymentSpec.model_validate({"name": "x", "offers": [{"id": "a"}]})
    )
    assert runtime.variant_for("anyone").name == ""
