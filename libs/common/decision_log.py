"""The decision log: what the predictor writes to the Redis stream `ll:decisions` for every Invoke
(a contact) and every Respond (a response), and what the monitor and offline evaluation read back.
One module, beside the key layout, so writer and readers agree on every field.

A stream entry has the fields `kind` ("contact" or "response"), `uuid`, `schema` (the
SCHEMA_VERSION it was written with) and `body` (compact JSON; scores rounded to SCORE_DECIMALS places). `decode_entry` turns an entry back
into a `Contact` or a `Response` and raises `MalformedEntry` (with a short `kind` for counting)
for anything else: an unknown schema version, a body that is not the record, a missing field.

Propensities are logged exactly. For the first slot the logging policy's probability for eligible
offer i is epsilon / K + (1 - epsilon) * count_i / outcomes (K eligible offers; the exploiting
branch's outcomes are a randomised scorer's equally likely posterior draws, or a deterministic
scorer's tied best offers): the counts are integers, so the record holds them and not rounded
floats. A shown offer's `propensity` is P(it at its rank | the offers ranked above); see
libs/policy/ranking.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson

SCHEMA_VERSION = 1
SCORE_DECIMALS = 6  # decimal places of the eligible offers' scores (the propensities are exact)

EntryKind = Literal["contact", "response"]


class MalformedEntry(ValueError):
    """A stream entry this module cannot read; `kind` names the problem, for counting."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class ShownOffer:
    offer: str
    rank: int
    score: float
    propensity: float  # P(this offer at this rank | the offers ranked above)
    explored: bool
    model_score: float | None = None


@dataclass(frozen=True)
class FirstSlot:
    """The logging policy's first-slot distribution over the eligible offers, exactly."""

    epsilon: float
    outcomes: int  # the exploiting branch's equally likely outcomes
    counts: Sequence[int]  # per eligible offer: the outcomes that put it first

    def propensity(self, index: int) -> float:
        return self.epsilon / len(self.counts) + (1.0 - self.epsilon) * self.counts[index] / self.outcomes


@dataclass(frozen=True)
class Contact:
    uuid: str
    time: float  # seconds since the epoch, when it was served
    deployment: str
    campaign: str
    channel: str
    config_revision: int
    variant: str
    replica: str
    options_generation: str
    customer: str
    segment: str
    context: Mapping[str, str | float]  # every context variable: categorical as text, numeric as number
    features: Mapping[str, str]  # the online features the context was derived from (defaults filled in)
    eligible: Sequence[str]  # every eligible offer, in the order scored
    eligible_scores: Sequence[float]  # per eligible offer, the value it was ranked by
    first_slot: FirstSlot
    shown: Sequence[ShownOffer]
    explore: bool
    model: str  # the bound model as "name:version"; empty when none
    latency_ms: float
    # The request's sub-campaign and calling user, as the client sent them (entries written
    # before these fields existed read back empty).
    subcampaign: str = ""
    userid: str = ""
    # A shadow decision (the live deployment names this one as its `shadow`): computed for the live
    # contact `shadow_of` of deployment `live_deployment`, logged, never served or learned from.
    shadow_of: str = ""
    live_deployment: str = ""
    # A routed decision: the routing deployment that chose this deployment, and the probability it
    # did (1 for a switch); the whole decision's propensity is this times the shown offer's.
    routed_by: str = ""
    route_propensity: float = 1.0
    schema_version: int = SCHEMA_VERSION

    @property
    def is_shadow(self) -> bool:
        return bool(self.shadow_of)

    def first_slot_propensities(self) -> list[float]:
        """Per eligible offer, P(the logging policy shows it first)."""
        return [self.first_slot.propensity(i) for i in range(len(self.eligible))]

    def encode(self) -> dict[str, str]:
        body = {
            "time": self.time,
            "deployment": self.deployment,
            "campaign": self.campaign,
            "channel": self.channel,
            "revision": self.config_revision,
            "variant": self.variant,
            "replica": self.replica,
            "generation": self.options_generation,
            "customer": self.customer,
            "segment": self.segment,
            "context": dict(self.context),
            "features": dict(self.features),
            "eligible": list(self.eligible),
            "scores": _rounded_all(self.eligible_scores),
            "epsilon": self.first_slot.epsilon,
            "outcomes": self.first_slot.outcomes,
            "counts": list(self.first_slot.counts),
            "shown": [
                [
                    row.offer,
                    row.rank,
                    _rounded(row.score),
                    row.propensity,
                    row.explored,
                    _finite(row.model_score),
                ]
                for row in self.shown
            ],
            "explore": self.explore,
            "model": self.model,
            "latency_ms": round(self.latency_ms, 3),
            "subcampaign": self.subcampaign,
            "userid": self.userid,
        }
        if self.shadow_of:
            body["shadow_of"] = self.shadow_of
            body["live_deployment"] = self.live_deployment
        if self.routed_by:
            body["routed_by"] = self.routed_by
            body["route_propensity"] = self.route_propensity
        return _entry("contact", self.uuid, body)


