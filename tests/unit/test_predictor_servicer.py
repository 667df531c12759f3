"""The predictor's protobuf <-> domain conversions and campaign resolution, without a server."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.config_follower import AppliedConfig, AppliedDeployment
from libs.common.deployment_spec import DeploymentSpec
from libs.common.errors import InvalidArgument, NotFound
from libs.policy.deployment import PreparedDeployment
from libs.protos.liveloop.predictor.v1 import predictor_pb2
from services.predictor.core.decision import DecisionEngine, InvokeInput
from services.predictor.servicer import _accepted_offers, _event_time, _plain

pytestmark = pytest.mark.timeout(30)


def value(item: Any) -> Value:
    holder = Struct()
    holder.update({"v": item})
    return holder.fields["v"]


@pytest.mark.parametrize(
    "item",
    [None, "3", 3.0, True, {"a": [1.0, "x", None, {"b": False}]}, [], {}],
)
def test_values_become_plain_python(item: Any) -> None:
    assert _plain(value(item)) == item


def test_non_finite_numbers_come_through_for_the_core_to_refuse() -> None:
    assert math.isinf(_plain(value(math.inf)))
    assert math.isnan(_plain(value({"n": math.nan}))["n"])
    assert _plain(Value()) is None  # no kind set


@pytest.mark.parametrize(
    ("offers_accepted", "expected"),
    [
        ("d1", ["d1"]),
        ("d1, d2", ["d1", "d2"]),
        (["d1", "Data 5 GB"], ["d1", "Data 5 GB"]),
        ([{"offer_name": "Data 5 GB"}, {"offer": "d3"}], ["Data 5 GB", "d3"]),
        ({"offer_name": "d1"}, ["d1"]),
        ([], []),
        ("", []),
        (None, []),
    ],
)
def test_offers_accepted_forms(offers_accepted: Any, expected: list[str]) -> None:
    request = predictor_pb2.RespondRequest(uuid="u")
    request.offers_accepted.CopyFrom(value(offers_accepted))
    assert _accepted_offers(request) == expected


def test_typed_accepted_offers_merge_with_offers_accepted() -> None:
    request = predictor_pb2.RespondRequest(uuid="u", accepted_offers=["d9"])
    request.offers_accepted.CopyFrom(value(["d1"]))
    assert _accepted_offers(request) == ["d9", "d1"]


@pytest.mark.parametrize("bad", [5, [5], [["d1"]], [{"name": "d1"}], [{"offer_name": 3}], True, math.nan])
def test_bad_offers_accepted_name_the_field(bad: Any) -> None:
    request = predictor_pb2.RespondRequest(uuid="u")
    request.offers_accepted.CopyFrom(value(bad))
    with pytest.raises(InvalidArgument) as error:
        _accepted_offers(request)
    assert error.value.field == "offers_accepted"


@pytest.fixture
def new_york() -> Iterator[None]:
    """A machine whose local time is not UTC."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.mark.usefixtures("new_york")
def test_event_time_is_seconds_since_the_epoch_whatever_the_local_zone() -> None:
    request = predictor_pb2.RespondRequest(
        uuid="u", event_time=Timestamp(seconds=1_700_000_000, nanos=500_000_000)
    )
    assert _event_time(request) == 1_700_000_000.5
    assert _event_time(predictor_pb2.RespondRequest(uuid="u")) is None


@pytest.mark.parametrize("seconds", [10**13, -(10**13)])
def test_an_impossible_event_time_names_the_field(seconds: int) -> None:
    request = predictor_pb2.RespondRequest(uuid="u", event_time=Timestamp(seconds=seconds))
    with pytest.raises(InvalidArgument) as error:
        _event_time(request)
    assert error.value.field == "event_time"


def deployments(name: str, campaign: str) -> dict[str, AppliedDeployment]:
    spec = DeploymentSpec.model_validate({"name": name, "campaigns": [campaign], "offers": [{"id": "a"}]})
    return {name: AppliedDeployment(name, 1, "", spec, PreparedDeployment.prepare(spec))}


def test_campaigns_resolve_against_the_config_being_served_across_many_swaps() -> None:
    """Configs come and go; a cache keyed by id() would serve a freed config's campaigns to a new
    config allocated at the same address (CPython reuses it at once)."""
    engine = DecisionEngine(options=None, replica_id="r")  # type: ignore[arg-type]
    versions = [deployments("dep-x", "campaign-x"), deployments("dep-y", "campaign-y")]
    for revision in range(1, 50):
        served, other = revision % 2, 1 - revision % 2
        config = AppliedConfig(revision, versions[served], "stream")
        request = InvokeInput(f"campaign-{'xy'[served]}", "", "", "c", "", None, None, None)
        assert engine._resolve(config, request).spec.name == f"dep-{'xy'[served]}"
        gone = InvokeInput(f"campaign-{'xy'[other]}", "", "", "c", "", None, None, None)
        with pytest.raises(NotFound):
            engine._resolve(config, gone)
        del config  # freed here: the next config may well get its address
