"""Where liveloop keeps things in Redis: one module, so ingest (writer) and the predictor (reader)
agree. Keys are readable and deterministic; no serialized protobuf in key names."""

from __future__ import annotations

PREFIX = "ll"
DECISION_STREAM = f"{PREFIX}:decisions"  # contacts and responses, for the monitor and offline evaluation
# Pub/sub: the key of an arm hash that learned from a response; replicas drop their copy of it.
ARM_UPDATES_CHANNEL = f"{PREFIX}:arm-updates"


def online_features(feature_view: str, entity: str) -> str:
    """Latest features of one entity (a customer), a Redis hash of feature -> value."""
    return f"{PREFIX}:features:{feature_view}:{entity}"


def feature_view_columns(feature_view: str) -> str:
    """The features a materialized view holds (a JSON list), written by ingest with its rows, so a
    replica can tell whether a bound model's inputs can be supplied before it serves one."""
    return f"{PREFIX}:feature-columns:{feature_view}"


def options_generation(deployment: str) -> str:
    """Which generation of a deployment's options store is live (switched atomically by ingest)."""
    return f"{PREFIX}:options:{deployment}:generation"


# The arm hash's field holding the segment's impression clock (impressions of any offer so far);
# no offer id is empty, so no offer's field can be it.
SEGMENT_CLOCK_FIELD = "|imp"


def arm_statistics(deployment: str, generation: str, segment: str) -> str:
    """Arm statistics of every offer in one segment: fields `<offer>|n` (impressions), `<offer>|s`
    (successes), `<offer>|t` (time of the last update), `<offer>|c` (the segment's impression clock
    at that update), window, change-detection and prior fields, and SEGMENT_CLOCK_FIELD."""
    return f"{PREFIX}:arms:{deployment}:{generation}:{segment}"


def naive_bayes_counts(deployment: str, generation: str) -> str:
    return f"{PREFIX}:nb:{deployment}:{generation}"


def linear_model(deployment: str, generation: str, offer: str) -> str:
    return f"{PREFIX}:linear:{deployment}:{generation}:{offer}"


def offer_budget(deployment: str, offer: str, period_start: int) -> str:
    """What an offer's budget used in one period (a number: presentations or value)."""
    return f"{PREFIX}:budget:{deployment}:{offer}:{period_start}"


def contact(uuid: str) -> str:
    """One Invoke, kept for the reward window so Respond can join it."""
    return f"{PREFIX}:contact:{uuid}"