@dataclass(frozen=True)
class Response:
    uuid: str
    time: float
    deployment: str
    accepted: Sequence[str]  # offers the response credits (ids)
    learned_offers: Sequence[str]  # the accepted offers learned now (empty: late, duplicate, not served)
    reward: float | None  # as sent; None: the deployment's default reward
    channel: str
    learned: bool
    late: bool
    duplicate: bool
    replica: str
    # What the monitor attributes the response to, copied from the contact so that a reader needs
    # no join: the offers accepted here for the first time, the reward each of them earned (the
    # deployment's default when none was sent), and the contact's time, segment, variant and revision.
    # Entries written before these fields existed read back with the defaults.
    new_offers: Sequence[str] = field(default_factory=list)
    credited_reward: float = 1.0
    contact_time: float = 0.0
    segment: str = ""
    variant: str = ""
    config_revision: int = 0
    latency_ms: float = 0.0
    # What the statistics learned is credited_reward times this (a reward plugin's weight; 1 without).
    learning_weight: float = 1.0
    schema_version: int = SCHEMA_VERSION

    def encode(self) -> dict[str, str]:
        body = {
            "time": self.time,
            "deployment": self.deployment,
            "accepted": list(self.accepted),
            "learned_offers": list(self.learned_offers),
            "reward": self.reward,
            "channel": self.channel,
            "learned": self.learned,
            "late": self.late,
            "duplicate": self.duplicate,
            "replica": self.replica,
            "new_offers": list(self.new_offers),
            "credited_reward": self.credited_reward,
            "contact_time": self.contact_time,
            "segment": self.segment,
            "variant": self.variant,
            "revision": self.config_revision,
            "latency_ms": round(self.latency_ms, 3),
        }
        if self.learning_weight != 1.0:
            body["learning_weight"] = self.learning_weight
        return _entry("response", self.uuid, body)


def _entry(kind: EntryKind, uuid: str, body: Mapping[str, Any]) -> dict[str, str]:
    # orjson: a fourteenth of json's CPU for a contact's body. It writes a number that is not finite
    # as null, which `decode_entry` refuses (MalformedEntry), where json.dumps(allow_nan=False)
    # refused to write it; the encoders above send none (scores rounded, model scores checked). Text
    # orjson cannot write (a lone surrogate, from a "\ud800" escape in a request) goes as json writes
    # it, escaped.
    try:
        text = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    except orjson.JSONEncodeError:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False)
    return {"kind": kind, "uuid": uuid, "schema": str(SCHEMA_VERSION), "body": text}


def _rounded_all(values: Sequence[float]) -> list[float]:
    array = np.asarray(values, dtype=np.float64)
    finite = np.where(np.isfinite(array), array, 0.0)
    rounded: list[float] = np.round(finite, SCORE_DECIMALS).tolist()
    return rounded


