"""The deployment spec schema: parsing, canonical form, defaults, and errors that name the field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common.deployment_spec import (
    MAX_SPEC_BYTES,
    DeploymentSpec,
    canonical_json,
    deployment_spec_from_mapping,
    parse_deployment_spec,
    spec_checksum,
    spec_diff,
)
from libs.common.errors import InvalidArgument

pytestmark = pytest.mark.timeout(60)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deployments" / "telco-offers.yaml"

Document = dict[str, Any]


def minimal() -> Document:
    """A small valid spec that the bad cases below each break in one place."""
    return {
        "name": "unit-spec",
        "offers": [{"id": "a"}, {"id": "b", "price": 2.5}, {"id": "c", "price": 1.0}],
        "context_variables": [
            {"name": "age", "source": "feature", "kind": "numeric", "default": 30},
            {"name": "gender", "source": "feature", "default": "unknown"},
        ],
    }


def refusal(document: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        deployment_spec_from_mapping(document)
    return raised.value


def test_the_example_parses() -> None:
    spec = parse_deployment_spec(EXAMPLE.read_text())
    assert spec.name == "telco-offers"
    assert spec.campaigns == ["telco-offers", "app-home"]
    assert [offer.id for offer in spec.offers][:2] == ["data-1gb", "data-5gb"]
    assert spec.algorithm.approach == "thompson"
    assert spec.segment_variables == ["age_band", "gender", "channel"]


def test_yaml_and_json_of_one_spec_give_the_same_canonical_json_and_checksum() -> None:
    text = EXAMPLE.read_text()
    document = yaml.safe_load(text)
    from_yaml = parse_deployment_spec(text, "yaml")
    from_json = parse_deployment_spec(json.dumps(document, indent=4))  # format detected
    from_compact_json = parse_deployment_spec(json.dumps(document), "json")
    canonical = canonical_json(from_yaml)
    assert canonical == canonical_json(from_json) == canonical_json(from_compact_json)
    assert spec_checksum(canonical) == spec_checksum(canonical_json(from_json))
    assert len(spec_checksum(canonical)) == 64
    # Canonical JSON is sorted and compact, and reparses to the same spec.
    assert canonical == json.dumps(json.loads(canonical), sort_keys=True, separators=(",", ":"))
    assert parse_deployment_spec(canonical) == from_yaml


def test_key_order_does_not_change_the_canonical_form() -> None:
    document = minimal()
    reordered = dict(reversed(list(document.items())))
    assert canonical_json(deployment_spec_from_mapping(document)) == canonical_json(
        deployment_spec_from_mapping(reordered)
    )


def test_defaults_are_filled() -> None:
    spec = deployment_spec_from_mapping(minimal())
    assert spec.campaigns == ["unit-spec"]
    assert [offer.name for offer in spec.offers] == ["a", "b", "c"]
    assert spec.offers[0].price == 0.0
    assert spec.offers[0].weighting == 1.0
    assert spec.context_variables[0].field == "age"
    assert spec.environment == "dev"
    assert spec.algorithm.approach == "thompson"
    assert spec.default_number_of_offers == 1
    # Defaults omitted and defaults written out are the same spec, with the same checksum.
    explicit = minimal() | {
        "campaigns": ["unit-spec"],
        "environment": "dev",
        "algorithm": {"approach": "thompson"},
    }
    explicit["offers"][0] |= {"name": "a", "price": 0, "weighting": 1.0}
    assert canonical_json(deployment_spec_from_mapping(explicit)) == canonical_json(spec)


def test_a_named_offer_keeps_its_name_and_explicit_campaigns_stay() -> None:
    document = minimal() | {"campaigns": ["home", "checkout"]}
    document["offers"][0]["name"] = "Offer A"
    spec = deployment_spec_from_mapping(document)
    assert spec.offers[0].name == "Offer A"
    assert spec.campaigns == ["home", "checkout"]


def _set(path: str, value: Any) -> Callable[[Document], None]:
    """A mutation that sets one nested key, the path written as in the error (`offers[2].price`)."""

    def mutate(document: Document) -> None:
        parts = path.replace("[", ".").replace("]", "").split(".")
        node: Any = document
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = parts[-1]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _add_variable(variable: Document) -> Callable[[Document], None]:
    return lambda document: document["context_variables"].append(variable)


def _discretize(edges: list[float], labels: list[str], source: str = "age") -> Document:
    return {
        "name": "band",
        "source": "virtual",
        "transform": {"kind": "discretize", "input": source, "edges": edges, "labels": labels},
    }


BAD_SPECS: list[tuple[str, Callable[[Document], None], str, str]] = [
    # (case, mutation, field named by the error, a word of the message)
    ("negative price", _set("offers[2].price", -1), "offers[2].price", "greater than or equal to 0"),
    ("negative cost", _set("offers[0].cost", -0.5), "offers[0].cost", "greater than or equal to 0"),
    ("duplicate offer id", _set("offers[2].id", "a"), "offers[2].id", "appears twice"),
    ("duplicate offer name", _set("offers[1].name", "a"), "offers[1].name", "appears twice"),
    ("bad offer id", _set("offers[1].id", "-x"), "offers[1].id", "pattern"),
    ("no offers", _set("offers", []), "offers", "at least 1"),
    ("unknown top-level key", _set("colour", "red"), "colour", "Extra inputs"),
    ("unknown offer key", _set("offers[1].colour", "red"), "offers[1].colour", "Extra inputs"),
    (
        "unknown algorithm key",
        _set("algorithm", {"approach": "thompson", "gamma": 1}),
        "algorithm.gamma",
        "Extra",
    ),
    ("unknown algorithm approach", _set("algorithm", {"approach": "magic"}), "algorithm.approach", "'magic'"),
    ("algorithm without approach", _set("algorithm", {"alpha0": 2}), "algorithm.approach", "approach"),
    (
        "bad algorithm parameter",
        _set("algorithm", {"approach": "thompson", "alpha0": 0}),
        "algorithm.alpha0",
        "greater than 0",
    ),
    ("epsilon above one", _set("exploration_epsilon", 1.5), "exploration_epsilon", "less than or equal to 1"),
    (
        "discretize edges not increasing",
        _add_variable(_discretize([40, 25], ["a", "b", "c"])),
        "context_variables[2].transform.edges",
        "strictly increasing",
    ),
    (
        "discretize edges repeat",
        _add_variable(_discretize([25, 25], ["a", "b", "c"])),
        "context_variables[2].transform.edges",
        "strictly increasing",
    ),
    (
        "discretize labels count wrong",
        _add_variable(_discretize([25, 40], ["a", "b"])),
        "context_variables[2].transform.labels",
        "2 edges need 3 labels",
    ),
    (
        "discretize of a categorical input",
        _add_variable(_discretize([1], ["a", "b"], "gender")),
        "context_variables[2].transform",
        "numeric input",
    ),
    (
        "unknown transform kind",
        _add_variable({"name": "band", "source": "virtual", "transform": {"kind": "log", "input": "age"}}),
        "context_variables[2].transform.kind",
        "'log'",
    ),
    (
        "virtual variable without transform",
        _add_variable({"name": "band", "source": "virtual"}),
        "context_variables[2].transform",
        "needs a transform",
    ),
    (
        "transform on a feature variable",
        _add_variable(
            {
                "name": "band",
                "source": "feature",
                "transform": {"kind": "concat", "inputs": ["age", "gender"]},
            }
        ),
        "context_variables[2].transform",
        "only virtual",
    ),
    (
        "transform input undefined",
        _add_variable(_discretize([25], ["a", "b"], "height")),
        "context_variables[2].transform",
        "'height'",
    ),
    (
        "concat input undefined",
        _add_variable(
            {
                "name": "seg",
                "source": "virtual",
                "transform": {"kind": "concat", "inputs": ["gender", "region"]},
            }
        ),
        "context_variables[2].transform",
        "'region'",
    ),
    (
        "variable defined twice",
        _add_variable({"name": "age", "source": "param"}),
        "context_variables[2].name",
        "defined twice",
    ),
    (
        "unknown variable source",
        _set("context_variables[1].source", "guess"),
        "context_variables[1].source",
        "feature",
    ),
    (
        "eligibility on an unknown variable",
        _set("offers[1].eligibility", [{"variable": "region", "operator": "eq", "value": "x"}]),
        "offers[1].eligibility[0].variable",
        "'region'",
    ),
    (
        "eligibility with an unknown operator",
        _set("offers[0].eligibility", [{"variable": "age", "operator": "about", "value": 1}]),
        "offers[0].eligibility[0].operator",
        "'eq'",
    ),
    (
        "`in` operator with a scalar",
        _set("offers[2].eligibility", [{"variable": "gender", "operator": "in", "value": "f"}]),
        "offers[2].eligibility[0].value",
        "needs a list",
    ),
    (
        "`eq` operator with a list",
        _set("offers[2].eligibility", [{"variable": "gender", "operator": "eq", "value": ["f"]}]),
        "offers[2].eligibility[0].value",
        "single value",
    ),
    (
        "`gt` operator with a string",
        _set("offers[2].eligibility", [{"variable": "age", "operator": "gt", "value": "old"}]),
        "offers[2].eligibility[0].value",
        "needs a number",
    ),
    (
        "linucb feature not numeric",
        _set("algorithm", {"approach": "linucb", "features": ["age", "gender"]}),
        "algorithm.features",
        "'gender'",
    ),
    (
        "linucb feature undefined",
        _set("algorithm", {"approach": "linucb", "features": ["income"]}),
        "algorithm.features",
        "'income'",
    ),
    (
        "linear thompson feature not numeric in a variant",
        _set(
            "variants",
            [
                {
                    "name": "v1",
                    "weight": 1,
                    "algorithm": {"approach": "linear_thompson", "features": ["gender"]},
                }
            ],
        ),
        "variants[0].algorithm.features",
        "'gender'",
    ),
    (
        "model algorithm without a binding",
        _set("algorithm", {"approach": "model"}),
        "model",
        "needs a model binding",
    ),
    (
        "variant model algorithm without a binding",
        _set("variants", [{"name": "v1", "weight": 1, "algorithm": {"approach": "model"}}]),
        "variants[0].model",
        "needs a model binding",
    ),
    (
        "thompson with a model prior but no binding",
        _set("algorithm", {"approach": "thompson", "model_prior_weight": 20}),
        "model",
        "model_prior_weight > 0 needs a model binding",
    ),
    (
        "model binding version zero",
        _set("model", {"name": "m", "version": 0}),
        "model.version",
        "greater than or equal to 1",
    ),
    (
        "variant weight zero",
        _set("variants", [{"name": "v1", "weight": 0}]),
        "variants[0].weight",
        "greater than 0",
    ),
    (
        "duplicate variant names",
        _set("variants", [{"name": "v1", "weight": 1}, {"name": "v1", "weight": 2}]),
        "variants[1].name",
        "appears twice",
    ),
    ("campaign names repeat", _set("campaigns", ["x", "x"]), "campaigns", "repeat"),
    ("bad deployment name (capitals, space)", _set("name", "Telco Offers"), "name", "pattern"),
    ("bad deployment name (empty)", _set("name", ""), "name", "pattern"),
    ("bad deployment name (too long)", _set("name", "a" * 64), "name", "pattern"),
    ("deployment name not a string", _set("name", 7), "name", "string"),
    (
        "bad plugin stage",
        _set("plugins", [{"name": "p", "stage": "middle"}]),
        "plugins[0].stage",
        "pre_score",
    ),
    (
        "bad feature lookup key",
        _set("feature_lookup", {"feature_view": "customers", "key": "msisdn"}),
        "feature_lookup.key",
        "'customer'",
    ),
    ("reward window zero", _set("reward", {"window_seconds": 0}), "reward.window_seconds", "greater than 0"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [pytest.param(mutate, field, words, id=case) for case, mutate, field, words in BAD_SPECS],
)
def test_a_bad_spec_is_refused_naming_the_field(
    mutate: Callable[[Document], None], field: str, words: str
) -> None:
    document = minimal()
    mutate(document)
    error = refusal(document)
    assert error.status == "INVALID_ARGUMENT"
    assert error.field == field, error.message
    assert error.message.startswith(f"{field}: "), error.message
    assert words in error.message


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        pytest.param(
            _set("offers[2].eligibility", [{"variable": "gender", "operator": "in", "value": "f"}]),
            "offers[2].eligibility[0].value",
            id="in-with-a-scalar",
        ),
        pytest.param(
            _add_variable({"name": "band", "source": "virtual"}),
            "context_variables[2].transform",
            id="virtual-without-transform",
        ),
        pytest.param(_set("algorithm", {"approach": "magic"}), "algorithm.approach", id="unknown-approach"),
    ],
)
def test_nested_errors_name_the_leaf_field(mutate: Callable[[Document], None], field: str) -> None:
    document = minimal()
    mutate(document)
    assert refusal(document).field == field


def test_several_errors_are_counted_and_the_first_named() -> None:
    document = minimal()
    document["offers"][0]["price"] = -1
    document["offers"][1]["cost"] = -1
    error = refusal(document)
    assert error.field == "offers[0].price"
    assert "(and 1 more)" in error.message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[1, 2", "not valid YAML"),
        ('{"name": "x",', "not valid JSON"),
        ("- just\n- a list\n", "mapping"),
        ("just a string", "mapping"),
        ("", "mapping"),
    ],
)
def test_text_that_is_not_a_spec_mapping_is_refused_naming_spec(text: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_deployment_spec(text)
    assert raised.value.field == "spec"
    assert words in raised.value.message


def _spec_text_of_size(category: str, offers: int = 10_000) -> str:
    document = minimal() | {"offers": [{"id": f"offer-{i}", "category": category} for i in range(offers)]}
    return json.dumps(document, ensure_ascii=False)


def test_a_spec_over_one_mebibyte_is_refused_naming_spec() -> None:
    text = _spec_text_of_size("x" * 100)
    assert len(text.encode()) > MAX_SPEC_BYTES
    with pytest.raises(InvalidArgument) as raised:
        parse_deployment_spec(text)
    assert raised.value.field == "spec"
    assert f"the limit is {MAX_SPEC_BYTES}" in raised.value.message


def test_the_size_limit_counts_utf8_bytes_not_characters() -> None:
    accented = _spec_text_of_size("é" * 60)
    assert len(accented) < MAX_SPEC_BYTES < len(accented.encode())
    with pytest.raises(InvalidArgument) as raised:
        parse_deployment_spec(accented)
    assert raised.value.field == "spec"
    # Just under the limit in bytes is accepted.
    plain = _spec_text_of_size("x" * 60)
    assert MAX_SPEC_BYTES - 200_000 < len(plain.encode()) <= MAX_SPEC_BYTES
    assert len(parse_deployment_spec(plain).offers) == 10_000


def test_spec_diff_names_the_changed_field() -> None:
    old = canonical_json(deployment_spec_from_mapping(minimal()))
    changed = minimal()
    changed["offers"][1]["price"] = 3.0
    new = canonical_json(deployment_spec_from_mapping(changed))
    diff = spec_diff(old, new, "old", "new")
    assert diff.startswith("--- old\n+++ new\n")
    assert '-      "price": 2.5,' in diff
    assert '+      "price": 3.0,' in diff
    assert spec_diff(old, old, "old", "new") == ""
    assert spec_diff("", new, "/dev/null", "new").count("\n+") > 10


# Property: the canonical form is a fixed point ---------------------------------------------------

_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
_scalars = st.one_of(
    st.text(max_size=8), st.integers(-1000, 1000), st.floats(-1e6, 1e6, allow_nan=False), st.booleans()
)


@st.composite
def deployment_documents(draw: st.DrawFn) -> Document:
    offer_ids = draw(
        st.lists(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True),
            min_size=1,
            max_size=5,
            unique=True,
        )
    )
    numeric = draw(st.booleans())
    variables: list[Document] = [
        {"name": "num", "source": "feature", "kind": "numeric", "default": draw(st.integers(0, 99))},
        {
            "name": "cat",
            "source": draw(st.sampled_from(["feature", "param"])),
            "default": draw(st.text(max_size=5)),
        },
    ]
    if numeric:
        edges = sorted(draw(st.sets(st.integers(-50, 50), min_size=1, max_size=4)))
        variables.append(
            {
                "name": "band",
                "source": "virtual",
                "transform": {
                    "kind": "discretize",
                    "input": "num",
                    "edges": edges,
                    "labels": [f"l{i}" for i in range(len(edges) + 1)],
                },
            }
        )
    offers = []
    for offer_id in offer_ids:
        offer: Document = {"id": offer_id, "price": draw(st.floats(0, 1000, allow_nan=False))}
        if draw(st.booleans()):
            offer["eligibility"] = [
                {"variable": "cat", "operator": "in", "value": draw(st.lists(_scalars, max_size=3))}
            ]
        if draw(st.booleans()):
            offer["attributes"] = draw(st.dictionaries(_names, _scalars, max_size=3))
        offers.append(offer)
    algorithm = draw(
        st.sampled_from(
            [
                {"approach": "thompson", "half_life_seconds": 3600},
                {"approach": "epsilon_greedy"},
                {"approach": "naive_bayes", "smoothing": 0.5},
                {"approach": "linucb", "features": ["num"]},
            ]
        )
    )
    return {
        "name": draw(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,12}", fullmatch=True)),
        "description": draw(st.text(max_size=20)),
        "offers": offers,
        "context_variables": variables,
        "algorithm": algorithm,
        "exploration_epsilon": draw(st.floats(0, 1, allow_nan=False)),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deployment_documents())
def test_canonical_json_is_a_fixed_point(document: Document) -> None:
    spec = deployment_spec_from_mapping(copy.deepcopy(document))
    canonical = canonical_json(spec)
    again = parse_deployment_spec(canonical)
    assert again == spec
    assert canonical_json(again) == canonical
    assert spec_checksum(canonical_json(again)) == spec_checksum(canonical)
    # The YAML rendering of the canonical form lands on the same canonical text too.
    assert canonical_json(parse_deployment_spec(yaml.safe_dump(json.loads(canonical)), "yaml")) == canonical


def test_a_parsed_spec_is_immutable() -> None:
    spec = deployment_spec_from_mapping(minimal())
    with pytest.raises(ValueError, match="frozen"):
        spec.name = "other"  # type: ignore[misc]
    assert isinstance(spec, DeploymentSpec)
