"""The ecosystem.Ai payload mapping on its own: every form that runtime's clients send, and bad
values refused naming the field (the same payloads go through Envoy in tests/e2e/test_predictor_rest.py)."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest

from libs.common.errors import InvalidArgument
from libs.policy.context import parse_params
from services.predictor.core.ecosystem_api import flatten_reply, offer_names, read_invocation, read_response

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("customer", "expected"),
    [(None, "none"), ("", "none"), ("c-1", "c-1"), (1234, "1234"), (1234.0, "1234"), (12.5, "12.5")],
)
def test_customer_is_text_and_defaults_to_none(customer: Any, expected: str) -> None:
    payload = {"campaign": "c"} if customer is None else {"campaign": "c", "customer": customer}
    assert read_invocation(payload).request.customer == expected


@pytest.mark.parametrize("value", [True, {"id": 1}, [1], float("nan")])
def test_a_customer_that_is_not_text_or_a_number_is_refused(value: Any) -> None:
    with pytest.raises(InvalidArgument) as caught:
        read_invocation({"campaign": "c", "customer": value})
    assert caught.value.field == "customer"


def test_params_in_every_form_and_flatten_json_wherever_it_is() -> None:
    arrays = {"input": ["channel", "gender"], "value": ["web", "f"]}
    for params in (arrays, json.dumps(arrays), urllib.parse.quote(json.dumps(arrays))):
        read = read_invocation({"campaign": "c", "params": params})
        assert read.params == {"channel": "web", "gender": "f"}
        assert read.flatten is False
    read = read_invocation({"campaign": "c", "in_param": {"flatten_json": True, "a": 1}, "params": {"a": 2}})
    assert (read.flatten, read.params) == (True, {"a": 2})  # params win over in_param
    assert read_invocation({"campaign": "c", "flatten_json": "true"}).flatten is True
    with pytest.raises(InvalidArgument) as caught:
        parse_params({"input": ["a", "b"], "value": [1]})
    assert caught.value.field == "params.value"


def test_unknown_fields_are_reported_not_fatal() -> None:
    read = read_invocation({"campaign": "c", "custmer": "x"})
    assert read.warnings == ["unknown field 'custmer' ignored"]
    assert read.request.customer == "none"


def test_flattened_keys_join_nested_names_and_indices() -> None:
    flat = flatten_reply(
        {"uuid": "u", "final_result": [{"result": {"offer": "a", "context": {}}}], "warnings": []}
    )
    assert flat == {
        "uuid": "u",
        "final_result_0_result_offer": "a",
        "final_result_0_result_context": {},
        "warnings": [],
    }


def test_every_offers_accepted_form() -> None:
    rows = [{"result": {"offer": "a", "offer_name": "A"}}, {"result": {"offer": "b"}}]
    assert offer_names("a, b", "offers_accepted") == ["a", "b"]
    assert offer_names(["a", "b"], "offers_accepted") == ["a", "b"]
    assert offer_names([{"offer_name": "A"}, {"offer_id": "b"}, {"offer": "c"}], "offers_accepted") == [
        "A",
        "b",
        "c",
    ]
    assert offer_names(rows, "offers_accepted") == ["a", "b"]
    with pytest.raises(InvalidArgument) as caught:
        offer_names([7], "offers_accepted")
    assert caught.value.field == "offers_accepted"
    # The /invocations reply echoed back: every offer it lists, and none of its keys is "unknown".
    echoed = {"uuid": "u", "final_result": rows, "deployment": "d", "explore": 0, "in_params": {}}
    read = read_response(echoed)
    assert (read.request.uuid, list(read.request.accepted), read.warnings) == ("u", ["a", "b"], [])
    # An explicit offers_accepted wins over the echo.
    assert list(read_response({**echoed, "offers_accepted": []}).request.accepted) == []


def test_reward_and_event_time_forms() -> None:
    read = read_response({"uuid": "u", "reward": "2.5", "event_time": "2026-01-02T03:04:05Z"})
    assert read.request.reward == 2.5
    assert read.request.event_time == 1767323045.0
    assert read_response({"uuid": "u", "event_time": 1767323045}).request.event_time == 1767323045.0
    for payload, name in (
        ({"uuid": "u", "reward": "lots"}, "reward"),
        ({"uuid": "u", "event_time": "yesterday"}, "event_time"),
        ({"uuid": "u", "event_time": "2026-01-02T03:04:05"}, "event_time"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            read_response(payload)
        assert caught.value.field == name
