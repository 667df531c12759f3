"""The ecosystem.Ai runtime's REST payloads, mapped to liveloop's decisions and back.

A client of that runtime switches over by changing its URL (and sending an API key), so /invocations
and /response take its JSON objects as they come:

- text fields (campaign, subcampaign, channel, customer, userid) as strings or numbers (a number
  becomes its decimal text: 1234 -> "1234"); an absent customer is "none", as in that runtime;
- params and in_param in every form parse_params accepts (an object, a JSON string, a URL-encoded
  JSON string, {"input": [names], "value": [values]}), flatten_json in the payload or in either;
- offers_accepted as a string, a list of ids or names, objects with offer, offer_name or offer_id,
  or final_result rows ({"result": {...}}); a payload with final_result and no offers_accepted is
  the /invocations reply echoed back, which that runtime takes as every offer in it accepted;
- keys the mapping does not know are ignored with a warning in the reply (a typo is visible).

The reply has that runtime's shape (uuid, final_result rows with rank, offer_name_desc, price, cost,
modified_offer_score and result_full, in_params echoing the params used) and liveloop's fields
besides. `propensity` keeps liveloop's meaning: the probability that the policy shows the offer at
its rank given the offers above it, exact and logged for offline evaluation, not that runtime's
observed take-up (which is `arm_reward` here).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from libs.common.errors import InvalidArgument
from libs.policy.context import parse_params
from services.predictor.core.decision import Decision, InvokeInput, RespondInput, ResponseOutcome

DEFAULT_CUSTOMER = "none"
# The keys of a flattened reply (flatten_json): final_result_<i>_result_<field>, ...
FLAT_REPLY_KEY = re.compile(r"(final_result|in_params|warnings)_")
FLAT_OFFER_KEY = re.compile(r"final_result_\d+_result_offer")
# Epoch numbers above this are milliseconds (as seconds they would be past the year 5000).
MILLISECONDS_FROM = 1e11
INVOKE_FIELDS = frozenset(
    {
        "campaign",
        "subcampaign",
        "channel",
        "customer",
        "userid",
        "numberoffers",
        "params",
        "in_param",
        "deployment",
        "flatten_json",
    }
)
RESPOND_FIELDS = frozenset(
    {"uuid", "offers_accepted", "accepted_offers", "channel_name", "reward", "event_time", "final_result"}
)
# Keys of an /invocations reply: a /response body that echoes one carries them without a warning.
REPLY_FIELDS = frozenset(
    {
        "deployment",
        "config_revision",
        "variant",
        "explore",
        "customer",
        "campaign",
        "channel",
        "subcampaign",
        "userid",
        "segment",
        "replica_id",
        "model",
        "warnings",
        "in_params",
        "routed_by",
    }
)


@dataclass(frozen=True)
class EcosystemInvoke:
    """An /invocations payload, read: the decision's input, whether to flatten the reply, the
    params it carries (echoed as in_params) and what was ignored."""

    request: InvokeInput
    flatten: bool
    params: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def read_invocation(payload: Mapping[str, Any]) -> EcosystemInvoke:
    in_param = dict(parse_params(payload.get("in_param"), "in_param"))
    params = dict(parse_params(payload.get("params"), "params"))
    flatten = any(_flag(source.pop("flatten_json", False)) for source in (in_param, params))
    flatten = _flag(payload.get("flatten_json", False)) or flatten
    request = InvokeInput(
        campaign=_text(payload, "campaign"),
        subcampaign=_text(payload, "subcampaign"),
        channel=_text(payload, "channel") or _param_text({**in_param, **params}, "channel"),
        customer=_text(payload, "customer") or DEFAULT_CUSTOMER,
        userid=_text(payload, "userid"),
        numberoffers=payload.get("numberoffers"),
        params=params,
        in_param=in_param,
        deployment=_text(payload, "deployment"),
    )
    return EcosystemInvoke(request, flatten, {**in_param, **params}, _unknown(payload, INVOKE_FIELDS))


def invocation_reply(decision: Decision, invocation: EcosystemInvoke, replica_id: str) -> dict[str, Any]:
    request = invocation.request
    context = dict(decision.context)  # numbers stay numbers in JSON
    rows = []
    for row in decision.offers:
        offer = row.offer
        full: dict[str, Any] = {
            "propensity": row.propensity,
            "explore": int(row.explored),
            "arm_reward": row.arm_reward,
            "arm_count": row.arm_count,
            "score": row.score,
        }
        if row.alpha is not None and row.beta is not None:
            full["alpha"], full["beta"] = row.alpha, row.beta
        if row.model_score is not None:
            full["model_score"] = row.model_score
        rows.append(
            {
                "result": {
                    "offer": offer.id,
                    "offer_name": offer.name,
                    "offer_name_desc": str(offer.attributes.get("description", offer.name)),
                    "score": row.score,
                    "final_score": row.final_score,
                    "modified_offer_score": row.final_score,
                    "arm_reward": row.arm_reward,
                    "propensity": row.propensity,
                    "price": offer.price,
                    "cost": offer.cost,
                    "rank": row.rank,
                    "explored": row.explored,
                    "context": context,
                    "segment": decision.segment,
                    "arm_count": row.arm_count,
                    "offer_details": dict(offer.attributes),
                    "result_full": full,
                }
            }
        )
        if row.model_score is not None:  # a bound model's take-up for the offer
            rows[-1]["result"]["model_score"] = row.model_score
    reply: dict[str, Any] = {
        "uuid": decision.uuid,
        "deployment": decision.deployment,
        "config_revision": decision.config_revision,
        "variant": decision.variant,
        "explore": int(decision.explore),
        "final_result": rows,
        "customer": request.customer,
        "campaign": request.campaign,
        "subcampaign": request.subcampaign,
        "channel": request.channel,
        "userid": request.userid,
        "segment": decision.segment,
        "replica_id": replica_id,
        "in_params": invocation.params,
        "warnings": [*decision.warnings, *invocation.warnings],
    }
    if decision.model:
        reply["model"] = decision.model
    if decision.routed_by:
        reply["routed_by"] = decision.routed_by
    return flatten_reply(reply) if invocation.flatten else reply


def flatten_reply(document: Mapping[str, Any]) -> dict[str, Any]:
    """Nested objects and lists as flat keys joined with "_": final_result_0_result_offer, ..."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(f"{prefix}_{key}" if prefix else str(key), item)
        elif isinstance(value, list) and value:
            for index, item in enumerate(value):
                walk(f"{prefix}_{index}", item)
        else:
            flat[prefix] = value

    walk("", document)
    return flat


