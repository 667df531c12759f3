"""The decision log's records: what the predictor writes is what the monitor reads back, field for
field; anything else is refused with a kind to count it by, never a crash."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from libs.common.decision_log import (
    SCHEMA_VERSION,
    Contact,
    FirstSlot,
    MalformedEntry,
    Response,
    ShownOffer,
    decode_entry,
)

pytestmark = pytest.mark.timeout(30)

CONTACT = Contact(
    uuid="6f1c-contact",
    time=1_764_000_000.125,
    deployment="telco-offers",
    campaign="upsell",
    channel="app",
    config_revision=7,
    variant="treatment",
    replica="predictor-2",
    options_generation="3",
    customer="c-42",
    segment="gender=f|channel=app",
    context={"gender": "f", "channel": "app", "age": 31.0},
    features={"gender": "f", "age": "31", "tenure": "12"},
    eligible=["data-1", "voice-2", "roaming-3"],
    eligible_scores=[0.123457, 0.0456, 0.0],
    first_slot=FirstSlot(epsilon=0.05, outcomes=256, counts=[200, 56, 0]),
    shown=[
        ShownOffer("data-1", 1, 0.123457, 0.05 / 3 + 0.95 * 200 / 256, False, 0.31),
        ShownOffer("voice-2", 2, 0.0456, 0.9876, False, None),
    ],
    explore=False,
    model="take-up:4",
    latency_ms=1.234,
)

RESPONSE = Response(
    uuid="6f1c-contact",
    time=1_764_000_003.5,
    deployment="telco-offers",
    accepted=["data-1"],
    learned_offers=["data-1"],
    reward=None,
    channel="sms",
    learned=True,
    late=False,
    duplicate=False,
    replica="predictor-1",
)


def as_redis_returns_it(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {key.encode(): value.encode() for key, value in fields.items()}


@pytest.mark.parametrize("record", [CONTACT, RESPONSE], ids=["contact", "response"])
def test_a_record_comes_back_field_for_field(record: Contact | Response) -> None:
    entry = record.encode()
    assert entry["schema"] == str(SCHEMA_VERSION)
    assert entry["uuid"] == record.uuid
    assert decode_entry(entry) == record
    assert decode_entry(as_redis_returns_it(entry)) == record  # bytes, as XREAD returns them


def test_first_slot_propensities_are_exact_and_sum_to_one() -> None:
    propensities = CONTACT.first_slot_propensities()
    assert propensities == [0.05 / 3 + 0.95 * 200 / 256, 0.05 / 3 + 0.95 * 56 / 256, 0.05 / 3]
    assert sum(propensities) == pytest.approx(1.0)
    assert propensities[0] == CONTACT.shown[0].propensity


def test_scores_keep_six_decimals_and_propensities_every_digit() -> None:
    precise = Contact(**{**CONTACT.__dict__, "eligible_scores": [0.12345678901, 1e-9, 2.5]})
    back = decode_entry(precise.encode())
    assert isinstance(back, Contact)
    assert back.eligible_scores == [0.123457, 0.0, 2.5]
    assert back.shown[0].propensity == CONTACT.shown[0].propensity


def body_with(**changes: object) -> dict[str, str]:
    entry = CONTACT.encode()
    body = json.loads(entry["body"])
    body.update(changes)
    return {**entry, "body": json.dumps(body)}


@pytest.mark.parametrize(
    ("entry", "kind"),
    [
        ({**CONTACT.encode(), "schema": "99"}, "unknown_schema"),
        ({key: value for key, value in CONTACT.encode().items() if key != "schema"}, "unknown_schema"),
        ({**CONTACT.encode(), "kind": "impression"}, "unknown_kind"),
        ({**CONTACT.encode(), "uuid": ""}, "missing_uuid"),
        ({**CONTACT.encode(), "body": "{not json"}, "malformed_body"),
        ({**CONTACT.encode(), "body": "[]"}, "malformed_body"),
        (body_with(scores=[0.1]), "malformed_body"),
        (body_with(counts=[1, 2]), "malformed_body"),
        (body_with(shown=[["data-1", 1]]), "malformed_body"),
        (body_with(outcomes=0), "malformed_body"),
        (body_with(counts=[-5, 1, 0]), "malformed_body"),
        (body_with(counts=[1, 1, 1]), "malformed_body"),
        (body_with(epsilon=1.5), "malformed_body"),
        (body_with(explore="false"), "malformed_body"),
        ({**CONTACT.encode(), "body": '{"time": Infinity}'}, "malformed_body"),
        ({**CONTACT.encode(), "body": "[" * 100_000}, "malformed_body"),
        (body_with(time=10**400), "malformed_body"),
        ({b"kind": b"contact", b"uuid": b"u", b"schema": b"1", b"body": b"\xff\xfe"}, "not_text"),
        ({**RESPONSE.encode(), "body": json.dumps({"time": 1})}, "malformed_body"),
    ],
    ids=[
        "future-schema",
        "no-schema",
        "unknown-kind",
        "no-uuid",
        "not-json",
        "not-an-object",
        "scores-and-offers-differ",
        "counts-and-offers-differ",
        "short-shown-row",
        "no-outcomes",
        "negative-count",
        "counts-not-the-outcomes",
        "epsilon-above-one",
        "explored-as-text",
        "infinity",
        "nested-too-deep",
        "time-too-large",
        "not-utf8",
        "response-missing-fields",
    ],
)
def test_an_entry_that_is_not_a_record_is_refused_with_a_kind(entry: dict[str, str], kind: str) -> None:
    with pytest.raises(MalformedEntry) as refused:
        decode_entry(entry)
    assert refused.value.kind == kind


def test_a_contact_costs_about_this_many_bytes() -> None:
    """The whole entry of a contact with 3 eligible offers, 2 shown, 3 context values and 3 features."""
    size = sum(len(key) + len(value) for key, value in CONTACT.encode().items())
    assert 500 < size < 1000, size


def test_numpy_numbers_are_written_as_numbers_and_a_time_that_is_not_finite_is_refused_on_reading() -> None:
    from_numpy = dataclasses.replace(
        CONTACT,
        time=np.float64(CONTACT.time),
        eligible_scores=np.array(CONTACT.eligible_scores),
        first_slot=FirstSlot(0.05, 256, np.array([200, 56, 0])),
    )
    assert decode_entry(as_redis_returns_it(from_numpy.encode())) == CONTACT
    # A number that is not finite is written as null (orjson), which reading refuses: the monitor
    # counts it as malformed rather than learning from it.
    with pytest.raises(MalformedEntry) as refused:
        decode_entry(as_redis_returns_it(dataclasses.replace(CONTACT, time=math.nan).encode()))
    assert refused.value.kind == "malformed_body"


def test_text_orjson_cannot_write_is_written_and_read_back_as_json_escapes_it() -> None:
    """A lone surrogate (from a "\\ud800" escape a client sent) is no UTF-8: orjson refuses it, json
    writes it escaped, and reading gives it back."""
    odd = dataclasses.replace(CONTACT, features={**CONTACT.features, "note": "gold\ud800"})
    entry = odd.encode()
    assert "\\ud800" in entry["body"]
    assert decode_entry(entry) == odd