def _rounded(value: float) -> float:
    return round(value, SCORE_DECIMALS) if math.isfinite(value) else 0.0


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_entry(fields: Mapping[Any, Any]) -> Contact | Response:
    """A stream entry (as XREAD returns its fields, bytes or text) as a record."""
    try:
        entry = {_text(k): _text(v) for k, v in fields.items()}
    except UnicodeDecodeError as exc:
        raise MalformedEntry("not_text", str(exc)) from None
    schema = entry.get("schema", "")
    if schema != str(SCHEMA_VERSION):
        raise MalformedEntry("unknown_schema", f"schema version {schema or '(none)'!r}")
    kind, uuid = entry.get("kind"), entry.get("uuid", "")
    if not uuid:
        raise MalformedEntry("missing_uuid", "no uuid")
    try:
        body = _json_body(entry["body"])
        if kind == "contact":
            return _contact(uuid, body)
        if kind == "response":
            return _response(uuid, body)
    except MalformedEntry:
        raise
    except (
        KeyError,
        TypeError,
        ValueError,
        IndexError,
        AttributeError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise MalformedEntry("malformed_body", f"{kind} {uuid}: {type(exc).__name__}: {exc}") from None
    raise MalformedEntry("unknown_kind", f"kind {kind!r}")


def _json_body(text: str) -> Any:
    """orjson, strict: NaN, Infinity and 1e400 are refused. What only json reads (a lone surrogate's
    escape, as `_entry` writes it) is read by json, which refuses NaN and Infinity too."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number the log writes")


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _contact(uuid: str, body: Mapping[str, Any]) -> Contact:
    eligible = [str(offer) for offer in body["eligible"]]
    scores = [float(value) for value in body["scores"]]
    if len(scores) != len(eligible):
        raise MalformedEntry(
            "malformed_body", f"contact {uuid}: {len(eligible)} offers, {len(scores)} scores"
        )
    counts = [int(count) for count in body["counts"]]
    if len(counts) != len(eligible):
        raise MalformedEntry(
            "malformed_body", f"contact {uuid}: {len(eligible)} offers, {len(counts)} counts"
        )
    epsilon, outcomes = float(body["epsilon"]), int(body["outcomes"])
    if not 0.0 <= epsilon <= 1.0 or outcomes < 1 or min(counts, default=0) < 0 or sum(counts) != outcomes:
        raise MalformedEntry(
            "malformed_body", f"contact {uuid}: not a first-slot distribution (epsilon, outcomes, counts)"
        )
    return Contact(
        uuid=uuid,
        time=float(body["time"]),
        deployment=str(body["deployment"]),
        campaign=str(body["campaign"]),
        channel=str(body["channel"]),
        config_revision=int(body["revision"]),
        variant=str(body["variant"]),
        replica=str(body["replica"]),
        options_generation=str(body["generation"]),
        customer=str(body["customer"]),
        segment=str(body["segment"]),
        context={str(k): v if isinstance(v, int | float) else str(v) for k, v in body["context"].items()},
        features={str(k): str(v) for k, v in body["features"].items()},
        eligible=eligible,
        eligible_scores=scores,
        first_slot=FirstSlot(epsilon, outcomes, counts),
        shown=[
            ShownOffer(
                str(offer),
                int(rank),
                float(score),
                float(propensity),
                _flag(explored),
                None if model_score is None else float(model_score),
            )
            for offer, rank, score, propensity, explored, model_score in body["shown"]
        ],
        explore=_flag(body["explore"]),
        model=str(body["model"]),
        latency_ms=float(body["latency_ms"]),
        subcampaign=str(body.get("subcampaign", "")),
        userid=str(body.get("userid", "")),
        shadow_of=str(body.get("shadow_of", "")),
        live_deployment=str(body.get("live_deployment", "")),
        routed_by=str(body.get("routed_by", "")),
        route_propensity=_probability(body.get("route_propensity", 1.0)),
    )


def _response(uuid: str, body: Mapping[str, Any]) -> Response:
    reward = body["reward"]
    return Response(
        uuid=uuid,
        time=float(body["time"]),
        deployment=str(body["deployment"]),
        accepted=[str(offer) for offer in body["accepted"]],
        learned_offers=[str(offer) for offer in body["learned_offers"]],
        reward=None if reward is None else float(reward),
        channel=str(body["channel"]),
        learned=_flag(body["learned"]),
        late=_flag(body["late"]),
        duplicate=_flag(body["duplicate"]),
        replica=str(body["replica"]),
        new_offers=[str(offer) for offer in body.get("new_offers", ())],
        credited_reward=_finite_number(body.get("credited_reward", 1.0)),
        contact_time=float(body.get("contact_time", 0.0)),
        segment=str(body.get("segment", "")),
        variant=str(body.get("variant", "")),
        config_revision=int(body.get("revision", 0)),
        latency_ms=float(body.get("latency_ms", 0.0)),
        learning_weight=_finite_number(body.get("learning_weight", 1.0)),
    )


def _probability(value: Any) -> float:
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise ValueError(f"{value!r} is not a probability in (0, 1]")
    return number


def _finite_number(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


__all__ = [
    "SCHEMA_VERSION",
    "Contact",
    "FirstSlot",
    "MalformedEntry",
    "Response",
    "ShownOffer",
    "decode_entry",
]