@dataclass(frozen=True)
class EcosystemRespond:
    request: RespondInput
    warnings: list[str] = field(default_factory=list)


def read_response(payload: Mapping[str, Any]) -> EcosystemRespond:
    uuid = _text(payload, "uuid")
    accepted = offer_names(payload.get("offers_accepted"), "offers_accepted")
    accepted += offer_names(payload.get("accepted_offers"), "accepted_offers")
    # A flattened reply's keys (final_result_0_result_offer, ...) are known too.
    warnings = _unknown(payload, RESPOND_FIELDS | REPLY_FIELDS, known_prefix=FLAT_REPLY_KEY)
    if "offers_accepted" not in payload and "accepted_offers" not in payload:
        # The /invocations reply echoed back, nested or flattened: every offer it lists was accepted.
        if "final_result" in payload:
            accepted = offer_names(payload["final_result"], "final_result")
        else:
            accepted = [str(payload[key]) for key in payload if FLAT_OFFER_KEY.fullmatch(key)]
    return EcosystemRespond(
        RespondInput(
            uuid=uuid,
            accepted=accepted,
            channel_name=_text(payload, "channel_name"),
            reward=_reward(payload.get("reward")),
            event_time=_event_time(payload.get("event_time")),
            payload=payload,  # all of it, for the deployment's reward plugins
        ),
        warnings,
    )


def response_reply(outcome: ResponseOutcome, response: EcosystemRespond) -> dict[str, Any]:
    message = outcome.message
    if response.warnings:
        message = "; ".join([message, *response.warnings])
    return {
        "uuid": outcome.uuid,
        "learned": outcome.learned,
        "late": outcome.late,
        "duplicate": outcome.duplicate,
        "message": message,
        "matched_offers": list(outcome.matched_offers),
        "deployment": outcome.deployment,
        "warnings": response.warnings,
    }


def _text(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if value is None:
        return ""
    if isinstance(value, bool):
        raise InvalidArgument("must be a string or a number, not true or false", field=name)
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument("must be a finite number", field=name)
        return str(int(value)) if value.is_integer() else repr(value)
    raise InvalidArgument("must be a string or a number", field=name)


def _param_text(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    return value if isinstance(value, str) else ""


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _unknown(
    payload: Mapping[str, Any], known: frozenset[str], known_prefix: re.Pattern[str] | None = None
) -> list[str]:
    return [
        f"unknown field '{key}' ignored"
        for key in payload
        if key not in known and not (known_prefix is not None and known_prefix.match(key))
    ]


def offer_names(value: Any, name: str) -> list[str]:
    """Offer ids or names from any of the forms in the module docstring."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [value]
    names: list[str] = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("result"), dict):
            item = item["result"]  # a final_result row
        if isinstance(item, str):
            names.extend(part.strip() for part in item.split(",") if part.strip())
            continue
        if isinstance(item, dict):
            offer = next(
                (item[key] for key in ("offer", "offer_id", "offer_name") if isinstance(item.get(key), str)),
                None,
            )
            if offer:
                names.append(offer)
                continue
        raise InvalidArgument(
            "must be offer ids or names: a string, a list of strings, or objects with 'offer', "
            "'offer_id' or 'offer_name' (final_result rows too)",
            field=name,
        )
    return names


def _reward(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidArgument("must be a number", field="reward")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"must be a number, got {str(value)[:40]!r}", field="reward") from None


def _event_time(value: Any) -> float | None:
    """An RFC 3339 time ("2026-01-02T03:04:05Z") or seconds (or milliseconds) since the epoch; None: now."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise InvalidArgument("must be a finite number of seconds", field="event_time")
        return float(value) / 1000 if value > MILLISECONDS_FROM else float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"is not an RFC 3339 time: {value[:40]!r}", field="event_time") from None
        if parsed.tzinfo is None:
            raise InvalidArgument("needs a time zone (for example a trailing Z)", field="event_time")
        return parsed.timestamp()
    raise InvalidArgument("must be an RFC 3339 time or seconds since the epoch", field="event_time")
